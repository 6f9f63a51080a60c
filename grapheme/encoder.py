"""Context before the merge: message passing, then the routing projections."""
from typing import NamedTuple

import numpy as np

from ._threads import one_pool
from ._validation import (KEEP, as_float_array, check_allocation, check_dtype, check_graph,
                          check_scalar)
from ._workspace import check_workspace
from . import _core
from .ops import (_SCRATCH, Linear, Lookup, LookupMessagePassing, LookupSaved,
                  MessagePassing, _alloc, _both_ways, table_rows)

__all__ = ["Encoder", "EncodeResult", "LayerOverflowError"]

_LAYER = ("self", "pred", "succ", "bias")
# the names of the workspace arrays the encoder writes, forward and vjp: its
# own prefixes (below) and the products' scratch
_WRITES = ("layer", "query.", "key.", "projection.", "encoder.", _SCRATCH)


def parameter_bytes(dim, layers, dtype=np.float64):
    """Bytes of the weights of an ``Encoder(dim, layers, dtype)``: per layer
    three (d, d) matrices and a bias, then the two (d, d) projections."""
    d = int(dim)
    return np.dtype(dtype).itemsize * (int(layers) * (3 * d * d + d) + 2 * d * d)


def check_training_memory(dim, layers, dtype, what):
    """Refuse (MemoryError, naming ``what``) to train an encoder whose
    weights, their gradients and Adam's two moments cannot fit: before the
    weights are made, not by the out-of-memory killer in the first step."""
    check_allocation(4 * parameter_bytes(dim, layers, dtype),
                     f"{what} (its weights, their gradients and the optimiser's state)")


class EncodeResult(NamedTuple):
    """Contextual features, and the queries and keys that score merges."""

    features: np.ndarray
    queries: np.ndarray
    keys: np.ndarray


class LayerOverflowError(ValueError):
    """An encoder layer's output is not finite although its inputs and
    weights are: weights (or features) too large for the dtype. A
    ValueError; the ``Trainer`` reports it as divergence."""


def _check_layers(saved, h):
    """Raise a ValueError if the layers' output ``h`` is not finite (finite
    features and weights whose sums do not fit in the dtype), naming the
    first layer that overflowed instead of blaming the caller's features.
    The layers themselves do not scan their inputs again: one O(n d) scan
    for all of them, or none where the last layer's kernel checked its
    output while writing it."""
    if saved and h.size and not _finite(saved[-1], h):
        # layer l's output is l + 1's input: its features, or the rows of
        # the table a layer taken on one read
        outputs = [s.rows if isinstance(s, LookupSaved) else s.features for s in saved[1:]] + [h]
        layer = next(i for i, out in enumerate(outputs) if not np.isfinite(out).all())
        raise LayerOverflowError(f"the encoder's layer {layer} overflowed: its output is "
                                 "not finite (features or weights too large for the dtype)")


def _finite(saved, h):
    """Whether a layer's output ``h`` is finite: as the layer's kernel found
    while writing it (``LookupSaved.finite``), else by a scan."""
    known = saved.finite if isinstance(saved, LookupSaved) else None
    return _core.all_finite(h.reshape(-1)) if known is None else known


def _check_apart(workspace, arrays):
    """Refuse (ValueError) an argument (``arrays``: {name: array or None})
    that lies in one of the workspace arrays the encoder writes: it would be
    overwritten while the call still reads it (a previous call's result
    passed back in, say)."""
    if workspace is None:
        return
    for arg, arr in arrays.items():
        held = None if arr is None else workspace.holder(arr)
        if held is not None and held.startswith(_WRITES):
            raise ValueError(f"{arg} lies in the workspace's array {held!r}, which the "
                             "encoder writes: pass a copy")


def _group_contexts(graph, edges, codes, U, workspace, layer):
    """``(contexts, nodes)``: :func:`grapheme._core.group_contexts` of the
    ``codes`` (``U`` of them) that layer ``layer`` reads on ``graph``
    (``edges``: its :func:`grapheme.ops._both_ways`): each node's context,
    numbered, the next layer's codes, and the first node of each, where the
    layer is computed. ``(None, None)`` where a layer cannot be taken on
    contexts: a node with two predecessors or successors, or edge weights
    (a context would have to include them)."""
    if edges[2].shape[0]:
        return None, None
    n = graph.num_nodes
    ints = {key: _alloc(workspace, "encoder." + key, None, None, np.int64, {"codes": codes},
                        shape=(size,))
            for key, size in (("count", U + 2), ("order", n), ("swap", n),
                              (f"contexts{layer % 2}", n), (f"nodes{layer}", n))}
    C = _core.group_contexts(edges[0], edges[1], edges[3], edges[4], codes, ints["count"],
                             ints["order"], ints["swap"], ints[f"contexts{layer % 2}"],
                             ints[f"nodes{layer}"])
    if C < 0:
        return None, None
    return ints[f"contexts{layer % 2}"], ints[f"nodes{layer}"][:C]


class Encoder:
    """``layers`` residual message-passing layers, then learned routing.

    Layer ``l`` maps ``h -> h + tanh(h W_self + P W_pred + S W_succ + b)``
    (:class:`grapheme.ops.MessagePassing`; ``P`` and ``S`` sum the
    predecessors' and successors' rows, so direction matters); ``K`` layers
    see ``K`` hops of context. The merge score of edge ``(u, v)`` is then the
    cosine of ``h_u W_query`` and ``h_v W_key`` (as dynamic-chunking models
    score boundaries). Every layer weight starts at zero and both
    projections at the identity, so an untrained encoder is the identity and
    a morph through it is exactly the context-free morph.
    O(layers ((n + E) d + n d^2)); :meth:`forward_lookup`, on the rows of an
    embedding table, takes the first layer's products on the U rows read
    and, on a batch of chains, each later layer's on the C contexts the
    layers below see: O(layers (n + C d^2) + (n + E) d + U d^2 + V), the
    projections' ``n d^2`` on top of either.

    Parameters
    ----------
    dim : int
        Feature width ``d``.
    layers : int, default 2
    dtype : {numpy.float64, numpy.float32}, default numpy.float64
        Of the parameters and of every (n, d) array of :meth:`forward` and
        :meth:`vjp` (features given in another dtype are converted to it).
        A model's encoder and embedding must agree (checked by
        :class:`~grapheme.Segmenter` and :class:`~grapheme.Trainer`).

    Attributes
    ----------
    params : dict of str to ndarray
        ``"layer{l}.self"``, ``"layer{l}.pred"``, ``"layer{l}.succ"`` (d, d),
        ``"layer{l}.bias"`` (d,), ``"query"`` and ``"key"`` (d, d). Updated
        in place by an optimiser.

    Notes
    -----
    :meth:`forward`, :meth:`forward_lookup` and :meth:`vjp` only read the
    parameters, so threads may share an encoder for inference;
    :meth:`load_state_dict` and optimiser steps write ``params`` in place
    (torn values for a concurrent reader, never a crash: every operation
    checks the shapes it is given).

    Examples
    --------
    >>> enc = Encoder(dim=4, layers=1)
    >>> g = Graph.from_text("abc")
    >>> H = np.random.default_rng(0).normal(size=(3, 4))
    >>> r, saved = enc.forward(g, H)
    >>> bool((r.features == H).all() and (r.queries == H).all())
    True
    >>> grad_h, grads = enc.vjp(saved, np.ones((3, 4)))
    >>> sorted(grads)[:3]
    ['key', 'layer0.bias', 'layer0.pred']
    """

    #: float64 for an encoder pickled before it had a dtype
    dtype = np.dtype(np.float64)

    def __init__(self, dim, layers=2, dtype=np.float64):
        self.dim = check_scalar(dim, "dim", lower=1, integer=True)
        self.layers = check_scalar(layers, "layers", lower=0, integer=True)
        self.dtype = dt = check_dtype(dtype)
        d = self.dim
        check_allocation(parameter_bytes(d, self.layers, dt),
                         f"Encoder(dim={d}, layers={self.layers})")
        self.params = {}
        for layer in range(self.layers):
            for name in _LAYER:
                shape = (d,) if name == "bias" else (d, d)
                self.params[f"layer{layer}.{name}"] = np.zeros(shape, dt)
        self.params["query"] = np.eye(d, dtype=dt)
        self.params["key"] = np.eye(d, dtype=dt)

    def get_params(self):
        """Constructor arguments (``dtype`` by name, only when not float64,
        as :meth:`Embedding.get_params <grapheme.Embedding.get_params>`)."""
        params = {"dim": self.dim, "layers": self.layers}
        if self.dtype != np.float64:
            params["dtype"] = self.dtype.name
        return params

    @one_pool
    def forward(self, graph, features, workspace=None):
        """Contextual features, queries and keys of ``graph``'s nodes.

        Pure without ``workspace``. With one (a
        :class:`grapheme._workspace.Workspace`, as the ``Trainer`` and the
        ``Segmenter`` pass), every (n, d) array lives in it, the result and
        what :meth:`vjp` needs included, valid until the workspace's next
        ``forward``: bit for bit the same numbers, without paying a fresh
        array's page faults per product. ``features`` lying in one of the
        arrays the encoder writes there (its own earlier result) is refused:
        pass a copy. The parameters are checked here, each by its name."""
        check_graph(graph, "graph")
        check_workspace(workspace)
        h = as_float_array(features, "features", ndim=2, shape=(graph.num_nodes, self.dim),
                           dtype=self.dtype)
        _check_apart(workspace, {"features": h})
        return self._forward(graph, h, workspace)

    @one_pool
    def _forward(self, graph, h, workspace=None, saved=None, params=None):
        """:meth:`forward` of a checked graph and finite (n, dim) C-contiguous
        features of the encoder's dtype, not scanned again: the
        ``Trainer``'s rows of its table, which it checked are finite (in the
        table or in those rows, whichever is smaller), held in none of the
        arrays the encoder writes. Their shape and dtype
        are checked here, O(1): a ``Trainer``'s encoder may have been
        replaced by one of another width or dtype. ``saved``: the list of
        the layers the caller ran (``h`` is their output), with the
        ``params`` it checked."""
        if (h.shape != (graph.num_nodes, self.dim) or h.dtype != self.dtype
                or not h.flags.c_contiguous):
            raise ValueError(f"features must be a C-contiguous {self.dtype.name} array of "
                             f"shape ({graph.num_nodes}, {self.dim}) for {self!r}, got "
                             f"{h.dtype.name} {h.shape}")
        params = self._checked_params() if params is None else params
        saved = [] if saved is None else saved
        for layer in range(len(saved), self.layers):
            w = [params[f"layer{layer}.{name}"] for name in _LAYER]
            (h,), s = MessagePassing()._forward(graph, h, *w, workspace, f"layer{layer}.")
            saved.append(s)
        _check_layers(saved, h)
        (q,), sq = Linear()._forward(h, params["query"], workspace, "query.")
        (k,), sk = Linear()._forward(h, params["key"], workspace, "key.")
        return EncodeResult(h, q, k), (saved, sq, sk)

    @one_pool
    def forward_lookup(self, graph, table, rows, workspace=None):
        """:meth:`forward` of ``table[rows]``, the rows of an embedding table
        (``table``: an :class:`~grapheme.Embedding`'s ``weight``; ``rows``
        (n,): each node's row, ``embedding.rows(graph.labels)``), with the
        first layer's products taken on the table's rows
        (:class:`grapheme.ops.LookupMessagePassing`): ``U d^2`` for the U
        distinct rows the nodes read instead of ``n d^2``. Where every node
        has at most one predecessor and one successor and the edges no
        weights (a batch of texts), each layer but the last is computed at
        one node per context (the nodes whose rows, and whose neighbours'
        rows layer by layer, are the same; they have the same output) and
        the next layer's products are taken on those C rows. The same
        function as ``forward(graph, table[rows])`` up to rounding (near
        the dtype's limit a row's products can overflow, a
        :class:`LayerOverflowError`, where ``forward``'s sums cancel
        first);
        :meth:`vjp` of its ``saved`` returns the gradient of the (V, d)
        table (add it to ``embedding.grad``). How the ``Trainer`` and the
        ``Segmenter`` call the encoder, so that training and inference
        compute the same bits. The rows read must be finite; the others are
        not read.

        Examples
        --------
        >>> emb = Embedding(dim=4, seed=0)
        >>> g = Graph.from_text("abca")
        >>> rows = emb.rows(g.labels)
        >>> r, saved = Encoder(4, layers=1).forward_lookup(g, emb.weight, rows)
        >>> grad_table, grads = Encoder(4, layers=1).vjp(saved, np.ones((4, 4)))
        >>> emb.grad += grad_table
        >>> grad_table.shape == emb.weight.shape
        True
        """
        check_graph(graph, "graph")
        check_workspace(workspace)
        if hasattr(table, "weight") and hasattr(table, "rows"):
            raise TypeError(f"table must be an array, got {type(table).__name__}: pass "
                            "its .weight")
        table = as_float_array(table, "table", ndim=2, shape=(None, self.dim), finite=False,
                               dtype=self.dtype)
        rows = table_rows(rows, table.shape[0], graph.num_nodes)
        _check_apart(workspace, {"table": table})
        return self._forward_lookup(graph, table, rows, workspace)

    @one_pool
    def _forward_lookup(self, graph, table, rows, workspace=None, table_name="table"):
        """:meth:`forward_lookup` of a checked graph, a (V, d) ``table`` of the
        encoder's dtype (O(1) check, as :meth:`_forward`; copied if not
        C-contiguous) and int64 ``rows`` in its range that nothing changes
        until the vjp (the ``Trainer``'s, the ``Segmenter``'s), neither in
        the arrays the encoder writes. The rows read are checked finite,
        under ``table_name``."""
        if table.ndim != 2 or table.shape[1] != self.dim or table.dtype != self.dtype:
            raise ValueError(f"{table_name} must be a {self.dtype.name} array of shape (V, "
                             f"{self.dim}) for {self!r}, got {table.dtype.name} {table.shape}")
        table = np.ascontiguousarray(table)   # a user's Fortran-ordered table: a copy
        if self.layers == 0:
            (h,), lookup = Lookup().forward(table, rows, out=_alloc(
                workspace, "encoder.lookup", rows.shape[0], self.dim, self.dtype))
            as_float_array(h, table_name, dtype=KEEP)
            result, saved = self._forward(graph, h, workspace)
            return result, (*saved, lookup)
        params = self._checked_params()
        # every layer but the last is taken on contexts: the nodes that read
        # the same rows at every hop (on a chain: the same row, predecessor's
        # and successor's codes) have the same output, so the layer computes
        # one row per context, a table the next layer reads like the first
        # reads the embedding's. Off a chain, the layers after the first run
        # on the nodes.
        edges, h, codes, layers = _both_ways(graph), table, rows, []
        for layer in range(self.layers):
            contexts = nodes = None
            if layer < self.layers - 1:
                contexts, nodes = _group_contexts(graph, edges, codes, h.shape[0], workspace,
                                                  layer)
            w = [params[f"layer{layer}.{name}"] for name in _LAYER]
            # a layer's table after the first is the last one's output,
            # scanned below: not scanned again
            (h,), s = LookupMessagePassing()._forward(graph, h, codes, *w, workspace,
                                                      f"layer{layer}.",
                                                      table_name if layer == 0 else None,
                                                      nodes, edges)
            layers.append(s)
            if nodes is None:   # the last layer, or not a chain
                break
            if not _finite(s, h):
                raise LayerOverflowError(f"the encoder's layer {layer} overflowed: its output "
                                         "is not finite (features or weights too large for "
                                         "the dtype)")
            codes = contexts
        result, saved = self._forward(graph, h, workspace, layers, params)
        return result, (*saved, None)

    def _checked_params(self):
        """The parameters as finite C-contiguous arrays of their shapes and the
        encoder's dtype, each named in an error (a user may have replaced
        one): O(layers d^2)."""
        d = self.dim
        return {name: as_float_array(value, name, dtype=self.dtype,
                                     shape=(d,) if name.endswith(".bias") else (d, d))
                for name, value in self.params.items()}

    @one_pool
    def vjp(self, saved, grad_features=None, grad_queries=None, grad_keys=None,
            workspace=None):
        """Gradient of the input features (of the table, for the ``saved`` of
        :meth:`forward_lookup`), and of every parameter (a dict). Pure
        without ``workspace`` (see :meth:`forward`)."""
        layers, sq, sk, *lookup = saved   # forward_lookup's: the Lookup's saved or None
        check_workspace(workspace)
        n, d = sq[0].shape
        if len(layers) != self.layers or d != self.dim or sq[0].dtype != self.dtype:
            raise ValueError(f"saved is not the forward of this encoder ({self!r}): "
                             f"{len(layers)} layers, d = {d}, {sq[0].dtype}")
        # upstream gradients: (n, d), in the encoder's dtype
        grad_features, grad_queries, grad_keys = (
            None if g is None else as_float_array(g, name, shape=(n, d), finite=False,
                                                  dtype=self.dtype)
            for g, name in ((grad_features, "grad_features"),
                            (grad_queries, "grad_queries"), (grad_keys, "grad_keys")))
        _check_apart(workspace, {"grad_features": grad_features, "grad_queries": grad_queries,
                                 "grad_keys": grad_keys})
        grads = {}
        grad_h = _alloc(workspace, "encoder.grad", n, d, self.dtype,
                        {"grad_features": grad_features, "grad_queries": grad_queries,
                         "grad_keys": grad_keys})
        # grad_h = grad_features + g_q W_q^T + g_k W_k^T, each product added
        # on top of the sum so far by its own row blocks (no (n, d) temporaries)
        base = grad_features
        for name, s, g in (("query", sq, grad_queries), ("key", sk, grad_keys)):
            if g is None:
                grads[name] = np.zeros_like(s[1])
                continue
            base, grads[name] = Linear()._vjp(s, g, grad_h, workspace, "projection.", base)
        if base is None:
            grad_h[...] = 0
        elif base is not grad_h:
            grad_h[...] = base
        for layer in range(self.layers - 1, -1, -1):
            # a layer taken on a table's rows returns the table's gradient:
            # the embedding's, or the layer below's output rows (contexts)
            s = layers[layer]
            op = LookupMessagePassing() if isinstance(s, LookupSaved) else MessagePassing()
            grad_h, *gw = op.vjp(s, grad_h, workspace, f"layer{layer % 2}.")
            for name, g in zip(_LAYER, gw):
                grads[f"layer{layer}.{name}"] = g
        if lookup and lookup[0] is not None:   # no layers: the lookup's own vjp
            grad_h = Lookup().vjp(lookup[0], grad_h)[0]
        return grad_h, grads

    def state_dict(self):
        """Copies of the parameters."""
        return {name: value.copy() for name, value in self.params.items()}

    def load_state_dict(self, state):
        """Copy :meth:`state_dict` output into the parameters (checked first)."""
        checked = {}
        unknown = sorted(set(state) - set(self.params))
        if unknown:   # e.g. the weights of a deeper encoder
            raise ValueError(f"state is not this Encoder's state: it has no {unknown[0]!r}")
        for name, value in self.params.items():
            if name not in state:
                raise ValueError(f"state is not an Encoder state: {name!r} is missing")
            checked[name] = as_float_array(state[name], name, shape=value.shape,
                                           dtype=value.dtype)
        for name, value in self.params.items():
            value[...] = checked[name]

    def __repr__(self):
        dtype = "" if self.dtype == np.float64 else f", dtype={self.dtype.name}"
        return f"Encoder(dim={self.dim}, layers={self.layers}{dtype})"
