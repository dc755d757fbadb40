"""The benchmarks: announcer side by side with the shell loop it replaces, in one run.

Each function starts what it needs (a real etcd with the v2 API on, a real HTTP
service, the contenders), measures, stops everything by PID, and returns rows for
a table: a list of dicts with the same keys.
"""

from __future__ import annotations

import os
import random
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.containers import containers
from bench.cost import cost, imports, launch, memory
from bench.harness import (
    ROOT,
    Etcd,
    HttpService,
    announcer_key,
    b64,
    etcd_and_service,
    free_port,
    loop_env,
    loop_stop_command,
    proc_stat,
    start_announcer,
    start_announcer_with,
    start_loop,
    stop_process,
    summary,
    wait_for,
    workspace,
)

Rows = list[dict[str, Any]]
LOOP_KEY = "/services/apache/127.0.0.1"


@dataclass(frozen=True)
class Mode:
    quick: bool

    @property
    def loop_sleep(self) -> float:
        # Quick mode only proves the benchmarks work: the loop sleeps 2 s, not its real 20.
        return 2.0 if self.quick else 20.0


@dataclass
class Contender:
    name: str
    exists: Callable[[], bool]
    process: subprocess.Popen[bytes]


def contenders(etcd: Etcd, service: HttpService, mode: Mode) -> list[Contender]:
    sleep = mode.loop_sleep
    loop = start_loop(etcd, service.port, sleep=sleep)
    fair = start_announcer(
        etcd,
        service.port,
        "--interval",
        str(sleep),
        "--rise",
        "1",
        "--fall",
        "1",
        service="apache-loopcadence",
    )
    default = start_announcer(etcd, service.port, service="apache-default")
    fair_key = announcer_key(service.port, "apache-loopcadence")
    default_key = announcer_key(service.port, "apache-default")
    return [
        Contender(f"loop (curl+etcdctl, sleep {sleep:g})", lambda: etcd.v2_exists(LOOP_KEY), loop),
        Contender(
            f"announcer --interval {sleep:g} --rise 1 --fall 1", lambda: etcd.v3_exists(fair_key), fair
        ),
        Contender("announcer (defaults: 2 s, rise 2, fall 2)", lambda: etcd.v3_exists(default_key), default),
    ]


def _until_all(cs: list[Contender], present: bool, started: float, cap: float) -> dict[str, float]:
    """Seconds from ``started`` until each contender's record is (not) there."""
    done: dict[str, float] = {}
    while len(done) < len(cs):
        now = time.monotonic()
        for c in cs:
            if c.name not in done and c.exists() == present:
                done[c.name] = now - started
        if now - started > cap:
            for c in cs:
                done.setdefault(c.name, float("nan"))
            break
        time.sleep(0.05)
    return done


def detection(mode: Mode) -> Rows:
    """Seconds from the service being killed to the record gone, and from its return to the record back."""
    trials = 1 if mode.quick else 6
    down: dict[str, list[float]] = {}
    up: dict[str, list[float]] = {}
    rng = random.Random(7)
    with etcd_and_service() as (etcd, service):
        cs = contenders(etcd, service, mode)
        try:
            for c in cs:
                wait_for(c.exists, 60, f"{c.name} to register")
            for _ in range(trials):
                time.sleep(rng.uniform(0, mode.loop_sleep))  # a random phase against each loop
                killed = time.monotonic()
                service.kill()
                for name, seconds in _until_all(cs, False, killed, 3 * mode.loop_sleep + 10).items():
                    down.setdefault(name, []).append(seconds)
                time.sleep(rng.uniform(0, mode.loop_sleep))
                restarted = time.monotonic()
                service.start()
                for name, seconds in _until_all(cs, True, restarted, 3 * mode.loop_sleep + 10).items():
                    up.setdefault(name, []).append(seconds)
        finally:
            for c in cs:
                stop_process(c.process)
    rows = []
    for c in cs:
        for what, data in (("dead -> withdrawn", down), ("back -> announced", up)):
            rows.append({"contender": c.name, "event": what, **_seconds(summary(data[c.name]))})
    return _with_ratio(rows, "event", "median")


def noise(mode: Mode) -> Rows:
    """etcd revisions and watch events per instance-hour while nothing changes."""
    window = 6.0 if mode.quick else 120.0  # quick: three of the loop's passes
    with etcd_and_service() as (etcd, service):
        cs = contenders(etcd, service, mode)
        try:
            for c in cs:
                wait_for(c.exists, 60, f"{c.name} to register")
            time.sleep(mode.loop_sleep)  # past the first writes
            v2_before, v3_before = etcd.v2_index(), etcd.revision()
            time.sleep(window)
            v2_writes, v3_writes = etcd.v2_index() - v2_before, etcd.revision() - v3_before
        finally:
            for c in cs:
                stop_process(c.process)
    per_hour = 3600.0 / window
    # Only the loop writes v2 keys; the two announcers share the v3 count. Every write is one
    # event for every watcher of the prefix.
    return [
        {"contender": cs[0].name, "revisions/instance-hour": v2_writes * per_hour,
         "watch events/watcher/instance-hour": v2_writes * per_hour, "window s": window},
        {"contender": "announcer (both settings)", "revisions/instance-hour": v3_writes / 2 * per_hour,
         "watch events/watcher/instance-hour": v3_writes / 2 * per_hour, "window s": window},
    ]  # fmt: skip


def shutdown(mode: Mode) -> Rows:
    """SIGTERM to record gone; and with etcd frozen, SIGTERM to exit."""
    trials = 1 if mode.quick else 5
    results: dict[str, list[float]] = {}
    with etcd_and_service() as (etcd, service):
        for _ in range(trials):
            agent = start_announcer(etcd, service.port)
            key = announcer_key(service.port)
            wait_for(lambda k=key: etcd.v3_exists(k), 30, "announce")
            t0 = time.monotonic()
            agent.send_signal(signal.SIGTERM)
            gone = wait_for(lambda k=key: not etcd.v3_exists(k), 30, "withdraw", poll=0.005)
            agent.wait(30)
            results.setdefault("announcer: SIGTERM -> record gone", []).append(gone - t0)
            results.setdefault("announcer: SIGTERM -> exit", []).append(time.monotonic() - t0)

            loop = start_loop(etcd, service.port, sleep=mode.loop_sleep)
            wait_for(lambda: etcd.v2_exists(LOOP_KEY), 30, "loop registers")
            t0 = time.monotonic()
            stop_process(loop)  # systemd: SIGTERM the loop, then run ExecStop
            subprocess.run(loop_stop_command(etcd), env=loop_env(etcd, service.port), check=False,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)  # fmt: skip
            gone = wait_for(lambda: not etcd.v2_exists(LOOP_KEY), 30, "loop's ExecStop", poll=0.005)
            results.setdefault("loop: SIGTERM + ExecStop rm -> record gone", []).append(gone - t0)

        for i in range(trials):
            # A service name per trial: the lease a frozen etcd kept need not run out first.
            name = f"frozen{i}"
            agent = start_announcer(etcd, service.port, "--shutdown-timeout", "5", service=name)
            wait_for(lambda n=name: etcd.v3_exists(announcer_key(service.port, n)), 30, "announce")
            assert etcd.process is not None
            os.kill(etcd.process.pid, signal.SIGSTOP)
            try:
                t0 = time.monotonic()
                agent.send_signal(signal.SIGTERM)
                agent.wait(60)
                results.setdefault("announcer, etcd frozen: SIGTERM -> exit", []).append(
                    time.monotonic() - t0
                )
                t0 = time.monotonic()
                try:
                    subprocess.run(loop_stop_command(etcd), env=loop_env(etcd, service.port), check=False,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)  # fmt: skip
                    elapsed = time.monotonic() - t0
                except subprocess.TimeoutExpired:
                    elapsed = float("inf")
                results.setdefault("loop, etcd frozen: ExecStop rm -> exit", []).append(elapsed)
            finally:
                os.kill(etcd.process.pid, signal.SIGCONT)
    return [{"measure": name, **_seconds(summary(values))} for name, values in results.items()]


def footprint(mode: Mode) -> Rows:
    """Memory and CPU of one agent against the loop, and what each probe costs."""
    window = 5.0 if mode.quick else 90.0
    rows: Rows = []
    with etcd_and_service() as (etcd, service):
        agents = {interval: start_announcer(etcd, service.port, "--interval", str(interval),
                                            "--timeout", str(interval / 2), service=f"fp{interval:g}")
                  for interval in (2.0, 1.0)}  # fmt: skip
        for interval in agents:
            wait_for(
                lambda i=interval: etcd.v3_exists(announcer_key(service.port, f"fp{i:g}")), 30, "announce"
            )
        before = {i: proc_stat(p.pid) for i, p in agents.items()}
        time.sleep(window)
        after = {i: proc_stat(p.pid) for i, p in agents.items()}
        for interval, process in agents.items():
            cpu = after[interval].cpu_s - before[interval].cpu_s
            probes = window / interval
            rows.append({
                "contender": f"announcer --interval {interval:g}",
                "peak RSS MB": after[interval].peak_rss_kb / 1024,
                "steady RSS MB": after[interval].rss_kb / 1024,
                "CPU s/hour": cpu * 3600 / window,
                "CPU ms/probe": 1000 * cpu / probes,
            })  # fmt: skip
            stop_process(process)
        rows.append(_loop_footprint(etcd, service, mode))
    loop_probe = rows[-1]["CPU ms/probe"]
    for row in rows[:-1]:
        # At the loop's CPU budget (one pass every 20 s), how often could announcer probe, and
        # what median detection delay would that give (fall 2: a failure lands uniformly within
        # an interval, then one more failing round: (fall - 1/2) x interval)?
        interval = 20.0 * row["CPU ms/probe"] / loop_probe
        row["interval at loop's CPU budget s"] = interval
        row["median detection at that budget s"] = 1.5 * interval
    rows[-1]["interval at loop's CPU budget s"] = 20.0
    rows[-1]["median detection at that budget s"] = 10.0  # uniform over the 20 s sleep
    return rows


def _loop_footprint(etcd: Etcd, service: HttpService, mode: Mode) -> dict[str, Any]:
    # CPU per pass: run the loop with a short sleep and count its passes by its v2 writes;
    # the shell's reaped children (curl, etcdctl) are counted in its cutime/cstime.
    burst = 2.0 if mode.quick else 20.0
    index_before = etcd.v2_index()
    loop = start_loop(etcd, service.port, sleep=0.25)
    time.sleep(burst)
    stat = proc_stat(loop.pid)
    passes = etcd.v2_index() - index_before
    stop_process(loop)
    cpu_per_pass = (stat.cpu_s + stat.children_cpu_s) / max(passes, 1)
    # The loop's memory: the shell, plus the largest child it forks each pass.
    peaks = [_child_peak_kb(cmd, etcd, service) for cmd in (
        ["curl", "-f", "-s", "-o", "/dev/null", f"http://127.0.0.1:{service.port}/"],
        [*loop_stop_command(etcd)[:1], "set", LOOP_KEY, "{}", "--ttl", "30"],
    )]  # fmt: skip
    return {
        "contender": "loop (sh + curl + etcdctl per pass, sleep 20)",
        "peak RSS MB": (stat.peak_rss_kb + max(peaks)) / 1024,
        "steady RSS MB": stat.rss_kb / 1024,
        "CPU s/hour": cpu_per_pass * 180,  # 3 passes a minute
        "CPU ms/probe": 1000 * cpu_per_pass,
    }


def _child_peak_kb(command: list[str], etcd: Etcd, service: HttpService) -> int:
    """The command's peak RSS, as GNU time reports it. Not os.wait4 from here: Linux carries
    the RSS high-water mark of the pre-exec address space across exec, and a child spawned by
    this (40 MB) process would report at least that."""
    done = subprocess.run(["/usr/bin/time", "-f", "%M", *command], env=loop_env(etcd, service.port),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False)  # fmt: skip
    return int(done.stderr.strip().rsplit("\n", 1)[-1])


def startup(mode: Mode) -> Rows:
    """Seconds from exec to the record present (interpreter and imports included)."""
    trials = 1 if mode.quick else 5
    results: dict[str, list[float]] = {}
    with etcd_and_service() as (etcd, service):
        for i in range(trials):
            for label, args in (
                ("announcer (rise 2, interval 2)", ()),
                ("announcer --rise 1", ("--rise", "1")),
            ):
                name = f"st{i}{len(args)}"
                t0 = time.monotonic()
                agent = start_announcer(etcd, service.port, *args, service=name)
                seen = wait_for(lambda n=name: etcd.v3_exists(announcer_key(service.port, n)), 30, "announce",
                                poll=0.005)  # fmt: skip
                results.setdefault(label, []).append(seen - t0)
                stop_process(agent)
            subprocess.run(loop_stop_command(etcd), env=loop_env(etcd, service.port), check=False,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
            t0 = time.monotonic()
            loop = start_loop(etcd, service.port, sleep=mode.loop_sleep)
            seen = wait_for(lambda: etcd.v2_exists(LOOP_KEY), 30, "loop registers", poll=0.005)
            results.setdefault("loop (first pass)", []).append(seen - t0)
            stop_process(loop)
    return [{"contender": name, **_seconds(summary(values))} for name, values in results.items()]


def scale(mode: Mode) -> Rows:
    """N agents against one etcd: the etcd requests they cause, their CPU and memory."""
    # Quick mode (the tests' smoke run) only shows the table is made: a 6 s TTL puts a
    # keepalive every 2 s, so a short window still sees one; the real run keeps the defaults.
    window = 3.0 if mode.quick else 60.0  # a keepalive every 10 s at the default TTL: see one
    settle = 2.5 if mode.quick else 10.0  # past the first keepalive of every agent
    ttl = ("--ttl", "6") if mode.quick else ()
    sizes = (1, 10) if mode.quick else (1, 10, 100)
    rows: Rows = []
    with etcd_and_service() as (etcd, service):
        for n in sizes:
            check = f"http://127.0.0.1:{service.port}/"
            agents = [
                start_announcer(etcd, 20000 + i, "--check", check, *ttl, service=f"scale{n}")
                for i in range(n)
            ]
            try:
                wait_for(lambda n=n: all(etcd.v3_exists(announcer_key(20000 + i, f"scale{n}")) for i in range(n)),
                         120, f"{n} agents to register", poll=0.1)  # fmt: skip
                time.sleep(settle)
                before_requests, before = etcd.grpc_requests(), [proc_stat(a.pid) for a in agents]
                time.sleep(window)
                after_requests, after = etcd.grpc_requests(), [proc_stat(a.pid) for a in agents]
            finally:
                for agent in agents:
                    agent.send_signal(signal.SIGTERM)
                for agent in agents:
                    stop_process(agent)
            rate = (after_requests - before_requests) / window
            cpu = sum(a.cpu_s - b.cpu_s for a, b in zip(after, before, strict=True))
            rows.append({
                "agents": n,
                "etcd requests/s": rate,
                "etcd requests/s per agent": rate / n,
                "agents' CPU % of one core": 100 * cpu / window,
                "agents' RSS MB": sum(a.rss_kb for a in after) / 1024,
            })  # fmt: skip
    return rows


def projection(scale_rows: Rows, ttl: float = 30.0) -> Rows:
    """What 10,000 instances cost an etcd cluster, from the measured per-agent rate."""
    instances = 10_000
    per_agent = scale_rows[-1]["etcd requests/s per agent"]
    return [
        {"contender": "loop", "arithmetic": "10,000 x 3 passes/min / 60, one v2 write (set or rm) a pass",
         "writes/s": instances * 3 / 60, "requests/s": instances * 3 / 60,
         "watch events/s per watcher": instances * 3 / 60},
        {"contender": "announcer (steady state)",
         "arithmetic": f"10,000 x (1 keepalive + 1 read) / (TTL {ttl:g}/3 s); measured {per_agent:.3f} req/s/agent",
         "writes/s": 0.0, "requests/s": instances * per_agent, "watch events/s per watcher": 0.0},
    ]  # fmt: skip


def _seconds(stats: dict[str, float]) -> dict[str, float]:
    return {("n" if k == "n" else f"{k} s"): v for k, v in stats.items()}


def _with_ratio(rows: Rows, group: str, stat: str) -> Rows:
    """announcer / loop for the same event (below 1: announcer is faster)."""
    loop = {r[group]: r.get(f"{stat} s") for r in rows if r["contender"].startswith("loop")}
    for row in rows:
        base = loop.get(row[group])
        value = row.get(f"{stat} s")
        row[f"{stat} / loop"] = value / base if base and value is not None else None
    return rows


def _gap(exists: Callable[[], bool], started: float, settle: float, cap: float) -> float:
    """Seconds the record was absent after ``started``: until it is back, or 0 when it never left.

    Polls every 5 ms; gives up ``cap`` seconds in; a record that stayed for ``settle``
    seconds after the last absence counts as back.
    """
    absent_since: float | None = None
    absent = 0.0
    last_change = started
    while True:
        now = time.monotonic()
        present = exists()
        if not present and absent_since is None:
            absent_since = now
        elif present and absent_since is not None:
            absent += now - absent_since
            absent_since, last_change = None, now
        if absent_since is None and now - last_change >= settle:
            return absent
        if now - started > cap:
            return float("inf")
        time.sleep(0.005)


def lifecycle(mode: Mode) -> Rows:
    """Seconds out of the pool on a restart against a reload; stale time after a crash with a dead service."""
    trials = 1 if mode.quick else 5
    results: dict[str, list[float]] = {}
    with etcd_and_service() as (etcd, service), workspace() as folder:
        config = folder / "announcer.toml"
        key = announcer_key(service.port)
        for trial in range(trials):
            # systemctl restart of a healthy sidekick: stop (withdraw), start, announce after rise
            config.write_text(f'meta = {{ trial = "{trial}" }}\n')
            agent = start_announcer(etcd, service.port, "--config", str(config))
            wait_for(lambda: etcd.v3_exists(key), 30, "announce")
            t0 = time.monotonic()
            stop_process(agent)
            agent = start_announcer(etcd, service.port, "--config", str(config))
            gap = _gap(lambda: etcd.v3_exists(key), t0, settle=0.5, cap=60)
            results.setdefault("announcer: systemctl restart -> seconds out of the pool", []).append(gap)
            # systemctl reload: SIGHUP with a changed record
            config.write_text(f'meta = {{ trial = "{trial}", reloaded = "yes" }}\n')
            revision = etcd.revision()
            t0 = time.monotonic()
            agent.send_signal(signal.SIGHUP)
            wait_for(lambda r=revision: etcd.revision() > r, 30, "the reloaded record")
            gap = _gap(lambda: etcd.v3_exists(key), t0, settle=1.0, cap=60)
            results.setdefault("announcer: systemctl reload -> seconds out of the pool", []).append(gap)
            stop_process(agent)

            loop = start_loop(etcd, service.port, sleep=mode.loop_sleep)
            wait_for(lambda: etcd.v2_exists(LOOP_KEY), 30, "loop registers")
            t0 = time.monotonic()
            stop_process(loop)
            subprocess.run(loop_stop_command(etcd), env=loop_env(etcd, service.port), check=False,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)  # fmt: skip
            loop = start_loop(etcd, service.port, sleep=mode.loop_sleep)
            gap = _gap(lambda: etcd.v2_exists(LOOP_KEY), t0, settle=0.5, cap=60)
            results.setdefault("loop: systemctl restart -> seconds out of the pool", []).append(gap)
            stop_process(loop)
            subprocess.run(loop_stop_command(etcd), env=loop_env(etcd, service.port), check=False,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)  # fmt: skip

        for _ in range(trials):
            # the agent is SIGKILLed and the service dies with it; systemd restarts the agent only
            agent = start_announcer(etcd, service.port)
            wait_for(lambda: etcd.v3_exists(key), 30, "announce")
            t0 = time.monotonic()
            stop_process(agent, signal.SIGKILL)
            service.kill()
            agent = start_announcer(etcd, service.port)
            gone = wait_for(lambda: not etcd.v3_exists(key), 60, "the stale record removed", poll=0.005)
            results.setdefault("announcer: crash + dead service -> record gone", []).append(gone - t0)
            stop_process(agent)
            service.start()

            loop = start_loop(etcd, service.port, sleep=mode.loop_sleep)
            wait_for(lambda: etcd.v2_exists(LOOP_KEY), 30, "loop registers")
            t0 = time.monotonic()
            stop_process(loop, signal.SIGKILL)
            service.kill()
            loop = start_loop(etcd, service.port, sleep=mode.loop_sleep)
            gone = wait_for(lambda: not etcd.v2_exists(LOOP_KEY), 60, "the loop's first pass", poll=0.005)
            results.setdefault("loop: crash + dead service -> record gone", []).append(gone - t0)
            stop_process(loop)
            service.start()
    return [{"measure": name, **_seconds(summary(values))} for name, values in results.items()]


def _registered(etcd: Etcd, prefix: str) -> int:
    end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    answer = etcd.v3("/v3/kv/range", {"key": b64(prefix), "range_end": b64(end), "count_only": True})
    return int(str(answer.get("count", 0)))


def _host_file(path: Path, etcd: Etcd, name: str, ports: list[int], checks: list[str]) -> Path:
    lines = ['ip = "127.0.0.1"', f'etcd_endpoints = "{etcd.url}"', 'log_level = "warning"']
    for port, check in zip(ports, checks, strict=True):
        lines += ["[[services]]", f'service = "{name}"', f"port = {port}", f'checks = ["{check}"]']
    path.write_text("\n".join(lines) + "\n")
    return path


def host(mode: Mode) -> Rows:
    """N services as N sidekick processes against one host-mode process: memory, CPU, etcd load, detection."""
    # Quick mode (the tests' smoke run) only shows the table is made: short windows.
    window = 2.0 if mode.quick else 60.0
    settle = 1.0 if mode.quick else 12.0
    trials = 1 if mode.quick else 8
    shapes = [(3, "sidekicks"), (3, "host"), (20, "host")] if mode.quick else \
        [(100, "sidekicks"), (100, "host"), (1000, "host")]  # fmt: skip
    # Quick: a faster cadence, so that a detection trial takes a second, not ten.
    cadence = ("--interval", "0.5", "--timeout", "0.3") if mode.quick else ()
    rows: Rows = []
    rng = random.Random(11)
    with etcd_and_service() as (etcd, service), workspace() as folder:
        victim = HttpService(folder).start()  # service 0 checks this one; it is killed to time detection
        try:
            for n, shape in shapes:
                name = f"{shape}{n}"
                ports = [21000 + i for i in range(n)]
                checks = [
                    f"http://127.0.0.1:{victim.port}/",
                    *[f"http://127.0.0.1:{service.port}/"] * (n - 1),
                ]
                if shape == "sidekicks":
                    agents = [start_announcer(etcd, port, "--check", check, *cadence, service=name)
                              for port, check in zip(ports, checks, strict=True)]  # fmt: skip
                else:
                    path = _host_file(folder / f"{name}.toml", etcd, name, ports, checks)
                    agents = [start_announcer_with(etcd, "--config", str(path), *cadence)]
                try:
                    wait_for(lambda p=f"/services/{name}/", n=n: _registered(etcd, p) == n, 300,
                             f"{n} {shape} to register", poll=0.1)  # fmt: skip
                    time.sleep(settle)  # past the first keepalives
                    before_requests, before = etcd.grpc_requests(), [proc_stat(a.pid) for a in agents]
                    time.sleep(window)
                    after_requests, after = etcd.grpc_requests(), [proc_stat(a.pid) for a in agents]
                    detections = []
                    first = announcer_key(ports[0], name)
                    for _ in range(trials):
                        time.sleep(
                            rng.uniform(0, 0.5 if mode.quick else 2.0)
                        )  # a random phase against the cadence
                        killed = time.monotonic()
                        victim.kill()
                        gone = wait_for(lambda k=first: not etcd.v3_exists(k), 60, "detection", poll=0.01)
                        detections.append(gone - killed)
                        victim.start()
                        wait_for(lambda k=first: etcd.v3_exists(k), 60, "re-announce")
                finally:
                    for agent in agents:
                        agent.send_signal(signal.SIGTERM)
                    for agent in agents:
                        stop_process(agent, timeout=60)
                rate = (after_requests - before_requests) / window
                cpu = sum(a.cpu_s - b.cpu_s for a, b in zip(after, before, strict=True))
                rows.append({
                    "shape": f"{n} {'sidekick processes' if shape == 'sidekicks' else 'services, one process'}",
                    "RSS MB": sum(a.rss_kb for a in after) / 1024,
                    "CPU % of one core": 100 * cpu / window,
                    "etcd requests/s": rate,
                    "detection p95 s": summary(detections)["p95"],
                    "10,000 hosts like this: etcd requests/s": rate * 10_000 if shape == "host" else None,
                })  # fmt: skip
        finally:
            victim.kill()
    return rows


def extras(mode: Mode) -> Rows:
    """What each check kind's driver costs: `announcer check` of a closed port, start-up and peak RSS."""
    trials = 3 if mode.quick else 10
    port = free_port()  # nothing listens: each check fails at once, so only imports and start-up count
    kinds = {
        "tcp (no extra)": f"tcp://127.0.0.1:{port}",
        "http (no extra)": f"http://127.0.0.1:{port}/",
        "postgres": f"postgresql://u@127.0.0.1:{port}/db",
        "mysql": f"mysql://u@127.0.0.1:{port}/db",
        "redis": f"redis://127.0.0.1:{port}/0",
        "grpc": f"grpc://127.0.0.1:{port}",
    }
    rows: Rows = []
    for kind, spec in kinds.items():
        seconds, peaks = [], []
        for _ in range(trials):
            started = time.monotonic()
            done = subprocess.run(
                [sys.executable, "-c", _MEASURE, "check", "--service", "x", "--port", str(port), "--ip", "127.0.0.1",
                 "--check", spec], capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
            )  # fmt: skip
            seconds.append(time.monotonic() - started)
            peaks.append(int(done.stderr.strip().rsplit(" ", 1)[-1]) / 1024)
        rows.append({"check kind": kind, "start-up to verdict, median s": summary(seconds)["median"],
                     "peak RSS MB": statistics.median(peaks)})  # fmt: skip
    base = rows[0]
    for row in rows:
        row["RSS over tcp MB"] = row["peak RSS MB"] - base["peak RSS MB"]
        row["start-up over tcp s"] = (
            row["start-up to verdict, median s"] - base["start-up to verdict, median s"]
        )
    return rows


# Runs the CLI in this interpreter, then reports its peak RSS (kB) on stderr. VmHWM, not
# getrusage's ru_maxrss: that one survives exec, so it starts at the benchmark's own size.
_MEASURE = (
    "import sys\n"
    "from announcer.cli import main\n"
    "sys.argv = ['announcer', *sys.argv[1:]]\n"
    "try:\n    main()\nexcept SystemExit:\n    pass\n"
    "hwm = next(line for line in open('/proc/self/status') if line.startswith('VmHWM'))\n"
    "sys.stderr.write(f'peak {hwm.split()[1]}')\n"
)


from bench.consumers import traefik  # noqa: E402 - the consumers' benchmark lives in its own module
from bench.fleet import fleet  # noqa: E402 - the fleet under faults lives in its own module

BENCHMARKS: dict[str, Callable[[Mode], Rows]] = {
    "detection": detection,
    "noise": noise,
    "shutdown": shutdown,
    "footprint": footprint,
    "startup": startup,
    "scale": scale,
    "lifecycle": lifecycle,
    "host": host,
    "extras": extras,
    "cost": cost,
    "memory": memory,
    "launch": launch,
    "imports": imports,
    "traefik": traefik,
    "fleet": fleet,
    "containers": containers,
}


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")  # fmt: skip
    return f"{os.cpu_count()} cores, {cpu}"
