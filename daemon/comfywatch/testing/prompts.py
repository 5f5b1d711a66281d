"""What the fake accepts as a prompt: graphs, their validation, and the scripted outcome.

ComfyUI validates every node against its class; the fake only checks that each node has a
``class_type`` and that the graph has an output node (a ``class_type`` starting or ending
with ``Save`` or ``Preview``, or a node with ``"_output": true``), and refuses the rest the
way ``POST /prompt`` does (:class:`PromptRejected`, HTTP 400). ``extra_data`` may carry
``comfywatch_fake: {"outcome": ..., "run_time_s": ...}`` to script a prompt over HTTP.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .model import OUTCOMES, Outcome

__all__ = [
    "PromptRejected",
    "check_run_time",
    "default_graph",
    "error_body",
    "read_script",
    "validate",
]

JSON = Any


class PromptRejected(ValueError):
    """A graph refused the way ``POST /prompt`` refuses it (HTTP 400, nothing queued)."""

    def __init__(self, error: dict[str, JSON]) -> None:
        self.error = error
        self.node_errors: dict[str, JSON] = {}
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
    """The output node ids of a graph, or PromptRejected as ComfyUI's validate_prompt."""
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
    return outputs


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
