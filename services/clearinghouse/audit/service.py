"""The auditor's reads of the replicated ledger: payments, windows, proofs, replicas.

Everything here reads; nothing writes. Answers come from the verified hash chains (read
at QUORUM through :class:`~clearinghouse.storage.ledger.CassandraLedger`), from the
clearing stored when each window was cleared, or, for :meth:`AuditDomain.compare_cities`,
from each city's own replica alone (consistency LOCAL_ONE through a session whose only
coordinators are that city's nodes).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from clearinghouse._invariant import InvariantViolation
from clearinghouse.audit.export import CLEARING_FILE, export_parts
from clearinghouse.domain import (
    DataLoss,
    FailedPrecondition,
    NotFound,
    ParticipantKind,
    Unavailable,
)
from clearinghouse.domain.chain import FIRST_SEQ, GENESIS_HASH, LedgerEntry, verify_chain
from clearinghouse.domain.entries import KIND_DECISION, KIND_WINDOW_CUT, WindowCut
from clearinghouse.domain.merkle import inclusion_proof, merkle_root, window_leaves
from clearinghouse.domain.model import SigningKeyRecord
from clearinghouse.ledger_view import WindowData, read_window
from clearinghouse.settlement import StoredClearing, stored_clearing, stored_kinds
from clearinghouse.storage.windows import CassandraWindows, WindowStatus
from clearinghouse.switch.ports import LedgerStore
from clearinghouse.switch.records import SHARD_COUNT, payment_key, shard_of
from clearinghouse.switch.shards import map_shards, read_chain

log = logging.getLogger(__name__)

EXPORT_CHUNK_BYTES = 256 * 1024


@dataclass(frozen=True, slots=True)
class ChainCheck:
    shard: int
    ok: bool
    entries: int
    head_seq: int
    head_hash: bytes
    problem: str


@dataclass(frozen=True, slots=True)
class Proof:
    window_id: int
    entry: LedgerEntry
    leaf_index: int
    tree_size: int
    audit_path: list[bytes]
    merkle_root: bytes


@dataclass(frozen=True, slots=True)
class CityView:
    """One city's replica of a window. ``rows`` holds (shard, seq, row digest, stored
    entry hash): the digest covers every column, so a row whose body changed while its
    stored hash did not still differs."""

    city: str
    merkle_root: bytes
    entry_count: int
    rows: frozenset[tuple[int, int, bytes, bytes]] = field(default_factory=frozenset)
    error: str = ""


@dataclass(frozen=True, slots=True)
class CityComparison:
    cities: list[tuple[CityView, list[str]]]  # each city with the rows it differs on
    agree: bool


# Opens (ledger, windows) reading one city's own replica only; the caller closes it.
CityReader = Callable[[str], tuple[Any, CassandraWindows, Callable[[], None]]]


class AuditDomain:
    def __init__(
        self,
        *,
        ledger: LedgerStore,
        windows: CassandraWindows,
        kinds: Callable[[], Mapping[str, ParticipantKind]],
        cities: Sequence[str],
        city_reader: CityReader | None = None,
        signing_keys: Callable[[], Sequence[SigningKeyRecord]] = tuple,
    ) -> None:
        self.ledger = ledger
        self.windows = windows
        self.kinds = kinds
        self.signing_keys = signing_keys
        self.cities = list(cities)
        self.city_reader = city_reader
        self._lock = threading.Lock()

    # -- payments -----------------------------------------------------------------------

    def payment_history(
        self, institution_id: str, payment_id: str
    ) -> tuple[list[LedgerEntry], int]:
        """The payment's entries in its shard's (verified) chain, and the window that
        holds its decision: 0 while that window is open, or if it is not decided."""
        key = payment_key(institution_id, payment_id)
        chain, _ = read_chain(self.ledger, shard_of(institution_id, payment_id))
        out = [e for e in chain if e.payment_key == key]
        if not out:
            raise NotFound.payment(institution_id, payment_id)
        decision = next((e for e in out if e.kind == KIND_DECISION), None)
        return out, (window_in_chain(chain, decision) if decision is not None else 0)

    def window_of(self, entry: LedgerEntry) -> int:
        """The window whose cut follows ``entry`` in its shard; 0 if it is still open."""
        chain, _ = read_chain(self.ledger, entry.shard)
        return window_in_chain(chain, entry)

    # -- windows ------------------------------------------------------------------------

    def list_windows(self, limit: int, before_window_id: int = 0) -> tuple[list[WindowStatus], int]:
        """Up to ``limit`` windows newest first, from the open one (``before_window_id``
        0) or from the one below ``before_window_id``; and where the next page starts
        (0: no older window). Window ids run from 1 without gaps."""
        if before_window_id > 0:
            page = self.windows.recent(limit, before_window_id)
        else:
            recent = self.windows.recent(limit)
            current = recent[0].window_id + 1 if recent else 1
            page = [WindowStatus(current, ()), *recent][:limit]
        oldest = page[-1].window_id if page else 1
        return page, (oldest if oldest > 1 else 0)

    def window(self, window_id: int) -> tuple[WindowStatus, Any]:
        status = self.windows.status(window_id)
        if not status.events and window_id != self.windows.current():
            raise NotFound(f"no settlement window {window_id}", reason="WINDOW_NOT_FOUND")
        return status, stored_clearing(self.windows, window_id)

    def _cleared(self, window_id: int) -> StoredClearing:
        stored = stored_clearing(self.windows, window_id)
        if stored is None:
            self.window(window_id)  # NotFound for a window that does not exist
            raise FailedPrecondition(
                f"window {window_id} is not cleared yet", reason="WINDOW_NOT_CLEARED"
            )
        return stored

    # -- chains and proofs ----------------------------------------------------------------

    def verify_chains(self, shards: Sequence[int]) -> list[ChainCheck]:
        def check(shard: int) -> ChainCheck:
            try:
                chain, _ = read_chain(self.ledger, shard)
            except InvariantViolation as e:
                return ChainCheck(shard, False, 0, 0, b"", str(e))
            report = verify_chain(chain, FIRST_SEQ, GENESIS_HASH, shard=shard)
            return ChainCheck(shard, report.ok, report.verified, report.head_seq,
                              report.head_hash, report.detail)  # fmt: skip

        return list(map_shards(check, shards or range(SHARD_COUNT)))

    def inclusion(self, window_id: int, institution_id: str, payment_id: str) -> Proof:
        entries, holding = self.payment_history(institution_id, payment_id)
        decisions = [e for e in entries if e.kind == KIND_DECISION]
        if not decisions:
            raise FailedPrecondition(
                f"payment {payment_id!r} is not decided yet", reason="PAYMENT_NOT_DECIDED"
            )
        decision = decisions[0]
        if window_id and window_id != holding:  # said at once: no window read for it
            where = f"window {holding}" if holding else "the open window"
            raise NotFound(
                f"payment {payment_id!r} was not decided in window {window_id} but in {where}",
                reason="PAYMENT_NOT_IN_WINDOW",
            )
        window_id = window_id or holding
        if window_id == 0:
            raise FailedPrecondition(
                f"payment {payment_id!r} is in the open window", reason="WINDOW_NOT_CLOSED"
            )
        stored = self._cleared(window_id)
        data = read_window(self.ledger, self.windows, window_id)
        leaves = window_leaves(_flatten(data))
        try:
            index = leaves.index(decision.entry_hash)
        except ValueError:
            raise NotFound(
                f"payment {payment_id!r} was not decided in window {window_id}",
                reason="PAYMENT_NOT_IN_WINDOW",
            ) from None
        _same_root(window_id, merkle_root(leaves), stored)
        return Proof(window_id, decision, index, len(leaves), inclusion_proof(leaves, index),
                     stored.merkle_root)  # fmt: skip

    # -- replicas -------------------------------------------------------------------------

    def compare_cities(self, window_id: int) -> CityComparison:
        """Read the window's rows from each city's own replica and compare them: the
        digest (Merkle root over the rows a city holds) and, by name, every row where a
        city lacks or differs from what the majority of cities holds.

        Every read is one city's replica alone (LOCAL_ONE): a QUORUM read here would
        repair a row that differs in one city into the others before it is counted.
        Which rows belong to the window is the union of what the cities that hold the
        window's cuts say; a city that missed them is still read at those positions.
        """
        if self.city_reader is None:
            raise FailedPrecondition("no per-city readers configured", reason="NOT_CONFIGURED")
        try:
            status: WindowStatus | None = self.window(window_id)[0]  # NotFound if none
        except Unavailable:  # no quorum: each city's replica is still read on its own
            status = None
        if status is not None and status.state in ("OPEN", "CLOSING"):
            raise FailedPrecondition(
                f"window {window_id} is {status.state}: which rows it holds is known once "
                "every shard has cut it (CLOSED)",
                reason="WINDOW_NOT_CLOSED",
            )
        opened: dict[str, Any] = {}
        errors: dict[str, str] = {}
        positions: dict[tuple[int, int], int] = {}  # (shard, seq) -> epoch
        try:
            for city in self.cities:
                try:
                    opened[city] = self.city_reader(city)
                except Exception as e:  # noqa: BLE001 (reported per city)
                    errors[city] = f"cannot reach {city}: {type(e).__name__}: {e}"
                    continue
                ledger, windows, _ = opened[city]
                try:
                    data = read_window(ledger, windows, window_id, verify=False)
                except Exception:  # noqa: BLE001,S112 (this city lacks the window; see below)
                    continue
                for ent in _flatten(data):
                    positions.setdefault((ent.shard, ent.seq), ent.epoch)
            if not positions:
                raise FailedPrecondition(
                    f"no city's replica holds window {window_id}", reason="WINDOW_NOT_FOUND"
                )
            views = [
                CityView(city, b"", 0, error=errors[city])
                if city in errors
                else self._city_view(city, opened[city][0], positions)
                for city in self.cities
            ]
        finally:
            for _, _, close in opened.values():
                close()
        return compare_views(views)

    def _city_view(
        self, city: str, ledger: Any, positions: Mapping[tuple[int, int], int]
    ) -> CityView:
        try:
            ranges: dict[tuple[int, int], list[int]] = {}
            for (shard, seq), epoch in positions.items():
                ranges.setdefault((shard, epoch), []).append(seq)
            held: list[LedgerEntry] = []
            for (shard, epoch), seqs in sorted(ranges.items()):
                held += ledger.rows(shard, epoch, min(seqs), max(seqs))
            held = [h for h in held if (h.shard, h.seq) in positions]
            rows = frozenset((h.shard, h.seq, row_digest(h), h.entry_hash) for h in held)
            return CityView(city, merkle_root(window_leaves(held)), len(held), rows)
        except Exception as e:  # noqa: BLE001 (a replica that is down is reported)
            return CityView(city, b"", 0, error=f"{type(e).__name__}: {e}")

    # -- export ---------------------------------------------------------------------------

    def export(self, window_id: int) -> Iterator[tuple[str, bytes]]:
        """The export files of a cleared window, as (path, chunk) pairs, in path order.

        The export is the stored clearing, recomputed: from the window's entries read
        now, with the participant kinds recorded in the stored clearing (not today's
        registry, which may list participants registered since). Its Merkle root and
        ``clearing.json`` must be the stored ones, byte for byte; otherwise DATA_LOSS
        (nothing is exported: the ledger no longer gives what was cleared).
        """
        stored = self._cleared(window_id)
        data = read_window(self.ledger, self.windows, window_id)
        _same_root(window_id, merkle_root(window_leaves(_flatten(data))), stored)
        parts = export_parts(window_id, data.entries_by_shard, data.referenced_intents,
                             stored_kinds(stored), signing_keys=self.signing_keys())  # fmt: skip
        del data
        body = "".join(parts[CLEARING_FILE]()).encode()
        if hashlib.sha256(body).digest() != stored.clearing_digest:
            raise DataLoss(
                f"window {window_id}: the clearing recomputed from the ledger (sha256 "
                f"{hashlib.sha256(body).hexdigest()}) is not the one stored when the window "
                f"was cleared (sha256 {stored.clearing_digest.hex()})",
                reason="STORED_CLEARING_MISMATCH",
            )
        # Each file rendered when its turn comes and sent a chunk at a time: the largest
        # (the entries, about 0.5 KiB a row) is never held whole, as text or as bytes.
        for path in sorted(parts):
            yield from _chunks(path, parts[path]())


def _chunks(path: str, pieces: Iterator[str]) -> Iterator[tuple[str, bytes]]:
    """(path, up to EXPORT_CHUNK_BYTES of the file) pairs; an empty file is one empty
    chunk (it is exported too)."""
    pending = bytearray()
    sent = False
    for piece in pieces:
        pending += piece.encode()
        at = 0
        with memoryview(pending) as view:  # each byte copied once more, not once a chunk
            while len(pending) - at >= EXPORT_CHUNK_BYTES:
                yield path, bytes(view[at : at + EXPORT_CHUNK_BYTES])
                at += EXPORT_CHUNK_BYTES
                sent = True
        del pending[:at]
    if pending or not sent:
        yield path, bytes(pending)


def row_digest(e: LedgerEntry) -> bytes:
    """SHA-256 over every column of a ledger row, length-prefixed: two cities' rows are
    the same row only if all of it is the same (not just the hash it claims)."""
    h = hashlib.sha256()
    for part in (
        str(e.shard).encode(), str(e.epoch).encode(), str(e.seq).encode(), e.kind.encode(),
        e.payment_key.encode(), e.body, e.prev_hash, e.entry_hash,
    ):  # fmt: skip
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.digest()


def compare_views(views: list[CityView]) -> CityComparison:
    """Name, per city, every row it lacks or holds differently from the majority of the
    readable cities. Where no version of a row has a majority (two readable cities that
    disagree), every readable city is named for it, marked "no majority"."""
    votes: dict[tuple[int, int], Counter[bytes]] = {}
    for v in views:
        for s, q, digest, _ in v.rows:
            votes.setdefault((s, q), Counter())[digest] += 1
    readable = sum(1 for v in views if not v.error)
    expected = {
        key: c.most_common(1)[0][0]
        for key, c in votes.items()
        if c.most_common(1)[0][1] * 2 > readable
    }
    undecided = votes.keys() - expected.keys()
    out = []
    for v in views:
        held = {(s, q): (digest, stored) for s, q, digest, stored in v.rows}
        diff = [] if v.error else sorted(
            [f"shard {s} seq {q}: missing" for (s, q) in expected.keys() - held.keys()]
            + [f"shard {s} seq {q}: differs ({held[(s, q)][1].hex()[:16]})"
               for (s, q), d in expected.items() if (s, q) in held and held[(s, q)][0] != d]
            + [f"shard {s} seq {q}: no majority ("
               + (f"{held[(s, q)][1].hex()[:16]})" if (s, q) in held else "missing)")
               for (s, q) in undecided]
        )  # fmt: skip
        out.append((v, diff))
    agree = all(not v.error and not d for v, d in out)
    return CityComparison(out, agree=agree)


def window_in_chain(chain: Sequence[LedgerEntry], entry: LedgerEntry) -> int:
    """The window that holds ``entry`` of a shard's chain: the first window whose cut in
    the chain follows it (or is it); 0 if no cut follows it yet (the open window).

    The chain's WINDOW_CUT entries are what ``window_cuts`` records, one per window and
    shard, and the chain is already read (and verified) to find the payment's entries;
    the cut rows are not needed, and no window is missed however many there are."""
    for e in chain:
        if e.seq >= entry.seq and e.kind == KIND_WINDOW_CUT:
            return WindowCut.decode(e.body).window_id
    return 0


def _same_root(window_id: int, root: bytes, stored: StoredClearing) -> None:
    if root != stored.merkle_root:
        raise DataLoss(
            f"window {window_id}: the Merkle root of its entries read now ({root.hex()}) is "
            f"not the root stored when it was cleared ({stored.merkle_root.hex()})",
            reason="STORED_ROOT_MISMATCH",
        )


def _flatten(data: WindowData) -> list[LedgerEntry]:
    return [e for shard in sorted(data.entries_by_shard) for e in data.entries_by_shard[shard]]


__all__ = [
    "AuditDomain",
    "ChainCheck",
    "CityComparison",
    "CityView",
    "Proof",
    "compare_views",
    "row_digest",
    "window_in_chain",
]
