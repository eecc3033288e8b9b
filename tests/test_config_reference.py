"""The README's configuration reference is generated from the pydantic models and kept current."""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Literal

import yaml

from evomerge.cli import main
from evomerge.config_reference import BEGIN, END, block_in, generate, iter_fields
from evomerge.study.config import ClusterConfig, StudyConfig, parse_study_config

README = Path(__file__).resolve().parents[1] / "README.md"
ROW = re.compile(
    r"^\| `(?P<field>[a-z_0-9]+)` \| (?P<type>.*?) \| (?P<default>.*?) \| (?P<meaning>.*) \|$"
)


def tables(text: str) -> dict[str, dict[str, dict[str, str]]]:
    """Model name -> field name -> its row's cells, parsed back from the Markdown."""
    models: dict[str, dict[str, dict[str, str]]] = {}
    current = ""
    for line in text.splitlines():
        if line.startswith("#### `"):
            current = line.split("`")[1]
            models[current] = {}
        elif (match := ROW.match(line)) and current:
            models[current][match["field"]] = match.groupdict()
    return models


def test_the_readme_block_is_what_the_code_generates():
    block = block_in(README.read_text(encoding="utf-8"))
    assert block is not None, f"README.md lacks the {BEGIN} ... {END} block"
    assert block.strip() == generate().strip(), (
        "the config reference in README.md is out of date: run "
        "`evomerge config-reference --write README.md`"
    )


def test_every_field_has_a_row_with_its_meaning():
    parsed = tables(generate())
    missing, undocumented = [], []
    for model, name, _ in iter_fields():
        if name == "kind" and typing.get_origin(model.model_fields[name].annotation) is Literal:
            continue  # shown in the heading of each proposer and evaluator
        row = parsed.get(model.__name__, {}).get(name)
        if row is None:
            missing.append(f"{model.__name__}.{name}")
        elif not row["meaning"].strip():
            undocumented.append(f"{model.__name__}.{name}")
    assert not missing
    assert not undocumented, f"fields without a docstring: {undocumented}"


def test_rows_state_the_code_s_defaults_and_bounds():
    parsed = tables(generate())
    cluster = parsed["ClusterConfig"]
    assert cluster["workers"]["default"] == f"`{ClusterConfig().workers}`" == "`2`"
    assert cluster["workers"]["type"] == "integer (≥ 1)"
    assert cluster["trial_timeout"]["type"] == "number or null (> 0)"
    study = parsed["StudyConfig"]
    assert study["base"]["default"] == "**required**"
    assert study["proposer"]["default"] == '`{"kind": "cma"}`'
    assert study["budget"]["type"] == "integer or `BudgetConfig`"
    assert set(study) == set(StudyConfig.model_fields)
    assert parsed["FidelityConfig"]["promote"]["type"] == "number (> 0, ≤ 1)"
    assert "`kind: cma`" in generate() and "`kind: lm_eval`" in generate()


def test_the_readme_study_examples_are_valid_studies(tmp_path):
    text = README.read_text(encoding="utf-8")
    examples = [b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if "objectives:" in b]
    assert examples
    for example in examples:  # every field name and value in them passes validation
        parse_study_config(yaml.safe_load(example), "README.md", tmp_path)


def test_write_updates_a_stale_block_and_refuses_a_file_without_one(tmp_path, capsys):
    document = tmp_path / "doc.md"
    document.write_text(f"intro\n{BEGIN}\nold\n{END}\noutro\n", encoding="utf-8")
    assert main(["config-reference", "--write", str(document)]) == 0
    text = document.read_text(encoding="utf-8")
    assert text.startswith("intro\n") and text.endswith("outro\n")
    assert block_in(text).strip() == generate().strip()
    assert "updated" in capsys.readouterr().out
    assert main(["config-reference", "--write", str(document)]) == 0
    assert "up to date" in capsys.readouterr().out

    plain = tmp_path / "plain.md"
    plain.write_text("no block here\n", encoding="utf-8")
    assert main(["config-reference", "--write", str(plain)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "plain.md" in err
    assert plain.read_text(encoding="utf-8") == "no block here\n"
