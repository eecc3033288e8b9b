"""Evaluator kinds by name: adding one is one module with one ``@register_evaluator``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from evomerge.errors import EvaluationError
from evomerge.evaluate.base import Evaluator, EvaluatorConfig
from evomerge.registry import KindRegistry

EVALUATORS: KindRegistry[Evaluator, EvaluatorConfig] = KindRegistry(
    "evaluator",
    EvaluatorConfig,
    EvaluationError,
    plugins=(
        "evomerge.evaluate.harness",
        "evomerge.evaluate.perplexity",
        "evomerge.evaluate.python_callable",
    ),
)

register_evaluator = EVALUATORS.register
"""Class decorator ``@register_evaluator(kind, ConfigClass)``: make an Evaluator available."""
available_evaluators = EVALUATORS.names
evaluator_class = EVALUATORS.get
parse_evaluator_config = EVALUATORS.parse


def preflight_evaluator(
    data: Mapping[str, Any] | EvaluatorConfig, where: str = "evaluator"
) -> set[str] | None:
    """Validate ``data`` and check what can be checked without a model (its files, its
    function, its task names); the metric prefixes it can produce (None: unknown)."""
    parsed = parse_evaluator_config(data, where)
    try:
        return evaluator_class(parsed.kind).preflight(parsed)
    except EvaluationError as exc:
        raise EvaluationError(f"{where}: {exc}") from None


def build_evaluator(
    config: Mapping[str, Any] | EvaluatorConfig, model: Any, tokenizer: Any
) -> Evaluator:
    """Build the evaluator ``config`` describes around ``model`` and ``tokenizer``."""
    parsed = parse_evaluator_config(config)
    return evaluator_class(parsed.kind)(parsed, model, tokenizer)


def anchor_evaluator_paths(mapping: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Resolve an evaluator mapping's relative paths (``file``, ``include_paths``, a python
    ``function`` given as ``path.py:name``) against ``folder``, the config file's folder."""

    def anchor(value: Any) -> Any:
        if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
            return str(folder / value)
        return value

    if "file" in mapping:
        mapping["file"] = anchor(mapping["file"])
    if isinstance(mapping.get("include_paths"), list):
        mapping["include_paths"] = [anchor(p) for p in mapping["include_paths"]]
    function = mapping.get("function")
    if mapping.get("kind") == "python" and isinstance(function, str) and ":" in function:
        module, _, name = function.rpartition(":")
        if module.endswith(".py") or "/" in module or "\\" in module:
            mapping["function"] = f"{anchor(module)}:{name}"
    return mapping
