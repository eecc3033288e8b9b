#!/usr/bin/env python
"""Estimated fitness from anchor documents vs random subsets, on the toy zoo's 1,020-document tasks.

Tasks ``toy_choice_a`` and ``toy_choice_b`` (4-way multiple choice, 1,020 documents each) with
``holdout: 0.2``: 816 searched-on documents per task, 204 held out. The objective is the mean
of the two tasks' ``acc``. Models are loaded once (``InProcessSearch``); each candidate is
merged in place and scored by the ``lm_eval`` evaluator, which keeps per-document results.

Part ``rank``: anchors are chosen from the reference candidates (the sources and the space's
uniform baselines, all fully scored) by ``evomerge.evaluate.anchors.select_anchors`` on their
per-document correctness or log-likelihood margins; then 200 candidates are fully scored, and
the Spearman correlation between each candidate's estimated objective (from N anchor documents
per task) and its full searched-on objective is reported, against the mean of N random
documents per task (20 draws). Two candidate sets: uniform random genomes, and the 200
proposals of one CMA-ES run (which cluster as the search converges: the harder, realistic set).
"refreshed" rows add the first 50 candidates of the set to the reference and rank the other 150.

Part ``study``: an in-process CMA-ES search per fidelity at a budget of scored searched-on
documents (baselines, scored in full by every variant, not counted): ``full`` scores every
proposal on all documents; ``limit`` on N seeded random documents per task and ``anchors`` on N
anchors per task (refreshed after every promotion from all fully scored candidates), both
re-scoring the best proposal of every ``--batch`` on all documents (the study's promotion).
The pick is the best fully scored candidate; its held-out objective is the truth.

    .venv/bin/python scripts/bench_anchors.py --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_report import markers, write_section  # noqa: E402

NAME = "bench_anchors"
TASKS = ["toy_choice_a", "toy_choice_b"]
HOLDOUT = 0.2
FEATURES = (("correct", "anchors (correctness)"), ("margin", "anchors (margins)"))


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho (average ranks for ties; NaN when either side is constant)."""
    from scipy.stats import spearmanr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a constant input warns and gives NaN
        return float(spearmanr(x, y).statistic)


@dataclass
class Scored:
    """One candidate's full per-document results on the searched-on documents, per task."""

    correct: dict[str, np.ndarray]
    margin: dict[str, np.ndarray]

    def objective(self) -> float:
        return float(np.mean([self.correct[t].mean() for t in TASKS]))


@dataclass
class Scorer:
    search: Any
    evaluator: Any
    index: dict[str, np.ndarray]
    docs: int = 0
    """Searched-on documents scored so far (a budget's unit)."""
    seconds: float = 0.0

    def load_genome(self, genome: np.ndarray) -> None:
        from evomerge.merge.recipe import plan_recipe

        plan = plan_recipe(self.search.recipe(genome), self.search.folders)
        self.search.merger.merge_into(plan, self.search.model)

    def load_source(self, number: int) -> None:
        with torch.no_grad():
            for name, tensor in self.search.merger.tensors[number + 1].items():
                self.search.model.get_parameter(name).copy_(tensor)

    def full(self) -> Scored:
        result = self._evaluate()
        for name in TASKS:
            assert np.array_equal(result.documents[name].index, self.index[name])
        return Scored(
            correct={t: result.documents[t].values["acc"] for t in TASKS},
            margin={t: result.documents[t].margin for t in TASKS},
        )

    def subset(self, documents: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Per task, the 0/1 results of the given documents (in the order of ``documents``)."""
        result = self._evaluate(documents={t: [int(d) for d in documents[t]] for t in TASKS})
        out = {}
        for name in TASKS:
            got = result.documents[name]
            position = {int(d): i for i, d in enumerate(got.index)}
            out[name] = np.asarray([got.values["acc"][position[int(d)]] for d in documents[name]])
        return out

    def holdout(self) -> float:
        start = time.perf_counter()
        result = self.evaluator.evaluate(split="holdout")
        self.seconds += time.perf_counter() - start
        return float(np.mean([result.metrics[f"{t}/acc"] for t in TASKS]))

    def _evaluate(self, documents: dict[str, list[int]] | None = None) -> Any:
        start = time.perf_counter()
        result = self.evaluator.evaluate(split="search", documents=documents)
        self.seconds += time.perf_counter() - start
        self.docs += sum(len(result.documents[t].index) for t in TASKS)
        return result


def make_scorer(zoo: dict[str, Path], space_name: str) -> Scorer:
    from evomerge.checkpoint import ModelFolder
    from evomerge.inprocess import InProcessSearch
    from evomerge.optimize import Objective
    from evomerge.space import load_space

    space = load_space(space_name).bind(ModelFolder(zoo["base"]), ["ft_a", "ft_b"])
    objectives = [Objective(metric=f"{task}/acc", weight=0.5) for task in TASKS]
    search = InProcessSearch(
        space,
        zoo["base"],
        [zoo["ft_a"], zoo["ft_b"]],
        objectives,
        [{"kind": "lm_eval", "tasks": TASKS, "holdout": HOLDOUT}],
    )
    evaluator = search.suite.evaluators[0]
    index = {t: np.asarray(i) for t, i in evaluator.split_documents("search").items()}
    return Scorer(search, evaluator, index)


def reference_set(scorer: Scorer) -> list[Scored]:
    """The sources and the space's uniform baselines, fully scored (what a study scores first)."""
    rows = []
    for number in range(len(scorer.search.sources)):
        scorer.load_source(number)
        rows.append(scorer.full())
    for _, genome in scorer.search.space.uniform_baselines():
        scorer.load_genome(genome)
        rows.append(scorer.full())
    return rows


def cma_config(seed: int, dimension: int) -> dict[str, Any]:
    return {"kind": "cma", "seed": seed, "sigma0": 0.2, "x0": [0.8] * dimension}


def candidate_sets(scorer: Scorer, count: int, seed: int) -> dict[str, list[Scored]]:
    from evomerge.optimize import Objective, build_proposer

    dimension = scorer.search.space.dimension
    rng = np.random.default_rng(seed)
    uniform = []
    for _ in range(count):
        scorer.load_genome(rng.random(dimension))
        uniform.append(scorer.full())
    proposer = build_proposer(
        cma_config(seed, dimension), dimension, [Objective(metric="objective")]
    )
    proposals = []
    while len(proposals) < count:
        proposal = proposer.ask()
        assert proposal is not None
        scorer.load_genome(proposal.genome)
        scored = scorer.full()
        proposals.append(scored)
        proposer.tell(proposal.id, [scored.objective()])
    return {"random genomes": uniform, "CMA-ES proposals": proposals}


def anchor_sets(reference: list[Scored], feature: str, n: int, seed: int, index) -> dict:  # type: ignore[no-untyped-def]
    from evomerge.evaluate.anchors import select_anchors

    out = {}
    for task in TASKS:
        rows = np.stack([getattr(row, feature)[task] for row in reference])
        if feature == "margin":
            rows = np.clip(rows, -20, 20)
        out[task] = select_anchors(rows, n, seed=seed, index=index[task])
    return out


def estimate(anchors: dict, scored: Scored, index: dict[str, np.ndarray]) -> float:  # type: ignore[type-arg]
    return float(np.mean([anchors[t].estimate_from(index[t], scored.correct[t]) for t in TASKS]))


@dataclass
class RankRow:
    candidates: str
    method: str
    n: int
    rho: list[float] = field(default_factory=list)
    error: list[float] = field(default_factory=list)


def rank_part(
    scorer: Scorer, reference: list[Scored], sets: dict[str, list[Scored]], sizes: list[int]
) -> list[RankRow]:
    rows: list[RankRow] = []
    for set_name, candidates in sets.items():
        for refreshed in (False, True):
            ref = reference + (candidates[:50] if refreshed else [])
            tested = candidates[50:] if refreshed else candidates
            truth = np.asarray([c.objective() for c in tested])
            suffix = f", refreshed (reference + first 50, ranks {len(tested)})" if refreshed else ""
            for n in sizes:
                for feature, label in (
                    ("correct", "anchors (correctness)"),
                    ("margin", "anchors (margins)"),
                ):
                    row = RankRow(set_name, label + suffix, n)
                    for seed in range(5):
                        anchors = anchor_sets(ref, feature, n, seed, scorer.index)
                        est = np.asarray([estimate(anchors, c, scorer.index) for c in tested])
                        row.rho.append(spearman(est, truth))
                        row.error.append(float(np.mean(np.abs(est - truth))))
                    rows.append(row)
                row = RankRow(set_name, "random subset" + suffix, n)
                rng = np.random.default_rng(n)
                for _ in range(20):
                    picks = {t: rng.choice(len(scorer.index[t]), n, replace=False) for t in TASKS}
                    est = np.asarray(
                        [np.mean([c.correct[t][picks[t]].mean() for t in TASKS]) for c in tested]
                    )
                    row.rho.append(spearman(est, truth))
                    row.error.append(float(np.mean(np.abs(est - truth))))
                rows.append(row)
    return rows


@dataclass
class StudyRun:
    method: str
    budget: int
    seed: int
    proposals: int
    promoted: int
    docs: int
    search_best: float
    heldout: float
    seconds: float


def run_study(
    scorer: Scorer,
    reference: list[Scored],
    method: str,
    n: int,
    budget: int,
    seed: int,
    batch: int,
    feature: str,
) -> StudyRun:
    """One CMA-ES search spending ``budget`` searched-on documents (baselines excluded)."""
    from evomerge.optimize import Objective, build_proposer

    dimension = scorer.search.space.dimension
    proposer = build_proposer(
        cma_config(seed, dimension), dimension, [Objective(metric="objective")]
    )
    start_docs, start_seconds = scorer.docs, scorer.seconds
    full_rows = list(reference)
    fully: list[tuple[float, np.ndarray]] = []  # (full searched-on objective, genome)
    waiting: list[tuple[float, np.ndarray]] = []
    rng = np.random.default_rng(1000 + seed)
    fixed = {t: np.sort(rng.choice(scorer.index[t], n, replace=False)) for t in TASKS}
    anchors = (
        anchor_sets(full_rows, feature, n, seed, scorer.index) if method == "anchors" else None
    )
    proposals = promoted = 0
    while scorer.docs - start_docs < budget:
        proposal = proposer.ask()
        assert proposal is not None
        scorer.load_genome(proposal.genome)
        proposals += 1
        if method == "full":
            scored = scorer.full()
            value = scored.objective()
            fully.append((value, proposal.genome.copy()))
        else:
            chosen = fixed if method == "limit" else {t: anchors[t].index for t in TASKS}
            results = scorer.subset(chosen)
            if method == "limit":
                value = float(np.mean([results[t].mean() for t in TASKS]))
            else:
                value = float(np.mean([anchors[t].estimate(results[t]) for t in TASKS]))
            waiting.append((value, proposal.genome.copy()))
        proposer.tell(proposal.id, [value])
        if method != "full" and len(waiting) >= batch:
            _, genome = max(waiting, key=lambda item: item[0])
            waiting = []
            scorer.load_genome(genome)
            scored = scorer.full()
            promoted += 1
            fully.append((scored.objective(), genome))
            full_rows.append(scored)
            if method == "anchors":
                anchors = anchor_sets(full_rows, feature, n, seed, scorer.index)
    if not fully:  # the budget ran out before a promotion: the pick is among the baselines
        search_best, heldout = max(r.objective() for r in reference), math.nan
    else:
        search_best, genome = max(fully, key=lambda item: item[0])
        scorer.load_genome(genome)
        heldout = scorer.holdout()
    return StudyRun(
        method if method == "full" else f"{method} N={n}",
        budget,
        seed,
        proposals,
        promoted,
        scorer.docs - start_docs,
        search_best,
        heldout,
        scorer.seconds - start_seconds,
    )


def fmt_stats(values: list[float]) -> str:
    clean = [v for v in values if not math.isnan(v)]
    if not clean:
        return "n/a"
    if len(clean) == 1:
        return f"{clean[0]:.3f}"
    return f"{statistics.mean(clean):.3f} ± {statistics.stdev(clean):.3f}"


def report(
    args: argparse.Namespace,
    reference: list[Scored],
    rank_rows: list[RankRow],
    studies: list[StudyRun],
    seconds: float,
) -> str:
    begin, end = markers(NAME)
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    changed = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    dirty = " (with uncommitted changes)" if changed else ""
    lines = [
        begin,
        "## Estimated fitness from anchor documents (`scripts/bench_anchors.py`)",
        "",
        f"Command: `.venv/bin/python scripts/bench_anchors.py {' '.join(sys.argv[1:])}`. "
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, CPU only, torch "
        f"{torch.__version__} (1 thread). Commit {commit}{dirty}. "
        f"Space `{args.space}` over the toy zoo's `ft_a`, `ft_b`. "
        f"Tasks `toy_choice_a`, `toy_choice_b` (1,020 four-way multiple-choice documents each, "
        f"`holdout: {HOLDOUT}`: {len(next(iter(reference)).correct[TASKS[0]])} searched-on and "
        f"the rest held out per task). Objective: the mean of the two tasks' `acc`. "
        f"Reference candidates for anchors: the {len(reference)} baselines (2 sources, "
        f"{len(reference) - 2} uniform merges), fully scored on the searched-on documents.",
        "",
        "### Ranking candidates: Spearman of estimated vs full searched-on objective",
        "",
        f"{args.candidates} candidates per set, each fully scored on the searched-on documents "
        "(the truth). N documents per task. Anchors: mean ± sd over 5 k-means seeds; random "
        "subsets: mean ± sd over 20 draws. Error: mean absolute difference of the estimate "
        "from the full objective.",
        "",
        "| candidates | method | N per task | Spearman | mean abs. error |",
        "|---|---|---|---|---|",
    ]
    for row in rank_rows:
        lines.append(
            f"| {row.candidates} | {row.method} | {row.n} | {fmt_stats(row.rho)} | "
            f"{fmt_stats(row.error)} |"
        )
    lines += [
        "",
        "### A whole search at equal compute: held-out objective of the pick",
        "",
        f"CMA-ES (x0 0.8, sigma0 0.2), seeds {', '.join(str(s) for s in range(args.seeds))}. "
        f"Budget: searched-on documents scored by proposals and promotions (baselines excluded, "
        f"{2 * len(next(iter(reference)).correct[TASKS[0]])} documents = one full score). "
        f"Anchors clustered on per-document {args.feature}s. "
        f"`limit`/`anchors`: the best of every {args.batch} proposals is promoted (re-scored "
        f"in full); the pick is the best fully scored proposal. Held-out: its objective on the "
        f"held-out documents at full fidelity (the truth); searched-on: its full searched-on "
        f"objective. A search stops proposing once its budget is spent; the promotion due then "
        f"still runs, so 'docs spent' can pass the budget by one full score; a last, partial "
        f"batch is not promoted (a study would). Mean ± sd over "
        f"seeds.",
        "",
        "| fidelity | budget (docs) | docs spent | proposals | promoted | held-out objective | "
        "searched-on objective | scoring seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, int], list[StudyRun]] = {}
    for run in studies:
        groups.setdefault((run.method, run.budget), []).append(run)
    for (method, budget), runs in groups.items():
        lines.append(
            f"| {method} | {budget:,} | {statistics.mean(r.docs for r in runs):,.0f} | "
            f"{statistics.mean(r.proposals for r in runs):.0f} | "
            f"{statistics.mean(r.promoted for r in runs):.1f} | "
            f"{fmt_stats([r.heldout for r in runs])} | "
            f"{fmt_stats([r.search_best for r in runs])} | "
            f"{statistics.mean(r.seconds for r in runs):.0f} |"
        )
    best_source = max(r.objective() for r in reference[:2])
    best_baseline = max(r.objective() for r in reference)
    lines += [
        "",
        f"For scale (searched-on, full): best source alone {best_source:.3f}, best baseline "
        f"{best_baseline:.3f}.",
        "",
        f"Total {seconds:.0f} s.",
        end,
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="rank,study")
    parser.add_argument("--candidates", type=int, default=200)
    parser.add_argument("--sizes", default="20,50,100", help="anchors / random documents per task")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--study-n",
        default="50,20",
        help="documents per task in the study part (the first also at full scoring's budget)",
    )
    parser.add_argument("--full-proposals", type=int, default=60, help="full scoring's budget")
    parser.add_argument(
        "--feature", default="margin", choices=["margin", "correct"], help="anchors' clustering"
    )
    parser.add_argument("--batch", type=int, default=20, help="proposals per promotion")
    parser.add_argument("--space", default="task_arithmetic_per_layer")
    parser.add_argument("--zoo", type=Path, default=ROOT / ".bench" / "toy_zoo")
    parser.add_argument("--write", type=Path, help=f"update this Markdown file's {NAME} part")
    args = parser.parse_args()

    from evomerge.evaluate.harness import quiet_lm_eval_logs
    from evomerge.toy_zoo import build_toy_zoo

    torch.set_num_threads(1)
    quiet_lm_eval_logs()
    started = time.perf_counter()
    scorer = make_scorer(build_toy_zoo(args.zoo), args.space)
    reference = reference_set(scorer)
    parts = set(args.parts.split(","))
    rank_rows: list[RankRow] = []
    if "rank" in parts:
        sets = candidate_sets(scorer, args.candidates, seed=1)
        sizes = [int(s) for s in args.sizes.split(",")]
        rank_rows = rank_part(scorer, reference, sets, sizes)
        for row in rank_rows:
            print(row.candidates, row.method, row.n, fmt_stats(row.rho), flush=True)
    studies: list[StudyRun] = []
    if "study" in parts:
        per_full = sum(len(i) for i in scorer.index.values())
        full_budget = args.full_proposals * per_full
        small = [int(n) for n in args.study_n.split(",")]
        plan = [("full", 0, full_budget), ("full", 0, full_budget // 10)]
        plan += [(kind, n, full_budget // 10) for n in small for kind in ("limit", "anchors")]
        plan += [(kind, small[0], full_budget) for kind in ("limit", "anchors")]
        for method, n, budget in plan:
            for seed in range(args.seeds):
                run = run_study(
                    scorer, reference, method, n, budget, seed, args.batch, args.feature
                )
                studies.append(run)
                print(run, flush=True)
    text = report(args, reference, rank_rows, studies, time.perf_counter() - started)
    print(text)
    if args.write:
        write_section(args.write, NAME, text)


if __name__ == "__main__":
    main()
