"""The shard owner's store over an in-memory ledger: chains, takeover, fencing, caps.

Each test drives :meth:`ShardedStore.take` itself, with ownership (``still_owner``)
and ``relinquish`` under its control, and runs the stores' real group-commit threads
against :class:`tests.fakes.FakeLedger`. A lender node owns the payers' home shards
(where their net debit caps are lent out from); the nodes under test borrow from it.
Waits are on events and futures, never on fixed sleeps.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from itertools import count
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clearinghouse._invariant import InvariantViolation
from clearinghouse.domain import (
    FailedPrecondition,
    InsufficientLiquidity,
    Money,
    Participant,
    ParticipantKind,
    ParticipantStatus,
    PaymentEvent,
    PaymentOrder,
    PaymentState,
    PaymentType,
    ResourceExhausted,
    Unavailable,
    canonical_bytes,
    fingerprint,
    postings_for,
)
from clearinghouse.domain.chain import FIRST_SEQ, GENESIS_HASH, LedgerEntry, verify_chain
from clearinghouse.domain.entries import (
    KIND_CAP_GRANT,
    KIND_CAP_RECEIVE,
    KIND_CAP_RECLAIMED,
    KIND_CAP_REPAID,
    KIND_CAP_RETURN,
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
)
from clearinghouse.switch import shards
from clearinghouse.switch.indexer import INDEX_FULL_WAIT_S, Indexer, index_rows_of
from clearinghouse.switch.ports import BankAnswer, IndexRow, OwedReversal, Seal
from clearinghouse.switch.processor import PaymentProcessor, Registry
from clearinghouse.switch.records import (
    SHARD_COUNT,
    STEP_DECIDED,
    PaymentRecord,
    StepRecord,
    payment_key,
    shard_of,
)
from clearinghouse.switch.shards import (
    LEND_SPARE_DIVISOR,
    ReceivedBefore,
    ShardedStore,
    home_shard,
    loan_minor,
    read_chain,
)
from tests.fakes import START_US, FakeBank, FakeClock, FakeLedger, begun_record

pytestmark = pytest.mark.unit

S = PaymentState
ZONE = "shanghai-a"
INST = "inst-a"
BANK = "bank-a"  # a payer with plenty of cap
SMALL = "bank-b"  # a payer whose cap a few payments use up
CAP = 10**9  # plenty: a shard's first loan covers many payments
SMALL_CAP = 1_000
CNY = "CNY"
HOMES = {home_shard(p, c) for p in (BANK, SMALL) for c in (CNY, "USD")}
SHARD, OTHER_SHARD, *SPARE_SHARDS = [s for s in range(SHARD_COUNT) if s not in HOMES][:6]
BANK_CAP = cap_key(BANK, CNY)
NOT_ACKED = "LEDGER_WRITE_NOT_ACKNOWLEDGED"
WAIT_S = 5.0  # how long a test waits for something that should happen at once


def _participant(pid: str, kind: ParticipantKind, cap: int) -> Participant:
    is_bank = kind is ParticipantKind.BANK
    return Participant(
        participant_id=pid,
        kind=kind,
        name=pid.upper(),
        status=ParticipantStatus.ACTIVE,
        bank_code=pid.upper() if is_bank else None,
        endpoint=f"{pid}.bank.test:7000" if is_bank else None,
        currencies=frozenset({CNY, "USD"}),
        net_debit_caps={CNY: cap},  # no USD cap: no net debit in USD at all
        version=1,
    )


PARTICIPANTS = {
    INST: _participant(INST, ParticipantKind.INSTITUTION, CAP),
    BANK: _participant(BANK, ParticipantKind.BANK, CAP),
    SMALL: _participant(SMALL, ParticipantKind.BANK, SMALL_CAP),
}


def ids_in(shard: int, n: int, prefix: str = "p") -> list[str]:
    """``n`` payment ids of INST that fall in ``shard``."""
    found = (f"{prefix}-{i}" for i in count() if shard_of(INST, f"{prefix}-{i}") == shard)
    return [next(found) for _ in range(n)]


def k(payment_id: str) -> str:
    return payment_key(INST, payment_id)


def debit(
    payment_id: str, amount: int = 100, currency: str = CNY, payer: str = BANK
) -> PaymentOrder:
    """``payer`` (a bank) pays INST: its exposure grows by ``amount`` from the intent on."""
    return PaymentOrder(
        payment_id=payment_id,
        institution_id=INST,
        type=PaymentType.DEBIT,
        payer_id=payer,
        payee_id=INST,
        bank_account="6222020000000001",
        amount=Money(amount, currency),
        memo="top-up",
        requested_at_us=START_US - 1_000,
    )


def decision_step(state: PaymentState, at_us: int, bank_ref: str = "") -> StepRecord:
    return StepRecord(STEP_DECIDED, PaymentEvent(state, at_us, ZONE, state.value), bank_ref)


class Node:
    """One switch node's store, with its ownership in the test's hands."""

    def __init__(
        self,
        node_id: str,
        ledger: FakeLedger,
        clock: FakeClock,
        borrow: shards.Borrow | None,
        full_reader: FakeLedger | None = None,
        repay: shards.Repay | None = None,
    ) -> None:
        self.node_id = node_id
        self.clock = clock
        self.epochs: dict[int, int] = {}  # what the node believes it owns
        # Held but unconfirmed (a suspended lease): not owned, not lost either.
        self.suspended: dict[int, int] = {}
        self.relinquished: list[int] = []
        self.gave_up = threading.Event()
        self.unresolved: list[PaymentRecord] = []
        self.store = ShardedStore(
            node_id=node_id,
            zone=ZONE,
            ledger=ledger,
            participant=PARTICIPANTS.get,
            still_owner=lambda shard, epoch: self.epochs.get(shard) == epoch,
            relinquish=self._relinquish,
            clock=clock,
            borrow=borrow,
            repay=repay,
            full_reader=full_reader,
            unconfirmed=lambda shard, epoch: self.suspended.get(shard) == epoch,
        )
        self.store.on_unresolved = self.unresolved.append
        self.store.committer.start()

    def _relinquish(self, shard: int) -> None:
        self.relinquished.append(shard)
        self.gave_up.set()

    def take(self, shard: int, epoch: int) -> bool:
        self.epochs[shard] = epoch
        return self.store.take(shard, epoch, threading.Event())

    def begin(self, order: PaymentOrder) -> tuple[PaymentRecord, bool]:
        return self.store.begin(begun_record(order, at_us=self.clock(), zone=ZONE))

    def decide(
        self, rec: PaymentRecord, state: PaymentState, *, owed: bool = False, bank_ref: str = ""
    ) -> PaymentRecord:
        postings = postings_for(rec.key, rec.order, state, from_state=S.ROUTED)
        step = decision_step(state, self.clock(), bank_ref)
        return self.store.decide(rec, step, postings, reversal_owed=owed)

    def approve(self, order: PaymentOrder) -> PaymentRecord:
        """Begin the order and decide it APPROVED."""
        rec, _ = self.begin(order)
        return self.decide(rec, S.APPROVED)

    def load(self, payment_id: str) -> PaymentRecord | None:
        return self.store.load(INST, payment_id)


class World:
    """One ledger, one clock, the nodes; ``lender`` owns every payer's home shard."""

    def __init__(self) -> None:
        self.ledger = FakeLedger()
        self.clock = FakeClock()
        self.nodes: list[Node] = []
        self.loans: list[tuple[str, str, int, int]] = []  # what was asked of a lender
        self.lender = self.node("lender")
        for home in sorted(HOMES):
            assert self.lender.take(home, 1)

    def node(self, node_id: str, *, own_lender: bool = False) -> Node:
        n = Node(node_id, self.ledger, self.clock, None if own_lender else self.borrow,
                 repay=None if own_lender else self.repay)  # fmt: skip
        self.nodes.append(n)
        return n

    def borrow(
        self, participant_id: str, currency: str, for_shard: int, need: int, epoch: int = 0, /
    ) -> int:
        """The router's part: find the home shard's owner and ask it to lend."""
        self.loans.append((participant_id, currency, for_shard, need))
        home = home_shard(participant_id, currency)
        for n in reversed(self.nodes):
            if home in n.store.owned():
                return n.store.lend(participant_id, currency, for_shard, need, epoch)
        raise Unavailable("no owner of the home shard", reason=Unavailable.NOT_SHARD_OWNER)

    def repay(
        self,
        participant_id: str,
        currency: str,
        from_shard: int,
        total: int,
        received: ReceivedBefore | None = None,
        /,
    ) -> int:
        """The router's part for headroom given back: to the home shard's owner."""
        home = home_shard(participant_id, currency)
        for n in reversed(self.nodes):
            if home in n.store.owned():
                return n.store.repay(participant_id, currency, from_shard, total, received)
        raise Unavailable("no owner of the home shard", reason=Unavailable.NOT_SHARD_OWNER)

    def chain(self, shard: int = SHARD) -> list[LedgerEntry]:
        entries, _ = read_chain(self.ledger, shard)
        return entries

    def transfers(self, shard: int, kind: str) -> list[CapTransfer]:
        return [CapTransfer.decode(e.body) for e in self.chain(shard) if e.kind == kind]


@pytest.fixture()
def world() -> Iterator[World]:
    w = World()
    yield w
    for n in w.nodes:
        n.store.committer.stop()


def summary(entries: list[LedgerEntry]) -> list[tuple[int, int, str, str]]:
    return [(e.seq, e.epoch, e.kind, e.payment_key) for e in entries]


def test_the_shards_used_here() -> None:
    assert {SHARD, OTHER_SHARD}.isdisjoint(HOMES)
    assert len({SHARD, OTHER_SHARD, *SPARE_SHARDS}) == 6
    assert all(shard_of(INST, pid) == SHARD for pid in ids_in(SHARD, 5))
    assert len(set(ids_in(SHARD, 5))) == 5


# -- one owner -------------------------------------------------------------------------------


def test_a_new_shard_serves_and_chains_its_entries(world: World) -> None:
    a = world.node("node-a")
    assert a.take(SHARD, 10) is True
    assert a.store.owned() == {SHARD: 10}
    assert world.ledger.fences[SHARD] == {10: "node-a"}
    assert world.ledger.seals(SHARD) == [Seal(SHARD, 10, 0, FIRST_SEQ, GENESIS_HASH)]
    (pid,) = ids_in(SHARD, 1)
    order = debit(pid, 250)
    rec = begun_record(order, at_us=world.clock(), zone=ZONE)

    stored, won = a.store.begin(rec)

    # A new shard has no allowance yet: it borrows from the payer's home shard first.
    assert (stored, won) == (replace(rec, ledger_seq=2, owner_epoch=10), True)
    assert a.load(pid) == stored
    world.clock.advance(1)
    postings = postings_for(rec.key, order, S.APPROVED, from_state=S.ROUTED)
    step = decision_step(S.APPROVED, world.clock(), "BANKREF1")

    decided = a.store.decide(stored, step, postings)

    assert decided == replace(stored.with_step(step), ledger_seq=3)
    assert decided.state is S.APPROVED
    assert a.load(pid) == decided
    entries = world.ledger.partition(SHARD, 10)
    assert summary(entries) == [
        (1, 10, KIND_CAP_RECEIVE, BANK_CAP),
        (2, 10, KIND_INTENT, k(pid)),
        (3, 10, KIND_DECISION, k(pid)),
    ]
    report = verify_chain(entries, FIRST_SEQ, GENESIS_HASH, shard=SHARD)
    assert (report.ok, report.verified) == (True, 3)
    assert [e.prev_hash for e in entries[1:]] == [e.entry_hash for e in entries[:-1]]
    loan = loan_minor(CAP, 250)
    home = home_shard(BANK, CNY)
    assert world.loans == [(BANK, CNY, SHARD, 250)]
    assert CapTransfer.decode(entries[0].body) == CapTransfer(BANK, CNY, home, loan, START_US)
    # The grant records the epoch of the owner that borrowed (10).
    assert world.transfers(home, KIND_CAP_GRANT) == [
        CapTransfer(BANK, CNY, SHARD, loan, START_US, 10)
    ]
    assert Intent.decode(entries[1].body) == Intent(
        canonical_bytes(order), fingerprint(order), BANK, ZONE, START_US, rec.switch_ref
    )
    assert Decision.decode(entries[2].body, rec.key) == Decision(
        S.APPROVED, START_US + 1_000_000, ZONE, "APPROVED", "BANKREF1", False, postings
    )
    assert read_chain(world.ledger, SHARD) == (entries, 10)
    # Listed under the institution and under its bank, once, with the intent: by the
    # indexer, after the commit, and marked indexed through the decision.
    assert world.ledger.index_rows == []
    a.store.indexer.flush()
    assert world.ledger.marks == {(SHARD, 10): entries[-1].seq}
    assert world.ledger.index_rows == [
        IndexRow(INST, pid, START_US),
        IndexRow(INST, pid, START_US, BANK),
    ]
    assert all(c.acknowledged for c in world.ledger.commits)


def test_a_store_lends_to_itself_when_it_owns_the_home_shard(world: World) -> None:
    solo = world.node("node-solo", own_lender=True)
    home = home_shard(BANK, CNY)
    world.lender.store.lose(home)
    solo.take(home, 2)
    solo.take(SHARD, 10)
    (pid,) = ids_in(SHARD, 1)

    assert solo.begin(debit(pid, 100))[1] is True

    assert world.loans == []  # not through the router
    loan = loan_minor(CAP, 100)
    assert world.transfers(home, KIND_CAP_GRANT) == [
        CapTransfer(BANK, CNY, SHARD, loan, START_US, 10)
    ]
    assert world.transfers(SHARD, KIND_CAP_RECEIVE) == [
        CapTransfer(BANK, CNY, home, loan, START_US)
    ]


def test_a_second_decision_leaves_the_first_standing(world: World) -> None:
    a = world.node("node-a")
    a.take(SHARD, 10)
    (pid,) = ids_in(SHARD, 1)
    stored, _ = a.begin(debit(pid))
    first = a.decide(stored, S.DECLINED)

    again = a.decide(stored, S.APPROVED)

    assert again == first
    assert again.state is S.DECLINED
    assert [e.kind for e in world.chain()] == [KIND_CAP_RECEIVE, KIND_INTENT, KIND_DECISION]


def test_begin_of_a_known_payment_returns_it_and_writes_nothing(world: World) -> None:
    a = world.node("node-a")
    a.take(SHARD, 10)
    (pid,) = ids_in(SHARD, 1)
    stored, _ = a.begin(debit(pid))
    decided = a.decide(stored, S.APPROVED)
    world.clock.advance(30)
    written = world.chain()

    assert a.begin(debit(pid)) == (decided, False)
    # Also with another payload, even one past the allowance: the store reports what it
    # holds (the processor compares fingerprints), and borrows nothing for it.
    assert a.begin(debit(pid, amount=CAP)) == (decided, False)
    assert world.chain() == written
    assert len(world.loans) == 1
    assert a.store.exposure() == {(BANK, CNY): 100, (INST, CNY): 0}


def test_begin_of_an_in_flight_payment_waits_for_its_decision(world: World) -> None:
    a = world.node("node-a")
    a.take(SHARD, 10)
    (pid,) = ids_in(SHARD, 1)
    stored, _ = a.begin(debit(pid))
    with ThreadPoolExecutor(1) as pool:
        duplicate = pool.submit(a.begin, debit(pid))
        with pytest.raises(TimeoutError):
            duplicate.result(timeout=0.05)  # it waits rather than answer "undecided"

        decided = a.decide(stored, S.APPROVED)

        assert duplicate.result(timeout=WAIT_S) == (decided, False)
    assert decided.state is S.APPROVED


def test_a_shard_not_owned_here_is_refused(world: World) -> None:
    a = world.node("node-a")
    a.take(SHARD, 10)
    (pid,) = ids_in(OTHER_SHARD, 1)
    for call in (lambda: a.begin(debit(pid)), lambda: a.load(pid)):
        with pytest.raises(Unavailable) as err:
            call()
        assert err.value.reason == Unavailable.NOT_SHARD_OWNER
    assert world.chain(OTHER_SHARD) == []


def test_lose_stops_serving_and_wakes_waiters(world: World) -> None:
    a = world.node("node-a")
    a.take(SHARD, 10)
    (pid,) = ids_in(SHARD, 1)
    stored, _ = a.begin(debit(pid))
    with ThreadPoolExecutor(1) as pool:
        duplicate = pool.submit(a.begin, debit(pid))
        with pytest.raises(TimeoutError):
            duplicate.result(timeout=0.05)

        a.store.lose(SHARD)

        assert duplicate.result(timeout=WAIT_S) == (stored, False)  # still undecided
    assert a.store.owned() == {}
    with pytest.raises(Unavailable) as err:
        a.decide(stored, S.APPROVED)
    assert err.value.reason == Unavailable.NOT_SHARD_OWNER
    a.store.abandon(stored)  # nothing to hand on: the next owner resolves it
    assert a.unresolved == []
    assert a.relinquished == []  # lost, not given up


def test_abandon_hands_an_undecided_payment_to_on_unresolved(world: World) -> None:
    a = world.node("node-a")
    a.take(SHARD, 10)
    open_id, done_id = ids_in(SHARD, 2)
    open_rec, _ = a.begin(debit(open_id))
    done_rec, _ = a.begin(debit(done_id))
    decided = a.decide(done_rec, S.DECLINED)

    a.store.abandon(open_rec)
    a.store.abandon(decided)
    a.store.abandon(done_rec)  # a stale copy: the store knows it is decided

    assert a.unresolved == [open_rec]


def test_an_owed_reversal_is_recorded_and_its_confirmation_chained(world: World) -> None:
    a = world.node("node-a")
    a.take(SHARD, 10)
    (pid,) = ids_in(SHARD, 1)
    stored, _ = a.begin(debit(pid))
    a.decide(stored, S.FAILED, owed=True)
    owed = OwedReversal(stored.key, BANK, stored.switch_ref, 0)
    assert a.store.owed_reversals(10) == [owed]

    a.store.confirm_reversal(owed, START_US + 7)
    a.store.confirm_reversal(owed, START_US + 8)  # confirmed already: nothing written

    assert a.store.owed_reversals(10) == []
    entries = world.chain()
    assert [e.kind for e in entries][1:] == [KIND_INTENT, KIND_DECISION, KIND_REVERSAL_CONFIRMED]
    assert ReversalConfirmed.decode(entries[-1].body) == ReversalConfirmed(START_US + 7, ZONE)


# -- takeover ----------------------------------------------------------------------------------


def _kept(node: Node, shard: int = SHARD) -> tuple[set[str], set[str]]:
    """The payment ids the shard keeps in flight (objects) and settled (bytes)."""
    st = node.store._shards[shard]
    with st.lock:
        assert all(type(form) is bytes for form in st.settled.values())
        assert not set(st.payments) & set(st.settled)
        return (
            {k.partition("/")[2] for k in st.payments},
            {k.partition("/")[2] for k in st.settled},
        )


def test_takeover_rebuilds_the_shard_and_continues_its_chain(world: World) -> None:
    a = world.node("node-a")
    a.take(SHARD, 10)
    approved, declined, in_flight, owed, confirmed = ids_in(SHARD, 5)
    r, _ = a.begin(debit(approved, 100))
    a.decide(r, S.APPROVED, bank_ref="B-1")
    r, _ = a.begin(debit(declined, 200))
    a.decide(r, S.DECLINED)
    a.begin(debit(in_flight, 300))
    r, _ = a.begin(debit(owed, 400))
    a.decide(r, S.FAILED, owed=True)
    r, _ = a.begin(debit(confirmed, 50))
    a.decide(r, S.FAILED, owed=True)
    assert _kept(a) == ({in_flight, owed, confirmed}, {approved, declined})
    a.store.confirm_reversal(OwedReversal(r.key, BANK, r.switch_ref, 0), world.clock())
    # Nothing is left to do for a payment decided with no reversal owed (any more).
    assert _kept(a) == ({in_flight, owed}, {approved, declined, confirmed})
    ids = [approved, declined, in_flight, owed, confirmed]
    before = {pid: a.load(pid) for pid in ids}
    exposure = {(BANK, CNY): 100 + 300, (INST, CNY): 0}
    assert a.store.exposure() == exposure
    allowance = sum(t.amount_minor for t in world.transfers(SHARD, KIND_CAP_RECEIVE))
    written = world.ledger.partition(SHARD, 10)
    head = written[-1]
    assert head.kind == KIND_REVERSAL_CONFIRMED
    assert sum(e.kind != KIND_CAP_RECEIVE for e in written) == 5 + 4 + 1
    a.store.lose(SHARD)  # node-a's lease ran out; node-b claims the shard

    b = world.node("node-b")
    assert b.take(SHARD, 20) is True

    assert b.store.owned() == {SHARD: 20}
    # The same payments, kept the same way and read back the same, under node-b's epoch.
    assert _kept(b) == ({in_flight, owed}, {approved, declined, confirmed})
    assert {pid: b.load(pid) for pid in ids} == {
        pid: replace(r, owner_epoch=20) for pid, r in before.items()
    }
    assert b.store.exposure() == exposure
    assert b.unresolved == [replace(before[in_flight], owner_epoch=20)]
    owed_rec = before[owed]
    assert owed_rec is not None
    assert b.store.owed_reversals(10) == [OwedReversal(owed_rec.key, BANK, owed_rec.switch_ref, 0)]
    n = head.seq
    assert Seal(SHARD, 20, 10, n + 1, head.entry_hash) in world.ledger.seals(SHARD)
    assert world.ledger.fences[SHARD] == {10: "node-a", 20: "node-b"}

    open_rec = b.unresolved[0]  # as the resolver gets it, under node-b's epoch
    decided = b.decide(open_rec, S.APPROVED)
    # The allowance came back with the shard: what is left of it needs no new loan.
    room = allowance - 400
    assert room > 0
    fits, short = ids_in(SHARD, 2, prefix="new")
    loans = len(world.loans)
    fresh, won = b.begin(debit(fits, room))
    assert (decided.ledger_seq, fresh.ledger_seq, won) == (n + 1, n + 2, True)
    assert len(world.loans) == loans
    b.begin(debit(short, 1))
    assert world.loans[-1] == (BANK, CNY, SHARD, 1)

    entries, newest = read_chain(world.ledger, SHARD)
    assert newest == 20
    assert [e.seq for e in entries] == list(range(1, n + 5))
    assert [e.epoch for e in entries] == [10] * n + [20] * 4
    assert [e.kind for e in entries[n:]] == [
        KIND_DECISION, KIND_INTENT, KIND_CAP_RECEIVE, KIND_INTENT,
    ]  # fmt: skip
    assert entries[n].prev_hash == head.entry_hash
    assert b.store.exposure() == {(BANK, CNY): allowance + 1, (INST, CNY): 0}

    with pytest.raises(Unavailable) as err:
        a.begin(debit(fits))
    assert err.value.reason == Unavailable.NOT_SHARD_OWNER


def _write_entry(node: Node, kind: str, key: str, body: bytes, shard: int = SHARD) -> None:
    """Append an entry to the shard's chain through its owner's group commit, past the
    store's own checks (what racing attempts could leave in a chain)."""
    st = node.store._shards[shard]
    with st.lock:
        pending = node.store._enqueue(st, kind, key, body)
    node.store._await(pending)


def test_a_retry_of_a_settled_payment_returns_it_and_writes_nothing(world: World) -> None:
    a = world.node("node-a")
    a.take(SHARD, 10)
    (pid,) = ids_in(SHARD, 1)
    first, _ = a.begin(debit(pid, 100))
    decided = a.decide(first, S.APPROVED, bank_ref="B-1")
    assert _kept(a) == (set(), {pid})
    written = len(world.chain())

    again, won = a.begin(debit(pid, 100))
    assert (again, won) == (decided, False)
    resent = begun_record(debit(pid, 100), at_us=world.clock(), zone=ZONE)
    assert a.store.begin_many([resent]) == [(decided, False)]
    # A second decision (a late attempt) gets the first one back.
    assert a.decide(first, S.DECLINED) == decided
    assert len(world.chain()) == written
    assert _kept(a) == (set(), {pid})


def test_a_reversal_confirmed_twice_is_replayed_over_a_settled_payment(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two confirmations of one reversal can both be written (each checks, then waits for
    its commit); the second one finds the payment settled by the first."""
    monkeypatch.setattr(shards, "BROKEN_RETRY_WINDOW_S", 0.0)  # a refusal fails at once
    a = world.node("node-a")
    a.take(SHARD, 10)
    (pid,) = ids_in(SHARD, 1)
    r, _ = a.begin(debit(pid, 100))
    a.decide(r, S.FAILED, owed=True)
    a.store.confirm_reversal(OwedReversal(r.key, BANK, r.switch_ref, 0), world.clock())
    _write_entry(a, KIND_REVERSAL_CONFIRMED, r.key, ReversalConfirmed(world.clock(), ZONE).encode())
    assert [e.kind for e in world.chain()][-2:] == [KIND_REVERSAL_CONFIRMED] * 2
    a.store.lose(SHARD)

    b = world.node("node-b")
    assert b.take(SHARD, 20) is True
    assert _kept(b) == (set(), {pid})
    assert b.store.owed_reversals(10) == []


@pytest.mark.parametrize("owed", [False, True])
def test_a_chain_that_decides_a_payment_twice_is_not_served(
    world: World, monkeypatch: pytest.MonkeyPatch, owed: bool
) -> None:
    """Money would move twice: a new owner refuses the chain, whether the first decision
    left the payment settled or owing a reversal."""
    monkeypatch.setattr(shards, "BROKEN_RETRY_WINDOW_S", 0.0)  # no second read
    a = world.node("node-a")
    a.take(SHARD, 10)
    (pid,) = ids_in(SHARD, 1)
    r, _ = a.begin(debit(pid, 100))
    a.decide(r, S.FAILED if owed else S.APPROVED, owed=owed)
    # As a second attempt that slipped past the checks would write it.
    again = Decision(S.APPROVED, world.clock(), ZONE, "again", "", False, ()).encode()
    _write_entry(a, KIND_DECISION, r.key, again)
    a.store.lose(SHARD)

    b = world.node("node-b")
    assert b.take(SHARD, 20) is False
    with pytest.raises(Unavailable) as err:
        b.load(pid)
    assert err.value.reason == "SHARD_CHAIN_BROKEN"


def test_a_fenced_owner_is_not_acknowledged_and_its_late_entry_is_cut_off(
    world: World,
) -> None:
    a, b = world.node("node-a"), world.node("node-b")
    a.take(SHARD, 10)
    first, late, next_ = ids_in(SHARD, 3)
    r, _ = a.begin(debit(first))
    a.decide(r, S.APPROVED)  # seq 1 (loan received), 2, 3
    # node-b takes the shard over; node-a has not noticed (its lease looks alive to it).
    assert b.take(SHARD, 20) is True
    head = world.ledger.partition(SHARD, 10)[-1]
    assert world.ledger.seals(SHARD)[-1] == Seal(SHARD, 20, 10, 4, head.entry_hash)

    with pytest.raises(Unavailable) as err:
        a.begin(debit(late))  # within node-a's allowance: just the intent

    assert err.value.reason == NOT_ACKED
    assert a.gave_up.wait(WAIT_S)
    assert a.relinquished == [SHARD]
    assert a.store.owned() == {}
    # The write itself landed, in node-a's partition, past node-b's seal.
    stale = world.ledger.partition(SHARD, 10)
    assert summary(stale)[-1] == (4, 10, KIND_INTENT, k(late))
    assert world.ledger.commits[-1].acknowledged is False
    assert b.load(late) is None

    mine, _ = b.begin(debit(next_))

    assert mine.ledger_seq == 4
    entries = world.chain()
    assert summary(entries) == [
        (1, 10, KIND_CAP_RECEIVE, BANK_CAP),
        (2, 10, KIND_INTENT, k(first)),
        (3, 10, KIND_DECISION, k(first)),
        (4, 20, KIND_INTENT, k(next_)),
    ]
    # A third owner rebuilds from the chain the seals define: no trace of the late write.
    b.store.lose(SHARD)
    c = world.node("node-c")
    assert c.take(SHARD, 30) is True
    assert c.load(late) is None
    assert c.load(next_) == replace(mine, owner_epoch=30)
    assert c.unresolved == [replace(mine, owner_epoch=30)]
    assert c.store.exposure() == {(BANK, CNY): 200, (INST, CNY): 0}
    assert world.ledger.seals(SHARD)[-1] == Seal(SHARD, 30, 20, 5, entries[-1].entry_hash)
    with pytest.raises(Unavailable) as again:
        a.begin(debit(late))
    assert again.value.reason == Unavailable.NOT_SHARD_OWNER


def test_a_write_the_new_owner_read_is_kept_though_never_acknowledged(world: World) -> None:
    """node-b fences and rebuilds between node-a's write and node-a's fence check: the
    write is part of node-b's state (and resolved there), and node-a does not ack it."""
    a, b = world.node("node-a"), world.node("node-b")
    a.take(SHARD, 10)
    first, raced = ids_in(SHARD, 2)
    r, _ = a.begin(debit(first))
    a.decide(r, S.APPROVED)  # seq 1, 2, 3
    took: list[bool] = []

    def takeover_in_between(_writes: object) -> None:
        if not took:
            took.append(b.take(SHARD, 20))

    world.ledger.between_write_and_check = takeover_in_between

    with pytest.raises(Unavailable) as err:
        a.begin(debit(raced, 300))

    assert err.value.reason == NOT_ACKED
    assert took == [True]
    assert a.gave_up.wait(WAIT_S)
    (left,) = b.unresolved
    assert (left.order.payment_id, left.ledger_seq, left.state) == (raced, 4, S.ROUTED)
    assert b.store.exposure() == {(BANK, CNY): 100 + 300, (INST, CNY): 0}
    assert world.ledger.seals(SHARD)[-1].start_seq == 5
    resolved = b.decide(left, S.REVERSED)
    assert resolved.ledger_seq == 5
    assert summary(world.chain())[3:] == [
        (4, 10, KIND_INTENT, k(raced)),
        (5, 20, KIND_DECISION, k(raced)),
    ]


@pytest.mark.parametrize("applied", [False, True], ids=["lost", "landed"])
def test_a_failed_commit_gives_the_shard_up_to_be_rebuilt(world: World, applied: bool) -> None:
    a = world.node("node-a")
    a.take(SHARD, 10)
    warm, pid = ids_in(SHARD, 2)
    r, _ = a.begin(debit(warm))  # the shard has an allowance: the next begin only writes
    a.decide(r, S.APPROVED)  # its intent (seq 1, 2, 3)
    world.ledger.fail_next_commit(applied=applied, shard=SHARD)

    with pytest.raises(Unavailable) as err:
        a.begin(debit(pid))

    assert err.value.reason == NOT_ACKED
    assert a.gave_up.wait(WAIT_S)
    assert (a.relinquished, a.store.owned()) == ([SHARD], {})
    assert len(world.ledger.partition(SHARD, 10)) == 3 + int(applied)

    # The protocol claims it again under a new epoch; the ledger decides what happened.
    assert a.take(SHARD, 11) is True
    if applied:
        (left,) = a.unresolved
        assert left == a.load(pid)
        assert (left.ledger_seq, left.state) == (4, S.ROUTED)
        assert world.ledger.seals(SHARD)[-1].start_seq == 5
    else:
        assert a.load(pid) is None
        assert a.unresolved == []
        assert a.store.exposure() == {(BANK, CNY): 100, (INST, CNY): 0}
        again, won = a.begin(debit(pid))
        assert (again.ledger_seq, won) == (4, True)
        assert summary(world.chain())[3:] == [(4, 11, KIND_INTENT, k(pid))]


def test_take_retries_storage_errors_while_it_owns_the_shard(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shards, "TAKEOVER_RETRY_S", 0.001)
    a = world.node("node-a")
    calls = world.ledger.calls["fence"], world.ledger.calls["seals"]
    world.ledger.fail_next("seals", 2)

    assert a.take(SHARD, 10) is True

    assert (world.ledger.calls["fence"], world.ledger.calls["seals"]) == (
        calls[0] + 3,
        calls[1] + 3,
    )
    assert a.store.owned() == {SHARD: 10}


def test_a_suspended_lease_refuses_its_shards_then_serves_them_again_without_a_takeover(
    world: World,
) -> None:
    a = world.node("node-a")
    assert a.take(SHARD, 10) is True
    first, second = ids_in(SHARD, 2)
    a.decide(a.begin(debit(first))[0], S.APPROVED)
    fences = world.ledger.calls["fence"]

    a.suspended[SHARD] = a.epochs.pop(SHARD)  # past the lease's deadline, unconfirmed
    with pytest.raises(Unavailable) as err:
        a.begin(debit(second))
    assert err.value.reason == Unavailable.OWNERSHIP_UNCONFIRMED
    assert err.value.retry_after_ms > 0
    with pytest.raises(Unavailable):
        a.load(first)  # not even read: another node may own it by now

    a.epochs[SHARD] = a.suspended.pop(SHARD)  # etcd answered: the lease never expired
    assert a.load(first).state == S.APPROVED  # type: ignore[union-attr]
    rec, new = a.begin(debit(second))
    assert new and a.decide(rec, S.APPROVED).state == S.APPROVED
    assert world.ledger.calls["fence"] == fences  # no takeover: the same epoch serves
    assert a.relinquished == []


def test_entries_queued_before_a_suspension_are_written_once_it_is_confirmed(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = world.node("node-a")
    assert a.take(SHARD, 10) is True
    first, second = ids_in(SHARD, 2)
    gate, inside = threading.Event(), threading.Event()
    commit = world.ledger.commit

    def held_commit(writes: Any) -> Any:
        inside.set()
        gate.wait(5.0)
        return commit(writes)

    monkeypatch.setattr(world.ledger, "commit", held_commit)
    results: dict[str, Any] = {}

    def begin(pid: str) -> None:
        try:
            results[pid] = a.begin(debit(pid))
        except Exception as e:
            results[pid] = e

    t1 = threading.Thread(target=begin, args=(first,))
    t1.start()
    assert inside.wait(5.0)  # the first commit is at the ledger
    t2 = threading.Thread(target=begin, args=(second,))
    t2.start()
    time.sleep(0.2)  # the second intent is queued behind it
    a.suspended[SHARD] = a.epochs.pop(SHARD)  # the lease passes its deadline
    gate.set()
    time.sleep(0.3)  # the committer holds the second batch while unconfirmed
    assert t2.is_alive()
    a.epochs[SHARD] = a.suspended.pop(SHARD)  # confirmed
    t1.join(5.0)
    t2.join(5.0)
    assert not isinstance(results[second], Exception), results[second]
    assert results[second][1] is True  # written, not failed
    assert a.relinquished == []


def test_a_takeover_waits_while_its_lease_is_unconfirmed(world: World) -> None:
    a = world.node("node-a")
    a.suspended[SHARD] = 10
    stop = threading.Event()
    result: list[bool] = []
    t = threading.Thread(target=lambda: result.append(a.store.take(SHARD, 10, stop)))
    t.start()
    t.join(3 * shards.UNCONFIRMED_POLL_S)
    assert t.is_alive() and SHARD not in world.ledger.fences  # waiting, not fencing
    a.epochs[SHARD] = a.suspended.pop(SHARD)  # confirmed
    t.join(5.0)
    assert result == [True] and world.ledger.fences[SHARD] == {10: "node-a"}


def test_take_gives_up_a_shard_it_no_longer_owns(world: World) -> None:
    a = world.node("node-a")
    a.epochs[SHARD] = 11  # the agent has moved on to another epoch already

    assert a.store.take(SHARD, 10, threading.Event()) is False

    assert SHARD not in world.ledger.fences
    (pid,) = ids_in(SHARD, 1)
    with pytest.raises(Unavailable) as err:
        a.begin(debit(pid))
    assert err.value.reason == Unavailable.NOT_SHARD_OWNER


def test_takeover_refuses_to_build_on_a_broken_chain(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shards, "BROKEN_RETRY_WINDOW_S", 0.0)  # no second read
    pid = _one_approved_then_lost(world)
    world.ledger.tamper(SHARD, 10, 3, Decision(S.DECLINED, 1, ZONE, "", "", False, ()).encode())
    b = world.node("node-b")

    assert b.take(SHARD, 20) is False

    assert b.store.owned() == {}
    assert [s.epoch for s in world.ledger.seals(SHARD)] == [10]  # nothing built on it
    # The shard stays claimed by node-b (no other node builds on it) and is refused.
    with pytest.raises(Unavailable) as err:
        b.begin(debit(pid))
    assert err.value.reason == "SHARD_CHAIN_BROKEN"
    with pytest.raises(InvariantViolation, match="chain broken at 3"):
        read_chain(world.ledger, SHARD)


def test_a_takeover_that_fails_unexpectedly_gives_the_shard_back(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Neither storage nor a broken chain (a bug, the interpreter): kept claimed, the
    shard would stay unserved until the node's lease ends; given back, it is claimed
    again under a new epoch and rebuilt from the ledger."""
    monkeypatch.setattr(shards, "TAKEOVER_FAULT_PAUSE_S", 0.0)
    pid = _one_approved_then_lost(world)
    b = world.node("node-b")
    replay = b.store._replay_entry

    def faulty(st: shards._Shard, e: LedgerEntry) -> None:
        if e.seq == 2:
            raise SystemError("bad argument to internal function")
        replay(st, e)

    monkeypatch.setattr(b.store, "_replay_entry", faulty)

    assert b.take(SHARD, 20) is False

    assert b.relinquished == [SHARD]
    assert b.store.owned() == {}
    with pytest.raises(Unavailable) as err:
        b.begin(debit(pid))
    assert err.value.reason == Unavailable.NOT_SHARD_OWNER
    monkeypatch.setattr(b.store, "_replay_entry", replay)
    assert b.take(SHARD, 21) is True
    again = b.load(pid)
    assert again is not None and again.state is S.APPROVED


def test_a_shard_lost_while_its_takeover_replays_is_dropped(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent's Lost can come while another thread still replays the chain, which
    adds payments without the shard's lock: dropping the shard must not trip over it.
    The replay is held once it made the undecided intents payments, and one payment,
    when woken by the drop, adds another the way the replay would meanwhile:
    deterministic, not a race to win."""
    a = world.node("node-a")
    a.take(SHARD, 10)
    ids = ids_in(SHARD, 20)
    begun = a.store.begin_many([begun_record(debit(pid), at_us=START_US, zone=ZONE) for pid in ids])
    assert all(isinstance(r, tuple) for r in begun)
    a.store.lose(SHARD)

    b = world.node("node-b")
    halfway, resume = threading.Event(), threading.Event()
    finish = b.store._finish_replay

    def held_halfway(st: shards._Shard) -> None:
        finish(st)
        assert len(st.payments) == len(ids)  # every intent undecided: in flight
        halfway.set()
        resume.wait(WAIT_S)

    class ReplayMeanwhile(threading.Event):
        """A payment's ``done``: when the drop wakes it, the replay adds a payment."""

        def __init__(self, st: shards._Shard, late: shards._Payment) -> None:
            super().__init__()
            self.st, self.late = st, late

        def set(self) -> None:
            self.st.payments[self.late.record.key + "-late"] = self.late
            super().set()

    monkeypatch.setattr(b.store, "_finish_replay", held_halfway)
    with ThreadPoolExecutor(1) as pool:
        taking = pool.submit(b.take, SHARD, 20)
        assert halfway.wait(WAIT_S)
        st = b.store._shards[SHARD]
        first, second = list(st.payments.values())[:2]
        first.done = ReplayMeanwhile(st, second)

        b.store.lose(SHARD)  # raised "dictionary changed size during iteration"

        resume.set()
        assert taking.result(timeout=WAIT_S) is False
    assert first.done.is_set() and second.done.is_set()
    assert b.store.owned() == {}
    assert b.relinquished == []  # lost, not given up


def _one_approved_then_lost(world: World) -> str:
    """node-a owns SHARD at epoch 10, approves one payment (seqs 1-3), loses the
    shard; the payment's id."""
    a = world.node("node-a")
    a.take(SHARD, 10)
    (pid,) = ids_in(SHARD, 1)
    r, _ = a.begin(debit(pid))
    a.decide(r, S.APPROVED)
    a.store.lose(SHARD)
    return pid


def _lagging_replica(world: World) -> tuple[list[str], int, FakeLedger]:
    """Two owners in turn (epochs 10 and 20), then a copy of the ledger that lacks the
    last entry of epoch 10 though epoch 20's seal starts after it: a replica behind
    the one the second owner read. (ids, that entry's seq, the copy)"""
    ids = [_one_approved_then_lost(world), ids_in(SHARD, 2)[1]]
    last = world.ledger.partition(SHARD, 10)[-1].seq
    b = world.node("node-b")
    assert b.take(SHARD, 20) is True
    b.store.lose(SHARD)
    behind = world.ledger.replica()
    behind.drop(SHARD, 10, last)
    with pytest.raises(InvariantViolation, match="ends before its successor's seal"):
        read_chain(behind, SHARD)
    return ids, last, behind


def test_a_chain_short_at_quorum_is_read_from_every_replica_and_served(world: World) -> None:
    ids, last, behind = _lagging_replica(world)
    c = Node("node-c", behind, world.clock, world.borrow, full_reader=world.ledger)
    world.nodes.append(c)

    assert c.take(SHARD, 30) is True

    assert c.store.owned() == {SHARD: 30}
    got = c.load(ids[0])
    assert got is not None and got.state is S.APPROVED  # the decision the copy lacks
    (seal,) = [s for s in behind.seals(SHARD) if s.epoch == 30]
    assert (seal.prev_epoch, seal.start_seq) == (20, last + 1)


def test_a_broken_shard_is_read_again_and_served_once_its_replicas_agree(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shards, "BROKEN_RETRY_S", 0.01)
    ids, last, behind = _lagging_replica(world)
    c = Node("node-c", behind, world.clock, world.borrow)  # no full read: only retries
    world.nodes.append(c)
    c.epochs[SHARD] = 30
    with ThreadPoolExecutor(1) as pool:
        took = pool.submit(c.store.take, SHARD, 30, threading.Event())
        deadline = time.monotonic() + WAIT_S
        refused = ""
        while not refused and time.monotonic() < deadline:
            try:
                c.begin(debit(ids[1]))
            except Unavailable as e:
                refused = e.reason if e.reason == "SHARD_CHAIN_BROKEN" else ""
        assert refused == "SHARD_CHAIN_BROKEN"
        assert not took.done()  # still reading it again
        behind.stored[(SHARD, 10)][last] = world.ledger.partition(SHARD, 10)[-1]  # caught up

        assert took.result(WAIT_S) is True

    assert c.store.owned() == {SHARD: 30}
    got = c.load(ids[0])
    assert got is not None and got.state is S.APPROVED
    assert c.store.exposure() == {(BANK, CNY): 100, (INST, CNY): 0}
    r, won = c.begin(debit(ids[1]))
    assert won and r.ledger_seq > last


def test_a_takeover_tried_again_after_its_replay_counts_each_payment_once(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shards, "TAKEOVER_RETRY_S", 0.001)
    pid = _one_approved_then_lost(world)
    world.ledger.fail_next("write_seal")  # after the chain was replayed
    b = world.node("node-b")

    assert b.take(SHARD, 20) is True

    assert b.store.exposure() == {(BANK, CNY): 100, (INST, CNY): 0}
    got = b.load(pid)
    assert got is not None and got.state is S.APPROVED


# -- net debit caps --------------------------------------------------------------------------


@settings(deadline=None)
@given(st.integers(1, 10**15), st.integers(0, 10**15))
def test_a_loan_covers_the_need_and_a_share_of_what_is_left(need: int, extra: int) -> None:
    available = need + extra
    loan = loan_minor(available, need)
    assert need <= loan <= available
    assert loan - need == extra // LEND_SPARE_DIVISOR


@pytest.mark.parametrize(("available", "need"), [(10, 11), (10, 0), (0, 1), (5, -1)])
def test_a_loan_the_cap_cannot_cover_is_never_made(available: int, need: int) -> None:
    with pytest.raises(InvariantViolation):
        loan_minor(available, need)


@settings(deadline=None)
@given(st.integers(0, 10**9), st.lists(st.integers(1, 10**7), max_size=80))
def test_loans_never_sum_past_the_cap(cap: int, needs: list[int]) -> None:
    lent = 0
    for need in needs:
        available = cap - lent
        if need <= available:
            lent += loan_minor(available, need)
        assert 0 <= lent <= cap


def test_a_shard_borrows_only_when_its_allowance_falls_short(world: World) -> None:
    a = world.node("node-a")
    a.take(SHARD, 10)
    p1, p2, p3 = ids_in(SHARD, 3)
    home = home_shard(BANK, CNY)
    first = loan_minor(CAP, 100)

    a.begin(debit(p1, 100))
    a.begin(debit(p2, first - 100))  # exactly what is left of the allowance
    assert world.loans == [(BANK, CNY, SHARD, 100)]
    a.begin(debit(p3, 50))  # short by 50

    second = loan_minor(CAP - first, 50)
    assert world.loans == [(BANK, CNY, SHARD, 100), (BANK, CNY, SHARD, 50)]
    assert world.transfers(home, KIND_CAP_GRANT) == [
        CapTransfer(BANK, CNY, SHARD, first, START_US, 10),
        CapTransfer(BANK, CNY, SHARD, second, START_US, 10),
    ]
    assert [e.kind for e in world.chain()] == [
        KIND_CAP_RECEIVE, KIND_INTENT, KIND_INTENT, KIND_CAP_RECEIVE, KIND_INTENT,
    ]  # fmt: skip
    assert [t.amount_minor for t in world.transfers(SHARD, KIND_CAP_RECEIVE)] == [first, second]


def test_begin_past_the_payers_cap_is_refused_and_writes_nothing(world: World) -> None:
    a = world.node("node-a")
    a.take(SHARD, 10)
    a.take(OTHER_SHARD, 10)
    full, over = ids_in(SHARD, 2)
    (elsewhere,) = ids_in(OTHER_SHARD, 1)
    first = loan_minor(SMALL_CAP, 700)
    a.begin(debit(full, 700, payer=SMALL))
    a.begin(debit(elsewhere, SMALL_CAP - first, payer=SMALL))  # the rest of the cap
    home = home_shard(SMALL, CNY)
    grants = world.transfers(home, KIND_CAP_GRANT)
    assert [t.amount_minor for t in grants] == [first, SMALL_CAP - first]
    written = world.chain()

    with pytest.raises(InsufficientLiquidity) as err:
        a.begin(debit(over, first - 700 + 1, payer=SMALL))  # 1 more than this shard holds

    assert isinstance(err.value, FailedPrecondition)
    assert err.value.reason == InsufficientLiquidity.NET_DEBIT_CAP_EXCEEDED
    assert "0 of the cap not lent to any ledger shard" in str(err.value)
    assert a.load(over) is None
    assert world.chain() == written
    assert world.transfers(home, KIND_CAP_GRANT) == grants
    assert a.store.exposure() == {(SMALL, CNY): 700 + SMALL_CAP - first}


def test_a_payer_without_a_cap_in_the_currency_is_refused(world: World) -> None:
    a = world.node("node-a")
    a.take(SHARD, 10)
    (pid,) = ids_in(SHARD, 1)

    with pytest.raises(InsufficientLiquidity):
        a.begin(debit(pid, 1, currency="USD"))

    assert world.loans == [(BANK, "USD", SHARD, 1)]
    assert world.chain() == []
    assert world.chain(home_shard(BANK, "USD")) == []


def test_a_shard_short_of_headroom_needs_its_lender(world: World) -> None:
    a = world.node("node-a")
    a.take(SHARD, 10)
    (pid,) = ids_in(SHARD, 1)
    world.lender.store.lose(home_shard(BANK, CNY))

    with pytest.raises(Unavailable) as err:
        a.begin(debit(pid))

    assert err.value.reason == Unavailable.NOT_SHARD_OWNER
    assert a.load(pid) is None  # no payment is left half begun
    assert a.store.exposure() in ({}, {(BANK, CNY): 0})
    assert world.chain() == []


def test_a_group_commit_that_fails_before_its_write_gives_its_shards_up(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An entry nobody waits for (a CAP_RECEIVE) was appended to the chain in memory and
    # never written; with the shard still served, the next commit built on it: a gap.
    a = world.node("node-a")
    assert a.take(SHARD, 10)
    (pid,) = ids_in(SHARD, 1)
    a.begin(debit(pid))
    written = world.chain()

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug between the chain's append and the write")

    monkeypatch.setattr(shards, "ShardWrite", broken)
    st = a.store._shards[SHARD]
    pending = a.store._enqueue(st, KIND_CAP_RECEIVE, BANK_CAP, b"not awaited")

    assert pending.done.wait(WAIT_S) and not pending.ok
    assert a.gave_up.wait(WAIT_S)
    assert a.relinquished == [SHARD]
    assert SHARD not in a.store.owned()
    assert world.chain() == written  # nothing past what was acknowledged


def test_a_payment_still_short_after_its_last_loan_asks_for_no_other(world: World) -> None:
    # Each loan covers less than the shortfall (as when other payments take the headroom
    # first): the payment is refused after BORROW_ROUNDS_MAX loans. It took one more,
    # recorded in both chains and never tried.
    needs: list[int] = []

    def stingy(participant_id: str, currency: str, for_shard: int, need: int, *_: int) -> int:
        needs.append(need)
        return 1

    a = Node("node-a", world.ledger, world.clock, stingy)
    world.nodes.append(a)
    assert a.take(SHARD, 10)
    (pid,) = ids_in(SHARD, 1)

    with pytest.raises(InsufficientLiquidity) as err:
        a.begin(debit(pid, 100))

    assert err.value.reason == InsufficientLiquidity.NET_DEBIT_CAP_EXCEEDED
    assert needs == [100 - n for n in range(shards.BORROW_ROUNDS_MAX)]
    assert a.load(pid) is None


def _slow_lender_for(world: World, slow: str, asked: list[str]) -> shards.Borrow:
    """The router's borrow, except that ``slow``'s lender never answers: each loan for
    it waits out the router's Lend deadline (5 s) and fails."""

    def borrow(
        participant_id: str, currency: str, for_shard: int, need: int, epoch: int = 0, /
    ) -> int:
        asked.append(participant_id)
        if participant_id == slow:
            world.clock.advance(5.0)
            raise Unavailable("lender did not answer", retry_after_ms=1000,
                              reason="CAP_LENDER_UNAVAILABLE")  # fmt: skip
        return world.borrow(participant_id, currency, for_shard, need, epoch)

    return borrow


def test_a_batch_asks_a_lender_that_did_not_answer_only_once(world: World) -> None:
    # One healthy order, then four whose payer's lender never answers. Each of those
    # waited 5 s for its loan: the healthy payment's 17 s to a decision were gone before
    # its bank was called, and it was decided FAILED without any bank call.
    asked: list[str] = []
    a = Node("node-a", world.ledger, world.clock, _slow_lender_for(world, SMALL, asked))
    world.nodes.append(a)
    assert a.take(SHARD, 10)
    bank = FakeBank(world.clock)
    processor = PaymentProcessor(
        zone=ZONE, store=a.store, bank=bank, registry=Registry(PARTICIPANTS),
        clock=world.clock, sleep=world.clock.sleep, max_amount_minor=10**9,
    )  # fmt: skip
    ids = ids_in(SHARD, 5)
    orders = [debit(ids[0], 100, payer=BANK)] + [debit(i, 100, payer=SMALL) for i in ids[1:]]
    started_us = world.clock()

    out = processor.submit_many(orders)

    assert asked == [BANK, SMALL]  # the slow lender once, not once per order
    first = out[0]
    assert not isinstance(first, Exception), first
    assert first.record.state is S.APPROVED
    assert bank.calls["transfer"] == 1
    for refused in out[1:]:
        assert isinstance(refused, Unavailable), refused
        assert refused.reason == "CAP_LENDER_UNAVAILABLE" and refused.retry_after_ms > 0
    assert world.clock() - started_us < 6_000_000
    assert [a.load(i) for i in ids[1:]] == [None] * 4  # nothing written for them


def test_a_batch_stops_borrowing_when_its_time_for_loans_is_spent(world: World) -> None:
    # A lender that answers, but slowly: past the batch's time for loans, an order that
    # would have to borrow is refused at once instead of waiting for another loan.
    a = world.node("node-a")
    assert a.take(SHARD, 10)
    assert a.take(OTHER_SHARD, 10)

    def slow_borrow(
        participant_id: str, currency: str, for_shard: int, need: int, epoch: int = 0, /
    ) -> int:
        world.clock.advance(shards.BATCH_BORROW_S * 0.75)
        return world.borrow(participant_id, currency, for_shard, need, epoch)

    a.store.borrow = slow_borrow
    first, second, third = (
        ids_in(SHARD, 1)[0],
        ids_in(OTHER_SHARD, 1)[0],
        ids_in(SPARE_SHARDS[0], 1)[0],
    )
    a.take(SPARE_SHARDS[0], 10)
    records = [
        begun_record(debit(pid, 100), at_us=world.clock(), zone=ZONE)
        for pid in (first, second, third)
    ]

    out = a.store.begin_many(records)

    assert [type(o).__name__ for o in out] == ["tuple", "tuple", "Unavailable"]
    assert isinstance(out[2], Unavailable) and out[2].reason == "CAP_LENDER_UNAVAILABLE"
    assert "retry with the same id" in str(out[2])
    assert a.load(third) is None
    assert [t.other_shard for t in world.transfers(home_shard(BANK, CNY), KIND_CAP_GRANT)] == [
        SHARD, OTHER_SHARD,
    ]  # fmt: skip


@pytest.mark.parametrize("release", [S.DECLINED, S.FAILED, S.REVERSED])
def test_a_decision_other_than_approved_gives_the_reservation_back(
    world: World, release: PaymentState
) -> None:
    a = world.node("node-a")
    a.take(SHARD, 10)
    p1, p2, p3 = ids_in(SHARD, 3)
    r1, _ = a.begin(debit(p1, SMALL_CAP, payer=SMALL))  # borrows the whole cap
    with pytest.raises(InsufficientLiquidity):
        a.begin(debit(p2, 1, payer=SMALL))

    a.decide(r1, release)

    assert a.store.exposure() == {(SMALL, CNY): 0}
    r2, won = a.begin(debit(p2, SMALL_CAP, payer=SMALL))
    assert won
    assert len(world.transfers(home_shard(SMALL, CNY), KIND_CAP_GRANT)) == 1  # no new loan
    a.decide(r2, S.APPROVED)  # an approval keeps it, and credits the payee
    assert a.store.exposure() == {(SMALL, CNY): SMALL_CAP, (INST, CNY): 0}
    with pytest.raises(InsufficientLiquidity):
        a.begin(debit(p3, 1, payer=SMALL))


def _approved(e: LedgerEntry) -> bool:
    return Decision.decode(e.body, e.payment_key).state is S.APPROVED


def _replay_limits(
    world: World, shard: int, payer: str, amounts: dict[str, int]
) -> tuple[int, int]:
    """Replay a shard's chain in order: the payer's highest exposure minus allowance (never
    positive if the caps hold), and its allowance at the end."""
    exposure = allowance = 0
    worst = -(10**18)
    for e in world.chain(shard):
        if e.kind == KIND_CAP_RECEIVE:
            t = CapTransfer.decode(e.body)
            if t.participant_id == payer:
                allowance += t.amount_minor
        elif e.kind == KIND_INTENT:
            exposure += amounts[e.payment_key]
        elif e.kind == KIND_DECISION and not _approved(e):
            exposure -= amounts[e.payment_key]
        worst = max(worst, exposure - allowance)
    return worst, allowance


def test_concurrent_begins_over_many_shards_never_pass_the_cap(world: World) -> None:
    a = world.node("node-a")
    spread = [SHARD, OTHER_SHARD, *SPARE_SHARDS]
    for shard in spread:
        a.take(shard, 10)
    threads, per_thread, amount = 32, 2, 50  # 3200 asked for, 1000 of cap
    ids = [pid for shard in spread for pid in ids_in(shard, threads * per_thread // 6 + 1)]
    start = threading.Barrier(threads)

    def worker(t: int) -> int:
        start.wait(WAIT_S)
        got = 0
        for i in range(per_thread):
            pid = ids[t * per_thread + i]
            with contextlib.suppress(InsufficientLiquidity):
                got += a.begin(debit(pid, amount, payer=SMALL))[1]
        return got

    with ThreadPoolExecutor(threads) as pool:
        accepted = sum(pool.map(worker, range(threads))) * amount

    lent = sum(t.amount_minor for t in world.transfers(home_shard(SMALL, CNY), KIND_CAP_GRANT))
    assert accepted <= lent <= SMALL_CAP
    assert accepted >= SMALL_CAP // 2  # lending does not strand most of the cap
    assert a.store.exposure() == {(SMALL, CNY): accepted}
    received = 0
    for shard in spread:
        mine = [t for t in world.transfers(shard, KIND_CAP_RECEIVE) if t.participant_id == SMALL]
        allowance = sum(t.amount_minor for t in mine)
        intents = [e for e in world.chain(shard) if e.kind == KIND_INTENT]
        assert len(intents) * amount <= allowance
        received += allowance
    assert received == lent  # every loan was taken in; none was lost


def test_concurrent_traffic_keeps_the_shard_within_its_allowance(world: World) -> None:
    """Begins and decisions from many threads: replaying the shard's chain in order, the
    payer's exposure never passes what the shard had borrowed, and memory matches."""
    a = world.node("node-a")
    a.take(SHARD, 10)
    threads, per_thread = 12, 8
    ids = ids_in(SHARD, threads * per_thread)
    amounts = {k(pid): 60 + 10 * (n % 5) for n, pid in enumerate(ids)}
    start = threading.Barrier(threads)

    def worker(t: int) -> None:
        start.wait(WAIT_S)
        for i in range(per_thread):
            pid = ids[t * per_thread + i]
            try:
                rec, _ = a.begin(debit(pid, amounts[k(pid)], payer=SMALL))
            except InsufficientLiquidity:
                continue
            a.decide(rec, S.APPROVED if (t + i) % 4 == 0 else S.DECLINED)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(worker, range(threads)))

    worst, allowance = _replay_limits(world, SHARD, SMALL, amounts)
    assert worst <= 0
    assert allowance <= SMALL_CAP
    chain = world.chain()
    assert sum(e.kind == KIND_INTENT for e in chain) > SMALL_CAP // 100  # declines freed room
    approved = sum(
        amounts[e.payment_key] for e in chain if e.kind == KIND_DECISION and _approved(e)
    )
    assert approved > 0
    assert a.store.exposure() == {(SMALL, CNY): approved, (INST, CNY): 0}


# -- the processor on the owner's store ------------------------------------------------------


class Owner:
    """A processor over a node's store."""

    def __init__(self, node: Node, bank: FakeBank, clock: FakeClock) -> None:
        self.node = node
        self.processor = PaymentProcessor(
            zone=ZONE,
            store=node.store,
            bank=bank,
            registry=Registry(PARTICIPANTS),
            clock=clock,
            sleep=clock.sleep,
            max_amount_minor=10**9,
        )
        self.resolved: list[PaymentRecord] = []

    def resolve_now(self) -> Callable[[PaymentRecord], None]:
        """An ``on_unresolved`` that resolves at once (a node does it in a pool)."""

        def resolve(rec: PaymentRecord) -> None:
            self.resolved.append(self.processor.resolve(rec))

        return resolve


def test_processor_decides_and_replays_through_the_owner_store(world: World) -> None:
    a = world.node("node-a")
    a.take(SHARD, 10)
    bank = FakeBank(world.clock)
    owner = Owner(a, bank, world.clock)
    (pid,) = ids_in(SHARD, 1)

    res = owner.processor.submit(debit(pid))

    assert (res.replayed, res.record.state, res.record.ledger_seq) == (False, S.APPROVED, 3)
    assert owner.processor.submit(debit(pid)).record == res.record
    assert bank.calls["transfer"] == 1
    assert [e.kind for e in world.chain()] == [KIND_CAP_RECEIVE, KIND_INTENT, KIND_DECISION]


def test_processor_hands_a_late_attempt_to_the_resolver_through_the_store(
    world: World,
) -> None:
    a = world.node("node-a")
    a.take(SHARD, 10)
    bank = FakeBank(world.clock)
    bank.latency_s = 21.0  # approves, but answers after the decision bound
    owner = Owner(a, bank, world.clock)
    (pid,) = ids_in(SHARD, 1)

    with pytest.raises(Unavailable) as err:
        owner.processor.submit(debit(pid))

    assert err.value.reason == "PAYMENT_IN_PROGRESS"
    (left,) = a.unresolved
    assert (left.state, left.ledger_seq) == (S.ROUTED, 2)
    resolved = owner.processor.resolve(left)
    assert (resolved.state, resolved.ledger_seq) == (S.APPROVED, 3)
    assert bank.calls == {"transfer": 1, "inquire": 1}
    assert owner.processor.submit(debit(pid)).record == resolved


def test_new_owner_resolves_a_payment_its_predecessor_left_undecided(world: World) -> None:
    a = world.node("node-a")
    a.take(SHARD, 10)
    (pid,) = ids_in(SHARD, 1)
    a.begin(debit(pid))  # node-a crashed before calling the bank
    a.store.lose(SHARD)
    b = world.node("node-b")
    bank = FakeBank(world.clock)
    owner = Owner(b, bank, world.clock)
    b.store.on_unresolved = owner.resolve_now()

    assert b.take(SHARD, 20) is True

    (resolved,) = owner.resolved
    assert (resolved.state, resolved.ledger_seq) == (S.REVERSED, 3)
    assert bank.calls == {"inquire": 1, "reverse": 1}  # never a transfer
    res = owner.processor.submit(debit(pid))
    assert (res.replayed, res.record) == (True, resolved)
    assert summary(world.chain())[-1] == (3, 20, KIND_DECISION, k(pid))
    assert b.store.exposure() == {(BANK, CNY): 0}


def test_an_attempt_from_before_a_retake_never_races_the_resolver(world: World) -> None:
    """node-a's commit fails while a payment is at the bank; the protocol gives the shard
    straight back to node-a (new epoch), whose takeover hands the payment to the
    resolver. The bank approves the live attempt's transfer; the resolver, its inquiries
    unanswered, reverses it; the live attempt's decision lands first."""
    a = world.node("node-a")
    a.take(SHARD, 10)
    bank = FakeBank(world.clock)
    owner = Owner(a, bank, world.clock)
    warm, pid, other = ids_in(SHARD, 3)
    owner.processor.submit(debit(warm))  # the shard has an allowance from here on
    order = debit(pid)
    ref = begun_record(order, at_us=0, zone=ZONE).switch_ref
    handed: list[PaymentRecord] = []
    resolver: list[threading.Thread] = []

    def commit_fails_and_shard_comes_back(method: str, switch_ref: str) -> None:
        if (method, switch_ref) != ("transfer", ref) or handed:
            return
        world.ledger.fail_next_commit(shard=SHARD)
        with pytest.raises(Unavailable):
            a.begin(debit(other))
        assert a.gave_up.wait(WAIT_S)
        assert a.take(SHARD, 11)  # claimed again under a new epoch
        handed.extend(a.unresolved)
        world.ledger.between_write_and_check = resolver_reverses_meanwhile

    def resolve() -> None:
        bank.drop_next("inquire", 3)
        owner.resolved.append(owner.processor.resolve(handed[0]))

    def resolver_reverses_meanwhile(_writes: object) -> None:
        if resolver:
            return
        resolver.append(threading.Thread(target=resolve))
        resolver[0].start()
        deadline = time.monotonic() + WAIT_S
        while bank.status(ref) is not BankAnswer.REVERSED and time.monotonic() < deadline:
            time.sleep(0.001)

    bank.before_call = commit_fails_and_shard_comes_back
    with contextlib.suppress(Unavailable):  # a fixed store turns the stale attempt away
        owner.processor.submit(order)
    assert [r.order.payment_id for r in handed] == [pid]
    if not resolver:
        resolve()
    else:
        resolver[0].join(WAIT_S)

    final = a.load(pid)
    assert final is not None and final.is_final
    assert (final.state is S.APPROVED) == (bank.status(ref) is BankAnswer.APPROVED)


# -- the time index ---------------------------------------------------------------------------


def test_what_an_owner_did_not_index_before_it_died_its_successor_indexes(
    world: World,
) -> None:
    a = world.node("node-a")
    a.take(SHARD, 10)
    first, second, third = ids_in(SHARD, 3)
    r, _ = a.begin(debit(first, 100))
    a.decide(r, S.APPROVED)
    a.store.indexer.flush()  # indexed and marked through the first payment's decision
    assert world.ledger.marks == {(SHARD, 10): world.ledger.partition(SHARD, 10)[-1].seq}
    for pid in (second, third):
        r, _ = a.begin(debit(pid, 100))
        a.decide(r, S.APPROVED)
    indexed = {row.payment_id for row in world.ledger.index_rows}
    assert indexed == {first}
    a.store.lose(SHARD)  # node-a dies before its indexer writes the other two

    b = world.node("node-b")
    assert b.take(SHARD, 20) is True
    b.store.indexer.flush()

    # Each of the two, under its institution and its bank; the first not again.
    rows = [(row.payment_id, row.listed_under) for row in world.ledger.index_rows]
    assert sorted(rows) == sorted(
        [(first, INST), (first, BANK)] + [(p, who) for p in (second, third) for who in (INST, BANK)]
    )
    # Node-a's epoch is now marked through the last intent node-b indexed for it.
    last_intent = [e for e in world.ledger.partition(SHARD, 10) if e.kind == KIND_INTENT][-1]
    assert world.ledger.marks[(SHARD, 10)] == last_intent.seq


def test_an_index_write_that_fails_is_kept_for_the_next_flush(world: World) -> None:
    a = world.node("node-a")
    a.take(SHARD, 10)
    (pid,) = ids_in(SHARD, 1)
    r, _ = a.begin(debit(pid, 100))
    a.decide(r, S.APPROVED)
    world.ledger.fail_next("index")
    with pytest.raises(Unavailable):
        a.store.indexer.flush()
    assert world.ledger.index_rows == [] and world.ledger.marks == {}
    a.store.indexer.flush()
    assert {row.payment_id for row in world.ledger.index_rows} == {pid}
    assert (SHARD, 10) in world.ledger.marks


def test_a_full_index_queue_drops_rows_and_never_marks_past_them(world: World) -> None:
    ledger = FakeLedger()
    indexer = Indexer(ledger, world.clock, queue_rows_max=2)
    rows = index_rows_of("inst-a", "p-1", BANK, world.clock())
    indexer.add(SHARD, 10, 5, 5, rows)
    started = time.monotonic()
    # A commit of seqs 6..10 whose rows do not fit: dropped after the wait.
    indexer.add(SHARD, 10, 6, 10, index_rows_of("inst-a", "p-2", BANK, world.clock()))
    assert time.monotonic() - started >= INDEX_FULL_WAIT_S * 0.9  # it waited for room
    assert indexer.rows_dropped == 2
    indexer.add(SHARD, 10, 15, 15, [], wait_s=0.0)  # later entries, without index rows
    indexer.flush()
    assert ledger.index_rows == list(rows)
    # Marked through seq 5 only: the shard's next owner re-indexes from seq 6 on.
    assert ledger.marks == {(SHARD, 10): 5}


# -- batches ----------------------------------------------------------------------------------


def test_a_payment_in_flight_does_not_hold_back_the_rest_of_a_batch(world: World) -> None:
    a = world.node("node-a")
    a.take(SHARD, 10)
    busy_id, fresh_id = ids_in(SHARD, 2)
    busy, _ = a.begin(debit(busy_id, 100))  # begun, its bank call still out
    batch = [
        begun_record(debit(busy_id, 100), at_us=world.clock(), zone=ZONE),
        begun_record(debit(fresh_id, 100), at_us=world.clock(), zone=ZONE),
    ]
    out: list[object] = []
    runner = threading.Thread(target=lambda: out.extend(a.store.begin_many(batch)), daemon=True)
    runner.start()
    runner.join(timeout=5)  # far less than IN_FLIGHT_WAIT_S (25 s)
    assert not runner.is_alive(), "the batch waited for the payment in flight"
    (found, won_found), (fresh, won_fresh) = out  # type: ignore[misc]
    assert (found.state, won_found) == (S.ROUTED, False)  # as it stands: not final
    assert won_fresh and fresh.ledger_seq > busy.ledger_seq


def test_a_batch_waits_for_a_shard_being_taken_over_once_not_per_order(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shards, "TAKEOVER_WAIT_S", 1.0)
    a = world.node("node-a")
    a.epochs[SHARD] = 10
    a.store.gain(SHARD, 10)  # claimed, not yet rebuilt: requests wait for it
    batch = [begun_record(debit(pid, 100), at_us=world.clock(), zone=ZONE)
             for pid in ids_in(SHARD, 4)]  # fmt: skip
    started = time.monotonic()
    out = a.store.begin_many(batch)
    took = time.monotonic() - started
    assert [getattr(e, "reason", None) for e in out] == ["SHARD_RECOVERING"] * 4
    assert took < 2 * shards.TAKEOVER_WAIT_S, took  # per order it would be 4 x 1 s


def test_map_shards_reads_several_shards_at_once_and_keeps_their_order() -> None:
    width = shards.SHARD_READS_IN_FLIGHT
    # Each read waits until `width` reads are in flight together: read one at a time,
    # the barrier times out and the test fails.
    together = threading.Barrier(width, timeout=10)
    lock = threading.Lock()
    in_flight = peak = 0

    def read(shard: int) -> int:
        nonlocal in_flight, peak
        with lock:
            in_flight += 1
            peak = max(peak, in_flight)
        together.wait()
        with lock:
            in_flight -= 1
        return shard * 10

    todo = list(reversed(range(2 * width)))
    assert list(shards.map_shards(read, todo)) == [s * 10 for s in todo]
    assert peak == width


def test_map_shards_holds_few_results_that_were_not_consumed() -> None:
    width = shards.SHARD_READS_IN_FLIGHT
    started: list[int] = []

    def read(shard: int) -> int:
        started.append(shard)
        return shard

    results = shards.map_shards(read, range(128))
    assert next(results) == 0
    time.sleep(0.2)  # what the pool would start meanwhile, were it not bounded
    assert len(started) <= width + 1
    assert list(results) == list(range(1, 128))
    assert sorted(started) == list(range(128))


def test_map_shards_raises_the_first_failure_in_shard_order() -> None:
    def read(shard: int) -> int:
        if shard in (3, 6):
            raise InvariantViolation(f"shard {shard}: chain broken")
        if shard == 0:
            time.sleep(0.2)  # the failures come in before the first result
        return shard

    got: list[int] = []
    with pytest.raises(InvariantViolation, match="shard 3"):
        for r in shards.map_shards(read, range(20)):
            got.append(r)
    assert got == [0, 1, 2]
    assert list(shards.map_shards(read, [5])) == [5]


def test_a_cut_the_full_commit_queue_refused_is_made_at_the_next_call_and_none_is_lost(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = world.node("node-a")
    a.take(SHARD, 10)
    a.take(OTHER_SHARD, 10)
    submit = a.store.committer.submit
    calls = count()

    def full_after_one(pending: Any) -> None:
        if next(calls) >= 1:
            raise ResourceExhausted("the ledger commit queue is full", reason="COMMIT_QUEUE_FULL")
        submit(pending)

    monkeypatch.setattr(a.store.committer, "submit", full_after_one)
    first = a.store.cut_window(1)

    assert len(first) == 1  # the one queued is waited for, and known as cut
    assert set(a.store.cuts_of(1)) == {first[0].shard}
    monkeypatch.setattr(a.store.committer, "submit", submit)
    second = a.store.cut_window(1)

    assert [e.shard for e in second] == sorted({SHARD, OTHER_SHARD} - {first[0].shard})
    assert set(a.store.cuts_of(1)) == {SHARD, OTHER_SHARD}
    assert a.store.cut_window(1) == []  # each shard cut the window once
    for shard in (SHARD, OTHER_SHARD):
        cuts = [e for e in world.chain(shard) if e.kind == KIND_WINDOW_CUT]
        assert [WindowCut.decode(e.body).window_id for e in cuts] == [1]


# -- caps and settlement ---------------------------------------------------------------------


def test_a_settled_window_gives_its_approved_payments_headroom_back(world: World) -> None:
    a = world.node("node-a")
    a.take(SHARD, 10)
    p1, p2, p3, p4 = ids_in(SHARD, 4)
    r1, _ = a.begin(debit(p1, SMALL_CAP, payer=SMALL))  # borrows the whole cap
    a.decide(r1, S.APPROVED)
    with pytest.raises(InsufficientLiquidity):
        a.begin(debit(p2, 1, payer=SMALL))
    a.store.cut_window(1)
    assert a.store.unsettled_windows() == [1]

    # Cut, cleared, not settled: the position is still owed, the cap still binds.
    assert a.store.release_settled([]) == []
    with pytest.raises(InsufficientLiquidity):
        a.begin(debit(p2, 1, payer=SMALL))

    assert a.store.release_settled([1]) == [1]

    assert a.store.exposure() == {(SMALL, CNY): 0, (INST, CNY): 0}
    assert a.store.unsettled_windows() == []
    r2, won = a.begin(debit(p2, SMALL_CAP - 300, payer=SMALL))
    assert won
    a.decide(r2, S.APPROVED)  # window 2's, which is not settled
    _, won = a.begin(debit(p3, 300, payer=SMALL))
    assert won  # the rest of the same allowance: no new loan
    assert len(world.transfers(home_shard(SMALL, CNY), KIND_CAP_GRANT)) == 1
    with pytest.raises(InsufficientLiquidity):
        a.begin(debit(p4, 1, payer=SMALL))  # in flight counts too
    assert a.store.release_settled([1]) == []  # again: nothing more to release


def test_only_a_window_the_shard_has_cut_is_released(world: World) -> None:
    a = world.node("node-a")
    a.take(SHARD, 10)
    p1, p2 = ids_in(SHARD, 2)
    a.approve(debit(p1, SMALL_CAP, payer=SMALL))  # in window 1, still open

    assert a.store.release_settled([1]) == []  # settled before its cut: a fault, ignored

    assert a.store.exposure() == {(SMALL, CNY): SMALL_CAP, (INST, CNY): 0}
    with pytest.raises(InsufficientLiquidity):
        a.begin(debit(p2, 1, payer=SMALL))
    a.store.cut_window(1)
    assert a.store.release_settled([]) == [1]  # known settled, released once cut


def test_a_decision_queued_before_the_cut_counts_in_the_window_it_belongs_to(
    world: World,
) -> None:
    a = world.node("node-a")
    a.take(SHARD, 10)
    p1, p2, p3 = ids_in(SHARD, 3)
    r1, _ = a.begin(debit(p1, 400, payer=SMALL))
    r2, _ = a.begin(debit(p2, 600, payer=SMALL))
    a.decide(r1, S.APPROVED)
    a.store.cut_window(1)  # p1's approval is window 1's, p2 (in flight) window 2's
    a.decide(r2, S.APPROVED)

    a.store.release_settled([1])

    assert a.store.exposure() == {(SMALL, CNY): 600, (INST, CNY): 0}
    _, won = a.begin(debit(p3, 400, payer=SMALL))
    assert won
    assert a.store.unsettled_windows() == []  # window 2 is not cut yet


def test_a_new_owner_counts_only_the_windows_not_settled(world: World) -> None:
    a = world.node("node-a")
    a.take(SHARD, 10)
    p1, p2, p3 = ids_in(SHARD, 3)
    a.approve(debit(p1, 700, payer=SMALL))
    a.store.cut_window(1)
    a.approve(debit(p2, 200, payer=SMALL))
    a.store.cut_window(2)
    a.store.release_settled([2])  # settled out of order: window 1 is still owed

    b = world.node("node-b")
    a.store.lose(SHARD)
    assert b.take(SHARD, 11)
    # b has not heard of any settlement yet: everything decided counts.
    assert b.store.exposure() == {(SMALL, CNY): 900, (INST, CNY): 0}
    assert b.store.unsettled_windows() == [1, 2]
    assert b.store.release_settled([2]) == [2]
    assert b.store.exposure() == {(SMALL, CNY): 700, (INST, CNY): 0}

    c = world.node("node-c")
    c.store.release_settled([1, 2])  # heard before its takeover
    b.store.lose(SHARD)
    assert c.take(SHARD, 12)
    assert {k: v for k, v in c.store.exposure().items() if v} == {}
    assert c.store.unsettled_windows() == []
    _, won = c.begin(debit(p3, SMALL_CAP, payer=SMALL))
    assert won


def test_an_approval_of_a_window_settled_before_it_was_applied_counts_nothing() -> None:
    st = shards._Shard(SHARD, 10)
    rec = begun_record(debit("p-late", 500, payer=SMALL), at_us=START_US, zone=ZONE)
    st.apply_intent(rec)
    st.last_cut = 1

    st.apply_decision(rec, S.APPROVED, 1, frozenset({1}))

    assert dict(st.exposure) == {(SMALL, CNY): 0}
    assert st.window_nets == {}


def _amounts(world: World, shard: int, kind: str) -> list[int]:
    return [t.amount_minor for t in world.transfers(shard, kind)]


def test_headroom_given_back_after_a_settlement_is_lent_where_it_is_needed(
    world: World,
) -> None:
    a = world.node("node-a")
    a.take(SHARD, 10)
    a.take(OTHER_SHARD, 10)
    (p1,), (p2,) = ids_in(SHARD, 1), ids_in(OTHER_SHARD, 1)
    home = home_shard(SMALL, CNY)
    a.approve(debit(p1, SMALL_CAP, payer=SMALL))
    a.store.cut_window(1)
    a.store.release_settled([1])
    with pytest.raises(InsufficientLiquidity):  # the whole cap is lent to SHARD
        a.begin(debit(p2, SMALL_CAP, payer=SMALL))
    assert a.store.give_back_due

    assert a.store.give_back() == 1

    assert not a.store.give_back_due
    assert [t.other_shard for t in world.transfers(SHARD, KIND_CAP_RETURN)] == [home]
    assert _amounts(world, SHARD, KIND_CAP_RETURN) == [SMALL_CAP]
    assert [t.other_shard for t in world.transfers(home, KIND_CAP_REPAID)] == [SHARD]
    assert _amounts(world, home, KIND_CAP_REPAID) == [SMALL_CAP]
    _, won = a.begin(debit(p2, SMALL_CAP, payer=SMALL))
    assert won
    assert _amounts(world, home, KIND_CAP_GRANT) == [SMALL_CAP, SMALL_CAP]
    assert a.store.give_back() == 0  # in flight: nothing spare
    assert a.store.resend_returns() == 0  # confirmed already: nothing sent again


def test_a_shard_gives_back_only_what_its_exposure_does_not_need(world: World) -> None:
    a = world.node("node-a")
    a.take(SHARD, 10)
    p1, p2, p3 = ids_in(SHARD, 3)
    a.approve(debit(p1, 300, payer=SMALL))
    a.store.cut_window(1)
    a.approve(debit(p2, 200, payer=SMALL))  # window 2's: still owed
    a.begin(debit(p3, 100, payer=SMALL))  # in flight
    allowance = sum(_amounts(world, SHARD, KIND_CAP_RECEIVE))
    a.store.release_settled([1])

    a.store.give_back()

    assert _amounts(world, SHARD, KIND_CAP_RETURN) == [allowance - 300]
    assert a.store.exposure()[(SMALL, CNY)] == 300


def test_a_repayment_sent_again_takes_nothing_twice(world: World) -> None:
    lender = world.lender.store
    a = world.node("node-a")
    a.take(SHARD, 10)
    (p1,) = ids_in(SHARD, 1)
    a.approve(debit(p1, 400, payer=SMALL))
    a.store.cut_window(1)
    a.store.release_settled([1])
    a.store.give_back()
    home = home_shard(SMALL, CNY)
    total = sum(_amounts(world, SHARD, KIND_CAP_RETURN))

    assert lender.repay(SMALL, CNY, SHARD, total) == total
    assert lender.repay(SMALL, CNY, SHARD, total - 1) == total  # an older total: late

    assert _amounts(world, home, KIND_CAP_REPAID) == [total]
    # A new owner of each side rebuilds the same: SHARD sends its total again once (it
    # cannot know it arrived), the home shard's new owner takes nothing twice.
    b = world.node("node-b")
    a.store.lose(SHARD)
    b.take(SHARD, 11)
    lender2 = world.node("lender-2", own_lender=True)
    world.lender.store.lose(home)
    assert lender2.take(home, 2)
    b.store.repay_to_home = lender2.store.repay

    assert b.store.resend_returns() == 1
    assert b.store.resend_returns() == 0

    assert _amounts(world, home, KIND_CAP_REPAID) == [total]
    (p2,) = ids_in(OTHER_SHARD, 1)
    b.take(OTHER_SHARD, 11)
    b.store.borrow = lender2.store.lend
    assert b.begin(debit(p2, SMALL_CAP, payer=SMALL))[1]  # the whole cap, lent again


def test_a_repayment_that_fails_is_sent_again_at_the_next_step(
    world: World, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shards, "REPAY_HOME_RETRY_S", 0.0)  # asked again at once
    a = world.node("node-a")
    a.take(SHARD, 10)
    (p1,) = ids_in(SHARD, 1)
    a.approve(debit(p1, 400, payer=SMALL))
    a.store.cut_window(1)
    a.store.release_settled([1])
    calls: list[int] = []

    def away(
        participant_id: str, currency: str, from_shard: int, total: int, _told: object = None, /
    ) -> int:
        calls.append(total)
        raise Unavailable("the home shard's owner is away", reason=Unavailable.NOT_SHARD_OWNER)

    a.store.repay_to_home = away
    with caplog.at_level(logging.INFO, logger="clearinghouse.switch.shards"):
        assert a.store.give_back() == 1  # written in SHARD's chain, not repaid
    assert "not taken back yet by 1 home shards (for 0 s" in caplog.text
    assert [r.levelname for r in caplog.records] == ["INFO"]  # not for long: INFO
    monkeypatch.setattr(shards, "REPAY_WARN_AFTER_S", 0.0)
    monkeypatch.setattr(shards, "REPAY_LOG_EVERY_S", 0.0)
    caplog.clear()
    assert a.store.resend_returns() == 0
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    home = home_shard(SMALL, CNY)
    assert _amounts(world, home, KIND_CAP_REPAID) == []
    a.store.repay_to_home = world.lender.store.repay

    assert a.store.resend_returns() == 1

    returned = _amounts(world, SHARD, KIND_CAP_RETURN)
    assert calls == returned * 2  # the same total, sent twice while the home was away
    assert _amounts(world, home, KIND_CAP_REPAID) == returned


def test_a_lowered_cap_binds_the_headroom_given_back(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = world.node("node-a")
    a.take(SHARD, 10)
    p1, p2, p3 = ids_in(SHARD, 3)
    a.approve(debit(p1, 600, payer=SMALL))
    monkeypatch.setitem(PARTICIPANTS, SMALL, replace(PARTICIPANTS[SMALL],
                                                     net_debit_caps={CNY: 250}))  # fmt: skip
    a.store.cut_window(1)
    a.store.release_settled([1])
    a.store.give_back()

    with pytest.raises(InsufficientLiquidity):
        a.begin(debit(p2, 251, payer=SMALL))
    assert a.begin(debit(p3, 250, payer=SMALL))[1]


def test_a_credit_never_covers_a_debit_of_another_window(world: World) -> None:
    # Windows settle one by one: a credit of window 1 settled away must not leave the
    # debit of window 2 it would have covered without headroom (found by review).
    a = world.node("node-a")
    a.take(SHARD, 10)
    a.take(OTHER_SHARD, 10)
    q1, q2 = ids_in(SHARD, 2, prefix="q")
    (r1,) = ids_in(OTHER_SHARD, 1, prefix="r")
    a.approve(replace(debit(q1, SMALL_CAP), payee_id=SMALL))  # SMALL is paid, window 1
    a.store.cut_window(1)
    a.approve(debit(q2, SMALL_CAP, payer=SMALL))  # window 2: the whole cap, borrowed
    assert _amounts(world, home_shard(SMALL, CNY), KIND_CAP_GRANT) == [SMALL_CAP]

    a.store.release_settled([1])
    a.store.give_back()

    with pytest.raises(InsufficientLiquidity):
        a.begin(debit(r1, 1, payer=SMALL))
    assert a.store.exposure()[(SMALL, CNY)] == SMALL_CAP


def test_credits_offset_the_debits_of_their_own_window(world: World) -> None:
    a = world.node("node-a")
    a.take(SHARD, 10)
    p1, p2, p3, p4 = ids_in(SHARD, 4)
    a.approve(debit(p1, SMALL_CAP, payer=SMALL))
    a.approve(replace(debit(p2, 600), payee_id=SMALL))  # SMALL is paid 600, same window

    assert a.store.exposure()[(SMALL, CNY)] == SMALL_CAP - 600
    a.approve(debit(p3, 600, payer=SMALL))  # in flight, it needs the 600 freed
    with pytest.raises(InsufficientLiquidity):
        a.begin(debit(p4, 1, payer=SMALL))
    assert a.store.exposure()[(SMALL, CNY)] == SMALL_CAP


def test_one_home_shard_that_refuses_holds_no_other_repayment_back(world: World) -> None:
    a = world.node("node-a")
    a.take(SHARD, 10)
    p1, p2 = ids_in(SHARD, 2)
    a.approve(debit(p1, 100, payer=BANK))
    a.approve(debit(p2, 100, payer=SMALL))
    a.store.cut_window(1)
    a.store.release_settled([1])

    def bank_home_broken(
        pid: str, ccy: str, shard: int, total: int, told: ReceivedBefore | None = None, /
    ) -> int:
        if pid == BANK:
            raise Unavailable("out of service", reason="SHARD_CHAIN_BROKEN")
        return world.repay(pid, ccy, shard, total, told)

    a.store.repay_to_home = bank_home_broken
    a.store.give_back()

    assert _amounts(world, home_shard(SMALL, CNY), KIND_CAP_REPAID) != []
    assert _amounts(world, home_shard(BANK, CNY), KIND_CAP_REPAID) == []


def test_a_shard_cannot_give_back_more_than_was_lent_to_it(world: World) -> None:
    lender = world.lender.store
    a = world.node("node-a")
    a.take(SHARD, 10)
    a.take(OTHER_SHARD, 10)
    (p1,), (p2,) = ids_in(SHARD, 1), ids_in(OTHER_SHARD, 1)
    a.begin(debit(p1, 300, payer=SMALL))
    a.begin(debit(p2, 300, payer=SMALL))
    lent_to_shard = sum(_amounts(world, SHARD, KIND_CAP_RECEIVE))
    home = home_shard(SMALL, CNY)

    with pytest.raises(FailedPrecondition) as err:  # OTHER_SHARD's loan is not SHARD's
        lender.repay(SMALL, CNY, SHARD, lent_to_shard + 1)

    assert err.value.reason == "CAP_RETURN_EXCEEDS_LOANS"
    assert _amounts(world, home, KIND_CAP_REPAID) == []
    assert lender.repay(SMALL, CNY, SHARD, lent_to_shard) == lent_to_shard


def test_give_back_records_a_bounded_number_of_returns_per_step(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shards, "GIVE_BACK_RETURNS_PER_STEP_MAX", 1)
    a = world.node("node-a")
    a.take(SHARD, 10)
    a.take(OTHER_SHARD, 10)
    (p1,), (p2,) = ids_in(SHARD, 1), ids_in(OTHER_SHARD, 1)
    a.approve(debit(p1, 100, payer=SMALL))
    a.approve(debit(p2, 100, payer=SMALL))
    a.store.cut_window(1)
    a.store.release_settled([1])

    assert a.store.give_back() == 1
    assert a.store.give_back_due  # one shard's return waits for the next step
    assert a.store.give_back() == 1
    assert not a.store.give_back_due
    assert len(_amounts(world, home_shard(SMALL, CNY), KIND_CAP_REPAID)) == 2


def _owe_returns(world: World, orders: list[PaymentOrder], monkeypatch: pytest.MonkeyPatch) -> Node:
    """node-a approved ``orders`` in SHARD's window 1, which settled: it owes a return to
    each payer's home shard, written and not yet taken back (each home asked again at
    once, not after REPAY_HOME_RETRY_S)."""
    monkeypatch.setattr(shards, "REPAY_HOME_RETRY_S", 0.0)
    a = world.node("node-a")
    a.take(SHARD, 10)
    for o in orders:
        a.approve(o)
    a.store.cut_window(1)
    a.store.release_settled([1])

    def away(*_: object) -> int:
        raise Unavailable("away", reason=Unavailable.NOT_SHARD_OWNER)

    a.store.repay_to_home = away
    assert a.store.give_back() == len(orders)
    return a


def test_returns_past_the_limit_are_reached_though_an_earlier_home_refuses(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    p1, p2 = ids_in(SHARD, 2)
    orders = [debit(p1, 100, payer=BANK), debit(p2, 100, payer=SMALL)]
    a = _owe_returns(world, orders, monkeypatch)

    def bank_home_broken(
        pid: str, ccy: str, shard: int, total: int, told: ReceivedBefore | None = None, /
    ) -> int:
        if pid == BANK:
            raise Unavailable("out of service", reason="SHARD_CHAIN_BROKEN")
        return world.repay(pid, ccy, shard, total, told)

    a.store.repay_to_home = bank_home_broken
    for _ in range(3):
        a.store.resend_returns(limit=1)  # one call a step stands for the limit of 64

    assert _amounts(world, home_shard(SMALL, CNY), KIND_CAP_REPAID) != []
    assert _amounts(world, home_shard(BANK, CNY), KIND_CAP_REPAID) == []


def test_homes_that_do_not_answer_do_not_starve_the_others(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(PARTICIPANTS, BANK, replace(PARTICIPANTS[BANK],
                        net_debit_caps={CNY: 10**9, "USD": 10**9}))  # fmt: skip
    monkeypatch.setattr(shards, "RESEND_BUDGET_S", 0.05)
    p1, p2, p3 = ids_in(SHARD, 3)
    orders = [debit(p1, 100, payer=BANK), debit(p2, 100, payer=SMALL),
              debit(p3, 100, currency="USD", payer=BANK)]  # fmt: skip
    a = _owe_returns(world, orders, monkeypatch)

    def cny_slow(
        pid: str, ccy: str, shard: int, total: int, told: ReceivedBefore | None = None, /
    ) -> int:
        if ccy == CNY:
            time.sleep(0.03)
            raise Unavailable("no answer", reason="CAP_LENDER_UNAVAILABLE")
        return world.repay(pid, ccy, shard, total, told)

    a.store.repay_to_home = cny_slow
    for _ in range(5):
        a.store.resend_returns()

    assert _amounts(world, home_shard(BANK, "USD"), KIND_CAP_REPAID) != []


def test_a_takeover_during_give_back_keeps_its_return_due(world: World) -> None:
    a, b = world.node("node-a"), world.node("node-b")
    a.take(OTHER_SHARD, 10)
    (p1,) = ids_in(OTHER_SHARD, 1)
    a.approve(debit(p1, 400, payer=SMALL))
    a.store.cut_window(1)
    a.store.lose(OTHER_SHARD)
    b.store.release_settled([1])
    real_lock = b.store._lock

    class TakeOverAfterTheList:
        """The store's lock; OTHER_SHARD's takeover ends right after its first use."""

        done = False

        def __enter__(self) -> None:
            real_lock.__enter__()

        def __exit__(self, *exc: object) -> None:
            real_lock.__exit__(*exc)
            if not TakeOverAfterTheList.done:
                TakeOverAfterTheList.done = True
                b.store._lock = real_lock
                assert b.take(OTHER_SHARD, 11)

    b.store._lock = TakeOverAfterTheList()  # type: ignore[assignment]
    b.store.give_back()

    assert TakeOverAfterTheList.done
    assert _amounts(world, OTHER_SHARD, KIND_CAP_RETURN) or b.store.give_back_due


def test_a_home_that_did_not_answer_is_asked_again_after_a_pause(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    (p1,) = ids_in(SHARD, 1)
    a = _owe_returns(world, [debit(p1, 100, payer=SMALL)], monkeypatch)
    monkeypatch.setattr(shards, "REPAY_HOME_RETRY_S", 3600.0)
    asked: list[int] = []

    def away(pid: str, ccy: str, shard: int, total: int, _told: object = None, /) -> int:
        asked.append(total)
        raise Unavailable("away", reason=Unavailable.NOT_SHARD_OWNER)

    a.store.repay_to_home = away
    for _ in range(3):
        a.store.resend_returns()

    assert len(asked) == 1  # then left alone for REPAY_HOME_RETRY_S


# -- loans never received ---------------------------------------------------------------------


def _answer_lost(world: World) -> shards.Borrow:
    """The router's borrow, except that the lender's answer never comes back: the loan
    is granted (and recorded) at the home shard, and the borrower hears UNAVAILABLE."""

    def borrow(pid: str, ccy: str, for_shard: int, need: int, epoch: int = 0, /) -> int:
        world.borrow(pid, ccy, for_shard, need, epoch)
        raise Unavailable("the Lend call timed out", reason="CAP_LENDER_UNAVAILABLE")

    return borrow


def test_a_loan_never_received_is_reclaimed_once_the_shard_has_a_new_owner(
    world: World,
) -> None:
    a = world.node("node-a")
    a.take(SHARD, 10)
    p1, p2, p3 = ids_in(SHARD, 3)
    a.approve(debit(p1, 500, payer=SMALL))  # borrows 500 of the 1,000 cap, received
    a.store.borrow = _answer_lost(world)
    with pytest.raises(Unavailable):
        a.begin(debit(p2, 500, payer=SMALL))  # the other 500 lent, never received
    home = home_shard(SMALL, CNY)
    assert _amounts(world, home, KIND_CAP_GRANT) == [500, 500]
    lender = world.lender.store._shards[home]
    assert lender.lent[(SMALL, CNY)] == SMALL_CAP  # the whole cap is out

    b = world.node("node-b")
    a.store.lose(SHARD)
    b.take(SHARD, 20)
    with pytest.raises(InsufficientLiquidity):  # not yet told: no headroom anywhere
        b.begin(debit(p3, 500, payer=SMALL))
    assert b.store.resend_returns() == 1  # tells the home shard what it received before 20

    reclaimed = world.transfers(home, KIND_CAP_RECLAIMED)
    assert reclaimed == [CapTransfer(SMALL, CNY, SHARD, 500, START_US, 20)]
    assert lender.lent[(SMALL, CNY)] == 500
    assert b.store.resend_returns() == 0  # told once: nothing due any more
    _, won = b.begin(debit(p3, 500, payer=SMALL))  # the reclaimed headroom, lent again
    assert won
    # Told again (a retry, or the next repayment): nothing is taken twice.
    again = ReceivedBefore(20, 500)
    assert world.repay(SMALL, CNY, SHARD, 0, again) == 0
    assert len(world.transfers(home, KIND_CAP_RECLAIMED)) == 1
    # A new owner of the home shard rebuilds the same loans from its chain.
    c = world.node("lender-2", own_lender=True)
    world.lender.store.lose(home)
    assert c.take(home, 2)
    assert c.store._shards[home].lent[(SMALL, CNY)] == lender.lent[(SMALL, CNY)]
    assert c.store._shards[home].reclaimed[(SMALL, CNY, SHARD)] == 500


def test_a_loan_to_the_owner_that_tells_is_never_reclaimed(world: World) -> None:
    a = world.node("node-a")
    a.take(SHARD, 10)
    p1, p2 = ids_in(SHARD, 2)
    a.approve(debit(p1, 500, payer=SMALL))
    home = home_shard(SMALL, CNY)
    lender = world.lender.store._shards[home]

    # Lent at the teller's own epoch (its receipt may be on its way): not final.
    assert world.repay(SMALL, CNY, SHARD, 0, ReceivedBefore(10, 0)) == 0
    # An older owner's word, told late: loans at epochs before 5 were none.
    assert world.repay(SMALL, CNY, SHARD, 0, ReceivedBefore(5, 0)) == 0

    assert world.transfers(home, KIND_CAP_RECLAIMED) == []
    assert lender.lent[(SMALL, CNY)] == 500
    # More received than was ever lent: the chains disagree; nothing is reclaimed, and a
    # return that comes with it is still taken.
    assert world.repay(SMALL, CNY, SHARD, 100, ReceivedBefore(11, 501)) == 100
    assert world.transfers(home, KIND_CAP_RECLAIMED) == []
    assert lender.lent[(SMALL, CNY)] == 400
    _, won = a.begin(debit(p2, 500, payer=SMALL))
    assert won


def test_loans_recorded_without_an_epoch_are_never_reclaimed(world: World) -> None:
    home = home_shard(SMALL, CNY)
    world.lender.store.lend(SMALL, CNY, SHARD, 300)  # as before epochs were recorded
    assert world.transfers(home, KIND_CAP_GRANT)[0].epoch == 0

    assert world.repay(SMALL, CNY, SHARD, 0, ReceivedBefore(20, 0)) == 0

    assert world.transfers(home, KIND_CAP_RECLAIMED) == []
    assert world.lender.store._shards[home].lent[(SMALL, CNY)] == 300


def test_a_home_shard_whose_registry_lacks_the_payer_asks_for_a_retry_and_records_nothing(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Registered a moment ago: the node that took the order knows it, the home shard's
    # owner not yet. Its cap is not 0: the answer is UNAVAILABLE, never "cap exceeded".
    home = home_shard(SMALL, CNY)
    before = len(world.chain(home))
    behind = {pid: p for pid, p in PARTICIPANTS.items() if pid != SMALL}
    monkeypatch.setattr(world.lender.store, "_participant", behind.get)
    a = world.node("node-a")
    a.take(SHARD, 10)
    (pid,) = ids_in(SHARD, 1)

    with pytest.raises(Unavailable) as err:
        a.begin(debit(pid, 100, payer=SMALL))

    assert err.value.reason == "OWNER_REGISTRY_BEHIND"
    assert err.value.retry_after_ms == 2000
    assert len(world.chain(home)) == before
    assert [e.kind for e in world.chain()] == []
    monkeypatch.setattr(world.lender.store, "_participant", PARTICIPANTS.get)
    _, won = a.begin(debit(pid, 100, payer=SMALL))  # caught up: the retry is lent
    assert won


def test_headroom_a_shard_leaves_unused_goes_back_home_before_any_settlement(
    world: World,
) -> None:
    # SMALL's cap is 1,000: 400 approved in one shard, 400 declined in another (whose
    # loan stays there), then a shard that needs 400 more is refused at 400 exposure.
    a = world.node("node-a")
    used, idle, needy = SHARD, OTHER_SHARD, SPARE_SHARDS[0]
    for s in (used, idle, needy):
        a.take(s, 10)
    a.approve(debit(ids_in(used, 1)[0], 400, payer=SMALL))
    rec, _ = a.begin(debit(ids_in(idle, 1)[0], 400, payer=SMALL))
    a.decide(rec, S.DECLINED)
    (late,) = ids_in(needy, 1)
    with pytest.raises(InsufficientLiquidity, match="unused for 10 s comes back"):
        a.begin(debit(late, 400, payer=SMALL))

    assert a.store.give_back(idle_for_s=shards.CAP_IDLE_GIVE_BACK_S) == 0  # used just now
    world.clock.advance(shards.CAP_IDLE_GIVE_BACK_S)
    a.approve(debit(ids_in(used, 2)[1], 1, payer=SMALL))  # ``used`` is busy again
    assert a.store.give_back(idle_for_s=shards.CAP_IDLE_GIVE_BACK_S) == 1

    home = home_shard(SMALL, CNY)
    assert _amounts(world, idle, KIND_CAP_RETURN) == [400]  # the declined payment's loan
    assert _amounts(world, home, KIND_CAP_REPAID) == [400]
    assert _amounts(world, used, KIND_CAP_RETURN) == []  # in use: kept
    _, won = a.begin(debit(late, 400, payer=SMALL))
    assert won
    assert a.store.exposure()[(SMALL, CNY)] <= SMALL_CAP
