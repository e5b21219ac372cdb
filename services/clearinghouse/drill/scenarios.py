"""The drills: which fault, on which victims, for how long, from a seed.

A plan is a pure function of (scenario, seed, topology, the etcd leader): rerunning with
the same seed picks the same victims. The runner executes its steps under load:
``inject`` (the fault), ``hold_s`` seconds, then ``recover``, which ends once the shard
map has settled where placement puts every shard; the fault window on the timeline runs
from the first inject step to the end of the last recover step.

* ``kill-zone`` - SIGKILL every process of one zone (a zone ``-a`` holds the city's
  etcd member and Cassandra node as well as a switch node), then start it again.
* ``kill-city`` - SIGKILL every process of one city: both switch nodes, its Cassandra
  node(s) and its etcd member; then start the city again (it catches up by hints).
* ``pause-city`` - SIGSTOP every process of one city together (both switch nodes, its
  Cassandra node(s), its etcd member), connections left open as a frozen data centre
  leaves them; then SIGCONT them together.
* ``pause-node`` - SIGSTOP one switch node for longer than its lease TTL, so that its
  shards move while it is frozen, then SIGCONT it.
* ``kill-etcd-leader`` - SIGKILL the etcd member that leads (from ``cluster status``),
  then start it again.
* ``restart-city`` - stop a city (SIGTERM, then SIGKILL after the grace) and start it.
* ``rolling-restart`` - stop and start every switch node, one at a time in an order
  drawn from the seed, waiting for the shard map to settle after each.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from clearinghouse.ownership.node import LEASE_TTL_S
from clearinghouse.topology import Topology

KILL_ZONE = "kill-zone"
KILL_CITY = "kill-city"
PAUSE_CITY = "pause-city"
PAUSE_NODE = "pause-node"
KILL_ETCD_LEADER = "kill-etcd-leader"
RESTART_CITY = "restart-city"
ROLLING_RESTART = "rolling-restart"
SCENARIOS = (
    KILL_ZONE,
    KILL_CITY,
    PAUSE_CITY,
    PAUSE_NODE,
    KILL_ETCD_LEADER,
    RESTART_CITY,
    ROLLING_RESTART,
)

# How long a fault is held before recovery starts, by default. A pause must outlast the
# lease so the node's shards move; kills are held long enough for shards to move and for
# Cassandra's gossip to convict the dead node (about 20 s from the first failed write).
PAUSE_PAST_TTL_S = 3.0
DEFAULT_HOLD_S = {
    KILL_ZONE: 15.0,
    KILL_CITY: 15.0,
    PAUSE_CITY: 15.0,
    PAUSE_NODE: LEASE_TTL_S + PAUSE_PAST_TTL_S,
    KILL_ETCD_LEADER: 10.0,
    RESTART_CITY: 0.0,
    ROLLING_RESTART: 0.0,
}

# Step actions: LocalCluster's (on a target), and "converge": wait until every shard is
# served by the node placement gives it to.
ACTIONS = ("kill", "stop", "start", "pause", "resume", "converge")


class PlanError(ValueError):
    """The scenario cannot be planned (unknown name, no etcd leader, bad hold)."""


@dataclass(frozen=True, slots=True)
class Step:
    action: str
    target: str = ""

    def __str__(self) -> str:
        return f"{self.action} {self.target}".strip()


@dataclass(frozen=True, slots=True)
class FaultPlan:
    scenario: str
    seed: int
    victims: tuple[str, ...]
    summary: str
    inject: tuple[Step, ...]
    hold_s: float
    recover: tuple[Step, ...]


def plan(
    scenario: str,
    seed: int,
    topo: Topology,
    etcd_leader: str | None = None,
    hold_s: float | None = None,
) -> FaultPlan:
    """The plan of ``scenario`` for ``seed``; ``etcd_leader`` (a zone) for kill-etcd-leader."""
    if scenario not in SCENARIOS:
        raise PlanError(f"unknown scenario {scenario!r}; scenarios: {', '.join(SCENARIOS)}")
    hold = DEFAULT_HOLD_S[scenario] if hold_s is None else hold_s
    if hold < 0:
        raise PlanError(f"--hold-s must not be negative, not {hold}")
    if scenario in (PAUSE_NODE, PAUSE_CITY) and hold <= LEASE_TTL_S:
        raise PlanError(
            f"{scenario} must hold its victims past the lease TTL ({LEASE_TTL_S}s): "
            f"--hold-s {hold} is too short"
        )
    rng = random.Random(f"drill-victims:{scenario}:{seed}")
    zones = [z.name for z in topo.zones]
    cities = list(topo.city_names())

    def simple(verb: str, undo: str, target: str, what: str) -> FaultPlan:
        # Recovery ends when the shard map has settled again: shards move back to the
        # nodes that returned, and those moves are part of what the clients live through.
        return FaultPlan(scenario, seed, (target,), what, (Step(verb, target),), hold,
                         (Step(undo, target), Step("converge")))  # fmt: skip

    if scenario == KILL_ZONE:
        zone = rng.choice(zones)
        return simple("kill", "start", zone, f"SIGKILL every process of zone {zone}")
    if scenario == KILL_CITY:
        city = rng.choice(cities)
        return simple("kill", "start", city, f"SIGKILL every process of city {city}")
    if scenario == PAUSE_CITY:
        city = rng.choice(cities)
        return simple(
            "pause", "resume", city, f"SIGSTOP every process of city {city} for {hold:.0f}s, "
            "then SIGCONT"
        )  # fmt: skip
    if scenario == PAUSE_NODE:
        target = f"switch@{rng.choice(zones)}"
        return simple("pause", "resume", target, f"SIGSTOP {target} for {hold:.0f}s, then SIGCONT")
    if scenario == KILL_ETCD_LEADER:
        if not etcd_leader:
            raise PlanError("etcd has no leader now (clearingctl cluster status): nothing to kill")
        target = f"etcd@{etcd_leader}"
        return simple("kill", "start", target, f"SIGKILL the etcd leader {target}")
    if scenario == RESTART_CITY:
        city = rng.choice(cities)
        return simple("stop", "start", city, f"stop every process of city {city}, then start it")
    order = list(zones)
    rng.shuffle(order)
    steps: list[Step] = []
    for z in order:
        steps += [Step("stop", f"switch@{z}"), Step("start", f"switch@{z}"), Step("converge")]
    return FaultPlan(
        scenario, seed, tuple(f"switch@{z}" for z in order),
        f"restart every switch node in turn: {', '.join(order)}", tuple(steps), hold, (),
    )  # fmt: skip


__all__ = [
    "DEFAULT_HOLD_S",
    "SCENARIOS",
    "FaultPlan",
    "PlanError",
    "Step",
    "plan",
]
