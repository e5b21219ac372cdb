"""Start and stop one simulated bank's gRPC server.

``serve(config)`` binds the address, starts serving BankService, gRPC health checking
and server reflection, and returns a :class:`BankServerHandle`. The handle gives the
bound port, the drill switches and the book, and stops the server.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from clearing.v1 import bank_pb2, bank_pb2_grpc
from clearinghouse.bank._behaviour import BankBehaviour, BankControls
from clearinghouse.bank._ledger import BankLedger
from clearinghouse.bank._servicer import BankServicer
from clearinghouse.request_guard import RequestGuardInterceptor
from clearinghouse.security.authz import BANK_POLICY, SecurityInterceptor
from clearinghouse.security.pki import KeyPair, server_credentials

_log = logging.getLogger(__name__)

BANK_SERVICE_NAME: str = bank_pb2.DESCRIPTOR.services_by_name["BankService"].full_name
# The health checking service's name for the server as a whole.
OVERALL_HEALTH = ""
# Worker threads. A hanging call holds one until its caller gives up, so there are
# more than a bank's usual load needs.
MAX_WORKERS = 32
# Calls admitted at once, running or queued for a worker; gRPC refuses more with
# RESOURCE_EXHAUSTED instead of letting a queue grow without bound.
MAX_CONCURRENT_RPCS = 256
# BankService messages are a few hundred bytes; anything near this is an error.
MAX_MESSAGE_BYTES = 1 << 20
# How long in-flight calls may take to finish when the server stops, in seconds.
GRACE_S = 5.0


@dataclass(frozen=True, slots=True)
class BankConfig:
    """What one bank process serves, and where."""

    bank_id: str
    # The bank's certificate and key, and the switch's CA: the bank serves over TLS and
    # answers only the switch's nodes (clients with a node certificate).
    keys: KeyPair
    listen: str = "127.0.0.1:0"
    # The JSON-lines journal of the book; None keeps the book in memory only.
    journal_path: Path | None = None
    behaviour: BankBehaviour = field(default_factory=BankBehaviour)
    max_workers: int = MAX_WORKERS
    max_concurrent_rpcs: int = MAX_CONCURRENT_RPCS


class BankServerHandle:
    """A running bank server. ``stop()`` is idempotent and safe from any thread."""

    def __init__(
        self,
        *,
        config: BankConfig,
        server: grpc.Server,
        port: int,
        ledger: BankLedger,
        controls: BankControls,
        health_servicer: health.HealthServicer,
    ) -> None:
        self.bank_id = config.bank_id
        self.host = config.listen.rpartition(":")[0]
        self.port = port
        self.ledger = ledger
        self.controls = controls
        self._server = server
        self._health = health_servicer
        self._stop_lock = threading.Lock()
        self._stopped = False

    @property
    def address(self) -> str:
        """The ``host:port`` clients dial."""
        return f"{self.host}:{self.port}"

    def toggle_outage(self) -> bool:
        """Switch the simulated outage on or off; returns whether the bank is down."""
        return self.controls.toggle_outage()

    def toggle_hang_all(self) -> bool:
        """Switch "hang every request" on or off; returns whether it is now on."""
        return self.controls.toggle_hang_all()

    def stop(self, grace_s: float = GRACE_S) -> None:
        """Stop serving: health turns NOT_SERVING, hanging calls are released with
        UNAVAILABLE, in-flight calls get ``grace_s`` to finish, and the journal closes."""
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
        self._health.enter_graceful_shutdown()
        self.controls.stopping.set()
        self._server.stop(grace_s).wait()
        self.ledger.close()
        _log.info("bank %s stopped; totals %s", self.bank_id, self.ledger.totals())

    def wait_for_termination(self, timeout_s: float | None = None) -> bool:
        """Block until the server stops; returns False if ``timeout_s`` passed first."""
        return not self._server.wait_for_termination(timeout_s)


def serve(config: BankConfig) -> BankServerHandle:
    """Open the bank's book, bind ``config.listen`` and start serving."""
    ledger = BankLedger(config.bank_id, config.journal_path)
    controls = BankControls(config.behaviour)
    server = grpc.server(
        ThreadPoolExecutor(
            max_workers=config.max_workers, thread_name_prefix=f"bank-{config.bank_id}"
        ),
        maximum_concurrent_rpcs=config.max_concurrent_rpcs,
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            # gRPC sets SO_REUSEPORT by default, which would let a second bank bind the
            # same fixed port silently and steal half of the first one's calls.
            ("grpc.so_reuseport", 0),
        ],
        # The guard first: undecodable bytes never reach the policy or the servicer.
        interceptors=[RequestGuardInterceptor(), SecurityInterceptor(BANK_POLICY)],
    )
    bank_pb2_grpc.add_BankServiceServicer_to_server(BankServicer(ledger, controls), server)

    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)

    def publish_health(behaviour: BankBehaviour) -> None:
        # A bank in a simulated outage reports NOT_SERVING, as a real one whose
        # backend is down would, so that probes and the switch see the same thing.
        status = (
            health_pb2.HealthCheckResponse.NOT_SERVING
            if behaviour.outage
            else health_pb2.HealthCheckResponse.SERVING
        )
        for service in (OVERALL_HEALTH, BANK_SERVICE_NAME):
            health_servicer.set(service, status)

    publish_health(config.behaviour)
    controls.add_listener(publish_health)
    reflection.enable_server_reflection(
        (BANK_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )

    try:
        port = server.add_secure_port(config.listen, server_credentials(config.keys))
    except RuntimeError as exc:
        ledger.close()
        raise OSError(f"bank {config.bank_id} cannot listen on {config.listen}: {exc}") from exc
    if port == 0:
        # Older gRPC releases report a failed bind as port 0 instead of raising.
        ledger.close()
        raise OSError(f"bank {config.bank_id} cannot listen on {config.listen}")
    server.start()
    handle = BankServerHandle(
        config=config,
        server=server,
        port=port,
        ledger=ledger,
        controls=controls,
        health_servicer=health_servicer,
    )
    _log.info("bank %s serving on %s", config.bank_id, handle.address)
    return handle
