"""The evaluator interface: built once around a model, then asked for scores many times."""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

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


Split = Literal["search", "holdout"]
"""Which documents ``evaluate`` scores: those the search may see, or the held-out ones."""
SPLITS: tuple[str, ...] = ("search", "holdout")


def holdout_count(fraction: float, total: int) -> int:
    """How many of ``total`` documents a ``holdout`` fraction holds out: ``fraction * total``
    rounded half up, but at least 1 and at most ``total - 1`` (both splits keep a document).
    EvaluationError when ``total`` is under 2."""
    if total < 2:
        raise EvaluationError(
            f"has {total} document(s); holdout needs at least 2 (one to search on, one held out)"
        )
    return min(total - 1, max(1, math.floor(fraction * total + 0.5)))


def holdout_indices(name: str, total: int, fraction: float) -> list[int]:
    """The held-out document indices of task ``name`` (sorted): the ``holdout_count`` indices
    whose SHA-256 of ``"{name}\\0{index}"`` is smallest.

    It depends only on the name, the index and the count, so every process, machine and
    evaluator instance holds out the same documents; a larger fraction holds out a superset.
    """
    try:
        count = holdout_count(fraction, total)
    except EvaluationError as exc:
        raise EvaluationError(f"{name} {exc}") from None
    ranked = sorted(
        range(total),
        key=lambda index: hashlib.sha256(f"{name}\0{index}".encode()).digest(),
    )
    return sorted(ranked[:count])


def check_split(split: str, fraction: float | None, owner: str) -> None:
    """EvaluationError unless ``split`` is "search", or "holdout" with a ``holdout`` fraction."""
    if split not in SPLITS:
        raise EvaluationError(f"{owner}: split must be 'search' or 'holdout', got {split!r}")
    if split == "holdout" and fraction is None:
        raise EvaluationError(f"{owner} has no holdout configured (set its holdout fraction)")


def split_indices(
    name: str, total: int, fraction: float | None, split: str, owner: str = "evaluator"
) -> list[int]:
    """The document indices (in their order) of ``split`` for task ``name`` of ``total``
    documents: with no holdout, "search" is every document and "holdout" is an error."""
    check_split(split, fraction, owner)
    if fraction is None:
        return list(range(total))
    try:
        held = holdout_indices(name, total, fraction)
    except EvaluationError as exc:
        raise EvaluationError(f"{owner}: {exc}") from None
    if split == "holdout":
        return held
    chosen = set(held)
    return [index for index in range(total) if index not in chosen]


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
    documents: dict[str, Any] | None = None
    """Per task, its per-document results (``evomerge.evaluate.documents.TaskDocuments``), from
    evaluators that keep them (``lm_eval``); None from the others."""


class Evaluator(ABC):
    """Scores one model object; built once per worker, then ``evaluate`` per candidate.

    The model is held by reference: merging new weights into it in place and calling
    ``evaluate`` again scores the new weights. Nothing is cached between calls that depends on
    the weights.
    """

    kind: ClassVar[str]
    config_class: ClassVar[type[EvaluatorConfig]]

    takes_documents: ClassVar[bool] = False
    """``evaluate`` takes ``documents`` (explicit per-task document indices) and returns
    per-document results."""

    def __init__(self, config: EvaluatorConfig, model: Any, tokenizer: Any) -> None:
        self.config = config
        self.model = model
        self.tokenizer = tokenizer

    @abstractmethod
    def evaluate(self, limit: int | float | None = None, split: Split = "search") -> EvalResult:
        """Score the model as it is now on ``split``'s documents: "search" (those not held
        out: all of them when no ``holdout`` is configured) or "holdout" (the held-out ones;
        EvaluationError when none are). ``limit`` overrides the config's subset size and
        counts within the split."""

    @property
    def holdout(self) -> float | None:
        """The configured ``holdout`` fraction; None when every document is searched on."""
        return getattr(self.config, "holdout", None)

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

    probe_at_preflight: ClassVar[bool] = False
    """True for kinds whose metric names are known only by running them (user code):
    preflight then scores a tiny stand-in model once to learn them."""

    @classmethod
    def preflight(cls, config: EvaluatorConfig) -> set[str] | None:
        """Check what can be checked without a model (files, functions, task names), raising
        EvaluationError; return the metric prefixes (``prefix/...``) the evaluator can
        produce, or None when that is only known by running it."""
        return None

    @property
    def name(self) -> str:
        """A short label naming this evaluator in reports and errors (its kind by default)."""
        return self.kind

    @property
    def batch_size(self) -> int | None:
        """Items per forward pass that the next ``evaluate`` uses; None when the evaluator has
        no batch to lower."""
        return None

    def resize_batch(self, size: int) -> None:
        """Use batches of ``size`` (>= 1) from now on; only for evaluators with a batch."""
        raise EvaluationError(f"{self.name} evaluator has no batch size to change")

    def halve_batch(self) -> bool:
        """Halve the batch size (rounding down, at least 1) for the rest of this evaluator's
        life: what ran out of memory once would again on the next candidate. False, changing
        nothing, when there is no batch or it is already 1."""
        size = self.batch_size
        if size is None or size <= 1:
            return False
        self.resize_batch(size // 2)
        return True

    def close(self) -> None:
        """Release what the evaluator holds (it keeps the model alive otherwise)."""
        self.model = None
        self.tokenizer = None


class EvaluationOutOfMemory(EvaluationError):
    """An evaluator ran out of memory at every batch size it could lower to."""


OUT_OF_MEMORY_MESSAGES = ("out of memory", "DefaultCPUAllocator: can't allocate memory")
"""RuntimeError messages of an allocator that ran out: CUDA's caching allocator ("CUDA out of
memory"), the CUDA driver ("CUDA error: out of memory"), HIP and MPS, and the CPU allocator."""


def is_out_of_memory(exc: BaseException) -> bool:
    """True when ``exc``, or an exception in its ``__cause__``/``__context__`` chain (an
    evaluator's wrapped error), is ``torch.cuda.OutOfMemoryError`` or a RuntimeError whose
    message says an allocator ran out of memory."""
    import torch

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, torch.cuda.OutOfMemoryError):
            return True
        if isinstance(current, RuntimeError):
            text = str(current)
            if any(message in text for message in OUT_OF_MEMORY_MESSAGES):
                return True
        current = current.__cause__ or current.__context__
    return False


class EvaluatorReturnError(EvaluationError):
    """An evaluator's code ran and returned something that is not metrics (nothing, or not
    numbers): the same code will return it for every candidate."""


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
