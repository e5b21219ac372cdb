"""The payment path against in-memory fakes: decisions, replays, bank trouble, crashes.

Every test runs on a fake clock: the bank spends its caller's whole deadline when it
does not answer, and the processor's pauses advance the clock instead of sleeping, so
the time bounds are checked exactly and the file runs in well under a second per test.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import Counter, defaultdict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from clearinghouse.domain import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    Leg,
    Money,
    NotFound,
    Participant,
    ParticipantKind,
    ParticipantStatus,
    ParticipantSuspended,
    PaymentEvent,
    PaymentOrder,
    PaymentState,
    PaymentType,
    Posting,
    Unavailable,
    UnknownParticipant,
    check_balanced,
    fingerprint,
    postings_for,
)
from clearinghouse.domain.errors import OrderNotFresh, SignatureRefused
from clearinghouse.domain.model import SigningKey
from clearinghouse.domain.signing import key_id_of, public_key_bytes, signed
from clearinghouse.switch import processor
from clearinghouse.switch.convert import order_to_pb
from clearinghouse.switch.ports import BankAnswer, BankTransfer
from clearinghouse.switch.processor import (
    BANK_TRANSFER_DEADLINE_S,
    DECISION_BOUND_S,
    IN_PROGRESS_RETRY_AFTER_MS,
    INQUIRY_ATTEMPTS,
    INQUIRY_DEADLINE_S,
    INQUIRY_PAUSE_S,
    REVERSAL_ATTEMPTS,
    REVERSAL_DEADLINE_S,
    PaymentProcessor,
    Registry,
    Result,
)
from clearinghouse.switch.records import (
    STEP_DECIDED,
    STEP_RECEIVED,
    STEP_ROUTED,
    PaymentRecord,
    StepRecord,
    payment_key,
    shard_of,
    switch_ref_for,
)
from clearinghouse.switch.servicers import admit_order
from tests.fakes import (
    OUTAGE_RETRY_AFTER_MS,
    REVERSED_BEFORE_ARRIVAL,
    START_US,
    BankCall,
    FakeBank,
    FakeClock,
    FakePaymentStore,
    Reply,
    begun_record,
)

pytestmark = pytest.mark.unit

S = PaymentState
ZONE = "shanghai-a"
OTHER_ZONE = "beijing-b"
INST_A, INST_B = "inst-a", "inst-b"
BANK_A, BANK_B = "bank-a", "bank-b"
ACCOUNT = "6222020000000001"
# What the unreachable bank costs: the transfer, every inquiry and the pauses between
# them, every reversal, each waiting out its whole deadline.
WORST_CASE_S = (
    BANK_TRANSFER_DEADLINE_S
    + INQUIRY_ATTEMPTS * INQUIRY_DEADLINE_S
    + (INQUIRY_ATTEMPTS - 1) * INQUIRY_PAUSE_S
    + REVERSAL_ATTEMPTS * REVERSAL_DEADLINE_S
)


def _participant(
    pid: str, kind: ParticipantKind, status: ParticipantStatus = ParticipantStatus.ACTIVE
) -> Participant:
    is_bank = kind is ParticipantKind.BANK
    return Participant(
        participant_id=pid,
        kind=kind,
        name=pid.upper(),
        status=status,
        bank_code=pid.upper() if is_bank else None,
        endpoint=f"{pid}.bank.test:7000" if is_bank else None,
        currencies=frozenset({"CNY", "USD"}),
        net_debit_caps={"CNY": 10**10, "USD": 10**9},
        version=1,
    )


PARTICIPANTS = {
    INST_A: _participant(INST_A, ParticipantKind.INSTITUTION),
    INST_B: _participant(INST_B, ParticipantKind.INSTITUTION),
    BANK_A: _participant(BANK_A, ParticipantKind.BANK),
    BANK_B: _participant(BANK_B, ParticipantKind.BANK),
}


def _with_suspended(pid: str) -> dict[str, Participant]:
    out = dict(PARTICIPANTS)
    out[pid] = dataclasses.replace(
        out[pid], status=ParticipantStatus.SUSPENDED, version=out[pid].version + 1
    )
    return out


def debit(
    payment_id: str = "pay-1", *, amount: int = 12_345, currency: str = "CNY"
) -> PaymentOrder:
    """inst-a collects from a customer's account at bank-a: bank-a pays inst-a."""
    return PaymentOrder(
        payment_id=payment_id,
        institution_id=INST_A,
        type=PaymentType.DEBIT,
        payer_id=BANK_A,
        payee_id=INST_A,
        bank_account=ACCOUNT,
        amount=Money(amount, currency),
        memo="top-up",
        requested_at_us=START_US - 1_000,
    )


def credit(payment_id: str = "pay-1", *, amount: int = 500, currency: str = "USD") -> PaymentOrder:
    """inst-b pays out to a customer's account at bank-b: inst-b pays bank-b."""
    return PaymentOrder(
        payment_id=payment_id,
        institution_id=INST_B,
        type=PaymentType.CREDIT,
        payer_id=INST_B,
        payee_id=BANK_B,
        bank_account=ACCOUNT,
        amount=Money(amount, currency),
        memo="payout",
        requested_at_us=START_US - 1_000,
    )


def key_of(order: PaymentOrder) -> str:
    return payment_key(order.institution_id, order.payment_id)


def ref_of(order: PaymentOrder) -> str:
    return switch_ref_for(order.institution_id, order.payment_id)


@dataclass
class Env:
    clock: FakeClock
    store: FakePaymentStore
    bank: FakeBank
    registry: Registry
    processor: PaymentProcessor

    def stored(self, order: PaymentOrder) -> PaymentRecord:
        rec = self.store.records.get((order.institution_id, order.payment_id))
        assert rec is not None
        return rec

    def elapsed_s(self) -> float:
        return (self.clock() - START_US) / 1e6


def make_env() -> Env:
    clock = FakeClock()
    store = FakePaymentStore(clock)
    bank = FakeBank(clock)
    registry = Registry(PARTICIPANTS)
    processor = PaymentProcessor(
        zone=ZONE,
        store=store,
        bank=bank,
        registry=registry,
        clock=clock,
        sleep=clock.sleep,
        max_amount_minor=10**9,
    )
    return Env(clock, store, bank, registry, processor)


@pytest.fixture()
def env() -> Env:
    return make_env()


def states(rec: PaymentRecord) -> list[tuple[int, PaymentState]]:
    return [(s.step, s.event.state) for s in rec.steps]


# -- happy paths -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("order", "bank_id", "payer", "payee"),
    [(debit(), BANK_A, BANK_A, INST_A), (credit(), BANK_B, INST_B, BANK_B)],
    ids=["debit", "credit"],
)
def test_approved_payment_is_routed_decided_and_posted(
    env: Env, order: PaymentOrder, bank_id: str, payer: str, payee: str
) -> None:
    res = env.processor.submit(order)

    rec = res.record
    assert res.replayed is False
    assert rec.state is S.APPROVED
    assert [(s.step, s.event.state, s.event.at_us, s.event.zone) for s in rec.steps] == [
        (STEP_RECEIVED, S.RECEIVED, START_US, ZONE),
        (STEP_ROUTED, S.ROUTED, START_US, ZONE),
        (STEP_DECIDED, S.APPROVED, START_US, ZONE),
    ]
    assert rec.steps[1].event.detail == f"to {bank_id}"
    assert rec.steps[2].bank_ref == env.bank.ledger[ref_of(order)].bank_ref == "BANKREF000001"
    assert (rec.order, rec.fingerprint, rec.bank_id, rec.received_zone) == (
        order,
        fingerprint(order),
        bank_id,
        ZONE,
    )
    assert rec.switch_ref == ref_of(order)
    assert rec.shard == shard_of(order.institution_id, order.payment_id)
    assert env.stored(order) == rec
    assert rec.ledger_seq == 2  # the store's decided record: intent 1, decision 2
    amount, currency = order.amount.amount_minor, order.amount.currency
    assert env.store.postings == [
        Posting(payer, currency, amount, 0, key_of(order), Leg.APPROVE_PAYER),
        Posting(payee, currency, 0, amount, key_of(order), Leg.APPROVE_PAYEE),
    ]
    check_balanced(env.store.postings)
    assert env.bank.calls == Counter({"transfer": 1})
    assert env.bank.log == [BankCall("transfer", bank_id, ref_of(order), BANK_TRANSFER_DEADLINE_S)]
    assert env.bank.transfers == [
        BankTransfer(order.type, ref_of(order), order.institution_id, ACCOUNT, order.amount)
    ]
    assert env.store.calls == Counter({"begin": 1, "decide": 1})  # no read before a new write


def test_declined_payment_posts_nothing(env: Env) -> None:
    order = debit()
    env.bank.script(ref_of(order), Reply.DECLINE)

    res = env.processor.submit(order)

    assert res.replayed is False
    assert states(res.record) == [
        (STEP_RECEIVED, S.RECEIVED),
        (STEP_ROUTED, S.ROUTED),
        (STEP_DECIDED, S.DECLINED),
    ]
    assert res.record.steps[2].event.detail == "declined"
    assert env.stored(order) == res.record
    assert env.store.postings == []
    assert env.bank.calls == Counter({"transfer": 1})


def test_payment_forwarded_from_another_zone_records_where_it_was_received(env: Env) -> None:
    res = env.processor.submit(debit(), received_zone=OTHER_ZONE)

    assert res.record.received_zone == OTHER_ZONE
    assert [s.event.zone for s in res.record.steps] == [OTHER_ZONE, OTHER_ZONE, ZONE]
    assert env.stored(debit()) == res.record


def test_get_returns_the_stored_payment_and_not_found_otherwise(env: Env) -> None:
    res = env.processor.submit(debit())
    assert env.processor.get(INST_A, "pay-1") == res.record
    with pytest.raises(NotFound):
        env.processor.get(INST_B, "pay-1")  # ids are scoped to their institution


# -- replays ---------------------------------------------------------------------------


@pytest.mark.parametrize("reply", [Reply.APPROVE, Reply.DECLINE])
def test_same_order_again_replays_the_stored_result(env: Env, reply: Reply) -> None:
    order = debit()
    env.bank.script(ref_of(order), reply)
    first = env.processor.submit(order)
    env.clock.advance(30)

    again = env.processor.submit(order)

    assert again == Result(first.record, replayed=True)
    assert env.bank.calls == Counter({"transfer": 1})
    assert len(env.store.postings) == (2 if reply is Reply.APPROVE else 0)
    assert env.store.calls == Counter({"begin": 2, "decide": 1})


@pytest.mark.parametrize(
    "change",
    [
        {"amount": Money(12_346, "CNY")},
        {"memo": "top-up!"},
        {"bank_account": "6222020000000002"},
        {"requested_at_us": START_US - 999},
    ],
    ids=["amount+1", "memo", "account", "requested_at"],
)
def test_same_id_with_another_payload_is_refused_and_writes_nothing(
    env: Env, change: dict[str, object]
) -> None:
    order = debit()
    first = env.processor.submit(order)
    records, postings = dict(env.store.records), list(env.store.postings)

    with pytest.raises(AlreadyExists) as err:
        env.processor.submit(dataclasses.replace(order, **change))  # type: ignore[arg-type]

    assert err.value.reason == "PAYMENT_ID_REUSED"
    assert env.store.records == records
    assert env.stored(order) == first.record
    assert env.store.postings == postings
    assert env.store.calls == Counter({"begin": 2, "decide": 1})
    assert env.bank.calls == Counter({"transfer": 1})


def test_same_payment_id_in_two_institutions_is_two_payments(env: Env) -> None:
    a, b = env.processor.submit(debit("shared")), env.processor.submit(credit("shared"))
    assert (a.replayed, b.replayed) == (False, False)
    assert a.record.switch_ref != b.record.switch_ref
    assert env.bank.calls == Counter({"transfer": 2})
    assert len(env.store.postings) == 4


# -- validation ------------------------------------------------------------------------


def assert_nothing_written(env: Env) -> None:
    """A refused order leaves no trace. (Reading the id first would be harmless.)"""
    assert env.store.calls["begin"] == env.store.calls["decide"] == 0
    assert env.store.records == {}
    assert env.store.postings == []
    assert env.bank.calls == Counter()


@pytest.mark.parametrize(
    ("order", "error", "reason"),
    [
        (
            dataclasses.replace(debit(), payer_id="bank-zz"),
            UnknownParticipant,
            "PARTICIPANT_NOT_FOUND",
        ),
        (debit(amount=0), InvalidArgument, "INVALID_ARGUMENT"),
        (debit(amount=10**9 + 1), InvalidArgument, "INVALID_ARGUMENT"),
        (debit(currency="XXX"), InvalidArgument, "INVALID_ARGUMENT"),
        (debit(currency="EUR"), FailedPrecondition, "CURRENCY_NOT_SUPPORTED"),
        (credit(currency="JPY"), FailedPrecondition, "CURRENCY_NOT_SUPPORTED"),
        (dataclasses.replace(debit(), payee_id=INST_B), InvalidArgument, "INVALID_ARGUMENT"),
    ],
    ids=["unknown-bank", "amount-0", "amount-over-max", "bad-currency", "eur", "jpy", "payee"],
)
def test_invalid_order_touches_neither_store_nor_bank(
    env: Env, order: PaymentOrder, error: type[Exception], reason: str
) -> None:
    with pytest.raises(error) as err:
        env.processor.submit(order)
    assert getattr(err.value, "reason", None) == reason
    assert_nothing_written(env)


@pytest.mark.parametrize("suspended", [BANK_A, INST_A])
def test_suspended_participant_touches_neither_store_nor_bank(env: Env, suspended: str) -> None:
    env.registry.replace(_with_suspended(suspended))
    with pytest.raises(ParticipantSuspended) as err:
        env.processor.submit(debit())
    assert err.value.reason == "PARTICIPANT_SUSPENDED"
    assert_nothing_written(env)


def test_amount_field_violation_names_the_field(env: Env) -> None:
    with pytest.raises(InvalidArgument) as err:
        env.processor.submit(debit(amount=0))
    assert [v.field for v in err.value.violations] == ["order.amount.amount_minor"]


# -- the bank does not answer ----------------------------------------------------------


def test_no_answer_but_applied_is_found_by_inquiry_and_approved(env: Env) -> None:
    order = debit()
    env.bank.script(ref_of(order), Reply.NO_ANSWER_APPLIED)

    res = env.processor.submit(order)

    assert res.replayed is False
    assert res.record.state is S.APPROVED
    assert res.record.steps[2].event.at_us == START_US + 5_000_000
    assert res.record.steps[2].bank_ref == env.bank.ledger[ref_of(order)].bank_ref
    assert env.bank.calls == Counter({"transfer": 1, "inquire": 1})
    assert env.bank.log[1] == BankCall("inquire", BANK_A, ref_of(order), INQUIRY_DEADLINE_S)
    assert len(env.store.postings) == 2
    assert env.elapsed_s() == BANK_TRANSFER_DEADLINE_S


def test_inquiry_keeps_asking_while_the_bank_is_silent(env: Env) -> None:
    order = debit()
    env.bank.script(ref_of(order), Reply.NO_ANSWER_APPLIED)
    env.bank.drop_next("inquire", INQUIRY_ATTEMPTS - 1)

    res = env.processor.submit(order)

    assert res.record.state is S.APPROVED
    assert env.bank.calls == Counter({"transfer": 1, "inquire": INQUIRY_ATTEMPTS})
    assert env.clock.slept_s == [INQUIRY_PAUSE_S] * (INQUIRY_ATTEMPTS - 1)
    assert len(env.store.postings) == 2


def test_no_answer_and_unknown_ref_is_reversed_without_postings(env: Env) -> None:
    order = credit()
    env.bank.script(ref_of(order), Reply.NO_ANSWER_LOST)

    res = env.processor.submit(order)

    assert states(res.record) == [
        (STEP_RECEIVED, S.RECEIVED),
        (STEP_ROUTED, S.ROUTED),
        (STEP_DECIDED, S.REVERSED),
    ]
    assert env.bank.calls == Counter({"transfer": 1, "inquire": 1, "reverse": 1})
    assert [c.method for c in env.bank.log] == ["transfer", "inquire", "reverse"]
    assert env.store.postings == []
    # The bank keeps a tombstone, so the lost transfer is refused if it ever arrives.
    tomb = env.bank.ledger[ref_of(order)]
    assert (tomb.answer, tomb.detail) == (BankAnswer.DECLINED, REVERSED_BEFORE_ARRIVAL)
    assert res.record.steps[2].bank_ref == tomb.bank_ref


def test_unreachable_bank_fails_the_payment_within_the_bound(env: Env) -> None:
    env.bank.unreachable = True
    order = debit()

    res = env.processor.submit(order)

    assert res.record.state is S.FAILED
    assert env.store.postings == []
    assert env.bank.calls == Counter(
        {"transfer": 1, "inquire": INQUIRY_ATTEMPTS, "reverse": REVERSAL_ATTEMPTS}
    )
    assert [c.deadline_s for c in env.bank.log] == [
        BANK_TRANSFER_DEADLINE_S,
        *[INQUIRY_DEADLINE_S] * INQUIRY_ATTEMPTS,
        *[REVERSAL_DEADLINE_S] * REVERSAL_ATTEMPTS,
    ]
    assert env.clock.slept_s == [INQUIRY_PAUSE_S] * (INQUIRY_ATTEMPTS - 1)
    assert env.elapsed_s() == WORST_CASE_S == 17.0
    assert env.elapsed_s() <= DECISION_BOUND_S
    assert res.record.steps[2].event.at_us == START_US + 17_000_000


# -- attempts that end without deciding; the resolver ------------------------------------


def test_storage_outage_in_decide_abandons_the_payment_to_the_resolver(env: Env) -> None:
    order = debit()
    env.store.fail_next("decide")

    with pytest.raises(Unavailable) as err:
        env.processor.submit(order)

    assert err.value.reason == Unavailable.STORAGE_QUORUM_LOST
    assert err.value.retry_after_ms == OUTAGE_RETRY_AFTER_MS
    # The bank approved; the switch could not record it: the payment stays ROUTED and
    # the attempt hands it back to the store, which passes it on to be resolved.
    routed = env.stored(order)
    assert routed.state is S.ROUTED
    assert env.store.abandoned == [routed]
    assert env.store.unresolved == [routed]
    assert env.bank.status(ref_of(order)) is BankAnswer.APPROVED
    assert env.store.postings == []
    assert env.store.calls == Counter({"begin": 1, "decide": 1, "abandon": 1})

    # A retry while it is undecided is asked to come back; it never acts on the payment.
    with pytest.raises(Unavailable) as early:
        env.processor.submit(order)
    assert early.value.reason == "PAYMENT_IN_PROGRESS"
    assert early.value.retry_after_ms == IN_PROGRESS_RETRY_AFTER_MS
    assert env.bank.calls == Counter({"transfer": 1})

    resolved = env.processor.resolve(env.store.unresolved[0])

    assert resolved.state is S.APPROVED
    assert resolved == env.stored(order)
    assert env.bank.calls == Counter({"transfer": 1, "inquire": 1})
    assert len(env.store.postings) == 2
    assert len(env.store.decisions) == 1
    assert env.processor.submit(order) == Result(resolved, replayed=True)
    assert env.bank.calls == Counter({"transfer": 1, "inquire": 1})


def test_decide_that_landed_before_the_outage_is_replayed_without_the_bank(env: Env) -> None:
    order = debit()
    env.store.fail_next("decide", applied=True)
    with pytest.raises(Unavailable):
        env.processor.submit(order)
    # The attempt still hands the payment back, but it is decided: nothing to resolve.
    assert [r.key for r in env.store.abandoned] == [key_of(order)]
    assert env.store.unresolved == []

    res = env.processor.submit(order)

    assert res == Result(env.stored(order), replayed=True)
    assert res.record.state is S.APPROVED
    assert env.bank.calls == Counter({"transfer": 1})
    assert len(env.store.postings) == 2


def test_storage_outage_in_begin_writes_nothing_and_calls_no_bank(env: Env) -> None:
    order = debit()
    env.store.fail_next("begin")
    with pytest.raises(Unavailable) as err:
        env.processor.submit(order)
    assert err.value.reason == Unavailable.STORAGE_QUORUM_LOST
    assert env.store.records == {}
    assert env.store.abandoned == []  # it never began: nothing to hand back
    assert env.bank.calls == Counter()

    res = env.processor.submit(order)  # the client's immediate retry processes it

    assert (res.replayed, res.record.state) == (False, S.APPROVED)
    assert env.bank.calls == Counter({"transfer": 1})


def test_begin_stored_but_not_acknowledged_is_reversed_and_never_sent(env: Env) -> None:
    """The intent reached the ledger but its commit was not acknowledged: the bank was
    never called, and whoever resolves the payment makes sure it never will be."""
    order = debit()
    env.store.fail_next("begin", applied=True)
    with pytest.raises(Unavailable):
        env.processor.submit(order)
    assert env.store.abandoned == []
    assert env.bank.calls == Counter()

    with pytest.raises(Unavailable) as retry:
        env.processor.submit(order)
    assert retry.value.reason == "PAYMENT_IN_PROGRESS"
    assert env.bank.calls == Counter()

    (left,) = env.store.undecided()  # what the shard's next owner resolves
    res = env.processor.resolve(left)

    assert res.state is S.REVERSED
    assert env.bank.calls == Counter({"inquire": 1, "reverse": 1})
    tomb = env.bank.ledger[ref_of(order)]
    assert (tomb.answer, tomb.detail) == (BankAnswer.DECLINED, REVERSED_BEFORE_ARRIVAL)
    assert env.processor.submit(order) == Result(res, replayed=True)
    assert env.bank.calls["transfer"] == 0
    assert env.store.postings == []


def test_attempt_past_the_decision_bound_abandons_instead_of_deciding(env: Env) -> None:
    order = debit()
    env.bank.latency_s = DECISION_BOUND_S + 1  # approves, but answers too late

    with pytest.raises(Unavailable) as err:
        env.processor.submit(order)

    assert err.value.reason == "PAYMENT_IN_PROGRESS"
    assert err.value.retry_after_ms == IN_PROGRESS_RETRY_AFTER_MS
    routed = env.stored(order)
    assert routed.state is S.ROUTED
    assert env.store.calls == Counter({"begin": 1, "abandon": 1})  # decide never started
    assert env.store.abandoned == env.store.unresolved == [routed]
    assert env.bank.status(ref_of(order)) is BankAnswer.APPROVED

    res = env.processor.resolve(routed)

    assert res.state is S.APPROVED
    assert res.steps[2].bank_ref == env.bank.ledger[ref_of(order)].bank_ref
    assert env.bank.calls == Counter({"transfer": 1, "inquire": 1})
    assert len(env.store.postings) == 2


@pytest.mark.parametrize(
    ("bank_has", "decided", "bank_calls"),
    [
        (BankAnswer.APPROVED, S.APPROVED, {"inquire": 1}),
        (BankAnswer.DECLINED, S.DECLINED, {"inquire": 1}),
        (None, S.REVERSED, {"inquire": 1, "reverse": 1}),
    ],
    ids=["bank-applied", "bank-declined", "bank-never-saw-it"],
)
def test_payment_left_routed_by_a_crash_is_resolved_by_inquiry(
    env: Env, bank_has: BankAnswer | None, decided: PaymentState, bank_calls: dict[str, int]
) -> None:
    order = debit()
    crashed, won = env.store.begin(begun_record(order, at_us=env.clock(), zone=OTHER_ZONE))
    assert won
    if bank_has is not None:
        env.bank.apply(ref_of(order), bank_has)
    env.clock.advance(5)

    with pytest.raises(Unavailable) as err:
        env.processor.submit(order)

    assert err.value.reason == "PAYMENT_IN_PROGRESS"
    assert err.value.retry_after_ms == IN_PROGRESS_RETRY_AFTER_MS
    assert env.bank.calls == Counter()
    assert env.store.decisions == []
    assert env.store.abandoned == []  # a replay did not begin it: not its to hand back

    res = env.processor.resolve(crashed)

    assert res.received_zone == OTHER_ZONE
    assert res.state is decided
    assert res.steps[2].event.zone == ZONE
    assert res.steps[2].event.at_us == env.clock()
    assert res.ledger_seq == 2  # the store's decided record, not the processor's own copy
    assert env.stored(order) == res
    assert env.bank.calls == Counter(bank_calls)  # and never a transfer
    assert env.store.postings == list(
        postings_for(key_of(order), order, decided, from_state=S.ROUTED)
    )
    assert len(env.store.postings) == (2 if decided is S.APPROVED else 0)
    # Now decided: the next retry replays it without asking the bank again.
    assert env.processor.submit(order) == Result(res, replayed=True)
    assert env.bank.calls == Counter(bank_calls)


def test_resolve_has_no_time_budget(env: Env) -> None:
    """Long after the decision bound, the resolver still asks and reverses in full."""
    order = debit()
    crashed, _ = env.store.begin(begun_record(order, at_us=env.clock(), zone=OTHER_ZONE))
    env.bank.apply(ref_of(order), BankAnswer.APPROVED)
    env.clock.advance(10 * DECISION_BOUND_S)
    env.bank.unreachable = True
    started = env.clock()

    res = env.processor.resolve(crashed)

    assert res.state is S.FAILED
    assert env.bank.calls == Counter({"inquire": INQUIRY_ATTEMPTS, "reverse": REVERSAL_ATTEMPTS})
    assert [c.deadline_s for c in env.bank.log] == [
        *[INQUIRY_DEADLINE_S] * INQUIRY_ATTEMPTS,
        *[REVERSAL_DEADLINE_S] * REVERSAL_ATTEMPTS,
    ]
    assert (env.clock() - started) / 1e6 == WORST_CASE_S - BANK_TRANSFER_DEADLINE_S
    # No confirmed reversal: the switch owes the bank one, and settles it later.
    assert [o.payment_key for o in env.store.owed_reversals(10)] == [key_of(order)]
    env.bank.unreachable = False
    assert env.processor.settle_owed_reversals() == 1
    assert env.bank.status(ref_of(order)) is BankAnswer.REVERSED
    assert env.store.postings == []


def test_resolve_of_a_decided_payment_returns_it_and_calls_nothing(env: Env) -> None:
    decided = env.processor.submit(debit()).record
    calls_before = Counter(env.store.calls)

    assert env.processor.resolve(decided) is decided
    assert env.bank.calls == Counter({"transfer": 1})
    assert env.store.calls == calls_before


def test_resolve_of_a_stale_copy_returns_the_decision_that_stands(env: Env) -> None:
    """The resolver's copy is ROUTED, but the payment was decided meanwhile: the first
    decision stands and is what resolve returns."""
    order = debit()
    routed, _ = env.store.begin(begun_record(order, at_us=env.clock(), zone=OTHER_ZONE))
    first = env.processor.resolve(routed)  # never seen by the bank: REVERSED
    env.clock.advance(3)

    again = env.processor.resolve(routed)

    assert again == first == env.stored(order)
    assert again.steps[2].event.at_us == START_US
    assert len(env.store.decisions) == 1
    assert env.bank.calls == Counter({"inquire": 2, "reverse": 1})  # asks; never transfers


def test_resolve_needs_the_bank_in_the_registry(env: Env) -> None:
    order = debit()
    routed, _ = env.store.begin(begun_record(order, at_us=env.clock(), zone=OTHER_ZONE))
    env.registry.replace({k: v for k, v in PARTICIPANTS.items() if k != BANK_A})

    with pytest.raises(Unavailable) as err:
        env.processor.resolve(routed)

    assert err.value.reason == "REGISTRY_NOT_READY"
    assert env.bank.calls == Counter()
    assert env.store.decisions == []


# -- lost races ---------------------------------------------------------------------------


def test_begin_lost_to_a_decided_attempt_replays_it_without_calling_the_bank(env: Env) -> None:
    order = debit()
    other = begun_record(
        order, at_us=env.clock() - 1_000, zone=OTHER_ZONE, decided=S.APPROVED, bank_ref="B-9"
    )
    env.store.slip_in_before_next_begin(other)

    res = env.processor.submit(order)

    assert res == Result(other, replayed=True)
    assert env.bank.calls == Counter()
    assert env.store.calls == Counter({"begin": 1})
    assert env.store.decisions == []
    assert env.stored(order) == other


def test_begin_lost_to_an_undecided_attempt_asks_to_come_back(env: Env) -> None:
    order = debit()
    env.store.slip_in_before_next_begin(begun_record(order, at_us=env.clock(), zone=OTHER_ZONE))

    with pytest.raises(Unavailable) as err:
        env.processor.submit(order)

    assert err.value.reason == "PAYMENT_IN_PROGRESS"
    assert err.value.retry_after_ms == IN_PROGRESS_RETRY_AFTER_MS
    assert env.bank.calls == Counter()
    assert env.store.calls == Counter({"begin": 1})  # neither decided nor abandoned
    assert env.store.decisions == []


def test_begin_lost_to_another_order_with_the_same_id_is_refused(env: Env) -> None:
    order = debit()
    other = begun_record(dataclasses.replace(order, memo="other"), at_us=1, zone=OTHER_ZONE)
    env.store.slip_in_before_next_begin(other)

    with pytest.raises(AlreadyExists) as err:
        env.processor.submit(order)

    assert err.value.reason == "PAYMENT_ID_REUSED"
    assert env.stored(order) == other
    assert env.bank.calls == Counter()


def test_retry_during_a_live_attempt_is_turned_away(env: Env) -> None:
    """While the first attempt still works (here: in its second reversal), a retry of
    the same order must not act on the payment."""
    order = debit()
    env.bank.script(ref_of(order), Reply.NO_ANSWER_APPLIED)
    env.bank.drop_next("inquire", INQUIRY_ATTEMPTS)
    env.bank.drop_next("reverse", 1)
    turned_away: list[Unavailable] = []

    def concurrent_retry(method: str, _ref: str) -> None:
        if method == "reverse" and env.bank.calls["reverse"] == 2 and not turned_away:
            env.clock.advance(1.5)
            with pytest.raises(Unavailable) as err:
                env.processor.submit(order)
            turned_away.append(err.value)

    env.bank.before_call = concurrent_retry
    live = env.processor.submit(order)

    assert [e.reason for e in turned_away] == ["PAYMENT_IN_PROGRESS"]
    assert live.record.state is S.REVERSED
    assert env.bank.status(ref_of(order)) is BankAnswer.REVERSED
    assert env.store.postings == []
    assert len(env.store.decisions) == 1
    assert env.store.abandoned == []


# -- time bounds and registry changes --------------------------------------------------


def test_bound_holds_when_storage_is_slow(env: Env) -> None:
    """Receipt is stamped before begin, so a slow begin eats into the bank's time, not
    past the decision bound."""
    env.store.latency_s["begin"] = 4.0
    env.bank.unreachable = True

    res = env.processor.submit(debit())

    assert res.record.state is S.FAILED
    assert env.elapsed_s() <= DECISION_BOUND_S
    assert env.store.abandoned == []


def test_retry_after_the_bound_never_races_a_live_attempt(env: Env) -> None:
    """begin() takes 4 s and the bank holds the transfer until 21 s after receipt: a
    retry arriving then, past the decision bound, is still turned away; the live attempt
    comes back too late to decide and hands the payment to the resolver, whose decision
    is the only one."""
    order = debit()
    env.store.latency_s["begin"] = 4.0
    turned_away: list[Unavailable] = []

    def concurrent_retry(method: str, _ref: str) -> None:
        if method == "transfer":
            env.clock.advance(17.0)  # 21 s after receipt: the bound has passed
            with pytest.raises(Unavailable) as err:
                env.processor.submit(order)
            turned_away.append(err.value)

    env.bank.before_call = concurrent_retry
    with pytest.raises(Unavailable) as live:
        env.processor.submit(order)

    assert [e.reason for e in turned_away] == ["PAYMENT_IN_PROGRESS"]
    assert live.value.reason == "PAYMENT_IN_PROGRESS"
    assert env.store.decisions == []
    (routed,) = env.store.unresolved
    assert env.store.abandoned == [routed]
    env.bank.before_call = None

    res = env.processor.resolve(routed)

    assert res.state is S.APPROVED
    assert env.stored(order) == res
    assert len(env.store.decisions) == 1
    assert env.bank.calls == Counter({"transfer": 1, "inquire": 1})
    assert env.bank.status(ref_of(order)) is BankAnswer.APPROVED
    assert len(env.store.postings) == 2


def test_replay_of_a_decided_payment_survives_its_bank_being_suspended(env: Env) -> None:
    """A replay is answered from the stored payment, whatever the registry says now."""
    order = debit()
    first = env.processor.submit(order)
    env.registry.replace(_with_suspended(BANK_A))

    assert env.processor.submit(order) == Result(first.record, replayed=True)


def test_routed_payment_completes_after_its_bank_is_suspended(env: Env) -> None:
    """ParticipantStatus.SUSPENDED: payments already routed still complete."""
    order = debit()
    env.store.fail_next("decide")
    with pytest.raises(Unavailable):
        env.processor.submit(order)  # the bank approved; the decision was not recorded
    env.registry.replace(_with_suspended(BANK_A))

    (routed,) = env.store.unresolved
    resolved = env.processor.resolve(routed)

    assert resolved.state is S.APPROVED
    assert len(env.store.postings) == 2
    assert env.processor.submit(order) == Result(resolved, replayed=True)


# -- property: random traffic keeps the ledger right -----------------------------------


@dataclass(frozen=True)
class Submit:
    institution_id: str
    payment_id: str
    variant: int  # 0 or 1: the same id with another amount is a conflicting order
    reply: Reply


@dataclass(frozen=True)
class Advance:
    seconds: float


@dataclass(frozen=True)
class Outage:
    method: str
    applied: bool


@dataclass(frozen=True)
class Takeover:
    """A new owner takes the shards over and resolves every payment left undecided."""


def _order_for(step: Submit) -> PaymentOrder:
    make = debit if step.institution_id == INST_A else credit
    return make(step.payment_id, amount=1_000 + step.variant)


ACTIONS = st.one_of(
    st.builds(
        Submit,
        st.sampled_from([INST_A, INST_B]),
        st.sampled_from(["p0", "p1", "p2"]),
        st.integers(0, 1),
        st.sampled_from(list(Reply)),
    ),
    st.builds(Advance, st.sampled_from([1.0, 8.0, DECISION_BOUND_S + 1])),
    st.builds(Outage, st.sampled_from(["load", "begin", "decide"]), st.booleans()),
    st.just(Takeover()),
)


def _take_over(env: Env) -> None:
    for rec in env.store.undecided():
        try:
            env.processor.resolve(rec)
        except Unavailable as e:  # storage down: the next takeover resolves it
            assert e.reason == Unavailable.STORAGE_QUORUM_LOST


def _check_invariants(env: Env, decisions_seen: dict[str, StepRecord]) -> None:
    for (method, ref), n in env.bank.calls_by_ref.items():
        assert method != "transfer" or n == 1, f"{ref}: {n} transfers"
    check_balanced(env.store.postings)
    by_key: defaultdict[str, list[Posting]] = defaultdict(list)
    for p in env.store.postings:
        by_key[p.payment_key].append(p)
    assert set(by_key) <= {rec.key for rec in env.store.records.values()}
    decided = 0
    for rec in env.store.records.values():
        if rec.state is S.APPROVED:
            expected = list(postings_for(rec.key, rec.order, S.APPROVED, from_state=S.ROUTED))
            assert by_key[rec.key] == expected
        else:
            assert by_key[rec.key] == []
        step = rec.decided
        if step is None:
            assert rec.state is S.ROUTED
            continue
        decided += 1
        assert decisions_seen.setdefault(rec.key, step) == step, f"{rec.key} changed decision"
        # The switch and the bank agree on whether money moved.
        bank_approved = env.bank.status(rec.switch_ref) is BankAnswer.APPROVED
        assert (rec.state is S.APPROVED) == bank_approved, rec.key
    assert len(env.store.decisions) == decided  # each payment decided exactly once


@settings(max_examples=150, deadline=None)
@given(st.lists(ACTIONS, min_size=1, max_size=30))
def test_random_traffic_keeps_every_invariant(
    actions: list[Submit | Advance | Outage | Takeover],
) -> None:
    env = make_env()
    decisions_seen: dict[str, StepRecord] = {}
    for action in actions:
        if isinstance(action, Advance):
            env.clock.advance(action.seconds)
        elif isinstance(action, Outage):
            env.store.fail_next(action.method, applied=action.applied)
        elif isinstance(action, Takeover):
            _take_over(env)
        else:
            order = _order_for(action)
            env.bank.script(ref_of(order), action.reply)
            before = env.store.records.get((order.institution_id, order.payment_id))
            calls_before = Counter(env.store.calls)
            try:
                res = env.processor.submit(order)
            except AlreadyExists as e:
                assert e.reason == "PAYMENT_ID_REUSED"
                assert before is not None and before.fingerprint != fingerprint(order)
                assert env.store.records.get((order.institution_id, order.payment_id)) == before
            except Unavailable as e:
                assert e.reason in ("PAYMENT_IN_PROGRESS", Unavailable.STORAGE_QUORUM_LOST)
                if e.reason == "PAYMENT_IN_PROGRESS":
                    assert before is not None and not before.is_final
                # An attempt that began the payment and then failed hands it back.
                began = env.store.calls["decide"] > calls_before["decide"]
                assert env.store.calls["abandon"] - calls_before["abandon"] == int(began)
            else:
                assert res.replayed is (before is not None)
                assert res.record == env.stored(order)
                assert res.record.is_final
                assert res.record.fingerprint == fingerprint(order)
                assert env.store.calls["abandon"] == calls_before["abandon"]
                if before is not None and before.is_final:
                    assert res.record == before
        _check_invariants(env, decisions_seen)
    # Once storage is back, one takeover decides every payment that was left undecided.
    env.store.clear_outages()
    _take_over(env)
    assert env.store.undecided() == []
    _check_invariants(env, decisions_seen)


def test_fake_store_keeps_the_first_decision_and_reports_a_lost_begin() -> None:
    """The fake behaves like the shard owner's store where the processor relies on it."""
    store = FakePaymentStore()
    rec = begun_record(debit(), at_us=START_US, zone=ZONE)
    stored, won = store.begin(rec)
    assert (stored, won) == (dataclasses.replace(rec, ledger_seq=1), True)
    assert store.begin(rec) == (stored, False)
    approve = StepRecord(STEP_DECIDED, PaymentEvent(S.APPROVED, START_US + 1, ZONE, ""))
    decline = StepRecord(STEP_DECIDED, PaymentEvent(S.DECLINED, START_US + 2, ZONE, ""))
    first = store.decide(stored, approve, ())
    assert (first.state, first.ledger_seq) == (S.APPROVED, 2)
    assert store.decide(stored, decline, ()) == first
    assert store.begin(rec) == (first, False)
    store.abandon(stored)
    assert store.unresolved == []  # decided: nothing to resolve


def test_unreachable_bank_leaves_a_reversal_owed_until_the_bank_confirms(env: Env) -> None:
    order = debit()
    env.bank.script(ref_of(order), Reply.NO_ANSWER_APPLIED)
    env.bank.drop_next("inquire", INQUIRY_ATTEMPTS)
    env.bank.drop_next("reverse", REVERSAL_ATTEMPTS + 1)

    res = env.processor.submit(order)

    assert res.record.state is S.FAILED
    assert env.bank.status(ref_of(order)) is BankAnswer.APPROVED  # the bank still has it
    assert [o.payment_key for o in env.store.owed_reversals(10)] == [res.record.key]
    assert env.processor.settle_owed_reversals() == 0  # still no answer: still owed
    assert env.processor.settle_owed_reversals() == 1
    assert env.bank.status(ref_of(order)) is BankAnswer.REVERSED
    assert env.store.owed_reversals(10) == []
    assert env.store.postings == []


# -- batches (submit_many) ----------------------------------------------------------------


def test_a_batch_calls_each_bank_once_and_answers_each_order_in_order(env: Env) -> None:
    env.processor.submit(debit("seen"))  # an earlier payment, replayed below
    env.bank.batches.clear()
    reused = dataclasses.replace(debit("seen"), amount=Money(1, "CNY"))
    unknown_bank = dataclasses.replace(debit("nobank"), payer_id="bank-z")
    declined = debit("d-2")
    env.bank.script(ref_of(declined), Reply.DECLINE)
    orders = [debit("d-1"), credit("c-1"), declined, debit("seen"), reused, unknown_bank,
              credit("c-2")]  # fmt: skip

    out = env.processor.submit_many(orders, OTHER_ZONE)

    assert [type(o).__name__ for o in out] == [
        "Result", "Result", "Result", "Result", "AlreadyExists", "UnknownParticipant", "Result",
    ]  # fmt: skip
    results = [o for o in out if isinstance(o, Result)]
    assert [r.record.order.payment_id for r in results] == ["d-1", "c-1", "d-2", "seen", "c-2"]
    assert [(r.record.state, r.replayed) for r in results] == [
        (S.APPROVED, False), (S.APPROVED, False), (S.DECLINED, False), (S.APPROVED, True),
        (S.APPROVED, False),
    ]  # fmt: skip
    assert all(r.record.received_zone == OTHER_ZONE for r in results if not r.replayed)
    # One call per bank for the four new payments: bank-a two, bank-b two.
    assert sorted(env.bank.batches) == [2, 2]
    # Begun: all but the order naming an unknown bank; decided: the four new ones.
    assert (env.store.calls["begin"], env.store.calls["decide"]) == (1 + 6, 1 + 4)
    # What was refused wrote nothing.
    assert env.store.records.get((INST_A, "nobank")) is None
    assert env.stored(debit("seen")).order.amount == debit("seen").amount


def test_in_a_batch_an_unanswered_transfer_is_resolved_and_the_others_decided(
    env: Env,
) -> None:
    lost, fine = debit("lost"), debit("fine")
    env.bank.script(ref_of(lost), Reply.NO_ANSWER_APPLIED)

    out = env.processor.submit_many([lost, fine])

    assert [o.record.state for o in out if isinstance(o, Result)] == [S.APPROVED, S.APPROVED]
    assert env.bank.count("inquire", ref_of(lost)) == 1
    assert env.bank.count("inquire", ref_of(fine)) == 0
    assert env.bank.count("transfer", ref_of(lost)) == 1  # asked about, never sent again
    assert env.store.undecided() == []


def test_a_batch_that_cannot_decide_in_time_hands_its_payments_to_the_resolver(
    env: Env,
) -> None:
    orders = [debit("slow-1"), debit("slow-2")]
    env.bank.latency_s = DECISION_BOUND_S + 1  # the bank answers, but too late

    out = env.processor.submit_many(orders)

    assert [getattr(o, "reason", None) for o in out] == ["PAYMENT_IN_PROGRESS"] * 2
    assert all(isinstance(o, Unavailable) for o in out)
    assert {r.order.payment_id for r in env.store.abandoned} == {"slow-1", "slow-2"}


def test_a_batch_with_unanswered_transfers_at_two_banks_never_waits_on_its_own_pool() -> None:
    """Each bank's group runs in one pool and asks about its unanswered transfers in
    another: with both pools as small as can be, every order still gets its answer."""
    env = make_env()
    lost = [debit("a-1"), debit("a-2"), credit("b-1"), credit("b-2")]
    for o in lost:
        env.bank.script(ref_of(o), Reply.NO_ANSWER_APPLIED)
    banks, unknowns = ThreadPoolExecutor(2), ThreadPoolExecutor(1)
    env.processor.pool, env.processor.resolve_pool = banks, unknowns
    out: list[object] = []
    runner = threading.Thread(
        target=lambda: out.extend(env.processor.submit_many(lost)), daemon=True
    )
    try:
        runner.start()
        runner.join(timeout=30)
        assert not runner.is_alive(), "the batch waits on its own pool"
    finally:
        banks.shutdown(wait=False, cancel_futures=True)
        unknowns.shutdown(wait=False, cancel_futures=True)
    assert len(out) == len(lost)
    assert all(isinstance(o, Result) and o.record.is_final for o in out), out


# -- the registry, read again for what it lacks -------------------------------------------


def test_a_registry_reads_again_for_an_id_it_lacks_at_most_twice_a_second() -> None:
    now = [100.0]
    new = dataclasses.replace(PARTICIPANTS[INST_A], participant_id="INST_NEW")
    later = {**PARTICIPANTS, "INST_NEW": new}
    stored: list[Mapping[str, Participant]] = [later]
    reg = Registry(PARTICIPANTS, reload=lambda: stored[0], clock=lambda: now[0])

    def lacks_new(known: Mapping[str, Participant]) -> bool:
        return "INST_NEW" not in known

    assert "INST_NEW" not in reg.snapshot()
    assert "INST_NEW" in reg.snapshot_knowing(lacks_new)  # registered a moment ago
    assert reg.miss_reloads == 1
    assert reg.snapshot_knowing(lacks_new) is reg.snapshot()  # known now: no read
    nobody = reg.snapshot_knowing(lambda known: "INST_NOBODY" not in known)
    assert "INST_NOBODY" not in nobody and reg.miss_reloads == 1  # read 0 s ago: not again
    now[0] += processor.MISS_RELOAD_MIN_S
    reg.snapshot_knowing(lambda known: "INST_NOBODY" not in known)
    assert reg.miss_reloads == 2


def test_a_registry_whose_store_is_away_keeps_its_snapshot() -> None:
    def away() -> Mapping[str, Participant]:
        raise Unavailable("no Cassandra node answered", reason="STORE_UNAVAILABLE")

    reg = Registry(PARTICIPANTS, reload=away)

    assert reg.snapshot_knowing(lambda known: True) == PARTICIPANTS
    assert Registry(PARTICIPANTS).snapshot_knowing(lambda known: True) == PARTICIPANTS


@pytest.mark.parametrize("ahead_s", [60, 200, 3 * 3600, 10 * 365 * 86400])
def test_an_order_from_the_future_is_one_answer_however_far_ahead(ahead_s: int) -> None:
    """More than 30 s ahead is FAILED_PRECONDITION ORDER_FROM_FUTURE, as documented; a
    shape bound at 5 minutes used to answer INVALID_ARGUMENT beyond it."""
    key = Ed25519PrivateKey.generate()
    public = public_key_bytes(key)
    inst = dataclasses.replace(
        PARTICIPANTS[INST_A], signing_keys=(SigningKey(key_id_of(public), public),)
    )
    reg = Registry({**PARTICIPANTS, INST_A: inst})
    ahead = dataclasses.replace(debit("ahead"), requested_at_us=START_US + ahead_s * 1_000_000)
    with pytest.raises(OrderNotFresh) as err:
        admit_order(order_to_pb(signed(ahead, key)), "order", reg, START_US)
    assert err.value.reason == OrderNotFresh.ORDER_FROM_FUTURE
    with pytest.raises(InvalidArgument) as bad:  # a time that is no time is still shape
        admit_order(order_to_pb(signed(dataclasses.replace(ahead, requested_at_us=0), key)),
                    "order", reg, START_US)  # fmt: skip
    assert [v.field for v in bad.value.violations] == ["order.requested_at_us"]


def test_an_order_naming_what_the_registry_lacks_reads_it_again_and_no_other_does() -> None:
    key = Ed25519PrivateKey.generate()
    public = public_key_bytes(key)
    inst = dataclasses.replace(
        PARTICIPANTS[INST_A], signing_keys=(SigningKey(key_id_of(public), public),)
    )
    stored = {**PARTICIPANTS, INST_A: inst}
    reloads: list[int] = []

    def reload() -> Mapping[str, Participant]:
        reloads.append(1)
        return stored

    reg = Registry(stored, reload=reload, clock=lambda: float(len(reloads)))
    now = START_US

    admit_order(order_to_pb(signed(debit("known"), key)), "order", reg, now)
    assert reloads == []  # everything known: no read
    with pytest.raises(SignatureRefused):  # unsigned: refused whatever the registry says
        admit_order(order_to_pb(debit("unsigned")), "order", reg, now)
    assert reloads == []
    unknown_payer = dataclasses.replace(debit("new-bank"), payer_id="BANK_NEW")
    admit_order(order_to_pb(signed(unknown_payer, key)), "order", reg, now)
    assert reloads == [1]  # read again (the payer is refused later, by validation)
    assert "BANK_NEW" not in reg.snapshot()
