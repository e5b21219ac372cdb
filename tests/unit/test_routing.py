"""The router asks an owner again when it answered that its ownership awaits etcd, and
answers every order even when the call has no time left."""

from __future__ import annotations

from concurrent import futures
from typing import Any

import grpc
import pytest

from clearing.v1 import payment_pb2
from clearinghouse.domain import Unavailable
from clearinghouse.switch import convert
from clearinghouse.switch.routing import OwnerRef, Router

pytestmark = pytest.mark.unit

HERE = OwnerRef("beijing-a", "127.0.1.1:15051", "beijing-a")


class OwnerHere:
    doubt: str | None = None

    def owner_of(self, shard: int) -> OwnerRef:
        return HERE

    def ownership_doubt(self) -> str | None:
        return self.doubt


class SuspendedThenConfirmed:
    """The local owner: its lease is suspended for the first ``refusals`` rounds."""

    def __init__(self, refusals: int, reason: str) -> None:
        self.refusals = refusals
        self.reason = reason
        self.calls = 0

    def submit(self, orders: Any, paths: Any, zone: str) -> list[Any]:
        self.calls += 1
        if self.calls <= self.refusals:
            err = Unavailable("awaits etcd", retry_after_ms=1000, reason=self.reason)
            return [
                payment_pb2.PaymentResult(payment_id=o.payment_id, error=convert.error_to_pb(err))
                for o in orders
            ]
        return [payment_pb2.PaymentResult(payment_id=o.payment_id) for o in orders]


def _submit(local: SuspendedThenConfirmed, deadline_s: float = 10.0, owners: Any = None) -> Any:
    pool = futures.ThreadPoolExecutor(2)
    router = Router(
        node_id=HERE.node_id, zone=HERE.zone, owners=owners or OwnerHere(),
        local=local,  # type: ignore[arg-type]
        pool=pool, credentials=grpc.local_channel_credentials(),
    )  # fmt: skip
    try:
        order = payment_pb2.PaymentOrder(institution_id="INST_ALIPAY", payment_id="p-1")
        (result,) = router.submit(
            [order], ["/clearing.v1.PaymentService/SubmitPayment"], deadline_s
        )
        return result
    finally:
        router.close()
        pool.shutdown()


def test_an_unconfirmed_owner_is_asked_again_until_it_answers() -> None:
    local = SuspendedThenConfirmed(2, Unavailable.OWNERSHIP_UNCONFIRMED)
    result = _submit(local)
    assert not result.HasField("error"), result
    assert local.calls == 3


def test_owners_that_disown_a_shard_while_etcd_is_out_of_reach_say_so() -> None:
    """With etcd's quorum gone, leases lapse and owners drop their shards while the map
    still names them: the answer is etcd's trouble, not a routing miss."""
    cut_off = OwnerHere()
    cut_off.doubt = "this node's etcd lease is past its deadline, unconfirmed"
    local = SuspendedThenConfirmed(10**6, Unavailable.NOT_SHARD_OWNER)
    result = _submit(local, deadline_s=1.0, owners=cut_off)
    assert result.error.reason == Unavailable.OWNERSHIP_UNCONFIRMED
    assert result.error.message.startswith(cut_off.doubt)
    assert "SHARD_OWNER)" in result.error.message  # the miss it replaces, named
    assert result.error.retry_after_ms > 0
    # With etcd answering, the same miss is what it is.
    local = SuspendedThenConfirmed(10**6, Unavailable.NOT_SHARD_OWNER)
    assert _submit(local, deadline_s=1.0).error.reason in ("NO_SHARD_OWNER", "NOT_SHARD_OWNER")


def test_other_unavailable_answers_are_the_answer() -> None:
    local = SuspendedThenConfirmed(1, "STORAGE_QUORUM_LOST")
    result = _submit(local)
    assert result.error.reason == "STORAGE_QUORUM_LOST"
    assert local.calls == 1


@pytest.mark.parametrize("deadline_s", [0.0, -1.0])
def test_an_order_with_no_time_left_is_answered_not_dropped(deadline_s: float) -> None:
    # It came back as None: SubmitPayment then failed outside its error handling
    # (UNKNOWN), SubmitPayments with INTERNAL.
    local = SuspendedThenConfirmed(0, "")
    result = _submit(local, deadline_s)
    assert result is not None and result.payment_id == "p-1"
    assert result.error.reason == "DEADLINE_EXCEEDED"
    assert "nothing was recorded" in result.error.message
    assert local.calls == 0
