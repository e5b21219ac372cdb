"""Security against the live cluster: who gets in (mTLS), who may do what (the policy),
and a participant flooding at ten times its quota (isolation).

The isolation bound this file states and checks: while one participant floods a node
at 10x its quota, the other participants on that node lose no payment to the flood
(every one is decided by its bank, none refused) and their p99 latency stays within
``ISOLATION_P99_FACTOR`` x their p99 while the same participant sends at exactly its
quota (floored at ``ISOLATION_P99_FLOOR_MS``: a p99 of 200 samples on a shared 2-core
machine moves by hundreds of milliseconds from run to run) + ``ISOLATION_P99_SLACK_MS``.
That p99 at quota is measured twice, before and after the flood, and the higher one
taken: in CI one 12 s run's p99 at quota came out at 379 ms, where five others gave
997-2,026 ms, and a bound made from it alone failed on noise.
The payments within its quota are real load the flooder is entitled to; what the bound
is about is the excess. The test also checks that the flood was one: it offered at least
``FLOOD_OFFERED_MIN_FACTOR`` x its quota over its run, and at least
``FLOOD_EXCESS_REFUSED_MIN`` of what it sent beyond its quota was refused RATE_LIMITED.

The latency bound is not tighter on purpose: on the shared 2-core machine the tests run
on, the p99 of 200 payments moves by hundreds of milliseconds between two runs without
any flood, so a tighter bound would fail on noise rather than on a flood getting
through; the counts above are what pins the rate limiter down.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
import uuid
from collections import Counter
from typing import Any

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clearing.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    audit_pb2,
    audit_pb2_grpc,
    common_pb2,
    payment_pb2,
    payment_pb2_grpc,
    settlement_pb2,
    settlement_pb2_grpc,
    shard_pb2,
    shard_pb2_grpc,
)
from clearinghouse.client import error_details, local_credentials
from clearinghouse.domain.signing import public_key_bytes
from clearinghouse.security import pki
from clearinghouse.security.identity import Identity, Role
from clearinghouse.signing_keys import default_store
from clearinghouse.switch.config import REGISTRY_REFRESH_S
from tests.support import SwitchEnv, listed

pytestmark = pytest.mark.integration

ZONE = "shanghai-a"
FLOOD_QUOTA_PER_S = 10
FLOOD_FACTOR = 10
PHASE_S = 12.0
VICTIM_RATE_PER_S = 8  # per victim institution
VICTIMS = ("INST_ALIPAY", "INST_WECHAT")
ISOLATION_P99_FACTOR = 2.0
ISOLATION_P99_FLOOR_MS = 300.0
ISOLATION_P99_SLACK_MS = 250.0
# The flood must really be one: at least this many times its quota offered over the run
# (10x is asked for; threads and the machine may fall a little behind) ...
FLOOD_OFFERED_MIN_FACTOR = 8.0
# ... and at least this share of what it sent beyond its quota refused as RATE_LIMITED.
FLOOD_EXCESS_REFUSED_MIN = 0.9


def _target(env: SwitchEnv, zone: str = ZONE) -> str:
    z = env.lc.topo.zone(zone)
    return f"{z.address}:{z.ports.switch}"


def _channel_as(env: SwitchEnv, who: Identity) -> grpc.Channel:
    return local_credentials().channel(_target(env), who, server=pki.node(ZONE))


def _refused(call: Any) -> tuple[grpc.StatusCode, Any]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    e: Any = info.value
    return e.code(), error_details(e)


def test_a_live_node_refuses_plaintext_no_certificate_and_a_foreign_ca(
    switch_env: SwitchEnv, tmp_path: Any
) -> None:
    env = switch_env
    ca_pem = local_credentials().ca.ca_cert_path.read_bytes()
    foreign = pki.LocalCA(tmp_path / "foreign")
    foreign.init()
    alipay = Identity(Role.INSTITUTION, "INST_ALIPAY")
    foreign.issue(alipay)  # the right name, signed by the wrong authority
    forged = foreign.load(alipay)
    channels = {
        "plaintext": grpc.insecure_channel(_target(env)),
        "no client certificate": grpc.secure_channel(
            _target(env), grpc.ssl_channel_credentials(root_certificates=ca_pem)
        ),
        "foreign CA": grpc.secure_channel(
            _target(env),
            grpc.ssl_channel_credentials(
                root_certificates=ca_pem, private_key=forged.key_pem,
                certificate_chain=forged.cert_pem,
            ),
        ),
    }  # fmt: skip
    order = env.order()
    for name, ch in channels.items():
        stub = payment_pb2_grpc.PaymentServiceStub(ch)
        code, _ = _refused(
            lambda s=stub: s.SubmitPayment(payment_pb2.SubmitPaymentRequest(order=order), timeout=3)
        )
        assert code is grpc.StatusCode.UNAVAILABLE, (name, code)
        ch.close()
    # Nothing was written, and the node serves a proper client.
    code, _ = _refused(lambda: env.get(ZONE, order))
    assert code is grpc.StatusCode.NOT_FOUND
    health = health_pb2_grpc.HealthStub(_channel_as(env, pki.auditor()))
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == 1


def test_each_identity_may_do_only_its_own_part(switch_env: SwitchEnv) -> None:
    env = switch_env
    alipay_channel = _channel_as(env, Identity(Role.INSTITUTION, "INST_ALIPAY"))
    alipay = env.clients[ZONE].payments_as("INST_ALIPAY")  # signs INST_ALIPAY's orders
    bank_channel = _channel_as(env, Identity(Role.BANK, "BANK_ICBC"))
    auditor_channel = _channel_as(env, pki.auditor())
    victim = env.order(institution_id="INST_WECHAT", payee_id="INST_WECHAT")
    denied = {
        "an institution submits for another": lambda: alipay.SubmitPayment(
            payment_pb2.SubmitPaymentRequest(order=victim), timeout=10
        ),
        "an institution reads another's payment": lambda: alipay.GetPayment(
            payment_pb2.GetPaymentRequest(institution_id="INST_WECHAT", payment_id="x"),
            timeout=10,
        ),
        "a bank submits a payment": lambda: payment_pb2_grpc.PaymentServiceStub(
            bank_channel
        ).SubmitPayment(payment_pb2.SubmitPaymentRequest(order=env.order()), timeout=10),
        "a bank lists another participant's payments": lambda: audit_pb2_grpc.AuditServiceStub(
            bank_channel
        ).ListParticipantPayments(
            audit_pb2.ListParticipantPaymentsRequest(participant_id="BANK_CCB"), timeout=10
        ),
        "an auditor registers a participant": lambda: admin_pb2_grpc.AdminServiceStub(
            auditor_channel
        ).RegisterParticipant(
            admin_pb2.RegisterParticipantRequest(
                participant=admin_pb2.Participant(participant_id="INST_EVIL")
            ),
            timeout=10,
        ),
        "an auditor closes a window": lambda: settlement_pb2_grpc.SettlementServiceStub(
            auditor_channel
        ).CloseWindow(settlement_pb2.CloseWindowRequest(), timeout=10),
        "an institution calls the node-to-node API": lambda: shard_pb2_grpc.ShardServiceStub(
            alipay_channel
        ).SubmitOwned(shard_pb2.SubmitOwnedRequest(), timeout=10),
    }
    for what, call in denied.items():
        code, err = _refused(call)
        assert code is grpc.StatusCode.PERMISSION_DENIED, (what, code)
        assert err is not None and err.reason == "NOT_AUTHORIZED", (what, err)
    # Nothing was written for the refused order, as its owner can see, and the refused
    # registration created no participant.
    code, _ = _refused(lambda: env.get(ZONE, victim))
    assert code is grpc.StatusCode.NOT_FOUND
    code, _ = _refused(
        lambda: env.clients[ZONE].admin.GetParticipant(
            admin_pb2.GetParticipantRequest(participant_id="INST_EVIL"), timeout=10
        )
    )
    assert code is grpc.StatusCode.NOT_FOUND
    # What each may do, it can.
    mine = env.order()  # INST_ALIPAY's, paid by BANK_ICBC
    r = alipay.SubmitPayment(payment_pb2.SubmitPaymentRequest(order=mine), timeout=30)
    assert r.payment.order.payment_id == mine.payment_id
    listing = audit_pb2.ListParticipantPaymentsRequest(
        participant_id="BANK_ICBC", start_time=r.payment.received_at, page_size=10
    )
    found = listed(
        lambda: audit_pb2_grpc.AuditServiceStub(bank_channel).ListParticipantPayments(
            listing, timeout=10
        ),
        lambda r: mine.payment_id in {p.order.payment_id for p in r.payments},
    )
    # From the moment the payment was received on: it is there, and only the bank's.
    assert mine.payment_id in {p.order.payment_id for p in found.payments}, found
    assert all("BANK_ICBC" in (p.order.payer_id, p.order.payee_id) for p in found.payments)
    windows = audit_pb2_grpc.AuditServiceStub(auditor_channel).ListWindows(
        audit_pb2.ListWindowsRequest(), timeout=10
    )
    # The window payments go into now comes first; older ones follow, newest first.
    ids = [w.window_id for w in windows.windows]
    assert ids and ids[0] >= 1 and ids == sorted(ids, reverse=True), windows
    assert windows.windows[0].state in ("OPEN", "CLOSING"), windows.windows[0]


# -- quotas and isolation ------------------------------------------------------------------


class Paced:
    """Calls ``send(i)`` at ``rate_per_s`` for ``seconds`` from a few threads; records
    (status, latency_s) of each."""

    def __init__(self, send: Any, rate_per_s: float, seconds: float, threads: int = 8) -> None:
        self.send, self.rate, self.seconds, self.threads = send, rate_per_s, seconds, threads
        self.results: list[tuple[str, float]] = []
        self.started_at: list[float] = []  # when each call was sent (monotonic s)
        self._lock = threading.Lock()

    def offered_per_s(self) -> float:
        """Calls sent per second over the run: from the first send to the last."""
        if len(self.started_at) < 2:
            return 0.0
        span = max(self.started_at) - min(self.started_at)
        return (len(self.started_at) - 1) / span if span > 0 else float("inf")

    def run(self) -> list[tuple[str, float]]:
        start = time.monotonic()
        n_total = int(self.rate * self.seconds)
        counter = iter(range(n_total))
        counter_lock = threading.Lock()

        def worker() -> None:
            while True:
                with counter_lock:
                    i = next(counter, None)
                if i is None:
                    return
                due = start + i / self.rate
                pause = due - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
                t = time.monotonic()
                with self._lock:
                    self.started_at.append(t)
                try:
                    state = self.send(i)
                except grpc.RpcError as e:
                    err = error_details(e)
                    state = f"{e.code().name}:{err.reason if err else ''}"  # type: ignore[attr-defined]
                with self._lock:
                    self.results.append((state, time.monotonic() - t))

        ts = [threading.Thread(target=worker, daemon=True) for _ in range(self.threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(self.seconds + 60)
        return self.results


def _p99_ms(results: list[tuple[str, float]]) -> float:
    lat = sorted(x for _, x in results)
    return statistics.quantiles(lat, n=100)[98] * 1000 if len(lat) >= 2 else lat[0] * 1000


def _victims(env: SwitchEnv, tag: str) -> Paced:
    stubs = {v: env.clients[ZONE].payments_as(v) for v in VICTIMS}

    def send(i: int) -> str:
        inst = VICTIMS[i % len(VICTIMS)]
        o = env.order(
            institution_id=inst, payee_id=inst, payment_id=f"iso-{tag}-{uuid.uuid4().hex[:16]}"
        )
        r = stubs[inst].SubmitPayment(payment_pb2.SubmitPaymentRequest(order=o), timeout=30)
        return common_pb2.PaymentState.Name(r.payment.state)

    return Paced(send, VICTIM_RATE_PER_S * len(VICTIMS), PHASE_S)


def test_a_participant_flooding_at_ten_times_its_quota_does_not_hurt_the_others(
    switch_env: SwitchEnv,
) -> None:
    env = switch_env
    flooder = f"INST_FLOOD{uuid.uuid4().hex[:6].upper()}"
    public_key = public_key_bytes(default_store().get_or_create(flooder))
    env.clients[ZONE].admin.RegisterParticipant(
        admin_pb2.RegisterParticipantRequest(
            participant=admin_pb2.Participant(
                participant_id=flooder, kind=common_pb2.PARTICIPANT_KIND_INSTITUTION,
                name="floods the switch", status=common_pb2.PARTICIPANT_STATUS_ACTIVE,
                currencies=["CNY"],
                net_debit_caps=[common_pb2.Money(amount_minor=10**12, currency="CNY")],
                version=1, payments_per_s_quota=FLOOD_QUOTA_PER_S,
                signing_keys=[admin_pb2.SigningKey(public_key=public_key)],
            )
        ),
        timeout=10,
    )  # fmt: skip
    time.sleep(REGISTRY_REFRESH_S * 1.5)
    flood_stub = env.clients[ZONE].payments_as(flooder)

    def flood(i: int) -> str:
        o = env.order(institution_id=flooder, payee_id=flooder,
                      payment_id=f"flood-{uuid.uuid4().hex[:16]}")  # fmt: skip
        r = flood_stub.SubmitPayment(payment_pb2.SubmitPaymentRequest(order=o), timeout=30)
        return common_pb2.PaymentState.Name(r.payment.state)

    def phase(factor: int, tag: str) -> tuple[Paced, list[tuple[str, float]]]:
        flood_run = Paced(flood, FLOOD_QUOTA_PER_S * factor, PHASE_S, threads=4 * factor)
        flooding = threading.Thread(target=flood_run.run, daemon=True)
        flooding.start()
        victims = _victims(env, tag).run()
        flooding.join(PHASE_S + 60)
        return flood_run, victims

    # Warm up (connections, the new participant's shards and cap loans), then measure.
    for i in range(3):
        flood(i)
        _victims(env, "warm").send(i)
    at_quota, baseline = phase(1, "base")
    time.sleep(2.0)  # the flooder's bucket refills
    flood_run, during = phase(FLOOD_FACTOR, "flood")
    time.sleep(2.0)
    at_quota_after, baseline_after = phase(1, "after")

    flood_states = Counter(s for s, _ in flood_run.results)
    accepted = sum(n for s, n in flood_states.items() if not s.startswith("RESOURCE_EXHAUSTED"))
    limited = flood_states.get("RESOURCE_EXHAUSTED:RATE_LIMITED", 0)
    before_p99, after_p99 = _p99_ms(baseline), _p99_ms(baseline_after)
    base_p99, flood_p99 = max(before_p99, after_p99), _p99_ms(during)
    print(
        f"\nflooder at its quota: {Counter(s for s, _ in at_quota.results).most_common()}\n"
        f"flooder at {FLOOD_FACTOR}x: {flood_states.most_common()}\n"
        f"victims beside it at quota: {Counter(s for s, _ in baseline)} p99 "
        f"{before_p99:.0f} ms before the flood, {after_p99:.0f} ms after; "
        f"with flood: {Counter(s for s, _ in during)} p99 {flood_p99:.0f} ms"
    )
    # At its quota the participant's payments are real ones, (almost) never refused.
    decided = {"PAYMENT_STATE_APPROVED", "PAYMENT_STATE_DECLINED"}
    for quota_run in (at_quota, at_quota_after):
        quota_decided = sum(1 for st, _ in quota_run.results if st in decided)
        assert quota_decided >= len(quota_run.results) * 0.9, quota_run.results[:5]
        quota_limited = sum(1 for st, _ in quota_run.results if st.startswith("RESOURCE_EXH"))
        assert quota_limited <= len(quota_run.results) * 0.1, quota_limited
    # The flood was one: it offered at least FLOOD_OFFERED_MIN_FACTOR x its quota over
    # the whole run (not a burst that the pacing then throttled).
    offered = flood_run.offered_per_s()
    assert offered >= FLOOD_OFFERED_MIN_FACTOR * FLOOD_QUOTA_PER_S, offered
    # The flooder: at most its quota (plus the one-second burst), the rest refused.
    allowance = FLOOD_QUOTA_PER_S * (PHASE_S + 1) + FLOOD_QUOTA_PER_S
    assert accepted <= allowance
    excess = len(flood_run.results) - allowance
    assert excess > 0, (len(flood_run.results), allowance)
    assert limited >= FLOOD_EXCESS_REFUSED_MIN * excess, (limited, excess)
    assert limited >= len(flood_run.results) * 0.8
    # The others: every payment decided, none refused, latency within the stated bound.
    for victims in (baseline, during, baseline_after):
        assert all(s in decided for s, _ in victims), Counter(s for s, _ in victims)
        assert len(victims) == int(VICTIM_RATE_PER_S * len(VICTIMS) * PHASE_S)
    bound_ms = ISOLATION_P99_FACTOR * max(base_p99, ISOLATION_P99_FLOOR_MS) + ISOLATION_P99_SLACK_MS
    assert flood_p99 <= bound_ms, (before_p99, after_p99, flood_p99, bound_ms)


# How long a revocation may take to reach the nodes that did not take it: their next
# registry refresh, plus a call's time on a busy machine.
REVOCATION_SPREAD_BOUND_S = REGISTRY_REFRESH_S + 8.0


def _list_windows(channel: grpc.Channel) -> tuple[grpc.StatusCode, str]:
    stub = audit_pb2_grpc.AuditServiceStub(channel)
    try:
        stub.ListWindows(audit_pb2.ListWindowsRequest(page_size=1), timeout=10)
    except grpc.RpcError as e:
        err = error_details(e)
        return e.code(), err.reason if err is not None else ""  # type: ignore[attr-defined]
    return grpc.StatusCode.OK, ""


def test_a_revoked_certificate_is_refused_by_every_node(
    switch_env: SwitchEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    """An auditor's certificate, revoked through one node with ``clearingctl pki revoke``:
    that node refuses it at once (connection already open), every other node within
    its next registry refresh; the revocation is kept, listed, idempotent; the other
    certificates still get in, and no operator revokes the certificate it calls with."""
    from clearinghouse import cli  # noqa: PLC0415

    env = switch_env
    creds = local_credentials()
    who = Identity(Role.AUDITOR, f"revoked-{uuid.uuid4().hex[:8]}")
    creds.ca.issue(who)
    zones = [z.name for z in env.lc.topo.zones]
    channels = {
        z: creds.channel(_target(env, z), who, server=pki.node(z)) for z in zones
    }  # fmt: skip
    for z, ch in channels.items():
        assert _list_windows(ch) == (grpc.StatusCode.OK, ""), z

    reason = "test: key on a lost laptop"
    argv = ["pki", "revoke", "auditor", who.name, "--reason", reason, "--zone", ZONE]
    assert cli.main(argv) == 0
    revoked_at = time.monotonic()
    out = capsys.readouterr().out
    assert f"revoked {who.common_name}'s certificate" in out, out
    assert _list_windows(channels[ZONE]) == (grpc.StatusCode.UNAUTHENTICATED, "CERTIFICATE_REVOKED")
    spread = {}
    for z, ch in channels.items():
        while _list_windows(ch)[0] is grpc.StatusCode.OK:
            assert time.monotonic() - revoked_at < REVOCATION_SPREAD_BOUND_S, f"{z} still admits"
            time.sleep(0.2)
        spread[z] = time.monotonic() - revoked_at
        assert _list_windows(ch) == (grpc.StatusCode.UNAUTHENTICATED, "CERTIFICATE_REVOKED"), z
    print(f"revocation refused by every node after (s): {spread}")

    # Kept, listed (to auditors too), and the same again is the first revocation.
    admin = admin_pb2_grpc.AdminServiceStub(_channel_as(env, pki.operator()))
    listed_now = admin_pb2_grpc.AdminServiceStub(_channel_as(env, pki.auditor()))
    mine = [r for r in listed_now.ListRevokedCertificates(
        admin_pb2.ListRevokedCertificatesRequest(page_size=1000), timeout=10).revoked
        if r.identity == who.common_name]  # fmt: skip
    capsys.readouterr()  # what the test printed so far
    assert cli.main(["pki", "revoked", "--format", "json"]) == 0
    rows = [r for r in json.loads(capsys.readouterr().out) if r["identity"] == who.common_name]
    assert [(r["serial"], r["reason"]) for r in rows] == [(mine[0].serial, reason)]
    assert len(mine) == 1 and mine[0].reason == reason and mine[0].revoked_by == "operator:operator"
    again = admin.RevokeCertificate(
        admin_pb2.RevokeCertificateRequest(serial=mine[0].serial, identity=who.common_name,
                                           reason=reason), timeout=10,
    ).revoked  # fmt: skip
    assert again == mine[0]
    code, err = _refused(lambda: admin.RevokeCertificate(
        admin_pb2.RevokeCertificateRequest(serial=mine[0].serial, identity=who.common_name,
                                           reason="another reason"), timeout=10))  # fmt: skip
    assert code is grpc.StatusCode.ALREADY_EXISTS, code

    # Every other certificate still gets in; an operator cannot lock itself out.
    assert _list_windows(_channel_as(env, pki.auditor())) == (grpc.StatusCode.OK, "")
    own = (
        f"{x509.load_pem_x509_certificate(creds.ca.load(pki.operator()).cert_pem).serial_number:x}"
    )
    code, err = _refused(lambda: admin.RevokeCertificate(
        admin_pb2.RevokeCertificateRequest(serial=own, identity="operator:operator",
                                           reason="test"), timeout=10))  # fmt: skip
    assert code is grpc.StatusCode.FAILED_PRECONDITION and err.reason == "REVOKES_CALLER"
    for ch in channels.values():
        ch.close()
