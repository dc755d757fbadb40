"""The table of settings: each setting is one entry, and everything else is made from it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import typer

from announcer import cli, settings
from announcer.runner import keep_process_settings
from announcer.settings import SERVICE, SETTINGS, Setting
from announcer.sources import env_layer, read_file

ROOT = Path(__file__).resolve().parent.parent


def test_adding_a_setting_touches_one_table_entry(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    spare = Setting(
        "spare_part", "TEXT", "A setting this test adds.", SERVICE, commands=frozenset({"run", "check"})
    )
    monkeypatch.setattr(settings, "SETTINGS", (*SETTINGS, spare))
    app = cli.make_app()
    command = typer.main.get_command(app)

    assert "--spare-part" in [o for p in command.params for o in p.opts]
    assert "A setting this test adds." in cli.help_text(command, "announcer")
    monkeypatch.setattr(cli, "app", app)
    assert "--spare-part" in cli.help_text(cli.check_command(), "announcer check")

    handed: dict[str, Any] = {}
    monkeypatch.setattr(cli, "_run", lambda mode, given: handed.update(given) or 0)
    app(["--service", "web", "--spare-part", "flag value"], standalone_mode=False)
    assert handed["spare_part"] == "flag value"

    assert env_layer({"ANNOUNCER_SPARE_PART": "env value"}) == {"spare_part": "env value"}

    host_file = tmp_path / "host.toml"
    host_file.write_text('spare_part = "top"\n[[services]]\nservice = "web"\nspare_part = "own"\n')
    data = read_file(str(host_file))
    assert (data["spare_part"], data["services"][0]["spare_part"]) == ("top", "own")


def test_the_table_names_each_setting_once() -> None:
    names = [s.name for s in SETTINGS]
    flags = [s.flag for s in SETTINGS]
    envs = [s.env for s in SETTINGS if s.in_env]
    assert len(set(names)) == len(names)
    assert len(set(flags)) == len(flags)
    assert len(set(envs)) == len(envs)
    assert {s.restart for s in SETTINGS if s.restart} <= set(settings.Config.__dataclass_fields__)


def test_a_reload_keeps_the_settings_only_a_restart_changes() -> None:
    from announcer.config import Ambient, load_config

    ambient = Ambient(hostname=lambda: "node-1", ip=lambda: "10.0.0.1")
    old = load_config({"service": "web", "port": "80", "ttl": "30"}, {}, ambient)
    new = load_config(
        {"service": "web", "port": "81", "ttl": "60", "log_level": "debug", "shutdown_timeout": "9"},
        {},
        ambient,
    )
    kept = keep_process_settings(old, new)
    assert (kept.ttl, kept.log_level) == (30, "info")  # restart-only: kept
    assert (kept.services[0].port, kept.shutdown_timeout) == (81, 9.0)  # applied


def test_the_reference_table_lists_every_option_of_the_table() -> None:
    page = (ROOT / "docs" / "reference.md").read_text()
    rows = [line for line in page.splitlines() if line.startswith("| `--")]
    documented = {flag for row in rows for flag in re.findall(r"`(--[a-z-]+)", row.split("|")[1])}
    assert documented == {s.flag for s in SETTINGS}
