"""Settlement windows: close on demand or on a schedule, cut every shard, clear.

Every switch node runs :class:`WindowKeeper` once per :data:`WINDOW_POLL_S`:

1. It reads the newest windows. For each window that is CLOSING, it has each shard it
   serves cut the window (:meth:`ShardedStore.cut_window`: a WINDOW_CUT entry in the
   shard's chain) and records the cut (``window_cuts``): every cut of every window still
   CLOSING, not only a shard's latest one. A new owner finds the cuts in the chain it
   rebuilt and records them again (same values), so a crash between the cut and its
   record loses nothing.
2. It tells the shards it serves which windows are SETTLED (an operator confirmed that
   the window's settlement ran): their payments no longer count against the
   participants' net debit caps (:meth:`ShardedStore.release_settled`). Every settled
   window is read at the first step; then the newest windows at every step, and older
   ones a shard still counts :data:`SETTLED_SCAN_WINDOWS_MAX` at a time every
   :data:`SETTLED_SCAN_S`. On a thread of its own (:meth:`WindowKeeper.return_headroom`)
   each shard then gives the headroom it no longer needs back to the participant's home
   shard (:meth:`ShardedStore.give_back`), to be lent again wherever it is needed.
3. The owner of shard 0 (the coordinator; ownership moves with it) records CLOSED once
   every shard's cut is recorded, then computes the window's clearing from the ledger
   (:func:`clear_window`), stores it (``window_clearing``) and records CLEARED; and,
   when a schedule is set, asks the open window to close once it has been open for the
   interval.

One window closes at a time (:func:`request_close`): the open window can be asked to
close only once the window before it is CLOSED, so a window's start (the previous
window's cuts) is always recorded before the window itself can be CLOSED and cleared.
The clearing records the participant kinds it was computed with (``clearing.json``'s
``participants``); a clearing computed again (a second coordinator, an export) uses
that snapshot, not the registry of the day, so it gives the same bytes.

A payment belongs to the window whose cut follows its decision in its shard's chain:
the chain is the order, so closing a window under load can neither drop a payment
between two windows nor count it in both.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from clearinghouse.domain import ClearingError, FailedPrecondition, ParticipantKind
from clearinghouse.domain.clearing import WindowClearing, clear_window
from clearinghouse.domain.entries import Intent
from clearinghouse.domain.merkle import merkle_root, window_leaves
from clearinghouse.ledger_view import WindowData, read_window
from clearinghouse.storage.windows import CassandraWindows, CutRow, WindowEvent, WindowStatus
from clearinghouse.switch import heap
from clearinghouse.switch.ports import LedgerStore
from clearinghouse.switch.records import SHARD_COUNT
from clearinghouse.switch.shards import CAP_IDLE_CHECK_S, CAP_IDLE_GIVE_BACK_S, ShardedStore

log = logging.getLogger(__name__)

WINDOW_POLL_S = 1.0
COORDINATOR_SHARD = 0
# How many of the newest windows each step looks at (one closes at a time; the others
# may still be clearing).
WINDOWS_WATCHED = 4
# How far back a keeper looks once, at its first step, for a window still CLOSED (its
# clearing failed while later windows closed, so it is no longer among the newest).
WINDOWS_SCANNED_AT_START = 64
# How often a keeper asks whether windows older than the newest few were settled, and
# how many of them at most each time (in turns: each scan goes on after the last).
SETTLED_SCAN_S = 10.0
SETTLED_SCAN_WINDOWS_MAX = 16
PART_CLEARING = "clearing.json"
PART_MERKLE_ROOT = "merkle_root"


@dataclass(frozen=True, slots=True)
class StoredClearing:
    window_id: int
    clearing_json: str
    clearing_digest: bytes
    merkle_root: bytes


def compute_clearing(
    ledger: LedgerStore,
    windows: CassandraWindows,
    window_id: int,
    kinds: Mapping[str, ParticipantKind],
) -> tuple[WindowData, WindowClearing, bytes]:
    """Read the window from the ledger (verified chains) and clear it."""
    data = read_window(ledger, windows, window_id)
    entries = [e for shard in sorted(data.entries_by_shard) for e in data.entries_by_shard[shard]]
    intents = {e.payment_key: Intent.decode(e.body) for e in data.referenced_intents}
    intents.update({e.payment_key: Intent.decode(e.body) for e in entries if e.kind == "INTENT"})
    clearing = clear_window(window_id, entries, kinds, intents)
    return data, clearing, merkle_root(window_leaves(entries))


def store_clearing(
    windows: CassandraWindows, window_id: int, clearing: WindowClearing, root: bytes, at_us: int
) -> StoredClearing:
    body = clearing.to_json()
    digest = hashlib.sha256(body.encode()).digest()
    windows.put_part(window_id, PART_CLEARING, body, digest, at_us)
    windows.put_part(window_id, PART_MERKLE_ROOT, root.hex(), hashlib.sha256(root).digest(), at_us)
    return StoredClearing(window_id, body, digest, root)


def stored_clearing(windows: CassandraWindows, window_id: int) -> StoredClearing | None:
    parts = windows.parts(window_id)
    if PART_CLEARING not in parts or PART_MERKLE_ROOT not in parts:
        return None
    body, digest = parts[PART_CLEARING]
    return StoredClearing(window_id, body, digest, bytes.fromhex(parts[PART_MERKLE_ROOT][0]))


def stored_kinds(stored: StoredClearing) -> dict[str, ParticipantKind]:
    """The participant kinds a stored clearing was computed with."""
    return WindowClearing.from_json(stored.clearing_json).kinds()


def request_close(
    windows: CassandraWindows, node_id: str, at_us: int, window_id: int = 0, reason: str = ""
) -> tuple[int, bool]:
    """Ask the open window (``window_id`` 0, or the open window's id) to close; returns
    the window that is closing and whether this call asked for it.

    One window closes at a time. While the newest window asked to close is still
    CLOSING (not every shard's cut recorded), a close returns that window and closes no
    other, so a retried close is idempotent; naming the open window then is refused
    (FAILED_PRECONDITION ``WINDOW_STILL_CLOSING``: it can close once the one before it
    is CLOSED). Naming a window that is closing or closed already changes nothing.
    """
    recent = windows.recent(1)
    newest = recent[0] if recent else None
    current = newest.window_id + 1 if newest is not None else 1
    if 0 < window_id < current:
        return window_id, False  # closing or closed already: closing it again changes nothing
    if window_id not in (0, current):
        raise FailedPrecondition(
            f"window {window_id} is not open; the open window is {current}",
            reason="WINDOW_NOT_OPEN",
        )
    if newest is not None and newest.state == WindowEvent.CLOSING.value:
        if window_id == 0:
            return newest.window_id, False
        raise FailedPrecondition(
            f"window {newest.window_id} is still closing; window {current} can close once "
            f"window {newest.window_id} is CLOSED",
            reason="WINDOW_STILL_CLOSING",
        )
    made = windows.record(current, WindowEvent.CLOSING, at_us, node_id, reason)
    return current, made


class WindowKeeper:
    """One node's part in closing and clearing windows; see the module docstring."""

    def __init__(
        self,
        *,
        node_id: str,
        store: ShardedStore,
        ledger: LedgerStore,
        windows: CassandraWindows,
        kinds: Callable[[], Mapping[str, ParticipantKind]],
        clock: Callable[[], int],
        interval_s: float = 0.0,
    ) -> None:
        self.node_id = node_id
        self.store = store
        self.ledger = ledger
        self.windows = windows
        self.kinds = kinds
        self.clock = clock
        self.interval_s = interval_s
        self._recorded: set[tuple[int, int, int]] = set()  # (window, shard, seq)
        self._started_us = clock()
        # Windows seen CLOSED and not yet seen cleared: cleared when this node
        # coordinates, however many windows closed after them (a clearing that keeps
        # failing must not drop out of view when later windows close on schedule).
        self._uncleared: set[int] | None = None  # None: not scanned yet
        self._settled_read = False  # every SETTLED window read once, at the first step
        self._settled_scan_at_us = 0
        self._settled_scan_after = 0  # each scan goes on after the last window it asked
        self._idle_check_at_us = clock() + int(CAP_IDLE_CHECK_S * 1e6)

    def run(self, stop: threading.Event) -> None:
        """Steps until ``stop``; the headroom shards give back after a settlement goes
        on a thread of its own, so that a home shard slow to take it back never holds up
        the cuts of a closing window."""
        returns = threading.Thread(
            target=self._run_returns, args=(stop,), name="cap-returns", daemon=True
        )
        returns.start()
        while not stop.wait(WINDOW_POLL_S):
            try:
                self.step(returns=False)
            except ClearingError as e:
                log.warning("settlement window step: %s", e)
            except Exception:
                log.exception("settlement window step failed")
        returns.join(WINDOW_POLL_S * 2)

    def _run_returns(self, stop: threading.Event) -> None:
        while not stop.wait(WINDOW_POLL_S):
            try:
                self.return_headroom()
            except Exception:
                log.exception("giving cap headroom back failed (tried again in %.0f s)",
                              WINDOW_POLL_S)  # fmt: skip

    def step(self, *, returns: bool = True) -> None:
        """One step (see the module docstring); ``returns``: also give headroom back
        (:meth:`return_headroom`), which :meth:`run` does on its own thread."""
        if self._uncleared is None:
            scanned = self.windows.recent(WINDOWS_SCANNED_AT_START)
            self._uncleared = {w.window_id for w in scanned if w.state == "CLOSED"}
        recent = self.windows.recent(WINDOWS_WATCHED)
        self._uncleared |= {w.window_id for w in recent if w.state == "CLOSED"}
        self._uncleared -= {w.window_id for w in recent if w.state != "CLOSED"}
        closing = sorted(w.window_id for w in recent if w.state == "CLOSING")
        for window_id in closing:
            self.store.cut_window(window_id)
        self._record_cuts(closing)
        self._release_settled(recent)
        if returns:
            self.return_headroom()
        if not self.store.owns_now(COORDINATOR_SHARD):
            return
        for window_id in closing:
            cut_everywhere = len(self.windows.cuts(window_id)) >= SHARD_COUNT
            if cut_everywhere and self.windows.record(
                window_id, WindowEvent.CLOSED, self.clock(), self.node_id
            ):
                log.info("settlement window %d closed: every shard cut it", window_id)
        watched = {w.window_id for w in recent}
        for window_id in sorted(self._uncleared - watched):  # older than the newest few
            if self.windows.status(window_id).state != "CLOSED":
                self._uncleared.discard(window_id)
                continue
            later = max(watched, default=window_id) - window_id
            self._clear_or_log(window_id, f" ({later} later windows closed since)")
        for w in sorted(recent, key=lambda w: w.window_id):
            if w.state == "CLOSED":
                self._clear_or_log(w.window_id)
        self._maybe_schedule(recent)

    def _release_settled(self, recent: list[WindowStatus]) -> None:
        """Tell the shards served here which windows are SETTLED: every one at the first
        step (a node that starts knows none, and its takeovers count every window not
        known settled); then the newest ones from this step's read, and older ones that
        a shard still counts by asking, :data:`SETTLED_SCAN_WINDOWS_MAX` at most every
        :data:`SETTLED_SCAN_S`."""
        settled = {w.window_id for w in recent if w.state == "SETTLED"}
        watched = {w.window_id for w in recent}
        now = self.clock()
        if not self._settled_read:
            try:
                settled |= self.windows.settled_ids()
                self._settled_read = True
                self._settled_scan_at_us = now + int(SETTLED_SCAN_S * 1e6)
            except ClearingError as e:  # the rest of the step goes on; read again next
                log.warning("the settled windows could not be read (again in %.0f s): %s",
                            WINDOW_POLL_S, e)  # fmt: skip
        elif now >= self._settled_scan_at_us:
            older = [w for w in self.store.unsettled_windows() if w not in watched]
            if older:
                self._settled_scan_at_us = now + int(SETTLED_SCAN_S * 1e6)
            # In turns, so that old windows never settled cannot hide a later one.
            after = self._settled_scan_after
            turn = [w for w in older if w > after] + [w for w in older if w <= after]
            for window_id in turn[:SETTLED_SCAN_WINDOWS_MAX]:
                self._settled_scan_after = window_id
                if self.windows.status(window_id).state == "SETTLED":
                    settled.add(window_id)
        released = self.store.release_settled(settled)
        if released:
            log.info("settlement windows %s are settled: their payments no longer count "
                     "against the net debit caps (shards served here)",
                     ", ".join(map(str, released)))  # fmt: skip

    def return_headroom(self) -> None:
        """After a settlement, the shards served here give the headroom they no longer
        need back to the home shards; every :data:`CAP_IDLE_CHECK_S`, the headroom they
        have not used for :data:`CAP_IDLE_GIVE_BACK_S`; returns not yet taken back are
        sent again."""
        now = self.clock()
        if self.store.give_back_due:
            returned = self.store.give_back()
            if returned:
                log.info("headroom no longer needed given back to the participants' home "
                         "shards: %d returns", returned)  # fmt: skip
        elif now >= self._idle_check_at_us:
            self._idle_check_at_us = now + int(CAP_IDLE_CHECK_S * 1e6)
            returned = self.store.give_back(idle_for_s=CAP_IDLE_GIVE_BACK_S)
            if returned:
                log.info("headroom unused for %.0f s given back to the participants' home "
                         "shards: %d returns", CAP_IDLE_GIVE_BACK_S, returned)  # fmt: skip
        else:
            self.store.resend_returns()

    def _clear_or_log(self, window_id: int, since: str = "") -> None:
        """Clear one window; a failure is logged (one ERROR, with ``since``: how long the
        window has waited) and tried again at the next step, and does not hold back the
        later windows' clearings or the schedule (each window's clearing reads its own
        entries only)."""
        try:
            self._clear(window_id)
        except Exception as e:  # every failure: logged, tried again at the next step
            if isinstance(e, ClearingError):
                log.error("settlement window %d not cleared%s: %s", window_id, since, e)
            else:
                log.exception("settlement window %d not cleared%s", window_id, since)

    def _record_cuts(self, closing: list[int]) -> None:
        """Record every cut that the shards served here made of a window still closing."""
        for window_id in closing:
            for shard, entry in sorted(self.store.cuts_of(window_id).items()):
                key = (window_id, shard, entry.seq)
                if key in self._recorded:
                    continue
                block = self.ledger.cut_block(shard, entry.epoch, entry.seq)
                cut = CutRow(window_id, shard, entry.epoch, entry.seq, entry.entry_hash, block)
                self.windows.put_cut(cut, self.node_id, self.clock())
                self._recorded.add(key)
        self._recorded = {k for k in self._recorded if k[0] in closing}

    def _clear(self, window_id: int) -> None:
        # Computed again (a crash between storing and CLEARED, a second coordinator): with
        # the kinds of the clearing already stored, so that it stays the same bytes.
        earlier = stored_clearing(self.windows, window_id)
        kinds = stored_kinds(earlier) if earlier is not None else self.kinds()
        with heap.freed_afterwards():  # the window is read whole
            _, clearing, root = compute_clearing(self.ledger, self.windows, window_id, kinds)
        stored = store_clearing(self.windows, window_id, clearing, root, self.clock())
        detail = f"clearing sha256 {stored.clearing_digest.hex()}, merkle root {root.hex()}"
        if self.windows.record(window_id, WindowEvent.CLEARED, self.clock(), self.node_id, detail):
            log.info("settlement window %d cleared: %s", window_id, detail)
        if self._uncleared is not None:
            self._uncleared.discard(window_id)

    def _maybe_schedule(self, recent: list[WindowStatus]) -> None:
        if self.interval_s <= 0:
            return
        closing_times = [w.at(WindowEvent.CLOSING) for w in recent]
        last = max((t for t in closing_times if t is not None), default=self._started_us)
        if self.clock() - last >= self.interval_s * 1e6:
            window_id, made = request_close(self.windows, self.node_id, self.clock(),
                                            reason="schedule")  # fmt: skip
            if made:
                log.info("settlement window %d closing on schedule", window_id)


__all__ = [
    "SETTLED_SCAN_S",
    "WINDOWS_WATCHED",
    "WINDOW_POLL_S",
    "StoredClearing",
    "WindowKeeper",
    "compute_clearing",
    "request_close",
    "store_clearing",
    "stored_clearing",
    "stored_kinds",
]
