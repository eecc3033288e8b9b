"""Strided perplexity of a causal LM over one local UTF-8 text file.

The file is tokenized once (without special tokens) when the evaluator is built and cut into the
standard Hugging Face sliding windows: windows of ``max_length`` tokens start every ``stride``
tokens, and each window scores only the tokens no earlier window scored, with the overlap as
context. The very first token has no context and is never scored; when ``stride == max_length``
the first token of every window is likewise unscored (the windows do not overlap).

Holdout: the windows are the documents. With ``holdout: FRACTION`` a share of them, chosen by a
hash of ``name`` and the window's index (``base.holdout_indices``), is scored only by
``evaluate(split="holdout")``; ``evaluate(split="search")`` scores the others. The tokens a
window scores are never scored by a window of the other split, but with overlapping windows
(``stride < max_length``) a window's context may hold tokens the other split scores; set
``stride`` to ``max_length`` to keep the splits' texts fully apart.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from evomerge.errors import EvaluationError
from evomerge.evaluate.base import (
    EvalResult,
    Evaluator,
    EvaluatorConfig,
    Split,
    check_limit,
    limit_count,
    split_indices,
)
from evomerge.evaluate.registry import register_evaluator

DEFAULT_MAX_LENGTH_CAP = 4096
IGNORE = -100


class PerplexityConfig(EvaluatorConfig):
    """Perplexity over ``file``; ``limit`` counts (or is a fraction of) windows."""

    kind: Literal["perplexity"] = "perplexity"
    file: Path
    """The UTF-8 text file to score, tokenized once without special tokens; a relative path is
    resolved against the config file's folder."""
    stride: int | None = Field(default=None, ge=1)
    """Tokens between window starts; None is half of ``max_length`` (half of each window is
    context for the other half)."""
    max_length: int | None = Field(default=None, ge=2)
    """Tokens per window; None is the model's ``max_position_embeddings`` capped at 4096."""
    name: str = Field(default="perplexity", min_length=1)
    """Metric prefix: ``{name}/perplexity`` and ``{name}/nll``."""
    batch_size: int = Field(default=1, ge=1)
    """Windows per forward pass (right-padded; results match batch size 1 up to float noise).
    Halved for the rest of the worker's life when it runs out of memory."""
    holdout: float | None = Field(default=None, gt=0, lt=1)
    """Fraction (0 < holdout < 1) of the windows held out: the search never scores them, and a
    study re-scores its front on them. round(holdout x windows) rounded half up, at least 1 and
    at least 1 left to search on (the text needs 2 windows); which ones depends only on
    ``name`` and the window's index (a SHA-256). Overlapping windows share context across the
    split: set ``stride`` equal to ``max_length`` to keep the texts apart. None: every window
    is searched on."""


def _model_max_length(model: Any) -> int:
    config = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value >= 2:
            return min(value, DEFAULT_MAX_LENGTH_CAP)
    return DEFAULT_MAX_LENGTH_CAP


def sliding_windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, target_len)`` per window: the last ``target_len`` tokens are scored."""
    windows = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_length, n_tokens)
        windows.append((begin, end, end - prev_end))
        prev_end = end
        if end == n_tokens:
            break
    return windows


@register_evaluator("perplexity", PerplexityConfig)
class PerplexityEvaluator(Evaluator):
    """Perplexity (and mean token NLL) of the model on a fixed text, recomputed every call."""

    config: PerplexityConfig

    @classmethod
    def preflight(cls, config: EvaluatorConfig) -> set[str] | None:
        assert isinstance(config, PerplexityConfig)
        if not config.file.is_file():
            raise EvaluationError(f"perplexity: text file {str(config.file)!r} does not exist")
        return {config.name}

    def __init__(self, config: PerplexityConfig, model: Any, tokenizer: Any) -> None:
        super().__init__(config, model, tokenizer)
        file = config.file
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise EvaluationError(
                f"perplexity: cannot read text file {str(file)!r}: {type(exc).__name__}: {exc}"
            ) from None
        if not text.strip():
            raise EvaluationError(f"perplexity: text file {str(file)!r} is empty")
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) < 2:
            raise EvaluationError(
                f"perplexity: text file {str(file)!r} has {len(ids)} token(s); need at least 2"
            )
        self.max_length = config.max_length or _model_max_length(model)
        stride = config.stride or max(1, self.max_length // 2)
        if stride > self.max_length:
            raise EvaluationError(
                f"perplexity ({file}): stride ({stride}) must not exceed "
                f"max_length ({self.max_length})"
            )
        self.stride = stride
        self._batch_size = config.batch_size
        self.input_ids = torch.tensor(ids, dtype=torch.long)
        self.windows = sliding_windows(len(ids), self.max_length, stride)
        if config.holdout is not None:
            self.split_windows("search")  # a text of one window is refused here, not per call

    @property
    def name(self) -> str:
        return f"perplexity:{self.config.name}"

    @property
    def batch_size(self) -> int:
        """Windows per forward pass now: the config's, or less after running out of memory."""
        return self._batch_size

    def resize_batch(self, size: int) -> None:
        self._batch_size = max(1, int(size))

    def split_windows(self, split: Split = "search") -> list[int]:
        """The indices (into ``self.windows``, in order) of the windows in ``split``."""
        return split_indices(
            self.config.name,
            len(self.windows),
            self.config.holdout,
            split,
            f"perplexity evaluator {self.config.name} ({self.config.file})",
        )

    def evaluate(self, limit: int | float | None = None, split: Split = "search") -> EvalResult:
        start = time.perf_counter()
        limit = check_limit(limit if limit is not None else self.config.limit, "perplexity")
        chosen = self.split_windows(split)
        windows = [self.windows[i] for i in chosen[: limit_count(limit, len(chosen))]]
        model = self.model
        was_training = model.training
        model.eval()
        try:
            total_nll, count = self._score(windows)
        finally:
            model.train(was_training)
        nll = total_nll / count
        name = self.config.name
        return EvalResult(
            metrics={f"{name}/perplexity": math.exp(nll), f"{name}/nll": nll},
            seconds=time.perf_counter() - start,
            details={"tokens": count, "windows": len(windows)},
        )

    def _score(self, windows: list[tuple[int, int, int]]) -> tuple[float, int]:
        device = next(self.model.parameters()).device
        pad_id = getattr(self.tokenizer, "pad_token_id", None) or 0
        total = torch.zeros((), dtype=torch.float64)
        count = 0
        size = self._batch_size
        with torch.no_grad():
            for first in range(0, len(windows), size):
                batch = windows[first : first + size]
                width = max(end - begin for begin, end, _ in batch)
                ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, (begin, end, target_len) in enumerate(batch):
                    length = end - begin
                    ids[row, :length] = self.input_ids[begin:end]
                    mask[row, :length] = 1
                    labels[row, length - target_len : length] = self.input_ids[
                        end - target_len : end
                    ]
                ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
                logits = self.model(input_ids=ids, attention_mask=mask).logits
                shift_logits = logits[:, :-1].float()
                shift_labels = labels[:, 1:]
                nll = torch.nn.functional.cross_entropy(
                    shift_logits.reshape(-1, shift_logits.shape[-1]),
                    shift_labels.reshape(-1),
                    ignore_index=IGNORE,
                    reduction="none",
                )
                total += nll.double().sum().cpu()
                count += int((shift_labels != IGNORE).sum())
        return float(total), count
