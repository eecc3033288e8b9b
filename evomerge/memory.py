"""A worker's memory, planned before the night (DESIGN decision 9; ``evomerge check``).

A worker holds, for the whole study, the base and every source in their stored dtype (on the GPU,
or with ``cluster.residency: host`` in pinned host memory, streamed to the GPU one tensor at a
time), one working model in the study's working dtype, and, while it merges or scores, the merge
temporaries or the evaluation batch. Every size here comes from the models' safetensors headers
and ``config.json`` (no tensor data is read: header-only files with a sparse data region plan
like real ones) and from the evaluators' settings.

Symbols: P the base's parameters, w the working dtype's bytes (4 float32, 2 bfloat16/float16),
L layers, B the batch, S the sequence in tokens, H hidden size, I intermediate size, V the
vocabulary, kv the key/value heads, hd the head size, T the largest tensor's elements.

GPU (``device: cuda``), per worker::

    resident tensors   sum of the base's and the sources' stored bytes    (residency device)
    working model      P x w
    merge              (M + 1) x T x 4                                     (float32 temporaries)
                       + (1 + sources) x T x stored bytes                  (residency host: the
                                                                            inputs streamed in)
    evaluation         KV + max(activations, logits + log-probs)           (the largest evaluator)
      KV cache         2 x L x B x S x kv x hd x w
      activations      B x S x (2 x H + 3 x I) x w     (one decoder layer's peak: the residual
                                                        stream, its normed copy, and the MLP's
                                                        gate/up/product)
      logits           B x S x V x w
      log-probs        B x S x V x w for lm_eval (its log_softmax keeps the logits' dtype);
                       B x S x V x 4, twice unless w is 4, for perplexity (a float32 copy of
                       the logits and cross-entropy's float32 log-softmax)
    CUDA overhead      CUDA_OVERHEAD_BYTES

M is the merge method's declared peak of float32 temporaries for the study's number of sources
(``MergeMethod.peak_temporaries``; the largest of ``method_choice``'s methods), at least 3, so
MERGE_TEMPORARY_TENSORS = 4 for the TIES/DARE family; the one more is the merged tensor cast to
its output dtype.

    total = resident + working + max(merge, evaluation) + CUDA overhead

The merge and the evaluation never overlap (a candidate is built, then scored), so the larger
counts. Within a forward pass the KV cache is held while the layers run and the logits are made;
the log-probabilities are taken after the layers' activations are gone: KV + max(...) bounds
every phase. Evaluators run one after another: the largest one counts.

Host, per worker: the resident tensors (residency host), the model load (P x w:
``from_pretrained`` builds the working model in host memory, then moves it to the GPU) and
HOST_PROCESS_BYTES + HOST_CUDA_BYTES. With ``device: cpu`` the GPU side is 0 and everything
above is host memory (the loaded model is the working model: no load transient; the process is
HOST_PROCESS_BYTES).

Evaluation sizes: lm_eval's ``batch_size`` (``auto`` is planned at 1 on a GPU, the least
lm-eval's own search for what fits can pick; 64 on a CPU, where it does not search) and its
``max_length`` if set, else the longest request of its tasks in tokens (built offline from
local task files and tokenized with the base's tokenizer) capped at the model's context, else
the model's context (``max_position_embeddings``, else lm-eval's 2048);
perplexity's ``batch_size`` and ``max_length`` (default: the context capped at 4096); a python
evaluator is planned like perplexity's default at its ``batch_size`` or 1 (its memory is its
own). The breakdown says which was used.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from evomerge.errors import CheckpointError, ConfigError
from evomerge.util import format_bytes

if TYPE_CHECKING:
    from evomerge.study.config import StudyConfig

Where = Literal["gpu", "host"]
Residency = Literal["device", "host"]

MERGE_TEMPORARY_TENSORS = 4
"""Float32 copies of the largest tensor a merge holds at once on its device: the budget for
merge temporaries of a method that declares at most 3 (``MergeMethod.temporaries``). TIES, DARE
and DELLA work on pieces of each tensor; their measured peak is at most 2.2 copies whatever the
number of sources, and ``tests/test_merge_memory.py`` holds them to 3
(``merge.methods.task_arithmetic.MERGE_TEMPORARY_TENSORS``); one more is the merged tensor cast
to its output dtype while it is copied into the model. A method that declares more (RAM,
Multi-SLERP, ...) is planned at its declared peak + 1."""
CUDA_OVERHEAD_BYTES = 2 * 10**9
"""Fixed GPU cost per worker: the CUDA context and loaded kernels (about 0.5 GB with torch on
recent GPUs), cuBLAS workspaces, and the caching allocator's fragmentation."""
HOST_PROCESS_BYTES = 1 * 10**9
"""Fixed host cost per worker: the Python process with torch, transformers, lm-eval, datasets
and the Ray worker around it (0.7 GB measured on a toy-zoo CPU worker)."""
HOST_CUDA_BYTES = 2 * 10**9
"""Fixed host cost per worker on a GPU, on top of HOST_PROCESS_BYTES: the CUDA libraries torch
loads (cuBLAS, cuDNN, ...) and the driver's host side."""
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
"""Bytes per element of each working dtype."""
WORKING_DTYPES = ("float32", "bfloat16", "float16")
LM_EVAL_DEFAULT_MAX_LENGTH = 2048
"""lm-eval's context when neither the evaluator nor the model's config gives one."""
LM_EVAL_MAX_GEN_TOKS = 256
"""Tokens lm-eval generates at most for a ``generate_until`` request that sets no limit."""

_ST_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
_ST_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


# -- what the headers and config.json say --------------------------------------------------------


@dataclass(frozen=True)
class ModelSize:
    """One model folder's tensors, from its safetensors headers alone."""

    path: str
    stored_bytes: int
    parameters: int
    largest_tensor: int
    """Elements of the largest tensor."""
    largest_tensor_bytes: int
    """Stored bytes of the largest tensor."""
    stored_dtype: str
    """The dtype most of its bytes are stored in (``bfloat16``, ``float32``, ...)."""


@dataclass(frozen=True)
class Architecture:
    """The numbers of ``config.json`` the KV cache, the activations and the logits need."""

    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int | None = None


def safetensors_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The safetensors files of a model folder, chosen as :class:`ModelFolder` chooses them:
    the index's shards, else ``model.safetensors``, else every ``*.safetensors``."""
    path = Path(folder).expanduser()
    if path.is_file():
        return [path]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{index} is not a valid index ({exc})") from None
        return [path / name for name in names]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(
            f"{path}: no safetensors weights (the memory plan reads safetensors headers)"
        )
    return files


def read_safetensors_header(file: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON header of one safetensors file: an 8-byte little-endian length, then the JSON.
    Reads only those bytes, never the tensor data."""
    try:
        with open(file, "rb") as handle:
            raw = handle.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than a safetensors header")
            (length,) = struct.unpack("<Q", raw)
            if length > os.path.getsize(file) - 8:
                raise ValueError("the header runs past the end of the file")
            header = json.loads(handle.read(length))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{file} is not a readable safetensors file ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: the safetensors header is not a JSON object")
    return header


def read_model_size(folder: str | os.PathLike[str]) -> ModelSize:
    """Stored bytes, parameters and the largest tensor of a model folder, from its headers."""
    stored = parameters = largest = largest_bytes = 0
    by_dtype: dict[str, int] = {}
    for file in safetensors_files(folder):
        for name, meta in read_safetensors_header(file).items():
            if name == "__metadata__":
                continue
            try:
                itemsize = _ST_BYTES[meta["dtype"]]
                elements = math.prod(int(d) for d in meta["shape"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{file}: malformed header entry for tensor {name}") from None
            size = elements * itemsize
            stored += size
            parameters += elements
            by_dtype[meta["dtype"]] = by_dtype.get(meta["dtype"], 0) + size
            if elements > largest:
                largest, largest_bytes = elements, size
    if not parameters:
        raise CheckpointError(f"{folder}: no tensors in its safetensors headers")
    dtype = max(by_dtype, key=by_dtype.__getitem__)
    return ModelSize(
        path=str(folder),
        stored_bytes=stored,
        parameters=parameters,
        largest_tensor=largest,
        largest_tensor_bytes=largest_bytes,
        stored_dtype=_ST_NAMES.get(dtype, dtype.lower()),
    )


def _first_int(config: Mapping[str, Any], *keys: str) -> int | None:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def architecture_from_config(config: Mapping[str, Any], where: str = "config.json") -> Architecture:
    """The architecture numbers of a Hugging Face ``config.json`` mapping (a nested
    ``text_config`` wins when it has the layers): key/value heads default to the attention
    heads, the head size to hidden / heads, the intermediate size to 4 x hidden."""
    text = config.get("text_config")
    if isinstance(text, dict) and _first_int(text, "num_hidden_layers", "n_layer", "num_layers"):
        config = {**config, **text}
    layers = _first_int(config, "num_hidden_layers", "n_layer", "num_layers")
    heads = _first_int(config, "num_attention_heads", "n_head", "num_heads")
    hidden = _first_int(config, "hidden_size", "n_embd", "d_model")
    vocab = _first_int(config, "vocab_size")
    missing = [
        name
        for name, value in (
            ("num_hidden_layers", layers),
            ("num_attention_heads", heads),
            ("hidden_size", hidden),
            ("vocab_size", vocab),
        )
        if value is None
    ]
    if missing:
        raise ConfigError(
            f"{where} lacks {', '.join(missing)}: the KV cache and the logits cannot be sized"
        )
    assert layers and heads and hidden and vocab
    return Architecture(
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=_first_int(config, "num_key_value_heads", "num_kv_heads") or heads,
        head_dim=_first_int(config, "head_dim") or hidden // heads,
        hidden_size=hidden,
        intermediate_size=_first_int(config, "intermediate_size", "n_inner", "ffn_dim")
        or 4 * hidden,
        vocab_size=vocab,
        max_position_embeddings=_first_int(
            config, "max_position_embeddings", "n_positions", "max_sequence_length", "n_ctx"
        ),
    )


def read_architecture(folder: str | os.PathLike[str]) -> Architecture:
    file = Path(folder).expanduser() / "config.json"
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{file} cannot be read ({exc})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{file} does not hold a JSON object")
    return architecture_from_config(config, str(file))


# -- the evaluation's shape ----------------------------------------------------------------------


@dataclass(frozen=True)
class EvalShape:
    """One evaluator's largest forward pass: ``batch`` sequences of ``sequence`` tokens."""

    label: str
    """The evaluator, as the breakdown names it (``lm_eval gsm8k,arc_challenge``)."""
    kind: str
    batch: int
    sequence: int
    batch_note: str = ""
    """How the batch was chosen when it is not the setting itself (``auto: planned at 1``)."""
    sequence_source: str = ""
    """Where the sequence length came from (``max_length``, ``longest request``, ...)."""

    def describe(self) -> str:
        batch = f"batch {self.batch}" + (f" ({self.batch_note})" if self.batch_note else "")
        return f"{self.label}: {batch} x {self.sequence} tokens ({self.sequence_source})"


def kv_cache_bytes(arch: Architecture, batch: int, sequence: int, working_bytes: int) -> int:
    """2 (keys and values) x L x B x S x kv x hd x w."""
    return (
        2
        * arch.num_hidden_layers
        * batch
        * sequence
        * arch.num_key_value_heads
        * arch.head_dim
        * working_bytes
    )


def logits_bytes(arch: Architecture, batch: int, sequence: int, working_bytes: int) -> int:
    """B x S x V x w."""
    return batch * sequence * arch.vocab_size * working_bytes


def log_prob_bytes(
    arch: Architecture, batch: int, sequence: int, working_bytes: int, kind: str
) -> int:
    """B x S x V x w for lm_eval (log_softmax in the logits' dtype); for perplexity a float32
    copy of the logits (none when they already are float32) plus cross-entropy's float32
    log-softmax."""
    per_element = working_bytes if kind != "perplexity" else (0 if working_bytes == 4 else 4) + 4
    return batch * sequence * arch.vocab_size * per_element


def activation_bytes(arch: Architecture, batch: int, sequence: int, working_bytes: int) -> int:
    """B x S x (2 x H + 3 x I) x w: one decoder layer's peak (the residual stream and its normed
    copy, and the MLP's gate, up and their product)."""
    return batch * sequence * (2 * arch.hidden_size + 3 * arch.intermediate_size) * working_bytes


def evaluation_bytes(arch: Architecture, shape: EvalShape, working_bytes: int) -> int:
    """KV + max(activations, logits + log-probs) for one evaluator's largest batch."""
    b, s = shape.batch, shape.sequence
    return kv_cache_bytes(arch, b, s, working_bytes) + max(
        activation_bytes(arch, b, s, working_bytes),
        logits_bytes(arch, b, s, working_bytes)
        + log_prob_bytes(arch, b, s, working_bytes, shape.kind),
    )


# -- the plan ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Component:
    name: str
    where: Where
    bytes: int
    formula: str
    """One line: the formula with this plan's numbers in it."""
    part_of: str | None = None
    """For the evaluation's parts (KV cache, logits, ...): the component they make up; they are
    not added to the totals themselves."""


@dataclass(frozen=True)
class MemoryPlan:
    """One worker's memory: each component, and the totals on the GPU and on the host."""

    device: str
    """``cuda`` or ``cpu`` (the device type workers merge and score on)."""
    working_dtype: str
    residency: Residency
    components: tuple[Component, ...]
    evaluation: EvalShape | None
    """The evaluator whose forward pass is the largest (None: no evaluator to size)."""
    gpu_bytes_per_worker: int
    host_bytes_per_worker: int
    notes: tuple[str, ...] = field(default=())

    def component(self, name: str) -> Component:
        return next(c for c in self.components if c.name == name)

    def bytes_of(self, name: str) -> int:
        found = [c for c in self.components if c.name == name]
        return found[0].bytes if found else 0

    def gpu_fits(self, gpu_bytes_available: int | None) -> bool | None:
        """None when the GPU's size is unknown (and the plan needs one)."""
        if self.gpu_bytes_per_worker == 0:
            return True
        if gpu_bytes_available is None:
            return None
        return self.gpu_bytes_per_worker <= gpu_bytes_available

    def host_fits(self, host_bytes_available: int | None) -> bool | None:
        if host_bytes_available is None:
            return None
        return self.host_bytes_per_worker <= host_bytes_available

    def fits(
        self, gpu_bytes_available: int | None, host_bytes_available: int | None = None
    ) -> bool | None:
        """False when either side is known not to fit; None when a side is unknown (and the
        other fits); True when both fit."""
        sides = [self.gpu_fits(gpu_bytes_available), self.host_fits(host_bytes_available)]
        if False in sides:
            return False
        return None if None in sides else True

    def breakdown(self, where: Where) -> str:
        """A short, one-line breakdown of one side's total."""
        parts = {c.name: c for c in self.components if c.where == where and c.part_of is None}
        shown: list[str] = []
        resident = parts.get("resident tensors")
        if resident:
            shown.append(f"resident {format_bytes(resident.bytes)}")
        working = parts.get("working model")
        if working:
            shown.append(f"working {format_bytes(working.bytes)} {self.working_dtype}")
        load = parts.get("model load")
        if load:
            shown.append(f"load {format_bytes(load.bytes)}")
        merge, evaluation = parts.get("merge"), parts.get("evaluation")
        if merge or evaluation:
            step = []
            if merge:
                step.append(f"merge {format_bytes(merge.bytes)}")
            if evaluation:
                text = f"eval {format_bytes(evaluation.bytes)}"
                if self.evaluation is not None:
                    text += f" [{self.evaluation.describe()}]"
                step.append(text)
            shown.append(f"max({', '.join(step)})" if len(step) > 1 else step[0])
        overhead = parts.get("CUDA overhead") or parts.get("process")
        if overhead:
            shown.append(f"{overhead.name} {format_bytes(overhead.bytes)}")
        return " + ".join(shown)

    def to_json(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "working_dtype": self.working_dtype,
            "residency": self.residency,
            "gpu_bytes_per_worker": self.gpu_bytes_per_worker,
            "host_bytes_per_worker": self.host_bytes_per_worker,
            "evaluation": None
            if self.evaluation is None
            else {
                "evaluator": self.evaluation.label,
                "batch_size": self.evaluation.batch,
                "batch_note": self.evaluation.batch_note,
                "sequence": self.evaluation.sequence,
                "sequence_source": self.evaluation.sequence_source,
            },
            "components": {
                c.name: {
                    "where": c.where,
                    "bytes": c.bytes,
                    "formula": c.formula,
                    **({"part_of": c.part_of} if c.part_of else {}),
                }
                for c in self.components
            },
            "notes": list(self.notes),
        }


def _n(value: int) -> str:
    return f"{value:,}".replace(",", "_")


def plan_memory(
    models: Sequence[ModelSize],
    arch: Architecture,
    evaluations: Sequence[EvalShape],
    *,
    device: str = "cuda",
    working_dtype: str = "bfloat16",
    residency: Residency = "device",
    fisher: Sequence[ModelSize] = (),
    merge_tensors: float = MERGE_TEMPORARY_TENSORS - 1,
    merge_label: str = "",
    path_sources: Sequence[int] = (),
    path_merges: int = 0,
) -> MemoryPlan:
    """One worker's memory for ``models`` (the base first, then the sources, and the sources'
    Fisher diagonals when the method weighs by them, held beside them), scored by
    ``evaluations`` (one after another), on ``device`` (``cuda``/``cuda:N`` or ``cpu``).
    ``merge_tensors`` is the merge method's peak of float32 temporaries in copies of the largest
    tensor (at least ``MERGE_TEMPORARY_TENSORS - 1`` is planned), ``merge_label`` names it.
    A data-flow study's workers also hold, as modules in the working dtype, each model of
    ``path_sources`` (indices into ``models``) whose resident tensors cannot be used as they are
    (another dtype, or held on the host), and ``path_merges`` merges on its paths."""
    if not models:
        raise ConfigError("a memory plan needs the base model's size")
    if working_dtype not in DTYPE_BYTES:
        raise ConfigError(
            f"working dtype '{working_dtype}' is not one of {', '.join(WORKING_DTYPES)}"
        )
    if residency not in ("device", "host"):
        raise ConfigError(f"residency '{residency}' is not device or host")
    on_gpu = device.startswith("cuda")
    w = DTYPE_BYTES[working_dtype]
    base = models[0]
    params = base.parameters
    largest = max(m.largest_tensor for m in models)
    largest_stored = max(m.largest_tensor_bytes for m in models)
    compute: Where = "gpu" if on_gpu else "host"
    components: list[Component] = []

    stored = sum(m.stored_bytes for m in [*models, *fisher])
    dtypes = sorted({m.stored_dtype for m in models})
    resident_where: Where = "gpu" if on_gpu and residency == "device" else "host"
    components.append(
        Component(
            "resident tensors",
            resident_where,
            stored,
            f"base + {len(models) - 1} sources in their stored dtype ({', '.join(dtypes)}): "
            + " + ".join(_n(m.stored_bytes) for m in models)
            + (
                f" + {len(fisher)} Fisher diagonals: "
                + " + ".join(_n(m.stored_bytes) for m in fisher)
                if fisher
                else ""
            )
            + (
                " (pinned host memory, streamed to the GPU)"
                if on_gpu and residency == "host"
                else ""
            ),
        )
    )
    components.append(
        Component(
            "working model", compute, params * w, f"P x w = {_n(params)} x {w} ({working_dtype})"
        )
    )
    converted = [
        models[i]
        for i in path_sources
        if models[i].stored_dtype != working_dtype or (on_gpu and residency == "host")
    ]
    if converted or path_merges:
        held = sum(m.parameters for m in converted) + path_merges * params
        parts = [f"{len(converted)} converted source(s)"] if converted else []
        parts += [f"{path_merges} merge(s) x P"] if path_merges else []
        components.append(
            Component(
                "path models",
                compute,
                held * w,
                f"({' + '.join(parts)}) x w = {_n(held)} x {w} ({working_dtype}), held once "
                "for data-flow paths",
            )
        )
    merge, merge_formula = _merge_temporaries(merge_tensors, merge_label, largest)
    if on_gpu and residency == "host":
        streamed = len(models) * largest_stored
        merge += streamed
        merge_formula += (
            f" + (1 + {len(models) - 1} sources) x {_n(largest_stored)} (the inputs streamed in)"
        )
    components.append(Component("merge", compute, merge, merge_formula))

    peak: tuple[int, EvalShape] | None = None
    for shape in evaluations:
        size = evaluation_bytes(arch, shape, w)
        if peak is None or size > peak[0]:
            peak = (size, shape)
    if peak is not None:
        size, shape = peak
        b, s = shape.batch, shape.sequence
        kv = kv_cache_bytes(arch, b, s, w)
        act = activation_bytes(arch, b, s, w)
        logits = logits_bytes(arch, b, s, w)
        logprobs = log_prob_bytes(arch, b, s, w, shape.kind)
        components.append(
            Component(
                "evaluation",
                compute,
                size,
                f"KV + max(activations, logits + log-probs) = {_n(kv)} + max({_n(act)}, "
                f"{_n(logits)} + {_n(logprobs)}); {shape.describe()}",
            )
        )
        kv_formula = (
            f"2 x L x B x S x kv x hd x w = 2 x {arch.num_hidden_layers} x {b} x {s} x "
            f"{arch.num_key_value_heads} x {arch.head_dim} x {w}"
        )
        act_formula = (
            f"B x S x (2 x H + 3 x I) x w = {b} x {s} x (2 x {arch.hidden_size} + 3 x "
            f"{arch.intermediate_size}) x {w}"
        )
        per_logprob = logprobs // max(1, b * s * arch.vocab_size)
        components += [
            Component("kv cache", compute, kv, kv_formula, "evaluation"),
            Component("activations", compute, act, act_formula, "evaluation"),
            Component(
                "logits",
                compute,
                logits,
                f"B x S x V x w = {b} x {s} x {arch.vocab_size} x {w}",
                "evaluation",
            ),
            Component(
                "log-probs",
                compute,
                logprobs,
                f"B x S x V x {per_logprob} = {b} x {s} x {arch.vocab_size} x {per_logprob}"
                + (
                    " (float32 copy and float32 log-softmax)"
                    if shape.kind == "perplexity"
                    else " (log_softmax in the logits' dtype)"
                ),
                "evaluation",
            ),
        ]
    if on_gpu:
        components.append(
            Component("CUDA overhead", "gpu", CUDA_OVERHEAD_BYTES, "CUDA_OVERHEAD_BYTES, fixed")
        )
        components.append(
            Component(
                "model load",
                "host",
                params * w,
                f"P x w = {_n(params)} x {w}: from_pretrained builds the working model in host "
                "memory before moving it to the GPU",
            )
        )
    if on_gpu:
        process = HOST_PROCESS_BYTES + HOST_CUDA_BYTES
        process_formula = "HOST_PROCESS_BYTES + HOST_CUDA_BYTES, fixed"
    else:
        process, process_formula = HOST_PROCESS_BYTES, "HOST_PROCESS_BYTES, fixed"
    components.append(Component("process", "host", process, process_formula))

    def total(where: Where) -> int:
        parts = {c.name: c.bytes for c in components if c.where == where and c.part_of is None}
        step = max(parts.pop("merge", 0), parts.pop("evaluation", 0))
        return sum(parts.values()) + step

    notes = []
    if peak is None:
        notes.append("no evaluator to size: the evaluation is not counted")
    return MemoryPlan(
        device="cuda" if on_gpu else "cpu",
        working_dtype=working_dtype,
        residency=residency,
        components=tuple(components),
        evaluation=peak[1] if peak else None,
        gpu_bytes_per_worker=total("gpu") if on_gpu else 0,
        host_bytes_per_worker=total("host"),
        notes=tuple(notes),
    )


def _merge_temporaries(tensors: float, label: str, largest: int) -> tuple[int, str]:
    """The merge's float32 temporaries and the cast copy: bytes and formula."""
    if tensors <= MERGE_TEMPORARY_TENSORS - 1:
        copies = MERGE_TEMPORARY_TENSORS
        return copies * largest * 4, f"{copies} x T x 4 = {copies} x {_n(largest)} x 4"
    named = f" ({label})" if label else ""
    return (
        math.ceil((tensors + 1) * largest * 4),
        f"({tensors:g} + 1) x T x 4{named} = {tensors + 1:g} x {_n(largest)} x 4",
    )


def method_temporaries(methods: Sequence[str], sources: int) -> tuple[float, str]:
    """The largest declared merge temporaries of ``methods`` (registered names) merging
    ``sources`` sources, and a label naming the method (``"ram, 4 sources"``)."""
    from evomerge.merge.registry import get_method

    if not methods:
        return MERGE_TEMPORARY_TENSORS - 1, ""
    peak, name = max((get_method(m).peak_temporaries(sources), m) for m in methods)
    return peak, f"{name}, {sources} source{'s' if sources != 1 else ''}"


def study_methods(config: StudyConfig) -> list[str]:
    """The merge methods the study's space may use: its ``method`` and ``method_choice``'s; for a
    data-flow space, those of the merges on its paths (layers are otherwise only referenced)."""
    from evomerge.dataflow.space import DataflowSpace, StudyModel
    from evomerge.space import space_from_setting

    space = space_from_setting(config.space)
    if isinstance(space, DataflowSpace):
        names = ["passthrough"]
        for entry in space.models:
            if isinstance(entry, StudyModel) and entry.recipe is not None:
                recipe = entry.recipe
                for name in [recipe.get("method"), *(recipe.get("layer_methods") or [])]:
                    if isinstance(name, str) and name not in names:
                        names.append(name)
        return names
    names = [space.method]
    if space.method_choice is not None:
        names += [m for m in space.method_choice.methods if m not in names]
    return names


def study_path_models(config: StudyConfig) -> dict[str, Any]:
    """For a data-flow study: ``path_sources`` (indices of the models its paths use, the base
    being 0) and ``path_merges`` (how many merges they use); empty for other studies."""
    from evomerge.checkpoint import source_labels
    from evomerge.dataflow.space import DataflowSpace
    from evomerge.space import space_from_setting

    space = space_from_setting(config.space)
    if not isinstance(space, DataflowSpace):
        return {}
    sources = source_labels(config.sources)
    labels, merges = space.model_labels(sources)
    used = [1 + sources.index(label) for label in labels if label not in merges]
    return {"path_sources": used, "path_merges": len(merges)}


# -- a study's plan ------------------------------------------------------------------------------


@dataclass(frozen=True)
class StudyMemoryInputs:
    """What a study's plans are made of, read once: the models' sizes (base first), the base's
    architecture and each evaluator's largest batch."""

    models: tuple[ModelSize, ...]
    arch: Architecture
    evaluations: tuple[EvalShape, ...]
    notes: tuple[str, ...] = ()
    fisher: tuple[ModelSize, ...] = ()
    """The sources' Fisher diagonals (a study with ``fisher``), held beside the models."""
    merge_tensors: float = MERGE_TEMPORARY_TENSORS - 1
    """The study's methods' largest declared merge temporaries (:func:`method_temporaries`)."""
    merge_label: str = ""
    """Which method and how many sources gave ``merge_tensors``."""
    path_sources: tuple[int, ...] = ()
    """A data-flow study: the models (indices into ``models``) its paths take layers of."""
    path_merges: int = 0
    """A data-flow study: the merges on its paths (each held as one more model)."""


def default_working_dtype(device: str) -> str:
    """bfloat16 on a GPU, float32 on a CPU (the study's ``working_dtype`` when it sets none)."""
    return "bfloat16" if device.startswith("cuda") else "float32"


def study_working_dtype(config: StudyConfig) -> str:
    """The study's working dtype: as set, else bfloat16 on CUDA and float32 on the CPU."""
    return config.working_dtype or default_working_dtype(config.device)


def gpu_bytes_per_worker(config: StudyConfig, gpu_bytes: int | None) -> int | None:
    """One worker's share of a GPU of ``gpu_bytes``: ``gpus_per_worker`` of it (0.5: two
    workers share one), at most one GPU (a worker merges and scores on one device)."""
    if gpu_bytes is None:
        return None
    share = min(float(config.cluster.gpus_per_worker), 1.0)
    return int(gpu_bytes * share) if share > 0 else gpu_bytes


def study_memory_inputs(config: StudyConfig) -> StudyMemoryInputs:
    """Read the models' headers and config, and size each evaluator (building lm-eval requests
    from local task files when no ``max_length`` bounds them)."""
    return memory_inputs(
        config.base,
        config.sources,
        config.evaluators,
        config.device,
        config.fisher,
        methods=study_methods(config),
        **study_path_models(config),
    )


def memory_inputs(
    base: str,
    sources: Sequence[str],
    evaluators: Sequence[Mapping[str, Any]],
    device: str,
    fisher: Sequence[str] | None = None,
    methods: Sequence[str] = (),
    path_sources: Sequence[int] = (),
    path_merges: int = 0,
) -> StudyMemoryInputs:
    """:func:`study_memory_inputs` for a worker's models and evaluator mappings, merged by one
    of ``methods`` (none: the TIES/DARE family's budget)."""
    from evomerge.evaluate.registry import parse_evaluator_config

    models = tuple(read_model_size(p) for p in [base, *sources])
    arch = read_architecture(base)
    notes: list[str] = []
    shapes = []
    tokenizer_cache: dict[str, Any] = {}
    on_gpu = device.startswith("cuda")
    for index, data in enumerate(evaluators):
        parsed = parse_evaluator_config(dict(data), f"evaluators[{index}]")
        shapes.append(evaluation_shape(parsed, arch, base, tokenizer_cache, notes, on_gpu=on_gpu))
    diagonals = tuple(read_model_size(p) for p in fisher or [])
    tensors, label = method_temporaries(methods, len(sources))
    return StudyMemoryInputs(
        models,
        arch,
        tuple(shapes),
        tuple(notes),
        diagonals,
        tensors,
        label,
        tuple(path_sources),
        path_merges,
    )


def evaluation_shape(
    evaluator: Any,
    arch: Architecture,
    base: str,
    tokenizer_cache: dict[str, Any] | None = None,
    notes: list[str] | None = None,
    *,
    on_gpu: bool = True,
) -> EvalShape:
    """The largest batch an evaluator (a parsed evaluator config) runs through the model."""
    from evomerge.evaluate.perplexity import DEFAULT_MAX_LENGTH_CAP as PERPLEXITY_MAX_LENGTH_CAP

    kind = str(getattr(evaluator, "kind", "unknown"))
    context = arch.max_position_embeddings
    if kind == "lm_eval":
        label = f"lm_eval {','.join(evaluator.tasks)}"
        batch, batch_note = _batch(getattr(evaluator, "batch_size", 1), on_gpu)
        if evaluator.max_length is not None:
            return EvalShape(label, kind, batch, evaluator.max_length, batch_note, "max_length")
        model_max = context or LM_EVAL_DEFAULT_MAX_LENGTH
        model_source = "max_position_embeddings" if context else f"lm-eval's default {model_max}"
        longest = longest_request_tokens(evaluator, base, tokenizer_cache, notes)
        if longest is not None:
            if longest >= model_max:
                source = f"longest request ({longest} tokens) capped at {model_source}"
            else:
                source = "longest request of its tasks"
            return EvalShape(label, kind, batch, min(longest, model_max), batch_note, source)
        return EvalShape(label, kind, batch, model_max, batch_note, model_source)
    if kind == "perplexity":
        label = f"perplexity {evaluator.name}"
        batch, batch_note = _batch(getattr(evaluator, "batch_size", 1), on_gpu)
        if evaluator.max_length is not None:
            return EvalShape(label, kind, batch, evaluator.max_length, batch_note, "max_length")
        window = min(context or PERPLEXITY_MAX_LENGTH_CAP, PERPLEXITY_MAX_LENGTH_CAP)
        return EvalShape(
            label, kind, batch, window, batch_note, "max_position_embeddings capped at 4096"
        )
    label = f"{kind} {getattr(evaluator, 'function', '')}".strip()
    batch, batch_note = _batch(getattr(evaluator, "batch_size", None) or 1, on_gpu)
    window = min(context or PERPLEXITY_MAX_LENGTH_CAP, PERPLEXITY_MAX_LENGTH_CAP)
    return EvalShape(
        label,
        kind,
        batch,
        window,
        batch_note or "assumed",
        "assumed: its memory is its own; the context capped at 4096",
    )


def _batch(value: Any, on_gpu: bool) -> tuple[int, str]:
    if not isinstance(value, str):
        return int(value), ""
    if on_gpu:  # "auto": lm-eval's own search for the largest batch that fits what is left
        return 1, f"{value}: planned at 1, the least its search can pick"
    from evomerge.evaluate.harness import AUTO_MAX_BATCH_SIZE

    return AUTO_MAX_BATCH_SIZE, f"{value}: {AUTO_MAX_BATCH_SIZE} on a CPU, no search"


def longest_request_tokens(
    evaluator: Any,
    base: str,
    tokenizer_cache: dict[str, Any] | None = None,
    notes: list[str] | None = None,
) -> int | None:
    """The longest request of an lm_eval evaluator's tasks in tokens of the base's tokenizer
    (context + continuation; a generation's context + its max_gen_toks), or None when the tasks'
    requests cannot be built here offline (lm-eval's datasets not cached, a task that fails)."""
    from evomerge.util import first_line

    try:
        tokenizer = _tokenizer(base, tokenizer_cache)
        with _offline_datasets():
            from evomerge.evaluate.harness import _find_tasks, _quiet_lm_eval

            with _quiet_lm_eval():
                manager = _find_tasks(evaluator)
                loaded = manager.load(list(dict.fromkeys(evaluator.tasks)))
                tasks = dict(loaded["tasks"]) if "tasks" in loaded else dict(loaded)
                longest = 0
                for task in _leaves(tasks):
                    if evaluator.num_fewshot is not None:
                        task.set_config(key="num_fewshot", value=evaluator.num_fewshot)
                    if hasattr(task, "set_fewshot_seed"):
                        task.set_fewshot_seed(seed=evaluator.fewshot_seed)
                    task.build_all_requests(limit=None, rank=0, world_size=1)
                    for instance in task.instances:
                        longest = max(longest, _request_tokens(instance, tokenizer))
    except Exception as exc:  # lm-eval and datasets raise anything: plan from the context
        if notes is not None:
            notes.append(
                f"lm_eval {','.join(evaluator.tasks)}: requests not built here "
                f"({first_line(exc)}); planned at the model's context"
            )
        return None
    return longest or None


def _leaves(tasks: Mapping[Any, Any]) -> Iterable[Any]:
    for value in tasks.values():
        if isinstance(value, Mapping):
            yield from _leaves(value)
        elif hasattr(value, "build_all_requests"):
            yield value


def _request_tokens(instance: Any, tokenizer: Any) -> int:
    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    args = instance.args
    kind = getattr(instance, "request_type", "loglikelihood")
    if kind == "generate_until":
        options = args[1] if len(args) > 1 and isinstance(args[1], dict) else {}
        gen = options.get("max_gen_toks", LM_EVAL_MAX_GEN_TOKS)
        return 1 + count(args[0]) + int(gen)
    if kind == "loglikelihood_rolling":
        return 1 + count(args[0])
    return 1 + count(args[0]) + count(args[1])  # a prefix token, the context, the continuation


def _tokenizer(base: str, cache: dict[str, Any] | None) -> Any:
    if cache is not None and base in cache:
        return cache[base]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    if cache is not None:
        cache[base] = tokenizer
    return tokenizer


class _offline_datasets:
    """HF_DATASETS_OFFLINE and HF_HUB_OFFLINE set for the block (when ``datasets`` is not yet
    imported, which reads them once): building requests never downloads."""

    def __enter__(self) -> None:
        self.saved = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
        for key in self.saved:
            os.environ[key] = "1"

    def __exit__(self, *exc: object) -> None:
        for key, value in self.saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def plan_study_memory(
    config: StudyConfig,
    gpu_bytes: int | None,
    working_dtype: str | None = None,
    *,
    residency: str | None = None,
    inputs: StudyMemoryInputs | None = None,
) -> MemoryPlan:
    """The plan of one of ``config``'s workers on GPUs of ``gpu_bytes`` (None: unknown), in
    ``working_dtype`` and ``residency`` (default: the study's). ``residency: auto`` is the
    device when that plan fits the worker's share of the GPU (or the GPU's size is unknown),
    else host."""
    inputs = inputs or study_memory_inputs(config)
    dtype = working_dtype or study_working_dtype(config)
    residency = residency or config.cluster.residency
    available = gpu_bytes_per_worker(config, gpu_bytes)

    def make(where: Residency) -> MemoryPlan:
        plan = plan_memory(
            inputs.models,
            inputs.arch,
            inputs.evaluations,
            device=config.device,
            working_dtype=dtype,
            residency=where,
            fisher=inputs.fisher,
            merge_tensors=inputs.merge_tensors,
            merge_label=inputs.merge_label,
            path_sources=inputs.path_sources,
            path_merges=inputs.path_merges,
        )
        return replace(plan, notes=plan.notes + inputs.notes)

    if residency in ("device", "host"):
        return make(residency)  # type: ignore[arg-type]
    on_device = make("device")
    if not config.device.startswith("cuda"):
        return on_device  # one place on a CPU: host memory
    if on_device.gpu_fits(available) is not False:
        unknown = " (the GPU's size is unknown)" if available is None else ""
        return replace(on_device, notes=(*on_device.notes, f"residency auto: device{unknown}"))
    on_host = make("host")
    need = format_bytes(on_device.gpu_bytes_per_worker)
    note = f"residency auto: host (on the device it would need {need})"
    return replace(on_host, notes=(*on_host.notes, note))


def plans_by_working_dtype(
    config: StudyConfig, gpu_bytes: int | None, *, inputs: StudyMemoryInputs | None = None
) -> dict[str, MemoryPlan]:
    """The plan in each working dtype (float32, bfloat16, float16), the rest of the study as
    configured."""
    inputs = inputs or study_memory_inputs(config)
    return {
        dtype: plan_study_memory(config, gpu_bytes, dtype, inputs=inputs)
        for dtype in WORKING_DTYPES
    }


FIXED_GPU_COMPONENTS = ("resident tensors", "working model", "path models", "CUDA overhead")
"""What a worker holds on its GPU whatever it runs: an evaluation can shrink its batch (and does
when it runs out of memory), these cannot."""


def fixed_gpu_bytes(plan: MemoryPlan) -> int:
    """The GPU bytes of :data:`FIXED_GPU_COMPONENTS` in ``plan``."""
    return sum(
        c.bytes for c in plan.components if c.where == "gpu" and c.name in FIXED_GPU_COMPONENTS
    )


def choose_residency(
    setting: str, on_device: MemoryPlan, on_host: MemoryPlan, usable: int
) -> tuple[Residency, int | None]:
    """Where a worker with ``usable`` bytes of GPU memory keeps its sources: ``setting`` as
    given, or for ``auto`` the device when the whole plan fits, else the host. Returns the
    residency and, when even its fixed part does not fit, that part's bytes (else None)."""
    if setting not in ("auto", "device", "host"):
        raise ConfigError(f"residency '{setting}' is not auto, device or host")
    chosen: Residency
    if setting == "auto":
        chosen = "device" if on_device.gpu_bytes_per_worker <= usable else "host"
    else:
        chosen = "device" if setting == "device" else "host"
    fixed = fixed_gpu_bytes(on_device if chosen == "device" else on_host)
    return chosen, (fixed if fixed > usable else None)


def peak_cpu_bytes(run: Callable[[], Any]) -> int:
    """Measured, not planned: the highest total of CPU bytes torch held allocated while
    ``run()`` ran (allocations minus frees in time order, from the profiler's memory records;
    what was allocated before is not counted)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    records = sorted(
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == DeviceType.CPU
    )
    total = peak = 0
    for _, nbytes in records:
        total += nbytes
        peak = max(peak, total)
    return peak
