"""Anchor documents: hand-computed clusters and weights, exactness, and refusals."""

from __future__ import annotations

import numpy as np
import pytest

from evomerge.errors import EvaluationError
from evomerge.evaluate.anchors import select_anchors


def test_two_separated_groups_give_one_anchor_each_weighted_by_size():
    # 10 documents every reference candidate gets right, 30 none does
    reference = np.hstack([np.ones((4, 10)), np.zeros((4, 30))])
    anchors = select_anchors(reference, 2, index=np.arange(100, 140))
    assert len(anchors.index) == 2
    assert 100 <= anchors.index[0] < 110 <= 130 > anchors.index[1] >= 110
    np.testing.assert_allclose(anchors.weight, [0.25, 0.75])
    # a new candidate that gets the first group right and the second wrong: 10/40
    values = np.r_[np.ones(10), np.zeros(30)]
    assert anchors.estimate_from(np.arange(100, 140), values) == pytest.approx(0.25)


def test_estimate_is_exact_when_every_distinct_column_is_a_cluster():
    rng = np.random.default_rng(3)
    patterns = rng.random((6, 7))  # 7 distinct document profiles over 6 reference candidates
    columns = rng.integers(0, 7, 200)  # 200 documents, each one of the profiles
    reference = patterns[:, columns]
    anchors = select_anchors(reference, 50, seed=1)
    assert len(anchors.index) == 7  # no more clusters than distinct columns
    assert anchors.weight.sum() == pytest.approx(1.0)
    candidate = rng.random(7)[columns]  # scores alike on alike documents
    assert anchors.estimate_from(np.arange(200), candidate) == pytest.approx(candidate.mean())


def test_every_document_its_own_anchor_is_the_full_mean():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(5, 30))
    anchors = select_anchors(reference, 30)
    assert anchors.index.tolist() == list(range(30))
    np.testing.assert_allclose(anchors.weight, np.full(30, 1 / 30))
    values = rng.random(30)
    assert anchors.estimate(values) == pytest.approx(values.mean())


def test_anchors_are_distinct_sorted_members_and_seeded():
    rng = np.random.default_rng(5)
    reference = (rng.random((8, 300)) < rng.random(300)).astype(float)
    first = select_anchors(reference, 20, seed=4, index=np.arange(1000, 1300))
    again = select_anchors(reference, 20, seed=4, index=np.arange(1000, 1300))
    assert np.array_equal(first.index, again.index) and np.array_equal(first.weight, again.weight)
    assert len(set(first.index.tolist())) == len(first.index) <= 20
    assert np.all(np.diff(first.index) > 0) and np.all((first.index >= 1000) & (first.index < 1300))
    assert first.weight.sum() == pytest.approx(1.0) and np.all(first.weight > 0)


@pytest.mark.parametrize(
    ("reference", "count", "message"),
    [
        (np.ones(5), 2, "candidates x documents"),
        (np.full((2, 3), np.nan), 2, "NaN or infinite"),
        (np.ones((2, 3)), 0, "count must be at least 1"),
    ],
)
def test_bad_reference_is_refused(reference, count, message):  # type: ignore[no-untyped-def]
    with pytest.raises(EvaluationError, match=message):
        select_anchors(reference, count)


def test_missing_anchor_result_is_named():
    anchors = select_anchors(np.eye(3), 3, index=[7, 8, 9])
    with pytest.raises(EvaluationError, match="no result for anchor document 9"):
        anchors.estimate_from(np.asarray([7, 8]), np.asarray([1.0, 0.0]))
    with pytest.raises(EvaluationError, match="2 values for 3 anchor documents"):
        anchors.estimate([1.0, 0.0])
