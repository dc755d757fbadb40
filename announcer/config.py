"""The frozen configuration: merged once, validated once.

Precedence, highest first: command-line flags > ``ANNOUNCER_*`` environment
> the TOML file given with ``--config`` > ambient conventions (``ETCDCTL_*``,
``COREOS_*``) > defaults. Every rule that spans fields is checked here, at
start-up, with a message a person can act on.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import re
import socket
import ssl
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from announcer.checks import Check, build_check
from announcer.errors import ConfigError, safe_text
from announcer.files import (
    collect_warnings,
    collected_warnings,
    read_secret_file,
    read_small_file,
    read_text_file,
)
from announcer.health import FlapLimit
from announcer.record import (
    META_NAME_LIMIT,
    META_VALUE_LIMIT,
    RESERVED_FIELDS,
    Record,
    render_key,
    render_path,
)
from announcer.redact import redact_url
from announcer.registrar.etcd_client import EtcdSettings

DEFAULT_KEY = "/services/{service}/{ip}:{port}"
DEFAULT_CHECK = "http"
SHORTHANDS = {
    "http": "http://{ip}:{port}/",
    "https": "https://{ip}:{port}/",
    "tcp": "tcp://{ip}:{port}",
    "grpc": "grpc://{ip}:{port}",
    "grpcs": "grpcs://{ip}:{port}",
}
LOG_FORMATS = ("auto", "json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error")
SERVICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
TEXT_LIMIT = 4096  # characters in any one setting
SECONDS_LIMIT = 86400.0  # a day: longer intervals, timeouts or drains are typing errors
TTL_LIMIT = 9_000_000_000  # etcd's own maximum lease TTL

ENV_PREFIX = "ANNOUNCER_"


@dataclass(frozen=True)
class Config:
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
    ttl: int = 30
    etcd: EtcdSettings = field(default_factory=EtcdSettings)
    shutdown_timeout: float = 5.0
    log_format: str = "auto"
    log_level: str = "info"
    metrics_address: tuple[str, int] | None = None
    drain: float = 0.0
    maintenance_file: str | None = None
    flap_limit: FlapLimit | None = None
    warnings: tuple[str, ...] = field(default=(), compare=False)

    def changed_fields(self, old: Config) -> Iterator[str]:
        """The settings that differ from ``old`` (checks compared by what they check)."""
        for f in fields(self):
            if f.name == "warnings":
                continue
            mine, theirs = getattr(self, f.name), getattr(old, f.name)
            if f.name == "checks":
                mine, theirs = [c.name for c in mine], [c.name for c in theirs]
            if mine != theirs:
                yield f.name

    @property
    def record(self) -> Record:
        return Record(self.hostname, self.ip, self.port, self.meta)

    @property
    def keepalive_period(self) -> float:
        """A keepalive about every TTL/3: two can fail before the lease runs out."""
        return self.ttl / 3

    @property
    def worst_case_stale(self) -> float:
        """Longest a dead service can stay announced while the agent lives."""
        return self.fall * self.interval + self.timeout


# -- converters: str (from flags or env) or TOML value -> typed value ---------------


def _text(name: str, value: Any, limit: int = TEXT_LIMIT) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{_flag(name)} must be a non-empty string, got {_shown(value)}")
    text = value.strip()
    problem = safe_text(text, limit)
    if problem:
        raise ConfigError(f"{_flag(name)} {problem}")
    return text


def _shown(value: Any) -> str:
    """A value for an error message: short, one line, and never a whole file's worth."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _integer(name: str, value: Any, low: int, high: int | None = None) -> int:
    try:
        number = value if isinstance(value, int) and not isinstance(value, bool) else int(str(value), 10)
    except ValueError:
        number = None
    if number is None or number < low or (high is not None and number > high):
        bound = f"from {low} to {high}" if high is not None else f"of at least {low}"
        raise ConfigError(f"{_flag(name)} must be a whole number {bound}, got {_shown(value)}")
    return number


def _seconds(name: str, value: Any, *, zero: bool = False) -> float:
    try:
        number = (
            float(value) if isinstance(value, int | float | str) and not isinstance(value, bool) else math.nan
        )
    except (TypeError, ValueError, OverflowError):
        number = math.nan
    if not math.isfinite(number) or number < 0 or (number == 0 and not zero) or number > SECONDS_LIMIT:
        least = "zero or more" if zero else "a positive number of"
        raise ConfigError(
            f"{_flag(name)} must be {least} seconds, at most {SECONDS_LIMIT:g}, got {_shown(value)}"
        )
    return number


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    text = value.lower() if isinstance(value, str) else None
    if text not in choices:
        raise ConfigError(f"{_flag(name)} must be one of {', '.join(choices)}, got {_shown(value)}")
    return text


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _ipv4(name: str, value: Any) -> str:
    try:
        return str(ipaddress.IPv4Address(value.strip() if isinstance(value, str) else None))
    except ValueError:
        raise ConfigError(f"{_flag(name)} must be an IPv4 address, got {_shown(value)}") from None


def _string_list(name: str, value: Any, separators: str) -> list[str]:
    if isinstance(value, str):
        items = [part.strip() for part in re.split(separators, value) if part.strip()]
    elif isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        items = [v.strip() for v in value if v.strip()]
    else:
        raise ConfigError(f"{_flag(name)} must be a string or a list of strings, got {_shown(value)}")
    return [_text(name, item) for item in items]


def _endpoints(value: Any) -> tuple[str, ...]:
    endpoints = _string_list("etcd_endpoints", value, r"[,\s]+")
    if not endpoints:
        raise ConfigError("--etcd-endpoints must name at least one endpoint")
    for endpoint in endpoints:
        shown = redact_url(endpoint)
        try:
            parts = urlsplit(endpoint)
            _ = parts.port
        except ValueError:
            parts = None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"--etcd-endpoints entry {shown!r} must be a URL like http://127.0.0.1:2379")
        if parts.username is not None or parts.password is not None:
            raise ConfigError(
                f"--etcd-endpoints entry {shown!r} carries credentials; etcd does not read them "
                "from the URL: use --etcd-user and --etcd-password-file"
            )
    return tuple(endpoints)


def _meta(value: Any) -> dict[str, str]:
    """``{"k": "v"}`` from the file, or ``["k=v", ...]`` / ``"k=v,k2=v2"`` from flags and env."""
    if isinstance(value, Mapping):
        pairs = list(value.items())
    else:
        pairs = []
        for item in _string_list("meta", value, r"[,\n]"):
            name, sep, text = item.partition("=")
            if not sep:
                raise ConfigError(f"--meta {_shown(item)} must look like KEY=VALUE")
            pairs.append((name.strip(), text.strip()))
    meta: dict[str, str] = {}
    for name, text in pairs:
        if not isinstance(name, str) or not name or safe_text(name, META_NAME_LIMIT):
            raise ConfigError(
                f"--meta key {_shown(name)} must be printable text of 1 to {META_NAME_LIMIT} characters"
            )
        if name in RESERVED_FIELDS:
            raise ConfigError(f"--meta may not replace the record field {name!r}")
        if not isinstance(text, str):
            raise ConfigError(f"--meta {name} must be a string, got {_shown(text)}")
        problem = safe_text(text, META_VALUE_LIMIT)
        if problem:
            raise ConfigError(f"--meta {name} {problem}")
        meta[name] = text
    return meta


def _check_entries(value: Any) -> list[tuple[str, dict[str, Any]]]:
    """Check specs: strings (flags, env: separated by newlines or ';') or file tables."""
    if isinstance(value, str):
        value = _string_list("check", value, r"[;\n]")
    if not isinstance(value, list | tuple):
        raise ConfigError(f"checks must be a list, got {_shown(value)}")
    entries: list[tuple[str, dict[str, Any]]] = []
    for item in value:
        if isinstance(item, str):
            entries.append((_text("check", item), {}))
        elif isinstance(item, Mapping) and isinstance(item.get("spec"), str):
            entries.append((_text("check", item["spec"]), dict(item)))
        else:
            raise ConfigError(f"a [[checks]] entry needs a spec string, got {_shown(item)}")
    return entries


def expand_spec(spec: str, ip: str, port: int) -> str:
    spec = SHORTHANDS.get(spec.lower(), spec)
    return spec.replace("{ip}", ip).replace("{port}", str(port))


# -- ambient defaults -------------------------------------------------------------


def primary_ipv4() -> str:
    """The address of the default route's interface, found without sending a packet.

    ``connect`` on a UDP socket only picks a route and a source address.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: routed, never contacted
            return str(probe.getsockname()[0])
        except OSError:
            pass
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        raise ConfigError("cannot find this host's IPv4 address; pass --ip") from None


# -- the file ------------------------------------------------------------------------

FILE_KEYS = frozenset({
    "service", "port", "ip", "hostname", "key", "meta", "checks", "interval", "timeout",
    "rise", "fall", "ttl", "etcd_endpoints", "etcd_timeout", "etcd_cacert", "etcd_cert",
    "etcd_key", "etcd_user", "etcd_password_file", "shutdown_timeout", "log_format",
    "log_level", "metrics_address", "drain", "maintenance_file", "flap_limit",
})  # fmt: skip
# What a value in the file may be; everything is checked again when it is converted.
_NUMBER = (int, float, str)
FILE_TYPES: dict[str, tuple[type, ...]] = {
    **dict.fromkeys(FILE_KEYS, (str,)),
    **dict.fromkeys(("port", "interval", "timeout", "rise", "fall", "ttl", "etcd_timeout",
                     "shutdown_timeout", "drain"), _NUMBER),
    "meta": (dict, list, str), "checks": (list, str), "etcd_endpoints": (list, str),
    "flap_limit": (str,),
}  # fmt: skip


def read_file(path: str) -> dict[str, Any]:
    text = read_text_file(Path(path), "config file")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"config file {path} is nested too deeply") from None
    if "check" in data and "checks" not in data:
        data["checks"] = data.pop("check")
    unknown = sorted(set(data) - FILE_KEYS)
    if unknown:
        raise ConfigError(f"config file {path}: unknown setting(s) {', '.join(_shown(u) for u in unknown)}")
    for name, value in data.items():
        if not isinstance(value, FILE_TYPES[name]) or isinstance(value, bool):
            wanted = " or ".join(_TYPE_NAMES[t] for t in FILE_TYPES[name])
            raise ConfigError(f"config file {path}: {name} must be {wanted}, got {_shown(value)}")
    return data


_TYPE_NAMES = {str: "a string", int: "a whole number", float: "a number", dict: "a table", list: "a list"}


# -- merging -------------------------------------------------------------------------


def _env_layer(env: Mapping[str, str]) -> dict[str, Any]:
    layer: dict[str, Any] = {}
    for name in FILE_KEYS:
        env_name = ENV_PREFIX + ("CHECK" if name == "checks" else name.upper())
        if env.get(env_name, "").strip():
            layer[name] = env[env_name]
    return layer


def _ambient_layer(env: Mapping[str, str]) -> dict[str, Any]:
    layer: dict[str, Any] = {}
    ip = env.get("COREOS_PUBLIC_IPV4") or env.get("COREOS_PRIVATE_IPV4")
    if ip:
        layer["ip"] = ip
    for name, env_name in (
        ("etcd_endpoints", "ETCDCTL_ENDPOINTS"),
        ("etcd_cacert", "ETCDCTL_CACERT"),
        ("etcd_cert", "ETCDCTL_CERT"),
        ("etcd_key", "ETCDCTL_KEY"),
        ("etcd_user", "ETCDCTL_USER"),
    ):
        if env.get(env_name):
            layer[name] = env[env_name]
    return layer


@dataclass(frozen=True)
class Ambient:
    """What the machine says, injectable so tests need not depend on it."""

    hostname: Callable[[], str] = socket.gethostname
    ip: Callable[[], str] = primary_ipv4


def load_config(
    flags: Mapping[str, Any],
    env: Mapping[str, str],
    ambient: Ambient | None = None,
) -> Config:
    """Merge the layers and validate everything; bad input raises ConfigError."""
    ambient = ambient or Ambient()
    token = collect_warnings()
    try:
        config = _load(flags, env, ambient)
    finally:
        warnings = collected_warnings(token)
    return dataclasses.replace(config, warnings=warnings)


def _load(flags: Mapping[str, Any], env: Mapping[str, str], ambient: Ambient) -> Config:
    config_path = flags.get("config") or env.get(ENV_PREFIX + "CONFIG")
    if config_path is not None:
        config_path = _text("config", config_path)
    file_layer = read_file(config_path) if config_path else {}
    layers = [
        {k: v for k, v in flags.items() if v is not None and v != [] and k != "config"},
        _env_layer(env),
        file_layer,
        _ambient_layer(env),
    ]

    def pick(name: str, default: Any = None) -> Any:
        for layer in layers:
            if name in layer:
                return layer[name]
        return default

    def pick_meta() -> dict[str, str]:
        # Meta merges key by key, higher layers winning, so a flag can add one field.
        merged: dict[str, str] = {}
        for layer in reversed(layers):
            if "meta" in layer:
                merged.update(_meta(layer["meta"]))
        return merged

    return _build(pick, pick_meta(), env, ambient)


Picker = Callable[..., Any]  # pick(name, default=None): the winning layer's value


def _build(pick: Picker, meta: dict[str, str], env: Mapping[str, str], ambient: Ambient) -> Config:
    raw_service = pick("service")
    if raw_service is None:
        raise ConfigError("--service is required (or ANNOUNCER_SERVICE, or service in the file)")
    service = _text("service", raw_service)
    if not SERVICE_NAME.match(service):
        raise ConfigError(f"--service {service!r} may hold only letters, digits, '.', '_' and '-'")
    raw_port = pick("port")
    if raw_port is None:
        raise ConfigError("--port is required (or ANNOUNCER_PORT, or port in the file)")
    port = _integer("port", raw_port, 1, 65535)
    raw_ip = pick("ip")
    ip = _ipv4("ip", raw_ip if raw_ip is not None else ambient.ip())
    raw_hostname = pick("hostname")
    hostname = _text("hostname", raw_hostname if raw_hostname is not None else ambient.hostname(), 255)

    interval = _seconds("interval", pick("interval", 2.0))
    timeout = _seconds("timeout", pick("timeout", 1.0))
    if timeout >= interval:
        raise ConfigError(
            f"--timeout ({timeout:g}s) must be below --interval ({interval:g}s), "
            "or a hanging check would delay the next round"
        )
    rise = _integer("rise", pick("rise", 2), 1)
    fall = _integer("fall", pick("fall", 2), 1)
    ttl = _integer("ttl", pick("ttl", 30), 3, TTL_LIMIT)
    etcd = _etcd_settings(pick, env, ttl)

    names: dict[str, str | int] = {"service": service, "ip": ip, "port": port, "hostname": hostname}
    key = render_key(
        _text("key", pick("key", DEFAULT_KEY)), service=service, ip=ip, port=port, hostname=hostname
    )
    entries = _check_entries(pick("checks", [DEFAULT_CHECK]))
    if not entries:
        raise ConfigError("at least one --check is needed")
    checks = tuple(build_check(expand_spec(spec, ip, port), options) for spec, options in entries)
    record = Record(hostname, ip, port, meta)
    record.check_size()
    raw_maintenance = pick("maintenance_file")
    maintenance_file = (
        render_path(_text("maintenance_file", raw_maintenance), "--maintenance-file", **names)
        if raw_maintenance
        else None
    )

    return Config(
        service=service,
        port=port,
        ip=ip,
        hostname=hostname,
        key=key,
        meta=meta,
        checks=checks,
        interval=interval,
        timeout=timeout,
        rise=rise,
        fall=fall,
        ttl=ttl,
        etcd=etcd,
        shutdown_timeout=_seconds("shutdown_timeout", pick("shutdown_timeout", 5.0)),
        log_format=_choice("log_format", pick("log_format", "auto"), LOG_FORMATS),
        log_level=_choice("log_level", pick("log_level", "info"), LOG_LEVELS),
        metrics_address=_address(pick("metrics_address")),
        drain=_seconds("drain", pick("drain", 0.0), zero=True),
        maintenance_file=maintenance_file,
        flap_limit=_flap_limit(pick("flap_limit")),
    )


def _flap_limit(value: Any) -> FlapLimit | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "off", "none")):
        return None
    count, sep, window = _text("flap_limit", value).partition("/")
    if not sep:
        raise ConfigError(f"--flap-limit {_shown(value)} must look like N/SECONDS, e.g. 3/60, or off")
    number = _integer("flap_limit", count.strip(), 1, 1000)
    return FlapLimit(number, _seconds("flap_limit", window.strip()))


def _address(value: Any) -> tuple[str, int] | None:
    if value is None or value == "":
        return None
    host, sep, port = _text("metrics_address", value).rpartition(":")
    if not sep:
        raise ConfigError(f"--metrics-address {_shown(value)} must look like HOST:PORT")
    return host.strip("[]") or "127.0.0.1", _integer("metrics_address", port, 0, 65535)


def _path(name: str, value: Any) -> Path | None:
    if value is None:
        return None
    path = Path(_text(name, value))
    read_small_file(path, _flag(name))
    return path


def _etcd_settings(pick: Picker, env: Mapping[str, str], ttl: int) -> EtcdSettings:
    endpoints = _endpoints(pick("etcd_endpoints", "http://127.0.0.1:2379"))
    explicit_timeout = pick("etcd_timeout")
    # A keepalive is due every TTL/3. One keepalive may try every endpoint in turn, each
    # for up to the deadline; that must fit in the next third, so that a second keepalive
    # still lands before the lease runs out: endpoints x deadline <= TTL/3.
    budget = ttl / 3 / len(endpoints)
    timeout = (
        _seconds("etcd_timeout", explicit_timeout) if explicit_timeout is not None else min(2.0, budget / 2)
    )
    if timeout > budget:
        raise ConfigError(
            f"--etcd-timeout {timeout:g}s is too long for --ttl {ttl} with {len(endpoints)} endpoint(s): "
            f"a keepalive every {ttl / 3:g}s that tries each endpoint for {timeout:g}s could let the "
            f"lease expire while the agent is alive; "
            f"use --etcd-timeout {budget:.3g} or less, or a longer --ttl"
        )
    user, password = _etcd_credentials(pick, env)
    settings = EtcdSettings(
        endpoints=endpoints,
        timeout=timeout,
        cacert=_path("etcd_cacert", pick("etcd_cacert")),
        cert=_path("etcd_cert", pick("etcd_cert")),
        key=_path("etcd_key", pick("etcd_key")),
        user=user,
        password=password,
    )
    if (settings.cert is None) != (settings.key is None):
        raise ConfigError("--etcd-cert and --etcd-key go together: give both or neither")
    try:
        settings.ssl_context()
    except (OSError, ssl.SSLError) as exc:
        names = ", ".join(str(p) for p in (settings.cacert, settings.cert, settings.key) if p)
        raise ConfigError(f"etcd TLS files ({names}) are not usable: {exc}") from None
    return settings


def _etcd_credentials(pick: Picker, env: Mapping[str, str]) -> tuple[str | None, str | None]:
    raw_user = pick("etcd_user")
    if raw_user is None:
        return None, None
    user, sep, password = _text("etcd_user", raw_user).partition(":")
    if sep:
        return user, password
    password_file = pick("etcd_password_file")
    if password_file:
        return user, read_secret_file(
            Path(_text("etcd_password_file", password_file)), "--etcd-password-file"
        )
    if "ETCDCTL_PASSWORD" in env:
        return user, env["ETCDCTL_PASSWORD"]
    raise ConfigError(
        f"--etcd-user {user!r} needs a password: --etcd-user {user}:PASSWORD, "
        "--etcd-password-file, or $ETCDCTL_PASSWORD"
    )
