"""Every format's keys on a real etcd: one transaction, one lease, all gone at SIGTERM, stale ones removed.

The exact keys and values are pinned in tests/test_publish.py; here is what etcd sees.
"""

from __future__ import annotations

import signal
import subprocess
import sys

from announcer.health import Health
from tests.agent_helpers import agent_config, eventually, running
from tests.servers import EtcdServer, HttpService, announcer_process, wait_until

FORMATS = ["json", "plain", "traefik", "traefik-tcp", "skydns"]


def keys_of(port: int) -> list[str]:
    instance = f"node-1-{port}"
    return [
        f"/services/web/127.0.0.1:{port}",
        f"/plain/web/{instance}",
        f"traefik/http/services/web/loadBalancer/servers/{instance}/url",
        f"traefik/tcp/services/web/loadBalancer/servers/{instance}/address",
        f"/skydns/local/skydns/web/{instance}",
    ]


async def test_every_format_in_one_transaction_on_one_lease(
    etcd_any: EtcdServer, http_service: HttpService
) -> None:
    etcd = etcd_any  # on etcd 3.5 and Debian's 3.4 alike
    config = agent_config(etcd.url, http_service.port, publish=FORMATS, hostname="node-1")
    keys = keys_of(http_service.port)
    async with running(config):
        await eventually(lambda: all(etcd.get(k) is not None for k in keys), what="every format announced")
        written = [etcd.get(k) for k in keys]
        assert len({kv["mod_revision"] for kv in written}) == 1  # type: ignore[index]  # one revision: one txn
        assert len({kv["lease"] for kv in written}) == 1  # type: ignore[index]  # one lease
        assert written[1]["value"] == f"127.0.0.1:{http_service.port}"  # type: ignore[index]
        http_service.status = 503
        await eventually(lambda: all(etcd.get(k) is None for k in keys), what="every format withdrawn")
        revision = etcd.revision()
        http_service.status = 200
        await eventually(lambda: all(etcd.get(k) is not None for k in keys), what="announced again")
        assert etcd.revision() == revision + 1  # the whole instance back in one transaction


def test_sigterm_withdraws_every_format(etcd: EtcdServer, http_service: HttpService) -> None:
    keys = keys_of(http_service.port)
    args = ["--service", "web", "--port", str(http_service.port), "--ip", "127.0.0.1", "--hostname", "node-1",
            "--etcd-endpoints", etcd.url, "--interval", "0.2", "--timeout", "0.15",
            *[f"--publish={f}" for f in FORMATS]]  # fmt: skip
    with announcer_process(*args) as agent:
        wait_until(lambda: all(etcd.get(k) is not None for k in keys), 20, "every format announced")
        lease = etcd.get(keys[0])["lease"]  # type: ignore[index]
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(15) == 0
    assert [k for k in keys if etcd.get(k) is not None] == []
    assert etcd.lease_ttl(lease) == -1  # revoked


async def test_a_failing_verdict_removes_a_stale_predecessors_keys_of_every_format(
    etcd: EtcdServer, http_service: HttpService
) -> None:
    keys = keys_of(http_service.port)
    crashed = etcd.grant(60)  # a crashed agent's lease: its keys would linger for a minute
    for key in keys:
        etcd.put(key, "left by a crashed agent", crashed)
    http_service.status = 503
    config = agent_config(etcd.url, http_service.port, publish=FORMATS, hostname="node-1")
    async with running(config) as agent:
        service = agent.services[0]
        await eventually(
            lambda: agent.status.health is Health.FAILING and not service.stale_check,
            what="the verdict acted on",
        )
        assert [k for k in keys if etcd.get(k) is not None] == []
    assert etcd.lease_ttl(crashed) > 0  # removed by the verdict, not by the lease running out


def test_the_check_command_shows_every_key_and_value() -> None:
    args = ["check", "--service", "web", "--port", "8080", "--ip", "127.0.0.1", "--hostname", "node-1",
            "--check", "exec:/bin/true", *[f"--publish={f}" for f in FORMATS]]  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "announcer", *args], capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    for fmt, key in zip(FORMATS, keys_of(8080), strict=True):
        assert any(line.startswith(f"{fmt}:") and f" {key} = " in line for line in lines), (fmt, done.stdout)
    assert "plain:       /plain/web/node-1-8080 = 127.0.0.1:8080" in lines
    assert "address: 127.0.0.1 (--ip)" in lines
