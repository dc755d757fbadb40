"""Issue #10.6: every bad configuration is one line and exit 2 before anything touches etcd.

First the classes the fuzzing pass found, each by name; then properties (hypothesis)
over the flags, the environment and the TOML file: a configuration either loads
into a valid record under a valid key, or is refused with a ConfigError of one
line. Never another exception.
"""

from __future__ import annotations

import json
import os
import string
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from announcer.cli import main
from announcer.config import Ambient, Config, ServiceConfig, load_config
from announcer.errors import ConfigError
from announcer.settings import SETTINGS

AMBIENT = Ambient(hostname=lambda: "node-1", ip=lambda: "127.0.0.1")
WEB = {"service": "web", "port": "8080", "ip": "127.0.0.1"}


def _file(tmp_path: Path, content: str | bytes, name: str = "c.toml") -> str:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


def _fifo(tmp_path: Path) -> str:
    path = tmp_path / "fifo"
    os.mkfifo(path)
    return str(path)


# (flags on top of WEB, or a callable of tmp_path giving them; a part of the one-line message)
CASES: list[tuple[str, Any, str]] = [
    ("key format spec", {"key": "/s/{service:d}"}, "without ! or :"),
    ("key conversion", {"key": "/s/{service!z}"}, "without ! or :"),
    ("key padding", {"key": "/s/{port:>9999}"}, "without ! or :"),
    ("key nested braces", {"key": "/s/{service:{port}}"}, "without ! or :"),
    ("key unbalanced", {"key": "/s/{service"}, "is not a valid template"),
    ("key blank", {"key": " "}, "--key must be a non-empty string"),
    ("key root", {"key": "/"}, "must start with '/' and name something"),
    ("key relative", {"key": "services/{service}"}, "must start with '/'"),
    ("key newline", {"key": "/s/a\nb"}, "control or unprintable"),
    ("key NUL", {"key": "/s/a\0b"}, "control or unprintable"),
    ("key dot-dot segment", {"key": "/services/{hostname}/../x"}, "has an empty, '.' or '..' segment"),
    ("key dot segment", {"key": "/services/./{port}"}, "has an empty, '.' or '..' segment"),
    ("key empty segment", {"key": "/services//{port}"}, "has an empty, '.' or '..' segment"),
    ("key trailing slash", {"key": "/services/{port}/"}, "has an empty, '.' or '..' segment"),
    ("key huge", {"key": "/" + "k" * 100_000}, "is longer than"),
    ("meta huge", {"meta": ["big=" + "v" * 1_000_000]}, "is longer than"),
    ("meta newline", {"meta": ["a=b\nc"]}, "control or unprintable"),
    ("meta record too big", {"meta": [f"k{i}={'v' * 1000}" for i in range(9)]}, "bytes of JSON"),
    ("hostname surrogate", {"hostname": "node\udcff"}, "unprintable character ('\\udcff')"),
    ("hostname control", {"hostname": "no\x1bde"}, "control or unprintable"),
    ("spec NUL", {"checks": ["http://127.0.0.1:80/\0"]}, "control or unprintable"),
    ("spec bad url", {"checks": ["http://[::1/"]}, "http check"),
    ("http port out of range", {"checks": ["http://127.0.0.1:99999/"]}, "Port out of range"),
    ("tcp port out of range", {"checks": ["tcp://127.0.0.1:70000"]}, "Port out of range"),
    ("exec directory", {"checks": ["exec:/tmp"]}, "is not an executable file"),
    ("ttl 2^63", {"ttl": str(2**63)}, "--ttl must be a whole number from 3 to 9000000000"),
    ("interval huge", {"interval": "1e308"}, "at most 86400"),
    ("interval nan", {"interval": "nan"}, "--interval must be"),
    ("drain negative", {"drain": "-1"}, "--drain must be zero or more"),
    ("flap limit shape", {"flap_limit": "3"}, "must look like N/SECONDS"),
    ("flap limit zero", {"flap_limit": "0/60"}, "--flap-limit must be a whole number from 1"),
    ("maintenance placeholder", {"maintenance_file": "/run/{nope}.maint"}, "unknown placeholder"),
    ("endpoint credentials", {"etcd_endpoints": "http://u:pw@127.0.0.1:2379"}, "carries credentials"),
    ("endpoint bad port", {"etcd_endpoints": "http://127.0.0.1:99999"}, "must be a URL like"),
    ("config /dev/zero", {"config": "/dev/zero"}, "is not a regular file"),
    ("config FIFO", lambda p: {"config": _fifo(p)}, "is not a regular file"),
    ("config directory", {"config": "/tmp"}, "is not a regular file"),
    ("config not UTF-8", lambda p: {"config": _file(p, b'service = "\xff"\n')}, "is not UTF-8 text"),
    ("config too big", lambda p: {"config": _file(p, "#" * (2 * 1024 * 1024))}, "is larger than"),
    ("config deep", lambda p: {"config": _file(p, "a = " + "[" * 100_000 + "]" * 100_000)}, "config file"),
    ("config key = 5", lambda p: {"config": _file(p, "key = 5\n")}, "key must be a string, got 5"),
    ("config port = true", lambda p: {"config": _file(p, "port = true\n")}, "port must be"),
    ("config meta = 5", lambda p: {"config": _file(p, "meta = 5\n")}, "meta must be"),
    ("config checks table", lambda p: {"config": _file(p, "checks = 5\n")}, "checks must be"),
    ("config bad escape", lambda p: {"config": _file(
        p, '[[checks]]\nspec = "tcp://127.0.0.1:1"\nsend = "\\\\x4"\n')}, "has a bad escape"),
    ("config empty expect", lambda p: {"config": _file(
        p, '[[checks]]\nspec = "tcp://127.0.0.1:1"\nexpect = ""\n')}, "is empty"),
    ("config empty status", lambda p: {"config": _file(p, '[[checks]]\nspec = "http"\nstatus = []\n')},
     "at least one code"),
    ("config header CRLF", lambda p: {"config": _file(
        p, '[[checks]]\nspec = "http"\n[checks.headers]\nX-A = "b\\r\\nX-Injected: 1"\n')}, "one-line value"),
    ("config header name", lambda p: {"config": _file(
        p, '[[checks]]\nspec = "http"\n[checks.headers]\n"X A" = "b"\n')}, "must be a token"),
    ("password file not UTF-8", lambda p: {"etcd_user": "root", "etcd_password_file": _file(p, b"\xff\xfe", "pw")},
     "is not UTF-8 text"),
    ("password file /dev/zero", {"etcd_user": "root", "etcd_password_file": "/dev/zero"}, "is not a regular file"),
    ("check password file FIFO", lambda p: {"config": _file(
        p, f'[[checks]]\nspec = "postgresql://u@127.0.0.1/db"\npassword_file = "{_fifo(p)}"\n')},
     "is not a regular file"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "extra", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_configuration_is_one_line_exit_2(case: str, extra: Any, message: str, tmp_path: Path) -> None:
    flags = {**WEB, **(extra(tmp_path) if callable(extra) else extra)}
    with pytest.raises(ConfigError) as info:
        load_config(flags, {}, AMBIENT)
    assert message in str(info.value), case
    assert len(" ".join(str(info.value).split())) < 400  # short enough to read on one line


ENV_CASES = [c for c in CASES[:12] if c[0] != "key blank"]  # a blank variable means "not set"


@pytest.mark.parametrize(("case", "extra", "message"), ENV_CASES, ids=[c[0] for c in ENV_CASES])
def test_the_same_rules_hold_in_the_environment(case: str, extra: Any, message: str, tmp_path: Path) -> None:
    env = {"ANNOUNCER_" + k.upper(): (",".join(v) if isinstance(v, list) else v) for k, v in extra.items()}
    env = {k.replace("ANNOUNCER_CHECKS", "ANNOUNCER_CHECK"): v for k, v in env.items()}
    with pytest.raises(ConfigError) as info:
        load_config(WEB, env, AMBIENT)
    assert message in str(info.value), case


def test_the_cli_prints_one_line_and_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    for argv in (["--key", "/s/{service!r}"], ["--meta", "a=" + "\x07"], ["--config", "/dev/zero"],
                 ["--check", "http://127.0.0.1:99999/"]):  # fmt: skip
        monkeypatch.setattr(sys, "argv", ["announcer", "check", "--service", "web", "--port", "1", *argv])
        with pytest.raises(SystemExit) as exit_info:
            main()
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ")
        assert err.count("\n") == 1


# -- properties ---------------------------------------------------------------------------

NASTY_TEXT = st.text(
    st.characters(codec="utf-8")
    | st.sampled_from(["\0", "\n", "\r", "\udcff", "{", "}", ":", "!", "/", "%"]),
    max_size=40,
)
TEMPLATE = st.lists(
    st.sampled_from(["/", "services", "{service}", "{ip}", "{port}", "{hostname}", "{", "}", "{port:>9}",
                     "{service!r}", "{nope}", " ", "\n", "x"]), max_size=8,
).map("".join)  # fmt: skip
VALUE = st.one_of(
    NASTY_TEXT, st.integers(-(2**70), 2**70).map(str), st.floats(allow_nan=True).map(str),
    st.sampled_from(["0", "1", "3", "30", "0.5", "65535", "65536", "-1", "", " ", "inf", "1e999"]),
)  # fmt: skip
SPEC = st.one_of(
    st.sampled_from(["http", "https", "tcp", "http://127.0.0.1:1/", "tcp://127.0.0.1:0", "exec:/bin/true",
                     "exec:/tmp", "exec:", "redis://127.0.0.1:6379/0", "gopher://x", "http://[::1/",
                     "postgresql://u:p@127.0.0.1:5432/db?password=x", "http://127.0.0.1:99999/"]),
    NASTY_TEXT,
)  # fmt: skip
FLAGS = st.fixed_dictionaries(
    {"service": st.one_of(st.just("web"), NASTY_TEXT), "port": st.one_of(st.just("8080"), VALUE)},
    optional={
        "key": TEMPLATE, "hostname": NASTY_TEXT, "ip": st.one_of(st.just("10.0.0.1"), NASTY_TEXT),
        "meta": st.lists(st.tuples(NASTY_TEXT, NASTY_TEXT).map("=".join), max_size=3),
        "checks": st.lists(SPEC, max_size=3), "interval": VALUE, "timeout": VALUE, "rise": VALUE,
        "fall": VALUE, "ttl": VALUE, "etcd_timeout": VALUE, "shutdown_timeout": VALUE, "drain": VALUE,
        "etcd_endpoints": st.one_of(st.just("http://127.0.0.1:2379"), NASTY_TEXT),
        "log_format": NASTY_TEXT, "log_level": VALUE, "metrics_address": NASTY_TEXT,
        "flap_limit": st.one_of(st.just("3/60"), NASTY_TEXT), "maintenance_file": TEMPLATE,
    },
)  # fmt: skip


def _valid(loaded: Config) -> None:
    """What a loaded configuration promises the running agent."""
    for config in loaded.services:
        _valid_service(config)


def _valid_service(config: ServiceConfig) -> None:
    assert config.key.startswith("/")
    assert config.key.isprintable()
    assert len(config.key.encode()) <= 1024
    record = config.record.to_json()
    assert json.loads(record.encode("utf-8"))["port"] == config.port
    for check in config.checks:
        check.name.encode("utf-8")
    assert 0 < config.timeout < config.interval


def _load_or_refuse(flags: dict[str, Any], env: dict[str, str] | None = None) -> None:
    try:
        config = load_config(flags, env or {}, AMBIENT)
    except ConfigError as exc:
        assert str(exc)  # noqa: PT017 - refusing is one of the two allowed outcomes
        return
    _valid(config)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(FLAGS)
def test_any_flags_load_or_are_refused_in_one_line(flags: dict[str, Any]) -> None:
    _load_or_refuse(flags)


FILE_KEYS = sorted(s.name for s in SETTINGS if s.in_file)
ENV_NAMES = sorted(s.env for s in SETTINGS if s.in_env and s.name != "config")


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(ENV_NAMES), VALUE, max_size=6))
def test_any_environment_loads_or_is_refused(env: dict[str, str]) -> None:
    _load_or_refuse({"service": "web", "port": "80"}, env)


TOML_VALUE = st.one_of(
    NASTY_TEXT.map(json.dumps), st.integers(-(2**70), 2**70).map(str), st.booleans().map(str).map(str.lower),
    st.sampled_from(["[]", "[1, 2]", '["a", 1]', "{}", '{ a = "b" }', "1.5", "inf", "nan", '"""x"""']),
)  # fmt: skip


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.dictionaries(st.sampled_from(FILE_KEYS), TOML_VALUE, max_size=6),
    st.binary(max_size=60),
)
def test_any_toml_file_loads_or_is_refused(
    tmp_path_factory: pytest.TempPathFactory, values: dict[str, str], noise: bytes
) -> None:
    folder = tmp_path_factory.mktemp("fuzz")
    text = "".join(f"{name} = {value}\n" for name, value in values.items())
    for content in (text.encode("utf-8", "surrogateescape"), noise, text.encode("utf-8", "replace") + noise):
        path = folder / "c.toml"
        path.write_bytes(content)
        _load_or_refuse({"service": "web", "port": "80", "config": str(path)})


def test_every_printable_key_character_is_kept_or_refused() -> None:
    for char in string.printable:
        _load_or_refuse({**WEB, "key": f"/s/{char}/{{port}}"})
