"""NearSwap (mergekit's ``nearswap``): take the source's value where it is close to the base's,
and move only part of the way towards it where they are far apart."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from evomerge.merge.registry import MergeMethod, ParamSpec, TensorContext, compute_dtype, register

MIN_DIFF = 1e-6
"""|a - b| is clamped to at least this before dividing (mergekit's value)."""


def nearswap(
    base: torch.Tensor | None,
    sources: Sequence[torch.Tensor],
    shared: Mapping[str, Any],
    per_source: Sequence[Mapping[str, Any]],
    ctx: TensorContext,
) -> torch.Tensor:
    """w * b + (1 - w) * a with w = clamp(t / |a - b|, 0, 1), entry by entry (a: base, b: source).

    Entries with |a - b| <= t become b; the others move t / |a - b| of the way to b.
    """
    assert base is not None  # the registry checks this
    dtype = compute_dtype(base)
    a = base.to(dtype)
    b = sources[0].to(dtype)
    absdiff = torch.abs(a - b)
    weight = (shared["t"] / absdiff.clamp(min=MIN_DIFF)).clamp(min=0, max=1)
    return weight * b + (1 - weight) * a


register(
    MergeMethod(
        name="nearswap",
        temporaries=(5.5, 0.0),  # peak copies: fixed + per source x n
        fn=nearswap,
        params=(
            ParamSpec(
                "t",
                "shared",
                low=0.0,
                doc="entries of the base within t of the source's become the source's",
            ),
        ),
        uses_base=True,
        min_sources=1,
        max_sources=1,
        mergekit_name="nearswap",
        doc=(
            "Entry by entry: the source where within t of the base, else t/|a-b| of the way.\n"
            "w = clamp(t / |base - source|, 0, 1); result = w * source + (1 - w) * base."
        ),
    )
)
