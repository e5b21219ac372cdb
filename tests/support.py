"""Helpers for tests against the real cluster: sessions pinned to a city, probe rows."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from cassandra import ConsistencyLevel
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile, Session
from cassandra.policies import WhiteListRoundRobinPolicy
from cassandra.query import SimpleStatement
from clearinghouse.localcluster.cluster import LocalCluster
from clearinghouse.storage.session import CassandraConfig, connect


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
    profile = ExecutionProfile(
        load_balancing_policy=WhiteListRoundRobinPolicy([z.address]),
        consistency_level=ConsistencyLevel.LOCAL_ONE,
        request_timeout=10,
    )
    cluster = Cluster(
        [z.address],
        port=z.ports.cql,
        protocol_version=5,
        execution_profiles={EXEC_PROFILE_DEFAULT: profile},
        connect_timeout=5,
    )
    session = cluster.connect(lc.topo.keyspace.name)
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
