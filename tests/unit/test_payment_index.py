"""The payments-by-time index (``CassandraLedger.list_index``) over an in-memory session:
a bank's listing keeps every institution's payment, paging neither repeats nor skips a
row, and the range starts exactly at its start."""

from __future__ import annotations

import pytest

from clearinghouse.domain import InvalidArgument
from clearinghouse.storage.ledger import DAY_US, CassandraLedger, index_values
from clearinghouse.switch.ports import IndexRow
from tests.fakes import START_US, FakeCqlSession

pytestmark = pytest.mark.unit

BANK = "BANK_ICBC"


def indexed(rows: list[IndexRow]) -> CassandraLedger:
    """A ledger whose index holds ``rows``, written as the group commit writes them."""
    ledger = CassandraLedger(FakeCqlSession())
    for row in rows:
        ledger.session.execute(ledger._insert_time, index_values(row))
    return ledger


def as_committed(institution_id: str, payment_id: str, at_us: int) -> list[IndexRow]:
    """The two rows a payment's intent writes: the institution's, and its bank's."""
    return [
        IndexRow(institution_id, payment_id, at_us),
        IndexRow(institution_id, payment_id, at_us, BANK),
    ]


def list_all(ledger: CassandraLedger, who: str, page_size: int) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    token = ""
    while True:
        page, token = ledger.list_index(who, START_US, START_US + DAY_US, page_size, token)
        assert len(page) <= page_size
        out += page
        if not token:
            return out


def test_two_institutions_same_payment_id_same_microsecond_are_both_listed() -> None:
    ledger = indexed([
        *as_committed("INST_WECHAT", "p-1", START_US + 5),
        *as_committed("INST_ALIPAY", "p-1", START_US + 5),
        *as_committed("INST_ALIPAY", "p-0", START_US + 5),
        *as_committed("INST_ALIPAY", "p-2", START_US + 9),
    ])  # fmt: skip
    everything = [("INST_ALIPAY", "p-0"), ("INST_ALIPAY", "p-1"), ("INST_WECHAT", "p-1"),
                  ("INST_ALIPAY", "p-2")]  # fmt: skip
    for page_size in (1, 2, 3, 100):
        assert list_all(ledger, BANK, page_size) == everything, page_size
    assert list_all(ledger, "INST_WECHAT", 1) == [("INST_WECHAT", "p-1")]
    assert list_all(ledger, "INST_ALIPAY", 2) == [
        ("INST_ALIPAY", "p-0"), ("INST_ALIPAY", "p-1"), ("INST_ALIPAY", "p-2"),
    ]  # fmt: skip


def test_the_range_is_start_inclusive_end_exclusive_across_days() -> None:
    ledger = indexed([
        *as_committed("INST_ALIPAY", "before", START_US - 1),
        *as_committed("INST_ALIPAY", "first", START_US),
        *as_committed("INST_ALIPAY", "next-day", START_US + DAY_US - 1),
        *as_committed("INST_ALIPAY", "at-end", START_US + DAY_US),
    ])  # fmt: skip
    assert list_all(ledger, BANK, 1) == [("INST_ALIPAY", "first"), ("INST_ALIPAY", "next-day")]


def test_a_token_from_elsewhere_is_refused() -> None:
    ledger = indexed([])
    for token in ("not base64!", "MTIz", "eHx5fHo="):  # "123", "x|y|z"
        with pytest.raises(InvalidArgument) as e:
            ledger.list_index(BANK, START_US, START_US + 1, 10, token)
        assert e.value.violations[0].field == "page_token"
