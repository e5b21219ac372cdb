"""One switch node: storage, shard ownership, the owner's write path, gRPC.

Start-up order: connect to Cassandra and load the registry and the revoked certificates;
start the group commit;
start serving gRPC (health NOT_SERVING); join shard ownership in etcd (each gained shard
is taken over in the background: fence, rebuild, seal); health SERVING. A request for a
shard that is still being taken over waits for it, within a bound. On SIGTERM: health
NOT_SERVING, leave ownership (the lease is revoked, so the shards move at once), drain.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from clearing.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    audit_pb2,
    audit_pb2_grpc,
    payment_pb2,
    payment_pb2_grpc,
    settlement_pb2,
    settlement_pb2_grpc,
    shard_pb2,
    shard_pb2_grpc,
)
from clearinghouse import telemetry
from clearinghouse.audit.service import AuditDomain
from clearinghouse.code_version import code_version
from clearinghouse.ownership import etcd_backend
from clearinghouse.ownership.etcd_backend import OwnershipAgent
from clearinghouse.ownership.placement import NodeInfo
from clearinghouse.request_guard import RequestGuardInterceptor
from clearinghouse.security import pki
from clearinghouse.security.authz import SWITCH_POLICY, SecurityInterceptor
from clearinghouse.security.identity import Identity
from clearinghouse.security.ratelimit import RateLimiter
from clearinghouse.security.revocation import RevocationList, Revocations
from clearinghouse.settlement import WindowKeeper
from clearinghouse.storage.ledger import CassandraLedger, new_stream_id
from clearinghouse.storage.participants import CassandraParticipantStore
from clearinghouse.storage.revocations import CassandraRevocations
from clearinghouse.storage.session import connect, connect_to_node, consistency_level
from clearinghouse.storage.windows import CassandraWindows
from clearinghouse.switch.admin import AdminDomain
from clearinghouse.switch.bank_gateway import GrpcBankGateway
from clearinghouse.switch.config import NodeConfig, node_channel_options, server_options
from clearinghouse.switch.heap import TakeoverHeap
from clearinghouse.switch.processor import PaymentProcessor, Registry, wall_clock_us
from clearinghouse.switch.records import PaymentRecord
from clearinghouse.switch.refresh import RegistryRefresh
from clearinghouse.switch.routing import LocalOwner, Router
from clearinghouse.switch.servicers import (
    AdminServicer,
    AuditServicer,
    PaymentServicer,
    SettlementServicer,
    ShardServicer,
)
from clearinghouse.switch.shards import ReceivedBefore, ShardedStore

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    payment_pb2.DESCRIPTOR.services_by_name["PaymentService"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
    shard_pb2.DESCRIPTOR.services_by_name["ShardService"].full_name,
    settlement_pb2.DESCRIPTOR.services_by_name["SettlementService"].full_name,
    audit_pb2.DESCRIPTOR.services_by_name["AuditService"].full_name,
)
RESOLVE_RETRY_S = 5.0


@dataclass
class Node:
    cfg: NodeConfig
    server: grpc.Server
    port: int
    health: health.HealthServicer
    registry: Registry
    participants: CassandraParticipantStore
    processor: PaymentProcessor
    store: ShardedStore
    router: Router
    agent: OwnershipAgent
    resolver_pool: ThreadPoolExecutor
    window_keeper: WindowKeeper
    closers: list[Any] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)
    revocations: Revocations | None = None

    def refresh_registry(self) -> None:
        """The participants and the revoked certificates, read again (before the node
        serves: a failure stops the start)."""
        self.refresh_participants()
        self.refresh_revocations()

    def refresh_participants(self) -> None:
        self.registry.replace(self.participants.all())

    def refresh_revocations(self) -> None:
        if self.revocations is not None:
            self.revocations.revoked.merge(self.revocations.all())

    def after_admin_change(self) -> None:
        """The registry at once after an operator's change on this node; the change is
        stored already, so a failed read only waits for the next refresh."""
        try:
            self.refresh_participants()
        except Exception:
            log.warning("participant registry refresh after a change failed", exc_info=True)

    def _refresh_loop(self) -> None:
        refresh = RegistryRefresh(
            self.refresh_participants, self.refresh_revocations, self.cfg.registry_refresh_s
        )
        while not self.stopping.wait(self.cfg.registry_refresh_s):
            refresh.round()

    def _reversal_loop(self) -> None:
        while not self.stopping.wait(self.cfg.owed_reversal_retry_s):
            try:
                confirmed = self.processor.settle_owed_reversals()
                if confirmed:
                    log.info("owed reversals confirmed by their banks: %d", confirmed)
            except Exception:  # retried on the next round; the obligation stays recorded
                log.warning("settling owed reversals failed", exc_info=True)

    def _resolve(self, rec: PaymentRecord) -> None:
        try:
            self.processor.resolve(rec)
        except Exception:
            log.warning("resolving payment %s failed", rec.key, exc_info=True)
            # Still ours and still undecided: try again later (a new owner would do it
            # at its takeover otherwise).
            if not self.stopping.is_set() and self.store.owns(rec.shard, rec.owner_epoch):
                retry = threading.Timer(RESOLVE_RETRY_S, self._schedule_resolution, (rec,))
                retry.daemon = True
                retry.start()

    def _schedule_resolution(self, rec: PaymentRecord) -> None:
        self.resolver_pool.submit(self._resolve, rec)

    def describe(self) -> shard_pb2.DescribeResponse:
        committer = self.store.committer
        return shard_pb2.DescribeResponse(
            node_id=self.cfg.node_id,
            shards=[
                shard_pb2.OwnedShard(shard=s, epoch=e)
                for s, e in sorted(self.store.owned().items())
            ],
            commits=committer.commits,
            entries=committer.entries,
            routed_local=self.router.local_count,
            routed_forwarded=self.router.forwarded,
            code_version=code_version(),
        )

    def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *SERVICE_NAMES):
            self.health.set(name, status)

    def start(self) -> None:
        # The registry first: a node whose port is open can already route payments, and
        # must already refuse revoked certificates.
        self.refresh_registry()
        self.store.on_unresolved = self._schedule_resolution
        self.store.committer.start()
        self.store.indexer.start()
        telemetry.metrics.shards_owned_from(lambda: len(self.store.owned()))
        self.server.start()
        cfg = self.cfg
        self.agent.start()
        threading.Thread(target=self._refresh_loop, name="registry-refresh", daemon=True).start()
        threading.Thread(target=self._reversal_loop, name="owed-reversals", daemon=True).start()
        threading.Thread(
            target=self.window_keeper.run, args=(self.stopping,), name="windows", daemon=True
        ).start()
        self.set_serving(True)
        log.info(
            "switch node %s (code %s) serving on %s:%d",
            cfg.zone,
            code_version(),
            cfg.listen_host,
            self.port,
        )

    def stop(self) -> None:
        self.stopping.set()
        self.set_serving(False)
        self.agent.close(revoke=True)
        self.server.stop(self.cfg.shutdown_grace_s).wait(self.cfg.shutdown_grace_s + 1)
        self.store.committer.stop()
        self.store.indexer.stop()
        for close in reversed(self.closers):
            close()


def build(cfg: NodeConfig) -> Node:
    code_version()  # read the sources now: what this process loaded, not later edits
    cluster, session = connect(cfg.cassandra)
    cl = consistency_level(cfg.cassandra.consistency)
    # This process's commits go to a stream of its own (storage.ledger, "Streams").
    ledger = CassandraLedger(session, cl, stream=new_stream_id(cfg.node_id))
    participants = CassandraParticipantStore(session, cl)
    registry = Registry(reload=participants.all)
    keys = pki.LocalCA(cfg.pki_dir).load(pki.node(cfg.zone))
    client_credentials = pki.channel_credentials(keys)
    bank = GrpcBankGateway(client_credentials)
    etcd = etcd_backend.MemberChannel(
        cfg.etcd_endpoints, pki.LocalCA(cfg.etcd_pki_dir).load(pki.node(cfg.zone))
    )
    stopping = threading.Event()
    takeover_pool = ThreadPoolExecutor(cfg.takeover_workers, thread_name_prefix="takeover")
    resolver_pool = ThreadPoolExecutor(cfg.resolver_workers, thread_name_prefix="resolve")

    # The store asks the agent (defined below, started by Node.start) whether it still
    # owns a shard at an epoch, and gives a shard back through it; it borrows and repays
    # cap headroom through the router (also bound later).
    def borrow(pid: str, ccy: str, for_shard: int, need: int, for_epoch: int = 0, /) -> int:
        return router.borrow(pid, ccy, for_shard, need, for_epoch)

    def repay(
        pid: str, ccy: str, from_shard: int, total: int, received: ReceivedBefore | None = None, /
    ) -> int:
        return router.repay(pid, ccy, from_shard, total, received)

    store = ShardedStore(
        node_id=cfg.node_id,
        zone=cfg.zone,
        ledger=ledger,
        participant=lambda pid: registry.snapshot_knowing(lambda known: pid not in known).get(pid),
        still_owner=lambda shard, epoch: agent.epoch_if_owner(shard) == epoch,
        unconfirmed=lambda shard, epoch: agent.unconfirmed(shard, epoch),  # noqa: PLW0108
        relinquish=lambda shard: agent.relinquish(shard),  # noqa: PLW0108 (agent is bound later)
        clock=wall_clock_us,
        borrow=borrow,
        repay=repay,
        full_reader=CassandraLedger(session, consistency_level("ALL")),
    )

    heap = TakeoverHeap()

    def take(shard: int, epoch: int) -> None:
        try:
            store.take(shard, epoch, stopping)
        except Exception:
            log.exception("taking over shard %d at epoch %d failed", shard, epoch)
        finally:
            heap.ended()

    def take_over(shard: int, epoch: int) -> None:
        store.gain(shard, epoch)  # at once: requests for it wait rather than bounce
        heap.started()
        try:
            takeover_pool.submit(take, shard, epoch)
        except BaseException:  # the pool is shut down: the node is stopping
            heap.ended()
            raise

    agent = OwnershipAgent(
        etcd,
        NodeInfo(cfg.node_id, cfg.zone, cfg.city),
        cfg.advertise_address,
        cfg.lease_ttl_s,
        on_gained=take_over,
        on_lost=store.lose,
    )
    # The processor calls the banks of a batch concurrently (batch_pool) and asks about
    # each unanswered transfer of a call being answered concurrently (inquiry_pool): no
    # task waits for a task of its own pool. Not resolver_pool: a takeover queues every
    # undecided payment it found there, each up to a bank's whole inquiry and reversal
    # bound, and a live call's inquiries must not wait behind that backlog.
    batch_pool = ThreadPoolExecutor(cfg.batch_workers, thread_name_prefix="batch")
    inquiry_pool = ThreadPoolExecutor(cfg.resolver_workers, thread_name_prefix="inquire")
    processor = PaymentProcessor(
        zone=cfg.zone, store=store, bank=bank, registry=registry, pool=batch_pool,
        resolve_pool=inquiry_pool,
    )  # fmt: skip
    admin = AdminDomain(participants, wall_clock_us)
    revoked = RevocationList()
    revocations = Revocations(CassandraRevocations(session, cl), revoked, wall_clock_us)
    router_pool = ThreadPoolExecutor(cfg.router_workers, thread_name_prefix="route")
    local = LocalOwner(processor)
    router = Router(
        node_id=cfg.node_id,
        zone=cfg.zone,
        owners=agent,
        local=local,
        pool=router_pool,
        credentials=client_credentials,
        channel_options=node_channel_options(cfg.max_request_bytes, cfg.max_response_bytes),
    )
    tel = telemetry.current()

    def quota_per_s(common_name: str) -> int:
        caller = Identity.parse(common_name)
        if caller is None or not caller.role.is_participant:
            return cfg.staff_quota_per_s
        p = registry.snapshot().get(caller.name)
        if p is not None and p.payments_per_s_quota > 0:
            return p.payments_per_s_quota
        return cfg.participant_quota_per_s

    security = SecurityInterceptor(SWITCH_POLICY, RateLimiter(quota_per_s), revoked=revoked)
    server = grpc.server(
        ThreadPoolExecutor(cfg.grpc_workers, thread_name_prefix="grpc"),
        maximum_concurrent_rpcs=cfg.max_concurrent_rpcs,
        options=[
            *server_options(cfg.max_request_bytes, cfg.max_response_bytes),
            ("grpc.so_reuseport", 0),
        ],
        # Telemetry outermost, so refused calls are counted and traced too; then the
        # guard (undecodable bytes never reach the policy), then identity and quota.
        interceptors=[
            *([tel.server_interceptor()] if tel is not None else []),
            RequestGuardInterceptor(),
            security,
        ],
    )
    health_servicer = health.HealthServicer()
    windows = CassandraWindows(session, cl)

    def kinds() -> dict[str, Any]:
        return {pid: p.kind for pid, p in registry.snapshot().items()}

    keeper = WindowKeeper(
        node_id=cfg.node_id, store=store, ledger=ledger, windows=windows, kinds=kinds,
        clock=wall_clock_us, interval_s=cfg.window_interval_s,
    )  # fmt: skip
    by_city = dict(cfg.cassandra_by_city)

    def city_reader(city: str) -> tuple[Any, Any, Any]:
        hosts = by_city.get(city, ())
        if not hosts:
            raise LookupError(f"no Cassandra node in {city}")
        c, sess = connect_to_node(
            hosts[0], cfg.cassandra.port, consistency="LOCAL_ONE", keyspace=cfg.cassandra.keyspace
        )
        local_one = consistency_level("LOCAL_ONE")
        return CassandraLedger(sess, local_one), CassandraWindows(sess, local_one), c.shutdown

    audit = AuditDomain(
        ledger=ledger, windows=windows, kinds=kinds, cities=list(by_city),
        city_reader=city_reader, signing_keys=participants.signing_key_history,
    )  # fmt: skip
    node = Node(
        cfg, server, 0, health_servicer, registry, participants, processor, store, router,
        agent, resolver_pool, keeper, stopping=stopping, revocations=revocations,
    )  # fmt: skip
    settlement_pb2_grpc.add_SettlementServiceServicer_to_server(
        SettlementServicer(windows, cfg.node_id, wall_clock_us), server
    )

    def registered(participant_id: str) -> bool:
        # The registry first; the store for one registered since its last refresh (2 s).
        return participant_id in registry.snapshot() or participants.get(participant_id) is not None

    audit_pb2_grpc.add_AuditServiceServicer_to_server(
        AuditServicer(audit, router, ledger, registered), server
    )
    payment_pb2_grpc.add_PaymentServiceServicer_to_server(
        PaymentServicer(router, ledger, registry), server
    )
    shard_pb2_grpc.add_ShardServiceServicer_to_server(
        ShardServicer(local, node.describe, registry), server
    )
    admin_pb2_grpc.add_AdminServiceServicer_to_server(
        AdminServicer(admin, on_change=node.after_admin_change, revocations=revocations), server
    )
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    node.port = server.add_secure_port(
        f"{cfg.listen_host}:{cfg.listen_port}", pki.server_credentials(keys)
    )
    if node.port == 0:
        raise OSError(f"could not bind {cfg.listen_host}:{cfg.listen_port}")
    node.set_serving(False)
    node.closers += [
        cluster.shutdown,
        bank.close,
        router.close,
        etcd.close,
        lambda: batch_pool.shutdown(wait=False),
        lambda: router_pool.shutdown(wait=False),
        lambda: takeover_pool.shutdown(wait=False),
        lambda: resolver_pool.shutdown(wait=False),
        lambda: inquiry_pool.shutdown(wait=False),
    ]
    return node
