"""``python -m clearinghouse.switch --zone beijing-a --cassandra 127.0.1.1,...``"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from clearinghouse import topology
from clearinghouse.switch.config import NodeConfig
from clearinghouse.switch.server import build


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
    node = build(cfg)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    node.start()
    print(f"switch {cfg.zone} listening on {cfg.listen_host}:{node.port}", flush=True)
    done.wait()
    logging.getLogger(__name__).info("switch node %s draining", cfg.zone)
    node.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
