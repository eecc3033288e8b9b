#!/usr/bin/env python
"""Search efficiency: best-so-far mean accuracy on fact sets a and b vs evaluations, per proposer.

One in-process search on the toy zoo (models loaded and evaluators built once) is reused for
every (proposer, seed) run; each run is ``search.run(proposer, budget, baselines=False)``, so
every evaluation is a proposal. The objective is the mean of ``toy_facts_a/acc`` and
``toy_facts_b/acc`` (two objectives, weight 0.5 each; multi-objective samplers get both, the
others their scalarization). The baselines (each source alone, the uniform merges) are
evaluated once, as reference lines. Writes a Markdown section into BENCHMARKS.md with
``--write``; saves ``.bench/bench_search.png`` too when matplotlib is importable.

    .venv/bin/python scripts/bench_search.py --seeds 3 --budget 200 --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from bench_report import markers, write_section  # noqa: E402

MARK_BEGIN, MARK_END = markers("bench_search")
CHECKPOINTS = (10, 25, 50, 100, 200)
TARGET = 0.95
PLOT_ROWS, PLOT_COLS = 21, 50  # one row per 0.025 from 0.5 to 1.0
PLOT_LOW, PLOT_HIGH = 0.5, 1.0
TASKS = ["toy_facts_a", "toy_facts_b"]


@dataclass
class Run:
    proposer: str
    seed: int
    curve: list[float]
    """Best-so-far after each evaluation (NaN until the first complete trial)."""
    evaluations: int
    failed: int
    seconds: float
    eval_seconds: float
    """Time spent merging and evaluating (the rest is the proposer and the loop)."""

    def at(self, n: int) -> float:
        """Best-so-far after ``n`` evaluations; a run that ended early keeps its last value."""
        if not self.curve:
            return math.nan
        return self.curve[min(n, len(self.curve)) - 1]

    def reached(self, target: float) -> int | None:
        """Evaluations until the best-so-far first reaches ``target`` (None if never)."""
        for i, value in enumerate(self.curve):
            if value >= target - 1e-12:
                return i + 1
        return None


def proposer_config(kind: str, seed: int, x0: list[float] | None) -> dict[str, Any]:
    if kind == "cma":
        return {"kind": "cma", "seed": seed, "sigma0": 0.2, **({"x0": x0} if x0 else {})}
    if kind == "nsga2":
        return {"kind": "nsga2", "seed": seed, "population_size": 20}
    return {"kind": kind, "seed": seed}


def config_text(kind: str) -> str:
    if kind == "cma":
        return "`cma`: x0 = the uniform 0.8 genome, sigma0 0.2, no restarts"
    if kind == "nsga2":
        return "`nsga2`: population_size 20"
    return f"`{kind}`: defaults"


def best_so_far(trials: list[Any], objectives: list[Any]) -> list[float]:
    from evomerge.optimize import scalarize

    curve, best = [], math.nan
    for trial in trials:
        if trial.status == "complete":
            value = scalarize(objectives, trial.values or [])
            best = value if math.isnan(best) else max(best, value)
        curve.append(best)
    return curve


def fmt(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3f}"


def ascii_plot(
    curves: dict[str, list[float]], budget: int, reference: float | None
) -> tuple[list[str], dict[str, str]]:
    """A fixed-width chart of mean best-so-far curves: one letter per proposer."""
    letters: dict[str, str] = {}
    for name in curves:
        letter = next(
            (c for c in name.upper() + "ABDEFGHIJKLMOPQSUVWXYZ" if c.isalpha()),
            "?",
        )
        while letter in letters.values() or letter == "*":
            letter = chr(ord("A") + (ord(letter) - ord("A") + 1) % 26)
        letters[name] = letter
    grid = [[" "] * PLOT_COLS for _ in range(PLOT_ROWS)]

    def row_of(value: float) -> int | None:
        if math.isnan(value) or value < PLOT_LOW - 1e-9 or value > PLOT_HIGH + 1e-9:
            return None
        frac = (value - PLOT_LOW) / (PLOT_HIGH - PLOT_LOW)
        return PLOT_ROWS - 1 - math.floor(frac * (PLOT_ROWS - 1) + 1e-9)  # the row at or below

    if reference is not None and (r := row_of(reference)) is not None:
        grid[r] = ["-"] * PLOT_COLS
    for col in range(PLOT_COLS):
        n = max(1, round((col + 1) * budget / PLOT_COLS))
        for name, curve in curves.items():
            if not curve:
                continue
            r = row_of(curve[min(n, len(curve)) - 1])
            if r is None:
                continue
            cell = grid[r][col]
            grid[r][col] = letters[name] if cell in (" ", "-") else "*"
    lines = []
    for r, cells in enumerate(grid):
        value = PLOT_HIGH - r * (PLOT_HIGH - PLOT_LOW) / (PLOT_ROWS - 1)
        label = f"{value:.3f}" if r % 2 == 0 else ""
        lines.append(f"{label:>5} |{''.join(cells)}")
    lines.append("      +" + "-" * PLOT_COLS)
    middle = str(budget // 2)
    axis = "1".ljust(PLOT_COLS // 2 - len(middle) // 2) + middle
    axis = axis.ljust(PLOT_COLS - len(str(budget))) + str(budget)
    lines.append("       " + axis)
    lines.append("       " + "evaluations".center(PLOT_COLS))
    return lines, letters


def save_png(
    path: Path, runs: dict[str, list[Run]], budget: int, references: list[tuple[str, float]]
) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = list(range(1, budget + 1))
    for name, group in runs.items():
        mean = [statistics.fmean(r.at(n) for r in group) for n in xs]
        (line,) = ax.plot(xs, mean, label=name)
        low = [min(r.at(n) for r in group) for n in xs]
        high = [max(r.at(n) for r in group) for n in xs]
        ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.15)
    for label, value in references:
        ax.axhline(value, linestyle="--", linewidth=0.8, color="grey")
        ax.annotate(label, (budget, value), fontsize=7, ha="right", va="bottom", color="grey")
    ax.set_xlabel("evaluations")
    ax.set_ylabel("best-so-far mean accuracy (a, b)")
    ax.set_ylim(PLOT_LOW, PLOT_HIGH + 0.01)
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def uniform_label(space: Any, index: int) -> str:
    parts = []
    for name, parameter in space.space.parameters.items():
        values = parameter.uniform_values()
        parts.append(f"{name} {values[min(index, len(values) - 1)]:g}")
    return f"uniform merge ({', '.join(parts)})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--proposers", default="cma,tpe,nsga2,random")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1 per proposer")
    parser.add_argument("--budget", type=int, default=200, help="evaluations per run")
    parser.add_argument("--space", default="task_arithmetic_per_layer")
    parser.add_argument("--zoo", type=Path, default=ROOT / ".bench" / "toy_zoo")
    parser.add_argument("--png", type=Path, default=ROOT / ".bench" / "bench_search.png")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: the toy model is tiny, and on a shared "
        "2-CPU machine 2 threads competing with another process run many times slower)",
    )
    parser.add_argument("--write", type=Path, help="update this Markdown file's bench_search part")
    args = parser.parse_args()
    if args.seeds < 1 or args.budget < 1:
        parser.error("--seeds and --budget must be at least 1")
    kinds = [k.strip() for k in args.proposers.split(",") if k.strip()]

    from evomerge.checkpoint import ModelFolder
    from evomerge.evaluate.harness import quiet_lm_eval_logs
    from evomerge.inprocess import InProcessSearch
    from evomerge.optimize import (
        Objective,
        build_proposer,
        parse_proposer_config,
        scalarize,
    )
    from evomerge.space import load_space
    from evomerge.toy_zoo import build_toy_zoo

    torch.set_num_threads(max(1, args.threads))
    quiet_lm_eval_logs()
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
    started = time.perf_counter()
    zoo = build_toy_zoo(args.zoo)
    space = load_space(args.space).bind(ModelFolder(zoo["base"]), ["ft_a", "ft_b"])
    objectives = [Objective(metric=f"{task}/acc", weight=0.5) for task in TASKS]
    for kind in kinds:  # fail fast on a bad proposer name, before any model is loaded
        parse_proposer_config({"kind": kind})
    search = InProcessSearch(
        space,
        zoo["base"],
        [zoo["ft_a"], zoo["ft_b"]],
        objectives,
        [{"kind": "lm_eval", "tasks": TASKS}],
    )
    setup_seconds = time.perf_counter() - started

    baselines = search.baselines()
    references: list[tuple[str, float]] = []
    uniform = [t for t in baselines if t.role == "uniform" and t.status == "complete"]
    if uniform:
        best_uniform = max(uniform, key=lambda t: scalarize(objectives, t.values or []))
        index = [t for t in baselines if t.role == "uniform"].index(best_uniform)
        references.append(
            (
                f"best {uniform_label(space, index)}",
                scalarize(objectives, best_uniform.values or []),
            )
        )
    for trial in baselines:
        if trial.role == "source" and trial.status == "complete":
            references.append(
                (f"source `{trial.label}` alone", scalarize(objectives, trial.values or []))
            )
    print(
        "baselines: " + ", ".join(f"{label} {value:.3f}" for label, value in references),
        file=sys.stderr,
    )

    x0 = space.uniform_genomes()[1].tolist() if len(space.uniform_genomes()) > 1 else None
    runs: dict[str, list[Run]] = {}
    for kind in kinds:
        for seed in range(args.seeds):
            config = parse_proposer_config(proposer_config(kind, seed, x0))
            proposer = build_proposer(config, space.dimension, objectives)
            start = time.perf_counter()
            result = search.run(proposer, args.budget, baselines=False)
            seconds = time.perf_counter() - start
            run = Run(
                proposer=kind,
                seed=seed,
                curve=best_so_far(result.trials, objectives),
                evaluations=len(result.trials),
                failed=sum(t.status == "failed" for t in result.trials),
                seconds=seconds,
                eval_seconds=sum(t.merge_seconds + t.eval_seconds for t in result.trials),
            )
            runs.setdefault(kind, []).append(run)
            print(
                f"{kind} seed {seed}: best {fmt(run.at(args.budget))} after "
                f"{run.evaluations} evaluations, {run.failed} failed, {seconds:.1f} s",
                file=sys.stderr,
            )
    total_seconds = time.perf_counter() - started
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan

    checkpoints = [n for n in CHECKPOINTS if n <= args.budget]
    if args.budget not in checkpoints and args.budget < CHECKPOINTS[-1]:
        checkpoints.append(args.budget)
    header = (
        "| proposer | "
        + " | ".join(f"@{n}" for n in checkpoints)
        + f" | evals to {TARGET} (median) | reached | failed | ms/eval (proposer) |"
    )
    lines_table = [header, "|" + "---|" * (len(checkpoints) + 5)]
    ended_early = []
    for kind, group in runs.items():
        cells = []
        for n in checkpoints:
            values = [r.at(n) for r in group]
            if any(math.isnan(v) for v in values):
                cells.append("n/a")
            else:
                cells.append(f"{statistics.fmean(values):.3f} ({min(values):.3f})")
        hits = [r.reached(TARGET) for r in group]
        median = statistics.median([h if h is not None else math.inf for h in hits])
        to_target = "—" if math.isinf(median) else f"{median:g}"
        reached = f"{sum(h is not None for h in hits)}/{len(group)}"
        failed = sum(r.failed for r in group)
        evaluations = sum(r.evaluations for r in group)
        ms = 1000 * sum(r.seconds for r in group) / max(1, evaluations)
        proposer_ms = 1000 * sum(r.seconds - r.eval_seconds for r in group) / max(1, evaluations)
        cells += [to_target, reached, str(failed), f"{ms:.0f} ({proposer_ms:.0f})"]
        lines_table.append(f"| {kind} | " + " | ".join(cells) + " |")
        ended_early += [r for r in group if r.evaluations < args.budget]
    for label, value in references:
        cells = [fmt(value)] * len(checkpoints) + [""] * 4
        lines_table.append(f"| *{label}* | " + " | ".join(cells) + " |")

    mean_curves = {
        kind: [statistics.fmean(r.at(n) for r in group) for n in range(1, args.budget + 1)]
        for kind, group in runs.items()
    }
    plot, letters = ascii_plot(mean_curves, args.budget, references[0][1] if uniform else None)
    png = save_png(args.png, runs, args.budget, references)

    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    command = (
        ".venv/bin/python scripts/bench_search.py"
        + (f" --proposers {','.join(kinds)}" if kinds != ["cma", "tpe", "nsga2", "random"] else "")
        + (f" --space {args.space}" if args.space != "task_arithmetic_per_layer" else "")
        + (f" --threads {args.threads}" if args.threads != 1 else "")
        + f" --seeds {args.seeds} --budget {args.budget} --write BENCHMARKS.md"
    )
    legend = ", ".join(f"{letter} = {kind}" for kind, letter in letters.items())
    early = (
        f" {len(ended_early)} run(s) ended before the budget (the proposer finished: "
        + ", ".join(f"{r.proposer} seed {r.seed} after {r.evaluations}" for r in ended_early)
        + "); their best-so-far is carried forward."
        if ended_early
        else ""
    )
    shared = [k for k in ("tpe", "nsga2") if k in kinds]
    if "random" in kinds and shared:
        early += (
            " For a given seed, "
            + " and ".join(
                {"tpe": "tpe's 10 startup", "nsga2": "nsga2's first-generation (20)"}[k]
                for k in shared
            )
            + " proposals are the random sampler's first proposals, so the early curves "
            "coincide."
        )
    lines = [
        MARK_BEGIN,
        "## Search efficiency per proposer (`scripts/bench_search.py`)",
        "",
        f"Command: `{command}`. Machine: {machine} ({torch.get_num_threads()} torch "
        f"thread(s)); load average (1 min) before / after "
        f"{load_before:.2f} / {load_after:.2f} (the CPUs are shared). Space "
        f"`{args.space}` ({space.dimension} genes) over the toy zoo's `ft_a`, `ft_b`; objective "
        f"the mean of `toy_facts_a/acc` and `toy_facts_b/acc` (two objectives, weight 0.5 each; "
        "nsga2, tpe and random get both, cma their weighted sum). One in-process search "
        "(models loaded, evaluators built once) serves every run; each run is "
        f"`search.run(proposer, {args.budget}, baselines=False)` with seeds "
        f"0..{args.seeds - 1}, so every evaluation is a proposal. Proposers: "
        + "; ".join(config_text(k) for k in kinds)
        + ".",
        "",
        f"Best-so-far mean accuracy after N evaluations: mean over {args.seeds} seed(s) "
        "(worst seed in parentheses). Evals to "
        f"{TARGET}: median over seeds (a seed that never reaches it counts as infinite; — if "
        "the median does). ms/eval: wall time of the runs per evaluation, in parentheses the "
        "part outside merging and evaluating (proposer and loop). Reference rows (italic) are "
        f"the baselines, evaluated once.{early}",
        "",
        *lines_table,
        "",
        f"Mean best-so-far vs evaluations ({legend}, * = several; the row of `-` = best "
        f"uniform merge; a value is drawn in the row at or below it, rows 0.025 apart):",
        "",
        "```text",
        *plot,
        "```",
        "",
        f"Total {total_seconds:.0f} s ({setup_seconds:.1f} s building the zoo, loading models "
        "and building the evaluator).",
        MARK_END,
    ]
    report = "\n".join(lines)
    print(report)
    print(f"saved {args.png}" if png else "matplotlib not importable: no PNG", file=sys.stderr)
    if args.write:
        write_section(args.write, "bench_search", report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
