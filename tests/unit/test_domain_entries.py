"""Ledger entry bodies: exact bytes, round trips, and refusal of anything malformed."""

from __future__ import annotations

import struct
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clearinghouse._invariant import InvariantViolation
from clearinghouse.domain import Money, PaymentOrder, PaymentState, PaymentType, postings_for
from clearinghouse.domain._codec import I64_MAX, I64_MIN
from clearinghouse.domain.entries import (
    KIND_CAP_GRANT,
    KIND_CAP_RECEIVE,
    KIND_CAP_RECLAIMED,
    KIND_CAP_REPAID,
    KIND_CAP_RETURN,
    KIND_DECISION,
    KIND_INTENT,
    KIND_REVERSAL_CONFIRMED,
    KIND_WINDOW_CUT,
    KINDS,
    CapTransfer,
    Decision,
    Intent,
    ReversalConfirmed,
    cap_key,
)
from clearinghouse.domain.postings import Leg, Posting

pytestmark = pytest.mark.unit

KEY = "inst-a/pay-1"
FINAL_STATES = [s for s in PaymentState if s.is_final]
TEXT = st.text(st.characters(codec="utf-8"), max_size=40)
I64 = st.integers(I64_MIN, I64_MAX)


def _lp(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def _i64(n: int) -> bytes:
    return struct.pack(">q", n)


ORDER = PaymentOrder(
    payment_id="pay-1",
    institution_id="inst-a",
    type=PaymentType.DEBIT,
    payer_id="bank-a",
    payee_id="inst-a",
    bank_account="6222020000000001",
    amount=Money(12_345, "CNY"),
    memo="top-up",
    requested_at_us=1_750_000_000_000_000,
)
INTENT = Intent(b"order-bytes", bytes(range(32)), "bank-a", "shanghai-a", 1_750_000_000, "SW1")
SIGNED_INTENT = replace(INTENT, signing_key_id="00112233aabbccdd", signature=bytes(range(64)))
DECISION = Decision(
    PaymentState.APPROVED,
    1_750_000_000_123,
    "beijing-b",
    "approved",
    "BANKREF000001",
    False,
    postings_for(KEY, ORDER, PaymentState.APPROVED, from_state=PaymentState.ROUTED),
)
REVERSAL = ReversalConfirmed(1_750_000_000_456, "shenzhen-a")
TRANSFER = CapTransfer("bank-a", "CNY", 17, 5_000, 1_750_000_000_789)
GRANT = CapTransfer("bank-a", "CNY", 17, 5_000, 1_750_000_000_789, epoch=42)
BODIES = {
    "intent": INTENT.encode(),
    "signed_intent": SIGNED_INTENT.encode(),
    "decision": DECISION.encode(),
    "reversal": REVERSAL.encode(),
    "cap": TRANSFER.encode(),
    "cap_with_epoch": GRANT.encode(),
}


def _decode(kind: str, body: bytes) -> object:
    if kind in ("intent", "signed_intent"):
        return Intent.decode(body)
    if kind == "decision":
        return Decision.decode(body, KEY)
    if kind in ("cap", "cap_with_epoch"):
        return CapTransfer.decode(body)
    return ReversalConfirmed.decode(body)


def test_kinds() -> None:
    assert set(KINDS) == {
        KIND_INTENT, KIND_DECISION, KIND_REVERSAL_CONFIRMED, KIND_CAP_GRANT, KIND_CAP_RECEIVE,
        KIND_CAP_RETURN, KIND_CAP_REPAID, KIND_CAP_RECLAIMED, KIND_WINDOW_CUT,
    }  # fmt: skip
    assert len(KINDS) == 9


def test_cap_entries_have_a_key_no_payment_can_have() -> None:
    # Payment keys are "<institution>/<payment>" of validated ids, which have no ":".
    assert cap_key("bank-a", "CNY") == "cap:bank-a/CNY"


# -- the documented layout ---------------------------------------------------------------


def test_intent_bytes_are_the_documented_layout() -> None:
    assert INTENT.encode() == (
        _lp(b"order-bytes") + _lp(bytes(range(32))) + _lp(b"bank-a") + _lp(b"shanghai-a")
        + _i64(1_750_000_000) + _lp(b"SW1")
    )  # fmt: skip


def test_a_signed_intent_appends_key_id_and_signature_and_both_decode() -> None:
    assert SIGNED_INTENT.encode() == (
        INTENT.encode() + _lp(b"00112233aabbccdd") + _lp(bytes(range(64)))
    )
    assert Intent.decode(SIGNED_INTENT.encode()) == SIGNED_INTENT
    # An entry written before orders were signed keeps its bytes and still decodes.
    assert Intent.decode(INTENT.encode()) == INTENT
    assert Intent.decode(INTENT.encode()).signature == b""


@pytest.mark.parametrize(
    "half", [{"signature": b"\x01" * 64}, {"signing_key_id": "00112233aabbccdd"}]
)
def test_a_half_signature_is_refused(half: dict[str, object]) -> None:
    with pytest.raises(InvariantViolation, match="signature"):
        replace(INTENT, **half).encode()  # type: ignore[arg-type]
    lone_tail = INTENT.encode() + _lp(b"") + _lp(b"\x01" * 64)
    with pytest.raises(InvariantViolation, match="incomplete"):
        Intent.decode(lone_tail)


@settings(deadline=None)
@given(extra=st.binary(min_size=1, max_size=16))
def test_bytes_after_an_unsigned_intent_are_refused(extra: bytes) -> None:
    # They would be read as a signature tail: too short, incomplete, or trailing.
    with pytest.raises(InvariantViolation):
        Intent.decode(INTENT.encode() + extra)


def test_decision_bytes_are_the_documented_layout() -> None:
    expected = (
        _lp(b"APPROVED") + _i64(1_750_000_000_123) + _lp(b"beijing-b") + _lp(b"approved")
        + _lp(b"BANKREF000001") + _i64(0) + _i64(2)
        + _lp(b"bank-a") + _lp(b"CNY") + _i64(12_345) + _i64(0) + _lp(b"approve.payer")
        + _lp(b"inst-a") + _lp(b"CNY") + _i64(0) + _i64(12_345) + _lp(b"approve.payee")
    )  # fmt: skip
    assert DECISION.encode() == expected


def test_reversal_confirmed_bytes_are_the_documented_layout() -> None:
    assert REVERSAL.encode() == _i64(1_750_000_000_456) + _lp(b"shenzhen-a")


def test_cap_transfer_bytes_are_the_documented_layout() -> None:
    assert TRANSFER.encode() == (
        _lp(b"bank-a") + _lp(b"CNY") + _i64(17) + _i64(5_000) + _i64(1_750_000_000_789)
    )


# -- round trips ---------------------------------------------------------------------------


@settings(deadline=None)
@given(st.binary(max_size=200), st.binary(max_size=40), TEXT, TEXT, I64, TEXT)
def test_intent_round_trips(
    order: bytes, fp: bytes, bank_id: str, zone: str, at_us: int, ref: str
) -> None:
    intent = Intent(order, fp, bank_id, zone, at_us, ref)
    assert Intent.decode(intent.encode()) == intent
    assert Intent.order_bytes_of(intent.encode()) == order


POSTINGS = st.lists(
    st.builds(
        lambda pid, ccy, amount, is_debit, leg: Posting(
            pid, ccy, amount if is_debit else 0, 0 if is_debit else amount, KEY, leg
        ),
        TEXT,
        TEXT,
        st.integers(1, I64_MAX),
        st.booleans(),
        st.sampled_from(list(Leg)),
    ),
    max_size=16,
)


@settings(deadline=None)
@given(st.sampled_from(FINAL_STATES), I64, TEXT, TEXT, TEXT, st.booleans(), POSTINGS)
def test_decision_round_trips(
    state: PaymentState,
    at_us: int,
    zone: str,
    detail: str,
    bank_ref: str,
    owed: bool,
    postings: list[Posting],
) -> None:
    decision = Decision(state, at_us, zone, detail, bank_ref, owed, tuple(postings))
    decoded = Decision.decode(decision.encode(), KEY)
    assert decoded == decision
    assert decoded.reversal_owed is owed
    # What a takeover's replay reads of it, and what a settled payment keeps of it.
    assert Decision.outcome_of(decision.encode()) == (state, owed)
    kept = Decision.decode(Decision.without_postings(decision.encode()), KEY)
    assert kept == Decision(state, at_us, zone, detail, bank_ref, owed, ())


def test_a_replay_reads_a_non_final_decision_as_no_decision() -> None:
    approved = _lp(PaymentState.APPROVED.value.encode())
    body = _lp(PaymentState.RECEIVED.value.encode()) + DECISION.encode()[len(approved) :]
    with pytest.raises(InvariantViolation):
        Decision.outcome_of(body)


def test_decision_postings_take_the_payment_key_from_the_entry() -> None:
    """The key is not in the body: it is the entry's, and the postings get it back."""
    decoded = Decision.decode(DECISION.encode(), "inst-b/other")
    assert [p.payment_key for p in decoded.postings] == ["inst-b/other"] * 2
    assert [(p.participant_id, p.debit_minor, p.credit_minor) for p in decoded.postings] == [
        ("bank-a", 12_345, 0),
        ("inst-a", 0, 12_345),
    ]


@settings(deadline=None)
@given(I64, TEXT)
def test_reversal_confirmed_round_trips(at_us: int, zone: str) -> None:
    rc = ReversalConfirmed(at_us, zone)
    assert ReversalConfirmed.decode(rc.encode()) == rc


@settings(deadline=None)
@given(TEXT, TEXT, I64, st.integers(1, I64_MAX), I64, st.integers(0, I64_MAX))
def test_cap_transfer_round_trips(
    participant: str, currency: str, other_shard: int, amount: int, at_us: int, epoch: int
) -> None:
    t = CapTransfer(participant, currency, other_shard, amount, at_us, epoch)
    assert CapTransfer.decode(t.encode()) == t


def test_a_cap_transfer_s_epoch_is_written_only_when_positive() -> None:
    plain = CapTransfer("bank-a", "CNY", 17, 5_000, 1_750_000_000_789)
    with_epoch = CapTransfer("bank-a", "CNY", 17, 5_000, 1_750_000_000_789, epoch=42)

    assert with_epoch.encode() == plain.encode() + (42).to_bytes(8, "big")
    assert CapTransfer.decode(plain.encode()).epoch == 0  # a grant written before epochs
    with pytest.raises(InvariantViolation, match="epoch is positive"):
        CapTransfer.decode(plain.encode() + (0).to_bytes(8, "big"))  # a second encoding
    with pytest.raises(InvariantViolation):
        CapTransfer.decode(with_epoch.encode() + b"\x00")


@pytest.mark.parametrize("amount", [0, -1])
def test_a_cap_transfer_moves_a_positive_amount(amount: int) -> None:
    with pytest.raises(InvariantViolation, match="positive amount"):
        CapTransfer("bank-a", "CNY", 1, amount, 1).encode()


# -- refusals -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(BODIES))
def test_every_truncation_is_refused(kind: str) -> None:
    body = BODIES[kind]
    for cut in range(len(body)):
        if kind == "signed_intent" and cut == len(INTENT.encode()):
            # Without its tail a signed intent is an unsigned one: the chain's hash binds
            # the tail to the entry, and the switch and the auditor refuse unsigned orders.
            assert _decode(kind, body[:cut]) == INTENT
            continue
        if kind == "cap_with_epoch" and cut == len(TRANSFER.encode()):
            # Without its epoch a grant is one written before epochs were recorded: the
            # chain's hash binds the epoch to the entry, and it can only hold back a
            # reclaim (a grant without an epoch is never reclaimed).
            assert _decode(kind, body[:cut]) == TRANSFER
            continue
        with pytest.raises(InvariantViolation, match="ends early"):
            _decode(kind, body[:cut])


@pytest.mark.parametrize("kind", [k for k in BODIES if k not in ("intent", "cap")])
@settings(deadline=None)
@given(extra=st.binary(min_size=1, max_size=16))
def test_trailing_bytes_are_refused(kind: str, extra: bytes) -> None:
    with pytest.raises(InvariantViolation, match="trailing bytes"):
        _decode(kind, BODIES[kind] + extra)


@pytest.mark.parametrize("state", [PaymentState.RECEIVED, PaymentState.ROUTED])
def test_a_decision_must_be_final(state: PaymentState) -> None:
    with pytest.raises(InvariantViolation, match="must be final"):
        Decision(state, 1, "z", "", "", False, ()).encode()


@pytest.mark.parametrize("count", [-1, 17, 2**40])
def test_a_decision_with_an_impossible_posting_count_is_refused(count: int) -> None:
    body = Decision(PaymentState.DECLINED, 1, "z", "", "", False, ()).encode()
    forged = body[: -len(_i64(0))] + _i64(count)  # the count is the body's last field
    with pytest.raises(InvariantViolation, match="at most 16 postings"):
        Decision.decode(forged, KEY)


def test_a_decision_body_is_not_an_intent() -> None:
    with pytest.raises(InvariantViolation):
        Intent.decode(DECISION.encode())
