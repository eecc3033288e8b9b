"""Per-document results of one evaluation, and their compact bytes for the study database.

Estimated fidelities (``evomerge.evaluate.anchors``) learn from which documents a candidate got
right, so every lm-eval evaluation keeps, per task and document: the per-document value of each
metric (``acc`` is 0 or 1) and a log-likelihood margin. The margin is the gold choice's
log-likelihood minus the best other choice's for ``multiple_choice`` tasks (above 0 exactly when
the document is answered right), and the continuation's log-likelihood for ``loglikelihood``
tasks; NaN where neither applies (generation tasks).

Bytes: one ``.npz`` (no pickles) holding, per task, the document indices (int32), each metric's
values and the margins (float16: exact for 0/1 values, 3 significant digits for margins). A
1,000-document task takes about 3 KB.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from evomerge.errors import EvaluationError


@dataclass(frozen=True)
class TaskDocuments:
    """One task's per-document results, in increasing document index."""

    index: np.ndarray
    """lm-eval's document indices (int32, sorted, distinct)."""
    values: dict[str, np.ndarray] = field(default_factory=dict)
    """Per metric name (``acc``), the per-document value (float32), aligned with ``index``."""
    margin: np.ndarray | None = None
    """Log-likelihood margin per document (float32, NaN where undefined), aligned with ``index``."""

    def __post_init__(self) -> None:
        count = len(self.index)
        for name, array in self.values.items():
            if len(array) != count:
                raise EvaluationError(f"per-document {name}: {len(array)} values for {count} docs")
        if self.margin is not None and len(self.margin) != count:
            raise EvaluationError(f"per-document margins: {len(self.margin)} for {count} docs")

    def value_of(self, metric: str) -> np.ndarray:
        """The per-document values of ``metric``; EvaluationError naming the ones there are."""
        try:
            return self.values[metric]
        except KeyError:
            have = ", ".join(sorted(self.values)) or "none"
            raise EvaluationError(
                f"no per-document values of metric {metric!r} (have: {have})"
            ) from None


def margin_of(logliks: Sequence[float], gold: Any) -> float:
    """The margin of one document from its requests' log-likelihoods (one per choice)."""
    if len(logliks) == 1:
        return float(logliks[0])
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(logliks):
        return math.nan
    return float(logliks[gold]) - max(float(v) for i, v in enumerate(logliks) if i != gold)


def task_documents(
    index: Sequence[int], values: Sequence[Mapping[str, Any]], margins: Sequence[float]
) -> TaskDocuments:
    """``TaskDocuments`` from per-document rows in any order: the metric values of each
    document (numeric ones are kept) and its margin."""
    order = sorted(range(len(index)), key=lambda row: index[row])
    names = list(dict.fromkeys(name for row in values for name in row))
    kept = {
        name: np.asarray([float(values[row][name]) for row in order], dtype=np.float32)
        for name in names
        if all(isinstance(row.get(name), int | float) for row in values)  # bools count as 0/1
    }
    return TaskDocuments(
        index=np.asarray([index[row] for row in order], dtype=np.int32),
        values=kept,
        margin=np.asarray([margins[row] for row in order], dtype=np.float32),
    )


def encode(documents: Mapping[str, TaskDocuments]) -> bytes:
    """The compact bytes of per-task results (see the module docstring)."""
    arrays: dict[str, np.ndarray] = {}
    names = list(documents)
    arrays["tasks"] = np.asarray(names, dtype=np.str_)
    for number, name in enumerate(names):
        task = documents[name]
        arrays[f"{number}/index"] = task.index.astype(np.int32)
        if task.margin is not None:
            arrays[f"{number}/margin"] = task.margin.astype(np.float16)
        for metric, array in task.values.items():
            arrays[f"{number}/value/{metric}"] = array.astype(np.float16)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def decode(data: bytes) -> dict[str, TaskDocuments]:
    """Per-task results from ``encode``'s bytes (float32 arrays again)."""
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        names = [str(name) for name in archive["tasks"]]
        out: dict[str, TaskDocuments] = {}
        for number, name in enumerate(names):
            prefix = f"{number}/value/"
            values = {
                key.removeprefix(prefix): archive[key].astype(np.float32)
                for key in archive.files
                if key.startswith(prefix)
            }
            margin_key = f"{number}/margin"
            out[name] = TaskDocuments(
                index=archive[f"{number}/index"].astype(np.int32),
                values=values,
                margin=(
                    archive[margin_key].astype(np.float32) if margin_key in archive.files else None
                ),
            )
    return out
