"""The gRPC layer: convert the message, call the domain, convert errors. Nothing else.

Every domain error leaves through :func:`grpc_errors`, which takes its status code from
the one table (``domain.errors.status_for``) and attaches a ``clearing.v1.Error`` in the
``clearing-error-bin`` trailer. Anything that is not a domain error is a bug: it is
logged with its stack and answered INTERNAL without details.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import grpc

from clearing.v1 import admin_pb2, admin_pb2_grpc, payment_pb2, payment_pb2_grpc
from clearinghouse.domain import (
    ClearingError,
    FieldViolation,
    InvalidArgument,
    ParticipantKind,
    status_for,
    validate_batch_size,
)
from clearinghouse.domain.errors import ERROR_METADATA_KEY
from clearinghouse.switch import convert
from clearinghouse.switch.processor import PaymentProcessor

log = logging.getLogger(__name__)


@contextmanager
def grpc_errors(context: grpc.ServicerContext) -> Iterator[None]:
    try:
        yield
    except ClearingError as e:
        err = convert.error_to_pb(e)
        context.set_trailing_metadata(((ERROR_METADATA_KEY, err.SerializeToString()),))
        detail = "; ".join(f"{v.field}: {v.description}" for v in err.field_violations)
        context.abort(status_for(e), f"{e.reason}: {detail or e}")
    except Exception:
        # A bug, not the client's doing: keep the details in the node's log.
        log.exception("internal error in %s", type(context).__name__)
        context.abort(grpc.StatusCode.INTERNAL, "internal error; the node logged the details")


class PaymentServicer(payment_pb2_grpc.PaymentServiceServicer):
    def __init__(self, processor: PaymentProcessor, batch_pool: ThreadPoolExecutor) -> None:
        self.processor = processor
        self.batch_pool = batch_pool

    def SubmitPayment(self, request: Any, context: grpc.ServicerContext) -> Any:
        with grpc_errors(context):
            result = self.processor.submit(convert.order_from_pb(request.order))
            return payment_pb2.SubmitPaymentResponse(
                payment=convert.payment_to_pb(result.record), replayed=result.replayed
            )

    def SubmitPayments(self, request: Any, context: grpc.ServicerContext) -> Any:
        with grpc_errors(context):
            orders = list(request.orders)
            validate_batch_size(len(orders))
            _check_batch(orders)
            futures = [
                self.batch_pool.submit(self._one, o, f"orders[{i}]") for i, o in enumerate(orders)
            ]
            return payment_pb2.SubmitPaymentsResponse(results=[f.result() for f in futures])

    def _one(self, order_pb: Any, path: str) -> payment_pb2.PaymentResult:
        try:
            result = self.processor.submit(convert.order_from_pb(order_pb, path))
        except ClearingError as e:
            return payment_pb2.PaymentResult(
                payment_id=order_pb.payment_id, error=convert.error_to_pb(e)
            )
        return payment_pb2.PaymentResult(
            payment_id=order_pb.payment_id,
            payment=convert.payment_to_pb(result.record),
            replayed=result.replayed,
        )

    def GetPayment(self, request: Any, context: grpc.ServicerContext) -> Any:
        with grpc_errors(context):
            rec = self.processor.get(request.institution_id, request.payment_id)
            return payment_pb2.GetPaymentResponse(payment=convert.payment_to_pb(rec))

    def ListPayments(self, request: Any, context: grpc.ServicerContext) -> Any:
        with grpc_errors(context):
            if request.page_size < 0:
                raise InvalidArgument([FieldViolation("page_size", "must not be negative")])
            page = self.processor.list(
                request.institution_id,
                convert.ts_to_us(request.start_time),
                convert.ts_to_us(request.end_time),
                request.page_size,
                request.page_token,
            )
            return payment_pb2.ListPaymentsResponse(
                payments=[convert.payment_to_pb(r) for r in page.records],
                next_page_token=page.next_token,
            )


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
