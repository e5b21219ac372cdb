"""One drill from start to report: load, fault, recovery, checks, files.

Before the timeline, the same load is sent unmeasured until the cluster answers as it
will before the fault (``timeline.warm``), for at most ``warmup_max_s``: a cluster just
started is still compiling its paths, and a baseline taken then reads low.

Timeline: the load starts at 0 s; the fault is injected at ``max(BEFORE_MIN_S,
BEFORE_FRACTION * duration)``; it is held ``hold_s``, then recovered (start, resume);
the load goes on until the requested duration, and at least ``AFTER_MIN_S`` after the
recovery finished. Then no new payment is sent, those in flight finish (bounded), the
cluster is made whole if a step failed, and the checks read everything back. Whatever
happens, every paused process is resumed and every stopped one started before return.
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from clearinghouse import demo
from clearinghouse.client import SwitchClient
from clearinghouse.drill import observe, report, scenarios, timeline
from clearinghouse.drill.checker import (
    BankEffect,
    Check,
    CityLedger,
    Evidence,
    expected_state,
    judge,
    needs_resolution,
)
from clearinghouse.drill.clientlog import ClientLog
from clearinghouse.drill.load import (
    LoadConfig,
    LoadGenerator,
    OrderStream,
    close_zones,
    connect_zones,
)
from clearinghouse.drill.scenarios import FaultPlan, Step
from clearinghouse.localcluster import procs
from clearinghouse.localcluster.cluster import ClusterError, LocalCluster
from clearinghouse.localcluster.procs import ProcessError
from clearinghouse.switch.config import REGISTRY_REFRESH_S

DEFAULT_SEED = 1
DEFAULT_DURATION_S = 120.0
DEFAULT_RATE_PER_S = 30.0
BEFORE_FRACTION = 0.25
BEFORE_MIN_S = 10.0
AFTER_MIN_S = 10.0
# Payments still retrying when the load stops get this long; then they end unknown.
DRAIN_TIMEOUT_S = 45.0
LEDGER_WAIT_S = 120.0
# A city's replica that still lacks rows this long after its reading began is repaired
# (`nodetool repair --full`), then read again: hints alone do not carry every write.
REPAIR_AFTER_S = 60.0
BANK_AGREEMENT_WAIT_S = 60.0
HINTS_BASELINE_WAIT_S = 60.0
STEP_EVENT_SPLIT_S = 1.0
WARMUP_MAX_S = 60.0
WARMUP_POLL_S = 1.0
WARMUP_SAY_EVERY_S = 5.0

Progress = Callable[[str], None]


@dataclass
class DrillOptions:
    scenario: str
    seed: int = DEFAULT_SEED
    duration_s: float = DEFAULT_DURATION_S
    rate_per_s: float = DEFAULT_RATE_PER_S
    out: Path | None = None
    hold_s: float | None = None
    # Start what is not running, the banks, and register the participants first.
    prepare: bool = True
    ledger_wait_s: float = LEDGER_WAIT_S
    # None: never repair, to see what hints alone bring.
    repair_after_s: float | None = REPAIR_AFTER_S
    # 0: no warm-up, the measured load starts at once.
    warmup_max_s: float = WARMUP_MAX_S


def prepare(lc: LocalCluster, progress: Progress) -> None:
    """The cluster up, the bank simulators, the demo's participants registered."""
    lc.up()
    parts = demo.load_participants()
    demo.start_banks(lc, parts, progress)
    client = SwitchClient.connect(lc.topo, lc.topo.zones[0].name)
    try:
        demo.register_participants(client, parts, progress)
    finally:
        client.close()
    time.sleep(REGISTRY_REFRESH_S * 1.5)  # every node's registry has refreshed by then


def default_out(lc: LocalCluster, scenario: str, seed: int) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return lc.paths.state / "drills" / f"{stamp}-{scenario}-seed{seed}"


@dataclass(frozen=True)
class _Run:
    """What the load phase leaves for the checks."""

    run_id: str
    started_at: str
    gen: LoadGenerator
    monitor: observe.ShardMonitor
    channels: dict[str, Any]
    restarted: set[str]
    load_s: float  # the run's end (the load drained, the victims restored)
    in_flight: int
    sending_s: float  # when the load stopped sending new payments
    warmup: dict[str, Any]  # what the unmeasured warm-up sent and saw


class Drill:
    def __init__(
        self, lc: LocalCluster, opts: DrillOptions, plan: FaultPlan, progress: Progress
    ) -> None:
        self.lc = lc
        self.opts = opts
        self.plan = plan
        self.progress = progress
        self.out = opts.out or default_out(lc, opts.scenario, opts.seed)
        self.out.mkdir(parents=True, exist_ok=True)
        self.t0 = time.monotonic()
        self.events: list[dict[str, Any]] = []
        self.log = ClientLog(self.out / report.CLIENT_LOG)
        self.fault_start_s: float | None = None
        self.fault_end_s: float | None = None
        self.fault_error = ""
        self.hints_before: dict[str, int | None] = {}

    def clock(self) -> float:
        return time.monotonic() - self.t0

    def event(self, what: str, t: float | None = None, say: bool = True) -> None:
        at = round(self.clock() if t is None else t, 3)
        self.events.append({"t": at, "what": what})
        self.log.record({"ev": "event", "t": at, "what": what})
        if say:
            self.progress(f"[{at:7.1f}s] {what}")

    def sleep_until(self, t: float) -> None:
        time.sleep(max(0.0, t - self.clock()))

    # -- the fault ----------------------------------------------------------------------------

    def step(self, s: Step) -> None:
        if s.action == "converge":
            served, target, waited = self.lc.converge(
                observe.OWNERSHIP_CONVERGE_TIMEOUT_S, self.progress
            )
            settled = "settled" if served == target else "NOT settled"
            self.event(f"shard map {settled} after {waited:.1f}s")
            return
        t = self.clock()
        # Said now, in order with what the monitor prints meanwhile; recorded afterwards,
        # as one event for a step that was quick.
        self.progress(f"[{t:7.1f}s] {s.action} {s.target} ...")
        hit = getattr(self.lc, s.action)(s.target)
        took = self.clock() - t
        names = ", ".join(hit) or "nothing (already in that state)"
        if took < STEP_EVENT_SPLIT_S:
            self.event(f"{s.action} {s.target}: {names}", t, say=False)
            self.progress(f"{'':10}{s.action} {s.target}: {names}")
        else:
            self.event(f"{s.action} {s.target}", t, say=False)
            self.event(f"{s.action} {s.target} done in {took:.1f}s: {names}")

    def run_fault(self, plan: FaultPlan) -> None:
        try:
            for i, s in enumerate(plan.inject):
                if i == 0:
                    self.fault_start_s = self.clock()
                self.step(s)
            if plan.hold_s:
                time.sleep(plan.hold_s)
            for s in plan.recover:
                self.step(s)
        except (ClusterError, ProcessError) as e:
            self.fault_error = f"{type(e).__name__}: {e}"
            self.event(f"drill step failed: {str(e).splitlines()[0]}")
        finally:
            self.fault_end_s = self.clock()
            if self.fault_start_s is None:
                self.fault_start_s = self.fault_end_s

    def restore(self) -> None:
        """Resume what is paused, start what is down: the cluster as it was."""
        comps = self.lc.components()
        for c in comps:
            if procs.state(c.managed).state == "paused":
                self.lc.resume(f"{c.kind}@{c.zone.name}")
                self.event(f"resumed {c.label} (left paused)")
        down = [c.label for c in comps if not procs.state(c.managed).alive]
        if down:
            self.event(f"starting what is down: {', '.join(down)}")
            self.lc.start("all")

    # -- the whole drill ------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        try:
            return self._run()
        finally:
            self.log.close()

    def _run(self) -> dict[str, Any]:
        o, lc, plan = self.opts, self.lc, self.plan
        parts = demo.load_participants()
        self.progress(f"drill {o.scenario}, seed {o.seed}: {plan.summary}; "
                      f"{report.rate_text(o.rate_per_s)} for {o.duration_s:.0f}s; "
                      f"files in {self.out}")  # fmt: skip
        served, target, waited = lc.converge(observe.OWNERSHIP_CONVERGE_TIMEOUT_S, self.progress)
        if served != target:
            raise ClusterError(f"the shard map did not settle within {waited:.0f}s before the "
                               "drill: `clearingctl cluster status`, then retry")  # fmt: skip
        restarted = self._cassandra_victims(plan)
        run_id = uuid.uuid4().hex[:8]
        started_at = datetime.now(UTC).isoformat(timespec="seconds")
        self.log.record({"ev": "run", "scenario": o.scenario, "seed": o.seed, "run_id": run_id,
                         "rate_per_s": o.rate_per_s, "duration_s": o.duration_s,
                         "started_at": started_at, "victims": list(plan.victims)})  # fmt: skip
        channels = connect_zones(lc.topo)
        stubs = {z: stub for z, (_, stub) in channels.items()}
        # The hints baseline (a nodetool JVM per Cassandra node: seconds each on a busy
        # machine) is read first, before any load: read during the measured load it
        # delayed the fault (37 s and 60 s into a 45 s drill) and slowed the seconds that
        # make the baseline; read during the warm-up, it kept the warm-up from warming.
        self.progress("reading the Cassandra nodes' hint counters (nodetool), before any load")
        started = time.monotonic()
        baseline = threading.Thread(target=self._hints_baseline, name="drill-hints", daemon=True)
        baseline.start()
        baseline.join(HINTS_BASELINE_WAIT_S)
        if baseline.is_alive():
            self.progress(f"  still reading after {HINTS_BASELINE_WAIT_S:.0f}s: the nodes not "
                          "read yet are left out of the hints replayed")  # fmt: skip
        else:
            self.progress(f"  read in {time.monotonic() - started:.0f}s")
        try:
            warmup = self._warm_up(parts, stubs)
        except BaseException:
            close_zones(channels)
            raise
        cfg = LoadConfig(o.rate_per_s, o.seed, run_id)
        stream = OrderStream(parts, len(lc.topo.zones), o.seed, run_id)
        gen = LoadGenerator(cfg, stream, stubs, self.log, self.clock)
        monitor = observe.ShardMonitor(lc.topo, self.clock)
        before_s = max(BEFORE_MIN_S, BEFORE_FRACTION * o.duration_s)
        in_flight = 0
        sending_s = 0.0
        self.t0 = time.monotonic()  # the timeline's 0 s: the load starts now
        try:
            monitor.start()
            gen.start()
            self.event(f"load started: {gen.workers} workers")
            self.sleep_until(before_s)
            self.run_fault(plan)
            self.sleep_until(max(o.duration_s, (self.fault_end_s or 0.0) + AFTER_MIN_S))
        finally:
            gen.stop()
            sending_s = self.clock()
            self.event("load stopped: no new payments")
            in_flight = gen.drain(DRAIN_TIMEOUT_S)
            monitor.stop()
            self.restore()
        run = _Run(run_id, started_at, gen, monitor, channels, restarted, self.clock(), in_flight,
                   sending_s, warmup)  # fmt: skip
        try:
            return self._check_and_report(run)
        finally:
            close_zones(channels)

    def _warm_up(self, parts: Any, stubs: dict[str, Any]) -> dict[str, Any]:
        """Send the drill's load, unmeasured, until ``timeline.warm`` holds or
        ``warmup_max_s`` passed; its payments (ids of their own run id) are logged apart
        (``report.WARMUP_LOG``) and are not among those the checks follow."""
        o = self.opts
        if o.warmup_max_s <= 0:
            return {"seconds": 0.0, "warm": None, "sent": 0, "rates": []}
        path = self.out / report.WARMUP_LOG
        wlog = ClientLog(path)
        run_id = uuid.uuid4().hex[:8]
        t0 = time.monotonic()

        def clock() -> float:
            return time.monotonic() - t0

        stream = OrderStream(parts, len(self.lc.topo.zones), o.seed, run_id)
        gen = LoadGenerator(LoadConfig(o.rate_per_s, o.seed, run_id), stream, stubs, wlog, clock)
        self.progress(
            f"warming up, unmeasured (at most {o.warmup_max_s:.0f}s): until "
            f"{timeline.WARM_STABLE_S} seconds in a row each answer "
            f"{timeline.WARM_SUCCESS_MIN:.0%} of their payments within "
            f"{timeline.ANSWER_SLO_S:g}s"
        )
        rates: list[float] = []
        is_warm = False
        said_s = 0.0
        try:
            gen.start()
            while not is_warm and clock() < o.warmup_max_s:
                time.sleep(WARMUP_POLL_S)
                now = clock()
                rates = timeline.complete_rates(timeline.per_second(wlog.traces(), now), now)
                is_warm = timeline.warm(rates)
                if not is_warm and now - said_s >= WARMUP_SAY_EVERY_S:
                    said_s = now
                    seen = ", ".join(f"{r:.0%}" for r in rates[-timeline.WARM_STABLE_S :])
                    self.progress(f"  warm-up at {now:.0f}s: the last complete seconds "
                                  f"answered {seen or 'nothing yet'} in time")  # fmt: skip
        finally:
            gen.stop()
            gen.drain(DRAIN_TIMEOUT_S)
            wlog.close()
        took = round(clock(), 1)
        last = [round(r, 4) for r in rates[-timeline.WARM_STABLE_S :]]
        if is_warm:
            self.progress(f"  warm after {took:.0f}s")
        else:
            self.progress(f"  NOT warm after {took:.0f}s (last seconds: "
                          f"{', '.join(f'{r:.0%}' for r in last) or 'none'}): the success "
                          "rate before the fault may read low")  # fmt: skip
        return {"seconds": took, "warm": is_warm, "sent": len(wlog.traces()), "rates": last,
                "run_id": run_id, "client_log": str(path)}  # fmt: skip

    def _cassandra_victims(self, plan: FaultPlan) -> set[str]:
        zones: set[str] = set()
        for s in plan.inject:
            if s.target:
                zones |= {c.zone.name for c in self.lc.select(s.target) if c.kind == "cassandra"}
        return zones

    def _hints_baseline(self) -> None:
        self.hints_before = observe.hints_by_node(self.lc)

    def _check_and_report(self, run: _Run) -> dict[str, Any]:
        lc, o, say, plan = self.lc, self.opts, self.progress, self.plan
        gen, monitor, channels, restarted = run.gen, run.monitor, run.channels, run.restarted
        run_id, started_at, load_s, in_flight = (
            run.run_id,
            run.started_at,
            run.load_s,
            run.in_flight,
        )
        stubs = {z: stub for z, (_, stub) in channels.items()}
        say("checking: shard map, open outcomes, every city's ledger, bank journals, caps")
        served, target, converge_s = lc.converge(observe.OWNERSHIP_CONVERGE_TIMEOUT_S, say)
        traces = self.log.traces()
        queries = [observe.Query(t.key, t.institution_id, t.payment_id)
                   for t in traces if needs_resolution(t)]  # fmt: skip
        for key, state in observe.resolve(stubs, queries).items():
            self.log.record({"ev": "resolved", "key": key, "state": state})
        traces = self.log.traces()
        expected = {t.key: s for t in traces if (s := expected_state(t)) is not None}
        restored = {lc.topo.zone(z).city for z in restarted}
        cities = [c for c in lc.topo.city_names() if c not in restored] + sorted(restored)
        ledgers: list[CityLedger] = []
        repaired_by = ""  # a repair from one city's nodes levels every city's replicas
        for city in cities:
            led = observe.read_city(lc, city, role="restored" if city in restored else "survivor",
                                    expected=expected, wait_s=o.ledger_wait_s, progress=say,
                                    repair_after_s=o.repair_after_s)  # fmt: skip
            if repaired_by:
                led = replace(led, after_repair_of=repaired_by)
            elif led.repairs:
                repaired_by = city
            ledgers.append(led)
        bank = self._bank_effects(traces, expected)
        caps = observe.registered_caps(observe.admin_stubs(lc.topo, {
            z: c.channel for z, (c, _) in channels.items()}))  # fmt: skip
        ceilings = observe.cap_ceilings(lc, cities[0])  # a city the fault did not hit
        hints_after = observe.hints_by_node(lc)
        hints_count, hints_note = observe.hints_replayed(self.hints_before, hints_after, restarted)
        self.log.close()
        verdict = judge(Evidence(traces, ledgers, bank, caps, served, target,
                                 cap_ceilings=ceilings))  # fmt: skip
        verdict.checks.insert(0, Check(
            "drill_ran", not self.fault_error,
            self.fault_error or f"every step of the plan ran ({len(plan.inject)} inject, "
            f"{len(plan.recover)} recover)",
        ))  # fmt: skip
        fault = timeline.FaultWindow(self.fault_start_s or 0.0, self.fault_end_s or 0.0)
        secs = timeline.per_second(traces, load_s, monitor.samples)
        base = timeline.baseline_rate(secs, fault)
        files = {"report": str(self.out / report.REPORT_JSON),
                 "timeline": str(self.out / report.TIMELINE_HTML),
                 "client_log": str(self.out / report.CLIENT_LOG)}  # fmt: skip
        rep: dict[str, Any] = {
            "scenario": o.scenario, "seed": o.seed, "run_id": run_id, "started_at": started_at,
            "ok": verdict.ok, "lost": verdict.lost, "duplicated": verdict.duplicated,
            "plan": {"summary": plan.summary, "victims": list(plan.victims),
                     "hold_s": plan.hold_s, "inject": [str(s) for s in plan.inject],
                     "recover": [str(s) for s in plan.recover]},
            "load": {"rate_per_s": o.rate_per_s, "duration_s": o.duration_s,
                     "seconds": round(run.sending_s, 1), "run_s": round(load_s, 1),
                     "after_fault_s": AFTER_MIN_S,
                     "sent": len(traces),
                     "batched": sum(t.batched for t in traces), "jobs": gen.jobs_sent,
                     "retries": sum(t.retries for t in traces), "workers": gen.workers,
                     "skipped_payments": gen.skipped_payments,
                     "jobs_in_flight_after_drain": in_flight},
            "fault": {"start_s": round(fault.start_s, 2), "end_s": round(fault.end_s, 2),
                      "error": self.fault_error},
            "warmup": run.warmup,
            "events": self.events,
            "verdict": verdict.to_json(),
            "success_rate_before_fault": base,
            "baseline_span_s": list(timeline.baseline_span(fault)),
            "error_rate_during_fault": timeline.error_rate(secs, fault),
            "answer_slo_s": timeline.ANSWER_SLO_S,
            "success_rate_during_fault": timeline.success_rate(
                secs, math.floor(fault.start_s), math.ceil(fault.end_s)),
            "recovery_time_s": timeline.recovery_time_s(secs, fault, base),
            "last_degraded_s": timeline.last_degraded_s(secs, fault, base),
            "recovery_definition": (
                f"seconds from the fault's start to the first of {timeline.RECOVERY_STABLE_S} "
                f"seconds in a row in which at least {timeline.RECOVERY_FRACTION:.0%} of the "
                f"rate before the fault of the payments sent were answered within "
                f"{timeline.ANSWER_SLO_S:g}s"),
            "shards_moved": timeline.shard_moves(monitor.samples),
            "shards_unserved_max": timeline.unserved_max(monitor.samples, len(target)),
            "ownership_converged_after_s": round(converge_s, 1),
            "hints_replayed": {"count": hints_count, "source": "nodetool sjk mx "
                               "(HintsService.HintsSucceeded)", "note": hints_note,
                               "before": self.hints_before, "after": hints_after},
            "ledgers": [{"city": c.city, "role": c.role, "read": c.read, "entries": c.entries,
                         "waited_s": round(c.waited_s, 1), "error": c.error,
                         "repairs": [r.to_json() for r in c.repairs],
                         "short_before_repair": c.short_before_repair,
                         "after_repair_of": c.after_repair_of}
                        for c in ledgers],
            "files": files,
            "timeline": [s.to_json() for s in secs],
        }  # fmt: skip
        report.write_json(rep, self.out)
        report.write_html(rep, secs, self.out)
        for line in report.summary_lines(rep):
            say(line)
        return rep

    def _bank_effects(self, traces: list[Any], expected: dict[str, str]) -> dict[str, BankEffect]:
        """The banks' journals, read again (bounded) while an owed reversal may still be
        on its way: money stands at the bank exactly for APPROVED payments."""
        banks = {t.bank_id for t in traces}
        by_key = {t.key: t for t in traces}
        deadline = time.monotonic() + BANK_AGREEMENT_WAIT_S
        while True:
            effects = observe.bank_effects(self.lc, banks)
            off = [
                k for k, s in expected.items()
                if effects.get(by_key[k].switch_ref, BankEffect()).standing
                != (1 if s == "APPROVED" else 0)
            ]  # fmt: skip
            if not off or time.monotonic() > deadline:
                return effects
            self.progress(f"  {len(off)} payments' bank effects differ from the switch's "
                          f"decision (owed reversals?); reading the journals again")  # fmt: skip
            time.sleep(observe.BANK_AGREEMENT_POLL_S)


def run(lc: LocalCluster, opts: DrillOptions, progress: Progress = print) -> dict[str, Any]:
    """Run one drill and write its report; returns the report (``report["ok"]``)."""
    # Usage errors (scenario, hold) before anything is started; the leader is known later.
    scenarios.plan(opts.scenario, opts.seed, lc.topo, lc.topo.etcd_zones()[0].name, opts.hold_s)
    if opts.prepare:
        prepare(lc, progress)
    leader = lc.status(with_ring=False)["etcd"]["leader"]
    plan = scenarios.plan(opts.scenario, opts.seed, lc.topo, leader, opts.hold_s)
    return Drill(lc, opts, plan, progress).run()


__all__ = ["DEFAULT_DURATION_S", "DEFAULT_RATE_PER_S", "DEFAULT_SEED", "DrillOptions", "run"]
