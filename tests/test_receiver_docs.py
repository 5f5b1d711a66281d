"""The README's "For receiver authors" holds: a secret from ``comfywatch hooks new-secret``
signs the daemon's webhooks, and the README's Python example verifies a real delivery (and
refuses a forged one)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks.webhooks import WebhookVerificationError

from comfywatch.testing import FakeComfyUI

from .conftest import write_config
from .helpers import comfywatch

README = Path(__file__).resolve().parent.parent / "README.md"


def receiver_example() -> str:
    """The first Python block of the README's "For receiver authors" section."""
    section = README.read_text(encoding="utf-8").split("### For receiver authors", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match is not None
    return match.group(1)


def test_the_example_is_five_lines_of_code() -> None:
    lines = [line for line in receiver_example().splitlines() if line.strip()]
    assert len(lines) == 5, lines


async def test_a_new_secret_signs_what_the_readme_example_verifies(
    tmp_path: Path, fake: FakeComfyUI, receivers: Any
) -> None:
    code, secret, err = await comfywatch("hooks", "new-secret")
    assert code == 0, err
    (tmp_path / "notify.secret").write_text(secret, encoding="utf-8")
    receiver = await receivers()
    ok = fake.submit()
    hook = (
        f'[hooks.notify]\ntype = "webhook"\nurl = "{receiver.url}"\nsecret_file = "notify.secret"\n'
    )
    config = write_config(
        tmp_path, {"local": fake.url}, [{"server": "local", "prompt_id": ok}], extra=hook,
        daemon={"default_hooks": ["notify"]},
    )  # fmt: skip
    code, _, err = await comfywatch("run", "--config", str(config), "--until-done")
    assert code == 0, err
    [(headers, body)] = receiver.requests

    processed: list[tuple[str, dict[str, Any]]] = []
    names: dict[str, Any] = {
        "secret": (tmp_path / "notify.secret").read_text(encoding="utf-8").strip(),
        "body": body,
        "headers": headers,
        "already_seen": lambda event_id: False,
        "process": lambda kind, data: processed.append((kind, data)),
    }
    exec(receiver_example(), names)  # the README's own code
    [(kind, data)] = processed
    assert kind == "job.success" and data["prompt_id"] == ok and data["state"] == "success"

    forged = body.replace(b'"success"', b'"error"')
    assert forged != body
    with pytest.raises(WebhookVerificationError):
        exec(receiver_example(), {**names, "body": forged})
