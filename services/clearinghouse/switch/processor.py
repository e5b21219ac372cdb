"""The payment path on the shard's owner: validate, record, route to the bank, decide.

Runs on the node that owns the payment's shard (requests reach it through
:mod:`.routing`); the store (:class:`.shards.ShardedStore`) is the shard's only writer.

1. Validate against the participant registry (nothing is written for a bad order).
2. ``begin``: the same id with the same payload replays the stored result (waiting for
   an attempt still in flight); with a different payload it is ``AlreadyExists``. A new
   payment is checked against the payer's net debit cap and its intent (RECEIVED and
   ROUTED) is acknowledged by two cities *before* the bank is called.
3. Call the bank under a deadline. No answer in time: status inquiry; still nothing or
   the bank never saw it: reversal. Every bank call of the attempt ends within
   :data:`BANK_CALLS_BOUND_S` of receipt (deadlines are cut to what is left), and the
   decision write starts within :data:`DECISION_BOUND_S` or not at all.
4. ``decide``: the decision and its balanced postings, one ledger entry, acknowledged
   by two cities; only then is the answer returned.

An attempt that ends without deciding (too late, storage down) hands the payment back
to the store (``abandon``), which has it resolved by :meth:`PaymentProcessor.resolve`:
inquiry first, then reversal. A new owner does the same for every payment it finds
received but undecided when it takes a shard over.

A replay is answered from the stored payment before the order is checked against the
registry: a payment already accepted completes even if its bank was suspended since.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TypeVar

from clearinghouse import telemetry
from clearinghouse._invariant import invariant
from clearinghouse.domain import (
    MAX_AMOUNT_MINOR,
    PAYMENT_ID_LEN_MAX,
    AlreadyExists,
    ClearingError,
    NotFound,
    Participant,
    PaymentEvent,
    PaymentOrder,
    PaymentState,
    PaymentType,
    Posting,
    Unavailable,
    check_balanced,
    fingerprint,
    postings_for,
    validate_order,
)
from clearinghouse.domain.validation import PARTICIPANT_ID_LEN_MAX, is_valid_id
from clearinghouse.switch.ports import (
    BankAnswer,
    BankGateway,
    BankOutcome,
    BankTransfer,
    PaymentStore,
)
from clearinghouse.switch.records import (
    STEP_DECIDED,
    STEP_RECEIVED,
    STEP_ROUTED,
    PaymentRecord,
    StepRecord,
    shard_of,
    switch_ref_for,
)

BANK_TRANSFER_DEADLINE_S = 5.0
INQUIRY_DEADLINE_S = 2.0
INQUIRY_ATTEMPTS = 3
INQUIRY_PAUSE_S = 1.0
REVERSAL_DEADLINE_S = 2.0
REVERSAL_ATTEMPTS = 2
# 5 s transfer + 3 x 2 s inquiries + 2 x 1 s pauses + 2 x 2 s reversals = 17 s.
BANK_CALLS_BOUND_S = 17.0
# A bank call with less time than this left is not started.
BANK_CALL_MIN_S = 0.2
DECISION_BOUND_S = 20.0
OWED_REVERSALS_PER_RUN_MAX = 100
IN_PROGRESS_RETRY_AFTER_MS = 1000
# A request naming a participant or signing key the registry lacks reads it again at once,
# at most this often per node (the periodic refresh runs every 2 s anyway).
MISS_RELOAD_MIN_S = 0.5

Clock = Callable[[], int]
T = TypeVar("T")
log = logging.getLogger(__name__)


def wall_clock_us() -> int:
    return time.time_ns() // 1000


@dataclass(frozen=True, slots=True)
class Result:
    record: PaymentRecord
    replayed: bool


class Registry:
    """A snapshot of participants, replaced whole when it changes (never mutated).

    ``reload`` (the participant store's ``all``), when given, lets a request that names
    what the snapshot lacks read the registry at once (:meth:`snapshot_knowing`) instead
    of waiting for the periodic refresh: a participant registered, or a signing key added,
    a moment ago on another node."""

    def __init__(
        self,
        participants: Mapping[str, Participant] | None = None,
        *,
        reload: Callable[[], Mapping[str, Participant]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._snapshot: Mapping[str, Participant] = dict(participants or {})
        self._reload = reload
        self._clock = clock
        self._reload_lock = threading.Lock()
        self._reloaded_at = -MISS_RELOAD_MIN_S
        self.miss_reloads = 0

    def snapshot(self) -> Mapping[str, Participant]:
        return self._snapshot

    def snapshot_knowing(
        self, lacks: Callable[[Mapping[str, Participant]], bool]
    ) -> Mapping[str, Participant]:
        """The snapshot, read again first when ``lacks(snapshot)``: at most once per
        :data:`MISS_RELOAD_MIN_S` on this node, so requests naming unknown ids cannot make
        it read more, and never waiting for a read another request is making."""
        snap = self._snapshot
        if self._reload is None or not lacks(snap):
            return snap
        if not self._reload_lock.acquire(blocking=False):
            return snap  # another request is reading it now
        try:
            now = self._clock()
            if now - self._reloaded_at < MISS_RELOAD_MIN_S:
                return self._snapshot
            self._reloaded_at = now
            self.miss_reloads += 1
            try:
                self._snapshot = dict(self._reload())
            except ClearingError as e:  # the store is away: the periodic refresh catches up
                log.warning("reading the participant registry for an unknown id failed: %s", e)
            return self._snapshot
        finally:
            self._reload_lock.release()

    def replace(self, participants: Mapping[str, Participant]) -> None:
        self._snapshot = dict(participants)


class _Budget:
    """What is left of an attempt's time for bank calls; cuts each call's deadline to fit."""

    def __init__(self, clock: Clock, ends_at_us: int | None) -> None:
        self.clock = clock
        self.ends_at_us = ends_at_us

    @classmethod
    def unbounded(cls, clock: Clock) -> _Budget:
        return cls(clock, None)

    def cut(self, deadline_s: float) -> float | None:
        if self.ends_at_us is None:
            return deadline_s
        left_s = (self.ends_at_us - self.clock()) / 1e6
        return min(deadline_s, left_s) if left_s >= BANK_CALL_MIN_S else None


def _each(pool: ThreadPoolExecutor | None, fn: Callable[[T], None], args: Sequence[T]) -> None:
    """``fn`` for each of ``args``: concurrently in ``pool`` when there is one and more
    than one, else in turn. Every call has ended when this returns (the first error is
    raised then), so nothing runs on behind the caller's back."""
    if pool is None or len(args) < 2:
        for a in args:
            fn(a)
        return
    futures = [pool.submit(telemetry.bind_context(fn), a) for a in args]
    wait(futures)
    for f in futures:
        f.result()


class PaymentProcessor:
    def __init__(
        self,
        *,
        zone: str,
        store: PaymentStore,
        bank: BankGateway,
        registry: Registry,
        clock: Clock = wall_clock_us,
        sleep: Callable[[float], None] = time.sleep,
        max_amount_minor: int = MAX_AMOUNT_MINOR,
        pool: ThreadPoolExecutor | None = None,
        resolve_pool: ThreadPoolExecutor | None = None,
    ) -> None:
        self.zone = zone
        self.store = store
        self.bank = bank
        self.registry = registry
        self.clock = clock
        self.sleep = sleep
        self.max_amount_minor = max_amount_minor
        # ``pool`` calls the banks of one batch concurrently, ``resolve_pool`` asks about
        # its unanswered transfers concurrently (two pools: a task of one may wait for
        # the other's, never for its own); without them (tests), one after the other.
        self.pool = pool
        self.resolve_pool = resolve_pool

    # -- queries -----------------------------------------------------------------------

    def get(self, institution_id: str, payment_id: str) -> PaymentRecord:
        rec = self.store.load(institution_id, payment_id)
        if rec is None:
            raise NotFound.payment(institution_id, payment_id)
        return rec

    # -- the payment path --------------------------------------------------------------

    def validate(self, order: PaymentOrder, path: str = "order") -> None:
        validate_order(
            order,
            self.registry.snapshot(),
            max_amount_minor=self.max_amount_minor,
            path=path,
        )

    def submit(self, order: PaymentOrder, received_zone: str = "") -> Result:
        """Process ``order`` to a final state, or replay the stored result of its id.

        ``received_zone`` is the zone whose node the participant called (this node's own
        zone when empty); the decision records this node's zone.
        """
        (out,) = self.submit_many([order], received_zone)
        if isinstance(out, ClearingError):
            raise out
        return out

    def submit_many(
        self,
        orders: Sequence[PaymentOrder],
        received_zone: str = "",
        paths: Sequence[str] | None = None,
    ) -> list[Result | ClearingError]:
        """``submit`` for each order, together: their intents share group commits, their
        transfers leave as one call per bank, their decisions share group commits. Each
        order gets its own result or error, in order; none waits for another's retries
        beyond the batch (a bank that does not answer is asked about each payment
        concurrently, see ``pool``)."""
        zone = received_zone or self.zone
        out: list[Result | ClearingError | None] = [None] * len(orders)
        fresh: list[tuple[int, bytes, Participant, PaymentRecord]] = []
        for i, order in enumerate(orders):
            try:
                prepared = self._prepare(order, zone, paths[i] if paths else "order")
            except ClearingError as e:
                out[i] = e
                continue
            if isinstance(prepared, Result):
                out[i] = prepared
            else:
                fresh.append((i, *prepared))
        won: list[tuple[int, PaymentRecord, Participant]] = []
        # A single order waits for an attempt of the same payment still in flight (to
        # answer with its outcome); in a batch that attempt would hold every other order
        # back, so a batch answers such an order PAYMENT_IN_PROGRESS (retry) at once.
        begun = self.store.begin_many([rec for *_, rec in fresh], wait_in_flight=len(orders) == 1)
        for (i, fp, bank, _), b in zip(fresh, begun, strict=True):
            if isinstance(b, ClearingError):
                out[i] = b
                continue
            stored, first = b
            if first:
                won.append((i, stored, bank))
            else:
                out[i] = self._replayed(stored, fp)
        if won:
            self._route_and_decide(won, out)
        invariant(all(r is not None for r in out), "every order of a batch gets an answer")
        return [r for r in out if r is not None]

    def _prepare(
        self, order: PaymentOrder, zone: str, path: str
    ) -> Result | tuple[bytes, Participant, PaymentRecord]:
        """The order checked against the registry and made a record to begin; or, for an
        order the registry refuses now but that was accepted before, its stored result."""
        if not (
            is_valid_id(order.institution_id, PARTICIPANT_ID_LEN_MAX)
            and is_valid_id(order.payment_id, PAYMENT_ID_LEN_MAX)
        ):
            self.validate(order, path)  # raises, naming every bad field
        fp = fingerprint(order)
        try:
            self.validate(order, path)
        except ClearingError:
            # A replay is answered from the stored payment, whatever the registry says
            # now; only an order that was never accepted gets the validation error.
            existing = self.store.load(order.institution_id, order.payment_id)
            if existing is None:
                raise
            return Result(self._replay(existing, fp), replayed=True)
        # A valid order goes straight to begin, which reports an existing payment itself.
        now = self.clock()
        bank = self._bank_of(order)
        received = PaymentEvent(PaymentState.RECEIVED, now, zone, "")
        routed = PaymentEvent(PaymentState.ROUTED, now, zone, f"to {bank.participant_id}")
        record = PaymentRecord(
            order=order,
            fingerprint=fp,
            shard=shard_of(order.institution_id, order.payment_id),
            switch_ref=switch_ref_for(order.institution_id, order.payment_id),
            bank_id=bank.participant_id,
            received_zone=zone,
            steps=(StepRecord(STEP_RECEIVED, received), StepRecord(STEP_ROUTED, routed)),
        )
        return fp, bank, record

    def _replayed(self, stored: PaymentRecord, fp: bytes) -> Result | ClearingError:
        try:
            return Result(self._replay(stored, fp), replayed=True)
        except ClearingError as e:
            return e

    def _route_and_decide(
        self,
        won: list[tuple[int, PaymentRecord, Participant]],
        out: list[Result | ClearingError | None],
    ) -> None:
        """Call the banks for the payments this attempt began, and decide them. Whatever
        is not decided here is handed back to the store (``abandon``) to be resolved."""
        decided: set[int] = set()
        try:
            outcomes = self._call_banks([(rec, bank) for _, rec, bank in won])
            pending: list[tuple[int, PaymentRecord]] = []
            decisions = []
            for (i, rec, _), outcome in zip(won, outcomes, strict=True):
                if self.clock() > rec.received_at_us + int(DECISION_BOUND_S * 1e6):
                    # Too late to decide here: the store has it resolved (inquiry, reversal).
                    out[i] = Unavailable(
                        f"payment {rec.order.payment_id!r} took too long to decide; retry "
                        "to learn its outcome",
                        retry_after_ms=IN_PROGRESS_RETRY_AFTER_MS,
                        reason="PAYMENT_IN_PROGRESS",
                    )
                    continue
                pending.append((i, rec))
                decisions.append(self._decision_of(rec, outcome))
            for (i, rec), d in zip(pending, self.store.decide_many(decisions), strict=True):
                if isinstance(d, ClearingError):
                    out[i] = d
                    continue
                decided.add(i)
                telemetry.metrics.payment_decided(d.state.value, rec.order.type.value, self.zone)
                out[i] = Result(d, replayed=False)
        finally:
            for i, rec, _ in won:
                if i not in decided:
                    self.store.abandon(rec)

    def _call_banks(self, items: list[tuple[PaymentRecord, Participant]]) -> list[BankOutcome]:
        """Each payment's transfer, one call per bank (banks called concurrently when a
        pool is given); a transfer without an answer is resolved by inquiry, reversal."""
        by_bank: dict[str, list[int]] = defaultdict(list)
        for n, (_, bank) in enumerate(items):
            by_bank[bank.participant_id].append(n)
        outcomes: list[BankOutcome | None] = [None] * len(items)

        def one_bank(idx: list[int]) -> None:
            bank = items[idx[0]][1]
            budgets = {n: self._budget(items[n][0]) for n in idx}
            cuts = {n: budgets[n].cut(BANK_TRANSFER_DEADLINE_S) for n in idx}
            send = [n for n in idx if cuts[n] is not None]
            for n in idx:
                if cuts[n] is None:
                    # Storage used the whole bound before the bank was called: nothing moved.
                    outcomes[n] = BankOutcome(
                        BankAnswer.UNKNOWN_REF, "", "decision bound reached before routing"
                    )
            if send:
                deadline = min(c for n in send if (c := cuts[n]) is not None)
                reqs = [self._transfer_of(items[n][0]) for n in send]
                for n, o in zip(send, self.bank.transfer_many(bank, reqs, deadline), strict=True):
                    outcomes[n] = o
            unknown = [n for n in send if outcomes[n].answer is BankAnswer.NO_ANSWER]  # type: ignore[union-attr]

            def settle(n: int) -> None:
                outcomes[n] = self._resolve_unknown(items[n][0], bank, budgets[n])

            # Another pool than the banks': a task never waits for its own pool, so the
            # pools cannot fill up with tasks waiting for each other.
            _each(self.resolve_pool, settle, unknown)

        _each(self.pool, one_bank, list(by_bank.values()))
        invariant(all(o is not None for o in outcomes), "every transfer has an outcome")
        return [o for o in outcomes if o is not None]

    def _budget(self, stored: PaymentRecord) -> _Budget:
        return _Budget(self.clock, stored.received_at_us + int(BANK_CALLS_BOUND_S * 1e6))

    @staticmethod
    def _transfer_of(stored: PaymentRecord) -> BankTransfer:
        o = stored.order
        return BankTransfer(o.type, stored.switch_ref, o.institution_id, o.bank_account, o.amount)

    def resolve(self, rec: PaymentRecord) -> PaymentRecord:
        """Decide a payment whose attempt ended without deciding: ask the bank, reverse.

        The store calls this for a payment it holds no live attempt for; the bank's
        answers are idempotent, and a reversal makes a late transfer be refused.
        """
        if rec.is_final:
            return rec
        bank = self._stored_bank(rec)
        return self._decide(rec, self._resolve_unknown(rec, bank, _Budget.unbounded(self.clock)))

    def _bank_of(self, order: PaymentOrder) -> Participant:
        bank_id = order.payer_id if order.type is PaymentType.DEBIT else order.payee_id
        bank = self.registry.snapshot().get(bank_id)
        invariant(bank is not None, f"validated order names unknown bank {bank_id}")
        assert bank is not None  # for the type checker; invariant() above always runs
        return bank

    def _stored_bank(self, rec: PaymentRecord) -> Participant:
        """The bank a stored payment was routed to, whatever its status is now."""
        bank = self.registry.snapshot().get(rec.bank_id)
        if bank is None:
            raise Unavailable(
                f"bank {rec.bank_id!r} is not in this node's registry yet",
                retry_after_ms=1000,
                reason="REGISTRY_NOT_READY",
            )
        return bank

    def _replay(self, rec: PaymentRecord, fp: bytes) -> PaymentRecord:
        if rec.fingerprint != fp:
            raise AlreadyExists(
                f"payment id {rec.order.payment_id!r} was already used for a different order",
                reason="PAYMENT_ID_REUSED",
            )
        if rec.is_final:
            return rec
        # The store waited for the attempt in flight; it is still working on it (or the
        # resolver is): never race it, ask the client to come back.
        raise Unavailable(
            f"payment {rec.order.payment_id!r} is being processed; retry with the same id",
            retry_after_ms=IN_PROGRESS_RETRY_AFTER_MS,
            reason="PAYMENT_IN_PROGRESS",
        )

    def _resolve_unknown(
        self, rec: PaymentRecord, bank: Participant, budget: _Budget
    ) -> BankOutcome:
        """The transfer's fate is unknown: ask, then reverse. Bounded in attempts and time."""
        for attempt in range(INQUIRY_ATTEMPTS):
            if attempt:
                self.sleep(INQUIRY_PAUSE_S)
            deadline = budget.cut(INQUIRY_DEADLINE_S)
            if deadline is None:
                break
            answer = self.bank.inquire(bank, rec.switch_ref, deadline)
            if answer.answer in (BankAnswer.APPROVED, BankAnswer.DECLINED, BankAnswer.REVERSED):
                return answer
            if answer.answer is BankAnswer.UNKNOWN_REF:
                break
        # Never seen, or no answer: reverse, so a late arrival at the bank is refused.
        for _ in range(REVERSAL_ATTEMPTS):
            deadline = budget.cut(REVERSAL_DEADLINE_S)
            if deadline is None:
                break
            rev = self.bank.reverse(bank, rec.switch_ref, "no answer in time", deadline)
            if rev.answer is not BankAnswer.NO_ANSWER:
                return BankOutcome(BankAnswer.REVERSED, rev.bank_ref, "reversed after no answer")
        return BankOutcome(BankAnswer.NO_ANSWER, "", "bank unreachable; reversal not confirmed")

    def _decision_of(
        self, rec: PaymentRecord, outcome: BankOutcome
    ) -> tuple[PaymentRecord, StepRecord, list[Posting], bool]:
        """What to write for ``rec`` given the bank's ``outcome``: (record, step,
        balanced postings, whether a reversal is owed)."""
        state = {
            BankAnswer.APPROVED: PaymentState.APPROVED,
            BankAnswer.DECLINED: PaymentState.DECLINED,
            BankAnswer.REVERSED: PaymentState.REVERSED,
            BankAnswer.UNKNOWN_REF: PaymentState.FAILED,
            BankAnswer.NO_ANSWER: PaymentState.FAILED,
        }[outcome.answer]
        if outcome.answer is BankAnswer.REVERSED and rec.state is PaymentState.ROUTED:
            # The bank undid (or never applied) a transfer the switch never approved.
            state = PaymentState.REVERSED
        step = StepRecord(
            STEP_DECIDED,
            PaymentEvent(state, self.clock(), self.zone, outcome.detail),
            outcome.bank_ref,
        )
        postings = postings_for(rec.key, rec.order, state, from_state=PaymentState.ROUTED)
        check_balanced(postings)
        # No answer at all: the switch decides FAILED and owes the bank a reversal, so
        # that a transfer the bank applied unseen is undone and the two agree again.
        owed = outcome.answer is BankAnswer.NO_ANSWER
        return rec, step, list(postings), owed

    def _decide(self, rec: PaymentRecord, outcome: BankOutcome) -> PaymentRecord:
        rec, step, postings, owed = self._decision_of(rec, outcome)
        decided = self.store.decide(rec, step, postings, reversal_owed=owed)
        telemetry.metrics.payment_decided(decided.state.value, rec.order.type.value, self.zone)
        return decided

    def settle_owed_reversals(self, limit: int = OWED_REVERSALS_PER_RUN_MAX) -> int:
        """Send the reversals the switch owes; record each one a bank confirms.

        Safe to run on every node at once: a reversal is idempotent at the bank, and a
        confirmation is a write-once row. Returns how many were confirmed.
        """
        confirmed = 0
        for owed in self.store.owed_reversals(limit):
            bank = self.registry.snapshot().get(owed.bank_id)
            if bank is None:
                continue
            rev = self.bank.reverse(bank, owed.switch_ref, "owed reversal", REVERSAL_DEADLINE_S)
            if rev.answer is not BankAnswer.NO_ANSWER:
                self.store.confirm_reversal(owed, self.clock())
                confirmed += 1
        return confirmed
