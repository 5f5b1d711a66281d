"""History entries and execution messages of a finished prompt, built from recorded ones.

:class:`OutputStore` is what the fake's "process" writes: output files numbered per
prefix, temp files under a per-process prefix, and the execution cache (the same graph
again is fully cached and repeats its files). :meth:`OutputStore.conclude` turns a prompt
and its outcome into the history entry ComfyUI 0.3.64 would write, a copy of a real
recorded entry for that outcome (package data in ``fixtures/``), and the WebSocket messages
it would send before writing it.
"""

from __future__ import annotations

import copy
import functools
import json
import secrets
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Final

from .model import Outcome, QueuedPrompt

__all__ = ["Conclusion", "Message", "OutputStore"]

JSON = Any

_TERMINAL_MESSAGES: Final = ("execution_success", "execution_error", "execution_interrupted")
_TEMPLATE_FILES: Final[Mapping[Outcome, str]] = {
    "success": "history_success.json",
    "error": "history_error.json",
    "interrupted": "history_interrupted.json",
}


@dataclass(frozen=True, slots=True)
class Message:
    """A WebSocket message: to the prompt's client, or to everyone if ``broadcast`` and
    the prompt has no client id."""

    event: str
    data: dict[str, JSON]
    broadcast: bool = False


@dataclass(frozen=True, slots=True)
class Conclusion:
    """A finished prompt: its history entry and the messages sent before it is stored."""

    entry: dict[str, JSON]
    messages: list[Message] = field(default_factory=list)


class OutputStore:
    """Files "on disk" and the execution cache of one fake ComfyUI."""

    def __init__(self) -> None:
        # (type, subfolder, filename) of every file written; output files survive restarts.
        self._files: set[tuple[str, str, str]] = set()
        self._file_counters: dict[tuple[str, str], int] = {}
        self._temp_prefix = _random_letters(5)
        self._temp_counter = 0
        #: Outputs of graphs that ran successfully, as ComfyUI's execution cache keeps them.
        self._cache: dict[str, dict[str, JSON]] = {}

    def has_file(self, file_type: str, subfolder: str, filename: str) -> bool:
        return (file_type, subfolder, filename) in self._files

    def restart(self) -> None:
        """A new process: temp files and the cache are gone, output files stay."""
        self._cache.clear()
        self._temp_prefix = _random_letters(5)
        self._temp_counter = 0
        self._files = {f for f in self._files if f[0] != "temp"}

    def conclude(
        self, prompt: QueuedPrompt, outcome: Outcome, started_ms: int, finished_ms: int
    ) -> Conclusion:
        """The entry and messages of ``prompt`` ending with ``outcome``.

        A failure hits the last output node; the nodes before it in graph order ran.
        """
        graph = prompt.graph
        nodes = list(graph)
        failed = prompt.outputs_to_execute[-1] if outcome != "success" else None
        ran = nodes if failed is None else nodes[: nodes.index(failed)]
        outputs, cached = self._outputs(prompt, outcome, ran)
        messages = _node_messages(prompt.prompt_id, ran, outputs, failed)

        template = _template(outcome)
        terminal_name = _terminal_name(template)
        values: dict[str, JSON] = {"prompt_id": prompt.prompt_id, "timestamp": finished_ms}
        if failed is not None:
            node_type = graph[failed].get("class_type")
            values.update(node_id=failed, node_type=node_type, executed=list(ran))
            if outcome == "error":
                values.update(_error_fields(template, failed, graph[failed], nodes))
        status_messages = _status_messages(
            template, terminal_name, values, prompt.prompt_id, started_ms, nodes if cached else []
        )
        entry = _entry(template, prompt, outcome, outputs, status_messages)
        # execution_interrupted reaches everyone when the prompt has no client id.
        terminal = Message(terminal_name, status_messages[-1][1], outcome == "interrupted")
        return Conclusion(entry=entry, messages=[*messages, terminal])

    def _outputs(
        self, prompt: QueuedPrompt, outcome: Outcome, ran: list[str]
    ) -> tuple[dict[str, JSON], bool]:
        """The output records of the nodes that ran, and whether they came from the cache."""
        cache_key = json.dumps(prompt.graph, sort_keys=True, default=str)
        if outcome == "success" and cache_key in self._cache:
            return copy.deepcopy(self._cache[cache_key]), True
        wanted = set(prompt.outputs_to_execute)
        outputs: dict[str, JSON] = {
            node_id: {"images": [self._write_image(prompt.graph[node_id])]}
            for node_id in ran
            if node_id in wanted
        }
        if outcome == "success":
            self._cache[cache_key] = copy.deepcopy(outputs)
        return outputs, False

    def _write_image(self, node: Mapping[str, JSON]) -> dict[str, JSON]:
        """One output record, named the way SaveImage / PreviewImage name their files."""
        class_type = node.get("class_type")
        if isinstance(class_type, str) and class_type.startswith("Preview"):
            self._temp_counter += 1
            record = {
                "filename": f"ComfyUI_temp_{self._temp_prefix}_{self._temp_counter:05}_.png",
                "subfolder": "",
                "type": "temp",
            }
        else:
            inputs = node.get("inputs")
            prefix = inputs.get("filename_prefix") if isinstance(inputs, dict) else None
            subfolder, name = _split_prefix(prefix)
            counter = self._file_counters.get((subfolder, name), 0) + 1
            self._file_counters[(subfolder, name)] = counter
            record = {
                "filename": f"{name}_{counter:05}_.png",
                "subfolder": subfolder,
                "type": "output",
            }
        self._files.add((record["type"], record["subfolder"], record["filename"]))
        return record


def _node_messages(
    prompt_id: str, ran: list[str], outputs: Mapping[str, JSON], failed: str | None
) -> list[Message]:
    """``executing`` per node that ran (``executed`` when it has output), then the failed one."""
    messages: list[Message] = []
    for node_id in ran:
        messages.append(_executing(node_id, prompt_id))
        if node_id in outputs:
            executed = {
                "node": node_id,
                "display_node": node_id,
                "output": outputs[node_id],
                "prompt_id": prompt_id,
            }
            messages.append(Message("executed", executed))
    if failed is not None:
        messages.append(_executing(failed, prompt_id))
    return messages


def _executing(node_id: str, prompt_id: str) -> Message:
    return Message("executing", {"node": node_id, "display_node": node_id, "prompt_id": prompt_id})


def _status_messages(
    template: Mapping[str, JSON],
    terminal_name: str,
    values: Mapping[str, JSON],
    prompt_id: str,
    started_ms: int,
    cached_nodes: list[str],
) -> list[list[JSON]]:
    """The template's ``status.messages`` with this prompt's id, times and terminal values."""
    messages: list[list[JSON]] = []
    for name, data in template["status"]["messages"]:
        if name == terminal_name:
            new = {key: values.get(key, value) for key, value in data.items()}
        else:
            new = dict(data, timestamp=started_ms)
            if "prompt_id" in new:
                new["prompt_id"] = prompt_id
            if name == "execution_cached":
                new["nodes"] = list(cached_nodes)
        messages.append([name, copy.deepcopy(new)])
    return messages


def _entry(
    template: Mapping[str, JSON],
    prompt: QueuedPrompt,
    outcome: Outcome,
    outputs: dict[str, JSON],
    status_messages: list[list[JSON]],
) -> dict[str, JSON]:
    entry = copy.deepcopy(dict(template))
    entry["prompt"] = copy.deepcopy(prompt.queue_item())
    entry["outputs"] = outputs
    entry["meta"] = {
        node_id: {
            "node_id": node_id,
            "display_node": node_id,
            "parent_node": None,
            "real_node_id": node_id,
        }
        for node_id in outputs
    }
    status = entry["status"]
    status["status_str"] = "success" if outcome == "success" else "error"
    status["completed"] = outcome == "success"
    status["messages"] = status_messages
    return entry


@functools.cache
def _template(outcome: Outcome) -> dict[str, JSON]:
    """A real recorded history entry for the outcome (package data; do not mutate)."""
    name = _TEMPLATE_FILES[outcome]
    text = resources.files(__package__).joinpath("fixtures", name).read_text(encoding="utf-8")
    body = json.loads(text)
    if not isinstance(body, dict) or len(body) != 1:
        raise RuntimeError(f"fixtures/{name} does not hold exactly one history entry")
    (entry,) = body.values()
    if not isinstance(entry, dict):
        raise RuntimeError(f"fixtures/{name}: the history entry is not an object")
    return entry


def _terminal_name(template: Mapping[str, JSON]) -> str:
    name = template["status"]["messages"][-1][0]
    if name not in _TERMINAL_MESSAGES:
        raise RuntimeError(f"history template ends with {name!r}, not a terminal message")
    return str(name)


def _error_fields(
    template: Mapping[str, JSON], node_id: str, node: Mapping[str, JSON], nodes: list[str]
) -> dict[str, JSON]:
    """execution_error's exception fields for a scripted failure of ``node_id``."""
    node_type = node.get("class_type")
    real_frames = template["status"]["messages"][-1][1].get("traceback", [])
    frames = [f for f in real_frames if isinstance(f, str) and "/execution.py" in f]
    frames.append(
        '  File "/opt/ComfyUI/comfywatch_fake.py", line 1, in execute\n'
        "    raise Exception(message)\n"
    )
    inputs = node.get("inputs")
    current_inputs = {
        str(name): [value if isinstance(value, str | int | float | bool | None) else str(value)]
        for name, value in (inputs.items() if isinstance(inputs, dict) else ())
    }
    return {
        "exception_message": (
            f"comfywatch fake server: node {node_id} ({node_type}) failed, as scripted\n"
        ),
        "exception_type": "Exception",
        "traceback": frames,
        "current_inputs": current_inputs,
        "current_outputs": list(nodes),
    }


def _split_prefix(prefix: JSON) -> tuple[str, str]:
    """SaveImage's ``filename_prefix`` as (subfolder, name), kept inside the output folder."""
    if not isinstance(prefix, str):
        return "", "ComfyUI"
    parts = [p for p in prefix.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    if not parts:
        return "", "ComfyUI"
    return "/".join(parts[:-1]), parts[-1]


def _random_letters(count: int) -> str:
    return "".join(secrets.choice(string.ascii_lowercase) for _ in range(count))
