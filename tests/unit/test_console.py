"""clearinghouse.console: the state gathering (metrics parsing and rates, ownership, the
zone grid), ``LocalCluster.describe_nodes`` against stub gRPC nodes, and the console's
HTTP endpoints against a fake cluster whose /metrics a stub HTTP server serves, all on
127.0.0.1 with ports picked by the OS."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.metrics import MeterProvider

from clearing.v1 import shard_pb2, shard_pb2_grpc
from clearinghouse import cli, topology
from clearinghouse.code_version import code_version
from clearinghouse.console import observe
from clearinghouse.console.server import Console, ConsoleServer, page, run
from clearinghouse.localcluster.cluster import LocalCluster
from clearinghouse.localcluster.paths import Paths
from clearinghouse.security import pki
from clearinghouse.telemetry.instruments import DomainMetrics, RpcInstruments
from clearinghouse.telemetry.prometheus import PrometheusReader

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

TOPO = topology.load()
ZONES = TOPO.zone_names()
PAY = "clearing.v1.PaymentService"


# -- a stub of every node's /metrics -----------------------------------------------------


def metrics_text(decided: dict[str, float], ok: float, errors: dict[str, float]) -> str:
    """Exposition text as the switch renders it: decided by state, PaymentService calls by
    status code, and ShardService calls that must not count."""
    lines = [
        "# HELP target_info Target metadata",
        "# TYPE target_info gauge",
        'target_info{service_name="clearing-switch",clearing_zone="x"} 1',
        "# TYPE clearing_payments_decided_total counter",
    ]
    lines += [
        f'clearing_payments_decided_total{{state="{s}",type="DEBIT",zone="x"}} {v}'
        for s, v in decided.items()
    ]
    lines.append("# TYPE rpc_server_requests_total counter")
    base = f'rpc_system="grpc",rpc_service="{PAY}",rpc_method="SubmitPayment"'
    lines.append(f'rpc_server_requests_total{{{base},rpc_grpc_status_code="0"}} {ok}')
    lines += [
        f'rpc_server_requests_total{{{base},rpc_grpc_status_code="{code}"}} {v}'
        for code, v in errors.items()
    ]
    shard = 'rpc_system="grpc",rpc_service="clearing.v1.ShardService",rpc_method="SubmitOwned"'
    lines.append(f'rpc_server_requests_total{{{shard},rpc_grpc_status_code="14"}} 999')
    lines.append(f'rpc_server_duration_milliseconds_bucket{{{base},le="+Inf"}} 5')
    return "\n".join(lines) + "\n"


class MetricsStub:
    """GET /<zone>/metrics from a dict of texts; a zone in ``hang`` never answers in time."""

    def __init__(self) -> None:
        self.texts: dict[str, str] = {}
        self.hang: set[str] = set()
        self.release = threading.Event()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                zone = self.path.strip("/").split("/")[0]
                if zone in stub.hang:
                    stub.release.wait(10)
                text = stub.texts.get(zone)
                if text is None:
                    self.send_error(404)
                    return
                body = text.encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, zone: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{zone}/metrics"

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def metrics() -> Iterator[MetricsStub]:
    stub = MetricsStub()
    yield stub
    stub.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- a fake cluster ----------------------------------------------------------------------


def describe(zone: str, shards: list[int], epoch: int = 100) -> dict[str, Any]:
    return {
        "node_id": zone,
        "shards": [{"shard": s, "epoch": epoch + s} for s in shards],
        "commits": 10,
        "entries": 40,
        "routed_local": 7,
        "routed_forwarded": 3,
        "code_version": code_version(),
    }


class FakeCluster:
    """What the console reads of a cluster, from dicts a test changes (a ``Source``)."""

    def __init__(self, metrics: MetricsStub) -> None:
        self.topo = TOPO
        self.metrics = metrics
        self.down: set[str] = set()  # zones whose switch node is dead
        self.nodes = {z: describe(z, list(range(i, 128, len(ZONES)))) for i, z in enumerate(ZONES)}
        self.ring_calls = 0

    def status(self, with_ring: bool = True) -> dict[str, Any]:
        etcd = {c.zones[0].name for c in self.topo.cities}
        rows = []
        for z in self.topo.zones:
            kinds = ["etcd", "cassandra", "switch"] if z.name in etcd else ["switch"]
            for kind in kinds:
                up = not (kind == "switch" and z.name in self.down)
                rows.append({
                    "city": z.city, "zone": z.name, "kind": kind,
                    "state": "up" if up else "down", "pid": 4242 if up else None,
                    "address": z.address, "port": 1, "listening": up,
                    "etcd_leader": kind == "etcd" and z.name == "shanghai-a", "log": "x",
                })  # fmt: skip
        return {
            "cluster": self.topo.name,
            "state_dir": "/tmp/fake",
            "started": True,
            "processes": rows,
            "etcd": {"leader": "shanghai-a", "raft_term": 3, "members_answering": sorted(etcd)},
            "cassandra_ring": None,
        }

    def describe_nodes(self, timeout_s: float = 1.5) -> dict[str, dict[str, Any] | None]:
        return {z: None if z in self.down else self.nodes[z] for z in ZONES}

    def metrics_urls(self) -> dict[str, str]:
        return {z: self.metrics.url(z) for z in ZONES}

    def ring_view(self) -> tuple[list[dict[str, str]] | None, str | None]:
        self.ring_calls += 1
        ring = [
            {"dc": c.name, "status": "U", "state": "N", "address": c.zones[0].address,
             "rack": c.zones[0].name}
            for c in self.topo.cities
        ]  # fmt: skip
        return ring, "beijing-a"


# -- Prometheus text and rates -----------------------------------------------------------


def test_parse_metrics_reads_labels_values_and_skips_the_rest() -> None:
    text = (
        "# HELP x the help\n# TYPE x counter\n"
        'x{a="1",b="with \\"quotes\\", commas and \\\\ slash"} 3.5\n'
        "y 7 1700000000000\n"
        'z{le="+Inf"} +Inf\n'
        "not a sample line\n"
        "w{} NaN\n"
    )
    samples = observe.parse_metrics(text)
    assert samples[0] == ("x", {"a": "1", "b": 'with "quotes", commas and \\ slash'}, 3.5)
    assert samples[1] == ("y", {}, 7.0)
    assert samples[2][2] == float("inf")
    assert [s[0] for s in samples] == ["x", "y", "z", "w"]


def test_counters_count_payment_service_errors_only() -> None:
    text = metrics_text({"APPROVED": 8, "DECLINED": 2}, ok=9, errors={"14": 2, "9": 1})
    c = observe.counters_from_text(text, at=5.0)
    assert c.decided == 10
    assert dict(c.decided_by_state) == {"APPROVED": 8, "DECLINED": 2}
    assert c.requests == 12  # 9 OK + 3 errors; the ShardService calls do not count
    assert c.errors == 3


def test_counters_from_the_switch_s_own_exposition() -> None:
    """The names and labels the console reads are the ones the telemetry package writes."""
    reader = PrometheusReader()
    meter = MeterProvider(metric_readers=[reader]).get_meter("test")
    dm = DomainMetrics(meter)
    for _ in range(3):
        dm.payment_decided("APPROVED", "DEBIT", "beijing-a")
    dm.payment_decided("FAILED", "CREDIT", "beijing-a")
    rpc = RpcInstruments(meter, "server")
    attrs = {"rpc.system": "grpc", "rpc.service": PAY, "rpc.method": "SubmitPayment"}
    rpc.requests.add(5, {**attrs, "rpc.grpc.status_code": 0})
    rpc.requests.add(2, {**attrs, "rpc.grpc.status_code": 14})
    rpc.requests.add(
        4, {**attrs, "rpc.service": "clearing.v1.ShardService", "rpc.grpc.status_code": 4}
    )
    c = observe.counters_from_text(reader.scrape(), at=0.0)
    assert (c.decided, c.requests, c.errors) == (4, 7, 2)
    assert dict(c.decided_by_state) == {"APPROVED": 3, "FAILED": 1}


def test_rates_between_two_scrapes_and_across_a_restart() -> None:
    a = observe.counters_from_text(metrics_text({"APPROVED": 10}, 10, {"14": 0}), at=100.0)
    b = observe.counters_from_text(metrics_text({"APPROVED": 30}, 26, {"14": 4}), at=102.0)
    r = observe.rates(a, b)
    assert r is not None
    assert r["payments_per_s"] == 10.0
    assert r["requests_per_s"] == 10.0  # (26 + 4) - 10 over 2 s
    assert r["errors_per_s"] == 2.0
    assert r["error_ratio"] == 0.2
    assert r["decided_per_s_by_state"] == {"APPROVED": 10.0}
    # The node restarted: its counters began again at 0, so the new values are the increase.
    c = observe.counters_from_text(metrics_text({"APPROVED": 4}, 2, {}), at=104.0)
    r2 = observe.rates(b, c)
    assert r2 is not None and r2["payments_per_s"] == 2.0 and r2["errors_per_s"] == 0.0
    assert observe.rates(c, c) is None  # no time passed
    idle = observe.rates(c, replace(c, at=105.0))
    assert idle is not None and idle["error_ratio"] is None  # no requests, no ratio


def test_rate_tracker_starts_over_for_a_zone_that_stopped_answering() -> None:
    t = observe.RateTracker()
    first = observe.counters_from_text(metrics_text({"APPROVED": 1}, 1, {}), at=1.0)
    assert t.update({"a": first, "b": None}) == {"a": None, "b": None}
    second = replace(first, at=2.0, decided=3.0)
    got = t.update({"a": second})
    assert got["a"] is not None and got["a"]["payments_per_s"] == 2.0
    assert t.update({"a": None}) == {"a": None}
    assert t.update({"a": replace(second, at=3.0)}) == {"a": None}  # a new baseline


# -- scraping, bounded --------------------------------------------------------------------


def test_scrape_all_reads_each_zone_and_bounds_dead_and_hanging_ones(
    metrics: MetricsStub,
) -> None:
    metrics.texts["beijing-a"] = metrics_text({"APPROVED": 5}, 5, {})
    metrics.hang.add("beijing-b")
    metrics.texts["beijing-b"] = metrics_text({}, 0, {})
    urls = {
        "beijing-a": metrics.url("beijing-a"),
        "beijing-b": metrics.url("beijing-b"),  # answers only after the deadline
        "shanghai-a": f"http://127.0.0.1:{closed_port()}/metrics",  # nothing listens
        "shanghai-b": metrics.url("nowhere"),  # 404
    }
    t0 = time.monotonic()
    got = observe.scrape_all(urls, timeout_s=0.5)
    assert time.monotonic() - t0 < 2.0
    assert got["beijing-a"] is not None and got["beijing-a"].decided == 5
    assert got["beijing-b"] is None and got["shanghai-a"] is None and got["shanghai-b"] is None
    with pytest.raises(ValueError, match="plain http"):
        observe.scrape("file:///etc/passwd")


def test_live_rates_scrape_twice(metrics: MetricsStub) -> None:
    metrics.texts["beijing-a"] = metrics_text({"APPROVED": 0}, 0, {})

    def advance(seconds: float) -> None:
        time.sleep(seconds)
        metrics.texts["beijing-a"] = metrics_text({"APPROVED": 3}, 2, {"14": 1})

    got = observe.live_rates({"beijing-a": metrics.url("beijing-a")}, 0.2, 0.5, sleep=advance)
    r = got["beijing-a"]
    assert r is not None
    assert r["payments_per_s"] > 0 and r["errors_per_s"] > 0
    assert r["error_ratio"] == pytest.approx(1 / 3, abs=1e-3)


# -- ownership and the zone grid ---------------------------------------------------------


def test_ownership_map_from_each_node_s_account() -> None:
    nodes: dict[str, dict[str, Any] | None] = {
        "beijing-a": describe("beijing-a", [0, 1, 2]),
        "beijing-b": describe("beijing-b", [2, 3], epoch=500),  # 2: a handover, newer epoch
        "shanghai-a": None,  # not answering
    }
    own = observe.ownership(nodes, shard_count=6)
    assert own["owners"] == ["beijing-a", "beijing-a", "beijing-b", "beijing-b", None, None]
    assert own["served"] == 4 and own["unserved"] == [4, 5]
    assert own["shards_per_node"] == {"beijing-a": 3, "beijing-b": 2}
    assert own["contested"] == {"2": ["beijing-a", "beijing-b"]}
    assert own["epochs"][2] == 502
    assert observe.shard_ranges([7, 0, 1, 2, 3, 9, 10, 12]) == "0-3,7,9-10,12"
    assert observe.shard_ranges([]) == ""


def test_zone_grid_up_degraded_down(metrics: MetricsStub) -> None:
    fake = FakeCluster(metrics)
    fake.down.add("shanghai-b")
    st = fake.status()
    for r in st["processes"]:
        if r["zone"] == "shenzhen-a" and r["kind"] == "cassandra":
            r["listening"] = False  # running, not answering yet
    st["etcd"]["members_answering"] = ["beijing-a", "shanghai-a"]  # shenzhen-a's etcd is mute
    grid = observe.zone_grid(TOPO, st, fake.describe_nodes(), {"beijing-a": None})
    assert [c["name"] for c in grid] == ["beijing", "shanghai", "shenzhen"]
    zones = {z["name"]: z for c in grid for z in c["zones"]}
    assert zones["beijing-a"]["state"] == "up"
    assert set(zones["beijing-a"]["processes"]) == {"switch", "etcd", "cassandra"}
    assert set(zones["beijing-b"]["processes"]) == {"switch"}
    assert zones["shanghai-a"]["processes"]["etcd"]["etcd_leader"] is True
    assert zones["shanghai-b"]["state"] == "down"
    assert zones["shanghai-b"]["processes"]["switch"]["health"] == "down"
    assert zones["shanghai-b"]["shards"] == 0
    assert zones["shenzhen-a"]["state"] == "degraded"
    assert zones["shenzhen-a"]["processes"]["cassandra"]["health"] == "starting"
    assert zones["shenzhen-a"]["processes"]["etcd"]["health"] == "starting"
    assert zones["shenzhen-b"]["state"] == "up"
    assert observe.process_health({"state": "paused"}, answering=False) == "paused"


def test_live_status_gathers_ownership_and_rates(metrics: MetricsStub) -> None:
    fake = FakeCluster(metrics)
    for z in ZONES:
        metrics.texts[z] = metrics_text({"APPROVED": 1}, 1, {})
    fake.down.add("beijing-b")
    live = observe.live_status(fake, interval_s=0.1)
    assert live["switch_nodes"]["beijing-b"] is None
    assert live["ownership"]["served"] == 128 - len(fake.nodes["beijing-b"]["shards"])
    assert set(live["throughput"]) == set(ZONES)
    assert live["throughput"]["beijing-a"]["payments_per_s"] == 0.0
    assert live["checkout_code_version"] == code_version() and live["other_code"] == []
    json.dumps(live)  # what `cluster status --json` prints


def test_status_names_the_nodes_that_run_other_code(
    metrics: MetricsStub, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = FakeCluster(metrics)
    for z in ZONES:
        metrics.texts[z] = metrics_text({"APPROVED": 1}, 1, {})
    fake.nodes["shanghai-b"]["code_version"] = "0.1.0+000000000000"  # started before an edit
    fake.down.add("beijing-b")  # not answering: nothing known of its code
    live = observe.live_status(fake, interval_s=0.1)
    assert live["other_code"] == ["shanghai-b"]
    cli.print_live(live)
    out = capsys.readouterr().out
    assert "0.1.0+000000000000" in out and code_version() in out
    hint = next(line for line in out.splitlines() if "not the code of this checkout" in line)
    assert "shanghai-b" in hint and "beijing" not in hint
    assert "cluster start switch@<zone>" in hint


# -- LocalCluster.describe_nodes against stub gRPC nodes ------------------------------


class StubShards(shard_pb2_grpc.ShardServiceServicer):  # type: ignore[misc]
    def __init__(self, node_id: str, shards: list[int], hang: threading.Event | None = None):
        self.node_id, self.shards, self.hang = node_id, shards, hang

    def Describe(self, request: Any, context: Any) -> Any:
        if self.hang is not None:
            self.hang.wait(10)
        return shard_pb2.DescribeResponse(
            node_id=self.node_id,
            shards=[shard_pb2.OwnedShard(shard=s, epoch=1000 + s) for s in self.shards],
            commits=5, entries=20, routed_local=3, routed_forwarded=2,
            code_version="0.1.0+0123456789ab",
        )  # fmt: skip


def test_describe_nodes_asks_every_node_at_once_and_bounds_dead_ones(
    tmp_path: Path, test_ca: pki.LocalCA, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLEARING_PKI_DIR", str(test_ca.directory))
    test_ca.ensure(pki.operator())
    hang = threading.Event()
    servers, ports = [], {}
    for zone, servicer in (
        ("beijing-a", StubShards("beijing-a", [0, 1, 2])),
        ("beijing-b", StubShards("beijing-b", [3])),
        ("shanghai-a", StubShards("shanghai-a", [4], hang=hang)),  # answers too late
    ):
        srv = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        shard_pb2_grpc.add_ShardServiceServicer_to_server(servicer, srv)
        # Each zone's node with its own certificate: the operator accepts only node:<zone>.
        test_ca.ensure(pki.node(zone), ips=["127.0.0.1"])
        server_keys = test_ca.load(pki.node(zone))
        ports[zone] = srv.add_secure_port("127.0.0.1:0", pki.server_credentials(server_keys))
        srv.start()
        servers.append(srv)
    dead = closed_port()
    cities = tuple(
        replace(c, zones=tuple(
            replace(z, address="127.0.0.1",
                    ports=replace(z.ports, switch=ports.get(z.name, dead)))
            for z in c.zones
        ))
        for c in TOPO.cities
    )  # fmt: skip
    lc = LocalCluster(
        replace(TOPO, cities=cities), Paths.default(tmp_path), progress=lambda _: None
    )
    try:
        t0 = time.monotonic()
        got = lc.describe_nodes(timeout_s=0.8)
        took = time.monotonic() - t0
    finally:
        hang.set()
        for srv in servers:
            srv.stop(0)
    assert took < 2.5, f"describe_nodes took {took:.1f}s"
    assert got["beijing-a"] == {
        "node_id": "beijing-a",
        "shards": [{"shard": s, "epoch": 1000 + s} for s in (0, 1, 2)],
        "commits": 5, "entries": 20, "routed_local": 3, "routed_forwarded": 2,
        "code_version": "0.1.0+0123456789ab",
    }  # fmt: skip
    assert got["beijing-b"] is not None and got["beijing-b"]["shards"][0]["shard"] == 3
    assert got["shanghai-a"] is None  # deadline passed
    assert [z for z in ZONES if got[z] is None] == ZONES[2:]  # nothing listens there
    assert (
        lc.metrics_urls()["beijing-a"]
        == f"http://127.0.0.1:{TOPO.zones[0].ports.admin_http}/metrics"
    )
    assert lc.ring_view() == (None, None)  # no Cassandra node runs in this state dir


# -- the console: sampler and HTTP endpoints -----------------------------------------------


def get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read()


@pytest.fixture()
def served(metrics: MetricsStub) -> Iterator[tuple[FakeCluster, Console, ConsoleServer]]:
    fake = FakeCluster(metrics)
    for i, z in enumerate(ZONES):
        metrics.texts[z] = metrics_text({"APPROVED": 10 * i}, 10 * i, {"14": 0})
    # The stubs answer at once; a timeout that a loaded CI machine can miss would make a
    # zone look down in the first sample (the bound itself is test_sampling_is_bounded...).
    console = Console(fake, interval_s=0.2, history_s=60, ring_every_s=30, scrape_timeout_s=5.0)
    server = ConsoleServer(console, "127.0.0.1", 0)
    console.start()
    yield fake, console, server
    server.close()
    console.close()


def test_page_is_one_self_contained_html_document(served: Any) -> None:
    _, _, server = served
    code, ctype, body = get(server.url)
    assert code == 200 and ctype.startswith("text/html")
    html = body.decode()
    assert body == page()
    assert "<svg" in html and "<script>" in html and "<style>" in html
    for outside in ("<script src", "<link", "@import", "https://", "url("):
        assert outside not in html, f"the page loads something from outside: {outside}"
    assert get(server.url + "index.html")[0] == 200
    code, _, body = get(server.url + "healthz")
    assert (code, body) == (200, b"ok\n")
    assert get(server.url + "nope")[0] == 404
    host, port = server.address
    assert host == "127.0.0.1" and port > 0


def test_api_state_has_cities_zones_ownership_rates_and_history(
    served: Any, metrics: MetricsStub
) -> None:
    fake, _, server = served
    code, ctype, body = get(server.url + "api/state")
    assert code == 200 and ctype == "application/json"
    st = json.loads(body)
    assert st["cluster"] == TOPO.name
    assert [c["name"] for c in st["cities"]] == ["beijing", "shanghai", "shenzhen"]
    assert [z["name"] for c in st["cities"] for z in c["zones"]] == ZONES == st["zone_order"]
    assert st["summary"]["zones_up"] == 6 and st["summary"]["zones_down"] == []
    assert st["summary"]["shards_served"] == 128
    assert len(st["ownership"]["owners"]) == 128 and st["ownership"]["owners"][1] == ZONES[1]
    assert st["etcd"]["leader"] == "shanghai-a"
    assert st["nodes"]["beijing-a"]["routed_forwarded"] == 3
    assert st["health"] == {"verdict": "healthy", "exit_code": 0, "problems": [],
                            "survives_city_loss": True, "not_checked": []}  # fmt: skip

    # Payments flow at beijing-a; shanghai-b's node dies.
    metrics.texts["beijing-a"] = metrics_text({"APPROVED": 1000}, 900, {"14": 100})
    fake.down.add("shanghai-b")
    metrics.texts.pop("shanghai-b")

    def sampled() -> dict[str, Any]:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            st = json.loads(get(server.url + "api/state")[2])
            zones = {z["name"]: z for c in st["cities"] for z in c["zones"]}
            rates = zones["beijing-a"]["rates"]
            if zones["shanghai-b"]["state"] == "down" and rates and rates["payments_per_s"] > 0:
                return st
            time.sleep(0.1)
        raise AssertionError("the console never showed the change")

    st = sampled()
    zones = {z["name"]: z for c in st["cities"] for z in c["zones"]}
    # The ring is read on its own loop, at start and then every ring_every_s.
    assert fake.ring_calls == 1 and st["cassandra_ring_via"] == "beijing-a"
    assert [r["dc"] for r in st["cassandra_ring"]] == ["beijing", "shanghai", "shenzhen"]
    assert zones["shanghai-b"]["processes"]["switch"]["health"] == "down"
    assert st["summary"]["zones_up"] == 5 and st["summary"]["zones_down"] == ["shanghai-b"]
    assert st["summary"]["shards_served"] == 128 - len(fake.nodes["shanghai-b"]["shards"])
    assert zones["beijing-a"]["rates"]["error_ratio"] == pytest.approx(0.1, abs=1e-3)
    assert zones["shanghai-b"]["rates"] is None
    assert st["health"]["verdict"] == "outage"  # its shards have no owner yet
    assert "shards have no owner" in st["health"]["problems"][0]
    assert "switch@shanghai-b down (log: x)" in st["health"]["problems"]
    hist = st["history"]
    assert len(hist["t"]) >= 2 and hist["t"] == sorted(hist["t"])
    assert set(hist["series"]) == set(ZONES)
    assert max(v or 0 for v in hist["series"]["beijing-a"]["payments_per_s"]) > 0
    assert hist["series"]["shanghai-b"]["payments_per_s"][-1] is None


def test_sampling_is_bounded_when_a_node_hangs(metrics: MetricsStub) -> None:
    fake = FakeCluster(metrics)
    for z in ZONES:
        metrics.texts[z] = metrics_text({}, 0, {})
    metrics.hang.add("shenzhen-b")
    console = Console(fake, interval_s=1.0, ring_every_s=None, scrape_timeout_s=0.5)
    try:
        st = console.sample()
        assert st["gather_ms"] < 2000
        assert console.state() is st
    finally:
        console.close()


def test_history_keeps_the_last_minutes_only(metrics: MetricsStub) -> None:
    fake = FakeCluster(metrics)
    for z in ZONES:
        metrics.texts[z] = metrics_text({}, 0, {})
    clock = iter(float(i) for i in range(1000))
    console = Console(
        fake, interval_s=2.0, history_s=10, ring_every_s=None, clock=lambda: next(clock)
    )
    try:
        for _ in range(12):
            st = console.sample()
    finally:
        console.close()
    assert len(st["history"]["t"]) == 6  # 10 s of 2 s samples, and the newest
    assert st["history"]["t"][-1] == 11.0
    with pytest.raises(ValueError, match="interval_s"):
        Console(fake, interval_s=0)


def test_api_state_before_the_first_sample_is_503(metrics: MetricsStub) -> None:
    console = Console(FakeCluster(metrics), ring_every_s=None)
    server = ConsoleServer(console, "127.0.0.1", 0)
    try:
        code, _, body = get(server.url + "api/state")
        assert code == 503 and b"no sample yet" in body
    finally:
        server.close()
        console.close()


def test_run_serves_until_stopped(metrics: MetricsStub) -> None:
    for z in ZONES:
        metrics.texts[z] = metrics_text({}, 0, {})
    said: list[str] = []
    stop = threading.Event()
    t = threading.Thread(
        target=run,
        args=(FakeCluster(metrics),),
        kwargs={"port": 0, "ring_every_s": None, "progress": said.append, "stop": stop},
        daemon=True,
    )
    t.start()
    deadline = time.monotonic() + 10
    while not said and time.monotonic() < deadline:
        time.sleep(0.05)
    url = said[0].split(" on ", 1)[1].split(" ", 1)[0]
    assert url.startswith("http://127.0.0.1:")
    code, _, body = get(url + "api/state")
    assert code == 200 and json.loads(body)["summary"]["zones_up"] == 6
    stop.set()
    t.join(timeout=10)
    assert not t.is_alive() and said[-1] == "operator console stopped"
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=2)


# -- the command line ----------------------------------------------------------------------


def test_cli_parses_console_and_prints_live_status(
    metrics: MetricsStub, capsys: pytest.CaptureFixture[str]
) -> None:
    args = cli.build_parser().parse_args(["console", "--port", "0", "--no-ring"])
    assert (args.group, args.port, args.host, args.no_ring) == ("console", 0, "127.0.0.1", True)
    assert cli.build_parser().parse_args(["cluster", "status", "--no-live"]).no_live
    fake = FakeCluster(metrics)
    for z in ZONES:
        metrics.texts[z] = metrics_text({"APPROVED": 1}, 1, {})
    fake.down.add("shenzhen-b")
    st = {**fake.status(), **observe.live_status(fake, interval_s=0.1)}
    cli.print_live(st)
    out = capsys.readouterr().out
    assert "shards served" in out and "waiting for an owner" in out
    assert "shenzhen-b" in out and "not answering" in out
    assert "0,6,12," in out  # beijing-a's shard numbers
    assert "PAYMENTS/S" in out and "ERROR RATE" in out


# -- the verdict `cluster status` exits with ---------------------------------------------


def _whole(fake: FakeCluster, metrics: MetricsStub) -> dict[str, Any]:
    for z in ZONES:
        metrics.texts[z] = metrics_text({"APPROVED": 1}, 1, {})
    return {**fake.status(), **observe.live_status(fake, interval_s=0.05)}


def test_health_is_healthy_only_with_everything_up_and_every_shard_served(
    metrics: MetricsStub,
) -> None:
    fake = FakeCluster(metrics)
    h = observe.health(_whole(fake, metrics))
    assert (h.verdict, h.exit_code, h.problems, h.survives_city_loss) == ("healthy", 0, (), True)
    # A switch node down whose shards moved elsewhere: payments go on, degraded.
    fake.down.add("shanghai-b")
    moved = fake.nodes["shanghai-b"]["shards"]
    fake.nodes["shanghai-a"]["shards"] = fake.nodes["shanghai-a"]["shards"] + moved
    h = observe.health(_whole(fake, metrics))
    assert (h.verdict, h.exit_code) == ("degraded", 1)
    assert h.problems == ("switch@shanghai-b down (log: x)",)
    assert h.survives_city_loss
    assert h.not_checked == ()


def test_a_verdict_without_the_live_part_says_what_it_did_not_check(
    metrics: MetricsStub,
) -> None:
    """`cluster status --no-live` said HEALTHY during an outage of every shard: it asks
    no node. The verdict stands on what it saw, and says what it could not see."""
    fake = FakeCluster(metrics)
    fake.down.add("beijing-b")  # its shards not taken over: an outage, seen live
    assert observe.health(_whole(fake, metrics)).verdict == "outage"
    h = observe.health(fake.status())  # the processes only
    assert h.verdict != "outage"
    assert len(h.not_checked) == 1 and "--no-live" in h.not_checked[0]
    assert h.as_dict()["not_checked"] == list(h.not_checked)


def test_health_is_outage_when_shards_have_no_owner_or_quorums_are_lost(
    metrics: MetricsStub,
) -> None:
    fake = FakeCluster(metrics)
    fake.down.add("beijing-b")  # its shards not taken over yet
    h = observe.health(_whole(fake, metrics))
    assert (h.verdict, h.exit_code) == ("outage", 2)
    assert "shards have no owner" in h.problems[0] and "UNAVAILABLE" in h.problems[0]
    assert h.survives_city_loss  # etcd and Cassandra have every member: it is about them
    # A whole city stopped, shards taken over: degraded, and one more city would be fatal.
    st = _whole(FakeCluster(metrics), metrics)
    for r in st["processes"]:
        if r["city"] == "shenzhen":
            r["state"], r["listening"] = "down", False
    h = observe.health(st)
    assert h.verdict == "degraded" and not h.survives_city_loss
    assert {p.split(" ")[0] for p in h.problems} == {
        "etcd@shenzhen-a", "cassandra@shenzhen-a", "switch@shenzhen-a", "switch@shenzhen-b"
    }  # fmt: skip
    # Two Cassandra nodes of three gone: no QUORUM, down, whatever the switches say.
    for r in st["processes"]:
        if r["kind"] == "cassandra" and r["city"] == "shanghai":
            r["state"] = "paused"
    h = observe.health(st)
    assert h.verdict == "outage" and "QUORUM needs 2" in h.problems[0]
    st["etcd"]["leader"] = None
    assert "etcd has no leader" in observe.health(st).problems[0]
    assert observe.health({"started": False}).exit_code == 2


def test_cluster_status_exits_with_the_verdict(
    metrics: MetricsStub, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = FakeCluster(metrics)
    for z in ZONES:
        metrics.texts[z] = metrics_text({"APPROVED": 1}, 1, {})
    fake.down.add("shenzhen-b")
    quick = observe.live_status
    monkeypatch.setattr(observe, "live_status", lambda lc: quick(lc, interval_s=0.05))
    args = cli.build_parser().parse_args(["cluster", "status", "--no-ring"])
    assert cli._cluster(fake, args) == 2  # shenzhen-b's shards have no owner
    out = capsys.readouterr().out
    assert "health: OUTAGE (exit 2)" in out and "shards have no owner" in out
    fake.nodes["shenzhen-a"]["shards"] += fake.nodes["shenzhen-b"]["shards"]
    args = cli.build_parser().parse_args(["cluster", "status", "--json"])
    assert cli._cluster(fake, args) == 1
    got = json.loads(capsys.readouterr().out)["health"]
    assert (got["verdict"], got["exit_code"]) == ("degraded", 1)
    assert got["problems"] == ["switch@shenzhen-b down (log: x)"]
