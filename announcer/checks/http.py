"""HTTP(S) check: a request whose answer must have an accepted status."""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import httpx

from announcer.checks import CheckResult, time_left
from announcer.checks._options import Options, tls_files
from announcer.checks._url import UrlCheck, split_url
from announcer.errors import ConfigError
from announcer.redact import redact_url

if TYPE_CHECKING:
    import regex

BODY_LIMIT = 64 * 1024  # bytes of the body read to match against
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "OPTIONS", "PATCH", "DELETE"})


def parse_statuses(value: Any) -> tuple[tuple[int, int], ...]:
    """``[200, "300-399"]`` -> ((200, 200), (300, 399)); None -> below 400."""
    if value is None:
        return ((100, 399),)  # what `curl -f` accepts
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ConfigError("http check status must name at least one code or range")
    ranges: list[tuple[int, int]] = []
    for item in items:
        low, high = _status_range(item)
        if not 100 <= low <= high <= 599:
            raise ConfigError(f"http check status {item!r} is not within 100-599")
        ranges.append((low, high))
    return tuple(ranges)


def _status_range(item: Any) -> tuple[int, int]:
    if isinstance(item, int) and not isinstance(item, bool):
        return item, item
    if isinstance(item, str):
        low, sep, high = item.partition("-")
        try:
            return int(low), int(high if sep else low)
        except ValueError:
            pass
    raise ConfigError(f"http check status {item!r} must be a code like 200 or a range like '200-299'")


@dataclass(frozen=True, kw_only=True)
class HttpCheck(UrlCheck):
    method: str = "GET"
    headers: Mapping[str, str] = field(default_factory=dict)
    statuses: tuple[tuple[int, int], ...] = ((100, 399),)
    body: str | None = None
    body_regex: regex.Pattern[str] | None = None
    verify: bool = True
    ca_file: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None

    @classmethod
    def from_spec(cls, spec: str, options: Mapping[str, Any]) -> Self:
        split_url("http", spec, "http://host:port/path")  # the host and port are checked here
        try:
            url = httpx.URL(spec)
        except (httpx.InvalidURL, ValueError, TypeError) as exc:
            raise ConfigError(f"http check {redact_url(spec)!r} is not a usable URL: {exc}") from None
        if not url.host:
            raise ConfigError(f"http check {redact_url(spec)!r} has no host")
        opts = Options("http", options)
        method = (opts.string("method") or "GET").upper()
        if method not in METHODS:
            raise ConfigError(f"http check method {method!r} is not one of {sorted(METHODS)}")
        headers = opts.string_map("headers")
        for name, value in headers.items():
            if not _HEADER_NAME.fullmatch(name) or any(c in value for c in "\r\n\0"):
                raise ConfigError(f"http check header {name!r} must be a token with a one-line value")
        pattern = opts.string("body_regex")
        check = cls(
            url=spec,
            password=url.password or None,
            method=method,
            headers=headers,
            statuses=parse_statuses(opts.raw("status")),
            body=opts.string("body"),
            body_regex=_compile(pattern) if pattern is not None else None,
            **vars(tls_files(opts, "https")),
        )
        opts.done()
        if check.client_cert is not None:
            try:
                check._verify.load_cert_chain(str(check.client_cert), str(check.client_key))
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"https check client_cert/client_key are not usable: {exc}") from None
        return check

    @cached_property
    def _verify(self) -> ssl.SSLContext:
        # Built once and handed to every round's client: making a context (and loading a
        # CA bundle) costs more than the request itself.
        if not self.verify or not self.url.lower().startswith("https:"):
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # unused for plain HTTP; no CAs loaded
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            return context
        return ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)

    def _accepted(self, status: int) -> bool:
        return any(low <= status <= high for low, high in self.statuses)

    async def __call__(self) -> CheckResult:
        # A client per round: every round opens a fresh connection (proving a new client
        # gets in), and leaving the block closes it even when the time limit cancels us.
        async with (
            httpx.AsyncClient(verify=self._verify, trust_env=False) as client,
            client.stream(self.method, self.url, headers=dict(self.headers)) as response,
        ):
            status = response.status_code
            if not self._accepted(status):
                return CheckResult(False, f"HTTP {status}")
            if self.body is None and self.body_regex is None:
                return CheckResult(True, f"HTTP {status}")
            text = (await _read_limited(response)).decode(response.encoding or "utf-8", "replace")
        if self.body is not None and self.body not in text:
            return CheckResult(False, f"HTTP {status}, body lacks {self.body!r}")
        if self.body_regex is not None and not await _search(self.body_regex, text, time_left()):
            return CheckResult(False, f"HTTP {status}, body does not match {self.body_regex.pattern!r}")
        return CheckResult(True, f"HTTP {status}, body matches")


async def _read_limited(response: httpx.Response) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        chunks.append(chunk)
        size += len(chunk)
        if size >= BODY_LIMIT:
            break
    return b"".join(chunks)[:BODY_LIMIT]


_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _compile(pattern: str) -> regex.Pattern[str]:
    # The `regex` module, not `re`: it can give up after a time limit and let go of the GIL
    # while it matches, so a pattern that backtracks without end (`^(a|a)*$`) can neither
    # pin the event loop nor outlive the check. Imported only when a body_regex is set.
    import regex  # noqa: PLC0415 - only where a body_regex is configured

    try:
        return regex.compile(pattern)
    except (regex.error, ValueError, OverflowError, RecursionError) as exc:
        raise ConfigError(f"http check body_regex {pattern!r} is invalid: {exc}") from None


async def _search(pattern: regex.Pattern[str], text: str, limit: float) -> bool:
    """Match in a worker thread, bounded by ``limit`` seconds in the thread itself."""
    try:
        found = await asyncio.to_thread(pattern.search, text, concurrent=True, timeout=limit)
    except TimeoutError:
        raise TimeoutError(f"body_regex took longer than {limit:.3g}s") from None
    return found is not None
