"""Per-document results: the lm_eval evaluator's against lm-eval's own logged samples and a
NumPy oracle, explicit document subsets, the compact bytes, and the 1,020-document toy tasks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.errors import EvaluationError
from evomerge.evaluate.documents import TaskDocuments, decode, encode, margin_of
from evomerge.evaluate.harness import LmEvalConfig, LmEvalEvaluator, bundled_suites_dir
from evomerge.toy_zoo import (
    CHOICES_PER_DOCUMENT,
    DOCUMENTS_PER_FACT,
    choice_documents,
    choices_jsonl,
    fact_sets,
)

CHOICE_TASKS = ["toy_choice_a", "toy_choice_b"]


def _load(folder):  # type: ignore[no-untyped-def]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def base_choice(toy_zoo):  # type: ignore[no-untyped-def]
    model, tokenizer = _load(toy_zoo["base"])
    config = LmEvalConfig(kind="lm_eval", tasks=[*CHOICE_TASKS, "toy_facts_a"], holdout=0.2)
    return LmEvalEvaluator(config, model, tokenizer)


def test_committed_choice_data_is_the_generated_documents():
    data = bundled_suites_dir() / "toy_facts" / "data"
    for name, facts in fact_sets().items():
        assert (data / f"mc_{name}.jsonl").read_text() == choices_jsonl(facts), name


def test_choice_documents_ask_each_fact_among_distinct_wrong_values():
    facts = fact_sets()["a"]
    documents = choice_documents(facts)
    assert len(documents) == len(facts) * DOCUMENTS_PER_FACT >= 1000
    by_key: dict[str, set[frozenset[str]]] = {}
    for document in documents:
        choices = document["choices"]
        assert len(set(choices)) == len(choices) == CHOICES_PER_DOCUMENT
        assert choices[document["gold"]] == document["value"]
        by_key.setdefault(document["key"], set()).add(frozenset(choices))
    assert all(len(sets) == DOCUMENTS_PER_FACT for sets in by_key.values())
    gold = np.bincount([d["gold"] for d in documents], minlength=CHOICES_PER_DOCUMENT)
    assert gold.min() > 0.2 * len(documents)  # the answer is not always in one place


def test_choice_tasks_separate_the_zoo(toy_zoo):
    """Each fine-tune knows its own set's documents; the base sits near chance (0.25) on them."""
    model, tokenizer = _load(toy_zoo["ft_a"])
    config = LmEvalConfig(kind="lm_eval", tasks=CHOICE_TASKS)
    scores = LmEvalEvaluator(config, model, tokenizer).evaluate().metrics
    assert scores["toy_choice_a/acc"] > 0.99
    assert 0.15 < scores["toy_choice_b/acc"] < 0.4


def test_per_document_results_match_lm_evals_logged_samples(base_choice):
    """The recorded per-document acc and margins equal what lm-eval logs with log_samples, and
    the margins are recomputed here from the logged log-likelihoods."""
    from lm_eval.evaluator import evaluate as lm_evaluate

    result = base_choice.evaluate()
    searched = base_choice.split_documents("search")
    logged = lm_evaluate(
        lm=base_choice.lm,
        task_dict=base_choice.task_dict,
        samples=searched,
        log_samples=True,
        bootstrap_iters=0,
    )["samples"]
    for name in [*CHOICE_TASKS, "toy_facts_a"]:
        documents = result.documents[name]
        rows = sorted(logged[name], key=lambda row: row["doc_id"])
        assert documents.index.tolist() == [row["doc_id"] for row in rows] == searched[name]
        acc = np.asarray([row["acc"] for row in rows], dtype=np.float32)
        assert np.array_equal(documents.value_of("acc"), acc)
        assert result.metrics[f"{name}/acc"] == pytest.approx(float(acc.mean()))
        logliks = [np.asarray([r[0] for r in row["filtered_resps"]]) for row in rows]
        if name.startswith("toy_choice"):
            expected = [
                ll[row["target"]] - np.delete(ll, row["target"]).max()
                for ll, row in zip(logliks, rows)
            ]
            assert np.array_equal(documents.margin > 0, acc == 1)  # right exactly when ahead
        else:
            expected = [ll[0] for ll in logliks]
        np.testing.assert_allclose(documents.margin, expected, rtol=1e-5, atol=1e-5)
    assert 0.1 < result.metrics["toy_choice_a/acc"] < 0.5  # both right and wrong documents


def test_explicit_documents_are_scored_exactly(base_choice):
    full = base_choice.evaluate().documents["toy_choice_a"]
    searched = base_choice.split_documents("search")["toy_choice_a"]
    chosen = [searched[40], searched[3], searched[700]]  # any order
    result = base_choice.evaluate(documents={"toy_choice_a": chosen})
    part = result.documents["toy_choice_a"]
    assert part.index.tolist() == sorted(chosen)
    position = {int(d): i for i, d in enumerate(full.index)}
    rows = [position[d] for d in sorted(chosen)]
    assert np.array_equal(part.value_of("acc"), full.value_of("acc")[rows])
    np.testing.assert_allclose(part.margin, full.margin[rows], rtol=1e-5, atol=1e-5)
    assert result.metrics["toy_choice_a/acc"] == pytest.approx(
        float(full.value_of("acc")[rows].mean())
    )
    assert result.details["docs"]["toy_choice_a"] == 3
    assert len(result.documents["toy_choice_b"].index) == len(searched)  # not named: all searched


def test_explicit_documents_refuse_held_out_and_unknown(base_choice):
    held = base_choice.split_documents("holdout")["toy_choice_a"][0]
    with pytest.raises(
        EvaluationError, match=f"toy_choice_a: document {held} is not a searched-on"
    ):
        base_choice.evaluate(documents={"toy_choice_a": [held]})
    with pytest.raises(EvaluationError, match="'toy_choice_z', which is not one of its tasks"):
        base_choice.evaluate(documents={"toy_choice_z": [0]})
    with pytest.raises(EvaluationError, match="toy_choice_a: an empty list"):
        base_choice.evaluate(documents={"toy_choice_a": []})


def test_margin_by_hand():
    assert margin_of([-0.5], None) == -0.5
    assert margin_of([-3.0, -1.0, -2.0], 1) == pytest.approx(1.0)
    assert margin_of([-3.0, -1.0, -2.0], 0) == pytest.approx(-2.0)
    assert np.isnan(margin_of([-3.0, -1.0], 5))
    assert np.isnan(margin_of([-3.0, -1.0], " v3"))


def test_bytes_round_trip_and_are_compact():
    rng = np.random.default_rng(0)
    index = np.sort(rng.choice(1020, 816, replace=False)).astype(np.int32)
    acc = (rng.random(816) < 0.7).astype(np.float32)
    margin = rng.normal(0, 5, 816).astype(np.float32)
    margin[3] = np.nan
    documents = {
        "task_one": TaskDocuments(index=index, values={"acc": acc}, margin=margin),
        "task/two": TaskDocuments(index=index[:5], values={}, margin=None),
    }
    data = encode(documents)
    assert len(data) < 4 * 1024
    back = decode(data)
    assert list(back) == ["task_one", "task/two"]
    assert np.array_equal(back["task_one"].index, index)
    assert np.array_equal(back["task_one"].value_of("acc"), acc)
    np.testing.assert_allclose(back["task_one"].margin, margin, rtol=1e-3, atol=1e-3)
    assert np.isnan(back["task_one"].margin[3])
    assert back["task/two"].margin is None and back["task/two"].values == {}
    with pytest.raises(
        EvaluationError, match=r"no per-document values of metric 'acc' \(have: none\)"
    ):
        back["task/two"].value_of("acc")
