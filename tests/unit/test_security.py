"""mTLS identities, the authorization table and per-participant quotas, over real gRPC
(TLS on 127.0.0.1, in-process servers) with servicers that record what reached them."""

from __future__ import annotations

import argparse
import json
import os
import stat
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from clearing.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    audit_pb2,
    common_pb2,
    payment_pb2,
    payment_pb2_grpc,
    settlement_pb2,
    shard_pb2,
)
from clearinghouse.client import error_details
from clearinghouse.domain.errors import ResourceExhausted
from clearinghouse.domain.signing import key_id_of, public_key_bytes, verify_signed_order
from clearinghouse.security import cli as pki_cli
from clearinghouse.security import pki
from clearinghouse.security.authz import BANK_POLICY, SWITCH_POLICY, SecurityInterceptor
from clearinghouse.security.identity import Identity, Role
from clearinghouse.security.ratelimit import RateLimiter
from clearinghouse.signing_keys import SigningKeyStore
from clearinghouse.switch.convert import order_from_pb

pytestmark = pytest.mark.unit

ALIPAY = Identity(Role.INSTITUTION, "INST_ALIPAY")
WECHAT = Identity(Role.INSTITUTION, "INST_WECHAT")
ICBC = Identity(Role.BANK, "BANK_ICBC")
CALL_TIMEOUT_S = 5.0


# -- the CA --------------------------------------------------------------------------------


def test_keys_are_private_and_the_ca_is_created_once(tmp_path: Path) -> None:
    ca = pki.LocalCA(tmp_path / "pki")
    assert ca.init() is True
    assert ca.init() is False
    folder = ca.issue(ALIPAY)
    for path in (ca.ca_key_path, folder / "key.pem", folder / "cert.pem"):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
    for d in (ca.directory, folder, ca.ca_key_path.parent):
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700, d
    assert [i for i, _ in ca.identities()] == [ALIPAY]
    assert ca.load(ALIPAY).identity == ALIPAY


def test_ensure_reissues_a_server_certificate_that_lacks_an_address(tmp_path: Path) -> None:
    ca = pki.LocalCA(tmp_path)
    ca.init()
    node = pki.node("beijing-a")
    ca.ensure(node, ips=["127.0.1.1"])
    first = ca.load(node).cert_pem
    ca.ensure(node, ips=["127.0.1.1"])
    assert ca.load(node).cert_pem == first  # covered: kept
    ca.ensure(node, ips=["127.0.1.2"])
    assert ca.load(node).cert_pem != first  # not covered: issued again


def test_identity_names_parse_and_refuse_junk() -> None:
    assert Identity.parse("institution:INST_ALIPAY") == ALIPAY
    assert Identity.parse("node:beijing-a") == pki.node("beijing-a")
    for junk in ("INST_ALIPAY", "root:x", "institution:", "bank:a b", "institution:" + "A" * 65):
        assert Identity.parse(junk) is None, junk
    assert ALIPAY.folder_name == "INST_ALIPAY"
    assert pki.operator().folder_name == "operator-operator"


# -- a TLS server with the switch's policy ----------------------------------------------


class RecordingPayments(payment_pb2_grpc.PaymentServiceServicer):
    def __init__(self) -> None:
        self.calls: list[Any] = []

    def SubmitPayment(self, request: Any, context: Any) -> Any:
        self.calls.append(request)
        return payment_pb2.SubmitPaymentResponse(
            payment=payment_pb2.Payment(
                order=request.order, state=common_pb2.PAYMENT_STATE_APPROVED
            )
        )

    def SubmitPayments(self, request: Any, context: Any) -> Any:
        self.calls.append(request)
        return payment_pb2.SubmitPaymentsResponse()

    def GetPayment(self, request: Any, context: Any) -> Any:
        self.calls.append(request)
        return payment_pb2.GetPaymentResponse()


class RecordingAdmin(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self) -> None:
        self.calls: list[Any] = []

    def GetParticipant(self, request: Any, context: Any) -> Any:
        self.calls.append(request)
        return admin_pb2.GetParticipantResponse()


class Server:
    def __init__(self, ca: pki.LocalCA, quota_per_s: int = 0) -> None:
        ca.ensure(pki.node("beijing-a"), ips=["127.0.0.1"])
        self.payments = RecordingPayments()
        self.admin = RecordingAdmin()
        limiter = RateLimiter(lambda _key: quota_per_s)
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=4),
            interceptors=[SecurityInterceptor(SWITCH_POLICY, limiter)],
        )
        payment_pb2_grpc.add_PaymentServiceServicer_to_server(self.payments, self.server)
        admin_pb2_grpc.add_AdminServiceServicer_to_server(self.admin, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), self.server)
        keys = ca.load(pki.node("beijing-a"))
        self.port = self.server.add_secure_port("127.0.0.1:0", pki.server_credentials(keys))
        self.server.start()
        self.target = f"127.0.0.1:{self.port}"

    def channel(self, ca: pki.LocalCA, who: Identity) -> grpc.Channel:
        ca.ensure(who)
        return pki.secure_channel(self.target, ca.load(who))


@pytest.fixture
def ca(tmp_path: Path) -> pki.LocalCA:
    ca = pki.LocalCA(tmp_path / "pki")
    ca.init()
    return ca


@pytest.fixture
def server(ca: pki.LocalCA) -> Iterator[Server]:
    s = Server(ca)
    yield s
    s.server.stop(0)


def _order(inst: str) -> payment_pb2.PaymentOrder:
    return payment_pb2.PaymentOrder(payment_id="p-1", institution_id=inst)


def _code(call: Any) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as e:
        assert isinstance(e, grpc.Call)
        return e.code()
    return grpc.StatusCode.OK


def test_an_institution_submits_and_reads_its_own_payments(server: Server, ca: pki.LocalCA) -> None:
    stub = payment_pb2_grpc.PaymentServiceStub(server.channel(ca, ALIPAY))
    r = stub.SubmitPayment(
        payment_pb2.SubmitPaymentRequest(order=_order("INST_ALIPAY")), timeout=CALL_TIMEOUT_S
    )
    assert r.payment.order.institution_id == "INST_ALIPAY"
    stub.GetPayment(
        payment_pb2.GetPaymentRequest(institution_id="INST_ALIPAY", payment_id="p-1"),
        timeout=CALL_TIMEOUT_S,
    )
    assert len(server.payments.calls) == 2


def test_acting_as_someone_else_is_permission_denied_and_reaches_nothing(
    server: Server, ca: pki.LocalCA
) -> None:
    as_alipay = payment_pb2_grpc.PaymentServiceStub(server.channel(ca, ALIPAY))
    as_bank = payment_pb2_grpc.PaymentServiceStub(server.channel(ca, ICBC))
    as_auditor = server.channel(ca, pki.auditor())
    denied = [
        lambda: as_alipay.SubmitPayment(
            payment_pb2.SubmitPaymentRequest(order=_order("INST_WECHAT")), timeout=CALL_TIMEOUT_S
        ),
        # One foreign order in a batch refuses the whole batch.
        lambda: as_alipay.SubmitPayments(
            payment_pb2.SubmitPaymentsRequest(
                orders=[_order("INST_ALIPAY"), _order("INST_WECHAT")]
            ),
            timeout=CALL_TIMEOUT_S,
        ),
        lambda: as_alipay.GetPayment(
            payment_pb2.GetPaymentRequest(institution_id="INST_WECHAT", payment_id="p"),
            timeout=CALL_TIMEOUT_S,
        ),
        lambda: as_bank.SubmitPayment(
            payment_pb2.SubmitPaymentRequest(order=_order("BANK_ICBC")), timeout=CALL_TIMEOUT_S
        ),
        lambda: admin_pb2_grpc.AdminServiceStub(as_auditor).GetParticipant(
            admin_pb2.GetParticipantRequest(participant_id="INST_ALIPAY"), timeout=CALL_TIMEOUT_S
        ),
        lambda: admin_pb2_grpc.AdminServiceStub(server.channel(ca, ALIPAY)).GetParticipant(
            admin_pb2.GetParticipantRequest(participant_id="INST_ALIPAY"), timeout=CALL_TIMEOUT_S
        ),
    ]
    for call in denied:
        try:
            call()
        except grpc.RpcError as e:
            assert isinstance(e, grpc.Call)
            assert e.code() is grpc.StatusCode.PERMISSION_DENIED, e
            err = error_details(e)
            assert err is not None and err.reason == "NOT_AUTHORIZED"
        else:
            pytest.fail("a call acting as someone else was let through")
    assert server.payments.calls == [] and server.admin.calls == []
    # The operator may.
    admin = admin_pb2_grpc.AdminServiceStub(server.channel(ca, pki.operator()))
    admin.GetParticipant(admin_pb2.GetParticipantRequest(participant_id="X"), timeout=5)
    assert len(server.admin.calls) == 1


def test_no_certificate_a_foreign_one_or_plaintext_never_gets_in(
    server: Server, ca: pki.LocalCA, tmp_path: Path
) -> None:
    ca_pem = ca.ca_cert_path.read_bytes()
    no_cert = grpc.secure_channel(
        server.target, grpc.ssl_channel_credentials(root_certificates=ca_pem)
    )
    foreign = pki.LocalCA(tmp_path / "foreign")
    foreign.init()
    foreign.issue(ALIPAY)  # the right name, from the wrong authority
    forged = foreign.load(ALIPAY)
    forged_channel = grpc.secure_channel(
        server.target,
        grpc.ssl_channel_credentials(
            root_certificates=ca_pem,
            private_key=forged.key_pem,
            certificate_chain=forged.cert_pem,
        ),
    )
    plain = grpc.insecure_channel(server.target)
    request = payment_pb2.SubmitPaymentRequest(order=_order("INST_ALIPAY"))
    for channel in (no_cert, forged_channel, plain):
        stub = payment_pb2_grpc.PaymentServiceStub(channel)
        code = _code(lambda s=stub: s.SubmitPayment(request, timeout=2.0))  # type: ignore[misc]
        assert code is grpc.StatusCode.UNAVAILABLE, code  # the handshake fails
        health_stub = health_pb2_grpc.HealthStub(channel)
        code = _code(
            lambda h=health_stub: h.Check(health_pb2.HealthCheckRequest(), timeout=2.0)  # type: ignore[misc]
        )
        assert code is grpc.StatusCode.UNAVAILABLE, code
    assert server.payments.calls == []
    # The same server answers a proper client: the refusals above were about identity.
    ok = health_pb2_grpc.HealthStub(server.channel(ca, ALIPAY))
    assert ok.Check(health_pb2.HealthCheckRequest(), timeout=5).status == 1


def test_over_quota_is_resource_exhausted_with_retry_advice_per_participant(
    ca: pki.LocalCA,
) -> None:
    s = Server(ca, quota_per_s=5)
    try:
        alipay = payment_pb2_grpc.PaymentServiceStub(s.channel(ca, ALIPAY))
        wechat = payment_pb2_grpc.PaymentServiceStub(s.channel(ca, WECHAT))
        codes = []
        advice = []
        for _ in range(12):
            try:
                alipay.SubmitPayment(
                    payment_pb2.SubmitPaymentRequest(order=_order("INST_ALIPAY")), timeout=5
                )
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as e:
                assert isinstance(e, grpc.Call)
                codes.append(e.code())
                err = error_details(e)
                assert err is not None and err.reason == "RATE_LIMITED"
                advice.append(err.retry_after_ms)
        assert codes.count(grpc.StatusCode.OK) in (5, 6), codes  # the burst, maybe one refill
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 6
        assert all(0 < ms <= 1000 for ms in advice), advice
        # Another participant's bucket is its own.
        wechat.SubmitPayment(
            payment_pb2.SubmitPaymentRequest(order=_order("INST_WECHAT")), timeout=5
        )
    finally:
        s.server.stop(0)


# -- the table ------------------------------------------------------------------------------


def _served_methods(*files: Any) -> set[str]:
    return {
        f"/{svc.full_name}/{m.name}"
        for f in files
        for svc in f.services_by_name.values()
        for m in svc.methods
    }


def test_every_method_a_node_serves_has_a_rule_and_no_rule_is_stale() -> None:
    served = _served_methods(
        payment_pb2.DESCRIPTOR,
        admin_pb2.DESCRIPTOR,
        audit_pb2.DESCRIPTOR,
        settlement_pb2.DESCRIPTOR,
        shard_pb2.DESCRIPTOR,  # the node-to-node API
        health_pb2.DESCRIPTOR,
    )
    ours = {m for m in SWITCH_POLICY if not m.startswith("/grpc.reflection")}
    assert served == ours
    # Writes are for operators or institutions only; auditors never write.
    writes = [m for m in SWITCH_POLICY if m.rsplit("/", 1)[1].startswith(
        ("Submit", "Register", "Update", "Suspend", "Resume", "Set", "Close", "Confirm", "Lend")
    )]  # fmt: skip
    assert writes and all(Role.AUDITOR not in SWITCH_POLICY[m].roles for m in writes)
    # Whole-ledger audit reads spend more of the quota than a lookup.
    audit = "/clearing.v1.AuditService/"
    for name in ("VerifyChains", "CompareCities", "ExportWindow"):
        cost = SWITCH_POLICY[audit + name].cost
        assert cost is not None and cost(audit_pb2.VerifyChainsRequest()) >= 10, name
    assert SWITCH_POLICY[audit + "GetWindow"].cost is None
    assert {m.split("/")[1] for m in BANK_POLICY} >= {"clearing.v1.BankService"}
    assert all(r.roles == {Role.NODE} for m, r in BANK_POLICY.items() if "BankService" in m)


def test_the_bucket_refills_at_the_quota_and_advises_when() -> None:
    now = [100.0]
    limiter = RateLimiter(lambda _k: 10, clock=lambda: now[0])
    for _ in range(10):
        limiter.take("a")
    with pytest.raises(ResourceExhausted) as info:
        limiter.take("a")
    assert info.value.retry_after_ms == 100  # one token at 10/s
    now[0] += 0.5
    for _ in range(5):
        limiter.take("a")
    with pytest.raises(ResourceExhausted):
        limiter.take("a")
    # A batch costs one per payment; one larger than the bucket needs a full bucket and
    # leaves it in debt, so over time nobody exceeds the quota.
    big = RateLimiter(lambda _k: 10, clock=lambda: now[0])
    big.take("b", 50)  # the bucket held 10: now 40 in debt
    with pytest.raises(ResourceExhausted) as info:
        big.take("b", 1)
    assert info.value.retry_after_ms == 4100  # 41 tokens at 10/s
    now[0] += 4.0
    with pytest.raises(ResourceExhausted):
        big.take("b", 1)  # 0 tokens after 4 s
    now[0] += 0.2
    big.take("b", 1)
    unlimited = RateLimiter(lambda _k: 0, clock=lambda: now[0])
    for _ in range(10_000):
        unlimited.take("c")


def test_sign_order_prints_a_request_that_verifies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CLEARING_PKI_DIR", str(tmp_path))
    key = SigningKeyStore(tmp_path).get_or_create("INST_ALIPAY")
    order = {
        "payment_id": "p-1", "institution_id": "INST_ALIPAY", "type": "PAYMENT_TYPE_DEBIT",
        "payer_id": "BANK_ICBC", "payee_id": "INST_ALIPAY", "bank_account": "62220200",
        "amount": {"amount_minor": 12345, "currency": "CNY"}, "memo": "top-up",
        "requested_at": "2026-11-25T04:20:00Z",
    }  # fmt: skip
    args = argparse.Namespace(dir=tmp_path, cmd="sign-order", order_json=json.dumps(order))
    assert pki_cli.run(args) == 0
    request = json_format.Parse(capsys.readouterr().out, payment_pb2.SubmitPaymentRequest())
    pk = public_key_bytes(key)
    verify_signed_order(order_from_pb(request.order), {key_id_of(pk): pk})
    # A key that is not the institution's is not found: nothing is printed to sign with.
    order["institution_id"] = "INST_OTHER"
    args.order_json = json.dumps(order)
    assert pki_cli.run(args) == 1
