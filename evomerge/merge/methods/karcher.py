"""Karcher mean (mergekit's ``karcher``): the Riemannian (Fréchet) mean of the sources'
directions on the unit hypersphere, with equal weights, scaled by their mean norm."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from evomerge.merge.registry import MergeMethod, ParamSpec, TensorContext, compute_dtype, register


def karcher_mean(
    tensors: Sequence[torch.Tensor], alphas: Sequence[float], max_iter: int, tol: float
) -> torch.Tensor:
    """Weighted Karcher mean on the unit sphere times sum_i alpha_i |x_i|.

    Tensors with norm <= tol take no part in the direction (they still count, with norm ~0,
    in the scale); if none is left the result is zero. The iteration starts at the
    normalized weighted mean of the unit vectors (the first one if that vanishes) and stops
    after ``max_iter`` steps or when the tangent step is under ``tol``. Same operations in the
    same order as mergekit's ``karcher_merge_tensors``.
    """
    if len(tensors) == 1:
        return tensors[0]
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    norms = []
    units = []
    for tensor in tensors:
        norm = torch.linalg.vector_norm(tensor.to(dtype))
        norms.append(norm)
        if norm.item() == 0.0:
            units.append(torch.zeros_like(tensor))
        else:
            units.append((tensor / norm).to(tensor.dtype))

    valid = [i for i, norm in enumerate(norms) if norm.item() > tol]
    if not valid:
        return sum(tensor * 0 for tensor in tensors)  # type: ignore[return-value]

    valid_alphas = [alphas[i] for i in valid]
    alpha_sum = sum(valid_alphas)
    weights = [alpha / alpha_sum for alpha in valid_alphas]
    valid_units = [units[i] for i in valid]

    mean = torch.zeros_like(valid_units[0])
    for alpha, unit in zip(weights, valid_units):
        mean += alpha * unit
    mean_norm = torch.linalg.vector_norm(mean.to(dtype))
    mean = valid_units[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)

    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for alpha, unit in zip(weights, valid_units):
            dot = torch.clamp(torch.dot(mean.flatten(), unit.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += alpha * (theta / torch.sin(theta)) * (unit - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent.to(dtype))
        if tangent_norm.item() < tol:
            break
        mean = (
            torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)
        ).to(mean.dtype)
        unit_norm = torch.linalg.vector_norm(mean.to(dtype))
        if unit_norm.item() > tol:
            mean = (mean / unit_norm).to(mean.dtype)

    scale = sum(alpha * norm for alpha, norm in zip(alphas, norms))
    return scale * mean  # type: ignore[no-any-return]


def karcher(
    base: torch.Tensor | None,
    sources: Sequence[torch.Tensor],
    shared: Mapping[str, Any],
    per_source: Sequence[Mapping[str, Any]],
    ctx: TensorContext,
) -> torch.Tensor:
    """The Karcher mean of the sources with equal weights (a base is not read)."""
    dtype = compute_dtype(sources[0])
    tensors = [s.to(dtype) for s in sources]
    alphas = [1.0 / len(tensors)] * len(tensors)
    result = karcher_mean(tensors, alphas, max_iter=shared["max_iter"], tol=shared["tol"])
    return result.to(dtype)


register(
    MergeMethod(
        name="karcher",
        temporaries=(5.5, 1.0),  # peak copies: fixed + per source x n
        fn=karcher,
        params=(
            ParamSpec(
                "max_iter",
                "shared",
                kind=int,
                default=10,
                low=0,
                doc="most iterations of the Riemannian gradient step",
            ),
            ParamSpec(
                "tol",
                "shared",
                default=1e-5,
                low=0.0,
                doc="stop when the tangent step is shorter; norms at or below it are zero",
            ),
        ),
        uses_base=False,
        min_sources=1,
        mergekit_name="karcher",
        doc=(
            "Karcher (Riemannian) mean of the sources' directions, times their mean norm.\n"
            "Equal weights; in a mergekit config the base model counts as one more source."
        ),
    )
)
