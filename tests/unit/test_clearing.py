"""Clearing a settlement window: nets, bilateral totals, instructions, reconciliations."""

from __future__ import annotations

import dataclasses
import json
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clearinghouse._invariant import InvariantViolation
from clearinghouse.domain.chain import FIRST_SEQ, GENESIS_HASH, ChainBuilder, LedgerEntry
from clearinghouse.domain.clearing import (
    PAY_IN,
    PAY_OUT,
    MalformedClearing,
    WindowClearing,
    clear_window,
    reconciliation_from_json,
)
from clearinghouse.domain.entries import (
    KIND_CAP_GRANT,
    KIND_CAP_RECEIVE,
    KIND_DECISION,
    KIND_INTENT,
    KIND_REVERSAL_CONFIRMED,
    KIND_WINDOW_CUT,
    CapTransfer,
    Decision,
    Intent,
    ReversalConfirmed,
    WindowCut,
    cap_key,
    window_key,
)
from clearinghouse.domain.fingerprint import canonical_bytes, fingerprint
from clearinghouse.domain.model import ParticipantKind, PaymentOrder, PaymentState, PaymentType
from clearinghouse.domain.money import Money
from clearinghouse.domain.postings import Leg, Posting, postings_for

pytestmark = pytest.mark.unit

S = PaymentState
INST, BANK = ParticipantKind.INSTITUTION, ParticipantKind.BANK
KINDS = {"INST_ALIPAY": INST, "INST_WECHAT": INST, "BANK_ICBC": BANK, "BANK_CCB": BANK}
T0_US = 1_790_000_000_000_000


def order(
    pid: str, kind: PaymentType, inst: str, bank: str, amount: int, ccy: str = "CNY"
) -> PaymentOrder:
    payer, payee = (bank, inst) if kind is PaymentType.DEBIT else (inst, bank)
    return PaymentOrder(
        payment_id=pid, institution_id=inst, type=kind, payer_id=payer, payee_id=payee,
        bank_account="6222020000000001", amount=Money(amount, ccy), memo="",
        requested_at_us=T0_US,
    )  # fmt: skip


def key(o: PaymentOrder) -> str:
    return f"{o.institution_id}/{o.payment_id}"


class Ledger:
    """Per-shard chains for building a window by hand."""

    def __init__(self) -> None:
        self.chains: dict[int, ChainBuilder] = {}
        self.entries: list[LedgerEntry] = []
        self.intents: dict[str, Intent] = {}
        self.clock_us = T0_US

    def _append(self, shard: int, kind: str, payment_key: str, body: bytes) -> LedgerEntry:
        chain = self.chains.setdefault(shard, ChainBuilder(shard, 1, FIRST_SEQ, GENESIS_HASH))
        entry = chain.append(kind, payment_key, body)
        self.entries.append(entry)
        self.clock_us += 1000
        return entry

    def intent(self, o: PaymentOrder, shard: int) -> LedgerEntry:
        i = Intent(canonical_bytes(o), fingerprint(o), o.payer_id if o.type is PaymentType.DEBIT
                   else o.payee_id, "beijing-a", self.clock_us, "SW" + o.payment_id)  # fmt: skip
        self.intents[key(o)] = i
        return self._append(shard, KIND_INTENT, key(o), i.encode())

    def decide(
        self, o: PaymentOrder, shard: int, state: PaymentState, from_state: PaymentState = S.ROUTED
    ) -> LedgerEntry:
        postings = postings_for(key(o), o, state, from_state=from_state)
        d = Decision(state, self.clock_us, "beijing-a", "", "BR1", False, postings)
        return self._append(shard, KIND_DECISION, key(o), d.encode())

    def pay(self, o: PaymentOrder, shard: int, state: PaymentState = S.APPROVED) -> None:
        self.intent(o, shard)
        self.decide(o, shard, state)

    def other(self, shard: int, kind: str) -> None:
        if kind in (KIND_CAP_GRANT, KIND_CAP_RECEIVE):
            t = CapTransfer("BANK_ICBC", "CNY", (shard + 1) % 4, 5000, self.clock_us)
            self._append(shard, kind, cap_key("BANK_ICBC", "CNY"), t.encode())
        elif kind == KIND_REVERSAL_CONFIRMED:
            self._append(shard, kind, "INST_X/p", ReversalConfirmed(self.clock_us, "z").encode())

    def cut(self, window_id: int) -> None:
        for shard in sorted(self.chains):
            body = WindowCut(window_id, self.clock_us).encode()
            self._append(shard, KIND_WINDOW_CUT, window_key(window_id), body)


def example() -> Ledger:
    led = Ledger()
    D, C = PaymentType.DEBIT, PaymentType.CREDIT
    led.pay(order("p1", D, "INST_ALIPAY", "BANK_ICBC", 10_000), 0)
    led.other(0, KIND_CAP_GRANT)
    led.pay(order("p2", C, "INST_ALIPAY", "BANK_CCB", 3_000), 1)
    led.other(1, KIND_CAP_RECEIVE)
    led.pay(order("p3", D, "INST_WECHAT", "BANK_CCB", 5_000), 0)
    led.pay(order("p4", C, "INST_WECHAT", "BANK_ICBC", 7_000), 1, S.DECLINED)
    # p6 was approved in an earlier window (its intent is not here) and reversed now.
    p6 = order("p6", D, "INST_ALIPAY", "BANK_CCB", 1_500)
    led.decide(p6, 1, S.REVERSED, from_state=S.APPROVED)
    led.other(1, KIND_REVERSAL_CONFIRMED)
    led.pay(order("p7", D, "INST_ALIPAY", "BANK_ICBC", 999, "USD"), 2)
    led.chains.setdefault(3, ChainBuilder(3, 1, FIRST_SEQ, GENESIS_HASH))  # only its cut
    led.cut(1)
    return led


def test_hand_built_window() -> None:
    led = example()
    c = clear_window(1, led.entries, KINDS, led.intents)
    assert c.window_id == 1
    assert c.entry_count == len(led.entries) == 18
    assert dict(c.entry_counts) == {
        "CAP_GRANT": 1, "CAP_RECEIVE": 1, "DECISION": 6, "INTENT": 5, "REVERSAL_CONFIRMED": 1,
        "WINDOW_CUT": 4,
    }  # fmt: skip
    assert (c.decision_count, c.payments_decided) == (6, 6)
    assert dict(c.state_counts) == {"APPROVED": 4, "DECLINED": 1, "REVERSED": 1}
    assert c.net_positions_csv() == (
        "participant_id,kind,currency,debit_minor,credit_minor,net_minor\n"
        "BANK_CCB,BANK,CNY,5000,4500,500\n"
        "BANK_ICBC,BANK,CNY,10000,0,10000\n"
        "BANK_ICBC,BANK,USD,999,0,999\n"
        "INST_ALIPAY,INSTITUTION,CNY,4500,10000,-5500\n"
        "INST_ALIPAY,INSTITUTION,USD,0,999,-999\n"
        "INST_WECHAT,INSTITUTION,CNY,0,5000,-5000\n"
    )
    assert c.bilateral_csv() == (
        "payer_id,payee_id,currency,approved_count,approved_minor,reversed_count,reversed_minor\n"
        "BANK_CCB,INST_ALIPAY,CNY,0,0,1,1500\n"
        "BANK_CCB,INST_WECHAT,CNY,1,5000,0,0\n"
        "BANK_ICBC,INST_ALIPAY,CNY,1,10000,0,0\n"
        "BANK_ICBC,INST_ALIPAY,USD,1,999,0,0\n"
        "INST_ALIPAY,BANK_CCB,CNY,1,3000,0,0\n"
    )
    assert c.instructions_csv() == (
        "instruction_id,currency,direction,participant_id,from_account,to_account,amount_minor\n"
        "W1-CNY-PAY_IN-BANK_CCB,CNY,PAY_IN,BANK_CCB,SETTLEMENT:BANK_CCB,SWITCH:CNY,500\n"
        "W1-CNY-PAY_IN-BANK_ICBC,CNY,PAY_IN,BANK_ICBC,SETTLEMENT:BANK_ICBC,SWITCH:CNY,10000\n"
        "W1-CNY-PAY_OUT-INST_ALIPAY,CNY,PAY_OUT,INST_ALIPAY,SWITCH:CNY,RESERVE:INST_ALIPAY,5500\n"
        "W1-CNY-PAY_OUT-INST_WECHAT,CNY,PAY_OUT,INST_WECHAT,SWITCH:CNY,RESERVE:INST_WECHAT,5000\n"
        "W1-USD-PAY_IN-BANK_ICBC,USD,PAY_IN,BANK_ICBC,SETTLEMENT:BANK_ICBC,SWITCH:USD,999\n"
        "W1-USD-PAY_OUT-INST_ALIPAY,USD,PAY_OUT,INST_ALIPAY,SWITCH:USD,RESERVE:INST_ALIPAY,999\n"
    )


def test_reconciliation_rows_counts_and_totals() -> None:
    led = example()
    c = clear_window(1, led.entries, KINDS, led.intents)
    wechat = c.reconciliation("INST_WECHAT")
    assert [(r.payment_id, r.role, r.counterparty, r.state, r.debit_minor, r.credit_minor)
            for r in wechat.rows] == [
        ("p3", "payee", "BANK_CCB", "APPROVED", 0, 5000),
        ("p4", "payer", "BANK_ICBC", "DECLINED", 0, 0),
    ]  # fmt: skip
    p4 = wechat.rows[1]
    assert (p4.type, p4.amount_minor, p4.bank_account, p4.currency) == (
        "CREDIT", 7000, "6222020000000001", "CNY",
    )  # fmt: skip
    assert dict(wechat.state_counts) == {"APPROVED": 1, "DECLINED": 1}
    assert [(t.currency, t.payments, t.debit_minor, t.credit_minor, t.net_minor)
            for t in wechat.totals] == [("CNY", 2, 0, 5000, -5000)]  # fmt: skip
    # p6's intent lies in an earlier window and was not given: the order fields are empty.
    alipay = c.reconciliation("INST_ALIPAY")
    p6 = next(r for r in alipay.rows if r.payment_id == "p6")
    assert (p6.institution_id, p6.role, p6.state, p6.debit_minor) == (
        "INST_ALIPAY", "payee", "REVERSED", 1500,
    )  # fmt: skip
    assert (p6.type, p6.amount_minor, p6.bank_account) == ("", None, "")
    lines = c.reconciliation_csv("INST_ALIPAY").splitlines()
    assert lines[0] == (
        "shard,seq,payment_key,institution_id,payment_id,state,role,counterparty,currency,"
        "debit_minor,credit_minor,decided_at_us,type,amount_minor,bank_account"
    )
    assert any(line.endswith(",,,") and ",p6," in line for line in lines)
    per_participant = json.loads(c.reconciliation_json("BANK_CCB"))
    assert per_participant["format"] == "clearing.participant-reconciliation.v1"
    assert per_participant["window_id"] == 1
    assert per_participant["totals"] == [
        {"currency": "CNY", "payments": 3, "debit_minor": 5000, "credit_minor": 4500,
         "net_minor": 500},
    ]  # fmt: skip


def test_json_is_deterministic_and_round_trips() -> None:
    led = example()
    c = clear_window(1, led.entries, KINDS, led.intents)
    text = c.to_json()
    assert text.endswith("}\n") and "\n" not in text[:-1]
    obj = json.loads(text)
    assert obj["format"] == "clearing.window-clearing.v1"
    assert obj["participants"]["BANK_ICBC"] == "BANK"
    assert list(obj) == sorted(obj)
    assert "rows" not in obj["reconciliations"][0]  # those are per participant
    assert WindowClearing.from_json(text) == c.without_rows()
    assert WindowClearing.from_json(text).to_json() == text
    for pid in KINDS:
        assert reconciliation_from_json(c.reconciliation_json(pid)) == (1, c.reconciliation(pid))
    with pytest.raises(InvariantViolation, match="no reconciliation"):
        c.reconciliation("BANK_NOBODY")
    shuffled = list(led.entries)
    random.Random(3).shuffle(shuffled)
    again = clear_window(1, shuffled, dict(reversed(KINDS.items())), led.intents)
    assert again.to_json() == text


@pytest.mark.parametrize(
    "mutate",
    [
        lambda o: o.update(format="other"),
        lambda o: o.update(window_id="1"),
        lambda o: o.update(decision_count=True),
        lambda o: o["net_positions"][0].update(net_minor=1.5),
        lambda o: o["net_positions"][0].pop("kind"),
        lambda o: o["participants"].update(BANK_X="CENTRAL_BANK"),
        lambda o: o["reconciliations"][0].update(rows=[]),
        lambda o: o["reconciliations"][0]["totals"].append([]),
    ],
)
def test_from_json_refuses_malformed_documents(mutate: object) -> None:
    led = example()
    obj = json.loads(clear_window(1, led.entries, KINDS, led.intents).to_json())
    mutate(obj)  # type: ignore[operator]
    with pytest.raises(MalformedClearing):
        WindowClearing.from_json(json.dumps(obj))
    with pytest.raises(MalformedClearing):
        WindowClearing.from_json("{not json")


def test_an_unbalanced_decision_is_an_invariant_violation() -> None:
    led = example()
    o = order("bad", PaymentType.DEBIT, "INST_ALIPAY", "BANK_ICBC", 100)
    led.intent(o, 0)
    lone = (Posting("BANK_ICBC", "CNY", 100, 0, key(o), Leg.APPROVE_PAYER),)
    d = Decision(S.APPROVED, T0_US, "z", "", "", False, lone)
    led._append(0, KIND_DECISION, key(o), d.encode())
    with pytest.raises(InvariantViolation, match=r"debits 100 != credits 0"):
        clear_window(1, led.entries, KINDS, led.intents)


def test_postings_that_contradict_the_order_are_refused() -> None:
    led = Ledger()
    o = order("p1", PaymentType.DEBIT, "INST_ALIPAY", "BANK_ICBC", 100)
    led.intent(o, 0)
    other = order("p1", PaymentType.DEBIT, "INST_ALIPAY", "BANK_ICBC", 101)
    wrong = postings_for(key(o), other, S.APPROVED, from_state=S.ROUTED)
    d = Decision(S.APPROVED, T0_US, "z", "", "", False, wrong)
    led._append(0, KIND_DECISION, key(o), d.encode())
    with pytest.raises(InvariantViolation, match="differ from the order"):
        clear_window(1, led.entries, KINDS, led.intents)


def test_unknown_participant_kind_wrong_cut_and_duplicates_are_refused() -> None:
    led = example()
    kinds = {k: v for k, v in KINDS.items() if k != "BANK_CCB"}
    with pytest.raises(InvariantViolation, match="BANK_CCB"):
        clear_window(1, led.entries, kinds, led.intents)
    with pytest.raises(InvariantViolation, match="cut of window 1, not 2"):
        clear_window(2, led.entries, KINDS, led.intents)
    # The cut's body says window 1 but its key another window: the key is named.
    rekeyed = [
        dataclasses.replace(e, payment_key="window:7") if e.kind == KIND_WINDOW_CUT else e
        for e in led.entries
    ]
    with pytest.raises(InvariantViolation, match="keyed 'window:7', not 'window:1'"):
        clear_window(1, rekeyed, KINDS, led.intents)
    with pytest.raises(InvariantViolation, match="twice"):
        clear_window(1, [*led.entries, led.entries[3]], KINDS, led.intents)


def test_an_empty_window_clears_to_nothing() -> None:
    led = Ledger()
    led.chains[0] = ChainBuilder(0, 1, FIRST_SEQ, GENESIS_HASH)
    led.cut(4)
    c = clear_window(4, led.entries, KINDS, {})
    assert (c.net_positions, c.bilateral, c.instructions) == ((), (), ())
    assert [len(r.rows) for r in c.reconciliations] == [0, 0, 0, 0]
    assert c.instructions_csv().count("\n") == 1


PARTIES = [("INST_ALIPAY", "BANK_ICBC"), ("INST_WECHAT", "BANK_CCB"), ("INST_ALIPAY", "BANK_CCB"),
           ("INST_WECHAT", "BANK_ICBC")]  # fmt: skip
# How a generated payment ends in the window.
APPROVED, DECLINED, FAILED = "APPROVED", "DECLINED", "FAILED"
REVERSED_UNAPPROVED = "REVERSED_UNAPPROVED"  # reversed before any money moved (no postings)
APPROVED_THEN_REVERSED = "APPROVED_THEN_REVERSED"  # two decisions in this window
REVERSAL_OF_EARLIER = "REVERSAL_OF_EARLIER"  # approved in an earlier window, reversed now
OUTCOMES = [APPROVED, APPROVED, APPROVED, DECLINED, FAILED, REVERSED_UNAPPROVED,
            APPROVED_THEN_REVERSED, REVERSAL_OF_EARLIER]  # fmt: skip
payments = st.lists(
    st.tuples(
        st.sampled_from(PARTIES),
        st.sampled_from([PaymentType.DEBIT, PaymentType.CREDIT]),
        st.integers(1, 10**13),
        st.sampled_from(["CNY", "USD", "JPY"]),
        st.sampled_from(OUTCOMES),
        st.integers(0, 7),
    ),
    max_size=40,
)
Generated = tuple[tuple[str, str], PaymentType, int, str, str, int]
FIRST_DECISION = {
    APPROVED: S.APPROVED, DECLINED: S.DECLINED, FAILED: S.FAILED,
    REVERSED_UNAPPROVED: S.REVERSED, APPROVED_THEN_REVERSED: S.APPROVED,
}  # fmt: skip


def write_window(pays: list[Generated]) -> Ledger:
    led = Ledger()
    for n, ((inst, bank), kind, amount, ccy, outcome, shard) in enumerate(pays):
        o = order(f"p{n}", kind, inst, bank, amount, ccy)
        if outcome == REVERSAL_OF_EARLIER:
            led.decide(o, shard, S.REVERSED, from_state=S.APPROVED)  # its intent: elsewhere
            continue
        led.pay(o, shard, FIRST_DECISION[outcome])
        if outcome == APPROVED_THEN_REVERSED:
            led.decide(o, shard, S.REVERSED, from_state=S.APPROVED)
    led.cut(1)
    return led


class Oracle:
    """What the window must clear to, from the generated payments alone (amounts, who
    pays whom, how each ended), without postings or any code under test."""

    def __init__(self, pays: list[Generated]) -> None:
        self.nets: Counter[tuple[str, str]] = Counter()
        # (payer, payee, currency) -> [approved count, approved, reversed count, reversed]
        self.bilateral: dict[tuple[str, str, str], list[int]] = {}
        self.states: Counter[str] = Counter()
        for (inst, bank), kind, amount, ccy, outcome, _ in pays:
            payer, payee = (bank, inst) if kind is PaymentType.DEBIT else (inst, bank)
            gross = self.bilateral.setdefault((payer, payee, ccy), [0, 0, 0, 0])
            if outcome in (APPROVED, APPROVED_THEN_REVERSED):
                self.nets[(payer, ccy)] += amount  # the payer owes it
                self.nets[(payee, ccy)] -= amount
                gross[0] += 1
                gross[1] += amount
                self.states[APPROVED] += 1
            if outcome in (APPROVED_THEN_REVERSED, REVERSAL_OF_EARLIER):
                self.nets[(payer, ccy)] -= amount  # given back
                self.nets[(payee, ccy)] += amount
                gross[2] += 1
                gross[3] += amount
            if outcome in (APPROVED_THEN_REVERSED, REVERSAL_OF_EARLIER, REVERSED_UNAPPROVED):
                self.states[S.REVERSED.value] += 1
            if outcome in (DECLINED, FAILED):
                self.states[outcome] += 1
        self.bilateral = {k: v for k, v in self.bilateral.items() if any(v)}

    def nonzero_nets(self) -> dict[tuple[str, str], int]:
        return {k: v for k, v in self.nets.items() if v}

    def pay_ins(self) -> Counter[str]:
        out: Counter[str] = Counter()
        for (_, ccy), net in self.nets.items():
            out[ccy] += max(net, 0)
        return out


def test_the_oracle_itself() -> None:
    """The oracle on a window worked by hand: a reversal of an earlier approval moves
    money back; a reversal before approval moves none."""
    D = PaymentType.DEBIT
    pays: list[Generated] = [
        (("INST_ALIPAY", "BANK_ICBC"), D, 100, "CNY", APPROVED, 0),
        (("INST_ALIPAY", "BANK_ICBC"), D, 30, "CNY", REVERSAL_OF_EARLIER, 1),
        (("INST_ALIPAY", "BANK_ICBC"), D, 7, "CNY", APPROVED_THEN_REVERSED, 2),
        (("INST_ALIPAY", "BANK_ICBC"), D, 5, "CNY", REVERSED_UNAPPROVED, 3),
        (("INST_ALIPAY", "BANK_ICBC"), D, 9, "CNY", DECLINED, 3),
    ]
    oracle = Oracle(pays)
    assert oracle.nonzero_nets() == {("BANK_ICBC", "CNY"): 70, ("INST_ALIPAY", "CNY"): -70}
    assert oracle.bilateral == {("BANK_ICBC", "INST_ALIPAY", "CNY"): [2, 107, 2, 37]}
    assert oracle.pay_ins() == Counter({"CNY": 70})
    assert oracle.states == Counter({"APPROVED": 2, "REVERSED": 3, "DECLINED": 1})


@given(payments, st.randoms(use_true_random=False))
@settings(max_examples=80, deadline=None)
def test_random_windows_clear_as_the_oracle_says(pays: list[Generated], rnd: random.Random) -> None:
    led = write_window(pays)
    c = clear_window(1, led.entries, KINDS, led.intents)
    oracle = Oracle(pays)

    # Nets: as the oracle computed them from the amounts; each is debits - credits.
    assert {(n.participant_id, n.currency): n.net_minor for n in c.net_positions
            if n.net_minor} == oracle.nonzero_nets()  # fmt: skip
    net_by_ccy: Counter[str] = Counter()
    for n in c.net_positions:
        assert n.net_minor == n.debit_minor - n.credit_minor
        assert n.kind is KINDS[n.participant_id]
        net_by_ccy[n.currency] += n.net_minor
    assert all(total == 0 for total in net_by_ccy.values())

    # Bilateral gross totals, approved and reversed, by (payer, payee, currency).
    assert {(b.payer_id, b.payee_id, b.currency): [b.approved_count, b.approved_minor,
                                                   b.reversed_count, b.reversed_minor]
            for b in c.bilateral} == oracle.bilateral  # fmt: skip

    # Instructions: each net debtor pays in its net, each net creditor is paid out its
    # net; pay-ins are the sum of the positive nets, and equal pay-outs.
    signed = {(i.participant_id, i.currency): i.amount_minor if i.direction == PAY_IN
              else -i.amount_minor for i in c.instructions}  # fmt: skip
    assert signed == oracle.nonzero_nets()
    paid_in: Counter[str] = Counter()
    paid_out: Counter[str] = Counter()
    for i in c.instructions:
        assert i.amount_minor > 0
        (paid_in if i.direction == PAY_IN else paid_out)[i.currency] += i.amount_minor
        assert (i.direction == PAY_OUT) == i.from_account.startswith("SWITCH:")
    assert paid_in == paid_out == +oracle.pay_ins()

    # Counts: every payment decided once, a reversal in the window twice.
    assert c.payments_decided == len(pays)
    assert c.decision_count == len(pays) + sum(1 for p in pays if p[4] == APPROVED_THEN_REVERSED)
    assert Counter(dict(c.state_counts)) == oracle.states

    nets = {(n.participant_id, n.currency): n.net_minor for n in c.net_positions}
    for rec in c.reconciliations:
        for t in rec.totals:
            assert t.net_minor == nets.get((rec.participant_id, t.currency), 0)
        assert sum(t.payments for t in rec.totals) == len(rec.rows)

    shuffled = list(led.entries)
    rnd.shuffle(shuffled)
    again = clear_window(1, shuffled, KINDS, led.intents)
    assert again.to_json() == c.to_json()
    assert again.net_positions_csv() == c.net_positions_csv()
    assert again.instructions_csv() == c.instructions_csv()
    assert WindowClearing.from_json(c.to_json()) == c.without_rows()
