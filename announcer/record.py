"""The registered record and the key it lives under."""

from __future__ import annotations

import json
import string
from collections.abc import Mapping
from dataclasses import dataclass, field

from announcer.errors import ConfigError, shown

RESERVED_FIELDS = frozenset({"host", "ipv4_addr", "port"})
KEY_LIMIT = 1024  # bytes of a rendered key
RECORD_LIMIT = 8192  # bytes of a record's JSON: consumers template it, keep it small
META_NAME_LIMIT = 128
META_VALUE_LIMIT = 1024


@dataclass(frozen=True)
class Record:
    host: str
    ipv4_addr: str
    port: int
    meta: Mapping[str, str] = field(default_factory=dict)
    # Fields a source of services adds (a container's mark and tags), written after meta.
    extra: Mapping[str, str | list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        clash = (RESERVED_FIELDS | set(self.extra)) & set(self.meta)
        if clash:
            raise ConfigError(f"--meta may not replace the field(s) {', '.join(sorted(clash))}")

    def to_json(self) -> str:
        """Always valid JSON; a stable byte form, so equal records compare equal in etcd."""
        body: dict[str, str | int | list[str]] = {"host": self.host, "ipv4_addr": self.ipv4_addr}
        body["port"] = self.port
        body.update(self.meta)
        body.update(self.extra)
        return json.dumps(body, separators=(",", ":"), ensure_ascii=False)

    def check_size(self) -> None:
        size = len(self.to_json().encode())
        if size > RECORD_LIMIT:
            raise ConfigError(
                f"the record would be {size} bytes of JSON; keep --meta under {RECORD_LIMIT} in all"
            )


def render_key(
    template: str, values: Mapping[str, str | int], what: str = "--key", *, rooted: bool = True
) -> str:
    """Fill the template's placeholders; the result must be a usable etcd key.

    A key names something below the root, holds printable text only and fits in
    KEY_LIMIT bytes: consumers list keys under a prefix and split them on '/'. It starts
    with '/' unless ``rooted`` is False (Traefik reads ``traefik/...``, without one).
    """
    key = render(template, what, **values)
    if (rooted and not key.startswith("/")) or not key.strip("/"):
        raise ConfigError(f"{what} {shown(key)} must start with '/' and name something below it")
    if not key.isprintable() or any(c.isspace() for c in key):
        raise ConfigError(f"{what} {shown(key)} may hold no spaces or control characters")
    # Consumers that read keys as paths (confd's prefixes, CoreDNS's SkyDNS layout) would
    # read '/a/../b' or '/a//b' as another key than the one written.
    segments = key[1:] if key.startswith("/") else key
    if any(part in ("", ".", "..") for part in segments.split("/")):
        raise ConfigError(
            f"{what} {shown(key)} has an empty, '.' or '..' segment; consumers that read keys as "
            "paths would read it as another key"
        )
    if len(key.encode()) > KEY_LIMIT:
        raise ConfigError(f"{what} renders to {len(key.encode())} bytes; at most {KEY_LIMIT}")
    return key


def render_path(template: str, what: str, **values: str | int) -> str:
    """A file path template with the same placeholders as the key."""
    path = render(template, what, **values)
    if "\0" in path:
        raise ConfigError(f"{what} {shown(path)} is not a usable path")
    return path


def render(template: str, what: str, **values: str | int) -> str:
    """Fill plain ``{name}`` placeholders; format specs, conversions and others are errors."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ConfigError(f"{what} {shown(template)} is not a valid template: {exc}") from None
    out: list[str] = []
    for literal, name, spec, conversion in parts:
        out.append(literal)
        if name is None:
            continue
        names = " ".join("{" + n + "}" for n in sorted(values))
        if name not in values:
            raise ConfigError(
                f"{what} {shown(template)} uses unknown placeholder {shown(name)}; known: {names}"
            )
        if spec or conversion:
            raise ConfigError(f"{what} {shown(template)}: placeholders are plain {names}, without ! or :")
        out.append(str(values[name]))
    return "".join(out)
