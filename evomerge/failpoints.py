"""Named points where a test can kill this process, to prove a crash there loses nothing.

``EVOMERGE_FAILPOINTS="after_tell=5,in_snapshot=1"`` SIGKILLs the process the 5th time it
passes ``after_tell`` (or the 1st time it passes ``in_snapshot``). Unset (always, outside the
fault tests), :func:`failpoint` is one dictionary lookup.

Points: in the driver ``after_add_trial``, ``after_tell``, ``in_snapshot``; in a worker
(counted per worker process, so its replacement counts afresh) ``mid_merge``, passed after
each tensor written into the model, and ``mid_evaluation``, after each evaluator of a trial.
"""

from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def _armed() -> dict[str, int]:
    spec = os.environ.get("EVOMERGE_FAILPOINTS", "")
    out = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, count = item.partition("=")
        out[name] = int(count or 1)
    return out


_ARMED = _armed()


def failpoint(name: str) -> None:
    """Die here, as SIGKILL would, if the environment asked for it."""
    if name not in _ARMED:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] == _ARMED[name]:
        os.kill(os.getpid(), signal.SIGKILL)
