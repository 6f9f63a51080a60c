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

from grapheme import (Embedding, Graph, StructuralLoss, contract, merge_edges,
                      segmentation_target)
from grapheme.testing import numerical_gradient as central  # float64, step 1e-6
from test_loss_weights import objective
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


# ------------------------------------------------------------ debiased loss
def _debiased_fd(loss, p, t, upstream, fields):
    res = run(loss, p, t)
    grad = loss.backward(res, upstream)
    make = objective(loss, res, upstream)
    for side, key, ana in fields(grad):
        f = make(p, t, side, key)
        x = (p if side == "p" else t)[key]
        num = (mass_fd if key == "mass" else central)(f, x)
        assert ana.shape == x.shape
        err = rel_error(num, ana)
        assert err <= FD_RTOL, (side, key, err)
        if x.size:
            assert np.abs(num).max() > 0, (side, key)
    return res, grad


def all_fields(grad):
    return (("p", "activation", grad.activation), ("p", "mass", grad.mass),
            ("p", "weights", grad.weights), ("t", "activation", grad.target_activation),
            ("t", "mass", grad.target_mass), ("t", "weights", grad.target_weights))


def positive_masses(p, t, seed):
    """Masses in [0.05, 1]: a zero mass of a self pair (p, p) sits in a
    boundary layer of width ~exp(-1/eps) that a 1e-6 step does not resolve
    (see test_debiased_gradient_at_a_zero_mass)."""
    rng = np.random.default_rng(seed)
    return (dict(p, mass=rng.uniform(0.05, 1.0, len(p["mass"]))),
            dict(t, mass=rng.uniform(0.05, 1.0, len(t["mass"]))))


@pytest.mark.parametrize("domain", ["log", "scaling"])
@pytest.mark.parametrize("settings", SETTINGS)
def test_debiased_gradient_finite_differences(domain, settings):
    p, t = positive_masses(*relaxed_pairs(3, SIZES), seed=4)
    loss = StructuralLoss(debias=True, domain=domain, **settings)
    upstream = np.random.default_rng(5).normal(size=len(SIZES))
    res, _ = _debiased_fd(loss, p, t, upstream, all_fields)
    assert set(res.domain) == {domain}


def test_debiased_gradient_other_settings_and_mean():
    p, t = positive_masses(*relaxed_pairs(6, [(6, 5), (3, 3), (4, 7)]), seed=7)
    loss = StructuralLoss(debias=True, alpha=0.6, beta=2.0, gamma=1.5, epsilon=0.3,
                          weights=(0.2, 0.5, 0.3))
    _debiased_fd(loss, p, t, 1.0, all_fields)


def test_debiased_gradient_at_a_zero_mass():
    # the boundary layer at a zero mass is narrower than a 1e-6 step (here
    # the target's zero mass has a derivative of ~9e4): second-order
    # one-sided differences converge to the analytic value as the step
    # shrinks (error / 100 per step / 10), at 1e-8 and 1e-11 within 1e-6
    p, t = relaxed_pairs(0, [(5, 6)])
    assert p["mass"][-1] == 0.0 and t["mass"][0] == 0.0
    loss = StructuralLoss(debias=True, tol=None, iterations=300)
    res = run(loss, p, t)
    grad = loss.backward(res)
    for side, k, ana, h in (("p", -1, grad.mass, 1e-8), ("t", 0, grad.target_mass, 1e-11)):
        def at(z):
            pp, tt = dict(p), dict(t)
            g = pp if side == "p" else tt
            g["mass"] = g["mass"].copy()
            g["mass"][k] = z
            return run(loss, pp, tt).value
        num = (-3.0 * at(0.0) + 4.0 * at(h) - at(2 * h)) / (2 * h)
        assert abs(num - ana[k]) <= 1e-6 * abs(ana[k]), (side, num, ana[k])


def test_debiased_is_the_combination_of_three_plain_losses():
    p, t = relaxed_pairs(8, [(4, 5), (3, 3), (0, 2)])
    deb = run(StructuralLoss(debias=True), p, t)
    plain = StructuralLoss()
    pt, pp, tt = run(plain, p, t), run(plain, p, p), run(plain, t, t)
    for name in ("values", "nodes", "edges", "cliques"):
        expect = getattr(pt, name) - 0.5 * getattr(pp, name) - 0.5 * getattr(tt, name)
        assert_array_equal(getattr(deb, name), expect)       # per pair, bit for bit
    assert deb.value == deb.values.mean()
    assert_array_equal(deb.iterations, pt.iterations + pp.iterations + tt.iterations)
    assert_array_equal(deb.converged, pt.converged & pp.converged & tt.converged)
    for b in range(3):
        assert_array_equal(deb.plan(b), pt.plan(b))          # the (p, t) transport


def test_debiased_self_pair_gradient_vanishes():
    # D(p, p) = 0 for every p, so its gradient with respect to p (both slots
    # moving together) is 0 for the activations and masses. (Not for the
    # edge weights: at t = p the degree cost |d_i - d_i^t| of L(p, t) has its
    # kink, where the right derivative is taken, so D has a kink minimum in
    # the weights at the gold graph.)
    p, _ = relaxed_pairs(9, [(5, 5), (3, 3)])
    loss = StructuralLoss(debias=True)
    res = run(loss, p, p)
    assert_array_equal(res.values, 0.0)
    grad = loss.backward(res)
    scale = max(np.abs(grad.mass).max(), np.abs(grad.activation).max())
    assert scale > 0
    for key, g in (("activation", grad.activation + grad.target_activation),
                   ("mass", grad.mass + grad.target_mass)):
        assert np.abs(g).max() <= 1e-12 * scale, key


def test_debiased_weight_gradient_at_tied_degrees_is_the_right_derivative():
    # unit-weight chains: every interior out-degree is 1, so the self
    # pairs (p, p) and (t, t) tie off their diagonal everywhere. Those
    # ties must keep the right derivative (two out-degrees share no
    # weight); only the diagonal |d_i - d_i| is 0 on both sides. Zeroing
    # every tie of a self pair was up to 20% off here. Second-order
    # one-sided differences (step 1e-6) of a fixed number of sweeps.
    rng = np.random.default_rng(5)
    p = Graph.from_texts(["abcab", "ab", "aabbc", "x", "abcd"])
    t = Graph.from_texts(["ab", "b", "abc", "xy", "ab"])
    p = p.replace(activation=rng.random(p.num_nodes), weights=np.ones(p.num_edges))
    t = t.replace(activation=rng.random(t.num_nodes), weights=np.ones(t.num_edges))
    loss = StructuralLoss(debias=True, tol=None, iterations=300)
    grad = loss.backward(loss.forward(p, t))
    h = 1e-6
    for side, analytic in (("p", grad.weights), ("t", grad.target_weights)):
        graph = p if side == "p" else t
        right = np.empty(graph.num_edges)
        for k in range(graph.num_edges):
            def at(step):
                w = graph.weights.copy()
                w[k] += step
                moved = graph.replace(weights=w)
                pair = (moved, t) if side == "p" else (p, moved)
                return loss.forward(*pair).value
            right[k] = (-3.0 * at(0.0) + 4.0 * at(h) - at(2 * h)) / (2 * h)
        assert np.abs(analytic - right).max() <= 1e-6 * np.abs(right).max(), side


def test_debias_default_off_and_validated():
    assert StructuralLoss().debias is False
    assert "debias=False" in repr(StructuralLoss())
    assert StructuralLoss(debias=True).get_params()["debias"] is True
    with pytest.raises(TypeError, match="debias"):
        StructuralLoss(debias="yes")
    p, t = relaxed_pairs(1, [(3, 4)])
    with pytest.raises(ValueError, match="batch sizes must match"):
        StructuralLoss(debias=True).forward(Graph(**p), Graph.from_texts(["ab", "cd"]))


# ------------------------------------------------------------ segmentation targets
TEXTS = {"thequickfox": ["the", "quick", "fox"],
         "helloworld": ["hello", "world"],
         "aaabbb": ["aaa", "bbb"],
         "x": ["x"],
         "abcabc": ["a", "b", "c", "a", "b", "c"],
         "segmentation": ["segmentation"]}


def _merged(graph, segments, features):
    """The prediction of a model that merges exactly the edges inside the
    given segments (Hard path: merge_edges, then contract)."""
    inside = np.ones(graph.num_edges, bool)
    ends = np.cumsum([len(s) for segs in segments for s in segs])
    src = graph.edge_sources()
    inside[np.isin(src + 1, ends)] = False      # the edge leaving a segment's last node
    return contract(graph, merge_edges(graph, inside), features)


def test_loss_is_zero_at_the_gold_segmentation():
    texts = list(TEXTS)
    gold = [TEXTS[s] for s in texts]
    graph = Graph.from_texts(texts)
    features = Embedding(dim=8, seed=0).forward(graph.labels)
    target = segmentation_target(graph, gold, features)
    predicted = _merged(graph, gold, features)
    assert target.to_text() == "".join(s[0] for segs in gold for s in segs)
    loss = StructuralLoss(debias=True)
    res = loss.forward(predicted, target)
    assert res.value == 0.0
    assert_array_equal(res.values, 0.0)
    assert res.converged.all()
    # the plain loss is not 0 there: that is the entropic bias removed
    assert (StructuralLoss().forward(predicted, target).values > 0).all()


def test_loss_is_positive_at_a_wrong_segmentation():
    texts = ["thequickfox", "helloworld", "aaabbb", "abcabc"]
    gold = [TEXTS[s] for s in texts]
    wrong = [["th", "equick", "fox"], ["hello", "wor", "ld"], ["aaabbb"],
             ["ab", "c", "a", "b", "c"]]
    graph = Graph.from_texts(texts)
    features = Embedding(dim=8, seed=1).forward(graph.labels)
    target = segmentation_target(graph, gold, features)
    res = StructuralLoss(debias=True).forward(_merged(graph, wrong, features), target)
    assert (res.values > 0).all()
    assert (res.nodes > 0).all()           # the OT part alone
    # as ranks go, the gold segmentation wins for every text
    gold_res = StructuralLoss(debias=True).forward(_merged(graph, gold, features), target)
    assert (gold_res.values < res.values).all()


def test_segmentation_target_lengths_and_texts_agree():
    graph = Graph.from_texts(["thequickfox", "ab"])
    by_text = segmentation_target(graph, [["the", "quick", "fox"], ["a", "b"]])
    by_length = segmentation_target(graph, [[3, 5, 3], np.array([1, 1])])
    assert by_text.to_text() == by_length.to_text() == "tqfab"
    assert_array_equal(by_text.indptr, by_length.indptr)
    assert_array_equal(by_text.indices, by_length.indices)
    assert_array_equal(by_text.graph_offsets, [0, 3, 5])
    assert_array_equal(by_text.indices, [1, 2, 4])
    single = segmentation_target(Graph.from_text("abc"), [2, 1])
    assert single.offsets is None and single.to_text() == "ac"
    feats = np.arange(6.0).reshape(3, 2)
    assert_array_equal(segmentation_target(Graph.from_text("abc"), [2, 1], feats).features,
                       [[1.0, 2.0], [4.0, 5.0]])


@pytest.mark.parametrize("graph,segments,exc,match", [
    (Graph.from_text("abc"), [2, 2], ValueError, r"segments sum to 4 but the graph has 3"),
    (Graph.from_text("abc"), [3, 0], ValueError, r"segments\[1\] = 0; segment lengths"),
    (Graph.from_text("abc"), [4, -1], ValueError, r"segments\[1\] = -1"),
    (Graph.from_text("abc"), ["ab", "d"], ValueError, r"segments spell 'abd'"),
    (Graph.from_text("abc"), ["abc", ""], ValueError, r"segments\[1\] is empty"),
    (Graph.from_text("abc"), "abc", TypeError, r"segments must be a sequence"),
    (Graph.from_text("abc"), [1.5, 1.5], TypeError, r"positive int lengths"),
    (Graph.from_text("abc"), [True, 2], TypeError, r"positive int lengths"),
    (Graph.from_text("abc"), ["ab", 1], TypeError, r"positive int lengths or strs"),
    (Graph.from_texts(["ab", "c"]), [[2]], ValueError, r"1 sequences but graph holds 2"),
    (Graph.from_texts(["ab", "c"]), [[2], [2]], ValueError,
     r"segments\[1\] sum to 2 but the graph has 1"),
    (Graph.from_texts(["ab", "c"]), [[2], "c"], TypeError, r"segments\[1\] must be a sequence"),
    (Graph.from_texts(["ab", "c"]), 5, TypeError, r"segments must be a sequence"),
])
def test_segmentation_target_validation(graph, segments, exc, match):
    with pytest.raises(exc, match=match):
        segmentation_target(graph, segments)


@pytest.mark.parametrize("text,gold", [("thequickfox", [3, 5, 3]), ("aaabbb", [3, 3]),
                                       ("abcabc", [1] * 6), ("segment", [7])])
def test_gold_is_the_unique_minimum_over_every_segmentation(text, gold):
    n = len(text)
    cuts = (np.arange(2 ** (n - 1))[:, None] >> np.arange(n - 1)) & 1
    segs = [np.diff(np.concatenate([[0], np.flatnonzero(c) + 1, [n]])).tolist()
            for c in cuts]
    batch = Graph.from_texts([text] * len(segs))
    features = np.tile(Embedding(dim=32, seed=0).forward(Graph.from_text(text).labels),
                       (len(segs), 1))
    values = StructuralLoss(debias=True).forward(
        segmentation_target(batch, segs, features),
        segmentation_target(batch, [gold] * len(segs), features)).values
    g = segs.index(gold)
    assert values[g] == 0.0
    assert (np.delete(values, g) > 0.02).all()
