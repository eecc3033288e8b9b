"""A study's progress as it runs: a live bar on a terminal; when stderr is not a terminal (a log
file, Ray Jobs), a plain line at most once a minute and at every tenth of the budget."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from evomerge.util import format_duration

if TYPE_CHECKING:
    from evomerge.study.driver import StudyProgress


def describe(progress: StudyProgress) -> str:
    """``best 0.9833 | front 4 | 312 trials/h | ETA 3m 10s``"""
    parts = []
    if progress.best is not None:
        parts.append(f"best {progress.best:.4f}")
    parts.append(f"front {progress.pareto_size}")
    if progress.failed:
        parts.append(f"failed {progress.failed}")
    if progress.run_finished:
        parts.append(f"{progress.trials_per_hour:.0f} trials/h")
    eta = progress.eta_seconds
    if eta is not None:
        parts.append(f"ETA {format_duration(eta)}")
    return " | ".join(parts)


@contextmanager
def live_progress(name: str, enabled: bool = True) -> Iterator[Callable[[StudyProgress], None]]:
    """Yield ``show(progress)``: a live bar on a terminal, else a line now and then."""
    if not enabled:
        yield lambda progress: None
        return
    if not sys.stderr.isatty():
        yield _log_lines(name)
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    with Progress(
        TextColumn(f"{name}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        console=Console(stderr=True),
        transient=False,
    ) as bar:
        task = bar.add_task(name, total=None, info="starting workers ...")

        def show(progress: StudyProgress) -> None:
            if progress.budget is not None:
                bar.update(task, completed=progress.finished, total=progress.budget)
            else:
                bar.update(
                    task,
                    completed=int(progress.elapsed_seconds),
                    total=int(progress.budget_seconds or 0) or None,
                )
            bar.update(task, info=describe(progress))

        yield show


def _log_lines(name: str) -> Callable[[StudyProgress], None]:
    last = [0.0, -1.0]

    def show(progress: StudyProgress) -> None:
        now = time.monotonic()
        if progress.budget:
            share = progress.finished / progress.budget
        elif progress.budget_seconds:
            share = progress.elapsed_seconds / progress.budget_seconds
        else:
            share = 0.0
        step = int(share * 10)
        if now - last[0] < 60 and step == last[1]:
            return
        last[0], last[1] = now, step
        total = f"/{progress.budget}" if progress.budget else ""
        print(f"{name}: {progress.finished}{total} trials | {describe(progress)}", file=sys.stderr)

    return show
