"""NuSLERP (mergekit's ``nuslerp``): spherical interpolation between two sources, or between
their task vectors when a base is given, with mergekit's row-wise and flatten options."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from evomerge.merge.registry import MergeMethod, ParamSpec, TensorContext, compute_dtype, register

COLINEAR_EPS = 1e-8
"""Pairs with 1 - cos^2 at or below this squared are interpolated linearly (mergekit's eps)."""

NORM_CLAMP = 1e-7
"""Norms are clamped to at least this before normalizing (mergekit's value)."""

ZERO_TOTAL = 1e-6
"""Below this |w0 + w1| the interpolation factor is 0.5."""


def interpolation_factor(w0: float, w1: float) -> float:
    """t = w1 / (w0 + w1), or 0.5 when the weights sum to (about) zero."""
    total = w0 + w1
    return 0.5 if abs(total) < ZERO_TOTAL else w1 / total


def nuslerp_pair(
    t: float,
    v0: torch.Tensor,
    v1: torch.Tensor,
    dim: int = -1,
    flatten: bool = False,
) -> torch.Tensor:
    """Slerp of v0 (t=0) to v1 (t=1): over the whole flattened tensors (``flatten``), else
    vector by vector along ``dim`` (each row of a matrix for dim=-1, each column for dim=0).

    Pairs whose cosine squared is within ``COLINEAR_EPS**2`` of 1 are interpolated linearly.
    Same operations in the same order as mergekit's ``nuslerp``.
    """
    out_shape = v0.shape
    if flatten:
        v0 = v0.reshape(-1)
        v1 = v1.reshape(-1)
    elif dim != -1:
        v0 = v0.transpose(dim, -1)
        v1 = v1.transpose(dim, -1)

    v0_u = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=NORM_CLAMP)
    v1_u = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=NORM_CLAMP)
    cos_theta = torch.sum(v0_u * v1_u, dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos_theta.square()) <= COLINEAR_EPS**2
    # acos(0) on the colinear entries keeps the discarded spherical branch finite.
    theta = torch.acos(torch.where(colinear, 0, cos_theta))
    sin_theta = torch.sin(theta)

    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    result = torch.where(colinear, (1 - t) * v0 + t * v1, result)

    if dim != -1 and not flatten:
        result = result.transpose(dim, -1)
    return result.reshape(out_shape)


def nuslerp(
    base: torch.Tensor | None,
    sources: Sequence[torch.Tensor],
    shared: Mapping[str, Any],
    per_source: Sequence[Mapping[str, Any]],
    ctx: TensorContext,
) -> torch.Tensor:
    """With a base: base + slerp(source_0 - base, source_1 - base); without: slerp of the
    sources themselves; t = w1 / (w0 + w1)."""
    dtype = compute_dtype(sources[0])
    t = interpolation_factor(per_source[0]["weight"], per_source[1]["weight"])
    dim = 0 if shared["nuslerp_row_wise"] else -1
    flatten = shared["nuslerp_flatten"]
    v0, v1 = sources[0].to(dtype), sources[1].to(dtype)
    if v0.dim() == 0:  # a scalar is a vector of one entry
        v0, v1 = v0.reshape(1), v1.reshape(1)
        base = None if base is None else base.reshape(1)
        scalar = True
    else:
        scalar = False
    if base is not None:
        anchor = base.to(dtype)
        result = anchor + nuslerp_pair(t, v0 - anchor, v1 - anchor, dim=dim, flatten=flatten)
    else:
        result = nuslerp_pair(t, v0, v1, dim=dim, flatten=flatten)
    return result.reshape(()) if scalar else result


register(
    MergeMethod(
        name="nuslerp",
        temporaries=(8.5, 0.0),  # peak copies: fixed + per source x n
        fn=nuslerp,
        params=(
            ParamSpec(
                "weight",
                "per_source",
                doc="relative weight: t = weight_1 / (weight_0 + weight_1), 0.5 if that sum is 0",
            ),
            ParamSpec(
                "nuslerp_row_wise",
                "shared",
                kind=bool,
                default=False,
                doc="slerp column vectors (dim 0) instead of row vectors (without flatten)",
            ),
            ParamSpec(
                "nuslerp_flatten",
                "shared",
                kind=bool,
                default=True,
                doc="slerp each tensor as one flat vector",
            ),
        ),
        uses_base=True,
        base_optional=True,
        min_sources=2,
        max_sources=2,
        mergekit_name="nuslerp",
        doc=(
            "Spherical interpolation of two sources (of their task vectors with a base).\n"
            "t = w1 / (w0 + w1); whole tensors, or row by row / column by column; linear for "
            "(anti)parallel pairs."
        ),
    )
)
