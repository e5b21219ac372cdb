"""The simulated bank's book and behaviour, without gRPC: decisions, idempotency,
reversals, totals and the journal."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clearinghouse.bank import (
    REVERSED_BEFORE_ARRIVAL,
    BankBehaviour,
    BankControls,
    BankLedger,
    Decision,
    JournalError,
    SwitchRefReused,
    Transfer,
    TransferKind,
    TxnStatus,
)
from clearinghouse.bank import _ledger as bank_ledger
from clearinghouse.bank._behaviour import (
    CREDIT_DECLINE_CODES,
    DEBIT_DECLINE_CODES,
    parse_latency_ms,
)

pytestmark = pytest.mark.unit

APPROVE = Decision(approved=True, decline_code="")
DECLINE = Decision(approved=False, decline_code="INSUFFICIENT_FUNDS")


def _transfer(
    kind: TransferKind = TransferKind.DEBIT, amount: int = 1_000, ccy: str = "CNY"
) -> Transfer:
    return Transfer(
        kind=kind,
        institution_id="INST_A",
        bank_account="6222-0001",
        amount_minor=amount,
        currency=ccy,
    )


# ---- decisions -------------------------------------------------------------------------


def test_decisions_are_a_function_of_seed_and_ref() -> None:
    refs = [f"ref-{i}" for i in range(200)]
    a = BankBehaviour(approve_ratio=0.5, seed=7)
    b = BankBehaviour(approve_ratio=0.5, seed=7, latency_ms_max=9)
    other = BankBehaviour(approve_ratio=0.5, seed=8)
    first = [a.decide(TransferKind.DEBIT, r) for r in refs]
    assert first == [b.decide(TransferKind.DEBIT, r) for r in refs]
    assert first == [a.decide(TransferKind.DEBIT, r) for r in refs]
    assert first != [other.decide(TransferKind.DEBIT, r) for r in refs]


def test_approve_ratio_is_honoured() -> None:
    refs = [f"r{i}" for i in range(4_000)]
    assert all(
        BankBehaviour(approve_ratio=1.0).decide(TransferKind.DEBIT, r).approved for r in refs
    )
    assert not any(
        BankBehaviour(approve_ratio=0.0).decide(TransferKind.CREDIT, r).approved for r in refs
    )
    behaviour = BankBehaviour(approve_ratio=0.7, seed=3)
    share = sum(behaviour.decide(TransferKind.DEBIT, r).approved for r in refs) / len(refs)
    assert 0.66 < share < 0.74


def test_decline_codes_fit_the_direction() -> None:
    behaviour = BankBehaviour(approve_ratio=0.0, seed=1)
    debit_codes = {behaviour.decide(TransferKind.DEBIT, f"d{i}").decline_code for i in range(300)}
    credit_codes = {behaviour.decide(TransferKind.CREDIT, f"c{i}").decline_code for i in range(300)}
    assert debit_codes == set(DEBIT_DECLINE_CODES)
    assert credit_codes == set(CREDIT_DECLINE_CODES)
    assert BankBehaviour(approve_ratio=1.0).decide(TransferKind.DEBIT, "x").decline_code == ""


@pytest.mark.parametrize(
    "kwargs",
    [
        {"approve_ratio": 1.5},
        {"timeout_ratio": -0.1},
        {"latency_ms_min": 5, "latency_ms_max": 2},
        {"latency_ms_min": -1},
        {"hang_ms": -1},
    ],
)
def test_behaviour_rejects_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        BankBehaviour(**kwargs)  # type: ignore[arg-type]


def test_parse_latency_ms() -> None:
    assert parse_latency_ms("2-10") == (2, 10)
    assert parse_latency_ms("5") == (5, 5)
    for bad in ("10-2", "a-b", "-3", ""):
        with pytest.raises(ValueError):
            parse_latency_ms(bad)


def test_controls_toggle_and_notify() -> None:
    controls = BankControls(BankBehaviour(seed=4))
    heard: list[tuple[bool, bool]] = []
    controls.add_listener(lambda b: heard.append((b.outage, b.hang_all)))
    assert controls.toggle_outage() is True
    assert controls.toggle_hang_all() is True
    assert controls.toggle_outage() is False
    assert controls.update(hang_all=False).hang_all is False
    assert heard == [(True, False), (True, True), (False, True), (False, False)]
    assert controls.behaviour.seed == 4


# ---- the book ----------------------------------------------------------------------------


def test_repeat_returns_first_answer_and_applies_once() -> None:
    book = BankLedger("BANK_T")
    first = book.transfer("r1", _transfer(), APPROVE)
    again = book.transfer("r1", _transfer(), DECLINE)  # A repeat ignores the new decision.
    assert not first.replayed and again.replayed
    assert again.record == first.record
    assert first.record.status is TxnStatus.APPROVED
    assert book.totals()["CNY"].debits_applied_minor == 1_000
    assert book.totals()["CNY"].debits_applied == 1


def test_reusing_a_ref_for_another_transfer_is_refused() -> None:
    book = BankLedger("BANK_T")
    book.transfer("r1", _transfer(), APPROVE)
    with pytest.raises(SwitchRefReused):
        book.transfer("r1", _transfer(amount=999), APPROVE)
    with pytest.raises(SwitchRefReused):
        book.transfer("r1", _transfer(kind=TransferKind.CREDIT), APPROVE)
    assert book.totals()["CNY"].debits_applied == 1
    assert book.totals()["CNY"].credits_applied == 0


def test_reverse_semantics() -> None:
    book = BankLedger("BANK_T")
    book.transfer("ok", _transfer(kind=TransferKind.CREDIT, amount=500), APPROVE)
    book.transfer("no", _transfer(), DECLINE)
    assert book.reverse("ok", "BANK_TIMEOUT").status is TxnStatus.REVERSED
    assert book.reverse("ok", "BANK_TIMEOUT").status is TxnStatus.REVERSED
    assert book.reverse("no", "BANK_TIMEOUT").status is TxnStatus.DECLINED
    totals = book.totals()["CNY"]
    assert (totals.credits_applied_minor, totals.credits_reversed_minor) == (500, 500)
    assert totals.net_credits_minor == 0 and totals.reversals == 1
    # A repeat of a reversed transfer does not apply it again.
    repeat = book.transfer("ok", _transfer(kind=TransferKind.CREDIT, amount=500), APPROVE)
    assert repeat.replayed and repeat.record.status is TxnStatus.REVERSED
    assert book.totals()["CNY"].credits_applied == 1


def test_reverse_before_arrival_declines_the_late_transfer() -> None:
    book = BankLedger("BANK_T")
    tomb = book.reverse("late", "BANK_TIMEOUT")
    assert tomb.status is TxnStatus.DECLINED
    assert tomb.decline_code == REVERSED_BEFORE_ARRIVAL
    late = book.transfer("late", _transfer(), APPROVE)
    assert late.record.status is TxnStatus.DECLINED
    assert late.record.decline_code == REVERSED_BEFORE_ARRIVAL
    assert book.inquire("late") == tomb
    assert book.totals() == {}


def test_bank_refs_are_unique_and_numbered() -> None:
    book = BankLedger("BANK_T")
    refs = [book.transfer(f"r{i}", _transfer(), APPROVE).record.bank_ref for i in range(3)]
    refs.append(book.reverse("never", "X").bank_ref)
    assert refs == [f"BANK_T-{i:010d}" for i in range(1, 5)]


# ---- the journal -------------------------------------------------------------------------


def test_journal_replays_records_and_totals(tmp_path: Path) -> None:
    path = tmp_path / "bank.jsonl"
    book = BankLedger("BANK_T", path)
    book.transfer("a", _transfer(amount=100), APPROVE)
    book.transfer("b", _transfer(kind=TransferKind.CREDIT, amount=40, ccy="USD"), APPROVE)
    book.transfer("c", _transfer(), DECLINE)
    book.reverse("a", "TEST")
    book.reverse("z", "TEST")
    records = {ref: book.inquire(ref) for ref in "abcz"}
    totals = book.totals()
    book.close()
    with pytest.raises(JournalError, match="closed"):
        book.inquire("a")  # the book is its journal: closed, it answers nothing

    again = BankLedger("BANK_T", path)
    assert {ref: again.inquire(ref) for ref in "abcz"} == records
    assert records["a"] is not None and records["a"].status is TxnStatus.REVERSED
    assert again.totals() == totals
    assert again.transfer(
        "b", _transfer(kind=TransferKind.CREDIT, amount=40, ccy="USD"), DECLINE
    ).replayed
    assert again.transfer("d", _transfer(), APPROVE).record.bank_ref == "BANK_T-0000000005"
    again.close()
    lines = path.read_text().splitlines()
    assert json.loads(lines[0])["op"] == "open"
    assert len(lines) == 1 + 5 + 1


def test_journal_torn_last_line_is_dropped(tmp_path: Path) -> None:
    path = tmp_path / "bank.jsonl"
    book = BankLedger("BANK_T", path)
    book.transfer("a", _transfer(), APPROVE)
    book.close()
    with path.open("a") as f:
        f.write('{"op":"transfer","ref":"b","sta')  # The process died mid-write.
    again = BankLedger("BANK_T", path)
    assert again.inquire("a") is not None and again.inquire("b") is None
    again.transfer("b", _transfer(), APPROVE)
    again.close()
    assert BankLedger("BANK_T", path).inquire("b") is not None


def test_journal_of_another_bank_or_damaged_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bank.jsonl"
    BankLedger("BANK_T", path).close()
    with pytest.raises(JournalError, match="BANK_T"):
        BankLedger("BANK_OTHER", path)
    with path.open("a") as f:
        f.write("not json\n")
    with pytest.raises(JournalError, match=":2:"):
        BankLedger("BANK_T", path)


_OPS = st.lists(
    st.tuples(
        st.sampled_from(["debit", "credit", "reverse"]),
        st.sampled_from([f"ref{i}" for i in range(6)]),
        st.booleans(),
    ),
    max_size=30,
)


@settings(max_examples=60, deadline=None)
@given(ops=_OPS)
def test_any_history_survives_a_restart_and_nets_out(ops: list[tuple[str, str, bool]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bank.jsonl"
        book = BankLedger("BANK_H", path)
        for op, ref, approve in ops:
            if op == "reverse":
                book.reverse(ref, "PROPERTY")
                continue
            kind = TransferKind.DEBIT if op == "debit" else TransferKind.CREDIT
            # A reference reused for the other direction is refused; that is tested above.
            with contextlib.suppress(SwitchRefReused):
                book.transfer(ref, _transfer(kind=kind, amount=7), APPROVE if approve else DECLINE)
        records = {ref: book.inquire(ref) for _, ref, _ in ops}
        totals = book.totals()
        book.close()
        replayed = BankLedger("BANK_H", path)
        assert replayed.totals() == totals
        assert {ref: replayed.inquire(ref) for _, ref, _ in ops} == records
        # What stands in the totals is exactly the APPROVED transfers in the book.
        standing = {TransferKind.DEBIT: 0, TransferKind.CREDIT: 0}
        for ref in {ref for _, ref, _ in ops}:
            record = replayed.inquire(ref)
            if record is not None and record.status is TxnStatus.APPROVED:
                assert record.transfer is not None
                standing[record.transfer.kind] += record.transfer.amount_minor
        totals = replayed.totals().get("CNY")
        assert (totals.net_debits_minor if totals else 0) == standing[TransferKind.DEBIT]
        assert (totals.net_credits_minor if totals else 0) == standing[TransferKind.CREDIT]
        replayed.close()


@pytest.mark.parametrize("stored", ["file", "memory"])
def test_a_record_is_read_back_whole_from_its_journal_line(tmp_path: Path, stored: str) -> None:
    # The book keeps only where each record's line starts; a line longer than one
    # read-back piece, and the records around it, come back exactly as written.
    book = BankLedger("BANK_T", tmp_path / "bank.jsonl" if stored == "file" else None)
    long = Transfer(
        kind=TransferKind.CREDIT,
        institution_id="INST_" + "L" * 3_000,
        bank_account="6222-" + "9" * 2_500,
        amount_minor=77,
        currency="CNY",
    )
    book.transfer("before", _transfer(), APPROVE)
    book.transfer("long", long, APPROVE)
    book.transfer("after", _transfer(amount=5), DECLINE)
    assert book.reverse("long", "TEST").status is TxnStatus.REVERSED
    got = book.inquire("long")
    assert got is not None and got.transfer == long and got.status is TxnStatus.REVERSED
    assert book.transfer("long", long, APPROVE).replayed
    with pytest.raises(SwitchRefReused):
        book.transfer("long", _transfer(), APPROVE)
    before, after = book.inquire("before"), book.inquire("after")
    assert before is not None and before.transfer == _transfer()
    assert after is not None and after.status is TxnStatus.DECLINED
    assert after.bank_ref == "BANK_T-0000000003"
    assert book.totals()["CNY"].net_credits_minor == 0


@pytest.mark.parametrize("failure", ["raises", "cut short"])
def test_a_failed_journal_write_leaves_the_book_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    """A full disk: the write of one transfer fails (or writes part of its line). That
    transfer is not booked; the journal is cut back, so every later record still reads
    back from its own line, now and after a restart."""
    path = tmp_path / "bank.jsonl"
    book = BankLedger("BANK_T", path)
    book.transfer("r1", _transfer(amount=1), APPROVE)
    real_write = os.write

    def full_disk(fd: int, data: bytes) -> int:
        monkeypatch.setattr(bank_ledger.os, "write", real_write)  # once
        if failure == "raises":
            raise OSError(28, "No space left on device")
        return real_write(fd, data[: len(data) // 2])

    monkeypatch.setattr(bank_ledger.os, "write", full_disk)
    with pytest.raises(OSError):
        book.transfer("r2", _transfer(amount=2), APPROVE)
    assert book.inquire("r2") is None and len(book) == 1
    book.transfer("r3", _transfer(amount=3), APPROVE)
    book.reverse("r1", "TEST")
    records = {ref: book.inquire(ref) for ref in ("r1", "r2", "r3")}
    assert records["r3"] is not None and records["r3"].transfer == _transfer(amount=3)
    assert records["r1"] is not None and records["r1"].status is TxnStatus.REVERSED
    book.close()
    again = BankLedger("BANK_T", path)
    assert {ref: again.inquire(ref) for ref in ("r1", "r2", "r3")} == records
