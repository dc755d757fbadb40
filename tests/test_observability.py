"""Metrics, /healthz and systemd notification, on a running agent over real sockets."""

from __future__ import annotations

import asyncio
import os
import platform
import shutil
import signal
import socket
import subprocess
import threading
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import announcer
from announcer.agent import ServiceAgent
from announcer.http import bind
from announcer.metrics import Metrics
from tests.agent_helpers import agent_config, eventually, running
from tests.servers import EtcdServer, HttpService, announcer_process, free_port, require, wait_until

ROOT = Path(__file__).resolve().parent.parent


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"http://127.0.0.1:{port}/metrics", timeout=5)).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float | None:  # type: ignore[type-arg]
    return samples.get((name, tuple(sorted(labels.items()))))


async def _equals(port: int, name: str, expected: float, **labels: str) -> bool:
    return value(await scrape(port), name, **labels) == expected


async def test_metrics_follow_service_and_etcd(etcd: EtcdServer, http_service: HttpService) -> None:
    listen = bind(("127.0.0.1", 0))
    port = listen.getsockname()[1]
    check = f"http://127.0.0.1:{http_service.port}/"
    key = f"/services/web/127.0.0.1:{http_service.port}"
    svc = {"service": "web", "key": key}  # per-service metrics carry the service and its key
    async with running(agent_config(etcd.url, http_service.port), metrics=Metrics(), listen=listen):
        await eventually(lambda: etcd.get(key) is not None, what="announce")
        # the put can land in etcd before its answer reaches the agent (on a loaded machine the
        # answer came after the 0.5 s timeout, and the agent counted it once the retry confirmed)
        await eventually(lambda: _equals(port, "announcer_registered", 1, **svc), what="registered")
        m = await scrape(port)
        assert value(m, "announcer_service_healthy", **svc) == 1
        assert value(m, "announcer_announcements_total", **svc) == 1
        assert value(m, "announcer_lease_grants_total") == 1
        assert value(m, "announcer_etcd_reachable") == 1
        assert value(m, "announcer_check_runs_total", **svc, check=check, result="pass") >= 2  # type: ignore[operator]
        assert value(m, "announcer_check_duration_seconds_count", **svc, check=check) >= 2  # type: ignore[operator]
        assert value(m, "announcer_etcd_requests_total", operation="put", outcome="ok") == 1
        assert value(m, "announcer_build_info", version=announcer.__version__,
                     python_version=platform.python_version()) == 1  # fmt: skip
        assert value(m, "process_resident_memory_bytes") > 0  # type: ignore[operator]

        http_service.status = 500
        await eventually(lambda: _equals(port, "announcer_registered", 0, **svc), what="withdrawn")
        m = await scrape(port)
        assert value(m, "announcer_service_healthy", **svc) == 0
        assert value(m, "announcer_withdrawals_total", **svc, reason="check_failure") == 1
        assert value(m, "announcer_check_runs_total", **svc, check=check, result="fail") >= 2  # type: ignore[operator]

        http_service.status = 200
        await eventually(lambda: _equals(port, "announcer_registered", 1, **svc), what="announced again")

        await asyncio.to_thread(etcd.stop)
        await eventually(lambda: _equals(port, "announcer_etcd_reachable", 0), timeout=15, what="etcd down")
        m = await scrape(port)
        unavailable = sum(v for (name, labels), v in m.items()
                          if name == "announcer_etcd_requests_total" and ("outcome", "unavailable") in labels)  # fmt: skip
        assert unavailable >= 1
        async with httpx.AsyncClient() as client:
            health = await client.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
        assert health.status_code == 200  # the agent is alive: it keeps checking
        assert health.json()["etcd_reachable"] is False
        await asyncio.to_thread(etcd.start)
        await eventually(lambda: _equals(port, "announcer_etcd_reachable", 1), timeout=15, what="etcd back")
        m = await scrape(port)
        assert value(m, "announcer_lease_ttl_seconds") > 0  # type: ignore[operator]
        # the lease kept alive again: etcd may be called back (by a sync) before the next
        # keepalive, which comes within its backoff
        await eventually(
            lambda: _kept_alive_within(port, 1.5), timeout=15, what="a keepalive since etcd is back"
        )


async def _kept_alive_within(port: int, seconds: float) -> bool:
    age = value(await scrape(port), "announcer_lease_keepalive_age_seconds")
    return age is not None and 0 <= age < seconds


def test_the_lease_is_confirmed_by_its_grant_before_any_keepalive() -> None:
    # A keepalive comes TTL/3 after the grant: until then the age counts from the grant,
    # which etcd answered just as it answers a keepalive. It said -1 ("none yet") there, and
    # a fresh-clone CI run scraped that -1 after an etcd restart.
    metrics = Metrics(process=False)
    assert sample(metrics, "announcer_lease_keepalive_age_seconds") == -1  # no lease yet
    metrics.observe_etcd("lease_grant", "ok", 0.01)
    assert 0 <= sample(metrics, "announcer_lease_keepalive_age_seconds") < 5
    metrics.observe_etcd("keepalive", "unavailable", 0.5)  # a failure confirms nothing
    metrics.observe_etcd("keepalive", "ok", 0.01)
    assert 0 <= sample(metrics, "announcer_lease_keepalive_age_seconds") < 5


def sample(metrics: Metrics, name: str) -> float | None:
    return metrics.registry.get_sample_value(name)


async def test_healthz_and_routes(etcd: EtcdServer, http_service: HttpService) -> None:
    listen = bind(("127.0.0.1", 0))
    base = f"http://127.0.0.1:{listen.getsockname()[1]}"
    async with running(agent_config(etcd.url, http_service.port), listen=listen) as agent:
        await eventually(lambda: agent.registered, what="announce")
        async with httpx.AsyncClient() as client:
            health = await client.get(base + "/healthz")
            assert health.status_code == 200
            body = health.json()
            assert body["status"] == "ok"
            assert (body["service"], body["state"]) == ("web", "passing")
            assert body["registered"] is True
            assert body["etcd_reachable"] is True
            assert (await client.head(base + "/metrics")).status_code == 200
            assert (await client.get(base + "/nope")).status_code == 404
            assert (await client.post(base + "/metrics")).status_code == 405


@pytest.mark.parametrize(
    ("age", "alive"),
    [(None, False), (1.0, True), (3.0, True), (3.1, False)],  # interval 0.9 x 3 + timeout 0.4 = 3.1
)
def test_a_check_loop_is_alive_while_its_last_round_is_recent(age: float | None, alive: bool) -> None:
    config = agent_config("http://127.0.0.1:1", 1, interval="0.9", timeout="0.39").services[0]
    service = ServiceAgent(
        config, Metrics(process=False).for_service("web", config.key), None, asyncio.Event()
    )  # type: ignore[arg-type]
    service.status.last_round = None if age is None else 100.0 - age
    assert service.loop_alive(100.0) is alive


def test_busy_metrics_port_is_exit_2(etcd: EtcdServer) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        with announcer_process("--service", "web", "--port", "80", "--ip", "127.0.0.1", "--etcd-endpoints", etcd.url,
                               "--metrics-address", f"127.0.0.1:{port}") as process:  # fmt: skip
            _, err = process.communicate(timeout=30)
    assert process.returncode == 2
    assert err.startswith(f"error: --metrics-address 127.0.0.1:{port}: cannot listen: ")
    assert err.count("\n") == 1


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        require("promtool not installed (apt-get install prometheus)")
    assert path is not None
    return path


def test_promtool_accepts_a_real_scrape(etcd: EtcdServer, http_service: HttpService) -> None:
    tool = promtool()
    port = free_port()
    with announcer_process("--service", "web", "--port", str(http_service.port), "--ip", "127.0.0.1",
                           "--interval", "0.2", "--timeout", "0.1", "--etcd-endpoints", etcd.url,
                           "--metrics-address", f"127.0.0.1:{port}") as process:  # fmt: skip
        key = f"/services/web/127.0.0.1:{http_service.port}"
        wait_until(lambda: etcd.get(key) is not None, 20, "announce")
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0
    done = subprocess.run(
        [tool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (done.stdout + done.stderr).strip() == ""  # no complaint at all


def test_example_alert_rules_are_valid_and_documented() -> None:
    tool = promtool()
    rules = ROOT / "examples" / "prometheus-alerts.yml"
    done = subprocess.run(
        [tool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 2 rules found" in done.stdout
    assert rules.read_text() in (ROOT / "docs" / "observability.md").read_text()


class NotifySocket:
    """A real unix datagram socket standing in for systemd's $NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.messages: list[str] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue
            except OSError:
                return

    def lines(self) -> list[str]:
        return [line for message in list(self.messages) for line in message.split("\n")]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def test_systemd_notification(etcd: EtcdServer, http_service: HttpService, tmp_path: Path) -> None:
    notify = NotifySocket(tmp_path / "notify.sock")
    key = f"/services/web/127.0.0.1:{http_service.port}"
    env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000"}  # a ping every 0.2 s
    try:
        with announcer_process("--service", "web", "--port", str(http_service.port), "--ip", "127.0.0.1",
                               "--interval", "0.1", "--timeout", "0.05", "--etcd-endpoints", etcd.url,
                               env=env) as process:  # fmt: skip
            wait_until(lambda: "READY=1" in notify.lines(), 20, "READY=1")
            # READY comes once etcd matches the first verdict: the record is there already
            assert etcd.get(key) is not None
            lines = notify.lines()
            assert lines.index("READY=1") > lines.index("STATUS=announced; service passing, registered")
            wait_until(lambda: notify.lines().count("WATCHDOG=1") >= 3, 10, "watchdog pings")
            assert "STOPPING=1" not in notify.lines()
            process.send_signal(signal.SIGTERM)
            assert process.wait(15) == 0
        assert "STOPPING=1" in notify.lines()
        assert notify.lines().count("READY=1") == 1
        assert etcd.get(key) is None
    finally:
        notify.close()


def test_ready_when_known_unhealthy(etcd: EtcdServer, tmp_path: Path) -> None:
    notify = NotifySocket(tmp_path / "notify.sock")
    port = free_port()  # nothing listens: the service is down from the start
    try:
        with announcer_process("--service", "web", "--port", str(port), "--ip", "127.0.0.1", "--interval", "0.1",
                               "--timeout", "0.05", "--etcd-endpoints", etcd.url,
                               env={"NOTIFY_SOCKET": str(notify.path)}) as process:  # fmt: skip
            wait_until(lambda: "READY=1" in notify.lines(), 20, "READY=1")
            # READY=1 and its STATUS= in one datagram: systemd (and this reader) see both at once
            assert "READY=1\nSTATUS=ready; service failing, not registered" in notify.messages
            assert "WATCHDOG=1" not in notify.lines()  # no WATCHDOG_USEC, no pings
            os.kill(process.pid, signal.SIGTERM)
            assert process.wait(15) == 0
    finally:
        notify.close()
