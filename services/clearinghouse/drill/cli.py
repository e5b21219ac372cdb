"""``clearingctl drill <scenario>``: the command line of the drills."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from clearinghouse.drill import runner
from clearinghouse.drill.scenarios import SCENARIOS, PlanError
from clearinghouse.localcluster.cluster import LocalCluster

EXIT_CHECKS_FAILED = 1
EXIT_USAGE = 2


def add_parser(sub: Any) -> None:
    d = sub.add_parser(
        "drill",
        help="a failover drill under load: fault, recovery, checks, report",
        description="Drive payments, inject a fault picked from the seed, recover, check "
        "every acknowledged payment against each city's ledger, the banks and the shard "
        "map, and write report.json, timeline.html and the client log to --out. Exit "
        "code 1 when a check failed.",
    )
    d.add_argument("scenario", choices=SCENARIOS)
    d.add_argument(
        "--seed",
        type=int,
        default=runner.DEFAULT_SEED,
        help="picks the victims and the payment mix; rerun with it to repeat "
        "(default: %(default)s)",
    )
    d.add_argument(
        "--duration-s",
        type=float,
        default=runner.DEFAULT_DURATION_S,
        help="seconds of load, longer if the recovery needs it (default: %(default)g)",
    )
    d.add_argument(
        "--rate",
        type=float,
        default=runner.DEFAULT_RATE_PER_S,
        help="payments per second; 0 sends as fast as the workers go (default: %(default)g)",
    )
    d.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for the report (default: <state>/drills/<time>-<scenario>-seed<n>)",
    )
    d.add_argument(
        "--hold-s",
        type=float,
        default=None,
        help="seconds the fault is held before recovery (default: per scenario)",
    )
    d.add_argument(
        "--ledger-wait-s",
        type=float,
        default=runner.LEDGER_WAIT_S,
        help="seconds a city's replica may take to hold every acknowledged payment "
        "(default: %(default)g)",
    )
    d.add_argument(
        "--repair-after-s",
        type=float,
        default=runner.REPAIR_AFTER_S,
        help="a city's replica that still lacks rows after this many seconds is repaired "
        "(nodetool repair --full) and read again; the report says so (default: %(default)g)",
    )
    d.add_argument(
        "--warmup-max-s",
        type=float,
        default=runner.WARMUP_MAX_S,
        help="before the measured load, send it unmeasured until the cluster answers in "
        "time (3 s in a row at 95 %%), for at most this long; 0: no warm-up "
        "(default: %(default)g)",
    )
    d.add_argument(
        "--no-repair",
        action="store_true",
        help="never repair: see what hint replay alone brings",
    )


def run(lc: LocalCluster, args: argparse.Namespace, progress: Any) -> int:
    opts = runner.DrillOptions(
        scenario=args.scenario, seed=args.seed, duration_s=args.duration_s,
        rate_per_s=args.rate, out=args.out, hold_s=args.hold_s,
        ledger_wait_s=args.ledger_wait_s,
        repair_after_s=None if args.no_repair else args.repair_after_s,
        warmup_max_s=args.warmup_max_s,
    )  # fmt: skip
    if opts.rate_per_s < 0 or opts.duration_s <= 0:
        print("clearingctl: --rate must be >= 0 and --duration-s > 0", file=sys.stderr)
        return EXIT_USAGE
    if args.repair_after_s < 0 or opts.ledger_wait_s < 0 or opts.warmup_max_s < 0:
        print("clearingctl: --repair-after-s, --ledger-wait-s and --warmup-max-s must be >= 0",
              file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    try:
        rep = runner.run(lc, opts, progress)
    except PlanError as e:
        print(f"clearingctl: {e}", file=sys.stderr)
        return EXIT_USAGE
    return 0 if rep["ok"] else EXIT_CHECKS_FAILED
