"""Random tiny model families for tests and benchmarks: no download, seconds to build.

:func:`build_random_family` writes a randomly initialised Llama base and "fine-tunes" that are
the base plus small seeded perturbations, each a normal Hugging Face folder (config, word-level
tokenizer, safetensors). It exercises every path of the merge engine; it is not a family in
which merging is meaningful (the trained toy zoo is).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>"]


def build_tokenizer(words: list[str]):  # type: ignore[no-untyped-def]
    """A word-level tokenizer over ``words`` (plus special tokens), as a fast HF tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
    )


def tiny_llama_config(
    vocab_size: int,
    *,
    layers: int = 4,
    hidden: int = 64,
    intermediate: int = 256,
    heads: int = 4,
    tie_embeddings: bool = False,
):  # type: ignore[no-untyped-def]
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=128,
        tie_word_embeddings=tie_embeddings,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
    )


def build_random_family(
    out_dir: str | os.PathLike[str],
    *,
    sources: int = 2,
    seed: int = 0,
    layers: int = 4,
    hidden: int = 64,
    intermediate: int = 256,
    vocab_words: int = 60,
    tie_embeddings: bool = False,
    dtype: torch.dtype = torch.float32,
    delta_scale: float = 0.02,
) -> dict[str, Path]:
    """Write ``base`` and ``ft_0 .. ft_{n-1}`` under ``out_dir``; return their paths by name.

    The global torch RNG is left as it was.
    """
    from transformers import LlamaForCausalLM

    out = Path(out_dir)
    tokenizer = build_tokenizer([f"w{i}" for i in range(vocab_words)])
    config = tiny_llama_config(
        len(tokenizer),
        layers=layers,
        hidden=hidden,
        intermediate=intermediate,
        tie_embeddings=tie_embeddings,
    )
    paths: dict[str, Path] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        base = LlamaForCausalLM(config).to(dtype)
        # Norm weights start at exactly 1; perturb them so merges of norms are not trivial.
        with torch.no_grad():
            for name, param in base.named_parameters():
                if "norm" in name:
                    param.add_(torch.randn_like(param) * 0.1)
        paths["base"] = _save(base, tokenizer, out / "base")
        generator = torch.Generator().manual_seed(seed + 1)
        for index in range(sources):
            model = LlamaForCausalLM(config).to(dtype)
            model.load_state_dict(base.state_dict())
            with torch.no_grad():
                for param in model.parameters():
                    noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
                    param.add_((noise * delta_scale * (index + 1)).to(dtype))
            paths[f"ft_{index}"] = _save(model, tokenizer, out / f"ft_{index}")
    return paths


def _save(model, tokenizer, path: Path) -> Path:  # type: ignore[no-untyped-def]
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
