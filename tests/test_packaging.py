"""A wheel (``pip install .``) ships ``search_spaces/`` and ``evaluators/`` inside the package, and
the installed copy finds them without the checkout: ready spaces and bundled lm-eval suites work
after a plain install, not only from an editable one."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ("search_spaces", "evaluators")
JUNK = ("__pycache__", "*.pyc")


def shipped_files(folder: str) -> set[str]:
    """Every file of a top-level shipped folder, as its path in the wheel."""
    return {
        f"evomerge/{path.relative_to(ROOT).as_posix()}"
        for path in (ROOT / folder).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }


def test_package_list_names_every_package_and_shipped_folder() -> None:
    """The package-dir mapping rules out ``packages.find``: the explicit list must keep up with
    new subpackages and shipped subfolders (the wheel test below would catch it more slowly)."""
    tomllib = pytest.importorskip("tomllib")
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    code = {
        ".".join(path.parent.relative_to(ROOT).parts)
        for path in (ROOT / "evomerge").rglob("*.py")
        if "__pycache__" not in path.parts
    }
    data = {
        "evomerge." + ".".join(path.relative_to(ROOT).parts)
        for folder in SHIPPED
        for path in [ROOT / folder, *(ROOT / folder).rglob("*")]
        if path.is_dir() and "__pycache__" not in path.parts
    }
    assert sorted(setuptools["packages"]) == sorted(code | data)
    assert setuptools["package-dir"] == {f"evomerge.{folder}": folder for folder in SHIPPED}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built offline with the venv's setuptools from a copy of the sources
    (an in-tree build would reuse a stale ``build/`` and race other builds in the checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for folder in ("evomerge", *SHIPPED):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns(*JUNK))
    command = [
        sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
        "--no-index", "-w", str(tmp / "dist"), str(source),
    ]  # fmt: skip
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (built,) = (tmp / "dist").glob("evomerge-*.whl")
    return built


def test_wheel_holds_the_code_and_every_shipped_file(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in SHIPPED:
        expected = shipped_files(folder)
        assert expected, folder
        assert sorted(expected - names) == [], f"{folder}/ files missing from the wheel"
        assert not any(name.startswith(f"{folder}/") for name in names)  # not top-level
    code = {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "evomerge").rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert sorted(code - names) == []
    assert not any("__pycache__" in name or name.endswith(".pyc") for name in names)


@pytest.mark.slow
def test_installed_wheel_finds_its_bundled_spaces_and_suites(
    wheel: Path, family: dict[str, Path], toy_zoo: dict[str, Path], tmp_path: Path
) -> None:
    site = tmp_path / "site"
    command = [
        sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
        "--target", str(site), str(wheel),
    ]  # fmt: skip
    install = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    work = tmp_path / "elsewhere"  # not the checkout: nothing found relative to it
    work.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": str(site),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    env.pop("EVOMERGE_EVALUATORS", None)

    def run(*args: str) -> str:
        result = subprocess.run(
            [sys.executable, *args], cwd=work, env=env, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    # The installed copy is imported (PYTHONPATH comes before the venv's editable finder), and
    # it finds the folders inside itself.
    where = run(
        "-c",
        "import evomerge; from evomerge.bundled import bundled_folder as f; "
        "print(evomerge.__file__); print(f('search_spaces')); print(f('evaluators'))",
    ).split()
    assert [Path(line).resolve() for line in where] == [
        site.resolve() / "evomerge" / "__init__.py",
        site.resolve() / "evomerge" / "search_spaces",
        site.resolve() / "evomerge" / "evaluators",
    ]

    out = run(
        "-m", "evomerge.cli", "space", "show", "task_arithmetic_per_layer",
        "--base", str(family["base"]),
    )  # fmt: skip
    assert out.startswith("task_arithmetic_per_layer: task_arithmetic")
    assert "weight[s0]/attention/L0" in out and "[0, 1.5]" in out
    assert "dimension 28" in out  # 4 layers x (attention, mlp, rest) + embedding + head, x2

    out = run(
        "-m", "evomerge.cli", "eval", str(toy_zoo["ft_b"]), "--tasks", "toy_facts", "--limit", "4"
    )  # fmt: skip
    rows = {line.split()[0]: line.split()[1] for line in out.strip().splitlines()[1:-1]}
    assert list(rows) == ["toy_facts/acc", "toy_facts_a/acc", "toy_facts_b/acc", "toy_facts_c/acc"]
    assert rows["toy_facts_b/acc"] == "1.0000"  # ft_b knows its facts: the real data was read
