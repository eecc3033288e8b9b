"""TSV-M: Task Singular Vectors merge (Gargiulo et al., "Task Singular Vectors: Reducing Task
Interference in Model Merging", arXiv 2412.00081).

For each 2-D weight matrix (m x n, r = min(m, n)) and T sources:

1. each task vector ``delta_i = w_i (source_i - base)`` is reduced to its top-k singular
   triplets ``(u_ij, s_ij, v_ij)``, k = round(rank_fraction * r) (halves rounded up), at least 1;
   ``rank_fraction`` defaults to 1/T;
2. the left vectors of all tasks are concatenated into U (m x T k), the right ones into V
   (n x T k), the singular values into s (T k);
3. U and V are replaced by their orthogonal polar factors (U = P S Q^T -> P Q^T), the nearest
   matrices with orthonormal columns, which removes the interference between tasks' subspaces;
4. the merged task matrix is ``U_perp diag(s) V_perp^T``; result = base + alpha * merged.

Rank budget: the T k columns must fit in r for U_perp and V_perp to have orthonormal columns,
so k is capped at r // T (a ``rank_fraction`` above 1/T gives the same result as 1/T, and the
default 1/T gives k = r // T, as the authors' code does). A matrix with fewer directions than
sources (r < T, e.g. a 2 x n matrix merged from 3 sources) has no room for one direction per
task and is merged by task arithmetic, like tensors that are not 2-D (norms, biases: base +
alpha * sum_i w_i delta_i, as in the paper). Embedding and LM-head matrices are 2-D and are
merged by SVD like the others; their reduced SVD costs O(vocab * hidden^2) per source, which
dominates the merge of a large-vocabulary model.

Only the T k kept triplets are held at once (one source's full SVD at a time). Computation is
in float32 (float64 for float64 inputs) on the inputs' device. When every task vector is zero
the base is returned exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from evomerge.merge.methods.svd_common import (
    ALPHA,
    SPECTRAL_EMBEDDINGS,
    WEIGHT,
    need_base,
    polar,
    round_half_up,
    task_arithmetic,
    weighted_delta,
    without_svd,
)
from evomerge.merge.registry import MergeMethod, ParamSpec, TensorContext, compute_dtype, register


def tsv_rank(rows: int, cols: int, count: int, rank_fraction: float | None) -> int:
    """Triplets kept per task: round(rank_fraction * r), at least 1, at most r // count;
    0 when r < count (the matrix is then merged by task arithmetic)."""
    rank = min(rows, cols)
    if rank < count:
        return 0
    fraction = 1.0 / count if rank_fraction is None else rank_fraction
    return min(max(1, round_half_up(fraction * rank)), rank // count)


def tsv_factors(
    deltas: Iterable[torch.Tensor], k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_perp, s, V_perp): the orthogonalized concatenation of each task's top-k triplets.

    ``deltas`` yields the (weighted) task matrices; each one's SVD is cut to its k triplets
    before the next is computed.
    """
    u_parts: list[torch.Tensor] = []
    s_parts: list[torch.Tensor] = []
    v_parts: list[torch.Tensor] = []
    for delta in deltas:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        u_parts.append(u[:, :k].clone())
        s_parts.append(s[:k].clone())
        v_parts.append(vh[:k].mT.clone())
        del u, s, vh, delta
    u_perp = polar(torch.cat(u_parts, dim=1))
    del u_parts
    v_perp = polar(torch.cat(v_parts, dim=1))
    return u_perp, torch.cat(s_parts), v_perp


def tsv(
    base: torch.Tensor | None,
    sources: Sequence[torch.Tensor],
    shared: Mapping[str, Any],
    per_source: Sequence[Mapping[str, Any]],
    ctx: TensorContext,
) -> torch.Tensor:
    """base + alpha * U_perp diag(s) V_perp^T (2-D); task arithmetic otherwise."""
    base = need_base(base, "tsv", ctx)
    if (direct := without_svd(base, sources, shared, per_source, ctx)) is not None:
        return direct
    dtype = compute_dtype(base)
    alpha = shared["alpha"]
    k = tsv_rank(*base.shape, len(sources), shared["rank_fraction"])
    if k == 0:  # fewer directions than tasks
        return task_arithmetic(base, sources, per_source, alpha)
    deltas = (
        weighted_delta(base, source, params["weight"], dtype)
        for source, params in zip(sources, per_source)
    )
    u, s, v = tsv_factors(deltas, k)
    merged = (u * s) @ v.mT
    return base.to(dtype) + alpha * merged


register(
    MergeMethod(
        name="tsv",
        temporaries=(6.5, 0.0),  # peak copies: fixed + per source x n
        fn=tsv,
        params=(
            WEIGHT,
            ALPHA,
            SPECTRAL_EMBEDDINGS,
            ParamSpec(
                "rank_fraction",
                "shared",
                default=None,
                nullable=True,
                low=0.0,
                low_open=True,
                high=1.0,
                doc="fraction of min(m, n) singular triplets kept per task "
                "(default 1/T; capped at 1/T so the T tasks' directions fit)",
            ),
        ),
        uses_base=True,
        min_sources=1,
        mergekit_name=None,
        doc="TSV-M: each task's top singular vectors, orthogonalized across tasks, summed.\n"
        "Task Singular Vectors (arXiv 2412.00081): per 2-D matrix, keep each task vector's top\n"
        "k = rank_fraction * min(m, n) triplets (default 1/T), concatenate the left and right\n"
        "singular vectors of all tasks, replace each concatenation by its orthogonal polar\n"
        "factor and rebuild with the kept singular values; result = base + alpha * merged.\n"
        "Tensors that are not 2-D, matrices with min(m, n) < T, and the embedding/LM-head\n"
        "matrices unless spectral_embeddings is set use task arithmetic.",
    )
)
