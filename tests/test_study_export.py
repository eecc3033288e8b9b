"""`evomerge export`: a study trial as a checkpoint, checked against scores computed here.

The study is built by hand: recipes decoded from genomes as the driver does, each scored in
process (in-place merge into one model, one lm-eval evaluator) and recorded in the database.
The export must merge by streaming, load with transformers, and score exactly those numbers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file
from sqlalchemy import select, update

from evomerge.cli import main
from evomerge.errors import ConfigError
from evomerge.evaluate import build_evaluator
from evomerge.merge.mergekit_compat import recipe_to_mergekit
from evomerge.merge.recipe import parse_recipe
from evomerge.study import StudyStore
from evomerge.study.export import export_trial, fidelity_limit
from evomerge.study.read import select_trial
from evomerge.study.schema import MetricRow, TrialRow
from evomerge.study.store import fidelity_name
from tests.study_helpers import (
    FAILED_TRIAL,
    RUNNING_TRIAL,
    SCORE_LIMIT,
    TOY_EVALUATOR,
    TOY_METRICS,
    export_rows,
    fill,
    one_line_error,
    run,
)


def expected_best(rows: list[dict[str, Any]]) -> int:
    return max(range(len(rows)), key=lambda i: (sum(rows[i]["full"][m] for m in TOY_METRICS), -i))


def expected_front(rows: list[dict[str, Any]]) -> list[int]:
    """Non-dominated trials (the first of equal points), highest sum first, ties by number."""
    points = [[row["full"][m] for m in TOY_METRICS] for row in rows]

    def dominated(i: int) -> bool:
        return any(
            all(q >= p for q, p in zip(points[j], points[i])) and points[j] != points[i]
            for j in range(len(points))
        )

    front: list[int] = []
    for i in range(len(points)):
        if not dominated(i) and all(points[j] != points[i] for j in front):
            front.append(i)
    return sorted(front, key=lambda i: (-sum(points[i]), i))


def export_args(storage: Any, *more: Any) -> list[str]:
    return [str(a) for a in ("export", "--storage", storage, "--study", "toy", *more)]


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


@pytest.fixture(scope="module")
def exported(
    toy_zoo: dict[str, Path], scored: list[dict[str, Any]], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The best trial exported once (SQLite, no verification) for the file checks."""
    root = tmp_path_factory.mktemp("exported")
    fill(str(root / "s.db"), toy_zoo, scored)
    out = root / "out"
    code = main(export_args(root / "s.db", "--trial", "best", "--out", out, "--quiet"))
    assert code == 0
    return out


# -- the export scores what the database says ------------------------------------------------


def test_best_export_loads_and_scores_the_recorded_metrics(toy_zoo, scored, url, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    store = fill(url, toy_zoo, scored)
    best = expected_best(scored)
    out = tmp_path / "exports" / "best"
    code, stdout, err = run(
        export_args(url, "--trial", "best", "--out", out, "--verify", "--quiet"),
        capsys,
    )
    assert code == 0, err
    assert f"exported trial {best} (proposal {best}, proposal)" in stdout
    assert "verified: yes" in stdout and "mergekit_config.yml: written" in stdout
    for name in TOY_METRICS:
        assert f"{scored[best]['full'][name]:.4f}" in stdout
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    evaluator = build_evaluator(TOY_EVALUATOR, model, AutoTokenizer.from_pretrained(out))
    assert evaluator.evaluate().metrics == scored[best]["full"]
    evaluator.close()
    assert export_rows(store) == [(best, str(out.resolve()), True)]
    assert hidden(out.parent) == []


def test_selectors_pick_the_trials_computed_here(toy_zoo, scored, tmp_path):
    store = fill(str(tmp_path / "s.db"), toy_zoo, scored)
    front = expected_front(scored)
    assert len(front) >= 2  # the genomes trade a for b: several rows to tell apart
    assert select_trial(store, "toy", "best").number == expected_best(scored) == front[0]
    for row, number in enumerate(front, start=1):
        assert select_trial(store, "toy", f"pareto:{row}").number == number
    assert select_trial(store, "toy", "3").metrics == scored[3]["full"]
    for row in (0, len(front) + 1):
        with pytest.raises(ConfigError, match=rf"front of study 'toy' has {len(front)} trial"):
            select_trial(store, "toy", f"pareto:{row}")
    for bad in ("worst", "-1", "pareto:x", "pareto:", "1.5"):
        with pytest.raises(ConfigError, match="is not 'best', a trial number or 'pareto:K'"):
            select_trial(store, "toy", bad)


def test_ties_go_to_the_lower_number_and_empty_studies_are_refused(tmp_path):
    store = StudyStore(tmp_path / "s.db")
    objectives = [{"metric": "a"}, {"metric": "b", "weight": 2.0}]
    store.create_study("s", {"objectives": objectives}, budget=9)
    # Weighted sums 1.5, 2.1, 2.0, 2.1, 0.7: trials 1 and 3 tie (the front keeps the first of
    # equal points); 0 and 4 are dominated.
    points = [(0.5, 0.5), (0.9, 0.6), (0.1, 0.95), (0.9, 0.6), (0.3, 0.2)]
    for number, (a, b) in enumerate(points):
        store.add_trial("s", number, role="proposal", label=f"p{number}")
        store.finish_trial("s", number, state="COMPLETE", metrics={"a": a, "b": b})
    assert select_trial(store, "s", "best").number == 1
    assert [select_trial(store, "s", f"pareto:{k}").number for k in (1, 2)] == [1, 2]
    with pytest.raises(ConfigError, match="has 2 trial"):
        select_trial(store, "s", "pareto:3")
    store.create_study("empty", {"objectives": objectives}, budget=3)
    with pytest.raises(ConfigError, match="'empty' has no trials yet"):
        select_trial(store, "empty", "best")
    store.add_trial("empty", 0, role="proposal", label="p0")
    store.finish_trial("empty", 0, state="FAILED", error="boom")
    store.add_trial("empty", 1, role="proposal", label="p1")
    with pytest.raises(ConfigError, match=r"no complete trial .*\(1 FAILED, 1 RUNNING\)"):
        select_trial(store, "empty", "pareto:1")
    with pytest.raises(ConfigError, match="has no trial 7; its trials are 0-1"):
        select_trial(store, "empty", "7")


@pytest.mark.parametrize("limit", [None, 20, 0.5, 1_000_000])
def test_a_recorded_fidelity_gives_back_its_limit(limit):
    assert fidelity_limit(fidelity_name(limit)[0]) == limit
    assert type(fidelity_limit(fidelity_name(limit)[0])) is type(limit)


# -- the files beside the weights ------------------------------------------------------------


def test_card_front_matter_and_scores(exported, scored, toy_zoo):
    best = expected_best(scored)
    card = (exported / "README.md").read_text()
    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta == {
        "base_model": toy_zoo["base"].name,
        "library_name": "transformers",
        "tags": ["merge", "evomerge"],
    }
    assert f"# toy: trial {best}" in body and "**task_arithmetic**" in body
    for name in TOY_METRICS:
        assert f"| {name} | {scored[best]['full'][name]:.6g} |" in body
    assert "on all searched-on documents (full fidelity)" in body and "Verified" not in body
    assert f"--study toy --trial {best} --out OUT" in body
    assert "evomerge merge evomerge_recipe.yaml OUT" in body
    for name in ("base", "ft_a", "ft_b"):
        assert f"- `{name}`: `{toy_zoo[name].resolve()}`" in body


def test_mergekit_config_is_accepted_by_mergekit(exported, scored):
    from mergekit.config import MergeConfiguration

    data = yaml.safe_load((exported / "mergekit_config.yml").read_text())
    config = MergeConfiguration.model_validate(data)
    assert config.merge_method == "task_arithmetic"
    recipe = scored[expected_best(scored)]["recipe"]
    weights = {Path(s["model"]).name: s["parameters"]["weight"] for s in recipe["sources"]}
    got = {Path(m["model"]).name: m.get("parameters", {}).get("weight") for m in data["models"]}
    assert got == {"base": None, **weights}


def test_recipe_file_reproduces_the_tensors(exported, scored, tmp_path, capsys):
    recipe_file = exported / "evomerge_recipe.yaml"
    recipe = parse_recipe(yaml.safe_load(recipe_file.read_text()))
    assert recipe == parse_recipe(scored[expected_best(scored)]["recipe"])
    code, _, err = run(["merge", recipe_file, tmp_path / "again", "--quiet"], capsys)
    assert code == 0, err
    first, again = tensors(exported), tensors(tmp_path / "again")
    assert first.keys() == again.keys() and len(first) > 30
    assert all(torch.equal(first[name], again[name]) for name in first)


def test_unexpressible_recipe_has_no_mergekit_config_and_the_card_says_why(
    toy_zoo, scored, tmp_path, capsys
):
    store = fill(str(tmp_path / "s.db"), toy_zoo, scored)
    recipe = dict(scored[1]["recipe"])
    recipe["parameters"] = {
        "lambda": [{"kind": "mlp", "filter": "layers.0", "value": 0.5}, {"value": 1.0}]
    }
    with pytest.raises(ConfigError) as reason:
        recipe_to_mergekit(parse_recipe(recipe))
    store.add_trial("toy", 9, role="proposal", label="odd", recipe=recipe)
    store.finish_trial("toy", 9, state="COMPLETE", metrics={"toy_facts_a/acc": 0.5})
    out = tmp_path / "odd"
    code, stdout, err = run(
        export_args(tmp_path / "s.db", "--trial", "9", "--out", out, "--quiet"),
        capsys,
    )
    assert code == 0, err
    assert not (out / "mergekit_config.yml").exists()
    assert f"mergekit_config.yml: not written ({reason.value})" in stdout
    assert f"No mergekit config was written: {reason.value}" in (out / "README.md").read_text()
    assert "verified: no" in stdout and export_rows(store) == [(9, str(out.resolve()), False)]


def test_study_export_settings_are_the_defaults(toy_zoo, scored, tmp_path, capsys):
    """shard_size and verify from the stored config; a trial scored on SCORE_LIMIT documents is
    verified at that fidelity; --dtype and --no-verify override."""
    storage = str(tmp_path / "s.db")
    store = fill(storage, toy_zoo, scored, export={"shard_size": "1MB", "verify": True})
    store.add_trial("toy", 9, role="proposal", label="cheap", recipe=scored[2]["recipe"])
    store.finish_trial("toy", 9, state="COMPLETE", metrics=scored[2]["limit"], limit=SCORE_LIMIT)
    base = export_args(storage, "--trial", "9", "--quiet")
    code, stdout, err = run([*base, "--out", tmp_path / "a"], capsys)
    assert code == 0, err
    assert "verified: yes" in stdout and f"fidelity limit={SCORE_LIMIT}" in stdout
    shards = sorted((tmp_path / "a").glob("*.safetensors"))
    sizes = [sum(t.numel() * t.element_size() for t in load_file(f).values()) for f in shards]
    assert len(shards) >= 3 and max(sizes) <= 1_000_000  # float32 toy model: about 3 MB
    assert (tmp_path / "a" / "model.safetensors.index.json").is_file()
    assert "Verified" in (tmp_path / "a" / "README.md").read_text()
    code, stdout, err = run(
        [*base, "--out", tmp_path / "b", "--dtype", "bfloat16", "--no-verify"], capsys
    )
    assert code == 0, err
    assert "verified: no" in stdout
    assert {t.dtype for t in tensors(tmp_path / "b").values()} == {torch.bfloat16}
    written = yaml.safe_load((tmp_path / "b" / "evomerge_recipe.yaml").read_text())
    assert written["dtype"] == "bfloat16"
    assert [(n, v) for n, _, v in export_rows(store)] == [(9, True), (9, False)]


# -- failures leave nothing behind -----------------------------------------------------------


def test_tampered_metric_fails_verification_and_leaves_nothing(toy_zoo, scored, tmp_path, capsys):
    store = fill(str(tmp_path / "s.db"), toy_zoo, scored)
    best = expected_best(scored)
    true_value = scored[best]["full"]["toy_facts_b/acc"]
    tampered = true_value - 0.05 if true_value > 0.5 else true_value + 0.05
    with store.session() as session:
        trial_id = session.scalar(select(TrialRow.id).where(TrialRow.number == best))
        session.execute(
            update(MetricRow)
            .where(MetricRow.trial_id == trial_id, MetricRow.name == "toy_facts_b/acc")
            .values(value=tampered)
        )
    exports = tmp_path / "exports"
    exports.mkdir()
    args = export_args(tmp_path / "s.db", "--trial", best)  # tampered, it may no longer be best
    code, _, err = run([*args, "--out", exports / "m", "--verify", "--quiet"], capsys)
    assert code == 1
    line = one_line_error(err)
    assert f"toy_facts_b/acc is {true_value!r} in the exported model but {tampered!r}" in line
    assert list(exports.iterdir()) == []
    # An existing folder is replaced only after success: with --force it survives the failure.
    (exports / "m").mkdir()
    (exports / "m" / "keep.txt").write_text("keep me")
    code, _, err = run([*args, "--out", exports / "m", "--verify", "--force", "--quiet"], capsys)
    assert code == 1 and "toy_facts_b/acc" in one_line_error(err)
    assert [p.name for p in exports.iterdir()] == ["m"]
    assert [p.name for p in (exports / "m").iterdir()] == ["keep.txt"]
    assert export_rows(store) == []


def test_existing_out_needs_force(toy_zoo, scored, tmp_path, capsys):
    fill(str(tmp_path / "s.db"), toy_zoo, scored)
    out = tmp_path / "exports" / "m"
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("keep me")
    args = export_args(tmp_path / "s.db", "--trial", "0")
    code, _, err = run([*args, "--out", out, "--quiet"], capsys)
    assert code == 1 and "already exists" in one_line_error(err) and "--force" in err
    assert (out / "keep.txt").read_text() == "keep me"
    code, _, err = run([*args, "--out", out, "--force", "--quiet"], capsys)
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert hidden(out.parent) == []


def test_unexportable_trials_are_one_line_errors(toy_zoo, scored, tmp_path, capsys):
    store = fill(str(tmp_path / "s.db"), toy_zoo, scored)
    moved = tmp_path / "ft_a_moved"
    shutil.copytree(toy_zoo["ft_a"], moved)
    recipe = dict(scored[0]["recipe"])
    recipe["sources"] = [{**recipe["sources"][0], "model": str(moved)}, recipe["sources"][1]]
    store.add_trial("toy", 9, role="proposal", label="moved", recipe=recipe)
    store.finish_trial("toy", 9, state="COMPLETE", metrics=scored[0]["full"])
    shutil.rmtree(moved)
    out = tmp_path / "exports" / "m"
    args = export_args(tmp_path / "s.db", "--out", out, "--quiet")
    cases = {
        str(FAILED_TRIAL): ["is FAILED (RuntimeError: NaN in layers.0), not COMPLETE"],
        str(RUNNING_TRIAL): ["is RUNNING, not COMPLETE"],
        "42": ["has no trial 42", f"its trials are 0-{RUNNING_TRIAL}, 9"],
        "pareto:99": ["pareto:99", "Pareto front of study 'toy' has"],
        "9": [str(moved), "does not exist"],
    }
    for selector, phrases in cases.items():
        code, _, err = run([*args, "--trial", selector], capsys)
        assert code == 1
        line = one_line_error(err)
        assert all(phrase in line for phrase in phrases), line
    code, _, err = run([*args, "--trial", "0", "--study", "nope"], capsys)
    assert code == 1 and "no study 'nope'" in one_line_error(err)
    assert not out.parent.exists() or list(out.parent.iterdir()) == []
    assert export_rows(store) == []


def test_interrupt_during_the_merge_leaves_nothing(toy_zoo, scored, tmp_path):
    store = fill(str(tmp_path / "s.db"), toy_zoo, scored)
    exports = tmp_path / "exports"
    exports.mkdir()

    def interrupt(done: int, total: int) -> None:
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export_trial(store, "toy", "best", exports / "m", progress=interrupt)
    assert list(exports.iterdir()) == []
    assert export_rows(store) == []


# -- the exported merge is the merge that was scored -------------------------------------------


def test_an_export_in_another_dtype_is_scored_as_written_beside_the_record(
    toy_zoo, scored, tmp_path, capsys
):
    """--dtype bfloat16 --verify of a trial merged in float32 cannot reproduce the worker's
    scores: the export is scored as written, and the card shows both columns, labelled."""
    storage = str(tmp_path / "s.db")
    fill(storage, toy_zoo, scored)
    out = tmp_path / "bf16"
    args = ["--trial", "1", "--out", out, "--dtype", "bfloat16", "--verify", "--quiet"]
    code, stdout, err = run(export_args(storage, *args), capsys)
    assert code == 0, err
    assert "verified: no" in stdout and "not verified: exported as bfloat16" in stdout
    code, evaluated, err = run(
        ["eval", out, "--tasks", "toy_facts_a,toy_facts_b", "--dtype", "bfloat16", "--json"],
        capsys,
    )
    assert code == 0, err
    as_written = json.loads(evaluated)["metrics"]
    body = (out / "README.md").read_text()
    assert "| metric | search (full) | as written (bfloat16) |" in body
    for name in TOY_METRICS:
        assert f"| {name} | {scored[1]['full'][name]:.6g} | {as_written[name]:.6g} |" in body
    assert "Not verified: exported as bfloat16, the trial was merged as the base dtype" in body


def test_verification_rescores_as_the_worker_recorded(toy_zoo, scored, tmp_path, capsys):
    """A trial recorded as scored in float32 on the CPU is re-scored so; a mismatch names how
    the worker scored it and how it was re-scored."""
    storage = str(tmp_path / "s.db")
    store = fill(storage, toy_zoo, scored)
    store.add_trial("toy", 9, role="proposal", label="recorded", recipe=scored[3]["recipe"])
    tampered = {**scored[3]["full"], TOY_METRICS[0]: scored[3]["full"][TOY_METRICS[0]] + 0.5}
    store.finish_trial("toy", 9, state="COMPLETE", metrics=tampered, scored_with="float32 on cpu")
    code, _, err = run(
        export_args(storage, "--trial", "9", "--out", tmp_path / "x", "--verify", "--quiet"),
        capsys,
    )
    assert code == 1
    assert "the worker scored float32 on cpu; re-scored as float32 on cpu" in err
    assert not (tmp_path / "x").exists()


def test_an_inspection_of_the_study_is_linked_from_the_export_card(
    toy_zoo, scored, tmp_path, capsys
):
    """`evomerge inspect --storage --study` inspects the study's own models, records where,
    and the model card of a later export carries its summary and its folder."""
    storage = str(tmp_path / "s.db")
    fill(storage, toy_zoo, scored)
    out = tmp_path / "inspection"
    code, _, err = run(
        ["inspect", "--storage", storage, "--study", "toy", "--out", out, "--quiet"], capsys
    )
    assert code == 0, err
    summary = (out / "SUMMARY.md").read_text()
    assert json.loads((out / "inspect.json").read_text())["paths"] == {
        "ft_a": str(toy_zoo["ft_a"]),
        "ft_b": str(toy_zoo["ft_b"]),
    }
    assert (
        run(export_args(storage, "--trial", "1", "--out", tmp_path / "x", "--quiet"), capsys)[0]
        == 0
    )
    card = (tmp_path / "x" / "README.md").read_text()
    assert (
        f"## Inspection of the sources\n\n`evomerge inspect` of this study's models, in `{out}`"
        in card
    )
    body = [line for line in summary.splitlines() if line and not line.startswith("#")]
    assert body and all(line in card for line in body)


BATCH_EVALUATOR = """
def batch(model, tokenizer, batch_size):
    return {"size": batch_size}
"""


def test_verification_uses_the_batch_sizes_the_worker_ran_with(toy_zoo, scored, tmp_path, capsys):
    """A worker that ran out of memory scores with a halved batch (recorded in the trial's
    timings); verification re-scores with that batch, not the configured one. An evaluator
    that reports its batch size makes the difference visible."""
    (tmp_path / "batch.py").write_text(BATCH_EVALUATOR)
    evaluator = {"kind": "python", "function": f"{tmp_path / 'batch.py'}:batch", "batch_size": 8}
    storage = str(tmp_path / "s.db")
    store = fill(storage, toy_zoo, scored, evaluators=[evaluator])
    for number, timings in ((9, {"batch_sizes": {"python:batch": 2}, "oom_retries": 2}), (10, {})):
        store.add_trial("toy", number, role="proposal", label="p", recipe=scored[1]["recipe"])
        store.finish_trial(
            "toy", number, state="COMPLETE", metrics={"batch/size": 2.0}, timings=timings
        )
    verify = ("--verify", "--quiet")
    assert (
        run(export_args(storage, "--trial", "9", "--out", tmp_path / "a", *verify), capsys)[0] == 0
    )
    code, _, err = run(
        export_args(storage, "--trial", "10", "--out", tmp_path / "b", *verify), capsys
    )
    assert code == 1 and "batch/size is 8.0 in the exported model but 2.0" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback of a CPU-only machine")
def test_export_merges_on_the_study_device_or_says_why_not(toy_zoo, scored, tmp_path, capsys):
    storage = str(tmp_path / "s.db")
    fill(storage, toy_zoo, scored, device="cuda", cluster={"workers": 1, "gpus_per_worker": 1})
    code, stdout, err = run(
        export_args(storage, "--trial", "0", "--out", tmp_path / "o", "--quiet"), capsys
    )
    assert code == 0, err
    assert "note: the study ran on cuda but this machine has no GPU: merged on cpu" in stdout


def test_a_dare_trial_scored_before_device_independent_masks_gets_a_note(
    toy_zoo, scored, tmp_path, capsys
):
    """A DARE trial recorded without `scored_with` was scored with torch-generator masks: its
    export is another random sample, and the export says so; a recorded one does not."""
    storage = str(tmp_path / "s.db")
    store = fill(storage, toy_zoo, scored)
    recipe = dict(scored[1]["recipe"], method="dare_ties")
    recipe["sources"] = [
        {**s, "parameters": {**s["parameters"], "density": 0.5}} for s in recipe["sources"]
    ]
    for number, scored_with in ((10, None), (11, "float32 on cpu")):
        store.add_trial("toy", number, role="proposal", label="dare", recipe=recipe)
        store.finish_trial(
            "toy", number, state="COMPLETE", metrics=scored[1]["full"], scored_with=scored_with
        )
    code, stdout, err = run(
        export_args(storage, "--trial", "10", "--out", tmp_path / "old", "--quiet"), capsys
    )
    assert code == 0, err
    assert "note: trial 10 was scored by an evomerge that drew DARE/DELLA masks" in stdout
    code, stdout, err = run(
        export_args(storage, "--trial", "11", "--out", tmp_path / "new", "--quiet"), capsys
    )
    assert code == 0, err
    assert "note:" not in stdout
