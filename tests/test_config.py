"""Configuration: precedence of the layers, and every bad input as one line with exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from announcer.checks.http import HttpCheck
from announcer.checks.tcp import TcpCheck
from announcer.cli import main
from announcer.config import Ambient, load_config
from announcer.errors import ConfigError

AMBIENT = Ambient(hostname=lambda: "node-1", ip=lambda: "10.9.9.9")


def load(flags: dict[str, Any] | None = None, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return load_config(flags or {}, env or {}, AMBIENT)


def test_defaults() -> None:
    cfg = load({"service": "web", "port": "5555"})
    svc = cfg.services[0]
    assert (cfg.services[0].ip, cfg.services[0].hostname, cfg.services[0].key) == (
        "10.9.9.9",
        "node-1",
        "/services/web/10.9.9.9:5555",
    )
    assert (svc.interval, svc.timeout, svc.rise, svc.fall, cfg.ttl) == (2.0, 1.0, 2, 2, 30)
    assert cfg.etcd.endpoints == ("http://127.0.0.1:2379",)
    assert cfg.shutdown_timeout == 5.0
    [check] = cfg.services[0].checks
    assert isinstance(check, HttpCheck)
    assert check.url == "http://10.9.9.9:5555/"
    assert cfg.services[0].record.to_json() == '{"host":"node-1","ipv4_addr":"10.9.9.9","port":5555}'


def test_precedence_flags_env_file_ambient(tmp_path: Path) -> None:
    file = tmp_path / "a.toml"
    file.write_text(
        'service = "from-file"\nport = 1\ninterval = 7\ntimeout = 3\nttl = 40\n'
        'etcd_endpoints = ["http://file:2379"]\n[meta]\nzone = "file"\nrack = "r1"\n'
    )
    env = {
        "ANNOUNCER_CONFIG": str(file),
        "ANNOUNCER_PORT": "2",
        "ANNOUNCER_TTL": "50",
        "ANNOUNCER_META": "zone=env",
        "ETCDCTL_ENDPOINTS": "http://ambient:2379",
        "COREOS_PRIVATE_IPV4": "10.0.0.2",
        "COREOS_PUBLIC_IPV4": "10.0.0.1",
    }
    cfg = load({"port": "3", "meta": ["extra=flag"]}, env)
    assert cfg.services[0].port == 3  # flag > env > file
    assert cfg.ttl == 50  # env > file
    assert cfg.services[0].service == "from-file"
    assert cfg.services[0].interval == 7.0
    assert cfg.etcd.endpoints == ("http://file:2379",)  # file > ambient
    assert cfg.services[0].ip == "10.0.0.1"  # COREOS_PUBLIC_IPV4 before PRIVATE, before the host's
    assert dict(cfg.services[0].meta) == {"zone": "env", "rack": "r1", "extra": "flag"}  # merged key by key


def test_ambient_etcd_and_private_ip() -> None:
    cfg = load(
        {"service": "a", "port": "1"},
        {"ETCDCTL_ENDPOINTS": "http://a:1,http://b:2", "COREOS_PRIVATE_IPV4": "10.0.0.2"},
    )
    assert cfg.etcd.endpoints == ("http://a:1", "http://b:2")
    assert cfg.services[0].ip == "10.0.0.2"


def test_checks_from_file_with_options(tmp_path: Path) -> None:
    file = tmp_path / "c.toml"
    file.write_text(
        'service = "db"\nport = 8080\n'
        '[[checks]]\nspec = "http://{ip}:{port}/health"\nmethod = "HEAD"\nstatus = [200, "300-302"]\n'
        'headers = {Host = "example"}\nbody = "ok"\n'
        '[[checks]]\nspec = "tcp"\nsend = "PING\\r\\n"\nexpect = "+PONG"\n'
    )
    cfg = load({"config": str(file), "ip": "127.0.0.1"})
    http, tcp = cfg.services[0].checks
    assert isinstance(http, HttpCheck)
    assert isinstance(tcp, TcpCheck)
    assert http.url == "http://127.0.0.1:8080/health"
    assert http.method == "HEAD"
    assert http.statuses == ((200, 200), (300, 302))
    assert dict(http.headers) == {"Host": "example"}
    assert (tcp.host, tcp.port, tcp.send, tcp.expect) == ("127.0.0.1", 8080, b"PING\r\n", b"+PONG")


def test_env_check_list_format() -> None:
    cfg = load(
        {"service": "a", "port": "80", "ip": "127.0.0.1"},
        {"ANNOUNCER_CHECK": "tcp; http://{ip}:{port}/x\nhttp"},
    )
    assert [c.name for c in cfg.services[0].checks] == [
        "tcp://127.0.0.1:80",
        "http://127.0.0.1:80/x",
        "http://127.0.0.1:80/",
    ]


def test_flags_replace_file_checks(tmp_path: Path) -> None:
    file = tmp_path / "c.toml"
    file.write_text('service = "a"\nport = 80\n[[checks]]\nspec = "tcp"\n')
    cfg = load({"config": str(file), "checks": ["http"], "ip": "127.0.0.1"})
    assert [c.name for c in cfg.services[0].checks] == ["http://127.0.0.1:80/"]


def test_password_is_masked_in_check_names() -> None:
    cfg = load({"service": "a", "port": "80", "checks": ["http://user:hunter2@127.0.0.1:80/"]})
    assert cfg.services[0].checks[0].name == "http://user:***@127.0.0.1:80/"


def test_etcd_timeout_must_fit_the_keepalive_budget() -> None:
    # TTL 30: a keepalive every 10 s; with 3 endpoints each may take at most 10/3 s.
    three = "http://a:1,http://b:2,http://c:3"
    with pytest.raises(ConfigError, match=r"too long for --ttl 30 with 3 endpoint\(s\)"):
        load({"service": "a", "port": "1", "etcd_endpoints": three, "etcd_timeout": "3.5"})
    assert (
        load({"service": "a", "port": "1", "etcd_endpoints": three, "etcd_timeout": "3.3"}).etcd.timeout
        == 3.3
    )
    with pytest.raises(ConfigError, match="use --etcd-timeout 1 or less"):
        load({"service": "a", "port": "1", "ttl": "3", "etcd_timeout": "1.5"})
    # the defaults always fit: half the budget, at most 2 s
    assert load({"service": "a", "port": "1", "ttl": "3"}).etcd.timeout == 0.5
    assert load({"service": "a", "port": "1", "etcd_endpoints": three}).etcd.timeout == 5 / 3
    assert load({"service": "a", "port": "1"}).etcd.timeout == 2.0


WEB = ["--service", "web", "--port", "1"]
BAD_INPUTS = [
    ([], "--service is required"),
    (["--service", "web"], "--port is required"),
    (["--service", "web", "--port", "0"], "--port must be a whole number from 1 to 65535"),
    (["--service", "web", "--port", "http"], "--port must be a whole number"),
    (["--service", "web", "--port", "70000"], "--port must be a whole number from 1 to 65535"),
    (["--service", "a/b", "--port", "1"], "--service 'a/b' may hold only"),
    ([*WEB, "--ip", "10.0.0.300"], "--ip must be an IPv4 address"),
    ([*WEB, "--ip", "::1"], "--ip must be an IPv4 address"),
    (
        [*WEB, "--interval", "1", "--timeout", "1"],
        "--timeout (1s) must be below",
    ),
    ([*WEB, "--interval", "-2"], "--interval must be a positive number"),
    ([*WEB, "--rise", "0"], "--rise must be a whole number of at least 1"),
    ([*WEB, "--ttl", "2"], "--ttl must be a whole number from 3 to 9000000000"),
    ([*WEB, "--check", "gopher://x"], "unknown check kind 'gopher'"),
    ([*WEB, "--check", "tcp://nohost"], "must look like tcp://host:port"),
    ([*WEB, "--meta", "port=2"], "may not replace the record field 'port'"),
    ([*WEB, "--meta", "novalue"], "must look like KEY=VALUE"),
    ([*WEB, "--key", "/x/{nope}"], "uses unknown placeholder 'nope'"),
    ([*WEB, "--etcd-endpoints", "127.0.0.1:2379"], "must be a URL like"),
    ([*WEB, "--log-format", "xml"], "--log-format must be one of"),
    ([*WEB, "--config", "/nonexistent.toml"], "config file: cannot read /nonexistent.toml"),
    ([*WEB, "--etcd-cacert", "/nonexistent.pem"], "--etcd-cacert: cannot read"),
    ([*WEB, "--etcd-user", "root"], "needs a password"),
    (["--nonsense"], "No such option: --nonsense"),
    (["--port"], "requires an argument"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_INPUTS, ids=[" ".join(a) or "empty" for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2(
    argv: list[str], message: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("ANNOUNCER_SERVICE", "ANNOUNCER_PORT", "ANNOUNCER_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sys, "argv", ["announcer", "check", "--ip", "127.0.0.1", *argv])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: "), err
    assert err.count("\n") == 1, err
    assert message in err


def test_bad_file_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for text, message in [
        ("service = \n", "is not valid TOML"),
        ('service = "a"\nport = 1\nintervall = 3\n', "unknown setting(s) 'intervall'"),
        (
            'service = "a"\nport = 1\n[[checks]]\nspec = "http"\nmethd = "GET"\n',
            "unknown http check option(s): methd",
        ),
        ('service = "a"\nport = 1\n[[checks]]\nspec = "http"\nstatus = ["2xx"]\n', "must be a code like 200"),
        ('service = "a"\nport = 1\n[[checks]]\nspec = "ftp://x"\n', "unknown check kind"),
    ]:
        file = tmp_path / "bad.toml"
        file.write_text(text)
        monkeypatch.setattr(sys, "argv", ["announcer", "check", "--config", str(file)])
        with pytest.raises(SystemExit) as exit_info:
            main()
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: "), err
        assert err.count("\n") == 1, err
        assert message in err


def test_real_process_bad_input_has_no_traceback() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "announcer", "--service", "web", "--port", "99999"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr == "error: --port must be a whole number from 1 to 65535, got '99999'\n"
    assert "Traceback" not in done.stdout + done.stderr


def test_version() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "announcer", "--version"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0
    assert done.stdout.startswith("announcer ")
