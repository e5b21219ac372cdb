"""One node's ownership logic without I/O: it asks for requests and is told their results.

:class:`NodeCore` is the whole behaviour of a node except talking to etcd. The real agent
(:mod:`.etcd_backend`) executes its requests with gRPC; the simulator
(:mod:`.simulator`) delivers them through a fake network to a fake etcd. Both run this
same code, so the simulation tests what production runs.

A step (:meth:`NodeCore.step`) does, in order: once the lease's local deadline has
passed, own nothing and wait (suspended, below), then drop everything; get a lease and
register under it; align the holdings with the view; then act on
:func:`~.protocol.decide` (release by giving up locally first, claim in one batch) and
delete zombie keys. Events (:class:`Gained`, :class:`Lost`) are returned for the caller
to report *before* it sends the requests, so a shard is never reported held after its
key was deleted.

**Suspended, not lost.** A lease whose keepalives go unanswered past its local deadline
may still be alive in etcd: while etcd elects a new leader (2-4 s with a 2 s election
timeout) no keepalive is answered, and the new leader extends every lease. So for
:attr:`Timing.suspend_s` after the deadline the node keeps its lease and its holdings
but owns nothing (:meth:`NodeCore.owned` is empty: no write is fenced in), and its
keepalives go on. A keepalive answered with a live TTL proves the lease never expired
(etcd never brings an expired lease back), so no other node can have claimed its keys:
the node owns the same shards at the same epochs again, with no takeover. An answer that
the lease is gone, or no answer by the end of the suspension, drops everything as
before. Suspension never delays another node: the shards of a lease that did expire are
free in etcd whatever this node believes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from clearinghouse._invariant import invariant
from clearinghouse.ownership.holdings import Holdings, LeaseClock
from clearinghouse.ownership.placement import NodeInfo
from clearinghouse.ownership.protocol import DEFAULT_CONFIG, Claim, ProtocolConfig, decide
from clearinghouse.ownership.view import View


@dataclass(frozen=True, slots=True)
class GrantLease:
    ttl_s: int


@dataclass(frozen=True, slots=True)
class Register:
    lease: int


@dataclass(frozen=True, slots=True)
class ClaimShards:
    """For each shard: create its key with my id under ``lease`` if the key is absent."""

    lease: int
    shards: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class DeleteClaim:
    """Delete the shard's key only if it is still my key created at ``epoch``."""

    shard: int
    epoch: int


@dataclass(frozen=True, slots=True)
class RevokeLease:
    """Best effort: frees the shards of a lease this node stopped trusting."""

    lease: int


Request = GrantLease | Register | ClaimShards | DeleteClaim | RevokeLease


@dataclass(frozen=True, slots=True)
class Gained:
    shard: int
    epoch: int


@dataclass(frozen=True, slots=True)
class Lost:
    shard: int


Event = Gained | Lost


@dataclass(frozen=True, slots=True)
class Step:
    requests: list[Request] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)


# -- the time budget, in seconds of a node's monotonic clock ----------------------------

LEASE_TTL_S = 5
# Keepalives per TTL: one or two may be lost before the local deadline is in danger.
KEEPALIVES_PER_TTL = 3
# How long past its local deadline a lease is held suspended (owning nothing) waiting
# for a keepalive answer, in TTLs: an etcd leader election must fit in the slack before
# the deadline (TTL - margin - keepalive interval, 2.3 s at the default TTL) plus this.
SUSPEND_TTLS = 1
KEEPALIVE_INTERVAL_S = LEASE_TTL_S / KEEPALIVES_PER_TTL
# How long a keepalive may wait for its answer before the agent tries the next etcd
# member (Timing.member_silent_s; at most one keepalive interval). etcd answers in
# milliseconds. A leader election leaves every member silent for 2-4 s and makes a node
# move once or twice meanwhile, which costs a connection and a re-listing each: no move
# is held back, since the member moved to may be the frozen one.
MEMBER_ANSWER_WAIT_S = 1.0
# Unanswered keepalives on one stream before it stops sending (the stream is stuck).
KEEPALIVE_INFLIGHT_MAX = 4
# The local deadline ends this fraction of the TTL before etcd's earliest expiry: room
# for clock-rate differences and for the work a caller does after checking ownership.
SAFETY_MARGIN_FRACTION = 0.2
# Release grace, in lease TTLs: protocol.RELEASE_GRACE_S is this for the default TTL.
RELEASE_GRACE_TTLS = 2
# Join settling, in lease TTLs: protocol.JOIN_SETTLE_S and JOIN_SETTLE_MAX_S for the
# default TTL.
JOIN_SETTLE_TTLS = 1
JOIN_SETTLE_MAX_TTLS = 3
LOOP_INTERVAL_S = 0.1
RPC_TIMEOUT_S = 1.0
WATCH_RETRY_S = 0.5


@dataclass(frozen=True, slots=True)
class Timing:
    """What the core needs of the time budget."""

    lease_ttl_s: int
    safety_margin_s: float
    rpc_timeout_s: float = RPC_TIMEOUT_S
    # Past the local deadline, how long the lease is held suspended (0: dropped at once).
    suspend_s: float = float(SUSPEND_TTLS * LEASE_TTL_S)

    @classmethod
    def for_ttl(cls, lease_ttl_s: int) -> Timing:
        return cls(
            lease_ttl_s,
            lease_ttl_s * SAFETY_MARGIN_FRACTION,
            suspend_s=float(SUSPEND_TTLS * lease_ttl_s),
        )

    @property
    def keepalive_interval_s(self) -> float:
        return self.lease_ttl_s / KEEPALIVES_PER_TTL

    @property
    def member_silent_s(self) -> float:
        """How long a keepalive may wait for its answer before the agent moves to the
        next etcd member. A frozen member forwards nothing to the leader, so etcd lets
        the lease expire one TTL after the last renewal that reached it: the move must
        leave time to renew through another member. The oldest unanswered keepalive was
        sent at most one interval after the last answered one, and the agent's loop may
        be inside one etcd request (``rpc_timeout_s``) when the wait runs out, so the
        move comes at most an interval + this + ``rpc_timeout_s`` + a loop step after
        the last renewal (3.8 s of the default 5 s TTL; :meth:`member_moved_by_s`)."""
        return min(MEMBER_ANSWER_WAIT_S, self.keepalive_interval_s)

    @property
    def member_moved_by_s(self) -> float:
        """The latest a node leaves a silent member, after its last renewal."""
        return (
            self.keepalive_interval_s + self.member_silent_s + self.rpc_timeout_s
            + LOOP_INTERVAL_S
        )  # fmt: skip


def protocol_for_ttl(lease_ttl_s: int) -> ProtocolConfig:
    """The default protocol settings for a lease TTL (the grace and the join settling
    scale with it)."""
    return ProtocolConfig(
        release_grace_s=float(RELEASE_GRACE_TTLS * lease_ttl_s),
        join_settle_s=float(JOIN_SETTLE_TTLS * lease_ttl_s),
        join_settle_max_s=float(JOIN_SETTLE_MAX_TTLS * lease_ttl_s),
    )


class NodeCore:
    """The ownership state machine of one node; not thread-safe (callers hold a lock)."""

    def __init__(
        self,
        info: NodeInfo,
        view: View,
        timing: Timing,
        config: ProtocolConfig = DEFAULT_CONFIG,
    ) -> None:
        self.info = info
        self.view = view
        self.timing = timing
        self.config = config
        self.clock = LeaseClock(float(timing.lease_ttl_s), timing.safety_margin_s)
        self.holdings = Holdings(info.node_id)
        self.registered = False
        # Requests in flight, by kind, with their send time: one of each at a time, and
        # forgotten after the RPC timeout so a lost answer does not block the node.
        self._pending: dict[object, float] = {}
        self._deleted: set[tuple[int, int]] = set()
        self._registration_revision: int | None = None
        # Leases this node will not use (lost, or granted twice): revoked at the next step.
        self._to_revoke: list[int] = []
        # When the current suspension ends, fixed by the first step past the deadline:
        # late answers that move the deadline but not past the clock do not prolong it.
        self._suspension_ends: float | None = None

    @property
    def me(self) -> str:
        return self.info.node_id

    @property
    def lease(self) -> int:
        return self.holdings.lease

    def valid(self, now: float) -> bool:
        return self.holdings.lease != 0 and self.clock.valid(now)

    def suspended(self, now: float) -> bool:
        """Past the lease's local deadline, still waiting to hear whether it lives."""
        return (
            self.holdings.lease != 0 and not self.clock.valid(now) and now < self._suspension_end()
        )

    def _suspension_end(self) -> float:
        if self._suspension_ends is not None:
            return self._suspension_ends
        return self.clock.deadline + self.timing.suspend_s

    def owned(self, now: float) -> dict[int, int]:
        """Shards held at ``now`` with their epochs; nothing once the deadline passed."""
        return self.holdings.held() if self.valid(now) else {}

    def epoch_if_owner(self, shard: int, now: float) -> int | None:
        return self.holdings.epoch(shard) if self.valid(now) else None

    # -- the step -------------------------------------------------------------------

    def step(self, now: float) -> Step:
        out = Step()
        self._expire_pending(now)
        if self.holdings.lease != 0 and self.clock.valid(now):
            self._suspension_ends = None  # confirmed: a later suspension starts afresh
        elif self.holdings.lease != 0:
            self._suspension_ends = self._suspension_end()  # fixed from now on
            if not self.suspended(now):
                self._to_revoke.append(self.holdings.lease)
                out.events.extend(self._lose_lease())
        out.requests.extend(RevokeLease(lease) for lease in self._to_revoke)
        self._to_revoke.clear()
        if self.suspended(now):
            return out  # own nothing, keep everything: a keepalive answer decides (above)
        if self.holdings.lease == 0:
            if self._start("grant", now):
                out.requests.append(GrantLease(self.timing.lease_ttl_s))
            return out
        if not self.registered or self._registration_vanished():
            self.registered = False
            if self._start("register", now):
                out.requests.append(Register(self.holdings.lease))
            return out
        if self.view.synced:
            self._act(now, out)
        return out

    def _act(self, now: float, out: Step) -> None:
        change = self.holdings.reconcile(self.view.claims, self.view.revision)
        out.events.extend(Lost(s) for s in change.lost)
        out.events.extend(Gained(s, e) for s, e in change.gained)
        claims = self.holdings.overlay(self.view.claims)
        actions = decide(self.me, self.view.members(), claims, now, self.config)
        to_claim = tuple(a.shard for a in actions if isinstance(a, Claim))
        for a in actions:
            # Giving up comes first: the key is deleted below, as a zombie, only after.
            if not isinstance(a, Claim) and self.holdings.give_up(a.shard) is not None:
                out.events.append(Lost(a.shard))
        if to_claim and self._start("claim", now):
            out.requests.append(ClaimShards(self.holdings.lease, to_claim))
        for shard, epoch in self.holdings.zombies(self.view.claims):
            if (shard, epoch) not in self._deleted and self._start(("delete", shard, epoch), now):
                out.requests.append(DeleteClaim(shard, epoch))

    def _registration_vanished(self) -> bool:
        # The view has caught up past our registration and does not show it: put it back
        # (an operator deleted it). While the lease lives, the shards stay held.
        reg = self._registration_revision
        return (
            reg is not None
            and self.view.synced
            and self.view.revision > reg
            and self.view.address(self.me) is None
        )

    # -- results --------------------------------------------------------------------

    def on_granted(self, lease: int, ttl_s: float, sent_at: float) -> None:
        self._pending.pop("grant", None)
        if self.holdings.lease != 0:
            # A late answer to a grant that had timed out: one lease is enough.
            self._to_revoke.append(lease)
            return
        invariant(ttl_s > 0, "etcd grants leases with a positive TTL")
        self.holdings.start_lease(lease)
        self.clock.expire()
        self.clock.on_ack(sent_at, ttl_s)
        self.registered = False

    def on_registered(self, lease: int, revision: int) -> None:
        self._pending.pop("register", None)
        if lease == self.holdings.lease:
            self.registered = True
            self._registration_revision = revision

    def on_keepalive(self, lease: int, sent_at: float, ttl_s: float) -> list[Event]:
        """A keepalive sent at ``sent_at`` was answered; ``ttl_s <= 0``: the lease is gone."""
        if lease != self.holdings.lease or lease == 0:
            return []
        if ttl_s <= 0:
            return self._lose_lease()
        # Also ends a suspension if the new deadline is ahead: the lease never expired.
        self.clock.on_ack(sent_at, ttl_s)
        return []

    def on_claimed(self, lease: int, won: list[tuple[int, int]], now: float) -> list[Event]:
        """The claim batch ran: ``won`` are the (shard, epoch) whose keys it created."""
        self._pending.pop("claim", None)
        if lease != self.holdings.lease or not self.clock.valid(now):
            return []  # those keys are zombies now: deleted by a later step or expired
        return [Gained(s, e) for s, e in won if self.holdings.gain(s, e)]

    def on_deleted(self, shard: int, epoch: int, deleted: bool) -> None:
        self._pending.pop(("delete", shard, epoch), None)
        if deleted:
            self._deleted.add((shard, epoch))

    def shutdown(self) -> list[Event]:
        """The process stops: it owns nothing from now on (its lease may live on)."""
        return self._lose_lease()

    def on_failed(self, request: Request) -> None:
        """The request got no answer (error or timeout): it may be sent again."""
        self._pending.pop(_pending_key(request), None)

    # -- helpers --------------------------------------------------------------------

    def _lose_lease(self) -> list[Event]:
        lost = self.holdings.lose_all()
        self.clock.expire()
        self._suspension_ends = None
        self.registered = False
        self._registration_revision = None
        self._pending = {k: t for k, t in self._pending.items() if k == "grant"}
        # A deleted key of the old lease can no longer matter; keep the set small.
        self._deleted.clear()
        return [Lost(s) for s in lost]

    def _start(self, kind: object, now: float) -> bool:
        if kind in self._pending:
            return False
        self._pending[kind] = now
        return True

    def _expire_pending(self, now: float) -> None:
        timeout = self.timing.rpc_timeout_s
        self._pending = {k: t for k, t in self._pending.items() if now - t < timeout}
        # Keys confirmed deleted stop mattering once the view no longer shows them.
        self._deleted = {
            (s, e) for s, e in self._deleted if (c := self.view.claims.get(s)) and c.epoch == e
        }


def _pending_key(request: Request) -> object:
    if isinstance(request, GrantLease):
        return "grant"
    if isinstance(request, Register):
        return "register"
    if isinstance(request, ClaimShards):
        return "claim"
    if isinstance(request, DeleteClaim):
        return ("delete", request.shard, request.epoch)
    return ("revoke", request.lease)
