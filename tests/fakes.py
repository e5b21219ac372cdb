"""In-memory fakes of the switch's ports, for unit tests only.

* :class:`FakeClock` reads integer microseconds and only moves when told to;
  :meth:`FakeClock.sleep` advances it instead of sleeping.
* :class:`FakePaymentStore` keeps records in a dict. ``begin`` is atomic like
  Cassandra's conditional insert; ``decide`` writes the decision step and the postings
  together. Any method can be told to raise ``Unavailable`` on its next calls, with or
  without its write landing first (a write that timed out but applied).
* :class:`FakeBank` keeps a ledger per ``switch_ref``, answers from a script per
  reference (or a default), and spends the caller's deadline on the fake clock whenever
  it does not answer.

The fakes check their callers' obvious mistakes with ``invariant`` and count every call,
so tests can assert on exactly what the processor did.
"""

from __future__ import annotations

import enum
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from clearinghouse._invariant import invariant
from clearinghouse.domain import (
    FieldViolation,
    InvalidArgument,
    Participant,
    PaymentEvent,
    PaymentOrder,
    PaymentState,
    PaymentType,
    Posting,
    Unavailable,
    fingerprint,
)
from clearinghouse.switch.ports import BankAnswer, BankOutcome, BankTransfer, OwedReversal, Page
from clearinghouse.switch.records import (
    STEP_DECIDED,
    STEP_RECEIVED,
    STEP_ROUTED,
    PaymentRecord,
    StepRecord,
    shard_of,
    switch_ref_for,
)

START_US = 1_750_000_000_000_000
US_PER_S = 1_000_000
OUTAGE_RETRY_AFTER_MS = 500
REVERSED_BEFORE_ARRIVAL = "REVERSED_BEFORE_ARRIVAL"


class FakeClock:
    """A clock in integer microseconds that moves only through :meth:`advance`."""

    def __init__(self, start_us: int = START_US) -> None:
        self.now_us = start_us
        self.slept_s: list[float] = []

    def __call__(self) -> int:
        return self.now_us

    def advance(self, seconds: float) -> None:
        invariant(seconds >= 0, f"a clock never goes back ({seconds} s)")
        self.now_us += round(seconds * US_PER_S)

    def sleep(self, seconds: float) -> None:
        """Stand-in for ``time.sleep``: record the pause and advance the clock by it."""
        self.slept_s.append(seconds)
        self.advance(seconds)


def _advance(clock: FakeClock | None, seconds: float) -> None:
    if clock is not None and seconds:
        clock.advance(seconds)


# -- storage ---------------------------------------------------------------------------


class FakePaymentStore:
    """A dict-backed :class:`~clearinghouse.switch.ports.PaymentStore`.

    ``records`` maps (institution_id, payment_id) to the stored record; ``postings`` is
    every posting written, in order; ``decisions`` every (payment_key, step) that
    ``decide`` wrote, in order; ``calls`` counts calls per method, failed ones included.
    ``latency_s[method]`` advances the clock on each call of ``method``.
    """

    def __init__(self, clock: FakeClock | None = None) -> None:
        self.records: dict[tuple[str, str], PaymentRecord] = {}
        self.postings: list[Posting] = []
        self.decisions: list[tuple[str, StepRecord]] = []
        self.owed: list[OwedReversal] = []
        self.confirmed: dict[str, int] = {}
        self.calls: Counter[str] = Counter()
        self.latency_s: dict[str, float] = {}
        self._clock = clock
        # Per method, one entry per pending outage: whether the write lands before the
        # error (as when a write times out on the client after the replicas applied it).
        self._outages: dict[str, list[bool]] = {}
        self._slip_in: PaymentRecord | None = None

    # -- test controls -----------------------------------------------------------------

    def fail_next(self, method: str, times: int = 1, *, applied: bool = False) -> None:
        """Make the next ``times`` calls of ``method`` raise ``Unavailable``.

        With ``applied``, a write (``begin``, ``decide``) takes effect before the error.
        """
        invariant(method in ("load", "begin", "decide", "list"), f"no method {method!r}")
        invariant(times > 0, "times must be positive")
        self._outages.setdefault(method, []).extend([applied] * times)

    def slip_in_before_next_begin(self, record: PaymentRecord) -> None:
        """Store ``record`` just before the next ``begin`` runs: another attempt won."""
        self._slip_in = record

    def postings_of(self, key: str) -> list[Posting]:
        return [p for p in self.postings if p.payment_key == key]

    # -- the port ----------------------------------------------------------------------

    def load(self, institution_id: str, payment_id: str) -> PaymentRecord | None:
        self._enter("load")
        self._maybe_fail("load")
        return self.records.get((institution_id, payment_id))

    def begin(self, record: PaymentRecord) -> tuple[PaymentRecord, bool]:
        self._enter("begin")
        invariant(
            [s.step for s in record.steps] == [STEP_RECEIVED, STEP_ROUTED],
            f"{record.key}: begin writes exactly the RECEIVED and ROUTED steps",
        )
        if self._slip_in is not None:
            other, self._slip_in = self._slip_in, None
            self.records.setdefault(_key_of(other), other)
        fail_applied = self._pending_outage("begin")
        if fail_applied is False:
            self._raise("begin")
        key = _key_of(record)
        stored = self.records.get(key)
        if stored is None:
            self.records[key] = record
            stored = record
        if fail_applied:
            self._raise("begin")
        return stored, stored.attempt_id == record.attempt_id

    def decide(
        self,
        record: PaymentRecord,
        step: StepRecord,
        postings: Sequence[Posting],
        *,
        reversal_owed: bool = False,
    ) -> None:
        self._enter("decide")
        key = _key_of(record)
        stored = self.records.get(key)
        invariant(stored is not None, f"{record.key}: decided before it was begun")
        assert stored is not None
        invariant(
            all(p.payment_key == record.key for p in postings),
            f"{record.key}: postings of another payment",
        )
        fail_applied = self._pending_outage("decide")
        if fail_applied is False:
            self._raise("decide")
        # As in Cassandra, a second decision overwrites the row of the first.
        self.records[key] = stored.with_step(step)
        self.postings.extend(postings)
        self.decisions.append((record.key, step))
        if reversal_owed:
            self.owed.append(OwedReversal(record.key, record.bank_id, record.switch_ref, 0))
        if fail_applied:
            self._raise("decide")

    def owed_reversals(self, limit: int) -> list[OwedReversal]:
        return [o for o in self.owed if o.payment_key not in self.confirmed][:limit]

    def confirm_reversal(self, owed: OwedReversal, at_us: int) -> None:
        self.confirmed[owed.payment_key] = at_us

    def list(
        self, institution_id: str, start_us: int, end_us: int, page_size: int, page_token: str
    ) -> Page:
        self._enter("list")
        self._maybe_fail("list")
        invariant(page_size > 0, f"page_size {page_size} must be positive")
        rows = sorted(
            (
                r
                for (inst, _), r in self.records.items()
                if inst == institution_id and start_us <= r.received_at_us < end_us
            ),
            key=_list_key,
        )
        if page_token:
            after = _decode_token(page_token)
            rows = [r for r in rows if _list_key(r) > after]
        page = rows[:page_size]
        more = len(rows) > page_size
        return Page(page, _encode_token(*_list_key(page[-1])) if more else "")

    # -- internals ---------------------------------------------------------------------

    def _enter(self, method: str) -> None:
        self.calls[method] += 1
        _advance(self._clock, self.latency_s.get(method, 0.0))

    def _pending_outage(self, method: str) -> bool | None:
        queue = self._outages.get(method)
        return queue.pop(0) if queue else None

    def _maybe_fail(self, method: str) -> None:
        if self._pending_outage(method) is not None:
            self._raise(method)

    @staticmethod
    def _raise(method: str) -> None:
        raise Unavailable(
            f"fake storage lost quorum during {method}",
            retry_after_ms=OUTAGE_RETRY_AFTER_MS,
            reason=Unavailable.STORAGE_QUORUM_LOST,
        )


def _key_of(record: PaymentRecord) -> tuple[str, str]:
    return record.order.institution_id, record.order.payment_id


def _list_key(record: PaymentRecord) -> tuple[int, str]:
    return record.received_at_us, record.order.payment_id


def _encode_token(at_us: int, payment_id: str) -> str:
    return f"{at_us}|{payment_id}"


def _decode_token(token: str) -> tuple[int, str]:
    at, sep, payment_id = token.partition("|")
    if not sep or not at.isdigit():
        raise InvalidArgument([FieldViolation("page_token", "not a token this switch issued")])
    return int(at), payment_id


def begun_record(
    order: PaymentOrder,
    *,
    at_us: int,
    zone: str,
    attempt_id: uuid.UUID | None = None,
    decided: PaymentState | None = None,
    bank_ref: str = "",
) -> PaymentRecord:
    """The record an attempt in ``zone`` writes with ``begin`` at ``at_us``, as the
    processor builds it; with ``decided``, also the decision that attempt wrote."""
    bank_id = order.payer_id if order.type is PaymentType.DEBIT else order.payee_id
    rec = PaymentRecord(
        order=order,
        fingerprint=fingerprint(order),
        attempt_id=attempt_id or uuid.uuid4(),
        shard=shard_of(order.institution_id, order.payment_id),
        switch_ref=switch_ref_for(order.institution_id, order.payment_id),
        bank_id=bank_id,
        received_zone=zone,
        steps=(
            StepRecord(STEP_RECEIVED, PaymentEvent(PaymentState.RECEIVED, at_us, zone, "")),
            StepRecord(
                STEP_ROUTED, PaymentEvent(PaymentState.ROUTED, at_us, zone, f"to {bank_id}")
            ),
        ),
    )
    if decided is not None:
        rec = rec.with_step(
            StepRecord(STEP_DECIDED, PaymentEvent(decided, at_us, zone, ""), bank_ref)
        )
    return rec


# -- bank ------------------------------------------------------------------------------


class Reply(enum.Enum):
    """What the fake bank does with a transfer it has not seen before."""

    APPROVE = "approve"
    DECLINE = "decline"
    # Applies (approves) the transfer but the answer is lost: an inquiry finds APPROVED.
    NO_ANSWER_APPLIED = "no-answer-applied"
    # The request never arrives: an inquiry answers UNKNOWN_REF.
    NO_ANSWER_LOST = "no-answer-lost"


@dataclass(frozen=True, slots=True)
class BankCall:
    method: str
    bank_id: str
    switch_ref: str
    deadline_s: float


class FakeBank:
    """A :class:`~clearinghouse.switch.ports.BankGateway` over an in-memory ledger.

    Like the bank simulator: a transfer is idempotent on ``switch_ref``; a reversal of an
    APPROVED transfer makes it REVERSED; a reversal of a reference never seen leaves a
    tombstone (DECLINED, ``REVERSED_BEFORE_ARRIVAL``) that refuses a late transfer.
    Whenever it does not answer it spends the caller's whole deadline on ``clock``.
    ``before_call(method, switch_ref)``, when set, runs at the start of every call (after
    it is counted): a hook for simulating something concurrent with the call.
    """

    def __init__(self, clock: FakeClock | None = None, *, default: Reply = Reply.APPROVE) -> None:
        self.ledger: dict[str, BankOutcome] = {}
        self.replies: dict[str, Reply] = {}
        self.default = default
        self.unreachable = False
        self.latency_s = 0.0
        self.calls: Counter[str] = Counter()
        self.calls_by_ref: Counter[tuple[str, str]] = Counter()
        self.log: list[BankCall] = []
        self.transfers: list[BankTransfer] = []
        self.before_call: Callable[[str, str], None] | None = None
        self._clock = clock
        self._drops: Counter[str] = Counter()
        self._refs = 0

    # -- test controls -----------------------------------------------------------------

    def script(self, switch_ref: str, reply: Reply) -> None:
        self.replies[switch_ref] = reply

    def drop_next(self, method: str, times: int = 1) -> None:
        """The next ``times`` calls of ``method`` get no answer (and change nothing)."""
        invariant(method in ("transfer", "inquire", "reverse"), f"no method {method!r}")
        self._drops[method] += times

    def apply(self, switch_ref: str, answer: BankAnswer) -> BankOutcome:
        """Put a transfer in the ledger, as if an earlier (crashed) attempt had sent it."""
        invariant(answer in (BankAnswer.APPROVED, BankAnswer.DECLINED), f"cannot apply {answer}")
        return self._record(switch_ref, answer, f"{answer.value.lower()} earlier")

    def status(self, switch_ref: str) -> BankAnswer | None:
        known = self.ledger.get(switch_ref)
        return None if known is None else known.answer

    def count(self, method: str, switch_ref: str) -> int:
        return self.calls_by_ref[(method, switch_ref)]

    # -- the port ----------------------------------------------------------------------

    def transfer(self, bank: Participant, req: BankTransfer, deadline_s: float) -> BankOutcome:
        self._enter("transfer", bank, req.switch_ref, deadline_s)
        self.transfers.append(req)
        if self._silent("transfer"):
            return self._no_answer(deadline_s)
        known = self.ledger.get(req.switch_ref)
        if known is not None:
            return self._answer(known)
        reply = self.replies.get(req.switch_ref, self.default)
        if reply is Reply.NO_ANSWER_LOST:
            return self._no_answer(deadline_s)
        if reply is Reply.DECLINE:
            return self._answer(self._record(req.switch_ref, BankAnswer.DECLINED, "declined"))
        outcome = self._record(req.switch_ref, BankAnswer.APPROVED, "approved")
        if reply is Reply.NO_ANSWER_APPLIED:
            return self._no_answer(deadline_s)
        return self._answer(outcome)

    def inquire(self, bank: Participant, switch_ref: str, deadline_s: float) -> BankOutcome:
        self._enter("inquire", bank, switch_ref, deadline_s)
        if self._silent("inquire"):
            return self._no_answer(deadline_s)
        known = self.ledger.get(switch_ref)
        if known is None:
            return self._answer(BankOutcome(BankAnswer.UNKNOWN_REF, "", "never seen"))
        return self._answer(known)

    def reverse(
        self, bank: Participant, switch_ref: str, reason: str, deadline_s: float
    ) -> BankOutcome:
        self._enter("reverse", bank, switch_ref, deadline_s)
        if self._silent("reverse"):
            return self._no_answer(deadline_s)
        known = self.ledger.get(switch_ref)
        if known is None:
            return self._answer(
                self._record(switch_ref, BankAnswer.DECLINED, REVERSED_BEFORE_ARRIVAL)
            )
        if known.answer is BankAnswer.APPROVED:
            known = BankOutcome(BankAnswer.REVERSED, known.bank_ref, f"reversed: {reason}")
            self.ledger[switch_ref] = known
        return self._answer(known)

    # -- internals ---------------------------------------------------------------------

    def _enter(self, method: str, bank: Participant, switch_ref: str, deadline_s: float) -> None:
        self.calls[method] += 1
        self.calls_by_ref[(method, switch_ref)] += 1
        self.log.append(BankCall(method, bank.participant_id, switch_ref, deadline_s))
        if self.before_call is not None:
            self.before_call(method, switch_ref)

    def _silent(self, method: str) -> bool:
        if self.unreachable:
            return True
        if self._drops[method] > 0:
            self._drops[method] -= 1
            return True
        return False

    def _no_answer(self, deadline_s: float) -> BankOutcome:
        _advance(self._clock, deadline_s)
        return BankOutcome(BankAnswer.NO_ANSWER, "", "deadline exceeded")

    def _answer(self, outcome: BankOutcome) -> BankOutcome:
        _advance(self._clock, self.latency_s)
        return outcome

    def _record(self, switch_ref: str, answer: BankAnswer, detail: str) -> BankOutcome:
        invariant(switch_ref not in self.ledger, f"{switch_ref} is already in the ledger")
        self._refs += 1
        outcome = BankOutcome(answer, f"BANKREF{self._refs:06d}", detail)
        self.ledger[switch_ref] = outcome
        return outcome


__all__ = [
    "OUTAGE_RETRY_AFTER_MS",
    "REVERSED_BEFORE_ARRIVAL",
    "START_US",
    "BankCall",
    "FakeBank",
    "FakeClock",
    "FakePaymentStore",
    "Reply",
    "begun_record",
]
