"""Tests of the structural loss: reference values, exact gradients, stability."""
import importlib.util
import pathlib

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from grapheme import Graph, gradcheck
from grapheme.loss import LossGrad, LossResult, StructuralLoss

_spec = importlib.util.spec_from_file_location(
    "loss_reference", pathlib.Path(__file__).with_name("loss_reference.py"))
loss_reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(loss_reference)
reference_pair = loss_reference.reference_pair

REF_TOL = 1e-10
GRAD_RTOL = 1e-4


# ----------------------------------------------------------------- helpers
def random_graph(rng, n, *, zero_mass=0, act=None, index_dtype=np.int64,
                 mass=True, edges=None):
    """Random directed graph as a dict of Graph fields plus an edge list."""
    E = int(rng.integers(0, 2 * n + 1)) if edges is None else edges
    E = E if n else 0
    src = np.sort(rng.integers(0, n, E)) if n else np.zeros(0, np.int64)
    dst = rng.integers(0, n, E) if n else np.zeros(0, np.int64)
    w = rng.uniform(0.5, 2.0, E)
    indptr = np.zeros(n + 1, np.int64)
    np.add.at(indptr, src + 1, 1)
    indptr = np.cumsum(indptr).astype(index_dtype)
    a = rng.uniform(0.3, 2.0, n) if mass else np.ones(n)
    if zero_mass:
        a[rng.choice(n, min(zero_mass, n), replace=False)] = 0.0
    fields = dict(indptr=indptr, indices=dst.astype(index_dtype), weights=w,
                  labels=rng.integers(97, 100, n).astype(np.int32), mass=a,
                  activation=rng.uniform(-1.0, 2.0, n) if act is None else act)
    return fields, [(int(s), int(d), float(x)) for s, d, x in zip(src, dst, w)]


def away_from_kinks(rng, n, m, margin=1e-2):
    """Activations with every |x_i - y_j| at least ``margin`` away from 0 and 1."""
    for _ in range(10000):
        x = rng.uniform(-1.0, 2.0, n)
        y = rng.uniform(-1.0, 2.0, m)
        d = np.abs(x[:, None] - y[None, :])
        if np.all(np.abs(d) > margin) and np.all(np.abs(d - 1.0) > margin):
            return x, y
    raise RuntimeError("could not sample activations away from the kinks")


def batch_fields(parts):
    """Concatenate single-graph field dicts into one block-diagonal batch."""
    sizes = [len(p["labels"]) for p in parts]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    nedges = [len(p["indices"]) for p in parts]
    eoff = np.concatenate([[0], np.cumsum(nedges)])
    dtype = parts[0]["indptr"].dtype
    indptr = np.concatenate([[0]] + [p["indptr"][1:] + eoff[i] for i, p in enumerate(parts)])
    indices = np.concatenate([np.zeros(0)] + [p["indices"] + offsets[i]
                                              for i, p in enumerate(parts)])
    cat = lambda k: np.concatenate([np.zeros(0)] + [p[k] for p in parts])
    return dict(indptr=indptr.astype(dtype), indices=indices.astype(dtype),
                weights=cat("weights"), labels=cat("labels").astype(np.int32),
                mass=cat("mass"), activation=cat("activation"), offsets=offsets)


def run(loss, p, t):
    return loss.forward(Graph(**p), Graph(**t))


def check_reference(res, b, ref):
    assert_allclose(res.values[b], ref["value"], rtol=REF_TOL, atol=REF_TOL)
    assert_allclose(res.nodes[b], ref["node"], rtol=REF_TOL, atol=REF_TOL)
    assert_allclose(res.edges[b], ref["edge"], rtol=REF_TOL, atol=REF_TOL)
    assert_allclose(res.cliques[b], ref["clique"], rtol=REF_TOL, atol=REF_TOL)
    assert_allclose(res.plan(b), ref["plan"], rtol=REF_TOL, atol=REF_TOL)
    assert res.iterations[b] == ref["iterations"]


def ref_kwargs(loss):
    return dict(alpha=loss.alpha, beta=loss.beta, gamma=loss.gamma,
                epsilon=loss.epsilon, iterations=loss.iterations, tol=loss.tol,
                weights=loss.weights, balance=loss._balances())


def rel_error(num, ana):
    scale = max(np.abs(num).max(initial=0.0), np.abs(ana).max(initial=0.0))
    return 0.0 if scale == 0 else np.abs(num - ana).max() / scale


def mass_fd(f, a, h=1e-6):
    """d f / d a: central differences, second-order one-sided at a_i = 0."""
    a = np.array(a, dtype=float)
    out = np.empty_like(a)
    for i in range(a.size):
        def at(delta):
            z = a.copy()
            z[i] += delta
            return f(z)
        if a[i] == 0.0:
            out[i] = (-3.0 * at(0.0) + 4.0 * at(h) - at(2 * h)) / (2 * h)
        else:
            out[i] = (at(h) - at(-h)) / (2 * h)
    return out


# ------------------------------------------------------------ reference
@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("tol", [None, 1e-3])
@pytest.mark.parametrize("epsilon", [0.05, 0.1, 0.5])
@pytest.mark.parametrize("n,m", [(4, 5), (1, 1), (0, 3), (3, 0), (0, 0), (9, 2), (2, 12)])
def test_single_pair_matches_reference(n, m, epsilon, tol, index_dtype):
    rng = np.random.default_rng(1000 * n + m)
    p, ep = random_graph(rng, n, zero_mass=1 if n > 2 else 0, index_dtype=index_dtype)
    t, et = random_graph(rng, m, mass=False, index_dtype=index_dtype)
    loss = StructuralLoss(epsilon=epsilon, tol=tol, iterations=30)
    res = run(loss, p, t)
    ref = reference_pair(p["activation"], p["mass"], p["labels"], ep,
                         t["activation"], t["mass"], t["labels"], et, **ref_kwargs(loss))
    check_reference(res, 0, ref)
    assert_allclose(res.value, ref["value"], rtol=REF_TOL, atol=REF_TOL)


@pytest.mark.parametrize("tol", [None, 1e-4])
def test_batch_matches_reference(tol):
    rng = np.random.default_rng(7)
    sizes = [(3, 4), (0, 2), (5, 0), (0, 0), (1, 1), (8, 6), (2, 9)]
    loss = StructuralLoss(alpha=0.7, beta=1.3, gamma=0.4, epsilon=0.08,
                          iterations=25, tol=tol, weights=(0.3, 0.5, 0.2))
    ps, ts, refs = [], [], []
    for n, m in sizes:
        p, ep = random_graph(rng, n, zero_mass=1)
        t, et = random_graph(rng, m, mass=False)
        ps.append(p)
        ts.append(t)
        refs.append(reference_pair(p["activation"], p["mass"], p["labels"], ep,
                                   t["activation"], t["mass"], t["labels"], et,
                                   **ref_kwargs(loss)))
    res = run(loss, batch_fields(ps), batch_fields(ts))
    assert res.num_pairs == len(sizes)
    for b, ref in enumerate(refs):
        check_reference(res, b, ref)
    assert_allclose(res.value, np.mean([r["value"] for r in refs]), rtol=REF_TOL)
    assert_allclose(res.node, np.mean([r["node"] for r in refs]), rtol=REF_TOL)


def test_forward_through_graph_equals_arrays():
    rng = np.random.default_rng(3)
    parts = [random_graph(rng, n, zero_mass=1) for n in (4, 0, 6)]
    tparts = [random_graph(rng, m, mass=False) for m in (5, 3, 0)]
    gp = Graph.batch([Graph(**f) for f, _ in parts])
    gt = Graph.batch([Graph(**f) for f, _ in tparts])
    loss = StructuralLoss()
    res = loss.forward(gp, gt)
    arr = run(loss, batch_fields([f for f, _ in parts]), batch_fields([f for f, _ in tparts]))
    assert_allclose(res.values, arr.values, rtol=0, atol=1e-15)
    grad = loss.backward(res)
    assert isinstance(grad, LossGrad)
    assert grad.activation.shape == (10,) and grad.mass.shape == (10,)
    assert grad.target_activation.shape == (8,)
    assert_allclose(grad.mass, loss.backward(arr).mass, rtol=0, atol=1e-15)


def test_graph_from_text_pair():
    loss = StructuralLoss()
    res = loss.forward(Graph.from_text("abc"), Graph.from_text("abc"))
    other = loss.forward(Graph.from_text("abc"), Graph.from_text("xyz"))
    assert res.value < other.value
    batched = loss.forward(Graph.from_texts(["abc", "ab"]), Graph.from_texts(["abc", "xy"]))
    assert_allclose(batched.values[0], res.value, rtol=1e-14)


# ------------------------------------------------------------ gradients
def _gradient_case(rng, n, m, zero_mass, loss):
    x, y = away_from_kinks(rng, n, m)
    p, _ = random_graph(rng, n, zero_mass=zero_mass, act=x)
    t, _ = random_graph(rng, m, mass=False, act=y)
    res = run(loss, p, t)
    grad = loss.backward(res)
    return p, t, res, grad


def _check_gradients(loss, p, t, res, grad):
    def value(**change):
        pp, tt = dict(p), dict(t)
        for k, v in change.items():
            (tt if k == "target_activation" else pp)[k.replace("target_", "")] = v
        out = run(loss, pp, tt)
        assert_array_equal(out.iterations, res.iterations)  # no jump in the count
        return out.value

    r = gradcheck(lambda v: (value(activation=v), grad.activation), p["activation"],
                  rtol=GRAD_RTOL)
    assert r.ok, r.error
    r = gradcheck(lambda v: (value(target_activation=v), grad.target_activation),
                  t["activation"], rtol=GRAD_RTOL)
    assert r.ok, r.error
    num = mass_fd(lambda v: value(mass=v), p["mass"])
    assert rel_error(num, grad.mass) <= GRAD_RTOL, rel_error(num, grad.mass)


@pytest.mark.parametrize("tol", [None, 1e-3])
@pytest.mark.parametrize("n,m,zero", [(5, 6, 2), (1, 1, 0), (1, 3, 1), (7, 3, 3),
                                      (4, 4, 0), (3, 0, 1), (0, 4, 0)])
def test_gradient_single_pair(n, m, zero, tol):
    rng = np.random.default_rng(17 * n + m + zero)
    loss = StructuralLoss(tol=tol, iterations=20)
    p, t, res, grad = _gradient_case(rng, n, m, zero, loss)
    if tol is not None and n and m:
        assert res.iterations[0] < 20 or not res.converged[0]
    _check_gradients(loss, p, t, res, grad)


@pytest.mark.parametrize("epsilon", [0.03, 0.3])
def test_gradient_other_epsilon_and_weights(epsilon):
    rng = np.random.default_rng(5)
    loss = StructuralLoss(alpha=0.6, beta=2.0, gamma=1.5, epsilon=epsilon,
                          iterations=15, weights=(0.2, 0.5, 0.3))
    p, t, res, grad = _gradient_case(rng, 6, 5, 2, loss)
    _check_gradients(loss, p, t, res, grad)


def test_gradient_at_the_smallest_epsilon():
    """A numerical review's find: the gradients through the sweeps carry
    rounding of about 1e-17 / eps^2, 0.36 of the largest off at the old
    minimum 1e-8 and 3.5e-3 at 1e-7 on this pair; at the minimum now, 1e-6,
    they match central differences of the same 200 sweeps."""
    from grapheme.loss import EPSILON_MIN

    rng = np.random.default_rng(0)
    p, _ = random_graph(rng, 5)
    t, _ = random_graph(rng, 4, mass=False)
    loss = StructuralLoss(epsilon=EPSILON_MIN, iterations=200, domain="log",
                          beta=0.0, gamma=0.0)
    grad = loss.backward(run(loss, p, t))
    h = 1e-4
    for key, ana in (("activation", grad.activation), ("weights", grad.weights)):
        num = np.empty_like(ana)
        for i in range(num.size):
            up, down = (dict(p, **{key: p[key] + s * h * np.eye(num.size)[i]})
                        for s in (1, -1))
            num[i] = (run(loss, up, t).value - run(loss, down, t).value) / (2 * h)
        assert np.abs(num - ana).max() <= 2e-4 * np.abs(num).max(), key


@pytest.mark.parametrize("tol", [None, 1e-3])
def test_gradient_batch_mean(tol):
    rng = np.random.default_rng(11)
    loss = StructuralLoss(tol=tol)
    ps, ts = [], []
    # (a graph whose masses are ALL zero sits on the clique term's jump; avoid)
    for n, m, z in [(3, 4, 1), (0, 2, 0), (5, 5, 2), (2, 0, 0), (2, 3, 1)]:
        x, y = away_from_kinks(rng, n, m)
        ps.append(random_graph(rng, n, zero_mass=z, act=x)[0])
        ts.append(random_graph(rng, m, mass=False, act=y)[0])
    p, t = batch_fields(ps), batch_fields(ts)
    res = run(loss, p, t)
    grad = loss.backward(res)
    _check_gradients(loss, p, t, res, grad)
    # the mean's gradient is the per-pair gradient divided by B
    single = run(loss, ps[2], ts[2])
    g2 = loss.backward(single)
    sl = slice(3, 8)  # pair 2 holds predicted nodes 3..7
    assert_allclose(grad.activation[sl], g2.activation / 5, rtol=1e-12, atol=1e-15)
    assert_allclose(grad.mass[sl], g2.mass / 5, rtol=1e-12, atol=1e-15)


def test_gradient_through_shared_embedding():
    """Target activations from the same parameters: the two gradients add."""
    rng = np.random.default_rng(23)
    n = 5
    x, _ = away_from_kinks(rng, n, n)
    y = x[::-1] + 0.05  # shifted copy, |x_i - y_j| can sit near kinks: check
    d = np.abs(x[:, None] - y[None, :])
    assert np.all(d > 1e-3) and np.all(np.abs(d - 1) > 1e-3)
    p, _ = random_graph(rng, n, act=x)
    t, _ = random_graph(rng, n, mass=False, act=y)
    loss = StructuralLoss()

    def f(v):
        pp, tt = dict(p, activation=v), dict(t, activation=v[::-1] + 0.05)
        res = run(loss, pp, tt)
        g = loss.backward(res)
        return res.value, g.activation + g.target_activation[::-1]

    r = gradcheck(f, x, rtol=GRAD_RTOL)
    assert r.ok, r.error


# ------------------------------------------------------------ stability
def _finite(res, grad):
    for arr in (res.values, res.nodes, res.edges, res.cliques, res.marginal_error,
                grad.activation, grad.mass, grad.target_activation,
                grad.weights, grad.target_weights, *res.plans):
        assert np.all(np.isfinite(arr))


@pytest.mark.parametrize("epsilon", [1e-3, 1e-2, 0.1, 1.0])
@pytest.mark.parametrize("case", ["random", "empty_predicted", "empty_target",
                                  "both_empty", "single", "zero_masses",
                                  "one_vs_500", "500_vs_one", "some_zero_masses"])
def test_stability(case, epsilon):
    rng = np.random.default_rng(99)
    n, m, zero = dict(random=(6, 7, 0), empty_predicted=(0, 5, 0), empty_target=(5, 0, 0),
                      both_empty=(0, 0, 0), single=(1, 1, 0), zero_masses=(6, 4, 6),
                      one_vs_500=(1, 500, 0), some_zero_masses=(6, 4, 2),
                      **{"500_vs_one": (500, 1, 0)})[case]
    p, _ = random_graph(rng, n, zero_mass=zero)
    t, _ = random_graph(rng, m, mass=False)
    for tol in (None, 1e-6):
        loss = StructuralLoss(epsilon=epsilon, tol=tol)
        res = run(loss, p, t)
        _finite(res, loss.backward(res))
        assert res.value >= 0.0 or res.edge < 0  # node and clique are >= 0
        assert res.node >= 0.0 and res.clique >= 0.0


def test_all_zero_masses_and_empty_target_is_degenerate():
    rng = np.random.default_rng(0)
    p, _ = random_graph(rng, 4, zero_mass=4)
    t, _ = random_graph(rng, 0, mass=False)
    loss = StructuralLoss()
    res = run(loss, p, t)
    assert res.node == 0.0 and res.iterations[0] == 0
    assert_array_equal(res.plan(0), np.zeros((5, 1)))
    _finite(res, loss.backward(res))


def test_readonly_inputs():
    rng = np.random.default_rng(4)
    p, _ = random_graph(rng, 5)
    t, _ = random_graph(rng, 4, mass=False)
    for d in (p, t):
        for v in d.values():
            v.flags.writeable = False
    loss = StructuralLoss()
    res = run(loss, p, t)
    _finite(res, loss.backward(res))


# ------------------------------------------------------------ marginals
@pytest.mark.parametrize("n,m", [(5, 7), (8, 3), (4, 4)])
def test_marginals(n, m):
    rng = np.random.default_rng(n * m)
    p, _ = random_graph(rng, n, zero_mass=1)
    t, _ = random_graph(rng, m, mass=False)
    loss = StructuralLoss(iterations=2000, tol=1e-10)
    res = run(loss, p, t)
    P = res.plan(0)
    a, b = p["mass"], t["mass"]
    assert_allclose(P.sum(axis=0), np.append(b, a.sum()), rtol=1e-12, atol=1e-12)
    assert_allclose(P.sum(axis=1), np.append(a, b.sum()), rtol=1e-8, atol=1e-8)
    assert res.converged[0]
    assert res.marginal_error[0] <= 1e-8
    assert np.all(P[:-1][a == 0] == 0)


def test_tol_stops_early_and_reports():
    rng = np.random.default_rng(8)
    p, _ = random_graph(rng, 6)
    t, _ = random_graph(rng, 6, mass=False)
    res = run(StructuralLoss(iterations=500, tol=1e-6), p, t)
    assert 1 <= res.iterations[0] < 500 and res.converged[0]
    assert res.marginal_error[0] <= 1e-6
    row = res.plan(0).sum(axis=1)
    assert np.abs(row - np.append(p["mass"], 6.0)).max() <= 1e-6
    short = run(StructuralLoss(iterations=1, tol=1e-12), p, t)
    assert short.iterations[0] == 1 and not short.converged[0]


# ------------------------------------------------------------ known values
def test_identical_single_nodes_cost_nearly_nothing():
    g = dict(indptr=[0, 0], indices=[], labels=[97], activation=[0.4])
    res = run(StructuralLoss(epsilon=0.01, iterations=50), g, g)
    assert res.node < 1e-2
    assert res.edge == 0.0 and res.clique == 0.0
    P = res.plan(0)
    assert P[0, 0] > 0.99 and P[0, 1] < 1e-2


def test_prediction_equal_to_target_scores_lower():
    rng = np.random.default_rng(12)
    t, _ = random_graph(rng, 8, mass=False, edges=9)
    loss = StructuralLoss(epsilon=0.05)
    same = run(loss, t, t).value
    for k in range(5):
        p = dict(t, activation=t["activation"] + rng.normal(0, 0.3, 8))
        assert same < run(loss, p, t).value
    fewer = dict(t, mass=np.where(np.arange(8) < 4, 1.0, 0.0))
    assert same < run(loss, fewer, t).value


def test_edge_term_dice_extremes():
    chain = dict(indptr=[0, 1, 2, 2], indices=[1, 2], labels=[97, 98, 99],
                 activation=[0.0, 0.5, 0.9])
    loose = dict(chain, indptr=[0, 0, 0, 0], indices=[])
    loss = StructuralLoss(epsilon=0.005, iterations=200)
    assert run(loss, chain, chain).edge < 1e-3       # every edge preserved
    assert run(loss, loose, chain).edge == pytest.approx(1.0)  # nothing preserved
    assert run(loss, loose, loose).edge == 0.0       # no edges at all


# ------------------------------------------------------------ bad input
BAD_SETTINGS = [
    (dict(epsilon=0.0), ValueError, "epsilon"),
    (dict(epsilon=1e-20), ValueError, r"epsilon must be >= 1e-06, got 1e-20"),
    (dict(epsilon=1e-7), ValueError, r"epsilon must be >= 1e-06, got 1e-07"),
    (dict(epsilon=-1.0), ValueError, "epsilon"),
    (dict(epsilon=float("nan")), ValueError, "epsilon"),
    (dict(iterations=0), ValueError, "iterations"),
    (dict(iterations=2.5), TypeError, "iterations"),
    (dict(iterations=True), TypeError, "iterations"),
    (dict(tol=0.0), ValueError, "tol"),
    (dict(tol=-1e-3), ValueError, "tol"),
    (dict(weights=(0.1, 0.2)), ValueError, "weights"),
    (dict(weights=(0.1, -0.2, 0.3)), ValueError, "weights"),
    (dict(weights=(0.1, float("inf"), 0.3)), ValueError, "weights"),
    (dict(weights="abc"), (TypeError, ValueError), "weights"),
    (dict(weights=(1, 0.2, 1j)), TypeError, "weights"),     # not cast to its real part
    (dict(weights=np.array([1, 0.2, 0], complex)), TypeError, "weights"),
    (dict(weights=np.array([1, 1, 1], "datetime64[s]")), TypeError, "weights"),
    (dict(weights=["1", "0.2", "0"]), TypeError, "weights"),       # text is not parsed
    (dict(weights=(True, False, True)), TypeError, "weights"),
    (dict(alpha=-1.0), ValueError, "alpha"),
    (dict(beta=float("inf")), ValueError, "beta"),
    (dict(gamma="2"), TypeError, "gamma"),
    (dict(num_threads="2"), TypeError, "num_threads"),
    (dict(num_threads=0), ValueError, "num_threads"),
    (dict(domain="fast"), ValueError, "domain"),
    (dict(balance=1), TypeError, "balance"),
]


@pytest.mark.parametrize("kwargs,exc,name", BAD_SETTINGS)
def test_bad_constructor_arguments(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        StructuralLoss(**kwargs)


@pytest.mark.parametrize("kwargs,exc,name", BAD_SETTINGS)
def test_bad_settings_changed_after_construction(kwargs, exc, name):
    """A setting changed on the object is checked at the next forward (and
    backward), naming it, before any kernel runs (before: num_threads="2"
    failed in compiled code unnamed, epsilon=-1 ran the sweeps)."""
    p, t = Graph.from_texts(["abc", "de"]), Graph.from_texts(["ab", "d"])
    loss = StructuralLoss()
    result = loss.forward(p, t)
    for key, value in kwargs.items():
        setattr(loss, key, value)
    with pytest.raises(exc, match=name):
        loss.forward(p, t)
    with pytest.raises(exc, match=name):
        loss.backward(result)


def test_backward_uses_the_settings_of_its_forward():
    """Settings changed between forward and backward do not reach the
    backward pass, which reverses the sweeps the forward pass ran."""
    p, t = Graph.from_texts(["abcab", "de"]), Graph.from_texts(["abca", "dd"])
    loss = StructuralLoss()
    want = loss.backward(loss.forward(p, t))
    result = loss.forward(p, t)
    loss.epsilon, loss.balance, loss.weights, loss.alpha = 0.5, False, (1.0, 0.0, 0.0), 3.0
    got = loss.backward(result)
    for a, b in zip(got[:6], want[:6]):
        assert_array_equal(a, b)
    assert loss.epsilon == 0.5 and loss.weights == (1.0, 0.0, 0.0)   # kept, checked


def test_mismatched_batch_sizes():
    loss = StructuralLoss()
    with pytest.raises(ValueError, match="target"):
        loss.forward(Graph.from_texts(["ab", "c"]), Graph.from_texts(["ab", "c", "d"]))
    with pytest.raises(ValueError, match="target"):
        loss.forward(Graph.from_text("ab"), Graph.from_texts(["ab", "c"]))


def test_bad_graph_arguments():
    loss = StructuralLoss()
    g = Graph.from_text("ab")
    with pytest.raises(TypeError, match="predicted"):
        loss.forward("ab", g)
    with pytest.raises(TypeError, match="target"):
        loss.forward(g, None)
    neg = Graph(indptr=[0, 1, 1], indices=[1], labels=[97, 98], weights=[-1.0])
    with pytest.raises(ValueError, match="target.weights"):
        loss.forward(g, neg)
    with pytest.raises(TypeError, match="result"):
        loss.backward(None)
    # the graphs themselves reject the rest before the loss sees them
    with pytest.raises(ValueError, match="mass must be non-negative"):
        Graph([0, 0], [], [97], mass=[-1.0])
    with pytest.raises(ValueError, match="batch"):
        Graph([0, 1, 1], [1], [97, 98], offsets=[0, 1, 2])


def test_result_accessors():
    loss = StructuralLoss()
    res = loss.forward(Graph.from_texts(["abc", ""]), Graph.from_texts(["ab", "x"]))
    assert isinstance(res, LossResult)
    assert [P.shape for P in res.plans] == [(4, 3), (1, 2)]
    assert not res.plan(0).flags.writeable
    with pytest.raises(IndexError):
        res.plan(2)
    assert res.iterations.dtype == np.int64 and res.converged.dtype == bool
    assert res.value == pytest.approx(res.values.mean())


@pytest.mark.parametrize("debias", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_forward_in_a_workspace_is_the_forward(debias, threads):
    """The Trainer's path: plans and potentials in a reused workspace give
    the same result and gradient, bit for bit, batch after batch of other
    sizes (the workspace's arrays grow and are reused). The sweeps'
    potentials are first stored in workspace arrays lent to the threads;
    the last batch, far larger, outgrows them mid-run (copied to malloc'ed
    stores)."""
    from grapheme._workspace import Workspace

    ws = Workspace(np.float32)      # the loss's arrays are float64 whatever the model's
    loss = StructuralLoss(debias=debias, num_threads=threads)
    for seed, count, longest in ((0, 12, 9), (1, 3, 9), (2, 20, 9), (3, 80, 30)):
        rng = np.random.default_rng(seed)
        texts = ["".join(rng.choice(list("abcd"), rng.integers(1, longest)))
                 for _ in range(count)]
        p = Graph.from_texts(texts)
        p = p.replace(activation=rng.uniform(-1, 1, p.num_nodes))
        t = Graph.from_texts([s[: max(1, len(s) - 2)] for s in texts])
        want, got = loss.forward(p, t), loss._forward(p, t, ws)
        assert got._cache.plan.dtype == np.float64
        for name in ("plan", "fpot", "gpot"):     # they live in the workspace
            assert np.shares_memory(getattr(got._cache, name), ws(f"loss.{name}", (1,),
                                                                  np.float64))
        assert ws.kept("loss.fstore") and ws.kept("loss.gstore")
        for name in ("values", "iterations", "marginal_error"):
            assert_array_equal(getattr(got, name), getattr(want, name))
        for a, b in zip(loss.backward(got), loss.backward(want)):
            if a is not None:
                assert_array_equal(a, b)


def test_the_trainer_calls_a_subclass_forward():
    """The Trainer puts the loss's arrays in its workspace only through
    StructuralLoss's own forward: a subclass that overrides forward gets
    its forward called."""
    import grapheme as gr

    calls = []

    class Counting(StructuralLoss):
        def forward(self, predicted, target):
            calls.append(1)
            return super().forward(predicted, target)

    trainer = gr.Trainer(gr.Embedding(dim=4, seed=0), gr.Morpher(), Counting(),
                         gr.Adam(lr=1e-2), seed=0, progress=False)
    trainer.train_step(["abc", "xyz"], ["ab", "xy"])
    assert calls == [1]
