"""A fleet against one etcd cluster: 10 host-mode processes x 1,000 services, under faults.

What one etcd cluster sees from a fleet, on loopback: a real three-member etcd 3.5
cluster, host-mode announcer processes each announcing many services (tcp checks
against a few real listeners, every 30 s, the default TTL of 30 s), and:

- cold start: time until every record is in etcd; etcd requests/s at the peak second
  and in steady state; each member's CPU and RSS in steady state;
- the leader killed: records lost (deleted, even for a moment: a watch on the prefix
  from a member that stays up sees every delete), the longest any record was missing,
  requests/s while the cluster elects a new leader;
- the whole cluster restarted (same data): records lost and records rewritten, from a
  watch that replays everything since the revision before the stop;
- the data wiped (a new cluster on the same endpoints): time until every record is
  back, the busiest second's requests (jitter spreads the fleet's retries), and the rate;
- SIGTERM to every process: time until every record is gone and every lease revoked.

Requests are etcd's own counter (grpc_server_handled_total, summed over the members;
the JSON gateway goes through gRPC), sampled every 0.2 s.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.harness import (
    ETCD_DIR,
    Etcd,
    b64,
    proc_stat,
    start_announcer_with,
    stop_process,
    wait_for,
    workspace,
)

Rows = list[dict[str, Any]]
PREFIX = "/services/fleet/"
INTERVAL = 30.0
# After a wipe every process puts its records back at once; the sync loop's jittered backoff
# spreads them. The busiest second stays under this, per 10,000 records (docs/performance.md).
BUSIEST_SECOND_BOUND = 1000


@dataclass
class Member(Etcd):
    """One member of the fleet's cluster (harness.Etcd, started as one of three)."""

    name: str = "m0"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer}"

    def launch(self, cluster: str, state: str, token: str) -> None:
        self.process = subprocess.Popen(
            [str(ETCD_DIR / "etcd"), "--name", self.name, "--data-dir", str(self.workdir / self.name),
             "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
             "--listen-peer-urls", self.peer_url, "--initial-advertise-peer-urls", self.peer_url,
             "--initial-cluster", cluster, "--initial-cluster-state", state,
             "--initial-cluster-token", token],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    @property
    def up(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def requests(self) -> float:
        with contextlib.suppress(httpx.HTTPError):
            return self.grpc_requests()
        return 0.0

    def is_leader(self) -> bool:
        try:
            status = httpx.post(self.url + "/v3/maintenance/status", json={}, timeout=2).json()
        except (httpx.HTTPError, ValueError):
            return False
        return bool(status.get("leader")) and status.get("leader") == status.get("header", {}).get(
            "member_id"
        )


class Cluster:
    def __init__(self, workdir: Path) -> None:
        self.members = [Member(workdir, name=f"m{i}") for i in range(3)]
        self._spec = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        self._token = "fleet"

    @property
    def endpoints(self) -> str:
        return ",".join(m.url for m in self.members)

    def start(self, state: str = "new") -> None:
        if state == "new":  # a new cluster's own token: a wiped one is not taken for the old
            self._token = f"fleet-{time.monotonic_ns()}"
        for member in self.members:
            if not member.up:
                member.launch(self._spec, state, self._token)
        wait_for(lambda: self.count() is not None, 60, "the etcd cluster", poll=0.1)

    def stop(self) -> None:
        for member in self.members:
            member.stop()

    def wipe(self) -> None:
        for member in self.members:
            shutil.rmtree(member.workdir / member.name, ignore_errors=True)

    def any_up(self) -> Member:
        return next(m for m in self.members if m.up)

    def count(self) -> int | None:
        """Records under the prefix, from any member that answers; None while none does."""
        for member in self.members:
            if not member.up:
                continue
            body = {"key": b64(PREFIX), "range_end": b64(PREFIX[:-1] + "0"), "count_only": True}
            with contextlib.suppress(httpx.HTTPError, ValueError):
                answer = httpx.post(member.url + "/v3/kv/range", json=body, timeout=2)
                if answer.status_code == 200:
                    return int(answer.json().get("count", 0))
        return None

    def leases(self) -> int | None:
        with contextlib.suppress(httpx.HTTPError, ValueError, StopIteration):
            answer = httpx.post(self.any_up().url + "/v3/lease/leases", json={}, timeout=2)
            return len(answer.json().get("leases") or [])
        return None

    def requests(self) -> float:
        return sum(m.requests() for m in self.members if m.up)


class RequestRate:
    """etcd's request counter over the members, sampled every 0.2 s: per-second rates."""

    def __init__(self, cluster: Cluster) -> None:
        self._cluster = cluster
        self._samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        last: dict[str, float] = {}
        total = 0.0
        while not self._stop.is_set():
            for member in self._cluster.members:
                now = member.requests() if member.up else 0.0
                before = last.get(member.name, 0.0)
                total += now - before if now >= before else now  # a restarted member counts from 0
                last[member.name] = now
            self._samples.append((time.monotonic(), total))
            self._stop.wait(0.2)

    def between(self, start: float, end: float) -> tuple[float, float]:
        """(requests/s on average, the busiest whole second's requests) between two times.

        The samples just outside the window count too: a short window (the wiped cluster's
        records can all be back in under a second) on a loaded machine may hold fewer than two
        samples of its own, and its rate would be NaN."""
        with contextlib.suppress(TimeoutError):  # the sample after the window, if one comes
            wait_for(
                lambda: bool(self._samples) and self._samples[-1][0] > end, 5, "a sample after", poll=0.05
            )
        samples = list(self._samples)
        before = [sample for sample in samples if sample[0] < start][-1:]
        after = [sample for sample in samples if sample[0] > end][:1]
        inside = before + [(t, n) for t, n in samples if start <= t <= end] + after
        if len(inside) < 2:
            return float("nan"), float("nan")
        average = (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])
        busiest = 0.0
        for i, (t, n) in enumerate(inside):
            later = next((m for u, m in inside[i:] if u >= t + 1.0), inside[-1][1])  # or what is left
            busiest = max(busiest, later - n)
        return average, busiest

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


class Gaps:
    """A watch on the prefix (from a member that stays up): when each record went and came back."""

    def __init__(self, member: Member, revision: int) -> None:
        self.gone: dict[str, float] = {}
        self.longest = 0.0
        self.deletes = 0
        self.puts = 0
        self._response: httpx.Response | None = None
        self._client = httpx.Client(timeout=httpx.Timeout(5, read=None))
        body = {"create_request": {"key": b64(PREFIX), "range_end": b64(PREFIX[:-1] + "0"),
                                   "start_revision": str(revision)}}  # fmt: skip
        self._thread = threading.Thread(target=self._run, args=(member.url, body), daemon=True)
        self._thread.start()

    def _run(self, url: str, body: dict[str, Any]) -> None:
        with (
            contextlib.suppress(httpx.HTTPError, ValueError),
            self._client.stream("POST", url + "/v3/watch", json=body) as response,
        ):
            self._response = response
            for line in response.iter_lines():
                now = time.monotonic()
                for event in (json.loads(line).get("result") or {}).get("events") or []:
                    key = event["kv"]["key"]
                    if event.get("type") == "DELETE":
                        self.deletes += 1
                        self.gone.setdefault(key, now)
                    else:
                        self.puts += 1
                        went = self.gone.pop(key, None)
                        if went is not None:
                            self.longest = max(self.longest, now - went)

    def still_gone(self, now: float) -> float:
        return max((now - t for t in self.gone.values()), default=0.0)

    def close(self) -> None:
        self._client.close()
        self._thread.join(5)


def _alive(agents: list[subprocess.Popen[bytes]]) -> bool:
    dead = [a.returncode for a in agents if a.poll() is not None]
    if dead:
        raise RuntimeError(f"announcer exited with {dead[0]}")
    return True


def _revision(member: Member) -> int:
    answer = httpx.post(member.url + "/v3/kv/range", json={"key": b64("/")}, timeout=5).json()
    return int(answer["header"]["revision"])


@contextlib.contextmanager
def _listeners(count: int) -> Iterator[list[int]]:
    """Real TCP listeners the fleet's checks connect to, each accepting and closing at once
    (a listener nobody accepts on fills its backlog, and then every check fails)."""
    sockets, stop = [], threading.Event()

    def serve(sock: socket.socket) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError, OSError):
                conn, _ = sock.accept()
                conn.close()

    for _ in range(count):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(4096)
        sock.settimeout(0.2)
        sockets.append(sock)
        threading.Thread(target=serve, args=(sock,), daemon=True).start()
    try:
        yield [int(s.getsockname()[1]) for s in sockets]
    finally:
        stop.set()
        for sock in sockets:
            sock.close()


def _host_file(
    path: Path, endpoints: str, index: int, services: int, listeners: list[int], interval: float
) -> Path:
    # rise 1: a service is announced at its first passing round; the rounds of one process's
    # services are spread over the interval, so the cold start takes about one interval.
    lines = ['ip = "127.0.0.1"', f'etcd_endpoints = "{endpoints}"', 'log_level = "warning"',
             f"interval = {interval:g}", "timeout = 1", "rise = 1"]  # fmt: skip
    for i in range(services):
        port = 20000 + index * services + i
        lines += ["[[services]]", 'service = "fleet"', f"port = {port}",
                  f'checks = ["tcp://127.0.0.1:{listeners[i % len(listeners)]}"]']  # fmt: skip
    path.write_text("\n".join(lines) + "\n")
    return path


def fleet(mode: Any) -> Rows:
    """10 host-mode processes x 1,000 services against a three-member etcd cluster, under faults."""
    processes_n, services_n = (2, 50) if mode.quick else (10, 1000)
    total = processes_n * services_n
    steady, fault_window = (3.0, 4.0) if mode.quick else (30.0, 20.0)
    interval = 2.0 if mode.quick else INTERVAL
    rows: Rows = []
    with workspace() as folder, _listeners(4) as listeners:
        cluster = Cluster(folder)
        cluster.start()
        rate = RequestRate(cluster)
        agents: list[subprocess.Popen[bytes]] = []
        try:
            # -- cold start ------------------------------------------------------
            started = time.monotonic()
            for index in range(processes_n):
                path = _host_file(
                    folder / f"host{index}.toml", cluster.endpoints, index, services_n, listeners, interval
                )
                agents.append(start_announcer_with(cluster.endpoints, "--config", str(path)))
            done = wait_for(
                lambda: _alive(agents) and cluster.count() == total, 600, f"{total} records", poll=0.2
            )
            _, peak = rate.between(started, done)
            steady_from = time.monotonic()
            cpu_before = [proc_stat(m.process.pid).cpu_s for m in cluster.members if m.process]
            time.sleep(steady)
            steady_to = time.monotonic()
            cpu_after = [proc_stat(m.process.pid) for m in cluster.members if m.process]
            steady_rate, _ = rate.between(steady_from, steady_to)
            rows.append({
                "event": f"cold start: {processes_n} processes x {services_n} services",
                "records": total, "seconds": done - started, "records lost": 0,
                "peak second's requests": peak, "requests/s": steady_rate,
                "per member CPU %": max(100 * (a.cpu_s - b) / (steady_to - steady_from)
                                        for a, b in zip(cpu_after, cpu_before, strict=True)),
                "per member RSS MB": max(a.rss_kb for a in cpu_after) / 1024,
            })  # fmt: skip
            # -- the leader killed -------------------------------------------------
            leader = next(m for m in cluster.members if m.is_leader())
            watcher_member = next(m for m in cluster.members if m is not leader)
            gaps = Gaps(watcher_member, _revision(watcher_member) + 1)
            killed = time.monotonic()
            assert leader.process is not None
            stop_process(leader.process, signal.SIGKILL)
            time.sleep(fault_window)
            end = time.monotonic()
            count = cluster.count()
            during, _ = rate.between(killed, end)
            rows.append({
                "event": "the leader killed (SIGKILL)", "records": count,
                "seconds": max(gaps.longest, gaps.still_gone(end)), "records lost": gaps.deletes,
                "requests/s": during, "note": "seconds: the longest any record was missing",
            })  # fmt: skip
            gaps.close()
            cluster.start(state="existing")  # it rejoins with its data
            # -- the whole cluster restarted ---------------------------------------
            before = _revision(cluster.any_up())
            restarted = time.monotonic()
            cluster.stop()
            cluster.start(state="existing")
            up = time.monotonic()
            gaps = Gaps(cluster.members[0], before + 1)
            time.sleep(fault_window / 2)
            count = cluster.count()
            rows.append({
                "event": "the whole cluster restarted (same data)", "records": count,
                "seconds": up - restarted, "records lost": gaps.deletes,
                "records rewritten": gaps.puts, "requests/s": rate.between(up, time.monotonic())[0],
                "note": "seconds: the cluster's own restart",
            })  # fmt: skip
            gaps.close()
            # -- the data wiped: a new cluster on the same endpoints ------------------
            cluster.stop()
            cluster.wipe()
            wiped = time.monotonic()
            cluster.start(state="new")
            up = time.monotonic()
            back = wait_for(lambda: cluster.count() == total, 300, "every record back", poll=0.1)
            time.sleep(1.0)  # the request rate settles back to keepalives
            average, busiest = rate.between(wiped, back + 1.0)
            rows.append({
                "event": "the data wiped (a new cluster, same endpoints)", "records": total,
                "seconds": back - up, "records lost": None, "peak second's requests": busiest,
                "requests/s": average, "busiest second's bound": BUSIEST_SECOND_BOUND * total / 10_000,
                "note": "requests/s: from the wipe to a second after every record "
                f"is back; seconds: from the new cluster up ({up - wiped:.1f} s after the wipe) to every record back",
            })  # fmt: skip
            # -- SIGTERM to every process -----------------------------------------------
            stopping = time.monotonic()
            for agent in agents:
                agent.send_signal(signal.SIGTERM)
            gone = wait_for(
                lambda: cluster.count() == 0 and cluster.leases() == 0, 60, "all withdrawn", poll=0.05
            )
            for agent in agents:
                stop_process(agent, timeout=30)
            rows.append({
                "event": "SIGTERM to every process", "records": 0, "seconds": gone - stopping,
                "records lost": None, "note": "seconds: until every record is gone and every lease revoked "
                "(--shutdown-timeout 5)",
            })  # fmt: skip
        finally:
            for agent in agents:
                stop_process(agent, signal.SIGKILL)
            rate.close()
            cluster.stop()
    return rows
