"""Shared by the benchmark scripts: put a report into BENCHMARKS.md between its markers."""

from __future__ import annotations

from pathlib import Path


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def write_section(path: Path, name: str, report: str) -> None:
    """Replace the ``name`` section of ``path`` with ``report`` (which includes the markers),
    or append it; the rest of the file is kept."""
    begin, end = markers(name)
    text = path.read_text() if path.exists() else ""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + report + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + report + "\n"
    path.write_text(text)
