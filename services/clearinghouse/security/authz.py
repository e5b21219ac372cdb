"""Authorization by certificate identity: one table, checked before any servicer runs.

``SWITCH_POLICY`` names, for every method a switch node serves, who may call it; a
method missing from the table is refused (default deny), and a unit test checks that
every served method is in it. A rule is a set of roles, optionally with a check of the
request against the caller ("an institution submits and reads only its own payments").

Refusals are PERMISSION_DENIED (reason NOT_AUTHORIZED), or UNAUTHENTICATED when the
connection carries no usable certificate (the TLS layer already refuses connections
without one; this is the second lock) or one an operator revoked (reason
CERTIFICATE_REVOKED, :mod:`clearinghouse.security.revocation`). Calls beyond a
participant's quota are RESOURCE_EXHAUSTED with retry advice
(:mod:`clearinghouse.security.ratelimit`). In every case the servicer never runs, so
nothing is written.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final, TypeVar

import grpc

from clearing.v1 import common_pb2
from clearinghouse import telemetry
from clearinghouse._interceptor import Handler, WrappingServerInterceptor
from clearinghouse.domain.errors import (
    ERROR_METADATA_KEY,
    STATUS_DETAILS_BYTES_MAX,
    CertificateRevoked,
    ClearingError,
    PermissionDenied,
    Unauthenticated,
    clipped,
    status_for,
)
from clearinghouse.domain.validation import list_page_rows
from clearinghouse.security.identity import Identity, Role
from clearinghouse.security.ratelimit import RateLimiter
from clearinghouse.security.revocation import RevocationList, serial_hex
from clearinghouse.switch.convert import error_to_pb

log = logging.getLogger(__name__)

NOT_AUTHORIZED: Final = "NOT_AUTHORIZED"

T = TypeVar("T")
# (caller, request) -> None if allowed, else why not (for the error message).
RequestCheck = Callable[[Identity, Any], str | None]

ANY_ROLE: Final = frozenset(Role)
STAFF: Final = frozenset({Role.OPERATOR, Role.AUDITOR})


@dataclass(frozen=True, slots=True)
class Rule:
    roles: frozenset[Role]
    check: RequestCheck | None = None
    # How many quota units a call costs (a batch one per order, a listing one per row of
    # its page); None = 1.
    cost: Callable[[Any], int] | None = None


# A name from the request, as a refusal quotes it: a caller's 100,000-character id was
# echoed whole into the status and the trailer (past gRPC's 16 KiB metadata limit).
QUOTED_NAME_CHARS_MAX: Final = 64
QUOTED_NAMES_MAX: Final = 5


def _quoted(name: str) -> str:
    if len(name) <= QUOTED_NAME_CHARS_MAX:
        return repr(name)
    return f"{name[:QUOTED_NAME_CHARS_MAX]!r}... ({len(name)} characters)"


def _own_order(caller: Identity, request: Any) -> str | None:
    inst = request.order.institution_id
    return None if inst == caller.name else f"the order is for institution {_quoted(inst)}"


def _own_orders(caller: Identity, request: Any) -> str | None:
    others = sorted({o.institution_id for o in request.orders} - {caller.name})
    if not others:
        return None
    named = ", ".join(_quoted(o) for o in others[:QUOTED_NAMES_MAX])
    more = f" and {len(others) - QUOTED_NAMES_MAX} more" if len(others) > QUOTED_NAMES_MAX else ""
    return f"the batch has orders of another institution: {named}{more}"


def _own_institution(caller: Identity, request: Any) -> str | None:
    inst = request.institution_id
    return None if inst == caller.name else f"the request is for institution {_quoted(inst)}"


def _own_participant_or_staff(caller: Identity, request: Any) -> str | None:
    if caller.role in STAFF:
        return None
    pid = request.participant_id
    return None if pid == caller.name else f"the request is for participant {_quoted(pid)}"


# Quota units a whole-ledger audit read costs (a staff quota of 200/s: 4 such reads/s).
EXPENSIVE_READ_COST: Final = 50
# Quota units a listing costs per payment its page may hold (page_size, default 100, at
# most 500): each row is a payment read from its shard's owner, as a GetPayment is (one
# unit). Charged before the read, for the page asked for: a page of 500 costs 500, a
# quarter of a participant's default quota and more than a staff member's (the call is
# let through on a full bucket and leaves it in debt; see ratelimit).
LISTING_ROW_COST_UNITS: Final = 1


def _expensive(_request: Any) -> int:
    return EXPENSIVE_READ_COST


def _listing_cost(request: Any) -> int:
    return list_page_rows(request.page_size) * LISTING_ROW_COST_UNITS


def _batch_cost(request: Any) -> int:
    return max(1, len(request.orders))


def _rules(service: str, rules: Mapping[str, Rule]) -> dict[str, Rule]:
    return {f"/{service}/{name}": rule for name, rule in rules.items()}


_INSTITUTION = frozenset({Role.INSTITUTION})
_OPERATOR = frozenset({Role.OPERATOR})
_NODE = frozenset({Role.NODE})

SWITCH_POLICY: Final[Mapping[str, Rule]] = MappingProxyType(
    {
        **_rules(
            "clearing.v1.PaymentService",
            {
                "SubmitPayment": Rule(_INSTITUTION, _own_order),
                "SubmitPayments": Rule(_INSTITUTION, _own_orders, _batch_cost),
                "GetPayment": Rule(_INSTITUTION, _own_institution),
                "ListPayments": Rule(_INSTITUTION, _own_institution, _listing_cost),
            },
        ),
        **_rules(
            "clearing.v1.AdminService",
            {
                name: Rule(_OPERATOR)
                for name in (
                    "RegisterParticipant",
                    "UpdateParticipant",
                    "SuspendParticipant",
                    "ResumeParticipant",
                    "GetParticipant",
                    "ListParticipants",
                    "SetNetDebitCap",
                    "RevokeCertificate",
                )
            }
            | {"ListRevokedCertificates": Rule(STAFF)},
        ),
        **_rules(
            "clearing.v1.SettlementService",
            {"CloseWindow": Rule(_OPERATOR), "ConfirmSettlement": Rule(_OPERATOR)},
        ),
        **_rules(
            "clearing.v1.AuditService",
            {
                **{
                    name: Rule(STAFF)
                    for name in (
                        "GetPaymentHistory",
                        "ListWindows",
                        "GetWindow",
                        "GetInclusionProof",
                    )
                },
                # Whole-ledger reads (every chain; each city's replica; a window's files)
                # cost a node far more than a lookup: they spend more of the quota.
                **{
                    name: Rule(STAFF, cost=_expensive)
                    for name in ("VerifyChains", "CompareCities", "ExportWindow")
                },
                # A bank or an institution may list the payments it is party to.
                "ListParticipantPayments": Rule(
                    STAFF | {Role.INSTITUTION, Role.BANK}, _own_participant_or_staff, _listing_cost
                ),
            },
        ),
        **_rules(
            "clearing.v1.ShardService",
            {
                **{name: Rule(_NODE) for name in ("SubmitOwned", "GetOwned", "Lend", "Repay")},
                # What a node owns and has done: for operators' status pages too.
                "Describe": Rule(_NODE | _OPERATOR),
            },
        ),
        **_rules("grpc.health.v1.Health", {m: Rule(ANY_ROLE) for m in ("Check", "Watch", "List")}),
        **_rules(
            "grpc.reflection.v1alpha.ServerReflection", {"ServerReflectionInfo": Rule(ANY_ROLE)}
        ),
        **_rules("grpc.reflection.v1.ServerReflection", {"ServerReflectionInfo": Rule(ANY_ROLE)}),
    }
)

# A bank simulator serves the switch's nodes only.
BANK_POLICY: Final[Mapping[str, Rule]] = MappingProxyType(
    {
        **_rules(
            "clearing.v1.BankService",
            {name: Rule(_NODE) for name in ("Debit", "Credit", "Inquire", "Reverse", "Transfers")},
        ),
        **_rules("grpc.health.v1.Health", {m: Rule(ANY_ROLE) for m in ("Check", "Watch", "List")}),
        **_rules(
            "grpc.reflection.v1alpha.ServerReflection", {"ServerReflectionInfo": Rule(ANY_ROLE)}
        ),
        **_rules("grpc.reflection.v1.ServerReflection", {"ServerReflectionInfo": Rule(ANY_ROLE)}),
    }
)


def _abort(context: grpc.ServicerContext, err: ClearingError) -> None:
    pb: common_pb2.Error = error_to_pb(err)
    context.set_trailing_metadata(((ERROR_METADATA_KEY, pb.SerializeToString()),))
    telemetry.metrics.rejection(err.reason)
    context.abort(status_for(err), clipped(f"{err.reason}: {err}", STATUS_DETAILS_BYTES_MAX))


class SecurityInterceptor(WrappingServerInterceptor):
    """Identity from the client certificate, whether it is revoked, then the policy, then
    the caller's quota."""

    def __init__(
        self,
        policy: Mapping[str, Rule],
        limiter: RateLimiter | None = None,
        *,
        unlimited_roles: Iterable[Role] = (Role.NODE,),
        revoked: RevocationList | None = None,
    ) -> None:
        self.policy = policy
        self.limiter = limiter
        self.unlimited = frozenset(unlimited_roles)
        self.revoked = revoked
        super().__init__()

    # -- the decision ------------------------------------------------------------------

    def admit(self, method: str, context: grpc.ServicerContext, request: Any) -> None:
        """Raise the ClearingError that refuses this call, or return to let it run."""
        caller = Identity.of_caller(context)
        if caller is None:
            raise Unauthenticated("the call carries no client certificate the switch issued")
        serial = self.revoked.refuses(context) if self.revoked is not None else None
        if serial is not None:
            raise CertificateRevoked(
                f"the certificate of {caller} (serial {serial_hex(serial)}) was revoked"
                if serial > 0
                else f"the certificate of {caller} cannot be checked against revocations"
            )
        rule = self.policy.get(method)
        if rule is None or caller.role not in rule.roles:
            raise PermissionDenied(f"{caller} may not call {method}", reason=NOT_AUTHORIZED)
        if rule.check is not None and request is not None:
            why = rule.check(caller, request)
            if why is not None:
                raise PermissionDenied(
                    f"{caller} may not call {method}: {why}", reason=NOT_AUTHORIZED
                )
        if self.limiter is not None and caller.role not in self.unlimited:
            cost = rule.cost(request) if rule.cost is not None and request is not None else 1
            self.limiter.take(caller.common_name, cost)

    def _refuse(self, method: str, context: grpc.ServicerContext, request: Any) -> bool:
        try:
            self.admit(method, context, request)
        except ClearingError as e:
            if isinstance(e, PermissionDenied | Unauthenticated):
                log.warning("refused %s: %s (peer %s)", method, e, context.peer())
            _abort(context, e)
            return True
        return False

    # -- wrapping ----------------------------------------------------------------------

    def _wrap(self, method: str, handler: Handler) -> Handler:
        des, ser = handler.request_deserializer, handler.response_serializer
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._with_request(method, handler.unary_unary), des, ser
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._with_request(method, handler.unary_stream), des, ser
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._without_request(method, handler.stream_unary), des, ser
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                self._without_request(method, handler.stream_stream), des, ser
            )
        return handler

    def _with_request(
        self, method: str, behaviour: Callable[[Any, grpc.ServicerContext], T]
    ) -> Callable[[Any, grpc.ServicerContext], T]:
        def call(request: Any, context: grpc.ServicerContext) -> T:
            if self._refuse(method, context, request):
                raise AssertionError("unreachable: context.abort raises")  # pragma: no cover
            return behaviour(request, context)

        return call

    def _without_request(
        self, method: str, behaviour: Callable[[Any, grpc.ServicerContext], T]
    ) -> Callable[[Any, grpc.ServicerContext], T]:
        def call(requests: Any, context: grpc.ServicerContext) -> T:
            if self._refuse(method, context, None):
                raise AssertionError("unreachable: context.abort raises")  # pragma: no cover
            return behaviour(requests, context)

        return call
