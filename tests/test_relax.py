"""Chain relaxation kernels against a plain numpy reference and finite differences."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from grapheme import _core
from grapheme._estimators import relax_chain as forward
from grapheme._estimators import relax_chain_backward as backward


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
    m[-1] = 0.0
    return H, m


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


def test_backward_in_place_over_grad_out():
    rng = np.random.default_rng(6)
    H, m = random_chain(rng, 30, 4)
    out, D, mass = forward(H, m)
    g = rng.standard_normal(out.shape)
    gmass = rng.standard_normal(30)
    gH, gm = backward(m, out, D, g, gmass)
    buf = g.copy()
    gm2 = np.empty(30)
    _core.relax_chain_backward(m, out, D, buf, gmass, buf, gm2)
    np.testing.assert_array_equal(buf, gH)
    np.testing.assert_array_equal(gm2, gm)
