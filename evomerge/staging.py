"""Hidden folders that outputs are built in before one atomic rename (no torch here: the CLI
imports this on every command)."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import uuid
from pathlib import Path


def staging_folder(target: Path, kind: str) -> Path:
    """A hidden folder beside ``target`` to build it in, named after this host and process so
    a later run can tell an abandoned one (its process was killed) from one still in use."""
    host = socket.gethostname().replace("-", "_")
    return target.parent / f".{target.name}.{kind}-{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def remove_abandoned(target: Path, kind: str) -> list[Path]:
    """Remove the :func:`staging_folder` s of ``target`` left by processes of this host that
    are gone (killed mid-write); their names say they are incomplete, but they take space."""
    if not target.parent.is_dir():
        return []
    host = socket.gethostname().replace("-", "_")
    removed = []
    for folder in target.parent.glob(f".{glob.escape(target.name)}.{kind}-{host}-*"):
        pid = folder.name.rsplit("-", 2)[-2]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
