"""Objectives: which metric to optimize, in which direction, and how objectives combine.

Proposers receive raw metric values (one per objective, in order) and apply directions
themselves. Single-objective proposers optimize :func:`scalarize`, a quantity to maximize.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from evomerge.errors import ConfigError


class Objective(BaseModel):
    """One metric to optimize; ``weight`` matters only when objectives are scalarized."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    metric: str = Field(min_length=1)
    """A metric name as the evaluators report it, such as ``arc_easy/acc`` (lm_eval's
    ``task/metric``) or ``perplexity/perplexity``."""
    direction: Literal["maximize", "minimize"] = "maximize"
    """Whether larger (``maximize``) or smaller (``minimize``) values of the metric are better."""
    weight: float = Field(default=1.0, ge=0, allow_inf_nan=False)
    """Non-negative (``direction`` says which way is better); 0 ignores the objective."""

    @property
    def sign(self) -> float:
        """+1 for maximize, -1 for minimize: ``sign * value`` is always to be maximized."""
        return 1.0 if self.direction == "maximize" else -1.0


def parse_objectives(
    data: Sequence[Objective | Mapping[str, Any]], where: str = "objectives"
) -> list[Objective]:
    """Objectives (or mappings of their fields) as a validated, non-empty list."""
    if isinstance(data, str | bytes | Mapping) or not isinstance(data, Sequence):
        raise ConfigError(f"{where}: expected a list of objectives, got {data!r}")
    if not data:
        raise ConfigError(f"{where}: at least one objective is needed")
    out: list[Objective] = []
    for i, item in enumerate(data):
        if isinstance(item, Objective):
            out.append(item)
            continue
        try:
            out.append(Objective.model_validate(item))
        except ValidationError as exc:
            from evomerge.util import pydantic_message

            raise ConfigError(f"{where}[{i}]: {pydantic_message(exc)}") from None
    return out


def _check_lengths(objectives: Sequence[Objective], values: Sequence[float]) -> None:
    if len(values) != len(objectives):
        raise ValueError(f"expected {len(objectives)} objective value(s), got {len(values)}")


def scalarize(objectives: Sequence[Objective], values: Sequence[float]) -> float:
    """``sum(weight * sign * value)``: one number to maximize."""
    _check_lengths(objectives, values)
    return math.fsum(o.weight * o.sign * float(v) for o, v in zip(objectives, values))


def dominates(a: Sequence[float], b: Sequence[float], objectives: Sequence[Objective]) -> bool:
    """Whether ``a`` is at least as good as ``b`` in every objective and better in one."""
    _check_lengths(objectives, a)
    _check_lengths(objectives, b)
    better = False
    for o, x, y in zip(objectives, a, b):
        sx, sy = o.sign * float(x), o.sign * float(y)
        if sx < sy:
            return False
        better = better or sx > sy
    return better


def _to_maximize(points: Sequence[Sequence[float]], objectives: Sequence[Objective]) -> np.ndarray:
    """The points as an (n, objectives) array, each column signed so larger is better."""
    for point in points:
        _check_lengths(objectives, point)
    signs = np.array([o.sign for o in objectives], dtype=np.float64)
    return np.asarray(points, dtype=np.float64).reshape(len(points), len(objectives)) * signs


def pareto_front(points: Sequence[Sequence[float]], objectives: Sequence[Objective]) -> list[int]:
    """Indices of the non-dominated points, in order; of equal points only the first is kept.

    Points are visited best-first in lexicographic order (to be maximized), so any point that
    dominates another, or equals it and comes first, is visited before it: each point is
    compared with the front found so far only, in one vectorized step (O(n * front)).
    """
    if not points:
        return []
    values = _to_maximize(points, objectives)
    order = np.lexsort(tuple(-values[:, k] for k in reversed(range(values.shape[1]))))
    front = np.empty_like(values)
    kept: list[int] = []
    for index in order:  # lexsort is stable: equal points keep their input order
        point = values[index]
        head = front[: len(kept)]
        at_least = (head >= point).all(axis=1)
        if at_least.any():  # dominated by, or equal to, a point already on the front
            continue
        front[len(kept)] = point
        kept.append(int(index))
    return sorted(kept)


def nondominated_order(
    points: Sequence[Sequence[float]], objectives: Sequence[Objective]
) -> list[int]:
    """Indices of ``points``, best first: by non-dominated rank (the front is rank 0, the
    front of what remains rank 1, ...), within a rank by crowding distance (largest first; the
    extremes of each objective are infinitely far), then by index. NSGA-II's order, used to
    choose which cheap scores to promote without letting one objective's scale decide."""
    if not points:
        return []
    values = _to_maximize(points, objectives)
    remaining = list(range(len(points)))
    order: list[int] = []
    while remaining:
        front = [
            i
            for i in remaining
            if not any(
                (values[j] >= values[i]).all() and (values[j] > values[i]).any() for j in remaining
            )
        ]
        distance = crowding_distance(values[front])
        order.extend(front[k] for k in sorted(range(len(front)), key=lambda k: -distance[k]))
        taken = set(front)
        remaining = [i for i in remaining if i not in taken]
    return order


def crowding_distance(values: np.ndarray) -> list[float]:
    """Each point's crowding distance within one front (rows of ``values``, to be maximized):
    the sum over objectives of the gap between its neighbours, divided by the objective's range;
    the two extremes of each objective get infinity."""
    count, dims = values.shape
    distance = [0.0] * count
    if count <= 2:
        return [math.inf] * count
    for k in range(dims):
        order = sorted(range(count), key=lambda i: (values[i, k], i))
        low, high = values[order[0], k], values[order[-1], k]
        distance[order[0]] = distance[order[-1]] = math.inf
        if high == low:
            continue
        for position in range(1, count - 1):
            gap = values[order[position + 1], k] - values[order[position - 1], k]
            distance[order[position]] += gap / (high - low)
    return distance
