#!/usr/bin/env python
"""Which merge method to try first: every method's default merge, and its searched per-layer
merge at one budget, on the toy zoo.

For each method: its default merge (the recipe below: mergekit's defaults, weights 1 where a
method takes them, ``ft_b`` alone for methods of one source), and, for each ready space of that
method (``search_spaces/*_per_layer.yaml`` and the spaces in ``SPACES_EXTRA``), the best of the
space's uniform baselines and the best of ``--budget`` proposals (CMA-ES, seed ``--seed``,
sigma0 0.2, from the mean of the uniform genomes, as a study starts; or ``--proposer tpe``,
with a method choice as native categorical parameters), all in one process (no Ray, no
database).

Scores: the mean of ``toy_facts_a/acc`` and ``toy_facts_b/acc``. Each task holds out
``--holdout`` of its documents (the study's ``holdout`` split): the search and the choice of
the best use the other documents ("searched-on"); the chosen merges are then scored once on the
held-out documents, which nothing was chosen on. Full fidelity (every document of the split).

    .venv/bin/python scripts/bench_methods.py --budget 60 --seed 0
    .venv/bin/python scripts/bench_methods.py --only tsv_per_layer,iso_c_per_layer
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]

import torch  # noqa: E402

TASKS = ["toy_facts_a", "toy_facts_b"]
TWO = ["ft_a", "ft_b"]

# method -> (sources, shared parameters, per-source parameters) of its default merge
DEFAULTS: dict[str, tuple[list[str], dict[str, Any], dict[str, Any]]] = {
    "linear": (TWO, {}, {"weight": 1.0}),
    "model_stock": (TWO, {}, {}),
    "slerp": (["ft_b"], {"t": 0.5}, {}),
    "task_arithmetic": (TWO, {}, {"weight": 1.0}),
    "ties": (TWO, {}, {"weight": 1.0, "density": 0.5}),
    "dare_ties": (TWO, {}, {"weight": 1.0, "density": 0.5}),
    "dare_linear": (TWO, {}, {"weight": 1.0, "density": 0.5}),
    "breadcrumbs": (TWO, {}, {"weight": 1.0, "density": 0.9}),
    "breadcrumbs_ties": (TWO, {}, {"weight": 1.0, "density": 0.9}),
    "della": (TWO, {}, {"weight": 1.0, "density": 0.5}),
    "della_linear": (TWO, {}, {"weight": 1.0, "density": 0.5}),
    "nuslerp": (TWO, {}, {"weight": 1.0}),
    "multislerp": (TWO, {}, {"weight": 1.0}),
    "karcher": (TWO, {}, {}),
    "nearswap": (["ft_b"], {"t": 0.001}, {}),
    "sce": (TWO, {}, {}),
    "ram": (TWO, {}, {}),
    "ramplus_tl": (TWO, {}, {}),
    "arcee_fusion": (["ft_b"], {}, {}),
    "tsv": (TWO, {}, {}),
    "iso_c": (TWO, {}, {}),
    "iso_cts": (TWO, {}, {}),
}
SKIPPED = {"fisher", "fisher_task_arithmetic", "passthrough"}  # need diagonals; not a merge
SPACES_EXTRA = ["ties_family_choice"]  # ready spaces not named *_per_layer


def spaces_by_method() -> dict[str, list[str]]:
    from evomerge.space import SEARCH_SPACES_DIR, load_space

    names = [p.stem for p in sorted(SEARCH_SPACES_DIR.glob("*_per_layer.yaml"))]
    names += [n for n in SPACES_EXTRA if (SEARCH_SPACES_DIR / f"{n}.yaml").exists()]
    found: dict[str, list[str]] = {}
    for name in names:
        space = load_space(name)
        if space.method in SKIPPED:
            continue
        key = "method choice" if getattr(space, "method_choice", None) else space.method
        found.setdefault(key, []).append(name)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=60, help="proposals per space")
    parser.add_argument("--seed", type=int, default=0, help="proposer seed")
    parser.add_argument(
        "--proposer",
        choices=["cma", "tpe"],
        default="cma",
        help="cma: CMA-ES, sigma0 0.2, from the mean of the uniform genomes; tpe: Optuna TPE "
        "(method choices as native categorical parameters)",
    )
    parser.add_argument("--holdout", type=float, default=0.25, help="held-out share per task")
    parser.add_argument("--only", default="", help="comma-separated methods or space names")
    parser.add_argument("--zoo", type=Path, default=ROOT / ".bench" / "toy_zoo")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    if args.budget < 1:
        parser.error("--budget must be at least 1")

    from evomerge.checkpoint import ModelFolder
    from evomerge.evaluate.harness import quiet_lm_eval_logs
    from evomerge.inprocess import InProcessSearch
    from evomerge.merge.recipe import parse_recipe, plan_recipe
    from evomerge.merge.registry import available_methods, get_method
    from evomerge.optimize import Objective, scalarize
    from evomerge.space import build_space_proposer, load_space
    from evomerge.toy_zoo import build_toy_zoo

    torch.set_num_threads(max(1, args.threads))
    quiet_lm_eval_logs()
    zoo = build_toy_zoo(args.zoo)
    objectives = [Objective(metric=f"{task}/acc", weight=0.5) for task in TASKS]
    evaluators = [{"kind": "lm_eval", "tasks": TASKS, "holdout": args.holdout}]
    only = {x.strip() for x in args.only.split(",") if x.strip()}
    missing = sorted(set(available_methods()) - set(DEFAULTS) - SKIPPED)
    if missing:
        print(f"no default merge written for: {', '.join(missing)}", file=sys.stderr)
    by_method = spaces_by_method()
    searches: dict[tuple[str, ...], InProcessSearch] = {}

    def search_for(space_name: str, sources: list[str]) -> InProcessSearch:
        space = load_space(space_name).bind(ModelFolder(zoo["base"]), sources)
        key = tuple(sources)
        if key not in searches:
            searches[key] = InProcessSearch(
                space, zoo["base"], [zoo[s] for s in sources], objectives, evaluators
            )
        searches[key].space = space
        return searches[key]

    def score(search: InProcessSearch, recipe: Any, split: str) -> float:
        plan = plan_recipe(recipe, search.folders)
        search.merger.merge_into(plan, search.model)
        metrics, _ = search.suite.evaluate(None, split)
        return scalarize(objectives, [metrics[o.metric] for o in objectives])

    rows: list[tuple[str, ...]] = []
    methods = [m for m in DEFAULTS if m in available_methods()] + (
        ["method choice"] if "method choice" in by_method else []
    )
    for method in methods:
        spaces = by_method.get(method, [])
        if only and method not in only and not (only & set(spaces)):
            continue
        started = time.perf_counter()
        if method in DEFAULTS:
            sources, shared, per_source = DEFAULTS[method]
            search = search_for("task_arithmetic_global", sources)
            recipe = parse_recipe(
                {
                    "method": method,
                    "base": str(zoo["base"]),
                    "sources": [
                        {"model": str(zoo[s]), "label": s, "parameters": dict(per_source)}
                        for s in sources
                    ],
                    "parameters": dict(shared),
                },
                where=f"default {method} merge",
            )
            default = (score(search, recipe, "search"), score(search, recipe, "holdout"))
            summary = get_method(method).summary
            rows.append(
                (
                    method,
                    "default merge",
                    "1",
                    f"{default[0]:.3f}",
                    f"{default[1]:.3f}",
                    summary,
                )
            )
            print(" | ".join(rows[-1]), file=sys.stderr)
        for space_name in spaces:
            if only and method not in only and space_name not in only:
                continue
            space = load_space(space_name)
            sources = ["ft_b"] if get_method(space.method).max_sources == 1 else TWO
            search = search_for(space_name, sources)
            bound = search.space
            uniform = [t for t in search.baselines() if t.role == "uniform"]
            uniform = [t for t in uniform if t.status == "complete"]
            best_uniform = max(uniform, key=lambda t: scalarize(objectives, t.values or []))
            settings: dict[str, Any] = {"kind": args.proposer, "seed": args.seed}
            if args.proposer == "cma":  # x0: the mean of the uniform genomes, as a study
                settings["sigma0"] = 0.2
            proposer = build_space_proposer(settings, bound, objectives)
            result = search.run(proposer, args.budget, baselines=False)
            best = result.best("proposal")
            for label, trial in (("best uniform", best_uniform), ("searched best", best)):
                searched_on = scalarize(objectives, trial.values or [])
                held_out = score(search, trial.recipe, "holdout")
                trials = len(uniform) if label == "best uniform" else len(result.trials)
                rows.append(
                    (
                        method,
                        f"`{space_name}` {label}"
                        + (f" ({trial.label})" if label == "best uniform" else ""),
                        str(trials),
                        f"{searched_on:.3f}",
                        f"{held_out:.3f}",
                        f"{bound.dimension} genes",
                    )
                )
                print(" | ".join(rows[-1]), file=sys.stderr)
        print(f"{method}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    header = ("method", "merge", "trials", "searched-on", "held out", "notes")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
    print(
        f"\n{args.proposer} seed {args.seed}, budget {args.budget}; scores: mean accuracy on "
        f"toy_facts_a and toy_facts_b, full fidelity, on the searched-on documents "
        f"({1 - args.holdout:.0%} of each task) and on the held-out ones ({args.holdout:.0%})."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
