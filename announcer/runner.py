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
from collections.abc import Callable
from dataclasses import replace
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
log = structlog.get_logger("announcer")

# What each catchable signal does. Stop: withdraw, drain, revoke, exit 0 (a second one
# exits at once with 128+N). SIGHUP reloads the configuration; SIGUSR1 logs the state.
# Every other signal that would kill the process by default is ignored, so a stray
# `kill -USR2` or an alarm can never drop the record without a withdraw. The signals of
# a real fault (SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT, SIGSYS, SIGTRAP) keep their
# default: the process is broken, and the lease TTL removes the record.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
IGNORED_SIGNALS = (
    signal.SIGUSR2, signal.SIGALRM, signal.SIGPIPE, signal.SIGVTALRM, signal.SIGPROF,
    signal.SIGIO, signal.SIGPWR, signal.SIGXCPU, signal.SIGXFSZ, signal.SIGSTKFLT,
    *range(signal.SIGRTMIN, signal.SIGRTMAX + 1),
)  # fmt: skip

Loader = Callable[[], Config]


def run_agent(config: Config, reload: Loader | None = None) -> int:
    # Bind the metrics port before anything starts: a busy port is a start-up error (exit 2).
    listen = bind(config.metrics_address) if config.metrics_address is not None else None
    if listen is not None:
        _publish_address(listen)
    asyncio.run(_serve_until_signalled(config, listen, reload))
    return EXIT_OK


async def _serve_until_signalled(config: Config, listen: socket.socket | None, reload: Loader | None) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    metrics = Metrics()  # with the default process metrics
    agent = Agent(config, metrics=metrics, notifier=Notifier(), listen=listen)

    def on_stop(signum: int) -> None:
        name = signal.Signals(signum).name
        if stop.is_set():  # a second signal: the operator means it
            log.warning(f"{name} again: exiting now without finishing the shutdown", exit_code=128 + signum)
            os._exit(128 + signum)
        log.info(f"{name}: stopping")
        stop.set()

    def on_reload() -> None:
        if reload is None or stop.is_set():
            return
        try:
            new = reload()
        except ConfigError as exc:
            metrics.reloads.labels("rejected").inc()
            log.error("reload rejected; the running configuration stays in force", error=str(exc))  # noqa: TRY400
            return
        metrics.reloads.labels("applied").inc()
        agent.apply(keep_process_settings(agent.config, new))

    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, on_stop, signum)
    loop.add_signal_handler(signal.SIGHUP, on_reload)
    loop.add_signal_handler(signal.SIGUSR1, lambda: log.info("state", **agent.describe()))
    for signum in IGNORED_SIGNALS:
        loop.add_signal_handler(signum, _ignore, signum)  # a handler, not SIG_IGN: checks inherit no change
    await agent.serve(stop.wait())


def _ignore(signum: int) -> None:
    log.debug("signal ignored", signal=signum)


# Settings a running process cannot change: they shape the etcd client, the lease, the
# listening socket and the log output. A reload that changes them says so and keeps them.
PROCESS_SETTINGS = ("etcd", "ttl", "metrics_address", "log_format", "log_level")


def keep_process_settings(old: Config, new: Config) -> Config:
    changed = [name for name in PROCESS_SETTINGS if getattr(old, name) != getattr(new, name)]
    if changed:
        log.warning("reload: these settings take effect only at a restart", settings=changed)
    return replace(new, **{name: getattr(old, name) for name in PROCESS_SETTINGS})


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
