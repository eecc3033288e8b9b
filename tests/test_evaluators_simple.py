"""The perplexity and python evaluators, checked against independent computations."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.errors import EvaluationError
from evomerge.evaluate.perplexity import PerplexityConfig, PerplexityEvaluator
from evomerge.evaluate.python_callable import PythonConfig, PythonEvaluator
from evomerge.random_family import build_random_family

N_TOKENS = 30


@pytest.fixture(scope="module")
def model_and_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    paths = build_random_family(tmp_path_factory.mktemp("simple_eval"), sources=1, seed=0)
    model = AutoModelForCausalLM.from_pretrained(paths["base"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(paths["base"])
    return model, tokenizer


@pytest.fixture(scope="module")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    words = [f"w{(7 * i + 3) % 60}" for i in range(N_TOKENS)]
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    # Newlines are dropped by the word-level tokenizer: still N_TOKENS tokens.
    path.write_text(" ".join(words[:12]) + "\n" + " ".join(words[12:]) + "\n", encoding="utf-8")
    return path


def token_ids(tokenizer: Any, path: Path) -> torch.Tensor:
    ids = tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    assert len(ids) == N_TOKENS
    return torch.tensor(ids)


def logprob(model: Any, context_and_token: torch.Tensor) -> float:
    """log p(last token | the tokens before it), from a forward of exactly that prefix."""
    with torch.no_grad():
        logits = model(input_ids=context_and_token[None]).logits[0, -2].double()
    return float(logits.log_softmax(-1)[context_and_token[-1]])


def perplexity(model: Any, tokenizer: Any, **fields: Any) -> PerplexityEvaluator:
    return PerplexityEvaluator(PerplexityConfig(**fields), model, tokenizer)


def test_single_window_matches_model_loss(model_and_tokenizer, text_file):
    model, tokenizer = model_and_tokenizer
    ids = token_ids(tokenizer, text_file)
    result = perplexity(model, tokenizer, file=text_file, max_length=64, stride=64).evaluate()
    with torch.no_grad():
        loss = float(model(input_ids=ids[None], labels=ids[None]).loss)
    assert result.details == {"tokens": N_TOKENS - 1, "windows": 1}
    assert result.metrics["perplexity/perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert result.metrics["perplexity/nll"] == pytest.approx(loss, rel=1e-5)
    assert result.seconds > 0


def test_default_max_length_is_model_context(model_and_tokenizer, text_file):
    model, tokenizer = model_and_tokenizer
    evaluator = perplexity(model, tokenizer, file=text_file, stride=16)
    assert evaluator.max_length == 128  # the toy Llama's max_position_embeddings
    assert evaluator.evaluate().details == {"tokens": N_TOKENS - 1, "windows": 1}


@pytest.mark.parametrize("batch_size", [1, 3])
def test_overlapping_windows_match_per_token_context(model_and_tokenizer, text_file, batch_size):
    model, tokenizer = model_and_tokenizer
    ids = token_ids(tokenizer, text_file)
    max_length, stride = 8, 3
    result = perplexity(
        model,
        tokenizer,
        file=text_file,
        max_length=max_length,
        stride=stride,
        batch_size=batch_size,
        name="ppl",
    ).evaluate()
    # Token t is scored by the first window (starting at a multiple of stride) that contains it
    # and t + 1 - max_length tokens before it; its context is that window's tokens before t.
    expected = 0.0
    for t in range(1, N_TOKENS):
        begin = max(0, math.ceil((t + 1 - max_length) / stride)) * stride
        assert t - begin < max_length
        expected -= logprob(model, ids[begin : t + 1])
    assert result.details == {"tokens": N_TOKENS - 1, "windows": 9}
    assert result.metrics["ppl/nll"] == pytest.approx(expected / (N_TOKENS - 1), rel=1e-5)
    assert set(result.metrics) == {"ppl/nll", "ppl/perplexity"}


def test_disjoint_windows_sum_chunk_losses(model_and_tokenizer, text_file):
    model, tokenizer = model_and_tokenizer
    ids = token_ids(tokenizer, text_file)
    result = perplexity(model, tokenizer, file=text_file, max_length=8, stride=8).evaluate()
    total, count = 0.0, 0
    for chunk in ids.split(8):  # 8, 8, 8, 6 tokens; each chunk's first token is unscored
        with torch.no_grad():
            loss = float(model(input_ids=chunk[None], labels=chunk[None]).loss)
        total += loss * (len(chunk) - 1)
        count += len(chunk) - 1
    assert result.details == {"tokens": count, "windows": 4}
    assert count == N_TOKENS - 4
    assert result.metrics["perplexity/nll"] == pytest.approx(total / count, rel=1e-5)


def test_limit_takes_a_prefix_of_windows(model_and_tokenizer, text_file):
    model, tokenizer = model_and_tokenizer
    ids = token_ids(tokenizer, text_file)
    evaluator = perplexity(model, tokenizer, file=text_file, max_length=10, stride=5)
    first = evaluator.evaluate(limit=1)
    with torch.no_grad():
        loss = float(model(input_ids=ids[None, :10], labels=ids[None, :10]).loss)
    assert first.details == {"tokens": 9, "windows": 1}
    assert first.metrics["perplexity/nll"] == pytest.approx(loss, rel=1e-5)
    # Second window [5, 15) scores tokens 10..14 with tokens 5..9 as context.
    two = evaluator.evaluate(limit=2)
    second = -sum(logprob(model, ids[5 : t + 1]) for t in range(10, 15))
    assert two.details == {"tokens": 14, "windows": 2}
    assert two.metrics["perplexity/nll"] == pytest.approx((loss * 9 + second) / 14, rel=1e-5)
    assert evaluator.evaluate(limit=0.5).details["windows"] == 3  # ceil(0.5 * 5)
    assert evaluator.evaluate().details == {"tokens": N_TOKENS - 1, "windows": 5}
    config_limited = perplexity(model, tokenizer, file=text_file, max_length=10, stride=5, limit=2)
    assert config_limited.evaluate().details["windows"] == 2
    assert config_limited.evaluate(limit=4).details["windows"] == 4
    with pytest.raises(EvaluationError, match="limit"):
        evaluator.evaluate(limit=0)


def test_weights_changed_in_place_change_the_result(model_and_tokenizer, text_file):
    model, tokenizer = model_and_tokenizer
    evaluator = perplexity(model, tokenizer, file=text_file, max_length=16, stride=8)
    before = evaluator.evaluate().metrics["perplexity/perplexity"]
    weight = model.model.layers[0].mlp.down_proj.weight
    saved = weight.detach().clone()
    model.train()
    try:
        with torch.no_grad():
            weight.mul_(0.5)
        halved = evaluator.evaluate().metrics["perplexity/perplexity"]
        assert model.training  # the training flag is restored
    finally:
        with torch.no_grad():
            weight.copy_(saved)
        model.eval()
    assert halved != pytest.approx(before, rel=1e-6)
    assert evaluator.evaluate().metrics["perplexity/perplexity"] == before
    assert not model.training


def test_perplexity_bad_input(model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    with pytest.raises(EvaluationError, match=r"missing\.txt"):
        perplexity(model, tokenizer, file=tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
    with pytest.raises(EvaluationError, match=r"empty\.txt"):
        perplexity(model, tokenizer, file=tmp_path / "empty.txt")
    (tmp_path / "one.txt").write_text("w1\n", encoding="utf-8")
    with pytest.raises(EvaluationError, match=r"one\.txt.*1 token"):
        perplexity(model, tokenizer, file=tmp_path / "one.txt")
    (tmp_path / "latin1.txt").write_bytes("w1 w2 caf\xe9".encode("latin-1"))
    with pytest.raises(EvaluationError, match=r"latin1\.txt"):
        perplexity(model, tokenizer, file=tmp_path / "latin1.txt")
    (tmp_path / "ok.txt").write_text("w1 w2 w3", encoding="utf-8")
    with pytest.raises(EvaluationError, match=r"stride \(9\).*max_length \(8\)"):
        perplexity(model, tokenizer, file=tmp_path / "ok.txt", max_length=8, stride=9)
    with pytest.raises(EvaluationError, match=r"stride \(200\).*max_length \(128\)"):
        perplexity(model, tokenizer, file=tmp_path / "ok.txt", stride=200)


USER_MODULE = textwrap.dedent(
    """
    import torch

    CONSTANT = 3

    def weight_sum(model, tokenizer, scale=1.0):
        w = model.model.layers[0].mlp.down_proj.weight
        return {"sum": w.double().sum() * scale, "vocab": len(tokenizer)}

    def single(model, tokenizer):
        return 0.25

    def echo_limit(model, tokenizer, limit):
        return {"limit": -1 if limit is None else limit}

    def kwargs_limit(model, tokenizer, **kwargs):
        return {"limit": kwargs["limit"] or -1, "n": len(kwargs)}

    def fails(model, tokenizer):
        raise ValueError("bad things")

    def word(model, tokenizer):
        return {"x": "high"}

    def listy(model, tokenizer):
        return {"x": [1, 2]}

    def nothing(model, tokenizer):
        return None

    def flag(model, tokenizer):
        return {"ok": True}

    def vector(model, tokenizer):
        return {"v": torch.ones(2)}

    def nan(model, tokenizer):
        return float("nan")

    def empty(model, tokenizer):
        return {}
    """
)


@pytest.fixture
def user_file(tmp_path: Path) -> Path:
    path = tmp_path / "user_metrics.py"
    path.write_text(USER_MODULE, encoding="utf-8")
    return path


def python_eval(model_and_tokenizer: Any, **fields: Any) -> PythonEvaluator:
    model, tokenizer = model_and_tokenizer
    return PythonEvaluator(PythonConfig(**fields), model, tokenizer)


def test_python_function_from_file(model_and_tokenizer, user_file):
    model, _ = model_and_tokenizer
    weight = model.model.layers[0].mlp.down_proj.weight
    evaluator = python_eval(
        model_and_tokenizer, function=f"{user_file}:weight_sum", options={"scale": 2.0}
    )
    result = evaluator.evaluate()
    expected = 2.0 * float(weight.detach().double().sum())
    assert result.metrics == {"weight_sum/sum": pytest.approx(expected), "weight_sum/vocab": 64.0}
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.add_(1.0)
        changed = evaluator.evaluate().metrics["weight_sum/sum"]
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    assert changed == pytest.approx(expected + 2.0 * weight.numel())


def test_python_single_number_and_prefix(model_and_tokenizer, user_file):
    result = python_eval(model_and_tokenizer, function=f"{user_file}:single").evaluate()
    assert result.metrics == {"single/score": 0.25}
    named = python_eval(model_and_tokenizer, function=f"{user_file}:single", name="mine")
    assert named.evaluate().metrics == {"mine/score": 0.25}
    nan = python_eval(model_and_tokenizer, function=f"{user_file}:nan").evaluate()
    assert math.isnan(nan.metrics["nan/score"])


def test_python_limit_is_passed_when_accepted(model_and_tokenizer, user_file):
    echo = python_eval(model_and_tokenizer, function=f"{user_file}:echo_limit")
    assert echo.evaluate().metrics == {"echo_limit/limit": -1.0}
    assert echo.evaluate(limit=5).metrics == {"echo_limit/limit": 5.0}
    assert echo.evaluate(limit=5.0).metrics == {"echo_limit/limit": 5.0}
    assert echo.evaluate(limit=0.25).metrics == {"echo_limit/limit": 0.25}
    with pytest.raises(EvaluationError, match="limit"):
        echo.evaluate(limit=-2)
    defaulted = python_eval(model_and_tokenizer, function=f"{user_file}:echo_limit", limit=3)
    assert defaulted.evaluate().metrics == {"echo_limit/limit": 3.0}
    kw = python_eval(model_and_tokenizer, function=f"{user_file}:kwargs_limit")
    assert kw.evaluate(limit=7).metrics == {"kwargs_limit/limit": 7.0, "kwargs_limit/n": 1.0}
    # A function without a limit parameter is called without one.
    assert python_eval(model_and_tokenizer, function=f"{user_file}:single").evaluate(limit=2)


@pytest.mark.parametrize(
    ("function", "pattern"),
    [
        ("fails", r":fails raised ValueError: bad things"),
        ("word", r":word: metric 'x' is not a number: 'high'"),
        ("listy", r":listy: metric 'x' is not a number: \[1, 2\]"),
        ("nothing", r":nothing: return value is not a number: None"),
        ("flag", r":flag: metric 'ok' is a bool"),
        ("vector", r":vector: metric 'v' is not a number"),
        ("empty", r":empty returned no metrics"),
    ],
)
def test_python_bad_results(model_and_tokenizer, user_file, function, pattern):
    evaluator = python_eval(model_and_tokenizer, function=f"{user_file}:{function}")
    with pytest.raises(EvaluationError, match=pattern) as info:
        evaluator.evaluate()
    if function == "fails":
        assert isinstance(info.value.__cause__, ValueError)


def test_python_module_path_form(model_and_tokenizer, user_file, monkeypatch):
    monkeypatch.syspath_prepend(str(user_file.parent))
    evaluator = python_eval(model_and_tokenizer, function="user_metrics:single")
    assert evaluator.evaluate().metrics == {"single/score": 0.25}
    monkeypatch.chdir(user_file.parent)
    relative = python_eval(model_and_tokenizer, function="./user_metrics.py:single")
    assert relative.evaluate().metrics == {"single/score": 0.25}


def test_python_bad_function_specs(model_and_tokenizer, user_file, tmp_path, monkeypatch):
    cases = [
        ("nocolon", r"'nocolon'.*expected 'package\.module:function'"),
        ("no_such_module_xyz:fn", r"no_such_module_xyz:fn.*ModuleNotFoundError"),
        (f"{tmp_path}/absent.py:fn", r"absent\.py:fn: file not found"),
        (f"{user_file}:missing", r"user_metrics\.py:missing.*no attribute 'missing'"),
        (f"{user_file}:CONSTANT", r"user_metrics\.py:CONSTANT.*not callable"),
    ]
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('import time failure')\n", encoding="utf-8")
    cases.append((f"{broken}:fn", r"broken\.py:fn.*RuntimeError: import time failure"))
    monkeypatch.syspath_prepend(str(tmp_path))
    cases.append(("broken:fn", r"broken:fn.*RuntimeError: import time failure"))
    for function, pattern in cases:
        with pytest.raises(EvaluationError, match=pattern):
            python_eval(model_and_tokenizer, function=function)


def test_registry_builds_both_kinds(model_and_tokenizer, user_file, text_file):
    from evomerge.evaluate.registry import build_evaluator, parse_evaluator_config

    model, tokenizer = model_and_tokenizer
    evaluator = build_evaluator(
        {"kind": "python", "function": f"{user_file}:single"}, model, tokenizer
    )
    assert isinstance(evaluator, PythonEvaluator)
    assert evaluator.metric_names() == ["single/score"]
    ppl = build_evaluator(
        {"kind": "perplexity", "file": str(text_file), "max_length": 16, "stride": 8},
        model,
        tokenizer,
    )
    assert ppl.metric_names() == ["perplexity/nll", "perplexity/perplexity"]
    with pytest.raises(EvaluationError, match="stride"):
        parse_evaluator_config({"kind": "perplexity", "file": str(text_file), "stride": 0})
    with pytest.raises(EvaluationError, match="limit"):
        parse_evaluator_config({"kind": "python", "function": "m:f", "options": {"limit": 1}})
