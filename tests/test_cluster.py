"""Merge workers and the Ray worker pool: real Ray (a local 2-CPU instance), real merges.

The python evaluators here read ``limit`` (the per-task subset size, passed to any function
that accepts it) as a per-task instruction: how long to sleep, whether to fail or crash. That
lets one evaluator behave differently for each candidate.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from evomerge.checkpoint import ModelFolder
from evomerge.cluster import CandidateResult, CandidateTask, MergeWorker, WorkerSpec
from evomerge.errors import EvomergeError
from evomerge.space import load_space

ray = pytest.importorskip("ray")

from evomerge.cluster.pool import WorkerPool, describe_worker, dispatch  # noqa: E402

EVALUATORS = '''
import os
import time


def norm(model):
    return float(sum(p.detach().double().norm() for p in model.parameters()))


def picky(model, tokenizer, limit=None):
    """Fails for limit 3."""
    if limit == 3:
        raise ValueError("three is not allowed")
    return {"norm": norm(model)}


def nap(model, tokenizer, limit=None):
    """Sleeps limit / 10 seconds."""
    time.sleep((limit or 1) / 10)
    return {"norm": norm(model)}


def crash(model, tokenizer, marker, limit=None):
    """limit 2: the process dies the first time (a marker file remembers); 3: always."""
    if limit == 3 or (limit == 2 and not os.path.exists(marker)):
        open(marker, "w").close()
        os._exit(1)
    return {"norm": norm(model)}


def sticky(model, tokenizer, marker, limit=None):
    """limit 2: a sticky CUDA error the first time (a marker file remembers); 3: always."""
    if limit == 3 or (limit == 2 and not os.path.exists(marker)):
        open(marker, "w").close()
        raise RuntimeError(
            "CUDA error: an illegal memory access was encountered\\n"
            "CUDA kernel errors might be asynchronously reported at some other API call"
        )
    return {"norm": norm(model)}


def slow(model, tokenizer, limit=None):
    """Sleeps limit seconds."""
    time.sleep(limit or 0)
    return {"norm": norm(model)}
'''


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    """A local Ray instance for this module only (shut down at its end)."""
    started = not ray.is_initialized()
    if started:
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            object_store_memory=100_000_000,
            log_to_driver=False,
        )
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def evaluators_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cluster_evaluators") / "behave.py"
    path.write_text(EVALUATORS)
    return path


@pytest.fixture
def keep_torch_threads() -> Iterator[None]:
    """A MergeWorker in this process sets torch's thread count; put it back afterwards."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _family_spec(family, evaluators_file, function, **options):  # type: ignore[no-untyped-def]
    evaluator = {"kind": "python", "function": f"{evaluators_file}:{function}", "name": "b"}
    if options:
        evaluator["options"] = options
    return WorkerSpec(
        base=str(family["base"]),
        sources=[str(family["ft_0"]), str(family["ft_1"])],
        evaluators=[evaluator],
    )


def _linear(family, weight: float = 0.5) -> dict:  # type: ignore[no-untyped-def]
    return {
        "method": "linear",
        "sources": [
            {"model": str(family["ft_0"]), "parameters": {"weight": weight}},
            {"model": str(family["ft_1"]), "parameters": {"weight": 1 - weight}},
        ],
    }


def _feed(tasks: list[CandidateTask]) -> Callable[[], CandidateTask | None]:
    queue = list(tasks)
    return lambda: queue.pop(0) if queue else None


def _run_all(pool: WorkerPool, tasks: list[CandidateTask]) -> list[CandidateResult]:
    results: list[CandidateResult] = []
    dispatch(pool, _feed(tasks), results.append)
    return results


# -- MergeWorker alone (no Ray) ------------------------------------------------------------
def test_worker_merges_recipes_over_the_models_it_holds(
    family, evaluators_file, keep_torch_threads
):
    worker = MergeWorker(_family_spec(family, evaluators_file, "picky"), "local")
    info = worker.info()
    assert info["worker"] == "local" and info["device"] == "cpu" and info["load_seconds"] > 0
    assert torch.get_num_threads() == 1  # outside Ray, torch_threads None means 1

    linear = worker.run(CandidateTask(0, _linear(family)))
    assert linear.status == "complete" and linear.worker == "local" and linear.attempt == 1
    # A recipe with a base, and one over a single source: the same resident tensors.
    ta = {**_linear(family), "method": "task_arithmetic", "base": str(family["base"])}
    assert worker.run(CandidateTask(1, ta)).status == "complete"
    alone = {
        "method": "linear",
        "sources": [{"model": str(family["ft_1"]), "parameters": {"weight": 1.0}}],
    }
    ft_1 = worker.run(CandidateTask(2, alone, attempt=2))
    assert ft_1.status == "complete" and ft_1.attempt == 2
    assert ft_1.metrics == worker.run(CandidateTask(3, _linear(family, 0.0))).metrics
    assert linear.metrics == worker.run(CandidateTask(4, _linear(family))).metrics

    foreign = {**alone, "sources": [{"model": str(family["ft_2"]), "parameters": {"weight": 1}}]}
    result = worker.run(CandidateTask(5, foreign))
    assert result.status == "failed" and result.key == 5 and not result.metrics
    assert result.error is not None and result.error.startswith("ConfigError: ")
    assert "not a model this worker holds" in result.error and "ft_2" in result.error
    bad = worker.run(CandidateTask(6, {"method": "linear", "sources": []}))
    assert bad.status == "failed" and "ConfigError" in (bad.error or "")
    failing = worker.run(CandidateTask(7, _linear(family), limit=3))
    assert failing.status == "failed"
    assert failing.error == (
        f"EvaluationError: python evaluator {evaluators_file}:picky raised "
        "ValueError: three is not allowed"
    )
    assert worker.run(CandidateTask(8, _linear(family))).metrics == linear.metrics


# -- the pool --------------------------------------------------------------------------------
@pytest.mark.timeout(180)
def test_pool_results_equal_the_in_process_computation(toy_zoo, ray_cluster, keep_torch_threads):
    space = load_space("task_arithmetic_global")
    space = space.bind(ModelFolder(toy_zoo["base"]), ["ft_a", "ft_b"])
    base, sources = str(toy_zoo["base"]), [str(toy_zoo["ft_a"]), str(toy_zoo["ft_b"])]
    genomes = np.random.default_rng(0).random((4, space.dimension))
    tasks = [
        CandidateTask(key, space.decode(genome, base, sources).model_dump(exclude_defaults=True))
        for key, genome in enumerate(genomes)
    ]
    spec = WorkerSpec(
        base=base, sources=sources, evaluators=[{"kind": "lm_eval", "tasks": ["toy_facts_a"]}]
    )
    with WorkerPool(spec, workers=2) as pool:
        assert sorted(pool.infos) == ["worker-0", "worker-1"]
        assert {info["torch_threads"] for info in pool.infos.values()} == {1}
        results = _run_all(pool, tasks)
    assert sorted(r.key for r in results) == [0, 1, 2, 3]
    assert {r.worker for r in results} == {"worker-0", "worker-1"}
    local = MergeWorker(spec, "local")
    for result in results:
        assert result.status == "complete" and result.attempt == 1, result.error
        assert result.merge_seconds > 0 and result.eval_seconds > 0
        expected = local.run(tasks[result.key])
        assert "toy_facts_a/acc" in result.metrics
        assert result.metrics == expected.metrics  # exactly
    assert len({r.metrics["toy_facts_a/acc"] for r in results}) > 1  # the genomes differ


@pytest.mark.timeout(180)
def test_a_merge_that_overflows_fails_naming_the_tensor_and_the_pool_goes_on(
    family, evaluators_file, ray_cluster
):
    overflow = {
        "method": "linear",
        "parameters": {"normalize": False},
        "sources": [
            {"model": str(family["ft_0"]), "parameters": {"weight": 3e38}},
            {"model": str(family["ft_1"]), "parameters": {"weight": 3e38}},
        ],
    }
    tasks = [CandidateTask(0, _linear(family)), CandidateTask(1, overflow)]
    tasks += [CandidateTask(2, _linear(family, 0.25))]
    with WorkerPool(_family_spec(family, evaluators_file, "nap"), workers=1) as pool:
        by_key = {r.key: r for r in _run_all(pool, tasks)}
        assert pool.restarts == 0  # the worker itself was fine
    assert by_key[1].status == "failed" and not by_key[1].metrics
    assert "MergeError: the merge produced NaN or Inf in tensor model." in (by_key[1].error or "")
    for key in (0, 2):  # before and after it, on the same worker: finite, normal scores
        assert by_key[key].status == "complete"
        assert math.isfinite(by_key[key].metrics["b/norm"])
    # The candidate after the failed one scores as if it had never happened.
    with WorkerPool(_family_spec(family, evaluators_file, "nap"), workers=1) as pool:
        alone = _run_all(pool, [CandidateTask(2, _linear(family, 0.25))])[0]
    assert alone.metrics == by_key[2].metrics


@pytest.mark.timeout(180)
def test_a_failing_candidate_fails_alone(family, evaluators_file, ray_cluster):
    tasks = [CandidateTask(key, _linear(family, key / 4), limit=key) for key in range(1, 5)]
    # next_task returns None at a "generation boundary" until both results are in.
    pending = list(tasks)
    results: list[CandidateResult] = []
    nones = 0

    def next_task() -> CandidateTask | None:
        nonlocal nones
        if not pending or (len(pending) == 2 and len(results) < 2):
            nones += 1
            return None
        return pending.pop(0)

    with WorkerPool(_family_spec(family, evaluators_file, "picky"), workers=2) as pool:
        dispatch(pool, next_task, results.append)
        assert pool.in_flight() == 0 and pool.idle() == 2 and pool.restarts == 0
        # Once should_stop() is true, no task is asked for.
        dispatch(pool, lambda: pytest.fail("asked for a task"), results.append, lambda: True)
    # At least the final None; a None at the boundary itself happens only if the two results
    # arrive in separate waits, which depends on timing (asserting it made the test flaky).
    assert nones >= 1
    assert [r.key for r in results[:2]] in ([1, 2], [2, 1])  # the boundary held
    by_key = {r.key: r for r in results}
    assert sorted(by_key) == [1, 2, 3, 4]
    assert by_key[3].status == "failed" and not by_key[3].metrics
    assert "ValueError: three is not allowed" in (by_key[3].error or "")
    assert by_key[3].worker in ("worker-0", "worker-1")
    for key in (1, 2, 4):
        assert by_key[key].status == "complete" and by_key[key].error is None
        assert set(by_key[key].metrics) == {"b/norm"}


@pytest.mark.timeout(180)
def test_a_dead_worker_is_replaced_and_its_candidate_run_again(
    family, evaluators_file, ray_cluster, tmp_path
):
    spec = _family_spec(family, evaluators_file, "crash", marker=str(tmp_path / "crashed"))
    tasks = [
        CandidateTask(0, _linear(family, 0.2)),
        CandidateTask(1, _linear(family, 0.4), limit=2),  # dies on its first attempt only
        CandidateTask(2, _linear(family, 0.6)),
    ]
    with WorkerPool(spec, workers=2, max_attempts=2) as pool:
        results = _run_all(pool, tasks)
        assert pool.restarts == 1
        by_key = {r.key: r for r in results}
        assert sorted(by_key) == [0, 1, 2]
        assert all(r.status == "complete" for r in results), [r.error for r in results]
        assert by_key[1].attempt == 2 and by_key[0].attempt == by_key[2].attempt == 1
        assert by_key[1].worker in ("worker-0", "worker-1", "worker-0.1", "worker-1.1")
        assert len(pool.actors) == 2 and pool.idle() + pool.starting() == 2

        # A candidate that kills its worker on every attempt fails after max_attempts.
        [dead] = _run_all(pool, [CandidateTask(3, _linear(family), limit=3)])
        assert dead.status == "failed" and dead.attempt == 2 and dead.key == 3
        assert "worker died 2 times" in (dead.error or "")
        assert pool.restarts == 3
        # The pool is whole again.
        [after] = _run_all(pool, [CandidateTask(4, _linear(family))])
        assert after.status == "complete" and after.attempt == 1
        assert len(pool.actors) == 2


def test_a_sticky_cuda_error_replaces_the_worker_and_runs_the_candidate_again(
    family, evaluators_file, ray_cluster, tmp_path
):
    """An illegal memory access leaves a CUDA context unusable: the worker is replaced (each
    load and replacement announced) and the candidate re-run, within max_attempts; an
    ordinary error fails the candidate and keeps the worker."""
    spec = _family_spec(family, evaluators_file, "sticky", marker=str(tmp_path / "broke"))
    notes: list[str] = []
    with WorkerPool(spec, workers=1, max_attempts=2, on_event=notes.append) as pool:
        assert notes == [f"worker-0 ready: {describe_worker(pool.infos['worker-0'])}"]
        assert "cpu, float32, models in memory (" in notes[0] and "loaded in" in notes[0]
        [healed] = _run_all(pool, [CandidateTask(0, _linear(family), limit=2)])
        assert healed.status == "complete" and healed.attempt == 2
        assert healed.worker == "worker-0.1" and pool.restarts == 1
        assert notes[1].startswith("worker-0 replaced: EvaluationError: python evaluator ")
        assert notes[1].endswith(
            "raised RuntimeError: CUDA error: an illegal memory access was encountered"
        )
        assert notes[2].startswith("worker-0.1 ready: ")
        [broken] = _run_all(pool, [CandidateTask(1, _linear(family), limit=3)])
        assert broken.status == "failed" and broken.attempt == 2 and pool.restarts == 3
        assert (broken.error or "").startswith("WorkerBroken: the GPU failed 2 times running")
        assert "illegal memory access" in (broken.error or "")
        [after] = _run_all(pool, [CandidateTask(2, _linear(family))])
        assert after.status == "complete" and after.attempt == 1 and pool.restarts == 3


def test_workers_that_do_not_load_within_start_timeout_stop_the_pool_with_the_reason(
    family, evaluators_file, ray_cluster
):
    spec = _family_spec(family, evaluators_file, "picky")
    with pytest.raises(EvomergeError) as caught:
        WorkerPool(spec, workers=1, start_timeout=0.05).start()
    assert "1 of the 1 workers did not load within 0.05 s (cluster.start_timeout)" in str(
        caught.value
    )


@pytest.mark.timeout(180)
def test_a_candidate_past_the_trial_timeout_fails_and_the_pool_goes_on(
    family, evaluators_file, ray_cluster
):
    with WorkerPool(
        _family_spec(family, evaluators_file, "slow"), workers=1, trial_timeout=1
    ) as pool:
        start = time.monotonic()
        pool.submit(CandidateTask(0, _linear(family), limit=5))
        assert pool.running()[0][0] == "worker-0"
        results: list[CandidateResult] = []
        while not results:
            results = pool.wait(timeout=10)
        [timed_out] = results
        assert time.monotonic() - start < 4  # killed, not waited for
        assert timed_out.status == "failed" and timed_out.key == 0
        assert timed_out.error == "TrialTimeout: timed out after 1 s"
        assert pool.restarts == 1 and pool.in_flight() == 0
        [quick] = _run_all(pool, [CandidateTask(1, _linear(family))])
        assert quick.status == "complete" and quick.worker == "worker-0.1"


@pytest.mark.timeout(180)
def test_one_slow_candidate_does_not_idle_the_other_workers(family, evaluators_file, ray_cluster):
    slow = CandidateTask(0, _linear(family, 0.0), limit=25)  # 2.5 s
    fast = [CandidateTask(key, _linear(family, key / 10), limit=1) for key in range(1, 8)]
    arrivals: list[tuple[CandidateResult, float]] = []
    with WorkerPool(_family_spec(family, evaluators_file, "nap"), workers=2) as pool:
        start = time.monotonic()
        dispatch(pool, _feed([slow, *fast]), lambda r: arrivals.append((r, time.monotonic())))
    order = [r.key for r, _ in arrivals]
    assert sorted(order) == list(range(8)) and all(r.status == "complete" for r, _ in arrivals)
    assert order[-1] == 0, order  # every fast candidate finished while the slow one ran
    slow_result, slow_done = arrivals[-1]
    assert {r.worker for r, _ in arrivals[:-1]} == {"worker-0", "worker-1"} - {slow_result.worker}
    assert arrivals[-2][1] - start < slow_done - start - 0.5
    assert slow_result.eval_seconds >= 2.5


def test_dispatch_asks_one_task_ahead_and_hands_back_what_it_never_ran(
    family, evaluators_file, ray_cluster
):
    asked: list[CandidateTask] = []

    def next_task() -> CandidateTask:
        nap = 8 if len(asked) == 1 else 2  # 0.8 s for the second task, 0.2 s for the others
        asked.append(CandidateTask(len(asked), _linear(family, 0.5), limit=nap))
        return asked[-1]

    results: list[CandidateResult] = []
    asked_at_first_result: list[int] = []

    def on_result(result: CandidateResult) -> None:
        asked_at_first_result.append(len(asked))
        results.append(result)

    with WorkerPool(_family_spec(family, evaluators_file, "nap"), workers=2) as pool:
        unused = dispatch(pool, next_task, on_result, should_stop=lambda: len(asked) >= 5)
    # Two running plus one asked for while both workers were busy, before any result was in.
    assert asked_at_first_result[0] == 3
    # The fifth was asked for ahead, then the run stopped: it is handed back, never run.
    assert unused == [asked[4]]
    assert sorted(r.key for r in results) == [0, 1, 2, 3]


@pytest.mark.timeout(60)
def test_asking_for_missing_gpus_fails_fast(family, evaluators_file, ray_cluster):
    spec = _family_spec(family, evaluators_file, "picky")
    start = time.monotonic()
    pool = WorkerPool(spec, workers=2, gpus_per_worker=1)
    with pytest.raises(EvomergeError, match=r"1 GPUs per worker x 2 workers .* has 0"):
        pool.start()
    with pytest.raises(EvomergeError, match=r"CPUs per worker x 3 workers .* has 2"):
        WorkerPool(spec, workers=3).start()
    assert time.monotonic() - start < 5
    with pytest.raises(EvomergeError, match="gpus_per_worker"):
        WorkerPool(spec.model_copy(update={"device": "cuda"}), workers=1)


@pytest.mark.timeout(120)
def test_a_worker_that_cannot_start_is_a_one_line_error(family, evaluators_file, ray_cluster):
    spec = _family_spec(family, evaluators_file, "no_such_function")
    with pytest.raises(EvomergeError) as info:
        WorkerPool(spec, workers=1).start()
    message = str(info.value)
    assert message.startswith("worker-0 failed to start: EvaluationError: python evaluator")
    assert "no_such_function" in message and "\n" not in message
