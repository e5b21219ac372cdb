"""Applying the schema: every change through one coordinator, agreement before a record.

A fake session stands in for the driver's; it logs each statement with the node it was
sent to, and each wait for agreement, in one sequence.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from cassandra import InvalidRequest, OperationTimedOut
from cassandra.cluster import NoHostAvailable

from clearinghouse.storage import schema

pytestmark = pytest.mark.unit

KEYSPACE = "clearing"
REPLICATION = {"beijing": 1, "shanghai": 1, "shenzhen": 1}
AGREE = "<agreement>"
SCHEMA_CHANGES = ("CREATE", "ALTER", "DROP")


@dataclass(frozen=True)
class FakeHost:
    address: str
    is_up: bool = True

    @property
    def endpoint(self) -> str:
        return f"{self.address}:9042"

    def __str__(self) -> str:
        return self.endpoint


class FakeFuture:
    def __init__(self, run: Any, sent: bool) -> None:
        self.run = run
        self.attempted_hosts: list[Any] = []
        self.sent = sent

    def result(self) -> Any:
        if self.sent:
            self.attempted_hosts.append("the coordinator")
        return self.run()


class Rows(list[Any]):
    def one(self) -> Any:
        return self[0] if self else None


@dataclass
class FakeSession:
    hosts: list[FakeHost]
    agrees: bool = True
    applied: list[tuple[int, str]] = field(default_factory=list)
    log: list[tuple[str, FakeHost | None]] = field(default_factory=list)
    waits: list[float | None] = field(default_factory=list)
    # How many statements starting so time out before one is answered.
    timeouts: dict[str, int] = field(default_factory=dict)
    refuse: str | None = None  # statements starting so fail for good
    moves_after: int | None = None  # the control connection moves after this many changes
    pool_after_polls: int = 0  # pools asked about before the first one is open
    unreachable_after: int | None = None  # changes taken before the coordinator goes dark
    # Changes taken before one is taken and not answered in time, or (``lost_after_sent``)
    # taken and then the connection fails (NoHostAvailable after the driver tried it).
    silent_after: int | None = None
    lost_after_sent: bool = False
    down: frozenset[str] = frozenset()  # endpoints the session's metadata has down
    polls: int = 0

    @property
    def cluster(self) -> Any:
        session = self

        class Control:
            def wait_for_schema_agreement(self, wait_time: float | None = None) -> bool:
                session.log.append((AGREE, None))
                session.waits.append(wait_time)
                return session.agrees

        class Metadata:
            def get_host(self, endpoint: str) -> FakeHost | None:
                known = {h.endpoint: h for h in session.hosts}
                if endpoint not in known:
                    return None
                return replace(known[endpoint], is_up=endpoint not in session.down)

        class Cluster:
            control_connection = Control()
            metadata = Metadata()

            def get_control_connection_host(self) -> FakeHost | None:
                return session.control_host()

        return Cluster()

    def control_host(self) -> FakeHost | None:
        """The control connection's node: the first host, or the next one after
        ``moves_after`` schema changes were sent."""
        sent = len(self.ddl())
        index = 1 if self.moves_after is not None and sent > self.moves_after else 0
        return self.hosts[index] if len(self.hosts) > index else None

    def get_pool_state(self) -> dict[FakeHost, dict[str, Any]]:
        self.polls += 1
        return self.pools()

    def pools(self) -> dict[FakeHost, dict[str, Any]]:
        if self.polls <= self.pool_after_polls:
            return {}
        return {h: {"shutdown": False, "open_count": 1} for h in self.hosts}

    def execute_async(self, query: Any, params: Any = None, **kw: Any) -> FakeFuture:
        text = getattr(query, "query_string", query)
        sent_before = len(self.ddl())
        if self.silent_after is not None and sent_before >= self.silent_after:
            self.log.append((text, kw.get("host")))
            if self.lost_after_sent:
                error: Exception = NoHostAvailable("Unable to complete", {kw.get("host"): "gone"})
            else:
                error = OperationTimedOut("no answer")

            def fail() -> Any:
                raise error

            return FakeFuture(fail, sent=True)
        host = kw.get("host")
        reachable = host in self.pools() and (
            self.unreachable_after is None or sent_before < self.unreachable_after
        )
        # The driver sends nothing to a node it has no connection to.
        return FakeFuture(lambda: self.execute(query, params, **kw), sent=reachable)

    def set_keyspace(self, keyspace: str) -> None:
        assert keyspace == KEYSPACE

    def execute(self, query: Any, params: Any = None, **kw: Any) -> Rows:
        text = getattr(query, "query_string", query)
        host = kw.get("host")
        unreachable = self.unreachable_after is not None and (
            len(self.ddl()) >= self.unreachable_after
        )
        if host is not None and (unreachable or host not in self.pools()):
            # What the driver answers for a node the session has no connection to.
            raise NoHostAvailable(
                "Unable to complete the operation against any hosts",
                {host: "Host has been marked down or removed"},
            )
        self.log.append((text, host))
        if self.refuse and text.startswith(self.refuse):
            raise InvalidRequest("not a transient error")
        for prefix, left in self.timeouts.items():
            if left and text.startswith(prefix):
                self.timeouts[prefix] = left - 1
                raise OperationTimedOut("a replica that died is not yet known dead")
        if text.startswith("SELECT version"):
            return Rows(type("R", (), {"version": v, "checksum": c})() for v, c in self.applied)
        if text.startswith("INSERT INTO"):
            version, _name, checksum = params
            self.applied.append((version, checksum))
        return Rows()

    def ddl(self) -> list[tuple[str, FakeHost | None]]:
        return [(t, h) for t, h in self.log if t.startswith(SCHEMA_CHANGES)]


def test_every_change_goes_to_the_node_the_driver_asks_about_agreement() -> None:
    hosts = [FakeHost("127.0.3.1"), FakeHost("127.0.1.1"), FakeHost("127.0.2.1")]
    s = FakeSession(hosts)
    changed = schema.apply(s, KEYSPACE, REPLICATION, progress=lambda _: None)

    ddl = s.ddl()
    assert len(ddl) == 2 + sum(len(m.statements) for m in schema.migrations())
    # The control connection's node (the first here), not the lowest address.
    assert {h for _, h in ddl} == {FakeHost("127.0.3.1")}
    assert changed[0].startswith("created keyspace")
    assert len(changed) == 1 + len(schema.migrations())


def test_a_control_connection_that_moves_stops_the_run() -> None:
    s = FakeSession([FakeHost("127.0.1.1"), FakeHost("127.0.2.1")], moves_after=3)
    with pytest.raises(schema.CoordinatorLost, match="control connection moved off") as e:
        schema.apply(s, KEYSPACE, REPLICATION, progress=lambda _: None)
    # Changes 1-3: the keyspace, schema_migrations, migration 001 (then recorded); the
    # move came with migration 002, which was not waited on as if agreed, nor recorded.
    assert len(s.ddl()) == 3 + len(schema.migrations()[1].statements)
    assert len([t for t, _ in s.log if t.startswith("INSERT INTO")]) == 1
    assert e.value.holder == "127.0.1.1:9042"  # it took 002's changes


def test_the_cluster_agrees_after_each_migration_before_it_is_recorded_or_used() -> None:
    s = FakeSession([FakeHost("127.0.1.1")])
    schema.apply(s, KEYSPACE, REPLICATION, progress=lambda _: None)

    def token(text: str) -> str:
        if text == AGREE:
            return "A"
        if text.startswith(SCHEMA_CHANGES):
            return "D"
        return (
            "R" if text.startswith("SELECT version") else "I" if text.startswith("INSERT") else ""
        )

    seen = "".join(token(t) for t, _ in s.log)
    # Agreement before the first change (a previous run's last one may still be
    # spreading), after the keyspace and schema_migrations (before they are read), and
    # after each migration's changes (before it is recorded, and before the next one).
    expected = "ADDAR" + "".join("D" * len(m.statements) + "AI" for m in schema.migrations())
    assert seen == expected
    # Each with its own bound: a session made for schema changes has the driver's set
    # to 0, and without one the driver would not wait at all.
    assert set(s.waits) == {schema.SCHEMA_AGREEMENT_TIMEOUT_S}


def test_without_agreement_nothing_is_recorded() -> None:
    s = FakeSession([FakeHost("127.0.1.1")], agrees=False)
    with pytest.raises(schema.SchemaError, match="did not agree"):
        schema.apply(s, KEYSPACE, REPLICATION, progress=lambda _: None)
    assert not [t for t, _ in s.log if t.startswith("INSERT INTO")]


def test_applied_migrations_are_skipped_and_a_changed_one_is_refused() -> None:
    done = schema.migrations()
    s = FakeSession([FakeHost("127.0.1.1")], applied=[(m.version, m.checksum) for m in done])
    assert schema.apply(s, KEYSPACE, REPLICATION, progress=lambda _: None) == [
        f"created keyspace {KEYSPACE} {REPLICATION}"
    ]
    assert [t for t, _ in s.ddl() if not t.startswith("CREATE KEYSPACE")] == [
        t for t, _ in s.ddl() if "schema_migrations" in t
    ]

    s = FakeSession([FakeHost("127.0.1.1")], applied=[(done[0].version, "edited")])
    with pytest.raises(schema.SchemaError, match="changed after it was applied"):
        schema.apply(s, KEYSPACE, REPLICATION, progress=lambda _: None)


@pytest.fixture()
def short_coordinator_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(schema, "COORDINATOR_WAIT_S", 0.2)
    monkeypatch.setattr(schema, "COORDINATOR_POLL_S", 0.01)


def test_no_live_node_is_refused_before_anything_is_sent(short_coordinator_wait: None) -> None:
    s = FakeSession([FakeHost("127.0.1.1", is_up=False), FakeHost("127.0.2.1")])
    with pytest.raises(
        schema.CoordinatorLost, match=r"no live Cassandra node.*127\.0\.1\.1:9042, not up"
    ):
        schema.apply(s, KEYSPACE, REPLICATION, progress=lambda _: None)
    assert s.log == []


def test_a_pool_still_opening_is_waited_for_before_the_first_change(
    short_coordinator_wait: None,
) -> None:
    # CI once sent the first change while only another node's pool was open: the driver
    # answered NoHostAvailable ("Host has been marked down or removed") at once. The
    # fake answers so too, for a node without a pool.
    s = FakeSession([FakeHost("127.0.3.1"), FakeHost("127.0.1.1")], pool_after_polls=3)
    changed = schema.apply(s, KEYSPACE, REPLICATION, progress=lambda _: None)
    assert len(changed) == 1 + len(schema.migrations())
    assert {h for _, h in s.ddl()} == {FakeHost("127.0.3.1")}


def test_a_pool_that_never_opens_is_given_up_within_the_bound(
    short_coordinator_wait: None,
) -> None:
    s = FakeSession([FakeHost("127.0.3.1")], pool_after_polls=10**6)
    with pytest.raises(schema.CoordinatorLost, match=r"127\.0\.3\.1:9042, up, no open pool\)"):
        schema.apply(s, KEYSPACE, REPLICATION, progress=lambda _: None)
    assert s.log == []
    # Polled until the bound, not once and not forever (and once more to say what it saw).
    assert 2 <= s.polls <= 2 + schema.COORDINATOR_WAIT_S / schema.COORDINATOR_POLL_S


def test_a_coordinator_without_a_connection_loses_the_run_holding_nothing() -> None:
    s = FakeSession([FakeHost("127.0.1.1")], unreachable_after=3)
    with pytest.raises(schema.CoordinatorLost, match="did not take: CREATE") as raised:
        schema.apply(s, KEYSPACE, REPLICATION, progress=lambda _: None)
    assert len(s.ddl()) == 3
    assert len(s.applied) == 1  # migration 001 only, recorded before the fourth change
    assert raised.value.holder is None  # the fourth was never sent


@pytest.mark.parametrize("lost_after_sent", [False, True], ids=["timed-out", "connection-lost"])
def test_a_change_sent_and_not_answered_is_held_by_its_coordinator(
    lost_after_sent: bool,
) -> None:
    s = FakeSession([FakeHost("127.0.1.1")], silent_after=3, lost_after_sent=lost_after_sent)
    with pytest.raises(schema.CoordinatorLost) as raised:
        schema.apply(s, KEYSPACE, REPLICATION, progress=lambda _: None)
    assert raised.value.holder == "127.0.1.1:9042"
    assert len(s.ddl()) == 4


def test_a_keyspace_created_before_the_run_was_lost_is_reported() -> None:
    s = FakeSession([FakeHost("127.0.1.1"), FakeHost("127.0.2.1")], moves_after=0)
    changed: list[str] = []
    with pytest.raises(schema.CoordinatorLost, match="moved off"):
        schema.apply(s, KEYSPACE, REPLICATION, lambda _: None, changed)
    assert changed == [f"created keyspace {KEYSPACE} {REPLICATION}"]


class Sessions:
    """Fresh fake sessions over one shared store of recorded migrations."""

    def __init__(self, *sessions: FakeSession) -> None:
        self.queue = list(sessions)
        self.opened: list[FakeSession] = []
        self.closed = 0

    @contextmanager
    def __call__(self) -> Iterator[FakeSession]:
        s = self.queue.pop(0)
        self.opened.append(s)
        try:
            yield s
        finally:
            self.closed += 1


def test_a_run_that_loses_its_coordinator_is_finished_on_a_new_session() -> None:
    applied: list[tuple[int, str]] = []
    hosts = [FakeHost("127.0.1.1"), FakeHost("127.0.2.1")]
    sessions = Sessions(
        FakeSession(hosts, applied=applied, moves_after=3),
        FakeSession(list(reversed(hosts)), applied=applied),
    )
    lines: list[str] = []
    changed = schema.apply_with_fresh_sessions(sessions, KEYSPACE, REPLICATION, lines.append)

    assert sessions.closed == 2
    first, second = sessions.opened
    assert [v for v, _ in applied] == [m.version for m in schema.migrations()]
    # Each migration applied and reported once: the second run skipped what the first
    # had recorded, and waited for agreement before its first change.
    assert [c for c in changed if c.startswith("applied")] == [
        f"applied migration {m.version:03d}_{m.name}" for m in schema.migrations()
    ]
    # The run was lost with migration 002 sent and not agreed (its fourth change on).
    assert len(first.ddl()) == 3 + len(schema.migrations()[1].statements)
    assert [t for t, _ in second.log].index(AGREE) < [t for t, _ in second.log].index(
        second.ddl()[0][0]
    )
    assert {h for _, h in second.ddl()} == {FakeHost("127.0.2.1")}
    assert any("again on a new session (run 2/3)" in line for line in lines)


def test_the_next_run_waits_for_the_node_that_may_hold_a_change(
    short_coordinator_wait: None,
) -> None:
    applied: list[tuple[int, str]] = []
    hosts = [FakeHost("127.0.1.1"), FakeHost("127.0.2.1")]
    # The first run's fourth change is sent to 127.0.1.1 and not answered.
    first = FakeSession(hosts, applied=applied, silent_after=3)
    # In the second session that node is down: nothing may be sent through the other.
    second = FakeSession(list(reversed(hosts)), applied=applied, down=frozenset({"127.0.1.1:9042"}))
    sessions = Sessions(first, second)
    with pytest.raises(schema.SchemaError, match=r"127\.0\.1\.1:9042 took a schema change") as e:
        schema.apply_with_fresh_sessions(sessions, KEYSPACE, REPLICATION, lambda _: None)
    assert not isinstance(e.value, schema.CoordinatorLost)  # not run a third time
    assert len(sessions.opened) == 2
    assert second.ddl() == []

    # Up in the next session: the run waits for agreement, then goes on.
    applied.clear()
    first = FakeSession(hosts, applied=applied, silent_after=3)
    second = FakeSession(list(reversed(hosts)), applied=applied)
    changed = schema.apply_with_fresh_sessions(
        Sessions(first, second), KEYSPACE, REPLICATION, lambda _: None
    )
    assert [v for v, _ in applied] == [m.version for m in schema.migrations()]
    assert len([c for c in changed if c.startswith("applied")]) == len(schema.migrations())


def test_runs_on_new_sessions_are_bounded() -> None:
    sessions = Sessions(
        *(FakeSession([FakeHost("127.0.1.1")], unreachable_after=0) for _ in range(5))
    )
    with pytest.raises(schema.SchemaError, match=r"\(3 runs, each on a new session\)"):
        schema.apply_with_fresh_sessions(sessions, KEYSPACE, REPLICATION, lambda _: None)
    assert len(sessions.opened) == schema.SCHEMA_RUNS_MAX == 3
    assert sessions.closed == 3


def test_a_cluster_that_does_not_agree_is_not_run_again() -> None:
    sessions = Sessions(FakeSession([FakeHost("127.0.1.1")], agrees=False))
    with pytest.raises(schema.SchemaError, match="did not agree") as raised:
        schema.apply_with_fresh_sessions(sessions, KEYSPACE, REPLICATION, lambda _: None)
    assert not isinstance(raised.value, schema.CoordinatorLost)
    assert len(sessions.opened) == 1


@pytest.fixture()
def no_pause(monkeypatch: pytest.MonkeyPatch) -> None:
    bounds = replace(schema.RECORD_RETRIES, backoff_min_s=0.0, backoff_max_s=0.0)
    monkeypatch.setattr(schema, "RECORD_RETRIES", bounds)


def test_a_timed_out_migrations_read_or_record_is_tried_again(no_pause: None) -> None:
    s = FakeSession([FakeHost("127.0.1.1")], timeouts={"SELECT version": 2, "INSERT INTO": 1})
    changed = schema.apply(s, KEYSPACE, REPLICATION, progress=lambda _: None)
    assert len(changed) == 1 + len(schema.migrations())
    assert len([t for t, _ in s.log if t.startswith("SELECT version")]) == 3
    records = [t for t, _ in s.log if t.startswith("INSERT INTO")]
    assert len(records) == len(schema.migrations()) + 1  # the first one timed out once


def test_retries_are_bounded_and_name_what_failed(no_pause: None) -> None:
    s = FakeSession([FakeHost("127.0.1.1")], timeouts={"SELECT version": 10**6})
    with pytest.raises(schema.SchemaError, match="reading schema_migrations at QUORUM"):
        schema.apply(s, KEYSPACE, REPLICATION, progress=lambda _: None)
    reads = [t for t, _ in s.log if t.startswith("SELECT version")]
    assert len(reads) == schema.RECORD_RETRIES.attempts_max
    assert not [t for t, _ in s.log if t.startswith("INSERT INTO")]


def test_an_error_that_is_not_transient_is_not_tried_again(no_pause: None) -> None:
    s = FakeSession([FakeHost("127.0.1.1")], refuse="SELECT version")
    with pytest.raises(InvalidRequest):
        schema.apply(s, KEYSPACE, REPLICATION, progress=lambda _: None)
    assert len([t for t, _ in s.log if t.startswith("SELECT version")]) == 1
