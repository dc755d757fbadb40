"""gRPC check: the standard health service (``grpc.health.v1.Health/Check``) answers SERVING.

Driver: grpcio with grpcio-health-checking (extra ``grpc``), imported only when a
gRPC check is configured. Every round opens a fresh channel and closes it, as the
database checks do: the check proves that a new client gets in.

``grpc://host:port`` asks for the server's overall health (service ""), and
``grpc://host:port/name`` for one service. ``grpcs://`` adds TLS, with the HTTPS
check's options: ``ca_file``, ``verify`` and a client certificate
(``client_cert``, ``client_key``).
"""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Self
from urllib.parse import unquote

# grpc's C core logs on its own to stderr (a failed handshake is "I1202 ... Handshake
# failed"), beside announcer's structured log; each failure is already in the check's
# result. Read once, when grpc loads; an operator's own GRPC_VERBOSITY wins.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from announcer.checks import CheckResult
from announcer.checks._options import Options, TlsFiles, tls_files
from announcer.checks._url import split_url
from announcer.checks.rounds import time_left
from announcer.errors import ConfigError

SERVING = health_pb2.HealthCheckResponse.SERVING
STATUS_NAMES = {value: name for name, value in health_pb2.HealthCheckResponse.ServingStatus.items()}
# A fresh connection each round, never a kept one; small messages only.
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.enable_retries", 0),
    ("grpc.max_receive_message_length", 64 * 1024),
]


@dataclass(frozen=True, kw_only=True)
class GrpcCheck(TlsFiles):
    host: str
    port: int
    service: str = ""
    tls: bool = False

    @classmethod
    def from_spec(cls, spec: str, options: Mapping[str, Any]) -> Self:
        parts = split_url("grpc", spec, "grpc://host:port[/service]")
        if parts.port is None:
            raise ConfigError(f"grpc check {spec!r} needs a port: grpc://host:port[/service]")
        assert parts.hostname is not None
        opts = Options("grpc", options)
        tls = parts.scheme.lower() == "grpcs"
        check = cls(
            host=parts.hostname,
            port=parts.port,
            service=unquote(parts.path.strip("/")),
            tls=tls,
            **vars(tls_files(opts, "grpcs")),
        )
        opts.done()
        if not tls and (check.ca_file or check.client_cert or not check.verify):
            raise ConfigError(f"grpc check {spec!r}: TLS options need grpcs://")
        return check

    @property
    def name(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        scheme = "grpcs" if self.tls else "grpc"
        return f"{scheme}://{host}:{self.port}" + (f"/{self.service}" if self.service else "")

    @property
    def _target(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    async def _channel(self) -> grpc.aio.Channel:
        if not self.tls:
            return grpc.aio.insecure_channel(self._target, options=CHANNEL_OPTIONS)
        key = self.client_key.read_bytes() if self.client_key else None
        chain = self.client_cert.read_bytes() if self.client_cert else None
        options = list(CHANNEL_OPTIONS)
        if self.verify:
            roots = self.ca_file.read_bytes() if self.ca_file else None
        else:
            # grpcio cannot skip verification: trust whatever certificate the server shows
            # this round, under the name it carries, so only the TLS handshake is checked.
            roots, name = await _server_certificate(self.host, self.port)
            if name:
                options.append(("grpc.ssl_target_name_override", name))
        credentials = grpc.ssl_channel_credentials(roots, key, chain)
        return grpc.aio.secure_channel(self._target, credentials, options=options)

    async def __call__(self) -> CheckResult:
        channel = await self._channel()
        try:
            stub = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest(service=self.service)
            try:
                answer = await stub.Check(request, timeout=time_left())
            except grpc.aio.AioRpcError as exc:
                return CheckResult(False, self._explain(exc))
        finally:
            await channel.close(grace=None)
        status = STATUS_NAMES.get(answer.status, str(answer.status))
        if answer.status == SERVING:
            return CheckResult(True, "SERVING")
        return CheckResult(False, status)

    def _explain(self, exc: grpc.aio.AioRpcError) -> str:
        code, details = exc.code(), (exc.details() or "").strip()
        if code == grpc.StatusCode.NOT_FOUND:
            return f"SERVICE_UNKNOWN: the server knows no service {self.service!r}"
        if code == grpc.StatusCode.UNIMPLEMENTED:
            return "UNIMPLEMENTED: the server has no health service (grpc.health.v1.Health); use a tcp check"
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return "timed out (DEADLINE_EXCEEDED)"
        if "refused" in details.lower():
            return "connection refused"
        return f"{code.name}: {details[:300]}"


async def _server_certificate(host: str, port: int) -> tuple[bytes, str | None]:
    """The certificate the server presents (PEM) and a name it is valid for, unverified."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    _, writer = await asyncio.open_connection(host, port, ssl=context)
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        writer.close()
    pem = ssl.DER_cert_to_PEM_cert(der).encode()
    return pem, _name_in(der)


def _name_in(der: bytes) -> str | None:
    """A DNS name or IP the certificate names, read with the ssl module's own decoder."""
    import tempfile  # noqa: PLC0415 - only for verify = false

    with tempfile.NamedTemporaryFile("w", suffix=".pem") as handle:
        handle.write(ssl.DER_cert_to_PEM_cert(der))
        handle.flush()
        # getpeercert() decodes nothing on an unverified connection; this is the decoder it uses.
        decoded = ssl._ssl._test_decode_cert(handle.name)  # type: ignore[attr-defined]
    for kind, value in decoded.get("subjectAltName", ()):
        if kind in ("DNS", "IP Address"):
            return str(value)
    return None
