"""What one sidekick costs the host, against the floor a prober cannot go below, in the same run.

- cost: CPU per probe and RSS per check kind, announcer against bare asyncio probers
  (bench/floor.py) that use the same drivers; and announcer's fixed cost per second
  (keepalive, timers), found from two intervals.
- memory: RSS at start and after the window, metrics off and on (scraped), and the floor.
- launch: exec to the first check round, and `announcer --version`.
- imports: what each layer of the start-up path adds, in MB and ms.

A Go net/http prober (what Consul's agent pays) is measured only where `go` is on
PATH; the table says when it was skipped.
"""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from bench.harness import (
    ROOT,
    Etcd,
    announcer_key,
    cpu_ns,
    etcd_and_service,
    free_port,
    proc_stat,
    start_announcer,
    stop_process,
    summary,
    wait_for,
    workspace,
)

Rows = list[dict[str, Any]]
DEFAULT_INTERVAL = 2.0
IDLE_INTERVAL = 120.0  # one probe at start: what such an agent spends is the lease and its timers
RATE_INTERVAL = 0.02  # 50 probes/s: where the probe path's own cost shows, the lease's vanishes
FLOOR = Path(__file__).resolve().parent / "floor.py"
GO_PROBER = Path(__file__).resolve().parent / "goprober" / "main.go"

# The machine's database servers (scripts/setup-test-services.sh), as announcer and the floor name them.
DATABASES = {
    "postgres": (
        "postgresql://postgres@127.0.0.1:5432/postgres",
        "postgresql://postgres@127.0.0.1:5432/postgres",
    ),
    "mysql": ("mysql://root@127.0.0.1:3306/", "127.0.0.1:3306"),
    "redis": ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
}


def _reachable(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def _prober(command: list[str]) -> subprocess.Popen[str]:
    """A floor prober (bench/floor.py or the Go one), once it says it is ready."""
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT
    )
    assert process.stdout is not None
    if process.stdout.readline().strip() != "ready":
        raise RuntimeError(f"the floor prober {command[1:3]} did not start")
    return process


def _floor(kind: str, target: str, interval: float) -> subprocess.Popen[str]:
    return _prober([sys.executable, str(FLOOR), kind, target, str(interval)])


def _go_prober(workdir: Path) -> Path | None:
    """Build the Go prober where Go is installed; None (and the table says so) where not."""
    go = shutil.which("go")
    if go is None:
        return None
    binary = workdir / "goprober"
    cache = {"GOCACHE": str(workdir / "gocache"), "HOME": os.environ.get("HOME", str(workdir))}
    subprocess.run([go, "build", "-o", str(binary), str(GO_PROBER)], check=True, capture_output=True,
                   env={**os.environ, **cache})  # fmt: skip
    return binary


def cost(mode: Any) -> Rows:
    """CPU per probe and RSS of announcer against the floor prober, per check kind, in one run."""
    window = 4.0 if mode.quick else 60.0
    with etcd_and_service() as (etcd, service), workspace() as tmp:
        kinds: dict[str, tuple[str, str]] = {
            "http": (f"http://127.0.0.1:{service.port}/", f"127.0.0.1:{service.port}"),
            "tcp": (f"tcp://127.0.0.1:{service.port}", f"127.0.0.1:{service.port}"),
        }
        skipped = []
        for kind, (spec, target) in DATABASES.items():
            port = int(spec.rsplit(":", 1)[1].split("/")[0])
            if _reachable(port):
                kinds[kind] = (spec, target)
            else:
                skipped.append(kind)
        agents: dict[tuple[str, float], subprocess.Popen[bytes]] = {}
        floors: dict[str, subprocess.Popen[Any]] = {}
        for kind, (spec, target) in kinds.items():
            for interval in (DEFAULT_INTERVAL, IDLE_INTERVAL) if kind == "http" else (DEFAULT_INTERVAL,):
                agents[kind, interval] = start_announcer(
                    etcd, service.port, "--check", spec, "--interval", str(interval),
                    "--timeout", str(min(1.0, interval / 2)), "--rise", "1" if interval == IDLE_INTERVAL else "2",
                    service=f"{kind}{interval:g}",
                )  # fmt: skip
            floors[kind] = _floor(kind, target, DEFAULT_INTERVAL)
        # At 50 probes/s: announcer on uvloop (the default) and on asyncio's own loop, the floor.
        for loop in ("uvloop", "asyncio"):
            agents[f"http50-{loop}", RATE_INTERVAL] = start_announcer(
                etcd, service.port, "--check", kinds["http"][0], "--interval", str(RATE_INTERVAL),
                "--timeout", str(RATE_INTERVAL * 0.75), "--event-loop", "auto" if loop == "uvloop" else "asyncio",
                service=f"http50-{loop}",
            )  # fmt: skip
        floors["http50"] = _floor("http", kinds["http"][1], RATE_INTERVAL)
        go = _go_prober(tmp)
        if go is not None:
            url = f"http://127.0.0.1:{service.port}/"
            floors["go"] = _prober([str(go), url, str(DEFAULT_INTERVAL)])
            floors["go50"] = _prober([str(go), url, str(RATE_INTERVAL)])
        try:
            for kind, interval in agents:
                name = kind if kind.startswith("http50") else f"{kind}{interval:g}"
                wait_for(
                    lambda n=name: etcd.v3_exists(announcer_key(service.port, n)), 30, f"{kind} announce"
                )
            time.sleep(2 * DEFAULT_INTERVAL)  # past the first rounds and the first keepalive
            every = {**{f"a:{k}:{i}": p.pid for (k, i), p in agents.items()},
                     **{f"f:{k}": p.pid for k, p in floors.items()}}  # fmt: skip
            before = {name: cpu_ns(pid) for name, pid in every.items()}
            time.sleep(window)
            spent = {name: (cpu_ns(pid) - before[name]) / 1e6 for name, pid in every.items()}  # ms
            rss_end = {name: proc_stat(pid).rss_kb / 1024 for name, pid in every.items()}
        finally:
            for process in [*agents.values(), *floors.values()]:
                stop_process(process)
    # CPU per second = probes per second x per-probe cost + a fixed cost (the lease's keepalive
    # every TTL/3, the watch, timers). An agent that probes once in two minutes (its first
    # round, before the window) spends only the fixed cost: per default interval, "the lease".
    lease = spent[f"a:http:{IDLE_INTERVAL}"] / window * DEFAULT_INTERVAL  # ms per interval
    rows: Rows = []
    probes = window / DEFAULT_INTERVAL
    for kind in kinds:
        own = spent[f"a:{kind}:{DEFAULT_INTERVAL}"] / probes
        floor = spent[f"f:{kind}"] / probes
        alone = max(0.0, own - lease)
        rows.append({
            "check kind": kind,
            "announcer CPU ms/probe, all in": own,
            "of which the lease ms": lease,
            "lease share %": 100 * lease / own if own else float("nan"),
            "probe alone ms": alone,
            "floor CPU ms/probe": floor,
            "probe alone / floor": alone / floor if floor else float("nan"),
            "announcer RSS MB": rss_end[f"a:{kind}:{DEFAULT_INTERVAL}"],
            "floor RSS MB": rss_end[f"f:{kind}"],
        })  # fmt: skip
    if "f:go" in spent:
        rows.append({"check kind": "http: Go net/http prober, keep-alives off", "floor CPU ms/probe":
                     spent["f:go"] / probes, "floor RSS MB": rss_end["f:go"]})  # fmt: skip
    else:
        print("(Go prober skipped: go is not installed here)", flush=True)
    if skipped:
        print(f"(skipped, server not reachable: {', '.join(skipped)})", flush=True)
    http = rows[0]
    http["all in / floor (goal ≤ 1.5)"] = http["announcer CPU ms/probe, all in"] / http["floor CPU ms/probe"]
    rows += _at_rate(spent, rss_end, window)
    return rows


def _at_rate(spent: dict[str, float], rss: dict[str, float], window: float) -> Rows:
    """The 50 probes/s rows: ms per probe, and each against the Go prober of the same run (goal ≤ 1)."""
    probes = window / RATE_INTERVAL
    go = spent.get("f:go50")
    contenders = {
        "http at 50/s: announcer on uvloop": f"a:http50-uvloop:{RATE_INTERVAL}",
        "http at 50/s: announcer on asyncio's loop": f"a:http50-asyncio:{RATE_INTERVAL}",
        "http at 50/s: floor (bare asyncio)": "f:http50",
        "http at 50/s: Go net/http prober": "f:go50",
    }
    rows: Rows = []
    for name, key in contenders.items():
        if key not in spent:
            continue
        rows.append({
            "check kind": name, "announcer CPU ms/probe, all in" if key.startswith("a:") else "floor CPU ms/probe":
            spent[key] / probes, "announcer RSS MB" if key.startswith("a:") else "floor RSS MB": rss[key],
            "/ Go (goal ≤ 1)": spent[key] / go if go else None,
        })  # fmt: skip
    return rows


def memory(mode: Any) -> Rows:
    """RSS one second after start and after the window: metrics off, metrics on and scraped, the floor."""
    window = 4.0 if mode.quick else 60.0
    with etcd_and_service() as (etcd, service):
        metrics_port = free_port()
        agents = {
            "announcer, metrics off": start_announcer(etcd, service.port, service="memoff"),
            "announcer, metrics on (scraped every 5 s)": start_announcer(
                etcd, service.port, "--metrics-address", f"127.0.0.1:{metrics_port}", service="memon"
            ),
        }
        floor = _floor("http", f"127.0.0.1:{service.port}", DEFAULT_INTERVAL)
        try:
            for name in ("memoff", "memon"):
                wait_for(lambda n=name: etcd.v3_exists(announcer_key(service.port, n)), 30, "announce")
            time.sleep(1.0)
            every = {
                **{name: p.pid for name, p in agents.items()},
                "floor (bare asyncio HTTP prober)": floor.pid,
            }
            start = {name: proc_stat(pid).rss_kb / 1024 for name, pid in every.items()}
            ends = time.monotonic() + window
            while time.monotonic() < ends:
                httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).raise_for_status()
                time.sleep(min(5.0, max(0.0, ends - time.monotonic())))
            end = {name: proc_stat(pid) for name, pid in every.items()}
        finally:
            everything: list[subprocess.Popen[Any]] = [*agents.values(), floor]
            for process in everything:
                stop_process(process)
    return [
        {"contender": name, "RSS MB at start": start[name], f"RSS MB after {window:g} s": end[name].rss_kb / 1024,
         "peak RSS MB": end[name].peak_rss_kb / 1024}
        for name in every
    ]  # fmt: skip


def _first_contact(command: list[str], listener: socket.socket) -> float:
    """Seconds from exec to the command's first connection to the listener (its first check)."""
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        conn, _ = listener.accept()
        seen = time.monotonic() - started
        conn.close()
    finally:
        stop_process(process)
    return seen


def launch(mode: Any) -> Rows:
    """Exec to the first check round (the first connection the service sees), and --version."""
    trials = 3 if mode.quick else 15
    with workspace() as tmp, socket.socket() as listener:
        etcd = Etcd(tmp).start()
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        listener.settimeout(30)
        port = listener.getsockname()[1]
        commands = {
            "announcer (tcp check) to its first check": [
                sys.executable, "-m", "announcer", "--service", "launch", "--port", str(port), "--ip", "127.0.0.1",
                "--check", "tcp", "--etcd-endpoints", etcd.url, "--log-level", "warning"],
            "announcer (http check) to its first check": [
                sys.executable, "-m", "announcer", "--service", "launch", "--port", str(port), "--ip", "127.0.0.1",
                "--etcd-endpoints", etcd.url, "--log-level", "warning"],
            "floor (bare asyncio) to its first probe": [
                sys.executable, str(FLOOR), "tcp", f"127.0.0.1:{port}", "2"],
        }  # fmt: skip
        results: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(trials):
            for name, command in commands.items():
                results[name].append(_first_contact(command, listener))
        etcd.stop()
    version: list[float] = []
    for _ in range(trials):
        started = time.monotonic()
        subprocess.run(
            [sys.executable, "-m", "announcer", "--version"], check=True, capture_output=True, cwd=ROOT
        )
        version.append(time.monotonic() - started)
    results["announcer --version"] = version
    interpreter: list[float] = []
    for _ in range(trials):
        started = time.monotonic()
        subprocess.run([sys.executable, "-c", "pass"], check=True, cwd=ROOT)
        interpreter.append(time.monotonic() - started)
    results["python -c pass (the interpreter alone)"] = interpreter
    return [{"measure": name, **{f"{k} s" if k != "n" else k: v for k, v in summary(values).items()}}
            for name, values in results.items()]  # fmt: skip


# What the agent's start-up path imports, layer by layer, in the order it imports them.
LAYERS = (
    ("asyncio, ssl (the floor prober's own cost)", "asyncio, ssl"),
    ("structlog (without rich)", "announcer.log"),
    ("typer (0.28: no pydantic)", "typer"),
    (
        "announcer: CLI, config, agent, checks",
        "announcer.cli, announcer.config, announcer.runner, announcer.agent",
    ),
    ("the event loop: uvloop", "uvloop"),
    ("etcd client: httpx, httpcore, anyio", "announcer.registrar.etcd_client"),
    ("http check: h11", "announcer.checks.http"),
    ("metrics on: prometheus_client", "announcer.metrics, prometheus_client, prometheus_client.gc_collector"),
)
_LAYERED = (
    "import json, sys, time\n"
    "def rss():\n"
    "    return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1])\n"
    "out = [('interpreter', rss(), 0.0)]\n"
    "for name, modules in json.loads(sys.argv[1]):\n"
    "    t = time.perf_counter()\n"
    "    for m in modules.split(', '):\n"
    "        __import__(m)\n"
    "    out.append((name, rss(), time.perf_counter() - t))\n"
    "print(json.dumps(out))\n"
)


def imports(mode: Any) -> Rows:
    """What each layer of the start-up path adds to a bare interpreter: MB of RSS, ms of import."""
    import json

    trials = 3 if mode.quick else 9
    runs = []
    for _ in range(trials):
        done = subprocess.run([sys.executable, "-c", _LAYERED, json.dumps(LAYERS)], check=True,
                              capture_output=True, text=True, cwd=ROOT)  # fmt: skip
        runs.append(json.loads(done.stdout))
    rows: Rows = []
    for i, (name, _, _) in enumerate(runs[0]):
        total = statistics.median(run[i][1] for run in runs) / 1024
        added = total - (statistics.median(run[i - 1][1] for run in runs) / 1024 if i else 0.0)
        rows.append({"layer": name, "adds MB": added, "RSS MB so far": total,
                     "adds ms": 1000 * statistics.median(run[i][2] for run in runs)})  # fmt: skip
    return rows
