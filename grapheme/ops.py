"""Differentiable operations, all of one shape.

Every step of a grapheme model that gradients pass through is an
:class:`Operation`:

- ``forward(...) -> (result, saved)``: ``result`` is a named tuple holding the
  outputs (and, where the step has them, non-differentiable companions such
  as the merged graph or the merge history); ``saved`` is what the
  vector-Jacobian product needs, and nothing else.
- ``vjp(saved, *grads) -> tuple``: takes the upstream gradient of *every*
  differentiable output (in the order of ``outputs``; ``None`` means zero)
  and returns the gradient of *every* differentiable input (in the order of
  ``inputs``).

A vjp is pure: it reads only ``saved`` and its arguments, returns fresh
arrays (or the caller's ``out=`` buffers, where it takes them), changes no
state and gives the same result however often it is called. Parameters
are inputs like any other: the vjp of :class:`Lookup` returns the gradient
of the table, that of :class:`MergeScores` the gradient of ``theta``;
where they accumulate is the caller's choice. This is the
contract of ``torch.autograd.Function`` and of JAX's ``custom_vjp``, so
:mod:`grapheme.torch` wraps each operation without glue.

Every vjp is checked against central finite differences in float64
(``tests/test_ops.py``).

``forward`` checks its inputs. Where an operation also has ``_forward``,
that takes inputs its caller has already checked (the same arrays are not
scanned for NaN again): the ``Trainer``'s step and the composed operations
call it on what they made or checked themselves.

dtypes: the (n, d) feature arrays (and tables, weights and gradients of
their shape) follow the features' dtype, float32 or float64 (a model's
``dtype``, see "float32" in docs/design.md); every per-node and per-edge
scalar (similarities, logits, probabilities, masses, activations, edge
weights) is float64 whatever the features are.
"""
from typing import NamedTuple, Optional

import numpy as np

from . import _core, _products, _relax
from ._threads import one_pool
from ._workspace import check_workspace
from ._validation import (KEEP, as_decisions, as_float_array, as_index_array, check_allocation,
                          check_count, check_graph, check_out, check_scalar, frozen)
from .graph import Graph, _check_decisions, chain_sources, contract_edges, merge_edges
from .history import MergeHistory

__all__ = [
    "Operation",
    "Lookup",
    "FeatureMean",
    "EdgeSimilarity",
    "MergeScores",
    "HardMerge",
    "ChainRelaxation",
    "BernoulliLogProb",
    "RatePenalty",
    "StructuralLossOp",
    "MessagePassing",
    "LookupMessagePassing",
    "Linear",
    "RoutedSimilarity",
    "sigmoid",
]


def sigmoid(x):
    """Numerically stable logistic function, elementwise (float64)."""
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def sigmoid_slope(x):
    """``sigmoid(x) (1 - sigmoid(x))``, elementwise (float64), without the
    cancellation of ``1 - p`` as p nears 1 (1e-3 relative at x = 30, 0
    from x = 36.7: a numerical review's find); symmetric in x."""
    e = np.exp(-np.abs(np.asarray(x, dtype=np.float64)))
    return e / ((1.0 + e) * (1.0 + e))


class Operation:
    """A differentiable step: ``forward -> (result, saved)``, ``vjp(saved, *grads)``.

    Attributes
    ----------
    inputs : tuple of str
        Names of the differentiable inputs; ``vjp`` returns one gradient
        for each, in this order.
    outputs : tuple of str
        Names of the differentiable outputs (fields of ``result``); ``vjp``
        takes one upstream gradient for each, in this order.
    """

    inputs = ()
    outputs = ()

    def forward(self, *args):  # pragma: no cover - abstract
        raise NotImplementedError

    def vjp(self, saved, *grads):  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}()"


# ---------------------------------------------------------------------------
class LookupResult(NamedTuple):
    features: np.ndarray


class Lookup(Operation):
    """Rows of a table: ``features = table[rows]``. O(n d).

    The vjp returns the dense gradient of the table, ``grad[rows[i]] +=
    g[i]`` (accumulated in the compiled core, never with a Python loop).
    The table may be 1-d (one number per row).

    Examples
    --------
    >>> table = np.arange(6.0).reshape(3, 2)
    >>> (h,), saved = Lookup().forward(table, np.array([2, 0, 2]))
    >>> h.tolist()
    [[4.0, 5.0], [0.0, 1.0], [4.0, 5.0]]
    >>> Lookup().vjp(saved, np.ones((3, 2)))[0].tolist()
    [[1.0, 1.0], [0.0, 0.0], [2.0, 2.0]]
    """

    inputs = ("table",)
    outputs = ("features",)

    def forward(self, table, rows, out=None):
        """``out``: an array of the result's shape to write into, as numpy's
        ``np.take(..., out=)`` (a loop that reuses one saves a fresh array
        per call)."""
        table = as_float_array(table, "table", finite=False, dtype=KEEP)
        if table.ndim not in (1, 2):
            raise ValueError(f"table must be 1- or 2-dimensional, got shape {table.shape}")
        # a private copy: the vjp's kernel indexes with it, unchecked
        rows = table_rows(rows, table.shape[0])
        if out is None:
            out = np.empty((rows.shape[0],) + table.shape[1:], table.dtype)
        else:
            check_out(out, "out", (rows.shape[0],) + table.shape[1:],
                      inputs={"table": table}, dtype=table.dtype)
        if table.ndim == 2:   # rows in parallel (rows checked above)
            _core.take_rows(table, rows, out)
        else:
            # numpy buffers ``out`` under mode="raise" (a fresh array's page
            # faults per call), never under "wrap"
            np.take(table, rows, axis=0, out=out, mode="wrap")
        return LookupResult(out), (rows, table.shape, table.dtype)

    def vjp(self, saved, grad_features):
        """``saved``: ``(rows, table shape[, table dtype])`` (float64 without one)."""
        grad = np.zeros(saved[1], dtype=_saved_dtype(saved))
        if grad_features is not None:
            self.accumulate(saved, grad_features, grad)
        return (grad,)

    @staticmethod
    def accumulate(saved, grad_features, into):
        """Add the vjp into ``into`` (a C-contiguous array of the table's
        shape and dtype that the caller owns), row by row in order."""
        rows, shape = saved[:2]
        dtype = _saved_dtype(saved)
        g = optional_grad(grad_features, "grad_features", (rows.shape[0],) + tuple(shape[1:]),
                          finite=False, dtype=dtype)
        check_out(into, "into", shape, inputs={"grad_features": g}, dtype=dtype)
        if rows.size:
            if into.ndim == 1:
                g, into = g.reshape(-1, 1), into.reshape(-1, 1)
            _core.rows_add(rows, g, into)


def table_rows(rows, num_rows, num_nodes=None):
    """``rows`` as a frozen private int64 copy (a vjp's kernel indexes with
    it, unchecked), each in ``[0, num_rows)`` (the rows of a table), one per
    node where ``num_nodes`` is given: ValueError or TypeError naming
    ``rows`` otherwise."""
    rows = frozen(np.asarray(as_index_array(rows, "rows"), dtype=np.int64))
    if num_nodes is not None and rows.shape != (num_nodes,):
        raise ValueError(f"rows must have shape ({num_nodes},) (one per node of graph), "
                         f"got {rows.shape}")
    if rows.size and (rows.min() < 0 or rows.max() >= num_rows):
        bad = rows[(rows < 0) | (rows >= num_rows)][0]
        raise ValueError(f"rows must lie in [0, {num_rows}) (the rows of table), got {bad}")
    return rows


# ---------------------------------------------------------------------------
class FeatureMeanResult(NamedTuple):
    activation: np.ndarray


class FeatureMean(Operation):
    """A node's activation: the mean of its features, ``a = mean(h, axis=1)``.

    The one place where this rule and its gradient live (``g[:, None] / d``);
    :attr:`Graph.activation` defers to :func:`feature_mean`. With no feature
    columns the activation is 0.

    Examples
    --------
    >>> (a,), saved = FeatureMean().forward(np.array([[1.0, 3.0], [2.0, 2.0]]))
    >>> a.tolist(), FeatureMean().vjp(saved, np.array([2.0, 4.0]))[0].tolist()
    ([2.0, 2.0], [[1.0, 1.0], [2.0, 2.0]])
    """

    inputs = ("features",)
    outputs = ("activation",)

    def forward(self, features):
        features = as_float_array(features, "features", ndim=2, dtype=KEEP)
        return FeatureMeanResult(feature_mean(features)), features.shape + (features.dtype,)

    def vjp(self, saved, grad_activation, out=None):
        """``saved``: ``(n, d[, dtype])``, the features' shape (and dtype:
        float64 without one). The activation is float64 whatever the
        features' dtype; its gradient comes back in theirs. ``out``: an
        (n, d) array of that dtype to write the gradient into."""
        n, d = saved[:2]
        dtype = _saved_dtype(saved, 2)
        if out is not None:
            check_out(out, "out", (n, d), dtype=dtype)
        if grad_activation is None or d == 0:
            return (np.zeros((n, d), dtype) if out is None else _zero(out),)
        column = self.vjp_column(saved, grad_activation)
        if out is None:
            out = np.empty((n, d), dtype)
        if dtype in (np.float32, np.float64):
            _core.broadcast_column(column[:, 0], out)   # on the threads
        else:   # a caller's own saved dtype (forward saves only those two)
            np.copyto(out, column)
        return (out,)

    @staticmethod
    def vjp_column(saved, grad_activation):
        """The one column every column of :meth:`vjp` equals, ``g[:, None] /
        d`` of shape (n, 1): a linear map that acts row by row (a merge's
        scatter) can route it and broadcast the result, instead of routing
        all ``d`` equal columns."""
        n, d = saved[:2]
        g = as_float_array(grad_activation, "grad_activation", shape=(n,), finite=False)
        if d == 0:
            return np.zeros((n, 1), _saved_dtype(saved, 2))
        return (g[:, None] / d).astype(_saved_dtype(saved, 2), copy=False)


def _zero(out):
    out.fill(0.0)
    return out


def feature_mean(features, num_threads=1):
    """Row means of an (n, d) array, float64 (summed in float64 for float32
    features; float64 ones with ``mean(axis=1)``'s bits); zeros when
    ``d == 0``. On one thread unless ``num_threads`` says otherwise (0:
    OpenMP's default): ``Graph.activation`` and ``FeatureMean`` compute
    them, which a process forked after a parallel loop must be able to
    call (see "Fork" in docs/design.md); the ``Trainer``'s step asks for
    the threads."""
    if features.shape[1] == 0:
        return np.zeros(features.shape[0])
    if features.dtype not in (np.float32, np.float64):
        return features.mean(axis=1, dtype=np.float64)
    out = np.empty(features.shape[0])
    _core.row_means(np.ascontiguousarray(features), out, num_threads)
    return out


def _saved_dtype(saved, at=2):
    """The dtype an op saved at ``saved[at]``, float64 if it saved none."""
    return saved[at] if len(saved) > at else np.dtype(np.float64)


# ---------------------------------------------------------------------------
class SimilarityResult(NamedTuple):
    similarity: np.ndarray


#: Rows whose largest |entry| exceeds this are rescaled before the cosine
#: when |h|^2 would overflow (see EdgeSimilarity).
_COS_SCALE_ABOVE = 1e100


def _row_scale(features):
    """Per row: its largest |entry| where that exceeds 1e100, else 1."""
    if not features.shape[1]:
        return np.ones(features.shape[0])
    top = np.abs(features).max(axis=1)
    return np.where(top > _COS_SCALE_ABOVE, top, 1.0)


class EdgeSimilarity(Operation):
    """Cosine similarity of the endpoint features of every edge. O((n + E) d).

    ``s_e = <h_u, h_v> / (max(|h_u|, eps) max(|h_v|, eps))``, ``eps = 1e-12``
    (a zero row has similarity 0 with everything, and a gradient of order
    ``1 / eps`` towards its neighbours: the slope of the clamp, as exact as
    any other, but a step to clip where rows can vanish). Any finite
    features give a finite similarity: when ``|h|^2`` overflows (entries
    beyond ~1e154), rows with entries beyond 1e100 are divided by their
    largest ``|entry|`` first (the cosine is invariant under that), and so
    is their gradient.

    Examples
    --------
    >>> g = Graph.from_text("abc")
    >>> H = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    >>> EdgeSimilarity().forward(g, H)[0].similarity.tolist()
    [1.0, 0.0]
    """

    inputs = ("features",)
    outputs = ("similarity",)

    def forward(self, graph, features):
        check_graph(graph, "graph")
        return self._forward(graph, check_features(graph, features))

    def _forward(self, graph, features):
        """:meth:`forward` of checked arguments (the morph checks its own)."""
        sim = np.empty(graph.num_edges)
        norms = np.empty(graph.num_nodes)
        _core.edge_cosine(graph.indptr, graph.indices, features, norms, sim)
        scale = None
        if graph.num_nodes and not (_core.all_finite(norms) and _core.all_finite(sim)):
            # Finite rows beyond ~1e154 overflow |h|^2. The cosine does not
            # change when a row is divided by a positive number, so the large
            # rows are divided by their largest |entry| and the kernel runs
            # again; the vjp divides their gradient rows by the same scale.
            scale = _row_scale(features)
            features = (features / scale[:, None]).astype(features.dtype, copy=False)
            _core.edge_cosine(graph.indptr, graph.indices, features, norms, sim)
        return SimilarityResult(sim), (graph.indptr, graph.indices, features, norms, sim,
                                       scale)

    def vjp(self, saved, grad_similarity):
        grad = np.zeros_like(saved[2])
        if grad_similarity is not None:
            self.accumulate(saved, grad_similarity, grad)
        return (grad,)

    @staticmethod
    def accumulate(saved, grad_similarity, into):
        """Add the vjp into ``into`` (a C-contiguous (n, d) array of the
        features' dtype the caller owns), saving the (n, d) allocation of
        :meth:`vjp`."""
        indptr, indices, features, norms, sim, scale = saved
        grad_similarity = optional_grad(grad_similarity, "grad_similarity", sim.shape,
                                        finite=False)
        # features: the rows the kernel reads while it writes ``into``'s
        check_out(into, "into", features.shape, dtype=features.dtype,
                  inputs={"grad_similarity": grad_similarity, "features": features})
        if scale is None:
            _core.edge_cosine_backward(indptr, indices, features, norms, sim,
                                       grad_similarity, into)
            return
        part = np.zeros_like(features)
        _core.edge_cosine_backward(indptr, indices, features, norms, sim, grad_similarity,
                                   part)
        into += part / scale[:, None]


# ---------------------------------------------------------------------------
class ScoresResult(NamedTuple):
    logits: np.ndarray
    probability: np.ndarray
    tau: float


class ScoresSaved(NamedTuple):
    """What :meth:`MergeScores.vjp` needs: the logits and ``theta`` (the
    slopes ``p (1 - p)`` and ``tau (1 - tau)`` are taken from them)."""
    logits: np.ndarray
    theta: float


#: The smallest temperature of :class:`MergeScores` (and of a Morpher).
MIN_TEMPERATURE = 1e-300


def merge_threshold(theta):
    """The merge threshold ``tau = sigmoid(theta)`` of a finite scalar (0-d)
    ``theta``, as a float; else a ValueError or TypeError naming ``theta``."""
    if np.shape(theta) != ():   # float() would say "only 0-dimensional arrays ..."
        raise ValueError(f"theta must be a scalar (0-d), got shape {np.shape(theta)}")
    return float(sigmoid(check_scalar(np.asarray(theta)[()], "theta")))


class MergeScores(Operation):
    """Merge logits and probabilities from similarities and the threshold.

    ``tau = sigmoid(theta)``, ``z = (s - tau) / T``, ``p = sigmoid(z)``.
    ``theta`` is a 0-d array (a parameter); its gradient comes back 0-d.

    Parameters
    ----------
    temperature : float
        ``T >= 1e-300`` (:data:`MIN_TEMPERATURE`); ``similarity`` is 1-d,
        ``theta`` a finite 0-d array.

    Examples
    --------
    >>> r, saved = MergeScores(0.5).forward(np.array([0.5]), np.array(0.0))
    >>> r.tau, r.logits.tolist(), r.probability.tolist()
    (0.5, [0.0], [0.5])
    """

    inputs = ("similarity", "theta")
    outputs = ("logits", "probability")

    def __init__(self, temperature):
        # at least 2 / DBL_MAX (1.1e-308): the logits (s - tau) / T, |s - tau| <= 2,
        # stay finite (below it they overflowed and REINFORCE's log_prob was NaN)
        self.temperature = check_scalar(temperature, "temperature", lower=MIN_TEMPERATURE)

    def forward(self, similarity, theta):
        similarity = as_float_array(similarity, "similarity", ndim=1)
        tau = merge_threshold(theta)
        logits = (similarity - tau) / self.temperature
        p = sigmoid(logits)
        return ScoresResult(logits, p, tau), ScoresSaved(logits, float(theta))

    def vjp(self, saved, grad_logits, grad_probability):
        logits, theta = saved
        grad_logits = optional_grad(grad_logits, "grad_logits", logits.shape, finite=False)
        grad_probability = optional_grad(grad_probability, "grad_probability", logits.shape,
                                         finite=False)
        g = np.zeros_like(logits)
        if grad_logits is not None:
            g += grad_logits
        if grad_probability is not None:
            g += grad_probability * sigmoid_slope(logits)
        grad_s = g / self.temperature
        grad_theta = np.array(-sigmoid_slope(theta) * grad_s.sum())
        return grad_s, grad_theta

    def __repr__(self):
        return f"MergeScores(temperature={self.temperature})"


# ---------------------------------------------------------------------------
class MergeResult(NamedTuple):
    features: np.ndarray
    graph: Graph
    history: MergeHistory


class HardMerge(Operation):
    """Merge the endpoints of the chosen edges and contract the graph.

    Clusters are the connected components of the chosen edges; every
    cluster becomes one node with its members' mean features and its head's
    label (see :func:`grapheme.merge_edges`, :func:`grapheme.contract`).
    The vjp routes the output gradient back through the merge history,
    ``grad[i] = w_i grad_out[c(i)]``: exact, O(n d). The decisions are not
    differentiable inputs.

    Examples
    --------
    >>> g = Graph.from_text("aab")
    >>> r, saved = HardMerge().forward(g, np.eye(3), np.array([True, False]))
    >>> r.graph.to_text(), r.features.tolist()
    ('ab', [[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    >>> HardMerge().vjp(saved, np.ones((2, 3)))[0].tolist()
    [[0.5, 0.5, 0.5], [0.5, 0.5, 0.5], [1.0, 1.0, 1.0]]
    """

    inputs = ("features",)
    outputs = ("features",)

    def forward(self, graph, features, decisions, workspace=None, name="merge."):
        """``workspace`` (a :class:`grapheme._workspace.Workspace`, optional):
        the merged features live in it under ``name`` + "features", valid
        until its next use of that name. None: a fresh array (pure)."""
        _check_place(workspace, name)
        check_graph(graph, "graph")
        decisions = _check_decisions(graph, decisions, "decisions")
        return self._forward(graph, check_features(graph, features), decisions, workspace, name)

    def _forward(self, graph, features, decisions, workspace=None, name="merge."):
        """:meth:`forward` of a checked graph and finite C-contiguous (n, d)
        features, not scanned again (the ``Trainer``'s segmentation target:
        the features its morph merges)."""
        history = merge_edges(graph, decisions)
        indptr, indices, weights = contract_edges(graph, history)
        offsets = None if graph.offsets is None else np.searchsorted(
            history.heads, graph.offsets).astype(np.int64)
        out = history.gather(features, out=None if workspace is None else workspace(
            name + "features", (history.num_outputs, features.shape[1]), features.dtype))
        merged = Graph._trusted(indptr, indices, graph.labels[history.heads], features=out,
                                weights=weights, offsets=offsets)
        return MergeResult(out, merged, history), (history, features.shape, features.dtype)

    def vjp(self, saved, grad_features, out=None):
        """``out``: an (n, d) array to write the gradient into (see
        :meth:`MergeHistory.scatter`). The gradient has the features' dtype."""
        history, shape, dtype = saved
        if grad_features is None:
            if out is not None:
                check_out(out, "out", shape, dtype=dtype)
            return (np.zeros(shape, dtype=dtype) if out is None else _zero(out),)
        g = as_float_array(grad_features, "grad_features", finite=False, dtype=dtype,
                           shape=(history.num_outputs, shape[1]))
        return (history.scatter(g, out=out),)


# ---------------------------------------------------------------------------
class RelaxResult(NamedTuple):
    features: np.ndarray
    mass: np.ndarray
    weights: np.ndarray
    graph: Graph


class ChainRelaxation(Operation):
    """The expected merge of a chain under independent merge weights ``m``.

    For unweighted chain-shaped graphs (every edge ``u -> u + 1``, what
    text produces; a weighted one is refused).
    Right-to-left recursions ``N_i = h_i + m_i N_{i+1}``, ``D_i = 1 + m_i
    D_{i+1}`` give the relaxed cluster means ``h'_i = N_i / D_i``; the mass
    of node ``i`` is the probability that it heads a cluster,
    ``mu_i = 1 - m_{i-1}``. The edges are the expected edges between
    clusters: ``i -> j`` carries ``W_ij = mu_i prod_{t=i}^{j-2} m_t
    (1 - m_{j-1})``, the probability that ``i`` heads a cluster and ``j``
    heads the next one, so a node's weighted out-degree is the probability
    that a next cluster exists. Everything is a smooth function of ``m``;
    at ``m`` in {0, 1} it is the hard morph in ``n``-node form (heads carry
    their cluster with mass 1, every other node has mass 0 and no edge of
    non-zero weight). Edges whose weight and first derivatives are all below
    ``2**-60`` (those behind two zeros, or a product of weights that small)
    are left out. O(n d + E') for ``E'`` relaxed edges.

    Examples
    --------
    >>> g = Graph.from_text("aab")
    >>> r, saved = ChainRelaxation().forward(g, np.eye(3), np.array([1.0, 0.0]))
    >>> r.mass.tolist(), r.features[0].tolist()
    ([1.0, 0.0, 1.0], [0.5, 0.5, 0.0])
    >>> r.graph.edge_sources()[r.weights > 0].tolist(), r.graph.indices[r.weights > 0].tolist()
    ([0], [2])
    """

    inputs = ("features", "merge")
    outputs = ("features", "mass", "weights")

    def forward(self, graph, features, merge, workspace=None):
        """``workspace``: as for :meth:`HardMerge.forward`, the relaxed
        features under "relax.features"."""
        _check_place(workspace)
        check_graph(graph, "graph")
        return self._forward(graph, check_features(graph, features), merge, workspace)

    def _forward(self, graph, features, merge, workspace=None):
        """:meth:`forward` of a checked graph and finite C-contiguous (n, d)
        features, not scanned again (the estimators' under the morph)."""
        merge = as_float_array(merge, "merge", shape=(graph.num_edges,))
        if merge.size and not (merge.min() >= 0.0 and merge.max() <= 1.0):
            raise ValueError("merge must lie in [0, 1] (merge weights, probabilities), got "
                             f"values in [{merge.min()}, {merge.max()}]")
        src = chain_sources(graph)
        if graph.weights is not None:   # else silently unit weights (a review's find)
            raise ValueError("graph must be unweighted for the chain relaxation: its "
                             "edges' weights are merge probabilities (the hard morph, "
                             "estimator 'history', takes weighted chains)")
        n, d = features.shape
        m = np.zeros(n)
        m[src] = merge
        out = _alloc(workspace, "relax.features", n, d, features.dtype, {"features": features})
        D = np.empty(n)
        mass = np.empty(n)
        _relax.relax_chain_forward(features, m, out, D, mass, False)
        indptr, indices, weights = _relaxed_edges(graph, m)
        relaxed = Graph._trusted(indptr, indices, graph.labels, features=out,
                                 weights=weights, mass=mass, offsets=graph.offsets)
        return (RelaxResult(out, mass, weights, relaxed),
                (src, m, out, D, indptr, indices, graph.num_edges))

    def vjp(self, saved, grad_features, grad_mass, grad_weights, out=None):
        """``out``: an (n, d) array to write the feature gradient into (it
        must not overlap an input or ``saved``; the caller checks)."""
        src, m, relaxed, D, indptr, indices, num_edges = saved
        n, d = relaxed.shape
        grad_features = optional_grad(grad_features, "grad_features", (n, d), finite=False,
                                      dtype=relaxed.dtype)
        grad_mass = optional_grad(grad_mass, "grad_mass", (n,), finite=False)
        grad_weights = optional_grad(grad_weights, "grad_weights", (indices.shape[0],),
                                     finite=False)
        if out is not None:
            check_out(out, "out", (n, d), dtype=relaxed.dtype)
        gf = np.empty((n, d), dtype=relaxed.dtype) if out is None else out
        if grad_features is None:
            gf.fill(0.0)
        else:
            np.copyto(gf, grad_features)
        gmass = np.zeros(n) if grad_mass is None else np.ascontiguousarray(grad_mass, np.float64)
        grad_m = np.empty(n)
        _relax.relax_chain_backward(m, relaxed, D, gf, gmass, gf, grad_m, False)
        if grad_weights is not None:
            grad_m += _relaxed_edges_vjp(indptr, m, grad_weights)
        return gf, grad_m[src] if num_edges else np.zeros(0)


def _relaxed_edges(graph, m):
    """Expected inter-cluster edges of a relaxed chain: ``(indptr, indices, W)``."""
    n = graph.num_nodes
    dtype = graph.indptr.dtype
    counts = np.empty(n, np.int64)
    has_next = np.zeros(n, np.uint8)
    has_next[chain_sources(graph)] = 1
    _relax.relaxed_edge_counts(m, has_next, counts)
    total = int(counts.sum())
    # merge probabilities near 1 keep an edge between every two nodes of a
    # run: up to n (n - 1) / 2 of them, so more than the chain's int32
    # indices count (int64 then) or the machine holds (refused)
    if total > np.iinfo(dtype).max:
        dtype = np.dtype(np.int64)
    check_allocation(total * (dtype.itemsize + 8) * 4,
                     f"the relaxed graph of {n} nodes ({total} expected edges: merge "
                     f"probabilities near 1 over long runs; a higher temperature or shorter "
                     f"sequences keep fewer)")
    indptr = np.zeros(n + 1, dtype)
    np.cumsum(counts, out=indptr[1:])
    indices = np.empty(total, dtype)
    weights = np.empty(total)
    _relax.relaxed_edges(m, has_next, indptr, indices, weights)
    return indptr, indices, weights


def _relaxed_edges_vjp(indptr, m, grad_weights):
    grad_m = np.zeros(m.shape[0])
    _relax.relaxed_edges_backward(m, indptr, np.ascontiguousarray(grad_weights, np.float64),
                                 grad_m)
    return grad_m


# ---------------------------------------------------------------------------
class LogProbResult(NamedTuple):
    log_prob: np.ndarray


class BernoulliLogProb(Operation):
    """Log-probability of independent Bernoulli decisions, per example.

    ``log P_b = sum_{e in b} m_e log sigmoid(z_e) + (1 - m_e) log sigmoid(-z_e)``
    for logits ``z``; ``d log P / d z_e = m_e - sigmoid(z_e)``, finite however
    saturated ``z`` is. What REINFORCE differentiates. ``decisions`` (bool,
    or numbers all 0 or 1) and ``example`` (integers in ``[0,
    num_examples)``) have the logits' shape.

    Examples
    --------
    >>> r, saved = BernoulliLogProb().forward(np.zeros(2), np.array([True, False]),
    ...                                       np.array([0, 0]), 1)
    >>> round(float(r.log_prob[0]), 6), BernoulliLogProb().vjp(saved, np.ones(1))[0].tolist()
    (-1.386294, [0.5, -0.5])
    """

    inputs = ("logits",)
    outputs = ("log_prob",)

    def forward(self, logits, decisions, example, num_examples):
        logits = as_float_array(logits, "logits", ndim=1)
        decisions = as_decisions(decisions, "decisions", logits.shape)
        example = as_index_array(example, "example")
        num_examples = check_count(num_examples, "num_examples")
        if example.shape != logits.shape:
            raise ValueError(f"example must have the logits' shape {logits.shape}, got "
                             f"{example.shape}")
        if example.size and (example.min() < 0 or example.max() >= num_examples):
            raise ValueError(f"example must lie in [0, num_examples) = [0, {num_examples})")
        m = decisions.astype(np.float64)
        # log sigmoid(z) = -softplus(-z); m log s(z) + (1-m) log s(-z) = m z - softplus(z)
        per_edge = m * logits - np.logaddexp(0.0, logits)
        log_prob = np.bincount(example, weights=per_edge, minlength=num_examples)
        return LogProbResult(log_prob), (m - sigmoid(logits), example, num_examples)

    def vjp(self, saved, grad_log_prob):
        coef, example, num_examples = saved
        if grad_log_prob is None:
            return (np.zeros_like(coef),)
        grad_log_prob = optional_grad(grad_log_prob, "grad_log_prob", (num_examples,),
                                      finite=False)
        return (coef * grad_log_prob[example],)


# ---------------------------------------------------------------------------
class PenaltyResult(NamedTuple):
    value: float
    expected_rate: float


class RatePenalty(Operation):
    """Penalty on the expected kept fraction ``rho = E[k] / n``.

    ``E[k] = n - sum_e p_e`` (exact when the candidate edges form a forest,
    chains included: each merged edge of a forest removes one component).
    The value is the augmented Lagrangian ``multiplier * (rho - target) +
    weight * (rho - target)^2``. 0 for an empty graph. ``target`` in [0, 1],
    ``weight >= 0``, ``num_nodes`` a count (> 0 with any probability).

    Examples
    --------
    >>> r, saved = RatePenalty(target=0.5, weight=1.0).forward(np.array([0.5, 0.5]), 4, 0.0)
    >>> r.expected_rate, r.value, RatePenalty(0.5, 1.0).vjp(saved, 1.0)[0].tolist()
    (0.75, 0.0625, [-0.125, -0.125])
    """

    inputs = ("probability",)
    outputs = ("value",)

    def __init__(self, target, weight):
        self.target = check_scalar(target, "target", lower=0, upper=1)
        self.weight = check_scalar(weight, "weight", lower=0)

    def forward(self, probability, num_nodes, multiplier=0.0):
        probability = as_float_array(probability, "probability", ndim=1)
        num_nodes = check_count(num_nodes, "num_nodes")
        multiplier = check_scalar(multiplier, "multiplier")
        if probability.shape[0] > 0 and num_nodes == 0:
            raise ValueError("num_nodes must be > 0 where there are probabilities")
        if num_nodes == 0:
            return PenaltyResult(0.0, 1.0), (0, 0.0, probability.shape, multiplier)
        rho = (num_nodes - probability.sum()) / num_nodes
        gap = rho - self.target
        value = multiplier * gap + self.weight * gap * gap
        return PenaltyResult(float(value), float(rho)), (num_nodes, gap, probability.shape,
                                                         multiplier)

    def vjp(self, saved, grad_value):
        n, gap, shape, multiplier = saved
        if grad_value is not None:   # a real number, or a 0-d array: the value's
            if np.shape(grad_value) != ():
                raise ValueError(f"grad_value must be a scalar (0-d), got shape "
                                 f"{np.shape(grad_value)}")
            grad_value = float(as_float_array(grad_value, "grad_value", finite=False))
        if grad_value is None or n == 0:
            return (np.zeros(shape),)
        return (np.full(shape, -grad_value * (multiplier + 2.0 * self.weight * gap) / n),)

    def __repr__(self):
        return f"RatePenalty(target={self.target}, weight={self.weight})"


def _alloc(workspace, name, n, d, dtype=np.float64, apart=None, shape=None):
    """A fresh (n, d) array of ``dtype`` (or of ``shape``), or the
    workspace's view named ``name``, which must not overlap the arrays of
    ``apart`` (``{argument name: array}``, the call's inputs): the call is
    about to write it."""
    shape = (n, d) if shape is None else shape
    if workspace is None:
        return np.empty(shape, dtype)
    out = workspace(name, shape, dtype)
    for arg, arr in (apart or {}).items():
        if arr is not None and np.may_share_memory(out, arr):
            raise ValueError(f"{arg} lies in the workspace's array {name!r}, which this "
                             f"call writes: pass a copy, or give the call another name")
    return out


def _check_place(workspace, name=""):
    """An operation's ``workspace`` (a :class:`grapheme._workspace.Workspace`
    or None) and ``name`` (the prefix of its arrays' names, a str)."""
    check_workspace(workspace)
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")


def check_features(graph, features, name="features"):
    """``features`` as a finite (n_nodes, d) array: float32 stays float32,
    anything else is float64."""
    return as_float_array(features, name, ndim=2, shape=(graph.num_nodes, None), dtype=KEEP)


def optional_grad(value, name, shape, finite=True, dtype=None):
    """An upstream gradient as a C-contiguous array of ``shape`` (float64,
    or ``dtype``), or None (checked before any kernel reads it)."""
    if value is None:
        return None
    return as_float_array(value, name, shape=shape, finite=finite, dtype=dtype)


#: numpy's floating-point warnings, off in the products' fallbacks without
#: OpenMP: the OpenMP path's BLAS calls raise none, and an overflow is
#: reported by the caller's own check (the encoder's LayerOverflowError,
#: the trainer's divergence checks), in either build.
_QUIET = {"over": "ignore", "invalid": "ignore"}


def _matmul(a, b, out, transpose_b=False, init=None):
    """``out = a @ b`` (``b.T`` if ``transpose_b``), ``+ init`` if given
    (``init`` may be ``out`` itself: accumulate): by row blocks on
    grapheme's OpenMP threads, one single-threaded BLAS call per block
    (:mod:`grapheme._products`), where the build has OpenMP; numpy's
    ``matmul`` (BLAS's own threads) where it does not."""
    if _core.openmp_threads() > 0:
        _products.matmul(a, b, out, transpose_b, init=init)
        return out
    with np.errstate(**_QUIET):
        if init is None:
            np.matmul(a, b.T if transpose_b else b, out=out)
        else:   # init may be out, or a view of it
            np.add(np.matmul(a, b.T if transpose_b else b), init, out=out)
    return out


def _matmul_tn(a, g, workspace=None, name="", names=("a", "g")):
    """``a.T @ g`` (a fresh (k, m) array), the product over rows a weight
    gradient is: the blocks' partial products (in ``workspace`` under
    ``name`` + "parts") added in block order, so the bits do not follow the
    thread count. numpy's ``matmul`` without OpenMP. ``names``: how an
    overlap error calls ``a`` and ``g``."""
    k, m = a.shape[1], g.shape[1]
    out = np.empty((k, m), a.dtype)
    if _core.openmp_threads() == 0:
        with np.errstate(**_QUIET):
            return np.matmul(a.T, g, out=out)
    parts = _tn_parts(a.shape[0], k, m, a.dtype, workspace, name + "parts",
                      dict(zip(names, (a, g))))
    _products.matmul_tn(a, g, out, parts)
    return out


#: The prefix of the workspace names of the message-passing products'
#: scratch (whatever ``name`` their caller gives): the encoder keeps its
#: arguments out of them.
_SCRATCH = "message."


def _tn_parts(n, k, m, dtype, workspace, name, apart):
    """The (blocks, k, m) partial products of a weight gradient over ``n``
    rows (one per block of ``TN_ROWS``), under ``name``."""
    blocks = max(-(-n // _products.TN_ROWS), 1)
    return _alloc(workspace, name, None, None, dtype, apart, shape=(blocks, k, m))


def _stacked_matmul(edges, x, w, init, out, workspace=None, apart=None, residual=None):
    """``out = [x, P, S] @ w + init`` (``P``, ``S``: the neighbour sums of
    :func:`grapheme._core.stack_neighbours` over ``edges``, as
    :func:`_both_ways` gives them; ``init`` (n, m), or (1, m) for every row):
    by row blocks, each stacked into a per-thread scratch slab just before
    its BLAS call (:func:`grapheme._products.stacked_matmul`), where the
    build has OpenMP; the (n, 3d) stack and numpy's ``matmul`` where it does
    not. ``apart``: as for :func:`_alloc`.

    ``residual`` (n, d), optional: a layer's forward, ``out = tanh(...)``
    and ``residual = x + out``; on the blocks' threads where numpy's tanh
    loop is at hand (:data:`grapheme._products.NUMPY_TANH`), by ``np.tanh``
    after the product where not (the same bits)."""
    scratch = _stack_scratch(x, workspace, apart)
    fused = scratch is not None and _products.NUMPY_TANH   # the tail on the threads
    with np.errstate(**_QUIET):   # numpy's steps below; the kernel raises none
        if scratch is not None:
            _products.stacked_matmul(*edges, x, w, out, init, scratch,
                                     residual=residual if fused else None)
        else:
            np.matmul(_stack(edges, x, workspace, apart), w, out=out)
            out += init
        if residual is not None and not fused:
            np.tanh(out, out=out)
            np.add(x, out, out=residual)
    return out


def _stacked_matmul_tn(edges, x, g, workspace=None, apart=None):
    """``[x, P, S].T @ g`` (a fresh (3d, m) array), a message-passing
    layer's weight gradient, as :func:`_stacked_matmul` computes its
    product: the blocks' partial products (under "message.parts") added in
    block order, so the bits do not follow the thread count."""
    d, m = x.shape[1], g.shape[1]
    out = np.empty((3 * d, m), x.dtype)
    scratch = _stack_scratch(x, workspace, apart)
    if scratch is None:
        with np.errstate(**_QUIET):
            return np.matmul(_stack(edges, x, workspace, apart).T, g, out=out)
    parts = _tn_parts(x.shape[0], 3 * d, m, x.dtype, workspace, _SCRATCH + "parts", apart)
    _products.stacked_matmul_tn(*edges, x, g, out, parts, scratch)
    return out


def _stack_scratch(x, workspace, apart):
    """One (ROWS, 3d) slab per OpenMP thread for the stacked products, or
    None without OpenMP."""
    threads = _core.openmp_threads()
    if threads == 0:
        return None
    blocks = -(-x.shape[0] // _products.ROWS)    # no more slabs than blocks
    return _alloc(workspace, _SCRATCH + "scratch", None, None, x.dtype, apart,
                  shape=(max(min(threads, blocks), 1), _products.ROWS, 3 * x.shape[1]))


def _stack(edges, x, workspace, apart):
    """The whole (n, 3d) stack ``[x, P, S]`` (the products' operand without
    OpenMP)."""
    cat = _alloc(workspace, _SCRATCH + "cat", x.shape[0], 3 * x.shape[1], x.dtype, apart)
    _core.stack_neighbours(*edges, x, cat)
    return cat


def _both_ways(graph):
    """``(indptr, indices, weights, t_indptr, t_indices, t_weights)``: the
    graph's edges by source and by target (weights empty when all are 1), so
    that every row of a neighbour sum is written by itself."""
    weights = np.empty(0) if graph.weights is None else graph.weights
    t_indptr = np.empty_like(graph.indptr)
    t_indices = np.empty_like(graph.indices)
    t_weights = np.empty_like(weights)
    _core.transpose_csr(graph.indptr, graph.indices, weights, t_indptr, t_indices, t_weights)
    return graph.indptr, graph.indices, weights, t_indptr, t_indices, t_weights


# ---------------------------------------------------------------------------
class MessageResult(NamedTuple):
    features: np.ndarray


class MessageSaved(NamedTuple):
    """What :meth:`MessagePassing.vjp` needs: the graph's edges both ways,
    the layer's input features, its ``tanh`` and the weights side by side."""

    edges: tuple
    features: np.ndarray
    t: np.ndarray
    w_cat: np.ndarray


class MessagePassing(Operation):
    """One residual message-passing layer over a graph's edges.

    ``h' = h + tanh(h W_self + P W_pred + S W_succ + b)`` with ``P`` the sum
    of every node's predecessors' rows and ``S`` of its successors' (edge
    weights included), so direction matters. With every weight zero the
    layer is the identity, which is how an encoder starts: an untrained
    model is the context-free one. The neighbour sums run in the compiled
    core, the products through BLAS: O((n + E) d + n d^2).

    Examples
    --------
    >>> g = Graph.from_text("abc")
    >>> H = np.eye(3)
    >>> W = np.zeros((3, 3))
    >>> r, _ = MessagePassing().forward(g, H, W, W, W, np.zeros(3))
    >>> bool((r.features == H).all())
    True
    """

    inputs = ("features", "w_self", "w_pred", "w_succ", "bias")
    outputs = ("features",)

    @one_pool   # its products call BLAS from OpenMP threads: BLAS on one
    def forward(self, graph, features, w_self, w_pred, w_succ, bias, workspace=None,
                name=""):
        """``workspace`` (a :class:`grapheme._workspace.Workspace`, optional):
        where the arrays live, those saved and the result under ``name`` +
        "t", "out" (n, d), the products' scratch under "message."; valid
        until the workspace's next use of those names. None: fresh arrays.

        What the vjp needs is kept by reference, ``features`` included, as
        autograd keeps its inputs: change them in place between the two and
        the vjp sees the change (the PyTorch bridge refuses that, with
        autograd's version check)."""
        _check_place(workspace, name)
        check_graph(graph, "graph")
        return self._forward(graph, check_features(graph, features), w_self, w_pred, w_succ,
                             bias, workspace, name)

    def _forward(self, graph, features, w_self, w_pred, w_succ, bias, workspace=None,
                 name=""):
        """:meth:`forward` of a checked graph and (n, d) C-contiguous
        ``features`` not scanned again for NaN: the encoder's layers, whose
        inputs the encoder checked or a layer made (the encoder scans what
        comes out of its last layer). The weights are checked here: O(d^2)."""
        n, d = features.shape
        dt = features.dtype           # the weights follow the features
        w_self = as_float_array(w_self, "w_self", shape=(d, d), dtype=dt)
        w_pred = as_float_array(w_pred, "w_pred", shape=(d, d), dtype=dt)
        w_succ = as_float_array(w_succ, "w_succ", shape=(d, d), dtype=dt)
        bias = as_float_array(bias, "bias", shape=(d,), dtype=dt)
        # t = tanh([h, P, S] @ [W_self; W_pred; W_succ] + b): the three
        # products as one, the stack [h, P, S] made block by block in cache
        apart = {"features": features, "bias": bias}
        edges = _both_ways(graph)
        w_cat = np.concatenate([w_self, w_pred, w_succ])
        t = _alloc(workspace, name + "t", n, d, dt, apart)
        out = _alloc(workspace, name + "out", n, d, dt, apart)
        _stacked_matmul(edges, features, w_cat, bias[None, :], t, workspace, apart, out)
        return MessageResult(out), MessageSaved(edges, features, t, w_cat)

    @one_pool
    def vjp(self, saved, grad_features, workspace=None, name=""):
        """``workspace``: as for :meth:`forward`; the input gradient lives
        under ``name`` + "grad"."""
        _check_place(workspace, name)
        edges, features, t, w_cat = saved
        n, d = t.shape
        dt = t.dtype
        if grad_features is None:
            return (np.zeros((n, d), dt), np.zeros((d, d), dt), np.zeros((d, d), dt),
                    np.zeros((d, d), dt), np.zeros(d, dt))
        g = optional_grad(grad_features, "grad_features", (n, d), finite=False, dtype=dt)
        apart = {"grad_features": g, "features": features}
        gz, grad_bias = _alloc(workspace, _SCRATCH + "gz", n, d, dt, apart), np.empty(d, dt)
        _core.tanh_backward(t, g, gz, grad_bias)   # gz = g (1 - t^2)
        # grad_h = g + gz W_self^T + A gz W_pred^T + A^T gz W_succ^T: the
        # adjoint of the predecessor sum is the successor sum, and back, so
        # it is the forward's stacked product of gz over the reversed edges
        # [gz, S, P] with [W_self^T; W_pred^T; W_succ^T]
        w_t = w_cat.reshape(3, d, d).transpose(0, 2, 1).reshape(3 * d, d)   # a C copy
        grad_h = _alloc(workspace, name + "grad", n, d, dt, apart)
        _stacked_matmul(edges[3:] + edges[:3], gz, w_t, g, grad_h, workspace, apart)
        gw = _stacked_matmul_tn(edges, features, gz, workspace, apart)
        return grad_h, gw[:d], gw[d:2 * d], gw[2 * d:], grad_bias


_ALL = np.empty(0, np.int64)   # lookup_layer's nodes: every node


class LookupSaved(NamedTuple):
    """What :meth:`LookupMessagePassing.vjp` needs: the graph's edges both
    ways, the table's row count, each node's code, the nodes grouped by
    code, the codes' rows, the layer's ``tanh``, the weights side by side,
    and the nodes computed (None: all). Beside them, ``finite``: whether the
    output is finite, as the kernel that wrote it found (None: not
    checked), which the encoder reads instead of scanning the output."""

    edges: tuple
    V: int
    codes: np.ndarray
    group: np.ndarray
    order: np.ndarray
    used: np.ndarray
    rows: np.ndarray
    t: np.ndarray
    w_cat: np.ndarray
    nodes: object
    finite: Optional[bool] = None


class LookupMessagePassing(Operation):
    """:class:`MessagePassing` of looked-up rows, its products taken on the
    table: ``MessagePassing(graph, table[rows], ...)``, as a text model's
    first layer is.

    A node's row of ``h W_self + P W_pred + S W_succ`` is a sum of rows of
    ``T = E [W_self | W_pred | W_succ]``, ``E`` the U distinct rows of the
    table the nodes read: its own row's first block and its neighbours'
    second and third. So the products cost ``U d^2`` instead of ``n d^2``
    (a few hundred characters under tens of thousands of nodes), forward and
    back; the weight gradients are ``E^T`` times the nodes' gradients summed
    by row. The same function as the composition, up to rounding (its sums
    run in another order: near the dtype's limit a row's product can
    overflow where the composition's sum of rows would have cancelled
    first). The vjp returns the dense gradient of the table, as
    :class:`Lookup`'s does. O((n + E) d + U d^2 + V).

    Examples
    --------
    >>> g = Graph.from_text("abab")
    >>> table = np.eye(2)
    >>> W = np.eye(2)
    >>> (h,), saved = LookupMessagePassing().forward(g, table, [0, 1, 0, 1], W, W, W,
    ...                                              np.zeros(2))
    >>> (plain,), _ = MessagePassing().forward(g, table[[0, 1, 0, 1]], W, W, W, np.zeros(2))
    >>> bool(np.allclose(h, plain))
    True
    >>> LookupMessagePassing().vjp(saved, np.ones((4, 2)))[0].shape
    (2, 2)
    """

    inputs = ("table", "w_self", "w_pred", "w_succ", "bias")
    outputs = ("features",)

    @one_pool   # its products call BLAS from OpenMP threads: BLAS on one
    def forward(self, graph, table, rows, w_self, w_pred, w_succ, bias, workspace=None,
                name=""):
        """``rows`` (n,): the table row of each node. ``workspace`` and
        ``name``: as for :meth:`MessagePassing.forward`, the result under
        ``name`` + "out". The rows the nodes read must be finite (checked);
        the others are not read."""
        _check_place(workspace, name)
        check_graph(graph, "graph")
        table = as_float_array(table, "table", ndim=2, finite=False, dtype=KEEP)
        rows = table_rows(rows, table.shape[0], graph.num_nodes)
        return self._forward(graph, table, rows, w_self, w_pred, w_succ, bias, workspace,
                             name)

    def _forward(self, graph, table, rows, w_self, w_pred, w_succ, bias, workspace=None,
                 name="", table_name="table", nodes=None, edges=None):
        """:meth:`forward` of a checked graph, a C-contiguous 2-d ``table`` and
        int64 ``rows`` in its range: the rows read are checked finite here
        (under ``table_name``; None: the caller has scanned the whole table,
        the encoder's output of the layer before), O(U d), and the weights,
        O(d^2). ``nodes``
        (k,) int64: the output rows of those nodes only (an encoder's
        contexts), and the vjp takes their (k, d) gradient. ``edges``: the
        graph's :func:`_both_ways`, if the caller has it."""
        n, (V, d), dt = rows.shape[0], table.shape, table.dtype
        w_self = as_float_array(w_self, "w_self", shape=(d, d), dtype=dt)
        w_pred = as_float_array(w_pred, "w_pred", shape=(d, d), dtype=dt)
        w_succ = as_float_array(w_succ, "w_succ", shape=(d, d), dtype=dt)
        bias = as_float_array(bias, "bias", shape=(d,), dtype=dt)
        apart = {"table": table, "bias": bias}
        ints = {}
        for key, size in (("mark", V), ("used", n), ("codes", n), ("group", n + 1),
                          ("order", n)):
            ints[key] = _alloc(workspace, name + key, None, None, np.int64, {"rows": rows},
                               shape=(size,))
        U = _core.group_rows(rows, ints["mark"], ints["used"], ints["codes"], ints["group"],
                             ints["order"])
        used, codes, group = ints["used"][:U], ints["codes"], ints["group"][:U + 1]
        E = _alloc(workspace, name + "rows", U, d, dt, apart)
        _core.take_rows(table, used, E)
        if table_name is not None:   # finite: the rows the nodes read
            as_float_array(E, table_name, dtype=KEEP)
        w_cat = np.concatenate([w_self, w_pred, w_succ], axis=1)   # (d, 3d)
        products = _matmul(E, w_cat, _alloc(workspace, name + "products", U, 3 * d, dt,
                                            apart))
        edges = _both_ways(graph) if edges is None else edges
        k = n if nodes is None else nodes.shape[0]
        t = _alloc(workspace, name + "t", k, d, dt, apart)
        out = _alloc(workspace, name + "out", k, d, dt, apart)
        finite = _products.lookup_layer(*edges, codes, _ALL if nodes is None else nodes,
                                        products, bias, E, t, out)
        if not _products.NUMPY_TANH:   # the tail, by numpy's tanh
            np.tanh(t, out=t)
            np.add(E[codes if nodes is None else codes[nodes]], t, out=out)
        saved = LookupSaved(edges, V, codes, group, ints["order"], used, E, t, w_cat, nodes,
                            finite)
        return MessageResult(out), saved

    @one_pool
    def vjp(self, saved, grad_features, workspace=None, name=""):
        """``workspace``: as for :meth:`forward`. Returns the gradients of the
        (V, d) table, the three weights and the bias."""
        _check_place(workspace, name)
        edges, V, codes, group, order, used, E, t, w_cat, nodes, _ = saved
        (n, d), U, dt = t.shape, E.shape[0], t.dtype
        if grad_features is None:
            return (np.zeros((V, d), dt), np.zeros((d, d), dt), np.zeros((d, d), dt),
                    np.zeros((d, d), dt), np.zeros(d, dt))
        g = optional_grad(grad_features, "grad_features", (n, d), finite=False, dtype=dt)
        apart = {"grad_features": g}
        gz, grad_bias = _alloc(workspace, _SCRATCH + "gz", n, d, dt, apart), np.empty(d, dt)
        _core.tanh_backward(t, g, gz, grad_bias)   # gz = g (1 - t^2)
        # by row u of the table: rg = the sum of its nodes' g (the residual),
        # rz = of their [gz, S gz, P gz], the adjoints of [h, P, S]
        rg = _alloc(workspace, name + "rg", U, d, dt, apart)
        rz = _alloc(workspace, name + "rz", U, 3 * d, dt, apart)
        if nodes is None:
            _core.lookup_layer_backward(*edges, group, order, g, gz, rg, rz)
        else:
            _core.lookup_layer_backward_at(*edges, codes, nodes, g, gz, rg, rz)
        gw = _matmul_tn(E, rz, workspace, name)               # (d, 3d) = E^T rz
        grad_rows = _matmul(rz, w_cat, _alloc(workspace, name + "grad", U, d, dt, apart),
                            transpose_b=True, init=rg)        # rg + rz [W]^T
        grad_table = np.zeros((V, d), dt)
        grad_table[used] = grad_rows
        return (grad_table, np.ascontiguousarray(gw[:, :d]),
                np.ascontiguousarray(gw[:, d:2 * d]), np.ascontiguousarray(gw[:, 2 * d:]),
                grad_bias)


class LinearResult(NamedTuple):
    features: np.ndarray


class Linear(Operation):
    """``y = x W``: a learned projection (the routing's queries and keys).

    Examples
    --------
    >>> (y,), saved = Linear().forward(np.ones((2, 3)), np.eye(3))
    >>> y.tolist(), Linear().vjp(saved, np.ones((2, 3)))[1].tolist()
    ([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]], [[2.0, 2.0, 2.0], [2.0, 2.0, 2.0], [2.0, 2.0, 2.0]])
    """

    inputs = ("features", "weight")
    outputs = ("features",)

    @one_pool   # its products call BLAS from OpenMP threads: BLAS on one
    def forward(self, features, weight, workspace=None, name=""):
        """``workspace``: as for :meth:`MessagePassing.forward`, the result
        under ``name`` + "out"; ``features`` and ``weight`` are kept by
        reference for the vjp, as there."""
        _check_place(workspace, name)
        features = as_float_array(features, "features", ndim=2, dtype=KEEP)
        return self._forward(features, weight, workspace, name)

    def _forward(self, features, weight, workspace=None, name=""):
        """:meth:`forward` of (n, d) C-contiguous ``features`` checked by the
        caller (the encoder); ``weight`` is checked here."""
        weight = as_float_array(weight, "weight", shape=(features.shape[1], None),
                                dtype=features.dtype)
        out = _alloc(workspace, name + "out", features.shape[0], weight.shape[1],
                     features.dtype, {"features": features, "weight": weight})
        return LinearResult(_matmul(features, weight, out)), (features, weight)

    @one_pool
    def vjp(self, saved, grad_features, workspace=None, name=""):
        """The input gradient under ``name`` + "grad" of ``workspace``."""
        _check_place(workspace, name)
        x, w = saved
        if grad_features is None:
            return np.zeros_like(x), np.zeros_like(w)
        grad_features = optional_grad(grad_features, "grad_features", (x.shape[0], w.shape[1]),
                                      finite=False, dtype=x.dtype)
        gx = _alloc(workspace, name + "grad", *x.shape, x.dtype,
                    {"grad_features": grad_features, "features": x})
        return self._vjp(saved, grad_features, gx, workspace, name)

    def _vjp(self, saved, grad_features, gx, workspace=None, name="", init=None):
        """:meth:`vjp` of a checked ``grad_features``, the input gradient
        written into ``gx`` (overlapping neither), plus ``init`` if given
        (``gx`` itself: accumulate, as the encoder sums its two
        projections' gradients). Returns ``(gx, weight gradient)``."""
        x, w = saved
        _matmul(grad_features, w, gx, True, init)
        return gx, _matmul_tn(x, grad_features, workspace, name, ("features", "grad_features"))


class RoutedSimilarity(Operation):
    """Cosine of a node's query and its successor's key, ``cos(q_u, k_v)``.

    With queries and keys both the features (projections at the identity)
    this is :class:`EdgeSimilarity`. O((n + E) d).
    """

    inputs = ("queries", "keys")
    outputs = ("similarity",)

    def forward(self, graph, queries, keys):
        check_graph(graph, "graph")
        queries = check_features(graph, queries, "queries")
        keys = as_float_array(keys, "keys", shape=queries.shape, dtype=queries.dtype)
        return self._forward(graph, queries, keys)

    def _forward(self, graph, queries, keys):
        """:meth:`forward` of checked arguments (the morph checks its own)."""
        n = graph.num_nodes
        sim, qn, kn = np.empty(graph.num_edges), np.empty(n), np.empty(n)
        _core.edge_cosine_qk(graph.indptr, graph.indices, queries, keys, qn, kn, sim)
        scale = None
        if n and not (_core.all_finite(qn) and _core.all_finite(kn)
                      and _core.all_finite(sim)):
            # as EdgeSimilarity: rows whose |.|^2 overflows are rescaled (the
            # cosine does not change) and so are their gradient rows
            scale = (_row_scale(queries), _row_scale(keys))
            with np.errstate(invalid="ignore"):   # inf / inf: refused below
                queries = (queries / scale[0][:, None]).astype(keys.dtype, copy=False)
                keys = (keys / scale[1][:, None]).astype(queries.dtype, copy=False)
            _core.edge_cosine_qk(graph.indptr, graph.indices, queries, keys, qn, kn, sim)
            if not _core.all_finite(sim):
                # finite rows always rescale to finite cosines: the caller
                # passed unchecked queries or keys with inf or NaN
                raise ValueError("queries and keys must be finite (an edge's query or key "
                                 "contains NaN or inf)")
        return SimilarityResult(sim), (graph.indptr, graph.indices, queries, keys, qn, kn, sim,
                                       scale)

    def vjp(self, saved, grad_similarity, workspace=None):
        """``workspace``: as for :meth:`MessagePassing.forward`, the
        gradients under "routing.grad_queries" and "routing.grad_keys"."""
        _check_place(workspace)
        indptr, indices, q, k, qn, kn, sim, scale = saved
        gq = _alloc(workspace, "routing.grad_queries", *q.shape, q.dtype)
        gk = _alloc(workspace, "routing.grad_keys", *k.shape, k.dtype)
        grad_similarity = optional_grad(grad_similarity, "grad_similarity", sim.shape,
                                        finite=False)
        if grad_similarity is None:
            gq[...] = 0.0
            gk[...] = 0.0
        else:   # written row by row on the kernel's threads, no zeroing pass
            _core.edge_cosine_qk_backward(indptr, indices, q, k, qn, kn, sim,
                                          grad_similarity, gq, gk, accumulate=False)
        if scale is not None:
            gq /= scale[0][:, None]
            gk /= scale[1][:, None]
        return gq, gk


# ---------------------------------------------------------------------------
class LossValues(NamedTuple):
    values: np.ndarray
    result: object


class StructuralLossOp(Operation):
    """The structural loss of every pair as an operation.

    ``forward(predicted, target, activation, mass, weights,
    target_activation)`` scores ``predicted`` (with those node activations,
    masses and edge weights) against ``target`` (with those activations) and
    returns the per-pair ``values`` (B,) and the full
    :class:`grapheme.LossResult`; the vjp takes the upstream gradient of
    ``values``. See :class:`grapheme.StructuralLoss`.
    """

    inputs = ("activation", "mass", "weights", "target_activation")
    outputs = ("values",)

    def __init__(self, loss):
        self.loss = loss

    def forward(self, predicted, target, activation, mass, weights, target_activation):
        n, m = predicted.num_nodes, target.num_nodes
        mass = as_float_array(mass, "mass", shape=(n,))
        if (mass < 0).any():
            raise ValueError("mass must be non-negative")
        p = predicted._with(activation=as_float_array(activation, "activation", shape=(n,)),
                            mass=mass,
                            weights=as_float_array(weights, "weights",
                                                   shape=(predicted.num_edges,)))
        t = target._with(activation=as_float_array(target_activation, "target_activation",
                                                   shape=(m,)))
        result = self.loss.forward(p, t)
        return LossValues(result.values, result), result

    def vjp(self, saved, grad_values):
        B = saved.values.shape[0]
        grad = self.loss.backward(saved, np.zeros(B) if grad_values is None else grad_values)
        return grad.activation, grad.mass, grad.weights, grad.target_activation

    def __repr__(self):
        return f"StructuralLossOp({self.loss!r})"
