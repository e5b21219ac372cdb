"""validate_order: every field rule, all violations at once, then the participant checks."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from clearinghouse._invariant import InvariantViolation
from clearinghouse.domain.errors import (
    FailedPrecondition,
    InvalidArgument,
    ParticipantSuspended,
    PermissionDenied,
    UnknownParticipant,
    status_for,
)
from clearinghouse.domain.model import (
    Participant,
    ParticipantKind,
    ParticipantStatus,
    PaymentOrder,
    PaymentType,
)
from clearinghouse.domain.money import MAX_AMOUNT_MINOR, Money
from clearinghouse.domain.validation import (
    BATCH_SIZE_MAX,
    MEMO_CHARS_MAX,
    PAYMENT_ID_LEN_MAX,
    validate_batch_size,
    validate_order,
)

pytestmark = pytest.mark.unit

NOW_US = 1_750_000_000_000_000
LIMIT = 5_000_000


def _participant(pid: str, kind: ParticipantKind, **changes: Any) -> Participant:
    fields: dict[str, Any] = {
        "participant_id": pid,
        "kind": kind,
        "name": pid.upper(),
        "status": ParticipantStatus.ACTIVE,
        "bank_code": "0102" if kind is ParticipantKind.BANK else None,
        "endpoint": "bank:443" if kind is ParticipantKind.BANK else None,
        "currencies": frozenset({"CNY", "USD"}),
        "net_debit_caps": {"CNY": 10**9},
        "version": 1,
    }
    fields.update(changes)
    return Participant(**fields)


def _registry(*participants: Participant) -> dict[str, Participant]:
    base = {
        "inst-1": _participant("inst-1", ParticipantKind.INSTITUTION),
        "inst-2": _participant("inst-2", ParticipantKind.INSTITUTION),
        "bank-a": _participant("bank-a", ParticipantKind.BANK),
        "bank-b": _participant("bank-b", ParticipantKind.BANK),
    }
    base.update({p.participant_id: p for p in participants})
    return base


def _order(type_: PaymentType = PaymentType.DEBIT, **changes: Any) -> PaymentOrder:
    debit = type_ is PaymentType.DEBIT
    order = PaymentOrder(
        payment_id="pay-2025:0001",
        institution_id="inst-1",
        type=type_,
        payer_id="bank-a" if debit else "inst-1",
        payee_id="inst-1" if debit else "bank-a",
        bank_account="DE89370400440532013000",
        amount=Money(12_345, "CNY"),
        memo="top-up",
        requested_at_us=NOW_US - 1_000,
    )
    return dataclasses.replace(order, **changes)


def _validate(order: PaymentOrder, registry: dict[str, Participant] | None = None) -> None:
    validate_order(order, _registry() if registry is None else registry, max_amount_minor=LIMIT)


def _violated_fields(order: PaymentOrder) -> set[str]:
    with pytest.raises(InvalidArgument) as caught:
        _validate(order)
    return {v.field for v in caught.value.violations}


@pytest.mark.parametrize("type_", list(PaymentType))
def test_valid_order_passes(type_: PaymentType) -> None:
    _validate(_order(type_))


@pytest.mark.parametrize(
    "changes",
    [
        {"payment_id": "p" * PAYMENT_ID_LEN_MAX},
        {"payment_id": "A.z_9:-"},
        {"amount": Money(LIMIT, "CNY")},
        {"amount": Money(1, "USD")},
        {"bank_account": "x" * 34},
        {"bank_account": "!~"},
        {"memo": ""},
        {"memo": "m" * MEMO_CHARS_MAX},
        {"memo": "充值" * 46},  # 92 characters, 276 bytes: under both limits.
        # However far ahead: freshness (ORDER_FROM_FUTURE) answers that, not the shape.
        {"requested_at_us": NOW_US + 10**15},
        {"memo": "充值" * (MEMO_CHARS_MAX // 2)},  # 140 characters, 420 bytes.
        {"memo": "\U0001f4b0" * MEMO_CHARS_MAX},  # 140 characters, 560 bytes.
        {"requested_at_us": 1},
    ],
)
def test_boundary_values_pass(changes: dict[str, Any]) -> None:
    _validate(_order(**changes))


@pytest.mark.parametrize(
    ("changes", "fields"),
    [
        ({"payment_id": ""}, {"order.payment_id"}),
        ({"payment_id": "p" * (PAYMENT_ID_LEN_MAX + 1)}, {"order.payment_id"}),
        ({"payment_id": "has space"}, {"order.payment_id"}),
        ({"payment_id": "a/b"}, {"order.payment_id"}),
        ({"payment_id": "abc\n"}, {"order.payment_id"}),
        ({"payment_id": "café"}, {"order.payment_id"}),
        ({"payment_id": "١٢٣"}, {"order.payment_id"}),  # Unicode digits are not [0-9].
        ({"payer_id": "bank a"}, {"order.payer_id"}),
        ({"payee_id": "", "institution_id": ""}, {"order.payee_id", "order.institution_id"}),
        ({"payee_id": "inst-2"}, {"order.payee_id"}),
        ({"payer_id": "inst-1"}, {"order.payee_id"}),
        ({"type": "DEBIT"}, {"order.type"}),
        ({"amount": Money(0, "CNY")}, {"order.amount.amount_minor"}),
        ({"amount": Money(-5, "CNY")}, {"order.amount.amount_minor"}),
        ({"amount": Money(LIMIT + 1, "CNY")}, {"order.amount.amount_minor"}),
        ({"amount": Money(10, "XXX")}, {"order.amount.currency"}),
        ({"amount": Money(10, "cny")}, {"order.amount.currency"}),
        ({"bank_account": ""}, {"order.bank_account"}),
        ({"bank_account": "x" * 35}, {"order.bank_account"}),
        ({"bank_account": "DE89 3704"}, {"order.bank_account"}),
        ({"bank_account": "acct\x00"}, {"order.bank_account"}),
        ({"bank_account": "kontoñ"}, {"order.bank_account"}),
        ({"memo": "m" * (MEMO_CHARS_MAX + 1)}, {"order.memo"}),
        ({"memo": "充" * (MEMO_CHARS_MAX + 1)}, {"order.memo"}),
        ({"memo": "bad \ud800"}, {"order.memo"}),
        ({"requested_at_us": 0}, {"order.requested_at_us"}),
    ],
)
def test_each_broken_field_is_reported_with_its_path(
    changes: dict[str, Any], fields: set[str]
) -> None:
    assert _violated_fields(_order(**changes)) == fields


def test_credit_payer_must_be_the_institution() -> None:
    order = _order(PaymentType.CREDIT, payer_id="inst-2")
    assert _violated_fields(order) == {"order.payer_id"}


def test_all_violations_are_reported_together() -> None:
    order = _order(
        payment_id="",
        amount=Money(0, "XXX"),
        bank_account="has space",
        memo="m" * 200,
        requested_at_us=0,
    )
    assert _violated_fields(order) == {
        "order.payment_id",
        "order.amount.amount_minor",
        "order.amount.currency",
        "order.bank_account",
        "order.memo",
        "order.requested_at_us",
    }


def test_path_prefix_names_the_order_in_a_batch() -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_order(
            _order(memo="m" * 141),
            _registry(),
            max_amount_minor=LIMIT,
            path="orders[3]",
        )
    assert [v.field for v in caught.value.violations] == ["orders[3].memo"]


_ALLOWED_ID_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-")


@given(st.text(max_size=70))
def test_payment_id_rule_matches_an_independent_oracle(payment_id: str) -> None:
    ok = 1 <= len(payment_id) <= 64 and set(payment_id) <= _ALLOWED_ID_CHARS
    order = _order(payment_id=payment_id)
    if ok:
        _validate(order)
    else:
        assert _violated_fields(order) == {"order.payment_id"}


@given(
    payment_id=st.from_regex(re.compile(r"[A-Za-z0-9._:-]{1,64}"), fullmatch=True),
    amount=st.integers(min_value=1, max_value=LIMIT),
    currency=st.sampled_from(["CNY", "USD"]),
    account=st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=34),
    memo=st.text(st.characters(exclude_categories=["Cs"]), max_size=MEMO_CHARS_MAX),
    ahead_us=st.integers(min_value=-(10**12), max_value=10**15),
    type_=st.sampled_from(list(PaymentType)),
)
def test_random_valid_orders_pass(
    payment_id: str,
    amount: int,
    currency: str,
    account: str,
    memo: str,
    ahead_us: int,
    type_: PaymentType,
) -> None:
    order = _order(
        type_,
        payment_id=payment_id,
        amount=Money(amount, currency),
        bank_account=account,
        memo=memo,
        requested_at_us=NOW_US + ahead_us,
    )
    _validate(order)


def test_field_errors_are_reported_before_participant_lookups() -> None:
    order = _order(institution_id="ghost", payee_id="ghost", memo="m" * 141)
    assert _violated_fields(order) == {"order.memo"}


@pytest.mark.parametrize(
    ("changes", "detail"),
    [
        ({"institution_id": "ghost", "payee_id": "ghost"}, "order.institution_id"),
        ({"payer_id": "ghost-bank"}, "order.payer_id"),
    ],
)
def test_unknown_participant_is_a_failed_precondition(changes: dict[str, Any], detail: str) -> None:
    with pytest.raises(UnknownParticipant, match=re.escape(detail)) as err:
        _validate(_order(**changes))
    assert err.value.reason == "PARTICIPANT_NOT_FOUND"
    assert status_for(err.value) is grpc.StatusCode.FAILED_PRECONDITION  # payment.proto


def test_credit_to_unknown_bank_is_a_failed_precondition() -> None:
    with pytest.raises(UnknownParticipant, match=r"order\.payee_id"):
        _validate(_order(PaymentType.CREDIT, payee_id="ghost-bank"))


def test_a_bank_may_not_submit_as_institution() -> None:
    order = _order(institution_id="bank-b", payee_id="bank-b")
    with pytest.raises(PermissionDenied):
        _validate(order)


@pytest.mark.parametrize(
    ("type_", "changes", "field"),
    [
        (PaymentType.DEBIT, {"payer_id": "inst-2"}, "order.payer_id"),
        (PaymentType.CREDIT, {"payee_id": "inst-2"}, "order.payee_id"),
    ],
)
def test_counterparty_must_be_a_bank(
    type_: PaymentType, changes: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        _validate(_order(type_, **changes))
    assert [v.field for v in caught.value.violations] == [field]


@pytest.mark.parametrize("suspended", ["inst-1", "bank-a"])
@pytest.mark.parametrize("type_", list(PaymentType))
def test_suspended_participant_is_refused(suspended: str, type_: PaymentType) -> None:
    kind = ParticipantKind.INSTITUTION if suspended.startswith("inst") else ParticipantKind.BANK
    registry = _registry(_participant(suspended, kind, status=ParticipantStatus.SUSPENDED))
    with pytest.raises(ParticipantSuspended, match=suspended) as caught:
        _validate(_order(type_), registry)
    assert caught.value.reason == "PARTICIPANT_SUSPENDED"


@pytest.mark.parametrize("lacking", ["inst-1", "bank-a"])
def test_currency_must_be_supported_by_both_sides(lacking: str) -> None:
    kind = ParticipantKind.INSTITUTION if lacking.startswith("inst") else ParticipantKind.BANK
    registry = _registry(_participant(lacking, kind, currencies=frozenset({"USD"})))
    with pytest.raises(FailedPrecondition, match=lacking) as caught:
        _validate(_order(), registry)
    assert not isinstance(caught.value, ParticipantSuspended)
    assert caught.value.reason == "CURRENCY_NOT_SUPPORTED"


def test_registry_key_must_match_participant_id() -> None:
    registry = _registry()
    registry["bank-a"] = _participant("bank-z", ParticipantKind.BANK)
    with pytest.raises(InvariantViolation):
        _validate(_order(), registry)


@pytest.mark.parametrize("max_amount", [0, -1, MAX_AMOUNT_MINOR + 1])
def test_max_amount_must_be_sane(max_amount: int) -> None:
    with pytest.raises(InvariantViolation):
        validate_order(_order(), _registry(), max_amount_minor=max_amount)


@pytest.mark.parametrize("n", [1, 2, BATCH_SIZE_MAX])
def test_batch_sizes_within_limits_pass(n: int) -> None:
    validate_batch_size(n, BATCH_SIZE_MAX)


@pytest.mark.parametrize(("n", "max_batch"), [(0, 500), (501, 500), (11, 10), (-1, 500)])
def test_batch_sizes_outside_limits_fail(n: int, max_batch: int) -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_batch_size(n, max_batch)
    assert [v.field for v in caught.value.violations] == ["orders"]


@pytest.mark.parametrize("max_batch", [0, BATCH_SIZE_MAX + 1])
def test_batch_limit_must_be_sane(max_batch: int) -> None:
    with pytest.raises(InvariantViolation):
        validate_batch_size(1, max_batch)
