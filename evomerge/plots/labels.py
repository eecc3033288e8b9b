"""What the figures share: the baselines' markers and tags, the highlighted trial, and where
the tags go.

Source models and uniform merges are tagged ``S1``, ``U1``, ... beside their markers and named
in the legend, so that baselines close together stay readable. A tag goes where it overlaps no
other tag and no marker and stays inside its axes (:func:`place_tags`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from evomerge.study.store import TrialView

Point = tuple[float, float]
"""Data coordinates."""

ROLE_STYLE = {
    "source": {"marker": "s", "color": "tab:blue", "name": "source model", "tag": "S"},
    "uniform": {"marker": "D", "color": "tab:green", "name": "uniform merge", "tag": "U"},
}
FRONT_COLOR = "tab:red"
HIGHLIGHT_COLOR = "black"
DIRECTIONS = ((1, 1), (1, 0), (1, -1), (0, -1), (-1, -1), (-1, 0), (-1, 1), (0, 1))
PAD = 3.0
"""Pixels kept free around a tag."""
RADII = (4.0, 11.0, 20.0, 32.0, 46.0)
"""Tag offsets tried, in points, nearest first; from the third a thin line joins tag and point."""


# -- baselines -------------------------------------------------------------------------------------


def baseline_tags(trials: Iterable[TrialView]) -> dict[int, str]:
    """``{trial number: "S1"}`` for the source models, ``"U1"`` ... for the uniform merges,
    numbered in trial order."""
    tags: dict[int, str] = {}
    for role, style in ROLE_STYLE.items():
        chosen = sorted((t for t in trials if t.role == role), key=lambda t: t.number)
        for index, trial in enumerate(chosen, start=1):
            tags[trial.number] = f"{style['tag']}{index}"
    return tags


@dataclass(frozen=True)
class Baseline:
    """A source model or uniform merge where a figure draws it."""

    role: str
    """A key of :data:`ROLE_STYLE`."""
    tag: str
    """``S1``, ``U1``, ... (see :func:`baseline_tags`)."""
    label: str
    """The trial's label (the model's name)."""
    at: Point


def baselines(
    trials: Sequence[TrialView], point: Callable[[TrialView], Point], tags: Mapping[int, str]
) -> tuple[Baseline, ...]:
    """The source models among ``trials``, then the uniform merges, each at ``point(trial)``."""
    return tuple(
        Baseline(role, tags[t.number], t.label, point(t))
        for role in ROLE_STYLE
        for t in trials
        if t.role == role
    )


def draw_baselines(axes: Axes, chosen: Sequence[Baseline], named: bool) -> list[Tag]:
    """Source models and uniform merges, one legend entry each (``S1  ft_a``) when ``named``;
    returns their tags for :func:`place_tags`."""
    placed: list[Tag] = []
    for baseline in chosen:
        style = ROLE_STYLE[baseline.role]
        axes.scatter(
            *baseline.at,
            s=60,
            marker=style["marker"],
            color=style["color"],
            edgecolors="black",
            linewidths=0.6,
            label=f"{baseline.tag}  {baseline.label}" if named else None,
            zorder=5,
        )
        placed.append(Tag(baseline.at, baseline.tag, style["color"]))
    return placed


def draw_highlight(axes: Axes, points: Sequence[Point], number: int | None) -> None:
    """A star around the highlighted trial (an export's model), named in the legend."""
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


# -- tags and their placement ----------------------------------------------------------------------


@dataclass(frozen=True)
class Tag:
    """A short text to put beside a point."""

    at: Point
    """Data coordinates of the point the tag names."""
    text: str
    color: str


def place_tags(
    axes: Axes,
    tags: Sequence[Tag],
    points: Sequence[Point],
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
                cost += sum(1000.0 * overlap(padded, other) for other in taken)
                cost += sum(
                    50.0 * overlap(box, (mx - 6, my - 6, mx + 6, my + 6))
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


def overlap(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """The area two boxes (x0, y0, x1, y1) share, as a fraction of the first."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    return width * height / max((a[2] - a[0]) * (a[3] - a[1]), 1e-9)
