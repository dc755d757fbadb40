"""Command check: a program, run without a shell, passes when it exits 0 in time.

It runs in a session (and process group) of its own; when the check ends, for
any reason (exit, time limit, shutdown), the whole group is killed, so no
child or grandchild outlives it. Output (stdout and stderr) is kept up to 4 KiB
as the check's detail.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Self

from announcer.checks import CheckResult
from announcer.checks._options import Options
from announcer.errors import ConfigError

OUTPUT_LIMIT = 4096


@dataclass(frozen=True)
class ExecCheck:
    argv: tuple[str, ...]

    @classmethod
    def from_spec(cls, spec: str, options: Mapping[str, Any]) -> Self:
        command = spec.partition(":")[2]
        try:
            argv = tuple(shlex.split(command))
        except ValueError as exc:
            raise ConfigError(f"exec check {spec!r}: {exc}") from None
        if not argv:
            raise ConfigError("exec check needs a program: exec:/path/to/program arg...")
        if not os.path.isabs(argv[0]):  # noqa: PTH117 - a string check, not file I/O
            raise ConfigError(f"exec check program {argv[0]!r} must be an absolute path")
        if not os.access(argv[0], os.X_OK):
            raise ConfigError(f"exec check program {argv[0]!r} is not an executable file")
        Options("exec", options).done()
        return cls(argv)

    @property
    def name(self) -> str:
        return "exec:" + shlex.join(self.argv)

    async def __call__(self) -> CheckResult:
        process = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,  # its own process group, killed whole below
        )
        assert process.stdout is not None
        reader = asyncio.create_task(_read_limited(process.stdout))
        try:
            code = await process.wait()
        finally:
            # Whatever happened (exit, time limit, shutdown): no child may outlive the check.
            _kill_group(process.pid)
        try:
            output = await asyncio.wait_for(reader, 1.0)
        except TimeoutError:
            output = b""
        detail = output.decode(errors="replace").strip()
        if code == 0:
            return CheckResult(True, detail or "exit status 0")
        status = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
        return CheckResult(False, f"{status}: {detail}" if detail else status)


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


async def _read_limited(stream: asyncio.StreamReader) -> bytes:
    kept = b""
    while chunk := await stream.read(65536):  # drain it all so the program never blocks on a pipe
        if len(kept) < OUTPUT_LIMIT:
            kept += chunk[: OUTPUT_LIMIT - len(kept)]
    return kept
