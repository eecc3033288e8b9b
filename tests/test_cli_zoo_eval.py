"""``evomerge zoo``, ``scripts/build_toy_zoo.py`` and ``evomerge eval`` on the trained toy zoo."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from evomerge.cli import main
from evomerge.cli.output import format_metrics

ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("evomerge: error: "), err
    assert "Traceback" not in err
    return lines[0]


# -- evomerge zoo ------------------------------------------------------------------------------


def test_zoo_reuses_an_identical_zoo(
    toy_zoo: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    zoo = toy_zoo["base"].parent
    before = {p: p.stat().st_mtime_ns for p in zoo.rglob("*")}
    code, out, err = run(["zoo", "--out", str(zoo), "--quiet"], capsys)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert "reused" in lines[0] and str(zoo.resolve()) in lines[0]
    rows = {line.split(":")[0].strip(): line for line in lines[1:]}
    assert list(rows) == ["base", "ft_a", "ft_b"]
    for name, line in rows.items():
        assert str(toy_zoo[name].resolve()) in line
    # The manifest's accuracies: each fine-tune knows its own set, not the other one's.
    assert " c " in rows["ft_a"] and " a 1.00" in rows["ft_a"]
    assert " b 1.00" in rows["ft_b"]
    assert {p: p.stat().st_mtime_ns for p in zoo.rglob("*")} == before


def test_zoo_rejects_too_many_sources(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["zoo", "--out", str(tmp_path / "zoo"), "--sources", "7"], capsys)
    assert code == 1
    assert "sources" in one_line_error(err)
    assert not (tmp_path / "zoo").exists()
    assert list(tmp_path.iterdir()) == []


def test_zoo_refuses_a_non_empty_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text("mine\n")
    code, _, err = run(["zoo", "--out", str(tmp_path), "--quiet"], capsys)
    assert code == 1
    assert str(tmp_path) in one_line_error(err)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_zoo_refuses_a_zoo_built_with_another_seed(
    toy_zoo: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    zoo = toy_zoo["base"].parent
    code, _, err = run(["zoo", "--out", str(zoo), "--seed", "5", "--quiet"], capsys)
    assert code == 1
    assert "other parameters" in one_line_error(err)


def test_build_toy_zoo_script_help() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "build_toy_zoo.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT.parent,
    )
    assert result.returncode == 0, result.stderr
    for flag in ("--out", "--seed", "--sources"):
        assert flag in result.stdout


# -- evomerge eval -----------------------------------------------------------------------------


def test_eval_tasks_json(toy_zoo: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(
        ["eval", str(toy_zoo["ft_a"]), "--tasks", "toy_facts_a,toy_facts_b", "--json"], capsys
    )
    assert code == 0, err
    result = json.loads(out)
    metrics = result["metrics"]
    assert metrics["toy_facts_a/acc"] >= 0.95
    assert metrics["toy_facts_b/acc"] <= 0.2
    assert not any(key.startswith("toy_facts_c") for key in metrics)
    assert result["seconds"] > 0


def test_eval_default_table_with_limit(
    toy_zoo: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(["eval", str(toy_zoo["ft_b"]), "--limit", "10"], capsys)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].split() == ["metric", "value"]
    rows = {line.split()[0]: line for line in lines[1:-1]}
    # The default suite is the toy_facts group; stderrs are shown beside, not as rows.
    assert list(rows) == ["toy_facts/acc", "toy_facts_a/acc", "toy_facts_b/acc", "toy_facts_c/acc"]
    assert all("±" in row for row in rows.values())
    assert rows["toy_facts_b/acc"].split()[1] == "1.0000"
    assert lines[-1].startswith("evaluated ") and lines[-1].endswith(" s")


def test_format_metrics_puts_stderr_beside_its_metric() -> None:
    text = format_metrics(
        {"t/acc": 0.5, "t/acc_stderr": 0.01234, "t/f1": 0.25, "orphan_stderr": 0.1}
    )
    lines = text.splitlines()
    assert [line.split()[0] for line in lines] == ["metric", "orphan_stderr", "t/acc", "t/f1"]
    assert lines[2].split()[1:] == ["0.5000", "±", "0.0123"]
    assert lines[3].split()[1:] == ["0.2500"]


def test_eval_perplexity_from_yaml_with_relative_file(
    toy_zoo: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "facts.txt").write_text("k1 = v3 k2 = v5 k17 = v3 k40 = v11\n")
    config = tmp_path / "evaluators.yaml"
    config.write_text("kind: perplexity\nfile: data/facts.txt\nstride: 4\nmax_length: 8\n")
    code, out, err = run(
        ["eval", str(toy_zoo["base"]), "--evaluator", str(config), "--json"], capsys
    )
    assert code == 0, err
    metrics = json.loads(out)["metrics"]
    assert metrics["perplexity/perplexity"] > 1
    assert metrics["perplexity/nll"] > 0


def test_eval_yaml_list_of_evaluators(
    toy_zoo: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "text.txt").write_text("k1 = v3 k2 = v5\n")
    config = tmp_path / "both.yaml"
    config.write_text(
        "- kind: perplexity\n  file: text.txt\n  name: words\n"
        "- kind: lm_eval\n  tasks: [toy_facts_c]\n"
    )
    code, out, err = run(
        ["eval", str(toy_zoo["base"]), "--evaluator", str(config), "--json"], capsys
    )
    assert code == 0, err
    metrics = json.loads(out)["metrics"]
    assert {"words/perplexity", "words/nll", "toy_facts_c/acc"} <= set(metrics)
    assert metrics["toy_facts_c/acc"] >= 0.95


def test_eval_unknown_task(toy_zoo: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["eval", str(toy_zoo["ft_a"]), "--tasks", "no_such_task_xyz"], capsys)
    assert code == 1
    line = one_line_error(err)
    assert "no_such_task_xyz" in line and "toy_facts" in line


def test_eval_missing_model_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["eval", str(tmp_path / "absent")], capsys)
    assert code == 1
    assert "does not exist" in one_line_error(err)


def test_eval_folder_without_tokenizer(
    toy_zoo: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((toy_zoo["ft_a"] / name).read_bytes())
    code, _, err = run(["eval", str(bare)], capsys)
    assert code == 1
    line = one_line_error(err)
    assert "tokenizer" in line and str(bare) in line


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("kind: [\n", "not valid YAML"),
        ("- 3\n- 4\n", "evaluator mapping"),
        ("kind: nonsense\n", "nonsense"),
        ("kind: perplexity\nfile: missing.txt\n", "missing.txt"),
    ],
)
def test_eval_bad_evaluator_yaml(
    toy_zoo: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    text: str,
    needle: str,
) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    code, _, err = run(["eval", str(toy_zoo["ft_a"]), "--evaluator", str(config)], capsys)
    assert code == 1
    assert needle in one_line_error(err)


def test_eval_missing_evaluator_file(
    toy_zoo: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(
        ["eval", str(toy_zoo["ft_a"]), "--evaluator", str(tmp_path / "none.yaml")], capsys
    )
    assert code == 1
    assert "does not exist" in one_line_error(err)


def test_eval_a_bundled_preset_by_name_from_any_folder(
    toy_zoo: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``--evaluator toy_perplexity`` scores what the preset's file does, from a folder
    without it; an unknown name lists the presets."""
    preset = Path(__file__).resolve().parents[1] / "evaluators" / "presets" / "toy_perplexity.yaml"
    args = ["eval", str(toy_zoo["ft_a"]), "--json", "--evaluator"]
    code, by_file, err = run([*args, str(preset)], capsys)
    assert code == 0, err
    monkeypatch.chdir(tmp_path)
    code, by_name, err = run([*args, "toy_perplexity"], capsys)
    assert code == 0, err
    assert json.loads(by_name)["metrics"] == json.loads(by_file)["metrics"]
    assert set(json.loads(by_name)["metrics"]) == {"toy_heldout/nll", "toy_heldout/perplexity"}
    code, _, err = run([*args, "toy_nothing"], capsys)
    assert code == 1
    assert one_line_error(err).endswith(
        "evaluator file toy_nothing does not exist; bundled presets: toy_facts, toy_perplexity"
    )
