"""Reading a study back: ``evomerge studies``, ``status`` and ``pareto`` (table, JSON, plot).

:func:`study_status` computes everything ``evomerge status`` shows as one JSON-ready mapping,
so a live progress display can reuse it. The plots are drawn by :mod:`evomerge.study.plots`.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from evomerge.errors import ConfigError
from evomerge.optimize import Objective, pareto_front, parse_objectives, scalarize
from evomerge.study.store import StorageError, StudyStore, TrialView, mask_url, storage_url

STATES = ("QUEUED", "RUNNING", "COMPLETE", "FAILED")
LATEST_FAILURES = 5
TOP_REASONS = 5


def add_commands(commands: Any) -> None:
    """Register ``studies``, ``status`` and ``pareto`` on the CLI's sub-parsers."""
    studies = commands.add_parser("studies", help="list the studies in a study database")
    studies.add_argument("--storage", required=True, help="database URL or SQLite file")
    studies.set_defaults(handler=cmd_studies)

    status = commands.add_parser(
        "status",
        help="progress, failures, best trials and workers of a study",
        description="Summarise a study: its progress against the budget, trials by state, "
        "throughput, failure reasons, the best trial per objective and by the weighted sum, "
        "the Pareto front's size and what each worker did.",
    )
    status.add_argument("--storage", required=True, help="database URL or SQLite file")
    status.add_argument("--study", required=True, help="study name")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.set_defaults(handler=cmd_status)

    pareto = commands.add_parser(
        "pareto",
        help="the Pareto front of a study, as a table (and a plot)",
        description="List the Pareto front, best weighted sum first. The # column numbers the "
        "rows: 'evomerge export --trial pareto:K' exports row K.",
    )
    pareto.add_argument("--storage", required=True, help="database URL or SQLite file")
    pareto.add_argument("--study", required=True, help="study name")
    pareto.add_argument("--json", action="store_true", help="print JSON instead of a table")
    pareto.add_argument(
        "--plot", type=Path, metavar="FILE.png", help="also draw the trials and the front here"
    )
    pareto.set_defaults(handler=cmd_pareto)


SQLITE_HEADER = b"SQLite format 3\x00"


def check_storage(storage: str, *, what: str = "--storage", must_exist: bool = False) -> str:
    """The SQLAlchemy URL of ``storage``, refused in one line naming ``what`` when it cannot be
    a study database: an unknown scheme, a database driver that is not installed, an SQLite
    path whose folder is missing or that is a folder or another kind of file, or (with
    ``must_exist``) an SQLite file that is not there. Opens and creates nothing."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    url = storage_url(storage)
    shown = mask_url(url)
    try:
        parsed = make_url(url)
        dialect = parsed.get_dialect()
    except ArgumentError as exc:  # NoSuchModuleError (an unknown scheme) is one too
        raise StorageError(f"{what} {shown}: not a database URL ({_first_line(exc)})") from None
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        raise StorageError(
            f"{what} {shown}: the database driver for '{parsed.drivername}' is not installed "
            f"({_first_line(exc)})"
        ) from None
    if dialect.name != "sqlite" or parsed.database in (None, "", ":memory:"):
        return url
    file = Path(parsed.database)
    if not file.parent.is_dir():
        raise StorageError(f"{what} {file}: folder {file.parent} does not exist")
    if file.is_dir():
        raise StorageError(f"{what} {file} is a folder, not an SQLite database file")
    if not file.exists():
        if must_exist:
            raise StorageError(f"{what} {file}: no study database there (the file does not exist)")
        return url
    try:
        with file.open("rb") as handle:
            header = handle.read(len(SQLITE_HEADER))
    except OSError as exc:
        raise StorageError(f"{what} {file}: cannot read it ({exc.strerror or exc})") from None
    if header and header != SQLITE_HEADER:
        raise StorageError(f"{what} {file} is not an SQLite database (it holds something else)")
    return url


def open_store(storage: str, *, what: str = "--storage", create: bool = False) -> StudyStore:
    """:func:`check_storage`, then the store; without ``create`` a missing SQLite file is an
    error (a command that only reads must not leave an empty database behind)."""
    from sqlalchemy.exc import SQLAlchemyError

    url = check_storage(storage, what=what, must_exist=not create)
    try:
        return StudyStore(url)
    except StorageError as exc:  # unreachable, refused, of another schema version
        raise StorageError(f"{what}: {exc}") from None
    except SQLAlchemyError as exc:
        raise StorageError(
            f"{what}: cannot open the study database {mask_url(url)}: {_first_line(exc)}"
        ) from None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _open_store(storage: str) -> StudyStore:
    return open_store(storage)


# -- studies ---------------------------------------------------------------------------------------


def cmd_studies(args: argparse.Namespace) -> int:
    from evomerge.study import mask_url

    store = _open_store(args.storage)
    rows = store.studies()
    if not rows:
        print(f"no studies in {mask_url(store.url)}")
        return 0
    print(f"{'study':<24} {'status':<9} {'finished':>9} {'failed':>7} {'running':>8}  created")
    for row in rows:
        trials = row["trials"]
        finished = trials.get("COMPLETE", 0) + trials.get("FAILED", 0)
        print(
            f"{row['name']:<24} {row['status']:<9} {finished:>4}/{row['budget'] or '-':<4} "
            f"{trials.get('FAILED', 0):>7} {trials.get('RUNNING', 0):>8}  {row['created_at'][:19]}"
        )
    return 0


# -- status ----------------------------------------------------------------------------------------


def study_status(store: StudyStore, name: str, latest: int = LATEST_FAILURES) -> dict[str, Any]:
    """Everything ``evomerge status`` shows, as a JSON-ready mapping.

    Keys: ``study``, ``status``, ``created_at``, ``progress`` (finished trials and elapsed
    seconds against the budget, with percentages), ``states`` (counts), ``trials_per_hour``,
    ``failures`` (count, ``reasons`` by error type, the ``latest`` few), ``objectives``,
    ``best`` (one per objective), ``best_weighted``, ``pareto_size`` and ``workers``. Metrics
    are each trial's at its highest fidelity; ``latest`` caps the failures listed.
    """
    config = store.study_config(name)  # raises ConfigError naming the studies there are
    row = store.study(name)
    trials = store.trials(name)
    objectives = _objectives(config, name, required=False)
    budget_trials, budget_hours = _budget(config, row["budget"])
    states = _state_counts(trials)
    finished = states["COMPLETE"] + states["FAILED"]
    elapsed, source = _elapsed(row["elapsed_seconds"], trials)
    complete = [t for t in trials if t.state == "COMPLETE"]
    budget_seconds = None if budget_hours is None else budget_hours * 3600
    return {
        "study": name,
        "status": row["status"],
        "created_at": row["created_at"],
        "progress": {
            "finished": finished,
            "budget_trials": budget_trials,
            "trials_percent": _percent(finished, budget_trials),
            "elapsed_seconds": elapsed,
            "elapsed_from": source,
            "budget_hours": budget_hours,
            "hours_percent": _percent(elapsed, budget_seconds),
        },
        "states": states,
        "trials_per_hour": finished / elapsed * 3600 if elapsed > 0 else None,
        "failures": _failures([t for t in trials if t.state == "FAILED"], latest),
        "objectives": [o.model_dump() for o in objectives],
        "best": [_best_for(complete, o) for o in objectives],
        "best_weighted": _best_weighted(complete, objectives),
        "pareto_size": len(_front(complete, objectives)),
        "workers": _workers(trials),
    }


def _objectives(config: Mapping[str, Any], name: str, required: bool = True) -> list[Objective]:
    if not config.get("objectives"):
        if required:
            raise ConfigError(f"study '{name}' has no objectives in its stored config")
        return []
    return parse_objectives(config["objectives"], where=f"study '{name}': objectives")


def _budget(config: Mapping[str, Any], row_budget: int) -> tuple[int | None, float | None]:
    """(trials, hours) from the stored config; the study row's budget if the config has none."""
    budget = config.get("budget")
    if isinstance(budget, Mapping):
        return budget.get("trials"), budget.get("hours")
    if isinstance(budget, int) and not isinstance(budget, bool):
        return budget, None
    return row_budget, None


def _state_counts(trials: Iterable[TrialView]) -> dict[str, int]:
    counts = dict.fromkeys(STATES, 0)
    counts.update(Counter(t.state for t in trials))
    return counts


def _elapsed(recorded: float, trials: Sequence[TrialView]) -> tuple[float, str | None]:
    """The driver's recorded wall time; if none, first trial created to last trial finished."""
    if recorded > 0:
        return recorded, "driver"
    created = [t.created_at for t in trials if t.created_at is not None]
    ended = [t.finished_at for t in trials if t.finished_at is not None]
    if not created or not ended:
        return 0.0, None
    span = (max(ended) - min(created)).total_seconds()
    return (span, "trials") if span > 0 else (0.0, None)


def _percent(done: float, total: float | None) -> float | None:
    return None if not total else 100.0 * done / total


def error_type(error: str | None) -> str:
    """``"WorkerDied"`` for ``"WorkerDied: worker died once ..."``: the text before the first
    colon (its last dotted part), the first line of a message without one."""
    text = (error or "").strip()
    if not text:
        return "unknown"
    head = text.split(":", 1)[0].strip().splitlines()[0].strip()
    if "." in head and " " not in head:  # "evomerge.errors.EvaluationError"
        head = head.rsplit(".", 1)[-1]
    return head or "unknown"


def _failures(failed: Sequence[TrialView], latest: int) -> dict[str, Any]:
    reasons = Counter(error_type(t.error) for t in failed)
    newest = sorted(failed, key=lambda t: (_moment(t.finished_at), t.number), reverse=True)
    return {
        "count": len(failed),
        "reasons": [
            {"type": kind, "count": count}
            for kind, count in sorted(reasons.items(), key=lambda kc: (-kc[1], kc[0]))
        ],
        "latest": [
            {
                "trial": t.number,
                "label": t.label,
                "worker": t.worker,
                "attempts": t.attempts,
                "error": t.error,
                "finished_at": t.finished_at.isoformat() if t.finished_at else None,
            }
            for t in newest[:latest]
        ],
    }


def _moment(moment: datetime | None) -> float:
    return moment.timestamp() if moment is not None else -math.inf


def _summary(trial: TrialView, value: float) -> dict[str, Any]:
    return {
        "trial": trial.number,
        "value": value,
        "fidelity": trial.fidelity,
        "role": trial.role,
        "label": trial.label,
    }


def _best_for(complete: Sequence[TrialView], objective: Objective) -> dict[str, Any]:
    """The best complete trial for one objective (the lowest number among equals), or none."""
    scored = [t for t in complete if objective.metric in t.metrics]
    best: dict[str, Any] = {"metric": objective.metric, "direction": objective.direction}
    if not scored:
        return {**best, "trial": None}
    top = max(scored, key=lambda t: (objective.sign * t.metrics[objective.metric], -t.number))
    return {**best, **_summary(top, top.metrics[objective.metric])}


def _scored(complete: Sequence[TrialView], objectives: Sequence[Objective]) -> list[TrialView]:
    return [t for t in complete if objectives and t.values(objectives) is not None]


def _best_weighted(
    complete: Sequence[TrialView], objectives: Sequence[Objective]
) -> dict[str, Any] | None:
    pool = _scored(complete, objectives)
    if not pool:
        return None
    top = max(pool, key=lambda t: (scalarize(objectives, t.values(objectives) or []), -t.number))
    return {
        **_summary(top, scalarize(objectives, top.values(objectives) or [])),
        "values": top.values(objectives),
    }


def _front(complete: Sequence[TrialView], objectives: Sequence[Objective]) -> list[TrialView]:
    pool = _scored(complete, objectives)
    return [pool[i] for i in pareto_front([t.values(objectives) or [] for t in pool], objectives)]


def _workers(trials: Iterable[TrialView]) -> list[dict[str, Any]]:
    by_worker: dict[str, list[TrialView]] = {}
    for trial in trials:
        if trial.worker is not None:
            by_worker.setdefault(trial.worker, []).append(trial)
    return [
        {
            "worker": worker,
            "trials": len(done),
            "failed": sum(t.state == "FAILED" for t in done),
            "mean_merge_seconds": _mean(t.merge_seconds for t in done),
            "mean_eval_seconds": _mean(t.eval_seconds for t in done),
        }
        for worker, done in sorted(by_worker.items())
    ]


def _mean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return math.fsum(present) / len(present) if present else None


def cmd_status(args: argparse.Namespace) -> int:
    status = study_status(_open_store(args.storage), args.study)
    if args.json:
        print(json.dumps(_json_safe(status), indent=2))
    else:
        print(format_status(status))
    return 0


def _json_safe(value: Any) -> Any:
    """Non-finite floats as null, so the output is valid JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def format_status(status: Mapping[str, Any]) -> str:
    """``evomerge status`` as text: one section per line group, labels in the first column."""
    created = status["created_at"][:19].replace("T", " ")
    lines = [f"study '{status['study']}': {status['status']} (created {created})"]
    lines += _progress_lines(status)
    lines += _failure_lines(status["failures"])
    lines += _best_lines(status)
    lines.append(
        f"{'pareto':<10} {status['pareto_size']} trial(s) on the front "
        f"(evomerge pareto --study {status['study']})"
    )
    lines += _worker_lines(status["workers"])
    return "\n".join(lines)


def _progress_lines(status: Mapping[str, Any]) -> list[str]:
    progress, states = status["progress"], status["states"]
    parts = [f"{progress['finished']}/{progress['budget_trials'] or '-'} trials finished"]
    if progress["trials_percent"] is not None:
        parts[0] += f" ({progress['trials_percent']:.1f}%)"
    elapsed = _duration(progress["elapsed_seconds"])
    if progress["budget_hours"] is not None:
        hours = _duration(progress["budget_hours"] * 3600)
        parts.append(f"{elapsed} of {hours} ({progress['hours_percent']:.1f}%)")
    elif progress["elapsed_from"] is not None:
        parts.append(f"{elapsed} elapsed")
    counts = ", ".join(f"{states[s]} {s.lower()}" for s in ("COMPLETE", "FAILED", "RUNNING"))
    counts += f", {states['QUEUED']} queued"
    counts += "".join(f", {n} {s.lower()}" for s, n in states.items() if s not in STATES)
    rate = status["trials_per_hour"]
    if rate is not None:
        counts += f"; {rate:.1f} trials/hour"
    return [f"{'progress':<10} " + "; ".join(parts), f"{'trials':<10} {counts}"]


def _failure_lines(failures: Mapping[str, Any]) -> list[str]:
    if not failures["count"]:
        return [f"{'failures':<10} none"]
    reasons = failures["reasons"]
    shown = ", ".join(f"{r['type']} {r['count']}" for r in reasons[:TOP_REASONS])
    if len(reasons) > TOP_REASONS:
        shown += f", {len(reasons) - TOP_REASONS} other type(s)"
    lines = [f"{'failures':<10} {failures['count']}: {shown}"]
    for failure in failures["latest"]:
        where = f" on {failure['worker']}" if failure["worker"] else ""
        text = _clip((failure["error"] or "no error recorded").splitlines()[0], 80)
        lines.append(f"{'':<10} trial {failure['trial']} ({failure['label']}{where}): {text}")
    return lines


def _best_lines(status: Mapping[str, Any]) -> list[str]:
    rows = [
        (f"{b['metric']} ({b['direction']})", b) for b in status["best"] if b["trial"] is not None
    ]
    if status["best_weighted"] is not None:
        rows.append(("weighted sum", status["best_weighted"]))
    if not rows:
        return [f"{'best':<10} no complete trial yet"]
    width = max(len(name) for name, _ in rows)
    return [
        f"{'best' if i == 0 else '':<10} {name:<{width}}  {best['value']:>10.4f}  "
        f"trial {best['trial']:<5} {best['fidelity'] or '-':<9} {best['label']}"
        for i, (name, best) in enumerate(rows)
    ]


def _worker_lines(workers: Sequence[Mapping[str, Any]]) -> list[str]:
    if not workers:
        return [f"{'workers':<10} none yet"]
    width = max(6, *(len(w["worker"]) for w in workers))
    lines = [f"{'workers':<10} {'worker':<{width}}  trials  failed  merge s   eval s"]
    for w in workers:
        lines.append(
            f"{'':<10} {w['worker']:<{width}}  {w['trials']:>6}  {w['failed']:>6}  "
            f"{_seconds(w['mean_merge_seconds'])}  {_seconds(w['mean_eval_seconds'])}"
        )
    return lines


def _seconds(value: float | None) -> str:
    return f"{'-':>7}" if value is None else f"{value:>7.2f}"


def _duration(seconds: float) -> str:
    """``"2h 05m"``, ``"12m 30s"`` or ``"45s"``."""
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


# -- pareto ----------------------------------------------------------------------------------------


def cmd_pareto(args: argparse.Namespace) -> int:
    from evomerge.study.plots import check_png_path, plot_pareto

    plot = check_png_path(args.plot, "--plot") if args.plot is not None else None
    store = _open_store(args.storage)
    objectives = _objectives(store.study_config(args.study), args.study)
    front = store.pareto(args.study, objectives)
    if plot is not None and not front:
        raise ConfigError(
            f"study '{args.study}' has no complete trial with all objectives yet; nothing to plot"
        )
    trials = store.trials(args.study) if plot is not None else []
    print(_pareto_json(front, objectives) if args.json else _pareto_table(front, objectives))
    if not args.json and front:
        print(f"{len(front)} trial(s) on the Pareto front of study '{args.study}'")
    elif not args.json:
        print(f"no complete trial on the Pareto front of study '{args.study}' yet")
    if plot is not None:
        plot_pareto(plot, args.study, trials, front, objectives)
        if not args.json:
            print(f"plot written to {plot}")
    return 0


def _pareto_json(front: Sequence[TrialView], objectives: Sequence[Objective]) -> str:
    rows = [
        {
            "rank": rank,
            "trial": t.number,
            "role": t.role,
            "label": t.label,
            "fidelity": t.fidelity,
            "values": t.values(objectives),
            "metrics": t.metrics,
        }
        for rank, t in enumerate(front, start=1)
    ]
    return json.dumps(_json_safe(rows), indent=2)


def _pareto_table(front: Sequence[TrialView], objectives: Sequence[Objective]) -> str:
    names = [o.metric for o in objectives]
    width = max(12, *(len(n) for n in names))
    lines = [f"{'#':>3}  {'trial':>5}  " + "  ".join(f"{n:>{width}}" for n in names)]
    lines[0] += "  fidelity  label"
    for rank, trial in enumerate(front, start=1):
        cells = "  ".join(f"{v:>{width}.4f}" for v in trial.values(objectives) or [])
        lines.append(
            f"{rank:>3}  {trial.number:>5}  {cells}  {trial.fidelity or '-':<8}  {trial.label}"
        )
    return "\n".join(lines)
