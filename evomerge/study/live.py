"""A study's progress as it runs: a live bar on a terminal; when stderr is not a terminal (a log
file, Ray Jobs), a plain line at most once a minute and at every tenth of the budget."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

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


class LiveProgress:
    """``show(progress)`` after every result, and ``show.note(text)`` for a one-off line (a
    worker loaded, a worker replaced); this base class shows nothing."""

    def __call__(self, progress: StudyProgress) -> None:
        pass

    def note(self, text: str) -> None:
        pass


class _Bar(LiveProgress):
    def __init__(self, bar: Any, task: Any) -> None:
        self.bar = bar
        self.task = task

    def __call__(self, progress: StudyProgress) -> None:
        if progress.budget is not None:
            self.bar.update(self.task, completed=progress.finished, total=progress.budget)
        else:
            self.bar.update(
                self.task,
                completed=int(progress.elapsed_seconds),
                total=int(progress.budget_seconds or 0) or None,
            )
        self.bar.update(self.task, info=describe(progress))

    def note(self, text: str) -> None:
        self.bar.console.print(text, markup=False, highlight=False)


class _Lines(LiveProgress):
    def __init__(self, name: str) -> None:
        self.name = name
        self.last = (0.0, -1)

    def __call__(self, progress: StudyProgress) -> None:
        now = time.monotonic()
        if progress.budget:
            share = progress.finished / progress.budget
        elif progress.budget_seconds:
            share = progress.elapsed_seconds / progress.budget_seconds
        else:
            share = 0.0
        step = int(share * 10)
        if now - self.last[0] < 60 and step == self.last[1]:
            return
        self.last = (now, step)
        total = f"/{progress.budget}" if progress.budget else ""
        print(
            f"{self.name}: {progress.finished}{total} trials | {describe(progress)}",
            file=sys.stderr,
        )

    def note(self, text: str) -> None:
        print(f"{self.name}: {text}", file=sys.stderr, flush=True)


@contextmanager
def live_progress(name: str, enabled: bool = True) -> Iterator[LiveProgress]:
    """Yield ``show``: a live bar on a terminal, else a line now and then (and each note)."""
    if not enabled:
        yield LiveProgress()
        return
    if not sys.stderr.isatty():
        yield _Lines(name)
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
        yield _Bar(bar, bar.add_task(name, total=None, info="starting workers ..."))
