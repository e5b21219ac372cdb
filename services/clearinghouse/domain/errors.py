"""The switch's domain errors, and the one table that maps them to gRPC status codes.

Every error the switch reports on purpose is a :class:`ClearingError`. Each class fixes
the gRPC status code; each instance carries a machine ``reason`` in UPPER_SNAKE_CASE
that clients may branch on (the ``reason`` of ``clearing.v1.Error``) and a message for
people. The hierarchy::

    ClearingError                      (not raised itself)
    ├── InvalidArgument                INVALID_ARGUMENT     violations: FieldViolation...
    ├── AlreadyExists                  ALREADY_EXISTS       same payment id, other payload
    ├── NotFound                       NOT_FOUND            PAYMENT_NOT_FOUND |
    │                                                       WINDOW_NOT_FOUND |
    │                                                       PARTICIPANT_NOT_FOUND |
    │                                                       PAYMENT_NOT_IN_WINDOW
    ├── FailedPrecondition             FAILED_PRECONDITION
    │   ├── InsufficientLiquidity      FAILED_PRECONDITION
    │   ├── ParticipantSuspended       FAILED_PRECONDITION
    │   ├── UnknownParticipant         FAILED_PRECONDITION  PARTICIPANT_NOT_FOUND
    │   └── OrderNotFresh              FAILED_PRECONDITION  ORDER_EXPIRED | ORDER_FROM_FUTURE
    ├── Unauthenticated                UNAUTHENTICATED      no certificate the CA issued
    │   └── CertificateRevoked         UNAUTHENTICATED      CERTIFICATE_REVOKED
    ├── PermissionDenied               PERMISSION_DENIED
    │   └── SignatureRefused           PERMISSION_DENIED    SIGNATURE_MISSING |
    │                                                       SIGNATURE_INVALID |
    │                                                       SIGNING_KEY_UNKNOWN
    ├── ResourceExhausted              RESOURCE_EXHAUSTED   retry_after_ms
    ├── Unavailable                    UNAVAILABLE          retry_after_ms
    └── DeadlineExceeded               DEADLINE_EXCEEDED

:data:`STATUS_BY_ERROR` is the only place where domain errors meet gRPC codes, as in
etcd's single error table. :func:`status_for` walks the exception's MRO through it, so
a subclass defined elsewhere inherits its parent's code; anything that is not a
ClearingError is a bug and maps to INTERNAL, and the caller logs it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import ClassVar, Final

import grpc

from clearinghouse._invariant import invariant

_REASON_PATTERN: Final = re.compile(r"[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)*")
# retry_after_ms travels as a protobuf int32.
RETRY_AFTER_MS_MAX: Final = 2**31 - 1


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One invalid field: its path from the request root (``orders[3].payee_id``) and why."""

    field: str
    description: str


class ClearingError(Exception):
    """Root of the switch's domain errors. Raise a subclass, never this class itself."""

    default_reason: ClassVar[str] = "CLEARING_ERROR"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        chosen = self.default_reason if reason is None else reason
        # A reason is part of the API contract; a typo in one would silently break clients.
        invariant(_REASON_PATTERN.fullmatch(chosen) is not None, f"bad reason {chosen!r}")
        super().__init__(message)
        self.message = message
        self.reason = chosen


class InvalidArgument(ClearingError):
    """The request is malformed whatever the state of the switch; lists every bad field."""

    default_reason = "INVALID_ARGUMENT"
    # The request's bytes are not a message of the method's request type at all.
    MALFORMED_REQUEST: ClassVar[str] = "MALFORMED_REQUEST"

    def __init__(
        self,
        violations: Iterable[FieldViolation],
        message: str | None = None,
        *,
        reason: str | None = None,
    ) -> None:
        self.violations: tuple[FieldViolation, ...] = tuple(violations)
        invariant(len(self.violations) > 0, "InvalidArgument needs at least one violation")
        if message is None:
            message = "; ".join(f"{v.field}: {v.description}" for v in self.violations)
        super().__init__(message, reason=reason)


class AlreadyExists(ClearingError):
    """The payment id was used before for a different payload (a different fingerprint)."""

    default_reason = "PAYMENT_ID_REUSED"


class NotFound(ClearingError):
    """A named payment, window or participant does not exist. Raised with the reason
    naming which (a client told "NOT_FOUND" alone cannot tell its payment id from its
    window number being wrong); the default is for a thing no reason names yet."""

    default_reason = "NOT_FOUND"
    PAYMENT: ClassVar[str] = "PAYMENT_NOT_FOUND"

    @classmethod
    def payment(cls, institution_id: str, payment_id: str) -> NotFound:
        """The answer for a payment the switch never recorded, wherever it is looked up."""
        return cls(f"no payment {payment_id!r} of institution {institution_id!r}",
                   reason=cls.PAYMENT)  # fmt: skip


class FailedPrecondition(ClearingError):
    """The switch is not in a state that allows the request; retrying it will not help."""

    default_reason = "FAILED_PRECONDITION"
    CURRENCY_NOT_SUPPORTED: ClassVar[str] = "CURRENCY_NOT_SUPPORTED"
    ILLEGAL_STATE_TRANSITION: ClassVar[str] = "ILLEGAL_STATE_TRANSITION"


class InsufficientLiquidity(FailedPrecondition):
    """The payer's position cannot cover the payment.

    NET_DEBIT_CAP_EXCEEDED is the reason when the payment would push the payer's net
    debit position above its cap, as opposed to a reserve that cannot cover it.
    """

    default_reason = "INSUFFICIENT_LIQUIDITY"
    NET_DEBIT_CAP_EXCEEDED: ClassVar[str] = "NET_DEBIT_CAP_EXCEEDED"


class ParticipantSuspended(FailedPrecondition):
    """An operator suspended a participant that the request names."""

    default_reason = "PARTICIPANT_SUSPENDED"


class UnknownParticipant(FailedPrecondition):
    """An order names a participant the registry does not hold (payment.proto: an
    unknown or suspended participant is FAILED_PRECONDITION; registering it, not
    resending the order as it is, is what helps)."""

    default_reason = "PARTICIPANT_NOT_FOUND"
    # A node that lacks a participant reads the registry again at once, at most twice a
    # second (switch.processor.Registry); an order sent in between may still miss it.
    JUST_REGISTERED = (
        "; if it was registered a moment ago, send the order again (same id) in a second"
    )


class PermissionDenied(ClearingError):
    """The caller may not do this, e.g. a bank submitting a payment as an institution."""

    default_reason = "PERMISSION_DENIED"


class Unauthenticated(ClearingError):
    """The call carries no client certificate the switch's CA issued."""

    default_reason = "NOT_AUTHENTICATED"


class CertificateRevoked(Unauthenticated):
    """The caller's certificate is one an operator revoked (AdminService.RevokeCertificate)."""

    default_reason = "CERTIFICATE_REVOKED"


class SignatureRefused(PermissionDenied):
    """A payment order's signature is missing, made by an unknown key, or does not verify.

    PERMISSION_DENIED rather than UNAUTHENTICATED: the caller's channel may well be
    authenticated; it is the order that carries no valid authorisation of the
    institution it names. The reason says which: SIGNATURE_MISSING (no signature or no
    key id), SIGNING_KEY_UNKNOWN (the key id is not one the institution registered), or
    SIGNATURE_INVALID (a field or the signature changed, or another key signed).
    """

    default_reason = "SIGNATURE_INVALID"
    SIGNATURE_MISSING: ClassVar[str] = "SIGNATURE_MISSING"
    SIGNATURE_INVALID: ClassVar[str] = "SIGNATURE_INVALID"
    SIGNING_KEY_UNKNOWN: ClassVar[str] = "SIGNING_KEY_UNKNOWN"


class OrderNotFresh(FailedPrecondition):
    """A payment order's ``requested_at`` lies outside the switch's freshness window:
    ORDER_EXPIRED (too old; a replayed capture, or a retry too late) or ORDER_FROM_FUTURE
    (ahead of the switch's clock by more than the allowed skew). Retrying the same order
    will not help; GetPayment tells whether an earlier attempt was recorded."""

    default_reason = "ORDER_EXPIRED"
    ORDER_EXPIRED: ClassVar[str] = "ORDER_EXPIRED"
    ORDER_FROM_FUTURE: ClassVar[str] = "ORDER_FROM_FUTURE"


def _checked_retry_after_ms(retry_after_ms: int) -> int:
    # Zero means "no hint", as in clearing.v1.Error, whose field is an int32.
    invariant(
        0 <= retry_after_ms <= RETRY_AFTER_MS_MAX,
        f"retry_after_ms {retry_after_ms} outside 0..{RETRY_AFTER_MS_MAX}",
    )
    return retry_after_ms


class ResourceExhausted(ClearingError):
    """A rate limit or a queue is full; the client should back off for retry_after_ms."""

    default_reason = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, *, retry_after_ms: int = 0, reason: str | None = None) -> None:
        super().__init__(message, reason=reason)
        self.retry_after_ms = _checked_retry_after_ms(retry_after_ms)


class Unavailable(ClearingError):
    """The switch cannot serve the request now; the same request may succeed later."""

    default_reason = "UNAVAILABLE"
    STORAGE_QUORUM_LOST: ClassVar[str] = "STORAGE_QUORUM_LOST"
    BANK_UNAVAILABLE: ClassVar[str] = "BANK_UNAVAILABLE"
    NOT_SHARD_OWNER: ClassVar[str] = "NOT_SHARD_OWNER"
    # The owner's lease is past its local deadline, not yet confirmed or lost (etcd may
    # be electing a leader): ask the same owner again shortly.
    OWNERSHIP_UNCONFIRMED: ClassVar[str] = "SHARD_OWNERSHIP_UNCONFIRMED"

    def __init__(self, message: str, *, retry_after_ms: int = 0, reason: str | None = None) -> None:
        super().__init__(message, reason=reason)
        self.retry_after_ms = _checked_retry_after_ms(retry_after_ms)


class DataLoss(ClearingError):
    """Stored data failed its own checks (a ledger chain that does not verify): nothing
    read from it is trusted; operators must look."""

    default_reason = "LEDGER_INCONSISTENT"


class DeadlineExceeded(ClearingError):
    """The request's deadline passed before the switch decided; the outcome may be unknown."""

    default_reason = "DEADLINE_EXCEEDED"


# The trailing metadata key under which a failed call carries a serialized
# clearing.v1.Error (see common.proto); "-bin" makes gRPC carry the bytes as binary.
# The switch, the banks and clients all use this one name.
ERROR_METADATA_KEY: Final = "clearing-error-bin"

# A failed call's error travels in its trailers (the status message and the Error
# above), which clients cap: gRPC's default is 8 KiB for all of them. Text that echoes a
# request (an id, a currency code) is cut to these bounds, in UTF-8 bytes, so that the
# error always arrives whole instead of as the client's RESOURCE_EXHAUSTED.
ERROR_MESSAGE_BYTES_MAX: Final = 256
ERROR_VIOLATIONS_MAX: Final = 16
VIOLATION_FIELD_BYTES_MAX: Final = 64
VIOLATION_DESCRIPTION_BYTES_MAX: Final = 128
STATUS_DETAILS_BYTES_MAX: Final = 512
_CUT_MARK: Final = "..."


def clipped(text: str, max_bytes: int) -> str:
    """``text`` if its UTF-8 is at most ``max_bytes`` long, else a prefix ending in "..."."""
    data = text.encode("utf-8", "replace")
    if len(data) <= max_bytes:
        return text
    head = data[: max(0, max_bytes - len(_CUT_MARK))].decode("utf-8", "ignore")
    return head + _CUT_MARK


STATUS_BY_ERROR: Final[Mapping[type[ClearingError], grpc.StatusCode]] = MappingProxyType(
    {
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
)


def status_for(err: BaseException) -> grpc.StatusCode:
    """The gRPC code for ``err``: the nearest class in its MRO that the table names.

    The bare root and anything that is not a ClearingError map to INTERNAL: they are
    bugs, and the caller must log them with their traceback.
    """
    for cls in type(err).__mro__:
        if issubclass(cls, ClearingError) and cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]
    return grpc.StatusCode.INTERNAL
