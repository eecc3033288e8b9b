"""Small helpers every layer shares: an error's first line, durations and byte sizes as text,
reading a YAML mapping, pydantic's first validation error as one line, JSON-safe values, the
merge dtypes, and the ``evomerge`` command as a shell here runs it.

Pure standard library plus PyYAML and pydantic; nothing here imports torch or the CLI.
"""

from __future__ import annotations

import math
import os
import re
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.errors import ConfigError

if TYPE_CHECKING:
    from pydantic import ValidationError

DTYPES = ("float32", "float16", "bfloat16")
"""The dtypes a merge can be written in (``--dtype``, ``export.dtype``, a recipe's ``dtype``)."""


def first_line(error: BaseException | str | None) -> str:
    """The first non-empty line of an exception's message (its type name when it has none), or
    of a text (the empty string for none)."""
    if isinstance(error, BaseException):
        text = str(error).strip()
        return text.splitlines()[0] if text else type(error).__name__
    text = (error or "").strip()
    return text.splitlines()[0] if text else ""


def format_duration(seconds: float) -> str:
    """``"2h 05m"``, ``"12m 30s"`` or ``"45s"``."""
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def format_bytes(n: float) -> str:
    """``"1.5 GB"``, ``"300.0 MB"``, ``"12 B"``: decimal units, one decimal."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'5GB' -> 5*10**9, '512MiB' -> 512*2**20, '1000' -> 1000 bytes; ValueError otherwise."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"'{text}' is not a size like 5GB, 500MB or 1000000")
    number, unit = float(match.group(1)), (match.group(2) or "").lower()
    power = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}[unit[:1]] if unit else 0
    base = 1024 if "i" in unit else 1000
    size = int(number * base**power)
    if size <= 0:
        raise ValueError("the shard size must be positive")
    return size


def number_ranges(numbers: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``'0-2, 5'``."""
    spans: list[list[int]] = []
    for n in sorted(numbers):
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def load_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The YAML mapping in ``path``; a ConfigError naming the file otherwise."""
    import yaml

    file = Path(path)
    try:
        data = yaml.safe_load(file.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read {file}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file} is not valid YAML: {exc}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{file} must hold a YAML mapping, got {type(data).__name__}")
    return data


def pydantic_message(exc: ValidationError) -> str:
    """The first validation error as 'field.path: message'."""
    err = exc.errors()[0]
    loc = ".".join(
        str(part) for part in err["loc"] if not str(part).startswith(("function-", "union"))
    )
    extra = f" ({len(exc.errors()) - 1} more problems)" if len(exc.errors()) > 1 else ""
    message = str(err["msg"]).removeprefix("Value error, ")  # our validators' own sentences
    return f"{loc or 'value'}: {message}{extra}"


def evomerge_command() -> str:
    """How to run evomerge again from this shell, for commands printed as advice: ``evomerge``
    when that name on the PATH is the program running now, else that program's path (such as
    ``.venv/bin/evomerge`` when the virtual environment is not activated)."""
    import shutil
    import sys

    running = Path(sys.argv[0] if sys.argv and sys.argv[0] else "evomerge")
    if running.name == "__main__.py":  # python -m evomerge(.cli)
        return f"{shlex.quote(sys.executable)} -m evomerge"
    if running.name != "evomerge":
        return "evomerge"
    found = shutil.which("evomerge")
    if found and Path(found).resolve() == running.resolve():
        return "evomerge"
    try:
        return shlex.quote(str(running.resolve().relative_to(Path.cwd().resolve())))
    except ValueError:
        return shlex.quote(str(running.resolve()))


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float as None (null), so it dumps as valid JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value
