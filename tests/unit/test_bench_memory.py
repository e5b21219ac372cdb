"""How ``clearingctl bench`` reports resident memory: by process, by kind, in all, and
for the default cluster alone (the target is about that one)."""

from __future__ import annotations

import pytest

from clearinghouse.bench import memory_report

pytestmark = pytest.mark.unit

MIB = 2**20


def test_memory_is_given_for_the_default_cluster_apart_from_extra_banks() -> None:
    rss = {
        "cassandra@beijing-a": 1_200 * MIB,
        "etcd@beijing-a": 40 * MIB,
        "switch@beijing-a": 240 * MIB,
        "switch@beijing-b": 230 * MIB,
        "bank@BANK_ICBC": 90 * MIB,
        "bank@BANK_SLOW": 60 * MIB,  # a cluster test's bank, still running
    }
    got = memory_report(rss, default_banks={"BANK_ICBC", "BANK_CCB"})
    assert got["resident_memory_all_processes_mib"] == 1_860
    assert got["resident_memory_default_cluster_mib"] == 1_800
    assert got["resident_memory_not_default_cluster"] == ["bank@BANK_SLOW"]
    assert got["resident_memory_by_kind_mib"] == {
        "bank": 150, "cassandra": 1_200, "etcd": 40, "switch": 470,
    }  # fmt: skip
    assert got["resident_memory_by_process_mib"]["switch@beijing-b"] == 230
