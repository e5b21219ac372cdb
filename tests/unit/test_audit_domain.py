"""The auditor's reads over the fakes: which window holds a payment, listing windows,
inclusion proofs, exports tied to the stored clearing, and the cross-city comparison's
choice of rows.

Windows are made by the real keeper and shard store (``tests/unit/settlement_world.py``)
and read back through :class:`~clearinghouse.audit.service.AuditDomain`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

import pytest

from clearinghouse.audit import service
from clearinghouse.audit.export import (
    CLEARING_FILE,
    ENTRIES_FILE,
    MANIFEST_FILE,
    Manifest,
    render_export,
)
from clearinghouse.audit.service import AuditDomain
from clearinghouse.domain import DataLoss, FailedPrecondition, NotFound, ParticipantKind
from clearinghouse.domain.clearing import WindowClearing
from clearinghouse.domain.merkle import verify_inclusion
from clearinghouse.ledger_view import read_window
from clearinghouse.settlement import (
    PART_CLEARING,
    PART_MERKLE_ROOT,
    stored_clearing,
    stored_kinds,
)
from clearinghouse.storage.windows import CassandraWindows
from clearinghouse.switch.records import PaymentRecord
from tests.fakes import FakeCqlSession, FakeLedger, fake_windows
from tests.unit.settlement_world import INSTITUTIONS, SettlementWorld, participant

pytestmark = pytest.mark.unit

WINDOW_COUNT = 30
CITIES = ("beijing", "shanghai", "shenzhen")


def audit_of(world: SettlementWorld, city_reader: Any = None) -> AuditDomain:
    return AuditDomain(
        ledger=world.ledger, windows=world.windows, kinds=world.kinds, cities=CITIES,
        city_reader=city_reader,
    )  # fmt: skip


@pytest.fixture(scope="module")
def many() -> Iterator[tuple[SettlementWorld, dict[int, list[PaymentRecord]]]]:
    """30 cleared windows with two payments each, and two payments in the open one."""
    world = SettlementWorld()
    paid: dict[int, list[PaymentRecord]] = {}
    for window_id in range(1, WINDOW_COUNT + 1):
        paid[window_id] = [world.pay(100 + window_id), world.pay(200 + window_id)]
        assert world.close_window() == window_id
    paid[0] = [world.pay(7), world.pay(8)]
    yield world, paid
    world.close()


def _pid(rec: PaymentRecord) -> tuple[str, str]:
    return rec.order.institution_id, rec.order.payment_id


def test_each_payment_is_in_the_window_its_cut_says_however_many_windows(
    many: tuple[SettlementWorld, dict[int, list[PaymentRecord]]],
) -> None:
    world, paid = many
    audit = audit_of(world)
    for window_id, recs in paid.items():
        for rec in recs:
            decision = world.decision(rec)
            assert audit.window_of(decision) == window_id, rec.key
            entries, holding = audit.payment_history(*_pid(rec))
            assert holding == window_id
            assert [e.kind for e in entries] == ["INTENT", "DECISION"]
    with pytest.raises(NotFound):
        audit.payment_history(INSTITUTIONS[0], "never-paid")


def test_windows_are_listed_by_window_not_by_event_row(
    many: tuple[SettlementWorld, dict[int, list[PaymentRecord]]],
) -> None:
    world, _ = many
    audit = audit_of(world)
    listed, next_before = audit.list_windows(20)
    assert [w.window_id for w in listed] == list(range(WINDOW_COUNT + 1, WINDOW_COUNT - 19, -1))
    assert next_before == WINDOW_COUNT - 18
    assert listed[0].state == "OPEN"
    assert {w.state for w in listed[1:]} == {"CLEARED"}
    assert all(len(w.events) == 3 for w in listed[1:])  # CLOSING, CLOSED, CLEARED, whole
    everything, none_older = audit.list_windows(200)
    assert [w.window_id for w in everything] == list(range(WINDOW_COUNT + 1, 0, -1))
    assert none_older == 0
    assert [w.window_id for w in world.windows.recent(3)] == [30, 29, 28]
    assert world.windows.recent(0) == []
    # Paged by window: every window once, in order, each page whole (the listing stopped
    # at the newest 200 and had no way on).
    pages, before = [], 0
    while True:
        page, before = audit.list_windows(7, before)
        pages.append([w.window_id for w in page])
        assert all(len(w.events) == 3 for w in page if w.state != "OPEN")
        if before == 0:
            break
    assert [i for p in pages for i in p] == list(range(WINDOW_COUNT + 1, 0, -1))
    assert {len(p) for p in pages[:-1]} == {7}
    assert [w.window_id for w in world.windows.recent(2, before_window_id=5)] == [4, 3]


def test_an_inclusion_proof_finds_the_window_of_an_old_payment(
    many: tuple[SettlementWorld, dict[int, list[PaymentRecord]]],
) -> None:
    world, paid = many
    audit = audit_of(world)
    for window_id in (1, 2, 15, WINDOW_COUNT):
        rec = paid[window_id][1]
        proof = audit.inclusion(0, *_pid(rec))
        stored = stored_clearing(world.windows, window_id)
        assert stored is not None
        assert (proof.window_id, proof.merkle_root) == (window_id, stored.merkle_root)
        assert proof.entry == world.decision(rec)
        assert verify_inclusion(proof.entry.entry_hash, proof.leaf_index, proof.tree_size,
                                proof.audit_path, proof.merkle_root)  # fmt: skip
        assert audit.inclusion(window_id, *_pid(rec)) == proof
    with pytest.raises(NotFound, match="not decided in window 2 but in window 1") as e:
        audit.inclusion(2, *_pid(paid[1][0]))
    assert e.value.reason == "PAYMENT_NOT_IN_WINDOW"
    with pytest.raises(NotFound, match="not decided in window 2 but in the open window"):
        audit.inclusion(2, *_pid(paid[0][0]))
    with pytest.raises(FailedPrecondition) as open_window:
        audit.inclusion(0, *_pid(paid[0][0]))
    assert open_window.value.reason == "WINDOW_NOT_CLOSED"


# -- exports ------------------------------------------------------------------------------


@pytest.fixture
def cleared() -> Iterator[SettlementWorld]:
    world = SettlementWorld()
    world.pay(1_000)
    world.pay(2_000, inst=INSTITUTIONS[1])
    world.close_window()
    yield world
    world.close()


def export_files(audit: AuditDomain, window_id: int) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for path, chunk in audit.export(window_id):
        out[path] = out.get(path, b"") + chunk
    return out


def test_the_export_is_the_stored_clearing_after_a_participant_registers(
    cleared: SettlementWorld,
) -> None:
    world = cleared
    stored = stored_clearing(world.windows, 1)
    assert stored is not None
    world.participants["BANK_NEW"] = participant("BANK_NEW", ParticipantKind.BANK)
    files = export_files(audit_of(world), 1)
    assert files[CLEARING_FILE].decode() == stored.clearing_json
    assert hashlib.sha256(files[CLEARING_FILE]).digest() == stored.clearing_digest
    assert Manifest.from_json(files[MANIFEST_FILE].decode()).merkle_root == stored.merkle_root
    assert "reconciliation/BANK_NEW.csv" not in files
    # A clearing computed again by the keeper (a second coordinator) keeps its kinds too.
    world.node_a.keeper._clear(1)
    assert stored_clearing(world.windows, 1) == stored


def test_the_streamed_export_is_the_rendered_export_byte_for_byte(
    cleared: SettlementWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The server makes each file when its turn comes and sends it in chunks (it used to
    # render the whole export, then copy it into chunks: 1.3 GiB kept by a node after a
    # window of 405 MiB of entries). What arrives must not change.
    world = cleared
    for _ in range(40):
        world.pay(1_500)
    world.close_window()
    monkeypatch.setattr(service, "EXPORT_CHUNK_BYTES", 1_000)
    audit = audit_of(world)
    chunks = list(audit.export(2))
    data = read_window(world.ledger, world.windows, 2)
    stored = stored_clearing(world.windows, 2)
    assert stored is not None
    rendered = render_export(2, data.entries_by_shard, data.referenced_intents,
                             stored_kinds(stored), signing_keys=audit.signing_keys())  # fmt: skip
    files: dict[str, bytes] = {}
    for path, chunk in chunks:
        files[path] = files.get(path, b"") + chunk
    assert files == {path: text.encode() for path, text in rendered.items()}
    assert [path for path, _ in chunks] == sorted(path for path, _ in chunks)  # path order
    assert all(len(chunk) <= 1_000 for _, chunk in chunks)
    entries = [chunk for path, chunk in chunks if path == ENTRIES_FILE]
    assert len(entries) > 3 and all(len(c) == 1_000 for c in entries[:-1])
    empty = [path for path, text in rendered.items() if not text]
    assert empty  # intents.jsonl: no decision of window 2 has its intent in window 1
    assert [(p, c) for p, c in chunks if p in empty] == [(p, b"") for p in sorted(empty)]


def test_an_export_that_differs_from_the_stored_clearing_is_refused(
    cleared: SettlementWorld,
) -> None:
    world = cleared
    stored = stored_clearing(world.windows, 1)
    assert stored is not None
    audit = audit_of(world)
    other_root = hashlib.sha256(b"another window").digest()
    world.windows.put_part(1, PART_MERKLE_ROOT, other_root.hex(), b"", world.clock())
    with pytest.raises(DataLoss) as root:
        export_files(audit, 1)
    assert root.value.reason == "STORED_ROOT_MISMATCH"
    assert other_root.hex() in root.value.message
    world.windows.put_part(1, PART_MERKLE_ROOT, stored.merkle_root.hex(), b"", world.clock())
    assert export_files(audit, 1)  # as stored again: exported

    # A stored clearing that is not what the window's entries give: a net changed.
    obj = json.loads(stored.clearing_json)
    obj["net_positions"][0]["net_minor"] += 1
    body = json.dumps(obj, sort_keys=True, separators=(",", ":")) + "\n"
    assert (
        WindowClearing.from_json(body).net_positions
        != WindowClearing.from_json(stored.clearing_json).net_positions
    )
    digest = hashlib.sha256(body.encode()).digest()
    world.windows.put_part(1, PART_CLEARING, body, digest, world.clock())
    with pytest.raises(DataLoss) as clearing:
        export_files(audit, 1)
    assert clearing.value.reason == "STORED_CLEARING_MISMATCH"
    assert digest.hex() in clearing.value.message


def test_a_window_not_cleared_is_not_exported(cleared: SettlementWorld) -> None:
    with pytest.raises(FailedPrecondition) as e:
        export_files(audit_of(cleared), 2)
    assert e.value.reason == "WINDOW_NOT_CLEARED"
    with pytest.raises(NotFound, match="no settlement window 99"):  # not "not cleared yet"
        export_files(audit_of(cleared), 99)


# -- the cross-city comparison ----------------------------------------------------------------


def _windows_copy(world: SettlementWorld, *, with_cuts: bool = True) -> CassandraWindows:
    session = FakeCqlSession()
    for table, rows in world.session.tables.items():
        if with_cuts or table != "window_cuts":
            session.tables[table] = {k: dict(v) for k, v in rows.items()}
    return fake_windows(session)


def test_compare_cities_reads_each_city_at_the_windows_positions(
    cleared: SettlementWorld,
) -> None:
    world = cleared
    decision = world.decision(world.pay(3_000))
    world.close_window()  # window 2: the one compared
    beijing = world.ledger.replica()
    shanghai = world.ledger.replica()
    shenzhen = world.ledger.replica()
    shenzhen.drop(decision.shard, decision.epoch, decision.seq)  # it missed one write
    replicas: dict[str, tuple[FakeLedger, CassandraWindows]] = {
        "beijing": (beijing, _windows_copy(world)),
        # Shanghai missed the cut rows: it is still read at the positions the others name.
        "shanghai": (shanghai, _windows_copy(world, with_cuts=False)),
        "shenzhen": (shenzhen, _windows_copy(world)),
    }
    closed: list[str] = []

    def reader(city: str) -> tuple[Any, Any, Any]:
        ledger, windows = replicas[city]
        return ledger, windows, lambda: closed.append(city)

    audit = audit_of(world, reader)
    cmp = audit.compare_cities(2)
    by_city = {v.city: (v, diff) for v, diff in cmp.cities}
    assert not cmp.agree
    assert by_city["shenzhen"][1] == [f"shard {decision.shard} seq {decision.seq}: missing"]
    assert by_city["beijing"][1] == by_city["shanghai"][1] == []
    stored = stored_clearing(world.windows, 2)
    assert stored is not None
    assert by_city["beijing"][0].merkle_root == by_city["shanghai"][0].merkle_root
    assert by_city["beijing"][0].merkle_root == stored.merkle_root
    assert by_city["shenzhen"][0].entry_count == by_city["beijing"][0].entry_count - 1
    assert sorted(closed) == sorted(CITIES)

    # A city that cannot be reached is reported, and the others are still compared: two
    # readable cities that disagree on a row are both named for it.
    def unreachable(city: str) -> tuple[Any, Any, Any]:
        if city == "shanghai":
            raise ConnectionError("no route")
        return reader(city)

    cmp = audit_of(world, unreachable).compare_cities(2)
    views = {v.city: (v, diff) for v, diff in cmp.cities}
    assert "no route" in views["shanghai"][0].error and views["shanghai"][1] == []
    row = f"shard {decision.shard} seq {decision.seq}"
    assert views["shenzhen"][1] == [f"{row}: no majority (missing)"]
    assert views["beijing"][1] == [f"{row}: no majority ({decision.entry_hash.hex()[:16]})"]
    assert not cmp.agree

    # The open window has no cuts to compare by yet; a window that does not exist is
    # NOT_FOUND (both were "no city's replica holds window N").
    with pytest.raises(FailedPrecondition) as open_window:
        audit_of(world, reader).compare_cities(3)
    assert open_window.value.reason == "WINDOW_NOT_CLOSED"
    with pytest.raises(NotFound):
        audit_of(world, reader).compare_cities(99)
