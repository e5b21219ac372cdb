"""The pure pieces of one node: decide, the lease clock, holdings, the view, the core."""

from __future__ import annotations

import pytest

from clearinghouse import InvariantViolation
from clearinghouse.ownership.holdings import Holdings, LeaseClock
from clearinghouse.ownership.node import (
    ClaimShards,
    DeleteClaim,
    Gained,
    GrantLease,
    Lost,
    NodeCore,
    Register,
    RevokeLease,
    Timing,
)
from clearinghouse.ownership.placement import NodeInfo, assign
from clearinghouse.ownership.protocol import (
    Claim,
    Member,
    ProtocolConfig,
    Release,
    ShardClaim,
    decide,
)
from clearinghouse.ownership.view import KeyRecord, View, encode_member, node_key, shard_key

pytestmark = pytest.mark.unit

A = NodeInfo("beijing-a", "beijing-a", "beijing")
B = NodeInfo("shanghai-a", "shanghai-a", "shanghai")
C = NodeInfo("shenzhen-a", "shenzhen-a", "shenzhen")
CFG = ProtocolConfig(
    shard_count=16,
    release_grace_s=5.0,
    claim_batch_max=4,
    release_batch_max=2,
    join_settle_s=2.0,
    join_settle_max_s=6.0,
)


def members(*infos: NodeInfo, since: float = 0.0) -> list[Member]:
    return [Member(i, since) for i in infos]


# -- decide -------------------------------------------------------------------------------


def test_claims_only_absent_shards_that_placement_gives_me_in_capped_batches() -> None:
    target = assign(16, [A, B])
    mine = [s for s in range(16) if target[s] == A.node_id]
    taken = {mine[0]: ShardClaim(B.node_id, 7)}
    actions = decide(A.node_id, members(A, B), taken, now=100.0, config=CFG)
    assert actions == [Claim(s) for s in mine[1:5]]


def test_releases_only_once_the_newest_member_has_been_seen_for_the_grace() -> None:
    target = assign(16, [A, B, C])
    all_mine = {s: ShardClaim(A.node_id, 10 + s) for s in range(16)}
    not_mine = [s for s in range(16) if target[s] != A.node_id]
    # B has been here long, C just came: C's arrival also moves shards between A and B,
    # and none of that may happen before C has stayed for the grace.
    joined = [Member(A, 0.0), Member(B, 0.0), Member(C, 100.0)]
    assert decide(A.node_id, joined, all_mine, now=104.9, config=CFG) == []
    later = decide(A.node_id, joined, all_mine, now=105.0, config=CFG)
    assert later == [Release(s) for s in not_mine[:2]]


def test_a_new_node_claims_once_the_membership_has_stayed_unchanged_for_the_settling() -> None:
    mine = [s for s, owner in assign(16, [A, B]).items() if owner == A.node_id]
    # A joined at 100, B at 102: A waits for the membership to stay as it is.
    joined = [Member(A, 100.0), Member(B, 102.0)]
    settle = CFG.join_settle_s
    assert decide(A.node_id, joined, {}, now=102.0 + settle - 0.1, config=CFG) == []
    assert decide(A.node_id, joined, {}, now=102.0 + settle, config=CFG) == [
        Claim(s) for s in mine[:4]
    ]


def test_a_new_node_in_a_stream_of_joins_claims_after_the_longest_settling() -> None:
    # A member joins every few seconds, so the membership never stays unchanged for the
    # settling; A claims anyway once it has been a member for the longest settling.
    joined = [Member(A, 100.0), Member(B, 100.0 + CFG.join_settle_max_s - 1.0)]
    start = 100.0 + CFG.join_settle_max_s
    assert decide(A.node_id, joined, {}, now=start - 0.1, config=CFG) == []
    assert decide(A.node_id, joined, {}, now=start, config=CFG) != []


def test_an_older_member_claims_a_departed_members_shards_at_once_despite_a_join() -> None:
    # C has just joined; A, a member for long, takes the shards nobody holds at once
    # (they are a departed member's: holding them back would keep them unserved).
    live = [Member(A, 0.0), Member(B, 0.0), Member(C, 100.0)]
    mine = [s for s, owner in assign(16, [A, B, C]).items() if owner == A.node_id]
    assert decide(A.node_id, live, {}, now=100.1, config=CFG) == [Claim(s) for s in mine[:4]]
    # C itself waits.
    assert decide(C.node_id, live, {}, now=100.1, config=CFG) == []


def test_never_claims_a_shard_whose_key_exists_even_from_a_dead_owner() -> None:
    claims = {s: ShardClaim("gone", s + 1) for s in range(16)}
    assert decide(A.node_id, members(A), claims, now=100.0, config=CFG) == []


def test_a_node_that_does_not_see_itself_does_nothing() -> None:
    assert decide(A.node_id, members(B), {}, now=100.0, config=CFG) == []


def test_others_shards_are_left_alone() -> None:
    claims = {s: ShardClaim(B.node_id, s + 1) for s in range(16)}
    assert decide(A.node_id, members(A, B), claims, now=100.0, config=CFG) == []


# -- the lease clock ----------------------------------------------------------------------


def test_the_deadline_counts_from_the_send_time_minus_the_margin() -> None:
    clock = LeaseClock(ttl_s=5.0, margin_s=1.0)
    assert not clock.valid(0.0)
    clock.on_ack(sent_at=10.0, granted_ttl_s=5.0)
    assert clock.deadline == 14.0
    assert clock.valid(13.99) and not clock.valid(14.0)
    clock.on_ack(sent_at=9.0, granted_ttl_s=5.0)  # an older answer never shortens it
    assert clock.deadline == 14.0
    clock.on_ack(sent_at=12.0, granted_ttl_s=60.0)  # more than asked: trust what was asked
    assert clock.deadline == 16.0


def test_an_expired_answer_is_not_an_acknowledgement() -> None:
    with pytest.raises(InvariantViolation):
        LeaseClock(5.0, 1.0).on_ack(0.0, 0)


# -- holdings -----------------------------------------------------------------------------


def holdings(lease: int = 0xA) -> Holdings:
    h = Holdings(A.node_id)
    h.start_lease(lease)
    return h


def test_a_claim_newer_than_the_view_is_not_lost_for_being_missing() -> None:
    h = holdings()
    assert h.gain(3, 50)
    assert h.reconcile({}, view_revision=49).lost == []
    assert h.reconcile({}, view_revision=50).lost == [3]


def test_a_given_up_key_is_never_taken_back_and_becomes_a_zombie() -> None:
    h = holdings()
    h.gain(3, 50)
    assert h.give_up(3) == 50
    view = {3: ShardClaim(A.node_id, 50, 0xA)}
    assert h.reconcile(view, view_revision=60).gained == []
    assert not h.gain(3, 50)
    assert h.zombies(view) == [(3, 50)]
    assert h.gain(3, 61)  # a new key of the shard is fine


def test_a_key_whose_claim_answer_was_lost_is_adopted() -> None:
    h = holdings()
    change = h.reconcile({4: ShardClaim(A.node_id, 70, 0xA)}, view_revision=70)
    assert change.gained == [(4, 70)]
    assert h.held() == {4: 70}


def test_keys_of_an_old_lease_are_zombies_not_holdings() -> None:
    h = holdings(lease=0xB)
    view = {5: ShardClaim(A.node_id, 20, 0xA), 6: ShardClaim(B.node_id, 21, 0xC)}
    assert h.reconcile(view, view_revision=30).gained == []
    assert h.zombies(view) == [(5, 20)]


def test_losing_the_lease_drops_everything() -> None:
    h = holdings()
    h.gain(1, 10)
    h.gain(2, 11)
    assert h.lose_all() == [1, 2]
    assert h.held() == {} and h.lease == 0


# -- the view -----------------------------------------------------------------------------


def rec(key: str, value: bytes, create: int, lease: int) -> KeyRecord:
    return KeyRecord(key, value, create, lease)


def member_rec(info: NodeInfo, lease: int, create: int = 2) -> KeyRecord:
    return rec(node_key("/clearing/", info.node_id), encode_member(info, "x:1"), create, lease)


def test_view_keeps_since_across_a_resync_but_not_across_a_new_lease() -> None:
    v = View()
    v.load(10, [member_rec(A, 0xA)], now=1.0)
    v.load(20, [member_rec(A, 0xA)], now=9.0)
    assert v.members() == [Member(A, 1.0)]
    v.apply(21, node_key("/clearing/", A.node_id), member_rec(A, 0xB), now=12.0)
    assert v.members() == [Member(A, 12.0)]
    assert v.address(A.node_id) == "x:1"


def test_view_names_the_zone_a_node_registered() -> None:
    """The router expects the certificate ``node:<zone>`` of a shard's owner: the zone
    comes from the owner's registration, whatever its node id."""
    other = NodeInfo("node-7", "shanghai-b", "shanghai")
    v = View()
    v.load(10, [member_rec(A, 0xA), member_rec(other, 0xB)], now=1.0)
    assert (v.zone(A.node_id), v.zone("node-7"), v.zone("unknown")) == (
        "beijing-a",
        "shanghai-b",
        None,
    )


def test_view_applies_claims_deletes_and_ignores_junk_and_the_past() -> None:
    v = View()
    v.load(10, [rec(shard_key("/clearing/", 7), b"beijing-a", 9, 0xA)], now=0.0)
    assert v.claims == {7: ShardClaim("beijing-a", 9, 0xA)}
    v.apply(9, shard_key("/clearing/", 7), None, now=0.0)  # before the listing: ignored
    assert 7 in v.claims
    v.apply(11, shard_key("/clearing/", 7), None, now=0.0)
    v.apply(12, "/clearing/shards/x1", rec("/clearing/shards/x1", b"?", 12, 0), now=0.0)
    v.apply(13, "/clearing/nodes/bad", rec("/clearing/nodes/bad", b"{", 13, 0), now=0.0)
    assert v.claims == {} and v.members() == [] and v.revision == 13


# -- the core -----------------------------------------------------------------------------

TIMING = Timing(lease_ttl_s=5, safety_margin_s=1.0, rpc_timeout_s=1.0)


def started_core(now: float = 0.0) -> NodeCore:
    core = NodeCore(A, View(), TIMING, CFG)
    assert core.step(now).requests == [GrantLease(5)]
    core.on_granted(0xA, 5.0, sent_at=now)
    assert core.step(now).requests == [Register(0xA)]
    core.on_registered(0xA, revision=2)
    core.view.load(2, [member_rec(A, 0xA)], now=now)
    return core


def test_a_lone_node_claims_in_batches_and_reports_what_it_won() -> None:
    core = started_core()
    assert core.step(0.1).requests == []  # it has only just joined: it lets others join
    step = core.step(CFG.join_settle_s)
    assert step.requests == [ClaimShards(0xA, (0, 1, 2, 3))]
    assert core.on_claimed(0xA, [(0, 3), (1, 3), (2, 3)], now=CFG.join_settle_s) == [
        Gained(0, 3),
        Gained(1, 3),
        Gained(2, 3),
    ]
    assert core.owned(0.2) == {0: 3, 1: 3, 2: 3}


def test_past_the_local_deadline_nothing_is_owned_and_after_the_suspension_all_is_lost() -> None:
    core = started_core()
    core.step(0.1)
    core.on_claimed(0xA, [(0, 3)], now=0.2)
    assert core.epoch_if_owner(0, 3.99) == 3
    assert core.epoch_if_owner(0, 4.0) is None  # sent at 0 + TTL 5 - margin 1
    # Suspended: owns nothing, reports nothing, asks nothing, keeps its lease.
    for now in (4.0, 6.0, 8.99):
        step = core.step(now)
        assert (step.events, step.requests, core.owned(now)) == ([], [], {})
        assert core.suspended(now) and core.lease == 0xA
    step = core.step(9.0)  # the deadline + suspend_s (5 s): no answer came
    assert step.events == [Lost(0)]
    assert step.requests == [RevokeLease(0xA), GrantLease(5)]
    assert not core.suspended(9.0)


def test_a_live_keepalive_answer_ends_a_suspension_with_the_same_shards_and_epochs() -> None:
    # etcd elected a new leader, which extended every lease: the lease never expired,
    # so nobody else can hold its keys and the node owns what it owned, no takeover.
    core = started_core()
    core.step(0.1)
    core.on_claimed(0xA, [(0, 3), (1, 4)], now=0.2)
    assert core.step(6.0).events == [] and core.owned(6.0) == {}
    assert core.on_keepalive(0xA, sent_at=6.5, ttl_s=5) == []
    assert core.owned(6.6) == {0: 3, 1: 4}
    assert not core.suspended(6.6)
    assert core.step(6.6).events == []
    # A live answer to a keepalive sent long before does not end it: its deadline is past.
    assert core.step(11.0).events == []
    assert core.on_keepalive(0xA, sent_at=5.0, ttl_s=5) == []
    assert core.owned(11.0) == {}


def test_late_live_answers_do_not_prolong_a_suspension() -> None:
    # Every answer comes 4.5 s after its keepalive (beyond TTL - margin): each moves the
    # deadline, none past the clock. The suspension still ends when it was first due,
    # and the lease is revoked, so its shards can move.
    core = started_core()
    core.step(0.1)
    core.on_claimed(0xA, [(0, 3)], now=0.2)
    assert core.step(4.0).events == []  # suspended until 4 + 5 = 9
    now = 4.0
    while now < 8.9:
        now += 1.67
        core.on_keepalive(0xA, sent_at=now - 4.5, ttl_s=5)
        assert core.owned(now) == {}
        if now < 9.0:
            assert core.step(now).events == [] and core.suspended(now)
    assert not core.suspended(9.0)
    step = core.step(9.0)
    assert step.events == [Lost(0)]
    assert RevokeLease(0xA) in step.requests


def test_a_zero_ttl_answer_during_a_suspension_loses_everything_at_once() -> None:
    core = started_core()
    core.step(0.1)
    core.on_claimed(0xA, [(0, 3)], now=0.2)
    assert core.step(5.0).events == []
    assert core.on_keepalive(0xA, sent_at=5.0, ttl_s=0) == [Lost(0)]
    assert core.lease == 0 and core.step(5.1).requests == [GrantLease(5)]


def test_without_a_suspension_the_deadline_loses_everything_at_once() -> None:
    core = NodeCore(A, View(), Timing(5, 1.0, 1.0, suspend_s=0.0), CFG)
    core.step(0.0)
    core.on_granted(0xA, 5.0, sent_at=0.0)
    core.step(0.0)
    core.on_registered(0xA, revision=2)
    core.view.load(2, [member_rec(A, 0xA)], now=0.0)
    core.on_claimed(0xA, [(0, 3)], now=0.2)
    step = core.step(4.0)
    assert step.events == [Lost(0)]
    assert step.requests == [RevokeLease(0xA), GrantLease(5)]


def test_a_zero_ttl_keepalive_answer_loses_everything_at_once() -> None:
    core = started_core()
    core.step(0.1)
    core.on_claimed(0xA, [(0, 3)], now=0.2)
    assert core.on_keepalive(0xA, sent_at=1.0, ttl_s=0) == [Lost(0)]
    assert core.owned(1.1) == {}


def test_a_release_reports_the_loss_in_the_same_step_and_deletes_once_seen() -> None:
    shard = next(s for s, owner in assign(16, [A, B]).items() if owner == B.node_id)
    core = started_core()
    core.on_claimed(0xA, [(shard, 3)], now=0.2)
    core.on_keepalive(0xA, sent_at=24.0, ttl_s=5)
    key = shard_key("/clearing/", shard)
    listing = [member_rec(A, 0xA), member_rec(B, 0xB), rec(key, b"beijing-a", 3, 0xA)]
    core.view.load(30, listing, now=20.0)
    assert core.step(24.9).events == []  # B is within its grace
    step = core.step(25.0)
    assert step.events == [Lost(shard)]
    assert DeleteClaim(shard, 3) in step.requests
    assert core.owned(25.0) == {}


def test_a_late_second_grant_is_revoked_not_used() -> None:
    core = started_core()
    core.on_granted(0xF, 5.0, sent_at=0.5)
    assert core.lease == 0xA
    assert RevokeLease(0xF) in core.step(0.6).requests


def test_the_package_exports_only_the_pure_api() -> None:
    import clearinghouse.ownership as ownership  # noqa: PLC0415 (the import is the test)

    assert ownership.__all__ == [
        "Claim",
        "Member",
        "NodeInfo",
        "ProtocolConfig",
        "Release",
        "ShardClaim",
        "assign",
        "decide",
        "moved_bound",
    ]
