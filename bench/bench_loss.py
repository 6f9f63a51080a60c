"""Benchmarks of the structural loss (asv style).

Data are built in ``setup`` with ``np.random.default_rng(42)``; the ``time_*``
and ``peakmem_*`` methods hold only the measured call.
"""
import numpy as np

from grapheme import Graph
from grapheme.loss import StructuralLoss


def _chain_like(rng, n, extra=0.1):
    """A chain of n nodes plus ~extra*n random edges, random activations/labels."""
    src = np.concatenate([np.arange(n - 1), rng.integers(0, n, int(extra * n))])
    dst = np.concatenate([np.arange(1, n), rng.integers(0, n, int(extra * n))])
    order = np.argsort(src, kind="stable")
    src, dst = src[order], dst[order]
    indptr = np.zeros(n + 1, np.int64)
    np.add.at(indptr, src + 1, 1)
    return Graph(np.cumsum(indptr), dst, rng.integers(97, 123, n),
                 mass=rng.uniform(0.0, 1.0, n), activation=rng.normal(0.0, 0.5, n))


class StructuralLossSuite:
    """One pair of n predicted against ~n target nodes, forward + backward.

    ``domain`` times the log-domain and the scaling-form Sinkhorn in the same
    run (epsilon = 0.1, where ``"auto"`` picks scaling); the speed-up is the
    ratio of the two rows.
    """

    params = ([10, 100, 500, 2000], ["log", "scaling"])
    param_names = ["n", "domain"]

    def setup(self, n, domain):
        rng = np.random.default_rng(42)
        self.loss = StructuralLoss(domain=domain)
        self.predicted = _chain_like(rng, n)
        self.target = _chain_like(rng, n + n // 10).replace(mass=None)

    def _forward_backward(self):
        self.loss.backward(self.loss.forward(self.predicted, self.target))

    def time_forward_backward(self, n, domain):
        self._forward_backward()

    def peakmem_forward_backward(self, n, domain):
        self._forward_backward()


class BatchLossSuite:
    """1000 short pairs (5-15 nodes) through one forward + backward."""

    params = ["log", "scaling"]
    param_names = ["domain"]

    def setup(self, domain):
        rng = np.random.default_rng(42)
        self.loss = StructuralLoss(domain=domain)
        self.predicted = Graph.batch(
            [_chain_like(rng, int(k)) for k in rng.integers(5, 16, 1000)])
        self.target = Graph.batch(
            [_chain_like(rng, int(k)).replace(mass=None) for k in rng.integers(5, 16, 1000)])

    def time_forward(self, domain):
        self.loss.forward(self.predicted, self.target)

    def time_forward_backward(self, domain):
        self.loss.backward(self.loss.forward(self.predicted, self.target))

    def peakmem_forward_backward(self, domain):
        self.loss.backward(self.loss.forward(self.predicted, self.target))
