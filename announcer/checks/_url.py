"""What the URL-spelled checks share: a password that may come from the URL, a file or
the driver's usual environment variable, and a name that never shows it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from urllib.parse import SplitResult, unquote, urlsplit

from announcer.checks._options import Options
from announcer.errors import ConfigError
from announcer.redact import redact_url


@dataclass(frozen=True, kw_only=True)
class UrlCheck:
    url: str
    password: str | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return redact_url(self.url)

    @property
    def secrets(self) -> tuple[str, ...]:
        return (self.password,) if self.password else ()


def split_url(kind: str, spec: str, example: str) -> SplitResult:
    """The spec's parts; no host or a bad port is a configuration error."""
    try:
        parts = urlsplit(spec)
        _ = parts.port
    except ValueError as exc:
        raise ConfigError(f"{kind} check {redact_url(spec)!r}: {exc}") from None
    if not parts.hostname:
        raise ConfigError(f"{kind} check {redact_url(spec)!r} must look like {example}")
    return parts


def resolve_password(parts: SplitResult, opts: Options, env_var: str) -> str | None:
    """From the URL, else the `password_file` option, else the driver's usual variable."""
    if parts.password:
        return unquote(parts.password)
    return opts.secret_file("password_file") or os.environ.get(env_var)
