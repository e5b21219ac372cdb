"""A participant's or operator's view of the switch: stubs to any zone's node.

Used by ``clearingctl demo``, the load generator and the tests. Every call carries a
deadline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc

from clearing.v1 import admin_pb2_grpc, common_pb2, payment_pb2_grpc
from clearinghouse.domain.errors import ERROR_METADATA_KEY
from clearinghouse.order_signing import signing_channel
from clearinghouse.signing_keys import default_store
from clearinghouse.topology import Topology

# A payment is decided within 20 s of receipt; a client waits a little longer.
CALL_DEADLINE_S = 30.0


@dataclass
class SwitchClient:
    zone: str
    channel: grpc.Channel
    payments: payment_pb2_grpc.PaymentServiceStub
    admin: admin_pb2_grpc.AdminServiceStub

    @classmethod
    def connect(cls, topo: Topology, zone: str) -> SwitchClient:
        z = topo.zone(zone)
        channel = grpc.insecure_channel(f"{z.address}:{z.ports.switch}")
        # Orders are signed with the institution's key from .state/pki (order_signing.py).
        channel = signing_channel(channel, default_store().existing)
        return cls(
            zone,
            channel,
            payment_pb2_grpc.PaymentServiceStub(channel),
            admin_pb2_grpc.AdminServiceStub(channel),
        )

    def close(self) -> None:
        self.channel.close()


def error_details(e: grpc.RpcError) -> common_pb2.Error | None:
    """The ``clearing.v1.Error`` a failed call carried, if any."""
    trailers: Any = e.trailing_metadata() if isinstance(e, grpc.Call) else None
    for key, value in trailers or ():
        if key == ERROR_METADATA_KEY:
            err = common_pb2.Error()
            err.ParseFromString(value)
            return err
    return None
