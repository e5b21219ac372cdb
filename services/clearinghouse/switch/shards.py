"""The shards this node owns: their state in memory, their chains, their group commit.

:class:`ShardedStore` is the :class:`~.ports.PaymentStore` of a shard owner. For each
shard it owns it keeps, in memory, every payment of the shard (the idempotency index:
payments in flight or owing a reversal as objects, decided ones in their settled form, the
bytes of their two entries, read back into a record when asked for), the participants'
exposure within the shard (for their net debit caps), the payments
that still owe a bank a reversal, and the head of the shard's hash chain. It is the only
writer of its shards: every change is a ledger entry appended to the shard's chain and
acknowledged by :class:`Committer` only after Cassandra holds it in two cities and the
shard's fence still names this owner's epoch.

**Takeover** (:meth:`ShardedStore.take`): raise the fence to the new epoch, follow the
seals back from the newest to find the chain's segments, read them at QUORUM, verify
the chain, rebuild the state, write this epoch's seal, then serve. Payments found
received but undecided are handed to the resolver (status inquiry, then reversal).

**Caps.** A participant's net debit cap in a currency is lent out by its *home shard*
(:func:`home_shard`) to the shards that need it. A shard's owner keeps the payer's
exposure in the shard (approved net debit plus amounts in flight) within the shard's
allowance; short of it, it borrows the shortfall (and, while there is plenty left, a
share of what is left, so that later payments need not borrow) from the home shard's
owner, which lends only while the loans stay within the cap. Both sides record the loan
in their chains (``CAP_GRANT``, ``CAP_RECEIVE``) before the payment's intent, so a new
owner rebuilds allowances and loans with everything else. Allowances sum to at most the
loans, and the loans to at most the cap: the participant's position never exceeds it,
whatever the concurrency and whichever nodes own the shards. A loan whose receipt was
never recorded (the borrower lost the shard, or the lender's answer, in between) is
headroom lost, never headroom gained, until it is *reclaimed*: a loan records the
borrower's epoch, and once the shard has a later owner no receipt of it can be written
any more (the fence is above that epoch). That owner tells the home shard what its
chain received at earlier epochs (``Repay`` with ``borrower_epoch``, after its takeover
and with every repayment), and the home shard takes back, as ``CAP_RECLAIMED``, what it
lent at those epochs beyond that.

**Settlement.** The position a cap bounds is what is not settled yet: amounts in flight
and the approved payments of every window not SETTLED (the open one included), where a
participant's credits offset its debits of the same window only (windows settle one
by one: a credit settled away must not leave a later debit without headroom). When a
window is settled (:meth:`ShardedStore.release_settled`, told by the window keeper), its
approved payments leave the exposure of the shards that decided them, and each shard
gives the headroom it no longer needs back (:meth:`ShardedStore.give_back`): a
``CAP_RETURN`` in its chain first (the allowance is smaller from then on), then
``ShardService.Repay`` to the home shard's owner, which records ``CAP_REPAID`` and lends
it again. A repayment names everything the shard ever returned of that cap, so one sent
twice (a retry, a new owner that cannot know it arrived) is taken once. A return the
home shard did not take (it is away) is sent again :data:`REPAY_HOME_RETRY_S` later;
until then it is headroom lost, never gained.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from itertools import islice
from typing import Protocol, TypeVar

from clearinghouse import telemetry
from clearinghouse._invariant import InvariantViolation, invariant
from clearinghouse.domain import (
    ClearingError,
    FailedPrecondition,
    InsufficientLiquidity,
    Participant,
    PaymentEvent,
    PaymentOrder,
    PaymentState,
    Posting,
    ResourceExhausted,
    Unavailable,
    canonical_bytes,
    order_from_canonical_bytes,
    order_money,
)
from clearinghouse.domain.chain import (
    FIRST_SEQ,
    GENESIS_HASH,
    ChainBuilder,
    LedgerEntry,
    verify_chain,
)
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
    window_key,
)
from clearinghouse.ownership.node import LEASE_TTL_S, RPC_TIMEOUT_S, Timing
from clearinghouse.switch.config import REGISTRY_REFRESH_S
from clearinghouse.switch.indexer import (
    REINDEX_CHUNK_ROWS,
    Indexer,
    index_rows_of,
    rows_of_intent,
    unindexed,
)
from clearinghouse.switch.ports import (
    ChainReader,
    IndexRow,
    LedgerStore,
    OwedReversal,
    Seal,
    ShardWrite,
)
from clearinghouse.switch.records import (
    SHARD_COUNT,
    STEP_DECIDED,
    STEP_RECEIVED,
    STEP_ROUTED,
    PaymentRecord,
    StepRecord,
    payment_key,
    shard_of,
)

log = logging.getLogger(__name__)

# A request for a shard that is being taken over waits this long for it to serve.
TAKEOVER_WAIT_S = 8.0
# A writer waits this long for its group commit (a commit retries within it).
COMMIT_WAIT_S = 15.0
COMMIT_ENTRIES_MAX = 2000
COMMIT_QUEUE_ENTRIES_MAX = 20_000
# After the first entry arrives, the committer waits this long for more to join it.
COMMIT_LINGER_S = 0.002
TAKEOVER_RETRY_S = 1.0
# A takeover whose lease is suspended looks again this often.
UNCONFIRMED_POLL_S = 0.2
# A group commit holding entries of a shard whose lease is suspended waits this long at
# most for it to be confirmed or lost, instead of failing entries never written: the
# whole suspension, plus the ownership loop's step and its requests' budget.
UNCONFIRMED_COMMIT_WAIT_S = Timing.for_ttl(LEASE_TTL_S).suspend_s + 1.0 + 2 * RPC_TIMEOUT_S
UNCONFIRMED_COMMIT_POLL_S = 0.05
invariant(
    UNCONFIRMED_COMMIT_WAIT_S < COMMIT_WAIT_S,
    "a writer must outwait a group commit held for a suspended lease",
)
# A shard whose chain does not verify is read again this often, for this long, before
# it is left broken for an operator: replicas that lag (a write that reached one city
# before its writer died, hints not yet replayed) catch up, and the full read repairs.
BROKEN_RETRY_S = 5.0
BROKEN_RETRY_WINDOW_S = 300.0
# A takeover that failed for any other reason gives its shard back after this pause.
TAKEOVER_FAULT_PAUSE_S = 5.0
# A duplicate of an in-flight payment waits this long for its first attempt to decide.
IN_FLIGHT_WAIT_S = 25.0
# Each shard keeps the entries of its newest window cuts, so that the cuts of every
# window still CLOSING can be recorded (one window closes at a time, so a few suffice).
CUTS_KEPT_PER_SHARD = 16
# Shards read at once when a reader needs many chains (a window, the whole ledger).
SHARD_READS_IN_FLIGHT = 8

Clock = Callable[[], int]


# A batch's begins borrow cap headroom for this long at most. The orders of a batch are
# begun one after another and its bank calls start only when all are, while each
# payment's time to a decision runs from its receipt: a lender that does not answer
# (a loan waits up to the router's 5 s Lend deadline) must not use up the time of the
# orders already begun. Past it, an order that would have to borrow is refused with
# UNAVAILABLE (nothing written; retry with the same id).
BATCH_BORROW_S = 4.0
BATCH_BORROW_RETRY_AFTER_MS = 1_000


@dataclass
class _BatchBorrows:
    """What one batch's begins learned about borrowing: a payer whose lender did not
    answer is not asked again within the batch, and borrowing stops at ``until_us``."""

    until_us: int
    failed: dict[tuple[str, str], Unavailable] = field(default_factory=dict)

    def check(self, payer: tuple[str, str], now_us: int) -> None:
        known = self.failed.get(payer)
        if known is not None:
            raise Unavailable(str(known), retry_after_ms=known.retry_after_ms, reason=known.reason)
        if now_us >= self.until_us:
            raise Unavailable(
                f"{payer[0]}: this batch's {BATCH_BORROW_S:.0f} s for borrowing cap headroom "
                "in " + payer[1] + " is spent; nothing was recorded: retry with the same id",
                retry_after_ms=BATCH_BORROW_RETRY_AFTER_MS,
                reason="CAP_LENDER_UNAVAILABLE",
            )


# While plenty of the cap is left, a loan adds this fraction of what remains after it, so
# a busy shard borrows once for many payments; as the cap runs out, loans shrink to need.
LEND_SPARE_DIVISOR = 8 * SHARD_COUNT
BORROW_ROUNDS_MAX = 3


class Borrow(Protocol):
    """(participant_id, currency, for_shard, need_minor, for_epoch) -> granted_minor;
    raises InsufficientLiquidity when the cap cannot cover it, Unavailable when the
    lender is away. ``for_epoch``: the epoch of ``for_shard``'s owner that asks."""

    def __call__(
        self, participant_id: str, currency: str, for_shard: int, need_minor: int,
        for_epoch: int = 0, /,
    ) -> int: ...  # fmt: skip


@dataclass(frozen=True, slots=True)
class ReceivedBefore:
    """What a shard's chain received of a cap (its CAP_RECEIVE entries) at epochs below
    ``epoch``, the epoch of the owner that tells: every loan to those epochs is final."""

    epoch: int
    amount_minor: int


class Repay(Protocol):
    """(participant_id, currency, from_shard, returned_total_minor, received) ->
    repaid_total_minor: headroom a shard gives back to the home shard's owner
    (idempotent on the total), and what it received at earlier epochs (None: not told),
    so that loans it never received are reclaimed (idempotent too)."""

    def __call__(
        self, participant_id: str, currency: str, from_shard: int, returned_total_minor: int,
        received: ReceivedBefore | None = None, /,
    ) -> int: ...  # fmt: skip


# Repayments one call of resend_returns sends at most (a new owner sends each of its
# shards' returns once: it cannot know which reached the home shard).
REPAY_RESENDS_PER_STEP_MAX = 64
# Returns one call of give_back records at most (the rest at the next), and how full the
# commit queue may be for it to record any: payments come first.
GIVE_BACK_RETURNS_PER_STEP_MAX = 256
GIVE_BACK_QUEUE_ENTRIES_MAX = 1_000
# How long one call of resend_returns may spend on home shards that do not answer.
RESEND_BUDGET_S = 6.0
# Home shards that do not take headroom back are logged at INFO (they are being taken
# over after a start or a failover), at WARNING once they have refused for this long.
REPAY_WARN_AFTER_S = 60.0
# ... in one line at most this often.
REPAY_LOG_EVERY_S = 10.0
# A home shard that did not take headroom back is asked again after this long.
REPAY_HOME_RETRY_S = 5.0
# A home shard being taken over is not waited for when headroom comes back: the shard
# that gives it sends it again later.
REPAY_SERVING_WAIT_S = 0.5
# Headroom a shard has not used for a payer for this long is given back to the home
# shard between settlements too (looked for every CAP_IDLE_CHECK_S), so that a loan a
# declined payment left, or one a payer no longer uses here, can be lent elsewhere.
CAP_IDLE_GIVE_BACK_S = 10.0
CAP_IDLE_CHECK_S = 5.0


def home_shard(participant_id: str, currency: str) -> int:
    """The shard whose owner lends out the participant's cap in ``currency``."""
    return shard_of(f"cap:{participant_id}", currency)


def loan_minor(available_minor: int, need_minor: int) -> int:
    """How much to lend for ``need_minor`` when ``available_minor`` of the cap is left."""
    invariant(0 < need_minor <= available_minor, "a loan is made only when the cap covers it")
    return need_minor + (available_minor - need_minor) // LEND_SPARE_DIVISOR


@dataclass
class _Payment:
    record: PaymentRecord
    done: threading.Event = field(default_factory=threading.Event)
    busy: bool = False  # an attempt (first or resolver) is working on it
    deciding: bool = False  # a decision entry is being committed
    # The bodies of its INTENT and DECISION entries once written: its settled form.
    intent_body: bytes = b""
    decision_body: bytes = b""


# A settled payment's form in memory: the decision's seq and the intent body's length,
# then the intent's body as the chain holds it and the decision's without its postings
# (a payment's record does not show them; the ledger has them).
_SETTLED_HEAD = struct.Struct("<QI")


def _settled_form(p: _Payment) -> bytes:
    invariant(
        p.record.is_final and bool(p.intent_body) and bool(p.decision_body),
        f"{p.record.key}: only a decided payment with both entries written is settled",
    )
    return _settled_form_of(p.record.ledger_seq, p.intent_body, p.decision_body)


def _settled_form_of(decided_seq: int, intent_body: bytes, decision_body: bytes) -> bytes:
    head = _SETTLED_HEAD.pack(decided_seq, len(intent_body))
    return b"".join((head, intent_body, Decision.without_postings(decision_body)))


@dataclass(frozen=True, slots=True)
class _Replayed:
    """An intent a takeover's replay has read and no decision yet: its entry and the
    little the exposure needs. Its record is decoded only if the chain leaves it in
    flight or owing a reversal (most payments are settled forms at once)."""

    seq: int
    body: bytes
    payer_id: str
    payee_id: str
    currency: str
    amount_minor: int


def _record_of_settled(shard: int, epoch: int, key: str, form: bytes) -> PaymentRecord:
    """The record a settled form was made of, as a takeover would rebuild it."""
    decided_seq, intent_len = _SETTLED_HEAD.unpack_from(form)
    start = _SETTLED_HEAD.size
    rec = _record_of_intent(form[start : start + intent_len], shard, 0, epoch)
    decision = Decision.decode(form[start + intent_len :], key)
    return rec.with_step(_decided_step(decision), ledger_seq=decided_seq)


class _Shard:
    """One owned shard. ``lock`` guards payments and exposure; the chain is the
    committer's alone once the shard serves."""

    def __init__(self, shard: int, epoch: int) -> None:
        self.shard = shard
        self.epoch = epoch
        self.lock = threading.Lock()
        # Payments in flight, and decided ones that still owe a bank a reversal.
        self.payments: dict[str, _Payment] = {}
        # Payments decided with nothing owed, each as one bytes object (its settled form:
        # the bodies of its two entries) instead of some forty objects; read back into a
        # record when asked for (:meth:`read`). About a fifth of the memory.
        self.settled: dict[str, bytes] = {}
        self.exposure: defaultdict[tuple[str, str], int] = defaultdict(int)
        # Of ``exposure``: the net debit of the approved payments decided in each window
        # not known to be SETTLED (the open one included), by window. A window's share
        # leaves the exposure once it is settled (:meth:`release`).
        self.window_nets: dict[int, defaultdict[tuple[str, str], int]] = {}
        # Cap headroom this shard may use, and (in a home shard) what it has lent out.
        self.allowance: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.lent: defaultdict[tuple[str, str], int] = defaultdict(int)
        # Headroom given back after settlements: in any shard, the total it returned
        # (CAP_RETURN), and how much of that the home shard confirmed (memory only: a new
        # owner sends every total again); in a home shard, per (participant, currency,
        # shard), the total it took back (CAP_REPAID).
        self.returned: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.return_acked: dict[tuple[str, str], int] = {}
        self.repaid: defaultdict[tuple[str, str, int], int] = defaultdict(int)
        # In a home shard: per (participant, currency, shard), what it lent that shard by
        # the borrower's epoch (0: loans recorded before epochs were; a shard can give
        # back no more than all of it: :meth:`lent_to`), and the total taken back of
        # loans whose receipts were never written.
        self.granted_by_epoch: defaultdict[tuple[str, str, int], defaultdict[int, int]] = (
            defaultdict(lambda: defaultdict(int))
        )
        self.reclaimed: defaultdict[tuple[str, str, int], int] = defaultdict(int)
        # In any shard: the loans its chain received at epochs below its owner's, and the
        # caps whose home shard has not been told them since this owner took it over.
        self.received_before: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.reconcile_due: set[tuple[str, str]] = set()
        # When each payer's headroom was last used here (memory only; a new owner counts
        # from its takeover): unused for CAP_IDLE_GIVE_BACK_S, it is given back.
        self.taken_at_us = 0
        self.last_use_us: dict[tuple[str, str], int] = {}
        self.chain: ChainBuilder | None = None
        self.serving = threading.Event()
        self.dropped = False
        # Set when the chain read back does not verify: the shard is not served.
        self.broken = ""
        # The newest settlement window cut in this shard's chain, and the entries of the
        # newest cuts by window (at most CUTS_KEPT_PER_SHARD of them).
        self.last_cut = 0
        self.cuts: dict[int, LedgerEntry] = {}
        # Keys of the payments whose reversal the bank has not confirmed yet: the owed
        # reversals loop reads these, not every payment of the shard.
        self.owed: set[str] = set()
        # While a takeover replays the chain: the intents read and not decided yet (see
        # :class:`_Replayed`); made payments when the replay ends
        # (``ShardedStore._finish_replay``).
        self.replaying: dict[str, _Replayed] = {}

    def reset(self) -> None:
        """Forget what a takeover rebuilt: it is rebuilt from the ledger again."""
        self.payments.clear()
        self.settled.clear()
        self.exposure.clear()
        self.window_nets.clear()
        self.allowance.clear()
        self.lent.clear()
        self.returned.clear()
        self.return_acked.clear()
        self.repaid.clear()
        self.granted_by_epoch.clear()
        self.reclaimed.clear()
        self.received_before.clear()
        self.reconcile_due.clear()
        self.chain = None
        self.last_cut = 0
        self.cuts.clear()
        self.owed.clear()
        self.replaying.clear()

    def find(self, key: str) -> PaymentRecord | bytes | None:
        """The payment's record if it is in flight or owes a reversal, its settled form
        if decided, else None (caller holds ``lock``; :meth:`read` after releasing it)."""
        p = self.payments.get(key)
        return p.record if p is not None else self.settled.get(key)

    def read(self, key: str, found: PaymentRecord | bytes | None) -> PaymentRecord | None:
        """What :meth:`find` found, as a record: a settled form is decoded (no lock
        needed: it never changes)."""
        if isinstance(found, bytes):
            return _record_of_settled(self.shard, self.epoch, key, found)
        return found

    def settle(self, key: str) -> None:
        """Keep the payment in its settled form if nothing is left to do for it: decided,
        no attempt at work on it, no reversal owed (caller holds ``lock``)."""
        p = self.payments.get(key)
        if p is None or not p.record.is_final or p.busy or p.deciding or key in self.owed:
            return
        self.settled[key] = _settled_form(p)
        del self.payments[key]

    @property
    def payment_count(self) -> int:
        return len(self.payments) + len(self.settled)

    def set_owed(self, key: str, owed: bool) -> None:
        if owed:
            self.owed.add(key)
        else:
            self.owed.discard(key)

    def lent_to(self, to: tuple[str, str, int]) -> int:
        """In a home shard: all it ever lent (participant, currency) to shard ``to[2]``."""
        by_epoch = self.granted_by_epoch.get(to)
        return sum(by_epoch.values()) if by_epoch is not None else 0

    def add_cut(self, window_id: int, entry: LedgerEntry) -> None:
        self.cuts[window_id] = entry
        for old in sorted(self.cuts)[:-CUTS_KEPT_PER_SHARD]:
            del self.cuts[old]

    # Exposure = amounts in flight (in full, from the intent on) + the net debit of each
    # window not settled, where a window that left a participant net creditor counts
    # zero: its credits offset the debits of their own window only. Windows settle one
    # by one, and a credit settled away must not leave a later debit it offset without
    # headroom. So no settlement and no decision can raise the exposure above what was
    # admitted: the position over any windows still unsettled stays within it.
    def apply_intent(self, rec: PaymentRecord) -> None:
        o = rec.order
        self.exposure[(o.payer_id, o.amount.currency)] += o.amount.amount_minor

    def apply_decision(
        self, rec: PaymentRecord, state: PaymentState, window_id: int, settled: frozenset[int]
    ) -> None:
        """``window_id``: the window the decision's entry belongs to (the shard's last
        cut before it, plus one); ``settled``: the windows known to be SETTLED."""
        o = rec.order
        self.apply_outcome(state, window_id, settled, payer_id=o.payer_id,
                           payee_id=o.payee_id, ccy=o.amount.currency,
                           amount=o.amount.amount_minor)  # fmt: skip

    def apply_outcome(
        self,
        state: PaymentState,
        window_id: int,
        settled: frozenset[int],
        *,
        payer_id: str,
        payee_id: str,
        ccy: str,
        amount: int,
    ) -> None:
        """:meth:`apply_decision` from the few fields it reads (a replay's, undecoded)."""
        payer, payee = (payer_id, ccy), (payee_id, ccy)
        self.exposure[payer] -= amount  # no longer in flight
        if state is not PaymentState.APPROVED or (
            window_id in settled and window_id <= self.last_cut
        ):
            # Declined, failed, reversed; or approved in a window settled meanwhile (its
            # decision was acknowledged after the window was cut, cleared and settled).
            return
        nets = self.window_nets.get(window_id)
        if nets is None:
            nets = self.window_nets[window_id] = defaultdict(int)
        self._add_net(nets, payer, amount)
        self._add_net(nets, payee, -amount)

    def _add_net(self, nets: defaultdict[tuple[str, str], int], key: tuple[str, str],
                 amount: int) -> None:  # fmt: skip
        before = nets[key]
        nets[key] = before + amount
        self.exposure[key] += max(before + amount, 0) - max(before, 0)

    def release(self, settled: frozenset[int]) -> list[int]:
        """Take the net debit of every settled window out of the exposure; the windows
        released (caller holds ``lock``)."""
        # Only a window this shard has cut: one SETTLED can be neither open nor still
        # closing, so another window named settled would be a fault, and keeps counting.
        done = sorted(w for w in self.window_nets if w in settled and w <= self.last_cut)
        for w in done:
            for k, net in self.window_nets.pop(w).items():
                self.exposure[k] -= max(net, 0)
                invariant(self.exposure[k] >= 0, f"shard {self.shard}: {k} exposure < 0")
        return done


@dataclass(frozen=True, slots=True)
class _Begun:
    """A begin under way: the payment found (``pending`` None) or its intent queued."""

    shard: _Shard
    payment: _Payment
    pending: _Pending | None


@dataclass(frozen=True, slots=True)
class _Deciding:
    """A decision queued for the group commit."""

    shard: _Shard
    payment: _Payment
    pending: _Pending
    step: StepRecord
    reversal_owed: bool
    # The window the decision's entry belongs to: queued before the shard's next cut.
    window_id: int


@dataclass
class _Pending:
    shard: int
    epoch: int
    kind: str
    key: str
    body: bytes
    index_rows: tuple[IndexRow, ...]
    done: threading.Event = field(default_factory=threading.Event)
    entry: LedgerEntry | None = None
    ok: bool = False


class ShardedStore:
    """The payment store of a shard owner; see the module docstring."""

    def __init__(
        self,
        *,
        node_id: str,
        zone: str,
        ledger: LedgerStore,
        participant: Callable[[str], Participant | None],
        still_owner: Callable[[int, int], bool],
        relinquish: Callable[[int], None],
        clock: Clock,
        borrow: Borrow | None = None,
        repay: Repay | None = None,
        full_reader: ChainReader | None = None,
        unconfirmed: Callable[[int, int], bool] = lambda shard, epoch: False,
    ) -> None:
        self.node_id = node_id
        self.zone = zone
        self.ledger = ledger
        # Reads every city's replica (consistency ALL): the second read of a chain that
        # does not verify at the ledger's own consistency.
        self.full_reader = full_reader
        # A participant as the registry knows it (in a node: the snapshot, read again at
        # once for one it lacks, registered a moment ago on another node).
        self._participant = participant
        self._still_owner = still_owner
        # Held at that epoch but not owned now: the lease is suspended (ownership.node),
        # owned again at the same epoch if etcd confirms it, else lost (on_lost follows).
        self._unconfirmed = unconfirmed
        self._relinquish = relinquish
        self.clock = clock
        # Through the router in a node; to this very store when none is given (tests).
        self.borrow: Borrow = borrow or self.lend
        self.repay_to_home: Repay = repay or self.repay
        self._shards: dict[int, _Shard] = {}
        self._lock = threading.Lock()
        self.indexer = Indexer(ledger, clock)
        self.committer = Committer(ledger, self)
        # Set by the node: called with a payment that needs resolving (no live attempt).
        self.on_unresolved: Callable[[PaymentRecord], None] = lambda rec: None
        self.takeover_durations_s: deque[float] = deque(maxlen=256)
        # The settlement windows known to be SETTLED (the window keeper tells): their
        # payments no longer count against the participants' caps. Replaced whole, never
        # changed in place, so a reader needs no lock.
        self._settled_windows: frozenset[int] = frozenset()
        # Set when a settlement released exposure: the window keeper then gives the
        # shards' unused headroom back (:meth:`give_back`).
        self.give_back_due = False
        # Since when repayments keep failing (time.monotonic()); None when the last went.
        self._repay_failing_since: float | None = None
        self._repay_logged_at = -REPAY_LOG_EVERY_S
        self._resend_after_home = -1  # where the last resend_returns ended
        self._home_retry_at: dict[int, float] = {}  # home shard -> time.monotonic()

    # -- ownership events ---------------------------------------------------------------

    def gain(self, shard: int, epoch: int) -> None:
        """The shard is ours at ``epoch`` from now: requests for it wait for the takeover
        (instead of being told this node is not the owner) until :meth:`take` serves it."""
        self._register(shard, epoch)

    def _register(self, shard: int, epoch: int) -> _Shard | None:
        with self._lock:
            old = self._shards.get(shard)
            if old is not None and old.epoch == epoch:
                return old
            if old is not None and old.epoch > epoch:
                return None  # a newer ownership already replaced this one
            st = _Shard(shard, epoch)
            st.taken_at_us = self.clock()
            self._shards[shard] = st
        if old is not None:
            self._drop(old)
        return st

    def take(self, shard: int, epoch: int, stop: threading.Event) -> bool:
        """Take the shard over at ``epoch``: fence, rebuild, seal, serve. Retries storage
        errors while this node still owns the shard; returns whether it serves."""
        started = time.monotonic()
        st = self._register(shard, epoch)
        if st is None:
            return False
        broken_since: float | None = None
        chain: list[LedgerEntry] = []
        while not stop.is_set() and not st.dropped:
            if not self._still_owner(shard, epoch):
                if self._unconfirmed(shard, epoch):
                    stop.wait(UNCONFIRMED_POLL_S)  # ends owned again, or dropped by lose()
                    continue
                self._forget(st)
                return False
            try:
                chain = self._rebuild(st)
            except Unavailable as e:
                log.warning("shard %d epoch %d: takeover waits for storage: %s", shard, epoch, e)
                stop.wait(TAKEOVER_RETRY_S)
                continue
            except InvariantViolation as e:
                # Never build on a chain that does not verify: keep the shard claimed (so
                # no other node builds on it either), refuse its requests, alert; read it
                # again for a while, since replicas that lag catch up.
                now = time.monotonic()
                broken_since = now if broken_since is None else broken_since
                gave_up = now - broken_since >= BROKEN_RETRY_WINDOW_S
                then = (
                    " (left broken: an operator must repair it)"
                    if gave_up
                    else f"; reading it again in {BROKEN_RETRY_S:.0f} s"
                )
                log.error("shard %d epoch %d NOT SERVED: its chain does not verify: %s%s",
                          shard, epoch, e, then)  # fmt: skip
                with st.lock:
                    st.broken = str(e)
                    st.serving.set()
                if gave_up:
                    return False
                stop.wait(BROKEN_RETRY_S)
                continue
            except Exception:
                # Neither storage nor the chain: a fault of this process. Kept claimed,
                # the shard would stay unserved until this node's lease ends; given back,
                # it is claimed again under a new epoch and rebuilt from the ledger. The
                # pause first bounds how often a fault that repeats can cycle the shard.
                log.exception(
                    "shard %d epoch %d: takeover failed; giving the shard up in %.0f s",
                    shard, epoch, TAKEOVER_FAULT_PAUSE_S,
                )  # fmt: skip
                stop.wait(TAKEOVER_FAULT_PAUSE_S)
                self._give_up(shard, epoch)
                return False
            break
        if st.dropped or stop.is_set():
            self._forget(st)
            return False
        unresolved = []
        with st.lock:
            if st.broken:
                log.warning("shard %d epoch %d: its chain verifies now", shard, epoch)
                st.broken = ""
            for p in list(st.payments.values()):
                if not p.record.is_final:
                    p.busy = True
                    unresolved.append(p.record)
            # Settled while the chain was replayed (the keeper releases served shards).
            if st.release(self._settled_windows):
                self.give_back_due = True
            st.serving.set()
        took = time.monotonic() - started
        self.takeover_durations_s.append(took)
        log.info(
            "shard %d epoch %d serving after %.2f s: %d payments, %d to resolve",
            shard, epoch, took, st.payment_count, len(unresolved),
        )  # fmt: skip
        for rec in unresolved:
            self.on_unresolved(rec)
        # Behind serving: the index may lag, the shard need not wait for it.
        try:
            self._reindex(shard, chain)
        except Exception:  # the next owner re-indexes what is still unmarked
            log.warning("shard %d epoch %d: re-indexing failed", shard, epoch, exc_info=True)
        return True

    def _forget(self, st: _Shard) -> None:
        with self._lock:
            if self._shards.get(st.shard) is st:
                del self._shards[st.shard]
        self._drop(st)

    def unconfirmed(self, shard: int, epoch: int) -> bool:
        """Held at ``epoch`` under a lease past its deadline: owned again soon, or lost."""
        return self._unconfirmed(shard, epoch)

    def lose(self, shard: int) -> None:
        """Ownership ended (lease lost or shard moved): forget the shard at once."""
        with self._lock:
            st = self._shards.pop(shard, None)
        if st is not None:
            self._drop(st)

    def fail(self, shard: int, epoch: int) -> None:
        """A commit of the shard was not acknowledged: stop serving it and give it back,
        so that it is claimed again under a new epoch and rebuilt from the ledger."""
        if self._give_up(shard, epoch):
            log.warning(
                "shard %d epoch %d: commit not acknowledged; giving the shard up", shard, epoch
            )

    def _give_up(self, shard: int, epoch: int) -> bool:
        """Stop serving ``shard`` at ``epoch`` and give it back; whether it was ours."""
        with self._lock:
            st = self._shards.get(shard)
            if st is None or st.epoch != epoch:
                return False
            del self._shards[shard]
        self._drop(st)
        self._relinquish(shard)
        return True

    def _drop(self, st: _Shard) -> None:
        with st.lock:
            st.dropped = True
            st.serving.set()  # waiters wake up and see it dropped
            # A snapshot: a takeover still replaying the chain adds payments without
            # the lock (the state is its own until the shard serves).
            for p in list(st.payments.values()):
                p.done.set()

    def owns(self, shard: int, epoch: int) -> bool:
        """Whether this node serves ``shard`` under ``epoch`` right now."""
        with self._lock:
            st = self._shards.get(shard)
        return st is not None and st.epoch == epoch and _live(st)

    def owns_now(self, shard: int) -> bool:
        """Whether this node serves ``shard`` right now, under any epoch."""
        with self._lock:
            st = self._shards.get(shard)
        return st is not None and _live(st)

    def owned(self) -> dict[int, int]:
        """The shards this node serves now (taken over, chain verified), with epochs."""
        with self._lock:
            shards = list(self._shards.values())
        return {st.shard: st.epoch for st in shards if _live(st)}

    # -- takeover -----------------------------------------------------------------------

    def _rebuild(self, st: _Shard) -> list[LedgerEntry]:
        """Fence, read and replay the chain, seal; the chain read."""
        st.reset()  # an earlier attempt may have replayed part of the chain
        self.ledger.fence(st.shard, st.epoch, self.node_id, self.clock())
        entries, prev_epoch = self._read_chain(st.shard, st.epoch)
        head_seq = entries[-1].seq if entries else FIRST_SEQ - 1
        head_hash = entries[-1].entry_hash if entries else GENESIS_HASH
        for e in entries:
            self._replay_entry(st, e)
        self._finish_replay(st)
        seal = Seal(st.shard, st.epoch, prev_epoch, head_seq + 1, head_hash)
        self.ledger.write_seal(seal, self.node_id, self.clock())
        st.chain = ChainBuilder(st.shard, st.epoch, head_seq + 1, head_hash)
        return entries

    def _read_chain(self, shard: int, epoch: int) -> tuple[list[LedgerEntry], int]:
        """The chain below ``epoch``, at the ledger's consistency; if it does not
        verify there, as every city's replicas hold it together (the read repairs the
        replicas that lag). A full read that cannot be had leaves the first answer."""
        try:
            return read_chain(self.ledger, shard, below_epoch=epoch)
        except InvariantViolation as e:
            if self.full_reader is None:
                raise
            log.warning("shard %d epoch %d: chain does not verify (%s); reading every "
                        "city's replica", shard, epoch, e)  # fmt: skip
            try:
                return read_chain(self.full_reader, shard, below_epoch=epoch)
            except Unavailable:
                raise e from None

    def _reindex(self, shard: int, entries: Sequence[LedgerEntry]) -> None:
        """Index what earlier owners acknowledged but had not indexed (idempotent)."""
        todo = unindexed(entries, self.ledger.index_marks(shard))
        by_epoch: defaultdict[int, list[LedgerEntry]] = defaultdict(list)
        for e in todo:
            by_epoch[e.epoch].append(e)
        for epoch, part in sorted(by_epoch.items()):
            step = REINDEX_CHUNK_ROWS // 2  # two rows an intent
            for i in range(0, len(part), step):
                chunk = part[i : i + step]
                rows = [row for e in chunk for row in rows_of_intent(e)]
                self.indexer.add(shard, epoch, chunk[0].seq, chunk[-1].seq, rows)
        if todo:
            log.info("shard %d: %d payments to index again after takeover", shard, len(todo))

    def _replay_entry(self, st: _Shard, e: LedgerEntry) -> None:
        """Apply one entry of the chain to the shard's state. A payment decided with
        nothing owed becomes its settled form straight from its two entries' bodies: its
        record is never decoded here (about half of a replay's time, when it was)."""
        key = e.payment_key
        if e.kind == KIND_INTENT:
            payer, payee, ccy, amount = order_money(Intent.order_bytes_of(e.body))
            st.payments.pop(key, None)  # a later intent of the key stands, as it did
            st.replaying[key] = _Replayed(e.seq, e.body, payer, payee, ccy, amount)
            st.exposure[(payer, ccy)] += amount
        elif e.kind == KIND_DECISION:
            r = st.replaying.pop(key, None)
            if r is None:
                raise InvariantViolation(
                    f"{key}: a decision before its intent, or a second decision"
                )
            state, owed = Decision.outcome_of(e.body)
            st.apply_outcome(state, st.last_cut + 1, self._settled_windows, payer_id=r.payer_id,
                             payee_id=r.payee_id, ccy=r.currency,
                             amount=r.amount_minor)  # fmt: skip
            if owed:  # kept as a payment: the owed reversals loop works on it
                d = Decision.decode(e.body, key)
                rec = _record_of_intent(r.body, st.shard, r.seq, st.epoch)
                p = _Payment(rec.with_step(_decided_step(d), ledger_seq=e.seq),
                             intent_body=r.body, decision_body=e.body)  # fmt: skip
                p.done.set()
                st.payments[key] = p
                st.set_owed(key, True)
            else:
                st.owed.discard(key)
                st.settled[key] = _settled_form_of(e.seq, r.body, e.body)
        elif e.kind == KIND_REVERSAL_CONFIRMED:
            if key not in st.payments and key not in st.settled and key not in st.replaying:
                raise InvariantViolation(
                    f"{e.payment_key}: a reversal confirmed before its payment"
                )
            st.owed.discard(e.payment_key)
            st.settle(e.payment_key)
        elif e.kind == KIND_CAP_GRANT:
            t = CapTransfer.decode(e.body)
            to = (t.participant_id, t.currency, t.other_shard)
            st.lent[(t.participant_id, t.currency)] += t.amount_minor
            st.granted_by_epoch[to][t.epoch] += t.amount_minor
        elif e.kind == KIND_CAP_RECEIVE:
            t = CapTransfer.decode(e.body)
            st.allowance[(t.participant_id, t.currency)] += t.amount_minor
            if e.epoch < st.epoch:  # an earlier owner's: the home shard is told (reconcile)
                st.received_before[(t.participant_id, t.currency)] += t.amount_minor
                st.reconcile_due.add((t.participant_id, t.currency))
        elif e.kind == KIND_CAP_RETURN:
            t = CapTransfer.decode(e.body)
            st.allowance[(t.participant_id, t.currency)] -= t.amount_minor
            st.returned[(t.participant_id, t.currency)] += t.amount_minor
        elif e.kind == KIND_CAP_REPAID:
            t = CapTransfer.decode(e.body)
            st.lent[(t.participant_id, t.currency)] -= t.amount_minor
            st.repaid[(t.participant_id, t.currency, t.other_shard)] += t.amount_minor
        elif e.kind == KIND_CAP_RECLAIMED:
            t = CapTransfer.decode(e.body)
            st.lent[(t.participant_id, t.currency)] -= t.amount_minor
            st.reclaimed[(t.participant_id, t.currency, t.other_shard)] += t.amount_minor
        elif e.kind == KIND_WINDOW_CUT:
            cut = WindowCut.decode(e.body)
            invariant(cut.window_id == st.last_cut + 1, f"shard {st.shard}: cut out of order")
            st.last_cut = cut.window_id
            st.add_cut(cut.window_id, e)
        else:
            invariant(False, f"shard {st.shard} seq {e.seq}: unknown entry kind {e.kind!r}")

    @staticmethod
    def _finish_replay(st: _Shard) -> None:
        """The intents the chain left undecided become payments (in flight: the
        resolver takes them once the shard serves)."""
        for key, r in st.replaying.items():
            rec = _record_of_intent(r.body, st.shard, r.seq, st.epoch)
            st.payments[key] = _Payment(rec, intent_body=r.body)
        st.replaying.clear()

    # -- PaymentStore -------------------------------------------------------------------

    def _serving(self, shard: int, wait_s: float = TAKEOVER_WAIT_S) -> _Shard:
        with self._lock:
            st = self._shards.get(shard)
        if st is None:
            raise Unavailable(
                f"this node does not own shard {shard}",
                retry_after_ms=200,
                reason=Unavailable.NOT_SHARD_OWNER,
            )
        if not st.serving.wait(wait_s):
            raise Unavailable(
                f"shard {shard} is being taken over", retry_after_ms=1000, reason="SHARD_RECOVERING"
            )
        if st.dropped:
            raise _not_owner(shard)
        if not self._still_owner(shard, st.epoch):
            if self._unconfirmed(shard, st.epoch):
                raise Unavailable(
                    f"this node's ownership of shard {shard} awaits etcd's confirmation",
                    retry_after_ms=1000,
                    reason=Unavailable.OWNERSHIP_UNCONFIRMED,
                )
            raise _not_owner(shard)
        if st.broken:
            raise Unavailable(
                f"shard {shard} is out of service: its ledger chain does not verify",
                retry_after_ms=60_000,
                reason="SHARD_CHAIN_BROKEN",
            )
        return st

    def load(self, institution_id: str, payment_id: str) -> PaymentRecord | None:
        st = self._serving(shard_of(institution_id, payment_id))
        key = payment_key(institution_id, payment_id)
        with st.lock:
            found = st.find(key)
        return st.read(key, found)

    def begin(self, record: PaymentRecord) -> tuple[PaymentRecord, bool]:
        h = self._begin_start(record)
        # The payment's own trace shows its ledger write: the wait for its group commit.
        with telemetry.span("ledger.append", shard=record.shard, kind=KIND_INTENT):
            return self._begin_finish(h)

    def begin_many(
        self, records: Sequence[PaymentRecord], *, wait_in_flight: bool = False
    ) -> list[tuple[PaymentRecord, bool] | ClearingError]:
        """``begin`` for each record, their intents in the same group commits: every
        intent is queued first, then each is awaited. The whole batch waits at most
        :data:`TAKEOVER_WAIT_S` for shards being taken over (not that long per order),
        and a payment found in flight is returned as it is unless ``wait_in_flight``
        (one slow payment must not hold the others of a batch back)."""
        deadline = time.monotonic() + TAKEOVER_WAIT_S
        borrows = _BatchBorrows(self.clock() + int(BATCH_BORROW_S * 1_000_000))
        shards: dict[int, _Shard | ClearingError] = {}
        started: list[_Begun | ClearingError] = []
        for rec in records:
            st = shards.get(rec.shard)
            if st is None:
                try:
                    st = self._serving(rec.shard, max(0.0, deadline - time.monotonic()))
                except ClearingError as e:
                    st = e
                shards[rec.shard] = st
            if isinstance(st, ClearingError):
                started.append(st)
                continue
            try:
                started.append(self._begin_start(rec, st, borrows))
            except ClearingError as e:
                started.append(e)
        out: list[tuple[PaymentRecord, bool] | ClearingError] = []
        # One span for the batch's wait (a span per payment would cost more than the
        # payment's own work).
        with telemetry.span("ledger.append", kind=KIND_INTENT, payments=len(records)):
            for h in started:
                if isinstance(h, ClearingError):
                    out.append(h)
                    continue
                try:
                    out.append(self._begin_finish(h, wait_in_flight=wait_in_flight))
                except ClearingError as e:
                    out.append(e)
        return out

    def _begin_start(
        self,
        record: PaymentRecord,
        st: _Shard | None = None,
        borrows: _BatchBorrows | None = None,
    ) -> _Begun:
        """Queue the payment's intent (borrowing cap headroom first if it must), or find
        the payment already there; :meth:`_begin_finish` waits for either. ``borrows``:
        the batch's borrowing so far (a batch's begins share its time for loans)."""
        st = st if st is not None else self._serving(record.shard)
        o = record.order
        payer = (o.payer_id, o.amount.currency)
        for rounds_left in range(BORROW_ROUNDS_MAX, -1, -1):
            with st.lock:
                if st.dropped:
                    raise _not_owner(st.shard)
                existing = st.payments.get(record.key)
                if existing is not None:
                    return _Begun(st, existing, None)
                settled = st.settled.get(record.key)
                if settled is not None:
                    break  # decided already: read back below, outside the lock
                shortfall = st.exposure[payer] + o.amount.amount_minor - st.allowance[payer]
                if shortfall <= 0:
                    record = replace(record, owner_epoch=st.epoch)
                    rows = index_rows_of(
                        o.institution_id, o.payment_id, record.bank_id, record.received_at_us
                    )
                    body = _intent_of(record).encode()
                    pending = self._enqueue(st, KIND_INTENT, record.key, body, rows)
                    st.last_use_us[payer] = self.clock()
                    p = _Payment(record, busy=True, intent_body=body)
                    st.payments[record.key] = p
                    st.apply_intent(record)
                    return _Begun(st, p, pending)
            if rounds_left == 0:
                # Every loan so far was taken by other payments before this one: a loan
                # now would be recorded and never tried (the loop has no round left).
                raise _cap_exceeded(o.payer_id, o.amount.currency, "headroom kept being taken")
            # Short of headroom: borrow from the payer's home shard, outside the lock.
            if borrows is not None:
                borrows.check(payer, self.clock())
            try:
                granted = self.borrow(o.payer_id, o.amount.currency, st.shard, shortfall,
                                      st.epoch)  # fmt: skip
            except Unavailable as e:
                if borrows is not None:
                    borrows.failed[payer] = e
                raise
            receipt = CapTransfer(
                o.payer_id, o.amount.currency, home_shard(*payer), granted, self.clock()
            )
            with st.lock:
                if st.dropped:
                    raise _not_owner(st.shard)
                # Recorded before any intent that relies on it (the queue keeps order).
                self._enqueue(st, KIND_CAP_RECEIVE, cap_key(*payer), receipt.encode())
                st.allowance[payer] += granted
        assert settled is not None  # the loop ends only by this break (for mypy)
        rec = _record_of_settled(st.shard, st.epoch, record.key, settled)
        return _Begun(st, _Payment(rec), None)

    def _begin_finish(
        self, h: _Begun, *, wait_in_flight: bool = True
    ) -> tuple[PaymentRecord, bool]:
        st, p = h.shard, h.payment
        if h.pending is None:  # found: wait for the attempt in flight, if any
            if p.busy and wait_in_flight:
                p.done.wait(IN_FLIGHT_WAIT_S)
            with st.lock:
                return p.record, False
        entry = self._await(h.pending)
        with st.lock:
            p.record = replace(p.record, ledger_seq=entry.seq)
            return p.record, True

    def lend(
        self,
        participant_id: str,
        currency: str,
        for_shard: int,
        need_minor: int,
        for_epoch: int = 0,
    ) -> int:
        """As the owner of the participant's home shard: lend cap headroom to a shard
        (``for_epoch``: the epoch of its owner that asks, recorded with the loan)."""
        st = self._serving(home_shard(participant_id, currency))
        key = (participant_id, currency)
        participant = self._participant(participant_id)
        if participant is None:
            # The order was checked against the registry of the node that took it: this
            # node's has not caught up yet (a participant registered in the last 2 s).
            # Its cap is not known to be 0: nothing is recorded, and a retry will lend.
            raise Unavailable(
                f"the owner of {participant_id}'s cap in {currency} does not know it yet "
                "(registry refreshed every 2 s); nothing was recorded: retry with the same id",
                retry_after_ms=int(REGISTRY_REFRESH_S * 1000),
                reason="OWNER_REGISTRY_BEHIND",
            )
        cap = participant.net_debit_cap(currency)
        with st.lock:
            available = cap - st.lent[key]
            if need_minor > available:
                raise _cap_exceeded(
                    participant_id, currency,
                    f"{max(available, 0)} of the cap not lent to any ledger shard; headroom "
                    f"a shard leaves unused for {CAP_IDLE_GIVE_BACK_S:.0f} s comes back to be "
                    "lent again, the rest at the next settlement",
                )  # fmt: skip
            granted = loan_minor(available, need_minor)
            grant = CapTransfer(participant_id, currency, for_shard, granted, self.clock(),
                                max(for_epoch, 0))  # fmt: skip
            pending = self._enqueue(st, KIND_CAP_GRANT, cap_key(*key), grant.encode())
            st.lent[key] += granted
            st.granted_by_epoch[(*key, for_shard)][grant.epoch] += granted
        self._await(pending)
        return granted

    def repay(
        self,
        participant_id: str,
        currency: str,
        from_shard: int,
        returned_total_minor: int,
        received: ReceivedBefore | None = None,
    ) -> int:
        """As the owner of the participant's home shard: take back headroom that
        ``from_shard`` gave back (``returned_total_minor``: all it ever gave back of this
        cap, so a retry takes nothing twice), and reclaim what was lent to it at epochs
        below ``received.epoch`` beyond ``received.amount_minor`` (what its chain
        received at those epochs: the rest never reached it, and no receipt of it can be
        written any more). Returns the total taken back from it by repayments."""
        st = self._serving(home_shard(participant_id, currency), REPAY_SERVING_WAIT_S)
        key = (participant_id, currency)
        to = (*key, from_shard)
        pendings: list[_Pending] = []
        with st.lock:
            took = st.repaid[to]
            lent_to = st.lent_to(to)
            if returned_total_minor > lent_to:
                # A shard gives back only what its loans gave it: this is no return.
                raise FailedPrecondition(
                    f"{participant_id} {currency}: shard {from_shard} would have given back "
                    f"{returned_total_minor} in all, more than the {lent_to} lent to it",
                    reason="CAP_RETURN_EXCEEDS_LOANS",
                )
            more = returned_total_minor - took
            if more > 0:
                body = CapTransfer(*key, from_shard, more, self.clock()).encode()
                pendings.append(self._enqueue(st, KIND_CAP_REPAID, cap_key(*key), body))
                st.lent[key] -= more
                st.repaid[to] = took = returned_total_minor
            if received is not None and (lost := self._lost_loans(st, to, received)) > 0:
                bound = received.epoch
                body = CapTransfer(*key, from_shard, lost, self.clock(), bound).encode()
                pendings.append(self._enqueue(st, KIND_CAP_RECLAIMED, cap_key(*key), body))
                st.lent[key] -= lost
                st.reclaimed[to] += lost
                log.info("shard %d: %d %s of %s's cap lent to shard %d before its epoch %d was "
                         "never received there: reclaimed", st.shard, lost, currency,
                         participant_id, from_shard, bound)  # fmt: skip
            invariant(st.lent[key] >= 0, f"{participant_id} {currency}: lent below zero")
        for pending in pendings:
            self._await(pending)
        return took

    @staticmethod
    def _lost_loans(st: _Shard, to: tuple[str, str, int], received: ReceivedBefore) -> int:
        """What is still to reclaim of the loans to ``to`` at epochs below
        ``received.epoch`` that its shard's chain never received. Nothing while loans
        recorded without an epoch remain (which epoch took them is not known)."""
        borrower_epoch, received_before = received.epoch, received.amount_minor
        by_epoch = st.granted_by_epoch.get(to)
        if borrower_epoch <= 0 or by_epoch is None or by_epoch.get(0, 0) > 0:
            return 0
        lent_before = sum(n for epoch, n in by_epoch.items() if epoch < borrower_epoch)
        if received_before > lent_before:
            # Receipts are written only for loans this shard recorded: the two chains
            # disagree. Nothing is reclaimed (the cap stays as tight as it was), and the
            # repayment that came with it is still taken: refusing it would strand it.
            log.error(
                "shard %d: shard %d says it received %d of %s's cap in %s before its epoch "
                "%d, more than the %d lent to it then: nothing reclaimed; compare the two "
                "chains (clearingctl audit verify-chains)",
                st.shard, to[2], received_before, to[0], to[1], borrower_epoch, lent_before,
            )  # fmt: skip
            return 0
        return lent_before - received_before - st.reclaimed[to]

    def give_back(self, idle_for_s: float | None = None) -> int:
        """Give every shard's unused headroom back to its home shards: what a shard's
        allowance holds beyond its exposure (in flight and not settled). Called after a
        settlement, so that the cap can be lent again wherever it is needed (and a cap
        lowered since binds the headroom given back); and, with ``idle_for_s``, every
        :data:`CAP_IDLE_CHECK_S` for the payers whose headroom a shard has not used for
        that long (a declined payment's loan, a payer that moved on to other shards),
        which other shards may need before the next settlement. Returns how many returns
        were recorded; each is repaid to the home shard by :meth:`resend_returns`."""
        idle_only = idle_for_s is not None
        idle_since_us = self.clock() - int((idle_for_s or 0.0) * 1e6)
        # Cleared before the shards are listed: a takeover that ends meanwhile and sets it
        # again (its shard not listed) keeps it set for the next call.
        due_again = False
        if not idle_only:
            self.give_back_due = False
        with self._lock:
            shards = [st for st in self._shards.values() if _live(st)]
        pendings: list[tuple[_Shard, tuple[str, str], int, _Pending]] = []
        if self.committer.queued() > GIVE_BACK_QUEUE_ENTRIES_MAX:
            due_again = True  # busy with payments: at the next step
            shards = []
        try:
            for st in shards:
                with st.lock:
                    if st.dropped:
                        continue
                    for key, allowance in list(st.allowance.items()):
                        spare = allowance - st.exposure[key]  # exposure is never negative
                        if spare <= 0:
                            continue
                        if idle_only and st.last_use_us.get(key, st.taken_at_us) > idle_since_us:
                            continue
                        if len(pendings) >= GIVE_BACK_RETURNS_PER_STEP_MAX:
                            due_again = True  # the rest at the next step
                            break
                        body = CapTransfer(*key, home_shard(*key), spare, self.clock()).encode()
                        pending = self._enqueue(st, KIND_CAP_RETURN, cap_key(*key), body)
                        st.allowance[key] -= spare  # given up before it is written: never used
                        pendings.append((st, key, spare, pending))
        except ResourceExhausted:
            due_again = True  # the commit queue is full: the rest at the next step
        if due_again and not idle_only:  # idle headroom is looked for again anyway
            self.give_back_due = True
        written = 0
        for st, key, spare, pending in pendings:
            try:
                self._await(pending)
            except Unavailable:
                continue  # not written: the shard is given up, its next owner rebuilds it
            with st.lock:  # only once written may the home shard take it back
                st.returned[key] += spare
            written += 1
        self.resend_returns()
        return written

    def resend_returns(self, limit: int = REPAY_RESENDS_PER_STEP_MAX) -> int:
        """Send the home shards the returns they have not confirmed (at most ``limit``
        calls, for at most :data:`RESEND_BUDGET_S`); how many were confirmed now. ``returned``
        counts a CAP_RETURN only once it is written (:meth:`give_back`): the home shard
        never takes back what the shard may still use."""
        with self._lock:
            shards = [st for st in self._shards.values() if _live(st)]
        by_home: defaultdict[int, list[tuple[_Shard, tuple[str, str], int, ReceivedBefore]]] = (
            defaultdict(list)
        )
        for st in shards:
            with st.lock:
                keys = {k for k, total in st.returned.items() if st.return_acked.get(k, 0) < total}
                for key in sorted(keys | st.reconcile_due):
                    told = ReceivedBefore(st.epoch, st.received_before[key])
                    by_home[home_shard(*key)].append((st, key, st.returned[key], told))
        # Home by home, each call starting after the home the last one ended at; a home
        # that failed is not asked again for REPAY_HOME_RETRY_S. So homes that do not
        # answer (out of service, their node away) hold up neither the caller nor the
        # returns owed to the others.
        homes = sorted(by_home)
        cut = next((i for i, h in enumerate(homes) if h > self._resend_after_home), 0)
        now = time.monotonic()
        until, calls, confirmed = now + RESEND_BUDGET_S, 0, 0
        failed: dict[int, ClearingError] = {}
        for home in homes[cut:] + homes[:cut]:
            if calls >= limit or time.monotonic() > until:
                break
            self._resend_after_home = home
            if self._home_retry_at.get(home, 0.0) > now:
                continue
            for st, key, total, received in by_home[home][: limit - calls]:
                calls += 1
                try:
                    repaid = self.repay_to_home(*key, st.shard, total, received)
                except ClearingError as e:
                    failed[home] = e
                    self._home_retry_at[home] = time.monotonic() + REPAY_HOME_RETRY_S
                    break
                with st.lock:
                    st.return_acked[key] = max(st.return_acked.get(key, 0), repaid)
                    st.reconcile_due.discard(key)
                confirmed += 1
        self._log_repay_failures(failed)
        return confirmed

    def _log_repay_failures(self, failed: Mapping[int, ClearingError]) -> None:
        """One line for the home shards that did not take headroom back in a call."""
        now = time.monotonic()
        if not failed:
            self._repay_failing_since = None
            return
        since = self._repay_failing_since = self._repay_failing_since or now
        if now - self._repay_logged_at < REPAY_LOG_EVERY_S:
            return
        self._repay_logged_at = now
        first = min(failed)
        log.log(
            logging.WARNING if now - since >= REPAY_WARN_AFTER_S else logging.INFO,
            "headroom given back (or loans received at earlier epochs, told after a "
            "takeover) not taken back yet by %d home shards (for %.0f s; each asked again "
            "%.0f s after it failed), e.g. shard %d: %s",
            len(failed), now - since, REPAY_HOME_RETRY_S, first, failed[first],
        )  # fmt: skip

    def decide(
        self,
        record: PaymentRecord,
        step: StepRecord,
        postings: Sequence[Posting],
        *,
        reversal_owed: bool = False,
    ) -> PaymentRecord:
        h = self._decide_start(record, step, postings, reversal_owed)
        if isinstance(h, PaymentRecord):
            return h
        with telemetry.span("ledger.append", shard=record.shard, kind=KIND_DECISION):
            return self._decide_finish(h)

    def decide_many(
        self, decisions: Sequence[tuple[PaymentRecord, StepRecord, Sequence[Posting], bool]]
    ) -> list[PaymentRecord | ClearingError]:
        """``decide`` for each (record, step, postings, reversal_owed), their decisions
        in the same group commits."""
        started: list[_Deciding | PaymentRecord | ClearingError] = []
        for record, step, postings, owed in decisions:
            try:
                started.append(self._decide_start(record, step, postings, owed))
            except ClearingError as e:
                started.append(e)
        out: list[PaymentRecord | ClearingError] = []
        with telemetry.span("ledger.append", kind=KIND_DECISION, payments=len(decisions)):
            for h in started:
                if not isinstance(h, _Deciding):
                    out.append(h)
                    continue
                try:
                    out.append(self._decide_finish(h))
                except ClearingError as e:
                    out.append(e)
        return out

    def _decide_start(
        self,
        record: PaymentRecord,
        step: StepRecord,
        postings: Sequence[Posting],
        reversal_owed: bool,
    ) -> _Deciding | PaymentRecord:
        """Queue the decision; a payment decided already returns its record."""
        st = self._serving(record.shard)
        with st.lock:
            p = st.payments.get(record.key)
            if p is None:
                settled = st.read(record.key, st.find(record.key))
                invariant(settled is not None, f"{record.key}: decided before it began")
                assert settled is not None
                return settled  # decided already: the first decision stands
            if p.record.is_final:
                return p.record  # decided already: the first decision stands
            if record.owner_epoch != st.epoch:
                # Begun under an earlier ownership of the shard: the takeover handed the
                # payment to the resolver, whose decision is the one that counts.
                raise Unavailable(
                    f"{record.key}: the shard changed hands during this attempt; retry to "
                    "learn the outcome",
                    retry_after_ms=1000,
                    reason="PAYMENT_IN_PROGRESS",
                )
            if not p.deciding:
                ev = step.event
                d = Decision(ev.state, ev.at_us, ev.zone, ev.detail, step.bank_ref,
                             reversal_owed, tuple(postings))  # fmt: skip
                pending = self._enqueue(st, KIND_DECISION, record.key, d.encode())
                p.deciding = True  # only once it is queued: a full queue leaves it unset
                return _Deciding(st, p, pending, step, reversal_owed, st.last_cut + 1)
        # Another attempt is writing its decision: the first one stands.
        p.done.wait(COMMIT_WAIT_S)
        with st.lock:
            if p.record.is_final:
                return p.record
        raise Unavailable(
            f"{record.key}: another decision is being written", retry_after_ms=500,
            reason="PAYMENT_IN_PROGRESS",
        )  # fmt: skip

    def _decide_finish(self, h: _Deciding) -> PaymentRecord:
        st, p = h.shard, h.payment
        try:
            entry = self._await(h.pending)
        except BaseException:
            with st.lock:
                p.deciding = False
            raise
        # Final in the same lock section that ends ``deciding``: an attempt that looks
        # in between would find it neither deciding nor decided and write a second
        # decision.
        with st.lock:
            p.deciding = False
            p.record = p.record.with_step(h.step, ledger_seq=entry.seq)
            p.decision_body = h.pending.body
            st.set_owed(h.pending.key, h.reversal_owed)
            p.busy = False
            st.apply_decision(p.record, h.step.event.state, h.window_id, self._settled_windows)
            p.done.set()
            st.settle(h.pending.key)
            return p.record

    def abandon(self, record: PaymentRecord) -> None:
        with self._lock:
            st = self._shards.get(record.shard)
        if st is None or st.dropped:
            return  # the next owner resolves it
        with st.lock:
            p = st.payments.get(record.key)
            if p is None or p.record.is_final or record.owner_epoch != st.epoch:
                return  # decided, or the takeover already handed it to the resolver
            p.busy = True  # the resolver's now
            rec = p.record
        self.on_unresolved(rec)

    def owed_reversals(self, limit: int) -> Sequence[OwedReversal]:
        out: list[OwedReversal] = []
        with self._lock:
            shards = [st for st in self._shards.values() if _live(st)]
        for st in shards:
            with st.lock:
                for k in st.owed:
                    rec = st.payments[k].record
                    out.append(OwedReversal(k, rec.bank_id, rec.switch_ref, 0))
            if len(out) >= limit:
                break
        return out[:limit]

    def confirm_reversal(self, owed: OwedReversal, at_us: int) -> None:
        institution_id, _, payment_id = owed.payment_key.partition("/")
        st = self._serving(shard_of(institution_id, payment_id))
        body = ReversalConfirmed(at_us, self.zone).encode()
        with st.lock:
            if owed.payment_key not in st.owed:
                return
            pending = self._enqueue(st, KIND_REVERSAL_CONFIRMED, owed.payment_key, body)
        self._await(pending)
        with st.lock:
            st.owed.discard(owed.payment_key)
            st.settle(owed.payment_key)

    # -- settlement windows -----------------------------------------------------------

    def cut_window(self, window_id: int) -> list[LedgerEntry]:
        """End ``window_id`` in every shard served here whose previous window is cut: a
        WINDOW_CUT entry in its chain. Returns the cut entries that were acknowledged.

        The cut takes its place in the shard's chain like any entry, under the shard's
        lock: every entry before it belongs to the window, every entry after it to the
        next one. No payment can fall between two windows or into both.
        """
        with self._lock:
            shards = [st for st in self._shards.values() if _live(st)]
        pendings: list[tuple[_Shard, _Pending]] = []
        try:
            for st in shards:
                with st.lock:
                    if st.dropped or st.last_cut != window_id - 1:
                        continue
                    body = WindowCut(window_id, self.clock()).encode()
                    pendings.append(
                        (st, self._enqueue(st, KIND_WINDOW_CUT, window_key(window_id), body))
                    )
                    st.last_cut = window_id
        except ResourceExhausted:
            # The commit queue is full: the shards not cut yet are cut at the next call
            # (their last_cut is unchanged); those queued are waited for below, so that
            # their cuts are recorded and the window does not stay CLOSING for them.
            log.info("settlement window %d: the commit queue is full, %d shards cut now, "
                     "the rest at the next step", window_id, len(pendings))  # fmt: skip
        out: list[LedgerEntry] = []
        for st, pending in pendings:
            try:
                entry = self._await(pending)
            except Unavailable:
                continue  # the shard is given up; its next owner cuts it
            with st.lock:
                st.add_cut(window_id, entry)
            out.append(entry)
        return out

    def release_settled(self, window_ids: Iterable[int]) -> list[int]:
        """Windows now SETTLED: their net debit positions were paid, so they no longer
        count against the participants' net debit caps; the shards' headroom they leave
        unused is given back next (:attr:`give_back_due`, :meth:`give_back`).
        Idempotent. Returns the windows whose share this call released in some shard
        served here."""
        with self._lock:
            known = frozenset(window_ids)
            if not known <= self._settled_windows:
                self._settled_windows = self._settled_windows | known
            settled = self._settled_windows
            shards = [st for st in self._shards.values() if _live(st)]
        released: set[int] = set()
        for st in shards:
            with st.lock:
                released.update(st.release(settled))
        if released:
            self.give_back_due = True
        return sorted(released)

    def unsettled_windows(self) -> list[int]:
        """The cut windows whose approved payments still count against the caps in some
        shard served here (not known to be SETTLED)."""
        with self._lock:
            shards = [st for st in self._shards.values() if _live(st)]
        out: set[int] = set()
        for st in shards:
            with st.lock:
                out.update(w for w in st.window_nets if w <= st.last_cut)
        return sorted(out)

    def cuts_of(self, window_id: int) -> dict[int, LedgerEntry]:
        """Per shard served here that has cut ``window_id``: the cut's entry. Any of the
        shard's newest cuts, not only its latest: a shard may have cut several windows
        (two windows closing one after the other, or a new owner that found cuts in the
        chain whose rows were never recorded), and every one of them is recorded."""
        with self._lock:
            shards = [st for st in self._shards.values() if _live(st)]
        out: dict[int, LedgerEntry] = {}
        for st in shards:
            with st.lock:
                entry = st.cuts.get(window_id)
            if entry is not None:
                out[st.shard] = entry
        return out

    # -- exposure ------------------------------------------------------------------------

    def exposure(self) -> dict[tuple[str, str], int]:
        """Net debit exposure per (participant, currency) over the shards owned here."""
        out: defaultdict[tuple[str, str], int] = defaultdict(int)
        with self._lock:
            shards = list(self._shards.values())
        for st in shards:
            with st.lock:
                for k, v in st.exposure.items():
                    out[k] += v
        return dict(out)

    # -- commit plumbing ------------------------------------------------------------------

    def _enqueue(
        self, st: _Shard, kind: str, key: str, body: bytes, index_rows: tuple[IndexRow, ...] = ()
    ) -> _Pending:
        pending = _Pending(st.shard, st.epoch, kind, key, body, index_rows)
        self.committer.submit(pending)
        return pending

    def _await(self, pending: _Pending) -> LedgerEntry:
        done = pending.done.wait(COMMIT_WAIT_S)
        if not done or not pending.ok or pending.entry is None:
            # Whether the entry landed is unknown: the shard's state in memory can no
            # longer be trusted. Give it up; it comes back rebuilt from the ledger.
            self.fail(pending.shard, pending.epoch)
            raise Unavailable(
                f"shard {pending.shard}: the ledger write was not acknowledged; retry with "
                "the same payment id",
                retry_after_ms=500,
                reason="LEDGER_WRITE_NOT_ACKNOWLEDGED",
            )
        return pending.entry

    def chain_for_commit(self, shard: int, epoch: int) -> ChainBuilder | None:
        with self._lock:
            st = self._shards.get(shard)
        if st is None or st.epoch != epoch or st.dropped or st.chain is None:
            return None
        if not self._still_owner(shard, epoch):
            return None
        return st.chain


class Committer:
    """The group commit: one thread takes every queued entry, appends them to their
    shards' chains, writes them all at once and acknowledges those that were fenced in."""

    def __init__(self, ledger: LedgerStore, store: ShardedStore) -> None:
        self.ledger = ledger
        self.store = store
        self._queue: deque[_Pending] = deque()
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.commits = 0
        self.entries = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="group-commit", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(COMMIT_WAIT_S)

    def queued(self) -> int:
        """Entries waiting for a group commit."""
        with self._cond:
            return len(self._queue)

    def submit(self, pending: _Pending) -> None:
        with self._cond:
            if len(self._queue) >= COMMIT_QUEUE_ENTRIES_MAX:
                raise ResourceExhausted(
                    "the ledger commit queue is full",
                    retry_after_ms=200,
                    reason="COMMIT_QUEUE_FULL",
                )
            self._queue.append(pending)
            self._cond.notify()

    def _take(self) -> list[_Pending]:
        with self._cond:
            while not self._queue and not self._stop.is_set():
                self._cond.wait(0.5)
        time.sleep(COMMIT_LINGER_S)
        with self._cond:
            n = min(len(self._queue), COMMIT_ENTRIES_MAX)
            return [self._queue.popleft() for _ in range(n)]

    def _run(self) -> None:
        while not self._stop.is_set():
            batch = self._take()
            if batch:
                try:
                    self.commit_once(batch)
                except Exception:
                    log.exception("group commit failed")
                    # Its shards' chains in memory may have moved past what was written
                    # (an entry nobody waits for, a CAP_RECEIVE, would leave a gap under
                    # the next commit): give them up, to be rebuilt from the ledger.
                    for shard, epoch in sorted({(p.shard, p.epoch) for p in batch if not p.ok}):
                        self.store.fail(shard, epoch)
                    for p in batch:
                        p.done.set()

    def commit_once(self, batch: list[_Pending]) -> None:
        by_shard: dict[tuple[int, int], list[_Pending]] = defaultdict(list)
        for p in batch:
            by_shard[(p.shard, p.epoch)].append(p)
        self._wait_while_unconfirmed(list(by_shard))
        writes: list[ShardWrite] = []
        now = self.store.clock()
        for (shard, epoch), items in by_shard.items():
            chain = self.store.chain_for_commit(shard, epoch)
            if chain is None:
                for p in items:
                    p.done.set()  # not ok: the shard is no longer ours at this epoch
                continue
            for p in items:
                p.entry = chain.append(p.kind, p.key, p.body)
            rows = [row for p in items for row in p.index_rows]
            writes.append(ShardWrite(shard, epoch, now, [p.entry for p in items if p.entry], rows))
        if not writes:
            return
        started = time.monotonic()
        try:
            with telemetry.span("ledger.commit", shards=len(writes)):
                acked = self.ledger.commit(writes)
        except Exception:
            log.warning("group commit of %d shards failed", len(writes), exc_info=True)
            acked = {}
        self.commits += 1
        telemetry.metrics.commit(sum(len(w.entries) for w in writes), time.monotonic() - started)
        for w in writes:
            ok = acked.get(w.shard, False)
            for p in by_shard[(w.shard, w.epoch)]:
                p.ok = ok
                p.done.set()
            if ok:
                self.entries += len(w.entries)
            else:
                self.store.fail(w.shard, w.epoch)
        for w in writes:
            if acked.get(w.shard, False):
                # Acknowledged: its index rows may be written (a listing never names a
                # payment the ledger does not hold). Never waits: the ledger must not
                # stall for its index (a full queue drops, the next owner re-indexes).
                first, last = w.entries[0].seq, w.entries[-1].seq
                self.store.indexer.add(w.shard, w.epoch, first, last, w.index_rows, wait_s=0.0)

    def _wait_while_unconfirmed(self, shards: list[tuple[int, int]]) -> None:
        """Hold the batch while the node's lease is suspended (one lease: every shard of
        the node waits alike), so that entries not yet written are written once it is
        confirmed instead of failing their shards, which would then move."""
        deadline = time.monotonic() + UNCONFIRMED_COMMIT_WAIT_S
        while (
            any(self.store.unconfirmed(s, e) for s, e in shards)
            and time.monotonic() < deadline
            and not self._stop.is_set()
        ):
            self._stop.wait(UNCONFIRMED_COMMIT_POLL_S)


def _live(st: _Shard) -> bool:
    return st.serving.is_set() and not st.dropped and not st.broken


def _not_owner(shard: int) -> Unavailable:
    return Unavailable(
        f"this node no longer owns shard {shard}",
        retry_after_ms=200,
        reason=Unavailable.NOT_SHARD_OWNER,
    )


def _cap_exceeded(participant_id: str, currency: str, detail: str) -> InsufficientLiquidity:
    return InsufficientLiquidity(
        f"{participant_id} would exceed its net debit cap in {currency} ({detail})",
        reason=InsufficientLiquidity.NET_DEBIT_CAP_EXCEEDED,
    )


_T = TypeVar("_T")


def map_shards(read: Callable[[int], _T], shards: Iterable[int]) -> Generator[_T, None, None]:
    """``read(shard)`` for each shard, in the order given, with at most
    :data:`SHARD_READS_IN_FLIGHT` reads started and not yet consumed: a reader of the
    whole ledger holds a few chains at a time, not all of them, and sees the shards'
    results (and failures) in order. A read that raised raises here when its turn comes,
    once the few reads started after it have ended. A caller that may stop before the
    end closes the generator (``contextlib.closing``), so that its reads end there too.

    Reading the whole ledger is one chain per shard, each a few sequential queries: one
    after another, a clearing under load spent most of its time waiting on them."""
    todo = iter(shards)
    with ThreadPoolExecutor(
        max_workers=SHARD_READS_IN_FLIGHT, thread_name_prefix="shard-read"
    ) as pool:
        started = deque(pool.submit(read, s) for s in islice(todo, SHARD_READS_IN_FLIGHT))
        while started:
            result = started.popleft().result()
            for s in islice(todo, 1):
                started.append(pool.submit(read, s))
            yield result


def read_chain(
    ledger: ChainReader, shard: int, below_epoch: int | None = None, *, verify: bool = True
) -> tuple[list[LedgerEntry], int]:
    """The shard's chain as its seals define it, verified; and the newest sealed epoch.

    Follows ``prev_epoch`` from the newest seal (below ``below_epoch``, if given) back to
    the first; each epoch's part runs from its seal's start to the next seal's start
    (the last part: as far as its entries are contiguous). Raises InvariantViolation if
    the chain does not verify: an owner must not build on a broken chain.
    """
    segments = _sealed_segments(ledger, shard, below_epoch)
    entries = _read_segments(
        ledger, shard, segments, (0, GENESIS_HASH), through_seq=None, start_at=None, verify=verify
    )
    return entries, (segments[-1].epoch if segments else 0)


def _sealed_segments(ledger: ChainReader, shard: int, below_epoch: int | None) -> list[Seal]:
    """The seals that make the shard's chain, oldest first: ``prev_epoch`` followed from
    the newest seal (below ``below_epoch``, if given) back to the first."""
    seals = {
        s.epoch: s for s in ledger.seals(shard) if below_epoch is None or s.epoch < below_epoch
    }
    segments: list[Seal] = []
    cur = seals.get(max(seals)) if seals else None
    while cur is not None:
        segments.insert(0, cur)
        if cur.prev_epoch == 0:
            break
        prev = seals.get(cur.prev_epoch)
        invariant(prev is not None, f"shard {shard}: seal {cur.epoch} names a missing epoch")
        cur = prev
    return segments


def read_chain_part(
    ledger: ChainReader,
    shard: int,
    after: tuple[int, bytes],
    through_seq: int,
    *,
    start_at: tuple[int, int] | None = None,
    verify: bool = True,
) -> list[LedgerEntry]:
    """The entries of the shard's chain (as its seals define it) after ``after`` =
    (seq, entry hash) up to ``through_seq``, verified to link on from that hash (seq 0
    and GENESIS_HASH: from the chain's start). A window's part of a chain, read without
    the chain before it: ``after`` is the previous window's recorded cut.

    ``start_at`` = (epoch, block): where the entry at ``after`` is stored, if known (the
    cut's recorded block); that epoch's entries are read from that block of its stream
    on, instead of from the epoch's first block. Raises InvariantViolation if the part
    does not verify (``verify=False``: the rows as read, for comparing replicas)."""
    segments = _sealed_segments(ledger, shard, None)
    return _read_segments(
        ledger, shard, segments, after, through_seq=through_seq, start_at=start_at, verify=verify
    )


def _read_segments(
    ledger: ChainReader,
    shard: int,
    segments: list[Seal],
    after: tuple[int, bytes],
    *,
    through_seq: int | None,
    start_at: tuple[int, int] | None,
    verify: bool,
) -> list[LedgerEntry]:
    """The entries of ``segments`` after ``after`` = (seq, hash) up to ``through_seq``
    (None: as far as the last part's entries are contiguous); each part ends where the
    next owner's seal begins. Verified to link on from ``after``'s hash unless
    ``verify`` is False (comparisons of replicas read rows without trusting them)."""
    after_seq, after_hash = after
    entries: list[LedgerEntry] = []
    for i, seg in enumerate(segments):
        seg_end = segments[i + 1].start_seq - 1 if i + 1 < len(segments) else None
        lo = max(after_seq + 1, seg.start_seq)
        ends = [end for end in (seg_end, through_seq) if end is not None]
        hi = min(ends) if ends else None
        if hi is not None and lo > hi:
            continue
        block = start_at[1] if start_at is not None and start_at[0] == seg.epoch else None
        part = ledger.entries(shard, seg.epoch, lo, hi, from_block=block)
        invariant(
            seg_end is None or hi != seg_end or (part[-1].seq if part else lo - 1) == hi,
            f"shard {shard}: epoch {seg.epoch} ends before its successor's seal",
        )
        entries += part
    if verify:
        report = verify_chain(entries, after_seq + 1, after_hash, shard=shard)
        why = f"shard {shard}: chain broken at {report.broken_seq}: {report.detail}"
        invariant(report.ok, why)
    return entries


def _intent_of(rec: PaymentRecord) -> Intent:
    return Intent(
        canonical_bytes(rec.order), rec.fingerprint, rec.bank_id, rec.received_zone,
        rec.received_at_us, rec.switch_ref, rec.order.signing_key_id, rec.order.signature,
    )  # fmt: skip


def _record_of_intent(body: bytes, shard: int, seq: int, owner_epoch: int) -> PaymentRecord:
    """A payment's record as its INTENT entry's ``body`` left it."""
    intent = Intent.decode(body)
    order = order_from_canonical_bytes(
        intent.order_bytes, signature=intent.signature, signing_key_id=intent.signing_key_id
    )
    return _intent_record(order, intent, shard, seq, owner_epoch=owner_epoch)


def _decided_step(d: Decision) -> StepRecord:
    return StepRecord(STEP_DECIDED, PaymentEvent(d.state, d.at_us, d.zone, d.detail), d.bank_ref)


def _intent_record(
    order: PaymentOrder, intent: Intent, shard: int, seq: int, owner_epoch: int = 0
) -> PaymentRecord:
    at, zone = intent.received_at_us, intent.zone
    received = PaymentEvent(PaymentState.RECEIVED, at, zone, "")
    routed = PaymentEvent(PaymentState.ROUTED, at, zone, f"to {intent.bank_id}")
    return PaymentRecord(
        order=order,
        fingerprint=intent.fingerprint,
        shard=shard,
        switch_ref=intent.switch_ref,
        bank_id=intent.bank_id,
        received_zone=zone,
        steps=(StepRecord(STEP_RECEIVED, received), StepRecord(STEP_ROUTED, routed)),
        ledger_seq=seq,
        owner_epoch=owner_epoch,
    )


__all__ = [
    "CAP_IDLE_CHECK_S",
    "CAP_IDLE_GIVE_BACK_S",
    "COMMIT_ENTRIES_MAX",
    "Borrow",
    "Committer",
    "ReceivedBefore",
    "Repay",
    "ShardedStore",
    "home_shard",
    "loan_minor",
    "map_shards",
    "read_chain",
    "read_chain_part",
]
