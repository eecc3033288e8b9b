"""A resolved recipe: for every output tensor, its inputs and its method's parameters.

A :class:`MergePlan` is what both engines execute. It is frozen, canonical (parameters
sorted, defaults filled) and hashable, so two recipes that merge the same way have the
same :meth:`MergePlan.fingerprint`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

Params = tuple[tuple[str, Any], ...]


def freeze(params: Mapping[str, Any]) -> Params:
    return tuple(sorted(params.items()))


@dataclass(frozen=True)
class TensorRef:
    """Tensor ``tensor`` of model number ``model`` in :attr:`MergePlan.models`."""

    model: int
    tensor: str


@dataclass(frozen=True)
class TensorJob:
    """How to make one output tensor."""

    name: str
    base: TensorRef | None
    sources: tuple[TensorRef, ...]
    shared: Params
    per_source: tuple[Params, ...]
    aux: tuple[tuple[str, tuple[TensorRef, ...]], ...] = ()

    def shared_dict(self) -> dict[str, Any]:
        return dict(self.shared)

    def per_source_dicts(self) -> list[dict[str, Any]]:
        return [dict(p) for p in self.per_source]


@dataclass(frozen=True)
class MergePlan:
    """Everything needed to build a merged model, and nothing about how it was written."""

    method: str
    models: tuple[str, ...]
    labels: tuple[str, ...]
    jobs: tuple[TensorJob, ...]
    seed: int = 0
    input_dtype: str | None = None
    out_dtype: str | None = None
    config_model: int = 0
    tokenizer_model: int = 0
    num_layers: int | None = None
    extra: tuple[tuple[str, Any], ...] = field(default=())

    def canonical(self) -> str:
        """JSON with sorted keys: equal plans give equal text."""
        return json.dumps(_plain(self), sort_keys=True, separators=(",", ":"))

    def fingerprint(self) -> str:
        return hashlib.sha256(self.canonical().encode()).hexdigest()[:16]

    def job(self, name: str) -> TensorJob:
        for job in self.jobs:
            if job.name == name:
                return job
        raise KeyError(name)


def _plain(value: Any) -> Any:
    if hasattr(value, "__dataclass_fields__"):
        return {k: _plain(getattr(value, k)) for k in value.__dataclass_fields__}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float):
        return repr(value)
    return value
