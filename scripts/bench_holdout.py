"""How optimistic is a study's best score? The demo's study (toy zoo, per-layer task
arithmetic, CMA-ES, 125 trials, `holdout: 0.25`) run for real on 2 Ray workers; then, for the
searched best and for the best uniform merge (each chosen by its searched-on score), the score
on the searched-on documents, on the held-out documents, and the gap.

    .venv/bin/python scripts/bench_holdout.py [--workdir DIR] [--budget N] [--seed S]

Scores are the demo's objective: the mean of toy_facts_a/acc and toy_facts_b/acc, at full
fidelity (every searched-on document: 75% of each task), and on the 25% held out.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import yaml


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--budget", type=int, default=125)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-holdout-"))

    from evomerge.demo import study_yaml
    from evomerge.optimize import scalarize
    from evomerge.study.config import load_study_config
    from evomerge.study.driver import StudyDriver
    from evomerge.study.store import StudyStore
    from evomerge.toy_zoo import build_toy_zoo

    build_toy_zoo(workdir / "zoo")
    path = study_yaml(workdir)
    data = yaml.safe_load(path.read_text())
    data.update(budget=args.budget, name=f"holdout-{args.seed}")
    data["proposer"]["seed"] = args.seed
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    config = load_study_config(path)
    store = StudyStore(config.storage or "")
    summary = StudyDriver(store, config).run()
    print(f"study {config.name}: {summary.reason}")

    objectives = config.objectives
    trials = [t for t in store.trials(config.name, ["COMPLETE"]) if t.values(objectives)]

    def search(t):  # type: ignore[no-untyped-def]
        return scalarize(objectives, t.values(objectives))

    def held(t):  # type: ignore[no-untyped-def]
        values = t.values(objectives, "holdout")
        return None if values is None else scalarize(objectives, values)

    rows = [
        ("searched best", max((t for t in trials if t.role == "proposal"), key=search)),
        ("best uniform", max((t for t in trials if t.role == "uniform"), key=search)),
        ("best source alone", max((t for t in trials if t.role == "source"), key=search)),
    ]
    print(f"\n{'':<20} {'trial':>5} {'searched-on':>12} {'held out':>9} {'gap':>7}")
    for name, trial in rows:
        h = held(trial)
        gap = "-" if h is None else f"{search(trial) - h:+.3f}"
        h_text = "-" if h is None else f"{h:.3f}"
        print(f"{name:<20} {trial.number:>5} {search(trial):>12.3f} {h_text:>9} {gap:>7}")


if __name__ == "__main__":
    main()
