"""A deterministic simulation of shard ownership: fake clock, fake etcd, fake network.

Every node runs the production :class:`~.node.NodeCore` against:

* :class:`FakeEtcd` - revisions, create_revision, leases with TTLs that a lessor expires
  on its own tick (never early, like etcd), a claim batch that creates absent keys in
  one revision, conditional deletes, and a watch that streams every change in order.
* a network that delays every message (FIFO per node and direction, like one HTTP/2
  connection), and that can slow down, drop messages of, or partition one node. A lost
  keepalive or watch message breaks its stream: the node opens a new one, or re-lists.
* processes that can be killed (a crash: the lease expires on its own), restarted, or
  paused like SIGSTOP: a paused node handles nothing; on resume it first handles what
  arrived meanwhile with its clock still frozen at the pause, then reads the clock again.
* etcd losing its leader (:meth:`Simulation.elect`): until a new one is elected nothing
  that needs the leader is answered (requests, keepalives, listings are lost) and no
  lease expires; the new leader extends every lease by a TTL from its election, as
  etcd's lessor does when it is promoted.

After every event that changes anything, the simulation checks its properties and
raises :class:`~clearinghouse.InvariantViolation` with the seed and the time:

* exclusive: a node that believes (at the real time) it owns a shard at an epoch holds
  etcd's current key of that shard, created at that epoch under the node's lease - so
  at most one node believes it owns a shard at any time;
* epochs grow: the epochs of valid beliefs about a shard never go down, and a node
  never reports a shard gained at an epoch at or below one it reported before;
* liveness: once no fault has happened for ``TTL + grace + settle_bound_s`` and one
  node is healthy, every shard has a valid owner;
* convergence (:meth:`Simulation.check_converged`): the owners are placement's answer.

The same seed replays the same run: every choice comes from one seeded generator, and
the run is recorded in :attr:`Simulation.trace`.
"""

from __future__ import annotations

import heapq
import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from clearinghouse._invariant import invariant
from clearinghouse.ownership import placement
from clearinghouse.ownership.node import (
    KEEPALIVE_INFLIGHT_MAX,
    KEEPALIVE_INTERVAL_S,
    LEASE_TTL_S,
    LOOP_INTERVAL_S,
    WATCH_RETRY_S,
    ClaimShards,
    DeleteClaim,
    Event,
    Gained,
    GrantLease,
    NodeCore,
    Register,
    Request,
    Timing,
)
from clearinghouse.ownership.placement import NodeInfo
from clearinghouse.ownership.protocol import ProtocolConfig
from clearinghouse.ownership.view import (
    KEY_PREFIX,
    KeyRecord,
    View,
    encode_member,
    node_key,
    shard_key,
)

# Events one simulation may process: more means something reschedules itself forever.
EVENTS_PER_RUN_MAX = 2_000_000

ZONES = (
    NodeInfo("beijing-a", "beijing-a", "beijing"),
    NodeInfo("beijing-b", "beijing-b", "beijing"),
    NodeInfo("shanghai-a", "shanghai-a", "shanghai"),
    NodeInfo("shanghai-b", "shanghai-b", "shanghai"),
    NodeInfo("shenzhen-a", "shenzhen-a", "shenzhen"),
    NodeInfo("shenzhen-b", "shenzhen-b", "shenzhen"),
)


_PRODUCTION = Timing.for_ttl(LEASE_TTL_S)


@dataclass(frozen=True, slots=True)
class SimConfig:
    """Times in simulated seconds; the defaults are production's time budget."""

    lease_ttl_s: int = _PRODUCTION.lease_ttl_s
    safety_margin_s: float = _PRODUCTION.safety_margin_s
    keepalive_interval_s: float = KEEPALIVE_INTERVAL_S
    loop_interval_s: float = LOOP_INTERVAL_S
    rpc_timeout_s: float = _PRODUCTION.rpc_timeout_s
    suspend_s: float = _PRODUCTION.suspend_s
    watch_retry_s: float = WATCH_RETRY_S
    # etcd's lessor looks for expired leases every 500 ms.
    lessor_tick_s: float = 0.5
    net_delay_min_s: float = 0.0005
    net_delay_max_s: float = 0.02
    # Beyond TTL and grace, how long a membership change may take to settle.
    settle_bound_s: float = 3.0
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)

    @property
    def calm_window_s(self) -> float:
        return self.lease_ttl_s + self.protocol.release_grace_s + self.settle_bound_s


@dataclass(frozen=True, slots=True)
class TraceEntry:
    t: float
    node: str
    kind: str
    detail: str


# -- etcd -------------------------------------------------------------------------------


@dataclass(slots=True)
class _Lease:
    ttl_s: int
    expiry: float


class FakeEtcd:
    """A single linearizable etcd: the parts of its API the ownership layer uses."""

    def __init__(self, on_change: Callable[[int, str, KeyRecord | None], None]) -> None:
        self.revision = 1
        self.kv: dict[str, KeyRecord] = {}
        self.leases: dict[int, _Lease] = {}
        self._next_lease = 0x7E57_0000
        self._on_change = on_change

    def grant(self, now: float, ttl_s: int) -> int:
        self._next_lease += 1
        self.leases[self._next_lease] = _Lease(ttl_s, now + ttl_s)
        return self._next_lease

    def keepalive(self, now: float, lease: int) -> int:
        """The TTL after renewal, 0 if the lease does not exist (etcd's answer)."""
        held = self.leases.get(lease)
        if held is None:
            return 0
        held.expiry = now + held.ttl_s
        return held.ttl_s

    def revoke(self, lease: int) -> None:
        if self.leases.pop(lease, None) is not None:
            doomed = [k for k, r in self.kv.items() if r.lease == lease]
            self._commit([(k, None) for k in doomed])

    def expire(self, now: float) -> None:
        for lease in [lid for lid, held in self.leases.items() if held.expiry <= now]:
            self.revoke(lease)

    def promote(self, now: float) -> None:
        """A new leader: every lease lives at least a TTL from now (etcd's lessor
        ``Promote``; it adds the election timeout too, which only helps)."""
        for held in self.leases.values():
            held.expiry = max(held.expiry, now + held.ttl_s)

    def put(self, key: str, value: bytes, lease: int) -> int | None:
        """The revision of the put, ``None`` if the lease does not exist."""
        if lease not in self.leases:
            return None
        old = self.kv.get(key)
        create = old.create_revision if old else self.revision + 1
        self._commit([(key, KeyRecord(key, value, create, lease))])
        return self.revision

    def create_absent(self, keys: Sequence[str], value: bytes, lease: int) -> list[str] | None:
        """One transaction: every absent key created at one revision; ``None``: no lease."""
        if lease not in self.leases:
            return None
        new = [k for k in keys if k not in self.kv]
        rev = self.revision + 1
        self._commit([(k, KeyRecord(k, value, rev, lease)) for k in new])
        return new

    def delete_if(self, key: str, value: bytes, create_revision: int) -> bool:
        old = self.kv.get(key)
        if old is None or old.value != value or old.create_revision != create_revision:
            return False
        self._commit([(key, None)])
        return True

    def listing(self) -> tuple[int, list[KeyRecord]]:
        return self.revision, [self.kv[k] for k in sorted(self.kv)]

    def _commit(self, changes: list[tuple[str, KeyRecord | None]]) -> None:
        if not changes:
            return
        self.revision += 1
        for key, record in changes:
            if record is None:
                del self.kv[key]
            else:
                self.kv[key] = record
        for key, record in changes:
            self._on_change(self.revision, key, record)


# -- nodes ------------------------------------------------------------------------------


@dataclass(slots=True)
class _Faults:
    partitioned_until: float = 0.0
    slow_until: float = 0.0
    slow_extra_s: float = 0.0
    lossy_until: float = 0.0
    loss: float = 0.0


class SimNode:
    """A switch process: a NodeCore, its view, its streams, and the process's fate."""

    def __init__(self, sim: Simulation, info: NodeInfo) -> None:
        self.sim = sim
        self.info = info
        self.up = False
        self.incarnation = 0
        self.paused_at: float | None = None
        self.inbox: list[Callable[[], None]] = []
        self.faults = _Faults()
        self._fresh_process()

    def _fresh_process(self) -> None:
        cfg = self.sim.config
        timing = Timing(cfg.lease_ttl_s, cfg.safety_margin_s, cfg.rpc_timeout_s, cfg.suspend_s)
        self.view = View(KEY_PREFIX)
        self.core = NodeCore(self.info, self.view, timing, cfg.protocol)
        self.stream = 0
        self.keepalives: deque[float] = deque()
        self.watching = False
        self.watch_id = 0
        self.sync_sent_at = -1e9
        self.reported: dict[int, int] = {}

    @property
    def node_id(self) -> str:
        return self.info.node_id

    @property
    def healthy(self) -> bool:
        f = self.faults
        now = self.sim.now
        return (
            self.up
            and self.paused_at is None
            and now >= f.partitioned_until
            and now >= f.lossy_until
            and now >= f.slow_until
        )

    def local_now(self) -> float:
        return self.paused_at if self.paused_at is not None else self.sim.now

    # -- process lifecycle ----------------------------------------------------------

    def start(self) -> None:
        invariant(not self.up, f"{self.node_id} is already running")
        self.up = True
        self.incarnation += 1
        self.paused_at = None
        self.inbox.clear()
        self._fresh_process()
        self.sim.schedule(0.0, self._guard(self._tick))
        self.sim.schedule(0.0, self._guard(self._keepalive_tick))

    def kill(self) -> None:
        self.up = False
        self.paused_at = None
        self.inbox.clear()
        self.sim.etcd_unwatch(self)

    def pause(self) -> None:
        if self.up and self.paused_at is None:
            self.paused_at = self.sim.now

    def resume(self) -> None:
        if self.paused_at is None:
            return
        # Handle what arrived meanwhile with the clock still frozen, as a process does
        # that was stopped between reading the clock and using it.
        backlog, self.inbox = self.inbox, []
        for handle in backlog:
            handle()
        self.paused_at = None

    def deliver(self, handle: Callable[[], None], incarnation: int) -> None:
        if not self.up or incarnation != self.incarnation:
            return  # the process that asked is gone
        if self.paused_at is not None:
            self.inbox.append(handle)
        else:
            handle()

    def _guard(self, fn: Callable[[], None]) -> Callable[[], None]:
        incarnation = self.incarnation

        def run() -> None:
            if self.up and incarnation == self.incarnation:
                fn()

        return run

    # -- periodic work --------------------------------------------------------------

    def _tick(self) -> None:
        self.sim.schedule(self.sim.config.loop_interval_s, self._guard(self._tick))
        if self.paused_at is not None:
            return
        now = self.local_now()
        if not self.watching and now - self.sync_sent_at >= self.sim.config.watch_retry_s:
            self.sync_sent_at = now
            self.sim.send_sync(self)
        step = self.core.step(now)
        self.report(step.events)
        for request in step.requests:
            self.sim.send_request(self, request, now)

    def _keepalive_tick(self) -> None:
        self.sim.schedule(self.sim.config.keepalive_interval_s, self._guard(self._keepalive_tick))
        lease = self.core.lease
        if self.paused_at is not None or lease == 0:
            return
        if len(self.keepalives) < KEEPALIVE_INFLIGHT_MAX:
            self.keepalives.append(self.local_now())
            self.sim.send_keepalive(self, lease, self.stream)

    # -- answers --------------------------------------------------------------------

    def on_keepalive(self, lease: int, stream: int, ttl_s: int) -> None:
        if stream != self.stream or not self.keepalives:
            return
        sent_at = self.keepalives.popleft()
        self.report(self.core.on_keepalive(lease, sent_at, ttl_s))
        self.sim.touch()

    def break_keepalive_stream(self) -> None:
        self.stream += 1
        self.keepalives.clear()

    def break_watch(self) -> None:
        self.watching = False
        self.view.unsync()

    def report(self, events: list[Event]) -> None:
        for e in events:
            if isinstance(e, Gained):
                last = self.reported.get(e.shard, 0)
                invariant(
                    e.epoch > last,
                    self.sim.where(f"{self.node_id} gained {e.shard} at {e.epoch} after {last}"),
                )
                self.reported[e.shard] = e.epoch
                self.sim.record(self.node_id, "gained", f"{e.shard}@{e.epoch}")
            else:
                self.sim.record(self.node_id, "lost", str(e.shard))
        if events:
            self.sim.touch()


# -- the world --------------------------------------------------------------------------


class Simulation:
    """Nodes, etcd and the network on one simulated clock, driven by one seed."""

    def __init__(
        self,
        seed: int,
        config: SimConfig | None = None,
        zones: Sequence[NodeInfo] = ZONES,
    ) -> None:
        self.seed = seed
        self.config = config or SimConfig()
        self.rng = random.Random(seed)
        self.now = 0.0
        self.trace: list[TraceEntry] = []
        self.last_fault_at = 0.0
        # etcd has no leader until then (see elect).
        self.leaderless_until = 0.0
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0
        self._events = 0
        self._dirty = False
        self._link_free_at: dict[tuple[str, str], float] = {}
        self._watchers: dict[str, tuple[int, int]] = {}
        self._valid_epoch: dict[int, int] = {}
        self._shard_keys = [
            shard_key(KEY_PREFIX, s) for s in range(self.config.protocol.shard_count)
        ]
        self.etcd = FakeEtcd(self._on_etcd_change)
        self.nodes = {z.node_id: SimNode(self, z) for z in zones}
        self.schedule(0.0, self._lessor_tick)
        self.schedule(0.0, self._check_tick)

    # -- driving --------------------------------------------------------------------

    def schedule(self, delay_s: float, fn: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (self.now + delay_s, self._seq, fn))

    def run_until(self, t: float) -> None:
        while self._queue and self._queue[0][0] <= t:
            at, _, fn = heapq.heappop(self._queue)
            self.now = at
            fn()
            self._events += 1
            invariant(self._events < EVENTS_PER_RUN_MAX, self.where("too many events"))
            if self._dirty:
                self._dirty = False
                self.check_exclusive()
        self.now = max(self.now, t)

    def run_for(self, duration_s: float) -> None:
        self.run_until(self.now + duration_s)

    def touch(self) -> None:
        self._dirty = True

    def record(self, node: str, kind: str, detail: str = "") -> None:
        self.trace.append(TraceEntry(round(self.now, 6), node, kind, detail))

    def where(self, message: str) -> str:
        return f"seed {self.seed}, t={self.now:.4f}: {message}"

    # -- faults ---------------------------------------------------------------------

    def start(self, node_id: str) -> None:
        self._fault(node_id, "start")
        self.nodes[node_id].start()

    def kill(self, node_id: str) -> None:
        self._fault(node_id, "kill")
        self.nodes[node_id].kill()

    def pause(self, node_id: str, duration_s: float) -> None:
        node = self.nodes[node_id]
        if not node.up or node.paused_at is not None:
            return
        self._fault(node_id, "pause", duration_s)
        node.pause()
        incarnation = node.incarnation

        def resume() -> None:
            if node.incarnation == incarnation:
                self.record(node_id, "resume")
                node.resume()
                self.touch()

        self.schedule(duration_s, resume)

    def partition(self, node_id: str, duration_s: float) -> None:
        self._fault(node_id, "partition", duration_s)
        f = self.nodes[node_id].faults
        f.partitioned_until = max(f.partitioned_until, self.now + duration_s)

    def slow(self, node_id: str, extra_s: float, duration_s: float) -> None:
        self._fault(node_id, "slow", duration_s)
        f = self.nodes[node_id].faults
        f.slow_until, f.slow_extra_s = max(f.slow_until, self.now + duration_s), extra_s

    def lossy(self, node_id: str, loss: float, duration_s: float) -> None:
        self._fault(node_id, "lossy", duration_s)
        f = self.nodes[node_id].faults
        f.lossy_until, f.loss = max(f.lossy_until, self.now + duration_s), loss

    def elect(self, duration_s: float) -> None:
        """etcd's leader dies: a new one is elected ``duration_s`` later."""
        self._fault("etcd", "leader lost", duration_s)
        self.leaderless_until = max(self.leaderless_until, self.now + duration_s)

        def elected() -> None:
            if self.now >= self.leaderless_until:
                self.record("etcd", "leader elected")
                self.etcd.promote(self.now)
                self.touch()

        self.schedule(duration_s, elected)

    def _fault(self, node_id: str, kind: str, duration_s: float = 0.0) -> None:
        self.record(node_id, kind, f"{duration_s:.3f}" if duration_s else "")
        self.last_fault_at = max(self.last_fault_at, self.now + duration_s)

    # -- network --------------------------------------------------------------------

    def _transit(self, node: SimNode, direction: str) -> tuple[float, bool]:
        """When a message sent now arrives, and whether it is lost on the way.

        A lost message keeps its place in the link's order: its loss is noticed when it
        would have arrived, never before a message sent earlier.
        """
        f = node.faults
        cfg = self.config
        delay = self.rng.uniform(cfg.net_delay_min_s, cfg.net_delay_max_s)
        if self.now < f.slow_until:
            delay += self.rng.uniform(0.0, f.slow_extra_s)
        lost = self.now < f.partitioned_until or (
            self.now < f.lossy_until and self.rng.random() < f.loss
        )
        link = (node.node_id, direction)
        at = max(self._link_free_at.get(link, 0.0), self.now + delay)
        self._link_free_at[link] = at
        return at, lost

    def _send(
        self,
        node: SimNode,
        direction: str,
        handle: Callable[[], None],
        on_loss: Callable[[], None] | None = None,
    ) -> None:
        at, lost = self._transit(node, direction)
        incarnation = node.incarnation

        def arrive() -> None:
            leaderless = direction == "up" and self.now < self.leaderless_until
            if lost or leaderless or self.now < node.faults.partitioned_until:
                if on_loss is not None:
                    # The node learns of the loss in order with what it receives, even
                    # if it is paused: never before an earlier message.
                    node.deliver(on_loss, incarnation)
            elif direction == "up":
                handle()
            else:
                node.deliver(handle, incarnation)

        self.schedule(at - self.now, arrive)

    def _reply(
        self, node: SimNode, handle: Callable[[], None], on_loss: Callable[[], None] | None = None
    ) -> None:
        self._send(node, "down", handle, on_loss)

    # -- requests (node -> etcd -> node) --------------------------------------------

    def send_request(self, node: SimNode, request: Request, sent_at: float) -> None:
        # A request or answer lost on the way is noticed by the core's RPC timeout.
        if isinstance(request, GrantLease):
            self._send(node, "up", lambda: self._grant(node, request, sent_at))
        elif isinstance(request, Register):
            self._send(node, "up", lambda: self._register(node, request))
        elif isinstance(request, ClaimShards):
            self._send(node, "up", lambda: self._claim(node, request))
        elif isinstance(request, DeleteClaim):
            self._send(node, "up", lambda: self._delete(node, request))
        else:
            self._send(node, "up", lambda: self.etcd.revoke(request.lease))

    def _grant(self, node: SimNode, request: GrantLease, sent_at: float) -> None:
        lease = self.etcd.grant(self.now, request.ttl_s)
        core = node.core

        def granted() -> None:
            core.on_granted(lease, request.ttl_s, sent_at)
            node.break_keepalive_stream()
            self.record(node.node_id, "lease", f"{lease:x}")
            self.touch()

        self._reply(node, granted)

    def _register(self, node: SimNode, request: Register) -> None:
        value = encode_member(node.info, f"{node.node_id}:0")
        revision = self.etcd.put(node_key(KEY_PREFIX, node.node_id), value, request.lease)
        core = node.core
        if revision is None:
            self._reply(node, lambda: core.on_failed(request))
        else:
            self._reply(node, lambda: core.on_registered(request.lease, revision))

    def _claim(self, node: SimNode, request: ClaimShards) -> None:
        keys = {self._shard_keys[s]: s for s in request.shards}
        created = self.etcd.create_absent(list(keys), node.node_id.encode(), request.lease)
        won = [(keys[k], self.etcd.revision) for k in created or []]

        def answered() -> None:
            node.report(node.core.on_claimed(request.lease, won, node.local_now()))

        self._reply(node, answered)

    def _delete(self, node: SimNode, request: DeleteClaim) -> None:
        key = shard_key(KEY_PREFIX, request.shard)
        deleted = self.etcd.delete_if(key, node.node_id.encode(), request.epoch)
        core = node.core
        self._reply(node, lambda: core.on_deleted(request.shard, request.epoch, deleted))

    # -- streams --------------------------------------------------------------------

    def send_keepalive(self, node: SimNode, lease: int, stream: int) -> None:
        def at_etcd() -> None:
            ttl = self.etcd.keepalive(self.now, lease)
            self._reply(
                node, lambda: node.on_keepalive(lease, stream, ttl), node.break_keepalive_stream
            )

        self._send(node, "up", at_etcd, node.break_keepalive_stream)

    def send_sync(self, node: SimNode) -> None:
        """List everything and watch from there: a new watch, ``node.watch_id``."""
        node.watch_id += 1
        watch = (node.incarnation, node.watch_id)

        def at_etcd() -> None:
            self._watchers[node.node_id] = watch
            revision, records = self.etcd.listing()

            def listed() -> None:
                if node.watch_id == watch[1]:
                    node.view.load(revision, records, node.local_now())
                    node.watching = True

            self._reply(node, listed, lambda: self._watch_lost(node, watch))

        self._send(node, "up", at_etcd)

    def etcd_unwatch(self, node: SimNode) -> None:
        self._watchers.pop(node.node_id, None)

    def _watch_lost(self, node: SimNode, watch: tuple[int, int]) -> None:
        if self._watchers.get(node.node_id) == watch:
            del self._watchers[node.node_id]
        if node.watch_id == watch[1]:
            node.break_watch()

    def _on_etcd_change(self, revision: int, key: str, record: KeyRecord | None) -> None:
        self.touch()
        for node_id, watch in list(self._watchers.items()):
            node = self.nodes[node_id]
            if node.incarnation != watch[0]:
                continue

            def event(node: SimNode = node, watch_id: int = watch[1]) -> None:
                if node.watching and node.watch_id == watch_id:
                    node.view.apply(revision, key, record, node.local_now())

            def lost(node: SimNode = node, watch: tuple[int, int] = watch) -> None:
                self._watch_lost(node, watch)

            self._reply(node, event, lost)

    # -- etcd's own clock -----------------------------------------------------------

    def _lessor_tick(self) -> None:
        self.schedule(self.config.lessor_tick_s, self._lessor_tick)
        if self.now >= self.leaderless_until:  # only a leader expires leases
            self.etcd.expire(self.now)

    # -- properties -----------------------------------------------------------------

    def _check_tick(self) -> None:
        self.schedule(0.1, self._check_tick)
        self.check_exclusive()
        self.check_live()

    def believers(self) -> dict[int, tuple[str, int]]:
        """Shard -> (node, epoch) for every belief that is valid at the real time."""
        out: dict[int, tuple[str, int]] = {}
        for node in self.nodes.values():
            if not node.up:
                continue
            for shard, epoch in node.core.owned(self.now).items():
                other = out.setdefault(shard, (node.node_id, epoch))
                if other != (node.node_id, epoch):
                    self._fail(f"shard {shard} owned by {other} and {node.node_id}@{epoch}")
        return out

    def check_exclusive(self) -> None:
        # Matching etcd's single current key implies that no two nodes believe at once.
        kv = self.etcd.kv
        for node in self.nodes.values():
            owned = node.core.owned(self.now) if node.up else {}
            lease, value = node.core.lease, node.node_id.encode()
            for shard, epoch in owned.items():
                rec = kv.get(self._shard_keys[shard])
                if rec is None or (rec.create_revision, rec.lease, rec.value) != (
                    epoch,
                    lease,
                    value,
                ):
                    self._fail(f"{node.node_id} believes it owns {shard}@{epoch}, etcd: {rec}")
                if epoch < self._valid_epoch.get(shard, 0):
                    self._fail(f"shard {shard} epoch went back to {epoch}")
                self._valid_epoch[shard] = epoch

    def _fail(self, message: str) -> None:
        # The message is built only on failure: these checks run after every event.
        invariant(False, self.where(message))

    def check_live(self) -> None:
        if self.now - self.last_fault_at < self.config.calm_window_s:
            return
        if not any(n.healthy for n in self.nodes.values()):
            return
        owned = self.believers()
        orphans = [s for s in range(self.config.protocol.shard_count) if s not in owned]
        invariant(not orphans, self.where(f"calm, yet shards without an owner: {orphans[:8]}"))

    def check_converged(self) -> None:
        """Owners are placement's answer for the registered nodes, and all believe it."""
        members = [
            self.nodes[k.removeprefix(KEY_PREFIX + "nodes/")].info
            for k in sorted(self.etcd.kv)
            if k.startswith(KEY_PREFIX + "nodes/")
        ]
        want = placement.assign(self.config.protocol.shard_count, members)
        have = {s: owner for s, (owner, _) in self.believers().items()}
        invariant(have == want, self.where("owners are not placement's answer"))


def random_faults(sim: Simulation, duration_s: float, faults_per_minute: float = 6.0) -> None:
    """Run ``duration_s`` with faults at random, drawn from the simulation's own seed."""
    rng = sim.rng
    end = sim.now + duration_s
    ttl = sim.config.lease_ttl_s
    while True:
        sim.run_for(rng.expovariate(faults_per_minute / 60.0))
        if sim.now >= end:
            return
        ids = sorted(sim.nodes)
        node_id = rng.choice(ids)
        node = sim.nodes[node_id]
        kind = rng.choice(("kill", "start", "pause", "partition", "slow", "lossy", "election"))
        if kind == "kill" and node.up and sum(n.up for n in sim.nodes.values()) > 1:
            sim.kill(node_id)
        elif kind == "start" and not node.up:
            sim.start(node_id)
        elif kind == "pause":
            sim.pause(node_id, rng.uniform(0.1, 3 * ttl))
        elif kind == "partition":
            sim.partition(node_id, rng.uniform(0.1, 3 * ttl))
        elif kind == "slow":
            sim.slow(node_id, rng.uniform(0.05, 2.0), rng.uniform(0.5, 3 * ttl))
        elif kind == "lossy":
            sim.lossy(node_id, rng.uniform(0.05, 0.5), rng.uniform(0.5, 3 * ttl))
        elif kind == "election":
            sim.elect(rng.uniform(0.5, 3 * ttl))
