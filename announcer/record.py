"""The registered record and the key it lives under."""

from __future__ import annotations

import json
import string
from collections.abc import Mapping
from dataclasses import dataclass, field

from announcer.errors import ConfigError

RESERVED_FIELDS = frozenset({"host", "ipv4_addr", "port"})
KEY_PLACEHOLDERS = frozenset({"service", "ip", "port", "hostname"})


@dataclass(frozen=True)
class Record:
    host: str
    ipv4_addr: str
    port: int
    meta: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        clash = RESERVED_FIELDS & set(self.meta)
        if clash:
            raise ConfigError(f"--meta may not replace the field(s) {', '.join(sorted(clash))}")

    def to_json(self) -> str:
        """Always valid JSON; a stable byte form, so equal records compare equal in etcd."""
        body: dict[str, str | int] = {"host": self.host, "ipv4_addr": self.ipv4_addr}
        body["port"] = self.port
        body.update(self.meta)
        return json.dumps(body, separators=(",", ":"), ensure_ascii=False)


def render_key(template: str, *, service: str, ip: str, port: int, hostname: str) -> str:
    """Fill ``{service} {ip} {port} {hostname}``; unknown placeholders are errors."""
    check_template(template, KEY_PLACEHOLDERS, "--key")
    key = template.format(service=service, ip=ip, port=port, hostname=hostname)
    if not key:
        raise ConfigError("--key renders to an empty key")
    return key


def check_template(template: str, allowed: frozenset[str], what: str) -> None:
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise ConfigError(f"{what} {template!r} is not a valid template: {exc}") from None
    unknown = sorted(set(fields) - allowed)
    if unknown:
        names = " ".join("{" + n + "}" for n in sorted(allowed))
        raise ConfigError(f"{what} {template!r} uses unknown placeholder(s) {unknown}; known: {names}")
