"""One node's ownership decisions, as a pure function of what it currently sees.

:func:`decide` takes the node's view (live members, current claims, its own clock) and
returns what to do now: claim a shard whose key is absent and that placement gives to
this node, or release a shard it holds that placement now gives to another member. It
never claims a key that exists (etcd's transaction refuses it as well), so a shard's
owner can only change after the owner released it or its lease expired.

Hysteresis: a node releases shards only once the newest member has been seen
continuously for ``release_grace_s``. A join moves shards to the joiner and, because
loads are bounded, a few between the others too; a member that flaps (restarts, or lets
its lease lapse and takes a new one) gets a new ``since`` each time, so none of those
moves happen until it stays. It still claims shards nobody holds (once it has settled,
below), which takes nothing from anyone, and a departure frees the leaver's shards at
once (their keys are gone).
Releases and claims are capped per step so a membership change moves shards in waves,
never all at once.

Join settling: claiming a shard nobody holds is not free when the ledger is long (the
claimant reads and replays the shard's whole chain before it serves), so a node that
has just joined claims nothing until the membership has stayed unchanged for
``join_settle_s``, or it has been a member for ``join_settle_max_s``. On a cold start
the nodes come up seconds apart; without this the first one claims every shard, starts
128 takeovers, and hands most of them over moments later (each then read twice). A node
that has been a member for longer claims at once: a departure's shards are never held
back by it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from clearinghouse._invariant import invariant
from clearinghouse.ownership import placement
from clearinghouse.ownership.placement import NodeInfo
from clearinghouse.switch.records import SHARD_COUNT

# Shards claimed per step: one etcd transaction (etcd's default max-txn-ops is 128).
CLAIM_BATCH_MAX = 32
# Shards released per step: each is unowned until its new owner claims it, so handoffs
# go in small waves.
RELEASE_BATCH_MAX = 8
# How long the newest member must have been seen before shards move to it (and between
# the others because of it). Two lease TTLs of 5 s: a crashed member stays visible for
# one TTL, so a member that comes up and dies at once never looks settled.
# (``node.protocol_for_ttl`` scales it for other TTLs.)
RELEASE_GRACE_S = 10.0
# How long the membership must stay unchanged before a newly joined node claims shards
# nobody holds, and how long at most a new node waits for that (one and three TTLs).
JOIN_SETTLE_S = 5.0
JOIN_SETTLE_MAX_S = 15.0


@dataclass(frozen=True, slots=True)
class ShardClaim:
    """A shard's key as seen in etcd: who holds it, since which revision, under which lease.

    ``epoch`` is the key's create_revision: a new claim always gets a higher one, so it is
    the fencing token that only grows.
    """

    owner: str
    epoch: int
    lease: int = 0


@dataclass(frozen=True, slots=True)
class Member:
    """A live node and the local time (monotonic seconds) since which it has been seen."""

    info: NodeInfo
    since: float


@dataclass(frozen=True, slots=True)
class Claim:
    """Create the shard's key under my lease (only if it is absent)."""

    shard: int


@dataclass(frozen=True, slots=True)
class Release:
    """Stop serving the shard, then delete its key if it is still my claim."""

    shard: int


Action = Claim | Release


@dataclass(frozen=True, slots=True)
class ProtocolConfig:
    shard_count: int = SHARD_COUNT
    release_grace_s: float = RELEASE_GRACE_S
    claim_batch_max: int = CLAIM_BATCH_MAX
    release_batch_max: int = RELEASE_BATCH_MAX
    join_settle_s: float = JOIN_SETTLE_S
    join_settle_max_s: float = JOIN_SETTLE_MAX_S


DEFAULT_CONFIG = ProtocolConfig()


def decide(
    me: str,
    live: Sequence[Member],
    claims: Mapping[int, ShardClaim],
    now: float,
    config: ProtocolConfig = DEFAULT_CONFIG,
) -> list[Action]:
    """What ``me`` should do now; releases first (they free shards for others), then claims.

    ``live`` must hold the current members including ``me``; a node that does not see
    itself registered (its lease is gone) does nothing.
    """
    by_id = {m.info.node_id: m for m in live}
    invariant(len(by_id) == len(live), "members must be unique")
    if me not in by_id:
        return []
    target = placement.assign(config.shard_count, [m.info for m in live])
    newest_s = now - max(m.since for m in live)
    settled = newest_s >= config.release_grace_s
    joining = now - by_id[me].since < config.join_settle_max_s
    may_claim = not joining or newest_s >= config.join_settle_s
    releases: list[Action] = []
    claims_out: list[Action] = []
    for shard in range(config.shard_count):
        want = target[shard]
        held = claims.get(shard)
        if held is None:
            if want == me and may_claim and len(claims_out) < config.claim_batch_max:
                claims_out.append(Claim(shard))
        elif (
            settled and held.owner == me and want != me and len(releases) < config.release_batch_max
        ):
            releases.append(Release(shard))
    return releases + claims_out
