"""The process edge: signals, exit codes and the one-shot check report.

Kept apart from the agent so that nothing below it knows about signals or the
process; kept apart from the CLI so that the CLI only parses.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import structlog

from announcer.agent import Agent
from announcer.checks import run_round
from announcer.config import Config
from announcer.errors import ConfigError
from announcer.http import bind
from announcer.metrics import Metrics
from announcer.notify import Notifier

EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE = 0, 1, 2


def run_agent(config: Config) -> int:
    # Bind the metrics port before anything starts: a busy port is a start-up error (exit 2).
    listen = bind(config.metrics_address) if config.metrics_address is not None else None
    if listen is not None:
        _publish_address(listen)
    asyncio.run(_serve_until_signalled(config, listen))
    return EXIT_OK


async def _serve_until_signalled(config: Config, listen: socket.socket | None) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(signum: int) -> None:
        if stop.is_set():  # a second signal: the operator means it
            os._exit(128 + signum)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    metrics = Metrics()  # with the default process metrics
    await Agent(config, metrics=metrics, notifier=Notifier(), listen=listen).serve(stop.wait())


def _publish_address(listen: socket.socket) -> None:
    """Tell where /metrics is: in the log, and in $ANNOUNCER_METRICS_ADDRESS_FILE if set.

    With port 0 the kernel picks a free port; the container HEALTHCHECK reads the file.
    """
    host, port = listen.getsockname()[:2]
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    structlog.get_logger("announcer").info("metrics endpoint listening", address=address)
    path = os.environ.get("ANNOUNCER_METRICS_ADDRESS_FILE")
    if path:
        try:
            Path(path).write_text(address + "\n")
        except OSError as exc:
            raise ConfigError(f"ANNOUNCER_METRICS_ADDRESS_FILE {path}: {exc.strerror}") from None


def run_check_once(config: Config, *, as_json: bool) -> int:
    results = asyncio.run(run_round(list(config.checks), config.timeout))
    ok = all(r.ok for r in results)
    record = config.record.to_json()
    if as_json:
        report: dict[str, Any] = {
            "ok": ok,
            "checks": [
                {"name": c.name, "ok": r.ok, "duration_ms": round(r.duration * 1000, 3), "detail": r.detail}
                for c, r in zip(config.checks, results, strict=True)
            ],
            "key": config.key,
            "record": json.loads(record),
        }
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        width = max(len(c.name) for c in config.checks)
        for check, result in zip(config.checks, results, strict=True):
            verdict = "PASS" if result.ok else "FAIL"
            sys.stdout.write(
                f"{verdict}  {check.name:<{width}}  {result.duration * 1000:8.1f} ms  {result.detail}\n"
            )
        sys.stdout.write(f"key:    {config.key}\nrecord: {record}\n")
        sys.stdout.write("would announce\n" if ok else "would NOT announce (a check failed)\n")
    return EXIT_OK if ok else EXIT_CHECK_FAILED
