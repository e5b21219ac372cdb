"""Revoked client certificates in Cassandra (``revoked_certificates``, migration 012).

Append-only: a revocation is inserted ``IF NOT EXISTS`` (Paxos at SERIAL, committed at
the store's consistency, QUORUM: two cities), so the first revocation of a serial stands
and a repeat, or a retry after a lost answer, reads it back instead of writing again.
"""

from __future__ import annotations

from typing import Any, Final

from cassandra import ConsistencyLevel

from clearinghouse._invariant import invariant
from clearinghouse.security.revocation import RevokedCertificate, parse_serial, serial_hex
from clearinghouse.storage.retry import with_retries

# Every revocation lives in one partition (a node reads them all at once).
REVOCATION_BUCKET: Final = 0
_COLUMNS: Final = "serial, identity, reason, revoked_at_us, revoked_by"


class CassandraRevocations:
    def __init__(self, session: Any, consistency: int = ConsistencyLevel.QUORUM) -> None:
        self.session = session
        p = session.prepare
        self._select_all = p(
            f"SELECT {_COLUMNS} FROM revoked_certificates WHERE bucket = ?"  # noqa: S608
        )
        self._select_all.consistency_level = consistency
        self._select_all.is_idempotent = True
        # After a lost answer: SERIAL sees the outcome of a Paxos round in progress.
        self._select_one = p(
            f"SELECT {_COLUMNS} FROM revoked_certificates "  # noqa: S608
            "WHERE bucket = ? AND serial = ?"
        )
        self._select_one.consistency_level = ConsistencyLevel.SERIAL
        self._select_one.is_idempotent = True
        self._insert = p(
            f"INSERT INTO revoked_certificates (bucket, {_COLUMNS}) "  # noqa: S608
            "VALUES (?, ?, ?, ?, ?, ?) IF NOT EXISTS"
        )
        self._insert.consistency_level = consistency
        self._insert.serial_consistency_level = ConsistencyLevel.SERIAL

    def all(self) -> list[RevokedCertificate]:
        """Every revocation, oldest first."""
        rows = with_retries(
            "reading the revoked certificates",
            lambda: list(self.session.execute(self._select_all, (REVOCATION_BUCKET,))),
        )
        return sorted((_of_row(r) for r in rows), key=lambda r: (r.revoked_at_us, r.serial))

    def revoke(self, revocation: RevokedCertificate) -> RevokedCertificate:
        """Store ``revocation`` unless its serial is revoked already; returns what is stored
        (the earlier revocation, if there was one)."""
        key = serial_hex(revocation.serial)
        values = (
            REVOCATION_BUCKET, key, revocation.identity, revocation.reason,
            revocation.revoked_at_us, revocation.revoked_by,
        )  # fmt: skip
        # A retry after a timeout may find the row its own first attempt wrote: the read
        # below returns it, and it is ours if it holds what we wrote.
        result = with_retries(
            "revoking a certificate", lambda: self.session.execute(self._insert, values)
        )
        if result.was_applied:
            return revocation
        row = with_retries(
            "reading back a revoked certificate",
            lambda: self.session.execute(self._select_one, (REVOCATION_BUCKET, key)).one(),
        )
        invariant(row is not None, f"serial {key}: conditional insert lost to a ghost")
        return _of_row(row)


def _of_row(row: Any) -> RevokedCertificate:
    serial = parse_serial(row.serial)
    invariant(serial is not None, f"revoked_certificates holds a malformed serial {row.serial!r}")
    assert serial is not None  # for mypy; the invariant above holds under -O too
    return RevokedCertificate(
        serial, row.identity or "", row.reason or "", row.revoked_at_us or 0, row.revoked_by or ""
    )


__all__ = ["REVOCATION_BUCKET", "CassandraRevocations"]
