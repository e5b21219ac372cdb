"""RFC 6962 Merkle trees over a window's entries: roots, audit paths, their verification."""

from __future__ import annotations

import hashlib
import random
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clearinghouse._invariant import InvariantViolation
from clearinghouse.domain.chain import FIRST_SEQ, GENESIS_HASH, ChainBuilder, LedgerEntry
from clearinghouse.domain.merkle import (
    EMPTY_ROOT,
    MerkleTree,
    inclusion_proof,
    merkle_root,
    verify_inclusion,
    window_leaves,
)

pytestmark = pytest.mark.unit


def _h(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _reference_root(leaves: list[bytes]) -> bytes:
    # RFC 6962 section 2.1, written out recursively as the RFC states it.
    n = len(leaves)
    if n == 0:
        return _h(b"")
    if n == 1:
        return _h(b"\x00" + leaves[0])
    k = 1 << ((n - 1).bit_length() - 1)
    return _h(b"\x01" + _reference_root(leaves[:k]) + _reference_root(leaves[k:]))


def _reference_path(m: int, leaves: list[bytes]) -> list[bytes]:
    # RFC 6962 section 2.1.1 PATH(m, D[n]).
    n = len(leaves)
    if n == 1:
        return []
    k = 1 << ((n - 1).bit_length() - 1)
    if m < k:
        return [*_reference_path(m, leaves[:k]), _reference_root(leaves[k:])]
    return [*_reference_path(m - k, leaves[k:]), _reference_root(leaves[:k])]


# The Certificate Transparency test vectors (certificate-transparency/merkle_tree_test).
CT_LEAVES = [
    bytes.fromhex(h)
    for h in ("", "00", "10", "2021", "3031", "40414243", "5051525354555657",
              "606162636465666768696a6b6c6d6e6f")
]  # fmt: skip
CT_ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
CT_PATHS = {
    (0, 8): [
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ],
    (5, 8): [
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    ],
    (2, 3): ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"],
    (1, 5): [
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
    ],
}


def test_empty_tree_root_is_the_hash_of_nothing() -> None:
    assert merkle_root([]) == EMPTY_ROOT == _h(b"")
    assert EMPTY_ROOT.hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    with pytest.raises(InvariantViolation):
        inclusion_proof([], 0)


def test_three_leaf_tree_computed_by_hand() -> None:
    a, b, c = (_h(b"\x00" + x) for x in (b"a", b"b", b"c"))
    ab = _h(b"\x01" + a + b)
    root = _h(b"\x01" + ab + c)
    leaves = [b"a", b"b", b"c"]
    assert merkle_root(leaves) == root
    assert root.hex() == "36642e73c2540ab121e3a6bf9545b0a24982cd830eb13d3cd19de3ce6c021ec1"
    assert inclusion_proof(leaves, 0) == [b, c]
    assert inclusion_proof(leaves, 1) == [a, c]
    assert inclusion_proof(leaves, 2) == [ab]  # c has no sibling below the root's level
    for i, leaf in enumerate(leaves):
        assert verify_inclusion(leaf, i, 3, inclusion_proof(leaves, i), root)


@pytest.mark.parametrize("size", range(1, 9))
def test_certificate_transparency_roots(size: int) -> None:
    assert merkle_root(CT_LEAVES[:size]).hex() == CT_ROOTS[size - 1]


@pytest.mark.parametrize(("index", "size"), sorted(CT_PATHS))
def test_certificate_transparency_paths(index: int, size: int) -> None:
    proof = inclusion_proof(CT_LEAVES[:size], index)
    assert [p.hex() for p in proof] == CT_PATHS[(index, size)]
    root = bytes.fromhex(CT_ROOTS[size - 1])
    assert verify_inclusion(CT_LEAVES[index], index, size, proof, root)


trees = st.lists(st.binary(max_size=40), min_size=1, max_size=70)


@given(trees)
@settings(max_examples=120, deadline=None)
def test_every_index_round_trips_and_matches_the_rfc(leaves: list[bytes]) -> None:
    tree = MerkleTree(leaves)
    root = merkle_root(leaves)
    assert root == tree.root == _reference_root(leaves)
    for index, leaf in enumerate(leaves):
        proof = tree.proof(index)
        assert proof == inclusion_proof(leaves, index) == _reference_path(index, leaves)
        assert verify_inclusion(leaf, index, len(leaves), proof, root)


@given(trees, st.data())
@settings(max_examples=120, deadline=None)
def test_tampering_is_refused(leaves: list[bytes], data: st.DataObject) -> None:
    n = len(leaves)
    index = data.draw(st.integers(0, n - 1))
    leaf, root = leaves[index], merkle_root(leaves)
    proof = inclusion_proof(leaves, index)
    # Another leaf at that index.
    assert not verify_inclusion(leaf + b"x", index, n, proof, root)
    # Another index for the same leaf (unless that leaf is repeated with the same path).
    other = data.draw(st.integers(0, n - 1).filter(lambda i: i != index)) if n > 1 else None
    if other is not None and (leaves[other], inclusion_proof(leaves, other)) != (leaf, proof):
        assert not verify_inclusion(leaf, other, n, proof, root)
    assert not verify_inclusion(leaf, n, n, proof, root)
    assert not verify_inclusion(leaf, -1, n, proof, root)
    # One flipped bit anywhere in the proof.
    if proof:
        k = data.draw(st.integers(0, len(proof) - 1))
        bit = data.draw(st.integers(0, 255))
        flipped = bytearray(proof[k])
        flipped[bit // 8] ^= 1 << (bit % 8)
        tampered = [*proof[:k], bytes(flipped), *proof[k + 1 :]]
        assert not verify_inclusion(leaf, index, n, tampered, root)
        assert not verify_inclusion(leaf, index, n, proof[:-1], root)
    assert not verify_inclusion(leaf, index, n, [*proof, root], root)
    assert not verify_inclusion(leaf, index, n, proof, _h(root))
    # A proof is bound to the tree size.
    bigger = [*leaves, b"more"]
    assert not verify_inclusion(leaf, index, n + 1, proof, merkle_root(bigger))


def test_malformed_proof_elements_are_refused_not_raised() -> None:
    leaves = [b"a", b"b", b"c", b"d"]
    proof = inclusion_proof(leaves, 1)
    root = merkle_root(leaves)
    assert not verify_inclusion(b"b", 1, 4, [proof[0][:31], proof[1]], root)
    assert not verify_inclusion(b"b", 1, 0, proof, root)


def test_window_leaves_are_entry_hashes_in_shard_then_seq_order() -> None:
    chains: list[list[LedgerEntry]] = []
    for shard in (2, 0, 1):
        b = ChainBuilder(shard, 1, FIRST_SEQ, GENESIS_HASH)
        chains.append([b.append("INTENT", f"k{shard}/{i}", b"x%d" % i) for i in range(3)])
    entries = [e for chain in chains for e in chain]
    random.Random(7).shuffle(entries)
    ordered = sorted(entries, key=lambda e: (e.shard, e.seq))
    assert window_leaves(entries) == [e.entry_hash for e in ordered]
    with pytest.raises(InvariantViolation, match="twice"):
        window_leaves([*entries, entries[0]])


def test_large_window_proofs_are_cheap() -> None:
    leaves = [_h(i.to_bytes(4, "big")) for i in range(100_000)]
    started_s = time.perf_counter()
    tree = MerkleTree(leaves)
    for index in range(0, 100_000, 997):
        assert verify_inclusion(leaves[index], index, tree.size, tree.proof(index), tree.root)
    elapsed_s = time.perf_counter() - started_s
    assert elapsed_s < 10  # O(n) to build, O(log n) a proof: well under a second here
