"""Revoked client certificates: the operator's request, what is stored, and the check on
every call (through real TLS, so the serial is read from the certificate gRPC saw)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from cryptography import x509

from clearing.v1 import admin_pb2, admin_pb2_grpc, payment_pb2, payment_pb2_grpc
from clearinghouse.client import error_details
from clearinghouse.domain.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    Unauthenticated,
)
from clearinghouse.security import pki, revocation
from clearinghouse.security.identity import Identity, Role
from clearinghouse.security.revocation import (
    REVOKES_CALLER,
    RevocationList,
    Revocations,
    RevokedCertificate,
    parse_serial,
    serial_hex,
)
from clearinghouse.storage.revocations import CassandraRevocations
from clearinghouse.switch.convert import revoked_to_pb, ts_to_us
from tests.fakes import FakeClock, FakeCqlSession
from tests.unit.test_security import ALIPAY, CALL_TIMEOUT_S, ICBC, Server

pytestmark = pytest.mark.unit

OPERATOR = pki.operator()
OPERATOR_SERIAL = 0xABCDEF


def test_serials_parse_as_openssl_and_browsers_print_them() -> None:
    assert parse_serial("7A3F") == 0x7A3F
    assert parse_serial("7a:3f") == 0x7A3F
    assert parse_serial(" 0x7a3f ") == 0x7A3F
    assert parse_serial("00:7a") == 0x7A
    assert parse_serial("f" * 40) == 2**160 - 1  # 20 octets: the most RFC 5280 allows
    for bad in ("", "0", "00", "0x", "f" * 41, "7g", "-1", "1 2", ":"):
        assert parse_serial(bad) is None, bad
    # One key however it was written: what is stored and what a call is checked against.
    assert {serial_hex(parse_serial(t) or 0) for t in ("00:7A:3F", "7a3f", "0x007A3F")} == {"7a3f"}


def test_a_refresh_never_admits_again_what_this_node_just_revoked() -> None:
    revoked = RevocationList()
    before = [RevokedCertificate(1, "institution:INST_X", "lost", 1, "operator:operator")]
    revoked.merge(before)
    revoked.add(2)  # taken here, after a refresh read the table
    revoked.merge(before)  # that refresh lands
    assert len(revoked) == 2


# -- the operator's request and what is stored --------------------------------------------


class World:
    def __init__(self) -> None:
        self.session = FakeCqlSession()
        self.clock = FakeClock()
        self.revoked = RevocationList()
        self.revocations = Revocations(CassandraRevocations(self.session), self.revoked, self.clock)

    def revoke(self, serial: str, identity: str = "institution:INST_X", reason: str = "key lost",
               *, by_serial: int | None = OPERATOR_SERIAL) -> RevokedCertificate:  # fmt: skip
        return self.revocations.revoke(serial, identity, reason, by=OPERATOR, by_serial=by_serial)

    def stored(self) -> Any:
        return copy.deepcopy(self.session.tables["revoked_certificates"])


@pytest.fixture
def world() -> World:
    return World()


def test_a_revocation_is_stored_once_and_a_retry_returns_it(world: World) -> None:
    first = world.revoke("7A:3F")
    assert first == RevokedCertificate(
        0x7A3F, "institution:INST_X", "key lost", world.clock.now_us, "operator:operator"
    )
    world.clock.sleep(5.0)
    assert world.revoke("7a3f") == first  # the same request again: the first revocation
    assert world.revoke("0x7A3F") == first
    assert world.revocations.all() == [first]
    assert len(world.stored()) == 1
    assert len(world.revoked) == 1


def test_the_same_serial_for_another_identity_or_reason_is_already_exists(world: World) -> None:
    first = world.revoke("7a3f")
    before = world.stored()
    for identity, reason in (("institution:INST_Y", "key lost"), ("institution:INST_X", "other")):
        with pytest.raises(AlreadyExists) as e:
            world.revoke("7a3f", identity, reason)
        assert e.value.reason == "CERTIFICATE_ALREADY_REVOKED"
        assert "INST_X" in str(e.value)
    assert world.stored() == before
    assert world.revocations.all() == [first]


def test_revocations_are_listed_oldest_first(world: World) -> None:
    made = []
    for serial in ("ff", "01", "a0"):
        made.append(world.revoke(serial))
        world.clock.sleep(1.0)
    assert world.revocations.all() == made


def test_pages_list_every_revocation_once_oldest_first(world: World) -> None:
    made = []
    for i, serial in enumerate(("ff", "01", "a0", "0b", "c3")):
        made.append(world.revoke(serial))
        if i != 2:  # two revocations in the same microsecond: ordered by serial
            world.clock.sleep(1.0)
    made.sort(key=lambda r: (r.revoked_at_us, r.serial))
    seen, token, pages = [], "", 0
    while True:
        page, token = world.revocations.page(2, token)
        pages += 1
        seen += page
        if not token:
            break
    assert (seen, pages) == (made, 3)
    assert world.revocations.page(0, "") == (made, "")  # the default page holds them all
    assert world.revocations.page(5, "")[1] == ""


@pytest.mark.parametrize(
    ("size", "token", "fields"),
    [(-1, "", {"page_size"}), (1001, "", {"page_size"}), (0, "7a3f", {"page_token"}),
     (0, "x.7a3f", {"page_token"}), (0, "1." + "f" * 70, {"page_token"}),
     (-1, "1.", {"page_size", "page_token"})],
)  # fmt: skip
def test_a_bad_page_request_is_invalid_argument(
    world: World, size: int, token: str, fields: set[str]
) -> None:
    with pytest.raises(InvalidArgument) as e:
        world.revocations.page(size, token)
    assert {v.field for v in e.value.violations} == fields


@pytest.mark.parametrize(
    ("serial", "identity", "reason", "fields"),
    [
        ("", "institution:INST_X", "lost", {"serial"}),
        ("not-hex", "institution:INST_X", "lost", {"serial"}),
        ("0", "institution:INST_X", "lost", {"serial"}),
        ("f" * 41, "institution:INST_X", "lost", {"serial"}),
        ("7a3f", "INST_X", "lost", {"identity"}),
        ("7a3f", "king:INST_X", "lost", {"identity"}),
        ("7a3f", "institution:" + "X" * 120, "lost", {"identity"}),
        ("7a3f", "institution:INST_X", "   ", {"reason"}),
        ("7a3f", "institution:INST_X", "x" * 501, {"reason"}),
        ("", "", "", {"serial", "identity", "reason"}),
    ],
)
def test_a_malformed_request_is_invalid_argument_and_writes_nothing(
    world: World, serial: str, identity: str, reason: str, fields: set[str]
) -> None:
    with pytest.raises(InvalidArgument) as e:
        world.revoke(serial, identity, reason)
    assert {v.field for v in e.value.violations} == fields
    assert world.stored() == {}
    assert len(world.revoked) == 0


def test_the_certificate_of_the_call_itself_is_not_revoked(world: World) -> None:
    with pytest.raises(FailedPrecondition) as e:
        world.revoke(serial_hex(OPERATOR_SERIAL), "operator:operator")
    assert e.value.reason == REVOKES_CALLER
    assert world.stored() == {}


def test_a_call_without_a_certificate_revokes_nothing(world: World) -> None:
    with pytest.raises(Unauthenticated):
        world.revocations.revoke("7a3f", "institution:INST_X", "lost", by=None, by_serial=None)
    assert world.stored() == {}


def test_a_revocation_reads_back_as_the_api_shows_it(world: World) -> None:
    r = world.revoke("00:7A:3F")
    pb = revoked_to_pb(r)
    assert (pb.serial, pb.identity, pb.reason, pb.revoked_by) == (
        "7a3f", "institution:INST_X", "key lost", "operator:operator"
    )  # fmt: skip
    assert ts_to_us(pb.revoked_at) == r.revoked_at_us
    assert isinstance(pb, admin_pb2.RevokedCertificate)


# -- the check on every call, through TLS --------------------------------------------------


@pytest.fixture
def revoked() -> RevocationList:
    return RevocationList()


@pytest.fixture
def server(ca: pki.LocalCA, revoked: RevocationList) -> Iterator[Server]:
    s = Server(ca, revoked=revoked)
    yield s
    s.server.stop(0)


def _serial_of(ca: pki.LocalCA, who: Identity) -> int:
    ca.ensure(who)
    return int(x509.load_pem_x509_certificate(ca.files(who).cert.read_bytes()).serial_number)


def _get(channel: grpc.Channel) -> grpc.StatusCode:
    stub = payment_pb2_grpc.PaymentServiceStub(channel)
    try:
        stub.GetPayment(
            payment_pb2.GetPaymentRequest(institution_id="INST_ALIPAY", payment_id="p-1"),
            timeout=CALL_TIMEOUT_S,
        )
    except grpc.RpcError as e:
        assert isinstance(e, grpc.Call)
        err = error_details(e)
        assert err is not None and err.reason == "CERTIFICATE_REVOKED", err
        return e.code()
    return grpc.StatusCode.OK


def _revocation(serial: int, who: Identity) -> RevokedCertificate:
    return RevokedCertificate(serial, who.common_name, "key lost", 1, "operator:operator")


def test_a_revoked_certificate_is_refused_on_a_connection_already_open(
    server: Server, ca: pki.LocalCA, revoked: RevocationList
) -> None:
    channel = server.channel(ca, ALIPAY)
    assert _get(channel) is grpc.StatusCode.OK
    reached = len(server.payments.calls)
    revoked.merge([_revocation(_serial_of(ca, ALIPAY), ALIPAY)])
    assert _get(channel) is grpc.StatusCode.UNAUTHENTICATED
    assert len(server.payments.calls) == reached  # the servicer never ran
    # A new connection with the same certificate too.
    assert _get(
        pki.secure_channel(server.target, ca.load(ALIPAY), server=pki.node("beijing-a"))
    ) is (grpc.StatusCode.UNAUTHENTICATED)


def test_other_certificates_and_a_reissued_one_still_get_in(
    server: Server, ca: pki.LocalCA, revoked: RevocationList
) -> None:
    old = _serial_of(ca, ALIPAY)
    revoked.merge([_revocation(old, ALIPAY)])
    assert _get(server.channel(ca, ALIPAY)) is grpc.StatusCode.UNAUTHENTICATED
    # Another identity's certificate: not revoked (it is refused by the policy only if
    # it may not call; a bank may not read an institution's payment).
    stub = payment_pb2_grpc.PaymentServiceStub(server.channel(ca, ICBC))
    with pytest.raises(grpc.RpcError) as e:
        request = payment_pb2.GetPaymentRequest(institution_id="INST_ALIPAY", payment_id="p-1")
        stub.GetPayment(request, timeout=CALL_TIMEOUT_S)
    assert e.value.code() is grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
    ca.issue(ALIPAY)  # the holder's new certificate (new key, new serial)
    assert _serial_of(ca, ALIPAY) != old
    fresh = pki.secure_channel(server.target, ca.load(ALIPAY), server=pki.node("beijing-a"))
    assert _get(fresh) is grpc.StatusCode.OK


def test_an_empty_list_reads_no_certificate(
    server: Server, ca: pki.LocalCA, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unreadable(_pem: bytes) -> int | None:
        raise AssertionError("parsed a certificate with nothing revoked")

    monkeypatch.setattr(revocation, "serial_of_pem", unreadable)
    assert _get(server.channel(ca, ALIPAY)) is grpc.StatusCode.OK


def test_a_certificate_that_cannot_be_read_is_refused_once_anything_is_revoked(
    server: Server, ca: pki.LocalCA, revoked: RevocationList, monkeypatch: pytest.MonkeyPatch
) -> None:
    channel = server.channel(ca, ALIPAY)
    revoked.add(0x7A3F)  # someone else's
    assert _get(channel) is grpc.StatusCode.OK
    monkeypatch.setattr(revocation, "serial_of_pem", lambda _pem: None)
    assert _get(channel) is grpc.StatusCode.UNAUTHENTICATED


def test_an_operator_certificate_is_revoked_like_any_other(
    server: Server, ca: pki.LocalCA, revoked: RevocationList
) -> None:
    operator = Identity(Role.OPERATOR, "mallory")
    stub = admin_pb2_grpc.AdminServiceStub(server.channel(ca, operator))
    request = admin_pb2.GetParticipantRequest(participant_id="INST_ALIPAY")
    stub.GetParticipant(request, timeout=CALL_TIMEOUT_S)
    revoked.add(_serial_of(ca, operator))
    with pytest.raises(grpc.RpcError) as e:
        stub.GetParticipant(request, timeout=CALL_TIMEOUT_S)
    assert e.value.code() is grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]


# -- clearingctl pki revoke: which certificate ----------------------------------------------


def _revoke_args(*argv: str) -> Any:
    import argparse  # noqa: PLC0415

    from clearinghouse.security import cli as pki_cli  # noqa: PLC0415

    parser = argparse.ArgumentParser()
    pki_cli.add_parser(parser.add_subparsers(dest="group"))
    return parser.parse_args(["pki", "revoke", *argv, "--reason", "lost"])


def test_pki_revoke_names_a_certificate_exactly_one_way(ca: pki.LocalCA, tmp_path: Any) -> None:
    from clearinghouse.security.cli import revocation_target  # noqa: PLC0415

    serial = serial_hex(_serial_of(ca, ALIPAY))
    assert revocation_target(_revoke_args("institution", "INST_ALIPAY"), ca) == (
        serial, "institution:INST_ALIPAY"
    )  # fmt: skip
    handed = tmp_path / "handed-over.pem"
    handed.write_bytes(ca.files(ALIPAY).cert.read_bytes())
    assert revocation_target(_revoke_args("--cert", str(handed)), ca) == (
        serial, "institution:INST_ALIPAY"
    )  # fmt: skip
    by_serial = _revoke_args("--serial", "7A:3F", "--identity", "operator:bob")
    assert revocation_target(by_serial, ca) == ("7A:3F", "operator:bob")  # not in the folder
    # A serial of a certificate in the CA folder must be named with its holder: the switch
    # stores the identity it is told, and a reviewer's typo listed a participant that
    # does not exist as the holder.
    own = _revoke_args("--serial", serial.upper(), "--identity", "institution:INST_ALIPAY")
    assert revocation_target(own, ca) == (serial.upper(), "institution:INST_ALIPAY")
    wrong = _revoke_args("--serial", serial, "--identity", "institution:INST_SOMEONE_ELSE")
    with pytest.raises(ValueError, match="is the certificate of institution:INST_ALIPAY"):
        revocation_target(wrong, ca)
    for argv in (
        (),
        ("--serial", "7a3f"),  # whose?
        ("institution", "INST_ALIPAY", "--serial", "7a3f", "--identity", "operator:bob"),
        ("institution", "INST_ALIPAY", "--cert", str(handed)),
        ("institution", "INST_NOBODY"),  # nothing issued
        ("--cert", str(handed), "--identity", "operator:bob"),
    ):
        with pytest.raises(ValueError):
            revocation_target(_revoke_args(*argv), ca)
