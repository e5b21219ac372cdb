"""Postings: double entry that always balances, mirrored reversals, and net debit caps."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clearinghouse._invariant import InvariantViolation
from clearinghouse.domain.model import PaymentOrder, PaymentState, PaymentType
from clearinghouse.domain.money import CURRENCY_EXPONENTS, MAX_AMOUNT_MINOR, Money
from clearinghouse.domain.postings import (
    Leg,
    Position,
    Posting,
    check_balanced,
    net_positions,
    postings_for,
    would_exceed_cap,
)

pytestmark = pytest.mark.unit

S = PaymentState


def _order(amount: int = 500, currency: str = "CNY", payer: str = "bank-a") -> PaymentOrder:
    return PaymentOrder(
        payment_id="p1",
        institution_id="inst-1",
        type=PaymentType.DEBIT,
        payer_id=payer,
        payee_id="inst-1",
        bank_account="acct",
        amount=Money(amount, currency),
        memo="",
        requested_at_us=1,
    )


def test_approval_debits_payer_and_credits_payee() -> None:
    postings = postings_for("inst-1/p1", _order(), S.APPROVED, from_state=S.ROUTED)
    assert postings == (
        Posting("bank-a", "CNY", 500, 0, "inst-1/p1", Leg.APPROVE_PAYER),
        Posting("inst-1", "CNY", 0, 500, "inst-1/p1", Leg.APPROVE_PAYEE),
    )


def test_reversal_of_approved_payment_mirrors_it() -> None:
    approve = postings_for("k", _order(), S.APPROVED, from_state=S.ROUTED)
    reverse = postings_for("k", _order(), S.REVERSED, from_state=S.APPROVED)
    assert [(p.participant_id, p.debit_minor, p.credit_minor) for p in reverse] == [
        ("bank-a", 0, 500),
        ("inst-1", 500, 0),
    ]
    assert all(v == 0 for v in net_positions(approve + reverse).values())
    legs = [p.leg for p in approve + reverse]
    assert len(set(legs)) == 4


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        (S.RECEIVED, S.ROUTED),
        (S.RECEIVED, S.FAILED),
        (S.ROUTED, S.DECLINED),
        (S.ROUTED, S.FAILED),
        (S.ROUTED, S.REVERSED),
    ],
)
def test_transitions_that_move_no_money_post_nothing(src: PaymentState, dst: PaymentState) -> None:
    assert postings_for("k", _order(), dst, from_state=src) == ()


@pytest.mark.parametrize(
    ("src", "dst"),
    [(S.DECLINED, S.APPROVED), (S.RECEIVED, S.APPROVED), (S.REVERSED, S.REVERSED)],
)
def test_illegal_transition_is_an_invariant_violation(src: PaymentState, dst: PaymentState) -> None:
    with pytest.raises(InvariantViolation):
        postings_for("k", _order(), dst, from_state=src)


def test_empty_payment_key_is_an_invariant_violation() -> None:
    with pytest.raises(InvariantViolation):
        postings_for("", _order(), S.APPROVED, from_state=S.ROUTED)


def _paths(state: PaymentState = S.RECEIVED) -> list[list[PaymentState]]:
    # Every path through the state machine from RECEIVED, reversals included.
    nexts = [t for t in S if state.can_transition_to(t, via_reversal=True)]
    if not nexts:
        return [[state]]
    return [[state, *rest] for t in nexts for rest in _paths(t)]


PATHS = _paths()

orders = st.builds(
    _order,
    amount=st.integers(min_value=1, max_value=MAX_AMOUNT_MINOR),
    currency=st.sampled_from(sorted(CURRENCY_EXPONENTS)),
    payer=st.sampled_from(["bank-a", "bank-b", "inst-2"]),
)


@given(st.lists(st.tuples(orders, st.sampled_from(PATHS)), max_size=20))
def test_postings_always_balance(payments: list[tuple[PaymentOrder, list[PaymentState]]]) -> None:
    every: list[Posting] = []
    for n, (order, path) in enumerate(payments):
        for src, dst in itertools.pairwise(path):
            every += postings_for(f"k{n}", order, dst, from_state=src)
        # Money moved only if the payment ended APPROVED.
        moved = path[-1] is S.APPROVED
        mine = net_positions(p for p in every if p.payment_key == f"k{n}")
        payer_net = mine.get((order.payer_id, order.amount.currency), 0)
        assert payer_net == (order.amount.amount_minor if moved else 0)
    check_balanced(every)
    totals: dict[str, int] = {}
    for (_, currency), net in net_positions(every).items():
        totals[currency] = totals.get(currency, 0) + net
    assert all(total == 0 for total in totals.values())


@given(st.lists(st.tuples(orders, st.sampled_from(PATHS)), min_size=1, max_size=10), st.data())
def test_check_balanced_catches_a_lost_posting(
    payments: list[tuple[PaymentOrder, list[PaymentState]]], data: st.DataObject
) -> None:
    every: list[Posting] = []
    for n, (order, path) in enumerate(payments):
        for src, dst in itertools.pairwise(path):
            every += postings_for(f"k{n}", order, dst, from_state=src)
    if every:
        del every[data.draw(st.integers(0, len(every) - 1))]
        with pytest.raises(InvariantViolation, match="unbalanced"):
            check_balanced(every)


def test_balance_is_per_currency() -> None:
    postings = [
        Posting("a", "CNY", 100, 0, "k", Leg.APPROVE_PAYER),
        Posting("b", "USD", 0, 100, "k", Leg.APPROVE_PAYEE),
    ]
    with pytest.raises(InvariantViolation):
        check_balanced(postings)


@pytest.mark.parametrize(("debit", "credit"), [(0, 0), (5, 5), (-5, 0), (0, -1), (-5, 10)])
def test_posting_must_be_one_positive_side(debit: int, credit: int) -> None:
    with pytest.raises(InvariantViolation):
        Posting("a", "CNY", debit, credit, "k", Leg.APPROVE_PAYER)


def test_position_tracks_net_debit() -> None:
    position = Position("bank-a", "CNY")
    position = position.apply(Posting("bank-a", "CNY", 700, 0, "k1", Leg.APPROVE_PAYER))
    position = position.apply(Posting("bank-a", "CNY", 0, 200, "k2", Leg.APPROVE_PAYEE))
    assert (position.debit_minor, position.credit_minor, position.net_debit_minor) == (
        700,
        200,
        500,
    )


@pytest.mark.parametrize(("pid", "currency"), [("bank-b", "CNY"), ("bank-a", "USD")])
def test_position_refuses_another_participants_posting(pid: str, currency: str) -> None:
    with pytest.raises(InvariantViolation):
        Position("bank-a", "CNY").apply(Posting(pid, currency, 1, 0, "k", Leg.APPROVE_PAYER))


@pytest.mark.parametrize(
    ("debit", "credit", "amount", "cap", "exceeds"),
    [
        (0, 0, 1000, 1000, False),  # Reaching the cap exactly is allowed.
        (0, 0, 1001, 1000, True),
        (600, 0, 400, 1000, False),
        (600, 0, 401, 1000, True),
        (0, 300, 1300, 1000, False),  # A net creditor may debit its credit plus the cap.
        (0, 300, 1301, 1000, True),
        (0, 0, 1, 0, True),  # No cap configured means no net debit at all.
        (0, 5, 5, 0, False),
    ],
)
def test_would_exceed_cap(debit: int, credit: int, amount: int, cap: int, exceeds: bool) -> None:
    assert would_exceed_cap(Position("p", "CNY", debit, credit), amount, cap) is exceeds


@given(
    st.integers(0, 10**12),
    st.integers(0, 10**12),
    st.integers(1, 10**12),
    st.integers(0, 10**12),
)
def test_cap_check_agrees_with_the_position_after_the_debit(
    debit: int, credit: int, amount: int, cap: int
) -> None:
    before = Position("p", "CNY", debit, credit)
    after = before.apply(Posting("p", "CNY", amount, 0, "k", Leg.APPROVE_PAYER))
    assert would_exceed_cap(before, amount, cap) == (after.net_debit_minor > cap)


@pytest.mark.parametrize(("amount", "cap"), [(0, 10), (-1, 10), (1, -1)])
def test_cap_arguments_are_checked(amount: int, cap: int) -> None:
    with pytest.raises(InvariantViolation):
        would_exceed_cap(Position("p", "CNY"), amount, cap)
