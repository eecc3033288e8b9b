"""Joining Ray: which cluster a study uses, a quick reachability probe, and the connection.

The rule, in one place: ``--address`` (``evomerge check``), else the study's
``cluster.address``, else ``RAY_ADDRESS`` (set inside a Ray Job), else a private local instance.
"""

from __future__ import annotations

import logging
import math
import os
import re
import socket
from typing import TYPE_CHECKING

from evomerge.errors import EvomergeError
from evomerge.util import first_line

if TYPE_CHECKING:
    from evomerge.study.config import ClusterConfig


def ray_address(cluster: ClusterConfig, override: str | None = None) -> tuple[str | None, str]:
    """``(address, where it came from)``; ``(None, ...)`` means a local instance."""
    if override:
        return override, "--address"
    if cluster.address:
        return cluster.address, "cluster.address"
    return os.environ.get("RAY_ADDRESS") or None, "RAY_ADDRESS"


def check_reachable(address: str, where: str) -> None:
    """Fail in seconds, not minutes, when a ``host:port`` address does not answer."""
    match = re.fullmatch(r"([\w.-]+):(\d+)", address)
    if match is None:  # "auto", "ray://...": Ray resolves these itself
        return
    try:
        socket.create_connection((match[1], int(match[2])), timeout=5).close()
    except OSError as exc:
        raise EvomergeError(
            f"cannot join the Ray cluster at {address} ({where}): {exc.strerror or exc}; "
            "is `ray start --head` running there?"
        ) from None


def ensure_ray(cluster: ClusterConfig) -> bool:
    """Connect to Ray by :func:`ray_address`'s rule. True if this call connected."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address, where = ray_address(cluster)
    if address:
        check_reachable(address, where)
        os.environ["RAY_ADDRESS"] = address  # ray.init prefers the variable to its argument
        try:
            ray.init(address=address, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise EvomergeError(
                f"cannot join the Ray cluster at {address} ({where}): {first_line(exc)}"
            ) from None
    else:
        ray.init(
            address="local",  # never a cluster some `ray start` left running on this machine
            num_cpus=max(os.cpu_count() or 1, math.ceil(cluster.workers * cluster.cpus_per_worker)),
            include_dashboard=False,
            object_store_memory=100_000_000,
            log_to_driver=False,
            logging_level=logging.ERROR,  # a private local instance: no start-up chatter
        )
    return True
