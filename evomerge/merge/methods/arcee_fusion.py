"""Arcee Fusion: take the source's value only where it matters most, as mergekit 0.1.5 does.

With ``base`` and one ``source``, each entry's importance is ``|source - base|`` times the KL
divergence ``sum p log(p / q)`` between the softmaxes of the source's and the base's vectors
along the last dimension (``p``, ``q``: softmax + 1e-8; a vector's KL is shared by its
entries). The source's value is taken where the importance reaches ``median + 1.5 * (q3 - q1)``
of the tensor's importances; elsewhere the base is kept.

The quartiles are the importances of sorted rank ``int(q * (n - 1))`` (``q`` in
float32, as mergekit computes it), exactly, for every tensor size. mergekit estimates them from
1,000,000 entries drawn at random when a tensor has more: evomerge stays deterministic there
(and may differ from a given mergekit run on such tensors), and is bit-compatible with mergekit
on tensors of up to 1,000,000 entries.

It takes no parameters; mergekit ignores a ``weight`` given to it, and evomerge refuses one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from evomerge.errors import MethodError
from evomerge.merge.registry import MergeMethod, TensorContext, compute_dtype, register

SOFTMAX_EPS = 1e-8
"""Added to both softmaxes before the KL divergence (mergekit's value)."""
QUARTILES = (0.25, 0.5, 0.75)
IQR_FACTOR = 1.5


def importance(source: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``|source - base|`` times the KL divergence of the last-dimension softmaxes."""
    diff = (source - base).abs()
    p = F.softmax(source, dim=-1) + SOFTMAX_EPS
    q = F.softmax(base, dim=-1) + SOFTMAX_EPS
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return diff * kl


def quartiles(values: torch.Tensor) -> torch.Tensor:
    """q1, median, q3: the sorted values at ``int(q * (n - 1))``, exactly (no sampling), each
    found by a linear-time selection rather than a full sort."""
    flat = values.reshape(-1)
    ranks = (torch.tensor(QUARTILES) * (flat.numel() - 1)).long().tolist()  # float32, as mergekit
    return torch.stack([torch.kthvalue(flat, rank + 1).values for rank in ranks])


def threshold(scores: torch.Tensor) -> torch.Tensor:
    """median + 1.5 * IQR of the scores."""
    q1, median, q3 = quartiles(scores)
    return median + IQR_FACTOR * (q3 - q1)


def arcee_fusion(
    base: torch.Tensor | None,
    sources: Sequence[torch.Tensor],
    shared: Mapping[str, Any],
    per_source: Sequence[Mapping[str, Any]],
    ctx: TensorContext,
) -> torch.Tensor:
    """base + (source - base) where the importance reaches the threshold (module docstring)."""
    if base is None:
        raise MethodError(f"method 'arcee_fusion' needs a base model (tensor {ctx.name})")
    if len(sources) != 1:
        raise MethodError(
            f"method 'arcee_fusion' takes exactly 1 source model besides the base, "
            f"got {len(sources)} (tensor {ctx.name})"
        )
    if sources[0].shape != base.shape:
        raise MethodError(
            f"method 'arcee_fusion': source 0 has shape {list(sources[0].shape)}, "
            f"the base {list(base.shape)} (tensor {ctx.name})"
        )
    dtype = compute_dtype(base)
    base = base.to(dtype)
    source = sources[0].to(dtype)
    if base.numel() == 0:
        return base.clone()
    scores = importance(source, base)
    mask = (scores >= threshold(scores)).float()
    del scores
    return base + (source - base) * mask


register(
    MergeMethod(
        name="arcee_fusion",
        temporaries=(6.5, 0.0),  # peak copies: fixed + per source x n
        fn=arcee_fusion,
        params=(),
        uses_base=True,
        min_sources=1,
        max_sources=1,
        mergekit_name="arcee_fusion",
        doc="Arcee Fusion: take the source where its KL-weighted change is an outlier.",
    )
)
