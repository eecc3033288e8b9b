"""``evomerge fisher`` and evomerge.fisher: the estimate against an independent per-sample
computation, the folder it writes, and its errors."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from evomerge.checkpoint import ModelFolder
from evomerge.cli import main
from evomerge.evaluate.model_loading import load_model_for_eval
from evomerge.fisher import Sample, choose_samples, estimate_fisher, task_samples, text_samples
from evomerge.merge.config_file import plan_from_file
from evomerge.merge.engine import merge_to_folder
from evomerge.merge.registry import TensorContext, merge_tensor
from tests.helpers import load_folder, write_yaml

TEXT = Path(__file__).resolve().parents[1] / "evaluators" / "text" / "toy_facts_heldout.txt"


def per_sample_gradients(
    model: torch.nn.Module, samples: list[Sample]
) -> list[dict[str, torch.Tensor]]:
    """Each sample's gradient of its log-likelihood, one at a time on a fresh copy of the
    model: minus the summed cross-entropy of the scored tokens, in the model's dtype (Hugging
    Face's own ``labels`` loss would compute it in float32)."""
    grads = []
    for sample in samples:
        fresh = copy.deepcopy(model).train(False)
        ids = torch.tensor([sample.ids])
        logits = fresh(input_ids=ids).logits[0, -sample.targets - 1 : -1]
        nll = torch.nn.functional.cross_entropy(logits, ids[0, -sample.targets :], reduction="sum")
        (-nll).backward()
        grads.append(
            {n: p.grad.detach().clone() for n, p in fresh.named_parameters(remove_duplicate=False)}
        )
    return grads


@pytest.fixture(scope="module")
def ft_a64(toy_zoo):  # type: ignore[no-untyped-def]
    model, tokenizer = load_model_for_eval(toy_zoo["ft_a"])
    return model.double(), tokenizer


def test_estimate_is_the_mean_per_sample_squared_gradient(ft_a64) -> None:
    model, tokenizer = ft_a64
    samples = choose_samples(task_samples(tokenizer, ["toy_facts_a"]), 6, seed=3)
    samples += text_samples(tokenizer, TEXT.read_text(), 7)[:3]
    grads = per_sample_gradients(model, samples)
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    fisher = estimate_fisher(model, samples)
    assert list(fisher) == names
    for name in names:
        oracle = sum(g[name] ** 2 for g in grads) / len(samples)
        assert fisher[name].dtype == torch.float32
        torch.testing.assert_close(fisher[name].double(), oracle, rtol=1e-6, atol=1e-12)
    # Batches of 4, right-padded (lengths 3 and 7): the mean of squared batch gradients.
    batched = estimate_fisher(model, samples, batch_size=4)
    groups = [grads[i : i + 4] for i in range(0, len(grads), 4)]
    for name in names:
        oracle = sum(sum(g[name] for g in group) ** 2 for group in groups) / len(samples)
        torch.testing.assert_close(batched[name].double(), oracle, rtol=1e-6, atol=1e-12)
    assert any(not torch.allclose(batched[n], fisher[n]) for n in names)
    assert all(p.requires_grad for p in model.parameters())  # left as it was


def test_tied_weights_share_one_fisher(tied_family) -> None:
    model, tokenizer = load_model_for_eval(tied_family["ft_0"])
    fisher = estimate_fisher(model, text_samples(tokenizer, "a b c d e f g h " * 4, 8))
    assert "lm_head.weight" in fisher and "model.embed_tokens.weight" in fisher
    assert torch.equal(fisher["lm_head.weight"], fisher["model.embed_tokens.weight"])
    assert float(fisher["lm_head.weight"].sum()) > 0


def test_choose_samples_is_seeded_and_ordered() -> None:
    samples = [Sample((i, i + 1), 1) for i in range(50)]
    first = choose_samples(samples, 10, seed=0)
    assert first == choose_samples(samples, 10, seed=0) != choose_samples(samples, 10, seed=1)
    assert first == sorted(first, key=lambda s: s.ids) and len(set(first)) == 10
    assert choose_samples(samples, 99) == samples


def _read(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(str(folder / "model.safetensors"), "pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    return tensors, json.loads((folder / "fisher.json").read_text())


def test_cli_tasks_and_text_end_to_end(toy_zoo, tmp_path, capsys) -> None:
    ft_a, ft_b = toy_zoo["ft_a"], toy_zoo["ft_b"]
    out_a = tmp_path / "fisher_a"
    argv = ["fisher", str(ft_a), "--out", str(out_a), "--tasks", "toy_facts_a", "--samples", "16"]
    assert main([*argv, "--quiet"]) == 0
    assert str(out_a) in capsys.readouterr().out
    tensors, record = _read(out_a)
    checkpoint = ModelFolder(ft_a)
    assert set(tensors) == set(checkpoint.tensors)
    for name, tensor in tensors.items():
        assert tensor.dtype == torch.float32
        assert list(tensor.shape) == list(checkpoint.tensors[name].shape)
        assert bool((tensor >= 0).all()) and bool(torch.isfinite(tensor).all())
    assert float(tensors["model.layers.0.mlp.down_proj.weight"].sum()) > 0
    assert record["data"] == {"kind": "tasks", "tasks": ["toy_facts_a"], "include_paths": []}
    assert (record["samples"], record["available_samples"]) == (16, 60)
    assert (record["tokens"], record["input_tokens"]) == (16, 48)  # "k1 =" then " v3"
    assert record["dtype"] == "float32" and record["batch_size"] == 1
    assert record["model"] == str(ft_a.resolve()) and record["seconds"] > 0
    assert record["evomerge_version"]
    # The same estimate as the library's on the same seeded choice.
    model, tokenizer = load_model_for_eval(ft_a)
    chosen = choose_samples(task_samples(tokenizer, ["toy_facts_a"]), 16, seed=0)
    direct = estimate_fisher(model, chosen)
    for name, tensor in tensors.items():
        torch.testing.assert_close(tensor, direct[name], rtol=1e-5, atol=0)

    out_b = tmp_path / "fisher_b"
    argv = ["fisher", str(ft_b), "--out", str(out_b), "--text", str(TEXT), "--max-length", "64"]
    assert main([*argv, "--batch-size", "2", "--quiet"]) == 0
    _, record = _read(out_b)
    data = TEXT.read_bytes()
    assert record["data"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert record["data"]["kind"] == "text" and record["data"]["max_length"] == 64
    tokens = len(data.split())  # word-level tokenizer: one token per word
    assert record["input_tokens"] == tokens and record["samples"] == -(-tokens // 64)
    assert record["tokens"] == tokens - record["samples"]

    # The folders merge: a fisher recipe of the two fine-tunes.
    recipe = {
        "method": "fisher",
        "sources": [
            {"model": str(ft_a), "fisher": str(out_a)},
            {"model": str(ft_b), "fisher": str(out_b)},
        ],
    }
    plan, _ = plan_from_file(write_yaml(tmp_path / "r.yaml", recipe))
    merged = load_folder(merge_to_folder(plan, tmp_path / "merged"))
    a, b = load_folder(ft_a), load_folder(ft_b)
    name = "model.layers.0.mlp.down_proj.weight"
    low = torch.minimum(a[name], b[name]) - 1e-6
    high = torch.maximum(a[name], b[name]) + 1e-6
    assert bool(((merged[name] >= low) & (merged[name] <= high)).all())
    assert not torch.allclose(merged[name], (a[name] + b[name]) / 2)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--tasks", "no_such_task"], "unknown task"),
        (["--text", "EMPTY"], "is empty"),
        (["--text", "MISSING"], "cannot read"),
        (["--tasks", "toy_facts_a", "--samples", "0"], "--samples"),
        (["--tasks", "toy_facts_a", "--batch-size", "0"], "--batch-size"),
        (["--tasks", " , "], "no task"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    toy_zoo, tmp_path, capsys, extra, message
) -> None:
    (tmp_path / "empty.txt").write_text(" \n")
    extra = [
        {"EMPTY": str(tmp_path / "empty.txt"), "MISSING": str(tmp_path / "nope.txt")}.get(a, a)
        for a in extra
    ]
    out = tmp_path / "out"
    before = set(tmp_path.iterdir())
    assert main(["fisher", str(toy_zoo["ft_a"]), "--out", str(out), *extra, "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("evomerge: error:") and "\n" not in err and message in err, err
    assert set(tmp_path.iterdir()) == before


def test_missing_model_and_existing_out(toy_zoo, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    assert main(["fisher", str(tmp_path / "nope"), "--out", str(out), "--text", str(TEXT)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("evomerge: error:") and "\n" not in err and not out.exists(), err
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    argv = ["fisher", str(toy_zoo["ft_a"]), "--out", str(out), "--text", str(TEXT), "--quiet"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert "--force" in err and "\n" not in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert main([*argv, "--force", "--samples", "1"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["fisher.json", "model.safetensors"]


def test_a_fisher_mean_below_float32s_smallest_normal_gives_no_nan() -> None:
    # Found by hypothesis: one entry at float32's smallest normal, the rest 0, so the mean
    # (1.18e-38 / 4) is subnormal in float32, and the other source's Fisher, put on the first
    # source's scale, overflowed to inf (inf / inf = NaN).
    base = torch.zeros(4)
    sources = [torch.zeros(4), torch.ones(4)]
    tiny = torch.finfo(torch.float32).tiny
    fishers = [torch.tensor([tiny, 0.0, 0.0, 0.0]), torch.full((4,), 8.0)]
    ctx = TensorContext(name="t", aux={"fisher": fishers})
    for method in ("fisher", "fisher_task_arithmetic"):
        out = merge_tensor(method, base, sources, {}, [{"weight": 1.0}] * 2, ctx)
        assert bool(torch.isfinite(out).all()), (method, out)
        assert bool(((out >= 0) & (out <= 1)).all()), (method, out)  # between the sources
