"""The process edge: signals, exit codes and the one-shot check report.

Kept apart from the agent so that nothing below it knows about signals or the
process; kept apart from the CLI so that the CLI only parses.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import structlog

from announcer import settings
from announcer.agent import Agent
from announcer.checks import CheckResult
from announcer.checks.rounds import run_round
from announcer.entry import STOPS, early_stop, release_stops
from announcer.errors import ConfigError
from announcer.http import EndpointServer, bind
from announcer.metrics import Metrics
from announcer.notify import Notifier
from announcer.registrar import Registrar
from announcer.service import ServiceAgent
from announcer.settings import Config, ServiceConfig

EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE = 0, 1, 2
log = structlog.get_logger("announcer")

# What each catchable signal does. Stop (entry.STOPS): withdraw, drain, revoke, exit 0 (a second one
# exits at once with 128+N). SIGHUP reloads the configuration; SIGUSR1 logs the state.
# Every other signal that would kill the process by default is ignored, so a stray
# `kill -USR2` or an alarm can never drop the record without a withdraw. The signals of
# a real fault (SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT, SIGSYS, SIGTRAP) keep their
# default: the process is broken, and the lease TTL removes the record.
IGNORED_SIGNALS = (
    signal.SIGUSR2, signal.SIGALRM, signal.SIGPIPE, signal.SIGVTALRM, signal.SIGPROF,
    signal.SIGIO, signal.SIGPWR, signal.SIGXCPU, signal.SIGXFSZ, signal.SIGSTKFLT,
    *range(signal.SIGRTMIN, signal.SIGRTMAX + 1),
)  # fmt: skip

Loader = Callable[[], Config]


def run_agent(config: Config, reload: Loader | None = None) -> int:
    early = early_stop()
    if early is not None:  # stopped while starting: nothing was registered, nothing to do
        log.info(f"{signal.Signals(early).name} while starting: stopping before anything was registered")
        return EXIT_OK
    # Bind the metrics port before anything starts: a busy port is a start-up error (exit 2).
    listen = bind(config.metrics_address) if config.metrics_address is not None else None
    if listen is not None:
        _publish_address(listen)
    with asyncio.Runner(loop_factory=event_loop(config.event_loop)) as runner:
        runner.run(_serve_until_signalled(config, listen, reload))
    return EXIT_OK


def event_loop(wanted: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop (libuv's loop: about a fifth less CPU per probe here) where it can be imported;
    asyncio's own where it cannot (another platform, PyPy) or when asked; the log says which."""
    if wanted == "asyncio":
        log.info("event loop: asyncio's own, as configured")
        return None
    try:
        import uvloop  # noqa: PLC0415 - the agent's loop only: check and ls run on asyncio's
    except ImportError:
        log.info("event loop: asyncio's own (uvloop cannot be imported here)")
        return None
    log.debug("event loop: uvloop")
    new_loop: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return new_loop


@contextlib.asynccontextmanager
async def build_agent(
    config: Config, *, metrics: Metrics, notifier: Notifier, listen: socket.socket | None = None
) -> AsyncIterator[Agent]:
    """The edge: every concrete part built here and handed to the agent; the client closed after."""
    # Here, not at the top: `announcer check` needs no etcd, so it does not load httpx (5 MB).
    from announcer.registrar.etcd_client import EtcdClient  # noqa: PLC0415

    client = EtcdClient(config.etcd, observe=metrics.observe_etcd)
    endpoint = None
    if listen is not None:
        if metrics.registry is None:
            raise ValueError("a metrics endpoint needs metrics built with enabled=True")
        endpoint = EndpointServer(listen, metrics.registry)
    try:
        registrar: Registrar[ServiceAgent] = Registrar(client, config.ttl)
        containers = None
        if config.containers is not None:
            from announcer.containers.engine import Engine  # noqa: PLC0415 - only with --containers
            from announcer.containers.source import ContainerSource  # noqa: PLC0415

            engine = Engine(config.containers.engine)
            containers = ContainerSource(config, engine, sweep=registrar.sweep)
        yield Agent(
            config, registrar=registrar, metrics=metrics, notifier=notifier, endpoint=endpoint,
            containers=containers,
        )  # fmt: skip
    finally:
        await client.aclose()


async def _serve_until_signalled(config: Config, listen: socket.socket | None, reload: Loader | None) -> None:
    # Without an endpoint nobody can read them: no prometheus_client at all (see metrics.py).
    metrics = Metrics(enabled=listen is not None)  # with the default process metrics
    async with build_agent(config, metrics=metrics, notifier=Notifier(), listen=listen) as agent:
        await _serve(agent, metrics, reload)


async def _serve(agent: Agent, metrics: Metrics, reload: Loader | None) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

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

    loop.add_signal_handler(signal.SIGHUP, on_reload)
    loop.add_signal_handler(signal.SIGUSR1, lambda: log.info("state", **agent.describe()))
    for signum in IGNORED_SIGNALS:
        loop.add_signal_handler(signum, _ignore, signum)  # a handler, not SIG_IGN: checks inherit no change
    listen_for_stops(loop, on_stop)
    await agent.serve(stop.wait())


def listen_for_stops(loop: asyncio.AbstractEventLoop, on_stop: Callable[[int], None]) -> None:
    """``on_stop(signum)`` for each stop signal, from now on; one held since the entry point
    (it came while announcer started) arrives now, once, like any other."""
    for signum in sorted(STOPS):
        loop.add_signal_handler(signum, on_stop, signum)
    release_stops()


def _ignore(signum: int) -> None:
    log.debug("signal ignored", signal=signum)


def keep_process_settings(old: Config, new: Config) -> Config:
    """``new`` with what a running process cannot change kept from ``old``.

    Those settings (the table's ``restart``) shape the etcd client, the lease, the
    listening socket and the log output; a reload that changes them says so and keeps them.
    """
    kept = dict.fromkeys(s.restart for s in settings.SETTINGS if s.restart is not None)
    changed = [name for name in kept if getattr(old, name) != getattr(new, name)]
    if changed:
        log.warning("reload: these settings take effect only at a restart", settings=changed)
    return replace(new, **{name: getattr(old, name) for name in kept})


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
    """Every service's checks once, concurrently (each running container's too, with
    --containers); exit 1 if any fails, or the container engine cannot be read."""

    async def every_round() -> tuple[list[ServiceConfig], list[list[CheckResult]]]:
        services = list(config.services)
        if config.containers is not None:
            from announcer.containers.source import snapshot  # noqa: PLC0415 - only with --containers

            services += await snapshot(config)
        rounds = await asyncio.gather(*(run_round(list(s.checks), s.timeout) for s in services))
        return services, list(rounds)

    try:
        services, rounds = asyncio.run(every_round())
    except ConnectionError as exc:  # the container engine: said in one line
        sys.stderr.write(f"error: {exc}\n")
        return EXIT_CHECK_FAILED
    reports = [_report(svc, results) for svc, results in zip(services, rounds, strict=True)]
    ok = all(report["ok"] for report in reports)
    if as_json:
        document: dict[str, Any] = {"ok": ok}
        if len(reports) == 1:
            document.update({k: v for k, v in reports[0].items() if k != "ok"})
        document["services"] = reports
        sys.stdout.write(json.dumps(document, indent=2) + "\n")
    else:
        sys.stdout.write("\n".join(_text_report(report) for report in reports) or "no services to check\n")
    return EXIT_OK if ok else EXIT_CHECK_FAILED


def _report(svc: ServiceConfig, results: list[CheckResult]) -> dict[str, Any]:
    return {
        "service": svc.service,
        "port": svc.port,
        "ok": all(r.ok for r in results),
        "checks": [
            {
                "name": c.name,
                "ok": r.ok,
                "duration_ms": round(r.duration * 1000, 3),
                "detail": r.detail,
                **({"pending": True} if r.pending else {}),
            }
            for c, r in zip(svc.checks, results, strict=True)
        ],
        "key": svc.key,
        **({"container": svc.origin} if svc.origin is not None else {}),
        "address": svc.ip,
        "address_from": svc.ip_source,
        "record": json.loads(svc.record.to_json()),
        "pairs": [
            {"format": p.format, "key": p.key, "value": p.value.decode("utf-8", "replace")} for p in svc.pairs
        ],
    }


def _verdict(check: dict[str, Any]) -> str:
    return "PASS" if check["ok"] else "WAIT" if check.get("pending") else "FAIL"


def _text_report(report: dict[str, Any]) -> str:
    width = max(len(check["name"]) for check in report["checks"])
    lines = [
        f"{_verdict(c)}  {c['name']:<{width}}  {c['duration_ms']:8.1f} ms  {c['detail']}"
        for c in report["checks"]
    ]
    if "container" in report:
        lines.insert(0, f"{report['service']} ({report['container']})")
    lines.append(f"address: {report['address']} ({report['address_from']})")
    if [p["format"] for p in report["pairs"]] == ["json"]:  # the classic sidekick: as it always read
        record = json.dumps(report["record"], separators=(",", ":"), ensure_ascii=False)
        lines += [f"key:    {report['key']}", f"record: {record}"]
    else:
        width = max(len(p["format"]) for p in report["pairs"])
        lines += [f"{p['format'] + ':':<{width + 1}} {p['key']} = {p['value']}" for p in report["pairs"]]
    lines.append("would announce" if report["ok"] else "would NOT announce (a check failed)")
    return "\n".join(lines) + "\n"
