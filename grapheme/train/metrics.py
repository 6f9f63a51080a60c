"""What a training epoch and an evaluation report.

The names and the maths live here; an epoch's record is put together by
``Trainer._run_epoch`` (training metrics) and ``Trainer._val_record`` (the
``val_*`` ones, from :meth:`~grapheme.Trainer.evaluate`). A new metric
shows where it is listed: ``progress.LINE_KEYS`` (the line per epoch),
``cli.TABLE_KEYS`` (``grapheme train``'s and ``eval``'s tables, which show
validation metrics only) and ``plot._PANELS`` (``grapheme plot``). It is
also named by hand in the README's "What a run records" table, in
:meth:`~grapheme.Trainer.fit`'s Returns and in the key set of
``tests/test_train.py``'s record test. Records written before a key
existed lack it (a resumed run's first epochs): read new keys with
``.get``.
"""
import numpy as np

from .._validation import as_decisions

__all__ = ["TIMING_KEYS", "LOSS_KEYS", "SEGMENTATION_KEYS", "structure_match", "graph_of",
           "segmentation_counts", "segmentation_scores", "upgrade_record"]

#: Keys of an epoch record that measure time, hence differ between runs.
TIMING_KEYS = ("time", "examples_per_s", "chars_per_s")

#: The loss and its terms, averaged over pairs.
LOSS_KEYS = ("loss", "node", "edge", "clique")

#: What :func:`segmentation_counts` returns, in this order (the order
#: data-parallel validation all-reduces them).
SEGMENTATION_COUNTS = ("examples", "exact", "true_positive", "predicted", "gold")

#: What :func:`segmentation_scores` reports.
SEGMENTATION_KEYS = ("seg_accuracy", "boundary_precision", "boundary_recall", "boundary_f1")


def upgrade_record(record):
    """A metrics record with the names of today: ``merge_rate`` (the fraction
    of nodes merged away, in older logs and checkpoints) becomes ``kept_fraction = 1 -
    merge_rate``, ``val_merge_rate`` likewise. A new dict; others pass as they are
    (keys added since are not filled in: an old record lacks them).

    Examples
    --------
    >>> upgrade_record({"epoch": 1, "merge_rate": 0.25, "val_merge_rate": 0.5})
    {'epoch': 1, 'kept_fraction': 0.75, 'val_kept_fraction': 0.5}
    """
    out = {}
    for key, value in record.items():
        if key in ("merge_rate", "val_merge_rate") and isinstance(value, (int, float)):
            out[key.replace("merge_rate", "kept_fraction")] = 1.0 - value
        else:
            out[key] = value
    return out


def graph_of(offsets, nodes):
    """Graph index of each node of a batch with node ``offsets``."""
    return np.searchsorted(offsets, nodes, side="right") - 1


def structure_match(g, history, target):
    """Per pair: the hard morph has the target's node count and labels.

    The prediction is read from the merge history (the heads' labels), so it
    is the hard structure for every estimator. O(n + m), no Python loop.
    """
    B = g.num_graphs
    heads = history.heads
    pred_counts = np.bincount(graph_of(g.graph_offsets, heads), minlength=B)
    tgt_counts = np.diff(target.graph_offsets)
    same = pred_counts == tgt_counts
    pred_sel = np.repeat(same, pred_counts)
    tgt_sel = np.repeat(same, tgt_counts)
    differ = g.labels[heads][pred_sel] != target.labels[tgt_sel]
    owner = np.repeat(np.arange(B), tgt_counts)[tgt_sel]
    wrong = np.bincount(owner[differ], minlength=B)
    return same & (wrong == 0)


def _as_lengths(value, name):
    arr = np.asarray(value)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise TypeError(f"{name} must be a 1-d array of integers, got "
                        f"{arr.dtype} of shape {arr.shape}")
    return arr.astype(np.intp, copy=False)


def segmentation_counts(history, offsets, lengths, counts, select=None, joined=None):
    """Boundary and exact-segmentation counts of a predicted segmentation.

    A *boundary* is a position ``i > 0`` of an example (a character) where
    a new segment starts. The predicted boundaries are read from the hard
    merge history: input ``i`` starts a segment when its output differs from
    that of input ``i - 1`` (for a morph of a chain these are exactly the
    heads). The gold ones come from segment lengths. Vectorised, O(n + m)
    for ``n`` characters and ``m`` gold segments, no Python loop.

    Parameters
    ----------
    history : MergeHistory
        The hard morph of a batch of chains, as ``Morpher.predict`` gives it.
    offsets : array_like of int, shape (B + 1,)
        The batch's ``graph_offsets``.
    lengths : array_like of int, shape (m,)
        Gold segment lengths (each >= 1) of the selected examples, in order,
        concatenated.
    counts : array_like of int, shape (n_selected,)
        Number of gold segments of each selected example.
    select : array_like of bool, shape (B,), optional
        Which examples have a gold segmentation (default: all). Others are
        ignored.
    joined : array_like of bool, shape (n,), optional
        Characters where no segment starts whatever the merge says, as a
        :class:`~grapheme.Segmenter` segments: those that continue a written
        character (:func:`grapheme.data.continues_cluster` of the code
        points), so that these counts are of the segments it prints.

    Returns
    -------
    dict
        ``examples`` (selected), ``exact`` (of them, segmented exactly as the
        gold), ``true_positive``, ``predicted`` and ``gold`` (boundary counts):
        all ints, so counts of several batches add up before
        :func:`segmentation_scores`.

    Raises
    ------
    ValueError
        If ``lengths`` holds a length < 1, or the gold lengths of an example
        do not add up to its number of characters.

    Examples
    --------
    >>> from grapheme import MergeHistory
    >>> h = MergeHistory([0, 0, 0, 1, 1, 2, 2, 2])      # the|qu|ick
    >>> c = segmentation_counts(h, [0, 8], [3, 5], [2])  # the|quick
    >>> c["exact"], c["true_positive"], c["predicted"], c["gold"]
    (0, 1, 2, 1)
    """
    offsets = _as_lengths(offsets, "offsets")
    lengths = _as_lengths(lengths, "lengths")
    counts = _as_lengths(counts, "counts")
    cluster = np.asarray(history.cluster)
    n = cluster.shape[0]
    B = offsets.shape[0] - 1
    if B < 0 or offsets[0] != 0 or offsets[-1] != n or np.any(offsets[1:] < offsets[:-1]):
        raise ValueError(f"offsets must rise from 0 to the history's {n} inputs")
    sizes = np.diff(offsets)
    select = (np.ones(B, dtype=bool) if select is None
              else np.asarray(select, dtype=bool).reshape(-1))
    if select.shape[0] != B:
        raise ValueError(f"select has {select.shape[0]} entries for {B} examples")
    chosen = np.flatnonzero(select)
    if counts.shape[0] != chosen.shape[0]:
        raise ValueError(f"counts has {counts.shape[0]} entries for {chosen.shape[0]} "
                         "selected examples")
    # each at most the number of lengths first: then the sum cannot wrap
    if np.any(counts < 0) or np.any(counts > lengths.shape[0]) or (
            int(counts.sum()) != lengths.shape[0]):
        raise ValueError(f"counts must be non-negative and add up to the "
                         f"{lengths.shape[0]} lengths")
    if lengths.size and lengths.min() < 1:
        raise ValueError(f"lengths must be >= 1, got {int(lengths.min())}")
    seg_owner = np.repeat(chosen, counts)
    totals = np.bincount(seg_owner, weights=lengths, minlength=B)[chosen]
    if not np.array_equal(totals, sizes[chosen]):
        bad = int(chosen[np.flatnonzero(totals != sizes[chosen])[0]])
        raise ValueError(f"lengths of example {bad} add up to "
                         f"{int(np.bincount(seg_owner, weights=lengths, minlength=B)[bad])}"
                         f", its input has {int(sizes[bad])} characters")
    # gold starts: offset of the example + exclusive cumulative length within it
    ends = np.cumsum(lengths)
    first = np.cumsum(counts) - counts   # index of each example's first segment
    base = np.concatenate(([0], ends))[first]
    starts = offsets[seg_owner] + (ends - lengths) - np.repeat(base, counts)
    gold = np.zeros(n, dtype=bool)
    gold[starts] = True
    pred = np.zeros(n, dtype=bool)
    pred[1:] = cluster[1:] != cluster[:-1]
    if joined is not None:
        pred &= ~as_decisions(joined, "joined", (n,))
    owner = graph_of(offsets, np.arange(n))
    inside = select[owner]
    first_pos = offsets[:-1][sizes > 0]
    gold[first_pos] = False
    pred[first_pos] = False
    pred &= inside
    wrong = np.bincount(owner[gold != pred], minlength=B)
    return {"examples": int(chosen.shape[0]),
            "exact": int(np.count_nonzero(wrong[chosen] == 0)),
            "true_positive": int(np.count_nonzero(gold & pred)),
            "predicted": int(np.count_nonzero(pred)),
            "gold": int(np.count_nonzero(gold))}


def segmentation_scores(counts):
    """Exact-segmentation accuracy and boundary precision, recall and F1.

    Parameters
    ----------
    counts : dict
        As :func:`segmentation_counts` returns (or their sums over batches).

    Returns
    -------
    dict
        ``seg_accuracy`` (fraction of examples segmented exactly as the
        gold), ``boundary_precision`` (true / predicted boundaries),
        ``boundary_recall`` (true / gold boundaries) and ``boundary_f1``
        (their harmonic mean), micro-averaged over all boundaries. A ratio
        with nothing to count is 1 (no boundary predicted: none is wrong;
        none in the gold: none is missed); F1 is 0 when both are 0.
        ``seg_accuracy`` is NaN when there are no examples.

    Examples
    --------
    >>> s = segmentation_scores({"examples": 2, "exact": 1, "true_positive": 3,
    ...                          "predicted": 4, "gold": 6})
    >>> [round(s[k], 4) for k in SEGMENTATION_KEYS]
    [0.5, 0.75, 0.5, 0.6]
    """
    tp, pred, gold = counts["true_positive"], counts["predicted"], counts["gold"]
    p = tp / pred if pred else 1.0
    r = tp / gold if gold else 1.0
    return {"seg_accuracy": counts["exact"] / counts["examples"] if counts["examples"]
            else float("nan"),
            "boundary_precision": p, "boundary_recall": r,
            "boundary_f1": 2 * p * r / (p + r) if p + r > 0 else 0.0}
