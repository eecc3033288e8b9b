"""What ``evomerge status`` shows, as data: :func:`study_status` returns one JSON-ready
mapping (progress against the budget, trials by state, failures by reason, the best trials,
the Pareto front's size, each worker's work). :mod:`evomerge.study.report` turns it into text.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from evomerge.optimize import Objective, pareto_front, scalarize
from evomerge.study.read import config_objectives, study_budget
from evomerge.study.store import FULL, HOLDOUT, StudyStore, TrialView

STATES = ("QUEUED", "RUNNING", "COMPLETE", "FAILED")
LATEST_FAILURES = 5


def study_status(store: StudyStore, name: str, latest: int = LATEST_FAILURES) -> dict[str, Any]:
    """Everything ``evomerge status`` shows, as a JSON-ready mapping.

    Keys: ``study``, ``status``, ``created_at``, ``progress`` (finished trials and elapsed
    seconds against the budget, with percentages), ``states`` (counts), ``trials_per_hour``,
    ``failures`` (count, ``reasons`` by error type, the ``latest`` few), ``objectives``,
    ``best`` (one per objective), ``best_weighted``, ``pareto_size``, ``fidelities``,
    ``workers`` and ``proposer`` (its own notes, e.g. CMA-ES restarts). ``best``,
    ``best_weighted`` and the front compare full-fidelity scores only (with the held-out score
    beside them when there is one); ``fidelities`` counts the trials scored at each fidelity
    and names the best cheap score apart. ``latest`` caps the failures listed.
    """
    config = store.study_config(name)  # raises ConfigError naming the studies there are
    row = store.study(name)
    trials = store.trials(name)
    objectives = config_objectives(config, name, required=False)
    budget_trials, budget_hours = study_budget(config, row["budget"])
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
        "fidelities": _fidelities(complete, objectives),
        "workers": _workers(trials),
        "timings": mean_timings(trials),
        "proposer": _proposer_notes(store, name),
    }


def _proposer_notes(store: StudyStore, name: str) -> dict[str, str]:
    """What the proposer's latest snapshot says about its course (``Proposer.describe``: e.g.
    CMA-ES restarts and why), as ``{label: text}``; empty before the first snapshot."""
    from evomerge.optimize.registry import describe_state

    snapshot = store.latest_snapshot(name)
    return {} if snapshot is None else describe_state(snapshot[0])


def _fidelities(complete: Sequence[TrialView], objectives: Sequence[Objective]) -> dict[str, Any]:
    """Complete trials by the fidelities they were scored at; the best weighted score of the
    trials scored only cheaply (not comparable with full scores: shown apart)."""
    counts: Counter[str] = Counter(f for t in complete for f in t.scores)
    cheap_only = [t for t in complete if t.fidelity not in (None, FULL)]
    cheap = {
        t.number: (t, scalarize(objectives, values))
        for t in cheap_only
        if objectives and (values := t.values(objectives, t.fidelity or "")) is not None
    }
    best_cheap = None
    if cheap:
        top, value = max(cheap.values(), key=lambda tv: (tv[1], -tv[0].number))
        best_cheap = _summary(top, value)
    return {
        "counts": dict(sorted(counts.items())),
        "cheap_only": len(cheap_only),
        "best_cheap": best_cheap,
    }


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


def _holdout_value(trial: TrialView, objectives: Sequence[Objective]) -> float | None:
    values = trial.values(objectives, HOLDOUT)
    return None if values is None else scalarize(objectives, values)


def _best_for(complete: Sequence[TrialView], objective: Objective) -> dict[str, Any]:
    """The best complete trial for one objective (the lowest number among equals), or none."""
    scored = [t for t in complete if objective.metric in t.metrics]
    best: dict[str, Any] = {"metric": objective.metric, "direction": objective.direction}
    if not scored:
        return {**best, "trial": None}
    top = max(scored, key=lambda t: (objective.sign * t.metrics[objective.metric], -t.number))
    return {
        **best,
        **_summary(top, top.metrics[objective.metric]),
        "holdout_value": top.holdout.get(objective.metric),
    }


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
        "holdout_value": _holdout_value(top, objectives),
        "holdout_values": top.values(objectives, HOLDOUT),
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


PHASES = ("merge_math", "transfer", "copy", "path_assembly", "held_models", "evaluation")
"""The phases of a candidate a trial records the seconds of (``TrialView.timings``). A
data-flow (layer path) candidate records ``hold``, the seconds spent building the models it
holds on their first use, shown as ``held_models``; ``path_assembly`` is the rest of its build
(its merge seconds less ``hold``)."""


def _phase_seconds(trial: TrialView, phase: str) -> float | None:
    timings = trial.timings
    if phase == "held_models":
        return timings.get("hold")
    if phase == "path_assembly":
        hold = timings.get("hold")
        if hold is None or trial.merge_seconds is None:
            return None
        return max(0.0, trial.merge_seconds - hold)
    return timings.get(phase)


def mean_timings(trials: Iterable[TrialView]) -> dict[str, Any]:
    """Mean seconds per phase over the trials that recorded them, how they were scored
    (``scored_with``: trial count each) and the evaluation out-of-memory retries in all."""
    timed = [t for t in trials if t.timings]
    scored = Counter(t.scored_with for t in trials if t.scored_with)
    return {
        "trials": len(timed),
        "mean_seconds": {p: _mean(_phase_seconds(t, p) for t in timed) for p in PHASES},
        "oom_retries": sum(int(t.timings.get("oom_retries") or 0) for t in timed),
        "scored_with": dict(scored),
    }


def _mean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return math.fsum(present) / len(present) if present else None
