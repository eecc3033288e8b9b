"""Built-in merge methods. Each module registers its methods on import."""

from evomerge.merge.methods import (  # noqa: F401
    fisher,
    linear,
    model_stock,
    passthrough,
    slerp,
    task_arithmetic,
)
