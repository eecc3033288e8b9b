"""The search in one process, without Ray or a database: propose, merge in place, evaluate,
tell, until the budget (a study runs the same steps on Ray workers against a database).

Baselines come first: every source alone and the space's uniform merges, so each search
contains its reference points. Baselines are recorded, not told to the proposer
(they are not points it chose, and several lie outside the space's genome, e.g. a source
alone). They count towards the evaluation budget.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from evomerge.checkpoint import ModelFolder, source_labels
from evomerge.errors import ConfigError, EvaluationError, EvomergeError
from evomerge.evaluate import build_evaluator
from evomerge.evaluate.suite import EvaluatorSuite
from evomerge.merge.engine import InPlaceMerger
from evomerge.merge.recipe import Recipe, plan_recipe
from evomerge.optimize import (
    Objective,
    Proposer,
    pareto_front,
    scalarize,
)
from evomerge.space import BoundSpace

Role = Literal["source", "uniform", "proposal"]


@dataclass
class InProcessTrial:
    """One evaluated candidate."""

    number: int
    role: Role
    label: str
    genome: np.ndarray | None
    recipe: Recipe | None
    metrics: dict[str, float] = field(default_factory=dict)
    values: list[float] | None = None
    status: Literal["complete", "failed"] = "complete"
    error: str | None = None
    merge_seconds: float = 0.0
    eval_seconds: float = 0.0
    proposal_id: int | None = None


@dataclass
class SearchResult:
    objectives: list[Objective]
    trials: list[InProcessTrial]

    @property
    def complete(self) -> list[InProcessTrial]:
        return [t for t in self.trials if t.status == "complete"]

    def best(self, role: Role | None = None) -> InProcessTrial:
        """The complete trial with the highest scalarized objective (optionally of one role)."""
        pool = [t for t in self.complete if role is None or t.role == role]
        if not pool:
            raise ConfigError("no complete trial" + (f" of role {role}" if role else ""))
        return max(pool, key=lambda t: scalarize(self.objectives, t.values or []))

    def pareto(self) -> list[InProcessTrial]:
        """The complete trials no other complete trial dominates."""
        pool = self.complete
        return [pool[i] for i in pareto_front([t.values or [] for t in pool], self.objectives)]


def objective_values(objectives: Sequence[Objective], metrics: Mapping[str, float]) -> list[float]:
    values = []
    for objective in objectives:
        value = metrics.get(objective.metric)
        if value is None:
            raise EvaluationError(f"the evaluation produced no metric {objective.metric}")
        if not math.isfinite(value):
            raise EvaluationError(f"metric {objective.metric} is {value}")
        values.append(value)
    return values


class InProcessSearch:
    """Holds the sources in memory and one model object; evaluates candidates in place."""

    def __init__(
        self,
        space: BoundSpace,
        base: Path,
        sources: Sequence[Path],
        objectives: Sequence[Objective],
        evaluators: Sequence[Mapping[str, Any]],
        *,
        limit: int | float | None = None,
        device: str = "cpu",
        working_dtype: str | None = None,
    ) -> None:
        """``working_dtype``: what candidates are built and scored in (None: bfloat16 on
        CUDA, float32 on the CPU), as in a study's workers."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from evomerge.memory import default_working_dtype

        if not isinstance(space, BoundSpace):
            raise ConfigError(
                f"space '{space.space.name}' is a data-flow space; an in-process search merges "
                "parameter spaces only (run a study, or MergeWorker in process, for paths)"
            )
        self.space = space
        self.base = Path(base)
        self.sources = [Path(s) for s in sources]
        self.objectives = list(objectives)
        self.limit = limit
        self.folders = [
            ModelFolder(self.base, label="base"),
            *(
                ModelFolder(s, label=label)
                for s, label in zip(self.sources, source_labels(self.sources), strict=True)
            ),
        ]
        self.merger = InPlaceMerger(self.folders, device=device)
        self.dtype = getattr(torch, working_dtype or default_working_dtype(device))
        self.model = AutoModelForCausalLM.from_pretrained(
            self.base, dtype=self.dtype, trust_remote_code=False
        ).to(device)
        self.model.eval()
        self.tokenizer = AutoTokenizer.from_pretrained(self.base)
        self.suite = EvaluatorSuite(
            [build_evaluator(config, self.model, self.tokenizer) for config in evaluators]
        )
        self.suite.check_metrics([o.metric for o in self.objectives])

    def recipe(self, genome: np.ndarray) -> Recipe:
        return self.space.decode(genome, str(self.base), [str(s) for s in self.sources])

    def _score(self, trial: InProcessTrial, load: Callable[[], None]) -> InProcessTrial:
        start = time.perf_counter()
        try:
            load()
            trial.merge_seconds = time.perf_counter() - start
            trial.metrics, trial.eval_seconds = self.suite.evaluate(self.limit)
            trial.values = objective_values(self.objectives, trial.metrics)
        except (EvomergeError, RuntimeError, ValueError) as exc:
            trial.status = "failed"
            trial.error = f"{type(exc).__name__}: {exc}"
        return trial

    def evaluate_genome(
        self, number: int, role: Role, label: str, genome: np.ndarray
    ) -> InProcessTrial:
        recipe = self.recipe(genome)
        trial = InProcessTrial(number, role, label, genome.copy(), recipe)
        plan = plan_recipe(recipe, self.folders)
        return self._score(trial, lambda: self.merger.merge_into(plan, self.model))

    def evaluate_source(self, number: int, index: int) -> InProcessTrial:
        trial = InProcessTrial(number, "source", self.folders[index + 1].label, None, None)

        def load() -> None:
            with torch.no_grad():
                for name, tensor in self.merger.tensors[index + 1].items():
                    self.model.get_parameter(name).copy_(tensor)

        return self._score(trial, load)

    def baselines(self, start: int = 0) -> list[InProcessTrial]:
        trials = [self.evaluate_source(start + i, i) for i in range(len(self.sources))]
        for label, genome in self.space.uniform_baselines():
            trials.append(self.evaluate_genome(start + len(trials), "uniform", label, genome))
        return trials

    def run(
        self,
        proposer: Proposer,
        budget: int,
        *,
        baselines: bool = True,
        on_trial: Callable[[InProcessTrial], None] | None = None,
    ) -> SearchResult:
        """Baselines, then proposals until ``budget`` evaluations or the proposer is done.

        A failed candidate is recorded and told to the proposer as failed.
        """
        if budget < 1:
            raise ConfigError(f"the budget must be at least 1 evaluation, got {budget}")
        trials: list[InProcessTrial] = []
        if baselines:
            for trial in self.baselines():
                if len(trials) >= budget:
                    break
                trials.append(trial)
                if on_trial:
                    on_trial(trial)
        while len(trials) < budget:
            proposal = proposer.ask()
            if proposal is None:
                break
            trial = self.evaluate_genome(
                len(trials), "proposal", f"proposal {proposal.id}", proposal.genome
            )
            trial.proposal_id = proposal.id
            if trial.status == "complete":
                proposer.tell(proposal.id, trial.values or [])
            else:
                proposer.tell_failed(proposal.id, trial.error or "")
            trials.append(trial)
            if on_trial:
                on_trial(trial)
        return SearchResult(self.objectives, trials)
