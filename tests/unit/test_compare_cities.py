"""The cross-city comparison over each city's own rows: a row is named where a city lacks
it or holds it differently from the majority, whatever column differs."""

from __future__ import annotations

from dataclasses import replace

import pytest

from clearinghouse.audit.service import CityView, compare_views, row_digest
from clearinghouse.domain.chain import LedgerEntry

pytestmark = pytest.mark.unit


def _entry(seq: int, body: bytes = b"body") -> LedgerEntry:
    return LedgerEntry(
        shard=7, epoch=3, seq=seq, kind="DECISION", payment_key=f"INST/p-{seq}",
        body=body, prev_hash=b"\x01" * 32, entry_hash=bytes([seq]) * 32,
    )  # fmt: skip


def _view(city: str, entries: list[LedgerEntry], error: str = "") -> CityView:
    rows = frozenset((e.shard, e.seq, row_digest(e), e.entry_hash) for e in entries)
    return CityView(city, b"root", len(entries), rows, error=error)


def test_three_equal_cities_agree() -> None:
    rows = [_entry(1), _entry(2)]
    cmp = compare_views([_view(c, rows) for c in ("beijing", "shanghai", "shenzhen")])
    assert cmp.agree and all(d == [] for _, d in cmp.cities)


def test_a_changed_body_under_an_unchanged_stored_hash_is_named() -> None:
    good = [_entry(1), _entry(2)]
    forged = [_entry(1), replace(_entry(2), body=b"bodz")]  # same entry_hash column
    cmp = compare_views([_view("beijing", good), _view("shanghai", good),
                         _view("shenzhen", forged)])  # fmt: skip
    assert not cmp.agree
    diffs = {v.city: d for v, d in cmp.cities}
    assert diffs == {
        "beijing": [],
        "shanghai": [],
        "shenzhen": [f"shard 7 seq 2: differs ({(bytes([2]) * 32).hex()[:16]})"],
    }


def test_a_missing_row_and_an_unreadable_city_are_reported() -> None:
    good = [_entry(1), _entry(2)]
    cmp = compare_views([_view("beijing", good), _view("shanghai", good[:1]),
                         _view("shenzhen", [], error="cannot reach shenzhen")])  # fmt: skip
    diffs = {v.city: d for v, d in cmp.cities}
    # Two readable cities that disagree: neither is the majority, both are named.
    assert diffs["shanghai"] == ["shard 7 seq 2: no majority (missing)"]
    assert diffs["beijing"] == [f"shard 7 seq 2: no majority ({(bytes([2]) * 32).hex()[:16]})"]
    assert diffs["shenzhen"] == []
    assert not cmp.agree
    # With all three readable, the majority decides.
    cmp = compare_views([_view("beijing", good), _view("shanghai", good[:1]),
                         _view("shenzhen", good)])  # fmt: skip
    assert {v.city: d for v, d in cmp.cities}["shanghai"] == ["shard 7 seq 2: missing"]


def test_every_column_is_in_the_digest() -> None:
    e = _entry(1)
    others = [
        replace(e, shard=8), replace(e, epoch=4), replace(e, seq=2), replace(e, kind="INTENT"),
        replace(e, payment_key="x"), replace(e, body=b"b"), replace(e, prev_hash=b"\x02" * 32),
        replace(e, entry_hash=b"\x03" * 32),
    ]  # fmt: skip
    digests = {row_digest(x) for x in [e, *others]}
    assert len(digests) == len(others) + 1
