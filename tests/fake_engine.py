"""A fake container engine speaking Docker's dialect of the Engine API, over a unix socket.

The real engine (podman's API service) is tested in tests/test_containers_podman.py;
this one replays Docker's documented list, inspect and event formats (which podman
does not send: ``destroy``, ``health_status: healthy``, a port listed once per address
family), and misbehaves on demand as a hostile engine would. Every request's method
and path is kept, so a test can hold announcer to GET.

Docker's formats: https://docs.docker.com/reference/api/engine/version/v1.47/
(ContainerInspect, ContainerList, SystemEvents).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path
from typing import Any

HOSTILE = (
    "inspect-not-json", "inspect-wrong-shape", "not-json", "huge", "hang", "hang-up", "deep", "wrong-shape", "status-500", "events-garbage",
    "events-endless-line", "events-not-object", "events-hang-up",
)  # fmt: skip


def docker_container(
    cid: str,
    name: str,
    *,
    image: str = "docker.io/library/nginx:1.25",
    labels: dict[str, str] | None = None,
    env: list[str] | None = None,
    ports: dict[str, Any] | None = None,
    health: str | None = None,
    running: bool = True,
    paused: bool = False,
    ip: str = "172.17.0.2",
) -> dict[str, Any]:
    """A container as Docker's ``GET /containers/{id}/json`` describes it (the fields read)."""
    state: dict[str, Any] = {
        "Status": "paused" if paused else "running",
        "Running": running,
        "Paused": paused,
    }
    config: dict[str, Any] = {
        "Image": image, "Labels": labels or {}, "Env": env or ["PATH=/usr/bin"],
        "ExposedPorts": {spec: {} for spec in (ports or {})},
    }  # fmt: skip
    if health is not None:
        state["Health"] = {"Status": health, "FailingStreak": 0, "Log": []}
        config["Healthcheck"] = {"Test": ["CMD-SHELL", "true"], "Interval": 1_000_000_000}
    return {
        "Id": cid, "Name": f"/{name}", "Image": "sha256:" + "0" * 64, "State": state, "Config": config,
        "NetworkSettings": {
            "Ports": ports or {}, "IPAddress": ip,
            "Networks": {"bridge": {"IPAddress": ip, "Gateway": "172.17.0.1"}},
        },
    }  # fmt: skip


def published(port: int, host_port: int, host_ip: str = "0.0.0.0") -> dict[str, Any]:
    """Docker's ``NetworkSettings.Ports`` for one port published on every address: IPv4 and IPv6."""
    bindings = [{"HostIp": host_ip, "HostPort": str(host_port)}]
    if host_ip == "0.0.0.0":
        bindings.append({"HostIp": "::", "HostPort": str(host_port)})
    return {f"{port}/tcp": bindings}


def docker_event(cid: str, action: str, name: str = "c") -> dict[str, Any]:
    """One event as Docker's ``GET /events`` streams it."""
    now = time.time()
    return {
        "status": action, "id": cid, "from": "nginx", "Type": "container", "Action": action,
        "Actor": {"ID": cid, "Attributes": {"name": name, "image": "nginx"}}, "scope": "local",
        "time": int(now), "timeNano": int(now * 1e9),
    }  # fmt: skip


class FakeEngine:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.containers: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str]] = []
        self.mode: str | None = None
        self._streams: list[asyncio.Queue[bytes | None]] = []
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"unix://{self.path}"

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))

    async def stop(self) -> None:
        """The engine goes away: the socket closes, every open stream ends."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for stream in self._streams:
            stream.put_nowait(None)
        for writer in list(self._writers):
            writer.close()
        self.path.unlink(missing_ok=True)

    def add(self, doc: dict[str, Any], *, announce: bool = True) -> None:
        self.containers[doc["Id"]] = doc
        if announce:
            self.emit(docker_event(doc["Id"], "start", doc["Name"].lstrip("/")))

    def emit(self, event: dict[str, Any] | bytes) -> None:
        line = event if isinstance(event, bytes) else json.dumps(event).encode() + b"\n"
        for stream in self._streams:
            stream.put_nowait(line)

    @property
    def streams(self) -> int:
        return len(self._streams)

    # -- HTTP/1.1, just enough --------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                method, target, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
                self.requests.append((method, target))
                if not await self._answer(method, target, writer):
                    return
        except (
            asyncio.IncompleteReadError,
            ConnectionError,
            asyncio.LimitOverrunError,
            asyncio.CancelledError,
        ):
            return  # a hang-up, or the test's loop ending: nothing to say
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _answer(self, method: str, target: str, writer: asyncio.StreamWriter) -> bool:
        path = target.split("?", 1)[0]
        mode = self.mode
        if path == "/events":
            return await self._events(writer, mode)
        inspecting = path.startswith("/containers/") and not path.endswith("/containers/json")
        if mode == "inspect-not-json" and inspecting:
            self._send(writer, 200, b"\xff\xfe not json")
            return True
        if mode == "inspect-wrong-shape" and inspecting:
            self._send(writer, 200, b"[1, 2]")
            return True
        if mode is not None and mode.startswith("inspect-"):
            mode = None  # the list is answered as an engine would
        if mode == "hang":
            await asyncio.sleep(3600)
        if mode == "hang-up":
            return False
        if mode == "status-500":
            self._send(writer, 500, b'{"message":"boom"}')
            return True
        if mode == "not-json":
            self._send(writer, 200, b"<html>not an engine</html>")
            return True
        if mode == "huge":
            self._send(writer, 200, b"[" + b'{"Id":"x"},' * 4_000_000 + b"{}]")
            return True
        if mode == "deep":
            self._send(writer, 200, b"[" * 100_000 + b"]" * 100_000)
            return True
        if mode == "wrong-shape":
            self._send(writer, 200, b'{"Id": 5, "State": [], "Config": "x", "NetworkSettings": 7}')
            return True
        if method != "GET":
            self._send(writer, 405, b'{"message":"GET only here"}')
            return True
        if path.endswith("/containers/json"):
            listed = [
                {"Id": cid, "Names": [doc["Name"]], "State": doc["State"]["Status"]}
                for cid, doc in self.containers.items()
                if doc["State"]["Running"]
            ]
            self._send(writer, 200, json.dumps(listed).encode())
            return True
        if path.startswith("/containers/") and path.endswith("/json"):
            cid = path.split("/")[2]
            found = self.containers.get(cid) or next(
                (doc for key, doc in self.containers.items() if key.startswith(cid)), None
            )
            if found is None:
                self._send(writer, 404, b'{"message":"No such container"}')
            else:
                self._send(writer, 200, json.dumps(found).encode())
            return True
        self._send(writer, 404, b'{"message":"page not found"}')
        return True

    async def _events(self, writer: asyncio.StreamWriter, mode: str | None) -> bool:
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        writer.write(head)
        if mode == "events-garbage":
            self._chunk(writer, b"this is not json\n")
        elif mode == "events-not-object":
            self._chunk(writer, b"[1, 2, 3]\n")
        elif mode == "events-endless-line":
            for _ in range(100):
                self._chunk(writer, b"x" * 8192)
                await writer.drain()
        elif mode == "events-hang-up":
            await writer.drain()
            return False
        queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._streams.append(queue)
        try:
            while True:
                await writer.drain()
                line = await queue.get()
                if line is None:
                    return False
                self._chunk(writer, line)
        finally:
            self._streams.remove(queue)

    @staticmethod
    def _chunk(writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(b"%x\r\n%s\r\n" % (len(data), data))

    @staticmethod
    def _send(writer: asyncio.StreamWriter, status: int, body: bytes) -> None:
        head = f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        writer.write(head.encode() + body)


@contextlib.asynccontextmanager
async def fake_engine(path: Path) -> Any:
    engine = FakeEngine(path)
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop()
