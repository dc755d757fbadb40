"""structlog configuration, done once by the CLI.

Logging must never take the agent down: when the reader of stderr goes away
(a closed pipe, a full disk), the write fails once, stderr is pointed at
/dev/null, and the agent goes on keeping its record true. What Python and
asyncio would print on their own (a callback's exception, an unraisable error
in a finaliser) comes through here too, as one structured line without a
traceback.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Any, TextIO


def _import_structlog_without_rich() -> None:
    """structlog imports rich, if it is installed, for pretty tracebacks: +17 MB and 50 ms.

    typer depends on rich, so it always is; yet announcer never prints a traceback (and
    typer is run with rich_markup_mode=None). Hide rich while structlog first loads; a later
    `import rich` (typer on a terminal, a test) still works.
    """
    if "structlog" in sys.modules or "rich" in sys.modules:
        return
    sys.modules["rich"] = None  # type: ignore[assignment]  # makes `import rich` raise ImportError
    try:
        import structlog  # noqa: F401, PLC0415
    finally:
        del sys.modules["rich"]


_import_structlog_without_rich()

import structlog  # noqa: E402


class SafeLogger:
    """structlog's PrintLogger, but a failed write silences the stream instead of raising."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def msg(self, message: str) -> None:
        try:
            self._stream.write(message + "\n")
            self._stream.flush()
        except (OSError, ValueError):
            _silence(self._stream)

    log = debug = info = warn = warning = error = critical = exception = fatal = failure = msg


def _silence(stream: TextIO) -> None:
    """Point the stream's descriptor at /dev/null, so neither we nor Python's exit fail on it."""
    with contextlib.suppress(OSError, ValueError):
        fd = stream.fileno()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)
        os.close(devnull)
    with contextlib.suppress(OSError, ValueError):
        stream.flush()  # drop what was buffered for the dead reader


class SafeLoggerFactory:
    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def __call__(self, *args: Any) -> SafeLogger:
        return SafeLogger(self._stream)


class _StdlibBridge(logging.Handler):
    """asyncio and other libraries log through `logging`: one structlog line each, no traceback."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields: dict[str, Any] = {"logger": record.name}
            if record.exc_info and record.exc_info[1] is not None:
                fields["error"] = f"{type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
            structlog.get_logger(record.name).log(record.levelno, record.getMessage(), **fields)
        except Exception:  # noqa: BLE001 - a log line must never raise
            return


def _unraisable(info: Any) -> None:
    with contextlib.suppress(Exception):
        structlog.get_logger("announcer").warning(
            "ignored an error in a finaliser",
            error=f"{type(info.exc_value).__name__}: {info.exc_value}",
            where=repr(info.object)[:200],
        )


def configure_logging(log_format: str = "auto", level: str = "info") -> None:
    """JSON lines when stderr is not a terminal (journald, docker logs), colour otherwise."""
    use_json = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=SafeLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    root = logging.getLogger()
    root.handlers[:] = [_StdlibBridge()]
    root.setLevel(logging.WARNING)
    sys.unraisablehook = _unraisable
