"""What may be shown of a secret: header names without values, URLs without passwords.

Header values, webhook keys and database passwords are credentials. Settings keep them
for use and show them through these helpers only, in every ``repr`` and log line.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from urllib.parse import urlsplit, urlunsplit

__all__ = ["RedactedHeaders", "redact_url", "url_origin"]


class RedactedHeaders(Mapping[str, str]):
    """Read-only HTTP headers whose ``repr`` shows the names only: values are credentials."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, str] | None = None) -> None:
        self._items: dict[str, str] = dict(items or {})

    def __getitem__(self, key: str) -> str:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return "{" + ", ".join(f"{name!r}: '***'" for name in self._items) + "}"


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***``: safe to log or show."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hostport}"))


def url_origin(url: str) -> str:
    """``https://host:port`` plus ``/...`` when the URL has more (paths can hold tokens)."""
    parts = urlsplit(url)
    origin = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"
    return origin + "/..." if parts.path.strip("/") or parts.query else origin
