"""The learnable morpher: merges neighbouring nodes whose embeddings agree."""
import numpy as np

from . import _core
from ._validation import as_float_array, check_scalar
from .graph import Graph
from .history import MergeHistory

__all__ = ["Morpher", "Morphed", "merge_edges", "contract"]

ESTIMATORS = ("history",)


def _sigmoid(x):
    x = np.asarray(x, dtype=np.float64)
    out = np.empty_like(x)
    pos = x >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-x[pos]))
    ex = np.exp(x[~pos])
    out[~pos] = ex / (1.0 + ex)
    return out


def merge_edges(graph, merge):
    """Merge the endpoints of every selected edge; the history of the result.

    Clusters are the connected components of the selected edges (union-find,
    O(n alpha(n) + E)); the head of a cluster is its earliest node and
    clusters are numbered in the order of their heads.

    Parameters
    ----------
    graph : Graph
    merge : array_like of bool, shape (n_edges,)

    Returns
    -------
    MergeHistory

    Examples
    --------
    >>> g = Graph.from_text("abcd")
    >>> merge_edges(g, [False, True, True]).cluster.tolist()
    [0, 1, 1, 1]
    """
    _check_graph(graph, "graph")
    merge = np.asarray(merge)
    if merge.dtype != bool:
        raise TypeError(f"merge must be a boolean array, got dtype {merge.dtype}")
    if merge.shape != (graph.num_edges,):
        raise ValueError(f"merge must have shape ({graph.num_edges},), got {merge.shape}")
    cluster = np.empty(graph.num_nodes, dtype=graph.indptr.dtype)
    k = _core.components(graph.indptr, graph.indices,
                         np.ascontiguousarray(merge, dtype=np.uint8), cluster)
    return MergeHistory._trusted(cluster, k)


def contract(graph, history, features=None):
    """The graph of a merge: one node per output of ``history``.

    Labels are the heads' labels, features the members' (weighted) mean,
    edges ``(c(u), c(v))`` for every input edge with self-loops dropped and
    duplicates folded (their weights summed). Masses are 1. A batch stays a
    batch: output offsets follow the heads. O(n d + E).

    Parameters
    ----------
    graph : Graph
    history : MergeHistory
        A map from ``graph``'s nodes that never joins two graphs of a batch.
    features : ndarray of shape (n_nodes, d), optional
        Defaults to ``graph.features``.

    Returns
    -------
    Graph
    """
    _check_graph(graph, "graph")
    if not isinstance(history, MergeHistory):
        raise TypeError(f"history must be a MergeHistory, got {type(history).__name__}")
    if history.num_inputs != graph.num_nodes:
        raise ValueError(f"history has {history.num_inputs} inputs, "
                         f"graph has {graph.num_nodes} nodes")
    if features is None:
        features = graph.features
    elif features is not None:
        features = as_float_array(features, "features", ndim=2, shape=(graph.num_nodes, None))
    dtype = graph.indptr.dtype
    cluster = history.cluster.astype(dtype, copy=False)
    hist_indptr = history.indptr.astype(dtype, copy=False)
    members = history.members.astype(dtype, copy=False)
    weights = np.empty(0) if graph.weights is None else graph.weights
    indptr, indices, out_weights = _core.contract(graph.indptr, graph.indices, weights,
                                                  cluster, hist_indptr, members)
    heads = history.heads
    offsets = None
    if graph.offsets is not None:
        offsets = np.searchsorted(heads, graph.offsets).astype(np.int64)
        block = np.repeat(np.arange(graph.num_graphs), np.diff(graph.offsets))
        if ((history.cluster < offsets[block]) | (history.cluster >= offsets[block + 1])).any():
            raise ValueError("history merges nodes of different graphs of the batch")
    out_features = None if features is None else history.gather(features)
    return Graph._trusted(indptr, indices, graph.labels[heads], features=out_features,
                          weights=out_weights, offsets=offsets)


def _check_graph(graph, name):
    if not isinstance(graph, Graph):
        raise TypeError(f"{name} must be a grapheme.Graph, got {type(graph).__name__}")


class Morphed:
    """Everything a morph produced; unpacks as ``graph, history``.

    Attributes
    ----------
    graph : Graph
        The morphed graph (with features).
    history : MergeHistory
        The hard merge map from the input nodes to the merged nodes.
    similarity : ndarray of shape (n_edges,)
        Cosine similarity of every input edge.
    probability : ndarray of shape (n_edges,)
        Merge probability ``sigmoid((s - tau) / T)`` of every input edge.
    decisions : ndarray of bool, shape (n_edges,)
        The merge decision of every input edge.
    """

    __slots__ = ("graph", "history", "similarity", "probability", "decisions",
                 "input", "features", "norms", "estimator", "cache")

    def __init__(self, graph, history, similarity, probability, decisions, input,
                 features, norms, estimator, cache=None):
        self.graph, self.history = graph, history
        self.similarity, self.probability, self.decisions = similarity, probability, decisions
        self.input, self.features, self.norms = input, features, norms
        self.estimator, self.cache = estimator, cache

    def __iter__(self):
        yield self.graph
        yield self.history

    @property
    def merge_rate(self):
        """Fraction of input nodes merged away, ``1 - k / n`` (0 for an empty graph)."""
        n = self.history.num_inputs
        return 0.0 if n == 0 else 1.0 - self.history.num_outputs / n

    def __repr__(self):
        return (f"Morphed({self.history.num_inputs} -> {self.history.num_outputs} nodes, "
                f"estimator={self.estimator!r})")


class Morpher:
    """Merge neighbouring nodes whose embeddings are similar beyond a threshold.

    For every edge ``e = (u, v)`` the morpher computes the cosine similarity
    ``s_e`` of the endpoint features and the merge probability
    ``p_e = sigmoid((s_e - tau) / T)`` with the learnable threshold
    ``tau = sigmoid(theta)``. Merged edges are contracted: clusters are the
    connected components of the merged edges, each becomes one node whose
    features are its members' mean and whose label is its earliest member's.

    Parameters
    ----------
    threshold : float, default 0.8
        Initial raw threshold parameter ``theta`` (``tau = sigmoid(theta)``).
    temperature : float, default 0.1
        ``T > 0`` of the merge probabilities.
    estimator : {"history"}, default "history"
        How gradients pass the merge decisions. ``"history"``: hard
        decisions ``s_e > tau``; gradients reach the input features exactly
        through the recorded merge history and the threshold gets none (the
        loss is piecewise constant in ``theta``).

    Attributes
    ----------
    theta : ndarray of shape ()
        The raw threshold (a parameter: optimisers update it in place).
    grad_theta : ndarray of shape ()
        Accumulated gradient of ``theta``.

    Examples
    --------
    >>> import numpy as np
    >>> g = Graph.from_text("aab")
    >>> H = np.array([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]])
    >>> graph, history = Morpher(threshold=0.8).forward(g, H)
    >>> graph.to_text(), history.cluster.tolist()
    ('ab', [0, 0, 1])
    """

    def __init__(self, threshold=0.8, temperature=0.1, estimator="history"):
        self.theta = np.array(check_scalar(threshold, "threshold"))
        self.temperature = check_scalar(temperature, "temperature", lower=0,
                                        lower_inclusive=False)
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        self.estimator = estimator
        self.grad_theta = np.zeros(())

    @property
    def tau(self):
        """The merge threshold ``sigmoid(theta)`` on cosine similarity."""
        return float(_sigmoid(self.theta))

    def zero_grad(self):
        self.grad_theta = np.zeros(())

    def similarity(self, graph, features):
        """Cosine similarity of every edge; returns ``(similarity, norms)``. O((n + E) d)."""
        _check_graph(graph, "graph")
        features = as_float_array(features, "features", ndim=2, shape=(graph.num_nodes, None))
        sim = np.empty(graph.num_edges)
        norms = np.empty(graph.num_nodes)
        _core.edge_cosine(graph.indptr, graph.indices, features, norms, sim)
        return sim, norms

    def forward(self, graph, features):
        """Morph ``graph`` given node ``features`` (n_nodes, d).

        Returns
        -------
        Morphed
            Unpacks as ``(graph, history)``.

        Raises
        ------
        TypeError, ValueError
            If ``graph`` is not a Graph or ``features`` is not a finite
            (n_nodes, d) array.
        """
        _check_graph(graph, "graph")
        features = as_float_array(features, "features", ndim=2, shape=(graph.num_nodes, None))
        sim, norms = self.similarity(graph, features)
        tau = self.tau
        prob = _sigmoid((sim - tau) / self.temperature)
        decisions = sim > tau
        history = merge_edges(graph, decisions)
        out = contract(graph, history, features)
        return Morphed(out, history, sim, prob, decisions, graph, features, norms,
                       self.estimator)

    def backward(self, morphed, grad_features=None, grad_activation=None, grad_mass=None,
                 loss_values=None):
        """Gradient with respect to the input features, routed through the merges.

        ``dH[i] = w_i * dH'[c(i)]`` where ``dH'`` is the gradient of the
        output features (the activation gradient reaches them as
        ``grad_activation[:, None] / d``). O(n d). The history estimator
        leaves ``grad_theta`` unchanged (its loss is piecewise constant in
        ``theta``) and ignores ``grad_mass`` (merged nodes have mass 1).

        Parameters
        ----------
        morphed : Morphed
            The result of :meth:`forward`.
        grad_features : ndarray of shape (k, d), optional
        grad_activation : ndarray of shape (k,), optional
        grad_mass : ndarray of shape (k,), optional
        loss_values : ndarray of shape (n_graphs,), optional
            Per-graph loss values (used by sampling estimators).

        Returns
        -------
        ndarray of shape (n, d)
        """
        if not isinstance(morphed, Morphed):
            raise TypeError(f"morphed must be a Morphed, got {type(morphed).__name__}")
        grad_out = _output_gradient(morphed, grad_features, grad_activation, grad_mass)
        return morphed.history.scatter(grad_out)


def _output_gradient(morphed, grad_features, grad_activation, grad_mass):
    """Total gradient of the output features (k, d) from features and activations."""
    k = morphed.graph.num_nodes
    d = morphed.features.shape[1]
    grad = np.zeros((k, d))
    if grad_features is not None:
        grad += as_float_array(grad_features, "grad_features", ndim=2, shape=(k, d))
    if grad_activation is not None:
        ga = as_float_array(grad_activation, "grad_activation", ndim=1, shape=(k,))
        if d:
            grad += ga[:, None] / d
    if grad_mass is not None:
        as_float_array(grad_mass, "grad_mass", ndim=1, shape=(k,))
    return grad
