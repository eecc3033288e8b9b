"""`evomerge check` on real databases, models and Ray, the cluster scripts' hygiene, and one real
run of the scripts: a head from `cluster_head.sh`, a study submitted as a Ray Job with
`submit_study.sh`, followed with `tail_study.sh`, stopped with `ray job stop` and continued with
`submit_study.sh --resume` to exactly its budget.

The end-to-end test never runs `ray stop` (that stops every Ray process of the machine, other
test runs' too): it stops its own head by killing the process group the head was started in."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import sqlalchemy
import yaml

from evomerge.cli import main
from evomerge.study import StudyStore
from evomerge.study import check as study_check
from tests.helpers import assert_shell_clean

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ["cluster_head", "cluster_worker", "submit_study", "tail_study", "overnight"]
POSTGRES = os.environ.get(
    "EVOMERGE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
BIN = Path(sys.executable).parent


def _study(folder: Path, zoo: dict, **changes: object) -> Path:
    data = {
        "name": "toy",
        "base": str(zoo["base"]),
        "sources": [str(zoo["ft_a"]), str(zoo["ft_b"])],
        "space": "task_arithmetic_global",
        "proposer": {"kind": "random", "seed": 0},
        "objectives": [{"metric": "toy_facts_a/acc"}, {"metric": "toy_facts_b/acc"}],
        "evaluators": [{"kind": "lm_eval", "tasks": ["toy_facts_a", "toy_facts_b"]}],
        "budget": 6,
        "cluster": {"workers": 1},
    }
    data.update(changes)
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _check(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, str]]:
    """Run `evomerge check`; its exit code and each check's line by name."""
    code = main(["check", *args])
    out = capsys.readouterr().out
    lines = {
        line.split()[1]: line for line in out.splitlines() if line[:4] in ("ok  ", "FAIL", "skip")
    }
    return code, lines


@pytest.fixture(autouse=True)
def _no_ray_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # `check` without --address: this machine


# -- evomerge check ---------------------------------------------------------------------------


def test_a_good_toy_study_passes_every_check_and_creates_nothing(toy_zoo, tmp_path, capsys):
    path = _study(tmp_path, toy_zoo)
    code, lines = _check(capsys, str(path))
    assert code == 0, lines
    assert set(lines) == {"yaml", "preflight", "memory", "database", "study", "ray", "cuda", "disk"}
    assert all(line.startswith("ok") for line in lines.values()), lines
    assert "1 CPUs, 0 GPUs" in lines["ray"] and "local Ray instance" in lines["ray"]
    assert "will be created" in lines["database"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.yaml"]  # no database left


def test_a_good_study_on_postgresql_passes_and_leaves_its_database_untouched(
    toy_zoo, tmp_path, capsys, postgres_url
):
    path = _study(tmp_path, toy_zoo)
    code, lines = _check(capsys, str(path), "--storage", postgres_url)
    assert code == 0, lines
    assert "answers and takes writes" in lines["database"]
    assert "is a new study" in lines["study"]
    engine = sqlalchemy.create_engine(postgres_url)
    assert sqlalchemy.inspect(engine).get_table_names() == []  # neither its tables nor the probe
    engine.dispose()


def test_more_gpus_than_the_machine_has_fails_the_ray_check_with_the_numbers(
    toy_zoo, tmp_path, capsys
):
    path = _study(tmp_path, toy_zoo, cluster={"workers": 128, "gpus_per_worker": 1})
    code, lines = _check(capsys, str(path))
    assert code == 1
    assert lines["ray"].startswith("FAIL")
    have = study_check._local_gpus()
    assert "128 workers x (1 CPU, 1 GPU) = 128 CPUs, 128 GPUs" in lines["ray"]
    assert f"has {have} GPUs" in lines["ray"]
    assert all(lines[name].startswith("ok") for name in ("yaml", "preflight", "database", "disk"))


def test_an_unreachable_postgresql_fails_the_database_check_in_seconds(toy_zoo, tmp_path, capsys):
    path = _study(tmp_path, toy_zoo)
    url = "postgresql+psycopg://postgres@127.0.0.1:1/test"
    started = time.monotonic()
    database = study_check._database(url)
    assert time.monotonic() - started < study_check.CONNECT_SECONDS + 2
    assert database.state == "FAIL" and "127.0.0.1" in database.detail
    code, lines = _check(capsys, str(path), "--storage", url)
    assert code == 1
    assert lines["database"].startswith("FAIL") and "port 1" in lines["database"]
    assert lines["study"].startswith("skip")


def test_a_missing_model_fails_the_preflight_check(toy_zoo, tmp_path, capsys):
    missing = tmp_path / "no_such_model"
    path = _study(tmp_path, toy_zoo, base=str(missing))
    code, lines = _check(capsys, str(path))
    assert code == 1
    assert lines["preflight"].startswith("FAIL")
    assert f"base: model 'base': {missing} does not exist" in lines["preflight"]
    assert lines["disk"].startswith("skip")  # nothing to size the export by


def test_a_name_taken_by_a_finished_study_fails_and_a_stopped_one_needs_resume(
    toy_zoo, tmp_path, capsys
):
    path = _study(tmp_path, toy_zoo)
    store = StudyStore(tmp_path / "evomerge_studies.db")
    store.create_study("toy", {"budget": 6}, budget=6)
    store.set_status("toy", "finished")
    code, lines = _check(capsys, str(path))
    assert code == 1
    assert lines["study"].startswith("FAIL")
    assert "already exists" in lines["study"] and "finished, 0/6 trials" in lines["study"]
    assert "choose another name" in lines["study"] and "resume" not in lines["study"]

    store.set_status("toy", "stopped")
    code, lines = _check(capsys, str(path))
    assert code == 1 and f"continue it with 'evomerge resume {path}'" in lines["study"]
    code, lines = _check(capsys, str(path), "--resume")
    assert code == 0 and lines["study"].startswith("ok"), lines
    assert f"'evomerge resume {path}' continues it" in lines["study"]


def test_an_address_that_does_not_answer_fails_the_ray_check_in_seconds(toy_zoo, tmp_path, capsys):
    path = _study(tmp_path, toy_zoo)
    started = time.monotonic()
    nodes = study_check._cluster_nodes("127.0.0.1:9", "--address")
    assert time.monotonic() - started < 10
    assert isinstance(nodes, str) and "cannot join the Ray cluster at 127.0.0.1:9" in nodes
    code, lines = _check(capsys, str(path), "--address", "http://127.0.0.1:8265")
    assert code == 1 and "Ray Jobs (dashboard) address" in lines["ray"]


def test_a_yaml_that_does_not_load_is_one_failed_check(tmp_path, capsys):
    path = tmp_path / "study.yaml"
    path.write_text("name: toy\nbudget: [\n")
    code, lines = _check(capsys, str(path))
    assert code == 1 and list(lines) == ["yaml"] and lines["yaml"].startswith("FAIL")


# -- the scripts ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SCRIPTS)
def test_each_script_is_clean_and_answers_help(name):
    script = REPO / "scripts" / f"{name}.sh"
    assert os.access(script, os.X_OK), f"{script} is not executable"
    assert_shell_clean(script)
    shown = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=30)
    assert shown.returncode == 0 and shown.stdout.startswith("Usage: scripts/"), shown
    wrong = subprocess.run([str(script), "--no-such-option"], capture_output=True, text=True)
    assert wrong.returncode == 1 and len(wrong.stderr.strip().splitlines()) == 1, wrong.stderr


def _free_ports(count: int) -> list[int]:
    """``count`` distinct free ports: each probe stays bound until all are chosen (ports
    probed one at a time can repeat, and Ray refuses one port for two components)."""
    with contextlib.ExitStack() as stack:
        probes = [stack.enter_context(socket.socket()) for _ in range(count)]
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]


def _stop_head(head: subprocess.Popen, temp: str) -> None:
    """Stop the head this test started, and only it: its process group, then whatever still
    names its temp folder (never `ray stop`)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(head.pid, sig)
        except ProcessLookupError:
            break
        try:
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and temp in (proc / "cmdline").read_text(errors="replace"):
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


NAP = """
import time


def nap(model, tokenizer, limit=None):
    time.sleep(0.8)
    return {"slept": 0.8}
"""
BUDGET = 8  # stopped after 2: `ray job stop` takes ~2 s to land, about 2 more trials


def _finished(db: Path) -> int:
    if not db.exists():  # opening it would create it
        return 0
    try:
        return sum(t.state in ("COMPLETE", "FAILED") for t in StudyStore(db).trials("toy"))
    except Exception:  # the job has not created the study yet
        return 0


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_submitted_study_stopped_by_ray_job_stop_resumes_to_its_budget(toy_zoo):
    temp = tempfile.mkdtemp(prefix="evr", dir="/tmp")  # short: Ray's socket paths must fit
    folder = Path(temp)
    # What a user does: keep token authentication, with the token in a file of their own.
    (folder / "token").write_text(secrets.token_hex(16))
    env = dict(
        os.environ,
        PATH=f"{BIN}:{os.environ['PATH']}",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(folder / "token"),
        RAY_USAGE_STATS_ENABLED="0",
    )
    env.pop("RAY_ADDRESS", None)
    port, jobs_port, agent_port, client_port = _free_ports(4)
    jobs = f"http://127.0.0.1:{jobs_port}"
    head_cmd = [str(REPO / "scripts" / "cluster_head.sh"), "--port", str(port)]
    head_cmd += ["--dashboard-port", str(jobs_port), "--node-ip", "127.0.0.1"]
    head_cmd += ["--num-cpus", "2", "--num-gpus", "0", "--temp-dir", f"{temp}/ray", "--block"]
    head_cmd += ["--", f"--dashboard-agent-listen-port={agent_port}"]
    head_cmd += [f"--ray-client-server-port={client_port}", "--object-store-memory=100000000"]
    log = (folder / "head.log").open("w")
    head = subprocess.Popen(
        head_cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 120
        while subprocess.run(
            [str(BIN / "ray"), "job", "list", "--address", jobs], env=env, capture_output=True
        ).returncode:
            assert head.poll() is None, (folder / "head.log").read_text()
            assert time.monotonic() < deadline, (folder / "head.log").read_text()
            time.sleep(1)
        (folder / "study").mkdir()
        (folder / "study" / "nap.py").write_text(NAP)  # slow trials: the job is surely stopped
        evaluators = [{"kind": "lm_eval", "tasks": ["toy_facts_a", "toy_facts_b"]}]
        evaluators.append({"kind": "python", "function": "nap.py:nap"})
        study = _study(folder / "study", toy_zoo, budget=BUDGET, evaluators=evaluators)
        db = folder / "study" / "evomerge_studies.db"

        def run(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
            return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)

        submit = run(str(REPO / "scripts" / "submit_study.sh"), str(study), "--address", jobs)
        assert submit.returncode == 0, submit.stderr
        job_id = submit.stdout.strip()
        assert job_id.startswith("evomerge-study-") and "tail_study.sh" in submit.stderr

        # Stopped mid-study with `ray job stop` (SIGTERM): a clean stop, ready to resume.
        deadline = time.monotonic() + 150
        while _finished(db) < 2:
            assert time.monotonic() < deadline, run(str(BIN / "ray"), "job", "logs", job_id)
            time.sleep(0.2)
        stop = run(str(BIN / "ray"), "job", "stop", job_id, "--address", jobs)
        assert stop.returncode == 0, stop.stdout + stop.stderr
        tail = run(str(REPO / "scripts" / "tail_study.sh"), job_id, "--address", jobs)
        assert tail.returncode == 1 and f"job {job_id} STOPPED" in tail.stderr, tail.stderr
        assert f"continue with: evomerge resume {study}" in tail.stdout  # stopped, not killed
        store = StudyStore(db)
        assert store.study("toy")["status"] == "stopped"
        states = [t.state for t in store.trials("toy")]
        assert "RUNNING" not in states and states.count("COMPLETE") < BUDGET

        resume = run(
            str(REPO / "scripts" / "submit_study.sh"), str(study), "--address", jobs, "--resume"
        )
        assert resume.returncode == 0, resume.stderr
        job_id = resume.stdout.strip()
        tail = run(str(REPO / "scripts" / "tail_study.sh"), job_id, "--address", jobs, timeout=200)
        assert tail.returncode == 0, tail.stdout + tail.stderr
        assert f"job {job_id} SUCCEEDED" in tail.stderr
        assert "resuming study 'toy'" in tail.stdout  # the job's log, followed
        assert f"study 'toy' finished: {BUDGET}/{BUDGET} trials" in tail.stdout
        status = run(str(BIN / "ray"), "job", "status", job_id, "--address", jobs)
        assert f"Job '{job_id}' succeeded" in status.stdout + status.stderr
        trials = store.trials("toy")
        assert [t.number for t in trials] == list(range(BUDGET))
        assert {t.state for t in trials} == {"COMPLETE"}
    finally:
        _stop_head(head, temp)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)
