"""SettlementService's operator calls: a settlement is confirmed once, with a reference
that auditors can read back; a bad request writes nothing."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from clearing.v1 import audit_pb2, settlement_pb2
from clearinghouse.storage.windows import CassandraWindows, WindowEvent
from clearinghouse.switch.servicers import (
    WINDOW_TEXT_CHARS_MAX,
    SettlementServicer,
    _window_summary,
)
from tests.fakes import Aborted, FakeClock, FakeCqlSession, FakeServicerContext, fake_windows

pytestmark = pytest.mark.unit


class World:
    def __init__(self) -> None:
        self.session = FakeCqlSession()
        self.windows: CassandraWindows = fake_windows(self.session)
        self.clock = FakeClock()
        self.servicer = SettlementServicer(self.windows, "beijing-a", self.clock)

    def cleared(self, window_id: int) -> None:
        for event in (WindowEvent.CLOSING, WindowEvent.CLOSED, WindowEvent.CLEARED):
            assert self.windows.record(window_id, event, self.clock(), "beijing-a", "")

    def settle(self, window_id: int, reference: str) -> Any:
        request = settlement_pb2.ConfirmSettlementRequest(window_id=window_id, reference=reference)
        return self.servicer.ConfirmSettlement(request, FakeServicerContext())

    def refused(self, window_id: int, reference: str) -> tuple[str, str, list[str]]:
        ctx = FakeServicerContext()
        request = settlement_pb2.ConfirmSettlementRequest(window_id=window_id, reference=reference)
        with pytest.raises(Aborted):
            self.servicer.ConfirmSettlement(request, ctx)
        assert ctx.code is not None and ctx.error is not None
        return ctx.code.name, ctx.error.reason, [v.field for v in ctx.error.field_violations]

    def rows(self) -> Any:
        return {k: dict(v) for k, v in self.session.tables["settlement_windows"].items()}


@pytest.fixture
def world() -> World:
    return World()


def test_a_settlement_is_confirmed_once_and_its_reference_is_shown(world: World) -> None:
    world.cleared(1)
    assert world.settle(1, "RTGS-2026-12-03-0001").confirmed_now is True
    assert world.settle(1, "RTGS-2026-12-03-0001").confirmed_now is False  # a retry
    status = world.windows.status(1)
    assert status.state == "SETTLED"
    summary = _window_summary(status)  # what ListWindows and GetWindow answer
    assert isinstance(summary, audit_pb2.WindowSummary)
    assert summary.settlement_reference == "RTGS-2026-12-03-0001"


def test_another_reference_for_a_settled_window_is_already_exists(world: World) -> None:
    world.cleared(1)
    world.settle(1, "RTGS-A")
    before = world.rows()
    code, reason, _ = world.refused(1, "RTGS-B")
    assert (code, reason) == ("ALREADY_EXISTS", "SETTLEMENT_ALREADY_CONFIRMED")
    assert world.rows() == before


@pytest.mark.parametrize(
    "reference",
    ["", "   ", "x" * (WINDOW_TEXT_CHARS_MAX + 1), "RTGS\n1", "RTGS\x00"],
    ids=["empty", "blank", "too-long", "newline", "nul"],
)
def test_a_bad_reference_is_invalid_argument_and_writes_nothing(
    world: World, reference: str
) -> None:
    # An empty reference settled the window for good; a long one was cut silently.
    world.cleared(1)
    before = world.rows()
    assert world.refused(1, reference) == ("INVALID_ARGUMENT", "INVALID_ARGUMENT", ["reference"])
    assert world.rows() == before
    assert world.windows.status(1).state == "CLEARED"


def test_settling_a_window_that_does_not_exist_is_not_found(world: World) -> None:
    world.cleared(1)
    assert world.refused(99, "RTGS-1")[0] == "NOT_FOUND"  # it said "window 99 is OPEN"
    assert world.refused(2, "RTGS-1")[:2] == ("FAILED_PRECONDITION", "WINDOW_NOT_CLEARED")


def test_a_close_reason_over_the_limit_is_refused_not_cut(world: World) -> None:
    ctx = FakeServicerContext()
    request = settlement_pb2.CloseWindowRequest(reason="r" * (WINDOW_TEXT_CHARS_MAX + 1))
    with pytest.raises(Aborted):
        world.servicer.CloseWindow(request, ctx)
    assert ctx.code is grpc.StatusCode.INVALID_ARGUMENT
    assert world.rows() == {}
    ok = world.servicer.CloseWindow(settlement_pb2.CloseWindowRequest(reason="end of day"), ctx)
    assert (ok.window_id, ok.requested_now) == (1, True)
