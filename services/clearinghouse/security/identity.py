"""Who is calling: the identity a client certificate names.

A certificate's subject common name is ``<role>:<name>``:

============  ==========================  =============================================
role          name                        may (see :mod:`clearinghouse.security.authz`)
============  ==========================  =============================================
institution   its participant id          submit and read its own payments
bank          its participant id          read payments it is party to
auditor       a person or firm            read the audit API, never write
operator      a person or tool            administer participants, windows, the cluster
node          its zone (beijing-a)        call other nodes (ShardService) and banks
============  ==========================  =============================================

Only certificates signed by the switch's CA reach this code (the TLS layer refuses the
rest), so the name in a verified certificate is the caller.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Final

import grpc

NAME_PATTERN: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
PARTICIPANT_ROLES_NOTE: Final = "institution and bank names are participant ids"


class Role(enum.StrEnum):
    INSTITUTION = "institution"
    BANK = "bank"
    AUDITOR = "auditor"
    OPERATOR = "operator"
    NODE = "node"

    @property
    def is_participant(self) -> bool:
        return self in (Role.INSTITUTION, Role.BANK)


@dataclass(frozen=True, slots=True)
class Identity:
    role: Role
    name: str

    def __post_init__(self) -> None:
        if not NAME_PATTERN.match(self.name):
            raise ValueError(f"bad identity name {self.name!r} (want {NAME_PATTERN.pattern})")

    @property
    def common_name(self) -> str:
        return f"{self.role.value}:{self.name}"

    @property
    def folder_name(self) -> str:
        """Participants by their id (upper case); everyone else as ``<role>-<name>``."""
        return self.name if self.role.is_participant else f"{self.role.value}-{self.name}"

    def __str__(self) -> str:
        return self.common_name

    @classmethod
    def parse(cls, common_name: str) -> Identity | None:
        role, sep, name = common_name.partition(":")
        if not sep:
            return None
        try:
            return cls(Role(role), name)
        except ValueError:
            return None

    @classmethod
    def of_caller(cls, context: grpc.ServicerContext) -> Identity | None:
        """The verified identity of the peer, or None (no or unreadable certificate)."""
        auth = context.auth_context()
        names = auth.get("x509_common_name") if auth else None
        if not names or len(names) != 1:
            return None
        raw = names[0]
        try:
            text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
        except UnicodeDecodeError:
            return None
        return cls.parse(text)
