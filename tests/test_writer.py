"""The checkpoint writer: declared layout, exact bytes, shards, atomic commit."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from evomerge.errors import CheckpointError
from evomerge.writer import CheckpointWriter
from tests.helpers import load_folder


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a": torch.randn(3, 5, generator=g),
        "b": torch.randn(7, generator=g).to(torch.bfloat16),
        "c": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "empty": torch.zeros(0, 4),
        "d": torch.randn(2, 2, 2, generator=g).to(torch.float16),
    }


def _layout(tensors):
    return [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]


@pytest.mark.parametrize("shard_size", [10**9, 40])
def test_round_trip_is_exact_and_readable_by_safetensors(tmp_path, shard_size):
    tensors = _tensors()
    with CheckpointWriter(tmp_path / "out", _layout(tensors), shard_size=shard_size) as writer:
        for name in reversed(list(tensors)):  # any write order works
            writer.add(name, tensors[name])
        out = writer.commit()
    got = load_folder(out)
    assert set(got) == set(tensors)
    for name, tensor in tensors.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
    files = sorted(out.glob("*.safetensors"))
    assert (len(files) == 1) == (shard_size == 10**9)
    with safe_open(str(files[0]), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}
    for file in files:  # data starts 8-byte aligned
        assert int.from_bytes(file.read_bytes()[:8], "little") % 8 == 0


def test_a_tensor_never_written_fails_the_commit_and_leaves_nothing(tmp_path):
    tensors = _tensors()
    with pytest.raises(CheckpointError, match=r"tensor .* was declared but never written"):
        with CheckpointWriter(tmp_path / "out", _layout(tensors)) as writer:
            writer.add("a", tensors["a"])
            writer.commit()
    assert list(tmp_path.iterdir()) == []


def test_undeclared_or_mismatched_tensors_are_refused(tmp_path):
    tensors = _tensors()
    with pytest.raises(CheckpointError, match="tensor zzz was not declared"):
        with CheckpointWriter(tmp_path / "out", _layout(tensors)) as writer:
            writer.add("zzz", tensors["a"])
    with pytest.raises(CheckpointError, match=r"tensor a: declared \[3, 5\]"):
        with CheckpointWriter(tmp_path / "out", _layout(tensors)) as writer:
            writer.add("a", tensors["a"].double())
    assert list(tmp_path.iterdir()) == []
