"""Client side of signed payment orders: a gRPC interceptor that signs what it sends.

:class:`OrderSigningInterceptor` signs every unsigned ``PaymentOrder`` of a
``SubmitPayment`` or ``SubmitPayments`` request with its institution's key, so that the
demo, the bench, the drills' load generator and the tests sign without knowing it. The
request message is signed in place (a request built with ``order=o`` holds a copy of
``o``, which stays unsigned). Ed25519 signatures are deterministic, so a retry of the
same order is signed with the same bytes: it is the same signed order, and a replay.

An order that already carries a signature is left alone (a test may send a tampered
one on purpose), and so is an order for whose institution ``key_source`` has no key, or
that is too malformed to have canonical bytes: the switch then refuses it with the
precise reason.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from clearinghouse.domain.errors import ClearingError
from clearinghouse.domain.signing import sign_order
from clearinghouse.switch import convert

KeySource = Callable[[str], Ed25519PrivateKey | None]

# grpc's stubs make the interceptor generic; at run time it is a plain class.
if TYPE_CHECKING:
    _UnaryUnary = grpc.UnaryUnaryClientInterceptor[Any, Any]
else:
    _UnaryUnary = grpc.UnaryUnaryClientInterceptor

_SUBMIT_ONE = "/clearing.v1.PaymentService/SubmitPayment"
_SUBMIT_MANY = "/clearing.v1.PaymentService/SubmitPayments"


def sign_order_pb(order: Any, key: Ed25519PrivateKey) -> None:
    """Set ``order.signature`` and ``order.signing_key_id`` (a clearing.v1.PaymentOrder)."""
    key_id, signature = sign_order(convert.order_from_pb(order), key)
    order.signing_key_id = key_id
    order.signature = signature


def sign_unsigned(orders: Iterable[Any], key_source: KeySource) -> None:
    """Sign each order that has no signature yet and whose institution has a key."""
    for order in orders:
        if order.signature or order.signing_key_id:
            continue
        key = key_source(order.institution_id)
        if key is None:
            continue
        try:
            sign_order_pb(order, key)
        except (ClearingError, AssertionError, ValueError):
            continue  # no canonical bytes: the switch reports the bad field itself


class OrderSigningInterceptor(_UnaryUnary):
    """Signs the orders of PaymentService submissions; see the module docstring.

    ``key_source`` maps a participant id to its Ed25519 private key, or None.
    """

    def __init__(self, key_source: KeySource) -> None:
        self.key_source = key_source

    def intercept_unary_unary(
        self, continuation: Callable[[Any, Any], Any], client_call_details: Any, request: Any
    ) -> Any:
        method = client_call_details.method
        if isinstance(request, bytes | bytearray):
            pass  # already serialized by the caller (a raw-bytes client): sent as it is
        elif method == _SUBMIT_ONE:
            sign_unsigned([request.order], self.key_source)
        elif method == _SUBMIT_MANY:
            sign_unsigned(request.orders, self.key_source)
        return continuation(client_call_details, request)


def signing_channel(channel: grpc.Channel, key_source: KeySource) -> grpc.Channel:
    """``channel`` with an :class:`OrderSigningInterceptor` in front of it."""
    return grpc.intercept_channel(channel, OrderSigningInterceptor(key_source))


__all__ = [
    "KeySource",
    "OrderSigningInterceptor",
    "sign_order_pb",
    "sign_unsigned",
    "signing_channel",
]
