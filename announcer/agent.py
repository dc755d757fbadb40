"""The agent: owns the lifecycle and turns health transitions into registrar calls.

Two loops run side by side in one TaskGroup, so neither can stall the other:

- the check loop runs a round of checks at a fixed cadence and feeds the
  verdict to the pure rise/fall machine; what the agent *wants* in etcd
  follows from the verdict, the maintenance file and flap damping, and a
  change wakes the sync loop;
- the sync loop makes etcd match what is wanted, keeps the lease alive every
  TTL/3 (the TTL etcd granted), and backs off (capped, with jitter) while etcd
  is unreachable.

Shutdown is an awaitable passed in: when it completes, both loops stop, the
record is withdrawn at once, the agent stays up for the drain time, and the
lease is revoked; the etcd work is bounded by ``shutdown_timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path

import structlog

from announcer.checks import CheckResult, run_round
from announcer.config import Config
from announcer.health import FlapDamper, Health, HealthState
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
    etcd_reachable: bool | None = None
    last_round: float | None = None  # monotonic time the last check round ended
    rounds: int = 0
    results: tuple[CheckResult, ...] = ()
    maintenance: bool = False
    damped: bool = False
    draining: bool = False


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
            registrar = EtcdRegistrar(self._client, config.ttl)
        self.registrar = registrar
        self.status = Status()
        self._state = HealthState(config.rise, config.fall)
        self._damper = FlapDamper(config.flap_limit)
        self._passing_since: float | None = None  # start of the current run of passing rounds
        self._wanted: Record | None = None  # what should be in etcd at config.key
        self._placed: tuple[str, Record] | None = None  # what we put there (key, record)
        self._stale_check = False  # a FAILING verdict asks to look for a crashed agent's record
        self._wake = asyncio.Event()
        self._etcd_answers = 0  # requests etcd answered (any answer proves it reachable)
        self._last_refusal: str | None = None
        self._ready = False  # etcd matched the first health verdict; READY=1 was sent
        self._notifier = notifier if notifier is not None else Notifier({})
        self._endpoint = (
            EndpointServer(listen, self.metrics.registry, self.health_report) if listen is not None else None
        )
        self.metrics.registered.set_function(lambda: float(self.registered))

    @property
    def registered(self) -> bool:
        """etcd holds our record on a live lease, as far as we can know.

        False once the lease may have expired (no keepalive answer for its TTL), and while
        another lease holds the key.
        """
        return self._placed is not None and self.registrar.holds(self._placed[0], time.monotonic())

    # -- lifecycle ------------------------------------------------------------

    async def serve(self, shutdown: Awaitable[object]) -> None:
        cfg = self.config
        log.info(
            "starting", key=cfg.key, record=cfg.record.to_json(),
            checks=[c.name for c in cfg.checks], interval=cfg.interval, ttl=cfg.ttl,
            worst_case_stale_seconds=cfg.worst_case_stale, crashed_agent_linger_seconds=cfg.ttl,
        )  # fmt: skip
        for warning in cfg.warnings:
            log.warning(warning)
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

    def apply(self, config: Config) -> None:
        """Take a reloaded configuration: from the next round on, without withdrawing.

        The verdict carries over when the checks are the same; a changed record or key
        is written by the sync loop in one step (a put, or a put-and-delete transaction).
        """
        old = self.config
        same_checks = [c.name for c in old.checks] == [c.name for c in config.checks]
        self.config = config
        if same_checks:
            self._state = self._state.retuned(config.rise, config.fall)
        else:  # new checks: the verdict stands until they give one of their own
            self._state = HealthState(config.rise, config.fall, status=self._state.status)
        self._damper.limit = config.flap_limit
        if self._wanted is not None:
            self._wanted = config.record
        changed = sorted(name for name in config.changed_fields(old))
        log.info("configuration reloaded", changed=changed, checks_kept=same_checks)
        self._update_wanted()
        self._wake.set()

    def health_report(self) -> tuple[int, dict[str, object]]:
        """What /healthz answers: alive while a round ended within three intervals."""
        status = self.status
        return health_report(
            last_round=status.last_round,
            now=time.monotonic(),
            max_age=3 * self.config.interval + self.config.timeout,
            details={
                "service": status.health.value,
                "registered": self.registered,
                "etcd_reachable": status.etcd_reachable,
                "maintenance": status.maintenance,
                "flap_damped": status.damped,
                "draining": status.draining,
                "key": self.config.key,
            },
        )

    def describe(self) -> dict[str, object]:
        """One line of state, for SIGUSR1 and STATUS=."""
        return {
            "service": self.status.health.value, "registered": self.registered,
            "etcd_reachable": self.status.etcd_reachable, "maintenance": self.status.maintenance,
            "flap_damped": self.status.damped, "key": self.config.key, "lease": self._lease_id(),
        }  # fmt: skip

    def _lease_id(self) -> int | None:
        return getattr(self.registrar, "lease", None)

    def _loop_alive(self) -> bool:
        return self.health_report()[0] == 200

    async def _watchdog_loop(self, period: float) -> None:
        while True:
            if self._loop_alive():  # a stuck check loop stops the pings: systemd restarts us
                self._notifier.send("WATCHDOG=1")
            await asyncio.sleep(period)

    def _tell_systemd(self, event: str) -> None:
        state = "registered" if self.registered else "not registered"
        extra = "".join(
            f", {flag}" for flag, on in (("maintenance", self.status.maintenance),
                                         ("flap-damped", self.status.damped)) if on
        )  # fmt: skip
        self._notifier.send(f"STATUS={event}; service {self.status.health.value}, {state}{extra}")

    async def _shutdown(self) -> None:
        cfg = self.config
        self._notifier.send("STOPPING=1", "STATUS=withdrawing")
        log.info("shutting down", withdraw_within=cfg.shutdown_timeout, drain=cfg.drain)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + cfg.shutdown_timeout
        lease_left = self._lease_left()
        try:
            withdrawn = await self._withdraw_at_shutdown(deadline, lease_left)
            if withdrawn and cfg.drain > 0:
                self.status.draining = True
                self._notifier.send(f"STATUS=withdrawn; draining for {cfg.drain:g}s before exit")
                log.info("withdrawn; draining before exit", drain_seconds=cfg.drain)
                await asyncio.sleep(cfg.drain)
                deadline += cfg.drain
            await self._revoke_at_shutdown(deadline, lease_left, withdrawn)
        finally:
            if self._client is not None:
                await self._client.aclose()
            self._notifier.close()

    def _lease_left(self) -> float:
        ttl = self.registrar.ttl
        return float(ttl if ttl is not None else self.config.ttl)

    async def _withdraw_at_shutdown(self, deadline: float, lease_left: float) -> bool:
        placed = self._placed
        if placed is None:
            return False
        try:
            async with asyncio.timeout_at(deadline):
                deleted = await self.registrar.withdraw(placed[0])
        except TimeoutError:
            log.warning(
                f"etcd did not answer within {self.config.shutdown_timeout:g}s; the record goes "
                f"when the lease expires, within {lease_left:g}s", key=placed[0],
            )  # fmt: skip
            return False
        except EtcdError as exc:
            log.warning(
                f"could not withdraw at shutdown; the record goes when the lease expires, "
                f"within {lease_left:g}s", key=placed[0], error=str(exc),
            )  # fmt: skip
            return False
        self._placed = None
        if deleted:
            self.metrics.withdrawals.labels("shutdown").inc()
        else:
            log.info("at shutdown the key was not ours to withdraw", key=placed[0])
        return deleted

    async def _revoke_at_shutdown(self, deadline: float, lease_left: float, withdrawn: bool) -> None:
        loop = asyncio.get_running_loop()
        if self._lease_id() is None and not withdrawn:
            log.info("nothing to withdraw: no lease was granted", key=self.config.key)
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
            log.info("withdrawn, lease revoked" if closed.revoked else "withdrawn", key=self.config.key)
        elif closed.revoked:
            log.info("lease revoked; no record of ours was registered", key=self.config.key)

    # -- the check loop ---------------------------------------------------------

    async def _check_loop(self) -> None:
        loop = asyncio.get_running_loop()
        next_run = loop.time()
        while True:
            cfg = self.config  # a reload takes effect at the next round
            results = await run_round(list(cfg.checks), cfg.timeout)
            self._observe(cfg, results)
            next_run += cfg.interval
            now = loop.time()
            if now > next_run:  # fixed cadence: skip missed slots, count them, never drift
                missed = int((now - next_run) // cfg.interval) + 1
                self.metrics.check_round_overruns.inc(missed)
                next_run += missed * cfg.interval
            await asyncio.sleep(next_run - now)

    def _observe(self, cfg: Config, results: list[CheckResult]) -> None:
        for check, result in zip(cfg.checks, results, strict=True):
            self.metrics.check_runs.labels(check.name, "pass" if result.ok else "fail").inc()
            self.metrics.check_duration.labels(check.name).observe(result.duration)
            log.debug("check", check=check.name, ok=result.ok, detail=result.detail)
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
                log.info("service healthy", rise=cfg.rise)
            else:
                failing = {c.name: r.detail for c, r in zip(cfg.checks, results, strict=True) if not r.ok}
                log.warning("service unhealthy", fall=cfg.fall, failing=failing)
                self._stale_check = True
            self._tell_systemd(f"service {transition.value}")
        self._update_wanted(now)

    def _update_wanted(self, now: float | None = None) -> None:
        """Decide what etcd should hold, from the verdict, the maintenance file and damping."""
        now = time.monotonic() if now is None else now
        cfg = self.config
        maintenance = cfg.maintenance_file is not None and Path(cfg.maintenance_file).exists()
        if maintenance != self.status.maintenance:
            self.status.maintenance = maintenance
            self.metrics.maintenance.set(maintenance)
            if maintenance:
                log.warning("maintenance: withdrawing while the file exists", file=cfg.maintenance_file)
            else:
                log.info("maintenance over", file=cfg.maintenance_file)
            self._tell_systemd("maintenance" if maintenance else "maintenance over")
        want = self.status.health is Health.PASSING and not maintenance
        if want and self._wanted is None:
            assert self._passing_since is not None or self._state.status is Health.PASSING
            since = self._passing_since if self._passing_since is not None else now
            if not self._damper.may_announce(now, since):
                if not self.status.damped:
                    self.status.damped = True
                    self.metrics.flap_damped.set(1)
                    self.metrics.flap_suppressed.inc()
                    assert cfg.flap_limit is not None
                    log.warning(
                        "flapping: holding the record back until the checks pass for a whole window",
                        flap_limit=str(cfg.flap_limit),
                    )  # fmt: skip
                    self._tell_systemd("flap-damped")
                return
            if self.status.damped:
                self.status.damped = False
                self.metrics.flap_damped.set(0)
                log.info("flapping over: announcing", flap_limit=str(cfg.flap_limit))
        elif not want and self.status.damped and self.status.health is not Health.PASSING:
            pass  # stays damped: the window restarts with the next passing run
        new = cfg.record if want else None
        if new != self._wanted:
            self._wanted = new
            self._wake.set()
        elif self._stale_check:
            self._wake.set()

    # -- the sync loop ----------------------------------------------------------

    async def _sync_loop(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = Backoff(base=min(0.5, self.config.interval), cap=max(1.0, self.config.interval))
        keepalive_due = loop.time() + self._keepalive_period()
        while True:
            self._wake.clear()
            answers = self._etcd_answers
            try:
                await self._reconcile()
                # A lease just granted, perhaps with a shorter TTL than asked, sets the next due time.
                keepalive_due = min(keepalive_due, loop.time() + self._keepalive_period())
                if loop.time() >= keepalive_due:
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

    def _keepalive_period(self) -> float:
        """A keepalive about every TTL/3 of the TTL etcd granted: two can fail before it runs out."""
        ttl = self.registrar.ttl
        return (ttl if ttl is not None else self.config.ttl) / 3

    async def _reconcile(self) -> None:
        """Make etcd match what is wanted."""
        key, wanted, placed = self.config.key, self._wanted, self._placed
        if wanted is not None and placed != (key, wanted):
            if placed is not None and placed[0] != key:
                await self.registrar.move(placed[0], key, wanted)
                log.info("record moved to a new key", old_key=placed[0], key=key, record=wanted.to_json())
            else:
                wrote = await self.registrar.announce(key, wanted)
                if placed is not None:
                    log.info("record updated", key=key, record=wanted.to_json(), written=wrote)
                else:
                    log.info("announced", key=key, record=wanted.to_json(), written=wrote)
                    self.metrics.announcements.inc()
            self._placed = (key, wanted)
            self._tell_systemd("announced")
        elif wanted is None and placed is not None:
            await self.registrar.withdraw(placed[0])
            self._placed = None
            reason = "maintenance" if self.status.maintenance else "check_failure"
            self.metrics.withdrawals.labels(reason).inc()
            log.info("withdrawn", key=placed[0], reason=reason)
            self._tell_systemd("withdrawn")
        if wanted is None and self._stale_check:
            await self._remove_stale(key)

    async def _remove_stale(self, key: str) -> None:
        """Our checks say FAILING: a record on another lease (a crashed agent's) must go too."""
        if self.status.health is not Health.FAILING:
            self._stale_check = False
            return
        foreign = await self.registrar.remove_stale(key)
        self._stale_check = False
        if foreign is not None:
            self.metrics.stale_removed.inc()
            log.warning("removed a stale record left on another lease", key=key, foreign_lease=foreign)

    async def _refresh(self) -> None:
        refreshed = await self.registrar.refresh()
        self.metrics.lease_ttl.set(refreshed.ttl or 0)
        if refreshed.lease_lost and refreshed.restored:
            # The lease had expired (etcd was away too long, or lost its data):
            # the record had gone with it, and the registrar has put it back.
            self.metrics.withdrawals.labels("lease_lost").inc()
            self.metrics.announcements.inc()
            log.warning("lease lost; record announced again on a new lease", keys=list(refreshed.restored))

    def _observe_etcd(self, operation: str, outcome: str, seconds: float) -> None:
        if outcome not in ("unavailable", "bad_answer"):
            self._etcd_answers += 1
        if operation == "lease_grant" and outcome == "ok":
            self.metrics.lease_grants.inc()
        self.metrics.observe_etcd(operation, outcome, seconds)

    def _refused(self, exc: EtcdError, delay: float) -> None:
        message = str(exc)
        if message != self._last_refusal:  # once per distinct refusal, not once per retry
            self._last_refusal = message
            log.error("etcd refused the request", error=message, retry_in=round(delay, 3))

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
