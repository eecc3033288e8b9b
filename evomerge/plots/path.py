"""The path figure: ``evomerge plot recipe`` and an export's ``recipe.png`` for a data-flow trial.

A data-flow (layer path) recipe says which layer of which model a token passes through at each
depth, and how much that layer's normalized input is scaled. The figure puts the depth on the
x axis and one row per model on the y axis: a marker per step, labelled with the layer it
takes from that model, the steps joined in path order, and a scale other than 1 written under
its marker and shown by the marker's colour. The outer model (embeddings, final norm, head) is
named in the title and marked on its row.

The data: :func:`path_grid` (of a :class:`~evomerge.dataflow.recipe.DataflowRecipe`); the
drawing: :func:`path_figure`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from evomerge.errors import ConfigError
from evomerge.plots.png import new_figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from evomerge.dataflow.recipe import DataflowRecipe

ANNOTATE_STEPS = 64
"""Markers carry their layer index when the path has at most this many steps."""


# -- the data --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PathPoint:
    """One depth of the path: layer ``layer`` of model ``model``, its input scaled by ``scale``."""

    depth: int
    model: str
    layer: int
    scale: float


@dataclass(frozen=True)
class PathGrid:
    """A path recipe as plain data: the models (rows, in the recipe's order), which of them are
    merges, the outer model, and one point per depth."""

    models: tuple[str, ...]
    merges: tuple[str, ...]
    """The models that are parameter-space merges (a recipe) rather than folders."""
    outer: str
    points: tuple[PathPoint, ...]

    @property
    def scaled(self) -> tuple[PathPoint, ...]:
        """The steps whose scale is not 1."""
        return tuple(p for p in self.points if p.scale != 1.0)


def path_grid(recipe: DataflowRecipe) -> PathGrid:
    """The models, outer model and per-depth steps of a path recipe."""
    return PathGrid(
        models=tuple(m.label for m in recipe.models),
        merges=tuple(m.label for m in recipe.models if m.recipe is not None),
        outer=recipe.outer,
        points=tuple(
            PathPoint(depth, step.model, step.layer, float(step.scale))
            for depth, step in enumerate(recipe.path)
        ),
    )


# -- the drawing -----------------------------------------------------------------------------------


def path_figure(grid: PathGrid, title: str) -> Figure:
    """Depth across, one row per model: a marker per step labelled with its layer index, the
    steps joined in order; scales other than 1 coloured (log scale around 1) and written."""
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm

    if not grid.points:
        raise ConfigError(f"{title}: the path has no layers to draw")
    rows = {label: index for index, label in enumerate(grid.models)}
    depth = len(grid.points)
    width = min(24.0, max(6.5, 0.42 * depth + 3.0))
    height = max(3.2, 0.75 * len(grid.models) + 2.0)
    figure = new_figure(width, height)
    axes = figure.subplots()
    xs = [p.depth for p in grid.points]
    ys = [rows[p.model] for p in grid.points]
    axes.plot(xs, ys, color="0.65", linewidth=1.2, zorder=1)
    scales = [p.scale for p in grid.points]
    spread = max(max(abs(math.log(s)) for s in scales), math.log(1.05))
    norm = LogNorm(vmin=math.exp(-spread), vmax=math.exp(spread))
    cmap = colormaps["coolwarm"]
    dots = axes.scatter(
        xs,
        ys,
        c=scales,
        cmap=cmap,
        norm=norm,
        s=170 if depth <= ANNOTATE_STEPS else 40,
        edgecolors="black",
        linewidths=0.6,
        zorder=2,
    )
    if depth <= ANNOTATE_STEPS:
        for point in grid.points:
            y = rows[point.model]
            shade = cmap(norm(point.scale))
            light = 0.299 * shade[0] + 0.587 * shade[1] + 0.114 * shade[2] > 0.5
            axes.text(
                point.depth,
                y,
                str(point.layer),
                ha="center",
                va="center",
                fontsize=7,
                color="black" if light else "white",
            )
            if point.scale != 1.0:
                axes.text(
                    point.depth, y + 0.22, f"x{point.scale:.2f}", ha="center", va="top", fontsize=7
                )
    names = [
        label
        + (" (merge)" if label in grid.merges else "")
        + (" [outer]" if label == grid.outer else "")
        for label in grid.models
    ]
    axes.set_yticks(range(len(grid.models)), names, fontsize=8)
    axes.set_ylim(len(grid.models) - 0.4, -0.6)
    step = max(1, depth // 32)
    axes.set_xticks(range(0, depth, step))
    axes.set_xlim(-0.7, depth - 0.3)
    axes.set_xlabel("depth on the path (the exported model's layer)")
    axes.grid(axis="x", color="0.92", zorder=0)
    axes.tick_params(length=0)
    if grid.scaled:
        bar = figure.colorbar(dots, ax=axes, shrink=0.9)
        ticks = [norm.vmin, 1.0, norm.vmax]
        bar.set_ticks(ticks, labels=[f"{t:.2f}" for t in ticks], minor=False)
        bar.set_ticks([], minor=True)
        bar.set_label("input scale")
    lines = [
        f"{title}: layer path of {depth} layers",
        f"embeddings, final norm and head of '{grid.outer}'; marker: the layer taken",
    ]
    if grid.scaled:
        lines[-1] += f"; x: input scale ({len(grid.scaled)} scaled)"
    figure.suptitle("\n".join(lines), fontsize="medium")
    return figure
