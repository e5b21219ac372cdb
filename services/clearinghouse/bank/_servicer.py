"""The gRPC face of the simulated bank: validation, drills, and translation to the book.

The servicer holds no state of its own. It checks the drill switches (outage, hang),
validates the request, waits out the simulated latency, asks the :class:`BankLedger`,
and maps the answer, or the refusal, to protobuf.
"""

from __future__ import annotations

import logging
import re
import time
from typing import NoReturn

import grpc

from clearing.v1 import bank_pb2, bank_pb2_grpc, common_pb2
from clearinghouse.bank._behaviour import BankBehaviour, BankControls, TransferKind
from clearinghouse.bank._ledger import (
    BankLedger,
    SwitchRefReused,
    Transfer,
    TransferAnswer,
    TxnRecord,
    TxnStatus,
)
from clearinghouse.domain.errors import ERROR_METADATA_KEY

_log = logging.getLogger(__name__)

# What an outage tells the caller about when to try again, in milliseconds.
OUTAGE_RETRY_AFTER_MS = 1_000
# How often a hanging request looks whether its caller gave up or the server stops.
HANG_POLL_INTERVAL_S = 0.05
MAX_REF_CHARS = 64
MAX_ID_CHARS = 64
MAX_BANK_ACCOUNT_CHARS = 64
# Items of one Transfers call (bank.proto).
TRANSFERS_ITEMS_MAX = 1000

_REF_PATTERN = re.compile(rf"[A-Za-z0-9._:-]{{1,{MAX_REF_CHARS}}}")
_CURRENCY_PATTERN = re.compile(r"[A-Z]{3}")

_DIRECTIONS = {
    bank_pb2.TRANSFER_DIRECTION_DEBIT: TransferKind.DEBIT,
    bank_pb2.TRANSFER_DIRECTION_CREDIT: TransferKind.CREDIT,
}

_STATUS_TO_PROTO = {
    TxnStatus.APPROVED: bank_pb2.BANK_TXN_STATUS_APPROVED,
    TxnStatus.DECLINED: bank_pb2.BANK_TXN_STATUS_DECLINED,
    TxnStatus.REVERSED: bank_pb2.BANK_TXN_STATUS_REVERSED,
}


def _abort(
    context: grpc.ServicerContext,
    code: grpc.StatusCode,
    reason: str,
    message: str,
    *,
    violations: list[common_pb2.FieldViolation] | None = None,
    retry_after_ms: int = 0,
) -> NoReturn:
    """End the call with ``code``, carrying a clearing.v1.Error in the trailers."""
    error = common_pb2.Error(
        code=code.value[0],
        reason=reason,
        message=message,
        field_violations=violations or [],
        retry_after_ms=retry_after_ms,
    )
    context.set_trailing_metadata(((ERROR_METADATA_KEY, error.SerializeToString()),))
    context.abort(code, message)


def _violation(field: str, description: str) -> common_pb2.FieldViolation:
    return common_pb2.FieldViolation(field=field, description=description)


def _check_ref(switch_ref: str) -> list[common_pb2.FieldViolation]:
    if _REF_PATTERN.fullmatch(switch_ref):
        return []
    return [_violation("switch_ref", f"must be 1 to {MAX_REF_CHARS} of [A-Za-z0-9._:-]")]


def _check_transfer(request: bank_pb2.BankTransferRequest) -> list[common_pb2.FieldViolation]:
    violations = _check_ref(request.switch_ref)
    if not 0 < len(request.institution_id) <= MAX_ID_CHARS:
        violations.append(_violation("institution_id", f"must be 1 to {MAX_ID_CHARS} characters"))
    if not 0 < len(request.bank_account) <= MAX_BANK_ACCOUNT_CHARS:
        violations.append(
            _violation("bank_account", f"must be 1 to {MAX_BANK_ACCOUNT_CHARS} characters")
        )
    if request.amount.amount_minor <= 0:
        violations.append(_violation("amount.amount_minor", "must be positive"))
    if not _CURRENCY_PATTERN.fullmatch(request.amount.currency):
        violations.append(_violation("amount.currency", "must be an ISO 4217 code in upper case"))
    return violations


class BankServicer(bank_pb2_grpc.BankServiceServicer):
    """BankService for one simulated bank."""

    def __init__(self, ledger: BankLedger, controls: BankControls) -> None:
        self._ledger = ledger
        self._controls = controls

    # ---- BankService ----------------------------------------------------------------

    def Debit(
        self, request: bank_pb2.BankTransferRequest, context: grpc.ServicerContext
    ) -> bank_pb2.BankTransferResponse:
        return self._transfer(TransferKind.DEBIT, request, context)

    def Credit(
        self, request: bank_pb2.BankTransferRequest, context: grpc.ServicerContext
    ) -> bank_pb2.BankTransferResponse:
        return self._transfer(TransferKind.CREDIT, request, context)

    def Inquire(
        self, request: bank_pb2.InquireRequest, context: grpc.ServicerContext
    ) -> bank_pb2.InquireResponse:
        behaviour = self._admit(context, _check_ref(request.switch_ref))
        record = self._ledger.inquire(request.switch_ref)
        if behaviour.hang_all:
            self._hang(context, behaviour)
        if record is None:
            return bank_pb2.InquireResponse(status=bank_pb2.BANK_TXN_STATUS_UNKNOWN_REF)
        return bank_pb2.InquireResponse(
            status=_STATUS_TO_PROTO[record.status],
            bank_ref=record.bank_ref,
            decline_code=record.decline_code,
        )

    def Reverse(
        self, request: bank_pb2.ReverseRequest, context: grpc.ServicerContext
    ) -> bank_pb2.ReverseResponse:
        behaviour = self._admit(context, _check_ref(request.switch_ref))
        record = self._ledger.reverse(request.switch_ref, request.reason)
        _log.debug("reverse %s (%s): %s", request.switch_ref, request.reason, record.status)
        if behaviour.hang_all:
            self._hang(context, behaviour)
        return bank_pb2.ReverseResponse(status=_STATUS_TO_PROTO[record.status])

    def Transfers(
        self, request: bank_pb2.TransfersRequest, context: grpc.ServicerContext
    ) -> bank_pb2.TransfersResponse:
        """Several transfers at once: one admission and one simulated latency for the
        call, then each item as Debit or Credit would take it alone. An item drawn as a
        late answer is applied and answered PENDING (the switch asks Inquire)."""
        n = len(request.items)
        size = (
            []
            if 0 < n <= TRANSFERS_ITEMS_MAX
            else [_violation("items", f"must hold 1 to {TRANSFERS_ITEMS_MAX} transfers")]
        )
        behaviour = self._admit(context, size)
        results = [self._one_of_many(item, behaviour) for item in request.items]
        if behaviour.hang_all:
            self._hang(context, behaviour)
        return bank_pb2.TransfersResponse(results=results)

    def _one_of_many(
        self, item: bank_pb2.TransferItem, behaviour: BankBehaviour
    ) -> bank_pb2.TransferResult:
        request = item.transfer
        kind = _DIRECTIONS.get(item.direction)
        violations = _check_transfer(request)
        if kind is None:
            violations.append(_violation("direction", "must be DEBIT or CREDIT"))
        if violations or kind is None:
            fields = ", ".join(v.field for v in violations)
            return bank_pb2.TransferResult(
                switch_ref=request.switch_ref,
                error=common_pb2.Error(
                    code=grpc.StatusCode.INVALID_ARGUMENT.value[0],
                    reason="INVALID_ARGUMENT",
                    message=f"invalid fields: {fields}",
                    field_violations=violations,
                ),
            )
        try:
            answer = self._apply(kind, request, behaviour)
        except SwitchRefReused as exc:
            return bank_pb2.TransferResult(
                switch_ref=request.switch_ref,
                error=common_pb2.Error(
                    code=grpc.StatusCode.ALREADY_EXISTS.value[0],
                    reason="SWITCH_REF_REUSED",
                    message=str(exc),
                ),
            )
        if self._controls.draw_timeout(behaviour):
            return bank_pb2.TransferResult(
                switch_ref=request.switch_ref, status=bank_pb2.BANK_TXN_STATUS_PENDING
            )
        record = answer.record
        return bank_pb2.TransferResult(
            switch_ref=request.switch_ref,
            status=_STATUS_TO_PROTO[record.status],
            bank_ref=record.bank_ref,
            decline_code=record.decline_code,
        )

    # ---- steps ----------------------------------------------------------------------

    def _transfer(
        self,
        kind: TransferKind,
        request: bank_pb2.BankTransferRequest,
        context: grpc.ServicerContext,
    ) -> bank_pb2.BankTransferResponse:
        behaviour = self._admit(context, _check_transfer(request))
        try:
            answer = self._apply(kind, request, behaviour)
        except SwitchRefReused as exc:
            _abort(context, grpc.StatusCode.ALREADY_EXISTS, "SWITCH_REF_REUSED", str(exc))
        record = answer.record
        _log.debug(
            "%s %s: %s%s", kind, request.switch_ref, record.status, " (repeat)" * answer.replayed
        )
        # The timeout drill applies the transfer first and only then withholds the
        # answer: the caller sees a deadline, yet the money moved, which is the case the
        # switch must resolve by inquiry.
        if behaviour.hang_all or self._controls.draw_timeout(behaviour):
            self._hang(context, behaviour)
        return _transfer_response(record)

    def _apply(
        self, kind: TransferKind, request: bank_pb2.BankTransferRequest, behaviour: BankBehaviour
    ) -> TransferAnswer:
        """Apply the transfer to the bank's book (idempotent on ``switch_ref``);
        SwitchRefReused if the ref names another transfer."""
        transfer = Transfer(
            kind=kind,
            institution_id=request.institution_id,
            bank_account=request.bank_account,
            amount_minor=request.amount.amount_minor,
            currency=request.amount.currency,
        )
        return self._ledger.transfer(
            request.switch_ref, transfer, behaviour.decide(kind, request.switch_ref)
        )

    def _admit(
        self, context: grpc.ServicerContext, violations: list[common_pb2.FieldViolation]
    ) -> BankBehaviour:
        """Refuse the call if the bank is down or the request invalid, then wait out
        the simulated latency. Returns the behaviour to use for the rest of the call."""
        behaviour = self._controls.behaviour
        if behaviour.outage:
            _abort(
                context,
                grpc.StatusCode.UNAVAILABLE,
                "BANK_OUTAGE",
                "the bank is unavailable (simulated outage)",
                retry_after_ms=OUTAGE_RETRY_AFTER_MS,
            )
        if violations:
            fields = ", ".join(v.field for v in violations)
            _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "INVALID_ARGUMENT",
                f"invalid fields: {fields}",
                violations=violations,
            )
        latency_s = self._controls.draw_latency_s(behaviour)
        if latency_s > 0 and self._controls.stopping.wait(latency_s):
            self._abort_stopping(context)
        return behaviour

    def _hang(self, context: grpc.ServicerContext, behaviour: BankBehaviour) -> None:
        """Withhold the answer for hang_ms. The wait ends early when the caller gives
        up (its deadline passed, so nobody reads the answer, and holding a worker
        thread longer would only starve other calls) or when the server stops."""
        end = time.monotonic() + behaviour.hang_ms / 1000.0
        while (remaining_s := end - time.monotonic()) > 0:
            if self._controls.stopping.wait(min(HANG_POLL_INTERVAL_S, remaining_s)):
                self._abort_stopping(context)
            if not context.is_active():
                return

    @staticmethod
    def _abort_stopping(context: grpc.ServicerContext) -> NoReturn:
        _abort(
            context,
            grpc.StatusCode.UNAVAILABLE,
            "BANK_SHUTTING_DOWN",
            "the bank is shutting down",
            retry_after_ms=OUTAGE_RETRY_AFTER_MS,
        )


def _transfer_response(record: TxnRecord) -> bank_pb2.BankTransferResponse:
    return bank_pb2.BankTransferResponse(
        status=_STATUS_TO_PROTO[record.status],
        bank_ref=record.bank_ref,
        decline_code=record.decline_code,
    )
