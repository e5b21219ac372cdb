"""Settlement windows and the auditor's view, on the real cluster.

* Windows are closed twice while clients in every zone keep paying: every decided
  payment is in exactly one window (or the still-open one), each window's clearing nets
  to zero and matches its own decisions, every payment a client saw decided is in the
  ledger, and an exported window verifies offline; one byte changed in it does not.
* A city's Cassandra is down while a window fills and closes, with hinted handoff off,
  so its replica lacks the window's rows: the cross-city check names that city and
  rows, and after a repair the three cities agree again.
* A stored entry changed in place is caught by the chain verification.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import pytest

from clearing.v1 import audit_pb2, audit_pb2_grpc, common_pb2, settlement_pb2, settlement_pb2_grpc
from clearinghouse.audit.verify import verify_export
from clearinghouse.domain.entries import KIND_DECISION, Decision
from clearinghouse.domain.merkle import verify_inclusion
from clearinghouse.ledger_view import read_ledger, read_window
from clearinghouse.storage.ledger import CassandraLedger
from clearinghouse.storage.windows import CassandraWindows
from clearinghouse.switch.records import payment_key
from tests.support import SwitchEnv, eventually, session_preferring

pytestmark = pytest.mark.cluster

CLEAR_TIMEOUT_S = 90.0
COMPARE_RETRY_S = 90.0
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
        for w in (first, second):
            data = read_window(ledger, windows, w)
            decisions = [e for es in data.entries_by_shard.values() for e in es
                         if e.kind == KIND_DECISION]  # fmt: skip
            seen.update(e.payment_key for e in decisions)
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
    # Every payment a client saw decided before the second close is in one of them or
    # in the open window; none is lost.
    with session_preferring(env.lc, "shanghai") as s:
        everything = read_ledger(CassandraLedger(s))
    for key, payment in flow.told.items():
        assert payment.state in FINAL
        assert key in everything.decided, f"{key} acknowledged but not in the ledger"

    # The auditor exports the first window and checks it offline; a changed byte fails.
    _, audit = stubs(env, "shanghai-b")
    out = tmp_path / f"window-{first}"
    for chunk in audit.ExportWindow(audit_pb2.ExportWindowRequest(window_id=first), timeout=120):
        path = out / chunk.path
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("ab") as f:
            f.write(chunk.data)
    assert verify_export(out).ok
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
        assert env.lc.start(f"cassandra@{lost}") == [f"cassandra@{lost}"]
        _, audit = stubs(env, "shanghai-b")
        cmp = compare(audit, window)
        print({c.city: (c.entry_count, c.error[:80], len(c.differing_rows)) for c in cmp.cities})
        assert not cmp.agree
        shenzhen = next(c for c in cmp.cities if c.city == "shenzhen")
        assert shenzhen.error or shenzhen.differing_rows, shenzhen
        others = [c for c in cmp.cities if c.city != "shenzhen"]
        assert all(not c.error and not c.differing_rows for c in others), others
        assert len({c.merkle_root for c in others}) == 1
        # Repair brings shenzhen's replica back in line with the other two.
        repair = env.lc.nodetool(lost, "repair", "-full", env.lc.topo.keyspace.name,
                                 timeout_s=300)  # fmt: skip
        assert repair.returncode == 0, repair.stderr[-2000:]
        again = compare(audit, window)
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
        row = s.execute(
            "SELECT epoch, block, body FROM ledger_entries WHERE shard = %s AND seq = %s "
            "ALLOW FILTERING", (shard, seq),
        ).one()  # fmt: skip
        changed = bytearray(row.body)
        changed[-1] ^= 0x01
        stmt = ("UPDATE ledger_entries SET body = %s WHERE shard = %s AND epoch = %s "
                "AND block = %s AND seq = %s")  # fmt: skip
        s.execute(stmt, (bytes(changed), shard, row.epoch, row.block, seq))
        try:
            after = audit.VerifyChains(audit_pb2.VerifyChainsRequest(shards=[shard]), timeout=60)
            assert not after.reports[0].ok
            assert str(seq) in after.reports[0].problem
        finally:
            s.execute(stmt, (row.body, shard, row.epoch, row.block, seq))
    restored = audit.VerifyChains(audit_pb2.VerifyChainsRequest(shards=[shard]), timeout=60)
    assert restored.reports[0].ok
