"""Gradient estimators for the merge decisions of :class:`grapheme.Morpher` (private).

The morpher computes similarities ``s_e``, a threshold ``tau = sigmoid(theta)``
and merge probabilities ``p_e = sigmoid((s_e - tau) / T)``; this module turns
them into decisions and, in the backward pass, into gradients for ``s``
(hence the features) and ``theta``. See DESIGN.md, "Gradient estimators".

- ``history``: hard decisions, gradient through the merge history only;
  ``theta`` gets nothing from the loss (the loss is piecewise constant in it).
- ``soft``: the chain relaxation with ``m = p`` (exact gradient of a smooth
  function).
- ``ste``: the hard morph, with the gradient of the chain relaxation taken at
  the hard ``m``.
- ``reinforce``: ``m ~ Bernoulli(p)``; pathwise gradient through the history
  plus ``(L - b) grad log P(m)`` with a baseline ``b`` independent of the
  current sample.

Everything here is vectorised numpy around the O(n d) kernels of
``_relax.pyx``; nothing loops over nodes in Python.
"""
import numpy as np

from . import _relax
from ._validation import check_out, streams
from .graph import Graph

__all__ = [
    "ESTIMATORS",
    "BASELINES",
    "check_estimator",
    "check_baseline",
    "sigmoid",
    "chain_sources",
    "relax_chain",
    "relax_chain_backward",
    "rate_penalty",
    "score_coefficients",
    "MeanBaseline",
    "loo_baseline",
    "replicate",
    "head_graph",
    "score_gradient",
]

ESTIMATORS = ("history", "soft", "ste", "reinforce")
BASELINES = (None, "mean", "loo")


def check_estimator(estimator):
    """Return ``estimator`` if it names an estimator, else raise ``ValueError``."""
    if not isinstance(estimator, str) or estimator not in ESTIMATORS:
        raise ValueError(
            f"estimator must be one of {', '.join(map(repr, ESTIMATORS))}; got {estimator!r}"
        )
    return estimator


def check_baseline(baseline):
    """Return ``baseline`` if it names a baseline, else raise ``ValueError``."""
    if baseline is not None and (not isinstance(baseline, str) or baseline not in BASELINES):
        raise ValueError(
            f"baseline must be one of {', '.join(map(repr, BASELINES))}; got {baseline!r}"
        )
    return baseline


def sigmoid(x):
    """Numerically stable logistic function, elementwise (float64)."""
    x = np.asarray(x, dtype=np.float64)
    out = np.empty_like(x)
    pos = x >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-x[pos]))
    ex = np.exp(x[~pos])
    out[~pos] = ex / (1.0 + ex)
    return out


def chain_sources(indptr, indices, estimator):
    """Source node of every edge of a chain-shaped candidate graph.

    A graph is chain-shaped when every edge goes ``u -> u + 1`` and no node has
    more than one out-edge (what :meth:`Graph.from_text` and
    :meth:`Graph.from_texts` produce). ``soft`` and ``ste`` need this: on
    general graphs the expected clustering under independent merges is
    #P-hard (it contains network reliability).

    Returns
    -------
    src : ndarray of int64, shape (E,)

    Raises
    ------
    ValueError
        If the graph is not chain-shaped.
    """
    deg = np.diff(indptr)
    src = np.repeat(np.arange(deg.shape[0], dtype=np.int64), deg)
    if (deg > 1).any() or not np.array_equal(indices, src + 1):
        raise ValueError(
            f"estimator={estimator!r} needs chain-shaped candidate edges (every edge "
            "u -> u+1, at most one out-edge per node); the expected clustering on "
            "general graphs is #P-hard (network reliability). Use "
            "estimator='reinforce' (or 'history') for general graphs."
        )
    return src


def _outputs(names, buffers, shapes, inputs):
    """Caller's output buffers checked, missing ones allocated
    (``np.empty``); and whether the first is the caller's buffer.

    Every given buffer must pass :func:`check_out` against ``inputs`` (a dict
    ``{name: array}``) and the given buffers before it (so no two outputs
    overlap either).
    """
    result, given = [], []
    others = dict(inputs)
    for name, buf, shape in zip(names, buffers, shapes):
        if buf is None:
            buf, mine = np.empty(shape), False
        else:
            check_out(buf, name, shape, inputs=others)
            others[name] = buf
            mine = True
        result.append(buf)
        given.append(mine)
    return result, given[0]


def _same_memory(a, b):
    """Whether C-contiguous arrays ``a`` and ``b`` of one shape hold the same bytes."""
    return a is b or (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)
                      and np.may_share_memory(a, b)
                      and a.__array_interface__["data"][0] == b.__array_interface__["data"][0])


def relax_chain(H, m, out=None, D=None, mass=None):
    """Relaxed chain merge: features ``h' = N / D`` and masses ``mu``.

    Parameters
    ----------
    H : ndarray of float64, shape (n, d), C-contiguous
    m : ndarray of float64, shape (n,), values in [0, 1]
        ``m[i]`` is the merge weight of the edge ``i -> i+1`` (0 where there
        is none). ``m[n - 1]`` is ignored.
    out, D, mass : ndarray, optional
        Buffers to write the results into, as numpy's ``out=``: float64,
        C-contiguous, aligned, writeable, of exactly the shape returned, and
        overlapping neither an input nor each other (checked before any
        work). A given ``out`` of at least
        ``grapheme._core.STREAM_MIN_BYTES`` is written with streaming stores.

    Returns
    -------
    out : ndarray, shape (n, d)
    D : ndarray, shape (n,)
        Relaxed cluster sizes (needed by :func:`relax_chain_backward`).
    mass : ndarray, shape (n,)
        ``1 - m[i - 1]``, ``mass[0] = 1``.
        (Each is the caller's buffer if one was given.)

    Notes
    -----
    O(n d) time. Trusts ``H`` and ``m`` (the morpher validates).
    """
    n, d = H.shape
    (out, D, mass), given = _outputs(("out", "D", "mass"), (out, D, mass),
                                     ((n, d), (n,), (n,)), {"H": H, "m": m})
    stream = given and streams(out)
    _relax.relax_chain_forward(H, m, out, D, mass, stream)
    return out, D, mass


def relax_chain_backward(m, out, D, grad_out, grad_mass, overwrite=False, grad_H=None,
                         grad_m=None):
    """Adjoint of :func:`relax_chain`: ``(grad_H, grad_m)``. O(n d).

    Trusts ``m``, ``out``, ``D`` (from :func:`relax_chain`), ``grad_out`` and
    ``grad_mass``. ``grad_H`` and ``grad_m`` are optional buffers for the
    results, checked as in :func:`relax_chain`; ``grad_H`` may be
    ``grad_out`` itself (computed in place) but overlap no other array.
    ``overwrite=True`` is the same as ``grad_H=grad_out``: it saves an (n, d)
    allocation, and ``grad_out`` is then checked as an output buffer.

    A given ``grad_H`` of at least ``grapheme._core.STREAM_MIN_BYTES`` is
    written with streaming stores, unless it is ``grad_out``: rows read just
    before being overwritten are in cache, and streaming them out was
    measured twice as slow.
    """
    n, d = out.shape
    if overwrite:
        if grad_H is not None and not _same_memory(grad_H, grad_out):
            raise ValueError("grad_H must be grad_out or None with overwrite=True")
        grad_H = grad_out
    in_place = grad_H is not None and _same_memory(grad_H, grad_out)
    inputs = {"m": m, "out": out, "D": D, "grad_mass": grad_mass}
    if not in_place:
        inputs["grad_out"] = grad_out
    name = "grad_out" if overwrite else "grad_H"
    (grad_H, grad_m), given = _outputs((name, "grad_m"), (grad_H, grad_m), ((n, d), (n,)),
                                       inputs)
    stream = given and not in_place and streams(grad_H)
    _relax.relax_chain_backward(m, out, D, grad_out, grad_mass, grad_H, grad_m, stream)
    return grad_H, grad_m


def rate_penalty(p, n, target_rate, rate_weight, multiplier=0.0):
    """Compression-rate penalty and its gradient with respect to ``p``.

    With the expected compression ``rho = E[k] / n`` and the expected number
    of output nodes ``E[k] = n - sum_e p_e`` (each merged edge of a forest
    removes exactly one component, so this is exact whenever the candidate
    edges form a forest: chains and batches of chains included), the
    penalty is the augmented Lagrangian
    ``multiplier * (rho - target_rate) + rate_weight * (rho - target_rate)^2``.
    With ``multiplier = 0`` it is the plain quadratic penalty.

    Returns
    -------
    value : float
    grad_p : ndarray, shape (E,)
    """
    if n == 0:
        return 0.0, np.zeros_like(p)
    gap = (n - p.sum()) / n - target_rate
    value = multiplier * gap + rate_weight * gap * gap
    grad_p = np.full_like(p, -(multiplier + 2.0 * rate_weight * gap) / n)
    return float(value), grad_p


def score_coefficients(decisions, p, temperature):
    """``d log P(m) / d s_e = (m_e - p_e) / T`` for Bernoulli(p) decisions.

    With ``p = sigmoid((s - tau) / T)``, ``d log P / d p = m/p - (1-m)/(1-p)``
    and ``dp/ds = p (1 - p) / T`` combine into this form, which stays finite
    when ``p`` saturates. ``d log P / d tau`` is its negative.
    """
    return (decisions - p) / temperature


class MeanBaseline:
    """Running mean of all past per-example losses (0 before the first).

    :meth:`value` is read before :meth:`update`, so the baseline of a step
    never depends on that step's samples and REINFORCE stays unbiased.
    """

    __slots__ = ("total", "count")

    def __init__(self):
        self.total = 0.0
        self.count = 0

    def value(self):
        return self.total / self.count if self.count else 0.0

    def update(self, losses):
        self.total += float(np.sum(losses))
        self.count += int(np.size(losses))


def loo_baseline(losses, samples):
    """Leave-one-out baseline over ``samples`` replicas of every example.

    ``losses`` is sample-major: entry ``k * B + b`` is sample ``k`` of example
    ``b``. The baseline of a sample is the mean loss of the other
    ``samples - 1`` samples of the same example; they are independent of it,
    so the estimator stays unbiased.
    """
    L = losses.reshape(samples, -1)
    return ((L.sum(axis=0, keepdims=True) - L) / (samples - 1)).ravel()


def replicate(graph, copies):
    """``copies`` copies of ``graph`` as one batch, sample-major.

    Copy ``k`` of graph ``b`` of a batch of ``B`` graphs is graph ``k * B + b``
    of the result (node ``k * n + i``), so features replicate with
    ``np.tile(features, (copies, 1))`` and gradients fold back with
    ``grad.reshape(copies, n, d).sum(0)``. O(copies (n + E)).
    """
    if copies == 1:
        return graph
    n, E = graph.num_nodes, graph.num_edges
    big = copies * max(n, E) >= np.iinfo(np.int32).max
    dtype = np.int64 if big else graph.indptr.dtype
    k = np.arange(copies, dtype=np.int64)[:, None]
    indptr = np.concatenate(
        [np.zeros(1, np.int64), (graph.indptr[1:][None, :] + E * k).ravel()]).astype(dtype)
    indices = (graph.indices[None, :] + n * k).ravel().astype(dtype)
    offsets = graph.offsets if graph.offsets is not None else np.array([0, n], np.int64)
    offsets = np.concatenate([np.zeros(1, np.int64), (offsets[1:][None, :] + n * k).ravel()])

    def tile(a):
        return None if a is None else np.tile(a, (copies,) + (1,) * (a.ndim - 1))

    return Graph._trusted(indptr, indices, np.tile(graph.labels, copies),
                          features=tile(graph.features), weights=tile(graph.weights),
                          mass=tile(graph.mass), activation=tile(graph._activation),
                          offsets=offsets)


def head_graph(graph, history, edges, features, mass):
    """The n-node form of a morph: contracted edges re-indexed to head nodes.

    ``edges`` is the contracted CSR ``(indptr, indices, weights)`` over the
    ``k`` outputs of ``history`` (numbered in the order of their heads); the
    result keeps every input node and label, carries ``features`` and
    ``mass``, and has an edge ``head(c) -> head(c')`` for every contracted
    edge ``c -> c'``. Zero-mass nodes have no edges. O(n + E).
    """
    k_indptr, k_indices, weights = edges
    heads = history.heads
    dtype = graph.indptr.dtype
    counts = np.zeros(graph.num_nodes, dtype=dtype)
    counts[heads] = np.diff(k_indptr)
    indptr = np.zeros(graph.num_nodes + 1, dtype=dtype)
    np.cumsum(counts, out=indptr[1:])
    indices = heads[k_indices].astype(dtype, copy=False)
    return Graph._trusted(indptr, indices, graph.labels, features=features,
                          weights=weights, mass=mass, offsets=graph.offsets)


def score_gradient(graph, decisions, p, temperature, losses, baseline):
    """Score-function part of REINFORCE, as a gradient with respect to ``s``.

    The objective is the mean of ``losses`` over the examples (graphs) of
    ``graph``; the estimate is
    ``(1 / B) sum_b (L_b - b_b) d log P(m_b) / d s`` with
    ``d log P / d s_e = (m_e - p_e) / T`` for the edges of example ``b``.

    Parameters
    ----------
    graph : Graph
        The (possibly replicated) input graph the decisions were drawn on.
    decisions : ndarray of bool, shape (E,)
    p : ndarray, shape (E,)
    temperature : float
    losses : ndarray, shape (B,)
    baseline : ndarray, shape (B,) or float

    Returns
    -------
    grad_s : ndarray, shape (E,)
    per_example : ndarray, shape (B,)
        ``(L_b - b_b) sum_{e in b} (m_e - p_e) / T``: each example's own
        estimate of ``d E[L_b] / d tau`` with the sign of ``s`` (the caller
        scales it to ``theta``).
    """
    B = losses.shape[0]
    coef = score_coefficients(decisions, p, temperature)
    if graph.offsets is None:
        example = np.zeros(graph.num_edges, dtype=np.intp)
    else:
        example = np.repeat(np.arange(B), np.diff(graph.indptr[graph.offsets]))
    advantage = losses - baseline
    grad_s = coef * (advantage[example] / B)
    per_example = advantage * np.bincount(example, weights=coef, minlength=B)
    return grad_s, per_example
