"""The switch's collector policy: the heap is frozen once a wave of takeovers is over."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from clearinghouse.switch import heap

pytestmark = pytest.mark.unit


@pytest.fixture()
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


class Survivor:
    """A tracked object that lives through the takeovers (as a replayed payment does)."""


def test_the_heap_is_frozen_when_the_last_takeover_of_a_wave_ends(unfrozen: None) -> None:
    h = heap.TakeoverHeap()
    h.started()
    h.started()
    assert gc.get_freeze_count() == 0

    assert h.ended() is False  # another takeover is still replaying
    assert gc.get_freeze_count() == 0
    assert h.ended() is True

    assert gc.get_freeze_count() > 0
    h.started()  # the next wave freezes what it added
    survivors = [Survivor() for _ in range(1000)]
    assert not frozen(survivors)
    assert h.ended() is True
    # Counts alone cannot tell: the wave's collection may free what an earlier one froze.
    assert frozen(survivors)


def frozen(objects: list[object]) -> bool:
    """Whether every one of ``objects`` is in the permanent generation (``gc.freeze``):
    tracked, yet in none of the generations the collector walks."""
    walked = {id(o) for o in gc.get_objects()}
    return all(gc.is_tracked(o) and id(o) not in walked for o in objects)


def test_the_collector_waits_longer_before_walking_young_objects(unfrozen: None) -> None:
    heap.configure_collector()
    assert gc.get_threshold() == (
        heap.GC_YOUNG_ALLOCATIONS,
        heap.GC_MIDDLE_PER_YOUNG_COLLECTIONS,
        heap.GC_OLD_PER_MIDDLE_COLLECTIONS,
    )
