"""What each kind of ledger entry carries, and its exact bytes (the body that is hashed).

A shard's chain (:mod:`.chain`) holds these kinds of entries; everything an owner needs
to rebuild a shard, and everything an auditor needs to check it, is in their bodies:

* ``INTENT`` - the payment was received and routed: the order's canonical bytes, its
  fingerprint, the bank it goes to, where and when it was received. Written (and
  acknowledged by two cities) before the bank is called.
* ``DECISION`` - the final state, when and where it was decided, the bank's reference,
  whether a reversal is owed to the bank, and the payment's double-entry postings.
* ``REVERSAL_CONFIRMED`` - a bank confirmed a reversal the switch owed it.
* ``CAP_GRANT`` (in a participant's home shard for a currency) - the home shard lent
  part of the participant's net debit cap to a shard; ``CAP_RECEIVE`` (in that shard) -
  the shard took the loan into its allowance. ``CAP_RETURN`` (in a shard, after a
  settlement) - the shard gave headroom it no longer needs out of its allowance;
  ``CAP_REPAID`` (in the home shard, after that) - the home shard took it back.
  ``CAP_RECLAIMED`` (in the home shard) - it took back loans lent to a shard at epochs
  that shard has since left, whose receipts were never written. Their ``payment_key``
  is ``cap:<participant>/<currency>``.
* ``WINDOW_CUT`` - the end of a settlement window in this shard: every entry of the
  shard after the previous cut and before this one belongs to the window. Its
  ``payment_key`` is ``window:<window_id>``.

Body encoding, version 1, with :mod:`._codec` (``lp`` = 4-byte length prefix, integers
signed 64-bit big-endian): INTENT = lp(order) lp(fingerprint) lp(bank_id) lp(zone)
i64(received_at_us) lp(switch_ref) [lp(signing_key_id) lp(signature)];
DECISION = lp(state) i64(at_us) lp(zone) lp(detail) lp(bank_ref) i64(reversal_owed 0|1)
i64(n) then n x [lp(participant) lp(currency) i64(debit) i64(credit) lp(leg)];
REVERSAL_CONFIRMED = i64(at_us) lp(zone);
CAP_GRANT, CAP_RECEIVE, CAP_RETURN, CAP_REPAID and CAP_RECLAIMED = lp(participant)
lp(currency) i64(other shard) i64(amount) i64(at_us) [i64(epoch)], where the other shard
is the borrower for a grant, a repayment or a reclaim and the lender for a receipt or a
return; the bracketed epoch is the borrower's epoch in a grant (absent in grants
written before it was recorded) and the epoch below which loans were reconciled in a
reclaim, absent otherwise;
WINDOW_CUT = i64(window_id) i64(at_us).

The INTENT's bracketed tail is the institution's signature of the order
(:mod:`.signing`) and the id of the key that made it: written whenever the order is
signed (every order since signing became mandatory), absent in entries written before,
which therefore keep their bytes and hashes and still decode (with an empty signature).
The chain hash covers the tail like every other byte of the body.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final, TypeVar

from clearinghouse._invariant import invariant
from clearinghouse.domain import _codec
from clearinghouse.domain.model import PaymentState
from clearinghouse.domain.postings import Leg, Posting

KIND_INTENT: Final = "INTENT"
KIND_DECISION: Final = "DECISION"
KIND_REVERSAL_CONFIRMED: Final = "REVERSAL_CONFIRMED"
KIND_CAP_GRANT: Final = "CAP_GRANT"
KIND_CAP_RECEIVE: Final = "CAP_RECEIVE"
KIND_CAP_RETURN: Final = "CAP_RETURN"
KIND_CAP_REPAID: Final = "CAP_REPAID"
KIND_CAP_RECLAIMED: Final = "CAP_RECLAIMED"
KIND_WINDOW_CUT: Final = "WINDOW_CUT"
POSTINGS_MAX: Final = 16

E = TypeVar("E", bound=enum.Enum)


def _enum(cls: type[E], value: str) -> E:
    """``cls(value)``, refusing an unknown value as corrupt data (InvariantViolation)."""
    try:
        return cls(value)
    except ValueError:
        invariant(False, f"unknown {cls.__name__} {value!r} in a ledger entry")
        raise


KINDS: Final = (
    KIND_INTENT, KIND_DECISION, KIND_REVERSAL_CONFIRMED, KIND_CAP_GRANT, KIND_CAP_RECEIVE,
    KIND_CAP_RETURN, KIND_CAP_REPAID, KIND_CAP_RECLAIMED, KIND_WINDOW_CUT,
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Intent:
    order_bytes: bytes
    fingerprint: bytes
    bank_id: str
    zone: str
    received_at_us: int
    switch_ref: str
    signing_key_id: str = ""
    signature: bytes = b""

    def encode(self) -> bytes:
        parts = [
            _codec.blob(self.order_bytes), _codec.blob(self.fingerprint),
            _codec.text(self.bank_id), _codec.text(self.zone),
            _codec.i64(self.received_at_us), _codec.text(self.switch_ref),
        ]  # fmt: skip
        signed = bool(self.signature) or bool(self.signing_key_id)
        if signed:
            invariant(
                bool(self.signature) and bool(self.signing_key_id),
                "an intent's signature needs both the signature and its key id",
            )
            parts += [_codec.text(self.signing_key_id), _codec.blob(self.signature)]
        return b"".join(parts)

    @staticmethod
    def order_bytes_of(body: bytes) -> bytes:
        """The order's canonical bytes of an encoded intent, read without the rest."""
        return _codec.Reader(body).blob()

    @classmethod
    def decode(cls, body: bytes) -> Intent:
        r = _codec.Reader(body)
        head = (r.blob(), r.blob(), r.text(), r.text(), r.i64(), r.text())
        # The signature tail is absent in entries of orders written before signing.
        key_id, signature = (r.text(), r.blob()) if r.pos < len(body) else ("", b"")
        r.done()
        # One encoding per intent: a tail is written only with both of its fields.
        invariant(bool(key_id) == bool(signature), "an intent's signature tail is incomplete")
        return cls(*head, key_id, signature)


@dataclass(frozen=True, slots=True)
class Decision:
    state: PaymentState
    at_us: int
    zone: str
    detail: str
    bank_ref: str
    reversal_owed: bool
    postings: tuple[Posting, ...]

    def encode(self) -> bytes:
        invariant(self.state.is_final, f"a decision must be final, not {self.state.value}")
        invariant(len(self.postings) <= POSTINGS_MAX, f"at most {POSTINGS_MAX} postings")
        parts = [
            _codec.text(self.state.value), _codec.i64(self.at_us), _codec.text(self.zone),
            _codec.text(self.detail), _codec.text(self.bank_ref),
            _codec.i64(int(self.reversal_owed)), _codec.i64(len(self.postings)),
        ]  # fmt: skip
        for p in self.postings:
            parts += [
                _codec.text(p.participant_id), _codec.text(p.currency),
                _codec.i64(p.debit_minor), _codec.i64(p.credit_minor), _codec.text(p.leg.value),
            ]  # fmt: skip
        return b"".join(parts)

    @staticmethod
    def outcome_of(body: bytes) -> tuple[PaymentState, bool]:
        """(state, reversal owed) of an encoded decision, read without its postings."""
        r = _codec.Reader(body)
        state = _enum(PaymentState, r.text())
        invariant(state.is_final, f"a decision must be final, not {state.value}")
        r.i64(), r.blob(), r.blob(), r.blob()  # at, zone, detail, bank ref
        return state, r.i64() != 0

    @staticmethod
    def without_postings(body: bytes) -> bytes:
        """An encoded decision with its postings left out (a count of none): what a
        shard keeps in memory of a settled payment, whose record never shows them (the
        ledger keeps them; they were a fifth of the memory a payment held)."""
        r = _codec.Reader(body)
        r.blob(), r.i64(), r.blob(), r.blob(), r.blob(), r.i64()  # state .. reversal owed
        return body[: r.pos] + _codec.i64(0)

    @classmethod
    def decode(cls, body: bytes, payment_key: str) -> Decision:
        r = _codec.Reader(body)
        state = _enum(PaymentState, r.text())
        invariant(state.is_final, f"a decision must be final, not {state.value}")
        at_us, zone, detail, bank_ref = r.i64(), r.text(), r.text(), r.text()
        owed = r.i64() != 0
        count = r.i64()
        invariant(0 <= count <= POSTINGS_MAX, f"at most {POSTINGS_MAX} postings, not {count}")
        postings = tuple(
            Posting(r.text(), r.text(), r.i64(), r.i64(), payment_key, _enum(Leg, r.text()))
            for _ in range(count)
        )
        r.done()
        return cls(state, at_us, zone, detail, bank_ref, owed, postings)


@dataclass(frozen=True, slots=True)
class ReversalConfirmed:
    at_us: int
    zone: str

    def encode(self) -> bytes:
        return _codec.i64(self.at_us) + _codec.text(self.zone)

    @classmethod
    def decode(cls, body: bytes) -> ReversalConfirmed:
        r = _codec.Reader(body)
        out = cls(r.i64(), r.text())
        r.done()
        return out


@dataclass(frozen=True, slots=True)
class CapTransfer:
    """Headroom of a participant's net debit cap moving between two shards."""

    participant_id: str
    currency: str
    other_shard: int
    amount_minor: int
    at_us: int
    # A grant's borrower epoch, a reclaim's epoch bound; 0 (not written) otherwise.
    epoch: int = 0

    def encode(self) -> bytes:
        invariant(
            self.amount_minor > 0,
            f"a cap transfer moves a positive amount, not {self.amount_minor}",
        )
        invariant(self.epoch >= 0, f"a cap transfer's epoch is not negative: {self.epoch}")
        parts = [
            _codec.text(self.participant_id), _codec.text(self.currency),
            _codec.i64(self.other_shard), _codec.i64(self.amount_minor), _codec.i64(self.at_us),
        ]  # fmt: skip
        if self.epoch:
            parts.append(_codec.i64(self.epoch))
        return b"".join(parts)

    @classmethod
    def decode(cls, body: bytes) -> CapTransfer:
        r = _codec.Reader(body)
        head = (r.text(), r.text(), r.i64(), r.i64(), r.i64())
        written = r.pos < len(body)  # absent in grants written before epochs were
        epoch = r.i64() if written else 0
        r.done()
        # One encoding per transfer: an epoch is written only when it is positive.
        invariant(epoch > 0 or not written, f"a cap transfer's epoch is positive, not {epoch}")
        return cls(*head, epoch)


@dataclass(frozen=True, slots=True)
class WindowCut:
    """The end of settlement window ``window_id`` in one shard's chain."""

    window_id: int
    at_us: int

    def encode(self) -> bytes:
        invariant(self.window_id > 0, f"window ids start at 1, not {self.window_id}")
        return _codec.i64(self.window_id) + _codec.i64(self.at_us)

    @classmethod
    def decode(cls, body: bytes) -> WindowCut:
        r = _codec.Reader(body)
        out = cls(r.i64(), r.i64())
        r.done()
        return out


def window_key(window_id: int) -> str:
    """The ``payment_key`` of a window cut entry."""
    return f"window:{window_id}"


def cap_key(participant_id: str, currency: str) -> str:
    """The ``payment_key`` of a cap transfer entry."""
    return f"cap:{participant_id}/{currency}"


__all__ = [
    "KINDS",
    "KIND_CAP_GRANT",
    "KIND_CAP_RECEIVE",
    "KIND_CAP_RECLAIMED",
    "KIND_CAP_REPAID",
    "KIND_CAP_RETURN",
    "KIND_DECISION",
    "KIND_INTENT",
    "KIND_REVERSAL_CONFIRMED",
    "KIND_WINDOW_CUT",
    "CapTransfer",
    "Decision",
    "Intent",
    "ReversalConfirmed",
    "WindowCut",
    "cap_key",
    "window_key",
]
