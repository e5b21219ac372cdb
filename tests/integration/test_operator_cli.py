"""``clearingctl participant`` and ``clearingctl payment`` against the real cluster, as an
operator and an institution would run them (in process, through ``cli.main``)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest

from clearinghouse import cli
from clearinghouse.security import pki
from clearinghouse.storage.participants import CassandraParticipantStore
from clearinghouse.switch.config import REGISTRY_REFRESH_S
from tests.support import SwitchEnv, session_preferring

pytestmark = pytest.mark.integration

FINAL = {"APPROVED", "DECLINED", "FAILED"}


def ctl(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any, str]:
    """Exit status, the JSON printed (None if none) and what went to stderr."""
    capsys.readouterr()
    status = cli.main([*argv, "--format", "json"])
    out, err = capsys.readouterr()
    return status, json.loads(out) if out.strip() else None, err


def test_an_operator_registers_caps_suspends_and_the_institution_pays(
    switch_env: SwitchEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    inst = f"INST_CLI{uuid.uuid4().hex[:6].upper()}"
    status, (made,), err = ctl(
        capsys, "participant", "register", inst, "--kind", "institution", "--name", "CLI Pay",
        "--currency", "CNY", "--cap", "CNY=5000",
    )  # fmt: skip
    assert status == 0, err
    assert (made["status"], made["version"], made["net_debit_caps"]) == ("ACTIVE", 1, "CNY=5000")
    assert len(made["signing_keys"]) == 16  # the local key store's, so it can sign below
    status, _, err = ctl(capsys, "participant", "register", inst, "--kind", "institution",
                         "--name", "again", "--currency", "CNY")  # fmt: skip
    assert status == 1 and "ALREADY_EXISTS" in err

    # At once, through another node: a node whose registry lacks a participant an order
    # names reads the registry again (the periodic refresh is every 2 s).
    pay = ("payment", "submit", inst, f"p-{uuid.uuid4().hex[:12]}", "--type", "credit",
           "--payer", inst, "--payee", "BANK_ICBC", "--account", "6222020000000001",
           "--amount", "1200", "--currency", "CNY", "--zone", "shenzhen-b")  # fmt: skip
    status, (first,), err = ctl(capsys, *pay)
    assert status == 0, err
    assert first["state"] in FINAL and first["replayed"] is False
    assert first["received_zone"] == "shenzhen-b"
    # A retry of the same order (its requested_at too), to another zone.
    retry = (*pay[:-1], "beijing-a", "--requested-at", first["requested_at"])
    status, (again,), _ = ctl(capsys, *retry)
    assert again["replayed"] is True
    assert (again["state"], again["switch_ref"]) == (first["state"], first["switch_ref"])
    status, (got,), _ = ctl(capsys, "payment", "get", inst, pay[3], "--zone", "shanghai-a")
    assert (status, got["state"], got["amount_minor"]) == (0, first["state"], 1200)
    status, out, err = ctl(capsys, *pay[:-2], "--amount", "1300")  # same id, other order
    assert (status, out) == (1, None)
    assert "ALREADY_EXISTS" in err and "pass --requested-at" in err  # how to resend

    status, (capped,), err = ctl(capsys, "participant", "set-cap", inst, "CNY", "100")
    assert status == 0, err
    assert (capped["net_debit_caps"], capped["version"]) == ("CNY=100", 2)
    # Its 1,200 of exposure is above the new cap, within the old one: what a drill's
    # within_caps check judges it by.
    with session_preferring(switch_env.lc, "beijing") as session:
        ceilings = CassandraParticipantStore(session).cap_ceilings()
    assert ceilings[(inst, "CNY")] == 5000 and ceilings[("INST_ALIPAY", "CNY")] > 0
    status, (stopped,), _ = ctl(capsys, "participant", "suspend", inst, "--reason", "audit")
    assert (stopped["status"], stopped["status_reason"]) == ("SUSPENDED", "audit")
    time.sleep(REGISTRY_REFRESH_S * 1.5)
    refused = list(pay)
    refused[3] = f"p-{uuid.uuid4().hex[:12]}"
    status, out, err = ctl(capsys, *refused)
    assert (status, out) == (1, None)
    assert "FAILED_PRECONDITION PARTICIPANT_SUSPENDED" in err
    status, (resumed,), _ = ctl(capsys, "participant", "resume", inst, "--reason", "cleared")
    assert resumed["status"] == "ACTIVE"
    status, listed, _ = ctl(capsys, "participant", "list", "--kind", "institution")
    assert status == 0 and inst in {p["participant_id"] for p in listed}
    assert all(p["kind"] == "INSTITUTION" for p in listed)


def test_mistakes_are_named_and_write_nothing(
    switch_env: SwitchEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = ctl(capsys, "participant", "get", "INST_NOBODY_AT_ALL")
    assert (status, out) == (1, None)
    assert "NOT_FOUND" in err and "switch node" in err
    inst = f"INST_CLI{uuid.uuid4().hex[:6].upper()}"
    status, _, err = ctl(capsys, "participant", "register", inst, "--kind", "institution",
                         "--name", "x", "--currency", "CNY", "--signing-key", "{}")  # fmt: skip
    assert status == 2 and "--signing-key" in err
    status, _, err = ctl(capsys, "participant", "register", inst.lower(), "--kind", "bank",
                         "--name", "x", "--currency", "CNY")  # fmt: skip
    assert status == 1 and "INVALID_ARGUMENT" in err
    status, out, err = ctl(capsys, "participant", "get", inst)
    assert status == 1 and "NOT_FOUND" in err  # neither attempt registered anything
    # Paying, or reading a payment, as a name the registry lacks or as a bank: refused
    # before any certificate is made for it.
    ghost = f"INST_GHOST{uuid.uuid4().hex[:6].upper()}"
    for argv in (("payment", "get", ghost, "p-1"),
                 ("payment", "submit", ghost, "p-1", "--type", "credit", "--payer", ghost,
                  "--payee", "BANK_ICBC", "--account", "6222020000000001", "--amount", "5",
                  "--currency", "CNY")):  # fmt: skip
        status, out, err = ctl(capsys, *argv)
        assert (status, out) == (1, None)
        assert f"PARTICIPANT_NOT_FOUND: no participant '{ghost}' is registered" in err
    made = [p for p in pki.default_directory().rglob("*") if ghost in str(p)]
    assert made == [], "a certificate was made"
    status, out, err = ctl(capsys, "payment", "get", "BANK_ICBC", "p-1")
    assert status == 1 and "BANK_ICBC is a bank" in err
