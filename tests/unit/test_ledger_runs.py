"""The stored form of a run of ledger entries (one stream row per shard and commit)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clearinghouse._invariant import InvariantViolation
from clearinghouse.domain.chain import FIRST_SEQ, GENESIS_HASH, ChainBuilder, LedgerEntry
from clearinghouse.storage.ledger import RUN_FORMAT_V1, StreamBlocks, decode_run, encode_run

pytestmark = pytest.mark.unit

SHARD, EPOCH = 17, 42


def _run(items: list[tuple[str, str, bytes]], first_seq: int = FIRST_SEQ) -> list[LedgerEntry]:
    head = GENESIS_HASH if first_seq == FIRST_SEQ else b"\x07" * 32
    chain = ChainBuilder(SHARD, EPOCH, first_seq, head)
    return [chain.append(kind, key, body) for kind, key, body in items]


texts = st.text(min_size=1, max_size=40)


@given(
    st.lists(st.tuples(texts, st.text(max_size=80), st.binary(max_size=600)), min_size=1,
             max_size=30),
    st.integers(min_value=FIRST_SEQ, max_value=2**40),
)  # fmt: skip
def test_a_run_reads_back_as_it_was_written(
    items: list[tuple[str, str, bytes]], first_seq: int
) -> None:
    run = _run(items, first_seq)
    data = encode_run(run)
    assert data[0] == RUN_FORMAT_V1
    assert decode_run(SHARD, EPOCH, first_seq, data) == run


def test_damaged_runs_are_refused_not_half_read() -> None:
    run = _run([("INTENT", "inst/p-1", b"order"), ("DECISION", "inst/p-1", b"approved")])
    data = encode_run(run)
    for bad in (data[:-1], data[:10], data + b"\x00", b"\x02" + data[1:], b""):
        with pytest.raises(InvariantViolation):
            decode_run(SHARD, EPOCH, FIRST_SEQ, bad)


def test_a_changed_body_byte_still_decodes_and_fails_its_hash() -> None:
    """A byte changed inside a body keeps the run's shape: the entry decodes with the
    changed body and the stored hash, so the chain check (not the decoder) names it."""
    run = _run([("INTENT", "inst/p-1", b"order bytes")])
    data = bytearray(encode_run(run))
    data[data.index(b"order bytes")] ^= 0x01
    (entry,) = decode_run(SHARD, EPOCH, FIRST_SEQ, bytes(data))
    assert entry.body != run[0].body and entry.entry_hash == run[0].entry_hash


def test_invalid_text_in_a_run_is_a_damaged_run() -> None:
    run = _run([("INTENT", "inst/p-1", b"order")])
    data = bytearray(encode_run(run))
    data[data.index(b"INTENT")] = 0xFF  # not UTF-8
    with pytest.raises(InvariantViolation):
        decode_run(SHARD, EPOCH, FIRST_SEQ, bytes(data))


def test_a_stream_moves_to_its_next_block_only_after_a_write_there_succeeded() -> None:
    blocks = StreamBlocks(entries_max=10)
    block, held = blocks.next_for(6)
    assert (block, held) == (0, 0)
    blocks.written(block, held, 6)
    assert blocks.next_for(5) == (1, 0)  # would pass the limit: the next block
    # That write failed (nothing recorded): a commit that fits still goes to block 0,
    # so block 1 is never left empty behind a block 2.
    assert blocks.next_for(4) == (0, 6)
    blocks.written(0, 6, 4)
    assert blocks.next_for(1) == (1, 0)
    blocks.written(1, 0, 1)
    assert (blocks.current(), blocks.next_for(3)) == (1, (1, 1))
    with pytest.raises(InvariantViolation):
        blocks.written(3, 0, 1)  # a block is never skipped
