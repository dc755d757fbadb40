"""Converting one setting: text from a flag or the environment, or a TOML value, to a typed value.

Every converter takes the setting's name (for the one-line error) and any value,
and returns a value of its type or raises ConfigError. The same converters serve
the flags, the environment and the file, so the same rules hold everywhere.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from announcer.errors import ConfigError, safe_text, shown
from announcer.health import FlapLimit
from announcer.record import META_NAME_LIMIT, META_VALUE_LIMIT, RESERVED_FIELDS
from announcer.redact import redact_url

TEXT_LIMIT = 4096  # characters in any one setting
SECONDS_LIMIT = 86400.0  # a day: longer intervals, timeouts or drains are typing errors
SHORTHANDS = {
    "http": "http://{ip}:{port}/",
    "https": "https://{ip}:{port}/",
    "tcp": "tcp://{ip}:{port}",
    "grpc": "grpc://{ip}:{port}",
    "grpcs": "grpcs://{ip}:{port}",
}


# A service name: what consumers read as one path segment or DNS label (config and labels alike).
SERVICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def text(name: str, value: Any, limit: int = TEXT_LIMIT) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{flag(name)} must be a non-empty string, got {shown(value)}")
    text = value.strip()
    problem = safe_text(text, limit)
    if problem:
        raise ConfigError(f"{flag(name)} {problem}")
    return text


def integer(name: str, value: Any, low: int, high: int | None = None) -> int:
    try:
        number = value if isinstance(value, int) and not isinstance(value, bool) else int(str(value), 10)
    except ValueError:
        number = None
    if number is None or number < low or (high is not None and number > high):
        bound = f"from {low} to {high}" if high is not None else f"of at least {low}"
        raise ConfigError(f"{flag(name)} must be a whole number {bound}, got {shown(value)}")
    return number


def seconds(name: str, value: Any, *, zero: bool = False) -> float:
    try:
        number = (
            float(value) if isinstance(value, int | float | str) and not isinstance(value, bool) else math.nan
        )
    except (TypeError, ValueError, OverflowError):
        number = math.nan
    if not math.isfinite(number) or number < 0 or (number == 0 and not zero) or number > SECONDS_LIMIT:
        least = "zero or more" if zero else "a positive number of"
        raise ConfigError(
            f"{flag(name)} must be {least} seconds, at most {SECONDS_LIMIT:g}, got {shown(value)}"
        )
    return number


def choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    text = value.lower() if isinstance(value, str) else None
    if text not in choices:
        raise ConfigError(f"{flag(name)} must be one of {', '.join(choices)}, got {shown(value)}")
    return text


def switch(name: str, value: Any) -> bool:
    """A switch: true or false in the file, the flag given, or on/off, true/false, 1/0 as text."""
    if isinstance(value, bool):
        return value
    word = text(name, value).lower()
    if word in ("on", "true", "1", "yes"):
        return True
    if word in ("off", "false", "0", "no"):
        return False
    raise ConfigError(f"{flag(name)} must be on or off, got {shown(value)}")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def ipv4(name: str, value: Any) -> str:
    try:
        return str(ipaddress.IPv4Address(value.strip() if isinstance(value, str) else None))
    except ValueError:
        raise ConfigError(f"{flag(name)} must be an IPv4 address, got {shown(value)}") from None


def string_list(name: str, value: Any, separators: str) -> list[str]:
    if isinstance(value, str):
        items = [part.strip() for part in re.split(separators, value) if part.strip()]
    elif isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        items = [v.strip() for v in value if v.strip()]
    else:
        raise ConfigError(f"{flag(name)} must be a string or a list of strings, got {shown(value)}")
    return [text(name, item) for item in items]


def endpoints(value: Any) -> tuple[str, ...]:
    endpoints = string_list("etcd_endpoints", value, r"[,\s]+")
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


def meta(value: Any) -> dict[str, str]:
    """``{"k": "v"}`` from the file, or ``["k=v", ...]`` / ``"k=v,k2=v2"`` from flags and env."""
    if isinstance(value, Mapping):
        pairs = list(value.items())
    else:
        pairs = []
        for item in string_list("meta", value, r"[,\n]"):
            name, sep, text = item.partition("=")
            if not sep:
                raise ConfigError(f"--meta {shown(item)} must look like KEY=VALUE")
            pairs.append((name.strip(), text.strip()))
    meta: dict[str, str] = {}
    for name, text in pairs:
        if not isinstance(name, str) or not name or safe_text(name, META_NAME_LIMIT):
            raise ConfigError(
                f"--meta key {shown(name)} must be printable text of 1 to {META_NAME_LIMIT} characters"
            )
        if name in RESERVED_FIELDS:
            raise ConfigError(f"--meta may not replace the record field {name!r}")
        if not isinstance(text, str):
            raise ConfigError(f"--meta {name} must be a string, got {shown(text)}")
        problem = safe_text(text, META_VALUE_LIMIT)
        if problem:
            raise ConfigError(f"--meta {name} {problem}")
        meta[name] = text
    return meta


def check_entries(value: Any) -> list[tuple[str, dict[str, Any]]]:
    """Check specs: strings (flags, env: separated by newlines or ';') or file tables."""
    if isinstance(value, str):
        value = string_list("check", value, r"[;\n]")
    if not isinstance(value, list | tuple):
        raise ConfigError(f"checks must be a list, got {shown(value)}")
    entries: list[tuple[str, dict[str, Any]]] = []
    for item in value:
        if isinstance(item, str):
            entries.append((text("check", item), {}))
        elif isinstance(item, Mapping) and isinstance(item.get("spec"), str):
            entries.append((text("check", item["spec"]), dict(item)))
        else:
            raise ConfigError(f"a [[checks]] entry needs a spec string, got {shown(item)}")
    return entries


def expand_spec(spec: str, ip: str, port: int) -> str:
    spec = SHORTHANDS.get(spec.lower(), spec)
    return spec.replace("{ip}", ip).replace("{port}", str(port))


def flap_limit(value: Any) -> FlapLimit | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "off", "none")):
        return None
    count, sep, window = text("flap_limit", value).partition("/")
    if not sep:
        raise ConfigError(f"--flap-limit {shown(value)} must look like N/SECONDS, e.g. 3/60, or off")
    number = integer("flap_limit", count.strip(), 1, 1000)
    return FlapLimit(number, seconds("flap_limit", window.strip()))


def address(value: Any) -> tuple[str, int] | None:
    if value is None or value == "":
        return None
    host, sep, port = text("metrics_address", value).rpartition(":")
    if not sep:
        raise ConfigError(f"--metrics-address {shown(value)} must look like HOST:PORT")
    return host.strip("[]") or "127.0.0.1", integer("metrics_address", port, 0, 65535)
