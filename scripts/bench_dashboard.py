"""How fast `evomerge dashboard` answers on a large study.

Writes a synthetic study (N trials of G genes, two objectives, SQLite or PostgreSQL) with the
store's own methods, serves the dashboard in process on a free port, and times the requests a
browser makes: the study list, the study detail (every trial), and parameter importances.

    .venv/bin/python scripts/bench_dashboard.py --trials 500,2000 --storage sqlite,postgresql
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import sqlalchemy

from evomerge.study import StudyStore
from evomerge.study.dashboard import make_dashboard_server

POSTGRES = os.environ.get(
    "EVOMERGE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def build(url: str, trials: int, genes: int, seed: int = 0) -> StudyStore:
    store = StudyStore(url)
    objectives = [{"metric": "a/acc"}, {"metric": "b/acc"}]
    store.create_study("bench", {"objectives": objectives}, budget=trials)
    rng = np.random.default_rng(seed)
    for number in range(trials):
        genome = rng.random(genes)
        store.add_trial("bench", number, role="proposal", label=f"p{number}", genome=genome)
        metrics = {"a/acc": float(genome[:3].mean()), "b/acc": float(1 - genome[3:6].mean())}
        store.finish_trial("bench", number, state="COMPLETE", metrics=metrics, worker="w0")
    return store


def timed_get(base: str, path: str) -> tuple[float, int]:
    start = time.perf_counter()
    with urllib.request.urlopen(base + path, timeout=600) as response:
        body = response.read()
    return time.perf_counter() - start, len(body)


def measure(store: StudyStore, repeats: int) -> dict[str, float]:
    server = make_dashboard_server(store, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        result: dict[str, float] = {}
        result["detail_cold_s"], size = timed_get(base, "/api/studies/1")
        result["detail_kb"] = size / 1000
        warm = []
        for _ in range(repeats):  # past the dashboard's cache: every call re-reads the trials
            time.sleep(10.5)
            warm.append(timed_get(base, "/api/studies/1")[0])
        result["detail_reread_s"] = statistics.median(warm)
        result["detail_cached_s"] = timed_get(base, "/api/studies/1")[0]
        result["list_s"] = timed_get(base, "/api/studies")[0]
        result["importances_s"] = timed_get(base, "/api/studies/1/param_importances")[0]
        trials = json.loads(urllib.request.urlopen(base + "/api/studies/1").read())["trials"]
        assert len(trials) == store.studies()[0]["budget"]
        return result
    finally:
        server.shutdown()
        server.server_close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", default="500,2000")
    parser.add_argument("--genes", type=int, default=24)
    parser.add_argument("--storage", default="sqlite,postgresql")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    print(
        "| storage | trials | detail, first (s) | detail, re-read (s) | detail, cached (s) "
        "| study list (s) | importances (s) | detail size (KB) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for kind in args.storage.split(","):
        for trials in (int(t) for t in args.trials.split(",")):
            with tempfile.TemporaryDirectory() as folder:
                schema = None
                if kind == "sqlite":
                    url = f"sqlite:///{Path(folder) / 'bench.db'}"
                else:
                    schema = f"bench_{uuid.uuid4().hex[:10]}"
                    admin = sqlalchemy.create_engine(POSTGRES)
                    with admin.begin() as connection:
                        connection.execute(sqlalchemy.text(f"CREATE SCHEMA {schema}"))
                    url = f"{POSTGRES}?options=-csearch_path%3D{schema}"
                try:
                    r = measure(build(url, trials, args.genes), args.repeats)
                finally:
                    if schema:
                        with admin.begin() as connection:
                            connection.execute(sqlalchemy.text(f"DROP SCHEMA {schema} CASCADE"))
            print(
                f"| {kind} | {trials} | {r['detail_cold_s']:.2f} | {r['detail_reread_s']:.2f} "
                f"| {r['detail_cached_s']:.3f} | {r['list_s']:.3f} | {r['importances_s']:.2f} "
                f"| {r['detail_kb']:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
