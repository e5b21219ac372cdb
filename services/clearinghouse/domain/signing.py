"""Signed payment orders: what an institution signs, and how the switch checks it.

An institution signs each order with an Ed25519 key (RFC 8032) whose public half it
registered with the switch (``Participant.signing_keys``). The signed message is::

    SIGNATURE_TAG || fingerprint.canonical_bytes(order)

The tag separates these signatures from anything else the same key might sign; the
canonical bytes (version 1, :mod:`.fingerprint`) cover every field of the order but the
signature and its key id. A key is named by :func:`key_id_of`: the lowercase hex of the
first 8 bytes of SHA-256 of its raw 32-byte public key.

:func:`verify_order_signature` raises :class:`~.errors.SignatureRefused` (reasons
SIGNATURE_MISSING, SIGNING_KEY_UNKNOWN, SIGNATURE_INVALID); :func:`check_fresh` raises
:class:`~.errors.OrderNotFresh` (ORDER_EXPIRED, ORDER_FROM_FUTURE) for an order whose
``requested_at`` lies outside the window [now - ORDER_MAX_AGE_S, now + ORDER_MAX_SKEW_S].
Together with idempotency on (institution_id, payment_id) this is the replay rule: a
captured order resent within the window replays the stored result and has no second
effect; resent later it is refused.

Pure: no I/O, no clock (callers pass ``now_us``). Parsed public keys are cached by their
bytes, since parsing one costs about as much as a hash.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import replace
from functools import lru_cache
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from clearinghouse.domain.errors import OrderNotFresh, SignatureRefused
from clearinghouse.domain.fingerprint import canonical_bytes
from clearinghouse.domain.model import PaymentOrder

SIGNATURE_TAG: Final = b"clearing.sig.v1\x00"
PUBLIC_KEY_LEN: Final = 32
SIGNATURE_LEN: Final = 64
KEY_ID_HEX_LEN: Final = 16
# The freshness window of an order's requested_at, against the receiving node's clock (the
# owner of a forwarded order allows OWNER_FRESHNESS_GRACE_S more on each side).
ORDER_MAX_AGE_S: Final = 300
ORDER_MAX_SKEW_S: Final = 30
_US_PER_S: Final = 1_000_000
_PUBLIC_KEY_CACHE: Final = 4096


def key_id_of(public_key: bytes) -> str:
    """The key's id: lowercase hex of the first 8 bytes of SHA-256(public_key)."""
    return hashlib.sha256(public_key).digest()[: KEY_ID_HEX_LEN // 2].hex()


def public_key_bytes(private_key: Ed25519PrivateKey) -> bytes:
    """The raw 32-byte public key of ``private_key``."""
    return private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def signed_message(order: PaymentOrder) -> bytes:
    """The exact bytes an institution signs for ``order``."""
    return SIGNATURE_TAG + canonical_bytes(order)


def sign_order(order: PaymentOrder, private_key: Ed25519PrivateKey) -> tuple[str, bytes]:
    """(key_id, signature) of ``order`` signed with ``private_key``."""
    return key_id_of(public_key_bytes(private_key)), private_key.sign(signed_message(order))


def signed(order: PaymentOrder, private_key: Ed25519PrivateKey) -> PaymentOrder:
    """``order`` with its signature fields set by :func:`sign_order`."""
    key_id, signature = sign_order(order, private_key)
    return replace(order, signature=signature, signing_key_id=key_id)


@lru_cache(maxsize=_PUBLIC_KEY_CACHE)
def _public_key(raw: bytes) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(raw)


def verify_order_signature(
    order: PaymentOrder, key_id: str, signature: bytes, keys: Mapping[str, bytes]
) -> None:
    """Return if ``signature`` by key ``key_id`` signs ``order``; raise SignatureRefused.

    ``keys`` maps the key ids the order's institution may sign with to their raw public
    keys. A key whose bytes do not hash to its id is treated as unknown.
    """
    who = f"order {order.payment_id!r} of {order.institution_id!r}"
    if not signature or not key_id:
        raise SignatureRefused(
            f"{who} is not signed: signature and signing_key_id are required",
            reason=SignatureRefused.SIGNATURE_MISSING,
        )
    raw = keys.get(key_id)
    if raw is None or len(raw) != PUBLIC_KEY_LEN or key_id_of(raw) != key_id:
        raise SignatureRefused(
            f"{who} is signed with key {key_id[: KEY_ID_HEX_LEN * 2]!r}, which is not a "
            f"registered signing key of {order.institution_id!r}",
            reason=SignatureRefused.SIGNING_KEY_UNKNOWN,
        )
    try:
        if len(signature) != SIGNATURE_LEN:
            raise InvalidSignature
        _public_key(raw).verify(signature, signed_message(order))
    except (InvalidSignature, ValueError) as e:
        raise SignatureRefused(
            f"{who}: the signature does not verify with key {key_id!r} "
            "(a field changed after signing, or another key signed it)",
            reason=SignatureRefused.SIGNATURE_INVALID,
        ) from e


def verify_signed_order(order: PaymentOrder, keys: Mapping[str, bytes]) -> None:
    """:func:`verify_order_signature` with the order's own signature fields."""
    verify_order_signature(order, order.signing_key_id, order.signature, keys)


def check_fresh(order: PaymentOrder, now_us: int, *, grace_s: int = 0) -> None:
    """Raise OrderNotFresh unless ``requested_at_us`` lies in the freshness window,
    widened by ``grace_s`` on both sides (the owner of a forwarded order: see
    ``OWNER_FRESHNESS_GRACE_S``)."""
    age_us = now_us - order.requested_at_us
    if age_us > (ORDER_MAX_AGE_S + grace_s) * _US_PER_S:
        raise OrderNotFresh(
            f"order {order.payment_id!r} was requested {age_us // _US_PER_S} s ago, more "
            f"than {ORDER_MAX_AGE_S} s: refused as a possible replay; GetPayment tells "
            "whether an earlier attempt was recorded",
            reason=OrderNotFresh.ORDER_EXPIRED,
        )
    if -age_us > (ORDER_MAX_SKEW_S + grace_s) * _US_PER_S:
        raise OrderNotFresh(
            f"order {order.payment_id!r} is dated {-age_us // _US_PER_S} s ahead of the "
            f"switch's clock, more than {ORDER_MAX_SKEW_S} s: check the client's clock",
            reason=OrderNotFresh.ORDER_FROM_FUTURE,
        )


__all__ = [
    "KEY_ID_HEX_LEN",
    "ORDER_MAX_AGE_S",
    "ORDER_MAX_SKEW_S",
    "PUBLIC_KEY_LEN",
    "SIGNATURE_LEN",
    "SIGNATURE_TAG",
    "check_fresh",
    "key_id_of",
    "public_key_bytes",
    "sign_order",
    "signed",
    "signed_message",
    "verify_order_signature",
    "verify_signed_order",
]
