"""Data-flow studies as a user runs them: a parameter-space study, then a data-flow study over its
best merge and the sources (PS then DFS), SIGKILLed mid-run and resumed, and a data-flow study
over the sources alone; their exports reload with transformers and score what was recorded.

The merges a data-flow space names by study (``study:NAME:best``) are resolved once, when the
data-flow study is created: resuming uses the stored recipe whatever the other study did since.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
import yaml

from evomerge.cli import main
from evomerge.errors import ConfigError
from evomerge.study import StudyStore
from evomerge.study.config import parse_study_config
from evomerge.study.driver import StudyDriver
from tests.study_helpers import TOY_EVALUATOR, TOY_OBJECTIVES, start_cli

PS_THEN_DFS = {"kind": "dataflow", "name": "ps_then_dfs", "models": ["study:ps:best", "sources"]}


def _study(zoo: dict[str, Path], storage: str, **changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "ps",
        "storage": storage,
        "base": str(zoo["base"]),
        "sources": [str(zoo["ft_a"]), str(zoo["ft_b"])],
        "space": "task_arithmetic_global",
        "proposer": {"kind": "cma", "seed": 0, "popsize": 4},
        "objectives": TOY_OBJECTIVES,
        "evaluators": [TOY_EVALUATOR],
        "budget": 8,
        "cluster": {"workers": 1},
    }
    data.update(changes)
    return data


def _write(folder: Path, data: dict[str, Any]) -> Path:
    path = folder / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _export(storage: str, study: str, out: Path, capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    args = ["--trial", "best", "--out", str(out), "--verify"]
    assert main(["export", "--storage", storage, "--study", study, *args]) == 0
    return capsys.readouterr().out


@pytest.mark.timeout(600)
def test_ps_then_dfs_study_survives_a_kill_and_its_export_verifies(toy_zoo, tmp_path, capsys):
    from transformers import AutoConfig

    storage = str(tmp_path / "s.db")
    assert main(["search", str(_write(tmp_path, _study(toy_zoo, storage))), "--quiet"]) == 0
    store = StudyStore(storage)
    ps_best = max(
        (t for t in store.trials("ps") if t.state == "COMPLETE"),
        key=lambda t: sum(t.metrics.values()),
    )

    budget = 14
    dfs = _study(toy_zoo, storage, name="psdfs", space=PS_THEN_DFS, budget=budget)
    dfs["proposer"] = {"kind": "cma", "seed": 1, "popsize": 4}
    run = start_cli("search", str(_write(tmp_path, dfs)), EVOMERGE_FAILPOINTS="after_tell=4")
    _, err = run.communicate(timeout=300)
    assert run.returncode == -signal.SIGKILL, err  # killed between a result told and written
    before = {t.number: t.recipe for t in store.trials("psdfs")}
    assert 0 < len(before) < budget

    assert main(["resume", "--storage", storage, "--study", "psdfs", "--quiet"]) == 0
    trials = store.trials("psdfs")
    assert [t.number for t in trials] == list(range(budget))  # exactly the budget, none twice
    assert {t.state for t in trials} == {"COMPLETE"}
    for number, recipe in before.items():  # a trial in flight at the kill ran again as given
        assert trials[number].recipe == recipe

    # The stored space holds the PS trial's recipe, resolved when the study was created.
    merge = store.study_config("psdfs")["space"]["models"][0]
    assert merge["study"] == f"ps:{ps_best.number}"
    assert merge["recipe"]["method"] == ps_best.recipe["method"]
    # The path through the merge's own layers is the merge: it scores what the PS study did.
    alone = next(t for t in trials if t.label == "path: merge alone")
    assert alone.recipe["outer"] == "merge" and len(alone.recipe["path"]) == 4
    assert alone.metrics == ps_best.metrics
    proposals = [t.recipe for t in trials if t.role == "proposal"]
    used = {step["model"] for recipe in proposals for step in recipe["path"]}
    assert used == {"merge", "ft_a", "ft_b"}  # the search went through every model's layers

    out = _export(storage, "psdfs", tmp_path / "psdfs_best", capsys)
    assert "verified: yes" in out
    exported = next(t for t in trials if f"exported trial {t.number} " in out)
    config = AutoConfig.from_pretrained(tmp_path / "psdfs_best")
    assert config.num_hidden_layers == len(exported.recipe["path"])
    card = (tmp_path / "psdfs_best" / "README.md").read_text()
    assert f"a layer path of {len(exported.recipe['path'])} layers" in card


@pytest.mark.timeout(400)
def test_a_dfs_study_over_the_sources_survives_a_kill_and_exports(toy_zoo, tmp_path, capsys):
    storage = str(tmp_path / "s.db")
    data = _study(toy_zoo, storage, name="dfs", space="dfs", budget=10)
    data["proposer"] = {"kind": "tpe", "seed": 0, "n_startup_trials": 4}
    run = start_cli("search", str(_write(tmp_path, data)), EVOMERGE_FAILPOINTS="after_add_trial=6")
    _, err = run.communicate(timeout=300)
    assert run.returncode == -signal.SIGKILL, err  # a trial written RUNNING, never submitted
    assert main(["resume", "--storage", storage, "--study", "dfs", "--quiet"]) == 0
    trials = StudyStore(storage).trials("dfs")
    assert [t.number for t in trials] == list(range(10))
    assert len(trials) == 10 and {t.state for t in trials} == {"COMPLETE"}
    by_label = {t.label: t for t in trials}
    # ft_a's layers in order, with ft_a's embeddings and head: ft_a itself, scored alike.
    assert by_label["path: ft_a alone"].metrics == by_label["ft_a"].metrics
    for trial in trials:
        if trial.role == "proposal":
            assert 1 <= len(trial.recipe["path"]) <= 8  # max_depth: twice the 4 layers
            for step in trial.recipe["path"]:  # TPE's yes/no genes decode to a path
                assert step["model"] in ("ft_a", "ft_b") and 0 <= step["layer"] < 4
    out = _export(storage, "dfs", tmp_path / "dfs_best", capsys)
    assert "verified: yes" in out


def test_merges_named_by_study_are_resolved_once_and_checked(toy_zoo, tmp_path):
    """Created: the best PS trial's recipe is stored. Resumed after the PS study found a
    better trial: still the stored one. Wrong references are refused with the reason."""
    storage = str(tmp_path / "s.db")
    store = StudyStore(storage)
    ps = parse_study_config(_study(toy_zoo, storage), "ps")
    store.create_study("ps", ps.model_dump(mode="json"), 8)
    recipe = {
        "method": "task_arithmetic",
        "base": str(toy_zoo["base"]),
        "sources": [
            {"model": str(toy_zoo["ft_a"]), "label": "ft_a", "parameters": {"weight": 0.5}},
            {"model": str(toy_zoo["ft_b"]), "label": "ft_b", "parameters": {"weight": 0.5}},
        ],
    }
    scores = {"toy_facts_a/acc": 0.5, "toy_facts_b/acc": 0.5}
    store.add_trial("ps", 0, role="proposal", label="p0", recipe=recipe)
    store.finish_trial("ps", 0, state="COMPLETE", metrics=scores)

    config = parse_study_config(_study(toy_zoo, storage, name="d", space=PS_THEN_DFS), "d")
    driver = StudyDriver(store, config)
    driver.begin()
    driver.store.release("d", driver.owner)
    stored = store.study_config("d")["space"]["models"][0]
    assert stored["study"] == "ps:0" and stored["recipe"]["sources"][0]["parameters"] == {
        "weight": 0.5
    }

    better = dict(recipe, sources=[dict(s, parameters={"weight": 0.9}) for s in recipe["sources"]])
    store.add_trial("ps", 1, role="proposal", label="p1", recipe=better)
    store.finish_trial("ps", 1, state="COMPLETE", metrics=dict.fromkeys(scores, 0.9))
    resumed = StudyDriver.for_stored(store, "d")
    assert resumed.space.merges["merge"].recipe == stored["recipe"]
    store.release("d", resumed.owner)

    def refused(space: dict[str, Any], match: str) -> None:
        bad = parse_study_config(_study(toy_zoo, storage, name="bad", space=space), "bad")
        with pytest.raises(ConfigError, match=match):
            StudyDriver(store, bad)

    refused(dict(PS_THEN_DFS, models=["study:nope:best", "sources"]), "no study 'nope'")
    refused(dict(PS_THEN_DFS, models=["study:ps:7", "sources"]), "trial 7")
    path_trial = {"models": [{"label": "m", "model": str(toy_zoo["ft_a"])}], "outer": "m"}
    path_trial["path"] = [{"model": "m", "layer": 0}]
    store.add_trial("ps", 2, role="proposal", label="p2", recipe=path_trial)
    store.finish_trial("ps", 2, state="COMPLETE", metrics=scores)
    refused(dict(PS_THEN_DFS, models=["study:ps:2", "sources"]), "itself a path")
    other = dict(recipe, sources=[dict(recipe["sources"][0], model=str(toy_zoo["base"]))])
    store.add_trial("ps", 3, role="proposal", label="p3", recipe=other)
    store.finish_trial("ps", 3, state="COMPLETE", metrics=scores)
    refused(dict(PS_THEN_DFS, models=["study:ps:3", "sources"]), "not one of this study's sources")


def test_the_memory_plan_counts_the_models_a_path_holds(toy_zoo, tmp_path):
    """Sources whose stored dtype is not the working dtype are held once more, converted; each
    merge on the paths is one more model in the working dtype (hand-counted parameters)."""
    from evomerge.memory import plan_study_memory, read_model_size

    storage = str(tmp_path / "s.db")
    params = {name: read_model_size(str(toy_zoo[name])).parameters for name in toy_zoo}

    def held(space: Any, dtype: str) -> int | None:
        config = parse_study_config(
            _study(toy_zoo, storage, space=space, working_dtype=dtype), "study"
        )
        plan = plan_study_memory(config, None)
        found = [c.bytes for c in plan.components if c.name == "path models"]
        return found[0] if found else None

    assert held("dfs", "float32") is None  # float32 on disk and at work: used as they are
    assert held("dfs", "bfloat16") == (params["ft_a"] + params["ft_b"]) * 2
    assert held("task_arithmetic_global", "bfloat16") is None
    merge = {"label": "m", "recipe": {"method": "linear", "sources": [{"model": "x"}]}}
    space = {"kind": "dataflow", "name": "d", "models": [merge, "ft_b"]}
    assert held(space, "float32") == params["base"] * 4
    assert held(space, "bfloat16") == (params["base"] + params["ft_b"]) * 2


def test_check_names_the_trial_a_merge_resolves_to_or_why_not(toy_zoo, tmp_path, capsys):
    storage = str(tmp_path / "s.db")
    store = StudyStore(storage)
    ps = parse_study_config(_study(toy_zoo, storage), "ps")
    store.create_study("ps", ps.model_dump(mode="json"), 8)
    recipe = {"method": "linear", "sources": [{"model": str(toy_zoo["ft_a"])}]}
    store.add_trial("ps", 0, role="source", label="ft_a", recipe=recipe)
    scores = {"toy_facts_a/acc": 1.0, "toy_facts_b/acc": 0.1}
    store.finish_trial("ps", 0, state="COMPLETE", metrics=scores)

    def study_line(models: list[Any]) -> tuple[int, str]:
        space = dict(PS_THEN_DFS, models=models)
        path = _write(tmp_path, _study(toy_zoo, storage, name="d", space=space))
        code = main(["check", str(path)])
        out = capsys.readouterr().out
        return code, next(line for line in out.splitlines() if line.split()[1:2] == ["study"])

    code, line = study_line(["study:ps:best", "sources"])
    assert line.startswith("ok") and "its paths use merge = ps:0" in line
    code, line = study_line(["study:nope:best", "sources"])
    assert code == 1 and line.startswith("FAIL") and "there is no study 'nope'" in line


def test_recipe_show_and_to_mergekit_read_a_path_recipe(toy_zoo, tmp_path, capsys):
    recipe = {
        "models": [{"label": "a", "model": str(toy_zoo["ft_a"])}, {"label": "b", "model": "b"}],
        "outer": "a",
        "path": [
            {"model": "a", "layer": 0},
            {"model": "b", "layer": 1, "scale": 1.5},
            {"model": "b", "layer": 2},
            {"model": "a", "layer": 3},
        ],
    }
    (tmp_path / "b").symlink_to(toy_zoo["ft_b"])  # a folder relative to the recipe file
    path = tmp_path / "path.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["recipe", "show", str(path)]) == 0
    out = capsys.readouterr().out
    assert "a layer path of 4 layers: a 0, b 1-2 (input x1.5), a 3; outer model a" in out
    assert "2 distinct parameter settings" in out  # the scaled norm is a setting of its own
    assert main(["recipe", "to-mergekit", str(path)]) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert [s["sources"][0]["layer_range"] for s in config["slices"]] == [
        [0, 1],
        [1, 2],
        [2, 3],
        [3, 4],
    ]
    assert config["slices"][1]["sources"][0]["model"] == str(tmp_path / "b")
    assert config["slices"][1]["parameters"]["scale"][0] == {
        "filter": "input_layernorm",
        "value": 1.5,
    }
    recipe["path"] = recipe["path"][:3]  # ends in b: mergekit would take b's head
    path.write_text(yaml.safe_dump(recipe))
    assert main(["recipe", "to-mergekit", str(path)]) == 1
    assert "mergekit cannot express this path" in capsys.readouterr().err
