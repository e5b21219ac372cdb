"""Money as integer minor units of an ISO 4217 currency; no float ever holds an amount.

Amounts are ``int`` counts of the currency's minor unit (fen for CNY, whole yen for JPY,
fils for KWD). The switch supports a fixed table of currencies; adding one is a code
change on purpose, because the minor-unit exponent decides how every stored amount is
read and must never differ between two nodes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from clearinghouse._invariant import invariant

# ISO 4217 alphabetic code -> number of digits after the decimal point of the major unit.
CURRENCY_EXPONENTS: Final[Mapping[str, int]] = MappingProxyType(
    {
        "CNY": 2,
        "EUR": 2,
        "GBP": 2,
        "HKD": 2,
        "JPY": 0,
        "KWD": 3,
        "SGD": 2,
        "USD": 2,
    }
)

# The largest amount one payment may carry, in minor units of its currency. Ten trillion
# minor units is far above any retail or wholesale payment the switch clears, and far
# below the int64 limit, so the sum of many payments cannot overflow a position either.
MAX_AMOUNT_MINOR: Final = 10**13

# Amounts travel as protobuf int64 and are stored as Cassandra bigint. Every Money must
# fit there; the range is symmetric so that negating an amount always stays in range.
AMOUNT_MINOR_LIMIT: Final = 2**63 - 1


def is_supported_currency(currency: str) -> bool:
    """Whether ``currency`` is in the switch's table of ISO 4217 currencies."""
    return currency in CURRENCY_EXPONENTS


def minor_exponent(currency: str) -> int:
    """The minor-unit exponent of a supported currency (2 for CNY, 0 for JPY)."""
    invariant(is_supported_currency(currency), f"unsupported currency {currency!r}")
    return CURRENCY_EXPONENTS[currency]


@dataclass(frozen=True, slots=True)
class Money:
    """An amount of one currency. Arithmetic is only defined within one currency.

    A Money may hold an unsupported currency code so that validation can report it as
    a field violation; amounts may be negative because positions and totals can be.
    """

    amount_minor: int
    currency: str

    def __post_init__(self) -> None:
        # bool is a subclass of int; True must not pass for one minor unit.
        invariant(type(self.amount_minor) is int, "Money.amount_minor must be an int")
        invariant(isinstance(self.currency, str), "Money.currency must be a str")
        invariant(
            -AMOUNT_MINOR_LIMIT <= self.amount_minor <= AMOUNT_MINOR_LIMIT,
            f"Money.amount_minor {self.amount_minor} does not fit in int64",
        )

    def __add__(self, other: Money) -> Money:
        if not isinstance(other, Money):
            return NotImplemented
        self._check_same_currency(other)
        return Money(self.amount_minor + other.amount_minor, self.currency)

    def __sub__(self, other: Money) -> Money:
        if not isinstance(other, Money):
            return NotImplemented
        self._check_same_currency(other)
        return Money(self.amount_minor - other.amount_minor, self.currency)

    def __str__(self) -> str:
        return format_money(self)

    def _check_same_currency(self, other: Money) -> None:
        # Mixing currencies is a programming error: the switch never converts currencies,
        # and every position and payment is kept per currency.
        invariant(
            self.currency == other.currency,
            f"currency mismatch: {self.currency} and {other.currency}",
        )


def format_money(money: Money) -> str:
    """Format for people, e.g. ``CNY 1,234.56``, ``JPY -500``, ``KWD 0.005``.

    Only for logs and consoles: the result is never parsed back into an amount.
    """
    exponent = CURRENCY_EXPONENTS.get(money.currency)
    if exponent is None:
        # Logging a bad order must not fail, so an unknown code is shown unscaled.
        return f"{money.currency} {money.amount_minor} (minor units, unknown currency)"
    sign = "-" if money.amount_minor < 0 else ""
    major, minor = divmod(abs(money.amount_minor), 10**exponent)
    fraction = f".{minor:0{exponent}d}" if exponent > 0 else ""
    return f"{money.currency} {sign}{major:,}{fraction}"
