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

Every change is first appended to a JSON-lines journal (when a path is given) and only
then made in memory, and the journal is replayed on start, so a restarted bank answers
inquiries and repeats as before. Lines are flushed but not fsynced: the simulator must
survive a killed process, not a lost machine.
"""

from __future__ import annotations

import json
import logging
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


class BankLedger:
    """The book of one bank. Thread-safe: one lock orders all changes and reads."""

    def __init__(self, bank_id: str, journal_path: Path | None = None) -> None:
        invariant(bank_id, "a bank needs an id")
        self.bank_id = bank_id
        self._lock = threading.Lock()
        self._records: dict[str, TxnRecord] = {}
        self._totals: dict[str, CurrencyTotals] = {}
        self._journal: IO[str] | None = None
        self.journal_path = journal_path
        if journal_path is not None:
            replayed = self._replay(journal_path)
            self._journal = journal_path.open("a", encoding="utf-8")
            if replayed == 0:
                self._append({"op": "open", "bank_id": bank_id, "v": JOURNAL_FORMAT_VERSION})
            _log.info("bank %s: replayed %d journal entries", bank_id, replayed)

    # ---- the BankService operations -------------------------------------------------

    def transfer(self, switch_ref: str, transfer: Transfer, decision: Decision) -> TransferAnswer:
        """Apply ``transfer`` once under ``switch_ref``; ``decision`` is used only if the
        reference is new. Raises :class:`SwitchRefReused` if the reference is known
        with a different transfer."""
        with self._lock:
            known = self._records.get(switch_ref)
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
            self._append(_record_entry("transfer", record))
            self._put(record)
            return TransferAnswer(record=record, replayed=False)

    def inquire(self, switch_ref: str) -> TxnRecord | None:
        """The record of ``switch_ref``, or None if the bank never saw it."""
        with self._lock:
            return self._records.get(switch_ref)

    def reverse(self, switch_ref: str, reason: str) -> TxnRecord:
        """Undo ``switch_ref``'s transfer, or make sure it never applies; idempotent."""
        with self._lock:
            known = self._records.get(switch_ref)
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
                self._append(entry)
                self._put(tombstone)
                return tombstone
            if known.status is not TxnStatus.APPROVED:
                return known
            self._append({"op": "reverse", "ref": switch_ref, "reason": reason})
            return self._reverse_in_memory(known)

    # ---- inspection -----------------------------------------------------------------

    def totals(self) -> dict[str, CurrencyTotals]:
        """A snapshot of the per-currency totals."""
        with self._lock:
            return dict(self._totals)

    def __len__(self) -> int:
        with self._lock:
            return len(self._records)

    def close(self) -> None:
        """Close the journal; the book must not be changed afterwards."""
        with self._lock:
            if self._journal is not None:
                self._journal.close()
                self._journal = None

    # ---- internals; callers hold the lock -------------------------------------------

    def _next_bank_ref(self) -> str:
        # Every record gets a reference, tombstones included, so counting records
        # numbers them without gaps and a replayed book continues the same sequence.
        return f"{self.bank_id}-{len(self._records) + 1:0{BANK_REF_DIGITS}d}"

    def _put(self, record: TxnRecord) -> None:
        invariant(record.switch_ref not in self._records, "a switch_ref is recorded once")
        self._records[record.switch_ref] = record
        transfer = record.transfer
        if transfer is None or record.status is not TxnStatus.APPROVED:
            return
        t = self._totals.get(transfer.currency, CurrencyTotals())
        if transfer.kind is TransferKind.DEBIT:
            t = replace(
                t,
                debits_applied_minor=t.debits_applied_minor + transfer.amount_minor,
                debits_applied=t.debits_applied + 1,
            )
        else:
            t = replace(
                t,
                credits_applied_minor=t.credits_applied_minor + transfer.amount_minor,
                credits_applied=t.credits_applied + 1,
            )
        self._totals[transfer.currency] = t

    def _reverse_in_memory(self, known: TxnRecord) -> TxnRecord:
        transfer = known.transfer
        if transfer is None or known.status is not TxnStatus.APPROVED:
            raise InvariantViolation(f"only an applied transfer can be reversed: {known}")
        reversed_record = replace(known, status=TxnStatus.REVERSED)
        self._records[known.switch_ref] = reversed_record
        t = self._totals[transfer.currency]
        if transfer.kind is TransferKind.DEBIT:
            t = replace(t, debits_reversed_minor=t.debits_reversed_minor + transfer.amount_minor)
        else:
            t = replace(t, credits_reversed_minor=t.credits_reversed_minor + transfer.amount_minor)
        self._totals[transfer.currency] = replace(t, reversals=t.reversals + 1)
        return reversed_record

    def _append(self, entry: dict[str, Any]) -> None:
        if self._journal is None:
            return
        entry["at"] = _now_iso()
        self._journal.write(json.dumps(entry, separators=(",", ":"), sort_keys=True) + "\n")
        self._journal.flush()

    def _replay(self, path: Path) -> int:
        """Rebuild the book from the journal; returns the number of entries read."""
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            return 0
        data = path.read_bytes()
        # A process killed in the middle of a write leaves a last line without its
        # newline. That change was never answered, so dropping it is safe, and the file
        # is cut back so that the next entry does not get glued to the torn one.
        complete_end = data.rfind(b"\n") + 1
        if complete_end < len(data):
            _log.warning(
                "bank %s: dropping a torn last journal line (%d bytes) in %s",
                self.bank_id,
                len(data) - complete_end,
                path,
            )
            with path.open("r+b") as torn:
                torn.truncate(complete_end)
        lines = data[:complete_end].decode("utf-8").splitlines()
        for number, line in enumerate(lines, start=1):
            try:
                self._replay_entry(json.loads(line), number)
            except (ValueError, KeyError, TypeError) as exc:
                raise JournalError(f"{path}:{number}: cannot replay {line!r}: {exc}") from exc
        return len(lines)

    def _replay_entry(self, entry: dict[str, Any], number: int) -> None:
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
            if record.switch_ref in self._records:
                raise ValueError(f"switch_ref {record.switch_ref!r} is recorded twice")
            self._put(record)
        elif op == "reverse":
            known = self._records[entry["ref"]]
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
