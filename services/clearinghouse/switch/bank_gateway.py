"""Calls to banks over gRPC, each under a deadline; answers become :class:`BankOutcome`.

A channel per bank (id and endpoint) is opened once and reused. It accepts only a server
certificate naming that bank (``bank:<participant_id>``, :func:`pki.expect_server`): any
other certificate of the switch's CA on the bank's address (another bank's, a node's)
fails the handshake. A bank that does not answer in time, cannot be reached, or is not
who it should be is ``NO_ANSWER``: the transfer's fate is unknown and the processor
resolves it by inquiry and reversal, never by sending the transfer again.

Transfers leave through one :class:`BankQueue` per bank: whatever transfers this node's
threads ask of a bank meanwhile go out together in one ``Transfers`` call (a batch of
one when the node is idle), so a busy node pays one gRPC call per batch, not one per
payment. Inquiries and reversals, rare and urgent, are calls of their own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from clearing.v1 import bank_pb2, bank_pb2_grpc, common_pb2
from clearinghouse import telemetry
from clearinghouse._invariant import invariant
from clearinghouse.domain import Participant, PaymentType
from clearinghouse.security import pki
from clearinghouse.security.identity import Identity, Role
from clearinghouse.switch.ports import BankAnswer, BankOutcome, BankTransfer

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 1 << 20
# Transfers to one bank per Transfers call (the bank takes up to 1,000).
BANK_BATCH_ITEMS_MAX = 500
# Calls in flight to one bank at once from this node.
BANK_SENDERS_MAX = 4
# Transfers waiting for one bank; beyond it a transfer is NO_ANSWER at once (never sent).
BANK_QUEUE_ITEMS_MAX = 20_000
# A transfer with less time than this left is not sent.
BANK_CALL_MIN_S = 0.05
# A waiting thread gives its batch this long past the deadline to come back.
BANK_ANSWER_GRACE_S = 0.5
# An idle sender thread ends after this long.
BANK_SENDER_IDLE_S = 10.0
_DIRECTIONS = {
    PaymentType.DEBIT: bank_pb2.TRANSFER_DIRECTION_DEBIT,
    PaymentType.CREDIT: bank_pb2.TRANSFER_DIRECTION_CREDIT,
}
_ANSWERS = {
    bank_pb2.BANK_TXN_STATUS_APPROVED: BankAnswer.APPROVED,
    bank_pb2.BANK_TXN_STATUS_DECLINED: BankAnswer.DECLINED,
    bank_pb2.BANK_TXN_STATUS_REVERSED: BankAnswer.REVERSED,
    bank_pb2.BANK_TXN_STATUS_UNKNOWN_REF: BankAnswer.UNKNOWN_REF,
}


@dataclass
class _Queued:
    req: BankTransfer
    deadline: float  # time.monotonic()
    done: threading.Event = field(default_factory=threading.Event)
    outcome: BankOutcome | None = None


class BankQueue:
    """Transfers to one bank, sent in batches as they come ("smart batching").

    A thread that asks for transfers queues them and waits. Up to
    :data:`BANK_SENDERS_MAX` sender threads each take what is queued (at most
    :data:`BANK_BATCH_ITEMS_MAX`) and send it as one Transfers call, with the earliest
    deadline among them. Nothing waits for a batch to fill: a lone transfer leaves at
    once, and while calls are in flight the next ones gather what arrives meanwhile. A
    transfer whose deadline passed while queued is answered NO_ANSWER without being
    sent (so it is never applied late).
    """

    def __init__(self, send: Callable[[Sequence[BankTransfer], float], list[BankOutcome]]) -> None:
        self._send = send
        self._cond = threading.Condition()
        self._queue: deque[_Queued] = deque()
        self._idle = 0
        self._senders = 0
        self._closed = False

    def transfer_many(self, reqs: Sequence[BankTransfer], deadline_s: float) -> list[BankOutcome]:
        deadline = time.monotonic() + deadline_s
        items = [_Queued(r, deadline) for r in reqs]
        with self._cond:
            if self._closed:
                return [BankOutcome(BankAnswer.NO_ANSWER, "", "switch node stopping")] * len(reqs)
            if len(self._queue) + len(items) > BANK_QUEUE_ITEMS_MAX:
                return [BankOutcome(BankAnswer.NO_ANSWER, "", "bank queue full")] * len(reqs)
            self._queue.extend(items)
            if self._idle:
                self._cond.notify()
            elif self._senders < BANK_SENDERS_MAX:
                sender = threading.Thread(target=self._sender, name="bank-sender", daemon=True)
                sender.start()  # counted once started: a failed start leaks nothing
                self._senders += 1
        for it in items:
            it.done.wait(max(0.0, it.deadline - time.monotonic()) + BANK_ANSWER_GRACE_S)
        return [
            it.outcome or BankOutcome(BankAnswer.NO_ANSWER, "", "transfer: no answer in time")
            for it in items
        ]

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _take(self) -> list[_Queued]:
        with self._cond:
            while not self._queue and not self._closed:
                self._idle += 1
                woke = self._cond.wait(BANK_SENDER_IDLE_S)
                self._idle -= 1
                if not woke and not self._queue:
                    break
            n = min(len(self._queue), BANK_BATCH_ITEMS_MAX)
            batch = [self._queue.popleft() for _ in range(n)]
            if not batch:
                self._senders -= 1
            return batch

    def _sender(self) -> None:
        while batch := self._take():
            now = time.monotonic()
            live = []
            for it in batch:
                if it.deadline - now >= BANK_CALL_MIN_S:
                    live.append(it)
                else:
                    it.outcome = BankOutcome(BankAnswer.NO_ANSWER, "", "deadline passed in queue")
                    it.done.set()
            if not live:
                continue
            timeout = min(it.deadline for it in live) - now
            try:
                outcomes = self._send([it.req for it in live], timeout)
                invariant(len(outcomes) == len(live), "one outcome per transfer sent")
            except Exception:  # a bug: the items get no answer, the sender lives on
                log.exception("sending transfers failed")
                failed = BankOutcome(BankAnswer.NO_ANSWER, "", "transfer: send failed")
                outcomes = [failed] * len(live)
            for it, out in zip(live, outcomes, strict=True):
                it.outcome = out
                it.done.set()


class GrpcBankGateway:
    def __init__(self, credentials: grpc.ChannelCredentials) -> None:
        # The node's own certificate: banks serve the switch's nodes only.
        self._credentials = credentials
        self._lock = threading.Lock()
        self._stubs: dict[tuple[str, str], bank_pb2_grpc.BankServiceStub] = {}
        self._channels: list[grpc.Channel] = []
        self._queues: dict[tuple[str, str], BankQueue] = {}
        # Banks that answered Transfers UNIMPLEMENTED: sent one Debit or Credit each.
        self._one_by_one: set[str] = set()
        self._closed = False

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
            self._closed = True
            for q in self._queues.values():
                q.close()
            self._queues.clear()
            for c in self._channels:
                c.close()
            self._channels.clear()
            self._stubs.clear()

    def transfer_many(
        self, bank: Participant, reqs: Sequence[BankTransfer], deadline_s: float
    ) -> list[BankOutcome]:
        """Several transfers to one bank, through its queue: they leave in as few
        Transfers calls as the queue makes of them with what other threads sent."""
        q = self._queue(bank)
        if q is None:  # the node is stopping
            return [BankOutcome(BankAnswer.NO_ANSWER, "", "switch node stopping")] * len(reqs)
        return q.transfer_many(reqs, deadline_s)

    def transfer(self, bank: Participant, req: BankTransfer, deadline_s: float) -> BankOutcome:
        """One transfer, through the bank's queue (see :class:`BankQueue`)."""
        (out,) = self.transfer_many(bank, [req], deadline_s)
        return out

    def _queue(self, bank: Participant) -> BankQueue | None:
        """The bank's queue; None once the gateway is closed."""
        key = (bank.participant_id, bank.endpoint or "")
        with self._lock:
            if self._closed:
                return None
            q = self._queues.get(key)
            if q is None:
                q = BankQueue(lambda items, timeout: self._send(bank, items, timeout))
                self._queues[key] = q
            return q

    def _send(
        self, bank: Participant, reqs: Sequence[BankTransfer], timeout_s: float
    ) -> list[BankOutcome]:
        """One Transfers call; every item without an answer is NO_ANSWER (the processor
        asks Inquire for it, never sends it again)."""
        try:
            stub = self._stub(bank)
        except ValueError as e:
            return [BankOutcome(BankAnswer.NO_ANSWER, "", f"transfer: {e}")] * len(reqs)
        if bank.participant_id in self._one_by_one:
            return self._send_one_by_one(stub, bank, reqs, timeout_s)
        request = bank_pb2.TransfersRequest(
            items=[
                bank_pb2.TransferItem(direction=_DIRECTIONS[r.kind], transfer=_transfer_pb(r))
                for r in reqs
            ]
        )
        try:
            resp = stub.Transfers(request, timeout=timeout_s)
        except grpc.RpcError as e:
            if isinstance(e, grpc.Call) and e.code() is grpc.StatusCode.UNIMPLEMENTED:
                # A bank without the batch call: nothing was applied; one call each.
                log.warning("bank %s has no Transfers: one call per transfer", bank.participant_id)
                self._one_by_one.add(bank.participant_id)
                return self._send_one_by_one(stub, bank, reqs, timeout_s)
            return [_no_answer(bank, "transfer", e)] * len(reqs)
        by_ref = {r.switch_ref: r for r in resp.results}
        out = []
        for r in reqs:
            got = by_ref.get(r.switch_ref)
            if got is None or got.HasField("error"):
                why = got.error.reason if got is not None else "missing from the answer"
                out.append(BankOutcome(BankAnswer.NO_ANSWER, "", f"transfer: {why}"))
            else:
                out.append(_answered(got.status, got.bank_ref, got.decline_code))
        return out

    def _send_one_by_one(
        self, stub: Any, bank: Participant, reqs: Sequence[BankTransfer], timeout_s: float
    ) -> list[BankOutcome]:
        """Each transfer as its own Debit or Credit, all within ``timeout_s``."""
        until = time.monotonic() + timeout_s
        out = []
        for r in reqs:
            left = until - time.monotonic()
            if left < BANK_CALL_MIN_S:
                out.append(BankOutcome(BankAnswer.NO_ANSWER, "", "transfer: not sent in time"))
                continue
            call = stub.Debit if r.kind is PaymentType.DEBIT else stub.Credit
            try:
                resp = call(_transfer_pb(r), timeout=left)
            except grpc.RpcError as e:
                out.append(_no_answer(bank, "transfer", e))
                continue
            out.append(_answered(resp.status, resp.bank_ref, resp.decline_code))
        return out

    def inquire(self, bank: Participant, switch_ref: str, deadline_s: float) -> BankOutcome:
        try:
            resp = self._stub(bank).Inquire(
                bank_pb2.InquireRequest(switch_ref=switch_ref), timeout=deadline_s
            )
        except (grpc.RpcError, ValueError) as e:
            return _no_answer(bank, "inquiry", e)
        return _answered(resp.status, resp.bank_ref, resp.decline_code)

    def reverse(
        self, bank: Participant, switch_ref: str, reason: str, deadline_s: float
    ) -> BankOutcome:
        try:
            resp = self._stub(bank).Reverse(
                bank_pb2.ReverseRequest(switch_ref=switch_ref, reason=reason), timeout=deadline_s
            )
        except (grpc.RpcError, ValueError) as e:
            return _no_answer(bank, "reversal", e)
        return _answered(resp.status)


def _answered(
    status: bank_pb2.BankTxnStatus.ValueType, bank_ref: str = "", decline_code: str = ""
) -> BankOutcome:
    """A bank's answer; a status the switch does not know counts as no answer."""
    return BankOutcome(_ANSWERS.get(status, BankAnswer.NO_ANSWER), bank_ref, decline_code)


def _transfer_pb(r: BankTransfer) -> bank_pb2.BankTransferRequest:
    return bank_pb2.BankTransferRequest(
        switch_ref=r.switch_ref,
        institution_id=r.institution_id,
        bank_account=r.account,
        amount=common_pb2.Money(amount_minor=r.amount.amount_minor, currency=r.amount.currency),
    )


def _no_answer(bank: Participant, what: str, e: Exception) -> BankOutcome:
    code = e.code() if isinstance(e, grpc.Call) else None
    name = code.name if code is not None else type(e).__name__
    # A bank presenting another identity's certificate fails the handshake: UNAVAILABLE,
    # with the reason in the details.
    details = e.details() if isinstance(e, grpc.Call) else str(e)
    log.warning("bank %s: %s got no answer (%s: %s)", bank.participant_id, what, name, details)
    return BankOutcome(BankAnswer.NO_ANSWER, "", f"{what}: {name}")
