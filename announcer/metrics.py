"""Prometheus metrics on an injected registry.

Labels carry only bounded values: the configured services (``service``, ``key``),
configured check names (secrets masked), etcd operation names, outcomes and
reasons from fixed sets. Cardinality follows the configuration, never traffic.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.gc_collector import GCCollector

from announcer import __version__

CHECK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
WITHDRAW_REASONS = ("check_failure", "maintenance", "reload", "shutdown", "lease_lost")
SERVICE = ("service", "key")


@dataclass(frozen=True)
class _Bound:
    """A labelled family with the service's labels filled in; ``labels`` takes the rest."""

    family: Any
    service: tuple[str, str]

    def labels(self, *values: str) -> Any:
        return self.family.labels(*self.service, *values)


class ServiceMetrics:
    """One service's metrics: the families of `Metrics`, bound to its service and key."""

    def __init__(self, metrics: Metrics, service: str, key: str) -> None:
        ids = (service, key)
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


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, *, process: bool = True) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        if process:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)
        Info("announcer_build", "announcer build information", registry=r).info(
            {"version": __version__, "python_version": platform.python_version()}
        )
        self.check_runs = Counter(
            "announcer_check_runs",
            "Check runs by check and result",
            [*SERVICE, "check", "result"],
            registry=r,
        )
        self.check_duration = Histogram(
            "announcer_check_duration_seconds", "Time one check took", [*SERVICE, "check"],
            buckets=CHECK_BUCKETS, registry=r,
        )  # fmt: skip
        self.check_round_overruns = Counter(
            "announcer_check_round_overruns", "Check rounds that started late", SERVICE, registry=r
        )
        self.healthy = Gauge(
            "announcer_service_healthy", "1 while the service passes its checks", SERVICE, registry=r
        )
        self.registered = Gauge(
            "announcer_registered",
            "1 while etcd holds the record on a live lease, as far as the agent can know",
            SERVICE,
            registry=r,
        )
        self.announcements = Counter(
            "announcer_announcements", "Times the record was put into etcd", SERVICE, registry=r
        )
        self.withdrawals = Counter(
            "announcer_withdrawals", "Times the record left etcd, by reason", [*SERVICE, "reason"], registry=r
        )
        self.maintenance = Gauge(
            "announcer_maintenance",
            "1 while the maintenance file exists (record withdrawn)",
            SERVICE,
            registry=r,
        )
        self.flap_damped = Gauge(
            "announcer_flap_damped", "1 while flap damping holds the record back", SERVICE, registry=r
        )
        self.flap_suppressed = Counter(
            "announcer_flap_suppressed", "Times flap damping held an announcement back", SERVICE, registry=r
        )
        self.stale_removed = Counter(
            "announcer_stale_records_removed", "Records left on another lease removed on a failing verdict",
            SERVICE, registry=r,
        )  # fmt: skip
        self.reloads = Counter(
            "announcer_reloads", "Configuration reloads (SIGHUP) by result", ["result"], registry=r
        )
        for result in ("applied", "rejected"):
            self.reloads.labels(result)
        self.etcd_requests = Counter(
            "announcer_etcd_requests", "etcd requests by operation and outcome",
            ["operation", "outcome"], registry=r,
        )  # fmt: skip
        self.etcd_duration = Histogram(
            "announcer_etcd_request_duration_seconds", "etcd request time by operation",
            ["operation"], buckets=CHECK_BUCKETS, registry=r,
        )  # fmt: skip
        self.etcd_up = Gauge("announcer_etcd_reachable", "1 while etcd answers", registry=r)
        self.lease_grants = Counter("announcer_lease_grants", "Leases granted", registry=r)
        self.lease_ttl = Gauge(
            "announcer_lease_ttl_seconds", "TTL etcd reported at the last keepalive", registry=r
        )
        self._last_keepalive: float | None = None
        Gauge(
            "announcer_lease_keepalive_age_seconds",
            "Seconds since the last successful lease keepalive (-1: none yet)",
            registry=r,
        ).set_function(self._keepalive_age)

    def for_service(self, service: str, key: str) -> ServiceMetrics:
        return ServiceMetrics(self, service, key)

    def observe_etcd(self, operation: str, outcome: str, seconds: float) -> None:
        """The etcd client's observer: every request's operation, outcome and time."""
        self.etcd_requests.labels(operation, outcome).inc()
        self.etcd_duration.labels(operation).observe(seconds)
        if operation == "keepalive" and outcome == "ok":
            self._last_keepalive = time.monotonic()
        if operation == "lease_grant" and outcome == "ok":
            self.lease_grants.inc()

    def _keepalive_age(self) -> float:
        if self._last_keepalive is None:
            return -1.0
        return time.monotonic() - self._last_keepalive
