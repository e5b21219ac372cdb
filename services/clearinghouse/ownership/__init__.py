"""Shard ownership: every ledger shard has one owner among the live switch nodes.

**The protocol.** Each node takes an etcd lease, registers ``/clearing/nodes/<node_id>``
under it and keeps it alive on one long-lived keepalive stream. Every node watches the
``/clearing/`` prefix and computes the same placement from the live members
(:func:`placement.assign`: rendezvous hashing with bounded loads, even per node and per
city). A node claims a shard that placement gives it only when the shard's key is
absent, with a transaction ``create_revision(/clearing/shards/<s>) == 0 -> put(node_id,
lease)``; it releases a shard that placement now gives to a member seen for at least a
grace period by dropping it locally first and then deleting the key if it is still its
own. When a node dies, its lease expires, etcd deletes its keys, and the nodes that
placement now names claim them: a shard is owned again within the TTL plus a few loop
steps. Leases are not locks, so a node also keeps a local deadline (the send time of
its last acknowledged keepalive + TTL - a margin, on its monotonic clock): past it, the
node considers every shard lost, even if etcd has not expired the lease yet.

**The epoch.** The epoch of an ownership is the create_revision of its shard key: a new
claim of a shard always gets a higher one, so it is a token that only grows. Within the
owner, :meth:`etcd_backend.OwnershipAgent.epoch_if_owner` returns it only while the
local deadline is ahead.

**The fencing contract for storage.** The local deadline narrows the window in which a
paused or partitioned former owner still believes it owns a shard, but cannot close it:
a process can stop between checking ownership and writing, for longer than the TTL. So:

1. every ledger write of a shard carries the epoch under which its writer owns the
   shard, obtained from ``epoch_if_owner`` just before the write (never cached);
2. the store keeps, per shard, the highest epoch it has accepted, and refuses a write
   whose epoch is lower, atomically with the write (a conditional update on the shard's
   fence row, or the same check inside the store's own serialization point);
3. a new owner raises the fence to its epoch before its first write, so a former owner
   that wakes up is refused even if it writes before the new owner writes anything else.

Nothing here is correct without rule 2: etcd only decides who *should* write; the
store decides whose write counts.

Modules: :mod:`.placement` (pure), :mod:`.protocol` (pure decisions), :mod:`.holdings`
and :mod:`.view` (pure state), :mod:`.node` (the node without I/O), :mod:`.etcd_backend`
(the agent on pyetcd, imported on its own because it loads gRPC), :mod:`.simulator`
(the deterministic simulation the tests drive).
"""

from clearinghouse.ownership.placement import NodeInfo, assign, moved_bound
from clearinghouse.ownership.protocol import (
    Claim,
    Member,
    ProtocolConfig,
    Release,
    ShardClaim,
    decide,
)

__all__ = [
    "Claim",
    "Member",
    "NodeInfo",
    "ProtocolConfig",
    "Release",
    "ShardClaim",
    "assign",
    "decide",
    "moved_bound",
]
