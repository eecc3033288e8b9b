"""A study as text for people: the status summary, the studies in a database, and the Pareto
front as a table or JSON. Each function takes data (from :mod:`evomerge.study.status` and
:mod:`evomerge.study.read`) and returns a string; the command line prints it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from evomerge.optimize import Objective
from evomerge.study.read import study_objectives
from evomerge.study.status import STATES
from evomerge.study.store import FULL, HOLDOUT, StudyStore, TrialView, mask_url
from evomerge.util import first_line, format_duration, json_safe

TOP_REASONS = 5


def studies_table(store: StudyStore) -> str:
    """One line per study in ``store``: status, finished/budget, failed, running, created."""
    rows = store.studies()
    if not rows:
        return f"no studies in {mask_url(store.url)}"
    lines = [f"{'study':<24} {'status':<9} {'finished':>9} {'failed':>7} {'running':>8}  created"]
    for row in rows:
        trials = row["trials"]
        finished = trials.get("COMPLETE", 0) + trials.get("FAILED", 0)
        lines.append(
            f"{row['name']:<24} {row['status']:<9} {finished:>4}/{row['budget'] or '-':<4} "
            f"{trials.get('FAILED', 0):>7} {trials.get('RUNNING', 0):>8}  {row['created_at'][:19]}"
        )
    return "\n".join(lines)


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
    lines += _timing_lines(status.get("timings") or {})
    lines += [
        f"{'proposer' if i == 0 else '':<10} {label}: {text}"
        for i, (label, text) in enumerate((status.get("proposer") or {}).items())
    ]
    return "\n".join(lines)


def _progress_lines(status: Mapping[str, Any]) -> list[str]:
    progress, states = status["progress"], status["states"]
    parts = [f"{progress['finished']}/{progress['budget_trials'] or '-'} trials finished"]
    if progress["trials_percent"] is not None:
        parts[0] += f" ({progress['trials_percent']:.1f}%)"
    elapsed = format_duration(progress["elapsed_seconds"])
    if progress["budget_hours"] is not None:
        hours = format_duration(progress["budget_hours"] * 3600)
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
        text = _clip(first_line(failure["error"]) or "no error recorded", 80)
        lines.append(f"{'':<10} trial {failure['trial']} ({failure['label']}{where}): {text}")
    return lines


def _best_lines(status: Mapping[str, Any]) -> list[str]:
    rows = [
        (f"{b['metric']} ({b['direction']})", b) for b in status["best"] if b["trial"] is not None
    ]
    if status["best_weighted"] is not None:
        rows.append(("weighted sum", status["best_weighted"]))
    lines = []
    if not rows:
        lines.append(f"{'best':<10} no trial scored on all documents yet")
    else:
        width = max(len(name) for name, _ in rows)
        for i, (name, best) in enumerate(rows):
            held = best.get("holdout_value")
            held_text = f"  held out {held:.4f}" if held is not None else ""
            lines.append(
                f"{'best' if i == 0 else '':<10} {name:<{width}}  {best['value']:>10.4f}  "
                f"trial {best['trial']:<5} {best['label']}{held_text}"
            )
        lines.append(f"{'':<10} (full fidelity: every searched-on document)")
    return lines + _cheap_lines(status.get("fidelities"))


def _cheap_lines(fidelities: Mapping[str, Any] | None) -> list[str]:
    """The cheap scores, apart: how many trials have only a cheap score, and the best one."""
    if not fidelities or not fidelities["cheap_only"]:
        return []
    counts = ", ".join(f"{name} {count}" for name, count in fidelities["counts"].items())
    lines = [
        f"{'fidelity':<10} scored trials by fidelity: {counts}; "
        f"{fidelities['cheap_only']} not (yet) scored on all documents"
    ]
    cheap = fidelities["best_cheap"]
    if cheap is not None:
        lines.append(
            f"{'':<10} best cheap score (not comparable): {cheap['value']:.4f} at "
            f"{cheap['fidelity']}, trial {cheap['trial']} {cheap['label']}"
        )
    return lines


def _timing_lines(timings: Mapping[str, Any]) -> list[str]:
    """Where a candidate's time goes, on average; nothing for trials that did not record it."""
    means = {k: v for k, v in (timings.get("mean_seconds") or {}).items() if v is not None}
    if not timings.get("trials") or not means:
        return []
    shown = ", ".join(
        f"{phase.replace('_', ' ')} {seconds:.3g} s" for phase, seconds in means.items()
    )
    lines = [f"{'phases':<10} mean of {timings['trials']} trial(s): {shown}"]
    how = ", ".join(f"{k} ({v})" for k, v in (timings.get("scored_with") or {}).items())
    retries = timings.get("oom_retries") or 0
    if how or retries:
        extra = f"; {retries} evaluation(s) retried with half the batch" if retries else ""
        lines.append(f"{'':<10} scored in {how or 'unrecorded'}{extra}")
    return lines


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


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def pareto_report(store: StudyStore, study: str) -> str:
    """The Pareto front of ``study`` as :func:`pareto_text` (what ``search`` and ``demo``
    print when a study ends)."""
    objectives = study_objectives(store, study)
    return pareto_text(store.pareto(study, objectives), objectives, study)


def pareto_text(front: Sequence[TrialView], objectives: Sequence[Objective], study: str) -> str:
    """The front as a table, with a closing line saying how many trials are on it."""
    if front:
        tail = f"{len(front)} trial(s) on the Pareto front of study '{study}'"
    else:
        tail = f"no complete trial on the Pareto front of study '{study}' yet"
    return pareto_table(front, objectives) + "\n" + tail


def pareto_json(front: Sequence[TrialView], objectives: Sequence[Objective]) -> str:
    """The front as JSON: per trial its full-fidelity ``values`` and ``metrics`` (searched-on
    documents), ``holdout_values`` (None until confirmed) and every ``scores`` by fidelity."""
    rows = [
        {
            "rank": rank,
            "trial": t.number,
            "role": t.role,
            "label": t.label,
            "fidelity": FULL,
            "values": t.values(objectives),
            "holdout_values": t.values(objectives, HOLDOUT),
            "metrics": t.metrics,
            "scores": t.scores,
        }
        for rank, t in enumerate(front, start=1)
    ]
    return json.dumps(json_safe(rows), indent=2)


def pareto_table(front: Sequence[TrialView], objectives: Sequence[Objective]) -> str:
    """One row per trial: each objective on the searched-on documents (full fidelity) and, once
    ``confirm`` scored them, on the held-out documents beside it."""
    held = any(t.holdout for t in front)
    names = [o.metric for o in objectives]
    headers = [h for n in names for h in ((n, f"{n} held out") if held else (n,))]
    width = max(12, *(len(h) for h in headers))
    lines = [f"{'#':>3}  {'trial':>5}  " + "  ".join(f"{h:>{width}}" for h in headers)]
    lines[0] += "  label"
    for rank, trial in enumerate(front, start=1):
        cells = []
        for name in names:
            cells.append(_cell(trial.metrics.get(name), width))
            if held:
                cells.append(_cell(trial.holdout.get(name), width))
        lines.append(f"{rank:>3}  {trial.number:>5}  {'  '.join(cells)}  {trial.label}")
    if front:
        note = "scores on the searched-on documents, all of them (full fidelity)"
        if held:
            note += "; 'held out': on documents the search never saw"
        lines.append(note)
    return "\n".join(lines)


def _cell(value: float | None, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.4f}"
