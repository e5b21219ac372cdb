"""The local certificate authority: who is who on the switch's gRPC connections.

Every gRPC connection runs over TLS with client certificates: participants to nodes,
node to node, and nodes to banks. A certificate names one identity in its subject's
common name, ``<role>:<name>`` (see :mod:`clearinghouse.security.identity`), and the
authorization table decides what that identity may call.

The local CA lives in a git-ignored folder (``.state/pki`` by default) laid out as::

    ca/ca.pem  ca/ca-key.pem            the authority (key 0600, folder 0700)
    <name>/cert.pem  <name>/key.pem     one folder per identity; <name> is the
                                        participant id (INST_ALIPAY), node-<zone>,
                                        or an operator's / auditor's name

A deployment with a real CA gives each party the same three PEM files (its certificate,
its key, the CA certificate); nothing else in the switch depends on this module.

Keys are ECDSA P-256 (fast handshakes on both sides); certificates last
``LEAF_VALIDITY_DAYS``. Nothing here is ever written with a mode wider than 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from clearinghouse._invariant import invariant
from clearinghouse.localcluster.paths import repo_root
from clearinghouse.security.identity import Identity, Role

CA_VALIDITY_DAYS: Final = 3650
LEAF_VALIDITY_DAYS: Final = 397
ORGANIZATION: Final = "clearing-switch"
KEY_FILE_MODE: Final = 0o600
DIR_MODE: Final = 0o700
# Server certificates of the local cluster are valid for these names besides their own
# addresses (everything listens on loopback).
LOOPBACK_DNS: Final = ("localhost",)


@dataclass(frozen=True, slots=True)
class KeyPair:
    """One identity's PEM files, read into memory."""

    identity: Identity
    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes


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


class LocalCA:
    """Creates the authority once and issues identities from it; idempotent."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @property
    def ca_cert_path(self) -> Path:
        return self.directory / "ca" / "ca.pem"

    @property
    def ca_key_path(self) -> Path:
        return self.directory / "ca" / "ca-key.pem"

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

    def folder(self, identity: Identity) -> Path:
        return self.directory / identity.folder_name

    def has(self, identity: Identity) -> bool:
        d = self.folder(identity)
        return (d / "cert.pem").is_file() and (d / "key.pem").is_file()

    def issue(
        self,
        identity: Identity,
        *,
        ips: Iterable[str] = (),
        dns: Iterable[str] = (),
        validity_days: int = LEAF_VALIDITY_DAYS,
    ) -> Path:
        """Issue (or re-issue) ``identity``'s certificate and key; returns its folder.

        ``ips`` and ``dns`` make it a server certificate for those names as well; every
        certificate may act as a TLS client.
        """
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
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
        )
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dict.fromkeys(dns)]
        names += [x509.IPAddress(ipaddress.ip_address(a)) for a in dict.fromkeys(ips)]
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        folder = self.folder(identity)
        _write_private(folder / "key.pem", _key_pem(key))
        _write_private(folder / "cert.pem", cert.public_bytes(serialization.Encoding.PEM))
        return folder

    def ensure(
        self, identity: Identity, *, ips: Sequence[str] = (), dns: Sequence[str] = ()
    ) -> Path:
        """Issue ``identity`` unless it already has a certificate covering ``ips``."""
        if self.has(identity) and self._covers(identity, ips):
            return self.folder(identity)
        return self.issue(identity, ips=ips, dns=dns)

    def _covers(self, identity: Identity, ips: Sequence[str]) -> bool:
        if not ips:
            return True
        cert = x509.load_pem_x509_certificate((self.folder(identity) / "cert.pem").read_bytes())
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            return False
        have = {str(a) for a in san.get_values_for_type(x509.IPAddress)}
        return set(ips) <= have

    def load(self, identity: Identity) -> KeyPair:
        if not self.has(identity):
            raise FileNotFoundError(
                f"no certificate for {identity.common_name} in {self.folder(identity)}; "
                f"issue one with `clearingctl pki issue {identity.role.value} {identity.name}`"
            )
        d = self.folder(identity)
        return KeyPair(
            identity,
            (d / "cert.pem").read_bytes(),
            (d / "key.pem").read_bytes(),
            self.ca_cert_path.read_bytes(),
        )

    def identities(self) -> list[tuple[Identity, dt.datetime]]:
        """Every identity issued here, with its certificate's expiry."""
        out = []
        for cert_path in sorted(self.directory.glob("*/cert.pem")):
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            if not cn:
                continue
            ident = Identity.parse(str(cn[0].value))
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
    target: str, pair: KeyPair, options: Sequence[tuple[str, object]] = ()
) -> grpc.Channel:
    return grpc.secure_channel(target, channel_credentials(pair), options=list(options))


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
