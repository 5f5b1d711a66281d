"""The project's exception hierarchy.

Foreign exceptions (aiohttp, SQLAlchemy, tomllib, pydantic) are translated into these at
the layer that owns the foreign library; nothing above that layer sees the originals.
"""

from __future__ import annotations


class ComfywatchError(Exception):
    """Root of every error comfywatch raises on purpose."""


class ConfigError(ComfywatchError):
    """A configuration file is unreadable, malformed or inconsistent."""

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        key: str | None = None,
        line: int | None = None,
    ) -> None:
        self.message = message
        self.file = file
        self.key = key
        self.line = line
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.file or "<config>"
        if self.line is not None:
            where = f"{where}:{self.line}"
        if self.key:
            return f"{where}: {self.key}: {self.message}"
        return f"{where}: {self.message}"


class ServerError(ComfywatchError):
    """Talking to a ComfyUI server failed; the server's jobs keep their state."""

    def __init__(self, server: str, message: str) -> None:
        self.server = server
        self.message = message
        super().__init__(f"{server}: {message}")

    @property
    def kind(self) -> str:
        """A short, stable label for logs and metrics."""
        return "error"


class ServerUnavailable(ServerError):
    """The server could not be reached or did not answer in time."""

    @property
    def kind(self) -> str:
        return "unavailable"


class ServerAuthError(ServerError):
    """The server (or a proxy in front of it) refused our credentials (401/403)."""

    @property
    def kind(self) -> str:
        return "auth"


class BadResponse(ServerError):
    """The server answered, but not with something we can use."""

    @property
    def kind(self) -> str:
        return "bad_response"


class ResponseTooLarge(BadResponse):
    """The answer is larger than ``max_response_bytes`` (a huge queue, usually)."""


class ParseError(ComfywatchError):
    """A queue or history document does not have the shape ComfyUI gives it."""


class StoreError(ComfywatchError):
    """The database could not be read or written; nothing was recorded."""


class PromptRefused(ServerError):
    """The server refused a prompt (``POST /prompt`` answered 400): nothing was queued.

    ``error`` is ComfyUI's ``{"type", "message", "details", "extra_info"}``; ``node_errors``
    maps node ids to ``{"errors": [...], "dependent_outputs": [...], "class_type"}``.
    """

    def __init__(
        self, server: str, error: dict[str, object], node_errors: dict[str, object]
    ) -> None:
        self.error = error
        self.node_errors = node_errors
        super().__init__(server, f"prompt refused: {error.get('message') or error.get('type')}")

    @property
    def kind(self) -> str:
        return "refused"
