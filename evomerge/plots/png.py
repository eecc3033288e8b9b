"""Plot files: the path checked before anything is drawn, a new figure on matplotlib's Agg
canvas, and the PNG written beside the target first, then moved into place, so that a failed
plot never leaves a partial file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from evomerge.errors import ConfigError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 100


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


def new_figure(width: float, height: float) -> Figure:
    """An empty figure of ``width`` x ``height`` inches on the Agg canvas, laid out by
    matplotlib's constrained layout."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)  # Agg: no display needed, and pyplot's global state is untouched
    return figure
