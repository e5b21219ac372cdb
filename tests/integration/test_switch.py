"""The switch through real gRPC, on the real cluster: six nodes, bank simulators, Cassandra.

Every test uses fresh payment ids, so tests do not depend on one another.
"""

from __future__ import annotations

import time
from typing import Any

import grpc
import pytest

from clearing.v1 import common_pb2, payment_pb2
from clearinghouse.client import error_details
from clearinghouse.switch.convert import us_to_ts
from tests.support import SwitchEnv, listed

pytestmark = pytest.mark.integration

DEBIT = common_pb2.PAYMENT_TYPE_DEBIT
CREDIT = common_pb2.PAYMENT_TYPE_CREDIT
APPROVED = common_pb2.PAYMENT_STATE_APPROVED
DECLINED = common_pb2.PAYMENT_STATE_DECLINED


@pytest.fixture()
def env(switch_env: SwitchEnv) -> SwitchEnv:
    return switch_env


def _code_and_error(call: Any) -> tuple[grpc.StatusCode, Any]:
    with pytest.raises(grpc.RpcError) as ei:
        call()
    e: Any = ei.value
    return e.code(), error_details(e)


def test_debit_and_credit_are_approved_and_recorded_in_every_zone(env: SwitchEnv) -> None:
    d = env.order(payer_id="BANK_ICBC", payee_id="INST_ALIPAY", type=DEBIT)
    c = env.order(type=CREDIT, payer_id="INST_ALIPAY", payee_id="BANK_ICBC", memo="payout")
    rd = env.submit("beijing-a", d)
    rc = env.submit("shenzhen-b", c)
    assert (rd.replayed, rc.replayed) == (False, False)
    assert rd.payment.state in (APPROVED, DECLINED)
    assert rc.payment.state in (APPROVED, DECLINED)
    assert rd.payment.received_zone == "beijing-a"
    assert [e.state for e in rd.payment.events][:2] == [
        common_pb2.PAYMENT_STATE_RECEIVED,
        common_pb2.PAYMENT_STATE_ROUTED,
    ]
    # Any other zone reads the same stored payment.
    for zone in ("shanghai-b", "shenzhen-a"):
        got = env.get(zone, d)
        assert got.state == rd.payment.state
        assert got.switch_ref == rd.payment.switch_ref
        # The order as sent, with the signature the client's interceptor added.
        assert got.order.signature and got.order.signing_key_id
        unsigned = payment_pb2.PaymentOrder()
        unsigned.CopyFrom(got.order)
        unsigned.ClearField("signature")
        unsigned.ClearField("signing_key_id")
        assert unsigned == d


def test_retry_with_the_same_id_on_another_zone_has_one_effect(env: SwitchEnv) -> None:
    o = env.order(payer_id="BANK_CCB")
    first = env.submit("shanghai-a", o)
    again = [env.submit(z, o) for z in ("beijing-b", "shenzhen-a", "shanghai-a")]
    assert all(a.replayed for a in again)
    assert {a.payment.state for a in again} == {first.payment.state}
    assert {a.payment.switch_ref for a in again} == {first.payment.switch_ref}
    # The bank applied the transfer once: its book has one entry for this reference.
    assert env.transfers_at_bank("BANK_CCB", first.payment.switch_ref) == 1


def test_same_id_with_a_different_payload_is_already_exists(env: SwitchEnv) -> None:
    o = env.order()
    first = env.submit("beijing-a", o)
    changed = payment_pb2.PaymentOrder()
    changed.CopyFrom(o)
    changed.amount.amount_minor += 1
    code, err = _code_and_error(lambda: env.submit("shenzhen-b", changed))
    assert code is grpc.StatusCode.ALREADY_EXISTS
    assert err is not None and err.reason == "PAYMENT_ID_REUSED"
    assert (
        env.get("shanghai-a", o).order.amount.amount_minor
        == first.payment.order.amount.amount_minor
    )


@pytest.mark.parametrize(
    ("change", "code", "field"),
    [
        (
            {"amount": common_pb2.Money(amount_minor=0, currency="CNY")},
            "INVALID_ARGUMENT",
            "order.amount.amount_minor",
        ),
        (
            {"amount": common_pb2.Money(amount_minor=-5, currency="CNY")},
            "INVALID_ARGUMENT",
            "order.amount.amount_minor",
        ),
        (
            {"amount": common_pb2.Money(amount_minor=100, currency="XYZ")},
            "INVALID_ARGUMENT",
            "order.amount.currency",
        ),
        ({"payment_id": "bad id with spaces"}, "INVALID_ARGUMENT", "order.payment_id"),
        ({"payment_id": "x" * 65}, "INVALID_ARGUMENT", "order.payment_id"),
        ({"memo": "m" * 141}, "INVALID_ARGUMENT", "order.memo"),
        ({"bank_account": ""}, "INVALID_ARGUMENT", "order.bank_account"),
        ({"type": common_pb2.PAYMENT_TYPE_UNSPECIFIED}, "INVALID_ARGUMENT", "order.type"),
        ({"requested_at": us_to_ts(0)}, "INVALID_ARGUMENT", "order.requested_at"),
        ({"payer_id": "BANK_NOPE"}, "FAILED_PRECONDITION", None),
    ],
)
def test_bad_orders_get_a_precise_status_and_write_nothing(
    env: SwitchEnv, change: dict[str, Any], code: str, field: str | None
) -> None:
    o = env.order(**change)
    got_code, err = _code_and_error(lambda: env.submit("shanghai-b", o))
    assert got_code.name == code
    if field is not None:
        assert err is not None and field in {v.field for v in err.field_violations}, err
    else:  # an unknown participant (payment.proto: FAILED_PRECONDITION)
        assert err is not None and err.reason == "PARTICIPANT_NOT_FOUND", err
    if o.payment_id and len(o.payment_id) <= 64 and " " not in o.payment_id:
        miss, nf = _code_and_error(lambda: env.get("beijing-a", o))
        assert miss is grpc.StatusCode.NOT_FOUND
        assert nf is not None and nf.reason == "PAYMENT_NOT_FOUND", nf


def test_batch_has_a_result_per_item_and_rejects_oversize(env: SwitchEnv) -> None:
    good = [env.order() for _ in range(8)]
    bad = env.order(amount=common_pb2.Money(amount_minor=0, currency="CNY"))
    r = env.clients["shenzhen-a"].payments.SubmitPayments(
        payment_pb2.SubmitPaymentsRequest(orders=[*good, bad]), timeout=60
    )
    assert [x.payment_id for x in r.results] == [o.payment_id for o in [*good, bad]]
    assert all(x.HasField("payment") for x in r.results[:8])
    assert (
        r.results[8].error.reason
        and r.results[8].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    )
    too_many = [env.order() for _ in range(501)]
    code, _ = _code_and_error(
        lambda: env.clients["beijing-b"].payments.SubmitPayments(
            payment_pb2.SubmitPaymentsRequest(orders=too_many), timeout=30
        )
    )
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    miss, _ = _code_and_error(lambda: env.get("beijing-a", too_many[0]))
    assert miss is grpc.StatusCode.NOT_FOUND


def test_list_payments_pages_in_time_order(env: SwitchEnv) -> None:
    inst = "INST_JDPAY"
    start = time.time_ns() // 1000
    ids = []
    for _ in range(7):
        o = env.order(institution_id=inst, payee_id=inst)
        env.submit("beijing-a", o)
        ids.append(o.payment_id)
    end = time.time_ns() // 1000 + 1_000_000

    def pages() -> list[str]:
        seen: list[str] = []
        token = ""
        for _ in range(10):
            r = env.clients["shanghai-a"].payments.ListPayments(
                payment_pb2.ListPaymentsRequest(
                    institution_id=inst,
                    start_time=us_to_ts(start),
                    end_time=us_to_ts(end),
                    page_size=3,
                    page_token=token,
                ),
                timeout=10,
            )
            seen += [p.order.payment_id for p in r.payments]
            token = r.next_page_token
            if not token:
                break
        return seen

    # The index follows the ledger within about a second (tests.support.LISTING_LAG_S).
    assert listed(pages, lambda seen: len(seen) >= len(ids)) == ids
    # No end_time means "until now" (not the epoch): the same payments.
    r = env.clients["shenzhen-a"].payments.ListPayments(
        payment_pb2.ListPaymentsRequest(
            institution_id=inst, start_time=us_to_ts(start), page_size=100
        ),
        timeout=10,
    )
    assert [p.order.payment_id for p in r.payments] == ids


def test_a_bank_that_answers_too_late_is_resolved_by_inquiry(env: SwitchEnv) -> None:
    o = env.order(payer_id="BANK_SLOW", institution_id="INST_WECHAT", payee_id="INST_WECHAT")
    t = time.monotonic()
    r = env.submit("shenzhen-b", o)
    took = time.monotonic() - t
    # The transfer timed out, the inquiry found it applied: APPROVED, one transfer only.
    assert r.payment.state == APPROVED, r.payment
    assert took < 20.0
    assert env.transfers_at_bank("BANK_SLOW", r.payment.switch_ref) == 1
    assert env.get("beijing-b", o).state == APPROVED
