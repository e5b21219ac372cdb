"""Fingerprints: deterministic, versioned, and different for any change to the payload."""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clearinghouse._invariant import InvariantViolation
from clearinghouse.domain.errors import AlreadyExists
from clearinghouse.domain.fingerprint import (
    canonical_bytes,
    check_replay,
    fingerprint,
    order_from_canonical_bytes,
    order_money,
)
from clearinghouse.domain.model import PaymentOrder, PaymentType
from clearinghouse.domain.money import Money

pytestmark = pytest.mark.unit

FIELDS: dict[str, Any] = {
    "payment_id": "pay-1",
    "institution_id": "inst-1",
    "type": PaymentType.DEBIT,
    "payer_id": "bank-a",
    "payee_id": "inst-1",
    "bank_account": "6222020200112233",
    "amount": Money(12_345, "CNY"),
    "memo": "话费充值",
    "requested_at_us": 1_750_000_000_123_456,
}
# Pinned so that any change to the encoding, by accident or by a new Python, fails here.
# Changing it on purpose means a new version tag and a migration of stored fingerprints.
PINNED_SHA256_HEX = "c525d9d1d61b69f7d8374051cb753db94a6d1ddbffad6a2b29fe2ac8347289af"


def _order(**changes: Any) -> PaymentOrder:
    return dataclasses.replace(PaymentOrder(**FIELDS), **changes)


def _reference_encoding(order: PaymentOrder) -> bytes:
    # An independent re-implementation of the documented layout, as an auditor would write.
    def lp(data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + data

    def s(value: str) -> bytes:
        return lp(value.encode("utf-8"))

    return b"".join(
        [
            lp(b"clearing.PaymentOrder.v1"),
            s(order.payment_id),
            s(order.institution_id),
            s(order.type.value),
            s(order.payer_id),
            s(order.payee_id),
            s(order.bank_account),
            struct.pack(">q", order.amount.amount_minor),
            s(order.amount.currency),
            s(order.memo),
            struct.pack(">q", order.requested_at_us),
        ]
    )


def test_matches_the_documented_layout() -> None:
    order = _order()
    assert canonical_bytes(order) == _reference_encoding(order)
    assert fingerprint(order) == hashlib.sha256(_reference_encoding(order)).digest()


def test_pinned_known_answer() -> None:
    assert fingerprint(_order()).hex() == PINNED_SHA256_HEX


def test_equal_orders_built_separately_have_equal_bytes() -> None:
    assert canonical_bytes(PaymentOrder(**FIELDS)) == canonical_bytes(PaymentOrder(**FIELDS))
    assert len(fingerprint(_order())) == 32


@given(st.permutations(sorted(FIELDS)))
def test_key_order_is_irrelevant(keys: list[str]) -> None:
    shuffled = {key: FIELDS[key] for key in keys}
    assert canonical_bytes(PaymentOrder(**shuffled)) == canonical_bytes(_order())


@pytest.mark.parametrize(
    "changes",
    [
        {"payment_id": "pay-2"},
        {"institution_id": "inst-2"},
        {"type": PaymentType.CREDIT},
        {"payer_id": "bank-b"},
        {"payee_id": "inst-2"},
        {"bank_account": "6222020200112234"},
        {"amount": Money(12_346, "CNY")},
        {"amount": Money(12_345, "HKD")},
        {"memo": "话费充值 "},
        {"memo": ""},
        {"requested_at_us": FIELDS["requested_at_us"] + 1},
    ],
)
def test_any_field_change_changes_the_fingerprint(changes: dict[str, Any]) -> None:
    assert fingerprint(_order(**changes)) != fingerprint(_order())


def test_moving_characters_between_fields_changes_the_fingerprint() -> None:
    # The length prefixes keep field boundaries: "ab"+"c" must differ from "a"+"bc".
    a = _order(payer_id="bank-ab", payee_id="c")
    b = _order(payer_id="bank-a", payee_id="bc")
    assert canonical_bytes(a) != canonical_bytes(b)


def test_unicode_is_not_normalised() -> None:
    # NFC "é" and NFD "e" + combining accent are different payloads.
    assert fingerprint(_order(memo="caf\u00e9")) != fingerprint(_order(memo="cafe\u0301"))


ids = st.text(st.characters(exclude_categories=["Cs"]), max_size=8)
orders = st.builds(
    PaymentOrder,
    payment_id=ids,
    institution_id=ids,
    type=st.sampled_from(list(PaymentType)),
    payer_id=ids,
    payee_id=ids,
    bank_account=ids,
    amount=st.builds(Money, st.integers(-(2**63) + 1, 2**63 - 1), st.sampled_from(["CNY", "JPY"])),
    memo=ids,
    requested_at_us=st.integers(-(2**63), 2**63 - 1),
)


@given(orders, orders)
def test_encoding_is_injective(a: PaymentOrder, b: PaymentOrder) -> None:
    assert (canonical_bytes(a) == canonical_bytes(b)) == (a == b)


def test_replay_with_same_payload_is_accepted() -> None:
    check_replay(fingerprint(_order()), PaymentOrder(**FIELDS))


def test_same_id_different_payload_is_already_exists() -> None:
    stored = fingerprint(_order())
    with pytest.raises(AlreadyExists, match="pay-1") as caught:
        check_replay(stored, _order(requested_at_us=FIELDS["requested_at_us"] + 1))
    assert caught.value.reason == "PAYMENT_ID_REUSED"


@given(orders)
def test_decoding_gives_back_the_order(order: PaymentOrder) -> None:
    assert order_from_canonical_bytes(canonical_bytes(order)) == order


@pytest.mark.parametrize("cut", [1, 5, 40])
def test_truncated_or_padded_bytes_are_refused(cut: int) -> None:
    data = canonical_bytes(_order())
    with pytest.raises(InvariantViolation):
        order_from_canonical_bytes(data[:-cut])
    with pytest.raises(InvariantViolation):
        order_from_canonical_bytes(data + b"\0")


@given(orders)
def test_order_money_reads_what_the_full_decode_reads(order: PaymentOrder) -> None:
    """A takeover's replay reads payer, payee, currency and amount alone; they must be
    what the whole order decodes to."""
    data = canonical_bytes(order)
    back = order_from_canonical_bytes(data)
    assert order_money(data) == (
        back.payer_id, back.payee_id, back.amount.currency, back.amount.amount_minor,
    )  # fmt: skip
    with pytest.raises(InvariantViolation):
        order_money(b"\x00\x00\x00\x03xyz" + data)
