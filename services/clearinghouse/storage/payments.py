"""The payment store on Cassandra: payment events, the time index, postings.

Every statement is prepared once. Writes use the topology's consistency (QUORUM: two
cities). ``begin`` is a conditional batch on the payment's own partition: the attempt
that wins it processes the payment; any other sees the winner's record.
"""

from __future__ import annotations

import base64
import builtins
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from cassandra import ConsistencyLevel
from cassandra.query import BatchStatement, BatchType

from clearinghouse._invariant import invariant
from clearinghouse.domain import (
    FieldViolation,
    InvalidArgument,
    PaymentEvent,
    PaymentState,
    Posting,
    canonical_bytes,
    order_from_canonical_bytes,
)
from clearinghouse.storage.retry import with_retries
from clearinghouse.switch.ports import OwedReversal, Page
from clearinghouse.switch.records import STEP_RECEIVED, PaymentRecord, StepRecord

DAY_US = 86_400 * 1_000_000
# Owed reversals are looked for in today's partition and this many days before it.
OWED_REVERSAL_DAYS_SCANNED = 2
LIST_DAYS_MAX = 31


def day_of(at_us: int) -> int:
    d = datetime.fromtimestamp(at_us / 1e6, tz=UTC)
    return d.year * 10000 + d.month * 100 + d.day


class CassandraPaymentStore:
    def __init__(self, session: Any, consistency: int = ConsistencyLevel.QUORUM) -> None:
        self.session = session
        self.cl = consistency
        p = session.prepare
        self._insert_event = p(
            "INSERT INTO payment_events (institution_id, payment_id, step, state, at_us, zone, "
            "detail, order_bytes, fingerprint, attempt_id, switch_ref, bank_ref, bank_id, shard) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        )
        self._insert_first = p(
            "INSERT INTO payment_events (institution_id, payment_id, step, state, at_us, zone, "
            "detail, order_bytes, fingerprint, attempt_id, switch_ref, bank_ref, bank_id, shard) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) IF NOT EXISTS"
        )
        self._select = p("SELECT * FROM payment_events WHERE institution_id = ? AND payment_id = ?")
        self._insert_time = p(
            "INSERT INTO payments_by_time (institution_id, day, received_at_us, payment_id) "
            "VALUES (?, ?, ?, ?)"
        )
        self._select_time = p(
            "SELECT received_at_us, payment_id FROM payments_by_time WHERE institution_id = ? "
            "AND day = ? AND (received_at_us, payment_id) > (?, ?) AND received_at_us < ? LIMIT ?"
        )
        self._insert_posting = p(
            "INSERT INTO postings (participant_id, currency, day, payment_key, leg, debit_minor, "
            "credit_minor, at_us, shard) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
        )
        self._insert_reversal = p(
            "INSERT INTO reversals_owed (day, payment_key, event, bank_id, switch_ref, at_us) "
            "VALUES (?, ?, ?, ?, ?, ?)"
        )
        self._select_reversals = p(
            "SELECT payment_key, event, bank_id, switch_ref FROM reversals_owed WHERE day = ?"
        )
        for stmt in (
            self._insert_reversal,
            self._select_reversals,
            self._insert_event,
            self._select,
            self._insert_time,
            self._select_time,
            self._insert_posting,
        ):
            stmt.consistency_level = self.cl
            stmt.is_idempotent = True
        self._insert_first.consistency_level = self.cl
        self._insert_first.serial_consistency_level = ConsistencyLevel.SERIAL

    # -- reads -------------------------------------------------------------------------

    def _rows(self, what: str, stmt: Any, values: tuple[Any, ...]) -> list[Any]:
        return with_retries(what, lambda: list(self.session.execute(stmt, values)))

    def load(self, institution_id: str, payment_id: str) -> PaymentRecord | None:
        rows = self._rows("reading a payment", self._select, (institution_id, payment_id))
        return _record_from_rows(rows)

    def list(
        self, institution_id: str, start_us: int, end_us: int, page_size: int, page_token: str
    ) -> Page:
        """Payments received in ``[start_us, end_us)``, oldest first, one page at a time.

        The page token is the last (received_at_us, payment_id) returned: the next page
        starts strictly after it, so concurrent inserts never repeat or skip a row that
        was already there.
        """
        if end_us - start_us > LIST_DAYS_MAX * DAY_US:
            raise InvalidArgument(
                [FieldViolation("end_time", f"a listing spans at most {LIST_DAYS_MAX} days")]
            )
        cursor = _decode_token(page_token) if page_token else (start_us - 1, "")
        out: list[PaymentRecord] = []
        day_start = (max(cursor[0], start_us) // DAY_US) * DAY_US
        while day_start < end_us and len(out) < page_size:
            limit = page_size - len(out)
            values = (institution_id, day_of(day_start), cursor[0], cursor[1], end_us, limit)
            rows = self._rows("listing payments", self._select_time, values)
            for r in rows:
                rec = self.load(institution_id, r.payment_id)
                if rec is not None:
                    out.append(rec)
                cursor = (r.received_at_us, r.payment_id)
            if len(rows) < limit:
                day_start += DAY_US
        more = len(out) >= page_size
        return Page(out, _encode_token(*cursor) if more else "")

    # -- writes ------------------------------------------------------------------------

    def begin(self, record: PaymentRecord) -> tuple[PaymentRecord, bool]:
        invariant(
            [s.step for s in record.steps][:1] == [STEP_RECEIVED],
            f"{record.key}: begin needs the RECEIVED step first",
        )
        o = record.order
        batch = BatchStatement(
            batch_type=BatchType.UNLOGGED,
            consistency_level=self.cl,
            serial_consistency_level=ConsistencyLevel.SERIAL,
        )
        first, *rest = record.steps
        batch.add(self._insert_first, self._event_values(record, first, with_order=True))
        for s in rest:
            batch.add(self._insert_event, self._event_values(record, s, with_order=False))
        result = with_retries("recording a new payment", lambda: self.session.execute(batch))
        if not result.was_applied:
            stored = self.load(o.institution_id, o.payment_id)
            invariant(stored is not None, f"{record.key}: conditional insert lost to a ghost")
            assert stored is not None
            # A retried attempt of ours that had in fact applied reads back as ours.
            return stored, stored.attempt_id == record.attempt_id
        rat = record.received_at_us
        with_retries(
            "indexing a new payment",
            lambda: self.session.execute(
                self._insert_time, (o.institution_id, day_of(rat), rat, o.payment_id)
            ),
        )
        return record, True

    def decide(
        self,
        record: PaymentRecord,
        step: StepRecord,
        postings: Sequence[Posting],
        *,
        reversal_owed: bool = False,
    ) -> None:
        # One logged batch: the decision, its postings and any reversal owed land
        # together or not at all.
        batch = BatchStatement(batch_type=BatchType.LOGGED, consistency_level=self.cl)
        batch.add(self._insert_event, self._event_values(record, step, with_order=False))
        day = day_of(step.event.at_us)
        if reversal_owed:
            batch.add(self._insert_reversal, (
                day, record.key, "OWED", record.bank_id, record.switch_ref, step.event.at_us,
            ))  # fmt: skip
        for p in postings:
            batch.add(self._insert_posting, (
                p.participant_id, p.currency, day, p.payment_key, p.leg.value,
                p.debit_minor, p.credit_minor, step.event.at_us, record.shard,
            ))  # fmt: skip
        batch.is_idempotent = True
        with_retries("recording a payment's decision", lambda: self.session.execute(batch))

    def owed_reversals(self, limit: int) -> Sequence[OwedReversal]:
        now_us = time.time_ns() // 1000
        out: builtins.list[OwedReversal] = []
        for back in range(OWED_REVERSAL_DAYS_SCANNED, -1, -1):
            day = day_of(now_us - back * DAY_US)
            rows = self._rows("reading owed reversals", self._select_reversals, (day,))
            done = {r.payment_key for r in rows if r.event == "CONFIRMED"}
            out += [
                OwedReversal(r.payment_key, r.bank_id, r.switch_ref, day)
                for r in rows
                if r.event == "OWED" and r.payment_key not in done
            ]
        return out[:limit]

    def confirm_reversal(self, owed: OwedReversal, at_us: int) -> None:
        values = (owed.day, owed.payment_key, "CONFIRMED", owed.bank_id, owed.switch_ref, at_us)
        with_retries(
            "confirming a reversal", lambda: self.session.execute(self._insert_reversal, values)
        )

    def _event_values(
        self, record: PaymentRecord, s: StepRecord, *, with_order: bool
    ) -> tuple[Any, ...]:
        o = record.order
        return (
            o.institution_id, o.payment_id, s.step, s.event.state.value, s.event.at_us,
            s.event.zone, s.event.detail,
            canonical_bytes(o) if with_order else None,
            record.fingerprint if with_order else None,
            record.attempt_id, record.switch_ref, s.bank_ref, record.bank_id, record.shard,
        )  # fmt: skip


def _record_from_rows(rows: Sequence[Any]) -> PaymentRecord | None:
    if not rows:
        return None
    first = rows[0]
    if first.step != STEP_RECEIVED or first.order_bytes is None:
        # Only later steps are visible (a partial read): treat as not yet there.
        return None
    steps = tuple(
        StepRecord(
            r.step,
            PaymentEvent(PaymentState(r.state), r.at_us, r.zone, r.detail or ""),
            r.bank_ref or "",
        )
        for r in rows
    )
    return PaymentRecord(
        order=order_from_canonical_bytes(first.order_bytes),
        fingerprint=first.fingerprint,
        attempt_id=first.attempt_id,
        shard=first.shard,
        switch_ref=first.switch_ref,
        bank_id=first.bank_id or "",
        received_zone=first.zone,
        steps=steps,
    )


def _encode_token(at_us: int, payment_id: str) -> str:
    return base64.urlsafe_b64encode(f"{at_us}|{payment_id}".encode()).decode()


def _decode_token(token: str) -> tuple[int, str]:
    try:
        at, _, pid = base64.urlsafe_b64decode(token.encode()).decode().partition("|")
        return int(at), pid
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidArgument(
            [FieldViolation("page_token", "not a token this switch issued")]
        ) from e


__all__ = ["CassandraPaymentStore", "day_of"]
