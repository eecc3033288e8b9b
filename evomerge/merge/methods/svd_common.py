"""Shared pieces of the SVD-based merges (TSV-M in :mod:`.tsv`, Iso-C and Iso-CTS in :mod:`.iso`).

No method is registered here. All of them work on one matrix at a time, in the compute dtype
(float32, float64 for float64 inputs) on the inputs' device, with ``torch.linalg.svd(...,
full_matrices=False)``. Tensors that are not 2-D (norms, biases, scalars, convolution kernels)
are merged by task arithmetic, ``base + alpha * sum_i w_i (source_i - base)``, as the papers do,
and so are the embedding and LM-head matrices unless ``spectral_embeddings`` is set: their rows
are tokens, not a low-rank map, and reshaping their spectrum spreads each token's change over the
whole vocabulary (on the toy zoo Iso-C at alpha 1 scores 0.32 with them and 0.78 without; the
papers merge vision transformers, which have no vocabulary matrix).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from evomerge.errors import MethodError
from evomerge.merge.registry import ParamSpec, TensorContext, compute_dtype
from evomerge.merge.tensors import tensor_kind

ALPHA = ParamSpec(
    "alpha", "shared", default=1.0, doc="scale of the merged task vector added to the base"
)
WEIGHT = ParamSpec("weight", "per_source", default=1.0, doc="weight of this source's task vector")
SPECTRAL_EMBEDDINGS = ParamSpec(
    "spectral_embeddings",
    "shared",
    kind=bool,
    default=False,
    doc="merge the embedding and LM-head matrices through their SVD too (default: task "
    "arithmetic, as for vectors)",
)
VOCABULARY_KINDS = ("embedding", "head")


def spectral(base: torch.Tensor, shared: Mapping[str, Any], ctx: TensorContext) -> bool:
    """Whether this tensor is merged through its SVD: a 2-D matrix that is not a vocabulary
    matrix (embedding, LM head), unless ``spectral_embeddings`` asks for those too."""
    if base.dim() != 2:
        return False
    return bool(shared["spectral_embeddings"]) or tensor_kind(ctx.name) not in VOCABULARY_KINDS


def round_half_up(value: float) -> int:
    """Nearest integer, halves rounded up (Python's round() rounds halves to even)."""
    return math.floor(value + 0.5)


def need_base(base: torch.Tensor | None, method: str, ctx: TensorContext) -> torch.Tensor:
    if base is None:
        raise MethodError(f"method '{method}' needs a base model (tensor {ctx.name})")
    return base


def weighted_delta(
    base: torch.Tensor, source: torch.Tensor, weight: float, dtype: torch.dtype
) -> torch.Tensor:
    """w (source - base) in ``dtype``."""
    delta = source.to(dtype) - base.to(dtype)
    if weight != 1.0:
        delta.mul_(weight)
    return delta


def all_zero(
    base: torch.Tensor, sources: Sequence[torch.Tensor], per_source: Sequence[Mapping[str, Any]]
) -> bool:
    """Whether every weighted task vector is exactly zero (the merge is then the base)."""
    return all(
        params["weight"] == 0 or torch.equal(source, base)
        for source, params in zip(sources, per_source)
    )


def summed_delta(
    base: torch.Tensor,
    sources: Sequence[torch.Tensor],
    per_source: Sequence[Mapping[str, Any]],
    dtype: torch.dtype,
) -> torch.Tensor:
    """sum_i w_i (source_i - base) in ``dtype``."""
    total = torch.zeros(base.shape, dtype=dtype, device=base.device)
    for source, params in zip(sources, per_source):
        total.add_(weighted_delta(base, source, params["weight"], dtype))
    return total


def task_arithmetic(
    base: torch.Tensor,
    sources: Sequence[torch.Tensor],
    per_source: Sequence[Mapping[str, Any]],
    alpha: float,
) -> torch.Tensor:
    """base + alpha * sum_i w_i (source_i - base): the fallback for tensors merged without SVD."""
    dtype = compute_dtype(base)
    return base.to(dtype) + alpha * summed_delta(base, sources, per_source, dtype)


def without_svd(
    base: torch.Tensor,
    sources: Sequence[torch.Tensor],
    shared: Mapping[str, Any],
    per_source: Sequence[Mapping[str, Any]],
    ctx: TensorContext,
) -> torch.Tensor | None:
    """The merge of a tensor that takes no SVD (the base when every task vector is zero; task
    arithmetic when :func:`spectral` says no), or None for a matrix to merge through its SVD."""
    if all_zero(base, sources, per_source):
        return base.to(compute_dtype(base)).clone()
    if not spectral(base, shared, ctx):
        return task_arithmetic(base, sources, per_source, shared["alpha"])
    return None


def polar(matrix: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor P Q^T of ``matrix`` = P S Q^T (reduced SVD).

    For a tall or square matrix (rows >= columns) it has orthonormal columns and is the
    nearest such matrix in Frobenius norm; it is unique when ``matrix`` has full column rank
    (otherwise the SVD's choice of basis for the null directions decides it).
    """
    p, _, qh = torch.linalg.svd(matrix, full_matrices=False)
    return p @ qh
