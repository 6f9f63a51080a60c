"""Gradient estimators of the Morpher: soft, ste, reinforce, rate penalty."""
import itertools

import numpy as np
import pytest
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

import grapheme as gr
from grapheme import (Graph, Hard, Morpher, RateController, Reinforce, Relaxed,
                      StraightThrough, replicate)
from helpers import activation_to_features, dense_relaxed_weights


# ----------------------------------------------------------------- helpers
def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def logit(p):
    return float(np.log(p / (1.0 - p)))


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
    """A random smooth scalar of the output features, activations, masses and
    edge weights (a weight term keyed by the edge's endpoints, so it is defined
    whatever edges the output has)."""

    def __init__(self, rng, n, d):
        self.A = rng.standard_normal((n, d))
        self.w = rng.standard_normal(n)
        self.v = rng.standard_normal(n)
        self.C = rng.standard_normal((n, n))

    @staticmethod
    def _weights(g):
        return np.ones(g.num_edges) if g.weights is None else g.weights

    def value(self, g):
        F, a, mu, W = g.features, g.activation, g.mass, self._weights(g)
        c = self.C[g.edge_sources(), g.indices]
        return (np.sum(self.A * np.sin(F)) + np.sum(self.w * a**2) + np.sum(self.v * mu**2)
                + np.sum(c * W**2))

    def grads(self, g):
        F, a, mu, W = g.features, g.activation, g.mass, self._weights(g)
        c = self.C[g.edge_sources(), g.indices]
        grad_features = self.A * np.cos(F) + activation_to_features(F, 2 * self.w * a)
        return dict(grad_features=grad_features, grad_mass=2 * self.v * mu,
                    grad_weights=2 * c * W)


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
    grad_H = morpher.backward(out, grad_rate_penalty=1.0, **loss.grads(out.graph))
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
    morpher = Morpher(threshold=theta, temperature=temperature, estimator=Relaxed())

    _, grad_H, grad_theta = loss_and_grad(morpher, g, H, theta, loss)
    num_H = numgrad(lambda X: loss_and_grad(morpher, g, X, theta, loss)[0], H)
    num_theta = numgrad(lambda t: loss_and_grad(morpher, g, H, float(t), loss)[0], theta)
    assert rel_err(num_H, grad_H) < 1e-4
    assert abs(num_theta - grad_theta) <= 1e-4 * max(abs(num_theta), abs(grad_theta))
    assert abs(grad_theta) > 1e-3  # theta really gets a gradient


def test_soft_vjp_is_pure_and_backward_accumulates():
    rng = np.random.default_rng(15)
    g, H = chain_batch(rng)
    morpher = Morpher(threshold=-0.3, temperature=0.4, estimator="soft", rate=0.5)
    out = morpher.forward(g, H)
    grads = SmoothLoss(rng, g.num_nodes, H.shape[1]).grads(out.graph)
    a = morpher.vjp(out, grad_rate_penalty=1.0, **grads)
    b = morpher.vjp(out, grad_rate_penalty=1.0, **grads)
    np.testing.assert_array_equal(a.features, b.features)
    assert float(a.theta) == float(b.theta) != 0.0
    assert float(morpher.grad_theta) == 0.0   # vjp accumulates nothing
    morpher.backward(out, grad_rate_penalty=1.0, **grads)
    morpher.backward(out, grad_rate_penalty=1.0, **grads)
    assert float(morpher.grad_theta) == pytest.approx(2 * float(a.theta), rel=1e-15)


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
    np.testing.assert_array_equal(soft.decisions, hard.decisions)
    np.testing.assert_array_equal(soft.history.cluster, hard.history.cluster)
    np.testing.assert_allclose(soft.graph.features[heads], hard.graph.features,
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(soft.graph.activation[heads], hard.graph.activation,
                               rtol=1e-12, atol=1e-12)
    expected_mass = np.zeros(g.num_nodes)
    expected_mass[heads] = 1.0
    np.testing.assert_array_equal(soft.graph.mass, expected_mass)
    np.testing.assert_array_equal(soft.graph.labels, g.labels)
    np.testing.assert_array_equal(soft.graph.offsets, g.offsets)
    # the expected edges: weight 1 exactly on the contracted edges (between
    # heads), 0 on every other edge the relaxation keeps
    W = soft.graph.weights
    assert set(np.unique(W).tolist()) <= {0.0, 1.0}
    live = W > 0
    src = soft.graph.edge_sources()
    np.testing.assert_array_equal(src[live], heads[hard.graph.edge_sources()])
    np.testing.assert_array_equal(soft.graph.indices[live], heads[hard.graph.indices])
    hard_weights = (np.ones(hard.graph.num_edges) if hard.graph.weights is None
                    else hard.graph.weights)
    np.testing.assert_array_equal(W[live], hard_weights)


def _relaxed_objectives(g, H, target, temperature, theta):
    """The smooth objective and the structural loss of the relaxed graph
    against a fixed ``target``, at ``theta``; and the hard decisions."""
    rng = np.random.default_rng(16)
    smooth = SmoothLoss(rng, g.num_nodes, H.shape[1])
    morpher = Morpher(threshold=theta, temperature=temperature, estimator=Relaxed())
    out = morpher.forward(g, H)
    structural = gr.StructuralLoss().forward(out.graph, target).value
    return smooth.value(out.graph), structural, out.decisions


@pytest.mark.parametrize("temperature", [0.05, 0.3])
def test_soft_objective_does_not_jump_across_tau(temperature):
    # The relaxed objective is a smooth function of theta: as tau crosses a
    # similarity (one hard decision flips), neither the smooth objective nor
    # the structural loss of the relaxed graph may jump.
    rng = np.random.default_rng(17)
    g = Graph.from_texts(["abcdefg", "hijk"])
    target = Graph.from_texts(["abc", "hi"])
    d = 4
    H = rng.standard_normal((g.num_nodes, d))
    H[2] = H[1] + 0.2 * H[2]   # a likely merge beside unlikely ones
    s = cosine(H, g.edge_sources(), g.indices)
    e = int(np.argmin(np.abs(s - 0.5)))   # the similarity that tau crosses
    s_e = float(s[e])
    assert 0.1 < s_e < 0.9   # within reach of tau = sigmoid(theta)
    below = _relaxed_objectives(g, H, target, temperature, logit(s_e - 5e-10))
    above = _relaxed_objectives(g, H, target, temperature, logit(s_e + 5e-10))
    flipped = below[2] != above[2]
    assert flipped.tolist() == [i == e for i in range(len(s))]   # we did cross tau
    assert abs(below[0] - above[0]) < 1e-6
    assert abs(below[1] - above[1]) < 1e-6


# -------------------------------------------------------------------- ste
def reference_relax(H, m, offsets):
    """Plain-numpy chain relaxation: features, masses and the dense (n, n)
    expected edge weights. ``m[i]`` weighs the edge i -> i+1 (0 where none)."""
    n, d = H.shape
    N, D = np.zeros((n + 1, d)), np.zeros(n + 1)
    for i in range(n - 1, -1, -1):
        mi = m[i] if i < n - 1 else 0.0
        N[i] = H[i] + mi * N[i + 1]
        D[i] = 1.0 + mi * D[i + 1]
    mass = np.r_[1.0, 1.0 - m[:-1]]
    return N[:n] / D[:n, None], mass, dense_relaxed_weights(m, offsets)


def test_ste_forward_is_history_and_gradient_is_relaxed_at_hard_m():
    rng = np.random.default_rng(4)
    d, theta, T = 4, 0.2, 0.25
    g = Graph.from_texts(["abcdefg", "hij"])
    n = g.num_nodes
    H = point_away_from_boundary(rng, g, d, sigmoid(theta))
    H[3] = H[2] + 0.05 * H[3]
    H[4] = H[3] + 0.05 * H[4]
    loss = SmoothLoss(rng, n, d)
    ste = Morpher(threshold=theta, temperature=T, estimator=StraightThrough())
    out = ste.forward(g, H)
    hard = Morpher(threshold=theta, temperature=T).forward(g, H)
    np.testing.assert_array_equal(out.decisions, hard.decisions)
    assert hard.decisions.any() and not hard.decisions.all()
    heads = hard.history.heads
    np.testing.assert_allclose(out.graph.features[heads], hard.graph.features, rtol=1e-12)
    np.testing.assert_array_equal(out.graph.mass, np.isin(np.arange(n), heads).astype(float))
    live = out.graph.weights > 0
    np.testing.assert_array_equal(out.graph.edge_sources()[live],
                                  heads[hard.graph.edge_sources()])
    np.testing.assert_array_equal(out.graph.indices[live], heads[hard.graph.indices])
    grad_H = ste.backward(out, **loss.grads(out.graph))

    # independent: numpy relaxation, finite differences in m at the hard m
    # (the relaxation is polynomial in m, so central differences are exact
    # to O(eps^2) even at 0 and 1)
    src, dst = g.edge_sources(), g.indices
    m = np.zeros(n)
    m[src] = hard.decisions

    def f(X, mm):
        F, mass, W = reference_relax(X, mm, g.offsets)
        return (np.sum(loss.A * np.sin(F)) + np.sum(loss.w * F.mean(1) ** 2)
                + np.sum(loss.v * mass**2) + np.sum(np.triu(loss.C, 1) * W**2))

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
        return dict(grad_features=scale * (1 - np.tanh(F) ** 2) * self.u
                    + activation_to_features(F, scale * 2 * F.mean(1)))


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
    """Per-replica gradient estimates (features, theta) from one batched call.

    The objective is the mean of the per-example losses over the ``replicas``
    replicated examples, so every loss enters with weight ``1 / replicas``."""
    groups = replicas // samples
    big = replicate(g, groups)
    morpher = Morpher(threshold=theta, temperature=T,
                      estimator=Reinforce(baseline=baseline, samples=samples, seed=seed))
    if baseline == "mean":  # warm the running mean up on an earlier batch
        warm = morpher.forward(big, np.tile(H, (groups, 1)))
        morpher.step(warm, loss.per_example(warm.graph))
    out = morpher.forward(big, np.tile(H, (groups, 1)))
    L = loss.per_example(out.graph)
    assert L.shape == out.log_prob.shape == (replicas,)
    advantage = out.advantage(L)
    grad_H = morpher.backward(out, grad_log_prob=advantage / replicas,
                              **loss.grads(out.graph, 1.0 / replicas))
    # per-group estimates: each group of `samples` samples estimates the mean
    est_H = groups * grad_H.reshape(groups, *H.shape)
    single = morpher.theta_estimates(out, advantage)
    est_theta = single.reshape(samples, groups).mean(0)
    assert np.isclose(float(morpher.grad_theta), est_theta.mean(), rtol=1e-10)
    assert single.var() > 0
    return est_H, est_theta, single


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
    morpher = Morpher(estimator=Reinforce(baseline="loo", samples=3))
    out = morpher.forward(g, H)
    assert out.samples == 3
    assert out.history.num_inputs == 15 and out.decisions.shape == (9,)
    assert out.log_prob.shape == (6,) and out.graph.num_graphs == 6
    rep = replicate(g, 3)
    np.testing.assert_array_equal(rep.offsets, [0, 2, 5, 7, 10, 12, 15])
    # the output is the hard morph of the sample-major replicated input
    expected = gr.contract(rep, gr.merge_edges(rep, out.decisions), np.tile(H, (3, 1)))
    np.testing.assert_array_equal(out.graph.features, expected.features)
    np.testing.assert_array_equal(out.graph.offsets, expected.offsets)
    grad = morpher.backward(out, grad_log_prob=out.advantage(np.arange(6.0)) / 6)
    assert grad.shape == H.shape


def test_reinforce_is_seeded():
    g = Graph.from_text("abcdefghij")
    H = np.random.default_rng(10).standard_normal((10, 3))

    def draw(seed):
        return Morpher(estimator=Reinforce(seed=seed), temperature=1.0).forward(g, H).decisions

    np.testing.assert_array_equal(draw(5), draw(5))
    assert any(not np.array_equal(draw(5), draw(s)) for s in (6, 7, 8))


def test_reinforce_forward_is_pure_and_step_moves_on():
    rng = np.random.default_rng(18)
    g = Graph.from_texts(["a" * 120, "b" * 80])
    H = rng.standard_normal((g.num_nodes, 3))
    morpher = Morpher(threshold=0.0, temperature=1.0, estimator=Reinforce(seed=2))
    state = morpher.state_dict()
    first = morpher.forward(g, H)
    second = morpher.forward(g, H)
    np.testing.assert_array_equal(first.decisions, second.decisions)
    np.testing.assert_array_equal(first.log_prob, second.log_prob)
    assert 0.05 < first.decisions.mean() < 0.95   # a real draw, not a certain one
    assert morpher.state_dict() == state   # forward changed nothing
    L = np.ones(first.log_prob.shape[0])
    # vjp is pure too: twice the same gradient, no state changed
    a = morpher.vjp(first, grad_log_prob=first.advantage(L))
    b = morpher.vjp(first, grad_log_prob=first.advantage(L))
    np.testing.assert_array_equal(a.features, b.features)
    assert float(a.theta) == float(b.theta)
    assert morpher.state_dict() == state and float(morpher.grad_theta) == 0.0
    morpher.step(first, L)
    assert morpher.state_dict() != state
    third = morpher.forward(g, H)
    assert not np.array_equal(first.decisions, third.decisions)
    np.testing.assert_array_equal(third.decisions, morpher.forward(g, H).decisions)
    # the running-mean baseline saw this step's losses, and only at step()
    np.testing.assert_array_equal(third.advantage(L), L - 1.0)
    np.testing.assert_array_equal(first.advantage(L), L)


def test_history_gives_theta_no_gradient():
    rng = np.random.default_rng(11)
    g, H = chain_batch(rng)
    morpher = Morpher(threshold=0.0, estimator=Hard())
    out = morpher.forward(g, H)
    assert out.graph.num_nodes < g.num_nodes
    loss = SmoothLoss(rng, out.graph.num_nodes, H.shape[1])
    morpher.backward(out, **loss.grads(out.graph))
    assert float(morpher.grad_theta) == 0.0
    assert float(morpher.vjp(out, **loss.grads(out.graph)).theta) == 0.0


# ----------------------------------------------------------- rate penalty
@pytest.mark.parametrize("multiplier", [0.0, 0.7, -1.3])
@pytest.mark.parametrize("estimator", ["history", "soft", "ste", "reinforce"])
def test_rate_penalty_matches_finite_differences(estimator, multiplier):
    rng = np.random.default_rng(12)
    d, theta = 4, -0.2
    g = Graph.from_texts(["abcdef", "ghi"])
    H = point_away_from_boundary(rng, g, d, sigmoid(theta))
    est = Reinforce(baseline=None) if estimator == "reinforce" else estimator
    morpher = Morpher(threshold=theta, temperature=0.5, estimator=est,
                      rate=RateController(target=0.3, weight=2.0))
    morpher.rate.multiplier = multiplier  # the controller's Lagrange term too

    def penalty(X, t):
        morpher.theta[...] = t
        return morpher.forward(g, X).rate_penalty

    morpher.zero_grad()
    out = morpher.forward(g, H)
    zeros = dict(grad_features=np.zeros(out.graph.features.shape))
    if estimator == "reinforce":  # constant losses: the score term vanishes
        zeros["grad_log_prob"] = np.zeros(out.log_prob.shape)
    grad_H = morpher.backward(out, grad_rate_penalty=1.0, **zeros)
    p = sigmoid((cosine(H, g.edge_sources(), g.indices) - sigmoid(theta)) / 0.5)
    rho = (g.num_nodes - p.sum()) / g.num_nodes
    gap = rho - 0.3
    expected = multiplier * gap + 2.0 * gap ** 2
    assert out.rate_penalty == pytest.approx(expected, rel=1e-12)
    assert out.expected_rate == pytest.approx(rho, rel=1e-12)
    num_H = numgrad(lambda X: penalty(X, theta), H)
    num_theta = numgrad(lambda t: penalty(H, float(t)), theta)
    assert rel_err(num_H, grad_H) < 1e-4
    assert abs(num_theta - float(morpher.grad_theta)) <= 1e-4 * abs(num_theta)
    # the penalty's gradient joins only when asked for
    without = morpher.vjp(out, **zeros)
    if estimator in ("history", "reinforce"):
        assert not without.features.any() and float(without.theta) == 0.0


def test_soft_with_rate_penalty_matches_finite_differences():
    rng = np.random.default_rng(13)
    d, theta = 3, 0.1
    g = Graph.from_texts(["abcde", "fgh"])
    H = point_away_from_boundary(rng, g, d, sigmoid(theta))
    loss = SmoothLoss(rng, g.num_nodes, d)
    morpher = Morpher(threshold=theta, temperature=0.4, estimator="soft",
                      rate=RateController(target=0.5))
    _, grad_H, grad_theta = loss_and_grad(morpher, g, H, theta, loss)
    num_H = numgrad(lambda X: loss_and_grad(morpher, g, X, theta, loss)[0], H)
    num_theta = numgrad(lambda t: loss_and_grad(morpher, g, H, float(t), loss)[0], theta)
    assert rel_err(num_H, grad_H) < 1e-4
    assert abs(num_theta - grad_theta) <= 1e-4 * abs(num_theta)


# -------------------------------------------------------------- bad input
@pytest.mark.parametrize("name", ["hard", "SOFT", "", None, 3])
def test_unknown_estimator(name):
    with pytest.raises(ValueError, match=r"estimator must be an Estimator or one of "
                                         r"'history', 'soft', 'ste', 'reinforce'"):
        Morpher(estimator=name)


@pytest.mark.parametrize("temperature", [0.0, -1.0, 1e-310, 5e-324])
def test_temperature_must_be_positive(temperature):
    with pytest.raises(ValueError, match="temperature must be >= 1e-300"):
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
    Morpher(estimator=estimator).predict(g, H)    # and so is the hard prediction


def test_bad_reinforce_settings():
    with pytest.raises(ValueError, match="baseline must be 'mean', 'loo' or None"):
        Reinforce(baseline="median")
    with pytest.raises(ValueError, match=r"baseline must be 'mean', 'loo' or None, got "
                                         r"array\(\[1, 2\]\)"):
        Reinforce(baseline=np.array([1, 2]))
    with pytest.raises(ValueError, match="baseline='loo' needs samples >= 2"):
        Reinforce(baseline="loo")
    with pytest.raises(ValueError, match="samples must be >= 1"):
        Reinforce(samples=0)
    with pytest.raises(TypeError, match="samples must be an integer"):
        Reinforce(samples=2.5)
    with pytest.raises(ValueError, match="seed must be >= 0"):
        Reinforce(seed=-1)
    with pytest.raises(TypeError):   # samples belong to Reinforce alone
        Relaxed(samples=2)
    with pytest.raises(ValueError, match="target must be <= 1"):
        RateController(target=1.5)
    with pytest.raises(ValueError, match="rate must be <= 1"):
        Morpher(rate=1.5)
    with pytest.raises(ValueError, match="control must be 'multiplier' or 'penalty'"):
        RateController(target=0.5, control="pid")
    for kept in (1e308, -5.0, 2.0):   # a multiplier of inf from update(1e308)
        with pytest.raises(ValueError, match="kept_fraction must be"):
            RateController(target=0.5, integral=10.0).update(kept)
    g = Graph.from_text("abc")
    morpher = Morpher(estimator="reinforce")
    out = morpher.forward(g, np.ones((3, 2)))
    with pytest.raises(ValueError, match=r"grad_log_prob must have shape \(1,\)"):
        morpher.backward(out, grad_log_prob=[1.0, 2.0])


@pytest.mark.parametrize("baseline,samples", [(None, 1), ("mean", 1), ("loo", 2)])
def test_advantage_checks_loss_values(baseline, samples):
    # one loss per (replicated) example, as the old backward(loss_values=)
    # checked: a wrong count must not silently give a wrong-sized advantage
    g = Graph.from_texts(["abc", "de"])
    morpher = Morpher(estimator=Reinforce(baseline=baseline, samples=samples))
    out = morpher.forward(g, np.ones((5, 2)))
    B = 2 * samples
    assert out.advantage(np.ones(B)).shape == (B,)
    with pytest.raises(ValueError, match=rf"loss_values must have shape \({B},?\)"):
        out.advantage(np.ones(B + 1))
    with pytest.raises(ValueError, match="loss_values contains NaN"):
        out.advantage(np.full(B, np.nan))


@pytest.mark.parametrize("baseline,samples", [("mean", 1), ("loo", 4)])
def test_reinforce_is_unbiased_for_the_structural_loss(baseline, samples):
    rng = np.random.default_rng(14)
    g, target = Graph.from_text("abcd"), Graph.from_text("ab")
    d, theta, T = 3, 0.2, 0.5
    H = rng.standard_normal((g.num_nodes, d))
    H[1] = H[0] + 0.3 * H[1]
    loss = gr.StructuralLoss()
    src, dst = g.edge_sources(), g.indices

    def expected(X, t):
        p = sigmoid((cosine(X, src, dst) - sigmoid(t)) / T)
        total = 0.0
        for merge in itertools.product([False, True], repeat=src.shape[0]):
            merge = np.array(merge)
            out = gr.contract(g, gr.merge_edges(g, merge), X)
            total += np.prod(np.where(merge, p, 1 - p)) * loss.forward(out, target).value
        return total

    exact_H = numgrad(lambda X: expected(X, theta), H)
    exact_theta = float(numgrad(lambda t: expected(H, float(t)), theta))

    replicas = 20_000
    groups = replicas // samples
    morpher = Morpher(threshold=theta, temperature=T,
                      estimator=Reinforce(baseline=baseline, samples=samples, seed=1))
    big, targets = replicate(g, groups), replicate(replicate(target, groups), samples)
    Hs = np.tile(H, (groups, 1))

    def step():
        morpher.zero_grad()
        out = morpher.forward(big, Hs)
        res = loss.forward(out.graph, targets)
        lg = loss.backward(res)   # the gradient of the mean over the replicas
        B = res.values.shape[0]
        grad_H = morpher.backward(
            out, grad_features=activation_to_features(out.graph.features, lg.activation),
            grad_mass=lg.mass,   # constant for the hard graph, as are its weights
            grad_log_prob=out.advantage(res.values) / B)
        return out, res, grad_H

    warm, warm_res, _ = step()   # warms the running-mean baseline up
    morpher.step(warm, warm_res.values)
    out, res, grad_H = step()
    est_H = groups * grad_H.reshape(groups, *H.shape)
    single = morpher.theta_estimates(out, out.advantage(res.values))
    est_theta = single.reshape(samples, groups).mean(0)
    for est, exact in ((est_H, exact_H), (est_theta[:, None], np.array([exact_theta]))):
        se = est.std(0, ddof=1) / np.sqrt(est.shape[0])
        z = np.abs(est.mean(0) - exact) / se
        assert z.max() < 4.0, (z.max(), est.mean(0), exact)
    assert abs(exact_theta) > 1e-3


def test_reinforce_shard_draws_the_whole_batchs_samples():
    """forward(..., shard=) on a part of a batch makes the whole batch's
    decisions of that part, every sample; step(None, losses, num_edges=)
    leaves the estimator where the whole batch's step does."""
    texts = ["abcab", "", "bb", "cabca", "a", "abcd", "ba"]
    rng = np.random.default_rng(0)
    g = gr.Graph.from_texts(texts)
    H = rng.normal(size=(g.num_nodes, 5))
    K = 3
    whole_m = gr.Morpher(threshold=0.5, estimator=Reinforce(baseline="loo", samples=K, seed=4))
    whole = whole_m.forward(g, H)
    assert 0 < whole.decisions.mean() < 1
    E = g.num_edges
    edges = [max(len(t) - 1, 0) for t in texts]
    nodes = np.cumsum([0] + [len(t) for t in texts])
    for lo, hi in [(0, 3), (3, 4), (4, 7), (2, 2), (0, 7)]:
        part_m = gr.Morpher(threshold=0.5,
                            estimator=Reinforce(baseline="loo", samples=K, seed=4))
        shard = (sum(edges[:lo]), sum(edges[hi:]))
        mine = slice(shard[0], E - shard[1])
        if lo < hi:
            part = part_m.forward(gr.Graph.from_texts(texts[lo:hi]), H[nodes[lo]:nodes[hi]],
                                  shard=shard)
            assert np.array_equal(part.decisions.reshape(K, -1),
                                  whole.decisions.reshape(K, E)[:, mine])
        losses = rng.random(K * len(texts))
        stepped = gr.Morpher(threshold=0.5,
                             estimator=Reinforce(baseline="loo", samples=K, seed=4))
        stepped.step(whole, losses)
        part_m.step(None, losses, num_edges=E)
        assert part_m.state_dict() == stepped.state_dict()
    with pytest.raises(TypeError, match="num_edges"):
        whole_m.step(None, losses)
    with pytest.raises(TypeError, match="stateless estimator"):
        whole_m.step(None, kept_fraction=0.5)

    class Renamed(Reinforce):   # the rule is Estimator.draws, not the name
        name = "renamed"
    with pytest.raises(TypeError, match="stateless estimator"):
        gr.Morpher(estimator=Renamed()).step(None, kept_fraction=0.5)
    assert not any(cls.draws for cls in (Hard, Relaxed, StraightThrough))
    with pytest.raises(TypeError, match="num_edges"):
        whole_m.step(whole, losses, num_edges=E)
    with pytest.raises(TypeError, match="shard"):
        whole_m.forward(g, H, shard=3)
    with pytest.raises(ValueError, match="shard"):
        whole_m.forward(g, H, shard=(-1, 0))
    # the deterministic estimators ignore it
    ste = gr.Morpher(threshold=0.5, estimator="ste")
    assert np.array_equal(ste.forward(g, H, shard=(4, 5)).decisions, ste.forward(g, H).decisions)


@pytest.mark.parametrize("estimator", [Hard(), Relaxed(), StraightThrough(),
                                       Reinforce(seed=1), Reinforce(samples=2, seed=1)],
                         ids=lambda e: repr(e))
def test_estimators_check_features_the_morpher_does_not_scan_twice(estimator):
    """Called directly, an estimator's forward refuses features that are not
    finite, or of the wrong shape, naming ``features``. Under the Morpher,
    which has checked them, the built-ins run ``_forward`` (no second scan)
    with the same results as ``forward``; a subclass that overrides
    ``forward`` is still called through it."""
    from grapheme.estimators import _checked_forward
    from grapheme.ops import MergeScores

    g = Graph.from_texts(["aabbc", "abab"])
    H = np.random.default_rng(0).normal(size=(g.num_nodes, 3))
    sim = np.random.default_rng(1).uniform(-1, 1, g.num_edges)
    scores = MergeScores(1.0).forward(sim, 0.0)[0]
    bad = H.copy()
    bad[2, 1] = np.nan
    for features, match in ((bad, "features contains NaN"),
                            (H[:-1], "features must have shape")):
        with pytest.raises(ValueError, match=match):
            type(estimator)(**estimator.get_params()).forward(g, features, sim, scores)
    assert _checked_forward(estimator).__func__ is type(estimator)._forward
    a, _ = type(estimator)(**estimator.get_params()).forward(g, H, sim, scores)
    b, _ = _checked_forward(type(estimator)(**estimator.get_params()))(g, H, sim, scores)
    assert a.graph.features.tobytes() == b.graph.features.tobytes()
    assert np.array_equal(a.decisions, b.decisions)

    calls = []

    class Own(type(estimator)):
        def forward(self, graph, features, similarity, scores, shard=None, workspace=None):
            calls.append(1)
            return super().forward(graph, features, similarity, scores, shard, workspace)

    own = Own(**estimator.get_params())
    assert _checked_forward(own).__func__ is Own.forward
    Morpher(estimator=own).forward(g, H)
    assert calls == [1]

    # a forward set on the instance is called too
    one = type(estimator)(**estimator.get_params())
    one.forward = lambda *args, **kwargs: (calls.append(2), a)[1:] + (None,)
    Morpher(estimator=one).forward(g, H)
    assert calls == [1, 2]

    # and a subclass's own _forward, of another signature, is left alone
    class Other(type(estimator)):
        def _forward(self, x):
            raise AssertionError("not the estimator's step")

        def forward(self, graph, features, similarity, scores, shard=None, workspace=None):
            return type(estimator)._forward(self, graph, features, similarity, scores, shard,
                                            workspace)

    other = Other(**estimator.get_params())
    assert _checked_forward(other).__func__ is Other.forward
    Morpher(estimator=other).forward(g, H)

    class Tweaked(type(estimator)):   # _forward of the built-in's signature: via forward
        def _forward(self, *args, **kwargs):
            calls.append(3)
            return super()._forward(*args, **kwargs)

    Morpher(estimator=Tweaked(**estimator.get_params())).forward(g, H)
    assert calls == [1, 2, 3]


def test_settings_inside_a_morpher_are_checked_where_used():
    """A rate controller's and Reinforce's settings assigned after
    construction: rate.target = 7 gave a penalty of hundreds silently,
    samples = 0 failed naming "copies" (found by the review helper)."""
    g = Graph.from_text("abcde")
    h = np.random.default_rng(0).normal(size=(5, 3))
    for owner, key, value, exc in (("rate", "target", 7.0, ValueError),
                                   ("rate", "control", "pid", ValueError),
                                   ("estimator", "samples", 0, ValueError),
                                   ("estimator", "baseline", "median", ValueError)):
        morpher = Morpher(estimator=Reinforce(samples=2), rate=RateController(target=0.5))
        setattr(getattr(morpher, owner), key, value)
        with pytest.raises(exc, match=key):
            morpher.forward(g, h)
    rate = RateController(target=0.5)
    rate.target = "x"
    with pytest.raises(TypeError, match="target"):
        rate.update(0.5)
