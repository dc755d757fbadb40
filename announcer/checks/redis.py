"""Redis check: a fresh connection answers PING with PONG; optionally the role must match.

Driver: redis-py's asyncio client (extra ``redis``): the maintained official client.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self
from urllib.parse import unquote, urlsplit

import redis.asyncio
import redis.exceptions

from announcer.checks import CheckResult
from announcer.checks._options import Options
from announcer.errors import ConfigError
from announcer.redact import redact_url

ROLES = ("master", "slave", "replica", "sentinel")


@dataclass(frozen=True)
class RedisCheck:
    url: str
    role: str | None = None
    verify: bool = True
    ca_file: Path | None = None
    password: str | None = field(default=None, repr=False)

    @classmethod
    def from_spec(cls, spec: str, options: Mapping[str, Any]) -> Self:
        parts = urlsplit(spec)
        if not parts.hostname:
            raise ConfigError(f"redis check {redact_url(spec)!r} must look like redis://[user@]host:port/db")
        opts = Options("redis", options)
        role = opts.string("role")
        if role is not None and role not in ROLES:
            raise ConfigError(f"redis check role {role!r} is not one of {', '.join(ROLES)}")
        password = (
            (unquote(parts.password) if parts.password else None)
            or opts.secret_file("password_file")
            or os.environ.get("REDISCLI_AUTH")
        )
        check = cls(
            url=spec,
            role="slave" if role == "replica" else role,
            verify=opts.boolean("verify", default=True),
            ca_file=opts.readable_file("ca_file"),
            password=password,
        )
        opts.done()
        return check

    @property
    def name(self) -> str:
        return redact_url(self.url)

    @property
    def secrets(self) -> tuple[str, ...]:
        return (self.password,) if self.password else ()

    def _client(self) -> redis.asyncio.Redis:
        kwargs: dict[str, Any] = {"password": self.password, "single_connection_client": True}
        if self.url.lower().startswith("rediss:"):
            kwargs["ssl_cert_reqs"] = "required" if self.verify else "none"
            kwargs["ssl_check_hostname"] = self.verify
            if self.ca_file is not None:
                kwargs["ssl_ca_certs"] = str(self.ca_file)
        return redis.asyncio.Redis.from_url(self.url, **kwargs)

    async def __call__(self) -> CheckResult:
        client = self._client()
        try:
            if not await client.ping():
                return CheckResult(False, "PING was not answered with PONG")
            if self.role is None:
                return CheckResult(True, "PONG")
            role = await client.role()
            actual = role[0].decode() if isinstance(role[0], bytes) else str(role[0])
            if actual != self.role:
                return CheckResult(False, f"wrong role: {actual}, wanted {self.role}")
            return CheckResult(True, f"PONG, role {actual}")
        except redis.exceptions.AuthenticationError as exc:
            return CheckResult(False, f"authentication failed: {exc}")
        except redis.exceptions.ResponseError as exc:
            if "NOAUTH" in str(exc) or "WRONGPASS" in str(exc):
                return CheckResult(False, f"authentication failed: {exc}")
            raise
        finally:
            await client.aclose()
