"""The console entry point: a stop signal counts from the first line of announcer's own code.

Loading the CLI, the config and the agent takes a few hundred milliseconds. A SIGTERM
in that time (a ``docker stop`` right after ``docker run``, a unit stopped as it
starts) would otherwise kill the process by the signal's default action, exit 143.
The agent instead remembers it here and, once it runs, stops at once and exits 0 with
nothing left in etcd. ``announcer check`` keeps the default: a stopped check is never a
pass. Importing announcer installs nothing; only `main` does.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType

_STOPS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
_caught: list[int] = []


def _remember(signum: int, _frame: FrameType | None) -> None:
    _caught.append(signum)


def early_stop() -> int | None:
    """The stop signal that arrived before the agent's own handlers were in place, if any."""
    return _caught[0] if _caught else None


def main() -> None:
    if sys.argv[1:2] != ["check"]:
        for signum in _STOPS:
            signal.signal(signum, _remember)
    from announcer.cli import main as cli_main  # noqa: PLC0415 - after the handler, on purpose

    cli_main()
