"""The pure rise/fall state machine: results in, transitions out.

No clock, no I/O: the agent feeds it one verdict per round (all checks
passed, or not) and acts on the transitions it returns.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace


class Health(enum.Enum):
    UNKNOWN = "unknown"
    PASSING = "passing"
    FAILING = "failing"


@dataclass(frozen=True, slots=True)
class HealthState:
    rise: int
    fall: int
    status: Health = Health.UNKNOWN
    passes: int = 0  # consecutive passing rounds so far
    failures: int = 0  # consecutive failing rounds so far

    def __post_init__(self) -> None:
        if self.rise < 1 or self.fall < 1:
            raise ValueError("rise and fall must be at least 1")

    def observe(self, ok: bool) -> tuple[HealthState, Health | None]:
        """Return the next state and the new status if it changed, else None."""
        if ok:
            # Counters saturate at their threshold: the state stays a small value.
            state = replace(self, passes=min(self.passes + 1, self.rise), failures=0)
            if state.status is not Health.PASSING and state.passes >= self.rise:
                return replace(state, status=Health.PASSING), Health.PASSING
        else:
            state = replace(self, passes=0, failures=min(self.failures + 1, self.fall))
            if state.status is not Health.FAILING and state.failures >= self.fall:
                return replace(state, status=Health.FAILING), Health.FAILING
        return state, None
