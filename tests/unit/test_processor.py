"""The payment path against in-memory fakes: decisions, replays, bank trouble, crashes.

Every test runs on a fake clock: the bank spends its caller's whole deadline when it
does not answer, and the processor's pauses advance the clock instead of sleeping, so
the time bounds are checked exactly and the file runs in well under a second per test.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass

import pytest
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
    PaymentOrder,
    PaymentState,
    PaymentType,
    Posting,
    Unavailable,
    check_balanced,
    fingerprint,
    postings_for,
)
from clearinghouse.switch.ports import BankAnswer, BankTransfer
from clearinghouse.switch.processor import (
    BANK_TRANSFER_DEADLINE_S,
    DECISION_BOUND_S,
    INQUIRY_ATTEMPTS,
    INQUIRY_DEADLINE_S,
    INQUIRY_PAUSE_S,
    LIST_PAGE_SIZE_DEFAULT,
    RESUME_AFTER_S,
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


def test_get_returns_the_stored_payment_and_not_found_otherwise(env: Env) -> None:
    res = env.processor.submit(debit())
    assert env.processor.get(INST_A, "pay-1") == res.record
    with pytest.raises(NotFound):
        env.processor.get(INST_B, "pay-1")  # ids are scoped to their institution


def test_list_pages_in_receipt_order(env: Env) -> None:
    for i in (3, 1, 2, 5, 4):
        env.processor.submit(debit(f"pay-{i}"))
        env.clock.advance(1)
    env.processor.submit(credit("pay-9"))  # another institution's payment: not listed

    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = env.processor.list(INST_A, START_US, START_US + 10**9, 2, token)
        seen.extend(r.order.payment_id for r in page.records)
        pages += 1
        token = page.next_token
        if not token:
            break
    assert seen == ["pay-3", "pay-1", "pay-2", "pay-5", "pay-4"]
    assert pages == 3
    everything = env.processor.list(INST_A, START_US, START_US + 10**9, 0, "")
    assert len(everything.records) == 5 <= LIST_PAGE_SIZE_DEFAULT
    assert everything.next_token == ""


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
        (dataclasses.replace(debit(), payer_id="bank-zz"), NotFound, "NOT_FOUND"),
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


# -- crashes, lost races and storage outages ---------------------------------------------


@pytest.mark.parametrize(
    ("bank_has", "decided", "bank_calls"),
    [
        (BankAnswer.APPROVED, S.APPROVED, {"inquire": 1}),
        (BankAnswer.DECLINED, S.DECLINED, {"inquire": 1}),
        (None, S.REVERSED, {"inquire": 1, "reverse": 1}),
    ],
    ids=["bank-applied", "bank-declined", "bank-never-saw-it"],
)
def test_payment_left_routed_by_a_crash_is_resolved_by_a_retry_after_the_bound(
    env: Env, bank_has: BankAnswer | None, decided: PaymentState, bank_calls: dict[str, int]
) -> None:
    order = debit()
    crashed = begun_record(order, at_us=env.clock(), zone=OTHER_ZONE)
    assert env.store.begin(crashed) == (crashed, True)
    if bank_has is not None:
        env.bank.apply(ref_of(order), bank_has)
    env.clock.advance(5)

    with pytest.raises(Unavailable) as err:
        env.processor.submit(order)

    assert err.value.reason == "PAYMENT_IN_PROGRESS"
    remaining_ms = (RESUME_AFTER_S - 5) * 1000
    assert remaining_ms < err.value.retry_after_ms <= remaining_ms + 1000
    assert env.bank.calls == Counter()
    assert env.store.decisions == []

    env.clock.advance(err.value.retry_after_ms / 1000)
    res = env.processor.submit(order)

    assert res.replayed is True
    assert res.record.attempt_id == crashed.attempt_id
    assert res.record.received_zone == OTHER_ZONE
    assert res.record.state is decided
    assert res.record.steps[2].event.zone == ZONE
    assert res.record.steps[2].event.at_us == env.clock()
    assert env.stored(order) == res.record
    assert env.bank.calls == Counter(bank_calls)  # and never a transfer
    assert env.store.postings == list(
        postings_for(key_of(order), order, decided, from_state=S.ROUTED)
    )
    assert len(env.store.postings) == (2 if decided is S.APPROVED else 0)
    # Now decided: the next retry replays it without asking the bank again.
    assert env.processor.submit(order) == Result(res.record, replayed=True)
    assert env.bank.calls == Counter(bank_calls)


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
    assert err.value.retry_after_ms >= RESUME_AFTER_S * 1000
    assert env.bank.calls == Counter()
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


def test_storage_outage_in_decide_leaves_it_routed_until_a_retry_after_the_bound(
    env: Env,
) -> None:
    order = debit()
    env.store.fail_next("decide")

    with pytest.raises(Unavailable) as err:
        env.processor.submit(order)

    assert err.value.reason == Unavailable.STORAGE_QUORUM_LOST
    assert err.value.retry_after_ms == OUTAGE_RETRY_AFTER_MS
    # The bank approved; the switch could not record it: the payment stays ROUTED.
    assert env.stored(order).state is S.ROUTED
    assert env.bank.status(ref_of(order)) is BankAnswer.APPROVED
    assert env.store.postings == []

    with pytest.raises(Unavailable) as early:
        env.processor.submit(order)
    assert early.value.reason == "PAYMENT_IN_PROGRESS"

    env.clock.advance(RESUME_AFTER_S)
    res = env.processor.submit(order)

    assert res.replayed is True
    assert res.record.state is S.APPROVED
    assert env.bank.calls == Counter({"transfer": 1, "inquire": 1})
    assert len(env.store.postings) == 2
    assert env.stored(order) == res.record


def test_decide_that_landed_before_the_outage_is_replayed_without_the_bank(env: Env) -> None:
    order = debit()
    env.store.fail_next("decide", applied=True)
    with pytest.raises(Unavailable):
        env.processor.submit(order)

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
    assert env.bank.calls == Counter()

    res = env.processor.submit(order)  # the client's immediate retry processes it

    assert (res.replayed, res.record.state) == (False, S.APPROVED)
    assert env.bank.calls == Counter({"transfer": 1})


def test_retry_during_a_live_attempt_is_turned_away(env: Env) -> None:
    """While the first attempt still works (here: in its second reversal), a retry of
    the same order on another node must not act on the payment."""
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


# -- bugs in processor.py (strict xfail: they start failing the day the bug is fixed) ---

BUG_BOUND_NOT_ENFORCED = (
    "processor.py does not enforce DECISION_BOUND_S: received_at is taken before begin(), "
    "but the bank deadlines (17 s) are then spent in full whatever storage already took. "
    "A begin() slower than 3 s (one storage request may take 10 s, retries 6 s) pushes "
    "the decision past the bound, when _replay() treats the payment as abandoned and a "
    "retry resolves it concurrently with the live attempt."
)


def test_bound_holds_when_storage_is_slow(env: Env) -> None:
    env.store.latency_s["begin"] = 4.0
    env.bank.unreachable = True

    res = env.processor.submit(debit())

    assert res.record.state is S.FAILED
    assert env.elapsed_s() <= DECISION_BOUND_S  # 21.0 today


def test_retry_after_the_bound_never_races_a_live_attempt(env: Env) -> None:
    """As test_retry_during_a_live_attempt_is_turned_away, with begin() taking 4 s.

    Today: the retry (at 20.5 s) inquires, finds APPROVED, decides APPROVED and posts
    it; the live attempt's second reversal then reverses it at the bank and it decides
    REVERSED over the top. The client was told APPROVED, the record says REVERSED, the
    bank reversed the money, and the switch's approval postings remain.
    """
    order = debit()
    env.store.latency_s["begin"] = 4.0
    env.bank.script(ref_of(order), Reply.NO_ANSWER_APPLIED)
    env.bank.drop_next("inquire", INQUIRY_ATTEMPTS)
    env.bank.drop_next("reverse", 1)
    retried: list[Result] = []

    def concurrent_retry(method: str, _ref: str) -> None:
        if method == "reverse" and env.bank.calls["reverse"] == 2 and not retried:
            env.clock.advance(1.5)
            try:
                retried.append(env.processor.submit(order))
            except Unavailable as e:
                assert e.reason == "PAYMENT_IN_PROGRESS"

    env.bank.before_call = concurrent_retry
    live = env.processor.submit(order)
    # A FAILED decision without a confirmed reversal leaves a reversal owed; once the
    # bank answers again, settling it makes the bank agree with the switch.
    for _ in range(3):  # nodes retry owed reversals every few seconds
        env.processor.settle_owed_reversals()
    assert env.store.owed_reversals(10) == []

    final = env.stored(order)
    assert [r.record.state for r in retried] in ([], [final.state])
    assert live.record.state is final.state
    assert len(env.store.decisions) == 1
    bank_approved = env.bank.status(ref_of(order)) is BankAnswer.APPROVED
    assert (final.state is S.APPROVED) == bank_approved
    assert len(env.store.postings) == (2 if final.state is S.APPROVED else 0)


BUG_REPLAY_REVALIDATES = (
    "submit() validates against the current registry before looking the id up, so a "
    "replay depends on the registry: after an operator suspends the bank, the same order "
    "gets ParticipantSuspended instead of its stored result, and a payment left ROUTED "
    "(crash or decide() outage) can never be resolved, against SubmitPayment's contract "
    "(idempotent; retry after any error) and ParticipantStatus.SUSPENDED ('payments "
    "already routed still complete')."
)


def test_replay_of_a_decided_payment_survives_its_bank_being_suspended(env: Env) -> None:
    order = debit()
    first = env.processor.submit(order)
    env.registry.replace(_with_suspended(BANK_A))

    assert env.processor.submit(order) == Result(first.record, replayed=True)


def test_routed_payment_completes_after_its_bank_is_suspended(env: Env) -> None:
    order = debit()
    env.store.fail_next("decide")
    with pytest.raises(Unavailable):
        env.processor.submit(order)  # the bank approved; the decision was not recorded
    env.registry.replace(_with_suspended(BANK_A))
    env.clock.advance(RESUME_AFTER_S)

    res = env.processor.submit(order)

    assert (res.replayed, res.record.state) == (True, S.APPROVED)
    assert len(env.store.postings) == 2


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
)


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
    actions: list[Submit | Advance | Outage],
) -> None:
    env = make_env()
    decisions_seen: dict[str, StepRecord] = {}
    for action in actions:
        if isinstance(action, Advance):
            env.clock.advance(action.seconds)
        elif isinstance(action, Outage):
            env.store.fail_next(action.method, applied=action.applied)
        else:
            order = _order_for(action)
            env.bank.script(ref_of(order), action.reply)
            before = env.store.records.get((order.institution_id, order.payment_id))
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
                    assert env.clock() - before.received_at_us < RESUME_AFTER_S * 1e6
            else:
                assert res.replayed is (before is not None)
                assert res.record == env.stored(order)
                assert res.record.is_final
                assert res.record.fingerprint == fingerprint(order)
                if before is not None and before.is_final:
                    assert res.record == before
        _check_invariants(env, decisions_seen)


def test_fake_begin_counts_a_retried_attempt_of_ours_as_won() -> None:
    """The fake's begin behaves like the Cassandra store's, which the processor relies on."""
    store = FakePaymentStore()
    rec = begun_record(debit(), at_us=START_US, zone=ZONE, attempt_id=uuid.uuid4())
    assert store.begin(rec) == (rec, True)
    assert store.begin(rec) == (rec, True)
    rival = dataclasses.replace(rec, attempt_id=uuid.uuid4())
    assert store.begin(rival) == (rec, False)


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
