"""Double-entry postings that a payment's state changes write to participants' positions.

Only two transitions move money at the switch. Entering APPROVED debits the payer and
credits the payee by the amount; APPROVED -> REVERSED writes the mirror image, so the
net effect of an approved-then-reversed payment is zero. Every other transition,
including ROUTED -> REVERSED (the bank never applied the transfer), writes nothing.

A participant's net debit position in a currency is its debits minus its credits; the
switch refuses a payment that would push the payer's position above its net debit cap.
"""

from __future__ import annotations

import enum
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, replace

from clearinghouse._invariant import invariant
from clearinghouse.domain.model import PaymentOrder, PaymentState


@enum.unique
class Leg(enum.Enum):
    """Which side of which transition a posting is. (payment_key, leg) is unique."""

    APPROVE_PAYER = "approve.payer"
    APPROVE_PAYEE = "approve.payee"
    REVERSE_PAYER = "reverse.payer"
    REVERSE_PAYEE = "reverse.payee"


@dataclass(frozen=True, slots=True)
class Posting:
    """One side of a double entry: exactly one of debit_minor and credit_minor is positive."""

    participant_id: str
    currency: str
    debit_minor: int
    credit_minor: int
    payment_key: str
    leg: Leg

    def __post_init__(self) -> None:
        invariant(
            min(self.debit_minor, self.credit_minor) == 0
            and max(self.debit_minor, self.credit_minor) > 0,
            f"posting {self.payment_key}/{self.leg.value} must debit or credit a positive "
            f"amount, not both: debit {self.debit_minor}, credit {self.credit_minor}",
        )


def postings_for(
    payment_key: str,
    order: PaymentOrder,
    state: PaymentState,
    *,
    from_state: PaymentState,
) -> tuple[Posting, ...]:
    """The postings written when the payment moves from ``from_state`` to ``state``.

    ``from_state`` is required because REVERSED alone does not say whether money had
    moved: only a reversal of an APPROVED payment is mirrored.
    """
    invariant(payment_key != "", "payment_key must not be empty")
    invariant(
        from_state.can_transition_to(state, via_reversal=True),
        f"{payment_key}: no transition {from_state.value} -> {state.value}",
    )
    amount, currency = order.amount.amount_minor, order.amount.currency
    payer, payee = order.payer_id, order.payee_id
    if state is PaymentState.APPROVED:
        return (
            Posting(payer, currency, amount, 0, payment_key, Leg.APPROVE_PAYER),
            Posting(payee, currency, 0, amount, payment_key, Leg.APPROVE_PAYEE),
        )
    if state is PaymentState.REVERSED and from_state is PaymentState.APPROVED:
        return (
            Posting(payer, currency, 0, amount, payment_key, Leg.REVERSE_PAYER),
            Posting(payee, currency, amount, 0, payment_key, Leg.REVERSE_PAYEE),
        )
    return ()


def check_balanced(postings: Iterable[Posting]) -> None:
    """Raise InvariantViolation unless, per currency, total debits equal total credits."""
    debits: defaultdict[str, int] = defaultdict(int)
    credits: defaultdict[str, int] = defaultdict(int)
    for posting in postings:
        debits[posting.currency] += posting.debit_minor
        credits[posting.currency] += posting.credit_minor
    for currency in debits.keys() | credits.keys():
        invariant(
            debits[currency] == credits[currency],
            f"postings unbalanced in {currency}: "
            f"debits {debits[currency]} != credits {credits[currency]}",
        )


@dataclass(frozen=True, slots=True)
class Position:
    """A participant's running totals in one currency."""

    participant_id: str
    currency: str
    debit_minor: int = 0
    credit_minor: int = 0

    @property
    def net_debit_minor(self) -> int:
        """Debits minus credits: positive when the participant owes the others."""
        return self.debit_minor - self.credit_minor

    def apply(self, posting: Posting) -> Position:
        """The position after ``posting``, which must be for this participant and currency."""
        invariant(
            (posting.participant_id, posting.currency) == (self.participant_id, self.currency),
            f"posting for {posting.participant_id}/{posting.currency} applied to "
            f"position {self.participant_id}/{self.currency}",
        )
        return replace(
            self,
            debit_minor=self.debit_minor + posting.debit_minor,
            credit_minor=self.credit_minor + posting.credit_minor,
        )


def would_exceed_cap(position: Position, amount_minor: int, cap_minor: int) -> bool:
    """Whether debiting ``amount_minor`` more would push the net debit above ``cap_minor``.

    Reaching the cap exactly is allowed.
    """
    invariant(amount_minor > 0, f"amount_minor must be positive, got {amount_minor}")
    invariant(cap_minor >= 0, f"cap_minor must not be negative, got {cap_minor}")
    return position.net_debit_minor + amount_minor > cap_minor


def net_positions(postings: Iterable[Posting]) -> dict[tuple[str, str], int]:
    """Net debit position per (participant_id, currency) from ``postings``."""
    totals: defaultdict[tuple[str, str], int] = defaultdict(int)
    for posting in postings:
        key = (posting.participant_id, posting.currency)
        totals[key] += posting.debit_minor - posting.credit_minor
    return dict(totals)
