"""A switch node's settlement over the fakes, for the unit tests of windows and audit.

:class:`SettlementWorld` is one ledger (:class:`tests.fakes.FakeLedger`), the real
:class:`~clearinghouse.storage.windows.CassandraWindows` over a
:class:`tests.fakes.FakeCqlSession`, a fake clock, and nodes: each a real
:class:`~clearinghouse.switch.shards.ShardedStore` (its group-commit thread running)
with its :class:`~clearinghouse.settlement.WindowKeeper`. The first node owns every
shard; a test moves shards to other nodes itself. Payments are begun and decided
through a store as the processor would.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import count

from clearinghouse.domain import (
    Money,
    Participant,
    ParticipantKind,
    ParticipantStatus,
    PaymentEvent,
    PaymentOrder,
    PaymentState,
    PaymentType,
    postings_for,
)
from clearinghouse.domain.chain import LedgerEntry
from clearinghouse.domain.entries import KIND_DECISION
from clearinghouse.settlement import WindowKeeper, request_close
from clearinghouse.storage.windows import CassandraWindows
from clearinghouse.switch.records import SHARD_COUNT, STEP_DECIDED, PaymentRecord, StepRecord
from clearinghouse.switch.shards import ShardedStore, home_shard, read_chain
from tests.fakes import FakeClock, FakeCqlSession, FakeLedger, begun_record, fake_windows

ZONE = "shanghai-a"
CNY = "CNY"
CAP_MINOR = 10**15
INSTITUTIONS = ("INST_ALIPAY", "INST_WECHAT")
BANKS = ("BANK_ICBC", "BANK_CCB")
# Steps a keeper takes at most to bring a window from CLOSING to CLEARED.
STEPS_TO_CLEAR_MAX = 4


def participant(pid: str, kind: ParticipantKind) -> Participant:
    is_bank = kind is ParticipantKind.BANK
    return Participant(
        participant_id=pid,
        kind=kind,
        name=pid,
        status=ParticipantStatus.ACTIVE,
        bank_code=pid if is_bank else None,
        endpoint=f"{pid.lower()}.bank.test:7000" if is_bank else None,
        currencies=frozenset({CNY}),
        net_debit_caps={CNY: CAP_MINOR},
        version=1,
    )


def order(
    payment_id: str, inst: str, bank: str, amount: int, kind: PaymentType = PaymentType.DEBIT
) -> PaymentOrder:
    payer, payee = (bank, inst) if kind is PaymentType.DEBIT else (inst, bank)
    return PaymentOrder(
        payment_id=payment_id, institution_id=inst, type=kind, payer_id=payer, payee_id=payee,
        bank_account="6222020000000001", amount=Money(amount, CNY), memo="",
        requested_at_us=0,
    )  # fmt: skip


@dataclass
class Node:
    node_id: str
    store: ShardedStore
    keeper: WindowKeeper
    epochs: dict[int, int] = field(default_factory=dict)

    def take(self, shard: int, epoch: int) -> None:
        self.epochs[shard] = epoch
        assert self.store.take(shard, epoch, threading.Event())

    def lose(self, shard: int) -> None:
        self.epochs.pop(shard, None)
        self.store.lose(shard)


class SettlementWorld:
    def __init__(self, *, interval_s: float = 0.0) -> None:
        self.ledger = FakeLedger()
        self.clock = FakeClock()
        self.session = FakeCqlSession()
        self.windows: CassandraWindows = fake_windows(self.session)
        self.participants = {
            **{p: participant(p, ParticipantKind.INSTITUTION) for p in INSTITUTIONS},
            **{p: participant(p, ParticipantKind.BANK) for p in BANKS},
        }
        self.nodes: list[Node] = []
        self._ids = count()
        self.node_a = self.node("node-a", interval_s=interval_s)
        for shard in range(SHARD_COUNT):
            self.node_a.take(shard, 1)

    def kinds(self) -> dict[str, ParticipantKind]:
        return {pid: p.kind for pid, p in self.participants.items()}

    def node(self, node_id: str, *, interval_s: float = 0.0) -> Node:
        epochs: dict[int, int] = {}
        store = ShardedStore(
            node_id=node_id, zone=ZONE, ledger=self.ledger, participant=self.participants.get,
            still_owner=lambda shard, epoch: epochs.get(shard) == epoch,
            relinquish=lambda shard: None, clock=self.clock, borrow=self._borrow,
        )  # fmt: skip
        store.committer.start()
        keeper = WindowKeeper(
            node_id=node_id, store=store, ledger=self.ledger, windows=self.windows,
            kinds=self.kinds, clock=self.clock, interval_s=interval_s,
        )  # fmt: skip
        n = Node(node_id, store, keeper, epochs)
        self.nodes.append(n)
        return n

    def owner(self, shard: int) -> Node:
        return next(n for n in reversed(self.nodes) if shard in n.store.owned())

    def _borrow(
        self, participant_id: str, currency: str, for_shard: int, need: int, epoch: int = 0, /
    ) -> int:
        return self.owner(home_shard(participant_id, currency)).store.lend(
            participant_id, currency, for_shard, need, epoch
        )

    def close(self) -> None:
        for n in self.nodes:
            n.store.committer.stop()

    # -- payments ---------------------------------------------------------------------

    def pay(
        self,
        amount: int = 100,
        state: PaymentState = PaymentState.APPROVED,
        *,
        inst: str = INSTITUTIONS[0],
        bank: str = BANKS[0],
        kind: PaymentType = PaymentType.DEBIT,
        payment_id: str | None = None,
    ) -> PaymentRecord:
        """Begin and decide one payment through the owner of its shard."""
        pid = payment_id or f"p-{next(self._ids):05d}"
        rec = begun_record(order(pid, inst, bank, amount, kind), at_us=self.clock(), zone=ZONE)
        store = self.owner(rec.shard).store
        rec, won = store.begin(rec)
        assert won, pid
        postings = postings_for(rec.key, rec.order, state, from_state=PaymentState.ROUTED)
        step = StepRecord(STEP_DECIDED, PaymentEvent(state, self.clock(), ZONE, state.value))
        return store.decide(rec, step, postings)

    def decision(self, rec: PaymentRecord) -> LedgerEntry:
        chain, _ = read_chain(self.ledger, rec.shard)
        return next(e for e in chain if e.kind == KIND_DECISION and e.payment_key == rec.key)

    # -- windows ----------------------------------------------------------------------

    def step(self, nodes: Iterable[Node] | None = None) -> None:
        for n in nodes if nodes is not None else self.nodes:
            n.keeper.step()

    def state(self, window_id: int) -> str:
        return self.windows.status(window_id).state

    def close_window(self) -> int:
        """Ask for a close and step every keeper until the window is CLEARED."""
        window_id, _ = request_close(self.windows, "operator", self.clock())
        for _ in range(STEPS_TO_CLEAR_MAX):
            self.step()
            if self.state(window_id) == "CLEARED":
                return window_id
        raise AssertionError(f"window {window_id} is {self.state(window_id)}, not CLEARED")
