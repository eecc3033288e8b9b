"""``evomerge search STUDY.yaml`` and ``evomerge resume``: run a study on the Ray workers.

Both draw a live progress line on a terminal (trials done/budget, best so far, Pareto size,
throughput, ETA); when stderr is not a terminal (a log file, Ray Jobs) they print a plain
progress line at most once a minute and at every tenth of the budget instead.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.errors import ConfigError, EvomergeError
from evomerge.progress import no_transformers_bars
from evomerge.study.report import check_storage, open_store
from evomerge.study.store import StudyStore, mask_url, resume_command

if TYPE_CHECKING:  # the driver imports torch: loaded only by the commands that run it
    from evomerge.study.config import StudyConfig
    from evomerge.study.driver import RunSummary, StudyDriver, StudyProgress


def add_commands(commands: Any) -> None:
    """Register ``search`` and ``resume`` on the CLI's sub-parsers."""
    search = commands.add_parser(
        "search",
        help="start a study described in a YAML file, on Ray workers",
        description="Create the study in its database (the YAML's 'storage', default "
        "evomerge_studies.db beside the YAML) and run it: baselines, then proposals merged "
        "in place and scored on Ray workers, until the budget. Ctrl-C stops cleanly; "
        "'evomerge resume' continues.",
    )
    search.add_argument("config", type=Path, help="study YAML file")
    search.add_argument("--storage", help="database URL or SQLite file (overrides the YAML)")
    search.add_argument("--quiet", action="store_true", help="no progress display")
    search.set_defaults(handler=cmd_search)

    resume = commands.add_parser(
        "resume",
        help="continue a stopped or crashed study from its database",
        description="Continue a study with the config stored in its database: trials left "
        "running are re-run with the same recipes, the proposer is restored, and the study "
        "ends with exactly its budget of finished trials. Name the study by its YAML (its "
        "storage and name are read from it) or by --storage and --study.",
    )
    resume.add_argument(
        "config", type=Path, nargs="?", help="the study's YAML file (only its storage and name)"
    )
    resume.add_argument("--storage", help="database URL or SQLite file (overrides the YAML)")
    resume.add_argument("--study", help="study name (overrides the YAML)")
    resume.add_argument("--quiet", action="store_true", help="no progress display")
    resume.set_defaults(handler=cmd_resume)


def cmd_search(args: argparse.Namespace) -> int:
    from evomerge.study.config import load_study_config

    config = load_study_config(args.config)
    if args.storage:
        config = config.model_copy(update={"storage": args.storage})
    what = "--storage" if args.storage else f"{args.config}: storage"
    check_storage(config.storage or "", what=what)
    preflight(config, str(args.config))  # before the database is opened or a worker starts
    store = open_store(config.storage or "", what=what, create=True)
    from evomerge.study.driver import StudyDriver

    driver = StudyDriver(store, config)
    return _run(driver, store, quiet=args.quiet, config=_yaml_alone(args))


def preflight(config: StudyConfig, where: str) -> None:
    """Check what the driver can check by itself, so that a mistake costs neither a database
    entry nor a worker start: the models are there and can be merged, the space binds to
    them, the proposer takes it, and each evaluator's files, function and tasks exist and
    can produce the objectives' metrics. Errors name ``where`` (the YAML) and the field."""
    from evomerge.checkpoint import ModelFolder, check_compatible
    from evomerge.evaluate.registry import preflight_evaluator
    from evomerge.search.loop import build_space_proposer
    from evomerge.space import space_from_setting

    with _naming(where, "base"):
        base = ModelFolder(config.base, label="base")
    sources = []
    for index, path in enumerate(config.sources):
        with _naming(where, f"sources[{index}]"):
            sources.append(ModelFolder(path))
    with _naming(where, "sources"):
        check_compatible([base, *sources])
    with _naming(where, "space"):
        space = space_from_setting(config.space).bind(base, [s.label for s in sources])
    with _naming(where, "proposer"):
        build_space_proposer(config.proposer, space, config.objectives)
    prefixes: set[str] | None = set()
    named: list[str] = []
    for index, evaluator in enumerate(config.evaluators):
        found = preflight_evaluator(evaluator, f"{where}: evaluators[{index}]")
        prefixes = None if found is None or prefixes is None else prefixes | found
        named += evaluator.get("tasks") or sorted(found or [])
    if prefixes is None:
        return
    for index, objective in enumerate(config.objectives):
        if objective.metric.split("/", 1)[0] not in prefixes or "/" not in objective.metric:
            raise ConfigError(
                f"{where}: objectives[{index}].metric: no evaluator produces "
                f"'{objective.metric}'; their metrics are named "
                f"{', '.join(f'{name}/...' for name in named)}"
            )


@contextmanager
def _naming(where: str, field: str) -> Iterator[None]:
    """Prefix an input error raised in the block with ``where: field: ``."""
    try:
        yield
    except EvomergeError as exc:
        raise type(exc)(f"{where}: {field}: {exc}") from None


def cmd_resume(args: argparse.Namespace) -> int:
    from evomerge.study.config import parse_study_config
    from evomerge.study.driver import StudyDriver

    storage, name, yaml_config = _resume_target(args)
    what = "--storage" if args.storage or yaml_config is None else f"{args.config}: storage"
    store = open_store(storage, what=what)
    store.check_free(name)  # a study another driver runs is refused before any check
    where = f"study '{name}' in {mask_url(store.url)}"
    stored = store.study_config(name)
    preflight(parse_study_config(stored, where), where)
    if yaml_config is not None:
        _note_changes(args.config, yaml_config, stored, name)
    driver = StudyDriver.for_stored(store, name)
    print(
        f"resuming study '{name}': {driver.finished} trials finished, "
        f"{len(driver.queue)} to re-run or start, {len(driver.promotions)} promotions pending",
        file=sys.stderr,
    )
    return _run(driver, store, quiet=args.quiet, config=_yaml_alone(args))


def _resume_target(args: argparse.Namespace) -> tuple[str, str, StudyConfig | None]:
    """The storage and study name that ``resume`` was given, from its flags or its YAML (the
    YAML's config too, to compare with the stored one)."""
    if args.config is None:
        if not (args.storage and args.study):
            raise ConfigError(
                "resume: give the study's YAML (evomerge resume STUDY.yaml), or both "
                "--storage and --study"
            )
        return args.storage, args.study, None
    from evomerge.study.config import load_study_config

    config = load_study_config(args.config)
    return args.storage or config.storage or "", args.study or config.name, config


def _note_changes(path: Path, config: StudyConfig, stored: dict[str, Any], name: str) -> None:
    """Warn when the YAML was edited since the study started: resume runs the stored config."""
    mine = config.model_dump(mode="json")
    changed = sorted(
        key
        for key in mine.keys() | stored.keys()
        if key not in ("storage", "name") and mine.get(key) != stored.get(key)
    )
    if changed:
        print(
            f"note: {path} differs from the config study '{name}' started with "
            f"({', '.join(changed)}); resume runs the stored config",
            file=sys.stderr,
        )


def _yaml_alone(args: argparse.Namespace) -> Path | None:
    """The command's YAML if no flag overrode where it says the study is."""
    return None if args.storage or getattr(args, "study", None) else args.config


def _run(driver: StudyDriver, store: StudyStore, quiet: bool, config: Path | None = None) -> int:
    driver.resume_hint = resume_command(driver.name, store.url, config)
    with no_transformers_bars(), live_progress(driver.name, enabled=not quiet) as show:
        summary = driver.run(on_progress=show)
    _report(summary, driver, store)
    return 130 if summary.status == "stopped" else 0


def _report(summary: RunSummary, driver: StudyDriver, store: StudyStore) -> None:
    from evomerge.study.report import cmd_pareto

    if summary.status == "stopped":
        print(
            f"stopped: {summary.finished} trials recorded ({summary.ran} in this run); "
            f"continue with: {driver.resume_hint}",
            file=sys.stderr,
        )
        return
    budget = f"/{summary.budget}" if summary.budget else ""
    print(f"study '{driver.name}' finished: {summary.finished}{budget} trials ({summary.reason})")
    cmd_pareto(argparse.Namespace(storage=store.url, study=driver.name, json=False, plot=None))


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
        parts.append(f"ETA {_duration(eta)}")
    return " | ".join(parts)


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


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
