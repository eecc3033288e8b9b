"""Text the commands print that is not a study's: the metrics table."""

from __future__ import annotations


def format_metrics(metrics: dict[str, float]) -> str:
    """One row per metric (sorted); a ``<metric>_stderr`` value is shown as ``± x`` beside it."""
    rows = []
    for key in sorted(metrics):
        if key.endswith("_stderr") and key.removesuffix("_stderr") in metrics:
            continue
        value = f"{metrics[key]:.4f}"
        stderr = metrics.get(f"{key}_stderr")
        if stderr is not None:
            value += f" ± {stderr:.4f}"
        rows.append((key, value))
    width = max([len("metric"), *(len(key) for key, _ in rows)])
    lines = [f"{'metric':<{width}}  value"]
    lines += [f"{key:<{width}}  {value}" for key, value in rows]
    return "\n".join(lines)
