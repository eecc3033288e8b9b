"""The study driver: baselines, then ask, dispatch to Ray workers, record, tell, until the budget.

The driver is the only writer of the study database. Each trial is written as RUNNING when it
is handed to a worker and finished (COMPLETE or FAILED, with metrics and timings) in one
transaction when its result arrives; the proposer's state is snapshotted after every tell.
The budget counts finished trials (complete or failed). Resuming a stopped study is not
implemented yet: a study name that already has trials is refused.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from evomerge.checkpoint import ModelFolder
from evomerge.cluster.worker import CandidateResult, CandidateTask, WorkerSpec
from evomerge.errors import ConfigError
from evomerge.search.loop import build_space_proposer
from evomerge.space import space_from_setting
from evomerge.study.config import StudyConfig
from evomerge.study.store import StudyStore


def _ensure_ray(config: StudyConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if config.cluster.address:
        ray.init(address=config.cluster.address, log_to_driver=False)
    else:
        ray.init(
            num_cpus=max(
                os.cpu_count() or 1, int(config.cluster.workers * config.cluster.cpus_per_worker)
            ),
            include_dashboard=False,
            object_store_memory=100_000_000,
            log_to_driver=False,
        )


class StudyDriver:
    """Runs one study against one database."""

    def __init__(self, store: StudyStore, config: StudyConfig) -> None:
        self.store = store
        self.config = config
        self.name = config.name
        labels = [ModelFolder(s).label for s in config.sources]
        self.space = space_from_setting(config.space).bind(ModelFolder(config.base), labels)
        self.proposer = build_space_proposer(config.proposer, self.space, config.objectives)
        self.limit = config.fidelity.limit if config.fidelity else None
        self.budget = config.budget_trials or 10**9
        self.next_number = 0
        self.finished = 0
        self.in_flight: dict[int, int | None] = {}  # trial number -> proposal id
        self.queue: deque[tuple[str, str, dict[str, Any], list[float] | None]] = deque()

    def _baselines(self) -> None:
        for source in self.config.sources:
            recipe = {
                "method": "linear",
                "sources": [{"model": source, "parameters": {"weight": 1.0}}],
            }
            self.queue.append(("source", ModelFolder(source).label, recipe, None))
        for label, genome in self.space.uniform_baselines():
            recipe = self._recipe(genome)
            self.queue.append(("uniform", label, recipe, genome.tolist()))

    def _recipe(self, genome: np.ndarray) -> dict[str, Any]:
        recipe = self.space.decode(genome, self.config.base, self.config.sources)
        return recipe.model_dump(exclude_defaults=True)

    def _task(
        self,
        role: str,
        label: str,
        recipe: dict,
        genome: list[float] | None,
        proposal_id: int | None = None,
    ) -> CandidateTask:
        number = self.next_number
        self.next_number += 1
        self.store.add_trial(
            self.name,
            number,
            role=role,
            label=label,
            genome=genome,
            recipe=recipe,
            proposal_id=proposal_id,
        )
        self.in_flight[number] = proposal_id
        return CandidateTask(key=number, recipe=recipe, limit=self.limit)

    def next_task(self) -> CandidateTask | None:
        if self.finished + len(self.in_flight) >= self.budget:
            return None
        if self.queue:
            return self._task(*self.queue.popleft())
        proposal = self.proposer.ask()
        if proposal is None:
            return None
        recipe = self._recipe(proposal.genome)
        return self._task(
            "proposal", f"proposal {proposal.id}", recipe, proposal.genome.tolist(), proposal.id
        )

    def on_result(self, result: CandidateResult) -> None:
        proposal_id = self.in_flight.pop(result.key)
        values = None
        state, error = result.status.upper(), result.error
        if state == "COMPLETE":
            try:
                values = [result.metrics[o.metric] for o in self.config.objectives]
            except KeyError as exc:
                state, error = "FAILED", f"EvaluationError: no metric {exc.args[0]}"
            if values is not None and not all(np.isfinite(values)):
                state, error, values = "FAILED", f"EvaluationError: objective values {values}", None
        self.store.finish_trial(
            self.name,
            result.key,
            state=state,
            metrics=result.metrics,
            limit=self.limit,
            worker=result.worker,
            attempts=result.attempt,
            error=error,
            merge_seconds=result.merge_seconds,
            eval_seconds=result.eval_seconds,
        )
        self.finished += 1
        if proposal_id is not None:
            if values is not None:
                self.proposer.tell(proposal_id, values)
            else:
                self.proposer.tell_failed(proposal_id, error or "")
            self.store.save_snapshot(self.name, self.proposer.state_dict(), self.proposer.n_told)

    def run(self, on_result: Callable[[CandidateResult], None] | None = None) -> None:
        from evomerge.cluster.pool import WorkerPool, dispatch

        if self.store.has_study(self.name):
            if self.store.trials(self.name):
                raise ConfigError(
                    f"study '{self.name}' already has trials; resuming is not implemented yet"
                )
        else:
            self.store.create_study(self.name, self.config.model_dump(mode="json"), self.budget)
        if self.config.baselines:
            self._baselines()
        _ensure_ray(self.config)
        cluster = self.config.cluster
        spec = WorkerSpec(
            base=self.config.base,
            sources=self.config.sources,
            evaluators=self.config.evaluators,
            device=self.config.device,
        )
        deadline = (
            time.monotonic() + self.config.budget_hours * 3600 if self.config.budget_hours else None
        )
        self.store.set_status(self.name, "running")

        def handle(result: CandidateResult) -> None:
            self.on_result(result)
            if on_result is not None:
                on_result(result)

        with WorkerPool(
            spec,
            cluster.workers,
            cpus_per_worker=cluster.cpus_per_worker,
            gpus_per_worker=cluster.gpus_per_worker,
            max_attempts=cluster.max_attempts,
            trial_timeout=cluster.trial_timeout,
        ) as pool:
            dispatch(
                pool,
                self.next_task,
                handle,
                should_stop=lambda: deadline is not None and time.monotonic() > deadline,
            )
        self.store.set_status(self.name, "finished")
