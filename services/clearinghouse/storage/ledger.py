"""The shard ledger on Cassandra: streams of entries, fences, seals, and the time index.

All statements are prepared once and run at the topology's consistency (QUORUM: two
cities).

**Streams.** Each switch process writes what it commits into its own *stream*
(``ledger_stream``, migration 010): every entry of every shard it owns, in partitions
``(stream, block)``, one row per shard and commit holding the shard's new entries as
one run (:func:`encode_run`), clustered by ``(shard, epoch, first_seq)``. A group
commit is therefore one single-partition batch, one mutation for Cassandra, however
many shards it touches, and a row per shard rather than per entry (the driver binds,
and Cassandra stores, a few cells instead of ten per entry); a new block starts at a
commit boundary once the current one holds :data:`STREAM_BLOCK_ENTRIES_MAX` entries.
An owner's seal names its stream and the block it started in, so a shard's part of the
chain written at one epoch is read back as slices of that stream's blocks. Seals
written before streams existed have none; their entries are read from
``ledger_entries`` (migration 004) as before.

:meth:`CassandraLedger.commit` is the group commit's storage half: it writes the round,
waits for it, and only then reads the fences, so a shard's commit is reported
acknowledged only if its write completed *before* a fence read that still found the
writer's epoch on top (see docs/ARCHITECTURE.md, "Fencing"). The time index is written
apart from the commit (:meth:`CassandraLedger.index`, from the node's indexer).
"""

from __future__ import annotations

import base64
import secrets
import struct
import threading
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cassandra import ConsistencyLevel
from cassandra.query import BatchStatement, BatchType

from clearinghouse._invariant import InvariantViolation, invariant
from clearinghouse.domain import FieldViolation, InvalidArgument
from clearinghouse.domain import Unavailable as DomainUnavailable
from clearinghouse.domain.chain import LedgerEntry
from clearinghouse.domain.entries import KIND_WINDOW_CUT
from clearinghouse.storage.retry import TRANSIENT, with_retries
from clearinghouse.switch.ports import IndexRow, Seal, ShardWrite

# Entries per block of a stream (a block is one Cassandra partition): about 10-15 MiB.
# Reading a shard's part of the chain costs a query per block of its owner's stream.
STREAM_BLOCK_ENTRIES_MAX = 32_768
SEQ_MAX = 2**63 - 1
# Entries per partition of the legacy ledger_entries table (migration 004).
LEGACY_BLOCK_ENTRIES = 4096
FENCE_BUCKET = 0
DAY_US = 86_400 * 1_000_000
LIST_DAYS_MAX = 31
# Rows fetched per page when a chain is read back: entries of a legacy chain, runs
# (up to a commit's entries each) of a stream.
READ_PAGE_ROWS = 1000
READ_PAGE_RUNS = 50
COMMIT_WRITE_TIMEOUT_S = 5.0
# The mark of a chain part whose index rows were written in its commits (before streams).
INDEXED_IN_COMMIT = SEQ_MAX
# Blocks of WINDOW_CUT entries remembered per shard (a window cuts each shard once): the
# newest 32 cuts of each, about 100 KiB for 128 shards.
CUT_BLOCKS_PER_SHARD = 32
# The one partition of index_marks (migration 010).
MARKS_BUCKET = 0
# Time-index rows per batch (one partition each): bounded, whatever the indexer holds.
INDEX_BATCH_ROWS_MAX = 500


def day_of(at_us: int) -> int:
    t = time.gmtime(at_us // 1_000_000)
    return t.tm_year * 10000 + t.tm_mon * 100 + t.tm_mday


def legacy_block_of(seq: int) -> int:
    return seq // LEGACY_BLOCK_ENTRIES


# A run of entries in one stream row, version 1: a version byte, then per entry
# u16 len(kind) u16 len(payment_key) u32 len(body), kind, payment_key, body, prev_hash
# (32 bytes), entry_hash (32 bytes); seqs follow from the row's first_seq.
RUN_FORMAT_V1 = 1
_RUN_HEADER = struct.Struct(">HHI")
_HASH_BYTES = 32


def encode_run(entries: Sequence[LedgerEntry]) -> bytes:
    """The stored form of consecutive entries of one shard and epoch."""
    parts: list[bytes] = [bytes((RUN_FORMAT_V1,))]
    for e in entries:
        kind, key = e.kind.encode(), e.payment_key.encode()
        if not len(e.prev_hash) == len(e.entry_hash) == _HASH_BYTES:  # per entry: no f-string
            raise InvariantViolation(f"seq {e.seq}: hashes are {_HASH_BYTES} bytes")
        parts += (_RUN_HEADER.pack(len(kind), len(key), len(e.body)), kind, key, e.body,
                  e.prev_hash, e.entry_hash)  # fmt: skip
    return b"".join(parts)


def decode_run(shard: int, epoch: int, first_seq: int, data: bytes) -> list[LedgerEntry]:
    """The entries of a stored run; InvariantViolation if the bytes are not one (a
    damaged row is reported as such, never half read)."""
    try:
        return _decode_run(shard, epoch, first_seq, data)
    except UnicodeDecodeError as e:
        raise InvariantViolation(f"shard {shard} from seq {first_seq}: a run's text: {e}") from e


def _decode_run(shard: int, epoch: int, first_seq: int, data: bytes) -> list[LedgerEntry]:
    invariant(data[:1] == bytes((RUN_FORMAT_V1,)), f"shard {shard}: unknown run format")
    out: list[LedgerEntry] = []
    pos, size, seq = 1, len(data), first_seq
    while pos < size:
        end = pos + _RUN_HEADER.size
        if end <= size:
            kind_len, key_len, body_len = _RUN_HEADER.unpack_from(data, pos)
            pos, end = end, end + kind_len + key_len + body_len + 2 * _HASH_BYTES
        if end > size:  # checked per entry: the message is built only when it fails
            raise InvariantViolation(f"shard {shard} seq {seq}: run truncated")
        kind = data[pos : pos + kind_len].decode()
        pos += kind_len
        key = data[pos : pos + key_len].decode()
        pos += key_len
        body = data[pos : pos + body_len]
        pos += body_len
        prev_hash, entry_hash = data[pos : pos + _HASH_BYTES], data[pos + _HASH_BYTES : end]
        out.append(LedgerEntry(shard, epoch, seq, kind, key, body, prev_hash, entry_hash))
        pos, seq = end, seq + 1
    return out


def new_stream_id(prefix: str = "") -> str:
    """A stream name no other process has used: the prefix (the node) and 64 random bits."""
    return f"{prefix}-{secrets.token_hex(8)}" if prefix else secrets.token_hex(8)


class StreamBlocks:
    """Which block of a stream the next commit goes to.

    A commit goes to the current block, or to the next one once the current holds
    ``entries_max`` entries. Only a write that succeeded moves the stream on
    (:meth:`written`): a block is used only after the one before it holds rows, so a
    reader that finds a block with no row has found the stream's end. (The group commit
    writes one round at a time; a failed round leaves the stream where it was.)
    """

    def __init__(self, entries_max: int) -> None:
        invariant(entries_max > 0, "a block holds at least one entry")
        self.entries_max = entries_max
        self._block = 0
        self._held = 0
        self._lock = threading.Lock()

    def current(self) -> int:
        with self._lock:
            return self._block

    def next_for(self, count: int) -> tuple[int, int]:
        """(block, entries it holds before) for a commit of ``count`` entries."""
        with self._lock:
            if self._held and self._held + count > self.entries_max:
                return self._block + 1, 0
            return self._block, self._held

    def written(self, block: int, held: int, count: int) -> None:
        with self._lock:
            invariant(block in (self._block, self._block + 1), "blocks are used in turn")
            self._block, self._held = block, held + count


@dataclass(frozen=True, slots=True)
class StoredRun:
    """One stored row of a stream: a shard's entries of one commit."""

    stream: str
    block: int
    shard: int
    epoch: int
    first_seq: int
    entries: tuple[LedgerEntry, ...]

    @property
    def key(self) -> tuple[str, int, int, int, int]:
        """The row's primary key: (stream, block, shard, epoch, first_seq)."""
        return self.stream, self.block, self.shard, self.epoch, self.first_seq


class CassandraLedger:
    """The :class:`~clearinghouse.switch.ports.LedgerStore` of a switch node (and the
    readers': audit, drills, tests). ``stream`` is where this object's commits go; a
    reader never writes one."""

    def __init__(
        self,
        session: Any,
        consistency: int = ConsistencyLevel.QUORUM,
        *,
        stream: str | None = None,
        block_entries_max: int = STREAM_BLOCK_ENTRIES_MAX,
    ) -> None:
        self.session = session
        self.cl = consistency
        self.stream = stream or new_stream_id()
        self.blocks = StreamBlocks(block_entries_max)
        # (shard, epoch) -> (stream, first block), or None for a chain part in the legacy
        # table. Seals are written once, so what was read stays true.
        self._locations: dict[tuple[int, int], tuple[str, int] | None] = {}
        # shard -> {(epoch, seq): the block holding that WINDOW_CUT entry}, for the newest
        # cuts of each shard this object wrote or read (a window's reader starts there:
        # :meth:`cut_block`). Per shard: a takeover replays shard after shard, each with
        # all its cuts, and must not push out the newest cuts of the shards read first.
        self._cut_blocks: dict[int, dict[tuple[int, int], int]] = {}
        self._cut_blocks_lock = threading.Lock()
        p = session.prepare
        self._insert_stream = p(
            "INSERT INTO ledger_stream (stream, block, shard, epoch, first_seq, last_seq, "
            "run_bytes, at_us) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
        )
        self._select_stream = p(
            "SELECT first_seq, last_seq, run_bytes FROM ledger_stream "
            "WHERE stream = ? AND block = ? AND shard = ? AND epoch = ? AND first_seq <= ?"
        )
        self._select_block_exists = p(
            "SELECT shard FROM ledger_stream WHERE stream = ? AND block = ? LIMIT 1"
        )
        self._select_legacy = p(
            "SELECT seq, kind, payment_key, body, prev_hash, entry_hash FROM ledger_entries "
            "WHERE shard = ? AND epoch = ? AND block = ? AND seq >= ? AND seq <= ?"
        )
        self._insert_fence = p(
            "INSERT INTO shard_fences (bucket, shard, epoch, node_id, at_us) VALUES (?, ?, ?, ?, ?)"
        )
        # The highest fence, one row per shard (migration 011): the epoch is the write
        # timestamp, so Cassandra's last-write-wins keeps the highest. Nothing else may
        # write that table: a DELETE, or a write without USING TIMESTAMP (a clock
        # timestamp, far above any epoch), would pin the shard's top and refuse every
        # later owner's commits.
        self._insert_fence_top = p(
            "INSERT INTO shard_fence_tops (bucket, shard, epoch, node_id, at_us) "
            "VALUES (?, ?, ?, ?, ?) USING TIMESTAMP ?"
        )
        self._select_some_fences = p(
            "SELECT shard, epoch FROM shard_fence_tops WHERE bucket = ? AND shard IN ?"
        )
        self._insert_seal = p(
            "INSERT INTO shard_seals (shard, epoch, prev_epoch, start_seq, start_hash, node_id, "
            "at_us, stream, start_block) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
        )
        self._select_seals = p(
            "SELECT epoch, prev_epoch, start_seq, start_hash, stream, start_block "
            "FROM shard_seals WHERE shard = ?"
        )
        self._select_seal = p(
            "SELECT stream, start_block FROM shard_seals WHERE shard = ? AND epoch = ?"
        )
        # The time index (migration 009): a participant's payments, its own or those
        # routed to it as a bank, keyed on time, institution and payment id.
        self._insert_time = p(
            "INSERT INTO payments_by_participant (participant_id, day, received_at_us, "
            "institution_id, payment_id) VALUES (?, ?, ?, ?, ?)"
        )
        self._select_time = p(
            "SELECT received_at_us, institution_id, payment_id FROM payments_by_participant "
            "WHERE participant_id = ? AND day = ? "
            "AND (received_at_us, institution_id, payment_id) > (?, ?, ?) "
            "AND received_at_us < ? LIMIT ?"
        )
        self._insert_mark = p(
            "INSERT INTO index_marks (bucket, shard, epoch, indexed_through_seq, at_us) "
            "VALUES (?, ?, ?, ?, ?)"
        )
        self._select_marks = p(
            "SELECT epoch, indexed_through_seq FROM index_marks WHERE bucket = ? AND shard = ?"
        )
        for stmt in (
            self._insert_mark, self._select_marks,
            self._insert_stream, self._select_stream, self._select_block_exists,
            self._select_legacy, self._insert_fence, self._insert_fence_top,
            self._select_some_fences,
            self._insert_seal, self._select_seals, self._select_seal, self._insert_time,
            self._select_time,
        ):  # fmt: skip
            stmt.consistency_level = self.cl
            stmt.is_idempotent = True
        self._select_stream.fetch_size = READ_PAGE_RUNS
        self._select_legacy.fetch_size = READ_PAGE_ROWS

    # -- takeover -----------------------------------------------------------------------

    def fence(self, shard: int, epoch: int, node_id: str, at_us: int) -> None:
        """Raise ``shard``'s fence to ``epoch``: its history row, then its top (the row
        commits read), both at the ledger's consistency before the takeover reads."""
        invariant(epoch > 0, f"shard {shard}: a fence's epoch is positive, not {epoch}")
        values = (FENCE_BUCKET, shard, epoch, node_id, at_us)

        def raise_both() -> None:  # idempotent: a retry writes the same rows again
            self.session.execute(self._insert_fence, values)
            self.session.execute(self._insert_fence_top, (*values, epoch))

        with_retries("raising a shard's fence", raise_both)

    def seals(self, shard: int) -> list[Seal]:
        rows = with_retries(
            "reading a shard's seals",
            lambda: list(self.session.execute(self._select_seals, (shard,))),
        )
        for r in rows:
            self._remember(shard, r.epoch, r.stream, r.start_block)
        return [Seal(shard, r.epoch, r.prev_epoch, r.start_seq, r.start_hash) for r in rows]

    def write_seal(self, seal: Seal, node_id: str, at_us: int) -> None:
        """Seal ``seal.epoch``'s part of the chain as this object's: its entries will be
        in this stream, from the current block on (blocks only ever grow)."""
        block = self.blocks.current()
        values = (
            seal.shard, seal.epoch, seal.prev_epoch, seal.start_seq, seal.start_hash,
            node_id, at_us, self.stream, block,
        )  # fmt: skip
        with_retries("sealing a shard", lambda: self.session.execute(self._insert_seal, values))
        self._remember(seal.shard, seal.epoch, self.stream, block)

    def _remember(self, shard: int, epoch: int, stream: str | None, block: int | None) -> None:
        self._locations[(shard, epoch)] = (stream, block or 0) if stream else None

    def _location(self, shard: int, epoch: int) -> tuple[str, int] | None:
        key = (shard, epoch)
        if key not in self._locations:
            row = with_retries(
                "reading a shard's seal",
                lambda: self.session.execute(self._select_seal, key).one(),
            )
            if row is None:
                # No seal here (yet, or not in this replica): read as a part written
                # before streams, which holds nothing for an epoch written since. Not
                # remembered: the seal may arrive.
                return None
            self._remember(shard, epoch, row.stream, row.start_block)
        return self._locations[key]

    def rows(self, shard: int, epoch: int, from_seq: int, to_seq: int) -> list[LedgerEntry]:
        """The rows of ``(shard, epoch)`` with ``from_seq <= seq <= to_seq``, as stored,
        holes and all (no chain check): what this session's replicas hold, for comparing
        replicas."""
        return self._read(shard, epoch, from_seq, to_seq, contiguous=False)

    def entries(
        self,
        shard: int,
        epoch: int,
        from_seq: int,
        until_seq: int | None = None,
        *,
        from_block: int | None = None,
    ) -> list[LedgerEntry]:
        """Entries of ``epoch`` from ``from_seq`` on (up to ``until_seq``, if given: a
        part of the chain whose end the next seal tells), as long as they are
        contiguous. ``from_block``: a block of the epoch's stream that no entry from
        ``from_seq`` on comes before (:meth:`cut_block` of an earlier entry); the read
        starts there instead of at the epoch's first block."""
        last = SEQ_MAX if until_seq is None else until_seq
        return self._read(shard, epoch, from_seq, last, contiguous=True, from_block=from_block)

    def cut_block(self, shard: int, epoch: int, seq: int) -> int | None:
        """The block of this object's stream, or of the stream it read, that holds the
        WINDOW_CUT entry ``(shard, epoch, seq)``; None if it neither wrote nor read it."""
        with self._cut_blocks_lock:
            return self._cut_blocks.get(shard, {}).get((epoch, seq))

    def _saw_cuts(self, block: int, entries: Sequence[LedgerEntry]) -> None:
        cuts = [e for e in entries if e.kind == KIND_WINDOW_CUT]
        if not cuts:
            return
        with self._cut_blocks_lock:
            for e in cuts:
                kept = self._cut_blocks.setdefault(e.shard, {})
                # The first block seen is kept: a lower bound for what comes after it.
                kept.setdefault((e.epoch, e.seq), block)
                if len(kept) > CUT_BLOCKS_PER_SHARD:
                    del kept[min(kept, key=lambda k: k[1])]  # the oldest cut of the shard

    def _read(
        self,
        shard: int,
        epoch: int,
        from_seq: int,
        to_seq: int,
        *,
        contiguous: bool,
        from_block: int | None = None,
    ) -> list[LedgerEntry]:
        where = self._location(shard, epoch)
        if where is None:
            return self._read_legacy(shard, epoch, from_seq, to_seq, contiguous=contiguous)
        stream, block = where
        if from_block is not None:
            block = max(block, from_block)
        out: list[LedgerEntry] = []
        expected = from_seq
        while True:
            runs = self._runs(stream, block, shard, epoch, to_seq)
            for _, run in runs:
                self._saw_cuts(block, run)
                for e in run:
                    if e.seq < expected or e.seq > to_seq:
                        continue
                    if contiguous and e.seq != expected:
                        return out  # a hole: what follows is not part of the chain
                    out.append(e)
                    expected = e.seq + 1
            if expected > to_seq:
                return out
            # A block with rows of this shard is followed by the next one to read; an
            # empty one may be another shard's stretch of the stream, or its end.
            if not runs and not self._block_exists(stream, block + 1):
                return out  # the stream ends here
            block += 1

    def _runs(
        self, stream: str, block: int, shard: int, epoch: int, to_seq: int
    ) -> list[tuple[int, list[LedgerEntry]]]:
        """The runs of ``(shard, epoch)`` in one block that start at or before ``to_seq``,
        decoded, by first seq: (first_seq, entries)."""
        values = (stream, block, shard, epoch, to_seq)
        rows = with_retries(
            "reading a shard's entries",
            lambda: list(self.session.execute(self._select_stream, values)),
        )
        runs = []
        for r in rows:
            invariant(r.run_bytes is not None, f"shard {shard} epoch {epoch}: an empty stored run")
            run = decode_run(shard, epoch, r.first_seq, bytes(r.run_bytes))
            invariant(
                bool(run) and run[-1].seq == r.last_seq,
                f"shard {shard} epoch {epoch}: the run from seq {r.first_seq} holds "
                f"{len(run)} entries, not up to seq {r.last_seq}",
            )
            runs.append((r.first_seq, run))
        return runs

    def _read_legacy(
        self, shard: int, epoch: int, from_seq: int, to_seq: int, *, contiguous: bool
    ) -> list[LedgerEntry]:
        """A chain part written before streams: a row per entry in ledger_entries."""
        out: list[LedgerEntry] = []
        expected = from_seq
        block, last_block = legacy_block_of(from_seq), legacy_block_of(to_seq)
        while True:
            values = (shard, epoch, block, expected, to_seq)
            rows = with_retries(
                "reading a shard's entries",
                lambda v=values: list(self.session.execute(self._select_legacy, v)),  # type: ignore[misc]
            )
            for r in rows:
                if contiguous and r.seq != expected:
                    return out  # a hole: what follows is not part of the chain
                out.append(LedgerEntry(
                    shard, epoch, r.seq, r.kind, r.payment_key, r.body, r.prev_hash,
                    r.entry_hash,
                ))  # fmt: skip
                expected = r.seq + 1
            full = expected == (block + 1) * LEGACY_BLOCK_ENTRIES
            if block >= last_block or (contiguous and not full):
                return out
            block += 1

    def locate(self, shard: int, epoch: int, seq: int) -> StoredRun | None:
        """The stored run that holds ``(shard, epoch, seq)``, or None if there is none
        (for operators and tests that must name a row in CQL; chains written before
        streams: None)."""
        where = self._location(shard, epoch)
        if where is None:
            return None
        stream, block = where
        while True:
            for first, run in self._runs(stream, block, shard, epoch, seq):
                if run[0].seq <= seq <= run[-1].seq:
                    return StoredRun(stream, block, shard, epoch, first, tuple(run))
            if not self._block_exists(stream, block + 1):
                return None
            block += 1

    def _block_exists(self, stream: str, block: int) -> bool:
        return bool(
            with_retries(
                "reading a stream",
                lambda: list(self.session.execute(self._select_block_exists, (stream, block))),
            )
        )

    # -- the group commit ---------------------------------------------------------------

    def commit(self, writes: Sequence[ShardWrite]) -> dict[int, bool]:
        """Write every shard's entries (one single-partition batch), then check the
        fences.

        Returns, per shard, whether the commit may be acknowledged: the write completed,
        and afterwards the highest fence of the shard was its epoch.
        """
        count = sum(len(w.entries) for w in writes)
        block, held = self.blocks.next_for(count)
        batch = BatchStatement(batch_type=BatchType.UNLOGGED, consistency_level=self.cl)
        for w in writes:
            if not w.entries:
                continue
            first, last = w.entries[0].seq, w.entries[-1].seq
            invariant(
                last - first + 1 == len(w.entries)
                and all((e.shard, e.epoch) == (w.shard, w.epoch) for e in w.entries),
                f"shard {w.shard} epoch {w.epoch}: a commit's entries are one contiguous run",
            )
            batch.add(self._insert_stream, (
                self.stream, block, w.shard, w.epoch, first, last, encode_run(w.entries),
                w.at_us,
            ))  # fmt: skip
        batch.is_idempotent = True
        try:
            self.session.execute(batch, timeout=COMMIT_WRITE_TIMEOUT_S)
        except TRANSIENT:
            # One retry in the same commit; the batch is idempotent (same rows).
            try:
                self.session.execute(batch, timeout=COMMIT_WRITE_TIMEOUT_S)
            except TRANSIENT:
                return {w.shard: False for w in writes}
        self.blocks.written(block, held, count)
        for w in writes:
            self._saw_cuts(block, w.entries)
        try:
            fences = self.max_fences(sorted({w.shard for w in writes}))
        except DomainUnavailable:
            return {w.shard: False for w in writes}
        return {w.shard: fences.get(w.shard) == w.epoch for w in writes}

    def max_fences(self, shards: Sequence[int]) -> dict[int, int]:
        """The highest fence of each of ``shards``."""
        stmt, values = self._select_some_fences, (FENCE_BUCKET, list(shards))
        rows = with_retries(
            "reading the shard fences", lambda: list(self.session.execute(stmt, values))
        )
        return {r.shard: r.epoch for r in rows}

    # -- the time index -----------------------------------------------------------------

    def index(self, rows: Sequence[IndexRow]) -> None:
        """Write time-index rows (idempotent: the same row lands on the same key), one
        single-partition batch per participant and day, concurrently; raises the
        domain's Unavailable if some could not be written after the bounded retries."""
        by_partition: dict[tuple[str, int], list[IndexRow]] = defaultdict(list)
        for row in rows:
            by_partition[(row.listed_under, day_of(row.received_at_us))].append(row)
        batches = []
        for part in by_partition.values():
            for i in range(0, len(part), INDEX_BATCH_ROWS_MAX):
                batch = BatchStatement(batch_type=BatchType.UNLOGGED, consistency_level=self.cl)
                for row in part[i : i + INDEX_BATCH_ROWS_MAX]:
                    batch.add(self._insert_time, index_values(row))
                batch.is_idempotent = True
                batches.append(batch)
        futures = [self.session.execute_async(b) for b in batches]
        failed = []
        for b, fut in zip(batches, futures, strict=True):
            try:
                fut.result()
            except TRANSIENT:
                failed.append(b)
        for b in failed:
            with_retries("writing the time index", lambda b=b: self.session.execute(b))  # type: ignore[misc]

    def mark_indexed(self, marks: Mapping[tuple[int, int], int], at_us: int) -> None:
        """Record, per (shard, epoch), the seq up to which the time index is written:
        one single-partition batch for all of them."""
        if not marks:
            return
        batch = BatchStatement(batch_type=BatchType.UNLOGGED, consistency_level=self.cl)
        for (shard, epoch), seq in sorted(marks.items()):
            batch.add(self._insert_mark, (MARKS_BUCKET, shard, epoch, seq, at_us))
        batch.is_idempotent = True
        with_retries("marking the time index", lambda: self.session.execute(batch))

    def index_marks(self, shard: int) -> dict[int, int]:
        """Per epoch of ``shard``: the seq up to which its owner wrote the time index.
        A part of the chain written before streams (its seal names no stream) was
        indexed in its commits: it counts as indexed throughout."""
        rows = with_retries(
            "reading the time index's marks",
            lambda: list(self.session.execute(self._select_marks, (MARKS_BUCKET, shard))),
        )
        marks = {r.epoch: r.indexed_through_seq for r in rows}
        for seal in self.seals(shard):  # also learns where each part is
            if self._locations[(shard, seal.epoch)] is None:
                marks[seal.epoch] = INDEXED_IN_COMMIT
        return marks

    # -- listing ------------------------------------------------------------------------

    def list_index(
        self, participant_id: str, start_us: int, end_us: int, page_size: int, page_token: str
    ) -> tuple[list[tuple[str, str]], str]:
        """(institution_id, payment_id) of the participant's payments (an institution's
        own, or those routed to a bank) received in ``[start_us, end_us)``, oldest first,
        and the next page's token.

        The token is the last (received_at_us, institution_id, payment_id) returned: the
        next page starts strictly after it, so concurrent inserts never repeat or skip a
        row. The first page starts at ``start_us`` itself (every real row sorts after
        ``(start_us, "", "")``).
        """
        if end_us - start_us > LIST_DAYS_MAX * DAY_US:
            raise InvalidArgument(
                [FieldViolation("end_time", f"a listing spans at most {LIST_DAYS_MAX} days")]
            )
        cursor = _decode_token(page_token) if page_token else (start_us, "", "")
        out: list[tuple[str, str]] = []
        day_start = (max(cursor[0], start_us) // DAY_US) * DAY_US
        while day_start < end_us and len(out) < page_size:
            limit = page_size - len(out)
            values = (participant_id, day_of(day_start), *cursor, end_us, limit)
            rows = with_retries(
                "listing payments",
                lambda v=values: list(self.session.execute(self._select_time, v)),  # type: ignore[misc]
            )
            for r in rows:
                out.append((r.institution_id, r.payment_id))
                cursor = (r.received_at_us, r.institution_id, r.payment_id)
            if len(rows) < limit:
                day_start += DAY_US
        more = len(out) >= page_size
        return out, (_encode_token(*cursor) if more else "")


def index_values(row: IndexRow) -> tuple[str, int, int, str, str]:
    """The bound values of a time-index row: (participant_id, day, received_at_us,
    institution_id, payment_id)."""
    at = row.received_at_us
    return (row.listed_under, day_of(at), at, row.institution_id, row.payment_id)


def _encode_token(at_us: int, institution_id: str, payment_id: str) -> str:
    return base64.urlsafe_b64encode(f"{at_us}|{institution_id}|{payment_id}".encode()).decode()


def _decode_token(token: str) -> tuple[int, str, str]:
    refused = InvalidArgument([FieldViolation("page_token", "not a token this switch issued")])
    try:
        # Ids never hold "|" (validation), so the first two separate the three parts.
        at, inst, pid = base64.urlsafe_b64decode(token.encode()).decode().split("|", 2)
        at_us = int(at)
    except (ValueError, UnicodeDecodeError) as e:
        raise refused from e
    if not -(2**63) <= at_us < 2**63:  # a bigint: anything else never came from here
        raise refused
    return at_us, inst, pid


__all__ = [
    "STREAM_BLOCK_ENTRIES_MAX",
    "CassandraLedger",
    "StoredRun",
    "StreamBlocks",
    "day_of",
    "decode_run",
    "encode_run",
    "index_values",
    "legacy_block_of",
    "new_stream_id",
]
