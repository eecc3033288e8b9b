#!/usr/bin/env python
"""Searched merge vs the best uniform merge of the same space, per space, on the toy zoo.

For each space (a ready space's name or a YAML file, so an older copy of a space can be compared
with the current one): the space's uniform baselines, then CMA-ES (seed ``--seed``, sigma0 0.2,
starting from the mean of the uniform genomes, as a study does) for ``--budget`` proposals, in
one process (no Ray, no database). The score is the mean of ``toy_facts_a/acc`` and
``toy_facts_b/acc`` on all their documents, the same documents the search chose on (no
holdout), so the searched best is an optimistic estimate. Prints a Markdown table: space,
genes, budget (and the proposals run: CMA-ES may stop early), best uniform score, searched
best score, gain.

    .venv/bin/python scripts/bench_ties_space.py ties_per_layer task_arithmetic_per_layer \\
        --budget 100
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]

import numpy as np  # noqa: E402
import torch  # noqa: E402

TASKS = ["toy_facts_a", "toy_facts_b"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spaces", nargs="+", help="ready space names or space YAML files")
    parser.add_argument("--budget", type=int, default=100, help="proposals per space")
    parser.add_argument("--seed", type=int, default=0, help="CMA-ES seed")
    parser.add_argument("--zoo", type=Path, default=ROOT / ".bench" / "toy_zoo")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    if args.budget < 1:
        parser.error("--budget must be at least 1")

    from evomerge.checkpoint import ModelFolder
    from evomerge.evaluate.harness import quiet_lm_eval_logs
    from evomerge.inprocess import InProcessSearch
    from evomerge.optimize import Objective, build_proposer, parse_proposer_config, scalarize
    from evomerge.space import load_space
    from evomerge.toy_zoo import build_toy_zoo

    torch.set_num_threads(max(1, args.threads))
    quiet_lm_eval_logs()
    zoo = build_toy_zoo(args.zoo)
    objectives = [Objective(metric=f"{task}/acc", weight=0.5) for task in TASKS]
    rows = []
    for name in args.spaces:
        started = time.perf_counter()
        space = load_space(name).bind(ModelFolder(zoo["base"]), ["ft_a", "ft_b"])
        search = InProcessSearch(
            space,
            zoo["base"],
            [zoo["ft_a"], zoo["ft_b"]],
            objectives,
            [{"kind": "lm_eval", "tasks": TASKS}],
        )
        uniform = [t for t in search.baselines() if t.role == "uniform" and t.status == "complete"]
        best_uniform = max(uniform, key=lambda t: scalarize(objectives, t.values or []))
        uniform_score = scalarize(objectives, best_uniform.values or [])
        x0 = np.mean(space.uniform_genomes(), axis=0).tolist()
        config = parse_proposer_config({"kind": "cma", "seed": args.seed, "sigma0": 0.2, "x0": x0})
        proposer = build_proposer(config, space.dimension, objectives)
        result = search.run(proposer, args.budget, baselines=False)
        best = result.best("proposal")
        searched = scalarize(objectives, best.values or [])
        seconds = time.perf_counter() - started
        rows.append(
            (
                f"`{name}`",
                str(space.dimension),
                f"{args.budget} ({len(result.trials)} run)",
                f"{uniform_score:.3f} ({best_uniform.label})",
                f"{searched:.3f}",
                f"{searched - uniform_score:+.3f}",
                f"{seconds:.0f}",
            )
        )
        print(f"{name}: {' | '.join(rows[-1][1:])}", file=sys.stderr)
    header = ("space", "genes", "budget", "best uniform", "searched best", "gain", "seconds")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(
        f"\nCMA-ES seed {args.seed}, sigma0 0.2, x0 = mean of the uniform genomes; scores: mean "
        "accuracy on toy_facts_a and toy_facts_b, all documents (the ones searched on)."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
