"""A replica made to diverge on purpose is caught by the cross-city check.

One ledger row of a cleared window is rewritten in one city only, at consistency ONE:
a forged body with a matching entry hash, so the row is consistent in itself and only
a comparison with the other cities can tell. ``AuditService.CompareCities`` must name
that city and that row and nothing else; once the row is written back in every city,
the cities agree again.

How the write reaches one city only, every time (an earlier attempt froze the other
cities with SIGSTOP and raced their late delivery of the write and read repair):

* the other two cities' Cassandra nodes are stopped (SIGTERM, so they announce it in
  gossip) and the odd city's node sees them down before the write: its coordinator
  sends a mutation only to replicas it sees up, so nothing is queued for them;
* hinted handoff is off on that node (``nodetool disablehandoff``), so it keeps no hint
  for them either;
* ``read_repair`` of ``ledger_stream`` is ``NONE`` from before the write until the
  true row is written back in every city, so no QUORUM read of the row (a switch node
  taking a shard over reads its chain at QUORUM) can copy the forged row into a second
  city meanwhile. The check reads each city's replica at LOCAL_ONE, one replica, so it
  repairs nothing whatever the setting; the test checks that afterwards.

A takeover of the forged row's shard while the row is forged would read it at QUORUM:
if the odd city's replica answers, the forged cells (the newest) win, the chain does
not verify and that node keeps the shard out of service for the rest of the session.
A shard changes hands only when its owner gives it up (a commit that fails, as every
commit does while two cities are down) or loses its lease, so the test waits, before
stopping the two cities, until no node has committed anything for a while (nothing
is paid meanwhile and no window is closing), and checks afterwards that the shard's
owner and epoch did not change. Should the shard be out of service all the same, it
is brought back after the true row is written back, by restarting its node's switch.

The row is put back by writing its true value at ALL (a newer write than the forged
one). ``nodetool repair`` would do the opposite: the forged cells are the newest, so
repair would copy them into every city.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import grpc
import pytest
from cassandra import ConsistencyLevel
from cassandra.query import SimpleStatement

from clearing.v1 import audit_pb2, audit_pb2_grpc, settlement_pb2, settlement_pb2_grpc
from clearinghouse.domain.chain import LedgerEntry, entry_hash
from clearinghouse.domain.entries import KIND_DECISION
from clearinghouse.ledger_view import read_window
from clearinghouse.localcluster.cluster import LocalCluster
from clearinghouse.storage.ledger import CassandraLedger, encode_run
from clearinghouse.storage.windows import CassandraWindows
from clearinghouse.switch.records import SHARD_COUNT, payment_key
from tests.support import SwitchEnv, eventually, session_on_replica, session_preferring

pytestmark = pytest.mark.cluster

ODD_CITY = "shenzhen"  # the city whose replica gets the forged row
CLEAR_TIMEOUT_S = 90.0
DOWN_SEEN_TIMEOUT_S = 60.0
READABLE_TIMEOUT_S = 120.0
SERVED_TIMEOUT_S = 120.0
RESTORE_TIMEOUT_S = 60.0
# No commit on any node for this long counts as quiet; waited for at most the timeout.
QUIET_S = 3.0
QUIET_TIMEOUT_S = 60.0

# A stored run: the row of one shard's entries of one commit (storage.ledger, streams).
RowKey = tuple[str, int, int, int, int]  # stream, block, shard, epoch, first_seq
TABLE = "ledger_stream"
SELECT_ROW = (
    f"SELECT run_bytes FROM {TABLE} "
    "WHERE stream = %s AND block = %s AND shard = %s AND epoch = %s AND first_seq = %s"
)
UPDATE_ROW = (
    f"UPDATE {TABLE} SET run_bytes = %s "
    "WHERE stream = %s AND block = %s AND shard = %s AND epoch = %s AND first_seq = %s"
)


def stubs(env: SwitchEnv, zone: str) -> tuple[Any, Any]:
    ch = env.clients[zone].channel
    return (settlement_pb2_grpc.SettlementServiceStub(ch), audit_pb2_grpc.AuditServiceStub(ch))


def close_and_wait_cleared(env: SwitchEnv, zone: str) -> int:
    settle, audit = stubs(env, zone)
    w = settle.CloseWindow(settlement_pb2.CloseWindowRequest(reason="test"), timeout=10).window_id

    def cleared() -> bool:
        r = audit.GetWindow(audit_pb2.GetWindowRequest(window_id=w), timeout=10)
        return r.summary.state in ("CLEARED", "SETTLED")

    assert eventually(cleared, CLEAR_TIMEOUT_S), f"window {w} never cleared"
    return int(w)


def compare_when_readable(audit: Any, window: int) -> Any:
    """CompareCities once every city's replica can be read (a node that has just started
    may refuse a read for a while); the last answer or error after the timeout."""
    deadline = time.monotonic() + READABLE_TIMEOUT_S
    while True:
        try:
            r = audit.CompareCities(audit_pb2.CompareCitiesRequest(window_id=window), timeout=120)
            if all(not c.error for c in r.cities) or time.monotonic() > deadline:
                return r
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise
        time.sleep(2)


def summary(cmp: Any) -> list[tuple[str, str, int, list[str], str]]:
    return [(c.city, c.merkle_root.hex()[:16], c.entry_count, list(c.differing_rows[:5]),
             c.error[:120]) for c in cmp.cities]  # fmt: skip


def cassandra_zones(lc: LocalCluster, city: str) -> list[str]:
    return [n.zone.name for n in lc.cassandra_nodes() if n.zone.city == city]


def held_by_city(lc: LocalCluster, key: RowKey) -> dict[str, tuple[bytes]]:
    """The run's stored bytes in each city's own replica (LOCAL_ONE, one node)."""
    out = {}
    for city in lc.topo.city_names():
        with session_on_replica(lc, cassandra_zones(lc, city)[0]) as s:
            stmt = SimpleStatement(SELECT_ROW, consistency_level=ConsistencyLevel.LOCAL_ONE)
            row = s.execute(stmt, key).one()
        out[city] = (bytes(row.run_bytes),)
    return out


def read_repair(lc: LocalCluster) -> str:
    with session_preferring(lc, ODD_CITY) as s:
        row = s.execute(
            "SELECT read_repair FROM system_schema.tables "
            "WHERE keyspace_name = %s AND table_name = %s",
            (lc.topo.keyspace.name, TABLE),
        ).one()
    return str(row.read_repair)


def set_read_repair(lc: LocalCluster, mode: str) -> None:
    assert mode in ("BLOCKING", "NONE"), mode
    with session_preferring(lc, ODD_CITY) as s:
        done = s.execute(f"ALTER TABLE {TABLE} WITH read_repair = '{mode}'")
        assert done.response_future.is_schema_agreed, "the nodes did not agree on the schema change"
    assert read_repair(lc) == mode


def write_everywhere(lc: LocalCluster, values: tuple[Any, ...]) -> None:
    """The row's cells written at ALL, retried while restarted nodes are being marked up."""
    stmt = SimpleStatement(UPDATE_ROW, consistency_level=ConsistencyLevel.ALL)
    deadline = time.monotonic() + RESTORE_TIMEOUT_S
    with session_preferring(lc, "beijing") as s:
        while True:
            try:
                s.execute(stmt, values)
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(2)


def shard_owner(lc: LocalCluster, shard: int) -> tuple[str, int] | None:
    """(zone, epoch) of the switch node serving ``shard``, as the nodes say."""
    for zone, d in lc.describe_nodes().items():
        for s in (d or {}).get("shards", []):
            if s["shard"] == shard:
                return zone, int(s["epoch"])
    return None


def commits_so_far(lc: LocalCluster) -> int | None:
    """Group commits acknowledged on all nodes together; None if a node did not answer."""
    nodes = lc.describe_nodes()
    if any(d is None for d in nodes.values()):
        return None
    return sum(int(d["commits"]) for d in nodes.values() if d is not None)


def wait_until_quiet(lc: LocalCluster) -> bool:
    """Whether, within QUIET_TIMEOUT_S, no node committed anything for QUIET_S."""
    deadline = time.monotonic() + QUIET_TIMEOUT_S
    last = commits_so_far(lc)
    while time.monotonic() < deadline:
        time.sleep(QUIET_S)
        now = commits_so_far(lc)
        if now is not None and now == last:
            return True
        last = now
    return False


def bring_back(lc: LocalCluster, shard: int, zone: str) -> None:
    """If ``shard`` is out of service (a takeover read the forged row), restart the
    switch node that holds it, once the true row is back, so that it is rebuilt."""
    if eventually(lambda: shard in lc.served_shards(), SERVED_TIMEOUT_S):
        return
    print(f"shard {shard} is not served: restarting switch@{zone}")
    lc.stop(f"switch@{zone}")
    lc.start(f"switch@{zone}")
    eventually(lambda: len(lc.served_shards()) == SHARD_COUNT, SERVED_TIMEOUT_S)


@contextmanager
def cities_stopped(lc: LocalCluster, zones: list[str], seen_by: str) -> Iterator[None]:
    """Those Cassandra nodes stopped, and seen down by ``seen_by``; started on exit."""
    try:
        for z in zones:
            assert lc.stop(f"cassandra@{z}") == [f"cassandra@{z}"]
        node = next(n for n in lc.cassandra_nodes() if n.zone.name == seen_by)
        stopped = {lc.topo.zone(z).address for z in zones}

        def seen_down() -> bool:
            ring = lc.ring(node)
            return ring is not None and all(
                r["status"] == "D" for r in ring if r["address"] in stopped
            ) and stopped <= {r["address"] for r in ring}  # fmt: skip

        assert eventually(seen_down, DOWN_SEEN_TIMEOUT_S), f"{seen_by} still sees {zones} up"
        yield
    finally:
        lc.start("all")


def test_a_row_written_to_one_city_only_is_named_by_the_cross_city_check(
    switch_env: SwitchEnv,
) -> None:
    env, lc = switch_env, switch_env.lc
    odd = cassandra_zones(lc, ODD_CITY)
    others = [z for c in lc.topo.city_names() if c != ODD_CITY for z in cassandra_zones(lc, c)]
    zones = [z.name for z in lc.topo.zones]

    # A few payments, then a cleared window in which the three cities agree.
    orders = [env.order(payer_id="BANK_FLAKY") for _ in range(3)]
    for i, o in enumerate(orders):
        env.submit_until_final(zones[i:] + zones[:i], o, budget_s=60)
    window = close_and_wait_cleared(env, "beijing-b")
    _, audit = stubs(env, "shanghai-b")
    stored = audit.GetWindow(audit_pb2.GetWindowRequest(window_id=window), timeout=30)
    stored_root = stored.merkle_root
    before = compare_when_readable(audit, window)
    assert before.agree, summary(before)
    assert {c.merkle_root for c in before.cities} == {stored_root}, summary(before)
    assert {c.entry_count for c in before.cities} == {stored.entry_count}, summary(before)

    # The row: the decision of the first payment. Its forged version has another body
    # and the hash of that body, so it is a well-formed entry in itself.
    with session_preferring(lc, "beijing") as s:
        reader = CassandraLedger(s)
        data = read_window(reader, CassandraWindows(s), window)
        key_of = payment_key(orders[0].institution_id, orders[0].payment_id)
        entry: LedgerEntry = next(
            e for es in data.entries_by_shard.values() for e in es
            if e.kind == KIND_DECISION and e.payment_key == key_of
        )  # fmt: skip
        run = reader.locate(entry.shard, entry.epoch, entry.seq)
        assert run is not None, f"no stored run holds shard {entry.shard} seq {entry.seq}"
    forged_body = entry.body[:-1] + bytes([entry.body[-1] ^ 0x01])
    forged_hash = entry_hash(
        shard=entry.shard, epoch=entry.epoch, seq=entry.seq, kind=entry.kind,
        payment_key=entry.payment_key, body=forged_body, prev_hash=entry.prev_hash,
    )  # fmt: skip
    # The stored run holding the entry, as it is and with the entry forged.
    key = run.key
    forged_entry = replace(entry, body=forged_body, entry_hash=forged_hash)
    true_cells = (encode_run(run.entries),)
    forged_cells = (encode_run([forged_entry if e.seq == entry.seq else e for e in run.entries]),)
    everywhere_true = {c: true_cells for c in lc.topo.city_names()}
    diverged = {**everywhere_true, ODD_CITY: forged_cells}
    assert held_by_city(lc, key) == everywhere_true

    table_read_repair = read_repair(lc)
    forged = False
    # Nothing may give the row's shard up while the row is forged (see the docstring).
    quiet = wait_until_quiet(lc)
    owner_before = shard_owner(lc, entry.shard)
    assert owner_before is not None, f"shard {entry.shard} is not served"
    try:
        set_read_repair(lc, "NONE")
        for z in odd:
            assert lc.nodetool(z, "disablehandoff").returncode == 0
        with cities_stopped(lc, others, seen_by=odd[0]):
            forged = True  # from here on the row is put back whatever happens
            with session_on_replica(lc, odd[0]) as s:
                s.execute(SimpleStatement(UPDATE_ROW, consistency_level=ConsistencyLevel.ONE),
                          (*forged_cells, *key))  # fmt: skip
        # Every city is up again; the forged row is in the odd city's replica only.
        assert held_by_city(lc, key) == diverged
        served = eventually(lambda: len(lc.served_shards()) == SHARD_COUNT, SERVED_TIMEOUT_S)
        owner_now = shard_owner(lc, entry.shard)
        assert served and owner_now == owner_before, (
            f"shard {entry.shard} changed hands ({owner_before} -> {owner_now}) while its row "
            f"was forged in {ODD_CITY} (the cluster was {'' if quiet else 'not '}quiet before): "
            "its takeover read the row at QUORUM"
        )
        assert held_by_city(lc, key) == diverged

        cmp = compare_when_readable(audit, window)
        print(summary(cmp))
        assert not cmp.agree, summary(cmp)
        by_city = {c.city: c for c in cmp.cities}
        assert set(by_city) == set(lc.topo.city_names())
        assert list(by_city[ODD_CITY].differing_rows) == [
            f"shard {entry.shard} seq {entry.seq}: differs ({forged_hash.hex()[:16]})"
        ], summary(cmp)
        assert by_city[ODD_CITY].merkle_root != stored_root
        for city, c in by_city.items():
            assert not c.error, summary(cmp)
            assert c.entry_count == stored.entry_count, summary(cmp)
            if city != ODD_CITY:
                assert not c.differing_rows, summary(cmp)
                assert c.merkle_root == stored_root, summary(cmp)
        # The check only read: the forged row is still in the odd city alone.
        assert held_by_city(lc, key) == diverged

        # The true row written back in every city, then the table's read repair back:
        # the cities agree again.
        write_everywhere(lc, (*true_cells, *key))
        forged = False
        assert held_by_city(lc, key) == everywhere_true
        set_read_repair(lc, table_read_repair)
        again = compare_when_readable(audit, window)
        assert again.agree, summary(again)
        assert {c.merkle_root for c in again.cities} == {stored_root}, summary(again)
    finally:
        lc.start("all")
        for z in odd:
            lc.nodetool(z, "enablehandoff")
        if forged:
            write_everywhere(lc, (*true_cells, *key))
        if read_repair(lc) != table_read_repair:
            set_read_repair(lc, table_read_repair)
        bring_back(lc, entry.shard, owner_before[0])

    # The switch serves every shard and takes payments again.
    assert eventually(lambda: len(lc.served_shards()) == SHARD_COUNT, SERVED_TIMEOUT_S)
    r, _ = env.submit_until_final(zones, env.order(payer_id="BANK_FLAKY"), budget_s=60)
    assert r.payment.ledger_seq > 0
