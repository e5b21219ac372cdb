"""Operations on the local cluster: up, down, status, and kill/stop/start of a target.

A target is one process (``cassandra@beijing-a``), a zone (``beijing-a``), a city
(``beijing``) or everything (``all``). Every wait is bounded; a process that fails to
start is reported with the tail of its own log.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import grpc
from cassandra import DriverException
from cassandra.cluster import NoHostAvailable, Session

from clearing.v1 import shard_pb2, shard_pb2_grpc
from clearinghouse.localcluster import cassandra, etcd, procs
from clearinghouse.localcluster.paths import Paths
from clearinghouse.localcluster.procs import Managed
from clearinghouse.localcluster.repair import Repair, nodetool_gist
from clearinghouse.ownership import etcd_backend, placement
from clearinghouse.ownership.etcd_backend import EtcdClient
from clearinghouse.ownership.placement import NodeInfo
from clearinghouse.security import pki
from clearinghouse.security.identity import Identity
from clearinghouse.storage import schema
from clearinghouse.storage.session import CassandraConfig, connect, connect_to_node
from clearinghouse.switch.records import SHARD_COUNT
from clearinghouse.topology import Topology, Zone
from clearinghouse.topology import default_path as default_topology_path

ETCD_READY_TIMEOUT_S = 60.0
# Each unary call of an operator's etcd client (bench, tests, drills).
ETCD_CLIENT_TIMEOUT_S = 5.0
# The cluster's own certificate authority, under the state folder: etcd trusts it alone
# (see localcluster.etcd). A wipe removes it with etcd's data; `up` makes a new one.
ETCD_PKI_FOLDER = "etcd-pki"
CASSANDRA_JOIN_TIMEOUT_S = 120.0
NODETOOL_TIMEOUT_S = 30.0
# A full repair of the keyspace from one node (validation of every range it holds,
# streaming what differs); bounded so that a stuck repair cannot hang its caller.
NODETOOL_REPAIR_TIMEOUT_S = 600.0
# A repair leaves out (--force) only nodes the repairing node's gossip already holds
# down; a node killed a moment ago is still "up" to it for several seconds (the failure
# detector), and the repair would fail waiting on it. Waited for, this long at most.
GOSSIP_DOWN_WAIT_S = 60.0
GOSSIP_POLL_S = 2.0
PEERS_QUERY_TIMEOUT_S = 5.0
KINDS = ("etcd", "cassandra", "switch")
SWITCH_READY_TIMEOUT_S = 90.0
# Serving a shard means reading and replaying its whole chain, so a long ledger takes a
# while: the wait goes on while shards keep coming into service, and gives up when none
# has for SHARDS_STALL_S, or after SHARDS_SERVED_TIMEOUT_S in all.
SHARDS_STALL_S = 90.0
SHARDS_SERVED_TIMEOUT_S = 900.0
SHARDS_NOTE_EVERY_S = 5.0
# After every shard is served, how long `cluster up`/`start` waits for each shard to be
# with the node placement gives it among the running nodes (a node that starts is handed
# its share by the others, shard by shard: each is briefly unserved in between).
PLACEMENT_WAIT_S = 120.0
PLACEMENT_POLL_S = 0.5
DESCRIBE_TIMEOUT_S = 2.0
# Share of the traces a local switch node starts that it records (CLEARING_TRACE_SAMPLE_RATIO
# overrides it); a trace follows its first node's decision across the hops.
LOCAL_TRACE_SAMPLE_RATIO = "0.1"

Progress = Callable[[str], None]


class ClusterError(RuntimeError):
    """A cluster operation failed; the message names the component and its log."""


@dataclass(frozen=True, slots=True)
class Spec:
    """What ``up`` started; stored so later commands act on the same cluster."""

    cassandra_nodes: int

    def to_json(self) -> str:
        return json.dumps({"cassandra_nodes": self.cassandra_nodes})


@dataclass(frozen=True, slots=True)
class Component:
    kind: str
    zone: Zone
    managed: Managed

    @property
    def label(self) -> str:
        return f"{self.kind}@{self.zone.name}"

    @property
    def log(self) -> Path:
        """The log an operator reads first: Cassandra's own ``system.log``, not the JVM's
        ``stdout.log`` (which stops once logging is set up); the process's log else."""
        if self.kind == "cassandra":
            return self.managed.directory / "logs" / "system.log"
        return self.managed.log


class LocalCluster:
    def __init__(
        self,
        topo: Topology,
        paths: Paths,
        progress: Progress = print,
        topo_path: Path | None = None,
    ) -> None:
        self.topo = topo
        self.paths = paths
        self.progress = progress
        self.topo_path = topo_path or default_topology_path()

    # -- what the cluster is made of -------------------------------------------------

    def spec(self) -> Spec | None:
        try:
            raw = json.loads(self.paths.cluster_file.read_text())
        except (OSError, ValueError):
            return None
        return Spec(cassandra_nodes=int(raw["cassandra_nodes"]))

    def etcd_members(self) -> list[etcd.EtcdMember]:
        return etcd.members(self.topo, self.paths)

    def cassandra_nodes(self, spec: Spec | None = None) -> list[cassandra.CassandraNode]:
        s = spec or self.spec() or Spec(cassandra_nodes=len(self.topo.cities))
        return cassandra.nodes(self.topo, self.paths, s.cassandra_nodes)

    def components(self, spec: Spec | None = None) -> list[Component]:
        out = [Component("etcd", m.zone, m.managed) for m in self.etcd_members()]
        out += [Component("cassandra", n.zone, n.managed) for n in self.cassandra_nodes(spec)]
        out += [Component("switch", z, self.switch_managed(z)) for z in self.topo.zones]
        return out

    def switch_managed(self, zone: Zone) -> Managed:
        d = self.paths.component_dir("switch", zone.name)
        return Managed("switch", zone.name, d, d / "switch.log")

    def select(self, target: str) -> list[Component]:
        """Components named by ``target``: all, a city, a zone, or kind@zone."""
        comps = self.components()
        if target == "all":
            return comps
        if "@" in target:
            kind, _, zone = target.partition("@")
            if kind not in KINDS:
                raise ClusterError(f"unknown process kind {kind!r}; kinds are {', '.join(KINDS)}")
            self.topo.zone(zone)  # raises with the list of zones
            hit = [c for c in comps if c.kind == kind and c.zone.name == zone]
            if not hit:
                raise ClusterError(f"no {kind} runs in zone {zone} in this cluster")
            return hit
        if target in self.topo.city_names():
            return [c for c in comps if c.zone.city == target]
        if target in self.topo.zone_names():
            return [c for c in comps if c.zone.name == target]
        raise ClusterError(
            f"unknown target {target!r}: use all, a city ({', '.join(self.topo.city_names())}), "
            f"a zone ({', '.join(self.topo.zone_names())}) or kind@zone (e.g. cassandra@beijing-a)"
        )

    # -- up / down ---------------------------------------------------------------------

    def up(self, cassandra_nodes: int | None = None) -> dict[str, float]:
        """Start whatever is not running, wait for it, apply the schema. Idempotent."""
        timings: dict[str, float] = {}
        t0 = time.monotonic()
        spec = self._resolve_spec(cassandra_nodes)
        self.paths.state.mkdir(parents=True, exist_ok=True)
        self.paths.cluster_file.write_text(spec.to_json())
        self.progress(
            f"cluster {self.topo.name}: {len(self.topo.cities)} cities, "
            f"{len(self.topo.zones)} zones, {spec.cassandra_nodes} Cassandra nodes, "
            f"{len(self.etcd_members())} etcd members (state in {self.paths.state})"
        )
        self._start_etcd(self.etcd_members())
        timings["etcd_s"] = time.monotonic() - t0
        t1 = time.monotonic()
        self._start_cassandra(self.cassandra_nodes(spec))
        timings["cassandra_s"] = time.monotonic() - t1
        t2 = time.monotonic()
        self.apply_schema(spec)
        timings["schema_s"] = time.monotonic() - t2
        t3 = time.monotonic()
        self._start_switches(list(self.topo.zones))
        timings["switch_s"] = time.monotonic() - t3
        timings["total_s"] = time.monotonic() - t0
        self.progress(f"cluster up in {timings['total_s']:.1f}s")
        return timings

    # -- certificates ------------------------------------------------------------------

    @property
    def pki_dir(self) -> Path:
        return pki.default_directory()

    def ensure_pki(self) -> set[str]:
        """The local CA and the certificates the cluster's own processes need: each
        zone's node (a server for its address), the operator and the auditor. Returns
        the zones whose existing node certificate was re-issued."""
        ca = pki.LocalCA(self.pki_dir)
        if ca.init():
            self.progress(f"created the local certificate authority in {self.pki_dir}")
        issued = []
        renewed = set()
        for z in self.topo.zones:
            ident = pki.node(z.name)
            cert = ca.folder(ident) / "cert.pem"
            before = cert.read_bytes() if ca.has(ident) else None
            ca.ensure(ident, ips=[z.address], dns=pki.LOOPBACK_DNS)
            if before is None:
                issued.append(ident)
            elif before != cert.read_bytes():
                renewed.add(z.name)
        for ident in (pki.operator(), pki.auditor()):
            had = ca.has(ident)
            ca.ensure(ident)  # also re-issues a certificate without its identity name
            if not had:
                issued.append(ident)
        if issued:
            self.progress(f"issued certificates: {', '.join(map(str, issued))}")
        return renewed

    @property
    def etcd_pki_dir(self) -> Path:
        return self.paths.state / ETCD_PKI_FOLDER

    def ensure_etcd_pki(self) -> bool:
        """The cluster's CA for etcd and its certificates: each member (a server for its
        address, and a client of its peers), each zone's switch node and the operator.
        Returns whether the CA was created now."""
        ca = pki.LocalCA(self.etcd_pki_dir)
        created = ca.init()
        if created:
            self.progress(f"created the cluster's certificate authority for etcd in {ca.directory}")
        for m in self.etcd_members():
            ca.ensure(
                etcd.member_identity(m.zone.name),
                ips=[m.zone.address],
                dns=[*pki.LOOPBACK_DNS, etcd_backend.MEMBER_SERVER_NAME],
            )
        for z in self.topo.zones:
            ca.ensure(pki.node(z.name))
        ca.ensure(pki.operator())
        return created

    def etcd_files(self, identity: Identity | None = None) -> pki.PemFiles:
        """``identity``'s (the operator's by default) PEM files for etcd."""
        return pki.LocalCA(self.etcd_pki_dir).files(identity or pki.operator())

    def etcd_client(self, zone: Zone | None = None) -> EtcdClient:
        """A pyetcd client of ``zone``'s member (the first city's by default) as the
        operator, over TLS; close it after use."""
        z = zone or self.topo.etcd_zones()[0]
        return etcd_backend.connect(
            z.address, z.ports.etcd_client, self.etcd_files(), ETCD_CLIENT_TIMEOUT_S
        )

    def operator_channel(self, z: Zone) -> grpc.Channel:
        keys = pki.LocalCA(self.pki_dir).load(pki.operator())
        return pki.secure_channel(f"{z.address}:{z.ports.switch}", keys, server=pki.node(z.name))

    def _resolve_spec(self, cassandra_nodes: int | None) -> Spec:
        existing = self.spec()
        if cassandra_nodes is None:
            return existing or Spec(cassandra_nodes=len(self.topo.cities))
        self.topo.cassandra_zones(cassandra_nodes)  # validates the count
        if existing and existing.cassandra_nodes != cassandra_nodes and self._has_data():
            raise ClusterError(
                f"the state folder holds a cluster of {existing.cassandra_nodes} Cassandra "
                f"nodes; run `clearingctl cluster down --wipe` before starting one of "
                f"{cassandra_nodes}"
            )
        return Spec(cassandra_nodes=cassandra_nodes)

    def _has_data(self) -> bool:
        return (self.paths.state / "cassandra").exists()

    def down(self, wipe: bool = False) -> list[str]:
        """Stop everything this tool started (SIGTERM, then SIGKILL); optionally wipe."""
        stopped = []
        known = self._all_known_components()
        for kind in dict.fromkeys(m.kind for m in known):
            # One kind at a time, clients before servers; within a kind, all at once.
            group = [m for m in known if m.kind == kind and procs.state(m).alive]
            for m in group:
                procs.signal_proc(m, signal.SIGCONT)
                procs.signal_proc(m, signal.SIGTERM)
            for m in group:
                procs.stop(m)
            stopped += [m.label for m in group]
        if stopped:
            self.progress(f"stopped {', '.join(stopped)}")
        else:
            self.progress("nothing was running")
        if wipe and self.paths.state.exists():
            # The certificate authority survives a wipe: certificates handed to
            # participants stay valid (deleting the CA folder, `.state/pki` or
            # $CLEARING_PKI_DIR, starts over).
            for child in self.paths.state.iterdir():
                if child.resolve() == self.pki_dir.resolve():
                    continue
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
            self.progress(f"wiped {self.paths.state} (kept the CA in {self.pki_dir})")
        return stopped

    def _all_known_components(self) -> list[Managed]:
        """Every process with a record under the state folder, clients before servers."""
        rank = {"bank": 0, "switch": 1, "cassandra": 2, "etcd": 3}
        found = []
        for record in self.paths.state.glob("*/*/process.json"):
            kind, name = record.parent.parent.name, record.parent.name
            found.append(Managed(kind, name, record.parent, record.parent / "log"))
        return sorted(found, key=lambda m: rank.get(m.kind, 0))

    # -- starting ----------------------------------------------------------------------

    def _start_etcd(self, members: Sequence[etcd.EtcdMember]) -> None:
        all_members = self.etcd_members()
        had_data = [m for m in all_members if (m.managed.directory / "data").exists()]
        if had_data and not pki.LocalCA(self.etcd_pki_dir).exists():
            # Members keep their peers' URLs in their data: members written before TLS
            # would keep dialling plain http:// and never form a cluster again.
            raise ClusterError(
                f"etcd's data in {had_data[0].managed.directory} predates TLS for etcd "
                "(no certificate authority for it was here): start over with "
                "`clearingctl cluster down --wipe`"
            )
        self.ensure_etcd_pki()
        operator = self.etcd_files()
        started = []
        for m in members:
            if procs.state(m.managed).alive:
                continue
            own = self.etcd_files(etcd.member_identity(m.zone.name))
            procs.spawn(m.managed, etcd.argv(m, all_members, self.topo.name, own))
            started.append(m)
        if started:
            self.progress(f"starting etcd: {', '.join(m.zone.name for m in started)}")
        live = [m for m in all_members if procs.state(m.managed).alive]
        waited = procs.wait_until(
            "etcd to elect a leader",
            lambda: any(etcd.healthy(m, operator) for m in live),
            timeout_s=ETCD_READY_TIMEOUT_S,
            procs=[m.managed for m in started],
            progress=self.progress,
        )
        for m in started:
            procs.wait_until(
                f"etcd {m.zone.name} to answer",
                lambda m=m: etcd.healthy(m, operator),  # type: ignore[misc]
                timeout_s=ETCD_READY_TIMEOUT_S,
                procs=[m.managed],
                progress=self.progress,
            )
        if started:
            self.progress(f"etcd ready ({waited:.1f}s)")

    def _start_cassandra(self, nodes: Sequence[cassandra.CassandraNode]) -> None:
        all_nodes = self.cassandra_nodes()
        down = [n for n in nodes if not procs.state(n.managed).alive]
        if not down:
            return
        for n in all_nodes:
            cassandra.write_config(n, all_nodes, self.topo.name)
        any_up = any(procs.state(n.managed).alive for n in all_nodes)
        # A fresh cluster starts one seed first so the others find a ring to join.
        first = [] if any_up else down[:1]
        rest = [n for n in down if n not in first]
        for batch in (first, rest):
            if not batch:
                continue
            for n in batch:
                procs.spawn(n.managed, cassandra.argv(n, self.paths))
            names = ", ".join(n.zone.name for n in batch)
            self.progress(f"starting cassandra: {names} (JVM start takes 10-40 s on a small box)")
            waited = procs.wait_until(
                f"cassandra CQL port on {names}",
                lambda batch=batch: all(  # type: ignore[misc]
                    procs.port_open(n.zone.address, n.zone.ports.cql) for n in batch
                ),
                timeout_s=cassandra.CQL_READY_TIMEOUT_S,
                procs=[n.managed for n in batch],
                logs=[n.system_log for n in batch],
                progress=self.progress,
            )
            self.progress(f"cassandra {names} serving CQL ({waited:.1f}s)")
        self._wait_ring_up(all_nodes)

    def _wait_ring_up(self, nodes: Sequence[cassandra.CassandraNode]) -> None:
        """Wait until a live node's gossip marks every running node Up/Normal."""
        running = [n for n in nodes if procs.state(n.managed).alive]
        want = {n.zone.address for n in running}
        probe = running[0]

        def all_up() -> bool:
            ring = self.ring(probe)
            return ring is not None and want <= {
                r["address"] for r in ring if r["status"] == "U" and r["state"] == "N"
            }

        procs.wait_until(
            "every running Cassandra node to be Up/Normal in gossip",
            all_up,
            timeout_s=CASSANDRA_JOIN_TIMEOUT_S,
            procs=[n.managed for n in running],
            logs=[n.system_log for n in running],
            progress=self.progress,
        )
        # One node's view is not every node's: a coordinator that has not yet learned a
        # city's data centre refuses a keyspace that names it. Wait for all views.
        procs.wait_until(
            "every Cassandra node to know every other node and its city",
            lambda: all(_knows_all(n, running) for n in running),
            timeout_s=CASSANDRA_JOIN_TIMEOUT_S,
            procs=[n.managed for n in running],
            logs=[n.system_log for n in running],
            progress=self.progress,
        )

    def apply_schema(self, spec: Spec | None = None) -> list[str]:
        s = spec or self.spec()
        if s is None:
            raise ClusterError("no cluster has been started here: run `clearingctl cluster up`")

        changed = schema.apply_with_fresh_sessions(
            partial(self.schema_session, s),
            self.topo.keyspace.name,
            cassandra.replication(self.topo, s.cassandra_nodes),
            self.progress,
        )
        for line in changed:
            self.progress(f"  schema: {line}")
        return changed

    @contextmanager
    def schema_session(self, spec: Spec) -> Iterator[Session]:
        """The session schema changes go through: to every running node (so that one that
        is down is known down and left out of the wait for agreement), the driver's own
        wait after each statement off (``storage.schema`` waits itself)."""
        nodes = [n for n in self.cassandra_nodes(spec) if procs.state(n.managed).alive]
        if not nodes:
            raise ClusterError("no Cassandra node is running")
        cfg = CassandraConfig.from_topology(
            self.topo, nodes[0].dc, [n.zone.address for n in nodes], keyspace=None
        )
        cl, session = connect(cfg, for_schema_changes=True)
        try:
            yield session
        finally:
            cl.shutdown()

    # -- kill / stop / start -----------------------------------------------------------

    def kill(self, target: str) -> list[str]:
        comps = self.select(target)
        hit = [c.label for c in comps if procs.signal_proc(c.managed, signal.SIGKILL)]
        for c in comps:
            procs.kill(c.managed)
        return hit

    def stop(self, target: str) -> list[str]:
        comps = self.select(target)
        hit = [c.label for c in comps if procs.state(c.managed).alive]
        for c in comps:
            procs.signal_proc(c.managed, signal.SIGCONT)
            procs.signal_proc(c.managed, signal.SIGTERM)
        for c in comps:
            procs.stop(c.managed)
        return hit

    def pause(self, target: str) -> list[str]:
        """SIGSTOP the running processes of ``target``; the ones it stopped (a process
        already paused, or down, is not named)."""
        comps = [c for c in self.select(target) if procs.state(c.managed).state == "up"]
        return [c.label for c in comps if procs.signal_proc(c.managed, signal.SIGSTOP)]

    def resume(self, target: str) -> list[str]:
        """SIGCONT the paused processes of ``target``; the ones it resumed."""
        comps = [c for c in self.select(target) if procs.state(c.managed).state == "paused"]
        return [c.label for c in comps if procs.signal_proc(c.managed, signal.SIGCONT)]

    def start(self, target: str) -> list[str]:
        comps = self.select(target)
        down = [c for c in comps if not procs.state(c.managed).alive]
        zones = {c.zone.name for c in down}
        self._start_etcd(
            [
                m
                for m in self.etcd_members()
                if m.zone.name in zones
                and any(c.kind == "etcd" and c.zone.name == m.zone.name for c in down)
            ]
        )
        self._start_cassandra(
            [
                n
                for n in self.cassandra_nodes()
                if any(c.kind == "cassandra" and c.zone.name == n.zone.name for c in down)
            ]
        )
        self._start_switches([c.zone for c in down if c.kind == "switch"])
        return [c.label for c in down]

    def _start_switches(self, zones: Sequence[Zone]) -> None:
        # A node whose certificate was just re-issued (one from before identity names)
        # still presents the old one, which clients and other nodes refuse: restart it.
        renewed = self.ensure_pki()
        for z in self.topo.zones:
            m = self.switch_managed(z)
            if z.name in renewed and procs.state(m).alive:
                self.progress(f"restarting switch node {z.name}: its certificate was re-issued")
                procs.stop(m)
        down = [
            z
            for z in dict.fromkeys([*zones, *(z for z in self.topo.zones if z.name in renewed)])
            if not procs.state(self.switch_managed(z)).alive
        ]
        if not down:
            return
        hosts = ",".join(n.zone.address for n in self.cassandra_nodes())
        for z in down:
            m = self.switch_managed(z)
            # Telemetry by default: traces to a file beside the node's log (one trace in
            # LOCAL_TRACE_SAMPLE_RATIO: recording and writing every span cost the switch
            # more CPU than a batched payment's own work), Prometheus metrics on the
            # zone's admin port; the caller's environment may override each.
            env = {
                "CLEARING_TRACE_FILE": str(m.directory / "traces.jsonl"),
                "CLEARING_TRACE_SAMPLE_RATIO": LOCAL_TRACE_SAMPLE_RATIO,
                "CLEARING_PROMETHEUS_HOST": z.address,
                "CLEARING_PROMETHEUS_PORT": str(z.ports.admin_http),
                **procs.python_env(self.paths.root),
            }
            procs.spawn(m, [
                sys.executable, "-m", "clearinghouse.switch", "--zone", z.name,
                "--cassandra", hosts, "--topology", str(self.topo_path),
                "--pki-dir", str(self.pki_dir), "--etcd-pki-dir", str(self.etcd_pki_dir),
                "--state-marker", m.marker,
            ], env=env)  # fmt: skip
        names = ", ".join(z.name for z in down)
        self.progress(f"starting switch nodes: {names}")
        waited = procs.wait_until(
            f"switch nodes to serve gRPC ({names})",
            lambda: all(procs.port_open(z.address, z.ports.switch) for z in down),
            timeout_s=SWITCH_READY_TIMEOUT_S,
            procs=[self.switch_managed(z) for z in down],
            progress=self.progress,
        )
        self.progress(f"switch nodes serving ({waited:.1f}s)")
        self.wait_for_shard_owners()

    def wait_for_shard_owners(self) -> None:
        """Every ledger shard served (taken over and rebuilt) by a live switch node."""
        switches = [self.switch_managed(z) for z in self.topo.zones]
        best, grew_at, noted_at = -1, time.monotonic(), time.monotonic()

        def served() -> bool:
            nonlocal best, grew_at, noted_at
            n, now = len(self.served_shards()), time.monotonic()
            if n > best:
                best, grew_at = n, now
                if n < SHARD_COUNT and now - noted_at >= SHARDS_NOTE_EVERY_S:
                    self.progress(f"  ... {n} of {SHARD_COUNT} ledger shards served")
                    noted_at = now
            elif now - grew_at > SHARDS_STALL_S:
                raise procs.ProcessError(
                    f"no ledger shard came into service for {SHARDS_STALL_S:.0f}s "
                    f"({n} of {SHARD_COUNT} served); read the switch nodes' logs: "
                    + ", ".join(str(m.log) for m in switches)
                )
            return n >= SHARD_COUNT

        waited = procs.wait_until(
            f"all {SHARD_COUNT} ledger shards to be served by a switch node (each reads "
            "its shard's chain back first)",
            served,
            timeout_s=SHARDS_SERVED_TIMEOUT_S,
            procs=switches,
            progress=self.progress,
            every_s=30.0,
        )
        self.progress(f"every ledger shard is served ({waited:.1f}s)")
        owners, target, waited = self.converge(PLACEMENT_WAIT_S)
        if owners == target:
            if waited >= 1.0:
                self.progress(f"every ledger shard is with the node placement gives it "
                              f"({waited:.1f}s)")  # fmt: skip
        else:
            moving = sum(1 for s, zone in target.items() if owners.get(s) != zone)
            self.progress(
                f"  {moving} ledger shards are still moving to the nodes placement gives them "
                f"after {waited:.0f}s: `clearingctl cluster status` shows them; read the "
                "switch nodes' logs if the number does not fall"
            )

    def placement_target(self) -> dict[int, str]:
        """Shard -> the zone placement gives it among the switch nodes running now."""
        running = [NodeInfo(z.name, z.name, z.city) for z in self.topo.zones
                   if procs.state(self.switch_managed(z)).alive]  # fmt: skip
        return placement.assign(SHARD_COUNT, running)

    def converge(
        self, timeout_s: float, progress: Callable[[str], None] | None = None
    ) -> tuple[dict[int, str], dict[int, str], float]:
        """Wait, at most ``timeout_s``, until every shard is served by the node placement
        gives it among the running switch nodes (a node that starts is handed its share by
        the others, shard by shard, each briefly unserved); (served, placement, seconds
        waited), settled or not."""
        say = progress or self.progress
        start = noted = time.monotonic()
        while True:
            target = self.placement_target()
            served = self.served_shards()
            waited = time.monotonic() - start
            if served == target or waited > timeout_s:
                return served, target, waited
            if time.monotonic() - noted >= SHARDS_NOTE_EVERY_S:
                noted = time.monotonic()
                moving = sum(1 for s, zone in target.items() if served.get(s) != zone)
                say(f"  ... {moving} ledger shards not yet with the node placement gives them "
                    f"({waited:.0f}s of {timeout_s:.0f}s)")  # fmt: skip
            time.sleep(PLACEMENT_POLL_S)

    def served_shards(self) -> dict[int, str]:
        """Shard -> the zone whose switch node serves it now, as the nodes themselves say."""
        out: dict[int, str] = {}
        for z in self.topo.zones:
            with self.operator_channel(z) as channel:
                try:
                    d = shard_pb2_grpc.ShardServiceStub(channel).Describe(
                        shard_pb2.DescribeRequest(), timeout=DESCRIBE_TIMEOUT_S
                    )
                except grpc.RpcError:
                    continue
            out.update({s.shard: z.name for s in d.shards})
        return out

    def describe_nodes(
        self, timeout_s: float = DESCRIBE_TIMEOUT_S
    ) -> dict[str, dict[str, Any] | None]:
        """Each zone's switch node's own account of itself (``ShardService/Describe``).

        Every node is asked at once, so the whole call takes at most about ``timeout_s``;
        a node that does not answer in time (dead, paused, still starting) is None.
        """
        channels = {z.name: self.operator_channel(z) for z in self.topo.zones}
        try:
            calls = {
                name: shard_pb2_grpc.ShardServiceStub(ch).Describe.future(
                    shard_pb2.DescribeRequest(), timeout=timeout_s
                )
                for name, ch in channels.items()
            }
            out: dict[str, dict[str, Any] | None] = {}
            for name, call in calls.items():
                try:
                    d = call.result(timeout=timeout_s + 1.0)
                except (grpc.RpcError, grpc.FutureTimeoutError, grpc.FutureCancelledError):
                    out[name] = None  # closing the channel below cancels a call still open
                    continue
                out[name] = {
                    "node_id": d.node_id,
                    "shards": [{"shard": s.shard, "epoch": s.epoch} for s in d.shards],
                    "commits": d.commits,
                    "entries": d.entries,
                    "routed_local": d.routed_local,
                    "routed_forwarded": d.routed_forwarded,
                    "code_version": d.code_version,
                }
            return out
        finally:
            for ch in channels.values():
                ch.close()

    def metrics_urls(self) -> dict[str, str]:
        """Zone -> its switch node's Prometheus endpoint (the zone's admin port)."""
        return {z.name: f"http://{z.address}:{z.ports.admin_http}/metrics" for z in self.topo.zones}

    def ring_view(self) -> tuple[list[dict[str, str]] | None, str | None]:
        """Cassandra's ring as the first running node that answers sees it, and that node."""
        for n in self.cassandra_nodes():
            if procs.state(n.managed).state == "up":
                ring = self.ring(n)
                if ring is not None:
                    return ring, n.zone.name
        return None, None

    # -- status ------------------------------------------------------------------------

    def nodetool(
        self, zone: str, *args: str, timeout_s: float = NODETOOL_TIMEOUT_S
    ) -> subprocess.CompletedProcess[str]:
        """Run ``nodetool args`` against the Cassandra node of ``zone``."""
        node = next(n for n in self.cassandra_nodes() if n.zone.name == zone)
        return subprocess.run(
            cassandra.nodetool_argv(node, self.paths, *args),
            capture_output=True, text=True, timeout=timeout_s, check=False,
        )  # fmt: skip

    def repair(
        self, city: str | None = None, progress: Callable[[str], None] | None = None
    ) -> list[Repair]:
        """Full repair of the keyspace from every Cassandra node of ``city`` (None: the
        first city whose nodes all run), one after another. Without ``-pr`` a node
        repairs every range it holds with every replica of it, in every city; each city
        holds the whole ring, so one city's nodes bring every city level. Nodes that are
        down are left out (``--force``) and named in the result: they are not repaired.
        What an SRE runs once hints are done with a city that was down, and what a
        replica needs when hints could not carry a write (a coordinator killed before it
        wrote or flushed the hint)."""
        say = progress or self.progress
        every = self.cassandra_nodes()
        if city is None:
            up = {n.zone.city for n in every} - {
                n.zone.city for n in every if procs.state(n.managed).state != "up"
            }
            city = next((c for c in self.topo.city_names() if c in up), every[0].zone.city)
        nodes = [n for n in every if n.zone.city == city]
        if not nodes:
            cities = ", ".join(self.topo.city_names())
            raise ClusterError(f"no Cassandra node in city {city!r}; cities are {cities}")
        # Running and not paused: nodetool against a stopped JVM waits out its timeout.
        running = [n for n in nodes if procs.state(n.managed).state == "up"]
        if not any(procs.state(n.managed).state == "up" for n in every):
            raise ClusterError(
                "no Cassandra node runs at all: nothing to repair from; start the cluster "
                "(clearingctl cluster up), then repair"
            )
        if not running:
            names = ", ".join(f"cassandra@{n.zone.name}" for n in nodes)
            raise ClusterError(
                f"no Cassandra node of {city} runs ({names} down or paused): a repair runs "
                f"from a city's running nodes; start or resume them (clearingctl cluster "
                f"start|resume {city}) or repair from another city (clearingctl cluster repair)"
            )
        nodes = running
        ks = self.topo.keyspace.name
        out = []
        for node in nodes:
            zone = node.zone.name
            stopped = [n for n in every if procs.state(n.managed).state != "up"]
            down = tuple(f"cassandra@{n.zone.name}" for n in stopped)
            self._wait_gossip_down(node, stopped, say)
            say(f"repair: nodetool repair --full {ks} on {zone} (up to "
                f"{NODETOOL_REPAIR_TIMEOUT_S:.0f}s; log: {node.system_log})"
                + (f"; left out, down: {', '.join(down)}" if down else ""))  # fmt: skip
            start = time.monotonic()
            try:
                r = self.nodetool(zone, "repair", "--full", "--force", ks,
                                  timeout_s=NODETOOL_REPAIR_TIMEOUT_S)  # fmt: skip
                ok = r.returncode == 0
                detail = nodetool_gist(r.stdout + r.stderr, r.returncode)
            except subprocess.TimeoutExpired:
                ok = False
                detail = (
                    f"nodetool did not end within {NODETOOL_REPAIR_TIMEOUT_S:.0f}s; the repair "
                    "may still run on the node (nodetool repair_admin list)"
                )
            except OSError as e:
                ok, detail = False, f"nodetool could not run: {e}"
            rep = Repair(zone, ok, time.monotonic() - start, detail, str(node.system_log), down)
            say(f"repair: {zone} {'done' if ok else 'FAILED'} in {rep.seconds:.1f}s: {detail}")
            out.append(rep)
        return out

    def _wait_gossip_down(
        self,
        via: cassandra.CassandraNode,
        stopped: Sequence[cassandra.CassandraNode],
        say: Callable[[str], None],
    ) -> None:
        """Until ``via``'s ring shows every node of ``stopped`` down (bounded: the repair
        then runs and says what failed)."""
        if not stopped:
            return
        addresses = {n.zone.address for n in stopped}
        deadline = time.monotonic() + GOSSIP_DOWN_WAIT_S
        t0 = time.monotonic()
        while True:
            ring = self.ring(via) or []
            still = sorted(r["address"] for r in ring
                           if r["address"] in addresses and r["status"] != "D")  # fmt: skip
            if ring and not still:
                return
            if time.monotonic() > deadline:
                say(f"repair: {via.zone.name}'s gossip still holds {', '.join(still) or '?'} "
                    f"up after {GOSSIP_DOWN_WAIT_S:.0f}s; repairing anyway")  # fmt: skip
                return
            waited = time.monotonic() - t0
            them = "it" if len(still) == 1 else "them"
            say(f"repair: waiting for {via.zone.name}'s gossip to mark "
                f"{', '.join(still) or 'the stopped nodes'} down, so that the repair can "
                f"leave {them} out ({waited:.0f}s of {GOSSIP_DOWN_WAIT_S:.0f}s)")  # fmt: skip
            time.sleep(GOSSIP_POLL_S)

    def ring(self, via: cassandra.CassandraNode) -> list[dict[str, str]] | None:
        """Cassandra's own view of the ring (``nodetool status``) from node ``via``."""
        try:
            out = subprocess.run(
                cassandra.nodetool_argv(via, self.paths, "status"),
                capture_output=True,
                text=True,
                timeout=NODETOOL_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return None
        if out.returncode != 0:
            return None
        return parse_nodetool_status(out.stdout)

    def status(self, with_ring: bool = True) -> dict[str, Any]:
        spec = self.spec()
        order = {z.name: i for i, z in enumerate(self.topo.zones)}
        comps = sorted(self.components(spec), key=lambda c: (order[c.zone.name], c.kind != "etcd"))
        up = [m for m in self.etcd_members() if procs.state(m.managed).state == "up"]
        try:
            operator = self.etcd_files() if up else None
        except (OSError, pki.PkiError):  # members from before TLS for etcd: no views
            operator = None
        etcd_views = {m.zone.name: etcd.status(m, operator) for m in up if operator is not None}
        leader_name = None
        term = 0
        for view in etcd_views.values():
            if view and view["leader_id"] and view["raft_term"] >= term:
                term = view["raft_term"]
                leader_name = view["members"].get(view["leader_id"])

        def listening(c: Component, port: int) -> bool:
            # An etcd member answered over TLS above; a bare TCP probe of it would be
            # logged by etcd as a rejected connection on every status.
            if c.kind == "etcd":
                return etcd_views.get(c.zone.name) is not None
            return procs.port_open(c.zone.address, port)

        rows = []
        for c in comps:
            st = procs.state(c.managed)
            port = {
                "etcd": c.zone.ports.etcd_client,
                "cassandra": c.zone.ports.cql,
                "switch": c.zone.ports.switch,
            }[c.kind]
            rows.append(
                {
                    "city": c.zone.city,
                    "zone": c.zone.name,
                    "kind": c.kind,
                    "state": st.state,
                    "pid": st.pid if st.alive else None,
                    "address": c.zone.address,
                    "port": port,
                    "listening": listening(c, port) if st.state == "up" else False,
                    "etcd_leader": c.kind == "etcd" and c.zone.name == leader_name,
                    "log": str(c.log),
                }
            )
        ring: list[dict[str, str]] | None = None
        ring_via = None
        if with_ring:
            for n in self.cassandra_nodes(spec):
                if procs.state(n.managed).state == "up":
                    ring = self.ring(n)
                    if ring is not None:
                        ring_via = n.zone.name
                        break
        return {
            "cluster": self.topo.name,
            "state_dir": str(self.paths.state),
            "started": spec is not None,
            "cassandra_nodes": spec.cassandra_nodes if spec else None,
            "processes": rows,
            "etcd": {
                "leader": leader_name,
                "raft_term": term,
                "members_answering": sorted(k for k, v in etcd_views.items() if v),
            },
            "cassandra_ring": ring,
            "cassandra_ring_via": ring_via,
            # False with --no-ring: a ring of None then means "not asked", not "no answer".
            "cassandra_ring_read": with_ring,
        }


def _knows_all(node: cassandra.CassandraNode, nodes: Sequence[cassandra.CassandraNode]) -> bool:
    """Whether ``node``'s own peers table lists every other node with its city."""
    try:
        cluster, session = connect_to_node(
            node.zone.address, node.zone.ports.cql, timeout_s=PEERS_QUERY_TIMEOUT_S
        )
    except (DriverException, NoHostAvailable, OSError):  # not answering yet = not knowing yet
        return False
    try:
        rows = session.execute("SELECT peer, data_center FROM system.peers_v2")
        seen = {(str(r.peer), r.data_center) for r in rows}
    except (DriverException, NoHostAvailable, OSError):
        return False
    finally:
        cluster.shutdown()
    want = {(n.zone.address, n.dc) for n in nodes if n is not node}
    return want <= seen


def parse_nodetool_status(text: str) -> list[dict[str, str]]:
    """Rows of ``nodetool status``: dc, status (U/D), state (N/L/J/M), address, rack."""
    rows = []
    dc = ""
    for line in text.splitlines():
        if line.startswith("Datacenter:"):
            dc = line.split(":", 1)[1].strip()
            continue
        parts = line.split()
        if len(parts) >= 2 and len(parts[0]) == 2 and parts[0][0] in "UD" and parts[0][1] in "NLJM":
            rows.append(
                {
                    "dc": dc,
                    "status": parts[0][0],
                    "state": parts[0][1],
                    "address": parts[1],
                    "rack": parts[-1],
                }
            )
    return rows
