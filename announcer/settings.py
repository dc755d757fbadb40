"""The frozen settings, and the one table that names every setting.

What a configuration is once it has been read and checked (`Config`,
`ServiceConfig`, `EtcdSettings`), and how each setting is given (`SETTINGS`).
Data sits low: this module imports no client, no check and no source; the etcd
client, the config loader and the CLI all import from here. Each default lives in
one place, the field it belongs to; the table reads it from there.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from announcer.health import FlapLimit
from announcer.publish import FORMATS, Pair, Publishing
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
    discovery: bool = True  # learn the cluster's members from the endpoints given, fail over to them
    # The most endpoints one request may try in turn, discovered ones included: a keepalive
    # that tries each for the whole deadline must still fit in TTL/3 (None: no cap).
    endpoint_limit: int | None = None

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
    ip_source: str = "--ip"  # why the address is this one: the start-up line says it
    publishing: Publishing = field(default_factory=Publishing)
    pairs: tuple[Pair, ...] = ()  # every key it writes, in every format; key is the first
    # Set by a source of services other than the configuration: what the instance is (the
    # agent matches a new set by it) and the fields that source adds to the record.
    origin: str | None = None
    extra: Mapping[str, str | list[str]] = field(default_factory=dict)

    @property
    def record(self) -> Record:
        return Record(self.hostname, self.ip, self.port, self.meta, self.extra)

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
class ContainerSettings:
    """Where the container engine is and how its containers are announced (``--containers``)."""

    engine: str = "/var/run/docker.sock"  # the API's unix socket
    internal: bool = False  # announce the container's own address and port (registrator's -internal)
    labelled_only: bool = False  # only containers that name their service in a label
    allow_exec: bool = False  # exec: checks from labels (a container's labels run no command by default)
    host_ip: str = "127.0.0.1"  # the advertised address, for ports published on every address
    host_ip_source: str = "--ip"
    # What every container instance takes its other settings from: the configuration's
    # layers (flags, environment, file, conventions), as a [[services]] table would.
    layers: tuple[Mapping[str, Any], ...] = field(default=(), compare=False, repr=False)
    ambient: Any = field(default=None, compare=False, repr=False)


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
    event_loop: str = "auto"  # auto: uvloop where it is installed, else asyncio's own
    containers: ContainerSettings | None = None  # None: no container engine is read
    warnings: tuple[str, ...] = field(default=(), compare=False)

    @property
    def drain(self) -> float:
        return max((s.drain for s in self.services), default=0.0)


def default(cls: type[Any], name: str) -> Any:
    """A field's default: the one place it is written."""
    found = next(f for f in fields(cls) if f.name == name)
    if found.default is not MISSING:
        return found.default
    assert found.default_factory is not MISSING
    return found.default_factory()


# The table of settings. Each setting is written here once; the CLI's options (and
# `check --help`), the TOML keys a file and a [[services]] table may hold, the
# ANNOUNCER_* names, what a reload may change and the man page are derived from it.
# Adding a setting is one entry here plus what it does (its conversion in config.py).

SERVICE, PROCESS = "service", "process"
RUN, CHECK, LS = "run", "check", "ls"
_RC, _RL, _ALL = frozenset({RUN, CHECK}), frozenset({RUN, LS}), frozenset({RUN, CHECK, LS})
_NUMBER = (int, float, str)  # what a number may be in the file; converted and checked after


@dataclass(frozen=True)
class Setting:
    """One setting: its name (the TOML key, underscores), how it is given, what it reaches."""

    name: str
    metavar: str
    help: str  # one line; the default is added from ``shown_default``
    scope: str = PROCESS  # SERVICE: a [[services]] table may set it; PROCESS: the top level only
    types: tuple[type, ...] = (str,)  # what a TOML value may be
    shown_default: str | None = None  # the help's "[default: ...]"
    # The Config attribute a running process keeps until a restart (a reload says so);
    # None: a reload applies it.
    restart: str | None = None
    commands: frozenset[str] = frozenset({"run"})  # the commands that take it: run, check, ls
    repeatable: bool = False  # a flag given many times (a list)
    switch: bool = False  # a flag without a value
    option: str | None = None  # the flag's and variable's name when it is not ``name``
    in_file: bool = True  # a TOML key
    in_env: bool = True  # an ANNOUNCER_* variable

    @property
    def flag(self) -> str:
        return "--" + (self.option or self.name).replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + (self.option or self.name).upper()

    @property
    def help_line(self) -> str:
        return f"{self.help} [default: {self.shown_default}]" if self.shown_default else self.help


ENV_PREFIX = "ANNOUNCER_"


def _shown(cls: type[Any], name: str) -> str:
    """A default as help and docs show it, read from the field that holds it."""
    value = default(cls, name)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _settings() -> tuple[Setting, ...]:
    S, C = ServiceConfig, Config
    secs, integer = "SECONDS", "INTEGER"
    etcd = "etcd"
    return (
        Setting("service", "NAME", "Service name, part of the key. [required]", SERVICE, commands=_RC),
        Setting("port", integer, "Announced port, 1-65535. [required]", SERVICE, _NUMBER, commands=_RC),
        Setting("ip", "IPV4", "Announced IPv4.", SERVICE, commands=_RC,
                shown_default="$COREOS_PUBLIC_IPV4, $COREOS_PRIVATE_IPV4, the default route's address"),
        Setting("ip_from", "IFACE|CIDR", "Announce the first IPv4 address of this interface, or the first "
                "of this host's addresses in this CIDR (e.g. eth1, 10.0.0.0/8).", SERVICE, commands=_RC),
        Setting("hostname", "TEXT", "The record's host field.", SERVICE, commands=_RC,
                shown_default="the host name"),
        Setting("key", "TEMPLATE", "Key of the json format (the record); {service} {ip} {port} {hostname} "
                "{instance}.", SERVICE,
                commands=_ALL, shown_default=DEFAULT_KEY),
        Setting("meta", "KEY=VALUE", "Extra record field, repeatable.", SERVICE, (dict, list, str),
                commands=_RC, repeatable=True),
        Setting("publish", "FORMAT", f"Publish format, repeatable: {', '.join(FORMATS)}.", SERVICE,
                (list, str), shown_default=", ".join(default(Publishing, "formats")), commands=_ALL,
                repeatable=True),
        Setting("instance", "TEMPLATE", "The instance's name in the plain, traefik and skydns keys; "
                "{service} {ip} {port} {hostname}.", SERVICE, shown_default=default(Publishing, "instance"),
                commands=_RC),
        Setting("plain_key", "TEMPLATE", "Key of the plain format (value ip:port); {instance} too.", SERVICE,
                shown_default=default(Publishing, "plain_key"), commands=_ALL),
        Setting("traefik_root", "PREFIX", "Traefik's root key (its etcd provider's rootKey).", SERVICE,
                shown_default=default(Publishing, "traefik_root"), commands=_ALL),
        Setting("traefik_scheme", "http|https", "Scheme of the traefik format's server url.", SERVICE,
                shown_default=default(Publishing, "traefik_scheme"), commands=_RC),
        Setting("skydns_prefix", "PREFIX", "Root of the skydns format (CoreDNS etcd's path).", SERVICE,
                shown_default=default(Publishing, "skydns_prefix"), commands=_ALL),
        Setting("skydns_zone", "ZONE", "DNS zone of the skydns format.", SERVICE,
                shown_default=default(Publishing, "skydns_zone"), commands=_ALL),
        Setting("skydns_ttl", secs, "DNS TTL in the skydns value.", SERVICE, _NUMBER,
                shown_default="--ttl", commands=_RC),
        Setting("skydns_priority", integer, "SRV priority in the skydns value.", SERVICE, _NUMBER,
                shown_default="none", commands=_RC),
        Setting("skydns_weight", integer, "SRV weight in the skydns value.", SERVICE, _NUMBER,
                shown_default="none", commands=_RC),
        Setting("containers", "", "Register every running container that publishes a TCP port, read "
                "from the container engine's API (Docker, podman).", PROCESS, (bool, str), "off",
                restart="containers", commands=_RC, switch=True),
        Setting("container_engine", "URL", "The container engine's API socket.", PROCESS,
                shown_default="$DOCKER_HOST, unix:///var/run/docker.sock", restart="containers",
                commands=_RC),
        Setting("container_address", "published|internal", "Announce a container's published host port "
                "(on the advertised address, or the address it is published on), or its own address and "
                "port.", PROCESS, shown_default="published", restart="containers", commands=_RC),
        Setting("container_select", "all|labelled", "Register every container, or only those that name "
                "their service in a label (announcer.service, SERVICE_NAME).", PROCESS,
                shown_default="all", restart="containers", commands=_RC),
        Setting("container_exec_checks", "on|off", "Run exec: checks given in containers' labels (they run "
                "on this host, as announcer's user).", PROCESS, shown_default="off", restart="containers",
                commands=_RC),
        Setting("checks", "SPEC", "Health check, repeatable; all must pass. Kinds: {kinds}. 'http', "
                "'tcp', 'grpc' alone mean the announced ip:port; {ip} and {port} are filled in.",
                SERVICE, (list, str), shown_default=DEFAULT_CHECK, commands=_RC, repeatable=True,
                option="check"),
        Setting("interval", secs, "Seconds between check rounds.", SERVICE, _NUMBER,
                _shown(S, "interval"), commands=_RC),
        Setting("timeout", secs, "Per-check time limit, below --interval.", SERVICE, _NUMBER,
                _shown(S, "timeout"), commands=_RC),
        Setting("rise", integer, "Passing rounds before announcing.", SERVICE, _NUMBER, _shown(S, "rise")),
        Setting("fall", integer, "Failing rounds before withdrawing.", SERVICE, _NUMBER, _shown(S, "fall")),
        Setting("ttl", secs, "Lease TTL, at least 3.", PROCESS, _NUMBER, _shown(C, "ttl"), restart="ttl",
                commands=_RL),
        Setting("etcd_endpoints", "URLS", "Comma-separated etcd URLs.", PROCESS, (list, str),
                f"$ETCDCTL_ENDPOINTS, {DEFAULT_ENDPOINT}", restart=etcd, commands=_RL),
        Setting("etcd_timeout", secs, "Deadline of one whole etcd request.", PROCESS, _NUMBER,
                f"min({_shown(EtcdSettings, 'timeout')}, TTL/6)", restart=etcd, commands=_RL),
        Setting("etcd_discovery", "on|off", "Learn the cluster's other members from the endpoints given and "
                "fail over to them too; off for a proxy or gateway that must be the only way in.",
                PROCESS, shown_default="on", restart=etcd, commands=_RL),
        Setting("etcd_cacert", "FILE", "CA bundle for etcd TLS.", shown_default="$ETCDCTL_CACERT",
                restart=etcd, commands=_RL),
        Setting("etcd_cert", "FILE", "Client certificate.", shown_default="$ETCDCTL_CERT",
                restart=etcd, commands=_RL),
        Setting("etcd_key", "FILE", "Client key.", shown_default="$ETCDCTL_KEY", restart=etcd, commands=_RL),
        Setting("etcd_user", "USER[:PASSWORD]", "etcd user.", shown_default="$ETCDCTL_USER",
                restart=etcd, commands=_RL),
        Setting("etcd_password_file", "FILE", "File holding the etcd password (else $ETCDCTL_PASSWORD).",
                restart=etcd, commands=_RL),
        Setting("shutdown_timeout", secs, "Bound on the etcd work at shutdown.", PROCESS, _NUMBER,
                _shown(C, "shutdown_timeout")),
        Setting("drain", secs, "Stay up this long after the withdraw at SIGTERM, while consumers "
                "converge.", SERVICE, _NUMBER, _shown(S, "drain")),
        Setting("maintenance_file", "PATH", "While this file exists the record is withdrawn; {service} "
                "{port} {ip} {hostname} allowed.", SERVICE, shown_default="none"),
        Setting("flap_limit", "N/SECONDS", "At most N announcements per window, e.g. 3/60.", SERVICE,
                shown_default="off"),
        Setting("metrics_address", "HOST:PORT", "Serve /metrics and /healthz.", shown_default="off",
                restart="metrics_address"),
        Setting("event_loop", "auto|asyncio", "The agent's event loop: auto takes uvloop where it is "
                "installed; asyncio forces asyncio's own.", shown_default=_shown(C, "event_loop"),
                restart="event_loop"),
        Setting("log_format", "auto|json|console", "JSON when stderr is not a terminal.",
                shown_default=_shown(C, "log_format"), restart="log_format", commands=_ALL),
        Setting("log_level", "debug|info|warning|error", "How much is logged.",
                shown_default=_shown(C, "log_level"), restart="log_level", commands=_ALL),
        Setting("config", "FILE", "TOML file with any of these settings, or many [[services]].",
                commands=_ALL, in_file=False),
        Setting("json", "", "check, ls: print JSON (ls --watch: a JSON line an event).",
                commands=frozenset({CHECK, LS}), switch=True,
                in_file=False, in_env=False),
        Setting("watch", "", "ls: after the list, follow every change until Ctrl-C.",
                commands=frozenset({LS}), switch=True, in_file=False, in_env=False),
    )  # fmt: skip


SETTINGS: tuple[Setting, ...] = _settings()
