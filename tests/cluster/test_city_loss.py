"""Losing a whole city (its Cassandra node and its etcd member) loses nothing.

Real faults: SIGKILL of every process of the city at once. While it is down, QUORUM
writes and reads go through the two other cities (from a client that prefers the lost
city), and etcd keeps a leader. When the city starts again it rejoins, and rows written
while it was down become readable from its own replica (hinted handoff).
"""

from __future__ import annotations

import pytest
from cassandra import ConsistencyLevel

from clearing.v1 import common_pb2
from clearinghouse._invariant import InvariantViolation
from clearinghouse.ledger_view import read_ledger
from clearinghouse.localcluster import etcd as etcd_mod
from clearinghouse.localcluster import procs
from clearinghouse.localcluster.cluster import LocalCluster
from clearinghouse.storage.ledger import CassandraLedger
from clearinghouse.switch.records import payment_key
from tests.support import (
    SwitchEnv,
    eventually,
    read_probe,
    session_on_replica,
    session_preferring,
    write_probe,
)

pytestmark = pytest.mark.cluster

HINT_REPLAY_TIMEOUT_S = 120.0
LOST_NODE_DOWN_TIMEOUT_S = 15.0
PAYMENTS_WHILE_DOWN = 24
RETRY_BUDGET_S = 60.0
FINAL = {
    common_pb2.PAYMENT_STATE_APPROVED, common_pb2.PAYMENT_STATE_DECLINED,
    common_pb2.PAYMENT_STATE_FAILED, common_pb2.PAYMENT_STATE_REVERSED,
}  # fmt: skip
ROWS_WHILE_DOWN = 50


@pytest.mark.parametrize("city", ["beijing"])
def test_city_loss_and_rejoin(healthy_cluster: LocalCluster, city: str) -> None:
    lc = healthy_cluster
    zone = lc.topo.city(city).zones[0].name
    with session_preferring(lc, city) as s:
        before = write_probe(s, "before-loss")

        killed = lc.kill(city)
        switches = [f"switch@{z.name}" for z in lc.topo.city(city).zones]
        assert sorted(killed) == sorted([f"etcd@{zone}", f"cassandra@{zone}", *switches])
        assert all(not procs.state(c.managed).alive for c in lc.select(city))

        # Writes and reads at QUORUM still succeed through the other two cities, from a
        # session whose preferred (local) city is the one that was lost.
        written = [write_probe(s, "while-down") for _ in range(ROWS_WHILE_DOWN)]
        for pid in [before, *written]:
            assert read_probe(s, pid) is not None, pid
        with pytest.raises(Exception, match=r"(?i)consistency|unavailable|replica"):
            # ALL cannot be met with a city down: the check above is not vacuous.
            write_probe(s, "all", ConsistencyLevel.ALL)

    # The schema can be applied with a city down. Its node is known down to the session
    # schema changes go through, so a change would not wait on it to agree (and the
    # QUORUM read of the applied migrations is retried until gossip convicts it).
    spec = lc.spec()
    assert spec is not None
    with lc.schema_session(spec) as session:
        lost_address = lc.topo.zone(zone).address

        def lost_is_down() -> bool:
            hosts = session.cluster.metadata.all_hosts()
            return [h.is_up for h in hosts if h.address == lost_address] == [False]

        # The session's pool to the lost node fails as it connects (refused at once).
        assert eventually(lost_is_down, LOST_NODE_DOWN_TIMEOUT_S, every_s=0.5)
    assert lc.apply_schema() == []

    survivors = [m for m in lc.etcd_members() if m.zone.city != city]
    operator = lc.etcd_files()
    assert all(etcd_mod.healthy(m, operator) for m in survivors)
    leaders = {etcd_mod.status(m, operator)["leader_id"] for m in survivors}  # type: ignore[index]
    assert len(leaders) == 1 and "" not in leaders

    started = lc.start(city)
    assert sorted(started) == sorted([f"etcd@{zone}", f"cassandra@{zone}", *switches])
    lost = etcd_mod.members(lc.topo, lc.paths)
    assert eventually(lambda: all(etcd_mod.healthy(m, operator) for m in lost), 30)

    # The rejoined city's own replica catches up on what it missed (hint replay).
    def replica_has_all() -> bool:
        with session_on_replica(lc, zone) as r:
            return all(
                read_probe(r, pid, ConsistencyLevel.LOCAL_ONE) is not None for pid in written
            )

    assert eventually(replica_has_all, HINT_REPLAY_TIMEOUT_S, every_s=3), (
        f"{city}'s replica did not receive the rows written while it was down"
    )


def test_payments_go_on_through_the_other_cities_and_the_lost_city_catches_up(
    switch_env: SwitchEnv,
) -> None:
    env = switch_env
    lost = "shenzhen"
    lost_zone = env.lc.topo.city(lost).zones[0].name
    env.lc.kill(lost)
    try:
        survivors = [z.name for z in env.lc.topo.zones if z.city != lost]
        orders = [env.order(payer_id="BANK_BOC") for _ in range(PAYMENTS_WHILE_DOWN)]
        # Right after a city is lost, Cassandra's coordinators may still wait for the dead
        # replicas (about 20 s until gossip convicts them): a write can time out and the
        # switch answers UNAVAILABLE with retry advice. A client retries the same order.
        results = [
            env.submit_until_final(survivors[i % 4 :] + survivors[: i % 4], o, RETRY_BUDGET_S)
            for i, o in enumerate(orders)
        ]
        states = [r.payment.state for r, _ in results]
        print(f"retries while {lost} was down: {sum(n for _, n in results)}")
        assert all(s in FINAL for s in states), states
        # Every acknowledged payment reads back through any surviving zone.
        for i, o in enumerate(orders):
            assert env.get(survivors[-1 - i % len(survivors)], o).state == states[i]
    finally:
        env.lc.start(lost)

    def replica_has_all() -> bool:
        # The lost city's own replica alone (LOCAL_ONE) holds every shard chain with the
        # decision of every payment acknowledged while it was down.
        with session_on_replica(env.lc, lost_zone) as r:
            try:
                ledger = read_ledger(CassandraLedger(r, ConsistencyLevel.LOCAL_ONE))
            except InvariantViolation:
                return False  # a chain not yet complete on this replica
            keys = [payment_key(o.institution_id, o.payment_id) for o in orders]
            return all(k in ledger.decided for k in keys)

    assert eventually(replica_has_all, HINT_REPLAY_TIMEOUT_S, every_s=3), (
        f"{lost}'s own replica lacks payments acknowledged while it was down"
    )
