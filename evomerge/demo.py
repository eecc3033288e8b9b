"""`evomerge demo`: train the toy zoo, search for a per-layer merge, export the best one.

Until the study service lands, the demo runs the search in this process: the baselines (each
fine-tune alone, uniform task-arithmetic merges), then CMA-ES over per-layer task-arithmetic
recipes, every candidate merged in place into one model object and scored by lm-eval. The best
recipe is exported by the streaming merge and reloaded with transformers, and it scores exactly
as it did in the search.
"""

from __future__ import annotations

from pathlib import Path

import yaml

BUDGET = 120
OBJECTIVES = (
    {"metric": "toy_facts_a/acc", "weight": 0.5},
    {"metric": "toy_facts_b/acc", "weight": 0.5},
)


def run_demo(workdir: Path) -> None:
    """Build ``workdir/zoo`` if missing, search, export the best merge to ``workdir/merged``."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from evomerge.checkpoint import ModelFolder
    from evomerge.evaluate import build_evaluator
    from evomerge.merge.engine import merge_to_folder
    from evomerge.merge.recipe import plan_recipe
    from evomerge.optimize import Objective, build_proposer, parse_proposer_config
    from evomerge.progress import progress_bar
    from evomerge.search import InProcessSearch
    from evomerge.space import load_space
    from evomerge.toy_zoo import ToyZooSpec, build_toy_zoo, total_training_steps

    hf_logging.disable_progress_bar()
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

        paths = build_toy_zoo(zoo, spec, on_step=step)

    objectives = [Objective(**o) for o in OBJECTIVES]
    evaluators = [{"kind": "lm_eval", "tasks": ["toy_facts_a", "toy_facts_b", "toy_facts_c"]}]
    space = load_space("task_arithmetic_per_layer").bind(
        ModelFolder(paths["base"]), ["ft_a", "ft_b"]
    )
    search = InProcessSearch(
        space, paths["base"], [paths["ft_a"], paths["ft_b"]], objectives, evaluators
    )
    x0 = space.uniform_genomes()[1].tolist()
    proposer = build_proposer(
        parse_proposer_config({"kind": "cma", "seed": 0, "sigma0": 0.2, "x0": x0}),
        space.dimension,
        objectives,
    )
    print(
        f"searching {space.dimension} per-layer task-arithmetic weights with CMA-ES: "
        f"{BUDGET} candidates, each merged in place and scored by lm-eval ..."
    )
    with progress_bar("searching", BUDGET) as advance:
        count = [0]

        def on_trial(_trial: object) -> None:
            count[0] += 1
            advance(count[0], BUDGET)

        result = search.run(proposer, BUDGET, on_trial=on_trial)

    print(f"\n  {'model':<34} {'a':>5} {'b':>5} {'c':>5}   mean(a, b)")
    best = result.best(role="proposal")
    rows = [t for t in result.trials if t.role != "proposal"] + [best]
    for trial in rows:
        m = trial.metrics
        label = "searched (best of CMA-ES)" if trial is best else trial.label
        print(
            f"  {label:<34} {m['toy_facts_a/acc']:5.2f} {m['toy_facts_b/acc']:5.2f} "
            f"{m['toy_facts_c/acc']:5.2f}   {(trial.values[0] + trial.values[1]) / 2:.3f}"
        )

    recipe_file = workdir / "best_recipe.yaml"
    recipe_file.write_text(
        yaml.safe_dump(best.recipe.model_dump(exclude_defaults=True), sort_keys=False)
    )
    plan = plan_recipe(best.recipe, search.folders)
    out = merge_to_folder(plan, workdir / "merged", force=True)
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    check = build_evaluator(evaluators[0], exported, search.tokenizer).evaluate().metrics
    same = check == best.metrics
    print(
        f"\nbest recipe: {recipe_file}\nexported with the streaming merge to {out}; reloaded "
        f"with transformers it scores {'exactly as in the search' if same else 'DIFFERENTLY'}."
    )
    print(
        "Next: the study service runs this search on Ray workers with a resumable database "
        "(evomerge search/resume/pareto/export)."
    )
