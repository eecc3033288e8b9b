#!/usr/bin/env python
"""Data-flow search on the toy zoo: PS alone, DFS alone, and PS then DFS at one total budget,
against each source alone and the best uniform merge; and what a DFS candidate costs.

Arms, each ``--budget`` N candidates per seed:

- **PS**: ``task_arithmetic_per_layer`` for N proposals.
- **DFS**: the ready space ``dfs`` (paths through the sources' layers) for N proposals.
- **PS then DFS**: the PS search's first N/2 proposals (the PS arm's own first N/2: same seed,
  same proposals), then a data-flow space over that stage's best merge and the sources
  (``models: [{label: merge, recipe: ...}, sources]``, repeats 2) for the other N/2.

Every candidate runs through a study's worker path in this process
(:class:`evomerge.cluster.worker.MergeWorker`, ``CandidateTask`` / ``CandidateResult``): no
Ray, no database. Proposers: CMA-ES (seed S, sigma0 0.2, from the space's start genome, as a
study starts) or ``--proposer tpe``.

Scores: the mean of ``toy_facts_a/acc`` and ``toy_facts_b/acc``, at full fidelity (every
document of the split). Each task holds out ``--holdout`` of its documents (the study's
``holdout`` split): the search and the choice of each arm's best use the other documents
("searched-on"); the chosen candidates are then scored once on the held-out ones.

    .venv/bin/python scripts/bench_dfs.py --budget 120 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]

TASKS = ["toy_facts_a", "toy_facts_b"]
TWO = ["ft_a", "ft_b"]
PS_SPACE = "task_arithmetic_per_layer"
DFS_SPACE = "dfs"


@dataclass
class Scored:
    """One candidate: its recipe, searched-on score and the worker's timings."""

    recipe: dict[str, Any]
    score: float
    values: list[float]
    merge_seconds: float
    eval_seconds: float
    hold_seconds: float = 0.0
    depth: int | None = None  # path length of a DFS candidate


@dataclass
class Arm:
    trials: list[Scored] = field(default_factory=list)

    def best(self) -> Scored:
        """The highest searched-on score (the earliest on ties)."""
        return max(self.trials, key=lambda t: t.score)


class Bench:
    """One MergeWorker over the toy zoo; scores recipes on either split."""

    def __init__(self, zoo: dict[str, Path], holdout: float, threads: int) -> None:
        from evomerge.cluster.worker import MergeWorker, WorkerSpec
        from evomerge.optimize import Objective

        self.zoo = zoo
        self.base = str(zoo["base"])
        self.sources = [str(zoo[s]) for s in TWO]
        self.objectives = [Objective(metric=f"{task}/acc", weight=0.5) for task in TASKS]
        spec = WorkerSpec(
            base=self.base,
            sources=self.sources,
            evaluators=[{"kind": "lm_eval", "tasks": TASKS, "holdout": holdout}],
            device="cpu",
            torch_threads=threads,
        )
        self.worker = MergeWorker(spec, "bench")
        self.key = 0

    def run(self, recipe: dict[str, Any], split: str = "search") -> Scored:
        from evomerge.cluster.worker import CandidateTask
        from evomerge.optimize import scalarize

        self.key += 1
        result = self.worker.run(CandidateTask(key=self.key, recipe=recipe, split=split))
        if result.status != "complete":
            raise SystemExit(f"candidate {self.key} failed: {result.error}\nrecipe: {recipe}")
        values = [result.metrics[o.metric] for o in self.objectives]
        path = recipe.get("path")
        return Scored(
            recipe=recipe,
            score=scalarize(self.objectives, values),
            values=values,
            merge_seconds=result.merge_seconds,
            eval_seconds=result.eval_seconds,
            hold_seconds=float(result.timings.get("hold", 0.0)),
            depth=len(path) if path is not None else None,
        )

    def search(self, bound: Any, settings: dict[str, Any], budget: int, arm: Arm) -> None:
        """Ask/tell ``budget`` proposals of ``bound``'s space into ``arm``."""
        from evomerge.space import build_space_proposer

        proposer = build_space_proposer(settings, bound, self.objectives)
        for _ in range(budget):
            proposal = proposer.ask()
            if proposal is None:
                break
            recipe = bound.decode(proposal.genome, self.base, self.sources)
            scored = self.run(recipe.model_dump(exclude_defaults=True))
            proposer.tell(proposal.id, scored.values)
            arm.trials.append(scored)


def source_recipe(path: str, label: str) -> dict[str, Any]:
    """A source alone, as a study's baseline builds it: linear, weight 1."""
    return {
        "method": "linear",
        "sources": [{"model": path, "label": label, "parameters": {"weight": 1.0}}],
    }


def fmt(values: list[float]) -> str:
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.3f}"
    return f"{mean:.3f} ({' / '.join(f'{v:.3f}' for v in values)})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=120, help="candidates per arm and seed")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated proposer seeds")
    parser.add_argument("--proposer", choices=["cma", "tpe"], default="cma")
    parser.add_argument("--holdout", type=float, default=0.25, help="held-out share per task")
    parser.add_argument("--zoo", type=Path, default=ROOT / ".bench" / "toy_zoo")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    if args.budget < 2:
        parser.error("--budget must be at least 2 (PS then DFS splits it in halves)")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if not seeds:
        parser.error("--seeds names no seed")

    from evomerge.checkpoint import ModelFolder
    from evomerge.evaluate.harness import quiet_lm_eval_logs
    from evomerge.space import load_space, parse_space
    from evomerge.toy_zoo import build_toy_zoo

    quiet_lm_eval_logs()
    started = time.perf_counter()
    zoo = build_toy_zoo(args.zoo)
    bench = Bench(zoo, args.holdout, args.threads)
    base_folder = ModelFolder(zoo["base"])
    print(f"zoo and worker ready: {time.perf_counter() - started:.1f} s", file=sys.stderr)

    def settings(seed: int) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": args.proposer, "seed": seed}
        if args.proposer == "cma":
            out["sigma0"] = 0.2
        return out

    # references: each source alone, the PS space's best uniform merge, DFS's start path
    ps_bound = load_space(PS_SPACE).bind(base_folder, TWO)
    dfs_bound = load_space(DFS_SPACE).bind(base_folder, TWO)
    references: list[tuple[str, Scored, Scored]] = []
    for label, path in zip(TWO, bench.sources, strict=True):
        recipe = source_recipe(path, label)
        references.append((f"{label} alone", bench.run(recipe), bench.run(recipe, "holdout")))
    uniform = []
    for label, genome in ps_bound.uniform_baselines():
        recipe = ps_bound.decode(genome, bench.base, bench.sources)
        uniform.append((label, bench.run(recipe.model_dump(exclude_defaults=True))))
    label, best_uniform = max(uniform, key=lambda u: u[1].score)
    references.append(
        (
            f"best uniform merge (`{PS_SPACE}`, {label}, of {len(uniform)})",
            best_uniform,
            bench.run(best_uniform.recipe, "holdout"),
        )
    )
    for label, genome in dfs_bound.uniform_baselines():
        recipe = dfs_bound.decode(genome, bench.base, bench.sources)
        dumped = recipe.model_dump(exclude_defaults=True)
        name = f"`{DFS_SPACE}` start ({label})"
        references.append((name, bench.run(dumped), bench.run(dumped, "holdout")))

    half = args.budget // 2
    ps_stage = half
    dfs_stage = args.budget - half
    arms: dict[str, list[tuple[Scored, float]]] = {"PS": [], "DFS": [], "PS then DFS": []}
    ps_runs: list[Arm] = []
    dfs_runs: list[Arm] = []
    combo_runs: list[Arm] = []
    combo_dims: list[int] = []
    stage_bests: list[float] = []
    for seed in seeds:
        t0 = time.perf_counter()
        ps = Arm()
        bench.search(ps_bound, settings(seed), args.budget, ps)
        dfs = Arm()
        bench.search(dfs_bound, settings(seed), args.budget, dfs)
        stage_best = max(ps.trials[:ps_stage], key=lambda t: t.score)
        combo_space = parse_space(
            {
                "kind": "dataflow",
                "name": "ps_then_dfs",
                "models": [{"label": "merge", "recipe": stage_best.recipe}, "sources"],
                "repeats": 2,
            },
            "bench",
        )
        combo_bound = combo_space.bind(base_folder, TWO)
        combo_dims.append(combo_bound.dimension)
        combo = Arm(trials=list(ps.trials[:ps_stage]))
        bench.search(combo_bound, settings(seed), dfs_stage, combo)
        for name, arm in (("PS", ps), ("DFS", dfs), ("PS then DFS", combo)):
            best = arm.best()
            arms[name].append((best, bench.run(best.recipe, "holdout").score))
        again = bench.run(ps.best().recipe)  # the model restored after path candidates?
        if abs(again.score - ps.best().score) > 1e-9:
            print(
                f"WARNING seed {seed}: PS best rescored {again.score:.4f} after DFS candidates, "
                f"{ps.best().score:.4f} before",
                file=sys.stderr,
            )
        for name, arm in (("DFS", dfs), ("PS then DFS, DFS stage", Arm(combo.trials[ps_stage:]))):
            best = arm.best()
            steps = " ".join(
                f"{step['model']}.L{step['layer']}"
                + (f"x{step['scale']:.2f}" if step.get("scale", 1.0) != 1.0 else "")
                for step in best.recipe["path"]
            )
            print(f"  seed {seed} {name} best {best.score:.3f}: {steps}", file=sys.stderr)
        stage_bests.append(max(t.score for t in combo.trials[ps_stage:]))
        ps_runs.append(ps)
        dfs_runs.append(dfs)
        combo_runs.append(Arm(trials=combo.trials[ps_stage:]))
        summary = ", ".join(
            f"{name} {arms[name][-1][0].score:.3f}/{arms[name][-1][1]:.3f}" for name in arms
        )
        print(f"seed {seed}: {summary} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)

    print("| merge | trials | searched-on | held out |")
    print("|---|---|---|---|")
    for label, searched, held in references:
        print(f"| {label} | 1 | {searched.score:.3f} | {held.score:.3f} |")
    spaces = {
        "PS": f"`{PS_SPACE}`, {ps_bound.dimension} genes",
        "DFS": f"`{DFS_SPACE}`, {dfs_bound.dimension} genes",
        "PS then DFS": (
            f"{ps_stage} PS + {dfs_stage} DFS over [merge, ft_a, ft_b], {combo_dims[0]} genes"
        ),
    }
    for name, results in arms.items():
        searched = [best.score for best, _ in results]
        held = [h for _, h in results]
        print(f"| {name} best ({spaces[name]}) | {args.budget} | {fmt(searched)} | {fmt(held)} |")
    depths = {name: [b.depth for b, _ in arms[name]] for name in ("DFS", "PS then DFS")}
    combo_from_dfs = sum(1 for best, _ in arms["PS then DFS"] if best.depth is not None)
    ps_stage_bests = [max(t.score for t in run.trials[:ps_stage]) for run in ps_runs]
    print(
        f"\n{args.proposer} seeds {','.join(map(str, seeds))}, budget {args.budget}; values: mean "
        "over seeds (each seed). Scores: mean accuracy on toy_facts_a and toy_facts_b, full "
        f"fidelity, on the searched-on documents ({1 - args.holdout:.0%} of each task) and on "
        f"the held-out ones ({args.holdout:.0%}); each arm's best is chosen by its searched-on "
        f"score. PS then DFS: best from the DFS stage in {combo_from_dfs} of {len(seeds)} "
        "seeds (ties go to the earlier, PS-stage candidate); searched-on best of the PS stage "
        f"{' / '.join(f'{v:.3f}' for v in ps_stage_bests)}, of the DFS stage "
        f"{' / '.join(f'{v:.3f}' for v in stage_bests)}; best path depths: DFS "
        f"{depths['DFS']}, PS then DFS {depths['PS then DFS']}."
    )

    def cost(name: str, trials: list[Scored]) -> str:
        build = [t.merge_seconds - t.hold_seconds for t in trials]
        evals = [t.eval_seconds for t in trials]
        hold = sum(t.hold_seconds for t in trials)
        held_by = sum(1 for t in trials if t.hold_seconds > 0)
        depth = [t.depth for t in trials if t.depth is not None]
        mean_depth = f"{statistics.fmean(depth):.1f}" if depth else "4 (the base's)"
        return (
            f"| {name} | {len(trials)} | {1000 * statistics.fmean(build):.1f} | "
            f"{1000 * statistics.median(build):.1f} | {1000 * statistics.fmean(evals):.1f} | "
            f"{mean_depth} | {hold:.3f} s over {held_by} candidate(s) |"
        )

    print(
        "\n| candidates | count | build ms, mean | build ms, median | eval ms, mean | "
        "layers, mean | one-time hold |"
    )
    print("|---|---|---|---|---|---|---|")
    print(cost("PS (task arithmetic per layer)", [t for a in ps_runs for t in a.trials]))
    print(cost("DFS over the sources", [t for a in dfs_runs for t in a.trials]))
    print(cost("DFS over [merge, sources]", [t for a in combo_runs for t in a.trials]))
    print(
        "\nbuild: CandidateResult.merge_seconds less the one-time hold (timings['hold']: "
        "holding a path model's layers, or building the PS merge a path uses, once per "
        "process); eval: CandidateResult.eval_seconds on the searched-on documents.",
    )
    print(f"total {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
