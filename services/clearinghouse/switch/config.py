"""A switch node's configuration: typed, frozen, with units in every name.

Built once at process start from the topology and the command line; nothing is read
from the environment at import time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final

from clearinghouse.ownership.node import LEASE_TTL_S
from clearinghouse.storage.session import CassandraConfig
from clearinghouse.topology import Topology

GRPC_WORKERS = 32
MAX_CONCURRENT_RPCS = 256
BATCH_WORKERS = 64
# gRPC's own receive limit when none is set: a limit of ours must be below it, or a test
# of the limit would pass without the option.
GRPC_DEFAULT_RECEIVE_BYTES: Final = 4 << 20
# The largest request a node accepts; gRPC refuses a bigger one with RESOURCE_EXHAUSTED
# before any code of ours runs. The largest valid request is a full batch
# (BATCH_SIZE_MAX orders, every field at its longest: about 0.35 MiB, computed in
# tests/unit/test_hostile_input.py), so this leaves room and no more.
MAX_REQUEST_BYTES: Final = 1 << 20
# The largest response a node sends (and a node accepts from another): a page of 500
# payments with their events can be well over a request's size; what clients accept by
# default.
MAX_RESPONSE_BYTES: Final = 4 << 20
REGISTRY_REFRESH_S = 2.0
SHUTDOWN_GRACE_S = 5.0
OWED_REVERSAL_RETRY_S = 5.0
TAKEOVER_WORKERS = 8
RESOLVER_WORKERS = 8
ROUTER_WORKERS = 64
# A participant's default quota on each node, in payments per second (a payment in a
# batch counts one, any other call one); AdminService sets one per participant.
PARTICIPANT_QUOTA_PER_S = 2_000
# Operators and auditors: calls per second per node.
STAFF_QUOTA_PER_S = 200


@dataclass(frozen=True, slots=True)
class NodeConfig:
    zone: str
    city: str
    listen_host: str
    listen_port: int
    cassandra: CassandraConfig
    # This node's identity for shard ownership, and where other nodes forward to it.
    node_id: str
    advertise_address: str
    # Every etcd member (host, client port), the node's own city's first: the agent
    # moves to the next when one fails.
    etcd_endpoints: tuple[tuple[str, int], ...]
    # The local CA's folder: the node's certificate (node-<zone>/) and the CA's.
    pki_dir: Path
    # The cluster's own CA, which etcd trusts alone: the node's client certificate for
    # etcd (node-<zone>/) and that CA's.
    etcd_pki_dir: Path
    lease_ttl_s: int = LEASE_TTL_S
    # Cassandra addresses per city, for reading one city's own replica (audits).
    cassandra_by_city: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # Close the open settlement window this often (0: only on demand).
    window_interval_s: float = 0.0
    grpc_workers: int = GRPC_WORKERS
    max_concurrent_rpcs: int = MAX_CONCURRENT_RPCS
    batch_workers: int = BATCH_WORKERS
    max_request_bytes: int = MAX_REQUEST_BYTES
    max_response_bytes: int = MAX_RESPONSE_BYTES
    registry_refresh_s: float = REGISTRY_REFRESH_S
    shutdown_grace_s: float = SHUTDOWN_GRACE_S
    owed_reversal_retry_s: float = OWED_REVERSAL_RETRY_S
    takeover_workers: int = TAKEOVER_WORKERS
    resolver_workers: int = RESOLVER_WORKERS
    router_workers: int = ROUTER_WORKERS
    participant_quota_per_s: int = PARTICIPANT_QUOTA_PER_S
    staff_quota_per_s: int = STAFF_QUOTA_PER_S

    @classmethod
    def for_zone(
        cls,
        topo: Topology,
        zone_name: str,
        cassandra_hosts: list[str],
        port: int | None = None,
        *,
        pki_dir: Path,
        etcd_pki_dir: Path,
        lease_ttl_s: int = LEASE_TTL_S,
        window_interval_s: float = 0.0,
    ) -> NodeConfig:
        zone = topo.zone(zone_name)
        # The etcd members, the node's own city's first.
        etcd = sorted(topo.etcd_zones(), key=lambda z: z.city != zone.city)
        listen_port = zone.ports.switch if port is None else port
        # The node's own city first, so the driver's contact point list starts local.
        hosts = sorted(cassandra_hosts, key=lambda h: topo_city_of(topo, h) != zone.city)
        return cls(
            zone=zone.name,
            city=zone.city,
            listen_host=zone.address,
            listen_port=listen_port,
            cassandra=CassandraConfig.from_topology(topo, zone.city, hosts, topo.keyspace.name),
            node_id=zone.name,
            advertise_address=f"{zone.address}:{listen_port}",
            etcd_endpoints=tuple((z.address, z.ports.etcd_client) for z in etcd),
            pki_dir=pki_dir,
            etcd_pki_dir=etcd_pki_dir,
            lease_ttl_s=lease_ttl_s,
            cassandra_by_city=tuple(
                (c, tuple(h for h in cassandra_hosts if topo_city_of(topo, h) == c))
                for c in topo.city_names()
            ),
            window_interval_s=window_interval_s,
        )


def server_options(
    max_request_bytes: int = MAX_REQUEST_BYTES, max_response_bytes: int = MAX_RESPONSE_BYTES
) -> list[tuple[str, int]]:
    """The message size limits of a switch node's gRPC server (``server.build`` and the
    tests' in-process servers use this one list)."""
    return [
        ("grpc.max_receive_message_length", max_request_bytes),
        ("grpc.max_send_message_length", max_response_bytes),
    ]


def node_channel_options(
    max_request_bytes: int = MAX_REQUEST_BYTES, max_response_bytes: int = MAX_RESPONSE_BYTES
) -> list[tuple[str, int]]:
    """The same limits seen from a node calling another: it sends requests, receives
    responses."""
    return [
        ("grpc.max_send_message_length", max_request_bytes),
        ("grpc.max_receive_message_length", max_response_bytes),
    ]


def topo_city_of(topo: Topology, address: str) -> str:
    for z in topo.zones:
        if z.address == address:
            return z.city
    return ""
