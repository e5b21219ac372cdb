"""The shard ledger on Cassandra: entries, fences, seals, and the time index.

All statements are prepared once and run at the topology's consistency (QUORUM: two
cities). :meth:`CassandraLedger.commit` is the group commit's storage half: it writes
every shard's entries (one single-partition batch per shard and block) and the time
index rows concurrently, waits for all of them, and only then reads the fences, so a
shard's commit is reported acknowledged only if its writes completed *before* a fence
read that still found the writer's epoch on top (see docs/ARCHITECTURE.md, "Fencing").
"""

from __future__ import annotations

import base64
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from cassandra import ConsistencyLevel
from cassandra.query import BatchStatement, BatchType

from clearinghouse.domain import FieldViolation, InvalidArgument
from clearinghouse.domain import Unavailable as DomainUnavailable
from clearinghouse.domain.chain import LedgerEntry
from clearinghouse.storage.retry import TRANSIENT, with_retries
from clearinghouse.switch.ports import IndexRow, Seal, ShardWrite

LEDGER_BLOCK_ENTRIES = 4096
FENCE_BUCKET = 0
DAY_US = 86_400 * 1_000_000
LIST_DAYS_MAX = 31
# Rows fetched per page when a new owner reads a block back.
READ_PAGE_ROWS = 1000
COMMIT_WRITE_TIMEOUT_S = 5.0


def day_of(at_us: int) -> int:
    t = time.gmtime(at_us // 1_000_000)
    return t.tm_year * 10000 + t.tm_mon * 100 + t.tm_mday


def block_of(seq: int) -> int:
    return seq // LEDGER_BLOCK_ENTRIES


class CassandraLedger:
    def __init__(self, session: Any, consistency: int = ConsistencyLevel.QUORUM) -> None:
        self.session = session
        self.cl = consistency
        p = session.prepare
        self._insert_entry = p(
            "INSERT INTO ledger_entries (shard, epoch, block, seq, kind, payment_key, body, "
            "prev_hash, entry_hash, at_us) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        )
        self._select_entries = p(
            "SELECT seq, kind, payment_key, body, prev_hash, entry_hash FROM ledger_entries "
            "WHERE shard = ? AND epoch = ? AND block = ? AND seq >= ?"
        )
        self._select_range = p(
            "SELECT seq, kind, payment_key, body, prev_hash, entry_hash FROM ledger_entries "
            "WHERE shard = ? AND epoch = ? AND block = ? AND seq >= ? AND seq <= ?"
        )
        self._insert_fence = p(
            "INSERT INTO shard_fences (bucket, shard, epoch, node_id, at_us) VALUES (?, ?, ?, ?, ?)"
        )
        self._select_some_fences = p(
            "SELECT shard, epoch FROM shard_fences WHERE bucket = ? AND shard IN ?"
        )
        self._insert_seal = p(
            "INSERT INTO shard_seals (shard, epoch, prev_epoch, start_seq, start_hash, node_id, "
            "at_us) VALUES (?, ?, ?, ?, ?, ?, ?)"
        )
        self._select_seals = p(
            "SELECT epoch, prev_epoch, start_seq, start_hash FROM shard_seals WHERE shard = ?"
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
        for stmt in (
            self._insert_entry, self._select_entries, self._insert_fence,
            self._select_some_fences, self._select_range,
            self._insert_seal, self._select_seals, self._insert_time, self._select_time,
        ):  # fmt: skip
            stmt.consistency_level = self.cl
            stmt.is_idempotent = True
        self._select_entries.fetch_size = READ_PAGE_ROWS

    # -- takeover -----------------------------------------------------------------------

    def fence(self, shard: int, epoch: int, node_id: str, at_us: int) -> None:
        values = (FENCE_BUCKET, shard, epoch, node_id, at_us)
        with_retries(
            "raising a shard's fence", lambda: self.session.execute(self._insert_fence, values)
        )

    def seals(self, shard: int) -> list[Seal]:
        rows = with_retries(
            "reading a shard's seals",
            lambda: list(self.session.execute(self._select_seals, (shard,))),
        )
        return [Seal(shard, r.epoch, r.prev_epoch, r.start_seq, r.start_hash) for r in rows]

    def write_seal(self, seal: Seal, node_id: str, at_us: int) -> None:
        values = (
            seal.shard, seal.epoch, seal.prev_epoch, seal.start_seq, seal.start_hash,
            node_id, at_us,
        )  # fmt: skip
        with_retries("sealing a shard", lambda: self.session.execute(self._insert_seal, values))

    def rows(
        self, shard: int, epoch: int, block: int, from_seq: int, to_seq: int
    ) -> list[LedgerEntry]:
        """The rows of one partition with ``from_seq <= seq <= to_seq``, as stored (no
        chain check): what this session's replicas hold, for comparing replicas."""
        rows = with_retries(
            "reading ledger rows",
            lambda: list(
                self.session.execute(self._select_range, (shard, epoch, block, from_seq, to_seq))
            ),
        )
        return [
            LedgerEntry(
                shard, epoch, r.seq, r.kind, r.payment_key, r.body, r.prev_hash, r.entry_hash
            )
            for r in rows
        ]

    def entries(self, shard: int, epoch: int, from_seq: int) -> list[LedgerEntry]:
        """Entries of ``epoch`` from ``from_seq`` on, as long as they are contiguous."""
        out: list[LedgerEntry] = []
        expected = from_seq
        block = block_of(from_seq)
        while True:
            values = (shard, epoch, block, expected)
            rows = with_retries(
                "reading a shard's entries",
                lambda v=values: list(self.session.execute(self._select_entries, v)),  # type: ignore[misc]
            )
            for r in rows:
                if r.seq != expected:
                    return out  # a hole: what follows is not part of the chain
                out.append(LedgerEntry(
                    shard, epoch, r.seq, r.kind, r.payment_key, r.body, r.prev_hash,
                    r.entry_hash,
                ))  # fmt: skip
                expected += 1
            if expected != (block + 1) * LEDGER_BLOCK_ENTRIES:
                return out
            block += 1

    # -- the group commit ---------------------------------------------------------------

    def commit(self, writes: Sequence[ShardWrite]) -> dict[int, bool]:
        """Write every shard's entries and index rows, then check the fences.

        Returns, per shard, whether the commit may be acknowledged: every write of the
        shard completed, and afterwards the highest fence of the shard was its epoch.
        """
        futures: list[tuple[int, Any, Any]] = []
        for w in writes:
            for stmt in self._statements(w):
                futures.append((w.shard, stmt, self.session.execute_async(stmt)))
        failed: set[int] = set()
        for shard, stmt, fut in futures:
            try:
                fut.result()
            except TRANSIENT:
                # One retry in the same commit; the statement is idempotent (same rows).
                try:
                    self.session.execute(stmt, timeout=COMMIT_WRITE_TIMEOUT_S)
                except TRANSIENT:
                    failed.add(shard)
        try:
            fences = self.max_fences(sorted({w.shard for w in writes}))
        except DomainUnavailable:
            return {w.shard: False for w in writes}
        return {w.shard: w.shard not in failed and fences.get(w.shard) == w.epoch for w in writes}

    def max_fences(self, shards: Sequence[int]) -> dict[int, int]:
        """The highest fence of each of ``shards``."""
        stmt, values = self._select_some_fences, (FENCE_BUCKET, list(shards))
        rows = with_retries(
            "reading the shard fences", lambda: list(self.session.execute(stmt, values))
        )
        out: dict[int, int] = {}
        for r in rows:
            if r.epoch > out.get(r.shard, -1):
                out[r.shard] = r.epoch
        return out

    def _statements(self, w: ShardWrite) -> list[Any]:
        out: list[Any] = []
        by_block: dict[int, list[LedgerEntry]] = defaultdict(list)
        for e in w.entries:
            by_block[block_of(e.seq)].append(e)
        for block, entries in by_block.items():
            batch = BatchStatement(batch_type=BatchType.UNLOGGED, consistency_level=self.cl)
            for e in entries:
                batch.add(self._insert_entry, (
                    e.shard, e.epoch, block, e.seq, e.kind, e.payment_key, e.body,
                    e.prev_hash, e.entry_hash, w.at_us,
                ))  # fmt: skip
            batch.is_idempotent = True
            out.append(batch)
        by_partition: dict[tuple[str, int], list[IndexRow]] = defaultdict(list)
        for row in w.index_rows:
            by_partition[(row.listed_under, day_of(row.received_at_us))].append(row)
        for rows in by_partition.values():
            batch = BatchStatement(batch_type=BatchType.UNLOGGED, consistency_level=self.cl)
            for row in rows:
                batch.add(self._insert_time, index_values(row))
            batch.is_idempotent = True
            out.append(batch)
        return out

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


__all__ = ["LEDGER_BLOCK_ENTRIES", "CassandraLedger", "block_of", "day_of", "index_values"]
