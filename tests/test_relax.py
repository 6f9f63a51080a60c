"""Chain relaxation kernels against a plain numpy reference and finite differences."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import grapheme as gr
from grapheme import _relax, ops
from helpers import dense_relaxed_weights, streaming


def forward(H, m, stream=False):
    """The forward kernel into fresh arrays: ``(out, D, mass)``."""
    n, d = H.shape
    out, D, mass = np.empty((n, d)), np.empty(n), np.empty(n)
    _relax.relax_chain_forward(H, m, out, D, mass, stream)
    return out, D, mass


def backward(m, out, D, grad_out, grad_mass, stream=False):
    """The backward kernel into fresh arrays: ``(grad_H, grad_m)``."""
    n, d = out.shape
    grad_H, grad_m = np.empty((n, d)), np.empty(n)
    _relax.relax_chain_backward(m, out, D, grad_out, grad_mass, grad_H, grad_m, stream)
    return grad_H, grad_m


def reference_forward(H, m):
    """Plain Python recursion of DESIGN.md, "Relaxation for chains"."""
    n, d = H.shape
    N = np.zeros((n + 1, d))
    D = np.zeros(n + 1)
    mm = np.append(m[:-1], 0.0) if n else m  # no edge leaves the last node
    for i in range(n - 1, -1, -1):
        N[i] = H[i] + mm[i] * N[i + 1]
        D[i] = 1.0 + mm[i] * D[i + 1]
    out = N[:n] / D[:n, None]
    mass = np.ones(n)
    mass[1:] = 1.0 - mm[:-1]
    return out, mass


def random_chain(rng, n, d, boundaries=True):
    H = rng.standard_normal((n, d))
    m = rng.uniform(0.05, 0.95, n)
    if boundaries and n > 2:
        m[rng.choice(n, size=max(1, n // 4), replace=False)] = 0.0
    m[-1:] = 0.0
    return H, m


def relaxed_problem(seed, n, d):
    """A random chain, its forward results and random output gradients:
    ``H, m, out, D, g, gmass``."""
    rng = np.random.default_rng(seed)
    H, m = random_chain(rng, n, d)
    out, D, _ = forward(H, m)
    return H, m, out, D, rng.standard_normal((n, d)), rng.standard_normal(n)


def rel_err(num, ana):
    num, ana = np.ravel(num), np.ravel(ana)
    scale = max(np.abs(num).max(), np.abs(ana).max(), 1e-300)
    return np.abs(num - ana).max() / scale


@pytest.mark.parametrize("n,d", [(1, 1), (2, 3), (7, 4), (40, 5)])
def test_forward_matches_reference(n, d):
    rng = np.random.default_rng(n * 100 + d)
    H, m = random_chain(rng, n, d)
    out, D, mass = forward(H, m)
    ref_out, ref_mass = reference_forward(H, m)
    np.testing.assert_allclose(out, ref_out, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(mass, ref_mass, rtol=0, atol=1e-15)


def test_last_weight_is_ignored():
    rng = np.random.default_rng(0)
    H, m = random_chain(rng, 6, 3)
    m2 = m.copy()
    m2[-1] = 0.7
    np.testing.assert_array_equal(forward(H, m)[0], forward(H, m2)[0])
    np.testing.assert_array_equal(forward(H, m)[2], forward(H, m2)[2])


def test_empty_chain():
    H = np.empty((0, 3))
    m = np.empty(0)
    out, D, mass = forward(H, m)
    gH, gm = backward(m, out, D, np.empty((0, 3)), np.empty(0))
    assert out.shape == (0, 3) and gH.shape == (0, 3) and gm.shape == (0,)


def test_read_only_inputs():
    rng = np.random.default_rng(1)
    H, m = random_chain(rng, 9, 2)
    H.setflags(write=False)
    m.setflags(write=False)
    out, D, mass = forward(H, m)
    for a in (out, D, mass):
        a.setflags(write=False)
    g = rng.standard_normal(out.shape)
    g.setflags(write=False)
    gmass = rng.standard_normal(9)
    gmass.setflags(write=False)
    backward(m, out, D, g, gmass)


@given(st.lists(st.booleans(), min_size=1, max_size=30), st.integers(1, 4))
@settings(max_examples=200)
def test_hard_weights_give_segment_means(merge, d):
    n = len(merge)
    m = np.array(merge, dtype=float)
    m[-1] = 0.0
    H = np.random.default_rng(n).standard_normal((n, d))
    out, D, mass = forward(H, m)
    heads = np.flatnonzero(np.r_[1.0, 1.0 - m[:-1]])
    ends = np.r_[heads[1:], n]
    for a, b in zip(heads, ends):
        np.testing.assert_allclose(out[a], H[a:b].mean(0), rtol=1e-14, atol=1e-14)
        assert D[a] == b - a
    expected_mass = np.zeros(n)
    expected_mass[heads] = 1.0
    np.testing.assert_array_equal(mass, expected_mass)


def loss_and_grads(rng, n, d):
    """A random scalar of (out, mass), its cotangents, and an evaluator."""
    A = rng.standard_normal((n, d))
    w = rng.standard_normal(n)

    def loss(H, m):
        out, mass = reference_forward(H, m)
        return np.sum(A * np.sin(out)) + np.sum(w * mass**2)

    def cotangents(out, mass):
        return A * np.cos(out), 2.0 * w * mass

    return loss, cotangents


@pytest.mark.parametrize("n,d,seed", [(2, 1, 0), (5, 3, 1), (17, 4, 2), (60, 2, 3)])
def test_backward_matches_finite_differences(n, d, seed):
    rng = np.random.default_rng(seed)
    H, m = random_chain(rng, n, d)
    loss, cotangents = loss_and_grads(rng, n, d)
    out, D, mass = forward(H, m)
    gH, gm = backward(m, out, D, *cotangents(out, mass))

    eps = 1e-6
    num_H = np.zeros_like(H)
    for idx in np.ndindex(*H.shape):
        Hp, Hm = H.copy(), H.copy()
        Hp[idx] += eps
        Hm[idx] -= eps
        num_H[idx] = (loss(Hp, m) - loss(Hm, m)) / (2 * eps)
    num_m = np.zeros(n)
    for i in range(n - 1):  # m[n-1] does not enter the forward pass
        mp, mm = m.copy(), m.copy()
        mp[i] += eps
        mm[i] -= eps
        num_m[i] = (loss(H, mp) - loss(H, mm)) / (2 * eps)
    assert rel_err(num_H, gH) < 1e-4
    assert rel_err(num_m, gm) < 1e-4
    assert gm[-1] == 0.0


def test_backward_at_hard_weights_matches_one_sided_differences():
    # at m in {0, 1} the relaxation is still polynomial in m; a one-sided
    # difference towards the inside of [0, 1] checks the gradient there
    rng = np.random.default_rng(5)
    n, d = 12, 3
    H = rng.standard_normal((n, d))
    m = (rng.uniform(size=n) < 0.5).astype(float)
    m[-1] = 0.0
    loss, cotangents = loss_and_grads(rng, n, d)
    out, D, mass = forward(H, m)
    _, gm = backward(m, out, D, *cotangents(out, mass))
    eps = 1e-6
    num_m = np.zeros(n)
    for i in range(n - 1):
        s = -1.0 if m[i] == 1.0 else 1.0
        m1, m2 = m.copy(), m.copy()
        m1[i] += s * eps
        m2[i] += 2 * s * eps
        # second-order one-sided difference
        num_m[i] = s * (-3 * loss(H, m) + 4 * loss(H, m1) - loss(H, m2)) / (2 * eps)
    assert rel_err(num_m, gm) < 1e-4


def test_long_segment_is_stable():
    n, d = 100_000, 2
    H = np.ones((n, d))
    m = np.ones(n)
    out, D, mass = forward(H, m)
    np.testing.assert_allclose(out, 1.0, rtol=1e-12)
    assert D[0] == n


def test_segments_are_independent_in_the_backward_pass():
    # where m == 0 the recursions restart: a non-finite upstream gradient in
    # one text leaves the other texts' gradients as they are (kap restarts
    # at 0; it used to carry 0 * inf = NaN into every later text)
    rng = np.random.default_rng(9)
    g = gr.Graph.from_texts(["abcdef", "ghij", "klmnopq"])
    H = rng.standard_normal((g.num_nodes, 3))
    merge = rng.uniform(0.05, 0.95, g.num_edges)
    r, saved = ops.ChainRelaxation().forward(g, H, merge)
    G = rng.standard_normal(H.shape)
    gH, gm = ops.ChainRelaxation().vjp(saved, G, None, None)
    bad = G.copy()
    bad[6:10] = [np.inf, np.nan, 1.0]                    # the second text
    bH, bm = ops.ChainRelaxation().vjp(saved, bad, None, None)
    edges = g.edge_sources()
    for lo, hi in [(0, 6), (10, 17)]:
        np.testing.assert_array_equal(bH[lo:hi], gH[lo:hi])
        keep = (edges >= lo) & (edges < hi)
        np.testing.assert_array_equal(bm[keep], gm[keep])
    assert not np.isfinite(bm[(edges >= 6) & (edges < 10)]).all()


def test_backward_in_place_over_grad_out():
    rng = np.random.default_rng(6)
    H, m = random_chain(rng, 30, 4)
    out, D, mass = forward(H, m)
    g = rng.standard_normal(out.shape)
    gmass = rng.standard_normal(30)
    gH, gm = backward(m, out, D, g, gmass)
    buf = g.copy()
    gm2 = np.empty(30)
    _relax.relax_chain_backward(m, out, D, buf, gmass, buf, gm2)
    np.testing.assert_array_equal(buf, gH)
    np.testing.assert_array_equal(gm2, gm)


# ------------------------------------------------------- streaming stores
def buffer(shape, offset):
    """A NaN-filled float64 buffer; ``offset`` starts it 8 bytes past a 16-byte
    boundary (still aligned for float64), so streaming stores must peel."""
    size = int(np.prod(shape))
    base = np.full(size + 2, np.nan)
    skip = base.ctypes.data % 16 // 8
    buf = base[skip + offset:skip + offset + size].reshape(shape)
    assert size == 0 or buf.ctypes.data % 16 == 8 * offset
    return buf


@given(n=st.integers(0, 30), d=st.integers(0, 19), seed=st.integers(0, 2**32 - 1),
       offset=st.integers(0, 1))
def test_streaming_stores_equal_plain_stores(n, d, seed, offset):
    # the kernels' stream=True path (a carried row, streaming copies) writes
    # exactly what the plain path writes; odd d (or offset) puts rows at
    # 8-byte but not 16-byte alignment
    rng = np.random.default_rng(seed)
    H, m = random_chain(rng, n, d)
    out, D, mass = forward(H, m)
    bufs = buffer((n, d), offset), buffer((n,), offset), buffer((n,), offset)
    _relax.relax_chain_forward(H, m, *bufs, True)
    for a, b in zip(bufs, (out, D, mass)):
        np.testing.assert_array_equal(a, b)

    g = rng.standard_normal((n, d))
    gmass = rng.standard_normal(n)
    gH, gm = backward(m, out, D, g, gmass)
    bufs = buffer((n, d), offset), buffer((n,), offset)
    _relax.relax_chain_backward(m, out, D, g, gmass, *bufs, True)
    np.testing.assert_array_equal(bufs[0], gH)
    np.testing.assert_array_equal(bufs[1], gm)
    # in place over grad_out, at any alignment
    buf = buffer((n, d), offset)
    buf[...] = g
    gm2 = buffer((n,), 0)
    _relax.relax_chain_backward(m, out, D, buf, gmass, buf, gm2, False)
    np.testing.assert_array_equal(buf, gH)
    np.testing.assert_array_equal(gm2, gm)


def test_streaming_stores_equal_plain_stores_at_hard_weights():
    rng = np.random.default_rng(7)
    n, d = 50, 5
    H = rng.standard_normal((n, d))
    m = (rng.uniform(size=n) < 0.5).astype(float)
    g, gmass = rng.standard_normal((n, d)), rng.standard_normal(n)
    out, D, mass = forward(H, m)
    gH, gm = backward(m, out, D, g, gmass)
    np.testing.assert_array_equal(forward(H, m, stream=True)[0], out)
    np.testing.assert_array_equal(backward(m, out, D, g, gmass, stream=True)[0], gH)


def test_chain_relaxation_never_streams():
    # the operation writes fresh arrays only (no out= buffers): never with
    # streaming stores, whatever STREAM_MIN_BYTES says
    rng = np.random.default_rng(8)
    g = gr.Graph.from_texts(["abcdefgh", "ijkl"])
    H = rng.standard_normal((g.num_nodes, 4))
    merge = rng.uniform(0.05, 0.95, g.num_edges)
    calls = []

    def spy(kernel):
        def run(*args):
            calls.append(args[-1])
            return kernel(*args)
        return run

    with pytest.MonkeyPatch.context() as mp, streaming(True):
        mp.setattr(_relax, "relax_chain_forward", spy(_relax.relax_chain_forward))
        mp.setattr(_relax, "relax_chain_backward", spy(_relax.relax_chain_backward))
        r, saved = ops.ChainRelaxation().forward(g, H, merge)
        ops.ChainRelaxation().vjp(saved, np.ones_like(H), np.ones(g.num_nodes),
                                  np.ones(r.graph.num_edges))
    assert calls == [False, False]


# ------------------------------------------------- expected inter-cluster edges
CUTOFF = 2.0 ** -60


def relaxed(texts, m_edges, d=2, seed=0):
    """The chain relaxation of a batch of chains at edge weights ``m_edges``:
    the op's result and saved state, the graph, and ``m`` per node."""
    g = gr.Graph.from_texts(texts)
    H = np.random.default_rng(seed).standard_normal((g.num_nodes, d))
    r, saved = ops.ChainRelaxation().forward(g, H, np.asarray(m_edges, dtype=float))
    m = np.zeros(g.num_nodes)
    m[g.edge_sources()] = m_edges
    return r, saved, g, m


def random_edge_weights(rng, E):
    """Weights in (0, 1) with exact zeros and ones and some tiny ones mixed in."""
    m = rng.uniform(0.02, 0.98, E)
    kind = rng.integers(0, 8, E)
    m[kind == 0] = 0.0
    m[kind == 1] = 1.0
    m[kind == 2] = rng.uniform(0, 1e-9, (kind == 2).sum())
    return m


@pytest.mark.parametrize("seed", range(8))
def test_relaxed_edges_match_reference(seed):
    rng = np.random.default_rng(seed)
    texts = ["x" * int(k) for k in rng.integers(0, 25, 4)]
    E = sum(max(len(t) - 1, 0) for t in texts)
    r, _, g, m = relaxed(texts, random_edge_weights(rng, E), seed=seed)
    rg = r.graph
    offsets = g.graph_offsets
    W = dense_relaxed_weights(m, offsets)
    src, dst = rg.edge_sources(), rg.indices
    # the kept edges: i -> i+1, ..., i+L_i inside i's chain, with the reference weights
    assert np.all(dst > src)
    block = np.searchsorted(offsets, np.arange(g.num_nodes), side="right") - 1
    assert np.array_equal(block[src], block[dst])
    for i in range(g.num_nodes):
        row = dst[src == i]
        np.testing.assert_array_equal(row, np.arange(i + 1, i + 1 + row.size))
    np.testing.assert_allclose(r.weights, W[src, dst], rtol=1e-14, atol=0)
    np.testing.assert_array_equal(r.weights, rg.weights)
    # the left-out edges are negligible
    kept = np.zeros_like(W, dtype=bool)
    kept[src, dst] = True
    assert np.all(W[~kept] < CUTOFF)
    # a node's weighted out-degree: the probability that a next cluster exists
    last = offsets[block + 1] - 1
    mu = np.r_[1.0, 1.0 - m[:-1]]
    mu[offsets[:-1][offsets[:-1] < g.num_nodes]] = 1.0
    runs = np.array([np.prod(m[i:last[i]]) for i in range(g.num_nodes)])
    degree = np.bincount(src, weights=r.weights, minlength=g.num_nodes)
    np.testing.assert_allclose(degree, mu * (1.0 - runs), rtol=0, atol=1e-14)
    np.testing.assert_array_equal(r.mass, mu)


def test_relaxed_edges_are_cut_off_only_where_negligible():
    # a long chain of halves: the window stops once 2^-l drops below the cutoff
    n = 300
    r, _, g, m = relaxed(["x" * n], np.full(n - 1, 0.5))
    counts = np.diff(r.graph.indptr)
    assert 55 <= counts.max() <= 70 and counts[0] < n - 1
    W = dense_relaxed_weights(m, g.graph_offsets)
    kept = np.zeros_like(W, dtype=bool)
    kept[r.graph.edge_sources(), r.graph.indices] = True
    assert np.all(W[~kept] < CUTOFF) and np.all(W[kept] > 0)
    # behind two zero weights nothing is kept
    m_edges = np.array([0.9, 0.0, 0.9, 0.0, 0.9, 0.9])
    r, _, g, m = relaxed(["x" * 7], m_edges)
    src, dst = r.graph.edge_sources(), r.graph.indices
    assert dst[src == 0].max() == 4   # 0 -> 1, 2, 3, 4: the window stops at the second zero


@pytest.mark.parametrize("seed", range(4))
def test_relaxed_edges_backward_matches_reference(seed):
    # d/dm of <G, W> against central differences of the plain-numpy weights
    # (polynomial in m, so exact to O(eps^2) also at m in {0, 1})
    rng = np.random.default_rng(100 + seed)
    texts = ["x" * int(k) for k in rng.integers(1, 14, 3)]
    E = sum(len(t) - 1 for t in texts)
    m_edges = random_edge_weights(rng, E)
    r, saved, g, m = relaxed(texts, m_edges, seed=seed)
    G = rng.standard_normal((g.num_nodes, g.num_nodes))
    upstream = G[r.graph.edge_sources(), r.graph.indices]
    _, grad_m = ops.ChainRelaxation().vjp(saved, None, None, upstream)
    src = g.edge_sources()
    offsets = g.graph_offsets

    def objective(me):
        mm = np.zeros(g.num_nodes)
        mm[src] = me
        return float(np.sum(G * dense_relaxed_weights(mm, offsets)))

    eps = 1e-6
    num = np.zeros(E)
    for e in range(E):
        mp, mn = m_edges.copy(), m_edges.copy()
        mp[e] += eps
        mn[e] -= eps
        num[e] = (objective(mp) - objective(mn)) / (2 * eps)
    assert rel_err(num, grad_m) < 1e-6


@given(st.lists(st.booleans(), min_size=1, max_size=30))
@settings(max_examples=100)
def test_hard_weights_give_contracted_edges(merge):
    # at m in {0, 1} the expected edges are the hard morph's: weight 1 from
    # each head to the next head of its chain, 0 on every other kept edge
    n = len(merge) + 1
    m_edges = np.array(merge, dtype=float)
    r, _, g, m = relaxed(["x" * n], m_edges)
    heads = np.flatnonzero(np.r_[1.0, 1.0 - m_edges])
    W = r.weights
    assert set(np.unique(W).tolist()) <= {0.0, 1.0}
    live = W == 1.0
    np.testing.assert_array_equal(r.graph.edge_sources()[live], heads[:-1])
    np.testing.assert_array_equal(r.graph.indices[live], heads[1:])


def test_relaxed_edge_counts_refuses_a_last_node_with_a_next():
    """The kernel walks a window while ``has_next`` holds: a last node
    marked as having a next one would read past the end, so it is refused
    (the Python layer never makes one), as are arrays of other lengths."""
    m, counts = np.full(4, 0.5), np.empty(4, np.int64)
    with pytest.raises(ValueError, match="last node"):
        _relax.relaxed_edge_counts(m, np.ones(4, np.uint8), counts)
    with pytest.raises(ValueError, match="must be"):
        _relax.relaxed_edge_counts(m, np.ones(3, np.uint8), counts)
    _relax.relaxed_edge_counts(m, np.array([1, 1, 1, 0], np.uint8), counts)
    assert counts.tolist() == [3, 2, 1, 0]


def test_a_weighted_chain_is_refused_not_read_as_unweighted():
    """A numerical review's find: the relaxation (so 'soft' and 'ste') used
    unit weights on a weighted chain, where 'ste' is to run forward exactly
    as the hard morph, which keeps them."""
    import grapheme as gr

    g = gr.Graph.from_texts(["abcab", "xyz"]).replace(weights=[.5, 2, .3, 1.5, .7, .2])
    H = np.random.default_rng(3).normal(size=(8, 4))
    for estimator in ("soft", "ste"):
        with pytest.raises(ValueError, match="graph must be unweighted for the chain "
                                             "relaxation"):
            gr.Morpher(0.0, estimator=estimator).forward(g, H)
    out = gr.Morpher(0.0, estimator="history").forward(g, H).graph
    assert out.weights is not None and out.weights.sum() <= 5.2
