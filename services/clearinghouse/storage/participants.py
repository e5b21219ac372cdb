"""The participant registry on Cassandra: table ``participant_versions``, one row a version.

A change never updates a row: it inserts the next version, newest first in the
partition, so the latest version is the partition's first row and the others are the
audit trail. Every insert is a lightweight transaction (``IF NOT EXISTS``, serial
consistency SERIAL): two operators changing the same version cannot both win, and the
loser learns it as ``FailedPrecondition`` with reason VERSION_CONFLICT. Admin changes
are rare, so the cost of Paxos here is nothing next to a lost update. Any other writer
of this table (seeding, tools) must be conditional too: Cassandra does not order a
plain write against Paxos writes to the same partition.

Signing keys: each version lists the participant's current keys (column
``signing_keys``); table ``participant_signing_keys`` keeps every key ever listed, for
auditors (:meth:`CassandraParticipantStore.signing_key_history`). A key's row is inserted
before the first version that lists it, so a version never names a key the history
lacks; ``revoked_at_us`` is set after a version that drops it was written (a crash in
between leaves it unset: the versions remain the authority on what was current when).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any, Final

from cassandra import ConsistencyLevel

from clearinghouse._invariant import invariant
from clearinghouse.domain import (
    FailedPrecondition,
    Participant,
    ParticipantKind,
    ParticipantStatus,
)
from clearinghouse.domain.model import SigningKey, SigningKeyRecord
from clearinghouse.storage.retry import with_retries
from clearinghouse.switch.admin import VERSION_CONFLICT

_SELECT: Final = (
    "SELECT participant_id, version, kind, name, status, bank_code, endpoint, currencies, "
    "net_debit_caps, updated_at_us, reason, payments_per_s_quota, signing_keys, "
    "status_reason FROM participant_versions"
)
# Absent text is stored as "" rather than null: binding None writes a tombstone.
_ABSENT_TEXT: Final = ""


class CassandraParticipantStore:
    """A :class:`~clearinghouse.switch.ports.ParticipantStore` on ``participant_versions``.

    Reads and the commit of each insert use ``consistency`` (QUORUM in the topology);
    the Paxos round of an insert uses SERIAL.
    """

    def __init__(self, session: Any, consistency: int = ConsistencyLevel.QUORUM) -> None:
        self.session = session
        self.cl = consistency
        p = session.prepare
        # The clustering order is version DESC, so one row per partition is the newest.
        self._select_all = p(_SELECT + " PER PARTITION LIMIT 1")
        self._select_one = p(_SELECT + " WHERE participant_id = ? LIMIT 1")
        self._select_every = p(_SELECT)  # every version: the registry's whole history
        for stmt in (self._select_all, self._select_one, self._select_every):
            stmt.consistency_level = self.cl
            stmt.is_idempotent = True
        self._insert = p(
            "INSERT INTO participant_versions (participant_id, version, kind, name, status, "
            "bank_code, endpoint, currencies, net_debit_caps, updated_at_us, reason, "
            "payments_per_s_quota, signing_keys, status_reason) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) IF NOT EXISTS"
        )
        self._insert.consistency_level = self.cl
        self._insert.serial_consistency_level = ConsistencyLevel.SERIAL
        # Reads back one version after a lost insert. SERIAL sees the outcome of any Paxos
        # round in progress, which a QUORUM read might not yet.
        self._select_version = p(_SELECT + " WHERE participant_id = ? AND version = ?")
        self._select_version.consistency_level = ConsistencyLevel.SERIAL
        self._select_version.is_idempotent = True
        # The history of signing keys: every write is conditional (see the module docstring).
        self._key_add = p(
            "INSERT INTO participant_signing_keys (participant_id, key_id, public_key, "
            "added_at_us) VALUES (?, ?, ?, ?) IF NOT EXISTS"
        )
        self._key_revoke = p(
            "UPDATE participant_signing_keys SET revoked_at_us = ? "
            "WHERE participant_id = ? AND key_id = ? IF EXISTS"
        )
        self._key_history = p(
            "SELECT participant_id, key_id, public_key, added_at_us, revoked_at_us "
            "FROM participant_signing_keys"
        )
        self._key_history.is_idempotent = True
        for stmt in (self._key_add, self._key_revoke, self._key_history):
            stmt.consistency_level = self.cl
        for stmt in (self._key_add, self._key_revoke):
            stmt.serial_consistency_level = ConsistencyLevel.SERIAL

    # -- reads -------------------------------------------------------------------------

    def all(self) -> Mapping[str, Participant]:
        """The newest version of every participant, by id."""
        rows = with_retries(
            "reading the participants", lambda: list(self.session.execute(self._select_all))
        )
        return {r.participant_id: participant_from_row(r) for r in rows}

    def cap_ceilings(self) -> dict[tuple[str, str], int]:
        """(participant, currency) -> the highest net debit cap any version of the
        participant had. A cap lowered below the exposure taken under the one before is
        not a breach: headroom already lent stays lent until its window settles."""
        rows = with_retries(
            "reading every participant version",
            lambda: list(self.session.execute(self._select_every)),
        )
        out: dict[tuple[str, str], int] = {}
        for r in rows:
            for ccy, cap in participant_from_row(r).net_debit_caps.items():
                out[(r.participant_id, ccy)] = max(cap, out.get((r.participant_id, ccy), cap))
        return out

    def get(self, participant_id: str) -> Participant | None:
        """The newest version of one participant, or None if it was never registered."""
        row = with_retries(
            "reading a participant",
            lambda: self.session.execute(self._select_one, (participant_id,)).one(),
        )
        return None if row is None else participant_from_row(row)

    def signing_key_history(self) -> list[SigningKeyRecord]:
        """Every signing key any participant ever registered, by (participant, key id)."""
        rows = with_retries(
            "reading the signing keys", lambda: list(self.session.execute(self._key_history))
        )
        out = [
            SigningKeyRecord(
                r.participant_id,
                r.key_id,
                bytes(r.public_key),
                r.added_at_us or 0,
                r.revoked_at_us or 0,
            )
            for r in rows
        ]
        return sorted(out, key=lambda k: (k.participant_id, k.key_id))

    # -- writes ------------------------------------------------------------------------

    def _execute(self, what: str, stmt: Any, values: tuple[Any, ...]) -> Any:
        return with_retries(what, lambda: self.session.execute(stmt, values))

    def _record_keys(self, participant: Participant, now_us: int) -> None:
        """Add the participant's keys to the history (before its version names them) and
        clear the revocation of any key listed again."""
        pid = participant.participant_id
        for k in participant.signing_keys:
            values = (pid, k.key_id, k.public_key, now_us)
            result = self._execute("recording a signing key", self._key_add, values)
            if not result.was_applied and getattr(result.one(), "revoked_at_us", None):
                self._execute(
                    "listing a signing key again", self._key_revoke, (None, pid, k.key_id)
                )

    def _revoke_dropped(self, before: Participant | None, after: Participant, now_us: int) -> None:
        if before is None:
            return
        kept = {k.key_id for k in after.signing_keys}
        for k in before.signing_keys:
            if k.key_id not in kept:
                values = (now_us, after.participant_id, k.key_id)
                self._execute("revoking a signing key", self._key_revoke, values)

    def put(self, participant: Participant, *, reason: str, now_us: int) -> Participant:
        """Insert ``participant.version`` as a new row; VERSION_CONFLICT if it exists.

        Returns the participant as it reads back. ``with_retries`` may repeat the insert
        after a timeout whose first attempt had in fact applied; the repeat then finds
        the row, and it is ours if it holds exactly what we wrote.
        """
        values = _row_values(participant, reason, now_us)
        self._record_keys(participant, now_us)
        before = self.get(participant.participant_id) if participant.version > 1 else None
        result = with_retries(
            "recording a participant version", lambda: self.session.execute(self._insert, values)
        )
        # What a read returns: absent text comes back as None.
        stored = replace(
            participant,
            bank_code=participant.bank_code or None,
            endpoint=participant.endpoint or None,
            updated_at_us=now_us,
        )
        if result.was_applied:
            self._revoke_dropped(before, stored, now_us)
            return stored
        pid, version = participant.participant_id, participant.version
        existing = with_retries(
            "reading back a participant version",
            lambda: self.session.execute(self._select_version, (pid, version)).one(),
        )
        invariant(existing is not None, f"{pid} v{version}: conditional insert lost to a ghost")
        if _row_values_of(existing) == values:
            self._revoke_dropped(before, stored, now_us)
            return stored
        raise FailedPrecondition(
            f"participant {pid!r} already has a version {version}: it changed since it was read",
            reason=VERSION_CONFLICT,
        )


def participant_from_row(row: Any) -> Participant:
    """A row of ``participant_versions`` as a domain Participant.

    Cassandra returns an empty collection as null, and absent text is stored as "".
    """
    return Participant(
        participant_id=row.participant_id,
        kind=ParticipantKind(row.kind),
        name=row.name,
        status=ParticipantStatus(row.status),
        bank_code=row.bank_code or None,
        endpoint=row.endpoint or None,
        currencies=frozenset(row.currencies or ()),
        net_debit_caps=dict(row.net_debit_caps or {}),
        version=row.version,
        payments_per_s_quota=row.payments_per_s_quota or 0,
        status_reason=row.status_reason or "",
        updated_at_us=row.updated_at_us or 0,
        signing_keys=tuple(
            SigningKey(kid, bytes(pk)) for kid, pk in sorted((row.signing_keys or {}).items())
        ),
    )


def _row_values(p: Participant, reason: str, now_us: int) -> tuple[Any, ...]:
    """The insert's bind values, in the insert's column order."""
    return (
        p.participant_id, p.version, p.kind.value, p.name, p.status.value,
        p.bank_code or _ABSENT_TEXT, p.endpoint or _ABSENT_TEXT,
        set(p.currencies), dict(p.net_debit_caps), now_us, reason, p.payments_per_s_quota,
        {k.key_id: k.public_key for k in p.signing_keys}, p.status_reason or _ABSENT_TEXT,
    )  # fmt: skip


def _row_values_of(row: Any) -> tuple[Any, ...]:
    """A stored row in the shape of :func:`_row_values`, to compare the two."""
    return (
        row.participant_id, row.version, row.kind, row.name, row.status,
        row.bank_code or _ABSENT_TEXT, row.endpoint or _ABSENT_TEXT,
        set(row.currencies or ()), dict(row.net_debit_caps or {}), row.updated_at_us, row.reason,
        row.payments_per_s_quota or 0,
        {kid: bytes(pk) for kid, pk in (row.signing_keys or {}).items()},
        row.status_reason or _ABSENT_TEXT,
    )  # fmt: skip


__all__ = ["CassandraParticipantStore", "SigningKeyRecord", "participant_from_row"]
