"""What a merge is up against, measured before any search: task-vector statistics and
interpolation scans (``evomerge inspect``).

Task vectors are ``source - base`` per tensor. :func:`tensor_stats` reduces one tensor's
task vectors to additive sums (squares, dot products, sign-conflict counts, TIES-kept mass);
:func:`inspect_models` streams over the tensors of the base and the sources (memory: the base
tensor and one task vector per source, for one tensor at a time) and adds the sums per
(layer, kind), per layer, per kind and overall; :func:`derived` turns sums into norms, balance,
cosines and rates.

Definitions (every number in ``inspect.json``):

- **norm** of a source: the L2 norm of its task vector over the group; **balance**: a source's
  norm divided by the mean norm of all sources (1 for every source when they are balanced).
- **cosine** of two sources: ``<d_i, d_j> / (|d_i| |d_j|)`` over the group.
- **conflict rate**: among entries where two or more sources move (nonzero task vector), the
  fraction where both signs occur. **top conflict rate** (at density ``d``): the same among
  entries that TIES's trim keeps (each source's top ``d`` share by ``|delta|`` of the tensor,
  as ``magnitude_topk``) for two or more sources.
- **TIES kept mass** of a source: the share of its task vector's L1 mass that the trim at
  density ``d`` keeps. DARE keeps a random ``d`` share of the entries, so its expected kept
  mass (before rescaling) is ``d`` whatever the tensor: it is reported as such.
- **barrier** of a scan ``v(t)``: the largest drop of ``v`` below the straight line between the
  endpoints, ``max_t (v(0) + t (v(1) - v(0)) - v(t))``, at least 0 (a metric where higher is
  better; for one where lower is better the sign is flipped).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from typing import TYPE_CHECKING, Any

import torch

from evomerge.merge.methods.sparsify import rank_range_mask, topk_range
from evomerge.merge.tensors import layer_index, tensor_kind

if TYPE_CHECKING:
    from evomerge.checkpoint import ModelFolder

DEFAULT_DENSITY = 0.2
OUTSIDE = "outside"
"""The layer label of tensors in no block (embeddings, head, final norm)."""


@dataclass
class Sums:
    """Additive statistics of n task vectors over some entries."""

    n: int
    entries: int = 0
    squares: list[float] = field(default_factory=list)
    l1: list[float] = field(default_factory=list)
    kept_l1: list[float] = field(default_factory=list)
    dots: dict[tuple[int, int], float] = field(default_factory=dict)
    moved: int = 0
    conflicts: int = 0
    top_moved: int = 0
    top_conflicts: int = 0

    def __post_init__(self) -> None:
        for name in ("squares", "l1", "kept_l1"):
            if not getattr(self, name):
                setattr(self, name, [0.0] * self.n)
        if not self.dots:
            self.dots = {pair: 0.0 for pair in combinations(range(self.n), 2)}

    def add(self, other: Sums) -> None:
        self.entries += other.entries
        for name in ("squares", "l1", "kept_l1"):
            mine = getattr(self, name)
            for i, value in enumerate(getattr(other, name)):
                mine[i] += value
        for pair, value in other.dots.items():
            self.dots[pair] += value
        self.moved += other.moved
        self.conflicts += other.conflicts
        self.top_moved += other.top_moved
        self.top_conflicts += other.top_conflicts


def _conflicts(deltas: torch.Tensor, where: torch.Tensor) -> tuple[int, int]:
    """(entries where two or more sources move, those among them with both signs), counting
    only the sources that ``where`` marks per entry."""
    positive = ((deltas > 0) & where).sum(0)
    negative = ((deltas < 0) & where).sum(0)
    moving = (positive + negative) >= 2
    both = moving & (positive > 0) & (negative > 0)
    return int(moving.sum()), int(both.sum())


def ties_kept(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Which entries of a flat task vector TIES's trim at ``density`` keeps (a bool mask):
    the ``max(1, int(density * n))`` largest by magnitude, ties broken by index as
    :func:`magnitude_topk` breaks them."""
    if density >= 1 or delta.numel() == 0:
        return torch.ones_like(delta, dtype=torch.bool)
    start, stop = topk_range(delta.numel(), density)
    return rank_range_mask(delta.abs().float(), start, stop).bool()


def tensor_stats(deltas: Sequence[torch.Tensor], density: float = DEFAULT_DENSITY) -> Sums:
    """The sums of one tensor's task vectors (one per source, same shape)."""
    n = len(deltas)
    stacked = torch.stack([d.detach().reshape(-1).to(torch.float64) for d in deltas])
    sums = Sums(n, entries=stacked.shape[1])
    kept = torch.stack([ties_kept(row, density) for row in stacked])
    for i, row in enumerate(stacked):
        sums.squares[i] = float(row.dot(row))
        sums.l1[i] = float(row.abs().sum())
        sums.kept_l1[i] = float(row.abs()[kept[i]].sum())
    for i, j in sums.dots:
        sums.dots[(i, j)] = float(stacked[i].dot(stacked[j]))
    sums.moved, sums.conflicts = _conflicts(stacked, torch.ones_like(kept))
    sums.top_moved, sums.top_conflicts = _conflicts(stacked, kept)
    return sums


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def derived(sums: Sums, labels: Sequence[str], density: float) -> dict[str, Any]:
    """The numbers a reader wants from :class:`Sums`: norms, balance, cosines, rates."""
    norms = [math.sqrt(s) for s in sums.squares]
    mean = sum(norms) / len(norms) if norms else 0.0
    cosine = {
        f"{labels[i]}|{labels[j]}": _ratio(value, norms[i] * norms[j])
        for (i, j), value in sums.dots.items()
    }
    return {
        "entries": sums.entries,
        "norm": dict(zip(labels, norms, strict=True)),
        "balance": {label: _ratio(norm, mean) for label, norm in zip(labels, norms, strict=True)},
        "cosine": cosine,
        "conflict_rate": _ratio(sums.conflicts, sums.moved),
        "moved_by_two_or_more": sums.moved,
        "top_conflict_rate": _ratio(sums.top_conflicts, sums.top_moved),
        "top_kept_by_two_or_more": sums.top_moved,
        "ties_kept_mass": {
            label: _ratio(kept, total)
            for label, kept, total in zip(labels, sums.kept_l1, sums.l1, strict=True)
        },
        "dare_kept_mass": {label: density for label in labels},
    }


def layer_label(name: str) -> str:
    index = layer_index(name)
    return OUTSIDE if index is None else str(index)


def inspect_models(
    base: ModelFolder,
    sources: Sequence[ModelFolder],
    labels: Sequence[str],
    density: float = DEFAULT_DENSITY,
    device: str = "cpu",
    on_tensor: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Stream over the tensors of ``base`` and ``sources`` (checked compatible by the caller)
    and return every statistic, per (layer, kind), per layer, per kind and overall."""
    n = len(sources)
    groups: dict[tuple[str, str], Sums] = {}
    names = [name for name, info in base.tensors.items() if info.dtype.is_floating_point]
    for done, name in enumerate(names, start=1):
        reference = base.read(name, device).to(torch.float32)
        deltas = [source.read(name, device).to(torch.float32) - reference for source in sources]
        sums = tensor_stats(deltas, density)
        key = (layer_label(name), tensor_kind(name))
        groups.setdefault(key, Sums(n)).add(sums)
        del reference, deltas
        if on_tensor is not None:
            on_tensor(done, len(names))
    return aggregate(groups, labels, density)


def _layer_order(label: str) -> tuple[int, int]:
    return (1, 0) if label == OUTSIDE else (0, int(label))


def aggregate(
    groups: Mapping[tuple[str, str], Sums], labels: Sequence[str], density: float
) -> dict[str, Any]:
    """Per (layer, kind), per layer, per kind and overall, from the per-(layer, kind) sums."""
    n = len(labels)
    by_layer: dict[str, Sums] = {}
    by_kind: dict[str, Sums] = {}
    overall = Sums(n)
    for (layer, kind), sums in groups.items():
        by_layer.setdefault(layer, Sums(n)).add(sums)
        by_kind.setdefault(kind, Sums(n)).add(sums)
        overall.add(sums)
    layers = sorted(by_layer, key=_layer_order)
    return {
        "sources": list(labels),
        "density": density,
        "overall": derived(overall, labels, density),
        "layers": {layer: derived(by_layer[layer], labels, density) for layer in layers},
        "kinds": {kind: derived(by_kind[kind], labels, density) for kind in sorted(by_kind)},
        "layer_kinds": {
            layer: {
                kind: derived(groups[(layer, kind)], labels, density)
                for kind in sorted(k for lay, k in groups if lay == layer)
            }
            for layer in layers
        },
    }


# -- interpolation scans -------------------------------------------------------------------


def scan_points(points: int) -> list[float]:
    """``points`` evenly spaced values of t from 0 to 1."""
    if points < 2:
        raise ValueError("a scan needs at least 2 points")
    return [i / (points - 1) for i in range(points)]


def barrier(ts: Sequence[float], values: Sequence[float], higher_is_better: bool = True) -> dict:
    """The largest drop of ``values`` below the straight line between the first and last, and
    the t where it is (see the module's definitions)."""
    if len(ts) != len(values) or len(ts) < 2:
        raise ValueError("a barrier needs two or more (t, value) points")
    sign = 1.0 if higher_is_better else -1.0
    t0, t1 = ts[0], ts[-1]
    v0, v1 = values[0], values[-1]
    best, where = 0.0, None
    for t, v in zip(ts, values, strict=True):
        line = v0 + (t - t0) / (t1 - t0) * (v1 - v0)
        drop = sign * (line - v)
        if drop > best + 1e-12:
            best, where = drop, t
    return {"barrier": best, "at": where}


def lerp_state(
    start: Mapping[str, torch.Tensor], end: Mapping[str, torch.Tensor], t: float
) -> Iterable[tuple[str, torch.Tensor]]:
    """``(1 - t) start + t end`` tensor by tensor."""
    for name, a in start.items():
        yield name, torch.lerp(a, end[name], t)


def scan_paths(labels: Sequence[str]) -> list[tuple[str, str]]:
    """base -> each source, then each pair of sources."""
    return [("base", label) for label in labels] + list(combinations(labels, 2))


def run_scan(
    model: Any,
    endpoints: Mapping[str, Mapping[str, torch.Tensor]],
    paths: Sequence[tuple[str, str]],
    ts: Sequence[float],
    score: Callable[[Any], float],
    higher_is_better: bool = True,
    on_point: Callable[[int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """Score ``model`` with its weights set to each point of each path; ``endpoints`` holds
    each model's floating tensors by name (resident: memory is one copy per endpoint model
    plus the working model, which is why scans are for models that fit in memory)."""
    parameters = model.state_dict()
    missing = sorted(set(endpoints[paths[0][0]]) - set(parameters)) if paths else []
    if missing:
        raise ValueError(f"tensor {missing[0]} is not in the loaded model")
    results = []
    total, done = len(paths) * len(ts), 0
    for start, end in paths:
        values = []
        for t in ts:
            with torch.no_grad():
                for name, tensor in lerp_state(endpoints[start], endpoints[end], t):
                    parameters[name].copy_(tensor)
            values.append(score(model))
            done += 1
            if on_point is not None:
                on_point(done, total)
        found = barrier(ts, values, higher_is_better)
        middle = values[ts.index(0.5)] if 0.5 in ts else None
        results.append(
            {"from": start, "to": end, "t": list(ts), "values": values, "midpoint": middle} | found
        )
    return results


# -- the summary -----------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def summary_remarks(report: Mapping[str, Any]) -> list[str]:
    """3-6 sentences read off the numbers of an inspection report."""
    remarks = []
    overall = report["overall"]
    labels = report["sources"]
    balance = overall["balance"]
    if labels:
        top = max(labels, key=lambda label: balance[label] or 0.0)
        low = min(labels, key=lambda label: balance[label] or 0.0)
        if len(labels) > 1:
            ratio = _ratio(overall["norm"][top], overall["norm"][low])
            remarks.append(
                f"**{top}** has the largest task vector (norm {overall['norm'][top]:.4g}, "
                f"{_fmt(balance[top], 2)}x the mean, {_fmt(ratio, 2)}x {low})"
                + ("; it would dominate an unweighted sum." if (ratio or 0) > 1.5 else ".")
            )
    if len(labels) > 1:
        cosines = {
            (layer, pair): value
            for layer, stats in report["layers"].items()
            for pair, value in stats["cosine"].items()
            if value is not None
        }
        if cosines:
            lo = min(cosines, key=cosines.__getitem__)
            hi = max(cosines, key=cosines.__getitem__)
            overall_cos = ", ".join(
                f"{pair.replace('|', '/')} {_fmt(v)}" for pair, v in overall["cosine"].items()
            )
            orthogonal = abs(cosines[hi]) < 0.1 and abs(cosines[lo]) < 0.1
            remarks.append(
                f"Task vectors are {'nearly orthogonal' if orthogonal else 'not orthogonal'}: "
                f"cosine overall {overall_cos}; per layer from {_fmt(cosines[lo])} (layer "
                f"{lo[0]}) to {_fmt(cosines[hi])} (layer {hi[0]})."
            )
        rates = {
            layer: stats["conflict_rate"]
            for layer, stats in report["layers"].items()
            if stats["conflict_rate"] is not None
        }
        if rates:
            ranked = sorted(rates, key=rates.__getitem__, reverse=True)[:3]
            remarks.append(
                f"Sign conflicts: {_fmt(overall['conflict_rate'])} of entries moved by two or "
                f"more sources overall, {_fmt(overall['top_conflict_rate'])} among those TIES "
                f"keeps at density {report['density']}; most in layers "
                + ", ".join(f"{layer} ({_fmt(rates[layer])})" for layer in ranked)
                + "."
            )
    else:
        remarks.append("One source: pairwise statistics (cosine, conflicts) are skipped.")
    kept = overall["ties_kept_mass"]
    if kept:
        remarks.append(
            f"TIES at density {report['density']} keeps "
            + ", ".join(f"{label} {_fmt(value)}" for label, value in kept.items())
            + " of each task vector's L1 mass (DARE keeps "
            + f"{report['density']} in expectation)."
        )
    scans = report.get("scans")
    if scans:
        metric = report.get("metric")
        worst = max(scans, key=lambda scan: scan["barrier"])
        if worst["barrier"] > 0:
            remarks.append(
                f"Barrier on {metric}: the largest is {worst['barrier']:.4g} between "
                f"{worst['from']} and {worst['to']} at t={_fmt(worst['at'], 2)}; "
                + ", ".join(
                    f"{s['from']}->{s['to']} {s['barrier']:.4g}" for s in scans if s is not worst
                )
                + ("." if len(scans) > 1 else "")
            )
        else:
            remarks.append(f"No barrier on {metric}: every scan stays on or above its line.")
    return remarks[:6]


def summary_markdown(report: Mapping[str, Any]) -> str:
    """``SUMMARY.md``: a per-layer table and the remarks."""
    labels = report["sources"]
    pairs = list(report["overall"]["cosine"])
    head = (
        ["layer"]
        + [f"norm {label}" for label in labels]
        + [f"cos {pair.replace('|', '/')}" for pair in pairs]
        + ["conflict", f"conflict top {report['density']}"]
    )
    lines = [
        f"# Inspection: {', '.join(labels)} against the base",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    rows = [*report["layers"].items(), ("**all**", report["overall"])]
    for layer, stats in rows:
        cells = (
            [layer]
            + [f"{stats['norm'][label]:.4g}" for label in labels]
            + [_fmt(stats["cosine"][pair]) for pair in pairs]
            + [_fmt(stats["conflict_rate"]), _fmt(stats["top_conflict_rate"])]
        )
        lines.append("| " + " | ".join(cells) + " |")
    scans = report.get("scans")
    if scans:
        lines += [
            "",
            f"Scans on {report.get('metric')} ({len(scans[0]['t'])} points):",
            "",
            "| path | start | midpoint | end | barrier | at t |",
            "|---|---|---|---|---|---|",
        ]
        for scan in scans:
            lines.append(
                f"| {scan['from']} -> {scan['to']} | {scan['values'][0]:.4g} | "
                f"{_fmt(scan['midpoint'], 4)} | {scan['values'][-1]:.4g} | "
                f"{scan['barrier']:.4g} | {_fmt(scan['at'], 2)} |"
            )
    lines += ["", "## Remarks", ""] + [f"- {remark}" for remark in summary_remarks(report)]
    return "\n".join(lines) + "\n"
