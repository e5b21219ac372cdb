"""The error hierarchy and the one table from domain errors to gRPC status codes."""

from __future__ import annotations

import re

import grpc
import pytest

from clearinghouse._invariant import InvariantViolation
from clearinghouse.domain import errors
from clearinghouse.domain.errors import (
    STATUS_BY_ERROR,
    AlreadyExists,
    CertificateRevoked,
    ClearingError,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    InsufficientLiquidity,
    InvalidArgument,
    NotFound,
    OrderNotFresh,
    ParticipantSuspended,
    PermissionDenied,
    ResourceExhausted,
    SignatureRefused,
    Unauthenticated,
    Unavailable,
    UnknownParticipant,
    status_for,
)

pytestmark = pytest.mark.unit

# Written out independently of the table under test, so that a wrong row fails here.
EXPECTED_CODES: dict[type[ClearingError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    NotFound: grpc.StatusCode.NOT_FOUND,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    InsufficientLiquidity: grpc.StatusCode.FAILED_PRECONDITION,
    ParticipantSuspended: grpc.StatusCode.FAILED_PRECONDITION,
    UnknownParticipant: grpc.StatusCode.FAILED_PRECONDITION,
    OrderNotFresh: grpc.StatusCode.FAILED_PRECONDITION,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    CertificateRevoked: grpc.StatusCode.UNAUTHENTICATED,
    SignatureRefused: grpc.StatusCode.PERMISSION_DENIED,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    DataLoss: grpc.StatusCode.DATA_LOSS,
}


def _all_subclasses(cls: type[ClearingError]) -> set[type[ClearingError]]:
    found: set[type[ClearingError]] = set()
    for sub in cls.__subclasses__():
        found |= {sub} | _all_subclasses(sub)
    return found


def _instance(cls: type[ClearingError]) -> ClearingError:
    if issubclass(cls, InvalidArgument):
        return cls([FieldViolation("order.payment_id", "bad")])
    return cls("boom")


def _domain_subclasses() -> set[type[ClearingError]]:
    # Tests elsewhere may define their own subclasses; only the module's own count here.
    return {c for c in _all_subclasses(ClearingError) if c.__module__ == errors.__name__}


def test_every_subclass_has_a_specific_code() -> None:
    subclasses = _domain_subclasses()
    assert subclasses == set(EXPECTED_CODES)
    for cls in subclasses:
        code = status_for(_instance(cls))
        assert code not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), cls
        assert code == EXPECTED_CODES[cls], cls


def test_table_is_exactly_the_expected_rows() -> None:
    assert dict(STATUS_BY_ERROR) == EXPECTED_CODES


def test_table_is_read_only() -> None:
    with pytest.raises(TypeError):
        STATUS_BY_ERROR[NotFound] = grpc.StatusCode.INTERNAL  # type: ignore[index]


@pytest.mark.parametrize(
    "err",
    [ValueError("x"), KeyError("k"), InvariantViolation("broken"), ClearingError("root")],
)
def test_bugs_and_the_bare_root_map_to_internal(err: BaseException) -> None:
    assert status_for(err) == grpc.StatusCode.INTERNAL


def test_subclass_defined_elsewhere_inherits_its_parents_code() -> None:
    class LeaseLost(Unavailable):
        pass

    class CapExceeded(InsufficientLiquidity):
        pass

    assert status_for(LeaseLost("lease lost")) == grpc.StatusCode.UNAVAILABLE
    assert status_for(CapExceeded("cap")) == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.parametrize(
    ("cls", "reason"),
    [
        (InsufficientLiquidity, "INSUFFICIENT_LIQUIDITY"),
        (ParticipantSuspended, "PARTICIPANT_SUSPENDED"),
        (AlreadyExists, "PAYMENT_ID_REUSED"),
        (SignatureRefused, "SIGNATURE_INVALID"),
        (OrderNotFresh, "ORDER_EXPIRED"),
        (CertificateRevoked, "CERTIFICATE_REVOKED"),
        (InvalidArgument, "INVALID_ARGUMENT"),
        (Unavailable, "UNAVAILABLE"),
    ],
)
def test_reasons(cls: type[ClearingError], reason: str) -> None:
    assert _instance(cls).reason == reason


def test_default_reasons_are_unique_upper_snake() -> None:
    reasons = [cls.default_reason for cls in EXPECTED_CODES]
    assert len(set(reasons)) == len(reasons)
    assert all(re.fullmatch(r"[A-Z][A-Z0-9_]*", r) for r in reasons)


def test_reason_can_be_refined_per_instance() -> None:
    err = Unavailable("not mine", retry_after_ms=50, reason=Unavailable.NOT_SHARD_OWNER)
    assert (err.reason, err.retry_after_ms, err.message) == ("NOT_SHARD_OWNER", 50, "not mine")
    assert status_for(err) == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("reason", ["lower_case", "TRAILING_", "", "HAS SPACE", "_LEADING"])
def test_malformed_reason_is_an_invariant_violation(reason: str) -> None:
    with pytest.raises(InvariantViolation):
        NotFound("x", reason=reason)


def test_invalid_argument_carries_all_violations() -> None:
    violations = [FieldViolation("order.memo", "too long"), FieldViolation("order.type", "bad")]
    err = InvalidArgument(violations)
    assert err.violations == tuple(violations)
    assert "order.memo: too long" in str(err)
    assert "order.type: bad" in str(err)


def test_invalid_argument_needs_a_violation() -> None:
    with pytest.raises(InvariantViolation):
        InvalidArgument([])


@pytest.mark.parametrize("cls", [ResourceExhausted, Unavailable])
def test_retry_after_ms_is_checked(cls: type[ResourceExhausted | Unavailable]) -> None:
    assert cls("x").retry_after_ms == 0
    assert cls("x", retry_after_ms=2**31 - 1).retry_after_ms == 2**31 - 1
    with pytest.raises(InvariantViolation):
        cls("x", retry_after_ms=-1)
    with pytest.raises(InvariantViolation):
        cls("x", retry_after_ms=2**31)
