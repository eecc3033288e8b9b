"""A resolved recipe: for every output tensor, its inputs and its method's parameters.

A :class:`MergePlan` is what both engines execute. It is frozen, canonical (parameters
sorted, defaults filled) and hashable, so two recipes that merge the same way have the
same :meth:`MergePlan.fingerprint`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from evomerge.merge.tensors import layer_index

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
    method: str | None = None
    """The merge method of this tensor when it is not :attr:`MergePlan.method` (a recipe's
    ``layer_methods``); None means the plan's. Left out of the canonical text when None."""
    scale: float | None = None
    """Multiply the merged tensor by this (a data-flow path folds a layer's input scaling into
    its input norm's weight); None: unchanged, and left out of the canonical text."""

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
    layer_origins: tuple[int, ...] | None = None
    """For a plan that stacks layers (a data-flow path): the layer of its model each output
    layer is, so per-layer config entries (``layer_types``) follow it. Left out of the
    canonical text when None."""

    def canonical(self) -> str:
        """JSON with sorted keys: equal plans give equal text."""
        return json.dumps(_plain(self), sort_keys=True, separators=(",", ":"))

    def fingerprint(self) -> str:
        return hashlib.sha256(self.canonical().encode()).hexdigest()[:16]

    def method_of(self, job: TensorJob) -> str:
        """The merge method of ``job``: its own, else the plan's."""
        return job.method or self.method

    def methods_used(self) -> tuple[str, ...]:
        """Every method the plan merges with, the plan's first, then in job order."""
        names = [self.method]
        for job in self.jobs:
            if job.method is not None and job.method not in names:
                names.append(job.method)
        return tuple(names)

    def describe_methods(self) -> str:
        """The method, or with per-layer methods which ones where (for cards and messages)."""
        if len(self.methods_used()) == 1:
            return self.method
        layers: dict[int, str] = {}
        for job in self.jobs:
            index = layer_index(job.name)
            if index is not None and job.sources:
                layers.setdefault(index, self.method_of(job))
        ordered = [layers[i] for i in sorted(layers)]
        return f"{self.method} outside the layers; {layer_runs(ordered, sorted(layers))}"

    def job(self, name: str) -> TensorJob:
        for job in self.jobs:
            if job.name == name:
                return job
        raise KeyError(name)


def layer_runs(methods: Sequence[str], layers: Sequence[int] | None = None) -> str:
    """``ties in layers 0-1 and dare_ties in layers 2-3``: runs of equal methods, by layer."""
    numbers = list(layers) if layers is not None else list(range(len(methods)))
    runs: list[tuple[str, int, int]] = []
    for name, layer in zip(methods, numbers, strict=True):
        if runs and runs[-1][0] == name and runs[-1][2] == layer - 1:
            runs[-1] = (name, runs[-1][1], layer)
        else:
            runs.append((name, layer, layer))
    parts = [
        f"{name} in layer {first}" if first == last else f"{name} in layers {first}-{last}"
        for name, first, last in runs
    ]
    return ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + parts[-1]


def _plain(value: Any) -> Any:
    if hasattr(value, "__dataclass_fields__"):
        plain = {k: _plain(getattr(value, k)) for k in value.__dataclass_fields__}
        if isinstance(value, TensorJob):  # fields added later are left out when unset, so
            for name in ("method", "scale"):  # earlier plans keep their fingerprints
                if plain[name] is None:
                    del plain[name]
        if isinstance(value, MergePlan) and value.layer_origins is None:
            del plain["layer_origins"]
        return plain
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float):
        return repr(value)
    return value
