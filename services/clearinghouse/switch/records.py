"""What the ledger holds about one payment, as the processor sees it; shards and keys."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace

from clearinghouse.domain import PaymentEvent, PaymentOrder, PaymentState

SHARD_COUNT = 128

STEP_RECEIVED = 0
STEP_ROUTED = 1
STEP_DECIDED = 2
STEP_REVERSED = 3


def payment_key(institution_id: str, payment_id: str) -> str:
    """The payment's identity in the ledger: ids are scoped to their institution."""
    return f"{institution_id}/{payment_id}"


def shard_of(institution_id: str, payment_id: str) -> int:
    """A stable shard, so one busy institution spreads over every shard."""
    digest = hashlib.sha256(payment_key(institution_id, payment_id).encode()).digest()
    return int.from_bytes(digest[:4], "big") % SHARD_COUNT


def switch_ref_for(institution_id: str, payment_id: str) -> str:
    """The reference the bank sees: derived from the key, so every retry reuses it."""
    digest = hashlib.sha256(payment_key(institution_id, payment_id).encode()).hexdigest()
    return f"SW{digest[:24].upper()}"


@dataclass(frozen=True, slots=True)
class StepRecord:
    step: int
    event: PaymentEvent
    bank_ref: str = ""


@dataclass(frozen=True, slots=True)
class PaymentRecord:
    """A payment as stored: the order, where it was received, and its steps so far."""

    order: PaymentOrder
    fingerprint: bytes
    shard: int
    switch_ref: str
    bank_id: str
    received_zone: str
    steps: tuple[StepRecord, ...] = field(default=())
    # The seq of the payment's latest entry in its shard's chain (0: not written yet).
    ledger_seq: int = 0
    # The shard-ownership epoch under which this copy was begun or rebuilt: a decision
    # is accepted only from an attempt of the epoch the shard is owned under now.
    owner_epoch: int = 0

    @property
    def key(self) -> str:
        return payment_key(self.order.institution_id, self.order.payment_id)

    @property
    def state(self) -> PaymentState:
        return self.steps[-1].event.state if self.steps else PaymentState.RECEIVED

    @property
    def is_final(self) -> bool:
        return self.state.is_final

    @property
    def received_at_us(self) -> int:
        return self.steps[0].event.at_us if self.steps else 0

    @property
    def decided(self) -> StepRecord | None:
        for s in self.steps:
            if s.step == STEP_DECIDED:
                return s
        return None

    def with_step(self, step: StepRecord, ledger_seq: int | None = None) -> PaymentRecord:
        """This record with ``step`` in place of one of its kind (and, if given, the seq of
        the entry that wrote it)."""
        kept = tuple(s for s in self.steps if s.step != step.step)
        steps = tuple(sorted((*kept, step), key=lambda s: s.step))
        seq = self.ledger_seq if ledger_seq is None else ledger_seq
        return replace(self, steps=steps, ledger_seq=seq)
