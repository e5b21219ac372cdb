"""Merkle tree hashing of a settlement window, as RFC 6962 (Certificate Transparency) defines it.

With ``H`` = SHA-256 and ``||`` concatenation, for a list of leaves ``D[0:n]``::

    MTH({})       = H(b"")                                  the empty tree
    MTH({d0})     = H(0x00 || d0)                           a leaf
    MTH(D[0:n])   = H(0x01 || MTH(D[0:k]) || MTH(D[k:n]))   n > 1, k = the largest
                                                            power of two below n

An inclusion proof (RFC 6962 section 2.1.1, ``PATH``) lists the sibling hashes from the
leaf up to the root; :func:`verify_inclusion` is the algorithm of RFC 9162 section
2.1.3.2, so any independent implementation of those RFCs checks our proofs.

The leaves of a settlement window are the 32-byte ``entry_hash`` values of all of its
ledger entries, every shard's cut included, in (shard, seq) order (:func:`window_leaves`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from itertools import pairwise
from typing import Final

from clearinghouse._invariant import invariant
from clearinghouse.domain.chain import LedgerEntry

LEAF_PREFIX: Final = b"\x00"
NODE_PREFIX: Final = b"\x01"
HASH_LEN_BYTES: Final = 32
EMPTY_ROOT: Final = hashlib.sha256(b"").digest()


def leaf_hash(leaf: bytes) -> bytes:
    """``H(0x00 || leaf)``."""
    return hashlib.sha256(LEAF_PREFIX + leaf).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """``H(0x01 || left || right)``."""
    return hashlib.sha256(NODE_PREFIX + left + right).digest()


class MerkleTree:
    """Every level of the tree over ``leaves``, built once in O(n) hashes.

    Built bottom-up: each level pairs neighbours, and a last node without a partner is
    carried up unchanged. That is the same tree as RFC 6962's recursive split at the
    largest power of two, so :attr:`root` is ``MTH`` and :meth:`proof` is ``PATH``, each
    proof in O(log n) once the tree is built (all proofs of a 10^5-leaf window in well
    under a second).
    """

    def __init__(self, leaves: Iterable[bytes]) -> None:
        level = [leaf_hash(leaf) for leaf in leaves]
        self.size = len(level)
        self._levels: list[list[bytes]] = [level]
        while len(level) > 1:
            paired = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
            if len(level) % 2 == 1:
                paired.append(level[-1])
            level = paired
            self._levels.append(level)

    @property
    def root(self) -> bytes:
        """``MTH`` of the leaves; ``H(b"")`` for no leaves."""
        return self._levels[-1][0] if self.size else EMPTY_ROOT

    def proof(self, index: int) -> list[bytes]:
        """``PATH(index, D[0:n])``: sibling hashes from the leaf's level to the root's."""
        invariant(0 <= index < self.size, f"leaf index {index} outside a tree of {self.size}")
        path: list[bytes] = []
        for level in self._levels[:-1]:
            sibling = index ^ 1
            if sibling < len(level):
                path.append(level[sibling])
            index >>= 1
        return path


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    """The RFC 6962 Merkle tree hash of ``leaves`` (32 bytes)."""
    return MerkleTree(leaves).root


def inclusion_proof(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """The RFC 6962 audit path of ``leaves[index]``; build a :class:`MerkleTree` instead
    when proving many leaves of the same tree."""
    return MerkleTree(leaves).proof(index)


def verify_inclusion(
    leaf: bytes, index: int, tree_size: int, proof: Sequence[bytes], root: bytes
) -> bool:
    """Whether ``proof`` shows ``leaf`` (the raw leaf, not its hash) at ``index`` of a tree
    of ``tree_size`` leaves with ``root`` (RFC 9162 section 2.1.3.2). Never raises."""
    if not 0 <= index < tree_size or any(len(p) != HASH_LEN_BYTES for p in proof):
        return False
    fn, sn = index, tree_size - 1
    r = leaf_hash(leaf)
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while not (fn & 1 or fn == 0):
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def window_leaves(entries: Iterable[LedgerEntry]) -> list[bytes]:
    """The leaves of a window's tree: each entry's ``entry_hash``, in (shard, seq) order."""
    ordered = sorted(entries, key=lambda e: (e.shard, e.seq))
    for a, b in pairwise(ordered):
        invariant((a.shard, a.seq) != (b.shard, b.seq), f"entry {a.shard}/{a.seq} appears twice")
    return [e.entry_hash for e in ordered]


__all__ = [
    "EMPTY_ROOT",
    "MerkleTree",
    "inclusion_proof",
    "leaf_hash",
    "merkle_root",
    "node_hash",
    "verify_inclusion",
    "window_leaves",
]
