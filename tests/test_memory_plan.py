"""A worker's memory plan (evomerge.memory) and `evomerge check`'s memory line: the formulas on a
tiny config by hand, the README tour's 7B arithmetic on a header-only 7B-shaped family (sparse
safetensors files: full length, no data, no disk), and the line on the toy zoo."""

from __future__ import annotations

import json
import math
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from evomerge import memory
from evomerge.checkpoint import ModelFolder
from evomerge.cli import main
from evomerge.errors import ConfigError
from evomerge.memory import (
    Architecture,
    EvalShape,
    ModelSize,
    architecture_from_config,
    choose_residency,
    evaluation_bytes,
    kv_cache_bytes,
    log_prob_bytes,
    logits_bytes,
    memory_inputs,
    plan_memory,
    read_model_size,
)

REPO = Path(__file__).resolve().parents[1]
GB = 10**9

# -- the formulas, by hand on a tiny config ------------------------------------------------------

TINY = Architecture(
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    hidden_size=32,
    intermediate_size=64,
    vocab_size=100,
    max_position_embeddings=128,
)


def test_kv_cache_logits_and_activations_match_the_hand_computation():
    batch, seq = 3, 5
    # 2 (K and V) x layers x batch x seq x kv heads x head_dim x bytes
    assert kv_cache_bytes(TINY, batch, seq, 2) == 2 * 2 * 3 * 5 * 2 * 8 * 2 == 1920
    assert kv_cache_bytes(TINY, batch, seq, 4) == 3840
    assert logits_bytes(TINY, batch, seq, 2) == 3 * 5 * 100 * 2 == 3000
    assert log_prob_bytes(TINY, batch, seq, 2, "lm_eval") == 3000  # log_softmax keeps bf16
    # perplexity: a float32 copy of the logits and cross-entropy's float32 log-softmax
    assert log_prob_bytes(TINY, batch, seq, 2, "perplexity") == 3 * 5 * 100 * (4 + 4)
    assert log_prob_bytes(TINY, batch, seq, 4, "perplexity") == 3 * 5 * 100 * 4  # no copy
    assert memory.activation_bytes(TINY, batch, seq, 2) == 3 * 5 * (2 * 32 + 3 * 64) * 2 == 7680
    shape = EvalShape("lm_eval t", "lm_eval", batch, seq, sequence_source="max_length")
    # KV + max(activations 7680, logits + log-probs 6000)
    assert evaluation_bytes(TINY, shape, 2) == 1920 + max(7680, 3000 + 3000) == 9600


def test_a_plan_adds_its_components_by_the_documented_formulas():
    base = ModelSize("base", 1000, 500, 100, 200, "bfloat16")
    source = ModelSize("ft", 1000, 500, 100, 200, "bfloat16")
    shape = EvalShape("lm_eval t", "lm_eval", 3, 5, sequence_source="max_length")
    on_gpu = plan_memory([base, source], TINY, [shape], device="cuda", working_dtype="float32")
    merge = memory.MERGE_TEMPORARY_TENSORS * 100 * 4
    evaluation = evaluation_bytes(TINY, shape, 4)
    assert on_gpu.bytes_of("evaluation") == evaluation
    assert on_gpu.gpu_bytes_per_worker == (
        2000 + 500 * 4 + max(merge, evaluation) + memory.CUDA_OVERHEAD_BYTES
    )
    process = memory.HOST_PROCESS_BYTES + memory.HOST_CUDA_BYTES
    assert on_gpu.host_bytes_per_worker == 500 * 4 + process  # the model load
    assert on_gpu.gpu_fits(on_gpu.gpu_bytes_per_worker) is True
    assert on_gpu.gpu_fits(on_gpu.gpu_bytes_per_worker - 1) is False
    assert on_gpu.fits(None, 10 * GB) is None and on_gpu.fits(10 * GB, 1) is False

    streamed = plan_memory([base, source], TINY, [shape], device="cuda", residency="host")
    assert streamed.bytes_of("merge") == merge + 2 * 200  # the inputs, streamed in
    assert streamed.host_bytes_per_worker == 2000 + 500 * 2 + process

    on_cpu = plan_memory([base, source], TINY, [shape], device="cpu", working_dtype="float32")
    assert on_cpu.gpu_bytes_per_worker == 0 and on_cpu.gpu_fits(None) is True
    assert on_cpu.host_bytes_per_worker == (
        2000 + 500 * 4 + max(merge, evaluation) + memory.HOST_PROCESS_BYTES
    )
    for component in on_gpu.components:  # each one says how it was computed
        assert component.formula


def test_config_json_defaults_kv_heads_head_dim_and_reads_a_nested_text_config():
    arch = architecture_from_config(
        {"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 32, "vocab_size": 9}
    )
    assert (arch.num_key_value_heads, arch.head_dim, arch.intermediate_size) == (4, 8, 128)
    nested = architecture_from_config(
        {"max_position_embeddings": 7, "text_config": {**vars(TINY), "head_dim": 16}}
    )
    assert nested.head_dim == 16 and nested.num_key_value_heads == 2
    with pytest.raises(Exception, match="vocab_size"):
        architecture_from_config({"num_hidden_layers": 2, "num_attention_heads": 4})


def test_the_headers_give_what_model_folder_gives(family):
    size = read_model_size(family["base"])
    folder = ModelFolder(family["base"])
    assert size.stored_bytes == sum(t.nbytes for t in folder.tensors.values())
    assert size.parameters == sum(math.prod(t.shape) for t in folder.tensors.values())
    assert size.largest_tensor == max(math.prod(t.shape) for t in folder.tensors.values())
    assert size.stored_dtype == "float32"


# -- the README tour: a 7B-shaped family of header-only safetensors ------------------------------

MISTRAL_7B = {
    "architectures": ["MistralForCausalLM"],
    "model_type": "mistral",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 32000,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "bos_token_id": 2,
    "eos_token_id": 3,
}
PARAMS_7B = 7_241_732_096


def _mistral_tensors() -> list[tuple[str, list[int]]]:
    h, i, kv, v = 4096, 14336, 8 * 128, 32000
    tensors = [("model.embed_tokens.weight", [v, h])]
    for layer in range(32):
        prefix = f"model.layers.{layer}."
        tensors += [
            (prefix + "self_attn.q_proj.weight", [h, h]),
            (prefix + "self_attn.k_proj.weight", [kv, h]),
            (prefix + "self_attn.v_proj.weight", [kv, h]),
            (prefix + "self_attn.o_proj.weight", [h, h]),
            (prefix + "mlp.gate_proj.weight", [i, h]),
            (prefix + "mlp.up_proj.weight", [i, h]),
            (prefix + "mlp.down_proj.weight", [h, i]),
            (prefix + "input_layernorm.weight", [h]),
            (prefix + "post_attention_layernorm.weight", [h]),
        ]
    return [*tensors, ("model.norm.weight", [h]), ("lm_head.weight", [v, h])]


def _write_header_only(file: Path, tensors: list[tuple[str, list[int]]]) -> int:
    """A safetensors file with a real header and a sparse (never written) data region."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors:
        size = math.prod(shape) * 2
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with file.open("wb") as handle:
        handle.write(struct.pack("<Q", len(raw)))
        handle.write(raw)
    os.truncate(file, 8 + len(raw) + offset)
    return offset


def _header_only_model(folder: Path) -> Path:
    from evomerge.random_family import build_tokenizer

    folder.mkdir(parents=True)
    tensors = _mistral_tensors()
    shards = [tensors[: 1 + 16 * 9], tensors[1 + 16 * 9 :]]
    weight_map, total = {}, 0
    for number, shard in enumerate(shards, 1):
        name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        total += _write_header_only(folder / name, shard)
        weight_map.update({tensor: name for tensor, _ in shard})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    (folder / "config.json").write_text(json.dumps(MISTRAL_7B))
    build_tokenizer([f"w{n}" for n in range(50)]).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def family_7b(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """base, hermes, math: Mistral-7B-shaped, bfloat16, header-only (about 14.5 GB each on
    paper, a few KB on disk)."""
    root = tmp_path_factory.mktemp("family_7b")
    return {name: _header_only_model(root / name) for name in ("base", "hermes", "math")}


def _tour_study(folder: Path, family: dict[str, Path], **cluster: object) -> Path:
    """The README tour's study, with the bundled toy_facts tasks standing in for gsm8k and
    arc_challenge (their datasets are not here; max_length fixes the arithmetic anyway)."""
    cluster.setdefault("residency", "device")  # the tour's "on the GPU" column
    data = {
        "name": "hermes-math",
        "base": str(family["base"]),
        "sources": [str(family["hermes"]), str(family["math"])],
        "space": "ties_per_layer",
        "proposer": {"kind": "nsga2", "seed": 0},
        "objectives": [{"metric": "toy_facts_a/acc"}, {"metric": "toy_facts_b/acc"}],
        "evaluators": [
            {
                "kind": "lm_eval",
                "tasks": ["toy_facts_a", "toy_facts_b"],
                "batch_size": 32,
                "max_length": 2048,
                "holdout": 0.2,
            }
        ],
        "budget": {"trials": 300, "hours": 10},
        "device": "cuda",
        "cluster": {"workers": 1, "gpus_per_worker": 1, "trial_timeout": 1800, **cluster},
    }
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _run_check(*args: str) -> tuple[int, dict, dict]:
    """`evomerge check ... --json` in a fresh process; its exit code, its JSON, and what the
    process read (rchar of /proc/self/io) and held at most (maxrss) while it ran."""
    code = (
        "import json, resource, sys\n"
        "from evomerge.cli import main\n"
        "code = main(sys.argv[1:])\n"
        "io = dict(l.split(': ') for l in open('/proc/self/io').read().splitlines())\n"
        "usage = {'rchar': int(io['rchar']),\n"
        "         'maxrss': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}\n"
        "print(json.dumps(usage), file=sys.stderr)\n"
        "sys.exit(code)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [sys.executable, "-c", code, "check", *args, "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    usage = json.loads(done.stderr.strip().splitlines()[-1])
    return done.returncode, json.loads(done.stdout), usage


# The README tour's arithmetic (Mistral-7B shape, base + 2 bfloat16 fine-tunes, lm_eval batch 32
# x 2048 tokens), written out per component as the README's table has it.
RESIDENT = 3 * PARAMS_7B * 2
MERGE = 4 * (32_000 * 4_096) * 4  # 4 float32 copies of the largest tensor (the embeddings)


def _hand_gpu(w: int) -> int:
    working = PARAMS_7B * w
    kv_cache = 2 * 32 * 32 * 2048 * 8 * 128 * w
    activations = 32 * 2048 * (2 * 4096 + 3 * 14336) * w
    logits = 32 * 2048 * 32_000 * w
    log_probs = 32 * 2048 * 32_000 * w
    evaluation = kv_cache + max(activations, logits + log_probs)
    return RESIDENT + working + max(MERGE, evaluation) + 2 * GB


HAND_BF16 = _hand_gpu(2)  # 76.9 GB
HAND_FP32 = _hand_gpu(4)  # 108.4 GB


def test_the_tour_s_7b_plan_is_the_readme_s_arithmetic_and_reads_no_tensor_data(
    family_7b, tmp_path
):
    study = _tour_study(tmp_path, family_7b)
    code, report, usage = _run_check(
        str(study), "--offline", "--gpu-memory", "80GB", "--host-memory", "256GB"
    )
    checks = {c["name"]: c for c in report["checks"]}
    assert code == (0 if report["ok"] else 1)
    assert checks["preflight"]["state"] == "ok", checks["preflight"]
    for name in ("database", "study", "ray", "cuda"):
        assert checks[name]["state"] == "skip" and "offline" in checks[name]["detail"]
    plan = report["memory"]
    assert plan["working_dtype"] == "bfloat16" and plan["residency"] == "device"
    assert plan["gpu_bytes_available"] == 80 * GB and plan["host_bytes_available"] == 256 * GB
    assert abs(plan["gpu_bytes_per_worker"] - HAND_BF16) <= 0.1 * HAND_BF16
    assert plan["fits"] is True and checks["memory"]["state"] == "ok"
    components = plan["components"]
    assert components["resident tensors"]["bytes"] == RESIDENT
    assert components["evaluation"]["formula"].endswith(
        "lm_eval toy_facts_a,toy_facts_b: batch 32 x 2048 tokens (max_length)"
    )
    by_dtype = plan["by_working_dtype"]
    assert by_dtype["bfloat16"]["fits"] is True and by_dtype["float16"]["fits"] is True
    on_device = by_dtype["float32"]["by_residency"]["device"]
    assert abs(on_device["gpu_bytes_per_worker"] - HAND_FP32) <= 0.1 * HAND_FP32
    assert on_device["fits"] is False
    if by_dtype["float32"]["residency"] == "device":  # cluster.residency: device
        assert by_dtype["float32"]["fits"] is False

    # Header-only: 3 x 14.5 GB on paper, nothing on disk, and nothing of it read.
    files = [f for model in family_7b.values() for f in model.glob("*.safetensors")]
    assert sum(f.stat().st_size for f in files) > 3 * 14 * GB
    assert sum(f.stat().st_blocks * 512 for f in files) < 10 * 2**20
    assert usage["rchar"] < 2 * GB, usage  # imports and headers; not 43 GB of tensor data
    assert usage["maxrss"] < 4 * GB, usage


def test_the_readme_tour_states_the_same_numbers():
    text = REPO.joinpath("README.md").read_text(encoding="utf-8")
    tour = text.split("## A first study on real models", 1)[1].split("\n## ", 1)[0]
    for total in (HAND_BF16, HAND_FP32):
        assert f"{total / GB:.1f} GB" in tour, f"{total / GB:.1f} GB"
    assert "max_length: 2048" in tour and "batch_size: 32" in tour
    assert "--offline --json --gpu-memory 80GB" in tour


def test_a_plan_that_does_not_fit_fails_with_the_numbers_and_what_to_change(family_7b, tmp_path):
    study = _tour_study(tmp_path, family_7b)
    code, report, _ = _run_check(
        str(study), "--offline", "--gpu-memory", "24GB", "--host-memory", "256GB"
    )
    memory_check = next(c for c in report["checks"] if c["name"] == "memory")
    assert code == 1 and report["ok"] is False and report["memory"]["fits"] is False
    assert memory_check["state"] == "FAIL"
    assert "of 24.0 GB" in memory_check["detail"]
    assert "lower batch_size" in memory_check["detail"]
    assert "at batch 32 x 2048 tokens" in memory_check["detail"]


# -- the memory line of `evomerge check` on the toy zoo -----------------------------------------


def test_check_on_the_toy_zoo_prints_a_memory_line(toy_zoo, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    study = tmp_path / "study.yaml"
    study.write_text(
        yaml.safe_dump(
            {
                "name": "toy",
                "base": str(toy_zoo["base"]),
                "sources": [str(toy_zoo["ft_a"]), str(toy_zoo["ft_b"])],
                "space": "task_arithmetic_global",
                "objectives": [{"metric": "toy_facts_a/acc"}],
                "evaluators": [{"kind": "lm_eval", "tasks": ["toy_facts_a"]}],
                "budget": 6,
                "cluster": {"workers": 1},
            }
        )
    )
    code = main(["check", str(study)])
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if re.match(r"^\S+\s+memory ", line))
    assert code == 0 and line.startswith("ok"), out
    assert "per worker (cpu, float32): host" in line
    # no max_length: the longest request of the task, tokenized with the base's tokenizer
    assert "batch 64 x" in line and "(longest request of its tasks)" in line


def test_a_worker_s_residency_follows_the_plan_and_refuses_what_cannot_shrink(family_7b):
    """What a worker decides at start from the GPU memory it may use: the sources on the
    device when the whole plan fits, else on the host; when not even the resident tensors,
    the working model and the CUDA context fit, it refuses (the evaluation could shrink)."""
    evaluators = [
        {"kind": "lm_eval", "tasks": ["toy_facts_a"], "batch_size": 32, "max_length": 2048}
    ]
    inputs = memory_inputs(
        str(family_7b["base"]),
        [str(family_7b["hermes"]), str(family_7b["math"])],
        evaluators,
        "cuda",
    )

    def plan(residency: str, dtype: str = "bfloat16"):  # type: ignore[no-untyped-def]
        return plan_memory(
            inputs.models, inputs.arch, inputs.evaluations, working_dtype=dtype, residency=residency
        )

    device, host = plan("device"), plan("host")
    assert device.gpu_bytes_per_worker == HAND_BF16
    fixed_device = RESIDENT + PARAMS_7B * 2 + 2 * GB  # by hand: sources, working model, CUDA
    fixed_host = PARAMS_7B * 2 + 2 * GB
    assert choose_residency("auto", device, host, 80 * GB) == ("device", None)
    assert choose_residency("auto", device, host, 76 * GB) == ("host", None)
    assert choose_residency("device", device, host, 76 * GB) == ("device", None)
    assert choose_residency("device", device, host, 40 * GB) == ("device", fixed_device)
    assert choose_residency("auto", device, host, 16 * GB) == ("host", fixed_host)
    fp32 = (plan("device", "float32"), plan("host", "float32"))
    assert choose_residency("auto", *fp32, 80 * GB) == ("host", None)
    with pytest.raises(ConfigError, match="residency 'disk' is not auto, device or host"):
        choose_residency("disk", device, host, 80 * GB)


def test_a_method_with_more_merge_temporaries_plans_a_larger_merge(family_7b, tmp_path):
    """RAM with 4 sources declares 6 + 4 x 4 = 22 copies of the largest tensor: its merge term
    is (22 + 1) x T x 4, TIES's the documented 4 x T x 4."""
    from evomerge.memory import plan_study_memory, study_memory_inputs
    from evomerge.merge.registry import get_method
    from evomerge.study.config import load_study_config

    models = dict(family_7b)
    for name in ("code", "chat"):
        models[name] = _header_only_model(tmp_path / name)
    spaces = {
        "ties": {"weight": {"bounds": [0.0, 1.0], "scope": ["source"]}},
        "ram": {"epsilon": {"bounds": [1e-6, 1e-3], "scope": []}},
    }
    merge = {}
    for method, parameters in spaces.items():
        folder = tmp_path / method
        folder.mkdir()
        data = yaml.safe_load(_tour_study(folder, models).read_text())
        data["sources"] = [str(models[n]) for n in ("hermes", "math", "code", "chat")]
        space = {"name": method, "method": method, "layers": "global", "parameters": parameters}
        data["space"] = space
        (folder / "study.yaml").write_text(yaml.safe_dump(data))
        config = load_study_config(folder / "study.yaml")
        inputs = study_memory_inputs(config)
        merge[method] = plan_study_memory(config, 80 * GB, inputs=inputs).components
    largest = 32_000 * 4_096
    ties = next(c for c in merge["ties"] if c.name == "merge")
    ram = next(c for c in merge["ram"] if c.name == "merge")
    assert ties.bytes == MERGE == memory.MERGE_TEMPORARY_TENSORS * largest * 4
    declared = get_method("ram").peak_temporaries(4)
    assert declared == 22.0
    assert ram.bytes == math.ceil((declared + 1) * largest * 4)
    assert ram.bytes - ties.bytes == (declared + 1 - memory.MERGE_TEMPORARY_TENSORS) * largest * 4
    assert "(22 + 1) x T x 4 (ram, 4 sources)" in ram.formula
