"""The operator console: a sampler that gathers the cluster's state every couple of
seconds, and a small threaded HTTP server that serves it.

``GET /`` is one self-contained HTML page (inline CSS, JS and SVG; nothing from a CDN);
``GET /api/state`` is the latest sample as JSON; ``GET /healthz`` says ``ok``. Requests
never gather anything themselves: they read the sampler's last result, so a slow or
dead node slows nothing but the sampler, whose every call has a short deadline.

The sampler asks, at once: the process table and etcd's leader (``LocalCluster.status``
without the ring), each switch node's ``ShardService/Describe`` and each node's
Prometheus counters (turned into rates against the previous sample). Cassandra's ring
comes from ``nodetool status`` (a JVM start, about a second of CPU), so it runs on its
own, slower loop.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

from clearinghouse.console import observe
from clearinghouse.console.observe import Source

log = logging.getLogger(__name__)

DEFAULT_PORT = 8088
DEFAULT_HOST = "127.0.0.1"
INTERVAL_S = 2.0
HISTORY_S = 600.0
RING_EVERY_S = 30.0


def page() -> bytes:
    """The console's one HTML page."""
    return resources.files("clearinghouse.console").joinpath("static/index.html").read_bytes()


class Console:
    """Samples ``source`` every ``interval_s`` and keeps the last ``history_s`` of rates."""

    def __init__(
        self,
        source: Source,
        *,
        interval_s: float = INTERVAL_S,
        history_s: float = HISTORY_S,
        ring_every_s: float | None = RING_EVERY_S,
        describe_timeout_s: float = observe.DESCRIBE_TIMEOUT_S,
        scrape_timeout_s: float = observe.SCRAPE_TIMEOUT_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, not {interval_s}")
        self.source = source
        self.interval_s = interval_s
        self.ring_every_s = ring_every_s
        self.describe_timeout_s = describe_timeout_s
        self.scrape_timeout_s = scrape_timeout_s
        self.clock = clock
        self._rates = observe.RateTracker()
        self._history: deque[tuple[float, dict[str, tuple[float, float] | None]]] = deque(
            maxlen=max(2, int(history_s / interval_s) + 1)
        )
        self._lock = threading.Lock()
        self._state: dict[str, Any] | None = None
        self._ring: list[dict[str, str]] | None = None
        self._ring_via: str | None = None
        self._ring_at: float | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="console-gather")

    # -- gathering -------------------------------------------------------------------

    def sample(self) -> dict[str, Any]:
        """Gather once (bounded by the per-node deadlines), remember it, return it."""
        t0 = time.monotonic()
        status_f = self._pool.submit(self.source.status, False)
        nodes_f = self._pool.submit(self.source.describe_nodes, self.describe_timeout_s)
        scraped = observe.scrape_all(self.source.metrics_urls(), self.scrape_timeout_s)
        zone_rates = self._rates.update(scraped)
        status = status_f.result()
        nodes = nodes_f.result()
        now = self.clock()
        topo = self.source.topo
        cities = observe.zone_grid(topo, status, nodes, zone_rates)
        zones = [z for c in cities for z in c["zones"]]
        with self._lock:
            self._history.append(
                (
                    now,
                    {
                        name: (r["payments_per_s"], r["errors_per_s"]) if r else None
                        for name, r in zone_rates.items()
                    },
                )
            )
            history = self._history_json()
            ring, ring_via, ring_at = self._ring, self._ring_via, self._ring_at
        live = [r for r in zone_rates.values() if r is not None]
        own = observe.ownership(nodes)
        health = observe.health(
            {**status, "cassandra_ring": ring, "cassandra_ring_via": ring_via,
             "switch_nodes": nodes, "ownership": own}
        )  # fmt: skip
        state: dict[str, Any] = {
            "cluster": topo.name,
            "generated_at": now,
            "gather_ms": round((time.monotonic() - t0) * 1000),
            "interval_s": self.interval_s,
            "started": status.get("started"),
            "state_dir": status.get("state_dir"),
            "summary": {
                "zones": len(zones),
                "zones_up": sum(1 for z in zones if z["state"] == "up"),
                "zones_down": [z["name"] for z in zones if z["state"] == "down"],
                "shards_served": own["served"],
                "shard_count": own["shard_count"],
                "payments_per_s": round(sum(r["payments_per_s"] for r in live), 3)
                if live
                else None,
                "errors_per_s": round(sum(r["errors_per_s"] for r in live), 3) if live else None,
            },
            "health": health.as_dict(),
            "cities": cities,
            "zone_order": [z["name"] for z in zones],
            "nodes": nodes,
            "ownership": own,
            "etcd": status.get("etcd"),
            "cassandra_ring": ring,
            "cassandra_ring_via": ring_via,
            "cassandra_ring_at": ring_at,
            "history": history,
        }
        with self._lock:
            self._state = state
        return state

    def _history_json(self) -> dict[str, Any]:
        names = self.source.topo.zone_names()
        series: dict[str, dict[str, list[float | None]]] = {
            n: {"payments_per_s": [], "errors_per_s": []} for n in names
        }
        for _, per_zone in self._history:
            for n in names:
                v = per_zone.get(n)
                series[n]["payments_per_s"].append(v[0] if v else None)
                series[n]["errors_per_s"].append(v[1] if v else None)
        return {"t": [t for t, _ in self._history], "series": series}

    def refresh_ring(self) -> None:
        ring, via = self.source.ring_view()
        with self._lock:
            self._ring, self._ring_via, self._ring_at = ring, via, self.clock()

    def state(self) -> dict[str, Any] | None:
        with self._lock:
            return self._state

    # -- running ---------------------------------------------------------------------

    def start(self) -> None:
        """Take the first sample now (so the page has something), then keep sampling."""
        self.sample()
        self._spawn("console-sampler", self._sample_loop)
        if self.ring_every_s is not None:
            self._spawn("console-ring", self._ring_loop)

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def _sample_loop(self) -> None:
        next_at = time.monotonic() + self.interval_s
        while not self._stop.wait(max(0.0, next_at - time.monotonic())):
            next_at = max(next_at + self.interval_s, time.monotonic())
            try:
                self.sample()
            except Exception:  # the console must outlive any one bad sample
                log.exception("console: gathering the cluster's state failed")

    def _ring_loop(self) -> None:
        every = self.ring_every_s or RING_EVERY_S
        while not self._stop.is_set():
            try:
                self.refresh_ring()
            except Exception:  # nodetool failing is shown as no ring
                log.exception("console: reading Cassandra's ring failed")
            if self._stop.wait(every):
                return

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5.0)
        self._pool.shutdown(wait=False, cancel_futures=True)


class ConsoleServer:
    """Serves the console's page and state on ``host:port`` (port 0: a free port)."""

    def __init__(
        self, console: Console, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT
    ) -> None:
        body = page()

        class Handler(BaseHTTPRequestHandler):
            server_version = "clearing-console/1"

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path in ("/", "/index.html"):
                    self._send(200, "text/html; charset=utf-8", body)
                elif path == "/api/state":
                    st = console.state()
                    if st is None:
                        self._send(503, "application/json", b'{"error": "no sample yet"}')
                    else:
                        self._send(200, "application/json", json.dumps(st).encode())
                elif path == "/healthz":
                    self._send(200, "text/plain; charset=utf-8", b"ok\n")
                elif path == "/favicon.ico":
                    self._send(204, "image/x-icon", b"")  # no icon; and no 404 in the log
                else:
                    self.send_error(404, "the console serves /, /api/state and /healthz")

            def _send(self, code: int, content_type: str, data: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Cache-Control", "no-store")
                self.send_header("X-Content-Type-Options", "nosniff")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("console request from %s: " + format, self.client_address[0], *args)

        self._httpd = ThreadingHTTPServer((host, port), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="console-http",
            daemon=True,
        )
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}/"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5.0)


def run(
    source: Source,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    interval_s: float = INTERVAL_S,
    ring_every_s: float | None = RING_EVERY_S,
    progress: Callable[[str], None] = print,
    stop: threading.Event | None = None,
) -> None:
    """Serve the console until ``stop`` is set (or Ctrl-C)."""
    console = Console(source, interval_s=interval_s, ring_every_s=ring_every_s)
    server = ConsoleServer(console, host, port)  # first, so a port in use fails at once
    try:
        console.start()
    except BaseException:
        server.close()
        raise
    progress(f"operator console on {server.url} (refreshing every {interval_s:g} s; Ctrl-C stops)")
    done = stop or threading.Event()
    previous = None
    if threading.current_thread() is threading.main_thread():
        # SIGTERM (``kill``, a supervisor) stops it as Ctrl-C does.
        previous = signal.signal(signal.SIGTERM, lambda _sig, _frame: done.set())
    try:
        while not done.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        server.close()
        console.close()
        progress("operator console stopped")
