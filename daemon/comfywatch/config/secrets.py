"""Webhook signing keys: read from a file or an environment variable, decoded, never shown.

A key is written as ``whsec_<base64>`` (Standard Webhooks). Every message here says what
is wrong without repeating any part of the secret.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from pathlib import Path

from comfywatch.config.document import Document, os_reason
from comfywatch.config.keylines import KeyPath

__all__ = ["WEBHOOK_SECRET_PREFIX", "decode_secret", "secret_from_env", "secret_from_file"]

WEBHOOK_SECRET_PREFIX = "whsec_"  # noqa: S105 - a format marker, not a secret


def decode_secret(text: str) -> bytes:
    """The key bytes of a ``whsec_<base64>`` secret; messages never repeat the secret."""
    value = text.strip()
    if not value.startswith(WEBHOOK_SECRET_PREFIX):
        raise ValueError(
            "not a Standard Webhooks secret: expected whsec_ followed by base64 "
            "(the secret's value is not shown)"
        )
    body = value[len(WEBHOOK_SECRET_PREFIX) :]
    try:
        key = base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(
            "the part after whsec_ is not valid base64 (the secret's value is not shown)"
        ) from None
    if not key:
        raise ValueError("the secret is empty after whsec_")
    return key


def secret_from_file(doc: Document, loc: KeyPath, path: Path) -> bytes:
    """The key in the file at ``path``; problems are errors at ``loc`` of ``doc``."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise doc.error(loc, f"cannot read secret file {path}: {os_reason(exc)}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None:
        raise doc.error(loc, f"secret file {path} is not UTF-8 text")
    return _decode(doc, loc, text)


def secret_from_env(doc: Document, loc: KeyPath, env: Mapping[str, str], name: str) -> bytes:
    """The key in the environment variable ``name``; problems are errors at ``loc``."""
    value = env.get(name)
    if value is None:
        raise doc.error(loc, f"environment variable {name} is not set")
    return _decode(doc, loc, value)


def _decode(doc: Document, loc: KeyPath, text: str) -> bytes:
    try:
        return decode_secret(text)
    except ValueError as exc:
        message = str(exc)
    raise doc.error(loc, message)  # outside the except block: nothing chained
