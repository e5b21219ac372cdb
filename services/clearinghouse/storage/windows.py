"""Settlement windows on Cassandra: their events, their cuts, their clearing.

Window events are written once each with ``IF NOT EXISTS`` (a handful per window, never
on the payment path), so two nodes that race to record the same step agree on one row
and nothing is updated in place. Cut rows and clearing parts are derived from the
ledger, so every writer writes the same values; they are plain idempotent inserts.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from cassandra import ConsistencyLevel

from clearinghouse.storage.retry import with_retries

WINDOW_BUCKET = 0
WINDOWS_READ_DEFAULT = 64


class WindowEvent(enum.Enum):
    CLOSING = "CLOSING"  # an operator or the schedule asked for the window to close
    CLOSED = "CLOSED"  # every shard has cut the window
    CLEARED = "CLEARED"  # its clearing is computed and stored
    SETTLED = "SETTLED"  # an operator confirmed that the settlement instructions ran


WINDOW_STATES = ("OPEN", *[e.value for e in WindowEvent])
# A window has at most one row per event (they are written IF NOT EXISTS).
EVENT_ROWS_PER_WINDOW_MAX = len(WindowEvent)
# Windows per read when every settled window is looked for.
SETTLED_READ_PAGE_WINDOWS = 200


@dataclass(frozen=True, slots=True)
class EventRow:
    window_id: int
    event: WindowEvent
    at_us: int
    node_id: str
    detail: str


@dataclass(frozen=True, slots=True)
class CutRow:
    window_id: int
    shard: int
    epoch: int
    seq: int
    entry_hash: bytes
    # The block of the epoch's stream that holds the cut entry, if the recorder knew it:
    # the next window's entries of this epoch are read from there (migration 013).
    block: int | None = None


@dataclass(frozen=True, slots=True)
class WindowStatus:
    """A window and what happened to it, newest event last."""

    window_id: int
    events: tuple[EventRow, ...]

    @property
    def state(self) -> str:
        done = {e.event for e in self.events}
        for ev in reversed(WindowEvent):
            if ev in done:
                return ev.value
        return "OPEN"

    def at(self, event: WindowEvent) -> int | None:
        return next((e.at_us for e in self.events if e.event is event), None)


class CassandraWindows:
    def __init__(self, session: Any, consistency: int = ConsistencyLevel.QUORUM) -> None:
        self.session = session
        p = session.prepare
        self._insert_event = p(
            "INSERT INTO settlement_windows (bucket, window_id, event, at_us, node_id, detail) "
            "VALUES (?, ?, ?, ?, ?, ?) IF NOT EXISTS"
        )
        self._select_events = p(
            "SELECT window_id, event, at_us, node_id, detail FROM settlement_windows "
            "WHERE bucket = ? LIMIT ?"
        )
        self._select_events_before = p(
            "SELECT window_id, event, at_us, node_id, detail FROM settlement_windows "
            "WHERE bucket = ? AND window_id < ? LIMIT ?"
        )
        self._select_window = p(
            "SELECT window_id, event, at_us, node_id, detail FROM settlement_windows "
            "WHERE bucket = ? AND window_id = ?"
        )
        self._insert_cut = p(
            "INSERT INTO window_cuts (window_id, shard, epoch, seq, entry_hash, node_id, at_us) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)"
        )
        # A cut recorded without its block leaves a block recorded by another as it is.
        self._insert_cut_with_block = p(
            "INSERT INTO window_cuts (window_id, shard, epoch, seq, entry_hash, node_id, at_us, "
            "stream_block) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
        )
        self._select_cuts = p(
            "SELECT shard, epoch, seq, entry_hash, stream_block FROM window_cuts "
            "WHERE window_id = ?"
        )
        self._insert_part = p(
            "INSERT INTO window_clearing (window_id, part, body, digest, at_us) "
            "VALUES (?, ?, ?, ?, ?)"
        )
        self._select_parts = p("SELECT part, body, digest FROM window_clearing WHERE window_id = ?")
        for stmt in (
            self._select_events, self._select_events_before, self._select_window,
            self._insert_cut, self._insert_cut_with_block, self._select_cuts,
            self._insert_part, self._select_parts,
        ):  # fmt: skip
            stmt.consistency_level = consistency
            stmt.is_idempotent = True
        self._insert_event.consistency_level = consistency
        self._insert_event.serial_consistency_level = ConsistencyLevel.SERIAL

    # -- events -------------------------------------------------------------------------

    def record(self, window_id: int, event: WindowEvent, at_us: int, node_id: str,
               detail: str = "") -> bool:  # fmt: skip
        """Record ``event`` for the window unless it is there; whether this call did."""
        values = (WINDOW_BUCKET, window_id, event.value, at_us, node_id, detail)
        result = with_retries(
            f"recording {event.value} of window {window_id}",
            lambda: self.session.execute(self._insert_event, values),
        )
        return bool(result.was_applied)

    def recent(
        self, limit: int = WINDOWS_READ_DEFAULT, before_window_id: int = 0
    ) -> list[WindowStatus]:
        """The ``limit`` newest windows that have events (fewer if there are fewer),
        newest first, each with all of its events; with ``before_window_id``, only
        windows older than it (a page after the one that ended there).

        The rows come newest window first, each window's events together, at most
        :data:`EVENT_ROWS_PER_WINDOW_MAX` of them: that many rows per window wanted hold
        the first ``limit`` windows whole (a window after them may be cut short; it is
        dropped).
        """
        if limit <= 0:
            return []
        rows_max = limit * EVENT_ROWS_PER_WINDOW_MAX
        rows = with_retries(
            "reading settlement windows",
            lambda: list(
                self.session.execute(
                    self._select_events_before, (WINDOW_BUCKET, before_window_id, rows_max)
                )
                if before_window_id > 0
                else self.session.execute(self._select_events, (WINDOW_BUCKET, rows_max))
            ),
        )
        by_window: dict[int, list[EventRow]] = {}
        for r in rows:
            by_window.setdefault(r.window_id, []).append(_event(r))
        newest = sorted(by_window.items(), reverse=True)[:limit]
        return [
            WindowStatus(w, tuple(sorted(evs, key=lambda e: list(WindowEvent).index(e.event))))
            for w, evs in newest
        ]

    def settled_ids(self) -> frozenset[int]:
        """Every window SETTLED, read :data:`SETTLED_READ_PAGE_WINDOWS` windows a page."""
        out: set[int] = set()
        before = 0
        while True:
            page = self.recent(SETTLED_READ_PAGE_WINDOWS, before)
            out.update(w.window_id for w in page if w.state == "SETTLED")
            if len(page) < SETTLED_READ_PAGE_WINDOWS:
                return frozenset(out)
            before = page[-1].window_id

    def status(self, window_id: int) -> WindowStatus:
        rows = with_retries(
            f"reading window {window_id}",
            lambda: list(self.session.execute(self._select_window, (WINDOW_BUCKET, window_id))),
        )
        events = sorted((_event(r) for r in rows), key=lambda e: list(WindowEvent).index(e.event))
        return WindowStatus(window_id, tuple(events))

    def current(self) -> int:
        """The open window: one past the newest window that was asked to close."""
        recent = self.recent(1)
        return recent[0].window_id + 1 if recent else 1

    # -- cuts and clearing --------------------------------------------------------------

    def put_cut(self, cut: CutRow, node_id: str, at_us: int) -> None:
        values: tuple[Any, ...] = (
            cut.window_id, cut.shard, cut.epoch, cut.seq, cut.entry_hash, node_id, at_us,
        )  # fmt: skip
        statement = self._insert_cut
        if cut.block is not None:
            statement, values = self._insert_cut_with_block, (*values, cut.block)
        with_retries("recording a window cut", lambda: self.session.execute(statement, values))

    def cuts(self, window_id: int) -> dict[int, CutRow]:
        rows = with_retries(
            f"reading the cuts of window {window_id}",
            lambda: list(self.session.execute(self._select_cuts, (window_id,))),
        )
        return {
            r.shard: CutRow(window_id, r.shard, r.epoch, r.seq, r.entry_hash, r.stream_block)
            for r in rows
        }

    def put_part(self, window_id: int, part: str, body: str, digest: bytes, at_us: int) -> None:
        values = (window_id, part, body, digest, at_us)
        with_retries(
            "storing a window's clearing", lambda: self.session.execute(self._insert_part, values)
        )

    def parts(self, window_id: int) -> dict[str, tuple[str, bytes]]:
        rows = with_retries(
            f"reading the clearing of window {window_id}",
            lambda: list(self.session.execute(self._select_parts, (window_id,))),
        )
        return {r.part: (r.body, r.digest) for r in rows}


def _event(r: Any) -> EventRow:
    return EventRow(r.window_id, WindowEvent(r.event), r.at_us, r.node_id or "", r.detail or "")


__all__ = [
    "EVENT_ROWS_PER_WINDOW_MAX",
    "WINDOWS_READ_DEFAULT",
    "WINDOW_STATES",
    "CassandraWindows",
    "CutRow",
    "EventRow",
    "WindowEvent",
    "WindowStatus",
]
