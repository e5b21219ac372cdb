"""The local certificate authority: who is who on the switch's gRPC connections.

Every gRPC connection runs over TLS with client certificates: participants to nodes,
node to node, and nodes to banks. A certificate names one identity in its subject's
common name, ``<role>:<name>`` (see :mod:`clearinghouse.security.identity`), and the
authorization table decides what that identity may call.

Every certificate also carries its identity as a DNS name in its subject alternative
names (:func:`identity_dns_name`, e.g. ``494e53545f414c49504159.institution.id.clearing-
switch.invalid`` for ``institution:INST_ALIPAY``: the name's bytes in hex, so that any
identity name, underscores and upper case included, maps to a distinct host name and
back). A client names the server it means with ``grpc.ssl_target_name_override`` set to
that DNS name (:func:`expect_server`), so TLS refuses any other certificate of the same
CA on that address: a node calls a bank as ``bank:<id>``, another node as
``node:<zone>``; participants call ``node:<zone>``. Addresses alone prove nothing here:
everything listens on loopback and several certificates list the same address.

The local CA lives in a git-ignored folder (``.state/pki`` by default) laid out as::

    ca/ca.pem  ca/ca-key.pem            the authority (key 0600, folder 0700)
    <name>/cert.pem  <name>/key.pem     one folder per identity; <name> is the
                                        participant id (INST_ALIPAY), node-<zone>,
                                        or <role>-<name> for operators and auditors

A participant id that would take another identity's folder (``ca``, ``node-...``,
``operator-...``, ``auditor-...``, or a bank and an institution of the same id) is
refused when issuing, and :meth:`LocalCA.load` checks that the certificate it reads
names the identity asked for.

A deployment with a real CA gives each party the same three PEM files (its certificate,
its key, the CA certificate) and the same DNS name; nothing else in the switch depends on
this module.

Keys are ECDSA P-256 (fast handshakes on both sides); certificates last
``LEAF_VALIDITY_DAYS``, with KeyUsage digitalSignature (ECDHE-ECDSA needs no key
encipherment) and ExtendedKeyUsage by role: banks and nodes serve and call (serverAuth
and clientAuth); institutions, operators and auditors only call (clientAuth). Nothing
here is ever written with a mode wider than 0600.

A certificate issued before identity names existed lacks its DNS name: :meth:`LocalCA.ensure`
and :meth:`LocalCA.load` re-issue it (same addresses, new key; the CA stays) when the CA's
key is in the folder, and otherwise say how to re-issue it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import ipaddress
import logging
import os
import ssl
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from clearinghouse._invariant import invariant
from clearinghouse.localcluster.paths import repo_root
from clearinghouse.security.identity import Identity, Role

log = logging.getLogger(__name__)

CA_VALIDITY_DAYS: Final = 3650
LEAF_VALIDITY_DAYS: Final = 397
ORGANIZATION: Final = "clearing-switch"
KEY_FILE_MODE: Final = 0o600
DIR_MODE: Final = 0o700
# Server certificates of the local cluster are valid for these names besides their own
# addresses (everything listens on loopback).
LOOPBACK_DNS: Final = ("localhost",)
# Identity DNS names end here. ``.invalid`` is reserved (RFC 2606): no real host name
# can ever equal one.
IDENTITY_DNS_SUFFIX: Final = "id.clearing-switch.invalid"
# Hex digits per DNS label of an identity name (a label holds at most 63 characters).
IDENTITY_DNS_LABEL_CHARS: Final = 32
# The CA's own folder; no identity may have it.
CA_FOLDER: Final = "ca"
# Roles that only ever call (their certificates are never a server's).
CLIENT_ONLY_ROLES: Final = frozenset({Role.INSTITUTION, Role.OPERATOR, Role.AUDITOR})
LOCK_FILE: Final = ".issue.lock"


class PkiError(Exception):
    """Something about the CA's folder that an operator must fix; the message says how."""


class IdentityConflict(PkiError):
    """Issuing this identity would overwrite another identity's folder."""


class IdentityMismatch(PkiError):
    """The certificate in an identity's folder names someone else."""


class OutdatedCertificate(PkiError):
    """A certificate without its identity's DNS name, and no CA key here to re-issue it."""


@dataclass(frozen=True, slots=True)
class KeyPair:
    """One identity's PEM files, read into memory."""

    identity: Identity
    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes


@dataclass(frozen=True, slots=True)
class PemFiles:
    """Where one identity's PEM files are, for clients that read them themselves (the
    etcd client takes paths, ``urllib`` an ``ssl`` context)."""

    ca: Path
    cert: Path
    key: Path

    def ssl_context(self) -> ssl.SSLContext:
        """A client context that presents this certificate and trusts only the CA; the
        server's certificate must name the address dialled (hostname checking on)."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca))
        ctx.load_cert_chain(self.cert, self.key)
        return ctx


# -- identity names ------------------------------------------------------------------------


def identity_dns_name(identity: Identity) -> str:
    """The DNS name every certificate of ``identity`` carries: the name's bytes in
    lowercase hex (split into labels of :data:`IDENTITY_DNS_LABEL_CHARS`), then the role,
    then :data:`IDENTITY_DNS_SUFFIX`. Hex keeps every character of an identity name
    (``_``, ``.``, upper case) distinct in a case-insensitive host name; the inverse is
    :func:`identity_of_dns_name`."""
    digits = identity.name.encode("ascii").hex()
    labels = [
        digits[i : i + IDENTITY_DNS_LABEL_CHARS]
        for i in range(0, len(digits), IDENTITY_DNS_LABEL_CHARS)
    ]
    return ".".join([*labels, identity.role.value, IDENTITY_DNS_SUFFIX])


def identity_of_dns_name(name: str) -> Identity | None:
    """The identity an identity DNS name encodes, or None for any other name."""
    lowered = name.lower()  # host names compare without case
    if not lowered.endswith("." + IDENTITY_DNS_SUFFIX):
        return None
    labels = lowered.removesuffix("." + IDENTITY_DNS_SUFFIX).split(".")
    if len(labels) < 2:
        return None
    *hex_labels, role = labels
    if any(not 0 < len(lb) <= IDENTITY_DNS_LABEL_CHARS for lb in hex_labels):
        return None
    try:
        raw = bytes.fromhex("".join(hex_labels))
        return Identity(Role(role), raw.decode("ascii"))
    except ValueError:  # not hex, not ASCII, no such role, or not an identity name
        return None


def expect_server(identity: Identity) -> list[tuple[str, str]]:
    """Channel options that make TLS accept only a server certificate of ``identity``
    (whatever address the channel dials)."""
    return [("grpc.ssl_target_name_override", identity_dns_name(identity))]


def _dns_names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(san.get_values_for_type(x509.DNSName))


def _ips(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(a) for a in san.get_values_for_type(x509.IPAddress)]


def _common_name(cert: x509.Certificate) -> str | None:
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(cn[0].value) if len(cn) == 1 else None


# -- files -----------------------------------------------------------------------------------


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    os.chmod(path.parent, DIR_MODE)
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, KEY_FILE_MODE)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, KEY_FILE_MODE)
    os.replace(tmp, path)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def leaf_key_usage(public_key: object) -> x509.KeyUsage:
    """digitalSignature always; keyEncipherment only for RSA keys (RSA key transport).
    An ECDSA key signs the handshake and never enciphers a key."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=isinstance(public_key, rsa.RSAPublicKey),
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def extended_key_usage(role: Role) -> x509.ExtendedKeyUsage:
    """clientAuth for roles that only call; clientAuth and serverAuth for banks and nodes."""
    if role in CLIENT_ONLY_ROLES:
        return x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
    return x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH])


def participant_folder_conflict(participant_id: str) -> str | None:
    """Why a folder named ``participant_id`` (a participant's: its certificate, and its
    signing key in the demo's key store) would be another's: the CA's, or one the
    ``<role>-<name>`` scheme gives other roles. None if it is free. Compared
    case-insensitively: folders on a case-insensitive file system collide that way too."""
    folded = participant_id.casefold()
    if folded == CA_FOLDER:
        return f"the folder {participant_id!r} is the certificate authority's"
    for role in Role:
        if not role.is_participant and folded.startswith(f"{role.value}-"):
            return (
                f"the folder {participant_id!r} has the form of a {role.value}'s "
                f"({role.value}-<name>); choose a participant id without that prefix"
            )
    return None


def reserved_folder_conflict(identity: Identity) -> str | None:
    """Why ``identity``'s folder would be another's, or None (see
    :func:`participant_folder_conflict`; other roles' ``<role>-<name>`` folders are
    distinct per role and never ``ca``)."""
    if not identity.role.is_participant:
        return None
    return participant_folder_conflict(identity.name)


class LocalCA:
    """Creates the authority once and issues identities from it; idempotent."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @property
    def ca_cert_path(self) -> Path:
        return self.directory / CA_FOLDER / "ca.pem"

    @property
    def ca_key_path(self) -> Path:
        return self.directory / CA_FOLDER / "ca-key.pem"

    def exists(self) -> bool:
        return self.ca_cert_path.is_file() and self.ca_key_path.is_file()

    def init(self) -> bool:
        """Create the authority if it is missing. Returns whether it was created."""
        if self.exists():
            return False
        self.directory.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        os.chmod(self.directory, DIR_MODE)
        key = _new_key()
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
                x509.NameAttribute(NameOID.COMMON_NAME, f"{ORGANIZATION} local CA"),
            ]
        )
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=CA_VALIDITY_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        _write_private(self.ca_key_path, _key_pem(key))
        _write_private(self.ca_cert_path, cert.public_bytes(serialization.Encoding.PEM))
        return True

    def _ca(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        if not self.exists():
            raise FileNotFoundError(
                f"no certificate authority in {self.directory}; run `clearingctl pki init`"
            )
        cert = x509.load_pem_x509_certificate(self.ca_cert_path.read_bytes())
        key = serialization.load_pem_private_key(self.ca_key_path.read_bytes(), password=None)
        invariant(isinstance(key, ec.EllipticCurvePrivateKey), "the CA key is not ECDSA")
        assert isinstance(key, ec.EllipticCurvePrivateKey)  # for mypy; checked above
        return cert, key

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One issuer at a time across processes (a key and its certificate are two
        files: two writers at once could leave one's key beside the other's cert)."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, KEY_FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def folder(self, identity: Identity) -> Path:
        return self.directory / identity.folder_name

    def has(self, identity: Identity) -> bool:
        d = self.folder(identity)
        return (d / "cert.pem").is_file() and (d / "key.pem").is_file()

    def _cert(self, identity: Identity) -> x509.Certificate:
        return x509.load_pem_x509_certificate((self.folder(identity) / "cert.pem").read_bytes())

    def _check_folder(self, identity: Identity) -> None:
        """Raise IdentityConflict if ``identity``'s folder is reserved or holds another
        identity's certificate."""
        why = reserved_folder_conflict(identity)
        if why is not None:
            raise IdentityConflict(f"cannot issue {identity}: {why}")
        cert_path = self.folder(identity) / "cert.pem"
        if cert_path.is_file():
            held = _common_name(x509.load_pem_x509_certificate(cert_path.read_bytes()))
            if held != identity.common_name:
                raise IdentityConflict(
                    f"cannot issue {identity}: its folder {self.folder(identity)} holds the "
                    f"certificate of {held!r} (a bank and an institution cannot share an id)"
                )

    def issue(
        self,
        identity: Identity,
        *,
        ips: Iterable[str] = (),
        dns: Iterable[str] = (),
        validity_days: int = LEAF_VALIDITY_DAYS,
    ) -> Path:
        """Issue (or re-issue) ``identity``'s certificate and key; returns its folder.

        The certificate always carries :func:`identity_dns_name`; ``ips`` and ``dns``
        make it a server certificate for those names as well (banks and nodes only).
        Raises IdentityConflict if the folder is another identity's, ValueError if a
        client-only role is given server names.
        """
        with self._locked():
            return self._issue(identity, list(ips), list(dns), validity_days)

    def _issue(
        self, identity: Identity, ips: list[str], dns: list[str], validity_days: int
    ) -> Path:
        if (ips or dns) and identity.role in CLIENT_ONLY_ROLES:
            raise ValueError(
                f"{identity} only calls the switch: its certificate is client-only, so it "
                "takes no --ip or --dns (banks and nodes do)"
            )
        self._check_folder(identity)
        ca_cert, ca_key = self._ca()
        key = _new_key()
        now = _now()
        builder = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
                        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, identity.role.value),
                        x509.NameAttribute(NameOID.COMMON_NAME, identity.common_name),
                    ]
                )
            )
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=validity_days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(leaf_key_usage(key.public_key()), critical=True)
            .add_extension(extended_key_usage(identity.role), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
        )
        own = identity_dns_name(identity)
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dict.fromkeys([own, *dns])]
        names += [x509.IPAddress(ipaddress.ip_address(a)) for a in dict.fromkeys(ips)]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        folder = self.folder(identity)
        _write_private(folder / "key.pem", _key_pem(key))
        _write_private(folder / "cert.pem", cert.public_bytes(serialization.Encoding.PEM))
        return folder

    def ensure(
        self, identity: Identity, *, ips: Sequence[str] = (), dns: Sequence[str] = ()
    ) -> Path:
        """Issue ``identity`` unless it already has a current certificate (its identity
        DNS name, and every one of ``ips`` and ``dns``); re-issues one from before
        identity names."""
        with self._locked():
            if self.has(identity):
                self._check_folder(identity)
                cert = self._cert(identity)
                names = _dns_names(cert)
                if (
                    identity_dns_name(identity) in names
                    and set(dns) <= set(names)
                    and set(ips) <= set(_ips(cert))
                ):
                    return self.folder(identity)
            return self._issue(identity, list(ips), list(dns), LEAF_VALIDITY_DAYS)

    def _reissue_outdated(self, identity: Identity, cert: x509.Certificate) -> None:
        """Re-issue a certificate from before identity names with the names it had."""
        if not self.exists():
            raise OutdatedCertificate(
                f"the certificate of {identity} in {self.folder(identity)} lacks its identity "
                f"name {identity_dns_name(identity)} (issued by an older version): have it "
                f"re-issued with `clearingctl pki issue {identity.role.value} {identity.name}`"
            )
        with self._locked():
            current = self._cert(identity)
            if identity_dns_name(identity) in _dns_names(current):
                return  # another process re-issued it meanwhile
            log.warning("re-issuing %s: its certificate lacks its identity name", identity)
            server = identity.role not in CLIENT_ONLY_ROLES
            self._issue(
                identity,
                _ips(cert) if server else [],
                [d for d in _dns_names(cert) if identity_of_dns_name(d) is None] if server else [],
                LEAF_VALIDITY_DAYS,
            )

    def load(self, identity: Identity) -> KeyPair:
        """``identity``'s PEM files. Raises IdentityMismatch if the folder's certificate
        names another identity; re-issues a certificate without its identity DNS name
        when the CA's key is here (OutdatedCertificate when it is not)."""
        if not self.has(identity):
            raise FileNotFoundError(
                f"no certificate for {identity.common_name} in {self.folder(identity)}; "
                f"issue one with `clearingctl pki issue {identity.role.value} {identity.name}`"
            )
        cert = self._cert(identity)
        held = _common_name(cert)
        if held != identity.common_name:
            raise IdentityMismatch(
                f"{self.folder(identity)} holds the certificate of {held!r}, not of "
                f"{identity.common_name!r}: the folder was overwritten by another identity; "
                "re-issue both"
            )
        if identity_dns_name(identity) not in _dns_names(cert):
            self._reissue_outdated(identity, cert)
        d = self.folder(identity)
        return KeyPair(
            identity,
            (d / "cert.pem").read_bytes(),
            (d / "key.pem").read_bytes(),
            self.ca_cert_path.read_bytes(),
        )

    def files(self, identity: Identity) -> PemFiles:
        """``identity``'s PEM files by path, after :meth:`load`'s checks."""
        self.load(identity)
        d = self.folder(identity)
        return PemFiles(self.ca_cert_path, d / "cert.pem", d / "key.pem")

    def identities(self) -> list[tuple[Identity, dt.datetime]]:
        """Every identity issued here, with its certificate's expiry."""
        out = []
        for cert_path in sorted(self.directory.glob("*/cert.pem")):
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            cn = _common_name(cert)
            ident = Identity.parse(cn) if cn is not None else None
            if ident is not None:
                out.append((ident, cert.not_valid_after_utc))
        return out


# -- gRPC credentials ----------------------------------------------------------------------


def server_credentials(pair: KeyPair) -> grpc.ServerCredentials:
    """TLS for a server that *requires* a client certificate signed by the CA.

    gRPC turns client authentication off when it is given no root certificates, so the
    CA is always passed and ``require_client_auth`` is always on.
    """
    invariant(bool(pair.ca_pem), "server credentials without a CA would not check clients")
    return grpc.ssl_server_credentials(
        [(pair.key_pem, pair.cert_pem)], root_certificates=pair.ca_pem, require_client_auth=True
    )


def channel_credentials(pair: KeyPair) -> grpc.ChannelCredentials:
    """TLS for a client presenting ``pair``'s certificate and trusting only the CA."""
    return grpc.ssl_channel_credentials(
        root_certificates=pair.ca_pem, private_key=pair.key_pem, certificate_chain=pair.cert_pem
    )


def secure_channel(
    target: str,
    pair: KeyPair,
    options: Sequence[tuple[str, object]] = (),
    *,
    server: Identity | None = None,
) -> grpc.Channel:
    """A TLS channel to ``target`` as ``pair``'s identity. With ``server``, only a
    certificate of that identity is accepted (:func:`expect_server`); without, any
    certificate of the CA valid for ``target``'s address (tests of one server only)."""
    opts: list[tuple[str, object]] = list(options)
    if server is not None:
        opts += expect_server(server)
    return grpc.secure_channel(target, channel_credentials(pair), options=opts)


def default_directory() -> Path:
    """``CLEARING_PKI_DIR`` if set, else ``<repo>/.state/pki``."""
    env = os.environ.get("CLEARING_PKI_DIR")
    if env:
        return Path(env)
    return repo_root() / ".state" / "pki"


def operator() -> Identity:
    return Identity(Role.OPERATOR, "operator")


def auditor() -> Identity:
    return Identity(Role.AUDITOR, "auditor")


def node(zone: str) -> Identity:
    return Identity(Role.NODE, zone)
