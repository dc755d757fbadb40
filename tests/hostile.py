"""Hostile peers for the hardening tests: an etcd gateway that lies, trickles or floods.

`HostileGateway` is a real TCP server on loopback. It forwards every request to a
real etcd, except the requests its mode picks, which it answers the way a broken
or malicious endpoint would. Everything it does is bounded: the flood stops when
the client hangs up or after FLOOD_LIMIT bytes, the trickle after 60 s.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import socket
import socketserver
import threading
import time

import httpx

FLOOD_LIMIT = 1024**3  # 1 GiB, as in the report
TRICKLE_EVERY = 0.3

# mode -> (the path it misbehaves on, or None for every path; the raw answer, or a special name)
HTML = b"<html><body><h1>It works!</h1></body></html>"


def _answer(status: str, body: bytes, content_type: str = "application/json", extra: str = "") -> bytes:
    head = f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n{extra}"
    return head.encode() + b"Connection: close\r\n\r\n" + body


MODES: dict[str, tuple[str | None, bytes | str]] = {
    "not-json": (None, _answer("200 OK", b"hello, world", "text/plain")),
    "html": (None, _answer("200 OK", HTML, "text/html")),
    "html-404": (None, _answer("404 Not Found", HTML, "text/html")),
    "json-list": (None, _answer("200 OK", b"[1, 2, 3]")),
    "json-string": (None, _answer("200 OK", b'"etcd"')),
    "empty": (None, _answer("200 OK", b"")),
    "deep-json": (None, _answer("200 OK", b"[" * 100_000 + b"]" * 100_000)),
    "gzip-lie": (None, _answer("200 OK", b'{"not": "gzip"}', extra="Content-Encoding: gzip\r\n")),
    "gzip-bomb": (None, _answer("200 OK", gzip.compress(b" " * (64 * 1024 * 1024)),
                                extra="Content-Encoding: gzip\r\n")),
    "grant-without-id": ("/v3/lease/grant", _answer("200 OK", b'{"header": {}, "TTL": "9"}')),
    "grant-id-not-a-number": ("/v3/lease/grant", _answer("200 OK", b'{"ID": "twelve", "TTL": "9"}')),
    # What the gateway sends for a keepalive while the cluster elects a leader: not a lost lease.
    "keepalive-no-leader": ("/v3/lease/keepalive", _answer("200 OK", b'{"error": {"grpc_code": 14, '
                            b'"http_code": 503, "message": "etcdserver: no leader", "http_status": "Unavailable"}}')),
    # A member that answers for a lease it cannot see: "gone", for a live lease.
    "keepalive-gone": ("/v3/lease/keepalive", _answer("200 OK", b'{"result": {"header": {}, "ID": "1"}}')),
    "keepalive-result-not-object": ("/v3/lease/keepalive", _answer("200 OK", b'{"result": "alive"}')),
    "range-bad-base64": ("/v3/kv/range", _answer("200 OK", b'{"kvs": [{"key": "%%%", "value": "!!"}]}')),
    "txn-bad-base64": ("/v3/kv/txn", _answer(
        "200 OK", b'{"succeeded": true, "responses": [{"response_range": {"kvs": [{"key": "%%"}]}}]}')),
    "txn-succeeded-not-bool": ("/v3/kv/txn", _answer("200 OK", b'{"succeeded": "yes"}')),
    "login-without-token": ("/v3/auth/authenticate", _answer("200 OK", b'{"header": {}}')),
    "error-without-code": (None, _answer("500 Internal Server Error", b'{"surprise": 1}')),
    "huge-number": ("/v3/lease/grant", _answer("200 OK", b'{"ID": "' + b"9" * 400 + b'", "TTL": "9"}')),
    "bad-status-line": (None, b"HTTP/1.1 OK-ish\r\n\r\n"),
    "hang-up": (None, "hang-up"),
    "flood": (None, "flood"),
    "trickle": (None, "trickle"),
    "shorten-ttl": ("/v3/lease/grant", "shorten-ttl"),  # forwards the grant, asking etcd for 2 s
    # The watch stream (everything else is forwarded): a stream that says nothing at all,
    # trickles its first message, floods one endless message, or sends bytes that are not
    # a watch message.
    "watch-silent": ("/v3/watch", "watch-silent"),
    "watch-trickle": ("/v3/watch", "watch-trickle"),
    "watch-flood": ("/v3/watch", "watch-flood"),
    "watch-not-json": ("/v3/watch", b"<html>\n"),
    "watch-bad-event": ("/v3/watch", b'{"result": {"created": true}}\n{"result": {"events": [{"type": "EXPLODE"}]}}\n'),
    "watch-ends": ("/v3/watch", b'{"result": {"created": true}}\n'),
}  # fmt: skip
WATCH_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


class HostileGateway:
    def __init__(self, upstream: str, mode: str) -> None:
        self.upstream = upstream
        self.mode = mode
        self.sent = 0  # bytes of hostile answers sent
        self.hostile_answers = 0
        self._stop = threading.Event()
        gateway = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                gateway._handle(self.request)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server(("127.0.0.1", 0), Handler)
        self.port = int(self._server.server_address[1])
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()

    def _handle(self, sock: socket.socket) -> None:
        sock.settimeout(10)
        try:
            path, headers, body = _read_request(sock)
        except (OSError, ValueError):
            return
        target, answer = MODES[self.mode]
        if target is not None and path != target:
            if path == "/v3/watch":
                self._forward_stream(sock, path, headers, body)
            else:
                self._forward(sock, path, headers, body)
            return
        self.hostile_answers += 1
        if answer == "shorten-ttl":
            self._forward(sock, path, headers, json.dumps({**json.loads(body), "TTL": 2}).encode())
            return
        with contextlib.suppress(OSError):
            if answer == "hang-up":
                return
            if answer == "flood":
                self._flood(sock)
            elif answer == "trickle":
                self._trickle(sock)
            elif isinstance(answer, str) and answer.startswith("watch-"):
                self._watch_stream(sock, answer)
            elif target == "/v3/watch":
                assert isinstance(answer, bytes)
                sock.sendall(WATCH_HEAD + _chunk(answer))
                if answer.endswith(b'{"created": true}}\n'):
                    sock.sendall(b"0\r\n\r\n")  # a stream that ends, as a watch never does
                else:
                    self._stop.wait(60)  # the client is to hang up on the bad bytes
            else:
                assert isinstance(answer, bytes)
                sock.sendall(answer)
                self.sent += len(answer)

    def _forward(self, sock: socket.socket, path: str, headers: dict[str, str], body: bytes) -> None:
        auth = {"Authorization": headers["authorization"]} if "authorization" in headers else {}
        try:
            reply = httpx.post(self.upstream + path, content=body, headers=auth, timeout=5)
        except httpx.HTTPError:
            return
        with contextlib.suppress(OSError):
            sock.sendall(_answer(f"{reply.status_code} X", reply.content))

    def _forward_stream(self, sock: socket.socket, path: str, headers: dict[str, str], body: bytes) -> None:
        """A streaming answer (a watch) relayed chunk by chunk, until either side hangs up."""
        auth = {"Authorization": headers["authorization"]} if "authorization" in headers else {}
        auth.update({k: v for k, v in headers.items() if k.startswith("grpc-metadata-")})
        with (
            contextlib.suppress(httpx.HTTPError, OSError),
            httpx.stream(
                "POST", self.upstream + path, content=body, headers=auth, timeout=httpx.Timeout(5, read=None)
            ) as reply,
        ):
            sock.sendall(WATCH_HEAD.replace(b"200 OK", f"{reply.status_code} X".encode()))
            for data in reply.iter_raw():
                if self._stop.is_set():
                    return
                sock.sendall(_chunk(data))

    def _watch_stream(self, sock: socket.socket, mode: str) -> None:
        sock.sendall(WATCH_HEAD)
        if mode == "watch-silent":
            self._stop.wait(60)
        elif mode == "watch-trickle":
            deadline = time.monotonic() + 60
            for byte in b'{"result": {"created": true}}\n':
                if self._stop.is_set() or time.monotonic() > deadline:
                    return
                sock.sendall(_chunk(bytes([byte])))
                self.sent += 1
                time.sleep(TRICKLE_EVERY)
        elif mode == "watch-flood":
            chunk = _chunk(b"{" * 65536)
            while self.sent < FLOOD_LIMIT and not self._stop.is_set():
                sock.sendall(chunk)  # raises once the client hangs up
                self.sent += 65536

    def _flood(self, sock: socket.socket) -> None:
        sock.sendall(
            f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {FLOOD_LIMIT}\r\n\r\n".encode()
        )
        chunk = b" " * 65536
        while self.sent < FLOOD_LIMIT and not self._stop.is_set():
            sock.sendall(chunk)  # raises once the client hangs up
            self.sent += len(chunk)

    def _trickle(self, sock: socket.socket) -> None:
        answer = _answer("200 OK", json.dumps({"ID": "1", "TTL": "9", "result": {"TTL": "9"}}).encode())
        deadline = time.monotonic() + 60
        for byte in answer:
            if self._stop.is_set() or time.monotonic() > deadline:
                return
            sock.sendall(bytes([byte]))
            self.sent += 1
            time.sleep(TRICKLE_EVERY)


def _read_request(sock: socket.socket) -> tuple[str, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ValueError("closed")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    path = lines[0].split()[1]
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return path, headers, body
