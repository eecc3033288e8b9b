"""The history of a study: ``evomerge plot history`` and an export's ``history.png``.

The best value so far against the trial number and against time of search, for the weighted
sum of the objectives (what ``--trial best`` picks) and for each objective. Time runs from the
first trial's creation to each trial's end (in seconds, minutes or hours, whichever reads
best); a stretch with no trial finishing that is far longer than the study's trials take (a
stopped and resumed study) is cut out of the axis and marked where it was, with its length.

The data: :func:`history_series` (built on :func:`search_clock` and :func:`best_so_far`); the
drawing: :func:`history_figure`.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING

from evomerge.errors import ConfigError
from evomerge.plots.labels import (
    FRONT_COLOR,
    ROLE_STYLE,
    Point,
    Tag,
    baseline_tags,
    baselines,
    draw_baselines,
    draw_highlight,
    place_tags,
)
from evomerge.plots.png import new_figure

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from evomerge.optimize import Objective
    from evomerge.study.store import TrialView

WEIGHTED = "weighted"
"""``--objective weighted``: the weighted sum of the objectives only."""
GAP_SECONDS = 900.0
"""A stretch with no trial finishing is cut from the hours axis only when it is longer than
this, than ten typical intervals between finishing trials, and than three of the longest
trial's merge and evaluation."""


def axis_name(objective: Objective) -> str:
    """An objective's axis label: ``metric (direction)``."""
    return f"{objective.metric} ({objective.direction})"


def complete_trials(
    trials: Iterable[TrialView], objectives: Sequence[Objective]
) -> list[TrialView]:
    """The complete trials that have a value for every objective."""
    return [t for t in trials if t.state == "COMPLETE" and t.values(objectives) is not None]


# -- the data --------------------------------------------------------------------------------------


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
    cheap: tuple[tuple[int, float], ...] = ()
    """(trial number, value) of the trials scored only on a subset of the documents: drawn
    apart and labelled, never part of the best so far."""
    cheap_fidelities: tuple[str, ...] = ()


def _cheap_points(
    trials: Sequence[TrialView], value: Callable[[dict[str, float]], float | None]
) -> tuple[tuple[tuple[int, float], ...], tuple[str, ...]]:
    points, fidelities = [], set()
    for trial in trials:
        if trial.state != "COMPLETE" or trial.fidelity in (None, "full"):
            continue
        fidelity, metrics = trial.search_scores
        got = value(metrics)
        if got is not None and fidelity is not None:
            points.append((trial.number, got))
            fidelities.add(fidelity)
    return tuple(points), tuple(sorted(fidelities))


def history_series(
    trials: Sequence[TrialView], objectives: Sequence[Objective], only: str | None = None
) -> list[HistorySeries]:
    """The weighted sum (when there are several objectives) and each objective; ``only`` a
    metric or ``"weighted"`` keeps that one."""
    from evomerge.optimize import scalarize

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
        pool = complete_trials(trials, objectives)
        series = _series(
            "weighted sum (maximize)",
            "weighted sum: " + _formula(objectives),
            1.0,
            pool,
            lambda t: scalarize(objectives, t.values(objectives) or []),
            clock,
        )

        def weighted(metrics: dict[str, float]) -> float | None:
            if any(o.metric not in metrics for o in objectives):
                return None
            return scalarize(objectives, [metrics[o.metric] for o in objectives])

        cheap, fidelities = _cheap_points(trials, weighted)
        chosen.append(replace(series, cheap=cheap, cheap_fidelities=fidelities))
    for objective in objectives:
        if only not in (None, objective.metric):
            continue
        pool = [t for t in trials if t.state == "COMPLETE" and objective.metric in t.metrics]
        series = _series(
            axis_name(objective),
            objective.metric,
            objective.sign,
            pool,
            lambda t, m=objective.metric: t.metrics[m],  # type: ignore[misc]
            clock,
        )
        cheap, fidelities = _cheap_points(
            trials,
            lambda metrics, m=objective.metric: metrics.get(m),  # type: ignore[misc]
        )
        chosen.append(replace(series, cheap=cheap, cheap_fidelities=fidelities))
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


def series_points(series: HistorySeries) -> list[Point]:
    """(trial number, value) per trial of the series: the markers tags keep clear of."""
    return [(float(t.number), v) for t, v in zip(series.trials, series.values)]


def _top(series: HistorySeries) -> TrialView:
    """The best trial of the series (the lowest number among equals)."""
    index = max(range(len(series.values)), key=lambda i: (series.sign * series.values[i], -i))
    return series.trials[index]


# -- the drawing -----------------------------------------------------------------------------------


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
    figure = new_figure(11.5, 1.0 + 3.1 * len(series))
    grid = figure.subplots(len(series), 2, squeeze=False)
    names = baseline_tags(trials)
    placements = []
    for row, one in enumerate(series):
        left, right = grid[row]
        named = row == 0
        tags = draw_by_number(left, one, names, highlight, named=named)
        _draw_by_time(right, one, highlight)
        if named:
            handles, labels = left.get_legend_handles_labels()
            right.legend(
                handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small"
            )
        placements.append((left, tags, series_points(one)))
        title = one.title
        if one.trials:
            top = _top(one)
            title += f"; best {one.values[one.trials.index(top)]:.4g} (trial {top.number})"
        left.set_title(title, fontsize="medium", loc="left")
    for index, (axes, tags, points) in enumerate(placements):
        place_tags(axes, tags, points, lay_out=index == 0)
    failed = sum(t.state == "FAILED" for t in trials)
    complete = sum(t.state == "COMPLETE" for t in trials)
    figure.suptitle(
        f"{study}: best so far ({len(trials)} trials, {complete} complete, {failed} failed)"
    )
    return figure


def draw_by_number(
    axes: Axes,
    series: HistorySeries,
    tags: Mapping[int, str],
    highlight: int | None,
    named: bool,
) -> list[Tag]:
    """Each trial's value and the best so far against the trial number; returns the tags of
    the baselines, to place once the figure is laid out (:func:`place_tags`)."""
    points = dict(zip((t.number for t in series.trials), series.values))
    proposals = [(t.number, points[t.number]) for t in series.trials if t.role not in ROLE_STYLE]
    if proposals:
        axes.scatter(*zip(*proposals), s=16, color="0.65", label="trial", zorder=2)
    if series.cheap:
        axes.scatter(
            *zip(*series.cheap),
            s=14,
            facecolors="none",
            edgecolors="0.55",
            linewidths=0.8,
            label=f"cheap score ({', '.join(series.cheap_fidelities)}), not compared"
            if named
            else None,
            zorder=1,
        )
    placed = draw_baselines(
        axes,
        baselines(
            [t for t in series.trials if t.number in tags],
            lambda t: (float(t.number), points[t.number]),
            tags,
        ),
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
    draw_highlight(axes, [(float(n), v) for n, v in points.items() if n == highlight], highlight)
    axes.set_xlabel("trial number")
    axes.set_ylabel(series.name)
    axes.grid(alpha=0.3)
    return placed


def _draw_baseline_level(axes: Axes, series: HistorySeries, named: bool) -> None:
    """A dotted line at the best source or uniform merge: what the search has to beat."""
    levels = [(v, t) for t, v in zip(series.trials, series.values) if t.role in ROLE_STYLE]
    if not levels:
        return
    value, _ = max(levels, key=lambda vt: series.sign * vt[0])
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
    draw_highlight(axes, [(h, v) for h, v, t in timed if t.number == highlight], highlight)
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
