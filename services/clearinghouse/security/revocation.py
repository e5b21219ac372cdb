"""Revoked client certificates: what an operator revoked, and the check on every call.

A certificate is revoked by its serial number (RFC 5280: at most 20 octets; the switch's
CA draws 159 random bits for each, so serials do not repeat). Revocations are written
to Cassandra in every city (``revoked_certificates``, first write wins, never deleted)
through ``AdminService.RevokeCertificate``; every node reads the whole list when it
starts, before it serves, and again with the participant registry (every
``registry_refresh_s``, 2 s, each read bounded by the storage retries), so a revoked
certificate is refused at once by the node that took the revocation and by every other
within its next refresh, as long as it can read Cassandra at QUORUM (a node that cannot
logs an error at every failed refresh; it cannot commit payments either). The check is
made when a call starts, not at the TLS handshake: a connection opened before the
revocation is refused from its next call on; a stream already running (an export) runs
to its end.

While the list is empty no certificate is parsed: the check costs a length test. Once it
is not, the caller's certificate (``x509_pem_cert`` of the call's auth context) is
parsed once per distinct certificate (:data:`PARSED_CERTIFICATES_MAX` kept), and a
certificate that cannot be read is refused: a node that knows of revocations never
admits a caller it cannot check.
"""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final, Protocol

import grpc
from cryptography import x509

from clearinghouse.domain.errors import (
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    Unauthenticated,
)
from clearinghouse.security.identity import Identity

# RFC 5280 4.1.2.2: a serial is a positive integer of at most 20 octets.
SERIAL_OCTETS_MAX: Final = 20
SERIAL_HEX_DIGITS_MAX: Final = 2 * SERIAL_OCTETS_MAX
# Distinct peer certificates whose serial is kept parsed (a node sees one per caller).
PARSED_CERTIFICATES_MAX: Final = 4096
# An operator's reason is kept with the revocation for good; bound what one may cost.
REVOCATION_REASON_CHARS_MAX: Final = 500
IDENTITY_CHARS_MAX: Final = 100
REVOKES_CALLER: Final = "REVOKES_CALLER"
# ListRevokedCertificates: revocations per page when the request names none, and at most.
REVOCATIONS_PAGE_DEFAULT: Final = 100
REVOCATIONS_PAGE_MAX: Final = 1000
PAGE_TOKEN_CHARS_MAX: Final = 64
_HEX: Final = re.compile(r"^[0-9a-fA-F]+$")


def serial_hex(serial: int) -> str:
    """A serial as the switch writes it: lower-case hex, no separators or leading zeros."""
    return format(serial, "x")


def parse_serial(text: str) -> int | None:
    """A serial from hex (``7a:3f:...``, ``0x7A3F...`` or plain), or None if it is not one
    (empty, not hex, zero or negative, longer than 20 octets)."""
    digits = text.strip().replace(":", "")
    if digits[:2].lower() == "0x":
        digits = digits[2:]
    if not digits or not _HEX.match(digits):
        return None
    value = int(digits, 16)
    if value <= 0 or value.bit_length() > 8 * SERIAL_OCTETS_MAX:
        return None
    return value


@functools.lru_cache(maxsize=PARSED_CERTIFICATES_MAX)
def serial_of_pem(pem: bytes) -> int | None:
    """The serial of a PEM certificate, or None if it cannot be read."""
    try:
        return int(x509.load_pem_x509_certificate(pem).serial_number)
    except ValueError:
        return None


def caller_serial(context: grpc.ServicerContext) -> int | None:
    """The serial of the certificate the peer presented, or None (none, or unreadable)."""
    auth = context.auth_context()
    pems = auth.get("x509_pem_cert") if auth else None
    if not pems or len(pems) != 1:
        return None
    pem = pems[0]
    return serial_of_pem(pem if isinstance(pem, bytes) else str(pem).encode())


@dataclass(frozen=True, slots=True)
class RevokedCertificate:
    """One revocation, as stored: the certificate's serial, whose it was (its subject's
    common name, as the operator named it), why, when and by whom."""

    serial: int
    identity: str
    reason: str
    revoked_at_us: int
    revoked_by: str

    @property
    def serial_hex(self) -> str:
        return serial_hex(self.serial)


class RevocationList:
    """The serials every call is checked against; only ever grows."""

    def __init__(self, revoked: Iterable[RevokedCertificate] = ()) -> None:
        self._lock = threading.Lock()
        self._serials: frozenset[int] = frozenset(r.serial for r in revoked)

    def merge(self, revoked: Iterable[RevokedCertificate]) -> None:
        """Add what a refresh read. Revocations are never undone, so nothing is dropped:
        a refresh that read the table just before this node stored a revocation (and
        :meth:`add` ed it) must not admit that certificate again."""
        serials = frozenset(r.serial for r in revoked)
        with self._lock:
            self._serials = self._serials | serials

    def add(self, serial: int) -> None:
        """One more, at once (the node that took the revocation, before its refresh)."""
        with self._lock:
            self._serials = self._serials | {serial}

    def __len__(self) -> int:
        return len(self._serials)

    def __contains__(self, serial: object) -> bool:
        return serial in self._serials

    def refuses(self, context: grpc.ServicerContext) -> int | None:
        """The serial to refuse the call for (revoked; -1: unreadable while the list is
        not empty), or None to let it through."""
        serials = self._serials  # one read: a concurrent merge is seen whole or not at all
        if not serials:
            return None
        serial = caller_serial(context)
        if serial is None:
            return -1
        return serial if serial in serials else None


def _position(r: RevokedCertificate) -> tuple[int, int]:
    return (r.revoked_at_us, r.serial)


def _token_of(r: RevokedCertificate) -> str:
    return f"{r.revoked_at_us}.{serial_hex(r.serial)}"


def _position_of_token(token: str) -> tuple[int, int] | None:
    at, dot, serial_text = token.partition(".")
    serial = parse_serial(serial_text) if dot and len(token) <= PAGE_TOKEN_CHARS_MAX else None
    if serial is None or not at.isdigit():
        return None
    return (int(at), serial)


class RevocationStore(Protocol):
    def all(self) -> list[RevokedCertificate]: ...

    def revoke(self, revocation: RevokedCertificate) -> RevokedCertificate: ...


class Revocations:
    """``AdminService.RevokeCertificate`` and ``ListRevokedCertificates`` over a store; a
    revocation this node takes is in its :class:`RevocationList` before it answers."""

    def __init__(
        self, store: RevocationStore, revoked: RevocationList, clock: Callable[[], int]
    ) -> None:
        self.store = store
        self.revoked = revoked
        self.clock = clock

    def all(self) -> list[RevokedCertificate]:
        return self.store.all()

    def page(self, page_size: int, page_token: str) -> tuple[list[RevokedCertificate], str]:
        """At most ``page_size`` revocations (0: the default) after ``page_token`` (the
        position of the last one of the page before), oldest first; and the next token
        (empty on the last page)."""
        after = _position_of_token(page_token)
        violations = []
        if not 0 <= page_size <= REVOCATIONS_PAGE_MAX:
            rule = f"must be 0..{REVOCATIONS_PAGE_MAX} (0: {REVOCATIONS_PAGE_DEFAULT})"
            violations.append(FieldViolation("page_size", rule))
        if page_token and after is None:
            violations.append(FieldViolation("page_token", "is not a token this API gave"))
        if violations:
            raise InvalidArgument(violations)
        size = page_size or REVOCATIONS_PAGE_DEFAULT
        rest = [r for r in self.all() if after is None or _position(r) > after]
        chosen = rest[:size]
        return chosen, (_token_of(chosen[-1]) if len(rest) > size else "")

    def revoke(
        self,
        serial_text: str,
        identity: str,
        reason: str,
        *,
        by: Identity | None,
        by_serial: int | None,
    ) -> RevokedCertificate:
        """Revoke the certificate of serial ``serial_text``; a rejected request writes
        nothing. The same serial again returns the first revocation (ALREADY_EXISTS if
        it named another identity or reason)."""
        serial = parse_serial(serial_text)
        violations = []
        if serial is None:
            rule = f"must be a positive serial of 1..{SERIAL_HEX_DIGITS_MAX} hex digits"
            violations.append(FieldViolation("serial", rule))
        if len(identity) > IDENTITY_CHARS_MAX or Identity.parse(identity) is None:
            rule = "must be the certificate's common name, <role>:<name> (institution:INST_X)"
            violations.append(FieldViolation("identity", rule))
        if not reason.strip() or len(reason) > REVOCATION_REASON_CHARS_MAX:
            rule = f"must be 1..{REVOCATION_REASON_CHARS_MAX} characters, not all blank"
            violations.append(FieldViolation("reason", rule))
        if violations or serial is None:
            raise InvalidArgument(violations)
        if by is None:  # the security interceptor lets no such call through
            raise Unauthenticated("the call carries no client certificate the switch issued")
        if serial == by_serial:
            raise FailedPrecondition(
                f"serial {serial_hex(serial)} is the certificate this call is made with; "
                "revoke it with another operator's certificate",
                reason=REVOKES_CALLER,
            )
        wanted = RevokedCertificate(serial, identity, reason, self.clock(), by.common_name)
        stored = self.store.revoke(wanted)
        self.revoked.add(serial)
        if (stored.identity, stored.reason) != (identity, reason):
            raise AlreadyExists(
                f"serial {serial_hex(serial)} was already revoked, as {stored.identity}'s, "
                f"for {stored.reason!r}",
                reason="CERTIFICATE_ALREADY_REVOKED",
            )
        return stored


__all__ = [
    "IDENTITY_CHARS_MAX",
    "PARSED_CERTIFICATES_MAX",
    "REVOCATIONS_PAGE_DEFAULT",
    "REVOCATIONS_PAGE_MAX",
    "REVOCATION_REASON_CHARS_MAX",
    "REVOKES_CALLER",
    "SERIAL_HEX_DIGITS_MAX",
    "SERIAL_OCTETS_MAX",
    "RevocationList",
    "RevocationStore",
    "Revocations",
    "RevokedCertificate",
    "caller_serial",
    "parse_serial",
    "serial_hex",
    "serial_of_pem",
]
