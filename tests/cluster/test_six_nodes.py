"""One Cassandra node per zone (``--cassandra-nodes 6``): two replicas per city, and a
whole city (two Cassandra nodes, its etcd member, two switch nodes) can be lost.

The topology's zone addresses are the session cluster's, so its processes are stopped
for the duration (its data is kept) and started again afterwards if a later test needs
them; the test is marked ``own_cluster`` and so runs last (tests/conftest.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from cassandra import ConsistencyLevel

from clearinghouse.localcluster.cluster import LocalCluster
from clearinghouse.localcluster.paths import Paths
from tests.conftest import TEST_STATE, later_needs_cluster
from tests.support import (
    eventually,
    read_probe,
    session_on_replica,
    session_preferring,
    write_probe,
)

pytestmark = [pytest.mark.cluster, pytest.mark.own_cluster]

ROWS_WHILE_DOWN = 20
CONVICTION_TIMEOUT_S = 60.0
HINT_REPLAY_TIMEOUT_S = 120.0


@pytest.fixture()
def six(local_cluster: LocalCluster, request: pytest.FixtureRequest) -> Iterator[LocalCluster]:
    local_cluster.stop("all")
    lc = LocalCluster(local_cluster.topo, Paths.default(TEST_STATE.parent / "pytest-six"))
    lc.down(wipe=True)
    failed = request.session.testsfailed
    try:
        lc.up(cassandra_nodes=6)
        yield lc
    finally:
        lc.down(wipe=request.session.testsfailed == failed)
        if later_needs_cluster(request):
            local_cluster.start("all")


def test_six_nodes_hold_two_replicas_per_city_and_survive_a_city(six: LocalCluster) -> None:
    ring = six.status()["cassandra_ring"]
    assert ring is not None
    by_dc: dict[str, set[str]] = {}
    for r in ring:
        assert r["status"] == "U"
        by_dc.setdefault(r["dc"], set()).add(r["rack"])
    assert by_dc == {c.name: {z.name for z in c.zones} for c in six.topo.cities}

    with session_preferring(six, "beijing") as s:
        repl = dict(s.execute(
            "SELECT replication FROM system_schema.keyspaces WHERE keyspace_name = %s",
            (six.topo.keyspace.name,),
        ).one().replication)  # fmt: skip
        repl.pop("class")
        assert repl == {"beijing": "2", "shanghai": "2", "shenzhen": "2"}

        six.kill("beijing")
        # QUORUM is 4 of 6: the four replicas of the other two cities suffice.
        written = [write_probe(s, "six-while-down") for _ in range(ROWS_WHILE_DOWN)]

        def all_readable() -> bool:
            try:
                return all(read_probe(s, pid) is not None for pid in written)
            except Exception:  # a read may pick a replica gossip has not convicted yet
                return False

        assert eventually(all_readable, CONVICTION_TIMEOUT_S, every_s=2)

    six.start("beijing")
    for zone in ("beijing-a", "beijing-b"):

        def replica_has_all(zone: str = zone) -> bool:
            with session_on_replica(six, zone) as r:
                return all(
                    read_probe(r, pid, ConsistencyLevel.LOCAL_ONE) is not None for pid in written
                )

        assert eventually(replica_has_all, HINT_REPLAY_TIMEOUT_S, every_s=3), zone
