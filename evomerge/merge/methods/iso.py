"""Iso-C and Iso-CTS: isotropic merging (Marczak et al., "No Task Left Behind: Isotropic Model
Merging with Common and Task-Specific Subspaces", arXiv 2502.04959).

For each 2-D weight matrix (m x n, r = min(m, n)) with task vectors
``delta_i = w_i (source_i - base)`` and their sum ``delta = sum_i delta_i``:

- **Iso-C**: ``delta = U diag(s) V^T`` (reduced SVD, r triplets); every singular value is
  replaced by their mean ``s_bar = mean(s)`` over all r of them (zeros included, as in the
  paper's code); result = base + alpha * s_bar U V^T. The merged task matrix has r equal
  singular values s_bar (so when delta has rank < r its null directions, which the SVD picks
  arbitrarily, get weight s_bar too, as in the paper).
- **Iso-CTS**: the common subspace is the top k = round(common_fraction * r) (halves rounded
  up, at least 1) left/right singular vectors of delta. Each task's delta_i is projected onto
  the orthogonal complement of the common left subspace, ``delta_i - U_c U_c^T delta_i``, and
  its top s = (r - k) // T triplets are kept. The common and task-specific left vectors are
  concatenated (m x (k + T s)) and so are the right ones; each concatenation is replaced by its
  orthogonal polar factor, and the spectrum is flattened to the mean s_bar of the concatenated
  singular values; result = base + alpha * s_bar U_perp V_perp^T. With common_fraction = 1 it
  is Iso-C.

Tensors that are not 2-D (norms, biases) are merged by task arithmetic, base + alpha *
sum_i w_i delta_i, as in the paper. Embedding and LM-head matrices are 2-D and merged by SVD
like the others; their SVDs (O(vocab * hidden^2) each; Iso-CTS takes T + 1 of them per matrix)
dominate the merge of a large-vocabulary model. Computation is in float32 (float64 for float64
inputs) on the inputs' device, one matrix at a time. When every task vector is zero the base
is returned exactly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from evomerge.merge.methods.svd_common import (
    ALPHA,
    SPECTRAL_EMBEDDINGS,
    WEIGHT,
    need_base,
    polar,
    round_half_up,
    summed_delta,
    weighted_delta,
    without_svd,
)
from evomerge.merge.registry import MergeMethod, ParamSpec, TensorContext, compute_dtype, register


def iso_c(
    base: torch.Tensor | None,
    sources: Sequence[torch.Tensor],
    shared: Mapping[str, Any],
    per_source: Sequence[Mapping[str, Any]],
    ctx: TensorContext,
) -> torch.Tensor:
    """base + alpha * mean(s) U V^T with delta = sum_i w_i delta_i = U diag(s) V^T (2-D)."""
    base = need_base(base, "iso_c", ctx)
    if (direct := without_svd(base, sources, shared, per_source, ctx)) is not None:
        return direct
    dtype = compute_dtype(base)
    alpha = shared["alpha"]
    u, s, vh = torch.linalg.svd(summed_delta(base, sources, per_source, dtype), full_matrices=False)
    return base.to(dtype) + (alpha * s.mean()) * (u @ vh)


def iso_cts_ranks(rows: int, cols: int, count: int, common_fraction: float) -> tuple[int, int]:
    """(k, s): common directions round(common_fraction * r) (at least 1) and (r - k) // T
    task-specific directions per task."""
    rank = min(rows, cols)
    common = min(rank, max(1, round_half_up(common_fraction * rank)))
    return common, (rank - common) // count


def iso_cts(
    base: torch.Tensor | None,
    sources: Sequence[torch.Tensor],
    shared: Mapping[str, Any],
    per_source: Sequence[Mapping[str, Any]],
    ctx: TensorContext,
) -> torch.Tensor:
    """base + alpha * s_bar U_perp V_perp^T over the common and task-specific subspaces (2-D)."""
    base = need_base(base, "iso_cts", ctx)
    if (direct := without_svd(base, sources, shared, per_source, ctx)) is not None:
        return direct
    dtype = compute_dtype(base)
    alpha = shared["alpha"]
    common, specific = iso_cts_ranks(*base.shape, len(sources), shared["common_fraction"])
    u, s, vh = torch.linalg.svd(summed_delta(base, sources, per_source, dtype), full_matrices=False)
    u_parts = [u[:, :common].clone()]
    s_parts = [s[:common].clone()]
    v_parts = [vh[:common].mT.clone()]
    del u, s, vh
    u_common = u_parts[0]
    if specific > 0:
        for source, params in zip(sources, per_source):
            delta = weighted_delta(base, source, params["weight"], dtype)
            delta -= u_common @ (u_common.mT @ delta)  # onto the common subspace's complement
            u, s, vh = torch.linalg.svd(delta, full_matrices=False)
            u_parts.append(u[:, :specific].clone())
            s_parts.append(s[:specific].clone())
            v_parts.append(vh[:specific].mT.clone())
            del delta, u, s, vh
    mean = torch.cat(s_parts).mean()
    u_perp = polar(torch.cat(u_parts, dim=1))
    del u_parts
    v_perp = polar(torch.cat(v_parts, dim=1))
    return base.to(dtype) + (alpha * mean) * (u_perp @ v_perp.mT)


register(
    MergeMethod(
        name="iso_c",
        temporaries=(4.5, 0.0),  # peak copies: fixed + per source x n
        fn=iso_c,
        params=(WEIGHT, ALPHA, SPECTRAL_EMBEDDINGS),
        uses_base=True,
        min_sources=1,
        mergekit_name=None,
        doc="Iso-C: the summed task matrix with its singular values flattened to their mean.\n"
        "Isotropic merging (arXiv 2502.04959): per 2-D matrix, delta = sum_i w_i delta_i =\n"
        "U diag(s) V^T and result = base + alpha * mean(s) U V^T (mean over all min(m, n)\n"
        "singular values). Tensors that are not 2-D, and the embedding/LM-head matrices unless\n"
        "spectral_embeddings is set, use task arithmetic.",
    )
)

register(
    MergeMethod(
        name="iso_cts",
        temporaries=(7.5, 0.0),  # peak copies: fixed + per source x n
        fn=iso_cts,
        params=(
            WEIGHT,
            ALPHA,
            SPECTRAL_EMBEDDINGS,
            ParamSpec(
                "common_fraction",
                "shared",
                default=0.8,
                low=0.0,
                low_open=True,
                high=1.0,
                doc="fraction of min(m, n) directions taken from the summed task matrix "
                "(the rest is shared out among the tasks' own directions)",
            ),
        ),
        uses_base=True,
        min_sources=1,
        mergekit_name=None,
        doc="Iso-CTS: isotropic merge over a common and per-task subspaces.\n"
        "Isotropic merging with common and task-specific subspaces (arXiv 2502.04959): per 2-D\n"
        "matrix, the top k = common_fraction * min(m, n) singular vectors of the summed task\n"
        "matrix plus each task's top (r - k) // T directions outside that subspace, the\n"
        "concatenations orthogonalized (polar factor), the spectrum flattened to its mean;\n"
        "result = base + alpha * merged. common_fraction = 1 is Iso-C. Tensors that are not\n"
        "2-D, and the embedding/LM-head matrices unless spectral_embeddings is set, use task\n"
        "arithmetic.",
    )
)
