"""A growable table of one learnable row per Unicode code point."""
import numpy as np

from . import _core
from ._validation import as_float_array, as_index_array, check_scalar

__all__ = ["Embedding"]


class Embedding:
    """One row of features per Unicode code point, with no fixed vocabulary.

    The table grows as new code points appear. A new row is drawn from a
    standard normal by a counter-based generator keyed on ``(seed, code
    point)``, so the initial row of a character is the same whatever text
    came first: the model is deterministic for a seed.

    Parameters
    ----------
    dim : int, default 64
        Features per row.
    seed : int, default 0
        Seed of the row initialiser (0 <= seed < 2**64).

    Attributes
    ----------
    weight : ndarray of shape (n_rows, dim)
        The rows, in order of first appearance. Replaced by a larger array
        when the table grows.
    grad : ndarray of shape (n_rows, dim)
        Accumulated gradient of ``weight``.
    codes : ndarray of shape (n_rows,)
        The code point of every row.

    Examples
    --------
    >>> emb = Embedding(dim=4, seed=0)
    >>> h = emb.forward([97, 98, 97])
    >>> h.shape, bool((h[0] == h[2]).all())
    ((3, 4), True)
    >>> emb.weight.shape
    (2, 4)
    """

    def __init__(self, dim=64, seed=0):
        self.dim = check_scalar(dim, "dim", lower=1, integer=True)
        self.seed = check_scalar(seed, "seed", lower=0, upper=2**64 - 1, integer=True)
        self.codes = np.empty(0, dtype=np.int64)
        self.weight = np.empty((0, self.dim))
        self.grad = np.empty((0, self.dim))
        self._sorted_codes = np.empty(0, dtype=np.int64)
        self._sorted_rows = np.empty(0, dtype=np.int64)

    def get_params(self):
        """Constructor arguments."""
        return {"dim": self.dim, "seed": self.seed}

    def rows(self, labels, grow=True):
        """Row of every label, adding rows for unseen code points. O(n log V)."""
        labels = as_index_array(labels, "labels").astype(np.int64, copy=False)
        if labels.size and (labels.min() < 0 or labels.max() > 0x10FFFF):
            raise ValueError("labels must be Unicode code points in [0, 0x10FFFF]")
        pos = np.searchsorted(self._sorted_codes, labels)
        known = pos < self._sorted_codes.shape[0]
        known[known] = self._sorted_codes[pos[known]] == labels[known]
        if not known.all():
            if not grow:
                raise ValueError(f"labels holds code point {labels[~known][0]} "
                                 "that has no row")
            self._add(np.unique(labels[~known]))
            pos = np.searchsorted(self._sorted_codes, labels)
        return self._sorted_rows[pos]

    def _add(self, new_codes):
        fresh = np.empty((new_codes.shape[0], self.dim))
        _core.hash_normal(self.seed, new_codes, fresh)
        self.codes = np.concatenate([self.codes, new_codes])
        self.weight = np.concatenate([self.weight, fresh])
        self.grad = np.concatenate([self.grad, np.zeros_like(fresh)])
        order = np.argsort(self.codes, kind="stable")
        self._sorted_codes = self.codes[order]
        self._sorted_rows = order.astype(np.int64)

    def forward(self, labels):
        """Features of every label, shape (n, dim). O(n dim)."""
        rows = self.rows(labels)  # may grow (replace) self.weight
        return self.weight[rows]

    def backward(self, labels, grad):
        """Accumulate ``grad`` (n, dim) into the rows of ``labels``. O(n dim)."""
        rows = self.rows(labels)
        grad = as_float_array(grad, "grad", ndim=2, shape=(rows.shape[0], self.dim))
        _core.rows_add(rows, grad, self.grad)

    def zero_grad(self):
        """Reset the accumulated gradient to zero."""
        self.grad = np.zeros_like(self.weight)

    def state_dict(self):
        """Arrays that restore this table exactly: ``codes`` and ``weight``."""
        return {"codes": self.codes.copy(), "weight": self.weight.copy()}

    def load_state_dict(self, state):
        """Replace this table's rows with :meth:`state_dict` output, in place.

        The gradient is reset to zero; ``seed`` (for rows added later) stays.

        Raises
        ------
        ValueError
            If the arrays are inconsistent (wrong shapes, repeated codes,
            code points out of range, non-finite weights).
        """
        codes = as_index_array(state["codes"], "codes").astype(np.int64)
        weight = as_float_array(state["weight"], "weight", ndim=2,
                                shape=(codes.shape[0], None))
        if np.unique(codes).shape[0] != codes.shape[0]:
            raise ValueError("codes must not repeat")
        if codes.size and (codes.min() < 0 or codes.max() > 0x10FFFF):
            raise ValueError("codes must be Unicode code points in [0, 0x10FFFF]")
        self.dim = weight.shape[1]
        self.codes, self.weight = codes, weight.copy()
        self.grad = np.zeros_like(self.weight)
        order = np.argsort(codes, kind="stable")
        self._sorted_codes, self._sorted_rows = codes[order], order.astype(np.int64)

    @classmethod
    def from_state(cls, state, seed=0):
        """A new table from :meth:`state_dict` output (see :meth:`load_state_dict`)."""
        weight = np.asarray(state["weight"])
        emb = cls(dim=max(weight.shape[-1] if weight.ndim == 2 else 1, 1), seed=seed)
        emb.load_state_dict(state)
        return emb

    def __repr__(self):
        return f"Embedding(dim={self.dim}, seed={self.seed}, rows={self.codes.shape[0]})"
