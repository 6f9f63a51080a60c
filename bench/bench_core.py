"""The compiled core against the numpy/scipy code a user would write instead.

Every class times ours next to its peer in the same run (``ratios`` lists the
pairs and, as the smallest acceptable ``peer / ours``, their targets; see
``bench/__main__.py``). Sizes ``n`` are node
counts of a chain (text) graph, features are ``d = 16`` float64 columns, and
the merge decisions merge about half of the edges. Small problems check in
``setup`` that ours and the peer compute the same thing.
"""
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from grapheme import Graph, _core, contract, merge_edges

from .bench_train import _BuiltOnce

SIZES = [1_000, 10_000, 100_000, 1_000_000, 10_000_000]
D = 16
CHECK_UP_TO = 100_000  # verify ours == peer in setup up to this size


def random_text(rng, n):
    """``n`` random lowercase letters as a str."""
    return rng.integers(ord("a"), ord("z") + 1, size=n, dtype=np.uint8).tobytes().decode()


def random_words(rng, n):
    """Random words of 3 to 12 letters, about ``n`` letters in all."""
    lengths = rng.integers(3, 13, size=n // 3 + 1)
    ends = np.cumsum(lengths)
    ends = ends[: max(1, int(np.searchsorted(ends, n, side="right")))]
    text = random_text(rng, int(ends[-1]))
    bounds = [0] + ends.tolist()
    return [text[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def numpy_from_texts(texts):
    """The CSR arrays of ``Graph.from_texts`` built with numpy alone."""
    lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
    codes = np.frombuffer("".join(texts).encode("utf-32-le"), dtype="<u4").astype(np.int32)
    offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    n = codes.shape[0]
    # every node but the last of its chain has one edge, to the next node
    out_degree = np.ones(n, dtype=np.int32)
    out_degree[offsets[1:][lengths > 0] - 1] = 0
    indptr = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(out_degree, out=indptr[1:])
    indices = np.repeat(np.arange(1, n + 1, dtype=np.int32), out_degree)
    return indptr, indices, codes, offsets


def chain_problem(n):
    """A chain of ``n`` nodes, (n, d) features and a ~50% merge mask."""
    rng = np.random.default_rng(42)
    graph = Graph.from_text(random_text(rng, n))
    features = rng.standard_normal((n, D))
    mask = rng.random(graph.num_edges) < 0.5
    return rng, graph, features, mask


def scipy_components(graph, sources, mask):
    """Components of the masked edges with scipy, CSR construction included."""
    n = graph.num_nodes
    kept = np.concatenate(([0], np.cumsum(mask, dtype=graph.indptr.dtype)))
    adjacency = sp.csr_array((np.ones(kept[-1]), graph.indices[mask], kept[graph.indptr]),
                             shape=(n, n))
    return connected_components(adjacency, directed=False)


def pooling_matrix(history):
    """The (k, n) scipy CSR matrix of ``history.gather``."""
    return sp.csr_array((history.weights, history.members, history.indptr),
                        shape=(history.num_outputs, history.num_inputs))


class FromTexts:
    """Batched chain graphs of ~n characters of random words."""
    params = [SIZES]
    param_names = ["n"]
    timeout = 120
    ratios = [("time_from_texts", "time_numpy")]

    def setup(self, n):
        self.texts = random_words(np.random.default_rng(42), n)
        if n <= CHECK_UP_TO:
            g = Graph.from_texts(self.texts)
            for ours, peer in zip((g.indptr, g.indices, g.labels, g.offsets),
                                  numpy_from_texts(self.texts)):
                np.testing.assert_array_equal(ours, peer)

    def time_from_texts(self, n):
        Graph.from_texts(self.texts)

    def time_numpy(self, n):
        numpy_from_texts(self.texts)

    def peakmem_from_texts(self, n):
        Graph.from_texts(self.texts)


class MorphForward:
    """Merge + history (+ contraction) of a chain with a fixed ~50% mask.

    The peer for merging is scipy's ``connected_components``, including the
    construction of its CSR matrix from the masked edges (ours builds the
    output->inputs history on top of the components).
    """
    params = [SIZES]
    param_names = ["n"]
    timeout = 120
    ratios = [
        ("time_merge_edges", "time_scipy_components", 2),
        ("time_forward", "time_scipy_components"),
    ]

    def setup(self, n):
        _, self.graph, self.features, self.mask = chain_problem(n)
        self.sources = self.graph.edge_sources()
        self.history = merge_edges(self.graph, self.mask)
        if n <= CHECK_UP_TO:
            k, labels = scipy_components(self.graph, self.sources, self.mask)
            assert k == self.history.num_outputs
            np.testing.assert_array_equal(labels, self.history.cluster)

    def time_forward(self, n):
        contract(self.graph, merge_edges(self.graph, self.mask), self.features)

    def time_merge_edges(self, n):
        merge_edges(self.graph, self.mask)

    def time_contract(self, n):
        contract(self.graph, self.history, self.features)

    def time_scipy_components(self, n):
        scipy_components(self.graph, self.sources, self.mask)

    def peakmem_forward(self, n):
        contract(self.graph, merge_edges(self.graph, self.mask), self.features)

    def peakmem_merge_edges(self, n):
        merge_edges(self.graph, self.mask)

    def peakmem_scipy_components(self, n):
        scipy_components(self.graph, self.sources, self.mask)


class Similarity:
    """Cosine similarity of every edge of a chain and its backward, d = 16.

    The peer is the same formula in numpy (row norms, then the dot product of
    the two endpoint rows of every edge); the backward's peer accumulates
    both endpoints' gradients with ``np.add.at``.
    """
    params = [SIZES]
    param_names = ["n"]
    timeout = 120
    ratios = [
        ("time_similarity", "time_numpy"),
        ("time_similarity_backward", "time_numpy_backward"),
    ]

    def setup(self, n):
        rng, self.graph, self.H, _ = chain_problem(n)
        self.src, self.dst = self.graph.edge_sources(), self.graph.indices
        self.norms = np.empty(n)
        self.sim = np.empty(self.graph.num_edges)
        self.grad_sim = rng.standard_normal(self.graph.num_edges)
        self.grad_H = np.zeros((n, D))
        self.time_similarity(n)
        if n <= CHECK_UP_TO:
            np.testing.assert_allclose(self.sim, self.time_numpy(n), rtol=1e-12, atol=1e-15)
            self.time_similarity_backward(n)
            np.testing.assert_allclose(self.grad_H, self.time_numpy_backward(n),
                                       rtol=1e-9, atol=1e-12)

    def time_similarity(self, n):
        _core.edge_cosine(self.graph.indptr, self.graph.indices, self.H, self.norms, self.sim)

    def time_numpy(self, n):
        norms = np.sqrt(np.einsum("ij,ij->i", self.H, self.H))
        dots = np.einsum("ij,ij->i", self.H[self.src], self.H[self.dst])
        return dots / (norms[self.src] * norms[self.dst])

    def time_similarity_backward(self, n):
        self.grad_H.fill(0.0)
        _core.edge_cosine_backward(self.graph.indptr, self.graph.indices, self.H, self.norms,
                                   self.sim, self.grad_sim, self.grad_H)

    def time_numpy_backward(self, n):
        src, dst, H, norms = self.src, self.dst, self.H, self.norms
        a = (self.grad_sim / (norms[src] * norms[dst]))[:, None]
        b = self.grad_sim * self.sim
        out = np.zeros_like(H)
        np.add.at(out, src, a * H[dst] - (b / norms[src] ** 2)[:, None] * H[src])
        np.add.at(out, dst, a * H[src] - (b / norms[dst] ** 2)[:, None] * H[dst])
        return out


class _HistoryProblem(_BuiltOnce):
    """A chain graph of n nodes, its merge history and pooling matrix, built
    once per process and n (:class:`~bench.bench_train._BuiltOnce`): asv_runner
    re-runs ``setup`` before every timed call (asv#966), and a gather or
    scatter of a few microseconds timed right after a fresh build (and the
    peer checks) takes four times as long as the next call. Measured at
    n = 1,000: a scatter 7 us called in a loop, 30 us after ``setup``, 13 us
    after 1 ms of sleep; ``np.add.at`` 140-155 us either way."""

    params = [SIZES]
    param_names = ["n"]
    timeout = 120

    def _build(self, n):
        rng, graph, _, mask = chain_problem(n)
        self.history = merge_edges(graph, mask)
        self.pool = pooling_matrix(self.history)
        self._arrays(rng, n)


class Gather(_HistoryProblem):
    """Pooling (n, 16) -> (k, 16): ``history.gather`` vs the scipy CSR product.

    ``time_gather`` returns a fresh result, as the scipy product does;
    ``time_gather_out`` writes into a buffer reused across calls (``out=``).
    At millions of rows the page faults of fresh memory cost more than the
    pooling (see ``MemoryFloor.time_alloc``).
    """
    ratios = [
        ("time_gather", "time_scipy_csr", 1),
        ("time_gather_out", "time_scipy_csr", 1),
    ]

    def _arrays(self, rng, n):
        self.x = rng.standard_normal((n, D))
        self.out = np.zeros((self.history.num_outputs, D))
        if n <= CHECK_UP_TO:
            np.testing.assert_allclose(self.history.gather(self.x), self.pool @ self.x,
                                       rtol=1e-12, atol=1e-12)

    def time_gather(self, n):
        self.history.gather(self.x)

    def time_gather_out(self, n):
        self.history.gather(self.x, out=self.out)

    def time_scipy_csr(self, n):
        self.pool @ self.x

    def peakmem_gather(self, n):
        self.history.gather(self.x)

    def peakmem_scipy_csr(self, n):
        self.pool @ self.x


class Scatter(_HistoryProblem):
    """Routing gradients (k, 16) -> (n, 16), the adjoint of ``Gather``.

    Each way is timed twice: returning a fresh result (``time_scatter``, and
    the peers as a user writes them) and into a buffer reused across calls
    (``*_out``: ``scatter(g, out=...)`` against the same numpy code with
    ``out=``, zeroing first where it accumulates).
    """
    ratios = [
        ("time_scatter", "time_numpy_fancy"),
        ("time_scatter", "time_add_at", 10),
        ("time_scatter", "time_scipy_csr_transpose"),
        ("time_scatter_out", "time_numpy_fancy_out"),
        ("time_scatter_out", "time_add_at_out", 10),
    ]

    def _arrays(self, rng, n):
        h = self.history
        self.g = rng.standard_normal((h.num_outputs, D))
        self.w = h.node_weights
        self.w2 = self.w[:, None]
        self.cluster = h.cluster
        # for the transpose by accumulation: the output row of every CSR entry
        self.rows = np.repeat(np.arange(h.num_outputs), np.diff(h.indptr))
        self.pool_t = self.pool.T.tocsr()
        self.out = np.zeros((n, D))
        if n <= CHECK_UP_TO:
            ours = h.scatter(self.g)
            for peer in (self.time_numpy_fancy(n), self.time_add_at(n), self.pool_t @ self.g,
                         self.time_numpy_fancy_out(n).copy(), self.time_add_at_out(n).copy(),
                         self.time_scatter_out(n)):
                np.testing.assert_allclose(ours, peer, rtol=1e-15)

    def time_scatter(self, n):
        self.history.scatter(self.g)

    def time_scatter_out(self, n):
        return self.history.scatter(self.g, out=self.out)

    def time_numpy_fancy(self, n):
        return self.w2 * self.g[self.cluster]

    def time_numpy_fancy_out(self, n):
        np.take(self.g, self.cluster, axis=0, out=self.out)
        return np.multiply(self.out, self.w2, out=self.out)

    def time_add_at(self, n):
        h = self.history
        out = np.zeros((h.num_inputs, D))
        np.add.at(out, h.members, h.weights[:, None] * self.g[self.rows])
        return out

    def time_add_at_out(self, n):
        h = self.history
        self.out.fill(0.0)
        np.add.at(self.out, h.members, h.weights[:, None] * self.g[self.rows])
        return self.out

    def time_scipy_csr_transpose(self, n):
        self.pool_t @ self.g

    def peakmem_scatter(self, n):
        self.history.scatter(self.g)

    def peakmem_numpy_fancy(self, n):
        self.w2 * self.g[self.cluster]


class MemoryFloor:
    """What this machine's memory allows per node, for reading the scaling.

    Not ours: plain numpy passes over (n, 16) float64 arrays, timed in the
    same run as the kernels so that "time per node at 1e7 vs 1e5" can be set
    against the same ratio for a copy. ``time_alloc`` is the page-fault cost
    a fresh (n, 16) result pays before any kernel writes it; ``time_read``
    (``x.sum()``) only reads the input once, the least any kernel does.
    """
    params = [SIZES]
    param_names = ["n"]
    timeout = 120
    ratios = []

    def setup(self, n):
        self.x = np.random.default_rng(42).standard_normal((n, D))
        self.buf = np.zeros((n, D))

    def time_alloc(self, n):
        np.empty((n, D)).fill(0.0)

    def time_read(self, n):
        self.x.sum()

    def time_copy(self, n):
        np.copyto(self.buf, self.x)

    def time_scale_out(self, n):
        np.multiply(self.x, 0.5, out=self.buf)


class GIL:
    """Two threads on two halves vs one thread doing both (pandas ``gil.py``).

    ``time_loop / time_parallel`` near 2 on 2 cores shows that the kernels
    run without the GIL; near 1 that they hold it (or share a saturated
    memory bus). Each call on one OpenMP thread: the kernels' own threads
    took both cores in either case, and the ratio read 0.9-1.1 whatever the
    GIL did. OpenMP keeps its thread count per thread, so it is limited in
    the timing thread and in each worker.
    """
    params = [[100_000, 1_000_000, 10_000_000], ["gather", "scatter"]]
    param_names = ["n", "op"]
    timeout = 120
    ratios = [("time_parallel", "time_loop", 1.33)]

    def setup(self, n, op):
        rng = np.random.default_rng(42)
        self.jobs = []
        for half in (n // 2, n - n // 2):
            graph = Graph.from_text(random_text(rng, half))
            history = merge_edges(graph, rng.random(graph.num_edges) < 0.5)
            rows = half if op == "gather" else history.num_outputs
            self.jobs.append((getattr(history, op), rng.standard_normal((rows, D))))
        from threadpoolctl import threadpool_limits

        self.limits = threadpool_limits(1, user_api="openmp")
        self.executor = ThreadPoolExecutor(
            max_workers=2, initializer=lambda: threadpool_limits(1, user_api="openmp"))
        list(self.executor.map(lambda job: job[0](job[1]), self.jobs))  # start threads

    def teardown(self, n, op):
        self.executor.shutdown()
        self.limits.restore_original_limits()

    def time_loop(self, n, op):
        for fn, arg in self.jobs:
            fn(arg)

    def time_parallel(self, n, op):
        list(self.executor.map(lambda job: job[0](job[1]), self.jobs))
