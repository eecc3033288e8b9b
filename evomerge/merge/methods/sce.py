"""SCE (Select, Calculate, Erase): a merge of task vectors, as mergekit 0.1.5 computes it.

With task vectors ``delta_i = source_i - base`` (stacked along a new leading axis):

1. Select: when ``select_topk < 1``, keep only the entries whose variance across the task
   vectors (population variance, ``unbiased=False``) is among the largest
   ``int(nonzero * select_topk)`` (``nonzero``: entries of nonzero variance); every task vector
   is zeroed elsewhere. With no entry of nonzero variance (one source, or identical sources)
   nothing is kept, and the merge is the base.
2. Calculate: each source's weight is the mean of its (selected) squared task vector, divided
   by the sum over sources; uniform weights when that sum is below 1e-6.
3. Erase: TIES's sign election by mass (the sign of ``sum_i delta_i``, 0 counted as +); an entry
   of a task vector whose sign differs from the elected one (a zero entry included) is erased.

The result is ``base + sum_i w_i m_i delta_i / max(sum_i w_i m_i, 1e-6)`` (``m_i``: the erase
mask). Ties in variance at the selection cut-off are broken by flat index (lower index kept),
so the result is the same on every device; mergekit's ``torch.topk`` leaves that order open.
mergekit accepts a ``weight`` for SCE and ignores it: evomerge takes none (a mergekit config
that gives one is refused rather than silently ignored).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from evomerge.errors import MethodError
from evomerge.merge.methods.sparsify import rank_range_mask
from evomerge.merge.registry import MergeMethod, ParamSpec, TensorContext, compute_dtype, register

WEIGHT_SUM_EPS = 1e-6
"""Below this sum of the sources' mean squared task vectors, the weights are uniform."""
DIVISOR_FLOOR = 1e-6
"""The sum of the weights that took part in an entry is clamped to at least this."""


def task_vectors(
    method: str, base: torch.Tensor | None, sources: Sequence[torch.Tensor], ctx: TensorContext
) -> tuple[torch.Tensor, torch.Tensor]:
    """(base in the compute dtype, ``source_i - base`` stacked along a new leading axis)."""
    if base is None:
        raise MethodError(f"method '{method}' needs a base model (tensor {ctx.name})")
    for index, source in enumerate(sources):
        if source.shape != base.shape:
            raise MethodError(
                f"method '{method}': source {index} has shape {list(source.shape)}, "
                f"the base {list(base.shape)} (tensor {ctx.name})"
            )
    dtype = compute_dtype(base)
    base = base.to(dtype)
    return base, torch.stack([source.to(dtype) - base for source in sources], dim=0)


def select_mask(deltas: torch.Tensor, select_topk: float) -> torch.Tensor:
    """1 where the variance across task vectors is among the top ``int(nonzero * select_topk)``
    (ties by flat index), else 0; in the task vectors' dtype, one task vector's shape."""
    if select_topk <= 0:
        return torch.zeros_like(deltas[0])
    if select_topk >= 1:
        return torch.ones_like(deltas[0])
    var = torch.var(deltas, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var).item() * select_topk)
    mask = torch.zeros_like(var)
    if k == 0:
        return mask
    # The k largest by a linear-time selection rather than a full sort. Reversed, so that of
    # the entries tied at the cut-off the ones of lower index are kept.
    flat = var.abs().reshape(-1).flip(0)
    keep = rank_range_mask(flat, flat.numel() - k, flat.numel()).flip(0)
    mask.view(-1)[keep] = 1
    return mask


def source_weights(deltas: torch.Tensor) -> torch.Tensor:
    """Each task vector's mean square over the sum of them (uniform if that sum is tiny)."""
    weights = deltas.square().reshape(deltas.shape[0], -1).mean(dim=1)
    total = torch.sum(weights).item()
    if abs(total) < WEIGHT_SUM_EPS:
        return torch.ones_like(weights) / weights.shape[0]
    return weights / total


def elected_mask(deltas: torch.Tensor) -> torch.Tensor:
    """TIES's sign election by mass: True where an entry has the sign of the sources' sum
    (0 elects +; a zero entry never agrees). Sums in source order."""
    total = deltas[0].clone()
    for delta in deltas[1:]:
        total.add_(delta)
    majority = (total >= 0).to(deltas.dtype) * 2 - 1
    return deltas.sign() == majority


def sce(
    base: torch.Tensor | None,
    sources: Sequence[torch.Tensor],
    shared: Mapping[str, Any],
    per_source: Sequence[Mapping[str, Any]],
    ctx: TensorContext,
) -> torch.Tensor:
    """base + the SCE mix of the task vectors (see the module docstring)."""
    base, deltas = task_vectors("sce", base, sources, ctx)
    if shared["select_topk"] < 1:
        deltas.mul_(select_mask(deltas, shared["select_topk"]).unsqueeze(0))
    erase = elected_mask(deltas)
    weights = source_weights(deltas).reshape((-1,) + (1,) * (deltas.dim() - 1))
    erased_weights = weights * erase
    del erase
    merged = (deltas * erased_weights).sum(dim=0)
    divisor = torch.sum(erased_weights, dim=0).clamp(min=DIVISOR_FLOOR)
    return base + merged / divisor


register(
    MergeMethod(
        name="sce",
        temporaries=(4.0, 2.5),  # peak copies: fixed + per source x n
        fn=sce,
        params=(
            ParamSpec(
                "select_topk",
                "shared",
                default=1.0,
                low=0.0,
                high=1.0,
                doc="share of the entries, by variance across task vectors, to keep",
            ),
        ),
        uses_base=True,
        min_sources=1,
        mergekit_name="sce",
        doc="SCE: keep high-variance entries, weight by energy, erase minority signs.",
    )
)
