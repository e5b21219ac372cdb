"""The load generator's durable log: every payment it sent and what it was told.

JSON lines, one object per line, appended by one writer thread that flushes and fsyncs
in batches (every ``FSYNC_INTERVAL_S`` or ``FSYNC_BATCH_RECORDS`` records, whichever
comes first, and on close): a crash of the load generator loses at most the last
batch. Each line has ``ev``:

* ``run`` - the header: scenario, seed, rate, duration, UTC start.
* ``send`` - a payment's first send: its order (key, ids, type, payer, payee, amount,
  currency, bank, the switch_ref the bank will see), single or batched, zone, ``t``.
* ``attempt`` - one attempt that failed: zone, ``t0``/``t1``, gRPC code, reason,
  ``retry_after_ms``. A batch call that failed as a whole writes one per order.
* ``ack`` - acknowledged: the payment's state, ``replayed``, zone, ``t0``/``t1``.
* ``rejected`` - refused for good (not retryable): code and reason.
* ``unknown`` - no answer within the retry budget (deadline or unavailable to the end).
* ``resolved`` - what a later ``GetPayment`` said of an unknown or undecided payment:
  its state, ``NOT_FOUND`` or ``UNRESOLVED`` (the query itself never got an answer).
* ``event`` - a drill event (fault injected, cleared), for the timeline.

``t``, ``t0`` and ``t1`` are seconds since the run started (monotonic clock). The
in-memory view and the file are built by the same function (:func:`apply_record`), so
:func:`read_log` gives back exactly what the run saw.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FSYNC_INTERVAL_S = 0.25
FSYNC_BATCH_RECORDS = 500
WRITER_JOIN_TIMEOUT_S = 30.0

ACK = "ack"
REJECTED = "rejected"
UNKNOWN = "unknown"
PENDING = "pending"
NOT_FOUND = "NOT_FOUND"
UNRESOLVED = "UNRESOLVED"
FINAL_STATES = frozenset({"APPROVED", "DECLINED", "FAILED", "REVERSED"})


@dataclass(frozen=True, slots=True)
class Attempt:
    zone: str
    t0: float
    t1: float
    # "OK" for the attempt that got the answer, else the gRPC status name.
    code: str
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.code == "OK"


@dataclass
class PaymentTrace:
    """One payment as the client saw it, from its first send to its last answer."""

    key: str
    payment_id: str
    institution_id: str
    type: str
    payer_id: str
    payee_id: str
    amount_minor: int
    currency: str
    bank_id: str
    switch_ref: str
    batched: bool
    t_sent: float
    attempts: list[Attempt] = field(default_factory=list)
    outcome: str = PENDING
    # The state acknowledged (outcome ack), e.g. "APPROVED".
    state: str = ""
    # The last gRPC code and reason (outcomes rejected and unknown).
    code: str = ""
    reason: str = ""
    replayed: bool = False
    t_done: float | None = None
    # What a later GetPayment said (see the module docstring); "" if never asked.
    resolution: str = ""

    @property
    def latency_s(self) -> float | None:
        return None if self.t_done is None else self.t_done - self.t_sent

    @property
    def retries(self) -> int:
        return max(0, len(self.attempts) - 1)


@dataclass
class LogContents:
    header: dict[str, Any] = field(default_factory=dict)
    traces: dict[str, PaymentTrace] = field(default_factory=dict)
    events: list[tuple[float, str]] = field(default_factory=list)


def apply_record(view: LogContents, rec: dict[str, Any]) -> None:
    """Fold one record into ``view``: the one place the log's meaning is defined."""
    ev = rec["ev"]
    if ev == "run":
        view.header = dict(rec)
        return
    if ev == "event":
        view.events.append((float(rec["t"]), str(rec["what"])))
        return
    if ev == "send":
        view.traces[rec["key"]] = PaymentTrace(
            key=rec["key"], payment_id=rec["payment_id"], institution_id=rec["institution_id"],
            type=rec["type"], payer_id=rec["payer_id"], payee_id=rec["payee_id"],
            amount_minor=int(rec["amount_minor"]), currency=rec["currency"],
            bank_id=rec["bank_id"], switch_ref=rec["switch_ref"], batched=bool(rec["batched"]),
            t_sent=float(rec["t"]),
        )  # fmt: skip
        return
    tr = view.traces[rec["key"]]
    if ev == "attempt":
        tr.attempts.append(
            Attempt(rec["zone"], rec["t0"], rec["t1"], rec["code"], rec.get("reason", ""))
        )
    elif ev == ACK:
        tr.attempts.append(Attempt(rec["zone"], rec["t0"], rec["t1"], "OK"))
        tr.outcome, tr.state, tr.replayed, tr.t_done = ACK, rec["state"], rec["replayed"], rec["t1"]
    elif ev in (REJECTED, UNKNOWN):
        if ev == REJECTED:
            tr.attempts.append(
                Attempt(rec["zone"], rec["t0"], rec["t1"], rec["code"], rec.get("reason", ""))
            )
        tr.outcome, tr.code, tr.reason, tr.t_done = ev, rec["code"], rec["reason"], rec["t1"]
    elif ev == "resolved":
        tr.resolution = rec["state"]
    else:
        raise ValueError(f"unknown client log record {ev!r}")


class ClientLog:
    """Records go to an in-memory view at once and to the file in fsync'd batches."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.view = LogContents()
        self.records = 0
        self.fsyncs = 0
        self.error: BaseException | None = None
        self._closed = False
        self._lock = threading.Lock()
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._file = path.open("a", encoding="utf-8")
        self._thread = threading.Thread(target=self._write_loop, name="drill-log", daemon=True)
        self._thread.start()

    def record(self, rec: dict[str, Any]) -> None:
        line = json.dumps(rec, separators=(",", ":"), sort_keys=True)
        with self._lock:
            apply_record(self.view, rec)
            self.records += 1
        self._queue.put(line)

    def traces(self) -> list[PaymentTrace]:
        with self._lock:
            return list(self.view.traces.values())

    def close(self) -> None:
        """Write and fsync what is queued; raise if the file could not be written.
        Closing again does nothing."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join(WRITER_JOIN_TIMEOUT_S)
        if self._thread.is_alive():
            raise RuntimeError(f"the client log writer did not finish within "
                               f"{WRITER_JOIN_TIMEOUT_S:.0f}s: {self.path}")  # fmt: skip
        if self.error is not None:
            raise RuntimeError(f"the client log {self.path} could not be written") from self.error

    def _sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self.fsyncs += 1

    def _write_loop(self) -> None:
        unsynced = 0
        last_sync = time.monotonic()
        try:
            while True:
                try:
                    line = self._queue.get(timeout=FSYNC_INTERVAL_S)
                except queue.Empty:
                    line = ""
                if line is None:
                    break
                if line:
                    self._file.write(line + "\n")
                    unsynced += 1
                due = time.monotonic() - last_sync >= FSYNC_INTERVAL_S
                if unsynced and (unsynced >= FSYNC_BATCH_RECORDS or due):
                    self._sync()
                    unsynced, last_sync = 0, time.monotonic()
            self._sync()
        except OSError as e:
            self.error = e
        finally:
            self._file.close()


def read_log(path: Path) -> LogContents:
    """The log read back; a torn last line (the writer was killed mid-line) is dropped."""
    view = LogContents()
    lines = path.read_text(encoding="utf-8").split("\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            if number == len(lines):
                break  # torn last line, never acknowledged as written
            raise ValueError(f"{path}:{number}: not JSON: {line[:80]!r}") from None
        apply_record(view, rec)
    return view


__all__ = [
    "ACK",
    "FINAL_STATES",
    "NOT_FOUND",
    "PENDING",
    "REJECTED",
    "UNKNOWN",
    "UNRESOLVED",
    "Attempt",
    "ClientLog",
    "LogContents",
    "PaymentTrace",
    "apply_record",
    "read_log",
]
