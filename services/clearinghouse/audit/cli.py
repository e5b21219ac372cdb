"""``clearingctl audit ...`` and ``clearingctl window ...``: the auditor's and the
operator's commands over ``clearing.v1.AuditService`` and ``SettlementService``.

Every listing prints as a table (default), CSV (``--format csv``) or JSON
(``--format json``). A CSV output is always one table with one header row, so that a
spreadsheet loads it as it is: ``audit window`` has three tables (the summary, the net
positions, the instructions) and prints the one ``--part`` names. ``audit verify DIR``
needs no cluster at all: it checks an exported window offline (chains, Merkle root,
clearing, net positions summing to zero, signatures: with ``--keys``, against the keys
the participants published themselves rather than the export's; with
``--expected-root``, the root obtained independently).
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import sys
import time
from collections.abc import Callable, Sequence
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
from clearinghouse.audit.verify import add_expected_root, verify_export
from clearinghouse.client import error_details, local_credentials
from clearinghouse.domain.chain import entry_hash
from clearinghouse.domain.entries import KIND_DECISION
from clearinghouse.domain.merkle import verify_inclusion
from clearinghouse.security import pki
from clearinghouse.security.ratelimit import RATE_LIMITED
from clearinghouse.switch.records import payment_key
from clearinghouse.topology import Topology

CALL_DEADLINE_S = 120.0
# A listing refused for the caller's quota is asked again after the advised pause.
RATE_LIMITED_RETRIES_MAX = 20
RATE_LIMITED_PAUSE_MS = 500
RATE_LIMITED_PAUSE_MAX_MS = 5_000
T = TypeVar("T")
FORMATS = ("table", "csv", "json")
WINDOW_PARTS = ("summary", "net-positions", "instructions")
EXIT_USAGE = 2


def add_parsers(sub: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--zone", default=None, help="the switch node to ask (default: the first)")
    common.add_argument(
        "--format", choices=FORMATS, default="table", help="output (default: table)"
    )
    a = sub.add_parser("audit", help="read and verify the replicated ledger (read-only)")
    s = a.add_subparsers(dest="cmd", required=True)
    s.add_parser("windows", parents=[common], help="settlement windows, newest first")
    w = s.add_parser(
        "window", parents=[common], help="a window's state, net positions and instructions"
    )
    w.add_argument("window_id", type=int)
    w.add_argument(
        "--part",
        choices=WINDOW_PARTS,
        help="print only this table (required with --format csv: one table per CSV)",
    )
    p = s.add_parser("payment", parents=[common], help="a payment and its ledger entries")
    p.add_argument("institution_id")
    p.add_argument("payment_id")
    ps = s.add_parser(
        "payments",
        parents=[common],
        help="a participant's payments by receipt time: an institution's own, or those "
        "routed to a bank",
    )
    ps.add_argument("participant_id", help="an institution or a bank")
    ps.add_argument("--from", dest="start", required=True, help="ISO time, e.g. 2026-11-25T00:00")
    ps.add_argument("--to", dest="end", required=True, help="ISO time (exclusive)")
    ps.add_argument("--page-size", type=int, default=100)
    vc = s.add_parser(
        "verify-chains", parents=[common], help="verify shards' hash chains (default: all)"
    )
    vc.add_argument("--shard", type=int, action="append", default=[])
    pr = s.add_parser(
        "proof", parents=[common], help="prove a payment's decision is in its window's Merkle root"
    )
    pr.add_argument("institution_id")
    pr.add_argument("payment_id")
    pr.add_argument("--window", type=int, default=0)
    cc = s.add_parser(
        "compare-cities", parents=[common], help="a window read from each city's own replica"
    )
    cc.add_argument("window_id", type=int)
    ex = s.add_parser(
        "export", parents=[common], help="write a cleared window's files for offline checking"
    )
    ex.add_argument("window_id", type=int)
    ex.add_argument("--out", type=Path, required=True, help="a new or empty folder")
    v = s.add_parser(
        "verify", parents=[common], help="check an exported window offline (no cluster needed)"
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
    c = ws.add_parser("close", parents=[common], help="close the open window (every shard cuts it)")
    c.add_argument("--reason", default="operator")
    st = ws.add_parser(
        "settle", parents=[common], help="record that a cleared window's settlement ran"
    )
    st.add_argument("window_id", type=int)
    st.add_argument("--reference", required=True, help="the settlement system's reference")


def run(group: str, args: argparse.Namespace, topo: Topology) -> int:
    if group == "audit" and args.cmd == "verify":
        report = verify_export(
            args.folder, args.previous, args.keys, expected_root=args.expected_root
        )
        _emit([{"ok": report.ok, "problems": len(report.problems)}], args.format)
        for problem in report.problems:
            print(f"  {problem}", file=sys.stderr)
        return 0 if report.ok else 1
    zone = topo.zone(args.zone or topo.zones[0].name)
    # Auditors read as the auditor; closing and settling windows is the operator's.
    identity = pki.operator() if group == "window" else pki.auditor()
    target = f"{zone.address}:{zone.ports.switch}"
    with local_credentials().channel(target, identity, server=pki.node(zone.name)) as channel:
        return call(group, args, channel)


def call(group: str, args: argparse.Namespace, channel: Any) -> int:
    """Run the command's RPCs over ``channel``; a failed RPC is printed (its code and
    the switch's reason) and is exit status 1."""
    try:
        if group == "window":
            return _window(settlement_pb2_grpc.SettlementServiceStub(channel), args)
        return _audit(audit_pb2_grpc.AuditServiceStub(channel), args)
    except grpc.RpcError as e:
        err = error_details(e)
        code = e.code().name if isinstance(e, grpc.Call) else "?"
        reason = f" {err.reason}: {err.message}" if err else ""
        print(f"clearingctl: {code}{reason}", file=sys.stderr)
        return 1


def _window(stub: Any, args: argparse.Namespace) -> int:
    if args.cmd == "close":
        r = stub.CloseWindow(settlement_pb2.CloseWindowRequest(reason=args.reason),
                             timeout=CALL_DEADLINE_S)  # fmt: skip
        print(f"window {r.window_id} {'closing' if r.requested_now else 'was already closing'}")
        return 0
    r = stub.ConfirmSettlement(
        settlement_pb2.ConfirmSettlementRequest(window_id=args.window_id, reference=args.reference),
        timeout=CALL_DEADLINE_S,
    )
    print(f"window {args.window_id} {'settled' if r.confirmed_now else 'was already settled'}")
    return 0


def _audit(stub: Any, args: argparse.Namespace) -> int:
    fmt, cmd = args.format, args.cmd
    if cmd == "windows":
        r = stub.ListWindows(audit_pb2.ListWindowsRequest(page_size=50), timeout=CALL_DEADLINE_S)
        _emit([_summary(w) for w in r.windows], fmt)
        return 0
    if cmd == "window":
        return _window_parts(stub, args)
    if cmd == "payment":
        r = stub.GetPaymentHistory(
            audit_pb2.GetPaymentHistoryRequest(institution_id=args.institution_id,
                                               payment_id=args.payment_id),
            timeout=CALL_DEADLINE_S,
        )  # fmt: skip
        p = r.payment
        state = common_pb2.PaymentState.Name(p.state).removeprefix("PAYMENT_STATE_")
        print(f"{p.order.institution_id}/{p.order.payment_id}: {state}, shard {p.shard}, "
              f"window {r.window_id or 'open'}", file=sys.stderr)  # fmt: skip
        _emit([{"shard": e.shard, "epoch": e.epoch, "seq": e.seq, "kind": e.kind,
                "entry_hash": e.entry_hash.hex()} for e in r.entries], fmt)  # fmt: skip
        return 0
    if cmd == "payments":
        return _payments(stub, args)
    if cmd == "verify-chains":
        r = stub.VerifyChains(audit_pb2.VerifyChainsRequest(shards=args.shard),
                              timeout=CALL_DEADLINE_S)  # fmt: skip
        _emit([{"shard": c.shard, "ok": c.ok, "entries": c.entries, "head_seq": c.head_seq,
                "head_hash": c.head_hash.hex()[:16], "problem": c.problem}
               for c in r.reports], fmt)  # fmt: skip
        return 0 if all(c.ok for c in r.reports) else 1
    if cmd == "proof":
        r = stub.GetInclusionProof(
            audit_pb2.GetInclusionProofRequest(window_id=args.window,
                                               institution_id=args.institution_id,
                                               payment_id=args.payment_id),
            timeout=CALL_DEADLINE_S,
        )  # fmt: skip
        leaf = _decision_hash(r.entry, payment_key(args.institution_id, args.payment_id))
        ok = leaf is not None and verify_inclusion(leaf, r.leaf_index, r.tree_size,
                                                   list(r.audit_path), r.merkle_root)  # fmt: skip
        _emit([{"window": r.window_id, "leaf_index": r.leaf_index, "tree_size": r.tree_size,
                "merkle_root": r.merkle_root.hex(), "entry_hash_matches": leaf is not None,
                "verified_here": ok}], fmt)  # fmt: skip
        return 0 if ok else 1
    if cmd == "compare-cities":
        r = stub.CompareCities(audit_pb2.CompareCitiesRequest(window_id=args.window_id),
                               timeout=CALL_DEADLINE_S)  # fmt: skip
        _emit([{"city": c.city, "merkle_root": c.merkle_root.hex()[:16], "entries": c.entry_count,
                "differing_rows": len(c.differing_rows), "error": c.error}
               for c in r.cities], fmt)  # fmt: skip
        for c in r.cities:
            for row in c.differing_rows[:20]:
                print(f"  {c.city}: {row}", file=sys.stderr)
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
                       timeout=CALL_DEADLINE_S)  # fmt: skip
    if fmt == "json" and part is None:
        print(json.dumps({
            **_summary(r.summary), "merkle_root": r.merkle_root.hex(),
            "clearing_sha256": r.clearing_digest.hex(), "entries": r.entry_count,
            "payments": r.payment_count,
            "clearing": json.loads(r.clearing_json) if r.clearing_json else None,
        }, indent=2))  # fmt: skip
        return 0
    tables = {
        "summary": [_summary(r.summary) | {
            "merkle_root": r.merkle_root.hex() if fmt != "table" else r.merkle_root.hex()[:16],
            "entries": r.entry_count, "payments": r.payment_count}],
        "net-positions": [{"participant": n.participant_id, "currency": n.net_debit.currency,
                           "net_debit_minor": n.net_debit.amount_minor}
                          for n in r.net_positions],
        "instructions": [{"from": i.from_account, "to": i.to_account,
                          "currency": i.amount.currency, "amount_minor": i.amount.amount_minor}
                         for i in r.instructions],
    }  # fmt: skip
    if part is not None:
        _emit(tables[part], fmt)
        return 0
    for n, name in enumerate(WINDOW_PARTS):  # the table format: all three, one after another
        if n:
            print()
        _emit(tables[name], fmt)
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
    start, end = _ts(args.start), _ts(args.end)
    token, rows = "", []
    while True:
        req = audit_pb2.ListParticipantPaymentsRequest(
            participant_id=args.participant_id, page_size=args.page_size, page_token=token
        )
        req.start_time.FromMicroseconds(start)
        req.end_time.FromMicroseconds(end)
        r = _within_quota(
            functools.partial(stub.ListParticipantPayments, req, timeout=CALL_DEADLINE_S)
        )
        rows += [{"institution_id": p.order.institution_id, "payment_id": p.order.payment_id,
                  "state": common_pb2.PaymentState.Name(p.state).removeprefix("PAYMENT_STATE_"),
                  "type": common_pb2.PaymentType.Name(p.order.type).removeprefix("PAYMENT_TYPE_"),
                  "amount_minor": p.order.amount.amount_minor,
                  "currency": p.order.amount.currency, "shard": p.shard,
                  "received_at": p.received_at.ToJsonString()} for p in r.payments]  # fmt: skip
        token = r.next_page_token
        if not token:
            break
    _emit(rows, args.format)
    return 0


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


def _export(stub: Any, args: argparse.Namespace) -> int:
    out: Path = args.out
    if out.exists() and any(out.iterdir()):
        print(f"clearingctl: {out} is not empty", file=sys.stderr)
        return 2
    files = 0
    for chunk in stub.ExportWindow(audit_pb2.ExportWindowRequest(window_id=args.window_id),
                                   timeout=CALL_DEADLINE_S):  # fmt: skip
        path = (out / chunk.path).resolve()
        if out.resolve() not in path.parents:
            print(f"clearingctl: refusing path {chunk.path!r} outside {out}", file=sys.stderr)
            return 1
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            files += 1
        with path.open("ab") as f:
            f.write(chunk.data)
    print(f"window {args.window_id}: {files} files in {out}; check them with "
          f"`clearingctl audit verify {out}`")  # fmt: skip
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
    }  # fmt: skip


def _ts(text: str) -> int:
    d = datetime.fromisoformat(text)
    if d.tzinfo is None:
        d = d.replace(tzinfo=UTC)
    return int(d.timestamp() * 1_000_000)


def _emit(rows: Sequence[dict[str, Any]], fmt: str) -> None:
    if fmt == "json":
        print(json.dumps(list(rows), indent=2, default=str))
        return
    if not rows:
        print("(none)" if fmt == "table" else "")
        return
    cols = list(rows[0])
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        print(buf.getvalue(), end="")
        return
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    print("  ".join(c.upper().ljust(widths[c]) for c in cols).rstrip())
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(widths[c]) for c in cols).rstrip())


__all__ = ["add_parsers", "call", "run"]
