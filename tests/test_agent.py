"""The agent's own decisions (announcer/agent.py, service.py), fast, on the in-memory registrar.

Everything here that concerns etcd itself is also tested against a real etcd
(tests/test_agent_etcd.py, test_lifecycle.py); these tests pin down the decisions:
READY, backoff, refusals, a lost lease, a long pass, maintenance, flap damping, the
shutdown order and drain, reload's keep/replace/remove.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from announcer.agent import Agent, Backoff
from announcer.checks import CheckResult
from announcer.config import load_config
from announcer.errors import EtcdUnavailable, WatchCompacted
from announcer.metrics import Metrics
from announcer.registrar import Registrar
from announcer.registrar.etcd_client import EtcdAuthError
from tests.agent_helpers import AMBIENT, agent_config, eventually, sample
from tests.memory_store import memory_registrar
from tests.servers import SilentListener


class RecordingNotifier:
    """What the agent tells systemd, kept in a list (the real socket is tested elsewhere)."""

    watchdog_period = None

    def __init__(self) -> None:
        self.lines: list[str] = []

    def send(self, *lines: str) -> None:
        self.lines.extend(lines)

    def close(self) -> None:
        return


@contextlib.asynccontextmanager
async def agent_on(
    registrar: Registrar,
    **flags: Any,  # type: ignore[type-arg]
) -> AsyncIterator[tuple[Agent, RecordingNotifier]]:
    listener = SilentListener()  # accepts connections: a passing tcp check
    notifier = RecordingNotifier()
    config = agent_config("http://127.0.0.1:1", listener.port, check=["tcp"], interval="0.05", timeout="0.04",
                          rise="1", fall="1", **flags)  # fmt: skip
    agent = Agent(config, registrar=registrar, metrics=Metrics(process=False), notifier=notifier)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.serve(stop.wait()))
    try:
        yield agent, notifier
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        listener.close()


async def test_ready_once_after_the_first_verdict_is_in_etcd() -> None:
    registrar, store = memory_registrar()
    async with agent_on(registrar) as (agent, notifier):
        await eventually(lambda: "READY=1" in notifier.lines, what="READY")
        assert store.data  # the record was in "etcd" before READY
        rounds = agent.status.rounds
        await eventually(lambda: agent.status.rounds >= rounds + 5, what="more rounds")
    assert notifier.lines.count("READY=1") == 1
    assert notifier.lines.index("STATUS=announced; service passing, registered") < notifier.lines.index(
        "READY=1"
    )


async def test_unreachable_is_logged_once_and_backoff_resets() -> None:
    registrar, store = memory_registrar()
    store.fail(*[EtcdUnavailable("etcd down")] * 4)
    with capture_logs() as logs:
        async with agent_on(registrar) as (agent, _):
            await eventually(lambda: agent.registered, what="announced once etcd is back")
            store.fail(EtcdUnavailable("etcd down again"))
            agent._wake.set()
            await eventually(
                lambda: [e["event"] for e in logs].count("etcd reachable again") >= 1, what="back"
            )
    events = [e["event"] for e in logs]
    assert events.count("etcd unreachable") == 1  # one line for the outage, not one per retry
    retries = [e["retry_in"] for e in logs if "retry_in" in e]
    assert retries  # the delays grew while etcd stayed away ...
    assert max(retries[:4]) > min(retries[:4])


async def test_a_refusal_is_logged_once_per_distinct_message() -> None:
    registrar, store = memory_registrar()
    store.fail(*[EtcdAuthError("permission denied")] * 3, *[EtcdAuthError("user unknown")] * 2)
    with capture_logs() as logs:
        async with agent_on(registrar) as (agent, _):
            await eventually(lambda: agent.registered, what="announced after the refusals")
    refusals = [e["error"] for e in logs if e["event"] == "etcd refused the request"]
    assert refusals == ["permission denied", "user unknown"]
    assert agent.etcd_reachable is True  # a refusal is an answer


async def test_a_lost_lease_counts_one_withdrawal_and_one_announcement() -> None:
    registrar, store = memory_registrar(ttl=3)  # a keepalive every second
    async with agent_on(registrar) as (agent, _):
        await eventually(lambda: agent.registered, what="announce")
        first = registrar.lease
        with capture_logs() as logs:
            store.expire()  # etcd forgets the lease: the next keepalive finds out
            await eventually(
                lambda: agent.registered and registrar.lease != first,
                timeout=5,
                what="put back on a new lease",
            )
        assert [(e["event"], e.get("records")) for e in logs if e["event"] == "lease lost"] == [
            ("lease lost", 1)
        ]
        assert sample(agent, "announcer_withdrawals_total", reason="lease_lost") == 1
        assert sample(agent, "announcer_announcements_total") == 2


async def test_a_pass_longer_than_the_ttl_keeps_the_one_lease(tmp_path: Path) -> None:
    # #18: a pass of announcements longer than the TTL once let the shared lease expire,
    # and every record dropped at once. The store here is slow (50 ms a written key, so a
    # pass of 120 announcements takes about 6 s, twice the TTL) and its lease really
    # expires when it is not kept alive in time: the keepalive must run during the pass.
    server = await asyncio.start_server(lambda _r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    count = 120
    lines = ["ttl = 3", 'ip = "127.0.0.1"', "rise = 1", "fall = 1", 'etcd_endpoints = "http://127.0.0.1:1"']
    for n in range(count):
        lines += ["[[services]]", f'service = "s{n}"', f"port = {port}", f'key = "/long/{n}"',
                  "interval = 0.5", "timeout = 0.4", 'checks = ["tcp"]']  # fmt: skip
    (tmp_path / "long.toml").write_text("\n".join(lines) + "\n")
    config = load_config({"config": str(tmp_path / "long.toml")}, {}, AMBIENT)
    registrar, store = memory_registrar(ttl=3, latency=0.05)
    agent = Agent(config, registrar=registrar, metrics=Metrics(process=False), notifier=RecordingNotifier())
    stop = asyncio.Event()
    with capture_logs() as logs:
        task = asyncio.create_task(agent.serve(stop.wait()))
        try:
            await eventually(lambda: len(store.data) == count, timeout=30, what="every record in place")
            assert store.calls.count("keepalive") >= 3  # kept alive while the pass ran
            assert agent.registered
        finally:
            stop.set()
            await asyncio.wait_for(task, 20)
            server.close()
    assert store.calls.count("grant") == 1  # one lease for the whole run
    assert not [e for e in logs if e["event"] in ("lease lost", "record missing, putting it back")]


# -- the lifecycle's decisions, fast (each is also tested end to end on real etcd) -------------


async def test_maintenance_withdraws_and_its_end_announces_again(tmp_path: Path) -> None:
    registrar, store = memory_registrar()
    flag = tmp_path / "maintenance"
    async with agent_on(registrar, maintenance_file=str(flag)) as (agent, _):
        await eventually(lambda: agent.registered, what="announced")
        key = agent.services[0].config.key
        flag.touch()
        await eventually(lambda: store.value(key) is None, what="withdrawn for maintenance")
        assert agent.services[0].status.maintenance
        assert sample(agent, "announcer_withdrawals_total", reason="maintenance") == 1
        rounds = agent.status.rounds
        await eventually(lambda: agent.status.rounds >= rounds + 3, what="checks go on")
        assert store.value(key) is None  # still withdrawn while the file exists
        flag.unlink()
        await eventually(lambda: store.value(key) is not None, what="announced again")


async def test_a_late_put_of_a_withdrawn_record_is_removed(tmp_path: Path) -> None:
    # A put etcd carries out late (a frozen member, thawed after the withdraw that followed
    # it; seen on a loaded machine) brings the record back on our lease while the service is
    # withdrawn: the watch sees it, and it goes again, before anyone reads it for long.
    registrar, store = memory_registrar(ttl=30)
    flag = tmp_path / "maintenance"
    async with agent_on(registrar, maintenance_file=str(flag)) as (agent, _):
        await eventually(lambda: agent.registered and agent.watch.open, what="announced and watched")
        key, value = agent.services[0].config.key, store.value(agent.services[0].config.key)
        flag.touch()
        await eventually(lambda: store.value(key) is None, what="withdrawn for maintenance")
        assert registrar.lease is not None
        store.put(key, value or b"late", lease=registrar.lease)
        await eventually(lambda: store.value(key) is None, timeout=5, what="the late put removed")
        flag.unlink()
        await eventually(lambda: store.value(key) is not None, what="announced again")


async def test_flap_damping_holds_back_an_announcement_past_the_limit() -> None:
    registrar, store = memory_registrar()
    async with agent_on(registrar, flap_limit="1/60") as (agent, _):
        await eventually(lambda: agent.registered, what="the one announcement the window allows")
        service = agent.services[0]
        key = service.config.key
        # The check fails once (rise = fall = 1), then passes again: a second announcement
        # within the window is held back.
        service.observe(service.config, [CheckResult(False, "down")])
        await eventually(lambda: store.value(key) is None, what="withdrawn")
        rounds = agent.status.rounds
        await eventually(lambda: agent.status.rounds >= rounds + 5, what="passing rounds")
        assert store.value(key) is None
        assert service.status.damped
        assert sample(agent, "announcer_flap_suppressed_total") == 1


async def test_shutdown_withdraws_then_drains_then_revokes() -> None:
    registrar, store = memory_registrar()
    with capture_logs() as logs:
        async with agent_on(registrar, drain="0.3") as (agent, notifier):
            await eventually(lambda: agent.registered, what="announced")
            lease = registrar.lease
    events = [e["event"] for e in logs]
    order = [events.index(e) for e in ("shutting down", "withdrawn; draining before exit")]
    assert order == sorted(order)
    assert store.data == {}  # withdrawn
    assert lease not in store.leases  # revoked
    assert store.calls[-2:] == ["write", "revoke"]  # the withdraw before the revoke, nothing after
    assert any(line.startswith("STATUS=withdrawn; draining") for line in notifier.lines)


async def test_a_stop_while_the_first_put_is_answered_still_withdraws_and_drains() -> None:
    # Found by CI under load: SIGTERM after the record reached etcd but before the agent had
    # its answer. The record was then no instance's to withdraw: no drain, and the withdraw
    # came only with the lease's revoke. It is held (put, not yet answered), so it drains.
    registrar, store = memory_registrar()
    answered = asyncio.Event()
    write = store.write

    async def first_answer_late(writes: Any, lease: int) -> list[bool]:
        happened = await write(writes, lease)
        if not answered.is_set() and any(w.is_put for w in writes):
            await answered.wait()  # applied in the store, the answer not yet back
        return happened

    store.write = first_answer_late  # type: ignore[method-assign]
    with capture_logs() as logs:
        async with agent_on(registrar, drain="0.3") as (agent, _):
            await eventually(lambda: store.data, what="the record in the store")
            assert not agent.registered  # the agent has not had the answer
        answered.set()
    events = [e["event"] for e in logs]
    assert "withdrawn; draining before exit" in events
    assert store.data == {}


async def test_etcd_is_reachable_as_soon_as_the_announce_is_answered() -> None:
    # Seen in CI under load: /healthz said registered but etcd_reachable null, while the pass
    # went on to read the keys before opening the watch. The read is held here.
    registrar, store = memory_registrar()
    read_keys, reading = store.read_keys, asyncio.Event()

    async def held_read(keys: Any) -> Any:
        await reading.wait()
        return await read_keys(keys)

    store.read_keys = held_read  # type: ignore[method-assign]
    async with agent_on(registrar) as (agent, _):
        await eventually(lambda: agent.registered, what="announced")
        assert agent.etcd_reachable is True  # before the read that opens the watch
        reading.set()
        await eventually(lambda: agent.watch.open, what="the watch opened after the read")


async def test_no_drain_when_nothing_was_announced() -> None:
    registrar, _ = memory_registrar()
    listener = SilentListener()
    listener.close()  # nothing listens: the tcp check fails, nothing is announced
    config = agent_config("http://127.0.0.1:1", listener.port, check=["tcp"], interval="0.05", timeout="0.04",
                          rise="1", fall="1", drain="30")  # fmt: skip
    agent = Agent(config, registrar=registrar, metrics=Metrics(process=False), notifier=RecordingNotifier())
    stop = asyncio.Event()
    task = asyncio.create_task(agent.serve(stop.wait()))
    await eventually(lambda: agent.status.rounds >= 2, what="failing rounds")
    stop.set()
    await asyncio.wait_for(task, 5)  # far less than the 30 s drain: there was nothing to drain


async def test_reload_keeps_replaces_and_removes_services(tmp_path: Path) -> None:
    server = await asyncio.start_server(lambda _r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]

    def host(*services: tuple[str, str]) -> Any:
        lines = ['ip = "127.0.0.1"', 'etcd_endpoints = "http://127.0.0.1:1"', "rise = 1", "fall = 1",
                 "interval = 0.05", "timeout = 0.04", 'checks = ["tcp"]']  # fmt: skip
        for name, key in services:
            lines += ["[[services]]", f'service = "{name}"', f"port = {port}", f'key = "{key}"']
        (tmp_path / "host.toml").write_text("\n".join(lines) + "\n")
        return load_config({"config": str(tmp_path / "host.toml")}, {}, AMBIENT)

    registrar, store = memory_registrar()
    agent = Agent(host(("a", "/a"), ("b", "/b")), registrar=registrar, metrics=Metrics(process=False),
                  notifier=RecordingNotifier())  # fmt: skip
    stop = asyncio.Event()
    task = asyncio.create_task(agent.serve(stop.wait()))
    try:
        await eventually(lambda: set(store.data) == {"/a", "/b"}, what="both announced")
        kept = next(s for s in agent.services if s.config.service == "a")
        revision_a = store.data["/a"].mod_revision
        agent.apply(host(("a", "/a"), ("c", "/c")))  # a kept, b removed, c added
        await eventually(lambda: set(store.data) == {"/a", "/c"}, what="b withdrawn, c announced")
        assert next(s for s in agent.services if s.config.service == "a") is kept  # the same instance
        assert store.data["/a"].mod_revision == revision_a  # left alone: no write at all
        agent.apply(host(("a", "/a2"), ("c", "/c")))  # a's key changes: a move, one transaction
        await eventually(lambda: set(store.data) == {"/a2", "/c"}, what="a moved")
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        server.close()


# -- the watch: another client's change seen at once, a steady state silent ---------------------


async def test_the_lease_ttl_is_shown_from_the_grant() -> None:
    # etcd's TTL is known from the grant: the gauge says it before the first keepalive (10 s
    # away here). It used to stay 0 until then, and CI scraped that 0 across an etcd restart.
    registrar, _ = memory_registrar(ttl=30)
    async with agent_on(registrar) as (agent, _):
        await eventually(lambda: agent.registered, what="announced")
        await eventually(lambda: sample(agent, "announcer_lease_ttl_seconds") == 30, what="the TTL shown")
        assert registrar.store.calls.count("keepalive") == 0  # type: ignore[attr-defined]


async def test_a_steady_state_asks_nothing_and_the_watch_puts_back_a_deleted_record() -> None:
    registrar, store = memory_registrar(ttl=30)  # the keepalive is 10 s away: nothing else is due
    async with agent_on(registrar) as (agent, _):
        await eventually(lambda: agent.registered and agent.watch.open, what="announced and watched")
        key = agent.services[0].config.key
        calls, rounds = len(store.calls), agent.status.rounds
        await eventually(lambda: agent.status.rounds >= rounds + 10, what="ten check rounds")
        assert store.calls[calls:] == []  # no periodic reads
        store.delete(key)
        await eventually(lambda: store.value(key) is not None, timeout=5, what="put back")
        # One look at that key (and, as it was missing, whether the lease lives), one put.
        assert store.calls[calls:] == ["range", "keepalive", "write"]
        assert agent.watch.opened == 1  # our own put came through the watch and needed nothing


async def test_a_key_another_lease_takes_is_left_to_it() -> None:
    registrar, store = memory_registrar(ttl=30)
    async with agent_on(registrar) as (agent, _):
        await eventually(lambda: agent.registered and agent.watch.open, what="announced and watched")
        key = agent.services[0].config.key
        successor, _ = await store.grant(30)
        store.put(key, b"the successor's", lease=successor)
        await eventually(lambda: not agent.registered, timeout=5, what="registered says so")
        rounds = agent.status.rounds
        await eventually(lambda: agent.status.rounds >= rounds + 10, what="ten more check rounds")
        assert store.value(key) == b"the successor's"  # no tug of war
        store.delete(key)  # the successor went: ours goes back
        await eventually(lambda: agent.registered, timeout=5, what="ours put back")


@pytest.mark.parametrize("break_with", ["broken", "compacted"])
async def test_a_broken_watch_reads_then_watches_again_and_writes_nothing(break_with: str) -> None:
    registrar, store = memory_registrar(ttl=30)
    async with agent_on(registrar) as (agent, _):
        await eventually(lambda: agent.registered and agent.watch.open, what="announced and watched")
        key = agent.services[0].config.key
        calls, revision = len(store.calls), store.revision
        if break_with == "compacted":
            store.compacted = store.revision  # the next watch must start after this
            store.break_watches(WatchCompacted("memory: compacted"))
        else:
            store.break_watches()
        # The stream is asked for once its task runs, which may be a moment after it opened.
        await eventually(
            lambda: agent.watch.opened == 2 and agent.watch.open and "watch" in store.calls[calls:],
            timeout=5, what="watched again",
        )  # fmt: skip
        assert store.calls[calls:] == ["range", "watch"]  # read first, then watch from there
        assert store.revision == revision  # nothing was written twice
        store.delete(key)
        await eventually(lambda: store.value(key) is not None, timeout=5, what="the new watch sees a delete")


# -- the retry backoff: exponential, capped, jittered, reset by a success --------------------------


@given(st.floats(0.01, 1), st.floats(1, 30), st.integers(1, 40))
def test_delays_grow_to_the_cap_with_jitter(base: float, cap: float, attempts: int) -> None:
    backoff = Backoff(base=base, cap=cap)
    for n in range(attempts):
        delay = backoff.next_delay()
        nominal = min(cap, base * 2**n)
        assert nominal / 2 <= delay <= nominal  # jitter takes at most half off, never adds


def test_reset_starts_over() -> None:
    backoff = Backoff(base=0.5, cap=8)
    for _ in range(10):
        backoff.next_delay()
    backoff.reset()
    assert backoff.next_delay() <= 0.5


async def test_the_in_process_loop_is_the_one_the_test_id_names(request: pytest.FixtureRequest) -> None:
    # This file's tests run twice, [asyncio] and [uvloop] (tests/conftest.py): each really on its loop.
    on_uvloop = type(asyncio.get_running_loop()).__module__.startswith("uvloop")
    assert on_uvloop == (request.node.callspec.id == "uvloop")
