"""A real Traefik reads what announcer writes to a real etcd, and routes real requests by it.

The routers are the operator's, written by the test; the servers are announcer's
(`--publish traefik` / `traefik-tcp`). A client loops over Traefik and every answer
is counted: a drain, a rolling restart and maintenance must fail not one request.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agent_helpers import agent_config, eventually, in_thread, running
from tests.servers import EtcdServer, HttpService, announcer_process
from tests.traefik import ClientLoop, EchoServer, Traefik

HTTP_SERVERS = "traefik/http/services/web/loadBalancer/servers/"
DRAIN = "2"  # longer than Traefik's throttle (0.5 s here) plus its reload
ANNOUNCER = [sys.executable, "-m", "announcer"]


@pytest.fixture
def traefik(etcd: EtcdServer, tmp_path: Path) -> Iterator[Traefik]:
    proxy = Traefik(etcd, tmp_path)
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture
def backends() -> Iterator[dict[str, HttpService]]:
    made = {name: HttpService() for name in ("A", "B")}
    for name, service in made.items():
        service.body = name.encode()
    yield made
    for service in made.values():
        service.close()


def servers(etcd: EtcdServer) -> list[str]:
    return [kv["key"].removeprefix(HTTP_SERVERS) for kv in etcd.range_prefix(HTTP_SERVERS)]


def web_config(etcd: EtcdServer, port: int, **flags: str):  # type: ignore[no-untyped-def]
    return agent_config(etcd.url, port, publish=["traefik"], hostname="node-1", **flags)


async def test_an_announced_instance_is_routed_and_a_killed_one_is_not(
    etcd: EtcdServer, traefik: Traefik, backends: dict[str, HttpService]
) -> None:
    traefik.route_http("web")
    a, b = backends["A"], backends["B"]
    async with running(web_config(etcd, a.port)), running(web_config(etcd, b.port)):
        await eventually(
            in_thread(lambda: set(traefik.bodies(10)) == {"A", "B"}), timeout=20, what="both routed", poll=0.1
        )
        a.close()  # the service dies; its sidekick withdraws after --fall rounds
        await eventually(lambda: servers(etcd) == [f"node-1-{b.port}/url"], what="A's key withdrawn")
        await eventually(
            in_thread(lambda: traefik.bodies(20) == {"B": 20}), timeout=20, what="Traefik drops A", poll=0.1
        )


def sidekick(etcd: EtcdServer, service: HttpService) -> list[str]:
    return [
        "--service", "web", "--port", str(service.port), "--ip", "127.0.0.1", "--hostname", "node-1",
        "--publish", "traefik", "--etcd-endpoints", etcd.url, "--interval", "0.2", "--timeout", "0.15",
        "--ttl", "6", "--drain", DRAIN,
    ]  # fmt: skip


def start_sidekick(etcd: EtcdServer, service: HttpService) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*ANNOUNCER, *sidekick(etcd, service)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def stop_with_drain(process: subprocess.Popen[str] | subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    assert process.wait(15) == 0


def test_sigterm_with_a_drain_fails_no_request(
    etcd: EtcdServer, traefik: Traefik, backends: dict[str, HttpService]
) -> None:
    traefik.route_http("web")
    a, b = backends["A"], backends["B"]
    with announcer_process(*sidekick(etcd, a)) as agent_a, announcer_process(*sidekick(etcd, b)):
        with ClientLoop(traefik) as client:
            client.wait_for("A")
            client.wait_for("B")
            routed = len(client.failures)  # before both were announced, Traefik had nothing to route to
            stop_with_drain(agent_a)  # withdraws at once, stays up DRAIN seconds, exits 0
            assert servers(etcd) == [f"node-1-{b.port}/url"]
            a.close()  # only now does the service itself stop
            client.wait_for("B", more=50)
        assert client.failures[routed:] == []


def test_a_rolling_restart_of_both_instances_fails_no_request(
    etcd: EtcdServer, traefik: Traefik, tmp_path: Path
) -> None:
    traefik.route_http("web")
    services = [HttpService(), HttpService()]
    for number, service in enumerate(services):
        service.body = f"v1-{number}".encode()
    agents = [start_sidekick(etcd, service) for service in services]
    try:
        with ClientLoop(traefik) as client:
            for number in range(2):
                client.wait_for(f"v1-{number}")
            routed = len(client.failures)
            for number in range(2):  # one instance at a time: stop, upgrade, start
                stop_with_drain(agents[number])
                services[number].close()
                services[number] = HttpService()
                services[number].body = f"v2-{number}".encode()
                agents[number] = start_sidekick(etcd, services[number])
                client.wait_for(f"v2-{number}")
        assert client.failures[routed:] == []
        assert all(client.answers[f"v2-{n}"] > 0 for n in range(2))
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
            agent.wait(10)
        for service in services:
            service.close()


async def test_maintenance_drains_an_instance_from_traefik(
    etcd: EtcdServer, traefik: Traefik, backends: dict[str, HttpService], tmp_path: Path
) -> None:
    traefik.route_http("web")
    a, b = backends["A"], backends["B"]
    flag = tmp_path / f"maintenance-{a.port}"
    maintenance = str(tmp_path / "maintenance-{port}")
    async with (
        running(web_config(etcd, a.port, maintenance_file=maintenance)),
        running(web_config(etcd, b.port)),
    ):
        with ClientLoop(traefik) as client:
            await eventually(
                lambda: client.answers["A"] > 10 and client.answers["B"] > 10, timeout=20, what="both"
            )
            routed = len(client.failures)
            flag.touch()
            await eventually(lambda: servers(etcd) == [f"node-1-{b.port}/url"], what="A withdrawn")
            await eventually(
                in_thread(lambda: traefik.bodies(10) == {"B": 10}),
                timeout=20,
                what="Traefik drains A",
                poll=0.1,
            )
            drained = client.answers["A"]
            start = client.answers["B"]
            await eventually(lambda: client.answers["B"] >= start + 50, timeout=20, what="50 more answers")
            assert client.answers["A"] == drained  # not one request reached A while it was drained
            flag.unlink()
            await eventually(
                lambda: client.answers["A"] > drained, timeout=20, what="A back after maintenance"
            )
        assert client.failures[routed:] == []


async def test_a_tcp_service_through_a_traefik_tcp_router(etcd: EtcdServer, traefik: Traefik) -> None:
    traefik.route_tcp("db")
    echo = EchoServer(b"A")
    config = agent_config(
        etcd.url, echo.port, service="db", publish=["traefik-tcp"], check=["tcp"], hostname="node-1"
    )
    key = f"traefik/tcp/services/db/loadBalancer/servers/node-1-{echo.port}/address"
    try:
        async with running(config):
            await eventually(lambda: etcd.get(key) is not None, what="announced")
            assert etcd.get(key)["value"] == f"127.0.0.1:{echo.port}"  # type: ignore[index]
            await eventually(
                in_thread(lambda: _exchange(traefik) == b"A:ping"),
                timeout=20,
                what="routed over TCP",
                poll=0.1,
            )
            echo.close()
            await eventually(lambda: etcd.get(key) is None, what="withdrawn after the service died")
    finally:
        echo.close()


def _exchange(traefik: Traefik) -> bytes | None:
    try:
        return traefik.tcp_exchange(b"ping")
    except OSError:
        return None
