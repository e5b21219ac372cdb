"""How a simulated bank behaves: what it approves, how slow it is, when it fails.

``BankBehaviour`` is a frozen value; the running server holds the current one in a
``BankControls``, which swaps it whole when a drill toggles the outage or the hang, so
a request never sees half of a change.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

DEFAULT_HANG_MS = 20_000

# Why a bank declines, by direction. The simulator picks one per switch_ref, as
# deterministically as the decision itself, so that a decline looks like a real one.
DEBIT_DECLINE_CODES = ("INSUFFICIENT_FUNDS", "ACCOUNT_FROZEN", "DEBIT_LIMIT_EXCEEDED")
CREDIT_DECLINE_CODES = ("ACCOUNT_CLOSED", "ACCOUNT_FROZEN", "INVALID_ACCOUNT")

# A 64-bit slice of a SHA-256 digest, divided by this, is uniform in [0, 1).
_UNIT_DENOMINATOR = float(1 << 64)


class TransferKind(StrEnum):
    """The direction of a transfer, as the bank sees it."""

    DEBIT = "DEBIT"  # The customer's account pays the institution's reserve.
    CREDIT = "CREDIT"  # The institution's reserve pays the customer's account.


@dataclass(frozen=True, slots=True)
class Decision:
    """What the bank answers the first time it sees a switch_ref."""

    approved: bool
    decline_code: str  # Empty when approved.


def _unit_interval(seed: int, purpose: str, key: str) -> float:
    """A number in [0, 1) that depends only on its arguments.

    Python's ``hash()`` is salted per process, so it cannot make decisions that must be
    the same after a restart or in another process; SHA-256 can.
    """
    digest = hashlib.sha256(f"{seed}\x1f{purpose}\x1f{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / _UNIT_DENOMINATOR


@dataclass(frozen=True, slots=True)
class BankBehaviour:
    """The knobs of one simulated bank. All ratios are probabilities in [0, 1]."""

    # The share of new transfers the bank approves; decided from seed and switch_ref.
    approve_ratio: float = 1.0
    # Each answer is delayed by a uniformly drawn time in this range, in milliseconds.
    latency_ms_min: int = 0
    latency_ms_max: int = 0
    # The share of Debit and Credit calls that the bank applies but answers only after
    # hang_ms, like a bank whose answer does not arrive in time.
    timeout_ratio: float = 0.0
    # How long a hanging bank keeps the caller waiting, in milliseconds.
    hang_ms: int = DEFAULT_HANG_MS
    # The bank is down: every BankService call fails with UNAVAILABLE, applying nothing.
    outage: bool = False
    # Every BankService call, Inquire and Reverse included, is applied and then hangs.
    hang_all: bool = False
    # Seeds the approve/decline decisions and the latency and timeout draws.
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("approve_ratio", "timeout_ratio"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {value}")
        if not 0 <= self.latency_ms_min <= self.latency_ms_max:
            raise ValueError(
                "latency must satisfy 0 <= min <= max, got "
                f"{self.latency_ms_min}-{self.latency_ms_max} ms"
            )
        if self.hang_ms < 0:
            raise ValueError(f"hang_ms must not be negative, got {self.hang_ms}")

    def decide(self, kind: TransferKind, switch_ref: str) -> Decision:
        """The answer to the first transfer with ``switch_ref``: a pure function of the
        seed, the approve ratio and the reference, so every run and every restart of
        the bank decides the same."""
        if _unit_interval(self.seed, "approve", switch_ref) < self.approve_ratio:
            return Decision(approved=True, decline_code="")
        codes = DEBIT_DECLINE_CODES if kind is TransferKind.DEBIT else CREDIT_DECLINE_CODES
        pick = int(_unit_interval(self.seed, "decline-code", switch_ref) * len(codes))
        return Decision(approved=False, decline_code=codes[pick])


def parse_latency_ms(text: str) -> tuple[int, int]:
    """Parse a latency range such as ``"2-10"`` (or a single ``"5"``) in milliseconds."""
    low, sep, high = text.partition("-")
    try:
        low_ms = int(low)
        high_ms = int(high) if sep else low_ms
    except ValueError:
        raise ValueError(f"latency must look like MIN-MAX in ms, got {text!r}") from None
    if not 0 <= low_ms <= high_ms:
        raise ValueError(f"latency must satisfy 0 <= MIN <= MAX, got {text!r}")
    return low_ms, high_ms


class BankControls:
    """The running bank's current behaviour, changed at run time by drills.

    Readers take a snapshot with :attr:`behaviour` and use it for the whole request.
    Listeners hear about every change (the server uses one to keep the health status in
    step with an outage). ``stopping`` is set when the server shuts down, to release
    requests that are sleeping or hanging.
    """

    def __init__(self, behaviour: BankBehaviour) -> None:
        self._lock = threading.Lock()
        self._behaviour = behaviour
        self._listeners: list[Callable[[BankBehaviour], None]] = []
        # Latency and timeout draws need not repeat across runs, but seeding them keeps a
        # test run reproducible. random.Random is not thread-safe, hence the lock.
        self._rng = random.Random(behaviour.seed)
        self.stopping = threading.Event()

    @property
    def behaviour(self) -> BankBehaviour:
        with self._lock:
            return self._behaviour

    def add_listener(self, listener: Callable[[BankBehaviour], None]) -> None:
        """Call ``listener`` with the new behaviour after every change."""
        with self._lock:
            self._listeners.append(listener)

    def update(self, **changes: object) -> BankBehaviour:
        """Replace some fields of the behaviour; returns the new behaviour."""
        return self._change(lambda current: dataclasses.replace(current, **changes))  # type: ignore[arg-type]

    def toggle_outage(self) -> bool:
        """Switch the outage on or off; returns whether the bank is now down."""
        return self._change(lambda b: dataclasses.replace(b, outage=not b.outage)).outage

    def toggle_hang_all(self) -> bool:
        """Switch "hang every request" on or off; returns whether it is now on."""
        return self._change(lambda b: dataclasses.replace(b, hang_all=not b.hang_all)).hang_all

    def _change(self, make: Callable[[BankBehaviour], BankBehaviour]) -> BankBehaviour:
        # Listeners run under the lock so that they hear changes in the order they were
        # made; they are short (a health status update) and never call back in here.
        with self._lock:
            self._behaviour = make(self._behaviour)
            for listener in self._listeners:
                listener(self._behaviour)
            return self._behaviour

    def draw_latency_s(self, behaviour: BankBehaviour) -> float:
        """A latency for one answer, in seconds, drawn from the behaviour's range."""
        with self._lock:
            latency_ms = self._rng.uniform(behaviour.latency_ms_min, behaviour.latency_ms_max)
        return latency_ms / 1000.0

    def draw_timeout(self, behaviour: BankBehaviour) -> bool:
        """Whether this Debit or Credit is one that answers too late."""
        if behaviour.timeout_ratio <= 0.0:
            return False
        with self._lock:
            return self._rng.random() < behaviour.timeout_ratio
