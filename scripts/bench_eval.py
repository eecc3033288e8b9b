#!/usr/bin/env python
"""Per-candidate evaluation overhead: evomerge's reused ``evaluate()`` vs ``simple_evaluate``.

For each candidate the model's weights change in place (a small seeded perturbation, undone
afterwards) and the toy zoo's ``toy_facts`` group is scored. Forward-pass time is measured with
hooks on the model; overhead is the rest of the call (request building, tokenization, batching,
metric aggregation). Writes a Markdown section into BENCHMARKS.md with ``--write``.

    .venv/bin/python scripts/bench_eval.py --candidates 30 --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from bench_report import markers, write_section  # noqa: E402

MARK_BEGIN, MARK_END = markers("bench_eval")


class ForwardTimer:
    """Sums the wall time spent inside ``model.forward`` (outermost calls only)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.total = 0.0
        self._start = 0.0
        model.register_forward_pre_hook(self._pre)
        model.register_forward_hook(self._post)

    def _pre(self, *_: object) -> None:
        self._start = time.perf_counter()

    def _post(self, *_: object) -> None:
        self.total += time.perf_counter() - self._start


def perturbations(model: torch.nn.Module, count: int):  # type: ignore[no-untyped-def]
    """Yield ``count`` times with the weights perturbed in place; restore them after each."""
    generator = torch.Generator().manual_seed(0)
    params = [p for p in model.parameters() if p.ndim == 2]
    for _ in range(count):
        noise = [torch.randn(p.shape, generator=generator) * 1e-3 for p in params]
        with torch.no_grad():
            for p, n in zip(params, noise, strict=True):
                p.add_(n)
        yield
        with torch.no_grad():
            for p, n in zip(params, noise, strict=True):
                p.sub_(n)


def measure(run, model, timer: ForwardTimer, candidates: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    totals, forwards = [], []
    run()  # warm-up: first builds, lazy imports
    for _ in perturbations(model, candidates):
        timer.total = 0.0
        start = time.perf_counter()
        run()
        totals.append(time.perf_counter() - start)
        forwards.append(timer.total)
    overheads = [t - f for t, f in zip(totals, forwards, strict=True)]
    return {
        "total_ms": 1000 * statistics.median(totals),
        "forward_ms": 1000 * statistics.median(forwards),
        "overhead_ms": 1000 * statistics.median(overheads),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=30)
    parser.add_argument("--tasks", default="toy_facts")
    parser.add_argument("--limit", type=int, default=None, help="docs per task (default all)")
    parser.add_argument("--zoo", type=Path, default=ROOT / ".bench" / "toy_zoo")
    parser.add_argument("--write", type=Path, help="update this Markdown file's bench_eval part")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.evaluate import build_evaluator
    from evomerge.evaluate.harness import bundled_suites_dir, quiet_lm_eval_logs
    from evomerge.toy_zoo import build_toy_zoo

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    paths = build_toy_zoo(args.zoo)
    model = AutoModelForCausalLM.from_pretrained(paths["ft_a"], dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(paths["ft_a"])
    timer = ForwardTimer(model)
    tasks = args.tasks.split(",")

    evaluator = build_evaluator({"kind": "lm_eval", "tasks": tasks}, model, tokenizer)
    reuse = measure(lambda: evaluator.evaluate(args.limit), model, timer, args.candidates)

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    quiet_lm_eval_logs()
    manager = TaskManager(include_path=str(bundled_suites_dir()), include_defaults=False)
    lm = evaluator.lm  # the same HFLM, so only the per-call work differs

    def simple() -> None:
        simple_evaluate(
            model=lm,
            tasks=tasks,
            task_manager=manager,
            limit=args.limit,
            bootstrap_iters=100,
            log_samples=False,
            verbosity="ERROR",
        )

    baseline = measure(simple, model, timer, max(5, args.candidates // 3))

    rows = [
        ("evomerge `evaluate()` reuse", reuse),
        ("lm-eval `simple_evaluate` per candidate", baseline),
    ]
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    docs = "all" if args.limit is None else str(args.limit)
    lines = [
        MARK_BEGIN,
        "## Evaluation overhead per candidate (`scripts/bench_eval.py`)",
        "",
        f"Command: `.venv/bin/python scripts/bench_eval.py --candidates {args.candidates}"
        f"{'' if args.limit is None else f' --limit {args.limit}'} --write BENCHMARKS.md`. "
        f"Machine: {machine}. Tasks: {', '.join(tasks)} (docs per task: {docs}) on the toy zoo's "
        "`ft_a`; each candidate perturbs the weights in place first. Medians; overhead is the "
        "call's wall time minus the time inside the model's forward passes.",
        "",
        "| path | total ms | forward ms | overhead ms |",
        "|---|---|---|---|",
        *(
            f"| {name} | {r['total_ms']:.1f} | {r['forward_ms']:.1f} | {r['overhead_ms']:.1f} |"
            for name, r in rows
        ),
        "",
        f"Overhead ratio simple_evaluate / reuse: "
        f"{baseline['overhead_ms'] / reuse['overhead_ms']:.1f}x. Target: <= 10 ms overhead.",
        MARK_END,
    ]
    report = "\n".join(lines)
    print(report)
    if args.write:
        write_section(args.write, "bench_eval", report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
