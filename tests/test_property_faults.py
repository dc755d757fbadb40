"""The property that matters, from bounded random runs against a real three-member cluster.

Across random sequences of service up/down, etcd member stop/freeze/restart, whole-cluster
outages, agent SIGTERM-and-restart and another instance taking the key over, once things
settle: the record is present (on the agent's lease) exactly when the service is healthy
and an agent is running, and a record on another lease is never deleted: it stays until
this agent announces anew (the newest healthy instance wins).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from typing import Any

import httpx
import pytest

from announcer.agent import Agent
from announcer.health import Health
from announcer.metrics import Metrics
from announcer.notify import Notifier
from announcer.runner import build_agent
from tests.agent_helpers import agent_config, eventually
from tests.servers import EtcdCluster, EtcdServer, HttpService

STEPS = 12


class Run:
    def __init__(self, cluster: EtcdCluster, service: HttpService) -> None:
        self.cluster, self.service = cluster, service
        self.key = f"/services/web/127.0.0.1:{service.port}"
        self.config = agent_config(cluster.endpoints, service.port, ttl="3")
        self.agent: Agent | None = None
        self.task: asyncio.Task[None] | None = None
        self.stop: asyncio.Event | None = None
        self.service_up = True
        self.impaired: tuple[EtcdServer, str] | None = None
        self.foreign: int | None = None  # a takeover's lease while it should still hold the key
        self.log: list[str] = []

    # -- the agent, started and stopped as systemd would (SIGTERM is the stop event) --

    async def start_agent(self) -> None:
        self.edge = contextlib.AsyncExitStack()
        self.agent = await self.edge.enter_async_context(
            build_agent(self.config, metrics=Metrics(process=False), notifier=Notifier({}))
        )
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(self.agent.serve(self.stop.wait()))
        # A fresh agent's first verdict settles the key: healthy, it announces and takes the
        # key over; failing, it removes a record left on another lease (a crashed agent's).
        self.foreign = None

    async def stop_agent(self) -> None:
        assert self.stop is not None
        assert self.task is not None
        self.stop.set()
        await asyncio.wait_for(self.task, 15)
        await self.edge.aclose()
        self.agent = None

    # -- what the record should be, and what it is --

    def expected(self) -> str:
        if self.foreign is not None:
            return "foreign"
        return "ours" if self.agent is not None and self.service_up else "absent"

    def observed(self) -> str:
        reader = next(m for m in self.cluster.members if self.impaired is None or m is not self.impaired[0])
        try:
            kv = reader.get(self.key)
        except httpx.HTTPError:  # e.g. 503 "no leader" while the cluster elects one: look again
            return "unreadable"
        if kv is None:
            return "absent"
        if self.foreign is not None and kv["lease"] == self.foreign:
            return "foreign"
        lease = getattr(self.agent.registrar, "lease", None) if self.agent else None
        return "ours" if kv["lease"] == lease else f"other lease {kv['lease']}"

    async def settle(self) -> None:
        await eventually(lambda: self.observed() == self.expected() and not self.stale_look_pending(), timeout=20,
                         what=f"{self.expected()} after {self.log}")  # fmt: skip

    def stale_look_pending(self) -> bool:
        """A FAILING verdict's look for a stale record not yet done: a takeover now would race it."""
        return self.agent is not None and self.agent.services[0].stale_check

    # -- the random steps --

    async def toggle_service(self) -> None:
        self.service_up = not self.service_up
        self.service.status = 200 if self.service_up else 503
        if self.agent is not None:
            # the agent acts on its verdict (after rise/fall rounds), not on the service itself
            agent, verdict = self.agent, Health.PASSING if self.service_up else Health.FAILING
            await eventually(lambda: agent.status.health is verdict, timeout=20, what=f"verdict {verdict}")
            # Either verdict settles the key: the rise announces anew (taking it over), the fall
            # removes a record on another lease too (it names this instance, which is down).
            self.foreign = None

    # The member steps stop and start etcd synchronously, on the agent's own loop: each random
    # step is one discrete fault whose end state the agent then meets (in a thread, the agent
    # met the outage's members going down one by one, a different run than the seed names).
    async def member_fault(self, rng: random.Random) -> None:
        if self.impaired is not None:
            member, kind = self.impaired
            if kind == "frozen":
                member.thaw()
            else:
                member.start()
            self.impaired = None
            return
        member = rng.choice(self.cluster.members)
        kind = rng.choice(["frozen", "stopped"])
        member.freeze() if kind == "frozen" else member.stop()
        self.impaired = (member, kind)

    async def outage(self) -> None:
        if self.impaired is not None:
            await self.member_fault(random.Random(0))  # heal first: one fault at a time
        for member in self.cluster.members:
            member.stop()
        if self.agent is not None:
            agent = self.agent
            await eventually(lambda: agent.status.etcd_reachable is False, timeout=20, what="outage seen")
        for member in self.cluster.members:
            member.start(wait=False)
        for member in self.cluster.members:
            member.wait_ready(30)

    async def restart_agent(self) -> None:
        if self.agent is not None:
            await self.stop_agent()
            # a stopped agent leaves no record of its own
            if self.foreign is None:
                await eventually(lambda: self.observed() == "absent", timeout=20, what="withdrawn at SIGTERM")
        await self.start_agent()

    async def takeover(self) -> None:
        writer = next(m for m in self.cluster.members if self.impaired is None or m is not self.impaired[0])

        def put() -> bool:
            try:
                lease = writer.grant(60)
                writer.put(self.key, '{"host":"successor"}', lease)
            except httpx.HTTPError:  # no leader for a moment: try again
                return False
            self.foreign = lease
            return True

        await eventually(put, timeout=20, what="another instance's put")


@pytest.mark.slow
@pytest.mark.parametrize("seed", [11, 22, 33, 44, 55])
async def test_record_follows_health_through_random_faults(
    etcd_cluster: EtcdCluster, http_service: HttpService, seed: int
) -> None:
    rng = random.Random(seed)
    run = Run(etcd_cluster, http_service)
    await run.start_agent()
    steps: dict[str, Any] = {
        "service": run.toggle_service,
        "member": lambda: run.member_fault(rng),
        "outage": run.outage,
        "agent": run.restart_agent,
        "takeover": run.takeover,
    }
    try:
        await run.settle()
        for _ in range(STEPS):
            name = rng.choices(list(steps), weights=[4, 3, 1, 2, 1])[0]
            run.log.append(name)
            await steps[name]()
            await run.settle()
    finally:
        if run.impaired is not None and run.impaired[1] == "frozen":
            run.impaired[0].thaw()
        if run.agent is not None:
            await run.stop_agent()
