"""gRPC checks (#14) against a real grpcio server with the standard health servicer."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import trustme
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from announcer.checks import build_check
from announcer.checks.rounds import run_check
from announcer.errors import ConfigError
from announcer.health import Health
from tests.agent_helpers import agent_config, eventually, running
from tests.servers import EtcdServer, SilentListener, announcer_process, free_port

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class GrpcServer:
    """A real gRPC server on loopback; with the standard health service unless told not to."""

    def __init__(self, *, with_health: bool = True, tls: tuple[bytes, bytes] | None = None) -> None:
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        self.health = health.HealthServicer()
        if with_health:
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
            self.health.set("", SERVING)
            self.health.set("shop.Cart", SERVING)
        if tls is None:
            self.port = self.server.add_insecure_port("127.0.0.1:0")
        else:
            self.port = self.server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([tls]))
        self.server.start()

    def close(self) -> None:
        self.server.stop(None).wait(5)


@pytest.fixture
def grpc_server() -> Iterator[GrpcServer]:
    server = GrpcServer()
    yield server
    server.close()


async def run(spec: str, timeout: float = 2.0, **options: object):  # type: ignore[no-untyped-def]
    return await run_check(build_check(spec, options), timeout)


async def test_serving_passes_and_not_serving_fails(grpc_server: GrpcServer) -> None:
    result = await run(f"grpc://127.0.0.1:{grpc_server.port}")
    assert (result.ok, result.detail) == (True, "SERVING")
    assert (await run(f"grpc://127.0.0.1:{grpc_server.port}/shop.Cart")).ok
    grpc_server.health.set("shop.Cart", NOT_SERVING)
    result = await run(f"grpc://127.0.0.1:{grpc_server.port}/shop.Cart")
    assert (result.ok, result.detail) == (False, "NOT_SERVING")


async def test_each_failure_has_its_own_reason(grpc_server: GrpcServer) -> None:
    unknown = await run(f"grpc://127.0.0.1:{grpc_server.port}/no.Such")
    assert not unknown.ok
    assert unknown.detail == "SERVICE_UNKNOWN: the server knows no service 'no.Such'"
    bare = GrpcServer(with_health=False)
    silent = SilentListener()
    try:
        result = await run(f"grpc://127.0.0.1:{bare.port}")
        assert not result.ok
        assert result.detail.startswith("UNIMPLEMENTED: the server has no health service")
        assert "use a tcp check" in result.detail
        refused = await run(f"grpc://127.0.0.1:{free_port()}")
        assert (refused.ok, refused.detail) == (False, "connection refused")
        hanging = await run(f"grpc://127.0.0.1:{silent.port}", timeout=0.5)
        assert not hanging.ok
        assert hanging.detail in ("timed out (DEADLINE_EXCEEDED)", "timed out after 0.5s")
    finally:
        bare.close()
        silent.close()


async def test_a_fresh_channel_each_round_leaks_nothing(grpc_server: GrpcServer) -> None:
    check = build_check(f"grpc://127.0.0.1:{grpc_server.port}")
    assert (await run_check(check, 2.0)).ok  # grpc's own threads start with the first channel
    fds = len(list(Path("/proc/self/fd").iterdir()))
    threads = len(list(Path("/proc/self/task").iterdir()))
    for _ in range(300):
        result = await run_check(check, 2.0)
        assert result.ok, result.detail
    await eventually(lambda: len(list(Path("/proc/self/fd").iterdir())) <= fds + 2, what="descriptors back")
    assert len(list(Path("/proc/self/task").iterdir())) <= threads + 2


@pytest.fixture
def tls(tmp_path: Path) -> dict[str, Path | bytes]:
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    files: dict[str, Path | bytes] = {"ca": tmp_path / "ca.pem", "other": tmp_path / "other.pem"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    trustme.CA().cert_pem.write_to_path(str(files["other"]))
    files["key"] = leaf.private_key_pem.bytes()
    files["chain"] = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
    return files


async def test_tls_with_a_ca_file_and_a_wrong_ca(tls: dict[str, Path | bytes]) -> None:
    server = GrpcServer(tls=(tls["key"], tls["chain"]))  # type: ignore[arg-type]
    try:
        spec = f"grpcs://127.0.0.1:{server.port}"
        good = await run(spec, ca_file=str(tls["ca"]))
        assert (good.ok, good.detail) == (True, "SERVING")
        wrong = await run(spec, ca_file=str(tls["other"]))
        assert not wrong.ok
        assert wrong.detail.startswith("UNAVAILABLE")
        assert (
            "ssl" in wrong.detail.lower()
            or "handshake" in wrong.detail.lower()
            or "certificate" in wrong.detail.lower()
        )
        unverified = await run(spec, verify=False)
        assert unverified.ok, unverified.detail
        plain = await run(f"grpc://127.0.0.1:{server.port}")  # speaking plaintext to a TLS port
        assert not plain.ok
    finally:
        server.close()


def test_bad_specs_are_configuration_errors() -> None:
    for spec, message in [
        ("grpc://nohost", "needs a port"),
        ("grpc://127.0.0.1:99999", "Port out of range"),
    ]:
        with pytest.raises(ConfigError, match=message):
            build_check(spec)
    with pytest.raises(ConfigError, match="TLS options need grpcs://"):
        build_check("grpc://127.0.0.1:1", {"verify": False})
    with pytest.raises(ConfigError, match="go together"):
        build_check("grpcs://127.0.0.1:1", {"client_cert": "/etc/hostname"})


async def test_not_serving_withdraws_the_record(etcd: EtcdServer, grpc_server: GrpcServer) -> None:
    key = f"/services/web/127.0.0.1:{grpc_server.port}"
    async with running(agent_config(etcd.url, grpc_server.port, check=["grpc"])) as agent:
        await eventually(lambda: etcd.get(key) is not None, what="announce")
        grpc_server.health.set("", NOT_SERVING)
        await eventually(lambda: etcd.get(key) is None, what="withdrawn")
        assert agent.status.health is Health.FAILING
        assert agent.status.results[0].detail == "NOT_SERVING"
        grpc_server.health.set("", SERVING)
        await eventually(lambda: etcd.get(key) is not None, what="announced again")


def test_check_command_shows_the_grpc_kind(grpc_server: GrpcServer) -> None:
    args = [
        "check",
        "--service",
        "web",
        "--port",
        str(grpc_server.port),
        "--ip",
        "127.0.0.1",
        "--check",
        "grpc",
    ]
    with announcer_process(*args) as process:
        out, _ = process.communicate(timeout=60)
    assert process.returncode == 0
    assert f"PASS  grpc://127.0.0.1:{grpc_server.port}" in out
    assert "SERVING" in out


async def test_client_certificates_for_grpcs_and_https(tls: dict[str, Path | bytes], tmp_path: Path) -> None:
    import ssl
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    ca_pem = Path(tls["ca"]).read_bytes()  # type: ignore[arg-type]
    client = trustme.CA()
    client_leaf = client.issue_cert("announcer@example")
    cert, key = tmp_path / "client.pem", tmp_path / "client-key.pem"
    cert.write_bytes(b"".join(b.bytes() for b in client_leaf.cert_chain_pems))
    key.write_bytes(client_leaf.private_key_pem.bytes())
    # gRPC: the server requires a client certificate from the client CA
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    credentials = grpc.ssl_server_credentials(
        [(tls["key"], tls["chain"])], root_certificates=client.cert_pem.bytes(), require_client_auth=True
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    # HTTPS: the same rule
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*_server_files(tls, tmp_path))
    client.configure_trust(context)
    context.verify_mode = ssl.CERT_REQUIRED

    class Ok(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            return

    web = ThreadingHTTPServer(("127.0.0.1", 0), Ok)
    web.socket = context.wrap_socket(web.socket, server_side=True)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    try:
        assert ca_pem
        options = {"ca_file": str(tls["ca"]), "client_cert": str(cert), "client_key": str(key)}
        assert (await run(f"grpcs://127.0.0.1:{port}", **options)).ok
        assert not (await run(f"grpcs://127.0.0.1:{port}", ca_file=str(tls["ca"]))).ok
        https = f"https://127.0.0.1:{web.server_address[1]}/"
        assert (await run(https, **options)).ok
        assert not (await run(https, ca_file=str(tls["ca"]))).ok
    finally:
        server.stop(None).wait(5)
        web.shutdown()
        web.server_close()


def _server_files(tls: dict[str, Path | bytes], folder: Path) -> tuple[str, str]:
    chain, key = folder / "server.pem", folder / "server-key.pem"
    chain.write_bytes(tls["chain"])  # type: ignore[arg-type]
    key.write_bytes(tls["key"])  # type: ignore[arg-type]
    return str(chain), str(key)


def test_a_failed_grpcs_handshake_prints_only_announcers_own_lines(
    tls: dict[str, Path | bytes], tmp_path: Path
) -> None:
    # grpc's C core logs a failed handshake itself ("I1202 12:00:00 ... Handshake failed")
    # to stderr; announcer's stderr is its structured log and nothing else.
    server = GrpcServer(tls=(tls["key"], tls["chain"]))  # type: ignore[arg-type]
    config = tmp_path / "grpcs.toml"
    config.write_text(
        f'service = "web"\nport = {server.port}\nip = "127.0.0.1"\n'
        f'[[checks]]\nspec = "grpcs"\nca_file = "{tls["other"]}"\n'
    )
    try:
        with announcer_process("check", "--config", str(config)) as process:
            out, err = process.communicate(timeout=60)
    finally:
        server.close()
    assert process.returncode == 1
    assert "FAIL  grpcs://" in out
    foreign = [line for line in err.splitlines() if not line.startswith("{")]
    assert foreign == []
