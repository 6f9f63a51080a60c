"""Chain relaxation (soft/ste estimators) against the hard history path.

Both sides do one forward and one backward over a chain of ``n`` nodes with
``d = 16`` features: the relaxation runs the O(n d) recursions of
``_relax.pxi``; the history gathers cluster means and scatters their
gradients through a :class:`grapheme.MergeHistory`.
"""
import numpy as np

from grapheme import _estimators
from grapheme.history import MergeHistory

D_FEATURES = 16


class RelaxSuite:
    params = [[1_000, 10_000, 100_000, 1_000_000, 10_000_000]]
    param_names = ["n"]
    timeout = 300

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

    def time_relaxed_forward_backward(self, n):
        self._relaxed()

    def time_history_forward_backward(self, n):
        self._history()

    def peakmem_relaxed_forward_backward(self, n):
        self._relaxed()

    def peakmem_history_forward_backward(self, n):
        self._history()
