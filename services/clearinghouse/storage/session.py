"""One way to connect to Cassandra: prefer the local city, fall back to the others.

``DCAwareRoundRobinPolicy`` is given ``local_dc`` explicitly and allowed to use remote
hosts, or losing the local city would surface as ``NoHostAvailable`` instead of a
slower but correct request through another city.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from cassandra import ConsistencyLevel
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile, Session
from cassandra.policies import (
    ConstantReconnectionPolicy,
    DCAwareRoundRobinPolicy,
    TokenAwarePolicy,
    WhiteListRoundRobinPolicy,
)

from clearinghouse.topology import Topology

log = logging.getLogger(__name__)


class _UseKeyspaceWarning(logging.Filter):
    """Drops Cassandra's warning (logged by the driver once per statement prepared on a
    connection) that a session bound to a keyspace prepares statements with unqualified
    table names (CASSANDRA-17248). Its concern is a statement prepared under one keyspace
    and run under another; every session here is bound to one keyspace for its life,
    so the warning only buried the logs (18 lines per switch node at each start)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "`USE <keyspace>` with prepared statements" not in record.getMessage()


USE_KEYSPACE_WARNING = _UseKeyspaceWarning()
logging.getLogger("cassandra.protocol").addFilter(USE_KEYSPACE_WARNING)

CONNECT_TIMEOUT_S = 5.0
REQUEST_TIMEOUT_S = 10.0
RECONNECT_DELAY_S = 1.0
REMOTE_HOSTS_PER_DC = 2
PROTOCOL_VERSION = 5
SCHEMA_AGREEMENT_WAIT_S = 30


@dataclass(frozen=True, slots=True)
class CassandraConfig:
    contact_points: tuple[str, ...]
    port: int
    local_dc: str
    keyspace: str | None = None
    consistency: str = "QUORUM"
    request_timeout_s: float = REQUEST_TIMEOUT_S
    connect_timeout_s: float = CONNECT_TIMEOUT_S

    @classmethod
    def from_topology(
        cls, topo: Topology, local_dc: str, contact_points: Sequence[str], keyspace: str | None
    ) -> CassandraConfig:
        port = topo.zones[0].ports.cql
        return cls(
            contact_points=tuple(contact_points),
            port=port,
            local_dc=local_dc,
            keyspace=keyspace,
            consistency=topo.keyspace.write_consistency,
        )


def consistency_level(name: str) -> int:
    level = ConsistencyLevel.name_to_value.get(name)
    if level is None:
        raise ValueError(f"unknown consistency level {name!r}")
    return int(level)


def connect(cfg: CassandraConfig, *, for_schema_changes: bool = False) -> tuple[Cluster, Session]:
    """Connect and return ``(cluster, session)``; the caller shuts the cluster down.

    ``for_schema_changes``: the driver neither waits for the cluster to agree after each
    schema change nor refreshes its schema metadata; ``storage.schema`` waits itself,
    with its own bound. The session still connects to every node it can, so a node that
    is down is known to be down and left out of that wait, and returns once every pool
    has been opened or has failed. No node is left without a pool (the changes go to
    whichever node holds the control connection, in any city).
    """
    remote_hosts = len(cfg.contact_points) if for_schema_changes else REMOTE_HOSTS_PER_DC
    profile = ExecutionProfile(
        load_balancing_policy=TokenAwarePolicy(
            DCAwareRoundRobinPolicy(local_dc=cfg.local_dc, used_hosts_per_remote_dc=remote_hosts)
        ),
        consistency_level=consistency_level(cfg.consistency),
        request_timeout=cfg.request_timeout_s,
    )
    cluster = Cluster(
        contact_points=list(cfg.contact_points),
        port=cfg.port,
        protocol_version=PROTOCOL_VERSION,
        execution_profiles={EXEC_PROFILE_DEFAULT: profile},
        connect_timeout=cfg.connect_timeout_s,
        control_connection_timeout=cfg.connect_timeout_s,
        reconnection_policy=ConstantReconnectionPolicy(RECONNECT_DELAY_S, max_attempts=None),
        max_schema_agreement_wait=0 if for_schema_changes else SCHEMA_AGREEMENT_WAIT_S,
        schema_metadata_enabled=not for_schema_changes,
    )
    # Schema changes are sent to one chosen node, which needs a pool of its own: by
    # default connect returns once the first pool is open, the others still opening.
    session = cluster.connect(cfg.keyspace, wait_for_all_pools=for_schema_changes)
    return cluster, session


def connect_to_node(
    address: str,
    port: int,
    *,
    consistency: str = "LOCAL_ONE",
    keyspace: str | None = None,
    timeout_s: float = CONNECT_TIMEOUT_S,
) -> tuple[Cluster, Session]:
    """A session that talks to one node only: what that node itself knows or stores.

    For operators and tests (is this city's replica caught up? does this node know every
    other?), never for the payment path, which must fall back to other cities.
    """
    profile = ExecutionProfile(
        load_balancing_policy=WhiteListRoundRobinPolicy([address]),
        consistency_level=consistency_level(consistency),
        request_timeout=timeout_s,
    )
    cluster = Cluster(
        [address],
        port=port,
        protocol_version=PROTOCOL_VERSION,
        execution_profiles={EXEC_PROFILE_DEFAULT: profile},
        connect_timeout=timeout_s,
        control_connection_timeout=timeout_s,
    )
    try:
        return cluster, cluster.connect(keyspace)
    except Exception:
        cluster.shutdown()
        raise
