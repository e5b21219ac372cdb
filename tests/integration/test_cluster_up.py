"""The cluster comes up from nothing, as three cities, and QUORUM writes land in them."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pyetcd
import pyetcd.exceptions
import pytest
from cassandra import ConsistencyLevel
from pyetcd import etcdrpc

from clearinghouse.localcluster import etcd as etcd_mod
from clearinghouse.localcluster.cluster import LocalCluster
from clearinghouse.ownership import etcd_backend
from clearinghouse.ownership.view import KEY_PREFIX, shard_key
from clearinghouse.security import pki
from clearinghouse.switch.records import SHARD_COUNT
from tests.support import read_probe, session_on_replica, session_preferring, write_probe

pytestmark = pytest.mark.integration


def test_every_process_is_up_and_etcd_has_a_leader(healthy_cluster: LocalCluster) -> None:
    st = healthy_cluster.status(with_ring=True)
    rows = st["processes"]
    zones = healthy_cluster.topo.zone_names()
    assert {(r["kind"], r["zone"]) for r in rows} == {
        *((k, z) for k in ("etcd", "cassandra") for z in ("beijing-a", "shanghai-a", "shenzhen-a")),
        *(("switch", z) for z in zones),
    }
    assert all(r["state"] == "up" and r["listening"] for r in rows), rows
    assert st["etcd"]["leader"] in {"beijing-a", "shanghai-a", "shenzhen-a"}
    ring = st["cassandra_ring"]
    assert sorted((r["dc"], r["rack"], r["status"]) for r in ring) == [
        ("beijing", "beijing-a", "U"),
        ("shanghai", "shanghai-a", "U"),
        ("shenzhen", "shenzhen-a", "U"),
    ]


def test_keyspace_is_replicated_over_the_three_cities(healthy_cluster: LocalCluster) -> None:
    with session_preferring(healthy_cluster, "beijing") as s:
        row = s.execute(
            "SELECT replication FROM system_schema.keyspaces WHERE keyspace_name = %s",
            (healthy_cluster.topo.keyspace.name,),
        ).one()
    repl = dict(row.replication)
    assert repl.pop("class").endswith("NetworkTopologyStrategy")
    assert repl == {"beijing": "1", "shanghai": "1", "shenzhen": "1"}


def test_quorum_write_is_acknowledged_and_lands_in_every_city(
    healthy_cluster: LocalCluster,
) -> None:
    with session_preferring(healthy_cluster, "shanghai") as s:
        pid = write_probe(s, "quorum")
        assert read_probe(s, pid).payload == f"payload of {pid}"
    # QUORUM needs two cities to acknowledge; the third receives the write too. Each
    # city's own replica is read alone (LOCAL_ONE through a session pinned to it).
    seen = []
    for z in ("beijing-a", "shanghai-a", "shenzhen-a"):
        with session_on_replica(healthy_cluster, z) as s:
            seen.append(read_probe(s, pid, ConsistencyLevel.LOCAL_ONE) is not None)
    assert sum(seen) >= 2, seen


def test_schema_apply_is_idempotent(healthy_cluster: LocalCluster) -> None:
    assert healthy_cluster.apply_schema() == []


def test_status_json_from_the_command_line(healthy_cluster: LocalCluster) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "clearinghouse.cli",
            "--state-dir",
            str(healthy_cluster.paths.state),
            "cluster",
            "status",
            "--json",
            "--no-ring",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    st = json.loads(out.stdout)
    up = {(r["kind"], r["zone"]) for r in st["processes"] if r["state"] == "up"}
    assert {z for k, z in up if k == "cassandra"} == {"beijing-a", "shanghai-a", "shenzhen-a"}
    assert {z for k, z in up if k == "switch"} == set(healthy_cluster.topo.zone_names())


def test_etcd_answers_only_certificates_of_the_cluster_ca(healthy_cluster: LocalCluster) -> None:
    """etcd decides who writes each ledger shard: only the cluster's own CA opens it.
    The switch's CA (participants, and an operator of the same name) and plaintext do not."""
    lc = healthy_cluster
    member = lc.etcd_members()[0]
    z = member.zone

    client = lc.etcd_client(z)
    try:
        owners = list(client.get_prefix(shard_key(KEY_PREFIX, 0)[:-1]))
    finally:
        client.close()
    assert len(owners) == SHARD_COUNT
    assert etcd_mod.healthy(member, lc.etcd_files())

    # The same operator name, certified by the switch's CA instead, from a client that
    # trusts etcd's certificate: etcd refuses it in the handshake.
    switch_operator = pki.LocalCA(lc.pki_dir).files(pki.operator())
    foreign = pki.PemFiles(lc.etcd_files().ca, switch_operator.cert, switch_operator.key)
    assert not etcd_mod.healthy(member, foreign)
    for refused in (
        etcd_backend.connect(z.address, z.ports.etcd_client, foreign, timeout_s=3),
        pyetcd.client(host=z.address, port=z.ports.etcd_client, timeout=3),  # plaintext
    ):
        try:
            with pytest.raises(pyetcd.exceptions.Etcd3Exception):
                refused.get(shard_key(KEY_PREFIX, 0))
        finally:
            refused.close()


def test_a_node_s_etcd_channel_moves_past_a_member_that_does_not_answer(
    healthy_cluster: LocalCluster,
) -> None:
    """The agent's one channel over every member: the first is down (nothing listens
    there), the call is answered by the next, checked by the members' shared name."""
    lc = healthy_cluster
    live = lc.etcd_members()[1].zone
    dead = (lc.etcd_members()[0].zone.address, _free_port())
    keys = pki.LocalCA(lc.etcd_pki_dir).load(pki.node(lc.topo.zones[0].name))
    members = etcd_backend.MemberChannel([dead, (live.address, live.ports.etcd_client)], keys)
    try:
        kv = etcdrpc.KVStub(members.channel)
        resp = kv.Range(etcdrpc.RangeRequest(key=shard_key(KEY_PREFIX, 0).encode()), timeout=10)
        assert resp.count == 1
    finally:
        members.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
