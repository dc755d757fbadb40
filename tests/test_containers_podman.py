"""Containers from a real engine: podman's Docker-compatible API service, real containers, real etcd.

A fixture starts ``podman system service --time=0 unix://...`` on a socket of the
test's own; the containers are made from the local base image (a tiny HTTP server
each, published on 127.0.0.1). This machine runs no systemd as PID 1, so podman
schedules no healthchecks: the tests run them with ``podman healthcheck run``.
Docker's own dialect is replayed by the fake engine in tests/test_containers.py.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.servers import (
    EtcdServer,
    HttpService,
    Watcher,
    announcer_process,
    b64,
    free_port,
    require,
    wait_until,
)

BASE = "localhost/bookworm-python3:latest"  # made by scripts/make-image-base.sh
SERVER = "python3 -m http.server --directory /srv 8000"
_names = itertools.count()
# podman starting containers loads the whole machine in bursts: test.sh runs these tests in a
# pass of their own, so the short-TTL tests beside them are not starved.
pytestmark = pytest.mark.engine


def podman(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, check=check)


@dataclass
class PodmanApi:
    """podman's API service on a socket of the test's own, and the containers the test made."""

    socket: Path
    tag: str = field(default_factory=lambda: f"{os.getpid()}-{time.monotonic_ns()}")
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self) -> None:
        self.socket.unlink(missing_ok=True)
        self.process = subprocess.Popen(
            ["podman", "system", "service", "--time=0", self.url],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_until(self.socket.exists, 20, "podman's API socket")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None

    def run(self, *args: str, port: int | None = None, command: str = SERVER) -> tuple[str, int]:
        """A container serving HTTP on 8000, published on 127.0.0.1: (its name, its host port).

        A free port can be taken between choosing it and podman's bind (CI once lost one so
        beside another worker): a port of our choosing is chosen again, twice at most."""
        said = []
        for _ in range(1 if port else 3):
            name = f"announcer-test-{self.tag}-{next(_names)}"
            host_port = port or free_port()
            done = podman(
                "run", "-d", "--name", name, "--label", f"announcer-test={self.tag}",
                "-p", f"127.0.0.1:{host_port}:8000", *args, BASE, "sh", "-c",
                f"echo ok > /srv/ok.txt && exec {command}", check=False,
            )  # fmt: skip
            if done.returncode == 0:
                return name, host_port
            said.append(done.stderr.strip())
            podman("rm", "-f", "-t", "0", name, check=False)
        raise AssertionError(f"podman run failed: {said}")

    def remove_all(self) -> None:
        found = podman(
            "ps", "-aq", "--filter", f"label=announcer-test={self.tag}", check=False
        ).stdout.split()
        chunks = [found[i::8] for i in range(8) if found[i::8]]
        with ThreadPoolExecutor(8) as pool:
            list(
                pool.map(
                    lambda chunk: podman("rm", "-f", "-t", "0", *chunk, check=False, timeout=120), chunks
                )
            )


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[PodmanApi]:
    if shutil.which("podman") is None:
        require("podman not installed (scripts/make-image-base.sh installs it)")
    if podman("image", "exists", BASE, check=False).returncode != 0:
        require(f"no base image {BASE} (scripts/make-image-base.sh makes it)")
    api = PodmanApi(tmp_path / "podman.sock")
    api.start()
    try:
        yield api
    finally:
        api.stop()
        api.remove_all()


def agent_args(engine: PodmanApi, etcd: EtcdServer, *extra: str) -> list[str]:
    return [
        "--containers", "--container-engine", engine.url, "--ip", "127.0.0.1", "--etcd-endpoints", etcd.url,
        "--ttl", "3", "--interval", "0.2", "--timeout", "0.15", "--rise", "1", "--fall", "1", *extra,
    ]  # fmt: skip


def key(service: str, port: int) -> str:
    return f"/services/{service}/127.0.0.1:{port}"


def deletes(watcher: Watcher, name: str) -> int:
    return sum(1 for e in watcher.events if e.get("type") == "DELETE" and e["kv"]["key"] == b64(name))


@pytest.mark.slow  # real containers: about a second each to make and remove
def test_a_container_is_announced_and_withdrawn_at_its_stop_kill_and_pause(
    engine: PodmanApi, etcd: EtcdServer
) -> None:
    # fall 1000: a failing check would take 200 s to withdraw; only the engine's events can here.
    with announcer_process(*agent_args(engine, etcd), "--fall", "1000") as agent:
        stopped, stopped_port = engine.run("--label", "announcer.service=web")
        killed, killed_port = engine.run("--label", "announcer.service=web")
        paused, paused_port = engine.run("--label", "announcer.service=web")
        for port in (stopped_port, killed_port, paused_port):
            wait_until(lambda port=port: etcd.get(key("web", port)) is not None, 20, f"web on {port}")
        record = etcd.value(key("web", stopped_port))
        assert record["source"] == "containers"
        assert record["service"] == "web"
        podman("stop", "-t", "0", stopped)
        wait_until(lambda: etcd.get(key("web", stopped_port)) is None, 5, "withdrawn at the stop")
        podman("kill", "-s", "KILL", killed)
        wait_until(lambda: etcd.get(key("web", killed_port)) is None, 5, "withdrawn at the kill")
        podman("pause", paused)
        wait_until(lambda: etcd.get(key("web", paused_port)) is None, 5, "withdrawn at the pause")
        podman("unpause", paused)
        wait_until(lambda: etcd.get(key("web", paused_port)) is not None, 10, "back at the unpause")
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(15) == 0
    assert etcd.get(key("web", paused_port)) is None


@pytest.mark.slow
def test_the_healthcheck_and_a_check_label_decide(engine: PodmanApi, etcd: EtcdServer) -> None:
    with announcer_process(*agent_args(engine, etcd)):
        checked, checked_port = engine.run(
            "--label", "announcer.service=api", "--health-cmd", "test -f /srv/ok.txt", "--health-retries", "1"
        )
        labelled, labelled_port = engine.run(
            "--label", "announcer.service=shop", "--label", "announcer.check=http://{ip}:{port}/ok.txt"
        )
        wait_until(lambda: etcd.get(key("shop", labelled_port)) is not None, 20, "shop announced")
        assert etcd.get(key("api", checked_port)) is None  # starting: no verdict yet
        assert podman("healthcheck", "run", checked, check=False).returncode == 0
        wait_until(lambda: etcd.get(key("api", checked_port)) is not None, 20, "healthy: announced")
        podman("exec", checked, "rm", "/srv/ok.txt")
        assert podman("healthcheck", "run", checked, check=False).returncode != 0
        wait_until(lambda: etcd.get(key("api", checked_port)) is None, 10, "unhealthy: withdrawn")
        podman("exec", checked, "touch", "/srv/ok.txt")
        assert podman("healthcheck", "run", checked, check=False).returncode == 0
        wait_until(lambda: etcd.get(key("api", checked_port)) is not None, 10, "healthy again: back")
        podman("exec", labelled, "rm", "/srv/ok.txt")  # its label's http check now gets a 404
        wait_until(lambda: etcd.get(key("shop", labelled_port)) is None, 10, "the label's check failing")


@pytest.mark.slow
def test_registrators_labels_and_environment_are_honoured(engine: PodmanApi, etcd: EtcdServer) -> None:
    with announcer_process(*agent_args(engine, etcd)):
        _, named_port = engine.run("-e", "SERVICE_NAME=legacy", "-e", "SERVICE_TAGS=blue,canary")
        _, ignored_port = engine.run("--label", "SERVICE_NAME=hidden", "--label", "SERVICE_IGNORE=true")
        _, plain_port = engine.run()
        wait_until(lambda: etcd.get(key("legacy", named_port)) is not None, 20, "the SERVICE_NAME one")
        wait_until(
            lambda: etcd.get(key("bookworm-python3", plain_port)) is not None, 20, "named by its image"
        )
        assert etcd.value(key("legacy", named_port))["tags"] == ["blue", "canary"]
        assert etcd.get(key("hidden", ignored_port)) is None


@pytest.mark.slow
def test_the_engine_restarting_withdraws_no_live_container(engine: PodmanApi, etcd: EtcdServer) -> None:
    watcher = Watcher(etcd, "/services/")
    try:
        # fall 1000: the removed container's failing check cannot withdraw it; the list after
        # the reconnect must.
        with announcer_process(*agent_args(engine, etcd), "--fall", "1000") as agent:
            _, live_port = engine.run("--label", "announcer.service=web")
            removed, removed_port = engine.run("--label", "announcer.service=web")
            for port in (live_port, removed_port):
                wait_until(lambda port=port: etcd.get(key("web", port)) is not None, 20, f"web on {port}")
            engine.stop()
            podman("rm", "-f", "-t", "0", removed)  # the CLI needs no API service
            engine.start()
            wait_until(lambda: etcd.get(key("web", removed_port)) is None, 20, "the removed one withdrawn")
            assert etcd.get(key("web", live_port)) is not None
            assert deletes(watcher, key("web", live_port)) == 0
            agent.send_signal(signal.SIGTERM)
            _, err = agent.communicate(timeout=15)
        said = [json.loads(line)["event"] for line in err.splitlines() if line.startswith("{")]
        assert sum(e.startswith("container engine unreachable") for e in said) == 1
        assert "container engine reachable again" in said
    finally:
        watcher.close()


@pytest.mark.slow
def test_a_restarted_agent_adopts_live_containers_without_a_gap_and_removes_gone_ones(
    engine: PodmanApi, etcd: EtcdServer
) -> None:
    watcher = Watcher(etcd, "/services/")
    # TTL 30: what the killed agent left would stay 30 s; only the sweep removes it sooner.
    args = agent_args(engine, etcd, "--ttl", "30")
    try:
        _, live_port = engine.run("--label", "announcer.service=web")
        gone, gone_port = engine.run("--label", "announcer.service=web")
        with announcer_process(*args) as first:
            for port in (live_port, gone_port):
                wait_until(lambda port=port: etcd.get(key("web", port)) is not None, 20, f"web on {port}")
            first.send_signal(signal.SIGKILL)
            first.wait(10)
        podman("rm", "-f", "-t", "0", gone)
        old_lease = etcd.get(key("web", live_port))["lease"]
        with announcer_process(*args) as second:
            wait_until(
                lambda: etcd.get(key("web", gone_port)) is None, 15, "the gone container's record removed"
            )
            wait_until(
                lambda: etcd.get(key("web", live_port))["lease"] != old_lease, 15, "adopted on the new lease"
            )
            second.send_signal(signal.SIGTERM)
            _, err = second.communicate(timeout=15)
        assert deletes(watcher, key("web", live_port)) == 1  # only the second agent's SIGTERM withdraw
        assert "removed a record of a container that is gone" in err
    finally:
        watcher.close()


@pytest.mark.slow  # fifty real containers
def test_fifty_containers_at_once(engine: PodmanApi, etcd: EtcdServer, http_service: HttpService) -> None:
    # Fifty checks a round on a machine busy starting fifty containers (and other tests): a
    # 1 s interval, a 0.5 s deadline and fall 3, so a slow round is no withdraw. The containers
    # only sleep (fifty Python servers would load the machine for the tests beside this one);
    # their label's check reaches a server of the test's.
    check = f"announcer.check=tcp://127.0.0.1:{http_service.port}"
    labels = ["--label", "announcer.service=many", "--label", check]
    args = agent_args(engine, etcd, "--interval", "1", "--timeout", "0.5", "--fall", "3")
    with announcer_process(*args) as agent:
        with ThreadPoolExecutor(4) as pool:
            ports = list(pool.map(lambda _: engine.run(*labels, command="sleep infinity")[1], range(50)))
        wait_until(lambda: len(etcd.range_prefix("/services/many/")) == 50, 120, "fifty records")
        names = podman("ps", "-q", "--filter", f"label=announcer-test={engine.tag}").stdout.split()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda name: podman("kill", "-s", "KILL", name), names))
        wait_until(lambda: etcd.range_prefix("/services/many/") == [], 120, "every record withdrawn")
        agent.send_signal(signal.SIGTERM)
        agent.communicate(timeout=15)  # read what it logged, or a full pipe would hold it
        assert agent.returncode == 0
    assert len(set(ports)) == 50
