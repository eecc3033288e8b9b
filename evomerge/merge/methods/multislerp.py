"""Multi-SLERP (mergekit's ``multislerp``): a weighted barycentre of any number of sources on
the hypersphere, of their task vectors when a base is given."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from evomerge.errors import MethodError
from evomerge.merge.registry import MergeMethod, ParamSpec, TensorContext, compute_dtype, register


def multislerp(
    base: torch.Tensor | None,
    sources: Sequence[torch.Tensor],
    shared: Mapping[str, Any],
    per_source: Sequence[Mapping[str, Any]],
    ctx: TensorContext,
) -> torch.Tensor:
    """Project the (task) vectors onto the unit sphere, take the tangent space at their
    weighted mean direction, average there, map back with the exponential map and scale by
    the weighted mean norm; the base is added back.

    The tangent-space step is zero up to rounding: at the mean direction m = sum_i w_i u_i /
    |sum_i w_i u_i| the weighted tangent vectors sum to sum_i w_i u_i - |sum_i w_i u_i| m = 0.
    So the result is the renormalized weighted mean direction times the weighted mean norm (a
    normalized lerp, not a slerp, for two sources); it is computed as mergekit does so that
    mergekit configs merge the same.

    One source is returned as is. When the weighted mean of the unit vectors vanishes
    (|mean| < eps), two sources are averaged linearly and more are an error. Same operations
    in the same order as mergekit's ``multislerp``.
    """
    dtype = compute_dtype(sources[0])
    if len(sources) == 1:
        return sources[0].to(dtype)
    eps = shared["eps"]
    tensors = torch.stack([s.to(dtype) for s in sources], dim=0)
    base_tensor = None if base is None else base.to(dtype)
    if base_tensor is not None:
        tensors -= base_tensor

    tensors_flat = tensors.view(tensors.shape[0], -1)

    weights = torch.tensor([p["weight"] for p in per_source], dtype=dtype, device=tensors.device)
    if shared["normalize_weights"]:
        weights = weights / weights.sum()

    norms = torch.norm(tensors_flat, dim=-1, keepdim=True)
    unit_tensors = tensors_flat / (norms + eps)

    mean = (unit_tensors * weights.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if tensors.shape[0] == 2:  # linear interpolation instead
            res = (tensors[0] * weights[0] + tensors[1] * weights[1]).view(tensors.shape[1:])
            if base_tensor is not None:
                res = res + base_tensor
            return res
        raise MethodError(
            f"method 'multislerp': the weighted mean of the {len(sources)} "
            f"{'task vectors' if base is not None else 'tensors'}' directions is zero "
            f"(tensor {ctx.name or '?'}): they cancel out (e.g. a and -a with equal weights, or "
            "every source equal to the base); change the weights"
        )
    mean = mean / mean_norm

    dots = (unit_tensors * mean).sum(-1, keepdim=True)
    tangent_vectors = unit_tensors - dots * mean
    tangent_result = (tangent_vectors * weights.view(-1, 1)).sum(0)

    tangent_norm = torch.norm(tangent_result) + eps
    result = mean * torch.cos(tangent_norm) + tangent_result * (
        torch.sin(tangent_norm) / tangent_norm
    )

    avg_norm = (norms.squeeze(-1) * weights).sum()
    result = result * avg_norm
    result = result.view(tensors.shape[1:])
    if base_tensor is not None:
        result = result + base_tensor
    return result


def _check(shared: Mapping[str, Any], per_source: Sequence[Mapping[str, Any]], tensor: str) -> None:
    if len(per_source) > 1 and shared["normalize_weights"]:
        if sum(p["weight"] for p in per_source) == 0:
            where = f" (tensor {tensor})" if tensor else ""
            raise MethodError(
                "method 'multislerp': the weights sum to 0, so they cannot be normalized "
                f"(set normalize_weights: false or change them){where}"
            )


register(
    MergeMethod(
        name="multislerp",
        temporaries=(4.5, 3.5),  # peak copies: fixed + per source x n
        fn=multislerp,
        params=(
            ParamSpec("weight", "per_source", doc="weight of this source"),
            ParamSpec(
                "normalize_weights",
                "shared",
                kind=bool,
                default=True,
                doc="divide the weights by their sum",
            ),
            ParamSpec(
                "eps",
                "shared",
                default=1e-8,
                low=0.0,
                low_open=True,
                doc="added to norms before dividing; below it the mean direction is zero",
            ),
        ),
        uses_base=True,
        base_optional=True,
        min_sources=1,
        mergekit_name="multislerp",
        check=_check,
        doc=(
            "Weighted barycentre of the sources on the hypersphere (of their task vectors with "
            "a base).\nTangent-space average at the weighted mean direction, scaled by the "
            "weighted mean norm."
        ),
    )
)
