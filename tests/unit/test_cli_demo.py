"""``clearingctl demo``'s ledger table."""

from __future__ import annotations

import pytest

from clearinghouse import demo

pytestmark = pytest.mark.unit


def test_the_ledger_table_keeps_its_columns_for_long_participant_ids() -> None:
    totals = {
        ("INST_ALIPAY", "CNY"): [1_250_000, 300],
        ("INST_A_PARTICIPANT_WITH_A_LONG_ID", "USD"): [12, 98_765_432_100],
        ("BANK_ICBC", "CNY"): [300, 1_250_000],
    }
    header, *rows = demo.ledger_table(totals)
    assert header.split() == ["PARTICIPANT", "CCY", "DEBITS", "CREDITS", "NET"]
    assert len(rows) == 3 and len({len(line) for line in [header, *rows]}) == 1
    currency_at = header.index("CCY")
    amounts_end = [header.index(h) + len(h) for h in ("DEBITS", "CREDITS", "NET")]
    for line in rows:  # each currency under CCY, each amount ending where its heading ends
        assert line[currency_at : currency_at + 3] in ("CNY", "USD"), line
        assert line[currency_at - 2 : currency_at] == "  ", line  # apart from the id
        for end in amounts_end:
            assert line[end - 1].isdigit() and line[end : end + 1] in (" ", ""), line
    long_row = next(line for line in rows if "LONG_ID" in line)
    assert long_row.split() == [
        "INST_A_PARTICIPANT_WITH_A_LONG_ID", "USD", "12", "98,765,432,100", "-98,765,432,088",
    ]  # fmt: skip
