"""The container engine's API, read-only: Docker's Engine API over its unix socket.

podman serves the same API (`podman system service`), so one client speaks to both.
httpx speaks HTTP over a unix socket already (``AsyncHTTPTransport(uds=...)``), so no
second HTTP stack comes in: aiodocker would bring aiohttp, and the docker SDK is
synchronous. The engine's socket is root's; this client only ever sends GET (one
method, `_get`, and tests hold every request to it).

Every answer is untrusted bytes: bounded in size (decoded bytes counted, so a lying
``Content-Encoding`` cannot inflate past the bound) and in time, and anything that
is not what the engine sends (not JSON, the wrong shape, a hang-up) is an
`EngineError` naming the engine, never an exception of announcer's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from announcer.errors import ConfigError, describe, shown

DEFAULT_SOCKET = "/var/run/docker.sock"
LIST_LIMIT = 32 * 1024 * 1024  # a list of 1,000 containers is about 2 MB; labels may be large
INSPECT_LIMIT = 4 * 1024 * 1024
EVENT_LIMIT = 256 * 1024  # one event; the engine's are well under 2 KiB


class EngineError(Exception):
    """The engine could not be reached, or answered something it does not send."""


def socket_path(setting: str | None, env: Mapping[str, str]) -> str:
    """The engine's socket: the setting, else $DOCKER_HOST, else Docker's default."""
    raw = setting if setting is not None else env.get("DOCKER_HOST") or f"unix://{DEFAULT_SOCKET}"
    what = "--container-engine" if setting is not None else "$DOCKER_HOST"
    if raw.startswith("/"):
        return raw
    parts = urlsplit(raw)
    if parts.scheme != "unix" or not parts.path:
        raise ConfigError(
            f"{what} {shown(raw)}: only a unix socket is supported (unix:///var/run/docker.sock); "
            "an engine API over TCP would hand root to whoever reaches the port"
        )
    return parts.path


class Engine:
    """GET requests to one engine over its unix socket; every answer bounded."""

    def __init__(self, path: str, *, timeout: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout
        self._client = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=path),
            base_url="http://engine",
            timeout=httpx.Timeout(timeout),
            headers={"Accept-Encoding": "identity"},
        )

    @property
    def shown(self) -> str:
        return f"the container engine at unix://{self.path}"

    async def aclose(self) -> None:
        await self._client.aclose()

    async def running(self) -> list[dict[str, Any]]:
        """Every running (or paused) container, as the list shows it."""
        answer = await self._get("/containers/json", LIST_LIMIT)
        if not isinstance(answer, list) or not all(isinstance(item, dict) for item in answer):
            raise EngineError(f"{self.shown}: the container list is not a list of objects")
        return answer

    async def inspect(self, container: str) -> dict[str, Any] | None:
        """One container's whole description; None when the engine says it is gone."""
        answer = await self._get(f"/containers/{quote(container, safe='')}/json", INSPECT_LIMIT, gone_ok=True)
        if answer is None:
            return None
        if not isinstance(answer, dict):
            raise EngineError(f"{self.shown}: a container's description is not an object")
        return answer

    @contextlib.asynccontextmanager
    async def events(self) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
        """The container event stream, open (its headers arrived within the deadline): every
        event from now on, as it comes. Reading it ends only by raising EngineError."""
        # Only the type is filtered at the engine: Docker names a health event
        # "health_status: healthy", podman "health_status"; the source picks what it acts on.
        filters = quote(json.dumps({"type": ["container"]}), safe="")
        try:
            async with asyncio.timeout(self.timeout):  # headers within the deadline; then any silence
                # No read deadline on the stream itself: an engine may rightly say nothing for hours.
                no_read_limit = httpx.Timeout(self.timeout, read=None)
                request = self._client.build_request(
                    "GET", f"/events?filters={filters}", timeout=no_read_limit
                )
                response = await self._client.send(request, stream=True)
        except (httpx.HTTPError, OSError, TimeoutError) as exc:
            raise EngineError(f"{self.shown}: {describe(exc)}") from None
        try:
            if response.status_code != 200:
                raise EngineError(f"{self.shown}: GET /events answered HTTP {response.status_code}")
            yield self._read_events(response)
        finally:
            await response.aclose()

    async def _read_events(self, response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
        try:
            buffer = b""
            async for chunk in response.aiter_bytes():
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                if len(buffer) > EVENT_LIMIT:
                    raise EngineError(f"{self.shown}: an event longer than {EVENT_LIMIT // 1024} KiB")
                for line in lines:
                    if line.strip():
                        event = _json(line, self.shown)
                        if not isinstance(event, dict):
                            raise EngineError(f"{self.shown}: an event that is not an object")
                        yield event
        except (httpx.HTTPError, OSError) as exc:
            raise EngineError(f"{self.shown}: the event stream broke: {describe(exc)}") from None
        raise EngineError(f"{self.shown}: the event stream ended")

    async def _get(self, path: str, limit: int, *, gone_ok: bool = False) -> Any:
        """The one request this client makes: GET, its whole answer within the deadline and ``limit``."""
        try:
            async with asyncio.timeout(self.timeout), self._client.stream("GET", path) as response:
                if response.status_code == 404 and gone_ok:
                    return None
                if response.status_code != 200:
                    raise EngineError(
                        f"{self.shown}: GET {path.partition('?')[0]} answered HTTP {response.status_code}"
                    )
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > limit:
                        raise EngineError(f"{self.shown}: an answer larger than {limit // (1024 * 1024)} MiB")
        except (httpx.HTTPError, OSError, TimeoutError) as exc:
            raise EngineError(f"{self.shown}: {describe(exc)}") from None
        return _json(bytes(body), self.shown)


def _json(raw: bytes, where: str) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise EngineError(f"{where}: an answer that is not JSON ({shown(raw[:60])})") from None


def engine_from(setting: str | None) -> Engine:
    return Engine(socket_path(setting, os.environ))
