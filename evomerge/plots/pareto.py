"""The Pareto plot: ``evomerge pareto --plot`` and an export's ``pareto.png``.

Every complete trial, the front (numbered as in ``evomerge pareto``), the source models and
the uniform merges. With one objective it is the history against the trial number; with three
or more, the lower triangle of pairwise scatter plots.

The data: :func:`pareto_data` (the points per objective pair, the front, the baselines); the
drawing: :func:`pareto_figure`; :func:`plot_pareto` writes it to a PNG.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from evomerge.errors import ConfigError
from evomerge.plots.history import (
    HistorySeries,
    axis_name,
    complete_trials,
    draw_by_number,
    history_series,
    series_points,
)
from evomerge.plots.labels import (
    FRONT_COLOR,
    ROLE_STYLE,
    Baseline,
    Point,
    Tag,
    baseline_tags,
    baselines,
    draw_baselines,
    draw_highlight,
    place_tags,
)
from evomerge.plots.png import new_figure, save_png

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from evomerge.optimize import Objective
    from evomerge.study.store import TrialView

LABELLED_FRONT = 15
"""Front points are numbered (their ``pareto:K``) when the front has at most this many."""


# -- the data --------------------------------------------------------------------------------------


def staircase(points: Sequence[Point], signs: tuple[float, float]) -> list[Point]:
    """The boundary of the region a 2-D front dominates, through its points.

    ``signs`` are the objectives' directions (+1 maximize, -1 minimize). Sorted so that x
    improves, consecutive points ``p, q`` are joined through the corner ``(p.x, q.y)``.
    """
    ordered = sorted(points, key=lambda p: (signs[0] * p[0], -signs[1] * p[1]))
    path: list[Point] = []
    for index, (x, y) in enumerate(ordered):
        if index:
            path.append((ordered[index - 1][0], y))
        path.append((x, y))
    return path


@dataclass(frozen=True)
class ParetoPair:
    """One scatter plot: objective ``pair[0]`` (x) against objective ``pair[1]`` (y)."""

    pair: tuple[int, int]
    x: Objective
    y: Objective
    points: tuple[Point, ...]
    """Every complete trial, in trial order: the markers the tags keep clear of."""
    proposals: tuple[Point, ...]
    """The complete trials that are not baselines."""
    front: tuple[Point, ...]
    """Ranked as in ``evomerge pareto`` (row K is ``pareto:K``)."""
    stairs: tuple[Point, ...]
    """The :func:`staircase` of the front with exactly two objectives, else empty."""
    baselines: tuple[Baseline, ...]
    on_front: tuple[Point, ...]
    """Baselines that are on the front."""
    highlight: tuple[Point, ...]
    """The highlighted trial, when it is complete."""


@dataclass(frozen=True)
class ParetoData:
    """What the Pareto plot shows."""

    study: str
    objectives: tuple[Objective, ...]
    trials: int
    complete: int
    """Complete trials with a value for every objective."""
    failed: int
    front: int
    """Trials on the front."""
    highlight: int | None
    pairs: tuple[ParetoPair, ...]
    """Two objectives: (0, 1); three or more: the lower triangle, row by row."""
    series: HistorySeries | None
    """One objective: its history (no pairs)."""
    tags: Mapping[int, str]
    """The baselines' tags (:func:`~evomerge.plots.labels.baseline_tags`)."""


def pareto_data(
    study: str,
    trials: Sequence[TrialView],
    front: Sequence[TrialView],
    objectives: Sequence[Objective],
    highlight: int | None = None,
) -> ParetoData:
    """The points of the Pareto plot; ``highlight`` is a trial number to ring (an export's)."""
    if not front:
        raise ConfigError(f"study '{study}' has no complete trial with all objectives; no plot")
    complete = complete_trials(trials, objectives)
    tags = baseline_tags(trials)
    series = None
    pairs: list[tuple[int, int]] = []
    if len(objectives) == 1:
        series = history_series(trials, objectives, objectives[0].metric)[0]
    else:
        size = len(objectives) - 1
        pairs = [(col, row + 1) for row in range(size) for col in range(row + 1)]
    return ParetoData(
        study=study,
        objectives=tuple(objectives),
        trials=len(trials),
        complete=len(complete),
        failed=sum(t.state == "FAILED" for t in trials),
        front=len(front),
        highlight=highlight,
        pairs=tuple(_pair(complete, front, objectives, p, tags, highlight) for p in pairs),
        series=series,
        tags=tags,
    )


def _pair(
    complete: Sequence[TrialView],
    front: Sequence[TrialView],
    objectives: Sequence[Objective],
    pair: tuple[int, int],
    tags: Mapping[int, str],
    highlight: int | None,
) -> ParetoPair:
    x_obj, y_obj = objectives[pair[0]], objectives[pair[1]]

    def point(trial: TrialView) -> Point:
        return trial.metrics[x_obj.metric], trial.metrics[y_obj.metric]

    ranked = tuple(point(t) for t in front)
    two = len(objectives) == 2
    return ParetoPair(
        pair=pair,
        x=x_obj,
        y=y_obj,
        points=tuple(point(t) for t in complete),
        proposals=tuple(point(t) for t in complete if t.role not in ROLE_STYLE),
        front=ranked,
        stairs=tuple(staircase(ranked, (x_obj.sign, y_obj.sign))) if two else (),
        baselines=baselines(complete, point, tags),
        on_front=tuple(point(t) for t in front if t.role in ROLE_STYLE),
        highlight=tuple(point(t) for t in complete if t.number == highlight),
    )


# -- the drawing -----------------------------------------------------------------------------------


def plot_pareto(
    path: Path,
    study: str,
    trials: Sequence[TrialView],
    front: Sequence[TrialView],
    objectives: Sequence[Objective],
) -> None:
    """Draw the complete trials and the front (ranked as in the table) to a PNG at ``path``."""
    save_png(pareto_figure(study, trials, front, objectives), path)


def pareto_figure(
    study: str,
    trials: Sequence[TrialView],
    front: Sequence[TrialView],
    objectives: Sequence[Objective],
    highlight: int | None = None,
) -> Figure:
    """The front among the trials; ``highlight`` rings one trial (an export's)."""
    return draw_pareto(pareto_data(study, trials, front, objectives, highlight))


def draw_pareto(data: ParetoData) -> Figure:
    """The figure of :func:`pareto_data`."""
    if data.series is not None:
        figure = new_figure(9.0, 5.0)
        axes = figure.add_subplot()
        tags = draw_by_number(axes, data.series, data.tags, data.highlight, named=True)
        axes.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small")
        place_tags(axes, tags, series_points(data.series))
    elif len(data.pairs) == 1:
        figure = new_figure(9.0, 6.0)
        axes = figure.add_subplot()
        (pair,) = data.pairs
        tags = _draw_pair(axes, pair, data.highlight, named=True)
        axes.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small")
        place_tags(axes, tags, pair.points)
    else:
        figure = _draw_grid(data)
    figure.suptitle(
        f"{data.study}: {data.trials} trials, {data.complete} complete, {data.failed} failed, "
        f"{data.front} on the Pareto front"
    )
    return figure


def _draw_grid(data: ParetoData) -> Figure:
    """Three or more objectives: the lower triangle of pairwise scatter plots."""
    size = len(data.objectives) - 1
    pairs = {p.pair: p for p in data.pairs}
    figure = new_figure(max(9.0, 3.8 * size + 2), max(7.0, 3.3 * size))
    grid = figure.subplots(size, size, squeeze=False)
    placements = []
    for row in range(size):
        for col in range(size):
            axes = grid[row][col]
            if col > row:
                axes.set_axis_off()
                continue
            pair = pairs[col, row + 1]
            named = (row, col) == (size - 1, 0)
            tags = _draw_pair(axes, pair, data.highlight, named)
            placements.append((axes, tags, pair.points))
    handles, names = grid[-1][0].get_legend_handles_labels()
    figure.legend(handles, names, loc="outside right upper", fontsize="small")
    for index, (axes, tags, points) in enumerate(placements):
        place_tags(axes, tags, points, lay_out=index == 0)
    return figure


def _draw_pair(axes: Axes, pair: ParetoPair, highlight: int | None, named: bool) -> list[Tag]:
    """One objective against another: trials light, front highlighted; returns the tags to
    place once the figure is laid out."""
    labelled = len(pair.front) <= LABELLED_FRONT
    if pair.proposals:
        axes.scatter(*zip(*pair.proposals), s=14, color="0.7", label="trial", zorder=2)
    if pair.stairs:
        axes.plot(*zip(*pair.stairs), color=FRONT_COLOR, linewidth=1.2, zorder=3)
    axes.scatter(
        *zip(*pair.front),
        s=46,
        color=FRONT_COLOR,
        edgecolors="black",
        linewidths=0.6,
        label="Pareto front (#k: pareto:k)" if labelled else "Pareto front",
        zorder=4,
    )
    tags = draw_baselines(axes, pair.baselines, named)
    if pair.on_front:  # a ring, so a source or uniform merge on the front shows as such
        axes.scatter(
            *zip(*pair.on_front),
            s=150,
            facecolors="none",
            edgecolors=FRONT_COLOR,
            linewidths=1.5,
            zorder=6,
        )
    draw_highlight(axes, pair.highlight, highlight)
    if labelled:
        tags += [Tag(p, f"#{rank}", FRONT_COLOR) for rank, p in enumerate(pair.front, start=1)]
    axes.set_xlabel(axis_name(pair.x))
    axes.set_ylabel(axis_name(pair.y))
    axes.grid(alpha=0.3)
    return tags
