"""The ledger's storage on real Cassandra: streams, seals, fences, legacy chains, index.

A switch process writes every commit into its own stream (one single-partition batch
per group commit, whatever shards it touches); a shard's chain is read back through its
seals. These tests write through :class:`CassandraLedger` as an owner does, on shards
the switch nodes never serve (900 and up), and read back through another
``CassandraLedger`` as a new owner or an auditor does.
"""

from __future__ import annotations

import uuid

import pytest

from clearinghouse.domain.chain import FIRST_SEQ, GENESIS_HASH, ChainBuilder, LedgerEntry
from clearinghouse.localcluster.cluster import LocalCluster
from clearinghouse.storage.ledger import CassandraLedger, legacy_block_of
from clearinghouse.switch.ports import IndexRow, Seal, ShardWrite
from clearinghouse.switch.shards import read_chain
from tests.support import session_preferring

pytestmark = pytest.mark.integration

NODE = "test-node"
AT_US = 1_780_000_000_000_000


def _shard() -> int:
    """A shard no switch node serves, fresh for each test (the keyspace is shared)."""
    return 900 + uuid.uuid4().int % 1_000_000


def _own(ledger: CassandraLedger, shard: int, epoch: int, prev: int = 0,
         start: tuple[int, bytes] = (FIRST_SEQ, GENESIS_HASH)) -> ChainBuilder:  # fmt: skip
    ledger.fence(shard, epoch, NODE, AT_US)
    ledger.write_seal(Seal(shard, epoch, prev, start[0], start[1]), NODE, AT_US)
    return ChainBuilder(shard, epoch, start[0], start[1])


def _round(chains: list[ChainBuilder], per_shard: int) -> list[ShardWrite]:
    return [
        ShardWrite(c.shard, c.epoch, AT_US,
                   [c.append("INTENT", f"inst/p-{c.next_seq}", b"body %d" % c.next_seq)
                    for _ in range(per_shard)], [])
        for c in chains
    ]  # fmt: skip


def test_commits_span_blocks_and_chains_read_back_whole(healthy_cluster: LocalCluster) -> None:
    a, b = _shard(), _shard()
    with session_preferring(healthy_cluster, "beijing") as s:
        writer = CassandraLedger(s, stream=f"test-{uuid.uuid4().hex[:8]}", block_entries_max=5)
        chains = [_own(writer, a, 1), _own(writer, b, 1)]
        written: dict[int, list[LedgerEntry]] = {a: [], b: []}
        for _ in range(4):  # 4 entries a round: a new block every round
            writes = _round(chains, 2)
            assert writer.commit(writes) == {a: True, b: True}
            for w in writes:
                written[w.shard] += w.entries
        assert writer.blocks.current() == 3  # rounds never share a block past the limit

        reader = CassandraLedger(s)  # a new owner or an auditor: another object
        for shard in (a, b):
            chain, newest = read_chain(reader, shard)
            assert (chain, newest) == (written[shard], 1)
        assert [e.seq for e in reader.rows(a, 1, 3, 6)] == [3, 4, 5, 6]
        assert reader.rows(a, 1, 9, 20) == []


def test_a_commit_is_refused_for_a_shard_whose_fence_moved(
    healthy_cluster: LocalCluster,
) -> None:
    a, b = _shard(), _shard()
    with session_preferring(healthy_cluster, "shanghai") as s:
        old = CassandraLedger(s, stream=f"old-{uuid.uuid4().hex[:8]}")
        chains = [_own(old, a, 1), _own(old, b, 1)]
        assert old.commit(_round(chains, 1)) == {a: True, b: True}
        # A new owner of b raises its fence: the old owner's next write of b lands in its
        # own stream, but is not acknowledged.
        new = CassandraLedger(s, stream=f"new-{uuid.uuid4().hex[:8]}")
        new.fence(b, 2, "other-node", AT_US)
        late = _round(chains, 1)
        assert old.commit(late) == {a: True, b: False}
        # The late write completed before the new owner read the chain (after its fence),
        # so the new owner builds on it: never acknowledged, yet part of the chain, which
        # is what the fencing argument allows (the payment's next owner resolves it).
        head, _ = read_chain(new, b)
        assert [e.seq for e in head] == [1, 2]
        nxt = _own(new, b, 2, prev=1, start=(3, head[-1].entry_hash))
        assert new.commit(_round([nxt], 1)) == {b: True}
        chain, newest = read_chain(CassandraLedger(s), b)
        assert newest == 2
        assert [(e.seq, e.epoch) for e in chain] == [(1, 1), (2, 1), (3, 2)]


def test_a_lower_fence_arriving_late_does_not_lower_the_shards_top(
    healthy_cluster: LocalCluster,
) -> None:
    """Fences race: a slow takeover's write may land after a newer one's. The top row is
    written at the epoch's own timestamp, so the highest epoch stays on top."""
    shard = _shard()
    with session_preferring(healthy_cluster, "shenzhen") as s:
        ledger = CassandraLedger(s)
        assert ledger.max_fences([shard]) == {}
        ledger.fence(shard, 7, "node-7", AT_US)
        ledger.fence(shard, 5, "node-5", AT_US + 1)
        assert ledger.max_fences([shard]) == {shard: 7}
        assert CassandraLedger(s).max_fences([shard, shard + 1]) == {shard: 7}
        ledger.fence(shard, 9, "node-9", AT_US + 2)
        assert ledger.max_fences([shard]) == {shard: 9}
        # The history keeps every epoch.
        history = s.execute("SELECT epoch FROM shard_fences WHERE bucket = 0 AND shard = %s",
                            (shard,))  # fmt: skip
        assert sorted(r.epoch for r in history) == [5, 7, 9]


def test_a_chain_written_before_streams_is_still_read(healthy_cluster: LocalCluster) -> None:
    """Seals without a stream name partitions of ledger_entries (migration 004)."""
    shard = _shard()
    chain = ChainBuilder(shard, 1, FIRST_SEQ, GENESIS_HASH)
    entries = [chain.append("INTENT", f"inst/legacy-{i}", b"old") for i in range(3)]
    with session_preferring(healthy_cluster, "shenzhen") as s:
        s.execute(
            "INSERT INTO shard_seals (shard, epoch, prev_epoch, start_seq, start_hash, "
            "node_id, at_us) VALUES (%s, 1, 0, 1, %s, %s, %s)",
            (shard, GENESIS_HASH, NODE, AT_US),
        )
        for e in entries:
            s.execute(
                "INSERT INTO ledger_entries (shard, epoch, block, seq, kind, payment_key, "
                "body, prev_hash, entry_hash, at_us) VALUES (%s, 1, %s, %s, %s, %s, %s, %s, "
                "%s, %s)",
                (shard, legacy_block_of(e.seq), e.seq, e.kind, e.payment_key, e.body,
                 e.prev_hash, e.entry_hash, AT_US),
            )  # fmt: skip
        assert read_chain(CassandraLedger(s), shard) == (entries, 1)


def test_index_rows_and_marks_round_trip(healthy_cluster: LocalCluster) -> None:
    participant = f"TEST_{uuid.uuid4().hex[:8].upper()}"
    shard = _shard()
    with session_preferring(healthy_cluster, "beijing") as s:
        ledger = CassandraLedger(s)
        rows = [IndexRow("INST_X", f"p-{i}", AT_US + i, participant) for i in range(3)]
        ledger.index(rows + rows)  # twice: the same rows, nothing more
        listed, token = ledger.list_index(participant, AT_US, AT_US + 10, 100, "")
        assert (listed, token) == ([("INST_X", f"p-{i}") for i in range(3)], "")
        assert ledger.index_marks(shard) == {}
        ledger.mark_indexed({(shard, 1): 7, (shard, 2): 3}, AT_US)
        ledger.mark_indexed({(shard, 2): 9}, AT_US)
        assert ledger.index_marks(shard) == {1: 7, 2: 9}
