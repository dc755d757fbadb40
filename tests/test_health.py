"""The rise/fall machine: tables for the cases people reason about, properties for the rest."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from announcer.health import Health, HealthState

P, F = True, False
U, UP, DOWN = Health.UNKNOWN, Health.PASSING, Health.FAILING


@pytest.mark.parametrize(
    ("rise", "fall", "verdicts", "statuses", "transitions"),
    [
        # rise 2: the first pass is not enough, the second announces
        (2, 2, [P, P], [U, UP], [None, UP]),
        # one failure between passes resets the rise count
        (2, 2, [P, F, P, P], [U, U, U, UP], [None, None, None, UP]),
        # fall 2: one failure is a blip, two withdraw
        (2, 2, [P, P, F, P, F, F], [U, UP, UP, UP, UP, DOWN], [None, UP, None, None, None, DOWN]),
        # unknown to failing takes `fall` failures (readiness: a known unhealthy verdict)
        (2, 3, [F, F, F], [U, U, DOWN], [None, None, DOWN]),
        # rise 1 / fall 1 behaves like the old loop: every verdict counts at once
        (1, 1, [P, F, P], [UP, DOWN, UP], [UP, DOWN, UP]),
        # staying up produces no transition
        (1, 1, [P, P, P], [UP, UP, UP], [UP, None, None]),
        # recovery needs `rise` passes again
        (
            3,
            1,
            [P, P, P, F, P, P, P],
            [U, U, UP, DOWN, DOWN, DOWN, UP],
            [None, None, UP, DOWN, None, None, UP],
        ),
    ],
)
def test_table(
    rise: int, fall: int, verdicts: list[bool], statuses: list[Health], transitions: list[Health | None]
) -> None:
    state = HealthState(rise, fall)
    seen_status, seen_transitions = [], []
    for ok in verdicts:
        state, transition = state.observe(ok)
        seen_status.append(state.status)
        seen_transitions.append(transition)
    assert seen_status == statuses
    assert seen_transitions == transitions


def test_rejects_zero_thresholds() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        HealthState(0, 1)


@given(st.integers(1, 6), st.integers(1, 6), st.lists(st.booleans(), max_size=60))
def test_properties(rise: int, fall: int, verdicts: list[bool]) -> None:
    state = HealthState(rise, fall)
    for i, ok in enumerate(verdicts):
        before = state.status
        state, transition = state.observe(ok)
        # A transition is reported exactly when the status changes, and names the new one.
        assert (transition is not None) == (state.status is not before)
        if transition is not None:
            assert transition is state.status
        # PASSING only after `rise` consecutive passes; FAILING only after `fall` failures.
        if transition is Health.PASSING:
            assert i + 1 >= rise
            assert all(verdicts[i + 1 - rise : i + 1])
        if transition is Health.FAILING:
            assert i + 1 >= fall
            assert not any(verdicts[i + 1 - fall : i + 1])
        # The state stays a small value: counters saturate.
        assert state.passes <= rise
        assert state.failures <= fall


@given(st.integers(1, 6), st.integers(1, 6), st.lists(st.booleans(), max_size=60))
def test_status_is_a_function_of_the_recent_verdicts(rise: int, fall: int, verdicts: list[bool]) -> None:
    state = HealthState(rise, fall)
    for ok in verdicts:
        state, _ = state.observe(ok)
    # Replaying: the status is that of the last run long enough to decide it.
    expected = Health.UNKNOWN
    run_value, run_length = None, 0
    for ok in verdicts:
        run_length = run_length + 1 if ok == run_value else 1
        run_value = ok
        if ok and run_length >= rise:
            expected = Health.PASSING
        if not ok and run_length >= fall:
            expected = Health.FAILING
    assert state.status is expected
