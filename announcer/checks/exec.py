"""Command check: a program, run without a shell, passes when it exits 0 in time.

Containment. The program runs in a session of its own, and its environment
carries a mark naming the run (``ANNOUNCER_CHECK_RUN``). When the check ends,
for any reason (exit, time limit, shutdown), every process still alive that
carries the mark of a finished run is killed: its process group, and also the
descendants that called ``setsid`` to escape it. The agent makes itself a child
subreaper (``PR_SET_CHILD_SUBREAPER``), so such escapees become its own children
when their parent dies, and it reaps them; none is left to init as a zombie. A
process that scrubs its own environment escapes the mark: that is the limit.

The program's output goes to a pipe the agent reads as it comes, keeping the
first 4 KiB for the check's detail; the check ends when the program exits, not
when every process that inherited the pipe has closed it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shlex
import signal
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Self

from announcer.checks import CheckResult
from announcer.checks._options import Options
from announcer.errors import ConfigError

OUTPUT_LIMIT = 4096
MARK = "ANNOUNCER_CHECK_RUN"
PR_SET_CHILD_SUBREAPER = 36
REAP_WITHIN = 1.0  # seconds a killed program gets to be reaped before the check gives up on it


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
        try:
            mode = os.stat(argv[0]).st_mode  # noqa: PTH116 - argv[0] stays a string
        except OSError as exc:
            raise ConfigError(f"exec check program {argv[0]!r}: {exc.strerror}") from None
        if not stat.S_ISREG(mode) or not os.access(argv[0], os.X_OK):
            raise ConfigError(f"exec check program {argv[0]!r} is not an executable file")
        Options("exec", options).done()
        return cls(argv)

    @property
    def name(self) -> str:
        return "exec:" + shlex.join(self.argv)

    async def __call__(self) -> CheckResult:
        _REAPER.start()
        run = _REAPER.new_run()
        read_fd, write_fd = os.pipe()
        _REAPER.spawning += 1  # until its pid is known, no zombie may be taken for an orphan
        try:
            process = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=write_fd,  # a pipe of our own: asyncio waits for the exit, not for EOF
                stderr=write_fd,
                start_new_session=True,  # its own session and process group
                env={**os.environ, MARK: run},
            )
        except BaseException:
            _REAPER.spawning -= 1
            os.close(read_fd)
            _REAPER.end_run(run)
            raise
        finally:
            os.close(write_fd)
        _REAPER.spawned.add(process.pid)
        _REAPER.spawning -= 1
        output = _Output(read_fd)
        try:
            code = await process.wait()
        finally:
            # Whatever happened (exit, time limit, shutdown): no process of the run may outlive it.
            _kill_group(process.pid)
            if process.returncode is None:  # cut short: kill it (even out of its group), reap it
                # os.kill, not process.kill(): Popen.send_signal polls first, and that waitpid
                # would reap the program behind asyncio's back (its watcher then reports an
                # "unknown child" with exit status 255). Unreaped, the pid cannot be reused.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGKILL)
                await _reaped(process)
            detail = output.close().decode(errors="replace").strip()
            if process.returncode is not None:
                _REAPER.spawned.discard(process.pid)  # asyncio has reaped it
            _REAPER.end_run(run)
        if code == 0:
            return CheckResult(True, detail or "exit status 0")
        status = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
        return CheckResult(False, f"{status}: {detail}" if detail else status)


async def _reaped(process: asyncio.subprocess.Process) -> None:
    """Wait (briefly) until asyncio has reaped a program we killed, so nothing of it outlives
    the check: not the process, nor the transport asyncio holds for it until its exit is seen.
    A second cancellation or a process stuck in the kernel ends the wait; the reaper's sweep
    and asyncio's own watcher still collect it later."""
    with contextlib.suppress(TimeoutError, asyncio.CancelledError):
        await asyncio.wait_for(asyncio.shield(process.wait()), REAP_WITHIN)


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


class _Output:
    """Reads a pipe as data comes (so the program never blocks on it), keeping the start."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._kept = bytearray()
        os.set_blocking(fd, False)
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(fd, self._read)
        self._open = True

    def _read(self) -> bool:
        """Read what is there; False at EOF or when nothing more is waiting."""
        try:
            chunk = os.read(self._fd, 65536)
        except BlockingIOError:
            return False
        except OSError:
            chunk = b""
        if not chunk:
            self._loop.remove_reader(self._fd)
            return False
        if len(self._kept) < OUTPUT_LIMIT:
            self._kept += chunk[: OUTPUT_LIMIT - len(self._kept)]
        return True

    def close(self) -> bytes:
        """Take what the program wrote before it exited, and close the pipe."""
        if self._open:
            self._open = False
            for _ in range(64):  # what is buffered now; a writer that goes on is cut off
                if not self._read():
                    break
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
        return bytes(self._kept)


class _Reaper:
    """Kills what finished check runs left behind, and reaps what it killed."""

    def __init__(self) -> None:
        self._started = False
        self._counter = itertools.count(1)
        self._active: set[str] = set()
        self._killed: set[int] = set()
        self.spawned: set[int] = set()  # the programs themselves: asyncio waits for those
        self.spawning = 0  # programs being started, whose pids are not known yet
        self._prefix = ""

    def start(self) -> None:
        if self._started:
            return
        self._started = True
        self._prefix = f"{os.getpid()}."
        _become_subreaper()

    def new_run(self) -> str:
        run = f"{self._prefix}{next(self._counter)}"
        self._active.add(run)
        return run

    def end_run(self, run: str) -> None:
        self._active.discard(run)
        self.sweep()

    def sweep(self) -> None:
        """Kill every live process marked by a finished run of ours; reap what we killed."""
        for pid, run in _marked_processes(MARK + "=" + self._prefix):
            if run not in self._active:
                _kill_group(pid)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
                self._killed.add(pid)
        self._reap()

    def _reap(self, tries: int = 50) -> None:
        """Reap what we killed; a SIGKILLed process takes a moment to die, so look again soon."""
        for pid in list(self._killed):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # not (yet) our child: reaped by its parent, or adopted later
                done = pid if not os.path.exists(f"/proc/{pid}") else 0  # noqa: PTH110
            if done:
                self._killed.discard(pid)
        self._reap_adopted()
        if self._killed and tries > 0:
            with contextlib.suppress(RuntimeError):  # no running loop: the next sweep reaps them
                asyncio.get_running_loop().call_later(0.1, self._reap, tries - 1)

    def _reap_adopted(self) -> None:
        """Reap zombie children that came to us from the checks' sessions.

        A process of a run that exited on its own after its parent did was adopted by us
        (the subreaper) and is a zombie now; nothing else would ever wait for it. Those
        asyncio waits for (the programs) and any child in our own session are left alone.
        """
        own_session = os.getsid(0)
        for _ in range(1000 if not self.spawning else 0):
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None or info.si_pid in self.spawned:
                return
            try:
                if os.getsid(info.si_pid) == own_session:
                    return
            except OSError:
                return
            with contextlib.suppress(ChildProcessError):
                os.waitpid(info.si_pid, 0)
            self._killed.discard(info.si_pid)


_REAPER = _Reaper()


def _marked_processes(needle: str) -> list[tuple[int, str]]:
    """(pid, run) of every process whose environment carries ``needle``."""
    found: list[tuple[int, str]] = []
    wanted = needle.encode()
    try:
        entries = os.listdir("/proc")  # noqa: PTH208 - names only, hundreds of them
    except OSError:
        return found
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as handle:  # noqa: PTH123 - many tiny reads
                data = handle.read()
        except OSError:
            continue
        at = data.find(b"\0" + wanted)
        if at < 0 and data.startswith(wanted):
            at = -1
        elif at < 0:
            continue
        start = at + 1 + len(MARK) + 1
        end = data.find(b"\0", start)
        found.append((int(name), data[start : end if end >= 0 else len(data)].decode(errors="replace")))
    return found


def _become_subreaper() -> None:
    """Orphans of our checks come to us, not to init, so we can kill and reap them (Linux)."""
    try:
        import ctypes  # noqa: PLC0415 - only where an exec check is configured

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the mark alone still finds them
        return
