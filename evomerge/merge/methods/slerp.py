"""Spherical linear interpolation between the base and one source, one angle per tensor."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from evomerge.errors import MethodError
from evomerge.merge.registry import MergeMethod, ParamSpec, TensorContext, compute_dtype, register

NORM_EPS = 1e-8
"""A norm at or below this is treated as 1 when measuring the angle."""

MIN_SIN = 1e-3
"""Below this sin of the angle (|cos| within 5e-7 of 1, about what the cosine of float32
tensors resolves) a pair is (anti)parallel whatever ``dot_threshold`` says, and is interpolated
linearly: the great circle is undefined there, and dividing by sin(theta) would give NaN
(identical tensors: 0/0) or coefficients over 1000 (nearly opposite tensors). Near cos 1 the
two differ by O(theta^2) < 1e-6."""

CHUNK = 1 << 20
"""Elements per partial sum: long float32 sums drift (cos > 1 on a 65M-entry embedding)."""


def cosine(v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """cos of the angle between two flat tensors, clamped to [-1, 1].

    Partial sums of ``CHUNK`` entries in the compute dtype, accumulated in float64, so the
    result stays accurate for tensors of any size without a float64 copy of either.
    """
    acc = torch.zeros(3, dtype=torch.float64, device=v0.device)  # |v0|^2, |v1|^2, v0.v1
    for start in range(0, v0.numel(), CHUNK):
        a, b = v0[start : start + CHUNK], v1[start : start + CHUNK]
        acc += torch.stack([torch.dot(a, a), torch.dot(b, b), torch.dot(a, b)]).double()
    n0, n1 = acc[0].sqrt(), acc[1].sqrt()
    n0 = torch.where(n0 > NORM_EPS, n0, torch.ones_like(n0))
    n1 = torch.where(n1 > NORM_EPS, n1, torch.ones_like(n1))
    return (acc[2] / (n0 * n1)).clamp(-1, 1)


def slerp(
    base: torch.Tensor | None,
    sources: Sequence[torch.Tensor],
    shared: Mapping[str, Any],
    per_source: Sequence[Mapping[str, Any]],
    ctx: TensorContext,
) -> torch.Tensor:
    """Interpolate from the base (t=0) to the source (t=1) along the great circle.

    The angle comes from the normalized, flattened tensors; the coefficients are applied to
    the raw tensors. Nearly (anti)parallel pairs (|cos| > dot_threshold, or too close to 1 to
    measure an angle at all: see :data:`MIN_SIN`) fall back to lerp. The angle and the
    coefficients are computed in float64.
    """
    if base is None:
        raise MethodError(f"method 'slerp' needs a base model (tensor {ctx.name})")
    dtype = compute_dtype(base)
    v0 = base.to(dtype).reshape(-1)
    v1 = sources[0].to(dtype).reshape(-1)
    t = torch.tensor(shared["t"], dtype=dtype, device=v0.device)
    if v0.numel() == 0:
        return ((1 - t) * v0 + t * v1).reshape(base.shape)
    dot = cosine(v0, v1)  # float64
    theta = torch.acos(dot)
    sin_theta = torch.sin(theta)
    linear = (dot.abs() > shared["dot_threshold"]) | (sin_theta < MIN_SIN)
    t64 = torch.tensor(float(shared["t"]), dtype=torch.float64, device=v0.device)
    divisor = torch.where(linear, torch.ones_like(sin_theta), sin_theta)
    c0 = torch.where(linear, 1 - t64, torch.sin((1 - t64) * theta) / divisor).to(dtype)
    c1 = torch.where(linear, t64, torch.sin(t64 * theta) / divisor).to(dtype)
    return (c0 * v0 + c1 * v1).reshape(base.shape)


register(
    MergeMethod(
        name="slerp",
        temporaries=(3.5, 0.0),  # peak copies: fixed + per source x n
        fn=slerp,
        params=(
            ParamSpec("t", "shared", doc="interpolation factor: 0 = base, 1 = source"),
            ParamSpec(
                "dot_threshold",
                "shared",
                default=0.9995,
                low=0.0,
                high=1.0,
                low_open=True,
                doc="above this |cos| of the angle, interpolate linearly",
            ),
        ),
        uses_base=True,
        min_sources=1,
        max_sources=1,
        mergekit_name="slerp",
        doc="Spherical interpolation between the base and one source.",
    )
)
