"""Errors that cross module boundaries."""


class ConfigError(Exception):
    """Bad input: the CLI prints it on one line and exits with code 2."""


class EtcdError(Exception):
    """etcd answered with an error, or could not be reached."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class EtcdUnavailable(EtcdError):
    """No endpoint answered in time, or none answered as etcd does."""


class LeaseNotFound(EtcdError):
    """The lease expired or etcd lost it."""


class WatchCompacted(EtcdError):
    """The watch's start revision was compacted away: read again, then watch from there."""


def shown(value: object) -> str:
    """A value for an error message: short, one line, and never a whole file's worth."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def describe(exc: BaseException) -> str:
    """A cause a person can act on, from an exception and the ones behind it."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ConnectionRefusedError):
            return "connection refused"
        if isinstance(seen, TimeoutError):
            return "timed out"
        seen = seen.__cause__ or seen.__context__
    return str(exc) or type(exc).__name__


def safe_text(text: str, limit: int) -> str | None:
    """What is wrong with ``text`` as a setting (too long, control characters, not UTF-8), or None."""
    if len(text) > limit:
        return f"is longer than {limit} characters"
    if not text.isprintable():
        bad = next(c for c in text if not c.isprintable())
        return f"holds a control or unprintable character ({bad!r})"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "holds bytes that are not UTF-8"
    return None
