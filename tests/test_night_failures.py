"""What keeps a night on GPUs going: errors classified (a sticky CUDA error replaces the worker,
others fail the candidate), GPU settings checked when the study is read, and a run that stops,
resumably and saying why, when trial after trial fails for one cause."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from evomerge.cluster.failures import is_sticky_cuda_error
from evomerge.cluster.worker import CandidateTask, MergeWorker, WorkerSpec
from evomerge.errors import ConfigError, EvaluationError
from evomerge.memory import study_working_dtype
from evomerge.study import StudyStore
from evomerge.study.config import worker_spec
from evomerge.study.driver import REPEATED_FAILURES
from tests.study_helpers import run, study_config, write_study_yaml

ILLEGAL_ACCESS = (
    "CUDA error: an illegal memory access was encountered\n"
    "CUDA kernel errors might be asynchronously reported at some other API call, so the "
    "stacktrace below might be incorrect."
)


@pytest.mark.parametrize(
    ("error", "sticky"),
    [
        (RuntimeError(ILLEGAL_ACCESS), True),
        (RuntimeError("CUDA error: device-side assert triggered"), True),
        (RuntimeError("CUDA error: unspecified launch failure"), True),
        (RuntimeError("CUDA error: uncorrectable ECC error encountered"), True),
        (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), False),
        (RuntimeError("CUDA error: out of memory"), False),
        (RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 4x3)"), False),
        (ValueError("illegal value for density"), False),
    ],
)
def test_sticky_cuda_errors_are_told_apart_from_the_candidates_own(error, sticky):
    assert is_sticky_cuda_error(error) is sticky


def test_a_sticky_error_wrapped_by_an_evaluator_is_still_sticky():
    try:
        try:
            raise RuntimeError(ILLEGAL_ACCESS)
        except RuntimeError as inner:
            raise EvaluationError("python evaluator f.py:score raised RuntimeError") from inner
    except EvaluationError as outer:
        assert is_sticky_cuda_error(outer)


EVALUATOR = '''
import os


def fussy(model, tokenizer, mode, driver_pid=0):
    """Raise the error ``mode`` names, except in the process that checks the study."""
    if os.getpid() == driver_pid:
        return {"score": 1.0}
    if mode == "sticky":
        raise RuntimeError("CUDA error: device-side assert triggered")
    raise ValueError("this tokenizer has no pad token")
'''


@pytest.fixture
def fussy_file(tmp_path: Path) -> Path:
    path = tmp_path / "fussy.py"
    path.write_text(EVALUATOR)
    return path


@pytest.fixture
def keep_torch_threads():  # type: ignore[no-untyped-def]
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(("mode", "broken"), [("sticky", True), ("value", False)])
def test_the_worker_marks_itself_broken_only_after_a_sticky_error(
    toy_zoo, fussy_file, keep_torch_threads, mode, broken
):
    spec = WorkerSpec(
        base=str(toy_zoo["base"]),
        sources=[str(toy_zoo["ft_a"])],
        evaluators=[
            {"kind": "python", "function": f"{fussy_file}:fussy", "options": {"mode": mode}}
        ],
    )
    worker = MergeWorker(spec, "here")
    recipe = {
        "method": "linear",
        "sources": [{"model": str(toy_zoo["ft_a"]), "parameters": {"weight": 1.0}}],
    }
    result = worker.run(CandidateTask(0, recipe))
    assert result.status == "failed" and result.worker_broken is broken
    assert result.timings["merge_math"] > 0 and "evaluation" not in result.timings


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"device": "cuda:1", "cluster": {"gpus_per_worker": 1}},
            "device: cuda:1: each worker sees only the GPU Ray gives it, as cuda:0; write "
            "device: cuda",
        ),
        (
            {"device": "cuda", "cluster": {"gpus_per_worker": 2}},
            "cluster.gpus_per_worker: 2: a worker uses one GPU",
        ),
        ({"working_dtype": "int8"}, "working_dtype: Input should be 'float32'"),
        ({"cluster": {"start_timeout": 0}}, "cluster.start_timeout"),
        ({"cluster": {"residency": "disk"}}, "cluster.residency: Input should be 'auto'"),
    ],
)
def test_gpu_settings_that_would_fail_later_are_refused_when_the_study_is_read(
    toy_zoo, changes, message
):
    with pytest.raises(ConfigError) as caught:
        study_config(toy_zoo, "s.db", **changes)
    assert str(caught.value).startswith("study: ") and message in str(caught.value)


def test_the_working_dtype_defaults_by_device_and_reaches_the_workers(toy_zoo):
    cpu = study_config(toy_zoo, "s.db")
    gpu = study_config(toy_zoo, "s.db", device="cuda", cluster={"gpus_per_worker": 0.5})
    assert study_working_dtype(cpu) == "float32" and study_working_dtype(gpu) == "bfloat16"
    assert worker_spec(gpu).working_dtype == "bfloat16"
    # Scoring a CUDA study's trials on the CPU keeps the study's dtype, so scores compare.
    moved = worker_spec(gpu, device="cpu")
    assert moved.device == "cpu" and moved.working_dtype == "bfloat16"
    fp16 = study_config(toy_zoo, "s.db", working_dtype="float16", cluster={"residency": "host"})
    assert worker_spec(fp16).working_dtype == "float16" and worker_spec(fp16).residency == "host"


def test_trials_failing_in_a_row_for_one_cause_stop_the_study_resumably_saying_why(
    toy_zoo, fussy_file, tmp_path, capsys
):
    """An evaluator that passes the check (it runs in the checking process) but fails on every
    worker: the run stops after REPEATED_FAILURES trials instead of spending its budget, and
    the study is left stopped (resumable), not finished."""
    storage = str(tmp_path / "s.db")
    evaluator = {
        "kind": "python",
        "function": f"{fussy_file}:fussy",
        "options": {"mode": "value", "driver_pid": os.getpid()},
        "name": "fussy",
    }
    path = write_study_yaml(
        tmp_path,
        toy_zoo,
        evaluators=[evaluator],
        objectives=[{"metric": "fussy/score"}],
        proposer={"kind": "random", "seed": 0},
        budget=40,
        storage=storage,
        cluster={"workers": 1},
    )
    code, _, err = run(["search", str(path), "--quiet"], capsys)
    assert code == 1
    assert (
        f"stopped: the last {REPEATED_FAILURES} trials all failed with EvaluationError (last: "
        "EvaluationError: python evaluator"
    ) in err
    assert "ValueError: this tokenizer has no pad token); fix the cause, then continue" in err
    assert "continue with: evomerge resume" in err
    store = StudyStore(storage)
    assert store.study("toy")["status"] == "stopped"
    failed = [t for t in store.trials("toy") if t.state == "FAILED"]
    # The stop waits for the trial in flight (one worker); nothing else ran.
    assert REPEATED_FAILURES <= len(failed) <= REPEATED_FAILURES + 1
    assert len(store.trials("toy")) < 40 and store.study("toy")["status"] == "stopped"
