"""Containers (#22): one host agent against a real podman API service, and what sidekicks cost instead.

- start -> record and stop -> withdrawn for N containers one after another (each timed
  from the `podman` command's start, which is itself shown);
- the host agent's RSS and CPU with 50 and 200 running containers, side by side with 50
  sidekick containers of today's image (one per service container, `--network host`).

Every container is a tiny HTTP server from the local base image (scripts/make-image-base.sh),
published on 127.0.0.1; the agent runs with --interval 1 --rise 1, so the time to a record
is announcer's and podman's, not a rise policy's.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.harness import (
    ROOT,
    Etcd,
    b64,
    cpu_ns,
    free_port,
    proc_stat,
    start_announcer_with,
    stop_process,
    summary,
    wait_for,
    workspace,
)

BASE = "localhost/bookworm-python3:latest"
IMAGE = "localhost/announcer:bench"
SERVER = "python3 -m http.server 8000"
Rows = list[dict[str, Any]]


def podman(*args: str, timeout: float = 600) -> str:
    return subprocess.run(
        ["podman", *args], capture_output=True, text=True, timeout=timeout, check=True
    ).stdout


@contextlib.contextmanager
def engine(workdir: Path) -> Iterator[str]:
    socket = workdir / "podman.sock"
    process = subprocess.Popen(["podman", "system", "service", "--time=0", f"unix://{socket}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_for(socket.exists, 20, "podman's API socket")
        yield f"unix://{socket}"
    finally:
        stop_process(process)


class Containers:
    """The containers a run made, labelled so that all of them go at the end."""

    def __init__(self) -> None:
        self.tag = f"announcer-bench-{os.getpid()}"

    def run(self, service: str = "bench") -> tuple[str, int, float]:
        """One web container: (its ID, its host port, seconds the podman command took)."""
        for attempt in range(3):
            port = free_port()
            started = time.monotonic()
            try:
                cid = podman("run", "-d", "--label", self.tag, "--label", f"announcer.service={service}",
                             "-p", f"127.0.0.1:{port}:8000", BASE, *SERVER.split()).strip()  # fmt: skip
            except subprocess.CalledProcessError as exc:
                # Many at once, a port chosen free can be taken before podman binds it: another.
                if attempt == 2:
                    raise RuntimeError(f"podman run failed: {exc.stderr.strip()[-300:]}") from None
                continue
            return cid, port, time.monotonic() - started
        raise AssertionError("unreachable")

    def many(self, count: int, service: str = "bench") -> list[tuple[str, int, float]]:
        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(lambda _: self.run(service), range(count)))

    def remove_all(self) -> None:
        found = podman("ps", "-aq", "--filter", f"label={self.tag}").split()
        chunks = [found[i::8] for i in range(8) if found[i::8]]
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda chunk: podman("rm", "-f", "-t", "0", *chunk), chunks))


def _key(service: str, port: int) -> str:
    return f"/services/{service}/127.0.0.1:{port}"


def _latencies(etcd: Etcd, made: Containers, count: int) -> Rows:
    """Each container started, its record awaited, stopped, its withdraw awaited: one at a time."""
    up: list[float] = []
    down: list[float] = []
    commands: list[float] = []
    for _ in range(count):
        started = time.monotonic()
        cid, port, command = made.run()
        commands.append(command)
        key = _key("bench", port)
        up.append(wait_for(lambda key=key: etcd.v3_exists(key), 30, "the record", poll=0.005) - started)
        started = time.monotonic()
        podman("stop", "-t", "0", cid)
        down.append(
            wait_for(lambda key=key: not etcd.v3_exists(key), 30, "the withdraw", poll=0.005) - started
        )
    rows = []
    for measure, values in (("start -> record", up), ("stop -> withdrawn", down)):
        stats = summary(values)
        rows.append({
            "measure": measure, "containers": float(count), "median s": stats["median"], "p95 s": stats["p95"],
            "max s": stats["max"], "podman run itself, median s": summary(commands)["median"],
        })  # fmt: skip
    return rows


def _steady(pids: list[int], window: float) -> dict[str, float]:
    before = sum(cpu_ns(pid) for pid in pids)
    time.sleep(window)
    spent = sum(cpu_ns(pid) for pid in pids) - before
    return {
        "RSS MB": sum(proc_stat(pid).rss_kb for pid in pids) / 1024,
        "CPU % of a core": 100 * spent / 1e9 / window,
    }


def _sidekick_image() -> str:
    with workspace() as tmp:
        pip_conf = tmp / "pip.conf"
        pip_conf.write_text("[global]\ncert = /etc/ssl/host-ca.crt\n")
        podman("build", "--format", "docker", "--build-arg", f"PYTHON_IMAGE={BASE}",
               "-v", "/etc/ssl/certs/ca-certificates.crt:/etc/ssl/host-ca.crt:ro",
               "-v", f"{pip_conf}:/etc/pip.conf:ro", "-t", IMAGE, str(ROOT))  # fmt: skip
    return IMAGE


def containers(mode: Any) -> Rows:
    quick = bool(mode.quick)
    count, scale, window = (3, (3, 6), 3.0) if quick else (50, (50, 200), 30.0)
    made = Containers()
    with workspace() as tmp, engine(tmp) as url:
        etcd = Etcd(tmp).start()
        agent = start_announcer_with(etcd, "--containers", "--container-engine", url, "--ip", "127.0.0.1",
                                     "--interval", "1", "--timeout", "0.5", "--rise", "1")  # fmt: skip
        try:
            rows = _latencies(etcd, made, count)
            made.remove_all()
            for total in scale:
                made.many(total)
                wait_for(
                    lambda total=total: len(_range(etcd, "/services/bench/")) == total, 120, "every record"
                )
                rows.append({"setup": f"host agent, {total} containers", **_steady([agent.pid], window)})
                made.remove_all()
            # Today's way: a sidekick container of the image beside each service container.
            image = _sidekick_image()
            services = made.many(scale[0], service="sidekicked")
            sidekicks = []
            for _, port, _ in services:
                sidekicks.append(podman("run", "-d", "--label", made.tag, "--network", "host", image,
                                        "--service", "side", "--port", str(port), "--ip", "127.0.0.1",
                                        "--etcd-endpoints", etcd.url, "--interval", "1", "--timeout", "0.5", "--rise", "1").strip())  # fmt: skip
            wait_for(lambda: len(_range(etcd, "/services/side/")) == scale[0], 180, "every sidekick's record")
            pids = [int(podman("inspect", "--format", "{{.State.Pid}}", cid).strip()) for cid in sidekicks]
            rows.append({"setup": f"{scale[0]} sidekick containers (today's image)", **_steady(pids, window)})
        finally:
            agent.send_signal(signal.SIGTERM)
            stop_process(agent)
            made.remove_all()
            etcd.stop()
    return rows


def _range(etcd: Etcd, prefix: str) -> list[Any]:
    end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    kvs = etcd.v3("/v3/kv/range", {"key": b64(prefix), "range_end": b64(end), "keys_only": True}).get("kvs")
    return list(kvs) if isinstance(kvs, list) else []
