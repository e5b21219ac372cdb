"""The gRPC layer: convert the message, call the domain, convert errors. Nothing else.

Every domain error leaves through :func:`grpc_errors`, which takes its status code from
the one table (``domain.errors.status_for``) and attaches a ``clearing.v1.Error`` in the
``clearing-error-bin`` trailer. Anything that is not a domain error is a bug: it is
logged with its stack and answered INTERNAL without details.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc

from clearing.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    common_pb2,
    payment_pb2,
    payment_pb2_grpc,
    shard_pb2,
    shard_pb2_grpc,
)
from clearinghouse.domain import (
    PAYMENT_ID_LEN_MAX,
    ClearingError,
    FieldViolation,
    InvalidArgument,
    ParticipantKind,
    Unavailable,
    validate_batch_size,
)
from clearinghouse.domain.errors import ERROR_METADATA_KEY
from clearinghouse.domain.validation import PARTICIPANT_ID_LEN_MAX, is_valid_id
from clearinghouse.storage.ledger import CassandraLedger
from clearinghouse.switch import convert
from clearinghouse.switch.routing import FORWARD_DEADLINE_S, LocalOwner, Router

LIST_PAGE_SIZE_MAX = 500
LIST_PAGE_SIZE_DEFAULT = 100

log = logging.getLogger(__name__)


@contextmanager
def grpc_errors(context: grpc.ServicerContext) -> Iterator[None]:
    try:
        yield
    except ClearingError as e:
        abort_with(context, convert.error_to_pb(e))
    except Exception:
        # A bug, not the client's doing: keep the details in the node's log.
        log.exception("internal error in %s", type(context).__name__)
        context.abort(grpc.StatusCode.INTERNAL, "internal error; the node logged the details")


def abort_with(context: grpc.ServicerContext, err: common_pb2.Error) -> None:
    """End the call with ``err``: its code, and the whole error in the trailer."""
    context.set_trailing_metadata(((ERROR_METADATA_KEY, err.SerializeToString()),))
    detail = "; ".join(f"{v.field}: {v.description}" for v in err.field_violations)
    context.abort(grpc.StatusCode(_CODES[err.code]), f"{err.reason}: {detail or err.message}")


_CODES = {c.value[0]: c.value for c in grpc.StatusCode}


def _time_left_s(context: grpc.ServicerContext) -> float:
    left = context.time_remaining()
    return FORWARD_DEADLINE_S if left is None else max(0.0, left)


class PaymentServicer(payment_pb2_grpc.PaymentServiceServicer):
    """Participants' RPCs: each payment goes to its shard's owner through the router."""

    def __init__(self, router: Router, ledger: CassandraLedger) -> None:
        self.router = router
        self.ledger = ledger

    def SubmitPayment(self, request: Any, context: grpc.ServicerContext) -> Any:
        with grpc_errors(context):
            convert.order_from_pb(request.order)  # a malformed order is refused here
            (r,) = self.router.submit([request.order], ["order"], _time_left_s(context))
        if r.HasField("error"):
            abort_with(context, r.error)
        return payment_pb2.SubmitPaymentResponse(payment=r.payment, replayed=r.replayed)

    def SubmitPayments(self, request: Any, context: grpc.ServicerContext) -> Any:
        with grpc_errors(context):
            orders = list(request.orders)
            validate_batch_size(len(orders))
            _check_batch(orders)
            paths = [f"orders[{i}]" for i in range(len(orders))]
            results = self.router.submit(orders, paths, _time_left_s(context))
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
            if request.page_size < 0:
                raise InvalidArgument([FieldViolation("page_size", "must not be negative")])
            if not is_valid_id(request.institution_id, PARTICIPANT_ID_LEN_MAX):
                raise InvalidArgument([FieldViolation("institution_id", "not a valid id")])
            size = min(request.page_size or LIST_PAGE_SIZE_DEFAULT, LIST_PAGE_SIZE_MAX)
            ids, token = self.ledger.list_index(
                request.institution_id,
                convert.ts_to_us(request.start_time),
                convert.ts_to_us(request.end_time),
                size,
                request.page_token,
            )
            results = self.router.get([(request.institution_id, pid) for pid in ids])
            for r in results:
                if r.HasField("error") and r.error.reason != "NOT_FOUND":
                    raise Unavailable(
                        f"could not read payment {r.payment_id!r}: {r.error.reason}",
                        retry_after_ms=max(r.error.retry_after_ms, 500),
                        reason=r.error.reason or "UNAVAILABLE",
                    )
            # An index row without a payment was written by an owner whose commit was
            # never acknowledged: the payment does not exist.
            return payment_pb2.ListPaymentsResponse(
                payments=[r.payment for r in results if r.HasField("payment")],
                next_page_token=token,
            )


class ShardServicer(shard_pb2_grpc.ShardServiceServicer):
    """Node to node: what another node forwards to this node as the shards' owner."""

    def __init__(self, local: LocalOwner, describe: Callable[[], Any]) -> None:
        self.local = local
        self.describe = describe

    def Describe(self, request: Any, context: grpc.ServicerContext) -> Any:
        with grpc_errors(context):
            return self.describe()

    def SubmitOwned(self, request: Any, context: grpc.ServicerContext) -> Any:
        with grpc_errors(context):
            validate_batch_size(len(request.orders))
            paths = list(request.paths) or [f"orders[{i}]" for i in range(len(request.orders))]
            if len(paths) != len(request.orders):
                raise InvalidArgument([FieldViolation("paths", "one path per order")])
            results = self.local.submit(request.orders, paths, request.received_zone)
            return shard_pb2.SubmitOwnedResponse(results=results)

    def Lend(self, request: Any, context: grpc.ServicerContext) -> Any:
        with grpc_errors(context):
            if request.need_minor <= 0:
                raise InvalidArgument([FieldViolation("need_minor", "must be positive")])
            granted = self.local.lend(
                request.participant_id, request.currency, request.for_shard, request.need_minor
            )
            return shard_pb2.LendResponse(granted_minor=granted)

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

    def __init__(self, admin: Any, on_change: Any) -> None:
        self.admin = admin
        self.on_change = on_change

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
            ps = self.admin.list(kind)
            return admin_pb2.ListParticipantsResponse(
                participants=[convert.participant_to_pb(p) for p in ps]
            )
