"""The lm_eval evaluator on the toy zoo: real lm-eval, real in-place merges, independent oracles."""

from __future__ import annotations

import gc
import json
import os
import resource
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.checkpoint import ModelFolder
from evomerge.errors import EvaluationError
from evomerge.evaluate import build_evaluator, parse_evaluator_config
from evomerge.evaluate.harness import LmEvalEvaluator, subset_indices
from evomerge.merge.engine import InPlaceMerger, merge_to_folder
from evomerge.merge.recipe import open_recipe_models, parse_recipe, plan_recipe
from evomerge.toy_zoo import fact_sets, value_accuracy


def _load(folder: Path):  # type: ignore[no-untyped-def]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def ft_a(toy_zoo):  # type: ignore[no-untyped-def]
    return _load(toy_zoo["ft_a"])


def _plan(zoo: dict[str, Path], wa: list[float], wb: list[float], attention: float = 1.0):  # type: ignore[no-untyped-def]
    """Per-layer task arithmetic: weight gradients per source, attention scaled apart."""
    recipe = parse_recipe(
        {
            "method": "task_arithmetic",
            "base": str(zoo["base"]),
            "sources": [
                {
                    "model": str(zoo["ft_a"]),
                    "parameters": {
                        "weight": [{"kind": "attention", "value": attention}, {"value": wa}]
                    },
                },
                {"model": str(zoo["ft_b"]), "parameters": {"weight": wb}},
            ],
        }
    )
    return plan_recipe(recipe, open_recipe_models(recipe))


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_scores_match_an_independent_accuracy_oracle(toy_zoo):
    """acc is the share of facts whose value is the arg-max token: computed here without lm-eval."""
    sets = fact_sets()
    for name in ("base", "ft_a", "ft_b"):
        model, tokenizer = _load(toy_zoo[name])
        evaluator = build_evaluator({"kind": "lm_eval", "tasks": ["toy_facts"]}, model, tokenizer)
        result = evaluator.evaluate()
        for fact_set in "abc":
            expected = value_accuracy(model, tokenizer, sets[fact_set])
            assert result.metrics[f"toy_facts_{fact_set}/acc"] == pytest.approx(expected, abs=1e-9)
        mean = sum(result.metrics[f"toy_facts_{s}/acc"] for s in "abc") / 3
        assert result.metrics["toy_facts/acc"] == pytest.approx(mean)
        assert result.seconds > 0
        assert result.details["docs"] == {f"toy_facts_{s}": 60 for s in "abc"}


def test_zoo_scores_show_the_expected_pattern(toy_zoo):
    scores = {}
    for name in ("base", "ft_a", "ft_b"):
        model, tokenizer = _load(toy_zoo[name])
        evaluator = build_evaluator({"kind": "lm_eval", "tasks": ["toy_facts"]}, model, tokenizer)
        scores[name] = evaluator.evaluate().metrics
    assert scores["base"]["toy_facts_c/acc"] >= 0.95
    assert scores["ft_a"]["toy_facts_a/acc"] >= 0.95 and scores["ft_a"]["toy_facts_b/acc"] <= 0.2
    assert scores["ft_b"]["toy_facts_b/acc"] >= 0.95 and scores["ft_b"]["toy_facts_a/acc"] <= 0.2
    assert max(scores["base"][f"toy_facts_{s}/acc"] for s in "ab") <= 0.2
    # closed-form stderr of a mean of 0/1 values: sqrt(p (1 - p) / (n - 1))
    p = scores["ft_a"]["toy_facts_c/acc"]
    expected = (p * (1 - p) / 59) ** 0.5
    assert scores["ft_a"]["toy_facts_c/acc_stderr"] == pytest.approx(expected)


def test_in_place_merge_scores_exactly_like_the_exported_checkpoint(toy_zoo, tmp_path):
    plan = _plan(toy_zoo, [0.4, 0.9, 1.1], [1.0, 0.5], attention=0.7)
    merger = InPlaceMerger([ModelFolder(p) for p in plan.models])
    model, tokenizer = _load(toy_zoo["base"])
    evaluator = build_evaluator({"kind": "lm_eval", "tasks": ["toy_facts"]}, model, tokenizer)
    before = evaluator.evaluate().metrics
    merger.merge_into(plan, model)
    in_place = evaluator.evaluate().metrics

    exported = merge_to_folder(plan, tmp_path / "merged")
    fresh, fresh_tokenizer = _load(exported)
    fresh_scores = build_evaluator(
        {"kind": "lm_eval", "tasks": ["toy_facts"]}, fresh, fresh_tokenizer
    ).evaluate()
    assert in_place == fresh_scores.metrics
    assert in_place != before


def test_fifty_in_place_merges_score_like_fresh_models_with_flat_memory(toy_zoo):
    generator = torch.Generator().manual_seed(0)
    plans = []
    for _ in range(50):
        wa = (torch.rand(3, generator=generator) * 1.4).tolist()
        wb = (torch.rand(3, generator=generator) * 1.4).tolist()
        plans.append(_plan(toy_zoo, wa, wb, attention=float(torch.rand(1, generator=generator))))
    merger = InPlaceMerger([ModelFolder(p) for p in plans[0].models])
    model, tokenizer = _load(toy_zoo["base"])
    config = {"kind": "lm_eval", "tasks": ["toy_facts"]}
    evaluator = build_evaluator(config, model, tokenizer)
    reused, rss = [], []
    for plan in plans:
        merger.merge_into(plan, model)
        reused.append(evaluator.evaluate().metrics)
        gc.collect()
        rss.append(_rss_mb())
    assert len({json.dumps(m, sort_keys=True) for m in reused}) > 10  # candidates differ

    # Fresh: a new model object and a new evaluator per candidate (every 10th, for time).
    for index in range(0, 50, 10):
        fresh, fresh_tokenizer = _load(toy_zoo["base"])
        fresh.load_state_dict(dict(merger.merged_tensors(plans[index])), strict=False)
        fresh_scores = build_evaluator(config, fresh, fresh_tokenizer).evaluate().metrics
        assert reused[index] == fresh_scores, index
    growth = rss[-1] - rss[9]
    assert growth < 25, (
        f"RSS grew {growth:.1f} MB over 40 candidates: {rss[9]:.0f} -> {rss[-1]:.0f}"
    )
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss > 0


def test_limit_takes_a_fixed_seeded_nested_subset(ft_a):
    model, tokenizer = ft_a
    sets = fact_sets()
    evaluator = LmEvalEvaluator(
        parse_evaluator_config({"kind": "lm_eval", "tasks": ["toy_facts_c"], "subset_seed": 7}),
        model,
        tokenizer,
    )
    small, large = (
        subset_indices("toy_facts_c", 60, 10, 7),
        subset_indices("toy_facts_c", 60, 25, 7),
    )
    assert set(small) < set(large) and len(small) == 10 and small == sorted(small)
    assert subset_indices("toy_facts_c", 60, 10, 8) != small  # the seed matters
    for limit, indices in (
        (10, small),
        (25, large),
        (0.5, subset_indices("toy_facts_c", 60, 30, 7)),
    ):
        result = evaluator.evaluate(limit)
        assert result.details["docs"] == {"toy_facts_c": len(indices)}
        oracle = value_accuracy(model, tokenizer, [sets["c"][i] for i in indices])
        assert result.metrics["toy_facts_c/acc"] == pytest.approx(oracle, abs=1e-9)
        assert evaluator.evaluate(limit).metrics == result.metrics
    # The config's limit is the default; an explicit one overrides it.
    limited = build_evaluator(
        {"kind": "lm_eval", "tasks": ["toy_facts_c"], "limit": 10, "subset_seed": 7},
        model,
        tokenizer,
    )
    assert limited.evaluate().details["docs"] == {"toy_facts_c": 10}
    assert limited.evaluate(60).details["docs"] == {"toy_facts_c": 60}


def test_the_same_subset_is_used_for_every_candidate(toy_zoo):
    """Two models at one limit are scored on the same documents (checked against the oracle)."""
    sets = fact_sets()
    indices = subset_indices("toy_facts_a", 60, 12, 0)
    for name in ("ft_a", "ft_b", "base"):
        model, tokenizer = _load(toy_zoo[name])
        evaluator = build_evaluator(
            {"kind": "lm_eval", "tasks": ["toy_facts_a"], "limit": 12}, model, tokenizer
        )
        oracle = value_accuracy(model, tokenizer, [sets["a"][i] for i in indices])
        assert evaluator.evaluate().metrics["toy_facts_a/acc"] == pytest.approx(oracle, abs=1e-9)


def test_unknown_task_lists_what_is_available(ft_a):
    with pytest.raises(EvaluationError, match="toy_fact_z") as caught:
        build_evaluator(
            {"kind": "lm_eval", "tasks": ["toy_fact_z"], "include_defaults": False}, *ft_a
        )
    assert "toy_facts_a" in str(caught.value) and "toy_facts" in str(caught.value)


def test_metric_a_task_does_not_produce_is_named(ft_a):
    evaluator = build_evaluator({"kind": "lm_eval", "tasks": ["toy_facts_a"]}, *ft_a)
    assert evaluator.metric_names() == ["toy_facts_a/acc", "toy_facts_a/acc_stderr"]
    evaluator.check_metrics(["toy_facts_a/acc"])
    with pytest.raises(EvaluationError, match=r"toy_facts_a/f1.*produces: toy_facts_a/acc"):
        evaluator.check_metrics(["toy_facts_a/f1"])


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"kind": "lm_eval", "tasks": []}, "tasks"),
        ({"kind": "lm_eval", "tasks": ["toy_facts"], "batch_size": 0}, "batch_size"),
        ({"kind": "lm_eval", "tasks": ["toy_facts"], "colour": "red"}, "colour"),
        ({"kind": "lm_eval", "tasks": ["toy_facts"], "limit": 0}, "limit"),
        ({"kind": "lm_eval", "tasks": ["toy_facts"], "limit": 1.5}, "limit"),
        ({"kind": "bleu"}, "unknown evaluator kind 'bleu'.*lm_eval"),
        ({"tasks": ["x"]}, "missing 'kind'"),
    ],
)
def test_bad_config_is_named(ft_a, config, message):
    with pytest.raises(EvaluationError, match=message):
        build_evaluator(config, *ft_a)


def _write_task(folder: Path, data_file: str, rows: int = 6) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    facts = fact_sets()["a"][:rows]
    (folder / "facts.jsonl").write_text("".join(json.dumps(f.__dict__) + "\n" for f in facts))
    (folder / "my_facts.yaml").write_text(
        "task: my_facts\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data_file}\n"
        "test_split: test\noutput_type: loglikelihood\n"
        'doc_to_text: "{{key}} ="\ndoc_to_target: " {{value}}"\n'
        "metric_list:\n  - metric: acc\n"
    )


def test_user_task_with_relative_data_file_works_from_any_directory(ft_a, tmp_path, monkeypatch):
    _write_task(tmp_path / "suite", "facts.jsonl")
    monkeypatch.chdir(tmp_path)  # facts.jsonl does not resolve from here
    evaluator = build_evaluator(
        {"kind": "lm_eval", "tasks": ["my_facts"], "include_paths": [str(tmp_path / "suite")]},
        *ft_a,
    )
    result = evaluator.evaluate()
    model, tokenizer = ft_a
    assert result.metrics["my_facts/acc"] == value_accuracy(model, tokenizer, fact_sets()["a"][:6])
    assert result.details["docs"] == {"my_facts": 6}


def test_missing_data_file_is_named(ft_a, tmp_path):
    _write_task(tmp_path / "suite", "missing.jsonl")
    with pytest.raises(EvaluationError, match=r"my_facts.*missing\.jsonl"):
        build_evaluator(
            {"kind": "lm_eval", "tasks": ["my_facts"], "include_paths": [str(tmp_path / "suite")]},
            *ft_a,
        )


def test_include_path_that_is_not_a_folder(ft_a, tmp_path):
    with pytest.raises(EvaluationError, match="not a folder"):
        build_evaluator(
            {"kind": "lm_eval", "tasks": ["toy_facts"], "include_paths": [str(tmp_path / "no")]},
            *ft_a,
        )


def test_few_shot_prompts_are_fixed_across_candidates_and_evaluators(ft_a, tmp_path):
    folder = tmp_path / "fewshot"
    _write_task(folder, "facts.jsonl", rows=30)
    text = (folder / "my_facts.yaml").read_text().replace("task: my_facts", "task: my_fewshot")
    (folder / "my_facts.yaml").write_text(text + "fewshot_split: test\n")
    config = {
        "kind": "lm_eval",
        "tasks": ["my_fewshot"],
        "num_fewshot": 3,
        "include_paths": [str(folder)],
    }
    first = build_evaluator(config, *ft_a)
    scores = first.evaluate(limit=10).metrics
    prompts = [i.arguments[0] for i in first.tasks["my_fewshot"].instances]
    assert all(p.count("=") == 4 for p in prompts)  # three shots and the question
    assert first.evaluate(limit=10).metrics == scores
    second = build_evaluator(config, *ft_a)
    assert second.evaluate(limit=10).metrics == scores
    assert [i.arguments[0] for i in second.tasks["my_fewshot"].instances] == prompts


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_model_is_scored_unchanged(toy_zoo):
    cpu_model, tokenizer = _load(toy_zoo["ft_a"])
    cpu = build_evaluator({"kind": "lm_eval", "tasks": ["toy_facts"]}, cpu_model, tokenizer)
    gpu_model, _ = _load(toy_zoo["ft_a"])
    gpu = build_evaluator(
        {"kind": "lm_eval", "tasks": ["toy_facts"]}, gpu_model.to("cuda"), tokenizer
    )
    expected, got = cpu.evaluate().metrics, gpu.evaluate().metrics
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key] == pytest.approx(expected[key], abs=1 / 60 + 1e-9), key
