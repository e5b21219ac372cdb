"""Every instrument, created once per meter; the domain helpers the switch calls.

``metrics`` (exported by the package) is one ``DomainMetrics`` for the process. It
records into a no-op meter until ``Telemetry.setup`` binds it to the real one, so
code may call it at import time, in tests, or in tools that never set telemetry up.
Labels take strings or enums (an enum's string value, else its name).

Names (OpenTelemetry; the Prometheus name follows). The process's resource
(service.name, clearing.zone, clearing.city, clearing.node_id) is not repeated on each
series: OTLP sends it with every export, Prometheus gets one ``target_info`` sample.

========================== ========= ============================ ==========================
instrument                 kind      attributes                   Prometheus
========================== ========= ============================ ==========================
clearing.payments.decided  counter   state, type, zone            clearing_payments_decided_total
clearing.batch.size        histogram                              clearing_batch_size
clearing.shards.owned      gauge                                  clearing_shards_owned
clearing.lease.events      counter   kind                         clearing_lease_events_total
clearing.retries           counter   cause                        clearing_retries_total
clearing.rejections        counter   reason                       clearing_rejections_total
clearing.commit.entries    histogram                              clearing_commit_entries
clearing.commit.duration   histogram (s)                          clearing_commit_duration_seconds
rpc.server.duration        histogram rpc.system, rpc.service,     rpc_server_duration_milliseconds
                           (ms)      rpc.method,
                                     rpc.grpc.status_code
rpc.server.requests        counter   (same)                       rpc_server_requests_total
rpc.server.active_requests updown    rpc.system, rpc.service,     rpc_server_active_requests
                                     rpc.method
rpc.client.duration        histogram (as rpc.server.duration)     rpc_client_duration_milliseconds
                           (ms)
rpc.client.requests        counter   (same)                       rpc_client_requests_total
rpc.client.active_requests updown    (as rpc.server.active_...)   rpc_client_active_requests
========================== ========= ============================ ==========================
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable

from opentelemetry.metrics import CallbackOptions, Meter, NoOpMeter, Observation

METER_NAME = "clearinghouse"

# Bucket boundaries, chosen for what each measures.
RPC_DURATION_BUCKETS_MS = (0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
COUNT_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
COMMIT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

Label = str | enum.Enum


def _label(value: Label) -> str:
    if isinstance(value, enum.Enum):
        return value.value if isinstance(value.value, str) else value.name
    return value


class RpcInstruments:
    """The instruments of one side (``server`` or ``client``) of gRPC calls."""

    def __init__(self, meter: Meter, side: str) -> None:
        self.duration_ms = meter.create_histogram(
            f"rpc.{side}.duration",
            unit="ms",
            description=f"Duration of gRPC calls ({side} side), by method and status code",
            explicit_bucket_boundaries_advisory=RPC_DURATION_BUCKETS_MS,
        )
        self.requests = meter.create_counter(
            f"rpc.{side}.requests",
            unit="{request}",
            description=f"Finished gRPC calls ({side} side), by method and status code",
        )
        self.active = meter.create_up_down_counter(
            f"rpc.{side}.active_requests",
            unit="{request}",
            description=f"gRPC calls in progress ({side} side), by method",
        )


class DomainMetrics:
    """Domain measurements, without OpenTelemetry in the caller's code."""

    def __init__(self, meter: Meter | None = None) -> None:
        self._shards_owned: int | None = None
        self._shards_source: Callable[[], int] | None = None
        self.bind(meter or NoOpMeter(METER_NAME))

    def bind(self, meter: Meter) -> None:
        """Create the instruments on ``meter`` (once per meter, never per call)."""
        self._decided = meter.create_counter(
            "clearing.payments.decided",
            unit="{payment}",
            description="Payments that reached a final state, by state, type and zone",
        )
        self._batch = meter.create_histogram(
            "clearing.batch.size",
            unit="{payment}",
            description="Payments per SubmitPayments batch",
            explicit_bucket_boundaries_advisory=COUNT_BUCKETS,
        )
        self._leases = meter.create_counter(
            "clearing.lease.events",
            unit="{event}",
            description="Ownership lease events (renewal, loss, ...), by kind",
        )
        self._retries = meter.create_counter(
            "clearing.retries", unit="{retry}", description="Retries, by cause"
        )
        self._rejections = meter.create_counter(
            "clearing.rejections",
            unit="{payment}",
            description="Payments refused before anything was written, by reason",
        )
        self._commit_entries = meter.create_histogram(
            "clearing.commit.entries",
            unit="{entry}",
            description="Ledger entries per group commit",
            explicit_bucket_boundaries_advisory=COUNT_BUCKETS,
        )
        self._commit_s = meter.create_histogram(
            "clearing.commit.duration",
            unit="s",
            description="Duration of a group commit",
            explicit_bucket_boundaries_advisory=COMMIT_BUCKETS_S,
        )
        meter.create_observable_gauge(
            "clearing.shards.owned",
            callbacks=[self._observe_shards],
            unit="{shard}",
            description="Shards this node owns",
        )

    # -- the helpers -------------------------------------------------------------------

    def payment_decided(self, state: Label, payment_type: Label, zone: str) -> None:
        self._decided.add(1, {"state": _label(state), "type": _label(payment_type), "zone": zone})

    def batch_size(self, n: int) -> None:
        self._batch.record(n)

    def shards_owned(self, n: int) -> None:
        """The number of shards owned now; read when metrics are collected."""
        self._shards_owned = n

    def shards_owned_from(self, source: Callable[[], int] | None) -> None:
        """Or: a function called at each collection (replaces ``shards_owned`` values)."""
        self._shards_source = source

    def lease_event(self, kind: Label) -> None:
        """``renewal``, ``loss``, ``claim``, ... of an ownership lease."""
        self._leases.add(1, {"kind": _label(kind)})

    def retry(self, cause: Label) -> None:
        self._retries.add(1, {"cause": _label(cause)})

    def rejection(self, reason: Label) -> None:
        self._rejections.add(1, {"reason": _label(reason)})

    def commit(self, entries: int, seconds: float) -> None:
        """One group commit of ``entries`` ledger entries that took ``seconds``."""
        self._commit_entries.record(entries)
        self._commit_s.record(seconds)

    def _observe_shards(self, options: CallbackOptions) -> Iterable[Observation]:
        source = self._shards_source
        value = source() if source is not None else self._shards_owned
        return [] if value is None else [Observation(value)]

    def reset(self) -> None:
        """Forget the gauge's value and source (between tests)."""
        self._shards_owned = None
        self._shards_source = None


metrics = DomainMetrics()
