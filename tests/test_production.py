"""Production etcd: a cluster with failover, TLS, RBAC with expiring tokens, whole-cluster outages."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import signal
import ssl
from pathlib import Path

import pytest
import trustme
from structlog.testing import capture_logs

from announcer.config import load_config
from announcer.errors import ConfigError
from announcer.health import Health
from tests.agent_helpers import AMBIENT, agent_config, eventually, keepalives_go_on, running, sample
from tests.servers import (
    EtcdCluster,
    EtcdServer,
    HttpService,
    PartitionProxy,
    Watcher,
    announcer_process,
    etcdctl,
    wait_until,
)
from tests.test_process import StderrLog

KEY = "/services/web/127.0.0.1:{port}"


def keepalives(agent) -> float:  # type: ignore[no-untyped-def]
    return sample(agent, "announcer_etcd_requests_total", operation="keepalive", outcome="ok")


@pytest.mark.parametrize("fault", ["stop", "freeze"])
async def test_failover_keeps_the_lease_and_the_record(
    etcd_cluster: EtcdCluster, http_service: HttpService, fault: str
) -> None:
    key = KEY.format(port=http_service.port)
    # fall 5: about the lease through a failover; a loaded machine must not flap the record.
    # TTL 5: a member stopped means an election; at TTL 3 a loaded CI machine once let the
    # lease run out meanwhile (keepalives every 1.7 s here, nine of them below).
    config = agent_config(etcd_cluster.endpoints, http_service.port, ttl="5", fall="5")
    async with running(config) as agent:
        await eventually(lambda: agent.registered, what="announce")
        client = agent.registrar.store  # the edge's etcd client
        talking_to = etcd_cluster.member_at(client.endpoint)
        observer = etcd_cluster.any_up(but=talking_to)
        kv = observer.get(key)
        assert kv is not None
        watcher = Watcher(observer, "/services/")
        seen = keepalives(agent)
        try:
            if fault == "stop":
                await asyncio.to_thread(talking_to.stop)  # a leader's stop takes seconds
            else:
                talking_to.freeze()
            # three TTLs' worth of keepalives through the other members
            await eventually(
                lambda: keepalives(agent) >= seen + 9, timeout=45, what="nine keepalives elsewhere"
            )
            after = observer.get(key)
            assert after is not None
            assert after["lease"] == kv["lease"]  # the same lease: never lost
            assert after["mod_revision"] == kv["mod_revision"]  # never rewritten
            assert watcher.events == []  # a watcher saw no delete and no new put
            assert client.endpoint != talking_to.url
        finally:
            talking_to.thaw()
            watcher.close()


async def test_one_endpoint_given_the_cluster_keeps_the_record(
    etcd_cluster: EtcdCluster, http_service: HttpService
) -> None:
    first = etcd_cluster.members[0]
    key = KEY.format(port=http_service.port)
    async with running(agent_config(first.url, http_service.port, ttl="3")) as agent:
        await eventually(lambda: agent.registered, what="announce")
        client = agent.registrar.store
        # Learned from the one member given: another member's URL, up to the limit that keeps
        # endpoints x deadline within TTL/3 (two at TTL 3 with a 0.5 s deadline).
        assert client.endpoints[0] == first.url
        assert len(client.endpoints) == 2
        assert client.endpoints[1] in {m.url for m in etcd_cluster.members[1:]}
        lease = first.get(key)["lease"]  # type: ignore[index]
        first.kill()
        seen = keepalives(agent)
        await eventually(lambda: keepalives(agent) >= seen + 6, timeout=30, what="keepalives elsewhere")
        survivor = etcd_cluster.any_up(but=first)
        after = survivor.get(key)
        assert after is not None
        assert after["lease"] == lease  # kept alive through the others: never lost
        assert agent.registered


async def test_without_discovery_only_the_endpoints_given_are_used(
    etcd_cluster: EtcdCluster, http_service: HttpService
) -> None:
    first = etcd_cluster.members[0]
    config = agent_config(first.url, http_service.port, ttl="3", etcd_discovery="off")
    async with running(config) as agent:
        await eventually(lambda: agent.registered, what="announce")
        assert agent.registrar.store.endpoints == (first.url,)


@pytest.mark.parametrize("wipe", [False, True], ids=["with-data", "data-lost"])
async def test_whole_etcd_down_longer_than_the_ttl(
    etcd: EtcdServer, http_service: HttpService, wipe: bool
) -> None:
    key = KEY.format(port=http_service.port)
    async with running(agent_config(etcd.url, http_service.port, ttl="3")) as agent:
        await eventually(lambda: etcd.get(key) is not None, what="announce")
        await asyncio.to_thread(etcd.stop)
        if wipe:
            etcd.wipe()
        await eventually(lambda: agent.status.etcd_reachable is False, what="etcd seen down")
        # longer than the TTL (3 s): count check rounds, the agent's own clock
        rounds = agent.status.rounds
        await eventually(lambda: agent.status.rounds >= rounds + 20, timeout=30, what="4 s of check rounds")
        code, body = agent.health_report()
        assert code == 200  # the agent is alive and checking ...
        assert body["etcd_reachable"] is False  # ... and says etcd is not
        assert sample(agent, "announcer_etcd_reachable") == 0
        await asyncio.to_thread(etcd.start)
        await eventually(lambda: etcd.get(key) is not None, timeout=15, what="record back")
        await eventually(lambda: agent.status.etcd_reachable is True, what="etcd seen back")
        assert sample(agent, "announcer_lease_grants_total") == (2 if wipe else 1)


@pytest.fixture
def tls_files(tmp_path: Path) -> dict[str, Path]:
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("announcer-client")
    files = {
        name: tmp_path / f"{name}.pem"
        for name in ("ca", "server", "server-key", "client", "client-key", "other-ca")
    }
    ca.cert_pem.write_to_path(str(files["ca"]))
    server.cert_chain_pems[0].write_to_path(str(files["server"]))
    server.private_key_pem.write_to_path(str(files["server-key"]))
    client.cert_chain_pems[0].write_to_path(str(files["client"]))
    client.private_key_pem.write_to_path(str(files["client-key"]))
    trustme.CA().cert_pem.write_to_path(str(files["other-ca"]))
    return files


@pytest.fixture
def tls_etcd(etcd: EtcdServer, tls_files: dict[str, Path]) -> EtcdServer:
    etcd.stop()
    etcd.wipe()
    etcd.scheme = "https"
    etcd.extra_args = (
        "--cert-file", str(tls_files["server"]), "--key-file", str(tls_files["server-key"]),
        "--trusted-ca-file", str(tls_files["ca"]), "--client-cert-auth",
    )  # fmt: skip
    context = ssl.create_default_context(cafile=str(tls_files["ca"]))
    context.load_cert_chain(str(tls_files["client"]), str(tls_files["client-key"]))
    etcd.client_kwargs = {"verify": context}
    etcd.start()
    return etcd  # the etcd fixture stops it


async def test_tls_with_client_certificates(
    tls_etcd: EtcdServer, tls_files: dict[str, Path], http_service: HttpService
) -> None:
    key = KEY.format(port=http_service.port)
    config = agent_config(
        tls_etcd.url, http_service.port, etcd_cacert=str(tls_files["ca"]),
        etcd_cert=str(tls_files["client"]), etcd_key=str(tls_files["client-key"]),
    )  # fmt: skip
    async with running(config):
        await eventually(lambda: tls_etcd.get(key) is not None, what="announce over TLS")
    assert tls_etcd.get(key) is None


async def test_tls_wrong_ca_is_a_clear_error_not_a_hang(
    tls_etcd: EtcdServer, tls_files: dict[str, Path], http_service: HttpService
) -> None:
    config = agent_config(
        tls_etcd.url, http_service.port, etcd_cacert=str(tls_files["other-ca"]),
        etcd_cert=str(tls_files["client"]), etcd_key=str(tls_files["client-key"]),
    )  # fmt: skip
    with capture_logs() as logs:
        async with running(config) as agent:
            await eventually(lambda: agent.status.etcd_reachable is False, what="the TLS failure")
            rounds = agent.status.rounds
            await eventually(lambda: agent.status.rounds >= rounds + 3, what="checks go on")
    [unreachable] = [e for e in logs if e["event"] == "etcd unreachable"]
    assert "CERTIFICATE_VERIFY_FAILED" in unreachable["error"]


def test_tls_files_that_do_not_match_are_exit_2(tls_files: dict[str, Path]) -> None:
    flags = {"service": "web", "port": "80", "ip": "127.0.0.1", "etcd_cacert": str(tls_files["ca"]),
             "etcd_cert": str(tls_files["client"]), "etcd_key": str(tls_files["server-key"])}  # fmt: skip
    with pytest.raises(ConfigError) as info:
        load_config(flags, {}, AMBIENT)
    assert str(tls_files["client"]) in str(info.value)
    assert "not usable" in str(info.value)
    flags["etcd_cacert"] = str(tls_files["client-key"])  # a key is no CA bundle
    flags["etcd_key"] = str(tls_files["client-key"])
    with pytest.raises(ConfigError, match="not usable"):
        load_config(flags, {}, AMBIENT)


def enable_auth(etcd: EtcdServer) -> None:
    """Least privilege: the agent's role may read and write its key prefix, nothing else."""
    etcdctl(etcd, "user", "add", "root:root-pw")
    etcdctl(etcd, "role", "add", "announcer")
    etcdctl(etcd, "role", "grant-permission", "announcer", "--prefix=true", "readwrite", "/services/web/")
    etcdctl(etcd, "user", "add", "announcer:agent-pw")
    etcdctl(etcd, "user", "grant-role", "announcer", "announcer")
    etcdctl(etcd, "auth", "enable")


@pytest.fixture
def auth_etcd(etcd_any: EtcdServer) -> EtcdServer:
    etcd = etcd_any  # RBAC and token expiry on etcd 3.5 and 3.4 alike
    # A short token TTL forces the agent to log in again while it runs.
    etcd.stop()
    etcd.wipe()
    etcd.extra_args = ("--auth-token-ttl", "2")
    etcd.start()
    enable_auth(etcd)
    return etcd  # the etcd fixture stops it


async def test_rbac_least_privilege_and_token_expiry(
    auth_etcd: EtcdServer, http_service: HttpService, tmp_path: Path
) -> None:
    key = KEY.format(port=http_service.port)
    password_file = tmp_path / "etcd-password"
    password_file.write_text("agent-pw\n")
    # TTL 9: a keepalive every 3 s, longer than the 2 s token TTL. A steady agent sends
    # nothing else (the watch tells it of changes), so after a keepalive its token has
    # expired: a record deleted then is read back and put again only after a new login.
    # fall 5: this test is about the record staying put through re-logins, so a check that
    # misses its 0.15 s deadline twice on a loaded machine must not withdraw it.
    config = agent_config(auth_etcd.url, http_service.port, etcd_user="announcer",
                          etcd_password_file=str(password_file), ttl="9", fall="5")  # fmt: skip

    def mod_revision() -> int | None:
        out = json.loads(etcdctl(auth_etcd, "get", key, "-w", "json", user="root:root-pw"))
        kvs = out.get("kvs") or []
        return int(kvs[0]["mod_revision"]) if kvs else None

    def logins(agent) -> float:  # type: ignore[no-untyped-def]
        return sample(agent, "announcer_etcd_requests_total", operation="authenticate", outcome="ok")

    async with running(config) as agent:
        await eventually(lambda: mod_revision() is not None, what="announce with auth")
        revision = mod_revision()
        await keepalives_go_on(agent, 2)  # the record stays through keepalives on an expired token
        assert mod_revision() == revision  # the record never dropped nor was rewritten
        for _ in range(2):
            # Two keepalives, 3 s apart: more than the token's 2 s since the last put.
            await keepalives_go_on(agent, 2)
            logged_in = logins(agent)
            etcdctl(auth_etcd, "del", key, user="root:root-pw")
            await eventually(lambda: mod_revision() is not None, timeout=15, what="put back after a login")
            assert logins(agent) > logged_in
        http_service.status = 500
        await eventually(lambda: mod_revision() is None, what="withdraw with auth")
        http_service.status = 200
        await eventually(lambda: mod_revision() is not None, timeout=15, what="re-announce")
        assert sample(agent, "announcer_etcd_requests_total", operation="put", outcome="auth_error") == 0
    assert mod_revision() is None  # withdrawn at shutdown with the same least-privilege role


async def test_wrong_etcd_password_is_a_clear_error(auth_etcd: EtcdServer, http_service: HttpService) -> None:
    config = agent_config(auth_etcd.url, http_service.port, etcd_user="announcer:wrong-pw")
    with capture_logs() as logs:
        async with running(config) as agent:
            await eventually(
                lambda: any(e["event"] == "etcd refused the request" for e in logs), what="refusal"
            )
            assert not agent.registered
    refusals = [e for e in logs if e["event"] == "etcd refused the request"]
    assert len(refusals) == 1  # logged once, not once per retry
    assert "etcd login as 'announcer' failed" in refusals[0]["error"]
    assert "wrong-pw" not in str(logs)


async def test_partitioned_etcd_blocks_nothing(etcd: EtcdServer, http_service: HttpService) -> None:
    proxy = PartitionProxy(etcd.client_port)
    key = KEY.format(port=http_service.port)
    config = agent_config(proxy.url, http_service.port, ttl="3", shutdown_timeout="1", etcd_discovery="off")
    try:
        with capture_logs() as logs:
            async with running(config) as agent:
                await eventually(lambda: etcd.get(key) is not None, what="announce through the proxy")
                proxy.partitioned.set()
                await eventually(
                    lambda: agent.status.etcd_reachable is False, timeout=15, what="partition seen"
                )
                # the check loop goes on: it still sees the service go down and come back
                http_service.status = 503
                await eventually(lambda: agent.status.health is Health.FAILING, what="failing verdict")
                http_service.status = 200
                await eventually(lambda: agent.status.health is Health.PASSING, what="passing verdict")
                assert agent.health_report()[0] == 200
                # longer than the TTL: the lease runs out on the far side of the partition
                await eventually(lambda: etcd.get(key) is None, timeout=15, what="the lease to expire")
                proxy.partitioned.clear()
                await eventually(
                    lambda: etcd.get(key) is not None, timeout=15, what="record back after healing"
                )
                # and shutdown is bounded even when etcd goes silent again
                proxy.partitioned.set()
        assert any("the record goes when the lease expires, within" in e["event"] for e in logs)
    finally:
        proxy.close()


def _chain_without_client_auth(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for serverAuth only (the trap), and a client certificate."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def key() -> ec.EllipticCurvePrivateKey:
        return ec.generate_private_key(ec.SECP256R1())

    def cert(subject: str, public: object, issuer_key: object, issuer: str, *extensions: tuple[object, bool]):  # type: ignore[no-untyped-def]
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(public).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
        )  # fmt: skip
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, server_key, client_key = key(), key(), key()
    ca = cert(
        "test CA",
        ca_key.public_key(),
        ca_key,
        "test CA",
        (x509.BasicConstraints(ca=True, path_length=None), True),
    )
    server = cert(
        "127.0.0.1", server_key.public_key(), ca_key, "test CA",
        (x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),  # no CLIENT_AUTH: the trap
    )  # fmt: skip
    client = cert("announcer", client_key.public_key(), ca_key, "test CA",
                  (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False))  # fmt: skip
    files = {name: folder / f"{name}.pem" for name in ("ca", "server", "server-key", "client", "client-key")}
    for name, item in (("ca", ca), ("server", server), ("client", client)):
        files[name].write_bytes(item.public_bytes(serialization.Encoding.PEM))
    for name, private in (("server-key", server_key), ("client-key", client_key)):
        files[name].write_bytes(private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))  # fmt: skip
    return files


def test_a_server_certificate_without_client_auth_is_named(
    etcd: EtcdServer, http_service: HttpService, tmp_path: Path
) -> None:
    # etcdctl (gRPC) works against such a member; etcd's JSON gateway dials etcd's own gRPC
    # port with the server certificate and fails: announcer says what to fix.
    files = _chain_without_client_auth(tmp_path)
    etcd.stop()
    etcd.wipe()
    etcd.scheme = "https"
    etcd.extra_args = ("--cert-file", str(files["server"]), "--key-file", str(files["server-key"]),
                       "--trusted-ca-file", str(files["ca"]), "--client-cert-auth")  # fmt: skip
    etcd.start(wait=False)
    args = ["--service", "web", "--port", str(http_service.port), "--ip", "127.0.0.1", "--interval", "0.2",
            "--timeout", "0.1", "--ttl", "6", "--etcd-endpoints", etcd.url, "--etcd-cacert", str(files["ca"]),
            "--etcd-cert", str(files["client"]), "--etcd-key", str(files["client-key"])]  # fmt: skip
    with announcer_process(*args) as process:
        log = StderrLog(process.stderr)
        wait_until(lambda: any("clientAuth" in str(e.get("error")) for e in log.events), 30, "the hint")
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0
    unreachable = [e for e in log.events if e.get("event") == "etcd unreachable"]
    assert len(unreachable) == 1
    assert "extended key usage clientAuth" in str(unreachable[0]["error"])
