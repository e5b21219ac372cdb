"""One switch node: connect to Cassandra, load the registry, serve gRPC until told to stop.

Health is NOT_SERVING until the registry is loaded, SERVING after, and NOT_SERVING again
while draining on SIGTERM. Reflection is on so that ``grpcurl`` can list the services.
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

from clearing.v1 import admin_pb2, admin_pb2_grpc, payment_pb2, payment_pb2_grpc
from clearinghouse.storage.participants import CassandraParticipantStore
from clearinghouse.storage.payments import CassandraPaymentStore
from clearinghouse.storage.session import connect, consistency_level
from clearinghouse.switch.admin import AdminDomain
from clearinghouse.switch.bank_gateway import GrpcBankGateway
from clearinghouse.switch.config import NodeConfig
from clearinghouse.switch.processor import PaymentProcessor, Registry, wall_clock_us
from clearinghouse.switch.servicers import AdminServicer, PaymentServicer

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    payment_pb2.DESCRIPTOR.services_by_name["PaymentService"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
)


@dataclass
class Node:
    cfg: NodeConfig
    server: grpc.Server
    port: int
    health: health.HealthServicer
    registry: Registry
    participants: CassandraParticipantStore
    processor: PaymentProcessor
    closers: list[Any] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)

    def refresh_registry(self) -> None:
        self.registry.replace(self.participants.all())

    def _refresh_loop(self) -> None:
        while not self.stopping.wait(self.cfg.registry_refresh_s):
            try:
                self.refresh_registry()
            except Exception:  # a refresh failure keeps the last good snapshot
                log.warning("participant registry refresh failed", exc_info=True)

    def _reversal_loop(self) -> None:
        while not self.stopping.wait(self.cfg.owed_reversal_retry_s):
            try:
                confirmed = self.processor.settle_owed_reversals()
                if confirmed:
                    log.info("owed reversals confirmed by their banks: %d", confirmed)
            except Exception:  # retried on the next round; the obligation stays recorded
                log.warning("settling owed reversals failed", exc_info=True)

    def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *SERVICE_NAMES):
            self.health.set(name, status)

    def start(self) -> None:
        # The registry first: a node whose port is open can already route payments.
        self.refresh_registry()
        self.server.start()
        threading.Thread(target=self._refresh_loop, name="registry-refresh", daemon=True).start()
        threading.Thread(target=self._reversal_loop, name="owed-reversals", daemon=True).start()
        self.set_serving(True)
        log.info("switch node %s serving on %s:%d", self.cfg.zone, self.cfg.listen_host, self.port)

    def stop(self) -> None:
        self.stopping.set()
        self.set_serving(False)
        self.server.stop(self.cfg.shutdown_grace_s).wait(self.cfg.shutdown_grace_s + 1)
        for close in reversed(self.closers):
            close()


def build(cfg: NodeConfig) -> Node:
    cluster, session = connect(cfg.cassandra)
    cl = consistency_level(cfg.cassandra.consistency)
    payments = CassandraPaymentStore(session, cl)
    participants = CassandraParticipantStore(session, cl)
    registry = Registry()
    bank = GrpcBankGateway()
    processor = PaymentProcessor(zone=cfg.zone, store=payments, bank=bank, registry=registry)
    admin = AdminDomain(participants, wall_clock_us)
    batch_pool = ThreadPoolExecutor(cfg.batch_workers, thread_name_prefix="batch")
    server = grpc.server(
        ThreadPoolExecutor(cfg.grpc_workers, thread_name_prefix="grpc"),
        maximum_concurrent_rpcs=cfg.max_concurrent_rpcs,
        options=[
            ("grpc.max_receive_message_length", cfg.max_message_bytes),
            ("grpc.max_send_message_length", cfg.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ],
    )
    health_servicer = health.HealthServicer()
    node = Node(cfg, server, 0, health_servicer, registry, participants, processor)
    payment_pb2_grpc.add_PaymentServiceServicer_to_server(
        PaymentServicer(processor, batch_pool), server
    )
    admin_pb2_grpc.add_AdminServiceServicer_to_server(
        AdminServicer(admin, on_change=node.refresh_registry), server
    )
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    node.port = server.add_insecure_port(f"{cfg.listen_host}:{cfg.listen_port}")
    if node.port == 0:
        raise OSError(f"could not bind {cfg.listen_host}:{cfg.listen_port}")
    node.set_serving(False)
    node.closers += [cluster.shutdown, bank.close, lambda: batch_pool.shutdown(wait=False)]
    return node
