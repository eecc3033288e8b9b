"""A pool of :class:`MergeWorker` Ray actors, and :func:`dispatch`, which keeps them all busy.

The caller connects to Ray (``ray.init``) first; the pool only creates actors. Each worker runs
one candidate at a time. A worker that dies mid-candidate (killed, out of memory, a crash in
native code) is replaced by a fresh actor and its candidate is run again, up to
``max_attempts`` attempts in all; so is one whose worker reports itself broken (a sticky CUDA
error, see :mod:`evomerge.cluster.failures`). A candidate that runs past ``trial_timeout`` is
failed and its worker replaced (a timeout is not retried: the candidate would most likely time
out again). Each worker that finishes loading is announced through ``on_event``, and so is a
start still waiting, every ``START_NOTE_SECONDS``.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import RayActorError, RayError, RayTaskError

from evomerge.cluster.worker import (
    CandidateResult,
    CandidateTask,
    MergeWorker,
    WorkerSpec,
    failed_result,
)
from evomerge.errors import ConfigError, EvomergeError
from evomerge.util import first_line, format_bytes

START_NOTE_SECONDS = 30.0
"""How often a start that is still loading says so."""

# Errors of a finished call that mean the worker process is gone (not a failed candidate).
_WORKER_DIED: tuple[type[BaseException], ...] = (RayActorError,)
for _name in ("OutOfMemoryError", "WorkerCrashedError", "NodeDiedError"):
    if hasattr(ray.exceptions, _name):
        _WORKER_DIED += (getattr(ray.exceptions, _name),)

_remote_worker: Any = None


def _remote_class() -> Any:
    global _remote_worker
    if _remote_worker is None:
        _remote_worker = ray.remote(MergeWorker)
    return _remote_worker


def _ray_error_text(exc: BaseException) -> str:
    """A one-line cause: the last line of a remote traceback, without the module path."""
    text = str(getattr(exc, "error_msg", None) or exc)
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else type(exc).__name__
    head, sep, tail = last.partition(": ")
    if sep and "." in head and " " not in head:  # "evomerge.errors.EvaluationError: ..."
        last = f"{head.rsplit('.', 1)[-1]}: {tail}"
    return last


@dataclass
class _Running:
    worker: str
    task: CandidateTask
    started: float


class WorkerPool:
    """``workers`` Ray actors, each holding the models of ``spec``; see the module docstring.

    Typical use is :func:`dispatch`; by hand: ``start()``, then ``submit`` while ``idle()``,
    ``wait`` for results, ``shutdown()`` at the end (also a context manager).

    Give absolute paths (models, python evaluator files): workers may run in another working
    directory or on another node. ``restarts`` counts replaced workers (deaths and timeouts).
    """

    def __init__(
        self,
        spec: WorkerSpec | dict[str, Any],
        workers: int,
        cpus_per_worker: float = 1,
        gpus_per_worker: float = 0,
        max_attempts: int = 2,
        trial_timeout: float | None = None,
        start_timeout: float = 900,
        on_event: Callable[[str], None] | None = None,
    ) -> None:
        self.spec = spec if isinstance(spec, WorkerSpec) else WorkerSpec.model_validate(spec)
        if workers < 1:
            raise ConfigError(f"a pool needs at least 1 worker, got {workers}")
        if cpus_per_worker < 0 or gpus_per_worker < 0:
            raise ConfigError("cpus_per_worker and gpus_per_worker must not be negative")
        if max_attempts < 1:
            raise ConfigError(f"max_attempts must be at least 1, got {max_attempts}")
        if trial_timeout is not None and trial_timeout <= 0:
            raise ConfigError(f"trial_timeout must be positive, got {trial_timeout}")
        if start_timeout <= 0:
            raise ConfigError(f"start_timeout must be positive, got {start_timeout}")
        if self.spec.device.startswith("cuda") and gpus_per_worker <= 0:
            raise ConfigError(
                f"device {self.spec.device} needs gpus_per_worker > 0 "
                "(Ray hides the GPUs from actors that ask for none)"
            )
        self.workers = workers
        self.cpus_per_worker = cpus_per_worker
        self.gpus_per_worker = gpus_per_worker
        self.max_attempts = max_attempts
        self.trial_timeout = trial_timeout
        self.start_timeout = start_timeout
        self.on_event = on_event
        self.restarts = 0
        self.actors: dict[str, Any] = {}
        """worker id -> actor handle, for every live worker."""
        self.infos: dict[str, dict[str, Any]] = {}
        """worker id -> ``MergeWorker.info()`` of every worker that has started."""
        self._slots: dict[str, int] = {}
        self._generation: dict[int, int] = {}
        self._free: deque[str] = deque()
        self._running: dict[Any, _Running] = {}
        self._starting: dict[Any, tuple[str, float]] = {}
        self._queue: deque[CandidateTask] = deque()

    # -- lifecycle -------------------------------------------------------------------------
    def _check_resources(self) -> None:
        total = ray.cluster_resources()
        for name, per_worker in (("CPU", self.cpus_per_worker), ("GPU", self.gpus_per_worker)):
            have = float(total.get(name, 0.0))
            if per_worker * self.workers > have:
                raise EvomergeError(
                    f"asked for {per_worker:g} {name}s per worker x {self.workers} workers "
                    f"but the cluster has {have:g}"
                )

    def _launch(self, slot: int) -> str:
        generation = self._generation.get(slot, -1) + 1
        self._generation[slot] = generation
        worker_id = f"worker-{slot}" + (f".{generation}" if generation else "")
        actor = (
            _remote_class()
            .options(
                num_cpus=self.cpus_per_worker,
                num_gpus=self.gpus_per_worker,
                max_restarts=0,
                max_concurrency=1,
            )
            .remote(self.spec, worker_id)
        )
        self.actors[worker_id] = actor
        self._slots[worker_id] = slot
        self._starting[actor.info.remote()] = (worker_id, time.monotonic())
        return worker_id

    def start(self) -> WorkerPool:
        """Create the actors and wait until every one holds its model (``start_timeout``)."""
        if self.actors:
            raise EvomergeError("the worker pool is already started")
        if not ray.is_initialized():
            raise EvomergeError("Ray is not initialized: call ray.init() before starting a pool")
        self._check_resources()
        for slot in range(self.workers):
            self._launch(slot)
        began = time.monotonic()
        pending = list(self._starting)
        while pending:
            waited = time.monotonic() - began
            if waited >= self.start_timeout:
                self.shutdown()
                raise EvomergeError(
                    f"{len(pending)} of the {self.workers} workers did not load within "
                    f"{self.start_timeout:g} s (cluster.start_timeout); each asks for "
                    f"{self.cpus_per_worker:g} CPUs and {self.gpus_per_worker:g} GPUs (the "
                    f"cluster has {_resources_text()}): can one node fit a worker, and is "
                    "the time enough to read its models?"
                )
            step = min(START_NOTE_SECONDS, self.start_timeout - waited)
            ready, pending = ray.wait(pending, num_returns=1, timeout=step)
            if not ready:
                self._note(
                    f"waiting for {len(pending)} of {self.workers} workers to load their "
                    f"models ({time.monotonic() - began:.0f} s of {self.start_timeout:g} s)"
                )
            for ref in ready:
                worker_id, _ = self._starting.pop(ref)
                try:
                    info = ray.get(ref)
                except RayError as exc:
                    self.shutdown()
                    raise EvomergeError(
                        f"{worker_id} failed to start: {_ray_error_text(exc)}"
                    ) from None
                self._ready(worker_id, info)
        return self

    def _note(self, text: str) -> None:
        if self.on_event is not None:
            self.on_event(text)

    def _ready(self, worker_id: str, info: dict[str, Any]) -> None:
        self.infos[worker_id] = info
        self._free.append(worker_id)
        self._note(f"{worker_id} ready: {describe_worker(info)}")

    def shutdown(self) -> None:
        """Kill every actor; results still in flight are dropped."""
        for actor in self.actors.values():
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # already gone, or Ray shut down: nothing left to kill
                pass
        self.actors.clear()
        self._free.clear()
        self._running.clear()
        self._starting.clear()
        self._queue.clear()

    def __enter__(self) -> WorkerPool:
        return self.start() if not self.actors else self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    # -- bookkeeping -----------------------------------------------------------------------
    def idle(self) -> int:
        """Workers ready for a new task (retries waiting for a worker come first)."""
        return max(0, len(self._free) - len(self._queue))

    def in_flight(self) -> int:
        """Tasks submitted whose result has not been returned by :meth:`wait` yet."""
        return len(self._running) + len(self._queue)

    def starting(self) -> int:
        """Replacement workers still loading their models."""
        return len(self._starting)

    def running(self) -> dict[int, tuple[str, Any]]:
        """Task key -> (worker id, actor handle) for every task running now."""
        return {
            entry.task.key: (entry.worker, self.actors[entry.worker])
            for entry in self._running.values()
        }

    def submit(self, task: CandidateTask) -> str:
        """Give ``task`` to a free worker; returns the worker's id."""
        if not self.actors:
            raise EvomergeError("the worker pool is not started")
        if self.idle() < 1:
            raise EvomergeError("no worker is free: wait for a result before submitting")
        return self._submit(task)

    def _submit(self, task: CandidateTask) -> str:
        worker_id = self._free.popleft()
        ref = self.actors[worker_id].run.remote(task)
        self._running[ref] = _Running(worker_id, task, time.monotonic())
        return worker_id

    def _replace(self, worker_id: str) -> None:
        """Kill (if still alive) and forget ``worker_id``; start a fresh actor in its slot."""
        actor = self.actors.pop(worker_id)
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # already dead
            pass
        self.restarts += 1
        self._launch(self._slots.pop(worker_id))

    def _drain_queue(self) -> None:
        while self._queue and self._free:
            self._submit(self._queue.popleft())

    # -- results ---------------------------------------------------------------------------
    def wait(self, timeout: float | None = None) -> list[CandidateResult]:
        """Results of finished tasks: blocks until at least one is there, a replaced worker
        became free, or ``timeout`` seconds passed (then possibly an empty list).

        A task whose worker died is re-run on a fresh worker (up to ``max_attempts``) and gives
        no result until then; one that ran past ``trial_timeout`` gives a failed result.
        """
        if not self.actors:
            raise EvomergeError("the worker pool is not started")
        deadline = None if timeout is None else time.monotonic() + timeout
        results: list[CandidateResult] = []
        while True:
            freed = self._poll(self._wait_seconds(deadline), results)
            results.extend(self._expire())
            self._drain_queue()
            if results or (freed and self.idle()):
                return results
            if deadline is not None and time.monotonic() >= deadline:
                return results
            if not self._running and not self._starting:
                return results

    def _wait_seconds(self, deadline: float | None) -> float | None:
        """How long ``ray.wait`` may block: until the deadline or the next trial timeout."""
        now = time.monotonic()
        limits = []
        if deadline is not None:
            limits.append(deadline - now)
        if self.trial_timeout is not None:
            limits += [e.started + self.trial_timeout - now for e in self._running.values()]
        for _, started in self._starting.values():
            limits.append(started + self.start_timeout - now)
        return max(0.0, min(limits)) + 0.01 if limits else None

    def _poll(self, seconds: float | None, results: list[CandidateResult]) -> bool:
        """Handle the calls that finished within ``seconds``; True if a worker became free."""
        refs = [*self._running, *self._starting]
        if not refs:
            return False
        ready, _ = ray.wait(refs, num_returns=1, timeout=seconds)
        if not ready:
            return False
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        freed = False
        for ref in ready:
            if ref in self._starting:
                freed |= self._started(ref)
            else:
                result = self._finished(ref)
                if result is not None:
                    results.append(result)
        return freed

    def _started(self, ref: Any) -> bool:
        worker_id, _ = self._starting.pop(ref)
        try:
            info = ray.get(ref)
        except RayError as exc:
            raise EvomergeError(
                f"replacement worker {worker_id} failed to start: {_ray_error_text(exc)}"
            ) from None
        self._ready(worker_id, info)
        return True

    def _finished(self, ref: Any) -> CandidateResult | None:
        entry = self._running.pop(ref)
        task = entry.task
        try:
            result: CandidateResult = ray.get(ref)
        except _WORKER_DIED as exc:
            self._replace(entry.worker)
            if task.attempt < self.max_attempts:
                self._queue.append(dataclasses.replace(task, attempt=task.attempt + 1))
                return None
            times = "once" if task.attempt == 1 else f"{task.attempt} times"
            return failed_result(
                task,
                f"WorkerDied: worker died {times} running this candidate "
                f"(last: {_ray_error_text(exc)})",
                entry.worker,
            )
        except RayTaskError as exc:  # an unexpected exception inside MergeWorker.run
            self._free.append(entry.worker)
            return failed_result(task, _ray_error_text(exc), entry.worker)
        if result.worker_broken:
            self._replace(entry.worker)
            self._note(f"{entry.worker} replaced: {first_line(result.error or '')}")
            if task.attempt < self.max_attempts:
                self._queue.append(dataclasses.replace(task, attempt=task.attempt + 1))
                return None
            times = "once" if task.attempt == 1 else f"{task.attempt} times"
            result.error = (
                f"WorkerBroken: the GPU failed {times} running this candidate "
                f"(last: {result.error})"
            )
            return result
        self._free.append(entry.worker)
        return result

    def _expire(self) -> list[CandidateResult]:
        """Fail the tasks running past ``trial_timeout``; their workers are replaced."""
        now = time.monotonic()
        for worker_id, started in self._starting.values():
            if now - started > self.start_timeout:
                raise EvomergeError(
                    f"replacement worker {worker_id} did not start within "
                    f"{self.start_timeout:g} s (the cluster has {_resources_text()})"
                )
        if self.trial_timeout is None:
            return []
        results = []
        for ref, entry in list(self._running.items()):
            if now - entry.started > self.trial_timeout:
                del self._running[ref]
                self._replace(entry.worker)
                results.append(
                    failed_result(
                        entry.task,
                        f"TrialTimeout: timed out after {self.trial_timeout:g} s",
                        entry.worker,
                    )
                )
        return results


def describe_worker(info: dict[str, Any]) -> str:
    """One line on a loaded worker: where, in which dtype, where its sources stay, how long."""
    parts = [str(info.get("device", "?"))]
    if info.get("working_dtype"):
        parts.append(str(info["working_dtype"]))
    if info.get("resident_bytes") is not None:
        on_cpu = str(info.get("device", "cpu")).startswith("cpu")
        place = (
            "in memory"
            if on_cpu
            else "on the GPU"
            if info.get("residency", "device") == "device"
            else "in pinned host memory"
        )
        parts.append(f"models {place} ({format_bytes(int(info['resident_bytes']))})")
    return f"{', '.join(parts)}; loaded in {float(info.get('load_seconds', 0)):.1f} s"


def _resources_text() -> str:
    try:
        total = ray.cluster_resources()
    except Exception:
        return "unknown resources"
    return f"{total.get('CPU', 0):g} CPUs, {total.get('GPU', 0):g} GPUs"


def dispatch(
    pool: WorkerPool,
    next_task: Callable[[], CandidateTask | None],
    on_result: Callable[[CandidateResult], None],
    should_stop: Callable[[], bool] = lambda: False,
    poll_seconds: float = 1.0,
) -> list[CandidateTask]:
    """Keep every worker of a started ``pool`` busy until there is nothing left to do.

    Whenever a worker is free, ``next_task()`` is asked for a task; each result goes to
    ``on_result`` as soon as it arrives, so one slow candidate never holds back the others
    (no batches). ``next_task`` may return None *temporarily*, e.g. a CMA-ES proposer at a
    generation boundary that needs results before it can propose more: dispatch then waits for
    results (``on_result`` can tell the proposer) and asks again. It returns when
    ``next_task`` returns None and nothing is in flight, or, once ``should_stop()`` is true,
    after the results in flight have been delivered (no new task is asked for).
    ``should_stop`` is checked at least every ``poll_seconds``.

    A free worker should not wait for the driver: while every worker is busy, one task is asked
    for ahead of time, and a freed worker gets it before the result that freed it goes to
    ``on_result``. Returns the tasks asked for but never submitted (at most that one, when
    ``should_stop`` ended the run), so the caller can put them back.
    """
    ahead: list[CandidateTask] = []

    def fill() -> bool:
        """Give every free worker a task; True if ``next_task`` had none to give."""
        while pool.idle() > 0 and not should_stop():
            task = ahead.pop() if ahead else next_task()
            if task is None:
                return True
            pool.submit(task)
        return False

    while True:
        exhausted = fill()
        if pool.in_flight() == 0 and (exhausted or should_stop()):
            return ahead
        if not exhausted and not ahead and pool.idle() == 0 and not should_stop():
            task = next_task()
            if task is not None:
                ahead.append(task)
        results = pool.wait(timeout=poll_seconds)
        if results:
            fill()
        for result in results:
            on_result(result)
