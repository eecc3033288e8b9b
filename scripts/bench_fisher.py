#!/usr/bin/env python
"""Benchmark ``evomerge fisher`` and Fisher merging on the toy zoo (about a minute on 2 cores).

(a) Cost: ``evomerge fisher`` (in process, the command's own code path) on the toy zoo's ft_a,
    on the lm-eval task toy_facts_a (60 documents of 3 tokens) and on the held-out text
    (non-overlapping windows of 128 tokens), at several batch sizes. Reported: the estimate's
    own seconds (fisher.json; model loading and writing excluded), input tokens per second and
    seconds per 1,000 input tokens.
(b) Quality: the Fisher of ft_a on toy_facts_a and of ft_b on toy_facts_b (all documents,
    batch size 1), then the mean accuracy on toy_facts_a/b/c of the fisher merge of ft_a + ft_b
    (weights 1, 1, default floor), the uniform average (linear 0.5/0.5) and task arithmetic at
    weight 0.8 each (the best uniform merge in the toy zoo design notes).

Usage: python scripts/bench_fisher.py [--workdir DIR]   (prints a markdown table)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / "evaluators" / "text" / "toy_facts_heldout.txt"
TASKS = ["toy_facts_a", "toy_facts_b", "toy_facts_c"]


def run_fisher(model: Path, out: Path, *args: str) -> dict:
    from evomerge.cli import main

    argv = ["fisher", str(model), "--out", str(out), "--force", "--quiet", *args]
    with contextlib.redirect_stdout(io.StringIO()):
        if main(argv) != 0:
            raise SystemExit(f"evomerge {' '.join(argv)} failed")
    return json.loads((out / "fisher.json").read_text())


def score(folder: Path) -> dict[str, float]:
    from evomerge.evaluate.model_loading import load_model_for_eval
    from evomerge.evaluate.suite import score_model

    model, tokenizer = load_model_for_eval(folder)
    metrics, _ = score_model(model, tokenizer, [{"kind": "lm_eval", "tasks": TASKS}], None)
    return {task: metrics[f"{task}/acc"] for task in TASKS}


def merge(recipe: dict, out: Path, work: Path) -> Path:
    import yaml

    from evomerge.merge.config_file import plan_from_file
    from evomerge.merge.engine import merge_to_folder

    path = work / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    plan, _ = plan_from_file(path)
    return merge_to_folder(plan, out, force=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="where the zoo and outputs go (default tmp)")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_fisher-"))
    work.mkdir(parents=True, exist_ok=True)

    import torch

    from evomerge.progress import no_transformers_bars
    from evomerge.toy_zoo import build_toy_zoo

    start = time.perf_counter()
    with no_transformers_bars(), contextlib.redirect_stderr(io.StringIO()):
        zoo = build_toy_zoo(work / "zoo")
        cost_rows = []
        for data, batches in (
            (["--tasks", "toy_facts_a"], (1, 16)),
            (["--text", str(TEXT), "--max-length", "128"], (1, 4)),
        ):
            for batch in batches:
                record = run_fisher(zoo["ft_a"], work / "cost", *data, "--batch-size", str(batch))
                tokens, seconds = record["input_tokens"], record["seconds"]
                cost_rows.append(
                    (
                        f"`evomerge fisher ft_a {' '.join(data).replace(str(ROOT) + '/', '')}"
                        f" --batch-size {batch}`",
                        record["samples"],
                        tokens,
                        seconds,
                        tokens / seconds,
                        1000 * seconds / tokens,
                    )
                )
        fa = work / "fisher_a"
        fb = work / "fisher_b"
        run_fisher(zoo["ft_a"], fa, "--tasks", "toy_facts_a")
        run_fisher(zoo["ft_b"], fb, "--tasks", "toy_facts_b")
        a, b, base = str(zoo["ft_a"]), str(zoo["ft_b"]), str(zoo["base"])
        recipes = {
            "fisher (weights 1, 1; floor 1e-3 of the mean)": {
                "method": "fisher",
                "sources": [{"model": a, "fisher": str(fa)}, {"model": b, "fisher": str(fb)}],
            },
            "linear 0.5 / 0.5 (uniform average)": {
                "method": "linear",
                "sources": [
                    {"model": a, "parameters": {"weight": 0.5}},
                    {"model": b, "parameters": {"weight": 0.5}},
                ],
            },
            "task arithmetic 0.8 / 0.8": {
                "method": "task_arithmetic",
                "base": base,
                "sources": [
                    {"model": a, "parameters": {"weight": 0.8}},
                    {"model": b, "parameters": {"weight": 0.8}},
                ],
            },
        }
        quality = {}
        for index, (label, recipe) in enumerate(recipes.items()):
            quality[label] = score(merge(recipe, work / f"merged{index}", work))
        quality["ft_a (source)"] = score(zoo["ft_a"])
        quality["ft_b (source)"] = score(zoo["ft_b"])

    print(
        f"## evomerge fisher on the toy zoo ({platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, CPU, float32)\n"
    )
    print("| command | samples | input tokens | seconds | tokens/s | s per 1,000 tokens |")
    print("|---|---|---|---|---|---|")
    for command, samples, tokens, seconds, rate, per_k in cost_rows:
        print(f"| {command} | {samples} | {tokens} | {seconds:.3f} | {rate:.0f} | {per_k:.3f} |")
    print(
        "\nFisher of ft_a on toy_facts_a and of ft_b on toy_facts_b (all 60 documents each, "
        "--batch-size 1); accuracy (value token is the arg-max after `k =`):\n"
    )
    print("| merge of ft_a + ft_b | toy_facts_a | toy_facts_b | toy_facts_c | mean |")
    print("|---|---|---|---|---|")
    for label, acc in quality.items():
        mean = sum(acc.values()) / len(acc)
        cells = " | ".join(f"{acc[t]:.3f}" for t in TASKS)
        print(f"| {label} | {cells} | {mean:.3f} |")
    print(
        f"\nCommand: `python scripts/bench_fisher.py`; total {time.perf_counter() - start:.0f} s."
    )
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
