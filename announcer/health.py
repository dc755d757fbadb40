"""The pure rise/fall state machine: results in, transitions out.

No clock, no I/O: the agent feeds it one verdict per round (all checks
passed, or not) and acts on the transitions it returns.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace


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

    def retuned(self, rise: int, fall: int) -> HealthState:
        """The same verdict under new thresholds (a reload): the counters carry over."""
        return replace(
            self, rise=rise, fall=fall, passes=min(self.passes, rise), failures=min(self.failures, fall)
        )


@dataclass(frozen=True, slots=True)
class FlapLimit:
    """At most ``count`` announcements in any ``window`` seconds."""

    count: int
    window: float

    def __str__(self) -> str:
        return f"{self.count}/{self.window:g}"


@dataclass
class FlapDamper:
    """Flap damping as a value: the caller passes the time, nothing here reads a clock.

    Past the limit the instance stays withdrawn until its checks have passed
    continuously for one window; then it may announce once.
    """

    limit: FlapLimit | None
    announced_at: list[float] = field(default_factory=list)
    damped: bool = False

    def may_announce(self, now: float, passing_since: float) -> bool:
        """Whether an announcement may happen now; when it may, it is counted."""
        if self.limit is None:
            return True
        window = self.limit.window
        self.announced_at = [t for t in self.announced_at if t > now - window]
        if self.damped and now - passing_since < window:
            return False
        if not self.damped and len(self.announced_at) >= self.limit.count:
            self.damped = True
            return False
        self.damped = False
        self.announced_at.append(now)
        return True
