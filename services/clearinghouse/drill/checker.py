"""What must hold after a drill, judged from gathered evidence (no I/O here).

The evidence (:class:`Evidence`) is what :mod:`.observe` read after the cluster was
brought back: the client log's traces (with the answers of the queries that resolved
unknown outcomes), each city's ledger as that city's own replica holds it, every bank's
journal reduced to effects per ``switch_ref``, the registered net debit caps, and the
shard map. The checks:

* ``acknowledged_in_every_city`` - every *confirmed* payment (acknowledged, or found by
  the query that resolved its unknown outcome) is decided in each city's ledger with
  the state the client was told. A payment that fails this anywhere is **lost**.
* ``no_double_effect`` - no drill payment has more than one transfer in its bank's
  journal, or more than one DECISION in a city's chain. Such a payment is
  **duplicated**.
* ``unknowns_resolved`` - every unknown outcome (and every acknowledgement of an
  undecided state) was resolved by a query: a final state, or NOT_FOUND.
* ``not_found_left_no_trace`` and ``rejected_left_no_trace`` - a payment the switch
  says it never recorded, or refused, is in no ledger and moved no money at its bank.
* ``bank_agrees`` - money stands at the bank exactly for the APPROVED payments.
* ``within_caps`` - no participant's net debit position (over the windows not settled,
  the open one included, a window where it is net creditor counting zero; every city's
  ledger) is above its registered cap (no cap in a currency means zero). A window is
  settled if any city's rows say so. A position above a cap that was lowered after it
  was taken, but within the highest cap the participant had, is no breach (lending
  already done stays until settled): counted apart.
* ``nets_sum_to_zero`` - per city and currency, net positions sum to zero.
* ``ownership_converged`` - every shard is served, by the node placement assigns it to.
* ``ledger_readable`` - every city's ledger could be read and verified.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from clearinghouse.drill.clientlog import (
    ACK,
    FINAL_STATES,
    NOT_FOUND,
    REJECTED,
    UNKNOWN,
    PaymentTrace,
)
from clearinghouse.localcluster.repair import Repair
from clearinghouse.switch.records import SHARD_COUNT

EXAMPLES_MAX = 5


@dataclass(frozen=True)
class CityLedger:
    """One city's ledger, read from that city's own replica (LOCAL_ONE)."""

    city: str
    # "survivor" (was not hit by the fault) or "restored" (was hit, then brought back).
    role: str
    decided: Mapping[str, str] = field(default_factory=dict)
    undecided: frozenset[str] = frozenset()
    # payment_key -> DECISION entries in the chain (keys with at least one).
    decisions: Mapping[str, int] = field(default_factory=dict)
    # (participant, currency) -> (debits, credits), minor units, all time.
    totals: Mapping[tuple[str, str], tuple[int, int]] = field(default_factory=dict)
    # The same by window (the window whose cut follows the decision; empty when not
    # read), and the windows SETTLED as this city's rows say.
    totals_by_window: Mapping[int, Mapping[tuple[str, str], tuple[int, int]]] = field(
        default_factory=dict
    )
    settled_windows: frozenset[int] = frozenset()
    entries: int = 0
    # Seconds spent waiting for this replica to hold every confirmed payment.
    waited_s: float = 0.0
    # Why the last read failed (the chain did not verify yet, the node did not answer).
    error: str = ""
    read: bool = True
    # The repairs it took when hints were not enough (one per Cassandra node of the city),
    # and what the replica lacked before them.
    repairs: tuple[Repair, ...] = ()
    short_before_repair: str = ""
    # Read after another city's repair, which brought every city's replicas level.
    after_repair_of: str = ""


@dataclass(frozen=True, slots=True)
class BankEffect:
    """What one bank's journal holds for one switch_ref."""

    transfers: int = 0
    approved: int = 0
    reversed: int = 0

    @property
    def standing(self) -> int:
        """Transfers applied and not reversed: money that moved and stays moved."""
        return self.approved - self.reversed


@dataclass(frozen=True)
class Evidence:
    traces: Sequence[PaymentTrace]
    ledgers: Sequence[CityLedger]
    bank: Mapping[str, BankEffect]
    # None when no switch node answered ListParticipants.
    caps: Mapping[tuple[str, str], int] | None
    served: Mapping[int, str]
    placement: Mapping[int, str]
    shard_count: int = SHARD_COUNT
    # The highest cap each (participant, currency) ever had (every registry version);
    # None: not read, and the current caps alone are the bound.
    cap_ceilings: Mapping[tuple[str, str], int] | None = None


def unsettled_nets(c: CityLedger, settled: frozenset[int]) -> dict[tuple[str, str], int]:
    """Net debit per (participant, currency) over the windows not in ``settled``, a
    window where it is net creditor counting zero (credits offset debits of their own
    window only: windows settle one by one): what a cap bounds. All time when the ledger
    was not read by window."""
    if not c.totals_by_window:
        return {k: d - cr for k, (d, cr) in c.totals.items()}
    out: Counter[tuple[str, str]] = Counter()
    for w, totals in c.totals_by_window.items():
        if w not in settled:
            for k, (d, cr) in totals.items():
                out[k] += max(d - cr, 0)
    return dict(out)


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    examples: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail,
                "examples": self.examples}  # fmt: skip


@dataclass
class Verdict:
    checks: list[Check]
    acknowledged: int
    confirmed: int
    lost: int
    duplicated: int
    unknown: int
    unresolved: int
    rejected: int
    by_state: dict[str, int]
    rejected_by_reason: dict[str, int]
    resolutions: dict[str, int]
    lost_by_city: dict[str, dict[str, int]]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "acknowledged": self.acknowledged, "confirmed": self.confirmed,
            "lost": self.lost, "duplicated": self.duplicated, "unknown": self.unknown,
            "unresolved": self.unresolved, "rejected": self.rejected, "by_state": self.by_state,
            "rejected_by_reason": self.rejected_by_reason, "resolutions": self.resolutions,
            "lost_by_city": self.lost_by_city, "checks": [c.to_json() for c in self.checks],
        }  # fmt: skip


def expected_state(t: PaymentTrace) -> str | None:
    """The final state the ledger must hold for ``t``; None when there is none to expect
    (refused, not found, or never resolved)."""
    if t.outcome == ACK and t.state in FINAL_STATES:
        return t.state
    if t.outcome in (ACK, UNKNOWN) and t.resolution in FINAL_STATES:
        return t.resolution
    return None


def needs_resolution(t: PaymentTrace) -> bool:
    """Unknown outcomes, and acknowledgements of a state that is not final yet."""
    return t.outcome == UNKNOWN or (t.outcome == ACK and t.state not in FINAL_STATES)


def _check(name: str, bad: Sequence[str], total: int, what: str) -> Check:
    ok = not bad
    detail = f"all {total} {what}" if ok else f"{len(bad)} of {total} {what}"
    return Check(name, ok, detail, list(bad[:EXAMPLES_MAX]))


def judge(ev: Evidence) -> Verdict:
    traces = list(ev.traces)
    acked = [t for t in traces if t.outcome == ACK]
    unknown = [t for t in traces if t.outcome == UNKNOWN]
    rejected = [t for t in traces if t.outcome == REJECTED]
    to_resolve = [t for t in traces if needs_resolution(t)]
    unresolved = [t.key for t in to_resolve if t.resolution not in (*FINAL_STATES, NOT_FOUND)]
    confirmed = {t.key: s for t in traces if (s := expected_state(t)) is not None}
    not_found = [t for t in traces if needs_resolution(t) and t.resolution == NOT_FOUND]
    readable = [c for c in ev.ledgers if c.read]

    # Lost: not decided with the confirmed state in some city's own replica.
    lost: set[str] = set()
    lost_by_city: dict[str, dict[str, int]] = {}
    lost_examples: list[str] = []
    for c in readable:
        missing = [k for k in confirmed if k not in c.decided]
        other = [k for k, s in confirmed.items() if k in c.decided and c.decided[k] != s]
        lost_by_city[c.city] = {"missing": len(missing), "other_state": len(other)}
        lost |= set(missing) | set(other)
        lost_examples += [f"{k} missing in {c.city}" for k in missing[:EXAMPLES_MAX]]
        lost_examples += [
            f"{k} {confirmed[k]} acknowledged, {c.decided[k]} in {c.city}"
            for k in other[:EXAMPLES_MAX]
        ]
    cities = ", ".join(f"{c.city} ({c.role})" for c in readable) or "no city"
    checks = [
        Check(
            "acknowledged_in_every_city",
            not lost and bool(readable),
            f"{len(confirmed) - len(lost)} of {len(confirmed)} confirmed payments decided "
            f"with the acknowledged state in {cities}",
            lost_examples[:EXAMPLES_MAX],
        )
    ]

    # Duplicated: two effects at the bank, or two decisions in a chain.
    dup: list[str] = []
    for t in traces:
        eff = ev.bank.get(t.switch_ref, BankEffect())
        worst = max((c.decisions.get(t.key, 0) for c in ev.ledgers), default=0)
        if eff.transfers > 1 or worst > 1:
            dup.append(f"{t.key}: {eff.transfers} transfers at {t.bank_id}, {worst} decisions")
    checks.append(_check("no_double_effect", dup, len(traces), "payments with at most one effect"))

    checks.append(
        _check("unknowns_resolved", unresolved, len(to_resolve), "open outcomes resolved by query")
    )

    def traced(keys: Sequence[PaymentTrace]) -> list[str]:
        bad = []
        for t in keys:
            where = [c.city for c in readable if t.key in c.decided or t.key in c.undecided]
            eff = ev.bank.get(t.switch_ref, BankEffect())
            if where or eff.transfers:
                bad.append(f"{t.key}: in the ledger of {where}, {eff.transfers} transfers")
        return bad

    checks.append(_check("not_found_left_no_trace", traced(not_found), len(not_found),
                         "payments not found that left no trace"))  # fmt: skip
    checks.append(_check("rejected_left_no_trace", traced(rejected), len(rejected),
                         "refused payments that left no trace"))  # fmt: skip

    by_key = {t.key: t for t in traces}
    disagree = []
    for k, s in confirmed.items():
        t = by_key[k]
        standing = ev.bank.get(t.switch_ref, BankEffect()).standing
        want = 1 if s == "APPROVED" else 0
        if standing != want:
            disagree.append(f"{k}: {s} at the switch, {standing} standing at {t.bank_id}")
    checks.append(_check("bank_agrees", disagree, len(confirmed),
                         "confirmed payments whose bank holds the same effect"))  # fmt: skip

    breaches = []
    caps = ev.caps or {}
    ceilings = ev.cap_ceilings or {}
    settled = frozenset().union(*(c.settled_windows for c in readable))
    positions = 0  # per city: the participants and currencies with unsettled windows
    lowered = 0  # above the cap now, within one it had before (lowered since)
    for c in readable if ev.caps is not None else ():
        nets = unsettled_nets(c, settled)
        positions += len(nets)
        for (pid, ccy), net in sorted(nets.items()):
            cap = caps.get((pid, ccy), 0)
            if net <= cap:
                continue
            if net <= ceilings.get((pid, ccy), 0):
                lowered += 1
                continue
            breaches.append(f"{pid} {ccy}: net debit {net} > cap {cap} in {c.city}")
    if ev.caps is None:
        checks.append(Check("within_caps", False, "the registered caps could not be read"))
    else:
        what = "positions within their caps"
        if lowered:
            what += (f" ({lowered} above a cap lowered since, within the one they were "
                     "taken under)")  # fmt: skip
        checks.append(_check("within_caps", breaches, positions, what))

    unbalanced = []
    for c in readable:
        sums: Counter[str] = Counter()
        for (_, ccy), (d, cr) in c.totals.items():
            sums[ccy] += d - cr
        unbalanced += [f"{ccy} sums to {n} in {c.city}" for ccy, n in sorted(sums.items()) if n]
    checks.append(
        Check("nets_sum_to_zero", not unbalanced,
              "net positions sum to zero in every currency and city" if not unbalanced
              else "; ".join(unbalanced), unbalanced[:EXAMPLES_MAX])
    )  # fmt: skip

    unserved = sorted(set(range(ev.shard_count)) - set(ev.served))
    misplaced = sorted(s for s, z in ev.served.items() if ev.placement.get(s) != z)
    own_ok = not unserved and not misplaced
    checks.append(
        Check("ownership_converged", own_ok,
              f"all {ev.shard_count} shards served where placement puts them" if own_ok
              else f"{len(unserved)} shards unserved, {len(misplaced)} not where placement "
              f"puts them",
              [f"shard {s} unserved" for s in unserved[:EXAMPLES_MAX]]
              + [f"shard {s} on {ev.served[s]}, placement says {ev.placement.get(s)}"
                 for s in misplaced[:EXAMPLES_MAX]])
    )  # fmt: skip

    unread = [f"{c.city}: {c.error}" for c in ev.ledgers if not c.read]
    checks.append(_check("ledger_readable", unread, len(ev.ledgers), "cities' ledgers verified"))

    return Verdict(
        checks=checks,
        acknowledged=len(acked),
        confirmed=len(confirmed),
        lost=len(lost),
        duplicated=len(dup),
        unknown=len(unknown),
        unresolved=len(unresolved),
        rejected=len(rejected),
        by_state=dict(sorted(Counter(t.state for t in acked).items())),
        rejected_by_reason=dict(
            sorted(Counter(f"{t.code} {t.reason}".strip() for t in rejected).items())
        ),
        resolutions=dict(sorted(Counter(t.resolution or "-" for t in to_resolve).items())),
        lost_by_city=lost_by_city,
    )


__all__ = [
    "BankEffect",
    "Check",
    "CityLedger",
    "Evidence",
    "Verdict",
    "expected_state",
    "judge",
    "needs_resolution",
]
