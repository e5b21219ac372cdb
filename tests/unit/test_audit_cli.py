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
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from clearing.v1 import audit_pb2, common_pb2, payment_pb2, settlement_pb2
from clearinghouse import topology
from clearinghouse.audit import cli as audit_cli
from clearinghouse.audit.export import MANIFEST_FILE, read_manifest, write_export
from clearinghouse.cli import build_parser
from clearinghouse.domain import ParticipantKind
from clearinghouse.domain.chain import FIRST_SEQ, GENESIS_HASH, ChainBuilder
from clearinghouse.domain.clearing import (
    BilateralTotal,
    NetPosition,
    SettlementInstruction,
    WindowClearing,
)
from clearinghouse.domain.entries import KIND_DECISION, KIND_INTENT
from clearinghouse.domain.errors import ERROR_METADATA_KEY
from clearinghouse.domain.merkle import MerkleTree
from clearinghouse.switch.records import payment_key
from tests.unit.test_audit_export import KINDS, SIGNING_KEYS, build_ledger

pytestmark = pytest.mark.unit

AUDIT = "/clearing.v1.AuditService/"
SETTLEMENT = "/clearing.v1.SettlementService/"


class FakeRpcError(grpc.RpcError, grpc.Call):  # type: ignore[misc]
    def __init__(
        self,
        code: grpc.StatusCode,
        trailers: tuple[tuple[str, bytes], ...] = (),
        details: str = "",
    ):
        self._code, self._trailers, self._details = code, trailers, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> Any:
        return self._trailers


class FakeChannel:
    """What the generated stubs need of a channel: each method records the request
    (serialized, as it would be sent) and answers from ``answers[method name]``: a
    response, a list of responses for a stream, or an exception to raise."""

    def __init__(self, answers: dict[str, Any]) -> None:
        self.answers = answers
        self.calls: list[tuple[str, Any]] = []
        self.timeouts: list[float] = []

    def _record(
        self, method: str, request: Any, serializer: Callable[[Any], bytes], timeout: float
    ) -> Any:
        serializer(request)  # a request of the wrong type fails here, as it would in gRPC
        name = method.rsplit("/", 1)[1]
        self.calls.append((method, request))
        self.timeouts.append(timeout)
        answer = self.answers[name]
        if isinstance(answer, Exception):
            raise answer
        return answer

    def unary_unary(self, method: str, request_serializer: Any = None, **_: Any) -> Any:
        def call(request: Any, timeout: float | None = None, **__: Any) -> Any:
            assert timeout is not None, "every call has a deadline"
            return self._record(method, request, request_serializer, timeout)

        return call

    def unary_stream(self, method: str, request_serializer: Any = None, **_: Any) -> Any:
        def call(request: Any, timeout: float | None = None, **__: Any) -> Iterator[Any]:
            assert timeout is not None, "every call has a deadline"
            return iter(self._record(method, request, request_serializer, timeout))

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


def _clearing() -> WindowClearing:
    """A cleared window 3: ALIPAY paid ICBC 100 CNY (the ids as the proto answer says)."""
    bank, inst = ParticipantKind.BANK, ParticipantKind.INSTITUTION
    return WindowClearing(
        window_id=3, entry_count=9, entry_counts=(("DECISION", 2),), decision_count=2,
        payments_decided=2, state_counts=(("APPROVED", 2),),
        participants=(("BANK_ICBC", bank), ("INST_ALIPAY", inst)),
        net_positions=(NetPosition("BANK_ICBC", bank, "CNY", 150, 50, 100),
                       NetPosition("INST_ALIPAY", inst, "CNY", 0, 100, -100)),
        bilateral=(BilateralTotal("BANK_ICBC", "INST_ALIPAY", "CNY", 2, 150, 1, 50),),
        instructions=(SettlementInstruction("3-CNY-1", "CNY", "PAY", "BANK_ICBC",
                                            "SETTLEMENT:BANK_ICBC", "SWITCH:CNY", 100),),
        reconciliations=(),
    )  # fmt: skip


def _window_answer() -> Any:
    r = audit_pb2.GetWindowResponse(merkle_root=b"\x01" * 32, entry_count=9, payment_count=2)
    r.summary.window_id, r.summary.state = 3, "CLEARED"
    r.clearing_json = _clearing().to_json()
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


def test_windows_page_on_from_where_the_last_page_ended(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # At most 50 windows could be listed, and nothing older at all.
    answer = audit_pb2.ListWindowsResponse(next_before_window_id=151)
    for w in range(200, 150, -1):
        answer.windows.add(window_id=w, state="SETTLED")
    code, ch = run({"ListWindows": answer}, "audit", "windows", "--limit", "50",
                   "--before", "201")  # fmt: skip
    assert code == 0
    assert ch.calls == [
        (AUDIT + "ListWindows", audit_pb2.ListWindowsRequest(page_size=50, before_window_id=201))
    ]
    assert "--before 151" in capsys.readouterr().err
    for bad in (("--limit", "0"), ("--limit", "201"), ("--before", "-1")):
        with pytest.raises(SystemExit) as exited:
            run({"ListWindows": answer}, "audit", "windows", *bad)
        assert exited.value.code == audit_cli.EXIT_USAGE, bad


@covers("audit", "window")
def test_window_csv_is_one_table_per_output(capsys: pytest.CaptureFixture[str]) -> None:
    answers = {"GetWindow": _window_answer()}
    code, ch = run(answers, "audit", "window", "3", "--format", "csv")
    assert code == audit_cli.EXIT_USAGE and ch.calls == []
    assert "--part" in capsys.readouterr().err
    expected = {
        "summary": (1, "merkle_root", "01" * 32),
        "net-positions": (2, "participant_id", "BANK_ICBC"),
        "bilateral": (1, "approved_minor", "150"),
        "instructions": (1, "from_account", "SETTLEMENT:BANK_ICBC"),
    }
    for part, (rows, column, first) in expected.items():
        code, ch = run(answers, "audit", "window", "3", "--format", "csv", "--part", part)
        assert code == 0
        assert ch.calls == [(AUDIT + "GetWindow", audit_pb2.GetWindowRequest(window_id=3))]
        out = capsys.readouterr().out
        table = list(csv.DictReader(io.StringIO(out)))
        assert len(table) == rows and table[0][column] == first, part
    # Byte for byte the export's CSV files: one auditor's script reads both.
    exported = _clearing()
    for part, made in (("net-positions", exported.net_positions_csv),
                       ("bilateral", exported.bilateral_csv),
                       ("instructions", exported.instructions_csv)):  # fmt: skip
        run(answers, "audit", "window", "3", "--format", "csv", "--part", part)
        assert capsys.readouterr().out == made(), part
    code, _ = run(answers, "audit", "window", "3")  # a table: all four, for people
    out = capsys.readouterr().out
    assert code == 0 and "NET_MINOR" in out and "APPROVED_COUNT" in out and "SWITCH:CNY" in out
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
    out = capsys.readouterr().out
    # The payment itself (the order as signed, its outcome), then its entries.
    assert re.search(r"^amount_minor +100$", out, re.M) and re.search(r"^window +2$", out, re.M)
    assert re.search(r"^state +APPROVED$", out, re.M)
    assert "INTENT" in out and (b"\x02" * 32).hex() in out
    run({"GetPaymentHistory": answer}, "audit", "payment", "INST_ALIPAY", "p1", "--format", "json")
    got = json.loads(capsys.readouterr().out)
    assert (got["payment"]["payment_id"], got["payment"]["currency"]) == ("p1", "CNY")
    assert got["payment"]["window"] == 2 and got["entries"][0]["seq"] == 9


@covers("audit", "payments")
def test_payments_of_a_participant_page_through(capsys: pytest.CaptureFixture[str]) -> None:
    pages = iter([
        audit_pb2.ListParticipantPaymentsResponse(payments=[_payment("p1")], next_page_token="t"),
        audit_pb2.ListParticipantPaymentsResponse(payments=[_payment("p2")]),
    ])  # fmt: skip

    class Pages(FakeChannel):
        def _record(self, method: str, request: Any, serializer: Any, timeout: float) -> Any:
            super()._record(method, request, serializer, timeout)
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
def test_verify_chains(capsys: pytest.CaptureFixture[str]) -> None:
    answer = audit_pb2.VerifyChainsResponse()
    answer.reports.add(shard=3, ok=False, problem="chain broken at 7")
    code, ch = run({"VerifyChains": answer}, "audit", "verify-chains", "--shard", "3")
    assert code == 1  # a chain that does not verify
    assert ch.calls == [(AUDIT + "VerifyChains", audit_pb2.VerifyChainsRequest(shards=[3]))]
    # A read that answers only at its end says first what it waits for, and how long.
    assert "waiting while every chain asked for is read" in capsys.readouterr().err


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
    shown = json.loads(capsys.readouterr().out)[0]
    assert shown["verified_here"] is True
    # The proof itself, for an auditor to check with any RFC 6962 implementation.
    assert shown["audit_path"] == [h.hex() for h in good.audit_path] and shown["audit_path"]
    assert shown["entry_hash"] == good.entry.entry_hash.hex()
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
    rows = [f"shard 1 seq {n}: missing" for n in range(2, 32)]
    answer.cities.add(city="shenzhen", differing_rows=rows)
    code, ch = run({"CompareCities": answer}, "audit", "compare-cities", "5")
    assert code == 1
    assert ch.calls == [(AUDIT + "CompareCities", audit_pb2.CompareCitiesRequest(window_id=5))]
    err = capsys.readouterr().err
    assert all(f"shenzhen: {r}\n" in err for r in rows)  # every one, not the first 20
    assert err.startswith("clearingctl: waiting while window 5 is read from each city")
    # Each city's whole root, in JSON and in the table alike: an auditor copies it into
    # `audit verify --expected-root`.
    answer.cities.add(city="beijing", merkle_root=bytes(range(32)))
    run({"CompareCities": answer}, "audit", "compare-cities", "5", "--format", "json")
    cities = {c["city"]: c for c in json.loads(capsys.readouterr().out)}
    assert cities["beijing"]["merkle_root"] == bytes(range(32)).hex()
    assert cities["shenzhen"]["rows"] == rows and cities["shenzhen"]["differing_rows"] == 30
    run({"CompareCities": answer}, "audit", "compare-cities", "5")
    assert bytes(range(32)).hex() + " " in capsys.readouterr().out


def test_numbers_beyond_a_fields_range_are_usage_errors(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for argv in (
        ("audit", "window", "99999999999999999999"),
        ("audit", "export", "9223372036854775808", "--out", "x"),
        ("audit", "payments", "P", "--from", "2026-11-25", "--to", "2026-11-26",
         "--page-size", "2147483648"),
        ("audit", "verify-chains", "--shard", "-1"),
        ("window", "settle", "0", "--reference", "R"),
    ):  # fmt: skip
        with pytest.raises(SystemExit) as exited:
            parse(*argv)
        assert exited.value.code == 2, argv
        assert "is not from" in capsys.readouterr().err, argv


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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w5"]  # no half-made folder left


@covers("audit", "export")
def test_an_export_broken_off_leaves_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken_off() -> Iterator[Any]:
        yield audit_pb2.ExportWindowResponse(path=MANIFEST_FILE, data=b"{")
        yield audit_pb2.ExportWindowResponse(path="entries.jsonl", data=b"x" * 1000)
        raise FakeRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, details="Deadline Exceeded")

    out = tmp_path / "w5"
    out.mkdir()  # an empty folder may be named; it is left as it was
    code, _ = run({"ExportWindow": broken_off()}, "audit", "export", "5", "--out", str(out))
    assert code != 0
    assert out.is_dir() and not any(out.iterdir())
    assert [p.name for p in tmp_path.iterdir()] == ["w5"]
    err = capsys.readouterr().err
    assert "broken off after 2 files" in err and "nothing was written" in err
    # The same command, once the node answers, writes the whole export there.
    whole = [audit_pb2.ExportWindowResponse(path=MANIFEST_FILE, data=b"{}\n")]
    code, _ = run({"ExportWindow": whole}, "audit", "export", "5", "--out", str(out))
    assert code == 0 and (out / MANIFEST_FILE).read_bytes() == b"{}\n"
    (tmp_path / "file").write_text("x")
    code, _ = run({"ExportWindow": whole}, "audit", "export", "5", "--out", str(tmp_path / "file"))
    assert code == 2 and "not an empty folder" in capsys.readouterr().err


@covers("audit", "export")
def test_an_export_killed_before_it_could_undo_is_cleared_by_the_next(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a process id that no process has now (until the system reuses it)
    out = tmp_path / "w5"
    killed = out / f".export-partial-{gone.pid}"
    killed.mkdir(parents=True)
    (killed / "entries.jsonl").write_bytes(b"x" * 100)
    whole = [audit_pb2.ExportWindowResponse(path=MANIFEST_FILE, data=b"{}\n")]

    code, _ = run({"ExportWindow": whole}, "audit", "export", "5", "--out", str(out))

    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_FILE]
    assert f"removed {killed}" in capsys.readouterr().out
    # One of a process still running is its own: the folder is not empty.
    running = tmp_path / "w6" / f".export-partial-{os.getppid()}"
    running.mkdir(parents=True)
    code, _ = run({"ExportWindow": whole}, "audit", "export", "5", "--out", str(running.parent))
    assert code == 2 and "not an empty folder" in capsys.readouterr().err
    assert running.is_dir()


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


# -- failed calls -----------------------------------------------------------------------------


def test_a_call_the_node_never_answered_names_the_node_and_where_to_look(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # the log is shown as from the checkout: .state/...
    log = tmp_path / ".state" / "switch" / "beijing-a" / "switch.log"
    node = audit_cli.Node("beijing-a", "127.0.0.1:15051", log)
    down = FakeRpcError(grpc.StatusCode.UNAVAILABLE, details="failed to connect to all addresses")
    args = parse("audit", "windows")
    assert audit_cli.call(args.group, args, FakeChannel({"ListWindows": down}), node) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1  # one line
    assert err.startswith(
        "clearingctl: UNAVAILABLE: failed to connect to all addresses "
        "(switch node beijing-a at 127.0.0.1:15051); is the switch node up? "
        "(any zone's node answers the same: --zone) see `clearingctl cluster status`"
    )
    assert err.rstrip().endswith("log .state/switch/beijing-a/switch.log")
    # Slower than its deadline: the deadline it had, and how to give it longer.
    slow = FakeRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, details="Deadline Exceeded")
    args = parse("audit", "compare-cities", "1", "--deadline-s", "30")
    assert audit_cli.call(args.group, args, FakeChannel({"CompareCities": slow}), node) == 1
    waited, err = capsys.readouterr().err.split("\n", 1)
    assert waited.startswith("clearingctl: waiting while window 1") and "30s" in waited
    assert err.startswith("clearingctl: DEADLINE_EXCEEDED: Deadline Exceeded (switch node")
    assert "it had 30 s" in err and "--deadline-s" in err and "is the switch node up?" in err


def test_an_unavailable_node_that_answered_gives_its_reason_and_advice_not_a_guess(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """UNAVAILABLE with the switch's own error: the node is up (it said why); the line
    gives its reason and retry advice, not "is the switch node up?"."""
    err = common_pb2.Error(reason="SHARD_OWNERSHIP_UNCONFIRMED", message="etcd has no quorum",
                           retry_after_ms=1500)  # fmt: skip
    busy = FakeRpcError(
        grpc.StatusCode.UNAVAILABLE, ((ERROR_METADATA_KEY, err.SerializeToString()),)
    )
    code, _ = run({"GetWindow": busy}, "audit", "window", "3")
    assert code == 1
    line = capsys.readouterr().err
    assert line.startswith(
        "clearingctl: UNAVAILABLE SHARD_OWNERSHIP_UNCONFIRMED: etcd has no quorum"
    )
    assert line.rstrip().endswith("; the switch advises retrying after 1500 ms")
    assert "is the switch node up?" not in line


def test_a_refusal_names_its_reason_once(capsys: pytest.CaptureFixture[str]) -> None:
    err = common_pb2.Error(reason="NOT_FOUND", message="no settlement window 99")
    missing = FakeRpcError(
        grpc.StatusCode.NOT_FOUND, ((ERROR_METADATA_KEY, err.SerializeToString()),)
    )
    code, _ = run({"GetWindow": missing}, "audit", "window", "99")
    assert code == 1
    assert capsys.readouterr().err == "clearingctl: NOT_FOUND: no settlement window 99\n"


# -- deadlines ----------------------------------------------------------------------------------


def test_each_call_has_its_commands_deadline_or_the_one_given() -> None:
    # Whole windows and whole chains read from the replicas: a comparison took 138 s.
    for argv in (("compare-cities", "5"), ("verify-chains",), ("export", "5", "--out", "x")):
        assert parse("audit", *argv).deadline_s == audit_cli.LONG_CALL_DEADLINE_S > 138
    assert parse("audit", "windows").deadline_s == audit_cli.CALL_DEADLINE_S
    agree = {"CompareCities": audit_pb2.CompareCitiesResponse(agree=True)}
    _, ch = run(agree, "audit", "compare-cities", "5")
    assert ch.timeouts == [audit_cli.LONG_CALL_DEADLINE_S]
    _, ch = run(agree, "audit", "compare-cities", "5", "--deadline-s", "1500")
    assert ch.timeouts == [1500.0]
    _, ch = run({"CloseWindow": settlement_pb2.CloseWindowResponse()}, "window", "close",
                "--deadline-s", "2.5")  # fmt: skip
    assert ch.timeouts == [2.5]
    for bad in ("0", "-1", "nan", "soon"):
        with pytest.raises(SystemExit) as exit_:
            parse("audit", "windows", "--deadline-s", bad)
        assert exit_.value.code == audit_cli.EXIT_USAGE, bad


# -- what the commands take -------------------------------------------------------------------


def _subparser(group: str, cmd: str) -> argparse.ArgumentParser:
    groups = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    cmds = next(
        a for a in groups.choices[group]._actions if isinstance(a, argparse._SubParsersAction)
    )
    parser: argparse.ArgumentParser = cmds.choices[cmd]
    return parser


def test_a_time_it_cannot_read_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse("audit", "payments", "INST_ALIPAY", "--from", "yesterday", "--to", "2026-12-04")
    assert exit_.value.code == audit_cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "--from: not a time: 'yesterday'" in err and "2026-11-25T08:00" in err
    # A zone named is kept; none is UTC.
    args = parse("audit", "payments", "INST_ALIPAY", "--from", "2026-11-25T08:00+08:00",
                 "--to", "2026-11-25")  # fmt: skip
    assert args.start == args.end == 1_795_564_800_000_000


def test_payments_refuse_an_empty_range(capsys: pytest.CaptureFixture[str]) -> None:
    answers = {"ListParticipantPayments": audit_pb2.ListParticipantPaymentsResponse()}
    for start in ("2026-12-05", "2026-12-04"):  # after --to, or at it
        code, ch = run(answers, "audit", "payments", "INST_ALIPAY", "--from", start,
                       "--to", "2026-12-04")  # fmt: skip
        assert code == audit_cli.EXIT_USAGE and ch.calls == []
        captured = capsys.readouterr()
        assert "must be before --to" in captured.err and captured.out == ""


def test_offline_verify_offers_no_node_options(capsys: pytest.CaptureFixture[str]) -> None:
    text = _subparser("audit", "verify").format_help()
    assert "--zone" not in text and "--deadline-s" not in text and "--format" in text
    for flag in ("--zone", "--deadline-s"):
        with pytest.raises(SystemExit):
            parse("audit", "verify", "folder", flag, "1")
    assert "unrecognized arguments" in capsys.readouterr().err


def test_window_close_and_settle_print_the_format_asked(capsys: pytest.CaptureFixture[str]) -> None:
    closed = {"CloseWindow": settlement_pb2.CloseWindowResponse(window_id=7, requested_now=True)}
    code, _ = run(closed, "window", "close", "--format", "json")
    assert code == 0
    assert json.loads(capsys.readouterr().out) == [{"window": 7, "requested_now": True}]
    code, _ = run(closed, "window", "close", "--format", "csv")
    assert list(csv.DictReader(io.StringIO(capsys.readouterr().out))) == [
        {"window": "7", "requested_now": "True"}
    ]
    settled = {"ConfirmSettlement": settlement_pb2.ConfirmSettlementResponse(confirmed_now=True)}
    code, _ = run(settled, "window", "settle", "7", "--reference", "RTGS-1", "--format", "json")
    assert code == 0
    assert json.loads(capsys.readouterr().out) == [
        {"window": 7, "reference": "RTGS-1", "confirmed_now": True}
    ]
    code, _ = run(settled, "window", "settle", "7", "--reference", "RTGS-1")  # for people
    assert capsys.readouterr().out == (
        "window 7 settled: its payments no longer count against the net debit caps (every "
        "node within a few seconds)\n"
    )


# -- a window not cleared yet -------------------------------------------------------------------


def test_a_window_not_cleared_yet_is_not_shown_as_an_empty_clearing(
    capsys: pytest.CaptureFixture[str],
) -> None:
    answer = audit_pb2.GetWindowResponse()  # no clearing: no root, no clearing_json
    answer.summary.window_id, answer.summary.state = 3, "CLOSING"
    answers = {"GetWindow": answer}
    code, _ = run(answers, "audit", "window", "3")
    out = capsys.readouterr().out
    assert code == 0 and "CLOSING" in out and "window 3 is CLOSING, not cleared yet" in out
    assert "ENTRIES" not in out and "(none)" not in out and "NET_DEBIT" not in out
    code, _ = run(answers, "audit", "window", "3", "--format", "json")
    shown = json.loads(capsys.readouterr().out)
    assert code == 0 and (shown["state"], shown["cleared"]) == ("CLOSING", False)
    assert "entries" not in shown and "merkle_root" not in shown
    code, _ = run(answers, "audit", "window", "3", "--format", "csv", "--part", "summary")
    (row,) = csv.DictReader(io.StringIO(capsys.readouterr().out))
    assert code == 0 and (row["state"], row["cleared"]) == ("CLOSING", "False")
    for part in ("net-positions", "instructions"):  # no empty table to settle by
        code, _ = run(answers, "audit", "window", "3", "--format", "csv", "--part", part)
        captured = capsys.readouterr()
        assert code == 1 and captured.out == "" and "not cleared yet" in captured.err, part
    code, _ = run({"GetWindow": _window_answer()}, "audit", "window", "3", "--format", "json")
    assert json.loads(capsys.readouterr().out)["cleared"] is True


# -- a participant's payments, page by page -----------------------------------------------------


@pytest.mark.parametrize("fmt", audit_cli.FORMATS)
def test_payments_print_each_page_as_it_arrives(
    fmt: str, capsys: pytest.CaptureFixture[str]
) -> None:
    pages = [
        audit_pb2.ListParticipantPaymentsResponse(payments=[_payment("p1")], next_page_token="t"),
        audit_pb2.ListParticipantPaymentsResponse(
            payments=[_payment("p2-with-a-longer-id"), _payment("p3")]
        ),
    ]
    printed_before_page_2: list[str] = []

    class Pages(FakeChannel):
        def _record(self, method: str, request: Any, serializer: Any, timeout: float) -> Any:
            super()._record(method, request, serializer, timeout)
            if len(self.calls) == 2:
                printed_before_page_2.append(capsys.readouterr().out)
            return pages[len(self.calls) - 1]

    args = parse("audit", "payments", "BANK_ICBC", "--from", "2026-11-25", "--to", "2026-11-26",
                 "--format", fmt)  # fmt: skip
    assert audit_cli.call(args.group, args, Pages({"ListParticipantPayments": None})) == 0
    (first,) = printed_before_page_2
    assert "p1" in first and "p3" not in first
    whole = first + capsys.readouterr().out
    ids = ["p1", "p2-with-a-longer-id", "p3"]
    if fmt == "json":  # one array, the same text as printed whole
        rows = json.loads(whole)
        assert [r["payment_id"] for r in rows] == ids
        assert whole == json.dumps(rows, indent=2) + "\n"
    elif fmt == "csv":  # one header
        assert [r["payment_id"] for r in csv.DictReader(io.StringIO(whole))] == ids
    else:
        lines = whole.splitlines()
        assert len(lines) == 4 and lines[0].startswith("INSTITUTION_ID  PAYMENT_ID")
        assert [line.split()[1] for line in lines[1:]] == ids


@pytest.mark.parametrize(("fmt", "printed"), [("json", "[]\n"), ("table", "(none)\n")])
def test_no_payments_is_still_valid_output(
    fmt: str, printed: str, capsys: pytest.CaptureFixture[str]
) -> None:
    answers = {"ListParticipantPayments": audit_pb2.ListParticipantPaymentsResponse()}
    code, _ = run(answers, "audit", "payments", "BANK_ICBC", "--from", "2026-11-25",
                  "--to", "2026-11-26", "--format", fmt)  # fmt: skip
    assert code == 0 and capsys.readouterr().out == printed


# -- settlement reference ---------------------------------------------------------------------


def test_a_settled_window_shows_its_settlement_reference(
    capsys: pytest.CaptureFixture[str],
) -> None:
    listed = audit_pb2.ListWindowsResponse()
    listed.windows.add(window_id=2, state="CLEARED")
    listed.windows.add(window_id=1, state="SETTLED").settlement_reference = "RTGS-20261203-7"
    code, _ = run({"ListWindows": listed}, "audit", "windows")
    header, cleared, settled = capsys.readouterr().out.splitlines()
    assert code == 0 and header.split()[-1] == "REFERENCE"
    assert settled.split()[-1] == "RTGS-20261203-7" and "RTGS" not in cleared
    code, _ = run({"ListWindows": listed}, "audit", "windows", "--format", "json")
    assert [w["reference"] for w in json.loads(capsys.readouterr().out)] == ["", "RTGS-20261203-7"]
    window = _window_answer()
    window.summary.state, window.summary.settlement_reference = "SETTLED", "RTGS-20261203-7"
    code, _ = run({"GetWindow": window}, "audit", "window", "3", "--part", "summary")
    lines = capsys.readouterr().out.splitlines()
    assert "REFERENCE" in lines[0] and "RTGS-20261203-7" in lines[1]


def test_every_subcommand_is_covered() -> None:
    parser = build_parser()
    groups = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    found = set()
    for group in ("audit", "window"):
        sub = groups.choices[group]
        cmds = next(a for a in sub._actions if isinstance(a, argparse._SubParsersAction))
        found |= {(group, cmd) for cmd in cmds.choices}
    assert found == COVERED


@covers("audit", "verify")
def test_verify_names_a_folder_or_keys_file_that_is_not_there(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nothing-here"
    args = parse("audit", "verify", str(missing))
    assert audit_cli.run("audit", args, topology.load(None)) == audit_cli.EXIT_USAGE
    assert capsys.readouterr().err.strip() == f"clearingctl: folder {missing}: no such folder"
    tmp_path.joinpath("w").mkdir()
    args = parse("audit", "verify", str(tmp_path / "w"), "--keys", str(missing))
    assert audit_cli.run("audit", args, topology.load(None)) == audit_cli.EXIT_USAGE
    assert "--keys" in capsys.readouterr().err


@covers("audit", "export")
def test_an_export_goes_into_any_empty_folder_the_user_may_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    whole = [
        audit_pb2.ExportWindowResponse(path="entries.jsonl", data=b"e\n"),
        audit_pb2.ExportWindowResponse(path=MANIFEST_FILE, data=b"{}\n"),
        audit_pb2.ExportWindowResponse(path="reconciliation/BANK_ICBC.csv", data=b"r\n"),
    ]
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    assert run({"ExportWindow": whole}, "audit", "export", "5", "--out", ".")[0] == 0
    assert sorted(p.name for p in here.iterdir()) == [
        "entries.jsonl", MANIFEST_FILE, "reconciliation",
    ]  # fmt: skip
    target = tmp_path / "target"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    out = str(tmp_path / "link")
    assert run({"ExportWindow": whole}, "audit", "export", "5", "--out", out)[0] == 0
    assert (target / MANIFEST_FILE).read_bytes() == b"{}\n"
    # A folder that cannot be written: one line, nothing left behind.
    locked = tmp_path / "locked"
    locked.mkdir()
    monkeypatch.setattr(Path, "mkdir", _refuse_mkdir)
    assert run({"ExportWindow": whole}, "audit", "export", "5", "--out", str(locked))[0] == 1
    assert "cannot write the export" in capsys.readouterr().err
    assert not any(locked.iterdir())


def _refuse_mkdir(self: Path, *args: Any, **kwargs: Any) -> None:
    raise PermissionError(13, "Permission denied", str(self))
