"""Start-up of the ``evomerge`` command: ``--version`` and ``--help``, median of N processes.

Each run is a fresh interpreter that imports the command line and builds its parser, as the
console script does. ``--source DIR`` times another checkout's package (for example an older
commit unpacked with ``git archive COMMIT evomerge | tar -x -C DIR``) through ``PYTHONPATH``;
its files are byte-compiled first, as an installed package's are.

    .venv/bin/python scripts/bench_startup.py [--runs 5] [--source DIR]
"""

from __future__ import annotations

import argparse
import compileall
import statistics
import subprocess
import sys
import time
from pathlib import Path

CODE = "import sys; from evomerge.cli import main; sys.exit(main(sys.argv[1:]))"
SOURCE_FIRST = (
    "import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f)]; "
    "sys.path.insert(0, {source!r}); "
)
"""With ``--source``: the editable install's finder would still answer first, so drop it."""


def median_seconds(command: list[str], runs: int) -> float:
    """Median wall seconds of ``command`` over ``runs`` processes (each must succeed)."""
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--source", type=Path, help="a checkout whose evomerge/ to time instead")
    args = parser.parse_args()
    code, package = CODE, Path(__file__).resolve().parents[1] / "evomerge"
    if args.source is not None:
        code = SOURCE_FIRST.format(source=str(args.source.resolve())) + CODE
        package = args.source / "evomerge"
    compileall.compile_dir(package, quiet=1)
    shown = subprocess.run(
        [
            sys.executable,
            "-c",
            code.replace(
                "sys.exit(main(sys.argv[1:]))",
                "print(main.__module__, sys.modules['evomerge'].__file__)",
            ),
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    print(f"timing {shown}")
    for flags in (["--version"], ["--help"]):
        median = median_seconds([sys.executable, "-c", code, *flags], args.runs)
        print(f"evomerge {' '.join(flags)}: {median:.3f} s (median of {args.runs})")
    script = Path(sys.executable).parent / "evomerge"
    if args.source is None and script.exists():
        median = median_seconds([str(script), "--version"], args.runs)
        print(f"{script} --version: {median:.3f} s (the console script)")
    bare = median_seconds([sys.executable, "-c", "pass"], args.runs)
    print(f"python -c pass (the interpreter alone): {bare:.3f} s")


if __name__ == "__main__":
    main()
