"""``clearingctl participant ...`` and ``clearingctl payment ...``: the operator's registry
commands over ``clearing.v1.AdminService``, and a payment sent or read as an institution
over ``PaymentService``, without grpcurl. ``participant`` calls as the local CA's
operator (``operator:operator``); ``payment`` as the institution the command names, once
the registry says it is one, with its certificate from the local CA and its
order-signing key from the local key store (both in ``.state/pki``; the key made by
``participant register``, the demo's by the demo). Outputs and failures are printed as
``clearingctl audit`` prints them: a table, CSV or JSON; one line per failed call with
its code, the switch's reason and message, the node called and, when it did not answer,
its log.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import sys
import time
from pathlib import Path
from typing import Any

import grpc

from clearing.v1 import admin_pb2, common_pb2, payment_pb2
from clearinghouse.argtypes import INT64_MAX, bounded_int
from clearinghouse.audit.cli import (
    FORMATS,
    Node,
    RowWriter,
    payment_detail,
    rpc_failure,
    time_us,
)
from clearinghouse.client import SwitchClient, answering_zone, error_details, institution
from clearinghouse.domain.signing import key_id_of
from clearinghouse.security import pki
from clearinghouse.signing_keys import default_store
from clearinghouse.switch.config import PARTICIPANT_QUOTA_PER_S
from clearinghouse.switch.convert import us_to_ts
from clearinghouse.topology import Topology

CALL_DEADLINE_S = 30.0
LIST_PAGE_SIZE = 200
# Pages of ListParticipants one `participant list` reads at most (200 each).
LIST_PAGES_MAX = 500
EXIT_FAILED = 1
EXIT_USAGE = 2
KINDS = {
    "institution": common_pb2.PARTICIPANT_KIND_INSTITUTION,
    "bank": common_pb2.PARTICIPANT_KIND_BANK,
}
TYPES = {"debit": common_pb2.PAYMENT_TYPE_DEBIT, "credit": common_pb2.PAYMENT_TYPE_CREDIT}
AMOUNT = bounded_int(1, INT64_MAX)


def add_parsers(sub: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--zone", default=None, help="the switch node to ask (default: the first that answers)"
    )
    common.add_argument(
        "--format", choices=FORMATS, default="table", help="output (default: table)"
    )
    common.add_argument(
        "--deadline-s", type=float, default=CALL_DEADLINE_S,
        help="how long the call may take (default: %(default)s)",
    )  # fmt: skip

    p = sub.add_parser("participant", help="register, change and list participants (operator)")
    s = p.add_subparsers(dest="cmd", required=True)
    ls = s.add_parser("list", parents=[common], help="every participant, by id")
    ls.add_argument("--kind", choices=sorted(KINDS), help="only institutions or only banks")
    get = s.add_parser("get", parents=[common], help="one participant")
    get.add_argument("participant_id")
    reg = s.add_parser(
        "register",
        parents=[common],
        help="add a participant, ACTIVE at version 1 (ALREADY_EXISTS if the id is taken)",
    )
    reg.add_argument("participant_id", help="1 to 64 characters of A-Z, 0-9 and _")
    reg.add_argument("--kind", choices=sorted(KINDS), required=True)
    reg.add_argument("--name", required=True, help="the display name")
    reg.add_argument(
        "--currency", action="append", required=True, dest="currencies", metavar="CCY",
        help="an ISO 4217 code it pays and is paid in (repeat for more)",
    )  # fmt: skip
    reg.add_argument(
        "--cap", action="append", default=[], type=_cap, metavar="CCY=MINOR",
        help="net debit cap in minor units, e.g. CNY=1000000 (repeat per currency; "
        "without one it may not be net debtor in that currency)",
    )  # fmt: skip
    reg.add_argument("--bank-code", default="", help="a bank's short code, e.g. ICBC")
    reg.add_argument("--endpoint", default="", help="where a bank serves BankService (host:port)")
    reg.add_argument(
        "--signing-key", default=None, metavar="JSON",
        help="an institution's order-signing public key: the line `clearingctl pki "
        "signing-key new` printed (default: the local key store's, made if missing, so "
        "that `clearingctl payment submit` can sign for it)",
    )  # fmt: skip
    reg.add_argument(
        "--quota", type=bounded_int(0, 1_000_000), default=0,
        help="payments per second on each switch node (default 0: the switch's)",
    )  # fmt: skip
    for name, what in (("suspend", "stop new payments that name it"),
                       ("resume", "make a suspended participant ACTIVE again")):  # fmt: skip
        c = s.add_parser(name, parents=[common], help=what)
        c.add_argument("participant_id")
        c.add_argument("--reason", required=True, help="why, kept with its status")
    cap = s.add_parser(
        "set-cap", parents=[common], help="set or replace its net debit cap in one currency"
    )
    cap.add_argument("participant_id")
    cap.add_argument("currency")
    cap.add_argument("amount_minor", type=bounded_int(0, INT64_MAX))

    pay = sub.add_parser("payment", help="send or read a payment as an institution")
    ps = pay.add_subparsers(dest="cmd", required=True)
    submit = ps.add_parser(
        "submit",
        parents=[common],
        help="send one signed payment order; the same id again returns the first answer",
    )
    submit.add_argument("institution_id")
    submit.add_argument("payment_id", help="chosen by the institution, unique for it")
    submit.add_argument(
        "--type", choices=sorted(TYPES), required=True,
        help="debit: the payer's bank pays the institution; credit: the institution pays out",
    )  # fmt: skip
    submit.add_argument("--payer", required=True, help="the paying participant's id")
    submit.add_argument("--payee", required=True, help="the paid participant's id")
    submit.add_argument("--account", required=True, help="the customer's bank account")
    submit.add_argument("--amount", type=AMOUNT, required=True, help="in minor units")
    submit.add_argument("--currency", required=True, help="ISO 4217, e.g. CNY")
    submit.add_argument("--memo", default="")
    submit.add_argument(
        "--requested-at", type=time_us, default=None, metavar="TIME",
        help="when the institution made the order (default: now). It is part of the order: "
        "to send the same order again, give the requested_at its first answer printed",
    )  # fmt: skip
    pget = ps.add_parser("get", parents=[common], help="one of the institution's payments")
    pget.add_argument("institution_id")
    pget.add_argument("payment_id")


def _cap(text: str) -> tuple[str, int]:
    currency, sep, amount = text.partition("=")
    if not sep or not currency:
        raise argparse.ArgumentTypeError(f"{text!r}: give CCY=MINOR, e.g. CNY=1000000")
    try:
        return currency, int(amount)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: the amount is whole minor units") from None


def run(group: str, args: argparse.Namespace, topo: Topology, switch_log: Any = None) -> int:
    zone = answering_zone(topo, args.zone)
    node = Node(zone.name, f"{zone.address}:{zone.ports.switch}",
                switch_log(zone.name) if switch_log else None)  # fmt: skip
    operator = SwitchClient.connect(topo, zone.name, identity=pki.operator())
    client: SwitchClient | None = None
    try:
        if group == "participant":
            return _participant(operator, args)
        # Acting as an institution needs its certificate, which the local CA makes on
        # first use: not for a name the registry does not hold (a typo), nor a bank.
        refused = _not_an_institution(operator, args.institution_id, args.deadline_s)
        if refused:
            print(f"clearingctl: {refused}", file=sys.stderr)
            return EXIT_FAILED
        client = SwitchClient.connect(topo, zone.name, identity=institution(args.institution_id))
        return _payment(client, args)
    except grpc.RpcError as e:
        print(rpc_failure(e, node, args.deadline_s), file=sys.stderr)
        if _id_reused(e) and args.cmd == "submit" and args.requested_at is None:
            print(REPLAY_HINT, file=sys.stderr)
        return EXIT_FAILED
    finally:
        operator.close()
        if client is not None:
            client.close()


REPLAY_HINT = (
    "clearingctl: an order's requested_at is part of it, and `payment submit` stamps a new "
    "one (now) unless given: to send the same order again, pass --requested-at with the "
    "requested_at the first answer printed (`clearingctl payment get` shows it)"
)


def _id_reused(e: grpc.RpcError) -> bool:
    err = error_details(e)
    return err is not None and err.reason == "PAYMENT_ID_REUSED"


def _not_an_institution(operator: SwitchClient, pid: str, deadline_s: float) -> str:
    """Why ``pid`` cannot send or read payments ("" if it can): never registered, or a
    bank (payments are named by the institution that sent them)."""
    try:
        got = operator.admin.GetParticipant(
            admin_pb2.GetParticipantRequest(participant_id=pid), timeout=deadline_s
        ).participant
    except grpc.RpcError as e:
        err = error_details(e)
        if err is None or err.reason != "PARTICIPANT_NOT_FOUND":
            raise
        return (
            f"NOT_FOUND PARTICIPANT_NOT_FOUND: no participant {pid!r} is registered "
            "(`clearingctl participant list`; `participant register` adds one)"
        )
    if got.kind != common_pb2.PARTICIPANT_KIND_INSTITUTION:
        return (
            f"{pid} is a bank: payments are sent, and named, by the institution whose "
            "order they are (a bank's own are listed by `clearingctl audit payments`)"
        )
    return ""


def _participant(client: SwitchClient, args: argparse.Namespace) -> int:
    admin, timeout = client.admin, args.deadline_s
    pid = getattr(args, "participant_id", "")
    if args.cmd == "list":
        out = RowWriter(args.format)
        token = ""
        for _ in range(LIST_PAGES_MAX):
            page = admin.ListParticipants(admin_pb2.ListParticipantsRequest(
                kind=KINDS[args.kind] if args.kind else common_pb2.PARTICIPANT_KIND_UNSPECIFIED,
                page_size=LIST_PAGE_SIZE, page_token=token,
            ), timeout=timeout)  # fmt: skip
            out.write([_participant_row(p) for p in page.participants])
            token = page.next_page_token
            if not token:
                break
        out.close()
        return 0
    if args.cmd == "get":
        got = admin.GetParticipant(admin_pb2.GetParticipantRequest(participant_id=pid),
                                   timeout=timeout)  # fmt: skip
        return _show(_participant_row(got.participant), args.format)
    if args.cmd == "register":
        try:
            participant = _new_participant(args)
        except ValueError as e:
            print(f"clearingctl: {e}", file=sys.stderr)
            return EXIT_USAGE
        made = admin.RegisterParticipant(
            admin_pb2.RegisterParticipantRequest(participant=participant), timeout=timeout
        )
        print("every switch node knows it at once (a node that lacks it reads the registry "
              "again); it can pay now", file=sys.stderr)  # fmt: skip
        return _show(_participant_row(made.participant), args.format)
    if args.cmd in ("suspend", "resume"):
        if args.cmd == "suspend":
            done = admin.SuspendParticipant(
                admin_pb2.SuspendParticipantRequest(participant_id=pid, reason=args.reason),
                timeout=timeout,
            ).participant
        else:
            done = admin.ResumeParticipant(
                admin_pb2.ResumeParticipantRequest(participant_id=pid, reason=args.reason),
                timeout=timeout,
            ).participant
        print("every switch node applies it within 2 s (its registry refresh)", file=sys.stderr)
        return _show(_participant_row(done), args.format)
    # set-cap
    money = common_pb2.Money(amount_minor=args.amount_minor, currency=args.currency)
    changed = admin.SetNetDebitCap(
        admin_pb2.SetNetDebitCapRequest(participant_id=pid, cap=money), timeout=timeout
    ).participant
    print("new loans of headroom follow it at once; headroom already lent, at the next "
          "settlement", file=sys.stderr)  # fmt: skip
    return _show(_participant_row(changed), args.format)


def _new_participant(args: argparse.Namespace) -> admin_pb2.Participant:
    kind = KINDS[args.kind]
    signing: list[admin_pb2.SigningKey] = []
    if kind == common_pb2.PARTICIPANT_KIND_INSTITUTION:
        public = (
            _public_key(args.signing_key)
            if args.signing_key is not None
            else default_store().public_key(args.participant_id)
        )
        signing = [admin_pb2.SigningKey(key_id=key_id_of(public), public_key=public)]
    elif args.signing_key is not None:
        raise ValueError("--signing-key is for institutions: banks sign no orders")
    return admin_pb2.Participant(
        participant_id=args.participant_id, kind=kind, name=args.name,
        bank_code=args.bank_code, endpoint=args.endpoint, currencies=args.currencies,
        net_debit_caps=[common_pb2.Money(amount_minor=n, currency=c) for c, n in args.cap],
        signing_keys=signing, payments_per_s_quota=args.quota,
    )  # fmt: skip


def _public_key(text: str) -> bytes:
    """The raw key of ``pki signing-key new``'s line ({"key_id", "public_key"}), or of a
    file holding it."""
    path = Path(text)
    if not text.lstrip().startswith("{") and path.is_file():
        text = path.read_text()
    try:
        given = json.loads(text)
        public = base64.b64decode(given["public_key"], validate=True)
    except (ValueError, KeyError, TypeError, binascii.Error) as e:
        raise ValueError(
            f"--signing-key: not the line `clearingctl pki signing-key new` prints ({e})"
        ) from e
    if len(public) != 32:
        raise ValueError(f"--signing-key: an Ed25519 key is 32 bytes, not {len(public)}")
    if given.get("key_id") not in (None, key_id_of(public)):
        raise ValueError("--signing-key: its key_id is not the one of its public_key")
    return public


def _participant_row(p: admin_pb2.Participant) -> dict[str, Any]:
    def name(enum: Any, value: int, prefix: str) -> str:
        return str(enum.Name(value)).removeprefix(prefix)

    return {
        "participant_id": p.participant_id,
        "kind": name(common_pb2.ParticipantKind, p.kind, "PARTICIPANT_KIND_"),
        "status": name(common_pb2.ParticipantStatus, p.status, "PARTICIPANT_STATUS_"),
        "name": p.name,
        "currencies": " ".join(p.currencies),
        "net_debit_caps": " ".join(f"{m.currency}={m.amount_minor}" for m in p.net_debit_caps),
        "bank_code": p.bank_code,
        "endpoint": p.endpoint,
        "signing_keys": " ".join(k.key_id for k in p.signing_keys),
        # 0 is "the switch's default": shown as what it is.
        "quota_per_s": p.payments_per_s_quota or PARTICIPANT_QUOTA_PER_S,
        "version": p.version,
        "status_reason": p.status_reason,
    }


def _payment(client: SwitchClient, args: argparse.Namespace) -> int:
    stub, timeout = client.payments_as(args.institution_id), args.deadline_s
    if args.cmd == "get":
        got = stub.GetPayment(payment_pb2.GetPaymentRequest(
            institution_id=args.institution_id, payment_id=args.payment_id,
        ), timeout=timeout).payment  # fmt: skip
        return _show(_payment_row(got), args.format)
    order = payment_pb2.PaymentOrder(
        payment_id=args.payment_id, institution_id=args.institution_id, type=TYPES[args.type],
        payer_id=args.payer, payee_id=args.payee, bank_account=args.account,
        amount=common_pb2.Money(amount_minor=args.amount, currency=args.currency),
        memo=args.memo,
        requested_at=us_to_ts(args.requested_at or int(time.time() * 1e6)),
    )  # fmt: skip
    res = stub.SubmitPayment(payment_pb2.SubmitPaymentRequest(order=order), timeout=timeout)
    # Answered with its state (approved, declined, ...): the command did its job.
    return _show(_payment_row(res.payment) | {"replayed": res.replayed}, args.format)


def _payment_row(p: payment_pb2.Payment) -> dict[str, Any]:
    """``clearingctl audit payment``'s fields but the signature (128 hex digits, in the way
    of a one-row table; ``audit payment`` shows it)."""
    return {k: v for k, v in payment_detail(p).items() if k != "signature"}


def _show(row: dict[str, Any], fmt: str) -> int:
    out = RowWriter(fmt)
    out.write([row])
    out.close()
    return 0


__all__ = ["add_parsers", "run"]
