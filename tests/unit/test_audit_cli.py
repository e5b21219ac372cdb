"""``clearingctl audit ...`` and ``clearingctl window ...``: every subcommand parsed by the
real ``clearingctl`` parser and run through its handler over the real generated stubs,
on a fake channel that records each call and answers from a script.

A handler that reads an argument its parser does not define, or calls an RPC with the
wrong request, fails here; a subcommand added without a case here fails
``test_every_subcommand_is_covered``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from clearing.v1 import audit_pb2, common_pb2, payment_pb2, settlement_pb2
from clearinghouse.audit import cli as audit_cli
from clearinghouse.audit.export import MANIFEST_FILE, read_manifest, write_export
from clearinghouse.cli import build_parser
from clearinghouse.domain.chain import FIRST_SEQ, GENESIS_HASH, ChainBuilder
from clearinghouse.domain.entries import KIND_DECISION, KIND_INTENT
from clearinghouse.domain.errors import ERROR_METADATA_KEY
from clearinghouse.domain.merkle import MerkleTree
from clearinghouse.switch.records import payment_key
from tests.unit.test_audit_export import KINDS, SIGNING_KEYS, build_ledger

pytestmark = pytest.mark.unit

AUDIT = "/clearing.v1.AuditService/"
SETTLEMENT = "/clearing.v1.SettlementService/"


class FakeRpcError(grpc.RpcError, grpc.Call):  # type: ignore[misc]
    def __init__(self, code: grpc.StatusCode, trailers: tuple[tuple[str, bytes], ...] = ()):
        self._code, self._trailers = code, trailers

    def code(self) -> grpc.StatusCode:
        return self._code

    def trailing_metadata(self) -> Any:
        return self._trailers


class FakeChannel:
    """What the generated stubs need of a channel: each method records the request
    (serialized, as it would be sent) and answers from ``answers[method name]``: a
    response, a list of responses for a stream, or an exception to raise."""

    def __init__(self, answers: dict[str, Any]) -> None:
        self.answers = answers
        self.calls: list[tuple[str, Any]] = []

    def _record(self, method: str, request: Any, serializer: Callable[[Any], bytes]) -> Any:
        serializer(request)  # a request of the wrong type fails here, as it would in gRPC
        name = method.rsplit("/", 1)[1]
        self.calls.append((method, request))
        answer = self.answers[name]
        if isinstance(answer, Exception):
            raise answer
        return answer

    def unary_unary(self, method: str, request_serializer: Any = None, **_: Any) -> Any:
        def call(request: Any, timeout: float | None = None, **__: Any) -> Any:
            assert timeout is not None, "every call has a deadline"
            return self._record(method, request, request_serializer)

        return call

    def unary_stream(self, method: str, request_serializer: Any = None, **_: Any) -> Any:
        def call(request: Any, timeout: float | None = None, **__: Any) -> Iterator[Any]:
            assert timeout is not None, "every call has a deadline"
            return iter(self._record(method, request, request_serializer))

        return call


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


def run(answers: dict[str, Any], *argv: str) -> tuple[int, FakeChannel]:
    args = parse(*argv)
    channel = FakeChannel(answers)
    return audit_cli.call(args.group, args, channel), channel


def _payment(pid: str, participant: str = "INST_ALIPAY") -> Any:
    p = payment_pb2.Payment(state=common_pb2.PAYMENT_STATE_APPROVED, shard=3, ledger_seq=9)
    p.order.institution_id, p.order.payment_id = participant, pid
    p.order.amount.amount_minor, p.order.amount.currency = 100, "CNY"
    p.received_at.FromMicroseconds(1_790_000_000_000_000)
    return p


def _window_answer() -> Any:
    r = audit_pb2.GetWindowResponse(merkle_root=b"\x01" * 32, entry_count=9, payment_count=2)
    r.summary.window_id, r.summary.state = 3, "CLEARED"
    r.net_positions.add(participant_id="BANK_ICBC").net_debit.CopyFrom(
        common_pb2.Money(amount_minor=100, currency="CNY")
    )
    r.net_positions.add(participant_id="INST_ALIPAY").net_debit.CopyFrom(
        common_pb2.Money(amount_minor=-100, currency="CNY")
    )
    r.instructions.add(
        from_account="SETTLEMENT:BANK_ICBC", to_account="SWITCH:CNY"
    ).amount.CopyFrom(common_pb2.Money(amount_minor=100, currency="CNY"))
    return r


COVERED: set[tuple[str, str]] = set()


def covers(group: str, cmd: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    COVERED.add((group, cmd))
    return lambda f: f


# -- audit ------------------------------------------------------------------------------------


@covers("audit", "windows")
def test_windows(capsys: pytest.CaptureFixture[str]) -> None:
    answer = audit_pb2.ListWindowsResponse()
    answer.windows.add(window_id=4, state="OPEN")
    code, ch = run({"ListWindows": answer}, "audit", "windows", "--format", "json")
    assert code == 0
    assert ch.calls == [(AUDIT + "ListWindows", audit_pb2.ListWindowsRequest(page_size=50))]
    assert json.loads(capsys.readouterr().out)[0]["window"] == 4


@covers("audit", "window")
def test_window_csv_is_one_table_per_output(capsys: pytest.CaptureFixture[str]) -> None:
    answers = {"GetWindow": _window_answer()}
    code, ch = run(answers, "audit", "window", "3", "--format", "csv")
    assert code == audit_cli.EXIT_USAGE and ch.calls == []
    assert "--part" in capsys.readouterr().err
    expected = {
        "summary": (1, "merkle_root", "01" * 32),
        "net-positions": (2, "participant", "BANK_ICBC"),
        "instructions": (1, "from", "SETTLEMENT:BANK_ICBC"),
    }
    for part, (rows, column, first) in expected.items():
        code, ch = run(answers, "audit", "window", "3", "--format", "csv", "--part", part)
        assert code == 0
        assert ch.calls == [(AUDIT + "GetWindow", audit_pb2.GetWindowRequest(window_id=3))]
        table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
        assert len(table) == rows and table[0][column] == first, part
    code, _ = run(answers, "audit", "window", "3")  # a table: all three, for people
    out = capsys.readouterr().out
    assert code == 0 and "NET_DEBIT_MINOR" in out and "SWITCH:CNY" in out
    code, _ = run(answers, "audit", "window", "3", "--format", "json")
    assert json.loads(capsys.readouterr().out)["payments"] == 2


@covers("audit", "payment")
def test_payment(capsys: pytest.CaptureFixture[str]) -> None:
    answer = audit_pb2.GetPaymentHistoryResponse(payment=_payment("p1"), window_id=2)
    answer.entries.add(shard=3, epoch=1, seq=9, kind="INTENT", entry_hash=b"\x02" * 32)
    code, ch = run({"GetPaymentHistory": answer}, "audit", "payment", "INST_ALIPAY", "p1")
    assert code == 0
    req = audit_pb2.GetPaymentHistoryRequest(institution_id="INST_ALIPAY", payment_id="p1")
    assert ch.calls == [(AUDIT + "GetPaymentHistory", req)]
    assert "window 2" in capsys.readouterr().err


@covers("audit", "payments")
def test_payments_of_a_participant_page_through(capsys: pytest.CaptureFixture[str]) -> None:
    pages = iter([
        audit_pb2.ListParticipantPaymentsResponse(payments=[_payment("p1")], next_page_token="t"),
        audit_pb2.ListParticipantPaymentsResponse(payments=[_payment("p2")]),
    ])  # fmt: skip

    class Pages(FakeChannel):
        def _record(self, method: str, request: Any, serializer: Any) -> Any:
            super()._record(method, request, serializer)
            return next(pages)

    args = parse("audit", "payments", "BANK_ICBC", "--from", "2026-11-25T00:00",
                 "--to", "2026-11-26", "--page-size", "1", "--format", "csv")  # fmt: skip
    channel = Pages({"ListParticipantPayments": None})
    assert audit_cli.call(args.group, args, channel) == 0
    requests = [r for _, r in channel.calls]
    assert [(r.participant_id, r.page_size, r.page_token) for r in requests] == [
        ("BANK_ICBC", 1, ""), ("BANK_ICBC", 1, "t"),
    ]  # fmt: skip
    assert requests[0].start_time.ToJsonString() == "2026-11-25T00:00:00Z"
    assert requests[0].end_time.ToJsonString() == "2026-11-26T00:00:00Z"
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["payment_id"] for r in rows] == ["p1", "p2"]


@covers("audit", "verify-chains")
def test_verify_chains() -> None:
    answer = audit_pb2.VerifyChainsResponse()
    answer.reports.add(shard=3, ok=False, problem="chain broken at 7")
    code, ch = run({"VerifyChains": answer}, "audit", "verify-chains", "--shard", "3")
    assert code == 1  # a chain that does not verify
    assert ch.calls == [(AUDIT + "VerifyChains", audit_pb2.VerifyChainsRequest(shards=[3]))]


def _proof_answer() -> Any:
    """A real proof: a decision of INST_ALIPAY/p1 among three leaves."""
    chain = ChainBuilder(3, 1, FIRST_SEQ, GENESIS_HASH)
    key = payment_key("INST_ALIPAY", "p1")
    entries = [chain.append(KIND_INTENT, key, b"i"), chain.append(KIND_DECISION, key, b"d"),
               chain.append(KIND_INTENT, "INST_ALIPAY/p2", b"x")]  # fmt: skip
    tree = MerkleTree([e.entry_hash for e in entries])
    d = entries[1]
    r = audit_pb2.GetInclusionProofResponse(
        window_id=2, leaf_index=1, tree_size=3, audit_path=tree.proof(1), merkle_root=tree.root
    )
    r.entry.CopyFrom(audit_pb2.LedgerEntryRef(
        shard=d.shard, epoch=d.epoch, seq=d.seq, kind=d.kind, payment_key=d.payment_key,
        body=d.body, prev_hash=d.prev_hash, entry_hash=d.entry_hash,
    ))  # fmt: skip
    return r


@covers("audit", "proof")
def test_proof_recomputes_the_entry_hash(capsys: pytest.CaptureFixture[str]) -> None:
    good = _proof_answer()
    argv = ("audit", "proof", "INST_ALIPAY", "p1", "--window", "2", "--format", "json")
    code, ch = run({"GetInclusionProof": good}, *argv)
    req = audit_pb2.GetInclusionProofRequest(window_id=2, institution_id="INST_ALIPAY",
                                             payment_id="p1")  # fmt: skip
    assert ch.calls == [(AUDIT + "GetInclusionProof", req)]
    assert code == 0
    assert json.loads(capsys.readouterr().out)[0]["verified_here"] is True
    # A body changed under the hash the proof is about: the proof alone would still pass.
    forged = _proof_answer()
    forged.entry.body = b"D"
    code, _ = run({"GetInclusionProof": forged}, *argv)
    assert code == 1
    row = json.loads(capsys.readouterr().out)[0]
    assert (row["entry_hash_matches"], row["verified_here"]) == (False, False)
    # The decision of another payment is no proof for this one.
    code, _ = run({"GetInclusionProof": good}, "audit", "proof", "INST_ALIPAY", "p2")
    assert code == 1


@covers("audit", "compare-cities")
def test_compare_cities(capsys: pytest.CaptureFixture[str]) -> None:
    answer = audit_pb2.CompareCitiesResponse(agree=False)
    answer.cities.add(city="shenzhen", differing_rows=["shard 1 seq 2: missing"])
    code, ch = run({"CompareCities": answer}, "audit", "compare-cities", "5")
    assert code == 1
    assert ch.calls == [(AUDIT + "CompareCities", audit_pb2.CompareCitiesRequest(window_id=5))]
    assert "shenzhen: shard 1 seq 2: missing" in capsys.readouterr().err


@covers("audit", "export")
def test_export_writes_the_streamed_files(tmp_path: Path) -> None:
    chunks = [
        audit_pb2.ExportWindowResponse(path=MANIFEST_FILE, data=b"{"),
        audit_pb2.ExportWindowResponse(path=MANIFEST_FILE, data=b"}\n"),
        audit_pb2.ExportWindowResponse(path="reconciliation/BANK_ICBC.csv", data=b""),
    ]
    out = tmp_path / "w5"
    code, ch = run({"ExportWindow": chunks}, "audit", "export", "5", "--out", str(out))
    assert code == 0
    assert ch.calls == [(AUDIT + "ExportWindow", audit_pb2.ExportWindowRequest(window_id=5))]
    assert (out / MANIFEST_FILE).read_bytes() == b"{}\n"
    assert (out / "reconciliation/BANK_ICBC.csv").read_bytes() == b""
    evil = [audit_pb2.ExportWindowResponse(path="../outside", data=b"x")]
    code, _ = run({"ExportWindow": evil}, "audit", "export", "5", "--out", str(tmp_path / "e"))
    assert code == 1 and not (tmp_path / "outside").exists()


@covers("audit", "verify")
def test_verify_offline_with_an_expected_root(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    led, referenced = build_ledger()
    folder = write_export(tmp_path / "w2", 2, led.window(2), referenced, KINDS,
                          signing_keys=SIGNING_KEYS)  # fmt: skip
    root = read_manifest(folder).merkle_root
    for expected, status in ((root, 0), (hashlib.sha256(b"other").digest(), 1)):
        args = parse("audit", "verify", str(folder), "--expected-root", expected.hex())
        assert args.expected_root == expected
        assert audit_cli.run(args.group, args, topo=None) == status  # type: ignore[arg-type]
    assert "not the expected root" in capsys.readouterr().err
    args = parse("audit", "verify", str(folder))
    assert audit_cli.run(args.group, args, topo=None) == 0  # type: ignore[arg-type]
    with pytest.raises(SystemExit):
        parse("audit", "verify", str(folder), "--expected-root", "abc")


# -- window -----------------------------------------------------------------------------------


@covers("window", "close")
def test_window_close(capsys: pytest.CaptureFixture[str]) -> None:
    answer = settlement_pb2.CloseWindowResponse(window_id=7, requested_now=False)
    code, ch = run({"CloseWindow": answer}, "window", "close", "--reason", "end of day")
    assert code == 0
    req = settlement_pb2.CloseWindowRequest(reason="end of day")
    assert ch.calls == [(SETTLEMENT + "CloseWindow", req)]
    assert "window 7 was already closing" in capsys.readouterr().out


@covers("window", "settle")
def test_window_settle_and_a_refusal(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ("window", "settle", "7", "--reference", "RTGS-1")
    answer = settlement_pb2.ConfirmSettlementResponse(confirmed_now=True)
    code, ch = run({"ConfirmSettlement": answer}, *argv)
    assert code == 0
    req = settlement_pb2.ConfirmSettlementRequest(window_id=7, reference="RTGS-1")
    assert ch.calls == [(SETTLEMENT + "ConfirmSettlement", req)]
    err = common_pb2.Error(reason="WINDOW_NOT_CLEARED", message="window 7 is CLOSING")
    refused = FakeRpcError(
        grpc.StatusCode.FAILED_PRECONDITION, ((ERROR_METADATA_KEY, err.SerializeToString()),)
    )
    code, _ = run({"ConfirmSettlement": refused}, *argv)
    assert code == 1
    assert "FAILED_PRECONDITION WINDOW_NOT_CLEARED" in capsys.readouterr().err


def test_every_subcommand_is_covered() -> None:
    parser = build_parser()
    groups = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    found = set()
    for group in ("audit", "window"):
        sub = groups.choices[group]
        cmds = next(a for a in sub._actions if isinstance(a, argparse._SubParsersAction))
        found |= {(group, cmd) for cmd in cmds.choices}
    assert found == COVERED
