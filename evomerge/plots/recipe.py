"""The recipe heatmap: ``evomerge plot recipe`` and an export's ``recipe.png``.

A heatmap per method parameter and source, layers by tensor kind, of the values the merge
engine uses. The values come from :func:`~evomerge.merge.recipe.plan_recipe`, the same
resolution the engine merges by; a cell averages the tensors of its layer and kind, and is
starred where they differ.

The data: :func:`recipe_grid` (of a resolved plan), :func:`recipe_matrix` (of a recipe on given
tensor names) and :func:`trial_recipe_grid` (of a stored trial); the drawing:
:func:`recipe_figure`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.errors import ConfigError
from evomerge.plots.png import new_figure

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from evomerge.merge.plan import MergePlan
    from evomerge.merge.recipe import Recipe
    from evomerge.study.store import TrialView

KIND_ORDER = ("attention", "mlp", "norm", "embedding", "head", "other")
OUTSIDE = "outside"
"""The heatmap row of the tensors outside the layers (embeddings, final norm, head)."""
ANNOTATE_ROWS = 48
"""Heatmap cells show their values when a panel has at most this many rows."""


# -- the data --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecipePanel:
    """One heatmap: a parameter, for one source (None: a parameter of the whole merge)."""

    parameter: str
    source: str | None
    values: Any
    """numpy array, rows x kinds; NaN where no tensor of that layer has that kind."""
    varies: Any
    """numpy bool array: the tensors of the cell do not all have the same value."""


@dataclass(frozen=True)
class RecipeGrid:
    """A recipe as the merge engine resolves it, cell by cell."""

    method: str
    rows: tuple[str, ...]
    """``"0"``, ``"1"``, ... per layer, then ``"outside"`` when tensors lie outside the layers."""
    kinds: tuple[str, ...]
    panels: tuple[RecipePanel, ...]

    def panel(self, parameter: str, source: str | None = None) -> RecipePanel:
        for panel in self.panels:
            if panel.parameter == parameter and panel.source == source:
                return panel
        raise KeyError((parameter, source))


def recipe_grid(plan: MergePlan, recipe: Recipe) -> RecipeGrid:
    """The per-tensor parameters of a resolved plan, averaged per layer and tensor kind.

    One panel per numeric parameter the recipe sets (per source for a per-source parameter);
    a recipe that sets none shows every numeric parameter with its default. With per-layer
    methods (``layer_methods``) the parameters of all of them are shown; a cell whose method
    does not take a parameter is empty (NaN).
    """
    import numpy as np

    from evomerge.merge.registry import get_method
    from evomerge.merge.tensors import layer_index, tensor_kind

    numeric = []  # of every method the plan uses (layer_methods), each name once
    for name in plan.methods_used():
        numeric += [
            p
            for p in get_method(name).params
            if p.kind in (int, float) and p.name not in {q.name for q in numeric}
        ]
    mentioned = set(recipe.parameters)
    for source in recipe.sources:
        mentioned |= set(source.parameters)
    shown = [p for p in numeric if p.name in mentioned] or numeric
    first = 1 if recipe.base is not None else 0
    labels = plan.labels[first : first + len(recipe.sources)]
    jobs = [job for job in plan.jobs if job.sources]
    layers = sorted({i for job in jobs if (i := layer_index(job.name)) is not None})
    rows = [str(i) for i in range(layers[-1] + 1)] if layers else []
    if any(layer_index(job.name) is None for job in jobs):
        rows.append(OUTSIDE)
    present = {tensor_kind(job.name) for job in jobs}
    kinds = [k for k in KIND_ORDER if k in present]
    cells: dict[tuple[str, str | None], dict[tuple[int, int], list[float]]] = {}
    for job in jobs:
        index = layer_index(job.name)
        cell = (
            rows.index(OUTSIDE if index is None else str(index)),
            kinds.index(tensor_kind(job.name)),
        )
        shared, per_source = job.shared_dict(), job.per_source_dicts()
        for spec in shown:
            if spec.scope == "shared":
                owners: list[tuple[str | None, Any]] = [(None, shared.get(spec.name))]
            else:
                owners = [
                    (label, params.get(spec.name)) for label, params in zip(labels, per_source)
                ]
            for owner, value in owners:
                number = math.nan if value is None else float(value)
                cells.setdefault((spec.name, owner), {}).setdefault(cell, []).append(number)
    panels = []
    for spec in shown:
        owners_order: list[str | None] = [None] if spec.scope == "shared" else list(labels)
        for owner in owners_order:
            values = np.full((len(rows), len(kinds)), np.nan)
            varies = np.zeros((len(rows), len(kinds)), dtype=bool)
            for (r, c), numbers in cells.get((spec.name, owner), {}).items():
                values[r, c] = math.fsum(numbers) / len(numbers)
                varies[r, c] = max(numbers) - min(numbers) > 1e-12
            panels.append(RecipePanel(spec.name, owner, values, varies))
    return RecipeGrid(plan.describe_methods(), tuple(rows), tuple(kinds), tuple(panels))


@dataclass
class _Layout:
    """What :func:`~evomerge.merge.recipe.plan_recipe` reads of a model folder: its tensor
    names and dtypes, its layer count, a label and a path. No file is opened."""

    path: Path
    label: str
    tensors: dict[str, Any]
    num_layers: int | None
    config: dict[str, Any] = field(default_factory=dict)


def recipe_matrix(recipe: Recipe, tensor_names: Sequence[str], num_layers: int) -> RecipeGrid:
    """:func:`recipe_grid` for a model with these (floating-point) tensors and layers,
    resolved by :func:`~evomerge.merge.recipe.plan_recipe` exactly as for a merge."""
    from types import SimpleNamespace

    import torch

    from evomerge.merge.recipe import plan_recipe

    tensors = {name: SimpleNamespace(dtype=torch.float32) for name in tensor_names}

    def layout(path: str, label: str) -> _Layout:
        return _Layout(Path(path), label, tensors, num_layers)

    models = [layout(recipe.base, "base")] if recipe.base is not None else []
    seen = {"base"}
    for index, source in enumerate(recipe.sources):
        label = source.label or Path(source.model).name
        label = f"{label}#{index}" if label in seen else label
        seen.add(label)
        models.append(layout(source.model, label))
    aux = {index: layout(f"aux{index}", f"aux {index}") for index in range(len(recipe.sources))}
    plan = plan_recipe(recipe, models, aux)  # type: ignore[arg-type]
    return recipe_grid(plan, recipe)


def trial_recipe_grid(trial: TrialView, study: str) -> RecipeGrid:
    """The grid of a stored trial's recipe, on the tensors of its first model's folder."""
    from evomerge.checkpoint import ModelFolder
    from evomerge.study.read import trial_recipe

    recipe = trial_recipe(trial, study)
    first = recipe.base if recipe.base is not None else recipe.sources[0].model
    folder = ModelFolder(first, label="base")
    names = [n for n, info in folder.tensors.items() if info.dtype.is_floating_point]
    return recipe_matrix(recipe, names, folder.num_layers or 1)


def recipe_title(study: str, trial: TrialView) -> str:
    """The heatmap's title for a study's trial: ``study: trial N (label)``."""
    return f"{study}: trial {trial.number} ({trial.label})"


# -- the drawing -----------------------------------------------------------------------------------


def recipe_figure(grid: RecipeGrid, title: str) -> Figure:
    """One row of heatmaps per parameter (a panel per source), one colour bar per row."""
    import numpy as np

    if not grid.panels:
        raise ConfigError(f"{title}: method {grid.method} has no numeric parameter to draw")
    by_parameter: dict[str, list[RecipePanel]] = {}
    for panel in grid.panels:
        by_parameter.setdefault(panel.parameter, []).append(panel)
    constant = {name: _constant(panels) for name, panels in by_parameter.items()}
    if any(value is None for value in constant.values()):  # the varying ones get the room
        for name, value in constant.items():
            if value is not None:
                del by_parameter[name]
    fixed = [f"{name} = {value:g}" for name, value in constant.items() if name not in by_parameter]
    columns = max(len(p) for p in by_parameter.values())
    rows, kinds = len(grid.rows), len(grid.kinds)
    cell_w = 0.85 if rows <= ANNOTATE_ROWS else 0.5
    cell_h = 0.36 if rows <= 16 else 0.22
    width = max(6.5, columns * (kinds * cell_w + 1.1) + 1.3)
    height = max(4.5, len(by_parameter) * (rows * cell_h + 1.3) + 0.8)
    figure = new_figure(width, height)
    grid_axes = figure.subplots(len(by_parameter), columns, squeeze=False)
    starred = False
    for row, (parameter, panels) in enumerate(by_parameter.items()):
        stack = np.stack([p.values for p in panels])
        finite = stack[np.isfinite(stack)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        if high - low < 1e-9:
            low, high = low - 0.5, high + 0.5
        image = None
        for col in range(columns):
            axes = grid_axes[row][col]
            if col >= len(panels):
                axes.set_axis_off()
                continue
            panel = panels[col]
            image = _draw_heatmap(axes, grid, panel, low, high)
            starred = starred or bool(panel.varies.any())
            who = f" of {panel.source}" if panel.source is not None else ""
            axes.set_title(f"{parameter}{who}", fontsize="medium")
            if col == 0:
                axes.set_ylabel("layer")
        if image is not None:
            bar = figure.colorbar(image, ax=list(grid_axes[row][: len(panels)]), shrink=0.9)
            bar.set_label(parameter)
    lines = [f"{title}: {grid.method}" + (f"; everywhere {', '.join(fixed)}" if fixed else "")]
    if starred:
        lines.append("* the tensors of this layer and kind differ; their mean is shown")
    figure.suptitle("\n".join(lines), fontsize="medium")
    return figure


def _constant(panels: Sequence[RecipePanel]) -> float | None:
    """The one value every cell of these panels holds, or None."""
    import numpy as np

    values = np.concatenate([p.values[np.isfinite(p.values)] for p in panels])
    if values.size and float(values.max() - values.min()) <= 1e-12:
        return float(values[0])
    return None


def _draw_heatmap(axes: Axes, grid: RecipeGrid, panel: RecipePanel, low: float, high: float) -> Any:
    import numpy as np
    from matplotlib import colormaps

    cmap = colormaps["viridis"].with_extremes(bad="0.92")
    values = np.ma.masked_invalid(panel.values)
    image = axes.imshow(values, cmap=cmap, vmin=low, vmax=high, aspect="auto")
    axes.set_xticks(range(len(grid.kinds)), grid.kinds, rotation=30, ha="right", fontsize=8)
    step = max(1, len(grid.rows) // 24)
    ticks = [i for i in range(len(grid.rows)) if i % step == 0 or grid.rows[i] == OUTSIDE]
    names = ["outside\nlayers" if row == OUTSIDE else row for row in grid.rows]
    axes.set_yticks(ticks, [names[i] for i in ticks], fontsize=8)
    axes.tick_params(length=0)
    if len(grid.rows) <= ANNOTATE_ROWS:
        size = 8 if len(grid.rows) <= 16 else 6
        for (r, c), value in np.ndenumerate(panel.values):
            if not math.isfinite(value):
                continue
            shade = cmap((value - low) / (high - low))
            light = 0.299 * shade[0] + 0.587 * shade[1] + 0.114 * shade[2] > 0.5
            text = f"{value:.2f}" + ("*" if panel.varies[r, c] else "")
            axes.text(
                c,
                r,
                text,
                ha="center",
                va="center",
                fontsize=size,
                color="black" if light else "white",
            )
    if OUTSIDE in grid.rows:
        axes.axhline(len(grid.rows) - 1.5, color="white", linewidth=2)
    return image
