"""The auditor's reads through gRPC on the real cluster: histories and listings."""

from __future__ import annotations

import time

import grpc
import pytest

from clearing.v1 import audit_pb2, audit_pb2_grpc
from clearinghouse.client import error_details
from clearinghouse.switch.convert import us_to_ts
from tests.support import SwitchEnv, listed

pytestmark = pytest.mark.integration


@pytest.fixture
def env(switch_env: SwitchEnv) -> SwitchEnv:
    return switch_env


def _audit(env: SwitchEnv, zone: str) -> audit_pb2_grpc.AuditServiceStub:
    return audit_pb2_grpc.AuditServiceStub(env.clients[zone].channel)


def _list(env: SwitchEnv, participant: str, start_us: int, end_us: int) -> list[tuple[str, str]]:
    out, token = [], ""
    while True:
        r = _audit(env, "shenzhen-a").ListParticipantPayments(
            audit_pb2.ListParticipantPaymentsRequest(
                participant_id=participant, start_time=us_to_ts(start_us),
                end_time=us_to_ts(end_us), page_size=2, page_token=token,
            ),
            timeout=30,
        )  # fmt: skip
        out += [(p.order.institution_id, p.order.payment_id) for p in r.payments]
        token = r.next_page_token
        if not token:
            return out


def test_payments_are_listed_under_their_institution_and_their_bank(env: SwitchEnv) -> None:
    start = time.time_ns() // 1000
    orders = [env.order(institution_id=inst, payee_id=inst, payer_id="BANK_FLAKY")
              for inst in ("INST_ALIPAY", "INST_WECHAT", "INST_ALIPAY")]  # fmt: skip
    for i, o in enumerate(orders):
        env.submit(["beijing-a", "shanghai-b", "shenzhen-a"][i], o)
        time.sleep(0.01)  # distinct receipt times, so the expected order is certain
    end = time.time_ns() // 1000 + 1_000_000
    keys = {(o.institution_id, o.payment_id) for o in orders}
    # The index follows the ledger within about a second (tests.support.LISTING_LAG_S).
    at_bank = listed(lambda: _list(env, "BANK_FLAKY", start, end), lambda x: keys <= set(x))
    assert [(o.institution_id, o.payment_id) for o in orders] == [
        x for x in at_bank if x in {(o.institution_id, o.payment_id) for o in orders}
    ]  # paged in receipt order, each once
    alipay = _list(env, "INST_ALIPAY", start, end)
    mine = {(o.institution_id, o.payment_id) for o in orders if o.institution_id == "INST_ALIPAY"}
    assert mine <= set(alipay)
    assert all(inst == "INST_ALIPAY" for inst, _ in alipay)


def test_a_payment_history_has_its_chain_entries(env: SwitchEnv) -> None:
    o = env.order(payer_id="BANK_FLAKY")
    p = env.submit("shanghai-a", o).payment
    h = _audit(env, "beijing-b").GetPaymentHistory(
        audit_pb2.GetPaymentHistoryRequest(
            institution_id=o.institution_id, payment_id=o.payment_id
        ),
        timeout=30,
    )
    assert [e.kind for e in h.entries] == ["INTENT", "DECISION"]
    assert h.entries[-1].seq == p.ledger_seq
    assert all(e.shard == p.shard for e in h.entries)
    assert h.entries[1].prev_hash != h.entries[0].prev_hash
    checked = _audit(env, "beijing-b").VerifyChains(
        audit_pb2.VerifyChainsRequest(shards=[p.shard]), timeout=60
    )
    assert checked.reports[0].ok and checked.reports[0].head_seq >= p.ledger_seq


def test_an_unknown_payment_is_not_found_and_a_bad_window_is_refused(env: SwitchEnv) -> None:
    audit = _audit(env, "shenzhen-b")
    with pytest.raises(grpc.RpcError) as e:
        audit.GetPaymentHistory(
            audit_pb2.GetPaymentHistoryRequest(institution_id="INST_ALIPAY", payment_id="nope-1"),
            timeout=30,
        )
    assert e.value.code() is grpc.StatusCode.NOT_FOUND
    assert error_details(e.value).reason == "PAYMENT_NOT_FOUND"  # type: ignore[union-attr]
    with pytest.raises(grpc.RpcError) as e:
        audit.GetWindow(audit_pb2.GetWindowRequest(window_id=0), timeout=30)
    assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as e:
        audit.GetWindow(audit_pb2.GetWindowRequest(window_id=999_999_999), timeout=30)
    assert e.value.code() is grpc.StatusCode.NOT_FOUND
    assert error_details(e.value).reason == "WINDOW_NOT_FOUND"  # type: ignore[union-attr]
    # A chain is read whole per shard named: each at most once, each a real shard.
    for shards in ([3, 3], [128], [-1]):
        with pytest.raises(grpc.RpcError) as e:
            audit.VerifyChains(audit_pb2.VerifyChainsRequest(shards=shards), timeout=30)
        assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT, shards
