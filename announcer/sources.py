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

from announcer.errors import ConfigError, shown
from announcer.files import read_text_file

ENV_PREFIX = "ANNOUNCER_"


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


# Settings a service of a host file may set for itself; the rest are the process's.
SERVICE_KEYS = frozenset({
    "service", "port", "ip", "hostname", "key", "meta", "checks", "interval", "timeout", "rise",
    "fall", "drain", "maintenance_file", "flap_limit",
})  # fmt: skip
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
    _check_table(path, data, FILE_KEYS, "")
    if services is not None:
        if not isinstance(services, list) or not all(isinstance(t, dict) for t in services):
            raise ConfigError(f"config file {path}: services must be [[services]] tables")
        if not services or len(services) > SERVICES_LIMIT:
            raise ConfigError(f"config file {path}: [[services]] must hold 1 to {SERVICES_LIMIT} tables")
        for number, table in enumerate(services, 1):
            _check_table(path, table, SERVICE_KEYS, f"[[services]] #{number}: ")
        data["services"] = services
    return data


def _check_table(path: str, table: dict[str, Any], allowed: frozenset[str], where: str) -> None:
    if "check" in table and "checks" not in table:
        table["checks"] = table.pop("check")
    unknown = sorted(set(table) - allowed)
    if unknown:
        process_wide = [u for u in unknown if u in FILE_KEYS]
        if process_wide:
            names = ", ".join(process_wide)
            raise ConfigError(f"config file {path}: {where}{names} is process-wide; set it at the top level")
        names = ", ".join(shown(u) for u in unknown)
        raise ConfigError(f"config file {path}: {where}unknown setting(s) {names}")
    for name, value in table.items():
        if not isinstance(value, FILE_TYPES[name]) or isinstance(value, bool):
            wanted = " or ".join(_TYPE_NAMES[t] for t in FILE_TYPES[name])
            raise ConfigError(f"config file {path}: {where}{name} must be {wanted}, got {shown(value)}")


_TYPE_NAMES = {str: "a string", int: "a whole number", float: "a number", dict: "a table", list: "a list"}


def env_layer(env: Mapping[str, str]) -> dict[str, Any]:
    layer: dict[str, Any] = {}
    for name in FILE_KEYS:
        env_name = ENV_PREFIX + ("CHECK" if name == "checks" else name.upper())
        if env.get(env_name, "").strip():
            layer[name] = env[env_name]
    return layer


def ambient_layer(env: Mapping[str, str]) -> dict[str, Any]:
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
