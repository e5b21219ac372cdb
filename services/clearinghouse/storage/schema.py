"""The keyspace and its tables, applied idempotently.

The keyspace is replicated with ``NetworkTopologyStrategy`` over every city, as many
replicas per city as that city runs Cassandra nodes. Tables come from the numbered
``cql/NNN_*.cql`` files beside this module, applied in order; each applied file is
recorded with its checksum in ``schema_migrations`` so a changed file is refused rather
than silently half-applied. Statements are ``IF NOT EXISTS``: re-running is harmless.

Every schema change of a run goes to one coordinator, the node of the driver's control
connection, one after another, and the cluster is waited on to agree once per migration
(and once after the keyspace and ``schema_migrations``), before the migration is
recorded and before anything reads or writes what it created: changes made concurrently
through different coordinators are what Cassandra 5.0 cannot reconcile safely, one node
applying its own changes in order cannot conflict with itself, and the driver judges
agreement from the control connection's node, so that node must be the one that has the
changes first. The wait covers the nodes the driver has not seen down, so the session
(``connect(cfg, for_schema_changes=True)``) connects to every running node: one that
connected to a single node would wait on the others' old versions until it timed out.

A run that loses its coordinator stops with ``CoordinatorLost``: the session had no
connection to it, the control connection moved off it, or it did not answer a change in
time. ``apply_with_fresh_sessions`` starts the run again on a new session, at most
``SCHEMA_RUNS_MAX`` runs. The wait for agreement counts only nodes that are up, so when
the lost coordinator may hold a change no other node has yet (the change was sent), the
next run first waits for that node to be up and then for the cluster to agree: sending
the change again through another node before it has spread could create the same table
twice, with two ids, which Cassandra 5.0 does not reconcile. Still down after
``COORDINATOR_WAIT_S``, the run stops and says which node to start.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from cassandra import ConsistencyLevel, OperationTimedOut
from cassandra.cluster import NoHostAvailable
from cassandra.connection import ConnectionShutdown
from cassandra.query import SimpleStatement

from clearinghouse._invariant import invariant
from clearinghouse.domain import Unavailable as DomainUnavailable
from clearinghouse.storage.retry import RetryBounds, with_retries

CQL_DIR = Path(__file__).parent / "cql"
DDL_TIMEOUT_S = 60.0
SCHEMA_AGREEMENT_TIMEOUT_S = 120.0
# How long a run waits for its coordinator: the driver's control-connection node, up and
# with a connection pool in the session (pools other than the first are still being
# opened when ``Cluster.connect`` returns, unless it was told to wait for all of them).
COORDINATOR_WAIT_S = 30.0
COORDINATOR_POLL_S = 0.25
# Runs of ``apply`` on fresh sessions when one loses its coordinator.
SCHEMA_RUNS_MAX = 3
# The QUORUM read and write of schema_migrations, retried while a node that has just
# died is not yet known dead (its replica is still asked, and does not answer).
RECORD_RETRIES = RetryBounds(attempts_max=6, budget_s=90.0, backoff_min_s=1.0, backoff_max_s=15.0)
T = TypeVar("T")
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,47}$")


class SchemaError(RuntimeError):
    pass


class CoordinatorLost(SchemaError):
    """The node this run's changes go through was lost to it: nothing is wrong with the
    schema, and a run on a new session may finish it. ``holder``: that node's endpoint if
    a change was sent to it and not seen everywhere (it may be the only node with it),
    else None."""

    def __init__(self, message: str, holder: Any | None = None) -> None:
        super().__init__(message)
        self.holder = holder


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    checksum: str
    statements: tuple[str, ...]


def migrations(directory: Path = CQL_DIR) -> list[Migration]:
    out = []
    for f in sorted(directory.glob("*.cql")):
        version_text, _, name = f.stem.partition("_")
        text = f.read_text()
        stmts = tuple(s.strip() for s in _strip_comments(text).split(";") if s.strip())
        out.append(
            Migration(int(version_text), name, hashlib.sha256(text.encode()).hexdigest(), stmts)
        )
    versions = [m.version for m in out]
    invariant(versions == sorted(set(versions)), f"duplicate migration versions: {versions}")
    return out


def _strip_comments(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.strip().startswith("--"))


def keyspace_cql(keyspace: str, replication: Mapping[str, int]) -> str:
    if not _NAME.match(keyspace):
        raise SchemaError(f"bad keyspace name {keyspace!r}")
    reps = ", ".join(f"'{dc}': {n}" for dc, n in sorted(replication.items()))
    return f"{{'class': 'NetworkTopologyStrategy', {reps}}}"


def apply(
    session: Any,
    keyspace: str,
    replication: Mapping[str, int],
    progress: Callable[[str], None] = print,
    changed: list[str] | None = None,
    *,
    holder: Any | None = None,
) -> list[str]:
    """Create or align the keyspace, then apply pending migrations. Returns what changed,
    appended to ``changed`` if given (as it happens: a run that raises has its changes
    there). ``holder``: the endpoint of a node that may hold a change no other node has
    (``CoordinatorLost.holder`` of the run before); waited for to be up first."""
    changed = [] if changed is None else changed
    host = _coordinator(session)
    if holder is not None:
        _wait_for_holder(session, holder)
    # A previous run's last change may still be on its way from its coordinator.
    _agree(session, host, "before the first change of this run")
    # The keyspace name is checked against _NAME in keyspace_cql before any CQL uses it.
    repl = keyspace_cql(keyspace, replication)
    row = session.execute(
        "SELECT replication FROM system_schema.keyspaces WHERE keyspace_name = %s", (keyspace,)
    ).one()
    wanted = {dc: str(n) for dc, n in replication.items()}
    if row is None:
        _send(session, host, f"CREATE KEYSPACE IF NOT EXISTS {keyspace} WITH replication = {repl}")
        changed.append(f"created keyspace {keyspace} {dict(replication)}")
    else:
        current = {k: v for k, v in row.replication.items() if k != "class"}
        if current != wanted:
            _send(session, host, f"ALTER KEYSPACE {keyspace} WITH replication = {repl}")
            changed.append(f"altered keyspace {keyspace} replication {current} -> {wanted}")
    _send(
        session,
        host,
        f"CREATE TABLE IF NOT EXISTS {keyspace}.schema_migrations ("
        "version int PRIMARY KEY, name text, checksum text, applied_at timestamp)",
    )
    _agree(session, host, f"the keyspace {keyspace} and its schema_migrations", sent=True)
    select = SimpleStatement(
        f"SELECT version, checksum FROM {keyspace}.schema_migrations",  # noqa: S608
        consistency_level=ConsistencyLevel.QUORUM,
    )
    rows = _retrying("reading schema_migrations", lambda: list(session.execute(select)))
    applied = {r.version: r.checksum for r in rows}
    for m in migrations():
        if m.version in applied:
            if applied[m.version] != m.checksum:
                raise SchemaError(
                    f"migration {m.version:03d}_{m.name} changed after it was applied; "
                    "add a new migration instead of editing an applied one"
                )
            continue
        progress(f"  applying schema migration {m.version:03d}_{m.name}")
        session.set_keyspace(keyspace)
        for stmt in m.statements:
            _send(session, host, stmt)
        _agree(session, host, f"migration {m.version:03d}_{m.name}", sent=True)
        insert = SimpleStatement(
            f"INSERT INTO {keyspace}.schema_migrations (version, name, checksum, applied_at) "  # noqa: S608
            "VALUES (%s, %s, %s, toTimestamp(now()))",
            consistency_level=ConsistencyLevel.QUORUM,
        )
        values = (m.version, m.name, m.checksum)
        _retrying(f"recording migration {m.version:03d}", partial(session.execute, insert, values))
        changed.append(f"applied migration {m.version:03d}_{m.name}")
    return changed


def _retrying(what: str, fn: Callable[[], T]) -> T:
    """``fn`` with the schema's retry bounds; exhausted, a SchemaError naming ``what``."""
    try:
        return with_retries(what, fn, RECORD_RETRIES)
    except DomainUnavailable as e:
        raise SchemaError(
            f"Cassandra did not answer {what} at QUORUM within {RECORD_RETRIES.attempts_max} "
            f"attempts or {RECORD_RETRIES.budget_s:.0f}s ({e}); is a majority of the nodes "
            "up? read each node's system.log"
        ) from e


def apply_with_fresh_sessions(
    sessions: Callable[[], AbstractContextManager[Any]],
    keyspace: str,
    replication: Mapping[str, int],
    progress: Callable[[str], None] = print,
) -> list[str]:
    """``apply`` on a session from ``sessions()``, on a new one if a run loses its
    coordinator, at most ``SCHEMA_RUNS_MAX`` runs. Returns what every run changed."""
    changed: list[str] = []
    holder: Any | None = None
    for run in range(1, SCHEMA_RUNS_MAX + 1):
        try:
            with sessions() as session:
                return apply(session, keyspace, replication, progress, changed, holder=holder)
        except CoordinatorLost as e:
            if run == SCHEMA_RUNS_MAX:
                raise SchemaError(f"{e} ({SCHEMA_RUNS_MAX} runs, each on a new session)") from e
            holder = e.holder or holder
            progress(f"  schema: {e}; again on a new session (run {run + 1}/{SCHEMA_RUNS_MAX})")
    raise AssertionError("unreachable")  # pragma: no cover


def _coordinator(session: Any) -> Any:
    """The one node this run's schema changes go through: the node of the driver's
    control connection, because that is where the driver asks whether the cluster agrees.
    Asked on another node, which may not have the change yet, "every node has the same
    version" can be true of the version before it (a QUORUM read then failed with
    INCOMPATIBLE_SCHEMA, the table being on some nodes only).

    Waited for, at most ``COORDINATOR_WAIT_S``, until it is up and the session has an
    open connection to it: a statement sent to a node without a pool fails at once
    ("Host has been marked down or removed"), to one whose pool has shut ("Pool is
    shutdown")."""

    def usable() -> Any | None:
        host = session.cluster.get_control_connection_host()
        return host if host is not None and host.is_up and _open_pool(session, host) else None

    host = _poll(usable)
    if host is None:
        last = session.cluster.get_control_connection_host()
        seen = "none" if last is None else (
            f"{last}, {'up' if last.is_up else 'not up'}, "
            f"{'an open pool' if _open_pool(session, last) else 'no open pool'}"
        )  # fmt: skip
        raise CoordinatorLost(
            f"no live Cassandra node to send schema changes to within "
            f"{COORDINATOR_WAIT_S:.0f}s (control connection: {seen}); read each node's "
            "system.log"
        )
    return host


def _wait_for_holder(session: Any, endpoint: Any) -> None:
    """Wait, at most ``COORDINATOR_WAIT_S``, for the node at ``endpoint`` to be up."""

    def up() -> Any | None:
        node = session.cluster.metadata.get_host(endpoint)
        return node if node is not None and node.is_up else None

    if _poll(up) is None:
        raise SchemaError(
            f"Cassandra node {endpoint} took a schema change and was lost before the "
            f"other nodes were seen to have it, and it is not up after "
            f"{COORDINATOR_WAIT_S:.0f}s: start it (its system.log says why it stopped), "
            "then apply the schema again; sending the change through another node "
            "first could create the same table twice"
        )


def _open_pool(session: Any, host: Any) -> bool:
    pool = session.get_pool_state().get(host)
    return bool(pool) and not pool["shutdown"] and pool["open_count"] > 0


def _poll(probe: Callable[[], T | None]) -> T | None:
    """What ``probe()`` returns once it is not None, asked every ``COORDINATOR_POLL_S``
    for at most ``COORDINATOR_WAIT_S``; None if it never was."""
    deadline = time.monotonic() + COORDINATOR_WAIT_S
    while (found := probe()) is None and time.monotonic() < deadline:
        time.sleep(COORDINATOR_POLL_S)
    return found


def _send(session: Any, host: Any, stmt: str) -> None:
    """One schema change through ``host``; returns once ``host`` has it (the caller
    waits for the cluster to agree, with ``_agree``, before anything uses it)."""
    future = session.execute_async(
        SimpleStatement(stmt, consistency_level=ConsistencyLevel.QUORUM),
        timeout=DDL_TIMEOUT_S,
        host=host,
    )
    try:
        future.result()
    except NoHostAvailable as e:
        # Not sent at all (no connection to the node): nothing can be on it alone. Sent,
        # then failed (the driver retries on the same node): it may have the change.
        sent = bool(future.attempted_hosts)
        raise CoordinatorLost(
            f"{host}, the node the schema changes go through, did not take: {stmt[:80]} ({e})",
            holder=host.endpoint if sent else None,
        ) from e
    except OperationTimedOut as e:
        raise CoordinatorLost(
            f"{host}, the node the schema changes go through, did not answer within "
            f"{DDL_TIMEOUT_S:.0f}s: {stmt[:80]}",
            holder=host.endpoint,
        ) from e


def _agree(session: Any, host: Any, what: str, sent: bool = False) -> None:
    """Wait until every live node reports the schema version ``host`` (the coordinator
    of the changes, where the driver asks) has. ``sent``: ``host`` has just taken a
    change."""
    holder = host.endpoint if sent else None
    if session.cluster.get_control_connection_host() != host:
        raise CoordinatorLost(
            f"the driver's control connection moved off {host} (the node the schema changes "
            f"go through) after: {what}",
            holder=holder,
        )
    control = session.cluster.control_connection
    try:
        agreed = control.wait_for_schema_agreement(wait_time=SCHEMA_AGREEMENT_TIMEOUT_S)
    except ConnectionShutdown as e:
        raise CoordinatorLost(
            f"the driver's control connection to {host} closed while waiting for agreement "
            f"after: {what}",
            holder=holder,
        ) from e
    if not agreed:
        raise SchemaError(
            f"Cassandra nodes did not agree on the schema within "
            f"{SCHEMA_AGREEMENT_TIMEOUT_S:.0f}s after: {what}; read each node's system.log"
        )
