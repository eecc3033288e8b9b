"""The toy zoo: a tiny trained model family in which merging visibly matters.

Every key token ``k0 .. k299`` has one value ``v0 .. v19``. The keys fall into five disjoint fact
sets of 60 (``c`` known to the base; ``a``, ``b``, ``d``, ``e`` for up to four fine-tunes). The
base is trained on set ``c``; each fine-tune starts from the base and learns one more set. A
training line is ``k17 = v3`` with the loss on the value only. Each fine-tune ends near-perfect on
its own set and near chance on the others', so a merge has to keep several fine-tunes' MLP facts
at once, and per-layer coefficients do that better than one uniform weight.

The facts are fixed (``FACTS_SEED``) and are also the data of the lm-eval suite in
``evaluators/toy_facts``; ``seed`` only changes weight initialisation and batch order. Training
runs single-threaded under a forked RNG, so a seed gives the same bytes on every run.

Differences from ``toy-zoo.md``, each measured:

- 300 keys rather than 180: two spare fact sets for up to four fine-tunes.
- Fine-tunes at lr 5e-4 rather than 1e-3. At 1e-3 they forgot 17-22% of the base's facts (the
  design notes 5%); at 5e-4 they keep 87-97%.
- Hidden size 128 rather than 64. At 64, per-layer CMA-ES topped out at 0.93-0.94 mean accuracy
  on sets a and b within 400 evaluations (several seeds and zoo variants), only 5-10 points above
  the best uniform merge. At 128 it passes 0.95 within a few dozen evaluations, while the best
  uniform task-arithmetic merge stays at 0.88. Building takes about 30 s instead of 18 s.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from evomerge.errors import ConfigError

FACTS_SEED = 1234
NUM_VALUES = 20
KEYS_PER_SET = 60
SET_NAMES = ("c", "a", "b", "d", "e")
BASE_SET = "c"
FINE_TUNE_SETS = ("a", "b", "d", "e")
MANIFEST = "toy_zoo.json"
ZOO_VERSION = 1


@dataclass(frozen=True)
class Fact:
    key: str
    value: str
    label: int


@dataclass(frozen=True)
class ToyZooSpec:
    """Everything that determines the zoo's bytes; its hash keys caches."""

    seed: int = 0
    sources: int = 2
    layers: int = 4
    hidden: int = 128
    intermediate: int = 256
    heads: int = 4
    base_steps: int = 400
    base_lr: float = 3e-3
    fine_tune_steps: int = 300
    fine_tune_lr: float = 5e-4
    batch_size: int = 64
    weight_decay: float = 0.01
    version: int = ZOO_VERSION

    def check(self) -> None:
        if not 1 <= self.sources <= len(FINE_TUNE_SETS):
            raise ConfigError(
                f"toy zoo: sources must be between 1 and {len(FINE_TUNE_SETS)}, got {self.sources}"
            )
        for field in ("layers", "hidden", "intermediate", "heads", "batch_size"):
            if getattr(self, field) < 1:
                raise ConfigError(f"toy zoo: {field} must be at least 1")
        if self.hidden % self.heads:
            raise ConfigError(
                f"toy zoo: hidden ({self.hidden}) must be divisible by heads ({self.heads})"
            )

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    def model_names(self) -> list[str]:
        return ["base", *(f"ft_{name}" for name in FINE_TUNE_SETS[: self.sources])]


def key_tokens() -> list[str]:
    return [f"k{i}" for i in range(KEYS_PER_SET * len(SET_NAMES))]


def value_tokens() -> list[str]:
    return [f"v{i}" for i in range(NUM_VALUES)]


def vocabulary() -> list[str]:
    """The zoo's words, after the tokenizer's special tokens."""
    return ["=", *key_tokens(), *value_tokens()]


def fact_sets() -> dict[str, list[Fact]]:
    """The five fixed fact sets, by name, each sorted by key number."""
    rng = random.Random(FACTS_SEED)
    keys = list(range(KEYS_PER_SET * len(SET_NAMES)))
    values = [rng.randrange(NUM_VALUES) for _ in keys]
    rng.shuffle(keys)
    sets: dict[str, list[Fact]] = {}
    for index, name in enumerate(SET_NAMES):
        chosen = sorted(keys[index * KEYS_PER_SET : (index + 1) * KEYS_PER_SET])
        sets[name] = [Fact(f"k{k}", f"v{values[k]}", values[k]) for k in chosen]
    return sets


def facts_jsonl(facts: list[Fact]) -> str:
    """One JSON document per line, the format of ``evaluators/toy_facts/data/*.jsonl``."""
    return "".join(json.dumps(asdict(f)) + "\n" for f in facts)


CHOICES_PER_DOCUMENT = 4
DOCUMENTS_PER_FACT = 17


def choice_documents(
    facts: list[Fact],
    per_fact: int = DOCUMENTS_PER_FACT,
    choices: int = CHOICES_PER_DOCUMENT,
) -> list[dict]:
    """Multiple-choice documents: each fact asked ``per_fact`` times, each time among
    ``choices - 1`` different wrong values (drawn once, seeded by ``FACTS_SEED``).

    A model that knows a fact answers all its documents; one that half-knows it (a merge that
    kept some of a fine-tune's weights) ranks the right value above some wrong ones and not
    others, so documents differ in difficulty, as in a real benchmark. With the defaults a fact
    set of 60 gives 1,020 documents. The models were only trained on ``k = v`` lines, and that
    is all a document asks; longer prompts (other facts before the key) put every model near
    chance, so they would not make a meaningful task.
    """
    if not 2 <= choices <= NUM_VALUES:
        raise ConfigError(f"choices must be between 2 and {NUM_VALUES}, got {choices}")
    rng = random.Random(FACTS_SEED + 2)
    documents = []
    for fact in facts:
        wrong = [value for value in value_tokens() if value != fact.value]
        seen: set[tuple[str, ...]] = set()
        while len(seen) < per_fact:
            picked = tuple(sorted(rng.sample(wrong, choices - 1)))
            if picked in seen:
                continue
            seen.add(picked)
            options = [fact.value, *picked]
            rng.shuffle(options)
            documents.append(
                {
                    "key": fact.key,
                    "value": fact.value,
                    "choices": options,
                    "gold": options.index(fact.value),
                }
            )
    return documents


def choices_jsonl(facts: list[Fact]) -> str:
    """``choice_documents`` one JSON document per line: ``evaluators/toy_facts/data/mc_*.jsonl``."""
    return "".join(json.dumps(doc) + "\n" for doc in choice_documents(facts))


def heldout_text(facts_per_line: int = 8) -> str:
    """A held-out text for perplexity: every fact of sets c, a and b, shuffled, 8 to a line.

    Training only ever saw one fact per sequence; here each fact follows others, so the text
    tests the facts in contexts the models were not trained on.
    """
    facts = [fact for name in ("c", "a", "b") for fact in fact_sets()[name]]
    random.Random(FACTS_SEED + 1).shuffle(facts)
    lines = [
        " ".join(f"{f.key} = {f.value}" for f in facts[i : i + facts_per_line])
        for i in range(0, len(facts), facts_per_line)
    ]
    return "\n".join(lines) + "\n"


def _encode(tokenizer, facts: list[Fact]) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[no-untyped-def]
    ids = tokenizer([f"{f.key} = {f.value}" for f in facts], add_special_tokens=False).input_ids
    inputs = torch.tensor(ids, dtype=torch.long)
    if inputs.shape[1] != 3:
        raise AssertionError(f"a fact line should be 3 tokens, got {inputs.shape[1]}")
    labels = torch.full_like(inputs, -100)
    labels[:, 2] = inputs[:, 2]
    return inputs, labels


def _train(  # type: ignore[no-untyped-def]
    model,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    steps: int,
    lr: float,
    weight_decay: float,
    batch_size: int,
    generator: torch.Generator,
    on_step: Callable[[], None] | None = None,
) -> None:
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        rows = torch.randint(len(inputs), (batch_size,), generator=generator)
        loss = model(input_ids=inputs[rows], labels=labels[rows]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if on_step is not None:
            on_step()
    model.eval()


def value_accuracy(model, tokenizer, facts: list[Fact]) -> float:  # type: ignore[no-untyped-def]
    """Share of facts whose value is the arg-max next token after ``key =`` (full vocabulary)."""
    inputs, _ = _encode(tokenizer, facts)
    with torch.no_grad():
        logits = model(input_ids=inputs[:, :2]).logits[:, -1]
    return int((logits.argmax(-1) == inputs[:, 2]).sum()) / len(facts)


def build_toy_zoo(
    out_dir: str | os.PathLike[str],
    spec: ToyZooSpec | None = None,
    *,
    on_step: Callable[[], None] | None = None,
) -> dict[str, Path]:
    """Train and write the zoo under ``out_dir``; return model folders by name.

    Written into a temporary sibling folder and renamed into place, so ``out_dir`` is either
    absent or complete. An existing complete zoo with the same spec is reused as is.
    """
    from transformers import LlamaForCausalLM

    from evomerge.random_family import build_tokenizer, tiny_llama_config

    spec = spec or ToyZooSpec()
    spec.check()
    out = Path(out_dir)
    existing = read_manifest(out)
    if existing is not None:
        if existing.get("fingerprint") == spec.fingerprint():
            return {name: out / name for name in spec.model_names()}
        raise ConfigError(
            f"{out} already holds a toy zoo built with other parameters "
            f"({existing.get('spec')}); choose another folder or delete it"
        )
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not an empty folder; choose another --out")

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    sets = fact_sets()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            tokenizer = build_tokenizer(vocabulary())
            config = tiny_llama_config(
                len(tokenizer),
                layers=spec.layers,
                hidden=spec.hidden,
                intermediate=spec.intermediate,
                heads=spec.heads,
            )
            generator = torch.Generator().manual_seed(spec.seed)
            accuracy: dict[str, dict] = {}

            def train_and_save(model, name: str, facts: list[Fact], steps: int, lr: float) -> None:  # type: ignore[no-untyped-def]
                inputs, labels = _encode(tokenizer, facts)
                _train(
                    model,
                    inputs,
                    labels,
                    steps=steps,
                    lr=lr,
                    weight_decay=spec.weight_decay,
                    batch_size=spec.batch_size,
                    generator=generator,
                    on_step=on_step,
                )
                _save(model, tokenizer, staging / name)
                accuracy[name] = _accuracies(model, tokenizer, sets, spec)

            base = LlamaForCausalLM(config)
            train_and_save(base, "base", sets[BASE_SET], spec.base_steps, spec.base_lr)
            for set_name in FINE_TUNE_SETS[: spec.sources]:
                model = LlamaForCausalLM(config)
                model.load_state_dict(base.state_dict())
                train_and_save(
                    model, f"ft_{set_name}", sets[set_name], spec.fine_tune_steps, spec.fine_tune_lr
                )
        manifest = {
            "spec": asdict(spec),
            "fingerprint": spec.fingerprint(),
            "models": {
                name: {"trained_on": _trained_on(name), "accuracy": accuracy[name]}
                for name in spec.model_names()
            },
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(threads)
    return {name: out / name for name in spec.model_names()}


def read_manifest(folder: str | os.PathLike[str]) -> dict | None:
    """The zoo's manifest (spec, fingerprint, per-model accuracies), or None if there is none."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def total_training_steps(spec: ToyZooSpec) -> int:
    return spec.base_steps + spec.sources * spec.fine_tune_steps


def _trained_on(name: str) -> list[str]:
    return [BASE_SET] if name == "base" else [BASE_SET, name.removeprefix("ft_")]


def _accuracies(model, tokenizer, sets: dict[str, list[Fact]], spec: ToyZooSpec) -> dict:  # type: ignore[no-untyped-def]
    used = [BASE_SET, *FINE_TUNE_SETS[: spec.sources]]
    return {name: round(value_accuracy(model, tokenizer, sets[name]), 4) for name in used}


def _save(model, tokenizer, path: Path) -> None:  # type: ignore[no-untyped-def]
    path.mkdir(parents=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
