"""Per-second series of a drill, and the numbers read off them (no I/O here).

Each second of the run (seconds since the load started) counts:

* ``sent`` - payments first sent; ``acked`` - acknowledgements received (throughput);
* ``good`` - of the payments first sent in the second, those answered (acknowledged, or
  refused for good) within ``ANSWER_SLO_S`` of their first send, retries included. The
  success rate of a second is ``good / sent``: what the institutions experienced, charged
  to the second a payment was sent in (a payment that hangs counts where it started);
* ``errors`` - failed attempts that ended in the second (each retry counts);
* ``started`` / ``started_ok`` - attempts that started in the second, and how many of
  them got an answer;
* ``p50_ms`` / ``p99_ms`` - end-to-end latency (first send to acknowledgement, retries
  included) of the acknowledgements received in the second;
* ``shards_served`` - shards the switch nodes said they served, last sample of the second.

**Recovery time**: from the fault's start to the first of ``RECOVERY_STABLE_S`` seconds
in a row (seconds that sent nothing are skipped) each with a success rate of at least
``RECOVERY_FRACTION`` of the rate before the fault; **last degraded**: to the end of the
last second of the fault window below that level (a second dip, as shards move back to
a node that returned, shows here). **Error rate during the fault**:
failed attempts over attempts, of the attempts started between the fault's start and
its end (recovery and shard moves done): the calls that failed, each retry counted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from clearinghouse.drill.clientlog import ACK, REJECTED, PaymentTrace

RECOVERY_FRACTION = 0.99
RECOVERY_STABLE_S = 5
# A payment answered later than this after its first send did not succeed in time.
ANSWER_SLO_S = 2.0
# The first seconds open channels and warm the JVMs' paths: not part of the baseline
# (on two shared cores the success rate of seconds 3-4 read 41-52 % in a walkthrough).
BASELINE_SKIP_S = 5
# Before the measured run, load is sent unmeasured until this many complete seconds in a
# row each answered at least WARM_SUCCESS_MIN of their payments within ANSWER_SLO_S (a
# cluster just started read 72.6 % before the fault without it).
WARM_STABLE_S = 3
WARM_SUCCESS_MIN = 0.95

# shard -> (zone, epoch), as one round of Describe calls saw it.
ShardSample = tuple[float, Mapping[int, tuple[str, int]]]


@dataclass
class Second:
    t: int
    sent: int = 0
    good: int = 0
    acked: int = 0
    errors: int = 0
    started: int = 0
    started_ok: int = 0
    p50_ms: float | None = None
    p99_ms: float | None = None
    shards_served: int | None = None

    @property
    def success_rate(self) -> float | None:
        return self.good / self.sent if self.sent else None

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "success_rate": self.success_rate}


@dataclass(frozen=True, slots=True)
class FaultWindow:
    start_s: float
    end_s: float


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    i = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[i]


def per_second(
    traces: Sequence[PaymentTrace], end_s: float, samples: Sequence[ShardSample] = ()
) -> list[Second]:
    n = max(1, math.ceil(end_s))
    secs = [Second(i) for i in range(n)]

    def at(t: float) -> Second | None:
        i = int(t)
        return secs[i] if 0 <= i < n else None

    latencies: list[list[float]] = [[] for _ in range(n)]
    for tr in traces:
        if (s := at(tr.t_sent)) is not None:
            s.sent += 1
            took = tr.latency_s
            answered = tr.outcome in (ACK, REJECTED)
            s.good += answered and took is not None and took <= ANSWER_SLO_S
        for a in tr.attempts:
            if (s := at(a.t0)) is not None:
                s.started += 1
                s.started_ok += a.ok
            if not a.ok and (s := at(a.t1)) is not None:
                s.errors += 1
        if tr.outcome == ACK and tr.t_done is not None and (s := at(tr.t_done)) is not None:
            s.acked += 1
            latencies[s.t].append((tr.t_done - tr.t_sent) * 1000)
    for s, lat in zip(secs, latencies, strict=True):
        if lat:
            lat.sort()
            s.p50_ms = round(_quantile(lat, 0.5), 1)
            s.p99_ms = round(_quantile(lat, 0.99), 1)
    for t, served in samples:
        if (s := at(t)) is not None:
            s.shards_served = len(served)
    return secs


def success_rate(secs: Sequence[Second], lo_s: float, hi_s: float) -> float | None:
    """Payments answered in time over payments, of those first sent in ``[lo_s, hi_s)``."""
    inside = [s for s in secs if lo_s <= s.t < hi_s]
    sent = sum(s.sent for s in inside)
    return sum(s.good for s in inside) / sent if sent else None


def baseline_span(fault: FaultWindow) -> tuple[int, int]:
    """The seconds ``[lo, hi)`` whose payments make the baseline: after the warm-up, and
    only payments whose whole answer time (``ANSWER_SLO_S``) ended before the fault
    (one sent 0.5 s before a kill is judged by the kill, not by the cluster before it).
    A lead-in too short for both falls back to every second before the fault."""
    hi = math.floor(fault.start_s - ANSWER_SLO_S)
    lo = BASELINE_SKIP_S
    if hi - lo < 1:
        hi = math.floor(fault.start_s)
        lo = min(BASELINE_SKIP_S, max(0, hi - 1))
    return lo, hi


def baseline_rate(secs: Sequence[Second], fault: FaultWindow) -> float | None:
    return success_rate(secs, *baseline_span(fault))


def complete_rates(secs: Sequence[Second], now_s: float) -> list[float]:
    """Success rates of the seconds whose payments have all had their ``ANSWER_SLO_S``
    by ``now_s``, oldest first; seconds that sent nothing are skipped."""
    return [
        rate
        for s in secs
        if s.t + 1 + ANSWER_SLO_S <= now_s and (rate := s.success_rate) is not None
    ]


def warm(rates: Sequence[float]) -> bool:
    """Whether the last ``WARM_STABLE_S`` complete seconds each reached
    ``WARM_SUCCESS_MIN``: the cluster answers as it will before the fault."""
    last = rates[-WARM_STABLE_S:]
    return len(last) == WARM_STABLE_S and all(r >= WARM_SUCCESS_MIN for r in last)


def recovery_time_s(
    secs: Sequence[Second], fault: FaultWindow, baseline: float | None
) -> float | None:
    """Seconds from the fault's start until the success rate is back (see the module
    docstring); None when it never came back within the run or there is no baseline."""
    if baseline is None:
        return None
    target = RECOVERY_FRACTION * baseline

    def good(s: Second) -> bool:
        rate = s.success_rate
        return rate is not None and rate >= target

    streak: list[Second] = []
    for s in secs[math.floor(fault.start_s) :]:
        if not s.sent:
            continue
        streak = [*streak, s] if good(s) else []
        if len(streak) == RECOVERY_STABLE_S:
            return max(0.0, streak[0].t - fault.start_s)
    return None


def last_degraded_s(
    secs: Sequence[Second], fault: FaultWindow, baseline: float | None
) -> float | None:
    """Seconds from the fault's start to the end of the last second, within the fault
    window, whose success rate was below the recovery target: a fault with two dips (the
    failure, then shards moving back) shows the second one here. None if none was."""
    if baseline is None:
        return None
    target = RECOVERY_FRACTION * baseline
    bad = [
        s.t
        for s in secs[math.floor(fault.start_s) : math.ceil(fault.end_s)]
        if (rate := s.success_rate) is not None and rate < target
    ]
    return max(0.0, bad[-1] + 1 - fault.start_s) if bad else None


def error_rate(secs: Sequence[Second], fault: FaultWindow) -> float | None:
    """Failed attempts over attempts, of those started during the fault."""
    inside = [s for s in secs if math.floor(fault.start_s) <= s.t < math.ceil(fault.end_s)]
    started = sum(s.started for s in inside)
    return 1.0 - sum(s.started_ok for s in inside) / started if started else None


def shard_moves(samples: Sequence[ShardSample]) -> int:
    """Takeovers seen: a shard found under a new epoch (a new owner, or the same node
    claiming it again). A shard missing from a sample keeps its last known epoch."""
    known: dict[int, int] = {}
    moves = 0
    for _, served in samples:
        for shard, (_, epoch) in served.items():
            if shard in known and known[shard] != epoch:
                moves += 1
            known[shard] = epoch
    return moves


def unserved_max(samples: Sequence[ShardSample], shard_count: int) -> int:
    return max((shard_count - len(served) for _, served in samples), default=0)


__all__ = [
    "ANSWER_SLO_S",
    "RECOVERY_FRACTION",
    "RECOVERY_STABLE_S",
    "WARM_STABLE_S",
    "WARM_SUCCESS_MIN",
    "FaultWindow",
    "Second",
    "ShardSample",
    "baseline_rate",
    "complete_rates",
    "error_rate",
    "last_degraded_s",
    "per_second",
    "recovery_time_s",
    "shard_moves",
    "success_rate",
    "unserved_max",
    "warm",
]
