"""Linear merge (model soup): a weighted average of the sources."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from evomerge.merge.registry import MergeMethod, ParamSpec, TensorContext, compute_dtype, register


def linear(
    base: torch.Tensor | None,
    sources: Sequence[torch.Tensor],
    shared: Mapping[str, Any],
    per_source: Sequence[Mapping[str, Any]],
    ctx: TensorContext,
) -> torch.Tensor:
    """sum_i w_i x_i, divided by sum_i w_i when ``normalize`` (left as is if that sum is 0)."""
    dtype = compute_dtype(sources[0])
    result = sources[0].to(dtype) * per_source[0]["weight"]
    total = per_source[0]["weight"]
    for tensor, params in zip(sources[1:], per_source[1:]):
        result.add_(tensor.to(dtype), alpha=params["weight"])
        total += params["weight"]
    if shared["normalize"] and total != 0:
        result.div_(total)
    return result


register(
    MergeMethod(
        name="linear",
        temporaries=(1.5, 0.0),  # peak copies: fixed + per source x n
        fn=linear,
        params=(
            ParamSpec("weight", "per_source", doc="weight of this source"),
            ParamSpec(
                "normalize", "shared", kind=bool, default=True, doc="divide by the sum of weights"
            ),
        ),
        uses_base=False,
        min_sources=1,
        mergekit_name="linear",
        doc="Weighted average of the sources (model soup).",
    )
)
