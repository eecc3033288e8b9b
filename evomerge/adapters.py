"""PEFT LoRA adapters as merge sources.

An adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) of a base model is
opened as an :class:`AdapterFolder`: a source that looks like the base's :class:`ModelFolder`
with the adapter applied. Every tensor the adapter touches reads as
``base + B @ A * scaling`` (``scaling = lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with
rsLoRA; transposed when ``fan_in_fan_out``), exactly what PEFT's ``merge_and_unload()`` makes;
every other tensor is the base's. So every merge method sees an adapter as one more fine-tune
(its task vector is the exact low-rank delta), and adapters and full fine-tunes mix freely.

The low-rank factors are read once and held (they are small); a full tensor is materialized
only when it is read. :attr:`AdapterFolder.factors` and :attr:`AdapterFolder.base` give a
caller that holds the base's tensors resident what it needs to build the delta itself
(:meth:`AdapterFolder.delta`) without a second copy of the base.

Adapter kinds that cannot be applied exactly this way are refused when the folder is opened,
with one line naming the field: DoRA, trained biases, ``modules_to_save``, ``alpha_pattern``,
embedding LoRA, LoRA biases, layer replication, base-rewriting initializations (PiSSA, OLoRA,
CorDA) and any ``peft_type`` but LORA. Nothing is approximated.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from evomerge.checkpoint import ModelFolder, TensorInfo
from evomerge.errors import CheckpointError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."
PLAN_KEY = "adapter_bases"
"""The :attr:`MergePlan.extra` entry that says which plan models are adapters, and over which
plan model: a tuple of ``(adapter index, base index)`` pairs."""

# adapter_config.json fields that change what the adapter computes in ways this module does
# not reproduce: each is refused unless it has its harmless value.
_REFUSED_UNLESS = {
    "use_dora": (None, False),
    "bias": (None, "none"),
    "lora_bias": (None, False),
    "modules_to_save": (None, []),
    "alpha_pattern": (None, {}),
    "layer_replication": (None, []),
    "target_parameters": (None, []),
    "trainable_token_indices": (None, [], {}),
    "megatron_config": (None,),
    "use_qalora": (None, False),
    "use_bdlora": (None, False),
    "alora_invocation_tokens": (None, []),
    "arrow_config": (None,),
    "kasa_config": (None,),
    "monteclora_config": (None,),
    "velora_config": (None,),
    "lora_ga_config": (None,),
}
# (Fields PEFT added after 0.21 are not known here; they are ignored.)
# Initializations that rewrite the base's weights: the adapter is then relative to a modified
# base, unless it was converted when saved (which PEFT records as init_lora_weights=true).
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def is_adapter_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` looks like a PEFT adapter folder (its config or its weights)."""
    folder = Path(path).expanduser()
    return folder.is_dir() and any(
        (folder / name).is_file() for name in (ADAPTER_CONFIG, *ADAPTER_WEIGHTS)
    )


@dataclass(frozen=True)
class LoraFactors:
    """One adapted tensor: ``delta = B @ A * scaling`` (transposed if ``fan_in_fan_out``)."""

    a: torch.Tensor
    """lora_A, shape (r, in), in its stored dtype."""
    b: torch.Tensor
    """lora_B, shape (out, r), in its stored dtype."""
    scaling: float
    fan_in_fan_out: bool

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        shape = (int(self.b.shape[0]), int(self.a.shape[1]))
        return shape[::-1] if self.fan_in_fan_out else shape

    def delta(self, device: str | torch.device = "cpu") -> torch.Tensor:
        """The exact float32 delta on ``device``."""
        a = self.a.to(device=device, dtype=torch.float32)
        b = self.b.to(device=device, dtype=torch.float32)
        delta = (b @ a) * self.scaling
        return delta.T if self.fan_in_fan_out else delta


class AdapterFolder:
    """A PEFT LoRA adapter folder over ``base``, read like the base's :class:`ModelFolder`.

    ``tensors`` has the base's names and shapes. An adapted tensor reads as float32
    ``base + delta`` and its :class:`TensorInfo` says float32: the merge math is float32, and
    rounding the sum back to a bfloat16/float16 base would bury a delta that is small next to
    the weight (an 8-bit mantissa keeps about 0.4% of it), so the adapter's task vector would no
    longer be the one PEFT applies. The base's stored dtype is :meth:`base_dtype`; a recipe's
    ``dtype`` decides the output's. Unadapted tensors read as the base's, in its dtype.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        base: ModelFolder,
        *,
        label: str | None = None,
        allow_pickle: bool = False,
    ) -> None:
        self.path = Path(path).expanduser().resolve()
        self.label = label or self.path.name
        self.base = base
        self.allow_pickle = allow_pickle
        if not self.path.is_dir():
            raise CheckpointError(f"adapter '{self.label}': {self.path} is not a folder")
        self.adapter_config = self._read_adapter_config()
        self.weights_file = self._weights_file()
        self.factors: dict[str, LoraFactors] = self._read_factors()
        self.tensors: dict[str, TensorInfo] = {
            name: (
                TensorInfo(name, info.shape, torch.float32, self.weights_file)
                if name in self.factors
                else info
            )
            for name, info in base.tensors.items()
        }

    # -- facts, mirrored from the base -----------------------------------------------------
    @property
    def config(self) -> dict[str, Any]:
        return self.base.config

    @property
    def num_layers(self) -> int | None:
        return self.base.num_layers

    @property
    def architecture(self) -> str:
        return self.base.architecture

    def base_dtype(self, name: str) -> torch.dtype:
        """The dtype the base stores tensor ``name`` in."""
        return self.base.tensors[name].dtype

    # -- reading ---------------------------------------------------------------------------
    def delta(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor | None:
        """The float32 delta of tensor ``name``, or None if the adapter leaves it alone."""
        factors = self.factors.get(name)
        return None if factors is None else factors.delta(device)

    def read(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """Tensor ``name`` with the adapter applied (float32 where adapted)."""
        if name not in self.tensors:
            raise CheckpointError(f"adapter '{self.label}': its base has no tensor {name}")
        base = self.base.read(name, device)
        factors = self.factors.get(name)
        if factors is None:
            return base
        return base.to(torch.float32) + factors.delta(base.device)

    def close(self) -> None:
        """Release file handles (the base's too; the factors stay, they are small)."""
        self.base.close()

    def __repr__(self) -> str:
        return f"AdapterFolder({str(self.path)!r}, base={str(self.base.path)!r})"

    # -- opening ---------------------------------------------------------------------------
    def _fail(self, message: str) -> CheckpointError:
        return CheckpointError(f"adapter '{self.label}': {message}")

    def _read_adapter_config(self) -> dict[str, Any]:
        file = self.path / ADAPTER_CONFIG
        if not file.is_file():
            raise self._fail(
                f"{self.path} has adapter weights but no {ADAPTER_CONFIG}; without it the "
                "adapter's scaling (lora_alpha, r) is unknown"
            )
        try:
            config = json.loads(file.read_text())
        except (OSError, ValueError) as exc:
            raise self._fail(f"{file} is not valid JSON ({exc})") from None
        if not isinstance(config, dict):
            raise self._fail(f"{file} must hold a JSON object")
        peft_type = config.get("peft_type")
        if peft_type != "LORA":
            raise self._fail(
                f"{ADAPTER_CONFIG}: peft_type is {peft_type!r}; only LORA adapters can be merged"
            )
        for field, harmless in _REFUSED_UNLESS.items():
            value = config.get(field)
            if value not in harmless:
                raise self._fail(
                    f"{ADAPTER_CONFIG}: {field} is {value!r}, which evomerge cannot apply "
                    f"exactly; merge the adapter into its base with PEFT (merge_and_unload) and "
                    "use that folder as the source"
                )
        init = config.get("init_lora_weights")
        if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
            raise self._fail(
                f"{ADAPTER_CONFIG}: init_lora_weights is {init!r}, which rewrites the base's "
                "weights; save the adapter with PEFT's path_initial_model_for_weight_conversion "
                "so it applies to the original base"
            )
        for field in ("r", "lora_alpha"):
            value = config.get(field)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise self._fail(
                    f"{ADAPTER_CONFIG}: {field} must be a positive number, not {value!r}"
                )
        for field in ("use_rslora", "fan_in_fan_out"):
            if not isinstance(config.get(field, False), bool):
                raise self._fail(f"{ADAPTER_CONFIG}: {field} must be true or false")
        return config

    def _weights_file(self) -> Path:
        for name in ADAPTER_WEIGHTS:
            if (self.path / name).is_file():
                return self.path / name
        raise self._fail(f"{self.path} has {ADAPTER_CONFIG} but no {' or '.join(ADAPTER_WEIGHTS)}")

    def _load_weights(self) -> dict[str, torch.Tensor]:
        file = self.weights_file
        if file.suffix == ".safetensors":
            try:
                with safe_open(str(file), framework="pt", device="cpu") as handle:
                    return {key: handle.get_tensor(key) for key in handle.keys()}
            except (SafetensorError, OSError, RuntimeError) as exc:
                raise self._fail(f"{file} is not a readable safetensors file ({exc})") from None
        if not self.allow_pickle:
            raise self._fail(
                f"{file.name} is pickled; pickles can run code when loaded, so they are refused. "
                "Convert the adapter to safetensors, or pass --allow-pickle"
            )
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise self._fail(f"{file} could not be loaded with weights_only=True ({exc})") from None
        if not isinstance(state, dict):
            raise self._fail(f"{file} does not hold a state dict")
        return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}

    def _read_factors(self) -> dict[str, LoraFactors]:
        weights = self._load_weights()
        if not weights:
            raise self._fail(f"{self.weights_file} holds no tensors")
        # The most telling key first: an embedding LoRA also saves the full embedding.
        for marker in ("lora_embedding_", "lora_magnitude_vector"):
            for key in weights:
                if marker in key:
                    self._target_of(key)
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in weights.items():
            target, part = self._target_of(key)
            pairs.setdefault(target, {})[part] = tensor
        config = self.adapter_config
        fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
        factors = {}
        for target, parts in pairs.items():
            missing = {"lora_A", "lora_B"} - set(parts)
            if missing:
                raise self._fail(
                    f"{target} has no {missing.pop()} factor in {self.weights_file.name}"
                )
            a, b = parts["lora_A"], parts["lora_B"]
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
                raise self._fail(
                    f"{target}: lora_A {list(a.shape)} and lora_B {list(b.shape)} are not the "
                    "factors of one Linear LoRA (B @ A)"
                )
            # r per module is the factors' rank (so rank_pattern needs no pattern matching);
            # alpha_pattern is refused, so alpha is lora_alpha everywhere.
            rank = int(a.shape[0])
            alpha = float(config["lora_alpha"])
            scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
            lora = LoraFactors(a=a, b=b, scaling=scaling, fan_in_fan_out=fan_in_fan_out)
            info = self.base.tensors.get(target)
            if info is None:
                raise self._fail(
                    f"adapter tensor {target} has no counterpart {target} in base "
                    f"'{self.base.label}' (an adapter for another base?)"
                )
            if tuple(info.shape) != lora.shape:
                raise self._fail(
                    f"{target}: B @ A has shape {list(lora.shape)} but base '{self.base.label}' "
                    f"has {list(info.shape)} (an adapter for another base?)"
                )
            if not info.dtype.is_floating_point:
                raise self._fail(f"{target}: base tensor is {info.dtype}, not floating point")
            factors[target] = lora
        return factors

    def _target_of(self, key: str) -> tuple[str, str]:
        """Map a PEFT key (``base_model.model.X.lora_A.weight``) to the base's tensor name
        (``X.weight``) and the factor (``lora_A``/``lora_B``); anything else is refused."""
        name = key.removeprefix(PEFT_PREFIX)
        for part in ("lora_A", "lora_B"):
            marker = f".{part}.weight"
            if name.endswith(marker):
                return name[: -len(marker)] + ".weight", part
        if "lora_embedding_" in name:
            what = "an embedding LoRA (lora_embedding_A/B), which evomerge does not apply"
        elif "lora_magnitude_vector" in name:
            what = "a DoRA magnitude vector (use_dora)"
        elif name.endswith(".bias"):
            what = "a trained bias (bias/lora_bias)"
        elif "modules_to_save" in name:
            what = "a fully trained module (modules_to_save)"
        elif "base_layer" in name:
            what = "a full weight saved with the adapter (save_embedding_layers?)"
        else:
            what = "not a Linear LoRA factor (lora_A.weight / lora_B.weight)"
        raise self._fail(f"{self.weights_file.name} holds {key}: {what}")


Source = ModelFolder | AdapterFolder


def open_source(
    path: str | os.PathLike[str],
    *,
    label: str | None = None,
    base: ModelFolder | None = None,
    allow_pickle: bool = False,
    what: str = "",
) -> Source:
    """Open a merge source: a model folder, or a PEFT adapter folder applied to ``base``.

    ``what`` says, in the error for an adapter without a base, where a base would come from.
    """
    if is_adapter_folder(path):
        name = label or Path(path).expanduser().resolve().name
        if base is None:
            raise CheckpointError(
                f"source '{name}' is a LoRA adapter ({path}), which needs the base it applies to"
                + (f": {what}" if what else "")
            )
        return AdapterFolder(path, base, label=label, allow_pickle=allow_pickle)
    return ModelFolder(path, label=label, allow_pickle=allow_pickle)


def plan_extra(models: Sequence[Source]) -> tuple[tuple[str, Any], ...]:
    """The :attr:`MergePlan.extra` entry naming each adapter's base among ``models`` (empty
    when there is no adapter)."""
    pairs = []
    for index, model in enumerate(models):
        if isinstance(model, AdapterFolder):
            bases = [i for i, m in enumerate(models) if m is model.base]
            if not bases:
                raise CheckpointError(
                    f"adapter '{model.label}': its base '{model.base.label}' is not a model "
                    "of this merge"
                )
            pairs.append((index, bases[0]))
    return ((PLAN_KEY, tuple(pairs)),) if pairs else ()


def adapter_bases(extra: Iterable[tuple[str, Any]]) -> dict[int, int]:
    """Adapter index -> base index, from a plan's ``extra``."""
    return {int(a): int(b) for a, b in dict(extra).get(PLAN_KEY, ())}


def open_plan_sources(plan: Any, allow_pickle: bool = False) -> list[Source]:
    """Open a :class:`MergePlan`'s models, adapters over their bases (as the plan records in
    ``extra``); folders without config.json (Fisher diagonals) open without one."""
    bases = adapter_bases(plan.extra)
    models: list[Source | None] = [None] * len(plan.models)
    for index, (path, label) in enumerate(zip(plan.models, plan.labels, strict=True)):
        if index not in bases:
            models[index] = ModelFolder(
                path,
                label=label,
                allow_pickle=allow_pickle,
                require_config=(Path(path) / "config.json").is_file(),
            )
    for index, base_index in bases.items():
        base = models[base_index]
        if not isinstance(base, ModelFolder):
            raise CheckpointError(f"plan model {index}: its base {base_index} is not a model")
        models[index] = AdapterFolder(
            plan.models[index], base, label=plan.labels[index], allow_pickle=allow_pickle
        )
    return [m for m in models if m is not None]
