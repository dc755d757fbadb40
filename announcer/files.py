"""Reading the small files a configuration names: bounded, regular files only, UTF-8.

A path may name anything: ``/dev/zero`` (endless), a FIFO (blocks forever), a
directory, a huge or binary file. Each is a one-line configuration error here,
before anything starts.
"""

from __future__ import annotations

import contextvars
import os
import stat
from pathlib import Path

from announcer.errors import ConfigError

FILE_LIMIT = 1024 * 1024  # a config file
SECRET_LIMIT = 4096  # a password file

# Warnings found while the configuration is read (a password file others can read),
# logged by the agent once logging is set up.
_warnings: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("warnings", default=None)


def collect_warnings() -> contextvars.Token[list[str] | None]:
    return _warnings.set([])


def collected_warnings(token: contextvars.Token[list[str] | None]) -> tuple[str, ...]:
    found = _warnings.get() or []
    _warnings.reset(token)
    return tuple(found)


def warn(message: str) -> None:
    found = _warnings.get()
    if found is not None and message not in found:
        found.append(message)


def read_small_file(path: Path, what: str, limit: int = FILE_LIMIT) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes, or a ConfigError naming it."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; fstat then refuses it.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc.strerror}") from None
    except ValueError:  # a NUL byte in the path
        raise ConfigError(f"{what}: {str(path)!r} is not a usable path") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{what}: {path} is not a regular file")
        if info.st_size > limit:
            raise ConfigError(f"{what}: {path} is larger than {limit} bytes")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise ConfigError(f"{what}: {path} is larger than {limit} bytes")
    return data


def read_text_file(path: Path, what: str, limit: int = FILE_LIMIT) -> str:
    data = read_small_file(path, what, limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what}: {path} is not UTF-8 text (byte {exc.start})") from None


def read_secret_file(path: Path, what: str) -> str:
    """A password kept in a file: its first line. Warns when others may read the file."""
    text = read_text_file(path, what, SECRET_LIMIT)
    secret = text.splitlines()[0] if text else ""
    if not secret or not secret.isprintable():
        raise ConfigError(f"{what}: {path} must hold the password on its first line, printable")
    try:
        mode = path.stat().st_mode
    except OSError:
        mode = 0
    if mode & stat.S_IROTH:
        warn(f"{what}: {path} is readable by every user (mode {stat.S_IMODE(mode):04o}); chmod o-r it")
    return secret
