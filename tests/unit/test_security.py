"""mTLS identities, the authorization table and per-participant quotas, over real gRPC
(TLS on 127.0.0.1, in-process servers) with servicers that record what reached them."""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import os
import re
import shutil
import stat
import subprocess
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from google.protobuf import json_format
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from hypothesis import given, settings
from hypothesis import strategies as st

from clearing.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    audit_pb2,
    common_pb2,
    payment_pb2,
    payment_pb2_grpc,
    settlement_pb2,
    settlement_pb2_grpc,
    shard_pb2,
    shard_pb2_grpc,
)
from clearinghouse.client import error_details
from clearinghouse.domain.errors import ResourceExhausted
from clearinghouse.domain.signing import key_id_of, public_key_bytes, verify_signed_order
from clearinghouse.security import authz, pki
from clearinghouse.security import cli as pki_cli
from clearinghouse.security.authz import BANK_POLICY, SWITCH_POLICY, SecurityInterceptor
from clearinghouse.security.identity import NAME_PATTERN, Identity, Role
from clearinghouse.security.ratelimit import RateLimiter
from clearinghouse.security.revocation import RevocationList
from clearinghouse.signing_keys import SigningKeyStore
from clearinghouse.switch.convert import order_from_pb

pytestmark = pytest.mark.unit

ALIPAY = Identity(Role.INSTITUTION, "INST_ALIPAY")
WECHAT = Identity(Role.INSTITUTION, "INST_WECHAT")
ICBC = Identity(Role.BANK, "BANK_ICBC")
CALL_TIMEOUT_S = 5.0
README = (Path(__file__).resolve().parents[2] / "README.md").read_text()
# A host name (RFC 1123): at most 253 characters, labels of 1 to 63 letters, digits, '-'.
DNS_NAME_CHARS_MAX = 253
HOST_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


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


@settings(max_examples=300, deadline=None)
@given(a=st.from_regex(NAME_PATTERN, fullmatch=True), b=st.from_regex(NAME_PATTERN, fullmatch=True))
def test_identity_dns_names_are_host_names_that_map_back_one_to_one(a: str, b: str) -> None:
    for role in Role:
        ident = Identity(role, a)
        name = pki.identity_dns_name(ident)
        assert len(name) <= DNS_NAME_CHARS_MAX
        labels = name.split(".")
        assert all(HOST_LABEL.fullmatch(label) for label in labels), name
        assert pki.identity_of_dns_name(name) == ident
        assert pki.identity_of_dns_name(name.upper()) == ident  # host names ignore case
        other = Identity(role, b)
        assert (pki.identity_dns_name(other) == name) == (other == ident)
    assert pki.identity_dns_name(Identity(Role.BANK, a)) != pki.identity_dns_name(
        Identity(Role.INSTITUTION, a)
    )


def test_identity_dns_names_keep_case_and_underscores_apart() -> None:
    names = ["INST_ALIPAY", "inst_alipay", "INST-ALIPAY", "INST.ALIPAY", "INSTALIPAY", "A" * 64]
    encoded = {pki.identity_dns_name(Identity(Role.INSTITUTION, n)) for n in names}
    assert len(encoded) == len(names)
    # The names README.md shows (its grpcurl -servername examples).
    assert pki.identity_dns_name(ALIPAY) == (
        "494e53545f414c49504159.institution.id.clearing-switch.invalid"
    )
    for zone in ("beijing-a", "shanghai-a", "shanghai-b", "shenzhen-a"):
        name = pki.identity_dns_name(pki.node(zone))
        assert name == f"{zone.encode().hex()}.node.id.clearing-switch.invalid"
        assert name.removesuffix("id.clearing-switch.invalid") in README, zone
    assert pki.identity_dns_name(pki.node("beijing-a")) in README
    suffix = pki.IDENTITY_DNS_SUFFIX
    junk = ["localhost", "127.0.0.1", f"zz.bank.{suffix}", f"41.root.{suffix}",
            f"5f41.bank.{suffix}", f"bank.{suffix}", f"41.bank.{suffix}.evil"]  # fmt: skip
    for name in junk:
        assert pki.identity_of_dns_name(name) is None, name


def _extensions(ca: pki.LocalCA, who: Identity) -> x509.Extensions:
    return x509.load_pem_x509_certificate(ca.load(who).cert_pem).extensions


@pytest.mark.parametrize(
    ("who", "server"),
    [(ALIPAY, False), (pki.operator(), False), (pki.auditor(), False),
     (ICBC, True), (pki.node("beijing-a"), True)],
    ids=str,
)  # fmt: skip
def test_leaf_certificates_say_what_their_key_is_for(
    ca: pki.LocalCA, who: Identity, server: bool
) -> None:
    ca.issue(who, ips=["127.0.0.1"] if server else [])
    ext = _extensions(ca, who)
    usage = ext.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.digital_signature and not usage.value.key_encipherment  # ECDSA
    assert not (usage.value.key_cert_sign or usage.value.crl_sign)
    eku = set(ext.get_extension_for_class(x509.ExtendedKeyUsage).value)
    want = {ExtendedKeyUsageOID.CLIENT_AUTH} | (
        {ExtendedKeyUsageOID.SERVER_AUTH} if server else set()
    )
    assert eku == want
    san = ext.get_extension_for_class(x509.SubjectAlternativeName).value
    assert pki.identity_dns_name(who) in san.get_values_for_type(x509.DNSName)
    if not server:
        with pytest.raises(ValueError, match="client-only"):
            ca.issue(who, ips=["127.0.0.1"])


def test_a_client_only_certificate_cannot_serve(ca: pki.LocalCA) -> None:
    """An institution's certificate (clientAuth only) presented by a server is refused by
    TLS even to a client that expects exactly that identity."""
    ca.issue(ALIPAY)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_secure_port("127.0.0.1:0", pki.server_credentials(ca.load(ALIPAY)))
    server.start()
    try:
        ca.issue(pki.operator())
        channel = pki.secure_channel(f"127.0.0.1:{port}", ca.load(pki.operator()), server=ALIPAY)
        stub = health_pb2_grpc.HealthStub(channel)
        code = _code(lambda: stub.Check(health_pb2.HealthCheckRequest(), timeout=5))
        assert code is grpc.StatusCode.UNAVAILABLE, code
    finally:
        server.stop(0)


def _issue_without_identity_name(ca: pki.LocalCA, who: Identity, ips: list[str]) -> None:
    """A certificate as versions before identity names issued it: only the addresses."""
    ca_cert = x509.load_pem_x509_certificate(ca.ca_cert_path.read_bytes())
    ca_key = serialization.load_pem_private_key(ca.ca_key_path.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, who.common_name)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=9))
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address(a)) for a in ips]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    folder = ca.folder(who)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _dns_names(pem: bytes) -> list[str]:
    cert = x509.load_pem_x509_certificate(pem)
    return cert.extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value.get_values_for_type(x509.DNSName)  # type: ignore[no-any-return]


def test_certificates_from_before_identity_names_are_reissued(
    ca: pki.LocalCA, tmp_path: Path
) -> None:
    node = pki.node("beijing-a")
    ca_pem = ca.ca_cert_path.read_bytes()
    # ensure(): a server certificate lacking its name is issued again, addresses kept.
    _issue_without_identity_name(ca, node, ["127.0.1.1"])
    old = (ca.folder(node) / "cert.pem").read_bytes()
    ca.ensure(node, ips=["127.0.1.1"])
    new = ca.load(node).cert_pem
    assert new != old and pki.identity_dns_name(node) in _dns_names(new)
    # load(): the same, keeping the addresses the old certificate had.
    _issue_without_identity_name(ca, ICBC, ["127.0.0.7"])
    pair = ca.load(ICBC)
    assert pki.identity_dns_name(ICBC) in _dns_names(pair.cert_pem)
    ext = x509.load_pem_x509_certificate(pair.cert_pem).extensions
    san = ext.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.7"]
    assert ca.ca_cert_path.read_bytes() == ca_pem  # the authority stays
    # Without the CA's key (a participant's copy), loading says how to get a new one.
    copy = pki.LocalCA(tmp_path / "copy")
    (copy.directory / "ca").mkdir(parents=True)
    (copy.directory / "ca" / "ca.pem").write_bytes(ca_pem)
    _issue_without_identity_name(ca, WECHAT, [])
    shutil.copytree(ca.folder(WECHAT), copy.folder(WECHAT))
    with pytest.raises(pki.OutdatedCertificate, match="pki issue institution INST_WECHAT"):
        copy.load(WECHAT)


@pytest.mark.parametrize(
    "name", ["ca", "CA", "node-beijing-a", "operator-operator", "Auditor-kpmg", "NODE-x"]
)
def test_a_participant_id_that_names_another_roles_folder_is_refused(
    ca: pki.LocalCA, name: str
) -> None:
    ca_files = sorted(p.read_bytes() for p in (ca.ca_cert_path, ca.ca_key_path))
    for role in (Role.INSTITUTION, Role.BANK):
        with pytest.raises(pki.IdentityConflict):
            ca.issue(Identity(role, name))
    assert sorted(p.read_bytes() for p in (ca.ca_cert_path, ca.ca_key_path)) == ca_files
    assert not (ca.directory / name).exists() or name.casefold() == "ca"


def test_a_bank_and_an_institution_never_share_a_folder(ca: pki.LocalCA) -> None:
    inst = Identity(Role.INSTITUTION, "SAME_ID")
    bank = Identity(Role.BANK, "SAME_ID")
    ca.issue(inst)
    before = ca.load(inst)
    with pytest.raises(pki.IdentityConflict, match="institution:SAME_ID"):
        ca.issue(bank, ips=["127.0.0.1"])
    with pytest.raises(pki.IdentityConflict):
        ca.ensure(bank, ips=["127.0.0.1"])
    assert ca.load(inst) == before  # untouched
    # A folder whose certificate names someone else is never loaded as the identity asked.
    with pytest.raises(pki.IdentityMismatch, match="institution:SAME_ID"):
        ca.load(bank)
    ca.issue(ICBC, ips=["127.0.0.1"])
    ca.issue(WECHAT)
    shutil.copy(ca.folder(ICBC) / "cert.pem", ca.folder(WECHAT) / "cert.pem")
    with pytest.raises(pki.IdentityMismatch, match="bank:BANK_ICBC"):
        ca.load(WECHAT)


def test_pki_issue_refuses_a_reserved_name_on_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = argparse.Namespace(
        dir=tmp_path / "pki", cmd="issue", role="institution", name="node-beijing-a",
        ip=[], dns=[], out=None,
    )  # fmt: skip
    assert pki_cli.run(args) == 1
    assert "node-beijing-a" in capsys.readouterr().err
    assert not (tmp_path / "pki" / "node-beijing-a").exists()


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

    def ListPayments(self, request: Any, context: Any) -> Any:
        self.calls.append(request)
        return payment_pb2.ListPaymentsResponse()


class RecordingAdmin(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self) -> None:
        self.calls: list[Any] = []

    def GetParticipant(self, request: Any, context: Any) -> Any:
        self.calls.append(request)
        return admin_pb2.GetParticipantResponse()

    def RegisterParticipant(self, request: Any, context: Any) -> Any:
        self.calls.append(request)
        return admin_pb2.RegisterParticipantResponse()

    def UpdateParticipant(self, request: Any, context: Any) -> Any:
        self.calls.append(request)
        return admin_pb2.UpdateParticipantResponse()

    def SetNetDebitCap(self, request: Any, context: Any) -> Any:
        self.calls.append(request)
        return admin_pb2.SetNetDebitCapResponse()


class Recorder:
    """Every unary method of some services: records (method, request), answers empty."""

    def __init__(self, *files: Any) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.handlers = [self._service(svc) for f in files for svc in f.services_by_name.values()]

    def _service(self, svc: Any) -> grpc.GenericRpcHandler:
        def behaviour(name: str, response: Any) -> Any:
            def call(request: Any, context: Any) -> Any:
                self.calls.append((name, request))
                return response()

            return call

        return grpc.method_handlers_generic_handler(
            svc.full_name,
            {
                m.name: grpc.unary_unary_rpc_method_handler(
                    behaviour(m.name, GetMessageClass(m.output_type)),
                    request_deserializer=GetMessageClass(m.input_type).FromString,
                    response_serializer=lambda msg: msg.SerializeToString(),
                )
                for m in svc.methods
                if not (m.client_streaming or m.server_streaming)
            },
        )


class Server:
    def __init__(
        self, ca: pki.LocalCA, quota_per_s: int = 0, revoked: RevocationList | None = None
    ) -> None:
        ca.ensure(pki.node("beijing-a"), ips=["127.0.0.1"])
        self.payments = RecordingPayments()
        self.admin = RecordingAdmin()
        # Audit, settlement and the node-to-node API: what reached them.
        self.others = Recorder(
            audit_pb2.DESCRIPTOR, settlement_pb2.DESCRIPTOR, shard_pb2.DESCRIPTOR
        )
        limiter = RateLimiter(lambda _key: quota_per_s)
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=4),
            interceptors=[SecurityInterceptor(SWITCH_POLICY, limiter, revoked=revoked)],
        )
        payment_pb2_grpc.add_PaymentServiceServicer_to_server(self.payments, self.server)
        admin_pb2_grpc.add_AdminServiceServicer_to_server(self.admin, self.server)
        self.server.add_generic_rpc_handlers(self.others.handlers)
        health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), self.server)
        keys = ca.load(pki.node("beijing-a"))
        self.port = self.server.add_secure_port("127.0.0.1:0", pki.server_credentials(keys))
        self.server.start()
        self.target = f"127.0.0.1:{self.port}"

    def channel(self, ca: pki.LocalCA, who: Identity) -> grpc.Channel:
        ca.ensure(who)
        return pki.secure_channel(self.target, ca.load(who), server=pki.node("beijing-a"))


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


def _denied(call: Any) -> None:
    try:
        call()
    except grpc.RpcError as e:
        assert isinstance(e, grpc.Call)
        assert e.code() is grpc.StatusCode.PERMISSION_DENIED, e
        err = error_details(e)
        assert err is not None and err.reason == "NOT_AUTHORIZED", err
    else:
        pytest.fail("the call was let through")


def test_an_institution_lists_only_its_own_payments(server: Server, ca: pki.LocalCA) -> None:
    as_alipay = payment_pb2_grpc.PaymentServiceStub(server.channel(ca, ALIPAY))
    _denied(
        lambda: as_alipay.ListPayments(
            payment_pb2.ListPaymentsRequest(institution_id="INST_WECHAT"), timeout=CALL_TIMEOUT_S
        )
    )
    assert server.payments.calls == []
    as_alipay.ListPayments(
        payment_pb2.ListPaymentsRequest(institution_id="INST_ALIPAY"), timeout=CALL_TIMEOUT_S
    )
    assert [c.institution_id for c in server.payments.calls] == ["INST_ALIPAY"]


def _settle(stub: Any) -> Any:
    return stub.ConfirmSettlement(
        settlement_pb2.ConfirmSettlementRequest(window_id=1, reference="RTGS-1"),
        timeout=CALL_TIMEOUT_S,
    )


def _update(stub: Any) -> Any:
    return stub.UpdateParticipant(
        admin_pb2.UpdateParticipantRequest(
            participant=admin_pb2.Participant(participant_id="INST_ALIPAY", name="renamed")
        ),
        timeout=CALL_TIMEOUT_S,
    )


def _set_cap(stub: Any) -> Any:
    return stub.SetNetDebitCap(
        admin_pb2.SetNetDebitCapRequest(
            participant_id="INST_ALIPAY", cap=common_pb2.Money(amount_minor=1, currency="CNY")
        ),
        timeout=CALL_TIMEOUT_S,
    )


def test_an_auditor_never_settles_nor_changes_a_participant(
    server: Server, ca: pki.LocalCA
) -> None:
    channel = server.channel(ca, pki.auditor())
    settlement = settlement_pb2_grpc.SettlementServiceStub(channel)
    admin = admin_pb2_grpc.AdminServiceStub(channel)
    for call in (lambda: _settle(settlement), lambda: _update(admin), lambda: _set_cap(admin)):
        _denied(call)
    assert server.admin.calls == [] and server.others.calls == []
    # The operator's same calls reach the servicers: the refusals were the auditor's.
    operator = server.channel(ca, pki.operator())
    _settle(settlement_pb2_grpc.SettlementServiceStub(operator))
    _update(admin_pb2_grpc.AdminServiceStub(operator))
    _set_cap(admin_pb2_grpc.AdminServiceStub(operator))
    assert [n for n, _ in server.others.calls] == ["ConfirmSettlement"]
    assert [type(c).__name__ for c in server.admin.calls] == [
        "UpdateParticipantRequest",
        "SetNetDebitCapRequest",
    ]


def _submit_owned(stub: Any) -> Any:
    request = shard_pb2.SubmitOwnedRequest(
        orders=[_order("INST_ALIPAY")], paths=["order"], received_zone="beijing-a"
    )
    return stub.SubmitOwned(request, timeout=CALL_TIMEOUT_S)


def _lend(stub: Any) -> Any:
    request = shard_pb2.LendRequest(
        participant_id="BANK_ICBC", currency="CNY", for_shard=1, need_minor=10**9
    )
    return stub.Lend(request, timeout=CALL_TIMEOUT_S)


def _repay(stub: Any) -> Any:
    request = shard_pb2.RepayRequest(
        participant_id="BANK_ICBC", currency="CNY", from_shard=1, returned_total_minor=10**9
    )
    return stub.Repay(request, timeout=CALL_TIMEOUT_S)


@pytest.mark.parametrize("who", [pki.operator(), pki.auditor(), ICBC, ALIPAY], ids=str)
def test_only_nodes_submit_to_owners_or_borrow_cap(
    server: Server, ca: pki.LocalCA, who: Identity
) -> None:
    shard = shard_pb2_grpc.ShardServiceStub(server.channel(ca, who))
    _denied(lambda: _submit_owned(shard))
    _denied(lambda: _lend(shard))
    _denied(lambda: _repay(shard))  # a participant cannot hand itself headroom
    assert server.others.calls == []  # no order processed, no cap lent or taken back
    as_node = shard_pb2_grpc.ShardServiceStub(server.channel(ca, pki.node("shanghai-a")))
    _submit_owned(as_node)
    _lend(as_node)
    _repay(as_node)
    assert [n for n, _ in server.others.calls] == ["SubmitOwned", "Lend", "Repay"]


def test_a_bank_does_not_administer_the_switch(server: Server, ca: pki.LocalCA) -> None:
    admin = admin_pb2_grpc.AdminServiceStub(server.channel(ca, ICBC))
    register = admin_pb2.RegisterParticipantRequest(
        participant=admin_pb2.Participant(participant_id="BANK_EVIL")
    )
    for call in (
        lambda: admin.RegisterParticipant(register, timeout=CALL_TIMEOUT_S),
        lambda: _update(admin),
        lambda: _set_cap(admin),
        lambda: admin.GetParticipant(
            admin_pb2.GetParticipantRequest(participant_id="BANK_ICBC"), timeout=CALL_TIMEOUT_S
        ),
    ):
        _denied(call)
    assert server.admin.calls == []


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
    args = argparse.Namespace(
        dir=tmp_path, cmd="sign-order", order_json=json.dumps(order), key=None
    )
    assert pki_cli.run(args) == 0
    request = json_format.Parse(capsys.readouterr().out, payment_pb2.SubmitPaymentRequest())
    pk = public_key_bytes(key)
    verify_signed_order(order_from_pb(request.order), {key_id_of(pk): pk})
    # A key that is not the institution's is not found: nothing is printed to sign with.
    order["institution_id"] = "INST_OTHER"
    args.order_json = json.dumps(order)
    assert pki_cli.run(args) == 1


# -- what a listing costs --------------------------------------------------------------------


def test_a_listing_costs_one_unit_per_row_its_page_may_hold() -> None:
    listings: dict[str, Any] = {
        "/clearing.v1.PaymentService/ListPayments": payment_pb2.ListPaymentsRequest,
        "/clearing.v1.AuditService/ListParticipantPayments": (
            audit_pb2.ListParticipantPaymentsRequest
        ),
    }
    sizes = [0, 1, 37, 100, 500, 501, 2**31 - 1, -5]
    for method, request in listings.items():
        cost = SWITCH_POLICY[method].cost
        assert cost is not None, method
        assert [cost(request(page_size=n)) for n in sizes] == [100, 1, 37, 100, 500, 500, 500, 100]
    # One payment read: one unit.
    assert SWITCH_POLICY["/clearing.v1.PaymentService/GetPayment"].cost is None


def test_a_large_page_spends_the_quota_that_many_reads_would(ca: pki.LocalCA) -> None:
    s = Server(ca, quota_per_s=100)
    try:
        alipay = payment_pb2_grpc.PaymentServiceStub(s.channel(ca, ALIPAY))

        def page(size: int) -> Any:
            request = payment_pb2.ListPaymentsRequest(institution_id="INST_ALIPAY", page_size=size)
            return alipay.ListPayments(request, timeout=CALL_TIMEOUT_S)

        page(100)  # the whole bucket
        try:
            page(100)
        except grpc.RpcError as e:
            assert isinstance(e, grpc.Call)
            assert e.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, e
            err = error_details(e)
            assert err is not None and err.reason == "RATE_LIMITED"
            assert err.retry_after_ms >= 500  # most of a full bucket, at 100 units/s
        else:
            pytest.fail("a second page of 100 within a second of a quota of 100/s passed")
        assert len(s.payments.calls) == 1
    finally:
        s.server.stop(0)


# -- private keys stay out of work trees -------------------------------------------------------

GIT = shutil.which("git")


def _git(*args: str, cwd: Path) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


@pytest.mark.skipif(GIT is None, reason="needs git")
def test_pki_issue_out_refuses_a_key_git_would_commit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tree = tmp_path / "checkout"
    tree.mkdir()
    _git("init", "-q", cwd=tree)

    def issue(out: Path) -> int:
        args = argparse.Namespace(
            dir=tmp_path / "pki", cmd="issue", role="institution", name="INST_NEWPAY",
            ip=[], dns=[], out=out,
        )  # fmt: skip
        return pki_cli.run(args)

    assert issue(tree / "inst_newpay") == 1
    assert "not git-ignored" in capsys.readouterr().err
    assert not (tree / "inst_newpay").exists()
    assert not (tmp_path / "pki" / "INST_NEWPAY").exists()  # refused before issuing
    # Git-ignored there: allowed; outside any work tree: allowed.
    (tree / ".gitignore").write_text("*.pem\n")
    assert issue(tree / "inst_newpay") == 0
    assert (tree / "inst_newpay" / "key.pem").is_file()
    assert issue(tmp_path / "handover") == 0
    assert (tmp_path / "handover" / "key.pem").is_file()


@pytest.mark.skipif(GIT is None, reason="needs git")
def test_this_repository_ignores_pem_files() -> None:
    root = Path(__file__).resolve().parents[2]
    inside = subprocess.run(
        ["git", "rev-parse", "--is-inside-work-tree"],
        cwd=root, capture_output=True, timeout=30, check=False,
    )  # fmt: skip
    if inside.returncode != 0:
        pytest.skip("not a git checkout")
    for name in ("inst_newpay/key.pem", "cert.pem", "kpmg/ca.pem", "x/signing-key.pem"):
        r = subprocess.run(
            ["git", "check-ignore", "-q", "--no-index", name],
            cwd=root, capture_output=True, timeout=30, check=False,
        )  # fmt: skip
        assert r.returncode == 0, name


# -- an institution's own signing key ------------------------------------------------------------


def _pki(tmp_path: Path, *argv: str) -> int:
    parser = argparse.ArgumentParser()
    pki_cli.add_parser(parser.add_subparsers(dest="group"))
    args = parser.parse_args(["pki", "--dir", str(tmp_path / "pki"), *argv])
    return pki_cli.run(args)


def test_an_institution_makes_its_own_key_and_signs_with_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key_file = tmp_path / "home" / "inst_newpay-signing.pem"
    assert _pki(tmp_path, "signing-key", "new", "--out", str(key_file)) == 0
    printed = json_format.Parse(capsys.readouterr().out, admin_pb2.SigningKey())
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    key = pki_cli.read_signing_key(key_file)
    # What RegisterParticipant takes: the raw 32-byte key and its id.
    assert printed.public_key == public_key_bytes(key) and len(printed.public_key) == 32
    assert printed.key_id == key_id_of(printed.public_key)
    assert _pki(tmp_path, "signing-key", "public", "--key", str(key_file)) == 0
    assert json_format.Parse(capsys.readouterr().out, admin_pb2.SigningKey()) == printed
    # Never overwritten: the key may be registered already.
    assert _pki(tmp_path, "signing-key", "new", "--out", str(key_file)) == 1
    assert pki_cli.read_signing_key(key_file).private_bytes_raw() == key.private_bytes_raw()
    capsys.readouterr()
    # sign-order with it: the operator's key store holds no key for this institution.
    order = {
        "payment_id": "p-9", "institution_id": "INST_NEWPAY", "type": "PAYMENT_TYPE_CREDIT",
        "payer_id": "INST_NEWPAY", "payee_id": "BANK_ICBC", "bank_account": "62220200",
        "amount": {"amount_minor": 500, "currency": "CNY"}, "requested_at": "2026-11-25T04:20:00Z",
    }  # fmt: skip
    assert _pki(tmp_path, "sign-order", json.dumps(order)) == 1  # no key in the store
    capsys.readouterr()
    assert _pki(tmp_path, "sign-order", "--key", str(key_file), json.dumps(order)) == 0
    request = json_format.Parse(capsys.readouterr().out, payment_pb2.SubmitPaymentRequest())
    verify_signed_order(order_from_pb(request.order), {printed.key_id: printed.public_key})
    assert not (tmp_path / "pki" / "INST_NEWPAY").exists()  # nothing of it in the CA folder


def test_a_refusal_quotes_a_long_name_clipped() -> None:
    """A caller's 100,000-character institution id was echoed whole into the status and
    the trailer (past gRPC's 16 KiB metadata limit): quoted names are clipped."""
    caller = Identity(Role.INSTITUTION, "INST_A")
    long_id = "X" * 100_000
    order = SimpleNamespace(institution_id=long_id)
    why = authz._own_order(caller, SimpleNamespace(order=order))
    assert why is not None and len(why) < 200 and "(100000 characters)" in why
    others = [SimpleNamespace(institution_id=f"INST_{i}") for i in range(8)]
    why = authz._own_orders(caller, SimpleNamespace(orders=[*others, order]))
    assert why is not None and "and 4 more" in why and len(why) < 400
    assert authz._own_orders(caller, SimpleNamespace(orders=[SimpleNamespace(
        institution_id="INST_A")])) is None  # fmt: skip
