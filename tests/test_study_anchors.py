"""The estimated fidelity (``fidelity: {anchors: N}``) in a study: the driver in this process
against a real database and a real merge worker; oracles are hand computations and the
per-document results the database holds."""

from __future__ import annotations

import numpy as np
import pytest

from evomerge.errors import ConfigError, EvaluationError
from evomerge.evaluate.documents import TaskDocuments, decode
from evomerge.study import StudyStore
from evomerge.study.anchored import AnchorFidelity
from evomerge.study.driver import StudyDriver
from evomerge.study.status import study_status
from tests.study_helpers import TOY_METRICS, drive, study_config


def _documents(values: list[float], margins: list[float] | None = None) -> TaskDocuments:
    return TaskDocuments(
        index=np.arange(len(values), dtype=np.int32),
        values={"acc": np.asarray(values, dtype=np.float32)},
        margin=None if margins is None else np.asarray(margins, dtype=np.float32),
    )


def test_anchor_fidelity_estimates_by_hand():
    fidelity = AnchorFidelity(2)
    # documents 0-2 behave alike (right for both references), documents 3-5 alike (wrong)
    fidelity.add_reference({"t": _documents([1, 1, 1, 0, 0, 0], [5, 5, 4, -5, -5, -4])})
    assert not fidelity.ready  # one fully scored trial is not enough
    fidelity.refresh()
    assert not fidelity.ready
    fidelity.add_reference({"t": _documents([1, 1, 1, 0, 0, 0], [6, 6, 5, -6, -6, -5])})
    fidelity.refresh()
    chosen = fidelity.documents()["t"]
    assert len(chosen) == 2 and chosen[0] in (0, 1, 2) and chosen[1] in (3, 4, 5)
    # a cheap trial right on the first anchor only: each anchor stands for 3 of 6 documents
    scored = TaskDocuments(
        index=np.asarray(chosen, dtype=np.int32),
        values={"acc": np.asarray([1.0, 0.0], dtype=np.float32)},
    )
    assert fidelity.estimate({"t": scored}) == {"t/acc": pytest.approx(0.5)}
    assert fidelity.name == "anchors=2"
    # re-chosen while the trial ran: it is estimated by the anchors it was scored on
    scored_on = fidelity.anchors
    fidelity.add_reference({"t": _documents([1, 0, 0, 0, 0, 0], [30, -30, -30, -30, -30, 30])})
    fidelity.refresh()
    assert fidelity.documents()["t"] != chosen
    assert fidelity.estimate({"t": scored}, scored_on) == {"t/acc": pytest.approx(0.5)}
    with pytest.raises(EvaluationError, match="no result for anchor document"):
        fidelity.estimate({"t": scored})


def test_limit_and_anchors_are_one_or_the_other(toy_zoo, tmp_path):
    storage = str(tmp_path / "s.db")
    with pytest.raises(ConfigError, match=r"give 'limit' .* or 'anchors'"):
        study_config(toy_zoo, storage, fidelity={"limit": 5, "anchors": 5})
    with pytest.raises(ConfigError, match=r"give 'limit' .* or 'anchors'"):
        study_config(toy_zoo, storage, fidelity={"promote": 0.5})
    evaluators = [
        {"kind": "lm_eval", "tasks": ["toy_facts_a", "toy_facts_b"]},
        {"kind": "python", "function": "nap.py:nap"},
    ]
    (tmp_path / "nap.py").write_text("def nap(model, tokenizer):\n    return {'x': 1.0}\n")
    with pytest.raises(ConfigError, match=r"evaluators\[1\] is 'python'"):
        study_config(toy_zoo, storage, fidelity={"anchors": 5}, evaluators=evaluators).model_dump()


def test_a_study_scores_proposals_on_anchors_and_promotes_on_all(toy_zoo, worker, tmp_path):
    storage = str(tmp_path / "s.db")
    store = StudyStore(storage)
    config = study_config(
        toy_zoo,
        storage,
        budget=14,
        proposer={"kind": "cma", "seed": 0, "popsize": 5},
        fidelity={"anchors": 8, "promote": 0.4, "batch": 5},
    )
    driver = StudyDriver(store, config)
    driver.begin()
    drive(driver, worker, workers=1)
    trials = {t.number: t for t in store.trials("toy")}
    full_documents = store.documents("toy", "full")
    cheap_documents = store.documents("toy", "anchors=8")
    baselines = [t for t in trials.values() if t.role != "proposal"]
    proposals = [t for t in trials.values() if t.role == "proposal"]
    assert baselines and all(t.number in full_documents for t in baselines)
    # one worker: every proposal comes after the baselines, so all are scored on the anchors
    assert len(proposals) == 14 - len(baselines)
    assert all("anchors=8" in t.scores for t in proposals)
    searched = 60  # toy_facts_a and _b have 60 documents each, no holdout
    for proposal in proposals:
        documents = decode(cheap_documents[proposal.number])
        for task in ("toy_facts_a", "toy_facts_b"):
            scored = documents[task]
            assert 1 <= len(scored.index) <= 8
            estimate = proposal.scores["anchors=8"][f"{task}/acc"]
            # a weighted mean of 0/1 results with weights (cluster size) / 60: a whole number
            # of documents, between the anchors that were right and all but the wrong ones
            assert estimate * searched == pytest.approx(round(estimate * searched), abs=1e-6)
            right = int(scored.value_of("acc").sum())
            wrong = len(scored.index) - right
            assert right / searched - 1e-9 <= estimate <= 1 - wrong / searched + 1e-9
    promoted = [t for t in proposals if t.metrics]
    assert promoted and all(t.number in full_documents for t in promoted)
    for trial in promoted:
        full = decode(full_documents[trial.number])
        for task in ("toy_facts_a", "toy_facts_b"):
            assert len(full[task].index) == searched
            assert trial.metrics[f"{task}/acc"] == pytest.approx(
                float(full[task].value_of("acc").mean())
            )
    # the anchors the driver ended with are the ones a resumed driver rebuilds from the database
    rebuilt = AnchorFidelity(8)
    for data in full_documents.values():
        rebuilt.add_reference(decode(data))
    rebuilt.refresh()
    assert rebuilt.documents() == driver.anchored.documents()
    assert len(driver.anchored.reference) == len(full_documents) == len(baselines) + len(promoted)
    status = study_status(store, "toy")
    assert status["fidelities"]["counts"]["anchors=8"] == len(proposals)
    assert set(TOY_METRICS) <= set(proposals[0].scores["anchors=8"])


def test_per_document_results_round_trip_through_the_database(url):  # type: ignore[no-untyped-def]
    """SQLite and PostgreSQL: bytes kept per trial and fidelity; a re-score replaces them."""
    from evomerge.evaluate.documents import encode

    store = StudyStore(url)
    store.create_study("docs", {}, budget=3)
    cheap = {"t": _documents([1, 0, 1], [2.5, -1.0, 0.5])}
    full = {"t": _documents([1, 0, 1, 1, 0], [2.5, -1.0, 0.5, 3.0, -2.0])}
    for number in (0, 1):
        store.add_trial("docs", number, role="proposal", label=f"p{number}")
    store.finish_trial(
        "docs",
        0,
        state="COMPLETE",
        metrics={"t/acc": 0.6},
        fidelity=("anchors=3", 3.0),
        documents=encode(cheap),
    )
    store.finish_trial("docs", 1, state="COMPLETE", metrics={"t/acc": 0.6}, documents=encode(full))
    store.add_metrics("docs", 0, {"t/acc": 0.6}, None, documents=encode(full))
    store.add_metrics("docs", 0, {"t/acc": 0.6}, None, documents=encode(full))  # again: replaced
    assert sorted(store.documents("docs", "full")) == [0, 1]
    assert list(store.documents("docs", "anchors=3")) == [0]
    back = decode(store.documents("docs", "anchors=3")[0])["t"]
    assert back.index.tolist() == [0, 1, 2] and back.value_of("acc").tolist() == [1, 0, 1]
    assert decode(store.documents("docs", "full")[0])["t"].index.tolist() == [0, 1, 2, 3, 4]
    trial = store.trials("docs")[0]
    assert set(trial.scores) == {"anchors=3", "full"}


def test_verifying_an_export_of_an_estimated_score_is_refused_with_the_reason():
    from evomerge.study.export import fidelity_limit

    assert fidelity_limit("limit=20") == 20 and fidelity_limit("full") is None
    with pytest.raises(ConfigError, match=r"only an estimated score \(anchors=8"):
        fidelity_limit("anchors=8")


def test_a_resumed_study_rebuilds_the_anchors_from_the_database(toy_zoo, worker, tmp_path):
    from tests.test_study_resume import _crash

    storage = str(tmp_path / "s.db")
    store = StudyStore(storage)
    config = study_config(
        toy_zoo,
        storage,
        budget=16,
        proposer={"kind": "cma", "seed": 3, "popsize": 4},
        fidelity={"anchors": 6, "promote": 0.34, "batch": 3},
    )
    first = StudyDriver(store, config)
    first.begin()
    drive(first, worker, stop_after=10)
    assert first.anchored.ready and len(first.anchored.reference) > len(first.queue)
    anchors_at_crash = first.anchored.documents()
    _crash(first)

    second = StudyDriver.for_stored(StudyStore(storage), "toy")
    assert second.anchored.documents() == anchors_at_crash
    assert len(second.anchored.reference) == len(store.documents("toy", "full"))
    second.begin()
    drive(second, worker)
    trials = store.trials("toy")
    assert len(trials) == 16 and {t.state for t in trials} == {"COMPLETE"}
    cheap = store.documents("toy", "anchors=6")
    assert {t.number for t in trials if "anchors=6" in t.scores} == set(cheap)
    assert any(number >= 10 for number in cheap)  # proposals after the resume used anchors
