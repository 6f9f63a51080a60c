"""Segmentation metrics (grapheme.train.metrics) against a plain-Python reference."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from grapheme import MergeHistory
from grapheme.train.metrics import (SEGMENTATION_COUNTS, SEGMENTATION_KEYS, segmentation_counts,
                                    segmentation_scores)


def boundaries(lengths):
    """Positions > 0 where a segment starts, from segment lengths."""
    out, pos = set(), 0
    for k in lengths[:-1]:
        pos += k
        out.add(pos)
    return out


def reference(pred, gold, select):
    """Plain Python: per example, sets of boundaries; micro-averaged scores."""
    tp = npred = ngold = exact = examples = 0
    for p, g, s in zip(pred, gold, select):
        if not s:
            continue
        bp, bg = boundaries(p), boundaries(g)
        examples += 1
        exact += bp == bg
        tp += len(bp & bg)
        npred += len(bp)
        ngold += len(bg)
    P = tp / npred if npred else 1.0
    R = tp / ngold if ngold else 1.0
    F = 2 * P * R / (P + R) if P + R else 0.0
    return {"examples": examples, "exact": exact, "true_positive": tp, "predicted": npred,
            "gold": ngold}, [exact / examples if examples else float("nan"), P, R, F]


def history_of(segmentations):
    """The merge history of a batch whose examples are cut as ``segmentations``."""
    cluster, k = [], 0
    for lengths in segmentations:
        for length in lengths:
            cluster += [k] * length
            k += 1
    return MergeHistory(np.array(cluster, dtype=np.intp), num_outputs=k)


def compositions(n):
    """A random segmentation (list of lengths >= 1) of ``n`` characters."""
    if n == 0:
        return st.just([])
    return st.lists(st.booleans(), min_size=n - 1, max_size=n - 1).map(
        lambda cuts: np.diff([0] + [i + 1 for i, c in enumerate(cuts) if c] + [n]).tolist())


@st.composite
def batches(draw):
    sizes = draw(st.lists(st.integers(0, 9), min_size=1, max_size=6))
    pred = [draw(compositions(n)) for n in sizes]
    # gold: often equal to the prediction, so exact matches are exercised
    gold = [p if draw(st.booleans()) else draw(compositions(n)) for p, n in zip(pred, sizes)]
    select = draw(st.lists(st.booleans(), min_size=len(sizes), max_size=len(sizes)))
    return sizes, pred, gold, select


@given(batches())
def test_segmentation_metrics_match_reference(batch):
    sizes, pred, gold, select = batch
    offsets = np.concatenate(([0], np.cumsum(sizes))).astype(np.intp)
    chosen = [g for g, s in zip(gold, select) if s]
    lengths = np.array([k for g in chosen for k in g], dtype=np.intp)
    counts = np.array([len(g) for g in chosen], dtype=np.intp)
    got = segmentation_counts(history_of(pred), offsets, lengths, counts, select=select)
    want_counts, want_scores = reference(pred, gold, select)
    assert got == want_counts
    scores = segmentation_scores(got)
    np.testing.assert_allclose([scores[k] for k in SEGMENTATION_KEYS], want_scores,
                               rtol=0, atol=1e-15)


def test_segmentation_numbers():
    # "thequickfox": gold the|quick|fox; predicted the|qu|ickfox
    h = history_of([[3, 2, 6]])
    c = segmentation_counts(h, [0, 11], [3, 5, 3], [3])
    assert c == {"examples": 1, "exact": 0, "true_positive": 1, "predicted": 2, "gold": 2}
    assert tuple(c) == SEGMENTATION_COUNTS   # the order validation all-reduces
    s = segmentation_scores(c)
    assert (s["seg_accuracy"], s["boundary_precision"], s["boundary_recall"],
            s["boundary_f1"]) == (0.0, 0.5, 0.5, 0.5)
    # no merge at all: every position is a boundary
    s = segmentation_scores(segmentation_counts(history_of([[1] * 11]), [0, 11],
                                                [3, 5, 3], [3]))
    assert s["boundary_precision"] == 2 / 10 and s["boundary_recall"] == 1.0
    assert s["boundary_f1"] == pytest.approx(2 * 0.2 / 1.2, rel=1e-15)
    # everything merged: nothing predicted (precision 1 by convention), recall 0
    s = segmentation_scores(segmentation_counts(history_of([[11]]), [0, 11], [3, 5, 3], [3]))
    assert (s["boundary_precision"], s["boundary_recall"], s["boundary_f1"]) == (1.0, 0.0, 0.0)


def test_segmentation_counts_bad_input():
    h = history_of([[2, 1]])
    with pytest.raises(ValueError, match="lengths of example 0 add up to 4, its input has 3"):
        segmentation_counts(h, [0, 3], [2, 2], [2])
    with pytest.raises(ValueError, match="lengths must be >= 1"):
        segmentation_counts(h, [0, 3], [3, 0], [2])
    with pytest.raises(ValueError, match="counts has 2 entries for 1 selected"):
        segmentation_counts(h, [0, 3], [3], [1, 0])
    with pytest.raises(ValueError, match="offsets must rise from 0 to the history's 3"):
        segmentation_counts(h, [0, 4], [4], [1])
    with pytest.raises(TypeError, match="lengths must be a 1-d array of integers"):
        segmentation_counts(h, [0, 3], [1.5, 1.5], [2])
