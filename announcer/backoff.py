"""Capped exponential backoff with jitter, for every retry that talks to etcd."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass
class Backoff:
    """Capped exponential backoff with jitter, so a fleet does not retry in step."""

    base: float
    cap: float
    attempts: int = 0

    def next_delay(self) -> float:
        delay = min(self.cap, self.base * 2.0 ** min(self.attempts, 32))
        self.attempts += 1
        jitter: float = random.uniform(0.5, 1.0)  # noqa: S311 - spreads retries, not cryptography
        return delay * jitter

    def reset(self) -> None:
        self.attempts = 0
