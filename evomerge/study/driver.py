"""The study driver: baselines, then ask, dispatch to Ray workers, record, tell, until the budget.

The driver is the only writer of the study database.

- A trial is written as RUNNING when it is handed to a worker. Its result, its metrics, the
  study's wall time and what the proposer was told (the values, and how many results and
  proposals came before) are written in one transaction, every ``snapshot_every`` results or
  ``SNAPSHOT_SECONDS`` with the proposer's whole state. A driver killed at any moment leaves
  the database consistent: the results told after the newest snapshot, and the asks between
  them, can be replayed in their order.
- The budget counts finished trials (COMPLETE or FAILED); baselines count, promotions do not.
- Fidelity: with ``fidelity.limit``, proposals are scored on that many documents per task
  (baselines always on all of them) and the proposer learns from those cheap scores; of every
  ``batch`` completed proposals the best ``promote`` fraction is re-scored on all documents
  (by weighted sum, or by non-dominated rank and crowding for a Pareto proposer with several
  objectives). With ``fidelity.anchors``, proposals are scored on each task's anchor documents
  and the proposer learns from the estimated full scores (``evomerge.study.anchored``); the
  anchors are re-chosen from the fully scored trials' per-document results as they arrive.
  Only full scores enter the front and ``best``. With an ``hours`` budget, new
  proposals stop early enough to finish the promotions queued by then.
- Resume (``StudyDriver(..., resume=True)``): the proposer is restored from its newest
  snapshot and told, in order, the results recorded after it, each after replaying the asks
  that preceded it (a restored proposer proposes exactly the same genomes; this is checked).
  Trials left RUNNING or QUEUED are re-run with the recipe they were given, each matched to its
  proposal (pending, or asked again by the replay), so none is counted twice.
- Ctrl-C (KeyboardInterrupt) stops at once: the results already in are recorded, the trials in
  flight go back to QUEUED and the study is marked ``stopped``, ready for ``resume``. SIGTERM
  (``ray job stop``, plain ``kill``, a scheduler's time limit) does the same.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from evomerge.checkpoint import ModelFolder, source_labels
from evomerge.cluster.connect import ensure_ray
from evomerge.cluster.worker import CandidateResult, CandidateTask
from evomerge.dataflow.space import DataflowSpace
from evomerge.errors import ConfigError, EvaluationError
from evomerge.evaluate.documents import decode as decode_documents
from evomerge.failpoints import failpoint
from evomerge.optimize import dominates, pareto_front, scalarize
from evomerge.optimize.objectives import nondominated_order
from evomerge.space import build_space_proposer, space_from_setting
from evomerge.stop_signals import on_stop_signals
from evomerge.study.anchored import AnchorFidelity
from evomerge.study.config import StudyConfig, worker_spec
from evomerge.study.confirm import confirm_targets, holdout_evaluators
from evomerge.study.path_merges import resolve_path_merges
from evomerge.study.read import stored_study_config
from evomerge.study.status import error_type
from evomerge.study.store import (
    FULL,
    HOLDOUT,
    LEASE_SECONDS,
    TERMINAL,
    StorageError,
    StudyBusy,
    StudyStore,
    Told,
    TrialView,
    mask_url,
    resume_command,
)
from evomerge.util import first_line

SNAPSHOT_SECONDS = 30.0


@dataclass
class _PendingTrial:
    """A trial waiting for a worker; ``number`` is None until it is first written."""

    role: str
    label: str
    recipe: dict[str, Any]
    genome: list[float] | None = None
    proposal_id: int | None = None
    number: int | None = None


@dataclass(frozen=True)
class _Job:
    number: int
    proposal_id: int | None
    promotion: bool = False
    confirmation: bool = False
    """A re-score on the held-out documents (when the study ends)."""
    cheap: bool = False
    """Scored at the cheap fidelity (``limit`` documents, or the anchors)."""
    anchors: dict[str, Any] | None = None
    """The anchors it was scored on (``fidelity.anchors``): re-chosen ones may differ."""


@dataclass(frozen=True)
class StudyProgress:
    """What a progress display shows, after every result."""

    finished: int
    failed: int
    budget: int | None
    best: float | None
    """The best weighted objective value of a complete trial so far."""
    pareto_size: int
    elapsed_seconds: float
    budget_seconds: float | None
    run_finished: int
    """Trials finished by this run (for throughput: earlier runs may have been long ago)."""
    run_seconds: float

    @property
    def trials_per_hour(self) -> float:
        return 3600 * self.run_finished / self.run_seconds if self.run_seconds > 0 else 0.0

    @property
    def eta_seconds(self) -> float | None:
        """Seconds to the end of the budget at this run's pace (None: unknown)."""
        left = []
        if self.budget is not None and self.run_finished:
            left.append((self.budget - self.finished) * self.run_seconds / self.run_finished)
        if self.budget_seconds is not None:
            left.append(self.budget_seconds - self.elapsed_seconds)
        return max(0.0, min(left)) if left else None


REPEATED_FAILURES = 10
"""Trials failing in a row with one cause (the error's type) that stop a run: an avoidable
error (out of memory, a broken evaluator) would otherwise fail every trial all night."""


@dataclass(frozen=True)
class RunSummary:
    finished: int
    budget: int | None
    ran: int
    """Trials finished by this run."""
    status: str
    """``finished`` (budget reached, time up, or a proposer with a limit of its own has no more
    proposals) or ``stopped``."""
    reason: str


class StudyDriver:
    """Runs one study against one database: a new one, or with ``resume=True`` a stored one."""

    def __init__(self, store: StudyStore, config: StudyConfig, *, resume: bool = False) -> None:
        self.store = store
        self.config = config
        self.name = config.name
        self.resume = resume
        self.labels = source_labels(config.sources)
        """Each source's label (unique): genes, recipes and the baselines name sources by it."""
        space = space_from_setting(config.space)
        if not resume and isinstance(space, DataflowSpace) and space.unresolved():
            space = resolve_path_merges(space, store, config.base, config.sources)
            config = config.model_copy(update={"space": space.model_dump(mode="json")})
            self.config = config
        self.space = space.bind(ModelFolder(config.base), self.labels)
        self.limit = config.fidelity.limit if config.fidelity else None
        self.anchored = (
            AnchorFidelity(config.fidelity.anchors)
            if config.fidelity and config.fidelity.anchors
            else None
        )
        """The estimated fidelity (``fidelity.anchors``), None otherwise."""
        self.budget = config.budget_trials
        self.next_number = 0
        self.finished = 0
        self.failed = 0
        self.failure_causes: dict[str, int] = {}
        """Failures of this run by cause (the error's type)."""
        self.failure_streak: list[str] = []
        """The errors of the trials that failed since the last one that completed."""
        self.abort_reason: str | None = None
        """Set when too many trials in a row failed for one cause: the run stops."""
        self.jobs: dict[int, _Job] = {}
        self._next_job = 0
        self.queue: deque[_PendingTrial] = deque()
        self.promotions: deque[int] = deque()
        self.batch: list[tuple[list[float], int]] = []
        """Completed proposals of the current promotion round: (cheap values, trial number)."""
        self.full_seconds: list[float] = []
        """Seconds each full-fidelity scoring took (baselines, promotions): sizes the reserve
        an ``hours`` budget keeps for the promotions queued at its end."""
        self.workers = max(1, config.cluster.workers)
        self.confirming = 0
        """Trials to score on the held-out documents now that the search has ended."""
        self.confirmed = 0
        self.closing = False
        self.closed_at = 0.0
        """New proposals have stopped so the queued promotions finish within the hours budget."""
        self.values: dict[int, list[float]] = {}
        self.front: list[int] = []
        self.best: float | None = None
        self.elapsed_before = 0.0
        self.started = time.monotonic()
        self._snapshot_told = 0
        self._snapshot_at = self.started
        self.ran = 0
        self.on_note: Callable[[str], None] | None = None
        """Where one-off lines go (a worker loaded or replaced); set by ``run``."""
        self.worker_load_seconds: dict[str, float] = {}
        """Worker id -> seconds it took to load its models (filled in by ``run``)."""
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        """This driver's name in the study's lease (one driver per study at a time)."""
        self.lease_lost = False
        self.database_lost = False
        """The database stayed unreachable past its retries: nothing more is written."""
        self.interrupted = False
        """A stop signal arrived; checked again between results, in case the KeyboardInterrupt
        it raised was swallowed by code the driver called."""
        self.resume_hint = resume_command(self.name, store.url)
        """The command that continues this study, for messages; the launcher gives the YAML form."""
        if resume:
            store.acquire(self.name, self.owner)  # before touching anything of the study
            try:
                self._restore_anchors()
                self._restore()
            except BaseException:
                store.release(self.name, self.owner)
                raise
        else:
            self.proposer = build_space_proposer(config.proposer, self.space, config.objectives)

    def _restore_anchors(self) -> None:
        """Anchors again from the stored per-document results of the fully scored trials."""
        if self.anchored is None:
            return
        for data in self.store.documents(self.name, FULL).values():
            self.anchored.add_reference(decode_documents(data))
        self.anchored.refresh()

    def _add_reference(self, data: bytes | None) -> None:
        """A fully scored trial's per-document results: anchors are re-chosen with them."""
        if self.anchored is None or data is None:
            return
        self.anchored.add_reference(decode_documents(data))
        self.anchored.refresh()

    @classmethod
    def for_stored(cls, store: StudyStore, name: str) -> StudyDriver:
        """The driver that resumes study ``name`` from its stored config."""
        return cls(store, stored_study_config(store, name), resume=True)

    # -- trials --------------------------------------------------------------------------------

    def _baselines(self) -> list[_PendingTrial]:
        from evomerge.adapters import is_adapter_folder

        out = []
        for source, label in zip(self.config.sources, self.labels, strict=True):
            recipe: dict[str, Any] = {"method": "linear"}
            if is_adapter_folder(source):  # a LoRA adapter is a model only over its base
                recipe["base"] = self.config.base  # (linear does not weigh the base in)
            recipe["sources"] = [{"model": source, "label": label, "parameters": {"weight": 1.0}}]
            out.append(_PendingTrial("source", label, recipe))
        for label, genome in self.space.uniform_baselines():
            out.append(_PendingTrial("uniform", label, self._recipe(genome), genome.tolist()))
        return out if self.config.baselines else []

    def _recipe(self, genome: np.ndarray) -> dict[str, Any]:
        recipe = self.space.decode(
            genome, self.config.base, self.config.sources, self.config.fisher
        )
        return recipe.model_dump(exclude_defaults=True)

    def _job(self, job: _Job) -> int:
        key = self._next_job
        self._next_job += 1
        self.jobs[key] = job
        return key

    def _dispatch(self, trial: _PendingTrial) -> CandidateTask:
        if trial.number is None:
            trial.number = self.next_number
            self.next_number += 1
            self.store.add_trial(
                self.name,
                trial.number,
                role=trial.role,
                label=trial.label,
                genome=trial.genome,
                recipe=trial.recipe,
                proposal_id=trial.proposal_id,
            )
            failpoint("after_add_trial")
        else:
            self.store.set_state(self.name, trial.number, "RUNNING")
        proposal = trial.role == "proposal"
        if self.anchored is not None and proposal and self.anchored.ready:
            job = _Job(trial.number, trial.proposal_id, cheap=True, anchors=self.anchored.anchors)
            key = self._job(job)
            return CandidateTask(key=key, recipe=trial.recipe, documents=self.anchored.documents())
        cheap = proposal and self.limit is not None
        key = self._job(_Job(trial.number, trial.proposal_id, cheap=cheap))
        return CandidateTask(key=key, recipe=trial.recipe, limit=self.limit if cheap else None)

    def _trials_in_flight(self) -> int:
        return sum(not (job.promotion or job.confirmation) for job in self.jobs.values())

    def next_task(self) -> CandidateTask | None:
        """The next task for a free worker: promotions first, then queued trials, then a new
        proposal; None when the budget is used up or the proposer must wait for results."""
        closing = self._closing()  # first: it queues the current round's promotions
        if self.promotions:
            number = self.promotions.popleft()
            recipe = self.store.recipe(self.name, number)  # not kept in memory: few are promoted
            return CandidateTask(key=self._job(_Job(number, None, True)), recipe=recipe)
        if closing:
            return None
        if self.budget is not None and self.finished + self._trials_in_flight() >= self.budget:
            return None
        if self.queue:
            return self._dispatch(self.queue.popleft())
        proposal = self.proposer.ask()
        if proposal is None:
            return None
        return self._dispatch(self._proposal_trial(proposal.id, proposal.genome))

    def _proposal_trial(self, proposal_id: int, genome: np.ndarray) -> _PendingTrial:
        recipe = self._recipe(genome)
        return _PendingTrial(
            "proposal", f"proposal {proposal_id}", recipe, genome.tolist(), proposal_id
        )

    # -- results -------------------------------------------------------------------------------

    def elapsed(self) -> float:
        return self.elapsed_before + time.monotonic() - self.started

    def on_result(self, result: CandidateResult) -> None:
        job = self.jobs.pop(result.key)
        if job.confirmation:
            if result.status == "complete":
                self.store.add_metrics(self.name, job.number, result.metrics, None, HOLDOUT)
                self.confirmed += 1
            return
        if job.promotion:
            self._promoted(job.number, result)
            return
        values = None
        state, error = result.status.upper(), result.error
        metrics, fidelity = result.metrics, None
        if job.cheap and self.anchored is not None:
            fidelity = (self.anchored.name, self.anchored.rank)
            if state == "COMPLETE":
                metrics, error = self._estimated(result, job.anchors)
                state = "FAILED" if error else state
        if state == "COMPLETE":
            try:
                values = [float(metrics[o.metric]) for o in self.config.objectives]
            except KeyError as exc:
                state, error = "FAILED", f"EvaluationError: no metric {exc.args[0]}"
            if values is not None and not all(np.isfinite(values)):
                state, error, values = "FAILED", f"EvaluationError: objective values {values}", None
        told = snapshot = None
        if job.proposal_id is not None:
            told = Told(
                self.proposer.n_told + self.proposer.n_failed, self.proposer.next_id, values
            )
            if values is not None:
                self.proposer.tell(job.proposal_id, values)
                failpoint("after_tell")
            else:
                self.proposer.tell_failed(job.proposal_id, error or "")
            snapshot = self._snapshot_due()
        self.store.finish_trial(
            self.name,
            job.number,
            state=state,
            metrics=metrics,
            limit=self.limit if job.cheap else None,
            fidelity=fidelity,
            documents=result.documents,
            worker=result.worker,
            attempts=result.attempt,
            error=error,
            merge_seconds=result.merge_seconds,
            eval_seconds=result.eval_seconds,
            load_seconds=self.worker_load_seconds.get(result.worker),
            told=told,
            snapshot=snapshot,
            elapsed_seconds=self.elapsed(),
            scored_with=result.scored_with or None,
            timings=result.timings or None,
        )
        self.finished += 1
        self.ran += 1
        cheap = job.cheap
        if not cheap and state == "COMPLETE":
            self.full_seconds.append(result.merge_seconds + result.eval_seconds)
            self._add_reference(result.documents)
        if values is None:
            self.failed += 1
            self._count_failure(error or "")
            return
        self.failure_streak.clear()
        if not cheap:
            self._observe(job.number, values)
        if job.cheap and self._promoting():
            self.batch.append((values, job.number))
            if len(self.batch) >= self.config.fidelity.batch:  # type: ignore[union-attr]
                self._promote_batch()
        if self.budget is not None and self.finished >= self.budget and self.batch:
            self._promote_batch()  # the last, partial batch

    def _estimated(
        self, result: CandidateResult, anchors: dict[str, Any] | None
    ) -> tuple[dict[str, float], str | None]:
        """The metrics of an anchored result with each task's estimates (by the ``anchors`` it
        was scored on) in place of its anchors' plain means; an error when an objective is not
        estimated."""
        assert self.anchored is not None
        if result.documents is None:
            return result.metrics, "EvaluationError: the anchored score came without documents"
        try:
            estimates = self.anchored.estimate(decode_documents(result.documents), anchors)
        except EvaluationError as exc:
            return result.metrics, f"EvaluationError: {exc}"
        missing = [o.metric for o in self.config.objectives if o.metric not in estimates]
        if missing:
            return result.metrics, (
                f"EvaluationError: fidelity 'anchors' estimates per-task metrics (such as "
                f"{sorted(estimates)[0] if estimates else 'task/acc'}); objective {missing[0]} "
                "is not one (a group's mean?): make each task's metric an objective, or use "
                "'limit'"
            )
        return {**result.metrics, **estimates}, None

    def _count_failure(self, error: str) -> None:
        """Track failures by cause; :data:`REPEATED_FAILURES` in a row with one cause stop
        the study (resumable) instead of spending the night on it."""
        cause = error_type(error)
        self.failure_causes[cause] = self.failure_causes.get(cause, 0) + 1
        if self.failure_streak and error_type(self.failure_streak[-1]) != cause:
            self.failure_streak.clear()
        self.failure_streak.append(error)
        if len(self.failure_streak) >= REPEATED_FAILURES and self.abort_reason is None:
            self.abort_reason = (
                f"the last {len(self.failure_streak)} trials all failed with {cause} (last: "
                f"{first_line(error)}); fix the cause, then continue"
            )

    def failures_note(self) -> str:
        """``3 of 40 trials failed (EvaluationError 2, MergeError 1)``, or "" when none did."""
        if not self.failed:
            return ""
        causes = sorted(self.failure_causes.items(), key=lambda item: -item[1])
        shown = ", ".join(f"{cause} {count}" for cause, count in causes[:3])
        return f"{self.failed} of {self.finished} trials failed ({shown})"

    def _snapshot_due(self) -> tuple[bytes, int] | None:
        """The proposer's state, every ``snapshot_every`` results or ``SNAPSHOT_SECONDS``:
        an Optuna sampler's state holds every trial, too big to write with every result.
        Results told since the newest snapshot are replayed from the trials on resume."""
        told = self.proposer.n_told + self.proposer.n_failed
        now = time.monotonic()
        every = self.config.snapshot_every
        if told - self._snapshot_told < every and now - self._snapshot_at < SNAPSHOT_SECONDS:
            return None
        self._snapshot_told, self._snapshot_at = told, now
        return self.proposer.state_dict(), told

    def _promoting(self) -> bool:
        return self.config.fidelity is not None and self.config.fidelity.promote > 0

    def _promote_batch(self) -> None:
        """Queue the best ``promote`` fraction of the round for a full-fidelity score."""
        fraction = self.config.fidelity.promote  # type: ignore[union-attr]
        count = math.ceil(fraction * len(self.batch) - 1e-9)
        objectives = self.config.objectives
        if self.proposer.multi_objective and len(objectives) > 1:
            order = nondominated_order([values for values, _ in self.batch], objectives)
            best = [self.batch[i] for i in order[:count]]
        else:
            best = sorted(self.batch, key=lambda item: (-scalarize(objectives, item[0]), item[1]))[
                :count
            ]
        self.promotions.extend(number for _, number in best)
        self.batch = []

    def _promoted(self, number: int, result: CandidateResult) -> None:
        if result.status != "complete":
            return  # the trial keeps its cheap-fidelity metrics; a later export re-scores
        self.full_seconds.append(result.merge_seconds + result.eval_seconds)
        self.store.add_metrics(self.name, number, result.metrics, None, documents=result.documents)
        self._add_reference(result.documents)
        try:
            values = [float(result.metrics[o.metric]) for o in self.config.objectives]
        except KeyError:
            return
        if all(np.isfinite(values)):
            self._observe(number, values)

    def _reserve_seconds(self) -> float:
        """Time the queued promotions (and the current round's) take at the pace of the full
        scores so far, spread over the workers."""
        if not self._promoting():
            return 0.0
        fraction = self.config.fidelity.promote  # type: ignore[union-attr]
        count = len(self.promotions) + math.ceil(fraction * len(self.batch) - 1e-9)
        if not count:
            return 0.0
        pace = float(np.mean(self.full_seconds)) if self.full_seconds else 0.0
        return count * pace / self.workers

    def _closing(self) -> bool:
        """Whether the ``hours`` budget is close enough to its end that only promotions run;
        the current round is then promoted as it is."""
        hours = self.config.budget_hours
        if self.closing:
            return True
        if hours is None or not self._promoting():
            return False
        if self.elapsed() < hours * 3600 - self._reserve_seconds():
            return False
        self.closing = True
        self.closed_at = self.elapsed()
        if self.batch:
            self._promote_batch()
        return True

    def _observe(self, number: int, values: list[float], rebuild: bool = False) -> None:
        """Track best-so-far and the Pareto front for the progress display."""
        objectives = self.config.objectives
        self.values[number] = values
        if rebuild:
            self.best = max(scalarize(objectives, v) for v in self.values.values())
            numbers = list(self.values)
            front = pareto_front([self.values[n] for n in numbers], objectives)
            self.front = [numbers[i] for i in front]
            return
        score = scalarize(objectives, values)
        self.best = score if self.best is None else max(self.best, score)
        # As pareto_front does: a point equal to one on the front does not join it.
        if any(
            self.values[n] == values or dominates(self.values[n], values, objectives)
            for n in self.front
        ):
            return
        self.front = [n for n in self.front if not dominates(values, self.values[n], objectives)]
        self.front.append(number)

    def progress(self) -> StudyProgress:
        hours = self.config.budget_hours
        return StudyProgress(
            finished=self.finished,
            failed=self.failed,
            budget=self.budget,
            best=self.best,
            pareto_size=len(self.front),
            elapsed_seconds=self.elapsed(),
            budget_seconds=None if hours is None else hours * 3600,
            run_finished=self.ran,
            run_seconds=time.monotonic() - self.started,
        )

    # -- resume --------------------------------------------------------------------------------

    def _restore(self) -> None:
        trials = self.store.trials(self.name)
        self.elapsed_before = float(self.store.study(self.name)["elapsed_seconds"] or 0.0)
        self.next_number = max((t.number for t in trials), default=-1) + 1
        snapshot = self.store.latest_snapshot(self.name)
        self.proposer = build_space_proposer(
            self.config.proposer,
            self.space,
            self.config.objectives,
            state=None if snapshot is None else snapshot[0],
        )
        for trial in trials:
            if trial.state in TERMINAL:
                self.finished += 1
                values = trial.values(self.config.objectives)
                if trial.state == "COMPLETE" and values is not None:
                    self._observe(trial.number, values)
                else:
                    self.failed += 1
        self.store.requeue_running(self.name)
        by_proposal = {t.proposal_id: t for t in trials if t.proposal_id is not None}
        self._replay_tells(trials, by_proposal)
        waiting = [t for t in trials if t.state not in TERMINAL]
        requeued = [self._stored(t) for t in waiting if t.proposal_id is None]
        done = {(t.role, t.label) for t in trials}
        missing = [b for b in self._baselines() if (b.role, b.label) not in done]
        requeued += self._replay([t for t in waiting if t.proposal_id is not None], by_proposal)
        self.queue.extend(sorted(requeued, key=lambda t: t.number))
        self.queue.extend(missing)
        self._restore_promotions(trials)
        self._snapshot_told = self.proposer.n_told + self.proposer.n_failed

    def _replay_tells(self, trials: list[TrialView], by_proposal: dict[int, TrialView]) -> None:
        """Tell the restored proposer the results recorded after its snapshot, in their order,
        each after the asks that preceded it (so it ends in the state it had at the stop)."""
        start = self.proposer.n_told + self.proposer.n_failed
        later = sorted(
            (t for t in trials if t.told is not None and t.told.seq >= start),
            key=lambda t: t.told.seq,  # type: ignore[union-attr]
        )
        for trial in later:
            told = trial.told
            assert told is not None and trial.proposal_id is not None
            while self.proposer.next_id < told.asks_before:
                self._ask_again(by_proposal)
            if told.values is None:
                self.proposer.tell_failed(trial.proposal_id, trial.error or "")
            else:
                self.proposer.tell(trial.proposal_id, told.values)

    def _ask_again(self, by_proposal: dict[int, TrialView]) -> TrialView:
        """Replay one ask; the stored trial it must reproduce (its genome is checked)."""
        wanted = self.proposer.next_id
        proposal = self.proposer.ask()
        trial = by_proposal.get(wanted)
        if proposal is None or trial is None:
            raise StorageError(
                f"study '{self.name}': replaying the proposer's asks after its snapshot did not "
                f"reproduce proposal {wanted}"
            )
        if not np.allclose(proposal.genome, trial.genome or [], rtol=0, atol=1e-12):
            raise StorageError(
                f"study '{self.name}': the restored proposer proposes another genome for "
                f"proposal {proposal.id} (trial {trial.number}) than the stored one"
            )
        return trial

    @staticmethod
    def _stored(trial: TrialView) -> _PendingTrial:
        return _PendingTrial(
            trial.role,
            trial.label,
            trial.recipe or {},
            trial.genome,
            trial.proposal_id,
            trial.number,
        )

    def _replay(
        self, waiting: list[TrialView], by_proposal: dict[int, TrialView]
    ) -> list[_PendingTrial]:
        """Match unfinished proposal trials to the restored proposer's proposals: pending ones
        directly, the ones asked after the last recorded tell by asking them again."""
        pending = set(self.proposer.pending)
        matched, later = [], {}
        for trial in waiting:
            assert trial.proposal_id is not None
            if trial.proposal_id in pending:
                matched.append(self._stored(trial))
            elif trial.proposal_id >= self.proposer.next_id:
                later[trial.proposal_id] = trial
            else:
                raise StorageError(
                    f"study '{self.name}': trial {trial.number} is unfinished but its proposal "
                    f"{trial.proposal_id} is not pending in the newest proposer snapshot"
                )
        while later and self.proposer.next_id <= max(later):
            trial = self._ask_again(by_proposal)
            matched.append(self._stored(later.pop(trial.proposal_id)))  # type: ignore[arg-type]
        return matched

    def _restore_promotions(self, trials: list[TrialView]) -> None:
        """Promotions decided before the stop but not done; the current, partial batch."""
        if not self._promoting():
            return
        done = sorted(  # the cheaply scored proposals (under anchors, the first may be full)
            (
                t
                for t in trials
                if t.role == "proposal"
                and t.state == "COMPLETE"
                and any(name not in (FULL, HOLDOUT) for name in t.scores)
            ),
            key=lambda t: (t.finished_at or t.created_at, t.number),
        )
        size = self.config.fidelity.batch  # type: ignore[union-attr]
        for start in range(0, len(done), size):
            group = done[start : start + size]
            self.batch = [  # ranked by what the proposer was told: the cheap values
                (t.told.values, t.number)
                for t in group
                if t.told is not None and t.told.values is not None
            ]
            if len(group) < size and (self.budget is None or self.finished < self.budget):
                break  # the current batch: it fills up as results arrive
            before = len(self.promotions)
            self._promote_batch()
            chosen = list(self.promotions)[before:]
            scored_fully = {t.number for t in group if t.metrics}
            for number in chosen:
                if number in scored_fully:
                    self.promotions.remove(number)

    # -- the run -------------------------------------------------------------------------------

    def begin(self) -> None:
        """Create the study (or mark a resumed one running); ``run`` calls it first."""
        if self.resume:
            self.store.set_status(self.name, "running")
            return
        if self.store.has_study(self.name):
            raise ConfigError(
                f"study '{self.name}' already exists in {mask_url(self.store.url)}; resume it "
                f"({self.resume_hint}) or choose another name"
            )
        self.store.create_study(self.name, self.config.model_dump(mode="json"), self.budget or 0)
        self.store.acquire(self.name, self.owner)
        self.queue.extend(self._baselines())
        self.store.set_status(self.name, "running")

    def run(
        self,
        on_result: Callable[[CandidateResult], None] | None = None,
        on_progress: Callable[[StudyProgress], None] | None = None,
        on_note: Callable[[str], None] | None = None,
    ) -> RunSummary:
        """Run until the budget (trials or hours) is used up (or the proposer has finished, which
        only a proposer with a limit of its own does, e.g. cma with ``restarts``).
        Ctrl-C stops at once and leaves the study ready to resume (the summary says so).
        ``on_note`` gets one-off lines: each worker loaded, a worker replaced. ``on_progress``
        may instead have a ``note`` method (:class:`evomerge.study.live.LiveProgress`)."""
        if on_note is None:
            on_note = getattr(on_progress, "note", None)
        self.on_note = on_note
        self.begin()
        self.started = time.monotonic()
        budget_seconds = self.config.budget_hours * 3600 if self.config.budget_hours else None

        def time_up() -> bool:
            return budget_seconds is not None and self.elapsed() >= budget_seconds

        with self._lease(), on_stop_signals(self._on_stop_signal) as catch_signals_again:
            return self._run(on_result, on_progress, time_up, catch_signals_again)

    @contextlib.contextmanager
    def _lease(self) -> Iterator[None]:
        """Renew the study's lease every ``LEASE_SECONDS / 6`` while running; release it after.
        A driver that finds its lease taken (it was stalled past the timeout and another driver
        took over) stops dispatching."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(LEASE_SECONDS / 6):
                try:
                    if not self.store.heartbeat(self.name, self.owner):
                        self.lease_lost = True
                        return
                except StorageError:  # the database is down: the next write will say so
                    pass

        thread = threading.Thread(target=beat, name="evomerge-lease", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=1.0)  # it may be waiting for a database that is gone
            if not self.database_lost:
                with contextlib.suppress(StorageError):
                    self.store.release(self.name, self.owner)

    def _run(
        self,
        on_result: Callable[[CandidateResult], None] | None,
        on_progress: Callable[[StudyProgress], None] | None,
        time_up: Callable[[], bool],
        catch_signals_again: Callable[[], object],
    ) -> RunSummary:
        from evomerge.cluster.pool import WorkerPool, dispatch

        used_up = self.budget is not None and self.finished >= self.budget
        if time_up() or ((used_up or self._closing()) and not self.promotions):
            return self._finish(time_up)  # nothing left to do: no need to start workers
        started_ray = False
        cluster = self.config.cluster
        spec = worker_spec(self.config)

        def handle(result: CandidateResult) -> None:
            if result.worker not in self.worker_load_seconds and result.worker in pool.infos:
                self.worker_load_seconds[result.worker] = pool.infos[result.worker]["load_seconds"]
            self.on_result(result)
            if on_result is not None:
                on_result(result)
            if on_progress is not None:
                on_progress(self.progress())

        if on_progress is not None:
            on_progress(self.progress())
        try:
            started_ray = ensure_ray(self.config.cluster)
            catch_signals_again()  # ray.init installs a SIGTERM handler that exits at once
            with WorkerPool(
                spec,
                cluster.workers,
                cpus_per_worker=cluster.cpus_per_worker,
                gpus_per_worker=cluster.gpus_per_worker,
                max_attempts=cluster.max_attempts,
                trial_timeout=cluster.trial_timeout,
                start_timeout=cluster.start_timeout,
                on_event=self.on_note,
            ) as pool:
                unused = dispatch(
                    pool, self.next_task, handle, should_stop=lambda: self._should_stop(time_up)
                )
                if not self.lease_lost:
                    self._put_back(unused)
                    if self.abort_reason is None:
                        self._confirm(pool, on_progress)
        except KeyboardInterrupt:
            self._stopped()
            return RunSummary(self.finished, self.budget, self.ran, "stopped", "interrupted")
        except StorageError as exc:
            self.database_lost = True  # retried already: leave the rest to `resume`
            raise StorageError(
                f"{exc}; the study stopped with every finished result recorded; when the "
                f"database works again, continue with: {self.resume_hint}"
            ) from exc
        except BaseException:
            with contextlib.suppress(StorageError):  # the error that stopped us matters more
                self._stopped()
            raise
        finally:
            if started_ray:
                import ray

                ray.shutdown()
        if self.lease_lost:  # the other driver owns the study now: leave its state alone
            raise StudyBusy(
                f"study '{self.name}': another driver took it over while this one was stalled; "
                "this driver stopped (its finished results are recorded)"
            )
        if self.abort_reason is not None:
            self._stopped()
            return RunSummary(self.finished, self.budget, self.ran, "stopped", self.abort_reason)
        return self._finish(time_up)

    def _confirm(self, pool: Any, on_progress: Callable[[StudyProgress], None] | None) -> None:
        """When evaluators hold documents out: score the front and the baselines on them
        (stored as fidelity ``holdout``) with the workers already loaded."""
        from evomerge.cluster.pool import dispatch

        if not holdout_evaluators(self.config.evaluators):
            return
        targets = confirm_targets(self.store, self.name, "pareto", self.config.objectives)
        self.confirming = len(targets)
        tasks = deque(
            CandidateTask(
                key=self._job(_Job(t.number, None, confirmation=True)),
                recipe=t.recipe or {},
                split=HOLDOUT,
            )
            for t in targets
        )

        def handle(result: CandidateResult) -> None:
            self.on_result(result)
            if on_progress is not None:
                on_progress(self.progress())

        dispatch(pool, lambda: tasks.popleft() if tasks else None, handle)

    def _on_stop_signal(self, signum: int, frame: object) -> None:
        self.interrupted = True
        raise KeyboardInterrupt(f"signal {signum}")

    def _should_stop(self, time_up: Callable[[], bool]) -> bool:
        if self.interrupted:  # its KeyboardInterrupt did not get here: raise it again
            raise KeyboardInterrupt("a stop signal")
        return time_up() or self.lease_lost or self.abort_reason is not None

    def _finish(self, time_up: Callable[[], bool]) -> RunSummary:
        self.store.set_elapsed(self.name, self.elapsed())
        if self.budget is not None and self.finished >= self.budget:
            reason = f"budget of {self.budget} trials reached"
        elif time_up():
            reason = f"budget of {self.config.budget_hours:g} hours reached"
        elif self.closing:
            reason = (
                f"budget of {self.config.budget_hours:g} hours reached (new proposals stopped "
                f"after {self.closed_at / 60:.1f} min to finish the queued promotions)"
            )
        else:  # only a proposer with a limit of its own stops early (e.g. cma with `restarts`)
            notes = "; ".join(f"{k}: {v}" for k, v in self.proposer.describe().items())
            reason = "the proposer has finished (no more proposals" + (
                f"; {notes})" if notes else ")"
            )
        if self.failed:
            reason += f"; {self.failures_note()}"
        if self.confirming:
            reason += (
                f"; {self.confirmed} of {self.confirming} trial(s) (the front and the baselines) "
                "scored on the held-out documents"
            )
        self.store.set_status(self.name, "finished")
        return RunSummary(self.finished, self.budget, self.ran, "finished", reason)

    def _put_back(self, tasks: list[CandidateTask]) -> None:
        """Trials asked for ahead but never run (the time ran out): back to QUEUED, so a
        resume with more time runs them; a promotion is simply dropped."""
        for task in tasks:
            job = self.jobs.pop(task.key)
            if not job.promotion:
                self.store.set_state(self.name, job.number, "QUEUED")

    def _stopped(self) -> None:
        """Leave the study resumable: unfinished trials back to QUEUED, status ``stopped``."""
        self.store.requeue_running(self.name)
        self.store.set_elapsed(self.name, self.elapsed())
        self.store.set_status(self.name, "stopped")
