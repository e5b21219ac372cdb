"""Settlement windows over the fakes: closing (on demand, on a schedule), cutting every
shard, recording every cut, CLOSING -> CLOSED -> CLEARED, and payments that race a cut.

The real :class:`~clearinghouse.settlement.WindowKeeper`, shard stores and
:class:`~clearinghouse.storage.windows.CassandraWindows` run over
:class:`tests.fakes.FakeLedger` and :class:`tests.fakes.FakeCqlSession`
(``tests/unit/settlement_world.py``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from itertools import count

import pytest

from clearinghouse import settlement
from clearinghouse._invariant import InvariantViolation
from clearinghouse.domain import (
    FailedPrecondition,
    InsufficientLiquidity,
    PaymentState,
    Unavailable,
)
from clearinghouse.domain.clearing import WindowClearing
from clearinghouse.domain.entries import KIND_DECISION, KIND_WINDOW_CUT, WindowCut
from clearinghouse.domain.merkle import merkle_root, window_leaves
from clearinghouse.ledger_view import read_ledger, read_window
from clearinghouse.settlement import request_close, stored_clearing
from clearinghouse.storage.windows import WindowEvent
from clearinghouse.switch.records import SHARD_COUNT, PaymentRecord, shard_of
from clearinghouse.switch.shards import read_chain
from tests.unit.settlement_world import BANKS, INSTITUTIONS, SettlementWorld

pytestmark = pytest.mark.unit

S = PaymentState
MOVED_SHARD = 5  # the shard a test gives to a second node
WAIT_S = 10.0  # for payments that should arrive at once


@pytest.fixture
def world() -> Iterator[SettlementWorld]:
    w = SettlementWorld()
    yield w
    w.close()


def ids_in(shard: int, n: int, prefix: str) -> list[str]:
    found = (
        f"{prefix}-{i}" for i in count() if shard_of(INSTITUTIONS[0], f"{prefix}-{i}") == shard
    )
    return [next(found) for _ in range(n)]


def decision_keys(world: SettlementWorld, window_id: int) -> Counter[str]:
    data = read_window(world.ledger, world.windows, window_id)
    return Counter(
        e.payment_key
        for es in data.entries_by_shard.values()
        for e in es
        if e.kind == KIND_DECISION
    )


def chain_cuts(world: SettlementWorld, shard: int) -> dict[int, tuple[int, bytes]]:
    chain, _ = read_chain(world.ledger, shard)
    return {
        WindowCut.decode(e.body).window_id: (e.seq, e.entry_hash)
        for e in chain
        if e.kind == KIND_WINDOW_CUT
    }


# -- request_close ------------------------------------------------------------------------


def test_a_close_while_a_window_is_closing_closes_no_other(world: SettlementWorld) -> None:
    windows, now = world.windows, world.clock()
    assert request_close(windows, "op", now) == (1, True)
    # A retried `clearingctl window close`: the same window, nothing new.
    assert request_close(windows, "op", now) == (1, False)
    assert request_close(windows, "op", now, window_id=1) == (1, False)
    with pytest.raises(FailedPrecondition) as still:
        request_close(windows, "op", now, window_id=2)
    assert still.value.reason == "WINDOW_STILL_CLOSING"
    assert "window 1 is still closing" in still.value.message
    with pytest.raises(FailedPrecondition) as not_open:
        request_close(windows, "op", now, window_id=3)
    assert not_open.value.reason == "WINDOW_NOT_OPEN"
    assert [(w.window_id, w.state) for w in windows.recent()] == [(1, "CLOSING")]

    world.step()  # every shard cuts window 1: it is CLOSED, and the next may close
    assert world.state(1) == "CLOSED"
    assert request_close(windows, "op", now, window_id=2) == (2, True)
    assert request_close(windows, "op", now) == (2, False)
    assert request_close(windows, "op", now, window_id=1) == (1, False)  # closed already
    assert [w.window_id for w in windows.recent()] == [2, 1]


# -- the keeper's steps -------------------------------------------------------------------


def test_the_keeper_takes_a_window_from_closing_to_cleared(world: SettlementWorld) -> None:
    states = [S.APPROVED, S.APPROVED, S.DECLINED, S.FAILED, S.APPROVED]
    paid = [world.pay(1_000 + n, st) for n, st in enumerate(states)]
    assert request_close(world.windows, "op", world.clock(), reason="end of day") == (1, True)
    assert world.state(1) == "CLOSING"
    assert world.windows.status(1).events[0].detail == "end of day"

    world.step()  # cut in every shard, every cut recorded, CLOSED
    assert world.state(1) == "CLOSED"
    cuts = world.windows.cuts(1)
    assert sorted(cuts) == list(range(SHARD_COUNT))
    for shard, cut in cuts.items():
        chain, _ = read_chain(world.ledger, shard)
        last = chain[-1]
        assert last.kind == KIND_WINDOW_CUT and WindowCut.decode(last.body).window_id == 1
        assert (cut.seq, cut.epoch, cut.entry_hash) == (last.seq, last.epoch, last.entry_hash)
    assert stored_clearing(world.windows, 1) is None

    world.step()  # cleared and stored
    assert world.state(1) == "CLEARED"
    stored = stored_clearing(world.windows, 1)
    assert stored is not None
    clearing = WindowClearing.from_json(stored.clearing_json)
    assert clearing.payments_decided == len(paid)
    approved = sum(r.order.amount.amount_minor for r in paid if r.state is S.APPROVED)
    assert {(n.participant_id, n.net_minor) for n in clearing.net_positions} == {
        (BANKS[0], approved), (INSTITUTIONS[0], -approved),
    }  # fmt: skip
    data = read_window(world.ledger, world.windows, 1)
    flat = [e for s in sorted(data.entries_by_shard) for e in data.entries_by_shard[s]]
    assert stored.merkle_root == merkle_root(window_leaves(flat))
    assert stored.clearing_digest.hex() in world.windows.status(1).events[-1].detail

    world.step()  # nothing more to do
    assert world.state(1) == "CLEARED"
    assert world.windows.current() == 2


def test_a_second_close_before_the_first_is_closed_clears_both_in_order(
    world: SettlementWorld,
) -> None:
    """The audit's wedge: one node has cut window 1, another has not yet, and the close is
    retried. The retry closes nothing new; both nodes' cuts get recorded; window 1 is
    CLOSED and CLEARED. Each payment is in the window its shard's cut says: one paid
    after the retry in the shard not cut yet is still in window 1, one paid in a shard
    cut already is in window 2."""
    node_b = world.node("node-b")
    world.node_a.lose(MOVED_SHARD)
    node_b.take(MOVED_SHARD, 2)
    first = [world.pay(100, payment_id=p) for p in ids_in(MOVED_SHARD, 2, "a")]
    first.append(world.pay(200))
    assert request_close(world.windows, "op", world.clock()) == (1, True)
    world.step([world.node_a])  # node-b has not stepped yet: window 1 lacks its cut
    assert world.state(1) == "CLOSING"
    assert request_close(world.windows, "op", world.clock()) == (1, False)  # the retry
    first.append(world.pay(250, payment_id=ids_in(MOVED_SHARD, 1, "late")[0]))
    second = [world.pay(300, payment_id=p) for p in ids_in(MOVED_SHARD + 1, 2, "b")]
    world.step([node_b, world.node_a])
    assert world.state(1) == "CLOSED"
    world.step()
    assert world.state(1) == "CLEARED"
    assert world.close_window() == 2
    assert decision_keys(world, 1) == Counter(r.key for r in first)
    assert decision_keys(world, 2) == Counter(r.key for r in second)


def test_a_window_whose_clearing_kept_failing_is_cleared_after_later_windows_closed(
    world: SettlementWorld, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Clearing window 1 fails while windows 2..5 close: window 1 is no longer among the
    newest four the keeper reads. It was never cleared, and nothing said so; now it is
    tried again at every step and cleared as soon as clearing works again, and the later
    windows are cleared meanwhile (each reads its own entries)."""
    real = settlement.compute_clearing
    failing = {1}

    def compute(ledger: object, windows: object, window_id: int, kinds: object) -> object:
        if window_id in failing:
            raise FailedPrecondition("replicas unreadable", reason="TEST_OUTAGE")
        return real(ledger, windows, window_id, kinds)  # type: ignore[arg-type]

    monkeypatch.setattr(settlement, "compute_clearing", compute)
    paid = {}
    for window_id in range(1, 6):
        paid[window_id] = world.pay(100 * window_id)
        assert request_close(world.windows, "op", world.clock()) == (window_id, True)
        world.step()  # cut everywhere: CLOSED
        world.step()  # window 1's clearing fails (logged); a later window is cleared
    assert [w.window_id for w in world.windows.recent(4)] == [5, 4, 3, 2]
    assert [world.state(w) for w in range(1, 6)] == ["CLOSED"] + ["CLEARED"] * 4
    caplog.clear()
    world.step()  # one ERROR a step for the window left behind, saying how long it waited
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    assert "window 1 not cleared (4 later windows closed since)" in errors[0]
    assert "replicas unreadable" in errors[0]

    failing.clear()
    world.step()

    assert [world.state(w) for w in range(1, 6)] == ["CLEARED"] * 5
    for window_id, rec in paid.items():
        assert decision_keys(world, window_id) == Counter([rec.key])


def test_every_cut_of_a_shard_is_recorded_not_only_its_latest(world: SettlementWorld) -> None:
    """Two windows closing at once (a close retried before closes were serialised left
    such windows behind): a shard cuts both in one step, and both cuts are recorded, so
    both windows close and clear, each with its own payments."""
    in_1 = [world.pay(100), world.pay(150)]
    world.windows.record(1, WindowEvent.CLOSING, world.clock(), "older-node")
    world.node_a.store.cut_window(1)  # every shard cuts window 1, nothing recorded
    in_2 = [world.pay(200)]
    world.windows.record(2, WindowEvent.CLOSING, world.clock(), "older-node")
    world.step()
    assert sorted(world.windows.cuts(1)) == list(range(SHARD_COUNT))
    assert sorted(world.windows.cuts(2)) == list(range(SHARD_COUNT))
    assert (world.state(1), world.state(2)) == ("CLOSED", "CLOSED")
    world.step()
    assert (world.state(1), world.state(2)) == ("CLEARED", "CLEARED")
    assert decision_keys(world, 1) == Counter(r.key for r in in_1)
    assert decision_keys(world, 2) == Counter(r.key for r in in_2)


def test_a_new_owner_records_every_cut_it_finds_in_the_chain(world: SettlementWorld) -> None:
    """The owner of a shard cut windows 1 and 2 and lost the shard before recording
    either: the new owner rebuilds the chain and records both cuts."""
    paid = world.pay(100, payment_id=ids_in(MOVED_SHARD, 1, "c")[0])
    world.windows.record(1, WindowEvent.CLOSING, world.clock(), "older-node")
    world.windows.record(2, WindowEvent.CLOSING, world.clock(), "older-node")
    world.node_a.store.cut_window(1)
    world.node_a.store.cut_window(2)
    world.node_a.lose(MOVED_SHARD)
    node_b = world.node("node-b")
    node_b.take(MOVED_SHARD, 2)
    node_b.keeper.step()
    in_chain = chain_cuts(world, MOVED_SHARD)
    for window_id in (1, 2):
        cut = world.windows.cuts(window_id)[MOVED_SHARD]
        assert (cut.seq, cut.entry_hash) == in_chain[window_id]
        assert cut.epoch == 1  # written by the owner before; recorded by the new one
    world.step()
    world.step()
    assert (world.state(1), world.state(2)) == ("CLEARED", "CLEARED")
    assert decision_keys(world, 1) == Counter([paid.key])
    assert decision_keys(world, 2) == Counter()


def test_a_window_whose_start_is_not_recorded_is_not_read_from_the_chains_start(
    world: SettlementWorld,
) -> None:
    world.pay(100)
    world.close_window()
    world.pay(200)
    world.close_window()
    del world.session.tables["window_cuts"][(1, 7)]  # window 1's cut row of shard 7 lost
    with pytest.raises(InvariantViolation, match=r"window 1's cut is not recorded in shards \[7\]"):
        read_window(world.ledger, world.windows, 2)


def test_a_window_that_does_not_verify_stops_its_reads_at_once(world: SettlementWorld) -> None:
    world.pay(100)
    world.close_window()
    world.session.tables["window_cuts"][(1, 3)]["entry_hash"] = bytes(32)  # a forged cut
    with pytest.raises(InvariantViolation, match="shard 3: the chain does not hold") as raised:
        read_window(world.ledger, world.windows, 1)
    # The error is still held (by `raised`, as a handler up the stack would hold it), and
    # yet the reads of the shards after shard 3 are over, their threads gone.
    held = raised.value.__traceback__
    assert not [t for t in threading.enumerate() if t.name.startswith("shard-read")]
    del held


# -- the schedule -------------------------------------------------------------------------


def test_the_schedule_closes_the_open_window_on_the_fake_clock() -> None:
    world = SettlementWorld(interval_s=60)
    try:
        world.step()
        world.clock.advance(59)
        world.step()
        assert world.windows.recent() == []
        world.clock.advance(2)
        world.step()
        assert world.state(1) == "CLOSING"
        assert world.windows.status(1).events[0].detail == "schedule"
        world.step()
        assert world.state(1) == "CLOSED"
        world.step()
        assert world.state(1) == "CLEARED"
        world.clock.advance(30)  # 30 s after window 1 was asked to close, plus 2 steps
        world.step()
        assert world.windows.current() == 2
        world.clock.advance(31)
        world.step()
        assert world.state(2) == "CLOSING"
        assert world.windows.status(2).at(WindowEvent.CLOSING) == world.clock()
    finally:
        world.close()


def test_the_schedule_never_closes_a_window_while_one_is_closing() -> None:
    world = SettlementWorld(interval_s=10)
    try:
        node_b = world.node("node-b")  # owns a shard and never steps: window 1 stays CLOSING
        world.node_a.lose(MOVED_SHARD)
        node_b.take(MOVED_SHARD, 2)
        world.clock.advance(11)
        world.step([world.node_a])
        world.step([world.node_a])
        assert world.state(1) == "CLOSING"
        world.clock.advance(100)
        world.step([world.node_a])
        assert [w.window_id for w in world.windows.recent()] == [1]
        node_b.keeper.step()
        world.step([world.node_a])
        assert world.state(1) == "CLOSED"
    finally:
        world.close()


# -- payments racing a cut ------------------------------------------------------------------


def test_payments_racing_a_cut_end_up_in_exactly_one_window(world: SettlementWorld) -> None:
    stop = threading.Event()
    paid: list[PaymentRecord] = []
    errors: list[BaseException] = []

    def payer(n: int) -> None:
        try:
            for i in count():
                if stop.is_set():
                    return
                inst, bank = INSTITUTIONS[n % 2], BANKS[i % 2]
                state = (S.APPROVED, S.DECLINED, S.APPROVED, S.FAILED)[i % 4]
                paid.append(world.pay(100 + i, state, inst=inst, bank=bank,
                                      payment_id=f"race-{n}-{i}"))  # fmt: skip
        except BaseException as e:
            errors.append(e)

    def wait_for(n: int) -> None:
        deadline = time.monotonic() + WAIT_S
        while len(paid) < n and time.monotonic() < deadline and not errors:
            time.sleep(0.01)
        assert len(paid) >= n and not errors, (len(paid), errors)

    threads = [threading.Thread(target=payer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    try:
        wait_for(20)
        assert world.close_window() == 1
        wait_for(len(paid) + 20)
        assert world.close_window() == 2
        wait_for(len(paid) + 10)
    finally:
        stop.set()
        for t in threads:
            t.join(WAIT_S)
    assert not errors, errors

    in_1, in_2 = decision_keys(world, 1), decision_keys(world, 2)
    assert max((in_1 + in_2).values()) == 1, "a payment in both windows"
    cuts = {w: world.windows.cuts(w) for w in (1, 2)}
    tail = Counter()
    for rec in paid:
        d = world.decision(rec)
        assert d.seq == rec.ledger_seq  # the decision the payer was told about
        c1, c2 = cuts[1][d.shard].seq, cuts[2][d.shard].seq
        if d.seq > c2:
            tail[rec.key] += 1
        places = [rec.key in in_1, rec.key in in_2, d.seq > c2]
        assert places.count(True) == 1, (rec.key, places)
        assert (rec.key in in_1) == (d.seq < c1)
    assert sum(in_1.values()) + sum(in_2.values()) + sum(tail.values()) == len(paid)
    assert sum(in_1.values()) >= 20 and sum(in_2.values()) >= 1
    for window_id, keys in ((1, in_1), (2, in_2)):
        stored = stored_clearing(world.windows, window_id)
        assert stored is not None
        assert WindowClearing.from_json(stored.clearing_json).payments_decided == len(keys)


# -- net debit caps and settlement ----------------------------------------------------------


def test_a_settled_window_frees_its_payments_share_of_the_cap(world: SettlementWorld) -> None:
    bank, cap = BANKS[1], 1_000
    world.participants[bank] = replace(world.participants[bank], net_debit_caps={"CNY": cap})
    world.pay(cap, bank=bank)  # the bank pays an institution: its whole cap
    with pytest.raises(InsufficientLiquidity):
        world.pay(1, bank=bank)
    window = world.close_window()
    world.step()
    with pytest.raises(InsufficientLiquidity):  # cleared, not settled: still owed
        world.pay(1, bank=bank)

    assert world.windows.record(window, WindowEvent.SETTLED, world.clock(), "op", "RTGS-1")
    world.step()

    assert world.pay(cap, bank=bank).state is S.APPROVED  # window 2's
    with pytest.raises(InsufficientLiquidity):
        world.pay(1, bank=bank)
    assert world.node_a.store.unsettled_windows() == []


def test_a_window_settled_long_after_it_closed_is_found_by_the_scan(
    world: SettlementWorld, caplog: pytest.LogCaptureFixture
) -> None:
    bank, cap = BANKS[1], 1_000
    world.participants[bank] = replace(world.participants[bank], net_debit_caps={"CNY": cap})
    world.pay(cap, bank=bank)
    first = world.close_window()
    later = [world.close_window() for _ in range(settlement.WINDOWS_WATCHED)]
    assert first not in {w.window_id for w in world.windows.recent(settlement.WINDOWS_WATCHED)}
    assert world.node_a.store.unsettled_windows() == [first]
    world.step()  # scans now, and not again for SETTLED_SCAN_S
    assert world.windows.record(first, WindowEvent.SETTLED, world.clock(), "op", "RTGS-1")

    world.step()
    with pytest.raises(InsufficientLiquidity):
        world.pay(1, bank=bank)  # not asked yet
    world.clock.advance(settlement.SETTLED_SCAN_S)
    with caplog.at_level(logging.INFO, logger="clearinghouse.settlement"):
        world.step()

    assert world.pay(cap, bank=bank).state is S.APPROVED
    assert f"settlement windows {first} are settled" in caplog.text
    assert later == list(range(first + 1, first + 1 + settlement.WINDOWS_WATCHED))


def test_the_ledger_summary_keeps_each_windows_totals(world: SettlementWorld) -> None:
    world.pay(100)
    world.pay(40, S.DECLINED)
    world.close_window()
    world.pay(70)

    summary = read_ledger(world.ledger)

    inst, bank = INSTITUTIONS[0], BANKS[0]
    assert {w: dict(t) for w, t in summary.window_totals.items()} == {
        1: {(bank, "CNY"): [100, 0], (inst, "CNY"): [0, 100]},
        2: {(bank, "CNY"): [70, 0], (inst, "CNY"): [0, 70]},
    }
    assert summary.totals[(bank, "CNY")] == [170, 0]


def test_old_windows_never_settled_do_not_hide_a_later_settled_one(
    world: SettlementWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(settlement, "SETTLED_SCAN_WINDOWS_MAX", 2)
    bank, cap = BANKS[1], 1_000
    world.participants[bank] = replace(world.participants[bank], net_debit_caps={"CNY": cap})
    for _ in range(4):  # windows 1-4 each hold a payment of the bank's; none is settled
        world.pay(10, bank=bank)
        world.close_window()
    world.pay(cap - 40, bank=bank)
    last = world.close_window()
    for _ in range(settlement.WINDOWS_WATCHED):
        world.close_window()
    assert world.node_a.store.unsettled_windows() == [1, 2, 3, 4, last]
    assert world.windows.record(last, WindowEvent.SETTLED, world.clock(), "op", "RTGS-5")

    for _ in range(3):  # three scans of two windows: 1-2, 3-4, then 5 (and 1)
        world.clock.advance(settlement.SETTLED_SCAN_S)
        world.step()

    assert world.node_a.store.unsettled_windows() == [1, 2, 3, 4]
    assert world.pay(cap - 40, bank=bank).state is S.APPROVED


def test_a_node_that_starts_learns_every_settled_window_at_its_first_step(
    world: SettlementWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(settlement, "SETTLED_SCAN_WINDOWS_MAX", 0)  # one read, not a scan
    (pid,) = ids_in(MOVED_SHARD, 1, "m")
    world.pay(100, payment_id=pid)
    first = world.close_window()
    assert world.windows.record(first, WindowEvent.SETTLED, world.clock(), "op", "RTGS-1")
    for _ in range(settlement.WINDOWS_WATCHED + 1):  # window 1 is no longer among the newest
        world.close_window()
    b = world.node("node-b")
    world.node_a.lose(MOVED_SHARD)
    b.take(MOVED_SHARD, 2)
    assert b.store.unsettled_windows() == [first]  # replayed: not known settled yet

    b.keeper.step()

    assert b.store.unsettled_windows() == []


def test_a_first_step_that_cannot_read_the_settled_windows_still_cuts(
    world: SettlementWorld, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def down() -> frozenset[int]:
        raise Unavailable("storage down", retry_after_ms=1000)

    monkeypatch.setattr(world.windows, "settled_ids", down)
    world.pay(100)
    request_close(world.windows, "op", world.clock())

    world.step()  # the settled windows are not read; the window is cut all the same

    assert world.state(1) == "CLOSED"
    assert "the settled windows could not be read" in caplog.text
    monkeypatch.undo()
    world.close_window()  # read at the next step
