"""``evomerge align``: weight matching recovers a known permutation exactly, never changes the
function a model computes, and refuses what it cannot align in one line."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from evomerge.align import assign, hungarian
from evomerge.checkpoint import ModelFolder
from evomerge.cli import main
from evomerge.random_family import build_tokenizer

HEADS, KV_HEADS, HIDDEN, INTERMEDIATE, LAYERS = 4, 2, 32, 48, 2
HEAD_DIM = HIDDEN // HEADS
INPUT = torch.tensor([[2, 5, 9, 14, 7, 30, 21, 3, 11, 40]])


def _config(intermediate: int = INTERMEDIATE):  # type: ignore[no-untyped-def]
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=54,
        hidden_size=HIDDEN,
        intermediate_size=intermediate,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=64,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
    )


def _save(state: dict[str, torch.Tensor], path: Path, intermediate: int = INTERMEDIATE) -> Path:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(_config(intermediate))
    model.load_state_dict(state)
    model.save_pretrained(path)
    build_tokenizer([f"w{i}" for i in range(50)]).save_pretrained(path)
    return path


def _random_state(seed: int, intermediate: int = INTERMEDIATE) -> dict[str, torch.Tensor]:
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(_config(intermediate))
        with torch.no_grad():  # norms away from 1, so nothing is accidentally symmetric
            for name, param in model.named_parameters():
                if "norm" in name:
                    param.add_(torch.randn_like(param) * 0.1)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _logits(path: Path) -> torch.Tensor:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(input_ids=INPUT).logits


def _weights(path: Path) -> dict[str, torch.Tensor]:
    folder = ModelFolder(path)
    return {name: folder.read(name) for name in folder.tensors}


def _scramble(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Permute MLP units, KV groups and query heads within groups, by hand (no evomerge code)."""
    gen = torch.Generator().manual_seed(seed)
    out = dict(state)
    group = HEADS // KV_HEADS
    for layer in range(LAYERS):
        p = f"model.layers.{layer}."
        mlp = torch.randperm(INTERMEDIATE, generator=gen)
        kv = torch.randperm(KV_HEADS, generator=gen)
        while torch.equal(kv, torch.arange(KV_HEADS)):
            kv = torch.randperm(KV_HEADS, generator=gen)
        query = torch.cat(
            [kv[g] * group + torch.randperm(group, generator=gen) for g in range(KV_HEADS)]
        )
        for name in ("gate_proj", "up_proj"):
            out[p + f"mlp.{name}.weight"] = state[p + f"mlp.{name}.weight"][mlp]
        out[p + "mlp.down_proj.weight"] = state[p + "mlp.down_proj.weight"][:, mlp]
        q = state[p + "self_attn.q_proj.weight"].reshape(HEADS, HEAD_DIM, HIDDEN)
        out[p + "self_attn.q_proj.weight"] = q[query].reshape(-1, HIDDEN)
        o = state[p + "self_attn.o_proj.weight"].reshape(HIDDEN, HEADS, HEAD_DIM)
        out[p + "self_attn.o_proj.weight"] = o[:, query].reshape(HIDDEN, -1)
        for name in ("k_proj", "v_proj"):
            w = state[p + f"self_attn.{name}.weight"].reshape(KV_HEADS, HEAD_DIM, HIDDEN)
            out[p + f"self_attn.{name}.weight"] = w[kv].reshape(-1, HIDDEN)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("align")
    original = _random_state(0)
    return {
        "original": _save(original, root / "original"),
        "scrambled": _save(_scramble(original, 7), root / "scrambled"),
        "other": _save(_random_state(1), root / "other"),
        "wide": _save(_random_state(2, INTERMEDIATE + 8), root / "wide", INTERMEDIATE + 8),
    }


def test_align_recovers_a_known_permutation_exactly(models, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    original, scrambled = _weights(models["original"]), _weights(models["scrambled"])
    assert any(not torch.equal(original[n], scrambled[n]) for n in original)
    reference_logits = _logits(models["original"])
    assert torch.allclose(_logits(models["scrambled"]), reference_logits, atol=1e-4)

    out = tmp_path / "aligned"
    rc = main(
        ["align", str(models["scrambled"]), "--to", str(models["original"]), "--out", str(out)]
    )
    assert rc == 0
    aligned = _weights(out)
    assert aligned.keys() == original.keys()
    for name in original:
        assert torch.equal(aligned[name], original[name]), name
    assert torch.allclose(_logits(out), reference_logits, atol=1e-4)
    assert (out / "tokenizer.json").is_file()
    assert json.loads((out / "config.json").read_text())["num_key_value_heads"] == KV_HEADS
    printed = capsys.readouterr().out
    assert "-> 0.000" in printed.splitlines()[-2]  # the total: from far to identical


def test_align_of_a_different_model_keeps_its_function(models, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from evomerge.align import align_folder

    out = tmp_path / "aligned"
    report = align_folder(models["other"], models["original"], out)
    before, after = _weights(models["other"]), _weights(out)
    assert any(not torch.equal(before[n], after[n]) for n in before)  # it did permute
    assert all(r.moved_units > 0 for r in report.layers)
    assert report.distance_after < report.distance_before
    assert torch.allclose(_logits(out), _logits(models["other"]), atol=1e-4)
    # Unpermuted tensors are copied bit for bit.
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert torch.equal(before[name], after[name])


def _write_non_llama(models: dict[str, Path], dest: Path) -> Path:
    shutil.copytree(models["other"], dest)
    config = json.loads((dest / "config.json").read_text())
    config.update(model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"])
    (dest / "config.json").write_text(json.dumps(config))
    return dest


@pytest.mark.parametrize("case", ["shape", "non_llama", "same_folder", "missing"])
def test_align_refuses_bad_inputs_in_one_line(models, tmp_path, capsys, case) -> None:  # type: ignore[no-untyped-def]
    model, reference = models["other"], models["original"]
    if case == "shape":
        model = models["wide"]
    elif case == "non_llama":
        model = _write_non_llama(models, tmp_path / "neox")
    elif case == "same_folder":
        model = reference
    else:
        model = tmp_path / "nowhere"
    out = tmp_path / "out"
    rc = main(["align", str(model), "--to", str(reference), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1
    assert len(err.strip().splitlines()) == 1 and err.startswith("evomerge: error:")
    expected = {
        "shape": "intermediate 56 vs 48",
        "non_llama": "GPTNeoXForCausalLM",
        "same_folder": "same folder",
        "missing": "does not exist",
    }[case]
    assert expected in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_assignment_is_exact() -> None:
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 6):
        for _ in range(5):
            score = rng.normal(size=(n, n))
            best = max(
                sum(score[i, p[i]] for i in range(n)) for p in itertools.permutations(range(n))
            )
            cols = hungarian(score)
            assert sorted(cols) == list(range(n))
            assert score[np.arange(n), cols].sum() == pytest.approx(best)
            perm, total = assign(torch.as_tensor(score))
            assert total == pytest.approx(best)
            assert score[np.arange(n), perm.numpy()].sum() == pytest.approx(best)
    big = rng.normal(size=(40, 40))
    assert big[np.arange(40), hungarian(big)].sum() == pytest.approx(
        assign(torch.as_tensor(big))[1]
    )
