"""The worker side of the study service: merge workers, a pool of them on Ray, and joining Ray.

``evomerge.cluster.worker`` needs no Ray; ``connect`` says which cluster and joins it. Every
name here is loaded on first use, so importing ``evomerge.cluster.connect`` stays light.
"""

from __future__ import annotations

from typing import Any

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
    if name in __all__:
        from evomerge.cluster import worker

        return getattr(worker, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
