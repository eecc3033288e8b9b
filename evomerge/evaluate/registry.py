"""Evaluator kinds by name: adding one is one module with one ``@register_evaluator``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError

from evomerge.errors import EvaluationError
from evomerge.evaluate.base import Evaluator, EvaluatorConfig
from evomerge.util import pydantic_message

_EVALUATORS: dict[str, type[Evaluator]] = {}

E = TypeVar("E", bound=type[Evaluator])


def register_evaluator(kind: str, config_class: type[EvaluatorConfig]) -> Callable[[E], E]:
    """Class decorator: make an Evaluator subclass available as ``kind``."""

    def add(cls: E) -> E:
        if kind in _EVALUATORS:
            raise ValueError(f"evaluator kind {kind!r} is registered twice")
        cls.kind = kind
        cls.config_class = config_class
        _EVALUATORS[kind] = cls
        return cls

    return add


def _load_builtin() -> None:
    from evomerge.evaluate import harness, perplexity, python_callable  # noqa: F401


def available_evaluators() -> list[str]:
    _load_builtin()
    return sorted(_EVALUATORS)


def evaluator_class(kind: str) -> type[Evaluator]:
    _load_builtin()
    if kind not in _EVALUATORS:
        raise EvaluationError(
            f"unknown evaluator kind {kind!r}; available: {', '.join(sorted(_EVALUATORS))}"
        )
    return _EVALUATORS[kind]


def parse_evaluator_config(
    data: Mapping[str, Any] | EvaluatorConfig, where: str = "evaluator"
) -> EvaluatorConfig:
    """Validate a mapping (``kind`` picks the model) into that kind's config."""
    if isinstance(data, EvaluatorConfig):
        return data
    if not isinstance(data, Mapping):
        raise EvaluationError(f"{where}: expected a mapping with a 'kind', got {data!r}")
    if "kind" not in data:
        raise EvaluationError(
            f"{where}: missing 'kind' (one of {', '.join(available_evaluators())})"
        )
    try:
        cls = evaluator_class(str(data["kind"]))
    except EvaluationError as exc:
        raise EvaluationError(f"{where}: kind: {exc}") from None
    try:
        return cls.config_class.model_validate(dict(data))
    except ValidationError as exc:
        raise EvaluationError(f"{where} ({cls.kind}): {pydantic_message(exc)}") from None


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
