"""PEFT LoRA adapters as merge sources, with PEFT itself as the oracle.

Adapters are made by real PEFT (``get_peft_model`` + ``save_pretrained``) on the tiny random
Llama family, with ``init_lora_weights=False`` so that B is random and the delta is not zero.
The oracle is PEFT's ``merge_and_unload()``: ``evomerge merge`` of a recipe that takes one
adapter at weight 1 must equal it to 1e-5 on every tensor. A GPT-2 base (Conv1D layers, so
``fan_in_fan_out``) checks the transposed case. Adapter kinds that cannot be applied exactly
are refused through the CLI with one line, and nothing is written.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from evomerge.cli import main
from evomerge.merge.mergekit_compat import recipe_to_mergekit
from evomerge.merge.recipe import parse_recipe
from evomerge.random_family import build_random_family
from tests.helpers import load_folder, run_mergekit, write_yaml

peft = pytest.importorskip("peft")

ATOL = 1e-5
TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj", "up_proj"]


def make_adapter(
    base: Path, out: Path, *, seed: int = 0, **lora: Any
) -> tuple[Path, dict[str, torch.Tensor]]:
    """A real PEFT LoRA adapter of ``base`` saved at ``out``, and PEFT's own merge of it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    settings: dict[str, Any] = {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": TARGETS,
        "init_lora_weights": False,
    }
    settings.update(lora)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        wrapped = peft.get_peft_model(model, peft.LoraConfig(**settings))
    wrapped.save_pretrained(out)
    merged = wrapped.merge_and_unload().state_dict()
    return out, {k: v.detach().clone() for k, v in merged.items()}


def merge(config: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    out = tmp_path / "merged"
    code = main(["merge", str(write_yaml(tmp_path / "config.yaml", config)), str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    return out


def assert_close(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    """Every tensor we wrote equals theirs (a tied lm_head is absent from both files)."""
    assert ours, "nothing merged"
    for name, tensor in ours.items():
        assert name in theirs, name
        assert tensor.shape == theirs[name].shape, name
        diff = (tensor.float() - theirs[name].float()).abs().max().item()
        assert diff <= ATOL, f"{name}: max difference {diff}"


@pytest.fixture(scope="module")
def adapter(family: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return make_adapter(family["base"], tmp_path_factory.mktemp("lora") / "adapter", seed=1)


@pytest.mark.parametrize(
    "lora",
    [
        {},
        {"use_rslora": True, "r": 8, "lora_alpha": 4},
        {"rank_pattern": {"v_proj": 2}, "layers_to_transform": [0, 2]},
    ],
    ids=["plain", "rslora", "rank_pattern"],
)
def test_one_adapter_at_weight_one_equals_peft_merge_and_unload(
    family: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], lora: dict
) -> None:
    path, oracle = make_adapter(family["base"], tmp_path / "adapter", seed=2, **lora)
    recipe = {
        "method": "linear",
        "base": str(family["base"]),
        "sources": [{"model": str(path), "parameters": {"weight": 1.0}}],
    }
    merged = load_folder(merge(recipe, tmp_path, capsys))
    assert_close(merged, oracle)
    base = load_folder(family["base"])
    changed = [n for n in merged if not torch.equal(merged[n], base[n])]
    assert changed and all(any(t in n for t in TARGETS) for n in changed)


def test_adapter_plus_full_finetune_is_the_hand_computed_task_arithmetic(
    family: dict[str, Path], adapter, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, peft_merged = adapter
    w1, w2 = 0.7, 0.4
    recipe = {
        "method": "task_arithmetic",
        "base": str(family["base"]),
        "sources": [
            {"model": str(path), "parameters": {"weight": w1}},
            {"model": str(family["ft_0"]), "parameters": {"weight": w2}},
        ],
    }
    merged = load_folder(merge(recipe, tmp_path, capsys))
    base, ft = load_folder(family["base"]), load_folder(family["ft_0"])
    expected = {n: base[n] + w1 * (peft_merged[n] - base[n]) + w2 * (ft[n] - base[n]) for n in base}
    assert_close(merged, expected)


def test_fan_in_fan_out_conv1d_adapter_equals_peft(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    path, oracle = make_adapter(
        tmp_path / "gpt2",
        tmp_path / "adapter",
        target_modules=["c_attn", "c_fc"],
        fan_in_fan_out=True,
        r=3,
        lora_alpha=6,
    )
    recipe = {
        "method": "linear",
        "base": str(tmp_path / "gpt2"),
        "sources": [{"model": str(path), "parameters": {"weight": 1.0}}],
    }
    merged = load_folder(merge(recipe, tmp_path, capsys))
    assert_close(merged, oracle)
    assert not torch.equal(
        merged["transformer.h.0.attn.c_attn.weight"],
        load_folder(tmp_path / "gpt2")["transformer.h.0.attn.c_attn.weight"],
    )


@pytest.mark.parametrize("form", ["base+adapter", "adapter_alone", "linear_no_base_model"])
def test_mergekit_config_with_an_adapter_equals_peft(
    family: dict[str, Path], adapter, tmp_path: Path, capsys: pytest.CaptureFixture[str], form: str
) -> None:
    path, oracle = adapter
    base = str(family["base"])
    if form == "linear_no_base_model":
        config: dict[str, Any] = {
            "merge_method": "linear",
            "models": [{"model": f"{base}+{path}", "parameters": {"weight": 1.0}}],
        }
    else:
        ref = f"{base}+{path}" if form == "base+adapter" else str(path)
        config = {
            "merge_method": "task_arithmetic",
            "base_model": base,
            "models": [{"model": ref, "parameters": {"weight": 1.0}}],
        }
    out = merge(config, tmp_path, capsys)
    assert_close(load_folder(out), oracle)
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()


def test_mergekit_base_plus_adapter_matches_mergekit(
    family: dict[str, Path], adapter, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """mergekit 0.1.5 itself (which applies the adapter with PEFT) is the second oracle."""
    pytest.importorskip("mergekit.merge")

    path, _ = adapter
    base = str(family["base"].resolve())
    config = {
        "merge_method": "ties",
        "base_model": base,
        "models": [
            {"model": f"{base}+{path.resolve()}", "parameters": {"weight": 0.7, "density": 0.6}},
            {"model": str(family["ft_0"].resolve()), "parameters": {"weight": 0.4}},
        ],
        "parameters": {"density": 0.8},
        "dtype": "float32",
    }
    theirs = run_mergekit(config, tmp_path / "mergekit", lora_merge_cache=str(tmp_path / "cache"))
    ours = load_folder(merge(config, tmp_path, capsys))
    reference = load_folder(theirs)
    assert sorted(ours) == sorted(reference)
    assert_close(ours, reference)


def test_recipe_with_an_adapter_exports_as_mergekit_base_plus_adapter(
    family: dict[str, Path], adapter
) -> None:
    path, _ = adapter
    recipe = parse_recipe(
        {
            "method": "linear",
            "base": str(family["base"]),
            "sources": [
                {"model": str(path), "parameters": {"weight": 0.5}},
                {"model": str(family["ft_0"]), "parameters": {"weight": 0.5}},
            ],
        }
    )
    config = recipe_to_mergekit(recipe)  # checks the mergekit form plans like the recipe
    assert config["models"][0]["model"] == f"{family['base'].resolve()}+{path.resolve()}"


# --- refusals: one line, exit 1, nothing written ------------------------------------------


@pytest.fixture(scope="module")
def other_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_random_family(
        tmp_path_factory.mktemp("other"), sources=0, seed=5, layers=2, hidden=32, intermediate=96
    )["base"]


def _dora(family, other_base, tmp: Path) -> Path:  # type: ignore[no-untyped-def]
    return make_adapter(family["base"], tmp / "dora", use_dora=True)[0]


def _modules_to_save(family, other_base, tmp: Path) -> Path:  # type: ignore[no-untyped-def]
    return make_adapter(family["base"], tmp / "mts", modules_to_save=["lm_head"])[0]


def _embedding(family, other_base, tmp: Path) -> Path:  # type: ignore[no-untyped-def]
    return make_adapter(family["base"], tmp / "emb", target_modules=["embed_tokens", "q_proj"])[0]


def _bias(family, other_base, tmp: Path) -> Path:  # type: ignore[no-untyped-def]
    return make_adapter(family["base"], tmp / "bias", bias="lora_only")[0]


def _other_base(family, other_base, tmp: Path) -> Path:  # type: ignore[no-untyped-def]
    return make_adapter(other_base, tmp / "other")[0]


def _no_config(family, other_base, tmp: Path) -> Path:  # type: ignore[no-untyped-def]
    path = make_adapter(family["base"], tmp / "noconfig")[0]
    (path / "adapter_config.json").unlink()
    return path


REFUSALS = {
    "dora": (_dora, "use_dora is True"),
    "modules_to_save": (_modules_to_save, "modules_to_save is ['lm_head']"),
    "embedding": (_embedding, "embedding LoRA"),
    "bias": (_bias, "bias is 'lora_only'"),
    "another_base": (_other_base, "has shape [32, 96] but base 'base' has [64, 256]"),
    "missing_config": (_no_config, "has adapter weights but no adapter_config.json"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_unsupported_adapters_are_refused_in_one_line(
    family: dict[str, Path],
    other_base: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    case: str,
) -> None:
    build, message = REFUSALS[case]
    path = build(family, other_base, tmp_path)
    recipe = {
        "method": "task_arithmetic",
        "base": str(family["base"]),
        "sources": [
            {"model": str(family["ft_0"])},
            {"model": str(path), "parameters": {"weight": 1.0}},
        ],
    }
    out = tmp_path / "out"
    capsys.readouterr()
    code = main(["merge", str(write_yaml(tmp_path / "r.yaml", recipe)), str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert "\n" not in err and "Traceback" not in err
    assert message in err, err
    assert not out.exists()


def test_adapter_without_a_base_is_refused(
    family: dict[str, Path], adapter, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = adapter
    recipe = {"method": "linear", "sources": [{"model": str(path)}, {"model": str(family["ft_0"])}]}
    mergekit = {"merge_method": "linear", "models": [{"model": str(path)}]}
    for config, message in (
        (recipe, "needs the base it applies to: set 'base' in the recipe"),
        (mergekit, "name the model it applies to as 'BASE+ADAPTER', or set base_model"),
    ):
        out = tmp_path / "out"
        capsys.readouterr()
        code = main(["merge", str(write_yaml(tmp_path / "r.yaml", config)), str(out), "--quiet"])
        err = capsys.readouterr().err.strip()
        assert code == 1 and "\n" not in err and message in err, err
        assert not out.exists()


def test_mergekit_plus_after_a_model_folder_is_refused(
    family: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = {
        "merge_method": "linear",
        "models": [{"model": f"{family['base']}+{family['ft_0']}"}],
    }
    code = main(["merge", str(write_yaml(tmp_path / "r.yaml", config)), str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "is not a LoRA adapter folder" in err, err
    assert not (tmp_path / "o").exists()


def test_pickled_adapter_needs_allow_pickle(
    family: dict[str, Path], adapter, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors.torch import load_file

    path, oracle = adapter
    pickled = shutil.copytree(path, tmp_path / "pickled")
    torch.save(load_file(pickled / "adapter_model.safetensors"), pickled / "adapter_model.bin")
    (pickled / "adapter_model.safetensors").unlink()
    recipe = {
        "method": "linear",
        "base": str(family["base"]),
        "sources": [{"model": str(pickled), "parameters": {"weight": 1.0}}],
    }
    config = write_yaml(tmp_path / "r.yaml", recipe)
    assert main(["merge", str(config), str(tmp_path / "refused"), "--quiet"]) == 1
    assert "pickled" in capsys.readouterr().err
    out = tmp_path / "merged"
    assert main(["merge", str(config), str(out), "--quiet", "--allow-pickle"]) == 0
    assert_close(load_folder(out), oracle)
