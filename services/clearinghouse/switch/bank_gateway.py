"""Calls to banks over gRPC, each under a deadline; answers become :class:`BankOutcome`.

A channel per bank (id and endpoint) is opened once and reused. It accepts only a server
certificate naming that bank (``bank:<participant_id>``, :func:`pki.expect_server`): any
other certificate of the switch's CA on the bank's address (another bank's, a node's)
fails the handshake. A bank that does not answer in time, cannot be reached, or is not
who it should be is ``NO_ANSWER``: the transfer's fate is unknown and the processor
resolves it by inquiry and reversal, never by sending the transfer again.
"""

from __future__ import annotations

import logging
import threading

import grpc

from clearing.v1 import bank_pb2, bank_pb2_grpc, common_pb2
from clearinghouse import telemetry
from clearinghouse.domain import Participant, PaymentType
from clearinghouse.security import pki
from clearinghouse.security.identity import Identity, Role
from clearinghouse.switch.ports import BankAnswer, BankOutcome, BankTransfer

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 1 << 20
_ANSWERS = {
    bank_pb2.BANK_TXN_STATUS_APPROVED: BankAnswer.APPROVED,
    bank_pb2.BANK_TXN_STATUS_DECLINED: BankAnswer.DECLINED,
    bank_pb2.BANK_TXN_STATUS_REVERSED: BankAnswer.REVERSED,
    bank_pb2.BANK_TXN_STATUS_UNKNOWN_REF: BankAnswer.UNKNOWN_REF,
}


class GrpcBankGateway:
    def __init__(self, credentials: grpc.ChannelCredentials) -> None:
        # The node's own certificate: banks serve the switch's nodes only.
        self._credentials = credentials
        self._lock = threading.Lock()
        self._stubs: dict[tuple[str, str], bank_pb2_grpc.BankServiceStub] = {}
        self._channels: list[grpc.Channel] = []

    def _stub(self, bank: Participant) -> bank_pb2_grpc.BankServiceStub:
        """The bank's stub; ValueError if its id cannot name a certificate."""
        endpoint = bank.endpoint or ""
        key = (bank.participant_id, endpoint)
        with self._lock:
            stub = self._stubs.get(key)
            if stub is None:
                expected = Identity(Role.BANK, bank.participant_id)  # ValueError if it cannot
                channel = grpc.secure_channel(
                    endpoint,
                    self._credentials,
                    options=[
                        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                        # Only this bank's certificate, whoever else listens there.
                        *pki.expect_server(expected),
                    ],
                )
                tel = telemetry.current()
                if tel is not None:
                    channel = tel.intercept_channel(channel)  # the trace goes to the bank
                self._channels.append(channel)
                stub = bank_pb2_grpc.BankServiceStub(channel)
                self._stubs[key] = stub
            return stub

    def close(self) -> None:
        with self._lock:
            for c in self._channels:
                c.close()
            self._channels.clear()
            self._stubs.clear()

    def transfer(self, bank: Participant, req: BankTransfer, deadline_s: float) -> BankOutcome:
        msg = bank_pb2.BankTransferRequest(
            switch_ref=req.switch_ref,
            institution_id=req.institution_id,
            bank_account=req.account,
            amount=common_pb2.Money(
                amount_minor=req.amount.amount_minor, currency=req.amount.currency
            ),
        )
        try:
            stub = self._stub(bank)
            call = stub.Debit if req.kind is PaymentType.DEBIT else stub.Credit
            resp = call(msg, timeout=deadline_s)
        except (grpc.RpcError, ValueError) as e:
            return _no_answer(bank, "transfer", e)
        return BankOutcome(
            _ANSWERS.get(resp.status, BankAnswer.NO_ANSWER), resp.bank_ref, resp.decline_code
        )

    def inquire(self, bank: Participant, switch_ref: str, deadline_s: float) -> BankOutcome:
        try:
            resp = self._stub(bank).Inquire(
                bank_pb2.InquireRequest(switch_ref=switch_ref), timeout=deadline_s
            )
        except (grpc.RpcError, ValueError) as e:
            return _no_answer(bank, "inquiry", e)
        return BankOutcome(
            _ANSWERS.get(resp.status, BankAnswer.NO_ANSWER), resp.bank_ref, resp.decline_code
        )

    def reverse(
        self, bank: Participant, switch_ref: str, reason: str, deadline_s: float
    ) -> BankOutcome:
        try:
            resp = self._stub(bank).Reverse(
                bank_pb2.ReverseRequest(switch_ref=switch_ref, reason=reason), timeout=deadline_s
            )
        except (grpc.RpcError, ValueError) as e:
            return _no_answer(bank, "reversal", e)
        return BankOutcome(_ANSWERS.get(resp.status, BankAnswer.NO_ANSWER), "", "")


def _no_answer(bank: Participant, what: str, e: Exception) -> BankOutcome:
    code = e.code() if isinstance(e, grpc.Call) else None
    name = code.name if code is not None else type(e).__name__
    # A bank presenting another identity's certificate fails the handshake: UNAVAILABLE,
    # with the reason in the details.
    details = e.details() if isinstance(e, grpc.Call) else str(e)
    log.warning("bank %s: %s got no answer (%s: %s)", bank.participant_id, what, name, details)
    return BankOutcome(BankAnswer.NO_ANSWER, "", f"{what}: {name}")
