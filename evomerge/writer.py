"""Writing a model folder: sharded safetensors laid out in advance, then one atomic rename.

The caller declares every tensor (name, shape, dtype) before writing, so each shard's header is
written first and every tensor goes straight to its offset as it is produced: memory holds one
tensor, and nothing is serialised twice. The folder is built next to ``out_dir`` under a hidden
name and renamed into place by :meth:`CheckpointWriter.commit`; on any failure it is removed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from evomerge.errors import CheckpointError
from evomerge.staging import remove_abandoned, staging_folder

SAFETENSORS_INDEX = "model.safetensors.index.json"
SYNC_EVERY = 256 * 2**20
"""Bytes written between background fsyncs, so writeback overlaps the merge."""

_DTYPE_CODES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


@dataclass(frozen=True)
class TensorSlot:
    """Where one declared tensor goes."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    shard: int
    offset: int  # from the start of the file

    @property
    def nbytes(self) -> int:
        return nbytes(self.shape, self.dtype)


def nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def check_output_dir(out_dir: Path, force: bool) -> None:
    if out_dir.exists():
        if not out_dir.is_dir():
            raise CheckpointError(f"output {out_dir} exists and is not a folder")
        if any(out_dir.iterdir()) and not force:
            raise CheckpointError(
                f"output folder {out_dir} exists and is not empty (pass --force to replace it)"
            )


class CheckpointWriter:
    """Writes declared tensors into safetensors shards of at most ``shard_size`` bytes.

    A tensor larger than ``shard_size`` gets a shard of its own. Nothing is visible at
    ``out_dir`` until :meth:`commit`; an exception inside a ``with`` block removes everything.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        layout: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
        *,
        shard_size: int = 5 * 2**30,
        force: bool = False,
    ) -> None:
        self.out_dir = Path(out_dir).expanduser().resolve()
        if shard_size <= 0:
            raise CheckpointError(f"shard size must be positive, got {shard_size}")
        check_output_dir(self.out_dir, force)
        self.slots, self.shard_names, headers = _plan_shards(layout, shard_size)
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        remove_abandoned(self.out_dir, "partial")
        self.tmp_dir = staging_folder(self.out_dir, "partial")
        self.tmp_dir.mkdir()
        self._files: list[BinaryIO] = []
        self._written: set[str] = set()
        self._unsynced = 0
        self._syncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="evomerge-fsync")
        self._sync: Future[None] | None = None
        try:
            for name, header in zip(self.shard_names, headers):
                handle = (self.tmp_dir / name).open("wb")
                self._files.append(handle)
                handle.write(header)
        except BaseException:
            self.abort()
            raise

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.abort()

    @property
    def total_bytes(self) -> int:
        return sum(slot.nbytes for slot in self.slots.values())

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write one declared tensor at its offset."""
        slot = self.slots.get(name)
        if slot is None:
            raise CheckpointError(f"tensor {name} was not declared for this checkpoint")
        if tuple(tensor.shape) != slot.shape or tensor.dtype != slot.dtype:
            raise CheckpointError(
                f"tensor {name}: declared {list(slot.shape)} {slot.dtype}, "
                f"got {list(tensor.shape)} {tensor.dtype}"
            )
        data = tensor.detach().to("cpu").contiguous()
        handle = self._files[slot.shard]
        if handle.tell() != slot.offset:
            handle.seek(slot.offset)
        if data.numel():
            handle.write(memoryview(data.view(torch.uint8).numpy()))
        self._written.add(name)
        self._unsynced += slot.nbytes
        if self._unsynced >= SYNC_EVERY and (self._sync is None or self._sync.done()):
            handle.flush()
            self._sync = self._syncer.submit(os.fsync, handle.fileno())
            self._unsynced = 0

    def write_json(self, name: str, data: Any) -> None:
        (self.tmp_dir / name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

    def write_text(self, name: str, text: str) -> None:
        (self.tmp_dir / name).write_text(text)

    def copy_file(self, source: Path) -> None:
        shutil.copy2(source, self.tmp_dir / source.name)

    def commit(self) -> Path:
        """Check every tensor was written, write the index, sync, and move into place."""
        missing = [name for name in self.slots if name not in self._written]
        if missing:
            raise CheckpointError(f"tensor {missing[0]} was declared but never written")
        self._wait_for_sync()
        for handle in self._files:
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
        if len(self.shard_names) > 1:
            weight_map = {name: self.shard_names[s.shard] for name, s in self.slots.items()}
            self.write_json(
                SAFETENSORS_INDEX,
                {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map},
            )
        if self.out_dir.exists():
            old = self.out_dir.parent / f".{self.out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(self.out_dir, old)
            os.replace(self.tmp_dir, self.out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp_dir, self.out_dir)
        return self.out_dir

    def _wait_for_sync(self) -> None:
        if self._sync is not None:
            self._sync.result()
        self._syncer.shutdown(wait=True)

    def abort(self) -> None:
        try:
            self._wait_for_sync()
        except OSError:
            pass
        for handle in self._files:
            handle.close()
        shutil.rmtree(self.tmp_dir, ignore_errors=True)


def _plan_shards(
    layout: Sequence[tuple[str, tuple[int, ...], torch.dtype]], shard_size: int
) -> tuple[dict[str, TensorSlot], list[str], list[bytes]]:
    """Group tensors into shards in order; return slots, shard file names and headers."""
    groups: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = []
    size = 0
    for entry in layout:
        size_of = nbytes(entry[1], entry[2])
        if not groups or size + size_of > shard_size:
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += size_of
    if not groups:
        raise CheckpointError("a checkpoint needs at least one tensor")
    names = (
        ["model.safetensors"]
        if len(groups) == 1
        else [f"model-{i:05d}-of-{len(groups):05d}.safetensors" for i in range(1, len(groups) + 1)]
    )
    slots: dict[str, TensorSlot] = {}
    headers = []
    for shard, group in enumerate(groups):
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        entries = []
        for name, shape, dtype in group:
            if name in slots or any(name == e[0] for e in entries):
                raise CheckpointError(f"tensor {name} is declared twice")
            if dtype not in _DTYPE_CODES:
                raise CheckpointError(f"tensor {name}: dtype {dtype} cannot be saved")
            end = offset + nbytes(shape, dtype)
            header[name] = {
                "dtype": _DTYPE_CODES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, end],
            }
            entries.append((name, shape, dtype, offset))
            offset = end
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
        prefix = len(raw).to_bytes(8, "little") + raw
        headers.append(prefix)
        for name, shape, dtype, start in entries:
            slots[name] = TensorSlot(name, tuple(shape), dtype, shard, len(prefix) + start)
    return slots, names, headers
