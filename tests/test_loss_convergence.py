"""The converged default: storage that follows the sweeps run, the original
20-iteration protocol unchanged, and exact gradients through the balancing
step with the tolerance stopping rule active."""
import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from test_loss import away_from_kinks, batch_fields, random_graph, run

from grapheme import Embedding, Graph, gradcheck
from grapheme.loss import StructuralLoss


def _text_batch(seed, count=200, lo=2, hi=30, dim=64):
    """Random text pairs with the Trainer's default activations: the feature
    means of a random embedding (predicted) and its row means (target)."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    texts = ["".join(rng.choice(letters, int(rng.integers(lo, hi + 1))))
             for _ in range(2 * count)]
    emb = Embedding(dim=dim, seed=seed)
    p = Graph.from_texts(texts[:count])
    t = Graph.from_texts(texts[count:])
    rows, t_rows = emb.rows(p.labels), emb.rows(t.labels)
    p = p._with(features=emb.weight[rows])
    t = t._with(activation=emb.weight.mean(axis=1)[t_rows])
    return p, t


def _stored_sizes(res):
    """Doubles the forward pass stored for the backward pass: exactly the
    potentials of the sweeps performed."""
    c = res._cache
    n1 = np.diff(c.p.offsets) + 1
    m1 = np.diff(c.t.offsets) + 1
    return c.fpot.size, c.gpot.size, int(res.iterations @ n1), int(res.iterations @ m1)


# ------------------------------------------------------------ the default
def test_default_converges_on_random_text_pairs():
    p, t = _text_batch(0, count=500)
    res = StructuralLoss().forward(p, t)
    assert res.converged.all()
    assert res.marginal_error.max() <= 1e-6
    assert res.iterations.max() <= 60          # measured: mean 8, max 23 on 1000 pairs
    # the original protocol leaves many of the same pairs far from a plan
    old = StructuralLoss(iterations=20, tol=None).forward(p, t)
    assert np.quantile(old.marginal_error, 0.9) > 1e-2


def test_balance_is_the_difference():
    p, t = _text_batch(1, count=200)
    plain = StructuralLoss(balance=False).forward(p, t)
    bal = StructuralLoss().forward(p, t)
    assert bal.iterations.sum() * 3 < plain.iterations.sum()
    # the same fixed point: values agree to the tolerance's order where both converged
    both = plain.converged & bal.converged
    assert both.sum() > 150
    assert_allclose(bal.values[both], plain.values[both], rtol=0, atol=1e-4)


# ------------------------------------------------------------ the cap costs nothing
@pytest.mark.parametrize("domain", ["log", "scaling"])
def test_storage_follows_the_sweeps_not_the_cap(domain):
    p, t = _text_batch(2, count=100)
    sizes = []
    for cap in (200, 2000, 20000):
        res = StructuralLoss(iterations=cap, tol=1e-6, domain=domain).forward(p, t)
        f, g, f_used, g_used = _stored_sizes(res)
        assert (f, g) == (f_used, g_used)
        assert res.converged.all()
        sizes.append((f, g, res.iterations.tolist()))
    assert sizes[0] == sizes[1] == sizes[2]
    # and it grows when the sweeps do: no tol runs (and stores) every sweep
    res = StructuralLoss(iterations=50, tol=None, domain=domain).forward(p, t)
    f, g, f_used, g_used = _stored_sizes(res)
    assert (f, g) == (f_used, g_used) and f == 50 * int((np.diff(p.graph_offsets) + 1).sum())


# ------------------------------------------------------------ the original protocol
# StructuralLoss(iterations=20, tol=None) at commit 82b1c8a (before the
# balanced default), on the batch of _old_batch()
OLD_VALUES = {
    "log": [3.4682057494922502, 3.8610091492543477, 3.655294527606608,
            3.852728513761186, 10.953150953935669, 4.167906315015545, 6.892817080546636],
    "scaling": [3.468205749492251, 3.861009149254347, 3.655294527606608,
                3.8527285137611873, 10.95315095393567, 4.167906315015544, 6.892817080546636],
}
OLD_ERRORS = {
    "log": [0.00029456197744526236, 0.09670648785526426, 0.0, 0.20436162721732476,
            0.00011563401538887997, 8.86091826354768e-11, 0.004761008182379789],
    "scaling": [0.0002945619774474828, 0.09670648785526426, 0.0, 0.20436162721732543,
                0.00011563401538783544, 8.860845390756822e-11, 0.00476100818237879],
}
OLD_GRAD_SUMS = {   # activation, mass, target_activation, weights, target_weights
    "log": [0.28110226990828835, -0.2703366144339674, -0.2811022699082883,
            0.06254091769978766, -0.1123588165143162],
    "scaling": [0.2811022699082881, -0.27033661443397033, -0.281102269908288,
                0.0625409176997875, -0.11235881651431608],
}


def _old_batch():
    rng = np.random.default_rng(2024)
    ps, ts = [], []
    for n, m in [(3, 4), (5, 5), (0, 2), (6, 6), (8, 3), (1, 1), (7, 9)]:
        ps.append(random_graph(rng, n, zero_mass=1 if n > 2 else 0)[0])
        ts.append(random_graph(rng, m, mass=False)[0])
    return batch_fields(ps), batch_fields(ts)


@pytest.mark.parametrize("domain", ["log", "scaling"])
def test_original_protocol_gives_the_old_numbers(domain):
    p, t = _old_batch()
    loss = StructuralLoss(iterations=20, tol=None, domain=domain)
    res = run(loss, p, t)
    g = loss.backward(res)
    assert_array_equal(res.iterations, 20)
    assert_allclose(res.values, OLD_VALUES[domain], rtol=1e-15, atol=0)
    # the error is a difference of near-equal sums: since the scaling form's
    # row sums take four partial sums (the sweep's dot products run at the
    # adder's throughput) it moves in the 12th digit, less than the log and
    # scaling forms differ from each other
    assert_allclose(res.marginal_error, OLD_ERRORS[domain], rtol=1e-11, atol=0)
    sums = [g.activation.sum(), g.mass.sum(), g.target_activation.sum(),
            g.weights.sum(), g.target_weights.sum()]
    assert_allclose(sums, OLD_GRAD_SUMS[domain], rtol=1e-14, atol=0)


# ------------------------------------------------------------ exact gradients
def _balanced_case(seed, n, m):
    rng = np.random.default_rng(seed)
    x, y = away_from_kinks(rng, n, m)
    p, _ = random_graph(rng, n, act=x)
    t, _ = random_graph(rng, m, mass=False, act=y)
    return p, t


@pytest.mark.parametrize("domain", ["log", "scaling"])
@pytest.mark.parametrize("seed,n,m", [(0, 5, 5), (1, 4, 6), (2, 7, 3), (3, 6, 6)])
def test_gradient_through_balancing_with_tol(domain, seed, n, m):
    """float64 central differences, 1e-6 relative, the stopping rule active:
    every perturbed run stops at the same sweep (away from the switch)."""
    p, t = _balanced_case(seed, n, m)
    loss = StructuralLoss(domain=domain)           # the default: tol 1e-6, balanced
    res = run(loss, p, t)
    assert res.converged[0] and res.iterations[0] > 2
    grad = loss.backward(res)

    def value(**change):
        pp, tt = dict(p), dict(t)
        for k, v in change.items():
            (tt if k == "target_activation" else pp)[k.replace("target_", "")] = v
        out = run(loss, pp, tt)
        assert_array_equal(out.iterations, res.iterations)
        return out.value

    for name, x0, g in [("activation", p["activation"], grad.activation),
                        ("target_activation", t["activation"], grad.target_activation),
                        ("mass", p["mass"], grad.mass)]:
        r = gradcheck(lambda v: (value(**{name: v}), g), x0, rtol=1e-6)
        assert r.ok, (name, r.error)


def test_balancing_gradient_at_the_ends_of_the_doubles():
    """A balancing step from a subnormal insertion mass (epsilon 1e-3: every
    e_nj ~ exp(-740)) and one near the 5e149 mass limit (4 s r overflowed):
    the adjoint divided by x, and inf * 0 made every gradient NaN or inf
    while the value stayed finite (found by a numerical reviewer, 32 of 200
    random pairs at 1e-3)."""
    cases = [(StructuralLoss(epsilon=1e-3),
              Graph.from_text("ccc").replace(activation=[0.2, 0.4, -0.8]),
              Graph.from_text("aabb").replace(activation=[-0.1, 0.8, -0.2, -0.3]), 1e-6),
             (StructuralLoss(epsilon=1e-2),
              Graph.from_text("ccc").replace(mass=[1e140, 2e140, 1e140]),
              Graph.from_text("ab").replace(mass=[1e140, 1e140]), 1e134)]
    for loss, p, t, h in cases:
        grad = loss.backward(loss.forward(p, t))
        for name in ("activation", "mass"):
            r = gradcheck(lambda v: (loss.forward(p.replace(**{name: v}), t).value,
                                     getattr(grad, name)),
                          getattr(p, name), eps=h, rtol=1e-6)
            assert r.ok, (name, r.error)
    rng = np.random.default_rng(0)
    loss = StructuralLoss(epsilon=1e-3)
    for _ in range(100):
        a, b = ("".join(rng.choice(list("abc"), int(rng.integers(1, 5)))) for _ in range(2))
        p = Graph.from_text(a).replace(activation=rng.uniform(-1, 1, len(a)))
        t = Graph.from_text(b).replace(activation=rng.uniform(-1, 1, len(b)))
        grad = loss.backward(loss.forward(p, t))
        assert all(np.isfinite(g).all() for g in grad if isinstance(g, np.ndarray))


def _equal_totals_mass_gradient(epsilon, balance, h=1e-6):
    """d loss / d mass[0] of "abcd" against "abce" (unit masses: A == B)
    and its central difference."""
    emb = Embedding(4, seed=0)
    p, t = Graph.from_text("abcd"), Graph.from_text("abce")
    p = p.replace(activation=emb.forward(p.labels).mean(axis=1) + 0.01 * np.arange(4))
    t = t.replace(activation=emb.forward(t.labels).mean(axis=1))
    loss = StructuralLoss(epsilon=epsilon, balance=balance)
    grad = loss.backward(loss.forward(p, t)).mass[0]
    d = np.array([1.0, 0.0, 0.0, 0.0])
    value = [loss.forward(p.replace(mass=p.mass + s * d), t).value for s in (h, -h)]
    return grad, (value[0] - value[1]) / (2 * h)


@pytest.mark.parametrize("epsilon, balance", [(0.1, None), (0.02, False)])
def test_mass_gradient_where_the_totals_are_equal(epsilon, balance):
    """Where docs/design.md ("Where balancing is ill-conditioned") says the
    mass gradient is sound at A == B: the default epsilon balanced, and a
    small epsilon unbalanced. (Balanced at 0.02 it is 457, 1582 in the log
    domain, against a central difference of 0.087: measured, not fixed.)"""
    grad, fd = _equal_totals_mass_gradient(epsilon, balance)
    assert grad == pytest.approx(fd, rel=2e-3)


@pytest.mark.parametrize("domain", ["auto", "log"])
@pytest.mark.parametrize("epsilon", [0.1, 0.05])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_mass_gradient_of_a_prediction_without_mass(n, epsilon, domain):
    """A numerical review's find: with every predicted mass 0 the row error
    (weighted by mass) met tol after the first sweep, whose f came from
    g = 0; the rows without mass kept that f, and their mass gradient was
    -2689 where one-sided differences of the converged loss give -0.74
    (-6.8e7 against -0.88 at epsilon 0.05). gamma = 0: the clique term
    jumps where the total mass leaves 0 (see StructuralLoss). Below 0.05
    rounding grows as e^(1/epsilon) 1e-16 (docs/design.md, "A prediction
    without mass"): 0.06 off at 0.03, measured, not fixed."""
    rng = np.random.default_rng(n)
    p = Graph.from_text("abc"[:n]).replace(activation=rng.uniform(-0.5, 0.5, n),
                                           mass=np.zeros(n))
    t = Graph.from_text("ab").replace(activation=[0.5, -0.1], mass=[1.0, 3.6])
    loss = StructuralLoss(epsilon=epsilon, gamma=0.0, domain=domain)
    grad = loss.backward(loss.forward(p, t)).mass
    exact = StructuralLoss(epsilon=epsilon, gamma=0.0, tol=None, iterations=500, domain="log")
    h, base = 1e-8, exact.forward(p, t).value
    fd = [(exact.forward(p.replace(mass=h * np.eye(n)[i]), t).value - base) / h
          for i in range(n)]
    assert_allclose(grad, fd, rtol=1e-5)


@pytest.mark.parametrize("domain", ["log", "scaling"])
@pytest.mark.parametrize("tol", [1e-6, None])
def test_one_sweep_with_a_row_without_mass_is_not_converged(tol, domain):
    """A row without mass is not weighed by the row error, and after one
    sweep its potential is still the starting one: one sweep is reported
    converged only when every row has mass (stop 38 left this alone)."""
    t = Graph.from_text("ab").replace(activation=[0.5, -0.1], mass=[1.0, 3.6])
    p = Graph.from_text("ab").replace(activation=[0.5, -0.1])
    one = StructuralLoss(iterations=1, tol=tol, domain=domain)
    for mass in ([0.0, 0.0], [1.0, 0.0]):
        res = one.forward(p.replace(mass=mass), t)
        assert res.iterations[0] == 1 and not res.converged[0]
        # the error reported is the rows with mass's, the massless one unweighed
        a = np.append(mass, 4.6)   # the dustbin row holds the target's mass
        rows = res.plan(0).sum(axis=1)
        assert res.marginal_error[0] == pytest.approx(np.abs(rows - a)[a > 0].max(),
                                                      rel=1e-9, abs=1e-15)
    # every row with mass, and one sweep is exact: a single node each
    q = Graph.from_text("a").replace(activation=[0.5], mass=[2.0])
    u = Graph.from_text("a").replace(activation=[0.5], mass=[2.0])
    res = one.forward(q, u)
    assert res.iterations[0] == 1 and res.converged[0]


def test_balance_parameter():
    assert StructuralLoss()._balances() and not StructuralLoss(tol=None)._balances()
    assert not StructuralLoss(balance=False)._balances()
    assert StructuralLoss(tol=None, balance=True)._balances()
    assert "balance=None" in repr(StructuralLoss())
    assert StructuralLoss(balance=True).get_params()["balance"] is True
    with pytest.raises(TypeError, match="balance"):
        StructuralLoss(balance="yes")
