"""What the operator sees of the running cluster, gathered once for ``cluster status`` and
every couple of seconds for the console: shard ownership as each switch node tells it
(``ShardService/Describe``), and live payments/s and errors per zone from two scrapes of
each node's Prometheus endpoint.

Everything here is bounded: every node is asked at once, each with a short deadline, and
a node that does not answer is reported as not answering, never waited for.

Rates per zone (the zone's switch node's own counters, between two scrapes):

- ``payments_per_s``: ``clearing_payments_decided_total`` (every state, type), i.e. the
  payments this node decided as their shard's owner;
- ``requests_per_s``: ``rpc_server_requests_total`` of ``clearing.v1.PaymentService``,
  i.e. calls this node received from participants;
- ``errors_per_s``: the same with ``rpc_grpc_status_code != "0"``; ``error_ratio`` is
  errors / requests over the interval (None without requests).

A counter that went down between two scrapes means the node restarted: its new value is
the increase (as Prometheus' ``rate`` does).
"""

from __future__ import annotations

import math
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from clearinghouse.code_version import code_version
from clearinghouse.switch.records import SHARD_COUNT
from clearinghouse.topology import Topology

SCRAPE_TIMEOUT_S = 1.0
DESCRIBE_TIMEOUT_S = 1.5
PAYMENT_SERVICE = "clearing.v1.PaymentService"
DECIDED = "clearing_payments_decided_total"
RPC_REQUESTS = "rpc_server_requests_total"
KINDS = ("switch", "etcd", "cassandra")

Sample = tuple[str, dict[str, str], float]


class Source(Protocol):
    """What the gathering needs of a cluster (``LocalCluster`` is one; tests use fakes)."""

    topo: Topology

    def status(self, with_ring: bool = True) -> dict[str, Any]: ...

    def describe_nodes(self, timeout_s: float = ...) -> dict[str, dict[str, Any] | None]: ...

    def metrics_urls(self) -> dict[str, str]: ...

    def ring_view(self) -> tuple[list[dict[str, str]] | None, str | None]: ...


# -- Prometheus text ---------------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)(?:\s+-?\d+)?\s*$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?\s*')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


def _unescape(v: str) -> str:
    return re.sub(r"\\[\\\"n]", lambda m: _UNESCAPE[m.group(0)], v)


def parse_metrics(text: str) -> list[Sample]:
    """The samples of a Prometheus text exposition (format 0.0.4): name, labels, value.

    Comments and lines that are not samples are skipped, not fatal: a scrape is evidence,
    and one odd line must not hide the rest.
    """
    out: list[Sample] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m is None:
            continue
        name, raw_labels, raw_value = m.groups()
        try:
            value = float(raw_value)
        except ValueError:
            continue
        labels: dict[str, str] = {}
        if raw_labels:
            inner = raw_labels[1:-1]
            for lm in _LABEL.finditer(inner):
                labels[lm.group(1)] = _unescape(lm.group(2))
        out.append((name, labels, value))
    return out


@dataclass(frozen=True, slots=True)
class Counters:
    """One scrape's counters that the rates need, and when it was taken (monotonic s)."""

    at: float
    decided: float = 0.0
    decided_by_state: Mapping[str, float] = field(default_factory=dict)
    requests: float = 0.0
    errors: float = 0.0


def counters_from_text(text: str, at: float) -> Counters:
    decided = requests = errors = 0.0
    by_state: dict[str, float] = {}
    for name, labels, value in parse_metrics(text):
        if math.isnan(value):
            continue
        if name == DECIDED:
            decided += value
            state = labels.get("state", "")
            by_state[state] = by_state.get(state, 0.0) + value
        elif name == RPC_REQUESTS and labels.get("rpc_service") == PAYMENT_SERVICE:
            requests += value
            if labels.get("rpc_grpc_status_code", "0") != "0":
                errors += value
    return Counters(at, decided, by_state, requests, errors)


def _increase(prev: float, cur: float) -> float:
    return cur if cur < prev else cur - prev


def rates(prev: Counters, cur: Counters) -> dict[str, Any] | None:
    """Per-second rates between two scrapes of one node; None if no time passed."""
    dt = cur.at - prev.at
    if dt <= 0:
        return None
    # Any counter that went down means the node restarted and every counter began at 0.
    restarted = (
        cur.decided < prev.decided or cur.requests < prev.requests or cur.errors < prev.errors
    )

    def inc(before: float, now: float) -> float:
        return now if restarted else _increase(before, now)

    requests = inc(prev.requests, cur.requests)
    errors = inc(prev.errors, cur.errors)
    decided = inc(prev.decided, cur.decided)
    by_state = {
        s: round(inc(prev.decided_by_state.get(s, 0.0), v) / dt, 3)
        for s, v in sorted(cur.decided_by_state.items())
    }
    return {
        "interval_s": round(dt, 3),
        "payments_per_s": round(decided / dt, 3),
        "decided_per_s_by_state": by_state,
        "requests_per_s": round(requests / dt, 3),
        "errors_per_s": round(errors / dt, 3),
        "error_ratio": round(errors / requests, 4) if requests > 0 else None,
    }


# -- scraping ----------------------------------------------------------------------------


def scrape(url: str, timeout_s: float = SCRAPE_TIMEOUT_S) -> str | None:
    """GET a Prometheus endpoint on loopback; None when it does not answer in time."""
    if not url.startswith("http://"):
        raise ValueError(f"metrics endpoints are plain http on loopback, not {url!r}")
    try:
        # The scheme was checked above; the admin ports are plain http on loopback.
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310
            body: bytes = resp.read()
    except (OSError, urllib.error.URLError, ValueError):
        return None
    return body.decode("utf-8", "replace")


def scrape_all(
    urls: Mapping[str, str],
    timeout_s: float = SCRAPE_TIMEOUT_S,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, Counters | None]:
    """Scrape every zone at once; each zone's counters, or None if it did not answer."""
    if not urls:
        return {}

    def one(url: str) -> Counters | None:
        text = scrape(url, timeout_s)
        return None if text is None else counters_from_text(text, clock())

    with ThreadPoolExecutor(max_workers=len(urls), thread_name_prefix="scrape") as pool:
        futures = {zone: pool.submit(one, url) for zone, url in urls.items()}
        return {zone: f.result() for zone, f in futures.items()}


class RateTracker:
    """Keeps each zone's last scrape and turns the next one into rates."""

    def __init__(self) -> None:
        self._last: dict[str, Counters] = {}
        self._lock = threading.Lock()

    def update(self, scraped: Mapping[str, Counters | None]) -> dict[str, dict[str, Any] | None]:
        out: dict[str, dict[str, Any] | None] = {}
        with self._lock:
            for zone, cur in scraped.items():
                if cur is None:
                    self._last.pop(zone, None)  # not answering: start over when it is back
                    out[zone] = None
                    continue
                prev = self._last.get(zone)
                self._last[zone] = cur
                out[zone] = rates(prev, cur) if prev is not None else None
        return out


def live_rates(
    urls: Mapping[str, str],
    interval_s: float = 1.0,
    timeout_s: float = SCRAPE_TIMEOUT_S,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, dict[str, Any] | None]:
    """Scrape every zone twice ``interval_s`` apart; rates per zone (None: not answering)."""
    tracker = RateTracker()
    first = scrape_all(urls, timeout_s)
    tracker.update(first)
    sleep(interval_s)
    return tracker.update(scrape_all(urls, timeout_s))


# -- shard ownership ---------------------------------------------------------------------


def ownership(
    nodes: Mapping[str, Mapping[str, Any] | None], shard_count: int = SHARD_COUNT
) -> dict[str, Any]:
    """The ownership map from every node's own account: shard -> zone (None: no node
    serves it now), the shards per node, and shards two nodes claim at once (possible for
    a moment during a handover: the fence decides which one's writes count)."""
    owners: list[str | None] = [None] * shard_count
    epochs: list[int | None] = [None] * shard_count
    claims: dict[int, list[str]] = {}
    per_node: dict[str, int] = {}
    for zone, d in nodes.items():
        if d is None:
            continue
        per_node[zone] = len(d["shards"])
        for s in d["shards"]:
            shard, epoch = int(s["shard"]), int(s["epoch"])
            if not 0 <= shard < shard_count:
                continue
            claims.setdefault(shard, []).append(zone)
            # Two claims: the higher epoch is the newer ownership.
            if owners[shard] is None or epoch > (epochs[shard] or 0):
                owners[shard], epochs[shard] = zone, epoch
    return {
        "shard_count": shard_count,
        "served": sum(1 for o in owners if o is not None),
        "owners": owners,
        "epochs": epochs,
        "shards_per_node": per_node,
        "unserved": [i for i, o in enumerate(owners) if o is None],
        "contested": {str(s): zs for s, zs in sorted(claims.items()) if len(zs) > 1},
    }


def shard_ranges(shards: Sequence[int]) -> str:
    """``0-3,7,9-12`` for a list of shard numbers."""
    xs = sorted(set(shards))
    parts: list[str] = []
    i = 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        parts.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ",".join(parts)


# -- what `cluster status` adds ----------------------------------------------------------


def live_status(
    source: Source,
    interval_s: float = 1.0,
    describe_timeout_s: float = DESCRIBE_TIMEOUT_S,
    scrape_timeout_s: float = SCRAPE_TIMEOUT_S,
) -> dict[str, Any]:
    """Each node's Describe, the ownership map, and payments/s and errors per zone over
    ``interval_s`` (the Describe calls run while the rates wait between their scrapes)."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="describe") as pool:
        described = pool.submit(source.describe_nodes, describe_timeout_s)
        throughput = live_rates(source.metrics_urls(), interval_s, scrape_timeout_s)
        nodes = described.result()
    checkout = code_version()
    return {
        "switch_nodes": nodes,
        # What the nodes would run if started now from this checkout, and the nodes that
        # run something else (started before an update: a restart loads the new code).
        "checkout_code_version": checkout,
        "other_code": sorted(
            zone for zone, d in nodes.items() if d is not None and d["code_version"] != checkout
        ),
        "ownership": ownership(nodes),
        "throughput": throughput,
        "throughput_interval_s": interval_s,
    }


# -- the zone grid -----------------------------------------------------------------------


def process_health(row: Mapping[str, Any], answering: bool) -> str:
    """up (answers), starting (running, not answering yet), paused, down."""
    if answering:
        return "up"
    if row.get("state") == "paused":
        return "paused"
    if row.get("state") == "up":
        return "starting"
    return "down"


def zone_grid(
    topo: Topology,
    status: Mapping[str, Any],
    nodes: Mapping[str, Mapping[str, Any] | None],
    zone_rates: Mapping[str, Mapping[str, Any] | None],
) -> list[dict[str, Any]]:
    """Cities, their zones, and each zone's processes with their health.

    A zone is ``up`` when its switch node answers and every other process it runs
    answers too, ``degraded`` when its switch node answers but another process of the
    zone does not, and ``down`` when its switch node does not answer.
    """
    answering_etcd = set(status.get("etcd", {}).get("members_answering", []))
    leader = status.get("etcd", {}).get("leader")
    rows: dict[tuple[str, str], Mapping[str, Any]] = {
        (r["zone"], r["kind"]): r for r in status.get("processes", [])
    }
    cities = []
    for city in topo.cities:
        zones = []
        for z in city.zones:
            procs: dict[str, dict[str, Any]] = {}
            for kind in KINDS:
                row = rows.get((z.name, kind))
                if row is None:
                    continue  # this zone does not run one
                if kind == "switch":
                    answering = nodes.get(z.name) is not None
                elif kind == "etcd":
                    answering = z.name in answering_etcd
                else:
                    answering = bool(row.get("listening"))
                procs[kind] = {
                    "health": process_health(row, answering),
                    "state": row.get("state"),
                    "pid": row.get("pid"),
                    "endpoint": f"{row.get('address')}:{row.get('port')}",
                    "etcd_leader": kind == "etcd" and z.name == leader,
                }
            switch_up = nodes.get(z.name) is not None
            if not switch_up:
                state = "down"
            elif all(p["health"] == "up" for p in procs.values()):
                state = "up"
            else:
                state = "degraded"
            node = nodes.get(z.name)
            zones.append(
                {
                    "name": z.name,
                    "address": z.address,
                    "state": state,
                    "processes": procs,
                    "shards": len(node["shards"]) if node is not None else 0,
                    "rates": zone_rates.get(z.name),
                }
            )
        cities.append({"name": city.name, "zones": zones})
    return cities


# -- one verdict for scripts: `cluster status` exits with it ---------------------------

HEALTHY, DEGRADED, OUTAGE = "healthy", "degraded", "outage"
EXIT_CODE = {HEALTHY: 0, DEGRADED: 1, OUTAGE: 2}


@dataclass(frozen=True)
class Health:
    """What ``cluster status`` concludes, and exits with (``exit_code``).

    - ``outage`` (2): payments, all or some, are refused now: no cluster, no etcd leader,
      fewer Cassandra nodes answering than QUORUM needs, no switch node answering, or
      shards with no owner (from the live part; not judged with ``--no-live``), as for
      the seconds a lost zone's shards take to be taken over;
    - ``degraded`` (1): payments go on, but something is not running or not answering;
    - ``healthy`` (0): every process runs and answers, every shard is served.

    ``survives_city_loss``: whether losing one more whole city, any of them, would still
    leave etcd a quorum and Cassandra its QUORUM (one replica per node of each city).
    """

    verdict: str
    problems: tuple[str, ...]
    survives_city_loss: bool
    # What the verdict could not look at (``--no-live``: the nodes' shards), so that a
    # HEALTHY made without them does not read like one made with them.
    not_checked: tuple[str, ...] = ()

    @property
    def exit_code(self) -> int:
        return EXIT_CODE[self.verdict]

    def as_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "exit_code": self.exit_code,
            "problems": list(self.problems),
            "survives_city_loss": self.survives_city_loss,
            "not_checked": list(self.not_checked),
        }


def _majority(n: int) -> int:
    return n // 2 + 1


def health(st: Mapping[str, Any]) -> Health:
    """The verdict on a ``LocalCluster.status`` (plus, when present, ``live_status``)."""
    if not st.get("started"):
        return Health(OUTAGE, ("no cluster has been started here (clearingctl cluster up)",), False)
    problems: list[str] = []
    fatal: list[str] = []
    rows = list(st["processes"])
    answering: dict[str, list[Mapping[str, Any]]] = {k: [] for k in KINDS}
    for r in rows:
        name = f"{r['kind']}@{r['zone']}"
        if r["state"] != "up":
            problems.append(f"{name} {r['state']} (log: {r['log']})")
        elif not r["listening"]:
            problems.append(f"{name} running but not answering yet (log: {r['log']})")
        else:
            answering[r["kind"]].append(r)
    total = {k: sum(1 for r in rows if r["kind"] == k) for k in KINDS}
    if not st["etcd"]["leader"]:
        fatal.append("etcd has no leader: no switch node can confirm its shards")
    if len(answering["cassandra"]) < _majority(total["cassandra"]):
        fatal.append(
            f"{len(answering['cassandra'])} of {total['cassandra']} Cassandra nodes answer: "
            f"QUORUM needs {_majority(total['cassandra'])}"
        )
    ring = st.get("cassandra_ring")
    if ring:
        up_addresses = {r["address"] for r in answering["cassandra"]}
        for r in ring:
            if (r["status"], r["state"]) != ("U", "N") and r["address"] in up_addresses:
                problems.append(
                    f"cassandra {r['address']} ({r['dc']}) is {r['status']}{r['state']} in the "
                    f"ring seen from {st.get('cassandra_ring_via')}"
                )
    nodes = st.get("switch_nodes")
    if nodes is not None:
        mute = [z for z, d in nodes.items() if d is None]
        running = {r["zone"] for r in answering["switch"]}
        problems += [f"switch@{z} does not answer Describe" for z in mute if z in running]
        if len(mute) == len(nodes):
            fatal.append("no switch node answers")
        own = st["ownership"]
        if own["unserved"]:
            fatal.append(
                f"{len(own['unserved'])} of {own['shard_count']} shards have no owner "
                f"({shard_ranges(own['unserved'])}): their payments are refused UNAVAILABLE"
            )
    elif not answering["switch"]:
        fatal.append("no switch node runs")
    # One city more lost: what stays of each quorum.
    cities = sorted({r["city"] for r in rows})
    survives = bool(cities)
    for city in cities:
        for kind in ("etcd", "cassandra"):
            left = sum(1 for r in answering[kind] if r["city"] != city)
            if left < _majority(total[kind]):
                survives = False
    verdict = OUTAGE if fatal else DEGRADED if problems else HEALTHY
    unchecked = () if nodes is not None else (
        "whether every shard has an owner and every switch node answers (--no-live)",
    )  # fmt: skip
    return Health(verdict, tuple(fatal + problems), survives, unchecked)
