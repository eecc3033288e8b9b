"""Several evaluators on one model, their metrics merged: what a study worker, ``evomerge
eval`` and an export's verification all score with."""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.errors import EvaluationError
from evomerge.evaluate.base import (
    EvalResult,
    EvaluationOutOfMemory,
    Evaluator,
    is_out_of_memory,
)
from evomerge.failpoints import failpoint

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


TOLERANCE = 1e-6
"""Largest absolute difference between a re-scored metric and the recorded one."""


class MetricClashError(EvaluationError):
    """Two evaluators of one suite produce a metric of the same name."""


class EvaluatorSuite:
    """Several evaluators on one model; their metrics merged, a clash is an error.

    Out of memory: when an evaluator runs out of memory (``base.is_out_of_memory``), cached
    GPU memory is freed, that evaluator's batch is halved and that evaluator alone is run
    again, until it succeeds; the halved batch is kept for the rest of the evaluator's life
    (this worker would run out again on the next candidate). When even batch 1 (or an
    evaluator with no batch) runs out, ``EvaluationOutOfMemory`` names the sizes tried and
    the batch is put back where this call found it: a smaller batch did not help.
    """

    def __init__(self, evaluators: Sequence[Evaluator]) -> None:
        self.evaluators = list(evaluators)
        self.names = _unique_names(self.evaluators)
        self.last_batch_sizes: dict[str, int] = {}
        """Per evaluator name (``Evaluator.name``, made unique), the batch size the last
        ``evaluate`` scored with; evaluators without a batch are absent."""
        self.oom_retries = 0
        """How many times the last ``evaluate`` halved a batch after running out of memory."""
        self.last_documents: dict[str, Any] = {}
        """Per task, the last ``evaluate``'s per-document results (``TaskDocuments``)."""

    def evaluate(
        self,
        limit: int | float | None = None,
        split: str = "search",
        documents: Mapping[str, Sequence[int]] | None = None,
    ) -> tuple[dict[str, float], float]:
        """``(metrics, seconds)``: every evaluator's metrics at ``limit`` on the searched-on
        documents, or with ``split="holdout"`` on the held-out ones, and the time taken
        (failed out-of-memory attempts included). ``documents``: exactly these searched-on
        documents per task (an estimated fidelity's anchors), for the evaluators that take
        them (``lm_eval``); each task is its evaluator's. Per-document results of the
        evaluators that keep them are in ``last_documents`` afterwards."""
        metrics: dict[str, float] = {}
        seconds = 0.0
        self.last_batch_sizes = {}
        self.last_documents = {}
        self.oom_retries = 0
        for name, evaluator in zip(self.names, self.evaluators, strict=True):
            start = time.perf_counter()
            mine = None
            if documents is not None and evaluator.takes_documents:
                tasks = evaluator.split_documents("search")  # type: ignore[attr-defined]
                mine = {task: docs for task, docs in documents.items() if task in tasks}
            result = self._run(name, evaluator, limit, split, mine or None)
            clash = set(result.metrics) & set(metrics)
            if clash:
                raise MetricClashError(f"two evaluators both produce metric {sorted(clash)[0]}")
            metrics.update(result.metrics)
            self.last_documents.update(result.documents or {})
            seconds += max(result.seconds, time.perf_counter() - start)
            if evaluator.batch_size is not None:
                self.last_batch_sizes[name] = evaluator.batch_size
            failpoint("mid_evaluation")  # a test kills the worker between two evaluators
        return metrics, seconds

    def _run(
        self,
        name: str,
        evaluator: Evaluator,
        limit: int | float | None,
        split: str,
        documents: Mapping[str, Sequence[int]] | None = None,
    ) -> EvalResult:
        """``evaluator.evaluate``, run again at half the batch after each out-of-memory error."""
        first = evaluator.batch_size
        tried: list[int | None] = []
        while True:
            tried.append(evaluator.batch_size)
            failure = None
            try:
                if documents is not None:
                    return evaluator.evaluate(limit, split=split, documents=documents)  # type: ignore[arg-type, call-arg]
                return evaluator.evaluate(limit, split=split)  # type: ignore[arg-type]
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                failure = f"{type(exc).__name__}: {exc}"
            # Out of the except block: the failed attempt's frames and tensors are released.
            free_cached_memory()
            if not evaluator.halve_batch():
                if first is not None and evaluator.batch_size != first:
                    evaluator.resize_batch(first)
                raise EvaluationOutOfMemory(_out_of_memory_message(name, tried, failure))
            self.oom_retries += 1

    def check_metrics(self, names: Sequence[str]) -> None:
        """EvaluationError naming any of ``names`` no evaluator produces."""
        available = sorted({m for e in self.evaluators for m in e.metric_names()})
        missing = [name for name in names if name not in available]
        if missing:
            raise EvaluationError(
                f"no evaluator produces metric(s) {', '.join(missing)}; "
                f"available: {', '.join(available)}"
            )


def free_cached_memory() -> None:
    """Collect garbage and return cached CUDA blocks to the driver (when CUDA is there)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _unique_names(evaluators: Sequence[Evaluator]) -> list[str]:
    """Each evaluator's ``name``; a repeated one gets ``#2``, ``#3``, ..."""
    names: list[str] = []
    for evaluator in evaluators:
        name, number = evaluator.name, 1
        while name in names:
            number += 1
            name = f"{evaluator.name}#{number}"
        names.append(name)
    return names


def _out_of_memory_message(name: str, tried: list[int | None], failure: str) -> str:
    if tried == [None]:
        sizes = "it has no batch size to lower"
    else:
        sizes = "at batch sizes " + ", ".join(str(size) for size in tried)
    return (
        f"evaluator {name} ran out of memory {sizes} ({failure}); lower its batch_size, use "
        "residency: host, or a smaller working dtype"
    )


def score_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    evaluators: Sequence[Mapping[str, Any]],
    limit: int | float | None,
    split: str = "search",
    batch_sizes: Mapping[str, int] | None = None,
) -> tuple[dict[str, float], float]:
    """Build the evaluators from their config mappings, score ``model``, close them.
    ``batch_sizes`` (by evaluator name, as ``EvaluatorSuite.last_batch_sizes`` records them)
    replaces their batch sizes: a trial a worker scored after halving a batch is re-scored
    with the same batches."""
    from evomerge.evaluate.registry import build_evaluator

    built: list[Evaluator] = []
    try:
        for config in evaluators:
            built.append(build_evaluator(dict(config), model, tokenizer))
        suite = EvaluatorSuite(built)
        for name, evaluator in zip(suite.names, suite.evaluators, strict=True):
            size = (batch_sizes or {}).get(name)
            if size is not None and evaluator.batch_size is not None:
                evaluator.resize_batch(int(size))
        return suite.evaluate(limit, split)
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
    batch_sizes: Mapping[str, int] | None = None,
) -> dict[str, float]:
    """Load a model folder in ``dtype`` (see :func:`load_model_for_eval`) and score it with the
    evaluators (``batch_sizes``: see :func:`score_model`); float32 is what a study worker
    scores in on a CPU."""
    from evomerge.evaluate.model_loading import load_model_for_eval

    model, tokenizer = load_model_for_eval(folder, device=device, dtype=dtype)
    metrics, _ = score_model(model, tokenizer, evaluators, limit, split, batch_sizes)
    return metrics


def first_mismatch(recorded: Mapping[str, float], measured: Mapping[str, float]) -> str | None:
    """The first recorded metric (by name, ``*_stderr`` included) the measurement does not
    reproduce within :data:`TOLERANCE`, described; None when all agree."""
    for name in sorted(recorded):
        want, got = recorded[name], measured.get(name)
        if got is None:
            return f"{name} is {want!r} in the study database but was not measured"
        if not _agree(got, want):
            return f"{name} is {got!r} in the exported model but {want!r} in the study database"
    return None


def _agree(a: float, b: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b or abs(a - b) <= TOLERANCE
