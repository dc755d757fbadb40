"""The frozen settings: what a configuration is, once it has been read and checked.

Data sits low: this module imports no client, no check and no source; the etcd
client and the config loader both import from here. Each default lives in one
place, the field it belongs to.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from announcer.health import FlapLimit
from announcer.record import Record

if TYPE_CHECKING:
    import ssl

    from announcer.checks import Check

DEFAULT_KEY = "/services/{service}/{ip}:{port}"
DEFAULT_CHECK = "http"
DEFAULT_ENDPOINT = "http://127.0.0.1:2379"


@dataclass(frozen=True)
class EtcdSettings:
    endpoints: tuple[str, ...] = (DEFAULT_ENDPOINT,)
    timeout: float = 2.0  # per request, all of it: a member slower than this counts as down
    cacert: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context when any TLS file is set; raises OSError/SSLError on bad files."""
        if self.cacert is None and self.cert is None:
            return None
        import ssl  # noqa: PLC0415 - only with TLS: the CLI's --help reads defaults from here

        context = ssl.create_default_context(cafile=str(self.cacert) if self.cacert else None)
        if self.cert is not None:
            context.load_cert_chain(str(self.cert), str(self.key) if self.key else None)
        return context


@dataclass(frozen=True)
class ServiceConfig:
    """One announced service: what is checked, and what is registered where."""

    service: str
    port: int
    ip: str
    hostname: str
    key: str
    meta: Mapping[str, str]
    checks: tuple[Check, ...]
    interval: float = 2.0
    timeout: float = 1.0
    rise: int = 2
    fall: int = 2
    drain: float = 0.0
    maintenance_file: str | None = None
    flap_limit: FlapLimit | None = None

    @property
    def record(self) -> Record:
        return Record(self.hostname, self.ip, self.port, self.meta)

    @property
    def worst_case_stale(self) -> float:
        """Longest a dead service can stay announced while the agent lives."""
        return self.fall * self.interval + self.timeout

    @property
    def label(self) -> str:
        """How logs and metrics name this service: its name, and the port to tell instances apart."""
        return f"{self.service}:{self.port}"

    def same_checks(self, other: ServiceConfig) -> bool:
        return [c.name for c in self.checks] == [c.name for c in other.checks]


@dataclass(frozen=True)
class Config:
    """The whole process: its services, and what they share (etcd, one lease, one endpoint)."""

    services: tuple[ServiceConfig, ...]
    ttl: int = 30
    etcd: EtcdSettings = field(default_factory=EtcdSettings)
    shutdown_timeout: float = 5.0
    log_format: str = "auto"
    log_level: str = "info"
    metrics_address: tuple[str, int] | None = None
    warnings: tuple[str, ...] = field(default=(), compare=False)

    @property
    def keepalive_period(self) -> float:
        """A keepalive about every TTL/3: two can fail before the lease runs out."""
        return self.ttl / 3

    @property
    def drain(self) -> float:
        return max((s.drain for s in self.services), default=0.0)

    def changed_fields(self, old: Config) -> Iterator[str]:
        """The process-wide settings that differ from ``old``."""
        for f in fields(self):
            if f.name not in ("services", "warnings") and getattr(self, f.name) != getattr(old, f.name):
                yield f.name


def default(cls: type[Any], name: str) -> Any:
    """A field's default: the one place it is written."""
    found = next(f for f in fields(cls) if f.name == name)
    if found.default is not MISSING:
        return found.default
    assert found.default_factory is not MISSING
    return found.default_factory()
