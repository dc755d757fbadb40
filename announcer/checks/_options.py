"""Typed, strict reading of a check's options from the TOML file."""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from announcer.errors import ConfigError
from announcer.files import read_secret_file, read_small_file


def tls_context(ca_file: Path | None, *, verify: bool = True, check_hostname: bool = True) -> ssl.SSLContext:
    """A client TLS context: the system CAs or ``ca_file``; optionally without verification."""
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif not check_hostname:
        context.check_hostname = False
    return context


@dataclass(frozen=True, kw_only=True)
class TlsFiles:
    """The TLS options the HTTPS and gRPC checks share (both inherit these fields)."""

    verify: bool = True
    ca_file: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None


def tls_files(opts: Options, kind: str) -> TlsFiles:
    files = TlsFiles(
        verify=opts.boolean("verify", default=True),
        ca_file=opts.readable_file("ca_file"),
        client_cert=opts.readable_file("client_cert"),
        client_key=opts.readable_file("client_key"),
    )
    if (files.client_cert is None) != (files.client_key is None):
        raise ConfigError(f"{kind} check options client_cert and client_key go together")
    return files


class Options:
    """Reads each option once, checks its type, and rejects unknown keys."""

    def __init__(self, kind: str, options: Mapping[str, Any]) -> None:
        self._kind = kind
        self._options = dict(options)
        self._options.pop("spec", None)

    def _take(self, name: str) -> Any:
        return self._options.pop(name, None)

    def _wrong(self, name: str, wanted: str) -> ConfigError:
        return ConfigError(f"{self._kind} check option {name!r} must be {wanted}")

    def string(self, name: str) -> str | None:
        value = self._take(name)
        if value is not None and not isinstance(value, str):
            raise self._wrong(name, "a string")
        return value

    def choice(self, name: str, choices: tuple[str, ...]) -> str | None:
        """A string option that must be one of ``choices``, or None when not set."""
        value = self.string(name)
        if value is not None and value not in choices:
            raise ConfigError(f"{self._kind} check {name} {value!r} is not one of {', '.join(choices)}")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self._take(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self._wrong(name, "true or false")
        return value

    def string_map(self, name: str) -> dict[str, str]:
        value = self._take(name)
        if value is None:
            return {}
        if not isinstance(value, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise self._wrong(name, "a table of strings")
        return dict(value)

    def readable_file(self, name: str) -> Path | None:
        value = self.string(name)
        if value is None:
            return None
        path = Path(value)
        read_small_file(path, f"{self._kind} check option {name!r}")
        return path

    def secret_file(self, name: str) -> str | None:
        """A password kept in a file, so unit files and `ps` need not show it."""
        path = self.readable_file(name)
        return None if path is None else read_secret_file(path, f"{self._kind} check option {name!r}")

    def raw(self, name: str) -> Any:
        return self._take(name)

    def done(self) -> None:
        if self._options:
            unknown = ", ".join(sorted(self._options))
            raise ConfigError(f"unknown {self._kind} check option(s): {unknown}")
