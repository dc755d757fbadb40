"""MySQL/MariaDB check: a fresh client connection and a query (``SELECT 1``), then close.

Driver: aiomysql (extra ``mysql``): the aio-libs asyncio driver over the pure-Python
PyMySQL, so the sidekick image needs no compiler and no client library.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self
from urllib.parse import unquote

import aiomysql

from announcer.checks import CheckResult
from announcer.checks._options import Options, tls_context
from announcer.checks._url import UrlCheck, resolve_password, split_url

ACCESS_DENIED, UNKNOWN_DATABASE = 1045, 1049


@dataclass(frozen=True, kw_only=True)
class MysqlCheck(UrlCheck):
    host: str
    port: int
    user: str
    database: str | None
    query: str = "SELECT 1"
    tls: bool = False
    verify: bool = True
    ca_file: Path | None = None

    @classmethod
    def from_spec(cls, spec: str, options: Mapping[str, Any]) -> Self:
        parts = split_url("mysql", spec, "mysql://user@host:port/db")
        assert parts.hostname is not None
        opts = Options("mysql", options)
        check = cls(
            url=spec,
            password=resolve_password(parts, opts, "MYSQL_PWD"),
            host=parts.hostname,
            port=parts.port or 3306,
            user=unquote(parts.username or "root"),
            database=parts.path.lstrip("/") or None,
            query=opts.string("query") or "SELECT 1",
            tls=opts.boolean("ssl", default=False),
            verify=opts.boolean("verify", default=True),
            ca_file=opts.readable_file("ca_file"),
        )
        opts.done()
        return check

    def _ssl(self) -> ssl.SSLContext | None:
        if not self.tls and self.ca_file is None:
            return None
        return tls_context(self.ca_file, verify=self.verify)

    async def __call__(self) -> CheckResult:
        try:
            conn = await aiomysql.connect(
                host=self.host, port=self.port, user=self.user, password=self.password or "",
                db=self.database, ssl=self._ssl(), autocommit=True,
            )  # fmt: skip
        except aiomysql.OperationalError as exc:
            code = exc.args[0] if exc.args else None
            if code == ACCESS_DENIED:
                return CheckResult(False, f"authentication failed: {exc.args[1]}")
            if code == UNKNOWN_DATABASE:
                return CheckResult(False, f"database does not exist: {exc.args[1]}")
            raise
        try:
            async with conn.cursor() as cursor:
                await cursor.execute(self.query)
                row = await cursor.fetchone()
        except BaseException:
            conn.close()  # cancelled or failed: drop the socket now, leak nothing
            raise
        await conn.ensure_closed()
        return CheckResult(True, f"{self.query!r} returned {row[0] if row else None!r}")
