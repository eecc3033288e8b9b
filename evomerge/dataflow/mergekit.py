"""A path recipe as a mergekit ``passthrough`` config, where mergekit can express it.

mergekit stacks layers with ``slices:``; it takes the embeddings from the first slice's model
and the final norm and head from the last slice's, and multiplies a tensor by a slice's
``scale`` parameter (filtered by name). So a path is expressible when every model on it is a
folder (a merge has no folder to name) and its first and last layers are the outer model's.
Runs of consecutive layers of one model, unscaled, become one slice; a scaled step is a slice
of its own whose ``scale`` applies to its input norm only.
"""

from __future__ import annotations

from typing import Any

from evomerge.dataflow.recipe import INPUT_NORM, DataflowRecipe


def path_to_mergekit(recipe: DataflowRecipe) -> tuple[dict[str, Any] | None, str | None]:
    """``(config, None)``, or ``(None, why mergekit cannot express the path)``."""
    merges = [m.label for m in recipe.models if m.recipe is not None]
    if merges:
        return None, (
            f"the path uses layers of a merge ('{merges[0]}'), which a mergekit config cannot "
            "name as a model; export that merge first and use its folder"
        )
    first, last = recipe.path[0].model, recipe.path[-1].model
    if first != recipe.outer or last != recipe.outer:
        return None, (
            "mergekit takes the embeddings from the first slice's model and the final norm and "
            f"head from the last slice's; this path starts with '{first}' and ends with "
            f"'{last}', while its embeddings and head come from '{recipe.outer}'"
        )
    slices = []
    for label, first, last, scale in recipe.runs(scaled_alone=True):
        folder = recipe.model(label).model
        span = [first, last + 1]
        entry: dict[str, Any] = {"sources": [{"model": folder, "layer_range": span}]}
        if scale != 1.0:
            entry["parameters"] = {
                "scale": [{"filter": INPUT_NORM, "value": scale}, {"value": 1.0}]
            }
        slices.append(entry)
    config: dict[str, Any] = {"merge_method": "passthrough", "slices": slices}
    if recipe.dtype is not None:
        config["dtype"] = recipe.dtype
    return config, None
