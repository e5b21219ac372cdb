"""Money: the currency table, checked arithmetic and formatting for people."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clearinghouse._invariant import InvariantViolation
from clearinghouse.domain.money import (
    AMOUNT_MINOR_LIMIT,
    CURRENCY_EXPONENTS,
    MAX_AMOUNT_MINOR,
    Money,
    format_money,
    is_supported_currency,
    minor_exponent,
)

pytestmark = pytest.mark.unit

amounts = st.integers(min_value=-MAX_AMOUNT_MINOR, max_value=MAX_AMOUNT_MINOR)
currencies = st.sampled_from(sorted(CURRENCY_EXPONENTS))


@pytest.mark.parametrize(
    ("code", "exponent"),
    [
        ("CNY", 2),
        ("USD", 2),
        ("EUR", 2),
        ("HKD", 2),
        ("JPY", 0),
        ("GBP", 2),
        ("SGD", 2),
        ("KWD", 3),
    ],
)
def test_table_has_iso_exponents(code: str, exponent: int) -> None:
    assert CURRENCY_EXPONENTS[code] == exponent
    assert minor_exponent(code) == exponent
    assert is_supported_currency(code)


def test_table_is_read_only() -> None:
    with pytest.raises(TypeError):
        CURRENCY_EXPONENTS["XXX"] = 2  # type: ignore[index]


@pytest.mark.parametrize("code", ["cny", "XXX", "", "CNY "])
def test_unknown_currency_is_not_supported(code: str) -> None:
    assert not is_supported_currency(code)
    with pytest.raises(InvariantViolation):
        minor_exponent(code)


def test_max_amount_is_far_below_int64() -> None:
    # A position sums many payments; the per-payment cap must leave a lot of headroom.
    assert MAX_AMOUNT_MINOR * 100_000 < AMOUNT_MINOR_LIMIT


def test_add_and_sub_same_currency() -> None:
    assert Money(150, "CNY") + Money(50, "CNY") == Money(200, "CNY")
    assert Money(150, "CNY") - Money(200, "CNY") == Money(-50, "CNY")


def test_mixing_currencies_is_an_invariant_violation() -> None:
    with pytest.raises(InvariantViolation, match="currency mismatch"):
        Money(1, "CNY") + Money(1, "USD")
    with pytest.raises(InvariantViolation, match="currency mismatch"):
        Money(1, "CNY") - Money(1, "HKD")


def test_adding_a_plain_int_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        Money(1, "CNY") + 1  # type: ignore[operator]


@pytest.mark.parametrize("bad", [1.0, True, "1", None])
def test_amount_must_be_a_true_int(bad: object) -> None:
    with pytest.raises(InvariantViolation):
        Money(bad, "CNY")  # type: ignore[arg-type]


def test_amount_must_fit_in_int64() -> None:
    Money(AMOUNT_MINOR_LIMIT, "CNY")
    with pytest.raises(InvariantViolation):
        Money(AMOUNT_MINOR_LIMIT + 1, "CNY")
    with pytest.raises(InvariantViolation):
        Money(AMOUNT_MINOR_LIMIT, "CNY") + Money(1, "CNY")


@given(amounts, amounts, currencies)
def test_sub_undoes_add(a: int, b: int, currency: str) -> None:
    assert (Money(a, currency) + Money(b, currency)) - Money(b, currency) == Money(a, currency)


@pytest.mark.parametrize(
    ("money", "text"),
    [
        (Money(123456, "CNY"), "CNY 1,234.56"),
        (Money(5, "CNY"), "CNY 0.05"),
        (Money(-1, "USD"), "USD -0.01"),
        (Money(500, "JPY"), "JPY 500"),
        (Money(5, "KWD"), "KWD 0.005"),
        (Money(0, "EUR"), "EUR 0.00"),
        (Money(10**13, "HKD"), "HKD 100,000,000,000.00"),
    ],
)
def test_format_money(money: Money, text: str) -> None:
    assert format_money(money) == text
    assert str(money) == text


def test_format_unknown_currency_does_not_raise() -> None:
    assert "12345" in format_money(Money(12345, "XXX"))


@given(amounts, currencies)
def test_format_reads_back_as_the_same_amount(amount: int, currency: str) -> None:
    code, _, number = format_money(Money(amount, currency)).partition(" ")
    assert code == currency
    value = Decimal(number.replace(",", ""))
    assert value.scaleb(CURRENCY_EXPONENTS[currency]) == amount
