"""The evaluator interface: built once around a model, then asked for scores many times."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, field_validator

from evomerge.errors import EvaluationError


class EvaluatorConfig(BaseModel):
    """Fields every evaluator kind shares. Subclasses add ``kind: Literal[...]`` and their own."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str
    limit: int | float | None = None
    """Default subset size when ``evaluate`` gets none: a count per task (>= 1) or a fraction
    (0 < limit < 1). None evaluates everything."""

    @field_validator("limit")
    @classmethod
    def _limit(cls, value: int | float | None) -> int | float | None:
        try:
            return check_limit(value, "limit")
        except EvaluationError as exc:  # as a ValueError, so the message names the field
            raise ValueError(str(exc).removeprefix("limit: ")) from None


def check_limit(limit: int | float | None, owner: str) -> int | float | None:
    """Validate a ``limit``: None, an int >= 1, or a float in (0, 1)."""
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int | float):
        raise EvaluationError(f"{owner}: limit must be a number, got {limit!r}")
    if isinstance(limit, float) and limit.is_integer() and limit >= 1:
        return int(limit)
    if isinstance(limit, int):
        if limit < 1:
            raise EvaluationError(f"{owner}: limit must be at least 1, got {limit}")
        return limit
    if not 0 < limit < 1:
        raise EvaluationError(f"{owner}: a fractional limit must be between 0 and 1, got {limit}")
    return limit


def limit_count(limit: int | float | None, total: int) -> int:
    """How many of ``total`` items a validated ``limit`` selects (at least 1 when total > 0)."""
    if limit is None:
        return total
    if isinstance(limit, int):
        return min(limit, total)
    return min(total, max(1, math.ceil(limit * total)))


@dataclass(frozen=True)
class EvalResult:
    """Named metrics (``task/metric`` keys) and the wall seconds the evaluation took."""

    metrics: dict[str, float]
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)


class Evaluator(ABC):
    """Scores one model object; built once per worker, then ``evaluate`` per candidate.

    The model is held by reference: merging new weights into it in place and calling
    ``evaluate`` again scores the new weights. Nothing is cached between calls that depends on
    the weights.
    """

    kind: ClassVar[str]
    config_class: ClassVar[type[EvaluatorConfig]]

    def __init__(self, config: EvaluatorConfig, model: Any, tokenizer: Any) -> None:
        self.config = config
        self.model = model
        self.tokenizer = tokenizer

    @abstractmethod
    def evaluate(self, limit: int | float | None = None) -> EvalResult:
        """Score the model as it is now; ``limit`` overrides the config's subset size."""

    def metric_names(self) -> list[str]:
        """Every metric key ``evaluate`` returns (runs a two-item evaluation to find out).

        Two items, not one: a standard error needs at least two.
        """
        return sorted(self.evaluate(limit=2).metrics)

    def check_metrics(self, names: Iterable[str]) -> None:
        """Raise EvaluationError naming any of ``names`` this evaluator does not produce."""
        available = self.metric_names()
        missing = [name for name in names if name not in available]
        if missing:
            raise EvaluationError(
                f"{self.kind} evaluator does not produce metric(s) {', '.join(missing)}; "
                f"it produces: {', '.join(available)}"
            )

    @classmethod
    def preflight(cls, config: EvaluatorConfig) -> set[str] | None:
        """Check what can be checked without a model (files, functions, task names), raising
        EvaluationError; return the metric prefixes (``prefix/...``) the evaluator can
        produce, or None when that is only known by running it."""
        return None

    def close(self) -> None:
        """Release what the evaluator holds (it keeps the model alive otherwise)."""
        self.model = None
        self.tokenizer = None


def numeric_metrics(values: Mapping[str, Any], owner: str) -> dict[str, float]:
    """``values`` as ``{str: float}``; an EvaluationError names the first non-number."""
    out: dict[str, float] = {}
    for key, value in values.items():
        if not isinstance(key, str) or not key:
            raise EvaluationError(f"{owner}: metric names must be non-empty strings, got {key!r}")
        out[key] = as_number(value, f"{owner}: metric {key!r}")
    return out


def as_number(value: Any, what: str) -> float:
    """A float from a Python/numpy/0-d torch number; EvaluationError for anything else."""
    if isinstance(value, bool):
        raise EvaluationError(f"{what} is a bool ({value}); return a number")
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0 and not isinstance(value, str):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise EvaluationError(f"{what} is not a number: {value!r} ({type(value).__name__})")
    return float(value)
