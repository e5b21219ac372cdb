"""The interfaces the payment processor depends on; real and fake implementations.

The processor never imports Cassandra or gRPC: storage errors arrive as the domain's
``Unavailable``; bank answers arrive as a :class:`BankOutcome`.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from clearinghouse.domain import ClearingError, Money, Participant, PaymentType, Posting
from clearinghouse.domain.chain import LedgerEntry
from clearinghouse.switch.records import PaymentRecord, StepRecord


class BankAnswer(enum.Enum):
    APPROVED = "APPROVED"
    DECLINED = "DECLINED"
    REVERSED = "REVERSED"
    UNKNOWN_REF = "UNKNOWN_REF"  # the bank has never seen this reference
    NO_ANSWER = "NO_ANSWER"  # timed out or unreachable: the outcome is unknown


@dataclass(frozen=True, slots=True)
class BankOutcome:
    answer: BankAnswer
    bank_ref: str = ""
    detail: str = ""


@dataclass(frozen=True, slots=True)
class BankTransfer:
    """What the switch asks a bank to do; ``switch_ref`` is the bank's idempotency key."""

    kind: PaymentType
    switch_ref: str
    institution_id: str
    account: str
    amount: Money


class BankGateway(Protocol):
    def transfer(self, bank: Participant, req: BankTransfer, deadline_s: float) -> BankOutcome: ...

    def transfer_many(
        self, bank: Participant, reqs: Sequence[BankTransfer], deadline_s: float
    ) -> list[BankOutcome]:
        """Several transfers to one bank; one outcome each, in order."""
        ...

    def inquire(self, bank: Participant, switch_ref: str, deadline_s: float) -> BankOutcome: ...

    def reverse(
        self, bank: Participant, switch_ref: str, reason: str, deadline_s: float
    ) -> BankOutcome: ...


@dataclass(frozen=True, slots=True)
class OwedReversal:
    """A reversal the switch owes a bank: the payment was decided FAILED without it."""

    payment_key: str
    bank_id: str
    switch_ref: str
    day: int


@dataclass(frozen=True, slots=True)
class Page:
    records: Sequence[PaymentRecord]
    next_token: str


class PaymentStore(Protocol):
    """What the processor needs of the ledger, as the owner of the payment's shard.

    ``begin`` and ``decide`` return only once what they wrote is acknowledged in two
    cities; they raise the domain's ``Unavailable`` (or ``FailedPrecondition`` for a cap)
    and write nothing the processor may rely on otherwise.
    """

    def load(self, institution_id: str, payment_id: str) -> PaymentRecord | None: ...

    def begin(self, record: PaymentRecord) -> tuple[PaymentRecord, bool]:
        """Write steps RECEIVED and ROUTED unless the payment exists.

        Returns ``(stored, won)``: ``won`` is False when another attempt got there first,
        and ``stored`` is then that attempt's record.
        """
        ...

    def decide(
        self,
        record: PaymentRecord,
        step: StepRecord,
        postings: Sequence[Posting],
        *,
        reversal_owed: bool = False,
    ) -> PaymentRecord:
        """Write the decision and its postings together; return the decided payment (the
        one already decided, if an earlier write of this decision was acknowledged).

        ``reversal_owed``: the bank did not confirm the reversal that makes this decision
        true at the bank; record the obligation in the same write.
        """
        ...

    def begin_many(
        self, records: Sequence[PaymentRecord], *, wait_in_flight: bool = False
    ) -> list[tuple[PaymentRecord, bool] | ClearingError]:
        """``begin`` for each record (in the same writes where it can); an error in its
        place for a record that could not begin. A payment found with an attempt still
        in flight is waited for only if ``wait_in_flight``; otherwise it is returned as
        it stands (not final: the caller answers PAYMENT_IN_PROGRESS)."""
        ...

    def decide_many(
        self, decisions: Sequence[tuple[PaymentRecord, StepRecord, Sequence[Posting], bool]]
    ) -> list[PaymentRecord | ClearingError]:
        """``decide`` for each (record, step, postings, reversal_owed); an error in its
        place for a decision that could not be written."""
        ...

    def abandon(self, record: PaymentRecord) -> None:
        """The attempt that began ``record`` ends without deciding it: someone must."""
        ...

    def owed_reversals(self, limit: int) -> Sequence[OwedReversal]:
        """Reversals recorded as owed and not yet confirmed by their bank, oldest first."""
        ...

    def confirm_reversal(self, owed: OwedReversal, at_us: int) -> None: ...


@dataclass(frozen=True, slots=True)
class IndexRow:
    """One row of a participant's payments-by-time index: the payment ``institution_id``
    / ``payment_id`` listed under ``participant_id`` (the institution, or its bank)."""

    institution_id: str
    payment_id: str
    received_at_us: int
    participant_id: str = ""

    @property
    def listed_under(self) -> str:
        return self.participant_id or self.institution_id


@dataclass(frozen=True, slots=True)
class ShardWrite:
    """One shard's part of a group commit: its new entries and index rows."""

    shard: int
    epoch: int
    at_us: int
    entries: Sequence[LedgerEntry]
    index_rows: Sequence[IndexRow]


@dataclass(frozen=True, slots=True)
class Seal:
    """Where the owner at ``epoch`` starts its part of the shard's chain."""

    shard: int
    epoch: int
    prev_epoch: int
    start_seq: int
    start_hash: bytes


class ChainReader(Protocol):
    """What reading a shard's chain takes (owners at takeover, auditors, drills)."""

    def seals(self, shard: int) -> list[Seal]: ...

    def entries(
        self,
        shard: int,
        epoch: int,
        from_seq: int,
        until_seq: int | None = None,
        *,
        from_block: int | None = None,
    ) -> list[LedgerEntry]:
        """The contiguous entries of ``epoch`` from ``from_seq`` on (to ``until_seq``
        at most, when given: the reader knows where the part ends). ``from_block``: where
        in the epoch's stream to start looking (a window cut's recorded block), if known."""
        ...


class LedgerStore(ChainReader, Protocol):
    """The shard ledger as owners use it (Cassandra in production, a fake in tests)."""

    def fence(self, shard: int, epoch: int, node_id: str, at_us: int) -> None: ...

    def write_seal(self, seal: Seal, node_id: str, at_us: int) -> None: ...

    def cut_block(self, shard: int, epoch: int, seq: int) -> int | None:
        """Where the WINDOW_CUT entry ``(shard, epoch, seq)`` is stored (its stream block),
        if this store wrote or read it; recorded with the cut so that the window's
        readers start there instead of at the epoch's first entry."""
        ...

    def commit(self, writes: Sequence[ShardWrite]) -> dict[int, bool]:
        """Write, then check fences; per shard, whether the commit may be acknowledged.
        (The writes' index rows are not written here: see :meth:`index`.)"""
        ...

    def index(self, rows: Sequence[IndexRow]) -> None:
        """Write time-index rows (idempotent); raise the domain's Unavailable on failure."""
        ...

    def mark_indexed(self, marks: Mapping[tuple[int, int], int], at_us: int) -> None:
        """Record per (shard, epoch) the seq up to which every intent is indexed."""
        ...

    def index_marks(self, shard: int) -> dict[int, int]:
        """Per epoch of ``shard``: the seq up to which its intents are indexed."""
        ...


class ParticipantStore(Protocol):
    def all(self) -> Mapping[str, Participant]: ...

    def get(self, participant_id: str) -> Participant | None: ...

    def put(self, participant: Participant, *, reason: str, now_us: int) -> Participant:
        """Store ``participant`` as its next version; raise if that version exists."""
        ...
