"""What must stay lazy, so the sidekick's memory and start-up savings cannot silently come back.

Each test runs the real CLI in a fresh interpreter and looks at what it imported by the
time it exited: metrics code only with --metrics-address, no console rendering library,
no validation framework, no driver for a check kind that is not configured, no etcd
client for `announcer check`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.servers import EtcdServer, HttpService, announce_then_stop, free_port

# Runs announcer's CLI, then writes the names of the modules it imported to argv[1].
_RUN = (
    "import atexit, json, sys\n"
    "out = sys.argv.pop(1)\n"
    "atexit.register(lambda: open(out, 'w').write(json.dumps(sorted(sys.modules))))\n"
    "from announcer.cli import main\n"
    "sys.argv[0] = 'announcer'\n"
    "main()\n"
)

NEVER = ("rich", "pydantic", "pydantic_core")  # what no configuration needs
DRIVERS = ("asyncpg", "aiomysql", "redis", "grpc", "grpc_health")


def _top_level(modules: list[str]) -> set[str]:
    return {name.partition(".")[0] for name in modules}


def _check(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    out = tmp_path / "modules.json"
    done = subprocess.run(
        [sys.executable, "-c", _RUN, str(out), "check", "--service", "x", "--ip", "127.0.0.1", *args],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    return done, _top_level(json.loads(out.read_text()))


def test_check_of_a_tcp_port_loads_only_what_it_uses(tmp_path: Path) -> None:
    port = free_port()  # nothing listens: the check fails, which is all `check` needs to report
    done, loaded = _check(tmp_path, "--port", str(port), "--check", f"tcp://127.0.0.1:{port}")
    assert done.returncode == 1, done.stderr  # the check ran and failed: nothing listens
    assert "structlog" in loaded  # it got as far as logging
    unwanted = set(NEVER) | set(DRIVERS) | {"prometheus_client", "httpx", "httpcore", "anyio", "h11", "regex"}
    assert loaded & unwanted == set()


def test_an_http_check_without_body_regex_loads_no_regex_engine(
    tmp_path: Path, http_service: HttpService
) -> None:
    done, loaded = _check(tmp_path, "--port", str(http_service.port))
    assert done.returncode == 0, done.stderr
    assert "h11" in loaded
    assert loaded & {"regex", "prometheus_client", *NEVER, *DRIVERS} == set()


def _run_agent(tmp_path: Path, etcd: EtcdServer, port: int, *extra: str) -> set[str]:
    out = tmp_path / "modules.json"
    key = f"/services/web/127.0.0.1:{port}"
    args = ["--service", "web", "--port", str(port), "--ip", "127.0.0.1", "--interval", "0.2",
            "--timeout", "0.15", "--ttl", "5", "--etcd-endpoints", etcd.url, *extra]  # fmt: skip
    announce_then_stop([sys.executable, "-c", _RUN, str(out), *args], etcd, key)
    return _top_level(json.loads(out.read_text()))


def test_an_agent_with_metrics_off_never_loads_prometheus_client(
    tmp_path: Path, etcd: EtcdServer, http_service: HttpService
) -> None:
    loaded = _run_agent(tmp_path, etcd, http_service.port)
    assert "httpx" in loaded  # the etcd client: the agent did talk to etcd
    assert loaded & {"prometheus_client", "regex", *NEVER, *DRIVERS} == set()


def test_an_agent_with_metrics_on_loads_prometheus_client_and_still_no_rich(
    tmp_path: Path, etcd: EtcdServer, http_service: HttpService
) -> None:
    loaded = _run_agent(tmp_path, etcd, http_service.port, "--metrics-address", f"127.0.0.1:{free_port()}")
    assert "prometheus_client" in loaded
    assert loaded & {*NEVER, *DRIVERS} == set()
