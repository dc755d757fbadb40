"""Publish formats: the (key, value) pairs one instance writes, each in a consumer's own layout.

One `Record` (host, address, port, meta) is rendered into the keys its consumers read
themselves, so no translator sits between announcer and them. Every pair sits on the
process's one lease and is written and withdrawn with its instance's other pairs in one
transaction; the registrar knows pairs, not formats.

- ``json``: today's record, ``{"host", "ipv4_addr", "port", meta...}`` at ``--key``.
- ``plain``: the value ``ip:port`` at ``--plain-key``, registrator's etcd layout
  (``<prefix>/<service>/<id>``) that confd's ``getvs`` reads.
- ``traefik``: Traefik's KV layout for an HTTP service,
  ``<root>/http/services/<service>/loadBalancer/servers/<instance>/url`` = ``http://ip:port``.
- ``traefik-tcp``: the same for a TCP service,
  ``<root>/tcp/services/<service>/loadBalancer/servers/<instance>/address`` = ``ip:port``.
- ``skydns``: CoreDNS's etcd plugin (the SkyDNS layout),
  ``<prefix>/<zone labels reversed>/<service>/<instance>`` =
  ``{"host": ip, "port": port, "ttl": N}`` with priority and weight where set. The ``ttl``
  is always written: without one, CoreDNS once took a lease ID for a DNS TTL
  (GHSA-93mf-426m-g6x9).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass

from announcer.errors import ConfigError, shown
from announcer.record import Record, render, render_key

FORMATS = ("json", "plain", "traefik", "traefik-tcp", "skydns")
DEFAULT_FORMATS = ("json",)
DEFAULT_PLAIN_KEY = "/plain/{service}/{instance}"
DEFAULT_INSTANCE = "{hostname}-{port}"
DEFAULT_TRAEFIK_ROOT = "traefik"
DEFAULT_SKYDNS_PREFIX = "/skydns"
DEFAULT_SKYDNS_ZONE = "skydns.local"
TRAEFIK_SCHEMES = ("http", "https")
DNS_LABEL_LIMIT = 63
_NOT_IN_LABEL = re.compile(r"[^a-z0-9-]+")
_DNS_NAME = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)(\.(?!-)[a-z0-9-]{1,63}(?<!-))*$")


@dataclass(frozen=True)
class Publishing:
    """How one service publishes: its formats and each format's settings."""

    formats: tuple[str, ...] = DEFAULT_FORMATS
    instance: str = DEFAULT_INSTANCE
    plain_key: str = DEFAULT_PLAIN_KEY
    traefik_root: str = DEFAULT_TRAEFIK_ROOT
    traefik_scheme: str = "http"
    skydns_prefix: str = DEFAULT_SKYDNS_PREFIX
    skydns_zone: str = DEFAULT_SKYDNS_ZONE
    skydns_ttl: int | None = None  # None: the lease's TTL
    skydns_priority: int | None = None
    skydns_weight: int | None = None


@dataclass(frozen=True)
class Pair:
    """One key an instance writes: in which format, where, and what."""

    format: str
    key: str
    value: bytes


def dns_label(text: str) -> str:
    """``text`` as a DNS label: lowercase letters, digits and '-', at most 63, no '-' at the ends."""
    label = _NOT_IN_LABEL.sub("-", text.lower()).strip("-")[:DNS_LABEL_LIMIT].strip("-")
    if not label:
        raise ConfigError(f"the instance name {shown(text)} has nothing that can make a DNS label")
    return label


def zone_path(zone: str) -> str:
    """``example.com`` as the SkyDNS layout stores it: ``com/example``."""
    name = zone.strip().rstrip(".").lower()
    if not _DNS_NAME.match(name):
        raise ConfigError(f"--skydns-zone {shown(zone)} must be a DNS name like skydns.local")
    return "/".join(reversed(name.split(".")))


def render_pairs(
    record: Record, *, service: str, json_key: str, publishing: Publishing, lease_ttl: int
) -> tuple[Pair, ...]:
    """Every pair of one instance, in the order of its formats; bad settings raise ConfigError."""
    return tuple(_pairs(record, service, json_key, publishing, lease_ttl))


def _pairs(record: Record, service: str, json_key: str, p: Publishing, lease_ttl: int) -> Iterator[Pair]:
    values: dict[str, str | int] = {
        "service": service, "ip": record.ipv4_addr, "port": record.port, "hostname": record.host,
    }  # fmt: skip
    instance = render(p.instance, "--instance", **values)
    address = f"{record.ipv4_addr}:{record.port}"
    for fmt in p.formats:
        if fmt == "json":
            yield Pair(fmt, json_key, record.to_json().encode())
        elif fmt == "plain":
            key = render_key(p.plain_key, {**values, "instance": instance}, "--plain-key")
            yield Pair(fmt, key, address.encode())
        elif fmt in ("traefik", "traefik-tcp"):
            layout = "http" if fmt == "traefik" else "tcp"
            template = f"{p.traefik_root}/{layout}/services/{{service}}/loadBalancer/servers/{{instance}}"
            key = render_key(template, {**values, "instance": instance}, "--traefik-root", rooted=False)
            if layout == "http":
                yield Pair(fmt, f"{key}/url", f"{p.traefik_scheme}://{address}".encode())
            else:
                yield Pair(fmt, f"{key}/address", address.encode())
        elif fmt == "skydns":
            template = f"{p.skydns_prefix}/{zone_path(p.skydns_zone)}/{{service}}/{{instance}}"
            key = render_key(template, {**values, "instance": dns_label(instance)}, "--skydns-prefix")
            yield Pair(fmt, key, skydns_value(record, p, lease_ttl))
        else:  # the loader checks the names; a new format must be rendered here
            raise ConfigError(f"--publish {shown(fmt)} must be one of {', '.join(FORMATS)}")


def roots(p: Publishing, json_key: str) -> list[str]:
    """The fixed part of every key the formats write, up to the first placeholder: what
    `announcer ls` lists by default (``/services/{service}/...`` -> ``/services/``)."""
    templates = {
        "json": json_key,
        "plain": p.plain_key,
        "traefik": f"{p.traefik_root}/http/",
        "traefik-tcp": f"{p.traefik_root}/tcp/",
        "skydns": f"{p.skydns_prefix}/{zone_path(p.skydns_zone)}/",
    }
    fixed = [templates[fmt].split("{", 1)[0] for fmt in p.formats]
    return [part[: part.rfind("/") + 1] or part for part in fixed]


def skydns_value(record: Record, p: Publishing, lease_ttl: int) -> bytes:
    body: dict[str, str | int] = {
        "host": record.ipv4_addr,
        "port": record.port,
        "ttl": p.skydns_ttl if p.skydns_ttl is not None else lease_ttl,
    }
    if p.skydns_priority is not None:
        body["priority"] = p.skydns_priority
    if p.skydns_weight is not None:
        body["weight"] = p.skydns_weight
    return json.dumps(body, separators=(",", ":")).encode()
