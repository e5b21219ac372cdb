"""A participant's or operator's view of the switch: authenticated stubs to any zone's node.

Every connection is TLS with a client certificate; the certificate is the caller's
identity, and the switch authorizes each call by it (see
:mod:`clearinghouse.security.authz`). A :class:`SwitchClient` holds one channel per
identity it acts as:

- ``channel`` and ``admin``: the operator's (or the identity given to ``connect``);
- ``payments``: a PaymentService stub that calls as the institution each request is for.
  The demo, the load generators and the tests act for several institutions at once; a
  real participant's client holds only its own certificate, and ``payments_as`` is what
  it uses.

Every channel also names the server it means: a switch node's certificate,
``node:<zone>`` of the zone dialled (:func:`pki.expect_server`), so a bank's or a
participant's certificate on that address is refused during the handshake.

Certificates come from the local CA (:mod:`clearinghouse.security.pki`); with the CA's key
at hand (the local cluster), a missing or outdated one is issued on first use. Every call
carries a deadline.
"""

from __future__ import annotations

import socket
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from clearing.v1 import admin_pb2_grpc, common_pb2, payment_pb2, payment_pb2_grpc
from clearinghouse.domain.errors import ERROR_METADATA_KEY
from clearinghouse.order_signing import signing_channel
from clearinghouse.security import pki
from clearinghouse.security.identity import Identity, Role
from clearinghouse.signing_keys import default_store
from clearinghouse.topology import Topology, Zone

# A payment is decided within 20 s of receipt; a client waits a little longer.
CALL_DEADLINE_S = 30.0


class Credentials:
    """Key pairs by identity from a CA folder; issues missing ones when ``issue`` is on."""

    def __init__(self, directory: Path | None = None, *, issue: bool = True) -> None:
        self.ca = pki.LocalCA(directory or pki.default_directory())
        self.issue = issue
        self._cache: dict[Identity, pki.KeyPair] = {}
        self._lock = threading.Lock()

    def keys(self, identity: Identity) -> pki.KeyPair:
        with self._lock:
            pair = self._cache.get(identity)
            if pair is None:
                if self.issue:
                    self.ca.ensure(identity)  # issues a missing or outdated certificate
                pair = self.ca.load(identity)
                self._cache[identity] = pair
            return pair

    def channel(
        self,
        target: str,
        identity: Identity,
        options: Iterable[tuple[str, Any]] = (),
        *,
        server: Identity,
    ) -> grpc.Channel:
        """A channel to ``target`` as ``identity`` that accepts only ``server``'s
        certificate (for a switch node: ``pki.node(<zone>)``)."""
        return pki.secure_channel(target, self.keys(identity), list(options), server=server)


_DEFAULT_CREDENTIALS: Credentials | None = None
_DEFAULT_LOCK = threading.Lock()


def local_credentials() -> Credentials:
    """The local cluster's CA (``CLEARING_PKI_DIR`` or ``.state/pki``), shared per process."""
    global _DEFAULT_CREDENTIALS  # noqa: PLW0603 (one cache per process)
    with _DEFAULT_LOCK:
        if _DEFAULT_CREDENTIALS is None:
            _DEFAULT_CREDENTIALS = Credentials()
        return _DEFAULT_CREDENTIALS


def institution(participant_id: str) -> Identity:
    return Identity(Role.INSTITUTION, participant_id)


def _signing(channel: grpc.Channel, identity: Identity) -> grpc.Channel:
    """``channel`` signing the orders of ``identity`` (an institution) with its key from
    the key store (order_signing.py); an order naming anyone else is sent as it is."""
    store = default_store()

    def key_of(participant_id: str) -> Any:
        return store.existing(participant_id) if participant_id == identity.name else None

    return signing_channel(channel, key_of)


class _ActingPayments:
    """PaymentService calls, each made as the institution its request names."""

    def __init__(self, client: SwitchClient) -> None:
        self._client = client

    def _stub(self, institution_id: str) -> payment_pb2_grpc.PaymentServiceStub:
        return self._client.payments_as(institution_id)

    def SubmitPayment(
        self, request: payment_pb2.SubmitPaymentRequest, **kw: Any
    ) -> payment_pb2.SubmitPaymentResponse:
        return self._stub(request.order.institution_id).SubmitPayment(request, **kw)

    def SubmitPayments(
        self, request: payment_pb2.SubmitPaymentsRequest, **kw: Any
    ) -> payment_pb2.SubmitPaymentsResponse:
        inst = request.orders[0].institution_id if request.orders else ""
        return self._stub(inst).SubmitPayments(request, **kw)

    def GetPayment(
        self, request: payment_pb2.GetPaymentRequest, **kw: Any
    ) -> payment_pb2.GetPaymentResponse:
        return self._stub(request.institution_id).GetPayment(request, **kw)

    def ListPayments(
        self, request: payment_pb2.ListPaymentsRequest, **kw: Any
    ) -> payment_pb2.ListPaymentsResponse:
        return self._stub(request.institution_id).ListPayments(request, **kw)


# How long the command line waits for a zone's switch port to accept a connection
# before it asks the next zone's node (each node answers the same).
ZONE_PROBE_TIMEOUT_S = 0.5


def answering_zone(topo: Topology, asked: str | None) -> Zone:
    """The zone whose switch node a command asks: ``asked`` if given; else the first zone,
    in the topology's order, whose node accepts a connection (with a city down, the
    commands go on through another city; a note on stderr says so); else the first."""
    if asked:
        return topo.zone(asked)
    skipped: list[str] = []
    for z in topo.zones:
        try:
            with socket.create_connection((z.address, z.ports.switch), ZONE_PROBE_TIMEOUT_S):
                pass
        except OSError:
            skipped.append(z.name)
            continue
        if skipped:
            print(f"clearingctl: the switch node of {', '.join(skipped)} does not answer; "
                  f"asking {z.name}'s (any zone's node answers the same; --zone picks "
                  "one)", file=sys.stderr)  # fmt: skip
        return z
    return topo.zones[0]


@dataclass
class SwitchClient:
    zone: str
    target: str
    credentials: Credentials
    identity: Identity
    channel: grpc.Channel
    admin: admin_pb2_grpc.AdminServiceStub
    options: tuple[tuple[str, Any], ...] = ()
    _channels: dict[Identity, grpc.Channel] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def connect(
        cls,
        topo: Topology,
        zone: str,
        *,
        identity: Identity | None = None,
        credentials: Credentials | None = None,
        options: Iterable[tuple[str, Any]] = (),
    ) -> SwitchClient:
        z = topo.zone(zone)
        creds = credentials or local_credentials()
        ident = identity or pki.operator()
        target = f"{z.address}:{z.ports.switch}"
        opts = tuple(options)
        channel = creds.channel(target, ident, opts, server=pki.node(z.name))
        if ident.role is Role.INSTITUTION:
            channel = _signing(channel, ident)
        client = cls(
            zone, target, creds, ident, channel, admin_pb2_grpc.AdminServiceStub(channel), opts
        )
        client._channels[ident] = channel
        return client

    def channel_as(self, identity: Identity) -> grpc.Channel:
        with self._lock:
            ch = self._channels.get(identity)
            if ch is None:
                ch = self.credentials.channel(
                    self.target, identity, self.options, server=pki.node(self.zone)
                )
                if identity.role is Role.INSTITUTION:
                    ch = _signing(ch, identity)
                self._channels[identity] = ch
            return ch

    def payments_as(self, institution_id: str) -> payment_pb2_grpc.PaymentServiceStub:
        return payment_pb2_grpc.PaymentServiceStub(self.channel_as(institution(institution_id)))

    @property
    def payments(self) -> _ActingPayments:
        return _ActingPayments(self)

    def close(self) -> None:
        with self._lock:
            for ch in self._channels.values():
                ch.close()
            self._channels.clear()


def error_details(e: grpc.RpcError) -> common_pb2.Error | None:
    """The ``clearing.v1.Error`` a failed call carried, if any."""
    trailers: Any = e.trailing_metadata() if isinstance(e, grpc.Call) else None
    for key, value in trailers or ():
        if key == ERROR_METADATA_KEY:
            err = common_pb2.Error()
            err.ParseFromString(value)
            return err
    return None
