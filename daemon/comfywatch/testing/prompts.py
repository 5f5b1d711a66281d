"""What the fake accepts as a prompt: graphs, their validation, and the scripted outcome.

ComfyUI validates every node against its class; the fake only checks that each node has a
``class_type``, that the graph has an output node (a ``class_type`` starting or ending
with ``Save`` or ``Preview``, or a node with ``"_output": true``) and that the links
(``[node_id, slot]`` inputs) upstream of each output lead to nodes that exist. It refuses
the rest the way ``POST /prompt`` does (:class:`PromptRejected`, HTTP 400): an output with
a broken link is left out and reported in ``node_errors`` (as ComfyUI's ``KeyError``
during validation), and a graph with no valid output left is refused. ``extra_data`` may carry
``comfywatch_fake: {"outcome": ..., "run_time_s": ...}`` to script a prompt over HTTP.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from .model import OUTCOMES, Outcome

__all__ = [
    "PromptRejected",
    "check_graph",
    "check_run_time",
    "default_graph",
    "error_body",
    "read_script",
    "sized_graph",
    "validate",
]

JSON = Any


class PromptRejected(ValueError):
    """A graph refused the way ``POST /prompt`` refuses it (HTTP 400, nothing queued)."""

    def __init__(self, error: dict[str, JSON], node_errors: dict[str, JSON] | None = None) -> None:
        self.error = error
        self.node_errors: dict[str, JSON] = dict(node_errors or {})
        super().__init__(f"{error['type']}: {error['message']}")


def default_graph(filename_prefix: str = "ComfyUI") -> dict[str, JSON]:
    """A small model-free graph (EmptyImage → SaveImage), like the recorded success case."""
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0},
        },
        "2": {
            "class_type": "SaveImage",
            "inputs": {"images": ["1", 0], "filename_prefix": filename_prefix},
        },
    }


def sized_graph(graph_bytes: int, filename_prefix: str = "ComfyUI") -> dict[str, JSON]:
    """:func:`default_graph` plus a padding node, ``graph_bytes`` long as ``json.dumps`` it.

    The padding is a ``PrimitiveString`` node after the others (not an output, so it
    changes neither the outputs nor which node fails), for benchmarks of large queues.
    ValueError when ``graph_bytes`` is below the smallest such graph.
    """
    graph = default_graph(filename_prefix)
    graph["3"] = {"class_type": "PrimitiveString", "inputs": {"value": ""}}
    padding = graph_bytes - len(json.dumps(graph))
    if padding < 0:
        raise ValueError(f"graph_bytes must be at least {graph_bytes - padding}, got {graph_bytes}")
    graph["3"]["inputs"]["value"] = "x" * padding
    return graph


def error_body(kind: str, message: str, details: str = "") -> dict[str, JSON]:
    """ComfyUI's ``error`` object of a 400 answer."""
    return {"type": kind, "message": message, "details": details, "extra_info": {}}


def check_run_time(value: object) -> float:
    """A run time in seconds: a finite number >= 0 (TypeError / ValueError otherwise)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"run_time_s must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"run_time_s must be a finite number >= 0, got {value}")
    return float(value)


def _is_output_node(node: Mapping[str, JSON]) -> bool:
    if node.get("_output") is True:
        return True
    class_type = node.get("class_type")
    return isinstance(class_type, str) and (
        class_type.startswith(("Save", "Preview")) or class_type.endswith(("Save", "Preview"))
    )


def validate(graph: JSON) -> list[str]:
    """The output node ids that will run, or PromptRejected as ComfyUI's validate_prompt."""
    return check_graph(graph)[0]


def check_graph(graph: JSON) -> tuple[list[str], dict[str, JSON]]:
    """The output node ids that will run and the ``node_errors`` of those left out, or
    PromptRejected (no output left) as ComfyUI's validate_prompt."""
    if not isinstance(graph, dict):
        raise PromptRejected(
            error_body("invalid_prompt", "Cannot execute because the prompt is not an object.")
        )
    for node_id, node in graph.items():
        if not isinstance(node, dict) or "class_type" not in node:
            raise PromptRejected(
                error_body(
                    "invalid_prompt",
                    "Cannot execute because a node is missing the class_type property.",
                    f"Node ID '#{node_id}'",
                )
            )
        if not isinstance(node["class_type"], str):
            raise PromptRejected(
                error_body(
                    "invalid_prompt",
                    f"Cannot execute because node {node['class_type']} does not exist.",
                    f"Node ID '#{node_id}'",
                )
            )
    outputs = [str(node_id) for node_id, node in graph.items() if _is_output_node(node)]
    if not outputs:
        raise PromptRejected(error_body("prompt_no_outputs", "Prompt has no outputs"))
    good: list[str] = []
    node_errors: dict[str, JSON] = {}
    reasons: list[str] = []
    for output in outputs:
        missing = _missing_link(graph, output)
        if missing is None:
            good.append(output)
            continue
        # ComfyUI reads prompt[linked_id] unguarded: a KeyError, reported on the output.
        error = {
            "type": "exception_during_validation",
            "message": "Exception when validating node",
            "details": repr(missing),
            "extra_info": {"exception_type": "KeyError", "traceback": []},
        }
        node_errors[output] = {
            "errors": [error],
            "dependent_outputs": [output],
            "class_type": graph[output]["class_type"],
        }
        reasons.append(f"{error['message']}: {error['details']}")
    if not good:
        raise PromptRejected(
            error_body(
                "prompt_outputs_failed_validation",
                "Prompt outputs failed validation",
                "\n".join(reasons),
            ),
            node_errors,
        )
    return good, node_errors


def _missing_link(graph: dict[str, JSON], start: str) -> JSON:
    """The first linked node id upstream of ``start`` that is not in the graph, or None."""
    seen = {start}
    todo = [start]
    while todo:
        inputs = graph[todo.pop()].get("inputs")
        if not isinstance(inputs, dict):
            continue
        for value in inputs.values():
            if not isinstance(value, list) or len(value) != 2:
                continue
            linked = value[0]
            if not isinstance(linked, str | int) or isinstance(linked, bool):
                continue
            if linked not in graph:
                return linked
            if linked not in seen:
                seen.add(linked)
                todo.append(linked)
    return None


def read_script(extra_data: Mapping[str, JSON], default_run_time_s: float) -> tuple[Outcome, float]:
    """Read ``extra_data["comfywatch_fake"]``: the outcome and run time a user asked for."""
    spec = extra_data.get("comfywatch_fake")
    if spec is None:
        return "success", default_run_time_s

    def rejected(message: str) -> PromptRejected:
        return PromptRejected(error_body("invalid_comfywatch_fake", message, "extra_data"))

    if not isinstance(spec, dict):
        raise rejected("extra_data.comfywatch_fake must be an object")
    unknown = sorted(set(spec) - {"outcome", "run_time_s"})
    if unknown:
        raise rejected(f"unknown comfywatch_fake keys: {', '.join(map(str, unknown))}")
    outcome = spec.get("outcome", "success")
    if outcome not in OUTCOMES:
        raise rejected(f"comfywatch_fake.outcome must be one of {', '.join(OUTCOMES)}")
    try:
        run_time_s = check_run_time(spec.get("run_time_s", default_run_time_s))
    except (TypeError, ValueError) as exc:
        raise rejected(f"comfywatch_fake.run_time_s: {exc}") from None
    return outcome, run_time_s
