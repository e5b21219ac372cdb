"""Load in the spirit of a Double-11 peak: payments at a target rate, retried as a client.

The stream of orders is a pure function of the seed (:class:`OrderStream`): the n-th job
(one order, or a batch of one institution's orders) has the same institution, payer,
payee, bank, type, currency, amount and first zone on every rerun; only the run id in
the payment ids differs, so a rerun never collides with an earlier run's ids.

:class:`LoadGenerator` sends jobs open-loop at ``rate_per_s`` payments per second (or
as fast as its workers go, ``rate_per_s == 0``) through every zone. A failed attempt
with a code that leaves the outcome open (``UNAVAILABLE``, ``DEADLINE_EXCEEDED``, ...)
is retried with the same order (same payment_id, same ``requested_at``) on the next
zone after the switch's ``retry_after_ms`` (or a short backoff), within a retry budget;
then the payment is *unknown* and the checker resolves it by query. Every send, attempt
and answer goes to the durable client log (:mod:`.clientlog`).
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc

from clearing.v1 import common_pb2, payment_pb2, payment_pb2_grpc
from clearinghouse.client import CALL_DEADLINE_S, error_details
from clearinghouse.drill.clientlog import ACK, REJECTED, UNKNOWN, ClientLog
from clearinghouse.order_signing import signing_channel
from clearinghouse.signing_keys import default_store
from clearinghouse.switch.convert import us_to_ts
from clearinghouse.switch.records import payment_key, switch_ref_for
from clearinghouse.topology import Topology

# Shares of the peak by institution (others weigh 1): the two wallets carry most of it.
INSTITUTION_WEIGHTS = {"INST_ALIPAY": 5.0, "INST_WECHAT": 4.0, "INST_JDPAY": 1.0}
DEBIT_SHARE = 0.5
USD_SHARE = 0.05
AMOUNT_LOG10_MIN = 2.0  # 1.00 CNY
AMOUNT_LOG10_MAX = 5.7  # about 5,000 CNY
BATCH_SHARE = 0.3
BATCH_SIZE_MIN = 5
BATCH_SIZE_MAX = 20
RETRY_BUDGET_S = 60.0
RETRY_PAUSE_BASE_S = 0.1
RETRY_PAUSE_MAX_S = 2.0
ATTEMPT_DEADLINE_MIN_S = 1.0
# Open loop: enough workers for every payment in flight while calls hang for a while.
WORKERS_PER_PAYMENT_PER_S = 8
WORKERS_MIN = 16
WORKERS_MAX = 256
CLOSED_LOOP_WORKERS = 32
# The dispatcher skips (and counts) the slots it fell behind by more than this.
CATCH_UP_LIMIT_S = 1.0
SLOT_WAIT_S = 0.2
# Reconnect quickly to a node that comes back (gRPC's default backoff grows to 120 s).
CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
)
# Codes after which the payment may or may not have been recorded: retry the same order.
RETRYABLE = frozenset({
    "UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED", "INTERNAL",
    "UNKNOWN", "CANCELLED",
})  # fmt: skip
CODE_NAMES = {c.value[0]: c.name for c in grpc.StatusCode}

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class OrderSpec:
    payment_id: str
    institution_id: str
    type: str  # "DEBIT" or "CREDIT"
    payer_id: str
    payee_id: str
    bank_id: str
    bank_account: str
    amount_minor: int
    currency: str

    @property
    def key(self) -> str:
        return payment_key(self.institution_id, self.payment_id)

    def to_pb(self, requested_at_us: int) -> Any:
        return payment_pb2.PaymentOrder(
            payment_id=self.payment_id, institution_id=self.institution_id,
            type=common_pb2.PaymentType.Value(f"PAYMENT_TYPE_{self.type}"),
            payer_id=self.payer_id, payee_id=self.payee_id, bank_account=self.bank_account,
            amount=common_pb2.Money(amount_minor=self.amount_minor, currency=self.currency),
            memo="drill top-up" if self.type == "DEBIT" else "drill payout",
            requested_at=us_to_ts(requested_at_us),
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class Job:
    orders: tuple[OrderSpec, ...]
    batched: bool
    zone_index: int


class OrderStream:
    """Jobs as a pure function of the seed; ``run_id`` only names the payments."""

    def __init__(
        self,
        parts: dict[str, Any],
        zone_count: int,
        seed: int,
        run_id: str,
        batch_share: float = BATCH_SHARE,
    ) -> None:
        self.rng = random.Random(f"drill-load:{seed}")
        self.insts = list(parts["institutions"])
        self.banks = list(parts["banks"])
        self.weights = [INSTITUTION_WEIGHTS.get(i["participant_id"], 1.0) for i in self.insts]
        self.zone_count = zone_count
        self.prefix = f"dr{seed}-{run_id}"
        self.batch_share = batch_share
        self.count = 0
        self.batched = 0

    def _order(self, inst: dict[str, Any]) -> OrderSpec:
        rng = self.rng
        usd = "USD" in inst["currencies"] and rng.random() < USD_SHARE
        currency = "USD" if usd else "CNY"
        bank = rng.choice([b for b in self.banks if currency in b["currencies"]])
        debit = rng.random() < DEBIT_SHARE
        iid, bid = inst["participant_id"], bank["participant_id"]
        self.count += 1
        return OrderSpec(
            payment_id=f"{self.prefix}-{self.count:07d}", institution_id=iid,
            type="DEBIT" if debit else "CREDIT",
            payer_id=bid if debit else iid, payee_id=iid if debit else bid, bank_id=bid,
            bank_account=f"6222{rng.randrange(10**12):012d}",
            amount_minor=int(10 ** rng.uniform(AMOUNT_LOG10_MIN, AMOUNT_LOG10_MAX)),
            currency=currency,
        )  # fmt: skip

    def next_job(self) -> Job:
        inst = self.rng.choices(self.insts, weights=self.weights)[0]
        zone = self.rng.randrange(self.zone_count)
        if self.batched < self.batch_share * (self.count + 1):
            size = self.rng.randint(BATCH_SIZE_MIN, BATCH_SIZE_MAX)
            orders = tuple(self._order(inst) for _ in range(size))
            self.batched += size
            return Job(orders, True, zone)
        return Job((self._order(inst),), False, zone)


def connect_zones(topo: Topology) -> dict[str, tuple[grpc.Channel, Any]]:
    """zone -> (channel, PaymentService stub), with quick reconnects."""
    out: dict[str, tuple[grpc.Channel, Any]] = {}
    for z in topo.zones:
        ch = grpc.insecure_channel(f"{z.address}:{z.ports.switch}", options=CHANNEL_OPTIONS)
        ch = signing_channel(ch, default_store().existing)  # orders signed as SwitchClient's
        out[z.name] = (ch, payment_pb2_grpc.PaymentServiceStub(ch))
    return out


def error_of(e: grpc.RpcError) -> tuple[str, str, int]:
    """(code name, reason, retry_after_ms) of a failed call."""
    code = e.code().name if isinstance(e, grpc.Call) else "UNKNOWN"
    err = error_details(e)
    if err is None:
        return code, "", 0
    return code, err.reason, int(err.retry_after_ms)


def state_name(payment: Any) -> str:
    return str(common_pb2.PaymentState.Name(payment.state)).removeprefix("PAYMENT_STATE_")


@dataclass(frozen=True, slots=True)
class Failure:
    """One failed attempt: where, when, and what the switch said."""

    zone: str
    t0: float
    t1: float
    code: str
    reason: str
    after_ms: int


@dataclass
class LoadConfig:
    rate_per_s: float
    seed: int
    run_id: str
    batch_share: float = BATCH_SHARE
    retry_budget_s: float = RETRY_BUDGET_S
    attempt_deadline_s: float = CALL_DEADLINE_S
    workers: int = 0  # 0: chosen from the rate

    def worker_count(self) -> int:
        if self.workers:
            return self.workers
        if self.rate_per_s <= 0:
            return CLOSED_LOOP_WORKERS
        want = math.ceil(self.rate_per_s * WORKERS_PER_PAYMENT_PER_S)
        return max(WORKERS_MIN, min(WORKERS_MAX, want))


class LoadGenerator:
    def __init__(
        self,
        cfg: LoadConfig,
        stream: OrderStream,
        stubs: dict[str, Any],
        log: ClientLog,
        clock: Clock,
    ) -> None:
        self.cfg = cfg
        self.stream = stream
        self.zones = list(stubs)
        self.stubs = stubs
        self.log = log
        self.clock = clock
        self.workers = cfg.worker_count()
        self.skipped_payments = 0
        self.jobs_sent = 0
        self._stop = threading.Event()
        self._abort = threading.Event()
        self._slots = threading.BoundedSemaphore(self.workers)
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="drill-load")
        self._dispatcher = threading.Thread(target=self._dispatch, name="drill-dispatch")
        self._retry_jitter = random.Random()

    def start(self) -> None:
        self._dispatcher.start()

    def stop(self) -> None:
        """Send no new payments; the ones in flight go on (see :meth:`drain`)."""
        self._stop.set()
        self._dispatcher.join()

    def drain(self, timeout_s: float) -> int:
        """Wait up to ``timeout_s`` for the payments in flight; then give up on their
        retries (they end as unknown). Returns the jobs that were still in flight."""
        deadline = time.monotonic() + timeout_s
        held = 0
        while held < self.workers and time.monotonic() < deadline:
            if self._slots.acquire(timeout=min(SLOT_WAIT_S, max(0.0, deadline - time.monotonic()))):
                held += 1
        left = self.workers - held
        self._abort.set()
        self._pool.shutdown(wait=True)
        return left

    # -- dispatching ----------------------------------------------------------------------

    def _dispatch(self) -> None:
        rate = self.cfg.rate_per_s
        next_due = self.clock()
        while not self._stop.is_set():
            job = self.stream.next_job()
            if rate > 0:
                now = self.clock()
                if next_due > now and self._stop.wait(next_due - now):
                    return
                behind = self.clock() - next_due
                if behind > CATCH_UP_LIMIT_S:
                    self.skipped_payments += int(behind * rate)
                    next_due = self.clock()
                next_due += len(job.orders) / rate
            while not self._slots.acquire(timeout=SLOT_WAIT_S):
                if self._stop.is_set():
                    return
            self.jobs_sent += 1
            self._pool.submit(self._run_job, job)

    def _run_job(self, job: Job) -> None:
        try:
            if job.batched:
                self._run_batch(job)
            else:
                self._run_single(job)
        finally:
            self._slots.release()

    # -- one job --------------------------------------------------------------------------

    def _send_record(self, o: OrderSpec, batched: bool, zone: str, t: float) -> None:
        self.log.record({
            "ev": "send", "key": o.key, "payment_id": o.payment_id,
            "institution_id": o.institution_id, "type": o.type, "payer_id": o.payer_id,
            "payee_id": o.payee_id, "amount_minor": o.amount_minor, "currency": o.currency,
            "bank_id": o.bank_id, "switch_ref": switch_ref_for(o.institution_id, o.payment_id),
            "batched": batched, "zone": zone, "t": round(t, 4),
        })  # fmt: skip

    def _attempt_failed(self, key: str, f: Failure) -> None:
        self.log.record({
            "ev": "attempt", "key": key, "zone": f.zone, "t0": round(f.t0, 4),
            "t1": round(f.t1, 4), "code": f.code, "reason": f.reason,
            "retry_after_ms": f.after_ms,
        })  # fmt: skip

    def _give_up(self, key: str, f: Failure) -> None:
        """The final answer was an error: refused for good, or unknown."""
        if f.code in RETRYABLE:
            self._attempt_failed(key, f)
            self.log.record({"ev": UNKNOWN, "key": key, "code": f.code, "reason": f.reason,
                             "t1": round(f.t1, 4)})  # fmt: skip
        else:
            self.log.record({"ev": REJECTED, "key": key, "zone": f.zone, "t0": round(f.t0, 4),
                             "t1": round(f.t1, 4), "code": f.code,
                             "reason": f.reason})  # fmt: skip

    def _ack(
        self, key: str, payment: Any, *, replayed: bool, zone: str, t0: float, t1: float
    ) -> None:
        self.log.record({
            "ev": ACK, "key": key, "state": state_name(payment), "replayed": bool(replayed),
            "zone": zone, "t0": round(t0, 4), "t1": round(t1, 4),
        })  # fmt: skip

    def _pause_s(self, attempt: int, after_ms: int) -> float:
        if after_ms > 0:
            return after_ms / 1000
        backoff: float = min(RETRY_PAUSE_MAX_S, RETRY_PAUSE_BASE_S * 2.0**attempt)
        return backoff * (0.5 + self._retry_jitter.random() / 2)

    def _timeout_s(self, deadline: float) -> float:
        left = deadline - self.clock()
        return float(max(ATTEMPT_DEADLINE_MIN_S, min(self.cfg.attempt_deadline_s, left)))

    def _retry_allowed(self, code: str, deadline: float) -> bool:
        return code in RETRYABLE and self.clock() < deadline and not self._abort.is_set()

    def _run_single(self, job: Job) -> None:
        (o,) = job.orders
        t_sent = self.clock()
        pb = o.to_pb(time.time_ns() // 1000)
        request = payment_pb2.SubmitPaymentRequest(order=pb)
        self._send_record(o, False, self.zones[job.zone_index], t_sent)
        deadline = t_sent + self.cfg.retry_budget_s
        attempt = 0
        while True:
            zone = self.zones[(job.zone_index + attempt) % len(self.zones)]
            t0 = self.clock()
            try:
                r = self.stubs[zone].SubmitPayment(request, timeout=self._timeout_s(deadline))
            except grpc.RpcError as e:
                t1 = self.clock()
                f = Failure(zone, t0, t1, *error_of(e))
                if not self._retry_allowed(f.code, deadline):
                    self._give_up(o.key, f)
                    return
                self._attempt_failed(o.key, f)
                pause = min(self._pause_s(attempt, f.after_ms), max(0.0, deadline - t1))
                if self._abort.wait(pause):
                    self.log.record({"ev": UNKNOWN, "key": o.key, "code": f.code,
                                     "reason": "drill stopped", "t1": round(t1, 4)})  # fmt: skip
                    return
                attempt += 1
                continue
            t1 = self.clock()
            self._ack(o.key, r.payment, replayed=r.replayed, zone=zone, t0=t0, t1=t1)
            return

    def _run_batch(self, job: Job) -> None:
        t_sent = self.clock()
        now_us = time.time_ns() // 1000
        pending = [(o, o.to_pb(now_us)) for o in job.orders]
        for o in job.orders:
            self._send_record(o, True, self.zones[job.zone_index], t_sent)
        deadline = t_sent + self.cfg.retry_budget_s
        attempt = 0
        while pending:
            zone = self.zones[(job.zone_index + attempt) % len(self.zones)]
            t0 = self.clock()
            request = payment_pb2.SubmitPaymentsRequest(orders=[pb for _, pb in pending])
            try:
                r = self.stubs[zone].SubmitPayments(request, timeout=self._timeout_s(deadline))
            except grpc.RpcError as e:
                t1 = self.clock()
                f = Failure(zone, t0, t1, *error_of(e))
                retry = self._retry_allowed(f.code, deadline)
                for o, _ in pending:
                    if retry:
                        self._attempt_failed(o.key, f)
                    else:
                        self._give_up(o.key, f)
                if not retry:
                    return
                pause_ms = f.after_ms
            else:
                t1 = self.clock()
                still = []
                pause_ms = 0
                for (o, pb), res in zip(pending, r.results, strict=True):
                    if res.HasField("payment"):
                        self._ack(o.key, res.payment, replayed=res.replayed, zone=zone, t0=t0,
                                  t1=t1)  # fmt: skip
                        continue
                    code = CODE_NAMES.get(res.error.code, "UNKNOWN")
                    f = Failure(zone, t0, t1, code, res.error.reason, int(res.error.retry_after_ms))
                    if self._retry_allowed(code, deadline):
                        self._attempt_failed(o.key, f)
                        still.append((o, pb))
                        pause_ms = max(pause_ms, f.after_ms)
                    else:
                        self._give_up(o.key, f)
                pending = still
                if not pending:
                    return
            pause = min(self._pause_s(attempt, pause_ms), max(0.0, deadline - t1))
            if self._abort.wait(pause):
                for o, _ in pending:
                    self.log.record({"ev": UNKNOWN, "key": o.key, "code": "CANCELLED",
                                     "reason": "drill stopped", "t1": round(t1, 4)})  # fmt: skip
                return
            attempt += 1


def close_zones(stubs: dict[str, tuple[grpc.Channel, Any]]) -> None:
    for ch, _ in stubs.values():
        ch.close()


__all__ = [
    "Job",
    "LoadConfig",
    "LoadGenerator",
    "OrderSpec",
    "OrderStream",
    "close_zones",
    "connect_zones",
    "error_of",
    "state_name",
]
