"""Everything an overnight run needs, checked before it starts (``evomerge check STUDY.yaml``).

One line per check (``ok``, ``FAIL`` or ``skip`` with the reason); exit code 0 only when none
failed. It creates nothing: no study, no database file, no Ray instance. The checks:

- ``yaml``: the study file loads and validates.
- ``preflight``: what ``search`` checks before it starts (:mod:`evomerge.study.preflight`): the
  models exist and can be merged, the space, the proposer, the evaluators and the objectives.
- ``memory``: one worker's GPU and host memory, planned from the models' safetensors headers and
  the evaluators' settings (:mod:`evomerge.memory`), against the GPU's size (``--gpu-memory``,
  else this machine's GPU) and this machine's memory (``--host-memory``, else MemTotal) shared
  by the workers that run on it; a plan that does not fit fails, with the numbers and what to
  change.
- ``database``: the database answers and takes writes (PostgreSQL: a temporary table in a
  transaction that is rolled back; SQLite: a file can be made in its folder).
- ``study``: the name is new (``search`` refuses an existing one), or, with ``--resume``, a
  stopped study that ``evomerge resume`` would continue.
- ``ray``: the cluster (``--address``, else ``cluster.address``, else ``RAY_ADDRESS``; without
  any, this machine) has room for ``workers`` x ``cpus_per_worker`` CPUs and ``gpus_per_worker``
  GPUs.
- ``cuda``: with ``device: cuda``, torch sees a GPU here (for ``export --device cuda``).
- ``disk``: the study's folder has room for an export the size of the base model's weights.

``offline`` skips what would contact anything (the database, the study name, Ray, CUDA): the
YAML, the preflight, the memory plan and the disk are checked from files alone.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
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
    data: dict[str, Any] | None = field(default=None, compare=False, repr=False)
    """What the check found, for ``--json`` (the memory plan)."""

    def line(self) -> str:
        return f"{self.state:<5} {self.name:<10} {self.detail}"


def run_checks(
    path: Path,
    *,
    storage: str | None = None,
    address: str | None = None,
    resume: bool = False,
    offline: bool = False,
    gpu_memory: int | None = None,
    host_memory: int | None = None,
) -> list[Check]:
    """Every check, in order. ``gpu_memory``: bytes of one GPU (default: this machine's, unless
    offline); ``host_memory``: bytes of one node's memory (default: this machine's MemTotal)."""
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
    ]
    preflight = _preflight(config, str(path))
    remote = ray_address(cluster, address)[0] is not None
    checks += [
        preflight,
        _memory(config, preflight.state == "ok", remote, offline, gpu_memory, host_memory),
    ]
    if offline:
        checks += [
            Check(name, "skip", f"offline: {what} not contacted")
            for name, what in (
                ("database", "the database"),
                ("study", "the database"),
                ("ray", "Ray"),
                ("cuda", "CUDA"),
            )
        ]
        return [*checks, _disk(config, path)]
    database = _database(config.storage or "")
    how = resume_command(config.name, storage_url(config.storage or ""), None if storage else path)
    checks += [database, _study_name(config, resume, database.state == "ok", how)]
    checks += [_ray(config, address), _cuda(config.device, remote), _disk(config, path)]
    return checks


def _preflight(config: Any, where: str) -> Check:
    from evomerge.study.preflight import preflight

    try:
        preflight(config, where)
    except EvomergeError as exc:
        return Check("preflight", "FAIL", str(exc))
    return Check("preflight", "ok", "models, space, proposer, evaluators and objectives")


# -- memory ---------------------------------------------------------------------------------------


def _memory(
    config: Any,
    preflight_ok: bool,
    remote: bool,
    offline: bool,
    gpu_memory: int | None,
    host_memory: int | None,
) -> Check:
    """One worker's memory plan against the GPU and host memory it gets."""
    from evomerge.memory import (
        MERGE_TEMPORARY_TENSORS,
        WORKING_DTYPES,
        gpu_bytes_per_worker,
        plan_study_memory,
        study_memory_inputs,
    )

    try:
        inputs = study_memory_inputs(config)
    except (EvomergeError, OSError, ValueError) as exc:
        why = "the models cannot be read (see preflight)" if not preflight_ok else first_line(exc)
        return Check("memory", "skip" if not preflight_ok else "FAIL", f"cannot plan: {why}")
    on_gpu = config.device.startswith("cuda")
    gpu, gpu_from = _gpu_size(gpu_memory, on_gpu and not offline, remote)
    gpu_available = gpu_bytes_per_worker(config, gpu) if on_gpu else None
    host, host_from, sharing = _host_size(config, host_memory, remote)
    host_available = host // sharing if host is not None else None
    plan = plan_study_memory(config, gpu, inputs=inputs)

    def summary(candidate: Any) -> dict[str, Any]:
        return {
            "residency": candidate.residency,
            "gpu_bytes_per_worker": candidate.gpu_bytes_per_worker,
            "host_bytes_per_worker": candidate.host_bytes_per_worker,
            "fits": candidate.fits(gpu_available, host_available),
        }

    by_dtype = {}
    for dtype in WORKING_DTYPES:
        chosen = plan_study_memory(config, gpu, dtype, inputs=inputs)
        entry = summary(chosen)
        if on_gpu:
            entry["by_residency"] = {
                where: summary(
                    plan_study_memory(config, gpu, dtype, residency=where, inputs=inputs)
                )
                for where in ("device", "host")
            }
        by_dtype[dtype] = entry
    gpu_fits = plan.gpu_fits(gpu_available) if on_gpu else True
    host_fits = plan.host_fits(host_available)
    data = {
        **plan.to_json(),
        "gpu_bytes_available": gpu_available,
        "host_bytes_available": host_available,
        "fits": plan.fits(gpu_available, host_available),
        "gpu_fits": gpu_fits,
        "host_fits": host_fits,
        "configured_residency": config.cluster.residency,
        "assumed": {"gpu": gpu_from, "host": host_from},
        "by_working_dtype": by_dtype,
    }
    host_text = (
        f"host {format_bytes(plan.host_bytes_per_worker)} of "
        f"{format_bytes(host_available) if host_available is not None else '?'} "
        f"({plan.breakdown('host')}; {host_from})"
    )
    if on_gpu:
        share = f"{format_bytes(gpu_available)}" if gpu_available is not None else "? (unknown)"
        if gpu_available is not None and config.cluster.gpus_per_worker < 1:
            share += f" ({config.cluster.gpus_per_worker:g} of a GPU)"
        text = (
            f"per worker: GPU {format_bytes(plan.gpu_bytes_per_worker)} of {share} "
            f"({plan.working_dtype}, residency {plan.residency}: {plan.breakdown('gpu')}; "
            f"{gpu_from}); {host_text}"
        )
    else:
        text = f"per worker ({config.device}, {plan.working_dtype}): {host_text}"
    text += "".join(f"; {note}" for note in plan.notes if not note.startswith("residency"))
    if inputs.merge_label:
        copies = max(inputs.merge_tensors, MERGE_TEMPORARY_TENSORS - 1)
        text += f"; merge temporaries {copies:g} + 1 copies of the largest tensor"
        text += f" ({inputs.merge_label})"
    advice = _memory_advice(config, plan, gpu_fits is False, host_fits is False, sharing)
    if gpu_fits is False or host_fits is False:
        return Check("memory", "FAIL", f"does not fit: {text}; {advice}", data)
    if gpu_fits is None:
        return Check("memory", "skip", f"{text}; whether it fits the GPU is unknown", data)
    if host_fits is None:
        return Check("memory", "skip", f"{text}; the host's memory is unknown", data)
    return Check("memory", "ok", text, data)


def _gpu_size(given: int | None, probe: bool, remote: bool) -> tuple[int | None, str]:
    """One GPU's bytes and where that number came from."""
    if given is not None:
        return given, f"--gpu-memory {format_bytes(given)}"
    if not probe:
        return None, "give its size with --gpu-memory (e.g. 80GB)"
    try:
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        sizes = [torch.cuda.get_device_properties(i).total_memory for i in range(count)]
        name = torch.cuda.get_device_name(0) if count else ""
    except Exception:  # a driver that does not answer: as if there were none
        count, sizes, name = 0, [], ""
    if not count:
        return None, "no GPU here to measure: give its size with --gpu-memory (e.g. 80GB)"
    where = "this machine's GPU" + ("; the workers' may differ" if remote else "")
    return min(sizes), f"{name}, {format_bytes(min(sizes))} ({where})"


def _host_size(config: Any, given: int | None, remote: bool) -> tuple[int | None, str, int]:
    """One node's memory, where that came from, and how many workers share it."""
    workers = config.cluster.workers
    sharing = 1 if remote else workers
    if given is not None:
        size, source = given, f"--host-memory {format_bytes(given)}"
    else:
        size = _mem_total()
        source = f"this machine's {format_bytes(size)}" if size else "no /proc/meminfo here"
    if remote:
        assumed = "a cluster: one worker per node assumed"
    else:
        assumed = f"{workers} worker{'s' if workers != 1 else ''} on this machine"
    return size, f"{source} / {sharing}: {assumed}", sharing


def _mem_total() -> int | None:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _memory_advice(config: Any, plan: Any, gpu_short: bool, host_short: bool, sharing: int) -> str:
    """What to change so that a plan fits."""

    changes: list[str] = []
    on_gpu = plan.device == "cuda"
    evaluation = plan.evaluation
    step_is_eval = plan.bytes_of("evaluation") >= plan.bytes_of("merge")
    if (gpu_short or (host_short and not on_gpu)) and evaluation is not None and step_is_eval:
        change = (
            f"lower batch_size (the evaluation takes {format_bytes(plan.bytes_of('evaluation'))}"
            f" at batch {evaluation.batch} x {evaluation.sequence} tokens)"
        )
        if evaluation.sequence_source != "max_length":
            change += f" or set max_length (now {evaluation.sequence_source})"
        changes.append(change)
    if gpu_short and plan.residency == "device":
        changes.append(
            f"cluster.residency: host (moves {format_bytes(plan.bytes_of('resident tensors'))} "
            "of resident tensors off the GPU)"
        )
    if (gpu_short or host_short) and plan.working_dtype == "float32" and on_gpu:
        changes.append("working_dtype: bfloat16 (halves the working model and the evaluation)")
    if gpu_short and config.cluster.gpus_per_worker < 1:
        changes.append(
            f"gpus_per_worker: 1 (now {config.cluster.gpus_per_worker:g}: workers share a GPU)"
        )
    if host_short and sharing > 1:
        changes.append(f"fewer workers per node (now {sharing} share this machine)")
    if host_short and on_gpu and config.cluster.residency == "host":
        changes.append("cluster.residency: device (the resident tensors on the GPU)")
    return "change: " + "; or ".join(changes) if changes else "a machine with more memory"


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


def _path_merges(config: Any, store: Any) -> str:
    """For a data-flow space that names merges by study: which trials they resolve to now
    (``, merge = ps:12``), refused (raised) as the study's creation would refuse them."""
    from evomerge.dataflow.space import DataflowSpace, StudyModel
    from evomerge.errors import ConfigError
    from evomerge.space import space_from_setting
    from evomerge.study.path_merges import resolve_path_merges

    space = space_from_setting(config.space)
    if not isinstance(space, DataflowSpace) or not space.unresolved():
        return ""
    if store is None:
        raise ConfigError(
            f"space '{space.name}' names merges by study "
            f"({', '.join(str(m.study) for m in space.unresolved())}), and this database holds "
            "no studies yet"
        )
    resolved = resolve_path_merges(space, store, config.base, config.sources)
    found = [f"{m.label} = {m.study}" for m in resolved.models if isinstance(m, StudyModel)]
    return "; its paths use " + ", ".join(found)


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
            merges = _path_merges(config, store)
            return Check("study", "ok", f"'{name}' is a new study in {shown}{merges}")
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
