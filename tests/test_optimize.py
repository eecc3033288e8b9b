"""Proposers: convergence on toy functions, ask/tell bookkeeping, failures, restarts and exact
save/restore (in process and across processes)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from evomerge.errors import ConfigError
from evomerge.optimize import (
    Objective,
    Proposer,
    available_proposers,
    build_proposer,
    dominates,
    pareto_front,
    parse_proposer_config,
    restore_proposer,
    scalarize,
)
from evomerge.optimize.cma_proposer import CMAProposer

REPO = Path(__file__).resolve().parents[1]
D = 6
CENTER = np.array([0.3, 0.4, 0.5, 0.6, 0.7, 0.3])
ONE = [Objective(metric="score")]
HAS_CMAES = importlib.util.find_spec("cmaes") is not None
needs_cmaes = pytest.mark.skipif(not HAS_CMAES, reason="optuna-cmaes needs the cmaes package")


def sphere(x: np.ndarray, center: np.ndarray = CENTER) -> float:
    """To maximize: 0 at ``center``."""
    return -float(np.sum((np.asarray(x) - center) ** 2))


def run(
    proposer: Proposer,
    n: int,
    f: Callable[[np.ndarray], list[float]] = lambda x: [sphere(x)],
    fails: Callable[[int, np.ndarray], bool] = lambda i, x: False,
) -> list[tuple[np.ndarray, list[float]]]:
    """Ask and tell one at a time; return (genome, values) of the successful evaluations."""
    done = []
    for _ in range(n):
        proposal = proposer.ask()
        if proposal is None:
            break
        genome = proposal.genome
        assert genome.dtype == np.float64 and genome.shape == (proposer.dimension,)
        assert np.all((genome >= 0) & (genome <= 1))
        if fails(proposal.id, genome):
            proposer.tell_failed(proposal.id, "boom")
            continue
        values = f(genome)
        proposer.tell(proposal.id, values)
        done.append((genome, values))
    return done


# -- objectives ---------------------------------------------------------------------------


def test_scalarize_dominates_and_pareto_front() -> None:
    objs = [
        Objective(metric="acc"),
        Objective(metric="loss", direction="minimize", weight=0.5),
    ]
    assert scalarize(objs, [0.8, 2.0]) == pytest.approx(0.8 - 1.0)
    assert dominates([0.9, 1.0], [0.8, 1.0], objs)
    assert not dominates([0.9, 1.0], [0.9, 1.0], objs)
    assert not dominates([0.9, 2.0], [0.8, 1.0], objs)
    points = [[0.8, 1.0], [0.9, 2.0], [0.7, 1.5], [0.8, 1.0], [0.95, 3.0]]
    assert pareto_front(points, objs) == [0, 1, 4]


# -- convergence --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "n", "threshold"),
    [
        ({"kind": "cma"}, 150, -0.05),
        ({"kind": "tpe"}, 80, -0.03),
        ({"kind": "nsga2"}, 120, -0.12),
        pytest.param({"kind": "optuna-cmaes"}, 100, -0.08, marks=needs_cmaes),
    ],
)
def test_converges_on_sphere(config: dict, n: int, threshold: float) -> None:
    proposer = build_proposer(config, D, ONE)
    done = run(proposer, n)
    values = [v[0] for _, v in done]
    assert len(values) == n and proposer.n_told == n and proposer.pending == []
    assert max(values[:5]) < -0.05  # the start is far from the optimum ...
    assert max(values) > threshold  # ... the end is close
    genome, best = proposer.best
    assert best == max(values) and sphere(genome) == best


@pytest.mark.parametrize("kind", ["random", "qmc"])
def test_space_filling_kinds_cover_the_cube(kind: str) -> None:
    proposer = build_proposer({"kind": kind, "seed": 3}, D, ONE)
    genomes = np.array([g for g, _ in run(proposer, 64)])
    assert max(sphere(g) for g in genomes) > -0.35
    assert genomes.min() < 0.05 and genomes.max() > 0.95
    assert len({g.tobytes() for g in genomes}) == 64


def test_gp_converges_in_few_evaluations() -> None:
    center = np.array([0.3, 0.5, 0.7])
    proposer = build_proposer({"kind": "gp", "n_startup_trials": 5}, 3, ONE)
    values = [v[0] for _, v in run(proposer, 10, lambda x: [sphere(x, center)])]
    assert max(values) > max(values[:5]) and max(values) > -0.03


# -- ask/tell bookkeeping -----------------------------------------------------------------


def test_cma_out_of_order_and_generation_boundary() -> None:
    proposer = build_proposer({"kind": "cma", "popsize": 5}, D, ONE)
    proposals = [proposer.ask() for _ in range(5)]
    assert all(p is not None for p in proposals)
    assert proposer.ask() is None  # generation boundary
    assert proposer.pending == [0, 1, 2, 3, 4]
    for p in reversed(proposals[1:]):
        proposer.tell(p.id, [sphere(p.genome)])
        assert proposer.ask() is None
    assert proposer.generation == 0
    proposer.tell(proposals[0].id, [sphere(proposals[0].genome)])
    assert proposer.generation == 1 and proposer.pending == []
    nxt = proposer.ask()
    assert nxt is not None and nxt.id == 5
    with pytest.raises(ValueError, match="not pending"):
        proposer.tell(proposals[0].id, [0.0])


def test_optuna_out_of_order_tells() -> None:
    proposer = build_proposer({"kind": "tpe", "n_startup_trials": 2}, D, ONE)
    proposals = [proposer.ask() for _ in range(5)]
    for p in reversed(proposals):
        proposer.tell(p.id, [sphere(p.genome)])
    assert proposer.pending == [] and proposer.n_told == 5
    trials = proposer.study.get_trials()
    for p, trial in zip(proposals, trials):
        genome = np.array([trial.params[f"g{i:04d}"] for i in range(D)])
        assert np.array_equal(genome, p.genome)
        assert trial.values == [sphere(p.genome)]
    assert run(proposer, 5)  # goes on


def test_tell_validation() -> None:
    proposer = build_proposer({"kind": "random"}, D, ONE)
    p = proposer.ask()
    with pytest.raises(ValueError, match="expected 1 objective value"):
        proposer.tell(p.id, [1.0, 2.0])
    with pytest.raises(ValueError, match="tell_failed"):
        proposer.tell(p.id, [float("nan")])
    with pytest.raises(ValueError, match="not pending"):
        proposer.tell(99, [1.0])
    proposer.tell(p.id, [1.0])
    with pytest.raises(ValueError, match="not pending"):
        proposer.tell_failed(p.id)
    with pytest.raises(ValueError):
        p.genome[0] = 0.5  # read-only


# -- failures -----------------------------------------------------------------------------


def _fails(i: int, x: np.ndarray) -> bool:
    return i % 3 == 0 or x[0] > 0.8


@pytest.mark.parametrize(("config", "n"), [({"kind": "cma"}, 150), ({"kind": "tpe"}, 100)])
def test_search_survives_failures(config: dict, n: int) -> None:
    proposer = build_proposer(config, D, ONE)
    values = [v[0] for _, v in run(proposer, n, fails=_fails)]
    assert proposer.n_failed >= n // 3 and proposer.n_told == len(values)
    assert proposer.n_failed + proposer.n_told == n
    assert proposer.last_failure is not None and proposer.last_failure[1] == "boom"
    assert max(values) > -0.05


def test_cma_all_failed_generation_is_resampled() -> None:
    proposer = build_proposer({"kind": "cma", "popsize": 4}, D, ONE)
    first = [proposer.ask() for _ in range(4)]
    for p in first:
        proposer.tell_failed(p.id)
    assert proposer.generation == 0
    again = [proposer.ask() for _ in range(4)]
    assert all(a is not None for a in again)
    assert not any(np.array_equal(a.genome, b.genome) for a in again for b in first)


# -- multiple objectives ------------------------------------------------------------------

A = np.full(D, 0.2)
B = np.full(D, 0.8)
TWO = [Objective(metric="f1"), Objective(metric="f2", direction="minimize")]


def two_objectives(x: np.ndarray) -> list[float]:
    return [sphere(x, A), float(np.sum((x - B) ** 2))]


def test_nsga2_finds_a_pareto_front() -> None:
    proposer = build_proposer({"kind": "nsga2", "population_size": 10}, D, TWO)
    done = run(proposer, 80, two_objectives)
    front = pareto_front([v for _, v in done], TWO)
    assert len(front) >= 3
    for i in front:
        assert not any(dominates(v, done[i][1], TWO) for _, v in done)


def test_cma_optimizes_the_weighted_scalarization() -> None:
    objectives = [Objective(metric="f1", weight=1.0), TWO[1].model_copy(update={"weight": 0})]
    proposer = build_proposer({"kind": "cma"}, D, objectives)
    run(proposer, 150, two_objectives)
    genome, best = proposer.best
    assert best == pytest.approx(sphere(genome, A)) and np.linalg.norm(genome - A) < 0.2


# -- restarts -----------------------------------------------------------------------------


def test_cma_tie_restart_then_finished() -> None:
    proposer = build_proposer({"kind": "cma", "popsize": 4, "restarts": 2}, D, ONE)
    done = run(proposer, 100, lambda x: [1.0])
    assert len(done) == 4 + 8 + 16  # one generation per run, IPOP doubling
    assert proposer.restarts_done == 2 and proposer.finished
    assert [r["reason"] for r in proposer.runs] == ["tie"] * 3
    assert proposer.ask() is None and proposer.ask() is None


def test_cma_by_default_restarts_on_ties_until_the_budget() -> None:
    """Coarse scores on few documents tie often: the search goes on, IPOP growing the
    population, and says so; the count survives a save and restore."""
    proposer = build_proposer({"kind": "cma", "popsize": 4}, D, ONE)
    done = run(proposer, 4 + 8 + 16 + 32 + 10, lambda x: [0.5])
    assert len(done) == 4 + 8 + 16 + 32 + 10 and not proposer.finished
    assert proposer.restarts_done == 4 and proposer.popsize == 64
    assert [(r["popsize"], r["reason"]) for r in proposer.runs] == [
        (4, "tie"),
        (8, "tie"),
        (16, "tie"),
        (32, "tie"),
    ]
    assert proposer.describe() == {
        "CMA-ES restarts": "4 (tie: all fitnesses equal)",
        "CMA-ES run": "5: population 64, 0 generations done",
    }
    restored = restore_proposer({"kind": "cma", "popsize": 4}, D, ONE, proposer.state_dict())
    assert restored.describe() == proposer.describe()
    capped = build_proposer({"kind": "cma", "popsize": 4, "restarts": 1}, D, ONE)
    run(capped, 100, lambda x: [0.5])
    assert capped.finished and capped.describe() == {
        "CMA-ES restarts": "1 of at most 1 (tie: all fitnesses equal)",
        "CMA-ES run": "finished: the last allowed run stopped (tie: all fitnesses equal)",
    }


def test_cma_state_saved_under_the_old_default_goes_on_restarting() -> None:
    """A study saved when ``restarts`` defaulted to 0, its one run ended by a tie: resumed
    with the default now (no limit), it restarts instead of staying finished."""
    old = build_proposer({"kind": "cma", "popsize": 4, "restarts": 0}, D, ONE)
    run(old, 10, lambda x: [0.5])
    assert old.finished
    resumed = restore_proposer({"kind": "cma", "popsize": 4}, D, ONE, old.state_dict())
    assert not resumed.finished and resumed.restarts_done == 1 and resumed.popsize == 8
    assert resumed.ask() is not None
    with pytest.raises(ConfigError, match="config"):  # an explicit cap still has to match
        restore_proposer({"kind": "cma", "popsize": 4, "restarts": 3}, D, ONE, old.state_dict())


def test_cma_restart_regimes() -> None:
    ipop = build_proposer({"kind": "cma", "popsize": 6}, D, ONE)
    assert [ipop.regime(k) for k in range(3)] == [(6, 0.25), (12, 0.25), (24, 0.25)]
    bipop = build_proposer(
        {"kind": "cma", "popsize": 6, "restart_strategy": "bipop", "restarts": 4}, D, ONE
    )
    assert bipop.regime(1) == (12, 0.25) and bipop.regime(3) == (24, 0.25)
    for k in (2, 4):
        popsize, sigma = bipop.regime(k)
        assert 2 <= popsize <= 6 * 2 ** (k // 2) and 0.25 / 100 <= sigma <= 0.25
    run(bipop, 400, lambda x: [1.0])
    assert bipop.finished and [r["popsize"] for r in bipop.runs] == [
        bipop.regime(k)[0] for k in range(5)
    ]


def test_cma_writes_no_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    proposer = build_proposer({"kind": "cma", "restarts": 1, "max_generations_per_run": 2}, D, ONE)
    run(proposer, 60)
    restore_proposer(proposer.config, D, ONE, proposer.state_dict())
    assert proposer.restarts_done == 1 and proposer.finished
    assert [r["reason"] for r in proposer.runs] == ["max_generations"] * 2
    assert list(tmp_path.iterdir()) == []


# -- save/restore -------------------------------------------------------------------------

RESTORE_CONFIGS = {
    "cma": {"kind": "cma", "seed": 5},
    "tpe": {"kind": "tpe", "seed": 5, "n_startup_trials": 6},
    "nsga2": {"kind": "nsga2", "seed": 5, "population_size": 6},
    "optuna-cmaes": {"kind": "optuna-cmaes", "seed": 5},
    "random": {"kind": "random", "seed": 5},
    "qmc": {"kind": "qmc", "seed": 5},
}


def prepare(kind: str) -> tuple[Proposer, list]:
    """12 evaluations (one failed), then 2 proposals left in flight."""
    proposer = build_proposer(RESTORE_CONFIGS[kind], D, TWO)
    run(proposer, 12, two_objectives, fails=lambda i, x: i == 4)
    in_flight = [proposer.ask(), proposer.ask()]
    assert all(p is not None for p in in_flight) and proposer.pending == [12, 13]
    return proposer, in_flight


def continue_run(proposer: Proposer, in_flight: list, consume_global_rng: bool) -> np.ndarray:
    """Tell the in-flight proposals (last first), then the next 10 genomes."""
    for p in reversed(in_flight):
        proposer.tell(p.id, two_objectives(p.genome))
    genomes = []
    for _ in range(10):
        if consume_global_rng:
            np.random.rand(7)
        p = proposer.ask()
        genomes.append(p.genome)
        proposer.tell(p.id, two_objectives(p.genome))
    return np.array(genomes)


@pytest.mark.parametrize(
    "kind",
    [
        "cma",
        "tpe",
        "nsga2",
        pytest.param("optuna-cmaes", marks=needs_cmaes),
        "random",
        "qmc",
    ],
)
def test_restore_is_exact(kind: str) -> None:
    original, in_flight = prepare(kind)
    restored = restore_proposer(RESTORE_CONFIGS[kind], D, TWO, original.state_dict())
    assert restored.pending == [12, 13] and restored.n_told == 11 and restored.n_failed == 1
    expected = continue_run(original, in_flight, consume_global_rng=False)
    got = continue_run(restored, in_flight, consume_global_rng=True)
    assert np.array_equal(expected, got)
    assert restored.n_told == original.n_told == 23


SUBPROCESS = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from evomerge.optimize import Objective, restore_proposer
    jobs = json.loads(sys.argv[1])
    objectives = [Objective(metric="f1"), Objective(metric="f2", direction="minimize")]
    out = {}
    for kind, job in jobs.items():
        with open(job["state"], "rb") as fh:
            proposer = restore_proposer(job["config"], job["dimension"], objectives, fh.read())
        for pid, values in job["in_flight"]:
            proposer.tell(pid, values)
        a, b = np.array(job["a"]), np.array(job["b"])
        genomes = []
        for _ in range(10):
            p = proposer.ask()
            genomes.append(p.genome.tolist())
            proposer.tell(p.id, [-float(np.sum((p.genome - a) ** 2)),
                                 float(np.sum((p.genome - b) ** 2))])
        out[kind] = genomes
    print(json.dumps(out))
    """
)


def test_restore_is_exact_across_processes(tmp_path: Path) -> None:
    jobs, expected = {}, {}
    for kind in ("cma", "tpe", "nsga2"):
        proposer, in_flight = prepare(kind)
        path = tmp_path / f"{kind}.state"
        path.write_bytes(proposer.state_dict())
        jobs[kind] = {
            "config": RESTORE_CONFIGS[kind],
            "dimension": D,
            "state": str(path),
            "in_flight": [(p.id, two_objectives(p.genome)) for p in reversed(in_flight)],
            "a": A.tolist(),
            "b": B.tolist(),
        }
        expected[kind] = continue_run(proposer, in_flight, consume_global_rng=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": "random"}
    result = subprocess.run(
        [sys.executable, "-c", SUBPROCESS, json.dumps(jobs)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout.strip().splitlines()[-1])
    for kind, genomes in expected.items():
        assert np.array_equal(np.array(got[kind]), genomes), kind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cma.state", "nsga2.state", "tpe.state"]


def test_cma_ignores_the_global_rng() -> None:
    a = build_proposer({"kind": "cma", "seed": 2}, D, ONE)
    b = build_proposer({"kind": "cma", "seed": 2}, D, ONE)
    np.random.seed(0)
    before = np.random.get_state()[1].copy()
    run(a, 30)
    assert np.array_equal(np.random.get_state()[1], before)  # not consumed either
    for _ in range(30):
        np.random.rand(3)
        p = b.ask()
        b.tell(p.id, [sphere(p.genome)])
    assert np.array_equal(a.best[0], b.best[0]) and a.best[1] == b.best[1]


def test_restore_checks_config_and_state() -> None:
    proposer, _ = prepare("cma")
    state = proposer.state_dict()
    with pytest.raises(ConfigError, match="config"):
        restore_proposer({"kind": "cma", "seed": 6}, D, TWO, state)
    with pytest.raises(ConfigError, match="dimension"):
        restore_proposer(RESTORE_CONFIGS["cma"], D + 1, TWO, state)
    with pytest.raises(ConfigError, match="kind"):
        restore_proposer({"kind": "random", "seed": 5}, D, TWO, state)
    with pytest.raises(ConfigError, match="unreadable"):
        restore_proposer(RESTORE_CONFIGS["cma"], D, TWO, b"not a pickle")


# -- bad input ----------------------------------------------------------------------------


def test_bad_configs() -> None:
    assert {"cma", "tpe", "nsga2", "optuna-cmaes", "gp", "random", "qmc"} <= set(
        available_proposers()
    )
    with pytest.raises(ConfigError, match=r"unknown proposer kind 'nope'.*cma.*tpe"):
        parse_proposer_config({"kind": "nope"})
    with pytest.raises(ConfigError, match="missing 'kind'"):
        parse_proposer_config({"seed": 1})
    with pytest.raises(ConfigError, match="sigma0"):
        parse_proposer_config({"kind": "cma", "sigma0": -0.1})
    with pytest.raises(ConfigError, match="popsiz"):
        parse_proposer_config({"kind": "cma", "popsiz": 8})
    with pytest.raises(ConfigError, match="x0"):
        parse_proposer_config({"kind": "cma", "x0": 1.5})
    with pytest.raises(ConfigError, match="population_size"):
        parse_proposer_config({"kind": "nsga2", "population_size": 1}, where="search.proposer")
    with pytest.raises(ConfigError, match="x0 has 3 values but genomes have 6 genes"):
        build_proposer({"kind": "cma", "x0": [0.1, 0.2, 0.3]}, D, ONE)
    with pytest.raises(ConfigError, match="dimension"):
        build_proposer({"kind": "tpe"}, 0, ONE)
    with pytest.raises(ConfigError, match="at least one objective"):
        build_proposer({"kind": "tpe"}, D, [])
    with pytest.raises(ConfigError, match=r"objectives\[0\]: direction"):
        build_proposer({"kind": "tpe"}, D, [{"metric": "m", "direction": "up"}])
    cma = build_proposer({"kind": "cma", "x0": [0.1] * D}, D, [{"metric": "m"}])
    assert isinstance(cma, CMAProposer) and np.allclose(cma._es.mean, 0.1)


@pytest.mark.parametrize("n_objectives", [1, 2, 3, 4])
def test_pareto_front_equals_the_definition_on_random_points_with_ties(n_objectives) -> None:
    """Oracle: a point is kept iff no point dominates it and no earlier point equals it."""
    rng = np.random.default_rng(n_objectives)
    directions = ["maximize", "minimize"] * 2
    objs = [Objective(metric=f"m{k}", direction=directions[k]) for k in range(n_objectives)]
    for _ in range(20):
        n = int(rng.integers(0, 60))
        points = rng.integers(0, 6, size=(n, n_objectives)).astype(float).tolist()  # many ties
        expected = [
            i
            for i, p in enumerate(points)
            if not any(dominates(q, p, objs) for q in points) and p not in points[:i]
        ]
        assert pareto_front(points, objs) == expected


# -- asking ahead at a generation boundary --------------------------------------------------


def test_cma_asks_ahead_and_updates_from_the_first_popsize_results() -> None:
    """With ask_ahead 2 and popsize 4: six genomes go out, the seventh ask waits; the update
    uses the first four results to arrive (one of them asked ahead), exactly as pycma told
    those four by hand; the late results are dropped without error."""
    import copy

    proposer = build_proposer({"kind": "cma", "popsize": 4, "ask_ahead": 2, "seed": 5}, D, ONE)
    out = [proposer.ask() for _ in range(6)]
    assert all(p is not None for p in out) and proposer.ask() is None
    assert len({p.genome.tobytes() for p in out}) == 6
    before = copy.deepcopy(proposer._es)  # the distribution before the update
    arrival = [out[4], out[1], out[0], out[3]]  # an extra first; out[2] and out[5] are late
    for p in arrival:
        proposer.tell(p.id, [sphere(p.genome)])
    assert proposer.generation == 1
    handed = sorted(arrival, key=lambda p: p.id)  # told in the order handed out
    before.tell([p.genome for p in handed], [-sphere(p.genome) for p in handed])
    np.testing.assert_array_equal(proposer._es.mean, before.mean)
    for p in (out[2], out[5]):  # late: recorded by the study, not told to CMA-ES
        proposer.tell(p.id, [sphere(p.genome)])
    assert proposer.generation == 1 and proposer.pending == []
    assert proposer.ask() is not None  # the next generation


def test_cma_ask_ahead_resumes_exactly_and_zero_waits() -> None:
    from evomerge.optimize import restore_proposer

    settings = {"kind": "cma", "popsize": 4, "ask_ahead": 3, "seed": 2}
    proposer = build_proposer(settings, D, ONE)
    out = [proposer.ask() for _ in range(6)]
    for p in out[:3]:
        proposer.tell(p.id, [sphere(p.genome)])
    restored = restore_proposer(settings, D, ONE, proposer.state_dict())
    assert restored.pending == proposer.pending == [3, 4, 5]
    for p in out[3:5]:  # completes the generation on both; out[5] arrives late
        proposer.tell(p.id, [sphere(p.genome)])
        restored.tell(p.id, [sphere(p.genome)])
    for a, b in zip(run(proposer, 12), run(restored, 12), strict=True):
        np.testing.assert_array_equal(a[0], b[0])
    waiting = build_proposer({"kind": "cma", "popsize": 4, "seed": 2}, D, ONE)
    assert [waiting.ask() is None for _ in range(5)] == [False] * 4 + [True]


def test_cma_ask_ahead_drops_late_results_of_a_sampled_again_generation() -> None:
    proposer = build_proposer({"kind": "cma", "popsize": 2, "ask_ahead": 1, "seed": 1}, D, ONE)
    out = [proposer.ask() for _ in range(3)]
    proposer.tell_failed(out[0].id)
    proposer.tell_failed(out[1].id)  # the first two all failed: sampled again
    again = proposer.ask()
    assert again is not None and proposer.generation == 0
    proposer.tell(out[2].id, [1.0])  # late, of the discarded sample: not counted
    assert proposer.generation == 0 and proposer.pending == [again.id]
