"""What a tensor is, from its name: its layer index and its kind.

Kinds: ``embedding``, ``head``, ``norm``, ``attention``, ``mlp``, and ``other`` for anything
unrecognised. Embeddings and heads live outside the blocks; inside a block norms are checked
before attention, so ``post_attention_layernorm`` is a norm.
"""

from __future__ import annotations

import re
from typing import Literal

TensorKind = Literal["embedding", "head", "norm", "attention", "mlp", "other"]
KINDS: tuple[str, ...] = ("embedding", "head", "norm", "attention", "mlp", "other")

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")

# Checked in this order; the first kind with a matching pattern wins.
KIND_PATTERNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("embedding", ("embed_tokens", "wte", "wpe", "word_embeddings", "embed_in", "embeddings")),
    ("head", ("lm_head", "embed_out", "output.weight")),
    ("norm", ("norm", "ln_", "ln1", "ln2")),
    ("attention", ("self_attn", "attention", "attn")),
    ("mlp", ("mlp", "feed_forward", "ffn")),
)


def layer_index(name: str) -> int | None:
    """The transformer-block index in a tensor name, or None for embeddings, head, final norm."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def with_layer_index(name: str, index: int) -> str:
    """The same tensor name with its block index replaced."""
    match = _LAYER.search(name)
    if not match:
        raise ValueError(f"tensor {name} belongs to no layer")
    start, end = match.span(1)
    return f"{name[:start]}{index}{name[end:]}"


def tensor_kind(name: str) -> TensorKind:
    """Classify a tensor by name; see KIND_PATTERNS."""
    in_layer = layer_index(name) is not None
    for kind, patterns in KIND_PATTERNS:
        if in_layer and kind in ("embedding", "head"):
            continue
        if any(pattern in name for pattern in patterns):
            return kind  # type: ignore[return-value]
    return "other"


def layer_position(name: str, num_layers: int) -> float:
    """Where a tensor sits on a gradient: block i of n is at i/(n-1); others at 0 (as mergekit)."""
    index = layer_index(name)
    if index is None:
        return 0.0
    return index / (num_layers - 1) if num_layers > 1 else 1.0
