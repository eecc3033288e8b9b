"""Which errors a worker survives: a failed candidate, or a worker that must be replaced.

Most errors belong to the candidate (a bad recipe, NaN, an evaluator's exception): the trial
fails and the worker goes on. Some CUDA errors are *sticky*: after an illegal memory access or
a device-side assert the CUDA context is corrupt, and every later kernel on it fails at once.
A worker that kept going would fail every later trial in milliseconds and eat the budget, so
the pool replaces it and runs the candidate again on a fresh one (within ``max_attempts``).
"""

from __future__ import annotations

STICKY_CUDA_MESSAGES = (
    "illegal memory access",
    "device-side assert",
    "unspecified launch failure",
    "misaligned address",
    "illegal instruction",
    "uncorrectable ecc error",
    "launch timed out",
    "hardware stack error",
    "cudnn_status_execution_failed",
    "cublas_status_execution_failed",
    "cuda driver error",
)
"""Phrases (lower case) of CUDA errors after which the context cannot be used again."""


def is_sticky_cuda_error(exc: BaseException) -> bool:
    """True when ``exc`` (or an exception it was raised from) is a CUDA error that leaves
    the CUDA context unusable; an out-of-memory error is not one (it frees and goes on)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = str(current).lower()
        if "out of memory" not in text and any(m in text for m in STICKY_CUDA_MESSAGES):
            return True
        current = current.__cause__ or current.__context__
    return False
