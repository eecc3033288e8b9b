"""The generic kind registry behind proposers and evaluators."""

from __future__ import annotations

import subprocess
import sys
import types
from typing import ClassVar, Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field

import evomerge.registry
from evomerge.errors import ConfigError
from evomerge.registry import KindRegistry


class WidgetConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str


class Widget:
    kind: ClassVar[str]
    config_class: ClassVar[type[WidgetConfig]]


class SpinConfig(WidgetConfig):
    kind: Literal["spin"] = "spin"
    speed: int = Field(default=1, ge=1)


def widgets(plugins: tuple[str, ...] = ()) -> KindRegistry[Widget, WidgetConfig]:
    return KindRegistry("widget", WidgetConfig, ConfigError, plugins)


def test_register_get_names_parse() -> None:
    registry = widgets()

    @registry.register("spin", SpinConfig)
    class Spin(Widget):
        pass

    assert registry.names() == ["spin"]
    assert registry.get("spin") is Spin
    assert Spin.kind == "spin" and Spin.config_class is SpinConfig
    parsed = registry.parse({"kind": "spin", "speed": 3})
    assert parsed == SpinConfig(speed=3)
    assert registry.parse(parsed) is parsed


def test_a_kind_registered_twice_is_refused() -> None:
    registry = widgets()
    registry.register("spin", SpinConfig)(type("Spin", (Widget,), {}))
    with pytest.raises(ValueError, match=r"^widget kind 'spin' is registered twice$"):
        registry.register("spin", SpinConfig)(type("Spin2", (Widget,), {}))
    assert registry.names() == ["spin"]


def test_errors_name_the_known_kinds() -> None:
    registry = widgets()
    for kind in ("spin", "roll"):
        registry.register(kind, SpinConfig)(type(kind, (Widget,), {}))
    with pytest.raises(ConfigError) as info:
        registry.get("nope")
    assert str(info.value) == "unknown widget kind 'nope'; available: roll, spin"
    cases = [
        ({"kind": "nope"}, "w: kind: unknown widget kind 'nope'; available: roll, spin"),
        ({"speed": 2}, "w: missing 'kind' (one of roll, spin)"),
        (["spin"], "w: expected a mapping with a 'kind', got ['spin']"),
        (
            {"kind": "spin", "speed": 0},
            "w (spin): speed: Input should be greater than or equal to 1",
        ),
    ]
    for data, message in cases:
        with pytest.raises(ConfigError) as info:
            registry.parse(data, "w")  # type: ignore[arg-type]
        assert str(info.value) == message
    with pytest.raises(ConfigError, match=r"^widget: missing 'kind'"):
        registry.parse({})


def test_plugins_are_imported_lazily_and_once(monkeypatch, tmp_path) -> None:
    """A plugin module imports the registry back to register itself (the real registries'
    loop); the registry imports its plugins on first use, and only then."""
    registry = widgets(plugins=("evomerge_test_widget_plugin",))
    holder = types.ModuleType("evomerge_test_widget_holder")
    holder.__dict__.update(REGISTRY=registry, SpinConfig=SpinConfig, Widget=Widget)
    monkeypatch.setitem(sys.modules, "evomerge_test_widget_holder", holder)
    (tmp_path / "evomerge_test_widget_plugin.py").write_text(
        "from evomerge_test_widget_holder import REGISTRY, SpinConfig, Widget\n\n\n"
        "@REGISTRY.register('spin', SpinConfig)\n"
        "class Spin(Widget):\n"
        "    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "evomerge_test_widget_plugin", raising=False)
    imported: list[str] = []
    real_import = evomerge.registry.import_module

    def spy(name: str) -> types.ModuleType:
        imported.append(name)
        return real_import(name)

    monkeypatch.setattr(evomerge.registry, "import_module", spy)
    assert imported == [] and "evomerge_test_widget_plugin" not in sys.modules
    assert registry.names() == ["spin"]
    assert registry.get("spin").__module__ == "evomerge_test_widget_plugin"
    registry.parse({"kind": "spin"})
    with pytest.raises(ConfigError):
        registry.get("nope")
    assert imported == ["evomerge_test_widget_plugin"]
    monkeypatch.delitem(sys.modules, "evomerge_test_widget_plugin")


def test_the_real_registries_list_what_they_always_did() -> None:
    from evomerge.evaluate.registry import available_evaluators, evaluator_class
    from evomerge.optimize.registry import available_proposers, proposer_class

    assert available_proposers() == [
        "cma",
        "gp",
        "nsga2",
        "optuna-cmaes",
        "qmc",
        "random",
        "tpe",
    ]
    assert available_evaluators() == ["lm_eval", "perplexity", "python"]
    for kind in available_proposers():
        assert proposer_class(kind).kind == kind
    for kind in available_evaluators():
        assert evaluator_class(kind).kind == kind


def test_the_registry_module_imports_nothing_heavy() -> None:
    code = (
        "import sys, evomerge.registry\n"
        "heavy = [m for m in ('torch', 'numpy', 'lm_eval', 'evomerge.merge') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
