"""etcd members: one per city, on each city's etcd zone, from Debian's ``etcd-server``.

Everything to and between members is TLS with required client certificates, from the
cluster's own authority (``LocalCluster.etcd_pki_dir``, as ``cluster_ca`` in
infra/terraform): only the members, the switch nodes and the operator hold one of its
certificates. Participants' certificates come from the switch's CA and never open etcd,
which decides who may write each ledger shard.
"""

from __future__ import annotations

import json
import shutil
import urllib.request
from dataclasses import dataclass
from typing import Any, Final

from clearinghouse.localcluster.paths import Paths
from clearinghouse.localcluster.procs import Managed
from clearinghouse.security.identity import Identity, Role
from clearinghouse.security.pki import PemFiles
from clearinghouse.topology import Topology, Zone

# The machine is small and shared with three JVMs: a longer election timeout keeps a
# busy moment from looking like a dead leader. Lease TTLs must stay above ~1.5x this.
HEARTBEAT_INTERVAL_MS = 200
ELECTION_TIMEOUT_MS = 2000
HEALTH_TIMEOUT_S = 2.0
SCHEME: Final = "https"


@dataclass(frozen=True, slots=True)
class EtcdMember:
    zone: Zone
    managed: Managed

    @property
    def client_url(self) -> str:
        return f"{SCHEME}://{self.zone.address}:{self.zone.ports.etcd_client}"

    @property
    def peer_url(self) -> str:
        return f"{SCHEME}://{self.zone.address}:{self.zone.ports.etcd_peer}"


def member_identity(zone: str) -> Identity:
    """The member's certificate (server to clients and peers, client to peers)."""
    return Identity(Role.NODE, f"etcd-{zone}")


def members(topo: Topology, paths: Paths) -> list[EtcdMember]:
    out = []
    for z in topo.etcd_zones():
        d = paths.component_dir("etcd", z.name)
        out.append(EtcdMember(z, Managed("etcd", z.name, d, d / "etcd.log")))
    return out


def binary() -> str:
    path = shutil.which("etcd")
    if path is None:
        raise FileNotFoundError("etcd not found: run `make setup` (installs Debian's etcd-server)")
    return path


def argv(
    m: EtcdMember, all_members: list[EtcdMember], cluster_name: str, tls: PemFiles
) -> list[str]:
    """``tls``: the member's own files (:func:`member_identity`) from the cluster's CA."""
    initial = ",".join(f"{x.zone.name}={x.peer_url}" for x in all_members)
    return [
        binary(),
        "--name", m.zone.name,
        "--data-dir", str(m.managed.directory / "data"),
        "--listen-client-urls", m.client_url,
        "--advertise-client-urls", m.client_url,
        "--listen-peer-urls", m.peer_url,
        "--initial-advertise-peer-urls", m.peer_url,
        "--initial-cluster", initial,
        "--initial-cluster-state", "new",
        "--initial-cluster-token", cluster_name,
        "--heartbeat-interval", str(HEARTBEAT_INTERVAL_MS),
        "--election-timeout", str(ELECTION_TIMEOUT_MS),
        "--logger", "zap",
        "--log-outputs", "stderr",
        # Clients (switch nodes, the operator) and peers alike present a certificate of
        # the cluster's CA; nothing listens in plaintext.
        "--cert-file", str(tls.cert),
        "--key-file", str(tls.key),
        "--trusted-ca-file", str(tls.ca),
        "--client-cert-auth",
        "--peer-cert-file", str(tls.cert),
        "--peer-key-file", str(tls.key),
        "--peer-trusted-ca-file", str(tls.ca),
        "--peer-client-cert-auth",
    ]  # fmt: skip


def _call(url: str, tls: PemFiles, body: bytes | None = None) -> Any:
    """GET (or POST ``body`` to) one of etcd's JSON endpoints over TLS as ``tls``'s
    identity; returns JSON."""
    if not url.startswith(f"{SCHEME}://"):
        raise ValueError(f"etcd endpoints are {SCHEME} only, not {url!r}")
    method = "POST" if body is not None else "GET"
    req = urllib.request.Request(url, data=body, method=method)  # noqa: S310
    # The scheme was checked above.
    with urllib.request.urlopen(  # noqa: S310
        req, timeout=HEALTH_TIMEOUT_S, context=tls.ssl_context()
    ) as resp:
        return json.loads(resp.read().decode())


def healthy(m: EtcdMember, tls: PemFiles) -> bool:
    """True once the member answers and the cluster it sees has a leader."""
    try:
        return bool(_call(m.client_url + "/health", tls).get("health") == "true")
    except (OSError, ValueError):  # ssl.SSLError is an OSError
        return False


def status(m: EtcdMember, tls: PemFiles) -> dict[str, Any] | None:
    """This member's view: its id, the leader's id, raft term; None when unreachable."""
    try:
        st = _call(m.client_url + "/v3/maintenance/status", tls, b"{}")
        ml = _call(m.client_url + "/v3/cluster/member/list", tls, b"{}")
    except (OSError, ValueError):
        return None
    header = st.get("header", {})
    return {
        "member_id": str(header.get("member_id", "")),
        "leader_id": str(st.get("leader", "")),
        "raft_term": int(st.get("raftTerm", 0)),
        "version": st.get("version", ""),
        "members": {str(x.get("ID")): x.get("name", "") for x in ml.get("members", [])},
    }
