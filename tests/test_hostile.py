"""Issue #10: nothing another process does may crash announcer, stall it, or make it lie.

Each case runs against real processes: a real etcd, the hostile gateway of
tests/hostile.py where the fault needs one, a real `announcer` where the fault is
about the process (signals, stderr), real check scripts.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
from prometheus_client import generate_latest
from structlog.testing import capture_logs

from announcer.checks.exec import ExecCheck
from announcer.checks.rounds import run_check
from announcer.health import Health
from announcer.registrar.etcd_client import EtcdClient, EtcdSettings, EtcdUnavailable
from tests.agent_helpers import agent_config, eventually, keepalives_go_on, running, sample
from tests.hostile import MODES, HostileGateway
from tests.servers import (
    EtcdServer,
    HttpService,
    PartitionProxy,
    Watcher,
    announcer_process,
    b64,
    free_port,
    proc_stat,
    wait_until,
)
from tests.test_process import StderrLog, agent_args

KEY_OF = "/services/web/127.0.0.1:{port}"


# -- 1. a foreign value at the key ---------------------------------------------------


def _put_bytes(etcd: EtcdServer, key: str, value: bytes, lease: int = 0) -> None:
    etcd.call("/v3/kv/put", {"key": b64(key), "value": base64.b64encode(value).decode(), "lease": str(lease)})


def test_non_utf8_bytes_at_the_key_crash_nothing(etcd: EtcdServer, http_service: HttpService) -> None:
    key = KEY_OF.format(port=http_service.port)
    with announcer_process(*agent_args(etcd, http_service.port, "--ttl", "3")) as process:
        log = StderrLog(process.stderr)
        wait_until(lambda: etcd.get(key) is not None, 20, "announce")
        _put_bytes(etcd, key, b"\xff\xfe")  # as `printf '\xff\xfe' | etcdctl put KEY` does
        wait_until(
            lambda: log.saw("key held by another lease, leaving it alone"), 10, "the foreign value seen"
        )
        keepalives = len([e for e in log.events if e.get("event") == "state"])
        process.send_signal(signal.SIGUSR1)  # the agent is alive and answering after the refresh
        wait_until(
            lambda: len([e for e in log.events if e.get("event") == "state"]) > keepalives, 10, "state"
        )
        state = next(e for e in reversed(log.events) if e.get("event") == "state")
        assert state["registered"] is False  # displaced by the foreign value: it says so
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0
    # a new agent meets the bytes at start-up: no crash loop, it takes the key over
    with announcer_process(*agent_args(etcd, http_service.port, "--ttl", "3")) as process:
        wait_until(
            lambda: str(http_service.port) in str((etcd.get(key) or {}).get("value")), 20, "taken over"
        )
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0
        _, err = process.communicate()
    assert "Traceback" not in err


# -- 2, 3, 7. hostile gateway answers -----------------------------------------------------

CLIENT_CALLS = {
    "/v3/lease/grant": "grant",
    "/v3/lease/keepalive": "keepalive",
    "/v3/kv/range": "get",
    "/v3/kv/txn": "txn",
    "/v3/auth/authenticate": "login",
    "/v3/watch": "watch",
    None: "grant",
}


async def _watch(client: EtcdClient) -> None:
    async for _ in client.watch(["/a", "/b"], 1):
        pass


# keepalive-gone is an answer etcd gives (a lost lease), not an error: the agent test below holds it.
@pytest.mark.parametrize(
    "mode", sorted(m for m in MODES if m not in ("trickle", "shorten-ttl", "keepalive-gone"))
)
async def test_a_hostile_answer_is_an_error_of_that_endpoint(etcd: EtcdServer, mode: str) -> None:
    gateway = HostileGateway(etcd.url, mode)
    user = "root" if mode == "login-without-token" else None
    client = EtcdClient(
        EtcdSettings(endpoints=(gateway.url,), timeout=3, user=user, password="pw", discovery=False)
    )
    call = CLIENT_CALLS[MODES[mode][0]]
    try:
        lease = etcd.grant(30)
        calls = {
            "grant": lambda: client.grant(5),
            "login": lambda: client.grant(5),
            "keepalive": lambda: client.keepalive(lease),
            "get": lambda: client.get("/k"),
            "txn": lambda: client.get_many(["/a", "/b"]),
            "watch": lambda: _watch(client),
        }
        with pytest.raises(EtcdUnavailable) as info:
            await calls[call]()
        assert gateway.hostile_answers >= 1
        assert "\n" not in str(info.value)
        if mode in ("flood", "watch-flood"):
            assert "larger than 1024 KiB" in str(info.value)
            assert gateway.sent < 64 * 1024 * 1024  # it stopped reading, far short of the 1 GiB offered
    finally:
        await client.aclose()
        gateway.close()


@pytest.mark.parametrize(
    "mode",
    [
        "not-json",
        "html",
        "json-list",
        "grant-without-id",
        "txn-bad-base64",
        "gzip-lie",
        "flood",
        "trickle",
        "keepalive-no-leader",
        "keepalive-gone",  # a live lease said gone: asked again at the next member, kept
    ],
)
async def test_agent_fails_over_past_a_hostile_member(
    etcd: EtcdServer, http_service: HttpService, mode: str
) -> None:
    # The hostile member is listed first. A trickling one sends a byte every 0.3 s: the whole
    # request must be bounded by --etcd-timeout, after which the healthy member is tried.
    gateway = HostileGateway(etcd.url, mode)
    key = KEY_OF.format(port=http_service.port)
    config = agent_config(f"{gateway.url},{etcd.url}", http_service.port, etcd_timeout="0.4")
    try:
        async with running(config) as agent:
            await eventually(
                lambda: etcd.get(key) is not None, timeout=15, what="announced through the healthy member"
            )
            lease = etcd.get(key)["lease"]  # type: ignore[index]
            await keepalives_go_on(agent, 4)  # TTL 3: beyond a whole TTL, the record stays on its first lease
            assert etcd.get(key)["lease"] == lease  # type: ignore[index]
            assert agent.registered
    finally:
        gateway.close()


@pytest.mark.parametrize("mode", ["watch-silent", "watch-ends", "watch-flood", "watch-bad-event"])
async def test_an_endpoint_whose_watch_misbehaves_keeps_the_lease_and_the_repairs(
    etcd: EtcdServer, http_service: HttpService, mode: str
) -> None:
    # Everything but the watch goes through to etcd. The watch breaks each time it is opened;
    # its retries (read, then watch) are paced to TTL/3 at most and still put back a record
    # deleted by hand; the lease and the record stay.
    gateway = HostileGateway(etcd.url, mode)
    key = KEY_OF.format(port=http_service.port)
    config = agent_config(gateway.url, http_service.port, etcd_timeout="0.5", etcd_discovery="off")
    try:
        async with running(config) as agent:
            await eventually(lambda: etcd.get(key) is not None, timeout=15, what="announced")
            lease = etcd.get(key)["lease"]  # type: ignore[index]
            await eventually(lambda: gateway.hostile_answers >= 2, timeout=15, what="the watch tried again")
            etcd.delete(key)
            await eventually(lambda: etcd.get(key) is not None, timeout=15, what="put back by a read")
            await keepalives_go_on(agent, 4)  # TTL 3: beyond a whole TTL
            assert etcd.get(key)["lease"] == lease  # type: ignore[index]
            assert agent.registered
            broken = sum(
                sample(agent, "announcer_etcd_requests_total", operation="watch", outcome=outcome)
                for outcome in ("unavailable", "bad_answer")
            )
            assert broken >= 2  # each broken stream is counted: the operator can see it
    finally:
        gateway.close()


def test_agent_with_only_a_non_etcd_endpoint_says_so_once(http_service: HttpService) -> None:
    # An endpoint that is a web server, not etcd: the agent keeps checking, says what is wrong
    # once, and still shuts down cleanly with nothing to withdraw.
    web = HttpService()
    web.body = b"<html>It works!</html>"
    args = [
        "--service", "web", "--port", str(http_service.port), "--ip", "127.0.0.1",
        "--interval", "0.2", "--timeout", "0.1", "--ttl", "3", "--etcd-endpoints", web.url,
    ]  # fmt: skip
    try:
        with announcer_process(*args) as process:
            log = StderrLog(process.stderr)
            wait_until(lambda: log.saw("etcd unreachable"), 20, "the endpoint judged")
            first = next(e for e in log.events if e.get("event") == "etcd unreachable")
            assert "does not speak etcd's v3 API: HTTP 200" in str(first["error"])
            requests = web.requests
            wait_until(lambda: web.requests >= requests + 3, 20, "retries go on")
            process.send_signal(signal.SIGTERM)
            assert process.wait(15) == 0
        assert [e.get("event") for e in log.events].count("etcd unreachable") == 1
        assert log.saw("nothing to withdraw: no lease was granted")
        assert not log.saw("withdrawn, lease revoked")  # 14: it says what really happened
        assert not any("Traceback" in line for line in log.raw)
    finally:
        web.close()


# -- 4. a broken stderr pipe -----------------------------------------------------------------


def test_a_closed_log_reader_does_not_kill_the_agent(etcd: EtcdServer, http_service: HttpService) -> None:
    key = KEY_OF.format(port=http_service.port)
    with announcer_process(*agent_args(etcd, http_service.port)) as process:
        wait_until(lambda: etcd.get(key) is not None, 20, "announce")
        assert process.stderr is not None
        process.stderr.close()  # the log reader goes away
        http_service.status = 500  # the next lines ("service unhealthy", "withdrawn") hit the dead pipe
        wait_until(lambda: etcd.get(key) is None, 20, "withdrawn all the same")
        http_service.status = 200
        wait_until(lambda: etcd.get(key) is not None, 20, "announced again")
        assert process.poll() is None
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0
    assert etcd.get(key) is None


# -- 5. signals -------------------------------------------------------------------------------


def test_stray_signals_neither_kill_nor_withdraw(etcd: EtcdServer, http_service: HttpService) -> None:
    key = KEY_OF.format(port=http_service.port)
    with announcer_process(*agent_args(etcd, http_service.port)) as process:
        log = StderrLog(process.stderr)
        wait_until(lambda: etcd.get(key) is not None, 20, "announce")
        revision = etcd.get(key)["mod_revision"]  # type: ignore[index]
        watcher = Watcher(etcd, "/services/")
        for signum in (signal.SIGUSR2, signal.SIGALRM, signal.SIGPIPE, signal.SIGVTALRM, signal.SIGPROF,
                       signal.SIGIO, signal.SIGPWR, signal.SIGXFSZ, signal.SIGRTMIN, signal.SIGRTMAX,
                       signal.SIGHUP):  # fmt: skip
            process.send_signal(signum)
        # SIGUSR1 logs the state: once it has, every signal sent before it has been delivered
        process.send_signal(signal.SIGUSR1)
        wait_until(lambda: log.saw("state"), 10, "the state line")
        assert process.poll() is None
        assert etcd.get(key)["mod_revision"] == revision  # type: ignore[index]
        assert watcher.events == []
        watcher.close()
        process.send_signal(signal.SIGQUIT)  # a stop signal, like SIGTERM
        assert process.wait(15) == 0
    assert etcd.get(key) is None
    assert log.saw("SIGQUIT: stopping")


# -- 6. bad configuration: see tests/test_config_fuzz.py ------------------------------------------

# -- 8. a catastrophic body_regex ----------------------------------------------------------------


async def test_catastrophic_body_regex_cannot_stall_the_agent(
    etcd: EtcdServer, http_service: HttpService
) -> None:
    http_service.body = b"a" * 40 + b"b"  # 41 bytes that ^(a|a)*$ backtracks over for ages
    check = {"spec": f"http://127.0.0.1:{http_service.port}/", "body_regex": "^(a|a)*$"}
    config = agent_config(etcd.url, http_service.port, check=[check], interval="0.3", timeout="0.2")
    async with running(config) as agent:
        await eventually(lambda: agent.status.health is Health.FAILING, what="the regex fails the check")
        [result] = agent.status.results
        assert "body_regex took longer than" in result.detail or "timed out" in result.detail
        rounds = agent.status.rounds
        await eventually(lambda: agent.status.rounds >= rounds + 5, what="the loop keeps its cadence")
        assert agent.health_report()[0] == 200
    # leaving `running` shut the agent down within its bound: the loop was never pinned


# -- 9. the metrics endpoint as a weapon ---------------------------------------------------------------


def _limit_files(limit: int) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))


def test_idle_connections_and_a_flood_starve_nothing(etcd: EtcdServer, http_service: HttpService) -> None:
    key = KEY_OF.format(port=http_service.port)
    port = free_port()
    args = agent_args(etcd, http_service.port, "--metrics-address", f"127.0.0.1:{port}", "--log-level", "debug",
                      "--timeout", "0.15")  # fmt: skip
    env = {**os.environ, "ANNOUNCER_LOG_FORMAT": "json"}
    with subprocess.Popen(
        [sys.executable, "-m", "announcer", *args], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
        text=True, env=env, preexec_fn=lambda: _limit_files(256),  # noqa: PLW1509 - runs before any thread
    ) as process:  # fmt: skip
        try:
            log = StderrLog(process.stderr)
            wait_until(lambda: etcd.get(key) is not None, 20, "announce")
            watcher = Watcher(etcd, "/services/")
            idle: list[socket.socket] = []
            for _ in range(600):  # far more than the 256 descriptors the agent may hold
                try:
                    idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
                except OSError:
                    break
            checks = lambda: len([e for e in log.events if e.get("event") == "check"])  # noqa: E731
            seen = checks()
            wait_until(lambda: checks() >= seen + 15, 30, "check rounds while the idle connections are held")
            for sock in idle:
                sock.close()
            # a flood: 8 threads, 400 requests each, as fast as they go
            stop = threading.Event()

            def hammer() -> None:
                with httpx.Client(timeout=2) as client:
                    for _ in range(400):
                        if stop.is_set():
                            return
                        try:
                            client.get(f"http://127.0.0.1:{port}/metrics", headers={"Connection": "close"})
                        except httpx.HTTPError:
                            continue

            threads = [threading.Thread(target=hammer) for _ in range(8)]
            for thread in threads:
                thread.start()
            seen = checks()
            wait_until(lambda: checks() >= seen + 15, 60, "check rounds during the flood")
            stop.set()
            for thread in threads:
                thread.join(30)
            health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
            assert health.status_code == 200
            assert health.json()["registered"] is True
            failed = [e for e in log.events if e.get("event") == "check" and not e.get("ok")]
            assert failed == []
            assert not log.saw("withdrawn")
            assert [e.get("type") for e in watcher.events] == []  # the record never left
            watcher.close()
            assert not any("Traceback" in line for line in log.raw)
            process.send_signal(signal.SIGTERM)
            assert process.wait(15) == 0
        finally:
            if process.poll() is None:
                process.kill()


# -- 10. daemonising exec checks ---------------------------------------------------------------------


def _pids() -> list[str]:
    return [p.name for p in Path("/proc").iterdir() if p.name.isdigit()]


def _zombies() -> int:
    me, count = str(os.getpid()), 0
    for name in _pids():
        if name.isdigit():
            fields = proc_stat(Path(f"/proc/{name}/stat"))
            if fields is not None and fields[0] == "Z" and fields[1] == me:
                count += 1
    return count


def _running(marker: str) -> int:
    found = 0
    for name in _pids():
        if name.isdigit():
            try:
                if marker.encode() in Path(f"/proc/{name}/cmdline").read_bytes():
                    found += 1
            except OSError:
                continue
    return found


@pytest.mark.parametrize("keeps_stdout", [True, False])
async def test_daemonising_check_scripts_leave_nothing_behind(tmp_path: Path, keeps_stdout: bool) -> None:
    marker = f"987.{os.getpid() % 1000 + (1000 if keeps_stdout else 0)}"
    redirect = "" if keeps_stdout else " >/dev/null 2>&1"
    script = tmp_path / "daemonise.sh"
    script.write_text(f"#!/bin/sh\nsetsid sleep {marker}{redirect} &\necho started\nexit 0\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    check = ExecCheck.from_spec(f"exec:{script}", {})
    fds_before, zombies_before = len(list(Path("/proc/self/fd").iterdir())), _zombies()
    for _ in range(100):
        result = await run_check(check, 2.0)
        assert result.ok, result.detail  # the script exited 0: not "timed out"
        assert result.detail == "started"
    wait_until(lambda: _running(f"sleep {marker}") == 0, 10, "every daemonised grandchild gone")
    await eventually(lambda: _zombies() <= zombies_before, what="every killed process reaped")
    assert len(list(Path("/proc/self/fd").iterdir())) <= fds_before + 2


# -- 11. registered means registered ----------------------------------------------------------------


async def test_registered_turns_false_once_the_lease_may_have_expired(
    etcd: EtcdServer, http_service: HttpService
) -> None:
    proxy = PartitionProxy(etcd.client_port)
    key = KEY_OF.format(port=http_service.port)
    try:
        async with running(
            agent_config(proxy.url, http_service.port, metrics_address=None, etcd_discovery="off")
        ) as agent:
            await eventually(lambda: agent.registered, what="announce")
            proxy.partitioned.set()
            await eventually(lambda: not agent.registered, timeout=10, what="registered turns false")
            # it turned false by the time the lease could have run out: the record is gone by now or soon
            await eventually(lambda: etcd.get(key) is None, timeout=10, what="the lease expired")
            assert agent.status.health is Health.PASSING
            assert agent.health_report()[1]["registered"] is False
            assert sample(agent, "announcer_registered") == 0
            proxy.partitioned.clear()
            await eventually(lambda: agent.registered, timeout=15, what="registered again after healing")
            assert etcd.get(key) is not None
    finally:
        proxy.close()


# -- 12. the granted TTL -----------------------------------------------------------------------------


async def test_the_granted_ttl_sets_the_keepalive_period(etcd: EtcdServer, http_service: HttpService) -> None:
    gateway = HostileGateway(etcd.url, "shorten-ttl")
    key = KEY_OF.format(port=http_service.port)
    try:
        with capture_logs() as logs:
            async with running(
                agent_config(gateway.url, http_service.port, ttl="9", etcd_discovery="off")
            ) as agent:
                await eventually(lambda: etcd.get(key) is not None, what="announce")
                lease = etcd.get(key)["lease"]  # type: ignore[index]
                # a TTL of 2 granted: keepalives come every 2/3 s, and over 4 TTLs the lease lives on
                await keepalives_go_on(agent, 12, timeout=20)
                assert etcd.get(key)["lease"] == lease  # type: ignore[index]
                assert sample(agent, "announcer_lease_grants_total") == 1
        warning = next(e for e in logs if e["event"].startswith("etcd granted a different TTL"))
        assert (warning["asked"], warning["granted"]) == (9, 2)
    finally:
        gateway.close()


# -- 13. secrets in query strings and endpoint URLs --------------------------------------------------------


SECRET = "s3cr3t-in-the-query"


async def test_query_string_passwords_are_masked_everywhere(
    etcd: EtcdServer, http_service: HttpService
) -> None:
    specs = [
        f"postgresql://announcer_test@127.0.0.1:5432/test?password={SECRET}&sslmode=disable",
        f"redis://127.0.0.1:6379/0?password={SECRET}",
    ]
    for as_json in (False, True):
        args = ["check", "--service", "web", "--port", str(http_service.port), "--ip", "127.0.0.1",
                *[a for s in specs for a in ("--check", s)], *(["--json"] if as_json else [])]  # fmt: skip
        with announcer_process(*args) as process:
            out, err = process.communicate(timeout=60)
        assert SECRET not in out + err
        assert "password=***" in out
    with capture_logs() as logs:
        config = agent_config(etcd.url, http_service.port, check=specs, log_level="debug")
        async with running(config) as agent:
            await eventually(lambda: agent.status.rounds >= 2, what="two rounds")
            metrics = generate_latest(agent.metrics.registry).decode()
    assert SECRET not in metrics
    assert "password=***" in metrics
    assert SECRET not in json.dumps(logs, default=str)


def test_credentials_in_an_endpoint_url_are_refused_and_masked() -> None:
    args = ["check", "--service", "web", "--port", "1", "--ip", "127.0.0.1",
            "--etcd-endpoints", f"http://root:{SECRET}@127.0.0.1:2379"]  # fmt: skip
    with announcer_process(*args) as process:
        out, err = process.communicate(timeout=30)
    assert process.returncode == 2
    assert SECRET not in out + err
    assert "carries credentials" in err
    bad = f"postgresql://u:{SECRET}@[bad/db"  # does not even parse: still masked in the error
    with announcer_process("check", "--service", "web", "--port", "1", "--check", bad) as process:
        out, err = process.communicate(timeout=30)
    assert process.returncode == 2
    assert SECRET not in out + err


def test_a_password_file_others_can_read_is_warned_about(
    etcd: EtcdServer, http_service: HttpService, tmp_path: Path
) -> None:
    secret = tmp_path / "pw"
    secret.write_text(SECRET + "\n")
    secret.chmod(0o644)
    args = agent_args(etcd, http_service.port, "--etcd-user", "root", "--etcd-password-file", str(secret))
    with announcer_process(*args) as process:
        log = StderrLog(process.stderr)
        wait_until(
            lambda: any("readable by every user" in str(e.get("event")) for e in log.events), 20, "warning"
        )
        process.send_signal(signal.SIGTERM)
        process.wait(15)
    assert not any(SECRET in line for line in log.raw)
