"""``evomerge export``: one trial of a study as a Hugging Face checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from evomerge.cli.args import (
    TRIAL_HELP,
    add_quiet,
    add_study,
    check_device,
    parse_size,
)
from evomerge.cli.output import format_metrics
from evomerge.util import DTYPES


def add_commands(commands: Any) -> None:
    """Register ``export``."""
    export = commands.add_parser(
        "export",
        help="export one trial of a study as a Hugging Face checkpoint",
        description="Merge one trial of a study into a Hugging Face folder with its recipe, a "
        "mergekit config when one merges the same way, and a model card. The folder appears "
        "only when everything (and --verify) succeeded.",
    )
    add_study(export)
    export.add_argument("--trial", required=True, help=TRIAL_HELP)
    export.add_argument("--out", type=Path, required=True, help="output folder (must not exist)")
    export.add_argument(
        "--verify",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="score the export again and require the recorded metrics (default: the study's "
        "export.verify)",
    )
    export.add_argument(
        "--dtype", choices=list(DTYPES), help="output dtype (default: export.dtype, the recipe's)"
    )
    export.add_argument(
        "--shard-size",
        type=parse_size,
        help="largest safetensors shard, e.g. 2GB (default: export.shard_size, 5GB)",
    )
    export.add_argument(
        "--device",
        default=None,
        help="where to merge and verify: cpu, cuda, cuda:1 ... (default: the study's device; "
        "cpu when the study ran on GPUs and this machine has none)",
    )
    export.add_argument(
        "--by",
        choices=["search", "holdout"],
        default="search",
        help="what --trial best ranks by: the searched-on documents (default) or the held-out "
        "ones (after `evomerge confirm`)",
    )
    export.add_argument(
        "--as-lora",
        type=_rank,
        metavar="RANK",
        help="also write the merged delta as a PEFT LoRA adapter of at most this rank in "
        "OUT/lora-rRANK (truncated SVD of each attention/MLP Linear; the card reports the "
        "errors and what the adapter leaves out)",
    )
    export.add_argument(
        "--force", action="store_true", help="replace an existing --out, after success"
    )
    add_quiet(export)
    export.set_defaults(handler=cmd_export)


def _rank(text: str) -> int:
    try:
        rank = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"rank must be a whole number, not {text!r}") from None
    if rank < 1:
        raise argparse.ArgumentTypeError(f"rank must be at least 1, not {rank}")
    return rank


def cmd_export(args: argparse.Namespace) -> int:
    from evomerge.progress import no_transformers_bars, progress_bar
    from evomerge.study.export import MERGEKIT_FILE, export_trial
    from evomerge.study.read import open_store

    device = None if args.device is None else check_device(args.device)
    store = open_store(args.storage)
    with (
        no_transformers_bars(),
        progress_bar("exporting", total=0, enabled=not args.quiet) as advance,
    ):
        result = export_trial(
            store,
            args.study,
            args.trial,
            args.out,
            verify=args.verify,
            dtype=args.dtype,
            shard_size=args.shard_size,
            force=args.force,
            device=device,
            by=args.by,
            progress=advance,
            as_lora=args.as_lora,
        )
    print(
        f"exported trial {result.number} ({result.label}, {result.role}) of study "
        f"'{args.study}' to {result.path}"
    )
    if result.metrics:
        print(format_metrics(result.metrics))
        print(f"scores as recorded, on the searched-on documents at fidelity {result.fidelity}")
    if result.holdout:
        print(format_metrics(result.holdout))
        print("scores on the held-out documents (never searched on)")
    if result.as_written:
        print(format_metrics(result.as_written))
        print(f"scores of the checkpoint as written ({result.written_dtype})")
    for note in result.notes:
        print(f"note: {note}")
    if result.mergekit_written:
        print(f"{MERGEKIT_FILE}: written")
    else:
        print(f"{MERGEKIT_FILE}: not written ({result.mergekit_reason})")
    if result.images:
        print(f"plots: {', '.join(result.images)}")
    for skipped in result.images_skipped:
        print(f"plot not drawn: {skipped}")
    if result.lora is not None:
        worst = result.lora.worst()
        error = f"worst relative error {worst.max:.3e} ({worst.kind})" if worst else "empty"
        left = len(result.lora.left_out)
        print(
            f"LoRA adapter (rank {result.lora.rank}): {result.path / str(result.lora.path)}, "
            f"{len(result.lora.tensors)} tensors, {error}; {left} changed tensor(s) left out"
        )
    print(f"verified: {'yes' if result.verified else 'no'}")
    return 0
