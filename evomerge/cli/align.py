"""``evomerge align``: permute a model's hidden units to match a reference (Git Re-Basin)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from evomerge.cli.args import parse_size


def add_commands(commands: Any) -> None:
    """Register ``align``."""
    align = commands.add_parser(
        "align",
        help="permute a Llama-style model's MLP units and attention heads to match a reference",
        description="Weight matching (Git Re-Basin): reorder each decoder layer's MLP units "
        "and attention heads (whole KV groups with their query heads; never the dimensions "
        "inside a head, which rotary embeddings pair) so the weights are as close as possible "
        "to the reference's. The function is unchanged. Useful for models trained from "
        "different initializations; fine-tunes of one base are already aligned.",
    )
    align.add_argument("model", type=Path, metavar="MODEL", help="the model folder to permute")
    align.add_argument(
        "--to", type=Path, required=True, metavar="REFERENCE", help="the model folder to match"
    )
    align.add_argument("--out", type=Path, required=True, help="output folder (must not exist)")
    align.add_argument(
        "--shard-size", type=parse_size, default=5 * 2**30, help="largest safetensors shard"
    )
    align.add_argument(
        "--force", action="store_true", help="replace a non-empty --out, after success"
    )
    align.set_defaults(handler=cmd_align)


def cmd_align(args: argparse.Namespace) -> int:
    from evomerge.align import align_folder

    print("layer  ||ref-W|| before  after   relative before -> after  units moved")

    def show(item: Any) -> None:
        norm = item.reference_norm or 1.0
        print(
            f"{item.layer:5d}  {item.distance_before:15.4g}  {item.distance_after:7.4g}"
            f"   {item.distance_before / norm:8.3f} -> {item.distance_after / norm:.3f}"
            f"        {item.moved_units}"
        )

    report = align_folder(
        args.model, args.to, args.out, force=args.force, shard_size=args.shard_size, on_layer=show
    )
    norm = report.reference_norm or 1.0
    print(
        f"total  {report.distance_before:15.4g}  {report.distance_after:7.4g}"
        f"   {report.distance_before / norm:8.3f} -> {report.distance_after / norm:.3f}"
    )
    print(f"wrote the aligned model to {report.out_dir}")
    return 0
