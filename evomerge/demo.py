"""`evomerge demo`: the study service end to end on the toy zoo, on the embedded defaults.

It trains the toy zoo (once), writes a study YAML next to it, and runs that study exactly as
``evomerge search`` would: a local Ray instance with 2 workers, an SQLite study database, the
baselines (each fine-tune alone, uniform task-arithmetic merges), then CMA-ES over per-layer
task-arithmetic weights, every candidate merged in place on a worker and scored by lm-eval.
A quarter of each task's documents is held out: the search never sees them, and when it ends
the front and the baselines are scored on them. Then it prints the baselines against the best
merge, on the searched-on and on the held-out documents, and the Pareto front, and exports the
best trial (verified: the exported checkpoint scores what the database recorded).

Run it again and it reuses the zoo and the study: a finished study is only reported and
exported again, a stopped one (Ctrl-C) is resumed.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import yaml

STUDY = "demo"
BUDGET = 125  # 5 baselines + 120 proposals
METRICS = ("toy_facts_a/acc", "toy_facts_b/acc", "toy_facts_c/acc")
HOLDOUT = 0.25
"""The share of each task's documents the search never sees (scored when it ends)."""


def study_yaml(workdir: Path) -> Path:
    """Write the demo's study YAML (paths relative to it) and return its path."""
    config: dict[str, Any] = {
        "name": STUDY,
        "storage": "evomerge_studies.db",
        "base": "zoo/base",
        "sources": ["zoo/ft_a", "zoo/ft_b"],
        "space": "task_arithmetic_per_layer",
        "proposer": {"kind": "cma", "seed": 0, "sigma0": 0.2},
        "objectives": [
            {"metric": "toy_facts_a/acc", "weight": 0.5},
            {"metric": "toy_facts_b/acc", "weight": 0.5},
        ],
        "evaluators": [
            {
                "kind": "lm_eval",
                "tasks": ["toy_facts_a", "toy_facts_b", "toy_facts_c"],
                "holdout": HOLDOUT,
            }
        ],
        "budget": BUDGET,
        "cluster": {"workers": 2},
        "export": {"verify": True},
    }
    path = workdir / "demo_study.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_demo(workdir: Path) -> None:
    """Build ``workdir/zoo`` if missing, run (or resume) the study, export the best merge."""
    from evomerge.progress import no_transformers_bars

    with no_transformers_bars():
        _run_demo(workdir)


def _run_demo(workdir: Path) -> None:
    from evomerge.progress import progress_bar
    from evomerge.study.config import load_study_config
    from evomerge.study.driver import StudyDriver
    from evomerge.study.live import live_progress
    from evomerge.study.store import StudyStore
    from evomerge.toy_zoo import ToyZooSpec, build_toy_zoo, total_training_steps

    workdir.mkdir(parents=True, exist_ok=True)
    zoo = workdir / "zoo"
    spec = ToyZooSpec()
    if not (zoo / "toy_zoo.json").exists():
        print(f"training the toy zoo into {zoo} (about 30 s) ...")
    with progress_bar("training", total_training_steps(spec)) as advance:
        done = [0]

        def step() -> None:
            done[0] += 1
            advance(done[0], total_training_steps(spec))

        build_toy_zoo(zoo, spec, on_step=step)

    config = load_study_config(study_yaml(workdir))
    store = StudyStore(config.storage or "")
    if not store.has_study(STUDY):
        driver = StudyDriver(store, config)
        print(
            f"study '{STUDY}': {driver.space.dimension} per-layer task-arithmetic weights, "
            f"CMA-ES, {BUDGET} trials on 2 Ray workers, recorded in {config.storage} ..."
        )
    elif store.study(STUDY)["status"] != "finished":
        driver = StudyDriver.for_stored(store, STUDY)
        print(f"resuming study '{STUDY}' ({driver.finished} of {BUDGET} trials done) ...")
    else:
        driver = None
        print(f"study '{STUDY}' is already finished in {config.storage}")
    if driver is not None:
        with live_progress(STUDY) as show:
            summary = driver.run(on_progress=show)
        if summary.status == "stopped":
            print("stopped; run the demo again to resume the study")
            return
    _print_results(store, config.objectives)
    _export(store, workdir, config.storage or "")


def _print_results(store: Any, objectives: list[Any]) -> None:
    from evomerge.optimize import scalarize
    from evomerge.study.report import pareto_report

    trials = [t for t in store.trials(STUDY, ["COMPLETE"]) if t.values(objectives)]
    best = max(
        (t for t in trials if t.role == "proposal"),
        key=lambda t: scalarize(objectives, t.values(objectives)),
    )
    print(f"\n  {'model':<36} {'a':>5} {'b':>5} {'c':>5}   mean(a, b)   held out")
    for trial in [*(t for t in trials if t.role != "proposal"), best]:
        label = f"searched (trial {trial.number}, best)" if trial is best else trial.label
        m = trial.metrics
        held = trial.values(objectives, "holdout")
        held_text = "-" if held is None else f"{scalarize(objectives, held):.3f}"
        print(
            f"  {label:<36} {m[METRICS[0]]:5.2f} {m[METRICS[1]]:5.2f} {m[METRICS[2]]:5.2f}   "
            f"{scalarize(objectives, trial.values(objectives)):10.3f}   {held_text:>8}"
        )
    print(
        f"  (accuracy on the {1 - HOLDOUT:.0%} of the documents the search selected on; "
        f"'held out': on the other {HOLDOUT:.0%}, never searched on)"
    )
    print()
    print(pareto_report(store, STUDY))


def _export(store: Any, workdir: Path, storage: str) -> None:
    from evomerge.study.export import export_trial
    from evomerge.util import evomerge_command

    result = export_trial(store, STUDY, "best", workdir / "merged", force=True)
    verdict = "scores exactly what the database recorded" if result.verified else "not verified"
    print(
        f"\nexported trial {result.number} to {result.path}; reloaded with transformers it "
        f"{verdict}."
    )
    run, where = evomerge_command(), f"--storage {shlex.quote(storage)} --study {STUDY}"
    print(
        "Look closer:\n"
        f"  {run} status {where}\n"
        f"  {run} pareto {where} --plot pareto.png\n"
        f"  {run} export {where} --trial best --by holdout --out merged2"
    )
