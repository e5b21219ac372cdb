"""Routing: the node that receives a request sends each payment to its shard's owner.

The receiving node looks the owner of each payment's shard up in its ownership map (kept
by watching etcd: no etcd read per payment), processes what it owns itself and forwards
the rest over ``clearing.v1.ShardService``, one call per owner and batch. A stale map is
corrected by the owner's answer: ``NOT_SHARD_OWNER`` sends the payment round again once
the map moved on. While a shard has no owner (its owner died and its lease has not run
out yet, or the new owner is rebuilding), the request waits up to :data:`OWNER_WAIT_S`;
after that the answer is UNAVAILABLE with retry advice, and the client retries with the
same id, which is always safe.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from clearing.v1 import payment_pb2, shard_pb2, shard_pb2_grpc
from clearinghouse import telemetry
from clearinghouse._invariant import invariant
from clearinghouse.client import error_details
from clearinghouse.domain import (
    ClearingError,
    DeadlineExceeded,
    FailedPrecondition,
    InsufficientLiquidity,
    NotFound,
    PaymentOrder,
    Unavailable,
)
from clearinghouse.ownership.node import LEASE_TTL_S
from clearinghouse.security import pki
from clearinghouse.switch import convert
from clearinghouse.switch.processor import PaymentProcessor
from clearinghouse.switch.records import shard_of
from clearinghouse.switch.shards import ReceivedBefore, ShardedStore, home_shard

log = logging.getLogger(__name__)

# Rounds of routing one payment; the time bound (OWNER_WAIT_S, the caller's deadline)
# usually ends it first.
FORWARD_ATTEMPTS = 12
# An owner that said it does not serve a shard is asked again after this long if the map
# still names it (a claim is visible in etcd slightly before its owner has registered it).
STALE_OWNER_WAIT_S = 0.5
OWNER_UNREACHABLE = "SHARD_OWNER_UNREACHABLE"
# A dead owner's shards are claimed again once its lease runs out (TTL) and the new
# owner rebuilt them; a request waits that long, and a little more, for an owner.
OWNER_WAIT_S = LEASE_TTL_S + 4.0
OWNER_POLL_S = 0.05
# A forwarded payment may take the whole decision bound (20 s) and a commit.
FORWARD_DEADLINE_S = 28.0
GET_DEADLINE_S = 5.0
LEND_DEADLINE_S = 5.0
# Giving headroom back is not urgent (a home shard that did not take it is asked again
# later, from the window keeper's returns thread): an attempt at a remote owner, lookup
# included, is bounded.
REPAY_WAIT_S = 2.0
NO_OWNER_RETRY_AFTER_MS = 1000


@dataclass(frozen=True, slots=True)
class OwnerRef:
    node_id: str
    address: str
    # The owner's zone: the hop accepts only the certificate ``node:<zone>`` there.
    zone: str


class OwnerMap(Protocol):
    def owner_of(self, shard: int) -> Any:  # with node_id, address and zone; or None
        ...

    def ownership_doubt(self) -> str | None:  # why the map cannot be trusted now
        ...


class LocalOwner:
    """The owner's side: processes orders and reads payments of shards owned here."""

    def __init__(self, processor: PaymentProcessor) -> None:
        self.processor = processor

    def submit(self, orders: Sequence[Any], paths: Sequence[str], received_zone: str) -> list[Any]:
        """One PaymentResult per order: the orders are processed together (their intents
        and decisions share group commits, their transfers one call per bank)."""
        results: list[Any] = [None] * len(orders)
        todo: list[int] = []
        domain: list[PaymentOrder] = []
        for i, (order_pb, path) in enumerate(zip(orders, paths, strict=True)):
            try:
                domain.append(convert.order_from_pb(order_pb, path))
                todo.append(i)
            except ClearingError as e:
                results[i] = _error_result(order_pb.payment_id, e)
        done = self.submit_orders(domain, [paths[i] for i in todo], received_zone)
        for i, r in zip(todo, done, strict=True):
            results[i] = r
        return results

    def submit_orders(
        self, orders: Sequence[PaymentOrder], paths: Sequence[str], received_zone: str
    ) -> list[Any]:
        """:meth:`submit` of orders already converted (and admitted, by the owner)."""
        done = self.processor.submit_many(orders, received_zone, paths)
        return [
            _error_result(o.payment_id, out)
            if isinstance(out, ClearingError)
            else payment_pb2.PaymentResult(
                payment_id=o.payment_id,
                payment=convert.payment_to_pb(out.record),
                replayed=out.replayed,
            )
            for o, out in zip(orders, done, strict=True)
        ]

    def _shards(self) -> ShardedStore:
        store = self.processor.store
        invariant(isinstance(store, ShardedStore), "cap headroom needs the shard owner's store")
        assert isinstance(store, ShardedStore)
        return store

    def lend(
        self,
        participant_id: str,
        currency: str,
        for_shard: int,
        need_minor: int,
        for_epoch: int = 0,
    ) -> int:
        return self._shards().lend(participant_id, currency, for_shard, need_minor, for_epoch)

    def repay(
        self,
        participant_id: str,
        currency: str,
        from_shard: int,
        returned_total_minor: int,
        received: ReceivedBefore | None = None,
    ) -> int:
        return self._shards().repay(participant_id, currency, from_shard, returned_total_minor,
                                    received)  # fmt: skip

    def get(self, refs: Sequence[tuple[str, str]]) -> list[Any]:
        out = []
        for institution_id, payment_id in refs:
            try:
                rec = self.processor.store.load(institution_id, payment_id)
                if rec is None:
                    raise NotFound.payment(institution_id, payment_id)
                out.append(
                    payment_pb2.PaymentResult(
                        payment_id=payment_id, payment=convert.payment_to_pb(rec)
                    )
                )
            except ClearingError as e:
                out.append(
                    payment_pb2.PaymentResult(payment_id=payment_id, error=convert.error_to_pb(e))
                )
        return out


def _error_result(payment_id: str, err: ClearingError) -> Any:
    return payment_pb2.PaymentResult(payment_id=payment_id, error=convert.error_to_pb(err))


# Final answers that mean "the map named no owner that would take it".
ROUTING_MISSES = frozenset({"NO_SHARD_OWNER", Unavailable.NOT_SHARD_OWNER, OWNER_UNREACHABLE})


def _no_owner(shard: int) -> Unavailable:
    return Unavailable(
        f"shard {shard} has no owner yet (failover in progress); retry with the same id",
        retry_after_ms=NO_OWNER_RETRY_AFTER_MS,
        reason="NO_SHARD_OWNER",
    )


def _not_sent() -> DeadlineExceeded:
    return DeadlineExceeded(
        "the call's deadline passed before the order was routed; nothing was recorded for "
        "it: retry with the same id and a longer deadline"
    )


class Router:
    """Sends payments to their shards' owners; see the module docstring."""

    def __init__(
        self,
        *,
        node_id: str,
        zone: str,
        owners: OwnerMap,
        local: LocalOwner,
        pool: ThreadPoolExecutor,
        credentials: grpc.ChannelCredentials,
        channel_options: Sequence[tuple[str, Any]] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.node_id = node_id
        self.zone = zone
        self.owners = owners
        self.local = local
        self.pool = pool
        self.channel_options = list(channel_options)
        self.credentials = credentials
        self.clock = clock
        self._stubs: dict[
            tuple[str, str], tuple[grpc.Channel, shard_pb2_grpc.ShardServiceStub]
        ] = {}
        self._stubs_lock = threading.Lock()
        self.forwarded = 0
        self.local_count = 0

    def close(self) -> None:
        with self._stubs_lock:
            for channel, _ in self._stubs.values():
                channel.close()
            self._stubs.clear()

    def _stub(self, owner: OwnerRef) -> shard_pb2_grpc.ShardServiceStub:
        """A stub to ``owner`` that accepts only the certificate ``node:<its zone>``: a
        server at that address with any other certificate (another node's after a
        restart elsewhere, a bank's) fails the handshake, UNAVAILABLE."""
        key = (owner.address, owner.zone)
        with self._stubs_lock:
            if key not in self._stubs:
                channel = grpc.secure_channel(
                    owner.address,
                    self.credentials,
                    options=[*self.channel_options, *pki.expect_server(pki.node(owner.zone))],
                )
                tel = telemetry.current()
                if tel is not None:
                    channel = tel.intercept_channel(channel)  # the trace crosses the hop
                self._stubs[key] = (channel, shard_pb2_grpc.ShardServiceStub(channel))
            return self._stubs[key][1]

    # -- owners -------------------------------------------------------------------------

    def _owner(
        self, shard: int, avoid: tuple[OwnerRef, bool] | None, until: float
    ) -> OwnerRef | None:
        """The shard's owner, waiting (bounded by ``until``) while there is none.

        ``avoid`` is an owner that just failed, and whether it was unreachable: then wait
        for the map to name another (its lease must run out); if it answered that it does
        not serve the shard, only for :data:`STALE_OWNER_WAIT_S` (its ownership may be
        just starting)."""
        avoided, unreachable = avoid if avoid is not None else (None, False)
        avoid_until = until if unreachable else self.clock() + STALE_OWNER_WAIT_S
        while True:
            o = self.owners.owner_of(shard)
            if o is not None:
                ref = OwnerRef(o.node_id, o.address, o.zone)
                if ref != avoided or self.clock() >= avoid_until:
                    return ref
            if self.clock() >= until:
                return None
            time.sleep(OWNER_POLL_S)

    # -- submit -------------------------------------------------------------------------

    def submit(self, orders: Sequence[Any], paths: Sequence[str], deadline_s: float) -> list[Any]:
        """One PaymentResult per order, in order."""
        until = self.clock() + min(deadline_s, FORWARD_DEADLINE_S)
        results: list[Any] = [None] * len(orders)
        todo = list(range(len(orders)))
        avoid: dict[int, tuple[OwnerRef, bool]] = {}
        for _attempt in range(FORWARD_ATTEMPTS):
            if not todo or self.clock() >= until:
                break
            groups: dict[OwnerRef, list[int]] = defaultdict(list)
            wait_until = min(until, self.clock() + OWNER_WAIT_S)
            for i in todo:
                o = orders[i]
                shard = shard_of(o.institution_id, o.payment_id)
                owner = self._owner(shard, avoid.get(i), wait_until)
                if owner is None:
                    results[i] = _error_result(o.payment_id, _no_owner(shard))
                else:
                    groups[owner].append(i)
            answers = self._send_all(groups, orders, paths, until)
            todo = []
            for owner, answer in answers.items():
                idx = groups[owner]
                for i, r in zip(idx, answer, strict=True):
                    reason = r.error.reason if r.HasField("error") else ""
                    if reason in (
                        Unavailable.NOT_SHARD_OWNER,
                        Unavailable.OWNERSHIP_UNCONFIRMED,
                        OWNER_UNREACHABLE,
                    ):
                        telemetry.metrics.retry(f"route.{reason}")
                        todo.append(i)
                        avoid[i] = (owner, reason == OWNER_UNREACHABLE)
                    results[i] = r
            if todo:
                time.sleep(OWNER_POLL_S)
        for i, r in enumerate(results):
            if r is None:  # the call's time ran out before this order was ever sent
                results[i] = _error_result(orders[i].payment_id, _not_sent())
            elif r.HasField("error") and r.error.reason in ROUTING_MISSES:
                results[i] = self._explained(r)
        return results

    def _explained(self, r: Any) -> Any:
        """A routing miss (no owner, or owners that disown the shard) while this node
        cannot reach etcd is etcd's trouble, not a map about to settle: said so."""
        doubt = self.owners.ownership_doubt()
        if doubt is None:
            return r
        return _error_result(r.payment_id, Unavailable(
            f"{doubt}: no shard's owner can be confirmed until etcd has a quorum again "
            f"({r.error.reason}); nothing was recorded: retry with the same id",
            retry_after_ms=NO_OWNER_RETRY_AFTER_MS,
            reason=Unavailable.OWNERSHIP_UNCONFIRMED,
        ))  # fmt: skip

    def _send_all(
        self,
        groups: dict[OwnerRef, list[int]],
        orders: Sequence[Any],
        paths: Sequence[str],
        until: float,
    ) -> dict[OwnerRef, list[Any]]:
        """Each owner's results: one owner (a single payment, a batch of one shard's
        owner) on this thread, several concurrently in the pool."""
        if len(groups) == 1:
            ((owner, idx),) = groups.items()
            return {owner: self._send(owner, orders, paths, idx, until)}
        futures: dict[OwnerRef, Future[list[Any]]] = {
            owner: self.pool.submit(
                telemetry.bind_context(self._send), owner, orders, paths, idx, until
            )
            for owner, idx in groups.items()
        }
        return {owner: fut.result() for owner, fut in futures.items()}

    def _send(
        self,
        owner: OwnerRef,
        orders: Sequence[Any],
        paths: Sequence[str],
        idx: list[int],
        until: float,
    ) -> list[Any]:
        batch = [orders[i] for i in idx]
        batch_paths = [paths[i] for i in idx]
        if owner.node_id == self.node_id:
            self.local_count += len(batch)
            return self.local.submit(batch, batch_paths, self.zone)
        self.forwarded += len(batch)
        request = shard_pb2.SubmitOwnedRequest(
            orders=batch, paths=batch_paths, received_zone=self.zone
        )
        try:
            response = self._stub(owner).SubmitOwned(
                request, timeout=max(0.1, until - self.clock())
            )
            return list(response.results)
        except grpc.RpcError as e:
            return [self._forward_failed(owner, o.payment_id, e) for o in batch]

    def _forward_failed(self, owner: OwnerRef, payment_id: str, e: grpc.RpcError) -> Any:
        code = e.code() if isinstance(e, grpc.Call) else grpc.StatusCode.UNKNOWN
        if code is grpc.StatusCode.UNAVAILABLE:
            # The owner is unreachable (dead, or not serving yet): route again once the
            # map names another owner. Nothing was processed there.
            return _error_result(
                payment_id,
                Unavailable(
                    f"shard owner {owner.node_id} unreachable",
                    retry_after_ms=NO_OWNER_RETRY_AFTER_MS,
                    reason=OWNER_UNREACHABLE,
                ),
            )
        log.warning("forwarding to %s failed: %s", owner.node_id, code)
        return _error_result(
            payment_id,
            Unavailable(
                f"shard owner {owner.node_id} did not answer in time ({code.name}); the "
                "outcome is unknown: retry with the same id",
                retry_after_ms=NO_OWNER_RETRY_AFTER_MS,
                reason="SHARD_OWNER_TIMEOUT",
            ),
        )

    # -- cap headroom -------------------------------------------------------------------

    def borrow(
        self,
        participant_id: str,
        currency: str,
        for_shard: int,
        need_minor: int,
        for_epoch: int = 0,
        /,
    ) -> int:
        """Cap headroom from the owner of the participant's home shard (see shards.py)."""
        request = shard_pb2.LendRequest(
            participant_id=participant_id, currency=currency, for_shard=for_shard,
            need_minor=need_minor, for_epoch=for_epoch,
        )  # fmt: skip

        def refused(reason: str) -> ClearingError:
            return InsufficientLiquidity(
                f"{participant_id} would exceed its net debit cap in {currency}",
                reason=reason or InsufficientLiquidity.NET_DEBIT_CAP_EXCEEDED,
            )

        return self._at_home(
            request, "lend", self.clock() + OWNER_WAIT_S, refused,
            local=lambda: self.local.lend(participant_id, currency, for_shard, need_minor,
                                          for_epoch),
            remote=lambda stub, _left_s: int(
                stub.Lend(request, timeout=LEND_DEADLINE_S).granted_minor
            ),
        )  # fmt: skip

    def repay(
        self,
        participant_id: str,
        currency: str,
        from_shard: int,
        returned_total_minor: int,
        received: ReceivedBefore | None = None,
        /,
    ) -> int:
        """Give headroom back to the owner of the participant's home shard, and tell it
        the loans received at earlier epochs; the total it has taken back from
        ``from_shard`` (see shards.py, ``give_back`` and ``repay``)."""
        request = shard_pb2.RepayRequest(
            participant_id=participant_id, currency=currency, from_shard=from_shard,
            returned_total_minor=returned_total_minor,
            borrower_epoch=received.epoch if received is not None else 0,
            received_before_epoch_minor=received.amount_minor if received is not None else 0,
        )  # fmt: skip

        def refused(reason: str) -> ClearingError:
            return FailedPrecondition(
                f"the owner of {participant_id}'s cap in {currency} refused shard "
                f"{from_shard}'s headroom",
                reason=reason,
            )

        return self._at_home(
            request, "take headroom back", self.clock() + REPAY_WAIT_S, refused,
            local=lambda: self.local.repay(
                participant_id, currency, from_shard, returned_total_minor, received
            ),
            remote=lambda stub, left_s: int(
                stub.Repay(request, timeout=left_s).repaid_total_minor
            ),
        )  # fmt: skip

    def _at_home(
        self,
        request: Any,
        what: str,
        until: float,
        refused: Callable[[str], ClearingError],
        *,
        local: Callable[[], int],
        remote: Callable[[Any, float], int],
    ) -> int:
        """Call the owner of ``request``'s participant's home shard (this node's own store
        when it is the owner), asking the next owner when one is dead or was not the
        owner, until ``until``. FAILED_PRECONDITION is ``refused(reason)``."""
        home = home_shard(request.participant_id, request.currency)
        avoid: tuple[OwnerRef, bool] | None = None
        for _ in range(FORWARD_ATTEMPTS):
            owner = self._owner(home, avoid, until)
            left_s = until - self.clock()
            if owner is None or left_s <= 0:
                raise _no_owner(home)
            if owner.node_id == self.node_id:
                return local()
            try:
                return remote(self._stub(owner), left_s)
            except grpc.RpcError as e:
                code = e.code() if isinstance(e, grpc.Call) else grpc.StatusCode.UNKNOWN
                err = error_details(e)
                reason = err.reason if err is not None else ""
                if code is grpc.StatusCode.FAILED_PRECONDITION:
                    raise refused(reason) from e
                if code is grpc.StatusCode.UNAVAILABLE and (
                    reason in ("", Unavailable.NOT_SHARD_OWNER, Unavailable.OWNERSHIP_UNCONFIRMED)
                ):
                    avoid = (owner, reason == "")  # dead owner or stale map: ask the next
                    continue
                raise Unavailable(
                    f"the owner of {request.participant_id}'s cap ({owner.node_id}) did not "
                    f"{what}: {code.name} {reason}",
                    retry_after_ms=NO_OWNER_RETRY_AFTER_MS,
                    reason="CAP_LENDER_UNAVAILABLE",
                ) from e
        raise _no_owner(home)

    # -- reads --------------------------------------------------------------------------

    def get(self, refs: Sequence[tuple[str, str]]) -> list[Any]:
        """One PaymentResult per (institution_id, payment_id), from the shards' owners."""
        until = self.clock() + OWNER_WAIT_S
        results: list[Any] = [None] * len(refs)
        groups: dict[OwnerRef, list[int]] = defaultdict(list)
        for i, (inst, pid) in enumerate(refs):
            shard = shard_of(inst, pid)
            owner = self._owner(shard, None, until)
            if owner is None:
                results[i] = _error_result(pid, _no_owner(shard))
            else:
                groups[owner].append(i)
        futures = {
            owner: self.pool.submit(
                telemetry.bind_context(self._get_from), owner, [refs[i] for i in idx]
            )
            for owner, idx in groups.items()
        }
        for owner, fut in futures.items():
            for i, r in zip(groups[owner], fut.result(), strict=True):
                results[i] = r
        return results

    def _get_from(self, owner: OwnerRef, refs: list[tuple[str, str]]) -> list[Any]:
        if owner.node_id == self.node_id:
            return self.local.get(refs)
        request = shard_pb2.GetOwnedRequest(
            refs=[shard_pb2.PaymentRef(institution_id=i, payment_id=p) for i, p in refs]
        )
        try:
            return list(self._stub(owner).GetOwned(request, timeout=GET_DEADLINE_S).results)
        except grpc.RpcError as e:
            return [self._forward_failed(owner, p, e) for _, p in refs]


__all__ = ["FORWARD_DEADLINE_S", "OWNER_WAIT_S", "LocalOwner", "OwnerRef", "Router"]
