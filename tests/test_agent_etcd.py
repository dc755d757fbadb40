"""The agent end to end, in-process: real etcd, real HTTP service, real clock."""

from __future__ import annotations

import asyncio
import json

from structlog.testing import capture_logs

from announcer.health import Health
from tests.agent_helpers import agent_config, eventually, running, sample
from tests.servers import EtcdCluster, EtcdServer, HttpService, SilentListener, Watcher

KEY_OF = "/services/web/127.0.0.1:{port}"


async def test_announces_after_rise_passes(etcd: EtcdServer, http_service: HttpService) -> None:
    key = KEY_OF.format(port=http_service.port)
    async with running(agent_config(etcd.url, http_service.port, meta=["zone=a"])) as agent:
        await eventually(lambda: etcd.get(key) is not None, what="announce")
        assert agent.status.rounds >= 2  # rise = 2
        kv = etcd.get(key)
        assert kv is not None
        assert json.loads(kv["value"]) == {
            "host": "node-1",
            "ipv4_addr": "127.0.0.1",
            "port": http_service.port,
            "zone": "a",
        }
        assert kv["lease"] > 0
        assert etcd.lease_ttl(kv["lease"]) > 0
    # on shutdown: record withdrawn, lease revoked
    assert etcd.get(key) is None
    assert etcd.lease_ttl(kv["lease"]) == -1


async def test_steady_state_is_keepalives_only(etcd: EtcdServer, http_service: HttpService) -> None:
    key = KEY_OF.format(port=http_service.port)
    async with running(agent_config(etcd.url, http_service.port)) as agent:
        await eventually(lambda: etcd.get(key) is not None, what="announce")
        kv = etcd.get(key)
        assert kv is not None
        watcher = Watcher(etcd, "/services/")
        revision = etcd.revision()
        start = sample(agent, "announcer_etcd_requests_total", operation="keepalive", outcome="ok")
        # TTL 3 means a keepalive every second; see four of them
        await eventually(
            lambda: (
                sample(agent, "announcer_etcd_requests_total", operation="keepalive", outcome="ok")
                >= start + 4
            ),
            timeout=15,
            what="four keepalives",
        )
        after = etcd.get(key)
        assert after is not None
        assert after["mod_revision"] == kv["mod_revision"]
        assert etcd.revision() == revision  # no write at all, by anyone
        assert watcher.events == []  # a consumer watching the prefix saw nothing
        assert sample(agent, "announcer_etcd_requests_total", operation="put", outcome="ok") == 1
        assert (
            sample(agent, "announcer_etcd_requests_total", operation="range", outcome="ok") == 1
        )  # the watch's
        assert etcd.lease_ttl(after["lease"]) >= 1
        watcher.close()


async def test_withdraws_on_failure_and_announces_again(
    etcd_any: EtcdServer, http_service: HttpService
) -> None:
    # On etcd 3.5 and Debian's 3.4 alike.
    etcd = etcd_any
    key = KEY_OF.format(port=http_service.port)
    async with running(agent_config(etcd.url, http_service.port)) as agent:
        await eventually(lambda: etcd.get(key) is not None, what="announce")
        lease = etcd.get(key)["lease"]  # type: ignore[index]
        with capture_logs() as logs:
            http_service.status = 503
            await eventually(lambda: etcd.get(key) is None, what="withdraw")
            assert agent.status.health is Health.FAILING
            rounds = agent.status.rounds
            await eventually(lambda: agent.status.rounds >= rounds + 3, what="checks go on")
            http_service.status = 200
            await eventually(lambda: etcd.get(key) is not None, what="announce again")

            # the put lands in etcd before the agent logs it: wait for the line asserted below
            # (after the recovery: the first announce's own line may land inside the capture)
            def announced_again() -> bool:
                events = [e["event"] for e in logs]
                return (
                    "service healthy" in events and "announced" in events[events.index("service healthy") :]
                )

            await eventually(announced_again, what="announced logged")
        assert etcd.get(key)["lease"] == lease  # type: ignore[index]  # one lease for the agent's life
        events = [entry["event"] for entry in logs if entry["log_level"] != "debug"]
        # (the first announce's own log line may land just inside the capture)
        events = events[events.index("service unhealthy") :]
        assert events == ["service unhealthy", "withdrawn", "service healthy", "announced"]
        unhealthy = next(e for e in logs if e["event"] == "service unhealthy")
        assert unhealthy["failing"] == {f"http://127.0.0.1:{http_service.port}/": "HTTP 503"}
        assert sample(agent, "announcer_withdrawals_total", reason="check_failure") == 1
        assert sample(agent, "announcer_announcements_total") == 2


async def test_never_deletes_a_successors_record(etcd_any: EtcdServer, http_service: HttpService) -> None:
    etcd = etcd_any
    key = KEY_OF.format(port=http_service.port)
    # TTL 30: a keepalive every 10 s; the watch, not a periodic read, sees the takeover.
    async with running(agent_config(etcd.url, http_service.port, ttl="30")) as agent:
        await eventually(lambda: etcd.get(key) is not None and agent.watch.open, what="announce")
        successor = etcd.grant(30)
        with capture_logs() as logs:
            etcd.put(key, '{"host":"successor"}', successor)
            # the watch shows it at once; the agent logs it once and leaves the key alone
            await eventually(
                lambda: any(e["event"] == "key held by another lease, leaving it alone" for e in logs),
                timeout=5, what="the takeover noticed by the watch",
            )  # fmt: skip
            # displaced: the agent no longer claims to be registered, though its checks pass
            assert agent.status.health is Health.PASSING
            assert not agent.registered
            assert sample(agent, "announcer_registered") == 0
            rounds = agent.status.rounds
            await eventually(lambda: agent.status.rounds >= rounds + 5, what="keepalives and rounds go on")
        assert etcd.value(key) == {"host": "successor"}
    # Not even the shutdown removed it. (Only this agent's own FAILING verdict may remove a
    # record on another lease at its key: tests/test_lifecycle.py shows that case.)
    assert etcd.value(key) == {"host": "successor"}
    assert etcd.get(key)["lease"] == successor  # type: ignore[index]


async def test_record_deleted_by_hand_is_put_back(etcd_any: EtcdServer, http_service: HttpService) -> None:
    etcd = etcd_any
    key = KEY_OF.format(port=http_service.port)
    async with running(agent_config(etcd.url, http_service.port, ttl="30")) as agent:
        await eventually(lambda: etcd.get(key) is not None and agent.watch.open, what="announce")
        for _ in range(3):  # and again: our own put back comes through the watch and needs nothing
            etcd.delete(key)
            await eventually(lambda: etcd.get(key) is not None, timeout=5, what="put back, long before TTL/3")
        assert agent.watch.opened == 1


async def test_a_restarted_etcd_is_read_then_watched_again_without_a_write(
    etcd_any: EtcdServer, http_service: HttpService
) -> None:
    etcd = etcd_any
    key = KEY_OF.format(port=http_service.port)
    async with running(agent_config(etcd.url, http_service.port, ttl="30")) as agent:
        await eventually(lambda: etcd.get(key) is not None and agent.watch.open, what="announce")
        written = etcd.get(key)["mod_revision"]  # type: ignore[index]
        await asyncio.to_thread(etcd.stop)
        await asyncio.to_thread(etcd.start)  # same data: the lease and the record survive a restart
        await eventually(
            lambda: agent.watch.opened == 2 and agent.watch.open, timeout=10, what="watched again"
        )
        assert etcd.get(key)["mod_revision"] == written  # type: ignore[index]  # no duplicate write
        etcd.delete(key)
        await eventually(lambda: etcd.get(key) is not None, timeout=5, what="the new watch sees a delete")


async def test_the_watch_follows_a_failover_when_its_member_is_killed(
    etcd_cluster: EtcdCluster, http_service: HttpService
) -> None:
    key = KEY_OF.format(port=http_service.port)
    first = etcd_cluster.members[0]
    config = agent_config(",".join(m.url for m in etcd_cluster.members), http_service.port, ttl="30")
    async with running(config) as agent:
        await eventually(lambda: first.get(key) is not None and agent.watch.open, what="announce")
        first.kill()  # the member behind the watch (and every other request) goes
        other = etcd_cluster.any_up()
        await eventually(
            lambda: agent.watch.opened >= 2 and agent.watch.open, timeout=10, what="watched again"
        )
        other.delete(key)
        await eventually(lambda: other.get(key) is not None, timeout=5, what="put back through the new watch")


async def test_etcd_killed_and_restarted_empty(etcd: EtcdServer, http_service: HttpService) -> None:
    key = KEY_OF.format(port=http_service.port)
    # TTL 30: back well before the next keepalive (10 s), from the broken watch's read.
    async with running(agent_config(etcd.url, http_service.port, ttl="30")) as agent:
        await eventually(lambda: etcd.get(key) is not None, what="announce")
        old_lease = etcd.get(key)["lease"]  # type: ignore[index]
        with capture_logs() as logs:
            etcd.kill()
            etcd.wipe()
            await eventually(lambda: agent.status.etcd_reachable is False, what="etcd seen as down")
            rounds = agent.status.rounds
            await eventually(
                lambda: agent.status.rounds >= rounds + 5, what="checks go on while etcd is down"
            )
            await asyncio.to_thread(etcd.start)
            await eventually(lambda: etcd.get(key) is not None, timeout=8, what="announced again")
            await eventually(lambda: agent.status.etcd_reachable is True, what="etcd seen back")
        kv = etcd.get(key)
        assert kv is not None
        assert kv["lease"] != old_lease
        events = [entry["event"] for entry in logs if entry["log_level"] != "debug"]
        assert "etcd unreachable" in events
        assert "etcd reachable again" in events
        assert "lease lost" in events
        assert events.count("etcd unreachable") == 1  # one line per outage, not per retry
        assert sample(agent, "announcer_withdrawals_total", reason="lease_lost") == 1
        assert sample(agent, "announcer_lease_grants_total") == 2


async def test_service_that_never_answers_fails_at_the_timeout(etcd: EtcdServer) -> None:
    silent = SilentListener()
    try:
        config = agent_config(etcd.url, silent.port, check=None)
        async with running(config) as agent:
            await eventually(lambda: agent.status.health is Health.FAILING, what="failing verdict")
            rounds = agent.status.rounds
            await eventually(lambda: agent.status.rounds >= rounds + 5, what="the loop keeps its cadence")
            assert all(r.detail == "timed out after 0.15s" for r in agent.status.results)
            assert etcd.get(KEY_OF.format(port=silent.port)) is None
    finally:
        silent.close()
