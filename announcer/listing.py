"""`announcer ls`: what is registered, as an operator reads it, and `--watch` to follow it.

Every key under the prefixes, with its value decoded for a person: the service (from
the key's layout), the address (from the value, whatever the format), the lease's time
left, and the host that wrote it (a JSON record's ``host``, or that of the JSON record
on the same lease: one agent, one lease). Any client may have written any bytes at a
key, so every key and value is shown escaped and cut short, never printed raw.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlsplit

import structlog

from announcer.config import Listing
from announcer.errors import EtcdError
from announcer.registrar.etcd_client import EtcdClient, WatchCompacted, WatchEvent
from announcer.registrar.store import KeyValue

SHOWN_LIMIT = 200  # characters of a key or value shown
EXIT_OK, EXIT_UNREADABLE = 0, 1
log = structlog.get_logger("announcer")


@dataclass(frozen=True)
class Entry:
    key: str
    service: str | None
    address: str | None
    host: str | None
    lease: int
    ttl_left: int | None  # seconds; None without a lease, -1 when the lease is gone
    value: str


def safe(data: bytes) -> str:
    """Bytes as one line a terminal shows as they are: UTF-8 where it is, escapes elsewhere."""
    text = data.decode("utf-8", "backslashreplace")
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= SHOWN_LIMIT else text[: SHOWN_LIMIT - 3] + "..."


def _service_of(key: str) -> str | None:
    parts = key.strip("/").split("/")
    if (
        "loadBalancer" in parts
        and parts.index("loadBalancer") >= 2
        and parts[parts.index("loadBalancer") - 2] == "services"
    ):
        return parts[
            parts.index("loadBalancer") - 1
        ]  # Traefik's layout: .../services/<service>/loadBalancer/...
    return parts[-2] if len(parts) >= 2 else None  # the others: <prefix>/<service>/<instance>


def _address_of(value: bytes) -> tuple[str | None, str | None]:
    """(address, host) from a value of any format; (None, None) for one that is none of them."""
    text = value.decode("utf-8", "replace")
    try:
        document = json.loads(text)
    except (ValueError, RecursionError):
        document = None
    if isinstance(document, dict):
        return _address_in(document)
    if "://" in text:  # traefik: a server url
        try:
            parts = urlsplit(text)
            port = parts.port
        except ValueError:
            return None, None
        return (f"{parts.hostname}:{port}" if parts.hostname and port else None), None
    host, sep, port_text = text.rpartition(":")  # plain, traefik-tcp: ip:port
    return (text if sep and host and port_text.isdigit() else None), None


def _address_in(document: dict[str, Any]) -> tuple[str | None, str | None]:
    port = document.get("port")
    if isinstance(document.get("ipv4_addr"), str):  # json: the record
        host = document.get("host")
        return f"{document['ipv4_addr']}:{port}", host if isinstance(host, str) else None
    if isinstance(document.get("host"), str):  # skydns: host is the address
        return (f"{document['host']}:{port}" if port is not None else document["host"]), None
    return None, None


def entries(kvs: Iterable[KeyValue], time_left: dict[int, int]) -> list[Entry]:
    found = []
    for kv in kvs:
        address, host = _address_of(kv.value or b"")
        found.append((kv, address, host))
    hosts = {kv.lease: host for kv, _, host in found if host is not None and kv.lease}
    return [
        Entry(
            key=safe(kv.key), service=_service_of(safe(kv.key)), address=address,
            host=host if host is not None else hosts.get(kv.lease), lease=kv.lease,
            ttl_left=time_left.get(kv.lease) if kv.lease else None, value=safe(kv.value or b""),
        )
        for kv, address, host in found
    ]  # fmt: skip


def table(rows: list[Entry]) -> str:
    head = ("KEY", "SERVICE", "ADDRESS", "TTL", "HOST")
    cells = [(e.key, e.service or "-", e.address or "-", _ttl(e.ttl_left), e.host or "-") for e in rows]
    widths = [max(len(str(row[i])) for row in [head, *cells]) for i in range(len(head))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in [head, *cells]) + "\n"  # fmt: skip


def _ttl(left: int | None) -> str:
    if left is None:
        return "no lease"
    return "expired" if left < 0 else f"{left}s"


def run_ls(listing: Listing, *, as_json: bool, watch: bool) -> int:
    try:
        return asyncio.run(_ls(listing, as_json=as_json, watch=watch))
    except KeyboardInterrupt:
        return EXIT_OK


async def _ls(listing: Listing, *, as_json: bool, watch: bool) -> int:
    client = EtcdClient(listing.etcd)
    try:
        try:
            revisions, rows, more = await _read(client, listing.prefixes)
        except EtcdError as exc:
            sys.stderr.write(f"error: cannot list {', '.join(listing.prefixes)}: {exc}\n")
            return EXIT_UNREADABLE
        if as_json:
            sys.stdout.write(json.dumps([asdict(e) for e in rows], indent=None if watch else 2) + "\n")
        else:
            sys.stdout.write(table(rows) if rows else f"nothing under {', '.join(listing.prefixes)}\n")
        if more:
            sys.stderr.write("(more keys than shown: give a narrower PREFIX)\n")
        sys.stdout.flush()
        if watch:
            await _follow(client, revisions, as_json=as_json)
        return EXIT_OK
    finally:
        await client.aclose()


async def _read(client: EtcdClient, prefixes: tuple[str, ...]) -> tuple[dict[str, int], list[Entry], bool]:
    """Every prefix read (each at its own revision, which its watch starts after), as entries."""
    kvs: list[KeyValue] = []
    revisions: dict[str, int] = {}
    more = False
    for prefix in prefixes:
        revisions[prefix], found, cut = await client.list_prefix(prefix)
        more = more or cut
        kvs += found
    kvs = sorted({kv.key: kv for kv in kvs}.values(), key=lambda kv: kv.key)
    leases = {kv.lease for kv in kvs if kv.lease}
    time_left = {lease: await client.time_left(lease) for lease in sorted(leases)}
    return revisions, entries(kvs, time_left), more


async def _follow(client: EtcdClient, revisions: dict[str, int], *, as_json: bool) -> None:
    """Print every change until SIGINT or SIGTERM; each prefix watched from just after its
    own read, so nothing written between two reads is missed; a broken watch is reopened."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with asyncio.TaskGroup() as group:
        watchers = [
            group.create_task(_watch(client, p, r + 1, as_json=as_json)) for p, r in revisions.items()
        ]
        await stop.wait()
        for task in watchers:
            task.cancel()


async def _watch(client: EtcdClient, prefix: str, start: int, *, as_json: bool) -> None:
    said_broken = False
    while True:
        try:
            async for revision, events in client.watch_prefix(prefix, start):
                _print_events(events, as_json=as_json)
                start = revision + 1
                said_broken = False
        except WatchCompacted as exc:  # read again, then watch from that read's revision
            log.warning("watch compacted; reading again", prefix=prefix, error=str(exc))
            revisions, _, _ = await _read(client, (prefix,))
            start = revisions[prefix] + 1
        except EtcdError as exc:
            if not said_broken:
                log.warning("watch broken; opening it again", prefix=prefix, error=str(exc))
                said_broken = True
            await asyncio.sleep(1.0)  # etcd away: try again each second, from the same revision


def _print_events(events: list[WatchEvent], *, as_json: bool) -> None:
    for event in events:
        key = safe(event.kv.key)
        if event.kind == "PUT":
            address, host = _address_of(event.kv.value or b"")
            line: dict[str, Any] = {
                "event": "PUT", "key": key, "service": _service_of(key), "address": address, "host": host,
                "lease": event.kv.lease, "value": safe(event.kv.value or b""),
            }  # fmt: skip
        else:
            line = {"event": "DELETE", "key": key}
        if as_json:
            sys.stdout.write(json.dumps(line) + "\n")
        else:
            rest = f"  {line['service'] or '-'}  {line['address'] or '-'}" if event.kind == "PUT" else ""
            sys.stdout.write(f"{event.kind:<6}  {key}{rest}\n")
    sys.stdout.flush()
