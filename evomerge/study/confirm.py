"""Held-out confirmation: re-score chosen trials on the documents the search never saw.

A study whose evaluators hold out a share of their documents (``holdout: 0.25``) selects only
on the rest, so its best score is the maximum of many noisy measurements on those documents:
optimistic. Confirmation scores the Pareto trials (or the best, or named trials) and the
baselines on the held-out documents and stores the result as its own fidelity, ``holdout``,
beside the search scores. The driver confirms with its workers when a study ends;
``evomerge confirm`` does it later, in one process, with :func:`confirm_study`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from evomerge.errors import ConfigError
from evomerge.optimize import Objective
from evomerge.study.read import best_trial, stored_study_config, study_objectives
from evomerge.study.store import HOLDOUT, StudyStore, TrialView, mask_url

BASELINE_ROLES = ("source", "uniform")
"""Trial roles that are reference points (each source alone, the uniform merges)."""
_NUMBERS = re.compile(r"\d+(\s*,\s*\d+)*")


def holdout_evaluators(evaluators: Sequence[Mapping[str, Any]]) -> list[int]:
    """Indices of the evaluator mappings that hold documents out."""
    return [i for i, e in enumerate(evaluators) if e.get("holdout")]


def confirm_targets(
    store: StudyStore,
    study: str,
    selector: str = "pareto",
    objectives: Sequence[Objective] | None = None,
    redo: bool = False,
) -> list[TrialView]:
    """The complete trials to confirm, by number: ``pareto`` (the front and the baselines),
    ``best`` (the best and the baselines) or numbers ``N,M,...``; without ``redo`` the ones
    already confirmed are left out."""
    complete = {t.number: t for t in store.trials(study, ["COMPLETE"])}
    text = selector.strip()
    if _NUMBERS.fullmatch(text):
        numbers = [int(n) for n in text.split(",")]
        missing = [n for n in numbers if n not in complete]
        if missing:
            raise ConfigError(
                f"study '{study}' has no complete trial {', '.join(map(str, missing))} to confirm"
            )
        chosen = [complete[n] for n in numbers]
    elif text in ("pareto", "best"):
        objectives = objectives or study_objectives(store, study)
        if text == "pareto":
            picked = store.pareto(study, objectives)
        else:
            picked = (
                [best_trial(store, study, objectives)] if _any_full(complete, objectives) else []
            )
        baselines = [t for t in complete.values() if t.role in BASELINE_ROLES and t.metrics]
        chosen = [*picked, *baselines]
    else:
        raise ConfigError(f"--trials '{selector}' is not 'pareto', 'best' or numbers like 3,7,12")
    unique = {t.number: t for t in chosen}
    return [unique[n] for n in sorted(unique) if redo or not unique[n].holdout]


def _any_full(complete: Mapping[int, TrialView], objectives: Sequence[Objective]) -> bool:
    return any(t.values(objectives) is not None for t in complete.values())


@dataclass(frozen=True)
class ConfirmResult:
    """What ``confirm`` scored: trial numbers confirmed, and those that failed with why."""

    confirmed: list[int]
    failed: dict[int, str]


def confirm_study(
    store: StudyStore,
    study: str,
    selector: str = "pareto",
    *,
    device: str | None = None,
    redo: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> ConfirmResult:
    """Score the targets on the held-out documents in this process (one worker, the study's
    models and evaluators, ``device`` or the study's), storing each as fidelity ``holdout``."""
    from evomerge.cluster.worker import CandidateTask, MergeWorker
    from evomerge.study.config import worker_spec

    config = stored_study_config(store, study)
    evaluators = config.evaluators
    if not holdout_evaluators(evaluators):
        raise ConfigError(
            f"study '{study}' in {mask_url(store.url)} holds out no documents: none of its "
            "evaluators has a 'holdout' share (e.g. holdout: 0.25), so every document was "
            "searched on; start a study with one to confirm on unseen documents"
        )
    targets = confirm_targets(store, study, selector, redo=redo)
    result = ConfirmResult([], {})
    if not targets:
        return result
    spec = worker_spec(config, device)
    worker = MergeWorker(spec, "confirm")
    for done, trial in enumerate(targets):
        task = CandidateTask(key=trial.number, recipe=trial.recipe or {}, split=HOLDOUT)
        outcome = worker.run(task)
        if outcome.status == "complete":
            store.add_metrics(study, trial.number, outcome.metrics, None, split=HOLDOUT)
            result.confirmed.append(trial.number)
        else:
            result.failed[trial.number] = outcome.error or "failed"
        if progress is not None:
            progress(done + 1, len(targets))
    return result
