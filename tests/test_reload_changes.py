"""``reload.changes``: the key paths a reload reports, one row per kind of edit.

Both sides are real loads of one config file in one folder (relative paths resolve alike),
so a row sees what the loader makes of an edit: defaults copied from ``[daemon]``, a
secret read from its file.
"""

from __future__ import annotations

import base64
import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from comfywatch.config import load_settings
from comfywatch.reload import changes, restart_only

from .conftest import jobs_toml, toml_value

Doc = dict[str, Any]

SECRET_ONE = "whsec_" + base64.b64encode(b"first key, kept secret").decode()
SECRET_TWO = "whsec_" + base64.b64encode(b"second key, kept secret").decode()

BASE: Doc = {
    "daemon": {
        "database": "sqlite:///comfywatch.db",
        "poll_interval_s": 1.0,
        "http": "127.0.0.1:9464",
    },
    "servers": {
        "a": {"url": "http://127.0.0.1:8188", "headers": {"Authorization": "Bearer one"}},
        "b": {"url": "http://127.0.0.1:8189", "max_history_fetches": 4},
    },
    "hooks": {
        "w": {"type": "webhook", "url": "http://127.0.0.1:9/hook", "secret_file": "w.secret"},
        "c": {"type": "command", "argv": ["/bin/true"]},
    },
    "jobs": [{"server": "a", "prompt_id": "p1"}],
}


def write(folder: Path, doc: Doc, secret: str) -> Path:
    lines = ["[daemon]", *(f"{k} = {toml_value(v)}" for k, v in doc["daemon"].items()), ""]
    for group in ("servers", "hooks"):
        for name, table in doc[group].items():
            lines.append(f"[{group}.{name}]")
            lines.extend(f"{k} = {toml_value(v)}" for k, v in table.items())
            lines.append("")
    lines.append(jobs_toml(doc["jobs"]))
    (folder / "w.secret").write_text(secret)
    path = folder / "comfywatch.toml"
    path.write_text("\n".join(lines))
    return path


def edit(change: Callable[[Doc], object]) -> Callable[[Doc], Doc]:
    def apply(doc: Doc) -> Doc:
        doc = copy.deepcopy(doc)
        change(doc)
        return doc

    return apply


CASES: list[tuple[str, Callable[[Doc], Doc], str, list[str]]] = [
    ("nothing", edit(lambda d: None), SECRET_ONE, []),
    (
        "daemon keys, the database by its key name",
        edit(
            lambda d: d["daemon"].update(
                database="sqlite:///other.db", poll_interval_s=2.0, log_level="debug"
            )
        ),
        SECRET_ONE,
        ["daemon.database", "daemon.poll_interval_s", "daemon.log_level"],
    ),
    (
        "http moved",
        edit(lambda d: d["daemon"].update(http="127.0.0.1:9465")),
        SECRET_ONE,
        ["daemon.http"],
    ),
    ("http removed", edit(lambda d: d["daemon"].pop("http")), SECRET_ONE, ["daemon.http"]),
    (
        "a header's value: the key, never the value",
        edit(lambda d: d["servers"]["a"]["headers"].update(Authorization="Bearer two")),
        SECRET_ONE,
        ["servers.a.headers"],
    ),
    (
        "server added and removed",
        edit(lambda d: d["servers"].update(z=d["servers"].pop("b"))),
        SECRET_ONE,
        ["servers.b", "servers.z"],
    ),
    (
        "a [daemon] default reaches the servers that set none",
        edit(lambda d: d["daemon"].update(max_history_fetches=2)),
        SECRET_ONE,
        ["daemon.max_history_fetches", "servers.a.max_history_fetches"],
    ),
    (
        "the secret file's content: named by its key",
        edit(lambda d: None),
        SECRET_TWO,
        ["hooks.w.secret_file"],
    ),
    (
        "a hook's type: the whole hook",
        edit(lambda d: d["hooks"].update(w={"type": "command", "argv": ["/bin/true"]})),
        SECRET_ONE,
        ["hooks.w"],
    ),
    (
        "hook keys and jobs",
        edit(
            lambda d: (
                d["hooks"]["c"].update(on=["error"], timeout_s=5.0),
                d["jobs"].append({"server": "b", "prompt_id": "p2"}),
            )
        ),
        SECRET_ONE,
        ["hooks.c.on", "hooks.c.timeout_s", "jobs"],
    ),
]


@pytest.mark.parametrize(
    ("after", "secret", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_changes_names_each_edited_key(
    tmp_path: Path, after: Callable[[Doc], Doc], secret: str, expected: list[str]
) -> None:
    old = load_settings(write(tmp_path, BASE, SECRET_ONE))
    new = load_settings(write(tmp_path, after(BASE), secret))
    found = changes(old, new)
    assert found == expected
    shown = " ".join(found)
    for value in ("Bearer", SECRET_ONE[6:], SECRET_TWO[6:]):
        assert value not in shown


def test_only_the_database_needs_a_restart(tmp_path: Path) -> None:
    changed = ["daemon.poll_interval_s", "daemon.http", "daemon.database", "servers.a"]
    refused = restart_only(changed)
    assert list(refused) == ["daemon.database"]
    assert "restart" in refused["daemon.database"]
    assert restart_only([k for k in changed if k != "daemon.database"]) == {}
