"""SIGINT and SIGTERM as one "stop" for long-running commands.

Ctrl-C sends SIGINT; ``ray job stop``, plain ``kill``, ``docker stop`` and schedulers' time
limits send SIGTERM. A command that must stop cleanly handles both the same way.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def on_stop_signals(handler: Callable[[int, Any], None]) -> Iterator[Callable[[], None]]:
    """Route SIGINT and SIGTERM to ``handler`` inside the block; the handlers from before
    come back after it. A signal the process ignores stays ignored, and nothing changes off
    the main thread (which receives no signals). Yields a function that installs ``handler``
    again, for after a library (``ray.init``) replaced it."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return
    signums = [s for s in STOP_SIGNALS if signal.getsignal(s) is not signal.SIG_IGN]

    def install() -> dict[int, Any]:
        return {signum: signal.signal(signum, handler) for signum in signums}

    before = install()
    try:
        yield install
    finally:
        for signum, previous in before.items():
            if previous is not None:  # None: installed outside Python, cannot be restored
                signal.signal(signum, previous)
