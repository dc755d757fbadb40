"""The README's first command: the demo walks through the lifecycle and cleans up after itself."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

from tests.servers import wait_until

ROOT = Path(__file__).resolve().parent.parent


def test_demo_ctrl_c_withdraws_and_cleans_up() -> None:
    # Ctrl-C in a terminal signals the whole foreground process group: do the same.
    process = subprocess.Popen(
        [sys.executable, "scripts/demo.py", "--forever"], cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(process.stdout.readline, "")), daemon=True)  # type: ignore[union-attr]
    reader.start()
    try:
        wait_until(lambda: any("press Ctrl-C" in line for line in lines), 60, "the demo running")
        folder = re.search(r"data and logs in (\S+)\)", "".join(lines))
        assert folder is not None
        os.killpg(process.pid, signal.SIGINT)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
    reader.join(10)
    process.stdout.close()  # type: ignore[union-attr]
    output = "".join(lines)
    assert "announcer exited with 0; record in etcd: None" in output
    assert "withdrawn, lease revoked" in output
    assert not Path(folder.group(1)).exists()


def test_a_ctrl_c_while_the_prompt_is_printed_still_ends_in_the_last_line(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # The fresh-machine flake: the test's Ctrl-C came the moment "press Ctrl-C" was out,
    # before the wait's try began, and main()'s own handler ended the demo silently.
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo", ROOT / "scripts" / "demo.py")
    assert spec is not None
    assert spec.loader is not None
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    said: list[str] = []

    def say(text: str) -> None:
        said.append(text)
        if "press Ctrl-C" in text:
            raise KeyboardInterrupt  # the Ctrl-C lands during this very line

    class Agent:
        def wait(self, timeout: float | None = None) -> int:
            return 0

    monkeypatch.setattr(demo, "say", say)
    demo.run_until_ctrl_c(Agent(), lambda: None)
    assert said[-1] == "announcer exited with 0; record in etcd: None"
