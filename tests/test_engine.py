"""The two front ends give identical tensors; output is sharded, loadable, atomic, reproducible."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from evomerge.checkpoint import ModelFolder
from evomerge.errors import CheckpointError, ConfigError, MergeError
from evomerge.merge.config_file import plan_from_file
from evomerge.merge.engine import InPlaceMerger, merge_to_folder
from tests.helpers import copy_model, edit_tensors, load_folder, write_yaml

METHOD_RECIPES = {
    "linear": ({"weight": 0.6}, {"weight": [0.2, 0.9]}, {}),
    "slerp": ({}, None, {"t": [{"kind": "attention", "value": [0.1, 0.9]}, {"value": 0.4}]}),
    "task_arithmetic": ({"weight": 0.7}, {"weight": -0.3}, {"lambda": 0.9}),
    "ties": ({"weight": 1.0, "density": 0.4}, {"weight": 0.5, "density": [0.3, 0.8]}, {}),
    "dare_ties": ({"weight": 0.8, "density": 0.5}, {"weight": 0.6, "density": 0.7}, {}),
    "dare_linear": (
        {"weight": 0.8, "density": 0.5},
        {"weight": 0.6, "density": 0.3},
        {"rescale": "l1"},
    ),
    "della": ({"weight": 1.0, "density": 0.5, "epsilon": 0.1}, {"weight": 0.5, "density": 0.6}, {}),
    "breadcrumbs_ties": ({"weight": 1.0, "density": 0.8, "gamma": 0.05}, {"weight": 0.4}, {}),
    "model_stock": ({}, {}, {}),
}


def recipe_for(method: str, fam: dict[str, Path]) -> dict:
    first, second, shared = METHOD_RECIPES[method]
    sources = [{"model": str(fam["ft_0"]), "parameters": first}]
    if second is not None:
        sources.append({"model": str(fam["ft_1"]), "parameters": second})
    recipe = {"method": method, "base": str(fam["base"]), "sources": sources, "seed": 7}
    if shared:
        recipe["parameters"] = shared
    return recipe


def in_place_state(plan, models_dir: Path) -> dict[str, torch.Tensor]:
    """Merge in place into a model loaded from the base; return its state dict."""
    merger = InPlaceMerger(
        [ModelFolder(p, label=label) for p, label in zip(plan.models, plan.labels)]
    )
    model = AutoModelForCausalLM.from_pretrained(models_dir, dtype=torch.float32)
    merger.merge_into(plan, model)
    return model.state_dict()


@pytest.mark.parametrize("method", sorted(METHOD_RECIPES))
def test_streaming_and_in_place_give_identical_tensors(method, family, tmp_path):
    config = write_yaml(tmp_path / "recipe.yaml", recipe_for(method, family))
    plan, _ = plan_from_file(config)
    out = merge_to_folder(plan, tmp_path / "out")
    streamed = load_folder(out)
    state = in_place_state(plan, family["base"])
    assert set(streamed) == set(state)
    for name, tensor in streamed.items():
        assert torch.equal(tensor, state[name]), name
    # The merge really moved away from the base (a silent no-op would pass the equality).
    base = load_folder(family["base"])
    assert any(not torch.equal(base[n], streamed[n]) for n in streamed)


def test_tied_embeddings_stay_tied_and_match(tied_family, tmp_path):
    recipe = recipe_for("ties", tied_family)
    plan, _ = plan_from_file(write_yaml(tmp_path / "r.yaml", recipe))
    out = merge_to_folder(plan, tmp_path / "out")
    streamed = load_folder(out)
    assert "lm_head.weight" not in streamed  # tied: only the embedding is stored
    merger = InPlaceMerger([ModelFolder(p) for p in plan.models])
    model = AutoModelForCausalLM.from_pretrained(tied_family["base"], dtype=torch.float32)
    merger.merge_into(plan, model)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.lm_head.weight, streamed["model.embed_tokens.weight"])
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.tensor([[4, 5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)


def test_in_place_merger_reuses_one_model_for_many_plans(family, tmp_path):
    """Two different plans in a row into one model equal two fresh merges (no leakage)."""
    plans = []
    for weight in (0.2, 0.9):
        recipe = recipe_for("task_arithmetic", family)
        recipe["sources"][0]["parameters"]["weight"] = weight
        plans.append(plan_from_file(write_yaml(tmp_path / f"r{weight}.yaml", recipe))[0])
    merger = InPlaceMerger([ModelFolder(p) for p in plans[0].models])
    model = AutoModelForCausalLM.from_pretrained(family["base"], dtype=torch.float32)
    merger.merge_into(plans[0], model)
    merger.merge_into(plans[1], model)
    fresh = load_folder(merge_to_folder(plans[1], tmp_path / "fresh"))
    state = model.state_dict()
    assert all(torch.equal(fresh[n], state[n]) for n in fresh)


def test_sharded_output_has_index_and_loads(family, tmp_path):
    plan, _ = plan_from_file(write_yaml(tmp_path / "r.yaml", recipe_for("linear", family)))
    out = merge_to_folder(plan, tmp_path / "out", shard_size=300_000)
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in load_folder(out).values()
    )
    for shard in shards[:-1]:  # every shard but a lone oversized tensor respects the limit
        assert shard.stat().st_size < 300_000 + 2 * 64 * 256 * 4
    single = load_folder(merge_to_folder(plan, tmp_path / "single"))
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert all(torch.equal(model.state_dict()[n], single[n]) for n in single)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "README.md"):
        assert (out / name).is_file(), name


def test_dare_masks_reproduce_bit_for_bit_and_follow_the_seed(family, tmp_path):
    recipe = recipe_for("dare_ties", family)
    first = load_folder(
        merge_to_folder(plan_from_file(write_yaml(tmp_path / "a.yaml", recipe))[0], tmp_path / "a")
    )
    again = load_folder(
        merge_to_folder(plan_from_file(write_yaml(tmp_path / "b.yaml", recipe))[0], tmp_path / "b")
    )
    recipe["seed"] = 8
    other = load_folder(
        merge_to_folder(plan_from_file(write_yaml(tmp_path / "c.yaml", recipe))[0], tmp_path / "c")
    )
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert any(not torch.equal(first[n], other[n]) for n in first)


def test_output_dtype_defaults_to_base_and_can_be_chosen(bf16_family, tmp_path):
    recipe = recipe_for("task_arithmetic", bf16_family)
    plan, _ = plan_from_file(write_yaml(tmp_path / "r.yaml", recipe))
    kept = load_folder(merge_to_folder(plan, tmp_path / "bf16"))
    assert {t.dtype for t in kept.values()} == {torch.bfloat16}
    recipe["dtype"] = "float32"
    plan32, _ = plan_from_file(write_yaml(tmp_path / "r32.yaml", recipe))
    out32 = merge_to_folder(plan32, tmp_path / "fp32")
    wide = load_folder(out32)
    assert {t.dtype for t in wide.values()} == {torch.float32}
    assert json.loads((out32 / "config.json").read_text())["dtype"] == "float32"
    # The bf16 output is the float32 result rounded once.
    assert all(torch.equal(wide[n].to(torch.bfloat16), kept[n]) for n in kept)


def test_a_failing_merge_leaves_nothing_behind(family, tmp_path):
    bad = copy_model(family["ft_1"], tmp_path / "bad")

    def poison(tensors):
        tensors["model.layers.2.mlp.up_proj.weight"][0, 0] = float("nan")

    edit_tensors(bad, poison)
    recipe = recipe_for("ties", family)
    recipe["sources"][1]["model"] = str(bad)
    plan, _ = plan_from_file(write_yaml(tmp_path / "r.yaml", recipe))
    with pytest.raises(
        CheckpointError, match=r"'bad'.*model\.layers\.2\.mlp\.up_proj\.weight.*NaN"
    ):
        merge_to_folder(plan, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "r.yaml"]


def test_interrupt_keeps_the_previous_output_intact(family, tmp_path):
    plan, _ = plan_from_file(write_yaml(tmp_path / "r.yaml", recipe_for("linear", family)))
    out = merge_to_folder(plan, tmp_path / "out")
    before = load_folder(out)
    other, _ = plan_from_file(write_yaml(tmp_path / "s.yaml", recipe_for("ties", family)))

    def interrupt(done: int, total: int) -> None:
        if done == total // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        merge_to_folder(other, out, force=True, progress=interrupt)
    after = load_folder(out)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "r.yaml", "s.yaml"]
    replaced = load_folder(merge_to_folder(other, out, force=True))
    assert any(not torch.equal(before[n], replaced[n]) for n in before)


def test_fisher_recipe_reads_each_sources_diagonal(family, tmp_path):
    """Constant Fisher diagonals c_i make fisher a weighted average with weights w_i * c_i."""
    from safetensors.torch import save_file

    sources = {"ft_0": 1.0, "ft_1": 3.0}
    recipe_sources = []
    for name, scale in sources.items():
        fisher = {n: torch.full_like(t, scale) for n, t in load_folder(family[name]).items()}
        save_file(fisher, str(tmp_path / f"fisher_{name}.safetensors"))
        recipe_sources.append(
            {
                "model": str(family[name]),
                "fisher": f"fisher_{name}.safetensors",
                "parameters": {"weight": 0.5},
            }
        )
    recipe = {"method": "fisher", "sources": recipe_sources}
    plan, _ = plan_from_file(write_yaml(tmp_path / "r.yaml", recipe))
    merged = load_folder(merge_to_folder(plan, tmp_path / "out"))
    a, b = load_folder(family["ft_0"]), load_folder(family["ft_1"])
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, (a[name] * 1.0 + b[name] * 3.0) / 4.0)
    del recipe["sources"][1]["fisher"]
    with pytest.raises(ConfigError, match=r"sources\[1\]\.fisher"):
        plan_from_file(write_yaml(tmp_path / "s.yaml", recipe))


def test_a_merge_that_overflows_its_output_dtype_fails_and_leaves_nothing(family, tmp_path):
    """Streaming checks the merged tensors as the in-place path does: float16 holds at most
    65504, so a huge weight makes Inf, and nothing is written."""
    recipe = recipe_for("task_arithmetic", family)
    recipe["sources"][0]["parameters"]["weight"] = 1e7
    recipe["dtype"] = "float16"
    plan, _ = plan_from_file(write_yaml(tmp_path / "r.yaml", recipe))
    with pytest.raises(MergeError) as info:
        merge_to_folder(plan, tmp_path / "out")
    named = re.search(r"NaN or Inf in tensor (\S+) \(output dtype float16", str(info.value))
    assert named and named.group(1) in {job.name for job in plan.jobs}, str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]
