"""A real Traefik fed from etcd: requests failed per instance kill and per rolling restart.

announcer (`--publish traefik`, a drain at SIGTERM) against the seed's loop pattern feeding
the same Traefik in the same run. The loop cannot use its v2 `set --ttl` (Traefik reads
etcd v3), so it is the loop ported as literally as v3 allows: `curl -f`, then
`etcdctl put` of the Traefik key on a fresh 30 s lease, every 20 s; `etcdctl del` when
curl fails and at ExecStop.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.harness import ETCD_DIR, Etcd, HttpService, free_port, stop_process, wait_for, workspace

Rows = list[dict[str, object]]
SERVERS = "traefik/http/services/web/loadBalancer/servers/"

TRAEFIK_LOOP = """\
# The seed's loop, ported to etcd v3 so that Traefik can read it: a fresh lease each pass.
KEY="traefik/http/services/web/loadBalancer/servers/loop-${PORT}/url"
while true; do
  if curl -f -s -o /dev/null "http://${IP}:${PORT}/"; then
    LEASE=$(etcdctl lease grant ${TTL:-30} | awk '{print $2}')
    etcdctl put --lease="$LEASE" "$KEY" "http://${IP}:${PORT}" >/dev/null
  else
    etcdctl del "$KEY" >/dev/null 2>&1
  fi
  sleep ${SLEEP:-20}
done
"""


def traefik_binary() -> str:
    beside = Path(sys.executable).parent / "traefik"
    return str(beside)


@dataclass
class Traefik:
    etcd: Etcd
    workdir: Path
    throttle: str = "2s"  # Traefik's default providersThrottleDuration
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> Traefik:
        self.process = subprocess.Popen(
            [traefik_binary(), f"--entrypoints.web.address=127.0.0.1:{self.port}",
             f"--providers.etcd.endpoints=127.0.0.1:{self.etcd.port}", "--providers.etcd.rootKey=traefik",
             f"--providers.providersThrottleDuration={self.throttle}", "--global.checkNewVersion=false",
             "--global.sendAnonymousUsage=false", "--log.level=ERROR"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        for name, value in (("rule", "PathPrefix(`/`)"), ("service", "web"), ("entryPoints/0", "web")):
            self.etcd.v3(
                "/v3/kv/put", {"key": _b64(f"traefik/http/routers/web/{name}"), "value": _b64(value)}
            )
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)


def _b64(text: str) -> str:
    import base64

    return base64.b64encode(text.encode()).decode()


class Client:
    """Requests through Traefik in a loop, every answer counted, until stopped (bounded)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.ok = 0
        self.failed: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + 600
        with httpx.Client(timeout=2) as client:
            while not self._stop.is_set() and time.monotonic() < deadline:
                try:
                    good = client.get(self.url).status_code == 200
                except httpx.HTTPError:
                    good = False
                if good:
                    self.ok += 1
                else:
                    self.failed.append(time.monotonic())
                self._stop.wait(0.01)

    @contextlib.contextmanager
    def running(self) -> Iterator[Client]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(10)


class Contender:
    """One way of keeping Traefik's server list: announcer sidekicks, or the loop."""

    def __init__(self, name: str, etcd: Etcd, quick: bool) -> None:
        self.name, self.etcd, self.quick = name, etcd, quick
        self.processes: dict[int, subprocess.Popen[bytes]] = {}

    def start(self, port: int) -> None:
        if self.name == "announcer":
            # Quick mode only shows the table is made: a faster cadence and a shorter drain.
            timing = (
                ["--interval", "0.5", "--timeout", "0.3", "--drain", "1.5"]
                if self.quick
                else ["--drain", "3"]
            )
            args = [sys.executable, "-m", "announcer", "--service", "web", "--port", str(port), "--ip", "127.0.0.1",
                    "--publish", "traefik", "--etcd-endpoints", self.etcd.url, "--log-level", "warning",
                    *timing]  # fmt: skip
            self.processes[port] = subprocess.Popen(
                args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
        else:
            env = {**os.environ, "PATH": f"{ETCD_DIR}:{os.environ['PATH']}", "ETCDCTL_API": "3",
                   "ETCDCTL_ENDPOINTS": self.etcd.url, "IP": "127.0.0.1", "PORT": str(port),
                   "SLEEP": "2" if self.quick else "20", "TTL": "6" if self.quick else "30"}  # fmt: skip
            self.processes[port] = subprocess.Popen(
                ["/bin/sh", "-c", TRAEFIK_LOOP], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )

    def stop(self, port: int) -> None:
        """The unit's stop: announcer's SIGTERM (withdraw, drain, exit); the loop's kill, then ExecStop."""
        process = self.processes.pop(port)
        if self.name == "announcer":
            process.send_signal(signal.SIGTERM)
            process.wait(30)
            return
        stop_process(process)
        key = f"{SERVERS}loop-{port}/url"
        subprocess.run([str(ETCD_DIR / "etcdctl"), "del", key], env={**os.environ, "ETCDCTL_API": "3",
                       "ETCDCTL_ENDPOINTS": self.etcd.url}, check=False, stdout=subprocess.DEVNULL)  # fmt: skip

    def stop_all(self) -> None:
        for port in list(self.processes):
            with contextlib.suppress(Exception):
                self.stop(port)


def _servers(etcd: Etcd) -> int:
    end = SERVERS[:-1] + chr(ord(SERVERS[-1]) + 1)
    answer = etcd.v3("/v3/kv/range", {"key": _b64(SERVERS), "range_end": _b64(end), "count_only": True})
    return int(str(answer.get("count", 0)))


def traefik(mode: object) -> Rows:
    """Failed requests through a real Traefik: an instance killed, and a rolling restart of two."""
    quick = bool(getattr(mode, "quick", False))
    rows: Rows = []
    for name in ("announcer", "loop"):
        with workspace() as folder:
            etcd = Etcd(folder).start()
            proxy = Traefik(etcd, folder, throttle="500ms" if quick else "2s").start()
            backends = [HttpService(folder).start(), HttpService(folder).start()]
            contender = Contender(name, etcd, quick)
            try:
                for backend in backends:
                    contender.start(backend.port)
                wait_for(lambda e=etcd: _servers(e) == 2, 60, f"{name}: both instances registered")
                wait_for(lambda p=proxy: _routed(p), 30, "Traefik routing")
                rows.append(_kill(name, contender, proxy, backends, etcd, quick))
                rows.append(_rolling(name, contender, proxy, backends, etcd))
            finally:
                contender.stop_all()
                for backend in backends:
                    backend.kill()
                proxy.stop()
                etcd.stop()
    return rows


def _routed(proxy: Traefik) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{proxy.port}/", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _kill(name: str, contender: Contender, proxy: Traefik, backends: list[HttpService], etcd: Etcd,
          quick: bool) -> dict[str, object]:  # fmt: skip
    client = Client(f"http://127.0.0.1:{proxy.port}/")
    window = 5.0 if quick else 30.0  # past the loop's next pass plus Traefik's throttle
    with client.running():
        time.sleep(1.0)
        killed = time.monotonic()
        backends[0].kill()  # the service dies; its sidekick stays
        time.sleep(window)
    last = max(client.failed) - killed if client.failed else 0.0
    backends[0].start()  # back for the next scenario (the same port)
    wait_for(lambda: _servers(etcd) == 2, 60, f"{name}: the killed instance back")
    return {"contender": name, "event": "instance killed", "requests": float(client.ok + len(client.failed)),
            "failed": float(len(client.failed)), "last failure after s": last}  # fmt: skip


def _rolling(name: str, contender: Contender, proxy: Traefik, backends: list[HttpService],
             etcd: Etcd) -> dict[str, object]:  # fmt: skip
    client = Client(f"http://127.0.0.1:{proxy.port}/")
    with client.running():
        time.sleep(1.0)
        for backend in backends:  # one instance at a time: stop its sidekick, restart, start again
            contender.stop(backend.port)
            backend.kill()
            backend.start()
            contender.start(backend.port)
            wait_for(lambda: _servers(etcd) == 2, 60, f"{name}: the instance back")
            time.sleep(1.0 if contender.quick else 3.0)  # past Traefik's throttle: routed again
    return {"contender": name, "event": "rolling restart of 2", "requests": float(client.ok + len(client.failed)),
            "failed": float(len(client.failed)), "last failure after s": None}  # fmt: skip
