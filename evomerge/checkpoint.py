"""Reading and validating Hugging Face model folders (:mod:`evomerge.writer` writes them).

Reading is lazy: a :class:`ModelFolder` knows every tensor's name, shape, dtype and file from
the safetensors headers, and reads one tensor at a time. Pickled ``.bin`` checkpoints are refused
unless the caller opts in, and are then loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from evomerge.errors import CheckpointError, ConfigError

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
OTHER_FILES = ("generation_config.json",)

_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(name: str | None, what: str = "dtype") -> torch.dtype | None:
    if name is None:
        return None
    try:
        return DTYPES[name]
    except KeyError:
        raise CheckpointError(
            f"{what} '{name}' is not supported (use one of {', '.join(DTYPES)})"
        ) from None


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class ModelFolder:
    """A Hugging Face model folder, opened lazily.

    ``label`` is how messages name the model (by default its folder name).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        label: str | None = None,
        allow_pickle: bool = False,
        require_config: bool = True,
    ) -> None:
        self.path = Path(path).expanduser().resolve()
        self.label = label or self.path.name
        self.allow_pickle = allow_pickle
        if not self.path.exists():
            raise CheckpointError(f"model '{self.label}': {self.path} does not exist")
        if not self.path.is_dir() and (require_config or self.path.suffix != ".safetensors"):
            raise CheckpointError(f"model '{self.label}': {self.path} is not a folder")
        self.config = self._read_config() if require_config else {}
        self._pickled: dict[Path, dict[str, torch.Tensor]] = {}
        self._handles: dict[tuple[Path, str], Any] = {}
        self.tensors = self._read_index()

    # -- reading metadata ------------------------------------------------------------------
    def _read_config(self) -> dict[str, Any]:
        file = self.path / "config.json"
        if not file.is_file():
            raise CheckpointError(f"model '{self.label}': {file} is missing")
        try:
            config = json.loads(file.read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(
                f"model '{self.label}': {file} is not valid JSON ({exc})"
            ) from None
        if not isinstance(config, dict):
            raise CheckpointError(f"model '{self.label}': {file} must hold a JSON object")
        return config

    def _read_index(self) -> dict[str, TensorInfo]:
        files = self._weight_files()
        tensors: dict[str, TensorInfo] = {}
        for file in files:
            for info in (
                self._safetensors_header(file)
                if file.suffix == ".safetensors"
                else self._pickle_header(file)
            ):
                tensors[info.name] = info
        if not tensors:
            raise CheckpointError(f"model '{self.label}': no tensors found in {self.path}")
        return tensors

    def _weight_files(self) -> list[Path]:
        if self.path.is_file():
            return [self.path]
        index = self.path / SAFETENSORS_INDEX
        if index.is_file():
            return self._files_from_index(index)
        single = self.path / "model.safetensors"
        if single.is_file():
            return [single]
        shards = sorted(self.path.glob("*.safetensors"))
        if shards:
            return shards
        pickles = (
            [self.path / "pytorch_model.bin"] if (self.path / "pytorch_model.bin").is_file() else []
        )
        if (self.path / PICKLE_INDEX).is_file():
            pickles = self._files_from_index(self.path / PICKLE_INDEX)
        if pickles:
            if not self.allow_pickle:
                raise CheckpointError(
                    f"model '{self.label}': {self.path} holds only pickled weights "
                    f"({pickles[0].name}); pickles can run code when loaded, so they are refused. "
                    "Convert the model to safetensors, or pass --allow-pickle to load them with "
                    "torch.load(weights_only=True)"
                )
            return pickles
        raise CheckpointError(f"model '{self.label}': no safetensors weights in {self.path}")

    def _files_from_index(self, index: Path) -> list[Path]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(
                f"model '{self.label}': {index} is not a valid index ({exc})"
            ) from None
        files = [self.path / name for name in names]
        for file in files:
            if not file.is_file():
                raise CheckpointError(
                    f"model '{self.label}': {index.name} names {file.name}, which is missing"
                )
        return files

    def _safetensors_header(self, file: Path) -> Iterator[TensorInfo]:
        """Parse the header and check that every tensor's bytes lie inside the file."""
        try:
            size = file.stat().st_size
            with file.open("rb") as handle:
                raw = handle.read(8)
                if len(raw) < 8:
                    raise ValueError("file is shorter than a safetensors header")
                (length,) = struct.unpack("<Q", raw)
                if length > size - 8:
                    raise ValueError("header runs past the end of the file (truncated?)")
                header = json.loads(handle.read(length))
        except (OSError, ValueError) as exc:
            raise CheckpointError(
                f"model '{self.label}': {file} is not a readable safetensors file ({exc})"
            ) from None
        data_size = size - 8 - length
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            try:
                _begin, end = meta["data_offsets"]
                dtype = _ST_DTYPES[meta["dtype"]]
                shape = tuple(int(d) for d in meta["shape"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(
                    f"model '{self.label}': {file} has a malformed entry for tensor {name}"
                ) from None
            if end > data_size:
                raise CheckpointError(
                    f"model '{self.label}': {file} is truncated: tensor {name} needs bytes up to "
                    f"{end + 8 + length}, the file has {size}"
                )
            yield TensorInfo(name=name, shape=shape, dtype=dtype, file=file)

    def _pickle_header(self, file: Path) -> Iterator[TensorInfo]:
        for name, tensor in self._load_pickle(file).items():
            yield TensorInfo(name=name, shape=tuple(tensor.shape), dtype=tensor.dtype, file=file)

    def _load_pickle(self, file: Path) -> dict[str, torch.Tensor]:
        if file not in self._pickled:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:
                raise CheckpointError(
                    f"model '{self.label}': {file} could not be loaded with "
                    f"weights_only=True ({exc})"
                ) from None
            if not isinstance(state, dict):
                raise CheckpointError(f"model '{self.label}': {file} does not hold a state dict")
            self._pickled[file] = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        return self._pickled[file]

    # -- facts -------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int | None:
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            value = self.config.get(key)
            if isinstance(value, int):
                return value
        text = self.config.get("text_config")
        if isinstance(text, dict) and isinstance(text.get("num_hidden_layers"), int):
            return text["num_hidden_layers"]
        return None

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or []
        return str(archs[0]) if archs else str(self.config.get("model_type", "unknown"))

    # -- reading tensors ---------------------------------------------------------------------
    def read(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """Read one tensor; errors name the model, the file and the tensor."""
        try:
            info = self.tensors[name]
        except KeyError:
            raise CheckpointError(f"model '{self.label}' has no tensor {name}") from None
        if info.file.suffix != ".safetensors":
            return self._load_pickle(info.file)[name].to(device)
        key = (info.file, str(device))
        try:
            handle = self._handles.get(key)
            if handle is None:
                handle = safe_open(str(info.file), framework="pt", device=str(device))
                self._handles[key] = handle
            return handle.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise CheckpointError(
                f"model '{self.label}': cannot read tensor {name} from {info.file} ({exc})"
            ) from None

    def close(self) -> None:
        self._handles.clear()
        self._pickled.clear()

    def __repr__(self) -> str:
        return f"ModelFolder({str(self.path)!r}, label={self.label!r})"


def path_labels(paths: Sequence[str | os.PathLike[str]]) -> list[str]:
    """A short name for each model folder: its shortest path suffix that no other folder's path
    ends with (``runs/math/final`` and ``runs/code/final`` give ``math/final`` and
    ``code/final``; folders with distinct names keep their name). A folder given twice gets
    the same name twice: :func:`source_labels` refuses that."""
    parts = [Path(p).expanduser().resolve().parts for p in paths]
    labels = []
    for own in parts:
        others = [other for other in parts if other != own]
        length = 1
        while length < len(own) and any(o[-length:] == own[-length:] for o in others):
            length += 1
        labels.append(str(Path(*own[-length:])))
    return labels


def source_labels(paths: Sequence[str | os.PathLike[str]]) -> list[str]:
    """The label of each source folder of a study (see :func:`path_labels`): unique, so that
    genes and recipes can name sources by it. Two paths of one folder are refused."""
    seen: dict[Path, str] = {}
    for path in paths:
        resolved = Path(path).expanduser().resolve()
        if resolved in seen:
            raise ConfigError(
                f"sources {seen[resolved]} and {path} are the same folder ({resolved}); "
                "name each source once"
            )
        seen[resolved] = str(path)
    return path_labels(paths)


def check_compatible(models: Sequence[ModelFolder]) -> None:
    """Same architecture, same layer count, same tensor names and shapes: else a clear error."""
    first = models[0]
    for other in models[1:]:
        pair = f"'{first.label}' and '{other.label}'"
        if other.architecture != first.architecture:
            raise CheckpointError(
                f"models {pair} have different architectures "
                f"({first.architecture} vs {other.architecture})"
            )
        if other.num_layers != first.num_layers:
            raise CheckpointError(
                f"models {pair} have different layer counts "
                f"({first.num_layers} vs {other.num_layers})"
            )
        missing = sorted(set(first.tensors) - set(other.tensors))
        extra = sorted(set(other.tensors) - set(first.tensors))
        if missing:
            raise CheckpointError(
                f"tensor {missing[0]} is in '{first.label}' but missing from '{other.label}'"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            )
        if extra:
            raise CheckpointError(
                f"tensor {extra[0]} is in '{other.label}' but not in '{first.label}'"
                + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
            )
        for name, info in first.tensors.items():
            theirs = other.tensors[name].shape
            if theirs != info.shape:
                raise CheckpointError(shape_mismatch(name, first, info.shape, other, theirs))


def shape_mismatch(
    name: str, a: ModelFolder, shape_a: tuple[int, ...], b: ModelFolder, shape_b: tuple[int, ...]
) -> str:
    if ("embed" in name or "lm_head" in name or "wte" in name) and shape_a[1:] == shape_b[1:]:
        return (
            f"vocabulary mismatch: '{a.label}' has {shape_a[0]} tokens and '{b.label}' has "
            f"{shape_b[0]} (tensor {name}); merging needs one shared vocabulary"
        )
    return (
        f"tensor {name} has shape {list(shape_a)} in '{a.label}' but {list(shape_b)} in '{b.label}'"
    )
