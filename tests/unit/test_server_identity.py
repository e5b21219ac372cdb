"""Clients accept only the server they mean: a bank's certificate for that bank, a node's
for the shard owner's zone, a node's for participants (``pki.expect_server``).

Every server here is in-process on 127.0.0.1 with a certificate of the same CA that is
valid for that address, so only the name each client expects tells them apart (as on the
local cluster, where everything listens on loopback)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from clearing.v1 import bank_pb2, bank_pb2_grpc, payment_pb2, shard_pb2, shard_pb2_grpc
from clearinghouse.bank import BankBehaviour, BankConfig, BankServerHandle, serve
from clearinghouse.client import Credentials
from clearinghouse.domain import Participant, ParticipantKind, ParticipantStatus, PaymentType
from clearinghouse.domain.money import Money
from clearinghouse.security import pki
from clearinghouse.security.identity import Identity, Role
from clearinghouse.switch.bank_gateway import GrpcBankGateway
from clearinghouse.switch.ports import BankAnswer, BankTransfer
from clearinghouse.switch.routing import OWNER_UNREACHABLE, OwnerRef, Router

pytestmark = pytest.mark.unit

BANK_A = Identity(Role.BANK, "BANK_A")
BANK_B = Identity(Role.BANK, "BANK_B")
NODE_HERE = pki.node("beijing-a")
OWNER_ZONE = "shanghai-a"
DEADLINE_S = 5.0
LOOPBACK = "127.0.0.1"


def _server_keys(ca: pki.LocalCA, who: Identity) -> pki.KeyPair:
    ca.ensure(who, ips=[LOOPBACK], dns=pki.LOOPBACK_DNS)
    return ca.load(who)


def _start(
    ca: pki.LocalCA, who: Identity, add: Callable[[grpc.Server], None]
) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    add(server)
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_secure_port(f"{LOOPBACK}:0", pki.server_credentials(_server_keys(ca, who)))
    server.start()
    return server, f"{LOOPBACK}:{port}"


def _bank(pid: str, endpoint: str) -> Participant:
    return Participant(
        participant_id=pid, kind=ParticipantKind.BANK, name=pid,
        status=ParticipantStatus.ACTIVE, bank_code=pid, endpoint=endpoint,
        currencies=frozenset({"CNY"}), net_debit_caps={"CNY": 10**9}, version=1,
    )  # fmt: skip


def _transfer(ref: str) -> BankTransfer:
    return BankTransfer(
        PaymentType.DEBIT, ref, "INST_ALIPAY", "6222020000000001", Money(100, "CNY")
    )


# -- the switch calling banks ------------------------------------------------------------------


@pytest.fixture
def bank_b(test_ca: pki.LocalCA) -> Iterator[BankServerHandle]:
    """BANK_B's simulator, approving everything, with BANK_B's own certificate."""
    _server_keys(test_ca, BANK_A)  # BANK_A has its certificate too, as every bank does
    handle = serve(
        BankConfig(
            bank_id="BANK_B", keys=_server_keys(test_ca, BANK_B), listen=f"{LOOPBACK}:0",
            behaviour=BankBehaviour(approve_ratio=1.0),
        )
    )  # fmt: skip
    yield handle
    handle.stop(0)


@pytest.fixture
def gateway(test_ca: pki.LocalCA) -> Iterator[GrpcBankGateway]:
    test_ca.ensure(NODE_HERE, ips=[LOOPBACK])
    g = GrpcBankGateway(pki.channel_credentials(test_ca.load(NODE_HERE)))
    yield g
    g.close()


def _refused_everywhere(gateway: GrpcBankGateway, bank: Participant, ref: str) -> None:
    for outcome in (
        gateway.transfer(bank, _transfer(ref), DEADLINE_S),
        gateway.inquire(bank, ref, DEADLINE_S),
        gateway.reverse(bank, ref, "TEST", DEADLINE_S),
    ):
        assert outcome.answer is BankAnswer.NO_ANSWER, outcome
        assert "UNAVAILABLE" in outcome.detail, outcome  # the handshake failed


def test_a_bank_answering_on_another_banks_address_is_refused(
    bank_b: BankServerHandle, gateway: GrpcBankGateway
) -> None:
    """BANK_B's server (a valid certificate of the CA for 127.0.0.1) where the registry
    says BANK_A listens: the gateway refuses the handshake, so BANK_B's approval never
    counts as BANK_A's, and nothing reaches BANK_B's book."""
    _refused_everywhere(gateway, _bank("BANK_A", bank_b.address), "sw-1")
    assert len(bank_b.ledger) == 0
    # The same server, called as the bank it is, answers: the refusal was its identity.
    real = gateway.transfer(_bank("BANK_B", bank_b.address), _transfer("sw-2"), DEADLINE_S)
    assert real.answer is BankAnswer.APPROVED, real


class ApprovingBank(bank_pb2_grpc.BankServiceServicer):
    """A BankService that approves everything and records what reached it."""

    def __init__(self) -> None:
        self.calls: list[Any] = []

    def Debit(self, request: Any, context: Any) -> Any:
        self.calls.append(request)
        return bank_pb2.BankTransferResponse(
            status=bank_pb2.BANK_TXN_STATUS_APPROVED, bank_ref="FORGED"
        )


@pytest.mark.parametrize("who", [NODE_HERE, Identity(Role.INSTITUTION, "INST_EVIL")], ids=str)
def test_a_node_or_an_institution_certificate_on_a_banks_address_is_refused(
    test_ca: pki.LocalCA, gateway: GrpcBankGateway, who: Identity
) -> None:
    servicer = ApprovingBank()
    if who.role is Role.INSTITUTION:
        # A client-only certificate cannot even be given a server's address; present it
        # without (the name is what is refused).
        test_ca.ensure(who)
        keys = test_ca.load(who)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        bank_pb2_grpc.add_BankServiceServicer_to_server(servicer, server)
        port = server.add_secure_port(f"{LOOPBACK}:0", pki.server_credentials(keys))
        server.start()
        address = f"{LOOPBACK}:{port}"
    else:
        server, address = _start(
            test_ca, who, lambda s: bank_pb2_grpc.add_BankServiceServicer_to_server(servicer, s)
        )
    try:
        outcome = gateway.transfer(_bank("BANK_A", address), _transfer("sw-3"), DEADLINE_S)
        assert outcome.answer is BankAnswer.NO_ANSWER, outcome
        assert servicer.calls == []
    finally:
        server.stop(0)


# -- a node forwarding to a shard's owner -------------------------------------------------------


class RecordingShard(shard_pb2_grpc.ShardServiceServicer):
    def __init__(self) -> None:
        self.calls: list[Any] = []

    def GetOwned(self, request: Any, context: Any) -> Any:
        self.calls.append(request)
        return shard_pb2.GetOwnedResponse(
            results=[payment_pb2.PaymentResult(payment_id=r.payment_id) for r in request.refs]
        )


class OneOwner:
    def __init__(self, owner: OwnerRef) -> None:
        self.owner = owner

    def ownership_doubt(self) -> str | None:
        return None

    def owner_of(self, shard: int) -> OwnerRef:
        return self.owner


def _router(ca: pki.LocalCA, owner: OwnerRef, pool: futures.ThreadPoolExecutor) -> Router:
    ca.ensure(NODE_HERE, ips=[LOOPBACK])
    return Router(
        node_id=NODE_HERE.name, zone=NODE_HERE.name, owners=OneOwner(owner),
        local=None,  # type: ignore[arg-type]  # every shard is the other node's
        pool=pool, credentials=pki.channel_credentials(ca.load(NODE_HERE)),
    )  # fmt: skip


def test_a_node_forwards_only_to_the_owner_it_meant(test_ca: pki.LocalCA) -> None:
    """A node certificate on the owner's address that is not ``node:<owner's zone>`` (a
    node of another zone answering there) is refused: the request never reaches it."""
    servicer = RecordingShard()
    server, address = _start(
        test_ca, pki.node("shenzhen-b"),
        lambda s: shard_pb2_grpc.add_ShardServiceServicer_to_server(servicer, s),
    )  # fmt: skip
    pool = futures.ThreadPoolExecutor(2)
    try:
        wrong = _router(test_ca, OwnerRef(OWNER_ZONE, address, OWNER_ZONE), pool)
        (result,) = wrong.get([("INST_ALIPAY", "p-1")])
        assert result.error.reason == OWNER_UNREACHABLE, result
        assert servicer.calls == []
        wrong.close()
        # The owner the map names is that node: the same server is reached.
        right = _router(test_ca, OwnerRef("shenzhen-b", address, "shenzhen-b"), pool)
        (result,) = right.get([("INST_ALIPAY", "p-1")])
        assert not result.HasField("error") and result.payment_id == "p-1", result
        assert len(servicer.calls) == 1
        right.close()
    finally:
        server.stop(0)
        pool.shutdown()


# -- participants calling a node ------------------------------------------------------------


def _health(channel: grpc.Channel) -> grpc.StatusCode:
    try:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    except grpc.RpcError as e:
        assert isinstance(e, grpc.Call)
        return e.code()
    finally:
        channel.close()
    return grpc.StatusCode.OK


def test_a_participant_accepts_only_the_node_of_the_zone_it_dials(test_ca: pki.LocalCA) -> None:
    creds = Credentials(test_ca.directory)
    alipay = Identity(Role.INSTITUTION, "INST_ALIPAY")
    bank_server, bank_address = _start(test_ca, BANK_B, lambda s: None)
    node_server, node_address = _start(test_ca, pki.node("beijing-a"), lambda s: None)
    try:
        cases = [
            # A bank's certificate where a switch node should be.
            (bank_address, pki.node("beijing-a"), grpc.StatusCode.UNAVAILABLE),
            # Another zone's node.
            (node_address, pki.node("shanghai-a"), grpc.StatusCode.UNAVAILABLE),
            (node_address, pki.node("beijing-a"), grpc.StatusCode.OK),
        ]
        for address, expected, code in cases:
            got = _health(creds.channel(address, alipay, server=expected))
            assert got is code, (address, expected, got)
    finally:
        bank_server.stop(0)
        node_server.stop(0)
