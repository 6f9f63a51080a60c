"""A growable table of one learnable row per Unicode code point."""
import threading

import numpy as np

from . import _core
from ._validation import (as_float_array, as_index_array, check_allocation, check_dtype,
                          check_bool, check_scalar)

__all__ = ["Embedding", "UNKNOWN"]

#: The label of the unknown row: one past the last Unicode code point. Every
#: table has this row (its row 0 when new); ``rows(labels, grow=False)`` maps
#: code points without a row of their own to it.
UNKNOWN = 0x110000


class Embedding:
    """One row of features per Unicode code point, with no fixed vocabulary.

    The table grows as new code points appear. A new row is drawn from a
    standard normal by a counter-based generator keyed on ``(seed, code
    point)``, so the initial row of a character is the same whatever text
    came first: the model is deterministic for a seed.

    Every table also has one *unknown* row, labelled :data:`UNKNOWN`
    (``0x110000``, one past the last code point): ``rows(labels,
    grow=False)`` and ``forward(labels, grow=False)`` read it for every code
    point that has no row, so inference and evaluation never change the
    table. The :class:`~grapheme.Trainer` teaches it by reading a small
    fraction of the training characters through it (``unknown_prob``).

    Parameters
    ----------
    dim : int, default 64
        Features per row.
    seed : int, default 0
        Seed of the row initialiser (0 <= seed < 2**64).
    dtype : {numpy.float64, numpy.float32}, default numpy.float64
        Of the table, its gradient and the features it hands out; the
        model's floating-point type (an encoder and the morph follow it; see
        "float32" in docs/design.md). A float32 row is the float64 row
        rounded to float32.

    Attributes
    ----------
    weight : ndarray of shape (n_rows, dim)
        The rows, in order of first appearance. Replaced by a larger array
        when the table grows.
    grad : ndarray of shape (n_rows, dim)
        Accumulated gradient of ``weight``.
    codes : ndarray of shape (n_rows,)
        The code point of every row (:data:`UNKNOWN` for the unknown row).
    unknown_row : int
        The index of the unknown row.

    Notes
    -----
    Safe to share between threads: growth, lookup, accumulation and the
    state methods run under one lock, so the kernels only ever see arrays
    that belong together (a lookup never reads a table another thread is
    replacing, an accumulation never writes a freed or shorter gradient) and
    concurrent :meth:`backward` calls lose no update. Assigning ``weight``
    or ``grad`` directly is checked: each must stay an array of ``dtype`` of shape
    ``(n_rows, dim)`` (``grad`` also C-contiguous and writeable), else
    :meth:`backward` raises ``ValueError`` before any kernel runs. Updating
    ``weight`` in place (as an optimiser does) while other threads read it
    is the caller's business: it gives torn values, never a crash.

    Examples
    --------
    >>> emb = Embedding(dim=4, seed=0)
    >>> h = emb.forward([97, 98, 97])
    >>> h.shape, bool((h[0] == h[2]).all())
    ((3, 4), True)
    >>> emb.weight.shape                     # the unknown row, a, b
    (3, 4)
    >>> emb.rows([97, 122], grow=False).tolist()   # 'z' has no row: the unknown one
    [1, 0]
    >>> emb.weight.shape
    (3, 4)
    """

    def __init__(self, dim=64, seed=0, dtype=np.float64):
        self.dim = check_scalar(dim, "dim", lower=1, upper=2**31 - 1, integer=True)
        self.seed = check_scalar(seed, "seed", lower=0, upper=2**64 - 1, integer=True)
        self.dtype = check_dtype(dtype)
        self._lock = threading.RLock()
        self.codes = np.empty(0, dtype=np.int64)
        self.weight = np.empty((0, self.dim), self.dtype)
        self.grad = np.empty((0, self.dim), self.dtype)
        self._sorted_codes = np.empty(0, dtype=np.int64)
        self._sorted_rows = np.empty(0, dtype=np.int64)
        self._add(np.array([UNKNOWN], dtype=np.int64))

    @property
    def unknown_row(self):
        """The index of the unknown row (see :data:`UNKNOWN`)."""
        with self._lock:
            return int(self._sorted_rows[-1])   # UNKNOWN sorts after every code point

    def __getstate__(self):   # copy.deepcopy, pickling by the user: no lock
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state):
        state.setdefault("dtype", np.dtype(np.float64))   # pickled before dtype existed
        self.__dict__.update(state)
        self._lock = threading.RLock()

    def get_params(self):
        """Constructor arguments (``dtype`` by name, and only when it is not
        the default float64: float64 descriptions stay as they always were)."""
        params = {"dim": self.dim, "seed": self.seed}
        if self.dtype != np.float64:
            params["dtype"] = self.dtype.name
        return params

    def rows(self, labels, grow=True):
        """Row of every label. O(n log V).

        Parameters
        ----------
        labels : array_like of int
            Unicode code points (``0 .. 0x10FFFF``), or :data:`UNKNOWN`.
        grow : bool, default True
            Add a row for every code point that has none (training). With
            ``False`` such code points get the unknown row and the table is
            left as it is (inference, evaluation).
        """
        labels = _check_labels(labels)
        grow = check_bool(grow, "grow")
        with self._lock:
            return self._rows(labels, grow)

    def _rows(self, labels, grow):
        """Rows of int64 ``labels`` (``-1`` nowhere in the result): one
        compiled binary search per label, in parallel."""
        rows = np.empty(labels.shape[0], np.int64)
        if _core.code_rows(self._sorted_codes, self._sorted_rows, labels, rows):
            unknown = rows < 0
            if not grow:
                rows[unknown] = self._sorted_rows[-1]   # the unknown row sorts last
                return rows
            self._add(np.unique(labels[unknown]))
            _core.code_rows(self._sorted_codes, self._sorted_rows, labels, rows)
        return rows

    def _add(self, new_codes):
        self._check_arrays()
        old, rows = self.codes.shape[0], self.codes.shape[0] + new_codes.shape[0]
        size = self.dtype.itemsize
        # at the peak: the old table and gradient, the new ones, and the new
        # rows drawn in float64 (the first row alone took 24 GB at dim 1e9)
        check_allocation((2 * size * (old + rows) + 8 * (rows - old)) * self.dim,
                         f"Embedding(dim={self.dim}) with {rows} rows (table and gradient)")
        try:
            fresh = np.empty((new_codes.shape[0], self.dim))   # drawn in float64
            weight = np.concatenate([self.weight, np.empty(fresh.shape, self.dtype)])
            grad = np.concatenate([self.grad, np.zeros(fresh.shape, self.dtype)])
        except MemoryError:
            rows = self.codes.shape[0] + new_codes.shape[0]
            raise MemoryError(
                f"Embedding(dim={self.dim}) cannot grow to {rows} rows: that needs "
                f"{2 * size * rows * self.dim / 2**30:.3g} GiB (table and gradient)") from None
        _core.hash_normal(self.seed, new_codes, fresh)
        weight[self.codes.shape[0]:] = fresh
        self.codes = np.concatenate([self.codes, new_codes])
        self.weight, self.grad = weight, grad
        order = np.argsort(self.codes, kind="stable")
        self._sorted_codes = self.codes[order]
        self._sorted_rows = order.astype(np.int64)

    def _check_arrays(self):
        """``weight`` and ``grad`` as the kernels need them (a user may have
        assigned either): raises ValueError naming the attribute."""
        for name in ("weight", "grad"):
            self._checked(name)
        if not (self.grad.flags.c_contiguous and self.grad.flags.writeable):
            raise ValueError("Embedding.grad must be C-contiguous and writeable")

    def _checked(self, name):
        """The array ``name`` ("weight" or "grad"), refused (ValueError naming
        it) unless an ndarray of the table's dtype and shape. O(1)."""
        arr = getattr(self, name)
        if not isinstance(arr, np.ndarray) or arr.dtype != self.dtype:
            raise ValueError(f"Embedding.{name} must be a {self.dtype.name} ndarray, got "
                             f"{getattr(arr, 'dtype', type(arr).__name__)}")
        shape = (self.codes.shape[0], self.dim)
        if arr.shape != shape:
            raise ValueError(f"Embedding.{name} must have shape {shape} (rows, dim), "
                             f"got {arr.shape}")
        return arr

    def forward(self, labels, grow=True):
        """Features of every label, shape (n, dim). O(n dim).

        With ``grow=False`` code points without a row read the unknown row
        and the table is not changed (see :meth:`rows`)."""
        labels = _check_labels(labels)
        grow = check_bool(grow, "grow")
        with self._lock:
            rows = self._rows(labels, grow)   # may grow (replace) self.weight
            self._check_arrays()
            return self.weight[rows]

    def backward(self, labels, grad):
        """Accumulate ``grad`` (n, dim) into the rows of ``labels``. O(n dim).

        The rows :meth:`forward` read: a code point without a row of its own
        (read with ``grow=False``) gives its gradient to the unknown row it
        read. A backward never grows the table (it used to, and sent the
        unknown row's gradient to the new row: a numerical review's find).

        Raises
        ------
        ValueError
            If ``grad`` is not a finite (n, dim) array, or ``Embedding.grad``
            (or ``weight``) was replaced by an array of the wrong shape or type.
        """
        labels = _check_labels(labels)
        grad = as_float_array(grad, "grad", ndim=2, shape=(labels.shape[0], self.dim),
                              finite=False, dtype=self.dtype)
        grad = np.array(grad, copy=True)
        as_float_array(grad, "grad", dtype=self.dtype)
        with self._lock:
            rows = self._rows(labels, False)
            self._check_arrays()
            _core.rows_add(rows, grad, self.grad)

    def zero_grad(self):
        """Reset the accumulated gradient to zero."""
        with self._lock:
            self.grad = np.zeros_like(self.weight)

    def state_dict(self):
        """Arrays that restore this table exactly: ``codes`` and ``weight``."""
        with self._lock:
            return {"codes": self.codes.copy(), "weight": self.weight.copy()}

    def load_state_dict(self, state):
        """Replace this table's rows with :meth:`state_dict` output, in place.

        The gradient is reset to zero; ``seed`` (for rows added later) and
        ``dtype`` stay (the weights are converted to it).
        A state without the unknown row (saved before there was one) gets it
        appended, freshly drawn.

        Raises
        ------
        ValueError
            If the arrays are inconsistent (wrong shapes, a width other
            than ``dim``, repeated codes, code points out of range,
            non-finite weights) or one is missing.
        """
        missing = [k for k in ("codes", "weight") if k not in state]
        if missing:
            raise ValueError(f"state has no {' and no '.join(map(repr, missing))} (what "
                             f"state_dict returns: 'codes' and 'weight')")
        codes = as_index_array(state["codes"], "codes").astype(np.int64)
        # the width is the table's: an encoder, an optimiser's moments and a
        # checkpoint's configuration all hold dim (torch refuses it alike)
        weight = as_float_array(state["weight"], "weight", ndim=2,
                                shape=(codes.shape[0], self.dim), dtype=self.dtype)
        if np.unique(codes).shape[0] != codes.shape[0]:
            raise ValueError("codes must not repeat")
        if codes.size and (codes.min() < 0 or codes.max() > UNKNOWN):
            raise ValueError("codes must be Unicode code points in [0, 0x10FFFF] "
                             "or UNKNOWN (0x110000)")
        if UNKNOWN not in codes:   # a table saved before the unknown row existed
            fresh = np.empty((1, weight.shape[1]))
            _core.hash_normal(self.seed, np.array([UNKNOWN], dtype=np.int64), fresh)
            codes = np.concatenate([codes, [UNKNOWN]])
            weight = np.concatenate([weight, fresh.astype(self.dtype)])
        order = np.argsort(codes, kind="stable")
        with self._lock:
            self.codes, self.weight = codes.copy(), weight.copy()
            self.grad = np.zeros_like(self.weight)
            self._sorted_codes, self._sorted_rows = codes[order], order.astype(np.int64)

    @classmethod
    def from_state(cls, state, seed=0, dtype=np.float64):
        """A new table of ``dtype`` from :meth:`state_dict` output (see
        :meth:`load_state_dict`)."""
        weight = np.asarray(state["weight"])
        emb = cls(dim=max(weight.shape[-1] if weight.ndim == 2 else 1, 1), seed=seed,
                  dtype=dtype)
        emb.load_state_dict(state)
        return emb

    def __repr__(self):
        dtype = "" if self.dtype == np.float64 else f", dtype={self.dtype.name}"
        return (f"Embedding(dim={self.dim}, seed={self.seed}{dtype}, "
                f"rows={self.codes.shape[0]})")


def _check_labels(labels):
    """``labels`` as a fresh int64 array of code points or :data:`UNKNOWN`."""
    labels = np.array(as_index_array(labels, "labels"), dtype=np.int64, copy=True)
    if labels.size and (labels.min() < 0 or labels.max() > UNKNOWN):
        raise ValueError("labels must be Unicode code points in [0, 0x10FFFF] "
                         "(or UNKNOWN, 0x110000)")
    return labels
