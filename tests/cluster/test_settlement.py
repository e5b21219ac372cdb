"""Settlement windows and the auditor's view, on the real cluster.

* Windows are closed twice while clients in every zone keep paying: every decided
  payment is in exactly one window, each window's clearing nets to zero and matches its
  own decisions, every payment a client was told is decided has its decision in exactly
  one of the two windows or the still-open tail (by its shard and seq against the
  cuts; the audit's payment history names the same window), and an exported window has
  the stored Merkle root and verifies offline; one byte changed in it does not.
* A city's Cassandra is down while a window fills and closes, with hinted handoff off,
  so its replica lacks the window's rows: once the city can be read, the cross-city
  check names that city and rows it lacks (all of them rows of that window), and after
  a repair the three cities agree again.
* A stored entry changed in place is caught by the chain verification.
* A participant at its net debit cap is refused until the window holding its payments
  is SETTLED; then the cap can be used again in full, in any shard (the shards give
  their unused headroom back to the participant's home shard).
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import pytest

from clearing.v1 import audit_pb2, audit_pb2_grpc, common_pb2, settlement_pb2, settlement_pb2_grpc
from clearinghouse.audit.export import read_manifest
from clearinghouse.audit.verify import verify_export
from clearinghouse.client import error_details
from clearinghouse.domain.entries import KIND_DECISION, Decision
from clearinghouse.domain.merkle import verify_inclusion
from clearinghouse.ledger_view import read_ledger, read_window
from clearinghouse.storage.ledger import CassandraLedger, encode_run
from clearinghouse.storage.windows import CassandraWindows
from clearinghouse.switch.records import SHARD_COUNT, payment_key, shard_of
from clearinghouse.switch.shards import read_chain
from tests.support import SwitchEnv, eventually, session_preferring

pytestmark = pytest.mark.cluster

CLEAR_TIMEOUT_S = 90.0
# How long the nodes may take to see a window SETTLED and give the headroom back.
SETTLED_SEEN_S = 30.0
COMPARE_RETRY_S = 90.0
# Payments per window (and of the open tail) whose history is asked of the audit service.
HISTORY_SAMPLE_PER_WINDOW = 3
MISSING_ROW = re.compile(r"shard (\d+) seq (\d+): missing")
FINAL = {
    common_pb2.PAYMENT_STATE_APPROVED, common_pb2.PAYMENT_STATE_DECLINED,
    common_pb2.PAYMENT_STATE_FAILED, common_pb2.PAYMENT_STATE_REVERSED,
}  # fmt: skip


def compare(audit: Any, window: int) -> Any:
    """CompareCities, retried while the cluster is still settling after a fault."""
    deadline = time.monotonic() + COMPARE_RETRY_S
    while True:
        try:
            return audit.CompareCities(audit_pb2.CompareCitiesRequest(window_id=window),
                                       timeout=120)  # fmt: skip
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise
            time.sleep(2)


def compare_when_readable(audit: Any, window: int) -> Any:
    """CompareCities once every city's replica can be read (a node that has just started
    may refuse reads for a while); the last answer after COMPARE_RETRY_S."""
    deadline = time.monotonic() + COMPARE_RETRY_S
    while True:
        r = compare(audit, window)
        if all(not c.error for c in r.cities) or time.monotonic() > deadline:
            return r
        time.sleep(2)


def stubs(env: SwitchEnv, zone: str) -> tuple[Any, Any]:
    ch = env.clients[zone].channel
    return (settlement_pb2_grpc.SettlementServiceStub(ch), audit_pb2_grpc.AuditServiceStub(ch))


def close_and_wait_cleared(env: SwitchEnv, zone: str) -> int:
    settle, audit = stubs(env, zone)
    w = settle.CloseWindow(settlement_pb2.CloseWindowRequest(reason="test"), timeout=10).window_id

    def cleared() -> bool:
        r = audit.GetWindow(audit_pb2.GetWindowRequest(window_id=w), timeout=10)
        return r.summary.state in ("CLEARED", "SETTLED")

    assert eventually(cleared, CLEAR_TIMEOUT_S, every_s=1), f"window {w} never cleared"
    return int(w)


class Flow:
    """Clients in every zone paying until stopped; what each was told is kept."""

    def __init__(self, env: SwitchEnv) -> None:
        self.env = env
        self.stop = threading.Event()
        self.told: dict[str, Any] = {}
        self.threads = [
            threading.Thread(target=self._run, args=(z.name,)) for z in env.lc.topo.zones
        ]

    def _run(self, zone: str) -> None:
        while not self.stop.is_set():
            o = self.env.order(payer_id="BANK_FLAKY")
            try:
                r, _ = self.env.submit_until_final([zone], o, budget_s=30)
                self.told[payment_key(o.institution_id, o.payment_id)] = r.payment
            except grpc.RpcError:
                pass

    def __enter__(self) -> Flow:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)


def test_windows_closed_under_load_lose_and_double_count_nothing(
    switch_env: SwitchEnv, tmp_path: Path
) -> None:
    env = switch_env
    with Flow(env) as flow:
        time.sleep(3)
        first = close_and_wait_cleared(env, "shanghai-a")
        time.sleep(3)
        second = close_and_wait_cleared(env, "shenzhen-b")
        time.sleep(1)
    assert second == first + 1
    assert len(flow.told) > 20, "too few payments to test anything"

    with session_preferring(env.lc, "beijing") as s:
        ledger, windows = CassandraLedger(s), CassandraWindows(s)
        seen: Counter[str] = Counter()
        in_window: dict[int, set[str]] = {}
        for w in (first, second):
            data = read_window(ledger, windows, w)
            decisions = [e for es in data.entries_by_shard.values() for e in es
                         if e.kind == KIND_DECISION]  # fmt: skip
            seen.update(e.payment_key for e in decisions)
            in_window[w] = {e.payment_key for e in decisions}
            # The stored clearing is the clearing of exactly these decisions.
            _, audit = stubs(env, "beijing-b")
            got = audit.GetWindow(audit_pb2.GetWindowRequest(window_id=w), timeout=30)
            nets: Counter[tuple[str, str]] = Counter()
            for e in decisions:
                for p in Decision.decode(e.body, e.payment_key).postings:
                    nets[(p.participant_id, p.currency)] += p.debit_minor - p.credit_minor
            assert {(n.participant_id, n.net_debit.currency): n.net_debit.amount_minor
                    for n in got.net_positions if n.net_debit.amount_minor} == {
                k: v for k, v in nets.items() if v}  # fmt: skip
            by_ccy: Counter[str] = Counter()
            for n in got.net_positions:
                by_ccy[n.net_debit.currency] += n.net_debit.amount_minor
            assert all(v == 0 for v in by_ccy.values()), by_ccy
            assert got.payment_count == len(decisions)
    assert max(seen.values()) == 1, "a payment counted in two windows"
    # Every payment a client was told is decided has its DECISION in exactly one of the
    # two windows or in the still-open tail, by its (shard, seq) against the cuts of the
    # window before the first, the first and the second; none is lost.
    with session_preferring(env.lc, "shanghai") as s:
        ledger, windows = CassandraLedger(s), CassandraWindows(s)
        everything = read_ledger(ledger)
        cuts = {w: windows.cuts(w) for w in (first - 1, first, second) if w > 0}
        decided_at: dict[str, tuple[int, int]] = {}
        for shard in range(SHARD_COUNT):
            chain, _ = read_chain(ledger, shard)
            for e in chain:
                if e.kind == KIND_DECISION and e.payment_key in flow.told:
                    assert e.payment_key not in decided_at, f"{e.payment_key}: two decisions"
                    decided_at[e.payment_key] = (e.shard, e.seq)
    for w, window_cuts in cuts.items():
        assert sorted(window_cuts) == list(range(SHARD_COUNT)), f"window {w} lacks cuts"
    holding: dict[str, int] = {}  # payment key -> its window (0: the open tail)
    for key, payment in flow.told.items():
        assert payment.state in FINAL
        assert key in everything.decided, f"{key} acknowledged but not in the ledger"
        shard, seq = decided_at[key]
        start = cuts[first - 1][shard].seq if first > 1 else 0
        places = {
            first: start < seq <= cuts[first][shard].seq,
            second: cuts[first][shard].seq < seq <= cuts[second][shard].seq,
            0: cuts[second][shard].seq < seq,
        }
        assert sum(places.values()) == 1, (key, shard, seq, places)
        holding[key] = next(w for w, inside in places.items() if inside)
        for w in (first, second):
            assert (key in in_window[w]) == (holding[key] == w), (key, holding[key])
    assert {first, second} <= set(holding.values()), "a window without a told payment"
    # The audit service names the same window (a few payments of each).
    _, audit = stubs(env, "beijing-a")
    for w in (first, second, 0):
        for key in sorted(k for k, h in holding.items() if h == w)[:HISTORY_SAMPLE_PER_WINDOW]:
            inst, _, pid = key.partition("/")
            h = audit.GetPaymentHistory(
                audit_pb2.GetPaymentHistoryRequest(institution_id=inst, payment_id=pid),
                timeout=60,
            )
            assert h.window_id == w, (key, h.window_id, w)

    # The auditor exports the first window and checks it offline, against the root that
    # another city's node stored; a changed byte fails.
    _, audit = stubs(env, "shanghai-b")
    out = tmp_path / f"window-{first}"
    for chunk in audit.ExportWindow(audit_pb2.ExportWindowRequest(window_id=first), timeout=120):
        path = out / chunk.path
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("ab") as f:
            f.write(chunk.data)
    _, elsewhere = stubs(env, "shenzhen-b")
    stored = elsewhere.GetWindow(audit_pb2.GetWindowRequest(window_id=first), timeout=30)
    assert len(stored.merkle_root) == 32
    assert read_manifest(out).merkle_root == stored.merkle_root
    assert verify_export(out, expected_root=stored.merkle_root).ok
    assert (out / "clearing.json").read_text() == stored.clearing_json
    entries = out / "entries.jsonl"
    raw = bytearray(entries.read_bytes())
    marker = b'"body_b64":"'
    i = raw.index(marker) + len(marker) + 2
    raw[i] = ord("A") if raw[i] != ord("A") else ord("B")
    entries.write_bytes(bytes(raw))
    assert not verify_export(out).ok

    # An inclusion proof for an approved payment of the first window verifies.
    key = next(k for k in seen if k in flow.told)
    inst, _, pid = key.partition("/")
    proof = audit.GetInclusionProof(
        audit_pb2.GetInclusionProofRequest(institution_id=inst, payment_id=pid), timeout=60
    )
    assert verify_inclusion(proof.entry.entry_hash, proof.leaf_index, proof.tree_size,
                            list(proof.audit_path), proof.merkle_root)  # fmt: skip
    assert proof.window_id == holding[key]


def test_a_city_that_missed_a_window_is_named_then_converges(switch_env: SwitchEnv) -> None:
    env = switch_env
    lost = "shenzhen-a"  # the Cassandra node of shenzhen
    zones = [z.name for z in env.lc.topo.zones]
    for z in ("beijing-a", "shanghai-a", lost):
        assert env.lc.nodetool(z, "disablehandoff").returncode == 0
    try:
        assert env.lc.kill(f"cassandra@{lost}") == [f"cassandra@{lost}"]
        via = [z for z in zones if not z.startswith("shenzhen")]
        for i in range(12):
            env.submit_until_final(via[i % 4:] + via[:i % 4], env.order(payer_id="BANK_FLAKY"),
                                   budget_s=60)  # fmt: skip
        window = close_and_wait_cleared(env, "beijing-b")
        # The window's rows, read while shenzhen is still down: a QUORUM read with it up
        # could repair rows into its replica before they are compared.
        with session_preferring(env.lc, "beijing") as s:
            data = read_window(CassandraLedger(s), CassandraWindows(s), window)
        positions = {(e.shard, e.seq) for es in data.entries_by_shard.values() for e in es}
        assert env.lc.start(f"cassandra@{lost}") == [f"cassandra@{lost}"]
        _, audit = stubs(env, "shanghai-b")
        cmp = compare_when_readable(audit, window)
        print({c.city: (c.entry_count, c.error[:80], len(c.differing_rows)) for c in cmp.cities})
        assert not cmp.agree
        shenzhen = next(c for c in cmp.cities if c.city == "shenzhen")
        assert not shenzhen.error, f"shenzhen never became readable: {shenzhen.error}"
        assert shenzhen.differing_rows, "shenzhen lacks the window's rows, but none is named"
        for row in shenzhen.differing_rows:
            m = MISSING_ROW.fullmatch(row)
            assert m is not None, f"not a row shenzhen lacks: {row}"
            assert (int(m[1]), int(m[2])) in positions, f"not a row of window {window}: {row}"
        assert shenzhen.entry_count == len(positions) - len(shenzhen.differing_rows)
        others = [c for c in cmp.cities if c.city != "shenzhen"]
        assert all(not c.error and not c.differing_rows for c in others), others
        assert len({c.merkle_root for c in others}) == 1
        assert {c.entry_count for c in others} == {len(positions)}
        # Repair (what `clearingctl cluster repair shenzhen` runs) brings shenzhen's
        # replica back in line with the other two.
        repairs = env.lc.repair(env.lc.topo.zone(lost).city)
        assert lost in [r.zone for r in repairs] and all(r.ok for r in repairs), repairs
        again = compare_when_readable(audit, window)
        assert again.agree, [(c.city, c.error, c.differing_rows[:3]) for c in again.cities]

    finally:
        env.lc.start(f"cassandra@{lost}")
        for z in ("beijing-a", "shanghai-a", lost):
            env.lc.nodetool(z, "enablehandoff")


def test_an_entry_changed_in_place_breaks_its_chain(switch_env: SwitchEnv) -> None:
    env = switch_env
    r = env.submit("beijing-a", env.order(payer_id="BANK_FLAKY"))
    shard, seq = r.payment.shard, r.payment.ledger_seq
    _, audit = stubs(env, "shenzhen-b")
    before = audit.VerifyChains(audit_pb2.VerifyChainsRequest(shards=[shard]), timeout=60)
    assert before.reports[0].ok
    with session_preferring(env.lc, "beijing") as s:
        reader = CassandraLedger(s)
        chain, _ = read_chain(reader, shard)
        (entry,) = [e for e in chain if e.seq == seq]
        run = reader.locate(shard, entry.epoch, seq)
        assert run is not None, f"no stored run holds shard {shard} seq {seq}"
        stored = encode_run(run.entries)
        # One byte of the entry's body, inside the stored run.
        changed = bytearray(stored)
        changed[stored.index(entry.body) + len(entry.body) - 1] ^= 0x01
        stmt = ("UPDATE ledger_stream SET run_bytes = %s WHERE stream = %s AND block = %s "
                "AND shard = %s AND epoch = %s AND first_seq = %s")  # fmt: skip
        s.execute(stmt, (bytes(changed), *run.key))
        try:
            after = audit.VerifyChains(audit_pb2.VerifyChainsRequest(shards=[shard]), timeout=60)
            assert not after.reports[0].ok
            assert str(seq) in after.reports[0].problem
        finally:
            s.execute(stmt, (stored, *run.key))
    restored = audit.VerifyChains(audit_pb2.VerifyChainsRequest(shards=[shard]), timeout=60)
    assert restored.reports[0].ok


def test_a_settled_window_gives_the_whole_cap_back_to_every_shard(switch_env: SwitchEnv) -> None:
    env = switch_env
    zones = [z.name for z in env.lc.topo.zones]
    cap = 10_000
    inst = env.register_capped_institution("INST_SETL", "settles", cap)

    def payout(amount: int) -> Any:
        return env.order(institution_id=inst, type=common_pb2.PAYMENT_TYPE_CREDIT, payer_id=inst,
                         payee_id="BANK_FLAKY", memo="payout",
                         amount=common_pb2.Money(amount_minor=amount, currency="CNY"))  # fmt: skip

    def refused(order: Any, zone: str) -> bool:
        try:
            env.submit(zone, order)
        except grpc.RpcError as e:
            err = error_details(e)
            assert e.code() is grpc.StatusCode.FAILED_PRECONDITION, e
            assert err is not None and err.reason == "NET_DEBIT_CAP_EXCEEDED", err
            return True
        return False

    first = payout(cap)
    assert env.submit(zones[0], first).payment.state == common_pb2.PAYMENT_STATE_APPROVED
    assert refused(payout(1), zones[1])
    window = close_and_wait_cleared(env, zones[2])
    assert refused(payout(1), zones[3]), "cleared but not settled: the position is still owed"

    settle, audit = stubs(env, zones[4])
    r = settle.ConfirmSettlement(
        settlement_pb2.ConfirmSettlementRequest(window_id=window, reference="RTGS-TEST-1"),
        timeout=10,
    )
    assert r.confirmed_now

    # The whole cap again, in another shard than the one that held it: a refusal writes
    # nothing, so the same order is sent until the headroom is back at the home shard.
    again = next(o for o in (payout(cap) for _ in range(64))
                 if shard_of(inst, o.payment_id) != shard_of(inst, first.payment_id))  # fmt: skip
    assert eventually(lambda: not refused(again, zones[5]), SETTLED_SEEN_S, every_s=1), (
        "the settled window's headroom never came back"
    )
    got = env.submit(zones[5], again)
    assert got.replayed and got.payment.state == common_pb2.PAYMENT_STATE_APPROVED
    assert refused(payout(1), zones[0]), "the cap binds again"
    # The ledger says the same: the settled window holds the first payout, what is owed
    # since is the second.
    with session_preferring(env.lc, "shanghai") as s:
        summary = read_ledger(CassandraLedger(s))
    assert summary.window_totals[window][(inst, "CNY")] == [cap, 0]
    assert summary.net(inst, "CNY") == 2 * cap
    summary_window = audit.GetWindow(audit_pb2.GetWindowRequest(window_id=window), timeout=30)
    assert summary_window.summary.state == "SETTLED"
