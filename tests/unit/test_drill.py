"""The drill's logic without a cluster: client log, order stream, plans, load generator
retries (fake stubs), the checker, the timeline numbers and the report files."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from clearing.v1 import common_pb2, payment_pb2
from clearinghouse import cli, demo, topology
from clearinghouse._invariant import InvariantViolation
from clearinghouse.domain import PaymentState, Posting
from clearinghouse.domain.chain import FIRST_SEQ, GENESIS_HASH, ChainBuilder
from clearinghouse.domain.entries import KIND_DECISION, KIND_INTENT, Decision
from clearinghouse.domain.errors import ERROR_METADATA_KEY
from clearinghouse.domain.postings import Leg
from clearinghouse.drill import report, scenarios, timeline
from clearinghouse.drill.checker import BankEffect, CityLedger, Evidence, expected_state, judge
from clearinghouse.drill.clientlog import (
    ACK,
    NOT_FOUND,
    REJECTED,
    UNKNOWN,
    UNRESOLVED,
    Attempt,
    ClientLog,
    PaymentTrace,
    read_log,
)
from clearinghouse.drill.load import LoadConfig, LoadGenerator, OrderStream
from clearinghouse.drill.observe import (
    LEDGER_READ_RETRY_S,
    hints_replayed,
    hints_succeeded,
    journal_effects,
    ledger_facts,
    wait_for_city,
)
from clearinghouse.drill.runner import Drill, DrillOptions
from clearinghouse.localcluster import cluster as cluster_mod
from clearinghouse.localcluster.cluster import ClusterError, LocalCluster
from clearinghouse.localcluster.paths import Paths
from clearinghouse.localcluster.repair import Repair, nodetool_gist
from clearinghouse.ownership.node import LEASE_TTL_S
from clearinghouse.switch.ports import Seal, ShardWrite
from clearinghouse.switch.records import switch_ref_for
from tests.fakes import FakeLedger

pytestmark = pytest.mark.unit

SHARDS = 8
CITIES = ("beijing", "shanghai", "shenzhen")


@pytest.fixture(scope="module")
def topo() -> topology.Topology:
    return topology.load()


# -- fakes ----------------------------------------------------------------------------------


def trace(
    n: int,
    outcome: str = ACK,
    state: str = "APPROVED",
    *,
    resolution: str = "",
    amount: int = 100,
    attempts: Sequence[Attempt] = (),
    t_sent: float = 0.0,
    t_done: float | None = None,
) -> PaymentTrace:
    pid = f"p-{n}"
    t = PaymentTrace(
        key=f"INST_A/{pid}", payment_id=pid, institution_id="INST_A", type="CREDIT",
        payer_id="INST_A", payee_id="BANK_B", amount_minor=amount, currency="CNY",
        bank_id="BANK_B", switch_ref=switch_ref_for("INST_A", pid), batched=False,
        t_sent=t_sent, attempts=list(attempts), outcome=outcome,
        state=state if outcome == ACK else "", resolution=resolution,
        t_done=t_done,
    )  # fmt: skip
    if outcome in (REJECTED, UNKNOWN):
        t.code = "INVALID_ARGUMENT" if outcome == REJECTED else "UNAVAILABLE"
    return t


def city_ledger(
    city: str, decided: dict[str, str], role: str = "survivor", **kw: Any
) -> CityLedger:
    approved = sum(1 for s in decided.values() if s == "APPROVED") * 100
    totals = {("INST_A", "CNY"): (approved, 0), ("BANK_B", "CNY"): (0, approved)}
    base: dict[str, Any] = {
        "decided": decided, "decisions": dict.fromkeys(decided, 1), "totals": totals,
    }  # fmt: skip
    base.update(kw)
    return CityLedger(city, role, **base)


def bank_for(traces: Sequence[PaymentTrace], states: dict[str, str]) -> dict[str, BankEffect]:
    return {
        t.switch_ref: BankEffect(1, int(states[t.key] == "APPROVED"), 0)
        for t in traces
        if t.key in states
    }


def evidence(
    traces: Sequence[PaymentTrace],
    ledgers: Sequence[CityLedger] | None = None,
    bank: dict[str, BankEffect] | None = None,
    **kw: Any,
) -> Evidence:
    states = {t.key: s for t in traces if (s := expected_state(t)) is not None}
    owners = {s: f"zone-{s % 3}" for s in range(SHARDS)}
    base: dict[str, Any] = {
        "traces": traces,
        "ledgers": ledgers if ledgers is not None else [city_ledger(c, states) for c in CITIES],
        "bank": bank if bank is not None else bank_for(traces, states),
        "caps": {("INST_A", "CNY"): 10**9, ("BANK_B", "CNY"): 10**9},
        "served": owners, "placement": owners, "shard_count": SHARDS,
    }  # fmt: skip
    base.update(kw)
    return Evidence(**base)


def failing(ev: Evidence) -> list[str]:
    return [c.name for c in judge(ev).checks if not c.ok]


# -- the checker ----------------------------------------------------------------------------


def test_a_clean_drill_passes_every_check() -> None:
    traces = [trace(i, state="APPROVED" if i % 3 else "DECLINED") for i in range(9)]
    v = judge(evidence(traces))
    assert v.ok, [c for c in v.checks if not c.ok]
    assert (v.acknowledged, v.confirmed, v.lost, v.duplicated) == (9, 9, 0, 0)
    assert v.by_state == {"APPROVED": 6, "DECLINED": 3}


def test_a_payment_missing_from_the_restored_city_is_lost() -> None:
    traces = [trace(i) for i in range(4)]
    full = {t.key: "APPROVED" for t in traces}
    short = {k: s for k, s in full.items() if k != traces[2].key}
    ledgers = [city_ledger("beijing", full), city_ledger("shenzhen", short, role="restored")]
    v = judge(evidence(traces, ledgers))
    assert v.lost == 1
    assert v.lost_by_city == {
        "beijing": {"missing": 0, "other_state": 0},
        "shenzhen": {"missing": 1, "other_state": 0},
    }
    assert "acknowledged_in_every_city" in failing(evidence(traces, ledgers))


def test_an_acknowledged_state_the_ledger_contradicts_is_lost() -> None:
    traces = [trace(0, state="APPROVED"), trace(1, state="DECLINED")]
    decided = {traces[0].key: "FAILED", traces[1].key: "DECLINED"}
    v = judge(evidence(traces, [city_ledger(c, decided) for c in CITIES]))
    assert v.lost == 1
    assert v.lost_by_city["beijing"] == {"missing": 0, "other_state": 1}


def test_two_transfers_at_the_bank_or_two_decisions_are_duplicates() -> None:
    traces = [trace(i) for i in range(3)]
    states = {t.key: "APPROVED" for t in traces}
    bank = bank_for(traces, states)
    bank[traces[0].switch_ref] = BankEffect(2, 2, 1)
    ledgers = [city_ledger(c, states) for c in CITIES]
    ledgers[1] = city_ledger("shanghai", states, decisions={**dict.fromkeys(states, 1),
                                                            traces[1].key: 2})  # fmt: skip
    v = judge(evidence(traces, ledgers, bank))
    assert v.duplicated == 2
    assert "no_double_effect" in failing(evidence(traces, ledgers, bank))


def test_unknown_outcomes_must_be_resolved_and_then_agree_with_the_ledger() -> None:
    found = trace(0, UNKNOWN, resolution="APPROVED")
    absent = trace(1, UNKNOWN, resolution=NOT_FOUND)
    open_ = trace(2, UNKNOWN, resolution=UNRESOLVED)
    v = judge(evidence([found, absent, open_]))
    assert v.unresolved == 1 and v.unknown == 3 and v.confirmed == 1
    assert failing(evidence([found, absent, open_])) == ["unknowns_resolved"]
    # The query found it, but a city lacks it: lost like an acknowledged payment.
    ledgers = [city_ledger(c, {}) for c in CITIES]
    assert judge(evidence([found], ledgers)).lost == 1


def test_an_unacknowledged_undecided_state_needs_a_query() -> None:
    routed = trace(0, ACK, state="ROUTED")
    assert failing(evidence([routed])) == ["unknowns_resolved"]
    routed.resolution = "APPROVED"
    assert judge(evidence([routed])).ok


def test_not_found_and_refused_payments_leave_no_trace() -> None:
    absent = trace(0, UNKNOWN, resolution=NOT_FOUND)
    refused = trace(1, REJECTED)
    assert judge(evidence([absent, refused])).ok
    sneaked = {absent.key: "APPROVED"}
    ledgers = [city_ledger(c, sneaked) for c in CITIES]
    assert "not_found_left_no_trace" in failing(evidence([absent, refused], ledgers, bank={}))
    # Money moved at the bank for a refused payment: only that check sees it (the
    # ledger, its nets and caps know nothing of it).
    bank = {refused.switch_ref: BankEffect(1, 1, 0)}
    assert failing(evidence([absent, refused], bank=bank)) == ["rejected_left_no_trace"]


def test_money_must_stand_at_the_bank_exactly_for_approved_payments() -> None:
    approved, failed = trace(0, state="APPROVED"), trace(1, state="FAILED")
    bank = {approved.switch_ref: BankEffect(1, 1, 1), failed.switch_ref: BankEffect(1, 1, 0)}
    v = judge(evidence([approved, failed], bank=bank))
    bad = next(c for c in v.checks if c.name == "bank_agrees")
    assert not bad.ok and len(bad.examples) == 2
    reversed_ok = {approved.switch_ref: BankEffect(1, 1, 0), failed.switch_ref: BankEffect(1, 1, 1)}
    assert judge(evidence([approved, failed], bank=reversed_ok)).ok


def test_caps_are_checked_in_every_city_and_no_cap_means_zero() -> None:
    traces = [trace(0)]
    states = {traces[0].key: "APPROVED"}
    over = [city_ledger(c, states) for c in CITIES]
    assert failing(evidence(traces, over, caps={("INST_A", "CNY"): 99})) == ["within_caps"]
    assert failing(evidence(traces, over, caps={})) == ["within_caps"]
    assert judge(evidence(traces, over, caps={("INST_A", "CNY"): 100})).ok
    assert failing(evidence(traces, over, caps=None)) == ["within_caps"]


def test_a_cap_lowered_below_the_exposure_taken_under_the_one_before_is_no_breach() -> None:
    """SetNetDebitCap lowers the bound of new lending; what was lent stays until settled."""
    traces = [trace(0)]
    over = [city_ledger(c, {traces[0].key: "APPROVED"}) for c in CITIES]
    lowered = {("INST_A", "CNY"): 10}  # the exposure is 100
    v = judge(evidence(traces, over, caps=lowered, cap_ceilings={("INST_A", "CNY"): 100}))
    within = next(c for c in v.checks if c.name == "within_caps")
    assert within.ok and "3 above a cap lowered since" in within.detail
    # Above every cap it ever had: a breach, lowered or not.
    ceiling = {("INST_A", "CNY"): 99}
    assert failing(evidence(traces, over, caps=lowered, cap_ceilings=ceiling)) == ["within_caps"]
    assert failing(evidence(traces, over, caps=lowered)) == ["within_caps"]  # none read


def test_caps_bound_the_windows_not_settled() -> None:
    traces = [trace(0)]
    states = {traces[0].key: "APPROVED"}
    by_window = {  # 100 in window 1, 60 in window 2, 30 in the open window 3
        1: {("INST_A", "CNY"): (100, 0), ("BANK_B", "CNY"): (0, 100)},
        2: {("INST_A", "CNY"): (60, 0), ("BANK_B", "CNY"): (0, 60)},
        3: {("INST_A", "CNY"): (30, 0), ("BANK_B", "CNY"): (0, 30)},
    }

    def cities(settled: frozenset[int], where: str = "beijing") -> list[CityLedger]:
        return [
            city_ledger(c, states, totals_by_window=by_window,
                        settled_windows=settled if c == where else frozenset())
            for c in CITIES
        ]  # fmt: skip

    cap = {("INST_A", "CNY"): 100}
    assert failing(evidence(traces, cities(frozenset()), caps=cap)) == ["within_caps"]
    assert failing(evidence(traces, cities(frozenset({2})), caps=cap)) == ["within_caps"]
    # Window 1 settled (as any one city's rows say): 90 is owed, within the cap.
    settled_one = judge(evidence(traces, cities(frozenset({1})), caps=cap))
    assert settled_one.ok
    within = {c.name: c.detail for c in settled_one.checks}["within_caps"]
    assert within == "all 6 positions within their caps"  # 2 participants x 3 cities
    assert judge(evidence(traces, cities(frozenset({1}), where="shenzhen"), caps=cap)).ok
    all_settled = judge(evidence(traces, cities(frozenset({1, 2, 3})), caps=cap))
    within = {c.name: c.detail for c in all_settled.checks}["within_caps"]
    assert within == "all 0 positions within their caps"  # nothing left owed
    tight = {("INST_A", "CNY"): 89}
    assert failing(evidence(traces, cities(frozenset({1})), caps=tight)) == ["within_caps"]
    assert judge(evidence(traces, cities(frozenset({1, 2})), caps={("INST_A", "CNY"): 30})).ok
    # A credit of one window does not cover a debit of another: either may settle first.
    by_window[1] = {("INST_A", "CNY"): (0, 100), ("BANK_B", "CNY"): (100, 0)}
    bank = {("BANK_B", "CNY"): 100}
    short = {("INST_A", "CNY"): 89, **bank}  # 90 owed in windows 2 and 3, -100 in 1
    assert failing(evidence(traces, cities(frozenset()), caps=short)) == ["within_caps"]
    assert judge(evidence(traces, cities(frozenset()), caps={("INST_A", "CNY"): 90, **bank})).ok


def test_nets_must_sum_to_zero_per_currency() -> None:
    traces = [trace(0)]
    skewed = {("INST_A", "CNY"): (100, 0), ("BANK_B", "CNY"): (0, 90)}
    ledgers = [city_ledger(c, {traces[0].key: "APPROVED"}, totals=skewed) for c in CITIES]
    assert failing(evidence(traces, ledgers)) == ["nets_sum_to_zero"]


def test_ownership_must_cover_every_shard_where_placement_puts_it() -> None:
    placed = {s: f"zone-{s % 3}" for s in range(SHARDS)}
    unserved = {s: z for s, z in placed.items() if s != 5}
    assert failing(evidence([], served=unserved, placement=placed)) == ["ownership_converged"]
    moved = {**placed, 2: "zone-9"}
    v = judge(evidence([], served=moved, placement=placed))
    assert [c.examples for c in v.checks if c.name == "ownership_converged"] == [
        ["shard 2 on zone-9, placement says zone-2"]
    ]


def test_a_city_whose_ledger_cannot_be_read_fails_the_drill() -> None:
    traces = [trace(0)]
    ledgers = [city_ledger("beijing", {traces[0].key: "APPROVED"}),
               CityLedger("shenzhen", "restored", read=False, error="chain broken")]  # fmt: skip
    assert failing(evidence(traces, ledgers)) == ["ledger_readable"]
    assert "acknowledged_in_every_city" in failing(evidence(traces, []))
    # A city refused because a payment is decided twice there still counts the duplicate.
    twice = CityLedger("shanghai", "survivor", decisions={traces[0].key: 2}, read=False,
                       error="1 payments decided twice")  # fmt: skip
    ledgers = [city_ledger("beijing", {traces[0].key: "APPROVED"}), twice]
    assert judge(evidence(traces, ledgers)).duplicated == 1


# -- the client log -------------------------------------------------------------------------


def _send(key: str, t: float) -> dict[str, Any]:
    return {"ev": "send", "key": key, "payment_id": key.split("/")[1], "institution_id": "I",
            "type": "DEBIT", "payer_id": "B", "payee_id": "I", "amount_minor": 5,
            "currency": "CNY", "bank_id": "B", "switch_ref": "SW1", "batched": True,
            "zone": "z1", "t": t}  # fmt: skip


def test_the_client_log_reads_back_what_the_run_saw(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    log = ClientLog(path)
    log.record({"ev": "run", "scenario": "kill-city", "seed": 3})
    log.record(_send("I/a", 0.5))
    log.record({"ev": "attempt", "key": "I/a", "zone": "z1", "t0": 0.5, "t1": 0.6,
                "code": "UNAVAILABLE", "reason": "NO_OWNER", "retry_after_ms": 1000})  # fmt: skip
    log.record({"ev": ACK, "key": "I/a", "state": "APPROVED", "replayed": True, "zone": "z2",
                "t0": 1.6, "t1": 1.7})  # fmt: skip
    log.record(_send("I/b", 0.7))
    log.record({"ev": UNKNOWN, "key": "I/b", "code": "DEADLINE_EXCEEDED", "reason": "",
                "t1": 9.0})  # fmt: skip
    log.record({"ev": "resolved", "key": "I/b", "state": NOT_FOUND})
    log.record({"ev": "event", "t": 1.0, "what": "kill beijing"})
    log.close()
    log.close()  # idempotent
    assert log.fsyncs >= 1
    back = read_log(path)
    assert back.header["scenario"] == "kill-city"
    assert back.events == [(1.0, "kill beijing")]
    assert back.traces == log.view.traces
    a = back.traces["I/a"]
    assert (a.outcome, a.state, a.replayed, a.retries) == (ACK, "APPROVED", True, 1)
    assert a.latency_s == pytest.approx(1.2)
    assert back.traces["I/b"].resolution == NOT_FOUND


def test_a_torn_last_line_is_dropped_but_a_torn_middle_line_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    good = json.dumps(_send("I/a", 0.1))
    path.write_text(good + "\n" + '{"ev": "ack", "key": "I/a", "sta')
    assert read_log(path).traces["I/a"].outcome == "pending"
    path.write_text('{"ev": "se\n' + good + "\n")
    with pytest.raises(ValueError, match="not JSON"):
        read_log(path)


# -- the order stream and the plans ---------------------------------------------------------


def test_the_order_stream_is_a_function_of_the_seed() -> None:
    parts = demo.load_participants()

    def jobs(seed: int, run_id: str) -> list[Any]:
        s = OrderStream(parts, 6, seed, run_id)
        return [s.next_job() for _ in range(300)]

    a, b, c = jobs(7, "r1"), jobs(7, "r2"), jobs(8, "r1")
    strip = [[(o.institution_id, o.payer_id, o.payee_id, o.amount_minor, o.currency, j.zone_index)
              for o in j.orders] for j in a]  # fmt: skip
    assert strip == [[(o.institution_id, o.payer_id, o.payee_id, o.amount_minor, o.currency,
                       j.zone_index) for o in j.orders] for j in b]  # fmt: skip
    assert a != c
    orders = [o for j in a for o in j.orders]
    assert len({o.payment_id for o in orders}) == len(orders)
    assert all(re.fullmatch(r"[A-Za-z0-9._:-]{1,64}", o.payment_id) for o in orders)
    batched = sum(len(j.orders) for j in a if j.batched)
    assert 0.25 <= batched / len(orders) <= 0.35
    assert all(len({o.institution_id for o in j.orders}) == 1 for j in a)
    banks = {b["participant_id"]: b for b in parts["banks"]}
    for o in orders:
        assert o.currency in banks[o.bank_id]["currencies"]
        if o.type == "DEBIT":
            assert (o.payer_id, o.payee_id) == (o.bank_id, o.institution_id)
        else:
            assert (o.payer_id, o.payee_id) == (o.institution_id, o.bank_id)
    assert {o.type for o in orders} == {"DEBIT", "CREDIT"}
    assert len({o.institution_id for o in orders}) == len(parts["institutions"])


def test_plans_pick_their_victims_from_the_seed(topo: topology.Topology) -> None:
    for name in scenarios.SCENARIOS:
        p1 = scenarios.plan(name, 11, topo, etcd_leader="shanghai-a")
        assert p1 == scenarios.plan(name, 11, topo, etcd_leader="shanghai-a")
        assert p1.inject, name
    cities = {scenarios.plan("kill-city", s, topo).victims for s in range(30)}
    assert cities == {(c,) for c in topo.city_names()}
    kc = scenarios.plan("kill-city", 4, topo)
    assert [s.action for s in kc.inject + kc.recover] == ["kill", "start", "converge"]
    leader = scenarios.plan("kill-etcd-leader", 1, topo, etcd_leader="shenzhen-a")
    assert leader.victims == ("etcd@shenzhen-a",)
    roll = scenarios.plan("rolling-restart", 5, topo)
    assert sorted(roll.victims) == sorted(f"switch@{z}" for z in topo.zone_names())
    assert [s.action for s in roll.inject[:3]] == ["stop", "start", "converge"]
    assert scenarios.plan("pause-node", 1, topo).hold_s > LEASE_TTL_S
    pc = scenarios.plan("pause-city", 3, topo)
    assert pc.victims[0] in topo.city_names() and pc.hold_s > LEASE_TTL_S
    assert [s.action for s in pc.inject + pc.recover] == ["pause", "resume", "converge"]


def test_plans_refuse_what_cannot_be_run(topo: topology.Topology) -> None:
    with pytest.raises(scenarios.PlanError, match="unknown scenario"):
        scenarios.plan("kill-moon", 1, topo)
    with pytest.raises(scenarios.PlanError, match="no leader"):
        scenarios.plan("kill-etcd-leader", 1, topo, etcd_leader=None)
    for name in ("pause-node", "pause-city"):
        with pytest.raises(scenarios.PlanError, match="lease TTL"):
            scenarios.plan(name, 1, topo, hold_s=LEASE_TTL_S)


# -- the load generator against fake stubs --------------------------------------------------


class FakeRpcError(grpc.RpcError, grpc.Call):
    def __init__(self, code: grpc.StatusCode, reason: str = "", retry_after_ms: int = 0) -> None:
        self._code = code
        err = common_pb2.Error(code=code.value[0], reason=reason, retry_after_ms=retry_after_ms)
        self._trailers = ((ERROR_METADATA_KEY, err.SerializeToString()),)

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._code.name

    def trailing_metadata(self) -> Any:
        return self._trailers

    def initial_metadata(self) -> Any:
        return ()

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> float | None:
        return None

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: Any) -> bool:
        return False


class FakeZone:
    """A zone's PaymentService: answers from a script per call, else approves."""

    def __init__(self, name: str, script: list[Any]) -> None:
        self.name = name
        self.script = script
        self.calls: list[list[str]] = []
        self.lock = threading.Lock()

    def _next(self) -> Any:
        with self.lock:
            return self.script.pop(0) if self.script else "ok"

    def SubmitPayment(self, request: Any, timeout: float) -> Any:
        self.calls.append([request.order.payment_id])
        step = self._next()
        if isinstance(step, Exception):
            raise step
        p = payment_pb2.Payment(order=request.order, state=common_pb2.PAYMENT_STATE_APPROVED)
        return payment_pb2.SubmitPaymentResponse(payment=p)

    def SubmitPayments(self, request: Any, timeout: float) -> Any:
        self.calls.append([o.payment_id for o in request.orders])
        step = self._next()
        if isinstance(step, Exception):
            raise step
        results = []
        for i, o in enumerate(request.orders):
            if step == "first-unavailable" and i == 0:
                err = common_pb2.Error(code=14, reason="NO_OWNER", retry_after_ms=10)
                results.append(payment_pb2.PaymentResult(payment_id=o.payment_id, error=err))
            else:
                p = payment_pb2.Payment(order=o, state=common_pb2.PAYMENT_STATE_DECLINED)
                results.append(payment_pb2.PaymentResult(payment_id=o.payment_id, payment=p))
        return payment_pb2.SubmitPaymentsResponse(results=results)


def run_load(
    tmp_path: Path, zones: dict[str, FakeZone], batch_share: float, budget_s: float = 5.0
) -> tuple[LoadGenerator, ClientLog]:
    parts = demo.load_participants()
    log = ClientLog(tmp_path / "client-log.jsonl")
    cfg = LoadConfig(rate_per_s=40, seed=3, run_id="unit", batch_share=batch_share,
                     retry_budget_s=budget_s, workers=4)  # fmt: skip
    stream = OrderStream(parts, len(zones), 3, "unit", batch_share=batch_share)
    t0 = time.monotonic()
    gen = LoadGenerator(cfg, stream, dict(zones), log, lambda: time.monotonic() - t0)
    gen.start()
    time.sleep(0.3)
    gen.stop()
    assert gen.drain(timeout_s=10) == 0
    log.close()
    return gen, log


def test_unavailable_is_retried_with_the_same_order_on_the_next_zone(tmp_path: Path) -> None:
    unavailable = FakeRpcError(grpc.StatusCode.UNAVAILABLE, "NO_OWNER", retry_after_ms=5)
    zones = {f"z{i}": FakeZone(f"z{i}", [unavailable] * 50 if i == 0 else []) for i in range(3)}
    _, log = run_load(tmp_path, zones, batch_share=0.0)
    traces = log.traces()
    assert traces and all(t.outcome == ACK for t in traces)
    retried = [t for t in traces if t.attempts[0].zone == "z0"]
    assert retried, "no payment started on the failing zone"
    for t in retried:
        assert [a.zone for a in t.attempts] == ["z0", "z1"]
        assert [a.code for a in t.attempts] == ["UNAVAILABLE", "OK"]
        assert t.attempts[0].reason == "NO_OWNER"
    # Both attempts carried the same payment id (the same order).
    first = retried[0].payment_id
    assert [first] in zones["z0"].calls and [first] in zones["z1"].calls
    assert read_log(log.path).traces == log.view.traces


def test_refusals_are_final_and_exhausted_retries_are_unknown(tmp_path: Path) -> None:
    refused = FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "BAD_ORDER")
    down = FakeRpcError(grpc.StatusCode.UNAVAILABLE)
    zones = {"z0": FakeZone("z0", [refused] * 100), "z1": FakeZone("z1", [down] * 1000)}
    _, log = run_load(tmp_path, zones, batch_share=0.0, budget_s=0.2)
    by_zone: dict[str, set[str]] = {}
    for t in log.traces():
        by_zone.setdefault(t.attempts[0].zone, set()).add(t.outcome)
    assert by_zone["z0"] == {REJECTED}
    assert by_zone["z1"] <= {REJECTED, UNKNOWN}  # z1's retries go to z0, which refuses
    unknown = [t for t in log.traces() if t.outcome == UNKNOWN]
    assert all(t.code == "UNAVAILABLE" for t in unknown)


def test_a_batch_retries_only_the_orders_that_failed(tmp_path: Path) -> None:
    zones = {"z0": FakeZone("z0", ["first-unavailable"] * 100), "z1": FakeZone("z1", [])}
    _, log = run_load(tmp_path, zones, batch_share=1.0)
    traces = log.traces()
    assert traces and all(t.batched and t.outcome == ACK for t in traces)
    assert {t.state for t in traces} == {"DECLINED"}
    retried = [t for t in traces if len(t.attempts) > 1]
    assert retried
    for t in retried:
        assert [a.code for a in t.attempts] == ["UNAVAILABLE", "OK"]
        assert [a.zone for a in t.attempts] == ["z0", "z1"]
    assert all(len(c) == 1 for c in zones["z1"].calls)  # only the failed order resent


# -- timeline numbers -----------------------------------------------------------------------


def steady(n: int, t: float, ok: bool, latency_s: float = 0.05) -> PaymentTrace:
    code = "OK" if ok else "UNAVAILABLE"
    return trace(n, ACK if ok else UNKNOWN, attempts=[Attempt("z", t, t + latency_s, code)],
                 t_sent=t, t_done=t + latency_s)  # fmt: skip


def synthetic(fail_from: float, fail_to: float, end: float = 40.0) -> list[PaymentTrace]:
    out = []
    n = 0
    t = 0.0
    while t < end:
        out.append(steady(n, t, not fail_from <= t < fail_to))
        n += 1
        t += 0.1
    return out


def test_the_baseline_skips_the_warm_up_and_what_the_fault_cut_off() -> None:
    """Seconds 0-4 (cold channels and JVM paths) and payments whose 2 s to be answered
    overlap the fault are not "before the fault"; a short lead-in keeps what it has."""
    traces = [steady(i, i / 10, ok=i >= 30) for i in range(100)]  # the first 3 s fail
    traces += [steady(1000 + i, 8.5 + i / 10, ok=False) for i in range(15)]  # cut off
    secs = timeline.per_second(traces, 20.0)
    fault = timeline.FaultWindow(10.0, 15.0)
    assert timeline.baseline_span(fault) == (5, 8)
    assert timeline.baseline_rate(secs, fault) == 1.0
    assert timeline.success_rate(secs, 2, 10) is not None
    assert timeline.success_rate(secs, 2, 10) < 1.0  # what the old span would have said
    assert timeline.baseline_span(timeline.FaultWindow(4.0, 9.0)) == (3, 4)


def test_warm_needs_complete_seconds_in_a_row_at_the_threshold() -> None:
    """A second counts once its payments all had their 2 s to be answered; three such
    seconds in a row at 95 % make the cluster warm, and one slow second starts over."""
    cold = [steady(i, i / 10, ok=i >= 40) for i in range(100)]  # seconds 0-3 fail
    secs = timeline.per_second(cold, 10.0)
    # At 9.5 s only seconds 0-6 are complete (7 + 1 + 2 s > 9.5): 4, 5, 6 are good.
    rates = timeline.complete_rates(secs, 9.5)
    assert rates == [0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    assert timeline.warm(rates)
    assert not timeline.warm(timeline.complete_rates(secs, 8.5))  # only 4 and 5 done
    slow = [*cold[:60], *(steady(200 + i, 6 + i / 10, ok=i >= 1) for i in range(10))]
    # Second 6: 9 of 10 answered (90 %) breaks the run of good seconds 4 and 5.
    assert not timeline.warm(timeline.complete_rates(timeline.per_second(slow, 10.0), 9.5))
    assert not timeline.warm([1.0, 1.0])  # too few seconds


def test_the_warm_up_sends_until_the_cluster_answers_and_logs_apart(tmp_path: Path) -> None:
    """Load is sent, unmeasured, until three seconds in a row are answered in time; its
    payments carry their own run id and go to their own log, not the drill's."""
    unavailable = FakeRpcError(grpc.StatusCode.UNAVAILABLE, "NO_OWNER", retry_after_ms=5)
    zones = {f"z{i}": FakeZone(f"z{i}", [unavailable] * 40) for i in range(2)}
    lc = SimpleNamespace(topo=SimpleNamespace(zones=list(zones)), paths=SimpleNamespace(
        state=tmp_path))  # fmt: skip
    said: list[str] = []
    opts = DrillOptions("kill-zone", out=tmp_path / "out", rate_per_s=40, warmup_max_s=30)
    d = Drill(lc, opts, None, said.append)  # type: ignore[arg-type]
    w = d._warm_up(demo.load_participants(), dict(zones))
    assert w["warm"] is True and w["sent"] > 0
    assert len(w["rates"]) == timeline.WARM_STABLE_S
    assert min(w["rates"]) >= timeline.WARM_SUCCESS_MIN
    assert w["seconds"] >= timeline.WARM_STABLE_S + timeline.ANSWER_SLO_S
    logged = read_log(tmp_path / "out" / report.WARMUP_LOG)
    assert len(logged.traces) == w["sent"]
    assert all(w["run_id"] in t.payment_id for t in logged.traces.values())
    assert d.log.traces() == []  # the drill's own log holds none of them
    assert said[0].startswith("warming up") and said[-1].startswith("  warm after")
    d.log.close()
    none = Drill(lc, replace(opts, warmup_max_s=0), None, said.append)  # type: ignore[arg-type]
    assert none._warm_up(demo.load_participants(), dict(zones))["warm"] is None
    none.log.close()


def test_recovery_time_and_error_rate_are_read_off_the_seconds() -> None:
    traces = synthetic(10.0, 14.0)
    secs = timeline.per_second(traces, 40.0)
    assert secs[3].sent == 10 and secs[3].acked == 10 and secs[3].started == 10
    assert secs[11].errors == 10 and secs[11].success_rate == 0.0
    fault = timeline.FaultWindow(10.0, 20.0)
    base = timeline.baseline_rate(secs, fault)
    assert base == 1.0
    assert timeline.recovery_time_s(secs, fault, base) == pytest.approx(4.0)
    assert timeline.error_rate(secs, fault) == pytest.approx(0.4, abs=0.01)
    assert secs[5].p50_ms == pytest.approx(50.0, abs=0.5)
    assert timeline.last_degraded_s(secs, fault, base) == pytest.approx(4.0)
    # A second dip inside the fault window (shards moving back) is the last degraded.
    dips = [t for t in traces if not 25.0 <= t.t_sent < 26.0]
    dips += [steady(2000 + i, 25.0 + i / 10, ok=False) for i in range(10)]
    secs = timeline.per_second(dips, 40.0)
    longer = timeline.FaultWindow(10.0, 30.0)
    assert timeline.recovery_time_s(secs, longer, base) == pytest.approx(4.0)
    assert timeline.last_degraded_s(secs, longer, base) == pytest.approx(16.0)


def test_recovery_needs_stable_seconds_and_none_when_it_never_comes() -> None:
    fault = timeline.FaultWindow(10.0, 12.0)
    never = timeline.per_second(synthetic(10.0, 38.0), 40.0)
    assert timeline.recovery_time_s(never, fault, 1.0) is None
    # A failed second after two good ones starts the count again.
    blip = [t for t in synthetic(10.0, 12.0) if not 14.0 <= t.t_sent < 15.0]
    blip += [steady(1000 + i, 14.0 + i / 10, ok=False) for i in range(10)]
    assert timeline.recovery_time_s(timeline.per_second(blip, 40.0), fault, 1.0) == 5.0
    # A second that sent nothing (the client stalled) neither counts nor breaks the run.
    quiet = [t for t in synthetic(10.0, 12.0) if not 14.0 <= t.t_sent < 15.0]
    assert timeline.recovery_time_s(timeline.per_second(quiet, 40.0), fault, 1.0) == 2.0


def test_a_payment_answered_late_is_not_a_success() -> None:
    slow = [steady(i, 5.0, ok=True, latency_s=timeline.ANSWER_SLO_S + 0.5) for i in range(3)]
    fast = [steady(10 + i, 5.0, ok=True) for i in range(1)]
    secs = timeline.per_second(slow + fast, 10.0)
    assert (secs[5].sent, secs[5].good, secs[5].success_rate) == (4, 1, 0.25)
    assert secs[5].started_ok == 4  # every attempt got its answer, just late
    refused = trace(99, REJECTED, attempts=[Attempt("z", 6.0, 6.1, "INVALID_ARGUMENT")],
                    t_sent=6.0, t_done=6.1)  # fmt: skip
    assert timeline.per_second([refused], 10.0)[6].good == 1  # an answer, in time


def test_shard_moves_count_new_epochs() -> None:
    samples: list[timeline.ShardSample] = [
        (0.0, {0: ("a", 1), 1: ("b", 2)}),
        (1.0, {1: ("b", 2)}),  # shard 0 unserved: not a move yet
        (2.0, {0: ("c", 5), 1: ("b", 2)}),
        (3.0, {0: ("c", 5), 1: ("b", 7)}),  # same node, new epoch: a takeover
    ]
    assert timeline.shard_moves(samples) == 2
    assert timeline.unserved_max(samples, 2) == 1
    secs = timeline.per_second([], 4.0, samples)
    assert [s.shards_served for s in secs] == [2, 1, 2, 2]


# -- gathered evidence ----------------------------------------------------------------------


def chain_ledger(decisions: dict[str, int]) -> FakeLedger:
    """Shard 0's chain: an intent and ``n`` approving decisions per payment key."""
    led = FakeLedger()
    led.fence(0, 1, "zone-a", 0)
    led.write_seal(Seal(0, 1, 0, FIRST_SEQ, GENESIS_HASH), "zone-a", 0)
    b = ChainBuilder(0, 1, FIRST_SEQ, GENESIS_HASH)
    entries = []
    for key, n in decisions.items():
        entries.append(b.append(KIND_INTENT, key, b"intent"))
        postings = (Posting("INST_A", "CNY", 100, 0, key, Leg.APPROVE_PAYER),
                    Posting("BANK_B", "CNY", 0, 100, key, Leg.APPROVE_PAYEE))  # fmt: skip
        body = Decision(PaymentState.APPROVED, 1, "zone-a", "", "R1", False, postings).encode()
        entries += [b.append(KIND_DECISION, key, body) for _ in range(n)]
    led.commit([ShardWrite(0, 1, 1, entries, [])])
    return led


def test_ledger_facts_count_decisions_beside_the_verified_summary() -> None:
    summary, decisions = ledger_facts(chain_ledger({"I/a": 1, "I/b": 1}))
    assert summary is not None
    assert summary.decided == {"I/a": "APPROVED", "I/b": "APPROVED"}
    assert summary.net("INST_A", "CNY") == 200 and summary.net_by_currency() == {"CNY": 0}
    assert decisions == {"I/a": 1, "I/b": 1}
    twice, decisions = ledger_facts(chain_ledger({"I/a": 1, "I/b": 2}))
    assert twice is None and decisions["I/b"] == 2
    broken = chain_ledger({"I/a": 1})
    broken.tamper(0, 1, 2, b"forged")
    with pytest.raises(InvariantViolation, match="shard 0"):
        ledger_facts(broken)


GAP = InvariantViolation("shard 2: epoch 224 ends before its successor's seal")


class CityReplica:
    """A city's replica seen through ``wait_for_city``. ``answers`` are what its reads
    give before a repair, in turn (the last one repeats): an exception, or the
    decisions of the chain read (a payment key -> how many DECISION entries), which
    verifies. ``healed`` is what reads give after it. Time moves only when the reader
    sleeps or the repair runs."""

    def __init__(
        self,
        answers: list[Any],
        healed: list[Any] | None = None,
        expected: dict[str, str] | None = None,
        repair_s: float = 20.0,
    ) -> None:
        self.answers = answers
        self.healed = healed if healed is not None else [{"I/a": 1}]
        self.expected = expected if expected is not None else {"I/a": "APPROVED"}
        self.repair_s = repair_s
        self.now = 0.0
        self.reads = 0
        self.reads_after = 0
        self.repairs = 0
        self.said: list[str] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s

    def read(self) -> tuple[Any, Any]:
        if self.repairs:
            answer = self.healed[min(self.reads_after, len(self.healed) - 1)]
            self.reads_after += 1
        else:
            answer = self.answers[min(self.reads, len(self.answers) - 1)]
            self.reads += 1
        if isinstance(answer, Exception):
            raise answer
        return ledger_facts(chain_ledger(answer))

    def repair(self) -> tuple[Repair, ...]:
        self.repairs += 1
        self.now += self.repair_s
        return (Repair("shenzhen-a", True, self.repair_s, "Repair completed successfully",
                       "system.log"),)  # fmt: skip

    def wait(self, repair_after_s: float | None, wait_s: float = 120.0) -> CityLedger:
        return wait_for_city(
            "shenzhen", "survivor", self.expected, read=self.read, repair=self.repair,
            wait_s=wait_s, repair_after_s=repair_after_s, progress=self.said.append,
            clock=self.clock, sleep=self.sleep,
        )  # fmt: skip


def test_a_replica_that_hints_bring_level_is_read_without_a_repair() -> None:
    city = CityReplica([GAP, GAP, GAP, {"I/a": 1}])
    led = city.wait(repair_after_s=60.0)
    assert led.read and led.decided == {"I/a": "APPROVED"} and led.repairs == ()
    assert city.repairs == 0 and city.reads == 4 and led.short_before_repair == ""


def test_a_replica_still_missing_rows_after_hints_is_repaired_once_and_read_again() -> None:
    city = CityReplica([GAP])
    led = city.wait(repair_after_s=60.0)
    assert city.repairs == 1
    assert led.read and led.decided == {"I/a": "APPROVED"}
    assert [(r.zone, r.ok) for r in led.repairs] == [("shenzhen-a", True)]
    assert "successor's seal" in led.short_before_repair
    assert 60.0 <= led.waited_s <= 60.0 + LEDGER_READ_RETRY_S + city.repair_s
    assert any("still lacks rows" in line and "successor's seal" in line for line in city.said)


def test_a_verified_replica_that_lacks_a_payment_is_repaired() -> None:
    # The chain verifies but stops before I/b's rows: missing, not different.
    city = CityReplica([{"I/a": 1}], healed=[{"I/a": 1, "I/b": 1}],
                       expected={"I/a": "APPROVED", "I/b": "APPROVED"})  # fmt: skip
    led = city.wait(repair_after_s=60.0)
    assert city.repairs == 1 and led.read and "I/b" in led.decided
    assert "1 confirmed payments not yet decided there, e.g. I/b" in led.short_before_repair


def test_a_replica_that_differs_is_never_repaired() -> None:
    # Decided with another state than the client was told: what the drill exists to
    # catch; a repair would spread the newest version of the row.
    other = CityReplica([{"I/a": 1}], expected={"I/a": "DECLINED"})
    led = other.wait(repair_after_s=10.0, wait_s=30.0)
    assert other.repairs == 0 and led.read and led.decided["I/a"] == "APPROVED"
    forged = CityReplica([InvariantViolation("shard 0: chain broken at 3: hash mismatch")])
    led = forged.wait(repair_after_s=10.0, wait_s=30.0)
    assert forged.repairs == 0 and not led.read and "chain broken" in led.error


def test_the_deadline_repairs_first_then_reads_until_the_replica_answers() -> None:
    # The deadline comes before the repair is due: a replica is not given up on without
    # its repair, and a read error right after it (a node busy merging) is read again.
    city = CityReplica([GAP], healed=[TimeoutError("busy"), {"I/a": 1}])
    led = city.wait(repair_after_s=30.0, wait_s=10.0)
    assert city.repairs == 1 and city.reads_after == 2 and led.read and len(led.repairs) == 1


def test_after_a_repair_only_what_is_read_afterwards_is_the_answer() -> None:
    # Short before the repair (verified, I/b missing), unreadable after it: the answer
    # is the error, not the ledger read before the repair.
    city = CityReplica([{"I/a": 1}], healed=[GAP],
                       expected={"I/a": "APPROVED", "I/b": "APPROVED"})  # fmt: skip
    led = city.wait(repair_after_s=30.0, wait_s=60.0)
    assert city.repairs == 1 and not led.read and "successor's seal" in led.error
    assert led.decided == {} and "I/b" in led.short_before_repair
    never = CityReplica([GAP], healed=[GAP])
    led = never.wait(repair_after_s=30.0)
    assert never.repairs == 1 and not led.read and len(led.repairs) == 1


def test_without_repair_a_replica_short_at_the_deadline_is_unread() -> None:
    city = CityReplica([GAP])
    led = city.wait(repair_after_s=None, wait_s=30.0)
    assert city.repairs == 0 and not led.read and led.repairs == ()
    assert "successor's seal" in led.error and led.waited_s >= 30.0


# Nodes the six-node fixture shows as paused (SIGSTOP): alive, not running.
PAUSED_NODES: set[str] = set()


@pytest.fixture()
def six_node_cluster(
    topo: topology.Topology, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[LocalCluster, list[tuple[str, tuple[str, ...]]], set[str]]:
    """A LocalCluster of six Cassandra nodes whose nodetool is faked: each call is
    recorded; ``down`` names nodes whose process is not running."""
    lc = LocalCluster(topo, Paths.default(tmp_path), progress=lambda _: None)
    monkeypatch.setattr(lc, "spec", lambda: SimpleNamespace(cassandra_nodes=6))
    asked: list[tuple[str, tuple[str, ...]]] = []
    down: set[str] = set()
    paused = PAUSED_NODES
    paused.clear()

    def nodetool(zone: str, *args: str, timeout_s: float) -> Any:
        asked.append((zone, args))
        if zone == "shenzhen-b":
            return subprocess.CompletedProcess([], 2, "", "error: Repair job has failed\n")
        if zone == "beijing-b":
            raise subprocess.TimeoutExpired("nodetool", timeout_s)
        if zone == "shanghai-b":
            raise FileNotFoundError("java")
        return subprocess.CompletedProcess([], 0, "[x] Repair completed successfully\n", "")

    def state(m: Any) -> Any:
        if m.name in paused:
            return SimpleNamespace(alive=True, state="paused")
        return SimpleNamespace(alive=m.name not in down, state="down" if m.name in down else "up")

    def ring(via: Any) -> list[dict[str, str]]:
        """Gossip as the repairing node sees it: a stopped node is D, unless GOSSIP_LAG
        says it is seen up for that many more reads (killed a moment ago)."""
        rows = []
        for z in topo.zones:
            stopped = z.name in down or z.name in paused
            if stopped and GOSSIP_LAG.get(z.name, 0) > 0:
                GOSSIP_LAG[z.name] -= 1
                stopped = False
            rows.append({"dc": z.city, "rack": z.name, "address": z.address,
                         "status": "D" if stopped else "U", "state": "N"})  # fmt: skip
        return rows

    GOSSIP_LAG.clear()
    monkeypatch.setattr(lc, "nodetool", nodetool)
    monkeypatch.setattr(lc, "ring", ring)
    monkeypatch.setattr(cluster_mod, "GOSSIP_POLL_S", 0.0)
    monkeypatch.setattr(cluster_mod.procs, "state", state)
    return lc, asked, down


GOSSIP_LAG: dict[str, int] = {}


def test_a_repair_waits_until_gossip_holds_a_node_killed_a_moment_ago_down(
    six_node_cluster: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--force leaves out only nodes gossip already marked down; a repair started 2 s
    after a kill would fail on the node gossip still thinks is up."""
    lc, asked, down = six_node_cluster
    said: list[str] = []
    lc.progress = said.append
    down.add("shenzhen-a")
    GOSSIP_LAG["shenzhen-a"] = 2  # seen up by the next two reads of the ring
    reps = lc.repair("beijing")
    waits = [m for m in said if "waiting for beijing-a's gossip to mark" in m]
    assert len(waits) == 2 and "127.0.3.1" in waits[0]
    assert [z for z, _ in asked] == ["beijing-a", "beijing-b"]
    assert reps[0].ok and reps[0].left_out == ("cassandra@shenzhen-a",)
    # Gossip that never catches up is waited for a bounded time, then the repair runs.
    monkeypatch.setattr(cluster_mod, "GOSSIP_DOWN_WAIT_S", 0.0)
    GOSSIP_LAG["shenzhen-a"] = 10**6
    said.clear()
    asked.clear()
    lc.repair("beijing")
    assert any("still holds 127.0.3.1 up" in m for m in said)
    assert [z for z, _ in asked] == ["beijing-a", "beijing-b"]


def test_a_city_is_repaired_from_each_of_its_nodes_and_a_failure_is_named(
    six_node_cluster: Any, topo: topology.Topology
) -> None:
    lc, asked, down = six_node_cluster
    down.add("beijing-a")
    reps = lc.repair("shenzhen")
    assert asked == [(z, ("repair", "--full", "--force", topo.keyspace.name))
                     for z in ("shenzhen-a", "shenzhen-b")]  # fmt: skip
    assert [(r.zone, r.ok) for r in reps] == [("shenzhen-a", True), ("shenzhen-b", False)]
    assert reps[0].detail.endswith("completed successfully") and "failed" in reps[1].detail
    assert reps[1].log.endswith("system.log")
    assert reps[0].left_out == ("cassandra@beijing-a",)
    timed_out, unrunnable = lc.repair("beijing")[-1], lc.repair("shanghai")[-1]
    assert not timed_out.ok and "may still run on the node" in timed_out.detail
    assert not unrunnable.ok and "could not run" in unrunnable.detail
    with pytest.raises(ClusterError, match="cities are beijing, shanghai, shenzhen"):
        lc.repair("mars")
    # A city's node that is down is not asked (it is named as left out); a city whose
    # nodes are all down has nothing to repair from.
    asked.clear()
    down.add("shenzhen-a")
    reps = lc.repair("shenzhen")
    assert [z for z, _ in asked] == ["shenzhen-b"]
    assert "cassandra@shenzhen-a" in reps[0].left_out
    down.add("shenzhen-b")
    with pytest.raises(ClusterError, match="no Cassandra node of shenzhen runs"):
        lc.repair("shenzhen")
    # A paused node is not asked either (nodetool would wait out its timeout).
    PAUSED_NODES.add("shanghai-a")
    asked.clear()
    reps = lc.repair("shanghai")
    assert [z for z, _ in asked] == ["shanghai-b"]
    assert "cassandra@shanghai-a" in reps[0].left_out


def test_cluster_repair_exits_non_zero_unless_every_node_was_repaired(
    six_node_cluster: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    lc, asked, down = six_node_cluster
    monkeypatch.setattr(cli, "LocalCluster", lambda *a, **k: lc)
    assert cli.main(["cluster", "repair", "shenzhen"]) == cli.EXIT_FAILED
    assert "repair from cassandra@shenzhen-b failed: error: Repair job" in capsys.readouterr().err
    # all: one city's nodes repair every city; the first city whose nodes all run.
    asked.clear()
    lc.nodetool = lambda zone, *a, timeout_s: (  # type: ignore[method-assign]
        asked.append((zone, a)) or subprocess.CompletedProcess([], 0, "ok\n", "")
    )
    assert cli.main(["cluster", "repair"]) == 0
    assert [z for z, _ in asked] == ["beijing-a", "beijing-b"]
    asked.clear()
    down.add("beijing-b")
    assert cli.main(["cluster", "repair", "all"]) == cli.EXIT_FAILED  # beijing-b left out
    assert [z for z, _ in asked] == ["shanghai-a", "shanghai-b"]
    assert "left out cassandra@beijing-b (down): not repaired" in capsys.readouterr().err
    assert cli.main(["cluster", "repair", "mars"]) == cli.EXIT_FAILED
    assert "no Cassandra node in city 'mars'" in capsys.readouterr().err


def test_nodetool_gist_names_the_error_not_a_stack_frame() -> None:
    failed = ("[t] Starting repair command #2\nerror: Repair job has failed with the error "
              "message: Endpoint not alive: /127.0.3.1:17000\n-- StackTrace --\n"
              "java.lang.RuntimeException: Repair job has failed\n\tat org.apache.x(y.java:1)"
              "\n\tat java.base/java.lang.Thread.run(Thread.java:840)\n")  # fmt: skip
    assert nodetool_gist(failed, 2).endswith("Endpoint not alive: /127.0.3.1:17000")
    trace_only = failed.replace("error: ", "")
    assert nodetool_gist(trace_only, 2) == "java.lang.RuntimeException: Repair job has failed"
    assert nodetool_gist("[t] a\n[t] Repair completed successfully\n", 0).endswith("fully")
    assert nodetool_gist("", 1) == "nodetool exited 1"


def test_bank_journals_reduce_to_effects_per_reference() -> None:
    lines = [
        '{"op":"open","bank_id":"B","v":1}',
        '{"op":"transfer","ref":"SW1","status":"APPROVED"}',
        '{"op":"transfer","ref":"SW2","status":"DECLINED"}',
        '{"op":"reverse","ref":"SW1","reason":"x"}',
        '{"op":"tombstone","ref":"SW3","status":"DECLINED"}',
        '{"op":"transfer","ref":"SW4","sta',
    ]
    eff = journal_effects(lines)
    assert eff["SW1"] == BankEffect(1, 1, 1) and eff["SW1"].standing == 0
    assert eff["SW2"] == BankEffect(1, 0, 0)
    assert eff["SW3"] == BankEffect(0, 0, 0)
    assert "SW4" not in eff


class FakeNodetool:
    def __init__(self, rc: int, out: str, err: str = "") -> None:
        self.answer = subprocess.CompletedProcess(["nodetool"], rc, out, err)
        self.args: tuple[str, ...] = ()

    def nodetool(self, zone: str, *args: str, timeout_s: float) -> Any:
        self.args = args
        return self.answer


def test_hints_succeeded_reads_the_jmx_count_and_zero_before_the_first_hint() -> None:
    mbean = "org.apache.cassandra.metrics:type=HintsService,name=HintsSucceeded"
    ok = FakeNodetool(0, f"{mbean}\n606\n")
    assert hints_succeeded(ok, "beijing-a") == 606
    assert ok.args[:4] == ("sjk", "mx", "-b", mbean)
    fresh = FakeNodetool(0, "", f"MBean not found: {mbean}\n")  # sjk exits 0 then
    assert hints_succeeded(fresh, "beijing-a") == 0
    down = FakeNodetool(1, "", "nodetool: Failed to connect to '127.0.0.1:17101'")
    assert hints_succeeded(down, "beijing-a") is None


def test_hints_replayed_counts_a_restarted_node_from_zero() -> None:
    before = {"beijing-a": 10, "shanghai-a": 5, "shenzhen-a": 7}
    after = {"beijing-a": 110, "shanghai-a": 5, "shenzhen-a": 3}
    count, note = hints_replayed(before, after, restarted={"shenzhen-a"})
    assert count == 100 + 0 + 3 and "HintsSucceeded" in note
    count, note = hints_replayed(before, {"beijing-a": None, "shanghai-a": 6}, restarted=())
    assert count == 1 and "beijing-a" in note
    assert hints_replayed({}, {"beijing-a": None}, ())[0] is None
    assert hints_replayed({}, {}, ())[0] is None


# -- the report ------------------------------------------------------------------------------


def fake_report(secs: list[timeline.Second], ok: bool) -> dict[str, Any]:
    traces = [trace(0)]
    ev = evidence(traces) if ok else evidence(traces, bank={})
    v = judge(ev)
    return {
        "scenario": "kill-city", "seed": 3, "started_at": "2026-11-25T00:00:00+00:00",
        "ok": v.ok, "lost": v.lost, "duplicated": v.duplicated,
        "plan": {"summary": "SIGKILL every process of city <beijing>", "hold_s": 15.0},
        "load": {"rate_per_s": 20, "seconds": 40.0, "sent": 1, "retries": 0,
                 "skipped_payments": 0, "duration_s": 30.0, "after_fault_s": 10.0,
                 "run_s": 71.5},
        "fault": {"start_s": 10.0, "end_s": 20.0},
        "events": [{"t": 10.0, "what": "kill beijing"}, {"t": 20.0, "what": "start <b>"}],
        "verdict": v.to_json(), "success_rate_before_fault": 1.0, "baseline_span_s": [5, 8],
        "error_rate_during_fault": 0.4, "recovery_time_s": 4.0, "shards_moved": 43,
        "last_degraded_s": 4.0,
        "answer_slo_s": 2.0, "success_rate_during_fault": 0.6,
        "shards_unserved_max": 22,
        "hints_replayed": {"count": None, "source": "nodetool", "note": "no answer"},
        "files": {"report": "r.json", "timeline": "t.html", "client_log": "c.jsonl"},
    }  # fmt: skip


def test_the_summary_says_lost_duplicated_and_the_result() -> None:
    secs = timeline.per_second(synthetic(10.0, 14.0), 40.0)
    good = "\n".join(report.summary_lines(fake_report(secs, ok=True)))
    assert "LOST 0   DUPLICATED 0" in good and good.endswith("RESULT: PASS")
    assert "recovery time 4.0s after the fault's start" in good
    assert "error rate during the fault 40.00%" in good
    assert "before the fault 100.00% (payments sent 5-8 s into the load)" in good
    assert "hints replayed unavailable" in good
    # Sending ran 40 s (30 asked, on to 10 s after the fault); the run itself 72 s.
    assert "for 40s (asked: 30s, and on to 10s after the fault ended); the run ended at 72s" in (
        good
    )
    bad = "\n".join(report.summary_lines(fake_report(secs, ok=False)))
    assert "FAIL bank_agrees" in bad and bad.endswith("RESULT: FAIL")


def test_the_summary_names_a_city_that_took_a_repair() -> None:
    secs = timeline.per_second(synthetic(10.0, 14.0), 40.0)
    rep = fake_report(secs, ok=True)
    repair = Repair("shenzhen-a", True, 21.4, "Repair completed successfully", "system.log",
                    left_out=("cassandra@beijing-b",))  # fmt: skip
    rep["ledgers"] = [
        {"city": "beijing", "role": "survivor", "read": True, "waited_s": 0.4, "repairs": []},
        {"city": "shenzhen", "role": "survivor", "read": True, "waited_s": 88.0,
         "repairs": [repair.to_json()], "short_before_repair": "shard 2: epoch 224 ends"},
        {"city": "shanghai", "role": "restored", "read": True, "waited_s": 0.5,
         "repairs": [], "after_repair_of": "shenzhen"},
    ]  # fmt: skip
    lines = [line for line in report.summary_lines(rep) if "repair" in line]
    assert len(lines) == 3, lines
    assert lines[0].startswith("  shenzhen (survivor) still lacked rows after hints (shard 2")
    assert "on shenzhen-a done in 21s" in lines[0] and "chains verified after 88s" in lines[0]
    assert lines[1] == "    left out (down), not repaired: cassandra@beijing-b"
    assert lines[2].startswith("  shanghai (restored) was read after the repair from shenzhen")


def test_the_timeline_page_is_self_contained_and_marks_the_fault(tmp_path: Path) -> None:
    secs = timeline.per_second(synthetic(10.0, 14.0), 40.0)
    rep = fake_report(secs, ok=True)
    path = report.write_html(rep, secs, tmp_path)
    page = path.read_text()
    assert page.count("<svg") == 5
    assert not re.search(r"<script|<link|\bsrc=|\bhref=|@import|url\(", page)
    assert re.findall(r"https?://[^\"' ]+", page) == ["http://www.w3.org/2000/svg"] * 5
    assert "fault 10.0s - 20.0s" in page
    assert "recovered (+4.0s)" in page
    assert "&lt;beijing&gt;" in page and "start &lt;b&gt;" in page  # escaped
    assert json.loads(report.write_json(rep, tmp_path).read_text())["lost"] == 0


def test_pause_and_resume_name_only_the_processes_they_changed(
    topo: topology.Topology, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lc = LocalCluster(topo, Paths.default(tmp_path), progress=lambda _: None)
    states = {c.label: "up" for c in lc.select("shenzhen")}
    states["switch@shenzhen-b"] = "down"
    signalled: list[tuple[str, int]] = []

    def state(m: Any) -> Any:
        label = f"{m.kind}@{m.name}"
        return SimpleNamespace(state=states.get(label, "down"), alive=states.get(label) != "down")

    def signal_proc(m: Any, sig: int) -> bool:
        label = f"{m.kind}@{m.name}"
        signalled.append((label, sig))
        states[label] = "paused" if sig == signal.SIGSTOP else "up"
        return True

    monkeypatch.setattr(cluster_mod.procs, "state", state)
    monkeypatch.setattr(cluster_mod.procs, "signal_proc", signal_proc)
    first = lc.pause("etcd@shenzhen-a")
    assert first == ["etcd@shenzhen-a"] and lc.pause("etcd@shenzhen-a") == []
    assert len(signalled) == 1  # the second pause sent nothing
    assert lc.resume("shenzhen") == ["etcd@shenzhen-a"]  # not the running or the down ones
    assert lc.resume("shenzhen") == []
    assert [sig for _, sig in signalled] == [signal.SIGSTOP, signal.SIGCONT]


def test_a_long_step_is_said_when_it_starts_and_again_when_it_ends(tmp_path: Path) -> None:
    """A drill's progress reads in time order: "start shanghai ..." before the 30 s the
    start takes (and whatever is printed meanwhile), "done in" after it."""
    said: list[str] = []

    class SlowCluster:
        paths = SimpleNamespace(state=tmp_path)

        def start(self, target: str) -> list[str]:
            said.append("(meanwhile)")
            time.sleep(1.1)
            return [f"switch@{target}-a"]

        def kill(self, target: str) -> list[str]:
            return []

    opts = DrillOptions("kill-zone", out=tmp_path / "out")
    d = Drill(SlowCluster(), opts, None, said.append)  # type: ignore[arg-type]
    d.step(scenarios.Step("start", "shanghai"))
    d.step(scenarios.Step("kill", "shenzhen"))
    assert said[0].endswith("start shanghai ...") and said[1] == "(meanwhile)"
    assert "start shanghai done in " in said[2] and said[2].endswith(": switch@shanghai-a")
    assert said[3].endswith("kill shenzhen ...")
    assert said[4].endswith("kill shenzhen: nothing (already in that state)")
    what = [e["what"] for e in d.events]
    assert what[0] == "start shanghai" and what[1].startswith("start shanghai done in ")
    assert what[2:] == ["kill shenzhen: nothing (already in that state)"]
    assert d.events[0]["t"] < d.events[1]["t"]
    d.log.close()


def test_status_names_cassandra_s_own_log(topo: topology.Topology, tmp_path: Path) -> None:
    """The log an SRE is sent to for a Cassandra node is system.log (the runbook's), not
    the JVM's stdout.log, which stops being written once logging is set up."""
    lc = LocalCluster(topo, Paths.default(tmp_path), progress=lambda _: None)
    logs = {c.label: c.log for c in lc.components()}
    cass = [label for label in logs if label.startswith("cassandra@")]
    assert cass and all(logs[label].name == "system.log" for label in cass)
    assert all(logs[label].parent.name == "logs" for label in cass)
    assert logs["switch@beijing-a"].name == "switch.log"
