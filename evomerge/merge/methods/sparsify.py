"""Sparsification of task vectors (deltas): pure tensor helpers, no registration.

Every helper returns ``delta`` itself when ``density >= 1`` and otherwise a new tensor of the
same shape, dtype and device. Random helpers draw from the generator they are given, on the
delta's device, so masks are reproducible and never touch the CPU for CUDA inputs.
"""

from __future__ import annotations

import torch

L1_EPS = 1e-7
"""Below this L1 norm (before or after masking) the L1 rescale leaves the masked delta as is."""


def rank_range_mask(magnitude: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Mask of the entries at ranks [start, stop) when sorted by ascending magnitude.

    Found with two ``kthvalue`` selections (linear time) instead of a full sort; entries tied
    at a boundary are taken in index order, so the result is deterministic.
    """
    flat = magnitude.reshape(-1)
    n = flat.numel()
    keep = torch.ones(n, dtype=torch.bool, device=flat.device)
    if start > 0:
        low = torch.kthvalue(flat, start).values  # the largest dropped small entry
        keep &= flat >= low
        keep &= ~_first_ties(flat, low, start - int((flat < low).sum()))
    if stop < n:
        high = torch.kthvalue(flat, stop + 1).values  # the smallest dropped large entry
        keep &= flat <= high
        surplus = int((flat <= high).sum()) - stop
        keep &= ~_last_ties(flat, high, surplus)
    return keep.reshape(magnitude.shape)


def _first_ties(flat: torch.Tensor, value: torch.Tensor, count: int) -> torch.Tensor:
    """Mask of the first ``count`` entries equal to ``value``."""
    ties = flat == value
    return ties & (torch.cumsum(ties, 0) <= count)


def _last_ties(flat: torch.Tensor, value: torch.Tensor, count: int) -> torch.Tensor:
    """Mask of the last ``count`` entries equal to ``value``."""
    ties = flat == value
    from_end = torch.cumsum(ties.flip(0), 0).flip(0)
    return ties & (from_end <= count)


def magnitude_topk(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``max(1, int(density * n))`` entries of largest magnitude (TIES trimming)."""
    if density >= 1 or delta.numel() == 0:
        return delta
    n = delta.numel()
    k = max(1, int(density * n))
    return delta * rank_range_mask(delta.abs().float(), n - k, n)


def magnitude_outliers(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs: drop the ``gamma`` share of largest magnitudes, then the smallest ones,
    keeping ``int(density * n)`` entries (fewer outliers are dropped when needed to keep them)."""
    if density >= 1 or delta.numel() == 0:
        return delta
    n = delta.numel()
    target = int(density * n)
    n_bottom = max(0, n - target - int(gamma * n))
    return delta * rank_range_mask(delta.abs().float(), n_bottom, n_bottom + target)


def l1_rescaled(delta: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Scale ``masked`` so that its L1 norm equals that of ``delta`` (unless either is ~0)."""
    before = delta.abs().sum()
    after = masked.abs().sum()
    degenerate = (before < L1_EPS) | (after < L1_EPS)
    return masked * torch.where(degenerate, torch.ones_like(before), before / after)


def bernoulli_keep(
    delta: torch.Tensor, density: float, generator: torch.Generator, rescale: str
) -> torch.Tensor:
    """DARE: keep each entry with probability ``density``.

    ``rescale``: ``"inverse_density"`` divides kept entries by ``density`` (unbiased),
    ``"l1"`` restores the L1 norm of ``delta``, ``"none"`` leaves them as they are.
    """
    if density >= 1:
        return delta
    draws = torch.rand(delta.shape, generator=generator, device=delta.device, dtype=torch.float32)
    masked = delta * (draws < density).to(delta.dtype)
    if rescale == "inverse_density":
        return masked / density
    if rescale == "l1":
        return l1_rescaled(delta, masked)
    return masked


def della_magprune(
    delta: torch.Tensor,
    density: float,
    epsilon: float,
    generator: torch.Generator,
    rescale: str,
) -> torch.Tensor:
    """DELLA MagPrune: keep probabilities grow with the magnitude rank within each row.

    Rows are ``delta.reshape(shape[0], -1)`` (a 0-D or 1-D tensor is one row). An entry of
    normalized rank r in [0, 1] (0 = smallest magnitude of its row) is kept with probability
    ``density - epsilon + 2 * epsilon * r``. The caller checks that these lie in (0, 1).
    ``rescale``: ``"inverse_prob"`` divides kept entries by their own probability, ``"l1"``
    restores the L1 norm of ``delta``, ``"none"`` leaves them as they are.
    """
    if density >= 1 or delta.numel() == 0:
        return delta
    rows = delta.reshape(delta.shape[0], -1) if delta.dim() >= 2 else delta.reshape(1, -1)
    width = rows.shape[1]
    order = torch.argsort(rows.abs(), dim=1)
    positions = torch.arange(width, dtype=delta.dtype, device=delta.device) / max(width - 1, 1)
    rank_norm = torch.empty_like(rows).scatter_(1, order, positions.expand_as(rows).contiguous())
    probs = (density - epsilon) + 2 * epsilon * rank_norm
    draws = torch.rand(rows.shape, generator=generator, device=delta.device, dtype=torch.float32)
    masked = rows * (draws < probs).to(delta.dtype)
    if rescale == "inverse_prob":
        masked = masked / probs
    elif rescale == "l1":
        masked = l1_rescaled(rows, masked)
    return masked.reshape(delta.shape)
