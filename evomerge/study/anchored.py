"""A study's estimated fidelity (``fidelity: {anchors: N}``): reference results, anchors, estimates.

The driver feeds it the per-document results of every fully scored trial (baselines, proposals
scored before there were anchors, promotions). Per task, the documents are clustered on the
reference trials' log-likelihood margins (clipped to +-``MARGIN_CLIP``; the metric values where
a task has no margins) and each cluster's most central document becomes an anchor weighted by the
cluster's size (``evomerge.evaluate.anchors``). A cheap trial scores the anchors only; its
``task/metric`` for every per-document metric is the weighted mean over the anchors. Anchors are
re-chosen after every new reference result the driver passes to ``refresh``; they depend only on
the reference results and the seed, so a resumed study rebuilds the same ones from the database.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from evomerge.evaluate.anchors import Anchors, select_anchors
from evomerge.evaluate.documents import TaskDocuments

MIN_REFERENCE = 2
"""Fully scored trials needed before anchors are chosen (before: proposals are scored in full)."""
MARGIN_CLIP = 20.0
"""Margins beyond this are as good as certain; clipping keeps a few huge ones from deciding
the clusters."""


class AnchorFidelity:
    """Anchors of each task, re-chosen from the fully scored trials' per-document results."""

    def __init__(self, count: int, seed: int = 0) -> None:
        self.count = count
        self.seed = seed
        self.reference: list[Mapping[str, TaskDocuments]] = []
        self.anchors: dict[str, Anchors] = {}

    @property
    def name(self) -> str:
        return f"anchors={self.count}"

    @property
    def rank(self) -> float:
        """Where its scores rank among fidelities: documents per task, like ``limit``."""
        return float(self.count)

    @property
    def ready(self) -> bool:
        return bool(self.anchors)

    def add_reference(self, documents: Mapping[str, TaskDocuments]) -> None:
        """Per-document results of one fully scored trial (take effect at ``refresh``)."""
        if documents:
            self.reference.append(documents)

    def refresh(self) -> None:
        """Choose every task's anchors from the reference results (once there are enough);
        a task is left out where the reference trials scored different documents."""
        if len(self.reference) < MIN_REFERENCE:
            return
        anchors: dict[str, Anchors] = {}
        for task, first in self.reference[0].items():
            rows = [row.get(task) for row in self.reference]
            if any(row is None or not np.array_equal(row.index, first.index) for row in rows):
                continue
            features = _features([row for row in rows if row is not None])
            if features is not None:
                anchors[task] = select_anchors(
                    features, self.count, seed=self.seed, index=first.index
                )
        self.anchors = anchors

    def documents(self) -> dict[str, list[int]]:
        """The anchor documents to score, per task."""
        return {task: [int(doc) for doc in a.index] for task, a in self.anchors.items()}

    def estimate(
        self,
        documents: Mapping[str, TaskDocuments],
        anchors: Mapping[str, Anchors] | None = None,
    ) -> dict[str, float]:
        """``task/metric`` estimates of the full scores from a trial's anchor results, by the
        ``anchors`` it was scored on (the current ones by default: they may have been re-chosen
        while it ran)."""
        out: dict[str, float] = {}
        for task, chosen in (self.anchors if anchors is None else anchors).items():
            scored = documents.get(task)
            if scored is None:
                continue
            for metric, values in scored.values.items():
                out[f"{task}/{metric}"] = chosen.estimate_from(scored.index, values)
        return out


def _features(rows: list[TaskDocuments]) -> np.ndarray | None:
    margins = [row.margin for row in rows]
    if all(m is not None and np.all(np.isfinite(m)) for m in margins):
        return np.clip(np.stack(margins), -MARGIN_CLIP, MARGIN_CLIP)  # type: ignore[arg-type]
    names = sorted(set.intersection(*(set(row.values) for row in rows)))
    if not names:
        return None
    return np.vstack([np.stack([row.values[name] for row in rows]) for name in names])
