"""Counter-based random numbers for the merge methods' masks: the same bits on every device.

A random mask (DARE, DELLA) must not depend on where it is computed: a trial scored on a GPU and
exported on a CPU has to be the same model. ``torch.Generator`` gives a CPU and a CUDA device
different streams for one seed, so the masks come from a hash of the element's position instead:

1. A 64-bit **key** per (recipe seed, tensor name, source index): the first 8 bytes, read
   little-endian, of ``sha256(f"{seed}\\0{name}\\0{source}")`` (:func:`mask_key`, on the host).
2. For the element at flat (row-major) index ``i``, the ``(i + 1)``-th output of SplitMix64
   started at ``key``, everything modulo 2**64::

       z = key + (i + 1) * 0x9E3779B97F4A7C15
       z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
       z = (z ^ (z >> 27)) * 0x94D049BB133111EB
       z = z ^ (z >> 31)

3. Its top 24 bits make the **uniform** ``u = (z >> 40) / 2**24`` in [0, 1): a multiple of
   2**-24, exact in float32 (:func:`uniforms`). The last xor-shift leaves those bits as they
   are, so the code skips it.

So ``u`` is a pure function of (seed, name, source, i), whatever the device and the tensor's
dtype. The arithmetic runs on int64 tensors: addition and multiplication wrap modulo 2**64 in
two's complement on CPU and CUDA alike, which gives the unsigned result's bits, and each right
shift (arithmetic on int64) is masked to the bits a logical shift keeps. The work goes in
chunks (:func:`chunk_size`), so a tensor of any size needs three int64 temporaries of one chunk
each besides the float32 result.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch

UINT64 = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB
UNIFORM_BITS = 24
"""Bits per uniform: every value k / 2**24 is exact in float32."""
CHUNK = 1 << 22
"""Counters hashed at a time on an accelerator (three int64 temporaries of 32 MiB each)."""
CPU_CHUNK = 1 << 14
"""Counters hashed at a time on a CPU, per thread: the temporaries stay in the cache."""


def mask_key(seed: int, name: str, source: int) -> int:
    """The 64-bit key (an int in [0, 2**64)) of one source's mask of one tensor."""
    digest = hashlib.sha256(f"{seed}\0{name}\0{source}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _signed(value: int) -> int:
    """The int64 with the same 64 bits as the unsigned ``value``."""
    value &= UINT64
    return value - (1 << 64) if value >> 63 else value


def _low_bits(count: int) -> int:
    return (1 << count) - 1


def uniforms(
    key: int,
    shape: Sequence[int] | torch.Size,
    device: torch.device | str,
    offset: int = 0,
) -> torch.Tensor:
    """float32 uniforms in [0, 1) of the given shape on ``device``; see the module docstring.

    Element ``i`` in row-major order gets the uniform of counter ``offset + i``, so a reshape
    of the result is the result for the other shape, and the uniforms of a tensor's flat
    elements ``[a, b)`` are ``uniforms(key, (b - a,), device, offset=a)``.
    """
    if offset < 0:
        raise ValueError(f"the counter offset must be >= 0, got {offset}")
    out = torch.empty(tuple(shape), dtype=torch.float32, device=device)
    flat = out.view(-1)
    n = flat.numel()
    chunk = min(n, chunk_size(out.device))
    if chunk == 0:
        return out
    # (i + 1) * GAMMA for the counters of the first chunk; a chunk starting at counter ``s``
    # adds s * GAMMA + key.
    steps = torch.arange(1, chunk + 1, dtype=torch.int64, device=out.device).mul_(_signed(GAMMA))
    z = torch.empty_like(steps)
    shifted = torch.empty_like(steps)
    for start in range(0, n, chunk):
        size = min(chunk, n - start)
        zc, sc = z[:size], shifted[:size]
        torch.add(steps[:size], _signed(key + (offset + start) * GAMMA), out=zc)
        torch.bitwise_right_shift(zc, 30, out=sc).bitwise_and_(_low_bits(64 - 30))
        zc.bitwise_xor_(sc).mul_(_signed(MIX1))
        torch.bitwise_right_shift(zc, 27, out=sc).bitwise_and_(_low_bits(64 - 27))
        zc.bitwise_xor_(sc).mul_(_signed(MIX2))
        zc.bitwise_right_shift_(64 - UNIFORM_BITS).bitwise_and_(_low_bits(UNIFORM_BITS))
        # An int64 below 2**24 times 2**-24 in float32: exact.
        torch.mul(zc, 2.0**-UNIFORM_BITS, out=flat[start : start + size])
    return out


def chunk_size(device: torch.device) -> int:
    """Counters hashed at a time: cache-sized pieces on a CPU, large ones on an accelerator."""
    return CPU_CHUNK * max(1, torch.get_num_threads()) if device.type == "cpu" else CHUNK


def threshold(probability: float) -> float:
    """The bound ``t``, exact in float32, with ``u < t`` exactly when ``u < probability``.

    ``u`` holds multiples of 2**-24, so ``u < p`` exactly when ``u < ceil(p * 2**24) / 2**24``.
    (Comparing a float32 tensor with the float ``p`` itself would round ``p`` to float32.)
    """
    scale = 1 << UNIFORM_BITS
    return min(max(math.ceil(probability * scale), 0), scale) / scale


def thresholds(probabilities: torch.Tensor) -> torch.Tensor:
    """:func:`threshold` of each entry of a float64 tensor, as float32."""
    scale = float(1 << UNIFORM_BITS)
    return torch.ceil(probabilities * scale).clamp_(0, scale).div_(scale).float()
