"""The toy zoo: fixed facts, deterministic builds, and a family in which merging visibly matters."""

from __future__ import annotations

import hashlib
import re
from dataclasses import replace
from pathlib import Path

import cma
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.errors import ConfigError
from evomerge.evaluate.harness import bundled_suites_dir
from evomerge.toy_zoo import (
    KEYS_PER_SET,
    NUM_VALUES,
    SET_NAMES,
    ToyZooSpec,
    build_toy_zoo,
    fact_sets,
    facts_jsonl,
    read_manifest,
    value_accuracy,
)

TINY = ToyZooSpec(
    sources=1, layers=1, hidden=16, intermediate=32, base_steps=4, fine_tune_steps=3, batch_size=8
)


def _digest(folder: Path) -> str:
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def test_committed_suite_data_is_the_generated_facts():
    data = bundled_suites_dir() / "toy_facts" / "data"
    for name, facts in fact_sets().items():
        assert (data / f"{name}.jsonl").read_text() == facts_jsonl(facts), name


def test_fact_sets_are_disjoint_and_complete():
    sets = fact_sets()
    assert list(sets) == list(SET_NAMES)
    keys = [fact.key for facts in sets.values() for fact in facts]
    assert len(keys) == len(set(keys)) == KEYS_PER_SET * len(SET_NAMES)
    for facts in sets.values():
        assert all(
            fact.value == f"v{fact.label}" and 0 <= fact.label < NUM_VALUES for fact in facts
        )
    labels = [fact.label for facts in sets.values() for fact in facts]
    assert len(set(labels)) == NUM_VALUES  # every value is used somewhere


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    first = build_toy_zoo(tmp_path / "one", TINY)
    again = build_toy_zoo(tmp_path / "two", TINY)
    other = build_toy_zoo(tmp_path / "three", replace(TINY, seed=1))
    for name in ("base", "ft_a"):
        assert _digest(first[name]) == _digest(again[name])
        assert _digest(first[name]) != _digest(other[name])
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == ["base", "ft_a", "toy_zoo.json"]


def test_existing_zoo_is_reused_and_a_different_one_refused(tmp_path):
    paths = build_toy_zoo(tmp_path / "zoo", TINY)
    stamp = (paths["base"] / "model.safetensors").stat().st_mtime_ns
    assert build_toy_zoo(tmp_path / "zoo", TINY) == paths
    assert (paths["base"] / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(ConfigError, match="other parameters"):
        build_toy_zoo(tmp_path / "zoo", replace(TINY, seed=5))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not an empty folder"):
        build_toy_zoo(tmp_path / "busy", TINY)
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


def test_interrupted_build_leaves_nothing(tmp_path):
    steps = []

    def interrupt() -> None:
        steps.append(1)
        if len(steps) == TINY.base_steps + 1:  # inside the fine-tune, after base was saved
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        build_toy_zoo(tmp_path / "zoo", TINY, on_step=interrupt)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad", [{"sources": 0}, {"sources": 5}, {"hidden": 10, "heads": 4}])
def test_bad_spec_is_refused(tmp_path, bad):
    with pytest.raises(ConfigError, match="toy zoo"):
        build_toy_zoo(tmp_path / "zoo", replace(TINY, **bad))
    assert not (tmp_path / "zoo").exists()


def test_manifest_records_the_pattern_toy_zoo_md_describes(toy_zoo):
    """Each fine-tune near-perfect on its own set, near chance on the other's; base knows c."""
    models = read_manifest(toy_zoo["base"].parent)["models"]
    assert models["base"]["accuracy"]["c"] == 1.0
    assert max(models["base"]["accuracy"][s] for s in "ab") <= 0.15
    for own, other in (("a", "b"), ("b", "a")):
        accuracy = models[f"ft_{own}"]["accuracy"]
        assert accuracy[own] == 1.0
        assert accuracy[other] <= 0.15
        assert accuracy["c"] >= 0.85  # gentle fine-tunes keep most of the base's facts


def _group(name: str) -> str:
    """Gene of a tensor: per layer attention / MLP / norms, embeddings, head, final norm."""
    if "embed_tokens" in name:
        return "embed"
    if "lm_head" in name:
        return "head"
    found = re.search(r"layers\.(\d+)\.(self_attn|mlp|\w+norm)", name)
    if found is None:
        return "final_norm"
    part = found.group(2)
    return f"{found.group(1)}.{part if part in ('self_attn', 'mlp') else 'norm'}"


def test_searched_per_layer_merge_beats_every_uniform_merge(toy_zoo):
    """The point of the zoo: per-layer task arithmetic clearly beats the best uniform weight."""
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(toy_zoo["base"])
    model = AutoModelForCausalLM.from_pretrained(toy_zoo["base"], dtype=torch.float32).eval()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    vectors = []
    for name in ("ft_a", "ft_b"):
        tuned = AutoModelForCausalLM.from_pretrained(toy_zoo[name], dtype=torch.float32)
        vectors.append({k: v - base[k] for k, v in tuned.state_dict().items()})
    groups = sorted({_group(k) for k in base})
    sets = fact_sets()

    def score(weights: np.ndarray) -> float:
        w = {g: weights[2 * i : 2 * i + 2] for i, g in enumerate(groups)}
        state = {}
        for k in base:
            wa, wb = w[_group(k)]
            state[k] = base[k] + wa * vectors[0][k] + wb * vectors[1][k]
        model.load_state_dict(state)
        return sum(value_accuracy(model, tokenizer, sets[s]) for s in "ab") / 2

    uniform = max(score(np.full(2 * len(groups), w)) for w in np.linspace(0.3, 1.5, 13))
    strategy = cma.CMAEvolutionStrategy(
        [0.8] * (2 * len(groups)), 0.3, {"bounds": [0, 2], "seed": 3, "verbose": -9, "verb_log": 0}
    )
    best = 0.0
    for _ in range(25):  # 25 generations of 12 = 300 merges
        candidates = strategy.ask()
        scores = [score(np.asarray(c)) for c in candidates]
        best = max(best, *scores)
        strategy.tell(candidates, [-s for s in scores])
    assert uniform < 0.9
    assert best >= uniform + 0.05, (best, uniform)


def test_heldout_text_is_committed_and_in_the_zoo_vocabulary(toy_zoo):
    """The text is every fact of sets c, a, b; each of its words is one known token."""
    from evomerge.evaluate import build_evaluator
    from evomerge.toy_zoo import heldout_text

    text = bundled_suites_dir() / "text" / "toy_facts_heldout.txt"
    assert text.read_text() == heldout_text()
    words = text.read_text().split()
    assert len(words) == 3 * 180
    model = AutoModelForCausalLM.from_pretrained(toy_zoo["ft_a"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(toy_zoo["ft_a"])
    assert tokenizer.unk_token_id not in tokenizer(text.read_text()).input_ids
    config = {"kind": "perplexity", "file": str(text), "name": "heldout"}
    result = build_evaluator(config, model, tokenizer).evaluate()
    assert result.details["tokens"] == len(words) - 1  # overlapping windows score all but one
    assert 1 < result.metrics["heldout/perplexity"] < float("inf")
