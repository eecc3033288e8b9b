"""Passthrough: copy one source's tensor, optionally scaled."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from evomerge.merge.registry import MergeMethod, ParamSpec, TensorContext, compute_dtype, register


def passthrough(
    base: torch.Tensor | None,
    sources: Sequence[torch.Tensor],
    shared: Mapping[str, Any],
    per_source: Sequence[Mapping[str, Any]],
    ctx: TensorContext,
) -> torch.Tensor:
    """The source (a copy, in the compute dtype), times ``scale`` when one is given."""
    source = sources[0]
    result = source.to(compute_dtype(source), copy=True)
    scale = per_source[0]["scale"]
    if scale is not None:
        result.mul_(scale)
    return result


register(
    MergeMethod(
        name="passthrough",
        temporaries=(1.5, 0.0),  # peak copies: fixed + per source x n
        fn=passthrough,
        params=(
            ParamSpec(
                "scale",
                "per_source",
                default=None,
                nullable=True,
                doc="multiply the tensor by this (none: unchanged)",
            ),
        ),
        uses_base=False,
        min_sources=1,
        max_sources=1,
        mergekit_name="passthrough",
        doc="Copy the single source's tensor, optionally scaled.",
    )
)
