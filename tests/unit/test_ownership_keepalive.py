"""The agent's keepalive stream, against a fake gRPC stub: one stream, send times, a cap.

The lease's local deadline is only safe if it counts from when a keepalive was *sent*:
an answer that arrives late must not extend it. These tests pin that wiring in the real
backend (the simulator has its own driver and cannot see it).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from pyetcd import etcdrpc

from clearinghouse.ownership import etcd_backend
from clearinghouse.ownership.node import KEEPALIVE_INFLIGHT_MAX

pytestmark = pytest.mark.unit

INTERVAL_S = 0.02
ANSWER_DELAY_S = 0.15
MEMBER_ID = 0x9394AABACC3E8244


@dataclass
class FakeCall:
    """A LeaseKeepAlive call: reads requests on its own thread, answers after a delay."""

    requests: Iterator[Any]
    delay_s: float | None
    pulled: list[float] = field(default_factory=list)
    answers: queue.Queue[Any] = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        threading.Thread(target=self._consume, daemon=True).start()

    def _consume(self) -> None:
        for request in self.requests:
            self.pulled.append(time.monotonic())
            if self.delay_s is not None:
                timer = threading.Timer(self.delay_s, self.answers.put, [request])
                timer.daemon = True
                timer.start()

    def __iter__(self) -> Iterator[Any]:
        while not self.cancelled.is_set():
            try:
                request = self.answers.get(timeout=0.01)
            except queue.Empty:
                continue
            # As etcd answers: the header names the member that answered.
            yield etcdrpc.LeaseKeepAliveResponse(
                header=etcdrpc.ResponseHeader(member_id=MEMBER_ID), ID=request.ID, TTL=5
            )

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class FakeLeaseStub:
    delay_s: float | None
    calls: list[FakeCall] = field(default_factory=list)

    def LeaseKeepAlive(self, requests: Iterator[Any], **_: Any) -> FakeCall:
        self.calls.append(FakeCall(requests, self.delay_s))
        return self.calls[-1]


def open_stream(stub: FakeLeaseStub, answers: list[tuple[float, float]]) -> Any:
    def on_answer(lease: int, sent_at: float, ttl_s: int) -> None:
        answers.append((sent_at, etcd_backend._clock()))

    return etcd_backend._KeepAliveStream(
        stub,
        0xA,
        interval_s=INTERVAL_S,
        on_answer=on_answer,
        call_kw={},
        name="ownership-keepalive-test",
    )


def wait_until(condition: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_one_stream_carries_every_keepalive_and_answers_count_from_the_send() -> None:
    stub = FakeLeaseStub(delay_s=ANSWER_DELAY_S)
    answers: list[tuple[float, float]] = []
    stream = open_stream(stub, answers)
    assert stream.answered_by == 0  # no answer yet: no member known
    try:
        wait_until(lambda: len(answers) >= 10)
    finally:
        stream.close()
    assert len(stub.calls) == 1
    # The member the stream goes through, from the answers' header.
    assert stream.answered_by == MEMBER_ID
    # Each answer is matched with its own request's send time, a full delay earlier.
    assert all(answered - sent >= ANSWER_DELAY_S * 0.9 for sent, answered in answers)
    sends = [sent for sent, _ in answers]
    assert sends == sorted(sends)


def test_unanswered_keepalives_are_capped_and_close_stops_the_reader() -> None:
    stub = FakeLeaseStub(delay_s=None)  # etcd never answers
    stream = open_stream(stub, [])
    time.sleep(20 * INTERVAL_S)
    stream.close()
    assert len(stub.calls[0].pulled) == KEEPALIVE_INFLIGHT_MAX
    assert not any(t.name == "ownership-keepalive-test" for t in threading.enumerate())
