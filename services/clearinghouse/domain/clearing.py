"""Clearing of one settlement window: net positions, gross bilateral totals, settlement
instructions and one reconciliation per participant, computed from the window's ledger
entries alone.

Definitions (all amounts are integer minor units of their currency):

* Only ``DECISION`` entries move money; the other kinds are counted, nothing more. A
  payment belongs to the window that holds its decision.
* Net position of (participant, currency) = its debits - its credits over the window's
  postings; positive means the participant owes (a net debtor). Every decision must
  balance (debits == credits per currency) and the nets of a currency sum to zero.
* Bilateral totals per (payer, payee, currency): ``approved_*`` sums the APPROVE legs
  (gross, payer = the participant of the ``approve.payer`` posting), ``reversed_*`` the
  REVERSE legs (payer = the ``reverse.payer`` posting's participant, i.e. the original
  payer). Nothing is netted there.
* Settlement instructions, central-counterparty model: each net debtor pays its net
  debit from its account to the switch's account of the currency (``PAY_IN``); the
  switch's account pays each net creditor its net credit (``PAY_OUT``). Accounts are
  ``RESERVE:<participant>`` for an institution, ``SETTLEMENT:<participant>`` for a bank
  and ``SWITCH:<currency>`` for the switch. Pay-ins equal pay-outs per currency.
* Reconciliation of a participant: one row per decision of the window that involves it
  (as the payer or payee of the order, or in a posting), with its debits and credits;
  the order's type, amount and bank account when the payment's INTENT is known.

Output formats (deterministic: the same entries in any order give the same bytes):

* :meth:`WindowClearing.to_json` - one line of JSON (UTF-8, ASCII-escaped, sorted keys,
  no insignificant whitespace, integers as JSON integers, a final newline) with
  ``"format": "clearing.window-clearing.v1"``: everything but the reconciliation rows,
  so its size depends on the number of participants, not of payments.
  :meth:`WindowClearing.from_json` reads it back (reconciliations without rows).
* :meth:`WindowClearing.reconciliation_json` - one participant's reconciliation with its
  rows, the same JSON style, ``"format": "clearing.participant-reconciliation.v1"``;
  :func:`reconciliation_from_json` reads it back.
* CSV (``csv`` module, minimal quoting, ``\\n`` line ends, one header row, empty field
  for an unknown value): :meth:`~WindowClearing.net_positions_csv`,
  :meth:`~WindowClearing.bilateral_csv`, :meth:`~WindowClearing.instructions_csv`,
  :meth:`~WindowClearing.reconciliation_csv`; the columns are the field names of
  :class:`NetPosition`, :class:`BilateralTotal`, :class:`SettlementInstruction` and
  :class:`ReconciliationRow`, in field order.
"""

from __future__ import annotations

import csv
import json
from bisect import bisect_left
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from itertools import pairwise
from typing import Final, TypeVar

from clearinghouse._invariant import InvariantViolation, invariant
from clearinghouse.domain.chain import LedgerEntry
from clearinghouse.domain.entries import (
    KIND_DECISION,
    KIND_WINDOW_CUT,
    Decision,
    Intent,
    WindowCut,
    window_key,
)
from clearinghouse.domain.fingerprint import order_from_canonical_bytes
from clearinghouse.domain.model import ParticipantKind, PaymentOrder
from clearinghouse.domain.postings import Leg, Posting

CLEARING_FORMAT: Final = "clearing.window-clearing.v1"
RECONCILIATION_FORMAT: Final = "clearing.participant-reconciliation.v1"
ROLE_PAYER: Final = "payer"
ROLE_PAYEE: Final = "payee"
PAY_IN: Final = "PAY_IN"  # a net debtor pays the switch
PAY_OUT: Final = "PAY_OUT"  # the switch pays a net creditor
_DIRECTION_ORDER: Final = {PAY_IN: 0, PAY_OUT: 1}


class MalformedClearing(ValueError):
    """A clearing JSON document that is not a valid ``clearing.window-clearing.v1``."""


@dataclass(frozen=True, slots=True)
class NetPosition:
    """Net position of one participant in one currency over the window."""

    participant_id: str
    kind: ParticipantKind
    currency: str
    debit_minor: int
    credit_minor: int
    net_minor: int  # debit_minor - credit_minor; positive: the participant owes


@dataclass(frozen=True, slots=True)
class BilateralTotal:
    """Gross amounts one payer sent one payee in one currency, approved and reversed."""

    payer_id: str
    payee_id: str
    currency: str
    approved_count: int
    approved_minor: int
    reversed_count: int
    reversed_minor: int


@dataclass(frozen=True, slots=True)
class SettlementInstruction:
    """One transfer between a participant's account and the switch's, ``PAY_IN`` or
    ``PAY_OUT``; ``instruction_id`` is unique in the window and stable across re-runs."""

    instruction_id: str
    currency: str
    direction: str
    participant_id: str
    from_account: str
    to_account: str
    amount_minor: int


@dataclass(frozen=True, slots=True)
class ReconciliationRow:
    """One decision as one participant sees it. ``type`` and ``bank_account`` are "" and
    ``amount_minor`` None when the payment's intent was not given."""

    shard: int
    seq: int
    payment_key: str
    institution_id: str
    payment_id: str
    state: str
    role: str
    counterparty: str
    currency: str
    debit_minor: int
    credit_minor: int
    decided_at_us: int
    type: str
    amount_minor: int | None
    bank_account: str


@dataclass(frozen=True, slots=True)
class CurrencyTotal:
    """A participant's reconciliation totals in one currency."""

    currency: str
    payments: int
    debit_minor: int
    credit_minor: int
    net_minor: int


@dataclass(frozen=True, slots=True)
class Reconciliation:
    """Everything one participant needs to check its part of the window."""

    participant_id: str
    kind: ParticipantKind
    rows: tuple[ReconciliationRow, ...]
    state_counts: tuple[tuple[str, int], ...]
    totals: tuple[CurrencyTotal, ...]


@dataclass(frozen=True, slots=True)
class WindowClearing:
    """The clearing of one window; every tuple is sorted, so equal inputs compare equal."""

    window_id: int
    entry_count: int
    entry_counts: tuple[tuple[str, int], ...]  # by entry kind
    decision_count: int
    payments_decided: int  # distinct payment keys among the decisions
    state_counts: tuple[tuple[str, int], ...]  # decisions by final state
    participants: tuple[tuple[str, ParticipantKind], ...]
    net_positions: tuple[NetPosition, ...]
    bilateral: tuple[BilateralTotal, ...]
    instructions: tuple[SettlementInstruction, ...]
    reconciliations: tuple[Reconciliation, ...]

    def kinds(self) -> dict[str, ParticipantKind]:
        """The participant kinds the clearing was computed with."""
        return dict(self.participants)

    def reconciliation(self, participant_id: str) -> Reconciliation:
        """The reconciliation of one participant of :attr:`participants`."""
        at = bisect_left(self.reconciliations, participant_id, key=lambda r: r.participant_id)
        if at < len(self.reconciliations):
            rec = self.reconciliations[at]
            if rec.participant_id == participant_id:
                return rec
        raise InvariantViolation(f"no reconciliation for participant {participant_id!r}")

    def to_json(self) -> str:
        """The clearing as one line of JSON, reconciliation rows left out (they are in
        :meth:`reconciliation_json`), so it stays small whatever the window's size."""
        return _dumps(_clearing_obj(self))

    def without_rows(self) -> WindowClearing:
        """This clearing as :meth:`from_json` reads it back: no reconciliation rows."""
        recs = tuple(replace(r, rows=()) for r in self.reconciliations)
        return replace(self, reconciliations=recs)

    @classmethod
    def from_json(cls, text: str) -> WindowClearing:
        """Parse :meth:`to_json`'s output (reconciliations without rows); raise
        :class:`MalformedClearing` if it is not one."""
        try:
            obj = json.loads(text)
        except ValueError as e:
            raise MalformedClearing(f"not JSON: {e}") from e
        return _clearing_from(obj)

    def net_positions_csv(self) -> str:
        return _csv(NetPosition, self.net_positions)

    def bilateral_csv(self) -> str:
        return _csv(BilateralTotal, self.bilateral)

    def instructions_csv(self) -> str:
        return _csv(SettlementInstruction, self.instructions)

    def reconciliation_csv(self, participant_id: str) -> str:
        return _csv(ReconciliationRow, self.reconciliation(participant_id).rows)

    def reconciliation_json(self, participant_id: str) -> str:
        """One participant's reconciliation, one line of JSON with
        ``"format": "clearing.participant-reconciliation.v1"`` and the ``window_id``."""
        obj = _reconciliation_obj(self.reconciliation(participant_id), with_rows=True)
        obj |= {"format": RECONCILIATION_FORMAT, "window_id": self.window_id}
        return _dumps(obj)


def reconciliation_from_json(text: str) -> tuple[int, Reconciliation]:
    """Parse :meth:`WindowClearing.reconciliation_json`'s output: (window_id,
    reconciliation with its rows); raise :class:`MalformedClearing` if it is not one."""
    try:
        obj = _object(json.loads(text), "reconciliation")
    except ValueError as e:
        raise MalformedClearing(f"not JSON: {e}") from e
    if obj.pop("format", None) != RECONCILIATION_FORMAT:
        raise _fail("format", f"expected {RECONCILIATION_FORMAT!r}")
    window_id = _int(obj.pop("window_id", None), "window_id")
    return window_id, _reconciliation_from(obj, "reconciliation", with_rows=True)


def settlement_account(participant_id: str, kind: ParticipantKind) -> str:
    """``RESERVE:<id>`` for an institution, ``SETTLEMENT:<id>`` for a bank."""
    prefix = "RESERVE" if kind is ParticipantKind.INSTITUTION else "SETTLEMENT"
    return f"{prefix}:{participant_id}"


def switch_account(currency: str) -> str:
    """The switch's settlement account for ``currency``: ``SWITCH:<currency>``."""
    return f"SWITCH:{currency}"


# -- computing ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Decided:
    entry: LedgerEntry
    decision: Decision
    order: PaymentOrder | None
    payer: str | None
    payee: str | None
    currency: str


def clear_window(
    window_id: int,
    entries: Sequence[LedgerEntry],
    kinds: Mapping[str, ParticipantKind],
    intents: Mapping[str, Intent],
) -> WindowClearing:
    """Clear window ``window_id`` from all of its ``entries`` (every shard, any order).

    ``kinds`` must name every participant that a decision or its order involves;
    ``intents`` maps payment keys to their INTENT (those missing leave the order's
    fields empty in the reconciliation). Raises InvariantViolation on an unbalanced
    decision, postings that contradict the order, a cut of another window, a duplicate
    entry or nets that do not sum to zero.
    """
    invariant(window_id > 0, f"window ids start at 1, not {window_id}")
    ordered = sorted(entries, key=lambda e: (e.shard, e.seq))
    for a, b in pairwise(ordered):
        invariant((a.shard, a.seq) != (b.shard, b.seq), f"entry {a.shard}/{a.seq} given twice")
    decided: list[_Decided] = []
    for e in ordered:
        if e.kind == KIND_WINDOW_CUT:
            cut = WindowCut.decode(e.body)
            invariant(
                cut.window_id == window_id,
                f"shard {e.shard} seq {e.seq}: cut of window {cut.window_id}, not {window_id}",
            )
            invariant(
                e.payment_key == window_key(window_id),
                f"shard {e.shard} seq {e.seq}: the cut of window {window_id} is keyed "
                f"{e.payment_key!r}, not {window_key(window_id)!r}",
            )
        elif e.kind == KIND_DECISION:
            decided.append(_decided(e, intents.get(e.payment_key)))
    for d in decided:
        for pid in _involved(d):
            invariant(pid in kinds, f"{d.entry.payment_key}: participant {pid!r} has no kind")

    nets = _net_positions(decided, kinds)
    return WindowClearing(
        window_id=window_id,
        entry_count=len(ordered),
        entry_counts=tuple(sorted(Counter(e.kind for e in ordered).items())),
        decision_count=len(decided),
        payments_decided=len({d.entry.payment_key for d in decided}),
        state_counts=tuple(sorted(Counter(d.decision.state.value for d in decided).items())),
        participants=tuple(sorted(kinds.items())),
        net_positions=nets,
        bilateral=_bilateral(decided),
        instructions=_instructions(window_id, nets),
        reconciliations=_reconciliations(decided, kinds),
    )


def _decided(e: LedgerEntry, intent: Intent | None) -> _Decided:
    where = f"shard {e.shard} seq {e.seq} ({e.payment_key})"
    d = Decision.decode(e.body, e.payment_key)
    legs: dict[Leg, Posting] = {}
    for p in d.postings:
        invariant(p.leg not in legs, f"{where}: leg {p.leg.value} posted twice")
        legs[p.leg] = p
    currencies = {p.currency for p in d.postings}
    invariant(len(currencies) <= 1, f"{where}: postings in several currencies {currencies}")
    debits = sum(p.debit_minor for p in d.postings)
    credits = sum(p.credit_minor for p in d.postings)
    invariant(debits == credits, f"{where}: debits {debits} != credits {credits}")
    payer = _pair(where, legs, Leg.APPROVE_PAYER, Leg.APPROVE_PAYEE)
    reverse = _pair(where, legs, Leg.REVERSE_PAYER, Leg.REVERSE_PAYEE)
    if payer and reverse:
        invariant(payer == reverse, f"{where}: approve and reverse legs name other parties")
    parties = payer or reverse
    order = order_from_canonical_bytes(intent.order_bytes) if intent is not None else None
    if order is not None:
        invariant(order.payer_id != order.payee_id, f"{where}: payer and payee are the same")
        invariant(
            parties is None or parties == (order.payer_id, order.payee_id),
            f"{where}: postings' payer/payee {parties} differ from the order's "
            f"{(order.payer_id, order.payee_id)}",
        )
        invariant(
            all(
                (p.currency, p.debit_minor + p.credit_minor)
                == (order.amount.currency, order.amount.amount_minor)
                for p in d.postings
            ),
            f"{where}: postings differ from the order's {order.amount}",
        )
        parties = (order.payer_id, order.payee_id)
    currency = order.amount.currency if order is not None else next(iter(currencies), "")
    return _Decided(
        e, d, order, parties[0] if parties else None, parties[1] if parties else None, currency
    )


def _pair(
    where: str, legs: Mapping[Leg, Posting], payer_leg: Leg, payee_leg: Leg
) -> tuple[str, str] | None:
    """(payer, payee) of one transition's two legs, checked to mirror each other."""
    payer, payee = legs.get(payer_leg), legs.get(payee_leg)
    if payer is None and payee is None:
        return None
    if payer is None or payee is None:
        raise InvariantViolation(f"{where}: leg {payer_leg.value} or {payee_leg.value} unpaired")
    amount = payer.debit_minor + payer.credit_minor
    payer_pays = payer_leg is Leg.APPROVE_PAYER  # approval debits the payer, reversal credits
    expected_payer = (amount, 0) if payer_pays else (0, amount)
    invariant(
        (payer.debit_minor, payer.credit_minor) == expected_payer
        and (payee.credit_minor, payee.debit_minor) == expected_payer,
        f"{where}: legs {payer_leg.value}/{payee_leg.value} do not mirror each other",
    )
    invariant(payer.participant_id != payee.participant_id, f"{where}: payer is the payee")
    return payer.participant_id, payee.participant_id


def _involved(d: _Decided) -> set[str]:
    out = {p.participant_id for p in d.decision.postings}
    out |= {pid for pid in (d.payer, d.payee) if pid is not None}
    return out


def _net_positions(
    decided: Iterable[_Decided], kinds: Mapping[str, ParticipantKind]
) -> tuple[NetPosition, ...]:
    totals: defaultdict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for d in decided:
        for p in d.decision.postings:
            t = totals[(p.participant_id, p.currency)]
            t[0] += p.debit_minor
            t[1] += p.credit_minor
    nets = tuple(
        NetPosition(pid, kinds[pid], ccy, debit, credit, debit - credit)
        for (pid, ccy), (debit, credit) in sorted(totals.items())
    )
    by_currency: Counter[str] = Counter()
    for n in nets:
        by_currency[n.currency] += n.net_minor
    for ccy, total in sorted(by_currency.items()):
        invariant(total == 0, f"net positions in {ccy} sum to {total}, not zero")
    return nets


def _bilateral(decided: Iterable[_Decided]) -> tuple[BilateralTotal, ...]:
    # (payer, payee, currency) -> [approved_count, approved, reversed_count, reversed]
    totals: defaultdict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for d in decided:
        postings = {p.leg: p for p in d.decision.postings}
        for payer_leg, payee_leg, at in (
            (Leg.APPROVE_PAYER, Leg.APPROVE_PAYEE, 0),
            (Leg.REVERSE_PAYER, Leg.REVERSE_PAYEE, 2),
        ):
            if payer_leg in postings:
                payer, payee = postings[payer_leg], postings[payee_leg]
                t = totals[(payer.participant_id, payee.participant_id, payer.currency)]
                t[at] += 1
                t[at + 1] += payer.debit_minor + payer.credit_minor
    return tuple(BilateralTotal(*key, *t) for key, t in sorted(totals.items()))


def _instructions(window_id: int, nets: Iterable[NetPosition]) -> tuple[SettlementInstruction, ...]:
    out: list[SettlementInstruction] = []
    paid_in: Counter[str] = Counter()
    paid_out: Counter[str] = Counter()
    for n in nets:
        if n.net_minor == 0:
            continue
        own, switch = settlement_account(n.participant_id, n.kind), switch_account(n.currency)
        direction = PAY_IN if n.net_minor > 0 else PAY_OUT
        source, target = (own, switch) if direction == PAY_IN else (switch, own)
        amount = abs(n.net_minor)
        (paid_in if direction == PAY_IN else paid_out)[n.currency] += amount
        instruction_id = f"W{window_id}-{n.currency}-{direction}-{n.participant_id}"
        out.append(
            SettlementInstruction(
                instruction_id, n.currency, direction, n.participant_id, source, target, amount
            )
        )
    for ccy in sorted(paid_in.keys() | paid_out.keys()):
        invariant(
            paid_in[ccy] == paid_out[ccy],
            f"settlement in {ccy}: paid in {paid_in[ccy]} != paid out {paid_out[ccy]}",
        )
    out.sort(key=lambda i: (i.currency, _DIRECTION_ORDER[i.direction], i.participant_id))
    return tuple(out)


def _reconciliations(
    decided: Iterable[_Decided], kinds: Mapping[str, ParticipantKind]
) -> tuple[Reconciliation, ...]:
    rows: dict[str, list[ReconciliationRow]] = {pid: [] for pid in kinds}
    for d in decided:
        for pid in _involved(d):
            rows[pid].append(_row(pid, d))
    return tuple(_reconciliation(pid, kinds[pid], rows[pid]) for pid in sorted(kinds))


def _row(participant_id: str, d: _Decided) -> ReconciliationRow:
    mine = [p for p in d.decision.postings if p.participant_id == participant_id]
    is_payer = participant_id == d.payer
    counterparty = d.payee if is_payer else d.payer
    institution_id, _, payment_id = d.entry.payment_key.partition("/")
    if d.order is not None:
        institution_id, payment_id = d.order.institution_id, d.order.payment_id
    return ReconciliationRow(
        shard=d.entry.shard,
        seq=d.entry.seq,
        payment_key=d.entry.payment_key,
        institution_id=institution_id,
        payment_id=payment_id,
        state=d.decision.state.value,
        role=ROLE_PAYER if is_payer else ROLE_PAYEE,
        counterparty=counterparty or "",
        currency=d.currency,
        debit_minor=sum(p.debit_minor for p in mine),
        credit_minor=sum(p.credit_minor for p in mine),
        decided_at_us=d.decision.at_us,
        type=d.order.type.value if d.order is not None else "",
        amount_minor=d.order.amount.amount_minor if d.order is not None else None,
        bank_account=d.order.bank_account if d.order is not None else "",
    )


def _reconciliation(
    participant_id: str, kind: ParticipantKind, rows: list[ReconciliationRow]
) -> Reconciliation:
    rows.sort(key=lambda r: (r.decided_at_us, r.payment_key, r.shard, r.seq))
    totals: defaultdict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for r in rows:
        t = totals[r.currency]
        t[0] += 1
        t[1] += r.debit_minor
        t[2] += r.credit_minor
    return Reconciliation(
        participant_id=participant_id,
        kind=kind,
        rows=tuple(rows),
        state_counts=tuple(sorted(Counter(r.state for r in rows).items())),
        totals=tuple(
            CurrencyTotal(ccy, n, debit, credit, debit - credit)
            for ccy, (n, debit, credit) in sorted(totals.items())
        ),
    )


# -- rendering ----------------------------------------------------------------------------

_Row = NetPosition | BilateralTotal | SettlementInstruction | ReconciliationRow | CurrencyTotal
_R = TypeVar(
    "_R", NetPosition, BilateralTotal, SettlementInstruction, ReconciliationRow, CurrencyTotal
)


class _Chunks:
    """A write-only text sink for the csv module (the domain does no I/O)."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def write(self, text: str) -> int:
        self.parts.append(text)
        return len(text)


def _cell(value: object) -> object:
    return value.value if isinstance(value, ParticipantKind) else value


def _csv(row_type: type[_Row], rows: Iterable[_Row]) -> str:
    sink = _Chunks()
    writer = csv.writer(sink, lineterminator="\n")
    names = [f.name for f in fields(row_type)]
    writer.writerow(names)
    writer.writerows([_cell(getattr(row, name)) for name in names] for row in rows)
    return "".join(sink.parts)


def _dumps(obj: object) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True) + "\n"


def table_rows(rows: Iterable[_Row]) -> list[dict[str, object]]:
    """Rows as dicts of the CSV files' columns and cells (``clearingctl audit window``)."""
    return [_row_obj(r) for r in rows]


def _row_obj(row: _Row) -> dict[str, object]:
    return {name: _cell(getattr(row, name)) for name in _field_names(type(row))}


_FIELD_NAMES: Final[dict[type, tuple[str, ...]]] = {}


def _field_names(row_type: type) -> tuple[str, ...]:
    names = _FIELD_NAMES.get(row_type)
    if names is None:
        names = _FIELD_NAMES[row_type] = tuple(f.name for f in fields(row_type))
    return names


def _reconciliation_obj(rec: Reconciliation, *, with_rows: bool) -> dict[str, object]:
    obj: dict[str, object] = {
        "participant_id": rec.participant_id,
        "kind": rec.kind.value,
        "state_counts": dict(rec.state_counts),
        "totals": [_row_obj(t) for t in rec.totals],
    }
    if with_rows:
        obj["rows"] = [_row_obj(r) for r in rec.rows]
    return obj


def _clearing_obj(c: WindowClearing) -> dict[str, object]:
    return {
        "format": CLEARING_FORMAT,
        "window_id": c.window_id,
        "entry_count": c.entry_count,
        "entry_counts": dict(c.entry_counts),
        "decision_count": c.decision_count,
        "payments_decided": c.payments_decided,
        "state_counts": dict(c.state_counts),
        "participants": {pid: kind.value for pid, kind in c.participants},
        "net_positions": [_row_obj(n) for n in c.net_positions],
        "bilateral": [_row_obj(b) for b in c.bilateral],
        "instructions": [_row_obj(i) for i in c.instructions],
        "reconciliations": [_reconciliation_obj(r, with_rows=False) for r in c.reconciliations],
    }


# -- parsing ------------------------------------------------------------------------------


def _fail(where: str, what: str) -> MalformedClearing:
    return MalformedClearing(f"{where}: {what}")


def _object(value: object, where: str, keys: Iterable[str] | None = None) -> dict[str, object]:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise _fail(where, "expected an object")
    if keys is not None and set(value) != set(keys):
        raise _fail(where, f"expected keys {sorted(keys)}, found {sorted(value)}")
    return value


def _list(value: object, where: str) -> list[object]:
    if not isinstance(value, list):
        raise _fail(where, "expected an array")
    return value


def _int(value: object, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _fail(where, f"expected an integer, found {value!r}")
    return value


def _str(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise _fail(where, f"expected a string, found {value!r}")
    return value


def _optional_int(value: object, where: str) -> int | None:
    return None if value is None else _int(value, where)


def _kind(value: object, where: str) -> ParticipantKind:
    try:
        return ParticipantKind(_str(value, where))
    except ValueError as e:
        raise _fail(where, f"unknown participant kind {value!r}") from e


_FIELD_PARSERS: Final[Mapping[str, Callable[[object, str], object]]] = {
    "int": _int,
    "str": _str,
    "int | None": _optional_int,
    "ParticipantKind": _kind,
}


def _row_from(row_type: type[_R], value: object, where: str) -> _R:
    names = [f.name for f in fields(row_type)]
    obj = _object(value, where, names)
    parsed = {
        f.name: _FIELD_PARSERS[str(f.type)](obj[f.name], f"{where}.{f.name}")
        for f in fields(row_type)
    }
    return row_type(**parsed)  # type: ignore[arg-type]


def _rows_from(row_type: type[_R], value: object, where: str) -> tuple[_R, ...]:
    return tuple(
        _row_from(row_type, item, f"{where}[{n}]") for n, item in enumerate(_list(value, where))
    )


def _counts(value: object, where: str) -> tuple[tuple[str, int], ...]:
    obj = _object(value, where)
    return tuple(sorted((k, _int(v, f"{where}.{k}")) for k, v in obj.items()))


_CLEARING_KEYS: Final = (
    "format", "window_id", "entry_count", "entry_counts", "decision_count",
    "payments_decided", "state_counts", "participants", "net_positions", "bilateral",
    "instructions", "reconciliations",
)  # fmt: skip
_RECONCILIATION_KEYS: Final = ("participant_id", "kind", "state_counts", "totals")


def _reconciliation_from(value: object, where: str, *, with_rows: bool) -> Reconciliation:
    keys = (*_RECONCILIATION_KEYS, "rows") if with_rows else _RECONCILIATION_KEYS
    obj = _object(value, where, keys)
    rows = _rows_from(ReconciliationRow, obj["rows"], f"{where}.rows") if with_rows else ()
    return Reconciliation(
        participant_id=_str(obj["participant_id"], f"{where}.participant_id"),
        kind=_kind(obj["kind"], f"{where}.kind"),
        rows=rows,
        state_counts=_counts(obj["state_counts"], f"{where}.state_counts"),
        totals=_rows_from(CurrencyTotal, obj["totals"], f"{where}.totals"),
    )


def _clearing_from(value: object) -> WindowClearing:
    obj = _object(value, "clearing", _CLEARING_KEYS)
    if obj["format"] != CLEARING_FORMAT:
        raise _fail("format", f"expected {CLEARING_FORMAT!r}, found {obj['format']!r}")
    participants = _object(obj["participants"], "participants")
    recs = _list(obj["reconciliations"], "reconciliations")
    return WindowClearing(
        window_id=_int(obj["window_id"], "window_id"),
        entry_count=_int(obj["entry_count"], "entry_count"),
        entry_counts=_counts(obj["entry_counts"], "entry_counts"),
        decision_count=_int(obj["decision_count"], "decision_count"),
        payments_decided=_int(obj["payments_decided"], "payments_decided"),
        state_counts=_counts(obj["state_counts"], "state_counts"),
        participants=tuple(
            sorted((pid, _kind(k, f"participants.{pid}")) for pid, k in participants.items())
        ),
        net_positions=_rows_from(NetPosition, obj["net_positions"], "net_positions"),
        bilateral=_rows_from(BilateralTotal, obj["bilateral"], "bilateral"),
        instructions=_rows_from(SettlementInstruction, obj["instructions"], "instructions"),
        reconciliations=tuple(
            _reconciliation_from(r, f"reconciliations[{n}]", with_rows=False)
            for n, r in enumerate(recs)
        ),
    )


__all__ = [
    "CLEARING_FORMAT",
    "PAY_IN",
    "PAY_OUT",
    "RECONCILIATION_FORMAT",
    "ROLE_PAYEE",
    "ROLE_PAYER",
    "BilateralTotal",
    "CurrencyTotal",
    "MalformedClearing",
    "NetPosition",
    "Reconciliation",
    "ReconciliationRow",
    "SettlementInstruction",
    "WindowClearing",
    "clear_window",
    "reconciliation_from_json",
    "settlement_account",
    "switch_account",
]
