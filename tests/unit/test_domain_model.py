"""Payment states and their transitions; immutability of participants and orders."""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from clearinghouse.domain.model import (
    ALLOWED_TRANSITIONS,
    Participant,
    ParticipantKind,
    ParticipantStatus,
    PaymentState,
)

pytestmark = pytest.mark.unit

S = PaymentState
# The transitions the switch allows without a reversal, written out independently.
ORDINARY = {
    (S.RECEIVED, S.ROUTED),
    (S.RECEIVED, S.FAILED),
    (S.ROUTED, S.APPROVED),
    (S.ROUTED, S.DECLINED),
    (S.ROUTED, S.FAILED),
    (S.ROUTED, S.REVERSED),
}


@pytest.mark.parametrize(("src", "dst"), list(itertools.product(S, S)))
def test_transitions_without_reversal(src: PaymentState, dst: PaymentState) -> None:
    assert src.can_transition_to(dst) == ((src, dst) in ORDINARY)


@pytest.mark.parametrize(("src", "dst"), list(itertools.product(S, S)))
def test_transitions_via_reversal(src: PaymentState, dst: PaymentState) -> None:
    expected = (src, dst) in ORDINARY | {(S.APPROVED, S.REVERSED)}
    assert src.can_transition_to(dst, via_reversal=True) == expected


def test_table_covers_every_state() -> None:
    assert set(ALLOWED_TRANSITIONS) == set(S)


def test_states_only_move_forward() -> None:
    # No path may lead back to a state already visited: the graph has no cycle.
    def reachable(state: PaymentState) -> set[PaymentState]:
        out: set[PaymentState] = set()
        for nxt in ALLOWED_TRANSITIONS[state]:
            out |= {nxt} | reachable(nxt)
        return out

    for state in S:
        assert state not in reachable(state)
    assert S.RECEIVED not in set().union(*ALLOWED_TRANSITIONS.values())


@pytest.mark.parametrize("state", list(S))
def test_is_final(state: PaymentState) -> None:
    assert state.is_final == (state in {S.APPROVED, S.DECLINED, S.FAILED, S.REVERSED})


def test_final_states_other_than_approved_have_no_way_out() -> None:
    for state in (S.DECLINED, S.FAILED, S.REVERSED):
        assert not any(state.can_transition_to(t, via_reversal=True) for t in S)


def _participant(caps: dict[str, int], currencies: set[str]) -> Participant:
    return Participant(
        participant_id="inst-1",
        kind=ParticipantKind.INSTITUTION,
        name="Wallet One",
        status=ParticipantStatus.ACTIVE,
        bank_code=None,
        endpoint=None,
        currencies=frozenset(currencies),
        net_debit_caps=caps,
        version=7,
    )


def test_participant_does_not_share_the_callers_containers() -> None:
    caps = {"CNY": 1000}
    participant = _participant(caps, {"CNY"})
    caps["CNY"] = 10**12
    caps["USD"] = 5
    assert dict(participant.net_debit_caps) == {"CNY": 1000}
    with pytest.raises(TypeError):
        participant.net_debit_caps["CNY"] = 1  # type: ignore[index]


def test_missing_cap_fails_closed() -> None:
    participant = _participant({"CNY": 1000}, {"CNY", "USD"})
    assert participant.net_debit_cap("CNY") == 1000
    assert participant.net_debit_cap("USD") == 0


def test_participant_is_frozen_hashable_and_compares_by_value() -> None:
    a = _participant({"CNY": 1}, {"CNY"})
    b = _participant({"CNY": 1}, {"CNY"})
    assert a == b
    assert hash(a) == hash(b)
    assert a != _participant({"CNY": 2}, {"CNY"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.status = ParticipantStatus.SUSPENDED  # type: ignore[misc]
