"""``clearingctl``: the operator's command line.

``clearingctl cluster up|down|status|kill|stop|start|pause|resume|schema|repair`` runs
the local three-city cluster; ``demo`` and ``bench`` drive it; ``audit ...`` reads and
verifies the ledger (``audit verify DIR`` offline); ``window close|settle`` runs
settlement windows; ``console`` serves the operator's web page; ``drill SCENARIO`` runs a
failover drill under load and reports it; ``pki ...`` issues, lists and revokes
certificates. Exit codes: 0 success,
1 the operation failed (the message names the component and its log), 2 bad usage, 141
the reader of the output closed it early (``| head``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from clearinghouse import topology
from clearinghouse.argtypes import TCP_PORT_MAX, bounded_int
from clearinghouse.console import observe
from clearinghouse.console import server as console_server
from clearinghouse.localcluster.cluster import ClusterError, LocalCluster
from clearinghouse.localcluster.paths import Paths
from clearinghouse.localcluster.procs import ProcessError
from clearinghouse.security.pki import PkiError

# The demo's --payments: a burst to show the switch working, not a load test (see bench).
DEMO_PAYMENTS_MAX = 100_000
EXIT_FAILED = 1
EXIT_USAGE = 2
# What a shell reports for a process a closed pipe ended (128 + SIGPIPE), e.g. the writer
# of `clearingctl audit window 2 | head -3`.
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE


def _say(msg: str) -> None:
    print(msg, flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clearingctl", description=__doc__.splitlines()[0])
    p.add_argument(
        "--topology", type=Path, default=None, help="topology file (default: cluster/topology.json)"
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="where processes keep data and logs (default: .state/, or $CLEARING_STATE_DIR)",
    )
    sub = p.add_subparsers(dest="group", required=True)
    c = sub.add_parser("cluster", help="run the local three-city cluster")
    cs = c.add_subparsers(dest="cmd", required=True)
    up = cs.add_parser(
        "up",
        help="start whatever is not running: etcd, Cassandra (and apply the schema) and a "
        "switch node per zone (the bank simulators start with demo, bench and drill)",
    )
    up.add_argument(
        "--cassandra-nodes",
        type=int,
        choices=(3, 6),
        default=None,
        help="3 (one per city, default) or 6 (one per zone)",
    )
    down = cs.add_parser("down", help="stop everything this tool started")
    down.add_argument("--wipe", action="store_true", help="also delete all data and logs")
    st = cs.add_parser(
        "status",
        help="processes by city and zone, Cassandra's ring, etcd's leader, shard owners, "
        "payments/s and errors per zone, and a verdict it exits with: 0 healthy, "
        "1 degraded (payments go on), 2 outage (payments, all or some, are refused)",
    )
    st.add_argument("--json", action="store_true")
    st.add_argument("--no-ring", action="store_true", help="skip nodetool (faster)")
    st.add_argument(
        "--no-live",
        action="store_true",
        help="skip shard ownership (Describe) and payments/s (two metrics scrapes, 1 s)",
    )
    for name, what in (
        ("kill", "SIGKILL"),
        ("stop", "SIGTERM, then SIGKILL after a grace period"),
        ("start", "start again"),
        ("pause", "SIGSTOP"),
        ("resume", "SIGCONT"),
    ):
        a = cs.add_parser(
            name, help=f"{what}: a process (cassandra@beijing-a), a zone, a city or all"
        )
        a.add_argument("target")
    cs.add_parser("schema", help="apply the keyspace and tables (idempotent)")
    rp = cs.add_parser(
        "repair",
        help="full repair of the keyspace (nodetool repair --full) from one city's Cassandra "
        "nodes, which levels every city: after a city was down and its hints are done",
    )
    rp.add_argument(
        "city",
        nargs="?",
        default="all",
        help="the city whose nodes repair (each city holds the whole ring, so any one city "
        "repairs every city); all (default): the first city whose nodes all run",
    )
    d = sub.add_parser(
        "demo", help="cluster up, banks, participants, a burst of payments, a summary"
    )
    d.add_argument(
        "--payments",
        type=bounded_int(1, DEMO_PAYMENTS_MAX),
        default=600,
        help=f"how many payments to send (1-{DEMO_PAYMENTS_MAX:,}; default: %(default)s)",
    )
    b = sub.add_parser("bench", help="durable payments/s and latency against the local cluster")
    b.add_argument("--seconds", type=float, default=20.0, help="length of each phase")
    b.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    b.add_argument(
        "--signing-only",
        action="store_true",
        help="only measure signing and verifying orders in-process (no cluster)",
    )
    b.add_argument(
        "--storage-only",
        action="store_true",
        help="only measure what Cassandra costs per commit write and fence read",
    )
    con = sub.add_parser(
        "console", help="serve the operator console (zones, shard ownership, payments/s)"
    )
    con.add_argument(
        "--port",
        type=bounded_int(0, TCP_PORT_MAX),
        default=console_server.DEFAULT_PORT,
        help="TCP port to serve on (0: any free port; default: %(default)s)",
    )
    con.add_argument(
        "--host",
        default=console_server.DEFAULT_HOST,
        help="address to bind (default 127.0.0.1; the page has no authentication)",
    )
    con.add_argument(
        "--interval", type=float, default=console_server.INTERVAL_S, help="seconds between samples"
    )
    con.add_argument("--no-ring", action="store_true", help="never run nodetool for the ring")
    from clearinghouse.audit import cli as audit_cli  # noqa: PLC0415 (loads gRPC code)

    audit_cli.add_parsers(sub)
    from clearinghouse import admin_cli  # noqa: PLC0415 (loads gRPC code)

    admin_cli.add_parsers(sub)
    from clearinghouse.drill import cli as drill_cli  # noqa: PLC0415 (loads gRPC code)

    drill_cli.add_parser(sub)
    from clearinghouse.security import cli as pki_cli  # noqa: PLC0415 (loads cryptography)

    pki_cli.add_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """The command's exit status. A reader that closed our standard output early (``|
    head``) ends the command quietly, as Python's documentation advises for SIGPIPE."""
    try:
        try:
            return _main(argv)
        finally:
            sys.stdout.flush()  # buffered output meets a closed pipe here at the latest
    except BrokenPipeError:
        _drop_stdout()
        return EXIT_BROKEN_PIPE


def _drop_stdout() -> None:
    """Point standard output at /dev/null: the interpreter flushes it again on exit, and
    would report the broken pipe there."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # not a file descriptor (a test's captured output)
        pass
    finally:
        os.close(devnull)


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        topo = topology.load(args.topology)
    except topology.TopologyError as e:
        print(f"clearingctl: {e}", file=sys.stderr)
        return EXIT_USAGE
    state = args.state_dir or (
        Path(os.environ["CLEARING_STATE_DIR"]) if os.environ.get("CLEARING_STATE_DIR") else None
    )
    lc = LocalCluster(topo, Paths.default(state), progress=_say)
    try:
        if args.group == "cluster":
            return _cluster(lc, args)
        if args.group == "demo":
            from clearinghouse import demo  # noqa: PLC0415 (imports generated gRPC code)

            demo.run(lc, payments=args.payments, progress=_say)
            return 0
        if args.group in ("audit", "window"):
            from clearinghouse.audit import cli as audit_cli  # noqa: PLC0415 (loads gRPC code)

            return audit_cli.run(args.group, args, topo, switch_log=_switch_log(lc))
        if args.group in ("participant", "payment"):
            from clearinghouse import admin_cli  # noqa: PLC0415 (loads gRPC code)

            return admin_cli.run(args.group, args, topo, switch_log=_switch_log(lc))
        if args.group == "bench":
            from clearinghouse import bench  # noqa: PLC0415 (imports generated gRPC code)

            if args.signing_only:
                _say(json.dumps(bench.signing_cost(), indent=2))
                return 0
            if args.storage_only:
                _say(json.dumps(bench.storage_cost(lc, progress=_say), indent=2))
                return 0
            bench.run(lc, seconds=args.seconds, progress=_say, out=args.out)
            return 0
        if args.group == "drill":
            from clearinghouse.drill import cli as drill_cli  # noqa: PLC0415 (loads gRPC code)

            return drill_cli.run(lc, args, _say)
        if args.group == "console":
            return _console(lc, args)
        if args.group == "pki":
            from clearinghouse.security import cli as pki_cli  # noqa: PLC0415

            return pki_cli.run(args, topo, switch_log=_switch_log(lc))
    except KeyError as e:  # str() of a KeyError is its argument's repr, quotes and all
        print(f"clearingctl: {e.args[0] if e.args else e}", file=sys.stderr)
        return EXIT_FAILED
    except topology.TopologyError as e:  # e.g. --cassandra-nodes 5
        print(f"clearingctl: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (ClusterError, ProcessError, FileNotFoundError, PkiError) as e:
        print(f"clearingctl: {e}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_USAGE


def _switch_log(lc: LocalCluster) -> Callable[[str], Path]:
    """A zone's switch node's log, as the local cluster keeps it."""
    return lambda zone: lc.switch_managed(lc.topo.zone(zone)).log


def _repair(lc: LocalCluster, city: str) -> int:
    reps = lc.repair(None if city == "all" else city)
    for r in reps:
        if not r.ok:
            why = f"failed: {r.detail}; read {r.log}"
        elif r.left_out:
            why = f"left out {', '.join(r.left_out)} (down): not repaired; run again once up"
        else:
            continue
        print(f"clearingctl: repair from cassandra@{r.zone} {why}", file=sys.stderr)
    return 0 if all(r.ok and not r.left_out for r in reps) else EXIT_FAILED


def _cluster(lc: LocalCluster, args: argparse.Namespace) -> int:
    cmd = args.cmd
    if cmd == "up":
        lc.up(args.cassandra_nodes)
        print_status(lc.status(with_ring=True))
        return 0
    if cmd == "down":
        lc.down(wipe=args.wipe)
        return 0
    if cmd == "status":
        st = lc.status(with_ring=not args.no_ring)
        if not args.no_live:
            st.update(observe.live_status(lc))
        verdict = observe.health(st)
        if args.json:
            print(json.dumps({**st, "health": verdict.as_dict()}, indent=2))
        else:
            print_status(st)
            if not args.no_live:
                print_live(st)
            print_health(verdict)
        return verdict.exit_code
    if cmd == "schema":
        lc.apply_schema()
        return 0
    if cmd == "repair":
        return _repair(lc, args.city)
    action = getattr(lc, cmd)
    hit = action(args.target)
    verb = {
        "kill": "killed",
        "stop": "stopped",
        "start": "started",
        "pause": "paused",
        "resume": "resumed",
    }[cmd]
    _say(f"{verb}: {', '.join(hit) if hit else 'nothing (already in that state)'}")
    return 0


def print_status(st: dict[str, Any]) -> None:
    if not st["started"]:
        _say("no cluster has been started here (clearingctl cluster up)")
    _say(f"{'CITY':<10}{'ZONE':<12}{'PROCESS':<11}{'STATE':<8}{'PID':<9}{'ENDPOINT':<22}NOTE")
    for r in st["processes"]:
        note = []
        if r["etcd_leader"]:
            note.append("etcd leader")
        if r["state"] == "up" and not r["listening"]:
            note.append("not listening yet")
        endpoint = f"{r['address']}:{r['port']}"
        pid = str(r["pid"] or "-")
        cols = f"{r['city']:<10}{r['zone']:<12}{r['kind']:<11}{r['state']:<8}{pid:<9}"
        _say(f"{cols}{endpoint:<22}{', '.join(note)}")
    e = st["etcd"]
    _say(
        f"etcd: leader {e['leader'] or 'NONE'} (raft term {e['raft_term']}), "
        f"answering: {', '.join(e['members_answering']) or 'none'}"
    )
    ring = st["cassandra_ring"]
    if not st.get("cassandra_ring_read", True):
        _say("cassandra ring: not read (--no-ring)")
        return
    if ring is None:
        _say("cassandra ring: unavailable (no node answered nodetool)")
        return
    _say(f"cassandra ring (nodetool status via {st['cassandra_ring_via']}):")
    by_dc: dict[str, list[dict[str, str]]] = {}
    for r in ring:
        by_dc.setdefault(r["dc"], []).append(r)
    for dc, rows in by_dc.items():
        cells = ", ".join(
            f"{r['rack']} {r['address']} {'UP' if r['status'] == 'U' else 'DOWN'}/{r['state']}"
            for r in rows
        )
        _say(f"  {dc:<10}{cells}")


def print_health(h: observe.Health) -> None:
    """The last lines of ``cluster status``: the verdict it exits with, and why."""
    city = "yes" if h.survives_city_loss else "no"
    _say(f"health: {h.verdict.upper()} (exit {h.exit_code}); would survive losing a city: {city}")
    for p in h.problems:
        _say(f"  - {p}")
    for what in h.not_checked:
        _say(f"  not checked: {what}")


def print_live(st: dict[str, Any]) -> None:
    """Shard ownership per node and payments/s and errors per zone (``observe.live_status``)."""
    own = st["ownership"]
    served = f"{own['served']}/{own['shard_count']} shards served"
    if own["unserved"]:
        served += f"; waiting for an owner: {observe.shard_ranges(own['unserved'])}"
    _say(f"switch nodes (ShardService/Describe): {served}")
    _say(
        f"  {'ZONE':<12}{'SHARDS':>7}{'COMMITS':>10}{'ENTRIES':>10}{'LOCAL':>9}{'FORWARDED':>11}"
        f"  {'CODE':<19}{'EPOCHS':<14}SHARD NUMBERS"
    )
    for zone, d in st["switch_nodes"].items():
        if d is None:
            _say(f"  {zone:<12}{'-':>7}  not answering")
            continue
        shards = [s["shard"] for s in d["shards"]]
        epochs = [s["epoch"] for s in d["shards"]]
        ep = f"{min(epochs)}..{max(epochs)}" if epochs else "-"
        code = d["code_version"] or "-"
        _say(
            f"  {zone:<12}{len(shards):>7}{d['commits']:>10}{d['entries']:>10}"
            f"{d['routed_local']:>9}{d['routed_forwarded']:>11}  {code:<19}{ep:<14}"
            f"{observe.shard_ranges(shards) or '-'}"
        )
    if st["other_code"]:
        _say(
            f"  not the code of this checkout ({st['checkout_code_version']}): "
            f"{', '.join(st['other_code'])}; restart each with `clearingctl cluster stop "
            f"switch@<zone>` and `clearingctl cluster start switch@<zone>`, one zone at a time"
        )
    for shard, zones in own["contested"].items():
        _say(f"  shard {shard} is claimed by {', '.join(zones)} (a handover in progress)")
    _say(
        f"payments per zone over {st['throughput_interval_s']:g} s (decided by the node; "
        f"PaymentService requests and errors received):"
    )
    _say(f"  {'ZONE':<12}{'PAYMENTS/S':>11}{'REQUESTS/S':>12}{'ERRORS/S':>10}{'ERROR RATE':>12}")
    for zone, r in st["throughput"].items():
        if r is None:
            _say(f"  {zone:<12}{'-':>11}  metrics not answering")
            continue
        ratio = "-" if r["error_ratio"] is None else f"{100 * r['error_ratio']:.1f}%"
        _say(
            f"  {zone:<12}{r['payments_per_s']:>11.1f}{r['requests_per_s']:>12.1f}"
            f"{r['errors_per_s']:>10.2f}{ratio:>12}"
        )


def _console(lc: LocalCluster, args: argparse.Namespace) -> int:
    if args.interval <= 0:
        print("clearingctl: --interval must be positive", file=sys.stderr)
        return EXIT_USAGE
    try:
        console_server.run(
            lc,
            host=args.host,
            port=args.port,
            interval_s=args.interval,
            ring_every_s=None if args.no_ring else console_server.RING_EVERY_S,
            progress=_say,
        )
    except OSError as e:
        print(
            f"clearingctl: cannot serve the console on {args.host}:{args.port}: {e}",
            file=sys.stderr,
        )
        return EXIT_FAILED
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
