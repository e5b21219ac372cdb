"""Hostile input against every RPC, through real in-process gRPC servers.

A switch node's five services (the real servicers, router, processor and shard store
over the fakes of ``tests/fakes.py`` and in-memory windows, index and participant
registry) and a bank simulator (the real ``bank.server.serve``) listen on 127.0.0.1.
For every method the descriptors list, hypothesis sends messages with arbitrary field
values (``tests/hostile.py``: derived from the descriptors, so new fields and new
methods are covered without a change here) and mutations of a valid request. Each
answer must be OK or a client error of the one error table, never INTERNAL or UNKNOWN,
and carry the ``clearing.v1.Error`` trailer when it is not OK; the server must still
answer afterwards; and a refused request must have written nothing.

``CLEARING_HOSTILE_PROFILE=thorough`` runs many more examples (minutes).
"""

from __future__ import annotations

import base64
import copy
import os
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from cassandra import InvalidRequest
from cassandra.cqltypes import Int32Type, LongType
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clearing.v1 import (
    admin_pb2_grpc,
    audit_pb2,
    audit_pb2_grpc,
    common_pb2,
    payment_pb2,
    payment_pb2_grpc,
    settlement_pb2_grpc,
    shard_pb2,
    shard_pb2_grpc,
)
from clearinghouse.audit.service import AuditDomain
from clearinghouse.bank.server import MAX_MESSAGE_BYTES as BANK_MAX_MESSAGE_BYTES
from clearinghouse.bank.server import BankConfig, BankServerHandle, serve
from clearinghouse.domain import Participant, ParticipantKind, ParticipantStatus
from clearinghouse.domain.errors import ERROR_METADATA_KEY, STATUS_BY_ERROR
from clearinghouse.domain.model import SigningKey
from clearinghouse.domain.money import MAX_AMOUNT_MINOR
from clearinghouse.domain.signing import key_id_of, public_key_bytes
from clearinghouse.domain.validation import (
    BANK_ACCOUNT_LEN_MAX,
    BATCH_SIZE_MAX,
    MEMO_CHARS_MAX,
    PARTICIPANT_ID_LEN_MAX,
    PAYMENT_ID_LEN_MAX,
    TIMESTAMP_NANOS_MAX,
    TIMESTAMP_SECONDS_MAX,
)
from clearinghouse.order_signing import signing_channel
from clearinghouse.request_guard import RequestGuardInterceptor
from clearinghouse.security import pki
from clearinghouse.security.identity import Identity, Role
from clearinghouse.security.revocation import RevocationList, Revocations
from clearinghouse.storage.ledger import CassandraLedger
from clearinghouse.storage.revocations import CassandraRevocations
from clearinghouse.storage.windows import EventRow, WindowEvent, WindowStatus
from clearinghouse.switch.admin import AdminDomain
from clearinghouse.switch.config import (
    GRPC_DEFAULT_RECEIVE_BYTES,
    MAX_REQUEST_BYTES,
    MAX_RESPONSE_BYTES,
    server_options,
)
from clearinghouse.switch.processor import PaymentProcessor, Registry, wall_clock_us
from clearinghouse.switch.records import SHARD_COUNT, payment_key
from clearinghouse.switch.routing import LocalOwner, OwnerRef, Router
from clearinghouse.switch.servicers import (
    AdminServicer,
    AuditServicer,
    PaymentServicer,
    SettlementServicer,
    ShardServicer,
)
from clearinghouse.switch.shards import ShardedStore
from tests import hostile
from tests.fakes import FakeBank, FakeCqlSession, FakeLedger
from tests.unit.test_admin import FakeParticipantStore

pytestmark = pytest.mark.unit

NODE = "node-hostile"
ZONE = "hostile-a"
EPOCH = 1
CALL_TIMEOUT_S = 15.0
CAP_MINOR = 10**12

# OK, or a code the one error table gives a client error. DEADLINE_EXCEEDED and
# DATA_LOSS are in the table too, but nothing here is slow or corrupt: they would be bugs.
CLIENT_ERROR_CODES = frozenset(STATUS_BY_ERROR.values()) - {
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.DATA_LOSS,
}
ALLOWED_CODES = CLIENT_ERROR_CODES | {grpc.StatusCode.OK}

settings.register_profile(
    "hostile-quick",
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "hostile-thorough",
    max_examples=1_000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PROFILE = settings.get_profile(f"hostile-{os.environ.get('CLEARING_HOSTILE_PROFILE', 'quick')}")

SWITCH_RPCS = hostile.rpc_methods(hostile.SWITCH_FILES)
BANK_RPCS = hostile.rpc_methods(hostile.BANK_FILES)


# -- in-memory stand-ins for what lives in Cassandra ------------------------------------


def _bind(values: tuple[Any, ...], types: tuple[Any, ...]) -> None:
    """Serialize bound values as the Cassandra driver does (it raises on overflow)."""
    for v, t in zip(values, types, strict=True):
        if t is not None:
            t.serialize(v, 4)


class IndexedLedger(FakeLedger):
    """FakeLedger plus the payments-by-time index that CassandraLedger.list_index reads,
    run through the real list_index with a session that binds like the driver."""

    _SELECT_TIME_TYPES = (None, Int32Type, LongType, None, None, LongType, Int32Type)

    def list_index(
        self, participant_id: str, start_us: int, end_us: int, page_size: int, page_token: str
    ) -> tuple[list[tuple[str, str]], str]:
        fake_self = SimpleNamespace(_select_time="select_time", session=self)
        return CassandraLedger.list_index(  # type: ignore[arg-type]
            fake_self, participant_id, start_us, end_us, page_size, page_token
        )

    def execute(self, stmt: str, values: tuple[Any, ...]) -> list[Any]:
        assert stmt == "select_time"
        _bind(values, self._SELECT_TIME_TYPES)
        participant_id, _day, after_us, after_inst, after_id, end_us, limit = values
        with self._lock:
            rows = sorted(
                (r.received_at_us, r.institution_id, r.payment_id)
                for r in self.index_rows
                if r.listed_under == participant_id
            )
        return [
            SimpleNamespace(received_at_us=at, institution_id=inst, payment_id=pid)
            for at, inst, pid in rows
            if (at, inst, pid) > (after_us, after_inst, after_id) and at < end_us
        ][:limit]

    def snapshot(self) -> Any:
        with self._lock:
            return (
                {k: dict(v) for k, v in self.stored.items() if v},
                list(self.index_rows),
                {k: dict(v) for k, v in self.fences.items() if v},
                {k: dict(v) for k, v in self._seals.items() if v},
            )

    def keys_written(self) -> Counter[str]:
        with self._lock:
            return Counter(e.payment_key for part in self.stored.values() for e in part.values())


class CassandraLikeParticipantStore(FakeParticipantStore):
    """The registry as Cassandra keeps it: an empty partition key is an error."""

    def get(self, participant_id: str) -> Participant | None:
        if not participant_id:
            raise InvalidRequest("Key may not be empty")
        return super().get(participant_id)


class FakeWindows:
    """CassandraWindows in memory: events written once per (window, event)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.events: dict[tuple[int, WindowEvent], EventRow] = {}
        self.cut_rows: dict[int, dict[int, Any]] = {}
        self.part_rows: dict[int, dict[str, tuple[str, bytes]]] = {}

    def record(
        self, window_id: int, event: WindowEvent, at_us: int, node_id: str, detail: str = ""
    ) -> bool:
        _bind((window_id, at_us), (LongType, LongType))
        with self._lock:
            if (window_id, event) in self.events:
                return False
            self.events[(window_id, event)] = EventRow(window_id, event, at_us, node_id, detail)
            return True

    def recent(self, limit: int = 64, before_window_id: int = 0) -> list[WindowStatus]:
        _bind((before_window_id, limit), (LongType, Int32Type))
        with self._lock:
            ids = sorted({w for w, _ in self.events}, reverse=True)
            ids = [w for w in ids if before_window_id <= 0 or w < before_window_id][:limit]
        return [self.status(w) for w in ids]

    def status(self, window_id: int) -> WindowStatus:
        _bind((window_id,), (LongType,))
        order = list(WindowEvent)
        with self._lock:
            evs = [e for (w, _), e in self.events.items() if w == window_id]
        return WindowStatus(window_id, tuple(sorted(evs, key=lambda e: order.index(e.event))))

    def current(self) -> int:
        recent = self.recent(1)
        return recent[0].window_id + 1 if recent else 1

    def put_cut(self, cut: Any, node_id: str, at_us: int) -> None:
        with self._lock:
            rows = self.cut_rows.setdefault(cut.window_id, {})
            known = rows.get(cut.shard)
            if cut.block is None and known is not None and known.block is not None:
                cut = replace(cut, block=known.block)  # a cut without a block leaves it
            rows[cut.shard] = cut

    def cuts(self, window_id: int) -> dict[int, Any]:
        _bind((window_id,), (LongType,))
        with self._lock:
            return dict(self.cut_rows.get(window_id, {}))

    def put_part(self, window_id: int, part: str, body: str, digest: bytes, at_us: int) -> None:
        with self._lock:
            self.part_rows.setdefault(window_id, {})[part] = (body, digest)

    def parts(self, window_id: int) -> dict[str, tuple[str, bytes]]:
        _bind((window_id,), (LongType,))
        with self._lock:
            return dict(self.part_rows.get(window_id, {}))

    def snapshot(self) -> Any:
        with self._lock:
            return (dict(self.events), copy.deepcopy(self.cut_rows), copy.deepcopy(self.part_rows))


class AllMine:
    """The ownership map of a node that owns every shard."""

    def ownership_doubt(self) -> str | None:
        return None

    def owner_of(self, shard: int) -> OwnerRef:
        return OwnerRef(NODE, "unused:0", ZONE)


def _participant(pid: str, kind: ParticipantKind) -> Participant:
    is_bank = kind is ParticipantKind.BANK
    return Participant(
        participant_id=pid,
        kind=kind,
        name=pid,
        status=ParticipantStatus.ACTIVE,
        bank_code="HOSTILE" if is_bank else None,
        endpoint="127.0.0.1:1" if is_bank else None,
        currencies=frozenset({hostile.CURRENCY}),
        net_debit_caps={hostile.CURRENCY: CAP_MINOR},
        version=1,
        signing_keys=(
            ()
            if is_bank
            else (
                SigningKey(key_id_of(public_key_bytes(SIGNING_KEY)), public_key_bytes(SIGNING_KEY)),
            )
        ),
    )


# The institution's signing key: the world's channel signs every order it carries (as a
# participant's client does), so generated and mutated orders get past the signature
# check and exercise everything behind it.
SIGNING_KEY = Ed25519PrivateKey.generate()
PUBLIC_KEY = public_key_bytes(SIGNING_KEY)

PARTICIPANTS = {
    hostile.INSTITUTION: _participant(hostile.INSTITUTION, ParticipantKind.INSTITUTION),
    hostile.BANK: _participant(hostile.BANK, ParticipantKind.BANK),
}


# -- the servers ------------------------------------------------------------------------


@dataclass
class SwitchWorld:
    ledger: IndexedLedger
    windows: FakeWindows
    participants: CassandraLikeParticipantStore
    bank: FakeBank
    store: ShardedStore
    channel: grpc.Channel
    revocations: FakeCqlSession
    codes: Counter[tuple[str, str]] = field(default_factory=Counter)

    def snapshot(self) -> Any:
        return (
            self.ledger.snapshot(),
            self.windows.snapshot(),
            self.participants.snapshot(),
            dict(self.bank.ledger),
            copy.deepcopy(self.revocations.tables),
        )


@pytest.fixture(scope="module")
def switch_world() -> Iterator[SwitchWorld]:
    ledger = IndexedLedger()
    windows = FakeWindows()
    participants = CassandraLikeParticipantStore()
    for p in PARTICIPANTS.values():
        participants.put(p, reason="registered", now_us=wall_clock_us())
    bank = FakeBank()
    pool = ThreadPoolExecutor(16, thread_name_prefix="hostile")
    router: Router

    store = ShardedStore(
        node_id=NODE, zone=ZONE, ledger=ledger, participant=PARTICIPANTS.get,
        still_owner=lambda shard, epoch: epoch == EPOCH, relinquish=lambda shard: None,
        clock=wall_clock_us, borrow=lambda *args: router.borrow(*args),  # noqa: PLW0108 (bound later)
        repay=lambda *args: router.repay(*args),  # noqa: PLW0108 (bound later)
    )  # fmt: skip
    store.committer.start()
    stop = threading.Event()
    for shard in range(SHARD_COUNT):
        store.gain(shard, EPOCH)
        assert store.take(shard, EPOCH, stop)
    registry = Registry(PARTICIPANTS)
    processor = PaymentProcessor(zone=ZONE, store=store, bank=bank, registry=registry)
    local = LocalOwner(processor)
    # Every shard is local: the router never opens a channel to another node.
    router = Router(
        node_id=NODE, zone=ZONE, owners=AllMine(), local=local, pool=pool,
        credentials=grpc.local_channel_credentials(),
    )  # fmt: skip
    audit = AuditDomain(
        ledger=ledger, windows=windows,  # type: ignore[arg-type]
        kinds=lambda: {pid: p.kind for pid, p in PARTICIPANTS.items()},
        cities=["city-a", "city-b"], city_reader=lambda city: (ledger, windows, lambda: None),
    )  # fmt: skip

    def describe() -> Any:
        return shard_pb2.DescribeResponse(node_id=NODE)

    server = grpc.server(
        ThreadPoolExecutor(8, thread_name_prefix="hostile-grpc"),
        options=server_options(),  # the limits server.build gives a node
        interceptors=[RequestGuardInterceptor()],
    )
    payment_pb2_grpc.add_PaymentServiceServicer_to_server(
        PaymentServicer(router, ledger, registry),
        server,  # type: ignore[arg-type]
    )
    revocation_session = FakeCqlSession()
    revocations = Revocations(CassandraRevocations(revocation_session), RevocationList(),
                              wall_clock_us)  # fmt: skip
    admin_pb2_grpc.add_AdminServiceServicer_to_server(
        AdminServicer(AdminDomain(participants, wall_clock_us), lambda: None, revocations), server
    )
    audit_pb2_grpc.add_AuditServiceServicer_to_server(
        AuditServicer(audit, router, ledger),
        server,  # type: ignore[arg-type]
    )
    settlement_pb2_grpc.add_SettlementServiceServicer_to_server(
        SettlementServicer(windows, NODE, wall_clock_us), server
    )
    shard_pb2_grpc.add_ShardServiceServicer_to_server(
        ShardServicer(local, describe, registry), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = signing_channel(
        grpc.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", MAX_RESPONSE_BYTES)]
        ),
        lambda pid: SIGNING_KEY if pid == hostile.INSTITUTION else None,
    )
    world = SwitchWorld(ledger, windows, participants, bank, store, channel, revocation_session)
    yield world
    print("\nstatus codes by method:", dict(sorted(world.codes.items())))
    channel.close()
    server.stop(None).wait()
    stop.set()
    store.committer.stop()
    pool.shutdown(wait=False)


@dataclass
class BankWorld:
    handle: BankServerHandle
    channel: grpc.Channel

    def snapshot(self) -> Any:
        """What the book holds: records (any new one counts) and totals (any reversal)."""
        ledger = self.handle.ledger
        return len(ledger), ledger.totals()


@pytest.fixture(scope="module")
def bank_world(test_ca: pki.LocalCA) -> Iterator[BankWorld]:
    bank = Identity(Role.BANK, hostile.BANK)
    test_ca.ensure(bank, ips=["127.0.0.1"])
    test_ca.ensure(pki.node("beijing-a"))
    handle = serve(BankConfig(bank_id=hostile.BANK, keys=test_ca.load(bank), listen="127.0.0.1:0"))
    # The switch's nodes are the bank's only callers.
    channel = pki.secure_channel(handle.address, test_ca.load(pki.node("beijing-a")))
    yield BankWorld(handle, channel)
    channel.close()
    handle.stop(0)


# -- checks -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    code: grpc.StatusCode
    response: Any
    error: common_pb2.Error | None
    details: str


def send(channel: grpc.Channel, rpc: hostile.Rpc, request: Any) -> Outcome:
    try:
        response = hostile.call(channel, rpc, request, CALL_TIMEOUT_S)
    except grpc.RpcError as e:
        assert isinstance(e, grpc.Call)
        err = None
        for key, value in e.trailing_metadata() or ():
            if key == ERROR_METADATA_KEY:
                err = common_pb2.Error.FromString(value)
        return Outcome(e.code(), None, err, e.details() or "")
    return Outcome(grpc.StatusCode.OK, response, None, "")


def _size(request: Any) -> int:
    return len(request) if isinstance(request, bytes) else int(request.ByteSize())


def check_outcome(
    rpc: hostile.Rpc, request: Any, out: Outcome, limit_bytes: int = MAX_REQUEST_BYTES
) -> None:
    where = f"{rpc.name} with {str(request)[:600]!r}"
    assert out.code in ALLOWED_CODES, f"{where}: {out.code} {out.details}"
    if out.code is grpc.StatusCode.OK:
        return
    # Refusals of the switch carry the error detail; only gRPC's own refusal of a
    # message over the server's size limit cannot.
    if out.code is grpc.StatusCode.RESOURCE_EXHAUSTED and _size(request) > limit_bytes:
        assert out.error is None, where
        return
    assert out.error is not None, f"{where}: {out.code} without {ERROR_METADATA_KEY}"
    assert out.error.code == out.code.value[0], where
    assert out.error.reason, where


def _alive(channel: grpc.Channel, rpc: hostile.Rpc, request: Any) -> None:
    out = send(channel, rpc, request)
    assert out.code is grpc.StatusCode.OK, f"the server stopped answering: {out}"


DESCRIBE = next(r for r in SWITCH_RPCS if r.name == "ShardService.Describe")
INQUIRE = next(r for r in BANK_RPCS if r.name == "BankService.Inquire")


def _batch_orders(request: Any) -> list[Any]:
    return list(getattr(request, "orders", []))


def _check_batch_refusals(
    world: SwitchWorld, request: Any, out: Outcome, before: Counter[str]
) -> None:
    """In a batch answered OK, an order refused on its own wrote nothing either."""
    results = list(getattr(out.response, "results", []))
    orders = _batch_orders(request)
    if not results or len(results) != len(orders):
        return
    accepted = {
        payment_key(o.institution_id, o.payment_id)
        for o, r in zip(orders, results, strict=True)
        if r.HasField("payment")
    }
    after = world.ledger.keys_written()
    for o, r in zip(orders, results, strict=True):
        key = payment_key(o.institution_id, o.payment_id)
        if r.HasField("error") and key not in accepted:
            assert after[key] == before[key], f"refused order {key} wrote ledger entries: {r}"


# -- the property tests -----------------------------------------------------------------


@pytest.mark.parametrize("rpc", SWITCH_RPCS, ids=lambda r: r.name)
@settings(PROFILE)
@given(data=st.data())
def test_switch_rpcs_answer_hostile_requests_with_client_errors(
    switch_world: SwitchWorld, rpc: hostile.Rpc, data: st.DataObject
) -> None:
    request = data.draw(hostile.request_strategy(rpc), label="request")
    before = switch_world.snapshot()
    keys_before = switch_world.ledger.keys_written()
    out = send(switch_world.channel, rpc, request)
    switch_world.codes[(rpc.name, out.code.name)] += 1
    check_outcome(rpc, request, out)
    if out.code is not grpc.StatusCode.OK:
        assert switch_world.snapshot() == before, f"{rpc.name} refused ({out.code}) but wrote"
    else:
        _check_batch_refusals(switch_world, request, out, keys_before)
    _alive(switch_world.channel, DESCRIBE, shard_pb2.DescribeRequest())


@pytest.mark.parametrize("rpc", BANK_RPCS, ids=lambda r: r.name)
@settings(PROFILE)
@given(data=st.data())
def test_bank_rpcs_answer_hostile_requests_with_client_errors(
    bank_world: BankWorld, rpc: hostile.Rpc, data: st.DataObject
) -> None:
    request = data.draw(hostile.request_strategy(rpc), label="request")
    before = bank_world.snapshot()
    out = send(bank_world.channel, rpc, request)
    check_outcome(rpc, request, out, BANK_MAX_MESSAGE_BYTES)
    if out.code is not grpc.StatusCode.OK:
        assert bank_world.snapshot() == before, f"{rpc.name} refused ({out.code}) but wrote"
    _alive(bank_world.channel, INQUIRE, hostile.valid_request(INQUIRE))


def test_every_method_is_covered() -> None:
    names = {r.name for r in SWITCH_RPCS + BANK_RPCS}
    assert {
        "PaymentService.SubmitPayment", "AdminService.RegisterParticipant",
        "AuditService.ExportWindow", "SettlementService.CloseWindow", "ShardService.Lend",
        "BankService.Debit",
    } <= names  # fmt: skip
    assert len(names) == len(SWITCH_RPCS) + len(BANK_RPCS)
    # Every method has a valid template, so mutations reach past the first check.
    assert [r.name for r in SWITCH_RPCS + BANK_RPCS if hostile.valid_request(r) is None] == []


def test_valid_templates_are_accepted(switch_world: SwitchWorld) -> None:
    """The starting points of mutation do pass validation (else mutating them tests
    nothing beyond the first check)."""
    for name in ("PaymentService.SubmitPayment", "PaymentService.SubmitPayments",
                 "ShardService.Lend", "PaymentService.ListPayments"):  # fmt: skip
        rpc = next(r for r in SWITCH_RPCS if r.name == name)
        out = send(switch_world.channel, rpc, hostile.valid_request(rpc))
        assert out.code is grpc.StatusCode.OK, (name, out)
        for r in getattr(out.response, "results", []):
            assert r.HasField("payment"), (name, r)


# -- undecodable bytes --------------------------------------------------------------------


def _raw_bytes() -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.sampled_from(hostile.GARBAGE),
        st.just(hostile.nested_bomb(150)),
        st.just(hostile.group_bomb(150)),
        st.binary(min_size=1, max_size=200),
    )


@pytest.mark.parametrize("rpc", SWITCH_RPCS, ids=lambda r: r.name)
@settings(PROFILE, max_examples=10)
@given(raw=_raw_bytes())
def test_raw_bytes_are_invalid_argument_or_parse(
    switch_world: SwitchWorld, rpc: hostile.Rpc, raw: bytes
) -> None:
    before = switch_world.snapshot()
    out = send(switch_world.channel, rpc, raw)
    check_outcome(rpc, raw, out)
    try:
        rpc.request_class.FromString(raw)
    except Exception:
        assert out.code is grpc.StatusCode.INVALID_ARGUMENT, out
        assert out.error is not None
        assert out.error.reason == "MALFORMED_REQUEST"
        assert switch_world.snapshot() == before


@pytest.mark.parametrize(
    "raw", [*hostile.GARBAGE, hostile.nested_bomb(150), hostile.group_bomb(150)]
)
def test_guard_turns_garbage_into_invalid_argument(switch_world: SwitchWorld, raw: bytes) -> None:
    submit = switch_world.channel.unary_unary(
        "/clearing.v1.PaymentService/SubmitPayment",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    try:
        payment_pb2.SubmitPaymentRequest.FromString(raw)
    except Exception:
        pass
    else:
        pytest.skip("these bytes happen to parse")
    with pytest.raises(grpc.RpcError) as exc:
        submit(raw, timeout=CALL_TIMEOUT_S)
    e = exc.value
    assert isinstance(e, grpc.Call)
    assert e.code() is grpc.StatusCode.INVALID_ARGUMENT, e.details()
    assert (e.details() or "").startswith("MALFORMED_REQUEST")
    (err,) = [
        common_pb2.Error.FromString(v)
        for k, v in (e.trailing_metadata() or ())
        if k == ERROR_METADATA_KEY
    ]
    assert err.reason == "MALFORMED_REQUEST"
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "clearing.v1.PaymentService/SubmitPayment" in err.field_violations[0].description


def test_guard_covers_the_bank_and_streaming_methods(
    switch_world: SwitchWorld, bank_world: BankWorld
) -> None:
    bad = b"\x0a\x05abc"  # field 1 promises 5 bytes and has 3: no message parses it
    export = next(r for r in SWITCH_RPCS if r.name == "AuditService.ExportWindow")
    debit = next(r for r in BANK_RPCS if r.name == "BankService.Debit")
    for channel, rpc in ((switch_world.channel, export), (bank_world.channel, debit)):
        out = send(channel, rpc, bad)
        assert out.code is grpc.StatusCode.INVALID_ARGUMENT, (rpc.name, out)
        assert out.error is not None and out.error.reason == "MALFORMED_REQUEST"


def test_guard_keeps_client_streaming_methods_answering(bank_world: BankWorld) -> None:
    """Server reflection is stream-stream: a bad message in the stream is refused."""
    reflect = bank_world.channel.stream_stream(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    with pytest.raises(grpc.RpcError) as exc:
        list(reflect(iter([b"\x0a\x02\xc3\x28"]), timeout=CALL_TIMEOUT_S))
    assert exc.value.code() is grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]


def _message_of(size_bytes: int) -> bytes:
    """A request of exactly ``size_bytes``: field 1, length-delimited, holding ``x``
    bytes (each one an unknown varint field 15 of value 120: the order parses, empty,
    and validation refuses it)."""
    for n in range(size_bytes, 0, -1):
        head = b"\x0a" + hostile._varint(n)
        if len(head) + n == size_bytes:
            return head + b"x" * n
    raise AssertionError(f"no message of {size_bytes} bytes")


def test_the_switch_refuses_a_request_one_byte_over_its_own_limit(
    switch_world: SwitchWorld,
) -> None:
    """The limit is the switch's, not gRPC's default: a request just over it (and far
    under gRPC's 4 MiB) is RESOURCE_EXHAUSTED, one of exactly the limit gets through."""
    assert MAX_REQUEST_BYTES + 1 < GRPC_DEFAULT_RECEIVE_BYTES
    submit = _rpc("PaymentService.SubmitPayment")
    before = switch_world.snapshot()
    over = send(switch_world.channel, submit, _message_of(MAX_REQUEST_BYTES + 1))
    assert over.code is grpc.StatusCode.RESOURCE_EXHAUSTED, over
    at = send(switch_world.channel, submit, _message_of(MAX_REQUEST_BYTES))
    assert at.code is grpc.StatusCode.INVALID_ARGUMENT, at  # the switch's validation ran
    assert at.error is not None and at.error.field_violations, at
    assert switch_world.snapshot() == before
    _alive(switch_world.channel, DESCRIBE, shard_pb2.DescribeRequest())


def test_the_bank_refuses_a_request_one_byte_over_its_limit(bank_world: BankWorld) -> None:
    assert BANK_MAX_MESSAGE_BYTES + 1 < GRPC_DEFAULT_RECEIVE_BYTES
    out = send(bank_world.channel, INQUIRE, _message_of(BANK_MAX_MESSAGE_BYTES + 1))
    assert out.code is grpc.StatusCode.RESOURCE_EXHAUSTED, out
    _alive(bank_world.channel, INQUIRE, hostile.valid_request(INQUIRE))


def _maximal_order(i: int) -> payment_pb2.PaymentOrder:
    """An order with every field at the longest validation allows."""
    ident = "I" * PARTICIPANT_ID_LEN_MAX
    return payment_pb2.PaymentOrder(
        payment_id=f"{i:0{PAYMENT_ID_LEN_MAX}d}", institution_id=ident,
        type=common_pb2.PAYMENT_TYPE_CREDIT, payer_id=ident, payee_id="B" * PARTICIPANT_ID_LEN_MAX,
        bank_account="9" * BANK_ACCOUNT_LEN_MAX,
        amount=common_pb2.Money(amount_minor=MAX_AMOUNT_MINOR, currency="CNY"),
        # Four bytes a character (outside the BMP): the most bytes a memo may have.
        memo="\U0001f4b0" * MEMO_CHARS_MAX,
        requested_at=Timestamp(seconds=TIMESTAMP_SECONDS_MAX, nanos=TIMESTAMP_NANOS_MAX),
        signature=b"\xff" * 64, signing_key_id="f" * 16,
    )  # fmt: skip


def test_a_full_batch_of_maximal_orders_fits_the_request_limit(
    switch_world: SwitchWorld,
) -> None:
    orders = [_maximal_order(i) for i in range(BATCH_SIZE_MAX)]
    o = orders[0]
    assert len(o.memo) == MEMO_CHARS_MAX and len(o.memo.encode()) == 4 * MEMO_CHARS_MAX
    batch = payment_pb2.SubmitPaymentsRequest(orders=orders)
    # What the receiving node forwards to a shard's owner: the same orders and more.
    owned = shard_pb2.SubmitOwnedRequest(
        orders=orders, paths=[f"orders[{i}]" for i in range(BATCH_SIZE_MAX)],
        received_zone="z" * 64,
    )  # fmt: skip
    largest = max(batch.ByteSize(), owned.ByteSize())
    print(f"\nthe largest valid request: {largest} bytes (limit {MAX_REQUEST_BYTES})")
    # Room to spare (a field added later), and still a limit of the switch's own.
    assert largest * 2 <= MAX_REQUEST_BYTES < GRPC_DEFAULT_RECEIVE_BYTES
    out = send(switch_world.channel, _rpc("PaymentService.SubmitPayments"), batch)
    assert out.code is not grpc.StatusCode.RESOURCE_EXHAUSTED, out


# -- regressions: inputs the fuzzing found ------------------------------------------------


def _rpc(name: str) -> hostile.Rpc:
    return next(r for r in SWITCH_RPCS if r.name == name)


@pytest.mark.parametrize("seconds", [-(2**62), -(10**13), 10**13, 2**62, 253_402_300_800])
@pytest.mark.parametrize(
    "name", ["PaymentService.ListPayments", "AuditService.ListParticipantPayments"]
)
def test_listing_times_outside_the_timestamp_range_are_invalid_argument(
    switch_world: SwitchWorld, name: str, seconds: int
) -> None:
    # Start and end within the 31-day bound of each other, so that only the time's own
    # range can refuse them (it used to reach time.gmtime and the driver: INTERNAL).
    rpc = _rpc(name)
    request = rpc.request_class()
    setattr(request, rpc.method.input_type.fields[0].name, hostile.INSTITUTION)
    request.start_time.seconds = seconds  # type: ignore[attr-defined]
    request.end_time.seconds = seconds + 10  # type: ignore[attr-defined]
    out = send(switch_world.channel, rpc, request)
    assert out.code is grpc.StatusCode.INVALID_ARGUMENT, out
    assert out.error is not None
    assert {v.field for v in out.error.field_violations} <= {"start_time", "end_time"}


@pytest.mark.parametrize("nanos", [-1, -999_999_999, 1_000_000_000, 2_000_000_000])
def test_an_order_time_with_nanos_outside_a_timestamp_is_invalid_argument(
    switch_world: SwitchWorld, nanos: int
) -> None:
    # It was normalised (2e9 nanos: two seconds later), not stored as it was sent.
    before = switch_world.snapshot()
    rpc = _rpc("PaymentService.SubmitPayment")
    request = hostile.valid_request(rpc)
    request.order.requested_at.nanos = nanos  # type: ignore[attr-defined]
    out = send(switch_world.channel, rpc, request)
    assert out.code is grpc.StatusCode.INVALID_ARGUMENT, out
    assert out.error is not None
    assert [v.field for v in out.error.field_violations] == ["order.requested_at"]
    assert switch_world.snapshot() == before


@pytest.mark.parametrize("shards", [[3, 3], [0, 1, 0], [SHARD_COUNT], [-1]])
def test_verify_chains_names_each_real_shard_at_most_once(
    switch_world: SwitchWorld, shards: list[int]
) -> None:
    # Each shard named is a whole chain read; 300,000 names were 300,000 reads.
    rpc = _rpc("AuditService.VerifyChains")
    out = send(switch_world.channel, rpc, audit_pb2.VerifyChainsRequest(shards=shards))
    assert out.code is grpc.StatusCode.INVALID_ARGUMENT, out
    assert out.error is not None
    assert [v.field for v in out.error.field_violations] == ["shards"]


@pytest.mark.parametrize("at", ["-99999999999999999999999", "99999999999999999999999", "9" * 5000])
def test_page_tokens_outside_a_bigint_are_invalid_argument(
    switch_world: SwitchWorld, at: str
) -> None:
    rpc = _rpc("PaymentService.ListPayments")
    request = hostile.valid_request(rpc)
    request.page_token = base64.urlsafe_b64encode(f"{at}|p-1".encode()).decode()  # type: ignore[attr-defined]
    out = send(switch_world.channel, rpc, request)
    assert out.code is grpc.StatusCode.INVALID_ARGUMENT, out
    assert out.error is not None
    assert [v.field for v in out.error.field_violations] == ["page_token"]


@pytest.mark.parametrize(
    "name", ["GetParticipant", "SuspendParticipant", "ResumeParticipant", "SetNetDebitCap"]
)
@pytest.mark.parametrize("participant_id", ["", "a b", "x" * 65])
def test_admin_calls_naming_a_malformed_participant_id_are_invalid_argument(
    switch_world: SwitchWorld, name: str, participant_id: str
) -> None:
    # An empty id reached Cassandra ("Key may not be empty"): INTERNAL.
    rpc = _rpc(f"AdminService.{name}")
    request = hostile.valid_request(rpc)
    request.participant_id = participant_id  # type: ignore[attr-defined]
    out = send(switch_world.channel, rpc, request)
    assert out.code is grpc.StatusCode.INVALID_ARGUMENT, out
    assert out.error is not None
    assert [v.field for v in out.error.field_violations] == ["participant_id"]


@pytest.mark.parametrize("for_shard", [-1, SHARD_COUNT, 2**31 - 1])
def test_lend_to_a_shard_that_does_not_exist_is_refused_and_writes_nothing(
    switch_world: SwitchWorld, for_shard: int
) -> None:
    before = switch_world.snapshot()
    request = shard_pb2.LendRequest(
        participant_id=hostile.BANK, currency=hostile.CURRENCY, for_shard=for_shard, need_minor=1
    )
    out = send(switch_world.channel, _rpc("ShardService.Lend"), request)
    assert out.code is grpc.StatusCode.INVALID_ARGUMENT, out
    assert out.error is not None
    assert [v.field for v in out.error.field_violations] == ["for_shard"]
    assert switch_world.snapshot() == before


def test_errors_that_echo_huge_input_still_arrive_whole(switch_world: SwitchWorld) -> None:
    # Messages and violations quote the request; unbounded, they overflowed the client's
    # 8 KiB trailer limit and the caller saw RESOURCE_EXHAUSTED instead of the error.
    huge = "\u4e2d" * 3_000
    set_cap = _rpc("AdminService.SetNetDebitCap")
    request = hostile.valid_request(set_cap)
    request.cap.currency = huge  # type: ignore[attr-defined]
    out = send(switch_world.channel, set_cap, request)
    assert out.code is grpc.StatusCode.INVALID_ARGUMENT, out.details
    assert out.error is not None
    assert [v.field for v in out.error.field_violations] == ["cap.currency"]
    register = _rpc("AdminService.RegisterParticipant")
    request = hostile.valid_request(register)
    # As many as fit under the request limit (each 9 KB): far more than 8 KiB to echo.
    many = MAX_REQUEST_BYTES * 8 // 10 // len(huge.encode())
    request.participant.currencies.extend([huge + str(i) for i in range(many)])  # type: ignore[attr-defined]
    out = send(switch_world.channel, register, request)
    assert out.code is grpc.StatusCode.INVALID_ARGUMENT, out.details
    assert out.error is not None
    assert 0 < len(out.error.field_violations) <= 16
    assert len(out.error.SerializeToString()) < 4096
