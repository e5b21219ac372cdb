"""``clearingctl pki ...`` refusing bad input and reporting failed calls in one line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest

from clearing.v1 import common_pb2
from clearinghouse import topology
from clearinghouse.cli import build_parser
from clearinghouse.domain.errors import ERROR_METADATA_KEY
from clearinghouse.security import cli as pki_cli
from tests.unit.test_audit_cli import FakeChannel, FakeRpcError

pytestmark = pytest.mark.unit


def _pki(tmp_path: Path, *argv: str, **kw: Any) -> int:
    args = build_parser().parse_args(["pki", "--dir", str(tmp_path / "pki"), *argv])
    return pki_cli.run(args, **kw)


@pytest.mark.parametrize(
    ("order", "said"),
    [
        ('{"payment_id":"x"', "Expecting ',' delimiter"),  # not JSON
        ('{"bogus_field":1}', 'no field named "bogus_field"'),  # not a PaymentOrder
        (  # a PaymentOrder the switch would refuse: what is wrong with it
            '{"payment_id":"x","institution_id":"INST_ALIPAY"}',
            "the order is not valid, not signed: order.type: must be DEBIT or CREDIT",
        ),
    ],
)
def test_sign_order_says_what_is_wrong_with_the_order(
    order: str, said: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "keys" / "signing.pem"
    assert _pki(tmp_path, "signing-key", "new", "--out", str(key)) == 0
    capsys.readouterr()
    assert _pki(tmp_path, "sign-order", "--key", str(key), order) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("clearingctl: ") and captured.err.count("\n") == 1
    assert said in captured.err


class _Channel(FakeChannel):
    """A FakeChannel used as ``with ... as channel``, as ``pki revoke`` uses its channel."""

    def __enter__(self) -> _Channel:
        return self

    def __exit__(self, *_: object) -> None:
        pass


def _node_answers(monkeypatch: pytest.MonkeyPatch, answers: dict[str, Any]) -> None:
    """The switch node that ``pki revoke``/``revoked`` calls answers from ``answers``."""

    class Credentials:
        def channel(self, *_: Any, **__: Any) -> _Channel:
            return _Channel(answers)

    monkeypatch.setattr("clearinghouse.client.local_credentials", Credentials)


def test_a_revocation_call_the_node_never_answered_names_the_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    down = FakeRpcError(grpc.StatusCode.UNAVAILABLE, details="failed to connect to all addresses")
    _node_answers(monkeypatch, {"ListRevokedCertificates": down})
    topo = topology.load()
    zone = topo.zones[0]
    log = tmp_path / "switch.log"
    assert _pki(tmp_path, "revoked", topo=topo, switch_log=lambda _zone: log) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and not err.endswith(" \n")  # one line, no trailing space
    assert err.startswith(
        f"clearingctl: UNAVAILABLE: failed to connect to all addresses (switch node "
        f"{zone.name} at {zone.address}:{zone.ports.switch}); is the switch node up?"
    )
    assert err.endswith(f"log {log}\n")


def test_a_revocation_refused_names_its_reason_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    err = common_pb2.Error(reason="NOT_FOUND", message="no certificate with serial 7a3f")
    refused = FakeRpcError(
        grpc.StatusCode.NOT_FOUND, ((ERROR_METADATA_KEY, err.SerializeToString()),)
    )
    _node_answers(monkeypatch, {"RevokeCertificate": refused})
    argv = ("revoke", "--serial", "7a3f", "--identity", "operator:bob", "--reason", "left")
    assert _pki(tmp_path, *argv, topo=topology.load()) == 1
    line = capsys.readouterr().err
    assert line.startswith("clearingctl: NOT_FOUND: no certificate with serial 7a3f (switch node")
    assert line.count("NOT_FOUND") == 1
