"""Bad input through the CLI: one line on stderr, exit code 1, no traceback, nothing written."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from evomerge.cli import main
from tests.helpers import copy_model, edit_config, edit_tensors, load_folder, write_yaml

UP = "model.layers.1.mlp.up_proj.weight"


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(args)
    err = capsys.readouterr().err
    return code, err


def ties_recipe(family: dict[str, Path], second: Path | None = None) -> dict:
    return {
        "method": "ties",
        "base": str(family["base"]),
        "sources": [
            {"model": str(family["ft_0"]), "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": str(second or family["ft_1"]), "parameters": {"weight": 1.0}},
        ],
    }


def broken_source(family, tmp_path, breaker) -> Path:
    bad = copy_model(family["ft_1"], tmp_path / "broken")
    breaker(bad)
    return bad


def _drop(bad: Path) -> None:
    edit_tensors(bad, lambda t: t.pop(UP))


def _reshape(bad: Path) -> None:
    edit_tensors(bad, lambda t: t.__setitem__(UP, torch.zeros(255, 64)))


def _vocab(bad: Path) -> None:
    def grow(tensors):
        tensors["model.embed_tokens.weight"] = torch.zeros(65, 64)

    edit_tensors(bad, grow)


def _nan(bad: Path) -> None:
    edit_tensors(bad, lambda t: t[UP].__setitem__((3, 3), float("inf")))


def _truncate(bad: Path) -> None:
    file = bad / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-1000])


def _garbage(bad: Path) -> None:
    (bad / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")


def _layers(bad: Path) -> None:
    edit_config(bad, num_hidden_layers=5)


def _arch(bad: Path) -> None:
    edit_config(bad, architectures=["MistralForCausalLM"], model_type="mistral")


def _pickle(bad: Path) -> None:
    state = load_folder(bad)
    (bad / "model.safetensors").unlink()
    torch.save(state, bad / "pytorch_model.bin")


def _no_config(bad: Path) -> None:
    (bad / "config.json").unlink()


BROKEN_SOURCES = {
    "missing tensor": (_drop, ["model.layers.1.mlp.up_proj.weight", "missing from 'broken'"]),
    "shape mismatch": (_reshape, [UP, "[256, 64]", "[255, 64]", "'broken'"]),
    "vocabulary mismatch": (_vocab, ["vocabulary", "64", "65", "model.embed_tokens.weight"]),
    "inf in a source": (_nan, ["'broken'", UP, "NaN or Inf"]),
    "truncated safetensors": (_truncate, ["broken", "model.safetensors", "truncated"]),
    "corrupt safetensors": (_garbage, ["broken", "model.safetensors", "not a readable"]),
    "different layer count": (_layers, ["layer counts", "4 vs 5"]),
    "different architecture": (_arch, ["architectures", "MistralForCausalLM"]),
    "pickled checkpoint": (_pickle, ["pytorch_model.bin", "--allow-pickle"]),
    "no config.json": (_no_config, ["broken", "config.json is missing"]),
}


@pytest.mark.parametrize("case", sorted(BROKEN_SOURCES))
def test_broken_source_model(case, family, tmp_path, capsys):
    breaker, expected = BROKEN_SOURCES[case]
    bad = broken_source(family, tmp_path, breaker)
    config = write_yaml(tmp_path / "r.yaml", ties_recipe(family, bad))
    code, err = run_cli(["merge", str(config), str(tmp_path / "out"), "--quiet"], capsys)
    assert code == 1
    assert err.startswith("evomerge: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for fragment in expected:
        assert fragment in err, (fragment, err)
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "r.yaml"]


def test_pickle_is_accepted_with_the_flag_and_gives_the_same_merge(family, tmp_path, capsys):
    pickled = broken_source(family, tmp_path, _pickle)
    config = write_yaml(tmp_path / "p.yaml", ties_recipe(family, pickled))
    code, err = run_cli(
        ["merge", str(config), str(tmp_path / "out"), "--allow-pickle", "--quiet"], capsys
    )
    assert code == 0, err
    reference = write_yaml(tmp_path / "s.yaml", ties_recipe(family))
    assert main(["merge", str(reference), str(tmp_path / "ref"), "--quiet"]) == 0
    got, want = load_folder(tmp_path / "out"), load_folder(tmp_path / "ref")
    assert all(torch.equal(got[n], want[n]) for n in want)


RECIPE_ERRORS = {
    "unknown method": ({"method": "frankenstein"}, ["unknown merge method 'frankenstein'", "ties"]),
    "unknown parameter": (
        {"parameters": {"densty": 0.5}},
        ["method 'ties' has no parameter 'densty'", "density"],
    ),
    "density out of range": (
        {"parameters": {"density": 1.5}},
        ["'density' of source 1", "(0, 1]", "1.5", "(tensor "],
    ),
    "unknown key": ({"sourcez": []}, ["sourcez", "Extra inputs are not permitted"]),
    "wrong type": ({"seed": "abc"}, ["seed", "integer"]),
    "slerp with two sources": (
        {"method": "slerp", "parameters": {"t": 0.5}},
        ["'slerp' takes exactly 1 source"],
    ),
    "missing base": ({"base": None}, ["needs a base model"]),
    "missing model folder": (
        {"sources": [{"model": "/nonexistent/model", "parameters": {"weight": 1}}]},
        ["/nonexistent/model does not exist"],
    ),
}


@pytest.mark.parametrize("case", sorted(RECIPE_ERRORS))
def test_bad_recipe(case, family, tmp_path, capsys):
    changes, expected = RECIPE_ERRORS[case]
    recipe = ties_recipe(family)
    recipe.update(changes)
    config = write_yaml(tmp_path / "r.yaml", recipe)
    code, err = run_cli(["merge", str(config), str(tmp_path / "out"), "--quiet"], capsys)
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    for fragment in expected:
        assert fragment in err, (fragment, err)
    assert not (tmp_path / "out").exists()


def test_invalid_yaml_and_missing_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: [ties\n")
    code, err = run_cli(["merge", str(bad), str(tmp_path / "out")], capsys)
    assert code == 1 and "bad.yaml is not valid YAML" in err and err.count("\n") == 1
    code, err = run_cli(["merge", str(tmp_path / "nope.yaml"), str(tmp_path / "out")], capsys)
    assert code == 1 and "nope.yaml" in err and "Traceback" not in err


def test_non_empty_output_is_refused_without_force(family, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    config = write_yaml(tmp_path / "r.yaml", ties_recipe(family))
    code, err = run_cli(["merge", str(config), str(out), "--quiet"], capsys)
    assert code == 1 and "exists and is not empty" in err and "--force" in err
    assert (out / "precious.txt").read_text() == "keep me"
    code, err = run_cli(["merge", str(config), str(out), "--quiet", "--force"], capsys)
    assert code == 0 and not (out / "precious.txt").exists() and (out / "config.json").exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_cuda_asked_for_on_a_machine_without_it(family, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    config = write_yaml(tmp_path / "r.yaml", ties_recipe(family))
    code, err = run_cli(["merge", str(config), str(tmp_path / "o"), "--device", "cuda"], capsys)
    assert code == 1 and "CUDA is not available" in err


def test_bad_shard_size_is_an_argparse_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["merge", "r.yaml", str(tmp_path / "o"), "--shard-size", "lots"])
    assert exc.value.code == 2
    assert "'lots' is not a size" in capsys.readouterr().err


def test_merge_command_writes_a_model_card_with_the_recipe(family, tmp_path, capsys):
    config = write_yaml(tmp_path / "r.yaml", ties_recipe(family))
    code, _ = run_cli(["merge", str(config), str(tmp_path / "out"), "--quiet"], capsys)
    assert code == 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert "ties" in card and "density: 0.5" in card and "fingerprint" in card
    shutil.rmtree(tmp_path / "out")
