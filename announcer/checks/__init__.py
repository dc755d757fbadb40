"""Health checks: one small protocol, a lazy registry of kinds, one runner.

A check is an object with a ``name`` (safe to show: no secrets) and an
``async __call__() -> CheckResult``. The runner, not the check, enforces the
time limit and turns every exception into a failed result, so a check can
never crash or stall the agent.
"""

from __future__ import annotations

import asyncio
import contextvars
import importlib
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from announcer.errors import ConfigError, describe
from announcer.redact import scrub


@dataclass(frozen=True, slots=True)
class CheckResult:
    ok: bool
    detail: str
    duration: float = 0.0


@runtime_checkable
class Check(Protocol):
    @property
    def name(self) -> str: ...

    async def __call__(self) -> CheckResult: ...


class CheckFactory(Protocol):
    """What a kind's class offers the registry: build a check from its spec."""

    @classmethod
    def from_spec(cls, spec: str, options: Mapping[str, Any]) -> Check: ...


@dataclass(frozen=True, slots=True)
class Kind:
    target: str  # "module:Class", imported only when the kind is configured
    extra: str | None = None  # the pip extra that brings its driver


# Keyed by the spec's URL scheme. Optional drivers stay unimported until used.
KINDS: dict[str, Kind] = {
    "http": Kind("announcer.checks.http:HttpCheck"),
    "https": Kind("announcer.checks.http:HttpCheck"),
    "tcp": Kind("announcer.checks.tcp:TcpCheck"),
    "postgresql": Kind("announcer.checks.postgres:PostgresCheck", "postgres"),
    "postgres": Kind("announcer.checks.postgres:PostgresCheck", "postgres"),
    "mysql": Kind("announcer.checks.mysql:MysqlCheck", "mysql"),
    "mariadb": Kind("announcer.checks.mysql:MysqlCheck", "mysql"),
    "redis": Kind("announcer.checks.redis:RedisCheck", "redis"),
    "rediss": Kind("announcer.checks.redis:RedisCheck", "redis"),
    "exec": Kind("announcer.checks.exec:ExecCheck"),
    "grpc": Kind("announcer.checks.grpc:GrpcCheck", "grpc"),
    "grpcs": Kind("announcer.checks.grpc:GrpcCheck", "grpc"),
}


def scheme_of(spec: str) -> str:
    scheme, sep, _ = spec.partition(":")
    return scheme.lower() if sep else spec.lower()


def load_factory(scheme: str) -> CheckFactory:
    kind = KINDS.get(scheme)
    if kind is None:
        known = ", ".join(sorted(KINDS))
        raise ConfigError(f"unknown check kind {scheme!r} (known kinds: {known})")
    module_name, _, class_name = kind.target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if kind.extra is None:
            raise
        raise ConfigError(
            f"check kind {scheme!r} needs the driver {exc.name!r}: "
            f"install it with: pip install 'etcd-announcer[{kind.extra}]'"
        ) from None
    factory: CheckFactory = getattr(module, class_name)
    return factory


def build_check(spec: str, options: Mapping[str, Any] | None = None) -> Check:
    """Build a check from an expanded spec; bad specs raise ConfigError."""
    return load_factory(scheme_of(spec)).from_spec(spec, options or {})


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
        ok = False
    else:
        ok, detail = result.ok, result.detail
    # A check may name the secrets it holds; none of them may reach a detail.
    detail = scrub(detail, getattr(check, "secrets", ()))
    return CheckResult(ok, detail, time.perf_counter() - started)


async def run_round(checks: list[Check], timeout: float) -> list[CheckResult]:
    """Run all checks of one round concurrently."""
    return list(await asyncio.gather(*(run_check(c, timeout) for c in checks)))
