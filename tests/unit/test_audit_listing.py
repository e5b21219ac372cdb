"""``AuditService`` calls naming a participant that was never registered: NOT_FOUND
(``PARTICIPANT_NOT_FOUND``, the same for every call), before anything is read (an empty
page would look like a quiet day, "no such payment" like a wrong payment id)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from clearing.v1 import audit_pb2
from clearinghouse.switch.servicers import AuditServicer
from tests.fakes import Aborted, FakeServicerContext

pytestmark = pytest.mark.unit


class NoReads:
    """A router and ledger that note what the listing reads, and refuse it."""

    def __init__(self) -> None:
        self.read: list[str] = []

    def __getattr__(self, name: str) -> Any:
        self.read.append(name)
        raise AssertionError(f"the listing read {name}")


def test_an_unregistered_participant_is_not_found_and_nothing_is_read() -> None:
    audit = SimpleNamespace(kinds=lambda: {"INST_ALIPAY": "INSTITUTION"})
    router, ledger = NoReads(), NoReads()
    servicer = AuditServicer(audit, router, ledger)  # type: ignore[arg-type]
    ctx = FakeServicerContext()
    request = audit_pb2.ListParticipantPaymentsRequest(participant_id="INST_NOPE", page_size=10)
    with pytest.raises(Aborted, match="INST_NOPE"):
        servicer.ListParticipantPayments(request, ctx)  # type: ignore[arg-type]
    assert ctx.code is grpc.StatusCode.NOT_FOUND
    assert ctx.error is not None and ctx.error.reason == "PARTICIPANT_NOT_FOUND"
    # A malformed id is still INVALID_ARGUMENT, as before.
    bad = audit_pb2.ListParticipantPaymentsRequest(participant_id="no spaces", page_size=10)
    ctx = FakeServicerContext()
    with pytest.raises(Aborted):
        servicer.ListParticipantPayments(bad, ctx)  # type: ignore[arg-type]
    assert ctx.code is grpc.StatusCode.INVALID_ARGUMENT
    assert router.read == [] and ledger.read == []


def test_a_participant_registered_since_the_last_refresh_is_listed() -> None:
    """The registry is refreshed every 2 s; a participant the store already holds is
    not refused meanwhile: the listing goes on to read its payments."""
    audit = SimpleNamespace(kinds=lambda: {})  # the registry has not seen it yet
    store = {"INST_NEW"}
    router, ledger = NoReads(), NoReads()
    servicer = AuditServicer(audit, router, ledger, store.__contains__)  # type: ignore[arg-type]
    request = audit_pb2.ListParticipantPaymentsRequest(participant_id="INST_NEW", page_size=10)
    with pytest.raises(Aborted):  # the fake ledger refuses the read, as INTERNAL
        servicer.ListParticipantPayments(request, FakeServicerContext())  # type: ignore[arg-type]
    assert ledger.read == ["list_index"]  # past the check: it went on to read the index


@pytest.mark.parametrize(
    ("method", "request_pb"),
    [
        ("GetPaymentHistory",
         audit_pb2.GetPaymentHistoryRequest(institution_id="INST_NOPE", payment_id="p-1")),
        ("GetInclusionProof",
         audit_pb2.GetInclusionProofRequest(institution_id="INST_NOPE", payment_id="p-1")),
    ],
)  # fmt: skip
def test_a_payment_of_an_unregistered_institution_says_so_and_reads_nothing(
    method: str, request_pb: Any
) -> None:
    audit = SimpleNamespace(kinds=lambda: {"INST_ALIPAY": "INSTITUTION"})
    router, ledger = NoReads(), NoReads()
    servicer = AuditServicer(audit, router, ledger)  # type: ignore[arg-type]
    ctx = FakeServicerContext()
    with pytest.raises(Aborted, match="no participant 'INST_NOPE' is registered"):
        getattr(servicer, method)(request_pb, ctx)
    assert ctx.code is grpc.StatusCode.NOT_FOUND
    assert ctx.error is not None and ctx.error.reason == "PARTICIPANT_NOT_FOUND"
    assert router.read == [] and ledger.read == []
