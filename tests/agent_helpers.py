"""Running a real Agent in-process against real etcd and real services."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from announcer.agent import Agent
from announcer.config import Ambient, Config, load_config
from announcer.metrics import Metrics
from announcer.notify import Notifier
from announcer.runner import build_agent

AMBIENT = Ambient(hostname=lambda: "node-1", ip=lambda: "127.0.0.1")


def agent_config(etcd_url: str, port: int, **flags: Any) -> Config:
    base: dict[str, Any] = {
        "service": "web",
        "port": str(port),
        "ip": "127.0.0.1",
        "interval": "0.2",
        "timeout": "0.15",
        "rise": "2",
        "fall": "2",
        "ttl": "3",
        "etcd_endpoints": etcd_url,
        "shutdown_timeout": "2",
    }
    base.update(dict(flags.items()))
    if "check" in base:  # the CLI's --check is the config's checks
        base["checks"] = base.pop("check")
    return load_config(base, {}, AMBIENT)


async def eventually(
    predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition", poll: float = 0.02
) -> None:
    """Poll until the predicate holds (the real processes decide when). A costly predicate
    polls less often: it runs on the agent's own loop."""
    deadline = time.monotonic() + timeout
    while not await _resolve(predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(poll)


def in_thread(look: Callable[[], object]) -> Callable[[], Awaitable[object]]:
    """A look made of blocking calls (many keys read, requests through a proxy), for
    ``eventually``: in a thread, so that it does not stall the agent's loop it watches."""
    return lambda: asyncio.to_thread(look)


async def _resolve(value: object) -> object:
    return await value if inspect.isawaitable(value) else value


@contextlib.asynccontextmanager
async def running(config: Config, **kwargs: Any) -> AsyncIterator[Agent]:
    """A real agent built as the process edge builds it, served until the block ends."""
    metrics = kwargs.pop("metrics", None) or Metrics(process=False)
    notifier = kwargs.pop("notifier", None) or Notifier({})
    async with build_agent(config, metrics=metrics, notifier=notifier, **kwargs) as agent:
        stop = asyncio.Event()
        task = asyncio.create_task(agent.serve(stop.wait()))
        try:
            yield agent
        finally:
            stop.set()
            await asyncio.wait_for(task, config.shutdown_timeout + config.drain + 5)


def sample(agent: Agent, name: str, **labels: str) -> float:
    """A metric's value; for per-service metrics, the first service's unless labels say otherwise."""
    value = agent.metrics.registry.get_sample_value(name, labels)
    if value is None and "service" not in labels:
        first = agent.services[0].config
        value = agent.metrics.registry.get_sample_value(
            name, {"service": first.service, "key": first.key, **labels}
        )
    return 0.0 if value is None else value


async def keepalives_go_on(agent: Agent, count: int, timeout: float = 15.0) -> None:
    """Wait for ``count`` more successful keepalives: the lease kept, as the agent sees it."""
    start = sample(agent, "announcer_etcd_requests_total", operation="keepalive", outcome="ok")
    await eventually(
        lambda: sample(agent, "announcer_etcd_requests_total", operation="keepalive", outcome="ok") >= start + count,
        # sample() collects the whole registry: at 20 ms, with 400 services' metrics, that poll
        # alone starved the agent's loop on a loaded machine. Keepalives are seconds apart.
        timeout=timeout, what=f"{count} more keepalives", poll=0.25,
    )  # fmt: skip
