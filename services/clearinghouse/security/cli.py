"""``clearingctl pki ...``: the local certificate authority, for operators, and an
institution's own order-signing key.

    clearingctl pki init                         create the CA (set-up does this)
    clearingctl pki issue institution INST_NEW   a participant's certificate and key
    clearingctl pki issue bank BANK_X --ip 10.0.0.7 --dns bank-x.example
    clearingctl pki issue auditor kpmg --out ~/handover/kpmg
    clearingctl pki list
    clearingctl pki revoke institution INST_NEW --reason "laptop stolen"
    clearingctl pki revoke --cert handed-over/cert.pem --reason "key leaked"
    clearingctl pki revoke --serial 7a3f... --identity operator:alice --reason "left"
    clearingctl pki revoked
    clearingctl pki signing-key new --out ~/keys/inst_new-signing.pem
    clearingctl pki signing-key public --key ~/keys/inst_new-signing.pem
    clearingctl pki sign-order --key ~/keys/inst_new-signing.pem '{"payment_id": ...}'

``issue`` writes ``cert.pem`` and ``key.pem`` (0600) in the identity's folder under the
CA folder, and with ``--out`` also copies them and ``ca.pem`` there, to hand over. A
private key (``issue --out``, ``signing-key new --out``) is never written inside a git
work tree unless git ignores that path (``git check-ignore``), so it cannot be committed
by accident.

``revoke`` asks a switch node (``AdminService.RevokeCertificate``, as the operator) to
refuse a certificate from now on: the one in the CA folder for ``ROLE NAME``, a
certificate file, or a serial. The holder needs a new certificate (``issue`` again);
``revoked`` lists every revocation.

``signing-key new`` makes an Ed25519 key pair for an institution on its own machine: the
private key stays in the file it names, and the public half is printed in the form
``AdminService.RegisterParticipant`` / ``UpdateParticipant`` take it
(``Participant.signing_keys``: ``{"key_id": ..., "public_key": <base64>}``), for the
operator to register. ``sign-order --key FILE`` signs with that key; without ``--key`` it
uses the key the demo keeps for the institution in the CA folder.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import grpc
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)
from cryptography.x509.oid import NameOID

from clearinghouse.security import pki
from clearinghouse.security.identity import Identity, Role
from clearinghouse.security.revocation import parse_serial, serial_hex
from clearinghouse.topology import Topology

GIT_TIMEOUT_S: Final = 10.0
KEY_FILE_MODE: Final = 0o600
REVOCATION_CALL_S: Final = 30.0
REVOKED_PAGE_SIZE: Final = 1000


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
    iss.add_argument(
        "--out",
        type=Path,
        default=None,
        help="also copy the PEM files here (outside any git work tree, or git-ignored)",
    )
    ps.add_parser("list", help="every identity issued, with its expiry and serial")
    rv = ps.add_parser(
        "revoke",
        help="refuse a certificate from now on, on every switch node (ROLE NAME: the one "
        "in the CA folder now, so revoke before issuing the holder a new one; or --cert "
        "FILE; or --serial HEX --identity ROLE:NAME)",
    )
    rv.add_argument("role", nargs="?", choices=[r.value for r in Role])
    rv.add_argument("name", nargs="?")
    rv.add_argument("--cert", type=Path, default=None, help="a certificate file (PEM)")
    rv.add_argument("--serial", default=None, help="the certificate's serial, in hex")
    rv.add_argument("--identity", default=None, help="with --serial: whose, as ROLE:NAME")
    rv.add_argument("--reason", required=True, help="why, kept with the revocation")
    rv.add_argument(
        "--zone", default=None, help="the switch node to ask (default: the first that answers)"
    )
    rl = ps.add_parser("revoked", help="every revoked certificate, as the switch keeps them")
    rl.add_argument(
        "--zone", default=None, help="the switch node to ask (default: the first that answers)"
    )
    rl.add_argument("--format", choices=("table", "json"), default="table")
    sk = ps.add_parser("signing-key", help="an institution's own order-signing key (Ed25519)")
    sks = sk.add_subparsers(dest="signing_cmd", required=True)
    new = sks.add_parser(
        "new", help="make a key pair; prints the public half to register with the switch"
    )
    new.add_argument("--out", type=Path, required=True, help="where the private key goes (PEM)")
    pub = sks.add_parser("public", help="print the public half of a private key file")
    pub.add_argument("--key", type=Path, required=True, help="the private key (PEM)")
    so = ps.add_parser(
        "sign-order",
        help="sign a PaymentOrder (proto JSON) with its institution's key; prints a "
        "SubmitPaymentRequest for grpcurl -d",
    )
    so.add_argument("order_json", help="the order as proto JSON; '-' reads standard input")
    so.add_argument(
        "--key",
        type=Path,
        default=None,
        help="the institution's own Ed25519 private key (PEM); default: the key store's",
    )


def run(
    args: argparse.Namespace,
    topo: Topology | None = None,
    switch_log: Callable[[str], Path] | None = None,
) -> int:
    """Run the command; ``switch_log(zone)``, when the node runs on this machine, is its
    log, named when the node ``revoke``/``revoked`` asks does not answer."""
    try:
        if args.cmd in ("revoke", "revoked"):
            if topo is None:
                raise ValueError(f"pki {args.cmd} needs the cluster's topology")
            return _revocation(args, topo, switch_log)
        return _run(args)
    except BrokenPipeError:
        raise  # not the command's failure: a reader stopped reading (clearingctl's main)
    except (pki.PkiError, ValueError, OSError) as e:
        print(f"clearingctl: {e}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    ca = pki.LocalCA(args.dir or pki.default_directory())
    if args.cmd == "init":
        created = ca.init()
        print(f"{'created' if created else 'already there'}: {ca.ca_cert_path}")
        return 0
    if args.cmd == "issue":
        ident = Identity(Role(args.role), args.name)
        if args.out is not None:
            refuse_key_in_work_tree(args.out / "key.pem")  # before anything is issued
        ca.init()
        folder = ca.issue(ident, ips=args.ip, dns=args.dns)
        print(f"issued {ident}: {folder / 'cert.pem'}, {folder / 'key.pem'}")
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True, mode=pki.DIR_MODE)
            for name in ("cert.pem", "key.pem"):
                shutil.copy2(folder / name, args.out / name)
            shutil.copy2(ca.ca_cert_path, args.out / "ca.pem")
            print(f"copied cert.pem, key.pem and ca.pem to {args.out}")
        return 0
    if args.cmd == "signing-key":
        return _signing_key(args)
    if args.cmd == "sign-order":
        return _sign_order(args.order_json, ca.directory, args.key)
    for ident, expires in ca.identities():
        serial = serial_hex(_certificate(ca.folder(ident) / "cert.pem").serial_number)
        print(f"{ident.common_name:<40} expires {expires:%Y-%m-%d}  serial {serial}")
    return 0


# -- revocation ------------------------------------------------------------------------------


def _certificate(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.expanduser().read_bytes())


def _holder_in_folder(ca: pki.LocalCA, serial: str) -> str | None:
    """Whose certificate in the CA folder has ``serial`` (its subject's common name), or
    None: not there (issued elsewhere, or since re-issued) or not a serial at all."""
    wanted = parse_serial(serial)
    if wanted is None or not ca.directory.is_dir():
        return None
    for ident, _ in ca.identities():
        if _certificate(ca.folder(ident) / "cert.pem").serial_number == wanted:
            return str(ident)
    return None


def revocation_target(args: argparse.Namespace, ca: pki.LocalCA) -> tuple[str, str]:
    """(serial in hex, identity) that ``pki revoke`` names, from exactly one of ROLE
    NAME, ``--cert`` or ``--serial`` with ``--identity``; ValueError otherwise."""
    given = [args.role is not None, args.cert is not None, args.serial is not None]
    if sum(given) != 1 or (args.role is not None) != (args.name is not None):
        raise ValueError("name the certificate one way: ROLE NAME, --cert FILE or --serial HEX")
    if args.serial is not None:
        if not args.identity:
            raise ValueError("--serial needs --identity ROLE:NAME (whose certificate it is)")
        holder = _holder_in_folder(ca, args.serial)
        if holder is not None and holder != args.identity:
            # The switch stores the identity it is told: a typo would name the wrong
            # holder in every auditor's list of revocations.
            raise ValueError(
                f"serial {args.serial} is the certificate of {holder} in {ca.directory}, "
                f"not of {args.identity}"
            )
        return args.serial, args.identity
    if args.identity:
        raise ValueError("--identity goes with --serial only")
    path = (
        args.cert
        if args.cert is not None
        else ca.folder(Identity(Role(args.role), args.name)) / "cert.pem"
    )
    if not path.exists():
        raise ValueError(f"no certificate at {path}")
    cert = _certificate(path)
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    identity = str(names[0].value) if names else ""
    return serial_hex(cert.serial_number), identity


def _revocation(
    args: argparse.Namespace, topo: Topology, switch_log: Callable[[str], Path] | None
) -> int:
    from clearing.v1 import admin_pb2, admin_pb2_grpc  # noqa: PLC0415 (only these need gRPC)
    from clearinghouse.audit.cli import Node, rpc_failure  # noqa: PLC0415
    from clearinghouse.client import answering_zone, local_credentials  # noqa: PLC0415

    ca = pki.LocalCA(args.dir or pki.default_directory())
    request = None
    if args.cmd == "revoke":
        serial, identity = revocation_target(args, ca)
        request = admin_pb2.RevokeCertificateRequest(serial=serial, identity=identity,
                                                     reason=args.reason)  # fmt: skip
    zone = answering_zone(topo, args.zone)
    target = f"{zone.address}:{zone.ports.switch}"
    creds = local_credentials()
    with creds.channel(target, pki.operator(), server=pki.node(zone.name)) as channel:
        stub = admin_pb2_grpc.AdminServiceStub(channel)
        try:
            if request is None:
                listed: list[Any] = []
                token = ""
                while True:
                    page = stub.ListRevokedCertificates(
                        admin_pb2.ListRevokedCertificatesRequest(
                            page_size=REVOKED_PAGE_SIZE, page_token=token
                        ),
                        timeout=REVOCATION_CALL_S,
                    )
                    listed += page.revoked
                    token = page.next_page_token
                    if not token:
                        break
                _print_revoked(listed, args.format)
                return 0
            r = stub.RevokeCertificate(request, timeout=REVOCATION_CALL_S).revoked
        except grpc.RpcError as e:
            node = Node(zone.name, target, switch_log(zone.name) if switch_log else None)
            print(rpc_failure(e, node), file=sys.stderr)
            return 1
    print(f"revoked {r.identity}'s certificate, serial {r.serial} (by {r.revoked_by}, "
          f"{r.revoked_at.ToJsonString()}): refused by switch node {zone.name} now, by the "
          f"others at their next registry refresh (every 2 s)")  # fmt: skip
    if args.role is not None:
        print(f"issue a new one with: clearingctl pki issue {args.role} {args.name}")
    return 0


def _print_revoked(revoked: list[Any], fmt: str) -> None:
    rows = [
        {"serial": r.serial, "identity": r.identity, "revoked_at": r.revoked_at.ToJsonString(),
         "revoked_by": r.revoked_by, "reason": r.reason}
        for r in revoked
    ]  # fmt: skip
    if fmt == "json":
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        print("(none)")
        return
    for row in rows:
        print(f"{row['serial']:<42} {row['identity']:<40} {row['revoked_at']}  "
              f"{row['revoked_by']}: {row['reason']}")  # fmt: skip


# -- keys outside work trees ---------------------------------------------------------------


def _existing_parent(path: Path) -> Path:
    for p in (path, *path.parents):
        if p.is_dir():
            return p
    return Path("/")


def git_work_tree_tracking(path: Path) -> Path | None:
    """The git work tree that would track a file at ``path``: the one it lies in, unless
    git ignores that path there. None outside work trees, when ignored, or without git."""
    git = shutil.which("git")
    if git is None:
        return None
    absolute = path.expanduser().resolve()
    top = subprocess.run(
        [git, "-C", str(_existing_parent(absolute.parent)), "rev-parse", "--show-toplevel"],
        capture_output=True, text=True, timeout=GIT_TIMEOUT_S, check=False,
    )  # fmt: skip
    if top.returncode != 0:
        return None  # not inside a work tree
    root = Path(top.stdout.strip())
    ignored = subprocess.run(
        [git, "-C", str(root), "check-ignore", "-q", str(absolute)],
        capture_output=True, text=True, timeout=GIT_TIMEOUT_S, check=False,
    )  # fmt: skip
    # 0: ignored; 1: not ignored (or tracked); anything else: git could not tell.
    return None if ignored.returncode == 0 else root


def refuse_key_in_work_tree(path: Path) -> None:
    """Raise ValueError if a private key written at ``path`` could be committed."""
    root = git_work_tree_tracking(path)
    if root is not None:
        raise ValueError(
            f"{path} lies in the git work tree {root} and is not git-ignored: a private "
            "key there could be committed. Write it outside the work tree (e.g. under "
            "your home folder) or to a git-ignored path"
        )


# -- order-signing keys ----------------------------------------------------------------------


def read_signing_key(path: Path) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM file (PKCS#8, unencrypted)."""
    key = load_pem_private_key(path.expanduser().read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} does not hold an Ed25519 private key")
    return key


def public_half_json(key: Ed25519PrivateKey) -> str:
    """The key's public half as a ``clearing.v1.SigningKey`` in proto JSON (the form
    ``Participant.signing_keys`` takes in RegisterParticipant / UpdateParticipant)."""
    from google.protobuf import json_format  # noqa: PLC0415 (only these commands need it)

    from clearing.v1 import admin_pb2  # noqa: PLC0415
    from clearinghouse.domain.signing import key_id_of, public_key_bytes  # noqa: PLC0415

    raw = public_key_bytes(key)
    message = admin_pb2.SigningKey(key_id=key_id_of(raw), public_key=raw)
    return json_format.MessageToJson(message, indent=None, preserving_proto_field_name=True)


def _signing_key(args: argparse.Namespace) -> int:
    if args.signing_cmd == "public":
        print(public_half_json(read_signing_key(args.key)))
        return 0
    out: Path = args.out.expanduser()
    refuse_key_in_work_tree(out)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    out.parent.mkdir(parents=True, exist_ok=True, mode=pki.DIR_MODE)
    # O_EXCL: never replaces a key that exists (it may be registered already).
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, KEY_FILE_MODE)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    print(public_half_json(key))
    print(
        f"private key written to {out} (mode 0600): keep it; give the operator only the "
        "line above, for Participant.signing_keys",
        file=sys.stderr,
    )
    return 0


def _sign_order(text: str, directory: Path, key_file: Path | None) -> int:
    """Sign with ``key_file`` if given, else the key in ``<pki>/<institution>/
    signing-key.pem`` (what the demo made)."""
    from google.protobuf import json_format  # noqa: PLC0415 (only this command needs it)

    from clearing.v1 import payment_pb2  # noqa: PLC0415
    from clearinghouse.domain.errors import InvalidArgument  # noqa: PLC0415
    from clearinghouse.order_signing import sign_order_pb  # noqa: PLC0415
    from clearinghouse.signing_keys import SigningKeyStore  # noqa: PLC0415

    raw = sys.stdin.read() if text == "-" else text
    try:
        order = json_format.Parse(raw, payment_pb2.PaymentOrder())
    except json_format.ParseError as e:  # not JSON, or not a PaymentOrder's fields
        what = " ".join(str(e).split())  # one line: its list of fields spans two
        print(f"clearingctl: not a PaymentOrder in proto JSON: {what}", file=sys.stderr)
        return 1
    if key_file is None and not order.institution_id:
        print("clearingctl: the order names no institution_id, whose signing key signs it "
              "(or give the key with --key)", file=sys.stderr)  # fmt: skip
        return 1
    key = (
        read_signing_key(key_file)
        if key_file is not None
        else SigningKeyStore(directory).existing(order.institution_id)
    )
    if key is None:
        print(f"clearingctl: no signing key for {order.institution_id!r} in the key store "
              f"({directory}); give the institution's key with --key (a new one: "
              "`clearingctl pki signing-key new --out FILE`, its public half registered)",
              file=sys.stderr)  # fmt: skip
        return 1
    try:
        sign_order_pb(order, key)
    except InvalidArgument as e:  # an order the switch would refuse has no bytes to sign
        bad = "; ".join(f"{v.field}: {v.description}" for v in e.violations)
        print(f"clearingctl: the order is not valid, not signed: {bad}", file=sys.stderr)
        return 1
    request = payment_pb2.SubmitPaymentRequest(order=order)
    print(json_format.MessageToJson(request, indent=None))
    return 0
