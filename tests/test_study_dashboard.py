"""`evomerge dashboard`: optuna-dashboard over a study database, read through Optuna's API.

Optuna itself is the oracle: its own Pareto computation over the view must find the trials
evomerge's front finds, and the dashboard's HTTP API must serve what the database holds.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState

from evomerge.checkpoint import ModelFolder
from evomerge.cli import main
from evomerge.optimize import parse_objectives
from evomerge.space import space_from_setting
from evomerge.study import StudyStore
from evomerge.study.optuna_view import ReadOnlyStorageError, StudyStorageView
from tests.study_helpers import ignore_sigint, make_report_study, study_config

ROOT = Path(__file__).resolve().parents[1]
FRONT = {0, 1, 3}
"""Of make_report_study's complete trials (max a/acc, min b/loss): 0 (0.9, 0.8), 1 (0.2,
0.1), 2 (0.5, 0.5), 3 (0.7, 0.3) once promoted, 7 (0.6, 0.6); 3 dominates 2 and 7, the rest
trade off."""


def rows(store: StudyStore) -> list[tuple[Any, ...]]:
    """Every study and trial field, to show that nothing was written."""
    studies = [tuple(sorted(s.items())) for s in store.studies()]
    trials = [
        (t.number, t.state, t.fidelity, tuple(sorted(t.metrics.items()))) for t in store.trials("s")
    ]
    return [*studies, *trials]


def test_optuna_reads_the_study_and_finds_the_same_front(url):
    store = make_report_study(url)
    view = StudyStorageView(store)
    study = optuna.load_study(study_name="s", storage=view)

    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert study.metric_names == ["a/acc", "b/loss"]
    states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    assert states == {
        **dict.fromkeys([0, 1, 2, 3], TrialState.COMPLETE),
        7: TrialState.PRUNED,  # scored on 10 documents only: not compared with full scores
        **dict.fromkeys([4, 5, 6, 8], TrialState.FAIL),
        9: TrialState.RUNNING,
        10: TrialState.WAITING,
    }
    by_number = {t.number: t for t in study.trials}
    assert by_number[3].values == [0.7, 0.3]  # the promoted, full-fidelity score
    assert by_number[3].user_attrs["fidelity"] == "full"
    assert by_number[0].user_attrs["label"] == "ft_a"
    assert by_number[0].user_attrs["role"] == "source"
    assert by_number[7].values is None
    assert by_number[7].user_attrs["metric@limit=10:a/acc"] == 0.6
    assert by_number[5].user_attrs["error"].startswith("TrialTimeout")

    objectives = parse_objectives(store.study_config("s")["objectives"])
    ours = {t.number for t in store.pareto("s", objectives)}
    assert {t.number for t in study.best_trials} == ours == FRONT


def test_genes_are_parameters_in_their_own_units(toy_zoo, tmp_path):
    storage = f"sqlite:///{tmp_path / 'genes.db'}"
    config = study_config(toy_zoo, storage, space="task_arithmetic_per_layer")
    store = StudyStore(storage)
    store.create_study("toy", config.model_dump(mode="json"), 3)
    base = ModelFolder(config.base, label="base")
    labels = [ModelFolder(s).label for s in config.sources]
    genes = space_from_setting(config.space).bind(base, labels).genes
    genome = [(i + 1) / (len(genes) + 1) for i in range(len(genes))]
    store.add_trial("toy", 0, role="proposal", label="proposal 0", genome=genome)
    store.finish_trial(
        "toy", 0, state="COMPLETE", metrics={"toy_facts_a/acc": 0.5, "toy_facts_b/acc": 0.25}
    )
    store.add_trial("toy", 1, role="source", label="ft_a")  # no genome: no parameters

    trial, source = StudyStorageView(store).get_all_trials(1)
    assert len(genes) >= 2
    for gene, unit in zip(genes, genome):
        low, high = gene.searched.bounds
        assert trial.distributions[gene.name] == FloatDistribution(low, high)
        assert trial.params[gene.name] == pytest.approx(low + unit * (high - low))
    assert trial.values == [0.5, 0.25]
    assert source.params == {} and source.state == TrialState.RUNNING


def test_a_method_choice_is_one_categorical_parameter_per_layer_group(toy_zoo, tmp_path):
    """ties_family_choice: each group's one-of-4 coordinates are shown as one categorical
    parameter whose value is the method the space decodes (the highest coordinate), and the
    weights and densities as floats in their own units."""
    storage = f"sqlite:///{tmp_path / 'choice.db'}"
    config = study_config(toy_zoo, storage, space="ties_family_choice")
    store = StudyStore(storage)
    store.create_study("toy", config.model_dump(mode="json"), 1)
    labels = [ModelFolder(s).label for s in config.sources]
    space = space_from_setting(config.space).bind(ModelFolder(config.base), labels)
    genome = [0.5] * space.dimension
    (first, methods_first), (second, methods_second) = space.categorical_groups()
    genome[first[2]] = 0.9  # group 1: its third method
    genome[second[0]], genome[second[1]] = 0.7, 0.7  # group 2: a tie, the first listed wins
    store.add_trial("toy", 0, role="proposal", label="proposal 0", genome=genome)
    (trial,) = StudyStorageView(store).get_all_trials(1)
    assert trial.params["method/L0-1"] == methods_first[2] == "breadcrumbs_ties"
    assert trial.params["method/L2-3"] == methods_second[0] == "ties"
    assert isinstance(trial.distributions["method/L0-1"], CategoricalDistribution)
    assert tuple(trial.distributions["method/L0-1"].choices) == tuple(methods_first)
    floats = [g for g in space.genes if g.choice is None]
    assert len(trial.params) == len(floats) + 2
    for gene in floats:
        low, high = gene.searched.bounds
        assert trial.params[gene.name] == pytest.approx(low + 0.5 * (high - low))
    recipe = space.decode(genome, config.base, config.sources)
    assert recipe.layer_methods == ["breadcrumbs_ties"] * 2 + ["ties"] * 2  # as decoded


def test_a_space_that_cannot_be_bound_shows_unit_genes(tmp_path, caplog):
    store = make_report_study(str(tmp_path / "unbound.db"))  # its config names no models or space
    store.add_trial("s", 11, role="proposal", label="proposal 8", genome=[0.25, 0.75])
    trial = StudyStorageView(store).get_all_trials(1)[-1]
    assert trial.params == {"gene_0": 0.25, "gene_1": 0.75}
    assert trial.distributions["gene_1"] == FloatDistribution(0.0, 1.0)
    assert "cannot be bound" in caplog.text


def test_every_write_is_refused_and_nothing_changes(tmp_path):
    store = make_report_study(str(tmp_path / "ro.db"))
    before = rows(store)
    view = StudyStorageView(store)
    study = optuna.load_study(study_name="s", storage=view)
    for attempt in (
        lambda: study.set_user_attr("k", 1),
        lambda: study.ask(),
        lambda: optuna.delete_study(study_name="s", storage=view),
        lambda: optuna.create_study(study_name="t", storage=view),
        lambda: view.set_trial_state_values(1_000_000_009, TrialState.COMPLETE, [1.0, 0.0]),
    ):
        with pytest.raises(ReadOnlyStorageError, match="read-only"):
            attempt()
    assert rows(store) == before


# -- the command -----------------------------------------------------------------------------


def get(base: str, path: str) -> Any:
    with urllib.request.urlopen(base + path, timeout=30) as response:
        return json.load(response)


def send(base: str, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    data = json.dumps(body or {}).encode()
    request = urllib.request.Request(
        base + path, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


@pytest.fixture
def served(tmp_path):  # type: ignore[no-untyped-def]
    """`evomerge dashboard --port 0` on make_report_study's database, as a user starts it."""
    database = tmp_path / "served.db"
    store = make_report_study(str(database))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "evomerge.cli",
            "dashboard",
            "--storage",
            str(database),
            "--port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
        preexec_fn=ignore_sigint,  # started as a script's background job: SIGINT still stops it
    )
    try:
        lines = [process.stdout.readline() for _ in range(2)]
        match = re.search(r"http://127\.0\.0\.1:(\d+)/dashboard", lines[1])
        assert match, (lines, process.stderr.read() if process.poll() is not None else "")
        yield store, f"http://127.0.0.1:{match.group(1)}", process, lines
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


def test_the_dashboard_serves_the_study_live_and_refuses_writes(served):
    store, base, process, lines = served
    assert "1 studies: s" in lines[0]
    summaries = get(base, "/api/studies")["study_summaries"]
    assert [(s["study_name"], s["directions"]) for s in summaries] == [
        ("s", ["maximize", "minimize"])
    ]
    detail = get(base, "/api/studies/1")
    assert detail["objective_names"] == ["a/acc", "b/loss"]
    assert len(detail["trials"]) == 11
    assert {t["number"] for t in detail["best_trials"]} == FRONT
    promoted = next(t for t in detail["trials"] if t["number"] == 3)
    assert promoted["values"] == [0.7, 0.3]
    with urllib.request.urlopen(base + "/dashboard", timeout=30) as page:
        assert page.status == 200 and b"<html" in page.read().lower()

    before = rows(store)
    for method, path in (("PUT", "/api/studies/1/note"), ("DELETE", "/api/studies/1")):
        status, answer = send(base, method, path, {"version": 1, "body": "a note"})
        assert status == 403 and "read-only" in answer["reason"]
    assert rows(store) == before

    store.add_trial("s", 11, role="proposal", label="proposal 8")  # a study that goes on
    store.finish_trial("s", 11, state="COMPLETE", metrics={"a/acc": 0.99, "b/loss": 0.05})
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # the dashboard caches trials for 2 s
        detail = get(base, "/api/studies/1")
        if len(detail["trials"]) == 12:
            break
        time.sleep(0.5)
    assert len(detail["trials"]) == 12
    assert {t["number"] for t in detail["best_trials"]} == {11}  # dominates every other

    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=30) == 0
    assert "dashboard stopped" in process.stderr.read()


def test_a_busy_port_and_a_missing_database_are_one_line(tmp_path, capsys):
    store = make_report_study(str(tmp_path / "s.db"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["dashboard", "--storage", store.url, "--port", str(port)])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.count("\n") == 0
    assert f"--port {port}: something already listens" in err

    missing = tmp_path / "nope.db"
    assert main(["dashboard", "--storage", str(missing)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nope.db" in err
    assert not missing.exists()


SLOW_SERVER = """
import sys, time
from wsgiref.simple_server import make_server
from evomerge.study.dashboard import _QuietHandler, serve_until_stopped

def slow(environ, start_response):  # stands in for a dashboard page that takes a while
    print("answering", flush=True)
    time.sleep(1.5)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"the whole answer"]

server = make_server("127.0.0.1", 0, slow, handler_class=_QuietHandler)
print(server.server_address[1], flush=True)
serve_until_stopped(server, finish_seconds=float(sys.argv[1]))
print("stopped", flush=True)
"""


def _slow_server(finish_seconds: float) -> tuple[subprocess.Popen, int]:
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_SERVER, str(finish_seconds)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,  # SIGINT as a terminal gives it (the CLI restores it where it was ignored)
    )
    return process, int(process.stdout.readline())


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl_c", "sigterm"])
def test_a_stop_during_a_request_lets_it_finish_then_ends(signum):
    # A SIGINT raised inside a request used to become wsgiref's 500, the server going on.
    process, port = _slow_server(finish_seconds=10)
    answers: list[tuple[int, bytes]] = []

    def fetch() -> None:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as response:
            answers.append((response.status, response.read()))

    client = threading.Thread(target=fetch)
    client.start()
    assert process.stdout.readline() == "answering\n"
    process.send_signal(signum)
    client.join(timeout=30)
    assert answers == [(200, b"the whole answer")]
    assert process.wait(timeout=30) == 0
    assert process.stdout.read() == "stopped\n"


def test_a_client_that_never_finishes_its_request_does_not_hold_the_stop():
    process, port = _slow_server(finish_seconds=1)
    with socket.create_connection(("127.0.0.1", port)) as stalled:
        stalled.sendall(b"GET / HTTP/1.1\r\n")  # and never the rest of the headers
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    assert process.stdout.read() == "stopped\n"
