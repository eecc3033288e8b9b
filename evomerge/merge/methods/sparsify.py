"""Sparsification of task vectors (deltas): pure tensor helpers, no registration.

Every helper returns ``delta`` itself when ``density >= 1`` and otherwise a new tensor of the
same shape, dtype and device. Random helpers take their uniforms as a float32 tensor of the
delta's shape (from :meth:`~evomerge.merge.registry.TensorContext.uniform`: multiples of 2**-24,
a hash of the element's position, the same bits on every device) and keep an entry exactly when
its uniform is below its keep probability, compared without rounding the probability. Ranks by
magnitude break ties by index (a stable order), so no mask depends on the device or the dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

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


# --- the same ranks, a piece at a time ------------------------------------------------------

Chunks = Callable[[], Iterable[torch.Tensor]]
"""Yields a tensor's float32 magnitudes, flat, in pieces that cover it in index order; called
once per pass over the tensor."""

DIGIT_BITS = 16
"""Bits of a float32's pattern resolved per pass of :func:`kth_smallest`: two passes."""


def kth_smallest(chunks: Chunks, ks: Sequence[int]) -> list[tuple[torch.Tensor, int]]:
    """For each 1-based rank ``k``, the ``k``-th smallest magnitude (a 0-d float32 tensor, the
    value ``torch.kthvalue`` gives) and how many magnitudes are smaller than it.

    A radix selection on the bit patterns (non-negative float32 values order like their int32
    patterns): one pass counts the high 16 bits of every magnitude, a second one the low 16 bits
    of those in the buckets holding the ranks. Exact, and no temporary exceeds a piece.
    """
    if not ks:
        return []
    high = _bit_counts(chunks, ())[None]
    cumulative = high.cumsum(0)
    buckets = [int(torch.searchsorted(cumulative, k)) for k in ks]
    lows = _bit_counts(chunks, tuple(sorted(set(buckets))))
    results = []
    for k, bucket in zip(ks, buckets, strict=True):
        below_bucket = int(cumulative[bucket] - high[bucket])
        counts = lows[bucket]
        within = counts.cumsum(0)
        low = int(torch.searchsorted(within, k - below_bucket))
        below = below_bucket + int(within[low] - counts[low])
        pattern = torch.tensor([(bucket << DIGIT_BITS) | low], dtype=torch.int32)
        results.append((pattern.view(torch.float32)[0], below))
    return results


def _bit_counts(chunks: Chunks, buckets: tuple[int, ...]) -> dict[int | None, torch.Tensor]:
    """One pass: counts (on the host) of the high digit of every magnitude (key None, when no
    ``buckets`` are given), or for each bucket of the low digit of the magnitudes whose high
    digit it is."""
    totals: dict[int | None, torch.Tensor] = {}
    for chunk in chunks():
        bits = chunk.view(torch.int32)
        high = bits >> DIGIT_BITS
        selections = {None: high} if not buckets else {}
        for bucket in buckets:
            selections[bucket] = bits[high == bucket] & ((1 << DIGIT_BITS) - 1)
        for key, digits in selections.items():
            counts = torch.bincount(digits)  # as long as the largest digit + 1
            if key not in totals:
                totals[key] = torch.zeros(1 << DIGIT_BITS, dtype=torch.int64, device=bits.device)
            totals[key][: counts.numel()] += counts
    empty = torch.zeros(1 << DIGIT_BITS, dtype=torch.int64)
    return {key: totals[key].cpu() if key in totals else empty for key in (buckets or (None,))}


@dataclass
class RankCut:
    """:func:`rank_range_mask` for ranks [start, stop) of a whole tensor, applied one piece at
    a time: :meth:`mask` takes the pieces of the flat magnitudes in index order and remembers
    how many entries tied at a boundary the earlier pieces held, so ties go by index exactly as
    in the whole-tensor mask."""

    low: torch.Tensor | None
    """The largest dropped small magnitude (rank start - 1), or None when start is 0."""
    drop_low: int
    """How many entries equal to ``low`` are dropped: the first ones, by index."""
    high: torch.Tensor | None
    """The smallest dropped large magnitude (rank stop), or None when stop is the size."""
    keep_high: int
    """How many entries equal to ``high`` are kept: the first ones, by index."""
    seen_low: torch.Tensor | int = 0
    seen_high: torch.Tensor | int = 0

    def mask(self, magnitude: torch.Tensor) -> torch.Tensor:
        """Keep-mask of the next flat piece of the magnitudes."""
        keep = torch.ones(magnitude.shape, dtype=torch.bool, device=magnitude.device)
        if self.low is not None:
            low = self.low = self.low.to(magnitude.device)
            keep &= magnitude >= low
            ties = magnitude == low
            order = torch.cumsum(ties, 0).add_(self.seen_low)
            keep &= ~(ties & (order <= self.drop_low))
            self.seen_low = order[-1:].clone() if order.numel() else self.seen_low
        if self.high is not None:
            high = self.high = self.high.to(magnitude.device)
            keep &= magnitude <= high
            ties = magnitude == high
            order = torch.cumsum(ties, 0).add_(self.seen_high)
            keep &= ~(ties & (order > self.keep_high))
            self.seen_high = order[-1:].clone() if order.numel() else self.seen_high
        return keep


def rank_cut(chunks: Chunks, n: int, start: int, stop: int) -> RankCut:
    """The :class:`RankCut` of ranks [start, stop) of ``n`` magnitudes given in pieces."""
    ranks = ([start] if start > 0 else []) + ([stop + 1] if stop < n else [])
    found = iter(kth_smallest(chunks, ranks))
    low, below_low = next(found) if start > 0 else (None, 0)
    high, below_high = next(found) if stop < n else (None, 0)
    return RankCut(low, start - below_low, high, stop - below_high)


def topk_range(n: int, density: float) -> tuple[int, int]:
    """Ranks (ascending magnitude) that :func:`magnitude_topk` keeps."""
    return n - max(1, int(density * n)), n


def outliers_range(n: int, density: float, gamma: float) -> tuple[int, int]:
    """Ranks (ascending magnitude) that :func:`magnitude_outliers` keeps."""
    target = int(density * n)
    n_bottom = max(0, n - target - int(gamma * n))
    return n_bottom, n_bottom + target


def magnitude_topk(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``max(1, int(density * n))`` entries of largest magnitude (TIES trimming)."""
    if density >= 1 or delta.numel() == 0:
        return delta
    start, stop = topk_range(delta.numel(), density)
    return delta * rank_range_mask(delta.abs().float(), start, stop)


def magnitude_outliers(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs: drop the ``gamma`` share of largest magnitudes, then the smallest ones,
    keeping ``int(density * n)`` entries (fewer outliers are dropped when needed to keep them)."""
    if density >= 1 or delta.numel() == 0:
        return delta
    start, stop = outliers_range(delta.numel(), density, gamma)
    return delta * rank_range_mask(delta.abs().float(), start, stop)


def l1_rescaled(delta: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Scale ``masked`` so that its L1 norm equals that of ``delta`` (unless either is ~0)."""
    return masked * l1_scale(delta.abs().sum(), masked.abs().sum())


def l1_scale(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """The factor of :func:`l1_rescaled` from the two L1 norms (0-d tensors)."""
    degenerate = (before < L1_EPS) | (after < L1_EPS)
    return torch.where(degenerate, torch.ones_like(before), before / after)


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
    masked = bernoulli_masked(delta, density, uniforms, rescale == "inverse_density")
    return l1_rescaled(delta, masked) if rescale == "l1" else masked


def bernoulli_masked(
    delta: torch.Tensor, density: float, uniforms: torch.Tensor, inverse: bool
) -> torch.Tensor:
    """:func:`bernoulli_keep` of any piece of a delta (with that piece's uniforms), without the
    L1 rescale, which needs the whole tensor's norms; ``inverse`` divides by ``density``."""
    keep = uniforms.reshape(delta.shape) < threshold(density)
    masked = delta * keep.to(delta.dtype)
    del keep
    if inverse:
        # Divide by a tensor on the delta's device: CUDA computes ``x / python_float`` as
        # ``x * (1 / float)``, which can differ from the CPU's division in the last bit.
        masked.div_(torch.tensor(density, dtype=masked.dtype, device=masked.device))
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
    rows = della_rows(delta)
    probs = della_probs(rows.shape[1], density, epsilon)
    masked = della_masked(rows, probs, uniforms, rescale == "inverse_prob")
    if rescale == "l1":
        masked = l1_rescaled(rows, masked)
    return masked.reshape(delta.shape)


def della_rows(delta: torch.Tensor) -> torch.Tensor:
    """The rows DELLA ranks within: ``delta.reshape(shape[0], -1)``, one row below 2-D."""
    return delta.reshape(delta.shape[0], -1) if delta.dim() >= 2 else delta.reshape(1, -1)


def della_probs(width: int, density: float, epsilon: float) -> torch.Tensor:
    """One keep probability per rank, on the host in float64: the same numbers everywhere."""
    positions = torch.arange(width, dtype=torch.float64) / max(width - 1, 1)
    return (density - epsilon) + (2 * epsilon) * positions


def della_masked(
    rows: torch.Tensor, probs: torch.Tensor, uniforms: torch.Tensor, inverse: bool
) -> torch.Tensor:
    """:func:`della_magprune` of whole rows (with their uniforms), without the L1 rescale;
    ``inverse`` divides each kept entry by its probability. Returns the rows' shape."""
    width = rows.shape[1]
    order = torch.argsort(rows.abs(), dim=1, stable=True)
    ranks = torch.empty_like(order).scatter_(
        1, order, torch.arange(width, device=rows.device).expand_as(order)
    )
    del order
    keep = uniforms.reshape(rows.shape) < thresholds(probs).to(rows.device)[ranks]
    masked = rows * keep.to(rows.dtype)
    del keep
    if inverse:
        masked = masked / probs.to(device=rows.device, dtype=rows.dtype)[ranks]
    return masked
