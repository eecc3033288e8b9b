"""`evomerge export --as-lora RANK`: the merged delta as a PEFT adapter, checked by PEFT and NumPy.

A task arithmetic trial of the toy study (hidden 128, MLP 256, so every Linear has min(shape)
128) is exported with its adapter. The oracles: PEFT's own ``PeftModel.from_pretrained(base,
adapter).merge_and_unload()``, which at a rank covering every Linear must give back the exported
checkpoint's Linear weights, and at rank 2 base + the best rank-2 approximation that NumPy's SVD
computes; the errors the export reports must be NumPy's ``sqrt(sum of dropped s^2) / ||delta||``.
"""

from __future__ import annotations

import json
import re
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from evomerge.cli import main
from evomerge.merge.tensors import tensor_kind
from evomerge.study.export import export_trial
from tests.study_helpers import fill, run

peft = pytest.importorskip("peft")

TRIAL = 1  # genome [0.5, 0.5]: both fine-tunes at half weight
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module", autouse=True)
def one_thread():  # type: ignore[no-untyped-def]
    """Small SVDs on a shared 2-core host ran 30x slower on 2 contending threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def export_args(storage: Any, *more: Any) -> list[str]:
    return [str(a) for a in ("export", "--storage", storage, "--study", "toy", *more)]


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def is_linear(name: str, tensor: torch.Tensor) -> bool:
    return tensor.dim() == 2 and any(f".{leaf}.weight" in name for leaf in LINEAR)


def peft_merge(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def kind_rows(card: str) -> dict[str, tuple[int, float, float]]:
    """The LoRA section's table: kind -> (tensors, mean, max)."""
    section = card.split("## LoRA adapter", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (\w+) \| (\d+) \| ([-+.e\d]+) \| ([-+.e\d]+) \|$", section, re.M)
    return {kind: (int(n), float(mean), float(worst)) for kind, n, mean, worst in rows}


@pytest.fixture(scope="module")
def full_rank(toy_zoo, scored, tmp_path_factory) -> tuple[Path, str]:  # type: ignore[no-untyped-def]
    """The trial exported through the CLI with --as-lora 256 (above every Linear's rank)."""
    root = tmp_path_factory.mktemp("lora_full")
    fill(str(root / "s.db"), toy_zoo, scored)
    out = root / "out"
    buffer = StringIO()
    with redirect_stdout(buffer):
        code = main(
            export_args(root / "s.db", "--trial", TRIAL, "--out", out, "--as-lora", 256, "--quiet")
        )
    assert code == 0
    return out, buffer.getvalue()


def test_full_rank_adapter_applied_by_peft_gives_the_exported_linears(toy_zoo, full_rank):
    out, stdout = full_rank
    adapter = out / "lora-r256"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 128  # min(shape) of every Linear
    assert config["rank_pattern"] == {} and sorted(config["target_modules"]) == sorted(LINEAR)
    exported, base = tensors(out), tensors(toy_zoo["base"])
    theirs = peft_merge(toy_zoo["base"], adapter)
    linears = [n for n, t in exported.items() if is_linear(n, t)]
    assert len(linears) == 7 * 4  # four layers, seven Linears each
    for name in linears:
        assert not torch.equal(exported[name], base[name]), name  # the test has a delta
        diff = (theirs[name] - exported[name]).abs().max().item()
        assert diff <= 1e-5, f"{name}: {diff}"
    for name in exported:  # the rest is the base's: the adapter leaves it alone
        if name not in linears and name in theirs:
            assert torch.equal(theirs[name], base[name]), name
    rows = kind_rows((out / "README.md").read_text())
    assert set(rows) == {"attention", "mlp"}
    assert rows["attention"][0] == 16 and rows["mlp"][0] == 12
    assert all(worst < 1e-5 for _, _, worst in rows.values()), rows
    line = [s for s in stdout.splitlines() if s.startswith("LoRA adapter (rank 256)")]
    assert len(line) == 1 and str(adapter) in line[0] and "28 tensors" in line[0], stdout


def test_card_lists_every_changed_tensor_the_adapter_leaves_out(toy_zoo, full_rank):
    out, _ = full_rank
    exported, base = tensors(out), tensors(toy_zoo["base"])
    expected = {}
    for name, tensor in exported.items():
        if is_linear(name, tensor) or torch.equal(tensor, base[name]):
            continue
        delta = (tensor.double() - base[name].double()).numpy()
        expected[name] = np.linalg.norm(delta) / np.linalg.norm(base[name].double().numpy())
    kinds = {tensor_kind(n) for n in expected}
    assert {"norm", "embedding"} <= kinds, kinds  # the fine-tunes changed these too
    card = (out / "README.md").read_text()
    section = card.split("## LoRA adapter (rank 256)", 1)[1].split("\n## ", 1)[0]
    listed = dict(re.findall(r"^- `([^`]+)` \(\w+\): ([-+.e\d]+)$", section, re.M))
    assert set(listed) == set(expected)
    for name, change in expected.items():
        assert float(listed[name]) == pytest.approx(change, rel=1e-3), name


def test_rank_two_errors_are_numpys_and_peft_applies_the_rank_two_approximation(
    toy_zoo, scored, tmp_path
):
    store = fill(str(tmp_path / "s.db"), toy_zoo, scored)
    out = tmp_path / "out"
    result = export_trial(store, "toy", str(TRIAL), out, verify=False, as_lora=2)
    assert result.lora is not None and result.lora.path == "lora-r2"
    reported = {t.name: t for t in result.lora.tensors}
    exported, base = tensors(out), tensors(toy_zoo["base"])
    theirs = peft_merge(toy_zoo["base"], out / "lora-r2")
    expected_errors: dict[str, list[float]] = {}
    assert sorted(reported) == sorted(n for n, t in exported.items() if is_linear(n, t))
    for name, entry in reported.items():
        delta = exported[name].double().numpy() - base[name].double().numpy()
        u, s, vh = np.linalg.svd(delta, full_matrices=False)
        error = np.sqrt(np.sum(s[2:] ** 2)) / np.linalg.norm(delta)
        assert entry.rank == 2 and error > 1e-3  # rank 2 really truncates here
        assert abs(entry.error - error) <= 1e-5, (name, entry.error, error)
        approx = base[name].double().numpy() + (u[:, :2] * s[:2]) @ vh[:2]
        diff = np.abs(theirs[name].double().numpy() - approx).max()
        assert diff <= 1e-5, f"{name}: {diff}"
        expected_errors.setdefault(tensor_kind(name), []).append(error)
    rows = kind_rows((out / "README.md").read_text())
    assert set(rows) == set(expected_errors)
    for kind, errors in expected_errors.items():
        count, mean, worst = rows[kind]
        assert count == len(errors)
        assert mean == pytest.approx(np.mean(errors), rel=1e-3)
        assert worst == pytest.approx(max(errors), rel=1e-3)


def test_rank_pattern_for_narrow_linears_loads_in_peft_and_in_evomerge(tmp_path):
    """Grouped-query k/v projections (8 x 32) get rank 8 via rank_pattern, the rest rank 16;
    PEFT and evomerge's own adapter reader both give base + the truncated deltas."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from evomerge.adapters import AdapterFolder
    from evomerge.checkpoint import ModelFolder
    from evomerge.lora_export import export_lora

    config = LlamaConfig(
        vocab_size=48,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        model.save_pretrained(tmp_path / "base")
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "layers.0" in name or "norm" in name:  # layer 1's Linears stay unchanged
                    param.add_(torch.randn_like(param) * 0.05)
    model.save_pretrained(tmp_path / "merged")
    report = export_lora(tmp_path / "base", tmp_path / "merged", tmp_path / "lora", 16)
    adapter = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert adapter["r"] == 16
    assert adapter["rank_pattern"] == {
        "model.layers.0.self_attn.k_proj": 8,
        "model.layers.0.self_attn.v_proj": 8,
    }
    # layer 1 is not in the adapter, so the modules are named, not their leaves
    assert all(t.startswith("model.layers.0.") for t in adapter["target_modules"])
    assert {t.name for t in report.left_out} >= {"model.norm.weight"}
    base, merged = tensors(tmp_path / "base"), tensors(tmp_path / "merged")
    theirs = peft_merge(tmp_path / "base", tmp_path / "lora")
    ours = AdapterFolder(tmp_path / "lora", ModelFolder(tmp_path / "base"))
    for entry in report.tensors:
        delta = (merged[entry.name].double() - base[entry.name].double()).numpy()
        u, s, vh = np.linalg.svd(delta, full_matrices=False)
        approx = base[entry.name].double().numpy() + (u[:, :16] * s[:16]) @ vh[:16]
        assert entry.rank == min(16, *delta.shape)
        for applied in (theirs[entry.name], ours.read(entry.name)):
            assert np.abs(applied.double().numpy() - approx).max() <= 1e-5, entry.name
    assert len(report.tensors) == 7 and report.unchanged > 0


def test_bad_rank_is_refused_by_argparse(toy_zoo, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        run(export_args(tmp_path / "s.db", "--trial", "best", "--out", out, "--as-lora", 0), capsys)
    assert exit_info.value.code == 2
    assert "--as-lora: rank must be at least 1, not 0" in capsys.readouterr().err
    assert not out.exists()
