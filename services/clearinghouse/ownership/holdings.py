"""What one node believes it owns, and until when it may believe it. Pure, no I/O.

Two rules keep a node's belief inside etcd's truth:

* :class:`LeaseClock` - the lease is trusted until the *send* time of the last
  acknowledged keepalive (or grant) plus the TTL, minus a safety margin, all on the
  node's monotonic clock. etcd restarts the TTL when it *receives* the request, which is
  later, so etcd cannot expire the lease before this local deadline (a new etcd leader
  only extends leases). Past the deadline the node owns nothing, whatever it last heard.
* :class:`Holdings` - a shard is held at one epoch (the key's create_revision) under the
  current lease. It is held only after this node's own claim succeeded, or when its
  view shows a key it created under the current lease (a claim whose answer was lost).
  Giving a shard up records its epoch as a floor: the node never takes back that key or
  an older one, so the epochs it reports for a shard only grow. A key of this node that
  it no longer holds (an older lease, or an epoch at or below the floor) is a zombie,
  to be deleted so the shard can be claimed afresh.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from clearinghouse._invariant import invariant
from clearinghouse.ownership.protocol import ShardClaim


@dataclass(slots=True)
class LeaseClock:
    """The local deadline of the current lease, in monotonic seconds."""

    ttl_s: float
    margin_s: float
    deadline: float = -math.inf

    def __post_init__(self) -> None:
        invariant(0 <= self.margin_s < self.ttl_s, "the safety margin must be below the TTL")

    def on_ack(self, sent_at: float, granted_ttl_s: float) -> None:
        """A grant or keepalive sent at ``sent_at`` was answered with a live TTL."""
        invariant(granted_ttl_s > 0, "an expired lease is not an acknowledgement")
        # The smaller TTL is the safe one if etcd ever answers with more than asked.
        ttl = min(granted_ttl_s, self.ttl_s)
        self.deadline = max(self.deadline, sent_at + ttl - self.margin_s)

    def valid(self, now: float) -> bool:
        return now < self.deadline

    def expire(self) -> None:
        self.deadline = -math.inf


@dataclass(frozen=True, slots=True)
class Change:
    gained: list[tuple[int, int]] = field(default_factory=list)
    lost: list[int] = field(default_factory=list)


class Holdings:
    """Shards this node holds under its current lease, at their epochs."""

    def __init__(self, me: str) -> None:
        self.me = me
        self.lease = 0
        self._held: dict[int, int] = {}
        self._floor: dict[int, int] = {}

    def held(self) -> dict[int, int]:
        return dict(self._held)

    def epoch(self, shard: int) -> int | None:
        return self._held.get(shard)

    def start_lease(self, lease: int) -> None:
        invariant(lease != 0, "lease 0 means no lease")
        invariant(not self._held, "a new lease starts with nothing held")
        self.lease = lease

    def gain(self, shard: int, epoch: int) -> bool:
        """My claim of ``shard`` created its key at ``epoch``; False if already known."""
        if shard in self._held or epoch <= self._floor.get(shard, 0):
            return False
        invariant(self.lease != 0, "a shard is held only under a lease")
        self._held[shard] = epoch
        return True

    def give_up(self, shard: int) -> int | None:
        """Stop holding ``shard`` (before its key is deleted); its epoch, if it was held."""
        epoch = self._held.pop(shard, None)
        if epoch is not None:
            self._floor[shard] = max(self._floor.get(shard, 0), epoch)
        return epoch

    def lose_all(self) -> list[int]:
        """The lease is gone (or cannot be trusted): nothing is held any more."""
        lost = sorted(self._held)
        for shard in lost:
            self.give_up(shard)
        self.lease = 0
        return lost

    def reconcile(self, claims: Mapping[int, ShardClaim], view_revision: int) -> Change:
        """Align with a view of etcd that is complete up to ``view_revision``."""
        lost = [
            s
            for s, e in sorted(self._held.items())
            # A key created after the view's revision is simply not in the view yet.
            if e <= view_revision and claims.get(s) != ShardClaim(self.me, e, self.lease)
        ]
        for s in lost:
            self.give_up(s)
        gained = [
            (s, c.epoch)
            for s, c in sorted(claims.items())
            if c.owner == self.me and self._adoptable(s, c) and self.gain(s, c.epoch)
        ]
        return Change(gained, lost)

    def zombies(self, claims: Mapping[int, ShardClaim]) -> list[tuple[int, int]]:
        """Keys of mine in ``claims`` that I do not hold and will never hold: delete them."""
        return [
            (s, c.epoch)
            for s, c in sorted(claims.items())
            if c.owner == self.me
            and s not in self._held
            and (c.lease != self.lease or c.epoch <= self._floor.get(s, 0))
        ]

    def overlay(self, claims: Mapping[int, ShardClaim]) -> dict[int, ShardClaim]:
        """``claims`` with what I hold on top: my own claims are known before the view."""
        out = dict(claims)
        for s, e in self._held.items():
            out[s] = ShardClaim(self.me, e, self.lease)
        return out

    def _adoptable(self, shard: int, c: ShardClaim) -> bool:
        return self.lease != 0 and c.lease == self.lease and c.epoch > self._floor.get(shard, 0)
