"""Pictures of a study: ``evomerge pareto --plot``, ``evomerge plot history`` and ``evomerge plot
recipe``, and the three images an export puts beside its model card.

- The Pareto plot: every complete trial, the front (numbered as in ``evomerge pareto``), the
  source models and the uniform merges. With one objective it is the history against the trial
  number; with three or more, the pairwise scatter plots.
- The history: the best value so far against the trial number and against time of search, for
  the weighted sum of the objectives (what ``--trial best`` picks) and for each objective.
  Time runs from the first trial's creation to each trial's end (in seconds, minutes or hours,
  whichever reads best); a stretch with no trial finishing that is far longer than the study's
  trials take (a stopped and resumed study) is cut out of the axis and marked where it was,
  with its length.
- The recipe: a heatmap per method parameter and source, layers by tensor kind, of the values
  the merge engine uses. The values come from :func:`~evomerge.merge.recipe.plan_recipe`, the
  same resolution the engine merges by; a cell averages the tensors of its layer and kind, and
  is starred where they differ.

Source models and uniform merges are tagged ``S1``, ``U1``, ... beside their markers and named
in the legend, so that baselines close together stay readable. Everything is drawn on
matplotlib's Agg canvas (no display, no pyplot state) and written beside the target first, then
moved into place: a failed plot never leaves a partial PNG.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.errors import ConfigError
from evomerge.optimize import Objective, scalarize

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from evomerge.merge.plan import MergePlan
    from evomerge.merge.recipe import Recipe
    from evomerge.study.store import StudyStore, TrialView

ROLE_STYLE = {
    "source": {"marker": "s", "color": "tab:blue", "name": "source model", "tag": "S"},
    "uniform": {"marker": "D", "color": "tab:green", "name": "uniform merge", "tag": "U"},
}
FRONT_COLOR = "tab:red"
HIGHLIGHT_COLOR = "black"
LABELLED_FRONT = 15
"""Front points are numbered (their ``pareto:K``) when the front has at most this many."""
WEIGHTED = "weighted"
"""``--objective weighted``: the weighted sum of the objectives only."""
GAP_SECONDS = 900.0
"""A stretch with no trial finishing is cut from the hours axis only when it is longer than
this, than ten typical intervals between finishing trials, and than three of the longest
trial's merge and evaluation."""
KIND_ORDER = ("attention", "mlp", "norm", "embedding", "head", "other")
OUTSIDE = "outside"
"""The heatmap row of the tensors outside the layers (embeddings, final norm, head)."""
ANNOTATE_ROWS = 48
"""Heatmap cells show their values when a panel has at most this many rows."""
DPI = 100


# -- the command line ------------------------------------------------------------------------------


def add_commands(commands: Any) -> None:
    """Register ``plot history`` and ``plot recipe`` on the CLI's sub-parsers."""
    plot = commands.add_parser(
        "plot",
        help="draw a study's history or a trial's recipe to a PNG",
        description="Draw pictures of a study (the Pareto front is 'evomerge pareto --plot').",
    )
    kinds = plot.add_subparsers(dest="plot", required=True, metavar="PLOT")
    history = kinds.add_parser(
        "history",
        help="best so far against trials and hours",
        description="The best value so far against the trial number and against hours of "
        "search: for the weighted sum of the objectives and for each objective. Trials are "
        "light points; source models and uniform merges are marked. Idle stretches of a "
        "resumed study are cut from the hours axis and marked.",
    )
    _common(history)
    history.add_argument(
        "--objective",
        metavar="METRIC",
        help=f"only this objective's metric, or '{WEIGHTED}' for the weighted sum only "
        "(default: both)",
    )
    history.set_defaults(handler=cmd_plot_history)
    recipe = kinds.add_parser(
        "recipe",
        help="a heatmap of one trial's merge coefficients",
        description="A heatmap of one trial's recipe as the merge engine resolves it: layers "
        "by tensor kind, one panel per method parameter and source.",
    )
    _common(recipe)
    recipe.add_argument(
        "--trial",
        required=True,
        help="best (highest weighted objectives), a trial number, or pareto:K (row K of "
        "`evomerge pareto`)",
    )
    recipe.set_defaults(handler=cmd_plot_recipe)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--storage", required=True, help="database URL or SQLite file")
    parser.add_argument("--study", required=True, help="study name")
    parser.add_argument("--out", type=Path, required=True, metavar="FILE.png", help="the PNG")


def cmd_plot_history(args: argparse.Namespace) -> int:
    from evomerge.study.export import study_objectives
    from evomerge.study.report import open_store

    out = check_png_path(args.out, "--out")
    store = open_store(args.storage)
    objectives = study_objectives(store, args.study)
    trials = store.trials(args.study)
    figure = history_figure(args.study, trials, objectives, args.objective)
    save_png(figure, out, "--out")
    print(f"plot written to {out}")
    return 0


def cmd_plot_recipe(args: argparse.Namespace) -> int:
    from evomerge.study.export import select_trial
    from evomerge.study.report import open_store

    out = check_png_path(args.out, "--out")
    store = open_store(args.storage)
    trial = select_trial(store, args.study, args.trial)
    grid = trial_recipe_grid(trial, args.study)
    save_png(recipe_figure(grid, _recipe_title(args.study, trial)), out, "--out")
    print(f"plot written to {out}")
    return 0


def check_png_path(path: Path, what: str = "--plot") -> Path:
    """The plot file, refused unless it ends in .png and its folder exists."""
    path = path.expanduser()
    if path.suffix.lower() != ".png":
        raise ConfigError(f"{what} {path}: the plot is a PNG; give a file name ending in .png")
    if not path.parent.is_dir():
        raise ConfigError(f"{what} {path}: folder {path.parent} does not exist")
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a folder; give a file name ending in .png")
    return path


def save_png(figure: Figure, path: Path, what: str = "--plot") -> None:
    """Write the PNG beside ``path`` first, then move it into place: never a partial file."""
    try:
        write_png(figure, path)
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot write ({exc.strerror or exc})") from None


def write_png(figure: Figure, path: Path) -> None:
    """:func:`save_png` without the message: an OSError is the caller's."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with temporary.open("xb") as handle:
            figure.savefig(handle, format="png", dpi=DPI)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)  # Agg: no display needed, and pyplot's global state is untouched
    return figure


def _axis_name(objective: Objective) -> str:
    return f"{objective.metric} ({objective.direction})"


def _complete(trials: Iterable[TrialView], objectives: Sequence[Objective]) -> list[TrialView]:
    return [t for t in trials if t.state == "COMPLETE" and t.values(objectives) is not None]


# -- baselines: tags and their placement -----------------------------------------------------------


def baseline_tags(trials: Iterable[TrialView]) -> dict[int, str]:
    """``{trial number: "S1"}`` for the source models, ``"U1"`` ... for the uniform merges,
    numbered in trial order."""
    tags: dict[int, str] = {}
    for role, style in ROLE_STYLE.items():
        chosen = sorted((t for t in trials if t.role == role), key=lambda t: t.number)
        for index, trial in enumerate(chosen, start=1):
            tags[trial.number] = f"{style['tag']}{index}"
    return tags


def _draw_baselines(
    axes: Axes,
    trials: Sequence[TrialView],
    point: Callable[[TrialView], tuple[float, float]],
    tags: Mapping[int, str],
    named: bool,
) -> list[_Tag]:
    """Source models and uniform merges, one legend entry each (``S1  ft_a``) when ``named``;
    returns their tags for :func:`_place_tags`."""
    placed: list[_Tag] = []
    for role, style in ROLE_STYLE.items():
        chosen = [t for t in trials if t.role == role]
        for trial in chosen:
            axes.scatter(
                *point(trial),
                s=60,
                marker=style["marker"],
                color=style["color"],
                edgecolors="black",
                linewidths=0.6,
                label=f"{tags[trial.number]}  {trial.label}" if named else None,
                zorder=5,
            )
            placed.append(_Tag(point(trial), tags[trial.number], style["color"]))
    return placed


@dataclass(frozen=True)
class _Tag:
    at: tuple[float, float]
    """Data coordinates of the point the tag names."""
    text: str
    color: str


DIRECTIONS = ((1, 1), (1, 0), (1, -1), (0, -1), (-1, -1), (-1, 0), (-1, 1), (0, 1))
PAD = 3.0
"""Pixels kept free around a tag."""
RADII = (4.0, 11.0, 20.0, 32.0, 46.0)
"""Tag offsets tried, in points, nearest first; from the third a thin line joins tag and point."""


def _place_tags(
    axes: Axes,
    tags: Sequence[_Tag],
    points: Sequence[tuple[float, float]],
    lay_out: bool = True,
) -> None:
    """Put each tag beside its point where it overlaps no tag placed before it, no marker and
    stays inside the axes; the nearest such place wins, else the least crowded one. Tags take
    no part in the layout, so ``lay_out`` is needed once per figure, before the first axes."""
    figure = axes.figure
    if lay_out:
        figure.draw_without_rendering()  # the transforms below are final from here on
    if not tags:
        return
    renderer = figure.canvas.get_renderer()  # type: ignore[attr-defined]
    to_pixels = axes.transData.transform
    frame = axes.get_window_extent(renderer)
    markers = [tuple(to_pixels(p)) for p in points]
    taken: list[tuple[float, float, float, float]] = []
    scale = figure.dpi / 72.0
    for tag in tags:
        probe = axes.text(0, 0, tag.text, fontsize=8, fontweight="bold")
        extent = probe.get_window_extent(renderer)
        probe.remove()
        width, height = extent.width, extent.height
        px, py = to_pixels(tag.at)
        best: tuple[float, tuple[int, int], float, tuple[float, float, float, float]] | None = None
        for radius in RADII:
            for dx, dy in DIRECTIONS:
                ox, oy = dx * radius * scale, dy * radius * scale
                left = px + ox - (0 if dx > 0 else width if dx < 0 else width / 2)
                bottom = py + oy - (0 if dy > 0 else height if dy < 0 else height / 2)
                box = (left, bottom, left + width, bottom + height)
                cost = radius / 100.0
                inside = (
                    box[0] >= frame.x0
                    and box[2] <= frame.x1
                    and box[1] >= frame.y0
                    and box[3] <= frame.y1
                )
                cost += 0 if inside else 1e6
                padded = (box[0] - PAD, box[1] - PAD, box[2] + PAD, box[3] + PAD)
                cost += sum(1000.0 * _overlap(padded, other) for other in taken)
                cost += sum(
                    50.0 * _overlap(box, (mx - 6, my - 6, mx + 6, my + 6))
                    for mx, my in markers
                    if (mx, my) != (px, py)
                )
                if best is None or cost < best[0]:
                    best = (cost, (dx, dy), radius, box)
            if best is not None and best[0] < 1.0:
                break
        assert best is not None
        _, (dx, dy), radius, box = best
        taken.append(box)
        note = axes.annotate(
            tag.text,
            tag.at,
            xytext=(dx * radius, dy * radius),
            textcoords="offset points",
            ha="left" if dx > 0 else "right" if dx < 0 else "center",
            va="bottom" if dy > 0 else "top" if dy < 0 else "center",
            fontsize=8,
            fontweight="bold",
            color=tag.color,
            zorder=7,
            arrowprops=(
                {"arrowstyle": "-", "color": tag.color, "linewidth": 0.6, "shrinkB": 4}
                if radius >= RADII[2]
                else None
            ),
        )
        note.set_in_layout(False)


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """The area two boxes (x0, y0, x1, y1) share, as a fraction of the first."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    return width * height / max((a[2] - a[0]) * (a[3] - a[1]), 1e-9)


# -- the Pareto front ------------------------------------------------------------------------------


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
    if not front:
        raise ConfigError(f"study '{study}' has no complete trial with all objectives; no plot")
    complete = _complete(trials, objectives)
    if len(objectives) == 1:
        figure = _new_figure(9.0, 5.0)
        axes = figure.add_subplot()
        series = history_series(trials, objectives, objectives[0].metric)[0]
        tags = _draw_by_number(axes, series, baseline_tags(trials), highlight, named=True)
        axes.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small")
        _place_tags(axes, tags, _axes_points(series))
    elif len(objectives) == 2:
        figure = _new_figure(9.0, 6.0)
        axes = figure.add_subplot()
        tags = _draw_pair(
            axes, complete, front, objectives, (0, 1), baseline_tags(trials), highlight, True
        )
        axes.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small")
        _place_tags(axes, tags, [_pair_point(t, objectives, (0, 1)) for t in complete])
    else:
        figure = _plot_grid(complete, front, objectives, baseline_tags(trials), highlight)
    failed = sum(t.state == "FAILED" for t in trials)
    figure.suptitle(
        f"{study}: {len(trials)} trials, {len(complete)} complete, {failed} failed, "
        f"{len(front)} on the Pareto front"
    )
    return figure


def _pair_point(
    trial: TrialView, objectives: Sequence[Objective], pair: tuple[int, int]
) -> tuple[float, float]:
    return trial.metrics[objectives[pair[0]].metric], trial.metrics[objectives[pair[1]].metric]


def _plot_grid(
    complete: Sequence[TrialView],
    front: Sequence[TrialView],
    objectives: Sequence[Objective],
    names: Mapping[int, str],
    highlight: int | None,
) -> Figure:
    """Three or more objectives: the lower triangle of pairwise scatter plots."""
    size = len(objectives) - 1
    figure = _new_figure(max(9.0, 3.8 * size + 2), max(7.0, 3.3 * size))
    grid = figure.subplots(size, size, squeeze=False)
    placements = []
    for row in range(size):
        for col in range(size):
            axes = grid[row][col]
            if col > row:
                axes.set_axis_off()
                continue
            pair = (col, row + 1)
            named = (row, col) == (size - 1, 0)
            tags = _draw_pair(axes, complete, front, objectives, pair, names, highlight, named)
            placements.append((axes, tags, [_pair_point(t, objectives, pair) for t in complete]))
    handles, names = grid[-1][0].get_legend_handles_labels()
    figure.legend(handles, names, loc="outside right upper", fontsize="small")
    for index, (axes, tags, points) in enumerate(placements):
        _place_tags(axes, tags, points, lay_out=index == 0)
    return figure


def _draw_pair(
    axes: Axes,
    complete: Sequence[TrialView],
    front: Sequence[TrialView],
    objectives: Sequence[Objective],
    pair: tuple[int, int],
    baseline_names: Mapping[int, str],
    highlight: int | None,
    named: bool,
) -> list[_Tag]:
    """Objective ``pair[0]`` (x) against ``pair[1]`` (y): trials light, front highlighted;
    returns the tags to place once the figure is laid out."""
    x_obj, y_obj = objectives[pair[0]], objectives[pair[1]]

    def point(trial: TrialView) -> tuple[float, float]:
        return _pair_point(trial, objectives, pair)

    proposals = [point(t) for t in complete if t.role not in ROLE_STYLE]
    if proposals:
        axes.scatter(*zip(*proposals), s=14, color="0.7", label="trial", zorder=2)
    if len(objectives) == 2:
        stairs = staircase([point(t) for t in front], (x_obj.sign, y_obj.sign))
        axes.plot(*zip(*stairs), color=FRONT_COLOR, linewidth=1.2, zorder=3)
    axes.scatter(
        *zip(*(point(t) for t in front)),
        s=46,
        color=FRONT_COLOR,
        edgecolors="black",
        linewidths=0.6,
        label="Pareto front (#k: pareto:k)" if len(front) <= LABELLED_FRONT else "Pareto front",
        zorder=4,
    )
    tags = _draw_baselines(axes, complete, point, baseline_names, named)
    on_front = [point(t) for t in front if t.role in ROLE_STYLE]
    if on_front:  # a ring, so a source or uniform merge on the front shows as such
        axes.scatter(
            *zip(*on_front),
            s=150,
            facecolors="none",
            edgecolors=FRONT_COLOR,
            linewidths=1.5,
            zorder=6,
        )
    _draw_highlight(axes, [point(t) for t in complete if t.number == highlight], highlight)
    if len(front) <= LABELLED_FRONT:
        tags += [_Tag(point(t), f"#{rank}", FRONT_COLOR) for rank, t in enumerate(front, start=1)]
    axes.set_xlabel(_axis_name(x_obj))
    axes.set_ylabel(_axis_name(y_obj))
    axes.grid(alpha=0.3)
    return tags


def _draw_highlight(axes: Axes, points: Sequence[tuple[float, float]], number: int | None) -> None:
    if points:
        axes.scatter(
            *zip(*points),
            s=320,
            marker="*",
            facecolors="none",
            edgecolors=HIGHLIGHT_COLOR,
            linewidths=1.2,
            label=f"this model (trial {number})",
            zorder=8,
        )


def staircase(
    points: Sequence[tuple[float, float]], signs: tuple[float, float]
) -> list[tuple[float, float]]:
    """The boundary of the region a 2-D front dominates, through its points.

    ``signs`` are the objectives' directions (+1 maximize, -1 minimize). Sorted so that x
    improves, consecutive points ``p, q`` are joined through the corner ``(p.x, q.y)``.
    """
    ordered = sorted(points, key=lambda p: (signs[0] * p[0], -signs[1] * p[1]))
    path: list[tuple[float, float]] = []
    for index, (x, y) in enumerate(ordered):
        if index:
            path.append((ordered[index - 1][0], y))
        path.append((x, y))
    return path


# -- history ---------------------------------------------------------------------------------------


def best_so_far(values: Sequence[float], sign: float) -> list[float]:
    """The running best of ``values`` in order (``sign`` +1: the highest, -1: the lowest)."""
    best: list[float] = []
    for value in values:
        better = not best or sign * value > sign * best[-1]
        best.append(value if better else best[-1])
    return best


@dataclass(frozen=True)
class Gap:
    """An idle stretch cut from the hours axis: where it was, and how long it lasted."""

    at_hours: float
    idle_hours: float


@dataclass(frozen=True)
class SearchClock:
    """Hours of search at each finished trial, idle stretches cut (see the module docstring)."""

    hours: dict[int, float]
    """Trial number -> hours at its end."""
    gaps: tuple[Gap, ...] = ()


def search_clock(trials: Sequence[TrialView], min_gap: float = GAP_SECONDS) -> SearchClock:
    """Hours from the first trial's creation to each trial's end, with idle stretches cut.

    Trials are ordered by their end. An interval between consecutive ends (or between the
    first creation and the first end) counts as idle when it is longer than ``min_gap``
    seconds, than ten times the median interval and than three times the longest trial's
    merge and evaluation; it is then replaced by the median interval and reported as a
    :class:`Gap`. A trial that was running when the study stopped keeps its creation time,
    so only the ends can show where the study was idle.
    """
    ends: list[tuple[datetime, TrialView]] = sorted(
        ((t.finished_at, t) for t in trials if t.finished_at is not None),
        key=lambda end: (end[0], end[1].number),
    )
    if not ends:
        return SearchClock({})
    created = [t.created_at for t in trials if t.created_at is not None]
    moments = [min([*created, ends[0][0]]), *(moment for moment, _ in ends)]
    steps = [(b - a).total_seconds() for a, b in itertools.pairwise(moments)]
    positive = [s for s in steps if s > 0]
    typical = statistics.median(positive) if positive else 0.0
    longest = max((_trial_seconds(t) for _, t in ends), default=0.0)
    threshold = max(min_gap, 10 * typical, 3 * longest)
    hours: dict[int, float] = {}
    gaps: list[Gap] = []
    clock = 0.0
    for (_, trial), step in zip(ends, steps):
        if step > threshold:
            gaps.append(Gap((clock + typical / 2) / 3600, step / 3600))
            step = typical
        clock += max(step, 0.0)
        hours[trial.number] = clock / 3600
    return SearchClock(hours, tuple(gaps))


def _trial_seconds(trial: TrialView) -> float:
    return math.fsum(
        s for s in (trial.load_seconds, trial.merge_seconds, trial.eval_seconds) if s is not None
    )


@dataclass(frozen=True)
class HistorySeries:
    """One quantity over a study: its value per complete trial and its best so far."""

    name: str
    """Axis label."""
    title: str
    sign: float
    trials: tuple[TrialView, ...]
    """Complete trials that have the quantity, by number."""
    values: tuple[float, ...]
    best_by_number: tuple[float, ...]
    by_time: tuple[tuple[float, float], ...]
    """(hours, best so far) in order of the trials' ends (trials without an end left out)."""
    clock: SearchClock = field(default_factory=lambda: SearchClock({}))


def history_series(
    trials: Sequence[TrialView], objectives: Sequence[Objective], only: str | None = None
) -> list[HistorySeries]:
    """The weighted sum (when there are several objectives) and each objective; ``only`` a
    metric or ``"weighted"`` keeps that one."""
    metrics = [o.metric for o in objectives]
    if only is not None and only != WEIGHTED and only not in metrics:
        raise ConfigError(
            f"--objective {only}: not an objective of the study (its objectives: "
            f"{', '.join(metrics)}; or '{WEIGHTED}' for their weighted sum)"
        )
    if only == WEIGHTED and len(objectives) == 1:
        only = objectives[0].metric
    clock = search_clock(trials)
    chosen: list[HistorySeries] = []
    if len(objectives) > 1 and only in (None, WEIGHTED):
        pool = _complete(trials, objectives)
        chosen.append(
            _series(
                "weighted sum (maximize)",
                "weighted sum: " + _formula(objectives),
                1.0,
                pool,
                lambda t: scalarize(objectives, t.values(objectives) or []),
                clock,
            )
        )
    for objective in objectives:
        if only not in (None, objective.metric):
            continue
        pool = [t for t in trials if t.state == "COMPLETE" and objective.metric in t.metrics]
        chosen.append(
            _series(
                _axis_name(objective),
                objective.metric,
                objective.sign,
                pool,
                lambda t, m=objective.metric: t.metrics[m],  # type: ignore[misc]
                clock,
            )
        )
    return chosen


def _formula(objectives: Sequence[Objective]) -> str:
    text = ""
    for objective in objectives:
        weight = objective.weight * objective.sign
        sign = "-" if weight < 0 else "+"
        text += f" {sign} " if text else ("-" if weight < 0 else "")
        text += f"{abs(weight):g}·{objective.metric}"
    return text


def _series(
    name: str,
    title: str,
    sign: float,
    pool: Sequence[TrialView],
    value: Callable[[TrialView], float],
    clock: SearchClock,
) -> HistorySeries:
    ordered = sorted(pool, key=lambda t: t.number)
    values = [value(t) for t in ordered]
    timed = sorted(
        (clock.hours[t.number], t.number, v)
        for t, v in zip(ordered, values)
        if t.number in clock.hours
    )
    best_time = best_so_far([v for _, _, v in timed], sign)
    return HistorySeries(
        name=name,
        title=title,
        sign=sign,
        trials=tuple(ordered),
        values=tuple(values),
        best_by_number=tuple(best_so_far(values, sign)),
        by_time=tuple((h, b) for (h, _, _), b in zip(timed, best_time)),
        clock=clock,
    )


def history_figure(
    study: str,
    trials: Sequence[TrialView],
    objectives: Sequence[Objective],
    only: str | None = None,
    highlight: int | None = None,
) -> Figure:
    """Per series one row: best so far against the trial number (left) and hours (right)."""
    series = history_series(trials, objectives, only)
    if not any(s.trials for s in series):
        raise ConfigError(f"study '{study}' has no complete trial with a score yet; no plot")
    figure = _new_figure(11.5, 1.0 + 3.1 * len(series))
    grid = figure.subplots(len(series), 2, squeeze=False)
    names = baseline_tags(trials)
    placements = []
    for row, one in enumerate(series):
        left, right = grid[row]
        named = row == 0
        tags = _draw_by_number(left, one, names, highlight, named=named)
        _draw_by_time(right, one, highlight)
        if named:
            handles, labels = left.get_legend_handles_labels()
            right.legend(
                handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small"
            )
        placements.append((left, tags, _axes_points(one)))
        title = one.title
        if one.trials:
            top = _top(one)
            title += f"; best {one.values[one.trials.index(top)]:.4g} (trial {top.number})"
        left.set_title(title, fontsize="medium", loc="left")
    for index, (axes, tags, points) in enumerate(placements):
        _place_tags(axes, tags, points, lay_out=index == 0)
    failed = sum(t.state == "FAILED" for t in trials)
    complete = sum(t.state == "COMPLETE" for t in trials)
    figure.suptitle(
        f"{study}: best so far ({len(trials)} trials, {complete} complete, {failed} failed)"
    )
    return figure


def _axes_points(series: HistorySeries) -> list[tuple[float, float]]:
    return [(float(t.number), v) for t, v in zip(series.trials, series.values)]


def _draw_by_number(
    axes: Axes,
    series: HistorySeries,
    tags: Mapping[int, str],
    highlight: int | None,
    named: bool,
) -> list[_Tag]:
    """Each trial's value and the best so far against the trial number; returns the tags of
    the baselines, to place once the figure is laid out."""
    points = dict(zip((t.number for t in series.trials), series.values))
    proposals = [(t.number, points[t.number]) for t in series.trials if t.role not in ROLE_STYLE]
    if proposals:
        axes.scatter(*zip(*proposals), s=16, color="0.65", label="trial", zorder=2)
    placed = _draw_baselines(
        axes,
        [t for t in series.trials if t.number in tags],
        lambda t: (float(t.number), points[t.number]),
        tags,
        named,
    )
    _draw_baseline_level(axes, series, named)
    if series.trials:
        numbers = [t.number for t in series.trials]
        axes.step(
            numbers,
            series.best_by_number,
            where="post",
            color=FRONT_COLOR,
            label="best so far" if named else None,
            zorder=3,
        )
        top = _top(series)
        axes.scatter(
            [top.number],
            [points[top.number]],
            s=80,
            color=FRONT_COLOR,
            edgecolors="black",
            zorder=4,
            label="best trial" if named else None,
        )
    _draw_highlight(axes, [(float(n), v) for n, v in points.items() if n == highlight], highlight)
    axes.set_xlabel("trial number")
    axes.set_ylabel(series.name)
    axes.grid(alpha=0.3)
    return placed


def _top(series: HistorySeries) -> TrialView:
    """The best trial of the series (the lowest number among equals)."""
    index = max(range(len(series.values)), key=lambda i: (series.sign * series.values[i], -i))
    return series.trials[index]


def _draw_baseline_level(axes: Axes, series: HistorySeries, named: bool) -> None:
    """A dotted line at the best source or uniform merge: what the search has to beat."""
    baselines = [(v, t) for t, v in zip(series.trials, series.values) if t.role in ROLE_STYLE]
    if not baselines:
        return
    value, _ = max(baselines, key=lambda vt: series.sign * vt[0])
    axes.axhline(
        value,
        color="0.35",
        linestyle=":",
        linewidth=1.0,
        label="best baseline" if named else None,
        zorder=1,
    )


def _draw_by_time(axes: Axes, series: HistorySeries, highlight: int | None) -> None:
    """The best so far against time of search; idle stretches cut and marked."""
    hours = series.clock.hours
    unit, scale = _time_unit(max(hours.values(), default=0.0))
    timed = [
        (hours[t.number] * scale, v, t)
        for t, v in zip(series.trials, series.values)
        if t.number in hours
    ]
    proposals = [(h, v) for h, v, t in timed if t.role not in ROLE_STYLE]
    if proposals:
        axes.scatter(*zip(*proposals), s=16, color="0.65", zorder=2)
    for role, style in ROLE_STYLE.items():
        chosen = [(h, v) for h, v, t in timed if t.role == role]
        if chosen:
            axes.scatter(
                *zip(*chosen),
                s=50,
                marker=style["marker"],
                color=style["color"],
                edgecolors="black",
                linewidths=0.6,
                zorder=5,
            )
    _draw_baseline_level(axes, series, named=False)
    if series.by_time:
        axes.step(
            [h * scale for h, _ in series.by_time],
            [b for _, b in series.by_time],
            where="post",
            color=FRONT_COLOR,
            zorder=3,
        )
    _draw_highlight(axes, [(h, v) for h, v, t in timed if t.number == highlight], highlight)
    for index, gap in enumerate(series.clock.gaps):
        axes.axvline(gap.at_hours * scale, color="0.3", linestyle="--", linewidth=0.9, zorder=1)
        axes.annotate(
            f"{_hours_text(gap.idle_hours)} idle, cut",
            (gap.at_hours * scale, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(3, -3 - 10 * (index % 3)),
            textcoords="offset points",
            va="top",
            fontsize=7,
            color="0.3",
        ).set_in_layout(False)
    axes.set_xlabel(
        f"{unit} of search (idle stretches cut: dashed lines)"
        if series.clock.gaps
        else f"{unit} since the first trial was created"
    )
    axes.set_ylabel(series.name)
    axes.grid(alpha=0.3)


def _time_unit(longest_hours: float) -> tuple[str, float]:
    """The unit of the time axis, and hours -> that unit."""
    if longest_hours < 2 / 60:
        return "seconds", 3600.0
    if longest_hours < 2:
        return "minutes", 60.0
    return "hours", 1.0


def _hours_text(hours: float) -> str:
    if hours >= 1:
        return f"{hours:.1f} h"
    return f"{hours * 60:.0f} min" if hours >= 1 / 60 else f"{hours * 3600:.0f} s"


# -- the recipe ------------------------------------------------------------------------------------


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
    a recipe that sets none shows every numeric parameter with its default.
    """
    import numpy as np

    from evomerge.merge.registry import get_method
    from evomerge.merge.tensors import layer_index, tensor_kind

    method = get_method(plan.method)
    numeric = [p for p in method.params if p.kind in (int, float)]
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
    return RecipeGrid(plan.method, tuple(rows), tuple(kinds), tuple(panels))


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
    from evomerge.study.export import trial_recipe

    recipe = trial_recipe(trial, study)
    first = recipe.base if recipe.base is not None else recipe.sources[0].model
    folder = ModelFolder(first, label="base")
    names = [n for n, info in folder.tensors.items() if info.dtype.is_floating_point]
    return recipe_matrix(recipe, names, folder.num_layers or 1)


def _recipe_title(study: str, trial: TrialView) -> str:
    return f"{study}: trial {trial.number} ({trial.label})"


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
    figure = _new_figure(width, height)
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


# -- the images of an export -----------------------------------------------------------------------

IMAGES = (
    ("pareto.png", "The study's trials and its Pareto front; this model is starred."),
    ("history.png", "Best score so far against trials and hours of search."),
    ("recipe.png", "This model's merge coefficients by layer and tensor kind."),
)


def study_images(
    store: StudyStore,
    study: str,
    trial: TrialView,
    plan: MergePlan,
    recipe: Recipe,
    folder: Path,
) -> tuple[list[tuple[str, str]], list[str]]:
    """Draw the three images of an exported trial into ``folder`` (created).

    Returns ``(drawn, skipped)``: ``(path relative to the folder's parent, caption)`` per
    image written, and ``"name: why"`` per image that could not be drawn (a study without
    objectives, a plotting error): a picture is not worth failing an export. A failure to
    write (a full disk) is raised.
    """
    from evomerge.study.export import study_objectives

    trials = store.trials(study)

    def pareto() -> Figure:
        objectives = study_objectives(store, study)
        front = store.pareto(study, objectives)
        return pareto_figure(study, trials, front, objectives, trial.number)

    def history() -> Figure:
        return history_figure(study, trials, study_objectives(store, study), None, trial.number)

    def heatmap() -> Figure:
        return recipe_figure(recipe_grid(plan, recipe), _recipe_title(study, trial))

    folder.mkdir(parents=True, exist_ok=True)
    drawn: list[tuple[str, str]] = []
    skipped: list[str] = []
    for (name, caption), draw in zip(IMAGES, (pareto, history, heatmap)):
        try:
            figure = draw()
        except Exception as exc:  # reported; the export goes on
            lines = str(exc).strip().splitlines()
            skipped.append(f"{name}: {lines[0] if lines else type(exc).__name__}")
            continue
        write_png(figure, folder / name)
        drawn.append((f"{folder.name}/{name}", caption))
    if not drawn:
        folder.rmdir()
    return drawn, skipped
