"""Reading a closed window (``ledger_view.read_window``): each shard's part between its
two recorded cuts, from the earlier cut's recorded block, and the intents of its
decisions from the windows before; the same entries as cutting the whole verified chain,
at the cost of the window rather than of the ledger before it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from clearinghouse._invariant import InvariantViolation
from clearinghouse.domain import PaymentEvent, PaymentState, postings_for
from clearinghouse.domain.chain import LedgerEntry
from clearinghouse.domain.entries import KIND_DECISION, KIND_INTENT, KIND_WINDOW_CUT
from clearinghouse.ledger_view import WindowData, read_window
from clearinghouse.storage.ledger import CUT_BLOCKS_PER_SHARD, CassandraLedger
from clearinghouse.switch.records import SHARD_COUNT, STEP_DECIDED, PaymentRecord, StepRecord
from clearinghouse.switch.shards import read_chain
from tests.fakes import FakeCqlSession, begun_record
from tests.unit.settlement_world import BANKS, INSTITUTIONS, ZONE, SettlementWorld, order

pytestmark = pytest.mark.unit

MOVED_SHARD = 5
PAYMENTS_PER_WINDOW = 40


@pytest.fixture
def world() -> Iterator[SettlementWorld]:
    w = SettlementWorld()
    yield w
    w.close()


def whole_chain_window(world: SettlementWorld, window_id: int) -> WindowData:
    """The window as cutting each shard's whole verified chain gives it (what
    ``read_window`` did before it read windows alone): the reference."""
    cuts = world.windows.cuts(window_id)
    prev = world.windows.cuts(window_id - 1) if window_id > 1 else {}
    by_shard: dict[int, list[LedgerEntry]] = {}
    intents: list[LedgerEntry] = []
    for shard in range(SHARD_COUNT):
        chain, _ = read_chain(world.ledger, shard)
        lo = prev[shard].seq if prev else 0
        part = [e for e in chain if lo < e.seq <= cuts[shard].seq]
        by_shard[shard] = part
        inside = {e.payment_key for e in part if e.kind == KIND_INTENT}
        wanted = {e.payment_key for e in part if e.kind == KIND_DECISION} - inside
        intents += [e for e in chain if e.kind == KIND_INTENT and e.payment_key in wanted]
    return WindowData(window_id, by_shard, intents)


def begin(world: SettlementWorld, payment_id: str) -> PaymentRecord:
    """A payment's intent, written; its decision comes later (in flight at a cut)."""
    rec = begun_record(
        order(payment_id, INSTITUTIONS[0], BANKS[0], 500), at_us=world.clock(), zone=ZONE
    )
    rec, won = world.owner(rec.shard).store.begin(rec)
    assert won
    return rec


def decide(world: SettlementWorld, rec: PaymentRecord) -> None:
    state = PaymentState.APPROVED
    postings = postings_for(rec.key, rec.order, state, from_state=PaymentState.ROUTED)
    step = StepRecord(STEP_DECIDED, PaymentEvent(state, world.clock(), ZONE, state.value))
    world.owner(rec.shard).store.decide(rec, step, postings)


def pay_a_window(world: SettlementWorld) -> int:
    """PAYMENTS_PER_WINDOW payments, then the window closed and cleared; its id."""
    for i in range(PAYMENTS_PER_WINDOW):
        world.pay(100 + i)
    return world.close_window()


def test_a_window_reads_as_the_whole_chain_cut_at_its_two_cuts(world: SettlementWorld) -> None:
    """Five windows with payments in flight across each cut (intent in one window,
    decision in a later one, one of them two windows later) and the moved shard taken
    over by a second node between windows 2 and 3 (a new epoch in its chain): every
    window reads the same entries and referenced intents as the whole-chain reference."""
    in_flight: list[PaymentRecord] = []
    held_longer: PaymentRecord | None = None
    for window in range(1, 6):
        for i in range(PAYMENTS_PER_WINDOW):
            world.pay(100 + i)
        for rec in in_flight:
            decide(world, rec)
        in_flight = [begin(world, f"w{window}-flight-{i}") for i in range(3)]
        if window == 1:
            held_longer = begin(world, "held-two-windows")
        if window == 3 and held_longer is not None:
            decide(world, held_longer)
        if window == 2:
            world.node_a.lose(MOVED_SHARD)
            world.node("node-b").take(MOVED_SHARD, 2)
        world.close_window()
    for window in range(1, 6):
        got, want = (
            read_window(world.ledger, world.windows, window),
            whole_chain_window(world, window),
        )
        assert got.entries_by_shard == want.entries_by_shard, window
        assert got.referenced_intents == want.referenced_intents, window
    referenced = {
        e.payment_key for e in read_window(world.ledger, world.windows, 3).referenced_intents
    }
    assert held_longer is not None and held_longer.key in referenced  # from window 1


def test_reading_a_window_costs_its_own_entries_not_the_ledger_before(
    world: SettlementWorld,
) -> None:
    for _ in range(5):
        pay_a_window(world)
    last = pay_a_window(world)
    window_entries = sum(
        len(part)
        for part in read_window(world.ledger, world.windows, last).entries_by_shard.values()
    )
    chain_entries = sum(len(read_chain(world.ledger, s)[0]) for s in range(SHARD_COUNT))
    world.ledger.calls["entries_scanned"] = 0
    read_window(world.ledger, world.windows, last)
    scanned = world.ledger.calls["entries_scanned"]
    assert window_entries <= scanned <= 2 * window_entries, (scanned, window_entries)
    assert chain_entries >= 5 * window_entries  # what reading whole chains would cost

    # Cuts recorded without their block (before migration 013, or by a recorder that did
    # not know it): the same window, read from each epoch's first entry on.
    for key in world.session.tables["window_cuts"]:
        world.session.tables["window_cuts"][key].pop("stream_block", None)
    world.ledger.calls["entries_scanned"] = 0
    without = read_window(world.ledger, world.windows, last)
    assert world.ledger.calls["entries_scanned"] >= chain_entries - SHARD_COUNT
    assert without == whole_chain_window(world, last)


def test_a_wrong_recorded_block_fails_the_read_instead_of_shortening_it(
    world: SettlementWorld,
) -> None:
    pay_a_window(world)
    pay_a_window(world)
    shard = 7
    row = world.session.tables["window_cuts"][(1, shard)]
    assert row["stream_block"] is not None  # the keeper recorded where the cut is
    row["stream_block"] += 1_000  # past where window 2's entries of this shard are
    with pytest.raises(InvariantViolation, match=f"shard {shard}"):
        read_window(world.ledger, world.windows, 2)


def test_a_node_remembers_the_newest_cut_blocks_of_every_shard_after_a_takeover() -> None:
    """A takeover replays shard after shard, each with all its cuts: the newest cuts of
    the shards replayed first must still have their blocks when the new owner records
    them (a cut recorded without one makes the next window read its epoch whole)."""
    ledger = CassandraLedger(FakeCqlSession())
    cuts_per_shard = CUT_BLOCKS_PER_SHARD + 8
    for shard in range(SHARD_COUNT):
        run = [
            LedgerEntry(shard, 3, seq, KIND_WINDOW_CUT, f"window:{seq}", b"", b"", b"")
            for seq in range(1, cuts_per_shard + 1)
        ]
        ledger._saw_cuts(100 + shard, run)
    for shard in range(SHARD_COUNT):
        assert ledger.cut_block(shard, 3, cuts_per_shard) == 100 + shard
        assert ledger.cut_block(shard, 3, cuts_per_shard - CUT_BLOCKS_PER_SHARD + 1) is not None
        assert ledger.cut_block(shard, 3, 1) is None  # the oldest of each shard went
    # The same cut seen again further on keeps its first block: a lower bound.
    again = LedgerEntry(0, 3, cuts_per_shard, KIND_WINDOW_CUT, "w", b"", b"", b"")
    ledger._saw_cuts(999, [again])
    assert ledger.cut_block(0, 3, cuts_per_shard) == 100
    assert ledger.cut_block(0, 4, cuts_per_shard) is None  # another epoch: not known
