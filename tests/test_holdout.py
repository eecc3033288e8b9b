"""Held-out documents (``holdout: FRACTION``): the search split never scores them, the holdout
split scores exactly them, and the choice is the same in every evaluator, process and machine.
Scores are checked against independent computations on the chosen documents. Also: preflight
runs a python evaluator once on a stand-in model and refuses one that returns no metrics."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.errors import ConfigError, EvaluationError
from evomerge.evaluate import build_evaluator, parse_evaluator_config
from evomerge.evaluate.base import holdout_count, holdout_indices, split_indices
from evomerge.evaluate.harness import subset_indices
from evomerge.study.config import load_study_config
from evomerge.study.preflight import preflight
from evomerge.toy_zoo import fact_sets, value_accuracy
from tests.helpers import write_yaml

TOY = ("toy_facts_a", "toy_facts_b", "toy_facts_c")


@pytest.fixture(scope="module")
def ft_a(toy_zoo):  # type: ignore[no-untyped-def]
    folder = toy_zoo["ft_a"]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder)


# -- the choice -------------------------------------------------------------------------------


@pytest.mark.parametrize("total", [2, 3, 7, 10, 60, 101])
@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.25, 0.5, 0.9, 0.99])
def test_splits_partition_the_documents_in_the_documented_sizes(total, fraction):
    held = holdout_indices("task", total, fraction)
    search = split_indices("task", total, fraction, "search")
    assert split_indices("task", total, fraction, "holdout") == held
    assert held == sorted(held) and search == sorted(search)
    assert not set(held) & set(search) and sorted(held + search) == list(range(total))
    expected = min(total - 1, max(1, math.floor(fraction * total + 0.5)))
    assert len(held) == holdout_count(fraction, total) == expected


def test_the_choice_depends_on_the_task_and_nests_across_fractions():
    small, large = holdout_indices("a", 60, 0.1), holdout_indices("a", 60, 0.3)
    assert set(small) < set(large) and len(small) == 6 and len(large) == 18
    assert holdout_indices("b", 60, 0.1) != small
    assert len(holdout_indices("a", 60, 0.5)) == 30  # round half up: 0.5 * 60 exactly
    assert len(holdout_indices("a", 5, 0.5)) == 3  # 2.5 rounds up


def test_the_choice_is_the_same_in_another_process():
    """No salted ``hash()``: a fresh interpreter (another PYTHONHASHSEED) chooses the same."""
    code = (
        "import json; from evomerge.evaluate.base import holdout_indices as h; "
        "print(json.dumps([h(t, 60, 0.25) for t in ('toy_facts_a', 'toy_facts_b')]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        capture_output=True,
        text=True,
        env={"PYTHONHASHSEED": "123", "PATH": "/usr/bin:/bin"},
    ).stdout
    here = [holdout_indices(t, 60, 0.25) for t in ("toy_facts_a", "toy_facts_b")]
    assert json.loads(out) == here


def test_too_few_documents_and_no_holdout_are_errors():
    with pytest.raises(EvaluationError, match="tiny has 1 document"):
        split_indices("tiny", 1, 0.5, "search")
    assert split_indices("t", 4, None, "search") == [0, 1, 2, 3]
    with pytest.raises(EvaluationError, match="has no holdout configured"):
        split_indices("t", 4, None, "holdout")
    with pytest.raises(EvaluationError, match="split must be"):
        split_indices("t", 4, 0.5, "test")


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"kind": "lm_eval", "tasks": ["toy_facts"], "holdout": 0}, "holdout"),
        ({"kind": "lm_eval", "tasks": ["toy_facts"], "holdout": 1.0}, "holdout"),
        ({"kind": "perplexity", "file": "x.txt", "holdout": -0.1}, "holdout"),
        ({"kind": "perplexity", "file": "x.txt", "holdout": True}, "holdout"),
        (
            {"kind": "python", "function": "f.py:f", "holdout": 0.2},
            r"\(python\): holdout: .*chooses its own documents",
        ),
    ],
)
def test_bad_holdout_configs_are_named(config, message):
    with pytest.raises(EvaluationError, match=message):
        parse_evaluator_config(config, "ev")


# -- lm_eval ----------------------------------------------------------------------------------


def test_lm_eval_splits_score_exactly_their_documents(ft_a):
    model, tokenizer = ft_a
    sets = fact_sets()
    config = {"kind": "lm_eval", "tasks": ["toy_facts"], "holdout": 0.25}
    evaluator = build_evaluator(config, model, tokenizer)
    search, held = evaluator.split_documents("search"), evaluator.split_documents("holdout")
    assert set(search) == set(held) == set(TOY)
    for name in TOY:
        assert len(held[name]) == 15 and len(search[name]) == 45  # round(0.25 * 60)
        assert not set(held[name]) & set(search[name])
        assert sorted(held[name] + search[name]) == list(range(60))
        assert held[name] == holdout_indices(name, 60, 0.25)
    # Another evaluator (another model object even) holds out the same documents.
    assert build_evaluator(config, model, tokenizer).split_documents("holdout") == held

    for split, chosen in (("search", search), ("holdout", held)):
        result = evaluator.evaluate(split=split)
        assert result.details["docs"] == {name: len(chosen[name]) for name in TOY}
        oracles = []
        for name in TOY:
            facts = [sets[name[-1]][i] for i in chosen[name]]
            oracles.append(value_accuracy(model, tokenizer, facts))
            assert result.metrics[f"{name}/acc"] == pytest.approx(oracles[-1], abs=1e-9), split
        assert result.metrics["toy_facts/acc"] == pytest.approx(sum(oracles) / 3)
    # The splits really differ in what they score (ft_a knows set a, not set b).
    assert evaluator.evaluate(split="search").metrics != evaluator.evaluate(split="holdout").metrics


def test_lm_eval_limit_samples_within_the_split(ft_a):
    model, tokenizer = ft_a
    sets = fact_sets()
    evaluator = build_evaluator(
        {"kind": "lm_eval", "tasks": ["toy_facts_a"], "holdout": 0.25, "subset_seed": 3},
        model,
        tokenizer,
    )
    for split, size in (("search", 45), ("holdout", 15)):
        indices = evaluator.split_documents(split)["toy_facts_a"]
        picked = [indices[p] for p in subset_indices("toy_facts_a", size, 5, 3)]
        result = evaluator.evaluate(limit=5, split=split)
        assert result.details["docs"] == {"toy_facts_a": 5}
        oracle = value_accuracy(model, tokenizer, [sets["a"][i] for i in picked])
        assert result.metrics["toy_facts_a/acc"] == pytest.approx(oracle, abs=1e-9)
        # A larger limit (a fraction of the split) holds the smaller subset.
        half = evaluator.evaluate(limit=0.5, split=split).details["docs"]["toy_facts_a"]
        assert half == math.ceil(size / 2)
    assert evaluator.metric_names() == ["toy_facts_a/acc", "toy_facts_a/acc_stderr"]


def test_lm_eval_without_holdout_searches_everything_and_has_no_holdout(ft_a):
    evaluator = build_evaluator({"kind": "lm_eval", "tasks": ["toy_facts_a"]}, *ft_a)
    assert evaluator.holdout is None
    assert evaluator.evaluate(split="search").details["docs"] == {"toy_facts_a": 60}
    with pytest.raises(EvaluationError, match=r"toy_facts_a\) has no holdout configured"):
        evaluator.evaluate(split="holdout")


def test_lm_eval_task_with_one_document_cannot_hold_out(ft_a, tmp_path):
    folder = tmp_path / "suite"
    folder.mkdir()
    fact = fact_sets()["a"][0]
    (folder / "one.jsonl").write_text(json.dumps(fact.__dict__) + "\n")
    (folder / "one_fact.yaml").write_text(
        "task: one_fact\ndataset_path: json\n"
        "dataset_kwargs:\n  data_files:\n    test: one.jsonl\n"
        "test_split: test\noutput_type: loglikelihood\n"
        'doc_to_text: "{{key}} ="\ndoc_to_target: " {{value}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    evaluator = build_evaluator(
        {"kind": "lm_eval", "tasks": ["one_fact"], "include_paths": [str(folder)], "holdout": 0.5},
        *ft_a,
    )
    with pytest.raises(EvaluationError, match=r"one_fact.*1 document\(s\); holdout needs"):
        evaluator.evaluate()


# -- perplexity -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def random_model(family):  # type: ignore[no-untyped-def]
    model = AutoModelForCausalLM.from_pretrained(family["base"], dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(family["base"])


def _text(tmp_path: Path, tokenizer: Any, n_tokens: int = 40) -> tuple[Path, torch.Tensor]:
    words = [f"w{(7 * i + 3) % 60}" for i in range(n_tokens)]
    path = tmp_path / "corpus.txt"
    path.write_text(" ".join(words) + "\n", encoding="utf-8")
    ids = tokenizer(path.read_text(), add_special_tokens=False)["input_ids"]
    assert len(ids) == n_tokens
    return path, torch.tensor(ids)


def test_perplexity_splits_score_exactly_their_windows(random_model, tmp_path):
    """Disjoint windows of 5 tokens: each split's NLL is the mean over its chunks' losses."""
    model, tokenizer = random_model
    path, ids = _text(tmp_path, tokenizer)
    config = {"kind": "perplexity", "file": str(path), "max_length": 5, "stride": 5}
    evaluator = build_evaluator({**config, "holdout": 0.25, "name": "ppl"}, model, tokenizer)
    held = evaluator.split_windows("holdout")
    search = evaluator.split_windows("search")
    assert held == holdout_indices("ppl", 8, 0.25) and len(held) == 2  # 8 windows
    assert sorted(held + search) == list(range(8)) and not set(held) & set(search)
    again = build_evaluator({**config, "holdout": 0.25, "name": "ppl"}, model, tokenizer)
    assert again.split_windows("holdout") == held
    chunks = ids.split(5)
    for split, chosen in (("search", search), ("holdout", held)):
        total, count = 0.0, 0
        for index in chosen:
            with torch.no_grad():
                chunk = chunks[index][None]
                total += float(model(input_ids=chunk, labels=chunk).loss) * 4
            count += 4
        result = evaluator.evaluate(split=split)
        assert result.details == {"tokens": count, "windows": len(chosen)}
        assert result.metrics["ppl/nll"] == pytest.approx(total / count, rel=1e-5)
        assert result.metrics["ppl/perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
        # limit takes the first windows of the split, in order
        first = evaluator.evaluate(limit=1, split=split)
        with torch.no_grad():
            chunk = chunks[chosen[0]][None]
            loss = float(model(input_ids=chunk, labels=chunk).loss)
        assert first.metrics["ppl/nll"] == pytest.approx(loss, rel=1e-5)
    plain = build_evaluator(config, model, tokenizer)
    assert plain.evaluate(split="search").details == {"tokens": 32, "windows": 8}
    with pytest.raises(EvaluationError, match="has no holdout configured"):
        plain.evaluate(split="holdout")


def test_perplexity_text_of_one_window_cannot_hold_out(random_model, tmp_path):
    model, tokenizer = random_model
    path, _ = _text(tmp_path, tokenizer, n_tokens=10)
    with pytest.raises(EvaluationError, match=r"1 document\(s\); holdout needs at least 2"):
        build_evaluator(
            {"kind": "perplexity", "file": str(path), "max_length": 64, "holdout": 0.5},
            model,
            tokenizer,
        )


def test_python_evaluator_has_only_the_search_split(random_model, tmp_path):
    (tmp_path / "nap.py").write_text("def nap(model, tokenizer):\n    return {'slept': 1}\n")
    evaluator = build_evaluator(
        {"kind": "python", "function": str(tmp_path / "nap.py") + ":nap"}, *random_model
    )
    assert evaluator.evaluate(split="search").metrics == {"nap/slept": 1.0}
    with pytest.raises(EvaluationError, match="has no holdout configured"):
        evaluator.evaluate(split="holdout")


# -- preflight runs python evaluators once ----------------------------------------------------


def _study(tmp_path: Path, family: dict[str, Path], body: str, metric: str) -> Path:
    (tmp_path / "user.py").write_text(body)
    return write_yaml(
        tmp_path / "study.yaml",
        {
            "name": "toy",
            "base": str(family["base"]),
            "sources": [str(family["ft_0"]), str(family["ft_1"])],
            "space": "task_arithmetic_global",
            "proposer": {"kind": "random", "seed": 0},
            "objectives": [{"metric": metric}],
            "evaluators": [{"kind": "python", "function": "user.py:score"}],
            "budget": 4,
        },
    )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            "def score(model, tokenizer):\n    return {}\n",
            r"user\.py:score returned no metrics: \{\}",
        ),
        (
            "def score(model, tokenizer):\n    return {'x': 'high'}\n",
            r"user\.py:score: metric 'x' is not a number: 'high'",
        ),
        ("def score(model, tokenizer):\n    return None\n", "return value is not a number: None"),
    ],
)
def test_preflight_refuses_a_python_evaluator_that_returns_no_metrics(
    family, tmp_path, monkeypatch, body, message
):
    monkeypatch.chdir(tmp_path)
    path = _study(tmp_path, family, body, "score/x")
    with pytest.raises(EvaluationError, match=r"study\.yaml: evaluators\[0\]: .*" + message):
        preflight(load_study_config(path), str(path))


def test_preflight_runs_the_function_on_a_small_model_with_the_base_tokenizer(
    family, tmp_path, monkeypatch
):
    body = (
        "def score(model, tokenizer, limit=None):\n"
        "    ids = tokenizer('w1 w2 w3', return_tensors='pt').input_ids\n"
        "    loss = model(input_ids=ids, labels=ids).loss.detach()\n"
        "    return {'loss': float(loss), 'limit': limit}\n"
    )
    monkeypatch.chdir(tmp_path)
    path = _study(tmp_path, family, body, "score/loss")
    preflight(load_study_config(path), str(path))
    path = _study(tmp_path, family, body, "score/los")
    with pytest.raises(ConfigError, match=r"objectives\[0\]\.metric.*'score/los'.*score/limit"):
        preflight(load_study_config(path), str(path))


def test_preflight_lets_a_function_that_raises_through(family, tmp_path, monkeypatch):
    """It may need what only a worker has (a GPU, a dataset): the worker will report it."""
    monkeypatch.chdir(tmp_path)
    body = "def score(model, tokenizer):\n    raise RuntimeError('needs CUDA')\n"
    path = _study(tmp_path, family, body, "score/x")
    preflight(load_study_config(path), str(path))
