"""Model Stock: move from the base toward the sources' mean by an angle-derived ratio."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from evomerge.errors import MethodError
from evomerge.merge.registry import MergeMethod, ParamSpec, TensorContext, compute_dtype, register

NORM_EPS = 1e-6
"""Lower bound on the product of offset norms when computing a cosine."""
SINGULAR_EPS = 1e-6
"""Below this |1 + (N-1) cos| the ratio t is undefined and the base is kept (t = 0)."""


def model_stock(
    base: torch.Tensor | None,
    sources: Sequence[torch.Tensor],
    shared: Mapping[str, Any],
    per_source: Sequence[Mapping[str, Any]],
    ctx: TensorContext,
) -> torch.Tensor:
    """t * mean(w_i) + (1 - t) * w_0 with t = N cos / (1 + (N - 1) cos).

    cos is the mean pairwise cosine between the offsets w_i - w_0: over the whole flattened
    tensor, or per vector along the last dimension when ``filter_wise`` (0-D/1-D: one vector).
    """
    if base is None:
        raise MethodError(f"method 'model_stock' needs a base model (tensor {ctx.name})")
    dtype = compute_dtype(base)
    if shared["filter_wise"]:
        rows = base.shape if base.dim() >= 2 else (1, -1)
    else:
        rows = (-1,)
    w0 = base.to(dtype).reshape(rows)
    ws = [source.to(dtype).reshape(rows) for source in sources]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1 :]:
            norms = torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=NORM_EPS)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    count = len(ws)
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < SINGULAR_EPS
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    t = torch.where(singular, torch.zeros_like(cos), count * cos / safe)
    mean = sum(ws[1:], ws[0]) / count
    return (t * mean + (1 - t) * w0).reshape(base.shape)


register(
    MergeMethod(
        name="model_stock",
        temporaries=(4.5, 1.0),  # peak copies: fixed + per source x n
        fn=model_stock,
        params=(
            ParamSpec(
                "filter_wise",
                "shared",
                kind=bool,
                default=False,
                doc="one ratio per row (last-dimension vector) instead of per tensor",
            ),
        ),
        uses_base=True,
        min_sources=2,
        mergekit_name="model_stock",
        doc="Model Stock: interpolate base and source mean by the offsets' angle.",
    )
)
