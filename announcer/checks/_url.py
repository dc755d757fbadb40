"""What the URL-spelled checks share: a password that may come from the URL, a file or
the driver's usual environment variable, and a name that never shows it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from urllib.parse import SplitResult, unquote, urlsplit

from announcer.checks._options import Options
from announcer.errors import ConfigError
from announcer.redact import redact_url, scrub, url_secrets


@dataclass(frozen=True, kw_only=True)
class UrlCheck:
    url: str
    password: str | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return redact_url(self.url)

    @property
    def secrets(self) -> tuple[str, ...]:
        found = (self.password, *url_secrets(self.url))
        return tuple(sorted({s for s in found if s}, key=len, reverse=True))


def split_url(kind: str, spec: str, example: str) -> SplitResult:
    """The spec's parts; no host or a bad port is a configuration error."""
    try:
        parts = urlsplit(spec)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(
            f"{kind} check {redact_url(spec)!r}: {scrub(str(exc), url_secrets(spec))}"
        ) from None
    if port == 0:
        raise ConfigError(f"{kind} check {redact_url(spec)!r}: port 0 cannot be checked")
    if not parts.hostname:
        raise ConfigError(f"{kind} check {redact_url(spec)!r} must look like {example}")
    return parts


def resolve_password(parts: SplitResult, opts: Options, env_var: str) -> str | None:
    """From the URL, else the `password_file` option, else the driver's usual variable."""
    if parts.password:
        return unquote(parts.password)
    return opts.secret_file("password_file") or os.environ.get(env_var) or None
