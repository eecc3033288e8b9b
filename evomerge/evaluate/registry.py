"""Evaluator kinds by name: adding one is one module with one ``@register_evaluator``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from evomerge.errors import EvaluationError
from evomerge.evaluate.base import Evaluator, EvaluatorConfig, EvaluatorReturnError
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


def probe_evaluator(
    data: Mapping[str, Any] | EvaluatorConfig, model: Any, tokenizer: Any, where: str = "evaluator"
) -> list[str] | None:
    """The metric names of an evaluator whose kind is known only by running it
    (``probe_at_preflight``), found by scoring ``model`` (a tiny stand-in) once at limit 2.

    EvaluationError (prefixed by ``where``) when its code ran and returned no usable metrics:
    it would do so for every candidate. None when the kind needs no probe or the probe is
    inconclusive (the code raised, or cannot be imported here: it may need what only a worker
    has, and the worker will report it)."""
    parsed = parse_evaluator_config(data, where)
    if not evaluator_class(parsed.kind).probe_at_preflight:
        return None
    evaluator = None
    try:
        evaluator = build_evaluator(parsed, model, tokenizer)
        return evaluator.metric_names()
    except EvaluatorReturnError as exc:
        raise EvaluatorReturnError(f"{where}: {exc}") from None
    except Exception:  # inconclusive: user code that needs the worker's environment
        return None
    finally:
        if evaluator is not None:
            evaluator.close()


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
