"""The ownership agent on a real etcd, through pyetcd's generated gRPC stubs.

:class:`OwnershipAgent` runs :class:`~.node.NodeCore` with three threads:

* the loop (every :data:`LOOP_INTERVAL_S`): one core step, then its requests as unary
  RPCs under :data:`RPC_TIMEOUT_S` each (a grant, the registration put, one claim
  transaction, conditional deletes, a revoke);
* the keepalive reader: one long-lived ``LeaseKeepAlive`` stream per lease. pyetcd's
  ``refresh_lease`` opens a new stream for every single keepalive (it sends a
  one-element request list and waits for the answer), so each refresh pays a stream
  set-up and blocks its caller. etcd's own client keeps one stream per lease open; so
  does this module, built from pyetcd's generated ``LeaseStub``: gRPC pulls requests
  from a generator that yields one keepalive every ``KEEPALIVES_PER_TTL``-th of the
  TTL and records each send time, and this thread reads the answers, which etcd sends
  in order, and moves the lease's local deadline;
* the watcher: lists the prefix, then watches it from the next revision to keep the
  :class:`~.view.View` (no etcd read per lookup). It asks for a progress report every
  :data:`WATCH_PROGRESS_S`; after :data:`WATCH_STALL_S` of silence, or any error, it
  re-lists (after :data:`WATCH_RETRY_S`).

One lock guards the core and the view. Callbacks run outside it, one at a time and in
the order the events happened, from whichever thread produced them: keep them short.

:meth:`OwnershipAgent.epoch_if_owner` is exact at the moment it is called (it reads the
clock, CLOCK_BOOTTIME on Linux, against the lease's local deadline): past the deadline
it answers None at once. The shards stay held, suspended, for ``Timing.suspend_s`` (see
:mod:`.node`): a keepalive answered meanwhile gives them back at the same epochs, with no
``on_lost``; otherwise ``on_lost`` comes within :data:`LOOP_INTERVAL_S` +
:data:`STEP_BUDGET_S` of the suspension's end.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import pyetcd
from pyetcd import etcdrpc
from pyetcd.etcdrpc import kv_pb2

from clearinghouse import telemetry
from clearinghouse._invariant import invariant
from clearinghouse.ownership.node import (
    KEEPALIVE_INFLIGHT_MAX,
    LEASE_TTL_S,
    LOOP_INTERVAL_S,
    RPC_TIMEOUT_S,
    WATCH_RETRY_S,
    ClaimShards,
    DeleteClaim,
    Event,
    Gained,
    GrantLease,
    Lost,
    NodeCore,
    Register,
    Request,
    Timing,
    protocol_for_ttl,
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
from clearinghouse.security.pki import KeyPair, PemFiles, channel_credentials

# etcd refuses (raises) TTLs below about 1.5 election timeouts; 2 s is its default floor.
LEASE_TTL_MIN_S = 2
# The most one loop step spends on requests before it checks the lease again.
STEP_BUDGET_S = 2 * RPC_TIMEOUT_S
KEEPALIVE_RETRY_S = 0.25
# A watch stream can stall without breaking (a half-open connection): the agent asks etcd
# for a progress report this often, and re-lists if it has heard nothing for a while.
WATCH_PROGRESS_S = 1.0
WATCH_STALL_S = 3.0
CLOSE_TIMEOUT_S = 5.0
# Away from its own city's etcd member (it left it when it froze, or its channel passed
# over it while it was unreachable), a node asks it this often whether it answers again,
# and waits this long for the answer (no longer than a request of the loop: the loop's
# bound on leaving a silent member counts one).
HOME_PROBE_INTERVAL_S = 10.0
HOME_PROBE_TIMEOUT_S = 0.5

# Type of pyetcd's client (``pyetcd.Etcd3Client``), which ships without type hints.
EtcdClient = Any

_log = logging.getLogger(__name__)


# Every member's certificate names this too (LocalCluster.ensure_etcd_pki; a deployment's
# members need it as well): one channel over several members checks them all by it.
MEMBER_SERVER_NAME = "members.etcd.clearing-switch.invalid"


class MemberChannel:
    """One gRPC channel over every etcd member, for the agent: it uses the first member
    that answers (its own city's, listed first) and moves on to the next when that one
    fails, so a member's crash is a reconnect, not a lost lease. Has what the agent
    takes from a pyetcd client (``channel``, ``call_credentials``, ``metadata``).

    A member frozen with its connections open (SIGSTOP, a hung host) fails nothing:
    ``pick_first`` stays on it. The agent then calls :meth:`rotate`, which opens a new
    channel that lists the members from the next one on."""

    call_credentials: None = None
    metadata: None = None

    def __init__(self, endpoints: Sequence[tuple[str, int]], keys: KeyPair) -> None:
        """Over the members at ``endpoints`` (in order of preference), as ``keys``'s
        identity; each member's certificate must name :data:`MEMBER_SERVER_NAME`."""
        invariant(bool(endpoints), "no etcd member to connect to")
        self._endpoints = tuple(endpoints)
        self._credentials = channel_credentials(keys)
        self._first = 0
        # The channel before the last rotation: closed at the next one (or at close), so
        # that a call another thread has just started on it fails as a call, not as a
        # closed channel.
        self._retired: grpc.Channel | None = None
        # The own city's member's id, once a probe has learnt it (0: not yet).
        self.home_id = 0
        self.channel = self._open()

    @property
    def preferred(self) -> tuple[str, int]:
        """The member the current channel tries first."""
        return self._endpoints[self._first]

    @property
    def at_home(self) -> bool:
        """Whether the current channel tries the node's own city's member first."""
        return self._first == 0

    def rotate(self) -> grpc.Channel:
        """A new channel that tries the next member first; the current one is retired."""
        return self._reopen((self._first + 1) % len(self._endpoints))

    def go_home(self) -> grpc.Channel:
        """A new channel in the original order, the node's own city's member first."""
        return self._reopen(0)

    def home_member(self, timeout_s: float) -> int:
        """The member id of the node's own city's member if it answers a status request
        within ``timeout_s`` and knows a leader, else 0 (on a channel of its own, closed
        after). The id is kept in :attr:`home_id`."""
        probe = self._open(self._endpoints[:1])
        try:
            status = etcdrpc.MaintenanceStub(probe).Status(etcdrpc.StatusRequest(), timeout_s)
        except grpc.RpcError:
            return 0
        finally:
            probe.close()
        self.home_id = int(status.header.member_id)
        return self.home_id if status.leader else 0

    def _reopen(self, first: int) -> grpc.Channel:
        self._first = first
        if self._retired is not None:
            self._retired.close()
        self._retired, self.channel = self.channel, self._open()
        return self.channel

    def close(self) -> None:
        if self._retired is not None:
            self._retired.close()
        self.channel.close()

    def _open(self, order: Sequence[tuple[str, int]] | None = None) -> grpc.Channel:
        if order is None:
            order = self._endpoints[self._first :] + self._endpoints[: self._first]
        target = "ipv4:" + ",".join(f"{host}:{port}" for host, port in order)
        options = [
            ("grpc.ssl_target_name_override", MEMBER_SERVER_NAME),
            # In the order given, the next only when the current one fails (no spreading).
            ("grpc.lb_policy_name", "pick_first"),
        ]
        return grpc.secure_channel(target, self._credentials, options=options)


def connect(host: str, port: int, tls: PemFiles, timeout_s: float) -> EtcdClient:
    """A client of the etcd member at ``host:port`` over TLS, presenting ``tls``'s
    certificate (members require one of the cluster's CA) and trusting only that CA;
    ``timeout_s`` bounds every unary call. There is no plaintext variant."""
    return pyetcd.client(
        host=host,
        port=port,
        ca_cert=str(tls.ca),
        cert_key=str(tls.key),
        cert_cert=str(tls.cert),
        timeout=timeout_s,
    )


@dataclass(frozen=True, slots=True)
class Owner:
    node_id: str
    address: str
    epoch: int
    # The zone the owner registered: the node-to-node hop accepts only its certificate.
    zone: str


class OwnershipAgent:
    """One switch node's share of the shards, claimed and kept alive in etcd."""

    def __init__(
        self,
        client: EtcdClient,
        node: NodeInfo,
        address: str,
        lease_ttl_s: int = LEASE_TTL_S,
        *,
        on_gained: Callable[[int, int], None] | None = None,
        on_lost: Callable[[int], None] | None = None,
        prefix: str = KEY_PREFIX,
        config: ProtocolConfig | None = None,
    ) -> None:
        invariant(lease_ttl_s >= LEASE_TTL_MIN_S, f"lease TTL below {LEASE_TTL_MIN_S} s")
        self.node = node
        self.address = address
        self.prefix = prefix
        # Credentials and metadata carry etcd auth when the client was built with it.
        self._call_kw: dict[str, Any] = {
            "credentials": client.call_credentials,
            "metadata": client.metadata,
        }
        # Over every member, the agent leaves one that stops answering (a pyetcd client
        # has one member: nothing to move to).
        self._members = client if isinstance(client, MemberChannel) else None
        self._bind(client.channel)
        self._home_probed_at = float("-inf")
        self._on_gained = on_gained
        self._on_lost = on_lost
        self._timing = Timing.for_ttl(lease_ttl_s)
        cfg = config or protocol_for_ttl(lease_ttl_s)
        self._lock = threading.Lock()
        self._view = View(prefix)
        self._core = NodeCore(node, self._view, self._timing, cfg)
        self._outbox: deque[Event] = deque()
        self._dispatch_lock = threading.Lock()
        self._stop = threading.Event()
        self._keepalive: _KeepAliveStream | None = None
        self._watch_call: Any = None
        self._watch_heard_at = _clock()
        self._threads: list[threading.Thread] = []
        # (lease, since) while the lease is suspended (node.py), for the log and metrics.
        self._suspension: tuple[int, float] | None = None

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> OwnershipAgent:
        invariant(not self._threads, "an agent starts once")
        tag = self.node.node_id
        self._threads = [
            threading.Thread(target=self._watch_forever, name=f"ownership-watch-{tag}"),
            threading.Thread(target=self._loop_forever, name=f"ownership-loop-{tag}"),
        ]
        for t in self._threads:
            t.daemon = True
            t.start()
        return self

    def close(self, revoke: bool = True) -> None:
        """Stop; every shard is reported lost first. ``revoke=False`` behaves like a crash:
        the lease (and with it the shards) stays in etcd until its TTL runs out."""
        self._stop.set()
        watch = self._watch_call
        if watch is not None:
            watch.cancel()  # etcd keeps a watch stream open until the client cancels it
        for t in self._threads:
            t.join(CLOSE_TIMEOUT_S)
            if t.is_alive():
                _log.warning("%s did not stop within %s s", t.name, CLOSE_TIMEOUT_S)
        with self._lock:
            lease = self._core.lease
            self._outbox.extend(self._core.shutdown())
        self._dispatch()
        if self._keepalive is not None:
            self._keepalive.close()
        if revoke and lease:
            self._revoke(lease)

    def __enter__(self) -> OwnershipAgent:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- queries (no etcd read) -------------------------------------------------------

    def epoch_if_owner(self, shard: int) -> int | None:
        """My epoch for ``shard`` if I own it right now; the token to fence writes with."""
        with self._lock:
            return self._core.epoch_if_owner(shard, _clock())

    def owned(self) -> dict[int, int]:
        with self._lock:
            return self._core.owned(_clock())

    def unconfirmed(self, shard: int, epoch: int) -> bool:
        """Held at ``epoch`` under a suspended lease: owned again at that epoch if etcd
        answers a keepalive in time, else lost (``on_lost`` follows)."""
        with self._lock:
            now = _clock()
            return self._core.suspended(now) and self._core.holdings.epoch(shard) == epoch

    def ownership_doubt(self) -> str | None:
        """Why this node cannot tell who owns what right now (None: it can): its own
        lease is not confirmed by etcd (no quorum, or none reached), or its view of the
        shard map lost its watch. A request no owner could take is then refused for that
        reason, not as a routing miss."""
        with self._lock:
            now = _clock()
            if self._core.suspended(now):
                return "this node's etcd lease is past its deadline, unconfirmed"
            if not self._core.valid(now):
                return "this node holds no etcd lease"
            if not self._view.synced:
                return "this node's watch of the shard map is broken"
        return None

    def owner_of(self, shard: int) -> Owner | None:
        """Who owns ``shard``: exact for this node, a routing hint for the others."""
        with self._lock:
            mine = self._core.epoch_if_owner(shard, _clock())
            if mine is not None:
                return Owner(self.node.node_id, self.address, mine, self.node.zone)
            claim = self._view.claims.get(shard)
            if claim is None or claim.owner == self.node.node_id:
                return None
            address = self._view.address(claim.owner)
            zone = self._view.zone(claim.owner)
            return Owner(claim.owner, address, claim.epoch, zone) if address and zone else None

    def relinquish(self, shard: int) -> None:
        """Stop owning ``shard`` now (its writer failed); the protocol deletes its key and
        claims it again, so it comes back under a new epoch, rebuilt from the ledger."""
        with self._lock:
            if self._core.holdings.give_up(shard) is not None:
                self._outbox.append(Lost(shard))
        self._dispatch()

    def members(self) -> list[NodeInfo]:
        with self._lock:
            return [m.info for m in self._view.members()]

    @property
    def lease(self) -> int:
        with self._lock:
            return self._core.lease

    # -- the loop ---------------------------------------------------------------------

    def _loop_forever(self) -> None:
        while not self._stop.is_set():
            try:
                # Before the step's requests (sent to the member the channel is on)
                # and after them (one may have waited out its timeout on a frozen one).
                self._leave_silent_member()
                self._step_once()
                self._leave_silent_member()
                self._ensure_keepalive()
                self._cancel_stalled_watch()
                self._go_home_when_it_answers()
            except Exception:  # noqa: BLE001 (logged; see below)
                # The loop is what keeps this node's ownership honest: it must not die of
                # a bug in one step. The next step starts from the core's state again.
                _log.exception("ownership step failed on %s", self.node.node_id)
            self._dispatch()
            self._stop.wait(LOOP_INTERVAL_S)

    def _step_once(self) -> None:
        with self._lock:
            step = self._core.step(_clock())
            self._outbox.extend(step.events)
            self._note_suspension()
        # Lost shards are reported before any delete of their keys is sent.
        self._dispatch()
        budget_end = _clock() + STEP_BUDGET_S
        for i, request in enumerate(step.requests):
            if self._stop.is_set() or _clock() > budget_end:
                self._give_up(step.requests[i:])
                return
            try:
                self._execute(request)
            except (grpc.RpcError, _EtcdRefused) as e:
                _log.warning("%s: %s failed: %s", self.node.node_id, request, _describe(e))
                # etcd is unreachable or slow: do not spend the budget on the rest.
                self._give_up(step.requests[i:])
                return

    def _give_up(self, requests: list[Request]) -> None:
        with self._lock:
            for r in requests:
                self._core.on_failed(r)

    def _execute(self, request: Request) -> None:
        if isinstance(request, GrantLease):
            self._grant(request)
        elif isinstance(request, Register):
            self._register(request)
        elif isinstance(request, ClaimShards):
            self._claim(request)
        elif isinstance(request, DeleteClaim):
            self._delete(request)
        else:
            self._revoke(request.lease)

    def _grant(self, request: GrantLease) -> None:
        sent_at = _clock()
        resp = self._leases.LeaseGrant(
            etcdrpc.LeaseGrantRequest(TTL=request.ttl_s), RPC_TIMEOUT_S, **self._call_kw
        )
        if resp.error or resp.TTL <= 0:
            raise _EtcdRefused(f"lease grant refused: {resp.error!r}")
        with self._lock:
            self._core.on_granted(int(resp.ID), float(resp.TTL), sent_at)
        _log.info("%s: lease %x granted, TTL %s s", self.node.node_id, resp.ID, resp.TTL)

    def _register(self, request: Register) -> None:
        value = encode_member(self.node, self.address)
        put = etcdrpc.PutRequest(
            key=node_key(self.prefix, self.node.node_id).encode(), value=value, lease=request.lease
        )
        resp = self._kv.Put(put, RPC_TIMEOUT_S, **self._call_kw)
        with self._lock:
            self._core.on_registered(request.lease, int(resp.header.revision))

    def _claim(self, request: ClaimShards) -> None:
        me = self.node.node_id.encode()
        resp = self._kv.Txn(_claim_txn(self.prefix, request, me), RPC_TIMEOUT_S, **self._call_kw)
        won = []
        for shard, op in zip(request.shards, resp.responses, strict=True):
            inner = op.response_txn
            if inner.succeeded:
                # Read back in the same transaction: the key's create_revision is the epoch.
                kv = inner.responses[1].response_range.kvs[0]
                invariant(
                    kv.value == me and kv.lease == request.lease,
                    f"claim of shard {shard} read back {kv.value!r} under lease {kv.lease:x}",
                )
                won.append((shard, int(kv.create_revision)))
        with self._lock:
            self._outbox.extend(self._core.on_claimed(request.lease, won, _clock()))

    def _delete(self, request: DeleteClaim) -> None:
        key = shard_key(self.prefix, request.shard).encode()
        txn = etcdrpc.TxnRequest(
            compare=[
                _compare_value(key, self.node.node_id.encode()),
                _compare_create(key, request.epoch),
            ],
            success=[etcdrpc.RequestOp(request_delete_range=etcdrpc.DeleteRangeRequest(key=key))],
        )
        resp = self._kv.Txn(txn, RPC_TIMEOUT_S, **self._call_kw)
        with self._lock:
            self._core.on_deleted(request.shard, request.epoch, bool(resp.succeeded))

    def _revoke(self, lease: int) -> None:
        try:
            self._leases.LeaseRevoke(
                etcdrpc.LeaseRevokeRequest(ID=lease), RPC_TIMEOUT_S, **self._call_kw
            )
        except grpc.RpcError as e:
            # Best effort: a lease that cannot be revoked expires on its own.
            _log.info("%s: revoke of %x failed: %s", self.node.node_id, lease, _describe(e))

    # -- the member ----------------------------------------------------------------------

    def _bind(self, channel: grpc.Channel) -> None:
        self._kv = etcdrpc.KVStub(channel)
        self._leases = etcdrpc.LeaseStub(channel)
        self._watch_stub = etcdrpc.WatchStub(channel)

    def _leave_silent_member(self) -> None:
        """Move to the next member when the current one has left a keepalive unanswered
        for :attr:`Timing.member_silent_s` (it is frozen with its connections open, or
        has lost its cluster), so that the lease is renewed through another member
        before etcd's leader, which hears nothing from this node, lets it expire. The
        keepalive stream starts again on the new channel, so a member moved to that is
        silent too (frozen as well, or all are: a leader election) is left a second
        later in turn (and the node goes back to its own city's member once that one
        answers again: :meth:`_go_home_when_it_answers`)."""
        ka, members = self._keepalive, self._members
        if members is None or ka is None:
            return
        now = _clock()
        silent_s = ka.unanswered_for(now)
        if silent_s < self._timing.member_silent_s:
            return
        was = members.preferred
        self._switch_channel(members.rotate())
        self._home_probed_at = now
        telemetry.metrics.lease_event("member_left")
        _log.warning(
            "%s: etcd member %s:%d left keepalive %x unanswered for %.1f s: moving to "
            "%s:%d first",
            self.node.node_id, *was, ka.lease, silent_s, *members.preferred,
        )  # fmt: skip

    def _go_home_when_it_answers(self) -> None:
        """Away from its own city's member, every :data:`HOME_PROBE_INTERVAL_S` the node
        asks that member for its status on a channel of its own; once it answers and
        knows a leader, the node's channel goes back to the original order (a member
        still frozen answers nothing, and the node stays where it is).

        Away also means a channel that lists the own member first but answers through
        another: ``pick_first`` passes over a member it cannot reach when the channel
        connects (one frozen then, for instance) and stays on the next for good. The
        member answering the keepalives (their header's member id) tells."""
        members, ka, now = self._members, self._keepalive, _clock()
        if members is None or now - self._home_probed_at < HOME_PROBE_INTERVAL_S:
            return
        answered_by = ka.answered_by if ka is not None else 0
        if not away_from_home(members.at_home, answered_by, members.home_id):
            return
        self._home_probed_at = now
        home = members.home_member(HOME_PROBE_TIMEOUT_S)
        if not home or not away_from_home(members.at_home, answered_by, home):
            return  # home is silent, or the probe only learnt that the node is there
        self._switch_channel(members.go_home())
        telemetry.metrics.lease_event("member_home")
        _log.warning(
            "%s: back on its own city's etcd member %s:%d (member %x; keepalives were "
            "answered by member %x)",
            self.node.node_id, *members.preferred, home, answered_by,
        )  # fmt: skip

    def _switch_channel(self, channel: grpc.Channel) -> None:
        """Use ``channel`` from now on: both streams start again on it, the keepalive at
        once (in the same loop step), the watch after it re-lists."""
        self._bind(channel)
        ka = self._keepalive
        if ka is not None:
            ka.close()
            self._keepalive = None
        watch = self._watch_call
        if watch is not None:
            watch.cancel()

    # -- keepalive --------------------------------------------------------------------

    def _ensure_keepalive(self) -> None:
        with self._lock:
            lease = self._core.lease
        ka = self._keepalive
        if ka is not None and ka.lease == lease and not ka.broken_for(KEEPALIVE_RETRY_S):
            return
        if ka is not None:
            ka.close()
            self._keepalive = None
        if lease and not self._stop.is_set():
            self._keepalive = _KeepAliveStream(
                self._leases,
                lease,
                interval_s=self._timing.keepalive_interval_s,
                on_answer=self._on_keepalive,
                call_kw=self._call_kw,
                name=f"ownership-keepalive-{self.node.node_id}",
            )

    def _on_keepalive(self, lease: int, sent_at: float, ttl_s: int) -> None:
        telemetry.metrics.lease_event("renewed" if ttl_s > 0 else "expired")
        with self._lock:
            self._outbox.extend(self._core.on_keepalive(lease, sent_at, float(ttl_s)))
            self._note_suspension()
        self._dispatch()

    def _note_suspension(self) -> None:
        """Log and count a suspension's start and end (called with the lock held)."""
        now = _clock()
        core = self._core
        if core.suspended(now):
            if self._suspension is None:
                self._suspension = (core.lease, now)
                telemetry.metrics.lease_event("suspended")
                _log.warning(
                    "%s: lease %x not renewed by its local deadline: its %d shards are held "
                    "but not served for up to %.0f s, until etcd answers a keepalive (a "
                    "leader election extends every lease)",
                    self.node.node_id,
                    core.lease,
                    len(core.holdings.held()),
                    self._timing.suspend_s,
                )
            return
        if self._suspension is None:
            return
        lease, since = self._suspension
        self._suspension = None
        if core.lease == lease:
            telemetry.metrics.lease_event("confirmed")
            _log.warning(
                "%s: lease %x confirmed after %.1f s suspended: its %d shards serve again, "
                "no takeover",
                self.node.node_id,
                lease,
                now - since,
                len(core.holdings.held()),
            )
        else:
            _log.warning(
                "%s: lease %x lost after %.1f s suspended: its shards are given up",
                self.node.node_id,
                lease,
                now - since,
            )

    # -- watch ------------------------------------------------------------------------

    def _watch_forever(self) -> None:
        while not self._stop.is_set():
            try:
                self._list_then_watch()
            except grpc.RpcError as e:
                if not self._stop.is_set():
                    _log.warning("%s: watch broke: %s", self.node.node_id, _describe(e))
            except _EtcdRefused as e:
                _log.warning("%s: watch refused: %s", self.node.node_id, e)
            except Exception:  # noqa: BLE001 (logged)
                # Without its watch a node cannot see shards freed: it must keep trying.
                _log.exception("watch failed on %s", self.node.node_id)
            with self._lock:
                self._view.unsync()
            self._stop.wait(WATCH_RETRY_S)

    def _list_then_watch(self) -> None:
        start, end = self.prefix.encode(), _prefix_end(self.prefix.encode())
        listing = self._kv.Range(
            etcdrpc.RangeRequest(key=start, range_end=end), RPC_TIMEOUT_S, **self._call_kw
        )
        revision = int(listing.header.revision)
        with self._lock:
            self._view.load(revision, [_record(kv) for kv in listing.kvs], _clock())
        create = etcdrpc.WatchCreateRequest(key=start, range_end=end, start_revision=revision + 1)
        done = threading.Event()
        stub = self._watch_stub
        call = stub.Watch(
            _watch_requests(etcdrpc.WatchRequest(create_request=create), done), **self._call_kw
        )
        self._watch_heard_at = _clock()
        self._watch_call = call
        try:
            if self._stop.is_set() or stub is not self._watch_stub:
                # close() ran, or the agent moved to another member, before this call
                # existed, so neither could cancel it: watch again from a new listing.
                return
            for resp in call:
                self._watch_heard_at = _clock()
                if resp.canceled or resp.compact_revision:
                    raise _EtcdRefused(f"watch cancelled ({resp.cancel_reason or 'compacted'})")
                self._apply_events(resp.events)
        finally:
            # Ends the request side too: etcd keeps a watch open until the client goes.
            done.set()
            call.cancel()

    def _cancel_stalled_watch(self) -> None:
        call = self._watch_call
        if call is not None and _clock() - self._watch_heard_at > WATCH_STALL_S:
            _log.warning("%s: watch silent for %s s, re-listing", self.node.node_id, WATCH_STALL_S)
            self._watch_heard_at = _clock()
            call.cancel()  # the watch thread sees the stream end, re-lists and watches again

    def _apply_events(self, events: Any) -> None:
        now = _clock()
        with self._lock:
            for ev in events:
                key = ev.kv.key.decode(errors="replace")
                record = None if ev.type == kv_pb2.Event.DELETE else _record(ev.kv)
                self._view.apply(int(ev.kv.mod_revision), key, record, now)

    # -- callbacks --------------------------------------------------------------------

    def _dispatch(self) -> None:
        """Run the callbacks of queued events, in order, never two at once."""
        with self._dispatch_lock:
            while True:
                with self._lock:
                    if not self._outbox:
                        return
                    event = self._outbox.popleft()
                try:
                    if isinstance(event, Gained):
                        _log.info(
                            "%s gained shard %d at epoch %d",
                            self.node.node_id,
                            event.shard,
                            event.epoch,
                        )
                        telemetry.metrics.lease_event("shard_gained")
                        if self._on_gained:
                            self._on_gained(event.shard, event.epoch)
                    else:
                        _log.info("%s lost shard %d", self.node.node_id, event.shard)
                        telemetry.metrics.lease_event("shard_lost")
                        if self._on_lost:
                            self._on_lost(event.shard)
                except Exception:  # noqa: BLE001 (logged; see below)
                    # A broken callback must not stop ownership from being reported.
                    _log.exception("ownership callback failed for %s", event)


class _EtcdRefused(Exception):
    """etcd answered, but not with what was asked (an error field, a cancelled watch)."""


def away_from_home(at_home: bool, answered_by: int, home_id: int) -> bool:
    """Whether a node may be away from its own city's etcd member: its channel prefers
    another one, or its keepalives are answered by a member (``answered_by``, 0 before
    the first answer) that is not its own (``home_id``, 0 while not known: asked then)."""
    if not at_home:
        return True
    return answered_by not in (0, home_id)


class _KeepAliveStream:
    """One long-lived LeaseKeepAlive stream for one lease.

    gRPC pulls requests from :meth:`_requests` on its own thread; the generator paces
    them and records each send time. etcd answers in order on the stream, so the oldest
    recorded send time belongs to the next answer.
    """

    def __init__(
        self,
        stub: Any,
        lease: int,
        *,
        interval_s: float,
        on_answer: Callable[[int, float, int], None],
        call_kw: dict[str, Any],
        name: str,
    ) -> None:
        self.lease = lease
        self._interval_s = interval_s
        self._on_answer = on_answer
        self._sent: deque[float] = deque()
        self._sent_lock = threading.Lock()
        self._stop = threading.Event()
        self._broken_at: float | None = None
        # The member id in the newest answer's header: the member the stream goes through.
        self.answered_by = 0
        self._call = stub.LeaseKeepAlive(self._requests(), **call_kw)
        self._thread = threading.Thread(target=self._read, name=name, daemon=True)
        self._thread.start()

    def unanswered_for(self, now: float) -> float:
        """How long the oldest keepalive sent and not answered has waited (0: none)."""
        with self._sent_lock:
            return now - self._sent[0] if self._sent else 0.0

    def broken_for(self, seconds: float) -> bool:
        at = self._broken_at
        return at is not None and _clock() - at >= seconds

    def close(self) -> None:
        self._stop.set()
        self._call.cancel()
        self._thread.join(CLOSE_TIMEOUT_S)

    def _requests(self) -> Iterator[Any]:
        request = etcdrpc.LeaseKeepAliveRequest(ID=self.lease)
        while not self._stop.is_set():
            with self._sent_lock:
                room = len(self._sent) < KEEPALIVE_INFLIGHT_MAX
                if room:
                    # Recorded before the send: etcd renews later, so this is conservative.
                    self._sent.append(_clock())
            if room:
                yield request
            self._stop.wait(self._interval_s)

    def _read(self) -> None:
        try:
            for resp in self._call:
                with self._sent_lock:
                    sent_at = self._sent.popleft() if self._sent else None
                self.answered_by = int(resp.header.member_id)
                if sent_at is not None:
                    self._on_answer(self.lease, sent_at, int(resp.TTL))
        except grpc.RpcError as e:
            if not self._stop.is_set():
                _log.warning("keepalive stream of %x broke: %s", self.lease, _describe(e))
        finally:
            self._broken_at = _clock()


def _clock() -> float:
    """Seconds on a clock that never goes back and keeps counting through a suspend.

    Linux's CLOCK_MONOTONIC stops while the machine sleeps, but etcd's clock does not:
    a node measuring its lease with it would wake up believing in an expired lease.
    CLOCK_BOOTTIME counts the sleep too; elsewhere, fall back to the monotonic clock.
    """
    return time.clock_gettime(_CLOCK_ID)


_CLOCK_ID = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)


def _claim_txn(prefix: str, request: ClaimShards, me: bytes) -> Any:
    """One transaction of independent conditional creates, one nested txn per shard."""
    ops = []
    for shard in request.shards:
        key = shard_key(prefix, shard).encode()
        put = etcdrpc.PutRequest(key=key, value=me, lease=request.lease)
        inner = etcdrpc.TxnRequest(
            compare=[_compare_create(key, 0)],
            success=[
                etcdrpc.RequestOp(request_put=put),
                etcdrpc.RequestOp(request_range=etcdrpc.RangeRequest(key=key)),
            ],
        )
        ops.append(etcdrpc.RequestOp(request_txn=inner))
    return etcdrpc.TxnRequest(success=ops)


def _compare_create(key: bytes, revision: int) -> Any:
    return etcdrpc.Compare(
        key=key,
        target=etcdrpc.Compare.CREATE,
        result=etcdrpc.Compare.EQUAL,
        create_revision=revision,
    )


def _compare_value(key: bytes, value: bytes) -> Any:
    return etcdrpc.Compare(
        key=key, target=etcdrpc.Compare.VALUE, result=etcdrpc.Compare.EQUAL, value=value
    )


def _record(kv: Any) -> KeyRecord:
    return KeyRecord(
        kv.key.decode(errors="replace"), bytes(kv.value), int(kv.create_revision), int(kv.lease)
    )


def _prefix_end(prefix: bytes) -> bytes:
    """The first key after every key that starts with ``prefix`` (etcd's range end)."""
    invariant(prefix and prefix[-1] < 0xFF, "prefix must end below 0xff")
    return prefix[:-1] + bytes([prefix[-1] + 1])


def _watch_requests(create: Any, done: threading.Event) -> Iterator[Any]:
    # A watch stream's request side: the create request, then progress requests (each
    # answered by etcd, which proves the stream alive) until the stream is done.
    yield create
    progress = etcdrpc.WatchRequest(progress_request=etcdrpc.WatchProgressRequest())
    while not done.wait(WATCH_PROGRESS_S):
        yield progress


def _describe(e: Exception) -> str:
    if isinstance(e, grpc.Call):
        return f"{e.code().name}: {e.details()}"
    return f"{type(e).__name__}: {e}"
