"""Database and command checks against the machine's real servers and real programs."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import aiomysql
import asyncpg
import pytest
import redis.asyncio

from announcer.checks import build_check
from announcer.checks.rounds import run_check
from announcer.errors import ConfigError
from announcer.health import Health
from tests.agent_helpers import agent_config, eventually, running
from tests.databases import TEST_PASSWORD, TEST_USER, mysql, postgres, postgres_checks_passwords, redis_server
from tests.servers import (
    EtcdServer,
    SilentListener,
    announcer_process,
    free_port,
    proc_stat,
    require,
    wait_until,
)

__all__ = ["mysql", "postgres", "postgres_checks_passwords", "redis_server"]  # fixtures

ROUNDS = 500


async def run(spec: str, timeout: float = 5.0, **options: Any):  # type: ignore[no-untyped-def]
    return await run_check(build_check(spec, options), timeout)


def assert_secret_absent(result: Any, check_name: str) -> None:
    assert TEST_PASSWORD not in result.detail
    assert TEST_PASSWORD not in check_name


# -- PostgreSQL ---------------------------------------------------------------------


async def test_postgres_passes(postgres: asyncpg.Connection) -> None:
    result = await run("postgresql://postgres@127.0.0.1:5432/postgres")
    assert result.ok, result.detail
    assert result.detail == "'SELECT 1' returned 1"
    assert (await run("postgres://postgres@127.0.0.1:5432/postgres", query="SELECT 40 + 2")).detail == (
        "'SELECT 40 + 2' returned 42"
    )


async def test_postgres_password_from_url_file_and_env(
    postgres_checks_passwords: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = f"postgresql://{TEST_USER}@127.0.0.1:5432/postgres"
    assert (await run(f"postgresql://{TEST_USER}:{TEST_PASSWORD}@127.0.0.1:5432/postgres")).ok
    secret = tmp_path / "pw"
    secret.write_text(TEST_PASSWORD + "\n")
    assert (await run(spec, password_file=str(secret))).ok
    monkeypatch.setenv("PGPASSWORD", TEST_PASSWORD)
    assert (await run(spec)).ok


async def test_postgres_wrong_password(postgres_checks_passwords: None) -> None:
    spec = f"postgresql://{TEST_USER}:not-{TEST_PASSWORD}@127.0.0.1:5432/postgres"
    check = build_check(spec, {})
    result = await run_check(check, 5)
    assert not result.ok
    assert result.detail.startswith("authentication failed")
    assert check.name == f"postgresql://{TEST_USER}:***@127.0.0.1:5432/postgres"
    assert f"not-{TEST_PASSWORD}" not in result.detail


async def test_postgres_database_missing(postgres: asyncpg.Connection) -> None:
    result = await run("postgresql://postgres@127.0.0.1:5432/no_such_db_here")
    assert not result.ok
    assert result.detail.startswith("database does not exist")


async def test_postgres_failing_query(postgres: asyncpg.Connection) -> None:
    result = await run("postgresql://postgres@127.0.0.1:5432/postgres", query="SELECT * FROM no_such_table")
    assert not result.ok
    assert "no_such_table" in result.detail


async def test_postgres_leaks_no_connection(postgres: asyncpg.Connection) -> None:
    before = own_connections(5432)
    check = build_check("postgresql://postgres@127.0.0.1:5432/postgres", {})
    for _ in range(ROUNDS):
        assert (await run_check(check, 5)).ok
    await _eventually_equal(lambda: own_connections(5432), before)


# -- MySQL / MariaDB -------------------------------------------------------------------


async def test_mysql_passes(mysql: aiomysql.Connection) -> None:
    result = await run("mysql://root@127.0.0.1:3306/test")
    assert result.ok, result.detail
    assert (
        await run("mariadb://root@127.0.0.1:3306/", query="SELECT 6 * 7")
    ).detail == "'SELECT 6 * 7' returned 42"


async def test_mysql_password_from_url_file_and_env(
    mysql: aiomysql.Connection, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert (await run(f"mysql://{TEST_USER}:{TEST_PASSWORD}@127.0.0.1:3306/")).ok
    secret = tmp_path / "pw"
    secret.write_text(TEST_PASSWORD)
    assert (await run(f"mysql://{TEST_USER}@127.0.0.1:3306/", password_file=str(secret))).ok
    monkeypatch.setenv("MYSQL_PWD", TEST_PASSWORD)
    assert (await run(f"mysql://{TEST_USER}@127.0.0.1:3306/")).ok


async def test_mysql_wrong_password_and_missing_database(mysql: aiomysql.Connection) -> None:
    check = build_check(f"mysql://{TEST_USER}:wrong-{TEST_PASSWORD}@127.0.0.1:3306/", {})
    result = await run_check(check, 5)
    assert not result.ok
    assert result.detail.startswith("authentication failed")
    assert_secret_absent(result, check.name)
    missing = await run("mysql://root@127.0.0.1:3306/no_such_db_here")
    assert not missing.ok
    assert missing.detail.startswith("database does not exist")


async def test_mysql_leaks_no_connection(mysql: aiomysql.Connection) -> None:
    before = own_connections(3306)
    check = build_check("mysql://root@127.0.0.1:3306/test", {})
    for _ in range(ROUNDS):
        assert (await run_check(check, 5)).ok
    await _eventually_equal(lambda: own_connections(3306), before)


# -- Redis ---------------------------------------------------------------------------------


async def test_redis_ping_and_role(redis_server: redis.asyncio.Redis) -> None:
    assert (await run("redis://127.0.0.1:6379/0")).detail == "PONG"
    role = (await redis_server.role())[0]
    role = role.decode() if isinstance(role, bytes) else role
    assert (await run("redis://127.0.0.1:6379", role=role)).ok
    other = "slave" if role == "master" else "master"
    wrong = await run("redis://127.0.0.1:6379", role=other)
    assert not wrong.ok
    assert wrong.detail == f"wrong role: {role}, wanted {other}"


async def test_redis_auth(redis_server: redis.asyncio.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    assert (await run(f"redis://{TEST_USER}:{TEST_PASSWORD}@127.0.0.1:6379")).ok
    check = build_check(f"redis://{TEST_USER}:x{TEST_PASSWORD}@127.0.0.1:6379", {})
    result = await run_check(check, 5)
    assert not result.ok
    assert result.detail.startswith("authentication failed")
    assert_secret_absent(result, check.name)
    monkeypatch.setenv("REDISCLI_AUTH", TEST_PASSWORD)
    assert (await run(f"redis://{TEST_USER}@127.0.0.1:6379")).ok


async def test_redis_leaks_no_connection(redis_server: redis.asyncio.Redis) -> None:
    before = own_connections(6379)
    check = build_check("redis://127.0.0.1:6379", {})
    for _ in range(ROUNDS):
        assert (await run_check(check, 5)).ok
    await _eventually_equal(lambda: own_connections(6379), before)


# -- the same failures for every kind -------------------------------------------------------

KINDS = [
    "postgresql://postgres@127.0.0.1:{port}/postgres",
    "mysql://root@127.0.0.1:{port}/",
    "redis://127.0.0.1:{port}",
]


@pytest.mark.parametrize("template", KINDS)
async def test_closed_port_fails_fast(template: str) -> None:
    result = await run(template.format(port=free_port()), timeout=5)
    assert not result.ok
    assert "refused" in result.detail.lower() or "connect" in result.detail.lower(), result.detail
    assert result.duration < 5  # the refusal, not the time limit


@pytest.mark.parametrize("template", KINDS)
async def test_listener_that_never_answers_fails_at_the_timeout(template: str) -> None:
    silent = SilentListener()
    try:
        result = await run(template.format(port=silent.port), timeout=0.3)
        assert not result.ok
        assert result.detail == "timed out after 0.3s"
    finally:
        silent.close()


def test_missing_driver_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for driver, kind_module, extra, spec in [
        ("asyncpg", "postgres", "postgres", "postgresql://h/db"),
        ("aiomysql", "mysql", "mysql", "mysql://h/db"),
        ("redis", "redis", "redis", "redis://h"),
    ]:
        monkeypatch.setitem(sys.modules, driver, None)  # importing it now fails: as if not installed
        monkeypatch.delitem(sys.modules, f"announcer.checks.{kind_module}", raising=False)
        with pytest.raises(ConfigError) as info:
            build_check(spec)
        assert f"pip install 'etcd-announcer[{extra}]'" in str(info.value)


def test_password_never_in_check_output(postgres_checks_passwords: None) -> None:
    spec = f"postgresql://{TEST_USER}:wrong-{TEST_PASSWORD}@127.0.0.1:5432/postgres"
    for extra in ([], ["--json"]):
        with announcer_process(
            "check", "--service", "db", "--port", "5432", "--ip", "127.0.0.1", "--check", spec, *extra
        ) as p:
            out, err = p.communicate(timeout=30)
        assert p.returncode == 1
        assert TEST_PASSWORD not in out + err
        assert "authentication failed" in out
        assert f"{TEST_USER}:***@" in out


# -- exec --------------------------------------------------------------------------------------


def script(tmp_path: Path, body: str) -> str:
    path = tmp_path / "check.sh"
    path.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return str(path)


async def test_exec_pass_and_fail(tmp_path: Path) -> None:
    passing = await run("exec:/bin/sh -c 'echo all good'")
    assert passing.ok
    assert passing.detail == "all good"
    failing = await run("exec:" + script(tmp_path, "echo 'disk full' >&2\nexit 3\n"))
    assert not failing.ok
    assert failing.detail == "exit status 3: disk full"


async def test_exec_output_is_capped(tmp_path: Path) -> None:
    result = await run("exec:" + script(tmp_path, "head -c 100000 /dev/zero | tr '\\0' x\nexit 1\n"))
    assert not result.ok
    assert len(result.detail) <= 4096 + len("exit status 1: ")


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[asyncio.subprocess.Process]:
    """Every program the exec check starts, kept for the test to look at."""
    kept: list[asyncio.subprocess.Process] = []
    spawn = asyncio.create_subprocess_exec

    async def spawn_and_keep(*args: Any, **kwargs: Any) -> asyncio.subprocess.Process:
        kept.append(await spawn(*args, **kwargs))
        return kept[-1]

    monkeypatch.setattr(asyncio, "create_subprocess_exec", spawn_and_keep)
    return kept


async def test_exec_timeout_kills_the_whole_group(
    tmp_path: Path, started: list[asyncio.subprocess.Process]
) -> None:
    program_pid, child_pid = tmp_path / "program.pid", tmp_path / "child.pid"
    program = script(
        tmp_path,
        f"""\
        trap '' TERM
        sh -c 'trap "" TERM; echo $$ > {child_pid}; exec sleep 300' &
        echo $$ > {program_pid}
        exec sleep 300
        """,
    )
    result = await run("exec:" + program, timeout=0.5)
    assert not result.ok
    assert result.detail == "timed out after 0.5s"
    # The program itself is killed and reaped before the check returns: nothing of it (not
    # even the transport asyncio holds until it sees the exit) outlives the round.
    (process,) = started
    assert process.pid == int(program_pid.read_text())
    assert process.returncode == -9
    assert not Path(f"/proc/{process.pid}").exists()
    child = int(child_pid.read_text())
    wait_until(lambda: not _alive(child), 5, "the program's child to die")


async def test_a_program_cut_short_is_reaped_by_asyncio_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, started: list[asyncio.subprocess.Process]
) -> None:
    # After the group kill, the program may already be a zombie. process.kill() goes through
    # Popen.send_signal, which polls first: that waitpid could reap the zombie behind
    # asyncio's watcher thread, which then reported an "unknown child" with exit status 255
    # (a flake under load, 1 run in 3 with three workers). Which thread wins is the kernel's
    # choice, so the test holds the decision itself: the program is never polled from the
    # loop's thread while asyncio waits for it.
    polled: list[int] = []
    poll = subprocess.Popen._internal_poll

    def spy(self: subprocess.Popen[Any], *args: Any, **kwargs: Any) -> Any:
        if self.returncode is None and threading.current_thread() is threading.main_thread():
            polled.append(self.pid)
        return poll(self, *args, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "_internal_poll", spy)
    result = await run("exec:" + script(tmp_path, "exec sleep 300\n"), timeout=0.3)
    assert result.detail == "timed out after 0.3s"
    (process,) = started
    assert process.pid not in polled
    assert process.returncode == -9  # asyncio's own watcher reaped it and saw the SIGKILL


def test_exec_bad_specs() -> None:
    for spec, message in [
        ("exec:", "needs a program"),
        ("exec:bin/true", "must be an absolute path"),
        ("exec:/nonexistent/prog", "No such file or directory"),
        ("exec:/tmp", "is not an executable file"),
        ("exec:/bin/sh -c 'unterminated", "No closing quotation"),
    ]:
        with pytest.raises(ConfigError) as info:
            build_check(spec)
        assert message in str(info.value)


def _alive(pid: int) -> bool:
    fields = proc_stat(Path(f"/proc/{pid}/stat"))
    return fields is not None and fields[0] != "Z"  # a zombie has been killed; only its reaping is left


def own_connections(port: int) -> int:
    """This process's open TCP connections to the port, from /proc: the leak tests count their
    own, not the server's (other workers' tests, and this test's run on the other event loop,
    use the same servers at the same time)."""
    inodes = set()
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):
            target = str(fd.readlink())
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    count = 0
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()  # sl local remote state ... uid timeout inode
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            if remote_port == port and fields[3] != "0A" and fields[9] in inodes:  # 0A: listening
                count += 1
    return count


async def _value(read: Any) -> Any:
    return await read if inspect.isawaitable(read) else read


async def _eventually_equal(read: Any, expected: int, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (value := await _value(read())) != expected:
        if loop.time() > deadline:
            raise AssertionError(f"connection count {value}, expected it back at {expected}")
        await asyncio.sleep(0.05)


def test_password_in_url_wins_over_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # The password environment variables are read only when the spec lacks a password.
    monkeypatch.setenv("PGPASSWORD", "from-env")
    check = build_check("postgresql://u:from-url@127.0.0.1/db", {})
    assert check.secrets == ("from-url",)  # type: ignore[attr-defined]
    assert os.environ["PGPASSWORD"] == "from-env"


async def test_agent_announces_while_postgres_answers(
    etcd: EtcdServer, postgres: asyncpg.Connection, tmp_path: Path
) -> None:
    # The check's query reads a table: dropping it makes the real check fail.
    await postgres.execute("CREATE TABLE IF NOT EXISTS announcer_e2e_ready (ok int)")
    config_file = tmp_path / "announcer.toml"
    config_file.write_text(
        '[[checks]]\nspec = "postgresql://postgres@{ip}:{port}/postgres"\n'
        'query = "SELECT count(*) FROM announcer_e2e_ready"\n'
    )
    key = "/services/web/127.0.0.1:5432"
    config = agent_config(etcd.url, 5432, config=str(config_file), interval="0.2", timeout="0.15")
    try:
        async with running(config) as agent:
            await eventually(lambda: etcd.get(key) is not None, what="announced while PostgreSQL answers")
            await postgres.execute("DROP TABLE announcer_e2e_ready")
            await eventually(lambda: etcd.get(key) is None, what="withdrawn when the check fails")
            assert agent.status.health is Health.FAILING
            assert "announcer_e2e_ready" in agent.status.results[0].detail
    finally:
        await postgres.execute("DROP TABLE IF EXISTS announcer_e2e_ready")


# -- a new connection every round ------------------------------------------------------------


class CountingProxy:
    """A TCP proxy in front of a real server that counts the connections made through it."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.accepted = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> CountingProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *args: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.append(writer)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        self._writers.append(up_writer)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.close()
                with contextlib.suppress(OSError):
                    await dst.wait_closed()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


@pytest.mark.parametrize(
    ("port", "template"),
    [
        (5432, "postgresql://postgres@127.0.0.1:{port}/postgres"),
        (3306, "mysql://root@127.0.0.1:{port}/"),
        (6379, "redis://127.0.0.1:{port}"),
        (6379, "tcp://127.0.0.1:{port}"),
    ],
    ids=["postgres", "mysql", "redis", "tcp"],
)
async def test_every_round_opens_a_new_connection(port: int, template: str) -> None:
    # A pooled or kept connection could hide a server that no longer accepts new clients.
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    except (OSError, TimeoutError) as exc:
        require(f"the database server on 127.0.0.1:{port} is not reachable ({exc})")
    writer.close()
    async with CountingProxy(port) as proxy:
        check = build_check(template.format(port=proxy.port), {})
        for round_ in range(1, 11):
            result = await run_check(check, 5)
            assert result.ok, result.detail
            assert proxy.accepted == round_
