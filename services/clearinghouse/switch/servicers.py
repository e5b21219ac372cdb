"""The gRPC layer: convert the message, call the domain, convert errors. Nothing else.

Every domain error leaves through :func:`grpc_errors`, which takes its status code from
the one table (``domain.errors.status_for``) and attaches a ``clearing.v1.Error`` in the
``clearing-error-bin`` trailer. Anything that is not a domain error is a bug: it is
logged with its stack and answered INTERNAL without details.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import grpc

from clearing.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    audit_pb2,
    audit_pb2_grpc,
    common_pb2,
    payment_pb2,
    payment_pb2_grpc,
    settlement_pb2,
    settlement_pb2_grpc,
    shard_pb2,
    shard_pb2_grpc,
)
from clearinghouse import settlement, telemetry
from clearinghouse._invariant import InvariantViolation, invariant
from clearinghouse.domain import (
    PAYMENT_ID_LEN_MAX,
    AlreadyExists,
    ClearingError,
    DataLoss,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    Participant,
    ParticipantKind,
    PaymentOrder,
    Unavailable,
    UnknownParticipant,
    validate_batch_size,
)
from clearinghouse.domain.clearing import WindowClearing
from clearinghouse.domain.errors import ERROR_METADATA_KEY, STATUS_DETAILS_BYTES_MAX, clipped
from clearinghouse.domain.signing import check_fresh, verify_signed_order
from clearinghouse.domain.validation import (
    PARTICIPANT_ID_LEN_MAX,
    check_order_shape,
    is_valid_id,
    list_page_rows,
    timestamp_violations,
)
from clearinghouse.security.identity import Identity, Role
from clearinghouse.security.revocation import Revocations, caller_serial
from clearinghouse.storage.ledger import DAY_US, LIST_DAYS_MAX, CassandraLedger
from clearinghouse.storage.windows import WindowEvent
from clearinghouse.switch import convert, heap
from clearinghouse.switch.config import REGISTRY_REFRESH_S
from clearinghouse.switch.processor import Registry, wall_clock_us
from clearinghouse.switch.records import SHARD_COUNT
from clearinghouse.switch.routing import FORWARD_DEADLINE_S, LocalOwner, Router
from clearinghouse.switch.shards import ReceivedBefore

log = logging.getLogger(__name__)


@contextmanager
def grpc_errors(context: grpc.ServicerContext) -> Iterator[None]:
    try:
        yield
    except RemoteError as e:
        telemetry.metrics.rejection(e.reason)
        abort_with(context, e.pb)
    except ClearingError as e:
        telemetry.metrics.rejection(e.reason)
        abort_with(context, convert.error_to_pb(e))
    except Exception:
        # A bug, not the client's doing: keep the details in the node's log.
        log.exception("internal error in %s", type(context).__name__)
        context.abort(grpc.StatusCode.INTERNAL, "internal error; the node logged the details")


class RemoteError(ClearingError):
    """An error another node answered with, passed on with its code and details."""

    def __init__(self, err: common_pb2.Error) -> None:
        super().__init__(err.message, reason=err.reason)
        self.pb = err


def abort_with(context: grpc.ServicerContext, err: common_pb2.Error) -> None:
    """End the call with ``err``: its code, and the whole error in the trailer."""
    context.set_trailing_metadata(((ERROR_METADATA_KEY, err.SerializeToString()),))
    detail = "; ".join(f"{v.field}: {v.description}" for v in err.field_violations)
    status_details = clipped(f"{err.reason}: {detail or err.message}", STATUS_DETAILS_BYTES_MAX)
    context.abort(grpc.StatusCode(_CODES[err.code]), status_details)


_CODES = {c.value[0]: c.value for c in grpc.StatusCode}


def _time_left_s(context: grpc.ServicerContext) -> float:
    left = context.time_remaining()
    return FORWARD_DEADLINE_S if left is None else max(0.0, left)


class PaymentServicer(payment_pb2_grpc.PaymentServiceServicer):
    """Participants' RPCs: each payment goes to its shard's owner through the router.

    The receiving node refuses, before routing and so before anything is written, an
    order that could never be accepted: a malformed one, one whose signature does not
    verify with its institution's registered keys (in ``registry``), and one outside the
    freshness window (:mod:`clearinghouse.domain.signing`).
    """

    def __init__(
        self,
        router: Router,
        ledger: CassandraLedger,
        registry: Registry,
        clock: Callable[[], int] = wall_clock_us,
    ) -> None:
        self.router = router
        self.ledger = ledger
        self.registry = registry
        self.clock = clock

    def _admit(self, order_pb: Any, path: str, now_us: int) -> None:
        admit_order(order_pb, path, self.registry, now_us)

    def SubmitPayment(self, request: Any, context: grpc.ServicerContext) -> Any:
        with grpc_errors(context):
            self._admit(request.order, "order", self.clock())
            (r,) = self.router.submit([request.order], ["order"], _time_left_s(context))
        if r.HasField("error"):
            abort_with(context, r.error)
        return payment_pb2.SubmitPaymentResponse(payment=r.payment, replayed=r.replayed)

    def SubmitPayments(self, request: Any, context: grpc.ServicerContext) -> Any:
        with grpc_errors(context):
            orders = list(request.orders)
            validate_batch_size(len(orders))
            _check_batch(orders)
            telemetry.metrics.batch_size(len(orders))
            paths = [f"orders[{i}]" for i in range(len(orders))]
            results: list[Any] = [None] * len(orders)
            now = self.clock()
            for i, (o, path) in enumerate(zip(orders, paths, strict=True)):
                try:
                    self._admit(o, path, now)
                except ClearingError as e:
                    results[i] = payment_pb2.PaymentResult(
                        payment_id=o.payment_id, error=convert.error_to_pb(e)
                    )
            todo = [i for i, r in enumerate(results) if r is None]
            routed = self.router.submit(
                [orders[i] for i in todo], [paths[i] for i in todo], _time_left_s(context)
            )
            for i, r in zip(todo, routed, strict=True):
                results[i] = r
            return payment_pb2.SubmitPaymentsResponse(results=results)

    def GetPayment(self, request: Any, context: grpc.ServicerContext) -> Any:
        with grpc_errors(context):
            _check_ref(request.institution_id, request.payment_id)
            (r,) = self.router.get([(request.institution_id, request.payment_id)])
        if r.HasField("error"):
            abort_with(context, r.error)
        return payment_pb2.GetPaymentResponse(payment=r.payment)

    def ListPayments(self, request: Any, context: grpc.ServicerContext) -> Any:
        with grpc_errors(context):
            payments, token = _list_payments(
                self.router, self.ledger, request, request.institution_id, "institution_id"
            )
            # An institution lists its own payments only (a bank's rows name others').
            mine = [p for p in payments if p.order.institution_id == request.institution_id]
            return payment_pb2.ListPaymentsResponse(payments=mine, next_page_token=token)


# The owner of a forwarded order checks its freshness with this much room on each side:
# the receiving node checked it when the order arrived, and the hop to the owner (the
# router's whole forwarding budget, FORWARD_DEADLINE_S, waits for a new owner included)
# and the two nodes' clocks must not turn a retry of a recorded payment into a refusal.
OWNER_FRESHNESS_GRACE_S = 60
# Reasons the owner's own registry may give only because its 2 s refresh has not yet
# seen what the receiving node saw (a new signing key, a new participant): answered
# UNAVAILABLE, to retry, not as the definite refusal the receiving node would give.
_REGISTRY_LAG_REASONS = frozenset({"SIGNING_KEY_UNKNOWN", "PARTICIPANT_NOT_FOUND"})
invariant(
    OWNER_FRESHNESS_GRACE_S > FORWARD_DEADLINE_S,
    "the owner's freshness grace must outlast the router's forwarding budget",
)


def admit_order(
    order_pb: Any, path: str, registry: Registry, now_us: int, *, forwarded: bool = False
) -> PaymentOrder:
    """The order, if it may be recorded: well formed, from an institution the registry
    holds, signed with one of its keys, fresh; else raise the ClearingError refusing it.
    ``forwarded``: checked again by the shard's owner (freshness with
    :data:`OWNER_FRESHNESS_GRACE_S`; what its registry does not know yet is UNAVAILABLE)."""
    order = convert.order_from_pb(order_pb, path)
    check_order_shape(order, path=path)

    def lacks(known: Mapping[str, Participant]) -> bool:
        """The order names a participant, or its institution a key, ``known`` lacks."""
        inst = known.get(order.institution_id)
        return (
            inst is None
            or order.payer_id not in known
            or order.payee_id not in known
            or (
                bool(order.signing_key_id)  # unsigned: refused whatever the registry says
                and all(k.key_id != order.signing_key_id for k in inst.signing_keys)
            )
        )

    try:
        institution = registry.snapshot_knowing(lacks).get(order.institution_id)
        if institution is None:
            raise UnknownParticipant(
                f"{path}.institution_id: participant {order.institution_id!r} does not exist"
                + UnknownParticipant.JUST_REGISTERED
            )
        verify_signed_order(order, institution.signing_key_map())
    except ClearingError as e:
        if forwarded and e.reason in _REGISTRY_LAG_REASONS:
            raise Unavailable(
                f"{e} at the shard's owner, whose registry may not have caught up yet; "
                "retry with the same id",
                retry_after_ms=int(REGISTRY_REFRESH_S * 1000),
                reason="OWNER_REGISTRY_BEHIND",
            ) from e
        raise
    check_fresh(order, now_us, grace_s=OWNER_FRESHNESS_GRACE_S if forwarded else 0)
    return order


class ShardServicer(shard_pb2_grpc.ShardServiceServicer):
    """Node to node: what another node forwards to this node as the shards' owner.

    The owner admits a forwarded order again (signature, freshness) before it records
    it: the ledger's intent must carry a signature that verifies whoever sent it, and a
    node certificate is not a licence to write unsigned orders (a review sent one and it
    was APPROVED). A forwarded order also names the caller's own zone as received."""

    def __init__(
        self,
        local: LocalOwner,
        describe: Callable[[], Any],
        registry: Registry,
        clock: Callable[[], int] = wall_clock_us,
    ) -> None:
        self.local = local
        self.describe = describe
        self.registry = registry
        self.clock = clock

    def Describe(self, request: Any, context: grpc.ServicerContext) -> Any:
        with grpc_errors(context):
            return self.describe()

    def SubmitOwned(self, request: Any, context: grpc.ServicerContext) -> Any:
        with grpc_errors(context):
            orders = list(request.orders)
            validate_batch_size(len(orders))
            paths = list(request.paths) or [f"orders[{i}]" for i in range(len(orders))]
            if len(paths) != len(orders):
                raise InvalidArgument([FieldViolation("paths", "one path per order")])
            caller = Identity.of_caller(context)
            if (
                caller is not None
                and caller.role is Role.NODE
                and (request.received_zone != caller.name)
            ):
                raise InvalidArgument([FieldViolation(
                    "received_zone", f"must be the forwarding node's zone ({caller.name})"
                )])  # fmt: skip
            results: list[Any] = [None] * len(orders)
            admitted: dict[int, PaymentOrder] = {}
            now = self.clock()
            for i, (o, path) in enumerate(zip(orders, paths, strict=True)):
                try:
                    admitted[i] = admit_order(o, path, self.registry, now, forwarded=True)
                except ClearingError as e:
                    results[i] = payment_pb2.PaymentResult(
                        payment_id=o.payment_id, error=convert.error_to_pb(e)
                    )
            if admitted:
                owned = self.local.submit_orders(
                    list(admitted.values()), [paths[i] for i in admitted], request.received_zone
                )
                for i, r in zip(admitted, owned, strict=True):
                    results[i] = r
            return shard_pb2.SubmitOwnedResponse(results=results)

    def Lend(self, request: Any, context: grpc.ServicerContext) -> Any:
        with grpc_errors(context):
            if request.need_minor <= 0:
                raise InvalidArgument([FieldViolation("need_minor", "must be positive")])
            if not 0 <= request.for_shard < SHARD_COUNT:
                raise InvalidArgument([FieldViolation("for_shard", f"in 0..{SHARD_COUNT - 1}")])
            if request.for_epoch < 0:
                raise InvalidArgument([FieldViolation("for_epoch", "must not be negative")])
            granted = self.local.lend(
                request.participant_id,
                request.currency,
                request.for_shard,
                request.need_minor,
                request.for_epoch,
            )
            return shard_pb2.LendResponse(granted_minor=granted)

    def Repay(self, request: Any, context: grpc.ServicerContext) -> Any:
        with grpc_errors(context):
            violations = []
            if request.borrower_epoch < 0:
                violations.append(FieldViolation("borrower_epoch", "must not be negative"))
            if request.received_before_epoch_minor < 0:
                violations.append(
                    FieldViolation("received_before_epoch_minor", "must not be negative")
                )
            if request.returned_total_minor < 0 or (
                request.returned_total_minor == 0 and request.borrower_epoch <= 0
            ):
                violations.append(FieldViolation(
                    "returned_total_minor", "must be positive (or 0 with borrower_epoch set)"
                ))  # fmt: skip
            if not 0 <= request.from_shard < SHARD_COUNT:
                violations.append(FieldViolation("from_shard", f"in 0..{SHARD_COUNT - 1}"))
            if violations:
                raise InvalidArgument(violations)
            repaid = self.local.repay(
                request.participant_id, request.currency, request.from_shard,
                request.returned_total_minor,
                ReceivedBefore(request.borrower_epoch, request.received_before_epoch_minor)
                if request.borrower_epoch > 0 else None,
            )  # fmt: skip
            return shard_pb2.RepayResponse(repaid_total_minor=repaid)

    def GetOwned(self, request: Any, context: grpc.ServicerContext) -> Any:
        with grpc_errors(context):
            validate_batch_size(len(request.refs))
            refs = [(r.institution_id, r.payment_id) for r in request.refs]
            return shard_pb2.GetOwnedResponse(results=self.local.get(refs))


def _check_ref(institution_id: str, payment_id: str) -> None:
    violations = []
    if not is_valid_id(institution_id, PARTICIPANT_ID_LEN_MAX):
        violations.append(FieldViolation("institution_id", "not a valid id"))
    if not is_valid_id(payment_id, PAYMENT_ID_LEN_MAX):
        violations.append(FieldViolation("payment_id", "not a valid id"))
    if violations:
        raise InvalidArgument(violations)


def _check_batch(orders: list[Any]) -> None:
    institutions = {o.institution_id for o in orders}
    ids = [o.payment_id for o in orders]
    violations = []
    if len(institutions) > 1:
        violations.append(FieldViolation("orders", "all orders must share one institution_id"))
    if len(set(ids)) != len(ids):
        violations.append(FieldViolation("orders", "payment_ids must be distinct in a batch"))
    if violations:
        raise InvalidArgument(violations)


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    """Operators' RPCs over :class:`clearinghouse.switch.admin.AdminDomain`."""

    def __init__(self, admin: Any, on_change: Any, revocations: Revocations) -> None:
        self.admin = admin
        self.on_change = on_change
        self.revocations = revocations

    def _changed(self, p: Any) -> Any:
        self.on_change()
        return convert.participant_to_pb(p)

    def RegisterParticipant(self, request: Any, context: grpc.ServicerContext) -> Any:
        with grpc_errors(context):
            p = self.admin.register(convert.participant_from_pb(request.participant))
            return admin_pb2.RegisterParticipantResponse(participant=self._changed(p))

    def UpdateParticipant(self, request: Any, context: grpc.ServicerContext) -> Any:
        with grpc_errors(context):
            p = convert.participant_from_pb(request.participant)
            stored = self.admin.update(p, expected_version=p.version)
            return admin_pb2.UpdateParticipantResponse(participant=self._changed(stored))

    def SuspendParticipant(self, request: Any, context: grpc.ServicerContext) -> Any:
        with grpc_errors(context):
            p = self.admin.suspend(request.participant_id, request.reason)
            return admin_pb2.SuspendParticipantResponse(participant=self._changed(p))

    def ResumeParticipant(self, request: Any, context: grpc.ServicerContext) -> Any:
        with grpc_errors(context):
            p = self.admin.resume(request.participant_id, request.reason)
            return admin_pb2.ResumeParticipantResponse(participant=self._changed(p))

    def SetNetDebitCap(self, request: Any, context: grpc.ServicerContext) -> Any:
        with grpc_errors(context):
            p = self.admin.set_cap(
                request.participant_id, request.cap.currency, int(request.cap.amount_minor)
            )
            return admin_pb2.SetNetDebitCapResponse(participant=self._changed(p))

    def GetParticipant(self, request: Any, context: grpc.ServicerContext) -> Any:
        with grpc_errors(context):
            p = self.admin.get(request.participant_id)
            return admin_pb2.GetParticipantResponse(participant=convert.participant_to_pb(p))

    def ListParticipants(self, request: Any, context: grpc.ServicerContext) -> Any:
        with grpc_errors(context):
            kind = {1: ParticipantKind.INSTITUTION, 2: ParticipantKind.BANK}.get(request.kind)
            ps, token = self.admin.page(kind, request.page_size, request.page_token)
            return admin_pb2.ListParticipantsResponse(
                participants=[convert.participant_to_pb(p) for p in ps], next_page_token=token
            )

    def RevokeCertificate(self, request: Any, context: grpc.ServicerContext) -> Any:
        with grpc_errors(context):
            r = self.revocations.revoke(
                request.serial, request.identity, request.reason,
                by=Identity.of_caller(context), by_serial=caller_serial(context),
            )  # fmt: skip
            return admin_pb2.RevokeCertificateResponse(revoked=convert.revoked_to_pb(r))

    def ListRevokedCertificates(self, request: Any, context: grpc.ServicerContext) -> Any:
        with grpc_errors(context):
            page, token = self.revocations.page(request.page_size, request.page_token)
            return admin_pb2.ListRevokedCertificatesResponse(
                revoked=[convert.revoked_to_pb(r) for r in page], next_page_token=token
            )


class SettlementServicer(settlement_pb2_grpc.SettlementServiceServicer):
    """Operators' window RPCs over :mod:`clearinghouse.settlement`."""

    def __init__(self, windows: Any, node_id: str, clock: Callable[[], int]) -> None:
        self.windows = windows
        self.node_id = node_id
        self.clock = clock

    def CloseWindow(self, request: Any, context: grpc.ServicerContext) -> Any:
        with grpc_errors(context):
            violations = _text_violations("reason", request.reason, required=False)
            if request.window_id < 0:
                violations.insert(0, FieldViolation("window_id", "must not be negative"))
            if violations:
                raise InvalidArgument(violations)
            window_id, made = settlement.request_close(
                self.windows, self.node_id, self.clock(), request.window_id, request.reason
            )
            return settlement_pb2.CloseWindowResponse(window_id=window_id, requested_now=made)

    def ConfirmSettlement(self, request: Any, context: grpc.ServicerContext) -> Any:
        """SETTLED once, with the settlement system's reference: the same reference again
        is the same confirmation (``confirmed_now`` false), another one is ALREADY_EXISTS
        (a window is settled by one batch; the first reference stands)."""
        with grpc_errors(context):
            violations = _text_violations("reference", request.reference, required=True)
            if request.window_id <= 0:
                violations.insert(0, FieldViolation("window_id", "must be positive"))
            if violations:
                raise InvalidArgument(violations)
            window_id, reference = request.window_id, request.reference
            status = self.windows.status(window_id)
            if not status.events and window_id != self.windows.current():
                raise NotFound(f"no settlement window {window_id}", reason="WINDOW_NOT_FOUND")
            if status.state not in ("CLEARED", "SETTLED"):
                raise FailedPrecondition(
                    f"window {window_id} is {status.state}, not CLEARED",
                    reason="WINDOW_NOT_CLEARED",
                )
            made = status.state == "CLEARED" and self.windows.record(
                window_id, WindowEvent.SETTLED, self.clock(), self.node_id, reference
            )
            if not made:  # settled already, by this call's retry or by another
                settled = _settlement_reference(self.windows.status(window_id))
                if settled != reference:
                    raise AlreadyExists(
                        f"window {window_id} was settled with reference {settled!r}, not "
                        f"{reference!r}",
                        reason="SETTLEMENT_ALREADY_CONFIRMED",
                    )
            return settlement_pb2.ConfirmSettlementResponse(confirmed_now=made)


# A close's reason and a settlement's reference: kept with the window's event, shown to
# auditors; refused when longer (they were cut silently to this).
WINDOW_TEXT_CHARS_MAX = 200


def _text_violations(field: str, text: str, *, required: bool) -> list[FieldViolation]:
    if required and not text.strip():
        return [FieldViolation(field, "must not be empty")]
    if len(text) > WINDOW_TEXT_CHARS_MAX:
        return [FieldViolation(field, f"must be at most {WINDOW_TEXT_CHARS_MAX} characters")]
    if not text.isprintable():
        return [FieldViolation(field, "must be printable (no control characters)")]
    return []


def _settlement_reference(status: Any) -> str:
    return next((e.detail for e in status.events if e.event is WindowEvent.SETTLED), "")


def _window_summary(status: Any) -> Any:
    def ts(ev: WindowEvent) -> Any:
        at = status.at(ev)
        return convert.us_to_ts(at) if at is not None else None

    return audit_pb2.WindowSummary(
        window_id=status.window_id, state=status.state,
        closing_at=ts(WindowEvent.CLOSING), closed_at=ts(WindowEvent.CLOSED),
        cleared_at=ts(WindowEvent.CLEARED), settled_at=ts(WindowEvent.SETTLED),
        settlement_reference=_settlement_reference(status),
    )  # fmt: skip


def _entry_ref(e: Any) -> Any:
    return audit_pb2.LedgerEntryRef(
        shard=e.shard, epoch=e.epoch, seq=e.seq, kind=e.kind, payment_key=e.payment_key,
        body=e.body, prev_hash=e.prev_hash, entry_hash=e.entry_hash,
    )  # fmt: skip


def _does_not_verify(e: InvariantViolation) -> DataLoss:
    return DataLoss(f"the stored ledger does not verify: {e}")


class _LedgerChecked:
    """Wraps the audit domain: a chain that fails verification while being read is
    DATA_LOSS for the caller (the stored ledger is inconsistent), not an internal bug."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        fn = getattr(self._inner, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except InvariantViolation as e:
                raise _does_not_verify(e) from e

        return call


class AuditServicer(audit_pb2_grpc.AuditServiceServicer):
    """Auditors' read-only RPCs over :class:`clearinghouse.audit.service.AuditDomain`."""

    def __init__(
        self,
        audit: Any,
        router: Router,
        ledger: CassandraLedger,
        registered: Callable[[str], bool] | None = None,
    ) -> None:
        self.audit = _LedgerChecked(audit)
        self.router = router
        self.ledger = ledger
        # Whether a participant id was ever registered: the node's registry, then the
        # store for one registered since its last refresh. Default: the registry alone.
        self.registered = registered or (lambda pid: pid in self.audit.kinds())

    def _known(self, pid: str) -> None:
        """A participant that was never registered has nothing to show: said so (the same
        answer to every audit call naming one), rather than "no such payment" or an empty
        page, either of which would hide a typo in the id."""
        if not self.registered(pid):
            raise NotFound(f"no participant {pid!r} is registered", reason="PARTICIPANT_NOT_FOUND")

    def GetPaymentHistory(self, request: Any, context: grpc.ServicerContext) -> Any:
        with grpc_errors(context):
            _check_ref(request.institution_id, request.payment_id)
            self._known(request.institution_id)
            (r,) = self.router.get([(request.institution_id, request.payment_id)])
            if r.HasField("error"):
                raise RemoteError(r.error)
            entries, window = self.audit.payment_history(request.institution_id, request.payment_id)
            return audit_pb2.GetPaymentHistoryResponse(
                payment=r.payment, entries=[_entry_ref(e) for e in entries], window_id=window
            )

    def ListParticipantPayments(self, request: Any, context: grpc.ServicerContext) -> Any:
        with grpc_errors(context):
            pid = request.participant_id
            if is_valid_id(pid, PARTICIPANT_ID_LEN_MAX):  # else INVALID_ARGUMENT below
                self._known(pid)
            payments, token = _list_payments(
                self.router, self.ledger, request, request.participant_id, "participant_id"
            )
            return audit_pb2.ListParticipantPaymentsResponse(
                payments=payments, next_page_token=token
            )

    def ListWindows(self, request: Any, context: grpc.ServicerContext) -> Any:
        with grpc_errors(context):
            violations = []
            if request.page_size < 0:
                violations.append(FieldViolation("page_size", "must not be negative"))
            if request.before_window_id < 0:
                violations.append(FieldViolation("before_window_id", "must not be negative"))
            if violations:
                raise InvalidArgument(violations)
            size = min(request.page_size or 20, 200)
            page, next_before = self.audit.list_windows(size, request.before_window_id)
            return audit_pb2.ListWindowsResponse(
                windows=[_window_summary(w) for w in page], next_before_window_id=next_before
            )

    def GetWindow(self, request: Any, context: grpc.ServicerContext) -> Any:
        with grpc_errors(context):
            if request.window_id <= 0:
                raise InvalidArgument([FieldViolation("window_id", "must be positive")])
            status, stored = self.audit.window(request.window_id)
            out = audit_pb2.GetWindowResponse(summary=_window_summary(status))
            if stored is not None:
                c = WindowClearing.from_json(stored.clearing_json)
                out.merkle_root = stored.merkle_root
                out.clearing_json = stored.clearing_json
                out.clearing_digest = stored.clearing_digest
                for n in c.net_positions:
                    money = common_pb2.Money(amount_minor=n.net_minor, currency=n.currency)
                    out.net_positions.append(
                        audit_pb2.NetPosition(participant_id=n.participant_id, net_debit=money)
                    )
                for i in c.instructions:
                    money = common_pb2.Money(amount_minor=i.amount_minor, currency=i.currency)
                    out.instructions.append(
                        audit_pb2.SettlementInstruction(
                            from_account=i.from_account, to_account=i.to_account, amount=money
                        )
                    )
                out.entry_count, out.payment_count = c.entry_count, c.payments_decided
            return out

    def VerifyChains(self, request: Any, context: grpc.ServicerContext) -> Any:
        with grpc_errors(context):
            shards = list(request.shards)
            if any(not 0 <= s < SHARD_COUNT for s in shards):
                raise InvalidArgument([FieldViolation("shards", f"each in 0..{SHARD_COUNT - 1}")])
            if len(set(shards)) != len(shards):  # each names a whole chain to read
                raise InvalidArgument([FieldViolation("shards", "each shard at most once")])
            with heap.freed_afterwards():  # every chain named is read whole
                checks = self.audit.verify_chains(shards)
            return audit_pb2.VerifyChainsResponse(reports=[
                audit_pb2.ChainReport(shard=c.shard, ok=c.ok, entries=c.entries,
                                      head_seq=c.head_seq, head_hash=c.head_hash,
                                      problem=c.problem)
                for c in checks
            ])  # fmt: skip

    def GetInclusionProof(self, request: Any, context: grpc.ServicerContext) -> Any:
        with grpc_errors(context):
            _check_ref(request.institution_id, request.payment_id)
            if request.window_id < 0:
                raise InvalidArgument([FieldViolation("window_id", "must not be negative")])
            self._known(request.institution_id)
            with heap.freed_afterwards():  # the window is read whole
                p = self.audit.inclusion(
                    request.window_id, request.institution_id, request.payment_id
                )
            return audit_pb2.GetInclusionProofResponse(
                window_id=p.window_id, entry=_entry_ref(p.entry), leaf_index=p.leaf_index,
                tree_size=p.tree_size, audit_path=p.audit_path, merkle_root=p.merkle_root,
            )  # fmt: skip

    def CompareCities(self, request: Any, context: grpc.ServicerContext) -> Any:
        with grpc_errors(context):
            if request.window_id <= 0:
                raise InvalidArgument([FieldViolation("window_id", "must be positive")])
            with heap.freed_afterwards():  # the window is read from every city
                cmp = self.audit.compare_cities(request.window_id)
            return audit_pb2.CompareCitiesResponse(agree=cmp.agree, cities=[
                audit_pb2.CityDigest(city=v.city, merkle_root=v.merkle_root,
                                     entry_count=v.entry_count, differing_rows=diff[:1000],
                                     error=v.error)
                for v, diff in cmp.cities
            ])  # fmt: skip

    def ExportWindow(self, request: Any, context: grpc.ServicerContext) -> Any:
        if request.window_id <= 0:
            with grpc_errors(context):
                raise InvalidArgument([FieldViolation("window_id", "must be positive")])
        # Every check (the stored root, the stored clearing) runs before the first chunk,
        # so a refused export sends nothing; then each file is made and sent a chunk at a
        # time (a window's export can be hundreds of MiB: it is never held whole).
        chunks = self.audit.export(request.window_id)
        try:
            for path, data in chunks:
                yield audit_pb2.ExportWindowResponse(path=path, data=data)
        except InvariantViolation as e:  # the entries read do not verify (before any chunk)
            abort_with(context, convert.error_to_pb(_does_not_verify(e)))
        except ClearingError as e:
            abort_with(context, convert.error_to_pb(e))
        except Exception:
            log.exception("exporting window %d failed", request.window_id)
            context.abort(grpc.StatusCode.INTERNAL, "internal error; the node logged the details")
        finally:
            chunks.close()
            del chunks
            heap.release_free_memory()


def _list_payments(
    router: Router, ledger: CassandraLedger, request: Any, participant_id: str, field: str
) -> tuple[list[Any], str]:
    """One page of a participant's payments: the time index, then each from its owner."""
    if request.page_size < 0:
        raise InvalidArgument([FieldViolation("page_size", "must not be negative")])
    if not is_valid_id(participant_id, PARTICIPANT_ID_LEN_MAX):
        raise InvalidArgument([FieldViolation(field, "not a valid id")])
    times = [
        v
        for name in ("start_time", "end_time")
        for v in timestamp_violations(
            getattr(request, name).seconds, getattr(request, name).nanos, name
        )
    ]
    if times:
        raise InvalidArgument(times)
    size = list_page_rows(request.page_size)
    # Unset end: now; unset start: the longest span before the end (payment.proto).
    end_us = convert.ts_to_us(request.end_time) if request.HasField("end_time") else wall_clock_us()
    start_us = (
        convert.ts_to_us(request.start_time)
        if request.HasField("start_time")
        else end_us - LIST_DAYS_MAX * DAY_US
    )
    refs, token = ledger.list_index(
        participant_id,
        start_us,
        end_us,
        size,
        request.page_token,
    )
    results = router.get(refs)
    for r in results:
        if r.HasField("error") and r.error.code != grpc.StatusCode.NOT_FOUND.value[0]:
            raise Unavailable(
                f"could not read payment {r.payment_id!r}: {r.error.reason}",
                retry_after_ms=max(r.error.retry_after_ms, 500),
                reason=r.error.reason or "UNAVAILABLE",
            )
    # An index row without a payment was written by an owner whose commit was never
    # acknowledged: the payment does not exist.
    return [r.payment for r in results if r.HasField("payment")], token
