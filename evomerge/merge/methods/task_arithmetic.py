"""Generalized task arithmetic: task_arithmetic, TIES, DARE, Model Breadcrumbs and DELLA.

All variants share one algorithm. Each source's task vector ``delta_i = source_i - base`` is
sparsified with its ``density`` (how depends on the variant), weighted (``wd_i = w_i delta_i``),
optionally filtered by a sign election (the TIES family), summed, optionally divided by the
sum of the weights that took part, scaled by ``lambda`` and added back to the base.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from evomerge.errors import MethodError
from evomerge.merge.methods.sparsify import (
    bernoulli_keep,
    della_magprune,
    magnitude_outliers,
    magnitude_topk,
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


def _sparsify(
    variant: Variant,
    delta: torch.Tensor,
    params: Mapping[str, Any],
    shared: Mapping[str, Any],
    ctx: TensorContext,
    index: int,
) -> torch.Tensor:
    if variant.sparsifier == "none" or params["density"] >= 1:
        return delta
    density = params["density"]
    if variant.sparsifier == "magnitude":
        return magnitude_topk(delta, density)
    if variant.sparsifier == "outliers":
        return magnitude_outliers(delta, density, params["gamma"])
    uniforms = ctx.uniform(delta.shape, delta.device, index)
    if variant.sparsifier == "random":
        return bernoulli_keep(delta, density, uniforms, shared["rescale"])
    return della_magprune(delta, density, params["epsilon"], uniforms, shared["rescale"])


def generalized_task_arithmetic(
    variant: Variant,
    base: torch.Tensor,
    sources: Sequence[torch.Tensor],
    shared: Mapping[str, Any],
    per_source: Sequence[Mapping[str, Any]],
    ctx: TensorContext,
) -> torch.Tensor:
    """base + lambda * mix(sparsified, weighted task vectors); see the module docstring."""
    dtype = compute_dtype(base)
    base = base.to(dtype)
    if variant.sparsifier == "none" and not variant.consensus:
        return _weighted_task_sum(base, sources, shared, per_source)
    deltas = torch.stack(
        [
            _sparsify(variant, source.to(dtype) - base, params, shared, ctx, index)
            for index, (source, params) in enumerate(zip(sources, per_source, strict=True))
        ]
    )
    weights = torch.tensor([p["weight"] for p in per_source], dtype=dtype, device=base.device)
    weights = weights.reshape(-1, *([1] * base.dim()))
    # Work in place on the stacked deltas: a TIES merge of a large tensor otherwise holds
    # five stacked copies (weighted, signs, mask, masked) at once.
    if variant.consensus:
        if shared["weighted_election"]:
            deltas.mul_(weights)
        if shared["sign_election"] == "mass":
            tally = _sum_in_order(deltas)
        else:
            tally = _sum_in_order(deltas, torch.sign)
        majority = (tally >= 0).to(dtype) * 2 - 1
        del tally
        mask = deltas.sign() == majority
        if not shared["weighted_election"]:
            deltas.mul_(weights)
        mixed = _sum_in_order(deltas.mul_(mask))
        divisor = torch.zeros_like(mixed)
        for index in range(len(per_source)):
            divisor.add_(mask[index].to(dtype) * weights[index])
        divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    else:
        mixed = _sum_in_order(deltas.mul_(weights))
        divisor = _sum_in_order(weights)
        divisor = torch.where(divisor.abs() < 1e-8, torch.ones_like(divisor), divisor)
    if shared["normalize"]:
        mixed = mixed / divisor
    if shared["lambda"] != 1:
        mixed = mixed * shared["lambda"]
    return base + mixed


def _sum_in_order(
    stack: torch.Tensor, transform: Callable[[torch.Tensor], torch.Tensor] | None = None
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
