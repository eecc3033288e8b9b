"""The diagonal empirical Fisher of a model on some data, for the ``fisher`` merge method.

What is computed: for samples s = 1..N, each a token sequence of which the last ``targets``
tokens are scored, l_s is the sum of the log-probabilities of those tokens, each given the ones
before it, and g_s = d l_s / d theta. The diagonal empirical Fisher is

    F = (1/N) sum_s g_s**2        (element-wise; float32)

With ``batch_size`` 1 (the default) that is exactly what :func:`estimate_fisher` returns: one
forward and one backward per sample. With ``batch_size`` B > 1 each backward gives the gradient
of a batch's summed log-likelihood G_b = sum_{s in b} g_s, and the estimate is
(1/N) sum_b G_b**2: the per-sample squares plus the cross terms g_s * g_t of samples sharing a
batch. Those cancel on average only where the mean gradient is near zero (a model at an optimum
of its data), so a larger batch is a faster approximation, not the definition.

Data: an lm-eval task's documents give one sample each, the context followed by the gold
continuation, with only the continuation scored (tokenized as lm-eval does); a text file gives
non-overlapping windows of ``max_length`` tokens, every token but a window's first scored.

Tied weights: every name of ``named_parameters(remove_duplicate=False)`` gets a Fisher; names
that share a parameter share its Fisher. Buffers are not parameters and get none.
"""

from __future__ import annotations

import hashlib
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from evomerge.errors import ConfigError, EvaluationError

FISHER_RECORD = "fisher.json"
DEFAULT_MAX_LENGTH_CAP = 2048
"""Longest text window when ``max_length`` is not given: the model's context, capped here."""


@dataclass(frozen=True)
class Sample:
    """One sample: the token ids fed to the model; the last ``targets`` of them are scored."""

    ids: tuple[int, ...]
    targets: int

    def __post_init__(self) -> None:
        if not 1 <= self.targets < len(self.ids):
            raise ValueError(
                f"a sample of {len(self.ids)} tokens cannot score {self.targets} of them "
                "(each scored token needs one before it)"
            )


# --- data -----------------------------------------------------------------------------------


def encode_pair(tokenizer: Any, context: str, continuation: str) -> Sample:
    """Context and continuation tokenized as lm-eval's Hugging Face model does: trailing
    spaces of the context move to the continuation, the pair is encoded whole, and the
    continuation is what follows the context's own tokens. An empty context gets the
    tokenizer's BOS (else EOS) token, lm-eval's prefix token."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation = context[-spaces:] + continuation
        context = context[:-spaces]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    target_ids = whole[len(context_ids) :]
    if not context_ids:
        prefix = tokenizer.bos_token_id
        prefix = tokenizer.eos_token_id if prefix is None else prefix
        if prefix is None:
            raise EvaluationError(
                "a document has an empty context and the tokenizer has no BOS or EOS token"
            )
        context_ids = [prefix]
    if not target_ids:
        raise EvaluationError(f"the gold continuation {continuation!r} has no tokens")
    return Sample(tuple(context_ids) + tuple(target_ids), len(target_ids))


def task_samples(
    tokenizer: Any, tasks: Sequence[str], include_paths: Sequence[str | os.PathLike[str]] = ()
) -> list[Sample]:
    """One sample per document of each lm-eval task (groups expand to their tasks): the
    document's prompt (few-shot context included, as the task builds it) and its gold
    continuation, in lm-eval's document order."""
    from evomerge.evaluate.harness import LmEvalConfig, _find_tasks, _quiet_lm_eval

    config = LmEvalConfig(tasks=list(tasks), include_paths=[Path(p) for p in include_paths])
    with _quiet_lm_eval():
        manager = _find_tasks(config)
        try:
            loaded = manager.load(list(dict.fromkeys(tasks)))
        except EvaluationError:
            raise
        except Exception as exc:
            raise EvaluationError(
                f"lm_eval: could not load {', '.join(tasks)}: {type(exc).__name__}: {exc}"
            ) from exc
        samples: list[Sample] = []
        for name, task in dict(loaded["tasks"]).items():
            samples.extend(_gold_samples(tokenizer, name, task))
    return samples


def _gold_samples(tokenizer: Any, name: str, task: Any) -> list[Sample]:
    if hasattr(task, "set_fewshot_seed"):
        task.set_fewshot_seed(seed=1234)
    task.build_all_requests(rank=0, world_size=1)
    kind = task.OUTPUT_TYPE
    samples = []
    for instance in task.instances:
        if kind == "loglikelihood":
            context, continuation = instance.args[:2]
        elif kind == "multiple_choice":
            gold = task.doc_to_target(instance.doc)
            if isinstance(gold, str):
                gold = list(task.doc_to_choice(instance.doc)).index(gold)
            if isinstance(gold, list):  # several right answers: the first
                gold = gold[0]
            if instance.idx != gold:
                continue
            context, continuation = instance.args[:2]
        elif kind == "generate_until":
            context, continuation = instance.args[0], str(task.doc_to_target(instance.doc))
        else:
            raise EvaluationError(
                f"lm_eval task {name}: output type {kind!r} has no gold continuation "
                "(use --text for a text to score)"
            )
        samples.append(encode_pair(tokenizer, context, continuation))
    if not samples:
        raise EvaluationError(f"lm_eval task {name} has no documents")
    return samples


def text_samples(tokenizer: Any, text: str, max_length: int) -> list[Sample]:
    """Non-overlapping windows of ``max_length`` tokens of ``text`` (no special tokens); every
    token but a window's first is scored. A last window of one token is dropped."""
    if max_length < 2:
        raise ConfigError(f"the window length must be at least 2 tokens, got {max_length}")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = [ids[start : start + max_length] for start in range(0, len(ids), max_length)]
    samples = [Sample(tuple(w), len(w) - 1) for w in windows if len(w) >= 2]
    if not samples:
        raise ConfigError(f"the text has {len(ids)} token(s); need at least 2")
    return samples


def model_max_length(model: Any, cap: int = DEFAULT_MAX_LENGTH_CAP) -> int:
    config = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value >= 2:
            return min(value, cap)
    return cap


def choose_samples(samples: Sequence[Sample], count: int | None, seed: int = 0) -> list[Sample]:
    """At most ``count`` of ``samples``: a seeded choice kept in the original order (all of
    them when ``count`` is None or not smaller)."""
    if count is not None and count < 1:
        raise ConfigError(f"--samples must be at least 1, got {count}")
    if count is None or count >= len(samples):
        return list(samples)
    picked = sorted(random.Random(f"fisher:{seed}").sample(range(len(samples)), count))
    return [samples[i] for i in picked]


# --- the estimate ---------------------------------------------------------------------------


def estimate_fisher(
    model: torch.nn.Module,
    samples: Sequence[Sample],
    *,
    batch_size: int = 1,
    pad_id: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """The diagonal empirical Fisher of ``model`` on ``samples`` (see the module doc): a
    float32 tensor on the model's device per name of ``named_parameters(remove_duplicate=
    False)``. ``batch_size`` 1 is exact; more is the batch approximation. Memory: the model,
    its gradients and one float32 running sum per parameter. ``progress(done, total)`` is
    called after each batch with samples done."""
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    if not samples:
        raise ConfigError("no samples to estimate the Fisher on")
    named = list(model.named_parameters(remove_duplicate=False))
    unique: dict[int, torch.nn.Parameter] = {}
    for _, param in named:
        unique.setdefault(id(param), param)
    params = list(unique.values())
    sums = {key: torch.zeros_like(p, dtype=torch.float32) for key, p in unique.items()}
    device = params[0].device
    flags = [p.requires_grad for p in params]
    was_training = model.training
    model.eval()  # no dropout: the Fisher of the model as it is used
    try:
        for p in params:
            p.requires_grad_(True)
        for first in range(0, len(samples), batch_size):
            batch = samples[first : first + batch_size]
            width = max(len(s.ids) for s in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            scored = torch.zeros((len(batch), width), dtype=torch.bool)
            for row, sample in enumerate(batch):
                n = len(sample.ids)
                ids[row, :n] = torch.tensor(sample.ids, dtype=torch.long)
                mask[row, :n] = 1
                scored[row, n - sample.targets : n] = True
            ids, mask, scored = ids.to(device), mask.to(device), scored.to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            logp = torch.log_softmax(logits, dim=-1)
            token_logp = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
            loglik = (token_logp * scored[:, 1:]).sum()
            grads = torch.autograd.grad(loglik, params, allow_unused=True)
            for key, grad in zip(unique, grads, strict=True):
                if grad is not None:
                    g = grad.float()
                    sums[key].addcmul_(g, g)
            del logits, logp, token_logp, loglik, grads
            if progress is not None:
                progress(min(first + batch_size, len(samples)), len(samples))
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
        model.train(was_training)
    for total in sums.values():
        total.div_(len(samples))
    return {name: sums[id(param)] for name, param in named}


# --- the folder -----------------------------------------------------------------------------


def write_fisher(
    folder: str | os.PathLike[str],
    tensors: dict[str, torch.Tensor],
    record: dict[str, Any],
    *,
    force: bool = False,
) -> Path:
    """Write ``tensors`` (float32) as ``model.safetensors`` and ``record`` as ``fisher.json``
    into ``folder``, atomically: the folder appears whole or not at all. An existing non-empty
    folder is replaced only with ``force``."""
    from evomerge.writer import CheckpointWriter

    layout = [(name, tuple(t.shape), torch.float32) for name, t in tensors.items()]
    with CheckpointWriter(folder, layout, force=force) as writer:
        for name, tensor in tensors.items():
            writer.add(name, tensor.detach().to(torch.float32))
        writer.write_json(FISHER_RECORD, record)
        return writer.commit()


def text_record(path: str | os.PathLike[str], text: str, max_length: int) -> dict[str, Any]:
    return {
        "kind": "text",
        "file": str(Path(path).expanduser().resolve()),
        "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "max_length": max_length,
    }


def fisher_record(
    *,
    model_path: str | os.PathLike[str],
    data: dict[str, Any],
    samples: Sequence[Sample],
    available: int,
    seed: int,
    batch_size: int,
    dtype: str,
    device: str,
    seconds: float,
) -> dict[str, Any]:
    """What ``fisher.json`` holds: where the estimate came from and what it cost."""
    from evomerge import __version__

    return {
        "model": str(Path(model_path).expanduser().resolve()),
        "data": data,
        "samples": len(samples),
        "available_samples": available,
        "seed": seed,
        "tokens": sum(s.targets for s in samples),
        "input_tokens": sum(len(s.ids) for s in samples),
        "batch_size": batch_size,
        "estimate": "mean per-sample squared gradient of the log-likelihood"
        if batch_size == 1
        else f"mean squared gradient of batches of {batch_size} (approximation)",
        "dtype": dtype,
        "fisher_dtype": "float32",
        "device": device,
        "seconds": round(seconds, 4),
        "evomerge_version": __version__,
    }


def timed() -> Callable[[], float]:
    start = time.perf_counter()
    return lambda: time.perf_counter() - start
