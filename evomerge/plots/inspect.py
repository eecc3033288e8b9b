"""``evomerge inspect``'s figures: heatmaps of task-vector statistics per layer (cosine per
source pair, sign-conflict rate per tensor kind, norm balance per source) and the interpolation
scans. Each figure is a data function (a :class:`Grid` or the scans, read off an inspection
report) and a drawing function."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from evomerge.plots.png import new_figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass(frozen=True)
class Grid:
    """A heatmap: ``values[row][column]`` (None where there is no number)."""

    title: str
    rows: list[str]
    columns: list[str]
    values: list[list[float | None]]
    label: str
    vmin: float
    vmax: float
    cmap: str


def cosine_grid(report: Mapping[str, Any]) -> Grid | None:
    """Layers by source pair: cosine of the task vectors (None with one source)."""
    pairs = list(report["overall"]["cosine"])
    if not pairs:
        return None
    rows = [*report["layers"], "all"]
    stats = [*report["layers"].values(), report["overall"]]
    return Grid(
        "Task-vector cosine per layer",
        rows,
        [pair.replace("|", " / ") for pair in pairs],
        [[s["cosine"][pair] for pair in pairs] for s in stats],
        "cosine",
        -1.0,
        1.0,
        "RdBu_r",
    )


def conflict_grid(report: Mapping[str, Any]) -> Grid | None:
    """Layers by tensor kind: the sign-conflict rate (None with one source)."""
    if len(report["sources"]) < 2:
        return None
    kinds = sorted({kind for kinds in report["layer_kinds"].values() for kind in kinds})
    rows = list(report["layer_kinds"])
    values = [
        [report["layer_kinds"][row].get(kind, {}).get("conflict_rate") for kind in kinds]
        for row in rows
    ]
    present = [v for row in values for v in row if v is not None]
    return Grid(
        "Sign-conflict rate per layer and kind",
        rows,
        kinds,
        values,
        "conflict rate",
        0.0,
        max([0.5, *present]),
        "magma_r",
    )


def balance_grid(report: Mapping[str, Any]) -> Grid:
    """Layers by source: the task-vector norm over the mean norm of the sources."""
    labels = report["sources"]
    rows = [*report["layers"], "all"]
    stats = [*report["layers"].values(), report["overall"]]
    values = [[s["balance"][label] for label in labels] for s in stats]
    present = [abs(v - 1) for row in values for v in row if v is not None]
    spread = max([0.1, *present])
    return Grid(
        "Task-vector norm / mean norm of the sources",
        rows,
        list(labels),
        values,
        "norm balance",
        1 - spread,
        1 + spread,
        "PuOr_r",
    )


def grid_figure(grid: Grid) -> Figure:
    """Draw a :class:`Grid` with each cell's number written in it."""
    import numpy as np

    figure = new_figure(1.6 + 1.3 * len(grid.columns), 1.4 + 0.35 * len(grid.rows))
    axes = figure.add_subplot()
    data = np.array([[np.nan if v is None else v for v in row] for row in grid.values], float)
    image = axes.imshow(
        data, cmap=grid.cmap, vmin=grid.vmin, vmax=grid.vmax, aspect="auto", interpolation="none"
    )
    axes.set_xticks(range(len(grid.columns)), grid.columns, rotation=20, ha="right")
    axes.set_yticks(range(len(grid.rows)), grid.rows)
    axes.set_ylabel("layer")
    axes.set_title(grid.title, fontsize=10)
    middle = (grid.vmin + grid.vmax) / 2
    span = grid.vmax - grid.vmin
    for r, row in enumerate(grid.values):
        for c, value in enumerate(row):
            if value is None:
                continue
            dark = abs(value - middle) > 0.3 * span
            axes.text(
                c, r, f"{value:.2f}", ha="center", va="center", fontsize=7,
                color="white" if dark else "black",
            )  # fmt: skip
    figure.colorbar(image, ax=axes, label=grid.label)
    return figure


def scan_figure(scans: Sequence[Mapping[str, Any]], metric: str) -> Figure:
    """The interpolation scans: metric against t, one line per path, its chord dashed."""
    figure = new_figure(6.0, 3.8)
    axes = figure.add_subplot()
    for index, scan in enumerate(scans):
        color = f"C{index % 10}"
        label = f"{scan['from']} → {scan['to']} (barrier {scan['barrier']:.3g})"
        axes.plot(scan["t"], scan["values"], marker="o", color=color, label=label)
        axes.plot(
            [scan["t"][0], scan["t"][-1]],
            [scan["values"][0], scan["values"][-1]],
            linestyle="--",
            linewidth=0.8,
            color=color,
        )
    axes.set_xlabel("t (0 = start, 1 = end)")
    axes.set_ylabel(metric)
    axes.set_title("Interpolation scans (dashed: straight line between the ends)", fontsize=10)
    axes.legend(fontsize=7)
    axes.grid(alpha=0.3)
    return figure
