"""A small async client for etcd's v3 JSON gateway (``/v3/...``), over httpx.

What it must respect, as measured on etcd 3.4 and 3.5: keys and values are
base64; 64-bit numbers arrive as strings and zero values are left out; a
keepalive on a lost lease is a 200 answer without a positive TTL; a put on a
dead lease is HTTP 404 with gRPC code 5; the auth token goes bare in the
``Authorization`` header and expires (code 16 means: log in again); several
endpoints mean trying the next one on connect errors and deadlines.

Every endpoint is a peer that may send anything: each request (connect, send,
and the whole answer) is bounded by the deadline, each answer by
``ANSWER_LIMIT`` bytes, and an answer that is not what etcd sends (not JSON,
not an object, a field missing or of the wrong type, bad base64) is an error of
that endpoint, so the next endpoint is tried, never an exception of ours.
Values read back are bytes: any client may have written any bytes at a key.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import ipaddress
import json
import ssl
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
import structlog

from announcer.errors import EtcdError, EtcdUnavailable, LeaseNotFound, WatchCompacted, describe
from announcer.redact import redact_url
from announcer.registrar.store import KeyValue, WatchEvent, Write
from announcer.settings import EtcdSettings

# gRPC status codes that etcd's gateway puts in its error bodies.
INVALID_ARGUMENT = 3
NOT_FOUND = 5
PERMISSION_DENIED = 7
UNAVAILABLE = 14
UNAUTHENTICATED = 16
# Answers that say "this member cannot serve you now; another one may".
_TRY_ANOTHER_MEMBER = frozenset({UNAVAILABLE, 4, 1})  # unavailable, deadline, cancelled
__all__ = [
    "EtcdAuthError",
    "EtcdClient",
    "EtcdError",
    "EtcdProtocolError",
    "EtcdSettings",
    "EtcdUnavailable",
    "KeyValue",
    "LeaseNotFound",
    "Txn",
    "WatchCompacted",
    "WatchEvent",
]  # fmt: skip

# The most announcer reads of one answer. Its own requests are small (a lease, one
# key without its value); a larger answer is an endpoint misbehaving.
ANSWER_LIMIT = 1024 * 1024
# A watch never ends, so it is bounded per message: one event batch larger than this,
# or bytes that are not a watch message, is an error of that endpoint.
WATCH_MESSAGE_LIMIT = 1024 * 1024
# A watch that says nothing for this long is taken for broken and opened again (after a
# read). announcer asks for progress notifications, which etcd sends an idle watch every
# 10 minutes by default, so a healthy stream is never this silent. Between them the
# stream is held to the endpoint the other requests use: after a failover (the keepalive,
# every TTL/3, found its member gone) it moves too; and a member cut off from its leader
# ends it (the gateway passes ``hasleader``, as etcd's own client asks with WithRequireLeader).
WATCH_SILENCE = 660.0
LIST_LIMIT = 5000  # keys one `announcer ls` shows; more is a prefix to narrow


class EtcdProtocolError(EtcdUnavailable):
    """An endpoint answered, but not as etcd's v3 gateway answers: try another one."""


class EtcdAuthError(EtcdError):
    """Wrong user or password, or the user may not do this."""


def _b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


@dataclass(frozen=True, slots=True)
class Txn:
    """A transaction's compares and operations, in the gateway's JSON form."""

    compare: list[dict[str, Any]] = field(default_factory=list)
    success: list[dict[str, Any]] = field(default_factory=list)
    failure: list[dict[str, Any]] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {"compare": self.compare, "success": self.success, "failure": self.failure}


def compare_lease(key: str, lease: int) -> dict[str, Any]:
    return {"key": _b64(key), "target": "LEASE", "result": "EQUAL", "lease": str(lease)}


def compare_value(key: str, value: bytes) -> dict[str, Any]:
    return {"key": _b64(key), "target": "VALUE", "result": "EQUAL", "value": _b64(value)}


def compare_mod_revision(key: str, revision: int) -> dict[str, Any]:
    return {"key": _b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": str(revision)}


def op_put(key: str, value: bytes, lease: int) -> dict[str, Any]:
    return {"request_put": {"key": _b64(key), "value": _b64(value), "lease": str(lease)}}


def op_delete(key: str) -> dict[str, Any]:
    return {"request_delete_range": {"key": _b64(key)}}


def _guarded(write: Write, lease: int) -> Txn:
    if write.value is None:
        return Txn([compare_lease(write.key, lease)], [op_delete(write.key)])
    put = op_put(write.key, write.value, lease)
    return Txn([compare_value(write.key, write.value), compare_lease(write.key, lease)], [], [put])


Observer = Callable[[str, str, float], None]  # operation, outcome, seconds
T = TypeVar("T")
Parser = Callable[[dict[str, Any], str], T]  # an answer and its endpoint -> the verb's value


def _whole(answer: dict[str, Any], _endpoint: str) -> dict[str, Any]:
    return answer


def _ignore(_operation: str, _outcome: str, _seconds: float) -> None:
    return None


# How long an idle connection to etcd is kept for the next request. httpx's default (5 s)
# is shorter than the keepalive period (TTL/3, 10 s by default), so every keepalive
# paid a new TCP connection; kept, a keepalive costs about half the CPU. A member that
# closed or lost it is noticed by httpcore before reuse, and the whole-request deadline
# (with failover) still bounds a member that hangs on one.
KEEP_CONNECTION = 120.0


class EtcdClient:
    """The calls announcer needs, each a single gateway request with failover."""

    def __init__(
        self,
        settings: EtcdSettings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        observe: Observer = _ignore,
    ) -> None:
        self._settings = settings
        self._endpoints = [e.rstrip("/") for e in settings.endpoints]
        self._configured = list(self._endpoints)
        self._current = 0
        # Learn the cluster's members at the first answer, and again after each failover.
        self._members_due = settings.discovery
        self._said: set[str] = set()  # discovery warnings already logged
        self._token: str | None = None
        self._observe = observe
        self._transport = transport
        # Bad TLS files are a start-up error (exit 2), so the context is made now.
        context = settings.ssl_context()
        uses_tls = any(e.startswith("https:") for e in self._endpoints)
        # Plain-HTTP endpoints need no CA bundle: loading one costs memory and start-up time.
        self._verify: ssl.SSLContext | bool = context if context is not None else uses_tls
        self._http_client: httpx.AsyncClient | None = None
        self._inflight: set[asyncio.Future[tuple[int, dict[str, Any]]]] = set()

    @property
    def _http(self) -> httpx.AsyncClient:
        """Made at the first request: until the service first passes its checks, etcd is not
        asked anything, and an httpx client's first construction loads httpcore (about 25 ms,
        which would otherwise sit between exec and the first check round)."""
        if self._http_client is None:
            self._http_client = httpx.AsyncClient(
                # The deadline of a whole request is enforced around it (see _post); this one
                # only makes httpx give up on a phase no later than that.
                timeout=httpx.Timeout(self._settings.timeout),
                verify=self._verify,
                limits=httpx.Limits(keepalive_expiry=KEEP_CONNECTION),
                transport=self._transport,
                trust_env=False,
                headers={"Accept-Encoding": "identity"},
            )
        return self._http_client

    @property
    def endpoint(self) -> str:
        return self._endpoints[self._current]

    @property
    def endpoints(self) -> tuple[str, ...]:
        """Every endpoint a request may try: those given, then the members discovered."""
        return tuple(self._endpoints)

    async def aclose(self) -> None:
        """Close the connections, once the requests still running (each within its deadline) end."""
        if self._inflight:
            await asyncio.wait(set(self._inflight), timeout=self._settings.timeout + 1.0)
        if self._http_client is not None:
            await self._http_client.aclose()

    # -- the verbs -----------------------------------------------------------

    async def grant(self, ttl: int) -> tuple[int, int]:
        """A new lease: its ID and the TTL etcd granted (which may differ from ``ttl``)."""

        def parse(answer: dict[str, Any], endpoint: str) -> tuple[int, int]:
            lease = _number(answer, "ID", endpoint)
            if lease <= 0:
                raise EtcdProtocolError(f"{redact_url(endpoint)}: a lease grant without a lease ID")
            return lease, _number(answer, "TTL", endpoint, default=ttl)

        return await self._call("lease_grant", "/v3/lease/grant", {"TTL": ttl}, parse)

    async def keepalive(self, lease: int) -> int:
        """The TTL etcd reset the lease to; 0 or less means the lease is gone."""

        def parse(answer: dict[str, Any], endpoint: str) -> int:
            # A lost lease is a result without a TTL; an error (no leader during an election)
            # comes, as on every streaming call of the gateway, as 200 with an error object.
            _raise_stream_error(answer, redact_url(endpoint))
            result = answer.get("result", {})
            if not isinstance(result, Mapping):
                raise EtcdProtocolError(f"{redact_url(endpoint)}: a keepalive answer without a result object")
            return _number(result, "TTL", endpoint, default=0)

        body = {"ID": str(lease)}
        ttl = await self._call("keepalive", "/v3/lease/keepalive", body, parse)
        if ttl <= 0 and len(self._endpoints) > 1:
            # Believed, "gone" drops every record to put them back on a new lease: another
            # member is asked first. CI's failover test under load twice saw a live lease
            # taken for gone as its member stopped (not reproduced alone).
            self._current = (self._current + 1) % len(self._endpoints)
            ttl = await self._call("keepalive", "/v3/lease/keepalive", body, parse)
        return ttl

    async def revoke(self, lease: int) -> bool:
        """True when the lease existed and is now revoked."""
        try:
            await self._call("revoke", "/v3/lease/revoke", {"ID": str(lease)}, _whole)
        except LeaseNotFound:
            return False
        return True

    async def put(self, key: str, value: bytes, lease: int) -> int:
        body = {"key": _b64(key), "value": _b64(value), "lease": str(lease)}
        return await self._call("put", "/v3/kv/put", body, _revision)

    async def get(self, key: str, *, keys_only: bool = False) -> KeyValue | None:
        body: dict[str, Any] = {"key": _b64(key)}
        if keys_only:
            body["keys_only"] = True

        def parse(answer: dict[str, Any], endpoint: str) -> KeyValue | None:
            kvs = _list(answer, "kvs", endpoint)
            return _key_value(kvs[0], endpoint, with_value=not keys_only) if kvs else None

        return await self._call("range", "/v3/kv/range", body, parse)

    async def get_many(self, keys: list[str], *, keys_only: bool = False) -> list[KeyValue | None]:
        """Several keys read in one transaction (one request, one revision), in order."""
        if len(keys) == 1:
            return [await self.get(keys[0], keys_only=keys_only)]
        return (await self._read(keys, keys_only=keys_only))[1]

    async def read_keys(self, keys: Sequence[str]) -> tuple[int, list[KeyValue | None]]:
        """Several keys, without their values, read at one revision: (the revision, what was found)."""
        return await self._read(keys, keys_only=True)

    async def _read(self, keys: Sequence[str], *, keys_only: bool) -> tuple[int, list[KeyValue | None]]:
        ops = [{"request_range": {"key": _b64(key), "keys_only": keys_only}} for key in keys]

        def parse(answer: dict[str, Any], endpoint: str) -> tuple[int, list[KeyValue | None]]:
            responses = _list(answer, "responses", endpoint)
            if len(responses) != len(keys):
                raise EtcdProtocolError(
                    f"{redact_url(endpoint)}: a txn answer with {len(responses)} of {len(keys)} reads"
                )
            found: list[KeyValue | None] = []
            for response in responses:
                ranged = response.get("response_range") if isinstance(response, Mapping) else None
                if not isinstance(ranged, Mapping):
                    raise EtcdProtocolError(
                        f"{redact_url(endpoint)}: a txn answer without its range response"
                    )
                kvs = _list(ranged, "kvs", endpoint)
                found.append(_key_value(kvs[0], endpoint, with_value=not keys_only) if kvs else None)
            return _revision(answer, endpoint), found

        return await self._call("range", "/v3/kv/txn", {"success": ops}, parse)

    async def list_prefix(
        self, prefix: str, limit: int = LIST_LIMIT, *, start: str | None = None
    ) -> tuple[int, list[KeyValue], bool]:
        """Every key under ``prefix`` (from ``start`` on) with its value, sorted:
        (revision, key-values, more left)."""
        body = {
            "key": _b64(start if start is not None else prefix), "range_end": _b64(prefix_end(prefix)),
            "limit": str(limit), "sort_order": "ASCEND", "sort_target": "KEY",
        }  # fmt: skip

        def parse(answer: dict[str, Any], endpoint: str) -> tuple[int, list[KeyValue], bool]:
            kvs = [_key_value(kv, endpoint, with_value=True) for kv in _list(answer, "kvs", endpoint)]
            return _revision(answer, endpoint), kvs, bool(answer.get("more", False))

        return await self._call("range", "/v3/kv/range", body, parse)

    async def time_left(self, lease: int) -> int:
        """Seconds the lease has left; -1 when it does not exist."""
        return await self._call(
            "timetolive", "/v3/lease/timetolive", {"ID": str(lease)},
            lambda answer, endpoint: _number(answer, "TTL", endpoint, default=-1),
        )  # fmt: skip

    def watch_prefix(self, prefix: str, start_revision: int) -> AsyncIterator[tuple[int, list[WatchEvent]]]:
        """The changes under ``prefix`` from ``start_revision`` on: (revision, events), as they come.

        One streaming request to the current endpoint; it ends with an exception when the
        stream breaks (EtcdUnavailable), misbehaves (EtcdProtocolError) or the revision was
        compacted (WatchCompacted): the caller reads again and watches from there.
        """
        request = {
            "key": _b64(prefix),
            "range_end": _b64(prefix_end(prefix)),
            "start_revision": str(start_revision),
        }
        return self._watch([request], silence=None)

    async def watch(self, keys: Sequence[str], start_revision: int) -> AsyncIterator[list[WatchEvent]]:
        """Every change to ``keys`` (each watched exactly) from ``start_revision`` on, as it comes.

        One stream carries them all: the gateway reads one ``create_request`` after another
        from the body. Bounded like every answer (see WATCH_SILENCE and _messages).
        """
        requests = [
            {"key": _b64(key), "start_revision": str(start_revision), "progress_notify": True} for key in keys
        ]
        started = time.perf_counter()
        try:
            async for _, events in self._watch(requests, silence=WATCH_SILENCE):
                yield events
        except EtcdError as exc:  # a stream only ever ends broken: counted, by how
            self._observe("watch", _outcome(exc), time.perf_counter() - started)
            raise

    async def _watch(
        self, requests: list[dict[str, Any]], *, silence: float | None
    ) -> AsyncIterator[tuple[int, list[WatchEvent]]]:
        endpoint = self.endpoint
        shown = self._shown(endpoint)
        if self._settings.user and self._token is None:
            await self._authenticate(endpoint)
        body = b"".join(json.dumps({"create_request": request}).encode() + b"\n" for request in requests)
        # A member without a leader ends the stream rather than keep it silently stale.
        headers = {"Grpc-Metadata-hasleader": "true"}
        if self._token:
            headers["Authorization"] = self._token
        # The connection and the first message are bounded by the deadline; then the stream
        # may stay silent for as long as nothing changes (see _messages for its bounds).
        timeout = httpx.Timeout(self._settings.timeout, read=None)
        try:
            async with asyncio.timeout(self._settings.timeout) as head:
                async with self._http.stream(
                    "POST", endpoint + "/v3/watch", content=body, headers=headers, timeout=timeout
                ) as response:
                    if response.status_code != 200:
                        raw = await _read_bounded(response, shown)
                        raise _error_from(shown, response.status_code, _json_object(raw) or {})
                    messages = _messages(
                        response, shown, within=self._settings.timeout, silence=silence,
                        current=lambda: self.endpoint == endpoint,
                    )  # fmt: skip
                    async with contextlib.aclosing(messages):
                        async for message in messages:
                            # The first answer (etcd's "created") within the deadline: a proxy
                            # that holds a streaming answer back is found out at once.
                            head.reschedule(None)
                            result = _watch_result(message, shown)
                            if result is not None:
                                yield result
        except TimeoutError:
            raise EtcdUnavailable(f"{shown}: no watch answer within {self._settings.timeout:g}s") from None
        except (httpx.HTTPError, httpx.StreamError, ssl.SSLError, OSError, ValueError) as exc:
            raise EtcdUnavailable(f"{shown}: the watch broke: {describe(exc)}") from None
        raise EtcdUnavailable(f"{shown}: the watch ended")

    async def write(self, writes: Sequence[Write], lease: int) -> list[bool]:
        """Every write in one request and one revision, each guarded on its own (see `Write`).

        One transaction whose operations are transactions of their own (etcd 3.3+): a put
        runs unless the key already holds its value on ``lease``; a delete runs only while
        the key sits on ``lease``. Per write: whether the put wrote, the delete deleted.
        """
        ops = [{"request_txn": _guarded(write, lease).as_json()} for write in writes]

        def parse(answer: dict[str, Any], endpoint: str) -> list[bool]:
            responses = _list(answer, "responses", endpoint)
            if len(responses) != len(writes):
                raise EtcdProtocolError(
                    f"{redact_url(endpoint)}: a txn answer with {len(responses)} of {len(writes)}"
                )
            happened: list[bool] = []
            for write, response in zip(writes, responses, strict=True):
                inner = response.get("response_txn") if isinstance(response, Mapping) else None
                if not isinstance(inner, Mapping) or not isinstance(inner.get("succeeded", False), bool):
                    raise EtcdProtocolError(f"{redact_url(endpoint)}: a txn answer without its inner result")
                compares_held = bool(inner.get("succeeded", False))
                # A put's compares say "already in place" (nothing written); a delete's, "ours".
                happened.append(not compares_held if write.is_put else compares_held)
            return happened

        # Counted as the documented operations: a write that puts is a put, one that only deletes a delete.
        operation = "put" if any(write.is_put for write in writes) else "delete"
        return await self._call(operation, "/v3/kv/txn", {"success": ops}, parse)

    async def delete_if_revision(self, key: str, revision: int) -> bool:
        """Delete ``key`` only while its mod_revision is ``revision``; True when it was deleted."""
        return await self.txn("remove_stale", Txn([compare_mod_revision(key, revision)], [op_delete(key)]))

    async def txn(self, operation: str, txn: Txn) -> bool:
        """Run a transaction; True when its compares held (its success branch ran)."""
        body = txn.as_json()

        def parse(answer: dict[str, Any], endpoint: str) -> bool:
            succeeded = answer.get("succeeded", False)
            if not isinstance(succeeded, bool):
                raise EtcdProtocolError(
                    f"{redact_url(endpoint)}: a txn answer whose 'succeeded' is not true/false"
                )
            return succeeded

        return await self._call(operation, "/v3/kv/txn", body, parse)

    # -- transport, failover, auth --------------------------------------------

    def _shown(self, endpoint: str | None = None) -> str:
        return redact_url(endpoint or self.endpoint)

    async def _call(self, operation: str, path: str, body: dict[str, Any], parse: Parser[T]) -> T:
        started = time.perf_counter()
        try:
            answer = await self._call_with_failover(path, body, parse)
        except EtcdError as exc:
            self._observe(operation, _outcome(exc), time.perf_counter() - started)
            raise
        self._observe(operation, "ok", time.perf_counter() - started)
        return answer

    async def _call_with_failover(self, path: str, body: dict[str, Any], parse: Parser[T]) -> T:
        """The first endpoint whose answer parses; a malformed answer moves on like a timeout."""
        last: EtcdError | None = None
        for _ in range(len(self._endpoints)):
            endpoint = self.endpoint
            try:
                answer = parse(await self._call_endpoint(endpoint, path, body), endpoint)
            except EtcdUnavailable as exc:
                last = exc
                self._current = (self._current + 1) % len(self._endpoints)
                self._members_due = self._settings.discovery  # the cluster may have changed: ask again
                continue
            if self._members_due:
                await self._discover(endpoint)
            return answer
        assert last is not None
        raise last

    async def _discover(self, endpoint: str) -> None:
        """The cluster's members, learned from the endpoint that just answered; best effort.

        The endpoints given come first and always stay; members found are added after them,
        up to the limit that keeps endpoints x deadline within TTL/3.
        """
        self._members_due = False
        try:
            answer = await self._call_endpoint(endpoint, "/v3/cluster/member/list", {})
            found = _member_urls(answer, endpoint)
        except EtcdError as exc:
            self._say_once(f"etcd member discovery failed at {self._shown(endpoint)}: {exc}")
            return
        limit = self._settings.endpoint_limit or len(self._configured) + len(found)
        endpoints = list(self._configured)
        for url in found:
            if url not in endpoints and len(endpoints) < limit:
                endpoints.append(url)
        skipped = [url for url in found if url not in endpoints]
        if skipped:
            self._say_once(
                f"etcd members not used, to keep {limit} endpoints x {self._settings.timeout:g}s within "
                f"TTL/3: {', '.join(redact_url(u) for u in skipped)}"
            )
        current = self.endpoint
        self._endpoints = endpoints
        self._current = endpoints.index(current) if current in endpoints else 0

    def _say_once(self, message: str) -> None:
        if message not in self._said:
            self._said.add(message)
            structlog.get_logger("announcer").warning(message)

    async def _call_endpoint(self, endpoint: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        if self._settings.user and self._token is None:
            await self._authenticate(endpoint)
        status, answer = await self._post(endpoint, path, body)
        if status != 200 and answer.get("code") == UNAUTHENTICATED and self._settings.user:
            # Tokens expire when idle and on every etcd restart: log in again, once.
            await self._authenticate(endpoint)
            status, answer = await self._post(endpoint, path, body)
        if status == 200:
            return answer
        raise _error_from(self._shown(endpoint), status, answer)

    async def _authenticate(self, endpoint: str) -> None:
        self._token = None
        body = {"name": self._settings.user, "password": self._settings.password or ""}
        started = time.perf_counter()
        try:
            status, answer = await self._post(endpoint, "/v3/auth/authenticate", body)
            if status != 200:
                error = _error_from(self._shown(endpoint), status, answer)
                if isinstance(error, EtcdUnavailable):
                    raise error
                raise EtcdAuthError(f"etcd login as {self._settings.user!r} failed: {error}", error.code)
            token = answer.get("token")
            if not isinstance(token, str) or not token or not token.isprintable():
                raise EtcdProtocolError(f"{self._shown(endpoint)}: a login answer without a token")
        except EtcdError as exc:
            self._observe("authenticate", _outcome(exc), time.perf_counter() - started)
            raise
        self._observe("authenticate", "ok", time.perf_counter() - started)
        self._token = token

    async def _post(self, endpoint: str, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """One request in a task of its own, shielded from its caller's cancellation.

        A caller cancelled mid-request (a loop stopped at shutdown, a bound around a
        withdraw) no longer waits for it, but the exchange is never cut short from the
        outside: its own deadline ends it. httpcore closes the connections it drops in a
        loop that only anyio's shield protects; a native cancellation landing in that
        loop left a connection to etcd unclosed (a ResourceWarning at GC, seen in the
        tests' fault runs, allocated in anyio's connect_tcp).
        """
        exchange = asyncio.ensure_future(self._exchange(endpoint, path, body))
        self._inflight.add(exchange)
        exchange.add_done_callback(self._finished)
        return await asyncio.shield(exchange)

    def _finished(self, exchange: asyncio.Future[tuple[int, dict[str, Any]]]) -> None:
        self._inflight.discard(exchange)
        if not exchange.cancelled():
            exchange.exception()  # retrieved: a caller that stopped waiting need not see it

    async def _exchange(self, endpoint: str, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """One request and its whole answer within the deadline, read up to ANSWER_LIMIT."""
        shown = self._shown(endpoint)
        headers = {"Authorization": self._token} if self._token else {}
        deadline = self._settings.timeout
        try:
            async with asyncio.timeout(deadline):
                async with self._http.stream("POST", endpoint + path, json=body, headers=headers) as response:
                    raw = await _read_bounded(response, shown)
                    status = response.status_code
                    content_type = response.headers.get("content-type", "none")
        except TimeoutError:
            raise EtcdUnavailable(f"{shown}: no complete answer within {deadline:g}s") from None
        except httpx.TimeoutException:
            raise EtcdUnavailable(f"{shown}: no answer within {deadline:g}s") from None
        except httpx.DecodingError:
            raise EtcdProtocolError(f"{shown}: an answer that cannot be decoded as it claims") from None
        except (httpx.HTTPError, httpx.StreamError, ssl.SSLError, OSError, ValueError) as exc:
            # Transport errors, and whatever else a peer's bytes can make httpx or h11 raise.
            raise EtcdUnavailable(f"{shown}: {describe(exc)}") from None
        answer = _json_object(raw)
        if answer is None:
            raise EtcdProtocolError(
                f"{shown} does not speak etcd's v3 API: HTTP {status}, {content_type[:60]}, "
                f"{len(raw)} bytes that are not a JSON object"
            )
        return status, answer


MEMBER_LIMIT = 64  # members read from one answer: a cluster has 3, 5 or 7


def _member_urls(answer: Mapping[str, Any], reached: str) -> list[str]:
    """Every member's first usable client URL. A member that advertises only loopback
    addresses while it was reached at another one is used at the address it was reached at."""
    header = answer.get("header")
    answered_by = _number(header, "member_id", reached, default=0) if isinstance(header, Mapping) else 0
    reached_loopback = _is_loopback(reached)
    urls: list[str] = []
    for member in _list(answer, "members", reached)[:MEMBER_LIMIT]:
        if not isinstance(member, Mapping):
            raise EtcdProtocolError(f"{redact_url(reached)}: a member list entry that is not an object")
        client_urls = [u.rstrip("/") for u in _list(member, "clientURLs", reached) if _usable_url(u)]
        if not client_urls:
            continue  # not started yet, or nothing a client can use
        if not reached_loopback and all(_is_loopback(u) for u in client_urls):
            if _number(member, "ID", reached, default=0) == answered_by:
                structlog.get_logger("announcer").warning(
                    "the etcd member advertises only loopback client URLs; using the address it was "
                    "reached at", advertised=client_urls[0], reached=redact_url(reached),
                )  # fmt: skip
                urls.append(reached)
            continue  # another member's loopback address would be this host's own
        urls.append(client_urls[0])
    return urls


def _usable_url(url: object) -> bool:
    if not isinstance(url, str) or len(url) > 300:
        return False
    try:
        parts = urlsplit(url)
        _ = parts.port
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def _is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def prefix_end(prefix: str) -> bytes:
    """The range_end that makes a range or a watch cover every key starting with ``prefix``."""
    data = bytearray(prefix.encode())
    while data and data[-1] == 0xFF:
        data.pop()
    if not data:
        return b"\0"  # everything
    data[-1] += 1
    return bytes(data)


def _json_object(raw: bytes) -> dict[str, Any] | None:
    try:
        answer = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return answer if isinstance(answer, dict) else None


@dataclass
class _StreamBounds:
    """When a streaming answer counts as broken (see _messages)."""

    shown: str
    within: float
    silence: float | None
    current: Callable[[], bool]
    heard: float  # the last whole message (or the stream's start)
    partial_since: float | None = None  # when the first byte of an unfinished message came

    def wait(self, now: float, check_every: float) -> float:
        if self.partial_since is None:
            return check_every
        return max(0.0, min(check_every, self.partial_since + self.within - now))

    def broken(self, now: float) -> EtcdError | None:
        if self.partial_since is not None and now >= self.partial_since + self.within:
            return EtcdProtocolError(f"{self.shown}: a watch message not whole within {self.within:g}s")
        if self.silence is not None and now - self.heard >= self.silence:
            return EtcdUnavailable(f"{self.shown}: the watch was silent for {self.silence:g}s")
        if not self.current():
            return EtcdUnavailable(f"{self.shown}: the other requests moved to another endpoint")
        return None

    def read(self, now: float, rest: bytes, messages: int) -> None:
        if messages:
            self.heard = now
        if len(rest) > WATCH_MESSAGE_LIMIT:
            raise EtcdProtocolError(
                f"{self.shown}: a watch message larger than {WATCH_MESSAGE_LIMIT // 1024} KiB"
            )
        if not rest.strip():
            self.partial_since = None
        elif self.partial_since is None:
            self.partial_since = now


async def _messages(
    response: httpx.Response,
    shown: str,
    *,
    within: float,
    silence: float | None,
    current: Callable[[], bool],
    check_every: float = 5.0,
) -> AsyncGenerator[dict[str, Any], None]:
    """The JSON objects of a streaming answer, one a line, as they come.

    Each message is at most WATCH_MESSAGE_LIMIT bytes and, once its first byte came, whole
    within ``within`` seconds; a stream silent for ``silence`` seconds, or whose endpoint
    is no longer ``current()``, is broken. Chunks are read in a task of their own, so the
    checks between them never cut a read short.
    """
    loop = asyncio.get_running_loop()
    chunks = response.aiter_bytes()
    bounds = _StreamBounds(shown, within, silence, current, heard=loop.time())
    buffer = b""
    pending: asyncio.Future[bytes] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(chunks))
            done, _ = await asyncio.wait({pending}, timeout=bounds.wait(loop.time(), check_every))
            if not done:
                error = bounds.broken(loop.time())
                if error is not None:
                    raise error
                continue
            try:
                chunk = pending.result()
            except StopAsyncIteration:
                return
            finally:
                pending = None
            whole, buffer = _whole_messages(buffer + chunk, shown)
            bounds.read(loop.time(), buffer, len(whole))
            for message in whole:
                yield message
    finally:
        if pending is not None:  # the read still running ends before the stream is closed
            pending.cancel()
            await asyncio.wait({pending})


def _whole_messages(buffer: bytes, shown: str) -> tuple[list[dict[str, Any]], bytes]:
    """The whole lines of ``buffer`` as JSON objects, and what is left of the next one."""
    *lines, rest = buffer.split(b"\n")
    messages: list[dict[str, Any]] = []
    for line in lines:
        if line.strip():
            message = _json_object(line)
            if message is None:
                raise EtcdProtocolError(f"{shown}: a watch message that is not a JSON object")
            messages.append(message)
    return messages, rest


def _raise_stream_error(message: Mapping[str, Any], shown: str) -> None:
    """A streaming call's error: HTTP 200 (the head was sent) with {"error": {"grpc_code", "message"}}."""
    if "error" not in message or "result" in message:
        return
    error = message["error"]
    if not isinstance(error, Mapping):
        raise EtcdProtocolError(f"{shown}: an error that is not an object")
    code = error.get("grpc_code", error.get("code"))
    raise _error_from(
        shown, 500, {"code": code, "message": error.get("message") or "an error without a message"}
    )


def _watch_result(message: dict[str, Any], shown: str) -> tuple[int, list[WatchEvent]] | None:
    """One watch message as (revision, events); None for one that carries no events."""
    _raise_stream_error(message, shown)
    result = message.get("result")
    if not isinstance(result, Mapping):
        raise EtcdProtocolError(f"{shown}: a watch message without a result")
    compacted = _number(result, "compact_revision", shown, default=0)
    if compacted:
        raise WatchCompacted(f"{shown}: the watch's revision was compacted (now {compacted})")
    if result.get("canceled"):
        raise EtcdUnavailable(
            f"{shown}: the watch was canceled: {str(result.get('cancel_reason', ''))[:200]}"
        )
    events: list[WatchEvent] = []
    for event in _list(result, "events", shown):
        if not isinstance(event, Mapping):
            raise EtcdProtocolError(f"{shown}: a watch event that is not an object")
        kind = event.get("type", "PUT")
        if kind not in ("PUT", "DELETE"):
            raise EtcdProtocolError(f"{shown}: a watch event of unknown type {str(kind)[:20]!r}")
        events.append(WatchEvent(str(kind), _key_value(event.get("kv"), shown, with_value=kind == "PUT")))
    revision = _revision(result, shown)
    return (revision, events) if events else None


async def _read_bounded(response: httpx.Response, shown: str) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > ANSWER_LIMIT:
            raise EtcdProtocolError(f"{shown}: an answer larger than {ANSWER_LIMIT // 1024} KiB")
        chunks.append(chunk)
    return b"".join(chunks)


def _number(answer: Mapping[str, Any], name: str, endpoint: str, default: int | None = None) -> int:
    """A 64-bit number, which the gateway sends as a string (or leaves out when zero)."""
    value = answer.get(name)
    if value is None and default is not None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise EtcdProtocolError(f"{redact_url(endpoint)}: an answer whose {name!r} is not a number")
    try:
        number = int(value)
    except ValueError:
        raise EtcdProtocolError(f"{redact_url(endpoint)}: an answer whose {name!r} is not a number") from None
    if not -(2**63) <= number < 2**64:
        raise EtcdProtocolError(f"{redact_url(endpoint)}: an answer whose {name!r} is out of range")
    return number


def _revision(answer: Mapping[str, Any], endpoint: str) -> int:
    header = answer.get("header", {})
    if not isinstance(header, Mapping):
        raise EtcdProtocolError(f"{redact_url(endpoint)}: an answer whose header is not an object")
    return _number(header, "revision", endpoint, default=0)


def _list(answer: Mapping[str, Any], name: str, endpoint: str) -> list[Any]:
    value = answer.get(name) or []
    if not isinstance(value, list):
        raise EtcdProtocolError(f"{redact_url(endpoint)}: an answer whose {name!r} is not a list")
    return value


def _unb64(kv: Mapping[str, Any], name: str, endpoint: str) -> bytes:
    text = kv.get(name, "")
    if not isinstance(text, str):
        raise EtcdProtocolError(f"{redact_url(endpoint)}: a key-value whose {name!r} is not base64 text")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise EtcdProtocolError(f"{redact_url(endpoint)}: a key-value whose {name!r} is bad base64") from None


def _key_value(kv: Any, endpoint: str, *, with_value: bool) -> KeyValue:
    if not isinstance(kv, Mapping):
        raise EtcdProtocolError(f"{redact_url(endpoint)}: a key-value that is not an object")
    return KeyValue(
        key=_unb64(kv, "key", endpoint),
        value=_unb64(kv, "value", endpoint) if with_value else None,
        lease=_number(kv, "lease", endpoint, default=0),
        mod_revision=_number(kv, "mod_revision", endpoint, default=0),
    )


# The gateway reaches etcd's own gRPC port as a client, with the server's certificate.
_GATEWAY_DIAL_FAILURES = ("broken pipe", "connection reset", "bad certificate", "tls: ")
CLIENT_AUTH_HINT = (
    "etcd's JSON gateway cannot reach etcd's own gRPC port; with --client-cert-auth the server "
    "certificate must allow client authentication too (extended key usage clientAuth)"
)


def _error_from(shown: str, status: int, answer: Mapping[str, Any]) -> EtcdError:
    code = answer.get("code")
    if not isinstance(code, int) or isinstance(code, bool):
        code = None
    raw = answer.get("message") or answer.get("error") or f"HTTP {status}"
    message = str(raw)[:300] if isinstance(raw, str) else f"HTTP {status}"
    text = f"{shown}: {message}"
    if code is None and not ("message" in answer or "error" in answer):
        return EtcdProtocolError(f"{shown} does not speak etcd's v3 API: HTTP {status} with no etcd error")
    if code == NOT_FOUND and "lease" in message:
        return LeaseNotFound(text, code)
    if code in (UNAUTHENTICATED, PERMISSION_DENIED) or "authentication failed" in message:
        return EtcdAuthError(text, code)
    if code == UNAVAILABLE and any(sign in message.lower() for sign in _GATEWAY_DIAL_FAILURES):
        return EtcdUnavailable(f"{text} ({CLIENT_AUTH_HINT})", code)
    if code in _TRY_ANOTHER_MEMBER or status >= 500:
        return EtcdUnavailable(text, code)
    return EtcdError(text, code)


def _outcome(exc: EtcdError) -> str:
    if isinstance(exc, EtcdProtocolError):
        return "bad_answer"
    if isinstance(exc, EtcdUnavailable):
        return "unavailable"
    if isinstance(exc, LeaseNotFound):
        return "lease_not_found"
    if isinstance(exc, EtcdAuthError):
        return "auth_error"
    return "error"
