"""``clearingctl bench``: durable payments/s and latency against the local cluster.

Every payment counted was acknowledged with a final state, which the switch returns only
after writing it at QUORUM (two cities). Phases: single submissions from concurrent
clients to every zone (most are forwarded to their shard's owner); the same with each
payment sent straight to its shard's owner, to price the forwarding hop; batches;
then single submissions paced at half the measured single rate, for the latency a
lightly loaded switch gives. CPU seconds per 1,000 payments come from /proc for every
process kind (Cassandra, etcd, switch, bank, and this load generator), and resident
memory is summed over all of them.

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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import pyetcd
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
from clearinghouse.ownership.view import KEY_PREFIX, shard_key
from clearinghouse.switch.config import REGISTRY_REFRESH_S
from clearinghouse.switch.records import shard_of

SINGLE_CLIENTS = 48
BATCH_CLIENTS = 6
BATCH_SIZE = 100
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


def _signature_share(phases: list[dict[str, Any]], verify_us: float) -> dict[str, float | None]:
    """Per phase: verify time / switch CPU per payment (CPU-s per 1000 = CPU-ms each)."""
    out: dict[str, float | None] = {}
    for ph in phases:
        switch_ms = ph["cpu_s_per_1000_payments"].get("switch")
        out[ph["phase"]] = round(verify_us / (switch_ms * 1000), 4) if switch_ms else None
    return out


def _cpu_and_rss(lc: LocalCluster) -> tuple[dict[str, float], int]:
    cpu: dict[str, float] = {}
    rss = 0
    for record in lc.paths.state.glob("*/*/process.json"):
        kind = record.parent.parent.name
        pid = procs.read_pid(procs.Managed(kind, record.parent.name, record.parent, record))
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            statm = Path(f"/proc/{pid}/statm").read_text().split()
        except (OSError, IndexError):
            continue
        cpu[kind] = cpu.get(kind, 0.0) + (int(fields[11]) + int(fields[12])) / CLK_TCK
        rss += int(statm[1]) * PAGE_BYTES
    t = os.times()
    cpu["loadgen"] = t.user + t.system
    return cpu, rss


def _shard_owners(lc: LocalCluster) -> dict[int, str]:
    """Shard -> owning zone, read once from etcd (ownership is stable during a bench)."""
    z = lc.topo.etcd_zones()[0]
    client = pyetcd.client(host=z.address, port=z.ports.etcd_client, timeout=5)
    try:
        return {
            int(meta.key.decode().rsplit("/", 1)[1]): value.decode()
            for value, meta in client.get_prefix(shard_key(KEY_PREFIX, 0)[:-1])
        }
    finally:
        client.close()


def _orders(parts: dict[str, Any], n: int) -> list[payment_pb2.PaymentOrder]:
    return demo.make_orders(parts, n, f"b{uuid.uuid4().hex[:10]}")


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
    parts = demo.load_participants()
    demo.start_banks(lc, parts, progress)
    clients = [SwitchClient.connect(lc.topo, z.name) for z in lc.topo.zones]
    demo.register_participants(clients[0], parts, progress)
    time.sleep(REGISTRY_REFRESH_S * 1.5)
    lock = threading.Lock()

    by_zone = {c.zone: c for c in clients}
    owners: dict[int, str] = {}

    def single_worker(
        ph: Phase, stop: threading.Event, i: int, pace_s: float, to_owner: bool = False
    ) -> None:
        c = clients[i % len(clients)]
        while not stop.is_set():
            (o,) = _orders(parts, 1)
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

    def batch_worker(ph: Phase, stop: threading.Event, i: int) -> None:
        c = clients[i % len(clients)]
        while not stop.is_set():
            inst = parts["institutions"][i % len(parts["institutions"])]["participant_id"]
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

    def pool_run(
        n: int, fn: Callable[..., None], *args: Any
    ) -> Callable[[Phase, threading.Event], None]:
        def work(ph: Phase, stop: threading.Event) -> None:
            with ThreadPoolExecutor(n) as pool:
                for f in [pool.submit(fn, ph, stop, i, *args) for i in range(n)]:
                    f.result()

        return work

    results = []
    # JVMs that just started compile their hot paths for the first seconds under load;
    # that cost is not what a running cluster pays, so it is not measured.
    progress(f"warm-up (not measured): {WARMUP_S:.0f}s")
    _run_phase(lc, "warmup", pool_run(SINGLE_CLIENTS, single_worker, 0.0), WARMUP_S)
    progress(f"phase single: {SINGLE_CLIENTS} clients, {seconds:.0f}s")
    single = _run_phase(lc, "single", pool_run(SINGLE_CLIENTS, single_worker, 0.0), seconds)
    results.append(single.summary())
    progress(f"  {results[-1]}")
    owners.update(_shard_owners(lc))
    progress(f"phase single, each payment sent to its shard's owner: {seconds:.0f}s")
    direct = pool_run(SINGLE_CLIENTS, single_worker, 0.0, True)
    results.append(_run_phase(lc, "single_to_owner", direct, seconds).summary())
    progress(f"  {results[-1]}")
    progress(f"phase batched: {BATCH_CLIENTS} clients x batches of {BATCH_SIZE}, {seconds:.0f}s")
    results.append(
        _run_phase(lc, "batched", pool_run(BATCH_CLIENTS, batch_worker), seconds).summary()
    )
    progress(f"  {results[-1]}")
    half_rate = max(1.0, results[0]["payments_per_s"] / 2)
    clients_half = 16
    pace = clients_half / half_rate
    progress(f"phase single at half rate: {half_rate:.0f}/s paced over {clients_half} clients")
    results.append(_run_phase(lc, "single_half_rate", pool_run(clients_half, single_worker, pace),
                              seconds).summary())  # fmt: skip
    progress(f"  {results[-1]}")
    _, rss = _cpu_and_rss(lc)
    spec = lc.spec()
    for c in clients:
        c.close()
    report = {
        "command": "make bench",
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
        "resident_memory_all_processes_mib": round(rss / 2**20),
    }  # fmt: skip
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        progress(f"results written to {out}")
    return report


__all__ = ["run", "signing_cost"]
