"""The switch's nouns: participants, payment orders, payment states and their events.

Everything here is an immutable value. Times are integer microseconds since the Unix
epoch in fields named ``*_us``, so that no clock value is ever a float and every node
orders events the same way.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

from clearinghouse.domain.money import Money


@enum.unique
class PaymentType(enum.Enum):
    """Direction of a payment between a customer's bank account and an institution."""

    DEBIT = "DEBIT"  # The bank pays the institution (top-up): payer BANK, payee institution.
    CREDIT = "CREDIT"  # The institution pays the bank (payout): payer institution, payee BANK.


@enum.unique
class PaymentState(enum.Enum):
    """Where a payment is in its life. States only ever move along ALLOWED_TRANSITIONS."""

    RECEIVED = "RECEIVED"
    ROUTED = "ROUTED"
    APPROVED = "APPROVED"
    DECLINED = "DECLINED"
    FAILED = "FAILED"
    REVERSED = "REVERSED"

    @property
    def is_final(self) -> bool:
        """Whether the outcome is decided: the switch will not move it on by itself.

        APPROVED is final although an explicit reversal may still make it REVERSED.
        """
        return self in _FINAL_STATES

    def can_transition_to(self, target: PaymentState, *, via_reversal: bool = False) -> bool:
        """Whether the state may move to ``target``.

        APPROVED -> REVERSED needs ``via_reversal``: money has moved, so only an explicit
        reversal, never a timeout or a retry, may undo it.
        """
        if self is PaymentState.APPROVED and target is PaymentState.REVERSED:
            return via_reversal
        return target in ALLOWED_TRANSITIONS[self]


ALLOWED_TRANSITIONS: Final[Mapping[PaymentState, frozenset[PaymentState]]] = MappingProxyType(
    {
        PaymentState.RECEIVED: frozenset({PaymentState.ROUTED, PaymentState.FAILED}),
        PaymentState.ROUTED: frozenset(
            {
                PaymentState.APPROVED,
                PaymentState.DECLINED,
                PaymentState.FAILED,
                PaymentState.REVERSED,
            }
        ),
        PaymentState.APPROVED: frozenset({PaymentState.REVERSED}),
        PaymentState.DECLINED: frozenset(),
        PaymentState.FAILED: frozenset(),
        PaymentState.REVERSED: frozenset(),
    }
)

_FINAL_STATES: Final = frozenset(
    {PaymentState.APPROVED, PaymentState.DECLINED, PaymentState.FAILED, PaymentState.REVERSED}
)


@enum.unique
class ParticipantKind(enum.Enum):
    INSTITUTION = "INSTITUTION"  # Submits payments and holds a reserve account.
    BANK = "BANK"  # Holds customers' accounts and implements BankService.


@enum.unique
class ParticipantStatus(enum.Enum):
    ACTIVE = "ACTIVE"
    SUSPENDED = "SUSPENDED"  # New payments naming it are refused; routed ones complete.


@dataclass(frozen=True, slots=True)
class SigningKey:
    """One Ed25519 public key of a participant: ``key_id`` names it in signed orders.

    ``key_id`` is the lowercase hex of the first 8 bytes of SHA-256 of ``public_key``
    (:func:`clearinghouse.domain.signing.key_id_of`); ``public_key`` is the raw 32 bytes.
    """

    key_id: str
    public_key: bytes


@dataclass(frozen=True, slots=True)
class SigningKeyRecord:
    """A signing key in a participant's history: when it was first listed and, if it no
    longer is, when it was dropped (``revoked_at_us`` 0: still listed)."""

    participant_id: str
    key_id: str
    public_key: bytes
    added_at_us: int
    revoked_at_us: int = 0


@dataclass(frozen=True, slots=True)
class Participant:
    """A member of the switch as the registry knows it at ``version``.

    ``bank_code`` and ``endpoint`` are None for institutions. ``net_debit_caps`` maps a
    currency to the largest net debit position allowed, in minor units.
    ``signing_keys`` are the keys its payment orders may be signed with now.
    """

    participant_id: str
    kind: ParticipantKind
    name: str
    status: ParticipantStatus
    bank_code: str | None
    endpoint: str | None
    currencies: frozenset[str]
    net_debit_caps: Mapping[str, int] = field(hash=False)
    version: int
    signing_keys: tuple[SigningKey, ...] = ()
    # Payments per second on each node; 0: the switch's default.
    payments_per_s_quota: int = 0
    # Why the status last changed (the operator's words), and when this version was
    # stored (0: not stored yet). Neither is compared: they describe a version, and a
    # change that sets nothing else is no change.
    status_reason: str = field(default="", compare=False)
    updated_at_us: int = field(default=0, compare=False)

    def __post_init__(self) -> None:
        # Copy the caller's containers so that a later change to them cannot alter a
        # participant that other code already checked.
        object.__setattr__(self, "currencies", frozenset(self.currencies))
        object.__setattr__(self, "net_debit_caps", MappingProxyType(dict(self.net_debit_caps)))
        object.__setattr__(self, "signing_keys", tuple(self.signing_keys))

    def signing_key_map(self) -> Mapping[str, bytes]:
        """key_id -> raw public key, as :mod:`clearinghouse.domain.signing` verifies with."""
        return {k.key_id: k.public_key for k in self.signing_keys}

    def net_debit_cap(self, currency: str) -> int:
        """The cap for ``currency``; zero when none is configured.

        A missing cap fails closed: a participant may not run a net debit in a currency
        for which no operator has granted it one.
        """
        return self.net_debit_caps.get(currency, 0)


@dataclass(frozen=True, slots=True)
class PaymentOrder:
    """A payment as an institution submitted it. ``requested_at_us`` is the client's clock.

    ``signature`` and ``signing_key_id`` are the institution's Ed25519 signature of the
    order and the key that made it (:mod:`clearinghouse.domain.signing`). They are not
    part of the order's canonical bytes or fingerprint: the same order signed again is
    the same order (idempotency), and a signature cannot sign itself.
    """

    payment_id: str
    institution_id: str
    type: PaymentType
    payer_id: str
    payee_id: str
    bank_account: str
    amount: Money
    memo: str
    requested_at_us: int
    signature: bytes = b""
    signing_key_id: str = ""


@dataclass(frozen=True, slots=True)
class PaymentEvent:
    """One step of a payment's history: the state it entered, when, and in which zone."""

    state: PaymentState
    at_us: int
    zone: str
    detail: str
