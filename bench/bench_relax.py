"""Chain relaxation (Relaxed/StraightThrough estimators) against the hard merge.

Both sides run one operation forward and its vjp over a chain of ``n`` nodes
with ``d = 16`` features: :class:`grapheme.ops.ChainRelaxation` (the O(n d)
recursions plus the expected inter-cluster edges, at merge weights drawn
uniformly) against :class:`grapheme.ops.HardMerge` (union-find, contraction,
gather, then a scatter through the history) at the hard decisions ``m > 0.5``.
"""
import numpy as np

from grapheme import Graph, ops

D_FEATURES = 16


def chain(n):
    """One chain of ``n`` nodes (edges i -> i+1), labels 'a'."""
    indptr = np.minimum(np.arange(n + 1), n - 1).astype(np.int64)
    indptr[0] = 0
    return Graph(indptr, np.arange(1, n, dtype=np.int64), np.full(n, 97, np.int32))


class RelaxSuite:
    params = [[1_000, 10_000, 100_000, 1_000_000]]
    param_names = ["n"]
    timeout = 300
    ratios = [("time_relaxed_forward_vjp", "time_hard_forward_vjp")]

    def setup(self, n):
        rng = np.random.default_rng(42)
        self.graph = chain(n)
        self.H = rng.standard_normal((n, D_FEATURES))
        self.m = rng.uniform(0.0, 1.0, n - 1)
        self.decisions = self.m > 0.5
        self.grad_mass = rng.standard_normal(n)
        relaxed, _ = ops.ChainRelaxation().forward(self.graph, self.H, self.m)
        self.grad_out = rng.standard_normal((n, D_FEATURES))
        self.grad_weights = rng.standard_normal(relaxed.weights.shape[0])
        hard, _ = ops.HardMerge().forward(self.graph, self.H, self.decisions)
        self.grad_pooled = rng.standard_normal(hard.features.shape)

    def _relaxed(self):
        op = ops.ChainRelaxation()
        result, saved = op.forward(self.graph, self.H, self.m)
        op.vjp(saved, self.grad_out, self.grad_mass, self.grad_weights)
        return result

    def _hard(self):
        op = ops.HardMerge()
        result, saved = op.forward(self.graph, self.H, self.decisions)
        op.vjp(saved, self.grad_pooled)
        return result

    def time_relaxed_forward_vjp(self, n):
        self._relaxed()

    def time_hard_forward_vjp(self, n):
        self._hard()

    def peakmem_relaxed_forward_vjp(self, n):
        self._relaxed()

    def peakmem_hard_forward_vjp(self, n):
        self._hard()
