"""Signed payment orders: what is signed, and every way a signature is refused."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from clearinghouse.domain import Money, PaymentOrder, PaymentType, fingerprint, status_for
from clearinghouse.domain.errors import OrderNotFresh, SignatureRefused
from clearinghouse.domain.fingerprint import canonical_bytes
from clearinghouse.domain.signing import (
    ORDER_MAX_AGE_S,
    ORDER_MAX_SKEW_S,
    SIGNATURE_TAG,
    check_fresh,
    key_id_of,
    public_key_bytes,
    sign_order,
    signed,
    verify_order_signature,
    verify_signed_order,
)

pytestmark = pytest.mark.unit

NOW_US = 1_790_000_000_000_000
S = 1_000_000
KEY = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"inst-a").digest())
OTHER = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"someone else").digest())
PUB = public_key_bytes(KEY)
KEY_ID = key_id_of(PUB)
KEYS = {KEY_ID: PUB}
ORDER = PaymentOrder(
    payment_id="pay-1", institution_id="inst-a", type=PaymentType.DEBIT, payer_id="bank-a",
    payee_id="inst-a", bank_account="6222020000000001", amount=Money(12_345, "CNY"),
    memo="top-up", requested_at_us=NOW_US - S,
)  # fmt: skip


def _reason(order: PaymentOrder, keys: dict[str, bytes] = KEYS) -> str:
    with pytest.raises(SignatureRefused) as ei:
        verify_signed_order(order, keys)
    assert status_for(ei.value) is grpc.StatusCode.PERMISSION_DENIED
    return ei.value.reason


def test_key_id_is_the_hex_of_the_first_8_bytes_of_sha256() -> None:
    assert hashlib.sha256(PUB).hexdigest()[:16] == KEY_ID
    assert len(PUB) == 32 and KEY_ID.lower() == KEY_ID


def test_a_signed_order_verifies_and_signs_the_tagged_canonical_bytes() -> None:
    key_id, sig = sign_order(ORDER, KEY)
    assert key_id == KEY_ID and len(sig) == 64
    KEY.public_key().verify(sig, SIGNATURE_TAG + canonical_bytes(ORDER))
    verify_order_signature(ORDER, key_id, sig, KEYS)
    verify_signed_order(signed(ORDER, KEY), KEYS)


def test_the_signature_is_not_part_of_the_canonical_bytes_or_fingerprint() -> None:
    s = signed(ORDER, KEY)
    assert canonical_bytes(s) == canonical_bytes(ORDER)
    assert fingerprint(s) == fingerprint(ORDER)
    assert signed(ORDER, KEY).signature == s.signature  # Ed25519 is deterministic


@pytest.mark.parametrize(
    "change",
    [
        {"payment_id": "pay-2"},
        {"institution_id": "inst-b"},
        {"type": PaymentType.CREDIT},
        {"payer_id": "bank-b"},
        {"payee_id": "inst-b"},
        {"bank_account": "6222020000000002"},
        {"amount": Money(12_346, "CNY")},
        {"amount": Money(12_345, "USD")},
        {"memo": "top-up!"},
        {"requested_at_us": NOW_US - S + 1},
    ],
    ids=lambda c: next(iter(c)),
)
def test_every_tampered_field_is_signature_invalid(change: dict[str, Any]) -> None:
    assert _reason(replace(signed(ORDER, KEY), **change)) == "SIGNATURE_INVALID"


@pytest.mark.parametrize("position", [0, 31, 63])
def test_a_changed_signature_byte_is_signature_invalid(position: int) -> None:
    s = signed(ORDER, KEY)
    sig = bytearray(s.signature)
    sig[position] ^= 0x01
    assert _reason(replace(s, signature=bytes(sig))) == "SIGNATURE_INVALID"
    assert _reason(replace(s, signature=s.signature[:63])) == "SIGNATURE_INVALID"


def test_a_wrong_key_claiming_a_registered_id_is_signature_invalid() -> None:
    forged = replace(signed(ORDER, OTHER), signing_key_id=KEY_ID)
    assert _reason(forged) == "SIGNATURE_INVALID"


def test_an_unregistered_key_is_signing_key_unknown() -> None:
    assert _reason(signed(ORDER, OTHER)) == "SIGNING_KEY_UNKNOWN"
    # A registry entry whose bytes do not hash to its id is never trusted.
    assert _reason(signed(ORDER, KEY), {KEY_ID: public_key_bytes(OTHER)}) == "SIGNING_KEY_UNKNOWN"
    assert _reason(signed(ORDER, KEY), {}) == "SIGNING_KEY_UNKNOWN"


@pytest.mark.parametrize(
    "change", [{"signature": b""}, {"signing_key_id": ""}, {"signature": b"", "signing_key_id": ""}]
)
def test_a_missing_signature_or_key_id_is_signature_missing(change: dict[str, Any]) -> None:
    assert _reason(replace(signed(ORDER, KEY), **change)) == "SIGNATURE_MISSING"


@pytest.mark.parametrize(
    ("age_s", "reason"),
    [
        (0, None),
        (ORDER_MAX_AGE_S, None),
        (-ORDER_MAX_SKEW_S, None),
        (ORDER_MAX_AGE_S + 1, "ORDER_EXPIRED"),
        (3600, "ORDER_EXPIRED"),
        (-ORDER_MAX_SKEW_S - 1, "ORDER_FROM_FUTURE"),
    ],
)
def test_freshness_window(age_s: int, reason: str | None) -> None:
    order = replace(ORDER, requested_at_us=NOW_US - age_s * S)
    if reason is None:
        check_fresh(order, NOW_US)
        return
    with pytest.raises(OrderNotFresh) as ei:
        check_fresh(order, NOW_US)
    assert ei.value.reason == reason
    assert status_for(ei.value) is grpc.StatusCode.FAILED_PRECONDITION
