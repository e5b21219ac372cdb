"""How sessions are made: the payment path's and the schema's (no server; the driver's
``Cluster`` is replaced by one that records what it was given)."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from cassandra.cluster import EXEC_PROFILE_DEFAULT

from clearinghouse.storage import session as storage_session

pytestmark = pytest.mark.unit

CFG = storage_session.CassandraConfig(
    contact_points=("127.0.1.1", "127.0.1.2", "127.0.2.1", "127.0.2.2", "127.0.3.1"),
    port=19042,
    local_dc="beijing",
)


class RecordingCluster:
    made: list[RecordingCluster] = []

    def __init__(self, **kw: Any) -> None:
        self.kw = kw
        self.connected: dict[str, Any] = {}
        RecordingCluster.made.append(self)

    def connect(self, keyspace: str | None = None, wait_for_all_pools: bool = False) -> str:
        self.connected = {"keyspace": keyspace, "wait_for_all_pools": wait_for_all_pools}
        return "session"


@pytest.fixture()
def recorded(monkeypatch: pytest.MonkeyPatch) -> type[RecordingCluster]:
    RecordingCluster.made = []
    monkeypatch.setattr(storage_session, "Cluster", RecordingCluster)
    return RecordingCluster


def _remote_hosts(c: RecordingCluster) -> int:
    policy = c.kw["execution_profiles"][EXEC_PROFILE_DEFAULT].load_balancing_policy
    return int(policy._child_policy.used_hosts_per_remote_dc)


def test_a_schema_session_waits_for_every_pool_and_leaves_no_node_out(
    recorded: type[RecordingCluster],
) -> None:
    storage_session.connect(CFG, for_schema_changes=True)
    (c,) = recorded.made
    # Schema changes go to one chosen node (the control connection's, in any city): its
    # pool must be open before the first change, and no node may be IGNORED.
    assert c.connected["wait_for_all_pools"] is True
    assert _remote_hosts(c) >= len(CFG.contact_points)
    assert c.kw["max_schema_agreement_wait"] == 0
    assert c.kw["schema_metadata_enabled"] is False


def test_the_payment_path_session_does_not_wait_for_remote_pools(
    recorded: type[RecordingCluster],
) -> None:
    storage_session.connect(CFG)
    (c,) = recorded.made
    assert c.connected["wait_for_all_pools"] is False
    assert _remote_hosts(c) == storage_session.REMOTE_HOSTS_PER_DC
    assert c.kw["max_schema_agreement_wait"] == storage_session.SCHEMA_AGREEMENT_WAIT_S


def test_only_cassandra_s_use_keyspace_warning_is_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    driver = logging.getLogger("cassandra.protocol")
    with caplog.at_level(logging.WARNING, logger="cassandra.protocol"):
        driver.warning("Server warning: %s", "`USE <keyspace>` with prepared statements is "
                       "considered to be an anti-pattern ...")  # fmt: skip
        driver.warning("Server warning: %s", "Batch for [clearing.t] is of size 51000")
    assert [r.getMessage() for r in caplog.records] == [
        "Server warning: Batch for [clearing.t] is of size 51000"
    ]
