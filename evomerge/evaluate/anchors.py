"""Anchor documents: estimate a candidate's full score on a task from a few of its documents.

Documents that the same candidates get right (or nearly right) carry the same information. Given
the per-document results of some reference candidates fully scored on a task (a matrix, one row
per candidate, one column per document), ``select_anchors`` clusters the documents by their
columns with k-means (k-means++ start, seeded) into ``count`` clusters and keeps, per cluster,
the document nearest its centre: an anchor that stands for the whole cluster, weighted by the
cluster's share of the documents. A new candidate is scored on the anchors only, and
``Anchors.estimate`` is the weighted mean of its anchor results: with every document its own
cluster it is exactly the full mean.

This is the anchor-point idea of tinyBenchmarks (Polo et al., 2024), without its IRT refinement.
Pure NumPy, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from evomerge.errors import EvaluationError


@dataclass(frozen=True)
class Anchors:
    """One task's anchors: document indices and their weights (summing to 1)."""

    index: np.ndarray
    """The anchor documents' indices (int64, sorted)."""
    weight: np.ndarray
    """Each anchor's weight: its cluster's share of the task's documents (float64)."""

    def estimate(self, values: Sequence[float] | np.ndarray) -> float:
        """The estimated full score from per-anchor values, in the order of ``index``."""
        values = np.asarray(values, dtype=np.float64)
        if values.shape != self.weight.shape:
            raise EvaluationError(
                f"anchors: {values.size} values for {self.weight.size} anchor documents"
            )
        return float(np.dot(self.weight, values))

    def estimate_from(self, index: np.ndarray, values: np.ndarray) -> float:
        """The estimate from a candidate's per-document results (``index`` and ``values``
        aligned, any superset of the anchors); EvaluationError naming a missing anchor."""
        position = {int(doc): row for row, doc in enumerate(np.asarray(index))}
        missing = [int(doc) for doc in self.index if int(doc) not in position]
        if missing:
            raise EvaluationError(f"anchors: no result for anchor document {missing[0]}")
        return self.estimate([float(values[position[int(doc)]]) for doc in self.index])


def _kmeans_plus_plus(points: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    centres = [points[int(rng.integers(len(points)))]]
    distance = np.sum((points - centres[0]) ** 2, axis=1)
    for _ in range(1, count):
        total = float(distance.sum())
        if total <= 0:
            break
        chosen = int(rng.choice(len(points), p=distance / total))
        centres.append(points[chosen])
        distance = np.minimum(distance, np.sum((points - points[chosen]) ** 2, axis=1))
    return np.stack(centres)


def _assign(points: np.ndarray, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # squared distances through the expansion |p|^2 - 2 p.c + |c|^2: docs x centres
    squared = (
        np.sum(points**2, axis=1)[:, None]
        - 2 * points @ centres.T
        + np.sum(centres**2, axis=1)[None, :]
    )
    squared = np.maximum(squared, 0.0)
    labels = np.argmin(squared, axis=1)
    return labels, squared[np.arange(len(points)), labels]


def select_anchors(
    reference: np.ndarray,
    count: int,
    *,
    seed: int = 0,
    index: Sequence[int] | np.ndarray | None = None,
    iterations: int = 100,
) -> Anchors:
    """``count`` anchors for a task from ``reference`` (candidates x documents: per-document
    results of fully scored candidates, such as 0/1 correctness or log-likelihood margins).

    ``index`` gives the columns' document indices (default 0, 1, ...). With ``count`` at
    least the number of distinct columns, every distinct column is its own cluster and the
    estimate of any candidate that scores alike on identical columns is exact.
    """
    matrix = np.asarray(reference, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] < 1 or matrix.shape[1] < 1:
        raise EvaluationError(
            f"anchors: reference results must be candidates x documents, got shape {matrix.shape}"
        )
    if not np.all(np.isfinite(matrix)):
        raise EvaluationError("anchors: reference results hold NaN or infinite values")
    if count < 1:
        raise EvaluationError(f"anchors: count must be at least 1, got {count}")
    documents = matrix.shape[1]
    doc_index = np.arange(documents) if index is None else np.asarray(index, dtype=np.int64)
    if doc_index.shape != (documents,):
        raise EvaluationError(f"anchors: {doc_index.size} indices for {documents} documents")
    points = matrix.T
    distinct = np.unique(points, axis=0)
    count = min(count, len(distinct))
    rng = np.random.default_rng(seed)
    centres = _kmeans_plus_plus(points, count, rng)
    labels, _ = _assign(points, centres)
    for _ in range(iterations):
        updated = np.stack(
            [
                points[labels == cluster].mean(axis=0) if np.any(labels == cluster) else centre
                for cluster, centre in enumerate(centres)
            ]
        )
        new_labels, _ = _assign(points, updated)
        centres = updated
        if np.array_equal(new_labels, labels):
            break
        labels = new_labels
    labels, squared = _assign(points, centres)
    anchors, weights = [], []
    for cluster in range(len(centres)):
        members = np.flatnonzero(labels == cluster)
        if members.size == 0:
            continue
        nearest = members[np.argmin(squared[members])]  # ties: the lowest column
        anchors.append(int(doc_index[nearest]))
        weights.append(members.size / documents)
    order = np.argsort(anchors)
    return Anchors(
        index=np.asarray(anchors, dtype=np.int64)[order],
        weight=np.asarray(weights, dtype=np.float64)[order],
    )
