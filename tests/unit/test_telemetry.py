"""clearinghouse.telemetry: spans across a real gRPC hop on 127.0.0.1, status codes,
histograms, the Prometheus endpoint, JSON logs, the span file, OTLP export, and the
no-op metrics before set-up."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.sdk.metrics.export import (
    HistogramDataPoint,
    InMemoryMetricReader,
    NumberDataPoint,
)
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from clearinghouse import telemetry
from clearinghouse.domain.model import PaymentState, PaymentType
from clearinghouse.telemetry import Telemetry, TelemetryConfig
from clearinghouse.telemetry.tracefile import JsonLinesSpanExporter

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]

SERVICE = "test.Echo"
CFG = TelemetryConfig(
    service_name="clearing-switch-test",
    node_id="node-7",
    zone="beijing-a",
    city="beijing",
)
WITH_PROMETHEUS = dataclasses.replace(CFG, prometheus_host="127.0.0.1", prometheus_port=0)


@pytest.fixture(autouse=True)
def _no_telemetry_left() -> Iterator[None]:
    active = telemetry.current()
    if active is not None:  # a failed test's telemetry must not leak into the next
        active.shutdown()
    yield
    active = telemetry.current()
    if active is not None:
        active.shutdown()


class Setup:
    def __init__(self, cfg: TelemetryConfig = CFG) -> None:
        self.spans = InMemorySpanExporter()
        self.reader = InMemoryMetricReader()
        self.tel = Telemetry.setup(
            cfg, span_exporters=[self.spans], metric_readers=[self.reader], install_global=False
        )

    def finished(self) -> list[ReadableSpan]:
        return list(self.spans.get_finished_spans())

    def points(self, name: str) -> list[Any]:
        data = self.reader.get_metrics_data()
        assert data is not None
        out: list[Any] = []
        for rm in data.resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    if m.name == name:
                        out.extend(m.data.data_points)
        return out


@pytest.fixture()
def tele() -> Iterator[Setup]:
    s = Setup()
    try:
        yield s
    finally:
        s.tel.shutdown()


# -- a tiny bytes-in, bytes-out gRPC service ---------------------------------------------


class EchoServer:
    def __init__(self, tel: Telemetry) -> None:
        handlers = {
            "Echo": grpc.unary_unary_rpc_method_handler(self._echo),
            "Fail": grpc.unary_unary_rpc_method_handler(self._fail),
            "Boom": grpc.unary_unary_rpc_method_handler(self._boom),
            "Count": grpc.unary_stream_rpc_method_handler(self._count),
        }
        self.server = grpc.server(
            ThreadPoolExecutor(4, thread_name_prefix="test-grpc"),
            handlers=[
                grpc.method_handlers_generic_handler(SERVICE, handlers),
                grpc.method_handlers_generic_handler(
                    "grpc.health.v1.Health",
                    {"Check": grpc.unary_unary_rpc_method_handler(lambda r, c: b"")},
                ),
            ],
            interceptors=[tel.server_interceptor()],
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        assert self.port > 0
        self.server.start()
        self.channel = tel.intercept_channel(grpc.insecure_channel(f"127.0.0.1:{self.port}"))

    def call(self, method: str, request: bytes = b"hi") -> bytes:
        fn = self.channel.unary_unary(method)
        return fn(request, timeout=5)  # type: ignore[no-any-return]

    def _echo(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        with telemetry.span("ledger.commit", shard=3):
            logging.getLogger("clearinghouse.test.echo").info("echo handled")
        return request

    def _fail(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "amount: must be positive")

    def _boom(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        raise ValueError("a bug")

    def _count(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        for i in range(3):
            yield bytes([i])

    def close(self) -> None:
        self.channel.close()
        self.server.stop(None)


@contextmanager
def echo_server(tel: Telemetry) -> Iterator[EchoServer]:
    srv = EchoServer(tel)
    try:
        yield srv
    finally:
        srv.close()


def wait_for(pred: Callable[[], bool], timeout_s: float = 2.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.005)


def only(spans: list[ReadableSpan], name: str, kind: SpanKind) -> ReadableSpan:
    found = [s for s in spans if s.name == name and s.kind == kind]
    assert len(found) == 1, [(s.name, s.kind) for s in spans]
    return found[0]


def by_attrs(points: list[Any], **attrs: Any) -> Any:
    want = {k.replace("__", "."): v for k, v in attrs.items()}
    found = [p for p in points if all(p.attributes.get(k) == v for k, v in want.items())]
    assert len(found) == 1, [dict(p.attributes) for p in points]
    return found[0]


# -- traces across the hop -----------------------------------------------------------------


def test_server_span_is_child_of_client_span_across_grpc(tele: Setup) -> None:
    with echo_server(tele.tel) as srv:
        with telemetry.span("test.caller", purpose="unit") as caller:
            assert srv.call(f"/{SERVICE}/Echo", b"hello") == b"hello"
        spans = tele.finished()
        client = only(spans, f"{SERVICE}/Echo", SpanKind.CLIENT)
        server = only(spans, f"{SERVICE}/Echo", SpanKind.SERVER)
        inner = only(spans, "ledger.commit", SpanKind.INTERNAL)

    assert client.context is not None and server.context is not None
    assert server.context.trace_id == client.context.trace_id
    assert server.parent is not None and server.parent.is_remote
    assert server.parent.span_id == client.context.span_id
    assert client.parent is not None
    assert client.parent.span_id == caller.get_span_context().span_id
    assert client.context.trace_id == caller.get_span_context().trace_id
    # the handler ran inside the server span: internal spans hang below it
    assert inner.parent is not None and inner.parent.span_id == server.context.span_id
    assert inner.attributes is not None and inner.attributes["shard"] == 3
    for s in (client, server):
        assert s.attributes is not None
        assert s.attributes["rpc.grpc.status_code"] == 0
        assert s.attributes["rpc.service"] == SERVICE
        assert s.attributes["rpc.method"] == "Echo"
        assert s.status.status_code is StatusCode.UNSET
    assert server.resource.attributes["clearing.zone"] == "beijing-a"
    assert server.resource.attributes["clearing.city"] == "beijing"
    assert server.resource.attributes["clearing.node_id"] == "node-7"
    assert server.resource.attributes["service.name"] == "clearing-switch-test"


def test_call_without_caller_span_starts_a_trace_at_the_client(tele: Setup) -> None:
    with echo_server(tele.tel) as srv:
        srv.call(f"/{SERVICE}/Echo")
        client = only(tele.finished(), f"{SERVICE}/Echo", SpanKind.CLIENT)
        server = only(tele.finished(), f"{SERVICE}/Echo", SpanKind.SERVER)
    assert client.parent is None
    assert server.parent is not None and server.parent.span_id == client.context.span_id  # type: ignore[union-attr]


def test_aborted_and_failed_calls_record_their_status(tele: Setup) -> None:
    with echo_server(tele.tel) as srv:
        with pytest.raises(grpc.RpcError) as aborted:
            srv.call(f"/{SERVICE}/Fail")
        with pytest.raises(grpc.RpcError) as boom:
            srv.call(f"/{SERVICE}/Boom")
        spans = tele.finished()

    # the interceptor re-raised the abort untouched: the client sees the servicer's answer
    assert aborted.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert aborted.value.details() == "amount: must be positive"
    assert boom.value.code() is grpc.StatusCode.UNKNOWN

    fail_server = only(spans, f"{SERVICE}/Fail", SpanKind.SERVER)
    fail_client = only(spans, f"{SERVICE}/Fail", SpanKind.CLIENT)
    assert fail_server.attributes is not None and fail_client.attributes is not None
    assert fail_server.attributes["rpc.grpc.status_code"] == 3
    assert fail_client.attributes["rpc.grpc.status_code"] == 3
    # a refused request is the client's error, not the server's
    assert fail_server.status.status_code is StatusCode.UNSET
    assert fail_client.status.status_code is StatusCode.ERROR
    assert "INVALID_ARGUMENT" in (fail_client.status.description or "")

    boom_server = only(spans, f"{SERVICE}/Boom", SpanKind.SERVER)
    assert boom_server.attributes is not None
    assert boom_server.attributes["rpc.grpc.status_code"] == 2
    assert boom_server.status.status_code is StatusCode.ERROR


def test_future_calls_end_their_client_span_when_done(tele: Setup) -> None:
    with echo_server(tele.tel) as srv:
        fail = srv.channel.unary_unary(f"/{SERVICE}/Fail")
        with telemetry.span("test.caller") as caller:
            future = fail.future(b"x", timeout=5)
        with pytest.raises(grpc.RpcError) as err:
            future.result()
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        name = f"{SERVICE}/Fail"
        wait_for(lambda: any(s.kind == SpanKind.CLIENT and s.name == name for s in tele.finished()))
        client = only(tele.finished(), name, SpanKind.CLIENT)
        server = only(tele.finished(), name, SpanKind.SERVER)
    assert client.parent is not None
    assert client.parent.span_id == caller.get_span_context().span_id
    assert server.parent is not None and server.parent.span_id == client.context.span_id  # type: ignore[union-attr]
    assert client.attributes is not None and client.attributes["rpc.grpc.status_code"] == 3
    assert client.status.status_code is StatusCode.ERROR


def test_duration_histogram_and_request_counts_by_method_and_code(tele: Setup) -> None:
    with echo_server(tele.tel) as srv:
        for _ in range(3):
            srv.call(f"/{SERVICE}/Echo")
        with pytest.raises(grpc.RpcError):
            srv.call(f"/{SERVICE}/Fail")

    durations = tele.points("rpc.server.duration")
    ok: HistogramDataPoint = by_attrs(durations, rpc__method="Echo", rpc__grpc__status_code=0)
    bad: HistogramDataPoint = by_attrs(durations, rpc__method="Fail", rpc__grpc__status_code=3)
    assert ok.count == 3 and sum(ok.bucket_counts) == 3
    assert bad.count == 1
    assert ok.sum > 0 and ok.min >= 0 and ok.max < 5000  # milliseconds
    assert ok.attributes["rpc.service"] == SERVICE

    requests = tele.points("rpc.server.requests")
    ok_count: NumberDataPoint = by_attrs(requests, rpc__method="Echo", rpc__grpc__status_code=0)
    assert ok_count.value == 3
    assert by_attrs(requests, rpc__method="Fail").value == 1
    active = tele.points("rpc.server.active_requests")
    assert {p.attributes["rpc.method"]: p.value for p in active} == {"Echo": 0, "Fail": 0}

    client = tele.points("rpc.client.duration")
    assert by_attrs(client, rpc__method="Echo", rpc__grpc__status_code=0).count == 3
    assert by_attrs(client, rpc__method="Fail", rpc__grpc__status_code=3).count == 1


def test_streaming_calls_and_untraced_health_checks(tele: Setup) -> None:
    with echo_server(tele.tel) as srv:
        stream = srv.channel.unary_stream(f"/{SERVICE}/Count")
        assert list(stream(b"", timeout=5)) == [b"\x00", b"\x01", b"\x02"]
        srv.call("/grpc.health.v1.Health/Check")
        name = f"{SERVICE}/Count"
        wait_for(lambda: any(s.kind == SpanKind.CLIENT and s.name == name for s in tele.finished()))
        spans = tele.finished()

    server = only(spans, name, SpanKind.SERVER)
    client = only(spans, name, SpanKind.CLIENT)
    assert server.parent is not None and server.parent.span_id == client.context.span_id  # type: ignore[union-attr]
    assert server.attributes is not None and server.attributes["rpc.grpc.status_code"] == 0
    # health checks: measured on the server, but no server span
    assert not [s for s in spans if s.kind == SpanKind.SERVER and "Health" in s.name]
    health = tele.points("rpc.server.requests")
    assert by_attrs(health, rpc__service="grpc.health.v1.Health").value == 1


def test_bind_context_carries_the_trace_into_an_executor(tele: Setup) -> None:
    def work() -> int:
        with telemetry.span("routing.forward") as s:
            return s.get_span_context().trace_id

    with ThreadPoolExecutor(1) as pool, telemetry.span("test.request") as parent:
        bound = pool.submit(telemetry.bind_context(work)).result()
        unbound = pool.submit(work).result()
    assert bound == parent.get_span_context().trace_id
    assert unbound != parent.get_span_context().trace_id


# -- domain metrics ------------------------------------------------------------------------


def test_domain_metrics_are_noops_before_setup_and_record_after() -> None:
    assert telemetry.current() is None
    m = telemetry.metrics
    m.payment_decided(PaymentState.APPROVED, PaymentType.DEBIT, "beijing-a")
    m.batch_size(10)
    m.shards_owned(5)
    m.lease_event("renewal")
    m.retry("cassandra_timeout")
    m.rejection("UNKNOWN_PARTICIPANT")
    m.commit(entries=4, seconds=0.01)
    with telemetry.span("not.recorded", shard=1) as s:
        assert not s.is_recording()

    st = Setup()
    try:
        assert telemetry.current() is st.tel
        m.payment_decided(PaymentState.APPROVED, PaymentType.DEBIT, "beijing-a")
        m.payment_decided(PaymentState.APPROVED, PaymentType.DEBIT, "beijing-a")
        m.payment_decided("DECLINED", "CREDIT", "beijing-b")
        m.batch_size(10)
        m.batch_size(3)
        m.shards_owned(21)
        m.lease_event("renewal")
        m.lease_event("loss")
        m.retry("cassandra_timeout")
        m.rejection("UNKNOWN_PARTICIPANT")
        m.commit(entries=4, seconds=0.01)
        decided = st.points("clearing.payments.decided")
        assert by_attrs(decided, state="APPROVED", type="DEBIT", zone="beijing-a").value == 2
        assert by_attrs(decided, state="DECLINED", type="CREDIT").value == 1
        batch = st.points("clearing.batch.size")
        assert len(batch) == 1 and batch[0].count == 2 and batch[0].sum == 13
        assert [p.value for p in st.points("clearing.shards.owned")] == [21]
        m.shards_owned_from(lambda: 30)
        assert [p.value for p in st.points("clearing.shards.owned")] == [30]
        leases = st.points("clearing.lease.events")
        assert {p.attributes["kind"]: p.value for p in leases} == {"renewal": 1, "loss": 1}
        assert by_attrs(st.points("clearing.retries"), cause="cassandra_timeout").value == 1
        assert by_attrs(st.points("clearing.rejections"), reason="UNKNOWN_PARTICIPANT").value == 1
        commit_s = st.points("clearing.commit.duration")
        assert commit_s[0].count == 1 and commit_s[0].sum == pytest.approx(0.01)
        assert st.points("clearing.commit.entries")[0].sum == 4
        with pytest.raises(RuntimeError, match="already set up"):
            Telemetry.setup(CFG, install_global=False)
    finally:
        st.tel.shutdown()
    assert telemetry.current() is None
    m.payment_decided(PaymentState.APPROVED, PaymentType.DEBIT, "beijing-a")  # no-op again
    with telemetry.span("after.shutdown") as s:
        assert not s.is_recording()
    # set up again in the same process (what tests need): works
    again = Setup()
    try:
        m.retry("x")
        assert by_attrs(again.points("clearing.retries"), cause="x").value == 1
        assert again.points("clearing.shards.owned") == []  # the old value was forgotten
    finally:
        again.tel.shutdown()


# -- Prometheus ----------------------------------------------------------------------------

SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"(,|$)')
COMMENT = re.compile(r"^# (HELP|TYPE) ([a-zA-Z_:][a-zA-Z0-9_:]*) (.*)$")


def parse_exposition(text: str) -> tuple[dict[str, str], list[tuple[str, dict[str, str], float]]]:
    """A strict line-by-line reader of the 0.0.4 text format: types and samples."""
    types: dict[str, str] = {}
    samples: list[tuple[str, dict[str, str], float]] = []
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("#"):
            m = COMMENT.match(line)
            assert m, line
            if m.group(1) == "TYPE":
                assert m.group(3) in ("counter", "gauge", "histogram", "summary", "untyped")
                assert m.group(2) not in types, f"two TYPE lines for {m.group(2)}"
                types[m.group(2)] = m.group(3)
            continue
        m = SAMPLE.match(line)
        assert m, line
        labels: dict[str, str] = {}
        rest = m.group(2) or ""
        while rest:
            lm = LABEL.match(rest)
            assert lm, f"bad labels in {line!r}"
            labels[lm.group(1)] = lm.group(2)
            rest = rest[lm.end() :]
        family = re.sub(r"_(bucket|sum|count)$", "", m.group(1))
        assert m.group(1) in types or family in types, f"sample before its TYPE: {line}"
        samples.append((m.group(1), labels, float(m.group(3))))
    return types, samples


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), ""


@pytest.fixture()
def tele_prom() -> Iterator[Setup]:
    s = Setup(WITH_PROMETHEUS)
    try:
        yield s
    finally:
        s.tel.shutdown()


def test_prometheus_endpoint_serves_text_format(tele_prom: Setup) -> None:
    tele = tele_prom
    assert tele.tel.prometheus_address is not None
    addr = tele.tel.prometheus_address
    assert addr is not None and addr[0] == "127.0.0.1" and addr[1] > 0
    with echo_server(tele.tel) as srv:
        srv.call(f"/{SERVICE}/Echo")
        srv.call(f"/{SERVICE}/Echo")
    telemetry.metrics.payment_decided(PaymentState.APPROVED, PaymentType.DEBIT, "beijing-a")
    telemetry.metrics.shards_owned(17)
    telemetry.metrics.commit(entries=12, seconds=0.004)
    telemetry.metrics.rejection('odd "reason"\\with\nnewline')

    status, ctype, text = get(f"http://127.0.0.1:{addr[1]}/metrics")
    assert status == 200
    assert ctype == "text/plain; version=0.0.4; charset=utf-8"
    types, samples = parse_exposition(text)

    assert types["rpc_server_duration_milliseconds"] == "histogram"
    assert types["rpc_server_requests_total"] == "counter"
    assert types["rpc_server_active_requests"] == "gauge"
    assert types["clearing_payments_decided_total"] == "counter"
    assert types["clearing_shards_owned"] == "gauge"
    assert types["clearing_commit_duration_seconds"] == "histogram"
    assert types["target_info"] == "gauge"

    def value(name: str, **labels: str) -> float:
        found = [v for n, ls, v in samples if n == name and labels.items() <= ls.items()]
        assert len(found) == 1, (name, labels, found)
        return found[0]

    echo = {"rpc_service": SERVICE, "rpc_method": "Echo", "rpc_grpc_status_code": "0"}
    assert value("rpc_server_requests_total", rpc_system="grpc", **echo) == 2
    assert value("rpc_server_duration_milliseconds_count", **echo) == 2
    assert value("rpc_server_duration_milliseconds_bucket", le="+Inf", **echo) == 2
    assert value("rpc_server_duration_milliseconds_sum", **echo) > 0
    buckets = [
        (float(ls["le"]), v)
        for n, ls, v in samples
        if n == "rpc_server_duration_milliseconds_bucket" and ls["rpc_method"] == "Echo"
    ]
    assert [b for b, _ in buckets] == sorted(b for b, _ in buckets)
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)  # cumulative
    assert value("rpc_client_duration_milliseconds_count", **echo) == 2
    decided = {"state": "APPROVED", "type": "DEBIT", "zone": "beijing-a"}
    assert value("clearing_payments_decided_total", **decided) == 1
    assert value("clearing_shards_owned") == 17
    assert value("clearing_commit_duration_seconds_sum") == pytest.approx(0.004)
    assert value("clearing_commit_entries_count") == 1
    assert value("clearing_commit_duration_seconds_bucket", le="0.005") == 1
    assert value("clearing_commit_duration_seconds_bucket", le="0.0025") == 0
    assert value("target_info", clearing_zone="beijing-a", clearing_node_id="node-7") == 1
    assert 'reason="odd \\"reason\\"\\\\with\\nnewline"' in text

    # a second scrape is cumulative, not reset
    _, samples2 = parse_exposition(get(f"http://127.0.0.1:{addr[1]}/metrics")[2])
    samples = samples2
    assert value("rpc_server_requests_total", **echo) == 2
    assert get(f"http://127.0.0.1:{addr[1]}/other")[0] == 404


# -- logs ----------------------------------------------------------------------------------


@pytest.fixture()
def root_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in handlers:
            root.addHandler(h)
        root.setLevel(level)


RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def test_json_log_lines_carry_the_active_trace(tele: Setup, root_logging: None) -> None:
    out = io.StringIO()
    telemetry.configure_logging("DEBUG", zone="beijing-a", stream=out)
    log = logging.getLogger("clearinghouse.test")
    log.info("outside any span")
    with telemetry.span("processor.decide") as s:
        log.info("payment %s decided", "p-1", extra={"shard": 7})
        try:
            raise ValueError("bad\nthing")
        except ValueError:
            log.exception("it failed")
    log.debug("debug line")

    lines = out.getvalue().splitlines()
    assert len(lines) == 4
    outside, inside, failed, debug = (json.loads(x) for x in lines)
    ctx = s.get_span_context()
    assert "trace_id" not in outside and "span_id" not in outside
    assert inside["trace_id"] == format(ctx.trace_id, "032x")
    assert inside["span_id"] == format(ctx.span_id, "016x")
    assert inside["message"] == "payment p-1 decided"
    assert inside["level"] == "INFO"
    assert inside["logger"] == "clearinghouse.test"
    assert inside["zone"] == "beijing-a"
    assert inside["shard"] == 7
    assert RFC3339_UTC.match(inside["ts"]), inside["ts"]
    assert failed["level"] == "ERROR" and failed["trace_id"] == inside["trace_id"]
    assert failed["exception"].startswith("Traceback")
    assert "ValueError: bad\nthing" in failed["exception"]
    assert debug["level"] == "DEBUG"
    assert set(outside) == {"ts", "level", "logger", "zone", "message"}


def test_log_lines_inside_a_grpc_handler_share_the_callers_trace(
    tele: Setup, root_logging: None
) -> None:
    out = io.StringIO()
    telemetry.configure_logging(logging.INFO, zone="beijing-a", stream=out)
    with echo_server(tele.tel) as srv, telemetry.span("test.caller") as caller:
        srv.call(f"/{SERVICE}/Echo")
    rows = [json.loads(x) for x in out.getvalue().splitlines()]
    handled = [r for r in rows if r["message"] == "echo handled"]
    assert len(handled) == 1
    # the line written in the server's thread carries the trace the caller started
    assert handled[0]["trace_id"] == format(caller.get_span_context().trace_id, "032x")
    assert handled[0]["logger"] == "clearinghouse.test.echo"


# -- the span file ---------------------------------------------------------------------


def test_trace_file_gets_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "traces" / "spans.jsonl"
    cfg = TelemetryConfig(node_id="n1", zone="shanghai-a", city="shanghai", trace_file=path)
    tel = Telemetry.setup(cfg, install_global=False)
    try:
        with telemetry.span("ledger.commit", shard=9) as outer, telemetry.span("bank.transfer"):
            pass
        tel.force_flush()
        rows = [json.loads(x) for x in path.read_text().splitlines()]
    finally:
        tel.shutdown()
    assert [r["name"] for r in rows] == ["bank.transfer", "ledger.commit"]
    inner, top = rows
    assert top["trace_id"] == format(outer.get_span_context().trace_id, "032x")
    assert inner["trace_id"] == top["trace_id"]
    assert inner["parent_span_id"] == top["span_id"] and top["parent_span_id"] is None
    assert top["attributes"] == {"shard": 9}
    assert top["zone"] == "shanghai-a" and top["node_id"] == "n1"
    assert top["kind"] == "INTERNAL" and top["duration_ms"] >= 0
    assert RFC3339_UTC.match(top["ts"][:23] + "Z")


def test_trace_file_is_capped_with_one_rotation(tele: Setup, tmp_path: Path) -> None:
    for i in range(40):
        with telemetry.span("step", i=i, pad="x" * 100):
            pass
    spans = tele.finished()
    path = tmp_path / "spans.jsonl"
    exporter = JsonLinesSpanExporter(path, max_bytes=2000)
    for s in spans:
        exporter.export([s])
    exporter.shutdown()
    rotated = tmp_path / "spans.jsonl.1"
    assert path.stat().st_size <= 2000 and rotated.stat().st_size <= 2000
    last = [json.loads(x)["attributes"]["i"] for x in path.read_text().splitlines()]
    before = [json.loads(x)["attributes"]["i"] for x in rotated.read_text().splitlines()]
    assert last[-1] == 39 and before[-1] == last[0] - 1  # the newest spans are kept in order


# -- OTLP ----------------------------------------------------------------------------------


def test_otlp_export_reaches_a_collector(tmp_path: Path) -> None:
    got_spans: list[trace_service_pb2.ExportTraceServiceRequest] = []
    got_metrics: list[metrics_service_pb2.ExportMetricsServiceRequest] = []
    lock = threading.Lock()

    def traces(request: bytes, context: grpc.ServicerContext) -> bytes:
        with lock:
            got_spans.append(trace_service_pb2.ExportTraceServiceRequest.FromString(request))
        return b""

    def metrics_(request: bytes, context: grpc.ServicerContext) -> bytes:
        with lock:
            got_metrics.append(metrics_service_pb2.ExportMetricsServiceRequest.FromString(request))
        return b""

    collector = grpc.server(ThreadPoolExecutor(2))
    collector.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "opentelemetry.proto.collector.trace.v1.TraceService",
                {"Export": grpc.unary_unary_rpc_method_handler(traces)},
            ),
            grpc.method_handlers_generic_handler(
                "opentelemetry.proto.collector.metrics.v1.MetricsService",
                {"Export": grpc.unary_unary_rpc_method_handler(metrics_)},
            ),
        )
    )
    port = collector.add_insecure_port("127.0.0.1:0")
    collector.start()
    try:
        cfg = TelemetryConfig(zone="shenzhen-a", otlp_endpoint=f"127.0.0.1:{port}")
        tel = Telemetry.setup(cfg, install_global=False)
        with telemetry.span("bank.transfer", bank="BANK_ICBC"):
            telemetry.metrics.retry("bank_deadline")
        tel.shutdown()  # flushes both exporters
    finally:
        collector.stop(None)

    names = [
        s.name
        for r in got_spans
        for rs in r.resource_spans
        for ss in rs.scope_spans
        for s in ss.spans
    ]
    assert names == ["bank.transfer"]
    zone = [
        a.value.string_value
        for a in got_spans[0].resource_spans[0].resource.attributes
        if a.key == "clearing.zone"
    ]
    assert zone == ["shenzhen-a"]
    metric_names = {
        m.name
        for r in got_metrics
        for rm in r.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
    }
    assert "clearing.retries" in metric_names


def test_config_from_env_and_validation(tmp_path: Path) -> None:
    env = {
        "CLEARING_OTLP_ENDPOINT": "127.0.0.1:4317",
        "CLEARING_TRACE_FILE": str(tmp_path / "t.jsonl"),
        "CLEARING_PROMETHEUS_PORT": "0",
        "CLEARING_TELEMETRY_CONSOLE": "1",
        "CLEARING_TRACE_SAMPLE_RATIO": "0.25",
    }
    cfg = TelemetryConfig.from_env(node_id="n", zone="z", city="c", environ=env)
    assert cfg.otlp_endpoint == "127.0.0.1:4317"
    assert cfg.trace_file == tmp_path / "t.jsonl"
    assert cfg.prometheus_port == 0 and cfg.console and cfg.trace_sample_ratio == 0.25
    empty = TelemetryConfig.from_env(environ={})
    assert empty.otlp_endpoint is None and empty.trace_file is None
    assert empty.prometheus_port is None and not empty.console
    with pytest.raises(ValueError, match="trace_sample_ratio"):
        TelemetryConfig(trace_sample_ratio=1.5)
    with pytest.raises(ValueError, match="prometheus_port"):
        TelemetryConfig(prometheus_port=70000)
