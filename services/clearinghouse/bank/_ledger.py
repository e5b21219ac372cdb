"""The simulated bank's own book of transfers, keyed by the switch's ``switch_ref``.

The book is the bank's side of the idempotency contract of ``BankService``:

* The first Debit or Credit with a ``switch_ref`` is decided (by the caller's
  :class:`Decision`) and, if approved, applied. Every repeat returns the same answer
  and applies nothing. A repeat that carries a different transfer is refused with
  :class:`SwitchRefReused` and changes nothing.
* Reverse of an APPROVED transfer makes it REVERSED; of a DECLINED or REVERSED one it
  changes nothing. Reverse of a ``switch_ref`` the bank never saw records a tombstone: a
  DECLINED record with decline code ``REVERSED_BEFORE_ARRIVAL``, which is what a late
  Debit or Credit with that reference then gets.
* Customer balances are not simulated; the book keeps per-currency totals of what it
  applied and reversed, which is what reconciliation tests compare with the switch.

Every change is first appended to a JSON-lines journal and only then made in memory, and
the journal is replayed (streamed) on start, so a restarted bank answers inquiries and
repeats as before. Lines are flushed but not fsynced: the simulator must survive a killed
process, not a lost machine.

The journal is also the book's store. What stays in memory is one small integer per
``switch_ref``: where its transfer's line starts in the journal and its status. A repeat,
an inquiry or a reversal (a few per thousand transfers) reads that line back. A bank that
has taken a quarter of a million transfers holds about 40 MiB for them instead of 130;
see docs/PERFORMANCE.md. Without a path the journal is a buffer in memory (tests).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import IO, Any

from clearinghouse._invariant import InvariantViolation, invariant
from clearinghouse.bank._behaviour import Decision, TransferKind

_log = logging.getLogger(__name__)

JOURNAL_FORMAT_VERSION = 1
REVERSED_BEFORE_ARRIVAL = "REVERSED_BEFORE_ARRIVAL"
BANK_REF_DIGITS = 10


class TxnStatus(StrEnum):
    """The status of a transfer in the book. An unknown reference has no record."""

    APPROVED = "APPROVED"
    DECLINED = "DECLINED"
    REVERSED = "REVERSED"


class SwitchRefReused(ValueError):
    """A Debit or Credit reused a switch_ref of a different transfer."""


class JournalError(RuntimeError):
    """The journal cannot be read back: it is damaged or belongs to another bank."""


@dataclass(frozen=True, slots=True)
class Transfer:
    """What a Debit or Credit asks for. Two requests are the same transfer iff equal."""

    kind: TransferKind
    institution_id: str
    bank_account: str
    amount_minor: int
    currency: str


@dataclass(frozen=True, slots=True)
class TxnRecord:
    """One switch_ref's entry in the book."""

    switch_ref: str
    # None for a tombstone: a reference reversed before any transfer arrived with it.
    transfer: Transfer | None
    status: TxnStatus
    bank_ref: str
    decline_code: str


@dataclass(frozen=True, slots=True)
class TransferAnswer:
    """The answer to a Debit or Credit."""

    record: TxnRecord
    # True when the reference was already in the book and nothing was applied now.
    replayed: bool


@dataclass(frozen=True, slots=True)
class CurrencyTotals:
    """What the bank applied and reversed in one currency, in minor units and counts."""

    debits_applied_minor: int = 0
    credits_applied_minor: int = 0
    debits_reversed_minor: int = 0
    credits_reversed_minor: int = 0
    debits_applied: int = 0
    credits_applied: int = 0
    reversals: int = 0

    @property
    def net_debits_minor(self) -> int:
        """Debits that still stand: applied and not reversed."""
        return self.debits_applied_minor - self.debits_reversed_minor

    @property
    def net_credits_minor(self) -> int:
        """Credits that still stand: applied and not reversed."""
        return self.credits_applied_minor - self.credits_reversed_minor


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


# A switch_ref's slot in the index: the offset of its transfer (or tombstone) line in
# the journal, shifted left by _STATUS_BITS, with the record's status in the low bits.
_STATUS_BITS = 2
_STATUS_MASK = (1 << _STATUS_BITS) - 1
_STATUS_BY_CODE = (TxnStatus.APPROVED, TxnStatus.DECLINED, TxnStatus.REVERSED)
_CODE_BY_STATUS = {status: code for code, status in enumerate(_STATUS_BY_CODE)}
# A journal line is read back in pieces of this size until its newline.
_READ_BACK_BYTES = 1024


class _Journal:
    """The append-only bytes of the book: a file, or a buffer when the book has no path.
    ``append`` returns where the line starts; ``line_at`` reads a line back."""

    def __init__(self, path: Path | None) -> None:
        self._file: IO[bytes] | None = None
        self._buffer = bytearray()
        self.closed = False
        self.size = 0
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Read and append, unbuffered: a line is in the file (the OS's) when append
            # returns, or not at all; lines are read back with pread while the book grows.
            self._file = path.open("a+b", buffering=0)
            self.size = os.fstat(self._file.fileno()).st_size

    def append(self, line: bytes) -> int:
        """Write ``line`` whole at the end, or raise with the journal as it was (a write
        that failed or was cut short, e.g. a full disk, is cut off again): every offset
        handed out stays the start of its own line."""
        if self.closed:
            raise JournalError("the bank's book is closed")
        offset = self.size
        if self._file is None:
            self._buffer += line
        else:
            fd = self._file.fileno()
            try:
                written = os.write(fd, line)
                if written != len(line):
                    raise OSError(f"journal write cut short: {written} of {len(line)} bytes")
            except OSError:
                os.ftruncate(fd, offset)
                raise
        self.size += len(line)
        return offset

    def line_at(self, offset: int) -> bytes:
        if self.closed:
            raise JournalError("the bank's book is closed")
        invariant(0 <= offset < self.size, "a journal offset lies inside the journal")
        if self._file is None:
            return bytes(self._buffer[offset : self._buffer.index(b"\n", offset)])
        fd = self._file.fileno()
        piece = b""
        while True:
            chunk = os.pread(fd, _READ_BACK_BYTES, offset + len(piece))
            newline = chunk.find(b"\n")
            if newline >= 0:
                return piece + chunk[:newline]
            invariant(chunk, "every line of the journal ends with a newline")
            piece += chunk

    def close(self) -> None:
        self.closed = True
        if self._file is not None:
            self._file.close()


class _Totals:
    """Per-currency counters, mutable; :meth:`BankLedger.totals` hands out snapshots."""

    __slots__ = ("applied", "applied_minor", "reversals", "reversed_minor")

    def __init__(self) -> None:
        # Indexed by kind: [debits, credits].
        self.applied_minor = [0, 0]
        self.applied = [0, 0]
        self.reversed_minor = [0, 0]
        self.reversals = 0

    def snapshot(self) -> CurrencyTotals:
        return CurrencyTotals(
            debits_applied_minor=self.applied_minor[0],
            credits_applied_minor=self.applied_minor[1],
            debits_reversed_minor=self.reversed_minor[0],
            credits_reversed_minor=self.reversed_minor[1],
            debits_applied=self.applied[0],
            credits_applied=self.applied[1],
            reversals=self.reversals,
        )


def _kind_index(kind: TransferKind) -> int:
    return 0 if kind is TransferKind.DEBIT else 1


class BankLedger:
    """The book of one bank. Thread-safe: one lock orders all changes and reads."""

    def __init__(self, bank_id: str, journal_path: Path | None = None) -> None:
        invariant(bank_id, "a bank needs an id")
        self.bank_id = bank_id
        self._lock = threading.Lock()
        # switch_ref -> (line offset << _STATUS_BITS) | status code; see _Journal.
        self._index: dict[str, int] = {}
        self._totals: dict[str, _Totals] = {}
        self.journal_path = journal_path
        self._journal = _Journal(journal_path)
        replayed = 0
        if journal_path is not None:
            try:
                replayed = self._replay(journal_path)
            except BaseException:
                self._journal.close()
                raise
            _log.info("bank %s: replayed %d journal entries", bank_id, replayed)
        if replayed == 0:
            self._append({"op": "open", "bank_id": bank_id, "v": JOURNAL_FORMAT_VERSION})

    # ---- the BankService operations -------------------------------------------------

    def transfer(self, switch_ref: str, transfer: Transfer, decision: Decision) -> TransferAnswer:
        """Apply ``transfer`` once under ``switch_ref``; ``decision`` is used only if the
        reference is new. Raises :class:`SwitchRefReused` if the reference is known
        with a different transfer."""
        with self._lock:
            known = self._record(switch_ref)
            if known is not None:
                if known.transfer is not None and known.transfer != transfer:
                    raise SwitchRefReused(
                        f"switch_ref {switch_ref!r} was used for a different transfer"
                    )
                return TransferAnswer(record=known, replayed=True)
            status = TxnStatus.APPROVED if decision.approved else TxnStatus.DECLINED
            record = TxnRecord(
                switch_ref=switch_ref,
                transfer=transfer,
                status=status,
                bank_ref=self._next_bank_ref(),
                decline_code="" if decision.approved else decision.decline_code,
            )
            self._put(record, self._append(_record_entry("transfer", record)))
            return TransferAnswer(record=record, replayed=False)

    def inquire(self, switch_ref: str) -> TxnRecord | None:
        """The record of ``switch_ref``, or None if the bank never saw it."""
        with self._lock:
            return self._record(switch_ref)

    def reverse(self, switch_ref: str, reason: str) -> TxnRecord:
        """Undo ``switch_ref``'s transfer, or make sure it never applies; idempotent."""
        with self._lock:
            known = self._record(switch_ref)
            if known is None:
                tombstone = TxnRecord(
                    switch_ref=switch_ref,
                    transfer=None,
                    status=TxnStatus.DECLINED,
                    bank_ref=self._next_bank_ref(),
                    decline_code=REVERSED_BEFORE_ARRIVAL,
                )
                entry = _record_entry("tombstone", tombstone)
                entry["reason"] = reason
                self._put(tombstone, self._append(entry))
                return tombstone
            if known.status is not TxnStatus.APPROVED:
                return known
            self._append({"op": "reverse", "ref": switch_ref, "reason": reason})
            self._reverse_in_memory(known)
            return replace(known, status=TxnStatus.REVERSED)

    # ---- inspection -----------------------------------------------------------------

    def totals(self) -> dict[str, CurrencyTotals]:
        """A snapshot of the per-currency totals."""
        with self._lock:
            return {currency: t.snapshot() for currency, t in self._totals.items()}

    def __len__(self) -> int:
        with self._lock:
            return len(self._index)

    def close(self) -> None:
        """Close the journal; the book must not be changed afterwards."""
        with self._lock:
            self._journal.close()

    # ---- internals; callers hold the lock -------------------------------------------

    def _next_bank_ref(self) -> str:
        # Every record gets a reference, tombstones included, so counting records
        # numbers them without gaps and a replayed book continues the same sequence.
        return f"{self.bank_id}-{len(self._index) + 1:0{BANK_REF_DIGITS}d}"

    def _record(self, switch_ref: str) -> TxnRecord | None:
        """The record of ``switch_ref`` read back from its journal line, or None."""
        slot = self._index.get(switch_ref)
        if slot is None:
            return None
        line = self._journal.line_at(slot >> _STATUS_BITS)
        record = _record_from_entry(json.loads(line))
        invariant(record.switch_ref == switch_ref, "an index slot names its own line")
        return replace(record, status=_STATUS_BY_CODE[slot & _STATUS_MASK])

    def _put(self, record: TxnRecord, offset: int) -> None:
        invariant(record.switch_ref not in self._index, "a switch_ref is recorded once")
        self._index[record.switch_ref] = (offset << _STATUS_BITS) | _CODE_BY_STATUS[record.status]
        transfer = record.transfer
        if transfer is None or record.status is not TxnStatus.APPROVED:
            return
        t = self._totals.get(transfer.currency)
        if t is None:
            t = self._totals[transfer.currency] = _Totals()
        kind = _kind_index(transfer.kind)
        t.applied_minor[kind] += transfer.amount_minor
        t.applied[kind] += 1

    def _reverse_in_memory(self, known: TxnRecord) -> None:
        transfer = known.transfer
        if transfer is None or known.status is not TxnStatus.APPROVED:
            raise InvariantViolation(f"only an applied transfer can be reversed: {known}")
        slot = self._index[known.switch_ref]
        self._index[known.switch_ref] = (slot & ~_STATUS_MASK) | _CODE_BY_STATUS[TxnStatus.REVERSED]
        t = self._totals[transfer.currency]
        t.reversed_minor[_kind_index(transfer.kind)] += transfer.amount_minor
        t.reversals += 1

    def _append(self, entry: dict[str, Any]) -> int:
        """Write ``entry`` as the journal's next line; returns where the line starts."""
        entry["at"] = _now_iso()
        line = json.dumps(entry, separators=(",", ":"), sort_keys=True) + "\n"
        return self._journal.append(line.encode("utf-8"))

    def _replay(self, path: Path) -> int:
        """Rebuild the index and totals from the journal, one line at a time; returns the
        number of entries read. The journal is open: a reversal reads its transfer back."""
        offset = 0
        number = 0
        with path.open("rb") as journal:
            for raw in journal:
                if not raw.endswith(b"\n"):
                    # A process killed in the middle of a write leaves a last line
                    # without its newline. That change was never answered, so dropping
                    # it is safe, and the file is cut back so that the next entry does
                    # not get glued to the torn one.
                    _log.warning(
                        "bank %s: dropping a torn last journal line (%d bytes) in %s",
                        self.bank_id,
                        len(raw),
                        path,
                    )
                    with path.open("r+b") as torn:
                        torn.truncate(offset)
                    break
                number += 1
                try:
                    self._replay_entry(json.loads(raw), number, offset)
                except (ValueError, KeyError, TypeError) as exc:
                    raise JournalError(f"{path}:{number}: cannot replay {raw!r}: {exc}") from exc
                offset += len(raw)
        self._journal.size = offset
        return number

    def _replay_entry(self, entry: dict[str, Any], number: int, offset: int) -> None:
        op = entry["op"]
        if number == 1:
            if op != "open" or entry["v"] != JOURNAL_FORMAT_VERSION:
                raise ValueError("the first entry must open a version 1 journal")
            if entry["bank_id"] != self.bank_id:
                raise JournalError(
                    f"the journal belongs to bank {entry['bank_id']}, not {self.bank_id}"
                )
            return
        if op in ("transfer", "tombstone"):
            record = _record_from_entry(entry)
            if record.switch_ref in self._index:
                raise ValueError(f"switch_ref {record.switch_ref!r} is recorded twice")
            self._put(record, offset)
        elif op == "reverse":
            known = self._record(str(entry["ref"]))
            if known is None:
                raise KeyError(entry["ref"])
            if known.status is not TxnStatus.APPROVED:
                raise ValueError(f"reverses a transfer that is {known.status}")
            self._reverse_in_memory(known)
        else:
            raise ValueError(f"unknown op {op!r}")


def _record_entry(op: str, record: TxnRecord) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "op": op,
        "ref": record.switch_ref,
        "status": record.status.value,
        "bank_ref": record.bank_ref,
        "decline_code": record.decline_code,
    }
    if record.transfer is not None:
        entry.update(
            kind=record.transfer.kind.value,
            institution_id=record.transfer.institution_id,
            bank_account=record.transfer.bank_account,
            amount_minor=record.transfer.amount_minor,
            currency=record.transfer.currency,
        )
    return entry


def _record_from_entry(entry: dict[str, Any]) -> TxnRecord:
    transfer = None
    if entry["op"] == "transfer":
        transfer = Transfer(
            kind=TransferKind(entry["kind"]),
            institution_id=str(entry["institution_id"]),
            bank_account=str(entry["bank_account"]),
            amount_minor=int(entry["amount_minor"]),
            currency=str(entry["currency"]),
        )
    return TxnRecord(
        switch_ref=str(entry["ref"]),
        transfer=transfer,
        status=TxnStatus(entry["status"]),
        bank_ref=str(entry["bank_ref"]),
        decline_code=str(entry["decline_code"]),
    )
