"""Fisher merging: a per-entry weighted average, weighted by each source's Fisher diagonal."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from evomerge.errors import MethodError
from evomerge.merge.registry import MergeMethod, ParamSpec, TensorContext, compute_dtype, register


def fisher(
    base: torch.Tensor | None,
    sources: Sequence[torch.Tensor],
    shared: Mapping[str, Any],
    per_source: Sequence[Mapping[str, Any]],
    ctx: TensorContext,
) -> torch.Tensor:
    """sum_i w_i F_i x_i / sum_i w_i F_i, with each F_i clamped below at ``fisher_floor``."""
    if sum(params["weight"] for params in per_source) <= 0:
        raise MethodError(
            f"method 'fisher': parameter 'weight' must be positive for at least one source "
            f"(tensor {ctx.name})"
        )
    dtype = compute_dtype(sources[0])
    device = sources[0].device
    numerator = torch.zeros(sources[0].shape, dtype=dtype, device=device)
    denominator = torch.zeros(sources[0].shape, dtype=dtype, device=device)
    for index, (source, diag, params) in enumerate(
        zip(sources, ctx.aux["fisher"], per_source, strict=True)
    ):
        if diag.shape != source.shape:
            raise MethodError(
                f"method 'fisher': 'fisher' tensor of source {index} has shape "
                f"{tuple(diag.shape)}, expected {tuple(source.shape)} (tensor {ctx.name})"
            )
        diag = diag.to(device=device, dtype=dtype)
        if not bool((diag >= 0).all()):
            raise MethodError(
                f"method 'fisher': 'fisher' tensor of source {index} has negative or NaN "
                f"entries (tensor {ctx.name})"
            )
        weighted = diag.clamp(min=shared["fisher_floor"]) * params["weight"]
        numerator += weighted * source.to(dtype)
        denominator += weighted
    return numerator / denominator


register(
    MergeMethod(
        name="fisher",
        fn=fisher,
        params=(
            ParamSpec("weight", "per_source", default=1.0, low=0.0, doc="weight of this source"),
            ParamSpec(
                "fisher_floor",
                "shared",
                default=1e-6,
                low=0.0,
                low_open=True,
                doc="lower bound applied to every Fisher entry",
            ),
        ),
        uses_base=False,
        min_sources=1,
        aux=("fisher",),
        mergekit_name=None,
        doc="Fisher-weighted average of the sources (per-entry Fisher diagonals).",
    )
)
