"""What the drill reads from the cluster: shard maps, ledgers, bank journals, caps, hints.

Every read is bounded and says what it waits for. Ledgers are read the way an auditor
who trusts one city only would: a session that talks to that city's Cassandra node
alone, at LOCAL_ONE, so the answer is that city's own replica; every shard's chain is
verified (``ledger_view.read_ledger``) and its DECISION entries are counted per payment.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cassandra import ConsistencyLevel, DriverException
from cassandra.cluster import NoHostAvailable

from clearing.v1 import admin_pb2, admin_pb2_grpc, payment_pb2, shard_pb2, shard_pb2_grpc
from clearinghouse import demo
from clearinghouse._invariant import InvariantViolation
from clearinghouse.client import local_credentials
from clearinghouse.domain import ClearingError
from clearinghouse.domain.chain import LedgerEntry
from clearinghouse.domain.entries import KIND_DECISION
from clearinghouse.drill.checker import BankEffect, CityLedger
from clearinghouse.drill.clientlog import FINAL_STATES, NOT_FOUND, UNRESOLVED
from clearinghouse.drill.load import error_of, state_name
from clearinghouse.ledger_view import LedgerSummary, read_ledger
from clearinghouse.localcluster import procs
from clearinghouse.localcluster.cluster import LocalCluster
from clearinghouse.localcluster.repair import Repair
from clearinghouse.security import pki
from clearinghouse.storage.ledger import CassandraLedger
from clearinghouse.storage.participants import CassandraParticipantStore
from clearinghouse.storage.session import connect_to_node
from clearinghouse.storage.windows import CassandraWindows
from clearinghouse.switch.ports import LedgerStore, Seal, ShardWrite
from clearinghouse.switch.records import SHARD_COUNT
from clearinghouse.switch.shards import map_shards, read_chain
from clearinghouse.topology import Topology

MONITOR_INTERVAL_S = 1.0
DESCRIBE_TIMEOUT_S = 1.5
OWNERSHIP_CONVERGE_TIMEOUT_S = 90.0
LEDGER_READ_RETRY_S = 3.0
# After a repair, a replica gets this long to read whole (a node busy merging what it
# streamed can time a read out).
POST_REPAIR_READ_S = 15.0
LEDGER_SESSION_TIMEOUT_S = 10.0
BANK_AGREEMENT_POLL_S = 2.0
RESOLVE_BUDGET_S = 60.0
RESOLVE_POLL_S = 1.0
RESOLVE_CALL_TIMEOUT_S = 5.0
RESOLVE_THREADS = 8
ADMIN_CALL_TIMEOUT_S = 10.0
ADMIN_PAGE_SIZE = 1000
NODETOOL_HINTS_TIMEOUT_S = 60.0
HINTS_MBEAN = "org.apache.cassandra.metrics:type=HintsService,name=HintsSucceeded"

Progress = Callable[[str], None]
ShardMap = dict[int, tuple[str, int]]


# -- shard maps -------------------------------------------------------------------------------


def describe_all(topo: Topology, pool: ThreadPoolExecutor) -> ShardMap:
    """shard -> (zone, epoch) as every switch node that answers says (asked at once)."""

    def one(zone: str, target: str) -> list[tuple[int, str, int]]:
        with local_credentials().channel(target, pki.operator(), server=pki.node(zone)) as ch:
            try:
                d = shard_pb2_grpc.ShardServiceStub(ch).Describe(
                    shard_pb2.DescribeRequest(), timeout=DESCRIBE_TIMEOUT_S
                )
            except grpc.RpcError:
                return []
        return [(s.shard, zone, s.epoch) for s in d.shards]

    futures = [pool.submit(one, z.name, f"{z.address}:{z.ports.switch}") for z in topo.zones]
    out: ShardMap = {}
    for f in futures:
        for shard, zone, epoch in f.result():
            out[shard] = (zone, epoch)
    return out


class ShardMonitor:
    """Samples the shard map every ``MONITOR_INTERVAL_S`` until stopped."""

    def __init__(self, topo: Topology, clock: Callable[[], float]) -> None:
        self.topo = topo
        self.clock = clock
        self.samples: list[tuple[float, ShardMap]] = []
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(len(topo.zones), thread_name_prefix="drill-describe")
        self._thread = threading.Thread(target=self._loop, name="drill-monitor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._pool.shutdown(wait=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            sample = describe_all(self.topo, self._pool)
            self.samples.append((self.clock(), sample))
            self._stop.wait(max(0.0, MONITOR_INTERVAL_S - (time.monotonic() - started)))


# -- ledgers ----------------------------------------------------------------------------------


class _ReadOnce:
    """A read-only LedgerStore that reads each shard's seals and entries once, so the
    verified summary and the per-payment decision count see the same rows."""

    def __init__(self, inner: LedgerStore) -> None:
        self.inner = inner
        self._seals: dict[int, list[Seal]] = {}
        self._entries: dict[tuple[int, int, int, int | None, int | None], list[LedgerEntry]] = {}

    def seals(self, shard: int) -> list[Seal]:
        if shard not in self._seals:
            self._seals[shard] = self.inner.seals(shard)
        return self._seals[shard]

    def entries(
        self,
        shard: int,
        epoch: int,
        from_seq: int,
        until_seq: int | None = None,
        *,
        from_block: int | None = None,
    ) -> list[LedgerEntry]:
        key = (shard, epoch, from_seq, until_seq, from_block)
        if key not in self._entries:
            self._entries[key] = self.inner.entries(
                shard, epoch, from_seq, until_seq, from_block=from_block
            )
        return self._entries[key]

    def cut_block(self, shard: int, epoch: int, seq: int) -> int | None:
        return self.inner.cut_block(shard, epoch, seq)

    def fence(self, shard: int, epoch: int, node_id: str, at_us: int) -> None:
        raise InvariantViolation("the drill reads the ledger; it never writes a fence")

    def write_seal(self, seal: Seal, node_id: str, at_us: int) -> None:
        raise InvariantViolation("the drill reads the ledger; it never writes a seal")

    def commit(self, writes: Sequence[ShardWrite]) -> dict[int, bool]:
        raise InvariantViolation("the drill reads the ledger; it never commits")


def ledger_facts(ledger: LedgerStore) -> tuple[LedgerSummary | None, Counter[str]]:
    """DECISION entries per payment in every shard's verified chain, and the summary
    ``read_ledger`` makes of the same rows; None instead of the summary when a payment
    is decided twice (which ``read_ledger`` refuses). Raises InvariantViolation when a
    chain does not verify (on a replica still catching up, that is what it looks like)."""
    once = _ReadOnce(ledger)
    decisions: Counter[str] = Counter()
    for entries in map_shards(lambda shard: read_chain(once, shard)[0], range(SHARD_COUNT)):
        decisions.update(e.payment_key for e in entries if e.kind == KIND_DECISION)
    try:
        return read_ledger(once), decisions
    except InvariantViolation:
        if any(n > 1 for n in decisions.values()):
            return None, decisions
        raise


def cassandra_zone_of(lc: LocalCluster, city: str) -> tuple[str, int]:
    node = next(n for n in lc.cassandra_nodes() if n.zone.city == city)
    return node.zone.address, node.zone.ports.cql


READ_ERRORS = (InvariantViolation, ClearingError, DriverException, NoHostAvailable, OSError)


def read_city(
    lc: LocalCluster,
    city: str,
    *,
    role: str,
    expected: Mapping[str, str],
    wait_s: float,
    progress: Progress,
    repair_after_s: float | None = None,
) -> CityLedger:
    """``city``'s own replica, read (LOCAL_ONE, a session on that node alone) until it
    holds every payment of ``expected``; see ``wait_for_city``."""
    address, port = cassandra_zone_of(lc, city)

    def read() -> tuple[LedgerSummary | None, Counter[str]]:
        cluster, session = connect_to_node(
            address, port, consistency="LOCAL_ONE", keyspace=lc.topo.keyspace.name,
            timeout_s=LEDGER_SESSION_TIMEOUT_S,
        )  # fmt: skip
        try:
            summary, decisions = ledger_facts(CassandraLedger(session, ConsistencyLevel.LOCAL_ONE))
            if summary is not None:
                summary.settled_windows = CassandraWindows(
                    session, ConsistencyLevel.LOCAL_ONE
                ).settled_ids()
            return summary, decisions
        finally:
            cluster.shutdown()

    return wait_for_city(
        city, role, expected, read=read, repair=lambda: tuple(lc.repair(city, progress)),
        wait_s=wait_s, repair_after_s=repair_after_s, progress=progress,
    )  # fmt: skip


# What a replica that only *lacks* rows looks like when its chains are read (the rows a
# successor's seal covers, or a seal's predecessor, not there yet). Anything else (a
# hash that does not verify, a payment decided with another state) is not a replica
# behind: it is what the drill exists to catch, and a repair would copy the newest
# version of a differing row everywhere (README, "compare-cities").
MISSING_ROWS = ("ends before its successor's seal", "names a missing epoch")


def wait_for_city(
    city: str,
    role: str,
    expected: Mapping[str, str],
    *,
    read: Callable[[], tuple[LedgerSummary | None, Counter[str]]],
    repair: Callable[[], tuple[Repair, ...]],
    wait_s: float,
    repair_after_s: float | None,
    progress: Progress,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> CityLedger:
    """Read a city's replica again (bounded by ``wait_s``) until it holds every payment
    of ``expected`` (key -> state) decided with that state: hints may still be on their
    way to a city that was down.

    Hints do not carry every write: a replica that is up but slow gets a hint only when
    the write times out at its coordinator (``write_request_timeout``), and hints sit in
    memory until flushed (every 10 s); a coordinator killed before either loses them.
    Such a write reaches the replica only by repair. So a replica that still only
    *lacks* rows after ``repair_after_s`` (or at ``wait_s``, if that comes first) is
    repaired once (``clearingctl cluster repair``: what an SRE does once hints are done)
    and read again for up to ``POST_REPAIR_READ_S``; the result names the repair and
    what the replica lacked before it. A replica that differs (another state, a chain
    whose hashes do not verify) is never repaired. ``None`` never repairs."""
    start = clock()
    deadline = start + wait_s
    last: CityLedger | None = None
    error = ""
    repairable = False
    repairs: tuple[Repair, ...] = ()
    repaired = False
    before = ""
    while True:
        began = clock()
        # A read is every shard's whole chain in that city: minutes on a long ledger, and
        # the deadline is checked between reads, so a read begun before it runs past it.
        progress(f"  {city}'s replica ({role}): reading every shard's chain "
                 f"({began - start:.0f}s of up to {deadline - start:.0f}s)")  # fmt: skip
        try:
            summary, decisions = read()
            if summary is not None:
                progress(f"  {city}'s replica ({role}): {summary.entries:,} entries read in "
                         f"{clock() - began:.0f}s")  # fmt: skip
            if summary is None:
                twice = sorted(k for k, n in decisions.items() if n > 1)
                return CityLedger(city, role, decisions={k: decisions[k] for k in twice},
                                  waited_s=clock() - start, read=False,
                                  error=f"{len(twice)} payments decided twice, e.g. "
                                  f"{', '.join(twice[:3])}", repairs=repairs,
                                  short_before_repair=before)  # fmt: skip
            short = sorted(k for k, s in expected.items() if summary.decided.get(k) != s)
            last = CityLedger(
                city=city, role=role, decided=dict(summary.decided),
                undecided=frozenset(summary.undecided),
                decisions={k: n for k, n in decisions.items() if n},
                totals={k: (v[0], v[1]) for k, v in summary.totals.items()},
                totals_by_window={
                    w: {k: (v[0], v[1]) for k, v in t.items()}
                    for w, t in summary.window_totals.items()
                },
                settled_windows=summary.settled_windows,
                entries=summary.entries, waited_s=clock() - start, repairs=repairs,
                short_before_repair=before,
            )  # fmt: skip
            if not short:
                return last
            error = (f"{len(short)} confirmed payments not yet decided there, e.g. "
                     f"{', '.join(short[:3])}")  # fmt: skip
            repairable = all(k not in summary.decided for k in short)
        except READ_ERRORS as e:
            error = f"{type(e).__name__}: {e}"
            repairable = isinstance(e, InvariantViolation) and any(
                m in str(e) for m in MISSING_ROWS
            )
            if repaired:
                last = None  # what was read before the repair is not the answer
        now = clock()
        due = repair_after_s is not None and (now - start >= repair_after_s or now > deadline)
        if not repaired and due and repairable:
            progress(f"  {city}'s replica ({role}) still lacks rows after {now - start:.0f}s "
                     f"of hints: {error}")  # fmt: skip
            before, repaired = error, True
            repairs = repair()
            deadline = max(deadline, clock() + POST_REPAIR_READ_S)
            continue  # read again now
        if now > deadline:
            if last is not None:
                return last  # the checker says what is missing
            return CityLedger(city, role, waited_s=now - start, error=error, read=False,
                              repairs=repairs, short_before_repair=before)  # fmt: skip
        progress(f"  {city}'s replica ({role}): {error}; reading again in "
                 f"{LEDGER_READ_RETRY_S:.0f}s (up to {deadline - start:.0f}s)")  # fmt: skip
        sleep(LEDGER_READ_RETRY_S)


# -- banks, caps, resolution ------------------------------------------------------------------


def journal_effects(lines: Iterable[str]) -> dict[str, BankEffect]:
    """Effects per switch_ref in one bank's journal; a torn last line is skipped."""
    counts: dict[str, list[int]] = {}
    for line in lines:
        if not line.strip():
            continue
        try:
            e = json.loads(line)
        except ValueError:
            continue  # the bank was killed in the middle of this line: never answered
        ref = e.get("ref")
        if not ref:
            continue
        c = counts.setdefault(ref, [0, 0, 0])
        if e.get("op") == "transfer":
            c[0] += 1
            c[1] += e.get("status") == "APPROVED"
        elif e.get("op") == "reverse":
            c[2] += 1
    return {ref: BankEffect(*c) for ref, c in counts.items()}


def bank_effects(lc: LocalCluster, bank_ids: Iterable[str]) -> dict[str, BankEffect]:
    out: dict[str, BankEffect] = {}
    for bank_id in sorted(set(bank_ids)):
        path: Path = demo.bank_managed(lc, bank_id).directory / "journal.jsonl"
        if path.exists():
            out.update(journal_effects(path.read_text().splitlines()))
    return out


def cap_ceilings(lc: LocalCluster, city: str) -> dict[tuple[str, str], int] | None:
    """The highest cap each participant ever had, per currency, read at QUORUM through
    ``city``'s node (``CassandraParticipantStore.cap_ceilings``); None if it could not
    be read."""
    address, port = cassandra_zone_of(lc, city)
    try:
        cluster, session = connect_to_node(
            address, port, consistency="QUORUM", keyspace=lc.topo.keyspace.name,
            timeout_s=LEDGER_SESSION_TIMEOUT_S,
        )  # fmt: skip
    except (NoHostAvailable, DriverException, OSError):
        return None
    try:
        return CassandraParticipantStore(session).cap_ceilings()
    except (DriverException, ClearingError):
        return None
    finally:
        cluster.shutdown()


def registered_caps(stubs: Mapping[str, Any]) -> dict[tuple[str, str], int] | None:
    """(participant, currency) -> net debit cap, from the first zone that answers; None
    when none does."""
    for stub in stubs.values():
        caps: dict[tuple[str, str], int] = {}
        token = ""
        try:
            while True:
                r = stub.ListParticipants(
                    admin_pb2.ListParticipantsRequest(page_size=ADMIN_PAGE_SIZE, page_token=token),
                    timeout=ADMIN_CALL_TIMEOUT_S,
                )
                for p in r.participants:
                    for m in p.net_debit_caps:
                        caps[(p.participant_id, m.currency)] = int(m.amount_minor)
                token = r.next_page_token
                if not token:
                    return caps
        except grpc.RpcError:
            continue
    return None


def admin_stubs(topo: Topology, channels: Mapping[str, grpc.Channel]) -> dict[str, Any]:
    return {z.name: admin_pb2_grpc.AdminServiceStub(channels[z.name]) for z in topo.zones}


@dataclass(frozen=True, slots=True)
class Query:
    key: str
    institution_id: str
    payment_id: str


def resolve(
    stubs: Mapping[str, Any], queries: Sequence[Query], budget_s: float = RESOLVE_BUDGET_S
) -> dict[str, str]:
    """key -> final state, NOT_FOUND, or UNRESOLVED: GetPayment on every zone in turn,
    until a final answer or the budget is spent (an undecided payment is asked again)."""
    zones = list(stubs)
    deadline = time.monotonic() + budget_s

    def one(i: int, q: Query) -> str:
        req = payment_pb2.GetPaymentRequest(institution_id=q.institution_id,
                                            payment_id=q.payment_id)  # fmt: skip
        n = i
        while True:
            try:
                p = stubs[zones[n % len(zones)]].GetPayment(req, timeout=RESOLVE_CALL_TIMEOUT_S)
                state = state_name(p.payment)
                if state in FINAL_STATES:
                    return state
            except grpc.RpcError as e:
                if error_of(e)[0] == "NOT_FOUND":
                    return NOT_FOUND
            if time.monotonic() > deadline:
                return UNRESOLVED
            time.sleep(RESOLVE_POLL_S)
            n += 1

    if not queries:
        return {}
    with ThreadPoolExecutor(RESOLVE_THREADS, thread_name_prefix="drill-resolve") as pool:
        futures = {q.key: pool.submit(one, i, q) for i, q in enumerate(queries)}
        return {k: f.result() for k, f in futures.items()}


# -- hints ------------------------------------------------------------------------------------


def hints_succeeded(lc: LocalCluster, zone: str) -> int | None:
    """Cassandra's HintsService.HintsSucceeded count on ``zone``'s node (JMX through
    ``nodetool sjk``; 0 before the node delivered its first hint since it started), or
    None when nodetool could not say."""
    try:
        r = lc.nodetool(zone, "sjk", "mx", "-b", HINTS_MBEAN, "-mg", "-f", "Count",
                        timeout_s=NODETOOL_HINTS_TIMEOUT_S)  # fmt: skip
    except (subprocess.TimeoutExpired, OSError, StopIteration):
        return None
    if "MBean not found" in r.stdout + r.stderr:
        return 0  # Cassandra registers the metric with the first hint it delivers
    numbers = re.findall(r"^\s*(\d+)\s*$", r.stdout, flags=re.MULTILINE)
    return int(numbers[-1]) if r.returncode == 0 and numbers else None


def hints_by_node(lc: LocalCluster) -> dict[str, int | None]:
    """HintsSucceeded of every running Cassandra node, asked at once."""
    zones = [n.zone.name for n in lc.cassandra_nodes() if procs.state(n.managed).state == "up"]
    with ThreadPoolExecutor(max(1, len(zones))) as pool:
        futures = {z: pool.submit(hints_succeeded, lc, z) for z in zones}
        return {z: f.result() for z, f in futures.items()}


def hints_replayed(
    before: Mapping[str, int | None], after: Mapping[str, int | None], restarted: Iterable[str]
) -> tuple[int | None, str]:
    """Hints delivered between the two readings, summed over nodes, and a note. A node
    restarted in between counts from zero."""
    restarted = set(restarted)
    total = 0
    missing = []
    for zone, a in sorted(after.items()):
        b = 0 if zone in restarted else before.get(zone)
        if a is None or b is None:
            missing.append(zone)
            continue
        total += a - b if a >= b else a
    if not after:
        return None, "no Cassandra node answered nodetool"
    if len(missing) == len(after):
        return None, f"nodetool gave no HintsSucceeded count ({', '.join(missing)})"
    note = "HintsService.HintsSucceeded via nodetool sjk mx, summed over nodes"
    if missing:
        note += f"; not counted (nodetool did not answer): {', '.join(missing)}"
    return total, note


__all__ = [
    "Query",
    "ShardMonitor",
    "admin_stubs",
    "bank_effects",
    "describe_all",
    "hints_by_node",
    "hints_replayed",
    "journal_effects",
    "ledger_facts",
    "read_city",
    "registered_caps",
    "resolve",
    "wait_for_city",
]
