"""``python -m clearinghouse.switch --zone beijing-a --cassandra 127.0.1.1,...``"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from pathlib import Path

from clearinghouse import topology
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
    p.add_argument("--state-marker", default="", help="ignored; identifies the process")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s [" + args.zone + "] %(message)s",
        stream=sys.stderr,
    )
    topo = topology.load(args.topology)
    cfg = NodeConfig.for_zone(topo, args.zone, args.cassandra.split(","), args.port)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    node = start_with_retries(cfg, done)
    if node is None:
        return 1
    print(f"switch {cfg.zone} listening on {cfg.listen_host}:{node.port}", flush=True)
    done.wait()
    logging.getLogger(__name__).info("switch node %s draining", cfg.zone)
    node.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
