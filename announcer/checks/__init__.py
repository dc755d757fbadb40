"""Health checks: one small protocol and a lazy registry of kinds (the runner is in rounds.py).

A check is an object with a ``name`` (safe to show: no secrets) and an
``async __call__() -> CheckResult``. The runner, not the check, enforces the
time limit and turns every exception into a failed result, so a check can
never crash or stall the agent. This module imports no asyncio, so the CLI can
list the kinds in its help (and answer --version) without loading it.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from announcer.errors import ConfigError


@dataclass(frozen=True, slots=True)
class CheckResult:
    ok: bool
    detail: str
    duration: float = 0.0
    pending: bool = False  # no verdict yet (a HEALTHCHECK still starting): the round counts for nothing


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
