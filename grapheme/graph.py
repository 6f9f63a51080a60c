"""Graphs of characters stored as compressed sparse rows."""
import numpy as np

from . import _core
from ._validation import (KEEP, as_decisions, as_float_array, as_index_array, check_allocation,
                          check_graph, check_scalar, common_index_dtype, exact_str, frozen,
                          set_frozen_state, show)

__all__ = ["Graph", "merge_edges", "contract", "segmentation_target", "replicate",
           "chain_sources"]

MAX_CODE_POINT = 0x10FFFF

#: The fields of a Graph, as its constructor names them.
_FIELDS = ("indptr", "indices", "labels", "features", "weights", "mass", "activation",
           "offsets")


def _codes_of(text, name):
    """Code points of ``text`` as int32, rejecting lone surrogates."""
    try:
        raw = text.encode("utf-32-le")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"{name} contains a lone surrogate at position {exc.start} "
            f"({text[exc.start]!r}); text must be valid Unicode"
        ) from None
    return np.frombuffer(raw, dtype="<u4").astype(np.int32)


class Graph:
    """A directed graph of labelled nodes in compressed sparse row form.

    Graphs are values: operations return new graphs and never modify their
    inputs. A graph keeps private copies of the arrays it is given (checked
    after copying) and hands out read-only views of them, so changing the
    caller's arrays afterwards, or trying to write the graph's, cannot
    invalidate a checked graph. Immutable, hence safe to share between
    threads. A graph may be a *batch*: many graphs stored as one
    block-diagonal graph, with ``offsets`` marking where each one starts, so
    that kernels process the whole batch in one call.

    Parameters
    ----------
    indptr : array_like of int, shape (n_nodes + 1,)
        Row pointer: the out-edges of node ``u`` are
        ``indices[indptr[u]:indptr[u + 1]]``. int32 is kept when
        ``indices`` is int32 too; otherwise both become int64.
    indices : array_like of int, shape (n_edges,)
        Edge targets, each in ``[0, n_nodes)``.
    labels : array_like of int, shape (n_nodes,)
        Unicode code points (``0 <= label <= 0x10FFFF``). The label of a
        merged node is the label of its head.
    features : array_like of float, shape (n_nodes, n_features), optional
        Node features (finite).
    weights : array_like of float, shape (n_edges,), optional
        Edge weights (finite). ``None`` means every edge weighs 1.
    mass : array_like of float, shape (n_nodes,), optional
        Node masses (finite, non-negative). Defaults to 1 for every node.
    activation : array_like of float, shape (n_nodes,), optional
        Node activations. Defaults to the mean of ``features`` over the
        feature axis, or to 1 when there are no features.
    offsets : array_like of int, shape (n_graphs + 1,), optional
        Node offsets of the graphs of a batch; ``None`` for a single graph.
        No edge may cross from one graph of the batch to another.

    Raises
    ------
    TypeError
        If an array has a wrong dtype.
    ValueError
        If an array has a wrong shape, ``indptr`` is not a monotone row
        pointer starting at 0 and ending at ``len(indices)``, an index or
        label is out of range, or a float array holds NaN or infinity.

    Examples
    --------
    >>> g = Graph.from_text("abc")
    >>> g.num_nodes, g.num_edges
    (3, 2)
    >>> g.indices.tolist()
    [1, 2]
    >>> g.to_text()
    'abc'
    """

    __slots__ = ("_indptr", "_indices", "_labels", "_features", "_weights",
                 "_mass", "_activation", "_offsets")

    def __setstate__(self, state):   # a pickled or deep-copied one: read-only again
        set_frozen_state(self, state)

    def __init__(self, indptr, indices, labels, features=None, weights=None,
                 mass=None, activation=None, offsets=None, *, _owned=()):
        # Private copies first, then the checks run on the copies: nothing the
        # caller does to its arrays afterwards (or meanwhile, from another
        # thread) can reach a kernel. ``_owned`` names arguments that are
        # already frozen arrays of a Graph (``replace``), which need no copy.
        def own(name, arr):
            if name in _owned:
                return arr
            return np.array(arr, copy=True, order="C")

        indptr = own("indptr", as_index_array(indptr, "indptr"))
        indices = own("indices", as_index_array(indices, "indices"))
        labels = own("labels", as_index_array(labels, "labels"))
        if indptr.shape[0] < 1:
            raise ValueError("indptr must have length n_nodes + 1 >= 1, got length 0")
        n = indptr.shape[0] - 1
        if indptr[0] != 0:
            raise ValueError(f"indptr must start at 0, got {indptr[0]}")
        if indptr[-1] != indices.shape[0]:
            raise ValueError(
                f"indptr must end at len(indices) = {indices.shape[0]}, got {indptr[-1]}"
            )
        # compared, not subtracted: np.diff wraps in int64 ([0, 3 * 2**61,
        # -2**62, 2] passed, and every kernel read out of bounds)
        drops = indptr[1:] < indptr[:-1]
        if drops.any():
            bad = int(np.flatnonzero(drops)[0])
            raise ValueError(f"indptr must be non-decreasing; it drops after position {bad}")
        if indices.size and (indices.min() < 0 or indices.max() >= n):
            bad = indices[(indices < 0) | (indices >= n)][0]
            raise ValueError(f"indices must lie in [0, {n}), got {bad}")
        if labels.shape[0] != n:
            raise ValueError(f"labels must have length n_nodes = {n}, got {labels.shape[0]}")
        if labels.size and (labels.min() < 0 or labels.max() > MAX_CODE_POINT):
            bad = labels[(labels < 0) | (labels > MAX_CODE_POINT)][0]
            raise ValueError(f"labels must be Unicode code points in [0, 0x10FFFF], got {bad}")
        dtype = common_index_dtype(indptr, indices)
        self._indptr = frozen(indptr.astype(dtype, copy=False), copy=False)
        self._indices = frozen(indices.astype(dtype, copy=False), copy=False)
        self._labels = frozen(labels.astype(np.int32, copy=False), copy=False)

        def floats(name, value, shape, ndim, dtype=None):
            if value is None:
                return None
            arr = own(name, as_float_array(value, name, ndim=ndim, shape=shape, finite=False,
                                           dtype=dtype))
            # checked after the copy (as_float_array with finite=True checks
            # the caller's array, which could change before the copy)
            as_float_array(arr, name, dtype=dtype)
            return arr

        # features keep float32 (a float32 model's); every scalar is float64
        self._features = frozen(floats("features", features, (n, None), 2, KEEP), copy=False)
        self._weights = frozen(floats("weights", weights, (indices.shape[0],), 1), copy=False)
        if mass is None:
            self._mass = frozen(np.ones(n), copy=False)
        else:
            mass = floats("mass", mass, (n,), 1)
            if (mass < 0).any():
                raise ValueError("mass must be non-negative")
            self._mass = frozen(mass, copy=False)
        self._activation = frozen(floats("activation", activation, (n,), 1), copy=False)
        self._offsets = None
        if offsets is not None:
            self._offsets = frozen(_check_offsets(offsets, n, self._indptr, self._indices),
                                   copy=False)

    @classmethod
    def _trusted(cls, indptr, indices, labels, features=None, weights=None,
                 mass=None, activation=None, offsets=None):
        """Build from arrays produced by our own kernels, skipping validation.

        The arrays become the graph's own: they are frozen in place (made
        read-only), so the caller must not write them afterwards.
        """
        g = cls.__new__(cls)
        g._indptr, g._indices, g._labels = (frozen(indptr, copy=False),
                                            frozen(indices, copy=False),
                                            frozen(labels, copy=False))
        g._features, g._weights, g._activation, g._offsets = (
            frozen(features, copy=False), frozen(weights, copy=False),
            frozen(activation, copy=False), frozen(offsets, copy=False))
        g._mass = frozen(np.ones(labels.shape[0]) if mass is None else mass, copy=False)
        return g

    # ------------------------------------------------------------------ build
    @classmethod
    def from_text(cls, text):
        """The chain graph of a string: one node per code point, edges i -> i+1.

        Node activations are 1.0, as in the original experiments. O(n).

        Parameters
        ----------
        text : str
            Any valid Unicode string, including the empty string.

        Raises
        ------
        TypeError
            If ``text`` is not a ``str``.
        ValueError
            If ``text`` contains a lone surrogate.

        Examples
        --------
        >>> Graph.from_text("héllo").labels.tolist()[:2]
        [104, 233]
        >>> Graph.from_text("").num_nodes
        0
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        codes = _codes_of(exact_str(text), "text")
        return cls._from_codes(codes, np.array([codes.shape[0]], dtype=np.int64), None)

    @classmethod
    def from_texts(cls, texts):
        """Many chain graphs as one block-diagonal batch, built in one kernel call.

        Parameters
        ----------
        texts : sequence of str

        Returns
        -------
        Graph
            A batch with ``num_graphs == len(texts)``; ``unbatch()`` splits it.

        Examples
        --------
        >>> g = Graph.from_texts(["ab", "", "xyz"])
        >>> g.num_graphs, g.num_nodes, g.num_edges
        (3, 5, 3)
        >>> [h.to_text() for h in g.unbatch()]
        ['ab', '', 'xyz']
        """
        if isinstance(texts, str) or not hasattr(texts, "__iter__"):
            raise TypeError("texts must be a sequence of str, "
                            f"got {type(texts).__name__}")
        try:
            texts = list(texts)
        except TypeError:
            raise TypeError("texts must be a sequence of str, "
                            f"got {type(texts).__name__}") from None
        try:
            joined = "".join(texts)   # accepts str (and subclasses) only
        except TypeError:
            for i, t in enumerate(texts):
                if not isinstance(t, str):
                    raise TypeError(f"texts[{i}] must be a str, "
                                    f"got {type(t).__name__}") from None
            raise  # pragma: no cover - join only refuses non-str items
        # str.__len__: a subclass's own __len__ could disagree with its characters
        lengths = np.fromiter(map(str.__len__, texts), dtype=np.int64, count=len(texts))
        try:
            codes = _codes_of(joined, "texts")
        except ValueError:
            for i, t in enumerate(texts):
                _codes_of(t, f"texts[{i}]")
            raise  # pragma: no cover - one of the texts must have raised
        offsets = np.zeros(len(texts) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return cls._from_codes(codes, lengths, offsets)

    @classmethod
    def chains(cls, offsets, labels=None):
        """A batch of chains (edges ``i -> i+1`` inside each) from node offsets.

        What a packed batch of sequences is, as PyTorch users hold them:
        sequence ``b`` is nodes ``offsets[b]:offsets[b + 1]``. O(n).

        Parameters
        ----------
        offsets : array_like of int, shape (B + 1,)
            Non-decreasing, starting at 0.
        labels : array_like of int, shape (offsets[-1],), optional
            Unicode code points (the structural loss compares them); 0 for
            every node by default.

        Examples
        --------
        >>> g = Graph.chains([0, 2, 2, 5])
        >>> g.num_graphs, g.indices.tolist()
        (3, [1, 3, 4])
        """
        offsets = _chain_offsets(offsets)
        lengths = np.diff(offsets)
        n = int(offsets[-1])
        # labels, indptr, indices and the per-node scratch: refused before
        # offsets such as [0, 2**40] ask for terabytes
        check_allocation(24 * n, f"a batch of chains of {n} nodes (offsets[-1])")
        if labels is None:
            labels = np.zeros(n, np.int32)
        else:
            labels = as_index_array(labels, "labels")
            if labels.shape[0] != n:
                raise ValueError(f"labels must have length offsets[-1] = {n}, "
                                 f"got {labels.shape[0]}")
            if labels.size and (labels.min() < 0 or labels.max() > MAX_CODE_POINT):
                raise ValueError("labels must be Unicode code points in [0, 0x10FFFF]")
            labels = labels.astype(np.int32)
        return cls._from_codes(labels, lengths, offsets.copy())

    @classmethod
    def _from_codes(cls, codes, lengths, offsets):
        n = codes.shape[0]
        n_edges = n - int(np.count_nonzero(lengths))
        dtype = np.int32 if n < np.iinfo(np.int32).max else np.int64
        indptr = np.empty(n + 1, dtype=dtype)
        indices = np.empty(n_edges, dtype=dtype)
        _core.chain_csr(lengths, indptr, indices)
        return cls._trusted(indptr, indices, codes, activation=np.ones(n),
                            offsets=offsets)

    @classmethod
    def batch(cls, graphs):
        """Stack graphs into one block-diagonal graph that remembers its offsets.

        Features must be present on all graphs (with the same width) or on
        none; likewise weights and explicit activations. Batches are
        flattened: batching batches yields one batch of all their graphs.

        Examples
        --------
        >>> b = Graph.batch([Graph.from_text("ab"), Graph.from_text("c")])
        >>> b.offsets.tolist(), b.indices.tolist()
        ([0, 2, 3], [1])
        """
        graphs = list(graphs)
        for i, g in enumerate(graphs):
            if not isinstance(g, Graph):
                raise TypeError(f"graphs[{i}] must be a Graph, got {type(g).__name__}")
        parts = [p for g in graphs for p in (g.unbatch() if g._offsets is not None else [g])]
        sizes = np.array([p.num_nodes for p in parts], dtype=np.int64)
        offsets = np.zeros(len(parts) + 1, dtype=np.int64)
        np.cumsum(sizes, out=offsets[1:])
        n = int(offsets[-1])
        n_edges = sum(p.num_edges for p in parts)
        dtype = np.int32 if max(n, n_edges) < np.iinfo(np.int32).max else np.int64
        edge_offsets = np.zeros(len(parts) + 1, dtype=np.int64)
        np.cumsum([p.num_edges for p in parts], out=edge_offsets[1:])
        indptr = np.concatenate(
            [np.zeros(1, dtype)] + [p.indptr[1:].astype(dtype) + edge_offsets[i]
                                    for i, p in enumerate(parts)]
        ).astype(dtype)
        indices = np.concatenate(
            [np.empty(0, dtype)] + [p.indices.astype(dtype) + offsets[i]
                                    for i, p in enumerate(parts)]
        ).astype(dtype)
        labels = np.concatenate([np.empty(0, np.int32)] + [p.labels for p in parts])

        def stack(attr, what):
            present = [getattr(p, attr) is not None for p in parts]
            if not any(present):
                return None
            if not all(present):
                raise ValueError(f"graphs must all have {what} or none of them")
            return np.concatenate([getattr(p, attr) for p in parts])

        widths = [p.features.shape[1] for p in parts if p.features is not None]
        if widths and any(w != widths[0] for w in widths):
            where = [i for i, g in enumerate(graphs) if g.features is not None]
            bad = next(i for i in where if graphs[i].features.shape[1] != widths[0])
            raise ValueError(
                f"graphs must all have the same number of features: graphs[{where[0]}] "
                f"has {widths[0]}, graphs[{bad}] has {graphs[bad].features.shape[1]}")
        features = stack("_features", "features")
        weights = stack("_weights", "weights")
        activation = stack("_activation", "activations")
        mass = np.concatenate([np.empty(0)] + [p.mass for p in parts])
        return cls._trusted(indptr, indices, labels, features=features, weights=weights,
                            mass=mass, activation=activation, offsets=offsets)

    def unbatch(self):
        """Split a batch into its graphs (a single graph gives ``[self]``). O(n + E)."""
        if self._offsets is None:
            return [self]
        out = []
        offsets = self._offsets
        for b in range(offsets.shape[0] - 1):
            lo, hi = int(offsets[b]), int(offsets[b + 1])
            elo, ehi = int(self._indptr[lo]), int(self._indptr[hi])

            def part(arr, a, z):
                return None if arr is None else arr[a:z]

            out.append(Graph._trusted(
                self._indptr[lo:hi + 1] - self._indptr[lo],
                self._indices[elo:ehi] - lo,
                self._labels[lo:hi],
                features=part(self._features, lo, hi),
                weights=part(self._weights, elo, ehi),
                mass=self._mass[lo:hi],
                activation=part(self._activation, lo, hi),
            ))
        return out

    def replace(self, **fields):
        """A copy with some fields replaced (validated like the constructor).

        The others are kept as they are, an explicit activation included: a
        graph of :meth:`from_text` keeps its activations of 1.0 when given
        features, and the loss then passes the features no gradient. Give
        ``activation=None`` too for the mean of the new features.

        Examples
        --------
        >>> g = Graph.from_text("ab").replace(mass=[1.0, 0.0])
        >>> g.mass.tolist()
        [1.0, 0.0]
        >>> F = [[1.0, 3.0], [0.0, 1.0]]
        >>> Graph.from_text("ab").replace(features=F).activation.tolist()
        [1.0, 1.0]
        >>> Graph.from_text("ab").replace(features=F, activation=None).activation.tolist()
        [2.0, 0.5]
        """
        for key in fields:
            if key not in _FIELDS:
                raise TypeError(f"replace() got an unexpected field {key!r}")
        current = {key: getattr(self, "_" + key) for key in _FIELDS}
        current.update(fields)
        owned = frozenset(key for key in _FIELDS if key not in fields)
        return Graph(**current, _owned=owned)

    def _with(self, **fields):
        """:meth:`replace` for fields the library computed itself: no checks."""
        current = {key: getattr(self, "_" + key) for key in _FIELDS}
        current.update(fields)
        return Graph._trusted(**current)

    # ------------------------------------------------------------ properties
    indptr = property(lambda self: self._indptr, doc="Row pointer, shape (n_nodes + 1,).")
    indices = property(lambda self: self._indices, doc="Edge targets, shape (n_edges,).")
    labels = property(lambda self: self._labels, doc="Code points, int32 (n_nodes,).")
    features = property(lambda self: self._features,
                        doc="Node features (n_nodes, n_features) or None.")
    weights = property(lambda self: self._weights, doc="Edge weights (n_edges,) or None.")
    mass = property(lambda self: self._mass, doc="Node masses (n_nodes,).")
    offsets = property(lambda self: self._offsets,
                       doc="Node offsets (n_graphs + 1,) of a batch, or None.")

    @property
    def activation(self):
        """Node activations: explicit, else the feature mean, else 1."""
        return self._activations()

    def _activations(self, num_threads=1):
        """:attr:`activation`, a feature mean on ``num_threads`` threads (0:
        OpenMP's default; one for the property, which a process forked after
        a parallel loop may read: see ``ops.feature_mean``)."""
        if self._activation is not None:
            return self._activation
        if self._features is not None:
            from .ops import feature_mean   # the one home of this rule (ops.FeatureMean)
            return feature_mean(self._features, num_threads)
        return np.ones(self.num_nodes)

    @property
    def num_nodes(self):
        return self._indptr.shape[0] - 1

    @property
    def num_edges(self):
        return self._indices.shape[0]

    @property
    def num_graphs(self):
        return 1 if self._offsets is None else self._offsets.shape[0] - 1

    @property
    def graph_offsets(self):
        """Node offsets, also for a single graph (``[0, n_nodes]``)."""
        if self._offsets is None:
            return np.array([0, self.num_nodes], dtype=np.int64)
        return self._offsets

    @property
    def out_degree(self):
        """Out-degree of every node, int64 (n_nodes,)."""
        return np.diff(self._indptr).astype(np.int64)

    def edge_sources(self):
        """Source node of every edge, shape (n_edges,), the dtype of ``indices``."""
        return np.repeat(np.arange(self.num_nodes, dtype=self._indices.dtype),
                         np.diff(self._indptr))

    # ------------------------------------------------------------ conversion
    def to_text(self):
        """The node labels as a string (one character per node).

        Raises
        ------
        ValueError
            If a label is a surrogate code point (U+D800..U+DFFF), which has
            no place in valid text (:meth:`from_text` refuses it too).
        """
        labels = self._labels
        surrogate = (labels >= 0xD800) & (labels <= 0xDFFF)
        if surrogate.any():
            i = int(np.flatnonzero(surrogate)[0])
            raise ValueError(f"labels[{i}] = {int(labels[i]):#x} is a surrogate code point; "
                             "a graph holding one has no text form")
        return labels.astype("<u4").tobytes().decode("utf-32-le")

    def to_scipy(self):
        """The adjacency matrix as ``scipy.sparse.csr_matrix`` (n_nodes, n_nodes)."""
        from scipy.sparse import csr_matrix

        data = np.ones(self.num_edges) if self._weights is None else self._weights
        return csr_matrix((data, self._indices, self._indptr),
                          shape=(self.num_nodes, self.num_nodes))

    def __repr__(self):
        extra = f", num_graphs={self.num_graphs}" if self._offsets is not None else ""
        d = "" if self._features is None else f", n_features={self._features.shape[1]}"
        return f"Graph(num_nodes={self.num_nodes}, num_edges={self.num_edges}{d}{extra})"

    def __len__(self):
        return self.num_nodes


def _check_offsets(offsets, n, indptr, indices):
    offsets = np.array(as_index_array(offsets, "offsets"), dtype=np.int64, copy=True)
    if offsets.shape[0] < 1 or offsets[0] != 0 or offsets[-1] != n:
        raise ValueError(f"offsets must run from 0 to n_nodes = {n}")
    if (offsets[1:] < offsets[:-1]).any():   # compared: a difference can wrap
        raise ValueError("offsets must be non-decreasing")
    if indices.size:
        block = np.searchsorted(offsets, np.arange(n), side="right") - 1
        sources = np.repeat(np.arange(n), np.diff(indptr))
        if np.any(block[sources] != block[indices]):
            raise ValueError("offsets: an edge crosses from one graph of the batch to another")
    return offsets


# ---------------------------------------------------------------------------
# Structural operations
# ---------------------------------------------------------------------------

def _chain_offsets(offsets):
    """``offsets`` of a batch of chains (:meth:`Graph.chains`) as int64,
    checked: starting at 0, non-decreasing. O(B)."""
    offsets = as_index_array(offsets, "offsets").astype(np.int64, copy=False)
    if offsets.shape[0] < 1 or offsets[0] != 0:
        raise ValueError("offsets must start at 0")
    if (offsets[1:] < offsets[:-1]).any():   # compared: a difference can wrap
        raise ValueError("offsets must be non-decreasing")
    return offsets


def _check_decisions(graph, decisions, name):
    """``decisions`` as a boolean array of one entry per edge of ``graph``
    (:func:`~grapheme._validation.as_decisions`)."""
    return as_decisions(decisions, name, (graph.num_edges,))


def merge_edges(graph, merge):
    """Merge the endpoints of every selected edge; the history of the result.

    Clusters are the connected components of the selected edges (union-find,
    O(n alpha(n) + E)); the head of a cluster is its earliest node and
    clusters are numbered in the order of their heads.

    Parameters
    ----------
    graph : Graph
    merge : array_like of bool, shape (n_edges,)
        Or numbers that are all 0 or 1 (sampled decisions); anything else
        is refused, not cast.

    Returns
    -------
    MergeHistory

    Examples
    --------
    >>> g = Graph.from_text("abcd")
    >>> merge_edges(g, [False, True, True]).cluster.tolist()
    [0, 1, 1, 1]
    """
    from .history import MergeHistory

    check_graph(graph, "graph")
    merge = _check_decisions(graph, merge, "merge")
    cluster = np.empty(graph.num_nodes, graph.indptr.dtype)
    k = _core.components(graph.indptr, graph.indices,
                         np.ascontiguousarray(merge).view(np.uint8), cluster)
    return MergeHistory._trusted(cluster, k)


def contract(graph, history, features=None):
    """The graph of a merge: one node per output of ``history``.

    Labels are the heads' labels, features the members' (weighted) mean,
    edges ``(c(u), c(v))`` for every input edge with self-loops dropped and
    duplicates folded (their weights summed; on an unweighted graph each
    edge weighs 1, so the output has weights where two edges folded into
    one, and none otherwise, as for every chain). Masses are 1. A batch stays a
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

    Examples
    --------
    >>> g = Graph.from_text("aab")
    >>> contract(g, merge_edges(g, [True, False])).to_text()
    'ab'
    """
    from .history import MergeHistory

    check_graph(graph, "graph")
    if not isinstance(history, MergeHistory):
        raise TypeError(f"history must be a MergeHistory, got {type(history).__name__}")
    if history.num_inputs != graph.num_nodes:
        raise ValueError(f"history has {history.num_inputs} inputs, "
                         f"graph has {graph.num_nodes} nodes")
    if features is None:
        features = graph.features
    else:
        features = as_float_array(features, "features", ndim=2, shape=(graph.num_nodes, None),
                                  dtype=KEEP)
    offsets = None
    if graph.offsets is not None:
        offsets = _output_offsets(graph, history)
        block = np.repeat(np.arange(graph.num_graphs), np.diff(graph.offsets))
        if ((history.cluster < offsets[block]) | (history.cluster >= offsets[block + 1])).any():
            raise ValueError("history merges nodes of different graphs of the batch")
    indptr, indices, weights = contract_edges(graph, history)
    out_features = None if features is None else history.gather(features)
    return Graph._trusted(indptr, indices, graph.labels[history.heads], features=out_features,
                          weights=weights, offsets=offsets)


def segmentation_target(graph, segments, features=None):
    """The target graph of a segmentation: ``graph`` contracted so that
    every segment becomes one node.

    A segment is a run of consecutive nodes (for a text graph, a substring),
    so the target is :func:`contract` under the history whose outputs are the
    segments: the heads' labels, the members' mean features, masses 1, and
    an edge between consecutive segments (for a chain; in general, every
    input edge between two segments, duplicates folded). A model that
    merges exactly the gold segments of an input, from the same features,
    produces this very graph, bit for bit; with
    ``StructuralLoss(debias=True)`` its loss is then exactly 0. O(n d + E).

    Parameters
    ----------
    graph : Graph
        The input, a single graph or a batch (e.g. ``Graph.from_texts``).
    segments : sequence
        For a single graph, its segments in order: positive lengths (ints)
        or the segments' texts (strs), e.g. ``[3, 5, 3]`` or ``["the",
        "quick", "fox"]``. For a batch, one such sequence per graph. The
        lengths must sum to the graph's number of nodes; texts must also
        spell its labels.
    features : ndarray of shape (n_nodes, d), optional
        Defaults to ``graph.features``. Pass the features the prediction is
        made from (e.g. the embedding of the input) so that the target's
        mean features, and activations, are those of the gold merge.

    Returns
    -------
    Graph
        A batch when ``graph`` is one, with the same number of graphs.

    Raises
    ------
    TypeError
        If ``segments`` is not a sequence of sequences of ints or strs (one
        per graph of a batch), or mixes the two in one graph's segments.
    ValueError
        If the number of sequences is not the batch size, a length is not
        positive, the lengths of a graph do not sum to its number of nodes,
        or segment texts do not spell the graph's labels (each naming
        ``segments`` and the graph).

    Notes
    -----
    The nodes keep their heads' labels. For training, first label the
    input's nodes by their offsets in their own text, as the ``Trainer``
    does (and pass the segments as lengths): a merged node keeps its head's
    label, so the morphed graph's nodes and this graph's are then named by
    where their segments start. With characters as labels the loss can only
    tell which character a segment starts with, and every ``t`` of a text is
    as good as every other (docs/design.md, "Segmentation targets")::

        first = np.repeat(g.graph_offsets[:-1], np.diff(g.graph_offsets))
        g = g.replace(labels=np.arange(g.num_nodes) - first)

    Examples
    --------
    >>> g = Graph.from_text("thequickfox")
    >>> target = segmentation_target(g, ["the", "quick", "fox"])
    >>> target.to_text(), target.indices.tolist()
    ('tqf', [1, 2])
    >>> batch = Graph.from_texts(["aab", "xyz"])
    >>> t = segmentation_target(batch, [[2, 1], [1, 2]])
    >>> t.graph_offsets.tolist(), t.to_text()
    ([0, 2, 4], 'abxy')
    """
    from .history import MergeHistory

    check_graph(graph, "graph")
    offsets = graph.graph_offsets
    B = len(offsets) - 1
    batched = graph.offsets is not None
    if isinstance(segments, (str, bytes)) or not hasattr(segments, "__len__"):
        raise TypeError(f"segments must be a sequence, got {show(segments)}")
    per_graph = list(segments) if batched else [segments]
    if len(per_graph) != B:
        raise ValueError(f"segments has {len(per_graph)} sequences but graph holds "
                         f"{B} graphs")
    lengths = []
    for b, segs in enumerate(per_graph):
        where = f"segments[{b}]" if batched else "segments"
        lengths.append(_segment_lengths(segs, where, graph.labels[offsets[b]:offsets[b + 1]]))
    sizes = np.concatenate([np.zeros(0, np.int64)] + lengths)
    cluster = np.repeat(np.arange(len(sizes), dtype=np.int64), sizes)
    history = MergeHistory._trusted(cluster, len(sizes))
    return contract(graph, history, features)


def _segment_lengths(segs, where, labels):
    """The lengths of one graph's segments (positive ints, or strs that spell
    ``labels``), validated, as int64; ``where`` names them in errors."""
    n = len(labels)
    if isinstance(segs, (str, bytes)) or not hasattr(segs, "__len__"):
        raise TypeError(f"{where} must be a sequence of lengths or of strs, got {show(segs)}")
    segs = list(segs)
    if segs and all(isinstance(s, str) for s in segs):
        lengths = np.array([len(s) for s in segs], np.int64)
        if (lengths == 0).any():
            i = int(np.flatnonzero(lengths == 0)[0])
            raise ValueError(f"{where}[{i}] is empty; every segment must hold a character")
        text = "".join(segs)
        codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
        if len(codes) != n or not np.array_equal(codes, labels):
            raise ValueError(f"{where} spell {text!r}, not the graph's {n} labels")
        return lengths
    if any(isinstance(s, (bool, np.bool_)) or not isinstance(s, (int, np.integer))
           for s in segs):
        raise TypeError(f"{where} must hold positive int lengths or strs, got {show(segs)}")
    # checked as Python ints (the loop above is Python's already): an int64
    # sum wrapped (lengths of 2**62 summed to 2) and 2**64 overflowed
    ints = [int(s) for s in segs]
    bad = next((i for i, s in enumerate(ints) if s <= 0), None)
    if bad is not None:
        raise ValueError(f"{where}[{bad}] = {ints[bad]}; segment lengths must be positive")
    total = sum(ints)
    if total != n:
        raise ValueError(f"{where} sum to {total} but the graph has {n} nodes")
    return np.array(ints, np.int64)


def _output_offsets(graph, history):
    """Offsets of the merged batch: graph b's outputs are those whose heads
    lie in its node range."""
    return np.searchsorted(history.heads, graph.offsets).astype(np.int64)


def contract_edges(graph, history):
    """Contracted CSR ``(indptr, indices, weights)`` over the outputs of a
    checked ``history``. O(n + E)."""
    dtype = graph.indptr.dtype
    cluster = history.cluster.astype(dtype, copy=False)
    hist_indptr = history.indptr.astype(dtype, copy=False)
    members = history.members.astype(dtype, copy=False)
    weights = np.empty(0) if graph.weights is None else graph.weights
    return _core.contract(graph.indptr, graph.indices, weights, cluster, hist_indptr, members)


def chain_sources(graph, purpose="the chain relaxation"):
    """Source node of every edge of a chain-shaped graph, int64 (n_edges,).

    A graph is chain-shaped when every edge goes ``u -> u + 1`` and no node
    has more than one out-edge (what :meth:`Graph.from_text` and
    :meth:`Graph.from_texts` produce). The relaxed estimators need this: on
    general graphs the expected clustering under independent merges is
    #P-hard (it contains network reliability).

    Raises
    ------
    ValueError
        If the graph is not chain-shaped.

    Examples
    --------
    >>> chain_sources(Graph.from_texts(["ab", "cde"])).tolist()
    [0, 2, 3]
    """
    check_graph(graph, "graph")
    deg = np.diff(graph.indptr)
    src = np.repeat(np.arange(deg.shape[0], dtype=np.int64), deg)
    if (deg > 1).any() or not np.array_equal(graph.indices, src + 1):
        raise ValueError(
            f"{purpose} needs chain-shaped candidate edges (every edge u -> u+1, at most "
            "one out-edge per node); the expected clustering on general graphs is "
            "#P-hard (network reliability). Use the Hard or Reinforce estimator "
            "('history', 'reinforce') for general graphs.")
    return src


def replicate(graph, copies):
    """``copies`` copies of ``graph`` as one batch, sample-major.

    Copy ``k`` of graph ``b`` of a batch of ``B`` graphs is graph ``k * B + b``
    of the result (node ``k * n + i``), so features replicate with
    ``np.tile(features, (copies, 1))`` and gradients fold back with
    ``grad.reshape(copies, n, d).sum(0)``. O(copies (n + E)).

    Examples
    --------
    >>> replicate(Graph.from_text("ab"), 2).offsets.tolist()
    [0, 2, 4]
    """
    check_graph(graph, "graph")
    copies = check_scalar(copies, "copies", lower=1, integer=True)
    if copies == 1:
        return graph
    n, E = graph.num_nodes, graph.num_edges
    d = 0 if graph.features is None else graph.features.shape[1]
    check_allocation(8 * copies * (3 * n + 2 * E + n * d + 2), f"replicate(copies={show(copies)})")
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
