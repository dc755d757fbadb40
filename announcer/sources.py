"""Where settings come from: the TOML file, ``ANNOUNCER_*`` variables and the machine.

Each source gives a layer, a plain dict of raw values; the loader merges the
layers and converts the winners.
"""

from __future__ import annotations

import socket
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from announcer import settings
from announcer.errors import ConfigError, shown
from announcer.files import read_text_file


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


def file_types() -> dict[str, tuple[type, ...]]:
    """Every TOML key of the top level, and what its value may be (checked again when converted)."""
    return {s.name: s.types for s in settings.SETTINGS if s.in_file}


def service_keys() -> frozenset[str]:
    """The keys a [[services]] table may set for itself; the rest are the process's."""
    return frozenset(s.name for s in settings.SETTINGS if s.in_file and s.scope == settings.SERVICE)


SERVICES_LIMIT = 10_000


def read_file(path: str) -> dict[str, Any]:
    """The file's settings; ``services``, if present, is a list of checked service tables."""
    text = read_text_file(Path(path), "config file")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"config file {path} is nested too deeply") from None
    services = data.pop("services", None)
    types = file_types()
    _check_table(path, data, types, frozenset(types), "")
    if services is not None:
        if not isinstance(services, list) or not all(isinstance(t, dict) for t in services):
            raise ConfigError(f"config file {path}: services must be [[services]] tables")
        if not services or len(services) > SERVICES_LIMIT:
            raise ConfigError(f"config file {path}: [[services]] must hold 1 to {SERVICES_LIMIT} tables")
        for number, table in enumerate(services, 1):
            _check_table(path, table, types, service_keys(), f"[[services]] #{number}: ")
        data["services"] = services
    return data


def _check_table(
    path: str, table: dict[str, Any], types: dict[str, tuple[type, ...]], allowed: frozenset[str], where: str
) -> None:
    if "check" in table and "checks" not in table:
        table["checks"] = table.pop("check")
    unknown = sorted(set(table) - allowed)
    if unknown:
        process_wide = [u for u in unknown if u in types]
        if process_wide:
            names = ", ".join(process_wide)
            raise ConfigError(f"config file {path}: {where}{names} is process-wide; set it at the top level")
        names = ", ".join(shown(u) for u in unknown)
        raise ConfigError(f"config file {path}: {where}unknown setting(s) {names}")
    for name, value in table.items():
        if not isinstance(value, types[name]) or isinstance(value, bool):
            wanted = " or ".join(_TYPE_NAMES[t] for t in types[name])
            raise ConfigError(f"config file {path}: {where}{name} must be {wanted}, got {shown(value)}")


_TYPE_NAMES = {
    str: "a string",
    int: "a whole number",
    float: "a number",
    dict: "a table",
    list: "a list",
    bool: "true or false",
}


def env_layer(env: Mapping[str, str]) -> dict[str, Any]:
    """The settings given as ANNOUNCER_* variables (the file's path among them)."""
    return {s.name: env[s.env] for s in settings.SETTINGS if s.in_env and env.get(s.env, "").strip()}


def ambient_layer(env: Mapping[str, str]) -> dict[str, Any]:
    layer: dict[str, Any] = {}
    for name in ("COREOS_PUBLIC_IPV4", "COREOS_PRIVATE_IPV4"):
        if env.get(name):
            layer["ip"], layer["ip_source"] = env[name], name
            break
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


def interface_addresses() -> list[tuple[str, str, int]]:
    """Every IPv4 address of this host's interfaces: (interface, address, prefix length).

    psutil reads them (getifaddrs); imported only when --ip-from asks, so a sidekick that
    does not pays nothing for it.
    """
    import ipaddress  # noqa: PLC0415

    import psutil  # noqa: PLC0415

    found: list[tuple[str, str, int]] = []
    for name, addresses in sorted(psutil.net_if_addrs().items()):
        for address in addresses:
            if address.family == socket.AF_INET and address.address:
                netmask = address.netmask or "255.255.255.255"
                prefix = ipaddress.IPv4Network(f"0.0.0.0/{netmask}").prefixlen
                found.append((name, address.address, prefix))
    return found


@dataclass(frozen=True)
class Ambient:
    """What the machine says, injectable so tests need not depend on it."""

    hostname: Callable[[], str] = socket.gethostname
    ip: Callable[[], str] = primary_ipv4
    interfaces: Callable[[], list[tuple[str, str, int]]] = interface_addresses
