"""RAM (Reinforced Agent Merging) and RAM+ (tensor-local), as mergekit 0.1.5 computes them.

An entry of a task vector ``delta_i = source_i - base`` counts as set when ``|delta_i| >
epsilon``; the others are zeroed. Per entry, ``c`` sources are set:

- ``ram``: an entry set in one source only (unique) takes that source's value whole; an entry
  set in several (overlap) takes their mean ``sum_i delta_i / c``; an entry set in none keeps
  the base.
- ``ramplus_tl``: the same, but each source's unique entries are scaled by
  ``lambda_i = 1 + r * clamp(rho_i, 0, alpha)``, where ``rho_i`` is the number of the source's
  set entries that overlap divided by the number that are unique (at least ``epsilon``), both
  counted over the tensor ("tensor-local": one ``lambda`` per source and tensor).

mergekit accepts a ``weight`` for these methods and ignores it: evomerge takes none (a mergekit
config that gives one is refused rather than silently ignored).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from evomerge.merge.methods.sce import task_vectors
from evomerge.merge.registry import MergeMethod, ParamSpec, TensorContext, register


def _ram(
    method: str,
    base: torch.Tensor | None,
    sources: Sequence[torch.Tensor],
    shared: Mapping[str, Any],
    ctx: TensorContext,
    plus: bool,
) -> torch.Tensor:
    base, deltas = task_vectors(method, base, sources, ctx)
    epsilon = shared["epsilon"]
    flat = deltas.view(len(sources), -1)
    nonzero = flat.abs() > epsilon
    counts = nonzero.sum(dim=0, keepdim=True)
    overlap = counts > 1
    unique = counts == 1
    flat.mul_(nonzero)
    unique_part = flat * unique
    if plus:
        # Counted in the compute dtype (mergekit's is float32 whatever the inputs: the same
        # bits for float32, more exact for float64).
        shared_counts = (nonzero & overlap).sum(dim=1).to(flat.dtype)
        unique_counts = (nonzero & unique).sum(dim=1).to(flat.dtype)
        rho = shared_counts / unique_counts.clamp(min=epsilon)
        lambdas = 1 + shared["r"] * rho.clamp(min=0, max=shared["alpha"])
        unique_part = unique_part * lambdas.unsqueeze(-1)
    del nonzero
    terms = unique_part + flat * overlap / counts.clamp(min=1)
    del unique_part
    merged = terms[0].clone()
    for term in terms[1:]:
        merged.add_(term)
    return base + merged.reshape(base.shape)


def ram(
    base: torch.Tensor | None,
    sources: Sequence[torch.Tensor],
    shared: Mapping[str, Any],
    per_source: Sequence[Mapping[str, Any]],
    ctx: TensorContext,
) -> torch.Tensor:
    """base + unique entries whole + the mean of overlapping entries (module docstring)."""
    return _ram("ram", base, sources, shared, ctx, plus=False)


def ramplus_tl(
    base: torch.Tensor | None,
    sources: Sequence[torch.Tensor],
    shared: Mapping[str, Any],
    per_source: Sequence[Mapping[str, Any]],
    ctx: TensorContext,
) -> torch.Tensor:
    """RAM with each source's unique entries scaled by its lambda (module docstring)."""
    return _ram("ramplus_tl", base, sources, shared, ctx, plus=True)


def _epsilon(open_low: bool) -> ParamSpec:
    return ParamSpec(
        "epsilon",
        "shared",
        default=1e-5,
        low=0.0,
        low_open=open_low,
        doc="a task-vector entry counts as set when its magnitude exceeds this",
    )


register(
    MergeMethod(
        name="ram",
        temporaries=(6.0, 4.0),  # peak copies: fixed + per source x n
        fn=ram,
        params=(_epsilon(open_low=False),),
        uses_base=True,
        min_sources=1,
        mergekit_name="ram",
        doc="RAM: keep entries set in one task vector, average those set in several.",
    )
)

register(
    MergeMethod(
        name="ramplus_tl",
        temporaries=(6.0, 4.0),  # peak copies: fixed + per source x n
        fn=ramplus_tl,
        params=(
            ParamSpec(
                "r",
                "shared",
                default=0.1,
                low=0.0,
                doc="how much a source's overlap ratio scales up its unique entries",
            ),
            ParamSpec(
                "alpha",
                "shared",
                default=0.2,
                low=0.0,
                doc="the overlap ratio (overlapping / unique entries) is capped at this",
            ),
            # It divides by the unique count clamped to epsilon: 0 would give 0 / 0.
            _epsilon(open_low=True),
        ),
        uses_base=True,
        min_sources=1,
        mergekit_name="ramplus_tl",
        doc="RAM+ (tensor-local): RAM with unique entries scaled up by the overlap ratio.",
    )
)
