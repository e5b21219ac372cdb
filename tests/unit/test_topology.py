from __future__ import annotations

import copy
import itertools
import json
from typing import Any

import pytest

from clearinghouse import topology
from clearinghouse.localcluster import cassandra
from clearinghouse.localcluster.cluster import parse_nodetool_status
from clearinghouse.localcluster.paths import Paths

pytestmark = pytest.mark.unit

EXPECTED_ZONES = ["beijing-a", "beijing-b", "shanghai-a", "shanghai-b", "shenzhen-a", "shenzhen-b"]


def _raw() -> dict[str, Any]:
    return json.loads(topology.default_path().read_text())


def test_topology_has_three_cities_of_two_zones() -> None:
    topo = topology.load()
    assert topo.zone_names() == EXPECTED_ZONES
    assert topo.city_names() == ["beijing", "shanghai", "shenzhen"]
    assert len({z.address for z in topo.zones}) == 6
    assert [z.name for z in topo.etcd_zones()] == ["beijing-a", "shanghai-a", "shenzhen-a"]


def test_cassandra_placement_and_replication() -> None:
    topo = topology.load()
    assert [z.name for z in topo.cassandra_zones(3)] == ["beijing-a", "shanghai-a", "shenzhen-a"]
    assert len(topo.cassandra_zones(6)) == 6
    with pytest.raises(topology.TopologyError):
        topo.cassandra_zones(4)
    assert cassandra.replication(topo, 3) == {"beijing": 1, "shanghai": 1, "shenzhen": 1}
    assert cassandra.replication(topo, 6) == {"beijing": 2, "shanghai": 2, "shenzhen": 2}


@pytest.mark.parametrize("count", [3, 6])
def test_tokens_unique_and_balanced_per_city(tmp_path: Any, count: int) -> None:
    topo = topology.load()
    nodes = cassandra.nodes(topo, Paths(tmp_path, tmp_path / "s", tmp_path / "c"), count)
    tokens = [n.initial_token for n in nodes]
    assert len(set(tokens)) == len(tokens)
    assert all(-(2**63) <= t < 2**63 for t in tokens)
    for city in topo.cities:
        in_city = sorted(n.initial_token for n in nodes if n.dc == city.name)
        gaps = [b - a for a, b in itertools.pairwise(in_city)]
        assert all(abs(g - 2**64 // len(in_city)) <= 3 for g in gaps)


def test_yaml_names_dc_rack_and_all_seeds(tmp_path: Any) -> None:
    topo = topology.load()
    nodes = cassandra.nodes(topo, Paths(tmp_path, tmp_path / "s", tmp_path / "c"), 6)
    text = cassandra.render_yaml(nodes[3], nodes, topo.name)
    assert f"listen_address: {nodes[3].zone.address}" in text
    assert "commitlog_sync: batch" in text
    for n in nodes:
        assert f"{n.zone.address}:{n.zone.ports.storage}" in text
    assert cassandra.render_rackdc(nodes[3]) == "dc=shanghai\nrack=shanghai-b\nprefer_local=true\n"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r["cities"].pop(), "at least three cities"),
        (lambda r: r["cities"][0]["zones"][0].update(address="10.0.0.1"), "not a loopback"),
        (lambda r: r["cities"][0]["zones"][1].update(address="127.0.1.1"), "own loopback address"),
        (lambda r: r["cities"][1]["zones"][0].update(name="beijing-x"), "named after its city"),
        (lambda r: r["keyspace"].update(write_consistency="LOCAL_QUORUM"), "two cities"),
        (lambda r: r["cities"][0]["zones"][0]["ports"].pop("cql"), "'cql'"),
        (lambda r: r["cities"][2]["zones"][0]["ports"].update(jmx=17101), "JMX ports"),
    ],
)
def test_bad_topologies_are_refused_with_the_field_named(mutate: Any, message: str) -> None:
    raw = copy.deepcopy(_raw())
    mutate(raw)
    with pytest.raises(topology.TopologyError, match=message):
        topology.parse(raw)


def test_parse_nodetool_status() -> None:
    host = "89d57a7f-1508-4654-9552-809ba2831a44"
    text = "\n".join(
        [
            "Datacenter: beijing",
            "===================",
            "Status=Up/Down",
            "|/ State=Normal/Leaving/Joining/Moving",
            "--  Address    Load        Owns (effective)  Host ID  Token  Rack",
            f"UN  127.0.1.1  117.25 KiB  100.0%  {host}  -9223372036854775808  beijing-a",
            "",
            "Datacenter: shanghai",
            "====================",
            "--  Address    Load        Owns (effective)  Host ID  Token  Rack",
            f"DN  127.0.2.1  114.39 KiB  100.0%  {host}  -9223372036854775807  shanghai-a",
        ]
    )
    rows = parse_nodetool_status(text)
    assert rows == [
        {"dc": "beijing", "status": "U", "state": "N", "address": "127.0.1.1", "rack": "beijing-a"},
        {
            "dc": "shanghai",
            "status": "D",
            "state": "N",
            "address": "127.0.2.1",
            "rack": "shanghai-a",
        },
    ]
