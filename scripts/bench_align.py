"""Does `evomerge align` (weight matching) lower the interpolation barrier between two toy
models trained from different random initializations?

Trains two models of the toy zoo's base shape (Llama, 4 layers, hidden 128, MLP 256, 4 heads)
on the same facts (set C, the zoo base's) from two init seeds, with the zoo's own training loop,
then aligns B to A with `evomerge align` and measures, at 11 points t = 0, 0.1 .. 1 of
(1 - t) A + t B (every tensor interpolated), the value accuracy on set C (the toy_facts_c
metric: arg-max value after "key =") and the mean loss on those facts, before and after.
Barrier: the largest drop of accuracy below the straight line between the endpoints (for loss:
the largest rise above it).

    .venv/bin/python scripts/bench_align.py [--seeds 0,1] [--steps 400]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

from evomerge.align import align_folder
from evomerge.checkpoint import ModelFolder
from evomerge.random_family import build_tokenizer, tiny_llama_config
from evomerge.toy_zoo import BASE_SET, ToyZooSpec, _encode, _train, fact_sets, vocabulary


def train(seed: int, steps: int, out: Path, tokenizer, spec: ToyZooSpec) -> Path:  # type: ignore[no-untyped-def]
    from transformers import LlamaForCausalLM

    config = tiny_llama_config(
        len(tokenizer),
        layers=spec.layers,
        hidden=spec.hidden,
        intermediate=spec.intermediate,
        heads=spec.heads,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        inputs, labels = _encode(tokenizer, fact_sets()[BASE_SET])
        _train(
            model,
            inputs,
            labels,
            steps=steps,
            lr=spec.base_lr,
            weight_decay=spec.weight_decay,
            batch_size=spec.batch_size,
            generator=torch.Generator().manual_seed(seed),
        )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def load(path: Path) -> dict[str, torch.Tensor]:
    folder = ModelFolder(path)
    return {name: folder.read(name).to(torch.float32) for name in folder.tensors}


def curve(model, a: dict, b: dict, tokenizer, points: int = 11) -> list[tuple[float, float]]:  # type: ignore[no-untyped-def]
    inputs = _encode(tokenizer, fact_sets()[BASE_SET])[0]
    out = []
    for i in range(points):
        t = i / (points - 1)
        model.load_state_dict({n: (1 - t) * a[n] + t * b[n] for n in a}, strict=False)
        with torch.no_grad():
            logits = model(input_ids=inputs[:, :2]).logits[:, -1]
        accuracy = float((logits.argmax(-1) == inputs[:, 2]).float().mean())
        loss = float(torch.nn.functional.cross_entropy(logits, inputs[:, 2]))
        out.append((accuracy, loss))
    return out


def barrier(values: list[float], higher_is_better: bool) -> float:
    n = len(values) - 1
    line = [values[0] + (values[-1] - values[0]) * i / n for i in range(n + 1)]
    gaps = [(ln - v) if higher_is_better else (v - ln) for v, ln in zip(values, line)]
    return max(gaps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--steps", type=int, default=ToyZooSpec().base_steps)
    args = parser.parse_args()
    seed_a, seed_b = (int(s) for s in args.seeds.split(","))
    spec = ToyZooSpec()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    tokenizer = build_tokenizer(vocabulary())
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        a_dir = train(seed_a, args.steps, root / "a", tokenizer, spec)
        b_dir = train(seed_b, args.steps, root / "b", tokenizer, spec)
        trained = time.perf_counter()
        report = align_folder(b_dir, a_dir, root / "b_aligned")
        aligned = time.perf_counter()
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(a_dir).eval()
        a, b, b_al = load(a_dir), load(b_dir), load(root / "b_aligned")
        before = curve(model, a, b, tokenizer)
        after = curve(model, a, b_al, tokenizer)
    norm = report.reference_norm
    print(
        f"toy base shape ({spec.layers} layers, hidden {spec.hidden}, MLP {spec.intermediate}, "
        f"{spec.heads} heads), set {BASE_SET.upper()} ({len(fact_sets()[BASE_SET])} facts), "
        f"{args.steps} steps, init seeds {seed_a} and {seed_b}; torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    )
    print(
        f"training {trained - start:.1f} s, align {aligned - trained:.2f} s; attention+MLP "
        f"distance ||A - B|| / ||A||: {report.distance_before / norm:.3f} before, "
        f"{report.distance_after / norm:.3f} after align"
    )
    print()
    print("| t (share of B) | acc before | acc after | loss before | loss after |")
    print("|---|---|---|---|---|")
    for i, ((acc0, loss0), (acc1, loss1)) in enumerate(zip(before, after)):
        print(f"| {i / 10:.1f} | {acc0:.3f} | {acc1:.3f} | {loss0:.3f} | {loss1:.3f} |")
    print()
    print("| | before align | after align |")
    print("|---|---|---|")
    for label, index, better in (("accuracy", 0, True), ("loss", 1, False)):
        b0 = barrier([p[index] for p in before], better)
        b1 = barrier([p[index] for p in after], better)
        print(f"| {label} barrier | {b0:.3f} | {b1:.3f} |")
    print(f"| 0.5 merge accuracy | {before[5][0]:.3f} | {after[5][0]:.3f} |")
    print(f"| 0.5 merge loss | {before[5][1]:.3f} | {after[5][1]:.3f} |")
    print(
        f"| endpoint accuracy A / B | {before[0][0]:.3f} / {before[-1][0]:.3f} | "
        f"{after[0][0]:.3f} / {after[-1][0]:.3f} |"
    )


if __name__ == "__main__":
    main()
