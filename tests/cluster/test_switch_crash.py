"""A switch node SIGKILLed in the middle of a batch: exactly one effect per payment.

The batch goes to one zone's node through a bank that takes about two seconds per
transfer, so the node dies with payments received, routed and at the bank (those of the
shards it owned) or forwarded to other owners. The client then retries the same ids on
another zone, as a real client would, until every payment has its final state: the
dead node's shards are taken over once its lease runs out, and their new owners resolve
what it left undecided. Checked against the bank's own book and the verified ledger.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import grpc
import pytest

from clearing.v1 import common_pb2, payment_pb2
from clearinghouse.ledger_view import read_ledger
from clearinghouse.storage.ledger import CassandraLedger
from clearinghouse.switch.records import payment_key
from tests.support import SwitchEnv, session_preferring

pytestmark = pytest.mark.cluster

BATCH = 30
KILL_AFTER_S = 1.0
RETRY_FOR_S = 60.0
RETRY_PAUSE_MAX_S = 3.0
FINAL = {
    common_pb2.PAYMENT_STATE_APPROVED, common_pb2.PAYMENT_STATE_DECLINED,
    common_pb2.PAYMENT_STATE_FAILED, common_pb2.PAYMENT_STATE_REVERSED,
}  # fmt: skip


def test_node_killed_mid_batch_retried_elsewhere_has_one_effect_per_payment(
    switch_env: SwitchEnv,
) -> None:
    env = switch_env
    victim, other = "beijing-a", "shanghai-b"
    orders = [env.order(payer_id="BANK_LAGGY", institution_id="INST_JDPAY", payee_id="INST_JDPAY")
              for _ in range(BATCH)]  # fmt: skip
    first: dict[str, Any] = {}

    def send() -> None:
        try:
            first["resp"] = env.clients[victim].payments.SubmitPayments(
                payment_pb2.SubmitPaymentsRequest(orders=orders), timeout=60
            )
        except grpc.RpcError as e:
            first["error"] = e

    t = threading.Thread(target=send)
    t.start()
    time.sleep(KILL_AFTER_S)
    assert env.lc.kill(f"switch@{victim}") == [f"switch@{victim}"]
    t.join(30)
    assert "error" in first, "the batch finished before the node was killed: nothing tested"
    assert first["error"].code() is grpc.StatusCode.UNAVAILABLE

    final: dict[str, Any] = {}
    deadline = time.monotonic() + RETRY_FOR_S
    while len(final) < BATCH and time.monotonic() < deadline:
        pending = [o for o in orders if o.payment_id not in final]
        resp = env.clients[other].payments.SubmitPayments(
            payment_pb2.SubmitPaymentsRequest(orders=pending), timeout=60
        )
        wait_ms = 0
        for r in resp.results:
            if r.HasField("payment"):
                assert r.payment.state in FINAL
                final[r.payment_id] = r.payment
            else:
                # Failover in progress (no owner yet, owner rebuilding, payment being
                # resolved): UNAVAILABLE with retry advice, nothing else.
                assert r.error.code == grpc.StatusCode.UNAVAILABLE.value[0], r.error
                assert r.error.retry_after_ms > 0, r.error
                wait_ms = max(wait_ms, r.error.retry_after_ms)
        if len(final) < BATCH:
            time.sleep(min(wait_ms / 1000, RETRY_PAUSE_MAX_S))
    assert len(final) == BATCH, f"{BATCH - len(final)} payments still undecided"

    # One effect per payment: one transfer at the bank at most, and an APPROVED payment
    # has exactly its two postings; any other decision has none.
    with session_preferring(env.lc, "shenzhen") as s:
        ledger = read_ledger(CassandraLedger(s))
    for o in orders:
        p = final[o.payment_id]
        assert env.transfers_at_bank("BANK_LAGGY", p.switch_ref) <= 1
        key = payment_key(o.institution_id, o.payment_id)
        assert ledger.decided[key] == common_pb2.PaymentState.Name(p.state).removeprefix(
            "PAYMENT_STATE_"
        )
        expected = 2 if p.state == common_pb2.PAYMENT_STATE_APPROVED else 0
        assert ledger.postings[key] == expected, (o.payment_id, p.state)
        if p.state == common_pb2.PAYMENT_STATE_APPROVED:
            assert env.get("beijing-b", o).state == p.state
    # The victim's zone serves again once restarted.
    assert env.lc.start(f"switch@{victim}") == [f"switch@{victim}"]
    assert env.submit(victim, env.order()).payment.state in FINAL
