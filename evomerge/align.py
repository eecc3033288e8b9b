"""Git Re-Basin weight matching for Llama-style models: permute a model's hidden units so its
weights match a reference's, without changing the function it computes.

Two models trained from different random initialisations compute similar functions with
their hidden units in different orders; averaging them then mixes unrelated units. Fine-tunes
of one base share the base's order and need no alignment.

What is permuted, per decoder layer (``model.layers.N``), and why the function is unchanged:

* MLP: the intermediate units. A permutation ``P`` of the rows of ``gate_proj`` and
  ``up_proj`` and of the columns of ``down_proj`` leaves ``down(act(gate x) * up x)`` as is.
* Attention: whole heads, never the dimensions inside a head (rotary embeddings rotate pairs
  of a head's dimensions, so those are tied to their positions). With grouped-query attention
  the key/value heads are permuted as groups, each key/value head carrying its query heads,
  and the query heads are also permuted within their group. ``o_proj``'s columns follow the
  query heads. Softmax attention is per head, so the output is unchanged.

The residual stream (the hidden dimension) is not permuted: that would need permuting the
embeddings, every norm weight, every projection's input and ``lm_head`` together (possible
in principle, RMSNorm weights being diagonal, but out of scope). With the residual basis
fixed, the weight-matching objective (sum of ``<W_ref, P W>`` over a layer's tensors, i.e.
the smallest ``||W_ref - P W||``) decomposes into one independent problem per layer and per
block, each a linear assignment, so one pass solves it exactly. For attention the objective
is solved exactly too: the best query-head matching inside each pair of groups is itself an
assignment, whose value enters the assignment of the groups.

Linear assignments use :func:`scipy.optimize.linear_sum_assignment` when SciPy is
installed, else an exact Hungarian algorithm in NumPy (:func:`hungarian`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from evomerge.checkpoint import OTHER_FILES, TOKENIZER_FILES, ModelFolder, check_compatible
from evomerge.errors import CheckpointError
from evomerge.writer import CheckpointWriter, check_output_dir

LLAMA_STYLE = ("llama", "mistral")
"""``model_type`` values whose checkpoints use Llama's tensor names and attention."""

MLP_ROWS = ("gate_proj", "up_proj")
ATTN_ROWS_KV = ("k_proj", "v_proj")


@dataclass(frozen=True)
class LlamaShape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads


@dataclass(frozen=True)
class LayerPermutation:
    """Where each unit of the aligned model comes from: ``aligned[i] = model[perm[i]]``."""

    mlp: torch.Tensor
    """Intermediate units, shape ``[intermediate]``."""
    kv: torch.Tensor
    """Key/value heads (groups), shape ``[kv_heads]``."""
    query: torch.Tensor
    """Query heads, shape ``[heads]``: aligned query head ``i`` is model head ``query[i]``
    (always a head of the group ``kv`` puts at ``i // group``)."""

    def is_identity(self) -> bool:
        return all(torch.equal(p, torch.arange(len(p))) for p in (self.mlp, self.kv, self.query))


@dataclass
class LayerReport:
    layer: int
    distance_before: float
    """``||W_ref - W||`` over the layer's attention and MLP tensors."""
    distance_after: float
    reference_norm: float
    moved_units: int
    """Intermediate units plus query heads not left in place."""


@dataclass
class AlignReport:
    layers: list[LayerReport] = field(default_factory=list)
    out_dir: Path | None = None

    @property
    def distance_before(self) -> float:
        return float(sum(r.distance_before**2 for r in self.layers) ** 0.5)

    @property
    def distance_after(self) -> float:
        return float(sum(r.distance_after**2 for r in self.layers) ** 0.5)

    @property
    def reference_norm(self) -> float:
        return float(sum(r.reference_norm**2 for r in self.layers) ** 0.5)


# -- linear assignment -----------------------------------------------------------------------
def hungarian(score: np.ndarray) -> np.ndarray:
    """Exact maximum-score assignment of a square matrix: ``cols[i]`` for each row ``i``.

    The O(n^3) Hungarian algorithm with potentials (shortest augmenting paths).
    """
    cost = -np.asarray(score, dtype=np.float64)
    n = cost.shape[0]
    if cost.shape != (n, n):
        raise ValueError("hungarian needs a square matrix")
    inf = float("inf")
    u = np.zeros(n + 1)
    v = np.zeros(n + 1)
    match = np.zeros(n + 1, dtype=np.int64)  # match[col] = row (1-based; 0: free)
    way = np.zeros(n + 1, dtype=np.int64)
    for row in range(1, n + 1):
        match[0] = row
        col0 = 0
        minv = np.full(n + 1, inf)
        used = np.zeros(n + 1, dtype=bool)
        while True:
            used[col0] = True
            row0 = match[col0]
            free = ~used[1:]
            cur = cost[row0 - 1] - u[row0] - v[1:]
            better = free & (cur < minv[1:])
            minv[1:][better] = cur[better]
            way[1:][better] = col0
            candidates = np.where(free, minv[1:], inf)
            col1 = int(np.argmin(candidates)) + 1
            delta = candidates[col1 - 1]
            u[match[used]] += delta
            v[used] -= delta
            minv[1:][free] -= delta
            col0 = col1
            if match[col0] == 0:
                break
        while col0:
            col1 = way[col0]
            match[col0] = match[col1]
            col0 = col1
    cols = np.empty(n, dtype=np.int64)
    cols[match[1:] - 1] = np.arange(n)
    return cols


def assign(score: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Maximum-score assignment of a square score matrix: (``perm``, total score), where
    reference unit ``i`` is matched with model unit ``perm[i]``."""
    matrix = score.detach().to(torch.float64).cpu().numpy()
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:  # pragma: no cover - SciPy is normally installed
        cols = hungarian(matrix)
    else:
        rows, cols = linear_sum_assignment(matrix, maximize=True)
        cols = cols[np.argsort(rows)]
    total = float(matrix[np.arange(len(cols)), cols].sum())
    return torch.as_tensor(cols, dtype=torch.long), total


# -- shapes and names ------------------------------------------------------------------------
def llama_shape(config: Mapping, label: str = "model") -> LlamaShape:
    """The dimensions align needs, from a ``config.json``; a one-line error for other models."""
    model_type = config.get("model_type")
    if model_type not in LLAMA_STYLE:
        arch = (config.get("architectures") or [model_type or "unknown"])[0]
        raise CheckpointError(
            f"model '{label}' is a {arch} (model_type {model_type!r}); align handles "
            f"Llama-style models only ({', '.join(LLAMA_STYLE)})"
        )
    try:
        hidden = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        shape = LlamaShape(
            layers=int(config["num_hidden_layers"]),
            hidden=hidden,
            intermediate=int(config["intermediate_size"]),
            heads=heads,
            kv_heads=kv_heads,
            head_dim=int(config.get("head_dim") or hidden // heads),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"model '{label}': config.json lacks a usable {exc}") from None
    if kv_heads < 1 or heads % kv_heads:
        raise CheckpointError(
            f"model '{label}': {heads} attention heads do not split into {kv_heads} KV groups"
        )
    return shape


def layer_tensor_names(layer: int) -> dict[str, str]:
    """Short names (``q_proj`` ...) to full tensor names of one decoder layer's weights."""
    prefix = f"model.layers.{layer}"
    names = {p: f"{prefix}.self_attn.{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    names.update({p: f"{prefix}.mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")})
    return names


def _bias_name(weight_name: str) -> str:
    return weight_name[: -len("weight")] + "bias"


def _expected_shapes(shape: LlamaShape) -> dict[str, tuple[int, int]]:
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    return {
        "q_proj": (q, shape.hidden),
        "k_proj": (kv, shape.hidden),
        "v_proj": (kv, shape.hidden),
        "o_proj": (shape.hidden, q),
        "gate_proj": (shape.intermediate, shape.hidden),
        "up_proj": (shape.intermediate, shape.hidden),
        "down_proj": (shape.hidden, shape.intermediate),
    }


# -- pure tensor math on one layer ------------------------------------------------------------
Layer = dict[str, torch.Tensor]
"""One layer's tensors by short name: ``q_proj`` ... weights, ``q_proj.bias`` ... biases."""


def _rows(t: torch.Tensor, units: int) -> torch.Tensor:
    """A row-unit tensor (weight [units*d, H] or bias [units*d]) as [units, d*H] float32."""
    return t.detach().to(torch.float32).reshape(units, -1)


def _cols(t: torch.Tensor, units: int) -> torch.Tensor:
    """A column-unit weight [H, units*d] as [units, H*d] float32."""
    rows = t.shape[0]
    return t.detach().to(torch.float32).reshape(rows, units, -1).transpose(0, 1).reshape(units, -1)


def _unit_blocks(layer: Layer, names: tuple[str, ...], units: int, columns: tuple[str, ...] = ()):
    """Each unit's parameters (rows of ``names`` and their biases, columns of ``columns``)."""
    blocks = []
    for name in names:
        blocks.append(_rows(layer[name], units))
        if f"{name}.bias" in layer:
            blocks.append(_rows(layer[f"{name}.bias"], units))
    blocks.extend(_cols(layer[name], units) for name in columns)
    return torch.cat(blocks, dim=1)


def match_layer(reference: Layer, model: Layer, shape: LlamaShape) -> LayerPermutation:
    """The permutation of ``model``'s units that maximizes ``sum <W_ref, P W>`` (exactly)."""
    ref_mlp = _unit_blocks(reference, MLP_ROWS, shape.intermediate, ("down_proj",))
    mod_mlp = _unit_blocks(model, MLP_ROWS, shape.intermediate, ("down_proj",))
    mlp, _ = assign(ref_mlp @ mod_mlp.T)

    g = shape.group
    ref_q = _unit_blocks(reference, ("q_proj",), shape.heads, ("o_proj",)).reshape(
        shape.kv_heads, g, -1
    )
    mod_q = _unit_blocks(model, ("q_proj",), shape.heads, ("o_proj",)).reshape(
        shape.kv_heads, g, -1
    )
    kv_score = (
        _unit_blocks(reference, ATTN_ROWS_KV, shape.kv_heads)
        @ _unit_blocks(model, ATTN_ROWS_KV, shape.kv_heads).T
    )
    inner: dict[tuple[int, int], torch.Tensor] = {}
    score = kv_score.to(torch.float64).clone()
    for a in range(shape.kv_heads):
        for b in range(shape.kv_heads):
            perm, value = assign(ref_q[a] @ mod_q[b].T)
            inner[a, b] = perm
            score[a, b] += value
    kv, _ = assign(score)
    query = torch.cat([kv[a] * g + inner[a, int(kv[a])] for a in range(shape.kv_heads)])
    return LayerPermutation(mlp=mlp, kv=kv, query=query)


def _head_index(perm: torch.Tensor, dim: int) -> torch.Tensor:
    """Expand a permutation of heads to one of their ``dim`` rows each."""
    return (perm[:, None] * dim + torch.arange(dim)[None, :]).reshape(-1)


def permute_layer(layer: Layer, perm: LayerPermutation, shape: LlamaShape) -> Layer:
    """``layer`` with its units reordered by ``perm`` (exact copies of the values)."""
    q_index = _head_index(perm.query, shape.head_dim)
    kv_index = _head_index(perm.kv, shape.head_dim)
    row_index = {
        "q_proj": q_index,
        "k_proj": kv_index,
        "v_proj": kv_index,
        "gate_proj": perm.mlp,
        "up_proj": perm.mlp,
    }
    col_index = {"o_proj": q_index, "down_proj": perm.mlp}
    out: Layer = {}
    for name, tensor in layer.items():
        short = name.removesuffix(".bias")
        if short in row_index:
            out[name] = tensor.index_select(0, row_index[short])
        elif short in col_index and not name.endswith(".bias"):
            out[name] = tensor.index_select(1, col_index[short])
        else:
            out[name] = tensor
    return out


def layer_distance(a: Layer, b: Layer) -> float:
    return float(
        sum(torch.sum((a[n].to(torch.float32) - b[n].to(torch.float32)) ** 2) for n in a if n in b)
        ** 0.5
    )


def layer_norm(a: Layer) -> float:
    return float(sum(torch.sum(t.to(torch.float32) ** 2) for t in a.values()) ** 0.5)


# -- state dicts and folders ------------------------------------------------------------------
def _layer_names(tensors: Mapping | set, layer: int) -> dict[str, str]:
    """Short names to full names of the permuted tensors of ``layer`` present in ``tensors``."""
    names: dict[str, str] = {}
    for short, full in layer_tensor_names(layer).items():
        names[short] = full
        if _bias_name(full) in tensors:
            names[f"{short}.bias"] = _bias_name(full)
    return names


def permute_state_dict(
    state: Mapping[str, torch.Tensor], perms: Mapping[int, LayerPermutation], shape: LlamaShape
) -> dict[str, torch.Tensor]:
    """A copy of ``state`` with layer ``n``'s units reordered by ``perms[n]``."""
    out = dict(state)
    for layer, perm in perms.items():
        names = _layer_names(state, layer)
        permuted = permute_layer({s: state[f] for s, f in names.items()}, perm, shape)
        out.update({names[s]: t for s, t in permuted.items()})
    return out


def align_state_dict(
    model: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], shape: LlamaShape
) -> tuple[dict[str, torch.Tensor], dict[int, LayerPermutation]]:
    """``model`` permuted to match ``reference``, and the permutation of each layer."""
    perms = {}
    for layer in range(shape.layers):
        names = _layer_names(model, layer)
        perms[layer] = match_layer(
            {s: reference[f] for s, f in names.items()},
            {s: model[f] for s, f in names.items()},
            shape,
        )
    return permute_state_dict(model, perms, shape), perms


def check_alignable(model: ModelFolder, reference: ModelFolder) -> LlamaShape:
    """Both Llama-style, same dimensions and tensors: the shape; else a one-line error."""
    shape = llama_shape(model.config, model.label)
    ref_shape = llama_shape(reference.config, reference.label)
    if shape != ref_shape:
        diffs = [
            f"{f} {getattr(shape, f)} vs {getattr(ref_shape, f)}"
            for f in LlamaShape.__dataclass_fields__
            if getattr(shape, f) != getattr(ref_shape, f)
        ]
        raise CheckpointError(
            f"models '{model.label}' and '{reference.label}' differ in shape ({', '.join(diffs)})"
        )
    check_compatible([reference, model])
    for layer in range(shape.layers):
        for short, full in layer_tensor_names(layer).items():
            info = model.tensors.get(full)
            if info is None:
                raise CheckpointError(f"model '{model.label}' has no tensor {full}")
            if tuple(info.shape) != _expected_shapes(shape)[short]:
                raise CheckpointError(
                    f"model '{model.label}': tensor {full} has shape {list(info.shape)}, "
                    f"expected {list(_expected_shapes(shape)[short])} from its config.json"
                )
    extra = [n for n in model.tensors if re.search(r"\.(q_norm|k_norm)\.", n)]
    if extra:
        raise CheckpointError(f"model '{model.label}': tensor {extra[0]} is not Llama-style")
    return shape


def align_folder(
    model_path: str | os.PathLike[str],
    reference_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    force: bool = False,
    shard_size: int = 5 * 2**30,
    on_layer: Callable[[LayerReport], None] | None = None,
) -> AlignReport:
    """Write ``model`` with its units permuted to match ``reference`` into ``out_dir``.

    Streams one layer at a time; nothing appears at ``out_dir`` unless everything succeeded.
    Config, tokenizer and generation files are copied from ``model``.
    """
    out = Path(out_dir).expanduser().resolve()
    check_output_dir(out, force)
    model = ModelFolder(model_path, label=Path(model_path).name)
    reference = ModelFolder(reference_path, label=Path(reference_path).name)
    if model.path == reference.path:
        raise CheckpointError(f"MODEL and --to are the same folder ({model.path})")
    if out in (model.path, reference.path):
        raise CheckpointError(f"--out {out} is one of the input folders")
    shape = check_alignable(model, reference)
    layout = [(name, tuple(info.shape), info.dtype) for name, info in model.tensors.items()]
    report = AlignReport()
    done: set[str] = set()
    with CheckpointWriter(out, layout, shard_size=shard_size, force=force) as writer:
        for layer in range(shape.layers):
            names = _layer_names(model.tensors, layer)
            ref_layer = {s: reference.read(f) for s, f in names.items()}
            mod_layer = {s: model.read(f) for s, f in names.items()}
            perm = match_layer(ref_layer, mod_layer, shape)
            aligned = permute_layer(mod_layer, perm, shape)
            moved = int((perm.mlp != torch.arange(shape.intermediate)).sum()) + int(
                (perm.query != torch.arange(shape.heads)).sum()
            )
            item = LayerReport(
                layer=layer,
                distance_before=layer_distance(ref_layer, mod_layer),
                distance_after=layer_distance(ref_layer, aligned),
                reference_norm=layer_norm(ref_layer),
                moved_units=moved,
            )
            report.layers.append(item)
            for short, full in names.items():
                writer.add(full, aligned[short])
                done.add(full)
            if on_layer is not None:
                on_layer(item)
        for name in model.tensors:
            if name not in done:
                writer.add(name, model.read(name))
        writer.write_json("config.json", model.config)
        for name in (*TOKENIZER_FILES, *OTHER_FILES):
            if (model.path / name).is_file():
                writer.copy_file(model.path / name)
        report.out_dir = writer.commit()
    model.close()
    reference.close()
    return report
