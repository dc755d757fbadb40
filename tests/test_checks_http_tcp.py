"""HTTP and TCP checks against real servers on loopback."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import trustme

from announcer.checks import build_check
from announcer.checks.http import BODY_LIMIT
from announcer.checks.rounds import run_check, run_round
from announcer.errors import ConfigError
from tests.servers import HttpService, SilentListener, free_port


async def run(spec: str, timeout: float = 2.0, **options: Any):  # type: ignore[no-untyped-def]
    return await run_check(build_check(spec, options), timeout)


async def test_http_passes_below_400(http_service: HttpService) -> None:
    for status, ok in [(200, True), (204, True), (302, True), (404, False), (500, False), (503, False)]:
        http_service.status = status
        result = await run(http_service.url + "/")
        assert result.ok is ok, status
        assert f"HTTP {status}" in result.detail


async def test_http_status_ranges_and_body(http_service: HttpService) -> None:
    http_service.status, http_service.body = 503, b'{"status": "draining"}'
    assert (await run(http_service.url, status=[200, "500-503"])).ok
    assert not (await run(http_service.url, status=["200-299"])).ok
    http_service.status = 200
    assert (await run(http_service.url, body="draining")).ok
    lacking = await run(http_service.url, body="serving")
    assert not lacking.ok
    assert "body lacks 'serving'" in lacking.detail
    assert (await run(http_service.url, body_regex=r'"status":\s*"\w+"')).ok
    assert not (await run(http_service.url, body_regex=r"^ok$")).ok


async def test_http_method_and_headers() -> None:
    seen: dict[str, str] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            seen["method"], seen["x"] = "POST", self.headers.get("X-Probe", "")
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        assert (await run(url, method="post", headers={"X-Probe": "yes"})).ok
        assert seen == {"method": "POST", "x": "yes"}
    finally:
        server.shutdown()
        server.server_close()


async def test_refused_fails_fast() -> None:
    port = free_port()
    for spec in (f"http://127.0.0.1:{port}/", f"tcp://127.0.0.1:{port}"):
        result = await run(spec, timeout=5)
        assert not result.ok
        assert result.detail == "connection refused"
        assert result.duration < 5  # failed on the refusal, not on the time limit


async def test_silent_listener_times_out_without_delaying_others(http_service: HttpService) -> None:
    silent = SilentListener()
    try:
        checks = [build_check(f"http://127.0.0.1:{silent.port}/", {}), build_check(http_service.url, {})]
        hung, fine = await run_round(checks, timeout=0.3)
        assert not hung.ok
        assert hung.detail == "timed out after 0.3s"
        assert fine.ok
        # the round ran its checks side by side: the good one did not wait for the hung one
        assert fine.duration < hung.duration
        tcp = await run(f"tcp://127.0.0.1:{silent.port}", timeout=0.3, send="hello", expect="hi")
        assert not tcp.ok
        assert tcp.detail == "timed out after 0.3s"
    finally:
        silent.close()


@pytest.fixture
def echo_server() -> Iterator[int]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                data = conn.recv(1024)
                if data == b"PING\r\n":
                    conn.sendall(b"+PONG\r\n")

    threading.Thread(target=serve, daemon=True).start()
    yield int(listener.getsockname()[1])
    listener.close()


async def test_tcp_connect_send_expect(echo_server: int) -> None:
    url = f"tcp://127.0.0.1:{echo_server}"
    assert (await run(url)).ok
    assert (await run(url, send="PING\r\n", expect="+PONG")).ok
    wrong = await run(url, send="HELLO\r\n", expect="+PONG")
    assert not wrong.ok
    assert "closed before answering" in wrong.detail


async def test_https_with_ca_file_and_verify_off(tmp_path: Any) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(context)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: object) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    url = f"https://127.0.0.1:{server.server_address[1]}/"
    try:
        assert (await run(url, ca_file=str(ca_file))).ok
        untrusted = await run(url)
        assert not untrusted.ok
        assert "CERTIFICATE_VERIFY_FAILED" in untrusted.detail
        assert (await run(url, verify=False)).ok
    finally:
        server.shutdown()
        server.server_close()


def test_bad_options_are_config_errors(tmp_path: Any) -> None:
    for spec, options, message in [
        ("http://127.0.0.1/", {"method": "FETCH"}, "method 'FETCH'"),
        ("http://127.0.0.1/", {"status": [700]}, "not within 100-599"),
        ("http://127.0.0.1/", {"body_regex": "("}, "body_regex '(' is invalid"),
        ("http://127.0.0.1/", {"ca_file": str(tmp_path / "none.pem")}, "cannot read"),
        ("http://127.0.0.1/", {"verify": "no"}, "must be true or false"),
        ("tcp://127.0.0.1:1", {"expect": 5}, "must be a string"),
        ("tcp://127.0.0.1:1", {"sned": "x"}, "unknown tcp check option(s): sned"),
    ]:
        with pytest.raises(ConfigError, match=None) as info:
            build_check(spec, options)
        assert message in str(info.value)


async def test_a_crashing_check_is_a_failed_result() -> None:
    class Broken:
        name = "broken"

        async def __call__(self) -> Any:
            raise RuntimeError("boom")

    result = await run_check(Broken(), 1)
    assert not result.ok
    assert result.detail == "boom"


async def test_secrets_never_reach_a_detail() -> None:
    class Leaky:
        name = "leaky"
        secrets = ("s3cret",)

        async def __call__(self) -> Any:
            raise RuntimeError("login failed for postgresql://u:s3cret@h/db")

    result = await run_check(Leaky(), 1)
    assert "s3cret" not in result.detail
    assert "***" in result.detail


async def test_cancelled_round_propagates() -> None:
    silent = SilentListener()
    try:
        task = asyncio.ensure_future(run(f"tcp://127.0.0.1:{silent.port}", timeout=5, expect="x"))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        silent.close()


class KeepAliveServer:
    """An HTTP/1.1 server that would keep connections open, and counts the ones it accepts."""

    def __init__(self, body: bytes = b"ok", content_type: str = "text/plain") -> None:
        self.accepted = 0
        self.requests: list[bytes] = []
        answer = (
            f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            "Connection: keep-alive\r\n\r\n"
        ).encode() + body

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.accepted += 1
            try:
                while head := await reader.readuntil(b"\r\n\r\n"):
                    self.requests.append(head)
                    writer.write(answer)
                    await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                writer.close()

        self._serve = serve

    async def __aenter__(self) -> KeepAliveServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *args: object) -> None:
        self.server.close()


async def test_every_probe_opens_a_new_connection() -> None:
    # A kept-alive connection could hide a listener that no longer accepts: never reuse one.
    async with KeepAliveServer() as server:
        check = build_check(f"http://127.0.0.1:{server.port}/health?x=1", {"headers": {"X-Probe": "1"}})
        for _ in range(20):
            result = await run_check(check, 2.0)
            assert (result.ok, result.detail) == (True, "HTTP 200")
        assert server.accepted == 20
        first = server.requests[0].decode()
        assert first.startswith("GET /health?x=1 HTTP/1.1\r\n")
        assert f"host: 127.0.0.1:{server.port}" in first.lower()
        assert "connection: close" in first.lower()
        assert "x-probe: 1" in first.lower()


async def test_the_body_is_decoded_by_its_charset_and_read_only_so_far() -> None:
    async with KeepAliveServer("état: prêt".encode("latin-1"), "text/plain; charset=ISO-8859-1") as server:
        result = await run_check(build_check(f"http://127.0.0.1:{server.port}/", {"body": "prêt"}), 2.0)
        assert (result.ok, result.detail) == (True, "HTTP 200, body matches")
    async with KeepAliveServer(b"x" * (BODY_LIMIT + 10) + b"needle") as server:
        result = await run_check(build_check(f"http://127.0.0.1:{server.port}/", {"body": "needle"}), 2.0)
        assert not result.ok  # past the first 64 KiB: never read


async def test_not_http_is_a_clear_failure(echo_server: int) -> None:
    result = await run_check(build_check(f"http://127.0.0.1:{echo_server}/"), 1.0)
    assert not result.ok
    assert result.detail.startswith(("not an HTTP answer", "timed out"))
