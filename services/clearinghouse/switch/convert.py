"""Protobuf <-> domain, in one place. No rules live here, only shapes.

Unknown enum values become None so that validation, not conversion, reports them with
the field's path.
"""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from clearing.v1 import admin_pb2, common_pb2, payment_pb2
from clearinghouse.domain import (
    ClearingError,
    FieldViolation,
    InvalidArgument,
    Money,
    Participant,
    ParticipantKind,
    ParticipantStatus,
    PaymentOrder,
    PaymentState,
    PaymentType,
    ResourceExhausted,
    Unavailable,
    status_for,
)
from clearinghouse.domain.errors import (
    ERROR_MESSAGE_BYTES_MAX,
    ERROR_VIOLATIONS_MAX,
    VIOLATION_DESCRIPTION_BYTES_MAX,
    VIOLATION_FIELD_BYTES_MAX,
    clipped,
)
from clearinghouse.domain.model import SigningKey
from clearinghouse.domain.validation import timestamp_violations
from clearinghouse.security.revocation import RevokedCertificate
from clearinghouse.switch.records import PaymentRecord

_TYPE_TO_DOMAIN = {
    common_pb2.PAYMENT_TYPE_DEBIT: PaymentType.DEBIT,
    common_pb2.PAYMENT_TYPE_CREDIT: PaymentType.CREDIT,
}
_TYPE_TO_PB = {v: k for k, v in _TYPE_TO_DOMAIN.items()}
_STATE_TO_PB = {
    PaymentState.RECEIVED: common_pb2.PAYMENT_STATE_RECEIVED,
    PaymentState.ROUTED: common_pb2.PAYMENT_STATE_ROUTED,
    PaymentState.APPROVED: common_pb2.PAYMENT_STATE_APPROVED,
    PaymentState.DECLINED: common_pb2.PAYMENT_STATE_DECLINED,
    PaymentState.FAILED: common_pb2.PAYMENT_STATE_FAILED,
    PaymentState.REVERSED: common_pb2.PAYMENT_STATE_REVERSED,
}
_KIND_TO_DOMAIN = {
    common_pb2.PARTICIPANT_KIND_INSTITUTION: ParticipantKind.INSTITUTION,
    common_pb2.PARTICIPANT_KIND_BANK: ParticipantKind.BANK,
}
_KIND_TO_PB = {v: k for k, v in _KIND_TO_DOMAIN.items()}
_STATUS_TO_DOMAIN = {
    common_pb2.PARTICIPANT_STATUS_ACTIVE: ParticipantStatus.ACTIVE,
    common_pb2.PARTICIPANT_STATUS_SUSPENDED: ParticipantStatus.SUSPENDED,
}
_STATUS_TO_PB = {v: k for k, v in _STATUS_TO_DOMAIN.items()}


def ts_to_us(ts: Timestamp) -> int:
    return int(ts.seconds) * 1_000_000 + int(ts.nanos) // 1000


def us_to_ts(at_us: int) -> Timestamp:
    ts = Timestamp()
    ts.seconds, rem = divmod(at_us, 1_000_000)
    ts.nanos = rem * 1000
    return ts


def order_from_pb(o: payment_pb2.PaymentOrder, path: str = "order") -> PaymentOrder:
    kind = _TYPE_TO_DOMAIN.get(o.type)
    # What cannot become a domain order at all; the order's other fields are checked
    # together by validation.check_order_shape. A Timestamp out of protobuf's range
    # (nanos outside 0..999,999,999 too) would otherwise be normalised, not stored as sent.
    violations = timestamp_violations(
        o.requested_at.seconds, o.requested_at.nanos, f"{path}.requested_at"
    )
    if kind is None or violations:
        if kind is None:
            violations.insert(0, FieldViolation(f"{path}.type", "must be DEBIT or CREDIT"))
        raise InvalidArgument(violations)
    return PaymentOrder(
        payment_id=o.payment_id,
        institution_id=o.institution_id,
        type=kind,
        payer_id=o.payer_id,
        payee_id=o.payee_id,
        bank_account=o.bank_account,
        amount=_money_from_pb(o.amount, f"{path}.amount"),
        memo=o.memo,
        requested_at_us=ts_to_us(o.requested_at),
        signature=o.signature,
        signing_key_id=o.signing_key_id,
    )


def _money_from_pb(m: common_pb2.Money, path: str) -> Money:
    # Money's own checks (int64 range) run in the domain; a malformed currency is left
    # to validation so that every field problem is reported together.
    try:
        return Money(int(m.amount_minor), m.currency)
    except (ValueError, AssertionError) as e:
        raise InvalidArgument([FieldViolation(path, str(e))]) from e


def order_to_pb(o: PaymentOrder) -> payment_pb2.PaymentOrder:
    return payment_pb2.PaymentOrder(
        payment_id=o.payment_id,
        institution_id=o.institution_id,
        type=_TYPE_TO_PB[o.type],
        payer_id=o.payer_id,
        payee_id=o.payee_id,
        bank_account=o.bank_account,
        amount=common_pb2.Money(amount_minor=o.amount.amount_minor, currency=o.amount.currency),
        memo=o.memo,
        requested_at=us_to_ts(o.requested_at_us),
        signature=o.signature,
        signing_key_id=o.signing_key_id,
    )


def payment_to_pb(rec: PaymentRecord) -> payment_pb2.Payment:
    decided = rec.decided
    final = [s for s in rec.steps if s.event.state.is_final]
    return payment_pb2.Payment(
        order=order_to_pb(rec.order),
        state=_STATE_TO_PB[rec.state],
        switch_ref=rec.switch_ref,
        bank_ref=decided.bank_ref if decided else "",
        decline_reason=(
            decided.event.detail
            if decided and decided.event.state is not PaymentState.APPROVED
            else ""
        ),
        received_at=us_to_ts(rec.received_at_us),
        decided_at=us_to_ts(final[-1].event.at_us) if final else None,
        received_zone=rec.received_zone,
        shard=rec.shard,
        ledger_seq=rec.ledger_seq,
        events=[
            payment_pb2.PaymentEvent(
                state=_STATE_TO_PB[s.event.state],
                at=us_to_ts(s.event.at_us),
                zone=s.event.zone,
                detail=s.event.detail,
            )
            for s in rec.steps
        ],
    )


def participant_from_pb(p: admin_pb2.Participant) -> Participant:
    kind = _KIND_TO_DOMAIN.get(p.kind)
    if kind is None:
        raise InvalidArgument([FieldViolation("participant.kind", "must be INSTITUTION or BANK")])
    status = _STATUS_TO_DOMAIN.get(p.status, ParticipantStatus.ACTIVE)
    return Participant(
        participant_id=p.participant_id,
        kind=kind,
        name=p.name,
        status=status,
        bank_code=p.bank_code or None,
        endpoint=p.endpoint or None,
        currencies=frozenset(p.currencies),
        net_debit_caps={m.currency: int(m.amount_minor) for m in p.net_debit_caps},
        version=int(p.version),
        payments_per_s_quota=int(p.payments_per_s_quota),
        signing_keys=tuple(SigningKey(k.key_id, k.public_key) for k in p.signing_keys),
    )


def participant_to_pb(p: Participant) -> admin_pb2.Participant:
    return admin_pb2.Participant(
        participant_id=p.participant_id,
        kind=_KIND_TO_PB[p.kind],
        name=p.name,
        status=_STATUS_TO_PB[p.status],
        bank_code=p.bank_code or "",
        endpoint=p.endpoint or "",
        currencies=sorted(p.currencies),
        net_debit_caps=[
            common_pb2.Money(amount_minor=v, currency=k)
            for k, v in sorted(p.net_debit_caps.items())
        ],
        version=p.version,
        payments_per_s_quota=p.payments_per_s_quota,
        signing_keys=[
            admin_pb2.SigningKey(key_id=k.key_id, public_key=k.public_key) for k in p.signing_keys
        ],
        status_reason=p.status_reason,
        updated_at=us_to_ts(p.updated_at_us) if p.updated_at_us else None,
    )


# Domain field names that differ from the proto's, for field paths in errors.
_PROTO_FIELD_NAMES = {"requested_at_us": "requested_at"}


def revoked_to_pb(r: RevokedCertificate) -> admin_pb2.RevokedCertificate:
    return admin_pb2.RevokedCertificate(
        serial=r.serial_hex, identity=r.identity, reason=r.reason,
        revoked_at=us_to_ts(r.revoked_at_us), revoked_by=r.revoked_by,
    )  # fmt: skip


def _proto_path(path: str) -> str:
    return ".".join(_PROTO_FIELD_NAMES.get(part, part) for part in path.split("."))


def error_to_pb(err: ClearingError) -> common_pb2.Error:
    violations = getattr(err, "violations", ())
    retry_after = (
        int(getattr(err, "retry_after_ms", 0))
        if isinstance(err, (Unavailable, ResourceExhausted))
        else 0
    )
    message = str(err)
    if violations and message == "; ".join(f"{v.field}: {v.description}" for v in violations):
        # The message made of the violations names the fields as the proto does too.
        message = "; ".join(f"{_proto_path(v.field)}: {v.description}" for v in violations)
    return common_pb2.Error(
        code=status_for(err).value[0],
        reason=err.reason,
        message=clipped(message, ERROR_MESSAGE_BYTES_MAX),
        field_violations=[
            common_pb2.FieldViolation(
                field=clipped(_proto_path(v.field), VIOLATION_FIELD_BYTES_MAX),
                description=clipped(v.description, VIOLATION_DESCRIPTION_BYTES_MAX),
            )
            for v in violations[:ERROR_VIOLATIONS_MAX]
        ],
        retry_after_ms=retry_after,
    )
