"""Arguments several commands share: which study, where to compute, sizes and limits.

Parsing a value here only checks its form; what it means is checked by the library.
"""

from __future__ import annotations

import argparse

from evomerge.errors import ConfigError

TRIAL_HELP = (
    "best (highest weighted objectives), a trial number, or pareto:K (row K of `evomerge pareto`)"
)


def add_storage(parser: argparse.ArgumentParser, *, required: bool = True, help: str = "") -> None:
    """``--storage``: a database URL or an SQLite file."""
    parser.add_argument("--storage", required=required, help=help or "database URL or SQLite file")


def add_study(
    parser: argparse.ArgumentParser, *, required: bool = True, overrides: bool = False
) -> None:
    """``--storage`` and ``--study``; with ``overrides`` both are optional and override a YAML."""
    suffix = " (overrides the YAML)" if overrides else ""
    add_storage(parser, required=required, help=f"database URL or SQLite file{suffix}")
    parser.add_argument("--study", required=required, help=f"study name{suffix}")


def add_device(parser: argparse.ArgumentParser, help: str = "") -> None:
    """``--device``: cpu (the default), cuda, cuda:1 ..."""
    parser.add_argument(
        "--device", default="cpu", help=help or "where to compute: cpu, cuda, cuda:1 ..."
    )


def add_quiet(parser: argparse.ArgumentParser, help: str = "no progress bar") -> None:
    parser.add_argument("--quiet", action="store_true", help=help)


def add_allow_pickle(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="accept pickled .bin checkpoints (loaded with weights_only=True)",
    )


def parse_size(text: str) -> int:
    """'5GB' -> 5*10**9, '512MiB' -> 512*2**20, '1000' -> 1000 bytes (an argparse type)."""
    from evomerge.util import parse_size as parse

    try:
        return parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_limit(text: str) -> int | float:
    """'50' -> 50, '0.25' -> 0.25; the evaluators check the range."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"'{text}' is not a number (a count like 50 or a fraction like 0.25)"
        ) from None
    return int(value) if value.is_integer() else value


def check_device(device: str) -> str:
    """``device`` if torch knows it and this machine has it; a ConfigError naming --device."""
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(
            f"--device '{device}' is not a device name (cpu, cuda, cuda:0, ...)"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s)")
    return device
