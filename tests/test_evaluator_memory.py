"""Out of memory during evaluation: the suite halves the evaluator's batch and runs it again;
``batch_size: auto`` for lm_eval. GPU memory is stood in for by a forward (or a user function)
that raises ``torch.cuda.OutOfMemoryError`` above a batch size, the error CUDA raises."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.errors import EvaluationError
from evomerge.evaluate import build_evaluator, harness, parse_evaluator_config
from evomerge.evaluate.base import EvaluationOutOfMemory, is_out_of_memory
from evomerge.evaluate.perplexity import PerplexityConfig, PerplexityEvaluator
from evomerge.evaluate.registry import preflight_evaluator
from evomerge.evaluate.suite import EvaluatorSuite
from evomerge.random_family import build_random_family
from evomerge.toy_zoo import fact_sets, value_accuracy

OOM_TEXT = "CUDA out of memory. Tried to allocate 2.00 GiB"

USER_CODE = f"""
import torch

CALLS = []

def score(model, tokenizer, batch_size):
    CALLS.append(batch_size)
    if batch_size > 8:
        raise torch.cuda.OutOfMemoryError({OOM_TEXT!r})
    return {{"acc": batch_size}}

def always(model, tokenizer, batch_size):
    CALLS.append(batch_size)
    raise torch.cuda.OutOfMemoryError({OOM_TEXT!r})

def broken(model, tokenizer, batch_size):
    CALLS.append(batch_size)
    raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x6)")

def unbatched(model, tokenizer):
    raise torch.cuda.OutOfMemoryError({OOM_TEXT!r})

def counted(model, tokenizer):
    CALLS.append("counted")
    return 1.0
"""


@pytest.fixture
def user_file(tmp_path: Path) -> Path:
    path = tmp_path / "user_eval.py"
    path.write_text(USER_CODE)
    return path


def python_evaluator(path: Path, function: str, **fields: Any):  # type: ignore[no-untyped-def]
    config = {"kind": "python", "function": f"{path}:{function}", **fields}
    return build_evaluator(config, model=None, tokenizer=None)


def calls_of(evaluator: Any) -> list[Any]:
    return evaluator.function.__globals__["CALLS"]


def oom_above(model: Any, largest: int) -> list[int]:
    """Make ``model``'s forward raise CUDA's out-of-memory error for batches over ``largest``;
    the batch sizes of the forwards that ran are appended to the returned list."""
    forward = model.forward
    ran: list[int] = []

    def limited(*args: Any, **kwargs: Any) -> Any:
        rows = (kwargs["input_ids"] if "input_ids" in kwargs else args[0]).shape[0]
        if rows > largest:
            raise torch.cuda.OutOfMemoryError(OOM_TEXT)
        ran.append(rows)
        return forward(*args, **kwargs)

    model.forward = limited
    return ran


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (torch.cuda.OutOfMemoryError(OOM_TEXT), True),
        (RuntimeError("CUDA error: out of memory"), True),
        (RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory: 9 GB"), True),
        (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), False),
        (ValueError("out of memory"), False),  # only a RuntimeError's message counts
    ],
)
def test_out_of_memory_is_recognized(error: BaseException, expected: bool) -> None:
    assert is_out_of_memory(error) is expected
    try:  # wrapped, as an evaluator wraps user code: found through the chain
        try:
            raise error
        except Exception as inner:
            raise EvaluationError("evaluator failed") from inner
    except EvaluationError as outer:
        assert is_out_of_memory(outer) is expected


def test_python_evaluator_is_halved_until_it_fits_and_stays_there(user_file):
    evaluator = python_evaluator(user_file, "score", batch_size=32)
    suite = EvaluatorSuite([evaluator])
    metrics, seconds = suite.evaluate()
    assert metrics == {"score/acc": 8.0}
    assert calls_of(evaluator) == [32, 16, 8]
    assert suite.oom_retries == 2
    assert suite.last_batch_sizes == {"python:score": 8}
    assert seconds > 0
    # The next candidate starts at 8: no failed attempt.
    assert suite.evaluate()[0] == {"score/acc": 8.0}
    assert calls_of(evaluator) == [32, 16, 8, 8]
    assert suite.oom_retries == 0 and suite.last_batch_sizes == {"python:score": 8}


def test_only_the_evaluator_that_ran_out_is_run_again(user_file):
    first = python_evaluator(user_file, "counted")
    second = python_evaluator(user_file, "score", batch_size=16)
    suite = EvaluatorSuite([first, second])
    metrics, _ = suite.evaluate()
    assert metrics == {"counted/score": 1.0, "score/acc": 8.0}
    assert calls_of(first) == ["counted"]  # each evaluator imports the file anew
    assert calls_of(second) == [16, 8]
    assert suite.oom_retries == 1
    assert suite.last_batch_sizes == {"python:score": 8}  # "counted" has no batch


def test_out_of_memory_at_batch_one_names_the_sizes_and_what_to_do(user_file):
    evaluator = python_evaluator(user_file, "always", batch_size=32)
    suite = EvaluatorSuite([evaluator])
    with pytest.raises(EvaluationOutOfMemory) as caught:
        suite.evaluate()
    message = str(caught.value)
    assert "python:always" in message
    assert "batch sizes 32, 16, 8, 4, 2, 1" in message
    assert "lower its batch_size, use residency: host, or a smaller working dtype" in message
    assert isinstance(caught.value, EvaluationError)
    assert calls_of(evaluator) == [32, 16, 8, 4, 2, 1]
    assert evaluator.batch_size == 32  # batch 1 did not help: the batch was not the cause


def test_an_evaluator_without_a_batch_fails_at_once(user_file):
    evaluator = python_evaluator(user_file, "unbatched")
    with pytest.raises(EvaluationOutOfMemory, match="no batch size to lower"):
        EvaluatorSuite([evaluator]).evaluate()


def test_other_runtime_errors_are_not_retried(user_file):
    evaluator = python_evaluator(user_file, "broken", batch_size=32)
    suite = EvaluatorSuite([evaluator])
    with pytest.raises(EvaluationError, match="mat1 and mat2") as caught:
        suite.evaluate()
    assert not isinstance(caught.value, EvaluationOutOfMemory)
    assert calls_of(evaluator) == [32]
    assert evaluator.batch_size == 32 and suite.oom_retries == 0


def test_python_batch_size_needs_a_function_that_takes_it(user_file):
    config = {"kind": "python", "function": f"{user_file}:counted", "batch_size": 4}
    with pytest.raises(EvaluationError, match="takes no batch_size parameter"):
        build_evaluator(config, model=None, tokenizer=None)
    with pytest.raises(EvaluationError, match="takes no batch_size parameter"):
        preflight_evaluator(config)
    with pytest.raises(EvaluationError, match=r"options.*set the evaluator's batch_size field"):
        parse_evaluator_config({**config, "options": {"batch_size": 4}})


@pytest.mark.parametrize(
    ("value", "accepted"), [("auto", True), (8, True), ("big", False), (0, False), (True, False)]
)
def test_lm_eval_batch_size_is_a_number_or_auto(value: Any, accepted: bool) -> None:
    config = {"kind": "lm_eval", "tasks": ["toy_facts"], "batch_size": value}
    if accepted:
        assert parse_evaluator_config(config).batch_size == value
        return
    with pytest.raises(
        EvaluationError,
        match=rf"batch_size: must be a whole number of at least 1 or 'auto', got {value!r}",
    ):
        parse_evaluator_config(config)


@pytest.fixture(scope="module")
def random_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_random_family(tmp_path_factory.mktemp("memory"), sources=1, seed=3)["base"]


def test_perplexity_halving_matches_batch_one(random_llama, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{(5 * i + 1) % 60}" for i in range(40)), encoding="utf-8")
    fields = {"file": text, "max_length": 8, "stride": 4}  # 9 windows
    tokenizer = AutoTokenizer.from_pretrained(random_llama)
    model = AutoModelForCausalLM.from_pretrained(random_llama, dtype=torch.float32)
    unbatched = PerplexityEvaluator(PerplexityConfig(**fields), model, tokenizer).evaluate()
    assert unbatched.details["windows"] == 9
    ran = oom_above(model, 2)
    evaluator = PerplexityEvaluator(PerplexityConfig(**fields, batch_size=8), model, tokenizer)
    suite = EvaluatorSuite([evaluator])
    metrics, _ = suite.evaluate()
    assert suite.oom_retries == 2  # 8 -> 4 -> 2
    assert suite.last_batch_sizes == {"perplexity:perplexity": 2}
    assert ran == [2, 2, 2, 2, 1]  # 9 windows in batches of 2
    for key, value in unbatched.metrics.items():
        assert metrics[key] == pytest.approx(value, rel=1e-5), key


@pytest.fixture
def toy_model(toy_zoo):  # type: ignore[no-untyped-def]
    model = AutoModelForCausalLM.from_pretrained(toy_zoo["ft_a"], dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(toy_zoo["ft_a"])


LIMIT = 20


def toy_oracle(model: Any, tokenizer: Any) -> float:
    """acc of toy_facts_a on the LIMIT documents lm_eval samples, without lm-eval."""
    chosen = harness.subset_indices("toy_facts_a", 60, LIMIT, 0)
    return value_accuracy(model, tokenizer, [fact_sets()["a"][i] for i in chosen])


def lm_eval_config(batch_size: int | str) -> dict[str, Any]:
    return {"kind": "lm_eval", "tasks": ["toy_facts_a"], "limit": LIMIT, "batch_size": batch_size}


def test_auto_batch_size_on_cpu_is_the_maximum_without_probing(toy_model):
    model, tokenizer = toy_model
    oracle = toy_oracle(model, tokenizer)
    fixed = build_evaluator(lm_eval_config(64), model, tokenizer).evaluate()
    evaluator = build_evaluator(lm_eval_config("auto"), model, tokenizer)
    assert evaluator.detected_batch_size is None
    ran = oom_above(model, 10**6)
    result = evaluator.evaluate()
    assert result.metrics == fixed.metrics
    assert result.metrics["toy_facts_a/acc"] == pytest.approx(oracle)
    assert result.details["batch_size"] == result.details["detected_batch_size"] == 64
    assert ran == [LIMIT]  # one batch of every document: no probe forwards


def test_auto_batch_size_searches_once_where_memory_runs_out(toy_model, monkeypatch):
    """On CUDA lm-eval probes down from 64 until a batch fits (forced here on the CPU)."""
    model, tokenizer = toy_model
    oracle = toy_oracle(model, tokenizer)
    unbatched = build_evaluator(lm_eval_config(1), model, tokenizer).evaluate().metrics
    probes: list[Any] = []
    monkeypatch.setattr(harness, "probes_batch_size", lambda device: probes.append(device) or True)
    evaluator = build_evaluator(lm_eval_config("auto"), model, tokenizer)
    ran = oom_above(model, 12)
    suite = EvaluatorSuite([evaluator])
    first = suite.evaluate()[0]
    detected = evaluator.detected_batch_size
    assert detected is not None and 6 < detected <= 12  # lm-eval shrinks by a tenth a step
    assert suite.oom_retries == 0 and suite.last_batch_sizes == {"lm_eval:toy_facts_a": detected}
    assert max(ran) == detected
    ran.clear()
    second = suite.evaluate()[0]
    assert len(probes) == 1  # searched once, not per evaluation
    assert sorted(ran, reverse=True) == [detected] * (LIMIT // detected) + [LIMIT % detected]
    assert first == second == unbatched
    assert first["toy_facts_a/acc"] == pytest.approx(oracle)


def test_lm_eval_halving_matches_an_unbatched_run(toy_model):
    model, tokenizer = toy_model
    oracle = toy_oracle(model, tokenizer)
    unbatched = build_evaluator(lm_eval_config(1), model, tokenizer).evaluate().metrics
    evaluator = build_evaluator(lm_eval_config(64), model, tokenizer)
    ran = oom_above(model, 5)
    suite = EvaluatorSuite([evaluator])
    metrics, _ = suite.evaluate()
    assert suite.oom_retries == 4  # 64 -> 32 -> 16 -> 8 -> 4
    assert suite.last_batch_sizes == {"lm_eval:toy_facts_a": 4}
    assert evaluator.evaluate().details["batch_size"] == 4
    assert ran and max(ran) == 4
    assert metrics == unbatched
    assert metrics["toy_facts_a/acc"] == pytest.approx(oracle)
