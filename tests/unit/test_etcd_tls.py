"""etcd is started with TLS only, from the cluster's own CA (localcluster.etcd)."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from clearinghouse.localcluster import etcd, procs
from clearinghouse.localcluster.cluster import ClusterError, LocalCluster
from clearinghouse.localcluster.paths import Paths
from clearinghouse.ownership.etcd_backend import (
    HOME_PROBE_TIMEOUT_S,
    MEMBER_SERVER_NAME,
    MemberChannel,
    away_from_home,
)
from clearinghouse.ownership.node import LEASE_TTL_S, Timing
from clearinghouse.security import pki
from clearinghouse.switch.config import NodeConfig
from clearinghouse.topology import Topology

pytestmark = pytest.mark.unit

# What the member a node moves to needs to renew its lease: a TLS connection and one
# keepalive forwarded to etcd's leader, across cities.
RENEW_THROUGH_ANOTHER_MEMBER_S = 1.0


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_every_url_is_https_and_clients_and_peers_must_present_a_certificate(
    topo: Topology, tmp_path: Path
) -> None:
    members = etcd.members(topo, Paths.default(tmp_path))
    files = pki.PemFiles(tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem")
    argv = etcd.argv(members[1], members, "test", files)
    for flag in (
        "--listen-client-urls",
        "--advertise-client-urls",
        "--listen-peer-urls",
        "--initial-advertise-peer-urls",
    ):
        assert _flag(argv, flag).startswith("https://"), flag
    assert all(
        u.split("=", 1)[1].startswith("https://")
        for u in _flag(argv, "--initial-cluster").split(",")
    )
    assert {"--client-cert-auth", "--peer-client-cert-auth"} <= set(argv)
    assert (
        _flag(argv, "--trusted-ca-file") == _flag(argv, "--peer-trusted-ca-file") == str(files.ca)
    )
    assert _flag(argv, "--cert-file") == _flag(argv, "--peer-cert-file") == str(files.cert)
    assert _flag(argv, "--key-file") == _flag(argv, "--peer-key-file") == str(files.key)


def test_a_plain_http_endpoint_is_refused_before_any_request(tmp_path: Path) -> None:
    files = pki.PemFiles(tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem")
    with pytest.raises(ValueError, match="https only"):
        etcd._call("http://127.0.0.1:1/health", files)


def test_the_cluster_ca_is_its_own_and_certifies_members_nodes_and_the_operator(
    topo: Topology, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLEARING_PKI_DIR", str(tmp_path / "state" / "pki"))
    lc = LocalCluster(topo, Paths.default(tmp_path / "state"), progress=lambda _: None)
    assert lc.ensure_etcd_pki() is True
    assert lc.ensure_etcd_pki() is False  # idempotent
    assert lc.etcd_pki_dir != lc.pki_dir
    assert not pki.LocalCA(lc.pki_dir).exists()  # nothing of the switch's CA was made

    ca_pem = lc.etcd_files().ca.read_bytes()
    for m in lc.etcd_members():
        files = lc.etcd_files(etcd.member_identity(m.zone.name))
        assert files.ca.read_bytes() == ca_pem
        cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert m.zone.address in {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
        # One channel over every member checks each by this shared name.
        assert MEMBER_SERVER_NAME in sans.get_values_for_type(x509.DNSName)
        usage = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
        # A member serves clients and peers, and calls its peers.
        assert {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= usage
    for z in topo.zones:
        assert lc.etcd_files(pki.node(z.name)).cert.is_file()


def test_etcd_data_from_before_tls_is_named_not_started(
    topo: Topology, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLEARING_PKI_DIR", str(tmp_path / "state" / "pki"))
    lc = LocalCluster(topo, Paths.default(tmp_path / "state"), progress=lambda _: None)
    spawned: list[object] = []
    monkeypatch.setattr(procs, "spawn", lambda *a, **kw: spawned.append(a))
    member = lc.etcd_members()[0]
    (member.managed.directory / "data").mkdir(parents=True)
    with pytest.raises(ClusterError, match="predates TLS for etcd") as err:
        lc._start_etcd(lc.etcd_members())
    assert "cluster down --wipe" in str(err.value)
    # Refused before anything was made or started, so it is refused again next time.
    assert not pki.LocalCA(lc.etcd_pki_dir).exists()
    assert spawned == []
    with pytest.raises(ClusterError, match="predates TLS for etcd"):
        lc._start_etcd(lc.etcd_members())
    assert spawned == []


def test_a_node_knows_every_member_its_own_city_s_first(topo: Topology, tmp_path: Path) -> None:
    for zone in topo.zones:
        cfg = NodeConfig.for_zone(
            topo, zone.name, ["127.0.1.1"], pki_dir=tmp_path, etcd_pki_dir=tmp_path
        )
        members = {(z.address, z.ports.etcd_client): z.city for z in topo.etcd_zones()}
        assert set(cfg.etcd_endpoints) == set(members)
        assert members[cfg.etcd_endpoints[0]] == zone.city


def test_the_member_channel_moves_to_the_next_member_and_round_again(
    test_ca: pki.LocalCA,
) -> None:
    """A frozen member fails nothing, so the agent rotates: each rotation prefers the next
    member, in the node's order, and wraps around."""
    test_ca.ensure(pki.node("beijing-a"), ips=["127.0.1.1"])
    endpoints = [("127.0.1.1", 12379), ("127.0.2.1", 12379), ("127.0.3.1", 12379)]
    members = MemberChannel(endpoints, test_ca.load(pki.node("beijing-a")))
    try:
        seen = [members.preferred]
        first = members.channel
        for _ in range(3):
            members.rotate()
            seen.append(members.preferred)
        assert seen == [*endpoints, endpoints[0]]
        assert members.channel is not first
        members.rotate()
        assert not members.at_home
        members.go_home()
        assert members.at_home and members.preferred == endpoints[0]
    finally:
        members.close()


def test_a_node_is_away_when_another_member_answers_its_keepalives() -> None:
    """A channel listing the own member first is not enough: pick_first passes over a
    member it could not reach when it connected and stays on the next one. The member
    id in the keepalives' answers says where the node is."""
    home, other = 0x5903B854F85A614C, 0x9394AABACC3E8244
    assert away_from_home(at_home=False, answered_by=home, home_id=home)
    assert away_from_home(at_home=True, answered_by=other, home_id=home)
    # Home's id not known yet: ask it (the answer tells whether the node is there).
    assert away_from_home(at_home=True, answered_by=other, home_id=0)
    assert not away_from_home(at_home=True, answered_by=home, home_id=home)
    # No answer yet on a channel that prefers home: nothing to tell, no probe.
    assert not away_from_home(at_home=True, answered_by=0, home_id=home)


def test_the_agent_leaves_a_silent_member_before_etcd_could_expire_its_lease() -> None:
    """etcd's leader expires a lease one TTL after the last renewal it got; the agent
    leaves a silent member early enough that another member has a second left to renew
    it (a cross-city TLS connection and one forwarded keepalive), with every wait of the
    agent's loop counted."""
    for ttl_s in (LEASE_TTL_S, 10):
        t = Timing.for_ttl(ttl_s)
        assert 0 < t.member_silent_s <= t.keepalive_interval_s
        assert t.member_moved_by_s + RENEW_THROUGH_ANOTHER_MEMBER_S <= ttl_s, ttl_s
        # The probe of the home member is one of the loop's waits, no longer than the
        # request the bound counts.
        assert t.rpc_timeout_s >= HOME_PROBE_TIMEOUT_S
