"""Helpers for tests against the real cluster: sessions pinned to a city, probe rows."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from cassandra import ConsistencyLevel
from cassandra.cluster import Session
from cassandra.query import SimpleStatement

from clearing.v1 import common_pb2, payment_pb2
from clearinghouse import demo
from clearinghouse.client import SwitchClient, error_details
from clearinghouse.localcluster.cluster import LocalCluster
from clearinghouse.storage.session import CassandraConfig, connect, connect_to_node
from clearinghouse.switch.config import REGISTRY_REFRESH_S
from clearinghouse.switch.convert import us_to_ts
from clearinghouse.switch.indexer import INDEX_FLUSH_S

T = TypeVar("T")


@contextmanager
def session_preferring(lc: LocalCluster, city: str) -> Iterator[Session]:
    """A session as the switch makes it: local city first, the other cities after."""
    nodes = lc.cassandra_nodes()
    cfg = CassandraConfig.from_topology(
        lc.topo, city, [n.zone.address for n in nodes], keyspace=lc.topo.keyspace.name
    )
    cluster, session = connect(cfg)
    try:
        yield session
    finally:
        cluster.shutdown()


@contextmanager
def session_on_replica(lc: LocalCluster, zone: str) -> Iterator[Session]:
    """A session that talks to one node only, so LOCAL_ONE reads that node's own replica."""
    z = lc.topo.zone(zone)
    cluster, session = connect_to_node(z.address, z.ports.cql, keyspace=lc.topo.keyspace.name)
    try:
        yield session
    finally:
        cluster.shutdown()


def write_probe(session: Session, tag: str, consistency: int = ConsistencyLevel.QUORUM) -> str:
    pid = f"{tag}-{uuid.uuid4()}"
    stmt = SimpleStatement(
        "INSERT INTO probe (id, written_at, written_by, payload) "
        "VALUES (%s, toTimestamp(now()), %s, %s)",
        consistency_level=consistency,
    )
    session.execute(stmt, (pid, tag, f"payload of {pid}"))
    return pid


def read_probe(session: Session, pid: str, consistency: int = ConsistencyLevel.QUORUM) -> Any:
    stmt = SimpleStatement(
        "SELECT id, payload FROM probe WHERE id = %s", consistency_level=consistency
    )
    return session.execute(stmt, (pid,)).one()


def eventually(check: Callable[[], bool], timeout_s: float, every_s: float = 1.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(every_s)
    return check()


# Listings come from the time index, which each shard's owner writes about every
# INDEX_FLUSH_S after the ledger itself (clearinghouse.switch.indexer): a test that lists
# what it has just paid waits up to this long for it to appear.
LISTING_LAG_S = 10 * INDEX_FLUSH_S


def listed(listing: Callable[[], T], ready: Callable[[T], bool]) -> T:
    """What ``listing`` returns once ``ready`` says it holds what the test paid, or after
    :data:`LISTING_LAG_S` what it returns then (for the test's assertion to show)."""
    deadline = time.monotonic() + LISTING_LAG_S
    while True:
        out = listing()
        if ready(out) or time.monotonic() >= deadline:
            return out
        time.sleep(INDEX_FLUSH_S / 4)


# -- the switch: participants, bank simulators, clients to every zone -----------------

DEBIT = common_pb2.PAYMENT_TYPE_DEBIT
EXTRA_BANKS = [
    {
        "participant_id": "BANK_SLOW", "name": "A bank that answers too late", "bank_code": "SLOW",
        "listen": "127.0.0.1:16199", "currencies": ["CNY"], "net_debit_caps": {"CNY": 10**11},
        "approve_ratio": 1.0, "latency_ms": "1-2",
        # It applies every transfer but answers only after 8 s, past the 5 s deadline.
        "timeout_ratio": 1.0, "hang_ms": 8000,
    },
    {
        "participant_id": "BANK_FLAKY", "name": "A bank whose outages the tests switch on",
        "bank_code": "FLAKY", "listen": "127.0.0.1:16197", "currencies": ["CNY"],
        "net_debit_caps": {"CNY": 10**11}, "approve_ratio": 1.0, "latency_ms": "1-3",
    },
    {
        "participant_id": "BANK_LAGGY", "name": "A bank that takes about two seconds",
        "bank_code": "LAGGY", "listen": "127.0.0.1:16198", "currencies": ["CNY"],
        "net_debit_caps": {"CNY": 10**11}, "approve_ratio": 1.0, "latency_ms": "1500-2500",
    },
]  # fmt: skip


@dataclass
class SwitchEnv:
    lc: LocalCluster
    clients: dict[str, SwitchClient]
    parts: dict[str, Any]

    def register_capped_institution(self, prefix: str, name: str, cap_cny_minor: int) -> str:
        """A new institution (``prefix`` and a random suffix) with a net debit cap in CNY,
        registered and seen by every node's registry; its id."""
        inst = f"{prefix}{uuid.uuid4().hex[:6].upper()}"
        institution = {"participant_id": inst, "name": name, "currencies": ["CNY"],
                       "net_debit_caps": {"CNY": cap_cny_minor}}  # fmt: skip
        demo.register_participants(
            next(iter(self.clients.values())), {"institutions": [institution], "banks": []}, print
        )
        time.sleep(REGISTRY_REFRESH_S * 1.5)
        return inst

    def order(self, **kw: Any) -> payment_pb2.PaymentOrder:
        base: dict[str, Any] = {
            "payment_id": f"t-{uuid.uuid4().hex[:20]}",
            "institution_id": "INST_ALIPAY",
            "type": DEBIT,
            "payer_id": "BANK_ICBC",
            "payee_id": "INST_ALIPAY",
            "bank_account": "6222020000000001",
            "amount": common_pb2.Money(amount_minor=12345, currency="CNY"),
            "memo": "top-up",
            "requested_at": us_to_ts(time.time_ns() // 1000),
        }
        base.update(kw)
        return payment_pb2.PaymentOrder(**base)

    def submit(self, zone: str, order: payment_pb2.PaymentOrder) -> Any:
        return self.clients[zone].payments.SubmitPayment(
            payment_pb2.SubmitPaymentRequest(order=order), timeout=30
        )

    def submit_until_final(
        self, zones: list[str], order: payment_pb2.PaymentOrder, budget_s: float
    ) -> tuple[Any, int]:
        """Submit as a real client does: on UNAVAILABLE, retry the same order (on the next
        zone) after the advised pause, within ``budget_s``. Returns (response, retries)."""
        deadline = time.monotonic() + budget_s
        retries = 0
        while True:
            zone = zones[retries % len(zones)]
            try:
                return self.submit(zone, order), retries
            except grpc.RpcError as e:
                code = e.code() if isinstance(e, grpc.Call) else None
                if code is not grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise
                err = error_details(e)
                pause_s = (err.retry_after_ms if err and err.retry_after_ms else 500) / 1000
                time.sleep(min(pause_s, max(0.0, deadline - time.monotonic())))
                retries += 1

    def get(self, zone: str, order: payment_pb2.PaymentOrder) -> Any:
        req = payment_pb2.GetPaymentRequest(
            institution_id=order.institution_id, payment_id=order.payment_id
        )
        return self.clients[zone].payments.GetPayment(req, timeout=10).payment

    def bank_journal(self, bank_id: str) -> list[dict[str, Any]]:
        path = demo.bank_managed(self.lc, bank_id).directory / "journal.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def transfers_at_bank(self, bank_id: str, switch_ref: str) -> int:
        """How many times the bank's book applied a transfer with this reference."""
        return sum(
            1 for e in self.bank_journal(bank_id)
            if e.get("op") == "transfer" and e.get("ref") == switch_ref
        )  # fmt: skip


def start_switch_env(lc: LocalCluster) -> SwitchEnv:
    lc.up()
    parts = demo.load_participants()
    parts["banks"] = [*parts["banks"], *EXTRA_BANKS]
    demo.start_banks(lc, parts, print)
    clients = {z.name: SwitchClient.connect(lc.topo, z.name) for z in lc.topo.zones}
    demo.register_participants(clients[lc.topo.zones[0].name], parts, print)
    time.sleep(REGISTRY_REFRESH_S * 1.5)  # every node's registry has refreshed by then
    return SwitchEnv(lc, clients, parts)
