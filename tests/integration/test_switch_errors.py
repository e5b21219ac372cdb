"""Error paths through real gRPC: suspended participants, admin conflicts, bank outages."""

from __future__ import annotations

import signal
import time
import uuid
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from clearing.v1 import admin_pb2, common_pb2
from clearinghouse import demo
from clearinghouse.client import error_details
from clearinghouse.domain.signing import public_key_bytes
from clearinghouse.localcluster import procs
from clearinghouse.order_signing import sign_order_pb
from clearinghouse.switch.config import OWED_REVERSAL_RETRY_S, REGISTRY_REFRESH_S
from tests.support import SwitchEnv, eventually

pytestmark = pytest.mark.integration


def _fails(call: Any) -> tuple[grpc.StatusCode, Any]:
    with pytest.raises(grpc.RpcError) as ei:
        call()
    e: Any = ei.value
    return e.code(), error_details(e)


def _institution(
    pid: str, version: int = 1, key: Ed25519PrivateKey | None = None
) -> admin_pb2.Participant:
    keys = [admin_pb2.SigningKey(public_key=public_key_bytes(key))] if key else []
    return admin_pb2.Participant(
        participant_id=pid, kind=common_pb2.PARTICIPANT_KIND_INSTITUTION,
        name="A test institution", status=common_pb2.PARTICIPANT_STATUS_ACTIVE,
        currencies=["CNY"], net_debit_caps=[common_pb2.Money(amount_minor=10**9, currency="CNY")],
        version=version, signing_keys=keys,
    )  # fmt: skip


def test_a_suspended_institution_is_refused_and_nothing_is_written(switch_env: SwitchEnv) -> None:
    env = switch_env
    admin = env.clients["shanghai-a"].admin
    pid = f"INST_T{uuid.uuid4().hex[:8].upper()}"
    key = Ed25519PrivateKey.generate()  # its orders are signed, so the owner judges them
    admin.RegisterParticipant(
        admin_pb2.RegisterParticipantRequest(participant=_institution(pid, key=key)), timeout=10
    )
    admin.SuspendParticipant(
        admin_pb2.SuspendParticipantRequest(participant_id=pid, reason="test: compliance hold"),
        timeout=10,
    )
    time.sleep(REGISTRY_REFRESH_S * 1.5)  # every node has seen the suspension by now
    order = env.order(institution_id=pid, payee_id=pid)
    sign_order_pb(order, key)
    for zone in ("shanghai-a", "shenzhen-b"):
        code, err = _fails(lambda zone=zone: env.submit(zone, order))
        assert code is grpc.StatusCode.FAILED_PRECONDITION
        assert err is not None and err.reason == "PARTICIPANT_SUSPENDED"
    code, _ = _fails(lambda: env.get("beijing-a", order))
    assert code is grpc.StatusCode.NOT_FOUND


def test_admin_conflicts_and_invalid_participants(switch_env: SwitchEnv) -> None:
    admin = switch_env.clients["beijing-b"].admin
    pid = f"INST_T{uuid.uuid4().hex[:8].upper()}"
    first = admin.RegisterParticipant(
        admin_pb2.RegisterParticipantRequest(participant=_institution(pid)), timeout=10
    ).participant
    assert first.version == 1
    code, _ = _fails(
        lambda: admin.RegisterParticipant(
            admin_pb2.RegisterParticipantRequest(participant=_institution(pid)), timeout=10
        )
    )
    assert code is grpc.StatusCode.ALREADY_EXISTS
    renamed = _institution(pid, version=1)
    renamed.name = "Renamed"
    updated = admin.UpdateParticipant(
        admin_pb2.UpdateParticipantRequest(participant=renamed), timeout=10
    ).participant
    assert (updated.version, updated.name) == (2, "Renamed")
    # The same update again carries a stale version: refused, nothing written.
    code, err = _fails(
        lambda: admin.UpdateParticipant(
            admin_pb2.UpdateParticipantRequest(participant=renamed), timeout=10
        )
    )
    assert code is grpc.StatusCode.FAILED_PRECONDITION and err.reason == "VERSION_CONFLICT"
    got = admin.GetParticipant(admin_pb2.GetParticipantRequest(participant_id=pid), timeout=10)
    assert got.participant.version == 2
    bank = admin_pb2.Participant(
        participant_id=f"BANK_T{uuid.uuid4().hex[:6].upper()}",
        kind=common_pb2.PARTICIPANT_KIND_BANK,
        name="A bank without an endpoint", currencies=["CNY", "XXX"], version=1,
    )  # fmt: skip
    code, err = _fails(
        lambda: admin.RegisterParticipant(
            admin_pb2.RegisterParticipantRequest(participant=bank), timeout=10
        )
    )
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    fields = {v.field for v in err.field_violations}
    assert any("endpoint" in f for f in fields) and any("currenc" in f for f in fields), fields


def test_a_bank_outage_fails_the_payment_and_the_reversal_is_settled_later(
    switch_env: SwitchEnv,
) -> None:
    env = switch_env
    bank = demo.bank_managed(env.lc, "BANK_FLAKY")
    assert procs.signal_proc(bank, signal.SIGUSR1)  # outage on
    try:
        r = env.submit("shenzhen-a", env.order(payer_id="BANK_FLAKY"))
    finally:
        assert procs.signal_proc(bank, signal.SIGUSR1)  # outage off
    assert r.payment.state == common_pb2.PAYMENT_STATE_FAILED
    assert "reversal not confirmed" in r.payment.events[-1].detail
    ref = r.payment.switch_ref
    # The bank never applied the transfer; the owed reversal reaches it once it is back,
    # and leaves a tombstone so that a late copy of the transfer would be refused.
    assert eventually(
        lambda: any(e.get("op") == "tombstone" and e.get("ref") == ref
                    for e in env.bank_journal("BANK_FLAKY")),
        timeout_s=OWED_REVERSAL_RETRY_S * 4,
    )  # fmt: skip
    assert env.transfers_at_bank("BANK_FLAKY", ref) == 0
