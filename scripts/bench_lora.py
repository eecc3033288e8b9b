#!/usr/bin/env python
"""Benchmark LoRA adapters as study sources: a worker's memory and its per-candidate build time.

For each family, a :class:`MergeWorker` is built in a fresh process over sources
``[adapter, ft_a]`` (a rank-``--rank`` PEFT LoRA on every Linear of the base, random B) and over
``[ft_b, ft_a]`` (two full fine-tunes). Printed per case: the bytes the worker holds for base and
sources (``MergeWorker.resident_bytes``), the process RSS after the worker loaded and its growth
while it loaded, and the median over ``--candidates`` task-arithmetic candidates (random
weights) of the in-place build phases (``result.timings``: ``merge_math``, ``copy``). The worker
scores each candidate with a no-op Python evaluator, so only the build is timed.

Families: the toy zoo (``--zoo``, built once and reused) and a random Llama family
(``--hidden``, ``--intermediate``, ``--layers``; ``--hidden 0`` skips it). Example::

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_lora.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NOOP = "def noop(model, tokenizer, limit=None):\n    return {'zero': 0.0}\n"


def rss_bytes() -> int:
    """The current resident set size of this process (Linux /proc; else the peak)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def make_adapter(base: Path, out: Path, rank: int) -> Path:
    """A PEFT LoRA adapter of ``base`` (every Linear, random B so the delta is not zero)."""
    import peft
    from transformers import AutoModelForCausalLM

    if (out / "adapter_config.json").is_file():
        return out
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = peft.LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        peft.get_peft_model(model, config).save_pretrained(out)
    return out


def measure(case: dict[str, Any]) -> dict[str, Any]:
    """Run in a fresh process: build the worker, then time ``candidates`` builds."""
    import numpy as np

    from evomerge.cluster.worker import CandidateTask, MergeWorker, WorkerSpec

    torch.set_num_threads(case["threads"])
    before = rss_bytes()
    start = time.perf_counter()
    spec = WorkerSpec(
        base=case["base"],
        sources=case["sources"],
        evaluators=[{"kind": "python", "function": f"{case['noop']}:noop"}],
        device=case["device"],
        torch_threads=case["threads"],
    )
    worker = MergeWorker(spec, "bench")
    load = time.perf_counter() - start
    after = rss_bytes()
    rng = np.random.default_rng(0)
    math_s, copy_s, merge_s = [], [], []
    for key in range(case["candidates"] + 1):  # the first one warms up
        weights = rng.uniform(0.3, 1.2, size=len(case["sources"]))
        recipe = {
            "method": "task_arithmetic",
            "base": case["base"],
            "sources": [
                {"model": s, "parameters": {"weight": float(w)}}
                for s, w in zip(case["sources"], weights, strict=True)
            ],
        }
        result = worker.run(CandidateTask(key, recipe))
        if result.status != "complete":
            raise SystemExit(f"candidate {key} failed: {result.error}")
        if key:
            math_s.append(result.timings["merge_math"])
            copy_s.append(result.timings["copy"])
            merge_s.append(result.merge_seconds)
    return {
        "resident_bytes": worker.resident_bytes(),
        "rss_bytes": after,
        "rss_growth_bytes": after - before,
        "load_seconds": load,
        "merge_math_ms": 1e3 * statistics.median(math_s),
        "copy_ms": 1e3 * statistics.median(copy_s),
        "merge_ms": 1e3 * statistics.median(merge_s),
    }


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, __file__, "--case", json.dumps(case)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    if done.returncode != 0:
        raise SystemExit(f"case {case['name']} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zoo", type=Path, default=ROOT / ".bench" / "toy_zoo")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512, help="random family; 0 skips it")
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--candidates", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(measure(json.loads(args.case))))
        return

    from evomerge.random_family import build_random_family
    from evomerge.toy_zoo import build_toy_zoo

    started = time.perf_counter()
    families: list[tuple[str, dict[str, Path]]] = []
    zoo = build_toy_zoo(args.zoo)
    families.append(("toy zoo (hidden 128, 4 layers, fp32)", zoo))
    with tempfile.TemporaryDirectory(prefix="bench_lora_") as tmp:
        work = Path(tmp)
        noop = work / "noop.py"
        noop.write_text(NOOP)
        if args.hidden:
            family = build_random_family(
                work / "family",
                sources=2,
                hidden=args.hidden,
                intermediate=args.intermediate,
                layers=args.layers,
            )
            named = {"base": family["base"], "ft_a": family["ft_0"], "ft_b": family["ft_1"]}
            label = f"random Llama (hidden {args.hidden}, {args.layers} layers, fp32)"
            families.append((label, named))
        rows = []
        for label, paths in families:
            adapter = make_adapter(paths["base"], work / f"lora_{len(rows)}", args.rank)
            for kind, first in (("adapter + ft_a", adapter), ("ft_b + ft_a", paths["ft_b"])):
                case = {
                    "name": f"{label}: {kind}",
                    "base": str(paths["base"]),
                    "sources": [str(first), str(paths["ft_a"])],
                    "noop": str(noop),
                    "device": args.device,
                    "threads": args.threads,
                    "candidates": args.candidates,
                }
                rows.append((label, kind, run_case(case)))
    command = "HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_lora.py " + " ".join(sys.argv[1:])
    print(f"`{command.strip()}`")
    print(
        f"\nMachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, device {args.device}, {args.threads} torch thread(s); "
        f"LoRA rank {args.rank} on every Linear; task arithmetic over base + 2 sources, median "
        f"of {args.candidates} candidates.\n"
    )
    print(
        "| family | sources | resident (MiB) | RSS after load (MiB) | RSS growth (MiB) "
        "| build merge_math (ms) | build copy (ms) | build total (ms) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for label, kind, r in rows:
        print(
            f"| {label} | {kind} | {mib(r['resident_bytes'])} | {mib(r['rss_bytes'])} "
            f"| {mib(r['rss_growth_bytes'])} | {r['merge_math_ms']:.1f} | {r['copy_ms']:.1f} "
            f"| {r['merge_ms']:.1f} |"
        )
    print(f"\n({time.perf_counter() - started:.0f} s in all)")


if __name__ == "__main__":
    main()
