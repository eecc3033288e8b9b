#!/usr/bin/env python
"""CMA-ES ``ask_ahead: 0`` vs ``ask_ahead: popsize``: search quality at equal trials, with a
study's asynchrony simulated.

W virtual workers share a simulated clock. A free worker asks the proposer for a genome; when
it gets none (a generation boundary) it idles until the next result arrives. Each genome is
really merged and scored in process (the toy zoo, as in ``bench_search.py``: objective the
mean of ``toy_facts_a/acc`` and ``toy_facts_b/acc``), but its result is told only at its
simulated finish time, ``start + duration``. Durations are uniform in [0.05, 0.5] s, drawn in
dispatch order from an RNG seeded by (seed, workers) alone (``--durations uniform``: the same
durations for both settings), or a function of the genome's bytes (``--durations genome``,
like the sleeping evaluator of ``bench_service.py``). Either way durations are unrelated to
fitness. A run dispatches ``--budget`` genomes and ends when all are told; results CMA-ES
drops as late (asked ahead, arriving after their generation's update) count as trials, as in a
study. The searched-on score is on the documents not held out (``--holdout``, 0.25 as in the
demo); the best genome of each run (by that score) is scored on the held-out documents too.

    nice -n 10 .venv/bin/python scripts/bench_ask_ahead.py --workers 2,4 --write section.md
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import heapq
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench_search import TASKS, proposer_config  # sets the offline environment, imports torch

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS = (25, 50, 100, 200)
LOW, HIGH = 0.05, 0.5

import torch  # noqa: E402


@dataclass
class Run:
    popsize: int
    ask_ahead: int
    workers: int
    durations: str
    seed: int
    curve: list[float] = field(default_factory=list)
    """Best-so-far searched-on score after each told result, in the order results arrive."""
    dropped: int = 0
    busy: float = 0.0
    makespan: float = 0.0
    generations: int = 0
    """CMA-ES generations updated (over all runs of the proposer, restarts included)."""
    restarts: int = 0
    starved: int = 0
    """Times a free worker got no genome (a generation boundary)."""
    held_out: float = math.nan
    best_searched: float = math.nan
    pycma_warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def at(self, n: int) -> float:
        return self.curve[min(n, len(self.curve)) - 1] if self.curve else math.nan

    @property
    def utilization(self) -> float:
        return self.busy / (self.workers * self.makespan) if self.makespan else math.nan


def genome_duration(genome: Any) -> float:
    """A duration in [LOW, HIGH] s from a hash of the genome's bytes."""
    digest = hashlib.sha256(genome.tobytes()).digest()
    return LOW + (HIGH - LOW) * int.from_bytes(digest[:8], "big") / 2**64


def is_late(proposer: Any, proposal_id: int) -> bool:
    """Whether CMA-ES will drop this result: its token's (run, generation, sample) is no longer
    the current one (private bookkeeping, read only to count drops)."""
    token = proposer._pending[proposal_id][1]
    current = (proposer._run, proposer._generation, proposer._sample)
    return (token[0], token[1], token[3]) != current


def score_held_out(search: Any, genome: Any) -> float:
    from evomerge.inprocess import objective_values
    from evomerge.merge.recipe import plan_recipe
    from evomerge.optimize import scalarize

    plan = plan_recipe(search.recipe(genome), search.folders)
    search.merger.merge_into(plan, search.model)
    metrics, _ = search.suite.evaluate(None, split="holdout")
    return scalarize(search.objectives, objective_values(search.objectives, metrics))


def simulate(search: Any, proposer: Any, run: Run, budget: int, holdout: bool) -> Run:
    """Dispatch ``budget`` genomes on ``run.workers`` virtual workers; tell each result at its
    simulated finish time."""
    from evomerge.optimize import scalarize

    rng = random.Random(f"durations-{run.seed}-{run.workers}")
    clock, free, dispatched, sequence = 0.0, run.workers, 0, 0
    in_flight: list[tuple[float, int, int, Any]] = []
    best, best_genome = math.nan, None
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        while True:
            while free and dispatched < budget:
                proposal = proposer.ask()
                if proposal is None:
                    run.starved += free  # every free worker idles until the next result
                    break
                trial = search.evaluate_genome(
                    dispatched, "proposal", f"proposal {proposal.id}", proposal.genome
                )
                if run.durations == "genome":
                    duration = genome_duration(proposal.genome)
                else:
                    duration = rng.uniform(LOW, HIGH)
                heapq.heappush(in_flight, (clock + duration, sequence, proposal.id, trial))
                sequence += 1
                run.busy += duration
                dispatched += 1
                free -= 1
            if not in_flight:
                break
            clock, _, proposal_id, trial = heapq.heappop(in_flight)
            free += 1
            run.dropped += is_late(proposer, proposal_id)
            if trial.status == "complete":
                proposer.tell(proposal_id, trial.values or [])
                value = scalarize(search.objectives, trial.values or [])
                if math.isnan(best) or value > best:
                    best, best_genome = value, trial.genome
            else:
                proposer.tell_failed(proposal_id, trial.error or "")
            run.curve.append(best)
    run.pycma_warnings = [str(w.message).split("\n")[0].strip() for w in caught]
    run.makespan = clock
    run.generations = sum(r["generations"] for r in proposer.runs) + proposer.generation
    run.restarts = proposer.restarts_done
    run.best_searched = best
    if holdout and best_genome is not None:
        run.held_out = score_held_out(search, best_genome)
    run.seconds = time.perf_counter() - start
    return run


def cell(values: list[float], digits: int = 3) -> str:
    if not values or any(math.isnan(v) for v in values):
        return "n/a"
    return f"{statistics.fmean(values):.{digits}f} ({min(values):.{digits}f})"


def commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        )
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return out.stdout.strip() + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def split_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--popsizes", default="4,9")
    parser.add_argument("--workers", default="2", help="virtual worker counts, e.g. 2,4")
    parser.add_argument(
        "--durations", default="uniform", help="uniform, genome, or both (uniform,genome)"
    )
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1")
    parser.add_argument("--budget", type=int, default=200, help="trials per run")
    parser.add_argument(
        "--holdout", type=float, default=0.25, help="held-out fraction per task; 0: none"
    )
    parser.add_argument("--space", default="task_arithmetic_per_layer")
    parser.add_argument("--zoo", type=Path, default=ROOT / ".bench" / "toy_zoo")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--write", type=Path, help="write the Markdown section to this file")
    args = parser.parse_args()
    popsizes, worker_counts = split_ints(args.popsizes), split_ints(args.workers)
    modes = [m.strip() for m in args.durations.split(",") if m.strip()]
    if any(m not in ("uniform", "genome") for m in modes) or not modes:
        parser.error("--durations takes uniform, genome or uniform,genome")
    if args.seeds < 1 or args.budget < 1 or min(popsizes + worker_counts, default=0) < 1:
        parser.error("--seeds, --budget, --popsizes and --workers must be at least 1")

    from evomerge.checkpoint import ModelFolder
    from evomerge.evaluate.harness import quiet_lm_eval_logs
    from evomerge.inprocess import InProcessSearch
    from evomerge.optimize import Objective, build_proposer, parse_proposer_config
    from evomerge.space import load_space
    from evomerge.toy_zoo import build_toy_zoo

    torch.set_num_threads(max(1, args.threads))
    quiet_lm_eval_logs()
    started = time.perf_counter()
    zoo = build_toy_zoo(args.zoo)
    space = load_space(args.space).bind(ModelFolder(zoo["base"]), ["ft_a", "ft_b"])
    objectives = [Objective(metric=f"{task}/acc", weight=0.5) for task in TASKS]
    evaluator: dict[str, Any] = {"kind": "lm_eval", "tasks": TASKS}
    if args.holdout > 0:
        evaluator["holdout"] = args.holdout
    search = InProcessSearch(
        space, zoo["base"], [zoo["ft_a"], zoo["ft_b"]], objectives, [evaluator]
    )
    x0 = space.uniform_genomes()[1].tolist()

    runs: list[Run] = []
    for mode in modes:
        for popsize in popsizes:
            for workers in worker_counts:
                for ask_ahead in (0, popsize):
                    for seed in range(args.seeds):
                        base = proposer_config("cma", seed, x0)
                        config = parse_proposer_config(
                            {**base, "popsize": popsize, "ask_ahead": ask_ahead}
                        )
                        proposer = build_proposer(config, space.dimension, objectives)
                        run = simulate(
                            search,
                            proposer,
                            Run(popsize, ask_ahead, workers, mode, seed),
                            args.budget,
                            args.holdout > 0,
                        )
                        runs.append(run)
                        print(
                            f"{mode} popsize {popsize} W {workers} ask_ahead {ask_ahead} "
                            f"seed {seed}: best {run.best_searched:.3f} held out "
                            f"{run.held_out:.3f}, dropped {run.dropped}, utilization "
                            f"{run.utilization:.1%}, {run.generations} generations, "
                            f"makespan {run.makespan:.1f} s, "
                            f"{len(run.pycma_warnings)} pycma warning(s), {run.seconds:.1f} s",
                            file=sys.stderr,
                        )
    total = time.perf_counter() - started

    checkpoints = [n for n in CHECKPOINTS if n <= args.budget]
    held = args.holdout > 0
    header = (
        "| durations | popsize | workers | ask_ahead | "
        + " | ".join(f"@{n}" for n in checkpoints)
        + (" | best: held out" if held else "")
        + " | generations (restarts) | utilization | makespan (s) | dropped late |"
    )
    table = [header, "|" + "---|" * (header.count("|") - 1)]
    groups: dict[tuple[str, int, int, int], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.durations, run.popsize, run.workers, run.ask_ahead), []).append(run)
    for (mode, popsize, workers, ask_ahead), group in groups.items():
        cells = [mode, str(popsize), str(workers), str(ask_ahead)]
        cells += [cell([r.at(n) for r in group]) for n in checkpoints]
        if held:
            cells.append(cell([r.held_out for r in group]))
        generations = statistics.fmean(r.generations for r in group)
        restarts = statistics.fmean(r.restarts for r in group)
        cells.append(f"{generations:.1f} ({restarts:.1f})")
        utilization = [100 * r.utilization for r in group]
        cells.append(f"{statistics.fmean(utilization):.1f}% ({min(utilization):.1f}%)")
        cells.append(f"{statistics.fmean(r.makespan for r in group):.1f}")
        cells.append(f"{statistics.fmean(r.dropped for r in group):.1f}")
        table.append("| " + " | ".join(cells) + " |")

    warned = sorted({w for r in runs for w in r.pycma_warnings})
    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPUs, CPU only, torch {torch.__version__} "
        f"({torch.get_num_threads()} thread)"
    )
    command = (
        "nice -n 10 .venv/bin/python scripts/bench_ask_ahead.py"
        + (f" --popsizes {args.popsizes}" if args.popsizes != "4,9" else "")
        + (f" --workers {args.workers}" if args.workers != "2" else "")
        + (f" --durations {args.durations}" if args.durations != "uniform" else "")
        + (f" --seeds {args.seeds}" if args.seeds != 3 else "")
        + (f" --budget {args.budget}" if args.budget != 200 else "")
        + (f" --holdout {args.holdout:g}" if args.holdout != 0.25 else "")
    )
    docs = (
        f"the documents not held out ({1 - args.holdout:.0%} of each task), at full fidelity"
        if held
        else "every document of each task, at full fidelity"
    )
    lines = [
        "## CMA-ES `ask_ahead`: search quality at equal trials (`scripts/bench_ask_ahead.py`)",
        "",
        f"Command: `{command}`. Machine: {machine}. Commit {commit()}, "
        f"{datetime.date.today().isoformat()}. Total {total:.0f} s wall.",
        "",
        f"CMA-ES as in `bench_search.py` (x0 the uniform 0.8 genome, sigma0 0.2) with `popsize` "
        f"set, `ask_ahead` 0 or `popsize`; seeds 0..{args.seeds - 1}. A simulated study: W "
        "virtual workers, each result told at start + a duration uniform in [0.05, 0.5] s ("
        "`uniform`: drawn in dispatch order from an RNG seeded by seed and W, the same for both "
        "settings; `genome`: from a hash of the genome); a worker that gets no genome at a "
        "generation boundary idles until the next result. Every genome is really merged and "
        f"scored in process. {args.budget} trials per run; results dropped as late count as "
        "trials (a study records them). @N: best-so-far searched-on score (mean of "
        f"toy_facts_a/acc and toy_facts_b/acc on {docs}) after N results, in arrival order: "
        "mean over seeds (worst seed in parentheses)."
        + (
            " Best: held out: the run's best genome (by searched-on score) scored on the "
            "held-out documents."
            if held
            else ""
        )
        + " Generations: CMA-ES updates per run (restarts in parentheses), mean. Utilization: "
        "simulated busy time / (W x makespan), mean (worst); makespan and dropped: mean per "
        "run.",
        "",
        *table,
        "",
        "pycma warnings during the runs: "
        + ("; ".join(f"`{w[:120]}`" for w in warned) if warned else "none")
        + ".",
    ]
    report = "\n".join(lines)
    print(report)
    if args.write:
        args.write.write_text(report + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
