"""Read the whole ledger back, as an auditor would: every shard's chain, verified.

Used by ``clearingctl demo`` and the tests (and the start of the auditor's tools): it
follows each shard's seals, checks each chain link by link, and totals the postings of
the decisions per participant and currency.
"""

from __future__ import annotations

import threading
from collections import Counter, defaultdict
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any

from clearinghouse._invariant import invariant
from clearinghouse.domain.chain import GENESIS_HASH, LedgerEntry
from clearinghouse.domain.entries import (
    KIND_DECISION,
    KIND_INTENT,
    KIND_WINDOW_CUT,
    Decision,
    WindowCut,
)
from clearinghouse.switch.ports import ChainReader
from clearinghouse.switch.records import SHARD_COUNT
from clearinghouse.switch.shards import map_shards, read_chain, read_chain_part


@dataclass
class LedgerSummary:
    entries: int = 0
    shards_with_entries: int = 0
    # (participant, currency) -> [debits, credits], minor units
    totals: defaultdict[tuple[str, str], list[int]] = field(
        default_factory=lambda: defaultdict(lambda: [0, 0])
    )
    states: Counter[str] = field(default_factory=Counter)
    # payment_key -> final state
    decided: dict[str, str] = field(default_factory=dict)
    undecided: set[str] = field(default_factory=set)
    # payment_key -> how many postings its decision wrote
    postings: Counter[str] = field(default_factory=Counter)
    # window id -> (participant, currency) -> [debits, credits] of the decisions in that
    # window (the one its shard's next cut ends; the open one is the last cut's + 1).
    window_totals: defaultdict[int, defaultdict[tuple[str, str], list[int]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(lambda: [0, 0]))
    )
    # The windows SETTLED, when the reader also read the windows (the drill does).
    settled_windows: frozenset[int] = frozenset()

    def net(self, participant_id: str, currency: str) -> int:
        d, c = self.totals.get((participant_id, currency), (0, 0))
        return d - c

    def net_by_currency(self) -> dict[str, int]:
        out: Counter[str] = Counter()
        for (_, ccy), (d, c) in self.totals.items():
            out[ccy] += d - c
        return dict(out)


@dataclass(frozen=True)
class WindowData:
    """A closed window as the ledger holds it: per shard, the entries after the previous
    window's cut up to and including this window's cut; and the INTENT entries of the
    window's decisions that lie in earlier windows."""

    window_id: int
    entries_by_shard: dict[int, list[LedgerEntry]]
    referenced_intents: list[LedgerEntry]


def read_window(
    ledger: ChainReader,
    windows: Any,
    window_id: int,
    shard_count: int = SHARD_COUNT,
    *,
    verify: bool = True,
) -> WindowData:
    """Read window ``window_id`` (every shard must have cut it) from verified chains
    (``verify=False``: the rows as read, for comparing replicas).

    The window starts after the previous window's cut in each shard, so that cut must be
    recorded too (window 1 starts at the chain's start): a window is never read from a
    guessed start, which would take in earlier windows' entries. Each shard's part is
    read alone, from the previous cut's recorded block on where it is known, and checked
    to link from the previous cut's hash to this cut's: the cost of a window is its own
    entries, not the ledger before it. A decision whose intent lies in an earlier window
    has that intent looked up in the windows before, newest first, each read and checked
    between its own two cuts, until every such intent is found."""
    cuts = windows.cuts(window_id)
    missing = sorted(set(range(shard_count)) - set(cuts))
    invariant(not missing, f"window {window_id} is not cut in shards {missing[:8]}")
    earlier = _EarlierCuts(windows, window_id, shard_count)
    by_shard: dict[int, list[LedgerEntry]] = {}
    intents: list[LedgerEntry] = []

    def read(shard: int) -> tuple[list[LedgerEntry], list[LedgerEntry]]:
        after = earlier.cut(window_id - 1, shard)
        part = _window_part(ledger, shard, after, cuts[shard], window_id=window_id, verify=verify)
        inside = {e.payment_key for e in part if e.kind == KIND_INTENT}
        wanted = {e.payment_key for e in part if e.kind == KIND_DECISION} - inside
        found: list[LedgerEntry] = []
        before = window_id - 1
        while wanted and before >= 1:
            older = _window_part(
                ledger, shard, earlier.cut(before - 1, shard), earlier.cut(before, shard),
                window_id=before, verify=verify,
            )  # fmt: skip
            hits = [e for e in older if e.kind == KIND_INTENT and e.payment_key in wanted]
            found = hits + found
            wanted -= {e.payment_key for e in hits}
            before -= 1
        return part, found

    # Closed on the way out: a window that does not verify stops the reads there.
    with closing(map_shards(read, range(shard_count))) as parts:
        for shard, (part, found) in enumerate(parts):
            by_shard[shard] = part
            intents += found
    return WindowData(window_id, by_shard, intents)


class _EarlierCuts:
    """The recorded cuts of the windows before one, read once each when first needed
    (shards are read on several threads)."""

    def __init__(self, windows: Any, window_id: int, shard_count: int) -> None:
        self.windows = windows
        self.window_id = window_id
        self.shard_count = shard_count
        self._cuts: dict[int, dict[int, Any]] = {}
        self._lock = threading.Lock()

    def cut(self, window_id: int, shard: int) -> Any | None:
        """Window ``window_id``'s cut of ``shard``; None before window 1 (the chain's
        start). Raises InvariantViolation if a window before has not recorded it."""
        if window_id < 1:
            return None
        with self._lock:
            if window_id not in self._cuts:
                self._cuts[window_id] = self.windows.cuts(window_id)
            cuts = self._cuts[window_id]
        missing = sorted(set(range(self.shard_count)) - set(cuts))
        invariant(
            not missing,
            f"window {window_id}'s cut is not recorded in shards {missing[:8]}, so window "
            f"{window_id + 1}'s start is unknown there",
        )
        return cuts[shard]


def _window_part(
    ledger: ChainReader, shard: int, after: Any | None, cut: Any, *, window_id: int, verify: bool
) -> list[LedgerEntry]:
    """The shard's entries after ``after`` (the previous window's cut; None: from the
    chain's start) through ``cut``, checked to end at the cut's recorded hash."""
    start = (0, GENESIS_HASH) if after is None else (after.seq, after.entry_hash)
    at = None if after is None or after.block is None else (after.epoch, after.block)
    part = read_chain_part(ledger, shard, start, cut.seq, start_at=at, verify=verify)
    invariant(
        bool(part) and (part[-1].entry_hash == cut.entry_hash or not verify),
        f"shard {shard}: the chain does not hold window {window_id}'s recorded cut",
    )
    return part


def read_ledger(ledger: ChainReader, shard_count: int = SHARD_COUNT) -> LedgerSummary:
    """Every shard's verified chain, summarised; raises InvariantViolation on a broken
    chain, a decision without an intent, or unbalanced postings."""
    out = LedgerSummary()
    for entries in map_shards(lambda shard: read_chain(ledger, shard)[0], range(shard_count)):
        if entries:
            out.shards_with_entries += 1
        out.entries += len(entries)
        window = 1
        for e in entries:
            if e.kind == KIND_WINDOW_CUT:
                window = WindowCut.decode(e.body).window_id + 1
            elif e.kind == KIND_INTENT:
                out.undecided.add(e.payment_key)
            elif e.kind == KIND_DECISION:
                invariant(e.payment_key in out.undecided, f"{e.payment_key}: decision first")
                out.undecided.discard(e.payment_key)
                d = Decision.decode(e.body, e.payment_key)
                out.decided[e.payment_key] = d.state.value
                out.states[d.state.value] += 1
                debits = sum(p.debit_minor for p in d.postings)
                credits = sum(p.credit_minor for p in d.postings)
                invariant(debits == credits, f"{e.payment_key}: debits {debits} != {credits}")
                out.postings[e.payment_key] += len(d.postings)
                in_window = out.window_totals[window]
                for p in d.postings:
                    for t in (out.totals[(p.participant_id, p.currency)],
                              in_window[(p.participant_id, p.currency)]):  # fmt: skip
                        t[0] += p.debit_minor
                        t[1] += p.credit_minor
    return out


__all__ = ["LedgerSummary", "WindowData", "read_ledger", "read_window"]
