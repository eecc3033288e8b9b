"""Fisher merging: a per-entry weighted average, weighted by each source's Fisher diagonal.

The floor is relative: each source's Fisher entries are clamped below at ``fisher_floor`` times
that source's mean Fisher over the tensor. Empirical Fisher values of language models are tiny
and scale with the data (1e-8 to 1e-10 per entry is common), so an absolute floor would swamp
them and turn the merge into a plain average; a relative one keeps the method invariant to
scaling every source's Fisher by the same factor. It only stops entries the data never touched
(Fisher 0) from dividing by zero and from having no say at all.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from evomerge.errors import MethodError
from evomerge.merge.registry import MergeMethod, ParamSpec, TensorContext, compute_dtype, register

DEFAULT_FISHER_FLOOR = 1e-3
"""An entry counts at least 1/1000 of its source's mean Fisher over the tensor: far below any
entry the data informs (those sit within a few orders of magnitude of the mean), so informed
entries are weighted as measured, while entries the data never reached (exactly 0) keep a
weight instead of none, and an entry where every source is uninformed is the weighted
average."""


def fisher_weights(
    method: str, sources: Sequence[torch.Tensor], shared: Mapping[str, Any], ctx: TensorContext
) -> list[torch.Tensor]:
    """Each source's Fisher diagonal for this tensor, checked, floored at ``fisher_floor`` x its
    mean, and put on one scale (divided by the largest of the sources' means, so the sums neither
    overflow nor depend on the data's overall scale). A source whose Fisher is zero over the whole
    tensor says nothing about it, and the sources' Fishers cannot be compared there: every
    source then gets a constant 1 (the merge becomes the plain weighted one)."""
    dtype = compute_dtype(sources[0])
    device = sources[0].device
    diags = []
    for index, (source, diag) in enumerate(zip(sources, ctx.aux["fisher"], strict=True)):
        if diag.shape != source.shape:
            raise MethodError(
                f"method '{method}': 'fisher' tensor of source {index} has shape "
                f"{tuple(diag.shape)}, expected {tuple(source.shape)} (tensor {ctx.name})"
            )
        diag = diag.to(device=device, dtype=dtype)
        if not bool((diag >= 0).all()):
            raise MethodError(
                f"method '{method}': 'fisher' tensor of source {index} has negative or NaN "
                f"entries (tensor {ctx.name})"
            )
        if not bool(torch.isfinite(diag).all()):
            raise MethodError(
                f"method '{method}': 'fisher' tensor of source {index} has infinite entries "
                f"(tensor {ctx.name})"
            )
        diags.append(diag)
    means = [diag.mean(dtype=torch.float64) if diag.numel() else None for diag in diags]
    if any(mean is None or float(mean) == 0.0 for mean in means):
        return [torch.ones_like(diag) for diag in diags]
    top = max(float(mean) for mean in means)  # type: ignore[arg-type]
    weights = []
    for diag, mean in zip(diags, means, strict=True):
        assert mean is not None
        # Divided by its mean, every source's Fisher is O(1): no underflow in the sums. A mean
        # below the compute dtype's smallest normal number would lose its digits there: that
        # division goes through float64.
        if float(mean) >= torch.finfo(dtype).tiny:
            ratio = diag / mean.to(dtype)
        else:
            ratio = (diag.to(torch.float64) / mean).to(dtype)
        floored = ratio.clamp(min=shared["fisher_floor"])
        # On the scale of the largest mean: factors at most 1, so a source whose Fisher is
        # 1e40 times another's cannot overflow to inf (inf / inf = NaN); the largest keeps a
        # weight of at least the floor, so the denominator is never 0.
        weights.append(floored * (float(mean) / top))
    return weights


def fisher(
    base: torch.Tensor | None,
    sources: Sequence[torch.Tensor],
    shared: Mapping[str, Any],
    per_source: Sequence[Mapping[str, Any]],
    ctx: TensorContext,
) -> torch.Tensor:
    """sum_i w_i F_i x_i / sum_i w_i F_i, each F_i clamped below at ``fisher_floor`` x mean(F_i)
    (see :func:`fisher_weights`; with a source's Fisher all zero: sum_i w_i x_i / sum_i w_i)."""
    if sum(params["weight"] for params in per_source) <= 0:
        raise MethodError(
            f"method 'fisher': parameter 'weight' must be positive for at least one source "
            f"(tensor {ctx.name})"
        )
    dtype = compute_dtype(sources[0])
    numerator = torch.zeros(sources[0].shape, dtype=dtype, device=sources[0].device)
    denominator = torch.zeros_like(numerator)
    for source, diag, params in zip(
        sources, fisher_weights("fisher", sources, shared, ctx), per_source, strict=True
    ):
        weighted = diag * params["weight"]
        numerator += weighted * source.to(dtype)
        denominator += weighted
    return numerator / denominator


def fisher_task_arithmetic(
    base: torch.Tensor | None,
    sources: Sequence[torch.Tensor],
    shared: Mapping[str, Any],
    per_source: Sequence[Mapping[str, Any]],
    ctx: TensorContext,
) -> torch.Tensor:
    """base + sum_i w_i F_i (x_i - base) / sum_j F_j: each source's task vector, weighted per
    entry by its share of the Fisher, times its weight. Weights of 1 give the Fisher merge
    (``fisher``); unlike it, a weight here is a strength, not a ratio: 0 drops a source, every
    weight halved moves halfway back to the base, and the merge is linear in each weight."""
    assert base is not None
    dtype = compute_dtype(base)
    base = base.to(dtype)
    numerator = torch.zeros(base.shape, dtype=dtype, device=base.device)
    denominator = torch.zeros_like(numerator)
    diags = fisher_weights("fisher_task_arithmetic", sources, shared, ctx)
    for source, diag, params in zip(sources, diags, per_source, strict=True):
        numerator += diag * (source.to(dtype) - base) * params["weight"]
        denominator += diag
    return base + numerator / denominator


FLOOR = ParamSpec(
    "fisher_floor",
    "shared",
    default=DEFAULT_FISHER_FLOOR,
    low=0.0,
    high=1.0,
    low_open=True,
    doc="relative floor: each Fisher entry counts at least this fraction of its "
    "source's mean Fisher over the tensor",
)


register(
    MergeMethod(
        name="fisher",
        temporaries=(4.5, 1.0),  # peak copies: fixed + per source x n
        fn=fisher,
        params=(
            ParamSpec("weight", "per_source", default=1.0, low=0.0, doc="weight of this source"),
            FLOOR,
        ),
        uses_base=False,
        min_sources=1,
        aux=("fisher",),
        mergekit_name=None,
        doc="Fisher-weighted average of the sources (per-entry Fisher diagonals, e.g. from "
        "`evomerge fisher`).",
    )
)
register(
    MergeMethod(
        name="fisher_task_arithmetic",
        temporaries=(4.5, 1.0),  # peak copies: fixed + per source x n
        fn=fisher_task_arithmetic,
        params=(
            ParamSpec(
                "weight", "per_source", default=1.0, doc="strength of this source's task vector"
            ),
            FLOOR,
        ),
        uses_base=True,
        min_sources=1,
        aux=("fisher",),
        mergekit_name=None,
        doc="Task arithmetic weighted per entry by each source's share of the Fisher: weights "
        "of 1 give the Fisher merge; the fisher_per_layer space searches them.",
    )
)
