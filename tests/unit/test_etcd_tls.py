"""etcd is started with TLS only, from the cluster's own CA (localcluster.etcd)."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from clearinghouse.localcluster import etcd, procs
from clearinghouse.localcluster.cluster import ClusterError, LocalCluster
from clearinghouse.localcluster.paths import Paths
from clearinghouse.ownership.etcd_backend import MEMBER_SERVER_NAME
from clearinghouse.security import pki
from clearinghouse.switch.config import NodeConfig
from clearinghouse.topology import Topology

pytestmark = pytest.mark.unit


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
