"""``evomerge inspect``: task-vector statistics against hand-computed values, the barrier of
known curves, and the command end to end on the toy zoo."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from evomerge.checkpoint import ModelFolder
from evomerge.cli import main
from evomerge.inspect import barrier, derived, tensor_stats

A = torch.tensor([1.0, 2.0, 0.0, -1.5])
B = torch.tensor([2.0, -1.0, 0.0, -3.0])
C = torch.tensor([-1.0, 1.0, 1.0, 0.0])


def test_two_sources_by_hand() -> None:
    sums = tensor_stats([A, B], density=0.5)
    assert sums.squares == pytest.approx([7.25, 14.0])
    assert sums.dots[(0, 1)] == pytest.approx(2 - 2 + 0 + 4.5)
    # both move at entries 0, 1, 3; signs differ at entry 1 only
    assert (sums.moved, sums.conflicts) == (3, 1)
    # density 0.5 keeps 2 of 4: A keeps entries 1, 3; B keeps 3, 0; both keep 3 (same sign)
    assert (sums.top_moved, sums.top_conflicts) == (1, 0)
    stats = derived(sums, ["a", "b"], 0.5)
    assert stats["cosine"]["a|b"] == pytest.approx(4.5 / math.sqrt(7.25 * 14.0))
    assert stats["conflict_rate"] == pytest.approx(1 / 3)
    assert stats["top_conflict_rate"] == 0.0
    assert stats["ties_kept_mass"] == pytest.approx({"a": 3.5 / 4.5, "b": 5.0 / 6.0})
    mean = (math.sqrt(7.25) + math.sqrt(14.0)) / 2
    assert stats["balance"]["b"] == pytest.approx(math.sqrt(14.0) / mean)


def test_three_sources_conflicts_and_orthogonal_pair() -> None:
    sums = tensor_stats([A, B, C], density=1.0)
    # entry 0: + + -, entry 1: + - +, entry 2: only C moves, entry 3: - - (agree)
    assert (sums.moved, sums.conflicts) == (3, 2)
    assert (sums.top_moved, sums.top_conflicts) == (3, 2)  # density 1 keeps everything
    stats = derived(sums, ["a", "b", "c"], 1.0)
    assert stats["cosine"]["b|c"] == pytest.approx((-2 - 1) / math.sqrt(14.0 * 3.0))
    ortho = derived(
        tensor_stats([torch.tensor([1.0, 0.0]), torch.tensor([0.0, 5.0])]), ["x", "y"], 0.2
    )
    assert ortho["cosine"]["x|y"] == 0.0
    assert ortho["conflict_rate"] is None  # no entry moved by both


@pytest.mark.parametrize(
    ("values", "higher", "expected", "at"),
    [
        ([1.0, 0.5, 1.0], True, 0.5, 0.5),
        ([0.0, 0.5, 1.0], True, 0.0, None),
        ([1.0, 1.0, 0.0], True, 0.0, None),
        ([1.0, 2.0, 1.0], False, 1.0, 0.5),
        ([1.0, 2.0, 1.0], True, 0.0, None),
    ],
)
def test_barrier_of_known_curves(values, higher, expected, at) -> None:  # type: ignore[no-untyped-def]
    found = barrier([0.0, 0.5, 1.0], values, higher)
    assert found["barrier"] == pytest.approx(expected)
    assert found["at"] == at


def test_barrier_against_a_sloped_line() -> None:
    # line from 0 to 1 over t = 0, .25, .5, .75, 1; the curve dips 0.3 below it at t = .75
    found = barrier([0, 0.25, 0.5, 0.75, 1], [0.0, 0.25, 0.4, 0.45, 1.0])
    assert found == {"barrier": pytest.approx(0.3), "at": 0.75}


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_toy_zoo_end_to_end(
    toy_zoo: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "facts_a.yaml"
    config.write_text("kind: lm_eval\ntasks: [toy_facts_a]\nbatch_size: 64\n")
    out = tmp_path / "inspection"
    argv = ["inspect", "--base", str(toy_zoo["base"]), str(toy_zoo["ft_a"]), str(toy_zoo["ft_b"])]
    argv += ["--evaluator", str(config), "--points", "3", "--limit", "24", "--out", str(out)]
    code, printed, err = _run(argv, capsys)
    assert code == 0, err
    report = json.loads((out / "inspect.json").read_text())
    assert report["sources"] == ["ft_a", "ft_b"]
    # the overall norms and cosine, recomputed from the folders directly
    base, a, b = (ModelFolder(toy_zoo[k]) for k in ("base", "ft_a", "ft_b"))
    sq_a = sq_b = dot = 0.0
    for name in base.tensors:
        da = (a.read(name) - base.read(name)).double()
        db = (b.read(name) - base.read(name)).double()
        sq_a += float((da * da).sum())
        sq_b += float((db * db).sum())
        dot += float((da * db).sum())
    overall = report["overall"]
    assert overall["norm"]["ft_a"] == pytest.approx(math.sqrt(sq_a), rel=1e-6)
    assert overall["norm"]["ft_b"] == pytest.approx(math.sqrt(sq_b), rel=1e-6)
    assert overall["cosine"]["ft_a|ft_b"] == pytest.approx(dot / math.sqrt(sq_a * sq_b), rel=1e-6)
    assert 0 < overall["conflict_rate"] < 1
    assert "outside" in report["layers"] and "0" in report["layers"]
    # scans: base->ft_a, base->ft_b, ft_a->ft_b, 3 points each, barriers as defined
    assert report["metric"] == "toy_facts_a/acc"
    scans = {(s["from"], s["to"]): s for s in report["scans"]}
    assert list(scans) == [("base", "ft_a"), ("base", "ft_b"), ("ft_a", "ft_b")]
    to_a = scans[("base", "ft_a")]
    assert to_a["values"][-1] > to_a["values"][0]  # ft_a was tuned on facts a
    assert scans[("ft_a", "ft_b")]["values"][0] == pytest.approx(to_a["values"][-1])
    for scan in scans.values():
        assert scan["barrier"] == pytest.approx(barrier(scan["t"], scan["values"])["barrier"])
        assert scan["midpoint"] == scan["values"][1]
    for name in ("cosine.png", "conflict.png", "balance.png", "scan.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    summary = (out / "SUMMARY.md").read_text()
    assert "## Remarks" in summary and "ft_a -> ft_b" in summary
    assert "inspection written to" in printed


def test_inspect_one_source_skips_pairwise(
    toy_zoo: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "one"
    code, printed, err = _run(
        ["inspect", "--base", str(toy_zoo["base"]), str(toy_zoo["ft_a"]), "--out", str(out)],
        capsys,
    )
    assert code == 0, err
    assert "pairwise statistics (cosine, sign conflicts) are skipped" in printed
    report = json.loads((out / "inspect.json").read_text())
    assert report["overall"]["cosine"] == {} and report["overall"]["balance"]["ft_a"] == 1.0
    assert (out / "balance.png").is_file() and not (out / "cosine.png").exists()


def test_inspect_errors(
    toy_zoo: dict[str, Path],
    family: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = str(tmp_path / "x")
    code, _, err = _run(
        ["inspect", "--base", str(toy_zoo["base"]), str(tmp_path / "nope"), "--out", out], capsys
    )
    assert code == 1 and "does not exist" in err and len(err.strip().splitlines()) == 1
    code, _, err = _run(
        ["inspect", "--base", str(toy_zoo["base"]), str(family["ft_0"]), "--out", out], capsys
    )
    assert code == 1 and err.startswith("evomerge: error:") and "'base'" in err
    code, _, err = _run(["inspect", str(toy_zoo["ft_a"]), "--out", out], capsys)
    assert code == 1 and "--base" in err
