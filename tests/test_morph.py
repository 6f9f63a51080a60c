import re

import numpy as np
import pytest
from hypothesis import given, strategies as st

from grapheme import Embedding, Graph, Morpher, _core, gradcheck, numerical_gradient, ops
from helpers import activation_to_features, random_graph


def scalar_objective(rng, k, d):
    """A random smooth scalar function of output features and activations,
    returning (value, d/dfeatures, d/dactivation)."""
    A = rng.normal(size=(k, d))
    B = rng.normal(size=k)

    def f(feats, act):
        value = np.sum(A * np.tanh(feats)) + np.sum(B * act ** 2)
        return value, A * (1 - np.tanh(feats) ** 2), 2 * B * act

    return f


def check_history_gradient(graph, H, morpher, rng):
    out = morpher.forward(graph, H)
    margin = np.abs(out.similarity - morpher.tau).min(initial=np.inf)
    assert margin > 1e-4, "test point too close to a decision boundary"
    f = scalar_objective(rng, out.graph.num_nodes, H.shape[1])

    def value_and_grad(x):
        o = morpher.forward(graph, x)
        assert np.array_equal(o.history.cluster, out.history.cluster)
        value, gf, ga = f(o.graph.features, o.graph.activation)
        gf = gf + activation_to_features(o.graph.features, ga)
        return value, morpher.backward(o, grad_features=gf)

    res = gradcheck(value_and_grad, H, eps=1e-6, rtol=1e-6)
    assert res.ok, res.error
    return out


@pytest.mark.parametrize("text", ["abc", "xyz", "123"])
def test_history_gradient_on_strings(text, rng):
    emb = Embedding(dim=8, seed=3)
    g = Graph.from_text(text)
    H = emb.forward(g.labels)
    s = ops.EdgeSimilarity().forward(g, H)[0].similarity
    # a threshold between the two similarities: one merge, one not
    tau = s.mean()
    morpher = Morpher(threshold=np.log(tau / (1 - tau)) if 0 < tau < 1 else 0.0)
    if not 0 < tau < 1:
        H = H.copy()
        H[1] = H[0] + 0.1 * H[1]
        s = ops.EdgeSimilarity().forward(g, H)[0].similarity
        morpher = Morpher(threshold=float(np.log(s.mean() / (1 - s.mean()))))
    out = check_history_gradient(g, H, morpher, rng)
    assert out.graph.num_nodes == 2


@pytest.mark.parametrize("seed", range(6))
def test_history_gradient_on_random_graphs(seed, index_dtype):
    rng = np.random.default_rng(seed)
    g = random_graph(rng, 12, 24, dtype=index_dtype)
    base = rng.normal(size=(3, 5))
    H = base[rng.integers(0, 3, 12)] + 0.3 * rng.normal(size=(12, 5))
    out = check_history_gradient(g, H, Morpher(threshold=0.5), rng)
    assert 1 <= out.graph.num_nodes < 12  # something merged


def test_history_gradient_matches_manual_mean_rule(rng):
    g = Graph.from_text("aab")
    H = np.array([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]])
    out = Morpher().forward(g, H)
    gf = rng.normal(size=(2, 2))
    dH = Morpher().backward(out, grad_features=gf)
    np.testing.assert_allclose(dH, [gf[0] / 2, gf[0] / 2, gf[1]], rtol=0, atol=1e-15)
    ga = rng.normal(size=2)
    dH = Morpher().backward(out, grad_features=activation_to_features(out.graph.features, ga))
    np.testing.assert_allclose(dH, np.repeat([ga[0] / 4, ga[0] / 4, ga[1] / 2], 2).reshape(3, 2))


def test_morpher_forward_values():
    g = Graph.from_text("aab")
    H = np.array([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]])
    m = Morpher(threshold=0.8)
    out = m.forward(g, H)
    assert m.tau == pytest.approx(1 / (1 + np.exp(-0.8)))
    np.testing.assert_allclose(out.similarity, [1 / np.sqrt(1.01), 0.1 / np.sqrt(1.01)])
    np.testing.assert_allclose(out.probability,
                               1 / (1 + np.exp(-(out.similarity - m.tau) / 0.1)))
    assert out.decisions.tolist() == [True, False]
    assert out.graph.to_text() == "ab"
    np.testing.assert_allclose(out.graph.features, [[1.0, 0.05], [0.0, 1.0]])
    np.testing.assert_allclose(out.graph.activation, [0.525, 0.5])
    assert out.kept_fraction == pytest.approx(2 / 3)
    assert out.tau == m.tau and out.samples == 1 and out.log_prob is None
    assert out.rate_penalty == 0.0
    graph, history = out
    assert graph is out.graph and history is out.history
    assert m.grad_theta == 0.0  # the history estimator reports no threshold gradient


def test_morpher_zero_features_and_empty_graph():
    g = Graph.from_text("ab")
    out = Morpher().forward(g, np.zeros((2, 3)))
    assert out.similarity.tolist() == [0.0] and out.graph.num_nodes == 2
    e = Graph.from_text("")
    out = Morpher().forward(e, np.zeros((0, 4)))
    assert out.graph.num_nodes == 0 and out.graph.features.shape == (0, 4)
    assert Morpher().backward(out, grad_features=np.zeros((0, 4))).shape == (0, 4)


def test_morpher_read_only_and_memmap_features(tmp_path, rng):
    g = Graph.from_text("abcd")
    H = rng.normal(size=(4, 3))
    np.save(tmp_path / "h.npy", H)
    mm = np.load(tmp_path / "h.npy", mmap_mode="r")
    ro = H.copy()
    ro.flags.writeable = False
    for feats in (mm, ro):
        out = Morpher(threshold=-5).forward(g, feats)
        assert out.graph.num_nodes == 1
        np.testing.assert_allclose(out.graph.features[0], H.mean(axis=0))


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(threshold="0.8"), TypeError, "threshold must be a real number"),
    (dict(threshold=np.nan), ValueError, "threshold must be finite"),
    (dict(temperature=0.0), ValueError, "temperature must be >= 1e-300"),
    (dict(temperature=1e-310), ValueError, "temperature must be >= 1e-300"),
    (dict(estimator="magic"), ValueError, "estimator must be an Estimator or one of"),
    (dict(rate=-0.1), ValueError, "rate must be >= 0"),
])
def test_morpher_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        Morpher(**kwargs)


def test_morpher_bad_forward_input():
    g = Graph.from_text("abc")
    m = Morpher()
    with pytest.raises(TypeError, match="graph must be a grapheme.Graph"):
        m.forward("abc", np.ones((3, 2)))
    with pytest.raises(ValueError, match=r"features must have shape \(3, \*\)"):
        m.forward(g, np.ones((2, 2)))
    with pytest.raises(ValueError, match="features contains NaN"):
        m.forward(g, np.array([[1.0], [np.nan], [1.0]]))
    out = m.forward(g, np.ones((3, 2)))
    with pytest.raises(ValueError, match=r"grad_features must have shape \(1, 2\)"):
        m.backward(out, grad_features=np.ones((3, 2)))
    with pytest.raises(ValueError, match=r"grad_mass must have shape \(1,?\)"):
        m.vjp(out, grad_mass=np.ones(3))
    with pytest.raises(TypeError, match="morphed must be a Morphed"):
        m.backward(None)
    with pytest.raises(TypeError, match="morphed must be a Morphed"):
        m.vjp(None)
    with pytest.raises(TypeError, match="morphed must be a Morphed"):
        m.step(None)


# --------------------------------------------------------------- embedding
def test_embedding_deterministic_and_order_free():
    a = Embedding(dim=6, seed=7)
    b = Embedding(dim=6, seed=7)
    ha = a.forward(Graph.from_text("hello").labels)
    b.forward(Graph.from_text("zyx").labels)  # different first-seen order
    hb = b.forward(Graph.from_text("hello").labels)
    np.testing.assert_array_equal(ha, hb)
    assert not np.array_equal(ha, Embedding(dim=6, seed=8).forward(Graph.from_text("hello").labels))
    assert a.weight.shape == (5, 6)  # the unknown row, h, e, l, o


def test_embedding_every_code_point_its_own_row():
    emb = Embedding(dim=4)
    text = "aé日🙂\U0010FFFF" + "".join(chr(c) for c in range(256, 300))
    rows = emb.rows(Graph.from_text(text).labels)
    assert len(set(rows.tolist())) == len(text)
    h = emb.forward(Graph.from_text(text).labels)
    assert len({tuple(r) for r in h}) == len(text)


def test_embedding_init_is_standard_normal():
    emb = Embedding(dim=64, seed=0)
    h = emb.forward(np.arange(2000))
    assert abs(h.mean()) < 0.01 and abs(h.std() - 1) < 0.01


def test_embedding_backward_accumulates(rng):
    emb = Embedding(dim=3)
    labels = np.array([97, 98, 97, 99, 97])
    emb.forward(labels)
    g = rng.normal(size=(5, 3))
    emb.backward(labels, g)
    emb.backward(labels, g)
    ref = np.zeros((4, 3))   # the unknown row, a, b, c
    np.add.at(ref, emb.rows(labels), 2 * g)
    np.testing.assert_allclose(emb.grad, ref, rtol=1e-15)
    emb.zero_grad()
    assert not emb.grad.any()


def test_embedding_backward_after_a_forward_that_did_not_grow():
    """A numerical review's find: backward looked its rows up growing the
    table, so characters read through the unknown row sent their gradient
    to a new row, and the unknown row, the one read, got none."""
    emb = Embedding(dim=3)
    emb.forward([97])
    weight = emb.weight.copy()
    H = emb.forward([97, 99, 99], grow=False)
    emb.zero_grad()
    emb.backward([97, 99, 99], np.ones((3, 3)))
    unknown = emb.unknown_row
    assert emb.weight.shape == weight.shape                # nothing grew
    np.testing.assert_array_equal(H[1], emb.weight[unknown])
    assert emb.grad[unknown].tolist() == [2.0] * 3         # the row read, twice
    assert emb.grad.sum() == 9.0


def test_embedding_state_roundtrip():
    emb = Embedding(dim=5, seed=2)
    emb.forward([100, 50, 75])
    emb.weight[0] += 1.0
    back = Embedding.from_state(emb.state_dict(), seed=2)
    np.testing.assert_array_equal(back.forward([50, 100]), emb.forward([50, 100]))
    np.testing.assert_array_equal(back.forward([200]), emb.forward([200]))


def test_embedding_load_state_dict_keeps_its_width():
    # it took the state's width: dim 0 (ZeroDivisionError in segment and
    # save), or 16 under an 8-wide trainer, saved fine and refused on load
    emb = Embedding(dim=8)
    emb.forward([97, 98])
    other = Embedding(dim=16)
    other.forward([97, 98])
    for state in (other.state_dict(), {"codes": np.array([97, 0x110000]),
                                       "weight": np.zeros((2, 0))}):
        with pytest.raises(ValueError, match=r"weight must have shape \(\d, 8\)"):
            emb.load_state_dict(state)
        assert emb.dim == 8 and emb.weight.shape == (3, 8)
    with pytest.raises(ValueError, match="state has no 'codes'"):
        emb.load_state_dict({"weight": np.zeros((1, 8))})
    assert Embedding.from_state(other.state_dict()).dim == 16


def test_embedding_bad_input():
    with pytest.raises(ValueError, match="dim must be >= 1"):
        Embedding(dim=0)
    with pytest.raises(TypeError, match="dim must be an integer"):
        Embedding(dim=2.5)
    with pytest.raises(ValueError, match="labels must be Unicode code points"):
        Embedding().forward([-1])
    emb = Embedding(dim=2)
    with pytest.raises(ValueError, match=r"grad must have shape \(2, 2\)"):
        emb.backward([97, 98], np.ones((2, 3)))


def test_check_scalar_bounds():
    from grapheme._validation import check_scalar
    assert check_scalar(0.999, "b", upper=1.0, upper_inclusive=False) == 0.999
    with pytest.raises(ValueError, match="b must be < 1.0, got 1.0"):
        check_scalar(1.0, "b", upper=1.0, upper_inclusive=False)
    with pytest.raises(ValueError, match="b must be > 0, got 0.0"):
        check_scalar(0.0, "b", lower=0, lower_inclusive=False)
    with pytest.raises(TypeError, match="n must be an integer"):
        check_scalar(1.5, "n", integer=True)
    with pytest.raises(TypeError, match="b must be a real number"):
        check_scalar(True, "b")


# --------------------------------------------------------------- gradcheck
def test_numerical_gradient_and_gradcheck():
    f = lambda v: float(np.sum(np.sin(v)))  # noqa: E731
    x = np.array([[0.1, 0.2], [0.3, -0.4]])
    np.testing.assert_allclose(numerical_gradient(f, x), np.cos(x), rtol=1e-9)
    ok = gradcheck(lambda v: (f(v), np.cos(v)), x)
    assert ok and ok.error < 1e-9
    bad = gradcheck(lambda v: (f(v), 1.01 * np.cos(v)), x)
    assert not bad and bad.error == pytest.approx(0.01 / 1.01, rel=1e-4)
    with pytest.raises(ValueError, match="eps must be > 0"):
        numerical_gradient(f, x, eps=0)
    # a scalar parameter (like Morpher.theta) keeps its 0-d shape
    res = gradcheck(lambda v: (float(np.sin(v)), np.cos(v)), np.array(0.3))
    assert res.ok and res.analytic.shape == () and res.numerical.shape == ()
    with pytest.raises(ValueError, match="gradient of shape"):
        gradcheck(lambda v: (f(v), np.ones(3)), x)
    # what f returns is named (a docs reviewer's find: unpacking an int
    # raised "cannot unpack non-iterable int object")
    for bad_f, message in ((lambda v: 3, "f must return a pair (value, grad), got int"),
                           (lambda v: (1.0, 2.0, 3.0), "got tuple of length 3"),
                           (lambda v: (np.ones(2), np.ones(2)), "f's value must be a real "
                                                                 "scalar, got ndarray"),
                           (lambda v: ("1.5", np.ones(2)), "f's value must be a real scalar, "
                                                           "got str"),
                           ("f", "f must be callable, got str")):
        with pytest.raises(TypeError, match=re.escape(message)):
            gradcheck(bad_f, [1.0, 2.0])


@given(n=st.integers(0, 12), density=st.floats(0.0, 3.0), d=st.integers(0, 9),
       zero_rows=st.integers(0, 3), seed=st.integers(0, 2**32 - 1), wide=st.booleans())
def test_similarity_kernels_equal_numpy(n, density, d, zero_rows, seed, wide):
    # the kernels sum in four interleaved partial sums and scale per edge;
    # numpy sums otherwise, so equal to rounding. Zero rows (norm clamped to
    # 1e-12) and self-loops included.
    rng = np.random.default_rng(seed)
    g = random_graph(rng, n, int(density * n), dtype=np.int64 if wide else np.int32,
                     self_loops=True)
    H = rng.standard_normal((n, d))
    H[rng.integers(0, max(n, 1), zero_rows if n else 0)] = 0.0
    src, dst = g.edge_sources(), g.indices
    sim = np.empty(g.num_edges)
    norms = np.empty(n)
    _core.edge_cosine(g.indptr, g.indices, H, norms, sim)
    np.testing.assert_array_equal(ops.EdgeSimilarity().forward(g, H)[0].similarity, sim)
    ref_norms = np.sqrt((H * H).sum(axis=1))
    clamped = np.maximum(ref_norms, 1e-12)
    ref = (H[src] * H[dst]).sum(axis=1) / (clamped[src] * clamped[dst])
    np.testing.assert_allclose(norms, ref_norms, rtol=1e-14, atol=0)
    np.testing.assert_allclose(sim, ref, rtol=1e-13, atol=1e-15)

    grad_sim = rng.standard_normal(g.num_edges)
    grad_H = np.zeros((n, d))
    _core.edge_cosine_backward(g.indptr, g.indices, H, norms, sim, grad_sim, grad_H)
    live = ref_norms > 1e-12
    cu = np.where(live[src], sim / clamped[src] ** 2, 0.0)
    cv = np.where(live[dst], sim / clamped[dst] ** 2, 0.0)
    scale = (grad_sim / (clamped[src] * clamped[dst]))[:, None]
    ref_grad = np.zeros((n, d))
    np.add.at(ref_grad, src, scale * H[dst] - (grad_sim * cu)[:, None] * H[src])
    np.add.at(ref_grad, dst, scale * H[src] - (grad_sim * cv)[:, None] * H[dst])
    np.testing.assert_allclose(grad_H, ref_grad, rtol=1e-12, atol=1e-12)


# ------------------------------------------------ morph vs scipy components
def scipy_clusters(g, merge):
    """Clusters of the merged edges by scipy's connected components, numbered
    by their earliest node (the head)."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    n = g.num_nodes
    src, dst = g.edge_sources(), g.indices
    A = csr_matrix((np.ones(int(merge.sum())), (src[merge], dst[merge])), shape=(n, n))
    _, lab = connected_components(A, directed=True, connection="weak")
    heads = np.array([np.flatnonzero(lab == c)[0] for c in range(lab.max() + 1)])
    order = np.argsort(heads)
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return rank[lab], heads[order]


@pytest.mark.parametrize("estimator", ["history", "reinforce"])
@pytest.mark.parametrize("seed", range(4))
def test_morph_matches_scipy_components(estimator, seed, index_dtype):
    rng = np.random.default_rng(seed)
    g = random_graph(rng, 30, 45, dtype=index_dtype)
    base = rng.normal(size=(4, 3))
    H = base[rng.integers(0, 4, 30)] + 0.4 * rng.normal(size=(30, 3))
    m = Morpher(threshold=0.5, temperature=0.2, estimator=estimator)
    out = m.forward(g, H)
    if estimator == "history":
        np.testing.assert_array_equal(out.decisions, out.similarity > m.tau)
    cluster, heads = scipy_clusters(g, out.decisions)
    assert 1 < out.graph.num_nodes < g.num_nodes
    np.testing.assert_array_equal(out.history.cluster, cluster)
    np.testing.assert_array_equal(out.history.heads, heads)
    k = heads.size
    F = np.zeros((k, 3))
    np.add.at(F, cluster, H)
    F /= np.bincount(cluster, minlength=k)[:, None]
    np.testing.assert_allclose(out.graph.features, F, rtol=1e-13, atol=1e-13)
    np.testing.assert_array_equal(out.graph.labels, g.labels[heads])
    # contracted edges: (c(u), c(v)) for every input edge, no self-loops, no duplicates
    src, dst = g.edge_sources(), g.indices
    pairs = {(int(cluster[u]), int(cluster[v])) for u, v in zip(src, dst)
             if cluster[u] != cluster[v]}
    got = set(zip(out.graph.edge_sources().tolist(), out.graph.indices.tolist()))
    assert got == pairs
    # predict is the deterministic hard morph, whatever the estimator
    pred = m.predict(g, H)
    np.testing.assert_array_equal(pred.decisions, out.similarity > m.tau)


@pytest.mark.parametrize("estimator", ["history", "soft", "ste", "reinforce"])
def test_forward_into_a_workspace_is_bit_identical(estimator):
    """``Morpher.forward(workspace=)`` (what the Trainer passes): the morphed
    features live in the workspace, the same numbers and gradient as a pure
    call, also on the workspace's second use with other shapes between."""
    from grapheme._workspace import Workspace

    rng = np.random.default_rng(3)
    morpher = Morpher(threshold=0.2, temperature=0.5, estimator=estimator)
    ws = Workspace()
    for texts in (["hello", "world"], ["a"], ["morphing", "graphs", "xyz"]):
        g = Graph.from_texts(texts)
        H = rng.normal(size=(g.num_nodes, 3))
        pure = morpher.forward(g, H)
        got = morpher.forward(g, H, workspace=ws)
        assert np.array_equal(got.graph.features, pure.graph.features)
        assert any(np.shares_memory(got.graph.features, a) for a in ws._arrays.values())
        up = rng.normal(size=pure.graph.features.shape)
        want = morpher.vjp(pure, grad_features=up, grad_mass=np.ones(pure.graph.num_nodes))
        have = morpher.vjp(got, grad_features=up, grad_mass=np.ones(got.graph.num_nodes))
        assert np.array_equal(have.features, want.features)
        assert np.array_equal(have.theta, want.theta)


def test_an_estimator_without_a_workspace_argument_still_works():
    """An estimator written before ``workspace`` existed (its ``forward``
    takes neither ``shard`` nor ``workspace``) still morphs when the caller
    passes a workspace: the Morpher passes only what is given."""
    from grapheme._workspace import Workspace
    from grapheme.estimators import Hard

    class Old(Hard):
        name = None

        def forward(self, graph, features, similarity, scores):
            return super().forward(graph, features, similarity, scores)

    g = Graph.from_text("aabbc")
    H = np.repeat(np.eye(3), [2, 2, 1], axis=0)
    out = Morpher(estimator=Old()).forward(g, H, workspace=Workspace())
    assert out.graph.num_nodes == 3


def test_vjp_takes_upstream_gradients_as_given():
    """Upstream gradients are checked for shape, not scanned for NaN (as the
    operations' vjps and autograd): NaN in, NaN out, no error."""
    g = Graph.from_text("aabc")
    m = Morpher(estimator="soft")
    morphed = m.forward(g, np.eye(4))
    k, d = morphed.graph.features.shape
    upstream = np.ones((k, d))
    upstream[0, 0] = np.nan
    grad = m.vjp(morphed, grad_features=upstream)
    assert np.isnan(grad.features).any()
    with pytest.raises(ValueError, match="grad_features must have shape"):
        m.vjp(morphed, grad_features=np.ones((k + 1, d)))


def test_settings_changed_on_the_morpher_are_checked_and_used():
    """A setting changed on a Morpher is checked when the next morph runs,
    naming it (before: ``temperature = "x"`` failed inside numpy, an
    estimator's alias failed with an AttributeError); an alias becomes its
    Estimator, as in the constructor; the vjp of a morph uses the
    temperature that morph ran with."""
    g = Graph.from_texts(["hello", "world"])
    h = np.random.default_rng(0).normal(size=(g.num_nodes, 4))
    for key, value, exc in (("temperature", "x", TypeError), ("temperature", -1.0, ValueError),
                            ("estimator", "bogus", ValueError), ("rate", 2.0, ValueError)):
        morpher = Morpher(estimator="soft")
        setattr(morpher, key, value)
        for call in (morpher.forward, morpher.predict, morpher.decide):
            with pytest.raises(exc, match=key):
                call(g, h)
    morpher = Morpher(estimator="soft", temperature=0.2)
    m = morpher.forward(g, h)
    grad = np.random.default_rng(1).normal(size=m.graph.features.shape)
    want = morpher.vjp(m, grad_features=grad, grad_mass=np.ones(m.graph.num_nodes))
    morpher.temperature = 0.7
    got = morpher.vjp(m, grad_features=grad, grad_mass=np.ones(m.graph.num_nodes))
    np.testing.assert_array_equal(got.features, want.features)
    np.testing.assert_array_equal(got.theta, want.theta)
    morpher.estimator = "ste"
    assert type(morpher.forward(g, h)._estimator).__name__ == "StraightThrough"


def test_settings_assigned_later_reach_state_and_step_checked():
    """state_dict, get_params and step saw an alias or a float raw (an
    AttributeError), and step stepped a different estimator with a morph's
    saved data (found by the review helper)."""
    g = Graph.from_texts(["hello", "world"])
    h = np.random.default_rng(0).normal(size=(g.num_nodes, 4))
    morpher = Morpher(estimator="soft")
    out = morpher.forward(g, h)
    morpher.estimator, morpher.rate = "reinforce", 0.2
    assert morpher.state_dict()["estimator"] is not None
    assert type(morpher.get_params()["estimator"]).__name__ == "Reinforce"
    with pytest.raises(ValueError, match="assigned since"):
        morpher.step(out, np.ones(2))
    morpher.estimator = "soft"
    assert morpher.step(out, kept_fraction=0.5) != 0.0   # the float rate is a controller
