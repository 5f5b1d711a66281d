"""``hooks new-secret``: a fresh webhook signing secret, ``whsec_`` and base64 of random
bytes (Standard Webhooks), for the hook's ``secret_file`` or ``secret_env`` and for the
receiver. Needs neither the config nor the database."""

from __future__ import annotations

import argparse
import base64
import secrets

from comfywatch.cli.output import EX_OK

#: Random bytes in a new secret (Standard Webhooks asks for 24 to 64).
SECRET_BYTES = 32


def new_secret(args: argparse.Namespace) -> int:
    del args  # no options
    key = secrets.token_bytes(SECRET_BYTES)
    print("whsec_" + base64.b64encode(key).decode("ascii"))
    return EX_OK
