"""Signed orders through the PaymentService servicer (with the fakes behind it), the
client's signing interceptor, the key store, and the ledger's INTENT keeping the
signature across a takeover."""

from __future__ import annotations

import hashlib
import stat
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from clearing.v1 import common_pb2, payment_pb2, shard_pb2
from clearinghouse.domain import (
    Participant,
    ParticipantKind,
    ParticipantStatus,
    PaymentOrder,
)
from clearinghouse.domain.entries import Intent
from clearinghouse.domain.model import SigningKey
from clearinghouse.domain.signing import (
    ORDER_MAX_AGE_S,
    key_id_of,
    public_key_bytes,
    verify_signed_order,
)
from clearinghouse.order_signing import OrderSigningInterceptor, sign_order_pb
from clearinghouse.signing_keys import KEY_FILE, SigningKeyStore
from clearinghouse.switch import convert
from clearinghouse.switch.processor import PaymentProcessor, Registry
from clearinghouse.switch.routing import LocalOwner
from clearinghouse.switch.servicers import (
    OWNER_FRESHNESS_GRACE_S,
    PaymentServicer,
    ShardServicer,
)
from clearinghouse.switch.shards import _intent_of, _intent_record
from tests.fakes import (
    START_US,
    Aborted,
    FakeBank,
    FakeClock,
    FakePaymentStore,
    FakeServicerContext,
    begun_record,
)

pytestmark = pytest.mark.unit

INST, BANK = "INST_A", "BANK_A"
KEY = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"INST_A").digest())
OTHER = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"not INST_A").digest())
PUB = public_key_bytes(KEY)


def _participant(pid: str, kind: ParticipantKind, keys: tuple[SigningKey, ...] = ()) -> Participant:
    bank = kind is ParticipantKind.BANK
    return Participant(
        participant_id=pid, kind=kind, name=pid, status=ParticipantStatus.ACTIVE,
        bank_code="BANKA" if bank else None, endpoint="bank-a.test:7000" if bank else None,
        currencies=frozenset({"CNY"}), net_debit_caps={"CNY": 10**10}, version=1,
        signing_keys=keys,
    )  # fmt: skip


PARTICIPANTS = {
    INST: _participant(INST, ParticipantKind.INSTITUTION, (SigningKey(key_id_of(PUB), PUB),)),
    BANK: _participant(BANK, ParticipantKind.BANK),
}


class DirectRouter:
    """Every shard is owned here: the router hands orders straight to the local owner."""

    def __init__(self, local: LocalOwner) -> None:
        self.local = local
        self.submitted = 0

    def submit(self, orders: Any, paths: Any, deadline_s: float) -> list[Any]:
        self.submitted += len(orders)
        return self.local.submit(orders, paths, "")


@pytest.fixture
def node() -> tuple[PaymentServicer, FakePaymentStore, FakeBank, DirectRouter]:
    clock = FakeClock()
    store = FakePaymentStore(clock)
    bank = FakeBank(clock)
    registry = Registry(PARTICIPANTS)
    processor = PaymentProcessor(
        zone="shanghai-a", store=store, bank=bank, registry=registry, clock=clock,
        sleep=clock.sleep,
    )  # fmt: skip
    router = DirectRouter(LocalOwner(processor))  # type: ignore[arg-type]
    servicer = PaymentServicer(router, ledger=None, registry=registry, clock=clock)  # type: ignore[arg-type]
    return servicer, store, bank, router


def _order(payment_id: str = "pay-1", **kw: Any) -> payment_pb2.PaymentOrder:
    base: dict[str, Any] = {
        "payment_id": payment_id, "institution_id": INST, "type": common_pb2.PAYMENT_TYPE_DEBIT,
        "payer_id": BANK, "payee_id": INST, "bank_account": "6222020000000001",
        "amount": common_pb2.Money(amount_minor=12_345, currency="CNY"), "memo": "top-up",
        "requested_at": convert.us_to_ts(START_US - 1_000_000),
    }  # fmt: skip
    base.update(kw)
    return payment_pb2.PaymentOrder(**base)


def _signed(payment_id: str = "pay-1", key: Ed25519PrivateKey = KEY, **kw: Any) -> Any:
    o = _order(payment_id, **kw)
    sign_order_pb(o, key)
    return o


def _refused(servicer: PaymentServicer, order: Any) -> tuple[grpc.StatusCode | None, str]:
    ctx = FakeServicerContext()
    with pytest.raises(Aborted):
        servicer.SubmitPayment(payment_pb2.SubmitPaymentRequest(order=order), ctx)
    assert ctx.error is not None
    return ctx.code, ctx.error.reason


def _tampered() -> Any:
    o = _signed()
    o.amount.amount_minor += 1
    return o


def _forged() -> Any:
    """Signed with another key, claiming the institution's registered key id."""
    o = _signed(key=OTHER)
    o.signing_key_id = key_id_of(PUB)
    return o


@pytest.mark.parametrize(
    ("make", "code", "reason"),
    [
        (_order, grpc.StatusCode.PERMISSION_DENIED, "SIGNATURE_MISSING"),
        (_tampered, grpc.StatusCode.PERMISSION_DENIED, "SIGNATURE_INVALID"),
        (_forged, grpc.StatusCode.PERMISSION_DENIED, "SIGNATURE_INVALID"),
        (lambda: _signed(key=OTHER), grpc.StatusCode.PERMISSION_DENIED, "SIGNING_KEY_UNKNOWN"),
        (
            lambda: _signed(
                requested_at=convert.us_to_ts(START_US - (ORDER_MAX_AGE_S + 1) * 10**6)
            ),
            grpc.StatusCode.FAILED_PRECONDITION,
            "ORDER_EXPIRED",
        ),
        (
            lambda: _signed(requested_at=convert.us_to_ts(START_US + 60 * 10**6)),
            grpc.StatusCode.FAILED_PRECONDITION,
            "ORDER_FROM_FUTURE",
        ),
    ],
    ids=["missing", "tampered", "wrong-key", "unknown-key", "stale", "future"],
)
def test_a_refused_order_writes_nothing_and_calls_no_bank(
    node: Any, make: Any, code: grpc.StatusCode, reason: str
) -> None:
    servicer, store, bank, router = node
    order = make()
    assert _refused(servicer, order) == (code, reason)
    assert router.submitted == 0
    assert store.records == {} and store.calls.total() == 0
    assert bank.calls.total() == 0


def test_a_signed_order_is_stored_with_its_signature_and_a_replay_has_one_effect(
    node: Any,
) -> None:
    servicer, store, bank, _ = node
    order = _signed()
    first = servicer.SubmitPayment(
        payment_pb2.SubmitPaymentRequest(order=order), FakeServicerContext()
    )
    again = servicer.SubmitPayment(
        payment_pb2.SubmitPaymentRequest(order=order), FakeServicerContext()
    )
    assert (first.replayed, again.replayed) == (False, True)
    assert first.payment.order == order and again.payment.order == order
    (rec,) = store.records.values()
    assert (rec.order.signature, rec.order.signing_key_id) == (order.signature, key_id_of(PUB))
    assert bank.calls["transfer"] == 1


def test_each_batch_item_is_judged_on_its_own(node: Any) -> None:
    servicer, store, _, router = node
    good, unsigned, forged = _signed("b-1"), _order("b-2"), _signed("b-3", key=OTHER)
    r = servicer.SubmitPayments(
        payment_pb2.SubmitPaymentsRequest(orders=[good, unsigned, forged]), FakeServicerContext()
    )
    assert [x.HasField("payment") for x in r.results] == [True, False, False]
    assert [x.error.reason for x in r.results[1:]] == ["SIGNATURE_MISSING", "SIGNING_KEY_UNKNOWN"]
    assert router.submitted == 1
    assert [pid for _, pid in store.records] == ["b-1"]


class NodeContext(FakeServicerContext):
    """A call from another switch node: its certificate names ``node:<zone>``."""

    def __init__(self, zone: str) -> None:
        super().__init__()
        self.zone = zone

    def auth_context(self) -> dict[str, list[bytes]]:
        return {"x509_common_name": [f"node:{self.zone}".encode()]}


def _owner(node: Any) -> ShardServicer:
    _, _, _, router = node
    return ShardServicer(router.local, describe=lambda: None, registry=Registry(PARTICIPANTS),
                         clock=FakeClock())  # fmt: skip


def test_the_owner_admits_a_forwarded_order_again(node: Any) -> None:
    # A holder of a node certificate forwarded an unsigned order straight to the owner
    # (ShardService.SubmitOwned): it was APPROVED, with a bank transfer, and the window
    # holding it no longer passed `audit verify`.
    _, store, bank, _ = node
    owner = _owner(node)
    good, unsigned, forged = _signed("f-1"), _order("f-2"), _signed("f-3", key=OTHER)
    stale = _signed("f-4", requested_at=convert.us_to_ts(START_US - 600 * 10**6))
    request = shard_pb2.SubmitOwnedRequest(
        orders=[good, unsigned, forged, stale], paths=[f"orders[{i}]" for i in range(4)],
        received_zone="beijing-b",
    )  # fmt: skip
    r = owner.SubmitOwned(request, NodeContext("beijing-b"))
    assert [x.HasField("payment") for x in r.results] == [True, False, False, False]
    assert [x.error.reason for x in r.results[1:]] == [
        # A key the owner does not know may be one its registry has not seen yet (the
        # receiving node refreshed first): retry, not a definite refusal.
        "SIGNATURE_MISSING", "OWNER_REGISTRY_BEHIND", "ORDER_EXPIRED",
    ]  # fmt: skip
    assert r.results[2].error.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert r.results[2].error.retry_after_ms > 0
    assert [pid for _, pid in store.records] == ["f-1"]
    assert bank.calls["transfer"] == 1


def test_a_retry_the_receiving_node_admitted_gets_its_first_result_at_the_owner(
    node: Any,
) -> None:
    # Admitted by the receiving node at 299 s of age, it reached the owner at 302 s
    # (forwarding waits for a new owner): the owner answered ORDER_EXPIRED, not the
    # payment it had recorded.
    _, store, bank, _ = node
    clock = FakeClock()
    owner = ShardServicer(_owner(node).local, describe=lambda: None,
                          registry=Registry(PARTICIPANTS), clock=clock)  # fmt: skip
    order = _signed("late-1", requested_at=convert.us_to_ts(clock() - 1_000_000))
    request = shard_pb2.SubmitOwnedRequest(orders=[order], paths=["order"],
                                           received_zone="beijing-b")  # fmt: skip
    first = owner.SubmitOwned(request, NodeContext("beijing-b")).results[0]
    assert first.HasField("payment") and not first.replayed
    clock.advance(301.0)  # 302 s after requested_at
    again = owner.SubmitOwned(request, NodeContext("beijing-b")).results[0]
    assert again.HasField("payment") and again.replayed, again
    assert again.payment == first.payment
    assert bank.calls["transfer"] == 1
    clock.advance(float(OWNER_FRESHNESS_GRACE_S))  # beyond what forwarding can take
    late = owner.SubmitOwned(request, NodeContext("beijing-b")).results[0]
    assert late.error.reason == "ORDER_EXPIRED"
    assert len(store.records) == 1


def test_a_forwarded_order_names_the_forwarding_node_as_its_receiver(node: Any) -> None:
    _, store, bank, _ = node
    owner = _owner(node)
    request = shard_pb2.SubmitOwnedRequest(
        orders=[_signed("z-1")], paths=["order"], received_zone="shenzhen-a"
    )
    ctx = NodeContext("beijing-b")
    with pytest.raises(Aborted):
        owner.SubmitOwned(request, ctx)
    assert ctx.code is grpc.StatusCode.INVALID_ARGUMENT
    assert ctx.error is not None
    assert [v.field for v in ctx.error.field_violations] == ["received_zone"]
    assert store.records == {} and bank.calls.total() == 0


def test_the_intent_entry_keeps_the_signature_for_a_new_owner() -> None:
    order = replace(
        convert.order_from_pb(_signed()), requested_at_us=START_US
    )  # a domain order with its signature fields set
    store = FakePaymentStore(FakeClock())
    store.begin(_record(order))
    (rec,) = store.records.values()
    intent = Intent.decode(_intent_of(rec).encode())
    assert (intent.signing_key_id, intent.signature) == (order.signing_key_id, order.signature)
    # As ShardedStore._replay_entry rebuilds it on takeover:
    rebuilt = _intent_record(
        replace(order, signature=intent.signature, signing_key_id=intent.signing_key_id),
        intent,
        rec.shard,
        1,
    )
    assert rebuilt.order == order
    assert convert.order_to_pb(rebuilt.order).signature == order.signature


def _record(order: PaymentOrder) -> Any:
    return begun_record(order, at_us=START_US, zone="shanghai-a")


# -- the client side ----------------------------------------------------------------------


class Details:
    def __init__(self, method: str) -> None:
        self.method = method


def test_the_interceptor_signs_unsigned_orders_in_place_and_leaves_the_rest() -> None:
    keys = {INST: KEY}
    interceptor = OrderSigningInterceptor(keys.get)
    sent: list[Any] = []

    def continuation(details: Any, request: Any) -> str:
        sent.append(request)
        return "ok"

    one = payment_pb2.SubmitPaymentRequest(order=_order())
    assert (
        interceptor.intercept_unary_unary(
            continuation, Details("/clearing.v1.PaymentService/SubmitPayment"), one
        )
        == "ok"
    )
    verify_signed_order(convert.order_from_pb(one.order), PARTICIPANTS[INST].signing_key_map())
    tampered = _tampered()
    before = bytes(tampered.signature)
    no_key = _order("x", institution_id="INST_NOKEY", payee_id="INST_NOKEY")
    malformed = _order("y", type=common_pb2.PAYMENT_TYPE_UNSPECIFIED)
    many = payment_pb2.SubmitPaymentsRequest(orders=[_order("z"), tampered, no_key, malformed])
    interceptor.intercept_unary_unary(
        continuation, Details("/clearing.v1.PaymentService/SubmitPayments"), many
    )
    assert many.orders[0].signature and many.orders[0].signing_key_id == key_id_of(PUB)
    assert many.orders[1].signature == before
    assert not many.orders[2].signature and not many.orders[3].signature
    other = payment_pb2.SubmitPaymentRequest(order=_order("w"))
    interceptor.intercept_unary_unary(
        continuation, Details("/clearing.v1.PaymentService/GetPayment"), other
    )
    assert not other.order.signature
    assert len(sent) == 3


def test_the_key_store_keeps_one_private_key_per_participant(tmp_path: Path) -> None:
    store = SigningKeyStore(tmp_path / "pki")
    assert store.existing(INST) is None
    assert not (tmp_path / "pki").exists()  # looking creates nothing
    key = store.get_or_create(INST)
    path = tmp_path / "pki" / INST / KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "pki").stat().st_mode) == 0o700
    assert sorted(p.name for p in path.parent.iterdir()) == [KEY_FILE]
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    # Another store (another process) reads the same key back.
    again = SigningKeyStore(tmp_path / "pki")
    assert public_key_bytes(again.get_or_create(INST)) == public_key_bytes(key)
    assert again.public_key(INST) == store.public_key(INST)
    assert store.existing(INST) is key
    with pytest.raises(ValueError, match="cannot name"):
        store.get_or_create("../etc")
    assert store.existing("../etc") is None
    # Never inside the CA's folder or another role's (the certificates live beside).
    for taken in ("ca", "CA", "node-beijing-a", "operator-operator"):
        with pytest.raises(ValueError, match="no signing key"):
            store.get_or_create(taken)
        assert store.existing(taken) is None
        assert not (tmp_path / "pki" / taken).exists()


def test_a_replay_after_the_freshness_window_is_refused_and_changes_nothing(
    node: Any,
) -> None:
    """Within the window a resent order is an idempotent replay (above); once its
    requested_at is older than ORDER_MAX_AGE_S, the same bytes are refused before routing:
    a captured order cannot be replayed later, and the original payment stays as it was."""
    servicer, store, bank, router = node
    order = _signed()
    first = servicer.SubmitPayment(
        payment_pb2.SubmitPaymentRequest(order=order), FakeServicerContext()
    )
    assert first.payment.state == common_pb2.PAYMENT_STATE_APPROVED
    records = dict(store.records)
    calls = store.calls.total()
    # requested_at was 1 s before the clock: the window ends ORDER_MAX_AGE_S after it.
    clock = store._clock
    assert clock is not None
    clock.advance(ORDER_MAX_AGE_S)
    assert _refused(servicer, order) == (grpc.StatusCode.FAILED_PRECONDITION, "ORDER_EXPIRED")
    assert router.submitted == 1  # never routed again
    assert store.records == records and store.calls.total() == calls
    assert bank.calls["transfer"] == 1
