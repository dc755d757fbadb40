"""The retry backoff: exponential, capped, jittered, reset by a success."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from announcer.agent import Backoff


@given(st.floats(0.01, 1), st.floats(1, 30), st.integers(1, 40))
def test_delays_grow_to_the_cap_with_jitter(base: float, cap: float, attempts: int) -> None:
    backoff = Backoff(base=base, cap=cap)
    for n in range(attempts):
        delay = backoff.next_delay()
        nominal = min(cap, base * 2**n)
        assert nominal / 2 <= delay <= nominal  # jitter takes at most half off, never adds


def test_reset_starts_over() -> None:
    backoff = Backoff(base=0.5, cap=8)
    for _ in range(10):
        backoff.next_delay()
    backoff.reset()
    assert backoff.next_delay() <= 0.5
