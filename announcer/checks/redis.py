"""Redis check: a fresh connection answers PING with PONG; optionally the role must match.

Driver: redis-py's asyncio client (extra ``redis``): the maintained official client.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import redis.asyncio
import redis.exceptions

from announcer.checks import CheckResult
from announcer.checks._options import Options
from announcer.checks._url import UrlCheck, resolve_password, split_url

ROLES = ("master", "slave", "replica", "sentinel")


@dataclass(frozen=True, kw_only=True)
class RedisCheck(UrlCheck):
    role: str | None = None
    verify: bool = True
    ca_file: Path | None = None

    @classmethod
    def from_spec(cls, spec: str, options: Mapping[str, Any]) -> Self:
        parts = split_url("redis", spec, "redis://[user@]host:port/db")
        opts = Options("redis", options)
        role = opts.choice("role", ROLES)
        check = cls(
            url=spec,
            password=resolve_password(parts, opts, "REDISCLI_AUTH"),
            role="slave" if role == "replica" else role,
            verify=opts.boolean("verify", default=True),
            ca_file=opts.readable_file("ca_file"),
        )
        opts.done()
        return check

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
