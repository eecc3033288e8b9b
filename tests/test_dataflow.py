"""The data-flow (layer path) core: a path recipe built three ways must give one model.

The worker's way (:class:`~evomerge.dataflow.assemble.PathAssembler`: the evaluated model's
layer list pointed at views of resident layers) and the export (:func:`plan_dataflow` +
``merge_to_folder``, reloaded with transformers) must agree exactly on logits (float32, CPU),
and both must match an oracle built here with plain torch and transformers only: a fresh
model of the outer model's architecture (``LlamaForCausalLM`` for the toy zoo) with one layer
per step, filled from the models' state dicts by renaming ``model.layers.{src}.`` to
``model.layers.{position}.``, a step's scale applied by a forward hook on that layer's
``input_layernorm`` (what a scale means: the layer reads its normalized input times the scale;
the residual stream is untouched). mergekit is the oracle of the
export's tensors, transformers' own Gemma and Qwen2 of the fold check and of per-layer config
entries.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

import evomerge.dataflow.assemble as assemble
from evomerge.checkpoint import ModelFolder
from evomerge.dataflow.assemble import PathAssembler
from evomerge.dataflow.mergekit import path_to_mergekit
from evomerge.dataflow.recipe import (
    DataflowRecipe,
    fold_problem,
    parse_dataflow_recipe,
    plan_dataflow,
)
from evomerge.errors import ConfigError
from evomerge.merge.engine import merge_to_folder
from evomerge.merge.recipe import parse_recipe, plan_recipe
from tests.helpers import load_folder, run_mergekit

Step = tuple[str, int, float]
REPEATED: list[Step] = [("ft_a", layer, 1.0) for layer in (0, 1, 2, 3, 2, 3)]
CROSSING: list[Step] = [("ft_a", 0, 1.0), ("ft_b", 1, 1.3), ("ft_a", 2, 1.0), ("ft_a", 3, 0.7)]


# -- building one path three ways ------------------------------------------------------------


def path_recipe(
    folders: dict[str, Path], steps: Sequence[Step], outer: str = "ft_a"
) -> DataflowRecipe:
    labels = dict.fromkeys([outer, *(label for label, _, _ in steps)])
    return parse_dataflow_recipe(
        {
            "models": [
                {"label": label, "model": str(folders[label].resolve())} for label in labels
            ],
            "outer": outer,
            "path": [{"model": m, "layer": layer, "scale": s} for m, layer, s in steps],
        }
    )


def assembled(base: Path, recipe: DataflowRecipe) -> torch.nn.Module:
    """The worker's model: ``base`` loaded, its layer list pointed at the path's held layers."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    assembler = PathAssembler(model, torch.float32, "cpu")
    held = {}
    for entry in recipe.models:
        assert entry.model is not None
        folder = ModelFolder(entry.model)
        tensors = {name: folder.read(name, torch.device("cpu")) for name in folder.tensors}
        held[entry.label] = assembler.folder_model(
            ("folder", entry.label), entry.label, tensors, AutoConfig.from_pretrained(entry.model)
        )
    assembler.apply(recipe, held)
    return model


def exported(recipe: DataflowRecipe, out: Path) -> torch.nn.Module:
    merge_to_folder(plan_dataflow(recipe), out)
    return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()


def stacked(folders: dict[str, Path], steps: Sequence[Step], outer: str) -> torch.nn.Module:
    """The oracle: a fresh model of the outer model's architecture with one layer per step,
    filled by renaming layer tensors, scales applied as hooks on the input norms' outputs."""
    config = AutoConfig.from_pretrained(folders[outer])
    config.num_hidden_layers = len(steps)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[layer] for _, layer, _ in steps]
    model = AutoModelForCausalLM.from_config(config).float().eval()
    states = {label: load_file(str(folders[label] / "model.safetensors")) for label in folders}
    state = {k: v for k, v in states[outer].items() if not k.startswith("model.layers.")}
    for position, (label, layer, scale) in enumerate(steps):
        prefix = f"model.layers.{layer}."
        for name, tensor in states[label].items():
            if name.startswith(prefix):
                state[f"model.layers.{position}." + name[len(prefix) :]] = tensor
        if scale != 1.0:
            norm = model.model.layers[position].input_layernorm
            norm.register_forward_hook(lambda _m, _i, out, s=scale: out * s)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    if missing:  # tied embeddings: the head is the embedding matrix just loaded
        assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens, use_cache=False).logits


def token_batch(vocab: int, seed: int = 0, shape: tuple[int, int] = (3, 12)) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, shape, generator=generator)


@pytest.fixture(scope="module")
def zoo(toy_zoo: dict[str, Path]) -> dict[str, Path]:
    return {name: path.resolve() for name, path in toy_zoo.items()}


@pytest.fixture(scope="module")
def tokens(zoo: dict[str, Path]) -> torch.Tensor:
    return token_batch(AutoConfig.from_pretrained(zoo["ft_a"]).vocab_size)


# -- 1, 2: the worker's model, the export and the oracle agree -------------------------------


@pytest.mark.parametrize("steps", [REPEATED, CROSSING], ids=["repeated", "crossing_scaled"])
def test_assembled_and_exported_paths_equal_a_plain_torch_stack(
    zoo: dict[str, Path], tokens: torch.Tensor, steps: list[Step], tmp_path: Path
) -> None:
    folders = {label: zoo[label] for label in ("ft_a", "ft_b")}
    recipe = path_recipe(folders, steps)
    worker = logits(assembled(zoo["base"], recipe), tokens)
    export_model = exported(recipe, tmp_path / "out")
    export = logits(export_model, tokens)
    oracle = logits(stacked(folders, steps, "ft_a"), tokens)

    assert export_model.config.num_hidden_layers == len(steps)
    assert torch.equal(worker, export), (worker - export).abs().max()
    torch.testing.assert_close(export, oracle, rtol=1e-5, atol=1e-5)
    # the path is a different model from ft_a itself, and (with scales) from its unscaled path
    plain = logits(AutoModelForCausalLM.from_pretrained(zoo["ft_a"]).eval(), tokens)
    assert (oracle - plain).abs().max() > 1e-2
    if any(s != 1.0 for _, _, s in steps):
        unscaled = logits(stacked(folders, [(m, i, 1.0) for m, i, _ in steps], "ft_a"), tokens)
        assert (oracle - unscaled).abs().max() > 1e-2


def test_the_outer_model_alone_as_a_path_is_that_model(
    zoo: dict[str, Path], tokens: torch.Tensor, tmp_path: Path
) -> None:
    """ft_b's layers in order with ft_b's ends, assembled over the base, is ft_b."""
    recipe = path_recipe({"ft_b": zoo["ft_b"]}, [("ft_b", i, 1.0) for i in range(4)], "ft_b")
    expected = logits(AutoModelForCausalLM.from_pretrained(zoo["ft_b"]).eval(), tokens)
    assert torch.equal(logits(assembled(zoo["base"], recipe), tokens), expected)
    assert torch.equal(logits(exported(recipe, tmp_path / "out"), tokens), expected)


def test_tied_embeddings_path_and_restore(tied_family: dict[str, Path], tmp_path: Path) -> None:
    """Tied embeddings (no lm_head in the files): the worker's model takes the outer model's
    embedding as its head too, and ``restore`` gives the base model back."""
    folders = {label: tied_family[label].resolve() for label in ("ft_0", "ft_1")}
    steps: list[Step] = [("ft_0", 0, 1.0), ("ft_1", 1, 1.3), ("ft_0", 2, 1.0), ("ft_0", 2, 1.0)]
    recipe = path_recipe(folders, steps, "ft_0")
    tokens = token_batch(AutoConfig.from_pretrained(folders["ft_0"]).vocab_size)
    model = AutoModelForCausalLM.from_pretrained(tied_family["base"], dtype=torch.float32).eval()
    base = logits(model, tokens)
    assembler = PathAssembler(model, torch.float32, "cpu")
    held = {}
    for label, path in folders.items():
        folder = ModelFolder(path)
        assert "lm_head.weight" not in folder.tensors
        tensors = {name: folder.read(name, torch.device("cpu")) for name in folder.tensors}
        held[label] = assembler.folder_model(
            label, label, tensors, AutoConfig.from_pretrained(path)
        )
    assembler.apply(recipe, held)
    worker = logits(model, tokens)
    assert torch.equal(worker, logits(exported(recipe, tmp_path / "out"), tokens))
    torch.testing.assert_close(worker, logits(stacked(folders, steps, "ft_0"), tokens))
    assembler.restore()
    assert torch.equal(logits(model, tokens), base)


# -- 3: a repeated layer keeps its own KV-cache entry ----------------------------------------


def generate_both_ways(model: torch.nn.Module, prompt: torch.Tensor) -> list[torch.Tensor]:
    kwargs: dict[str, Any] = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        return [model.generate(prompt, use_cache=c, **kwargs) for c in (True, False)]


def incremental_logits(
    model: torch.nn.Module, tokens: torch.Tensor, prefix: int
) -> tuple[torch.Tensor, Any]:
    """Logits of ``tokens[:, prefix:]`` fed one at a time after the prefix, through the cache;
    and the cache."""
    with torch.no_grad():
        out = model(tokens[:, :prefix], use_cache=True)
        cache, steps = out.cache, []
        for i in range(prefix, tokens.shape[1]):
            out = model(tokens[:, i : i + 1], cache=cache, use_cache=True)
            cache = out.cache
            steps.append(out.logits[:, -1])
    return torch.stack(steps, dim=1), cache


def test_kv_cache_of_a_repeated_path_matches_the_uncached_model(
    zoo: dict[str, Path], tokens: torch.Tensor
) -> None:
    recipe = path_recipe({"ft_a": zoo["ft_a"]}, REPEATED)
    model = assembled(zoo["base"], recipe)
    cached, uncached = generate_both_ways(model, tokens[:, :5])
    assert cached.shape == (3, 11)
    assert torch.equal(cached, uncached)
    full = logits(model, tokens)[:, 5:]
    stepwise, cache = incremental_logits(model, tokens, 5)
    assert len(cache.layers) == 6 and cache.get_seq_length() == tokens.shape[1]
    torch.testing.assert_close(stepwise, full, rtol=1e-5, atol=1e-5)


def test_kv_cache_breaks_when_views_keep_their_layers_index(
    zoo: dict[str, Path], tokens: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check above can fail: with each view's ``layer_idx`` left as its layer's, the two
    uses of layers 2 and 3 share cache entries and the cached model is another model. (Its
    greedy tokens on the toy model happen to survive this; the logits show it.)"""
    original = assemble.position_view

    def shared_index(layer: torch.nn.Module, position: int, scale: float) -> torch.nn.Module:
        return original(layer, layer.self_attn.layer_idx, scale)

    monkeypatch.setattr(assemble, "position_view", shared_index)
    model = assembled(zoo["base"], path_recipe({"ft_a": zoo["ft_a"]}, REPEATED))
    full = logits(model, tokens)[:, 5:]
    try:
        broken, _ = incremental_logits(model, tokens, 5)
    except (RuntimeError, IndexError, ValueError):
        return  # the shared entries do not even fit together
    assert (broken - full).abs().max() > 1e-3


# -- 4: mergekit builds the same checkpoint ----------------------------------------------------


def test_mergekit_passthrough_of_a_path_equals_the_export(
    zoo: dict[str, Path], tmp_path: Path
) -> None:
    pytest.importorskip("mergekit.merge")
    steps: list[Step] = [
        ("ft_a", 0, 1.0),
        ("ft_a", 1, 1.0),
        ("ft_b", 1, 1.5),
        ("ft_b", 2, 1.0),
        ("ft_a", 1, 1.0),
        ("ft_a", 3, 0.8),
    ]
    recipe = path_recipe({label: zoo[label] for label in ("ft_a", "ft_b")}, steps)
    config, reason = path_to_mergekit(recipe)
    assert reason is None and config is not None
    file = tmp_path / "mergekit.yaml"
    file.write_text(yaml.safe_dump(config, sort_keys=False))
    theirs_dir = run_mergekit(yaml.safe_load(file.read_text()), tmp_path / "mergekit")
    ours_dir = merge_to_folder(plan_dataflow(recipe), tmp_path / "evomerge")

    ours, theirs = load_folder(ours_dir), load_folder(theirs_dir)
    assert sorted(ours) == sorted(theirs)
    different = [name for name in ours if not torch.equal(ours[name], theirs[name])]
    assert not different, different
    for folder in (ours_dir, theirs_dir):
        assert json.loads((folder / "config.json").read_text())["num_hidden_layers"] == 6
    # the scaled steps' norms are the scaled ones (so the comparison covers the scaling)
    b = load_file(str(zoo["ft_b"] / "model.safetensors"))
    a = load_file(str(zoo["ft_a"] / "model.safetensors"))
    norm = "input_layernorm.weight"
    assert torch.equal(ours[f"model.layers.2.{norm}"], b[f"model.layers.1.{norm}"] * 1.5)
    assert torch.equal(ours[f"model.layers.5.{norm}"], a[f"model.layers.3.{norm}"] * 0.8)
    assert torch.equal(
        ours["model.layers.4.mlp.up_proj.weight"], a["model.layers.1.mlp.up_proj.weight"]
    )


def test_mergekit_cannot_express_a_merge_or_other_ends(zoo: dict[str, Path]) -> None:
    folders = {label: zoo[label] for label in ("ft_a", "ft_b")}
    merge = {
        "label": "m",
        "recipe": {
            "method": "linear",
            "sources": [{"model": str(zoo["ft_a"])}, {"model": str(zoo["ft_b"])}],
        },
    }
    with_merge = parse_dataflow_recipe(
        {
            "models": [{"label": "ft_a", "model": str(zoo["ft_a"])}, merge],
            "outer": "ft_a",
            "path": [
                {"model": "ft_a", "layer": 0},
                {"model": "m", "layer": 1},
                {"model": "ft_a", "layer": 3},
            ],
        }
    )
    config, reason = path_to_mergekit(with_merge)
    assert config is None and reason is not None
    assert "merge ('m')" in reason

    starts_elsewhere = path_recipe(folders, [("ft_b", 0, 1.0), ("ft_a", 3, 1.0)])
    config, reason = path_to_mergekit(starts_elsewhere)
    assert config is None and reason is not None
    assert "starts with 'ft_b'" in reason and "from 'ft_a'" in reason

    ends_elsewhere = path_recipe(folders, [("ft_a", 0, 1.0), ("ft_b", 3, 1.0)])
    config, reason = path_to_mergekit(ends_elsewhere)
    assert config is None and reason is not None
    assert "ends with 'ft_b'" in reason


# -- 5: Gemma's (1 + weight) norm cannot take a folded scale ----------------------------------


@pytest.fixture(scope="module")
def gemma(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import GemmaConfig, GemmaForCausalLM

    config = GemmaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        vocab_size=64,
    )
    out = tmp_path_factory.mktemp("gemma") / "model"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GemmaForCausalLM(config)
        with torch.no_grad():  # norms away from their zero init, so that they matter
            for name, param in model.named_parameters():
                if "norm" in name:
                    param.normal_(0.0, 0.5)
    model.save_pretrained(out)
    return out


def test_gemma_scales_are_refused_and_unscaled_paths_export(gemma: Path, tmp_path: Path) -> None:
    problem = fold_problem(gemma)
    assert problem is not None and "not linear in its weight" in problem
    folders = {"g": gemma}
    scaled = path_recipe(folders, [("g", 0, 1.0), ("g", 1, 1.2)], "g")
    with pytest.raises(ConfigError, match="not linear in its weight"):
        plan_dataflow(scaled)

    steps: list[Step] = [("g", 1, 1.0), ("g", 0, 1.0), ("g", 1, 1.0)]
    model = exported(path_recipe(folders, steps, "g"), tmp_path / "out")
    assert model.config.num_hidden_layers == 3
    tokens = token_batch(64)
    torch.testing.assert_close(
        logits(model, tokens), logits(stacked(folders, steps, "g"), tokens), rtol=1e-5, atol=1e-5
    )


def test_a_gemma_dataflow_space_takes_one_model_only(gemma: Path) -> None:
    from evomerge.space import parse_space

    space = parse_space({"kind": "dataflow", "name": "t", "models": ["sources"]})
    with pytest.raises(ConfigError, match="not linear in its weight"):
        space.bind(ModelFolder(gemma), ["a", "b"])
    bound = space.bind(ModelFolder(gemma), ["a"])
    assert bound.genes and all(gene.role == "use" for gene in bound.genes)


def test_llama_scales_fold(zoo: dict[str, Path]) -> None:
    assert fold_problem(zoo["ft_a"]) is None


# -- 6: per-layer config entries follow the path ----------------------------------------------


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two tiny Qwen2 models whose last two layers use sliding-window attention."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=64,
        use_sliding_window=True,
        sliding_window=3,
        max_window_layers=2,
    )
    root = tmp_path_factory.mktemp("qwen2")
    folders = {}
    for seed, label in enumerate(("q0", "q1")):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            Qwen2ForCausalLM(config).save_pretrained(root / label)
        folders[label] = root / label
    return folders


def test_layer_types_follow_the_path(qwen2: dict[str, Path], tmp_path: Path) -> None:
    written = json.loads((qwen2["q0"] / "config.json").read_text())["layer_types"]
    assert written == ["full_attention"] * 2 + ["sliding_attention"] * 2
    steps: list[Step] = [
        ("q0", 3, 1.0),
        ("q1", 0, 1.4),
        ("q0", 2, 1.0),
        ("q0", 1, 1.0),
        ("q1", 3, 1.0),
    ]
    recipe = path_recipe(qwen2, steps, "q0")
    model = exported(recipe, tmp_path / "out")
    expected = [written[layer] for _, layer, _ in steps]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 5 and config["layer_types"] == expected
    assert model.config.layer_types == expected

    tokens = token_batch(64, shape=(2, 9))  # longer than the window, so it matters
    export = logits(model, tokens)
    assert torch.equal(logits(assembled(qwen2["q0"], recipe), tokens), export)
    torch.testing.assert_close(
        export, logits(stacked(qwen2, steps, "q0"), tokens), rtol=1e-5, atol=1e-5
    )


# -- 7: bad input names the field ------------------------------------------------------------


def test_a_layer_beyond_the_model_is_refused_by_plan_and_assembler(
    zoo: dict[str, Path],
) -> None:
    recipe = path_recipe({"ft_a": zoo["ft_a"]}, [("ft_a", 0, 1.0), ("ft_a", 4, 1.0)])
    message = r"path\[1\]: model 'ft_a' has 4 layers \(0-3\); there is no layer 4"
    with pytest.raises(ConfigError, match=message):
        plan_dataflow(recipe)
    with pytest.raises(ConfigError, match=message):
        assembled(zoo["base"], recipe)


def _recipe_data(zoo: dict[str, Path]) -> dict[str, Any]:
    return {
        "models": [
            {"label": "a", "model": str(zoo["ft_a"])},
            {"label": "b", "model": str(zoo["ft_b"])},
        ],
        "outer": "a",
        "path": [{"model": "a", "layer": 0}, {"model": "b", "layer": 1, "scale": 1.2}],
    }


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["path"].append({"model": "c", "layer": 0}), r"path\[2\]\.model: 'c'"),
        (lambda d: d["models"].append({"label": "a", "model": "x"}), "label a is used twice"),
        (lambda d: d.update(outer="z"), "outer: 'z' is none of the models"),
        (lambda d: d["path"][1].update(scale=0.0), r"path\.1\.scale: must be .* above 0"),
        (lambda d: d["path"][0].update(scale=-1.0), r"path\.0\.scale: must be .* above 0"),
        (lambda d: d["path"][1].update(scale=math.nan), r"path\.1\.scale: must be a finite"),
        (lambda d: d["path"][0].update(layer=-1), r"path\.0\.layer"),
        (lambda d: d["models"][1].update(recipe={}), "model 'b': give exactly one"),
    ],
    ids=["unknown_label", "repeated_label", "outer", "zero", "negative", "nan", "layer", "both"],
)
def test_bad_recipes_name_the_field(zoo: dict[str, Path], edit: Any, message: str) -> None:
    data = _recipe_data(zoo)
    parse_dataflow_recipe(data, where="trial 3 recipe")  # the unedited recipe is fine
    edit(data)
    with pytest.raises(ConfigError, match=f"^trial 3 recipe: .*{message}"):
        parse_dataflow_recipe(data, where="trial 3 recipe")


def test_a_lora_adapter_is_not_a_path_model(zoo: dict[str, Path], tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "base_model_name_or_path": str(zoo["base"]),
                "r": 2,
                "lora_alpha": 4,
                "target_modules": ["q_proj"],
            }
        )
    )
    recipe = path_recipe(
        {"ft_a": zoo["ft_a"], "lora": adapter}, [("ft_a", 0, 1.0), ("lora", 1, 1.0)]
    )
    with pytest.raises(ConfigError, match=r"model 'lora' .* is a LoRA adapter"):
        plan_dataflow(recipe)


# -- 8: fingerprints of plans without a path are unchanged ------------------------------------


def _keys(canonical: str) -> set[str]:
    data = json.loads(canonical)
    return set(data) | {key for job in data["jobs"] for key in job}


def test_only_path_plans_have_scale_and_layer_origins_in_their_canonical_text(
    zoo: dict[str, Path],
) -> None:
    recipe = parse_recipe(
        {
            "method": "task_arithmetic",
            "base": str(zoo["base"]),
            "sources": [
                {"model": str(zoo["ft_a"]), "parameters": {"weight": 0.5}},
                {"model": str(zoo["ft_b"]), "parameters": {"weight": 0.5}},
            ],
        }
    )
    folders = [
        ModelFolder(zoo["base"], label="base"),
        ModelFolder(zoo["ft_a"]),
        ModelFolder(zoo["ft_b"]),
    ]
    keys = _keys(plan_recipe(recipe, folders).canonical())
    assert "name" in keys and "sources" in keys  # the keys of jobs are read
    assert "scale" not in keys and "layer_origins" not in keys

    path = path_recipe({label: zoo[label] for label in ("ft_a", "ft_b")}, CROSSING)
    plan = plan_dataflow(path)
    assert {"scale", "layer_origins"} <= _keys(plan.canonical())
    assert plan.layer_origins == (0, 1, 2, 3)
    scaled = {job.name: job.scale for job in plan.jobs if job.scale is not None}
    assert scaled == {
        "model.layers.1.input_layernorm.weight": 1.3,
        "model.layers.3.input_layernorm.weight": 0.7,
    }
