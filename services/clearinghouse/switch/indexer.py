"""The time index, written apart from the group commit.

Listing a participant's payments by time needs rows keyed by participant
(``payments_by_participant``). Writing them inside each group commit would add one
Cassandra partition per participant to every commit, several times the commit's own
single write; instead the committer hands the index rows of every acknowledged commit to
this node's :class:`Indexer`, which writes what it holds every :data:`INDEX_FLUSH_S`
(one batch per participant and day) and then marks, per shard and epoch, the seq up to
which the index is complete (``index_marks``, one write for every shard of the flush).

A listing therefore lags the acknowledgement by about a flush; the ledger itself, and
``GetPayment``, never lag. What an owner acknowledged but had not indexed when it died
is indexed by the shard's next owner: at takeover it re-indexes every intent of the
chain past its epoch's mark (:func:`unindexed`). Index rows are idempotent (the same
row lands on the same key), so indexing twice is harmless.

Bounded: about :data:`INDEX_QUEUE_ROWS_MAX` rows wait (a flush that failed puts its
rows back beside those queued meanwhile). When the queue is full (the index's writes
keep failing) the committer's rows are dropped at once (re-indexing at takeover waits
up to :data:`INDEX_FULL_WAIT_S` first): the shard's mark stops before them, and the
shard's next owner re-indexes them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from clearinghouse import telemetry
from clearinghouse.domain import ClearingError
from clearinghouse.domain.chain import LedgerEntry
from clearinghouse.domain.entries import KIND_INTENT, Intent
from clearinghouse.switch.ports import IndexRow, LedgerStore

log = logging.getLogger(__name__)

INDEX_FLUSH_S = 1.0
INDEX_QUEUE_ROWS_MAX = 200_000
INDEX_FULL_WAIT_S = 2.0
# After a failed flush the indexer waits this long before it tries again.
INDEX_RETRY_S = 1.0

Clock = Callable[[], int]


def index_rows_of(
    institution_id: str, payment_id: str, bank_id: str, received_at_us: int
) -> tuple[IndexRow, IndexRow]:
    """A payment's two index rows: under its institution, and under its bank."""
    return (
        IndexRow(institution_id, payment_id, received_at_us),
        IndexRow(institution_id, payment_id, received_at_us, bank_id),
    )


# A new owner hands what it re-indexes to the indexer in parts of this many rows.
REINDEX_CHUNK_ROWS = 10_000


def unindexed(entries: Sequence[LedgerEntry], marks: dict[int, int]) -> list[LedgerEntry]:
    """The INTENT entries of a chain that lie past their epoch's index mark."""
    return [e for e in entries if e.kind == KIND_INTENT and e.seq > marks.get(e.epoch, 0)]


def rows_of_intent(entry: LedgerEntry) -> tuple[IndexRow, IndexRow]:
    intent = Intent.decode(entry.body)
    institution_id, _, payment_id = entry.payment_key.partition("/")
    return index_rows_of(institution_id, payment_id, intent.bank_id, intent.received_at_us)


@dataclass
class _Held:
    rows: list[IndexRow]
    # (shard, epoch) -> the highest seq whose rows are held (or written, once flushed)
    through: dict[tuple[int, int], int]


class Indexer:
    """Writes index rows in the background; see the module docstring."""

    def __init__(self, ledger: LedgerStore, clock: Clock, *, flush_s: float = INDEX_FLUSH_S,
                 queue_rows_max: int = INDEX_QUEUE_ROWS_MAX) -> None:  # fmt: skip
        self.ledger = ledger
        self.clock = clock
        self.flush_s = flush_s
        self.queue_rows_max = queue_rows_max
        self._cond = threading.Condition()
        self._held = _Held([], {})
        # (shard, epoch) -> the first seq whose rows were dropped: never marked past it.
        self._dropped_from: dict[tuple[int, int], int] = {}
        self._flush_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.rows_written = 0
        self.rows_dropped = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="indexer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Flush what is held (bounded by the storage retries) and stop."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(self.flush_s + 10.0)
        self._flush_quietly()

    def add(
        self,
        shard: int,
        epoch: int,
        first_seq: int,
        through_seq: int,
        rows: Sequence[IndexRow],
        *,
        wait_s: float = INDEX_FULL_WAIT_S,
    ) -> None:
        """Rows of the entries ``first_seq``..``through_seq`` of ``(shard, epoch)``, all
        acknowledged in the ledger. Waits up to ``wait_s`` for room; then drops them, and
        the shard's mark never passes ``first_seq`` again (its next owner re-indexes)."""
        key = (shard, epoch)
        with self._cond:
            deadline = time.monotonic() + wait_s
            while len(self._held.rows) + len(rows) > self.queue_rows_max:
                left = deadline - time.monotonic()
                if left <= 0 or self._stop.is_set():
                    first = self._dropped_from.get(key)
                    self._dropped_from[key] = first_seq if first is None else min(first, first_seq)
                    self.rows_dropped += len(rows)
                    log.error(
                        "time index queue full: %d rows of shard %d dropped (its next owner "
                        "re-indexes them)", len(rows), shard,
                    )  # fmt: skip
                    return
                self._cond.wait(left)
            self._held.rows.extend(rows)
            if through_seq > self._held.through.get(key, 0):
                self._held.through[key] = through_seq

    def flush(self) -> None:
        """Write every held row, then the marks; raises the domain's Unavailable (the rows
        stay held for the next flush)."""
        with self._flush_lock:
            with self._cond:
                held, self._held = self._held, _Held([], {})
            try:
                if held.rows:
                    self.ledger.index(held.rows)
                marks = {
                    key: min(seq, self._dropped_from[key] - 1) if key in self._dropped_from else seq
                    for key, seq in held.through.items()
                }
                self.ledger.mark_indexed(marks, self.clock())
            except Exception:  # storage down, or a driver error we did not expect
                with self._cond:  # put them back in front, for the next flush
                    self._held.rows[:0] = held.rows
                    for key, seq in held.through.items():
                        self._held.through[key] = max(seq, self._held.through.get(key, 0))
                raise
            self.rows_written += len(held.rows)
            with self._cond:
                self._cond.notify_all()

    def _flush_quietly(self) -> bool:
        try:
            with telemetry.span("ledger.index"):
                self.flush()
            return True
        except ClearingError as e:
            log.warning("writing the time index failed (kept for the next flush): %s", e)
            return False
        except Exception:  # a bug or an unexpected driver error: the thread lives on
            log.exception("writing the time index failed (kept for the next flush)")
            return False

    def _run(self) -> None:
        while not self._stop.wait(self.flush_s):
            if not self._flush_quietly():
                self._stop.wait(INDEX_RETRY_S)


__all__ = [
    "INDEX_FLUSH_S",
    "REINDEX_CHUNK_ROWS",
    "Indexer",
    "index_rows_of",
    "rows_of_intent",
    "unindexed",
]
