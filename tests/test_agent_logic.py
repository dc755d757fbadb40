"""Agent logic that needs no etcd, fast, through the in-memory registrar.

Everything here that concerns etcd itself is also tested against a real etcd
elsewhere; these tests pin down the agent's own decisions.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from structlog.testing import capture_logs

from announcer.agent import Agent
from announcer.errors import EtcdUnavailable
from announcer.metrics import Metrics
from announcer.registrar.etcd_client import EtcdAuthError
from tests.agent_helpers import agent_config, eventually, sample
from tests.memory_registrar import MemoryRegistrar
from tests.servers import SilentListener


class RecordingNotifier:
    """What the agent tells systemd, kept in a list (the real socket is tested elsewhere)."""

    watchdog_period = None

    def __init__(self) -> None:
        self.lines: list[str] = []

    def send(self, *lines: str) -> None:
        self.lines.extend(lines)

    def close(self) -> None:
        return


@contextlib.asynccontextmanager
async def agent_on(
    registrar: MemoryRegistrar, **flags: Any
) -> AsyncIterator[tuple[Agent, RecordingNotifier]]:
    listener = SilentListener()  # accepts connections: a passing tcp check
    notifier = RecordingNotifier()
    config = agent_config("http://127.0.0.1:1", listener.port, check=["tcp"], interval="0.05", timeout="0.04",
                          rise="1", fall="1", **flags)  # fmt: skip
    agent = Agent(config, registrar=registrar, metrics=Metrics(process=False), notifier=notifier)  # type: ignore[arg-type]
    stop = asyncio.Event()
    task = asyncio.create_task(agent.serve(stop.wait()))
    try:
        yield agent, notifier
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        listener.close()


async def test_ready_once_after_the_first_verdict_is_in_etcd() -> None:
    registrar = MemoryRegistrar()
    async with agent_on(registrar) as (agent, notifier):
        await eventually(lambda: "READY=1" in notifier.lines, what="READY")
        assert registrar.store  # the record was in "etcd" before READY
        rounds = agent.status.rounds
        await eventually(lambda: agent.status.rounds >= rounds + 5, what="more rounds")
    assert notifier.lines.count("READY=1") == 1
    assert notifier.lines.index("STATUS=announced; service passing, registered") < notifier.lines.index(
        "READY=1"
    )


async def test_unreachable_is_logged_once_and_backoff_resets() -> None:
    registrar = MemoryRegistrar()
    registrar.fail(*[EtcdUnavailable("etcd down")] * 4)
    with capture_logs() as logs:
        async with agent_on(registrar) as (agent, _):
            await eventually(lambda: agent.registered, what="announced once etcd is back")
            registrar.fail(EtcdUnavailable("etcd down again"))
            agent._wake.set()
            registrar.fail()
            await eventually(
                lambda: [e["event"] for e in logs].count("etcd reachable again") >= 1, what="back"
            )
    events = [e["event"] for e in logs]
    assert events.count("etcd unreachable") == 1  # one line for the outage, not one per retry
    retries = [e["retry_in"] for e in logs if "retry_in" in e]
    assert retries  # the delays grew while etcd stayed away ...
    assert max(retries[:4]) > min(retries[:4])


async def test_a_refusal_is_logged_once_per_distinct_message() -> None:
    registrar = MemoryRegistrar()
    registrar.fail(*[EtcdAuthError("permission denied")] * 3, *[EtcdAuthError("user unknown")] * 2)
    with capture_logs() as logs:
        async with agent_on(registrar) as (agent, _):
            await eventually(lambda: agent.registered, what="announced after the refusals")
    refusals = [e["error"] for e in logs if e["event"] == "etcd refused the request"]
    assert refusals == ["permission denied", "user unknown"]
    assert agent.etcd_reachable is True  # a refusal is an answer


async def test_a_lost_lease_counts_one_withdrawal_and_one_announcement() -> None:
    registrar = MemoryRegistrar(ttl=3)  # a keepalive every second
    async with agent_on(registrar) as (agent, _):
        await eventually(lambda: agent.registered, what="announce")
        registrar.expire()
        assert not agent.registered
        await eventually(lambda: agent.registered, timeout=5, what="put back on a new lease")
        assert sample(agent, "announcer_withdrawals_total", reason="lease_lost") == 1
        assert sample(agent, "announcer_announcements_total") == 2
