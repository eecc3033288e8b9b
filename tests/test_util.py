"""The shared helpers in evomerge/util.py, against hand-computed values."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from evomerge.util import (
    evomerge_command,
    first_line,
    format_bytes,
    format_duration,
    number_ranges,
    parse_size,
)


def test_first_line_of_an_error_or_a_text() -> None:
    assert first_line(ValueError("  bad value\n  traceback here")) == "bad value"
    assert first_line(KeyError()) == "KeyError"  # no message: its type
    assert first_line("\n  WorkerDied: gone\nmore") == "WorkerDied: gone"
    assert first_line(None) == ""


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (45.4, "45s"), (750, "12m 30s"), (3600, "1h 00m"), (7530, "2h 05m")],
)
def test_durations(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_sizes_read_and_written() -> None:
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size(" 1.5 kb ") == 1500
    assert parse_size("1000") == 1000
    for bad in ("five", "5 parsecs", "0"):
        with pytest.raises(ValueError):
            parse_size(bad)
    assert [format_bytes(n) for n in (12, 1500, 2.5e9, 3e12)] == [
        "12 B",
        "1.5 KB",
        "2.5 GB",
        "3.0 TB",
    ]


def test_number_ranges() -> None:
    assert number_ranges([5, 0, 2, 1, 7, 8]) == "0-2, 5, 7-8"
    assert number_ranges([]) == ""


def test_the_command_printed_as_advice_runs_as_printed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = tmp_path / "venv" / "bin" / "evomerge"
    script.parent.mkdir(parents=True)
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(script), "demo"])
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # not on the PATH: its path, from here
    assert evomerge_command() == os.path.join("venv", "bin", "evomerge")
    monkeypatch.setenv("PATH", f"{script.parent}:/usr/bin")  # on the PATH: its name
    assert evomerge_command() == "evomerge"
    monkeypatch.setattr(sys, "argv", ["/somewhere/evomerge/__main__.py"])
    assert evomerge_command() == f"{sys.executable} -m evomerge"
