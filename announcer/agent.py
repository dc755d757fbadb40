"""The agent: owns the lifecycle and turns health transitions into registrar calls.

Two loops run side by side in one TaskGroup, so neither can stall the other:

- the check loop runs a round of checks at a fixed cadence and feeds the
  verdict to the pure rise/fall machine; a transition changes what the agent
  *wants* in etcd and wakes the sync loop;
- the sync loop makes etcd match what is wanted, keeps the lease alive every
  TTL/3, and backs off (capped, with jitter) while etcd is unreachable.

Shutdown is an awaitable passed in: when it completes, both loops stop and the
record is withdrawn and the lease revoked within ``shutdown_timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import time
from collections.abc import Awaitable
from dataclasses import dataclass

import structlog

from announcer.checks import CheckResult, run_round
from announcer.config import Config
from announcer.health import Health, HealthState
from announcer.http import EndpointServer, health_report
from announcer.metrics import Metrics
from announcer.notify import Notifier
from announcer.record import Record
from announcer.registrar import Registrar
from announcer.registrar.etcd import EtcdRegistrar
from announcer.registrar.etcd_client import EtcdClient, EtcdError, EtcdUnavailable

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
    """What the agent knows now; read by /healthz and by tests."""

    health: Health = Health.UNKNOWN
    registered: bool = False
    etcd_reachable: bool | None = None
    last_round: float | None = None  # monotonic time the last check round ended
    rounds: int = 0
    results: tuple[CheckResult, ...] = ()


class Agent:
    def __init__(
        self,
        config: Config,
        *,
        registrar: Registrar | None = None,
        metrics: Metrics | None = None,
        notifier: Notifier | None = None,
        listen: socket.socket | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics if metrics is not None else Metrics(process=False)
        self._client: EtcdClient | None = None
        if registrar is None:
            self._client = EtcdClient(config.etcd, observe=self._observe_etcd)
            registrar = EtcdRegistrar(self._client, config.key, config.ttl)
        self.registrar = registrar
        self.status = Status()
        self._state = HealthState(config.rise, config.fall)
        self._wanted: Record | None = None
        self._wake = asyncio.Event()
        self._grants_counted = 0
        self._etcd_answers = 0  # requests etcd answered (any answer proves it reachable)
        self._last_refusal: str | None = None
        self._ready = False  # etcd matched the first health verdict; READY=1 was sent
        self._notifier = notifier if notifier is not None else Notifier({})
        self._endpoint = (
            EndpointServer(listen, self.metrics.registry, self.health_report) if listen is not None else None
        )

    # -- lifecycle ------------------------------------------------------------

    async def serve(self, shutdown: Awaitable[object]) -> None:
        cfg = self.config
        log.info(
            "starting", key=cfg.key, record=cfg.record.to_json(),
            checks=[c.name for c in cfg.checks], interval=cfg.interval, ttl=cfg.ttl,
            worst_case_stale_seconds=cfg.worst_case_stale, crashed_agent_linger_seconds=cfg.ttl,
        )  # fmt: skip
        try:
            async with asyncio.TaskGroup() as group:
                loops = [group.create_task(self._check_loop()), group.create_task(self._sync_loop())]
                if self._endpoint is not None:
                    loops.append(group.create_task(self._endpoint.serve()))
                if self._notifier.watchdog_period is not None:
                    loops.append(group.create_task(self._watchdog_loop(self._notifier.watchdog_period)))
                await shutdown
                for task in loops:
                    task.cancel()
        finally:
            await self._shutdown()

    def health_report(self) -> tuple[int, dict[str, object]]:
        """What /healthz answers: alive while a round ended within three intervals."""
        status = self.status
        return health_report(
            last_round=status.last_round,
            now=time.monotonic(),
            max_age=3 * self.config.interval + self.config.timeout,
            details={
                "service": status.health.value,
                "registered": status.registered,
                "etcd_reachable": status.etcd_reachable,
            },
        )

    def _loop_alive(self) -> bool:
        return self.health_report()[0] == 200

    async def _watchdog_loop(self, period: float) -> None:
        while True:
            if self._loop_alive():  # a stuck check loop stops the pings: systemd restarts us
                self._notifier.send("WATCHDOG=1")
            await asyncio.sleep(period)

    def _tell_systemd(self, event: str) -> None:
        status = f"STATUS={event}; service {self.status.health.value}, " + (
            "registered" if self.status.registered else "not registered"
        )
        self._notifier.send(status)

    async def _shutdown(self) -> None:
        self._notifier.send("STOPPING=1", "STATUS=withdrawing and revoking the lease")
        log.info("shutting down", withdraw_within=self.config.shutdown_timeout)
        was_registered = self.status.registered
        try:
            async with asyncio.timeout(self.config.shutdown_timeout):
                await self.registrar.close()
        except TimeoutError:
            log.warning(
                "etcd did not answer in time; the record goes when the lease expires",
                shutdown_timeout=self.config.shutdown_timeout, ttl=self.config.ttl,
            )  # fmt: skip
        except EtcdError as exc:
            log.warning("could not withdraw at shutdown; the lease TTL will", error=str(exc))
        else:
            if was_registered:
                self.metrics.withdrawals.labels("shutdown").inc()
            log.info("withdrawn, lease revoked", key=self.config.key)
        finally:
            self._set_registered(False)
            if self._client is not None:
                await self._client.aclose()
            self._notifier.close()

    # -- the check loop ---------------------------------------------------------

    async def _check_loop(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.config.interval
        next_run = loop.time()
        while True:
            results = await run_round(list(self.config.checks), self.config.timeout)
            self._observe(results)
            next_run += interval
            now = loop.time()
            if now > next_run:  # fixed cadence: skip missed slots, count them, never drift
                missed = int((now - next_run) // interval) + 1
                self.metrics.check_round_overruns.inc(missed)
                next_run += missed * interval
            await asyncio.sleep(next_run - now)

    def _observe(self, results: list[CheckResult]) -> None:
        for check, result in zip(self.config.checks, results, strict=True):
            self.metrics.check_runs.labels(check.name, "pass" if result.ok else "fail").inc()
            self.metrics.check_duration.labels(check.name).observe(result.duration)
            log.debug("check", check=check.name, ok=result.ok, detail=result.detail)
        self.status.results = tuple(results)
        self.status.rounds += 1
        self.status.last_round = time.monotonic()
        self._state, transition = self._state.observe(all(r.ok for r in results))
        if transition is None:
            return
        self.status.health = transition
        self.metrics.healthy.set(transition is Health.PASSING)
        if transition is Health.PASSING:
            log.info("service healthy", rise=self.config.rise)
            self._wanted = self.config.record
        else:
            failing = {c.name: r.detail for c, r in zip(self.config.checks, results, strict=True) if not r.ok}
            log.warning("service unhealthy", fall=self.config.fall, failing=failing)
            self._wanted = None
        self._tell_systemd(f"service {transition.value}")
        self._wake.set()

    # -- the sync loop ----------------------------------------------------------

    async def _sync_loop(self) -> None:
        loop = asyncio.get_running_loop()
        period = self.config.keepalive_period
        backoff = Backoff(base=min(0.5, self.config.interval), cap=max(1.0, self.config.interval))
        keepalive_due = loop.time() + period
        while True:
            self._wake.clear()
            answers = self._etcd_answers
            try:
                if await self._reconcile():
                    keepalive_due = loop.time() + period  # a fresh lease needs no keepalive yet
                if loop.time() >= keepalive_due:
                    await self._refresh()
                    keepalive_due = loop.time() + period
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
                if self._etcd_answers != answers or self._client is None:
                    self._set_reachable(True)
                if self.status.health is not Health.UNKNOWN and not self._ready:
                    self._ready = True
                    self._notifier.send("READY=1")
                    self._tell_systemd("ready")
                delay = max(0.0, keepalive_due - loop.time())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()

    async def _reconcile(self) -> bool:
        """Make etcd match what is wanted; True when that granted a new lease."""
        wanted = self._wanted
        if wanted is not None and not self.status.registered:
            grants = self._lease_grants()
            await self.registrar.announce(wanted)
            self._set_registered(True)
            self.metrics.announcements.inc()
            log.info("announced", key=self.config.key, record=wanted.to_json())
            self._tell_systemd("announced")
            return self._lease_grants() != grants
        if wanted is None and self.status.registered:
            await self.registrar.withdraw()
            self._set_registered(False)
            self.metrics.withdrawals.labels("check_failure").inc()
            log.info("withdrawn", key=self.config.key)
            self._tell_systemd("withdrawn")
        return False

    async def _refresh(self) -> None:
        grants = self._lease_grants()
        await self.registrar.refresh()
        self.metrics.lease_ttl.set(self.registrar.last_ttl or 0)
        if self._lease_grants() != grants and self.status.registered:
            # The lease had expired (etcd was away too long, or lost its data):
            # the record had gone with it, and the registrar has put it back.
            self.metrics.withdrawals.labels("lease_lost").inc()
            self.metrics.announcements.inc()
            log.warning("lease lost; record announced again on a new lease", key=self.config.key)

    def _observe_etcd(self, operation: str, outcome: str, seconds: float) -> None:
        if outcome != "unavailable":
            self._etcd_answers += 1
        self.metrics.observe_etcd(operation, outcome, seconds)

    def _lease_grants(self) -> int:
        grants = self.registrar.lease_grants
        if grants > self._grants_counted:
            self.metrics.lease_grants.inc(grants - self._grants_counted)
            self._grants_counted = grants
        return grants

    def _refused(self, exc: EtcdError, delay: float) -> None:
        message = str(exc)
        if message != self._last_refusal:  # once per distinct refusal, not once per retry
            self._last_refusal = message
            log.error("etcd refused the request", error=message, retry_in=round(delay, 3))

    def _set_registered(self, registered: bool) -> None:
        self.status.registered = registered
        self.metrics.registered.set(registered)

    def _set_reachable(self, reachable: bool, **details: object) -> None:
        was = self.status.etcd_reachable
        self.status.etcd_reachable = reachable
        self.metrics.etcd_up.set(reachable)
        if reachable and was is False:
            log.info("etcd reachable again")
        elif not reachable and was is not False:
            log.warning("etcd unreachable", **details)
        elif not reachable:
            log.debug("etcd still unreachable", **details)
