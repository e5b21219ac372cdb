"""etcd members: one per city, on each city's etcd zone, from Debian's ``etcd-server``."""

from __future__ import annotations

import json
import shutil
import urllib.request
from dataclasses import dataclass
from typing import Any

from clearinghouse.localcluster.paths import Paths
from clearinghouse.localcluster.procs import Managed
from clearinghouse.topology import Topology, Zone

# The machine is small and shared with three JVMs: a longer election timeout keeps a
# busy moment from looking like a dead leader. Lease TTLs must stay above ~1.5x this.
HEARTBEAT_INTERVAL_MS = 200
ELECTION_TIMEOUT_MS = 2000
HEALTH_TIMEOUT_S = 2.0


@dataclass(frozen=True, slots=True)
class EtcdMember:
    zone: Zone
    managed: Managed

    @property
    def client_url(self) -> str:
        return f"http://{self.zone.address}:{self.zone.ports.etcd_client}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.zone.address}:{self.zone.ports.etcd_peer}"


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


def argv(m: EtcdMember, all_members: list[EtcdMember], cluster_name: str) -> list[str]:
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
    ]  # fmt: skip


def _call(url: str, body: bytes | None = None) -> Any:
    """GET (or POST ``body`` to) one of etcd's loopback HTTP endpoints; returns JSON."""
    if not url.startswith("http://"):
        raise ValueError(f"etcd endpoints are plain http on loopback, not {url!r}")
    method = "POST" if body is not None else "GET"
    req = urllib.request.Request(url, data=body, method=method)  # noqa: S310
    # The scheme was checked above; etcd's JSON gateway is plain http on loopback.
    with urllib.request.urlopen(req, timeout=HEALTH_TIMEOUT_S) as resp:  # noqa: S310
        return json.loads(resp.read().decode())


def healthy(m: EtcdMember) -> bool:
    """True once the member answers and the cluster it sees has a leader."""
    try:
        return bool(_call(m.client_url + "/health").get("health") == "true")
    except (OSError, ValueError):
        return False


def status(m: EtcdMember) -> dict[str, Any] | None:
    """This member's view: its id, the leader's id, raft term; None when unreachable."""
    try:
        st = _call(m.client_url + "/v3/maintenance/status", b"{}")
        ml = _call(m.client_url + "/v3/cluster/member/list", b"{}")
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
