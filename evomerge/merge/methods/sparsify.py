"""Sparsification of task vectors (deltas): pure tensor helpers, no registration.

Every helper returns ``delta`` itself when ``density >= 1`` and otherwise a new tensor of the
same shape, dtype and device. Random helpers draw from the generator they are given, on the
delta's device, so masks are reproducible and never touch the CPU for CUDA inputs.
"""

from __future__ import annotations

import torch

L1_EPS = 1e-7
"""Below this L1 norm (before or after masking) the L1 rescale leaves the masked delta as is."""


def _keep(delta: torch.Tensor, flat_indices: torch.Tensor) -> torch.Tensor:
    """``delta`` with every entry outside ``flat_indices`` set to zero."""
    mask = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
    mask[flat_indices] = 1
    return delta * mask.reshape(delta.shape)


def magnitude_topk(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``max(1, int(density * n))`` entries of largest magnitude (TIES trimming)."""
    if density >= 1 or delta.numel() == 0:
        return delta
    k = max(1, int(density * delta.numel()))
    order = torch.argsort(delta.abs().reshape(-1).float(), descending=True)
    return _keep(delta, order[:k])


def magnitude_outliers(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs: drop the ``gamma`` share of largest magnitudes, then the smallest ones,
    keeping ``int(density * n)`` entries (fewer outliers are dropped when needed to keep them)."""
    if density >= 1 or delta.numel() == 0:
        return delta
    n = delta.numel()
    target = int(density * n)
    n_bottom = max(0, n - target - int(gamma * n))
    order = torch.sort(delta.abs().reshape(-1).float(), descending=False).indices
    return _keep(delta, order[n_bottom : n_bottom + target])


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
