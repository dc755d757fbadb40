"""One service instance: its checks, its verdict, and the pairs it wants in etcd.

A `ServiceAgent` runs its own check loop at a fixed cadence, feeds its rise/fall
machine, applies its maintenance file and flap damping, and so decides what it
wants in etcd (`pairs`). It never talks to etcd: the agent hands every instance's
pairs to the registrar at once and gives each instance back what happened
(`settle`), which the instance turns into its log lines and metrics.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import structlog

from announcer.checks import CheckResult
from announcer.checks.rounds import run_round
from announcer.health import FlapDamper, Health, HealthState
from announcer.metrics import ServiceMetrics
from announcer.registrar import Registrar, Synced
from announcer.settings import ServiceConfig

log = structlog.get_logger("announcer")
Pairs = Mapping[str, bytes]


class Event(enum.StrEnum):
    """What a sync did to an instance's record, as systemd's STATUS= and the logs say it."""

    ANNOUNCED = "announced"
    UPDATED = "updated"
    MOVED = "moved"
    RESTORED = "restored"  # put back on a new lease after the old one was lost
    REPAIRED = "repaired"  # put back after another client deleted it (the registrar logs it)
    WITHDRAWN = "withdrawn"


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
    """One service: its checks, its verdict, and the pairs it wants in etcd."""

    def __init__(
        self,
        config: ServiceConfig,
        metrics: ServiceMetrics,
        registrar: Registrar[ServiceAgent],
        wake: asyncio.Event,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.status = Status()
        self._registrar = registrar
        self._wake = wake
        self._state = HealthState(config.rise, config.fall)
        self._damper = FlapDamper(config.flap_limit)
        self._passing_since: float | None = None  # start of the current run of passing rounds
        self.pairs: Pairs = {}  # what should be in etcd now: key -> value
        self.placed: Pairs = {}  # what the registrar last said it holds for us
        self._placed_lease: int | None = None
        self._rendered: tuple[ServiceConfig, Pairs] | None = None
        self.stale_check = False  # a FAILING verdict asks to look for a crashed agent's record
        self.retired = False  # removed by a reload (or its container went): withdraw, then forget
        self.retired_because = "reload"
        metrics.registered.set_function(lambda: float(self.registered))

    @property
    def keys(self) -> set[str]:
        """Every key this instance may have in etcd: its configuration's, and what it placed."""
        return {pair.key for pair in self.config.pairs} | set(self.placed)

    @property
    def registered(self) -> bool:
        """etcd holds our record on a live lease, as far as we can know.

        False once the lease may have expired (no keepalive answer for its TTL), and while
        another lease holds the key.
        """
        now = time.monotonic()
        return bool(self.placed) and all(self._registrar.holds(key, now) for key in self.placed)

    def details(self) -> dict[str, object]:
        return {
            "service": self.config.service, "port": self.config.port, "state": self.status.health.value,
            "registered": self.registered, "maintenance": self.status.maintenance,
            "flap_damped": self.status.damped, "draining": self.status.draining, "key": self.config.key,
            **({"container": self.config.origin} if self.config.origin is not None else {}),
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
        self.update_wanted()
        self._wake.set()
        return same_checks

    def retire(self, reason: str = "reload") -> None:
        self.retired = True
        self.retired_because = reason
        self.update_wanted()

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
            self.metrics.check_runs.labels(check.name, _outcome(result)).inc()
            self.metrics.check_duration.labels(check.name).observe(result.duration)
            log.debug("check", key=cfg.key, check=check.name, ok=result.ok, detail=result.detail)
        now = time.monotonic()
        self.status.results = tuple(results)
        self.status.rounds += 1
        self.status.last_round = now
        ok = all(r.ok for r in results if not r.pending)
        if ok and any(r.pending for r in results):  # no verdict yet: the machine waits for one
            self.update_wanted(now)
            return
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
                self._wake.set()
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
        # Flap damping holds back a new announcement only: an announced record follows a reload.
        if want and not self.pairs and not self._may_announce(now):
            return
        pairs = self._pairs_of(cfg) if want else {}
        if pairs != self.pairs:
            self.pairs = pairs
            self._wake.set()

    def _pairs_of(self, cfg: ServiceConfig) -> Pairs:
        """The pairs a passing instance wants, rendered once per configuration, not per round."""
        if self._rendered is None or self._rendered[0] is not cfg:
            self._rendered = (cfg, {pair.key: pair.value for pair in cfg.pairs})
        return self._rendered[1]

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

    # -- what etcd did --------------------------------------------------------

    def settle(self, asked: Pairs, synced: Synced) -> Event | None:
        """The registrar did ``synced`` for the ``asked`` pairs: log it, count it, say what it was."""
        before, before_lease = self.placed, self._placed_lease
        self.placed, self._placed_lease = dict(asked), synced.lease
        event = _event(before, asked, new_lease=before_lease != synced.lease, written=bool(synced.written))
        if event is Event.WITHDRAWN:
            self._withdrawn(before, synced)
        elif event is not None:
            self._placed_again(event, before, asked, bool(synced.written))
        return event

    def _withdrawn(self, before: Pairs, synced: Synced) -> None:
        status = self.status
        reason = (
            "maintenance" if status.maintenance else self.retired_because if self.retired else "check_failure"
        )
        self.metrics.withdrawals.labels(reason).inc()
        for key in synced.left:
            log.info("the key was not ours to withdraw", key=key)
        log.info("withdrawn", key=_shown(before), reason=reason)

    def _placed_again(self, event: Event, before: Pairs, asked: Pairs, written: bool) -> None:
        record = self.config.record.to_json()
        if event is Event.ANNOUNCED:
            self.metrics.announcements.inc()
            log.info("announced", key=_shown(asked), record=record, written=written)
        elif event is Event.MOVED:
            log.info("record moved to a new key", old_key=_shown(before), key=_shown(asked), record=record)
        elif event is Event.RESTORED:
            # The lease had expired (etcd was away too long, or lost its data): the record
            # had gone with it, and is back on the new one.
            self.metrics.withdrawals.labels("lease_lost").inc()
            self.metrics.announcements.inc()
            log.warning("lease lost; record announced again on a new lease", key=_shown(asked))
        elif event is Event.UPDATED:
            log.info("record updated", key=_shown(asked), record=record, written=written)

    async def remove_stale(self) -> None:
        """Our checks say FAILING: records on another lease (a crashed agent's) must go too.

        Every key of every format the instance publishes, each guarded on its own revision.
        """
        if self.status.health is not Health.FAILING or self.pairs:
            self.stale_check = False
            return
        for pair in self.config.pairs:
            foreign = await self._registrar.remove_stale(pair.key)
            if foreign is not None:
                self.metrics.stale_removed.inc()
                log.warning(
                    "removed a stale record left on another lease", key=pair.key, foreign_lease=foreign
                )
        self.stale_check = False  # only now is the look done: until then a retry must still make it


def _event(before: Pairs, asked: Pairs, *, new_lease: bool, written: bool) -> Event | None:
    """What a sync was for an instance that held ``before`` and now holds ``asked``."""
    if not asked:
        return Event.WITHDRAWN if before else None
    if not before:
        return Event.ANNOUNCED
    for event, happened in (
        (Event.MOVED, before.keys() != asked.keys()),
        (Event.RESTORED, new_lease),
        (Event.UPDATED, before != asked),
        (Event.REPAIRED, written),
    ):
        if happened:
            return event
    return None


def _outcome(result: CheckResult) -> str:
    return "pass" if result.ok else "pending" if result.pending else "fail"


def _shown(pairs: Pairs) -> str | list[str]:
    keys = list(pairs)
    return keys[0] if len(keys) == 1 else keys
