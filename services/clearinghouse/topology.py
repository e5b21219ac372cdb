"""The cluster's shape, read from ``cluster/topology.json``.

Three cities with two zones each; every zone has its own loopback address and ports.
This module is the only reader of that file: the launcher, Cassandra's dc/rack, the
etcd members and the switch nodes all take their zones from :class:`Topology`.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clearinghouse._invariant import invariant

PORT_NAMES = ("etcd_client", "etcd_peer", "cql", "storage", "jmx", "switch", "admin_http")
CONSISTENCY_LEVELS_SPANNING_CITIES = ("QUORUM", "ALL")


class TopologyError(ValueError):
    """The topology file is malformed; the message names the field."""


@dataclass(frozen=True, slots=True)
class Ports:
    etcd_client: int
    etcd_peer: int
    cql: int
    storage: int
    jmx: int
    switch: int
    admin_http: int


@dataclass(frozen=True, slots=True)
class Zone:
    name: str
    city: str
    address: str
    ports: Ports
    index_in_city: int


@dataclass(frozen=True, slots=True)
class City:
    name: str
    zones: tuple[Zone, ...]
    index: int


@dataclass(frozen=True, slots=True)
class Keyspace:
    name: str
    write_consistency: str
    read_consistency: str


@dataclass(frozen=True, slots=True)
class Topology:
    name: str
    keyspace: Keyspace
    cities: tuple[City, ...]
    etcd_zone_index: int
    cassandra_zone_index_when_one_per_city: int

    @property
    def zones(self) -> tuple[Zone, ...]:
        return tuple(z for c in self.cities for z in c.zones)

    def zone(self, name: str) -> Zone:
        for z in self.zones:
            if z.name == name:
                return z
        raise KeyError(f"unknown zone {name!r}; zones are {', '.join(self.zone_names())}")

    def city(self, name: str) -> City:
        for c in self.cities:
            if c.name == name:
                return c
        raise KeyError(f"unknown city {name!r}; cities are {', '.join(self.city_names())}")

    def zone_names(self) -> list[str]:
        return [z.name for z in self.zones]

    def city_names(self) -> list[str]:
        return [c.name for c in self.cities]

    def etcd_zones(self) -> tuple[Zone, ...]:
        """One etcd member per city."""
        return tuple(c.zones[self.etcd_zone_index] for c in self.cities)

    def cassandra_zones(self, nodes: int) -> tuple[Zone, ...]:
        """Zones that run a Cassandra node: one per city, or one per zone."""
        if nodes == len(self.cities):
            i = self.cassandra_zone_index_when_one_per_city
            return tuple(c.zones[i] for c in self.cities)
        if nodes == len(self.zones):
            return self.zones
        raise TopologyError(
            f"--cassandra-nodes must be {len(self.cities)} (one per city) "
            f"or {len(self.zones)} (one per zone), not {nodes}"
        )

    def __iter__(self) -> Iterator[Zone]:
        return iter(self.zones)


def default_path() -> Path:
    """``cluster/topology.json`` of the checkout this package runs from."""
    return Path(__file__).resolve().parents[2] / "cluster" / "topology.json"


def load(path: Path | None = None) -> Topology:
    p = path or default_path()
    try:
        raw = json.loads(p.read_text())
    except FileNotFoundError as e:
        raise TopologyError(f"topology file not found: {p}") from e
    except json.JSONDecodeError as e:
        raise TopologyError(f"{p}: not valid JSON: {e}") from e
    return parse(raw)


def _field(obj: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in obj:
        raise TopologyError(f"{where}: missing field {key!r}")
    return obj[key]


def parse(raw: Mapping[str, Any]) -> Topology:
    ks_raw = _field(raw, "keyspace", "topology")
    keyspace = Keyspace(
        name=str(_field(ks_raw, "name", "keyspace")),
        write_consistency=str(_field(ks_raw, "write_consistency", "keyspace")),
        read_consistency=str(_field(ks_raw, "read_consistency", "keyspace")),
    )
    for level in (keyspace.write_consistency, keyspace.read_consistency):
        if level not in CONSISTENCY_LEVELS_SPANNING_CITIES:
            raise TopologyError(
                f"keyspace consistency {level!r} does not put a write in two cities; "
                f"use one of {CONSISTENCY_LEVELS_SPANNING_CITIES}"
            )
    cities: list[City] = []
    for ci, c_raw in enumerate(_field(raw, "cities", "topology")):
        cname = str(_field(c_raw, "name", f"cities[{ci}]"))
        zones: list[Zone] = []
        for zi, z_raw in enumerate(_field(c_raw, "zones", f"city {cname}")):
            zname = str(_field(z_raw, "name", f"city {cname} zones[{zi}]"))
            if not zname.startswith(cname + "-"):
                raise TopologyError(f"zone {zname!r} must be named after its city {cname!r}")
            address = str(_field(z_raw, "address", f"zone {zname}"))
            try:
                ip = ipaddress.ip_address(address)
            except ValueError as e:
                raise TopologyError(f"zone {zname}: bad address {address!r}") from e
            if not ip.is_loopback:
                raise TopologyError(f"zone {zname}: {address} is not a loopback address")
            ports_raw = _field(z_raw, "ports", f"zone {zname}")
            ports = Ports(
                **{n: int(_field(ports_raw, n, f"zone {zname} ports")) for n in PORT_NAMES}
            )
            zones.append(Zone(zname, cname, address, ports, zi))
        cities.append(City(cname, tuple(zones), ci))
    placement = raw.get("placement", {})
    topo = Topology(
        name=str(_field(raw, "name", "topology")),
        keyspace=keyspace,
        cities=tuple(cities),
        etcd_zone_index=int(placement.get("etcd_zone_index", 0)),
        cassandra_zone_index_when_one_per_city=int(
            placement.get("cassandra_zone_index_when_one_per_city", 0)
        ),
    )
    _check(topo)
    return topo


def _check(topo: Topology) -> None:
    if len(topo.cities) < 3:
        raise TopologyError("a city-loss-tolerant cluster needs at least three cities")
    names = topo.zone_names()
    if len(set(names)) != len(names):
        raise TopologyError("zone names must be unique")
    addresses = [z.address for z in topo.zones]
    if len(set(addresses)) != len(addresses):
        raise TopologyError("each zone needs its own loopback address")
    if len({z.ports.cql for z in topo.zones}) != 1:
        # The Python driver takes one native port for the whole cluster.
        raise TopologyError("every zone must use the same cql port")
    jmx = [z.ports.jmx for z in topo.zones]
    if len(set(jmx)) != len(jmx):
        # Cassandra's local JMX binds to 127.0.0.1 whatever the node's address.
        raise TopologyError("JMX ports must differ between zones (local JMX binds 127.0.0.1)")
    for c in topo.cities:
        invariant(len(c.zones) >= 1, f"city {c.name} has no zones")
        if topo.etcd_zone_index >= len(c.zones):
            raise TopologyError(f"placement.etcd_zone_index out of range for {c.name}")
