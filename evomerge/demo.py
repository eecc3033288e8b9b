"""`evomerge demo`: build a tiny model family, merge it from a recipe, and check the result."""

from __future__ import annotations

from pathlib import Path

import yaml

DEMO_RECIPE = {
    "method": "ties",
    "base": "zoo/base",
    "sources": [
        {"model": "zoo/ft_0", "parameters": {"weight": [0.3, 0.7], "density": 0.5}},
        {
            "model": "zoo/ft_1",
            "parameters": {
                "weight": [{"kind": "attention", "value": 0.8}, {"value": [0.7, 0.3]}],
                "density": 0.5,
            },
        },
    ],
    "parameters": {"lambda": 1.0},
}


def run_demo(workdir: Path) -> None:
    """Build ``workdir/zoo`` if missing, merge it with a per-layer TIES recipe, load the result."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from evomerge.cli import main as cli_main
    from evomerge.zoo import build_random_family

    hf_logging.disable_progress_bar()
    workdir.mkdir(parents=True, exist_ok=True)
    if not (workdir / "zoo" / "ft_1" / "config.json").exists():
        print(f"building a tiny model family in {workdir / 'zoo'} ...")
        build_random_family(workdir / "zoo", sources=2, seed=0)
    recipe = workdir / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(DEMO_RECIPE, sort_keys=False))
    print(f"recipe {recipe}:\n{recipe.read_text()}")
    code = cli_main(["merge", str(recipe), str(workdir / "merged"), "--force"])
    if code:
        raise SystemExit(code)
    model = AutoModelForCausalLM.from_pretrained(workdir / "merged", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(workdir / "merged")
    ids = tokenizer("w1 w2 w3", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    print(
        f"loaded the merge with transformers: {sum(p.numel() for p in model.parameters())} "
        f"parameters, logits {list(logits.shape)}, finite: {bool(torch.isfinite(logits).all())}"
    )
    print(
        "The search itself (CMA-ES / Optuna over per-layer recipes) arrives with the study service."
    )
