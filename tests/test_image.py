"""The sidekick image (#13.3): built from the Dockerfile with podman, run, checked and stopped."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.servers import EtcdServer, HttpService, require, wait_until
from tests.test_containers_podman import PodmanApi

ROOT = Path(__file__).resolve().parent.parent
BASE = "localhost/bookworm-python3:latest"  # made by scripts/make-image-base.sh
IMAGE = "localhost/announcer:test"
# podman starting containers loads the whole machine in bursts: test.sh runs these tests in a
# pass of their own, so the short-TTL tests beside them are not starved.
pytestmark = pytest.mark.engine


def podman(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, check=check)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> str:
    if shutil.which("podman") is None:
        require("podman not installed (scripts/make-image-base.sh installs it)")
    if podman("image", "exists", BASE, check=False).returncode != 0:
        require(f"no base image {BASE} (scripts/make-image-base.sh makes it)")
    # pip inside the build reaches the package index only trusting the host's CA bundle.
    pip_conf = tmp_path_factory.mktemp("pip") / "pip.conf"
    pip_conf.write_text("[global]\ncert = /etc/ssl/host-ca.crt\n")
    podman(
        "build", "--format", "docker", "--build-arg", f"PYTHON_IMAGE={BASE}",
        "-v", "/etc/ssl/certs/ca-certificates.crt:/etc/ssl/host-ca.crt:ro", "-v", f"{pip_conf}:/etc/pip.conf:ro",
        "-t", IMAGE, str(ROOT),
    )  # fmt: skip
    return IMAGE


@pytest.mark.slow
def test_the_image_runs_as_the_sidekick_and_stops_cleanly(
    image: str, etcd: EtcdServer, http_service: HttpService
) -> None:
    inspect = json.loads(podman("image", "inspect", image).stdout)[0]
    assert inspect["Config"]["User"] == "10001"  # not root
    assert "announcer.healthcheck" in " ".join(inspect["Healthcheck"]["Test"])  # kept: the docker format
    name = f"announcer-test-{os.getpid()}"
    key = f"/services/web/127.0.0.1:{http_service.port}"
    podman("run", "-d", "--name", name, "--network", "host", image,
           "--service", "web", "--port", str(http_service.port), "--ip", "127.0.0.1",
           "--etcd-endpoints", etcd.url, "--interval", "0.5", "--timeout", "0.3")  # fmt: skip
    try:
        wait_until(lambda: etcd.get(key) is not None, 60, "announced from the container")
        health = podman("healthcheck", "run", name, check=False)
        assert health.returncode == 0, health.stdout + health.stderr
        assert podman("exec", name, "id", "-u").stdout.strip() == "10001"
        assert (
            podman(
                "exec", name, "test", "-f", "/opt/announcer/share/man/man1/announcer.1", check=False
            ).returncode
            == 0
        )
        podman("stop", "--time", "20", name)
        state = json.loads(podman("inspect", name).stdout)[0]["State"]
        assert state["ExitCode"] == 0
        assert etcd.get(key) is None  # withdrawn on the SIGTERM podman stop sent
    finally:
        podman("rm", "--force", name, check=False)


@pytest.mark.slow
def test_the_image_registers_the_hosts_containers(image: str, etcd: EtcdServer, tmp_path: Path) -> None:
    """`--containers` in the image, the engine's socket mounted read-only; the image's non-root
    user reaches it as the docs tell: the socket's group given to it with --group-add (podman's
    socket is root's, mode 0600: the test gives it a group, as Docker's `docker` group is)."""
    api = PodmanApi(tmp_path / "engine.sock")
    api.start()
    name = f"announcer-containers-{os.getpid()}"
    group = "10099"
    try:
        os.chown(api.socket, 0, int(group))
        api.socket.chmod(0o660)
        podman("run", "-d", "--name", name, "--network", "host", "--group-add", group,
               "-v", f"{api.socket}:/var/run/docker.sock:ro", image,
               "--containers", "--ip", "127.0.0.1", "--etcd-endpoints", etcd.url,
               "--interval", "0.5", "--timeout", "0.3")  # fmt: skip
        web, port = api.run("--label", "announcer.service=web")
        key = f"/services/web/127.0.0.1:{port}"
        wait_until(lambda: etcd.get(key) is not None, 60, "the container announced by the image")
        assert etcd.value(key)["source"] == "containers"
        podman("stop", "-t", "0", web)
        wait_until(lambda: etcd.get(key) is None, 10, "withdrawn at its stop")
        podman("stop", "--time", "20", name)
        assert json.loads(podman("inspect", name).stdout)[0]["State"]["ExitCode"] == 0
    finally:
        podman("rm", "--force", name, check=False)
        api.stop()
        api.remove_all()
