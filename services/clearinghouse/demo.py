"""``clearingctl demo``: the switch working end to end on the local cluster.

Starts what is not running (cluster, six switch nodes, the bank simulators), registers
the participants of ``cluster/participants.json``, sends a burst of payments through
every zone (single and batched), then prints counts by state, throughput per zone, and
each participant's ledger totals read back from Cassandra at QUORUM.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from clearing.v1 import admin_pb2, common_pb2, payment_pb2
from clearinghouse._invariant import invariant
from clearinghouse.client import CALL_DEADLINE_S, SwitchClient, error_details
from clearinghouse.domain.signing import key_id_of
from clearinghouse.ledger_view import LedgerSummary, read_ledger
from clearinghouse.localcluster import procs
from clearinghouse.localcluster.cluster import LocalCluster
from clearinghouse.localcluster.paths import repo_root
from clearinghouse.security import pki
from clearinghouse.security.identity import Identity, Role
from clearinghouse.signing_keys import SigningKeyStore, default_store
from clearinghouse.storage.ledger import CassandraLedger
from clearinghouse.storage.session import CassandraConfig, connect, consistency_level
from clearinghouse.switch.config import REGISTRY_REFRESH_S
from clearinghouse.switch.convert import us_to_ts
from clearinghouse.switch.records import SHARD_COUNT

BANK_READY_TIMEOUT_S = 30.0
DEMO_PAYMENTS = 600
DEMO_BATCH_SIZE = 20
DEMO_CLIENT_THREADS = 12
# Payment states as people read them (APPROVED, not PAYMENT_STATE_APPROVED).
STATE_ = "PAYMENT_STATE_"

Progress = Callable[[str], None]


def participants_file() -> Path:
    return repo_root() / "cluster" / "participants.json"


def load_participants(path: Path | None = None) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((path or participants_file()).read_text())
    return data


def bank_managed(lc: LocalCluster, bank_id: str) -> procs.Managed:
    d = lc.paths.component_dir("bank", bank_id)
    return procs.Managed("bank", bank_id, d, d / "bank.log")


def start_banks(lc: LocalCluster, parts: dict[str, Any], progress: Progress) -> None:
    started = []
    lc.ensure_pki()
    ca = pki.LocalCA(lc.pki_dir)
    for b in parts["banks"]:
        m = bank_managed(lc, b["participant_id"])
        # The bank's server certificate, for the address the switch will call, naming
        # the bank (the switch accepts nothing else there).
        ident = Identity(Role.BANK, b["participant_id"])
        before = _cert_bytes(ca, ident)
        ca.ensure(ident, ips=[b["listen"].rpartition(":")[0]], dns=pki.LOOPBACK_DNS)
        if procs.state(m).alive:
            if before == _cert_bytes(ca, ident):
                continue
            # Re-issued (e.g. a certificate from before identity names): the running
            # simulator still presents the old one, which the switch refuses.
            progress(f"restarting bank {b['participant_id']}: its certificate was re-issued")
            procs.stop(m)
        procs.spawn(m, [
            sys.executable, "-m", "clearinghouse.bank", "--bank-id", b["participant_id"],
            "--pki-dir", str(lc.pki_dir),
            "--listen", b["listen"], "--journal", str(m.directory / "journal.jsonl"),
            "--approve-ratio", str(b["approve_ratio"]), "--latency-ms", b["latency_ms"],
            "--timeout-ratio", str(b.get("timeout_ratio", 0.0)),
            "--hang-ms", str(b.get("hang_ms", 20000)),
        ], env=procs.python_env(lc.paths.root))  # fmt: skip
        started.append((b, m))
    if not started:
        return
    progress(f"starting bank simulators: {', '.join(b['participant_id'] for b, _ in started)}")
    for b, m in started:
        host, _, port = b["listen"].rpartition(":")
        procs.wait_until(
            f"bank {b['participant_id']} on {b['listen']}",
            lambda host=host, port=port: procs.port_open(host, int(port)),  # type: ignore[misc]
            timeout_s=BANK_READY_TIMEOUT_S,
            procs=[m],
            progress=progress,
        )


def _cert_bytes(ca: pki.LocalCA, ident: Identity) -> bytes | None:
    path = ca.folder(ident) / "cert.pem"
    return path.read_bytes() if path.is_file() else None


def register_participants(
    client: SwitchClient,
    parts: dict[str, Any],
    progress: Progress,
    keys: SigningKeyStore | None = None,
) -> None:
    """Register the participants; each institution with the public half of its
    order-signing key from ``keys`` (``.state/pki``, created there if missing). An
    institution registered before without that key gets it added (a key rotation)."""
    keys = keys or default_store()
    made = rekeyed = 0
    for kind, rows in (
        (common_pb2.PARTICIPANT_KIND_INSTITUTION, parts["institutions"]),
        (common_pb2.PARTICIPANT_KIND_BANK, parts["banks"]),
    ):
        for r in rows:
            signing = []
            if kind == common_pb2.PARTICIPANT_KIND_INSTITUTION:
                pk = keys.public_key(r["participant_id"])
                signing = [admin_pb2.SigningKey(key_id=key_id_of(pk), public_key=pk)]
            p = admin_pb2.Participant(
                participant_id=r["participant_id"], kind=kind, name=r["name"],
                status=common_pb2.PARTICIPANT_STATUS_ACTIVE, bank_code=r.get("bank_code", ""),
                endpoint=r.get("listen", ""), currencies=r["currencies"],
                net_debit_caps=[common_pb2.Money(amount_minor=v, currency=c)
                                for c, v in r["net_debit_caps"].items()],
                version=1, signing_keys=signing,
            )  # fmt: skip
            try:
                client.admin.RegisterParticipant(
                    admin_pb2.RegisterParticipantRequest(participant=p), timeout=CALL_DEADLINE_S
                )
                made += 1
            except grpc.RpcError as e:
                if e.code() is not grpc.StatusCode.ALREADY_EXISTS:
                    raise
                rekeyed += _add_signing_keys(client, r["participant_id"], signing)
    progress(
        f"participants registered: {made} new, "
        f"{len(parts['institutions']) + len(parts['banks']) - made} already there"
        + (f", {rekeyed} given a new signing key" if rekeyed else "")
    )


def _add_signing_keys(client: SwitchClient, participant_id: str, wanted: list[Any]) -> int:
    """Add the keys of ``wanted`` that the stored participant does not list; 1 if any."""
    stored = client.admin.GetParticipant(
        admin_pb2.GetParticipantRequest(participant_id=participant_id), timeout=CALL_DEADLINE_S
    ).participant
    listed = {k.key_id for k in stored.signing_keys}
    missing = [k for k in wanted if k.key_id not in listed]
    if not missing:
        return 0
    stored.signing_keys.extend(missing)  # the old keys stay listed: orders may be in flight
    client.admin.UpdateParticipant(
        admin_pb2.UpdateParticipantRequest(participant=stored), timeout=CALL_DEADLINE_S
    )
    return 1


@dataclass
class Outcome:
    zone: str
    state: str
    latency_s: float


def make_orders(parts: dict[str, Any], count: int, run_id: str) -> list[payment_pb2.PaymentOrder]:
    now_us = time.time_ns() // 1000
    orders = []
    insts, banks = parts["institutions"], parts["banks"]
    for i in range(count):
        inst = insts[i % len(insts)]
        currency = "USD" if i % 10 == 0 and "USD" in inst["currencies"] else "CNY"
        usable = [b for b in banks if currency in b["currencies"]]
        bank = usable[(i // len(insts)) % len(usable)]
        debit = i % 2 == 0
        orders.append(payment_pb2.PaymentOrder(
            payment_id=f"demo-{run_id}-{i:05d}", institution_id=inst["participant_id"],
            type=common_pb2.PAYMENT_TYPE_DEBIT if debit else common_pb2.PAYMENT_TYPE_CREDIT,
            payer_id=bank["participant_id"] if debit else inst["participant_id"],
            payee_id=inst["participant_id"] if debit else bank["participant_id"],
            bank_account=f"62220200{i:010d}",
            amount=common_pb2.Money(amount_minor=100 + (i * 7919) % 500_000, currency=currency),
            memo="top-up" if debit else "withdrawal", requested_at=us_to_ts(now_us),
        ))  # fmt: skip
    return orders


def send_burst(
    clients: list[SwitchClient], orders: list[payment_pb2.PaymentOrder]
) -> list[Outcome]:
    """Two thirds single calls, one third in batches, spread round-robin over the zones."""
    singles = [o for i, o in enumerate(orders) if i % 3 != 2]
    batched = [o for i, o in enumerate(orders) if i % 3 == 2]
    by_inst: dict[str, list[payment_pb2.PaymentOrder]] = defaultdict(list)
    for o in batched:
        by_inst[o.institution_id].append(o)
    batches = [v[i : i + DEMO_BATCH_SIZE] for v in by_inst.values()
               for i in range(0, len(v), DEMO_BATCH_SIZE)]  # fmt: skip

    def one(i: int) -> list[Outcome]:
        c = clients[i % len(clients)]
        t = time.monotonic()
        try:
            r = c.payments.SubmitPayment(
                payment_pb2.SubmitPaymentRequest(order=singles[i]), timeout=CALL_DEADLINE_S
            )
            state = common_pb2.PaymentState.Name(r.payment.state).removeprefix(STATE_)
        except grpc.RpcError as e:
            err = error_details(e)
            state = f"ERROR {err.reason if err else e.code().name}"
        return [Outcome(c.zone, state, time.monotonic() - t)]

    def many(i: int) -> list[Outcome]:
        c = clients[(i + 3) % len(clients)]
        t = time.monotonic()
        r = c.payments.SubmitPayments(
            payment_pb2.SubmitPaymentsRequest(orders=batches[i]), timeout=CALL_DEADLINE_S
        )
        lat = time.monotonic() - t
        return [
            Outcome(c.zone, common_pb2.PaymentState.Name(x.payment.state).removeprefix(STATE_)
                    if x.HasField("payment") else f"ERROR {x.error.reason}", lat)
            for x in r.results
        ]  # fmt: skip

    with ThreadPoolExecutor(DEMO_CLIENT_THREADS) as pool:
        futs = [pool.submit(one, i) for i in range(len(singles))]
        futs += [pool.submit(many, i) for i in range(len(batches))]
        return [o for f in futs for o in f.result()]


def ledger_table(totals: Mapping[tuple[str, str], Sequence[int]]) -> list[str]:
    """The ledger's totals per (participant, currency) as aligned lines: each column as
    wide as its widest cell, so a long participant id does not push its row out of line."""
    header = ("PARTICIPANT", "CCY", "DEBITS", "CREDITS", "NET")
    rows = [(pid, ccy, f"{d:,}", f"{c:,}", f"{d - c:,}")
            for (pid, ccy), (d, c) in sorted(totals.items())]  # fmt: skip
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        text, amounts = cells[:2], cells[2:]  # names left-aligned, amounts right-aligned
        left = [cell.ljust(w) for cell, w in zip(text, widths[:2], strict=True)]
        right = [cell.rjust(w) for cell, w in zip(amounts, widths[2:], strict=True)]
        return f"  {'  '.join(left + right)}"

    return [line(header)] + [line(r) for r in rows]


def ledger_totals(lc: LocalCluster) -> LedgerSummary:
    """Every shard's chain read back at QUORUM and verified, summarised."""
    nodes = lc.cassandra_nodes()
    cfg = CassandraConfig.from_topology(
        lc.topo, nodes[0].dc, [n.zone.address for n in nodes], lc.topo.keyspace.name
    )
    cluster, session = connect(cfg)
    try:
        return read_ledger(CassandraLedger(session, consistency_level(cfg.consistency)))
    finally:
        cluster.shutdown()


def run(
    lc: LocalCluster, payments: int = DEMO_PAYMENTS, progress: Progress = print
) -> dict[str, Any]:
    lc.up()
    parts = load_participants()
    start_banks(lc, parts, progress)
    clients = [SwitchClient.connect(lc.topo, z.name) for z in lc.topo.zones]
    try:
        register_participants(clients[0], parts, progress)
        time.sleep(REGISTRY_REFRESH_S * 1.5)  # every node's registry refreshes within this
        run_id = uuid.uuid4().hex[:8]
        orders = make_orders(parts, payments, run_id)
        progress(
            f"sending {len(orders)} payments through {len(clients)} zones "
            f"(two thirds single calls, one third in batches of {DEMO_BATCH_SIZE})"
        )
        t0 = time.monotonic()
        outcomes = send_burst(clients, orders)
        elapsed = time.monotonic() - t0
    finally:
        for c in clients:
            c.close()
    by_state = Counter(o.state for o in outcomes)
    by_zone = Counter(o.zone for o in outcomes)
    progress(
        f"\n{len(outcomes)} payments in {elapsed:.1f}s ({len(outcomes) / elapsed:.0f}/s overall)"
    )
    progress("by state: " + ", ".join(f"{k} {v}" for k, v in sorted(by_state.items())))
    progress(
        "by zone:  " + ", ".join(f"{z} {n / elapsed:.0f}/s" for z, n in sorted(by_zone.items()))
    )
    summary = ledger_totals(lc)
    progress(
        f"\nledger (every shard's hash chain read back at QUORUM and verified: "
        f"{summary.entries} entries; {summary.shards_with_entries} of the {SHARD_COUNT} "
        "shards hold some), "
        "all time, net = debits - credits:"
    )
    for line in ledger_table(summary.totals):
        progress(line)
    net_by_ccy = summary.net_by_currency()
    for ccy, net in net_by_ccy.items():
        invariant(net == 0, f"net positions in {ccy} sum to {net}, not zero")
    progress(
        "net positions sum to zero in every currency: "
        + ", ".join(f"{c} {n}" for c, n in sorted(net_by_ccy.items()))
    )
    progress("\nstop everything with: make down")
    totals = {k: (v[0], v[1]) for k, v in summary.totals.items()}
    return {"by_state": dict(by_state), "elapsed_s": elapsed, "totals": totals}
