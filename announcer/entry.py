"""The console entry point: a stop signal counts from the first line of announcer's own code.

Loading the CLI, the config and the agent takes a few hundred milliseconds. A SIGTERM
in that time (a ``docker stop`` right after ``docker run``, a unit stopped as it
starts) would otherwise kill the process by the signal's default action, exit 143.
The stop signals are held instead (blocked: the kernel keeps one pending) from here until
the agent's own handlers are in place; then they are let through, and one that came
meanwhile reaches those handlers exactly once: the agent stops at once and exits 0 with
nothing left in etcd. Held, not caught: a handler of its own here counted a signal twice
when the event loop was already listening for it (uvloop is from its start), and the second
count is the operator's "stop now" (exit 143). ``announcer check`` and ``announcer ls`` keep
the default: a stopped check is never a pass, and a listing has nothing to withdraw.
Importing announcer holds nothing; only `main` does.
"""

from __future__ import annotations

import signal
import sys

STOPS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGQUIT})


def hold_stops() -> None:
    """Block the stop signals: one that arrives waits, pending, until `release_stops`."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOPS)


def release_stops() -> None:
    """Let the stop signals through, a pending one first: call with their handlers in place."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOPS)


def early_stop() -> int | None:
    """A stop signal that is waiting (it arrived while announcer started), if any."""
    waiting = signal.sigpending() & STOPS
    return min(waiting) if waiting else None


def main() -> None:
    if sys.argv[1:2] not in (["check"], ["ls"]):
        hold_stops()
    from announcer.cli import main as cli_main  # noqa: PLC0415 - after the hold, on purpose

    cli_main()
