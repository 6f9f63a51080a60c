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


def _text_pairs(rng, count, lo=2, hi=30, dim=64):
    """``count`` random pairs of lowercase texts of lo..hi characters with the
    Trainer's default activations: feature means of a random embedding for
    the input, the embedding's row means for the target."""
    from grapheme import Embedding

    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    texts = ["".join(rng.choice(letters, int(rng.integers(lo, hi + 1))))
             for _ in range(2 * count)]
    emb = Embedding(dim=dim, seed=0)
    predicted = Graph.from_texts(texts[:count])
    target = Graph.from_texts(texts[count:])
    rows, t_rows = emb.rows(predicted.labels), emb.rows(target.labels)
    return (predicted._with(features=emb.weight[rows]),
            target._with(activation=emb.weight.mean(axis=1)[t_rows]))


class SinkhornCapSuite:
    """200 random text pairs, forward + backward, tol = 1e-6, at caps 200,
    2000 and 20000: every pair converges long before the cap, so the three
    rows must be equal (time and peak memory follow the sweeps performed,
    not the cap). ``balance`` times the default (dustbin balancing) against
    plain Sinkhorn sweeps."""

    params = ([200, 2000, 20000], [True, False])
    param_names = ["iterations", "balance"]

    def setup(self, iterations, balance):
        rng = np.random.default_rng(42)
        self.loss = StructuralLoss(iterations=iterations, tol=1e-6, balance=balance)
        self.predicted, self.target = _text_pairs(rng, 200)

    def _forward_backward(self):
        self.loss.backward(self.loss.forward(self.predicted, self.target))

    def time_forward_backward(self, iterations, balance):
        self._forward_backward()

    def peakmem_forward_backward(self, iterations, balance):
        self._forward_backward()


class DefaultLossSuite:
    """1000 random text pairs (2-30 characters), forward + backward: the
    converged default (``"default"``: tol = 1e-6, cap 1000, balanced) against
    the original protocol (``"20 iterations"``: ``iterations=20, tol=None``)
    in the same run; the issue asks for at most 3x."""

    params = ["default", "20 iterations"]
    param_names = ["protocol"]

    def setup(self, protocol):
        rng = np.random.default_rng(42)
        self.loss = (StructuralLoss() if protocol == "default"
                     else StructuralLoss(iterations=20, tol=None))
        self.predicted, self.target = _text_pairs(rng, 1000)

    def time_forward_backward(self, protocol):
        self.loss.backward(self.loss.forward(self.predicted, self.target))

    def peakmem_forward_backward(self, protocol):
        self.loss.backward(self.loss.forward(self.predicted, self.target))

    def track_converged_fraction(self, protocol):
        """Share of pairs whose row-marginal error is <= 1e-6."""
        return float(np.mean(self.loss.forward(self.predicted, self.target)
                             .marginal_error <= 1e-6))


def _segmentation_pairs(rng, count, lo=4, hi=16, dim=64, relaxed=False):
    """``count`` segmentation pairs: random lowercase texts of lo..hi
    characters with a random gold segmentation (the target,
    :func:`grapheme.segmentation_target`) and a random predicted one (the
    input contracted under it), both from the same embedded features;
    ``relaxed`` gives the prediction masses and edge weights in [0, 1]."""
    from grapheme import Embedding, segmentation_target

    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    texts = ["".join(rng.choice(letters, int(rng.integers(lo, hi + 1))))
             for _ in range(count)]

    def cut(n):
        bounds = np.flatnonzero(rng.random(n - 1) < 0.3) + 1
        return np.diff(np.concatenate([[0], bounds, [n]])).tolist()

    graph = Graph.from_texts(texts)
    features = Embedding(dim=dim, seed=0).forward(graph.labels)
    target = segmentation_target(graph, [cut(len(s)) for s in texts], features)
    predicted = segmentation_target(graph, [cut(len(s)) for s in texts], features)
    if relaxed:
        predicted = predicted._with(mass=rng.uniform(0, 1, predicted.num_nodes),
                                    weights=rng.uniform(0, 1, predicted.num_edges))
    return predicted, target


class DebiasSuite:
    """256 segmentation pairs (4-16 characters), forward + backward of the
    default loss, plain against ``debias=True`` (three transports per pair:
    (p, t), (p, p), (t, t)), in the same run; hard predictions and relaxed
    ones (masses and edge weights in [0, 1])."""

    params = [False, True]
    param_names = ["relaxed"]
    ratios = [("time_debiased", "time_plain")]

    def setup(self, relaxed):
        rng = np.random.default_rng(42)
        self.plain = StructuralLoss()
        self.debiased = StructuralLoss(debias=True)
        self.predicted, self.target = _segmentation_pairs(rng, 256, relaxed=relaxed)

    def time_plain(self, relaxed):
        self.plain.backward(self.plain.forward(self.predicted, self.target))

    def time_debiased(self, relaxed):
        self.debiased.backward(self.debiased.forward(self.predicted, self.target))

    def peakmem_debiased(self, relaxed):
        self.debiased.backward(self.debiased.forward(self.predicted, self.target))
