"""``clearingctl pki ...``: the local certificate authority, for operators.

    clearingctl pki init                         create the CA (set-up does this)
    clearingctl pki issue institution INST_NEW   a participant's certificate and key
    clearingctl pki issue bank BANK_X --ip 10.0.0.7 --dns bank-x.example
    clearingctl pki issue auditor kpmg --out ./kpmg-certs
    clearingctl pki list
    clearingctl pki sign-order '{"payment_id": ..., "institution_id": "INST_ALIPAY", ...}'

``issue`` writes ``cert.pem`` and ``key.pem`` (0600) in the identity's folder under the
CA folder, and with ``--out`` also copies them and ``ca.pem`` there, to hand over.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

from clearinghouse.security import pki
from clearinghouse.security.identity import Identity, Role


def add_parser(sub: Any) -> None:
    p = sub.add_parser("pki", help="the local certificate authority: issue and list identities")
    p.add_argument("--dir", type=Path, default=None, help="CA folder (default: .state/pki)")
    ps = p.add_subparsers(dest="cmd", required=True)
    ps.add_parser("init", help="create the certificate authority if it is missing")
    iss = ps.add_parser("issue", help="issue (or re-issue) an identity's certificate and key")
    iss.add_argument("role", choices=[r.value for r in Role])
    iss.add_argument("name", help="participant id for institutions and banks")
    iss.add_argument("--ip", action="append", default=[], help="server address (repeatable)")
    iss.add_argument("--dns", action="append", default=[], help="server name (repeatable)")
    iss.add_argument("--out", type=Path, default=None, help="also copy the PEM files here")
    ps.add_parser("list", help="every identity issued, with its expiry")
    so = ps.add_parser(
        "sign-order",
        help="sign a PaymentOrder (proto JSON) with its institution's key; prints a "
        "SubmitPaymentRequest for grpcurl -d",
    )
    so.add_argument("order_json", help="the order as proto JSON; '-' reads standard input")


def run(args: argparse.Namespace) -> int:
    ca = pki.LocalCA(args.dir or pki.default_directory())
    if args.cmd == "init":
        created = ca.init()
        print(f"{'created' if created else 'already there'}: {ca.ca_cert_path}")
        return 0
    if args.cmd == "issue":
        ca.init()
        ident = Identity(Role(args.role), args.name)
        folder = ca.issue(ident, ips=args.ip, dns=args.dns)
        print(f"issued {ident}: {folder / 'cert.pem'}, {folder / 'key.pem'}")
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True, mode=pki.DIR_MODE)
            for name in ("cert.pem", "key.pem"):
                shutil.copy2(folder / name, args.out / name)
            shutil.copy2(ca.ca_cert_path, args.out / "ca.pem")
            print(f"copied cert.pem, key.pem and ca.pem to {args.out}")
        return 0
    if args.cmd == "sign-order":
        return _sign_order(args.order_json, ca.directory)
    for ident, expires in ca.identities():
        print(f"{ident.common_name:<40} expires {expires:%Y-%m-%d}")
    return 0


def _sign_order(text: str, directory: Path) -> int:
    """Sign with the key in ``<pki>/<institution>/signing-key.pem`` (what the demo made)."""
    from google.protobuf import json_format  # noqa: PLC0415 (only this command needs it)

    from clearing.v1 import payment_pb2  # noqa: PLC0415
    from clearinghouse.order_signing import sign_order_pb  # noqa: PLC0415
    from clearinghouse.signing_keys import SigningKeyStore  # noqa: PLC0415

    raw = sys.stdin.read() if text == "-" else text
    order = json_format.Parse(raw, payment_pb2.PaymentOrder())
    key = SigningKeyStore(directory).existing(order.institution_id)
    if key is None:
        print(f"no signing key for {order.institution_id!r} in the key store", file=sys.stderr)
        return 1
    sign_order_pb(order, key)
    request = payment_pb2.SubmitPaymentRequest(order=order)
    print(json_format.MessageToJson(request, indent=None))
    return 0
