"""A worker's model for data-flow candidates: its layer list references resident layers.

:class:`PathAssembler` holds, for each model a path uses, its decoder layers as modules whose
parameters are the worker's resident tensors (converted once when the working dtype or device
differs from how they are held; a merge on the path is built once into a model of its own).
:meth:`PathAssembler.apply` then points the evaluated model's layer list at per-position views of
those layers: each view shares its layer's weights, has its own ``layer_idx`` (so a layer used
twice keeps two KV-cache entries), and at a scaled step its own input norm whose weight is the
scaled one (a vector per step; the export writes the same). The embeddings, final norm and head
are the outer model's, assigned by reference. :meth:`PathAssembler.restore` puts the model back
for an ordinary recipe. Nothing of the weights is copied per candidate.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from evomerge.dataflow.recipe import INPUT_NORM, DataflowRecipe, decoder_layers
from evomerge.errors import ConfigError
from evomerge.merge.tensors import layer_index


@dataclass
class HeldPathModel:
    """One model a path may use: its layers (modules) and its tensors outside the layers."""

    label: str
    layers: torch.nn.ModuleList
    outer: dict[str, torch.Tensor]
    """The model's parameters outside the layers, by the evaluated model's state-dict name."""


class PathAssembler:
    """Builds data-flow candidates into ``model`` (the object the evaluators hold)."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype, device: str) -> None:
        self.model = model
        self.dtype = dtype
        self.device = torch.device(device)
        self.decoder = model.get_decoder()
        self.original_layers = self.decoder.layers
        self.outer_names = [
            name for name, _ in model.named_parameters() if layer_index(name) is None
        ]
        params = dict(model.named_parameters())
        self.original_outer = {name: params[name] for name in self.outer_names}
        self.original_config = {
            key: getattr(model.config, key, None) for key in ("num_hidden_layers", "layer_types")
        }
        self.base_config = copy.deepcopy(model.config)
        """The model's config before any path (a merge on a path is built with it)."""
        self.held: dict[Any, HeldPathModel] = {}
        self.applied = False
        self.hold_seconds = 0.0
        """Seconds spent building held models (first use of each), all candidates together."""

    # -- holding models --------------------------------------------------------------------------

    def folder_model(
        self, key: Any, label: str, tensors: Mapping[str, torch.Tensor], config: Any
    ) -> HeldPathModel:
        """A model folder's layers over its resident ``tensors`` (by reference where the dtype
        and device already match)."""
        if key not in self.held:
            start = time.perf_counter()
            skeleton = self._skeleton(config)
            state = {
                name: tensor.to(device=self.device, dtype=self.dtype)
                if tensor.is_floating_point()
                else tensor.to(self.device)
                for name, tensor in tensors.items()
            }
            unfit = (
                f"model '{label}': its tensors do not fill its architecture's modules, so its "
                "layers cannot be used on a path"
            )
            try:
                missing, unexpected = skeleton.load_state_dict(state, strict=False, assign=True)
            except RuntimeError as exc:  # a shape that does not fit
                raise ConfigError(f"{unfit}: {exc}") from None
            skeleton.tie_weights()  # a tied head is the embedding just assigned (not in files)
            filled = skeleton.state_dict(keep_vars=True)
            missing = [name for name in missing if filled[name].is_meta]
            if missing or unexpected:
                raise ConfigError(
                    f"{unfit} (missing: {', '.join(missing) or '-'}; "
                    f"not used: {', '.join(unexpected) or '-'})"
                )
            self.held[key] = self._held(label, skeleton)
            self.hold_seconds += time.perf_counter() - start
        return self.held[key]

    def merged_model(
        self, key: Any, label: str, merge: Callable[[torch.nn.Module], None]
    ) -> HeldPathModel:
        """A merge's layers: ``merge`` builds it (once) into a model of its own, of the
        evaluated model's architecture."""
        if key not in self.held:
            start = time.perf_counter()
            skeleton = self._skeleton(self.base_config).to_empty(device=self.device).to(self.dtype)
            merge(skeleton)
            self.held[key] = self._held(label, skeleton)
            self.hold_seconds += time.perf_counter() - start
        return self.held[key]

    def _skeleton(self, config: Any) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(copy.deepcopy(config), trust_remote_code=False)
        return model.eval()

    def _held(self, label: str, model: torch.nn.Module) -> HeldPathModel:
        params = dict(model.named_parameters())
        outer = {name: params[name] for name in self.outer_names if name in params}
        missing = [name for name in self.outer_names if name not in params]
        if missing:
            raise ConfigError(f"model '{label}' has no {', '.join(missing)}")
        layers = decoder_layers(model)
        for name, tensor in [*layers.named_parameters(), *layers.named_buffers()]:
            if tensor.is_meta:
                raise ConfigError(f"model '{label}': layer tensor {name} was never filled")
        return HeldPathModel(label, layers, outer)

    # -- building a candidate --------------------------------------------------------------------

    def apply(self, recipe: DataflowRecipe, held: Mapping[str, HeldPathModel]) -> None:
        """Make the model the recipe's path: views of the held layers, the outer model's ends."""
        views = []
        for position, step in enumerate(recipe.path):
            model = held[step.model]
            if step.layer >= len(model.layers):
                raise ConfigError(
                    f"path[{position}]: model '{step.model}' has {len(model.layers)} layers "
                    f"(0-{len(model.layers) - 1}); there is no layer {step.layer}"
                )
            views.append(position_view(model.layers[step.layer], position, step.scale))
        with torch.no_grad():
            self.model.load_state_dict(held[recipe.outer].outer, strict=False, assign=True)
        self.model.tie_weights()  # a tied head follows the embedding just assigned
        self.decoder.layers = torch.nn.ModuleList(views)
        self._set_config(len(views), [step.layer for step in recipe.path])
        self.applied = True

    def restore(self) -> None:
        """The model as it was before any path (for an ordinary recipe)."""
        if not self.applied:
            return
        with torch.no_grad():
            self.model.load_state_dict(self.original_outer, strict=False, assign=True)
        self.model.tie_weights()
        self.decoder.layers = self.original_layers
        for key, value in self.original_config.items():
            if value is not None:
                setattr(self.model.config, key, value)
        self.applied = False

    def _set_config(self, count: int, origins: list[int]) -> None:
        config = self.model.config
        types = self.original_config["layer_types"]
        if isinstance(types, list):
            config.layer_types = [types[min(i, len(types) - 1)] for i in origins]
        config.num_hidden_layers = count


def position_view(layer: torch.nn.Module, position: int, scale: float) -> torch.nn.Module:
    """``layer`` at depth ``position`` of a path: the same weights, its own ``layer_idx``
    (attention and cache), and at ``scale != 1`` an input norm of its own with the scaled
    weight (and bias), computed as an export computes it."""
    view = copy.copy(layer)
    view._modules = dict(layer._modules)
    if hasattr(layer, "layer_idx"):
        view.layer_idx = position
    for name, child in layer._modules.items():
        if child is not None and hasattr(child, "layer_idx"):
            moved = copy.copy(child)
            moved.layer_idx = position
            view._modules[name] = moved
    if scale != 1.0:
        norm = layer._modules.get(INPUT_NORM)
        if norm is None:
            raise ConfigError(f"{type(layer).__name__} has no {INPUT_NORM} to scale the input of")
        scaled = copy.copy(norm)
        scaled._parameters = {
            name: None
            if param is None
            else torch.nn.Parameter((param.float() * scale).to(param.dtype), requires_grad=False)
            for name, param in norm._parameters.items()
        }
        view._modules[INPUT_NORM] = scaled
    return view
