import numpy as np
import pytest
from hypothesis import given, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

from grapheme import Graph, MergeHistory, _core, contract, merge_edges
from helpers import naive_components, random_graph, streaming


def canonical(labels):
    """Relabel a component vector by first appearance (0, 1, 2, ...)."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty_like(first)
    rank[np.argsort(first)] = np.arange(first.shape[0])
    return rank[inverse]


@given(n=st.integers(0, 40), density=st.floats(0.0, 3.0), p=st.floats(0.0, 1.0),
       seed=st.integers(0, 2**32 - 1), wide=st.booleans())
def test_merges_equal_scipy_connected_components(n, density, p, seed, wide):
    rng = np.random.default_rng(seed)
    dtype = np.int64 if wide else np.int32
    g = random_graph(rng, n, int(density * n), dtype=dtype, self_loops=True)
    mask = rng.random(g.num_edges) < p
    h = merge_edges(g, mask)
    assert h.cluster.dtype == dtype
    src = g.edge_sources()
    adj = csr_matrix((np.ones(mask.sum()), (src[mask], g.indices[mask])), shape=(n, n))
    k, ref = connected_components(adj, directed=False)
    assert h.num_outputs == k
    np.testing.assert_array_equal(h.cluster, canonical(ref))
    # heads are the earliest members and increase with the output index
    heads = h.heads
    assert np.all(np.diff(heads) > 0)
    if n:
        assert np.array_equal(heads, [np.flatnonzero(h.cluster == c).min() for c in range(k)])


@given(texts=st.lists(st.text(max_size=12), max_size=8), p=st.floats(0.0, 1.0),
       seed=st.integers(0, 2**32 - 1))
def test_chain_merges_equal_scipy_connected_components(texts, p, seed):
    # batches of chains take the kernels' one-scan fast paths
    rng = np.random.default_rng(seed)
    g = Graph.from_texts(texts)
    mask = rng.random(g.num_edges) < p
    h = merge_edges(g, mask)
    n = g.num_nodes
    src = g.edge_sources()
    adj = csr_matrix((np.ones(mask.sum()), (src[mask], g.indices[mask])), shape=(n, n))
    k, ref = connected_components(adj, directed=False)
    assert h.num_outputs == k
    np.testing.assert_array_equal(h.cluster, canonical(ref))
    np.testing.assert_array_equal(h.members, np.arange(n))
    np.testing.assert_array_equal(h.weights, 1.0 / np.bincount(h.cluster)[h.cluster])


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
@pytest.mark.parametrize("extra", [(4, 0), (0, 2), (2, 2), (4, 4)])
def test_chain_fast_path_falls_back(dtype, extra):
    # chain-ordered up to one extra edge (the last node's, or a second edge
    # of a node): the one-scan path has written cluster when it gives up
    u, v = extra
    n = 5
    src = np.r_[np.arange(n - 1), u]
    dst = np.r_[np.arange(1, n), v]
    order = np.argsort(src, kind="stable")
    indptr = np.searchsorted(src[order], np.arange(n + 1)).astype(dtype)
    g = Graph(indptr, dst[order].astype(dtype), np.zeros(n, np.int32))
    for bits in range(2 ** g.num_edges):
        mask = (bits >> np.arange(g.num_edges)) & 1 == 1
        adj = csr_matrix((np.ones(mask.sum()), (g.edge_sources()[mask], g.indices[mask])),
                         shape=(n, n))
        k, ref = connected_components(adj, directed=False)
        h = merge_edges(g, mask)
        assert h.num_outputs == k
        np.testing.assert_array_equal(h.cluster, canonical(ref))


@given(cluster=st.lists(st.integers(0, 6), max_size=30), sort=st.booleans())
def test_history_csr_equals_stable_sort(cluster, sort):
    # sorted clusters take the one-pass path, others the counting sort
    cluster = canonical(np.array(cluster, dtype=np.int64))
    if sort:
        cluster = np.sort(cluster)
    h = MergeHistory(cluster)
    order = np.argsort(cluster, kind="stable")
    sizes = np.bincount(cluster, minlength=h.num_outputs)
    np.testing.assert_array_equal(h.members, order)
    np.testing.assert_array_equal(h.indptr, np.r_[0, np.cumsum(sizes)])
    np.testing.assert_array_equal(h.weights, 1.0 / sizes[cluster[order]])


def python_contract(g, cluster, k):
    """Plain-Python reference: contracted edge dict {(cu, cv): weight}."""
    out = {}
    w = np.ones(g.num_edges) if g.weights is None else g.weights
    for u in range(g.num_nodes):
        for e in range(g.indptr[u], g.indptr[u + 1]):
            cu, cv = cluster[u], cluster[g.indices[e]]
            if cu != cv:
                out[(cu, cv)] = out.get((cu, cv), 0.0) + w[e]
    return out


def test_folded_edges_of_an_unweighted_graph_count_as_unit_weights():
    """A numerical review's find: contracting an unweighted graph folded two
    edges into one of weight 1 (2 with the unit weights written out), and a
    hard morph that merged nothing lost a parallel edge."""
    import grapheme as gr

    t = gr.Graph([0, 1, 1], [1], [97, 98], features=np.eye(3)[:2])
    values = []
    for w in (None, [1.0, 1.0, 1.0]):
        g = gr.Graph([0, 2, 3, 3], [1, 2, 2], [97, 98, 99], weights=w)
        c = contract(g, merge_edges(g, np.array([0, 0, 1], bool)), np.eye(3))
        assert c.weights.tolist() == [2.0]
        values.append(gr.StructuralLoss().forward(c, t).value)
    assert values[0] == values[1]
    g = gr.Graph([0, 2, 3, 3], [1, 1, 2], [97, 98, 99])
    for estimator in ("history", "reinforce"):
        out = gr.Morpher(threshold=20.0, estimator=estimator).forward(g, np.eye(3)).graph
        assert out.indices.tolist() == [1, 2] and out.weights.tolist() == [2.0, 1.0]
    # a chain never folds two edges: no weights, as before
    chain = gr.Graph.from_text("aabbc")
    assert contract(chain, merge_edges(chain, [True, False, True, False])).weights is None


@given(n=st.integers(1, 30), density=st.floats(0.0, 3.0), p=st.floats(0.0, 1.0),
       seed=st.integers(0, 2**32 - 1), weighted=st.booleans(), wide=st.booleans())
def test_contraction_equals_python_reference(n, density, p, seed, weighted, wide):
    rng = np.random.default_rng(seed)
    g = random_graph(rng, n, int(density * n), dtype=np.int64 if wide else np.int32)
    feats = rng.normal(size=(n, 3))
    if weighted:
        g = g.replace(weights=rng.random(g.num_edges))
    mask = rng.random(g.num_edges) < p
    h = merge_edges(g, mask)
    out = contract(g, h, feats)
    ref = python_contract(g, h.cluster, h.num_outputs)
    src = out.edge_sources()
    got = {(int(a), int(b)): (1.0 if out.weights is None else out.weights[e])
           for e, (a, b) in enumerate(zip(src, out.indices))}
    assert len(got) == out.num_edges  # no duplicate edges
    assert set(got) == set(ref)
    # unweighted, each edge weighs 1: a numerical review's find, folded
    # duplicates counted once (the loss then depended on whether unit
    # weights were written out); weights only where two edges folded
    for key in ref:
        assert got[key] == pytest.approx(ref[key], rel=1e-12)
    if not weighted:
        assert (out.weights is None) == all(v == 1.0 for v in ref.values())
    assert all(a != b for a, b in got)  # no self-loops
    np.testing.assert_array_equal(out.labels, g.labels[h.heads])
    means = np.array([feats[h.cluster == c].mean(axis=0) for c in range(h.num_outputs)])
    np.testing.assert_allclose(out.features, means, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(out.activation, means.mean(axis=1), rtol=1e-13, atol=1e-15)
    assert out.mass.tolist() == [1.0] * h.num_outputs


def test_contract_batch_keeps_offsets():
    g = Graph.from_texts(["aab", "", "cc", "d"])
    mask = np.ones(g.num_edges, bool)
    h = merge_edges(g, mask)
    out = contract(g, h)
    assert out.offsets.tolist() == [0, 1, 1, 2, 3]
    assert [x.to_text() for x in out.unbatch()] == ["a", "", "c", "d"]


def test_contract_rejects_history_across_batch():
    g = Graph.from_texts(["ab", "cd"])
    with pytest.raises(ValueError, match="different graphs of the batch"):
        contract(g, MergeHistory([0, 0, 0, 1]))


@given(n=st.integers(0, 30), seed=st.integers(0, 2**32 - 1), d=st.integers(1, 4))
def test_scatter_is_adjoint_of_gather(n, seed, d):
    rng = np.random.default_rng(seed)
    cluster = canonical(rng.integers(0, max(n // 2, 1), n)) if n else np.zeros(0, np.int64)
    h = MergeHistory(cluster)
    x = rng.normal(size=(n, d))
    y = rng.normal(size=(h.num_outputs, d))
    lhs = np.sum(h.gather(x) * y)
    rhs = np.sum(x * h.scatter(y))
    assert lhs == pytest.approx(rhs, rel=1e-12, abs=1e-12)
    # and the 1-d forms agree with the 2-d forms
    np.testing.assert_allclose(h.gather(x[:, 0]), h.gather(x)[:, 0], rtol=0, atol=0)


def test_gather_scatter_unpool_values():
    h = MergeHistory([0, 1, 1, 2, 1])
    assert h.indptr.tolist() == [0, 1, 4, 5]
    assert h.members.tolist() == [0, 1, 2, 4, 3]
    np.testing.assert_allclose(h.weights, [1, 1 / 3, 1 / 3, 1 / 3, 1])
    np.testing.assert_allclose(h.gather([1.0, 3.0, 6.0, 10.0, 9.0]), [1.0, 6.0, 10.0])
    np.testing.assert_allclose(h.scatter([3.0, 3.0, 3.0]), [3.0, 1.0, 1.0, 3.0, 1.0])
    np.testing.assert_array_equal(h.unpool([7.0, 8.0, 9.0]), [7, 8, 8, 9, 8])
    assert h.sizes.tolist() == [1, 3, 1]


def dense_pooling(h):
    """The (k, n) pooling matrix of a history, dense, from its cluster vector."""
    pool = np.zeros((h.num_outputs, h.num_inputs))
    pool[h.cluster, np.arange(h.num_inputs)] = h.node_weights
    return pool


@pytest.mark.parametrize("stream", [False, True], ids=["store", "stream"])
@given(n=st.integers(0, 40), seed=st.integers(0, 2**32 - 1), d=st.integers(1, 19),
       flat=st.booleans())
def test_gather_scatter_into_out(stream, n, seed, d, flat):
    # out= gives the same numbers as a fresh result and returns out itself;
    # STREAM_MIN_BYTES = 0 sends every reused buffer down the streaming-store
    # path (odd d puts rows at 8-byte but not 16-byte alignment)
    with streaming(stream):
        check_gather_scatter_into_out(n, seed, d, flat)


def check_gather_scatter_into_out(n, seed, d, flat):
    rng = np.random.default_rng(seed)
    cluster = canonical(rng.integers(0, max(n // 2, 1), n)) if n else np.zeros(0, np.int64)
    h = MergeHistory(cluster)
    pool = dense_pooling(h)
    shape = (lambda rows: (rows,)) if flat else (lambda rows: (rows, d))
    x = rng.normal(size=shape(n))
    y = rng.normal(size=shape(h.num_outputs))
    out_x = np.full(shape(h.num_outputs), np.nan)
    out_y = np.full(shape(n), np.nan)
    assert h.gather(x, out=out_x) is out_x
    assert h.scatter(y, out=out_y) is out_y
    np.testing.assert_allclose(out_x, pool @ x, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(out_y, pool.T @ y, rtol=1e-13, atol=1e-13)
    np.testing.assert_array_equal(out_x, h.gather(x))
    np.testing.assert_array_equal(out_y, h.scatter(y))


@pytest.mark.parametrize("offset", [0, 1], ids=["aligned16", "offset8"])
@pytest.mark.parametrize("d", [1, 2, 16, 17])
def test_scatter_streams_at_any_row_alignment(offset, d):
    # even d on a 16-byte boundary takes the streaming loop without per-row
    # checks; odd d, or a buffer 8 bytes past a boundary, peels every row
    rng = np.random.default_rng(d)
    cluster = canonical(rng.integers(0, 20, 60))
    h = MergeHistory(cluster)
    g = rng.normal(size=(h.num_outputs, d))
    base = np.full(60 * d + 2, np.nan)
    skip = base.ctypes.data % 16 // 8 + offset
    out = base[skip:skip + 60 * d].reshape(60, d)
    assert out.ctypes.data % 16 == 8 * offset
    with streaming(True):
        h.scatter(g, out=out)
    np.testing.assert_array_equal(out, h.node_weights[:, None] * g[cluster])
    assert np.isnan(base[:skip]).all() and np.isnan(base[skip + 60 * d:]).all()


def test_scatter_streams_into_large_reused_buffers():
    # the real threshold, crossed once: 64 MiB of output
    n = _core.STREAM_MIN_BYTES // (8 * 16) + 3
    cluster = np.arange(n) // 2
    h = MergeHistory(cluster)
    g = np.arange(h.num_outputs * 16, dtype=np.float64).reshape(-1, 16)
    out = np.empty((n, 16))
    h.scatter(g, out=out)
    np.testing.assert_array_equal(out, h.node_weights[:, None] * g[cluster])


def test_out_validation():
    h = MergeHistory([0, 1, 1])
    x = np.ones((3, 2))
    good = np.empty((2, 2))
    with pytest.raises(TypeError, match="out must be a numpy.ndarray"):
        h.gather(x, out=[[0.0, 0.0], [0.0, 0.0]])
    with pytest.raises(TypeError, match="out must have dtype float64"):
        h.gather(x, out=np.empty((2, 2), np.float32))
    with pytest.raises(ValueError, match=r"out must have shape \(2, 2\)"):
        h.gather(x, out=np.empty((2, 3)))
    with pytest.raises(ValueError, match=r"out must have shape \(3,\)"):
        h.scatter(np.ones(2), out=np.empty((3, 1)))
    with pytest.raises(ValueError, match="out must be C-contiguous"):
        h.gather(x, out=np.empty((2, 4))[:, ::2])
    with pytest.raises(ValueError, match="out must be C-contiguous and aligned"):
        raw = np.zeros(2 * 2 * 8 + 1, np.uint8)[1:].view(np.float64).reshape(2, 2)
        assert not raw.flags.aligned
        h.gather(x, out=raw)
    readonly = good.copy()
    readonly.flags.writeable = False
    with pytest.raises(ValueError, match="out is read-only"):
        h.gather(x, out=readonly)
    with pytest.raises(ValueError, match="out must not overlap x"):
        h.gather(x, out=x[:2])
    buf = np.zeros((3, 2))
    with pytest.raises(ValueError, match="out must not overlap g"):
        h.scatter(buf[:2], out=buf)


@given(n=st.integers(0, 30), seed=st.integers(0, 2**32 - 1))
def test_compose_equals_two_steps(n, seed):
    rng = np.random.default_rng(seed)
    c1 = canonical(rng.integers(0, max(n // 2, 1), n)) if n else np.zeros(0, np.int64)
    h1 = MergeHistory(c1)
    k1 = h1.num_outputs
    c2 = canonical(rng.integers(0, max(k1 // 2, 1), k1)) if k1 else np.zeros(0, np.int64)
    h2 = MergeHistory(c2)
    both = h1.compose(h2)
    x = rng.normal(size=(n, 3))
    g = rng.normal(size=(h2.num_outputs, 3))
    np.testing.assert_allclose(both.gather(x), h2.gather(h1.gather(x)), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(both.scatter(g), h1.scatter(h2.scatter(g)), rtol=1e-12,
                               atol=1e-14)
    np.testing.assert_array_equal(both.cluster, c2[c1] if n else c1)
    np.testing.assert_allclose(np.bincount(both.cluster, weights=both.node_weights,
                                           minlength=both.num_outputs), 1.0)


def test_compose_of_morphs_matches_direct():
    g = Graph.from_text("aabbbc")
    h1 = merge_edges(g, np.array([True, False, False, False, False]))
    g1 = contract(g, h1)
    h2 = merge_edges(g1, np.array([False, True, False, False]))
    assert h1.compose(h2).segments("aabbbc") == ["aa", "bb", "b", "c"]


def test_history_validation():
    with pytest.raises(ValueError, match="cluster must be non-negative"):
        MergeHistory([0, -1])
    with pytest.raises(ValueError, match="every output"):
        MergeHistory([0, 2])
    with pytest.raises(ValueError, match="num_outputs = 1"):
        MergeHistory([0, 1], num_outputs=1)
    with pytest.raises(ValueError, match="node_weights must sum to 1"):
        MergeHistory([0, 0], node_weights=[0.5, 0.2])
    with pytest.raises(TypeError, match="cluster must be an integer array"):
        MergeHistory([0.0, 1.0])
    h = MergeHistory([0, 0, 1])
    with pytest.raises(ValueError, match=r"x must have shape \(3,\) or \(3, d\)"):
        h.gather(np.ones(2))
    with pytest.raises(ValueError, match=r"g must have shape \(2,\)"):
        h.scatter(np.ones(3))
    with pytest.raises(ValueError, match="later has 3 inputs"):
        h.compose(MergeHistory([0, 1, 2]))
    with pytest.raises(ValueError, match="text has 2 characters"):
        h.segments("ab")
    for bad in ([2], [0.5]):   # 0 and 1 are decisions, other numbers are not
        with pytest.raises(TypeError, match="merge must be a boolean array"):
            merge_edges(Graph.from_text("ab"), bad)
    assert merge_edges(Graph.from_text("ab"), [1]).num_outputs == 1
    with pytest.raises(ValueError, match=r"merge must have shape \(1,\)"):
        merge_edges(Graph.from_text("ab"), [True, False])


def test_segments_unicode():
    h = MergeHistory([0, 0, 1, 1, 1])
    assert h.segments("日本🙂ab") == ["日本", "🙂ab"]
    assert MergeHistory(np.zeros(0, np.int64)).segments("") == []


class MergeMachine(RuleBasedStateMachine):
    """Successive merges on a chain, checked against a plain union-find after every rule."""

    def __init__(self):
        super().__init__()
        self.text = "abcdefghijklmnopqrst"
        self.n = len(self.text)
        self.graph = Graph.from_text(self.text)
        self.total = MergeHistory(np.arange(self.n))
        self.merged_pairs = []  # in input-node terms

    @rule(data=st.data())
    def merge_some(self, data):
        m = self.graph.num_edges
        if m == 0:
            return
        mask = np.array(data.draw(st.lists(st.booleans(), min_size=m, max_size=m)), bool)
        h = merge_edges(self.graph, mask)
        heads_in = self.total.heads  # input node of every current node
        src = self.graph.edge_sources()
        self.merged_pairs += [(int(heads_in[u]), int(heads_in[v]))
                              for u, v in zip(src[mask], self.graph.indices[mask])]
        self.graph = contract(self.graph, h)
        self.total = self.total.compose(h)

    @invariant()
    def matches_union_find(self):
        ref = naive_components(self.n, self.merged_pairs)
        np.testing.assert_array_equal(self.total.cluster, ref)
        assert self.graph.num_nodes == self.total.num_outputs
        assert "".join(s[0] for s in self.total.segments(self.text)) == self.graph.to_text()


TestMergeMachine = MergeMachine.TestCase


@given(cluster=st.lists(st.integers(0, 5), min_size=1, max_size=30),
       d=st.integers(0, 5), seed=st.integers(0, 2**32 - 1))
def test_uniform_weights_are_not_stored_and_give_the_same_values(cluster, d, seed):
    # uniform histories keep no weights array; gather divides by |c| itself,
    # bit for bit what the materialized weights (and explicit ones) give
    cluster = canonical(np.array(cluster))
    x = np.random.default_rng(seed).standard_normal((cluster.shape[0], d))
    h = MergeHistory(cluster)
    assert h._weights is None
    lazy = h.gather(x)
    w = h.weights
    np.testing.assert_array_equal(h.gather(x), lazy)
    explicit = MergeHistory(cluster, node_weights=h.node_weights)
    np.testing.assert_array_equal(explicit.gather(x), lazy)
    np.testing.assert_array_equal(explicit.weights, w)
    np.testing.assert_array_equal(w, 1.0 / h.sizes[cluster[h.members]])


@given(n=st.integers(1, 30), seed=st.integers(0, 2**32 - 1), d=st.integers(1, 5),
       weighted=st.booleans())
def test_gather_sums_in_member_order_to_the_bit(n, seed, d, weighted):
    # gather walks the inputs and starts each output at its head with a row
    # of -0.0: the same bits as summing each output's members in order, signed
    # zeros included, on any history (not only chains)
    rng = np.random.default_rng(seed)
    cluster = canonical(rng.integers(0, max(n // 2, 1), n))
    k = int(cluster.max()) + 1
    w = None
    if weighted:
        w = rng.random(n) + 0.1
        w /= np.bincount(cluster, weights=w)[cluster]
    h = MergeHistory(cluster, node_weights=w)
    x = rng.choice([-0.0, 0.0, 1.5, -2.25, 3.0], size=(n, d))
    got = h.gather(x)     # before anything reads h.node_weights (kernel's 1 / |c|)
    wts = w if weighted else 1.0 / np.bincount(cluster)[cluster]
    ref = np.empty((k, d))
    for c in range(k):
        members = np.flatnonzero(cluster == c)
        s = wts[members[0]] * x[members[0]]
        for i in members[1:]:
            s = s + wts[i] * x[i]
        ref[c] = s
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(np.signbit(got), np.signbit(ref))
