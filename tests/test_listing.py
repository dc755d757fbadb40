"""`announcer ls` against a real etcd: every format decoded, another writer's bytes shown safely, --watch."""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

from announcer.listing import safe
from tests.agent_helpers import agent_config, eventually, running
from tests.servers import EtcdServer, HttpService, wait_until

FORMATS = ["json", "plain", "traefik", "traefik-tcp", "skydns"]


def ls(etcd: EtcdServer, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "announcer", "ls", "--etcd-endpoints", etcd.url, *args],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_safe_shows_any_bytes_on_one_line() -> None:
    assert safe(b"10.0.0.5:80") == "10.0.0.5:80"
    assert safe(b"\xff\xfe\x1b[31mred\n") == "\\xff\\xfe\\x1b[31mred\\n"
    assert len(safe(b"x" * 10_000)) == 200


async def test_ls_lists_every_format_and_foreign_bytes(etcd: EtcdServer, http_service: HttpService) -> None:
    port = http_service.port
    config = agent_config(etcd.url, port, publish=FORMATS, hostname="node-1", ttl="30")
    etcd.call("/v3/kv/put", {"key": base64.b64encode(b"/services/other/\xff").decode(),
                             "value": base64.b64encode(b"\xff\x00\x1b[2J").decode()})  # fmt: skip
    etcd.put("/services/static/10.0.0.9:80", '{"host":"by-hand","ipv4_addr":"10.0.0.9","port":80}')
    async with running(config):
        await eventually(lambda: len(etcd.range_prefix("/skydns/")) == 1, what="announced in every format")
        flags = [f"--publish={f}" for f in FORMATS]
        listed = ls(etcd, *flags, "--json")
        assert listed.returncode == 0, listed.stderr
        rows = {row["key"]: row for row in json.loads(listed.stdout)}
        instance = f"node-1-{port}"
        expected_keys = {
            f"/services/web/127.0.0.1:{port}",
            f"/plain/web/{instance}",
            f"traefik/http/services/web/loadBalancer/servers/{instance}/url",
            f"traefik/tcp/services/web/loadBalancer/servers/{instance}/address",
            f"/skydns/local/skydns/web/{instance}",
        }
        assert expected_keys <= set(rows)
        for key in expected_keys:  # every format decoded to the same service, address, host and lease
            row = rows[key]
            assert (row["service"], row["address"], row["host"]) == ("web", f"127.0.0.1:{port}", "node-1"), (
                row
            )
            assert 0 < row["ttl_left"] <= 30
        leases = {rows[key]["lease"] for key in expected_keys}
        assert len(leases) == 1  # one lease for every key of the instance
        foreign = rows["/services/other/\\xff"]
        assert foreign["value"] == "\\xff\\x00\\x1b[2J"  # escaped, never raw
        assert (foreign["address"], foreign["ttl_left"]) == (None, None)
        static = rows["/services/static/10.0.0.9:80"]
        assert (static["ttl_left"], static["host"]) == (None, "by-hand")  # a key without a lease

        text = ls(etcd, *flags)
        assert text.returncode == 0
        head, *lines = text.stdout.splitlines()
        assert head.split() == ["KEY", "SERVICE", "ADDRESS", "TTL", "HOST"]
        assert any(
            line.startswith(f"/skydns/local/skydns/web/{instance}") and "node-1" in line for line in lines
        )
        assert any(line.startswith("/services/static/") and "no lease" in line for line in lines)
        assert "\x1b" not in text.stdout
        assert "\xff" not in text.stdout

        only = ls(etcd, "/plain/", "--json")
        assert [row["key"] for row in json.loads(only.stdout)] == [f"/plain/web/{instance}"]


def test_ls_without_etcd_is_one_line_exit_1(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "announcer", "ls", "--etcd-endpoints", "http://127.0.0.1:9", "--etcd-timeout", "0.5"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.startswith("error: cannot list /services/: ")
    assert len(done.stderr.strip().splitlines()) == 1


async def test_ls_watch_sees_an_announce_and_a_withdraw(etcd: EtcdServer, http_service: HttpService) -> None:
    watcher = subprocess.Popen(
        [sys.executable, "-m", "announcer", "ls", "--etcd-endpoints", etcd.url, "--watch", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(watcher.stdout.readline, "")), daemon=True)  # type: ignore[union-attr]
    reader.start()
    key = f"/services/web/127.0.0.1:{http_service.port}"
    try:
        wait_until(lambda: bool(lines), 30, "the initial (empty) list")
        assert json.loads(lines[0]) == []
        async with running(agent_config(etcd.url, http_service.port)):
            await eventually(lambda: any('"PUT"' in line for line in lines), timeout=20, what="the announce")
        await eventually(lambda: any('"DELETE"' in line for line in lines), timeout=20, what="the withdraw")
        events = [json.loads(line) for line in lines[1:]]
        put = next(e for e in events if e["event"] == "PUT")
        assert (put["key"], put["service"], put["address"]) == (key, "web", f"127.0.0.1:{http_service.port}")
        assert {"event": "DELETE", "key": key} in events
        watcher.send_signal(signal.SIGINT)
        assert watcher.wait(15) == 0
    finally:
        if watcher.poll() is None:
            watcher.kill()
        watcher.wait(10)
        reader.join(5)
        watcher.stdout.close()  # type: ignore[union-attr]
        watcher.stderr.close()  # type: ignore[union-attr]


async def test_each_prefix_is_watched_from_just_after_its_own_read(etcd: EtcdServer) -> None:
    # ls reads its prefixes one after another. A write under the first, landing between the
    # two reads, is in neither list; it must come through the first prefix's watch. Watching
    # every prefix from the last read's revision (as ls once did) lost it.
    from announcer.listing import _read
    from announcer.registrar.etcd_client import EtcdClient
    from announcer.settings import EtcdSettings

    client = EtcdClient(EtcdSettings(endpoints=(etcd.url,), timeout=2, discovery=False))
    read = client.list_prefix

    async def read_then_someone_writes(prefix: str, *args: int):  # type: ignore[no-untyped-def]
        found = await read(prefix, *args)
        if prefix == "/a/":
            etcd.put("/a/between", "written between the two reads")
        return found

    client.list_prefix = read_then_someone_writes  # type: ignore[method-assign]
    try:
        revisions, rows, _ = await _read(client, ("/a/", "/b/"))
        assert rows == []
        async with asyncio.timeout(5):  # a watch that starts too late waits forever
            async for _, events in client.watch_prefix("/a/", revisions["/a/"] + 1):
                assert [e.kv.key for e in events] == [b"/a/between"]
                break
    finally:
        await client.aclose()
