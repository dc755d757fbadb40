"""The metrics and health endpoint: GET /metrics and GET /healthz on one socket.

A deliberately tiny asyncio HTTP/1.1 responder (one request per connection)
running in the agent's TaskGroup, so it needs no thread and no web framework.
The socket is bound before the agent starts, so a port in use is a start-up
error, not a traceback.

A scraper is a peer like any other: at most MAX_CONNECTIONS are served at once
(more are closed on accept, so idle connections cannot eat the descriptors the
checks need), a request head must arrive whole within REQUEST_TIMEOUT and fit in
REQUEST_LIMIT bytes, an answer must be taken within REQUEST_TIMEOUT, and under a
flood /metrics is rendered at most RENDER_RATE times a second (the rest get the
last rendering), so the checks and the lease keep their share of the CPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from announcer.errors import ConfigError

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

REQUEST_LIMIT = 8192  # bytes of request head we read at most
REQUEST_TIMEOUT = 2.0  # for the whole head to arrive, and again for the answer to be taken
MAX_CONNECTIONS = 32
RENDER_RATE = 20.0  # /metrics renderings a second at most, in bursts of as many


def bind(address: tuple[str, int]) -> socket.socket:
    """Bind and listen now; a busy port or bad address is a configuration error."""
    host, port = address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(64)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"--metrics-address {host}:{port}: cannot listen: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


def health_report(*, alive: bool, age: float | None, details: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """200 while the check loops are alive, else 503; ``age``: seconds since the oldest last round."""
    body = {"status": "ok" if alive else "stale", "last_round_age_seconds": age, **details}
    return (200 if alive else 503), body


class EndpointServer:
    def __init__(self, sock: socket.socket, registry: CollectorRegistry) -> None:
        self._sock = sock
        self._registry = registry
        self.health: Callable[[], tuple[int, dict[str, Any]]] = _no_agent
        self._open = 0
        self.refused = 0  # connections closed at once because MAX_CONNECTIONS were open
        self._tokens = RENDER_RATE
        self._filled_at = time.monotonic()
        self._last_render: bytes | None = None

    @property
    def port(self) -> int:
        return int(self._sock.getsockname()[1])

    async def serve(self) -> None:
        server = await asyncio.start_server(self._handle, sock=self._sock, limit=REQUEST_LIMIT)
        try:
            await asyncio.Future()  # until cancelled
        finally:
            server.close()
            with contextlib.suppress(Exception):
                await server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._open >= MAX_CONNECTIONS:
            self.refused += 1
            _abort(writer)
            return
        self._open += 1
        try:
            await self._answer(reader, writer)
        except Exception:  # noqa: BLE001, S110 - whatever a client does, it ends its own connection only
            pass
        finally:
            self._open -= 1
            _abort(writer)

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, OSError):
            return
        method, path = _request_line(head[:REQUEST_LIMIT])
        status, content_type, body = self._route(method, path)
        body_out = b"" if method == "HEAD" else body
        writer.write(
            f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n".encode()
            + body_out
        )
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(REQUEST_TIMEOUT):
                await writer.drain()

    def _metrics(self) -> bytes:
        from prometheus_client import generate_latest  # noqa: PLC0415 - metrics on: imported already

        now = time.monotonic()
        self._tokens = min(RENDER_RATE, self._tokens + (now - self._filled_at) * RENDER_RATE)
        self._filled_at = now
        if self._tokens < 1 and self._last_render is not None:
            return self._last_render
        self._tokens -= 1
        self._last_render = generate_latest(self._registry)
        return self._last_render

    def _route(self, method: str, path: str) -> tuple[int, str, bytes]:
        from prometheus_client import CONTENT_TYPE_LATEST  # noqa: PLC0415 - as in _metrics

        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"method not allowed\n"
        route = path.split("?", 1)[0]
        if route == "/metrics":
            return 200, CONTENT_TYPE_LATEST, self._metrics()
        if route == "/healthz":
            status, body = self.health()
            return status, "application/json", json.dumps(body).encode() + b"\n"
        return 404, "text/plain", b"not found: try /metrics or /healthz\n"


_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


def _no_agent() -> tuple[int, dict[str, Any]]:
    return 503, {"status": "starting"}


def _abort(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        writer.close()


def _request_line(head: bytes) -> tuple[str, str]:
    parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
    if len(parts) < 2:
        return "", ""
    return parts[0].upper(), parts[1]
