"""Ownership agents against a real etcd: an even split, failover by lease expiry, a join.

Marked ``integration`` but independent of the suite's 3-city cluster: this module starts
its own single etcd member (Debian's ``etcd``) on 127.0.0.1, on two free ports and a
temporary data dir, and always stops it. Agents use a 2 s lease (etcd's default floor),
each with its own client, as separate processes would.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyetcd
import pytest

from clearinghouse.ownership.etcd_backend import STEP_BUDGET_S, OwnershipAgent
from clearinghouse.ownership.node import LOOP_INTERVAL_S, RELEASE_GRACE_TTLS
from clearinghouse.ownership.placement import NodeInfo, assign, moved_bound
from clearinghouse.switch.records import SHARD_COUNT

pytestmark = pytest.mark.integration

TTL_S = 2
ETCD_START_TIMEOUT_S = 20.0
ETCD_STOP_TIMEOUT_S = 10.0
# Addresses and ports another test run holds on this machine: never bind them.
RESERVED_PORTS = {12379, 12380, 19042, 17000, 15051}

BJ = NodeInfo("beijing-a", "beijing-a", "beijing")
SH = NodeInfo("shanghai-a", "shanghai-a", "shanghai")
SZ = NodeInfo("shenzhen-a", "shenzhen-a", "shenzhen")
SZ_B = NodeInfo("shenzhen-b", "shenzhen-b", "shenzhen")


def _free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in RESERVED_PORTS:
            return port


@dataclass(frozen=True)
class Etcd:
    port: int
    pid: int

    def client(self) -> Any:
        return pyetcd.client(host="127.0.0.1", port=self.port, timeout=5)


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Etcd]:
    binary = shutil.which("etcd")
    if binary is None:
        pytest.skip("etcd is not installed (Debian's etcd-server)")
    data: Path = tmp_path_factory.mktemp("etcd")
    client_url = f"http://127.0.0.1:{(client_port := _free_port())}"
    peer_url = f"http://127.0.0.1:{_free_port()}"
    log = (data / "etcd.log").open("w")
    argv = [
        binary,
        "--name=ownership-test",
        f"--data-dir={data / 'member'}",
        f"--listen-client-urls={client_url}",
        f"--advertise-client-urls={client_url}",
        f"--listen-peer-urls={peer_url}",
        f"--initial-advertise-peer-urls={peer_url}",
        f"--initial-cluster=ownership-test={peer_url}",
    ]
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_ready(Etcd(client_port, proc.pid), proc, data / "etcd.log")
        yield Etcd(client_port, proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(ETCD_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(ETCD_STOP_TIMEOUT_S)
        log.close()


def _wait_ready(etcd: Etcd, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + ETCD_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"etcd exited with {proc.returncode}; see {log}")
        try:
            etcd.client().status()
            return
        except Exception:
            time.sleep(0.1)
    pytest.fail(f"etcd not ready in {ETCD_START_TIMEOUT_S} s; see {log}")


@dataclass
class Callbacks:
    gained: list[tuple[int, int]] = field(default_factory=list)
    lost: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_gained(self, shard: int, epoch: int) -> None:
        with self.lock:
            self.gained.append((shard, epoch))

    def on_lost(self, shard: int) -> None:
        with self.lock:
            self.lost.append(shard)


@dataclass
class Cluster:
    etcd: Etcd
    prefix: str
    agents: dict[str, OwnershipAgent] = field(default_factory=dict)
    calls: dict[str, Callbacks] = field(default_factory=dict)

    def start(self, node: NodeInfo) -> OwnershipAgent:
        calls = self.calls[node.node_id] = Callbacks()
        agent = OwnershipAgent(
            self.etcd.client(),
            node,
            f"127.0.0.1:{_free_port()}",
            lease_ttl_s=TTL_S,
            on_gained=calls.on_gained,
            on_lost=calls.on_lost,
            prefix=self.prefix,
        )
        self.agents[node.node_id] = agent.start()
        return agent

    def owners(self) -> dict[int, tuple[str, int]]:
        """Shard -> (node, epoch) from each agent's own, exact view of what it owns."""
        out: dict[int, tuple[str, int]] = {}
        for node_id, agent in self.agents.items():
            for shard, epoch in agent.owned().items():
                assert shard not in out, f"shard {shard} owned by {out[shard]} and {node_id}"
                out[shard] = (node_id, epoch)
        return out


@pytest.fixture()
def cluster(etcd: Etcd) -> Iterator[Cluster]:
    c = Cluster(etcd, f"/ownership-test-{uuid.uuid4().hex[:8]}/")
    yield c
    for agent in c.agents.values():
        agent.close()
    left = [t.name for t in threading.enumerate() if t.name.startswith("ownership-")]
    assert left == [], f"threads still running after close(): {left}"


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> float:
    start = time.monotonic()
    while not condition():
        waited = time.monotonic() - start
        assert waited < timeout_s, f"{what}: not after {timeout_s} s"
        time.sleep(0.02)
    return time.monotonic() - start


ZONES = {n.node_id: n.zone for n in (BJ, SH, SZ, SZ_B)}


def _routes_like(agent: OwnershipAgent, owners: dict[int, tuple[str, int]]) -> bool:
    found = [agent.owner_of(s) for s in range(SHARD_COUNT)]
    # The zone as well: the node-to-node hop accepts only the certificate node:<zone>.
    return all(
        o is not None and (o.node_id, o.epoch, o.zone) == (*owners[s], ZONES[o.node_id])
        for s, o in enumerate(found)
    )


def _settled(c: Cluster, nodes: list[NodeInfo]) -> bool:
    want = assign(SHARD_COUNT, nodes)
    return {s: o for s, (o, _) in c.owners().items()} == want


def test_three_agents_own_every_shard_evenly(cluster: Cluster) -> None:
    for node in (BJ, SH, SZ):
        cluster.start(node)
    wait_for(lambda: _settled(cluster, [BJ, SH, SZ]), 10.0, "an even split")
    owners = cluster.owners()
    assert sorted(Counter(o for o, _ in owners.values()).values()) == [42, 43, 43]
    # Every agent routes every shard to the same owner, at the owner's epoch.
    for agent in cluster.agents.values():
        wait_for(lambda a=agent: _routes_like(a, owners), 5.0, "views agree")


def test_a_stopped_agent_s_shards_move_to_the_survivors_within_ttl_plus_2_s(
    cluster: Cluster,
) -> None:
    for node in (BJ, SH, SZ):
        cluster.start(node)
    wait_for(lambda: _settled(cluster, [BJ, SH, SZ]), 10.0, "an even split")
    before = cluster.owners()
    victim = cluster.agents.pop(SZ.node_id)
    its_shards = sorted(s for s, (o, _) in before.items() if o == SZ.node_id)
    stopped_at = time.monotonic()
    victim.close(revoke=False)  # like a crash: the lease stays until its TTL runs out
    assert sorted(cluster.calls[SZ.node_id].lost) == its_shards
    took = wait_for(lambda: len(cluster.owners()) == SHARD_COUNT, TTL_S + 2.0, "failover")
    print(f"\nshards re-owned {time.monotonic() - stopped_at:.2f} s after the stop (TTL {TTL_S} s)")
    assert took <= TTL_S + 2.0
    after = cluster.owners()
    assert all(after[s][1] > before[s][1] for s in its_shards), "epochs must grow"
    gained = {s for c in cluster.calls.values() for s, _ in c.gained}
    assert set(its_shards) <= gained


def test_a_joining_agent_takes_a_bounded_share(cluster: Cluster) -> None:
    for node in (BJ, SH):
        cluster.start(node)
    wait_for(lambda: _settled(cluster, [BJ, SH]), 10.0, "a split in two")
    before = {s: o for s, (o, _) in cluster.owners().items()}
    cluster.start(SZ_B)
    grace_s = RELEASE_GRACE_TTLS * TTL_S
    took = wait_for(lambda: _settled(cluster, [BJ, SH, SZ_B]), grace_s + 5.0, "the join")
    assert took >= grace_s - 0.5, "shards moved before the joiner settled"
    after = {s: o for s, (o, _) in cluster.owners().items()}
    assert Counter(after.values())[SZ_B.node_id] in (42, 43)
    moved = sum(before[s] != after[s] for s in range(SHARD_COUNT))
    assert moved <= moved_bound(SHARD_COUNT, 2, 3)


def test_a_closed_agent_hands_its_shards_over_at_once(cluster: Cluster) -> None:
    for node in (BJ, SH, SZ):
        cluster.start(node)
    wait_for(lambda: _settled(cluster, [BJ, SH, SZ]), 10.0, "an even split")
    cluster.agents.pop(SH.node_id).close()  # revokes its lease: no TTL to wait
    took = wait_for(lambda: len(cluster.owners()) == SHARD_COUNT, TTL_S, "handover")
    assert took < 1.0


def test_agents_own_nothing_while_etcd_is_frozen_and_recover_after(
    cluster: Cluster, etcd: Etcd
) -> None:
    for node in (BJ, SH, SZ):
        cluster.start(node)
    wait_for(lambda: _settled(cluster, [BJ, SH, SZ]), 10.0, "an even split")
    before = cluster.owners()
    os.kill(etcd.pid, signal.SIGSTOP)
    try:
        # No keepalive is answered: each agent's local deadline (last send + TTL - margin)
        # passes within the TTL, even though etcd never expired anything.
        wait_for(lambda: cluster.owners() == {}, TTL_S, "every shard dropped")
        # The callbacks follow within a loop step (queries are exact at once).
        wait_for(
            lambda: sum(len(c.lost) for c in cluster.calls.values()) == SHARD_COUNT,
            LOOP_INTERVAL_S + STEP_BUDGET_S,
            "on_lost for every shard",
        )
    finally:
        os.kill(etcd.pid, signal.SIGCONT)
    wait_for(lambda: _settled(cluster, [BJ, SH, SZ]), 15.0, "recovery")
    after = cluster.owners()
    assert all(after[s][1] > before[s][1] for s in range(SHARD_COUNT)), "epochs must grow"
