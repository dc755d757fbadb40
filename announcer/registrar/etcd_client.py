"""A small async client for etcd's v3 JSON gateway (``/v3/...``), over httpx.

What it must respect, as measured on etcd 3.4 and 3.5: keys and values are
base64; 64-bit numbers arrive as strings and zero values are left out; a
keepalive on a lost lease is a 200 answer without a positive TTL; a put on a
dead lease is HTTP 404 with gRPC code 5; the auth token goes bare in the
``Authorization`` header and expires (code 16 means: log in again); several
endpoints mean trying the next one on connect errors and deadlines.
"""

from __future__ import annotations

import base64
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from announcer.errors import describe

# gRPC status codes that etcd's gateway puts in its error bodies.
INVALID_ARGUMENT = 3
NOT_FOUND = 5
PERMISSION_DENIED = 7
UNAVAILABLE = 14
UNAUTHENTICATED = 16
# Answers that say "this member cannot serve you now; another one may".
_TRY_ANOTHER_MEMBER = frozenset({UNAVAILABLE, 4, 1})  # unavailable, deadline, cancelled


class EtcdError(Exception):
    """etcd answered with an error, or could not be reached."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class EtcdUnavailable(EtcdError):
    """No endpoint answered in time."""


class LeaseNotFound(EtcdError):
    """The lease expired or etcd lost it."""


class EtcdAuthError(EtcdError):
    """Wrong user or password, or the user may not do this."""


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _unb64(text: str) -> str:
    return base64.b64decode(text).decode()


@dataclass(frozen=True)
class EtcdSettings:
    endpoints: tuple[str, ...] = ("http://127.0.0.1:2379",)
    timeout: float = 2.0  # per request: a member slower than this counts as down
    cacert: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context when any TLS file is set; raises OSError/SSLError on bad files."""
        if self.cacert is None and self.cert is None:
            return None
        context = ssl.create_default_context(cafile=str(self.cacert) if self.cacert else None)
        if self.cert is not None:
            context.load_cert_chain(str(self.cert), str(self.key) if self.key else None)
        return context


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: str
    value: str
    lease: int
    mod_revision: int


Observer = Callable[[str, str, float], None]  # operation, outcome, seconds


def _ignore(_operation: str, _outcome: str, _seconds: float) -> None:
    return None


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
        self._current = 0
        self._token: str | None = None
        self._observe = observe
        context = settings.ssl_context()
        uses_tls = any(e.startswith("https:") for e in self._endpoints)
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(settings.timeout),
            # Plain-HTTP endpoints need no CA bundle: loading one costs memory and start-up time.
            verify=context if context is not None else uses_tls,
            transport=transport,
            trust_env=False,
        )

    @property
    def endpoint(self) -> str:
        return self._endpoints[self._current]

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- the verbs -----------------------------------------------------------

    async def grant(self, ttl: int) -> int:
        answer = await self._call("lease_grant", "/v3/lease/grant", {"TTL": ttl})
        return int(answer["ID"])

    async def keepalive(self, lease: int) -> int:
        """The TTL etcd reset the lease to; 0 or less means the lease is gone."""
        answer = await self._call("keepalive", "/v3/lease/keepalive", {"ID": str(lease)})
        return int(answer.get("result", {}).get("TTL", 0))

    async def revoke(self, lease: int) -> None:
        try:
            await self._call("revoke", "/v3/lease/revoke", {"ID": str(lease)})
        except LeaseNotFound:
            return

    async def put(self, key: str, value: str, lease: int) -> int:
        body = {"key": _b64(key), "value": _b64(value), "lease": str(lease)}
        answer = await self._call("put", "/v3/kv/put", body)
        return int(answer["header"].get("revision", 0))

    async def get(self, key: str) -> KeyValue | None:
        answer = await self._call("range", "/v3/kv/range", {"key": _b64(key)})
        kvs = answer.get("kvs") or []
        if not kvs:
            return None
        kv = kvs[0]
        return KeyValue(
            key=key,
            value=_unb64(kv.get("value", "")),
            lease=int(kv.get("lease", 0)),
            mod_revision=int(kv.get("mod_revision", 0)),
        )

    async def delete_if_lease(self, key: str, lease: int) -> bool:
        """Delete ``key`` only while it sits on ``lease``; True when it was deleted."""
        body = {
            "compare": [{"key": _b64(key), "target": "LEASE", "result": "EQUAL", "lease": str(lease)}],
            "success": [{"request_delete_range": {"key": _b64(key)}}],
        }
        answer = await self._call("delete", "/v3/kv/txn", body)
        return bool(answer.get("succeeded", False))

    # -- transport, failover, auth --------------------------------------------

    async def _call(self, operation: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            answer = await self._call_with_failover(path, body)
        except EtcdError as exc:
            self._observe(operation, _outcome(exc), time.perf_counter() - started)
            raise
        self._observe(operation, "ok", time.perf_counter() - started)
        return answer

    async def _call_with_failover(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        last: EtcdError | None = None
        for _ in range(len(self._endpoints)):
            endpoint = self.endpoint
            try:
                return await self._call_endpoint(endpoint, path, body)
            except EtcdUnavailable as exc:
                last = exc
                self._current = (self._current + 1) % len(self._endpoints)
        assert last is not None
        raise last

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
        raise _error_from(endpoint, status, answer)

    async def _authenticate(self, endpoint: str) -> None:
        self._token = None
        body = {"name": self._settings.user, "password": self._settings.password or ""}
        started = time.perf_counter()
        try:
            status, answer = await self._post(endpoint, "/v3/auth/authenticate", body)
            if status != 200:
                error = _error_from(endpoint, status, answer)
                if isinstance(error, EtcdUnavailable):
                    raise error
                raise EtcdAuthError(f"etcd login as {self._settings.user!r} failed: {error}", error.code)
        except EtcdError as exc:
            self._observe("authenticate", _outcome(exc), time.perf_counter() - started)
            raise
        self._observe("authenticate", "ok", time.perf_counter() - started)
        self._token = str(answer["token"])

    async def _post(self, endpoint: str, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        headers = {"Authorization": self._token} if self._token else {}
        try:
            response = await self._http.post(endpoint + path, json=body, headers=headers)
        except httpx.TimeoutException:
            raise EtcdUnavailable(f"{endpoint}: no answer within {self._settings.timeout:g}s") from None
        except httpx.TransportError as exc:
            raise EtcdUnavailable(f"{endpoint}: {describe(exc)}") from None
        try:
            answer = response.json()
        except ValueError:
            answer = {"error": response.text[:200]}
        if not isinstance(answer, dict):
            answer = {"error": str(answer)[:200]}
        return response.status_code, answer


def _error_from(endpoint: str, status: int, answer: dict[str, Any]) -> EtcdError:
    code = answer.get("code")
    message = str(answer.get("message") or answer.get("error") or f"HTTP {status}")
    text = f"{endpoint}: {message}"
    if code == NOT_FOUND and "lease" in message:
        return LeaseNotFound(text, code)
    if code in (UNAUTHENTICATED, PERMISSION_DENIED) or "authentication failed" in message:
        return EtcdAuthError(text, code)
    if code in _TRY_ANOTHER_MEMBER or status >= 500:
        return EtcdUnavailable(text, code)
    return EtcdError(text, code)


def _outcome(exc: EtcdError) -> str:
    if isinstance(exc, EtcdUnavailable):
        return "unavailable"
    if isinstance(exc, LeaseNotFound):
        return "lease_not_found"
    if isinstance(exc, EtcdAuthError):
        return "auth_error"
    return "error"
