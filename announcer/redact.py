"""Keep secrets out of everything a person or a scraper can see."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"

# Query parameters that carry credentials in the URLs of the drivers announcer uses
# (asyncpg's password/sslpassword, redis-py's password, and the common spellings).
SECRET_PARAMS = frozenset({
    "password", "passwd", "pass", "pwd", "sslpassword", "secret", "token", "auth",
    "access_token", "api_key", "apikey",
})  # fmt: skip
_USERINFO_PASSWORD = re.compile(r"(//[^/?#@:]*:)[^/?#]*@")
_QUERY_SECRET = re.compile(
    r"([?&;](?:" + "|".join(sorted(SECRET_PARAMS, key=len, reverse=True)) + r")=)[^&;#]*", re.IGNORECASE
)


def redact_url(url: str) -> str:
    """``scheme://user:pw@host/db?password=x`` -> ``scheme://user:***@host/db?password=***``.

    Works on text that does not parse as a URL too, so an error about a malformed URL
    never echoes the password inside it.
    """
    try:
        parts = urlsplit(url)
        has_password = parts.password is not None
    except ValueError:
        return _redact_text(url)
    if has_password:
        host = parts.netloc.rpartition("@")[2]
        parts = parts._replace(netloc=f"{parts.username or ''}:{MASK}@{host}")
    if parts.query:
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        if any(name.lower() in SECRET_PARAMS for name, _ in pairs):
            masked = [(n, MASK if n.lower() in SECRET_PARAMS else v) for n, v in pairs]
            parts = parts._replace(query=urlencode(masked, safe="*"))
    return urlunsplit(parts) if has_password or parts.query else url


def _redact_text(text: str) -> str:
    text = _USERINFO_PASSWORD.sub(lambda m: m.group(1) + MASK + "@", text)
    return _QUERY_SECRET.sub(lambda m: m.group(1) + MASK, text)


def url_secrets(url: str) -> tuple[str, ...]:
    """The credentials written into a URL: its password and secret query values."""
    found: list[str] = []
    try:
        parts = urlsplit(url)
        if parts.password:
            found.append(parts.password)
        found += [v for n, v in parse_qsl(parts.query, keep_blank_values=True) if n.lower() in SECRET_PARAMS]
    except ValueError:
        pass
    return tuple(s for s in found if s)


def scrub(text: str, secrets: tuple[str, ...]) -> str:
    """Replace every occurrence of each secret in ``text``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, MASK)
    return text
