"""Loading a model folder for evaluation: validated first, safetensors only, no remote code."""

from __future__ import annotations

import os
from typing import Any

from evomerge.checkpoint import ModelFolder, parse_dtype
from evomerge.errors import CheckpointError

# Files any Hugging Face tokenizer is saved with (at least one of them).
_TOKENIZER_MARKERS = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
)


def fast_matmuls(device: str) -> None:
    """On CUDA, let float32 matmuls use TF32 tensor cores (bfloat16 and float16 ones use
    tensor cores anyway). A study's workers and an export's verification on the same kind of
    device both call this, so they compute alike."""
    import torch

    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def load_model_for_eval(
    folder: str | os.PathLike[str],
    device: str = "cpu",
    dtype: str | None = None,
    allow_pickle: bool = False,
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a Hugging Face folder, in eval mode on ``device``.

    The folder is validated with :class:`ModelFolder` first, so a missing, truncated or pickled
    checkpoint gives a :class:`CheckpointError` instead of a traceback. Pickled weights are refused
    unless ``allow_pickle``; remote code is never trusted. ``dtype`` ("float32", "float16",
    "bfloat16") defaults to float32 on every device: what a study worker scores in, so a score
    from ``evomerge eval`` compares with the study's.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checked = ModelFolder(folder, allow_pickle=allow_pickle)
    path = checked.path
    checked.close()
    label = f"model '{checked.label}'"
    if not any((path / name).is_file() for name in _TOKENIZER_MARKERS):
        raise CheckpointError(
            f"{label}: {path} has no tokenizer (none of {', '.join(_TOKENIZER_MARKERS)}); "
            "save the tokenizer into the model folder"
        )
    wanted = parse_dtype(dtype, "--dtype") or torch.float32
    fast_matmuls(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=wanted,
            trust_remote_code=False,
            # True: safetensors only. None (with allow_pickle): safetensors if present, else the
            # pickled .bin, which transformers loads with weights_only=True. (False would skip
            # safetensors weights altogether.)
            use_safetensors=True if not allow_pickle else None,
        )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(
            f"{label}: cannot load {path} as a causal LM ({_one_line(exc)})"
        ) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(
            f"{label}: cannot load the tokenizer in {path} ({_one_line(exc)})"
        ) from None
    model = model.to(device).eval()
    return model, tokenizer


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"
