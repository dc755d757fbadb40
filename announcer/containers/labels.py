"""What a container asks to have announced: read from its description, decided without I/O.

A container's description comes from the engine (``GET /containers/{id}/json``) and
is untrusted: any field may be missing, of another type, or huge. `describe` turns
it into a `Container` of plain values and never raises for a bad shape; `instances`
turns a container into the instances to announce, one per published TCP port, and
one warning per port it skips (a bad label skips that port, never the others).

The labels, highest first (registrator's own names are read too, from labels and
from the environment, so a host moving off registrator changes nothing):

- ``announcer.<port>.service`` / ``SERVICE_<port>_NAME``; ``announcer.service`` /
  ``SERVICE_NAME``; else the image's name without registry and tag (with ``-<port>``
  when the container has several ports, as registrator does).
- ``announcer.<port>.ignore`` / ``SERVICE_<port>_IGNORE``; ``announcer.ignore`` /
  ``SERVICE_IGNORE``: skip the port, or the container.
- ``announcer.<port>.check`` / ``announcer.check``: a check spec with ``{ip}`` and ``{port}``.
- ``announcer.meta.<name>`` (and ``announcer.<port>.meta.<name>``): record fields.
- ``SERVICE_TAGS``: a ``tags`` list in the record.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from announcer.convert import SERVICE_NAME

LABEL = "announcer."
FALSE = frozenset({"false", "0", "no", "off"})
_NOT_IN_NAME = re.compile(r"[^A-Za-z0-9._-]+")
_NAMING = re.compile(r"^(announcer\.(\d+\.)?service|SERVICE_(\d+_)?NAME)$")  # a label naming the service
LABELS_LIMIT = 1000  # labels (and environment entries) read from one container
TEXT_LIMIT = 4096


@dataclass(frozen=True)
class Port:
    """One TCP port of a container: where it listens inside, and where it is published."""

    container_port: int
    host_ip: str = ""  # "" or 0.0.0.0 or ::: every address of the host
    host_port: int | None = None  # None: exposed, not published


@dataclass(frozen=True)
class Container:
    """The plain values announcer reads from a container's description."""

    id: str
    name: str
    image: str
    labels: Mapping[str, str] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    running: bool = True
    paused: bool = False
    health: str | None = None  # the HEALTHCHECK's state; None: the container has none
    ports: tuple[Port, ...] = ()
    ip: str | None = None  # its address on its first network

    @property
    def short(self) -> str:
        return self.id[:12]


@dataclass(frozen=True)
class Wanted:
    """One instance a container asks for: everything the loader needs to build its service."""

    container: str  # the container's short ID (the record's mark)
    name: str  # the container's name
    container_port: int
    service: str
    ip: str
    port: int
    ip_source: str
    check: str | None  # a check spec from a label; None: the HEALTHCHECK or a TCP check
    healthcheck: bool  # the container's own HEALTHCHECK decides
    meta: Mapping[str, str] = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    container_id: str = ""  # the whole ID: two short ones may collide, two whole ones never

    @classmethod
    def bare(cls, container: str, service: str, ip: str, port: int) -> Wanted:
        """An instance with nothing from labels: to check the settings every instance takes, or to
        render the keys of a record a container left."""
        return cls(
            container=container, name=container, container_port=port, service=service, ip=ip, port=port,
            ip_source="", check="tcp", healthcheck=False,
        )  # fmt: skip

    @property
    def origin(self) -> str:
        """What the instance is, stable while the container lives: the agent matches by it."""
        return f"container {self.container_id or self.container} port {self.container_port}/tcp"


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _text(value: Any, limit: int = TEXT_LIMIT) -> str:
    return value[:limit] if isinstance(value, str) else ""


def _strings(value: Any) -> dict[str, str]:
    """A mapping of text to text, at most LABELS_LIMIT entries; anything else dropped."""
    out: dict[str, str] = {}
    for name, text in list(_dict(value).items())[:LABELS_LIMIT]:
        if isinstance(name, str) and isinstance(text, str) and len(name) <= TEXT_LIMIT:
            out[name] = text[:TEXT_LIMIT]
    return out


def _env(value: Any) -> dict[str, str]:
    """registrator's SERVICE_* variables from the environment (only those: the rest may be secrets)."""
    out: dict[str, str] = {}
    for item in value[:LABELS_LIMIT] if isinstance(value, list) else []:
        if isinstance(item, str) and item.startswith("SERVICE_"):
            name, _, text = item.partition("=")
            out[name] = text[:TEXT_LIMIT]
    return out


def _port_number(text: str) -> int | None:
    return int(text) if text.isdigit() and 0 < int(text) < 65536 else None


def describe(doc: Mapping[str, Any]) -> Container | None:
    """The container a description tells of; None when it names no container at all."""
    cid = _text(doc.get("Id"), 128)
    if not re.fullmatch(r"[0-9a-f]{12,128}", cid):
        return None
    config, state, network = (
        _dict(doc.get("Config")),
        _dict(doc.get("State")),
        _dict(doc.get("NetworkSettings")),
    )
    health = _dict(state.get("Health")).get("Status") if state.get("Health") is not None else None
    if health is None and config.get("Healthcheck") and _healthcheck_runs(config["Healthcheck"]):
        health = "starting"
    return Container(
        id=cid,
        name=_text(doc.get("Name"), 256).lstrip("/") or cid[:12],
        image=_text(config.get("Image"), 1024) or _text(doc.get("Image"), 1024),
        labels=_strings(config.get("Labels")),
        env=_env(config.get("Env")),
        running=state.get("Running") is True,
        paused=state.get("Paused") is True,
        health=health if isinstance(health, str) and health else None,
        ports=_ports(network, config),
        ip=_address(network),
    )


def _healthcheck_runs(check: Any) -> bool:
    test = _dict(check).get("Test")
    return isinstance(test, list) and bool(test) and test[0] != "NONE"


def _ports(network: Mapping[str, Any], config: Mapping[str, Any]) -> tuple[Port, ...]:
    found: list[Port] = []
    exposed = set(_dict(config.get("ExposedPorts"))) | set(_dict(network.get("Ports")))
    for spec in sorted(exposed, key=lambda spec: (len(str(spec)), str(spec)))[:LABELS_LIMIT]:
        number, _, proto = str(spec).partition("/")
        port = _port_number(number)
        if port is None or (proto or "tcp") != "tcp":
            continue
        bindings = _dict(network.get("Ports")).get(spec)
        published = [b for b in bindings if isinstance(b, dict)] if isinstance(bindings, list) else []
        if not published:
            found.append(Port(port))
        for binding in published[:16]:
            host_port = _port_number(_text(binding.get("HostPort"), 8))
            if host_port is not None:
                found.append(Port(port, _text(binding.get("HostIp"), 64), host_port))
    return tuple(found)


def _address(network: Mapping[str, Any]) -> str | None:
    candidates = [network.get("IPAddress")]
    candidates += [_dict(n).get("IPAddress") for n in list(_dict(network.get("Networks")).values())[:64]]
    for candidate in candidates:
        if isinstance(candidate, str) and candidate:
            try:
                return str(ipaddress.IPv4Address(candidate))
            except ValueError:
                continue
    return None


def _truthy(value: str | None) -> bool:
    return value is not None and value.strip().lower() not in FALSE


def _label(c: Container, port: int, name: str, registrator: str | None = None) -> str | None:
    """A setting for one port: announcer's label for the port, then for the container, then
    registrator's (``SERVICE_<port>_<NAME>``, then ``SERVICE_<NAME>``; a label over the environment)."""
    for key in (f"{LABEL}{port}.{name}", f"{LABEL}{name}"):
        if key in c.labels:
            return c.labels[key]
    if registrator is not None:
        for key in (f"SERVICE_{port}_{registrator}", f"SERVICE_{registrator}"):
            for source in (c.labels, c.env):
                if key in source:
                    return source[key]
    return None


def image_name(image: str) -> str:
    """``registry:5000/team/nginx:1.25@sha256:...`` -> ``nginx``, as a valid service name."""
    base = image.split("@", 1)[0].rsplit("/", 1)[-1].split(":", 1)[0]
    return _NOT_IN_NAME.sub("-", base).strip("-._")[:128]


def labelled(c: Container) -> bool:
    """The container names its service itself (the opt-in mode registers only these)."""
    return any(_NAMING.match(key) for key in [*c.labels, *c.env])


def instances(
    c: Container, *, host_ip: str, host_ip_source: str, internal: bool, labelled_only: bool, allow_exec: bool
) -> tuple[list[Wanted], list[str]]:
    """The instances a running container asks for, and a warning for each port skipped."""
    if not c.running or c.paused:
        return [], []
    if (
        _truthy(c.labels.get(f"{LABEL}ignore"))
        or c.env.get("SERVICE_IGNORE")
        or c.labels.get("SERVICE_IGNORE")
    ):
        return [], []
    if labelled_only and not labelled(c):
        return [], []
    ports = _chosen_ports(c, internal)
    several = len({p.container_port for p in ports}) > 1
    wanted: list[Wanted] = []
    warnings: list[str] = []
    for port in ports:
        where = f"container {c.name} ({c.short}) port {port.container_port}"
        if _truthy(_label(c, port.container_port, "ignore", "IGNORE")):
            continue
        try:
            wanted.append(
                _wanted(
                    c,
                    port,
                    several=several,
                    host_ip=host_ip,
                    host_ip_source=host_ip_source,
                    internal=internal,
                    allow_exec=allow_exec,
                )
            )
        except LabelError as exc:
            warnings.append(f"{where}: {exc}; the port is skipped")
    return wanted, warnings


class LabelError(Exception):
    """A label that cannot be used, said in one line."""


def _chosen_ports(c: Container, internal: bool) -> list[Port]:
    """One port per container port (internal) or per published host address and port."""
    if internal:
        return list({p.container_port: Port(p.container_port) for p in c.ports}.values())
    chosen: dict[tuple[str, int], Port] = {}
    for port in c.ports:
        if port.host_port is None:
            continue
        # Docker lists a port once per address family (0.0.0.0 and ::): one record.
        address = "" if port.host_ip in ("", "0.0.0.0", "::") else port.host_ip  # noqa: S104 - read, not bound
        chosen.setdefault((address, port.host_port), Port(port.container_port, address, port.host_port))
    return list(chosen.values())


def _wanted(
    c: Container,
    port: Port,
    *,
    several: bool,
    host_ip: str,
    host_ip_source: str,
    internal: bool,
    allow_exec: bool,
) -> Wanted:
    service = _label(c, port.container_port, "service", "NAME")
    if service is None:
        service = image_name(c.image)
        if several and service:
            service = f"{service}-{port.container_port}"
        if not service:
            raise LabelError(f"no service name (the image {c.image!r} gives none): set announcer.service")
    elif not SERVICE_NAME.match(service):
        raise LabelError(f"the service name {service[:80]!r} may hold only letters, digits, '.', '_' and '-'")
    if internal:
        if c.ip is None:
            raise LabelError("internal mode, but the container has no IPv4 address on any network")
        ip, number, why = c.ip, port.container_port, "the container's own address (internal mode)"
    elif port.host_ip:
        try:
            ip = str(ipaddress.IPv4Address(port.host_ip))
        except ValueError:
            raise LabelError(f"published on {port.host_ip}, not an IPv4 address of this host") from None
        assert port.host_port is not None
        number, why = port.host_port, f"published on {ip} only"
    else:
        assert port.host_port is not None
        ip, number, why = (
            host_ip,
            port.host_port,
            f"published on every address: the host's ({host_ip_source})",
        )
    check = _label(c, port.container_port, "check")
    if check is not None and check.strip().lower().startswith("exec:") and not allow_exec:
        raise LabelError(
            "an exec: check from a label would run a command on the host; "
            "announcer runs them only with --container-exec-checks on"
        )
    meta = {
        key.removeprefix(prefix): value
        for prefix in (f"{LABEL}meta.", f"{LABEL}{port.container_port}.meta.")
        for key, value in c.labels.items()
        if key.startswith(prefix)
    }
    tags_text = _label(c, port.container_port, "tags", "TAGS")
    tags = tuple(t.strip() for t in (tags_text or "").split(",") if t.strip())[:64]
    return Wanted(
        container=c.short, name=c.name, container_port=port.container_port, service=service, ip=ip,
        port=number, ip_source=why, check=check.strip() if check is not None else None,
        healthcheck=check is None and c.health is not None, meta=meta, tags=tags, container_id=c.id,
    )  # fmt: skip
