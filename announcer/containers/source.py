"""Containers as a source of services: the engine's events and lists, turned into the agent's set.

`ContainerSource.run` keeps one event stream open and lists every running container
when it opens (at start and after every reconnect) and once a minute, so nothing is
missed while the stream was down and nothing is announced twice: the set it hands the
agent (`apply`) is declarative, and the agent diffs it against what runs, as a reload
does. A container that stops, dies, is killed or paused leaves the set at the event,
so its records are withdrawn at once, before any check could notice.

The engine going away is not the containers going away: the set stays as it was,
the checks go on, and a HEALTHCHECK-driven instance keeps the engine's last verdict
for one TTL, then fails. The log says once that the engine is unreachable.

At the first list, records a previous agent of this host left for containers that are
gone are removed (`sweep`): each carries the mark ``"source": "containers"``, the host
and the container's ID, and the engine has just said the container is not running.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from typing import Any

import structlog

from announcer.backoff import Backoff
from announcer.checks import CheckResult
from announcer.config import container_probe, container_service
from announcer.containers.engine import Engine, EngineError
from announcer.containers.labels import Container, Wanted, describe, instances
from announcer.errors import ConfigError, EtcdError
from announcer.publish import roots
from announcer.registrar.store import KeyValue
from announcer.settings import Config, ServiceConfig

log = structlog.get_logger("announcer.containers")
RESYNC = 60.0  # seconds between full lists while the stream is open: a missed event heals
QUEUE = 1000  # events read ahead of the source: the engine waits beyond that
INSPECTING = 8  # inspections at once (a list of 1,000 new containers at start)
STOPPED = frozenset({"die", "died", "stop", "destroy", "remove"})
Apply = Callable[[tuple[ServiceConfig, ...]], None]
Sweep = Callable[[str, Callable[[KeyValue], list[str] | None]], Awaitable[list[tuple[str, int]]]]


class EngineHealth:
    """The container's own HEALTHCHECK as a check: the engine's last word on it.

    ``healthy`` passes, ``unhealthy`` fails, ``starting`` is no verdict yet (the round
    counts for nothing). While the engine is unreachable, its last verdict holds for
    one TTL; then the check fails, since nobody can know any more.
    """

    name = "healthcheck"

    def __init__(self, source: ContainerSource, container: str) -> None:
        self._source = source
        self._container = container  # the full ID

    async def __call__(self) -> CheckResult:
        lost = self._source.unreachable_for()
        if lost is not None and lost > self._source.config.ttl:
            return CheckResult(False, f"the container engine has been unreachable for {lost:.0f}s")
        status = self._source.health(self._container)
        if status == "healthy":
            return CheckResult(True, "HEALTHCHECK healthy")
        if status == "unhealthy":
            return CheckResult(False, "HEALTHCHECK unhealthy")
        return CheckResult(False, f"HEALTHCHECK {status or 'unknown'}: no verdict yet", pending=True)


class ContainerSource:
    def __init__(self, config: Config, engine: Engine, *, sweep: Sweep | None = None) -> None:
        assert config.containers is not None
        self.config = config
        self.settings = config.containers
        self.engine = engine
        self._sweep = sweep
        self._containers: dict[str, Container] = {}  # by full ID: what runs, as last inspected
        self._built: dict[str, list[ServiceConfig]] = {}  # by full ID: its instances, built once
        self._said: set[tuple[str, str]] = set()  # warnings said, once per container
        self._seen: set[str] = set()  # containers whose instances were logged
        self._lost_at: float | None = None  # when the engine stopped answering
        self._listed = asyncio.Event()  # the first full list is done
        self._tasks: set[asyncio.Task[None]] = set()  # the sweep, the looks after a kill
        self._apply: Apply = lambda services: None

    # -- what the checks ask -------------------------------------------------------

    def health(self, cid: str) -> str | None:
        found = self._containers.get(cid)  # by full ID: one lookup per check, not a scan
        return None if found is None else found.health

    def unreachable_for(self) -> float | None:
        return None if self._lost_at is None else time.monotonic() - self._lost_at

    # -- the loop ----------------------------------------------------------------------

    async def run(self, apply: Apply) -> None:
        """Follow the engine until cancelled; hand every new set of instances to ``apply``."""
        self._apply = apply
        backoff = Backoff(base=0.5, cap=5.0)
        try:
            while True:
                try:
                    await self._follow()
                except EngineError as exc:
                    self._unreachable(exc)
                except Exception:  # a fault of ours must not end the agent: static services go on
                    log.exception("the container source failed; starting it over")
                    self._lost_at = self._lost_at or time.monotonic()
                if self._lost_at is None:
                    backoff.reset()
                await asyncio.sleep(backoff.next_delay() if self._lost_at is not None else 0)
        finally:
            for task in self._tasks:
                task.cancel()
            await self.engine.aclose()

    async def _follow(self) -> None:
        """One event stream: opened, then a full list, then every event until it breaks."""
        async with self.engine.events() as stream:
            queue: asyncio.Queue[dict[str, Any] | EngineError] = asyncio.Queue(QUEUE)
            reader = asyncio.create_task(_pump(stream, queue))
            try:
                await self.resync()
                while True:
                    try:
                        async with asyncio.timeout(RESYNC):
                            item = await queue.get()
                    except TimeoutError:
                        await self.resync()
                        continue
                    if isinstance(item, EngineError):
                        raise item
                    await self.on_event(item)
            finally:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader

    async def resync(self) -> None:
        """A full list: containers gone meanwhile leave the set, new ones join it."""
        running = await self.engine.running()
        listed: dict[str, str] = {}
        for item in running:
            cid = item.get("Id")
            if isinstance(cid, str) and cid:
                listed[cid] = str(item.get("State", ""))
        for cid in [c for c in self._containers if c not in listed]:
            self._forget(cid)
        # New containers, paused or unpaused ones, and those whose HEALTHCHECK may have moved.
        stale = [
            cid for cid, state in listed.items()
            if cid not in self._containers or self._containers[cid].health is not None
            or self._containers[cid].paused != (state == "paused")
        ]  # fmt: skip
        await self._inspect_all(stale)
        if self._lost_at is not None:
            log.info("container engine reachable again", engine=self.engine.shown, containers=len(listed))
            self._lost_at = None
        first = not self._listed.is_set()
        self._listed.set()
        self._publish(first=first)
        if first and self._sweep is not None:  # the engine has just said which containers live
            self._spawn(self._sweep_once())

    async def on_event(self, event: dict[str, Any]) -> None:
        """One event, in either dialect (Docker's ``die``/``destroy``/``health_status: healthy``,
        podman's ``died``/``remove``/``health_status`` with a ``HealthStatus`` field)."""
        parsed = _parse(event)
        if parsed is None:
            return
        cid, action, detail, actor = parsed
        known = self._containers.get(cid)
        if action in STOPPED:
            if known is not None:
                self._forget(cid)
                self._publish()
        elif action == "kill" and not _ending(actor):
            return  # `docker kill -s HUP` reloads, it does not stop: the record stays
        elif action in ("kill", "pause"):
            if known is not None:
                # Withdrawn now: a kill usually ends it. One that survives (a SIGHUP) comes
                # back through its rise, from the look a moment later.
                self._containers[cid] = dataclasses.replace(known, paused=True)
                self._built.pop(cid, None)
                self._publish()
                if action == "kill":
                    self._look_again(cid)
        elif action in ("start", "unpause", "restart"):
            await self._inspect_all([cid])
            self._publish()
        elif action == "health_status" and known is not None:
            if detail in ("healthy", "unhealthy", "starting"):  # Docker says the new state here
                self._containers[cid] = dataclasses.replace(known, health=detail)
            else:  # podman says the state before the run: ask
                await self._inspect_all([cid])
        elif action == "exec_died" and known is not None and known.health is not None:
            await self._inspect_all([cid])  # podman: a healthcheck run has just ended

    # -- the parts ---------------------------------------------------------------------------

    def _look_again(self, cid: str) -> None:
        async def look() -> None:
            await asyncio.sleep(1.0)
            with contextlib.suppress(EngineError):
                await self._inspect_all([cid])
                self._publish()

        self._spawn(look())

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _inspect_all(self, ids: Iterable[str]) -> None:
        limit = asyncio.Semaphore(INSPECTING)
        failed: list[EngineError] = []

        async def inspect(cid: str) -> None:
            async with limit:
                try:
                    doc = await self.engine.inspect(cid)
                except EngineError as exc:
                    failed.append(exc)  # said once, below: not as a group of errors
                    return
            container = describe(doc) if doc is not None else None
            if container is None or not container.running:
                self._forget(cid)
                return
            before = self._containers.get(cid)
            self._containers[cid] = container
            if before is None or dataclasses.replace(before, health=container.health) != container:
                self._built.pop(cid, None)  # its instances are built anew; a new HEALTHCHECK state needs not

        async with asyncio.TaskGroup() as group:
            for cid in dict.fromkeys(ids):
                group.create_task(inspect(cid))
        if failed:
            raise failed[0]

    def _forget(self, cid: str) -> None:
        self._containers.pop(cid, None)
        self._seen.discard(cid)
        self._built.pop(cid, None)
        self._said = {said for said in self._said if said[0] != cid}

    def _say(self, cid: str, message: str) -> None:
        if (cid, message) not in self._said:
            self._said.add((cid, message))
            log.warning(message)

    def _publish(self, *, first: bool = False) -> None:
        """Hand the agent every instance of every running container (built once per container)."""
        static = {pair.key: svc.label for svc in self.config.services for pair in svc.pairs}
        taken: dict[str, str] = dict(static)
        services: list[ServiceConfig] = []
        for cid, container in self._containers.items():
            if cid not in self._built:
                self._built[cid] = self._build(cid, container, first=first)
            for svc in self._built[cid]:
                clash = next((taken[p.key] for p in svc.pairs if p.key in taken), None)
                if clash is not None:
                    self._say(
                        cid,
                        f"container {container.name} ({container.short}): {svc.label} renders the key "
                        f"{svc.key}, which {clash} has; the port is skipped",
                    )
                    continue
                taken.update({p.key: f"container {container.name}" for p in svc.pairs})
                services.append(svc)
        self._apply(tuple(services))

    def _build(self, cid: str, container: Container, *, first: bool) -> list[ServiceConfig]:
        s = self.settings
        wanted, warnings = instances(
            container, host_ip=s.host_ip, host_ip_source=s.host_ip_source, internal=s.internal,
            labelled_only=s.labelled_only, allow_exec=s.allow_exec,
        )  # fmt: skip
        for warning in warnings:
            self._say(cid, warning)
        built: list[ServiceConfig] = []
        for each in wanted:
            try:
                svc = container_service(self.config, each)
            except ConfigError as exc:
                where = f"container {container.name} ({container.short}) port {each.container_port}"
                self._say(cid, f"{where}: {exc}; the port is skipped")
                continue
            if each.healthcheck:
                svc = dataclasses.replace(svc, checks=(EngineHealth(self, cid),))
            if cid in self._seen:
                built.append(svc)
                continue
            log.info(
                "container found" if first else "container started", container=container.name,
                id=container.short, service=svc.service, address=f"{svc.ip}:{svc.port}",
                address_from=svc.ip_source, checks=[c.name for c in svc.checks], key=svc.key,
            )  # fmt: skip
            built.append(svc)
        self._seen.add(cid)
        return built

    def _unreachable(self, exc: EngineError) -> None:
        if self._lost_at is None:
            self._lost_at = time.monotonic()
            log.warning(
                "container engine unreachable; records stay while their checks pass, a HEALTHCHECK's "
                "last verdict for one TTL", error=str(exc), ttl=self.config.ttl,
            )  # fmt: skip
        else:
            log.debug("container engine still unreachable", error=str(exc))

    async def _sweep_once(self) -> None:
        """Remove what a previous agent of this host left for containers that are now gone."""
        assert self._sweep is not None
        probe = self._probe()
        if probe is None or "json" not in probe.publishing.formats:
            return  # the mark is in the json record; without one, a predecessor's keys go with its lease
        json_only = dataclasses.replace(probe.publishing, formats=("json",))
        prefix = roots(json_only, _key_template(self.config))[0]
        backoff = Backoff(base=1.0, cap=10.0)
        deadline = time.monotonic() + 3 * self.config.ttl  # by then a predecessor's lease is gone anyway
        while time.monotonic() < deadline:
            try:
                removed = await self._sweep(prefix, lambda kv: self._doomed(kv, probe.hostname))
            except EtcdError as exc:
                log.debug("could not look for records of gone containers yet", error=str(exc))
                await asyncio.sleep(backoff.next_delay())
                continue
            for key, lease in removed:
                log.warning("removed a record of a container that is gone", key=key, foreign_lease=lease)
            return

    def _probe(self) -> ServiceConfig | None:
        try:
            return container_probe(self.config)
        except ConfigError:  # refused at start-up already: not reached
            return None

    def _doomed(self, kv: KeyValue, hostname: str) -> list[str] | None:
        """The keys of a record this host's container source left for a container that is gone."""
        if kv.value is None or len(kv.value) > 65536:
            return None
        try:
            record = json.loads(kv.value)
        except (ValueError, RecursionError):
            return None
        if not isinstance(record, dict) or record.get("source") != "containers":
            return None
        container = record.get("container")
        if record.get("host") != hostname or not isinstance(container, str) or not container:
            return None
        if any(cid.startswith(container) for cid in self._containers):
            return None  # alive: its own checks decide, as for any instance
        keys = [kv.key.decode("utf-8", "replace")]
        with contextlib.suppress(ConfigError, KeyError, TypeError, ValueError):
            gone = Wanted.bare(
                container, str(record["service"]), str(record["ipv4_addr"]), int(record["port"])
            )
            keys += [p.key for p in container_service(self.config, gone).pairs if p.key not in keys]
        return keys


def _key_template(config: Config) -> str:
    assert config.containers is not None
    for layer in config.containers.layers:
        if "key" in layer and isinstance(layer["key"], str):
            return layer["key"]
    from announcer.settings import DEFAULT_KEY  # noqa: PLC0415

    return DEFAULT_KEY


def _parse(event: dict[str, Any]) -> tuple[str, str, str, object] | None:
    """(container ID, action, what follows a ':' in it, the actor) of a container event; else None."""
    if event.get("Type", "container") != "container":
        return None
    action_text = event.get("Action", event.get("status"))
    actor = event.get("Actor")
    cid = actor.get("ID") if isinstance(actor, dict) else None
    cid = cid if isinstance(cid, str) and cid else event.get("id")
    if not isinstance(action_text, str) or not isinstance(cid, str) or not cid:
        return None
    action, _, detail = action_text.partition(":")
    return cid, action.strip(), detail.strip(), actor


ENDING_SIGNALS = frozenset({"2", "3", "9", "15", "INT", "QUIT", "KILL", "TERM"})


def _ending(actor: object) -> bool:
    """A kill that ends the container: Docker names the signal (``"signal": "15"``); podman does
    not, and its kill is taken as ending (announcer looks again a second later)."""
    attributes = actor.get("Attributes") if isinstance(actor, dict) else None
    signal = attributes.get("signal") if isinstance(attributes, dict) else None
    if not isinstance(signal, str):
        return True
    return signal.upper().removeprefix("SIG") in ENDING_SIGNALS


async def _pump(
    stream: AsyncIterator[dict[str, Any]], queue: asyncio.Queue[dict[str, Any] | EngineError]
) -> None:
    try:
        async for event in stream:
            await queue.put(event)
    except EngineError as exc:
        await queue.put(exc)


async def snapshot(config: Config) -> list[ServiceConfig]:
    """Every running container's instances, listed once (for `announcer check --containers`).

    An engine that cannot be read raises ConnectionError, said in one line.
    """
    assert config.containers is not None
    found: list[tuple[ServiceConfig, ...]] = []
    source = ContainerSource(config, Engine(config.containers.engine))
    source._apply = found.append
    try:
        await source.resync()
    except EngineError as exc:
        raise ConnectionError(str(exc)) from None
    finally:
        await source.engine.aclose()
    return list(found[-1]) if found else []
