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


class RelaxDtypeSuite:
    """The chain relaxation's kernels (``_relax.relax_chain_forward`` then
    ``relax_chain_backward``, one thread) on float32 rows against float64
    ones, in the same run; ``float64 time / float32 time`` is printed.

    A chain of ``n`` nodes whose merge weights are zero at 30% of the edges
    (words end there), as in a training batch (256 word pairs: about 7,800
    nodes). float32 rows are updated in float and their dot products summed
    in four partial sums (see "float32" in docs/design.md); in one chain of
    double additions the backward ran slower than float64's.
    """

    params = [[10_000, 100_000], [16, 64]]
    param_names = ["n", "dim"]
    ratios = [("time_float32", "time_float64")]

    def setup(self, n, dim):
        rng = np.random.default_rng(42)
        self.m = rng.uniform(0.0, 1.0, n)
        self.m[rng.random(n) < 0.3] = 0.0
        self.grad_mass = rng.standard_normal(n)
        self.arrays = {}
        for dtype in (np.float32, np.float64):
            H = rng.standard_normal((n, dim)).astype(dtype)
            grad = rng.standard_normal((n, dim)).astype(dtype)
            self.arrays[dtype] = (H, grad, np.empty_like(H), np.empty(n), np.empty(n),
                                  np.empty_like(H), np.empty(n))

    def _run(self, dtype):
        from grapheme import _relax

        H, grad, out, D, mass, grad_H, grad_m = self.arrays[dtype]
        _relax.relax_chain_forward(H, self.m, out, D, mass, num_threads=1)
        _relax.relax_chain_backward(self.m, out, D, grad, self.grad_mass, grad_H, grad_m,
                                    num_threads=1)

    def time_float32(self, n, dim):
        self._run(np.float32)

    def time_float64(self, n, dim):
        self._run(np.float64)
