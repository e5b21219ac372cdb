"""A switch node's configuration: typed, frozen, with units in every name.

Built once at process start from the topology and the command line; nothing is read
from the environment at import time.
"""

from __future__ import annotations

from dataclasses import dataclass

from clearinghouse.storage.session import CassandraConfig
from clearinghouse.topology import Topology

GRPC_WORKERS = 32
MAX_CONCURRENT_RPCS = 256
BATCH_WORKERS = 64
MAX_MESSAGE_BYTES = 4 << 20
REGISTRY_REFRESH_S = 2.0
SHUTDOWN_GRACE_S = 5.0
OWED_REVERSAL_RETRY_S = 5.0


@dataclass(frozen=True, slots=True)
class NodeConfig:
    zone: str
    city: str
    listen_host: str
    listen_port: int
    cassandra: CassandraConfig
    grpc_workers: int = GRPC_WORKERS
    max_concurrent_rpcs: int = MAX_CONCURRENT_RPCS
    batch_workers: int = BATCH_WORKERS
    max_message_bytes: int = MAX_MESSAGE_BYTES
    registry_refresh_s: float = REGISTRY_REFRESH_S
    shutdown_grace_s: float = SHUTDOWN_GRACE_S
    owed_reversal_retry_s: float = OWED_REVERSAL_RETRY_S

    @classmethod
    def for_zone(
        cls, topo: Topology, zone_name: str, cassandra_hosts: list[str], port: int | None = None
    ) -> NodeConfig:
        zone = topo.zone(zone_name)
        # The node's own city first, so the driver's contact point list starts local.
        hosts = sorted(cassandra_hosts, key=lambda h: topo_city_of(topo, h) != zone.city)
        return cls(
            zone=zone.name,
            city=zone.city,
            listen_host=zone.address,
            listen_port=zone.ports.switch if port is None else port,
            cassandra=CassandraConfig.from_topology(topo, zone.city, hosts, topo.keyspace.name),
        )


def topo_city_of(topo: Topology, address: str) -> str:
    for z in topo.zones:
        if z.address == address:
            return z.city
    return ""
