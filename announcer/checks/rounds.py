"""Running checks: each within its time limit, all of a round at once; a check never raises out."""

from __future__ import annotations

import asyncio
import contextvars
import time

from announcer.checks import Check, CheckResult
from announcer.errors import describe
from announcer.redact import scrub

_deadline: contextvars.ContextVar[float] = contextvars.ContextVar("check_deadline")


def time_left() -> float:
    """Seconds left of the running check's time limit: for work a check hands to a thread."""
    return max(0.001, _deadline.get(time.monotonic() + 1.0) - time.monotonic())


async def run_check(check: Check, timeout: float) -> CheckResult:
    """Run one check within ``timeout``; never raises (but for cancellation)."""
    started = time.perf_counter()
    _deadline.set(time.monotonic() + timeout)  # each check runs in a task of its own (gather)
    try:
        async with asyncio.timeout(timeout):
            result = await check()
    except TimeoutError:
        return CheckResult(False, f"timed out after {timeout:g}s", time.perf_counter() - started)
    except Exception as exc:  # noqa: BLE001 - any failure of a check is a failed check
        detail = describe(exc)
        ok, pending = False, False
    else:
        ok, detail, pending = result.ok, result.detail, result.pending
    # A check may name the secrets it holds; none of them may reach a detail.
    detail = scrub(detail, getattr(check, "secrets", ()))
    return CheckResult(ok, detail, time.perf_counter() - started, pending)


async def run_round(checks: list[Check], timeout: float) -> list[CheckResult]:
    """Run all checks of one round concurrently."""
    return list(await asyncio.gather(*(run_check(c, timeout) for c in checks)))
