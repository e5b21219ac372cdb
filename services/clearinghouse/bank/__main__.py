"""Run one simulated bank until SIGTERM.

Example::

    python -m clearinghouse.bank --bank-id BANK_ICBC --listen 127.0.0.1:0 \\
        --journal state/banks/BANK_ICBC.jsonl --approve-ratio 0.9 --latency-ms 2-10 \\
        --timeout-ratio 0 --hang-ms 20000 --seed 1

Once it serves, the process prints exactly one line to stdout,
``bank BANK_ICBC listening on HOST:PORT``, with the port actually bound (so
``--listen 127.0.0.1:0`` works); logs go to stderr.

Signals, for drills (there is deliberately no control RPC; a signal cannot be sent by
a stray client):

* ``SIGUSR1`` toggles the outage: while on, every BankService call fails with
  UNAVAILABLE and applies nothing, and health checking reports NOT_SERVING.
* ``SIGUSR2`` toggles "hang every request": while on, every BankService call (Inquire
  and Reverse included) is applied and then answered only after ``--hang-ms``.
* ``SIGTERM`` or ``SIGINT`` stops the bank gracefully: in-flight calls get
  ``--grace-s`` seconds, hanging ones are released with UNAVAILABLE, and the process
  exits 0.
"""

from __future__ import annotations

import argparse
import logging
import queue
import signal
import sys
from pathlib import Path
from types import FrameType

from clearinghouse.bank._behaviour import DEFAULT_HANG_MS, BankBehaviour, parse_latency_ms
from clearinghouse.bank.server import GRACE_S, BankConfig, serve
from clearinghouse.security import pki
from clearinghouse.security.identity import Identity, Role

_log = logging.getLogger("clearinghouse.bank")

# How often the main thread wakes up to look for signals it has not yet acted on.
SIGNAL_POLL_INTERVAL_S = 0.5


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m clearinghouse.bank",
        description="Serve one simulated bank's clearing.v1.BankService.",
    )
    parser.add_argument("--bank-id", required=True, help="participant id, e.g. BANK_ICBC")
    parser.add_argument("--listen", default="127.0.0.1:0", help="host:port (port 0: any)")
    parser.add_argument("--journal", type=Path, required=True, help="JSON-lines book journal")
    parser.add_argument(
        "--pki-dir", type=Path, default=None, help="the CA folder (default: .state/pki)"
    )
    parser.add_argument("--approve-ratio", type=float, default=0.9)
    parser.add_argument("--latency-ms", default="2-10", help="MIN-MAX answer delay in ms")
    parser.add_argument("--timeout-ratio", type=float, default=0.0)
    parser.add_argument("--hang-ms", type=int, default=DEFAULT_HANG_MS)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--outage", action="store_true", help="start in a simulated outage")
    parser.add_argument("--grace-s", type=float, default=GRACE_S, help="stop grace, seconds")
    parser.add_argument("--log-level", default="INFO")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        latency_min_ms, latency_max_ms = parse_latency_ms(args.latency_ms)
        behaviour = BankBehaviour(
            approve_ratio=args.approve_ratio,
            latency_ms_min=latency_min_ms,
            latency_ms_max=latency_max_ms,
            timeout_ratio=args.timeout_ratio,
            hang_ms=args.hang_ms,
            outage=args.outage,
            seed=args.seed,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    # Signal handlers only queue the signal number: SimpleQueue.put is safe to call
    # from a handler, while logging or gRPC calls there could deadlock on a lock that
    # the interrupted main thread holds.
    received: queue.SimpleQueue[int] = queue.SimpleQueue()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        received.put(signum)

    for handled in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(handled, on_signal)

    ca = pki.LocalCA(args.pki_dir or pki.default_directory())
    keys = ca.load(Identity(Role.BANK, args.bank_id))
    handle = serve(
        BankConfig(
            bank_id=args.bank_id,
            keys=keys,
            listen=args.listen,
            journal_path=args.journal,
            behaviour=behaviour,
        )
    )
    print(f"bank {handle.bank_id} listening on {handle.address}", flush=True)

    while True:
        try:
            signum = received.get(timeout=SIGNAL_POLL_INTERVAL_S)
        except queue.Empty:
            continue
        if signum == signal.SIGUSR1:
            _log.warning("bank %s: outage %s", handle.bank_id, _on_off(handle.toggle_outage()))
        elif signum == signal.SIGUSR2:
            _log.warning("bank %s: hang-all %s", handle.bank_id, _on_off(handle.toggle_hang_all()))
        else:
            _log.info("bank %s: %s, stopping", handle.bank_id, signal.Signals(signum).name)
            handle.stop(args.grace_s)
            return 0


def _on_off(flag: bool) -> str:
    return "on" if flag else "off"


if __name__ == "__main__":
    sys.exit(main())
