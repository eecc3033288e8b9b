"""`evomerge methods`: every registered method on one line with its summary; named methods in
full, with every parameter."""

from __future__ import annotations

import pytest

from evomerge.cli import main
from evomerge.merge.registry import available_methods, get_method

ISSUE_19 = {
    "nuslerp", "multislerp", "karcher", "sce", "nearswap", "arcee_fusion", "ram", "ramplus_tl",
    "tsv", "iso_c", "iso_cts",
}  # fmt: skip


def test_every_method_is_listed_on_one_line_with_its_summary(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert ISSUE_19 <= set(available_methods())
    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    by_name = {line.split()[0]: line for line in lines if line and not line.startswith("`")}
    assert sorted(by_name) == available_methods()
    for name, line in by_name.items():
        summary = get_method(name).summary
        assert len(summary) > 15, name  # a real sentence, not a placeholder
        assert line.split(None, 1)[1] == summary


def test_a_named_method_shows_each_parameter(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["methods", "tsv", "nuslerp"]) == 0
    out = capsys.readouterr().out
    for name in ("tsv", "nuslerp"):
        for spec in get_method(name).params:
            assert f"  {spec.name} (" in out
    assert "base model: optional" in out  # nuslerp works with or without a base
    assert "mergekit: no equivalent" in out  # tsv
    assert "merge temporaries: 6.5 + 0 x sources copies of the largest tensor" in out  # tsv


def test_an_unknown_method_is_one_line_naming_what_exists(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["methods", "nope"]) == 1
    err = capsys.readouterr().err
    assert "unknown merge method 'nope'" in err and "iso_cts" in err
    assert "Traceback" not in err
