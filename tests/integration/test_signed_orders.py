"""Signed payment orders through real gRPC on the real cluster.

The test clients sign with the institutions' keys from ``.state/pki`` (registered by
``start_switch_env``); a raw channel sends what a client without the interceptor would.
"""

from __future__ import annotations

import time
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from clearing.v1 import admin_pb2, audit_pb2, audit_pb2_grpc, payment_pb2, payment_pb2_grpc
from clearinghouse.client import error_details, local_credentials
from clearinghouse.domain.entries import Intent
from clearinghouse.domain.signing import ORDER_MAX_AGE_S, key_id_of, public_key_bytes
from clearinghouse.order_signing import sign_order_pb
from clearinghouse.security import pki
from clearinghouse.security.identity import Identity, Role
from clearinghouse.signing_keys import default_store
from clearinghouse.switch.convert import us_to_ts
from tests.support import SwitchEnv

pytestmark = pytest.mark.integration

INST = "INST_ALIPAY"


@pytest.fixture
def env(switch_env: SwitchEnv) -> SwitchEnv:
    return switch_env


def _key() -> Ed25519PrivateKey:
    key = default_store().existing(INST)
    assert key is not None, "start_switch_env registers the institutions' keys"
    return key


def _refused(env: SwitchEnv, zone: str, order: Any) -> tuple[str, str]:
    with pytest.raises(grpc.RpcError) as ei:
        env.submit(zone, order)
    e: Any = ei.value
    err = error_details(e)
    assert err is not None
    return e.code().name, err.reason


def _not_found(env: SwitchEnv, order: Any) -> bool:
    with pytest.raises(grpc.RpcError) as ei:
        env.get("shenzhen-a", order)
    e: Any = ei.value
    return bool(e.code() is grpc.StatusCode.NOT_FOUND)


def test_the_registry_lists_the_institutions_signing_key(env: SwitchEnv) -> None:
    got = (
        env.clients["beijing-b"]
        .admin.GetParticipant(admin_pb2.GetParticipantRequest(participant_id=INST), timeout=10)
        .participant
    )
    pk = public_key_bytes(_key())
    assert (key_id_of(pk), pk) in {(k.key_id, k.public_key) for k in got.signing_keys}


def test_a_signed_order_is_accepted_stored_with_its_signature_and_replayed_once(
    env: SwitchEnv,
) -> None:
    o = env.order(payer_id="BANK_CCB")
    first = env.submit("beijing-a", o)  # the client's interceptor signs the request
    sign_order_pb(o, _key())  # Ed25519 is deterministic: what the interceptor sent
    assert o.signature and o.signing_key_id == key_id_of(public_key_bytes(_key()))
    assert first.payment.order == o
    got = env.get("shenzhen-b", o)
    assert (got.order.signature, got.order.signing_key_id) == (o.signature, o.signing_key_id)
    # The same signed order again, on other zones: the original result, one effect.
    again = [env.submit(z, o) for z in ("shanghai-b", "shenzhen-a")]
    assert all(a.replayed for a in again)
    assert {a.payment.switch_ref for a in again} == {first.payment.switch_ref}
    assert env.transfers_at_bank("BANK_CCB", first.payment.switch_ref) == 1
    # The INTENT entry in the ledger carries the signature (auditors re-check it).
    history = audit_pb2_grpc.AuditServiceStub(env.clients["shanghai-a"].channel)
    h = history.GetPaymentHistory(
        audit_pb2.GetPaymentHistoryRequest(institution_id=INST, payment_id=o.payment_id),
        timeout=30,
    )
    assert h.payment.order.signature == o.signature
    intent = Intent.decode(h.entries[0].body)
    assert (intent.signing_key_id, intent.signature) == (o.signing_key_id, o.signature)


def _tampered(env: SwitchEnv) -> Any:
    o = env.order()
    sign_order_pb(o, _key())
    o.amount.amount_minor += 1
    return o


def _wrong_key(env: SwitchEnv) -> Any:
    o = env.order()
    sign_order_pb(o, Ed25519PrivateKey.generate())
    o.signing_key_id = key_id_of(public_key_bytes(_key()))  # claims the registered key
    return o


def _unknown_key(env: SwitchEnv) -> Any:
    o = env.order()
    sign_order_pb(o, Ed25519PrivateKey.generate())
    return o


def _stale(env: SwitchEnv) -> Any:
    old_us = time.time_ns() // 1000 - (ORDER_MAX_AGE_S + 5) * 1_000_000
    o = env.order(requested_at=us_to_ts(old_us))
    sign_order_pb(o, _key())
    return o


def _future(env: SwitchEnv) -> Any:
    o = env.order(requested_at=us_to_ts(time.time_ns() // 1000 + 120 * 1_000_000))
    sign_order_pb(o, _key())
    return o


@pytest.mark.parametrize(
    ("make", "code", "reason"),
    [
        (_tampered, "PERMISSION_DENIED", "SIGNATURE_INVALID"),
        (_wrong_key, "PERMISSION_DENIED", "SIGNATURE_INVALID"),
        (_unknown_key, "PERMISSION_DENIED", "SIGNING_KEY_UNKNOWN"),
        (_stale, "FAILED_PRECONDITION", "ORDER_EXPIRED"),
        (_future, "FAILED_PRECONDITION", "ORDER_FROM_FUTURE"),
    ],
    ids=["tampered", "wrong-key", "unknown-key", "stale", "future"],
)
def test_refused_orders_get_their_reason_and_write_nothing(
    env: SwitchEnv, make: Any, code: str, reason: str
) -> None:
    o = make(env)
    assert _refused(env, "shanghai-a", o) == (code, reason)
    assert _not_found(env, o)


def test_an_unsigned_order_is_refused_and_each_batch_item_on_its_own(env: SwitchEnv) -> None:
    z = env.lc.topo.zone("beijing-b")
    alipay = Identity(Role.INSTITUTION, "INST_ALIPAY")
    # The institution's own TLS identity, but no signing interceptor.
    target = f"{z.address}:{z.ports.switch}"
    with local_credentials().channel(target, alipay, server=pki.node(z.name)) as raw:
        stub = payment_pb2_grpc.PaymentServiceStub(raw)
        o = env.order()
        with pytest.raises(grpc.RpcError) as ei:
            stub.SubmitPayment(payment_pb2.SubmitPaymentRequest(order=o), timeout=30)
        e: Any = ei.value
        err = error_details(e)
        assert (e.code(), err.reason if err else None) == (
            grpc.StatusCode.PERMISSION_DENIED,
            "SIGNATURE_MISSING",
        )
        assert _not_found(env, o)
        good, unsigned = env.order(), env.order()
        sign_order_pb(good, _key())
        r = stub.SubmitPayments(
            payment_pb2.SubmitPaymentsRequest(orders=[good, unsigned]), timeout=60
        )
    assert r.results[0].HasField("payment")
    assert r.results[0].payment.order.signature == good.signature
    assert r.results[1].error.reason == "SIGNATURE_MISSING"
    assert _not_found(env, unsigned)
