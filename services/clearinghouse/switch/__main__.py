"""``python -m clearinghouse.switch --zone beijing-a --cassandra 127.0.1.1,...``"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from clearinghouse import telemetry, topology
from clearinghouse.security import pki
from clearinghouse.switch import heap
from clearinghouse.switch.config import NodeConfig
from clearinghouse.switch.server import Node, build

STARTUP_BUDGET_S = 60.0
STARTUP_RETRY_PAUSE_S = 2.0
log = logging.getLogger("clearinghouse.switch")


def start_with_retries(cfg: NodeConfig, stop: threading.Event) -> Node | None:
    """Build and start the node; storage that is not ready yet is retried, within a bound.

    A fresh cluster may still be spreading a new schema, or a city may be restarting:
    a node that exits at the first error would turn a short wait into an outage.
    """
    deadline = time.monotonic() + STARTUP_BUDGET_S
    while not stop.is_set():
        try:
            node = build(cfg)
        except Exception:
            if time.monotonic() > deadline:
                log.exception("switch %s could not start within %.0fs", cfg.zone, STARTUP_BUDGET_S)
                return None
            log.warning("switch %s: storage not ready, retrying", cfg.zone, exc_info=True)
            stop.wait(STARTUP_RETRY_PAUSE_S)
            continue
        try:
            node.start()
            return node
        except Exception:
            node.stop()
            if time.monotonic() > deadline:
                log.exception("switch %s could not start within %.0fs", cfg.zone, STARTUP_BUDGET_S)
                return None
            log.warning("switch %s: start failed, retrying", cfg.zone, exc_info=True)
            stop.wait(STARTUP_RETRY_PAUSE_S)
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="clearinghouse.switch", description="run one switch node")
    p.add_argument("--zone", required=True)
    p.add_argument("--cassandra", required=True, help="comma-separated Cassandra addresses")
    p.add_argument("--topology", type=Path, default=None)
    p.add_argument("--port", type=int, default=None, help="override the topology's switch port")
    p.add_argument(
        "--pki-dir",
        type=Path,
        default=None,
        help="the local CA's folder (default: CLEARING_PKI_DIR or .state/pki)",
    )
    p.add_argument(
        "--etcd-pki-dir",
        type=Path,
        default=os.environ.get("CLEARING_ETCD_PKI_DIR"),
        help="the cluster CA's folder, whose certificates etcd requires: this node's for "
        "etcd (node-<zone>/) and the CA's (default: CLEARING_ETCD_PKI_DIR)",
    )
    p.add_argument("--state-marker", default="", help="ignored; identifies the process")
    p.add_argument(
        "--window-interval-s",
        type=float,
        default=float(os.environ.get("CLEARING_WINDOW_INTERVAL_S", "0")),
        help="close the settlement window this often (0: only on demand)",
    )
    args = p.parse_args(argv)
    if args.etcd_pki_dir is None:
        p.error("--etcd-pki-dir (or CLEARING_ETCD_PKI_DIR) is required: etcd speaks TLS only")
    heap.configure_collector()
    telemetry.configure_logging(logging.INFO, zone=args.zone, stream=sys.stderr)
    topo = topology.load(args.topology)
    cfg = NodeConfig.for_zone(
        topo, args.zone, args.cassandra.split(","), args.port,
        window_interval_s=args.window_interval_s, pki_dir=args.pki_dir or pki.default_directory(),
        etcd_pki_dir=Path(args.etcd_pki_dir),
    )  # fmt: skip
    # Traces, metrics (Prometheus on the zone's admin port) and OTLP as the environment
    # says (CLEARING_TRACE_FILE, CLEARING_PROMETHEUS_PORT, CLEARING_OTLP_ENDPOINT, ...).
    # CLEARING_TELEMETRY=off runs the node without any (for measuring what it costs).
    tel = (
        None
        if os.environ.get("CLEARING_TELEMETRY", "on") == "off"
        else telemetry.Telemetry.setup(
            telemetry.TelemetryConfig.from_env(
                service_name="clearing-switch", node_id=cfg.node_id, zone=cfg.zone, city=cfg.city
            )
        )
    )
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    try:
        node = start_with_retries(cfg, done)
        if node is None:
            return 1
        print(f"switch {cfg.zone} listening on {cfg.listen_host}:{node.port}", flush=True)
        done.wait()
        logging.getLogger(__name__).info("switch node %s draining", cfg.zone)
        node.stop()
        return 0
    finally:
        if tel is not None:
            tel.shutdown()


if __name__ == "__main__":
    raise SystemExit(main())
