"""The fingerprint of a payment order: what makes two submissions the same request.

A client may resend an order (after a timeout, from another zone). The switch stores
each order's fingerprint with its payment id. A resubmission with the same id and the
same fingerprint is a replay and gets the stored outcome; the same id with a different
fingerprint is refused with AlreadyExists (reason PAYMENT_ID_REUSED).

Canonical bytes, version 1 (length-prefixed, fixed field order; not JSON). Integers are
big-endian; ``str(x)`` is the UTF-8 bytes of x with no normalisation; ``lp(b)`` is the
length of b as a 4-byte unsigned integer followed by b::

    lp(b"clearing.PaymentOrder.v1")
    lp(str(payment_id))
    lp(str(institution_id))
    lp(str(type))                 "DEBIT" or "CREDIT"
    lp(str(payer_id))
    lp(str(payee_id))
    lp(str(bank_account))
    int64(amount.amount_minor)    8 bytes, two's complement
    lp(str(amount.currency))
    lp(str(memo))
    int64(requested_at_us)        8 bytes, two's complement

The fingerprint is SHA-256 of those bytes (32 bytes). ``requested_at_us`` is part of the
payload: a client that resends must resend the original timestamp. Any change to this
layout must change the version tag, because stored fingerprints would stop matching.
"""

from __future__ import annotations

import hashlib
from typing import Final

from clearinghouse._invariant import invariant
from clearinghouse.domain import _codec
from clearinghouse.domain.errors import AlreadyExists
from clearinghouse.domain.model import PaymentOrder, PaymentType
from clearinghouse.domain.money import Money

FINGERPRINT_TAG: Final = b"clearing.PaymentOrder.v1"


def canonical_bytes(order: PaymentOrder) -> bytes:
    """The version-1 canonical encoding of ``order`` (see the module docstring)."""
    return b"".join(
        (
            _codec.blob(FINGERPRINT_TAG),
            _codec.text(order.payment_id),
            _codec.text(order.institution_id),
            _codec.text(order.type.value),
            _codec.text(order.payer_id),
            _codec.text(order.payee_id),
            _codec.text(order.bank_account),
            _codec.i64(order.amount.amount_minor),
            _codec.text(order.amount.currency),
            _codec.text(order.memo),
            _codec.i64(order.requested_at_us),
        )
    )


def order_from_canonical_bytes(
    data: bytes, *, signature: bytes = b"", signing_key_id: str = ""
) -> PaymentOrder:
    """The inverse of :func:`canonical_bytes`: stores keep the order as its canonical bytes
    (and its signature apart: it is not part of them)."""
    r = _codec.Reader(data)
    tag = r.blob()
    invariant(tag == FINGERPRINT_TAG, f"not a version-1 payment order encoding: {tag[:32]!r}")
    payment_id, institution_id, kind, payer, payee, account = (r.text() for _ in range(6))
    amount = r.i64()
    currency, memo = r.text(), r.text()
    requested_at_us = r.i64()
    r.done()
    return PaymentOrder(
        payment_id=payment_id,
        institution_id=institution_id,
        type=PaymentType(kind),
        payer_id=payer,
        payee_id=payee,
        bank_account=account,
        amount=Money(amount, currency),
        memo=memo,
        requested_at_us=requested_at_us,
        signature=signature,
        signing_key_id=signing_key_id,
    )


def order_money(data: bytes) -> tuple[str, str, str, int]:
    """(payer, payee, currency, amount in minor units) of :func:`canonical_bytes`, read
    without the rest of the order: what a takeover's replay needs of a payment that is
    decided further on (its record is decoded only when asked for)."""
    r = _codec.Reader(data)
    tag = r.blob()
    invariant(tag == FINGERPRINT_TAG, f"not a version-1 payment order encoding: {tag[:32]!r}")
    r.blob(), r.blob(), r.blob()  # payment id, institution, type
    payer, payee = r.text(), r.text()
    r.blob()  # bank account
    amount = r.i64()
    return payer, payee, r.text(), amount


def fingerprint(order: PaymentOrder) -> bytes:
    """SHA-256 of :func:`canonical_bytes`; 32 bytes."""
    return hashlib.sha256(canonical_bytes(order)).digest()


def check_replay(stored_fingerprint: bytes, order: PaymentOrder) -> None:
    """Return if ``order`` replays the stored order with its id; raise AlreadyExists if not.

    Call it only when an order with ``order.payment_id`` is already stored.
    """
    if fingerprint(order) != stored_fingerprint:
        raise AlreadyExists(
            f"payment id {order.payment_id!r} was already used for a different order"
        )
