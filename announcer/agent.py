"""The agent: what every instance of the process shares, and the lifecycle.

One process serves one service (the sidekick) or many (host mode) with the same
code. Each instance is a `ServiceAgent` (announcer.service): its checks, its
verdict, the pairs it wants in etcd. The `Agent` owns what they share: one
registrar and so one lease; the sync loop, which hands every instance's pairs to
the registrar at once (so a reload that swaps keys is only puts) and looks again
where the watch (announcer.watch) saw another client change a key; the keepalive
loop, on its own schedule whatever a long sync is doing; reload (`apply`), the metrics
endpoint, the watchdog and the shutdown.

Shutdown is an awaitable passed in: when it completes, the loops stop, every
record is withdrawn at once, the agent (and /healthz) stays up for the drain
time, and the lease is revoked; the etcd work is bounded by ``shutdown_timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING

import structlog

from announcer.backoff import Backoff
from announcer.errors import EtcdError, EtcdUnavailable
from announcer.health import Health
from announcer.http import EndpointServer, health_report
from announcer.metrics import Metrics
from announcer.notify import Notifier
from announcer.registrar import Registrar
from announcer.service import Event, ServiceAgent, Status
from announcer.settings import Config, ServiceConfig
from announcer.watch import KeyWatch

if TYPE_CHECKING:
    from announcer.containers.source import ContainerSource

__all__ = ["Agent", "Backoff", "ServiceAgent", "Status"]
log = structlog.get_logger("announcer")


async def _wait(event: asyncio.Event, delay: float | None) -> None:
    """Until ``event`` is set or ``delay`` seconds have passed (None: no limit)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(delay):
            await event.wait()


class Agent:
    def __init__(
        self,
        config: Config,
        *,
        registrar: Registrar[ServiceAgent],
        metrics: Metrics,
        notifier: Notifier,
        endpoint: EndpointServer | None = None,
        containers: ContainerSource | None = None,
    ) -> None:
        """Everything concrete is built at the process edge (runner.build_agent) and handed in."""
        self.config = config
        self.metrics = metrics
        self.registrar = registrar
        self._wake = asyncio.Event()
        # The watch's retries are paced like the keepalive's: at most TTL/3 apart.
        watch_backoff = Backoff(base=0.2, cap=max(0.5, config.ttl / 3))
        self.watch = KeyWatch(registrar.store, registrar.observe, self._wake, watch_backoff)
        self.services = [self._service(svc) for svc in config.services]
        self._containers = containers  # a source of services beside the configuration's
        self._container_services: tuple[ServiceConfig, ...] = ()
        self.etcd_reachable: bool | None = None
        self._last_refusal: str | None = None
        self._ready = False  # etcd matched every first verdict; READY=1 was sent
        self._draining = False
        self._group: asyncio.TaskGroup | None = None
        self._extra_loops: list[asyncio.Task[None]] = []  # check loops of services a reload added
        self._notifier = notifier
        self._endpoint = endpoint
        if endpoint is not None:
            endpoint.health = self.health_report  # /healthz answers what this agent knows

    def _service(self, svc: ServiceConfig) -> ServiceAgent:
        return ServiceAgent(svc, self.metrics.for_service(svc.service, svc.key), self.registrar, self._wake)

    # -- one service's view, for the sidekick case and its tests ---------------

    @property
    def status(self) -> Status:
        """The first service's status, with the agent's view of etcd."""
        status = self.services[0].status
        status.etcd_reachable = self.etcd_reachable
        return status

    @property
    def registered(self) -> bool:
        return all(s.registered for s in self.services)

    # -- lifecycle ------------------------------------------------------------

    async def serve(self, shutdown: Awaitable[object]) -> None:
        for svc in self.services:
            cfg = svc.config
            log.info(
                "starting", key=cfg.key, record=cfg.record.to_json(), ip=cfg.ip, ip_from=cfg.ip_source,
                checks=[c.name for c in cfg.checks], interval=cfg.interval, ttl=self.config.ttl,
                worst_case_stale_seconds=cfg.worst_case_stale, crashed_agent_linger_seconds=self.config.ttl,
            )  # fmt: skip
        for warning in self.config.warnings:
            log.warning(warning)
        endpoint: asyncio.Task[None] | None = None
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                loops = [self._start_checks(svc, i) for i, svc in enumerate(self.services)]
                loops.append(group.create_task(self._sync_loop()))
                loops.append(group.create_task(self._keepalive_loop()))
                if self._endpoint is not None:
                    endpoint = group.create_task(self._endpoint.serve())
                if self._containers is not None:
                    loops.append(group.create_task(self._containers.run(self.apply_containers)))
                if self._notifier.watchdog_period is not None:
                    loops.append(group.create_task(self._watchdog_loop(self._notifier.watchdog_period)))
                await shutdown
                for task in [*loops, *self._extra_loops]:
                    task.cancel()
                # /healthz stays up through the withdraw and the drain: it says "draining".
                await self._shutdown()
                if endpoint is not None:
                    endpoint.cancel()
        finally:
            self._group = None

    def _start_checks(self, svc: ServiceAgent, index: int, *, now: bool = False) -> asyncio.Task[None]:
        # A stable phase per service spreads the rounds over the interval; one a reload
        # added checks at once, so that it waits for nothing but its own rise.
        assert self._group is not None
        phase = 0.0 if now else svc.config.interval * index / max(1, len(self.services))
        return self._group.create_task(svc.check_loop(phase))

    def apply(self, config: Config) -> None:
        """Take a reloaded configuration without withdrawing what did not change.

        Services are matched by service name and port (with one service on each side, they
        are the same service whatever changed): a matched service keeps its verdict and its
        record, which is rewritten or moved in one transaction; a new service starts its
        checks; a removed one is withdrawn. Every service's new pairs reach the registrar in
        one sync, so keys that change hands between services are only ever put.
        """
        self.config = config
        self._take([*config.services, *self._container_services], "reload")

    def apply_containers(self, services: tuple[ServiceConfig, ...]) -> None:
        """The container source's whole set of instances, as it is now: matched by container
        and port, so a container that stays keeps its verdict; one that went is withdrawn."""
        self._container_services = services
        self._take([*self.config.services, *services], "container_stopped")

    def _take(self, wanted: list[ServiceConfig], reason: str) -> None:
        """Make the running instances the ``wanted`` ones: keep, add, retire (``reason``)."""
        current = {_identity(s.config): s for s in self.services if not s.retired}
        static_now = [k for k in current if isinstance(k, tuple)]
        static_new = [s for s in wanted if s.origin is None]
        single = len(static_new) == 1 and len(static_now) == 1  # the sidekick: whatever changed
        kept: list[ServiceAgent] = []
        added: list[ServiceAgent] = []
        for svc_config in wanted:
            identity = static_now[0] if single and svc_config.origin is None else _identity(svc_config)
            match = current.pop(identity, None)
            if match is not None:
                if svc_config.origin is None:
                    same = match.apply(svc_config)
                    log.info("configuration reloaded", key=svc_config.key, checks_kept=same)
                elif match.config != svc_config:  # a container's instance, rebuilt (inspected anew)
                    match.apply(svc_config)
                kept.append(match)
            else:
                new = self._service(svc_config)
                kept.append(new)
                added.append(new)
                if svc_config.origin is None:
                    log.info("service added by a reload", key=svc_config.key)
        for svc in current.values():
            svc.retire(reason if svc.config.origin is not None else "reload")
            if svc.config.origin is None:
                log.info("service removed by a reload", key=svc.config.key)
            else:
                log.info("container gone: withdrawing", key=svc.config.key, origin=svc.config.origin)
        staying = {id(s) for s in kept}  # by identity, in one pass: a host may run 1,000 containers
        self.services = kept + [s for s in self.services if id(s) not in staying]  # retired: until withdrawn
        if self._group is not None:
            self._extra_loops = [t for t in self._extra_loops if not t.done()]
            self._extra_loops += [self._start_checks(svc, 0, now=True) for svc in added]
        self._wake.set()

    def health_report(self) -> tuple[int, dict[str, object]]:
        """What /healthz answers: 200 while every service's last round ended within three intervals."""
        now = time.monotonic()
        active = [s for s in self.services if not s.retired]
        rounds = [s.status.last_round for s in active]
        oldest = None if None in rounds else min((r for r in rounds if r is not None), default=None)
        details: dict[str, object] = {"etcd_reachable": self.etcd_reachable, "draining": self._draining}
        if len(active) == 1:
            details.update(active[0].details())
        details["services"] = [s.details() for s in active]
        if self._draining:  # the loops have stopped on purpose: the process is on its way out
            return health_report(alive=True, age=None, details=details)
        alive = all(s.loop_alive(now) for s in active)
        return health_report(alive=alive, age=None if oldest is None else now - oldest, details=details)

    def describe(self) -> dict[str, object]:
        """One line of state, for SIGUSR1."""
        return {
            "etcd_reachable": self.etcd_reachable, "lease": self.registrar.lease,
            "services": [s.details() for s in self.services],
            **(self.services[0].details() if len(self.services) == 1 else {}),
        }  # fmt: skip

    async def _watchdog_loop(self, period: float) -> None:
        while True:
            if self.health_report()[0] == 200:  # a stuck check loop stops the pings: systemd restarts us
                self._notifier.send("WATCHDOG=1")
            await asyncio.sleep(period)

    def _tell_systemd(self, event: str, *first: str) -> None:
        """Send STATUS= for the event, in one datagram with what comes first (READY=1)."""
        self._notifier.send(*first, f"STATUS={event}; {self._summary()}")

    def _summary(self) -> str:
        services = [s for s in self.services if not s.retired]
        if len(services) == 1:
            svc = services[0]
            state = "registered" if svc.registered else "not registered"
            extra = "".join(
                f", {flag}" for flag, on in (("maintenance", svc.status.maintenance),
                                             ("flap-damped", svc.status.damped)) if on
            )  # fmt: skip
            return f"service {svc.status.health.value}, {state}{extra}"
        passing = sum(s.status.health is Health.PASSING for s in services)
        registered = sum(s.registered for s in services)
        return f"{passing}/{len(services)} passing, {registered} registered"

    # -- shutdown ---------------------------------------------------------------

    async def _shutdown(self) -> None:
        cfg = self.config
        # Held: placed, or put without an answer yet (a stop during the first announce):
        # consumers may have seen it, so it is withdrawn and drained like any other.
        held = set(self.registrar.held)
        drain = max((s.config.drain for s in self.services if held & s.keys), default=0.0)
        self._notifier.send("STOPPING=1", "STATUS=withdrawing")
        log.info("shutting down", withdraw_within=cfg.shutdown_timeout, drain=drain)
        deadline = asyncio.get_running_loop().time() + cfg.shutdown_timeout
        lease_left = float(self.registrar.ttl if self.registrar.ttl is not None else cfg.ttl)
        try:
            withdrawn = await self._withdraw_at_shutdown(deadline, lease_left)
            if withdrawn and drain > 0:
                self._draining = True
                for svc in self.services:
                    svc.status.draining = True
                self._notifier.send(f"STATUS=withdrawn; draining for {drain:g}s before exit")
                log.info("withdrawn; draining before exit", drain_seconds=drain)
                await asyncio.sleep(drain)
                deadline += drain
            await self._revoke_at_shutdown(deadline, lease_left, withdrawn)
        finally:
            self._notifier.close()

    async def _withdraw_at_shutdown(self, deadline: float, lease_left: float) -> tuple[str, ...]:
        keys = list(self.registrar.held)
        if not keys:
            return ()
        held = set(keys)
        placed = [s for s in self.services if held & s.keys]
        try:
            async with asyncio.timeout_at(deadline):
                deleted = await self.registrar.withdraw_all()
        except TimeoutError:
            log.warning(
                f"etcd did not answer within {self.config.shutdown_timeout:g}s; the record goes "
                f"when the lease expires, within {lease_left:g}s", keys=keys,
            )  # fmt: skip
            return ()
        except EtcdError as exc:
            log.warning(
                f"could not withdraw at shutdown; the record goes when the lease expires, "
                f"within {lease_left:g}s", keys=keys, error=str(exc),
            )  # fmt: skip
            return ()
        for svc in placed:
            mine = held & svc.keys
            if mine <= set(deleted):
                svc.metrics.withdrawals.labels("shutdown").inc()
            else:
                for key in sorted(mine - set(deleted)):
                    log.info("at shutdown the key was not ours to withdraw", key=key)
            svc.placed = {}
        return deleted

    async def _revoke_at_shutdown(
        self, deadline: float, lease_left: float, withdrawn: tuple[str, ...]
    ) -> None:
        loop = asyncio.get_running_loop()
        if self.registrar.lease is None and not withdrawn:
            log.info("nothing to withdraw: no lease was granted", keys=[s.config.key for s in self.services])
            return
        if loop.time() >= deadline:
            log.warning(f"no time left to revoke the lease; it expires within {lease_left:g}s")
            return
        try:
            async with asyncio.timeout_at(deadline):
                closed = await self.registrar.close()
        except (TimeoutError, EtcdError) as exc:
            log.warning(
                f"could not revoke the lease at shutdown; it expires within {lease_left:g}s",
                error=str(exc) or "timed out",
            )  # fmt: skip
            return
        if withdrawn:
            shown = withdrawn[0] if len(withdrawn) == 1 else list(withdrawn)
            log.info("withdrawn, lease revoked" if closed.revoked else "withdrawn", key=shown)
        elif closed.revoked:
            log.info("lease revoked; no record of ours was registered")

    # -- the loops that talk to etcd -----------------------------------------------

    async def _sync_loop(self) -> None:
        """Make etcd match what every instance wants; look again where the watch saw a change."""
        interval = min((s.config.interval for s in self.services), default=2.0)
        backoff = Backoff(base=min(0.5, interval), cap=max(1.0, interval))
        try:
            await self._sync_passes(backoff)
        finally:
            await self.watch.aclose()

    async def _sync_passes(self, backoff: Backoff) -> None:
        while True:
            self._wake.clear()
            try:
                asked = await self._reconcile()
                if asked:  # etcd answered: say so before a look, which may take a while
                    self._set_reachable(True)
                asked = await self._look() or asked
            except EtcdUnavailable as exc:
                retry = backoff.next_delay()
                self._set_reachable(False, error=str(exc), retry_in=round(retry, 3))
                delay: float | None = retry
            except EtcdError as exc:  # etcd answered, but said no (credentials, permissions)
                delay = backoff.next_delay()
                self._set_reachable(True)
                self._refused(exc, delay)
            else:
                backoff.reset()
                self._last_refusal = None
                if asked:  # a pass that asked etcd nothing proves nothing
                    self._set_reachable(True)
                if not self._ready and all(s.status.health is not Health.UNKNOWN for s in self.services):
                    self._ready = True
                    self._tell_systemd("ready", "READY=1")  # one datagram: systemd sees both at once
                delay = self.watch.retry_in()
            await _wait(self._wake, delay)

    async def _look(self) -> bool:
        """Read where needed: every key before a (new) watch opens, else the watch's suspects.

        A read that finds a record missing is followed by the sync that puts it back.
        True if etcd was asked.
        """
        lease = self.registrar.lease
        if lease is None:
            self.watch.stop()  # nothing of ours is there; a new lease opens a new watch
            return False
        keys = tuple(dict.fromkeys(p.key for s in self.services if not s.retired for p in s.config.pairs))
        if self.watch.due(lease, keys):
            self.watch.take_suspects()  # the read covers them
            revision, missing = await self.registrar.look(keys)
            if revision and self.registrar.lease == lease:
                self.watch.start(lease, keys, revision)
        else:
            suspects = self.watch.take_suspects()
            if not suspects:
                return False
            try:
                _, missing = await self.registrar.look(suspects)
            except EtcdError:
                self.watch.suspects.update(suspects)  # looked at again on the next pass
                raise
        if missing:
            await self._reconcile()  # put back what went missing
        return True

    async def _reconcile(self) -> bool:
        """One sync of every instance's pairs, then the stale-record looks; True if etcd was asked."""
        asked = {svc: svc.pairs for svc in self.services}
        events: list[Event] = []
        spoke = False
        async for svc, synced in self.registrar.sync(asked):
            spoke = True
            if svc in asked:  # an instance a reload dropped meanwhile has nothing left to say
                event = svc.settle(asked[svc], synced)
                if event is not None:
                    events.append(event)
        for svc in [s for s in self.services if s.stale_check]:
            spoke = True
            await svc.remove_stale()
        done = [s for s in self.services if s.retired and not s.placed]
        if done:
            self.services = [s for s in self.services if s not in done]
            live = {(s.config.service, s.config.key) for s in self.services}
            for svc in done:  # a container's series go with it (one of the same key lives on)
                if svc.config.origin is not None and (svc.config.service, svc.config.key) not in live:
                    svc.metrics.remove()
        for event in dict.fromkeys(events):
            self._tell_systemd(event.value)
        return spoke

    async def _keepalive_loop(self) -> None:
        """Keep the lease alive every TTL/3 of the TTL etcd granted, whatever else is going on."""
        backoff = Backoff(base=0.2, cap=max(0.5, self._keepalive_period() / 2))
        retry: float | None = None
        while True:
            renew_at = self.registrar.renew_at
            self.registrar.lease_changed.clear()
            if retry is not None:
                delay: float | None = retry
            else:
                delay = None if renew_at is None else max(0.0, renew_at - time.monotonic())
            await _wait(self.registrar.lease_changed, delay)
            if self.registrar.lease_changed.is_set():
                self.metrics.lease_ttl.set(self.registrar.ttl or 0)  # granted (etcd's TTL), or lost
                if retry is None:
                    continue  # schedule from the new lease
            retry = None
            try:
                kept = await self.registrar.keepalive()
            except EtcdUnavailable as exc:
                retry = backoff.next_delay()
                self._set_reachable(False, error=str(exc), retry_in=round(retry, 3))
                continue
            except EtcdError as exc:
                retry = backoff.next_delay()
                self._set_reachable(True)
                self._refused(exc, retry)
                continue
            backoff.reset()
            self._set_reachable(True)
            self.metrics.lease_ttl.set(kept.ttl or 0)
            if kept.lost:
                self._wake.set()  # the sync puts everything back on a new lease

    def _keepalive_period(self) -> float:
        """A keepalive about every TTL/3 of the TTL etcd granted: two can fail before it runs out."""
        ttl = self.registrar.ttl
        return (ttl if ttl is not None else self.config.ttl) / 3

    def _refused(self, exc: EtcdError, delay: float) -> None:
        message = str(exc)
        if message != self._last_refusal:  # once per distinct refusal, not once per retry
            self._last_refusal = message
            log.error("etcd refused the request", error=message, retry_in=round(delay, 3))

    def _set_reachable(self, reachable: bool, **details: object) -> None:
        was = self.etcd_reachable
        self.etcd_reachable = reachable
        self.metrics.etcd_up.set(reachable)
        if reachable and was is False:
            log.info("etcd reachable again")
        elif not reachable and was is not False:
            log.warning("etcd unreachable", **details)
        elif not reachable:
            log.debug("etcd still unreachable", **details)


def _identity(config: ServiceConfig) -> str | tuple[str, int]:
    """What an instance is across sets: a container and its port, or a service name and port."""
    return config.origin if config.origin is not None else (config.service, config.port)
