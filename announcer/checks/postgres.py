"""PostgreSQL check: a fresh client connection and a query (``SELECT 1``), then close.

Driver: asyncpg (extra ``postgres``): asyncio-native, binary wheels, no libpq
needed in the image, and it honours ``PGPASSWORD`` and ``~/.pgpass`` as libpq does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import asyncpg

from announcer.checks import CheckResult
from announcer.checks._options import Options, tls_context
from announcer.checks._url import UrlCheck, resolve_password, split_url

SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


@dataclass(frozen=True, kw_only=True)
class PostgresCheck(UrlCheck):
    query: str = "SELECT 1"
    sslmode: str | None = None
    ca_file: Path | None = None

    @classmethod
    def from_spec(cls, spec: str, options: Mapping[str, Any]) -> Self:
        parts = split_url("postgresql", spec, "postgresql://user@host:port/db")
        opts = Options("postgresql", options)
        check = cls(
            url=spec,
            password=resolve_password(parts, opts, "PGPASSWORD"),
            query=opts.string("query") or "SELECT 1",
            sslmode=opts.choice("sslmode", SSLMODES),
            ca_file=opts.readable_file("ca_file"),
        )
        opts.done()
        return check

    def _ssl(self) -> Any:  # asyncpg takes a context or an sslmode name
        if self.sslmode in ("verify-ca", "verify-full"):
            return tls_context(self.ca_file, check_hostname=self.sslmode == "verify-full")
        if self.sslmode == "require" and self.ca_file is not None:
            return tls_context(self.ca_file, check_hostname=False)
        return self.sslmode

    async def __call__(self) -> CheckResult:
        try:
            conn = await asyncpg.connect(self.url, password=self.password, ssl=self._ssl())
        except asyncpg.InvalidPasswordError as exc:
            return CheckResult(False, f"authentication failed: {exc}")
        except asyncpg.InvalidAuthorizationSpecificationError as exc:
            return CheckResult(False, f"authentication failed: {exc}")
        except asyncpg.InvalidCatalogNameError as exc:
            return CheckResult(False, f"database does not exist: {exc}")
        try:
            value = await conn.fetchval(self.query)
        except BaseException:
            conn.terminate()  # cancelled or failed: drop the socket now, leak nothing
            raise
        await conn.close()
        return CheckResult(True, f"{self.query!r} returned {value!r}")
