"""The worker side of the study service: merge workers and a pool of them on Ray.

``evomerge.cluster.worker`` needs no Ray; ``WorkerPool`` and ``dispatch`` (which import Ray)
are loaded on first use.
"""

from __future__ import annotations

from typing import Any

from evomerge.cluster.worker import CandidateResult, CandidateTask, MergeWorker, WorkerSpec

__all__ = [
    "CandidateResult",
    "CandidateTask",
    "MergeWorker",
    "WorkerPool",
    "WorkerSpec",
    "dispatch",
]


def __getattr__(name: str) -> Any:
    if name in ("WorkerPool", "dispatch"):
        from evomerge.cluster import pool

        return getattr(pool, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
