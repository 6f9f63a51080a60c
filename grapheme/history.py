"""The record of a merge: which input nodes became which output node."""
import numpy as np

from . import _core
from ._validation import (KEEP, as_float_array, as_index_array, check_out, exact_str, frozen,
                          set_frozen_state, show, streams)

__all__ = ["MergeHistory"]

_UNIFORM = np.empty(0)  # the kernels' "1 / |output|" weights


def _or_uniform(weights):
    """Weights (by input or by member) as a kernel takes them: ``None``, the
    uniform ``1 / |output|``, becomes an empty array."""
    return _UNIFORM if weights is None else weights


class MergeHistory:
    """An O(n) map from ``n`` input nodes to ``k`` output nodes.

    Stored both ways: ``cluster[i]`` is the output of input ``i``; the CSR
    ``indptr`` / ``members`` / ``weights`` lists the inputs of each output in
    ascending order (its head, the earliest input, first) with weights that
    sum to 1 per output. The history is what routes gradients exactly
    through a merge: the forward pass *gathers* (output = weighted sum of its
    members), the backward pass *scatters* (``grad_in[i] = w_i grad_out[c(i)]``).

    Like ``scipy.cluster.hierarchy``'s linkage matrix, a history is plain
    data, and immutable: it keeps private copies of its arguments and hands
    out read-only arrays, so it is safe to share between threads (the
    weights computed on first access are a pure function of the history).
    Build one with ``MergeHistory(cluster)`` or get it from
    :meth:`grapheme.Morpher.forward`.

    Parameters
    ----------
    cluster : array_like of int, shape (n_inputs,)
        Output of every input. Every output in ``0..k-1`` must have at least
        one input.
    num_outputs : int, optional
        ``k``; defaults to ``max(cluster) + 1``.
    node_weights : array_like of float, shape (n_inputs,), optional
        Weight of each input within its output; must be non-negative and
        sum to 1 per output. Default: ``1 / |output|`` (the cluster mean).

    Examples
    --------
    >>> h = MergeHistory([0, 1, 1])
    >>> h.num_inputs, h.num_outputs, h.heads.tolist()
    (3, 2, [0, 1])
    >>> h.gather([1.0, 2.0, 4.0]).tolist()
    [1.0, 3.0]
    >>> h.scatter([10.0, 10.0]).tolist()
    [10.0, 5.0, 5.0]
    >>> h.segments("abc")
    ['a', 'bc']
    """

    __slots__ = ("_cluster", "_indptr", "_members", "_weights", "_node_weights")

    def __setstate__(self, state):   # a pickled or deep-copied one: read-only again
        set_frozen_state(self, state)

    def __init__(self, cluster, num_outputs=None, node_weights=None):
        # a private copy, checked after copying (see Graph)
        cluster = np.array(as_index_array(cluster, "cluster"), copy=True)
        n = cluster.shape[0]
        if n and cluster.min() < 0:
            raise ValueError(f"cluster must be non-negative, got {cluster.min()}")
        k_min = int(cluster.max()) + 1 if n else 0
        if num_outputs is None:
            k = k_min
        else:
            if isinstance(num_outputs, bool) or not isinstance(num_outputs, (int, np.integer)):
                raise TypeError("num_outputs must be an integer")
            k = int(num_outputs)
            if k < k_min:
                raise ValueError(f"num_outputs = {show(k)} but cluster holds output {k_min - 1}")
        # Every output needs an input, so k <= n: checked before anything of
        # size k is allocated (cluster=[2**40] must not ask for 8 TiB).
        if k > n:
            raise ValueError(f"cluster must give every output in 0..num_outputs-1 an input: "
                             f"{show(k)} outputs but only {n} inputs")
        if np.count_nonzero(np.bincount(cluster, minlength=k)) != k:
            raise ValueError("cluster must give every output in 0..num_outputs-1 an input")
        if node_weights is not None:
            node_weights = as_float_array(node_weights, "node_weights", ndim=1, shape=(n,),
                                          finite=False)
            node_weights = np.array(node_weights, copy=True)
            as_float_array(node_weights, "node_weights")
            if (node_weights < 0).any():
                raise ValueError("node_weights must be non-negative")
            sums = np.bincount(cluster, weights=node_weights, minlength=k)
            if not np.allclose(sums, 1.0, rtol=0, atol=1e-12):
                raise ValueError("node_weights must sum to 1 within every output")
        self._set(cluster, k, node_weights)

    def _set(self, cluster, k, node_weights):
        dtype = cluster.dtype
        self._cluster = cluster
        self._indptr = np.empty(k + 1, dtype)
        self._members = np.empty(cluster.shape[0], dtype)
        # uniform weights are not stored: the kernels divide by |c| (see weights)
        self._weights = None if node_weights is None else np.empty(cluster.shape[0])
        _core.history_csr(cluster, _or_uniform(node_weights),
                          self._indptr, self._members, _or_uniform(self._weights))
        self._cluster = frozen(cluster, copy=False)
        self._indptr = frozen(self._indptr, copy=False)
        self._members = frozen(self._members, copy=False)
        self._weights = frozen(self._weights, copy=False)
        self._node_weights = frozen(node_weights, copy=False)

    @classmethod
    def _trusted(cls, cluster, k, node_weights=None):
        h = cls.__new__(cls)
        h._set(cluster, k, node_weights)
        return h

    # ----------------------------------------------------------- properties
    cluster = property(lambda self: self._cluster, doc="Output of each input (n_inputs,).")
    indptr = property(lambda self: self._indptr, doc="Output -> members row pointer (k+1,).")
    members = property(lambda self: self._members, doc="Inputs grouped by output (n_inputs,).")

    @property
    def weights(self):
        """Weight of ``members[j]`` (n_inputs,).

        Uniform weights (``1 / |output|``) are computed on first access; the
        kernels never need them stored.
        """
        if self._weights is None:
            sizes = self.sizes
            self._weights = frozen(np.repeat(1.0 / np.maximum(sizes, 1), sizes), copy=False)
        return self._weights

    @property
    def num_inputs(self):
        return self._cluster.shape[0]

    @property
    def num_outputs(self):
        return self._indptr.shape[0] - 1

    @property
    def heads(self):
        """Earliest input of every output (k,)."""
        return self._members[self._indptr[:-1]]

    @property
    def sizes(self):
        """Number of inputs of every output (k,)."""
        return np.diff(self._indptr)

    @property
    def node_weights(self):
        """Weight of every input within its output, indexed by input (n,)."""
        if self._node_weights is None:
            w = np.empty(self.num_inputs)
            w[self._members] = self.weights
            self._node_weights = frozen(w, copy=False)
        return self._node_weights

    # ------------------------------------------------------------ operators
    def _as_2d(self, x, name, rows):
        x = as_float_array(x, name, finite=False, dtype=KEEP)   # float32 stays float32
        if x.ndim not in (1, 2) or x.shape[0] != rows:
            raise ValueError(f"{name} must have shape ({rows},) or ({rows}, d), got {x.shape}")
        return (x.reshape(rows, 1), True) if x.ndim == 1 else (x, False)

    def gather(self, x, out=None):
        """Pool input rows into outputs: ``out[c] = sum_i w_i x[i]`` over c's members.

        With the default weights this is the cluster mean. O(n d).

        Parameters
        ----------
        x : array_like of shape (n_inputs,) or (n_inputs, d)
        out : ndarray of shape (n_outputs,) or (n_outputs, d), optional
            A C-contiguous buffer of ``x``'s dtype to write the result into,
            as in numpy's ``out=``. The result has ``x``'s dtype if that is
            float32 or float64, else float64 (the weights are float64).

        Returns
        -------
        ndarray of shape (n_outputs,) or (n_outputs, d)
            ``out`` if given.
        """
        x2, flat = self._as_2d(x, "x", self.num_inputs)
        out, out2, _ = self._out(out, x2, flat, self.num_outputs, "x")
        _core.gather(self._cluster, self._indptr, self._members,
                     _or_uniform(self._node_weights), x2, out2)
        return out

    def scatter(self, g, out=None):
        """Route output gradients to inputs: ``out[i] = w_i g[c(i)]``. O(n d).

        The adjoint of :meth:`gather`: ``<gather(x), y> == <x, scatter(y)>``.

        Parameters
        ----------
        g : array_like of shape (n_outputs,) or (n_outputs, d)
        out : ndarray of shape (n_inputs,) or (n_inputs, d), optional
            A C-contiguous buffer of ``g``'s dtype to write the result into (see
            :meth:`gather`). A given buffer of at least
            ``grapheme._core.STREAM_MIN_BYTES`` is written with streaming
            stores, which skip the cache (a fresh result never is).

        Returns
        -------
        ndarray of shape (n_inputs,) or (n_inputs, d)
            ``out`` if given.
        """
        g2, flat = self._as_2d(g, "g", self.num_outputs)
        out, out2, given = self._out(out, g2, flat, self.num_inputs, "g")
        _core.scatter(self._cluster, self._indptr, _or_uniform(self._node_weights), g2, out2,
                      given and streams(out))
        return out

    @staticmethod
    def _out(out, x2, flat, rows, x_name):
        """The result array, its 2-d view for a kernel writing ``rows`` rows,
        and whether it is the caller's buffer (``out``)."""
        shape = (rows,) if flat else (rows, x2.shape[1])
        if out is None:
            out, given = np.empty(shape, x2.dtype), False
        else:
            check_out(out, "out", shape, inputs={x_name: x2}, dtype=x2.dtype)
            given = True
        return out, (out.reshape(rows, x2.shape[1]) if flat else out), given

    def unpool(self, y):
        """Broadcast every output back to its inputs: ``out[i] = y[c(i)]``. O(n d)."""
        y2, flat = self._as_2d(y, "y", self.num_outputs)
        out = np.empty((self.num_inputs, y2.shape[1]), y2.dtype)
        np.take(y2, self._cluster, axis=0, out=out)
        return out.ravel() if flat else out

    def compose(self, later):
        """The history of ``self`` followed by ``later`` as one map. O(n).

        ``self.compose(later).gather(x) == later.gather(self.gather(x))``.

        Raises
        ------
        ValueError
            If ``later`` does not take this history's outputs as its inputs.
        """
        if not isinstance(later, MergeHistory):
            raise TypeError(f"later must be a MergeHistory, got {type(later).__name__}")
        if later.num_inputs != self.num_outputs:
            raise ValueError(f"later has {later.num_inputs} inputs but this history has "
                             f"{self.num_outputs} outputs")
        cluster = later.cluster[self._cluster]
        weights = self.node_weights * later.node_weights[self._cluster]
        dtype = np.result_type(self._cluster.dtype, later.cluster.dtype)
        return MergeHistory._trusted(cluster.astype(dtype, copy=False),
                                     later.num_outputs, weights)

    def segments(self, text):
        """The text of every output node: its members' characters, in order.

        Parameters
        ----------
        text : str
            The input text, one character per input node.

        Examples
        --------
        >>> MergeHistory([0, 0, 1, 2, 2]).segments("aabcc")
        ['aa', 'b', 'cc']
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        text = exact_str(text)
        if len(text) != self.num_inputs:
            raise ValueError(f"text has {len(text)} characters but the history "
                             f"has {self.num_inputs} inputs")
        chars = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
        joined = chars[self._members].tobytes().decode("utf-32-le", "surrogatepass")
        bounds = self._indptr.tolist()
        return [joined[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    def __repr__(self):
        return f"MergeHistory(num_inputs={self.num_inputs}, num_outputs={self.num_outputs})"
