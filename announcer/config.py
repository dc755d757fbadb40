"""Loading the configuration: merged once, validated once.

Precedence, highest first: command-line flags > ``ANNOUNCER_*`` environment
> the TOML file given with ``--config`` > ambient conventions (``ETCDCTL_*``,
``COREOS_*``) > defaults. In a host file, each ``[[services]]`` table's own
settings win over all of those for that service, which take the rest from the
same layers. Every rule that spans fields is checked here, at start-up, with a
message a person can act on.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from announcer.checks import build_check
from announcer.convert import (
    SERVICE_NAME,
    address,
    check_entries,
    choice,
    endpoints,
    expand_spec,
    flag,
    flap_limit,
    integer,
    ipv4,
    meta,
    seconds,
    string_list,
    switch,
    text,
)
from announcer.errors import ConfigError
from announcer.files import collect_warnings, collected_warnings, read_secret_file, read_small_file
from announcer.publish import FORMATS, TRAEFIK_SCHEMES, Pair, Publishing, render_pairs, roots
from announcer.record import Record, render, render_key, render_path
from announcer.settings import (
    DEFAULT_CHECK,
    DEFAULT_ENDPOINT,
    DEFAULT_KEY,
    Config,
    ContainerSettings,
    EtcdSettings,
    ServiceConfig,
    default,
)
from announcer.sources import Ambient, ambient_layer, env_layer, primary_ipv4, read_file

if TYPE_CHECKING:
    from announcer.containers.labels import Wanted

__all__ = ["Ambient", "Config", "ServiceConfig", "load_config", "primary_ipv4"]

LOG_FORMATS = ("auto", "json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error")
EVENT_LOOPS = ("auto", "asyncio")
CONTAINER_ADDRESSES = ("published", "internal")
TTL_LIMIT = 9_000_000_000  # etcd's own maximum lease TTL

Layer = Mapping[str, Any]
Picker = Callable[..., Any]  # pick(name, default=None): the winning layer's value


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


def _picker(layers: list[Layer]) -> Picker:
    def pick(name: str, fallback: Any = None) -> Any:
        for layer in layers:
            if name in layer:
                return layer[name]
        return fallback

    return pick


def _merged_meta(layers: list[Layer]) -> dict[str, str]:
    # Meta merges key by key, higher layers winning, so a flag can add one field.
    merged: dict[str, str] = {}
    for layer in reversed(layers):
        if "meta" in layer:
            merged.update(meta(layer["meta"]))
    return merged


def _layers(
    flags: Mapping[str, Any], env: Mapping[str, str]
) -> tuple[list[Layer], list[dict[str, Any]] | None]:
    """The layers, highest first, and the file's [[services]] tables if it has them."""
    given = {k: v for k, v in flags.items() if v is not None and v != []}
    from_env = env_layer(env)
    flag_path, env_path = given.pop("config", None), from_env.pop("config", None)
    config_path = flag_path if flag_path is not None else env_path
    if config_path is not None:
        config_path = text("config", config_path)
    file_layer = read_file(config_path) if config_path else {}
    tables: list[dict[str, Any]] | None = file_layer.pop("services", None)
    return [given, from_env, file_layer, ambient_layer(env)], tables


def _load(flags: Mapping[str, Any], env: Mapping[str, str], ambient: Ambient) -> Config:
    layers, tables = _layers(flags, env)
    pick = _picker(layers)
    ttl = integer("ttl", pick("ttl", default(Config, "ttl")), 3, TTL_LIMIT)
    containers = (
        _containers(layers, ambient, env) if switch("containers", pick("containers", False)) else None
    )
    service_layers = [layers] if tables is None else [[table, *layers] for table in tables]
    if containers is not None and tables is None and pick("service") is None and pick("port") is None:
        service_layers = []  # `announcer --containers`: only the containers are announced
    services = tuple(
        _build_service(svc, ambient, number, ttl) for number, svc in enumerate(service_layers, 1)
    )
    _no_shared_keys(services)
    config = Config(
        services=services,
        ttl=ttl,
        etcd=_etcd_settings(pick, env, ttl),
        shutdown_timeout=seconds(
            "shutdown_timeout", pick("shutdown_timeout", default(Config, "shutdown_timeout"))
        ),
        log_format=choice("log_format", pick("log_format", default(Config, "log_format")), LOG_FORMATS),
        log_level=choice("log_level", pick("log_level", default(Config, "log_level")), LOG_LEVELS),
        metrics_address=address(pick("metrics_address")),
        event_loop=choice("event_loop", pick("event_loop", default(Config, "event_loop")), EVENT_LOOPS),
        containers=containers,
    )
    if containers is not None:  # the settings every container instance takes: checked now, not per container
        try:
            container_probe(config)
        except ConfigError as exc:
            raise ConfigError(f"for --containers: {exc}") from None
    return config


def container_probe(config: Config) -> ServiceConfig:
    """What any container instance of this configuration is like (its formats, its host);
    ConfigError when the settings every container instance takes are bad."""
    from announcer.containers.labels import Wanted  # noqa: PLC0415 - only with --containers

    assert config.containers is not None
    return container_service(config, Wanted.bare("0" * 12, "probe", config.containers.host_ip, 1))


def _containers(layers: list[Layer], ambient: Ambient, env: Mapping[str, str]) -> ContainerSettings:
    from announcer.containers.engine import socket_path  # noqa: PLC0415 - only with --containers

    pick = _picker(layers)
    raw_engine = pick("container_engine")
    host_ip, host_ip_source = _advertised_address(layers, ambient)
    # A container's instance takes every setting but its own (name, address, port, checks,
    # meta) from the same layers as a [[services]] table.
    own = {"service", "port", "ip", "ip_from", "checks"}
    return ContainerSettings(
        engine=socket_path(None if raw_engine is None else text("container_engine", raw_engine), env),
        internal=choice("container_address", pick("container_address", "published"), CONTAINER_ADDRESSES)
        == "internal",
        labelled_only=choice("container_select", pick("container_select", "all"), ("all", "labelled"))
        == "labelled",
        allow_exec=switch("container_exec_checks", pick("container_exec_checks", "off")),
        host_ip=host_ip,
        host_ip_source=host_ip_source,
        layers=tuple({k: v for k, v in layer.items() if k not in own} for layer in layers),
        ambient=ambient,
    )


def container_service(config: Config, wanted: Wanted) -> ServiceConfig:
    """The service one container instance is: its labels' settings over the configuration's layers.

    A bad label raises ConfigError, which the source says in one line naming the container.
    """
    settings = config.containers
    assert settings is not None
    own: dict[str, Any] = {
        "service": wanted.service, "port": wanted.port, "ip": wanted.ip, "meta": dict(wanted.meta),
        "checks": [wanted.check or "tcp"],
    }  # fmt: skip
    extra: dict[str, str | list[str]] = {"service": wanted.service, "source": "containers"}
    extra["container"] = wanted.container
    if wanted.tags:
        extra["tags"] = list(wanted.tags)
    layers = [own, *settings.layers]
    svc = _build_service(layers, settings.ambient, 0, config.ttl, extra=extra)
    return dataclasses.replace(svc, ip_source=wanted.ip_source, origin=wanted.origin)


def _build_service(
    layers: list[Layer],
    ambient: Ambient,
    number: int,
    ttl: int,
    extra: Mapping[str, str | list[str]] | None = None,
) -> ServiceConfig:
    pick = _picker(layers)
    where = f" (for [[services]] #{number})" if number and len(layers) > 4 else ""
    raw_service = pick("service")
    if raw_service is None:
        raise ConfigError(f"--service is required (or ANNOUNCER_SERVICE, or service in the file){where}")
    service = text("service", raw_service)
    if not SERVICE_NAME.match(service):
        raise ConfigError(f"--service {service!r} may hold only letters, digits, '.', '_' and '-'")
    raw_port = pick("port")
    if raw_port is None:
        raise ConfigError(f"--port is required (or ANNOUNCER_PORT, or port in the file){where}")
    port = integer("port", raw_port, 1, 65535)
    ip, ip_source = _advertised_address(layers, ambient)
    raw_hostname = pick("hostname")
    hostname = text("hostname", raw_hostname if raw_hostname is not None else ambient.hostname(), 255)

    def own(name: str) -> Any:
        return pick(name, default(ServiceConfig, name))

    interval = seconds("interval", own("interval"))
    timeout = seconds("timeout", own("timeout"))
    if timeout >= interval:
        raise ConfigError(
            f"--timeout ({timeout:g}s) must be below --interval ({interval:g}s), "
            f"or a hanging check would delay the next round{where}"
        )
    publishing = _publishing(pick)
    names: dict[str, str | int] = {"service": service, "ip": ip, "port": port, "hostname": hostname}
    instance = render(publishing.instance, "--instance", **names)
    key = render_key(text("key", pick("key", DEFAULT_KEY)), {**names, "instance": instance})
    entries = check_entries(pick("checks", [DEFAULT_CHECK]))
    if not entries:
        raise ConfigError(f"at least one --check is needed{where}")
    checks = tuple(build_check(expand_spec(spec, ip, port), options) for spec, options in entries)
    record_meta = _merged_meta(layers)
    record = Record(hostname, ip, port, record_meta, extra or {})
    record.check_size()
    pairs = render_pairs(record, service=service, json_key=key, publishing=publishing, lease_ttl=ttl)
    raw_maintenance = pick("maintenance_file")
    return ServiceConfig(
        service=service,
        port=port,
        ip=ip,
        hostname=hostname,
        meta=record_meta,
        checks=checks,
        interval=interval,
        timeout=timeout,
        rise=integer("rise", own("rise"), 1),
        fall=integer("fall", own("fall"), 1),
        drain=seconds("drain", own("drain"), zero=True),
        ip_source=ip_source,
        maintenance_file=(
            render_path(text("maintenance_file", raw_maintenance), "--maintenance-file", **names)
            if raw_maintenance
            else None
        ),
        flap_limit=flap_limit(pick("flap_limit")),
        publishing=publishing,
        pairs=pairs,
        key=pairs[0].key,
        extra=extra or {},
    )


@dataclass(frozen=True)
class Listing:
    """What `announcer ls` needs: how to reach etcd, where to look, how to log."""

    etcd: EtcdSettings
    prefixes: tuple[str, ...]
    log_format: str = default(Config, "log_format")
    log_level: str = default(Config, "log_level")


def load_listing(flags: Mapping[str, Any], env: Mapping[str, str], prefix: str | None = None) -> Listing:
    """The agent's etcd settings and, unless ``prefix`` is given, the roots its formats write under."""
    layers, tables = _layers(flags, env)
    pick = _picker(layers)
    ttl = integer("ttl", pick("ttl", default(Config, "ttl")), 3, TTL_LIMIT)
    if prefix is not None:
        prefixes: tuple[str, ...] = (text("prefix", prefix),)
    else:
        stacks = [layers] if not tables else [[table, *layers] for table in tables]
        prefixes = tuple(dict.fromkeys(root for stack in stacks for root in _roots(_picker(stack))))
    return Listing(
        etcd=_etcd_settings(pick, env, ttl),
        prefixes=prefixes,
        log_format=choice("log_format", pick("log_format", default(Config, "log_format")), LOG_FORMATS),
        log_level=choice("log_level", pick("log_level", default(Config, "log_level")), LOG_LEVELS),
    )


def _roots(pick: Picker) -> list[str]:
    return roots(_publishing(pick), text("key", pick("key", DEFAULT_KEY)))


def _advertised_address(layers: list[Layer], ambient: Ambient) -> tuple[str, str]:
    """The announced address, and why it is that one (the start-up line says both)."""
    explicit = _picker(layers[:-1])  # every layer but the ambient conventions (COREOS_*)
    raw_ip, raw_from = explicit("ip"), explicit("ip_from")
    if raw_ip is not None and raw_from is not None:
        raise ConfigError("give --ip or --ip-from, not both")
    if raw_ip is not None:
        return ipv4("ip", raw_ip), "--ip"
    if raw_from is not None:
        return _address_from(text("ip_from", raw_from), ambient)
    for name in ("COREOS_PUBLIC_IPV4", "COREOS_PRIVATE_IPV4"):
        if layers[-1].get("ip_source") == name:
            return ipv4("ip", layers[-1]["ip"]), f"${name}"
    return ipv4("ip", ambient.ip()), "the default route's interface"


def _address_from(wanted: str, ambient: Ambient) -> tuple[str, str]:
    """The first IPv4 address of an interface, or the first in a CIDR, on this host."""
    addresses = ambient.interfaces()
    if "/" in wanted:
        try:
            network = ipaddress.IPv4Network(wanted, strict=False)
        except ValueError:
            raise ConfigError(f"--ip-from {wanted!r} is neither an interface name nor an IPv4 CIDR") from None
        for name, address, _ in addresses:
            if ipaddress.IPv4Address(address) in network:
                return address, f"--ip-from {network}: the first address in it, on {name}"
        shown = ", ".join(f"{a}/{p} on {n}" for n, a, p in addresses) or "none"
        raise ConfigError(f"--ip-from {network}: no address of this host is in it (it has {shown})")
    mine = [address for name, address, _ in addresses if name == wanted]
    if mine:
        return mine[0], f"--ip-from {wanted}: its first IPv4 address"
    names = sorted({name for name, _, _ in addresses})
    if wanted in _all_interfaces():
        raise ConfigError(f"--ip-from {wanted}: the interface has no IPv4 address")
    raise ConfigError(f"--ip-from {wanted}: no such interface (IPv4 ones: {', '.join(names) or 'none'})")


def _all_interfaces() -> set[str]:
    return {name for _, name in socket.if_nameindex()}


def _publishing(pick: Picker) -> Publishing:
    """How a service publishes: its formats, and each format's own settings."""

    def own(name: str) -> Any:
        return pick(name, default(Publishing, name))

    raw = pick("publish", default(Publishing, "formats"))
    # Given as a list (flags, TOML) or one string (ANNOUNCER_PUBLISH), each item may list several.
    joined = ",".join(raw) if isinstance(raw, list | tuple) and all(isinstance(r, str) for r in raw) else raw
    names = string_list("publish", joined, r"[,\s]+")
    formats = tuple(dict.fromkeys(choice("publish", name, FORMATS) for name in names))
    if not formats:
        raise ConfigError(f"--publish must name at least one of {', '.join(FORMATS)}")

    def optional(name: str, low: int, high: int) -> int | None:
        raw = pick(name)
        return None if raw is None else integer(name, raw, low, high)

    return Publishing(
        formats=formats,
        instance=text("instance", own("instance")),
        plain_key=text("plain_key", own("plain_key")),
        traefik_root=text("traefik_root", own("traefik_root")),
        traefik_scheme=choice("traefik_scheme", own("traefik_scheme"), TRAEFIK_SCHEMES),
        skydns_prefix=text("skydns_prefix", own("skydns_prefix")),
        skydns_zone=text("skydns_zone", own("skydns_zone")),
        skydns_ttl=optional("skydns_ttl", 0, 2**31 - 1),
        skydns_priority=optional("skydns_priority", 0, 65535),
        skydns_weight=optional("skydns_weight", 0, 65535),
    )


def _no_shared_keys(services: tuple[ServiceConfig, ...]) -> None:
    """Two formats of one instance, or two instances, rendering one key: one line naming both."""
    seen: dict[str, tuple[ServiceConfig, Pair]] = {}
    for svc in services:
        for pair in svc.pairs:
            other, other_pair = seen.setdefault(pair.key, (svc, pair))
            if other_pair is pair:
                continue
            both = (
                f"{svc.label}: the {other_pair.format} and {pair.format} formats"
                if other is svc
                else f"services {other.label} ({other_pair.format}) and {svc.label} ({pair.format})"
            )
            raise ConfigError(f"{both} both render the key {pair.key}; give one a key of its own")


def _path(name: str, value: Any) -> Path | None:
    if value is None:
        return None
    path = Path(text(name, value))
    read_small_file(path, flag(name))
    return path


def _etcd_settings(pick: Picker, env: Mapping[str, str], ttl: int) -> EtcdSettings:
    urls = endpoints(pick("etcd_endpoints", DEFAULT_ENDPOINT))
    explicit_timeout = pick("etcd_timeout")
    # A keepalive is due every TTL/3. One keepalive may try every endpoint in turn, each
    # for up to the deadline; that must fit in the next third, so that a second keepalive
    # still lands before the lease runs out: endpoints x deadline <= TTL/3.
    budget = ttl / 3 / len(urls)
    timeout = (
        seconds("etcd_timeout", explicit_timeout)
        if explicit_timeout is not None
        else min(default(EtcdSettings, "timeout"), budget / 2)
    )
    if timeout > budget:
        raise ConfigError(
            f"--etcd-timeout {timeout:g}s is too long for --ttl {ttl} with {len(urls)} endpoint(s): "
            f"a keepalive every {ttl / 3:g}s that tries each endpoint for {timeout:g}s could let the "
            f"lease expire while the agent is alive; "
            f"use --etcd-timeout {budget:.3g} or less, or a longer --ttl"
        )
    user, password = _etcd_credentials(pick, env)
    settings = EtcdSettings(
        endpoints=urls,
        timeout=timeout,
        cacert=_path("etcd_cacert", pick("etcd_cacert")),
        cert=_path("etcd_cert", pick("etcd_cert")),
        key=_path("etcd_key", pick("etcd_key")),
        user=user,
        password=password,
        discovery=choice("etcd_discovery", pick("etcd_discovery", "on"), ("on", "off")) == "on",
        # Discovery adds members only while endpoints x deadline still fits in TTL/3.
        endpoint_limit=max(len(urls), int(ttl / 3 / timeout)),
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
    user, sep, password = text("etcd_user", raw_user).partition(":")
    if sep:
        return user, password
    password_file = pick("etcd_password_file")
    if password_file:
        return user, read_secret_file(Path(text("etcd_password_file", password_file)), "--etcd-password-file")
    if "ETCDCTL_PASSWORD" in env:
        return user, env["ETCDCTL_PASSWORD"]
    raise ConfigError(
        f"--etcd-user {user!r} needs a password: --etcd-user {user}:PASSWORD, "
        "--etcd-password-file, or $ETCDCTL_PASSWORD"
    )
