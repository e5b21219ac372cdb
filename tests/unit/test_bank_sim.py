"""The simulated bank over real gRPC on 127.0.0.1: decisions, idempotency, reversals,
restarts, drills, health, reflection, and the command line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from clearing.v1 import bank_pb2, bank_pb2_grpc, common_pb2
from clearinghouse.bank import (
    ERROR_METADATA_KEY,
    REVERSED_BEFORE_ARRIVAL,
    BankBehaviour,
    BankConfig,
    BankServerHandle,
    TransferKind,
    serve,
)
from clearinghouse.security import pki
from clearinghouse.security.identity import Identity, Role

pytestmark = pytest.mark.unit

REPO_ROOT = Path(__file__).resolve().parents[2]
BANK_SERVICE = "clearing.v1.BankService"
CALL_TIMEOUT_S = 5.0
SHORT_DEADLINE_S = 0.3
STOP_GRACE_S = 0.5
CLI_START_TIMEOUT_S = 15.0

APPROVED = bank_pb2.BANK_TXN_STATUS_APPROVED
DECLINED = bank_pb2.BANK_TXN_STATUS_DECLINED
REVERSED = bank_pb2.BANK_TXN_STATUS_REVERSED
UNKNOWN_REF = bank_pb2.BANK_TXN_STATUS_UNKNOWN_REF


class Bank:
    """A running bank, a channel to it and its stubs."""

    def __init__(
        self, handle: BankServerHandle, client: pki.KeyPair, address: str | None = None
    ) -> None:
        self.handle = handle
        self.channel = pki.secure_channel(address or handle.address, client)
        self.stub = bank_pb2_grpc.BankServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def debit(
        self, ref: str, amount: int = 1_000, timeout: float = CALL_TIMEOUT_S
    ) -> bank_pb2.BankTransferResponse:
        return self.stub.Debit(_transfer(ref, amount), timeout=timeout)

    def credit(
        self, ref: str, amount: int = 1_000, timeout: float = CALL_TIMEOUT_S
    ) -> bank_pb2.BankTransferResponse:
        return self.stub.Credit(_transfer(ref, amount), timeout=timeout)

    def inquire(self, ref: str, timeout: float = CALL_TIMEOUT_S) -> bank_pb2.InquireResponse:
        return self.stub.Inquire(bank_pb2.InquireRequest(switch_ref=ref), timeout=timeout)

    def reverse(self, ref: str) -> bank_pb2.ReverseResponse:
        request = bank_pb2.ReverseRequest(switch_ref=ref, reason="TEST")
        return self.stub.Reverse(request, timeout=CALL_TIMEOUT_S)

    def health_status(self, service: str = "") -> int:
        request = health_pb2.HealthCheckRequest(service=service)
        return int(self.health.Check(request, timeout=CALL_TIMEOUT_S).status)


def _transfer(ref: str, amount: int = 1_000, currency: str = "CNY") -> bank_pb2.BankTransferRequest:
    return bank_pb2.BankTransferRequest(
        switch_ref=ref,
        institution_id="INST_ALIPAY",
        bank_account="6222-0000-1111",
        amount=common_pb2.Money(amount_minor=amount, currency=currency),
    )


def _error_of(exc: grpc.RpcError) -> common_pb2.Error:
    for item in exc.trailing_metadata() or ():
        if item.key == ERROR_METADATA_KEY:
            return common_pb2.Error.FromString(item.value)
    raise AssertionError(f"no {ERROR_METADATA_KEY} in the trailers of {exc}")


StartBank = Callable[..., Bank]


def bank_keys(ca: pki.LocalCA, bank_id: str) -> pki.KeyPair:
    ident = Identity(Role.BANK, bank_id)
    ca.ensure(ident, ips=["127.0.0.1"], dns=pki.LOOPBACK_DNS)
    return ca.load(ident)


def node_keys(ca: pki.LocalCA) -> pki.KeyPair:
    ca.ensure(pki.node("beijing-a"))
    return ca.load(pki.node("beijing-a"))


@pytest.fixture
def start_bank(tmp_path: Path, test_ca: pki.LocalCA) -> Iterator[StartBank]:
    """Start banks on 127.0.0.1 port 0, each journalled under tmp_path; stop them after.
    The tests call as a switch node would (a node certificate)."""
    banks: list[Bank] = []

    def start(bank_id: str = "BANK_TEST", journal: str = "bank.jsonl", **behaviour: object) -> Bank:
        config = BankConfig(
            bank_id=bank_id,
            keys=bank_keys(test_ca, bank_id),
            listen="127.0.0.1:0",
            journal_path=tmp_path / journal,
            behaviour=BankBehaviour(**behaviour),  # type: ignore[arg-type]
        )
        bank = Bank(serve(config), node_keys(test_ca))
        banks.append(bank)
        return bank

    yield start
    for bank in banks:
        bank.channel.close()
        bank.handle.stop(STOP_GRACE_S)


@contextmanager
def _raises(code: grpc.StatusCode) -> Iterator[list[grpc.RpcError]]:
    caught: list[grpc.RpcError] = []
    with pytest.raises(grpc.RpcError) as info:
        yield caught
    assert info.value.code() == code, info.value
    caught.append(info.value)


# ---- health and reflection ----------------------------------------------------------------


def test_health_is_serving_and_reflection_lists_the_bank(start_bank: StartBank) -> None:
    bank = start_bank()
    assert bank.health_status() == health_pb2.HealthCheckResponse.SERVING
    assert bank.health_status(BANK_SERVICE) == health_pb2.HealthCheckResponse.SERVING

    reflection = reflection_pb2_grpc.ServerReflectionStub(bank.channel)
    answers = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=CALL_TIMEOUT_S
    )
    names = {s.name for answer in answers for s in answer.list_services_response.service}
    assert {BANK_SERVICE, "grpc.health.v1.Health"} <= names


# ---- decisions and idempotency ------------------------------------------------------------


def test_decisions_follow_the_seed(start_bank: StartBank) -> None:
    refs = [f"sw-{i}" for i in range(40)]
    first = start_bank("BANK_A", "a.jsonl", approve_ratio=0.5, seed=7)
    twin = start_bank("BANK_B", "b.jsonl", approve_ratio=0.5, seed=7)
    other = start_bank("BANK_C", "c.jsonl", approve_ratio=0.5, seed=8)

    answers = [first.debit(ref).status for ref in refs]
    expected = BankBehaviour(approve_ratio=0.5, seed=7)
    assert answers == [
        APPROVED if expected.decide(TransferKind.DEBIT, ref).approved else DECLINED for ref in refs
    ]
    assert {APPROVED, DECLINED} == set(answers)
    assert answers == [twin.debit(ref).status for ref in refs]
    assert answers != [other.debit(ref).status for ref in refs]


def test_a_repeat_gets_the_same_answer_and_is_applied_once(start_bank: StartBank) -> None:
    bank = start_bank(approve_ratio=1.0)
    first = bank.credit("pay-1", amount=2_500)
    assert first.status == APPROVED and first.bank_ref
    for _ in range(3):
        assert bank.credit("pay-1", amount=2_500) == first
    totals = bank.handle.ledger.totals()["CNY"]
    assert (totals.credits_applied, totals.credits_applied_minor) == (1, 2_500)

    # The same reference for another transfer is a bug of the caller: refused, no change.
    with _raises(grpc.StatusCode.ALREADY_EXISTS) as caught:
        bank.debit("pay-1", amount=2_500)
    assert _error_of(caught[0]).reason == "SWITCH_REF_REUSED"
    assert bank.handle.ledger.totals()["CNY"].debits_applied == 0


PENDING = bank_pb2.BANK_TXN_STATUS_PENDING
DEBIT_DIR = bank_pb2.TRANSFER_DIRECTION_DEBIT
CREDIT_DIR = bank_pb2.TRANSFER_DIRECTION_CREDIT


def _items(*specs: tuple[int, str, int]) -> bank_pb2.TransfersRequest:
    return bank_pb2.TransfersRequest(
        items=[
            bank_pb2.TransferItem(direction=d, transfer=_transfer(ref, amount))
            for d, ref, amount in specs
        ]
    )


def test_transfers_apply_each_item_as_debit_or_credit_would(start_bank: StartBank) -> None:
    bank = start_bank(approve_ratio=1.0)
    first = bank.credit("solo", amount=700)  # a transfer made alone before
    request = _items(
        (DEBIT_DIR, "b-1", 1_000),
        (CREDIT_DIR, "b-2", 2_000),
        (CREDIT_DIR, "solo", 700),  # a repeat: the first answer, applied once
        (DEBIT_DIR, "solo", 700),  # the same reference for another transfer
        (bank_pb2.TRANSFER_DIRECTION_UNSPECIFIED, "b-3", 5),
        (DEBIT_DIR, "b-4", -1),
    )
    results = bank.stub.Transfers(request, timeout=CALL_TIMEOUT_S).results
    assert [r.switch_ref for r in results] == ["b-1", "b-2", "solo", "solo", "b-3", "b-4"]
    assert [r.status for r in results[:3]] == [APPROVED, APPROVED, APPROVED]
    assert results[2].bank_ref == first.bank_ref
    assert results[3].error.reason == "SWITCH_REF_REUSED"
    assert results[3].error.code == grpc.StatusCode.ALREADY_EXISTS.value[0]
    assert [v.field for v in results[4].error.field_violations] == ["direction"]
    assert [v.field for v in results[5].error.field_violations] == ["amount.amount_minor"]
    totals = bank.handle.ledger.totals()["CNY"]
    assert (totals.debits_applied, totals.debits_applied_minor) == (1, 1_000)
    assert (totals.credits_applied, totals.credits_applied_minor) == (2, 2_700)
    assert bank.inquire("b-3").status == UNKNOWN_REF  # a refused item wrote nothing
    # Each item is the same transfer as its Debit or Credit: repeats answer alike.
    assert bank.debit("b-1", amount=1_000).bank_ref == results[0].bank_ref


def test_transfers_refuses_an_empty_or_oversized_call_whole(start_bank: StartBank) -> None:
    bank = start_bank()
    with _raises(grpc.StatusCode.INVALID_ARGUMENT) as caught:
        bank.stub.Transfers(bank_pb2.TransfersRequest(), timeout=CALL_TIMEOUT_S)
    assert [v.field for v in _error_of(caught[0]).field_violations] == ["items"]
    too_many = _items(*[(DEBIT_DIR, f"x-{i}", 1) for i in range(1001)])
    with _raises(grpc.StatusCode.INVALID_ARGUMENT):
        bank.stub.Transfers(too_many, timeout=CALL_TIMEOUT_S)
    assert bank.handle.ledger.totals() == {}


def test_transfers_in_an_outage_apply_nothing(start_bank: StartBank) -> None:
    bank = start_bank(outage=True)
    with _raises(grpc.StatusCode.UNAVAILABLE):
        bank.stub.Transfers(_items((DEBIT_DIR, "o-1", 10)), timeout=CALL_TIMEOUT_S)
    bank.handle.controls.toggle_outage()
    assert bank.inquire("o-1").status == UNKNOWN_REF


def test_a_late_item_is_applied_and_answered_pending(start_bank: StartBank) -> None:
    bank = start_bank(approve_ratio=1.0, timeout_ratio=1.0)
    late = _items((DEBIT_DIR, "late-1", 10))
    (result,) = bank.stub.Transfers(late, timeout=CALL_TIMEOUT_S).results
    assert (result.status, result.bank_ref) == (PENDING, "")
    assert bank.inquire("late-1").status == APPROVED


def test_declined_repeat_stays_declined(start_bank: StartBank) -> None:
    bank = start_bank(approve_ratio=0.0)
    first = bank.debit("pay-2")
    assert first.status == DECLINED and first.decline_code
    assert bank.debit("pay-2") == first
    assert bank.handle.ledger.totals() == {}


# ---- reversals --------------------------------------------------------------------------


def test_reverse_of_an_approved_transfer(start_bank: StartBank) -> None:
    bank = start_bank(approve_ratio=1.0)
    approved = bank.debit("pay-3", amount=700)
    assert bank.reverse("pay-3").status == REVERSED
    assert bank.reverse("pay-3").status == REVERSED
    inquiry = bank.inquire("pay-3")
    assert (inquiry.status, inquiry.bank_ref) == (REVERSED, approved.bank_ref)
    assert bank.debit("pay-3", amount=700).status == REVERSED  # A late repeat applies nothing.
    totals = bank.handle.ledger.totals()["CNY"]
    assert (totals.debits_applied, totals.net_debits_minor, totals.reversals) == (1, 0, 1)


def test_reverse_of_a_declined_transfer_changes_nothing(start_bank: StartBank) -> None:
    bank = start_bank(approve_ratio=0.0)
    declined = bank.credit("pay-4")
    assert bank.reverse("pay-4").status == DECLINED
    assert bank.inquire("pay-4").decline_code == declined.decline_code


def test_reverse_before_arrival(start_bank: StartBank) -> None:
    bank = start_bank(approve_ratio=1.0)
    assert bank.inquire("pay-5").status == UNKNOWN_REF
    assert bank.reverse("pay-5").status == DECLINED
    late = bank.debit("pay-5")
    assert (late.status, late.decline_code) == (DECLINED, REVERSED_BEFORE_ARRIVAL)
    inquiry = bank.inquire("pay-5")
    assert (inquiry.status, inquiry.decline_code) == (DECLINED, REVERSED_BEFORE_ARRIVAL)
    assert bank.reverse("pay-5").status == DECLINED
    assert bank.handle.ledger.totals() == {}


# ---- restart ----------------------------------------------------------------------------


def test_a_restarted_bank_remembers_its_book(start_bank: StartBank) -> None:
    bank = start_bank(approve_ratio=0.5, seed=11)
    amounts = {f"r-{i}": 100 + i for i in range(12)}
    answers = {ref: bank.debit(ref, amount=amount) for ref, amount in amounts.items()}
    approved = [ref for ref, answer in answers.items() if answer.status == APPROVED]
    bank.reverse(approved[0])
    bank.reverse("never-arrived")
    totals_before = bank.handle.ledger.totals()
    bank.channel.close()
    bank.handle.stop(STOP_GRACE_S)

    # Same journal; a different seed shows the answers come from the book, not the dice.
    again = start_bank(approve_ratio=0.5, seed=99)
    for ref, answer in answers.items():
        inquiry = again.inquire(ref)
        expected = REVERSED if ref == approved[0] else answer.status
        assert (inquiry.status, inquiry.bank_ref) == (expected, answer.bank_ref)
    assert again.inquire("never-arrived").decline_code == REVERSED_BEFORE_ARRIVAL
    assert again.debit(approved[1], amount=amounts[approved[1]]) == answers[approved[1]]
    assert again.handle.ledger.totals() == totals_before


# ---- drills -----------------------------------------------------------------------------


def test_outage_answers_unavailable_and_applies_nothing(start_bank: StartBank) -> None:
    bank = start_bank(approve_ratio=1.0)
    assert bank.handle.toggle_outage() is True
    with _raises(grpc.StatusCode.UNAVAILABLE) as caught:
        bank.debit("pay-6")
    assert _error_of(caught[0]).retry_after_ms > 0
    with _raises(grpc.StatusCode.UNAVAILABLE):
        bank.inquire("pay-6")
    assert bank.health_status(BANK_SERVICE) == health_pb2.HealthCheckResponse.NOT_SERVING

    assert bank.handle.toggle_outage() is False
    assert bank.health_status(BANK_SERVICE) == health_pb2.HealthCheckResponse.SERVING
    assert bank.inquire("pay-6").status == UNKNOWN_REF
    assert bank.debit("pay-6").status == APPROVED


# ---- who may call ----------------------------------------------------------------------------


def _book(bank: Bank) -> tuple[int, dict[str, object]]:
    """How many switch_refs the bank's book holds, and its totals."""
    ledger = bank.handle.ledger
    return len(ledger), dict(ledger.totals())


@pytest.mark.parametrize(
    "who",
    [Identity(Role.INSTITUTION, "INST_ALIPAY"), Identity(Role.BANK, "BANK_OTHER"),
     pki.operator(), pki.auditor()],
    ids=str,
)  # fmt: skip
def test_only_a_switch_node_moves_money_at_a_bank(
    start_bank: StartBank, test_ca: pki.LocalCA, who: Identity
) -> None:
    bank = start_bank(approve_ratio=1.0)
    test_ca.ensure(who)
    with pki.secure_channel(bank.handle.address, test_ca.load(who)) as channel:
        stub = bank_pb2_grpc.BankServiceStub(channel)
        for call in (
            lambda: stub.Debit(_transfer("evil-1"), timeout=CALL_TIMEOUT_S),
            lambda: stub.Credit(_transfer("evil-2"), timeout=CALL_TIMEOUT_S),
            lambda: stub.Reverse(
                bank_pb2.ReverseRequest(switch_ref="evil-3", reason="X"), timeout=CALL_TIMEOUT_S
            ),
            lambda: stub.Inquire(
                bank_pb2.InquireRequest(switch_ref="evil-1"), timeout=CALL_TIMEOUT_S
            ),
        ):
            with _raises(grpc.StatusCode.PERMISSION_DENIED) as caught:
                call()
            assert _error_of(caught[0]).reason == "NOT_AUTHORIZED"
    assert _book(bank) == (0, {})  # nothing applied, not even a reversal marker
    # A node asking about those references finds nothing.
    assert [bank.inquire(ref).status for ref in ("evil-1", "evil-2", "evil-3")] == [UNKNOWN_REF] * 3


def test_a_caller_without_a_certificate_never_reaches_the_bank(
    start_bank: StartBank, test_ca: pki.LocalCA
) -> None:
    bank = start_bank(approve_ratio=1.0)
    ca_pem = test_ca.ca_cert_path.read_bytes()
    channels = [
        grpc.secure_channel(
            bank.handle.address, grpc.ssl_channel_credentials(root_certificates=ca_pem)
        ),
        grpc.insecure_channel(bank.handle.address),
    ]
    for channel in channels:
        stub = bank_pb2_grpc.BankServiceStub(channel)
        with _raises(grpc.StatusCode.UNAVAILABLE):  # the handshake is refused
            stub.Debit(_transfer("anon-1"), timeout=CALL_TIMEOUT_S)
        channel.close()
    assert _book(bank) == (0, {})
    assert bank.inquire("anon-1").status == UNKNOWN_REF


def test_a_late_answer_still_applies_the_transfer(start_bank: StartBank) -> None:
    bank = start_bank(approve_ratio=1.0, timeout_ratio=1.0, hang_ms=10_000)
    started = time.monotonic()
    with _raises(grpc.StatusCode.DEADLINE_EXCEEDED):
        bank.debit("pay-7", timeout=SHORT_DEADLINE_S)
    assert time.monotonic() - started < 3.0
    # Inquire does not hang under timeout_ratio: it is how the switch learns the outcome.
    inquiry = bank.inquire("pay-7")
    assert inquiry.status == APPROVED and inquiry.bank_ref
    assert bank.handle.ledger.totals()["CNY"].debits_applied == 1


def test_hang_all_holds_every_call_until_switched_off(start_bank: StartBank) -> None:
    bank = start_bank(approve_ratio=1.0, hang_ms=10_000)
    assert bank.handle.toggle_hang_all() is True
    with _raises(grpc.StatusCode.DEADLINE_EXCEEDED):
        bank.credit("pay-8", timeout=SHORT_DEADLINE_S)
    with _raises(grpc.StatusCode.DEADLINE_EXCEEDED):
        bank.inquire("pay-8", timeout=SHORT_DEADLINE_S)
    assert bank.handle.toggle_hang_all() is False
    assert bank.inquire("pay-8").status == APPROVED


def test_hang_ends_after_hang_ms(start_bank: StartBank) -> None:
    bank = start_bank(approve_ratio=1.0, timeout_ratio=1.0, hang_ms=300)
    started = time.monotonic()
    assert bank.debit("pay-9").status == APPROVED
    assert 0.3 <= time.monotonic() - started < 3.0


def test_latency_delays_answers(start_bank: StartBank) -> None:
    bank = start_bank(approve_ratio=1.0, latency_ms_min=60, latency_ms_max=80)
    started = time.monotonic()
    bank.debit("pay-10")
    assert time.monotonic() - started >= 0.06


def test_stop_releases_hanging_calls(start_bank: StartBank) -> None:
    bank = start_bank(approve_ratio=1.0, hang_ms=60_000)
    bank.handle.toggle_hang_all()
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(bank.debit, "pay-11", 1_000, 30.0)
        time.sleep(0.3)  # Let the call reach the bank and start hanging.
        started = time.monotonic()
        bank.handle.stop(grace_s=10.0)
        assert time.monotonic() - started < 3.0
        with _raises(grpc.StatusCode.UNAVAILABLE):
            pending.result()


def test_invalid_requests_name_their_fields(start_bank: StartBank) -> None:
    bank = start_bank()
    bad = bank_pb2.BankTransferRequest(
        switch_ref="has space",
        institution_id="",
        bank_account="acct",
        amount=common_pb2.Money(amount_minor=-5, currency="cny"),
    )
    with _raises(grpc.StatusCode.INVALID_ARGUMENT) as caught:
        bank.stub.Debit(bad, timeout=CALL_TIMEOUT_S)
    fields = {v.field for v in _error_of(caught[0]).field_violations}
    assert fields == {"switch_ref", "institution_id", "amount.amount_minor", "amount.currency"}
    with _raises(grpc.StatusCode.INVALID_ARGUMENT):
        bank.inquire("")
    assert len(bank.handle.ledger) == 0


# ---- the command line -------------------------------------------------------------------


def test_cli_serves_until_sigterm_and_obeys_drill_signals(
    tmp_path: Path, test_ca: pki.LocalCA
) -> None:
    bank_keys(test_ca, "BANK_CLI")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT / "services"), env.get("PYTHONPATH", "")) if p
    )
    argv = [
        sys.executable, "-m", "clearinghouse.bank",
        "--bank-id", "BANK_CLI", "--listen", "127.0.0.1:0",
        "--journal", str(tmp_path / "cli.jsonl"), "--pki-dir", str(test_ca.directory),
        "--approve-ratio", "1", "--latency-ms", "0-1", "--hang-ms", "10000", "--seed", "1",
    ]  # fmt: skip
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        prefix = "bank BANK_CLI listening on 127.0.0.1:"
        assert line.startswith(prefix), line
        port = int(line.removeprefix(prefix))
        assert port > 0

        with pki.secure_channel(f"127.0.0.1:{port}", node_keys(test_ca)) as channel:
            stub = bank_pb2_grpc.BankServiceStub(channel)
            assert stub.Debit(_transfer("cli-1"), timeout=CALL_TIMEOUT_S).status == APPROVED

            def debit_code() -> grpc.StatusCode | None:
                return _code_of(lambda: stub.Debit(_transfer("cli-2"), timeout=1.0))

            def inquire_code() -> grpc.StatusCode | None:
                inquire = bank_pb2.InquireRequest(switch_ref="cli-1")
                return _code_of(lambda: stub.Inquire(inquire, timeout=SHORT_DEADLINE_S))

            proc.send_signal(signal.SIGUSR1)  # Outage on.
            _eventually(lambda: debit_code() == grpc.StatusCode.UNAVAILABLE)
            proc.send_signal(signal.SIGUSR1)  # Outage off.
            _eventually(lambda: debit_code() is None)

            proc.send_signal(signal.SIGUSR2)  # Hang every request.
            _eventually(lambda: inquire_code() == grpc.StatusCode.DEADLINE_EXCEEDED)
            proc.send_signal(signal.SIGUSR2)  # Answer again.
            _eventually(lambda: inquire_code() is None)

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=CLI_START_TIMEOUT_S) == 0
        assert "stopping" in (proc.stderr.read() if proc.stderr else "")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _code_of(call: Callable[[], object]) -> grpc.StatusCode | None:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()
    return None


def _eventually(check: Callable[[], object], timeout_s: float = 5.0) -> None:
    """Signals are handled asynchronously; wait for their effect to show."""
    end = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < end, "the signal had no effect in time"
        time.sleep(0.05)
