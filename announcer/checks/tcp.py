"""TCP check: a connection opens; optionally bytes sent get an expected answer."""

from __future__ import annotations

import asyncio
import codecs
import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Self

from announcer.checks import CheckResult
from announcer.checks._options import Options
from announcer.checks._url import split_url
from announcer.errors import ConfigError

READ_LIMIT = 64 * 1024


def _bytes_option(opts: Options, name: str) -> bytes | None:
    # Escapes like "\r\n" in TOML strings arrive already decoded; "\\x00" is
    # decoded here so binary protocols can be spelled too.
    value = opts.string(name)
    if value is None:
        return None
    try:
        decoded: bytes = codecs.escape_decode(value.encode("utf-8"))[0]
    except (ValueError, UnicodeEncodeError) as exc:
        raise ConfigError(f"tcp check option {name!r} {value!r} has a bad escape: {exc}") from None
    if not decoded:
        raise ConfigError(f"tcp check option {name!r} is empty; leave it out instead")
    if len(decoded) > READ_LIMIT:
        raise ConfigError(f"tcp check option {name!r} is longer than {READ_LIMIT} bytes")
    return decoded


@dataclass(frozen=True)
class TcpCheck:
    host: str
    port: int
    send: bytes | None = None
    expect: bytes | None = None

    @classmethod
    def from_spec(cls, spec: str, options: Mapping[str, Any]) -> Self:
        parts = split_url("tcp", spec, "tcp://host:port")
        port = parts.port
        if not parts.hostname or not port:
            raise ConfigError(f"tcp check {spec!r} must look like tcp://host:port")
        opts = Options("tcp", options)
        check = cls(parts.hostname, port, _bytes_option(opts, "send"), _bytes_option(opts, "expect"))
        opts.done()
        return check

    @property
    def name(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"

    async def __call__(self) -> CheckResult:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            if self.send:
                writer.write(self.send)
                await writer.drain()
            if self.expect is None:
                return CheckResult(True, "connected")
            seen = b""
            while self.expect not in seen and len(seen) < READ_LIMIT:
                chunk = await reader.read(4096)
                if not chunk:
                    return CheckResult(False, f"closed before answering {self.expect!r}")
                seen += chunk
            if self.expect in seen:
                return CheckResult(True, f"answered {self.expect!r}")
            return CheckResult(False, f"no {self.expect!r} in the first {READ_LIMIT} bytes")
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
