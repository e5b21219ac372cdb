"""Shared fixtures.

Integration and cluster tests run against a real local cluster (etcd + Apache
Cassandra) started once per run in ``.state/pytest`` and always torn down. When a test
failed, the state folder with every process's log is kept and its path printed.
``--existing-cluster`` points the suite at a cluster already running in ``.state``
instead (it is neither started nor stopped).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from clearinghouse import topology
from clearinghouse.localcluster import procs
from clearinghouse.localcluster.cluster import LocalCluster
from clearinghouse.localcluster.paths import Paths, repo_root
from clearinghouse.security import pki
from clearinghouse.switch.records import SHARD_COUNT
from tests.support import SwitchEnv, start_switch_env

TEST_STATE = repo_root() / ".state" / "pytest"

# Property tests are not timed: the machines they run on are shared, and how fast code
# is belongs in benchmarks, not in a test that fails when a neighbour is busy.
settings.register_profile("clearing", deadline=None)
settings.load_profile("clearing")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--existing-cluster",
        action="store_true",
        help="use the cluster already running in .state instead of starting one",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that stop the session cluster to run one of their own go last, so nothing
    after them waits for the session cluster to start again (see ``later_needs_cluster``)."""
    items.sort(key=lambda item: item.get_closest_marker("own_cluster") is not None)


def later_needs_cluster(request: pytest.FixtureRequest) -> bool:
    """Whether a test after this one uses the session cluster."""
    items = request.session.items
    later = items[items.index(request.node) + 1 :] if request.node in items else items
    return any("local_cluster" in item.fixturenames for item in later)


def _ports_in_use(topo: topology.Topology) -> list[str]:
    busy = []
    for z in topo.zones:
        for name in ("etcd_client", "cql", "switch"):
            port = getattr(z.ports, name)
            if procs.port_open(z.address, port, timeout_s=0.2):
                busy.append(f"{z.address}:{port} ({name})")
    return busy


@pytest.fixture(scope="session")
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> pki.LocalCA:
    """A certificate authority of the tests' own, for servers started in-process."""
    ca = pki.LocalCA(tmp_path_factory.mktemp("pki"))
    ca.init()
    return ca


@pytest.fixture
def ca(tmp_path: Path) -> pki.LocalCA:
    """A certificate authority for one test, which it may issue and re-issue from."""
    ca = pki.LocalCA(tmp_path / "pki")
    ca.init()
    return ca


@pytest.fixture(scope="session")
def topo() -> topology.Topology:
    return topology.load()


@pytest.fixture(scope="session")
def local_cluster(
    request: pytest.FixtureRequest, topo: topology.Topology
) -> Iterator[LocalCluster]:
    if request.config.getoption("--existing-cluster"):
        lc = LocalCluster(topo, Paths.default(), progress=print)
        lc.up()
        yield lc
        return
    paths = Paths.default(TEST_STATE)
    lc = LocalCluster(topo, paths, progress=print)
    lc.down(wipe=True)
    busy = _ports_in_use(topo)
    if busy:
        pytest.fail(
            "another cluster holds the topology's ports "
            f"({', '.join(busy[:4])}): stop it with `clearingctl cluster down`"
        )
    try:
        lc.up()
    except Exception:
        lc.down(wipe=False)
        raise
    failed_before = request.session.testsfailed
    try:
        yield lc
    finally:
        lc.down(wipe=False)
        if request.session.testsfailed > failed_before:
            print(f"\nlogs of the failed run kept in {paths.state}")
            for log in sorted(Path(paths.state).glob("*/*/logs/system.log")):
                errors = [
                    ln
                    for ln in log.read_text(errors="replace").splitlines()
                    if ln.startswith("ERROR")
                ]
                if errors:
                    print(f"--- {len(errors)} ERROR lines in {log}; last 5:")
                    print("\n".join(errors[-5:]))
        else:
            shutil.rmtree(paths.state, ignore_errors=True)


@pytest.fixture(scope="session")
def _switch_env(local_cluster: LocalCluster) -> Iterator[SwitchEnv]:
    env = start_switch_env(local_cluster)
    yield env
    for c in env.clients.values():
        c.close()


@pytest.fixture()
def switch_env(_switch_env: SwitchEnv, healthy_cluster: LocalCluster) -> SwitchEnv:
    """Switch nodes in every zone, bank simulators, the demo's participants registered."""
    return _switch_env


@pytest.fixture()
def healthy_cluster(local_cluster: LocalCluster) -> LocalCluster:
    """The cluster with every process running and every ledger shard served (a previous
    fault test may have left a process down, or a shard being taken over)."""
    down = [c.label for c in local_cluster.components() if not procs.state(c.managed).alive]
    if down:
        local_cluster.start("all")
    elif len(local_cluster.served_shards()) < SHARD_COUNT:
        local_cluster.wait_for_shard_owners()
    return local_cluster
