"""``evomerge fisher``: estimate a model's diagonal empirical Fisher for the ``fisher`` method."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from evomerge.cli.args import add_allow_pickle, add_device, add_quiet, check_device
from evomerge.errors import ConfigError
from evomerge.util import DTYPES


def add_commands(commands: Any) -> None:
    """Register ``fisher``."""
    fisher = commands.add_parser(
        "fisher",
        help="estimate a model's diagonal Fisher (for the 'fisher' merge method)",
        description="Estimate the diagonal empirical Fisher of a model folder, the mean squared "
        "gradient of the log-likelihood of the data: the gold continuations of lm-eval tasks "
        "(--tasks) or the tokens of a text file (--text). It is written to --out as "
        "model.safetensors (float32, the model's tensor names) and fisher.json (what data, "
        "how many samples and tokens, how long); a recipe source names that folder as its "
        "'fisher:'. --batch-size 1 (the default) is the exact per-sample definition; a larger "
        "batch squares batch gradients, a faster approximation.",
    )
    fisher.add_argument("model_dir", type=Path, help="Hugging Face model folder")
    fisher.add_argument("--out", type=Path, required=True, help="folder to write the Fisher to")
    data = fisher.add_mutually_exclusive_group(required=True)
    data.add_argument("--tasks", help="comma-separated lm-eval tasks or groups")
    data.add_argument("--text", type=Path, help="UTF-8 text file")
    fisher.add_argument(
        "--include-path",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="extra folder of lm-eval task YAMLs (repeatable)",
    )
    fisher.add_argument(
        "--samples",
        type=int,
        help="use at most this many documents (or text windows), a seeded choice (default all)",
    )
    fisher.add_argument("--seed", type=int, default=0, help="seed of the --samples choice (0)")
    fisher.add_argument(
        "--batch-size",
        type=int,
        default=1,
        help="samples per backward pass (default 1: exact; more: approximation)",
    )
    fisher.add_argument(
        "--max-length",
        type=int,
        help="tokens per --text window (default: the model's context, at most 2048)",
    )
    add_device(fisher, help="cpu, cuda, cuda:1 ... (default cpu)")
    fisher.add_argument(
        "--dtype", choices=list(DTYPES), help="load dtype (default float32); the Fisher is float32"
    )
    fisher.add_argument("--force", action="store_true", help="replace a non-empty --out")
    add_allow_pickle(fisher)
    add_quiet(fisher)
    fisher.set_defaults(handler=cmd_fisher)


def cmd_fisher(args: argparse.Namespace) -> int:
    from evomerge.evaluate.model_loading import load_model_for_eval
    from evomerge.fisher import (
        choose_samples,
        estimate_fisher,
        fisher_record,
        model_max_length,
        task_samples,
        text_record,
        text_samples,
        timed,
        write_fisher,
    )
    from evomerge.progress import no_transformers_bars, progress_bar
    from evomerge.writer import check_output_dir

    out: Path = args.out.expanduser()
    check_output_dir(out.resolve(), args.force)
    if args.samples is not None and args.samples < 1:
        raise ConfigError(f"--samples must be at least 1, got {args.samples}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.max_length is not None and args.max_length < 2:
        raise ConfigError(f"--max-length must be at least 2, got {args.max_length}")
    text = None
    tasks: list[str] = []
    if args.text is not None:
        try:
            text = args.text.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--text {args.text}: cannot read it ({exc})") from None
        if not text.strip():
            raise ConfigError(f"--text {args.text} is empty")
    else:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        if not tasks:
            raise ConfigError("--tasks names no task")
    device = check_device(args.device)
    with no_transformers_bars():
        model, tokenizer = load_model_for_eval(
            args.model_dir, device=device, dtype=args.dtype, allow_pickle=args.allow_pickle
        )
    if text is not None:
        max_length = args.max_length or model_max_length(model)
        available = text_samples(tokenizer, text, max_length)
        data = text_record(args.text, text, max_length)
    else:
        available = task_samples(tokenizer, tasks, args.include_path)
        data = {
            "kind": "tasks",
            "tasks": tasks,
            "include_paths": [str(p.expanduser().resolve()) for p in args.include_path],
        }
    samples = choose_samples(available, args.samples, args.seed)
    elapsed = timed()
    pad_id = getattr(tokenizer, "pad_token_id", None) or 0
    with progress_bar("estimating the Fisher", len(samples), enabled=not args.quiet) as advance:
        tensors = estimate_fisher(
            model, samples, batch_size=args.batch_size, pad_id=pad_id, progress=advance
        )
    seconds = elapsed()
    record = fisher_record(
        model_path=args.model_dir,
        data=data,
        samples=samples,
        available=len(available),
        seed=args.seed,
        batch_size=args.batch_size,
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        device=device,
        seconds=seconds,
    )
    written = write_fisher(out, tensors, record, force=args.force)
    print(f"wrote the Fisher of {args.model_dir} to {written}")
    print(json.dumps(record, indent=2, sort_keys=True))
    return 0
