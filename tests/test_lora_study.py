"""A PEFT LoRA adapter as a study source, end to end on the toy zoo.

The adapter is real PEFT: LoRA (r 8, every Linear) trained from the toy base on ft_b's facts
for 40 steps, so it knows set b as ft_b does. A study over [adapter, ft_a] runs through
`evomerge search` and its best trial exports and verifies. The worker holds the adapter as its
factors only and builds each candidate in place with exactly the tensors `merge_to_folder`
writes; PEFT's own `merge_and_unload()` is the oracle for what the adapter means. Adapters that
cannot be applied exactly are refused before the study starts, in one line naming the source.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from evomerge.adapters import AdapterFolder
from evomerge.checkpoint import ModelFolder
from evomerge.cluster.worker import CandidateTask, MergeWorker, WorkerSpec
from evomerge.memory import read_model_size
from evomerge.merge.engine import HeldAdapter, InPlaceMerger, merge_to_folder
from evomerge.merge.recipe import open_recipe_models, parse_recipe, plan_recipe
from evomerge.study import StudyStore
from tests.helpers import load_folder
from tests.study_helpers import TOY_EVALUATOR, one_line_error, run, write_study_yaml

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora(base: Path, out: Path, *, train: bool, **settings: Any) -> dict[str, torch.Tensor]:
    """Save a PEFT LoRA adapter of ``base`` at ``out`` (trained on ft_b's facts, or with a
    random B); return PEFT's merge_and_unload() of it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.toy_zoo import _encode, _train, fact_sets

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = {"r": 8, "lora_alpha": 16, "target_modules": TARGETS, "lora_dropout": 0.0}
    config.update(settings)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            wrapped = peft.get_peft_model(model, peft.LoraConfig(**config))
            if train:
                tokenizer = AutoTokenizer.from_pretrained(base)
                inputs, labels = _encode(tokenizer, fact_sets()["b"])
                generator = torch.Generator().manual_seed(0)
                _train(wrapped, inputs, labels, steps=40, lr=2e-3, weight_decay=0.0,
                       batch_size=64, generator=generator)  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    wrapped.save_pretrained(out)
    merged = wrapped.merge_and_unload().state_dict()
    return {name: tensor.detach().clone() for name, tensor in merged.items()}


@pytest.fixture(scope="module")
def lora_b(toy_zoo: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """(adapter folder, PEFT's merge of it into the base)."""
    out = tmp_path_factory.mktemp("lora") / "lora_b"
    return out, _lora(toy_zoo["base"], out, train=True)


def _study(tmp_path: Path, zoo: dict, sources: list[str]) -> Path:
    return write_study_yaml(
        tmp_path,
        zoo,
        sources=sources,
        space="task_arithmetic_global",
        proposer={"kind": "random", "seed": 0},
        evaluators=[TOY_EVALUATOR],
        budget=6,
        storage=str(tmp_path / "s.db"),
        cluster={"workers": 1},
    )


def test_a_study_over_an_adapter_and_a_fine_tune_runs_and_its_export_verifies(
    toy_zoo, lora_b, tmp_path, capsys
):
    adapter, _ = lora_b
    path = _study(tmp_path, toy_zoo, [str(adapter), str(toy_zoo["ft_a"])])
    code, out, err = run(["search", str(path), "--quiet"], capsys)
    assert code == 0, err
    trials = StudyStore(str(tmp_path / "s.db")).trials("toy")
    assert len(trials) == 6 and all(t.state == "COMPLETE" for t in trials), [
        t.error for t in trials
    ]
    [alone] = [t for t in trials if t.role == "source" and t.label == "lora_b"]
    assert alone.recipe["base"] == str(toy_zoo["base"]), "an adapter alone needs its base"
    # Trained on set b, the adapter knows it; ft_a does not.
    [ft_a] = [t for t in trials if t.role == "source" and t.label == "ft_a"]
    assert alone.metrics["toy_facts_b/acc"] > 0.8 > ft_a.metrics["toy_facts_b/acc"]
    code, out, err = run(
        ["export", "--storage", tmp_path / "s.db", "--study", "toy", "--trial", "best",
         "--out", tmp_path / "merged", "--verify", "--quiet"],
        capsys,
    )  # fmt: skip
    assert code == 0 and "verified: yes" in out, err


def test_the_worker_holds_factors_and_builds_what_the_export_writes(toy_zoo, lora_b, tmp_path):
    adapter, peft_merged = lora_b
    spec = WorkerSpec(
        base=str(toy_zoo["base"]),
        sources=[str(adapter), str(toy_zoo["ft_a"])],
        evaluators=[TOY_EVALUATOR],
        torch_threads=1,
    )
    threads = torch.get_num_threads()
    try:
        worker = MergeWorker(spec, "in-process")
        # Held as factors: the adapter file's bytes (what the memory plan reads), not a model's
        # (rank 8 on every Linear of a width-128 model: about a tenth of it).
        held = worker.merger.tensors[1]
        assert isinstance(held, HeldAdapter) and held.base is worker.merger.tensors[0]
        factor_bytes = read_model_size(adapter).stored_bytes
        full = read_model_size(toy_zoo["ft_a"]).stored_bytes
        assert held.nbytes == factor_bytes and 8 * factor_bytes < full
        assert worker.resident_bytes() == 2 * full + factor_bytes  # base, ft_a, adapter
        # Every tensor reads exactly as AdapterFolder.read gives it.
        folder = AdapterFolder(adapter, ModelFolder(toy_zoo["base"]))
        assert set(held) == set(folder.tensors) and folder.factors
        for name in folder.tensors:
            assert held.dtype(name) == held[name].dtype
            assert torch.equal(held[name], folder.read(name)), name

        recipe = {
            "method": "task_arithmetic",
            "base": str(toy_zoo["base"]),
            "sources": [
                {"model": str(adapter), "parameters": {"weight": 1.0}},
                {"model": str(toy_zoo["ft_a"]), "parameters": {"weight": 0.5}},
            ],
        }
        result = worker.run(CandidateTask(0, recipe))
        assert result.status == "complete", result.error
        built = {n: t.detach().clone() for n, t in worker.model.state_dict().items()}
        parsed = parse_recipe(recipe)
        plan = plan_recipe(parsed, open_recipe_models(parsed))
        written = load_folder(merge_to_folder(plan, tmp_path / "ta"))
        assert written
        for name, tensor in written.items():
            assert torch.equal(built[name], tensor), name
        # PEFT's merge_and_unload() of the adapter is what the adapter's task vector adds.
        base, ft_a = load_folder(toy_zoo["base"]), load_folder(toy_zoo["ft_a"])
        adapted = [n for n in written if not torch.equal(peft_merged[n], base[n])]
        assert len(adapted) == len(folder.factors)
        for name, tensor in written.items():
            expected = peft_merged[name] + 0.5 * (ft_a[name] - base[name])
            assert (tensor - expected).abs().max() <= 1e-5, name
        # Host residency (the fetch path) builds the same bits; it copies each base tensor once
        # per job (the base's and the adapter's inputs share it) and the factors, not a delta.
        host = InPlaceMerger(open_recipe_models(parsed), resident="host")
        assert isinstance(host.tensors[1], HeldAdapter)
        target = type(worker.model).from_pretrained(toy_zoo["base"], dtype=torch.float32)
        timings = host.merge_into(plan, target)
        for name, tensor in written.items():
            assert torch.equal(target.state_dict()[name], tensor), name
        assert timings.transfer_bytes == 2 * full + factor_bytes

        # The study's baseline for an adapter source: linear over it alone, with the base.
        alone = {
            "method": "linear",
            "base": str(toy_zoo["base"]),
            "sources": [{"model": str(adapter), "parameters": {"weight": 1.0}}],
        }
        result = worker.run(CandidateTask(1, alone))
        assert result.status == "complete", result.error
        built = worker.model.state_dict()
        for name, tensor in peft_merged.items():
            assert (built[name] - tensor).abs().max() <= 1e-5, name
        # Without its base, a recipe cannot use the adapter: a failed candidate that says so.
        alone.pop("base")
        result = worker.run(CandidateTask(2, alone))
        assert result.status == "failed" and "not a model of this merge" in (result.error or "")
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("dora", "use_dora is True"),
        ("no config", "no adapter_config.json"),
    ],
)
def test_an_adapter_that_cannot_be_applied_exactly_is_refused_before_the_study(
    toy_zoo, lora_b, tmp_path, capsys, kind, message
):
    adapter = tmp_path / "adapter"
    if kind == "dora":
        _lora(toy_zoo["base"], adapter, train=False, use_dora=True, init_lora_weights=False)
    else:
        shutil.copytree(lora_b[0], adapter)
        (adapter / "adapter_config.json").unlink()
    capsys.readouterr()  # transformers' progress bars while making it
    path = _study(tmp_path, toy_zoo, [str(adapter), str(toy_zoo["ft_a"])])
    code, _, err = run(["search", str(path), "--quiet"], capsys)
    line = one_line_error(err)
    assert code == 1 and "sources[0]: " in line and message in line, line
    assert not (tmp_path / "s.db").exists() or not StudyStore(str(tmp_path / "s.db")).studies()
