"""HTTP(S) check: a request whose answer must have an accepted status.

Each round opens a fresh connection (a check proves that a new client gets in;
no kept-alive connection may hide a dead listener), speaks HTTP/1.1 through h11
(the protocol state machine httpx itself is built on) over asyncio streams, and
closes it. Measured (docs/performance.md): about half the CPU per probe of a new
httpx client each round, and within 1.5x of a bare asyncio prober.
"""

from __future__ import annotations

import asyncio
import base64
import codecs
import contextlib
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Self

import h11
import httpx

from announcer import __version__
from announcer.checks import CheckResult
from announcer.checks._options import Options, TlsFiles, tls_files
from announcer.checks._url import UrlCheck, split_url
from announcer.checks.rounds import time_left
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
class HttpCheck(UrlCheck, TlsFiles):
    method: str = "GET"
    headers: Mapping[str, str] = field(default_factory=dict)
    statuses: tuple[tuple[int, int], ...] = ((100, 399),)
    body: str | None = None
    body_regex: regex.Pattern[str] | None = None

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

    @cached_property
    def _request(self) -> tuple[str, int, str | None, h11.Request]:
        """Where to connect (host, port, TLS server name) and the request, built once."""
        url = httpx.URL(self.url)
        host = url.host
        tls = url.scheme == "https"
        port = url.port or (443 if tls else 80)
        default_port = port == (443 if tls else 80)
        authority = (f"[{host}]" if ":" in host else host) + ("" if default_port else f":{port}")
        headers = {"host": authority, "user-agent": f"announcer/{__version__}", "accept": "*/*"}
        if url.username or url.password:
            token = base64.b64encode(f"{url.username}:{url.password}".encode()).decode()
            headers["authorization"] = f"Basic {token}"
        headers.update({name.lower(): value for name, value in self.headers.items()})
        headers["connection"] = "close"  # one request per connection, every round
        if self.method in ("POST", "PUT", "PATCH"):
            headers.setdefault("content-length", "0")
        target = url.raw_path.decode("ascii") or "/"
        request = h11.Request(method=self.method, target=target, headers=list(headers.items()))
        return host, port, (host if tls else None), request

    async def __call__(self) -> CheckResult:
        host, port, server_name, request = self._request
        reader, writer = await asyncio.open_connection(
            host, port, ssl=self._verify if server_name else None, server_hostname=server_name
        )
        try:
            return await self._exchange(h11.Connection(h11.CLIENT), request, reader, writer)
        except h11.ProtocolError as exc:
            return CheckResult(False, f"not an HTTP answer: {exc}")
        finally:
            # Closed on every path, the time limit's cancellation included.
            writer.close()
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await writer.wait_closed()

    async def _exchange(
        self,
        conn: h11.Connection,
        request: h11.Request,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> CheckResult:
        writer.write(conn.send(request) + conn.send(h11.EndOfMessage()))
        await writer.drain()
        response = await _next(conn, reader, h11.Response)
        assert isinstance(response, h11.Response)
        status = response.status_code
        if not self._accepted(status):
            return CheckResult(False, f"HTTP {status}")
        if self.body is None and self.body_regex is None:
            return CheckResult(True, f"HTTP {status}")
        text = (await _read_body(conn, reader)).decode(_charset(response), "replace")
        if self.body is not None and self.body not in text:
            return CheckResult(False, f"HTTP {status}, body lacks {self.body!r}")
        if self.body_regex is not None and not await _search(self.body_regex, text, time_left()):
            return CheckResult(False, f"HTTP {status}, body does not match {self.body_regex.pattern!r}")
        return CheckResult(True, f"HTTP {status}, body matches")


async def _next(conn: h11.Connection, reader: asyncio.StreamReader, wanted: type) -> object:
    """The next h11 event of the wanted kind (interim 1xx answers are skipped)."""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await reader.read(65536))
        elif isinstance(event, h11.ConnectionClosed):
            raise h11.RemoteProtocolError("the server closed the connection before answering")
        elif isinstance(event, wanted):
            return event


async def _read_body(conn: h11.Connection, reader: asyncio.StreamReader) -> bytes:
    """The body's first BODY_LIMIT bytes; the rest is never read."""
    chunks: list[bytes] = []
    size = 0
    while size < BODY_LIMIT:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await reader.read(65536))
        elif isinstance(event, h11.Data):
            chunks.append(bytes(event.data))
            size += len(event.data)
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            break
    return b"".join(chunks)[:BODY_LIMIT]


def _charset(response: h11.Response) -> str:
    for name, value in response.headers:
        if name == b"content-type":
            for part in value.decode("latin-1").split(";")[1:]:
                key, _, charset = part.strip().partition("=")
                if key.lower() == "charset" and charset:
                    with contextlib.suppress(LookupError):
                        return codecs.lookup(charset.strip('"')).name
    return "utf-8"


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
