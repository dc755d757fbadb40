"""Every example a reader can copy from README.md and docs/ runs, as `announcer check`.

Each `announcer ...` command line, each TOML example and each ANNOUNCER_* environment
example in the pages is taken as written, with the machine-specific parts rewritten
for this test: addresses to loopback, the instance `%i` and `--port` to a real local
HTTP service, and the files a page names (CA bundles, password files, a host file) to
files the test makes. Then it is run as `announcer check`, which needs no etcd: a page
whose example the program refuses (exit 2) fails here, so the pages cannot drift from
the program again. Lines that cannot run here are listed in SKIPPED with the reason.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from tests.fake_engine import docker_container, fake_engine, published
from tests.servers import HttpService

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "units" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Lines that name announcer but are not a command line this test can run, and why.
SKIPPED = {
    "announcer [OPTIONS]": "a synopsis, not a command",
    "announcer run [OPTIONS]": "a synopsis, not a command",
    "announcer check [OPTIONS]": "a synopsis, not a command",
    "pip install": "installs from the package index, which tests do not reach",
    "python3 -m venv /opt/announcer": "an install step outside the checkout",
    "ln -sf /opt/announcer": "an install step outside the checkout",
    "docker build": "no Docker engine here; tests/test_image.py builds the image with podman",
    "podman build": "tests/test_image.py builds the image",
    "./test.sh": "the test suite itself",
    "./demo.sh": "tests/test_demo.py runs the demo",
}
COMMAND = re.compile(r"(?:^|[\s/])announcer((?:\s+(?:run|check))?(?:\s+-.*)?)$")


@dataclass
class Example:
    page: str
    line: int
    text: str


def code_blocks(page: Path) -> list[tuple[str, int, list[str]]]:
    """(language, first line number, lines) of every fenced and indented code block."""
    blocks: list[tuple[str, int, list[str]]] = []
    lines = page.read_text().splitlines()
    fence: str | None = None
    current: list[str] = []
    start = 0
    for number, line in enumerate(lines, 1):
        if fence is not None:
            if line.startswith("```"):
                blocks.append((fence, start, current))
                fence, current = None, []
            else:
                current.append(line)
        elif line.startswith("```"):
            fence, start, current = line[3:].strip(), number + 1, []
        elif line.startswith("    ") and (number == 1 or not lines[number - 2].strip() or current):
            if not current:
                start = number
            current.append(line[4:])
        elif current:
            blocks.append(("", start, current))
            current = []
    if current:
        blocks.append(("", start, current))
    return blocks


def examples() -> tuple[list[Example], list[Example], list[Example]]:
    commands, tomls, environments = [], [], []
    for page in PAGES:
        name = str(page.relative_to(ROOT))
        for language, start, lines in code_blocks(page):
            if language == "toml":
                tomls.append(Example(name, start, "\n".join(lines)))
                continue
            if language not in ("", "sh", "console"):
                continue
            env_lines = [line for line in lines if re.match(r"^(ANNOUNCER|ETCDCTL)_[A-Z_]+=", line)]
            if env_lines:
                environments.append(Example(name, start, "\n".join(env_lines)))
            for offset, line in enumerate(lines):
                command = line.split("  #", 1)[0].strip()
                runnable = "announcer" in command and not any(skip in command for skip in SKIPPED)
                if runnable and COMMAND.search(command):
                    commands.append(Example(name, start + offset, command))
    return commands, tomls, environments


COMMANDS, TOMLS, ENVIRONMENTS = examples()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Stand-ins for the files the pages name: a real CA, a client certificate, a password."""
    folder = tmp_path_factory.mktemp("doc-files")
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    made = {"ca": folder / "ca.pem", "cert": folder / "client.pem", "key": folder / "client-key.pem"}
    ca.cert_pem.write_to_path(str(made["ca"]))
    leaf.cert_chain_pems[0].write_to_path(str(made["cert"]))
    leaf.private_key_pem.write_to_path(str(made["key"]))
    made["password"] = folder / "password"
    made["password"].write_text("not-the-real-one\n")
    made["password"].chmod(0o600)
    made["program"] = folder / "is-ready"
    made["program"].write_text("#!/bin/sh\nexit 0\n")
    made["program"].chmod(0o755)
    return made


def rewritten(text: str, files: dict[str, Path], port: int) -> str:
    """The example with this machine's stand-ins: loopback, the local service, the test's files."""

    def path(match: re.Match[str]) -> str:
        found = match.group(0)
        if "password" in found:
            return str(files["password"])
        if "key" in found:
            return str(files["key"])
        if "client" in found or found.endswith("cert.pem"):
            return str(files["cert"])
        return str(files["ca"])

    text = re.sub(r"/etc/(?:ssl|announcer)/[\w./-]*\.pem|/etc/announcer/[\w.-]*password", path, text)
    text = re.sub(r"/usr/local/bin/[\w.-]+", str(files["program"]), text)  # a readiness program
    text = re.sub(r"\b(?:\d{1,3}\.){3}\d{1,3}\b", "127.0.0.1", text)
    text = text.replace("%i", str(port))
    return re.sub(r"(--port[ =])\d+", rf"\g<1>{port}", text)


def docker_engine(tmp_path: Path, port: int) -> str:
    """A fake Docker engine (tests/fake_engine.py) in a thread of its own, for this test's run."""
    path = tmp_path / "docker.sock"
    ready = threading.Event()

    async def serve() -> None:
        async with fake_engine(path) as engine:
            doc = docker_container(
                "ab" * 32, "web", ports=published(80, port), labels={"announcer.service": "web"}
            )
            engine.add(doc, announce=False)
            ready.set()
            await asyncio.Event().wait()

    threading.Thread(target=asyncio.run, args=(serve(),), daemon=True).start()
    assert ready.wait(10)
    return f"unix://{path}"


def run_check(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # {ip} is always loopback here: without --ip the default route's address would be checked.
    full_env = {**os.environ, "ANNOUNCER_IP": "127.0.0.1", "ANNOUNCER_LOG_FORMAT": "json", **(env or {})}
    full_env.pop("ANNOUNCER_REQUIRE_SERVICES", None)
    return subprocess.run(
        [sys.executable, "-m", "announcer", "check", "--timeout", "0.5", *args],
        capture_output=True, text=True, env=full_env, timeout=60, check=False,
    )  # fmt: skip


def _accepted(result: subprocess.CompletedProcess[str], where: str) -> None:
    assert result.returncode in (0, 1), f"{where}: exit {result.returncode}: {result.stderr.strip()[-400:]}"
    assert "Traceback" not in result.stderr, where
    assert "would announce" in result.stdout or "would NOT announce" in result.stdout, where


def test_the_pages_have_examples_to_run() -> None:
    # Guards the extraction itself: a page change that hid every example would pass silently.
    assert len(COMMANDS) >= 10
    assert len(TOMLS) >= 2
    assert ENVIRONMENTS


@pytest.mark.parametrize("example", COMMANDS, ids=lambda e: f"{e.page}:{e.line}")
def test_every_command_line_runs(
    example: Example, files: dict[str, Path], http_service: HttpService, tmp_path: Path
) -> None:
    words = shlex.split(rewritten(example.text, files, http_service.port))
    args = words[next(i for i, w in enumerate(words) if w.rsplit("/", 1)[-1] == "announcer") + 1 :]
    if args[:1] in (["run"], ["check"]):
        args = args[1:]
    if "--config" in args:  # the host file the page shows just above the line
        (toml,) = [t for t in TOMLS if t.page == example.page and t.line < example.line][-1:]
        host_file = tmp_path / "host.toml"
        host_file.write_text(rewritten(toml.text, files, http_service.port))
        args[args.index("--config") + 1] = str(host_file)
    # A unit gives the service name in its environment (ANNOUNCER_SERVICE=apache); the
    # container examples read a fake engine whose one container publishes the test's service.
    env = {"ANNOUNCER_SERVICE": "apache"}
    if "--containers" in args:
        env = {"DOCKER_HOST": docker_engine(tmp_path, http_service.port)}
    result = run_check(args, env=env)
    if args == ["--version"]:
        assert result.stdout.startswith("announcer "), result
        return
    _accepted(result, f"{example.page}:{example.line}: {example.text}")
    checks = [args[i + 1] for i, a in enumerate(args) if a == "--check"]
    if "--config" not in args and all(c == "tcp" or c.startswith(("http", "exec")) for c in checks):
        assert result.returncode == 0, f"{example.text}: {result.stdout}"  # a service the test runs


@pytest.mark.parametrize("example", TOMLS, ids=lambda e: f"{e.page}:{e.line}")
def test_every_toml_example_is_accepted(
    example: Example, files: dict[str, Path], http_service: HttpService, tmp_path: Path
) -> None:
    config = tmp_path / "example.toml"
    config.write_text(rewritten(example.text, files, http_service.port))
    result = run_check(["--config", str(config)])
    _accepted(result, f"{example.page}:{example.line}")


@pytest.mark.parametrize("example", ENVIRONMENTS, ids=lambda e: f"{e.page}:{e.line}")
def test_every_environment_example_is_accepted(
    example: Example, files: dict[str, Path], http_service: HttpService
) -> None:
    env = dict(line.split("=", 1) for line in rewritten(example.text, files, http_service.port).splitlines())
    result = run_check(["--service", "apache", "--port", str(http_service.port)], env=env)
    _accepted(result, f"{example.page}:{example.line}")
    assert result.returncode == 0, result.stdout
