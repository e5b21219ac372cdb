"""The operators' side of the participant registry: register, update, suspend, resume, caps.

Every accepted change is a new version of the participant, written once; a rejected
request writes nothing. Checks run in two phases, as for payment orders: first the
request alone (every bad field in one ``InvalidArgument``), then against the stored
participant (NotFound, version conflict, a currency it does not hold).

Concurrency is optimistic. ``update`` carries the version the operator read, and a
mismatch is ``FailedPrecondition`` with reason :data:`VERSION_CONFLICT`: the operator
edited a stale copy and must re-read. Suspend, resume and set_cap change one field of
whatever is stored, so on a conflict they re-read and re-apply instead of failing; they
never overwrite the concurrent change, because each attempt starts from the newest
version. The store's conditional write is what makes two writers of one version
impossible.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Final

from clearinghouse.domain import (
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    Participant,
    ParticipantKind,
    ParticipantStatus,
    is_supported_currency,
)
from clearinghouse.domain.model import SigningKey
from clearinghouse.domain.money import AMOUNT_MINOR_LIMIT
from clearinghouse.domain.signing import PUBLIC_KEY_LEN, key_id_of
from clearinghouse.domain.validation import PARTICIPANT_ID_LEN_MAX, is_valid_id
from clearinghouse.switch.ports import ParticipantStore
from clearinghouse.switch.processor import Clock

# The reason of the FailedPrecondition raised when a version is already taken: the
# caller read a copy that someone else has since changed.
VERSION_CONFLICT: Final = "VERSION_CONFLICT"
PARTICIPANT_EXISTS: Final = "PARTICIPANT_EXISTS"
FIRST_VERSION: Final = 1
PAYMENTS_PER_S_QUOTA_MAX: Final = 1_000_000

# ListParticipants: participants per page when the request names none, and at most.
PARTICIPANTS_PAGE_DEFAULT: Final = 100
PARTICIPANTS_PAGE_MAX: Final = 1000
NAME_CHARS_MAX: Final = 100
# An operator's reason is kept in every version it caused; bound what one may cost.
STATUS_REASON_CHARS_MAX: Final = 500
# A suspend, resume or set_cap that keeps losing to concurrent changes gives up after
# this many reads; admin changes are rare, so more than one retry means something is
# looping and the operator should see it.
CHANGE_ATTEMPTS_MAX: Final = 3

# 2..11 uppercase letters and digits: from a short domestic code up to a full SWIFT BIC.
_BANK_CODE: Final = re.compile(r"[A-Z0-9]{2,11}")
# A DNS name or IPv4 address, or an IPv6 address in brackets, then ":" and a port.
_ENDPOINT: Final = re.compile(
    r"(?P<host>[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\]):(?P<port>[0-9]{1,5})"
)
# Keys a participant may list at once: the current one and those still being rotated out.
SIGNING_KEYS_MAX: Final = 8
HOST_CHARS_MAX: Final = 253  # the longest DNS name
PORT_MAX: Final = 65_535

_REASON_REGISTERED: Final = "registered"
_REASON_UPDATED: Final = "updated"


class AdminDomain:
    """Registry changes as operators request them, over a :class:`ParticipantStore`.

    ``clock`` returns microseconds since the Unix epoch; it stamps each new version.
    """

    def __init__(self, store: ParticipantStore, clock: Clock) -> None:
        self._store = store
        self._clock = clock

    # -- queries -----------------------------------------------------------------------

    def get(self, participant_id: str) -> Participant:
        """The newest version of the participant; NotFound if there is none."""
        # A malformed id names no participant; it never reaches the store (Cassandra
        # refuses an empty partition key outright).
        violations = _id_violations(participant_id, "participant_id")
        if violations:
            raise InvalidArgument(violations)
        stored = self._store.get(participant_id)
        if stored is None:
            raise NotFound(
                f"participant {participant_id!r} does not exist", reason="PARTICIPANT_NOT_FOUND"
            )
        return stored

    def list(self, kind: ParticipantKind | None = None) -> Sequence[Participant]:
        """The newest version of every participant (of ``kind``), in participant_id order."""
        everyone = self._store.all().values()
        chosen = [p for p in everyone if kind is None or p.kind is kind]
        return tuple(sorted(chosen, key=lambda p: p.participant_id))

    def page(
        self, kind: ParticipantKind | None, page_size: int, page_token: str
    ) -> tuple[Sequence[Participant], str]:
        """One page of :meth:`list`: at most ``page_size`` participants (0: the default)
        after ``page_token`` (the last id of the page before; empty: the first page), and
        the token of the next page (empty on the last)."""
        violations = []
        if not 0 <= page_size <= PARTICIPANTS_PAGE_MAX:
            rule = f"must be 0..{PARTICIPANTS_PAGE_MAX} (0: {PARTICIPANTS_PAGE_DEFAULT})"
            violations.append(FieldViolation("page_size", rule))
        if page_token:
            violations += _id_violations(page_token, "page_token")
        if violations:
            raise InvalidArgument(violations)
        size = page_size or PARTICIPANTS_PAGE_DEFAULT
        rest = [p for p in self.list(kind) if p.participant_id > page_token]
        chosen = tuple(rest[:size])
        return chosen, (chosen[-1].participant_id if len(rest) > size else "")

    # -- changes -----------------------------------------------------------------------

    def register(self, participant: Participant) -> Participant:
        """Store a new participant, ACTIVE at version 1, whatever status and version say."""
        _raise_if_invalid(participant)
        pid = participant.participant_id
        if self._store.get(pid) is not None:
            raise _exists(pid)
        first = replace(
            _normalized(participant), status=ParticipantStatus.ACTIVE, version=FIRST_VERSION
        )
        try:
            return self._write(first, _REASON_REGISTERED)
        except FailedPrecondition as e:
            # Another registration of the same id won the race after our read.
            if e.reason != VERSION_CONFLICT:
                raise
            raise _exists(pid) from e

    def update(self, participant: Participant, expected_version: int) -> Participant:
        """Replace name, bank_code, endpoint, currencies and caps of the stored participant.

        ``expected_version`` is the version the operator edited; any other stored version
        is a VERSION_CONFLICT. Status is kept: only suspend and resume change it.
        """
        _raise_if_invalid(participant)
        stored = self.get(participant.participant_id)
        if participant.kind is not stored.kind:
            raise InvalidArgument(
                [FieldViolation("participant.kind", "cannot change after registration")]
            )
        if stored.version != expected_version:
            raise _version_conflict(stored.participant_id, expected_version, stored.version)
        wanted = replace(_normalized(participant), status=stored.status, version=stored.version,
                         status_reason=stored.status_reason)  # fmt: skip
        if wanted == stored:
            return stored  # Nothing changes, so there is no new version to write.
        return self._write(replace(wanted, version=stored.version + 1), _REASON_UPDATED)

    def suspend(self, participant_id: str, reason: str) -> Participant:
        """Refuse new payments naming the participant. Suspending it again changes nothing."""
        _raise_if_bad_reason(reason)
        return self._change(
            participant_id,
            lambda p: replace(p, status=ParticipantStatus.SUSPENDED, status_reason=reason),
            reason,
        )

    def resume(self, participant_id: str, reason: str) -> Participant:
        """Make the participant ACTIVE again. Resuming an active one changes nothing."""
        _raise_if_bad_reason(reason)
        return self._change(
            participant_id,
            lambda p: replace(p, status=ParticipantStatus.ACTIVE, status_reason=reason),
            reason,
        )

    def set_cap(self, participant_id: str, currency: str, cap_minor: int) -> Participant:
        """Set or replace the participant's net debit cap in ``currency``, in minor units.

        The currency must be one the participant holds (FailedPrecondition with reason
        CURRENCY_NOT_SUPPORTED otherwise): that depends on the stored participant, not on
        the request, so it is not an InvalidArgument.
        """
        violations = [
            *_currency_violations([currency], "cap.currency"),
            *_cap_violations(cap_minor, "cap.amount_minor"),
        ]
        if violations:
            raise InvalidArgument(violations)

        def with_cap(p: Participant) -> Participant:
            if currency not in p.currencies:
                raise FailedPrecondition(
                    f"participant {p.participant_id!r} does not hold {currency}",
                    reason=FailedPrecondition.CURRENCY_NOT_SUPPORTED,
                )
            return replace(p, net_debit_caps={**p.net_debit_caps, currency: cap_minor})

        return self._change(
            participant_id, with_cap, f"net debit cap {currency} set to {cap_minor} minor units"
        )

    # -- internals ---------------------------------------------------------------------

    def _change(
        self, participant_id: str, change: Callable[[Participant], Participant], reason: str
    ) -> Participant:
        """Apply ``change`` to the newest version and store the result as the next one."""
        for attempt in range(1, CHANGE_ATTEMPTS_MAX + 1):
            stored = self.get(participant_id)
            wanted = change(stored)
            if wanted == stored:
                return stored
            try:
                return self._write(replace(wanted, version=stored.version + 1), reason)
            except FailedPrecondition as e:
                # On a conflict someone changed it after our read: start again from theirs.
                if e.reason != VERSION_CONFLICT or attempt == CHANGE_ATTEMPTS_MAX:
                    raise
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _write(self, participant: Participant, reason: str) -> Participant:
        return self._store.put(participant, reason=reason, now_us=self._clock())


def _version_conflict(participant_id: str, expected: int, stored: int) -> FailedPrecondition:
    """The error for a change made from version ``expected`` when ``stored`` is newer."""
    return FailedPrecondition(
        f"participant {participant_id!r} is at version {stored}, not {expected}; "
        "re-read it and try again",
        reason=VERSION_CONFLICT,
    )


def _exists(participant_id: str) -> AlreadyExists:
    return AlreadyExists(
        f"participant {participant_id!r} already exists", reason=PARTICIPANT_EXISTS
    )


def _normalized(participant: Participant) -> Participant:
    # The wire has no null strings: an empty bank_code or endpoint means "none", and is
    # stored and compared as None so that an update sending "" is not a change. A
    # signing key's id is the server's to compute (a given one was checked to match),
    # and keys are kept in key_id order so that a reordered list is not a change.
    keys = {key_id_of(k.public_key): k.public_key for k in participant.signing_keys}
    return replace(
        participant,
        bank_code=participant.bank_code or None,
        endpoint=participant.endpoint or None,
        signing_keys=tuple(SigningKey(kid, pk) for kid, pk in sorted(keys.items())),
    )


# -- request checks ----------------------------------------------------------------------


def _raise_if_invalid(participant: Participant, path: str = "participant") -> None:
    """Raise InvalidArgument listing every bad field of ``participant``."""
    violations = [
        *_id_violations(participant.participant_id, f"{path}.participant_id"),
        *_name_violations(participant.name, f"{path}.name"),
        *_currency_violations(sorted(participant.currencies, key=str), f"{path}.currencies"),
        *_kind_violations(participant, path),
        *_signing_key_violations(participant.signing_keys, f"{path}.signing_keys"),
        *[
            violation
            for currency, cap in sorted(participant.net_debit_caps.items(), key=_by_currency)
            for violation in _caps_violations(participant, currency, cap, path)
        ],
        *_quota_violations(participant.payments_per_s_quota, f"{path}.payments_per_s_quota"),
    ]
    if violations:
        raise InvalidArgument(violations)


def _quota_violations(quota: int, path: str) -> list[FieldViolation]:
    if 0 <= quota <= PAYMENTS_PER_S_QUOTA_MAX:
        return []
    return [FieldViolation(path, f"must be 0 (the default) to {PAYMENTS_PER_S_QUOTA_MAX}")]


def _by_currency(item: tuple[str, int]) -> str:
    return str(item[0])  # str(): an unsupported key may be of any type; sorting must not fail


def _raise_if_bad_reason(reason: str) -> None:
    if not reason.strip() or len(reason) > STATUS_REASON_CHARS_MAX:
        rule = f"must be 1..{STATUS_REASON_CHARS_MAX} characters, not all blank"
        raise InvalidArgument([FieldViolation("reason", rule)])


def _id_violations(participant_id: str, field: str) -> list[FieldViolation]:
    if is_valid_id(participant_id, PARTICIPANT_ID_LEN_MAX):
        return []
    rule = f"must be 1..{PARTICIPANT_ID_LEN_MAX} characters of A-Z a-z 0-9 . _ : -"
    return [FieldViolation(field, rule)]


def _name_violations(name: str, field: str) -> list[FieldViolation]:
    if name.strip() and len(name) <= NAME_CHARS_MAX:
        return []
    return [FieldViolation(field, f"must be 1..{NAME_CHARS_MAX} characters, not all blank")]


def _currency_violations(currencies: Sequence[str], field: str) -> list[FieldViolation]:
    return [
        FieldViolation(field, f"{currency!r} is not a currency the switch supports")
        for currency in currencies
        if not is_supported_currency(currency)
    ]


def _kind_violations(participant: Participant, path: str) -> list[FieldViolation]:
    # The wire enum has an UNSPECIFIED value; whatever the gRPC layer maps it to is
    # reported here with the other fields.
    if participant.kind is ParticipantKind.BANK:
        return [
            *_bank_code_violations(participant.bank_code, f"{path}.bank_code"),
            *_endpoint_violations(participant.endpoint, f"{path}.endpoint"),
        ]
    if participant.kind is ParticipantKind.INSTITUTION:
        # An institution has no BankService to call; a bank_code or endpoint on one is
        # a mix-up of kinds that routing must never see.
        return [
            FieldViolation(f"{path}.{name}", "must be empty for an INSTITUTION")
            for name, value in (
                ("bank_code", participant.bank_code),
                ("endpoint", participant.endpoint),
            )
            if value
        ]
    return [FieldViolation(f"{path}.kind", "must be INSTITUTION or BANK")]


def _signing_key_violations(keys: Sequence[SigningKey], path: str) -> list[FieldViolation]:
    if len(keys) > SIGNING_KEYS_MAX:
        return [FieldViolation(path, f"must list at most {SIGNING_KEYS_MAX} keys")]
    violations = []
    for i, k in enumerate(keys):
        if len(k.public_key) != PUBLIC_KEY_LEN:
            rule = f"must be a raw Ed25519 public key of {PUBLIC_KEY_LEN} bytes"
            violations.append(FieldViolation(f"{path}[{i}].public_key", rule))
        elif k.key_id and k.key_id != key_id_of(k.public_key):
            rule = (
                "must be empty or the first 8 bytes of SHA-256(public_key) in lowercase "
                f"hex, {key_id_of(k.public_key)!r}"
            )
            violations.append(FieldViolation(f"{path}[{i}].key_id", rule))
    return violations


def _bank_code_violations(bank_code: str | None, field: str) -> list[FieldViolation]:
    if bank_code and _BANK_CODE.fullmatch(bank_code):
        return []
    return [FieldViolation(field, "a BANK needs 2..11 characters of A-Z 0-9")]


def _endpoint_violations(endpoint: str | None, field: str) -> list[FieldViolation]:
    match = _ENDPOINT.fullmatch(endpoint or "")
    if match and len(match["host"]) <= HOST_CHARS_MAX and 0 < int(match["port"]) <= PORT_MAX:
        return []
    return [FieldViolation(field, f"a BANK needs host:port with a port 1..{PORT_MAX}")]


def _caps_violations(
    participant: Participant, currency: str, cap_minor: int, path: str
) -> list[FieldViolation]:
    field = f"{path}.net_debit_caps[{currency}]"
    violations = _cap_violations(cap_minor, field)
    # A cap in a currency the participant cannot pay in would never apply, and would
    # silently start to when the currency is added later.
    if currency not in participant.currencies:
        violations.append(FieldViolation(field, "must be one of the participant's currencies"))
    return violations


def _cap_violations(cap_minor: int, field: str) -> list[FieldViolation]:
    # bool is an int; True must not pass for a cap of one minor unit. The upper bound is
    # what a Cassandra bigint and a protobuf int64 hold.
    if type(cap_minor) is int and 0 <= cap_minor <= AMOUNT_MINOR_LIMIT:
        return []
    return [FieldViolation(field, f"must be a whole number of minor units 0..{AMOUNT_MINOR_LIMIT}")]


__all__ = [
    "CHANGE_ATTEMPTS_MAX",
    "FIRST_VERSION",
    "NAME_CHARS_MAX",
    "PARTICIPANT_EXISTS",
    "STATUS_REASON_CHARS_MAX",
    "VERSION_CONFLICT",
    "AdminDomain",
]
