"""The per-shard hash chain: building, verifying, and finding the first broken link."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import struct
from typing import Any, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clearinghouse._invariant import InvariantViolation
from clearinghouse.domain.chain import (
    FIRST_SEQ,
    GENESIS_HASH,
    ChainBuilder,
    ChainProblem,
    LedgerEntry,
    entry_hash,
    verify_chain,
)

pytestmark = pytest.mark.unit

# Pinned so that any change to the entry encoding fails here; auditors rely on it.
PINNED_FIRST_ENTRY_HEX = "f1b7dd557e5a08665efd3415872dc9f86b0b85954eb9929b51dda6a8ba865703"


def _chain(n: int, shard: int = 7, epoch: int = 3) -> list[LedgerEntry]:
    builder = ChainBuilder(shard, epoch, FIRST_SEQ, GENESIS_HASH)
    return [builder.append("payment.state", f"inst-1/p{i}", b"body %d" % i) for i in range(n)]


def _reference_hash(entry: LedgerEntry) -> bytes:
    # An independent re-implementation of the documented layout, as an auditor would write.
    def lp(data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + data

    return hashlib.sha256(
        lp(b"clearing.LedgerEntry.v1")
        + struct.pack(">QQQ", entry.shard, entry.epoch, entry.seq)
        + lp(entry.kind.encode())
        + lp(entry.payment_key.encode())
        + lp(entry.body)
        + entry.prev_hash
    ).digest()


def test_genesis() -> None:
    assert GENESIS_HASH == b"\x00" * 32
    first = _chain(1)[0]
    assert (first.seq, first.prev_hash) == (FIRST_SEQ, GENESIS_HASH)
    assert first.entry_hash.hex() == PINNED_FIRST_ENTRY_HEX


def test_matches_the_documented_layout() -> None:
    for entry in _chain(5):
        assert entry.entry_hash == _reference_hash(entry)


def test_append_links_and_numbers_without_gaps() -> None:
    entries = _chain(5)
    assert [e.seq for e in entries] == [1, 2, 3, 4, 5]
    for prev, cur in itertools.pairwise(entries):
        assert cur.prev_hash == prev.entry_hash


@given(st.integers(0, 30))
def test_append_n_then_verify_ok(n: int) -> None:
    entries = _chain(n)
    report = verify_chain(entries, FIRST_SEQ, GENESIS_HASH)
    assert report.ok, report
    assert (report.verified, report.head_seq) == (n, n)
    assert report.head_hash == (entries[-1].entry_hash if entries else GENESIS_HASH)
    assert report.broken_seq is None
    assert report.problem is None


def test_verify_from_a_trusted_midpoint() -> None:
    entries = _chain(10)
    report = verify_chain(entries[4:], entries[3].seq + 1, entries[3].entry_hash)
    assert report.ok
    assert report.verified == 6


def test_wrong_start_hash_breaks_the_first_link() -> None:
    report = verify_chain(_chain(3), FIRST_SEQ, b"\x01" * 32)
    assert (report.ok, report.broken_seq, report.problem) == (
        False,
        1,
        ChainProblem.WRONG_PREV_HASH,
    )


def _flip_str(value: str, at: int) -> str:
    at %= len(value)
    return value[:at] + chr(ord(value[at]) ^ 1) + value[at + 1 :]


def _flip_bytes(value: bytes, at: int) -> bytes:
    at %= len(value)
    return value[:at] + bytes([value[at] ^ 0x01]) + value[at + 1 :]


@given(
    n=st.integers(1, 12),
    data=st.data(),
    field=st.sampled_from(["kind", "payment_key", "body", "prev_hash", "entry_hash"]),
    at=st.integers(0, 1000),
)
def test_flipping_one_byte_anywhere_is_reported_at_that_seq(
    n: int, data: st.DataObject, field: str, at: int
) -> None:
    entries = _chain(n)
    index = data.draw(st.integers(0, n - 1))
    value = getattr(entries[index], field)
    flipped = _flip_str(value, at) if isinstance(value, str) else _flip_bytes(value, at)
    entries[index] = dataclasses.replace(entries[index], **{field: cast(Any, flipped)})
    report = verify_chain(entries, FIRST_SEQ, GENESIS_HASH)
    assert not report.ok
    assert report.broken_seq == entries[index].seq
    assert report.verified == index
    expected = (
        ChainProblem.WRONG_PREV_HASH if field == "prev_hash" else ChainProblem.WRONG_ENTRY_HASH
    )
    assert report.problem is expected


@pytest.mark.parametrize("field", ["shard", "epoch"])
def test_changing_shard_or_epoch_breaks_the_hash(field: str) -> None:
    entries = _chain(4)
    entries[2] = dataclasses.replace(entries[2], **{field: getattr(entries[2], field) + 1})
    report = verify_chain(entries, FIRST_SEQ, GENESIS_HASH)
    assert (report.broken_seq, report.problem) == (3, ChainProblem.WRONG_ENTRY_HASH)


@given(n=st.integers(2, 12), data=st.data())
def test_removing_an_entry_is_a_gap(n: int, data: st.DataObject) -> None:
    entries = _chain(n)
    index = data.draw(st.integers(0, n - 2))
    removed = entries.pop(index)
    report = verify_chain(entries, FIRST_SEQ, GENESIS_HASH)
    assert (report.ok, report.problem, report.broken_seq) == (False, ChainProblem.GAP, removed.seq)
    assert report.head_seq == removed.seq - 1


def test_duplicate_entry_is_reported() -> None:
    entries = _chain(4)
    entries.insert(3, entries[2])
    report = verify_chain(entries, FIRST_SEQ, GENESIS_HASH)
    assert (report.problem, report.broken_seq, report.verified) == (
        ChainProblem.DUPLICATE_SEQ,
        4,
        3,
    )


def test_swapped_entries_are_reported() -> None:
    entries = _chain(5)
    entries[1], entries[2] = entries[2], entries[1]
    report = verify_chain(entries, FIRST_SEQ, GENESIS_HASH)
    assert (report.problem, report.broken_seq) == (ChainProblem.GAP, 2)


def test_new_owner_with_higher_epoch_continues_the_chain() -> None:
    entries = _chain(3, epoch=3)
    successor = ChainBuilder(7, 4, entries[-1].seq + 1, entries[-1].entry_hash)
    entries.append(successor.append("payment.state", "inst-1/p9", b"x"))
    assert verify_chain(entries, FIRST_SEQ, GENESIS_HASH).ok


def test_lower_epoch_is_reported() -> None:
    entries = _chain(3, epoch=3)
    stale = ChainBuilder(7, 2, entries[-1].seq + 1, entries[-1].entry_hash)
    entries.append(stale.append("payment.state", "inst-1/p9", b"x"))
    report = verify_chain(entries, FIRST_SEQ, GENESIS_HASH)
    assert (report.problem, report.broken_seq) == (ChainProblem.EPOCH_REGRESSED, 4)


def test_entry_of_another_shard_is_reported() -> None:
    entries = _chain(3, shard=7)
    intruder = ChainBuilder(8, 3, entries[-1].seq + 1, entries[-1].entry_hash)
    entries.append(intruder.append("payment.state", "inst-1/p9", b"x"))
    report = verify_chain(entries, FIRST_SEQ, GENESIS_HASH)
    assert (report.problem, report.broken_seq) == (ChainProblem.SHARD_MISMATCH, 4)
    expected_shard = verify_chain(_chain(2, shard=7), FIRST_SEQ, GENESIS_HASH, shard=8)
    assert (expected_shard.problem, expected_shard.broken_seq) == (ChainProblem.SHARD_MISMATCH, 1)


@pytest.mark.parametrize(
    "changes",
    [
        {"prev_hash": b"\x00" * 31},
        {"epoch": -1},
        {"shard": 2**64},
        {"kind": "bad \ud800"},
        {"payment_key": "\udfff"},
        {"entry_hash": b""},
    ],
)
def test_corrupt_entries_are_reported_not_raised(changes: dict[str, Any]) -> None:
    entries = _chain(3)
    entries[1] = dataclasses.replace(entries[1], **changes)
    report = verify_chain(entries, FIRST_SEQ, GENESIS_HASH)
    assert (report.ok, report.broken_seq) == (False, 2)


def test_entry_hash_covers_every_argument() -> None:
    base = {
        "shard": 1,
        "epoch": 2,
        "seq": 3,
        "kind": "k",
        "payment_key": "p",
        "body": b"b",
        "prev_hash": GENESIS_HASH,
    }
    changed = {
        "shard": 2,
        "epoch": 3,
        "seq": 4,
        "kind": "kk",
        "payment_key": "pp",
        "body": b"bb",
        "prev_hash": b"\x01" * 32,
    }
    digest = entry_hash(**base)  # type: ignore[arg-type]
    for name, value in changed.items():
        assert entry_hash(**{**base, name: value}) != digest, name  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("next_seq", "head"),
    [(0, GENESIS_HASH), (FIRST_SEQ, b"\x01" * 32), (5, b"\x01" * 31), (-3, GENESIS_HASH)],
)
def test_builder_refuses_impossible_heads(next_seq: int, head: bytes) -> None:
    with pytest.raises(InvariantViolation):
        ChainBuilder(0, 0, next_seq, head)


def test_builder_refuses_empty_kind() -> None:
    with pytest.raises(InvariantViolation):
        ChainBuilder(0, 0, FIRST_SEQ, GENESIS_HASH).append("", "k", b"")
