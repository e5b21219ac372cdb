"""``clearingctl audit ...`` and ``clearingctl window ...``: the auditor's and the
operator's commands over ``clearing.v1.AuditService`` and ``SettlementService``.

Every listing prints as a table (default), CSV (``--format csv``) or JSON
(``--format json``). A CSV output is always one table with one header row, so that a
spreadsheet loads it as it is: ``audit window`` has four tables (the summary, then the
net positions, the bilateral totals and the instructions, column for column the CSV
files of an export) and prints the one ``--part`` names. ``audit verify DIR``
needs no cluster at all: it checks an exported window offline (chains, Merkle root,
clearing, net positions summing to zero, signatures: with ``--keys``, against the keys
the participants published themselves rather than the export's; with
``--expected-root``, the root obtained independently).

A command that calls a switch node takes ``--zone`` (which node) and ``--deadline-s``
(how long its call may take). A failed call prints one line: its code, the switch's
reason or gRPC's own details, the node called and, when the node did not answer, where
to look.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import io
import json
import os
import shutil
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import grpc

from clearing.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    common_pb2,
    settlement_pb2,
    settlement_pb2_grpc,
)
from clearinghouse.argtypes import INT32_MAX, INT64_MAX, bounded_int
from clearinghouse.audit.export import MANIFEST_FILE
from clearinghouse.audit.verify import add_expected_root, verify_export
from clearinghouse.client import answering_zone, error_details, local_credentials
from clearinghouse.domain.chain import entry_hash
from clearinghouse.domain.clearing import WindowClearing, table_rows
from clearinghouse.domain.entries import KIND_DECISION
from clearinghouse.domain.merkle import verify_inclusion
from clearinghouse.security import pki
from clearinghouse.security.ratelimit import RATE_LIMITED
from clearinghouse.switch.records import payment_key
from clearinghouse.topology import Topology

CALL_DEADLINE_S = 120.0
# Reading a whole window or whole chains from the replicas (compare-cities, verify-chains,
# export) outlasts CALL_DEADLINE_S on a big window: one city comparison took 138 s.
LONG_CALL_DEADLINE_S = 900.0
# Windows per page of `audit windows` (the switch sends at most 200 a call).
WINDOWS_PAGE_DEFAULT = 50
WINDOWS_PAGE_MAX = 200
# A listing refused for the caller's quota is asked again after the advised pause.
RATE_LIMITED_RETRIES_MAX = 20
RATE_LIMITED_PAUSE_MS = 500
RATE_LIMITED_PAUSE_MAX_MS = 5_000
T = TypeVar("T")
FORMATS = ("table", "csv", "json")
# The parts of `audit window`; all but the summary are the export's CSV files, column
# for column (net_positions.csv, bilateral.csv, instructions.csv).
WINDOW_PARTS = ("summary", "net-positions", "bilateral", "instructions")
EXIT_FAILED = 1
EXIT_USAGE = 2
# Codes of a call the node never answered (down, stopped, unreachable, or slower than the
# deadline): the message says where to look rather than only the code.
NO_ANSWER_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
TIME_EXAMPLES = "2026-11-25, 2026-11-25T08:00 or 2026-11-25T08:00:00+08:00"


@dataclass(frozen=True, slots=True)
class Node:
    """The switch node a command calls, for its error messages."""

    zone: str
    target: str  # address:port
    log: Path | None = None  # its log, when this machine runs it (the local cluster)


def add_parsers(sub: Any) -> None:
    node = argparse.ArgumentParser(add_help=False)
    node.add_argument(
        "--zone", default=None, help="the switch node to ask (default: the first that answers)"
    )
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument(
        "--format", choices=FORMATS, default="table", help="output (default: table)"
    )
    common = [node, output]
    a = sub.add_parser("audit", help="read and verify the replicated ledger (read-only)")
    s = a.add_subparsers(dest="cmd", required=True)
    ws_list = _deadline(
        s.add_parser("windows", parents=common, help="settlement windows, newest first")
    )
    ws_list.add_argument(
        "--limit", type=bounded_int(1, WINDOWS_PAGE_MAX), default=WINDOWS_PAGE_DEFAULT,
        help=f"at most this many windows (1-{WINDOWS_PAGE_MAX}; default: %(default)s)",
    )  # fmt: skip
    ws_list.add_argument(
        "--before", type=WINDOW_ID_OR_NONE, default=0, metavar="WINDOW_ID",
        help="only windows older than this one (the next page: the id printed after a page)",
    )  # fmt: skip
    w = _deadline(
        s.add_parser(
            "window", parents=common, help="a window's state, net positions and instructions"
        )
    )
    w.add_argument("window_id", type=WINDOW_ID)
    w.add_argument(
        "--part",
        choices=WINDOW_PARTS,
        help="print only this table (required with --format csv: one table per CSV)",
    )
    p = _deadline(s.add_parser("payment", parents=common, help="a payment and its ledger entries"))
    p.add_argument("institution_id")
    p.add_argument("payment_id")
    ps = _deadline(
        s.add_parser(
            "payments",
            parents=common,
            help="a participant's payments by receipt time: an institution's own, or those "
            "routed to a bank",
        )
    )
    ps.add_argument("participant_id", help="an institution or a bank")
    ps.add_argument(
        "--from",
        dest="start",
        required=True,
        type=time_us,
        metavar="TIME",
        help=f"ISO time, e.g. {TIME_EXAMPLES} (UTC unless it names a zone)",
    )
    ps.add_argument(
        "--to",
        dest="end",
        required=True,
        type=time_us,
        metavar="TIME",
        help="ISO time (exclusive), after --from",
    )
    ps.add_argument("--page-size", type=PAGE_SIZE, default=100)
    vc = _deadline(
        s.add_parser(
            "verify-chains", parents=common, help="verify shards' hash chains (default: all)"
        ),
        LONG_CALL_DEADLINE_S,
    )
    vc.add_argument("--shard", type=SHARD, action="append", default=[])
    pr = _deadline(
        s.add_parser(
            "proof",
            parents=common,
            help="prove a payment's decision is in its window's Merkle root",
        )
    )
    pr.add_argument("institution_id")
    pr.add_argument("payment_id")
    pr.add_argument("--window", type=WINDOW_ID_OR_NONE, default=0)
    cc = _deadline(
        s.add_parser(
            "compare-cities", parents=common, help="a window read from each city's own replica"
        ),
        LONG_CALL_DEADLINE_S,
    )
    cc.add_argument("window_id", type=WINDOW_ID)
    ex = _deadline(
        s.add_parser(
            "export", parents=common, help="write a cleared window's files for offline checking"
        ),
        LONG_CALL_DEADLINE_S,
    )
    ex.add_argument("window_id", type=WINDOW_ID)
    ex.add_argument("--out", type=Path, required=True, help="a new or empty folder")
    # Offline: no node to ask, so no --zone or --deadline-s.
    v = s.add_parser(
        "verify", parents=[output], help="check an exported window offline (no cluster needed)"
    )
    v.add_argument("folder", type=Path)
    v.add_argument(
        "--previous", type=Path, default=None, help="the previous window's export, to link them"
    )
    v.add_argument(
        "--keys",
        type=Path,
        default=None,
        help="signing keys the participants published themselves (signing_keys.json's "
        "shape): signatures are checked with these, not the export's own",
    )
    add_expected_root(v)

    win = sub.add_parser("window", help="close settlement windows, confirm settlements")
    ws = win.add_subparsers(dest="cmd", required=True)
    c = _deadline(
        ws.add_parser("close", parents=common, help="close the open window (every shard cuts it)")
    )
    c.add_argument("--reason", default="operator")
    st = _deadline(
        ws.add_parser(
            "settle", parents=common, help="record that a cleared window's settlement ran"
        )
    )
    st.add_argument("window_id", type=WINDOW_ID)
    st.add_argument("--reference", required=True, help="the settlement system's reference")


def _deadline(
    p: argparse.ArgumentParser, default_s: float = CALL_DEADLINE_S
) -> argparse.ArgumentParser:
    p.add_argument(
        "--deadline-s",
        type=positive_seconds,
        default=default_s,
        help="seconds each call to the switch node may take (default: %(default)g)",
    )
    return p


def positive_seconds(text: str) -> float:
    """An argparse type: a number of seconds above zero."""
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not seconds > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, not {text}")
    return seconds


WINDOW_ID = bounded_int(1, INT64_MAX)
WINDOW_ID_OR_NONE = bounded_int(0, INT64_MAX)
PAGE_SIZE = bounded_int(1, INT32_MAX)
SHARD = bounded_int(0, INT32_MAX)


def time_us(text: str) -> int:
    """An argparse type: an ISO 8601 time as microseconds since the epoch (UTC when it
    names no zone)."""
    try:
        d = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a time: {text!r}; give an ISO 8601 time, e.g. {TIME_EXAMPLES} (UTC "
            "unless it names a zone)"
        ) from None
    if d.tzinfo is None:
        d = d.replace(tzinfo=UTC)
    return int(d.timestamp() * 1_000_000)


def run(
    group: str,
    args: argparse.Namespace,
    topo: Topology,
    switch_log: Callable[[str], Path] | None = None,
) -> int:
    """Run the command; ``switch_log(zone)``, when the node runs on this machine, is its
    log, named when the node does not answer."""
    if group == "audit" and args.cmd == "verify":
        for name, path in (("folder", args.folder), ("--previous", args.previous)):
            if path is not None and not path.is_dir():
                print(f"clearingctl: {name} {path}: no such folder", file=sys.stderr)
                return EXIT_USAGE
        if args.keys is not None and not args.keys.is_file():
            print(f"clearingctl: --keys {args.keys}: no such file", file=sys.stderr)
            return EXIT_USAGE
        report = verify_export(
            args.folder, args.previous, args.keys, expected_root=args.expected_root
        )
        _emit([{
            "ok": report.ok, "window": report.window_id, "shards": report.shard_count,
            "entries": report.entry_count, "payments_decided": report.payments_decided,
            "merkle_root": report.merkle_root_hex, "problems": len(report.problems),
        }], args.format)  # fmt: skip
        for what in report.also_checked:
            print(f"checked: {what}", file=sys.stderr)
        for problem in report.problems:
            print(f"  {problem}", file=sys.stderr)
        return 0 if report.ok else 1
    zone = answering_zone(topo, args.zone)
    # Auditors read as the auditor; closing and settling windows is the operator's.
    identity = pki.operator() if group == "window" else pki.auditor()
    target = f"{zone.address}:{zone.ports.switch}"
    node = Node(zone.name, target, switch_log(zone.name) if switch_log else None)
    with local_credentials().channel(target, identity, server=pki.node(zone.name)) as channel:
        return call(group, args, channel, node)


def call(group: str, args: argparse.Namespace, channel: Any, node: Node | None = None) -> int:
    """Run the command's RPCs over ``channel`` (to ``node``); a failed RPC is printed
    (``rpc_failure``) and is exit status 1."""
    try:
        if group == "window":
            return _window(settlement_pb2_grpc.SettlementServiceStub(channel), args)
        return _audit(audit_pb2_grpc.AuditServiceStub(channel), args)
    except grpc.RpcError as e:
        print(rpc_failure(e, node, args.deadline_s), file=sys.stderr)
        return EXIT_FAILED


def rpc_failure(e: grpc.RpcError, node: Node | None, deadline_s: float | None = None) -> str:
    """One line for a failed call: its code; the switch's reason (when it says more than
    the code) and message, or, without them, gRPC's own details; the node called; and,
    when the node did not answer, where to look."""
    code = e.code() if isinstance(e, grpc.Call) else None
    name = code.name if code is not None else "?"
    err = error_details(e)
    if err is not None:
        head = name if err.reason in ("", name) else f"{name} {err.reason}"
        text = err.message
    else:
        head = name
        text = (e.details() if isinstance(e, grpc.Call) else "") or ""
    line = f"clearingctl: {head}: {text}" if text else f"clearingctl: {head}"
    if node is not None:
        line += f" (switch node {node.zone} at {node.target})"
    if code is grpc.StatusCode.DEADLINE_EXCEEDED and deadline_s is not None:
        line += f"; it had {deadline_s:g} s: a longer --deadline-s may be what it needs"
    if err is not None and err.retry_after_ms > 0:
        line += f"; the switch advises retrying after {err.retry_after_ms} ms"
    # A node that sent the switch's own error answered: its reason says what is wrong.
    if code in NO_ANSWER_CODES and err is None:
        log = f" {_shown(node.log)}" if node is not None and node.log is not None else ""
        line += (
            "; is the switch node up? (any zone's node answers the same: --zone) see "
            f"`clearingctl cluster status` and the node's log{log}"
        )
    return line


def _shown(path: Path) -> str:
    """``path`` relative to the working folder when it lies under it (``.state/...`` from
    the checkout), else as it is."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _window(stub: Any, args: argparse.Namespace) -> int:
    if args.cmd == "close":
        r = stub.CloseWindow(settlement_pb2.CloseWindowRequest(reason=args.reason),
                             timeout=args.deadline_s)  # fmt: skip
        row = {"window": r.window_id, "requested_now": r.requested_now}
        text = f"window {r.window_id} {'closing' if r.requested_now else 'was already closing'}"
    else:
        r = stub.ConfirmSettlement(
            settlement_pb2.ConfirmSettlementRequest(window_id=args.window_id,
                                                    reference=args.reference),
            timeout=args.deadline_s,
        )  # fmt: skip
        row = {"window": args.window_id, "reference": args.reference,
               "confirmed_now": r.confirmed_now}  # fmt: skip
        text = (
            f"window {args.window_id} {'settled' if r.confirmed_now else 'was already settled'}"
            ": its payments no longer count against the net debit caps (every node within a "
            "few seconds)"
        )
    if args.format == "table":  # for people: a sentence
        print(text)
    else:
        _emit([row], args.format)
    return 0


def _audit(stub: Any, args: argparse.Namespace) -> int:
    fmt, cmd = args.format, args.cmd
    if cmd == "windows":
        r = stub.ListWindows(
            audit_pb2.ListWindowsRequest(page_size=args.limit, before_window_id=args.before),
            timeout=args.deadline_s,
        )
        _emit([_summary(w) for w in r.windows], fmt)
        if r.next_before_window_id:
            print(f"older windows: clearingctl audit windows --before {r.next_before_window_id}",
                  file=sys.stderr)  # fmt: skip
        return 0
    if cmd == "window":
        return _window_parts(stub, args)
    if cmd == "payment":
        r = stub.GetPaymentHistory(
            audit_pb2.GetPaymentHistoryRequest(institution_id=args.institution_id,
                                               payment_id=args.payment_id),
            timeout=args.deadline_s,
        )  # fmt: skip
        payment = payment_detail(r.payment) | {"window": r.window_id or "open"}
        entries = [{"shard": e.shard, "epoch": e.epoch, "seq": e.seq, "kind": e.kind,
                    "entry_hash": e.entry_hash.hex()} for e in r.entries]  # fmt: skip
        if fmt == "json":
            print(json.dumps({"payment": payment, "entries": entries}, indent=2))
            return 0
        if fmt == "table":  # the payment as "field  value" lines, then its entries
            width = max(len(k) for k in payment)
            for k, v in payment.items():
                print(f"{k:<{width}}  {v}")
            print()
        _emit(entries, fmt)  # a CSV is one table: the entries
        return 0
    if cmd == "payments":
        return _payments(stub, args)
    if cmd == "verify-chains":
        _waiting("every chain asked for is read and verified", args.deadline_s)
        r = stub.VerifyChains(audit_pb2.VerifyChainsRequest(shards=args.shard),
                              timeout=args.deadline_s)  # fmt: skip
        _emit([{"shard": c.shard, "ok": c.ok, "entries": c.entries, "head_seq": c.head_seq,
                "head_hash": c.head_hash.hex()[:16], "problem": c.problem}
               for c in r.reports], fmt)  # fmt: skip
        return 0 if all(c.ok for c in r.reports) else 1
    if cmd == "proof":
        r = stub.GetInclusionProof(
            audit_pb2.GetInclusionProofRequest(window_id=args.window,
                                               institution_id=args.institution_id,
                                               payment_id=args.payment_id),
            timeout=args.deadline_s,
        )  # fmt: skip
        leaf = _decision_hash(r.entry, payment_key(args.institution_id, args.payment_id))
        ok = leaf is not None and verify_inclusion(leaf, r.leaf_index, r.tree_size,
                                                   list(r.audit_path), r.merkle_root)  # fmt: skip
        row = {"window": r.window_id, "leaf_index": r.leaf_index, "tree_size": r.tree_size,
               "merkle_root": r.merkle_root.hex(), "entry_hash": r.entry.entry_hash.hex(),
               "entry_hash_matches": leaf is not None, "verified_here": ok}  # fmt: skip
        # All of it, to be checked elsewhere (RFC 6962 over SHA-256): the sibling hashes
        # from the leaf up, a list in JSON, space-separated in a table or CSV.
        path = [h.hex() for h in r.audit_path]
        _emit([row | {"audit_path": path if fmt == "json" else " ".join(path)}], fmt)
        return 0 if ok else 1
    if cmd == "compare-cities":
        _waiting(f"window {args.window_id} is read from each city's own replica",
                 args.deadline_s)  # fmt: skip
        r = stub.CompareCities(audit_pb2.CompareCitiesRequest(window_id=args.window_id),
                               timeout=args.deadline_s)  # fmt: skip
        # The whole root, in the table too: it is what --expected-root takes.
        rows = [{"city": c.city, "merkle_root": c.merkle_root.hex(),
                 "entries": c.entry_count,
                 "differing_rows": len(c.differing_rows), "error": c.error}
                for c in r.cities]  # fmt: skip
        if fmt == "json":  # each row named, for a program to act on
            rows = [
                row | {"rows": list(c.differing_rows)}
                for row, c in zip(rows, r.cities, strict=True)
            ]
        _emit(rows, fmt)
        for c in r.cities:  # every one: a city that differs is what an auditor is after
            for text in c.differing_rows:
                print(f"  {c.city}: {text}", file=sys.stderr)
        print(f"cities agree: {r.agree}", file=sys.stderr)
        return 0 if r.agree else 1
    if cmd == "export":
        return _export(stub, args)
    return 2


def _window_parts(stub: Any, args: argparse.Namespace) -> int:
    fmt, part = args.format, args.part
    if fmt == "csv" and part is None:
        print(f"clearingctl: --format csv prints one table; choose it with --part "
              f"({', '.join(WINDOW_PARTS)})", file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    r = stub.GetWindow(audit_pb2.GetWindowRequest(window_id=args.window_id),
                       timeout=args.deadline_s)  # fmt: skip
    if not r.clearing_json:
        return _not_cleared(_summary(r.summary), fmt, part)
    if fmt == "json" and part is None:
        print(json.dumps({
            **_summary(r.summary), "cleared": True, "merkle_root": r.merkle_root.hex(),
            "clearing_sha256": r.clearing_digest.hex(), "entries": r.entry_count,
            "payments": r.payment_count,
            "clearing": json.loads(r.clearing_json) if r.clearing_json else None,
        }, indent=2))  # fmt: skip
        return 0
    # A machine reader is told in so many words; people read the table's Merkle root.
    cleared = {"cleared": True} if fmt != "table" else {}
    clearing = WindowClearing.from_json(r.clearing_json)
    tables = {
        "summary": [_summary(r.summary) | cleared | {
            "merkle_root": r.merkle_root.hex(),  # whole: what --expected-root takes
            "entries": r.entry_count, "payments": r.payment_count}],
        "net-positions": table_rows(clearing.net_positions),
        "bilateral": table_rows(clearing.bilateral),
        "instructions": table_rows(clearing.instructions),
    }  # fmt: skip
    if part is not None:
        _emit(tables[part], fmt)
        return 0
    for n, name in enumerate(WINDOW_PARTS):  # the table format: all three, one after another
        if n:
            print()
        _emit(tables[name], fmt)
    return 0


def _not_cleared(summary: dict[str, Any], fmt: str, part: str | None) -> int:
    """A window without its clearing yet (OPEN, CLOSING, CLOSED): its state and times,
    and that it is not cleared; never tables of zeros, which read as an empty cleared
    window."""
    window, state = summary["window"], summary["state"]
    if part not in (None, "summary"):
        # No table at all: an empty one would pass for a cleared window that owes nothing.
        print(f"clearingctl: window {window} is {state}, not cleared yet: its "
              f"{part.replace('-', ' ')} come with its clearing", file=sys.stderr)  # fmt: skip
        return EXIT_FAILED
    if fmt == "json" and part is None:
        print(json.dumps(summary | {"cleared": False}, indent=2))
        return 0
    if fmt != "table":
        _emit([summary | {"cleared": False}], fmt)
        return 0
    _emit([summary], fmt)
    print(f"\nwindow {window} is {state}, not cleared yet: its net positions, instructions "
          "and Merkle root come with its clearing")  # fmt: skip
    return 0


def _decision_hash(entry: Any, key: str) -> bytes | None:
    """The hash of ``entry`` (a returned ``LedgerEntryRef``) recomputed from its fields,
    if it is the DECISION of payment ``key`` and its stated hash is that hash."""
    if entry.kind != KIND_DECISION or entry.payment_key != key:
        return None
    try:
        recomputed = entry_hash(
            shard=entry.shard, epoch=entry.epoch, seq=entry.seq, kind=entry.kind,
            payment_key=entry.payment_key, body=entry.body, prev_hash=entry.prev_hash,
        )  # fmt: skip
    except (AssertionError, ValueError):  # fields no entry can have (InvariantViolation)
        return None
    return recomputed if recomputed == entry.entry_hash else None


def _payments(stub: Any, args: argparse.Namespace) -> int:
    start, end = args.start, args.end
    if start >= end:
        print(f"clearingctl: --from ({_iso(start)}) must be before --to ({_iso(end)}): the "
              "range is empty", file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    token, out = "", RowWriter(args.format)
    while True:
        req = audit_pb2.ListParticipantPaymentsRequest(
            participant_id=args.participant_id, page_size=args.page_size, page_token=token
        )
        req.start_time.FromMicroseconds(start)
        req.end_time.FromMicroseconds(end)
        r = _within_quota(
            functools.partial(stub.ListParticipantPayments, req, timeout=args.deadline_s)
        )
        out.write([_payment_row(p) for p in r.payments])  # printed before the next page
        token = r.next_page_token
        if not token:
            break
    out.close()
    return 0


def payment_detail(p: Any) -> dict[str, Any]:
    """Everything the switch holds of one payment: the order as signed, and its outcome."""
    o = p.order

    def at(ts: Any, present: bool) -> str:
        return str(ts.ToJsonString()) if present else ""

    return {
        "institution_id": o.institution_id, "payment_id": o.payment_id,
        "type": common_pb2.PaymentType.Name(o.type).removeprefix("PAYMENT_TYPE_"),
        "payer_id": o.payer_id, "payee_id": o.payee_id, "bank_account": o.bank_account,
        "amount_minor": o.amount.amount_minor, "currency": o.amount.currency, "memo": o.memo,
        "requested_at": at(o.requested_at, o.HasField("requested_at")),
        "signing_key_id": o.signing_key_id, "signature": o.signature.hex(),
        "state": common_pb2.PaymentState.Name(p.state).removeprefix("PAYMENT_STATE_"),
        "decline_reason": p.decline_reason, "switch_ref": p.switch_ref, "bank_ref": p.bank_ref,
        "received_zone": p.received_zone,
        "received_at": at(p.received_at, p.HasField("received_at")),
        "decided_at": at(p.decided_at, p.HasField("decided_at")),
        "shard": p.shard, "ledger_seq": p.ledger_seq,
    }  # fmt: skip


# A listing's columns: the payment_detail fields a page of payments is read by.
LISTING_COLUMNS = ("institution_id", "payment_id", "state", "type", "amount_minor",
                   "currency", "shard", "received_at")  # fmt: skip


def _payment_row(p: Any) -> dict[str, Any]:
    detail = payment_detail(p)
    return {k: detail[k] for k in LISTING_COLUMNS}


def _within_quota(call: Callable[[], T]) -> T:
    """``call()``, waiting out the node's RATE_LIMITED refusals as they advise (a listing
    costs one quota unit per row of its page): up to ``RATE_LIMITED_RETRIES_MAX`` times."""
    retries = 0
    while True:
        try:
            return call()
        except grpc.RpcError as e:
            err = error_details(e)
            if err is None or err.reason != RATE_LIMITED or retries >= RATE_LIMITED_RETRIES_MAX:
                raise
            retries += 1
            pause_ms = min(err.retry_after_ms or RATE_LIMITED_PAUSE_MS, RATE_LIMITED_PAUSE_MAX_MS)
            time.sleep(pause_ms / 1000)


# An export says how far it got after each this many bytes (a large window is hundreds
# of MiB and minutes of streaming).
EXPORT_PROGRESS_EVERY_BYTES = 64 * 1024 * 1024


def _waiting(what: str, deadline_s: float) -> None:
    """Say, before a long read that answers only at its end, what it waits for (a whole
    ledger takes minutes: without a word it looked hung)."""
    print(f"clearingctl: waiting while {what} (minutes on a long ledger; at most "
          f"{deadline_s:.0f}s, --deadline-s)", file=sys.stderr, flush=True)  # fmt: skip


def _export(stub: Any, args: argparse.Namespace) -> int:
    """Stream the window's files into a hidden folder inside ``--out`` and move them up
    once the last chunk arrived, the manifest last (``audit verify`` needs it): ``--out``
    holds a whole export or nothing, and an export broken off (node gone, deadline,
    Ctrl-C) leaves ``--out`` as it was. Works for any empty or new folder the user may
    write to (``.``, a symlink to one)."""
    out: Path = args.out
    if out.is_dir():
        for stale in _stale_partials(out):  # an export killed before it could undo
            shutil.rmtree(stale, ignore_errors=True)
            print(f"removed {stale}: the files of an export broken off earlier")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        print(f"clearingctl: {out} exists and is not an empty folder", file=sys.stderr)
        return EXIT_USAGE
    made = not out.exists()
    partial = out / f"{EXPORT_PARTIAL_PREFIX}{os.getpid()}"
    received = _Received()

    def undo() -> None:
        shutil.rmtree(partial, ignore_errors=True)
        if made:
            with contextlib.suppress(OSError):
                out.rmdir()

    try:
        code = _receive_export(stub, args, partial, received)
        if code == 0:
            names = sorted(partial.iterdir(), key=lambda f: (f.name == MANIFEST_FILE, f.name))
            for f in names:
                f.rename(out / f.name)
            partial.rmdir()
    except OSError as e:  # the folder: not writable, disk full
        undo()
        print(f"clearingctl: cannot write the export to {out}: {e}", file=sys.stderr)
        return EXIT_FAILED
    except BaseException:
        undo()
        if received.files:  # a refusal before the first file is said by the error alone
            print(
                f"clearingctl: the export of window {args.window_id} was broken off after "
                f"{received.files} files ({received.size / 2**20:.1f} MiB); nothing was "
                f"written to {out}",
                file=sys.stderr,
            )
        raise
    if code != 0:
        undo()
        return code
    print(f"window {args.window_id}: {received.files} files ({received.size / 2**20:.1f} MiB) "
          f"in {out}; check them with `clearingctl audit verify {out}`")  # fmt: skip
    return 0


# The hidden folder an export streams into, named after the exporting process.
EXPORT_PARTIAL_PREFIX = ".export-partial-"


def _stale_partials(out: Path) -> list[Path]:
    """The hidden folders in ``out`` of exports whose process is gone (killed before it
    could undo): an export that is still running keeps its own."""
    stale = []
    for p in out.iterdir():
        pid = p.name.removeprefix(EXPORT_PARTIAL_PREFIX)
        if p.name.startswith(EXPORT_PARTIAL_PREFIX) and pid.isdigit() and p.is_dir():
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                stale.append(p)
            except OSError:
                pass  # another user's process: running
    return stale


@dataclass
class _Received:
    files: int = 0
    size: int = 0


def _receive_export(stub: Any, args: argparse.Namespace, into: Path, got: _Received) -> int:
    into.mkdir(parents=True)
    root = into.resolve()
    reported = 0
    for chunk in stub.ExportWindow(audit_pb2.ExportWindowRequest(window_id=args.window_id),
                                   timeout=args.deadline_s):  # fmt: skip
        path = (into / chunk.path).resolve()
        if root not in path.parents:
            print(f"clearingctl: refusing path {chunk.path!r} outside {args.out}", file=sys.stderr)
            return 1
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            got.files += 1
        with path.open("ab") as f:
            f.write(chunk.data)
        got.size += len(chunk.data)
        if got.size - reported >= EXPORT_PROGRESS_EVERY_BYTES:
            reported = got.size
            print(f"  window {args.window_id}: {got.files} files, {got.size / 2**20:.0f} MiB "
                  "so far", file=sys.stderr)  # fmt: skip
    return 0


def _summary(w: Any) -> dict[str, Any]:
    def t(ts: Any, has: bool) -> str:
        return ts.ToJsonString() if has else ""

    return {
        "window": w.window_id, "state": w.state,
        "closing_at": t(w.closing_at, w.HasField("closing_at")),
        "closed_at": t(w.closed_at, w.HasField("closed_at")),
        "cleared_at": t(w.cleared_at, w.HasField("cleared_at")),
        "settled_at": t(w.settled_at, w.HasField("settled_at")),
        "reference": w.settlement_reference,  # the settlement system's, once SETTLED
    }  # fmt: skip


def _iso(us: int) -> str:
    return datetime.fromtimestamp(us / 1_000_000, UTC).isoformat()


def _emit(rows: Sequence[dict[str, Any]], fmt: str) -> None:
    out = RowWriter(fmt)
    out.write(rows)
    out.close()


class RowWriter:
    """Rows printed as they arrive, a page at a time, so a long listing shows at once:
    the table's and the CSV's header once; JSON as one array, written element by element
    (the same text as ``json.dumps(rows, indent=2)`` of all the rows). A table's columns
    are as wide as the first page needs, widened by later pages as they need."""

    def __init__(self, fmt: str) -> None:
        self.fmt = fmt
        self.columns: list[str] = []
        self.widths: dict[str, int] = {}
        self.count = 0

    def write(self, rows: Sequence[dict[str, Any]]) -> None:
        if not rows:
            return
        if self.fmt == "json":
            for row in rows:
                item = textwrap.indent(json.dumps(row, indent=2, default=str), "  ")
                print("[\n" if self.count == 0 else ",\n", item, sep="", end="")
                self.count += 1
        elif self.fmt == "csv":
            first = not self.columns
            if first:
                self.columns = list(rows[0])
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=self.columns, lineterminator="\n")
            if first:
                w.writeheader()
            w.writerows(rows)
            self.count += len(rows)
            print(buf.getvalue(), end="")
        else:
            self._table(rows)
        sys.stdout.flush()  # a page reaches a pipe now, not when the buffer fills

    def close(self) -> None:
        if self.fmt == "json":
            print("\n]" if self.count else "[]")
        elif not self.count:
            print("(none)" if self.fmt == "table" else "")
        sys.stdout.flush()

    def _table(self, rows: Sequence[dict[str, Any]]) -> None:
        first = not self.columns
        if first:
            self.columns = list(rows[0])
        for c in self.columns:
            self.widths[c] = max(
                self.widths.get(c, len(c)), *(len(str(r.get(c, ""))) for r in rows)
            )
        if first:
            print("  ".join(c.upper().ljust(self.widths[c]) for c in self.columns).rstrip())
        for r in rows:
            print("  ".join(str(r.get(c, "")).ljust(self.widths[c]) for c in self.columns).rstrip())
        self.count += len(rows)


__all__ = [
    "Node",
    "RowWriter",
    "add_parsers",
    "call",
    "positive_seconds",
    "rpc_failure",
    "run",
    "time_us",
]
