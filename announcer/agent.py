"""The agent: owns the lifecycle and turns health transitions into registrar calls.

One process serves one service (the sidekick) or many (host mode) with the same
code. Each service has a `ServiceAgent`: its own check loop at a fixed cadence
(phases spread over the interval, so services never fire at once and a hanging
check of one cannot delay another's rounds), its own rise/fall machine,
maintenance file and flap damping, and so its own wanted record. The `Agent`
owns what they share: one registrar and so one lease, one sync loop that makes
etcd match what every service wants and keeps the lease alive every TTL/3 (the
TTL etcd granted), the metrics endpoint, the watchdog and the shutdown.

Shutdown is an awaitable passed in: when it completes, the loops stop, every
record is withdrawn at once, the agent stays up for the drain time, and the
lease is revoked; the etcd work is bounded by ``shutdown_timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path

import structlog

from announcer.checks import CheckResult
from announcer.checks.rounds import run_round
from announcer.errors import EtcdError, EtcdUnavailable
from announcer.health import FlapDamper, Health, HealthState
from announcer.http import EndpointServer, health_report
from announcer.metrics import Metrics, ServiceMetrics
from announcer.notify import Notifier
from announcer.record import Record
from announcer.registrar import Registrar
from announcer.settings import Config, ServiceConfig

log = structlog.get_logger("announcer")


@dataclass
class Backoff:
    """Capped exponential backoff with jitter, so a fleet does not retry in step."""

    base: float
    cap: float
    attempts: int = 0

    def next_delay(self) -> float:
        delay = min(self.cap, self.base * 2.0 ** min(self.attempts, 32))
        self.attempts += 1
        jitter: float = random.uniform(0.5, 1.0)  # noqa: S311 - spreads retries, not cryptography
        return delay * jitter

    def reset(self) -> None:
        self.attempts = 0


@dataclass
class Status:
    """What the agent knows of one service now; read by /healthz and by tests."""

    health: Health = Health.UNKNOWN
    etcd_reachable: bool | None = None
    last_round: float | None = None  # monotonic time the last check round ended
    rounds: int = 0
    results: tuple[CheckResult, ...] = ()
    maintenance: bool = False
    damped: bool = False
    draining: bool = False


class ServiceAgent:
    """One service: its checks, its verdict, and the record it wants in etcd."""

    def __init__(
        self, config: ServiceConfig, metrics: ServiceMetrics, registrar: Registrar, wake: asyncio.Event
    ):
        self.config = config
        self.metrics = metrics
        self.status = Status()
        self._registrar = registrar
        self._wake = wake
        self._state = HealthState(config.rise, config.fall)
        self._damper = FlapDamper(config.flap_limit)
        self._passing_since: float | None = None  # start of the current run of passing rounds
        self.wanted: Record | None = None  # what should be in etcd at config.key
        self.placed: tuple[str, Record] | None = None  # what we put there (key, record)
        self.stale_check = False  # a FAILING verdict asks to look for a crashed agent's record
        self.retired = False  # removed by a reload: withdraw, then forget
        self.asked = False  # this pass asked etcd something (an answer proves it reachable)
        metrics.registered.set_function(lambda: float(self.registered))

    @property
    def registered(self) -> bool:
        """etcd holds our record on a live lease, as far as we can know.

        False once the lease may have expired (no keepalive answer for its TTL), and while
        another lease holds the key.
        """
        return self.placed is not None and self._registrar.holds(self.placed[0], time.monotonic())

    def details(self) -> dict[str, object]:
        return {
            "service": self.status.health.value, "registered": self.registered,
            "maintenance": self.status.maintenance, "flap_damped": self.status.damped,
            "draining": self.status.draining, "key": self.config.key,
        }  # fmt: skip

    def loop_alive(self, now: float) -> bool:
        last = self.status.last_round
        return last is not None and now - last <= 3 * self.config.interval + self.config.timeout

    def apply(self, config: ServiceConfig) -> bool:
        """A reloaded configuration, from the next round on; True when the checks stayed the same."""
        same_checks = config.same_checks(self.config)
        self.config = config
        if same_checks:
            self._state = self._state.retuned(config.rise, config.fall)
        else:  # new checks: the verdict stands until they give one of their own
            self._state = HealthState(config.rise, config.fall, status=self._state.status)
        self._damper.limit = config.flap_limit
        if self.wanted is not None:
            self.wanted = config.record
        self.update_wanted()
        self._wake.set()
        return same_checks

    # -- checks ---------------------------------------------------------------

    async def check_loop(self, phase: float) -> None:
        loop = asyncio.get_running_loop()
        next_run = loop.time() + phase
        await asyncio.sleep(phase)
        while not self.retired:
            cfg = self.config  # a reload takes effect at the next round
            results = await run_round(list(cfg.checks), cfg.timeout)
            if self.retired:
                return
            self.observe(cfg, results)
            next_run += cfg.interval
            now = loop.time()
            if now > next_run:  # fixed cadence: skip missed slots, count them, never drift
                missed = int((now - next_run) // cfg.interval) + 1
                self.metrics.check_round_overruns.inc(missed)
                next_run += missed * cfg.interval
            await asyncio.sleep(next_run - now)

    def observe(self, cfg: ServiceConfig, results: list[CheckResult]) -> None:
        for check, result in zip(cfg.checks, results, strict=True):
            self.metrics.check_runs.labels(check.name, "pass" if result.ok else "fail").inc()
            self.metrics.check_duration.labels(check.name).observe(result.duration)
            log.debug("check", key=cfg.key, check=check.name, ok=result.ok, detail=result.detail)
        now = time.monotonic()
        self.status.results = tuple(results)
        self.status.rounds += 1
        self.status.last_round = now
        ok = all(r.ok for r in results)
        if not ok:
            self._passing_since = None
        elif self._passing_since is None:
            self._passing_since = now
        self._state, transition = self._state.observe(ok)
        if transition is not None:
            self.status.health = transition
            self.metrics.healthy.set(transition is Health.PASSING)
            if transition is Health.PASSING:
                log.info("service healthy", key=cfg.key, rise=cfg.rise)
            else:
                failing = {c.name: r.detail for c, r in zip(cfg.checks, results, strict=True) if not r.ok}
                log.warning("service unhealthy", key=cfg.key, fall=cfg.fall, failing=failing)
                self.stale_check = True
        self.update_wanted(now)

    def update_wanted(self, now: float | None = None) -> None:
        """Decide what etcd should hold, from the verdict, the maintenance file and damping."""
        now = time.monotonic() if now is None else now
        cfg = self.config
        maintenance = cfg.maintenance_file is not None and Path(cfg.maintenance_file).exists()
        if maintenance != self.status.maintenance:
            self.status.maintenance = maintenance
            self.metrics.maintenance.set(maintenance)
            if maintenance:
                log.warning(
                    "maintenance: withdrawing while the file exists", key=cfg.key, file=cfg.maintenance_file
                )
            else:
                log.info("maintenance over", key=cfg.key, file=cfg.maintenance_file)
        want = self.status.health is Health.PASSING and not maintenance and not self.retired
        if want and self.wanted is None and not self._may_announce(now):
            return
        new = cfg.record if want else None
        if new != self.wanted or self.stale_check:
            self.wanted = new
            self._wake.set()

    def _may_announce(self, now: float) -> bool:
        since = self._passing_since if self._passing_since is not None else now
        if self._damper.may_announce(now, since):
            if self.status.damped:
                self.status.damped = False
                self.metrics.flap_damped.set(0)
                log.info(
                    "flapping over: announcing", key=self.config.key, flap_limit=str(self.config.flap_limit)
                )
            return True
        if not self.status.damped:
            self.status.damped = True
            self.metrics.flap_damped.set(1)
            self.metrics.flap_suppressed.inc()
            log.warning(
                "flapping: holding the record back until the checks pass for a whole window",
                key=self.config.key, flap_limit=str(self.config.flap_limit),
            )  # fmt: skip
        return False

    # -- etcd -----------------------------------------------------------------

    async def reconcile(self) -> str | None:
        """Make etcd match what this service wants; what happened, for STATUS=, or None."""
        key, wanted, placed = self.config.key, self.wanted, self.placed
        event = None
        if (wanted is not None and placed != (key, wanted)) or (wanted is None and placed is not None):
            self.asked = True
        if wanted is None and self.stale_check:
            self.asked = True
        if wanted is not None and placed != (key, wanted):
            if placed is not None and placed[0] != key:
                await self._registrar.move(placed[0], key, wanted)
                log.info("record moved to a new key", old_key=placed[0], key=key, record=wanted.to_json())
            else:
                wrote = await self._registrar.announce(key, wanted)
                if placed is not None:
                    log.info("record updated", key=key, record=wanted.to_json(), written=wrote)
                else:
                    log.info("announced", key=key, record=wanted.to_json(), written=wrote)
                    self.metrics.announcements.inc()
            self.placed = (key, wanted)
            event = "announced"
        elif wanted is None and placed is not None:
            await self._registrar.withdraw(placed[0])
            self.placed = None
            reason = (
                "maintenance" if self.status.maintenance else "reload" if self.retired else "check_failure"
            )
            self.metrics.withdrawals.labels(reason).inc()
            log.info("withdrawn", key=placed[0], reason=reason)
            event = "withdrawn"
        if wanted is None and self.stale_check:
            await self._remove_stale(key)
        return event

    async def _remove_stale(self, key: str) -> None:
        """Our checks say FAILING: a record on another lease (a crashed agent's) must go too."""
        if self.status.health is not Health.FAILING:
            self.stale_check = False
            return
        foreign = await self._registrar.remove_stale(key)
        self.stale_check = False
        if foreign is not None:
            self.metrics.stale_removed.inc()
            log.warning("removed a stale record left on another lease", key=key, foreign_lease=foreign)


class Agent:
    def __init__(
        self,
        config: Config,
        *,
        registrar: Registrar,
        metrics: Metrics,
        notifier: Notifier,
        endpoint: EndpointServer | None = None,
    ) -> None:
        """Everything concrete is built at the process edge (runner.build_agent) and handed in."""
        self.config = config
        self.metrics = metrics
        self.registrar = registrar
        self._wake = asyncio.Event()
        self.services = [self._service(svc) for svc in config.services]
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
        status.draining = self._draining
        return status

    @property
    def registered(self) -> bool:
        return all(s.registered for s in self.services)

    # -- lifecycle ------------------------------------------------------------

    async def serve(self, shutdown: Awaitable[object]) -> None:
        for svc in self.services:
            cfg = svc.config
            log.info(
                "starting", key=cfg.key, record=cfg.record.to_json(),
                checks=[c.name for c in cfg.checks], interval=cfg.interval, ttl=self.config.ttl,
                worst_case_stale_seconds=cfg.worst_case_stale, crashed_agent_linger_seconds=self.config.ttl,
            )  # fmt: skip
        for warning in self.config.warnings:
            log.warning(warning)
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                loops = [self._start_checks(svc, i) for i, svc in enumerate(self.services)]
                loops.append(group.create_task(self._sync_loop()))
                if self._endpoint is not None:
                    loops.append(group.create_task(self._endpoint.serve()))
                if self._notifier.watchdog_period is not None:
                    loops.append(group.create_task(self._watchdog_loop(self._notifier.watchdog_period)))
                await shutdown
                for task in [*loops, *self._extra_loops]:
                    task.cancel()
        finally:
            self._group = None
            await self._shutdown()

    def _start_checks(self, svc: ServiceAgent, index: int) -> asyncio.Task[None]:
        # A stable phase per service spreads the rounds over the interval.
        assert self._group is not None
        phase = svc.config.interval * index / max(1, len(self.services))
        return self._group.create_task(svc.check_loop(phase))

    def apply(self, config: Config) -> None:
        """Take a reloaded configuration without withdrawing what did not change.

        Services are matched by service name and port (with one service on each side, they
        are the same service whatever changed): a matched service keeps its verdict and
        its record, which is rewritten or moved in one step; a new service starts its
        checks; a removed one is withdrawn.
        """
        current = {(s.config.service, s.config.port): s for s in self.services if not s.retired}
        single = len(config.services) == 1 and len(current) == 1
        kept: list[ServiceAgent] = []
        for svc_config in config.services:
            identity = next(iter(current)) if single else (svc_config.service, svc_config.port)
            match = current.pop(identity, None)
            if match is not None:
                same = match.apply(svc_config)
                kept.append(match)
                log.info("configuration reloaded", key=svc_config.key, checks_kept=same)
            else:
                added = self._service(svc_config)
                kept.append(added)
                if self._group is not None:
                    self._extra_loops.append(self._start_checks(added, len(kept) - 1))
                log.info("service added by a reload", key=svc_config.key)
        retired = [s for s in self.services if s not in kept]  # what `current` left, and earlier ones
        for svc in retired:
            svc.retired = True
            svc.update_wanted()
            log.info("service removed by a reload", key=svc.config.key)
        self.services = kept + retired  # retired ones stay until their withdraw is done
        self.config = config
        self._wake.set()

    def health_report(self) -> tuple[int, dict[str, object]]:
        """What /healthz answers: 200 while every service's last round ended within three intervals."""
        now = time.monotonic()
        active = [s for s in self.services if not s.retired]
        rounds = [s.status.last_round for s in active]
        oldest = None if None in rounds else min(r for r in rounds if r is not None)
        details: dict[str, object] = {"etcd_reachable": self.etcd_reachable}
        if len(active) == 1:
            details.update(active[0].details())
        details["services"] = [s.details() for s in active]
        alive = all(s.loop_alive(now) for s in active)
        return health_report(alive=alive, age=None if oldest is None else now - oldest, details=details)

    def describe(self) -> dict[str, object]:
        """One line of state, for SIGUSR1."""
        return {
            "etcd_reachable": self.etcd_reachable, "lease": self._lease_id(),
            "services": [s.details() for s in self.services],
            **(self.services[0].details() if len(self.services) == 1 else {}),
        }  # fmt: skip

    def _lease_id(self) -> int | None:
        return getattr(self.registrar, "lease", None)

    async def _watchdog_loop(self, period: float) -> None:
        while True:
            if self.health_report()[0] == 200:  # a stuck check loop stops the pings: systemd restarts us
                self._notifier.send("WATCHDOG=1")
            await asyncio.sleep(period)

    def _tell_systemd(self, event: str) -> None:
        services = [s for s in self.services if not s.retired]
        if len(services) == 1:
            svc = services[0]
            state = "registered" if svc.registered else "not registered"
            extra = "".join(
                f", {flag}" for flag, on in (("maintenance", svc.status.maintenance),
                                             ("flap-damped", svc.status.damped)) if on
            )  # fmt: skip
            self._notifier.send(f"STATUS={event}; service {svc.status.health.value}, {state}{extra}")
            return
        passing = sum(s.status.health is Health.PASSING for s in services)
        registered = sum(s.registered for s in services)
        self._notifier.send(f"STATUS={event}; {passing}/{len(services)} passing, {registered} registered")

    async def _shutdown(self) -> None:
        cfg = self.config
        drain = max((s.config.drain for s in self.services if s.placed is not None), default=0.0)
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
        placed = [s for s in self.services if s.placed is not None]
        if not placed:
            return ()
        keys = [s.placed[0] for s in placed if s.placed is not None]
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
            assert svc.placed is not None
            if svc.placed[0] in deleted:
                svc.metrics.withdrawals.labels("shutdown").inc()
            else:
                log.info("at shutdown the key was not ours to withdraw", key=svc.placed[0])
            svc.placed = None
        return deleted

    async def _revoke_at_shutdown(
        self, deadline: float, lease_left: float, withdrawn: tuple[str, ...]
    ) -> None:
        loop = asyncio.get_running_loop()
        if self._lease_id() is None and not withdrawn:
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

    # -- the sync loop ----------------------------------------------------------

    async def _sync_loop(self) -> None:
        loop = asyncio.get_running_loop()
        interval = min(s.config.interval for s in self.services)
        backoff = Backoff(base=min(0.5, interval), cap=max(1.0, interval))
        keepalive_due = loop.time() + self._keepalive_period()
        while True:
            self._wake.clear()
            asked = False
            try:
                for svc in list(self.services):
                    svc.asked = False
                    event = await svc.reconcile()
                    asked = asked or svc.asked
                    if svc.retired and svc.placed is None:
                        self.services.remove(svc)
                    elif event is not None:
                        self._tell_systemd(event)
                # A lease just granted, perhaps with a shorter TTL than asked, sets the next due time.
                keepalive_due = min(keepalive_due, loop.time() + self._keepalive_period())
                if loop.time() >= keepalive_due:
                    asked = True
                    await self._refresh()
                    keepalive_due = loop.time() + self._keepalive_period()
            except EtcdUnavailable as exc:
                delay = backoff.next_delay()
                self._set_reachable(False, error=str(exc), retry_in=round(delay, 3))
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
                    self._notifier.send("READY=1")
                    self._tell_systemd("ready")
                delay = max(0.0, keepalive_due - loop.time())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()

    def _keepalive_period(self) -> float:
        """A keepalive about every TTL/3 of the TTL etcd granted: two can fail before it runs out."""
        ttl = self.registrar.ttl
        return (ttl if ttl is not None else self.config.ttl) / 3

    async def _refresh(self) -> None:
        refreshed = await self.registrar.refresh()
        self.metrics.lease_ttl.set(refreshed.ttl or 0)
        if refreshed.lease_lost and refreshed.restored:
            # The lease had expired (etcd was away too long, or lost its data):
            # the records had gone with it, and the registrar has put them back.
            for svc in self.services:
                if svc.placed is not None and svc.placed[0] in refreshed.restored:
                    svc.metrics.withdrawals.labels("lease_lost").inc()
                    svc.metrics.announcements.inc()
            log.warning("lease lost; record announced again on a new lease", keys=list(refreshed.restored))

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
