"""The GPU check (``scripts/gpu_check.sh`` running ``scripts/gpu_check.py``): on a CPU with a tiny
family, its report's structure and checks, and the pass/fail logic on made-up GPU numbers; the full
check where a GPU is (``test_gpu_check_on_cuda``)."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import assert_shell_clean

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
BIN = Path(sys.executable).parent


@functools.cache
def load_script():  # type: ignore[no-untyped-def]
    """scripts/gpu_check.py as a module (its dataclasses need it in sys.modules)."""
    spec = importlib.util.spec_from_file_location("gpu_check_script", SCRIPTS / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def run_check(tmp_path: Path, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """``bash scripts/gpu_check.sh ARGS`` with this interpreter (its packages: no .gpu_deps)."""
    (tmp_path / "deps").mkdir(exist_ok=True)
    env = {
        **os.environ,
        "OUT": str(tmp_path / "out"),
        "PYTHON": sys.executable,
        "GPU_DEPS": str(tmp_path / "deps"),
    }
    return subprocess.run(
        ["bash", str(SCRIPTS / "gpu_check.sh"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=tmp_path,
    )


def test_gpu_check_on_cpu_builds_scores_exports_and_verifies(tmp_path: Path) -> None:
    work = tmp_path / "work"
    done = run_check(
        tmp_path, "--device", "cpu", "--tiny", "--candidates", "3", "--workdir", str(work),
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = tmp_path / "out"
    log = (out / "gpu_check.log").read_text()
    assert "== gpu_check.py" in log and "PASS export_verified" in log, log[-2000:]
    report = json.loads((out / "gpu_check.json").read_text())

    assert report["environment"]["device"] == "cpu"
    assert report["command"] == "bash scripts/gpu_check.sh --device cpu --tiny --candidates 3 " + (
        f"--workdir {work}"
    )
    family = report["family"]
    assert family["shape"]["layers"] == 2 and family["stored_dtype"] == "bfloat16"
    for path in family["paths"].values():  # --workdir keeps the family
        config = json.loads((Path(path) / "config.json").read_text())
        assert config["dtype"] == "bfloat16" and config["vocab_size"] == 384
    assert sorted(family["paths"]) == ["base", "ft_0", "ft_1"]

    candidates = report["worker"]["candidates"]
    assert [c["status"] for c in candidates] == ["complete"] * 3
    for candidate in candidates:
        assert candidate["merge_ms"] > 0 and candidate["eval_seconds"] > 0
        assert {"merge_math", "copy", "transfer", "evaluation"} <= set(candidate["timings"])
        assert candidate["scored_with"] == "bfloat16 on cpu"
        assert {"toy_facts/acc", "toy_heldout/perplexity"} <= set(candidate["metrics"])
        assert candidate["requests_per_second"] > 0
    # Each candidate was built into the model anew: three recipes, three perplexities.
    assert len({c["metrics"]["toy_heldout/perplexity"] for c in candidates}) == 3
    throughput = {t["evaluator"]: t for t in report["worker"]["throughput"]}
    assert throughput["lm_eval:toy_facts"]["requests"] == 3 * report["limit"]
    assert throughput["perplexity:toy_heldout"]["tokens_per_second"] > 0

    export = report["export"]
    assert export["candidate"] == 2 and export["devices"] == ["cpu", "cpu"]
    assert export["comparison"]["identical"] and export["comparison"]["tensors"] == 21
    verification = export["verification"]
    assert verification["within_tolerance"] and verification["exactly_equal"]
    assert verification["measured"] == candidates[2]["metrics"]

    assert report["memory"]["peak"] is None  # no GPU
    estimate = report["memory"]["estimate"]
    assert estimate["where"] == "host" and estimate["bytes"] > 0, estimate
    statuses = {name: check["status"] for name, check in report["checks"].items()}
    assert statuses == {
        "candidates": "pass",
        "export_identical": "pass",
        "export_verified": "pass",
        "peak_within_estimate": "skip",
        "wall_time": "skip",
    }
    text = (out / "gpu_check.md").read_text()
    assert text.startswith("## GPU check (CPU")
    assert "| in-place build per candidate | median" in text
    assert "- **PASS** export_identical:" in text

    # The same numbers as a GPU run would give them: the section shows the GPU's rows.
    gpu_check = load_script()
    name = "NVIDIA H100 80GB HBM3"
    report["environment"].update(device="cuda", device_name=name, gpu=name, cuda="13.0")
    gib = 2**30
    report["memory"]["peak"] = {
        "peak_allocated": 10 * gib,
        "peak_reserved": 11 * gib,
        "device_used": 12 * gib,
        "device_total": 80 * gib,
    }
    report["memory"]["estimate"].update(bytes=12 * gib, where="gpu")
    worker = report["worker"]
    report["bandwidth_floor"] = gpu_check.bandwidth_floor(
        worker["resident_bytes"], worker["working_bytes"], name
    )
    report["summary"] = gpu_check.summarize(report)
    report["checks"] = gpu_check.evaluate_checks(report)
    text = gpu_check.markdown(report)
    assert text.startswith(f"## GPU check ({name})")
    assert (
        "| peak GPU memory, worker load + candidates | allocated 10.00 GiB, reserved 11.00" in text
    )
    assert "at 3.35 TB/s); measured median / floor = " in text
    assert "- **PASS** peak_within_estimate: (d) peak reserved 11.00 GiB <= estimate 12.00" in text
    assert "- **PASS** wall_time:" in text


def gpu_report(**memory: int) -> dict:
    """A report as a GPU run leaves it, with the given peak and estimate bytes."""
    peak = {"peak_allocated": memory["allocated"], "peak_reserved": memory["reserved"]}
    return {
        "environment": {"device": "cuda", "device_name": "NVIDIA H100 80GB HBM3"},
        "memory": {"peak": peak, "estimate": {"bytes": memory["estimate"], "where": "gpu"}},
        "wall_seconds": memory.get("wall", 200.0),
    }


def test_checks_on_gpu_numbers_compare_the_peak_with_the_estimate_and_the_wall_time() -> None:
    gpu_check = load_script()
    gib = 2**30

    def status(**memory: int) -> dict[str, str]:
        checks = gpu_check.evaluate_checks(gpu_report(**memory))
        return {name: check["status"] for name, check in checks.items()}

    fits = status(allocated=10 * gib, reserved=11 * gib, estimate=12 * gib)
    assert fits == {"peak_within_estimate": "pass", "wall_time": "pass"}
    # reserved beyond the estimate; an estimate over twice the peak; too slow
    assert (
        status(allocated=10 * gib, reserved=13 * gib, estimate=12 * gib)["peak_within_estimate"]
        == "fail"
    )
    assert (
        status(allocated=5 * gib, reserved=6 * gib, estimate=11 * gib)["peak_within_estimate"]
        == "fail"
    )
    assert status(allocated=1, reserved=1, estimate=1, wall=400)["wall_time"] == "fail"
    report = gpu_report(allocated=1, reserved=1, estimate=1)
    report["memory"]["estimate"] = {"error": "ImportError: no evomerge.memory"}
    assert gpu_check.evaluate_checks(report)["peak_within_estimate"]["status"] == "fail"


def test_bandwidth_floor_by_gpu_name() -> None:
    gpu_check = load_script()
    assert gpu_check.peak_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert gpu_check.peak_bandwidth("NVIDIA H100 PCIe") == 2.0e12
    assert gpu_check.peak_bandwidth("NVIDIA H200") == 4.8e12
    assert gpu_check.peak_bandwidth("NVIDIA A100-SXM4-80GB") == 2.0e12
    assert gpu_check.peak_bandwidth("NVIDIA L4") is None
    floor = gpu_check.bandwidth_floor(6 * 10**9, 2 * 10**9, "NVIDIA H200")
    assert floor["floor_ms"] == pytest.approx(8e9 / 4.8e12 * 1000)
    assert gpu_check.bandwidth_floor(1, 1, None)["floor_ms"] is None


def test_a_failed_step_still_writes_the_report_and_exits_1(tmp_path: Path, monkeypatch) -> None:
    gpu_check = load_script()

    def broken(args, workdir, report):  # type: ignore[no-untyped-def]
        report["environment"] = {"device": "cpu", "device_name": "CPU"}
        raise RuntimeError("the family could not be built")

    monkeypatch.setattr(gpu_check, "run", broken)
    code = gpu_check.main(["--device", "cpu", "--tiny", "--out", str(tmp_path)])
    assert code == 1
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["error"]["message"] == "RuntimeError: the family could not be built"
    assert report["checks"]["no_error"]["status"] == "fail"
    assert (
        "- **FAIL** no_error: the check stopped: RuntimeError"
        in (tmp_path / "gpu_check.md").read_text()
    )


@pytest.mark.parametrize("name", ["gpu_check", "gpu_deps"])
def test_scripts_are_clean(name: str) -> None:
    assert_shell_clean(SCRIPTS / f"{name}.sh")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_check_on_cuda(tmp_path: Path) -> None:
    """The full check: ~1.1 B parameters, 20 candidates, within 6 minutes, every check passed."""
    done = run_check(tmp_path, timeout=420)
    out = tmp_path / "out"
    report = json.loads((out / "gpu_check.json").read_text())
    failed = {n: c["detail"] for n, c in report["checks"].items() if c["status"] != "pass"}
    assert done.returncode == 0 and not failed, (failed, done.stdout[-3000:])
    assert len(report["worker"]["candidates"]) == 20
    assert report["family"]["parameters"] > 1.0e9
    assert report["export"]["devices"] == ["cuda", "cpu"]
