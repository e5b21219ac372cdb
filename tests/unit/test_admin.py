"""AdminDomain over an in-memory store: every rule, version conflicts, new versions per
change, and nothing written for a rejected request."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Mapping
from itertools import pairwise
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from clearinghouse.domain import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Participant,
    ParticipantKind,
    ParticipantStatus,
)
from clearinghouse.domain.model import SigningKey
from clearinghouse.domain.signing import key_id_of, public_key_bytes
from clearinghouse.switch.admin import (
    CHANGE_ATTEMPTS_MAX,
    NAME_CHARS_MAX,
    PARTICIPANT_EXISTS,
    STATUS_REASON_CHARS_MAX,
    VERSION_CONFLICT,
    AdminDomain,
)
from clearinghouse.switch.convert import participant_to_pb

pytestmark = pytest.mark.unit

T0_US = 1_750_000_000_000_000
TICK_US = 1_000


@dataclasses.dataclass(frozen=True)
class Written:
    participant: Participant
    reason: str
    now_us: int


class FakeParticipantStore:
    """participant_id -> versions, oldest first; a version is written once, like the
    ``IF NOT EXISTS`` insert of the Cassandra store."""

    def __init__(self) -> None:
        self.versions: dict[str, list[Written]] = {}
        self.puts = 0  # every put, applied or not
        # Runs inside put before the write, to let a test slip in a concurrent change.
        self.before_put: Callable[[Participant], object] | None = None

    def all(self) -> Mapping[str, Participant]:
        return {pid: vs[-1].participant for pid, vs in self.versions.items()}

    def get(self, participant_id: str) -> Participant | None:
        vs = self.versions.get(participant_id)
        return vs[-1].participant if vs else None

    def put(self, participant: Participant, *, reason: str, now_us: int) -> Participant:
        self.puts += 1
        hook, self.before_put = self.before_put, None
        if hook is not None:
            hook(participant)
        vs = self.versions.setdefault(participant.participant_id, [])
        if any(w.participant.version == participant.version for w in vs):
            raise FailedPrecondition("version exists", reason=VERSION_CONFLICT)
        vs.append(Written(participant, reason, now_us))
        vs.sort(key=lambda w: w.participant.version)
        return participant

    def history(self, participant_id: str) -> list[Written]:
        return list(self.versions.get(participant_id, []))

    def snapshot(self) -> dict[str, list[Written]]:
        return {pid: list(vs) for pid, vs in self.versions.items()}


class FakeClock:
    def __init__(self) -> None:
        self.now_us = T0_US

    def __call__(self) -> int:
        self.now_us += TICK_US
        return self.now_us


def bank(**changes: Any) -> Participant:
    fields: dict[str, Any] = {
        "participant_id": "BANK_ICBC",
        "kind": ParticipantKind.BANK,
        "name": "Industrial and Commercial Bank of China",
        "status": ParticipantStatus.ACTIVE,
        "bank_code": "ICBC",
        "endpoint": "bank-icbc.example:50061",
        "currencies": frozenset({"CNY", "USD"}),
        "net_debit_caps": {"CNY": 5_000_000},
        "version": 1,
    }
    fields.update(changes)
    return Participant(**fields)


def institution(**changes: Any) -> Participant:
    base = {
        "participant_id": "INST_ALIPAY",
        "kind": ParticipantKind.INSTITUTION,
        "name": "Alipay",
        "bank_code": None,
        "endpoint": None,
        "currencies": frozenset({"CNY"}),
        "net_debit_caps": {"CNY": 1_000_000},
    }
    return bank(**{**base, **changes})


@pytest.fixture
def store() -> FakeParticipantStore:
    return FakeParticipantStore()


@pytest.fixture
def admin(store: FakeParticipantStore) -> AdminDomain:
    return AdminDomain(store, FakeClock())


def violations_of(exc: pytest.ExceptionInfo[InvalidArgument]) -> set[str]:
    return {v.field for v in exc.value.violations}


def rejects(
    admin: AdminDomain, store: FakeParticipantStore, p: Participant
) -> pytest.ExceptionInfo[InvalidArgument]:
    before = store.snapshot()
    with pytest.raises(InvalidArgument) as exc:
        admin.register(p)
    assert store.snapshot() == before, "a rejected request must write nothing"
    return exc


# ---- register --------------------------------------------------------------------------


def test_register_stores_version_1_active_whatever_the_request_says(
    admin: AdminDomain, store: FakeParticipantStore
) -> None:
    got = admin.register(bank(status=ParticipantStatus.SUSPENDED, version=7))
    assert got.version == 1
    assert got.status is ParticipantStatus.ACTIVE
    [written] = store.history("BANK_ICBC")
    assert written.participant == got
    assert written.reason == "registered"
    assert written.now_us == T0_US + TICK_US


def test_register_an_institution(admin: AdminDomain) -> None:
    got = admin.register(institution())
    assert got.kind is ParticipantKind.INSTITUTION
    assert admin.get("INST_ALIPAY") == got


def test_register_stores_empty_bank_fields_of_an_institution_as_none(admin: AdminDomain) -> None:
    got = admin.register(institution(bank_code="", endpoint=""))
    assert (got.bank_code, got.endpoint) == (None, None)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"participant_id": ""}, "participant.participant_id"),
        ({"participant_id": "BANK ICBC"}, "participant.participant_id"),
        ({"participant_id": "B" * 65}, "participant.participant_id"),
        ({"participant_id": "BANK/ICBC"}, "participant.participant_id"),
        ({"kind": "BANK"}, "participant.kind"),
        ({"name": ""}, "participant.name"),
        ({"name": "   "}, "participant.name"),
        ({"name": "N" * (NAME_CHARS_MAX + 1)}, "participant.name"),
        ({"currencies": frozenset({"CNY", "XXX"})}, "participant.currencies"),
        ({"bank_code": None}, "participant.bank_code"),
        ({"bank_code": ""}, "participant.bank_code"),
        ({"bank_code": "icbc"}, "participant.bank_code"),
        ({"bank_code": "I"}, "participant.bank_code"),
        ({"bank_code": "ICBKCNBJ0001"}, "participant.bank_code"),
        ({"bank_code": "IC-BC"}, "participant.bank_code"),
        ({"endpoint": None}, "participant.endpoint"),
        ({"endpoint": "bank-icbc.example"}, "participant.endpoint"),
        ({"endpoint": ":50061"}, "participant.endpoint"),
        ({"endpoint": "bank-icbc.example:0"}, "participant.endpoint"),
        ({"endpoint": "bank-icbc.example:65536"}, "participant.endpoint"),
        ({"endpoint": "bank icbc:50061"}, "participant.endpoint"),
        ({"endpoint": "http://bank-icbc.example:50061"}, "participant.endpoint"),
        ({"endpoint": "h" * 254 + ":50061"}, "participant.endpoint"),
        ({"net_debit_caps": {"CNY": -1}}, "participant.net_debit_caps[CNY]"),
        ({"net_debit_caps": {"CNY": True}}, "participant.net_debit_caps[CNY]"),
        ({"net_debit_caps": {"CNY": 2**63}}, "participant.net_debit_caps[CNY]"),
        ({"net_debit_caps": {"EUR": 10}}, "participant.net_debit_caps[EUR]"),
    ],
)
def test_register_rejects_a_bad_bank_field(
    admin: AdminDomain, store: FakeParticipantStore, changes: dict[str, Any], field: str
) -> None:
    assert violations_of(rejects(admin, store, bank(**changes))) == {field}


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"bank_code": "ICBC"}, "participant.bank_code"),
        ({"endpoint": "inst.example:50061"}, "participant.endpoint"),
    ],
)
def test_register_rejects_bank_fields_on_an_institution(
    admin: AdminDomain, store: FakeParticipantStore, changes: dict[str, Any], field: str
) -> None:
    assert violations_of(rejects(admin, store, institution(**changes))) == {field}


@pytest.mark.parametrize(
    "endpoint", ["localhost:1", "10.0.0.7:50061", "[::1]:50061", "bank-icbc.example:65535"]
)
def test_register_accepts_endpoints(admin: AdminDomain, endpoint: str) -> None:
    assert admin.register(bank(endpoint=endpoint)).endpoint == endpoint


def test_register_accepts_a_zero_cap_and_no_caps(admin: AdminDomain) -> None:
    assert admin.register(bank(net_debit_caps={"CNY": 0})).net_debit_cap("CNY") == 0
    assert admin.register(institution(net_debit_caps={})).net_debit_caps == {}


def test_register_reports_every_violation_at_once(
    admin: AdminDomain, store: FakeParticipantStore
) -> None:
    p = bank(
        participant_id="",
        name="",
        currencies=frozenset({"XXX", "CNY"}),
        bank_code="x",
        endpoint="nowhere",
        net_debit_caps={"CNY": -5, "JPY": 1},
    )
    assert violations_of(rejects(admin, store, p)) == {
        "participant.participant_id",
        "participant.name",
        "participant.currencies",
        "participant.bank_code",
        "participant.endpoint",
        "participant.net_debit_caps[CNY]",
        "participant.net_debit_caps[JPY]",
    }


def test_register_an_existing_id_is_already_exists_and_writes_nothing(
    admin: AdminDomain, store: FakeParticipantStore
) -> None:
    admin.register(bank())
    before = store.snapshot()
    with pytest.raises(AlreadyExists) as exc:
        admin.register(bank(name="Another bank"))
    assert exc.value.reason == PARTICIPANT_EXISTS
    assert store.snapshot() == before


def test_register_losing_a_race_is_already_exists(
    admin: AdminDomain, store: FakeParticipantStore
) -> None:
    rival = bank(name="The rival's registration")
    store.before_put = lambda _: store.versions.setdefault("BANK_ICBC", []).append(
        Written(rival, "registered", T0_US)
    )
    with pytest.raises(AlreadyExists):
        admin.register(bank())
    assert [w.participant for w in store.history("BANK_ICBC")] == [rival]


# ---- update ----------------------------------------------------------------------------


def test_update_writes_the_next_version_and_keeps_the_status(
    admin: AdminDomain, store: FakeParticipantStore
) -> None:
    admin.register(bank())
    admin.suspend("BANK_ICBC", "maintenance")
    wanted = bank(name="ICBC", endpoint="bank-icbc-2.example:50061", version=2)
    got = admin.update(wanted, expected_version=2)
    assert got.version == 3
    assert got.status is ParticipantStatus.SUSPENDED
    assert (got.name, got.endpoint) == ("ICBC", "bank-icbc-2.example:50061")
    assert [w.participant.version for w in store.history("BANK_ICBC")] == [1, 2, 3]
    assert store.history("BANK_ICBC")[-1].reason == "updated"


def test_update_from_a_stale_version_is_a_conflict_and_writes_nothing(
    admin: AdminDomain, store: FakeParticipantStore
) -> None:
    admin.register(bank())
    admin.set_cap("BANK_ICBC", "USD", 10)
    before = store.snapshot()
    with pytest.raises(FailedPrecondition) as exc:
        admin.update(bank(name="Stale edit"), expected_version=1)
    assert exc.value.reason == VERSION_CONFLICT
    assert store.snapshot() == before


def test_update_losing_a_race_is_a_conflict(
    admin: AdminDomain, store: FakeParticipantStore
) -> None:
    admin.register(bank())
    rival = AdminDomain(store, FakeClock())
    store.before_put = lambda _: rival.suspend("BANK_ICBC", "rival operator")
    with pytest.raises(FailedPrecondition) as exc:
        admin.update(bank(name="Mine"), expected_version=1)
    assert exc.value.reason == VERSION_CONFLICT
    assert admin.get("BANK_ICBC").name != "Mine"
    assert admin.get("BANK_ICBC").status is ParticipantStatus.SUSPENDED


def test_update_of_an_unknown_participant_is_not_found(
    admin: AdminDomain, store: FakeParticipantStore
) -> None:
    with pytest.raises(NotFound):
        admin.update(bank(), expected_version=1)
    assert store.puts == 0


def test_update_may_not_change_the_kind(admin: AdminDomain, store: FakeParticipantStore) -> None:
    admin.register(institution())
    as_bank = bank(participant_id="INST_ALIPAY")
    with pytest.raises(InvalidArgument) as exc:
        admin.update(as_bank, expected_version=1)
    assert violations_of(exc) == {"participant.kind"}
    assert len(store.history("INST_ALIPAY")) == 1


def test_update_checks_every_field_like_register(
    admin: AdminDomain, store: FakeParticipantStore
) -> None:
    admin.register(bank())
    before = store.snapshot()
    with pytest.raises(InvalidArgument) as exc:
        # Dropping USD is fine; dropping CNY leaves its cap without a currency.
        admin.update(bank(name="", currencies=frozenset({"USD"})), expected_version=1)
    assert violations_of(exc) == {"participant.name", "participant.net_debit_caps[CNY]"}
    assert store.snapshot() == before


def test_update_that_changes_nothing_writes_nothing(
    admin: AdminDomain, store: FakeParticipantStore
) -> None:
    stored = admin.register(bank())
    assert admin.update(bank(status=ParticipantStatus.SUSPENDED), expected_version=1) == stored
    assert store.puts == 1


# ---- suspend and resume ----------------------------------------------------------------


def test_suspend_and_resume_each_write_a_new_version(
    admin: AdminDomain, store: FakeParticipantStore
) -> None:
    admin.register(institution())
    suspended = admin.suspend("INST_ALIPAY", "compliance review")
    resumed = admin.resume("INST_ALIPAY", "review passed")
    assert (suspended.status, suspended.version) == (ParticipantStatus.SUSPENDED, 2)
    assert (resumed.status, resumed.version) == (ParticipantStatus.ACTIVE, 3)
    history = store.history("INST_ALIPAY")
    assert [w.reason for w in history] == ["registered", "compliance review", "review passed"]
    assert [w.now_us for w in history] == sorted({w.now_us for w in history})
    # Nothing but the status changed.
    assert dataclasses.replace(resumed, version=1) == history[0].participant


def test_the_status_reason_is_the_operator_s_and_outlives_other_changes(
    admin: AdminDomain,
) -> None:
    admin.register(institution())
    assert admin.get("INST_ALIPAY").status_reason == ""
    admin.suspend("INST_ALIPAY", "compliance review")
    assert admin.get("INST_ALIPAY").status_reason == "compliance review"
    capped = admin.set_cap("INST_ALIPAY", "CNY", 5)
    stored = admin.get("INST_ALIPAY")
    updated = admin.update(dataclasses.replace(stored, name="Alipay (renamed)"), stored.version)

    assert capped.status_reason == updated.status_reason == "compliance review"
    assert admin.suspend("INST_ALIPAY", "another reason").status_reason == "compliance review"
    assert admin.resume("INST_ALIPAY", "review passed").status_reason == "review passed"
    pb = participant_to_pb(admin.get("INST_ALIPAY"))
    assert pb.status_reason == "review passed"


def test_suspend_and_resume_are_idempotent(admin: AdminDomain, store: FakeParticipantStore) -> None:
    admin.register(institution())
    assert admin.resume("INST_ALIPAY", "already active").version == 1
    admin.suspend("INST_ALIPAY", "first")
    again = admin.suspend("INST_ALIPAY", "second")
    assert (again.status, again.version) == (ParticipantStatus.SUSPENDED, 2)
    assert store.puts == 2


@pytest.mark.parametrize("reason", ["", "   ", "r" * (STATUS_REASON_CHARS_MAX + 1)])
def test_suspend_and_resume_need_a_reason(
    admin: AdminDomain, store: FakeParticipantStore, reason: str
) -> None:
    admin.register(institution())
    for change in (admin.suspend, admin.resume):
        with pytest.raises(InvalidArgument) as exc:
            change("INST_ALIPAY", reason)
        assert violations_of(exc) == {"reason"}
    assert store.puts == 1


def test_suspend_of_an_unknown_participant_is_not_found(
    admin: AdminDomain, store: FakeParticipantStore
) -> None:
    with pytest.raises(NotFound):
        admin.suspend("NOBODY", "why not")
    with pytest.raises(NotFound):
        admin.resume("NOBODY", "why not")
    assert store.puts == 0


def test_suspend_after_a_concurrent_change_keeps_that_change(
    admin: AdminDomain, store: FakeParticipantStore
) -> None:
    admin.register(bank())
    rival = AdminDomain(store, FakeClock())
    store.before_put = lambda _: rival.set_cap("BANK_ICBC", "USD", 700)
    got = admin.suspend("BANK_ICBC", "incident 42")
    assert got.version == 3
    assert got.status is ParticipantStatus.SUSPENDED
    assert got.net_debit_cap("USD") == 700  # the rival's change was not overwritten


def test_suspend_gives_up_after_repeated_conflicts(
    admin: AdminDomain, store: FakeParticipantStore
) -> None:
    admin.register(bank())
    rival = AdminDomain(store, FakeClock())

    def rival_always_first(_: Participant) -> None:
        rival.set_cap("BANK_ICBC", "USD", store.puts)  # a new amount every time
        store.before_put = rival_always_first

    store.before_put = rival_always_first
    with pytest.raises(FailedPrecondition) as exc:
        admin.suspend("BANK_ICBC", "incident 43")
    assert exc.value.reason == VERSION_CONFLICT
    # The registration, then per attempt the rival's write and our lost one.
    assert store.puts == 1 + 2 * CHANGE_ATTEMPTS_MAX
    assert admin.get("BANK_ICBC").status is ParticipantStatus.ACTIVE


# ---- net debit caps --------------------------------------------------------------------


def test_set_cap_writes_a_new_version_with_the_cap(
    admin: AdminDomain, store: FakeParticipantStore
) -> None:
    admin.register(bank())
    got = admin.set_cap("BANK_ICBC", "USD", 250_000)
    assert got.version == 2
    assert dict(got.net_debit_caps) == {"CNY": 5_000_000, "USD": 250_000}
    replaced = admin.set_cap("BANK_ICBC", "CNY", 0)
    assert dict(replaced.net_debit_caps) == {"CNY": 0, "USD": 250_000}
    assert [w.participant.version for w in store.history("BANK_ICBC")] == [1, 2, 3]


def test_set_cap_to_the_same_amount_writes_nothing(
    admin: AdminDomain, store: FakeParticipantStore
) -> None:
    admin.register(bank())
    assert admin.set_cap("BANK_ICBC", "CNY", 5_000_000).version == 1
    assert store.puts == 1


@pytest.mark.parametrize(
    ("currency", "cap", "fields"),
    [
        ("CNY", -1, {"cap.amount_minor"}),
        ("XXX", 10, {"cap.currency"}),
        ("cny", -1, {"cap.currency", "cap.amount_minor"}),
    ],
)
def test_set_cap_rejects_a_bad_request(
    admin: AdminDomain, store: FakeParticipantStore, currency: str, cap: int, fields: set[str]
) -> None:
    admin.register(bank())
    with pytest.raises(InvalidArgument) as exc:
        admin.set_cap("BANK_ICBC", currency, cap)
    assert violations_of(exc) == fields
    assert store.puts == 1


def test_set_cap_in_a_currency_the_participant_does_not_hold(
    admin: AdminDomain, store: FakeParticipantStore
) -> None:
    admin.register(bank())
    with pytest.raises(FailedPrecondition) as exc:
        admin.set_cap("BANK_ICBC", "EUR", 10)
    assert exc.value.reason == FailedPrecondition.CURRENCY_NOT_SUPPORTED
    assert store.puts == 1


def test_set_cap_of_an_unknown_participant_is_not_found(
    admin: AdminDomain, store: FakeParticipantStore
) -> None:
    with pytest.raises(NotFound):
        admin.set_cap("NOBODY", "CNY", 10)
    assert store.puts == 0


# ---- get and list ----------------------------------------------------------------------


def test_get_returns_the_newest_version(admin: AdminDomain) -> None:
    admin.register(bank())
    admin.suspend("BANK_ICBC", "incident")
    assert admin.get("BANK_ICBC").version == 2
    with pytest.raises(NotFound):
        admin.get("NOBODY")


def test_list_returns_newest_versions_by_id_and_filters_by_kind(admin: AdminDomain) -> None:
    admin.register(institution(participant_id="INST_Z"))
    admin.register(bank(participant_id="BANK_B"))
    admin.register(bank(participant_id="BANK_A", bank_code="BKA"))
    admin.suspend("BANK_B", "incident")
    everyone = admin.list()
    assert [p.participant_id for p in everyone] == ["BANK_A", "BANK_B", "INST_Z"]
    assert [p.version for p in everyone] == [1, 2, 1]
    banks = admin.list(ParticipantKind.BANK)
    assert [p.participant_id for p in banks] == ["BANK_A", "BANK_B"]
    assert [p.participant_id for p in admin.list(ParticipantKind.INSTITUTION)] == ["INST_Z"]


def test_list_of_an_empty_registry(admin: AdminDomain) -> None:
    assert admin.list() == ()
    assert admin.page(None, 0, "") == ((), "")


def test_pages_cover_every_participant_once_in_id_order(admin: AdminDomain) -> None:
    ids = [f"INST_{c}" for c in "ECADB"] + ["BANK_A"]
    for pid in ids:
        if pid.startswith("BANK"):
            admin.register(bank(participant_id=pid))
        else:
            admin.register(institution(participant_id=pid))
    seen, token, pages = [], "", 0
    while True:
        page, token = admin.page(ParticipantKind.INSTITUTION, 2, token)
        pages += 1
        assert len(page) <= 2
        seen += [p.participant_id for p in page]
        if not token:
            break
        assert token == page[-1].participant_id
    assert seen == sorted(i for i in ids if i.startswith("INST"))
    assert pages == 3
    assert [p.participant_id for p in admin.page(None, 0, "")[0]] == sorted(ids)  # default size
    assert admin.page(None, 6, "")[1] == ""  # exactly one full page: no next
    assert admin.page(None, 0, "INST_E") == ((), "")


@pytest.mark.parametrize(
    ("size", "token", "fields"),
    [(-1, "", {"page_size"}), (1001, "", {"page_size"}), (10, "no spaces", {"page_token"}),
     (-5, "x" * 200, {"page_size", "page_token"})],
)  # fmt: skip
def test_a_bad_page_request_is_invalid_argument(
    admin: AdminDomain, size: int, token: str, fields: set[str]
) -> None:
    with pytest.raises(InvalidArgument) as e:
        admin.page(None, size, token)
    assert {v.field for v in e.value.violations} == fields


# ---- every history is contiguous --------------------------------------------------------

_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("suspend"), st.text(min_size=1, max_size=5).filter(str.strip)),
        st.tuples(st.just("resume"), st.text(min_size=1, max_size=5).filter(str.strip)),
        st.tuples(st.just("cap"), st.integers(min_value=-2, max_value=3)),
        st.tuples(st.just("rename"), st.text(max_size=3)),
    ),
    max_size=25,
)


@settings(max_examples=150, deadline=None)
@given(_OPS)
def test_history_has_one_version_per_accepted_change(ops: list[tuple[str, Any]]) -> None:
    store = FakeParticipantStore()
    admin = AdminDomain(store, FakeClock())
    current = admin.register(bank())
    for op, arg in ops:
        try:
            if op == "suspend":
                current = admin.suspend("BANK_ICBC", arg)
            elif op == "resume":
                current = admin.resume("BANK_ICBC", arg)
            elif op == "cap":
                current = admin.set_cap("BANK_ICBC", "USD", arg)
            else:
                renamed = dataclasses.replace(current, name=arg)
                current = admin.update(renamed, expected_version=current.version)
        except InvalidArgument:
            pass
    history = [w.participant for w in store.history("BANK_ICBC")]
    assert [p.version for p in history] == list(range(1, len(history) + 1))
    assert all(a != dataclasses.replace(b, version=a.version) for a, b in pairwise(history))
    assert history[-1] == current == admin.get("BANK_ICBC")
    assert store.puts == len(history)


# -- signing keys -------------------------------------------------------------------------


def _raw_key(seed: bytes) -> bytes:
    return public_key_bytes(Ed25519PrivateKey.from_private_bytes(hashlib.sha256(seed).digest()))


def test_signing_keys_get_their_computed_id_and_a_rotation_is_an_update(
    admin: AdminDomain,
) -> None:
    old, new = _raw_key(b"old"), _raw_key(b"new")
    got = admin.register(institution(signing_keys=(SigningKey("", old),)))
    assert got.signing_keys == (SigningKey(key_id_of(old), old),)
    both = (SigningKey(key_id_of(new), new), SigningKey("", old))
    rotated = admin.update(institution(signing_keys=both), expected_version=1)
    assert rotated.version == 2
    assert {k.key_id for k in rotated.signing_keys} == {key_id_of(old), key_id_of(new)}
    assert rotated.signing_key_map()[key_id_of(new)] == new
    # The same keys in another order are no change.
    again = admin.update(institution(signing_keys=both[::-1]), expected_version=2)
    assert again.version == 2


@pytest.mark.parametrize(
    ("key_id", "public_key", "field"),
    [
        ("0000000000000000", _raw_key(b"k"), "participant.signing_keys[0].key_id"),
        ("", b"\x01" * 31, "participant.signing_keys[0].public_key"),
        ("", b"\x01" * 33, "participant.signing_keys[0].public_key"),
    ],
)
def test_a_bad_signing_key_is_invalid_argument(
    admin: AdminDomain, store: FakeParticipantStore, key_id: str, public_key: bytes, field: str
) -> None:
    with pytest.raises(InvalidArgument) as ei:
        admin.register(institution(signing_keys=(SigningKey(key_id, public_key),)))
    assert [v.field for v in ei.value.violations] == [field]
    assert store.puts == 0
