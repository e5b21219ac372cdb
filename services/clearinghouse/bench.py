"""``clearingctl bench``: durable payments/s and latency against the local cluster.

Every payment counted was acknowledged with a final state, which the switch returns only
after writing it at QUORUM (two cities). Phases: single submissions from concurrent
clients to every zone (most are forwarded to their shard's owner); the same with each
payment sent straight to its shard's owner, to price the forwarding hop; batches;
then single submissions paced at half the measured single rate, for the latency a
lightly loaded switch gives. CPU seconds per 1,000 payments come from /proc for every
process kind (Cassandra, etcd, switch, bank, and this load generator), and resident
memory (at the end) is given by process, by kind, summed over every process the cluster
runs, and summed over the default cluster alone (without bank simulators that are not in
``cluster/participants.json``, which the cluster tests start and leave running).

Signed orders: every order is signed by the load generator (the clients' interceptor,
:mod:`clearinghouse.order_signing`) and verified by the receiving switch node. The cost
of that is measured in-process first (:func:`signing_cost`: median microseconds to sign
and to verify one order, as the node does it, over many orders) and set against the
switch's CPU per payment of each phase (``signature_share_of_switch_cpu``).
``clearingctl bench --signing-only`` measures just that, without a cluster.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import threading
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from clearing.v1 import payment_pb2
from clearinghouse import demo
from clearinghouse.client import CALL_DEADLINE_S, SwitchClient
from clearinghouse.domain import Money, PaymentOrder, PaymentType
from clearinghouse.domain.signing import (
    key_id_of,
    public_key_bytes,
    signed,
    signed_message,
    verify_signed_order,
)
from clearinghouse.localcluster import procs
from clearinghouse.localcluster.cluster import LocalCluster
from clearinghouse.order_signing import sign_unsigned
from clearinghouse.ownership.view import KEY_PREFIX, shard_key
from clearinghouse.signing_keys import default_store
from clearinghouse.switch.config import REGISTRY_REFRESH_S
from clearinghouse.switch.records import shard_of

SINGLE_CLIENTS = 48
BATCH_CLIENTS = 6
BATCH_SIZE = 100
HALF_RATE_CLIENTS = 16
# Orders made and signed before each phase (OrderPool): more than a phase sends here.
SINGLE_POOL_ORDERS = 30_000
BATCH_POOL_ORDERS = 120_000
PHASE_S = 20.0
SIGNING_SAMPLE_ORDERS = 2000
SIGNING_ROUNDS = 7
WARMUP_S = 15.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")

DURABILITY = (
    "acknowledged = the decision entry (with its postings) appended to its shard's chain "
    "at QUORUM (2 of 3 cities) and fenced, commit log synced before each replica "
    "acknowledges (commitlog_sync: batch)"
)

Progress = Callable[[str], None]


@dataclass
class Phase:
    name: str
    payments: int = 0
    errors: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    cpu_s_by_kind: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies_ms)
        p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else 0.0
        per_k = {k: round(v * 1000 / self.payments, 3) if self.payments else None
                 for k, v in self.cpu_s_by_kind.items()}  # fmt: skip
        return {
            "phase": self.name,
            "payments_acknowledged": self.payments,
            "errors": self.errors,
            "seconds": round(self.seconds, 2),
            "payments_per_s": round(self.payments / self.seconds, 1) if self.seconds else 0,
            "latency_ms_p50": round(statistics.median(lat), 2) if lat else None,
            "latency_ms_p99": round(p99, 2),
            "cpu_s_per_1000_payments": per_k,
        }


def signing_cost(
    orders: int = SIGNING_SAMPLE_ORDERS, rounds: int = SIGNING_ROUNDS
) -> dict[str, Any]:
    """Median microseconds per order to sign, and to verify as the receiving node does
    (canonical bytes, key lookup, Ed25519 verify), each the median of ``rounds`` timed
    runs over ``orders`` distinct orders; and what that bounds one core to."""
    key = Ed25519PrivateKey.generate()
    pk = public_key_bytes(key)
    keys = {key_id_of(pk): pk}
    base = PaymentOrder(
        payment_id="", institution_id="INST_ALIPAY", type=PaymentType.DEBIT,
        payer_id="BANK_ICBC", payee_id="INST_ALIPAY", bank_account="6222020000000001",
        amount=Money(12_345, "CNY"), memo="top-up", requested_at_us=time.time_ns() // 1000,
    )  # fmt: skip
    plain = [replace(base, payment_id=f"bench-{n:06d}") for n in range(orders)]
    sign_us, verify_us, raw_us = [], [], []
    signed_orders: list[PaymentOrder] = []
    public = key.public_key()
    for _ in range(rounds):
        t = time.perf_counter_ns()
        signed_orders = [signed(o, key) for o in plain]
        sign_us.append((time.perf_counter_ns() - t) / 1000 / orders)
        t = time.perf_counter_ns()
        for o in signed_orders:
            verify_signed_order(o, keys)
        verify_us.append((time.perf_counter_ns() - t) / 1000 / orders)
        messages = [(o.signature, signed_message(o)) for o in signed_orders]
        t = time.perf_counter_ns()
        for sig, msg in messages:
            public.verify(sig, msg)
        raw_us.append((time.perf_counter_ns() - t) / 1000 / orders)
    verify = statistics.median(verify_us)
    return {
        "orders_per_round": orders,
        "rounds": rounds,
        "sign_us_per_order_median": round(statistics.median(sign_us), 1),
        "verify_us_per_order_median": round(verify, 1),
        "ed25519_verify_alone_us_median": round(statistics.median(raw_us), 1),
        "cpu_load_1min": round(os.getloadavg()[0], 2),
        "verify_orders_per_s_one_core": round(1e6 / verify),
        "where": "the receiving switch node, before routing, one order at a time",
    }


STORAGE_KEYSPACE = "clearing_bench"
STORAGE_IDLE_S = 5.0
STORAGE_CONCURRENCY = 6  # as many as the switch nodes' committers
# (name, operations, runs per write, entries per run); a None shape is a fence read.
STORAGE_SHAPES: tuple[tuple[str, int, int | None, int], ...] = (
    ("commit: 1 run of 1 entry", 600, 1, 1),
    ("commit: 20 runs of 10 entries", 150, 20, 10),
    ("commit: 40 runs of 50 entries", 40, 40, 50),
    ("fence read: 1 shard", 600, None, 1),
    ("fence read: 20 shards", 300, None, 20),
)
STORAGE_BODY_BYTES = 300


def storage_cost(lc: LocalCluster, progress: Progress = print) -> dict[str, Any]:
    """What Cassandra itself costs here, per operation the group commit makes: a
    commit's write (one single-partition batch of runs, at the topology's consistency)
    and its fence read. Written to a keyspace of its own (dropped after), replicated as
    the ledger is; CPU is every Cassandra process's, less what they burn idle."""
    from cassandra.concurrent import execute_concurrent_with_args  # noqa: PLC0415
    from cassandra.query import BatchStatement, BatchType  # noqa: PLC0415

    from clearinghouse.domain.chain import ChainBuilder  # noqa: PLC0415
    from clearinghouse.storage import schema  # noqa: PLC0415
    from clearinghouse.storage.ledger import encode_run  # noqa: PLC0415
    from clearinghouse.storage.session import (  # noqa: PLC0415
        CassandraConfig,
        connect,
        consistency_level,
    )

    lc.up()
    nodes = lc.cassandra_nodes()
    city = nodes[0].zone.city
    cfg = CassandraConfig.from_topology(lc.topo, city, [n.zone.address for n in nodes], None)
    cluster, session = connect(cfg)
    ks = STORAGE_KEYSPACE
    cl = consistency_level(lc.topo.keyspace.write_consistency)
    try:
        spec = lc.spec()
        repl = schema.keyspace_cql(ks, cassandra_replication(lc, spec))
        session.execute(f"CREATE KEYSPACE IF NOT EXISTS {ks} WITH replication = {repl}")
        session.execute(
            f"CREATE TABLE IF NOT EXISTS {ks}.runs (stream text, block bigint, shard int, "
            "epoch bigint, first_seq bigint, last_seq bigint, run_bytes blob, at_us bigint, "
            "PRIMARY KEY ((stream, block), shard, epoch, first_seq))"
        )
        session.execute(
            f"CREATE TABLE IF NOT EXISTS {ks}.fences (bucket int, shard int, epoch bigint, "
            "PRIMARY KEY ((bucket), shard, epoch))"
        )
        insert = session.prepare(
            f"INSERT INTO {ks}.runs (stream, block, shard, epoch, first_seq, last_seq, "  # noqa: S608
            "run_bytes, at_us) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
        )
        fence = session.prepare(
            f"SELECT shard, epoch FROM {ks}.fences WHERE bucket = 0 AND shard IN ?"  # noqa: S608
        )
        insert.consistency_level = fence.consistency_level = cl
        for shard in range(128):
            session.execute(f"INSERT INTO {ks}.fences (bucket, shard, epoch) VALUES (0, %s, 1)",  # noqa: S608
                            (shard,))  # fmt: skip
        cpu0, _ = _cpu_and_rss(lc)
        time.sleep(STORAGE_IDLE_S)
        cpu1, _ = _cpu_and_rss(lc)
        idle_cores = (cpu1.get("cassandra", 0.0) - cpu0.get("cassandra", 0.0)) / STORAGE_IDLE_S
        stream = f"bench-{uuid.uuid4().hex[:8]}"
        body = b"b" * STORAGE_BODY_BYTES
        results = []
        for name, ops, runs, entries in STORAGE_SHAPES:
            if runs is None:
                args: list[Any] = [(list(range(entries)),) for _ in range(ops)]
                stmt: Any = fence
            else:
                batches = []
                for n in range(ops):
                    batch = BatchStatement(batch_type=BatchType.UNLOGGED, consistency_level=cl)
                    for shard in range(runs):
                        chain = ChainBuilder(shard, 1, 1 + n * entries, bytes(32))
                        run = [chain.append("INTENT", f"INST/p-{n}-{i}", body)
                               for i in range(entries)]  # fmt: skip
                        batch.add(insert, (stream, n // 50, shard, 1, run[0].seq, run[-1].seq,
                                           encode_run(run), 0))  # fmt: skip
                    batches.append(batch)
                args = [()] * ops
            c0, _ = _cpu_and_rss(lc)
            t0 = time.monotonic()
            if runs is None:
                execute_concurrent_with_args(session, stmt, args, concurrency=STORAGE_CONCURRENCY)
            else:
                _execute_all(session, batches)
            took = time.monotonic() - t0
            c1, _ = _cpu_and_rss(lc)
            used = c1.get("cassandra", 0.0) - c0.get("cassandra", 0.0) - idle_cores * took
            results.append({
                "operation": name, "operations": ops, "seconds": round(took, 2),
                "operations_per_s": round(ops / took, 1),
                "cassandra_cpu_ms_per_operation": round(used * 1000 / ops, 3),
                "entries_per_operation": (runs or 0) * entries,
            })  # fmt: skip
            progress(f"  storage: {results[-1]}")
        return {
            "consistency": lc.topo.keyspace.write_consistency,
            "cassandra_idle_cores": round(idle_cores, 3),
            "concurrency": STORAGE_CONCURRENCY,
            "operations": results,
        }
    finally:
        session.execute(f"DROP KEYSPACE IF EXISTS {ks}", timeout=60)
        cluster.shutdown()


def _execute_all(session: Any, batches: list[Any]) -> None:
    """Every batch, at most STORAGE_CONCURRENCY in flight, each waited for."""
    pending: deque[Any] = deque()
    for b in batches:
        pending.append(session.execute_async(b))
        if len(pending) >= STORAGE_CONCURRENCY:
            pending.popleft().result()
    while pending:
        pending.popleft().result()


def cassandra_replication(lc: LocalCluster, spec: Any) -> dict[str, int]:
    from clearinghouse.localcluster import cassandra  # noqa: PLC0415

    return cassandra.replication(lc.topo, spec.cassandra_nodes if spec else 3)


def _signature_share(phases: list[dict[str, Any]], verify_us: float) -> dict[str, float | None]:
    """Per phase: verify time / switch CPU per payment (CPU-s per 1000 = CPU-ms each)."""
    out: dict[str, float | None] = {}
    for ph in phases:
        switch_ms = ph["cpu_s_per_1000_payments"].get("switch")
        out[ph["phase"]] = round(verify_us / (switch_ms * 1000), 4) if switch_ms else None
    return out


def _cpu_and_rss(lc: LocalCluster) -> tuple[dict[str, float], int]:
    cpu, rss = _cpu_and_rss_by_process(lc)
    return cpu, sum(rss.values())


def _cpu_and_rss_by_process(lc: LocalCluster) -> tuple[dict[str, float], dict[str, int]]:
    """CPU seconds by process kind (and this load generator), and resident bytes of
    every running process the cluster's state names, as ``kind@name``."""
    cpu: dict[str, float] = {}
    rss: dict[str, int] = {}
    for record in lc.paths.state.glob("*/*/process.json"):
        kind = record.parent.parent.name
        pid = procs.read_pid(procs.Managed(kind, record.parent.name, record.parent, record))
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            statm = Path(f"/proc/{pid}/statm").read_text().split()
        except (OSError, IndexError):
            continue
        cpu[kind] = cpu.get(kind, 0.0) + (int(fields[11]) + int(fields[12])) / CLK_TCK
        rss[f"{kind}@{record.parent.name}"] = int(statm[1]) * PAGE_BYTES
    t = os.times()
    cpu["loadgen"] = t.user + t.system
    return cpu, rss


def memory_report(rss: dict[str, int], default_banks: set[str]) -> dict[str, Any]:
    """Resident memory in MiB: of everything running, of the default cluster alone (what
    the target is about: without bank simulators that other work started, such as the
    cluster tests' BANK_SLOW), by kind and by process."""
    extra = sorted(
        name for name in rss if name.startswith("bank@") and name[5:] not in default_banks
    )
    by_kind: dict[str, int] = {}
    for name, size in rss.items():
        kind = name.split("@", 1)[0]
        by_kind[kind] = by_kind.get(kind, 0) + size
    default = sum(size for name, size in rss.items() if name not in extra)
    return {
        "resident_memory_all_processes_mib": round(sum(rss.values()) / 2**20),
        "resident_memory_default_cluster_mib": round(default / 2**20),
        "resident_memory_not_default_cluster": extra,
        "resident_memory_by_kind_mib": {k: round(v / 2**20) for k, v in sorted(by_kind.items())},
        "resident_memory_by_process_mib": {k: round(v / 2**20) for k, v in sorted(rss.items())},
    }


def _shard_owners(lc: LocalCluster) -> dict[int, str]:
    """Shard -> owning zone, read once from etcd (ownership is stable during a bench)."""
    client = lc.etcd_client()
    try:
        return {
            int(meta.key.decode().rsplit("/", 1)[1]): value.decode()
            for value, meta in client.get_prefix(shard_key(KEY_PREFIX, 0)[:-1])
        }
    finally:
        client.close()


def _orders(parts: dict[str, Any], n: int) -> list[payment_pb2.PaymentOrder]:
    return demo.make_orders(parts, n, f"b{uuid.uuid4().hex[:10]}")


class OrderPool:
    """Orders made and signed before a phase starts, per institution.

    Institutions sign their orders on their own machines; here the load generator shares
    the switch's two cores, so it signs what a phase will send before the phase's clock
    starts (the signing cost itself is measured apart, :func:`signing_cost`). A phase
    that outruns its pool makes the rest as it goes (signed by the clients' interceptor).
    """

    def __init__(self, parts: dict[str, Any], count: int, progress: Progress) -> None:
        self.parts = parts
        started = time.monotonic()
        orders = _orders(parts, count)
        sign_unsigned(orders, default_store().existing)
        self._by_inst: dict[str, deque[payment_pb2.PaymentOrder]] = defaultdict(deque)
        for o in orders:
            self._by_inst[o.institution_id].append(o)
        self._any: deque[payment_pb2.PaymentOrder] = deque(orders)
        self._taken: set[int] = set()
        self._lock = threading.Lock()
        progress(f"  {count} orders made and signed in {time.monotonic() - started:.1f}s")

    def one(self) -> payment_pb2.PaymentOrder:
        with self._lock:
            while self._any:
                o = self._any.popleft()
                if id(o) not in self._taken:
                    self._taken.add(id(o))
                    return o
        (o,) = _orders(self.parts, 1)
        return o

    def batch(self, institution_id: str, n: int) -> list[payment_pb2.PaymentOrder]:
        out: list[payment_pb2.PaymentOrder] = []
        with self._lock:
            pool = self._by_inst[institution_id]
            while pool and len(out) < n:
                o = pool.popleft()
                if id(o) not in self._taken:
                    self._taken.add(id(o))
                    out.append(o)
        if len(out) < n:
            more = [o for o in _orders(self.parts, n * 4) if o.institution_id == institution_id]
            out += more[: n - len(out)]
        return out


def _run_phase(
    lc: LocalCluster, name: str, work: Callable[[Phase, threading.Event], None], seconds: float
) -> Phase:
    ph = Phase(name)
    stop = threading.Event()
    cpu0, _ = _cpu_and_rss(lc)
    t0 = time.monotonic()
    timer = threading.Timer(seconds, stop.set)
    timer.start()
    work(ph, stop)
    ph.seconds = time.monotonic() - t0
    cpu1, _ = _cpu_and_rss(lc)
    ph.cpu_s_by_kind = {k: cpu1[k] - cpu0.get(k, 0.0) for k in cpu1}
    return ph


def run(lc: LocalCluster, seconds: float = PHASE_S, progress: Progress = print,
        out: Path | None = None) -> dict[str, Any]:  # fmt: skip
    signing = signing_cost()
    progress(f"signed orders, in-process: {signing}")
    lc.up()
    progress("what Cassandra costs per commit write and fence read (also warms it up)")
    storage = storage_cost(lc, progress)
    parts = demo.load_participants()
    demo.start_banks(lc, parts, progress)
    clients = [SwitchClient.connect(lc.topo, z.name) for z in lc.topo.zones]
    demo.register_participants(clients[0], parts, progress)
    time.sleep(REGISTRY_REFRESH_S * 1.5)
    lock = threading.Lock()

    by_zone = {c.zone: c for c in clients}
    owners: dict[int, str] = {}

    pool: OrderPool | None = None

    def single_worker(
        ph: Phase, stop: threading.Event, i: int, pace_s: float, to_owner: bool = False
    ) -> None:
        c = clients[i % len(clients)]
        while not stop.is_set():
            o = pool.one() if pool is not None else _orders(parts, 1)[0]
            if to_owner:
                # As a client that knows the ownership map: straight to the shard's owner.
                c = by_zone.get(owners.get(shard_of(o.institution_id, o.payment_id), ""), c)
            t = time.monotonic()
            try:
                c.payments.SubmitPayment(payment_pb2.SubmitPaymentRequest(order=o),
                                         timeout=CALL_DEADLINE_S)  # fmt: skip
                ok = True
            except grpc.RpcError:
                ok = False
            lat = (time.monotonic() - t) * 1000
            with lock:
                ph.payments += ok
                ph.errors += not ok
                ph.latencies_ms.append(lat)
            if pace_s:
                time.sleep(max(0.0, pace_s - lat / 1000))

    def batch_worker(ph: Phase, stop: threading.Event, i: int, pace_s: float = 0.0) -> None:
        c = clients[i % len(clients)]
        inst = parts["institutions"][i % len(parts["institutions"])]["participant_id"]
        while not stop.is_set():
            if pool is not None:
                batch = pool.batch(inst, BATCH_SIZE)
            else:
                batch = [o for o in _orders(parts, BATCH_SIZE * 3) if o.institution_id == inst]
            t = time.monotonic()
            try:
                r = c.payments.SubmitPayments(
                    payment_pb2.SubmitPaymentsRequest(orders=batch[:BATCH_SIZE]),
                    timeout=CALL_DEADLINE_S,
                )
                ok = sum(1 for x in r.results if x.HasField("payment"))
            except grpc.RpcError:
                ok = 0
            lat = (time.monotonic() - t) * 1000
            with lock:
                ph.payments += ok
                ph.errors += BATCH_SIZE - ok
                ph.latencies_ms.append(lat)
            if pace_s:
                time.sleep(max(0.0, pace_s - lat / 1000))

    def pool_run(
        n: int, fn: Callable[..., None], *args: Any
    ) -> Callable[[Phase, threading.Event], None]:
        def work(ph: Phase, stop: threading.Event) -> None:
            with ThreadPoolExecutor(n) as pool:
                for f in [pool.submit(fn, ph, stop, i, *args) for i in range(n)]:
                    f.result()

        return work

    results = []

    def phase(name: str, work: Callable[[Phase, threading.Event], None], orders: int) -> None:
        nonlocal pool
        pool = OrderPool(parts, orders, progress)
        results.append(_run_phase(lc, name, work, seconds).summary())
        pool = None
        progress(f"  {results[-1]}")

    # JVMs that just started compile their hot paths for the first seconds under load;
    # that cost is not what a running cluster pays, so it is not measured.
    progress(f"warm-up (not measured): {WARMUP_S:.0f}s")
    _run_phase(lc, "warmup", pool_run(BATCH_CLIENTS, batch_worker), WARMUP_S / 2)
    _run_phase(lc, "warmup", pool_run(SINGLE_CLIENTS, single_worker, 0.0), WARMUP_S / 2)
    progress(f"phase single: {SINGLE_CLIENTS} clients, {seconds:.0f}s")
    phase("single", pool_run(SINGLE_CLIENTS, single_worker, 0.0), SINGLE_POOL_ORDERS)
    owners.update(_shard_owners(lc))
    progress(f"phase single, each payment sent to its shard's owner: {seconds:.0f}s")
    direct = pool_run(SINGLE_CLIENTS, single_worker, 0.0, True)
    phase("single_to_owner", direct, SINGLE_POOL_ORDERS)
    progress(f"phase batched: {BATCH_CLIENTS} clients x batches of {BATCH_SIZE}, {seconds:.0f}s")
    phase("batched", pool_run(BATCH_CLIENTS, batch_worker), BATCH_POOL_ORDERS)
    half_rate = max(1.0, results[0]["payments_per_s"] / 2)
    pace = HALF_RATE_CLIENTS / half_rate
    progress(f"phase single at half rate: {half_rate:.0f}/s paced over {HALF_RATE_CLIENTS} clients")
    phase("single_half_rate", pool_run(HALF_RATE_CLIENTS, single_worker, pace), SINGLE_POOL_ORDERS)
    batch_half = max(1.0, results[2]["payments_per_s"] / 2)
    batch_pace = BATCH_CLIENTS * BATCH_SIZE / batch_half
    progress(f"phase batched at half rate: {batch_half:.0f}/s in batches of {BATCH_SIZE}")
    phase("batched_half_rate", pool_run(BATCH_CLIENTS, batch_worker, batch_pace),
          BATCH_POOL_ORDERS // 2)  # fmt: skip
    _, rss = _cpu_and_rss_by_process(lc)
    memory = memory_report(rss, {b["participant_id"] for b in parts["banks"]})
    kinds = ", ".join(f"{k} {v:,}" for k, v in memory["resident_memory_by_kind_mib"].items())
    progress(
        f"resident memory: {memory['resident_memory_default_cluster_mib']:,} MiB the default "
        f"cluster, {memory['resident_memory_all_processes_mib']:,} MiB every process "
        f"(also: {', '.join(memory['resident_memory_not_default_cluster']) or 'nothing'}); "
        f"by kind, MiB: {kinds}"
    )
    spec = lc.spec()
    for c in clients:
        c.close()
    report = {
        # What ran: make bench is `clearingctl bench` with the default phase length.
        "command": (
            "make bench" if seconds == PHASE_S else f"clearingctl bench --seconds {seconds:g}"
        ),
        "phase_seconds": seconds,
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "cluster": {"cassandra_nodes": spec.cassandra_nodes if spec else None,
                    "switch_nodes": len(lc.topo.zones),
                    "write_consistency": lc.topo.keyspace.write_consistency,
                    "durability": DURABILITY},
        "telemetry": os.environ.get("CLEARING_TELEMETRY", "on"),
        "phases": results,
        "signing": {
            **signing,
            "signature_share_of_switch_cpu": _signature_share(
                results, signing["verify_us_per_order_median"]
            ),
        },
        "storage": storage,
        **memory,
    }  # fmt: skip
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        progress(f"results written to {out}")
    return report


__all__ = ["memory_report", "run", "signing_cost"]
