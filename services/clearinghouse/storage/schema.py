"""The keyspace and its tables, applied idempotently.

The keyspace is replicated with ``NetworkTopologyStrategy`` over every city, as many
replicas per city as that city runs Cassandra nodes. Tables come from the numbered
``cql/NNN_*.cql`` files beside this module, applied in order; each applied file is
recorded with its checksum in ``schema_migrations`` so a changed file is refused rather
than silently half-applied. Statements are ``IF NOT EXISTS``: re-running is harmless.

Every schema change of a run goes to one coordinator, the node of the driver's control
connection, one after another, and the cluster is waited on to agree after each, before
the next statement: changes made concurrently through different coordinators are what
Cassandra 5.0 cannot reconcile safely, and the driver judges agreement from the control
connection's node, so that node must be the one that has the change first. The wait
covers the nodes the driver has not seen down, so the session
(``connect(cfg, for_schema_changes=True)``) connects to every running node: one that
connected to a single node would wait on the others' old versions until it timed out.

A run that loses its coordinator (the control connection moves, or the node stops
answering) stops with ``CoordinatorLost``; ``apply_with_fresh_sessions`` starts it again on
a new session, a bounded number of times. Every run first waits for the cluster to agree,
so a change the lost coordinator had made is everywhere before anything is sent again.
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

from cassandra import ConsistencyLevel
from cassandra.cluster import NoHostAvailable
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
    """The node this run's changes go through moved or stopped answering: nothing is
    wrong with the schema, and a run on a new session may finish it."""


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
) -> list[str]:
    """Create or align the keyspace, then apply pending migrations. Returns what changed,
    appended to ``changed`` if given (as it happens: a run that raises has its changes
    there)."""
    changed = [] if changed is None else changed
    host = _coordinator(session)
    # A previous run's last change may still be on its way from another coordinator.
    _agree(session, host, "before the first change of this run")
    # The keyspace name is checked against _NAME in keyspace_cql before any CQL uses it.
    repl = keyspace_cql(keyspace, replication)
    row = session.execute(
        "SELECT replication FROM system_schema.keyspaces WHERE keyspace_name = %s", (keyspace,)
    ).one()
    wanted = {dc: str(n) for dc, n in replication.items()}
    if row is None:
        _ddl(session, host, f"CREATE KEYSPACE IF NOT EXISTS {keyspace} WITH replication = {repl}")
        changed.append(f"created keyspace {keyspace} {dict(replication)}")
    else:
        current = {k: v for k, v in row.replication.items() if k != "class"}
        if current != wanted:
            _ddl(session, host, f"ALTER KEYSPACE {keyspace} WITH replication = {repl}")
            changed.append(f"altered keyspace {keyspace} replication {current} -> {wanted}")
    _ddl(
        session,
        host,
        f"CREATE TABLE IF NOT EXISTS {keyspace}.schema_migrations ("
        "version int PRIMARY KEY, name text, checksum text, applied_at timestamp)",
    )
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
            _ddl(session, host, stmt)
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
    for run in range(1, SCHEMA_RUNS_MAX + 1):
        try:
            with sessions() as session:
                return apply(session, keyspace, replication, progress, changed)
        except CoordinatorLost as e:
            if run == SCHEMA_RUNS_MAX:
                raise SchemaError(f"{e} ({SCHEMA_RUNS_MAX} runs, each on a new session)") from e
            progress(f"  schema: {e}; again on a new session (run {run + 1}/{SCHEMA_RUNS_MAX})")
    raise AssertionError("unreachable")  # pragma: no cover


def _coordinator(session: Any) -> Any:
    """The one node this run's schema changes go through: the node of the driver's
    control connection, because that is where the driver asks whether the cluster agrees.
    Asked on another node, which may not have the change yet, "every node has the same
    version" can be true of the version before it (a QUORUM read then failed with
    INCOMPATIBLE_SCHEMA, the table being on some nodes only).

    Waited for, at most ``COORDINATOR_WAIT_S``, until it is up and the session has a
    connection pool to it: a statement sent to a node without one fails at once
    ("Host has been marked down or removed")."""
    deadline = time.monotonic() + COORDINATOR_WAIT_S
    while True:
        host = session.cluster.get_control_connection_host()
        if host is not None and host.is_up and host in session.get_pool_state():
            return host
        if time.monotonic() >= deadline:
            seen = "none" if host is None else f"{host} ({'up' if host.is_up else 'down'}, no pool)"
            raise CoordinatorLost(
                f"no live Cassandra node to send schema changes to within "
                f"{COORDINATOR_WAIT_S:.0f}s (control connection: {seen}); read each node's "
                "system.log"
            )
        time.sleep(COORDINATOR_POLL_S)


def _ddl(session: Any, host: Any, stmt: str) -> None:
    """One schema change through ``host``; returns once every live node has it."""
    try:
        session.execute(
            SimpleStatement(stmt, consistency_level=ConsistencyLevel.QUORUM),
            timeout=DDL_TIMEOUT_S,
            host=host,
        )
    except NoHostAvailable as e:
        raise CoordinatorLost(
            f"{host}, the node the schema changes go through, did not take: {stmt[:80]} ({e})"
        ) from e
    _agree(session, host, stmt[:80])


def _agree(session: Any, host: Any, what: str) -> None:
    """Wait until every live node reports the schema version ``host`` (the coordinator
    of the changes, where the driver asks) has."""
    if session.cluster.get_control_connection_host() != host:
        raise CoordinatorLost(
            f"the driver's control connection moved off {host} (the node the schema changes "
            f"go through) after: {what}"
        )
    control = session.cluster.control_connection
    if not control.wait_for_schema_agreement(wait_time=SCHEMA_AGREEMENT_TIMEOUT_S):
        raise SchemaError(
            f"Cassandra nodes did not agree on the schema within "
            f"{SCHEMA_AGREEMENT_TIMEOUT_S:.0f}s after: {what}; read each node's system.log"
        )
