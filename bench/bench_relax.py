"""Chain relaxation (soft/ste estimators) against the hard history path.

Both sides do one forward and one backward over a chain of ``n`` nodes with
``d = 16`` features: the relaxation runs the O(n d) recursions of
``_relax.pxi``; the history gathers cluster means and scatters their
gradients through a :class:`grapheme.MergeHistory`.

The plain methods return fresh outputs on every call, as a user's loop
does; the ``_out`` methods write into buffers allocated (and touched) once in
``setup``.
"""
import numpy as np

from grapheme import _estimators
from grapheme.history import MergeHistory

D_FEATURES = 16


def _touched(shape):
    """A float64 array whose pages are already mapped (np.zeros may not be)."""
    a = np.empty(shape)
    a.fill(0.0)
    return a


class RelaxSuite:
    params = [[1_000, 10_000, 100_000, 1_000_000, 10_000_000]]
    param_names = ["n"]
    timeout = 300
    ratios = [
        ("time_relaxed_forward_backward", "time_history_forward_backward"),
        ("time_relaxed_forward_backward_out", "time_history_forward_backward_out"),
    ]

    def setup(self, n):
        rng = np.random.default_rng(42)
        self.H = rng.standard_normal((n, D_FEATURES))
        self.m = rng.uniform(0.0, 1.0, n)
        self.m[-1] = 0.0
        self.grad_out = rng.standard_normal((n, D_FEATURES))
        self.grad_mass = rng.standard_normal(n)
        # hard decisions at the same rate for the history path
        merge = self.m[:-1] > 0.5
        cluster = np.concatenate(([0], np.cumsum(~merge))).astype(np.int64)
        self.history = MergeHistory(cluster)
        self.grad_pooled = rng.standard_normal((self.history.num_outputs, D_FEATURES))
        # reused buffers of the _out methods
        self.out, self.D, self.mass = _touched((n, D_FEATURES)), _touched(n), _touched(n)
        self.grad_H, self.grad_m = _touched((n, D_FEATURES)), _touched(n)
        self.pooled = _touched((self.history.num_outputs, D_FEATURES))
        self.grad_x = _touched((n, D_FEATURES))

    # Both keep their forward output alive through the backward pass, as a
    # training step does (the loss reads it in between).
    def _relaxed(self):
        out, D, mass = _estimators.relax_chain(self.H, self.m)
        _estimators.relax_chain_backward(self.m, out, D, self.grad_out, self.grad_mass)
        return out

    def _history(self):
        pooled = self.history.gather(self.H)
        self.history.scatter(self.grad_pooled)
        return pooled

    def _relaxed_out(self):
        out, D, _ = _estimators.relax_chain(self.H, self.m, out=self.out, D=self.D,
                                            mass=self.mass)
        _estimators.relax_chain_backward(self.m, out, D, self.grad_out, self.grad_mass,
                                         grad_H=self.grad_H, grad_m=self.grad_m)
        return out

    def _history_out(self):
        pooled = self.history.gather(self.H, out=self.pooled)
        self.history.scatter(self.grad_pooled, out=self.grad_x)
        return pooled

    def time_relaxed_forward_backward(self, n):
        self._relaxed()

    def time_history_forward_backward(self, n):
        self._history()

    def time_relaxed_forward_backward_out(self, n):
        self._relaxed_out()

    def time_history_forward_backward_out(self, n):
        self._history_out()

    def peakmem_relaxed_forward_backward(self, n):
        self._relaxed()

    def peakmem_history_forward_backward(self, n):
        self._history()

