"""Several evaluators on one model, their metrics merged: what a study worker, ``evomerge
eval`` and an export's verification all score with."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.errors import EvaluationError
from evomerge.evaluate.base import Evaluator
from evomerge.failpoints import failpoint

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


class MetricClashError(EvaluationError):
    """Two evaluators of one suite produce a metric of the same name."""


class EvaluatorSuite:
    """Several evaluators on one model; their metrics merged, a clash is an error."""

    def __init__(self, evaluators: Sequence[Evaluator]) -> None:
        self.evaluators = list(evaluators)

    def evaluate(
        self, limit: int | float | None = None, split: str = "search"
    ) -> tuple[dict[str, float], float]:
        """``(metrics, seconds)``: every evaluator's metrics at ``limit`` on the searched-on
        documents, or with ``split="holdout"`` on the held-out ones, and the time taken."""
        metrics: dict[str, float] = {}
        seconds = 0.0
        for evaluator in self.evaluators:
            result = evaluator.evaluate(limit, split=split)
            clash = set(result.metrics) & set(metrics)
            if clash:
                raise MetricClashError(f"two evaluators both produce metric {sorted(clash)[0]}")
            metrics.update(result.metrics)
            seconds += result.seconds
            failpoint("mid_evaluation")  # a test kills the worker between two evaluators
        return metrics, seconds

    def check_metrics(self, names: Sequence[str]) -> None:
        available = sorted({m for e in self.evaluators for m in e.metric_names()})
        missing = [name for name in names if name not in available]
        if missing:
            raise EvaluationError(
                f"no evaluator produces metric(s) {', '.join(missing)}; "
                f"available: {', '.join(available)}"
            )


def score_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    evaluators: Sequence[Mapping[str, Any]],
    limit: int | float | None,
    split: str = "search",
) -> tuple[dict[str, float], float]:
    """Build the evaluators from their config mappings, score ``model``, close them."""
    from evomerge.evaluate.registry import build_evaluator

    built: list[Evaluator] = []
    try:
        for config in evaluators:
            built.append(build_evaluator(dict(config), model, tokenizer))
        return EvaluatorSuite(built).evaluate(limit, split)
    finally:
        for evaluator in built:
            evaluator.close()


def score_folder(
    folder: Path,
    evaluators: Sequence[Mapping[str, Any]],
    limit: int | float | None,
    device: str = "cpu",
    dtype: str | None = None,
    split: str = "search",
) -> dict[str, float]:
    """Load a model folder in ``dtype`` (see :func:`load_model_for_eval`) and score it with the
    evaluators; float32 is what a study worker scores in."""
    from evomerge.evaluate.model_loading import load_model_for_eval

    model, tokenizer = load_model_for_eval(folder, device=device, dtype=dtype)
    metrics, _ = score_model(model, tokenizer, evaluators, limit, split)
    return metrics
