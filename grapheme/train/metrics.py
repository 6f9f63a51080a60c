"""What a training epoch and an evaluation report."""
import numpy as np

__all__ = ["TIMING_KEYS", "LOSS_KEYS", "structure_match", "graph_of"]

#: Keys of an epoch record that measure time, hence differ between runs.
TIMING_KEYS = ("time", "examples_per_s", "chars_per_s")

#: The loss and its terms, averaged over pairs.
LOSS_KEYS = ("loss", "node", "edge", "clique")


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
