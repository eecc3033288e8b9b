#!/usr/bin/env python
"""Benchmark evomerge's streaming merge against mergekit and against the memory-copy floor.

What it measures
----------------
1. A Llama-shaped float32 model family (a base and two "fine-tunes" = base + small seeded
   noise), at least 1 GB per model, written once as sharded safetensors like a real Hugging
   Face checkpoint (config.json, model.safetensors.index.json, a tokenizer) and cached under
   ``--workdir``. Tensor names and shapes come from ``LlamaForCausalLM`` built on the meta
   device, and the base is loaded once with ``AutoModelForCausalLM.from_pretrained`` to check
   that transformers accepts the folder.
2. The memory-copy floor: the bandwidth of ``dst.copy_(src)`` on a 512 MiB float32 buffer
   (best of N, in bytes copied per second), and for each merge
   ``floor = (bytes read + bytes written) / bandwidth``, where bytes read is the size of the
   input models the method reads and bytes written the size of the output. No real merge can
   beat it: every input byte has to come out of the page cache and every output byte go in.
3. For each method, one mergekit YAML (``models:`` form, absolute paths, ``dtype: float32``)
   merged by
     a) ``evomerge merge cfg.yaml out --force --quiet`` and
     b) ``mergekit-yaml cfg.yaml out`` (default options, CPU; ``--mergekit-args`` adds some),
   each as a subprocess timed by wall clock (imports included), with its peak RSS from
   ``wait4``. Every tool runs once to warm the page cache, then ``--repeats`` times (the two
   tools alternate); the median and the min-max spread are reported. Separately, a worker
   subprocess reports the in-process time of ``merge_to_folder`` alone (plan already built,
   interpreter warm). Before every run, untimed, the output folder is deleted and ``sync``
   flushes dirty pages, so that no run pays for an earlier run's writeback.
   After timing, a few tensors of both outputs are compared (max |evomerge - mergekit|).
4. A markdown table, the machine and the exact command; ``--write`` puts it into
   BENCHMARKS.md between two ``<!-- bench_merge -->`` markers (other sections are kept).

The page cache is never dropped: all numbers are warm-cache numbers. Other processes on the
machine add noise; the load average before and after the run is printed with the results.

Example::

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_merge.py --repeats 3 --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

MARKER = "<!-- bench_merge -->"
ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
GB = 1e9
MiB = 2**20

# method -> (models read, in order; extra YAML keys). "base" is the base_model when the
# method uses one.
METHODS: dict[str, dict] = {
    "linear": {
        "models": [("ft_0", {"weight": 0.5}), ("ft_1", {"weight": 0.5})],
        "base": None,
        "parameters": None,
    },
    "slerp": {
        "models": [("base", None), ("ft_0", None)],
        "base": "base",
        "parameters": {"t": 0.3},
    },
    "task_arithmetic": {
        "models": [("base", None), ("ft_0", {"weight": 0.6}), ("ft_1", {"weight": 0.4})],
        "base": "base",
        "parameters": None,
    },
    "ties": {
        "models": [
            ("base", None),
            ("ft_0", {"weight": 0.6, "density": 0.5}),
            ("ft_1", {"weight": 0.4, "density": 0.5}),
        ],
        "base": "base",
        "parameters": None,
    },
    "dare_ties": {
        "models": [
            ("base", None),
            ("ft_0", {"weight": 0.6, "density": 0.5}),
            ("ft_1", {"weight": 0.4, "density": 0.5}),
        ],
        "base": "base",
        "parameters": None,
    },
}
TWO_SOURCES = [("base", None), ("ft_0", None), ("ft_1", None)]
METHODS.update(
    {
        "nuslerp": {
            "models": [("base", None), ("ft_0", {"weight": 0.4}), ("ft_1", {"weight": 0.6})],
            "base": "base",
            "parameters": None,
        },
        "multislerp": {
            "models": [("base", None), ("ft_0", {"weight": 0.5}), ("ft_1", {"weight": 0.5})],
            "base": "base",
            "parameters": None,
        },
        "karcher": {"models": [("ft_0", None), ("ft_1", None)], "base": None, "parameters": None},
        "nearswap": {
            "models": [("base", None), ("ft_0", None)],
            "base": "base",
            "parameters": {"t": 0.001},
        },
        "sce": {"models": TWO_SOURCES, "base": "base", "parameters": {"select_topk": 0.5}},
        "ram": {"models": TWO_SOURCES, "base": "base", "parameters": None},
        "ramplus_tl": {"models": TWO_SOURCES, "base": "base", "parameters": None},
        "arcee_fusion": {
            "models": [("base", None), ("ft_0", None)],
            "base": "base",
            "parameters": None,
        },
        # evomerge only (no mergekit form): run with --tools evomerge
        "tsv": {"models": TWO_SOURCES, "base": "base", "parameters": None},
        "iso_c": {"models": TWO_SOURCES, "base": "base", "parameters": None},
        "iso_cts": {"models": TWO_SOURCES, "base": "base", "parameters": None},
    }
)
EVOMERGE_ONLY = {"tsv", "iso_c", "iso_cts"}
# Outputs compared with mergekit's. arcee_fusion is left out: mergekit estimates its quantiles
# from a random sample on tensors over 1M entries, evomerge computes them exactly.
DETERMINISTIC = {
    "linear", "slerp", "task_arithmetic", "ties",
    "nuslerp", "multislerp", "karcher", "nearswap", "sce", "ram", "ramplus_tl",
}  # fmt: skip
SLOW = {"ties", "dare_ties", "sce"}  # dominated by sorting/masking; see --slow-repeats


# -- the model family ----------------------------------------------------------------------


def family_spec(args: argparse.Namespace) -> dict:
    return {
        "version": 1,
        "layers": args.layers,
        "hidden": args.hidden,
        "intermediate": args.intermediate,
        "heads": args.heads,
        "kv_heads": args.kv_heads,
        "vocab": args.vocab,
        "shard_bytes": args.input_shard_size,
        "delta_scale": args.delta_scale,
        "seed": 0,
    }


def llama_config(spec: dict):  # type: ignore[no-untyped-def]
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=spec["vocab"],
        hidden_size=spec["hidden"],
        intermediate_size=spec["intermediate"],
        num_hidden_layers=spec["layers"],
        num_attention_heads=spec["heads"],
        num_key_value_heads=spec["kv_heads"],
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
        architectures=["LlamaForCausalLM"],
        dtype="float32",
    )


def expected_tensors(config) -> list[tuple[str, tuple[int, ...]]]:  # type: ignore[no-untyped-def]
    """Names and shapes of a LlamaForCausalLM's state dict, from a meta-device instance."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return [(name, tuple(t.shape)) for name, t in model.state_dict().items()]


def build_family(workdir: Path, spec: dict, rebuild: bool) -> dict[str, Path]:
    """Write base, ft_0, ft_1 under workdir/family-<hash> once; reuse them afterwards."""
    import hashlib

    tag = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    family = workdir / f"family-{tag}"
    names = ["base", "ft_0", "ft_1"]
    paths = {name: family / name for name in names}
    done = family / "family.json"
    if done.is_file() and not rebuild:
        print(f"reusing the model family in {family}", flush=True)
        return paths
    if family.exists():
        shutil.rmtree(family)
    family.mkdir(parents=True)
    import torch

    from evomerge.random_family import build_tokenizer

    config = llama_config(spec)
    tensors = expected_tensors(config)
    tokenizer = build_tokenizer([f"w{i}" for i in range(spec["vocab"] - 4)])
    assert len(tokenizer) == spec["vocab"], (len(tokenizer), spec["vocab"])
    started = time.perf_counter()
    for model_index, name in enumerate(names):
        out = paths[name]
        tmp = out.with_name(out.name + ".partial")
        tmp.mkdir()
        shard_bytes = 0
        total = 0
        files: list[tuple[str, list[str]]] = []
        pending: list[tuple[str, torch.Tensor]] = []
        for index, (tname, shape) in enumerate(tensors):
            gen = torch.Generator().manual_seed(1000 + index)
            if "norm" in tname:
                tensor = 1 + 0.1 * torch.randn(shape, generator=gen)
            else:
                tensor = torch.randn(shape, generator=gen).mul_(0.02)
            if model_index > 0:  # a fine-tune: base + small seeded noise
                noise_gen = torch.Generator().manual_seed(10_000 * model_index + index)
                tensor.add_(torch.randn(shape, generator=noise_gen), alpha=spec["delta_scale"])
            size = tensor.numel() * 4
            if pending and shard_bytes + size > spec["shard_bytes"]:
                files.append(write_shard(tmp, len(files) + 1, pending))
                pending, shard_bytes = [], 0
            pending.append((tname, tensor))
            shard_bytes += size
            total += size
        files.append(write_shard(tmp, len(files) + 1, pending))
        del pending
        weight_map = {}
        for number, (file, tnames) in enumerate(files, start=1):
            final = f"model-{number:05d}-of-{len(files):05d}.safetensors"
            os.replace(tmp / file, tmp / final)
            weight_map.update(dict.fromkeys(tnames, final))
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps(
                {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
                indent=2,
            )
        )
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, out)
        print(
            f"  wrote {name}: {total / GB:.2f} GB in {len(files)} shards "
            f"({time.perf_counter() - started:.0f} s so far)",
            flush=True,
        )
    check_loads(paths["base"], tensors)
    done.write_text(json.dumps(spec, indent=2))
    return paths


def write_shard(folder: Path, number: int, items: list) -> tuple[str, list[str]]:
    from safetensors.torch import save_file

    file = f"shard-{number:05d}"
    save_file(dict(items), str(folder / file), metadata={"format": "pt"})
    return file, [name for name, _ in items]


def check_loads(path: Path, tensors: list[tuple[str, tuple[int, ...]]]) -> None:
    """transformers must load the folder with no missing or unexpected keys."""
    import torch
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, output_loading_info=True
    )
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise SystemExit(f"transformers does not load {path} cleanly: {problems}")
    state = model.state_dict()
    for name, shape in tensors:
        assert tuple(state[name].shape) == shape, name
    print(
        f"  transformers loads {path.name} cleanly ({type(model).__name__}, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters)",
        flush=True,
    )
    del model, state


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


# -- the floor -----------------------------------------------------------------------------


def copy_bandwidth(mib: int = 512, tries: int = 7) -> float:
    """Bytes copied per second by torch's copy_ between two float32 buffers (best of tries)."""
    import torch

    n = mib * MiB // 4
    src = torch.ones(n, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in
    best = float("inf")
    for _ in range(tries):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    del src, dst
    return n * 4 / best


# -- configs and runs ----------------------------------------------------------------------


def write_config(method: str, paths: dict[str, Path], where: Path) -> tuple[Path, list[str]]:
    import yaml

    entry = METHODS[method]
    models = []
    for name, params in entry["models"]:
        item: dict = {"model": str(paths[name].resolve())}
        if params:
            item["parameters"] = dict(params)
        models.append(item)
    if method in EVOMERGE_ONLY:  # a native recipe: mergekit has no such method
        recipe: dict = {"method": method, "base": str(paths[entry["base"]].resolve())}
        recipe["sources"] = [m for m in models if m["model"] != recipe["base"]]
        recipe["dtype"] = "float32"
        file = where / f"{method}.yaml"
        file.write_text(yaml.safe_dump(recipe, sort_keys=False))
        return file, [name for name, _ in entry["models"]]
    config: dict = {"merge_method": method}
    if entry["base"]:
        config["base_model"] = str(paths[entry["base"]].resolve())
    config["models"] = models
    if entry["parameters"]:
        config["parameters"] = dict(entry["parameters"])
    config["dtype"] = "float32"
    file = where / f"{method}.yaml"
    file.write_text(yaml.safe_dump(config, sort_keys=False))
    return file, [name for name, _ in entry["models"]]


@dataclass
class Runs:
    seconds: list[float] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)  # bytes, ru_maxrss
    anon: list[int] = field(default_factory=list)  # bytes, sampled peak RssAnon

    def median(self) -> float:
        return statistics.median(self.seconds) if self.seconds else float("nan")


def bench_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def _anon_rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def timed_run(command: list[str], out: Path, log: Path) -> tuple[float, int, int]:
    """Run command with the output folder removed first.

    Returns (wall seconds, peak RSS, peak anonymous RSS sampled every 20 ms). The peak RSS
    comes from GNU time's %M (the command's own high-water mark, mmap-ed input pages
    included); without /usr/bin/time it is wait4's ru_maxrss, which on Linux can also include
    this (parent) process's RSS at the fork. The anonymous RSS counts private memory only.
    """
    import threading

    if out.exists():
        shutil.rmtree(out)
    os.sync()  # no dirty pages from earlier runs are left to compete with this one's writes
    peak_anon = [0]
    gnu_time = Path("/usr/bin/time")
    rss_file = log.with_suffix(".rss")
    rss_file.unlink(missing_ok=True)
    if gnu_time.exists():
        command = [str(gnu_time), "-f", "%M", "-o", str(rss_file), *command]
    with log.open("wb") as sink:
        start = time.perf_counter()
        proc = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, env=bench_env(), cwd=out.parent
        )
        done = threading.Event()

        def sample() -> None:
            pid = proc.pid
            while not done.wait(0.02):
                if gnu_time.exists() and pid == proc.pid:
                    try:  # the tool is GNU time's child
                        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text()
                        pid = int(children.split()[0]) if children.split() else pid
                    except (OSError, ValueError):
                        pass
                if pid != proc.pid or not gnu_time.exists():
                    peak_anon[0] = max(peak_anon[0], _anon_rss(pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.perf_counter() - start
        done.set()
        sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"command failed ({proc.returncode}): {shlex.join(command)}\n{tail}")
    peak = usage.ru_maxrss * 1024
    if rss_file.exists():
        peak = int(rss_file.read_text().split()[-1]) * 1024
    return elapsed, peak, peak_anon[0]


def inprocess_worker(config: str, out: str, repeats: int) -> None:
    """(hidden mode) plan once, then time merge_to_folder ``repeats`` times; print JSON."""
    from evomerge.merge.card import model_card
    from evomerge.merge.config_file import plan_from_file
    from evomerge.merge.engine import merge_to_folder

    start = time.perf_counter()
    plan, kind = plan_from_file(config)
    plan_s = time.perf_counter() - start
    card = model_card(plan, Path(config).read_text(), kind)
    times = []
    for _ in range(repeats):
        if Path(out).exists():
            shutil.rmtree(out)
        start = time.perf_counter()
        merge_to_folder(plan, out, force=True, model_card=card)
        times.append(time.perf_counter() - start)
    shutil.rmtree(out, ignore_errors=True)
    print(json.dumps({"plan_s": plan_s, "merge_s": times}))


def compare_outputs(a: Path, b: Path, names: list[str]) -> float:
    """Max |a - b| over a few tensors of two merged folders."""
    from evomerge.checkpoint import ModelFolder

    left, right = ModelFolder(a), ModelFolder(b)
    worst = 0.0
    for name in names:
        x, y = left.read(name), right.read(name)
        worst = max(worst, float((x.double() - y.double()).abs().max()))
        if x.dtype != y.dtype or x.shape != y.shape:
            return float("inf")
    return worst


# -- reporting -----------------------------------------------------------------------------


def machine_line() -> str:
    import torch

    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                ram = f"{int(line.split()[1]) / 2**20:.1f} GiB RAM"
    except OSError:
        pass
    versions = [f"torch {torch.__version__} (intra-op threads {torch.get_num_threads()})"]
    for package in ("transformers", "safetensors", "mergekit", "evomerge"):
        try:
            from importlib.metadata import version

            versions.append(f"{package} {version(package)}")
        except Exception:
            pass
    return (
        f"{os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {ram}, {cpu}, "
        f"Python {platform.python_version()}, " + ", ".join(versions)
    )


def source_state() -> str:
    """The commit and whether evomerge/ had uncommitted changes (the code that was timed)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            text=True,
            capture_output=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "evomerge"],
            cwd=ROOT,
            text=True,
            capture_output=True,
            check=True,
        ).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git)"
    if not dirty:
        return f"commit {head}, clean"
    files = ", ".join(line[3:] for line in dirty[:6]) + (" ..." if len(dirty) > 6 else "")
    return f"commit {head} plus uncommitted changes in {len(dirty)} files ({files})"


def fmt_runs(runs: Runs) -> str:
    if not runs.seconds:
        return "-"
    if len(runs.seconds) == 1:
        return f"{runs.seconds[0]:.2f}"
    return f"{runs.median():.2f} ({min(runs.seconds):.2f}-{max(runs.seconds):.2f})"


def fmt_rss(runs: Runs) -> str:
    return f"{statistics.median(runs.rss) / GB:.2f} GB" if runs.rss else "-"


def render(results: list[dict], context: dict) -> str:
    extra = context["mergekit_args"]
    lines = [
        "## Merge speed: evomerge vs mergekit vs the memory-copy floor",
        "",
        f"Measured {context['date']} by `scripts/bench_merge.py`:",
        "",
        "```",
        context["command"],
        "```",
        "",
        f"- Machine: {context['machine']}.",
        f"- Load average (1 min) before / after: {context['load_before']:.2f} / "
        f"{context['load_after']:.2f}; other processes may have been running.",
        f"- Models: Llama-shaped, float32, {context['family']}; base + 2 fine-tunes "
        f"(base + N(0, {context['delta_scale']}) noise), each {context['model_gb']:.2f} GB in "
        f"{context['input_shards']} safetensors shards; output float32 (`dtype: float32`).",
        f"- Copy bandwidth (`torch` `copy_`, 512 MiB, best of 7): "
        f"{context['bandwidth'] / GB:.2f} GB/s. Floor = (bytes read + bytes written) / bandwidth.",
        "- Times: wall clock of the whole command (subprocess, imports included), median of "
        f"{context['repeats']} runs ({context['slow_repeats']} for ties and dare_ties), "
        "(min-max) in brackets, the two tools alternating. Warm page cache: one warm-up run "
        "per tool first (skipped for ties/dare_ties when an earlier method already read the "
        "same models with both tools); output folder deleted and `sync` run (untimed) before each "
        "run, so no run pays for another's writeback (evomerge fsyncs its output, mergekit "
        "does not). Peak RSS is "
        "GNU time's `%M` (high-water mark, counting the touched pages of mmap-ed inputs); the "
        "second table also gives the peak anonymous (private) RSS sampled every 20 ms.",
        f"- evomerge source: {context['source']}.",
        "- evomerge: `evomerge merge cfg.yaml out --force --quiet`. mergekit: "
        f"`{shlex.join(['mergekit-yaml', 'cfg.yaml', 'out', *shlex.split(extra)])}`"
        f"{'' if extra else ' (default options)'}, CPU.",
        "",
        "| method | evomerge s | mergekit s | speedup | floor s | evomerge/floor "
        "| evomerge peak RSS | mergekit peak RSS |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in results:
        evo, mk = row["evomerge"], row["mergekit"]
        speed = f"{mk.median() / evo.median():.2f}x" if evo.seconds and mk.seconds else "-"
        ratio = f"{evo.median() / row['floor']:.1f}x" if evo.seconds else "-"
        lines.append(
            f"| {row['method']} | {fmt_runs(evo)} | {fmt_runs(mk)} | {speed} | "
            f"{row['floor']:.2f} | {ratio} | {fmt_rss(evo)} | {fmt_rss(mk)} |"
        )
    lines += [
        "",
        "Speedup = mergekit time / evomerge time. Bytes read and written per method, the "
        "in-process time of `merge_to_folder` alone (plan built, interpreter warm; median "
        "(min-max) of the same number of runs), and the largest difference between the two "
        "tools' outputs on a few tensors:",
        "",
        "| method | models read | GB read | GB written | timed runs | evomerge merge_to_folder s "
        "| evomerge CLI overhead s | peak anon RSS evomerge / mergekit "
        "| max abs diff vs mergekit |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results:
        inproc = row["inprocess"]
        overhead = (
            f"{row['evomerge'].median() - inproc.median():.2f}"
            if inproc.seconds and row["evomerge"].seconds
            else "-"
        )
        diff = row.get("diff")
        diff_text = (
            "-"
            if diff is None
            else "random mask (not compared)"
            if diff == "random"
            else f"{diff:.2e}"
        )
        anon = " / ".join(
            f"{statistics.median(r.anon) / GB:.2f} GB" if r.anon else "-"
            for r in (row["evomerge"], row["mergekit"])
        )
        runs = f"{row['repeats']}" + ("" if row["warmed_up"] else " (no warm-up)")
        lines.append(
            f"| {row['method']} | {', '.join(row['read_models'])} | {row['read'] / GB:.2f} | "
            f"{row['written'] / GB:.2f} | {runs} | {fmt_runs(inproc)} | {overhead} | {anon} | "
            f"{diff_text} |"
        )
    targets = []
    for row in results:
        evo, mk = row["evomerge"], row["mergekit"]
        if evo.seconds and mk.seconds:
            ok = mk.median() / evo.median() >= 2
            targets.append(f"{row['method']}: {'meets' if ok else 'misses'} >= 2x vs mergekit")
        if row["method"] in ("linear", "slerp", "task_arithmetic") and evo.seconds:
            ok = evo.median() <= 2 * row["floor"]
            targets.append(f"{row['method']}: {'within' if ok else 'outside'} 2x of the floor")
    if targets:
        lines += [
            "",
            "Project targets (evomerge >= 2x faster than mergekit; within 2x of the "
            "floor for linear, slerp, task_arithmetic): " + "; ".join(targets) + ".",
        ]
    return "\n".join(lines) + "\n"


def write_section(file: Path, section: str) -> None:
    """Replace the text between the first two MARKER lines (or append a marked section)."""
    text = file.read_text() if file.exists() else "# Benchmarks\n"
    block = f"{MARKER}\n{section}{MARKER}\n"
    first = text.find(MARKER)
    second = text.find(MARKER, first + len(MARKER)) if first >= 0 else -1
    if first >= 0 and second >= 0:
        end = second + len(MARKER)
        if text[end : end + 1] == "\n":
            end += 1
        text = text[:first] + block + text[end:]
    else:
        text = text.rstrip("\n") + "\n\n" + block
    file.write_text(text)


# -- main ----------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]?)i?b?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"'{text}' is not a size like 1GB or 500MB")
    power = {"": 0, "k": 1, "m": 2, "g": 3}[match.group(2).lower()]
    return int(float(match.group(1)) * 1000**power)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench_merge.py",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("Example::")[0],
        epilog="Example: HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_merge.py --repeats 3 "
        "--write BENCHMARKS.md",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=ROOT / ".bench",
        help="cache for the model family and scratch outputs (default ./.bench)",
    )
    parser.add_argument(
        "--methods",
        default="linear,slerp,task_arithmetic,ties",
        help="comma-separated, from: "
        + ", ".join(METHODS)
        + " (default: linear,slerp,task_arithmetic,ties)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed runs per tool and method, after one warm-up (default 3)",
    )
    parser.add_argument(
        "--slow-repeats",
        type=int,
        default=1,
        help="timed runs per tool for the slow methods (ties, dare_ties: about "
        "2 minutes a run at the default size) (default 1)",
    )
    parser.add_argument(
        "--always-warm-up",
        action="store_true",
        help="do a warm-up run per tool for every method (by default it is "
        "skipped when an earlier method already read the same models)",
    )
    parser.add_argument(
        "--tools", default="evomerge,mergekit", help="comma-separated subset of evomerge,mergekit"
    )
    parser.add_argument(
        "--mergekit-args",
        default="",
        help="extra options for mergekit-yaml, written with =, e.g. "
        "--mergekit-args=--async-write (default: none)",
    )
    parser.add_argument(
        "--no-inprocess", action="store_true", help="skip the in-process merge_to_folder timing"
    )
    parser.add_argument(
        "--write",
        type=Path,
        metavar="MARKDOWN",
        help="also put the result section into this file (e.g. BENCHMARKS.md)",
    )
    parser.add_argument("--rebuild", action="store_true", help="rebuild the cached model family")
    shape = parser.add_argument_group("model shape (Llama; float32)")
    shape.add_argument("--layers", type=int, default=4)
    shape.add_argument("--hidden", type=int, default=2048)
    shape.add_argument("--intermediate", type=int, default=5632)
    shape.add_argument("--heads", type=int, default=32)
    shape.add_argument("--kv-heads", type=int, default=4)
    shape.add_argument("--vocab", type=int, default=32000)
    shape.add_argument(
        "--delta-scale",
        type=float,
        default=0.002,
        help="std of the fine-tunes' noise (weights have std 0.02)",
    )
    shape.add_argument(
        "--input-shard-size",
        type=parse_size,
        default=parse_size("1GB"),
        help="largest input safetensors shard (default 1GB)",
    )
    parser.add_argument(
        "--inprocess-worker", nargs=3, metavar=("CONFIG", "OUT", "N"), help=argparse.SUPPRESS
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.inprocess_worker:
        config, out, n = args.inprocess_worker
        inprocess_worker(config, out, int(n))
        return 0
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {list(METHODS)}")
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    if not set(tools) <= {"evomerge", "mergekit"} or not tools:
        raise SystemExit("--tools must be a subset of evomerge,mergekit")
    if args.repeats < 1 or args.slow_repeats < 1:
        raise SystemExit("--repeats and --slow-repeats must be at least 1")
    command = "HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_merge.py " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    load_before = os.getloadavg()[0]
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    spec = family_spec(args)
    print("model family:", json.dumps(spec), flush=True)
    paths = build_family(workdir, spec, args.rebuild)
    sizes = {name: folder_bytes(path) for name, path in paths.items()}
    print("measuring copy bandwidth ...", flush=True)
    bandwidth = copy_bandwidth()
    print(f"  {bandwidth / GB:.2f} GB/s", flush=True)
    scratch = workdir / "runs"
    scratch.mkdir(exist_ok=True)
    mk_extra = shlex.split(args.mergekit_args)
    results = []
    cached: set[str] = set()  # models both tools have already read in this run
    for method in methods:
        config, read_models = write_config(method, paths, scratch)
        read = sum(sizes[m] for m in read_models)
        written = sizes["base"]
        row = {
            "method": method,
            "read_models": read_models,
            "read": read,
            "written": written,
            "floor": (read + written) / bandwidth,
            "evomerge": Runs(),
            "mergekit": Runs(),
            "inprocess": Runs(),
        }
        outs = {
            "evomerge": scratch / f"out-evomerge-{method}",
            "mergekit": scratch / f"out-mergekit-{method}",
        }
        commands = {
            "evomerge": [
                str(BIN / "evomerge"),
                "merge",
                str(config),
                str(outs["evomerge"]),
                "--force",
                "--quiet",
            ],
            "mergekit": [str(BIN / "mergekit-yaml"), str(config), str(outs["mergekit"]), *mk_extra],
        }
        print(
            f"{method}: reads {', '.join(read_models)} ({read / GB:.2f} GB), floor "
            f"{row['floor']:.2f} s",
            flush=True,
        )
        repeats = args.slow_repeats if method in SLOW else args.repeats
        method_tools = [t for t in tools if t == "evomerge" or method not in EVOMERGE_ONLY]
        warm = method in SLOW and not args.always_warm_up and set(read_models) <= cached
        row["repeats"], row["warmed_up"] = repeats, not warm
        if warm:
            print(
                "  (no warm-up run: an earlier method read the same models through both tools)",
                flush=True,
            )
        for rep in range(0 if warm else -1, repeats):
            for tool in method_tools:
                seconds, rss, anon = timed_run(
                    commands[tool], outs[tool], scratch / f"{tool}-{method}.log"
                )
                label = "warm-up" if rep < 0 else f"run {rep + 1}"
                print(
                    f"  {tool:8s} {label:7s} {seconds:7.2f} s  peak RSS {rss / GB:.2f} GB "
                    f"(anon {anon / GB:.2f} GB)",
                    flush=True,
                )
                if rep >= 0:
                    row[tool].seconds.append(seconds)
                    row[tool].rss.append(rss)
                    row[tool].anon.append(anon)
        if len(method_tools) == 2:
            cached |= set(read_models)
        if "evomerge" in tools and not args.no_inprocess:
            out = scratch / f"out-inprocess-{method}"
            proc = subprocess.run(
                [
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "--inprocess-worker",
                    str(config),
                    str(out),
                    str(repeats),
                ],
                env=bench_env(),
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode != 0:
                raise SystemExit(f"in-process worker failed:\n{proc.stderr[-3000:]}")
            data = json.loads(proc.stdout.strip().splitlines()[-1])
            row["inprocess"].seconds = data["merge_s"]
            print(
                "  in-process merge_to_folder: "
                + ", ".join(f"{s:.2f}" for s in data["merge_s"])
                + f" s (plan_from_file {data['plan_s']:.2f} s)",
                flush=True,
            )
        if set(method_tools) == {"evomerge", "mergekit"}:
            if method in DETERMINISTIC:
                names = [
                    "model.embed_tokens.weight",
                    "model.layers.0.self_attn.q_proj.weight",
                    f"model.layers.{args.layers - 1}.mlp.down_proj.weight",
                    "model.norm.weight",
                    "lm_head.weight",
                ]
                row["diff"] = compare_outputs(outs["evomerge"], outs["mergekit"], names)
            else:
                row["diff"] = "random"
        for out in outs.values():
            shutil.rmtree(out, ignore_errors=True)
        results.append(row)
    context = {
        "date": time.strftime("%Y-%m-%d"),
        "command": command,
        "machine": machine_line(),
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "family": (
            f"{args.layers} layers, hidden {args.hidden}, intermediate "
            f"{args.intermediate}, {args.heads} heads ({args.kv_heads} KV), vocab "
            f"{args.vocab}"
        ),
        "delta_scale": args.delta_scale,
        "model_gb": sizes["base"] / GB,
        "input_shards": len(list(paths["base"].glob("*.safetensors"))),
        "bandwidth": bandwidth,
        "repeats": args.repeats,
        "slow_repeats": args.slow_repeats,
        "source": source_state(),
        "mergekit_args": args.mergekit_args,
    }
    section = render(results, context)
    print()
    print(section)
    if args.write:
        write_section(args.write, section)
        print(f"wrote the section into {args.write}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
