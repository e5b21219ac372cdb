"""Applying the schema: every change through one coordinator, agreement before a record.

A fake session stands in for the driver's; it logs each statement with the node it was
sent to, and each wait for agreement, in one sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from cassandra import InvalidRequest, OperationTimedOut

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

    def __str__(self) -> str:
        return f"{self.address}:9042"


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

    @property
    def cluster(self) -> Any:
        session = self

        class Control:
            def wait_for_schema_agreement(self, wait_time: float | None = None) -> bool:
                session.log.append((AGREE, None))
                session.waits.append(wait_time)
                return session.agrees

        class Cluster:
            control_connection = Control()

            def get_control_connection_host(self) -> FakeHost | None:
                return session.control_host()

        return Cluster()

    def control_host(self) -> FakeHost | None:
        """The control connection's node: the first host, or the next one after
        ``moves_after`` schema changes were sent."""
        sent = len(self.ddl())
        index = 1 if self.moves_after is not None and sent > self.moves_after else 0
        return self.hosts[index] if len(self.hosts) > index else None

    def get_pool_state(self) -> dict[FakeHost, object]:
        return {h: {} for h in self.hosts}

    def set_keyspace(self, keyspace: str) -> None:
        assert keyspace == KEYSPACE

    def execute(self, query: Any, params: Any = None, **kw: Any) -> Rows:
        text = getattr(query, "query_string", query)
        self.log.append((text, kw.get("host")))
        if self.refuse and text.startswith(self.refuse):
            raise InvalidRequest("not a transient error")
        for prefix, left in self.timeouts.items():
            if left and text.startswith(prefix):
                self.timeouts[prefix] = left - 1
                raise OperationTimedOut("a replica that died is not yet known dead")
        if text.startswith("SELECT version"):
            return Rows(type("R", (), {"version": v, "checksum": c})() for v, c in self.applied)
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
    with pytest.raises(schema.SchemaError, match="control connection moved off"):
        schema.apply(s, KEYSPACE, REPLICATION, progress=lambda _: None)
    assert len(s.ddl()) == 4  # the fourth change was not waited on as if agreed
    # Changes 1-3: the keyspace, schema_migrations, migration 001 (then recorded).
    assert len([t for t, _ in s.log if t.startswith("INSERT INTO")]) == 1


def test_the_cluster_agrees_after_every_change_before_anything_else_is_sent() -> None:
    s = FakeSession([FakeHost("127.0.1.1")])
    schema.apply(s, KEYSPACE, REPLICATION, progress=lambda _: None)

    texts = [t for t, _ in s.log]
    changes = [i for i, t in enumerate(texts) if t.startswith(SCHEMA_CHANGES)]
    assert changes
    for i in changes:
        assert texts[i + 1] == AGREE, texts[i]
    assert texts.count(AGREE) == len(changes)
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


def test_no_live_node_is_refused_before_anything_is_sent() -> None:
    s = FakeSession([FakeHost("127.0.1.1", is_up=False), FakeHost("127.0.2.1")])
    with pytest.raises(schema.SchemaError, match="no live Cassandra node"):
        schema.apply(s, KEYSPACE, REPLICATION, progress=lambda _: None)
    assert s.log == []


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
