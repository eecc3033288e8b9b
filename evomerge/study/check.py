"""Everything an overnight run needs, checked before it starts (``evomerge check STUDY.yaml``).

One line per check (``ok``, ``FAIL`` or ``skip`` with the reason); exit code 0 only when none
failed. It creates nothing: no study, no database file, no Ray instance. The checks:

- ``yaml``: the study file loads and validates.
- ``preflight``: what ``search`` checks before it starts (:mod:`evomerge.study.preflight`): the
  models exist and can be merged, the space, the proposer, the evaluators and the objectives.
- ``database``: the database answers and takes writes (PostgreSQL: a temporary table in a
  transaction that is rolled back; SQLite: a file can be made in its folder).
- ``study``: the name is new (``search`` refuses an existing one), or, with ``--resume``, a
  stopped study that ``evomerge resume`` would continue.
- ``ray``: the cluster (``--address``, else ``cluster.address``, else ``RAY_ADDRESS``; without
  any, this machine) has room for ``workers`` x ``cpus_per_worker`` CPUs and ``gpus_per_worker``
  GPUs.
- ``cuda``: with ``device: cuda``, torch sees a GPU here (for ``export --device cuda``).
- ``disk``: the study's folder has room for an export the size of the base model's weights.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from evomerge.cluster.connect import ray_address
from evomerge.errors import EvomergeError
from evomerge.util import first_line, format_bytes

State = Literal["ok", "FAIL", "skip"]
CONNECT_SECONDS = 5
"""How long a database or Ray address may take to answer before its check fails."""
RAY_JOIN_SECONDS = 30
"""How long joining a Ray cluster that answers may take (Ray itself waits for minutes)."""
ray_join_stuck = threading.Event()
"""Set when a join is left hanging: the command then ends without waiting for it."""


@dataclass(frozen=True)
class Check:
    name: str
    state: State
    detail: str

    def line(self) -> str:
        return f"{self.state:<5} {self.name:<10} {self.detail}"


def run_checks(
    path: Path, *, storage: str | None = None, address: str | None = None, resume: bool = False
) -> list[Check]:
    from evomerge.study.config import StudyConfig, load_study_config
    from evomerge.study.store import resume_command, storage_url

    try:
        config: StudyConfig = load_study_config(path)
    except EvomergeError as exc:
        return [Check("yaml", "FAIL", str(exc))]
    except OSError as exc:
        return [Check("yaml", "FAIL", f"{path}: {exc.strerror or exc}")]
    if storage:
        config = config.model_copy(update={"storage": storage})
    cluster = config.cluster
    checks = [
        Check(
            "yaml",
            "ok",
            f"{path}: study '{config.name}', budget {config.budget_trials or '-'} trials"
            f"{f' / {config.budget_hours:g} h' if config.budget_hours else ''}, "
            f"workers {cluster.workers}, device {config.device}",
        ),
        _preflight(config, str(path)),
    ]
    database = _database(config.storage or "")
    how = resume_command(config.name, storage_url(config.storage or ""), None if storage else path)
    checks += [database, _study_name(config, resume, database.state == "ok", how)]
    remote = ray_address(cluster, address)[0] is not None
    checks += [_ray(config, address), _cuda(config.device, remote), _disk(config, path)]
    return checks


def _preflight(config: Any, where: str) -> Check:
    from evomerge.study.preflight import preflight

    try:
        preflight(config, where)
    except EvomergeError as exc:
        return Check("preflight", "FAIL", str(exc))
    return Check("preflight", "ok", "models, space, proposer, evaluators and objectives")


# -- the database ---------------------------------------------------------------------------------


def _database(storage: str) -> Check:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    from evomerge.study.read import check_storage
    from evomerge.study.store import mask_url

    try:
        url = check_storage(storage, what="storage")
    except EvomergeError as exc:
        return Check("database", "FAIL", str(exc))
    shown = mask_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_folder(Path(parsed.database or ""), shown)
    connect_args = (
        {"connect_timeout": CONNECT_SECONDS}
        if parsed.get_backend_name()
        in (
            "postgresql",
            "mysql",
        )
        else {}
    )
    engine = create_engine(url, connect_args=connect_args)
    try:
        with engine.connect() as connection:
            transaction = connection.begin()
            connection.execute(text("CREATE TEMPORARY TABLE evomerge_check_write (x INTEGER)"))
            connection.execute(text("INSERT INTO evomerge_check_write (x) VALUES (1)"))
            transaction.rollback()
    except SQLAlchemyError as exc:
        return Check("database", "FAIL", f"{shown}: {first_line(exc)}")
    finally:
        engine.dispose()
    return Check("database", "ok", f"{shown} answers and takes writes")


def _sqlite_folder(file: Path, shown: str) -> Check:
    if file.exists() and not os.access(file, os.R_OK | os.W_OK):
        return Check("database", "FAIL", f"{file}: no permission to read and write it")
    try:
        with tempfile.NamedTemporaryFile(dir=file.parent, prefix=".evomerge-check-"):
            pass
    except OSError as exc:
        return Check(
            "database", "FAIL", f"{shown}: cannot write in {file.parent} ({exc.strerror or exc})"
        )
    made = "exists" if file.exists() else "will be created"
    return Check("database", "ok", f"{shown} ({made}; its folder is writable)")


def _study_name(config: Any, resume: bool, reachable: bool, resume_command: str) -> Check:
    from sqlalchemy import create_engine, inspect
    from sqlalchemy.engine import make_url

    from evomerge.study.schema import StudyRow
    from evomerge.study.store import StudyStore, mask_url, storage_url

    name = config.name
    if not reachable:
        return Check("study", "skip", f"'{name}': the database did not answer")
    url = storage_url(config.storage or "")
    shown = mask_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and not Path(parsed.database or "").exists():
        exists = False
    else:  # look before opening the store, which would add its tables to a database
        engine = create_engine(url)
        try:
            exists = inspect(engine).has_table(StudyRow.__tablename__)
        finally:
            engine.dispose()
    try:
        store = StudyStore(url, retry_seconds=0) if exists else None
        if store is None or not store.has_study(name):
            if resume:
                return Check("study", "FAIL", f"no study '{name}' in {shown} to resume")
            return Check("study", "ok", f"'{name}' is a new study in {shown}")
        row = next(s for s in store.studies() if s["name"] == name)
        done = row["trials"].get("COMPLETE", 0) + row["trials"].get("FAILED", 0)
        state = f"{row['status']}, {done}/{row['budget']} trials"
        where = f"study '{name}' already exists in {shown} ({state})"
        if row["status"] == "finished":
            return Check("study", "FAIL", f"{where}; choose another name")
        store.check_free(name)
    except EvomergeError as exc:
        return Check("study", "FAIL", str(exc))
    if resume:
        return Check("study", "ok", f"{where}; '{resume_command}' continues it")
    return Check(
        "study",
        "FAIL",
        f"{where}; 'search' refuses an existing name: continue it with '{resume_command}' "
        "(check that with --resume), or choose another name",
    )


# -- Ray, CUDA, disk ------------------------------------------------------------------------------


def _ray(config: Any, address: str | None) -> Check:
    cluster = config.cluster
    need_cpus = cluster.workers * cluster.cpus_per_worker
    need_gpus = cluster.workers * cluster.gpus_per_worker
    need = (
        f"{cluster.workers} workers x ({cluster.cpus_per_worker:g} CPU, "
        f"{cluster.gpus_per_worker:g} GPU) = {need_cpus:g} CPUs, {need_gpus:g} GPUs"
    )
    address, where = ray_address(cluster, address)
    if address is None:
        cpus = os.cpu_count() or 1
        gpus = _local_gpus()
        if need_gpus > gpus:
            return Check(
                "ray",
                "FAIL",
                f"needs {need}; this machine (a local Ray instance: no --address, "
                f"cluster.address or RAY_ADDRESS) has {gpus} GPUs",
            )
        return Check("ray", "ok", f"needs {need}; local Ray instance: {cpus} CPUs, {gpus} GPUs")
    nodes = _cluster_nodes(address, where)
    if isinstance(nodes, str):
        return Check("ray", "FAIL", nodes)
    have_cpus = sum(n.get("CPU", 0.0) for n in nodes)
    have_gpus = sum(n.get("GPU", 0.0) for n in nodes)
    fit = sum(_workers_on(node, cluster.cpus_per_worker, cluster.gpus_per_worker) for node in nodes)
    has = (
        f"the cluster at {address} has {have_cpus:g} CPUs, {have_gpus:g} GPUs on {len(nodes)} nodes"
    )
    if fit < cluster.workers:
        return Check("ray", "FAIL", f"needs {need}; {has}, room for {fit} workers")
    return Check("ray", "ok", f"needs {need}; {has}")


def _workers_on(node: dict[str, float], cpus: float, gpus: float) -> int:
    """How many workers of ``cpus`` CPUs and ``gpus`` GPUs one node holds."""
    fit = math.floor(node.get("CPU", 0.0) / cpus + 1e-9)
    if gpus > 0:
        fit = min(fit, math.floor(node.get("GPU", 0.0) / gpus + 1e-9))
    return fit


def _cluster_nodes(address: str, where: str) -> list[dict[str, float]] | str:
    """Each live node's resources, or why the cluster could not be read."""
    if re.match(r"https?://", address):
        return (
            f"{address} ({where}) is a Ray Jobs (dashboard) address; give the cluster's "
            "address HOST:6379 (as `ray start --address` takes it), or auto"
        )
    from evomerge.cluster.connect import check_reachable

    try:
        check_reachable(address, where)
    except EvomergeError as exc:
        return str(exc)
    found: list[list[dict[str, float]] | str] = []
    thread = threading.Thread(target=lambda: found.append(_join(address, where)), daemon=True)
    thread.start()
    thread.join(RAY_JOIN_SECONDS)
    if thread.is_alive():  # a port that answers but is not Ray: ray.init waits for minutes
        ray_join_stuck.set()
        return (
            f"cannot join the Ray cluster at {address} ({where}): the port answers, but no Ray "
            f"cluster replied within {RAY_JOIN_SECONDS} s"
        )
    return found[0]


def _join(address: str, where: str) -> list[dict[str, float]] | str:
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    saved = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = address  # Ray prefers RAY_ADDRESS to the address it is given
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
        return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
    except Exception as exc:  # ConnectionError, an auth error, a timeout: all one line
        return f"cannot join the Ray cluster at {address} ({where}): {first_line(exc)}"
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if saved is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = saved


def _local_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # a torch without CUDA, a broken driver: no GPU for Ray either
        return 0


def _cuda(device: str, remote: bool) -> Check:
    """This machine's GPUs: the workers' own when they run here (no cluster address), else
    only export's (the ray check counts the cluster's GPUs), so a GPU-less head is a skip."""
    if not device.startswith("cuda"):
        return Check("cuda", "ok", f"not needed (device: {device})")
    import torch

    try:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        names = [torch.cuda.get_device_name(i) for i in range(count)]
    except Exception as exc:  # a driver that does not answer
        return Check("cuda", "FAIL", f"device {device}: torch cannot use CUDA ({first_line(exc)})")
    if not count:
        build = f"torch {torch.__version__}, " + (
            f"CUDA {torch.version.cuda}" if torch.version.cuda else "built without CUDA"
        )
        if not remote:
            return Check(
                "cuda", "FAIL", f"device {device}: torch sees no GPU on this machine ({build})"
            )
        return Check(
            "cuda",
            "skip",
            f"no GPU on this machine ({build}): the cluster's workers have theirs, but "
            "'export --device cuda' and its --verify cannot run here",
        )
    return Check("cuda", "ok", f"torch sees {count} GPU(s) here: {', '.join(sorted(set(names)))}")


def _disk(config: Any, path: Path) -> Check:
    folder = path.expanduser().resolve().parent
    weights = sorted(Path(config.base).glob("*.safetensors"))
    if not weights:
        return Check("disk", "skip", f"no safetensors in the base {config.base} to size an export")
    need = sum(w.stat().st_size for w in weights)
    free = shutil.disk_usage(folder).free
    text = (
        f"an export needs about {format_bytes(need)} (the base's weights); "
        f"{folder} has {format_bytes(free)} free"
    )
    if free < need * 1.1:  # and a little for the tokenizer, the card and the file system
        return Check("disk", "FAIL", text)
    return Check("disk", "ok", text)
