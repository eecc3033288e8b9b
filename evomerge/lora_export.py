"""A merged checkpoint's delta from its base as a PEFT LoRA adapter (truncated SVD per tensor).

For every 2-D weight of a decoder Linear (the ``attention`` and ``mlp`` kinds of
:func:`~evomerge.merge.tensors.tensor_kind`) whose delta ``merged - base`` (float32) is not zero,
the best rank-``r`` approximation is taken by an exact SVD (``torch.linalg.svd``;
``r = min(RANK, min(shape))``, Eckart-Young) and split evenly: ``B = U_r sqrt(S_r)``,
``A = sqrt(S_r) V_r^T``, so both factors have the same scale (better for fine-tuning on and for
half-precision ranges). The adapter is written with ``lora_alpha = r`` (the largest rank), so
PEFT's scaling ``alpha / r`` is 1; a tensor of lower rank (``rank_pattern``) would be scaled by
``r / r_i`` and has ``sqrt(r_i / r)`` folded into both factors, so ``B @ A * scaling`` is the
approximation everywhere and no ``alpha_pattern`` is needed (evomerge refuses to read one).

Per tensor the report gives the relative Frobenius error ``||delta - B A * scaling|| /
||delta||`` of the factors as stored; per kind its mean and maximum. Tensors that changed but
that a Linear LoRA cannot carry (norms, embeddings, the head, biases, anything else; PEFT's
embedding LoRA is left out because evomerge refuses to read it) are listed with their relative
change ``||delta|| / ||base||``. Tensors read one at a time from the two folders; only the
factors (the adapter's own size) are held.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.errors import EvomergeError
from evomerge.merge.tensors import tensor_kind

if TYPE_CHECKING:
    import torch

ADAPTER_KINDS = ("attention", "mlp")
PEFT_PREFIX = "base_model.model."  # as evomerge.adapters reads it (not imported: it is torch-heavy)
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class TensorError:
    """One tensor of the adapter: its rank and the relative error of ``B @ A`` to its delta."""

    name: str
    kind: str
    shape: tuple[int, ...]
    rank: int
    error: float


@dataclass(frozen=True)
class LeftOut:
    """A tensor that changed but is not in the adapter, with ``||delta|| / ||base||``."""

    name: str
    kind: str
    change: float


@dataclass(frozen=True)
class KindError:
    kind: str
    tensors: int
    mean: float
    max: float


@dataclass(frozen=True)
class LoraReport:
    """What an extracted adapter holds and leaves out."""

    rank: int
    """The rank asked for."""
    tensors: tuple[TensorError, ...]
    left_out: tuple[LeftOut, ...]
    unchanged: int
    """Tensors whose delta is exactly zero (not in the adapter, not listed)."""
    path: str | None = None
    """Where the adapter was written, relative to the export (set by the export)."""

    def by_kind(self) -> list[KindError]:
        kinds: dict[str, list[float]] = {}
        for tensor in self.tensors:
            kinds.setdefault(tensor.kind, []).append(tensor.error)
        return [
            KindError(kind, len(errors), sum(errors) / len(errors), max(errors))
            for kind, errors in sorted(kinds.items())
        ]

    def worst(self) -> KindError | None:
        """The kind with the largest maximum error (None for an empty adapter)."""
        kinds = self.by_kind()
        return max(kinds, key=lambda k: k.max) if kinds else None


@dataclass(frozen=True)
class Factors:
    """``delta ≈ b @ a * scaling`` for one tensor (float32, on the CPU)."""

    a: torch.Tensor
    b: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


Reader = Callable[[str], "torch.Tensor"]


def _reader(source: Any) -> Reader:
    if hasattr(source, "read"):
        return lambda name: source.read(name)
    return lambda name: source[name]


def _names(source: Any) -> list[str]:
    return list(source.tensors) if hasattr(source, "tensors") else list(source)


def is_adapter_tensor(name: str, shape: tuple[int, ...]) -> bool:
    """Whether a Linear LoRA can carry tensor ``name``: a decoder attention/MLP Linear weight."""
    return len(shape) == 2 and name.endswith(".weight") and tensor_kind(name) in ADAPTER_KINDS


def extract_lora(
    base: Any,
    merged: Any,
    rank: int,
    names: Iterable[str] | None = None,
    *,
    device: str = "cpu",
) -> tuple[dict[str, Factors], LoraReport]:
    """Factors per tensor name (the models' names, ``...q_proj.weight``) and the report.

    ``base`` and ``merged`` are readers (``ModelFolder``: ``.read(name)``, ``.tensors``) or
    mappings of tensors; ``names`` defaults to every tensor of ``merged``. The scaling the
    factors assume is ``rank_of_adapter / rank_of_tensor`` (see the module docstring): pass
    the result to :func:`write_peft_adapter` as is.
    """
    import torch

    if rank < 1:
        raise EvomergeError(f"LoRA rank must be at least 1, not {rank}")
    read_base, read_merged = _reader(base), _reader(merged)
    base_names = set(_names(base))
    svds: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    left_out: list[LeftOut] = []
    unchanged = 0
    for name in _names(merged) if names is None else names:
        if name not in base_names:
            raise EvomergeError(f"LoRA export: the base has no tensor {name}")
        new = read_merged(name)
        old = read_base(name)
        if tuple(new.shape) != tuple(old.shape):
            raise EvomergeError(
                f"LoRA export: {name} is {list(new.shape)} merged but {list(old.shape)} in the base"
            )
        if not new.dtype.is_floating_point:
            if not torch.equal(new, old):
                left_out.append(LeftOut(name, tensor_kind(name), math.inf))
            else:
                unchanged += 1
            continue
        delta = new.to(device=device, dtype=torch.float32) - old.to(device, torch.float32)
        del new
        if not bool(delta.any()):
            unchanged += 1
            continue
        if not is_adapter_tensor(name, tuple(delta.shape)):
            norm = float(torch.linalg.vector_norm(old.to(torch.float64)))
            change = float(torch.linalg.vector_norm(delta.to(torch.float64)))
            left_out.append(LeftOut(name, tensor_kind(name), change / norm if norm else math.inf))
            continue
        r = min(rank, *delta.shape)
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        svds[name] = (u[:, :r].cpu(), s[:r].cpu(), vh[:r].cpu(), delta.cpu())
        del u, s, vh
    top = max((s.shape[0] for _, s, _, _ in svds.values()), default=rank)
    factors: dict[str, Factors] = {}
    errors: list[TensorError] = []
    for name, (u, s, vh, delta) in svds.items():
        r = s.shape[0]
        root = torch.sqrt(s * (r / top))  # scaling top/r undone in both factors
        b = (u * root).contiguous()
        a = (root[:, None] * vh).contiguous()
        approx = (b @ a) * (top / r)
        norm = float(torch.linalg.vector_norm(delta.to(torch.float64)))
        error = float(torch.linalg.vector_norm((delta - approx).to(torch.float64)))
        factors[name] = Factors(a=a, b=b)
        errors.append(TensorError(name, tensor_kind(name), tuple(delta.shape), r, error / norm))
    svds.clear()
    report = LoraReport(rank, tuple(errors), tuple(left_out), unchanged)
    return factors, report


def module_name(name: str) -> str:
    """``model.layers.0.self_attn.q_proj.weight`` -> ``model.layers.0.self_attn.q_proj``."""
    return name.removesuffix(".weight")


def peft_keys(name: str) -> tuple[str, str]:
    """The PEFT keys of tensor ``name``'s factors (``base_model.model.X.lora_A.weight``, B)."""
    module = PEFT_PREFIX + module_name(name)
    return f"{module}.lora_A.weight", f"{module}.lora_B.weight"


def write_peft_adapter(
    folder: str | os.PathLike[str],
    factors: Mapping[str, Factors],
    base_model: str,
    all_linear: Iterable[str] = (),
) -> Path:
    """Write ``factors`` as a PEFT LoRA adapter folder (``adapter_config.json``,
    ``adapter_model.safetensors``) in a hidden folder beside ``folder``, then rename it into
    place (``folder`` must not exist). ``all_linear`` names every Linear weight the base has
    of the adapted kinds: when the adapter covers all of those with a leaf name,
    ``target_modules`` names the leaf (``q_proj``), else the modules themselves."""
    from safetensors.torch import save_file

    from evomerge.staging import staging_folder

    if not factors:
        raise EvomergeError("LoRA export: no Linear weight differs from the base; no adapter")
    target = Path(folder).expanduser().resolve()
    if target.exists():
        raise EvomergeError(f"LoRA export: {target} already exists")
    top = max(f.rank for f in factors.values())
    modules = sorted(module_name(n) for n in factors)
    covered: dict[str, bool] = {}
    for name in {*all_linear, *factors}:
        leaf = module_name(name).rsplit(".", 1)[-1]
        covered[leaf] = covered.get(leaf, True) and name in factors
    leaves = {m.rsplit(".", 1)[-1] for m in modules}
    targets = sorted(leaves) if all(covered.get(leaf, False) for leaf in leaves) else modules
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": top,
        "lora_alpha": top,
        "target_modules": targets,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {
            module_name(n): f.rank for n, f in sorted(factors.items()) if f.rank != top
        },
        "alpha_pattern": {},
    }
    weights = {}
    for name, factor in factors.items():
        key_a, key_b = peft_keys(name)
        weights[key_a] = factor.a.contiguous()
        weights[key_b] = factor.b.contiguous()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_folder(target, "lora")
    try:
        staging.mkdir()
        (staging / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        save_file(weights, str(staging / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def export_lora(
    base_path: str | os.PathLike[str],
    merged_path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    rank: int,
    *,
    base_model: str | None = None,
    device: str = "cpu",
) -> LoraReport:
    """The adapter of ``merged_path`` over ``base_path`` at ``out``, streaming tensor by tensor
    from the two folders; its report."""
    from evomerge.checkpoint import ModelFolder

    base = ModelFolder(base_path, label="base")
    merged = ModelFolder(merged_path, label="export")
    try:
        factors, report = extract_lora(base, merged, rank, device=device)
        linear = [n for n, i in base.tensors.items() if is_adapter_tensor(n, tuple(i.shape))]
        write_peft_adapter(out, factors, base_model or str(base.path), linear)
    finally:
        base.close()
        merged.close()
    return report
