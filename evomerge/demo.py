"""`evomerge demo`: build the toy zoo, score merges of it with lm-eval, export the best one.

Until the study service lands, the demo shows the pieces a search is made of: a trained model
family, in-place merges scored by lm-eval on one reusable model object, and the streaming
export of the chosen recipe, which scores exactly like the merge that was evaluated.
"""

from __future__ import annotations

from pathlib import Path

import yaml

UNIFORM_WEIGHTS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
METRICS = ("toy_facts_a/acc", "toy_facts_b/acc", "toy_facts_c/acc")


def uniform_recipe(zoo: Path, weight: float) -> dict:
    return {
        "method": "task_arithmetic",
        "base": str(zoo / "base"),
        "sources": [
            {"model": str(zoo / "ft_a"), "parameters": {"weight": weight}},
            {"model": str(zoo / "ft_b"), "parameters": {"weight": weight}},
        ],
    }


def _row(label: str, metrics: dict[str, float]) -> str:
    cells = "  ".join(f"{metrics[m]:.2f}" for m in METRICS)
    return f"  {label:<28} {cells}   {(metrics[METRICS[0]] + metrics[METRICS[1]]) / 2:.3f}"


def run_demo(workdir: Path) -> None:
    """Build ``workdir/zoo`` if missing, score sources and uniform merges, export the best."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from evomerge.checkpoint import ModelFolder
    from evomerge.evaluate import build_evaluator
    from evomerge.merge.engine import InPlaceMerger, merge_to_folder
    from evomerge.merge.recipe import open_recipe_models, parse_recipe, plan_recipe
    from evomerge.progress import progress_bar
    from evomerge.toy_zoo import ToyZooSpec, build_toy_zoo, total_training_steps

    hf_logging.disable_progress_bar()
    workdir.mkdir(parents=True, exist_ok=True)
    zoo = workdir / "zoo"
    spec = ToyZooSpec()
    if not (zoo / "toy_zoo.json").exists():
        print(f"training the toy zoo into {zoo} (about 20 s) ...")
    with progress_bar("training", total_training_steps(spec)) as advance:
        done = [0]

        def step() -> None:
            done[0] += 1
            advance(done[0], total_training_steps(spec))

        build_toy_zoo(zoo, spec, on_step=step)

    def plan(recipe: dict):  # type: ignore[no-untyped-def]
        parsed = parse_recipe(recipe)
        return plan_recipe(parsed, open_recipe_models(parsed))

    plans = {w: plan(uniform_recipe(zoo, w)) for w in UNIFORM_WEIGHTS}
    merger = InPlaceMerger([ModelFolder(p) for p in plans[UNIFORM_WEIGHTS[0]].models])
    model = AutoModelForCausalLM.from_pretrained(zoo / "base", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(zoo / "base")
    evaluator = build_evaluator({"kind": "lm_eval", "tasks": ["toy_facts"]}, model, tokenizer)

    print("\nlm-eval accuracy on the fact sets (one model object, merged in place each time):")
    print(f"  {'model':<28} {'a':>4}  {'b':>4}  {'c':>4}   mean(a, b)")
    for index, name in enumerate(("base", "ft_a", "ft_b")):
        with torch.no_grad():
            for param_name, tensor in merger.tensors[index].items():
                model.get_parameter(param_name).copy_(tensor)
        print(_row(name, evaluator.evaluate().metrics))
    scores = {}
    for weight, candidate in plans.items():
        merger.merge_into(candidate, model)
        scores[weight] = evaluator.evaluate().metrics
        print(_row(f"task_arithmetic w={weight}", scores[weight]))

    best = max(scores, key=lambda w: scores[w][METRICS[0]] + scores[w][METRICS[1]])
    recipe_file = workdir / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(uniform_recipe(zoo, best), sort_keys=False))
    out = merge_to_folder(plans[best], workdir / "merged", force=True)
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    check = build_evaluator({"kind": "lm_eval", "tasks": ["toy_facts"]}, exported, tokenizer)
    same = check.evaluate().metrics == scores[best]
    print(
        f"\nbest uniform weight {best}: recipe {recipe_file}, exported to {out}; "
        f"reloaded with transformers it scores {'exactly the same' if same else 'DIFFERENTLY'}."
    )
    print(
        "No uniform weight keeps both fine-tunes' facts; the search (CMA-ES / Optuna over "
        "per-layer recipes, with the study service) finds per-layer merges that do."
    )
