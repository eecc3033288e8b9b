"""The study YAML: validation naming the field, path resolution, JSON round trip."""

from __future__ import annotations

import json

import pytest
import yaml

from evomerge.errors import EvomergeError
from evomerge.study.config import StudyConfig, load_study_config, parse_study_config

MINIMAL = {
    "name": "toy",
    "base": "zoo/base",
    "sources": ["zoo/ft_a", "zoo/ft_b"],
    "space": "task_arithmetic_per_layer",
    "objectives": [{"metric": "toy_facts_a/acc"}],
    "evaluators": [{"kind": "lm_eval", "tasks": ["toy_facts_a"]}],
    "budget": 20,
}


def test_paths_resolve_against_the_yaml_and_the_config_round_trips(tmp_path):
    (tmp_path / "spaces").mkdir()
    (tmp_path / "spaces" / "mine.yaml").write_text("name: x\n")
    data = {
        **MINIMAL,
        "space": "spaces/mine.yaml",
        "evaluators": [{"kind": "perplexity", "file": "text.txt"}],
        "budget": {"trials": 50, "hours": 8},
        "cluster": {"workers": 4, "gpus_per_worker": 1, "trial_timeout": 600},
        "fidelity": {"limit": 20, "promote": 0.2},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    config = load_study_config(path)
    assert config.base == str(tmp_path / "zoo" / "base")
    assert config.sources[1] == str(tmp_path / "zoo" / "ft_b")
    assert config.space == str(tmp_path / "spaces" / "mine.yaml")
    assert config.evaluators[0]["file"] == str(tmp_path / "text.txt")
    assert config.storage == str(tmp_path / "evomerge_studies.db")
    assert (config.budget_trials, config.budget_hours) == (50, 8)
    assert config.cluster.workers == 4 and config.fidelity and config.fidelity.promote == 0.2
    stored = json.loads(config.model_dump_json())
    assert StudyConfig.model_validate(stored) == config  # what the database keeps is enough
    ready = parse_study_config(MINIMAL, "x", tmp_path)
    assert ready.space == "task_arithmetic_per_layer"  # a ready space name stays a name
    url = parse_study_config({**MINIMAL, "storage": "postgresql+psycopg://h/db"}, "x", tmp_path)
    assert url.storage == "postgresql+psycopg://h/db"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"budget": 0}, "budget"),
        ({"budget": {"minutes": 3}}, "minutes"),
        ({"budget": {}}, "trials"),
        ({"cluster": {"workers": 0}}, "cluster.workers"),
        ({"cluster": {"gpu": 1}}, "cluster.gpu"),
        ({"fidelity": {"limit": 5, "promote": 2}}, "fidelity.promote"),
        ({"objectives": [{"metric": "a", "direction": "up"}]}, "objectives.0.direction"),
        ({"evaluators": [{"kind": "lm_eval"}]}, "evaluators[0]"),
        ({"proposer": {"kind": "cma", "sigma0": -1}}, "sigma0"),
        ({"sources": []}, "sources"),
        ({"nmae": "typo"}, "nmae"),
    ],
)
def test_bad_study_config_names_the_field(change, field):
    with pytest.raises(EvomergeError, match=field.replace("[", r"\[").replace("]", r"\]")):
        parse_study_config({**MINIMAL, **change}, "study.yaml")
