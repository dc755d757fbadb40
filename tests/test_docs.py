"""Every link a reader meets in the README and the docs resolves inside the repository."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "units" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_every_relative_link_resolves() -> None:
    broken = []
    for page in PAGES:
        for target in LINK.findall(page.read_text()):
            if re.match(r"^[a-z]+:", target) or target.startswith("#"):
                continue
            path = (page.parent / target.split("#", 1)[0]).resolve()
            if not path.exists() or ROOT not in path.parents:
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert broken == []


def test_the_first_screen_has_the_two_commands_and_the_install() -> None:
    first_screen = "\n".join((ROOT / "README.md").read_text().splitlines()[:30])
    assert "./demo.sh" in first_screen
    assert "./test.sh" in first_screen
    assert "pip install 'etcd-announcer[all]'" in first_screen
    assert "shared/" not in (ROOT / "README.md").read_text()


def test_the_reference_table_shows_the_defaults_the_code_has() -> None:
    # Each default is written once, in announcer.settings; the table must agree with it.
    from announcer.settings import Config, ServiceConfig, default

    rows = {
        line.split("`")[1].split()[0]: line.rstrip(" |").rsplit("|", 1)[1].strip()
        for line in (ROOT / "docs" / "reference.md").read_text().splitlines()
        if line.startswith("| `--")
    }
    for flag, cls, name in [
        ("--interval", ServiceConfig, "interval"), ("--timeout", ServiceConfig, "timeout"),
        ("--ttl", Config, "ttl"), ("--shutdown-timeout", Config, "shutdown_timeout"),
        ("--drain", ServiceConfig, "drain"), ("--log-format", Config, "log_format"),
    ]:  # fmt: skip
        value = default(cls, name)
        assert rows[flag] == (f"{value:g}" if isinstance(value, float) else str(value)), flag
    assert rows["--rise"] == f"{default(ServiceConfig, 'rise')} / {default(ServiceConfig, 'fall')}"
