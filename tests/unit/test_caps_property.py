"""Net debit caps under random runs of one shard owner's operations (over the fakes).

Begins (debits and credits of a capped payer over three shards), decisions (some queued
before a cut and applied after it, the window settled in between), cuts, settlements in
any order, headroom given back, takeovers by nodes that did or did not hear of the
settlements. After every step, for every shard: its exposure and allowance equal what
the chain says (in flight + each unsettled window's positive net; loans received less
returned), a new owner replaying the chain gets the same exposure, exposure <= allowance,
and the allowances sum to at most the home shard's loans, which never exceed the cap.
(Written by a reviewer of the change that made settlement free the caps.)
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import replace
from itertools import count

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hst

from clearinghouse.domain import InsufficientLiquidity, PaymentOrder
from clearinghouse.domain import PaymentState as S
from clearinghouse.domain.entries import (
    KIND_CAP_RECEIVE,
    KIND_CAP_RETURN,
    KIND_DECISION,
    KIND_INTENT,
    KIND_WINDOW_CUT,
    CapTransfer,
    Decision,
    cap_key,
)
from clearinghouse.switch import shards
from clearinghouse.switch.records import StepRecord
from tests.unit.test_shards import (
    BANK,
    CNY,
    OTHER_SHARD,
    SHARD,
    SMALL,
    SMALL_CAP,
    SPARE_SHARDS,
    Node,
    World,
    debit,
    decision_step,
    ids_in,
)

pytestmark = pytest.mark.unit
# Random runs per test run (the reviewer ran 1,500 once, all passing).
RUNS = 200
SH = [SHARD, OTHER_SHARD, SPARE_SHARDS[0]]
KEY = (SMALL, CNY)

op = hst.one_of(
    hst.tuples(hst.just("pay"), hst.sampled_from(SH), hst.integers(1, 600), hst.booleans()),
    hst.tuples(hst.just("decide"), hst.integers(0, 50), hst.booleans()),
    hst.tuples(hst.just("cut")),
    hst.tuples(hst.just("split"), hst.integers(0, 50), hst.booleans(), hst.booleans()),
    hst.tuples(hst.just("settle"), hst.integers(0, 50)),
    hst.tuples(hst.just("give_back")),
    hst.tuples(hst.just("takeover"), hst.sampled_from(SH), hst.booleans()),
    hst.tuples(hst.just("lost_loan"), hst.sampled_from(SH), hst.integers(1, 600)),
    hst.tuples(hst.just("resend")),
)


def truth(world: World, shard: int, settled: frozenset[int]) -> tuple[int, int]:
    """From the chain: SMALL's exposure and allowance in CNY in ``shard``."""
    orders: dict[str, PaymentOrder] = {}
    decided: set[str] = set()
    nets: defaultdict[int, defaultdict[tuple[str, str], int]] = defaultdict(
        lambda: defaultdict(int)
    )
    w, allowance = 1, 0
    for e in world.chain(shard):
        if e.kind == KIND_INTENT:
            orders[e.payment_key] = shards._record_of_intent(e.body, shard, e.seq, 1).order
        elif e.kind == KIND_DECISION:
            decided.add(e.payment_key)
            o = orders[e.payment_key]
            if Decision.decode(e.body, e.payment_key).state is S.APPROVED:
                nets[w][(o.payer_id, CNY)] += o.amount.amount_minor
                nets[w][(o.payee_id, CNY)] -= o.amount.amount_minor
        elif e.kind == KIND_WINDOW_CUT:
            w += 1
        elif e.kind in (KIND_CAP_RECEIVE, KIND_CAP_RETURN):
            t = CapTransfer.decode(e.body)
            if (t.participant_id, t.currency) == KEY:
                allowance += t.amount_minor if e.kind == KIND_CAP_RECEIVE else -t.amount_minor
    inflight = sum(
        o.amount.amount_minor for k, o in orders.items() if k not in decided and o.payer_id == SMALL
    )
    exposure = inflight + sum(
        max(n[KEY], 0) for wid, n in nets.items() if wid not in settled or wid >= w
    )
    return exposure, allowance


@settings(max_examples=RUNS, deadline=None, suppress_health_check=list(HealthCheck))
@given(hst.lists(op, min_size=1, max_size=40))
def test_random_runs_keep_the_cap(ops: list[tuple[object, ...]]) -> None:
    world = World()
    try:
        nodes: list[Node] = [world.node("n0")]
        owner = {s: nodes[0] for s in SH}
        epoch = {s: 10 for s in SH}
        for s in SH:
            assert nodes[0].take(s, 10)
        ids = count()
        inflight: list[tuple[int, str]] = []
        last_cut, settled = 0, set[int]()
        for o in ops:
            if o[0] == "pay":
                _, s, amt, credit = o
                (pid,) = ids_in(s, 1, prefix=f"x{next(ids)}")
                order = debit(pid, amt, payer=SMALL)
                if credit:
                    order = replace(order, payer_id=BANK, payee_id=SMALL)
                try:
                    owner[s].begin(order)
                    inflight.append((s, pid))
                except InsufficientLiquidity:
                    pass
            elif o[0] == "decide" and inflight:
                s, pid = inflight.pop(o[1] % len(inflight))
                rec = owner[s].load(pid)
                owner[s].store.decide(rec, shards_step(o[2], world), [], reversal_owed=False)
            elif o[0] == "split" and inflight:
                # a decision queued before a cut, applied after the cut (and settlement)
                s, pid = inflight.pop(o[1] % len(inflight))
                rec = owner[s].load(pid)
                h = owner[s].store._decide_start(rec, shards_step(o[2], world), [], False)
                last_cut += 1
                for n in set(owner.values()):
                    n.store.cut_window(last_cut)
                if o[3]:
                    settled.add(last_cut)
                    for n in nodes:
                        n.store.release_settled(settled)
                owner[s].store._decide_finish(h)
            elif o[0] == "cut":
                last_cut += 1
                for n in set(owner.values()):
                    n.store.cut_window(last_cut)
            elif o[0] == "settle" and last_cut:
                settled.add(o[1] % last_cut + 1)
                for n in nodes:
                    n.store.release_settled(settled)
            elif o[0] == "give_back":
                for n in set(owner.values()):
                    n.store.give_back()
            elif o[0] == "lost_loan":
                # A loan granted to the shard's owner whose answer never reached it (or
                # whose receipt was never written): lent at the home shard, received nowhere.
                _, s, amt = o
                with contextlib.suppress(InsufficientLiquidity):
                    world.borrow(SMALL, CNY, s, amt, epoch[s])
            elif o[0] == "resend":  # returns, and loans received at earlier epochs
                for n in set(owner.values()):
                    n.store.resend_returns()
            elif o[0] == "takeover":
                _, s, heard = o
                new = world.node(f"n{len(nodes)}")
                nodes.append(new)
                if heard:
                    new.store.release_settled(settled)
                owner[s].store.lose(s)
                epoch[s] += 1
                assert new.take(s, epoch[s])
                owner[s] = new
                new.store.release_settled(settled)
                # the resolver of this test: in-flight payments are still decidable
            fs = frozenset(settled)
            total_exposure = total_allowance = 0
            for s in SH:
                st = owner[s].store._shards[s]
                exp, allow = truth(world, s, fs)
                assert st.exposure.get(KEY, 0) == exp, (s, o)
                assert st.allowance.get(KEY, 0) == allow, (s, o)
                assert exp <= allow, (s, o)
                fresh = shards._Shard(s, 99)
                for e in world.chain(s):
                    owner[s].store._replay_entry(fresh, e)
                fresh.release(fs)
                assert fresh.exposure.get(KEY, 0) == exp
                total_exposure += exp
                total_allowance += allow
            home = world.lender.store._shards[shards.home_shard(*KEY)]
            assert total_exposure <= total_allowance <= home.lent[KEY] <= SMALL_CAP
        # Every shard taken over once more and every return and receipt told: the home
        # shard's loans are the allowances, but for loans to shards whose chain received
        # none of this cap (a reclaim is told by an owner that found receipts).
        for s in SH:
            new = world.node(f"n{len(nodes)}")
            nodes.append(new)
            owner[s].store.lose(s)
            epoch[s] += 1
            assert new.take(s, epoch[s])
            owner[s] = new
            new.store.release_settled(settled)
            new.store.resend_returns()
        home = world.lender.store._shards[shards.home_shard(*KEY)]
        allowances = sum(owner[s].store._shards[s].allowance.get(KEY, 0) for s in SH)
        unclaimed = sum(
            home.lent_to((*KEY, s)) - home.reclaimed[(*KEY, s)]
            for s in SH
            if not any(
                e.kind == KIND_CAP_RECEIVE and e.payment_key == cap_key(*KEY)
                for e in world.chain(s)
            )
        )
        assert home.lent[KEY] == allowances + unclaimed
    finally:
        for n in world.nodes:
            n.store.committer.stop()


def shards_step(approve: object, world: World) -> StepRecord:
    return decision_step(S.APPROVED if approve else S.DECLINED, world.clock())
