"""The etcd client's reading of answers, without a server: member lists, watch messages, ranges.

The exchanges themselves are tested against real etcd (tests/test_registrar.py, test_listing.py)
and hostile gateways (tests/test_hostile.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from announcer.registrar.etcd_client import (
    EtcdProtocolError,
    EtcdUnavailable,
    WatchCompacted,
    _member_urls,
    _watch_result,
    prefix_end,
)


def member(member_id: int, *urls: str) -> dict[str, Any]:
    return {"ID": str(member_id), "name": f"m{member_id}", "clientURLs": list(urls)}


def test_member_urls_take_each_members_first_usable_url() -> None:
    answer = {
        "header": {"member_id": "1"},
        "members": [
            member(1, "http://10.0.0.1:2379", "http://10.0.0.1:4001"),
            member(2, "ftp://10.0.0.2:2379", "http://10.0.0.2:2379"),
            member(3),  # not started yet: no client URL
            member(4, "http://[::1"),  # unparsable
        ],
    }
    assert _member_urls(answer, "http://10.0.0.1:2379") == ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]


def test_a_member_advertising_loopback_is_used_where_it_was_reached() -> None:
    answer = {
        "header": {"member_id": "7"},
        "members": [member(7, "http://localhost:2379"), member(8, "http://127.0.0.1:2379")],
    }
    # Reached at 10.0.0.7: the member that answered is used there; the other's loopback
    # address would be this host's own, so it is left out.
    assert _member_urls(answer, "http://10.0.0.7:2379") == ["http://10.0.0.7:2379"]
    # Reached on loopback, loopback URLs are what they say.
    assert _member_urls(answer, "http://127.0.0.1:2379") == ["http://localhost:2379", "http://127.0.0.1:2379"]


@pytest.mark.parametrize("members", ["not a list", [1, 2], [{"clientURLs": "not a list"}]])
def test_a_malformed_member_list_is_an_error_of_that_endpoint(members: Any) -> None:
    with pytest.raises(EtcdProtocolError):
        _member_urls({"header": {"member_id": "1"}, "members": members}, "http://10.0.0.1:2379")


def test_prefix_end_covers_every_key_with_the_prefix() -> None:
    assert prefix_end("/services/") == b"/services0"
    assert prefix_end("a\xff") == "a\xff".encode()[:-1] + bytes([0xC0])
    assert prefix_end("") == b"\0"


def test_watch_messages() -> None:
    put = {"type": "PUT", "kv": {"key": "L2E=", "value": "MQ==", "lease": "5", "mod_revision": "9"}}
    revision, events = _watch_result(
        {"result": {"header": {"revision": "9"}, "events": [put, {"type": "DELETE", "kv": {"key": "L2E="}}]}},
        "e",
    )  # type: ignore[misc]
    assert revision == 9
    assert [(e.kind, e.kv.key, e.kv.value) for e in events] == [("PUT", b"/a", b"1"), ("DELETE", b"/a", None)]
    assert _watch_result({"result": {"header": {"revision": "3"}, "created": True}}, "e") is None
    with pytest.raises(WatchCompacted):
        _watch_result({"result": {"compact_revision": "40", "canceled": True}}, "e")
    for bad in (
        {"nope": 1},
        {"result": {"events": [{"type": "SMASH", "kv": {}}]}},
        {"result": {"events": "x"}},
    ):
        with pytest.raises(EtcdProtocolError):
            _watch_result(bad, "e")


async def test_a_request_is_never_cut_short_by_its_callers_cancellation() -> None:
    # A caller stopped mid-request (a loop cancelled at shutdown) stops waiting, but the
    # exchange goes on to its answer or its own deadline, and the client closes after it.
    # Cutting it short from outside landed, now and then, in httpcore's loop that closes
    # dropped connections, and left a connection to etcd unclosed (a ResourceWarning).
    import asyncio
    import json

    from announcer.registrar.etcd_client import EtcdClient
    from announcer.settings import EtcdSettings

    got_request, answered = asyncio.Event(), asyncio.Event()
    closed_early: list[bool] = []

    async def slow_member(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.lower().split(b"\r\n")
            if line.startswith(b"content-length")
        )
        await reader.readexactly(length)
        got_request.set()
        try:  # the answer comes after 0.3 s; a client that hangs up meanwhile is seen here
            closed_early.append(await asyncio.wait_for(reader.read(1), 0.3) == b"")
        except TimeoutError:
            closed_early.append(False)
        body = json.dumps({"ID": "5", "TTL": "9"}).encode()
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body)
        )
        await writer.drain()
        answered.set()
        writer.close()

    server = await asyncio.start_server(slow_member, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = EtcdClient(EtcdSettings(endpoints=(f"http://127.0.0.1:{port}",), timeout=2, discovery=False))
    try:
        caller = asyncio.create_task(client.keepalive(5))
        await asyncio.wait_for(got_request.wait(), 5)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        await client.aclose()  # waits for the exchange that is still running
        assert answered.is_set()
        assert closed_early == [False]
    finally:
        server.close()
        await server.wait_closed()


async def test_a_watch_stream_is_bounded_per_message() -> None:
    # A watch never ends, so each message is bounded: a peer that sends a line without end,
    # or a line that is not JSON, is an error of that endpoint, never memory without bound.
    from announcer.registrar.etcd_client import WATCH_MESSAGE_LIMIT, _messages

    async def messages(body: bytes) -> list[dict[str, Any]]:
        response = httpx.Response(200, stream=httpx.ByteStream(body))
        return [
            m async for m in _messages(response, "http://peer", within=5, silence=None, current=lambda: True)
        ]

    assert await messages(b'{"result": {}}\n\n{"result": {"a": 1}}\n') == [
        {"result": {}},
        {"result": {"a": 1}},
    ]
    with pytest.raises(EtcdProtocolError, match="larger than"):
        await messages(b"{" * (WATCH_MESSAGE_LIMIT + 2))
    with pytest.raises(EtcdProtocolError, match="not a JSON object"):
        await messages(b"<html>\n")


class _Stream(httpx.AsyncByteStream):
    """A streaming answer that sends ``parts`` (bytes, or a pause in seconds), then hangs."""

    def __init__(self, *parts: bytes | float) -> None:
        self.parts = parts

    async def __aiter__(self) -> AsyncIterator[bytes]:
        import asyncio

        for part in self.parts:
            if isinstance(part, bytes):
                yield part
            else:
                await asyncio.sleep(part)  # the peer's pace, not a synchronisation
        await asyncio.Event().wait()


async def _read(stream: _Stream, current: Callable[[], bool] = lambda: True) -> list[dict[str, Any]]:
    from announcer.registrar.etcd_client import _messages

    response = httpx.Response(200, stream=stream)
    got: list[dict[str, Any]] = []
    async for message in _messages(
        response, "http://peer", within=0.3, silence=0.6, current=current, check_every=0.05
    ):
        got.append(message)
    return got


async def test_a_message_begun_must_end_within_the_deadline() -> None:
    # A peer that starts a message and trickles it: an error at the deadline, not a wait without end.
    with pytest.raises(EtcdProtocolError, match=r"not whole within 0\.3s"):
        await _read(_Stream(b'{"result": {}}\n', b'{"res', 0.1, b"u", 0.1, b"l", 0.1, b"t", 0.1, b'"'))


async def test_a_silent_stream_is_broken_after_the_silence_bound() -> None:
    with pytest.raises(EtcdUnavailable, match=r"silent for 0\.6s"):
        await _read(_Stream(b'{"result": {}}\n'))


async def test_a_stream_whose_endpoint_is_no_longer_in_use_is_broken() -> None:
    moved: list[bool] = []
    with pytest.raises(EtcdUnavailable, match="moved to another endpoint"):
        await _read(
            _Stream(b'{"result": {}}\n', 0.1, b"\n"), current=lambda: not moved.append(True) and False
        )
