"""The structural loss as a function of the edge weights: weighted degrees,
``LossGrad.weights``/``target_weights``, the upstream gradient of
``StructuralLoss.backward(result, grad)`` and its purity.

Finite differences are float64 central differences (step 1e-6) with a
normwise relative error of at most 1e-6; the points are away from the kinks
(random positive weights make equal degrees a null event, and activations
come from ``away_from_kinks``), except in the test of the kink convention,
which uses one-sided differences.
"""
import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from grapheme import Graph, LossGrad, StructuralLoss
from grapheme.testing import numerical_gradient as central  # float64, step 1e-6
from test_loss import away_from_kinks, batch_fields, mass_fd, random_graph, rel_error, run

FD_RTOL = 1e-6
FIELDS = ("activation", "mass", "target_activation", "weights", "target_weights",
          "target_mass")


def pair_list(seed, sizes, relaxed=False):
    """Random pairs away from the activation kinks, as two lists of field
    dicts; ``relaxed`` draws predicted edge weights in (0, 1), as a relaxed
    graph carries."""
    rng = np.random.default_rng(seed)
    ps, ts = [], []
    for n, m, zero in sizes:
        x, y = away_from_kinks(rng, n, m)
        p = random_graph(rng, n, zero_mass=zero, act=x)[0]
        if relaxed:
            p["weights"] = rng.uniform(0.05, 0.95, len(p["weights"]))
        ps.append(p)
        ts.append(random_graph(rng, m, mass=False, act=y)[0])
    return ps, ts


def pairs(seed, sizes, relaxed=False):
    """The pairs of :func:`pair_list` as one batch."""
    ps, ts = pair_list(seed, sizes, relaxed)
    return batch_fields(ps), batch_fields(ts)


def objective(loss, res, upstream):
    """The function whose gradient ``loss.backward(res, upstream)`` is:
    ``upstream * value`` or ``sum_b upstream[b] * values[b]``, as a function
    of one field of the predicted (``side="p"``) or target graph. Checks that
    no perturbation changes the iteration counts."""
    def make(p, t, side, key):
        def f(v):
            pp, tt = dict(p), dict(t)
            (pp if side == "p" else tt)[key] = v
            out = run(loss, pp, tt)
            assert_array_equal(out.iterations, res.iterations)
            if np.ndim(upstream) == 0:
                return upstream * out.value
            return float(np.dot(upstream, out.values))
        return f
    return make


def check_weight_gradients(loss, p, t, upstream=1.0):
    res = run(loss, p, t)
    grad = loss.backward(res, upstream)
    make = objective(loss, res, upstream)
    for side, key, ana in (("p", "weights", grad.weights),
                           ("t", "weights", grad.target_weights)):
        w = (p if side == "p" else t)[key]
        assert ana.shape == w.shape
        num = central(make(p, t, side, key), w)
        err = rel_error(num, ana)
        assert err <= FD_RTOL, (side, err)
        if w.size:
            assert np.abs(num).max() > 0      # the check is not vacuous
    return res, grad


# ------------------------------------------------------------ weights gradient
@pytest.mark.parametrize("domain", ["log", "scaling"])
@pytest.mark.parametrize("tol", [None, 1e-3])
@pytest.mark.parametrize("seed,sizes", [
    (1, [(5, 6, 1)]),
    (2, [(4, 4, 0)]),
    (3, [(3, 5, 1), (6, 4, 2), (2, 3, 0)]),          # batched
    (4, [(1, 3, 0), (0, 2, 0), (5, 5, 1), (4, 0, 0)]),  # with empty graphs
])
def test_weights_gradient_finite_differences(domain, tol, seed, sizes):
    loss = StructuralLoss(tol=tol, iterations=60, domain=domain)
    res, _ = check_weight_gradients(loss, *pairs(seed, sizes))
    assert set(res.domain) == {domain}
    if tol is not None:
        assert (res.iterations < 60).all()      # the early stop is exercised


@pytest.mark.parametrize("domain", ["log", "scaling"])
def test_weights_gradient_relaxed_graph(domain):
    # expected weights in (0, 1): degrees below 1, where max(d, 1) is flat
    loss = StructuralLoss(domain=domain)
    check_weight_gradients(loss, *pairs(5, [(6, 5, 1), (4, 6, 0)], relaxed=True))


def test_weights_gradient_other_settings():
    loss = StructuralLoss(alpha=0.6, beta=2.0, gamma=1.5, epsilon=0.3, iterations=15,
                          weights=(0.2, 0.5, 0.3))
    check_weight_gradients(loss, *pairs(6, [(6, 5, 2), (3, 3, 0)]))


# ------------------------------------------------------------ upstream gradient
@pytest.mark.parametrize("domain", ["log", "scaling"])
def test_per_pair_upstream_gradient(domain):
    p, t = pairs(7, [(4, 5, 1), (5, 3, 0), (3, 4, 1)])
    loss = StructuralLoss(domain=domain)
    upstream = np.array([0.7, -1.3, 2.1])
    res, grad = check_weight_gradients(loss, p, t, upstream)
    make = objective(loss, res, upstream)
    for side, key, ana in (("p", "activation", grad.activation),
                           ("t", "activation", grad.target_activation)):
        num = central(make(p, t, side, key), (p if side == "p" else t)[key])
        assert rel_error(num, ana) <= FD_RTOL
    num = mass_fd(make(p, t, "p", "mass"), p["mass"])
    assert rel_error(num, grad.mass) <= 1e-4      # one-sided at the zero masses


def test_upstream_scalar_and_array_agree():
    p, t = pairs(8, [(4, 5, 1), (5, 3, 0)])
    loss = StructuralLoss()
    res = run(loss, p, t)
    base = loss.backward(res)
    for got, factor in ((loss.backward(res, 2.5), 2.5),
                        (loss.backward(res, np.full(2, 0.5)), 1.0),   # = grad of the mean
                        (loss.backward(res, np.float32(-1.0)), -1.0),
                        (loss.backward(res, 0), 0.0)):
        for name in FIELDS:
            assert_allclose(getattr(got, name), factor * getattr(base, name),
                            rtol=1e-13, atol=1e-300)
    # an upstream weight on pair 1 alone: pair 1's own gradient, zero elsewhere
    ps, ts = pair_list(8, [(4, 5, 1), (5, 3, 0)])
    single = loss.backward(res, np.array([0.0, 1.0]))
    alone = loss.backward(run(loss, ps[1], ts[1]))
    n0, m0 = len(ps[0]["activation"]), len(ts[0]["activation"])
    e0, f0 = len(ps[0]["weights"]), len(ts[0]["weights"])
    for name, k in (("activation", n0), ("mass", n0), ("target_activation", m0),
                    ("weights", e0), ("target_weights", f0)):
        got = getattr(single, name)
        assert not np.any(got[:k])
        assert_allclose(got[k:], getattr(alone, name), rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("bad,exc,match", [
    ("1.0", TypeError, "grad"),
    (None, TypeError, "grad"),
    (True, TypeError, "grad"),
    (1j, TypeError, "grad"),
    ([1j, 1j], TypeError, "grad"),
    (float("nan"), ValueError, "grad must be finite"),
    (np.inf, ValueError, "grad must be finite"),
    ([1.0, np.nan], ValueError, "grad must be finite"),
    ([1.0, 2.0, 3.0], ValueError, r"grad must be a scalar or of shape \(2,\)"),
    ([[1.0, 2.0]], ValueError, r"grad must be a scalar or of shape \(2,\)"),
])
def test_bad_upstream_gradient(bad, exc, match):
    p, t = pairs(9, [(3, 4, 0), (2, 2, 0)])
    loss = StructuralLoss()
    res = run(loss, p, t)
    with pytest.raises(exc, match=match):
        loss.backward(res, bad)


# ------------------------------------------------------------ purity
def test_backward_is_pure():
    p, t = pairs(10, [(5, 6, 1), (3, 2, 0)])
    loss = StructuralLoss(tol=1e-4)
    res = run(loss, p, t)
    snapshot = {k: np.copy(v) for k, v in vars(res).items() if isinstance(v, np.ndarray)}
    cache = [np.copy(v) for v in res._cache if isinstance(v, np.ndarray)]
    upstream = np.array([1.5, -0.5])
    first = loss.backward(res, upstream)
    second = loss.backward(res, upstream)
    assert isinstance(first, LossGrad)
    assert first._fields == FIELDS + ("features", "target_features")
    for name in FIELDS:
        a, b = getattr(first, name), getattr(second, name)
        assert_array_equal(a, b)
        assert not np.shares_memory(a, b)
    assert_array_equal(upstream, [1.5, -0.5])
    for k, v in snapshot.items():
        assert_array_equal(getattr(res, k), v)
    for before, now in zip(cache, [v for v in res._cache if isinstance(v, np.ndarray)]):
        assert_array_equal(before, now)
    # another loss's settings do not leak in: the result's own are used
    assert_array_equal(StructuralLoss(beta=9.0).backward(res, upstream).weights,
                       first.weights)


# ------------------------------------------------------------ weighted degrees
def test_unit_weights_are_the_unweighted_graph():
    rng = np.random.default_rng(11)
    p, _ = random_graph(rng, 6)
    t, _ = random_graph(rng, 5, mass=False)
    loss = StructuralLoss()
    plain = run(loss, dict(p, weights=None), dict(t, weights=None))
    ones = run(loss, dict(p, weights=np.ones(len(p["indices"]))),
               dict(t, weights=np.ones(len(t["indices"]))))
    assert_array_equal(plain.values, ones.values)
    assert_array_equal(plain.plan(0), ones.plan(0))
    g1, g2 = loss.backward(plain), loss.backward(ones)
    for name in FIELDS:
        assert_array_equal(getattr(g1, name), getattr(g2, name))


def test_folded_duplicate_edge_counts_its_weight():
    # 0 -> 1 twice with weight 1 is 0 -> 1 once with weight 2: same degrees,
    # same edge term
    kw = dict(labels=[97, 98, 99], mass=[1.0, 0.5, 0.8], activation=[0.1, 0.4, 0.9])
    twice = Graph([0, 2, 3, 3], [1, 1, 2], weights=[1.0, 1.0, 1.0], **kw)
    folded = Graph([0, 1, 2, 2], [1, 2], weights=[2.0, 1.0], **kw)
    target = Graph([0, 1, 2, 2], [1, 2], [97, 98, 99], activation=[0.2, 0.5, 0.7])
    loss = StructuralLoss()
    a, b = loss.forward(twice, target), loss.forward(folded, target)
    assert_allclose(a.values, b.values, rtol=1e-14)
    assert_allclose(a.plan(0), b.plan(0), rtol=1e-13, atol=1e-300)
    ga, gb = loss.backward(a), loss.backward(b)
    # d/dw of the folded edge = the gradient of either copy
    assert_allclose(ga.weights[[0, 1, 2]], gb.weights[[0, 0, 1]], rtol=1e-12)


def test_right_derivative_at_the_kinks():
    # identical unweighted chains: every degree ties (|d_i - d_j| = 0, the
    # max(d_i, d_j, 1) and the clique's max degree of 1); the gradient is
    # the right derivative, checked by one-sided second-order differences
    loss = StructuralLoss()
    graph = Graph.from_text("abcab").replace(activation=[0.1, 0.3, 0.5, 0.15, 0.35])
    target = Graph.from_text("abcab").replace(activation=[0.12, 0.28, 0.55, 0.1, 0.4])
    res = loss.forward(graph, target)
    grad = loss.backward(res)
    w0 = np.ones(graph.num_edges)

    def right(f, x, h=1e-6):
        out = np.empty_like(x)
        for i in range(x.size):
            def at(delta):
                z = x.copy()
                z[i] += delta
                return f(z)
            out[i] = (-3.0 * at(0.0) + 4.0 * at(h) - at(2 * h)) / (2 * h)
        return out

    num = right(lambda w: loss.forward(graph.replace(weights=w), target).value, w0)
    assert rel_error(num, grad.weights) <= 1e-5
    num = right(lambda w: loss.forward(graph, target.replace(weights=w)).value, w0)
    assert rel_error(num, grad.target_weights) <= 1e-5
    # the left derivative differs: this is a kink, and the convention matters
    left = -right(lambda w: loss.forward(graph.replace(weights=2 * w0 - w), target).value,
                  w0)
    assert rel_error(left, grad.weights) > 1e-3


def test_activation_kink_within_rounding_is_the_kink():
    """A node whose activation is a target's up to rounding (an ulp or two:
    the same mean computed by two kernels) takes the kink's derivative, 0,
    as one exactly on it does; central differences agree (they straddle
    the kink). Before, an ulp flipped that cell's part of the gradient from
    0 to +-(its plan mass x the activation weight): found as a data-parallel
    run that left the single-process run at 1e-6 after four steps."""
    loss = StructuralLoss()
    x = np.array([0.1, 0.3, 0.5, 0.15])
    target = Graph.from_text("abcd")
    graph = Graph.from_text("abcd").replace(activation=x)

    def grads(y):
        res = loss.forward(graph, target.replace(activation=y))
        return loss.backward(res)

    exact = grads(x.copy())
    for ulps in (1, 2, -3):
        y = x.copy()
        y[1] = x[1] + ulps * np.spacing(x[1])
        near = grads(y)
        for field in ("activation", "target_activation"):
            assert_allclose(getattr(near, field), getattr(exact, field), rtol=1e-9,
                            atol=1e-15, err_msg=f"{ulps} ulp: {field}")
    # on the kink, the node's gradient is central differences'
    for y in (x.copy(), np.nextafter(x, 1.0)):
        t = target.replace(activation=y)
        num = central(lambda v: loss.forward(graph.replace(activation=v), t).value, x)
        assert rel_error(num, loss.backward(loss.forward(graph, t)).activation) <= 1e-5
    # off the kink by more than rounding, the derivative is the slope's again
    y = x.copy()
    y[1] = x[1] * (1 + 1e-9)
    away = grads(y)
    assert abs(away.activation[1] - exact.activation[1]) > 0.1 * abs(away.activation[1])
