"""Gradient estimators of the Morpher: soft, ste, reinforce, rate penalty."""
import itertools

import numpy as np
import pytest
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

from grapheme import Graph, Morpher
from grapheme._estimators import replicate


# ----------------------------------------------------------------- helpers
def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def rel_err(num, ana):
    num, ana = np.ravel(num), np.ravel(ana)
    scale = max(np.abs(num).max(), np.abs(ana).max())
    return 0.0 if scale == 0 else np.abs(num - ana).max() / scale


def numgrad(f, x, eps=1e-6):
    x = np.array(x, dtype=float)
    g = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += eps
        xm[idx] -= eps
        g[idx] = (f(xp) - f(xm)) / (2 * eps)
    return g


def cosine(H, src, dst):
    nh = np.linalg.norm(H, axis=1)
    return np.einsum("ij,ij->i", H[src], H[dst]) / (nh[src] * nh[dst])


class SmoothLoss:
    """A random smooth scalar of the output features, activations and masses."""

    def __init__(self, rng, n, d):
        self.A = rng.standard_normal((n, d))
        self.w = rng.standard_normal(n)
        self.v = rng.standard_normal(n)

    def value(self, g):
        F, a, mu = g.features, g.activation, g.mass
        return np.sum(self.A * np.sin(F)) + np.sum(self.w * a**2) + np.sum(self.v * mu**2)

    def grads(self, g):
        F, a, mu = g.features, g.activation, g.mass
        return dict(grad_features=self.A * np.cos(F), grad_activation=2 * self.w * a,
                    grad_mass=2 * self.v * mu)


def chain_batch(rng, texts=("abcdef", "ghij", "k"), d=4):
    g = Graph.from_texts(list(texts))
    H = rng.standard_normal((g.num_nodes, d))
    return g, H


def point_away_from_boundary(rng, g, d, tau, margin=0.05):
    """Features whose similarities all stay `margin` away from tau."""
    src, dst = g.edge_sources(), g.indices
    while True:
        H = rng.standard_normal((g.num_nodes, d))
        if np.all(np.abs(cosine(H, src, dst) - tau) > margin):
            return H


def loss_and_grad(morpher, g, H, theta, loss):
    morpher.theta[...] = theta
    morpher.zero_grad()
    out = morpher.forward(g, H)
    value = loss.value(out.graph) + out.rate_penalty
    grad_H = morpher.backward(out, **loss.grads(out.graph))
    return value, grad_H, float(morpher.grad_theta)


# ------------------------------------------------------------------- soft
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("temperature", [0.3, 1.0])
def test_soft_matches_finite_differences(seed, temperature):
    rng = np.random.default_rng(seed)
    d, theta = 4, -0.5
    g = Graph.from_texts(["abcdef", "ghij", "k"])
    H = point_away_from_boundary(rng, g, d, sigmoid(theta))
    loss = SmoothLoss(rng, g.num_nodes, d)
    morpher = Morpher(threshold=theta, temperature=temperature, estimator="soft")

    _, grad_H, grad_theta = loss_and_grad(morpher, g, H, theta, loss)
    num_H = numgrad(lambda X: loss_and_grad(morpher, g, X, theta, loss)[0], H)
    num_theta = numgrad(lambda t: loss_and_grad(morpher, g, H, float(t), loss)[0], theta)
    assert rel_err(num_H, grad_H) < 1e-4
    assert abs(num_theta - grad_theta) <= 1e-4 * max(abs(num_theta), abs(grad_theta))
    assert abs(grad_theta) > 1e-3  # theta really gets a gradient


def test_soft_at_zero_temperature_reproduces_history():
    rng = np.random.default_rng(3)
    d, theta = 5, 0.0
    g = Graph.from_texts(["abcdefgh", "ijk", "l", "mnop"])
    H = point_away_from_boundary(rng, g, d, sigmoid(theta), margin=1e-3)
    # make some neighbours nearly parallel so that merges happen
    H[1] = H[0] + 0.01 * H[1]
    H[2] = H[1] + 0.01 * H[2]
    H[9] = H[8] + 0.01 * H[9]
    hard = Morpher(threshold=theta, temperature=1e-6).forward(g, H)
    soft = Morpher(threshold=theta, temperature=1e-6, estimator="soft").forward(g, H)
    heads = hard.history.heads
    assert hard.history.num_outputs < g.num_nodes
    np.testing.assert_allclose(soft.graph.features[heads], hard.graph.features,
                               rtol=1e-12, atol=1e-12)
    expected_mass = np.zeros(g.num_nodes)
    expected_mass[heads] = 1.0
    np.testing.assert_array_equal(soft.graph.mass, expected_mass)
    np.testing.assert_array_equal(soft.graph.labels, g.labels)
    np.testing.assert_array_equal(soft.graph.offsets, g.offsets)
    # edges only between heads, exactly the contracted edges
    src = soft.graph.edge_sources()
    np.testing.assert_array_equal(src, heads[hard.graph.edge_sources()])
    np.testing.assert_array_equal(soft.graph.indices, heads[hard.graph.indices])


# -------------------------------------------------------------------- ste
def reference_relax(H, m):
    n, d = H.shape
    N, D = np.zeros((n + 1, d)), np.zeros(n + 1)
    for i in range(n - 1, -1, -1):
        mi = m[i] if i < n - 1 else 0.0
        N[i] = H[i] + mi * N[i + 1]
        D[i] = 1.0 + mi * D[i + 1]
    mass = np.r_[1.0, 1.0 - m[:-1]]
    return N[:n] / D[:n, None], mass


def test_ste_forward_is_history_and_gradient_is_relaxed_at_hard_m():
    rng = np.random.default_rng(4)
    d, theta, T = 4, 0.2, 0.25
    g = Graph.from_texts(["abcdefg", "hij"])
    n = g.num_nodes
    H = point_away_from_boundary(rng, g, d, sigmoid(theta))
    H[3] = H[2] + 0.05 * H[3]
    H[4] = H[3] + 0.05 * H[4]
    loss = SmoothLoss(rng, n, d)
    ste = Morpher(threshold=theta, temperature=T, estimator="ste")
    out = ste.forward(g, H)
    hard = Morpher(threshold=theta, temperature=T).forward(g, H)
    np.testing.assert_array_equal(out.decisions, hard.decisions)
    assert hard.decisions.any() and not hard.decisions.all()
    heads = hard.history.heads
    np.testing.assert_allclose(out.graph.features[heads], hard.graph.features, rtol=1e-12)
    np.testing.assert_array_equal(out.graph.mass, np.isin(np.arange(n), heads).astype(float))
    grad_H = ste.backward(out, **loss.grads(out.graph))

    # independent: numpy relaxation, finite differences in m at the hard m
    # (the recursion is polynomial in m, so central differences are exact
    # to O(eps^2) even at 0 and 1)
    src, dst = g.edge_sources(), g.indices
    m = np.zeros(n)
    m[src] = hard.decisions

    def f(X, mm):
        F, mass = reference_relax(X, mm)
        return (np.sum(loss.A * np.sin(F)) + np.sum(loss.w * F.mean(1) ** 2)
                + np.sum(loss.v * mass**2))

    dm = numgrad(lambda mm: f(H, mm), m)[src]
    s = cosine(H, src, dst)
    tau = sigmoid(theta)
    p = sigmoid((s - tau) / T)
    ds = dm * p * (1 - p) / T
    expected_theta = -np.sum(ds) * tau * (1 - tau)
    expected_H = numgrad(lambda X: f(X, m), H) + numgrad(
        lambda X: np.sum(ds * cosine(X, src, dst)), H)
    assert rel_err(expected_H, grad_H) < 1e-4
    assert abs(float(ste.grad_theta) - expected_theta) <= 1e-4 * abs(expected_theta)
    assert abs(expected_theta) > 1e-3


# -------------------------------------------------------------- reinforce
def hard_morph_reference(H, src, dst, merge):
    """Cluster means via scipy's connected components, clusters by head."""
    n = H.shape[0]
    A = csr_matrix((np.ones(merge.sum()), (src[merge], dst[merge])), shape=(n, n))
    _, lab = connected_components(A, directed=True, connection="weak")
    heads = np.array([np.flatnonzero(lab == c)[0] for c in range(lab.max() + 1)])
    order = np.argsort(heads)
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    cluster = rank[lab]
    k = order.size
    F = np.zeros((k, H.shape[1]))
    np.add.at(F, cluster, H)
    F /= np.bincount(cluster, minlength=k)[:, None]
    return F


class NodeLoss:
    """Per-example smooth loss: sum over output nodes of u.tanh(h) + a^2 + c."""

    def __init__(self, rng, d, offset=3.0):
        self.u = rng.standard_normal(d)
        self.offset = offset

    def node_values(self, F):
        return np.tanh(F) @ self.u + F.mean(1) ** 2

    def single(self, F):
        return self.node_values(F).sum() + self.offset

    def per_example(self, g):
        example = np.repeat(np.arange(g.num_graphs), np.diff(g.offsets))
        vals = self.node_values(g.features)
        return np.bincount(example, weights=vals, minlength=g.num_graphs) + self.offset

    def grads(self, g, scale):
        F = g.features
        return dict(grad_features=scale * (1 - np.tanh(F) ** 2) * self.u,
                    grad_activation=scale * 2 * F.mean(1))


def exact_expected_gradient(H, theta, T, src, dst, loss):
    E = src.shape[0]
    configs = np.array(list(itertools.product([0, 1], repeat=E)), dtype=bool)

    def expected(X, t):
        p = sigmoid((cosine(X, src, dst) - sigmoid(t)) / T)
        total = 0.0
        for merge in configs:
            prob = np.prod(np.where(merge, p, 1 - p))
            total += prob * loss.single(hard_morph_reference(X, src, dst, merge))
        return total

    return (numgrad(lambda X: expected(X, theta), H),
            float(numgrad(lambda t: expected(H, float(t)), theta)))


SMALL_GRAPHS = {
    "chain": Graph.from_text("abcde"),
    # a cycle and a chord: reinforce works on any graph
    "cyclic": Graph([0, 1, 3, 5, 6, 6], [1, 2, 4, 0, 3, 4], [97, 98, 99, 100, 101]),
}


def reinforce_estimates(g, H, theta, T, loss, baseline, replicas, samples=1, seed=0):
    """Per-replica gradient estimates (features, theta) from one batched call."""
    groups = replicas // samples
    big = replicate(g, groups)
    morpher = Morpher(threshold=theta, temperature=T, estimator="reinforce",
                      baseline=baseline, samples=samples, seed=seed)
    if baseline == "mean":  # warm the running mean up on an earlier batch
        warm = morpher.forward(big, np.tile(H, (groups, 1)))
        morpher.backward(warm, loss_values=loss.per_example(warm.graph),
                         **loss.grads(warm.graph, 1.0 / replicas))
        morpher.zero_grad()
    out = morpher.forward(big, np.tile(H, (groups, 1)))
    L = loss.per_example(out.graph)
    grad_H = morpher.backward(out, loss_values=L, **loss.grads(out.graph, 1.0 / replicas))
    # per-group estimates: each group of `samples` samples estimates the mean
    est_H = groups * grad_H.reshape(groups, *H.shape)
    est_theta = out.theta_estimates.reshape(samples, groups).mean(0)
    assert np.isclose(float(morpher.grad_theta), est_theta.mean(), rtol=1e-10)
    assert morpher.estimator_variance == out.estimator_variance > 0
    return est_H, est_theta, out.theta_estimates


@pytest.mark.parametrize("name", sorted(SMALL_GRAPHS))
@pytest.mark.parametrize("baseline,samples", [(None, 1), ("mean", 1), ("loo", 4)])
def test_reinforce_is_unbiased(name, baseline, samples):
    rng = np.random.default_rng(7)
    g = SMALL_GRAPHS[name]
    d, theta, T = 3, 0.3, 0.5
    H = rng.standard_normal((g.num_nodes, d))
    H[1] = H[0] + 0.3 * H[1]  # mix of likely and unlikely merges
    loss = NodeLoss(rng, d)
    src, dst = g.edge_sources(), g.indices
    exact_H, exact_theta = exact_expected_gradient(H, theta, T, src, dst, loss)

    est_H, est_theta, _ = reinforce_estimates(g, H, theta, T, loss, baseline,
                                              replicas=24_000, samples=samples)
    for est, exact in ((est_H, exact_H), (est_theta[:, None], np.array([exact_theta]))):
        mean = est.mean(0)
        se = est.std(0, ddof=1) / np.sqrt(est.shape[0])
        z = np.abs(mean - exact) / se
        assert z.max() < 4.0, (z.max(), mean, exact)
    assert abs(exact_theta) > 0.01


def test_baselines_reduce_variance():
    rng = np.random.default_rng(8)
    g = SMALL_GRAPHS["chain"]
    d, theta, T = 3, 0.3, 0.5
    H = rng.standard_normal((g.num_nodes, d))
    loss = NodeLoss(rng, d, offset=3.0)
    variance = {}
    for baseline, samples in [(None, 1), ("mean", 1), ("loo", 4)]:
        _, _, single = reinforce_estimates(g, H, theta, T, loss, baseline, 20_000,
                                           samples=samples)
        variance[baseline] = single.var()
    assert variance["mean"] < 0.25 * variance[None]
    assert variance["loo"] < 0.25 * variance[None]


def test_reinforce_samples_replicate_sample_major():
    g = Graph.from_texts(["ab", "cde"])
    H = np.random.default_rng(9).standard_normal((5, 2))
    morpher = Morpher(estimator="reinforce", baseline="loo", samples=3)
    out = morpher.forward(g, H)
    assert out.input.num_graphs == 6 and out.samples == 3
    np.testing.assert_array_equal(out.input.offsets, [0, 2, 5, 7, 10, 12, 15])
    np.testing.assert_array_equal(morpher.replicate(g).offsets, out.input.offsets)
    np.testing.assert_array_equal(out.features, np.tile(H, (3, 1)))
    grad = morpher.backward(out, loss_values=np.arange(6.0))
    assert grad.shape == H.shape


def test_reinforce_is_seeded():
    g = Graph.from_text("abcdefghij")
    H = np.random.default_rng(10).standard_normal((10, 3))
    a = Morpher(estimator="reinforce", temperature=1.0, seed=5).forward(g, H).decisions
    b = Morpher(estimator="reinforce", temperature=1.0, seed=5).forward(g, H).decisions
    np.testing.assert_array_equal(a, b)


def test_history_gives_theta_no_gradient():
    rng = np.random.default_rng(11)
    g, H = chain_batch(rng)
    morpher = Morpher(threshold=0.0)
    out = morpher.forward(g, H)
    assert out.graph.num_nodes < g.num_nodes
    loss = SmoothLoss(rng, out.graph.num_nodes, H.shape[1])
    morpher.backward(out, **loss.grads(out.graph))
    assert float(morpher.grad_theta) == 0.0


# ----------------------------------------------------------- rate penalty
@pytest.mark.parametrize("multiplier", [0.0, 0.7, -1.3])
@pytest.mark.parametrize("estimator", ["history", "soft", "reinforce"])
def test_rate_penalty_matches_finite_differences(estimator, multiplier):
    rng = np.random.default_rng(12)
    d, theta = 4, -0.2
    g = Graph.from_texts(["abcdef", "ghi"])
    H = point_away_from_boundary(rng, g, d, sigmoid(theta))
    morpher = Morpher(threshold=theta, temperature=0.5, estimator=estimator,
                      target_rate=0.3, rate_weight=2.0, baseline=None)
    morpher.rate_multiplier = multiplier  # the controller's Lagrange term too

    def penalty(X, t):
        morpher.theta[...] = t
        return morpher.forward(g, X).rate_penalty

    morpher.zero_grad()
    out = morpher.forward(g, H)
    k = out.graph.num_nodes
    zeros = dict(grad_features=np.zeros((k, d)))
    if estimator == "reinforce":  # constant losses: the score term vanishes
        zeros["loss_values"] = np.zeros(out.graph.num_graphs)
    grad_H = morpher.backward(out, **zeros)
    p = sigmoid((cosine(H, g.edge_sources(), g.indices) - sigmoid(theta)) / 0.5)
    gap = (g.num_nodes - p.sum()) / g.num_nodes - 0.3
    expected = multiplier * gap + 2.0 * gap ** 2
    assert out.rate_penalty == pytest.approx(expected, rel=1e-12)
    num_H = numgrad(lambda X: penalty(X, theta), H)
    num_theta = numgrad(lambda t: penalty(H, float(t)), theta)
    assert rel_err(num_H, grad_H) < 1e-4
    assert abs(num_theta - float(morpher.grad_theta)) <= 1e-4 * abs(num_theta)


def test_soft_with_rate_penalty_matches_finite_differences():
    rng = np.random.default_rng(13)
    d, theta = 3, 0.1
    g = Graph.from_texts(["abcde", "fgh"])
    H = point_away_from_boundary(rng, g, d, sigmoid(theta))
    loss = SmoothLoss(rng, g.num_nodes, d)
    morpher = Morpher(threshold=theta, temperature=0.4, estimator="soft", target_rate=0.5)
    _, grad_H, grad_theta = loss_and_grad(morpher, g, H, theta, loss)
    num_H = numgrad(lambda X: loss_and_grad(morpher, g, X, theta, loss)[0], H)
    num_theta = numgrad(lambda t: loss_and_grad(morpher, g, H, float(t), loss)[0], theta)
    assert rel_err(num_H, grad_H) < 1e-4
    assert abs(num_theta - grad_theta) <= 1e-4 * abs(num_theta)


# -------------------------------------------------------------- bad input
@pytest.mark.parametrize("name", ["hard", "SOFT", "", None, 3])
def test_unknown_estimator(name):
    with pytest.raises(ValueError, match=r"estimator must be one of 'history', 'soft', "
                                         r"'ste', 'reinforce'"):
        Morpher(estimator=name)


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_temperature_must_be_positive(temperature):
    with pytest.raises(ValueError, match="temperature must be > 0"):
        Morpher(temperature=temperature, estimator="soft")


@pytest.mark.parametrize("estimator", ["soft", "ste"])
@pytest.mark.parametrize("edges", [
    ([0, 1, 2, 2], [2, 0]),          # 0 -> 2 skips a node, 1 -> 0 goes back
    ([0, 2, 3, 3], [1, 2, 2]),       # node 0 has two out-edges
])
def test_relaxed_estimators_need_chains(estimator, edges):
    g = Graph(edges[0], edges[1], [97, 98, 99])
    H = np.random.default_rng(0).standard_normal((3, 2))
    with pytest.raises(ValueError, match=r"#P-hard \(network reliability\).*'reinforce'"):
        Morpher(estimator=estimator).forward(g, H)
    Morpher(estimator="reinforce").forward(g, H)  # fine on any graph


def test_bad_reinforce_settings():
    with pytest.raises(ValueError, match="baseline must be one of"):
        Morpher(estimator="reinforce", baseline="median")
    with pytest.raises(ValueError, match="baseline='loo' needs samples >= 2"):
        Morpher(estimator="reinforce", baseline="loo")
    with pytest.raises(ValueError, match="samples > 1 needs estimator='reinforce'"):
        Morpher(estimator="soft", samples=2)
    with pytest.raises(ValueError, match="target_rate must be <= 1"):
        Morpher(target_rate=1.5)
    g = Graph.from_text("abc")
    morpher = Morpher(estimator="reinforce")
    out = morpher.forward(g, np.ones((3, 2)))
    with pytest.raises(ValueError, match="needs loss_values"):
        morpher.backward(out)
    with pytest.raises(ValueError, match=r"loss_values must have shape \(1\)"):
        morpher.backward(out, loss_values=[1.0, 2.0])


@pytest.mark.parametrize("baseline,samples", [("mean", 1), ("loo", 4)])
def test_reinforce_is_unbiased_for_the_structural_loss(baseline, samples):
    from grapheme import StructuralLoss, contract, merge_edges

    rng = np.random.default_rng(14)
    g, target = Graph.from_text("abcd"), Graph.from_text("ab")
    d, theta, T = 3, 0.2, 0.5
    H = rng.standard_normal((g.num_nodes, d))
    H[1] = H[0] + 0.3 * H[1]
    loss = StructuralLoss()
    src, dst = g.edge_sources(), g.indices

    def expected(X, t):
        p = sigmoid((cosine(X, src, dst) - sigmoid(t)) / T)
        total = 0.0
        for merge in itertools.product([False, True], repeat=src.shape[0]):
            merge = np.array(merge)
            out = contract(g, merge_edges(g, merge), X)
            total += np.prod(np.where(merge, p, 1 - p)) * loss.forward(out, target).value
        return total

    exact_H = numgrad(lambda X: expected(X, theta), H)
    exact_theta = float(numgrad(lambda t: expected(H, float(t)), theta))

    replicas = 20_000
    groups = replicas // samples
    morpher = Morpher(threshold=theta, temperature=T, estimator="reinforce",
                      baseline=baseline, samples=samples, seed=1)
    big, targets = replicate(g, groups), morpher.replicate(replicate(target, groups))
    grad_H = None
    for _ in range(2):  # the first call warms the running-mean baseline up
        morpher.zero_grad()
        out = morpher.forward(big, np.tile(H, (groups, 1)))
        res = loss.forward(out.graph, targets)
        lg = loss.backward(res)
        grad_H = morpher.backward(out, grad_activation=lg.activation, grad_mass=lg.mass,
                                  loss_values=res.values)
    est_H = groups * grad_H.reshape(groups, *H.shape)
    est_theta = out.theta_estimates.reshape(samples, groups).mean(0)
    for est, exact in ((est_H, exact_H), (est_theta[:, None], np.array([exact_theta]))):
        se = est.std(0, ddof=1) / np.sqrt(est.shape[0])
        z = np.abs(est.mean(0) - exact) / se
        assert z.max() < 4.0, (z.max(), est.mean(0), exact)
    assert abs(exact_theta) > 1e-3


@pytest.mark.parametrize("estimator, samples", [("history", 1), ("soft", 1), ("ste", 1),
                                                ("reinforce", 1), ("reinforce", 3)])
def test_backward_into_out_equals_fresh(estimator, samples):
    # out= is the same gradient written into the caller's buffer, for every
    # estimator, with the rate penalty on (its gradient joins the same array)
    rng = np.random.default_rng(7)
    g = Graph.from_texts(["hello", "world", "abcabc"])
    H = rng.normal(size=(g.num_nodes, 5))

    def run(out):
        m = Morpher(threshold=0.0, estimator=estimator, samples=samples, seed=3,
                    target_rate=0.5, baseline=None if samples == 1 else "loo")
        morphed = m.forward(g, H)
        k = morphed.graph.num_nodes
        r = np.random.default_rng(1)
        gf, ga, gm = r.normal(size=(k, 5)), r.normal(size=k), r.normal(size=k)
        losses = r.normal(size=morphed.graph.num_graphs)
        return m.backward(morphed, gf, ga, gm, loss_values=losses, out=out), m.grad_theta

    fresh, theta_fresh = run(None)
    buf = np.full((g.num_nodes, 5), np.nan)
    result, theta_out = run(buf)
    assert result is buf
    np.testing.assert_array_equal(buf, fresh)
    assert theta_out == theta_fresh


def test_backward_out_validation():
    g = Graph.from_text("abcd")
    H = np.random.default_rng(0).normal(size=(4, 3))
    m = Morpher(estimator="soft")
    morphed = m.forward(g, H)
    gf = np.ones((4, 3))
    with pytest.raises(ValueError, match=r"out must have shape \(4, 3\)"):
        m.backward(morphed, gf, out=np.empty((3, 3)))
    with pytest.raises(TypeError, match="out must have dtype float64"):
        m.backward(morphed, gf, out=np.empty((4, 3), np.float32))
    with pytest.raises(ValueError, match="out must not overlap grad_features"):
        m.backward(morphed, gf, out=gf)
    with pytest.raises(ValueError, match="out must not overlap morphed.features"):
        m.backward(morphed, gf, out=morphed.features)
