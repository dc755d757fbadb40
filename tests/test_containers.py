"""The container source (announcer/containers/source.py) feeding a real agent, fast.

A fake engine speaks Docker's dialect (tests/fake_engine.py) and the agent runs on the
in-memory registrar: these tests pin down the decisions (withdrawn at the event, the
HEALTHCHECK's states, the engine going away, the sweep, a hostile engine). The real
engine (podman) with real etcd is in tests/test_containers_podman.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from announcer.agent import Agent
from announcer.config import load_config
from announcer.containers.engine import Engine
from announcer.containers.source import ContainerSource
from announcer.metrics import Metrics
from announcer.registrar import Registrar
from tests.agent_helpers import AMBIENT, eventually
from tests.fake_engine import HOSTILE, FakeEngine, docker_container, docker_event, fake_engine, published
from tests.memory_store import MemoryStore, memory_registrar
from tests.servers import SilentListener
from tests.test_agent import RecordingNotifier

A = "a1" * 32
B = "b2" * 32


@contextlib.asynccontextmanager
async def agent_with_engine(
    tmp_path: Path, *containers: dict[str, Any], metrics: Metrics | None = None, **flags: Any
) -> AsyncIterator[tuple[FakeEngine, Agent, MemoryStore]]:
    async with fake_engine(tmp_path / "docker.sock") as engine:
        for doc in containers:
            engine.add(doc, announce=False)
        # TTL 10 unless a test asks: these tests are about the engine, and a loaded CI machine
        # once starved a 3 s lease of the in-memory store while a hostile engine was retried.
        base = {
            "containers": True, "container_engine": engine.url, "ip": "127.0.0.1", "interval": "0.05",
            "timeout": "0.04", "rise": "1", "fall": "1", "ttl": "10",
        }  # fmt: skip
        config = load_config({**base, **flags}, {}, AMBIENT)
        registrar, store = memory_registrar(ttl=config.ttl)
        assert config.containers is not None
        source = ContainerSource(config, Engine(config.containers.engine, timeout=1.0), sweep=registrar.sweep)
        agent = Agent(
            config, registrar=registrar, metrics=metrics or Metrics(process=False), notifier=RecordingNotifier(),
            containers=source,
        )  # fmt: skip
        stop = asyncio.Event()
        task = asyncio.create_task(agent.serve(stop.wait()))
        try:
            yield engine, agent, store
        finally:
            assert not task.done(), "the agent ended on its own"
            stop.set()
            await asyncio.wait_for(task, 10)
        assert {method for method, _ in engine.requests} == {"GET"}  # the engine's socket is only read


def key(service: str, port: int) -> str:
    return f"/services/{service}/127.0.0.1:{port}"


@pytest.fixture
def listener() -> Any:
    alive = SilentListener()  # accepts: a passing tcp check, whatever the engine says
    yield alive
    alive.close()


async def test_a_running_container_is_announced_with_its_mark(
    tmp_path: Path, listener: SilentListener
) -> None:
    doc = docker_container(A, "web", ports=published(80, listener.port), env=["SERVICE_TAGS=blue,green"])
    async with agent_with_engine(tmp_path, doc) as (_, agent, store):
        await eventually(lambda: key("nginx", listener.port) in store.data, what="the record")
        record = json.loads(store.data[key("nginx", listener.port)].value)
        assert record == {
            "host": "node-1", "ipv4_addr": "127.0.0.1", "port": listener.port, "service": "nginx",
            "source": "containers", "container": A[:12], "tags": ["blue", "green"],
        }  # fmt: skip
        [svc] = agent.services
        assert svc.details()["service"] == "nginx"


@pytest.mark.parametrize("action", ["die", "stop", "kill", "destroy", "died", "remove"])
async def test_a_container_that_stops_is_withdrawn_at_the_event(
    tmp_path: Path, listener: SilentListener, action: str
) -> None:
    # The port still accepts connections: only the event can withdraw the record.
    async with agent_with_engine(tmp_path, docker_container(A, "web", ports=published(80, listener.port))) as (
        engine, agent, store,
    ):  # fmt: skip
        await eventually(lambda: key("nginx", listener.port) in store.data, what="the record")
        rounds = agent.services[0].status.rounds
        engine.containers[A]["State"].update(Running=False, Status="exited")
        engine.emit(docker_event(A, action))
        await eventually(lambda: key("nginx", listener.port) not in store.data, what="the withdraw")
        assert [s.retired_because for s in agent.services] in ([], ["container_stopped"])
        assert agent.services == [] or agent.services[0].status.rounds - rounds < 20


async def test_pause_withdraws_and_unpause_announces_again(tmp_path: Path, listener: SilentListener) -> None:
    async with agent_with_engine(tmp_path, docker_container(A, "web", ports=published(80, listener.port))) as (
        engine, _, store,
    ):  # fmt: skip
        await eventually(lambda: key("nginx", listener.port) in store.data, what="the record")
        engine.containers[A]["State"].update(Paused=True, Status="paused")
        engine.emit(docker_event(A, "pause"))
        await eventually(lambda: key("nginx", listener.port) not in store.data, what="the withdraw")
        engine.containers[A]["State"].update(Paused=False, Status="running")
        engine.emit(docker_event(A, "unpause"))
        await eventually(lambda: key("nginx", listener.port) in store.data, what="the record back")


async def test_a_kill_that_leaves_it_running_brings_it_back(tmp_path: Path, listener: SilentListener) -> None:
    # `docker kill -s HUP`: a kill event, and the container lives on.
    async with agent_with_engine(tmp_path, docker_container(A, "web", ports=published(80, listener.port))) as (
        engine, _, store,
    ):  # fmt: skip
        await eventually(lambda: key("nginx", listener.port) in store.data, what="the record")
        engine.emit(docker_event(A, "kill"))
        await eventually(lambda: key("nginx", listener.port) not in store.data, what="the withdraw")
        await eventually(lambda: key("nginx", listener.port) in store.data, what="the record back")


async def test_a_kill_with_a_reload_signal_withdraws_nothing(
    tmp_path: Path, listener: SilentListener
) -> None:
    # `docker kill -s HUP nginx` reloads nginx: Docker's event names the signal.
    async with agent_with_engine(tmp_path, docker_container(A, "web", ports=published(80, listener.port))) as (
        engine, agent, store,
    ):  # fmt: skip
        await eventually(lambda: key("nginx", listener.port) in store.data, what="the record")
        hup = docker_event(A, "kill")
        hup["Actor"]["Attributes"]["signal"] = "1"
        engine.emit(hup)
        rounds = agent.services[0].status.rounds
        await eventually(lambda: agent.services[0].status.rounds > rounds + 20, what="rounds after the HUP")
        assert key("nginx", listener.port) in store.data  # a withdraw at the HUP would be done by now
        term = docker_event(A, "kill")
        term["Actor"]["Attributes"]["signal"] = "15"
        engine.containers[A]["State"].update(Running=False, Status="exited")
        engine.emit(term)  # after the HUP: once this withdraws, the HUP has been read
        await eventually(lambda: key("nginx", listener.port) not in store.data, what="the withdraw at TERM")
        changes = [e.kind for _, e in store.history if e.kv.key == key("nginx", listener.port).encode()]
        assert changes == ["PUT", "DELETE"]  # never withdrawn at the HUP


async def test_the_healthcheck_decides_in_dockers_dialect(tmp_path: Path, listener: SilentListener) -> None:
    doc = docker_container(A, "web", ports=published(80, listener.port), health="starting")
    async with agent_with_engine(tmp_path, doc) as (engine, agent, store):
        await eventually(lambda: agent.services and agent.services[0].status.rounds >= 5, what="rounds")
        assert key("nginx", listener.port) not in store.data  # starting: no verdict yet
        assert agent.services[0].status.results[0].pending
        engine.emit(docker_event(A, "health_status: healthy"))
        await eventually(lambda: key("nginx", listener.port) in store.data, what="healthy: announced")
        engine.emit(docker_event(A, "health_status: unhealthy"))
        await eventually(lambda: key("nginx", listener.port) not in store.data, what="unhealthy: withdrawn")


async def test_a_check_label_wins_over_the_healthcheck(tmp_path: Path, listener: SilentListener) -> None:
    doc = docker_container(
        A, "web", ports=published(80, listener.port), health="unhealthy", labels={"announcer.check": "tcp"}
    )
    async with agent_with_engine(tmp_path, doc) as (_, agent, store):
        await eventually(lambda: key("nginx", listener.port) in store.data, what="the record")
        assert [c.name for c in agent.services[0].config.checks] == [f"tcp://127.0.0.1:{listener.port}"]


async def test_the_engine_going_away_withdraws_nothing_and_a_gone_container_goes_after_the_reconnect(
    tmp_path: Path, listener: SilentListener
) -> None:
    other = SilentListener()
    docs = [
        docker_container(A, "a", ports=published(80, listener.port), labels={"announcer.service": "a"}),
        docker_container(B, "b", ports=published(80, other.port), labels={"announcer.service": "b"}),
    ]
    try:
        with capture_logs() as logs:
            async with agent_with_engine(tmp_path, *docs) as (engine, agent, store):
                await eventually(lambda: len(store.data) == 2, what="both records")
                await engine.stop()
                rounds = agent.services[0].status.rounds
                await eventually(
                    lambda: agent.services[0].status.rounds > rounds + 20, what="rounds without the engine"
                )
                assert len(store.data) == 2
                del engine.containers[B]  # removed while the engine was away
                await engine.start()
                await eventually(lambda: key("b", other.port) not in store.data, what="b withdrawn")
                assert key("a", listener.port) in store.data
        unreachable = [e for e in logs if e["event"].startswith("container engine unreachable")]
        assert len(unreachable) == 1
        assert any(e["event"] == "container engine reachable again" for e in logs)
    finally:
        other.close()


async def test_a_healthcheck_verdict_outlives_an_unreachable_engine_by_one_ttl(
    tmp_path: Path, listener: SilentListener
) -> None:
    doc = docker_container(A, "web", ports=published(80, listener.port), health="healthy")
    async with agent_with_engine(tmp_path, doc, ttl="3") as (engine, agent, store):
        await eventually(lambda: key("nginx", listener.port) in store.data, what="the record")
        await engine.stop()
        loop = asyncio.get_running_loop()
        lost = loop.time()
        await eventually(
            lambda: key("nginx", listener.port) not in store.data, timeout=15, what="the withdraw"
        )
        assert loop.time() - lost >= 3 - 0.2  # kept for the TTL (3 s), not dropped with the engine
        assert "unreachable" in agent.services[0].status.results[0].detail


async def test_the_sweep_removes_only_what_this_host_left_for_gone_containers(
    tmp_path: Path, listener: SilentListener
) -> None:
    def mark(container: str, port: int, host: str = "node-1", source: str = "containers") -> bytes:
        return json.dumps({
            "host": host, "ipv4_addr": "127.0.0.1", "port": port, "service": "nginx", "source": source,
            "container": container,
        }).encode()  # fmt: skip

    doc = docker_container(A, "web", ports=published(80, listener.port))
    registrar_store = MemoryStore()
    old, _ = await registrar_store.grant(30)  # a predecessor's lease, still alive
    leftovers = {
        key("nginx", 9001): mark("dead00000001", 9001),  # a gone container: removed
        "/plain/nginx/node-1-9001": b"127.0.0.1:9001",  # its plain key on the same lease: removed
        key("nginx", listener.port): mark(A[:12], listener.port),  # alive: left to its checks
        key("nginx", 9002): mark("dead00000002", 9002, host="node-2"),  # another host's
        key("nginx", 9003): mark("dead00000003", 9003, source="config"),  # not a container's
    }
    for name, value in leftovers.items():
        registrar_store.put(name, value, old)
    registrar_store.put(key("nginx", 9004), mark("dead00000004", 9004))  # no lease: not a predecessor's
    async with fake_engine(tmp_path / "docker.sock") as engine:
        engine.add(doc, announce=False)
        registrar = Registrar(registrar_store, 3)
        config = load_config(
            {"containers": True, "container_engine": engine.url, "ip": "127.0.0.1", "interval": "0.05",
             "timeout": "0.04", "rise": "1", "fall": "1", "ttl": "3", "publish": ["json", "plain"]},
            {}, AMBIENT,
        )  # fmt: skip
        assert config.containers is not None
        source = ContainerSource(config, Engine(config.containers.engine), sweep=registrar.sweep)
        agent = Agent(config, registrar=registrar, metrics=Metrics(process=False), notifier=RecordingNotifier(),
                      containers=source)  # fmt: skip
        stop = asyncio.Event()
        with capture_logs() as logs:
            task = asyncio.create_task(agent.serve(stop.wait()))
            await eventually(lambda: key("nginx", 9001) not in registrar_store.data, what="the sweep")
            await eventually(
                lambda: registrar_store.data[key("nginx", listener.port)].lease == registrar.lease,
                what="the live container's record adopted",
            )
            stop.set()
            await asyncio.wait_for(task, 10)
    assert "/plain/nginx/node-1-9001" not in registrar_store.data
    for kept in (key("nginx", 9002), key("nginx", 9003), key("nginx", 9004)):
        assert kept in registrar_store.data
    removed = sorted(e["key"] for e in logs if e["event"] == "removed a record of a container that is gone")
    assert removed == ["/plain/nginx/node-1-9001", key("nginx", 9001)]


async def test_a_container_rendering_a_configured_services_key_is_skipped(
    tmp_path: Path, listener: SilentListener
) -> None:
    doc = docker_container(A, "web", ports=published(80, listener.port), labels={"announcer.service": "web"})
    with capture_logs() as logs:
        async with agent_with_engine(tmp_path, doc, service="web", port=str(listener.port), checks=["tcp"]) as (
            _, agent, store,
        ):  # fmt: skip
            await eventually(lambda: key("web", listener.port) in store.data, what="the configured service")
            await eventually(lambda: any("which web:" in e["event"] for e in logs), what="the warning")
            assert [s.config.origin for s in agent.services] == [None]


async def test_a_gone_containers_series_are_removed(tmp_path: Path, listener: SilentListener) -> None:
    metrics = Metrics(process=False)
    doc = docker_container(A, "web", ports=published(80, listener.port))
    async with agent_with_engine(tmp_path, doc, metrics=metrics) as (engine, _, store):
        await eventually(lambda: key("nginx", listener.port) in store.data, what="the record")
        labels = {"service": "nginx", "key": key("nginx", listener.port)}
        assert metrics.registry is not None
        assert metrics.registry.get_sample_value("announcer_registered", labels) == 1
        del engine.containers[A]
        engine.emit(docker_event(A, "destroy"))
        await eventually(
            lambda: (
                metrics.registry is not None
                and metrics.registry.get_sample_value("announcer_registered", labels) is None
            ),
            what="the series gone",
        )
        assert (
            metrics.registry.get_sample_value(
                "announcer_check_runs_total",
                {**labels, "check": f"tcp://127.0.0.1:{listener.port}", "result": "pass"},
            )
            is None
        )


@pytest.mark.parametrize("mode", HOSTILE)
async def test_a_hostile_engine_crashes_nothing_and_withdraws_nothing(
    tmp_path: Path, listener: SilentListener, mode: str
) -> None:
    doc = docker_container(A, "web", ports=published(80, listener.port))
    with capture_logs() as logs:
        async with agent_with_engine(tmp_path, doc) as (engine, agent, store):
            await eventually(lambda: key("nginx", listener.port) in store.data, what="the record")
            engine.mode = mode
            seen = len(engine.requests)
            engine.add(docker_container(B, "new", ports=published(80, 1)))  # to be inspected
            await engine.stop()  # every stream ends: the source reconnects into the hostile engine
            await engine.start()
            hostile = "/events" if mode.startswith("events") else B if mode.startswith("inspect") else "/json"
            await eventually(
                lambda: any(hostile in path for _, path in engine.requests[seen:]),
                timeout=15,
                what="the hostile answer asked for",
            )
            await eventually(
                lambda: any(e["event"].startswith("container engine unreachable") for e in logs),
                timeout=15,
                what="the engine's error said",
            )
            rounds = agent.services[0].status.rounds
            await eventually(lambda: agent.services[0].status.rounds > rounds + 10, what="checks go on")
            assert key("nginx", listener.port) in store.data
            engine.mode = None
            await eventually(
                lambda: any(e["event"] == "container engine reachable again" for e in logs),
                timeout=15,
                what="recovered",
            )
            assert key("nginx", listener.port) in store.data
    assert not [e for e in logs if e.get("exc_info") or e["log_level"] == "critical"]


async def test_a_quiet_event_stream_is_kept_open(tmp_path: Path, listener: SilentListener) -> None:
    # The engine's timeout is 1 s here: a stream silent for longer is no broken stream.
    async with agent_with_engine(tmp_path, docker_container(A, "web", ports=published(80, listener.port))) as (
        engine, agent, store,
    ):  # fmt: skip
        await eventually(lambda: key("nginx", listener.port) in store.data, what="the record")
        rounds = agent.services[0].status.rounds
        await eventually(lambda: agent.services[0].status.rounds > rounds + 50, what="2.5 s of rounds")
        assert [path for _, path in engine.requests if path.startswith("/events")] == [engine.requests[0][1]]


async def test_a_thousand_containers_on_one_host(tmp_path: Path) -> None:
    # HEALTHCHECK-driven, so no check reaches the network: the list, the inspections and
    # one sync of a thousand instances.
    docs = [
        docker_container(f"{i:064x}", f"c{i}", ports=published(80, 20000 + i), health="healthy")
        for i in range(1000)
    ]
    # A round a second, not twenty: a thousand instances at the fast cadence of the other tests
    # would take a whole core from the tests running beside this one.
    async with agent_with_engine(tmp_path, *docs, interval="1", timeout="0.5") as (_, agent, store):
        await eventually(lambda: len(store.data) == 1000, timeout=60, what="a thousand records")
        assert len({s.config.origin for s in agent.services}) == 1000


def test_check_says_in_one_line_when_the_engine_cannot_be_read(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "announcer", "check", "--containers", "--container-engine",
         f"unix://{tmp_path}/none.sock", "--ip", "127.0.0.1"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("error: the container engine at unix://")
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--container-engine", "tcp://127.0.0.1:2375"], "only a unix socket is supported"),
        (["--container-address", "bridge"], "--container-address must be one of"),
        (["--container-select", "some"], "--container-select must be one of"),
        (["--container-exec-checks", "maybe"], "--container-exec-checks must be on or off"),
        (["--interval", "1"], "for --containers: --timeout (1s) must be below --interval (1s)"),
    ],
)
def test_bad_container_settings_are_one_line_exit_2(flags: list[str], message: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "announcer", "check", "--containers", "--ip", "127.0.0.1", *flags],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1
    assert message in done.stderr
