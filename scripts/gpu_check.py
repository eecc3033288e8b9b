#!/usr/bin/env python
"""A GPU check of a worker's own path, in one process, without Ray (``scripts/gpu_check.sh``).

Steps (each timed; every number lands in ``OUT/gpu_check.json``, and ``OUT/gpu_check.md`` is a
ready "GPU check" section for BENCHMARKS.md):

a) **Family.** A Llama-shaped base (about 1.1 B parameters: hidden 2048, intermediate 5632, 22
   layers, 32 heads, 4 key/value heads, vocabulary 32000, untied embeddings, stored in bfloat16)
   is initialised at random directly on the device, and two "fine-tunes" are the base plus
   seeded small random deltas; each is saved as a Hugging Face folder (safetensors, a word-level
   tokenizer whose vocabulary holds the bundled toy_facts tasks' tokens, padded with filler
   words). ``--tiny`` builds a small family of the same shape for a CPU test.
b) **Worker.** A :class:`~evomerge.cluster.worker.MergeWorker` (no Ray) holds the family on the
   device and scores ``--candidates`` DARE-TIES recipes, decoded from seeded random genomes of a
   ready search space, with the bundled lm-eval toy_facts tasks and a perplexity evaluator: each
   candidate is built in place (bfloat16) and scored. Per candidate: the in-place build in ms
   and its phases, the evaluation seconds, requests per second, the metrics.
c) **Export.** One candidate (the third) is exported with ``merge_to_folder`` on the device and
   on the CPU; every tensor of the two folders must be bit-identical, and the device's export,
   scored with ``score_folder`` as ``evomerge export --verify`` does, must score what the worker
   scored (within ``evomerge.evaluate.suite.TOLERANCE``; exact equality is reported too).
d) **Numbers.** Peak GPU memory (allocated and reserved, while the worker loads and scores)
   against the plan of :mod:`evomerge.memory` (what ``evomerge check`` estimates); the
   in-place build against the HBM bandwidth floor (bytes of the base and sources read plus the
   working model written, over the GPU's peak bandwidth); evaluation throughput.
e) **Report.** The JSON and the markdown section; the exit status is 1 when a check failed
   (after both files are written), 0 otherwise.

Checks: the export on the device and on the CPU are bit-identical; the export verifies; on a GPU,
the measured peak is within the estimate (reserved <= estimate <= 2 x allocated) and the whole
run took under 6 minutes.

    python scripts/gpu_check.py --device cuda --out gpu_check_out        # what gpu_check.sh runs
    python scripts/gpu_check.py --device cpu --tiny --candidates 3 --out /tmp/gc   # a CPU test
"""

from __future__ import annotations

import time

START = time.perf_counter()

import argparse  # noqa: E402  (START first: the wall time includes the imports)
import contextlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a file: evomerge from this checkout
    sys.path.insert(0, str(REPO))

WALL_LIMIT_SECONDS = 360.0
"""A GPU run must finish within 6 minutes (gpu_check.sh stops it at 330 s)."""
EXPORTED_CANDIDATE = 2
"""The candidate exported in step (c): the third."""
SPACE = "dare_ties_per_layer"
WORKING_DTYPE = "bfloat16"
DELTA_SCALE = 0.002
"""Standard deviation of a fine-tune's random delta (times its number, 1 and 2), against the
base's weights of standard deviation 0.02."""


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    context: int


FULL = Shape(
    hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000, context=2048
)
TINY = Shape(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=384, context=128)


def peak_bandwidth(device_name: str) -> float | None:
    """The GPU's peak memory bandwidth in bytes/s, by its name; None when not in the table."""
    name = device_name.upper()
    if "H200" in name:
        return 4.8e12
    if "H100" in name:
        if "NVL" in name:
            return None
        return 2.0e12 if "PCIE" in name else 3.35e12  # SXM (the "80GB HBM3" part)
    if "A100" in name and "80GB" in name:
        return 2.0e12
    return None


def log(message: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f} s] {message}", flush=True)


def gib(value: float | None) -> str:
    return "?" if value is None else f"{value / 2**30:.2f} GiB"


# -- (a) the family ------------------------------------------------------------------------------


def family_words(vocab_size: int) -> list[str]:
    """The toy_facts tasks' words (``=``, keys, values) then filler words: ``vocab_size`` tokens
    with the tokenizer's special tokens."""
    from evomerge.random_family import SPECIAL_TOKENS
    from evomerge.toy_zoo import vocabulary

    words = vocabulary()
    filler = vocab_size - len(SPECIAL_TOKENS) - len(words)
    if filler < 0:
        raise ValueError(f"a vocabulary of {vocab_size} cannot hold the {len(words)} toy words")
    return words + [f"w{i}" for i in range(filler)]


def build_family(
    folder: Path, device: str, shape: Shape, seed: int, sources: int = 2
) -> dict[str, Any]:
    """Write ``base`` and ``ft_0 .. ft_{n-1}`` under ``folder``, initialised on ``device``."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from evomerge.random_family import build_tokenizer

    start = time.perf_counter()
    tokenizer = build_tokenizer(family_words(shape.vocab))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=shape.context,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.device(device):  # initialised where it lives: seconds on a GPU, not minutes
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).to(device)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, param in params.items():
            param.normal_(0.0, 0.02, generator=generator)
            if "norm" in name:  # norms near 1, not exactly 1: merges of norms are not trivial
                param.mul_(5.0).add_(1.0)
    init_seconds = time.perf_counter() - start
    paths = {"base": _save(model, tokenizer, folder / "base")}
    base = {name: param.detach().clone() for name, param in params.items()}
    for index in range(sources):
        with torch.no_grad():
            for name, param in params.items():
                param.normal_(0.0, DELTA_SCALE * (index + 1), generator=generator)
                param.add_(base[name])
        paths[f"ft_{index}"] = _save(model, tokenizer, folder / f"ft_{index}")
    count = sum(p.numel() for p in params.values())
    del model, params, base
    _free(device)
    return {
        "paths": {name: str(path) for name, path in paths.items()},
        "parameters": count,
        "stored_dtype": "bfloat16",
        "bytes_per_model": _folder_weight_bytes(paths["base"]),
        "shape": asdict(shape),
        "vocab_size": len(tokenizer),
        "init_seconds": init_seconds,
        "seconds": time.perf_counter() - start,
    }


def _save(model: Any, tokenizer: Any, path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _folder_weight_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def _free(device: str) -> None:
    import gc

    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# -- (b) the worker ------------------------------------------------------------------------------


def evaluator_configs() -> list[dict[str, Any]]:
    """The bundled toy_facts tasks (lm-eval) and the toy held-out text's perplexity."""
    return [
        {"kind": "lm_eval", "tasks": ["toy_facts"], "batch_size": 64},
        {
            "kind": "perplexity",
            "file": str(REPO / "evaluators" / "text" / "toy_facts_heldout.txt"),
            "name": "toy_heldout",
            "max_length": 64,
            "stride": 32,
            "batch_size": 16,
        },
    ]


def candidate_recipes(
    base: str, sources: list[str], count: int, seed: int
) -> tuple[list[dict[str, Any]], int]:
    """``count`` recipes of the ready DARE-TIES space from seeded random genomes, and the
    genome's length."""
    import numpy as np

    from evomerge.checkpoint import ModelFolder, source_labels
    from evomerge.space import space_from_setting

    folder = ModelFolder(base)
    try:
        bound = space_from_setting(SPACE).bind(folder, source_labels(sources))
    finally:
        folder.close()
    rng = np.random.default_rng(seed)
    recipes = [
        bound.decode(rng.random(bound.dimension), base, sources).model_dump(exclude_defaults=True)
        for _ in range(count)
    ]
    return recipes, bound.dimension


def gpu_memory(device: str) -> dict[str, int] | None:
    import torch

    if not device.startswith("cuda"):
        return None
    free, total = torch.cuda.mem_get_info()
    return {
        "allocated": torch.cuda.memory_allocated(),
        "reserved": torch.cuda.memory_reserved(),
        "peak_allocated": torch.cuda.max_memory_allocated(),
        "peak_reserved": torch.cuda.max_memory_reserved(),
        "device_used": total - free,
        "device_total": total,
    }


def run_worker(
    family: dict[str, Any],
    device: str,
    evaluators: list[dict[str, Any]],
    recipes: list[dict[str, Any]],
    limit: int,
    residency: str,
    threads: int,
) -> dict[str, Any]:
    """Load a worker, score every recipe, then time each evaluator alone (throughput)."""
    import torch

    from evomerge.cluster.worker import CandidateTask, MergeWorker, WorkerSpec

    paths = family["paths"]
    sources = [paths[name] for name in sorted(paths) if name != "base"]
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    spec = WorkerSpec(
        base=paths["base"],
        sources=sources,
        evaluators=evaluators,
        device=device,
        working_dtype=WORKING_DTYPE,
        residency=residency,  # type: ignore[arg-type]
        torch_threads=threads,
    )
    worker = MergeWorker(spec, "gpu-check")
    info = worker.info()
    memory_loaded = gpu_memory(device)
    log(
        f"worker loaded in {worker.load_seconds:.1f} s: residency {info['residency']}, "
        f"resident {gib(info['resident_bytes'])}"
    )
    candidates = []
    for key, recipe in enumerate(recipes):
        result = worker.run(CandidateTask(key=key, recipe=recipe, limit=limit))
        timings = dict(result.timings)
        entry = {
            "key": key,
            "status": result.status,
            "error": result.error,
            "merge_ms": result.merge_seconds * 1000,
            "merge_math_ms": _ms(timings.get("merge_math")),
            "transfer_ms": _ms(timings.get("transfer")),
            "copy_ms": _ms(timings.get("copy")),
            "eval_seconds": result.eval_seconds,
            "timings": timings,
            "scored_with": result.scored_with,
            "metrics": result.metrics,
        }
        candidates.append(entry)
        log(
            f"candidate {key}: {result.status}, build {entry['merge_ms']:.0f} ms, evaluation "
            f"{result.eval_seconds:.2f} s" + (f" ({result.error})" if result.error else "")
        )
    memory_scored = gpu_memory(device)
    throughput = []
    for name, evaluator in zip(worker.suite.names, worker.suite.evaluators, strict=True):
        _sync(device)
        start = time.perf_counter()
        alone = evaluator.evaluate(limit)
        _sync(device)
        seconds = time.perf_counter() - start
        details = dict(alone.details or {})
        docs = details.get("docs")
        requests = sum(docs.values()) if isinstance(docs, dict) else details.get("windows", 0)
        entry = {
            "evaluator": name,
            "seconds": seconds,
            "requests": requests,
            "requests_per_second": requests / seconds if seconds > 0 else None,
            "details": details,
        }
        if "tokens" in details:
            entry["tokens_per_second"] = details["tokens"] / seconds if seconds > 0 else None
        throughput.append(entry)
    requests = sum(t["requests"] for t in throughput)
    for entry in candidates:
        seconds = entry["eval_seconds"]
        entry["requests"] = requests
        entry["requests_per_second"] = requests / seconds if seconds > 0 else None
    for evaluator in worker.suite.evaluators:
        evaluator.close()
    worker_bytes = {
        "resident_bytes": info["resident_bytes"],
        "working_bytes": sum(p.numel() for p in worker.model.parameters())
        * torch.empty((), dtype=worker.dtype).element_size(),
    }
    del worker
    _free(device)
    return {
        "info": info,
        "memory_after_load": memory_loaded,
        "memory_after_candidates": memory_scored,
        "candidates": candidates,
        "throughput": throughput,
        **worker_bytes,
    }


def _ms(seconds: Any) -> float | None:
    return None if seconds is None else float(seconds) * 1000


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


# -- (c) the export ------------------------------------------------------------------------------


def export_candidate(recipe_data: dict[str, Any], device: str, out: Path) -> float:
    """``merge_to_folder`` of one recipe on ``device`` (what ``evomerge export`` runs)."""
    from evomerge.merge.engine import merge_to_folder
    from evomerge.merge.recipe import (
        open_fisher_folders,
        open_recipe_models,
        parse_recipe,
        plan_recipe,
    )

    recipe = parse_recipe(recipe_data, where="exported candidate")
    models = open_recipe_models(recipe)
    plan = plan_recipe(recipe, models, open_fisher_folders(recipe))
    _sync(device)
    start = time.perf_counter()
    merge_to_folder(plan, out, models=models, device=device)
    _sync(device)
    return time.perf_counter() - start


def compare_folders(a: Path, b: Path) -> dict[str, Any]:
    """Every tensor of two checkpoint folders, compared bit for bit (dtype, shape, values)."""
    import torch
    from safetensors.torch import load_file

    def tensors(folder: Path) -> dict[str, torch.Tensor]:
        found: dict[str, torch.Tensor] = {}
        for file in sorted(folder.glob("*.safetensors")):
            found.update(load_file(file))
        return found

    left, right = tensors(a), tensors(b)
    names = sorted(set(left) | set(right))
    different: list[str] = []
    max_abs = 0.0
    for name in names:
        x, y = left.get(name), right.get(name)
        if x is None or y is None or x.dtype != y.dtype or x.shape != y.shape:
            different.append(name)
            continue
        if not torch.equal(x, y):
            different.append(name)
            if x.is_floating_point():
                max_abs = max(max_abs, float((x.float() - y.float()).abs().max()))
    return {
        "tensors": len(names),
        "elements": sum(t.numel() for t in left.values()),
        "different": len(different),
        "first_different": different[:5],
        "max_abs_difference": max_abs,
        "identical": not different and bool(names),
    }


def metrics_equal(a: dict[str, float], b: dict[str, float]) -> bool:
    if set(a) != set(b):
        return False
    return all(a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in a)


def max_metric_difference(recorded: dict[str, float], measured: dict[str, float]) -> float | None:
    shared = [k for k in recorded if k in measured]
    diffs = [
        abs(measured[k] - recorded[k])
        for k in shared
        if not (math.isnan(measured[k]) or math.isnan(recorded[k]))
    ]
    return max(diffs) if diffs else None


def verify_export(
    folder: Path, evaluators: list[dict[str, Any]], limit: int, device: str, recorded: dict
) -> dict[str, Any]:
    """Score the exported folder as ``evomerge export --verify`` does (the working dtype, the
    device) and compare with the worker's metrics."""
    from evomerge.evaluate.suite import TOLERANCE, first_mismatch, score_folder

    start = time.perf_counter()
    measured = score_folder(folder, evaluators, limit, device, dtype=WORKING_DTYPE)
    seconds = time.perf_counter() - start
    problem = first_mismatch(recorded, measured)
    return {
        "seconds": seconds,
        "recorded": recorded,
        "measured": measured,
        "exactly_equal": metrics_equal(recorded, measured),
        "max_abs_difference": max_metric_difference(recorded, measured),
        "tolerance": TOLERANCE,
        "within_tolerance": problem is None,
        "mismatch": problem,
    }


# -- (d) memory and bandwidth --------------------------------------------------------------------


def memory_estimate(
    family: dict[str, Any], evaluators: list[dict[str, Any]], device: str, residency: str
) -> dict[str, Any]:
    """The plan of :mod:`evomerge.memory` for this worker (what ``evomerge check`` prints, and
    what a worker with ``residency: auto`` decides by)."""
    from evomerge.memory import memory_inputs, plan_memory

    paths = family["paths"]
    sources = [paths[name] for name in sorted(paths) if name != "base"]
    inputs = memory_inputs(paths["base"], sources, evaluators, device, methods=["dare_ties"])
    plan = plan_memory(
        inputs.models,
        inputs.arch,
        inputs.evaluations,
        device=device,
        working_dtype=WORKING_DTYPE,
        residency=residency,  # type: ignore[arg-type]
        merge_tensors=inputs.merge_tensors,
        merge_label=inputs.merge_label,
    )
    where = "gpu" if device.startswith("cuda") else "host"
    return {
        "bytes": plan.gpu_bytes_per_worker if where == "gpu" else plan.host_bytes_per_worker,
        "where": where,
        "breakdown": plan.breakdown(where),  # type: ignore[arg-type]
        "notes": [*plan.notes, *inputs.notes],
        "plan": plan.to_json(),
    }


def _peak_rss() -> int | None:
    try:
        import resource
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def bandwidth_floor(read_bytes: int, written_bytes: int, device_name: str | None) -> dict[str, Any]:
    """The HBM floor of one in-place build: every input byte read once, the working model
    written once, at the GPU's peak bandwidth."""
    bandwidth = peak_bandwidth(device_name) if device_name else None
    return {
        "read_bytes": read_bytes,
        "written_bytes": written_bytes,
        "bandwidth_bytes_per_second": bandwidth,
        "floor_ms": (read_bytes + written_bytes) / bandwidth * 1000 if bandwidth else None,
    }


# -- (e) the report ------------------------------------------------------------------------------


def environment(device: str) -> dict[str, Any]:
    import torch
    import transformers

    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else None
    return {
        "device": device,
        "device_name": name or f"CPU ({platform.processor() or platform.machine()})",
        "gpu": name,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "lm_eval": _version("lm_eval"),
        "packages": {
            name: _version(name)
            for name in (
                "datasets",
                "pyarrow",
                "pandas",
                "numpy",
                "pydantic",
                "huggingface_hub",
                "tokenizers",
                "safetensors",
                "typing_extensions",
            )
        },
        "unmet_requirements": unmet_requirements(),
        "commit": _commit(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


WORKER_PATH_PACKAGES = (
    "lm_eval",
    "datasets",
    "pydantic",
    "pydantic_core",
    "typing_inspection",
    "sacrebleu",
    "multiprocess",
    "requests",
    "transformers",
    "accelerate",
)
"""Packages the worker path imports, whose own requirements are checked (see
:func:`unmet_requirements`)."""
NOT_IMPORTED = {
    "evaluate",
    "pytablewriter",
    "rouge-score",
    "scikit-learn",
    "sqlitedict",
    "word2number",
    "more-itertools",
    "greenlet",
    "kernels",
    "typer",
}
"""Requirements of those packages that the worker path never imports (gpu_deps.sh leaves them
out)."""


def unmet_requirements() -> list[str]:
    """Each requirement of :data:`WORKER_PATH_PACKAGES` that the packages on sys.path do not
    meet (a missing or too old package on the GPU machine shows here first)."""
    from importlib.metadata import PackageNotFoundError, distribution, version

    from packaging.requirements import Requirement

    unmet = []
    for package in WORKER_PATH_PACKAGES:
        try:
            requires = distribution(package).requires or []
        except PackageNotFoundError:
            unmet.append(f"{package} is not installed")
            continue
        for text in requires:
            need = Requirement(text)
            if need.marker is not None and not need.marker.evaluate({"extra": ""}):
                continue
            if need.name.lower().replace("_", "-") in NOT_IMPORTED:
                continue
            try:
                found = version(need.name)
            except PackageNotFoundError:
                unmet.append(f"{package} needs {need}: not installed")
                continue
            if not need.specifier.contains(found, prereleases=True):
                unmet.append(f"{package} needs {need}: {found} found")
    return unmet


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _commit() -> str:
    try:
        done = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else "unknown"


def check(status: bool | None, detail: str) -> dict[str, str]:
    return {
        "status": "skip" if status is None else ("pass" if status else "fail"),
        "detail": detail,
    }


def evaluate_checks(report: dict[str, Any]) -> dict[str, dict[str, str]]:
    """Pass, fail or skip, with one line each, from the report's numbers."""
    checks: dict[str, dict[str, str]] = {}
    on_gpu = report["environment"]["device"].startswith("cuda")
    worker = report.get("worker")
    if worker is not None:
        done = [c for c in worker["candidates"] if c["status"] == "complete"]
        failed = [f"{c['key']}: {c['error']}" for c in worker["candidates"] if c["error"]]
        checks["candidates"] = check(
            len(done) == len(worker["candidates"]) and bool(done),
            f"{len(done)} of {len(worker['candidates'])} candidates complete"
            + (f"; {failed[0]}" if failed else ""),
        )
    export = report.get("export")
    if export is not None:
        compared = export["comparison"]
        what = f"{export['devices'][0]} vs {export['devices'][1]}"
        checks["export_identical"] = check(
            compared["identical"],
            f"(c) export on {what}: {compared['tensors'] - compared['different']} of "
            f"{compared['tensors']} tensors bit-identical"
            + (
                f" (max |difference| {compared['max_abs_difference']:.3g}, first "
                f"{', '.join(compared['first_different'])})"
                if compared["different"]
                else ""
            ),
        )
        verified = export.get("verification")
    if export is not None and verified is not None:
        diff = verified["max_abs_difference"]
        checks["export_verified"] = check(
            verified["within_tolerance"],
            "(c) the export scores what the worker scored: "
            + ("exactly" if verified["exactly_equal"] else f"max |difference| {diff:.3g}")
            + f" (tolerance {verified['tolerance']:g})"
            + (f"; {verified['mismatch']}" if verified["mismatch"] else ""),
        )
    memory = report.get("memory")
    if memory is not None:
        estimate = memory.get("estimate")
        peak = memory.get("peak")
        if not on_gpu:
            checks["peak_within_estimate"] = check(None, "(d) no GPU: peak memory not measured")
        elif estimate is None or "bytes" not in estimate:
            checks["peak_within_estimate"] = check(
                False, f"(d) no estimate: {(estimate or {}).get('error', 'evomerge.memory')}"
            )
        else:
            est = estimate["bytes"]
            reserved, allocated = peak["peak_reserved"], peak["peak_allocated"]
            ratio = est / allocated if allocated else math.inf
            checks["peak_within_estimate"] = check(
                reserved <= est and ratio <= 2.0,
                f"(d) peak reserved {gib(reserved)} <= estimate {gib(est)} <= 2 x peak "
                f"allocated {gib(allocated)} (estimate / peak allocated = {ratio:.2f}, "
                f"estimate / peak reserved = {est / reserved if reserved else math.inf:.2f})",
            )
    wall = report.get("wall_seconds")
    if wall is not None:
        checks["wall_time"] = check(
            wall < WALL_LIMIT_SECONDS if on_gpu else None,
            f"total wall time {wall:.1f} s"
            + (f" < {WALL_LIMIT_SECONDS:.0f} s" if on_gpu else " (limit checked on a GPU only)"),
        )
    if report.get("error"):
        checks["no_error"] = check(False, f"the check stopped: {report['error']['message']}")
    return checks


def _num(value: float | None, fmt: str = ".1f") -> str:
    return "?" if value is None else f"{value:{fmt}}"


def markdown(report: dict[str, Any]) -> str:
    known = {"python": "?", "torch": "?", "transformers": "?", "lm_eval": "?", "commit": "unknown"}
    env = {**known, "date": "", **report["environment"]}
    lines = [f"## GPU check ({env['device_name']})", ""]
    lines += [
        f"`{report['command']}` on {env['device_name']}, Python {env['python']}, torch "
        f"{env['torch']}"
        + (f" (CUDA {env['cuda']})" if env.get("cuda") else "")
        + f", transformers {env['transformers']}, lm-eval {env['lm_eval']}; commit "
        f"`{env['commit'][:12]}`, {env['date']}. Through the device tool: "
        '`run(command="bash scripts/gpu_check.sh", carry=[".gpu_deps"], timeout_s=420)`, after '
        "`bash scripts/gpu_deps.sh` here.",
        "",
        "| what | measured |",
        "|---|---|",
    ]
    family = report.get("family")
    if family:
        s = family["shape"]
        lines.append(
            f"| family: Llama base + 2 fine-tunes, built on {env['device']} | "
            f"{family['parameters'] / 1e9:.3f} B parameters each (hidden {s['hidden']}, "
            f"{s['layers']} layers, {s['heads']}/{s['kv_heads']} heads, vocabulary "
            f"{family['vocab_size']}), {gib(family['bytes_per_model'])} each in bfloat16; "
            f"built and saved in {family['seconds']:.1f} s |"
        )
    worker = report.get("worker")
    if worker:
        info = worker["info"]
        done = [c for c in worker["candidates"] if c["status"] == "complete"]
        lines.append(
            f"| worker load | {info['load_seconds']:.1f} s (residency {info['residency']}, "
            f"resident {gib(info['resident_bytes'])}, working model "
            f"{gib(worker['working_bytes'])} {info['working_dtype']}) |"
        )
        summary = report.get("summary", {})
        lines.append(
            f"| candidates | {len(worker['candidates'])} DARE-TIES recipes ({SPACE}, "
            f"{report['genes']} genes, random genomes), {len(done)} complete, limit "
            f"{report['limit']} documents per task |"
        )
        lines.append(
            f"| in-place build per candidate | median {_num(summary.get('build_ms_median'))} ms "
            f"(first {_num(summary.get('build_ms_first'))} ms, min "
            f"{_num(summary.get('build_ms_min'))} ms); phases, median: math "
            f"{_num(summary.get('math_ms_median'))} ms, copy "
            f"{_num(summary.get('copy_ms_median'))} ms, transfer "
            f"{_num(summary.get('transfer_ms_median'))} ms |"
        )
        floor = report.get("bandwidth_floor") or {}
        bandwidth = floor.get("bandwidth_bytes_per_second")
        lines.append(
            f"| HBM floor of one build | {_num(floor.get('floor_ms'), '.2f')} ms (read "
            f"{gib(floor.get('read_bytes'))} + write {gib(floor.get('written_bytes'))} at "
            + (f"{bandwidth / 1e12:.2f} TB/s" if bandwidth else "an unknown bandwidth")
            + f"); measured median / floor = {_num(summary.get('build_over_floor'), '.0f')} |"
        )
        lines.append(
            f"| evaluation per candidate | median {_num(summary.get('eval_seconds_median'), '.2f')}"
            f" s, {summary.get('requests_per_candidate', '?')} requests: "
            f"{_num(summary.get('requests_per_second_median'))} requests/s |"
        )
        for entry in worker["throughput"]:
            extra = (
                f", {entry['tokens_per_second']:.0f} tokens/s"
                if entry.get("tokens_per_second")
                else ""
            )
            lines.append(
                f"| throughput, {entry['evaluator']} alone | {entry['requests']} requests in "
                f"{entry['seconds']:.2f} s: {_num(entry['requests_per_second'])} requests/s"
                f"{extra} |"
            )
    export = report.get("export")
    if export:
        verified = export.get("verification")
        lines.append(
            f"| export of candidate {export['candidate']} | {export['seconds'][0]:.1f} s on "
            f"{export['devices'][0]}, {export['seconds'][1]:.1f} s on {export['devices'][1]}"
            + (f"; scored again in {verified['seconds']:.1f} s" if verified else "")
            + " |"
        )
        if verified:
            shown = [k for k in sorted(verified["recorded"]) if k.endswith("/perplexity")]
            lines += [
                f"| {key}, worker / export | {verified['recorded'][key]!r} / "
                f"{verified['measured'].get(key)!r} |"
                for key in shown
            ]
    memory = report.get("memory")
    if memory and memory.get("peak"):
        peak = memory["peak"]
        lines.append(
            f"| peak GPU memory, worker load + candidates | allocated "
            f"{gib(peak['peak_allocated'])}, reserved {gib(peak['peak_reserved'])}; device "
            f"used after the candidates {gib(peak.get('device_used'))} of "
            f"{gib(peak.get('device_total'))} |"
        )
    if memory and memory.get("estimate"):
        estimate = memory["estimate"]
        if "bytes" in estimate:
            lines.append(
                f"| memory estimate (evomerge.memory, {estimate['where']}) | "
                f"{gib(estimate['bytes'])}: {estimate['breakdown']} |"
            )
        else:
            lines.append(f"| memory estimate | unavailable: {estimate.get('error')} |")
    lines.append(f"| total wall time | {_num(report.get('wall_seconds'))} s |")
    lines += [
        "",
        "The family is random: its toy_facts accuracy is near 0 for every candidate, so the "
        "perplexity (compared exactly) is what shows the export is the model the worker scored.",
        "",
        "Checks:",
        "",
    ]
    for name, result in report["checks"].items():
        lines.append(f"- **{result['status'].upper()}** {name}: {result['detail']}")
    return "\n".join(lines) + "\n"


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    worker = report["worker"]
    done = [c for c in worker["candidates"] if c["status"] == "complete"]
    if not done:
        return {}

    def median(key: str) -> float | None:
        values = [c[key] for c in done if c.get(key) is not None]
        return statistics.median(values) if values else None

    builds = [c["merge_ms"] for c in done]
    summary = {
        "build_ms_first": builds[0],
        "build_ms_median": statistics.median(builds),
        "build_ms_min": min(builds),
        "build_ms_median_after_first": statistics.median(builds[1:]) if len(builds) > 1 else None,
        "math_ms_median": median("merge_math_ms"),
        "copy_ms_median": median("copy_ms"),
        "transfer_ms_median": median("transfer_ms"),
        "eval_seconds_median": median("eval_seconds"),
        "requests_per_candidate": done[0].get("requests"),
        "requests_per_second_median": median("requests_per_second"),
    }
    floor = (report.get("bandwidth_floor") or {}).get("floor_ms")
    summary["build_over_floor"] = summary["build_ms_median"] / floor if floor else None
    return summary


# -- the run -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument(
        "--out", default=os.environ.get("OUT") or "gpu_check_out", help="folder for the report"
    )
    parser.add_argument("--tiny", action="store_true", help="a small family (a CPU test)")
    parser.add_argument("--candidates", type=int, default=20)
    parser.add_argument("--limit", type=int, default=None, help="documents per task (20; tiny 4)")
    parser.add_argument("--workdir", default=None, help="where the family goes (a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the workdir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--residency", choices=["auto", "device", "host"], default="auto", help="the worker's"
    )
    args = parser.parse_args(argv)
    if args.candidates <= EXPORTED_CANDIDATE:
        parser.error(f"--candidates must be at least {EXPORTED_CANDIDATE + 1}")
    if args.limit is None:
        args.limit = 4 if args.tiny else 20
    return args


class Stopped(Exception):
    """SIGTERM (``timeout`` in gpu_check.sh): stop, but write what was measured."""


def _stop(signum: int, frame: Any) -> None:
    raise Stopped(f"stopped by signal {signum} (the time limit?)")


def main(argv: list[str] | None = None) -> int:
    import signal

    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _stop)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python scripts/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report: dict[str, Any] = {"command": os.environ.get("GPU_CHECK_COMMAND") or command}
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="evomerge-gpu-check-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        run(args, workdir, report)
    except BaseException as exc:  # keep every number measured so far
        report["error"] = {
            "message": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(),
        }
        log(f"stopped: {type(exc).__name__}: {exc}")
        if isinstance(exc, KeyboardInterrupt):
            raise
    finally:
        report["wall_seconds"] = time.perf_counter() - START
        report.setdefault("environment", {"device": args.device, "device_name": args.device})
        report["checks"] = evaluate_checks(report)
        (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        (out / "gpu_check.md").write_text(markdown(report))
        if not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    failed = [name for name, c in report["checks"].items() if c["status"] == "fail"]
    for name, result in report["checks"].items():
        log(f"{result['status'].upper():4} {name}: {result['detail']}")
    log(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    return 1 if failed else 0


def run(args: argparse.Namespace, workdir: Path, report: dict[str, Any]) -> None:
    import torch

    with contextlib.suppress(ImportError):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda, but torch sees no GPU")
    report["environment"] = environment(device)
    log(f"{report['environment']['device_name']}, torch {torch.__version__}")
    for line in report["environment"]["unmet_requirements"]:
        log(f"warning: {line}")
    threads = max(1, min(16, os.cpu_count() or 1))
    torch.set_num_threads(threads)
    shape = TINY if args.tiny else FULL
    report.update(limit=args.limit, tiny=args.tiny, seed=args.seed, space=SPACE)

    # (a)
    family = build_family(workdir / "family", device, shape, args.seed)
    report["family"] = family
    log(f"family: {family['parameters'] / 1e9:.3f} B parameters x 3 in {family['seconds']:.1f} s")
    paths = family["paths"]
    sources = [paths[name] for name in sorted(paths) if name != "base"]
    evaluators = evaluator_configs()
    report["evaluators"] = evaluators
    recipes, genes = candidate_recipes(paths["base"], sources, args.candidates, args.seed)
    report["genes"] = genes

    # (b)
    worker = run_worker(family, device, evaluators, recipes, args.limit, args.residency, threads)
    report["worker"] = worker
    peak = worker["memory_after_candidates"]
    residency = worker["info"]["residency"]

    # (d) the estimate and the floor (the worker's numbers are in)
    estimate: dict[str, Any]
    try:
        estimate = memory_estimate(family, evaluators, device, residency)
    except Exception as exc:  # report it; the check fails on a GPU
        estimate = {"error": f"{type(exc).__name__}: {exc}"}
    report["memory"] = {
        "peak": peak,
        "estimate": estimate,
        "host_peak_rss_bytes": _peak_rss(),  # the whole process so far (family build included)
    }
    read_bytes = worker["resident_bytes"]
    report["bandwidth_floor"] = bandwidth_floor(
        read_bytes, worker["working_bytes"], report["environment"]["gpu"]
    )
    report["summary"] = summarize(report)

    # (c)
    torch.set_num_threads(threads)  # the worker set its own; a CPU export uses every core
    candidate = worker["candidates"][EXPORTED_CANDIDATE]
    devices = (device, "cpu")
    folders = (workdir / f"export_{device}", workdir / "export_cpu")
    if device == "cpu":
        folders = (workdir / "export_cpu_1", workdir / "export_cpu_2")
    seconds = []
    export_memory = None
    for where, folder in zip(devices, folders, strict=True):
        if where.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        seconds.append(export_candidate(recipes[EXPORTED_CANDIDATE], where, folder))
        if where.startswith("cuda"):
            export_memory = gpu_memory(where)  # the streaming merge's own peak
        log(f"exported candidate {EXPORTED_CANDIDATE} on {where} in {seconds[-1]:.1f} s")
    export: dict[str, Any] = {
        "candidate": EXPORTED_CANDIDATE,
        "devices": list(devices),
        "seconds": seconds,
        "gpu_memory": export_memory,
        "comparison": compare_folders(*folders),
    }
    report["export"] = export
    if candidate["status"] != "complete":
        raise RuntimeError(f"candidate {EXPORTED_CANDIDATE} failed: {candidate['error']}")
    export["verification"] = verify_export(
        folders[0], evaluators, args.limit, device, candidate["metrics"]
    )
    log(f"export verified: {export['verification']['within_tolerance']}")


if __name__ == "__main__":
    sys.exit(main())
