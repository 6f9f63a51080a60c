"""Scaling-form Sinkhorn against the log domain: same numbers, safe switch.

Agreement is normwise relative (``max|s - l| / max|l|`` per array, as
``grapheme.gradcheck`` measures), tolerance 1e-10. Batches avoid predicted
graphs whose masses are ALL zero below eps = 0.1: there the first sweep's
dustbin potential has slope ~eps e^{1/eps} in the total mass while, by gauge
invariance, the adjoint it multiplies is 0 in exact arithmetic, so the mass
gradient is rounding noise times e^{1/eps} in either domain (the clique term
jumps there as well; test_loss.py avoids the point for the same reason).
"""
import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from test_loss import (_check_gradients, _finite, _gradient_case, batch_fields,
                       loss_reference, random_graph, ref_kwargs, rel_error, run)

from grapheme import Graph
from grapheme.loss import StructuralLoss, _scaling_safe

AGREE = 1e-10
SIZES = [(3, 4), (0, 2), (5, 0), (0, 0), (1, 1), (8, 6), (2, 9), (30, 25), (12, 40), (40, 3)]


def _batch(seed, sizes=SIZES, all_zero=False):
    rng = np.random.default_rng(seed)
    ps, ts = [], []
    for n, m in sizes:
        # at least one positive predicted mass per non-empty graph, unless all_zero
        zero = n if all_zero else min(2, max(n - 1, 0))
        ps.append(random_graph(rng, n, zero_mass=zero)[0])
        ts.append(random_graph(rng, m, mass=False)[0])
    return batch_fields(ps), batch_fields(ts)


def _both(p, t, **kwargs):
    out = []
    for domain in ("log", "scaling"):
        loss = StructuralLoss(domain=domain, **kwargs)
        res = run(loss, p, t)
        out.append((res, loss.backward(res)))
    return out


def _assert_agree(p, t, rtol=AGREE, **kwargs):
    (rl, gl), (rs, gs) = _both(p, t, **kwargs)
    assert set(rl.domain) <= {"log"} and set(rs.domain) <= {"scaling"}
    assert_array_equal(rs.iterations, rl.iterations)
    assert_array_equal(rs.converged, rl.converged)
    for name in ("values", "nodes", "edges", "cliques"):
        assert rel_error(getattr(rs, name), getattr(rl, name)) <= rtol, name
    for b in range(rl.num_pairs):
        assert rel_error(rs.plan(b), rl.plan(b)) <= rtol, b
        # zero mass: the plan row is exactly 0 in both domains
        off = rl._cache.p.offsets
        a = rl._cache.p.mass[off[b]:off[b + 1]]
        assert np.all(rs.plan(b)[:-1][a == 0] == 0.0)
    # the marginal error is |1 - u/u'| vs |1 - exp((f - f')/eps)|: absolute
    assert_allclose(rs.marginal_error, rl.marginal_error, rtol=1e-6, atol=1e-12)
    for name in ("activation", "mass", "target_activation"):
        s, l = getattr(gs, name), getattr(gl, name)
        assert np.all(np.isfinite(s))
        assert rel_error(s, l) <= rtol, (name, rel_error(s, l))
    return rl, rs


# ------------------------------------------------------------ agreement
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("tol", [None, 1e-6])
@pytest.mark.parametrize("epsilon", [0.02, 0.05, 0.1, 0.3, 1.0])
def test_scaling_equals_log_on_random_batches(seed, tol, epsilon):
    p, t = _batch(seed)
    rl, rs = _assert_agree(p, t, epsilon=epsilon, tol=tol, iterations=25)
    if tol is not None:
        assert np.any(rs.iterations[rs.iterations > 0] < 25)  # the early stop is exercised


@pytest.mark.parametrize("tol", [None, 1e-6])
def test_scaling_equals_log_with_all_zero_predicted_masses(tol):
    p, t = _batch(11, sizes=[(3, 4), (1, 1), (4, 2), (2, 9)], all_zero=True)
    assert p["mass"].sum() == 0.0
    _assert_agree(p, t, epsilon=0.1, tol=tol)


def test_scaling_equals_log_other_weights():
    p, t = _batch(5)
    _assert_agree(p, t, alpha=0.7, beta=1.3, gamma=0.4, epsilon=0.08,
                  weights=(0.3, 0.5, 0.2), iterations=40)


def test_scaling_matches_reference():
    rng = np.random.default_rng(8)
    p, ep = random_graph(rng, 7, zero_mass=2)
    t, et = random_graph(rng, 5, mass=False)
    for tol in (None, 1e-4):
        loss = StructuralLoss(domain="scaling", tol=tol, iterations=30)
        res = run(loss, p, t)
        assert res.domain.tolist() == ["scaling"]
        ref = loss_reference.reference_pair(
            p["activation"], p["mass"], p["labels"], ep, t["activation"], t["mass"],
            t["labels"], et, **ref_kwargs(loss))
        assert_allclose(res.value, ref["value"], rtol=1e-10)
        assert_allclose(res.plan(0), ref["plan"], rtol=1e-10, atol=1e-14)
        assert res.iterations[0] == ref["iterations"]


def test_tiny_total_mass_still_scales_and_agrees():
    # |log T| = 184 + 3*10 <= 250: scaling, and exact
    rng = np.random.default_rng(3)
    p, _ = random_graph(rng, 5, zero_mass=1)
    t, _ = random_graph(rng, 4, mass=False)
    p["mass"] = p["mass"] * 1e-80
    t["mass"] = t["mass"] * 1e-80
    res = run(StructuralLoss(), p, t)
    assert res.domain.tolist() == ["scaling"]
    _assert_agree(p, t)


# ------------------------------------------------------------ gradients
@pytest.mark.parametrize("tol", [None, 1e-3])
@pytest.mark.parametrize("n,m,zero", [(5, 6, 2), (1, 3, 1), (7, 3, 3), (4, 4, 0), (3, 0, 1)])
def test_scaling_gradient_finite_differences(n, m, zero, tol):
    rng = np.random.default_rng(31 * n + m + zero)
    loss = StructuralLoss(tol=tol, domain="scaling")
    p, t, res, grad = _gradient_case(rng, n, m, zero, loss)
    assert res.domain.tolist() == ["scaling"]
    _check_gradients(loss, p, t, res, grad)


def test_scaling_gradient_batch():
    # (at eps = 0.05 a zero mass's boundary layer is narrower than the FD step
    # 1e-6 of _check_gradients; the analytic value is confirmed there by h -> 0)
    rng = np.random.default_rng(12)
    loss = StructuralLoss(domain="scaling")
    cases = [_gradient_case(rng, n, m, z, loss)[:2] for n, m, z in [(3, 4, 1), (5, 5, 2), (2, 3, 0)]]
    p = batch_fields([c[0] for c in cases])
    t = batch_fields([c[1] for c in cases])
    res = run(loss, p, t)
    _check_gradients(loss, p, t, res, loss.backward(res))


# ------------------------------------------------------------ the switch
def test_auto_picks_by_epsilon():
    p, t = _batch(0)
    assert set(run(StructuralLoss(epsilon=0.1), p, t).domain) == {"scaling"}
    assert set(run(StructuralLoss(epsilon=1e-3), p, t).domain) == {"log"}
    assert _scaling_safe(1e-3, (0.1, 0.7, 0.2), [0.0]).tolist() == [False]
    assert set(run(StructuralLoss(epsilon=0.1, domain="log"), p, t).domain) == {"log"}
    res = StructuralLoss().forward(Graph.from_texts(["abc", ""]), Graph.from_texts(["ab", ""]))
    assert res.domain.tolist() == ["scaling", "scaling"]  # no mass: by eps alone


def test_auto_switches_per_pair_on_total_mass():
    rng = np.random.default_rng(4)
    parts = [random_graph(rng, 4)[0] for _ in range(3)]
    parts[1]["mass"] = parts[1]["mass"] * 1e-120   # |log T| ~ 276 > 250 - 30
    tparts = [random_graph(rng, 3, mass=False)[0] for _ in range(3)]
    for tp in tparts:
        tp["mass"] = tp["mass"] * 1e-120 if tp is tparts[1] else tp["mass"]
    p, t = batch_fields(parts), batch_fields(tparts)
    res = run(StructuralLoss(), p, t)
    assert res.domain.tolist() == ["scaling", "log", "scaling"]
    _finite(res, StructuralLoss().backward(res))
    with pytest.raises(ValueError, match="domain.*pair 1"):
        run(StructuralLoss(domain="scaling"), p, t)


def test_scaling_safe_condition():
    w = (0.1, 0.7, 0.2)  # C_max = max(1, 0.95) = 1
    T = np.array([0.0, 1.0, 1.0, np.exp(-219.0), np.exp(221.0)])  # T = 0: eps only
    assert _scaling_safe(0.1, w, T).tolist() == [True, True, True, True, False]
    assert _scaling_safe(1 / 83, w, [1.0]).tolist() == [True]     # 3*83 = 249
    assert _scaling_safe(1 / 84, w, [1.0]).tolist() == [False]    # 252
    assert _scaling_safe(0.1, (1.0, 1.0, 1.0), [1.0]).tolist() == [True]   # 75
    assert _scaling_safe(0.01, (1.0, 1.0, 1.0), [1.0]).tolist() == [False]  # 750


@pytest.mark.parametrize("epsilon", [0.0125, 0.05, 0.1, 1.0])
def test_derived_bounds_hold_on_stored_potentials(epsilon):
    """|g| <= C_max and f + eps log T in [-C_max, 2 C_max] at every sweep."""
    for seed in range(3):
        p, t = _batch(seed)
        loss = StructuralLoss(epsilon=epsilon, iterations=40, domain="scaling")
        res = run(loss, p, t)
        c = res._cache
        for b in range(res.num_pairs):
            k = res.iterations[b]
            if k == 0:
                continue
            n = c.p.offsets[b + 1] - c.p.offsets[b]
            m = c.t.offsets[b + 1] - c.t.offsets[b]
            T = p["mass"][c.p.offsets[b]:c.p.offsets[b + 1]].sum() + m
            f = epsilon * np.log(c.fpot[c.f_off[b]:c.f_off[b] + k * (n + 1)])
            g = epsilon * np.log(c.gpot[c.g_off[b]:c.g_off[b] + k * (m + 1)])
            slack = 1e-12
            assert np.abs(g).max() <= 1.0 + slack
            shifted = f + epsilon * np.log(T)
            assert shifted.min() >= -1.0 - slack and shifted.max() <= 2.0 + slack


@pytest.mark.parametrize("epsilon", [1e-3, 1e-2, 0.1, 1.0])
@pytest.mark.parametrize("domain", ["auto", "log", "scaling"])
def test_no_nan_or_inf(epsilon, domain):
    rng = np.random.default_rng(99)
    cases = [(6, 7, 0), (0, 5, 0), (5, 0, 0), (0, 0, 0), (1, 1, 0), (6, 4, 6),
             (1, 200, 0), (200, 1, 0), (6, 4, 2)]
    p = batch_fields([random_graph(rng, n, zero_mass=z)[0] for n, _, z in cases])
    t = batch_fields([random_graph(rng, m, mass=False)[0] for _, m, _ in cases])
    for tol in (None, 1e-6):
        loss = StructuralLoss(epsilon=epsilon, tol=tol, domain=domain)
        if domain == "scaling" and epsilon < 0.012:
            with pytest.raises(ValueError, match="domain"):
                run(loss, p, t)
            continue
        res = run(loss, p, t)
        _finite(res, loss.backward(res))
        if domain == "auto":
            assert set(res.domain[[0, 4, 5, 6, 7, 8]]) == {"log" if epsilon < 0.012 else "scaling"}


# ------------------------------------------------------------ arguments
@pytest.mark.parametrize("domain,exc", [("Log", ValueError), ("", ValueError),
                                        (None, TypeError), (1, TypeError)])
def test_bad_domain(domain, exc):
    with pytest.raises(exc, match="domain"):
        StructuralLoss(domain=domain)


def test_domain_in_repr_and_default():
    assert StructuralLoss().domain == "auto"
    assert "domain='scaling'" in repr(StructuralLoss(domain="scaling"))
