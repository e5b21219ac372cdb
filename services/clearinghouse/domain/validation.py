"""Validation of payment orders before the switch records them.

Checks run in two phases. The first looks only at the order and reports every bad
field at once in one :class:`InvalidArgument`, so that a client fixes its request in
one round trip. The second, which runs only when the first passed, looks the
participants up and raises the first problem it finds, in this order: unknown
participant (UnknownParticipant, reason PARTICIPANT_NOT_FOUND), a non-institution
submitting (PermissionDenied), a counterparty that is not a bank (InvalidArgument), a
suspended participant (ParticipantSuspended), an unsupported currency
(FailedPrecondition, reason CURRENCY_NOT_SUPPORTED). An unknown or suspended
participant and an unsupported currency are FAILED_PRECONDITION (payment.proto).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final

from clearinghouse._invariant import invariant
from clearinghouse.domain.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    ParticipantSuspended,
    PermissionDenied,
    UnknownParticipant,
)
from clearinghouse.domain.model import (
    Participant,
    ParticipantKind,
    ParticipantStatus,
    PaymentOrder,
    PaymentType,
)
from clearinghouse.domain.money import MAX_AMOUNT_MINOR, is_supported_currency

PAYMENT_ID_LEN_MAX: Final = 64
PARTICIPANT_ID_LEN_MAX: Final = 64
# An IBAN has at most 34 characters; no domestic account number we route is longer.
BANK_ACCOUNT_LEN_MAX: Final = 34
# In characters (code points), as the API documents: 140 characters of any script, so
# at most 560 bytes of UTF-8 to store and to send to a bank. (A byte limit of 280 held a
# memo in Chinese to 93 characters.)
MEMO_CHARS_MAX: Final = 140
BATCH_SIZE_MAX: Final = 500
# Payments per page of a listing (ListPayments, ListParticipantPayments): page_size 0
# means the default, anything above the maximum is the maximum.
LIST_PAGE_SIZE_DEFAULT: Final = 100
LIST_PAGE_SIZE_MAX: Final = 500

# The range google.protobuf.Timestamp documents (0001-01-01T00:00:00Z to
# 9999-12-31T23:59:59.999999999Z); a time outside it is no date the switch can store.
TIMESTAMP_SECONDS_MIN: Final = -62_135_596_800
TIMESTAMP_SECONDS_MAX: Final = 253_402_300_799
TIMESTAMP_NANOS_MAX: Final = 999_999_999

_ID_PATTERN: Final = re.compile(r"[A-Za-z0-9._:-]+")
_ID_RULE: Final = "must be 1..{} characters of A-Z a-z 0-9 . _ : -"


def validate_order(
    order: PaymentOrder,
    participants: Mapping[str, Participant],
    *,
    max_amount_minor: int,
    path: str = "order",
) -> None:
    """Raise a ClearingError if ``order`` may not enter the switch; return None if it may.

    ``path`` prefixes every field path, e.g. ``orders[3]`` for an order in a batch.
    """
    invariant(
        0 < max_amount_minor <= MAX_AMOUNT_MINOR,
        f"max_amount_minor {max_amount_minor} outside 1..{MAX_AMOUNT_MINOR}",
    )
    check_order_shape(order, max_amount_minor=max_amount_minor, path=path)
    _check_participants(order, participants, path)


def check_order_shape(
    order: PaymentOrder,
    *,
    max_amount_minor: int = MAX_AMOUNT_MINOR,
    path: str = "order",
) -> None:
    """The first phase alone: the order by itself, every bad field at once.

    An order that fails it can never have been accepted, so any node may refuse it
    before routing it (a replay of an accepted order always passes it).
    """
    violations = [
        *_id_violations(order, path),
        *_role_violations(order, path),
        *_amount_violations(order, path, max_amount_minor),
        *_bank_account_violations(order.bank_account, f"{path}.bank_account"),
        *_memo_violations(order.memo, f"{path}.memo"),
        *_time_violations(order.requested_at_us, f"{path}.requested_at_us"),
    ]
    if violations:
        raise InvalidArgument(violations)


def validate_batch_size(n: int, max_batch: int = BATCH_SIZE_MAX, *, path: str = "orders") -> None:
    """Raise InvalidArgument unless a batch of ``n`` orders has 1..max_batch orders."""
    invariant(0 < max_batch <= BATCH_SIZE_MAX, f"max_batch {max_batch} outside 1..{BATCH_SIZE_MAX}")
    if n < 1:
        raise InvalidArgument([FieldViolation(path, "must contain at least one order")])
    if n > max_batch:
        raise InvalidArgument([FieldViolation(path, f"must contain at most {max_batch} orders")])


def list_page_rows(page_size: int) -> int:
    """How many payments a listing's page may hold for a requested ``page_size``
    (negative sizes are refused by the servicer; here they count as the default)."""
    if page_size <= 0:
        return LIST_PAGE_SIZE_DEFAULT
    return min(page_size, LIST_PAGE_SIZE_MAX)


def timestamp_violations(seconds: int, nanos: int, field: str) -> list[FieldViolation]:
    """A violation unless (seconds, nanos) is a time protobuf's Timestamp allows."""
    if (
        TIMESTAMP_SECONDS_MIN <= seconds <= TIMESTAMP_SECONDS_MAX
        and 0 <= nanos <= TIMESTAMP_NANOS_MAX
    ):
        return []
    return [FieldViolation(field, "must be a time from year 1 to year 9999")]


def is_valid_id(value: str, max_len: int) -> bool:
    """Whether ``value`` is 1..max_len characters of ``[A-Za-z0-9._:-]``."""
    return len(value) <= max_len and _ID_PATTERN.fullmatch(value) is not None


def _id_violations(order: PaymentOrder, path: str) -> list[FieldViolation]:
    checks = [
        ("payment_id", order.payment_id, PAYMENT_ID_LEN_MAX),
        ("institution_id", order.institution_id, PARTICIPANT_ID_LEN_MAX),
        ("payer_id", order.payer_id, PARTICIPANT_ID_LEN_MAX),
        ("payee_id", order.payee_id, PARTICIPANT_ID_LEN_MAX),
    ]
    return [
        FieldViolation(f"{path}.{name}", _ID_RULE.format(max_len))
        for name, value, max_len in checks
        if not is_valid_id(value, max_len)
    ]


def _role_violations(order: PaymentOrder, path: str) -> list[FieldViolation]:
    # The wire enum has an UNSPECIFIED value; whatever the gRPC layer maps it to, it is
    # reported here together with the other fields.
    if not isinstance(order.type, PaymentType):
        return [FieldViolation(f"{path}.type", "must be DEBIT or CREDIT")]
    violations = []
    if order.payer_id == order.payee_id:
        violations.append(FieldViolation(f"{path}.payee_id", "must differ from payer_id"))
    if order.type is PaymentType.DEBIT and order.payee_id != order.institution_id:
        violations.append(
            FieldViolation(f"{path}.payee_id", "must be the institution_id for a DEBIT")
        )
    if order.type is PaymentType.CREDIT and order.payer_id != order.institution_id:
        violations.append(
            FieldViolation(f"{path}.payer_id", "must be the institution_id for a CREDIT")
        )
    return violations


def _amount_violations(
    order: PaymentOrder, path: str, max_amount_minor: int
) -> list[FieldViolation]:
    violations = []
    amount = order.amount.amount_minor
    if amount <= 0:
        violations.append(FieldViolation(f"{path}.amount.amount_minor", "must be positive"))
    elif amount > max_amount_minor:
        violations.append(
            FieldViolation(f"{path}.amount.amount_minor", f"must be at most {max_amount_minor}")
        )
    if not is_supported_currency(order.amount.currency):
        violations.append(
            FieldViolation(f"{path}.amount.currency", "must be a currency the switch supports")
        )
    return violations


def _bank_account_violations(account: str, field: str) -> list[FieldViolation]:
    # Printable ASCII without space: what IBANs and domestic account numbers use, and
    # nothing that could smuggle control characters into a bank's message.
    printable = all("!" <= ch <= "~" for ch in account)
    if 0 < len(account) <= BANK_ACCOUNT_LEN_MAX and printable:
        return []
    rule = f"must be 1..{BANK_ACCOUNT_LEN_MAX} printable ASCII characters without spaces"
    return [FieldViolation(field, rule)]


def _memo_violations(memo: str, field: str) -> list[FieldViolation]:
    if len(memo) > MEMO_CHARS_MAX:
        return [FieldViolation(field, f"must be at most {MEMO_CHARS_MAX} characters")]
    try:
        memo.encode("utf-8")
    except UnicodeEncodeError:
        # Lone surrogates cannot be stored or sent; they are a client bug, not a memo.
        return [FieldViolation(field, "must be valid Unicode")]
    return []


def _time_violations(requested_at_us: int, field: str) -> list[FieldViolation]:
    # How far from the switch's clock is freshness (signing.check_fresh): one answer,
    # FAILED_PRECONDITION ORDER_FROM_FUTURE, however far ahead (a shape bound of 5
    # minutes here answered INVALID_ARGUMENT beyond it, against the documented contract).
    if requested_at_us <= 0:
        return [FieldViolation(field, "must be positive")]
    return []


def _check_participants(
    order: PaymentOrder, participants: Mapping[str, Participant], path: str
) -> None:
    institution = _lookup(participants, order.institution_id, f"{path}.institution_id")
    if institution.kind is not ParticipantKind.INSTITUTION:
        raise PermissionDenied(
            f"participant {institution.participant_id!r} is a {institution.kind.value}; "
            "only institutions submit payments"
        )
    is_debit = order.type is PaymentType.DEBIT
    bank_field = f"{path}.payer_id" if is_debit else f"{path}.payee_id"
    bank = _lookup(participants, order.payer_id if is_debit else order.payee_id, bank_field)
    if bank.kind is not ParticipantKind.BANK:
        raise InvalidArgument([FieldViolation(bank_field, "must name a BANK participant")])
    for participant in (institution, bank):
        _check_active(participant)
    for participant in (institution, bank):
        _check_currency(participant, order.amount.currency)


def _lookup(
    participants: Mapping[str, Participant], participant_id: str, field: str
) -> Participant:
    participant = participants.get(participant_id)
    if participant is None:
        raise UnknownParticipant(
            f"{field}: participant {participant_id!r} does not exist"
            + UnknownParticipant.JUST_REGISTERED
        )
    invariant(
        participant.participant_id == participant_id,
        f"registry key {participant_id!r} holds participant {participant.participant_id!r}",
    )
    return participant


def _check_active(participant: Participant) -> None:
    if participant.status is not ParticipantStatus.ACTIVE:
        raise ParticipantSuspended(f"participant {participant.participant_id!r} is suspended")


def _check_currency(participant: Participant, currency: str) -> None:
    if currency not in participant.currencies:
        raise FailedPrecondition(
            f"participant {participant.participant_id!r} does not support {currency}",
            reason=FailedPrecondition.CURRENCY_NOT_SUPPORTED,
        )
