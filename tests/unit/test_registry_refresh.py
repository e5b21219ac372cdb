"""The node's periodic refresh of participants and revoked certificates, when reads fail:
each read on its own, the revocation list never shrinks, a stale list is said at ERROR
with how long it has been stale, and said again when it is fresh."""

from __future__ import annotations

import logging

import pytest

from clearinghouse.security import pki
from clearinghouse.security.revocation import RevocationList, Revocations
from clearinghouse.storage.revocations import CassandraRevocations
from clearinghouse.switch.refresh import RegistryRefresh
from tests.fakes import FakeClock, FakeCqlSession

pytestmark = pytest.mark.unit

INTERVAL_S = 2.0
OPERATOR = pki.operator()


class Cassandra:
    """The revocations table one node writes and another reads, with an outage switch."""

    def __init__(self) -> None:
        self.session = FakeCqlSession()
        self.down = False

    def execute(self, stmt: object, values: object = ()) -> object:
        if self.down:
            raise ConnectionError("no replica answered (QUORUM)")
        return self.session.execute(stmt, values)  # type: ignore[arg-type]

    def prepare(self, cql: str) -> object:
        return self.session.prepare(cql)


class Node:
    def __init__(self, cassandra: Cassandra, clock: FakeClock) -> None:
        self.revoked = RevocationList()
        self.revocations = Revocations(CassandraRevocations(cassandra), self.revoked, clock)  # type: ignore[arg-type]
        self.participant_reads = 0
        self.participants_fail = False
        self.refresh = RegistryRefresh(
            self.read_participants,
            lambda: self.revoked.merge(self.revocations.all()),
            INTERVAL_S,
            clock=lambda: clock() / 1e6,
        )

    def read_participants(self) -> None:
        self.participant_reads += 1
        if self.participants_fail:
            raise ConnectionError("participants table unreadable")

    def revoke(self, serial: str) -> None:
        self.revocations.revoke(
            serial, "institution:INST_X", "key lost", by=OPERATOR, by_serial=0xFFFF
        )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_a_revocation_taken_on_another_node_is_refused_after_one_round(
    clock: FakeClock,
) -> None:
    cassandra = Cassandra()
    here, there = Node(cassandra, clock), Node(cassandra, clock)
    there.revoke("7a3f")
    assert 0x7A3F in there.revoked and 0x7A3F not in here.revoked
    assert here.refresh.round() is True
    assert 0x7A3F in here.revoked


def test_a_failing_participant_read_does_not_hold_back_revocations(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    cassandra = Cassandra()
    here, there = Node(cassandra, clock), Node(cassandra, clock)
    here.participants_fail = True
    there.revoke("0bad")
    with caplog.at_level(logging.WARNING, logger="clearinghouse.switch.refresh"):
        assert here.refresh.round() is True
    assert 0x0BAD in here.revoked
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "participant registry refresh failed" in caplog.records[0].getMessage()


def test_a_stale_list_is_an_error_naming_how_long_then_a_warning_when_fresh(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    cassandra = Cassandra()
    here, there = Node(cassandra, clock), Node(cassandra, clock)
    there.revoke("01")
    assert here.refresh.round() is True
    assert here.refresh.stale_s() == 0.0
    cassandra.down = True
    stale: list[float] = []
    with caplog.at_level(logging.WARNING, logger="clearinghouse.switch.refresh"):
        for _ in range(3):
            clock.sleep(INTERVAL_S)
            assert here.refresh.round() is False
            stale.append(here.refresh.stale_s())
        # The participants were still read every round.
        assert here.participant_reads == 4
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert [r.getMessage().split(" s:")[0] for r in errors] == [
            "revoked certificates not refreshed for 2",
            "revoked certificates not refreshed for 4",
            "revoked certificates not refreshed for 6",
        ]
        assert stale == [2.0, 4.0, 6.0]
        # Nothing read is ever dropped: the list from before the outage still refuses.
        assert 0x01 in here.revoked
        caplog.clear()
        cassandra.down = False
        there.revoke("02")
        clock.sleep(INTERVAL_S)
        assert here.refresh.round() is True
    assert 0x01 in here.revoked and 0x02 in here.revoked
    assert here.refresh.stale_s() == 0.0
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, "revoked certificates refreshed again after 8 s")
    ]


def test_a_failed_read_never_drops_a_serial_this_node_revoked_itself(clock: FakeClock) -> None:
    cassandra = Cassandra()
    here = Node(cassandra, clock)
    here.revoke("abc")
    cassandra.down = True
    clock.sleep(INTERVAL_S)
    assert here.refresh.round() is False
    assert 0xABC in here.revoked
