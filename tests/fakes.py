"""In-memory fakes of the switch's ports, for unit tests only.

* :class:`FakeClock` reads integer microseconds and only moves when told to;
  :meth:`FakeClock.sleep` advances it instead of sleeping.
* :class:`FakePaymentStore` keeps records in a dict, as the shard owner's store does in
  memory: ``begin`` of an existing id returns it (``won`` False) and writes nothing;
  ``decide`` writes the decision step and the postings together and returns the decided
  record, and a second decision leaves the first one standing; ``abandon`` hands a
  payment left undecided to ``on_unresolved``. Any method can be told to raise
  ``Unavailable`` on its next calls, with or without its write landing first (a write
  that was stored but not acknowledged).
* :class:`FakeLedger` is the shard ledger (:class:`~clearinghouse.switch.ports.LedgerStore`)
  as Cassandra holds it: fences per shard, seals, entries per (shard, epoch), a commit
  that stores every entry and then reports, per shard, whether the shard's highest fence
  is still the writer's epoch. A commit can be made to fail, or to let something happen
  between its write and its fence check.
* :class:`FakeBank` keeps a ledger per ``switch_ref``, answers from a script per
  reference (or a default), and spends the caller's deadline on the fake clock whenever
  it does not answer.
* :class:`FakeCqlSession` is a Cassandra session in memory for the statements of the
  storage classes that run over it (:class:`~clearinghouse.storage.windows.
  CassandraWindows`, the time index of :class:`~clearinghouse.storage.ledger.
  CassandraLedger`): the real classes run unchanged, ``LIMIT``, clustering order and
  ``IF NOT EXISTS`` included, so a query that reads the wrong rows fails here too.
  :func:`fake_windows` is ``CassandraWindows`` over one; ``CassandraRevocations`` runs
  over one too.

The fakes check their callers' obvious mistakes with ``invariant`` and count every call,
so tests can assert on exactly what the code under test did.
"""

from __future__ import annotations

import enum
import re
import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Any

import grpc

from clearing.v1 import common_pb2
from clearinghouse._invariant import invariant
from clearinghouse.domain import (
    ClearingError,
    Participant,
    PaymentEvent,
    PaymentOrder,
    PaymentState,
    PaymentType,
    Posting,
    Unavailable,
    fingerprint,
)
from clearinghouse.domain.chain import LedgerEntry
from clearinghouse.domain.entries import KIND_WINDOW_CUT
from clearinghouse.domain.errors import ERROR_METADATA_KEY
from clearinghouse.storage.ledger import SEQ_MAX
from clearinghouse.storage.windows import CassandraWindows
from clearinghouse.switch.ports import (
    BankAnswer,
    BankOutcome,
    BankTransfer,
    IndexRow,
    OwedReversal,
    Seal,
    ShardWrite,
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


def _storage_down(what: str) -> Unavailable:
    return Unavailable(
        f"fake storage lost quorum during {what}",
        retry_after_ms=OUTAGE_RETRY_AFTER_MS,
        reason=Unavailable.STORAGE_QUORUM_LOST,
    )


# -- the payment store -----------------------------------------------------------------


class FakePaymentStore:
    """A dict-backed :class:`~clearinghouse.switch.ports.PaymentStore`.

    ``records`` maps (institution_id, payment_id) to the stored record; ``postings`` is
    every posting written, in order; ``decisions`` every (payment_key, step) that
    ``decide`` wrote, in order; ``abandoned`` every record passed to ``abandon``;
    ``unresolved`` what ``abandon`` handed on (through ``on_unresolved``, replaceable as
    on the real store); ``calls`` counts calls per method, failed ones included.
    ``latency_s[method]`` advances the clock on each call of ``method``. Each stored
    change gets the next ``ledger_seq`` of its shard, as the shard's chain would.
    """

    def __init__(self, clock: FakeClock | None = None) -> None:
        self.records: dict[tuple[str, str], PaymentRecord] = {}
        self.postings: list[Posting] = []
        self.decisions: list[tuple[str, StepRecord]] = []
        self.owed: list[OwedReversal] = []
        self.confirmed: dict[str, int] = {}
        self.abandoned: list[PaymentRecord] = []
        self.unresolved: list[PaymentRecord] = []
        self.on_unresolved: Callable[[PaymentRecord], None] = self.unresolved.append
        self.calls: Counter[str] = Counter()
        self.latency_s: dict[str, float] = {}
        self._clock = clock
        self._seqs: Counter[int] = Counter()
        # Per method, one entry per pending outage: whether the write lands before the
        # error (it was stored, but its acknowledgement never came).
        self._outages: dict[str, list[bool]] = {}
        self._slip_in: PaymentRecord | None = None

    # -- test controls -----------------------------------------------------------------

    def fail_next(self, method: str, times: int = 1, *, applied: bool = False) -> None:
        """Make the next ``times`` calls of ``method`` raise ``Unavailable``.

        With ``applied``, a write (``begin``, ``decide``) takes effect before the error.
        """
        invariant(method in ("load", "begin", "decide"), f"no method {method!r}")
        invariant(times > 0, "times must be positive")
        self._outages.setdefault(method, []).extend([applied] * times)

    def clear_outages(self) -> None:
        self._outages.clear()

    def slip_in_before_next_begin(self, record: PaymentRecord) -> None:
        """Store ``record`` just before the next ``begin`` runs: another attempt won."""
        self._slip_in = record

    def postings_of(self, key: str) -> list[Posting]:
        return [p for p in self.postings if p.payment_key == key]

    def undecided(self) -> list[PaymentRecord]:
        """What a new owner of the shards would hand to the resolver at takeover."""
        return [r for r in self.records.values() if not r.is_final]

    # -- the port ----------------------------------------------------------------------

    def load(self, institution_id: str, payment_id: str) -> PaymentRecord | None:
        self._enter("load")
        if self._pending_outage("load") is not None:
            raise _storage_down("load")
        return self.records.get((institution_id, payment_id))

    def begin(self, record: PaymentRecord) -> tuple[PaymentRecord, bool]:
        self._enter("begin")
        invariant(
            [s.step for s in record.steps] == [STEP_RECEIVED, STEP_ROUTED],
            f"{record.key}: begin writes exactly the RECEIVED and ROUTED steps",
        )
        invariant(record.ledger_seq == 0, f"{record.key}: a new payment has no ledger entry")
        if self._slip_in is not None:
            other, self._slip_in = self._slip_in, None
            self.records.setdefault(_key_of(other), other)
        fail_applied = self._pending_outage("begin")
        if fail_applied is False:
            raise _storage_down("begin")
        key = _key_of(record)
        stored = self.records.get(key)
        won = stored is None
        if stored is None:
            stored = replace(record, ledger_seq=self._next_seq(record.shard))
            self.records[key] = stored
        if fail_applied:
            raise _storage_down("begin")
        return stored, won

    def decide(
        self,
        record: PaymentRecord,
        step: StepRecord,
        postings: Sequence[Posting],
        *,
        reversal_owed: bool = False,
    ) -> PaymentRecord:
        self._enter("decide")
        key = _key_of(record)
        stored = self.records.get(key)
        invariant(stored is not None, f"{record.key}: decided before it was begun")
        assert stored is not None
        invariant(
            step.step == STEP_DECIDED and step.event.state.is_final,
            f"{record.key}: a decision is a final DECIDED step, not {step}",
        )
        invariant(
            all(p.payment_key == record.key for p in postings),
            f"{record.key}: postings of another payment",
        )
        fail_applied = self._pending_outage("decide")
        if fail_applied is False:
            raise _storage_down("decide")
        if not stored.is_final:  # a second decision never replaces the first
            stored = replace(stored.with_step(step), ledger_seq=self._next_seq(stored.shard))
            self.records[key] = stored
            self.postings.extend(postings)
            self.decisions.append((record.key, step))
            if reversal_owed:
                self.owed.append(OwedReversal(record.key, record.bank_id, record.switch_ref, 0))
        if fail_applied:
            raise _storage_down("decide")
        return stored

    def begin_many(
        self, records: Sequence[PaymentRecord], *, wait_in_flight: bool = False
    ) -> list[tuple[PaymentRecord, bool] | ClearingError]:
        out: list[tuple[PaymentRecord, bool] | ClearingError] = []
        for rec in records:
            try:
                out.append(self.begin(rec))
            except ClearingError as e:
                out.append(e)
        return out

    def decide_many(
        self, decisions: Sequence[tuple[PaymentRecord, StepRecord, Sequence[Posting], bool]]
    ) -> list[PaymentRecord | ClearingError]:
        out: list[PaymentRecord | ClearingError] = []
        for rec, step, postings, owed in decisions:
            try:
                out.append(self.decide(rec, step, postings, reversal_owed=owed))
            except ClearingError as e:
                out.append(e)
        return out

    def abandon(self, record: PaymentRecord) -> None:
        self._enter("abandon")
        self.abandoned.append(record)
        stored = self.records.get(_key_of(record))
        if stored is not None and not stored.is_final:
            self.on_unresolved(stored)

    def owed_reversals(self, limit: int) -> list[OwedReversal]:
        return [o for o in self.owed if o.payment_key not in self.confirmed][:limit]

    def confirm_reversal(self, owed: OwedReversal, at_us: int) -> None:
        self.confirmed[owed.payment_key] = at_us

    # -- internals ---------------------------------------------------------------------

    def _enter(self, method: str) -> None:
        self.calls[method] += 1
        _advance(self._clock, self.latency_s.get(method, 0.0))

    def _pending_outage(self, method: str) -> bool | None:
        queue = self._outages.get(method)
        return queue.pop(0) if queue else None

    def _next_seq(self, shard: int) -> int:
        self._seqs[shard] += 1
        return self._seqs[shard]


def _key_of(record: PaymentRecord) -> tuple[str, str]:
    return record.order.institution_id, record.order.payment_id


def begun_record(
    order: PaymentOrder,
    *,
    at_us: int,
    zone: str,
    decided: PaymentState | None = None,
    bank_ref: str = "",
) -> PaymentRecord:
    """The record an attempt in ``zone`` passes to ``begin`` at ``at_us``, as the
    processor builds it; with ``decided``, also the decision that attempt wrote."""
    bank_id = order.payer_id if order.type is PaymentType.DEBIT else order.payee_id
    rec = PaymentRecord(
        order=order,
        fingerprint=fingerprint(order),
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


# -- the shard ledger ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CommitRecord:
    """One shard's part of a group commit as the fake ledger saw it."""

    write: ShardWrite
    acknowledged: bool


class FakeLedger:
    """An in-memory :class:`~clearinghouse.switch.ports.LedgerStore`, safe across threads.

    ``fences[shard]`` maps each fenced epoch to the node that raised it; ``stored[(shard,
    epoch)]`` maps seq to entry; ``index_rows`` is every time-index row written (by
    ``index``, which the indexer calls; ``marks`` how far it marked the index written);
    ``commits`` every shard write with whether it was acknowledged. ``entries`` reads a
    partition as Cassandra's reader does: from a seq on, as long as seqs are contiguous.

    ``commit`` stores every write, then (unless a failure was injected) runs
    ``between_write_and_check`` if set, then reads the fences: a shard's commit is
    acknowledged only if its highest fence is still the writer's epoch.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.fences: defaultdict[int, dict[int, str]] = defaultdict(dict)
        self._seals: defaultdict[int, dict[int, Seal]] = defaultdict(dict)
        self.stored: defaultdict[tuple[int, int], dict[int, LedgerEntry]] = defaultdict(dict)
        self.index_rows: list[IndexRow] = []
        # (shard, epoch) -> the seq through which the time index is marked written
        self.marks: dict[tuple[int, int], int] = {}
        self.commits: list[CommitRecord] = []
        self.calls: Counter[str] = Counter()
        self.between_write_and_check: Callable[[Sequence[ShardWrite]], None] | None = None
        self._commit_failures: list[tuple[bool, int | None]] = []
        self._failures: Counter[str] = Counter()
        # Where each committed entry went, as a stream's block: each commit is a block
        # of its own. ``entries(from_block=...)`` sees only what is at or after it, as a
        # Cassandra reader starting at that block does.
        self.block_of: dict[tuple[int, int, int], int] = {}
        self._blocks = 0

    # -- test controls -----------------------------------------------------------------

    def fail_next(self, method: str, times: int = 1) -> None:
        """The next ``times`` calls of a takeover method raise ``Unavailable``."""
        invariant(
            method in ("fence", "seals", "write_seal", "entries", "index", "mark_indexed"),
            f"no method {method!r}",
        )
        with self._lock:
            self._failures[method] += times

    def fail_next_commit(
        self, times: int = 1, *, applied: bool = False, shard: int | None = None
    ) -> None:
        """The next ``times`` commits (that write ``shard``, if given) raise
        ``Unavailable``; with ``applied``, after their entries were stored (a write that
        landed but was never acknowledged)."""
        with self._lock:
            self._commit_failures.extend([(applied, shard)] * times)

    def max_fence(self, shard: int) -> int:
        with self._lock:
            return max(self.fences[shard], default=0)

    def partition(self, shard: int, epoch: int) -> list[LedgerEntry]:
        """Every entry stored in the (shard, epoch) partition, holes and all, by seq."""
        with self._lock:
            part = self.stored[(shard, epoch)]
            return [part[s] for s in sorted(part)]

    def replica(self) -> FakeLedger:
        """A copy of what is stored (entries, fences, seals), as one city's replica of
        it: changing one copy leaves the other as it was."""
        other = FakeLedger()
        with self._lock:
            for key, part in self.stored.items():
                other.stored[key] = dict(part)
            for shard, fences in self.fences.items():
                other.fences[shard] = dict(fences)
            for shard, seals in self._seals.items():
                other._seals[shard] = dict(seals)
            other.block_of = dict(self.block_of)
            other._blocks = self._blocks
        return other

    def drop(self, shard: int, epoch: int, seq: int) -> None:
        """Lose a stored entry, as a replica that missed its write would."""
        with self._lock:
            del self.stored[(shard, epoch)][seq]

    def tamper(self, shard: int, epoch: int, seq: int, body: bytes) -> None:
        """Change a stored entry's body behind its hash, as corruption would."""
        with self._lock:
            e = self.stored[(shard, epoch)][seq]
            self.stored[(shard, epoch)][seq] = replace(e, body=body)

    # -- the port ----------------------------------------------------------------------

    def fence(self, shard: int, epoch: int, node_id: str, at_us: int) -> None:
        with self._lock:
            self._enter("fence")
            invariant(epoch > 0, f"shard {shard}: epochs start at 1, not {epoch}")
            invariant(
                self.fences[shard].get(epoch, node_id) == node_id,
                f"shard {shard}: epoch {epoch} fenced by two nodes",
            )
            self.fences[shard][epoch] = node_id

    def seals(self, shard: int) -> list[Seal]:
        with self._lock:
            self._enter("seals")
            return list(self._seals[shard].values())

    def write_seal(self, seal: Seal, node_id: str, at_us: int) -> None:
        with self._lock:
            self._enter("write_seal")
            invariant(
                self.fences[seal.shard].get(seal.epoch) == node_id,
                f"shard {seal.shard}: seal of epoch {seal.epoch} before its fence",
            )
            self._seals[seal.shard][seal.epoch] = seal

    def rows(self, shard: int, epoch: int, from_seq: int, to_seq: int) -> list[LedgerEntry]:
        """The stored rows of ``(shard, epoch)`` with ``from_seq <= seq <= to_seq``,
        holes and all (as ``CassandraLedger.rows`` reads one city's replica)."""
        with self._lock:
            self._enter("rows")
            part = self.stored.get((shard, epoch), {})
            return [part[q] for q in sorted(part) if from_seq <= q <= to_seq]

    def entries(
        self,
        shard: int,
        epoch: int,
        from_seq: int,
        until_seq: int | None = None,
        *,
        from_block: int | None = None,
    ) -> list[LedgerEntry]:
        with self._lock:
            self._enter("entries")
            part = self.stored[(shard, epoch)]
            out: list[LedgerEntry] = []
            seq = from_seq
            while seq in part and (until_seq is None or seq <= until_seq):
                if (
                    from_block is not None
                    and self.block_of.get((shard, epoch, seq), 0) < from_block
                ):
                    break  # stored before the block the read starts at: not seen
                out.append(part[seq])
                seq += 1
            # What a Cassandra reader decodes for this: every entry of the partition from
            # the block it starts at (the epoch's first without from_block) to until_seq.
            start, last = from_block or 0, SEQ_MAX if until_seq is None else until_seq
            self.calls["entries_scanned"] += sum(
                1 for q in part if q <= last and self.block_of.get((shard, epoch, q), 0) >= start
            )
            return out

    def cut_block(self, shard: int, epoch: int, seq: int) -> int | None:
        with self._lock:
            e = self.stored.get((shard, epoch), {}).get(seq)
            if e is None or e.kind != KIND_WINDOW_CUT:
                return None
            return self.block_of.get((shard, epoch, seq))

    def commit(self, writes: Sequence[ShardWrite]) -> dict[int, bool]:
        with self._lock:
            self.calls["commit"] += 1
            failure = self._pending_commit_failure({w.shard for w in writes})
            if failure is False:
                raise _storage_down("commit")
            self._blocks += 1
            for w in writes:
                part = self.stored[(w.shard, w.epoch)]
                for e in w.entries:
                    self.block_of.setdefault((e.shard, e.epoch, e.seq), self._blocks)
                    invariant(
                        (e.shard, e.epoch) == (w.shard, w.epoch),
                        f"entry of shard {e.shard} epoch {e.epoch} in the write of "
                        f"shard {w.shard} epoch {w.epoch}",
                    )
                    invariant(
                        part.get(e.seq, e) == e,
                        f"shard {w.shard} epoch {w.epoch}: seq {e.seq} written twice",
                    )
                    part[e.seq] = e
            if failure:
                raise _storage_down("commit")
        if self.between_write_and_check is not None:
            self.between_write_and_check(writes)
        with self._lock:
            acked = {w.shard: max(self.fences[w.shard], default=0) == w.epoch for w in writes}
            self.commits += [CommitRecord(w, acked[w.shard]) for w in writes]
            return acked

    def index(self, rows: Sequence[IndexRow]) -> None:
        with self._lock:
            self._enter("index")
            self.index_rows.extend(rows)

    def mark_indexed(self, marks: Mapping[tuple[int, int], int], at_us: int) -> None:
        with self._lock:
            self._enter("mark_indexed")
            for key, seq in marks.items():
                self.marks[key] = max(seq, self.marks.get(key, 0))

    def index_marks(self, shard: int) -> dict[int, int]:
        with self._lock:
            self._enter("index_marks")
            return {epoch: seq for (s, epoch), seq in self.marks.items() if s == shard}

    # -- internals ---------------------------------------------------------------------

    def _pending_commit_failure(self, shards: set[int]) -> bool | None:  # with the lock held
        for i, (applied, shard) in enumerate(self._commit_failures):
            if shard is None or shard in shards:
                del self._commit_failures[i]
                return applied
        return None

    def _enter(self, method: str) -> None:  # with the lock held
        self.calls[method] += 1
        if self._failures[method] > 0:
            self._failures[method] -= 1
            raise _storage_down(method)


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
        self.batches: list[int] = []
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

    def transfer_many(
        self, bank: Participant, reqs: Sequence[BankTransfer], deadline_s: float
    ) -> list[BankOutcome]:
        """As the real gateway's batch: each transfer as ``transfer`` would answer it.
        ``batches`` records the size of each call."""
        self.batches.append(len(reqs))
        return [self.transfer(bank, r, deadline_s) for r in reqs]

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


# -- Cassandra, for the storage classes ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class TableSpec:
    """A table's primary key: partition key columns, then clustering columns with
    whether each is in descending order."""

    partition: tuple[str, ...]
    clustering: tuple[tuple[str, bool], ...]

    @property
    def key(self) -> tuple[str, ...]:
        return self.partition + tuple(c for c, _ in self.clustering)


# The tables of services/clearinghouse/storage/cql that the fake session holds.
FAKE_CQL_TABLES: dict[str, TableSpec] = {
    "settlement_windows": TableSpec(("bucket",), (("window_id", True), ("event", False))),
    "window_cuts": TableSpec(("window_id",), (("shard", False),)),
    "window_clearing": TableSpec(("window_id",), (("part", False),)),
    "payments_by_participant": TableSpec(
        ("participant_id", "day"),
        (("received_at_us", False), ("institution_id", False), ("payment_id", False)),
    ),
    "revoked_certificates": TableSpec(("bucket",), (("serial", False),)),
    # No longer written (009 replaced it); here so that code still using it runs.
    "payments_by_time": TableSpec(
        ("institution_id", "day"), (("received_at_us", False), ("payment_id", False))
    ),
}

_INSERT = re.compile(
    r"INSERT INTO (\w+) \(([^)]*)\) VALUES \(([^)]*)\)( IF NOT EXISTS)?", re.IGNORECASE
)
_SELECT = re.compile(r"SELECT (.+?) FROM (\w+) WHERE (.+?)(?: LIMIT (\?))?", re.IGNORECASE)
_CONDITION = re.compile(r"(\(?[\w, ]+?\)?) (=|<|>|<=|>=) (\(?[?, ]+\)?)")


@dataclass
class FakeStatement:
    """A prepared statement: its CQL and the attributes the storage classes set."""

    cql: str
    consistency_level: Any = None
    serial_consistency_level: Any = None
    is_idempotent: bool = False
    fetch_size: int | None = None


class FakeResult(list[Any]):
    """Rows, and ``was_applied`` for a conditional insert."""

    was_applied: bool = True

    def one(self) -> Any:
        return self[0] if self else None


def _names(text: str) -> list[str]:
    return [c.strip() for c in text.strip("() ").split(",")]


@dataclass
class FakeCqlSession:
    """The statements of the storage classes over :data:`FAKE_CQL_TABLES`, in memory.

    ``INSERT`` (``IF NOT EXISTS`` applies only if the row is absent; otherwise an insert
    overwrites its columns, as Cassandra's upsert does) and ``SELECT`` with a partition
    key, ``=``/``<``/``>`` conditions (a column or a tuple of clustering columns) and
    ``LIMIT ?``, rows in clustering order. Anything else fails the test loudly.
    ``executed`` counts statements by table.
    """

    tables: dict[str, dict[tuple[Any, ...], dict[str, Any]]] = field(
        default_factory=lambda: {name: {} for name in FAKE_CQL_TABLES}
    )
    executed: Counter[str] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def prepare(self, cql: str) -> FakeStatement:
        return FakeStatement(" ".join(cql.split()))

    def execute(self, stmt: FakeStatement, values: Sequence[Any] = ()) -> FakeResult:
        with self._lock:
            if m := _INSERT.fullmatch(stmt.cql):
                return self._insert(m, list(values))
            if m := _SELECT.fullmatch(stmt.cql):
                return self._select(m, list(values))
        invariant(False, f"the fake session does not know {stmt.cql!r}")
        raise AssertionError("unreachable")

    def _table(self, name: str) -> tuple[TableSpec, dict[tuple[Any, ...], dict[str, Any]]]:
        invariant(name in FAKE_CQL_TABLES, f"the fake session has no table {name!r}")
        self.executed[name] += 1
        return FAKE_CQL_TABLES[name], self.tables[name]

    def _insert(self, m: re.Match[str], values: list[Any]) -> FakeResult:
        spec, rows = self._table(m.group(1))
        cols = _names(m.group(2))
        invariant(len(cols) == len(values), f"{len(values)} values for {cols}")
        row = dict(zip(cols, values, strict=True))
        key = tuple(row[c] for c in spec.key)
        invariant(None not in key, f"a primary key column is null in {row}")
        out = FakeResult()
        if m.group(4) and key in rows:
            out.was_applied = False
            return out
        rows.setdefault(key, {}).update(row)
        return out

    def _select(self, m: re.Match[str], values: list[Any]) -> FakeResult:
        spec, rows = self._table(m.group(2))
        cols = _names(m.group(1))
        tests: list[Callable[[dict[str, Any]], bool]] = []
        for cond in m.group(3).split(" AND "):
            c = _CONDITION.fullmatch(cond.strip())
            invariant(c is not None, f"the fake session cannot read the condition {cond!r}")
            assert c is not None
            left, op, right = _names(c.group(1)), c.group(2), _names(c.group(3))
            bound = tuple(values.pop(0) for _ in right)
            tests.append(_comparison(left, op, bound))
        limit = values.pop(0) if m.group(4) else None
        invariant(not values, f"values left over: {values}")
        found = [r for r in rows.values() if all(t(r) for t in tests)]
        for col, desc in reversed(spec.clustering):
            found.sort(key=lambda r, c=col: r[c], reverse=desc)
        found.sort(key=lambda r: tuple(r[c] for c in spec.partition))
        out = FakeResult(SimpleNamespace(**{c: r.get(c) for c in cols}) for r in found[:limit])
        return out


def _comparison(
    columns: list[str], op: str, bound: tuple[Any, ...]
) -> Callable[[dict[str, Any]], bool]:
    def test(row: dict[str, Any]) -> bool:
        have = tuple(row.get(c) for c in columns)
        return {
            "=": have == bound, "<": have < bound, ">": have > bound,
            "<=": have <= bound, ">=": have >= bound,
        }[op]  # fmt: skip

    return test


class Aborted(Exception):
    """What :meth:`FakeServicerContext.abort` raises, as grpc's own abort does."""


class FakeServicerContext:
    """What a servicer uses of a grpc.ServicerContext: abort, trailers, time left. The
    refusal's code and its clearing.v1.Error (from the trailer) are kept for the test."""

    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None
        self.error: common_pb2.Error | None = None

    def time_remaining(self) -> float:
        return 30.0

    def set_trailing_metadata(self, md: Any) -> None:
        for key, value in md:
            if key == ERROR_METADATA_KEY:
                self.error = common_pb2.Error.FromString(value)

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code = code
        raise Aborted(details)


def fake_windows(session: FakeCqlSession | None = None) -> CassandraWindows:
    """The real :class:`CassandraWindows` over a :class:`FakeCqlSession`."""
    return CassandraWindows(session if session is not None else FakeCqlSession())


__all__ = [
    "FAKE_CQL_TABLES",
    "OUTAGE_RETRY_AFTER_MS",
    "REVERSED_BEFORE_ARRIVAL",
    "START_US",
    "Aborted",
    "BankCall",
    "CommitRecord",
    "FakeBank",
    "FakeClock",
    "FakeCqlSession",
    "FakeLedger",
    "FakePaymentStore",
    "FakeServicerContext",
    "Reply",
    "begun_record",
    "fake_windows",
]
