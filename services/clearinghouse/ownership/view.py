"""A node's local copy of the ownership keys in etcd, kept by a watch. Pure, no I/O.

Layout under the prefix (``/clearing/`` by default):

* ``nodes/<node_id>`` - a live switch node, JSON ``{"zone", "city", "address"}``, under
  the node's lease: it disappears when the node closes or its lease expires.
* ``shards/<shard>`` - the shard's owner (a node id), under the owner's lease. Its
  create_revision is the ownership epoch.

The view is complete up to :attr:`View.revision`: a full listing at one revision, then
the watch's events in order. Keys it does not understand are ignored, not trusted.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from clearinghouse.ownership.placement import NodeInfo
from clearinghouse.ownership.protocol import Member, ShardClaim

KEY_PREFIX = "/clearing/"
NODES_DIR = "nodes/"
SHARDS_DIR = "shards/"

_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """One key as etcd returns it (from a range or a watch event)."""

    key: str
    value: bytes
    create_revision: int
    lease: int


@dataclass(frozen=True, slots=True)
class _MemberEntry:
    member: Member
    address: str
    lease: int


def node_key(prefix: str, node_id: str) -> str:
    return f"{prefix}{NODES_DIR}{node_id}"


def shard_key(prefix: str, shard: int) -> str:
    return f"{prefix}{SHARDS_DIR}{shard}"


def encode_member(info: NodeInfo, address: str) -> bytes:
    return json.dumps({"zone": info.zone, "city": info.city, "address": address}).encode()


class View:
    """Members and shard claims as of :attr:`revision`; ``synced`` once listed."""

    def __init__(self, prefix: str = KEY_PREFIX) -> None:
        self.prefix = prefix
        self.synced = False
        self.revision = 0
        self.claims: dict[int, ShardClaim] = {}
        self._members: dict[str, _MemberEntry] = {}

    def load(self, revision: int, records: Iterable[KeyRecord], now: float) -> None:
        """Replace the view with a full listing taken at ``revision``."""
        before = self._members
        self.claims, self._members = {}, {}
        for r in records:
            self._put(r, now)
        for node_id, entry in self._members.items():
            old = before.get(node_id)
            # The same registration keeps the time it was first seen, so a resync does not
            # restart the release grace.
            if old is not None and old.lease == entry.lease:
                self._members[node_id] = old
        self.revision = revision
        self.synced = True

    def apply(self, revision: int, key: str, record: KeyRecord | None, now: float) -> None:
        """One watch event: ``record`` is the key after a put, ``None`` after a delete."""
        if revision < self.revision:
            return  # already in the listing this watch started from
        if record is None:
            self._delete(key)
        else:
            self._put(record, now)
        self.revision = revision

    def unsync(self) -> None:
        """The watch broke: the view may miss events until the next :meth:`load`."""
        self.synced = False

    def members(self) -> list[Member]:
        return [e.member for _, e in sorted(self._members.items())]

    def address(self, node_id: str) -> str | None:
        entry = self._members.get(node_id)
        return entry.address if entry else None

    def zone(self, node_id: str) -> str | None:
        """The zone the node registered (its certificate is ``node:<zone>``)."""
        entry = self._members.get(node_id)
        return entry.member.info.zone if entry else None

    def _put(self, r: KeyRecord, now: float) -> None:
        rest = r.key.removeprefix(self.prefix)
        if rest.startswith(NODES_DIR):
            self._put_member(rest.removeprefix(NODES_DIR), r, now)
        elif rest.startswith(SHARDS_DIR):
            shard = _shard_number(rest.removeprefix(SHARDS_DIR))
            if shard is not None:
                owner = r.value.decode(errors="replace")
                self.claims[shard] = ShardClaim(owner, r.create_revision, r.lease)

    def _put_member(self, node_id: str, r: KeyRecord, now: float) -> None:
        try:
            raw = json.loads(r.value)
            info = NodeInfo(node_id, str(raw["zone"]), str(raw["city"]))
            address = str(raw["address"])
        except (ValueError, KeyError, TypeError):
            _log.warning("ignoring malformed registration %s", r.key)
            return
        old = self._members.get(node_id)
        # A node is the same member for as long as it keeps its lease. A restarted process
        # overwrites its old key (same create_revision) under a new lease: a new member,
        # whose grace starts again.
        if old is not None and old.lease == r.lease:
            return
        self._members[node_id] = _MemberEntry(Member(info, now), address, r.lease)

    def _delete(self, key: str) -> None:
        rest = key.removeprefix(self.prefix)
        if rest.startswith(NODES_DIR):
            self._members.pop(rest.removeprefix(NODES_DIR), None)
        elif rest.startswith(SHARDS_DIR):
            shard = _shard_number(rest.removeprefix(SHARDS_DIR))
            if shard is not None:
                self.claims.pop(shard, None)


def _shard_number(text: str) -> int | None:
    return int(text) if text.isascii() and text.isdigit() else None
