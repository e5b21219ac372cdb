"""Hostile requests for every RPC, derived from the protobuf descriptors.

Used by ``tests/unit/test_hostile_input.py`` (hypothesis, in-process servers over fakes)
and ``tests/integration/test_fuzz_live.py`` (a live switch node). Nothing here knows a
message's fields by name except the valid templates: :func:`message_strategy` walks a
descriptor, so a field added to a proto is generated as soon as the code is regenerated,
and :func:`rpc_methods` lists every method of the services, so a new RPC is called too.

Values are chosen to break things: strings empty, blank, long (past every limit the
switch has), with control characters, bidi overrides, astral-plane and combining
characters, NUL, SQL and format-string fragments; integers at 0, +-1 and the limits of
their wire type; enums with values the proto does not define; repeated fields with none,
a few or hundreds of items; nested messages left unset.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import (
    Descriptor,
    FieldDescriptor,
    FileDescriptor,
    MethodDescriptor,
    ServiceDescriptor,
)
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import strategies as st

from clearing.v1 import (
    admin_pb2,
    audit_pb2,
    bank_pb2,
    common_pb2,
    payment_pb2,
    settlement_pb2,
    shard_pb2,
)

# The services a switch node serves, and the one a bank serves.
SWITCH_FILES: tuple[FileDescriptor, ...] = (
    payment_pb2.DESCRIPTOR,
    admin_pb2.DESCRIPTOR,
    audit_pb2.DESCRIPTOR,
    settlement_pb2.DESCRIPTOR,
    shard_pb2.DESCRIPTOR,
)
BANK_FILES: tuple[FileDescriptor, ...] = (bank_pb2.DESCRIPTOR,)

# Sizes that keep one example cheap while still past every limit the switch checks
# (ids 64, memo 140 characters / 280 bytes, bank account 34, batch 500).
LONG_STRING_CHARS = 5_000
MANY_ITEMS_MAX = 520
NESTING_DEPTH_MAX = 4

INSTITUTION = "INST_HOSTILE"
BANK = "BANK_HOSTILE"
CURRENCY = "CNY"

_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}

NASTY_STRINGS = (
    "",
    " ",
    "\t\n",
    "\x00",
    "A\x00B",
    "\x1b[31mred\x1b[0m",
    "\u202eRTL-override",
    "\ufeffBOM",
    "e\u0301\u0301\u0301",
    "\U0001d518" * 70,
    "中文" * 100,
    "INST_ALIPAY\n",
    "../../etc/passwd",
    "' OR '1'='1' --",
    "%s%s%s%n",
    "{}",
    "a" * 64,
    "a" * 65,
    "X" * LONG_STRING_CHARS,
    "CNY",
    "cny",
    "XXX",
    "ZZZ",
    "1",
    "-1",
    "0",
    "9" * 40,
    "orders[0]",
)


def _int_strategy(lo: int, hi: int) -> st.SearchStrategy[int]:
    edges = [v for v in (lo, lo + 1, -1, 0, 1, hi - 1, hi) if lo <= v <= hi]
    small = st.integers(max(lo, -1000), min(hi, 1000))
    return st.one_of(st.sampled_from(edges), st.integers(lo, hi), small)


def _text() -> st.SearchStrategy[str]:
    # Any Unicode scalar value (UTF-8 can carry them; lone surrogates cannot be set on a
    # protobuf string), control characters included.
    return st.one_of(
        st.sampled_from(NASTY_STRINGS),
        st.text(st.characters(codec="utf-8"), max_size=80),
        st.text(st.characters(codec="ascii"), max_size=300),
    )


def scalar_strategy(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    t = field.type
    if t == FieldDescriptor.TYPE_STRING:
        return _text()
    if t == FieldDescriptor.TYPE_BYTES:
        return st.one_of(st.binary(max_size=64), st.just(b"\x00" * 4096))
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == FieldDescriptor.TYPE_ENUM:
        known = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(known), _int_strategy(-(2**31), 2**31 - 1))
    if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(allow_nan=True, allow_infinity=True, width=32)
    if t in _INT_RANGES:
        return _int_strategy(*_INT_RANGES[t])
    raise NotImplementedError(f"no strategy for field type {t} ({field.full_name})")


def _is_repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated)


def _count() -> st.SearchStrategy[int]:
    # None, a few, or many (past every batch limit); many copies of a few distinct
    # values keep a draw cheap.
    return st.one_of(st.integers(0, 4), st.integers(0, MANY_ITEMS_MAX))


@st.composite
def message_strategy(draw: Any, desc: Descriptor, depth: int = 0) -> Message:
    """A message of type ``desc`` with any subset of its fields set to any value."""
    msg = GetMessageClass(desc)()
    for field in desc.fields:
        if not draw(st.booleans()):
            continue  # unset: a nested message missing, a scalar at its default
        _set_field(draw, msg, field, depth)
    return msg


def _field_value(draw: Any, field: FieldDescriptor, depth: int) -> Any:
    if field.message_type is not None:
        if depth >= NESTING_DEPTH_MAX:
            return GetMessageClass(field.message_type)()
        return draw(message_strategy(field.message_type, depth + 1))
    return draw(scalar_strategy(field))


def _set_field(draw: Any, msg: Message, field: FieldDescriptor, depth: int) -> None:
    target = getattr(msg, field.name)
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        key_f = field.message_type.fields_by_name["key"]
        val_f = field.message_type.fields_by_name["value"]
        for _ in range(draw(st.integers(0, 3))):
            k = draw(scalar_strategy(key_f))
            if val_f.message_type is not None:
                target[k].CopyFrom(_field_value(draw, val_f, depth))
            else:
                target[k] = draw(scalar_strategy(val_f))
        return
    if _is_repeated(field):
        count = draw(_count())
        if count == 0:
            return
        first = _field_value(draw, field, depth)
        distinct = [first, *(_field_value(draw, field, depth) for _ in range(min(count, 4) - 1))]
        values = [distinct[i % len(distinct)] for i in range(count)]
        if field.message_type is not None:
            for v in values:
                target.add().CopyFrom(v)
        else:
            target.extend(values)
        return
    value = _field_value(draw, field, depth)
    if field.message_type is not None:
        target.CopyFrom(value)
    else:
        setattr(msg, field.name, value)


def _leaf_paths(
    desc: Descriptor, prefix: tuple[FieldDescriptor, ...] = (), depth: int = 0
) -> list[tuple[FieldDescriptor, ...]]:
    """Every path of singular fields from the root, and each field itself (any type)."""
    out: list[tuple[FieldDescriptor, ...]] = []
    for field in desc.fields:
        path = (*prefix, field)
        out.append(path)
        if field.message_type is not None and not _is_repeated(field) and depth < NESTING_DEPTH_MAX:
            out.extend(_leaf_paths(field.message_type, path, depth + 1))
    return out


@st.composite
def mutated(draw: Any, template: Message, max_mutations: int = 3) -> Message:
    """``template`` (a valid request) with 1..max_mutations fields set to hostile values
    or cleared: close enough to valid to reach the checks behind the first one."""
    msg = type(template)()
    msg.CopyFrom(template)
    paths = _leaf_paths(msg.DESCRIPTOR)
    if not paths:
        return msg  # a request without fields has nothing to mutate
    for _ in range(draw(st.integers(1, max_mutations))):
        path = draw(st.sampled_from(paths))
        parent = msg
        for f in path[:-1]:
            parent = getattr(parent, f.name)
        field = path[-1]
        if draw(st.integers(0, 4)) == 0:
            parent.ClearField(field.name)
            continue
        parent.ClearField(field.name)
        _set_field(draw, parent, field, len(path))
    return msg


# -- the methods ------------------------------------------------------------------------


@dataclass(frozen=True)
class Rpc:
    service: ServiceDescriptor
    method: MethodDescriptor

    @property
    def path(self) -> str:
        return f"/{self.service.full_name}/{self.method.name}"

    @property
    def name(self) -> str:
        return f"{self.service.name}.{self.method.name}"

    @property
    def request_class(self) -> type[Message]:
        return GetMessageClass(self.method.input_type)

    @property
    def response_class(self) -> type[Message]:
        return GetMessageClass(self.method.output_type)

    @property
    def server_streaming(self) -> bool:
        return bool(self.method.server_streaming)

    @property
    def client_streaming(self) -> bool:
        return bool(self.method.client_streaming)


def rpc_methods(files: tuple[FileDescriptor, ...]) -> list[Rpc]:
    return [
        Rpc(service, method)
        for f in files
        for service in f.services_by_name.values()
        for method in service.methods
    ]


def call(channel: Any, rpc: Rpc, request: Message | bytes, timeout_s: float) -> Any:
    """Call ``rpc`` with a message or raw bytes; the response (a list for a stream).

    Raises grpc.RpcError as the stubs do."""
    serializer: Callable[[Any], bytes] = (
        (lambda b: b) if isinstance(request, bytes) else (lambda m: m.SerializeToString())
    )
    if rpc.client_streaming:
        requests = iter([request])
        if rpc.server_streaming:
            fn = channel.stream_stream(
                rpc.path,
                request_serializer=serializer,
                response_deserializer=rpc.response_class.FromString,
            )
            return list(fn(requests, timeout=timeout_s))
        fn = channel.stream_unary(
            rpc.path,
            request_serializer=serializer,
            response_deserializer=rpc.response_class.FromString,
        )
        return fn(requests, timeout=timeout_s)
    if rpc.server_streaming:
        fn = channel.unary_stream(
            rpc.path,
            request_serializer=serializer,
            response_deserializer=rpc.response_class.FromString,
        )
        return list(fn(request, timeout=timeout_s))
    fn = channel.unary_unary(
        rpc.path, request_serializer=serializer, response_deserializer=rpc.response_class.FromString
    )
    return fn(request, timeout=timeout_s)


# -- valid requests, the starting points of mutation -------------------------------------


def _now_ts() -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(time.time_ns() - 1_000_000_000)
    return ts


def new_payment_id(prefix: str = "h") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def valid_order(
    institution: str = INSTITUTION, bank: str = BANK, payment_id: str | None = None
) -> payment_pb2.PaymentOrder:
    return payment_pb2.PaymentOrder(
        payment_id=payment_id or new_payment_id(),
        institution_id=institution,
        type=common_pb2.PAYMENT_TYPE_DEBIT,
        payer_id=bank,
        payee_id=institution,
        bank_account="6222020000000001",
        amount=common_pb2.Money(amount_minor=100, currency=CURRENCY),
        memo="hostile-input test",
        requested_at=_now_ts(),
    )


def _participant(pid: str, kind: int) -> admin_pb2.Participant:
    is_bank = kind == common_pb2.PARTICIPANT_KIND_BANK
    return admin_pb2.Participant(
        participant_id=pid,
        kind=kind,
        name=f"Hostile {pid}",
        bank_code="HOSTILE" if is_bank else "",
        endpoint="127.0.0.1:1" if is_bank else "",
        currencies=[CURRENCY],
        net_debit_caps=[common_pb2.Money(amount_minor=1_000, currency=CURRENCY)],
        version=1,
    )


def valid_request(rpc: Rpc, institution: str = INSTITUTION, bank: str = BANK) -> Message | None:
    """A request the method accepts (or refuses only for the switch's state), or None
    for a method this module does not know yet (it still gets random requests)."""
    order = valid_order(institution, bank)
    day_ago = _now_ts()
    day_ago.seconds -= 86_400
    ref = {"institution_id": institution, "payment_id": order.payment_id}
    fresh = f"HOSTILE_{uuid.uuid4().hex[:12].upper()}"
    by_name: dict[str, Callable[[], Message]] = {
        "PaymentService.SubmitPayment": lambda: payment_pb2.SubmitPaymentRequest(order=order),
        "PaymentService.SubmitPayments": lambda: payment_pb2.SubmitPaymentsRequest(
            orders=[order, valid_order(institution, bank)]
        ),
        "PaymentService.GetPayment": lambda: payment_pb2.GetPaymentRequest(**ref),
        "PaymentService.ListPayments": lambda: payment_pb2.ListPaymentsRequest(
            institution_id=institution, start_time=day_ago, end_time=_now_ts(), page_size=10
        ),
        "AdminService.RegisterParticipant": lambda: admin_pb2.RegisterParticipantRequest(
            participant=_participant(fresh, common_pb2.PARTICIPANT_KIND_BANK)
        ),
        "AdminService.UpdateParticipant": lambda: admin_pb2.UpdateParticipantRequest(
            participant=_participant(fresh, common_pb2.PARTICIPANT_KIND_INSTITUTION)
        ),
        "AdminService.SuspendParticipant": lambda: admin_pb2.SuspendParticipantRequest(
            participant_id=fresh, reason="hostile-input test"
        ),
        "AdminService.ResumeParticipant": lambda: admin_pb2.ResumeParticipantRequest(
            participant_id=fresh, reason="hostile-input test"
        ),
        "AdminService.GetParticipant": lambda: admin_pb2.GetParticipantRequest(
            participant_id=institution
        ),
        "AdminService.ListParticipants": lambda: admin_pb2.ListParticipantsRequest(
            kind=common_pb2.PARTICIPANT_KIND_BANK, page_size=10
        ),
        "AdminService.SetNetDebitCap": lambda: admin_pb2.SetNetDebitCapRequest(
            participant_id=fresh, cap=common_pb2.Money(amount_minor=10, currency=CURRENCY)
        ),
        # A serial no certificate has (the CA's are 159 random bits): revoking it on a
        # shared cluster refuses no caller.
        "AdminService.RevokeCertificate": lambda: admin_pb2.RevokeCertificateRequest(
            serial=uuid.uuid4().hex, identity=f"institution:{fresh}", reason="hostile-input test"
        ),
        "AdminService.ListRevokedCertificates": admin_pb2.ListRevokedCertificatesRequest,
        "AuditService.GetPaymentHistory": lambda: audit_pb2.GetPaymentHistoryRequest(**ref),
        "AuditService.ListParticipantPayments": lambda: audit_pb2.ListParticipantPaymentsRequest(
            participant_id=institution, start_time=day_ago, end_time=_now_ts(), page_size=10
        ),
        "AuditService.ListWindows": lambda: audit_pb2.ListWindowsRequest(page_size=5),
        "AuditService.GetWindow": lambda: audit_pb2.GetWindowRequest(window_id=1),
        "AuditService.VerifyChains": lambda: audit_pb2.VerifyChainsRequest(shards=[0, 1]),
        "AuditService.GetInclusionProof": lambda: audit_pb2.GetInclusionProofRequest(
            window_id=1, **ref
        ),
        "AuditService.CompareCities": lambda: audit_pb2.CompareCitiesRequest(window_id=1),
        "AuditService.ExportWindow": lambda: audit_pb2.ExportWindowRequest(window_id=1),
        # Closing a window is a write the tests must not do to a shared cluster: ask to
        # close a window far in the future, which is refused (FAILED_PRECONDITION).
        "SettlementService.CloseWindow": lambda: settlement_pb2.CloseWindowRequest(
            window_id=10**12, reason="hostile-input test"
        ),
        "SettlementService.ConfirmSettlement": lambda: settlement_pb2.ConfirmSettlementRequest(
            window_id=10**12, reference="HOSTILE"
        ),
        "ShardService.SubmitOwned": lambda: shard_pb2.SubmitOwnedRequest(
            orders=[order], paths=["orders[0]"], received_zone="hostile"
        ),
        "ShardService.GetOwned": lambda: shard_pb2.GetOwnedRequest(
            refs=[shard_pb2.PaymentRef(**ref)]
        ),
        "ShardService.Lend": lambda: shard_pb2.LendRequest(
            participant_id=bank, currency=CURRENCY, for_shard=1, need_minor=1
        ),
        "ShardService.Repay": lambda: shard_pb2.RepayRequest(
            participant_id=bank, currency=CURRENCY, from_shard=1, returned_total_minor=1
        ),
        "ShardService.Describe": shard_pb2.DescribeRequest,
        "BankService.Debit": lambda: bank_pb2.BankTransferRequest(
            switch_ref=new_payment_id("ref"),
            institution_id=institution,
            bank_account="6222020000000001",
            amount=common_pb2.Money(amount_minor=100, currency=CURRENCY),
        ),
        "BankService.Credit": lambda: bank_pb2.BankTransferRequest(
            switch_ref=new_payment_id("ref"),
            institution_id=institution,
            bank_account="6222020000000001",
            amount=common_pb2.Money(amount_minor=100, currency=CURRENCY),
        ),
        "BankService.Transfers": lambda: bank_pb2.TransfersRequest(
            items=[
                bank_pb2.TransferItem(
                    direction=direction,
                    transfer=bank_pb2.BankTransferRequest(
                        switch_ref=new_payment_id("ref"),
                        institution_id=institution,
                        bank_account="6222020000000001",
                        amount=common_pb2.Money(amount_minor=100, currency=CURRENCY),
                    ),
                )
                for direction in (
                    bank_pb2.TRANSFER_DIRECTION_DEBIT,
                    bank_pb2.TRANSFER_DIRECTION_CREDIT,
                )
            ]
        ),
        "BankService.Inquire": lambda: bank_pb2.InquireRequest(switch_ref=new_payment_id("ref")),
        "BankService.Reverse": lambda: bank_pb2.ReverseRequest(
            switch_ref=new_payment_id("ref"), reason="hostile-input test"
        ),
    }
    make = by_name.get(rpc.name)
    return make() if make is not None else None


def request_strategy(rpc: Rpc, **valid: str) -> st.SearchStrategy[Message]:
    """Random messages of the method's request type, and mutations of a valid one."""
    anything = message_strategy(rpc.method.input_type)
    if valid_request(rpc, **valid) is None:
        return anything
    near_valid = st.builds(lambda: valid_request(rpc, **valid)).flatmap(mutated)
    return st.one_of(anything, near_valid, st.builds(lambda: valid_request(rpc, **valid)))


# -- raw bytes ----------------------------------------------------------------------------


def truncations(data: bytes, rng: random.Random) -> Iterator[bytes]:
    """Prefixes of a serialization: most end inside a field."""
    if len(data) > 1:
        yield data[: rng.randrange(1, len(data))]


def bit_flips(data: bytes, rng: random.Random, flips: int = 3) -> bytes:
    if not data:
        return bytes([rng.randrange(256)])
    out = bytearray(data)
    for _ in range(flips):
        i = rng.randrange(len(out))
        out[i] ^= 1 << rng.randrange(8)
    return bytes(out)


# Byte strings that are not protobuf, or are protobuf of the wrong shape.
GARBAGE = (
    b"\xff",
    b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff",  # a varint that never ends
    b"\x0a\xff\xff\xff\xff\x0f",  # field 1, length-delimited, length 4 GiB
    b"\x0a\x05abc",  # field 1 promises 5 bytes, has 3
    b"\x0a\x02\xc3\x28",  # field 1 (a string) with invalid UTF-8
    b"\x0b",  # start group with no end
    b"\x0c",  # end group with no start
    b"\x07",  # wire type 7 does not exist
    b"\x00",  # field number 0
    b"\x08\x01\x12",  # field 2 truncated
    b"\x0a" + b"\x0a\x00" * 2,  # nested length-delimited
    bytes(range(256)),
)


def nested_bomb(depth: int) -> bytes:
    """Length-delimited field 1 inside itself ``depth`` times: past protobuf's recursion
    limit (100) when parsed as nested messages."""
    data = b""
    for _ in range(depth):
        data = b"\x0a" + _varint(len(data)) + data
    return data


def group_bomb(depth: int) -> bytes:
    """Start-group tags of an unknown field ``depth`` deep, then their end tags."""
    return b"\x7b" * depth + b"\x7c" * depth


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)
