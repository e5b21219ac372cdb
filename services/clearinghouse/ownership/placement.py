"""Which node should own each shard: a pure function of the set of live nodes.

Every node computes the same answer from the same membership, without talking to the
others, so the placement itself needs no coordination; etcd only arbitrates the moments
when two nodes' views of the membership differ.

The method is rendezvous (highest-random-weight) hashing with bounded loads. Each
(shard, node) pair gets a score from sha256; the pairs are visited from the highest score
down, and a shard goes to the first node of its pairs that still has room. Room is
exact: with ``n`` nodes, ``shard_count % n`` nodes get ``ceil(shard_count / n)`` shards and
the rest ``floor``, and no city takes more of those extra shards than its share of nodes
allows, so a city with ``k`` of the ``n`` nodes holds at most
``ceil(shard_count * k / n)`` shards.

Stability: a shard changes owner when a node joins or leaves only if it belonged to that
node, or if the capacity of its preferred nodes moved. Capacity is exact, so some shards
cascade; the number that move is at most ``ceil(shard_count / n) + MOVED_SLACK`` where
``n`` is the larger of the two memberships. That is measured, not proved: over 6,000
random joins to memberships of 1 to 8 nodes in 3 cities, the excess over
``ceil(shard_count / n)`` was 14 at worst, 9 at the 99th percentile and 3 on average
(``tests/unit/test_ownership_placement.py`` checks the bound with hypothesis).
"""

from __future__ import annotations

import functools
import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from clearinghouse._invariant import invariant

# Shards that may change owner on one join or leave, beyond the joiner's or leaver's own
# share: one eighth of the shards (16 of 128), above the worst case measured (14).
MOVED_SLACK_FRACTION = 1 / 8


@dataclass(frozen=True, slots=True, order=True)
class NodeInfo:
    """A switch node as placement sees it: an identity and where it runs."""

    node_id: str
    zone: str
    city: str


def moved_bound(shard_count: int, nodes_before: int, nodes_after: int) -> int:
    """The most shards that may change owner when membership goes from one size to the other."""
    bigger = max(nodes_before, nodes_after)
    invariant(bigger > 0, "a membership change needs a node on one side")
    return -(-shard_count // bigger) + int(shard_count * MOVED_SLACK_FRACTION)


def assign(shard_count: int, nodes: Sequence[NodeInfo]) -> dict[int, str]:
    """The owner (node id) of every shard in ``range(shard_count)``; ``{}`` without nodes.

    The order of ``nodes`` does not matter; node ids must be unique.
    """
    invariant(shard_count > 0, f"shard_count must be positive, not {shard_count}")
    if not nodes:
        return {}
    key = tuple(sorted(nodes))
    invariant(len({n.node_id for n in key}) == len(key), "node ids must be unique in a membership")
    return dict(_assign(shard_count, key))


@functools.lru_cache(maxsize=64)
def _assign(shard_count: int, nodes: tuple[NodeInfo, ...]) -> tuple[tuple[int, str], ...]:
    # Cached because every node recomputes placement on every protocol step, and
    # memberships change rarely. The result is a tuple so the cache cannot be mutated.
    room = _Room(shard_count, nodes)
    owner: dict[int, str] = {}
    for _score, shard, node in _pairs_by_score(shard_count, nodes):
        if shard not in owner and room.take(node):
            owner[shard] = node.node_id
    invariant(len(owner) == shard_count, "bounded loads must place every shard")
    return tuple(sorted(owner.items()))


def score(shard: int, node_id: str) -> int:
    """The pair's rendezvous weight: stable across processes and Python versions."""
    digest = hashlib.sha256(f"{shard}/{node_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _pairs_by_score(
    shard_count: int, nodes: tuple[NodeInfo, ...]
) -> list[tuple[int, int, NodeInfo]]:
    pairs = [(score(s, n.node_id), s, n) for s in range(shard_count) for n in nodes]
    # Highest score first; ties (a sha256 collision on 64 bits) broken by shard, node.
    pairs.sort(key=lambda p: (-p[0], p[1], p[2].node_id))
    return pairs


class _Room:
    """Exact per-node capacity, with the extra shards (the remainder) capped per city."""

    def __init__(self, shard_count: int, nodes: tuple[NodeInfo, ...]) -> None:
        n = len(nodes)
        self._floor, self._extra_left = divmod(shard_count, n)
        per_city = Counter(node.city for node in nodes)
        # A city of k nodes may take ceil(k * r / n) of the r extra shards, which is what
        # keeps it within ceil(shard_count * k / n). The caps sum to r or more, and a
        # city below its cap always has a node at floor, so every shard finds room.
        self._city_extra_max = {c: -(-k * self._extra_left // n) for c, k in per_city.items()}
        self._city_extra: Counter[str] = Counter()
        self._load: Counter[str] = Counter()

    def take(self, node: NodeInfo) -> bool:
        load = self._load[node.node_id]
        if load < self._floor:
            self._load[node.node_id] = load + 1
            return True
        extra_ok = (
            load == self._floor
            and self._extra_left > 0
            and self._city_extra[node.city] < self._city_extra_max[node.city]
        )
        if not extra_ok:
            return False
        self._extra_left -= 1
        self._city_extra[node.city] += 1
        self._load[node.node_id] = load + 1
        return True
