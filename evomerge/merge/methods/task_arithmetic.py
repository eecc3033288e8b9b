"""Generalized task arithmetic: task_arithmetic, TIES, DARE, Model Breadcrumbs and DELLA.

All variants share one algorithm. Each source's task vector ``delta_i = source_i - base`` is
sparsified with its ``density`` (how depends on the variant), weighted (``wd_i = w_i delta_i``),
optionally filtered by a sign election (the TIES family), summed, optionally divided by the
sum of the weights that took part, scaled by ``lambda`` and added back to the base.

The sparsified merges go through the tensor in flat pieces (:func:`piece_length`): first,
per source, what needs the whole tensor (the magnitude cut-offs, found by a radix selection over
the pieces; the L1 norms), then, piece by piece, the sparsified deltas of every source, the
election, the sums and the division. So a merge's temporaries stay within
:data:`MERGE_TEMPORARY_TENSORS` tensors whatever the number of sources, and the result is the
same bits as in one piece (every step is elementwise, sums go in source order, ties in
magnitude by index, and each piece draws the uniforms of its own elements).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from evomerge.errors import MethodError
from evomerge.merge.methods.sparsify import (
    bernoulli_masked,
    della_masked,
    della_probs,
    l1_scale,
    outliers_range,
    rank_cut,
    topk_range,
)
from evomerge.merge.registry import (
    MergeMethod,
    MethodFn,
    ParamSpec,
    TensorContext,
    compute_dtype,
    register,
)

Sparsifier = Literal["none", "magnitude", "random", "outliers", "della"]


@dataclass(frozen=True)
class Variant:
    """What distinguishes one member of the family from another."""

    name: str
    sparsifier: Sparsifier
    consensus: bool
    normalize: bool
    doc: str


VARIANTS = (
    Variant("task_arithmetic", "none", False, False, "Weighted sum of task vectors on the base."),
    Variant("ties", "magnitude", True, True, "TIES: top-k trim, sign election, disjoint mean."),
    Variant("dare_linear", "random", False, False, "DARE random drop, then task arithmetic."),
    Variant("dare_ties", "random", True, False, "DARE random drop, then TIES sign election."),
    Variant("breadcrumbs", "outliers", False, False, "Model Breadcrumbs: drop outliers and small."),
    Variant("breadcrumbs_ties", "outliers", True, False, "Model Breadcrumbs with TIES election."),
    Variant("della", "della", True, True, "DELLA rank-based random drop, TIES election."),
    Variant("della_linear", "della", False, False, "DELLA rank-based random drop, no election."),
)


def _params(variant: Variant) -> tuple[ParamSpec, ...]:
    specs = [
        ParamSpec("weight", "per_source", doc="weight of this source's task vector"),
        ParamSpec("lambda", "shared", default=1.0, doc="scale of the merged task vector"),
        ParamSpec(
            "normalize",
            "shared",
            kind=bool,
            default=variant.normalize,
            doc="divide by the sum of the weights that took part",
        ),
    ]
    if variant.sparsifier != "none":
        specs.append(
            ParamSpec(
                "density",
                "per_source",
                default=1.0,
                low=0.0,
                high=1.0,
                low_open=True,
                doc="share of the task vector's entries to keep",
            )
        )
    if variant.sparsifier == "outliers":
        specs.append(
            ParamSpec(
                "gamma",
                "per_source",
                default=0.01,
                low=0.0,
                high=1.0,
                high_open=True,
                doc="share of largest-magnitude entries to drop",
            )
        )
    if variant.sparsifier == "della":
        specs.append(
            ParamSpec(
                "epsilon",
                "per_source",
                default=0.15,
                low=0.0,
                high=1.0,
                high_open=True,
                doc="keep probabilities span density +/- epsilon by magnitude rank",
            )
        )
    if variant.sparsifier in ("random", "della"):
        own = "inverse_density" if variant.sparsifier == "random" else "inverse_prob"
        specs.append(
            ParamSpec(
                "rescale",
                "shared",
                kind=str,
                default=own,
                choices=(own, "l1", "none"),
                doc="how kept entries are scaled up after the random drop",
            )
        )
    if variant.consensus:
        specs.append(
            ParamSpec(
                "sign_election",
                "shared",
                kind=str,
                default="mass",
                choices=("mass", "count"),
                doc="elect each entry's sign by summed values (mass) or by sign count",
            )
        )
        specs.append(
            ParamSpec(
                "weighted_election",
                "shared",
                kind=bool,
                default=False,
                doc="elect on weight-multiplied task vectors (as mergekit 0.1.5 does)",
            )
        )
    return tuple(specs)


def _check_della(variant: Variant, per_source: Sequence[Mapping[str, Any]], tensor: str) -> None:
    for index, params in enumerate(per_source):
        density, epsilon = params["density"], params["epsilon"]
        if density < 1 and not (density - epsilon > 0 and density + epsilon < 1):
            raise MethodError(
                f"method '{variant.name}': parameter 'epsilon' of source {index} must keep "
                f"density - epsilon > 0 and density + epsilon < 1, got density {density:g}, "
                f"epsilon {epsilon:g} (tensor {tensor})"
            )


CHUNK_ELEMENTS = 1 << 24
"""The most elements of one source's piece of a tensor (64 MiB in float32)."""
MIN_CHUNK_ELEMENTS = 1 << 16
"""Tensors with fewer elements per source and working buffer are merged in one piece."""
PIECE_BUFFERS = 8
"""Working buffers of one piece's size a merge holds besides the sources' pieces (masks,
cumulative counts and DELLA's int64 ranks): a piece is ``1 / (sources + PIECE_BUFFERS)`` of
the tensor, so all pieces at once stay below one tensor whatever the number of sources."""
MERGE_TEMPORARY_TENSORS = 3
"""Peak memory of a sparsified or sign-elected merge of one tensor (its float32 result
included) in float32 tensors of its size, whatever the number of sources; measured in
``tests/test_merge_memory.py`` (about 2.2). Tensors below ``MIN_CHUNK_ELEMENTS`` per piece may
exceed it by a few MiB, float64 inputs count twice, and DELLA's pieces hold whole rows (a 1-D
tensor is one row, so it goes in one piece)."""


def piece_length(numel: int, sources: int, unit: int = 1) -> int:
    """Elements per source in one piece of a tensor of ``numel`` elements: a multiple of
    ``unit`` (whole DELLA rows), ``numel / (sources + PIECE_BUFFERS)`` within
    [``MIN_CHUNK_ELEMENTS``, ``CHUNK_ELEMENTS``], and at least one unit."""
    share = max(numel // (sources + PIECE_BUFFERS), MIN_CHUNK_ELEMENTS)
    length = min(share, CHUNK_ELEMENTS) // unit * unit
    return max(length, unit, 1)


PieceFn = Callable[[torch.Tensor, int], torch.Tensor]
"""Sparsifies the flat piece of a delta that starts at the given flat index."""


@dataclass(frozen=True)
class _Pieces:
    """One tensor's flat pieces, and each source's delta piece by piece."""

    base: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    bounds: tuple[tuple[int, int], ...]

    @property
    def numel(self) -> int:
        return self.base.numel()

    def base_piece(self, start: int, stop: int) -> torch.Tensor:
        return self.base[start:stop].to(self.dtype)

    def deltas(self, source: torch.Tensor) -> Iterator[torch.Tensor]:
        """``source - base`` in the compute dtype, a piece at a time, in index order."""
        for start, stop in self.bounds:
            yield source[start:stop].to(self.dtype) - self.base_piece(start, stop)


def _della_width(shape: torch.Size, numel: int) -> int:
    """Elements of one DELLA row (:func:`della_rows`): whole rows make whole pieces."""
    return max(numel // shape[0] if len(shape) >= 2 and shape[0] else numel, 1)


def _piece_sparsifier(
    variant: Variant,
    pieces: _Pieces,
    source: torch.Tensor,
    params: Mapping[str, Any],
    shared: Mapping[str, Any],
    ctx: TensorContext,
    index: int,
) -> PieceFn:
    """The sparsifier of one source, applied a piece at a time; what it needs from the whole
    tensor (a magnitude cut-off, an L1 norm) is found first, in passes over the pieces."""
    if variant.sparsifier == "none" or params["density"] >= 1:
        return lambda delta, start: delta
    density, n = params["density"], pieces.numel
    if variant.sparsifier in ("magnitude", "outliers"):
        if variant.sparsifier == "magnitude":
            low, high = topk_range(n, density)
        else:
            low, high = outliers_range(n, density, params["gamma"])
        cut = rank_cut(lambda: (d.abs().float() for d in pieces.deltas(source)), n, low, high)
        return lambda delta, start: delta * cut.mask(delta.abs().float())
    rescale = shared["rescale"]
    if variant.sparsifier == "random":

        def masked(delta: torch.Tensor, start: int) -> torch.Tensor:
            uniforms = ctx.uniform(delta.shape, delta.device, index, offset=start)
            return bernoulli_masked(delta, density, uniforms, rescale == "inverse_density")

        norm_shape = pieces.shape
    else:
        width = _della_width(pieces.shape, n)
        probs = della_probs(width, density, params["epsilon"])

        def masked(delta: torch.Tensor, start: int) -> torch.Tensor:
            rows = delta.view(-1, width)
            uniforms = ctx.uniform(rows.shape, delta.device, index, offset=start)
            return della_masked(rows, probs, uniforms, rescale == "inverse_prob").view(-1)

        norm_shape = torch.Size((n // width, width))
    if rescale != "l1":
        return masked
    scale = _l1_piecewise_scale(pieces, source, masked, norm_shape)
    return lambda delta, start: masked(delta, start) * scale


def _l1_piecewise_scale(
    pieces: _Pieces, source: torch.Tensor, masked: PieceFn, norm_shape: torch.Size
) -> torch.Tensor:
    """:func:`l1_scale` of the whole delta and masked delta, each summed whole in the shape the
    one-piece method sums it in (the same reduction, so the same bits): one tensor of memory."""
    whole = torch.empty(pieces.numel, dtype=pieces.dtype, device=pieces.base.device)
    for (start, stop), delta in zip(pieces.bounds, pieces.deltas(source), strict=True):
        whole[start:stop] = delta
    before = whole.view(norm_shape).abs_().sum()
    for (start, stop), delta in zip(pieces.bounds, pieces.deltas(source), strict=True):
        whole[start:stop] = masked(delta, start)
    after = whole.view(norm_shape).abs_().sum()
    return l1_scale(before, after)


def generalized_task_arithmetic(
    variant: Variant,
    base: torch.Tensor,
    sources: Sequence[torch.Tensor],
    shared: Mapping[str, Any],
    per_source: Sequence[Mapping[str, Any]],
    ctx: TensorContext,
) -> torch.Tensor:
    """base + lambda * mix(sparsified, weighted task vectors); see the module docstring.

    Works on flat pieces of the tensor (:func:`piece_length`), so its temporaries stay below
    :data:`MERGE_TEMPORARY_TENSORS` tensors whatever the number of sources; every step is
    elementwise or takes the whole tensor's cut-offs and norms, so the result does not depend
    on the pieces: the same bits as merging the tensor in one piece.
    """
    dtype = compute_dtype(base)
    if variant.sparsifier == "none" and not variant.consensus:
        return _weighted_task_sum(base.to(dtype), sources, shared, per_source)
    for index, source in enumerate(sources):
        if source.shape != base.shape:
            raise MethodError(
                f"method '{variant.name}': source {index} has shape {list(source.shape)}, "
                f"the base {list(base.shape)} (tensor {ctx.name})"
            )
    numel = base.numel()
    unit = _della_width(base.shape, numel) if variant.sparsifier == "della" else 1
    length = piece_length(numel, len(sources), unit)
    bounds = tuple((a, min(a + length, numel)) for a in range(0, numel, length))
    pieces = _Pieces(base.reshape(-1), base.shape, dtype, bounds)
    flat_sources = [source.reshape(-1) for source in sources]
    sparsifiers = [
        _piece_sparsifier(variant, pieces, flat, params, shared, ctx, index)
        for index, (flat, params) in enumerate(zip(flat_sources, per_source, strict=True))
    ]
    weights = torch.tensor([p["weight"] for p in per_source], dtype=dtype, device=base.device)
    out = torch.empty(base.shape, dtype=dtype, device=base.device)
    flat_out = out.view(-1)
    divisor: torch.Tensor | None = None
    if not variant.consensus:
        divisor = _sum_in_order(weights)
        divisor = torch.where(divisor.abs() < 1e-8, torch.ones_like(divisor), divisor)
    for start, stop in bounds:
        base_piece = pieces.base_piece(start, stop)
        deltas = (
            sparsify(flat[start:stop].to(dtype) - base_piece, start)
            for sparsify, flat in zip(sparsifiers, flat_sources, strict=True)
        )
        if variant.consensus:
            mixed, piece_divisor = _elect(list(deltas), weights, shared)
        else:
            mixed, piece_divisor = _weighted_sum(deltas, weights), divisor
        if shared["normalize"]:
            mixed = mixed / piece_divisor
        if shared["lambda"] != 1:
            mixed = mixed * shared["lambda"]
        torch.add(base_piece, mixed, out=flat_out[start:stop])
    return out


def _weighted_sum(deltas: Iterable[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """``w_0 d_0 + w_1 d_1 + ...`` in source order, consuming one delta at a time."""
    total: torch.Tensor | None = None
    for index, delta in enumerate(deltas):
        weighted = delta.mul_(weights[index])
        total = weighted if total is None else total.add_(weighted)
    assert total is not None
    return total


def _elect(
    deltas: list[torch.Tensor], weights: torch.Tensor, shared: Mapping[str, Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    """TIES sign election on one piece: the weighted sum of the deltas that agree with the
    elected sign, and the sum of their weights (1 where none agrees). Works in place."""
    dtype = deltas[0].dtype
    if shared["weighted_election"]:
        for index, delta in enumerate(deltas):
            delta.mul_(weights[index])
    if shared["sign_election"] == "mass":
        tally = _sum_in_order(deltas)
    else:
        tally = _sum_in_order(deltas, torch.sign)
    majority = (tally >= 0).to(dtype) * 2 - 1
    del tally
    divisor = torch.zeros_like(majority)
    for index, delta in enumerate(deltas):
        agree = delta.sign() == majority
        if not shared["weighted_election"]:
            delta.mul_(weights[index])
        delta.mul_(agree)
        divisor.add_(agree.to(dtype) * weights[index])
    del majority
    mixed = deltas[0]
    for delta in deltas[1:]:
        mixed.add_(delta)
    return mixed, torch.where(divisor == 0, torch.ones_like(divisor), divisor)


def _sum_in_order(
    stack: torch.Tensor | Sequence[torch.Tensor],
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``stack[0] + stack[1] + ...`` (each through ``transform``), added in source order.

    A reduction such as ``stack.sum(dim=0)`` may add in another order on another device, and
    floating-point sums depend on the order: a sign election could then differ by device.
    """
    total = transform(stack[0]) if transform else stack[0].clone()
    for item in stack[1:]:
        total.add_(transform(item) if transform else item)
    return total


def _weighted_task_sum(
    base: torch.Tensor,
    sources: Sequence[torch.Tensor],
    shared: Mapping[str, Any],
    per_source: Sequence[Mapping[str, Any]],
) -> torch.Tensor:
    """Plain task arithmetic, accumulated in place: one temporary, not a stack of them."""
    weights = [p["weight"] for p in per_source]
    mixed = torch.sub(sources[0].to(base.dtype), base).mul_(weights[0])
    for source, weight in zip(sources[1:], weights[1:]):
        mixed.add_(source.to(base.dtype) - base, alpha=weight)
    if shared["normalize"]:
        # The same sum of weights as the general path, in the same dtype.
        divisor = _sum_in_order(torch.tensor(weights, dtype=base.dtype))
        if divisor.abs() >= 1e-8:
            mixed.div_(divisor.to(mixed.device))
    if shared["lambda"] != 1:
        mixed.mul_(shared["lambda"])
    return mixed.add_(base)


def _plan_check(variant: Variant) -> Any:
    if variant.sparsifier != "della":
        return None

    def check(shared: Mapping[str, Any], per_source: Sequence[Mapping[str, Any]], tensor: str):
        _check_della(variant, per_source, tensor)

    return check


def _bind(variant: Variant) -> MethodFn:
    def merge(
        base: torch.Tensor | None,
        sources: Sequence[torch.Tensor],
        shared: Mapping[str, Any],
        per_source: Sequence[Mapping[str, Any]],
        ctx: TensorContext,
    ) -> torch.Tensor:
        if base is None:
            raise MethodError(f"method '{variant.name}' needs a base model (tensor {ctx.name})")
        return generalized_task_arithmetic(variant, base, sources, shared, per_source, ctx)

    merge.__name__ = merge.__qualname__ = variant.name
    merge.__doc__ = variant.doc
    return merge


for _variant in VARIANTS:
    register(
        MergeMethod(
            name=_variant.name,
            temporaries=(float(MERGE_TEMPORARY_TENSORS), 0.0),
            fn=_bind(_variant),
            params=_params(_variant),
            uses_base=True,
            min_sources=1,
            mergekit_name=_variant.name,
            doc=_variant.doc,
            check=_plan_check(_variant),
            random_masks=_variant.sparsifier in ("random", "della"),
        )
    )
del _variant
