"""Errors that cross module boundaries."""


class ConfigError(Exception):
    """Bad input: the CLI prints it on one line and exits with code 2."""


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
