"""The bad input sweep of the study service: one table of bad inputs to `evomerge search`,
`resume`, `status`, `pareto`, `studies`, `export`, `eval` and `space show`.

Every case runs the CLI in process and must end with exit code 1 and exactly one line on
stderr, ``evomerge: error: ...``, without a traceback, naming the file and the field (or the
tensor, the flag, the trial) that is wrong; the folder the case works in (its study YAML, its
database, its output folders) and the model folders must be exactly as they were: nothing
written, nothing new, no database created or changed. No case may start Ray: what is wrong is
found before a worker starts. `tests/test_bad_input.py` covers the recipes and model folders
of `evomerge merge`.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from evomerge.cli import main
from evomerge.study import StudyStore
from evomerge.study.config import load_study_config
from evomerge.study.preflight import preflight
from tests.helpers import copy_model, edit_config, edit_tensors, write_yaml

UP = "model.layers.1.mlp.up_proj.weight"
NAP = "def nap(model, tokenizer, limit=None):\n    return {'slept': 1.0}\n"
EMPTY = "def empty(model, tokenizer, limit=None):\n    return {}\n"
PG_DOWN = "postgresql+psycopg://evo:s3cret@127.0.0.1:1/nowhere"


@dataclass
class Ctx:
    """One case's folder (``tmp``, also the working directory) and the model family."""

    tmp: Path
    family: dict[str, Path]

    def vars(self) -> dict[str, str]:
        return {"tmp": str(self.tmp), **{k: str(v) for k, v in self.family.items()}}

    def value(self, value: Any) -> Any:
        if isinstance(value, str):
            return value.format(**self.vars())
        return value(self) if callable(value) else value

    def study(self, **changes: Any) -> Path:
        """``study.yaml``: two sources, a python evaluator, 4 trials; ``changes`` (values or
        functions of the context) replace keys, None removes one."""
        (self.tmp / "nap.py").write_text(NAP)
        (self.tmp / "empty.py").write_text(EMPTY)
        data: dict[str, Any] = {
            "name": "toy",
            "base": str(self.family["base"]),
            "sources": [str(self.family["ft_0"]), str(self.family["ft_1"])],
            "space": "task_arithmetic_global",
            "proposer": {"kind": "random", "seed": 0},
            "objectives": [{"metric": "nap/slept"}],
            "evaluators": [{"kind": "python", "function": "nap.py:nap"}],
            "budget": 4,
            "cluster": {"workers": 1},
        }
        for key, value in changes.items():
            if value is None:
                data.pop(key, None)
            else:
                data[key] = self.value(value)
        return write_yaml(self.tmp / "study.yaml", data)

    def db(self) -> Path:
        """``s.db``: study 'toy' (finished: trial 0 COMPLETE, 1 FAILED, 2 COMPLETE with a
        recipe naming a folder that is gone) and study 'moved' (its base folder is gone)."""
        path = self.tmp / "s.db"
        store = StudyStore(path)
        config = load_study_config(self.study()).model_dump(mode="json")
        store.create_study("toy", config, budget=4)
        linear = {"method": "linear", "sources": [{"model": str(self.family["ft_0"])}]}
        gone = {"method": "linear", "sources": [{"model": str(self.tmp / "gone")}]}
        for number, recipe in enumerate([linear, linear, gone]):
            store.add_trial("toy", number, role="proposal", label=f"p{number}", recipe=recipe)
        store.finish_trial("toy", 0, state="COMPLETE", metrics={"nap/slept": 1.0})
        store.finish_trial("toy", 1, state="FAILED", error="RuntimeError: NaN in layers.0")
        store.finish_trial("toy", 2, state="COMPLETE", metrics={"nap/slept": 0.5})
        store.set_status("toy", "finished")
        store.create_study("moved", {**config, "base": str(self.tmp / "gone_base")}, budget=4)
        store.engine.dispose()
        (self.tmp / "study.yaml").unlink()
        return path

    def broken(self, breaker: Callable[[Path], None]) -> str:
        bad = copy_model(self.family["ft_1"], self.tmp / "broken")
        breaker(bad)
        return str(bad)

    def space(self, **parameters: Any) -> str:
        data = {"name": "mine", "method": "task_arithmetic", "layers": "global"}
        data.update(parameters)
        return str(write_yaml(self.tmp / "space.yaml", data))

    def file(self, name: str, content: bytes | str) -> str:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return str(path)


Setup = Callable[[Ctx], list[str]]


def search(**changes: Any) -> Setup:
    return lambda c: ["search", str(c.study(**changes)), "--quiet"]


def search_flag(*flags: str, **changes: Any) -> Setup:
    return lambda c: ["search", str(c.study(**changes)), *[f.format(**c.vars()) for f in flags]]


def on_db(command: str, *flags: str, prepare: Callable[[Ctx], Any] | None = None) -> Setup:
    """``command --storage s.db FLAGS`` against the filled database."""

    def setup(c: Ctx) -> list[str]:
        if prepare is not None:
            prepare(c)
        return [command, "--storage", str(c.db()), *[f.format(**c.vars()) for f in flags]]

    return setup


def resume_yaml(**changes: Any) -> Setup:
    """``resume study.yaml``, the YAML naming the filled database (``changes`` as in search)."""

    def setup(c: Ctx) -> list[str]:
        db = c.db()
        return ["resume", str(c.study(**{"storage": str(db), **changes})), "--quiet"]

    return setup


def plain(*argv: str, prepare: Callable[[Ctx], Any] | None = None) -> Setup:
    def setup(c: Ctx) -> list[str]:
        if prepare is not None:
            prepare(c)
        return [a.format(**c.vars()) for a in argv]

    return setup


def reshape(bad: Path) -> None:
    edit_tensors(bad, lambda t: t.__setitem__(UP, torch.zeros(255, 64)))


def mistral(bad: Path) -> None:
    edit_config(bad, architectures=["MistralForCausalLM"], model_type="mistral")


def two_sources(c: Ctx, second: str) -> list[str]:
    return [str(c.family["ft_0"]), second]


LM_EVAL_LOCAL = {"kind": "lm_eval", "tasks": ["toy_facts_a"], "include_defaults": False}
EXPORT = ("--out", "{tmp}/out", "--quiet")

CASES = [
    # -- the study YAML: types, keys, ranges --------------------------------------------------
    pytest.param(
        plain("search", "{tmp}/nope.yaml"), ["nope.yaml", "No such file"], id="search-no-such-yaml"
    ),
    pytest.param(
        plain("search", "{tmp}/s.yaml", prepare=lambda c: c.file("s.yaml", "name: [toy\n")),
        ["s.yaml is not valid YAML"],
        id="search-yaml-syntax",
    ),
    pytest.param(
        plain("search", "{tmp}/s.yaml", prepare=lambda c: c.file("s.yaml", "- toy\n")),
        ["s.yaml must hold a YAML mapping", "list"],
        id="search-yaml-is-a-list",
    ),
    pytest.param(search(budget=0), ["study.yaml: budget", "at least 1 trial"], id="budget-0"),
    pytest.param(
        search(budget={"hours": -2}),
        ["study.yaml: budget.hours", "greater than 0"],
        id="budget-negative-hours",
    ),
    pytest.param(
        search(budget="lots"),
        ["study.yaml: budget", "a number of trials", "'lots'"],
        id="budget-wrong-type",
    ),
    pytest.param(search(name=["toy"]), ["study.yaml: name", "valid string"], id="name-wrong-type"),
    pytest.param(
        search(objective=[{"metric": "nap/slept"}]),
        ["study.yaml: objective", "Extra inputs are not permitted"],
        id="unknown-top-level-key",
    ),
    pytest.param(
        search(fidelity={"limit": 2, "promte": 0.5}),
        ["study.yaml: fidelity.promte", "Extra inputs"],
        id="unknown-nested-key",
    ),
    pytest.param(
        search(fidelity={"limit": 1.5}),
        ["study.yaml: fidelity.limit", "fraction between 0 and 1", "1.5"],
        id="fidelity-limit-1.5",
    ),
    pytest.param(
        search(fidelity={"limit": 2, "batch": 0}),
        ["study.yaml: fidelity.batch", "greater than or equal to 1"],
        id="fidelity-batch-0",
    ),
    pytest.param(
        search(cluster={"workers": 1, "trial_timeout": -5}),
        ["study.yaml: cluster.trial_timeout", "greater than 0"],
        id="negative-trial-timeout",
    ),
    pytest.param(
        search(device="tpu9"), ["study.yaml: device", "'tpu9' is not a device"], id="bad-device"
    ),
    pytest.param(
        search(device="cuda"),
        ["study.yaml: device", "cuda needs cluster.gpus_per_worker > 0"],
        id="cuda-without-gpus",
    ),
    pytest.param(
        search(export={"dtype": "float8"}),
        ["study.yaml: export.dtype", "'float32', 'float16' or 'bfloat16'"],
        id="export-dtype",
    ),
    pytest.param(
        search(export={"shard_size": "huge"}),
        ["study.yaml: export.shard_size", "'huge' is not a size"],
        id="export-shard-size",
    ),
    # -- models -------------------------------------------------------------------------------
    pytest.param(
        search(base="{tmp}/no_base"),
        ["study.yaml: base", "no_base does not exist"],
        id="base-missing",
    ),
    pytest.param(
        search(sources=lambda c: two_sources(c, str(c.tmp / "no_src"))),
        ["study.yaml: sources[1]", "no_src does not exist"],
        id="source-missing",
    ),
    pytest.param(
        search(base=lambda c: c.file("base.safetensors", b"x")),
        ["study.yaml: base", "base.safetensors is not a folder"],
        id="base-is-a-file",
    ),
    pytest.param(
        search(sources=lambda c: two_sources(c, c.broken(reshape))),
        ["study.yaml: sources", UP, "[256, 64] in 'base' but [255, 64] in 'broken'"],
        id="source-shape-mismatch",
    ),
    pytest.param(
        search(sources=lambda c: two_sources(c, c.broken(mistral))),
        ["study.yaml: sources", "different architectures", "MistralForCausalLM"],
        id="source-other-architecture",
    ),
    # -- space --------------------------------------------------------------------------------
    pytest.param(
        search(space="no_such_space"),
        ["study.yaml: space", "no_such_space", "ready spaces"],
        id="space-unknown-name",
    ),
    pytest.param(
        search(space="{tmp}/spaces/mine.yaml"),
        ["study.yaml: space", "mine.yaml", "No such file"],
        id="space-file-missing",
    ),
    pytest.param(
        search(space=lambda c: c.space(parameters={"weight": {"bounds": [1.0, 0.5]}})),
        ["study.yaml: space", "space.yaml: parameters.weight", "low < high; got 1.0, 0.5"],
        id="space-bounds-reversed",
    ),
    pytest.param(
        search(space=lambda c: c.space(parameters={"wieght": {"bounds": [0, 1]}})),
        ["study.yaml: space", "space.yaml", "no parameter 'wieght'", "weight"],
        id="space-unknown-parameter",
    ),
    pytest.param(
        search(space=lambda c: c.space(parameters={"weight": {}})),
        ["study.yaml: space", "space.yaml: parameters.weight.bounds", "Field required"],
        id="space-parameter-without-bounds",
    ),
    pytest.param(
        search(
            space=lambda c: c.space(
                parameters={"weight": {"bounds": [0, 1], "scale": "log", "scope": ["source"]}}
            )
        ),
        ["study.yaml: space", "parameters.weight", "log scale needs positive bounds"],
        id="space-log-scale-from-0",
    ),
    # -- proposer, evaluators, objectives ------------------------------------------------------
    pytest.param(
        search(proposer={"kind": "annealing"}),
        ["study.yaml: proposer: kind", "unknown proposer kind 'annealing'", "cma"],
        id="proposer-unknown",
    ),
    pytest.param(
        search(proposer={"kind": "random", "sead": 1}),
        ["study.yaml: proposer (random): sead", "Extra inputs"],
        id="proposer-unknown-option",
    ),
    pytest.param(
        search(evaluators=[{"kind": "bleu"}]),
        ["study.yaml: evaluators[0]: kind", "unknown evaluator kind 'bleu'", "lm_eval"],
        id="evaluator-unknown-kind",
    ),
    pytest.param(
        search(evaluators=[{"kind": "python", "function": "nap.py:nap", "limit": 0}]),
        ["study.yaml: evaluators[0] (python): limit", "at least 1, got 0"],
        id="evaluator-limit-0",
    ),
    pytest.param(
        search(evaluators=[{"kind": "python", "function": "gone.py:nap"}]),
        ["study.yaml: evaluators[0]", "gone.py", "file not found"],
        id="python-evaluator-file-missing",
    ),
    pytest.param(
        search(evaluators=[{"kind": "python", "function": "nap.py:sleep"}]),
        ["study.yaml: evaluators[0]", "nap.py", "no attribute 'sleep'"],
        id="python-evaluator-function-missing",
    ),
    pytest.param(
        search(evaluators=[{"kind": "perplexity", "file": "corpus.txt"}]),
        ["study.yaml: evaluators[0]", "corpus.txt", "does not exist"],
        id="perplexity-text-missing",
    ),
    pytest.param(
        search(evaluators=[{**LM_EVAL_LOCAL, "tasks": ["toy_facts_z"]}]),
        ["study.yaml: evaluators[0]", "unknown task or group toy_facts_z", "toy_facts_a"],
        id="lm-eval-unknown-task",
    ),
    pytest.param(
        search(evaluators=[LM_EVAL_LOCAL], objectives=[{"metric": "toy_fact_a/acc"}]),
        ["study.yaml: objectives[0].metric", "'toy_fact_a/acc'", "toy_facts_a/..."],
        id="objective-metric-of-no-task",
    ),
    pytest.param(
        search(objectives=[{"metric": "typo/slept"}]),
        ["study.yaml: objectives[0].metric", "no evaluator produces 'typo/slept'", "nap/..."],
        id="objective-metric-of-no-evaluator",
    ),
    pytest.param(
        search(objectives=[{"metric": "nap/slept", "weight": -1}]),
        ["study.yaml: objectives.0.weight", "greater than or equal to 0"],
        id="objective-negative-weight",
    ),
    pytest.param(
        search(
            evaluators=[{"kind": "python", "function": "empty.py:empty"}],
            objectives=[{"metric": "empty/x"}],
        ),
        ["study.yaml: evaluators[0]", "empty.py:empty returned no metrics: {{}}"],
        id="python-evaluator-returns-nothing",
    ),
    pytest.param(
        search(objectives=[{"metric": "nap/awake"}]),
        ["study.yaml: objectives[0].metric", "'nap/awake'", "returned nap/slept"],
        id="python-evaluator-lacks-the-objective",
    ),
    pytest.param(
        search(evaluators=[{"kind": "python", "function": "nap.py:nap", "holdout": 0.2}]),
        ["study.yaml: evaluators[0] (python)", "chooses its own documents"],
        id="python-evaluator-holdout",
    ),
    # -- storage ------------------------------------------------------------------------------
    pytest.param(
        search(storage="notadb://host/x"),
        ["study.yaml: storage", "notadb://host/x", "not a database URL"],
        id="storage-unknown-scheme",
    ),
    pytest.param(
        search(storage="mysql://evo@127.0.0.1/x"),
        ["study.yaml: storage", "driver for 'mysql' is not installed"],
        id="storage-driver-missing",
    ),
    pytest.param(
        search(storage="{tmp}/no_folder/s.db"),
        ["study.yaml: storage", "folder {tmp}/no_folder does not exist"],
        id="storage-folder-missing",
    ),
    pytest.param(
        search_flag("--storage", "{tmp}/junk.db", "--quiet"),
        ["--storage {tmp}/junk.db is not an SQLite database"],
        id="storage-not-sqlite",
    ),
    pytest.param(
        search(storage=PG_DOWN),
        ["study.yaml: storage: cannot open the study database", "evo:***@127.0.0.1:1", "refused"],
        id="storage-unreachable",
    ),
    pytest.param(
        lambda c: ["search", str(c.study(storage=str(c.db()))), "--quiet"],
        ["study 'toy' already exists", "resume it (evomerge resume {tmp}/study.yaml)"],
        id="study-name-taken",
    ),
    # -- resume -------------------------------------------------------------------------------
    pytest.param(
        on_db("resume", "--study", "nope", "--quiet"),
        ["no study 'nope'", "s.db", "it has: moved, toy"],
        id="resume-unknown-study",
    ),
    pytest.param(
        plain("resume", "--storage", "{tmp}/none.db", "--study", "toy"),
        ["--storage {tmp}/none.db", "no study database there"],
        id="resume-no-database",
    ),
    pytest.param(
        plain("resume", "--storage", "sqlite+nodriver:///x.db", "--study", "toy"),
        ["--storage sqlite+nodriver:///x.db", "not a database URL"],
        id="resume-bad-url",
    ),
    pytest.param(
        on_db("resume", "--study", "moved", "--quiet"),
        ["study 'moved' in sqlite:///", "base", "gone_base does not exist"],
        id="resume-base-folder-gone",
    ),
    pytest.param(
        plain("resume", "--study", "toy"),
        ["resume: give the study's YAML", "or both --storage and --study"],
        id="resume-neither-yaml-nor-storage",
    ),
    pytest.param(
        plain("resume", "{tmp}/missing.yaml"),
        ["cannot read {tmp}/missing.yaml", "No such file"],
        id="resume-yaml-missing",
    ),
    pytest.param(
        resume_yaml(name="nope"),
        ["no study 'nope'", "s.db", "it has: moved, toy"],
        id="resume-yaml-names-no-study",
    ),
    pytest.param(
        lambda c: ["resume", str(c.study(storage="{tmp}/none.db")), "--quiet"],
        ["study.yaml: storage {tmp}/none.db", "no study database there"],
        id="resume-yaml-storage-missing",
    ),
    pytest.param(
        resume_yaml(name="moved"),
        ["study 'moved' in sqlite:///", "base", "gone_base does not exist"],
        id="resume-yaml-base-folder-gone",
    ),
    # -- status, pareto, studies --------------------------------------------------------------
    pytest.param(
        on_db("status", "--study", "nope"),
        ["no study 'nope'", "it has: moved, toy"],
        id="status-unknown-study",
    ),
    pytest.param(
        plain("status", "--storage", "{tmp}/none.db", "--study", "toy"),
        ["--storage {tmp}/none.db", "no study database there"],
        id="status-no-database",
    ),
    pytest.param(
        plain("pareto", "--storage", "{tmp}/junk.db", "--study", "toy"),
        ["--storage {tmp}/junk.db is not an SQLite database"],
        id="pareto-not-a-database",
    ),
    pytest.param(
        plain("studies", "--storage", "{tmp}"),
        ["--storage {tmp} is a folder"],
        id="studies-storage-is-a-folder",
    ),
    pytest.param(
        plain("studies", "--storage", "mysql://evo:s3cret@127.0.0.1/x"),
        ["mysql://evo:***@127.0.0.1/x", "driver for 'mysql' is not installed"],
        id="studies-driver-missing",
    ),
    # -- export -------------------------------------------------------------------------------
    pytest.param(
        on_db("export", "--study", "toy", "--trial", "foo", *EXPORT),
        ["trial selector 'foo'", "'best', a trial number or 'pareto:K'"],
        id="export-selector-syntax",
    ),
    pytest.param(
        on_db("export", "--study", "toy", "--trial", "pareto:99", *EXPORT),
        ["pareto:99", "Pareto front of study 'toy' has 1 trial(s)", "pareto:1 to pareto:1"],
        id="export-pareto-row-out-of-range",
    ),
    pytest.param(
        on_db("export", "--study", "toy", "--trial", "99", *EXPORT),
        ["study 'toy' has no trial 99", "its trials are 0-2"],
        id="export-no-such-trial",
    ),
    pytest.param(
        on_db("export", "--study", "toy", "--trial", "1", *EXPORT),
        ["trial 1 of study 'toy' is FAILED (RuntimeError: NaN in layers.0)"],
        id="export-failed-trial",
    ),
    pytest.param(
        on_db("export", "--study", "nope", "--trial", "0", *EXPORT),
        ["no study 'nope'", "it has: moved, toy"],
        id="export-unknown-study",
    ),
    pytest.param(
        on_db("export", "--study", "toy", "--trial", "2", *EXPORT),
        ["{tmp}/gone does not exist"],
        id="export-model-folder-gone",
    ),
    pytest.param(
        on_db(
            "export",
            "--study",
            "toy",
            "--trial",
            "0",
            "--out",
            "{tmp}/full",
            prepare=lambda c: c.file("full/keep.txt", "keep me"),
        ),
        ["output folder {tmp}/full already exists", "--force"],
        id="export-out-not-empty",
    ),
    pytest.param(
        on_db(
            "export",
            "--study",
            "toy",
            "--trial",
            "0",
            "--out",
            "{tmp}/afile",
            prepare=lambda c: c.file("afile", "x"),
        ),
        ["output {tmp}/afile exists and is not a folder"],
        id="export-out-is-a-file",
    ),
    pytest.param(
        plain("export", "--storage", "{tmp}/none.db", "--study", "toy", "--trial", "0", *EXPORT),
        ["--storage {tmp}/none.db", "no study database there"],
        id="export-no-database",
    ),
    pytest.param(
        plain("export", "--storage", "{tmp}/junk.db", "--study", "toy", "--trial", "0", *EXPORT),
        ["--storage {tmp}/junk.db is not an SQLite database"],
        id="export-not-a-database",
    ),
    # -- eval and space show ------------------------------------------------------------------
    pytest.param(
        plain(
            "eval",
            "{base}",
            "--evaluator",
            "{tmp}/ev.yaml",
            prepare=lambda c: (
                c.file("ev.yaml", "kind: python\nfunction: empty.py:empty\n"),
                c.file("empty.py", EMPTY),
            ),
        ),
        ["python evaluator", "empty.py:empty returned no metrics"],
        id="eval-evaluator-returns-nothing",
    ),
    pytest.param(
        plain(
            "eval",
            "{base}",
            "--evaluator",
            "{tmp}/ev.yaml",
            prepare=lambda c: c.file("ev.yaml", "kind: bleu\n"),
        ),
        ["ev.yaml: kind", "unknown evaluator kind 'bleu'"],
        id="eval-unknown-evaluator-kind",
    ),
    pytest.param(
        lambda c: [
            "space",
            "show",
            c.space(layers={"groups": 9}, parameters={"weight": {"bounds": [0, 1]}}),
            "--base",
            str(c.family["base"]),
        ],
        ["space.yaml: search space 'mine'", "9 layer groups but the model has 4 layers"],
        id="space-show-more-groups-than-layers",
    ),
]


def snapshot(*roots: Path) -> dict[str, str]:
    """Every file under ``roots`` by path: its bytes' hash, or for an SQLite database its rows
    (its ``-wal``/``-shm`` files are SQLite's own, left out)."""
    files: dict[str, str] = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.name.endswith(("-wal", "-shm", "-journal")):
                continue
            if path.is_dir():
                files[str(path)] = "folder"
            elif path.read_bytes()[:16] == b"SQLite format 3\x00":
                files[str(path)] = _rows(path)
            else:
                files[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def _rows(path: Path) -> str:
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        query = "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY 1"
        tables = [row[0] for row in connection.execute(query)]
        dump = [(t, sorted(map(repr, connection.execute(f'SELECT * FROM "{t}"')))) for t in tables]
    finally:
        connection.close()
    return hashlib.sha256(repr(dump).encode()).hexdigest()


@pytest.fixture
def ctx(family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Ctx]:
    def no_ray(config: Any) -> bool:
        raise AssertionError("a bad input must be refused before Ray starts")

    monkeypatch.setattr("evomerge.study.driver.ensure_ray", no_ray)
    monkeypatch.chdir(tmp_path)  # anything written to the working directory is seen
    (tmp_path / "junk.db").write_bytes(b"not a database, just junk " * 40)
    yield Ctx(tmp_path, family)


@pytest.mark.parametrize(("setup", "expected"), CASES)
def test_bad_input(setup: Setup, expected: list[str], ctx: Ctx, capsys) -> None:
    argv = setup(ctx)
    models = Path(ctx.family["base"]).parent
    before = snapshot(ctx.tmp, models)
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 1, (code, out, err)
    assert err.startswith("evomerge: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for fragment in expected:
        assert fragment.format(**ctx.vars()) in err, (fragment, err)
    assert snapshot(ctx.tmp, models) == before, "the command changed files or the database"


def test_the_baseline_study_passes_the_preflight(ctx: Ctx) -> None:
    """The cases above each change one thing of a study that is fine as it is."""
    path = ctx.study()
    preflight(load_study_config(path), str(path))
    path = ctx.study(evaluators=[LM_EVAL_LOCAL], objectives=[{"metric": "toy_facts_a/acc"}])
    preflight(load_study_config(path), str(path))
