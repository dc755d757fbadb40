"""Prometheus metrics on an injected registry.

Labels carry only bounded values: the configured services (``service``, ``key``),
configured check names (secrets masked), etcd operation names, outcomes and
reasons from fixed sets. Cardinality follows the configuration, never traffic.

Without ``--metrics-address`` nothing would ever read them, so ``Metrics(enabled=False)``
hands out one do-nothing family for all of them and prometheus_client is never
imported (it costs 1.3 MB and 10 ms of start-up; tests/test_lean.py keeps it so).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from announcer import __version__

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

CHECK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
WITHDRAW_REASONS = ("check_failure", "maintenance", "reload", "shutdown", "lease_lost", "container_stopped")
SERVICE = ("service", "key")


@dataclass(frozen=True)
class _Bound:
    """A labelled family with the service's labels filled in; ``labels`` takes the rest."""

    family: Any
    service: tuple[str, str]
    used: set[tuple[str, ...]] = field(default_factory=set)

    def labels(self, *values: str) -> Any:
        self.used.add(values)
        return self.family.labels(*self.service, *values)

    def remove(self) -> None:
        for values in self.used:
            with contextlib.suppress(KeyError):
                self.family.remove(*self.service, *values)


class ServiceMetrics:
    """One service's metrics: the families of `Metrics`, bound to its service and key."""

    def __init__(self, metrics: Metrics, service: str, key: str) -> None:
        ids = (service, key)
        self._metrics, self._ids = metrics, ids
        self.check_runs = _Bound(metrics.check_runs, ids)
        self.check_duration = _Bound(metrics.check_duration, ids)
        self.withdrawals = _Bound(metrics.withdrawals, ids)
        for reason in WITHDRAW_REASONS:
            self.withdrawals.labels(reason)
        self.check_round_overruns = metrics.check_round_overruns.labels(*ids)
        self.healthy = metrics.healthy.labels(*ids)
        self.registered = metrics.registered.labels(*ids)
        self.announcements = metrics.announcements.labels(*ids)
        self.maintenance = metrics.maintenance.labels(*ids)
        self.flap_damped = metrics.flap_damped.labels(*ids)
        self.flap_suppressed = metrics.flap_suppressed.labels(*ids)
        self.stale_removed = metrics.stale_removed.labels(*ids)

    def remove(self) -> None:
        """Drop every series of this instance: its container is gone, and so is its key."""
        for bound in (self.check_runs, self.check_duration, self.withdrawals):
            bound.remove()
        m = self._metrics
        for family in (
            m.check_round_overruns, m.healthy, m.registered, m.announcements, m.maintenance,
            m.flap_damped, m.flap_suppressed, m.stale_removed,
        ):  # fmt: skip
            with contextlib.suppress(KeyError):
                family.remove(*self._ids)


class _Off:
    """Every metric family and child at once, doing nothing: metrics nobody can scrape."""

    def labels(self, *values: str) -> _Off:
        return self

    def remove(self, *values: str) -> None:
        pass

    def inc(self, amount: float = 1) -> None:
        pass

    def set(self, value: float) -> None:
        pass

    def observe(self, value: float) -> None:
        pass

    def set_function(self, function: Any) -> None:
        pass

    def info(self, value: dict[str, str]) -> None:
        pass


OFF = _Off()


class _Families:
    """Makes prometheus_client families on one registry, or OFF for all of them."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.registry = registry

    def __getattr__(self, kind: str) -> Any:
        if self.registry is None:
            return lambda *args, **kwargs: OFF
        import prometheus_client  # noqa: PLC0415 - only when metrics are served

        family = getattr(prometheus_client, kind)
        return lambda *args, **kwargs: family(*args, registry=self.registry, **kwargs)


class Metrics:
    def __init__(
        self, registry: CollectorRegistry | None = None, *, process: bool = True, enabled: bool = True
    ) -> None:
        if enabled and registry is None:
            from prometheus_client import CollectorRegistry  # noqa: PLC0415

            registry = CollectorRegistry()
        self.registry: CollectorRegistry | None = registry if enabled else None
        r = self.registry
        new = _Families(r)
        if process and r is not None:
            from prometheus_client import PlatformCollector, ProcessCollector  # noqa: PLC0415
            from prometheus_client.gc_collector import GCCollector  # noqa: PLC0415

            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)
        if r is not None:
            import platform  # noqa: PLC0415

            new.Info("announcer_build", "announcer build information").info(
                {"version": __version__, "python_version": platform.python_version()}
            )
        self.check_runs = new.Counter(
            "announcer_check_runs", "Check runs by check and result", [*SERVICE, "check", "result"]
        )
        self.check_duration = new.Histogram(
            "announcer_check_duration_seconds", "Time one check took", [*SERVICE, "check"],
            buckets=CHECK_BUCKETS
        )  # fmt: skip
        self.check_round_overruns = new.Counter(
            "announcer_check_round_overruns", "Check rounds that started late", SERVICE
        )
        self.healthy = new.Gauge(
            "announcer_service_healthy", "1 while the service passes its checks", SERVICE
        )
        self.registered = new.Gauge(
            "announcer_registered",
            "1 while etcd holds the record on a live lease, as far as the agent can know",
            SERVICE,
        )
        self.announcements = new.Counter(
            "announcer_announcements", "Times the record was put into etcd", SERVICE
        )
        self.withdrawals = new.Counter(
            "announcer_withdrawals", "Times the record left etcd, by reason", [*SERVICE, "reason"]
        )
        self.maintenance = new.Gauge(
            "announcer_maintenance", "1 while the maintenance file exists (record withdrawn)", SERVICE
        )
        self.flap_damped = new.Gauge(
            "announcer_flap_damped", "1 while flap damping holds the record back", SERVICE
        )
        self.flap_suppressed = new.Counter(
            "announcer_flap_suppressed", "Times flap damping held an announcement back", SERVICE
        )
        self.stale_removed = new.Counter(
            "announcer_stale_records_removed", "Records left on another lease removed on a failing verdict",
            SERVICE
        )  # fmt: skip
        self.reloads = new.Counter(
            "announcer_reloads", "Configuration reloads (SIGHUP) by result", ["result"]
        )
        for result in ("applied", "rejected"):
            self.reloads.labels(result)
        self.etcd_requests = new.Counter(
            "announcer_etcd_requests", "etcd requests by operation and outcome",
            ["operation", "outcome"]
        )  # fmt: skip
        self.etcd_duration = new.Histogram(
            "announcer_etcd_request_duration_seconds", "etcd request time by operation",
            ["operation"], buckets=CHECK_BUCKETS
        )  # fmt: skip
        self.etcd_up = new.Gauge("announcer_etcd_reachable", "1 while etcd answers")
        self.lease_grants = new.Counter("announcer_lease_grants", "Leases granted")
        self.lease_ttl = new.Gauge(
            "announcer_lease_ttl_seconds", "TTL etcd reported at the lease's grant, then at each keepalive"
        )
        self._confirmed: float | None = None  # when etcd last said the lease lives
        new.Gauge(
            "announcer_lease_keepalive_age_seconds",
            "Seconds since etcd last confirmed the lease: its grant or a keepalive (-1: no lease yet)",
        ).set_function(self._keepalive_age)

    def for_service(self, service: str, key: str) -> ServiceMetrics:
        return ServiceMetrics(self, service, key)

    def observe_etcd(self, operation: str, outcome: str, seconds: float) -> None:
        """The etcd client's observer: every request's operation, outcome and time."""
        self.etcd_requests.labels(operation, outcome).inc()
        if operation != "watch":  # a stream's life is no request's duration
            self.etcd_duration.labels(operation).observe(seconds)
        if operation in ("keepalive", "lease_grant") and outcome == "ok":
            self._confirmed = time.monotonic()  # a grant confirms the lease as a keepalive does
        if operation == "lease_grant" and outcome == "ok":
            self.lease_grants.inc()

    def _keepalive_age(self) -> float:
        if self._confirmed is None:
            return -1.0
        return time.monotonic() - self._confirmed
