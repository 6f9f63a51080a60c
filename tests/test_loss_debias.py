"""Gradients with respect to the target masses, the debiased structural loss
(``StructuralLoss(debias=True)``, a Sinkhorn divergence) and segmentation
targets.

Finite differences are float64 central differences (step 1e-6; second-order
one-sided at a zero mass, :func:`test_loss.mass_fd`) with a normwise relative
error of at most 1e-6, at points away from the activation kinks; every
perturbation is checked not to change the Sinkhorn iteration counts, so the
function differentiated is the one computed.
"""
import numpy as np
import pytest
from numpy.testing import assert_array_equal

from grapheme import StructuralLoss
from test_loss import away_from_kinks, batch_fields, mass_fd, random_graph, rel_error, run

FD_RTOL = 1e-6


def relaxed_pairs(seed, sizes):
    """Random batched pairs with masses in [0, 1] on both sides (some exactly
    0), edge weights in (0, 1) on the predicted side, activations away from
    the kinks."""
    rng = np.random.default_rng(seed)
    ps, ts = [], []
    for n, m in sizes:
        x, y = away_from_kinks(rng, n, m)
        p = random_graph(rng, n, act=x)[0]
        t = random_graph(rng, m, act=y)[0]
        p["mass"] = rng.uniform(0.0, 1.0, n)
        t["mass"] = rng.uniform(0.0, 1.0, m)
        p["weights"] = rng.uniform(0.05, 0.95, len(p["weights"]))
        if n > 1:
            p["mass"][-1] = 0.0
        if m > 1:
            t["mass"][0] = 0.0
        ps.append(p)
        ts.append(t)
    return batch_fields(ps), batch_fields(ts)


SIZES = [(5, 6), (4, 4), (3, 5), (0, 2), (3, 0)]
SETTINGS = [dict(tol=None, iterations=40), dict(tol=1e-3), dict(tol=1e-6),
            dict(tol=1e-4, balance=False, iterations=60)]


# ------------------------------------------------------------ target masses
@pytest.mark.parametrize("domain", ["log", "scaling"])
@pytest.mark.parametrize("settings", SETTINGS)
def test_target_mass_gradient_finite_differences(domain, settings):
    p, t = relaxed_pairs(0, SIZES)
    loss = StructuralLoss(domain=domain, **settings)
    res = run(loss, p, t)
    upstream = np.random.default_rng(1).normal(size=len(SIZES))
    grad = loss.backward(res, upstream)

    def f(b):
        tt = dict(t, mass=b)
        out = run(loss, p, tt)
        assert_array_equal(out.iterations, res.iterations)
        return float(np.dot(upstream, out.values))

    num = mass_fd(f, t["mass"])
    assert grad.target_mass.shape == t["mass"].shape
    assert rel_error(num, grad.target_mass) <= FD_RTOL
    assert np.abs(num).max() > 0


def test_target_mass_gradient_other_settings():
    p, t = relaxed_pairs(2, [(6, 5), (3, 3)])
    loss = StructuralLoss(alpha=0.6, beta=2.0, gamma=1.5, epsilon=0.3, iterations=15,
                          tol=None, weights=(0.2, 0.5, 0.3))
    res = run(loss, p, t)
    grad = loss.backward(res)
    num = mass_fd(lambda b: run(loss, p, dict(t, mass=b)).value, t["mass"])
    assert rel_error(num, grad.target_mass) <= FD_RTOL
