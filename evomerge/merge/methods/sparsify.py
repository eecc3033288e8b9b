"""Sparsification of task vectors (deltas): pure tensor helpers, no registration.

Every helper returns ``delta`` itself when ``density >= 1`` and otherwise a new tensor of the
same shape, dtype and device. Random helpers take their uniforms as a float32 tensor of the
delta's shape (from :meth:`~evomerge.merge.registry.TensorContext.uniform`: multiples of 2**-24,
a hash of the element's position, the same bits on every device) and keep an entry exactly when
its uniform is below its keep probability, compared without rounding the probability. Ranks by
magnitude break ties by index (a stable order), so no mask depends on the device or the dtype.
"""

from __future__ import annotations

import torch

from evomerge.merge.random_bits import threshold, thresholds

L1_EPS = 1e-7
"""Below this L1 norm (before or after masking) the L1 rescale leaves the masked delta as is."""


def rank_range_mask(magnitude: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Mask of the entries at ranks [start, stop) when sorted by ascending magnitude.

    Found with two ``kthvalue`` selections (linear time) instead of a full sort; entries tied
    at a boundary are taken in index order, so the result is the ranks [start, stop) of a
    stable sort, on every device.
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
    delta: torch.Tensor, density: float, uniforms: torch.Tensor, rescale: str
) -> torch.Tensor:
    """DARE: keep each entry whose uniform (of ``uniforms``, same shape) is below ``density``.

    ``rescale``: ``"inverse_density"`` divides kept entries by ``density`` (unbiased; in the
    delta's dtype, an IEEE division on every device), ``"l1"`` restores the L1 norm of
    ``delta``, ``"none"`` leaves them as they are.
    """
    if density >= 1:
        return delta
    keep = uniforms.reshape(delta.shape) < threshold(density)
    masked = delta * keep.to(delta.dtype)
    del keep
    if rescale == "inverse_density":
        # Divide by a tensor on the delta's device: CUDA computes ``x / python_float`` as
        # ``x * (1 / float)``, which can differ from the CPU's division in the last bit.
        return masked.div_(torch.tensor(density, dtype=masked.dtype, device=masked.device))
    if rescale == "l1":
        return l1_rescaled(delta, masked)
    return masked


def della_magprune(
    delta: torch.Tensor,
    density: float,
    epsilon: float,
    uniforms: torch.Tensor,
    rescale: str,
) -> torch.Tensor:
    """DELLA MagPrune: keep probabilities grow with the magnitude rank within each row.

    Rows are ``delta.reshape(shape[0], -1)`` (a 0-D or 1-D tensor is one row) of width ``w``.
    Entries are ranked ``j = 0 .. w - 1`` by ascending magnitude within their row, equal
    magnitudes in index order; rank ``j`` is kept when its uniform (of ``uniforms``, the
    delta's shape) is below ``p_j = (density - epsilon) + (2 * epsilon) * (j / max(w - 1, 1))``,
    computed in float64. The caller checks that these lie in (0, 1).
    ``rescale``: ``"inverse_prob"`` divides kept entries by their own ``p_j``, ``"l1"``
    restores the L1 norm of ``delta``, ``"none"`` leaves them as they are.
    """
    if density >= 1 or delta.numel() == 0:
        return delta
    rows = delta.reshape(delta.shape[0], -1) if delta.dim() >= 2 else delta.reshape(1, -1)
    width = rows.shape[1]
    order = torch.argsort(rows.abs(), dim=1, stable=True)
    ranks = torch.empty_like(order).scatter_(
        1, order, torch.arange(width, device=delta.device).expand_as(order)
    )
    del order
    # One probability per rank, on the host in float64: the same numbers on every device.
    positions = torch.arange(width, dtype=torch.float64) / max(width - 1, 1)
    probs = (density - epsilon) + (2 * epsilon) * positions
    keep = uniforms.reshape(rows.shape) < thresholds(probs).to(delta.device)[ranks]
    masked = rows * keep.to(delta.dtype)
    del keep
    if rescale == "inverse_prob":
        masked = masked / probs.to(device=delta.device, dtype=delta.dtype)[ranks]
    elif rescale == "l1":
        masked = l1_rescaled(rows, masked)
    return masked.reshape(delta.shape)
