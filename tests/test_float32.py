"""float32 when asked (issue 14, part 2; "float32" in docs/design.md).

A model's ``dtype`` (``Embedding(dtype=)``, ``Encoder(dtype=)``) is the
dtype of every (n, d) array of a step: the table, the lookup, the encoder,
the morph's features and their gradients, Adam's moments. Every per-node
and per-edge scalar (similarities, probabilities, masses, activations) and
the structural loss stay float64.

Agreement is norm-wise: ``|a32 - a64| <= 1e-5 |a64|``, the float32 run
starting from the float64 inputs rounded to float32. The hard estimators
(``history``, ``reinforce``) make discrete decisions: the inputs here keep
every similarity at least 1e-4 away from the threshold (asserted), so both
dtypes make the same decisions and the comparison is of like with like.
The finite-difference proofs stay in float64 (``tests/test_ops.py``).
"""
import math

import numpy as np
import pytest

import grapheme as gr
from grapheme import _core, _products, _relax, ops
from grapheme._validation import check_dtype
from grapheme._workspace import Workspace
from grapheme.loss import StructuralLoss
from grapheme.optim import Adam

RTOL = 1e-5


def close(a32, a64, rtol=RTOL, what=""):
    """Norm-wise agreement of a float32 result with the float64 one."""
    a32, a64 = np.asarray(a32), np.asarray(a64)
    assert a32.shape == a64.shape, what
    err = np.linalg.norm(a32.astype(np.float64) - a64)
    assert err <= rtol * np.linalg.norm(a64) + 1e-30, (what, err, np.linalg.norm(a64))


def _texts(rng, count, lo=4, hi=20):
    letters = np.array(list("abcdefgh"))
    return ["".join(letters[rng.integers(0, 8, int(n))]) for n in rng.integers(lo, hi, count)]


def _graph(seed=0, count=24, weighted=False):
    rng = np.random.default_rng(seed)
    g = gr.Graph.from_texts(_texts(rng, count))
    if weighted:
        g = g.replace(weights=rng.uniform(0.1, 2.0, g.num_edges))
    return g, rng


# ----------------------------------------------------------------- kernels
def _both(x):
    """``x`` rounded to float32, as float32 and as float64 (the same numbers)."""
    x32 = np.asarray(x, dtype=np.float32)
    return x32, x32.astype(np.float64)


@pytest.mark.parametrize("weighted", [False, True])
def test_encoder_kernels_float32_equal_float64(weighted):
    g, rng = _graph(1, weighted=weighted)
    edges, n, d = ops._both_ways(g), g.num_nodes, 7
    x32, x64 = _both(rng.normal(size=(n, d)))
    g32, g64 = _both(rng.normal(size=(n, d)))
    w32, w64 = _both(rng.normal(size=(3 * d, d)) / d)
    t32, t64 = _both(np.tanh(rng.normal(size=(n, d))))
    res = {}
    for dt, x, gr_, w, t in ((np.float32, x32, g32, w32, t32),
                             (np.float64, x64, g64, w64, t64)):
        cat, out, gw, gz, gb = (np.empty((n, 3 * d), dt), np.empty((n, d), dt),
                                np.empty((3 * d, d), dt), np.empty((n, d), dt),
                                np.empty(d, dt))
        scratch = np.empty((2, _products.ROWS, 3 * d), dt)
        parts = np.empty((-(-n // _products.TN_ROWS), 3 * d, d), dt)
        _core.stack_neighbours(*edges, x, cat)
        _products.stacked_matmul(*edges, x, w, out, gr_, scratch)
        _products.stacked_matmul_tn(*edges, x, gr_, gw, parts, scratch)
        _core.tanh_backward(t, gr_, gz, gb)
        res[dt] = (cat, out, gw, gz, gb)
    for k, (a, b) in enumerate(zip(res[np.float32], res[np.float64])):
        assert a.dtype == np.float32
        close(a, b, 1e-6, k)


def test_cosine_kernels_float32_equal_float64():
    g, rng = _graph(2)
    n, d, E = g.num_nodes, 9, g.num_edges
    q32, q64 = _both(rng.normal(size=(n, d)))
    k32, k64 = _both(rng.normal(size=(n, d)))
    gs = rng.normal(size=E)
    res = {}
    for dt, q, k in ((np.float32, q32, k32), (np.float64, q64, k64)):
        norms, sim = np.empty(n), np.empty(E)
        _core.edge_cosine(g.indptr, g.indices, q, norms, sim)
        gh = np.zeros((n, d), dt)
        _core.edge_cosine_backward(g.indptr, g.indices, q, norms, sim, gs, gh)
        qn, kn, qk = np.empty(n), np.empty(n), np.empty(E)
        _core.edge_cosine_qk(g.indptr, g.indices, q, k, qn, kn, qk)
        gq, gk = np.zeros((n, d), dt), np.zeros((n, d), dt)
        _core.edge_cosine_qk_backward(g.indptr, g.indices, q, k, qn, kn, qk, gs, gq, gk)
        res[dt] = (norms, sim, gh, qn, kn, qk, gq, gk)
    for k, (a, b) in enumerate(zip(res[np.float32], res[np.float64])):
        close(a, b, 1e-6, k)
    # the scalars are float64 and the dot products are summed in float64:
    # the float32 similarities equal the float64 ones of the same inputs
    np.testing.assert_allclose(res[np.float32][1], res[np.float64][1], rtol=1e-13)


@pytest.mark.parametrize("stream", [False, True])
def test_history_and_relaxation_kernels_float32_equal_float64(stream):
    rng = np.random.default_rng(3)
    n, d = 300, 6
    cluster = np.sort(rng.integers(0, 120, n)).astype(np.int64)
    history = gr.MergeHistory(np.unique(cluster, return_inverse=True)[1])
    x32, x64 = _both(rng.normal(size=(n, d)))
    y32, y64 = _both(rng.normal(size=(history.num_outputs, d)))
    m = rng.uniform(0, 1, n)
    gm = rng.normal(size=n)
    idx = rng.integers(0, 50, n)
    res = {}
    for dt, x, y in ((np.float32, x32, y32), (np.float64, x64, y64)):
        gathered, scattered = history.gather(x), history.scatter(y)
        assert gathered.dtype == dt and scattered.dtype == dt
        out, D, mass = np.empty((n, d), dt), np.empty(n), np.empty(n)
        _relax.relax_chain_forward(x, m, out, D, mass, stream)
        gh, grad_m = np.empty((n, d), dt), np.empty(n)
        _relax.relax_chain_backward(m, out, D, x, gm, gh, grad_m, stream)
        table = np.zeros((50, d), dt)
        _core.rows_add(idx, x, table)
        means = np.empty(n)
        if dt == np.float32:
            _core.row_means(x, means)
        else:
            means = x.mean(axis=1)
        res[dt] = (gathered, scattered, out, D, mass, gh, grad_m, means, table)
    for k, (a, b) in enumerate(zip(res[np.float32], res[np.float64])):
        close(a, b, 1e-6, k)


@pytest.mark.parametrize("d", [1, 3, 4, 5, 64, 67])
def test_row_means_sums_in_four_partial_sums(d):
    """row_means: each row summed in float64 in grapheme_dot_f's four
    interleaved partial sums (the tail into the first), bit for bit, and
    within float64 rounding of the exact mean."""
    x = np.random.default_rng(d).normal(size=(7, d)).astype(np.float32)
    means = np.empty(7)
    _core.row_means(x, means)
    for row, got in zip(x.astype(np.float64).tolist(), means.tolist()):
        s = [0.0, 0.0, 0.0, 0.0]
        k = d - d % 4
        for t in range(k):
            s[t % 4] += row[t]
        for t in range(k, d):
            s[0] += row[t]
        assert got == ((s[0] + s[1]) + (s[2] + s[3])) / d
        assert abs(got - math.fsum(row) / d) <= 1e-15 * sum(map(abs, row))


def test_row_means_checks_out_and_keeps_d_zero():
    with pytest.raises(ValueError, match="out must have 10 entries"):
        _core.row_means(np.ones((10, 4), np.float32), np.empty(1))
    out = np.full(3, 7.0)
    _core.row_means(np.ones((3, 0), np.float32), out)
    assert out.tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("at", range(5))
def test_relaxation_kernels_refuse_none(at):
    """None for any array is a TypeError, not a crash (naming the argument,
    or for a float32-or-float64 one, Cython's "No matching signature")."""
    H = np.ones((5, 4), np.float32)
    args = [H, np.full(5, 0.5), np.empty_like(H), np.empty(5), np.empty(5)]
    name = ["H", "m", "out", "D", "mass"][at]
    args[at] = None
    with pytest.raises(TypeError, match=f"'{name}' must not be None|No matching signature"):
        _relax.relax_chain_forward(*args)
    out, D, mass = np.empty_like(H), np.empty(5), np.empty(5)
    _relax.relax_chain_forward(H, np.full(5, 0.5), out, D, mass)
    args = [np.full(5, 0.5), out, D, H, np.zeros(5), np.empty_like(H), np.empty(5)]
    for k in range(len(args)):
        bad = list(args)
        bad[k] = None
        with pytest.raises(TypeError, match="must not be None|No matching signature"):
            _relax.relax_chain_backward(*bad)
    with pytest.raises(TypeError, match="'out' must not be None"):
        _core.row_means(H, None)


def test_relaxation_kernels_check_lengths():
    """An m longer than the rows (the blocks follow m) wrote past the other
    arrays' ends (a review helper's find): ValueError now."""
    H, m = np.ones((1, 4)), np.full(2_000_000, 0.5)
    with pytest.raises(ValueError, match="relax_chain_forward: the .n, d. arrays"):
        _relax.relax_chain_forward(H, m, np.empty((1, 4)), np.empty(1), np.empty(1))
    with pytest.raises(ValueError, match="relax_chain_backward"):
        _relax.relax_chain_backward(m, H, np.ones(1), H, np.ones(1), np.empty((1, 4)),
                                    np.empty(1))
    with pytest.raises(ValueError, match="one shape"):
        _relax.relax_chain_forward(np.ones((3, 4)), np.full(3, 0.5), np.empty((3, 5)),
                                   np.empty(3), np.empty(3))


@pytest.mark.parametrize("value", [1e30, 1e38, 3e38])
def test_float32_relaxation_does_not_overflow_on_finite_rows(value):
    """A long run of merged float32 rows near float32's largest value: the
    relaxed rows are convex combinations of them, so they stay finite, and
    agree with float64's on the same inputs (h_i + c_i h'_{i+1} would reach
    D_i times the entries and overflow float32)."""
    rng = np.random.default_rng(0)
    n, d = 2000, 8
    H = (value * rng.uniform(0.5, 1.0, (n, d))).astype(np.float32)
    H[::3] *= -1
    m = rng.uniform(0.9, 1.0, n)
    m[-1] = 0.0
    G = (rng.standard_normal((n, d)) / n).astype(np.float32)
    res = {}
    for dt in (np.float32, np.float64):
        x = H.astype(dt)
        out, D, mass = np.empty_like(x), np.empty(n), np.empty(n)
        _relax.relax_chain_forward(x, m, out, D, mass)
        grad, gm = np.empty_like(x), np.empty(n)
        _relax.relax_chain_backward(m, out, D, G.astype(dt), np.zeros(n), grad, gm)
        res[dt] = out, grad
    assert np.isfinite(res[np.float32][0]).all() and np.isfinite(res[np.float32][1]).all()
    for a, b in zip(res[np.float32], res[np.float64]):
        assert np.abs(a - b).max() <= 1e-6 * np.abs(b).max()
    # through the public morph: finite merged features in float32
    g = gr.Graph.from_text("a" * 50)
    for estimator in ("soft", "ste"):
        out = gr.Morpher(estimator=estimator).forward(g, np.full((50, 8), value, np.float32))
        assert out.graph.features.dtype == np.float32
        assert np.isfinite(out.graph.features).all()


def test_all_finite_float32():
    x = np.zeros(10000, np.float32)
    assert _core.all_finite(x)
    for bad in (np.inf, -np.inf, np.nan):
        y = x.copy()
        y[7777] = bad
        assert not _core.all_finite(y)
    assert _core.all_finite(np.array([np.finfo(np.float32).max, -np.finfo(np.float32).max],
                                     np.float32))


# ----------------------------------------------------------------- encoder
def _encoders(d, layers, seed=0):
    rng = np.random.default_rng(seed)
    e64 = gr.Encoder(d, layers)
    for name, p in e64.params.items():
        p += 0.3 * rng.normal(size=p.shape)
    e32 = gr.Encoder(d, layers, dtype=np.float32)
    e32.load_state_dict(e64.state_dict())
    # the float64 encoder gets the float32 weights: the same numbers in both
    e64.load_state_dict({k: v.astype(np.float64) for k, v in e32.state_dict().items()})
    return e32, e64


@pytest.mark.parametrize("layers", [0, 1, 2])
def test_encoder_forward_and_vjp_agree(layers):
    g, rng = _graph(6)
    d = 8
    e32, e64 = _encoders(d, layers)
    h32, h64 = _both(rng.normal(size=(g.num_nodes, d)))
    ups = [_both(rng.normal(size=(g.num_nodes, d))) for _ in range(3)]
    r32, s32 = e32.forward(g, h32)
    r64, s64 = e64.forward(g, h64)
    for a, b in zip(r32, r64):
        assert a.dtype == np.float32
        close(a, b)
    gh32, gw32 = e32.vjp(s32, *(u[0] for u in ups))
    gh64, gw64 = e64.vjp(s64, *(u[1] for u in ups))
    assert gh32.dtype == np.float32
    close(gh32, gh64)
    for name in gw64:
        assert gw32[name].dtype == np.float32, name
        close(gw32[name], gw64[name], what=name)


def test_encoder_converts_features_to_its_dtype():
    g, rng = _graph(7)
    e32 = gr.Encoder(4, 1, dtype="float32")
    r, _ = e32.forward(g, rng.normal(size=(g.num_nodes, 4)))    # float64 in
    assert r.features.dtype == r.queries.dtype == np.float32


def test_finite_values_beyond_float32_are_refused_not_made_inf():
    # found by an attack helper: a float32 morph turned a finite float64
    # upstream gradient of 1e39 into NaN gradients, and a float32 encoder
    # stored inf from a finite state, each silently
    from grapheme._validation import as_float_array

    big = np.array([1.0, -1e39, 2.0])
    for finite in (True, False):
        with pytest.raises(ValueError, match=r"^x has finite values beyond float32's range "
                                             r"\(magnitude at most 3.403e\+38; got -1e\+39\)"):
            as_float_array(big, "x", finite=finite, dtype=np.float32)
    # what is not finite stays as it is where that is allowed, and the
    # largest float32 is kept
    kept = as_float_array(np.array([np.inf, np.nan, 3.4e38]), "x", finite=False,
                          dtype=np.float32)
    assert np.isposinf(kept[0]) and np.isnan(kept[1]) and np.isfinite(kept[2])

    g, rng = _graph(3)
    h32 = rng.normal(size=(g.num_nodes, 4)).astype(np.float32)
    morpher = gr.Morpher(estimator="ste")
    out = morpher.forward(g, h32)
    with pytest.raises(ValueError, match="grad_features has finite values beyond float32"):
        morpher.vjp(out, grad_features=np.full(out.graph.features.shape, 1e39))

    state = gr.Encoder(4, 1).state_dict()
    state["layer0.bias"][:] = 1e300
    encoder = gr.Encoder(4, 1, dtype=np.float32)
    before = encoder.state_dict()
    with pytest.raises(ValueError, match="layer0.bias has finite values beyond float32"):
        encoder.load_state_dict(state)
    for name, value in encoder.state_dict().items():   # nothing was changed
        np.testing.assert_array_equal(value, before[name])


# ------------------------------------------------------------------- morph
def _morph_inputs(seed, d=6, routed=False):
    """Features (and routing) whose similarities keep clear of ``tau``."""
    g, rng = _graph(seed)
    h32, h64 = _both(rng.normal(size=(g.num_nodes, d)))
    route = None
    if routed:
        q, k = _both(rng.normal(size=(g.num_nodes, d))), _both(rng.normal(size=(g.num_nodes, d)))
        route = ((q[0], k[0]), (q[1], k[1]))
    return g, rng, (h32, h64), route


def _estimator(name):
    return gr.Reinforce(seed=3) if name == "reinforce" else name


@pytest.mark.parametrize("routed", [False, True], ids=["cosine", "routed"])
@pytest.mark.parametrize("name", ["history", "soft", "ste", "reinforce"])
def test_morph_forward_and_vjp_agree(name, routed):
    g, rng, (h32, h64), route = _morph_inputs(8, routed=routed)
    results = {}
    for dt, h, r in ((np.float32, h32, None if route is None else route[0]),
                     (np.float64, h64, None if route is None else route[1])):
        morpher = gr.Morpher(threshold=0.0, temperature=0.2, estimator=_estimator(name),
                             rate=0.5)
        m = morpher.forward(g, h, *(r or ()))
        assert m.graph.features.dtype == dt
        assert m.similarity.dtype == m.probability.dtype == np.float64
        results[dt] = (morpher, m)
    m32, m64 = results[np.float32][1], results[np.float64][1]
    assert np.abs(m64.similarity - m64.tau).min() > 1e-4     # no decision near tau
    np.testing.assert_array_equal(m32.decisions, m64.decisions)
    close(m32.similarity, m64.similarity)
    close(m32.probability, m64.probability)
    close(m32.graph.features, m64.graph.features)
    close(m32.graph.mass, m64.graph.mass)
    if m64.graph.weights is not None:
        close(m32.graph.weights, m64.graph.weights)
    k, d = m64.graph.features.shape
    gf32, gf64 = _both(rng.normal(size=(k, d)))
    gmass = rng.normal(size=k)
    gw = None if m64.graph.weights is None else rng.normal(size=m64.graph.num_edges)
    glp = None if m64.log_prob is None else rng.normal(size=m64.log_prob.shape)
    grads = {}
    for dt, gf in ((np.float32, gf32), (np.float64, gf64)):
        morpher, m = results[dt]
        grads[dt] = morpher.vjp(m, grad_features=gf, grad_mass=gmass, grad_weights=gw,
                                grad_log_prob=glp, grad_rate_penalty=1.0)
    a, b = grads[np.float32], grads[np.float64]
    assert a.features.dtype == np.float32 and a.theta.dtype == np.float64
    close(a.features, b.features)
    close(a.theta, b.theta)
    if routed:
        assert a.queries.dtype == a.keys.dtype == np.float32
        close(a.queries, b.queries)
        close(a.keys, b.keys)


def test_morph_out_buffer_has_the_features_dtype():
    g, rng, (h32, _), _ = _morph_inputs(9)
    morpher = gr.Morpher(estimator="ste")
    m = morpher.forward(g, h32)
    out = np.empty(h32.shape, np.float32)
    assert morpher.vjp(m, grad_mass=np.ones(g.num_nodes), out=out).features is out
    with pytest.raises(TypeError, match="out must have dtype float32"):
        morpher.vjp(m, grad_mass=np.ones(g.num_nodes), out=np.empty(h32.shape))


# -------------------------------------------------------------------- loss
@pytest.mark.parametrize("name", ["history", "ste", "soft"])
def test_loss_value_and_gradients_agree(name):
    g, rng, (h32, h64), _ = _morph_inputs(10)
    rng2 = np.random.default_rng(0)
    target = gr.Graph.from_texts(_texts(rng2, g.num_graphs))
    target = target.replace(activation=rng2.normal(size=target.num_nodes))
    loss = StructuralLoss.for_training()
    out = {}
    for dt, h in ((np.float32, h32), (np.float64, h64)):
        morpher = gr.Morpher(threshold=0.0, temperature=0.2, estimator=name)
        m = morpher.forward(g, h)
        res = loss.forward(m.graph, target)
        lg = loss.backward(res)
        assert lg.features.dtype == dt and lg.activation.dtype == np.float64
        grad = morpher.vjp(m, grad_features=lg.features, grad_mass=lg.mass,
                           grad_weights=lg.weights)
        out[dt] = (res.value, res.values, lg.features, lg.mass, lg.activation, grad.features,
                   grad.theta)
    for k, (a, b) in enumerate(zip(out[np.float32], out[np.float64])):
        close(a, b, what=k)


# ---------------------------------------------------------------- training
def _pairs(count=24, seed=0):
    rng = np.random.default_rng(seed)
    texts = _texts(rng, count, 6, 16)
    return texts, [t[:-1] for t in texts]


def _trainer(dtype, estimator="ste", layers=2, dim=12, **kwargs):
    return gr.Trainer(gr.Embedding(dim, seed=1, dtype=dtype), gr.Morpher(estimator=estimator),
                      StructuralLoss.for_training(), Adam(lr=3e-3), progress=False,
                      encoder=gr.Encoder(dim, layers, dtype=dtype) if layers else None,
                      **kwargs)


@pytest.mark.parametrize("estimator,layers", [("ste", 2), ("soft", 1), ("history", 0),
                                              ("history", 2), ("reinforce", 1)])
def test_training_steps_agree(estimator, layers):
    """Three steps from the same start (the float64 table is given the
    float32 one's numbers; the encoder starts at zero weights and identity
    projections in both). Every step's hard merge makes the same decisions
    in both dtypes (its output node count is compared), so the parameters
    are compared where the two runs did the same thing.

    The targets' activations are 1 (``target_activation="graph"``), not the
    table's row means: with those, an unmerged node's activation *equals*
    its target's, on the kink of the loss's ``min(|x - y|, 1)`` (derivative
    0 there by convention), and a relaxed node one float64 ulp off the
    kink in one dtype and on it in the other (a float32 row absorbs a merge
    weight below 6e-8) takes a different derivative: a discrete decision
    like a merge, not a precision loss."""
    inputs, targets = _pairs()
    t32, t64 = (_trainer(dt, estimator, layers, target_activation="graph")
                for dt in (np.float32, np.float64))
    for trainer in (t32, t64):
        trainer.embedding.rows([ord(c) for c in "abcdefgh"])   # every row, before the steps
    t64.embedding.weight[...] = t32.embedding.weight
    s32 = [t32.train_step(inputs, targets) for _ in range(3)]
    s64 = [t64.train_step(inputs, targets) for _ in range(3)]
    for a, b in zip(s32, s64):
        assert a["output_nodes"] == b["output_nodes"]
        close(a["loss"], b["loss"])
    p32, p64 = t32._params(), t64._params()
    assert set(p32) == set(p64)
    for name in p64:
        want = np.float64 if name == "theta" else np.float32
        assert p32[name].dtype == want, name
        close(p32[name], p64[name], what=name)


def test_float32_table_is_the_float64_one_rounded():
    e32, e64 = gr.Embedding(5, seed=3, dtype=np.float32), gr.Embedding(5, seed=3)
    codes = [ord(c) for c in "hello world"]
    np.testing.assert_array_equal(e32.forward(codes), e64.forward(codes).astype(np.float32))
    assert e32.forward(codes).dtype == np.float32
    assert e32.grad.dtype == np.float32
    e32.backward(codes, np.ones((len(codes), 5)))      # float64 gradient: converted
    assert e32.grad.dtype == np.float32


def test_a_float32_step_keeps_its_big_arrays_float32():
    """No silent upcast of an (n, d) array: every array of the step's
    workspace, every gradient the optimiser gets (theta, a scalar, apart)
    and every optimiser state is float32."""
    inputs, targets = _pairs()
    trainer = _trainer(np.float32, "ste", 2)
    seen = {}
    step = trainer.optimizer.step

    def spy(params, grads):
        seen.update({k: (params[k].dtype, np.asarray(g).dtype) for k, g in grads.items()})
        return step(params, grads)

    trainer.optimizer.step = spy
    trainer.train_step(inputs, targets)
    # the loss's plans and potentials (and the sweeps' stores of them) are
    # float64 whatever the model's dtype (per-pair scalars: see "float32"
    # in docs/design.md)
    transport = {"loss.plan", "loss.fpot", "loss.gpot", "loss.fstore", "loss.gstore"}
    arrays = trainer._workspace._arrays
    assert all(arrays[k].dtype == np.float64 for k in transport)
    arrays = {k: a for k, a in arrays.items() if k not in transport}
    # the layers' indices of the rows they read (the table's, then the
    # contexts'), the contexts' grouping, and nothing else
    ints = {k for k, a in arrays.items() if a.dtype.kind != "f"}
    assert ints == ({f"layer{i}.{k}" for i in (0, 1)
                     for k in ("mark", "used", "codes", "group", "order")}
                    | {f"encoder.{k}" for k in ("count", "order", "swap", "contexts0", "nodes0")})
    assert all(arrays[k].dtype == np.int64 for k in ints)
    arrays = {k: a for k, a in arrays.items() if k not in ints}
    assert arrays and all(a.dtype == np.float32 for a in arrays.values()), \
        {k: a.dtype for k, a in arrays.items()}
    for name, (p, g) in seen.items():
        want = np.float64 if name == "theta" else np.float32
        assert p == g == want, name
    for key, value in trainer.optimizer.state_dict().items():
        if isinstance(value, np.ndarray) and value.ndim:
            assert value.dtype == np.float32, key


def test_segmentation_pairs_train_in_float32():
    pairs = [("thegraph", ("the", "graph")), ("amodel", ("a", "model"))] * 4
    inputs, targets = [a for a, _ in pairs], [b for _, b in pairs]
    out = {}
    for dt in (np.float32, np.float64):
        trainer = _trainer(dt, "ste", 1)
        trainer.embedding.rows([ord(c) for c in "thegraphamodel"])
        if dt == np.float64:
            trainer.embedding.weight[...] = out[np.float32][1]
        table = trainer.embedding.weight.copy()
        stats = trainer.train_step(inputs, targets)
        out[dt] = (stats, table, trainer.embedding.weight.copy())
    close(out[np.float32][0]["loss"], out[np.float64][0]["loss"])
    close(out[np.float32][2], out[np.float64][2])


def test_sharded_float32_step_is_the_single_process_one():
    """The data-parallel step (one rank, no peers) of a float32 model: its
    gradients travel in the float64 all-reduce buffer (float32 converts to
    float64 exactly) and come back to float32 parameters."""
    from grapheme.distributed import Communicator

    class Alone(Communicator):
        def all_reduce(self, buffer):
            pass

    inputs, targets = _pairs()
    single, sharded = _trainer(np.float32, "ste", 1), _trainer(np.float32, "ste", 1,
                                                                comm=Alone())
    for _ in range(2):
        single.train_step(inputs, targets)
        sharded.train_step(inputs, targets)
    for name, p in single._params().items():
        q = sharded._params()[name]
        assert q.dtype == p.dtype
        close(q, p.astype(np.float64), what=name)


# ------------------------------------------------------------ save and load
def test_trainer_checkpoint_round_trips_the_dtype(tmp_path):
    inputs, targets = _pairs()
    # unknown_prob=0: the unknown row's draws follow the epoch (fit saves at
    # epoch ends), and these steps are taken by hand within one
    trainer = _trainer(np.float32, "ste", 1, unknown_prob=0.0)
    trainer.train_step(inputs, targets)
    path = tmp_path / "ckpt.npz"
    trainer.save(path)
    loaded = gr.Trainer.from_checkpoint(path, progress=False)
    assert loaded.embedding.dtype == loaded.encoder.dtype == np.float32
    assert loaded.config() == trainer.config()
    assert loaded.config()["embedding"]["dtype"] == "float32"
    np.testing.assert_array_equal(loaded.embedding.weight, trainer.embedding.weight)
    for key, value in trainer.optimizer.state_dict().items():
        np.testing.assert_array_equal(loaded.optimizer.state_dict()[key], value)
    # the resumed step is the uninterrupted one
    trainer.train_step(inputs, targets)
    loaded.train_step(inputs, targets)
    np.testing.assert_array_equal(loaded.embedding.weight, trainer.embedding.weight)
    for name, p in trainer.encoder.params.items():
        np.testing.assert_array_equal(loaded.encoder.params[name], p)
    # a float64 trainer refuses the float32 checkpoint, naming the dtype
    with pytest.raises(ValueError, match="float32"):
        _trainer(np.float64, "ste", 1).load(path)


def test_float64_descriptions_are_unchanged():
    """float64 is the default and is not written: descriptions (and the
    checkpoints and model files written before dtype existed) stay as they
    were."""
    assert gr.Embedding(4).get_params() == {"dim": 4, "seed": 0}
    assert gr.Encoder(4, 1).get_params() == {"dim": 4, "layers": 1}
    assert gr.Embedding(4, dtype="float32").get_params()["dtype"] == "float32"
    assert "dtype=float32" in repr(gr.Encoder(4, 1, dtype=np.float32))


def test_segmenter_model_round_trips_the_dtype(tmp_path):
    inputs, targets = _pairs()
    trainer = _trainer(np.float32, "ste", 1)
    trainer.train_step(inputs, targets)
    model = trainer.model
    model.save(tmp_path / "model.npz")
    loaded = gr.Segmenter.load(tmp_path / "model.npz")
    assert loaded.embedding.dtype == loaded.encoder.dtype == np.float32
    assert loaded.embedding.weight.dtype == np.float32
    assert loaded.segment(inputs) == model.segment(inputs)
    assert model.copy().embedding.dtype == np.float32


def test_cli_train_dtype_float32(tmp_path, capsys):
    from grapheme.cli import main

    data, run_dir = tmp_path / "data", tmp_path / "run"
    assert main(["generate", "--out", str(data), "--n-train", "16", "--n-val", "4"]) == 0
    assert main(["train", "--data", str(data), "--epochs", "1", "--out", str(run_dir),
                 "--encoder-layers", "1", "--dim", "8", "--dtype", "float32",
                 "--no-progress"]) == 0
    model = gr.Segmenter.load(run_dir / "checkpoint.npz")
    assert model.embedding.dtype == model.encoder.dtype == np.float32
    assert main(["segment", "--model", str(run_dir / "checkpoint.npz"), "abc"]) == 0
    assert main(["train", "--data", str(data), "--epochs", "2", "--out", str(run_dir),
                 "--resume", str(run_dir / "checkpoint.npz"), "--dtype", "float32",
                 "--no-progress"]) == 2
    assert "--dtype cannot be combined with --resume" in capsys.readouterr().err
    assert main(["train", "--data", str(data), "--epochs", "1", "--out", str(tmp_path / "x"),
                 "--dtype", "float16"]) == 2
    assert "--dtype: invalid choice: 'float16'" in capsys.readouterr().err


# ----------------------------------------------------------------- errors
BAD = [np.float16, np.int64, int, np.complex128, object, "float16", "double-ish", None]


@pytest.mark.parametrize("bad", BAD, ids=str)
def test_bad_dtypes_are_refused_naming_the_argument(bad):
    for make in (lambda: gr.Embedding(4, dtype=bad), lambda: gr.Encoder(4, 1, dtype=bad),
                 lambda: Workspace(bad), lambda: check_dtype(bad, "dtype")):
        with pytest.raises(TypeError, match="dtype must be float32 or float64"):
            make()


def test_accepted_spellings():
    for good in (np.float32, "float32", np.dtype("float32"), "f4"):
        assert check_dtype(good) == np.float32
    for good in (np.float64, float, "float64", "double"):
        assert check_dtype(good) == np.float64


def test_model_with_disagreeing_dtypes_is_refused():
    emb, enc = gr.Embedding(4), gr.Encoder(4, 1, dtype=np.float32)
    with pytest.raises(ValueError, match="encoder.dtype = float32 must equal "
                                         "embedding.dtype = float64"):
        gr.Segmenter(emb, gr.Morpher(), enc)
    with pytest.raises(ValueError, match="encoder.dtype"):
        gr.Trainer(emb, gr.Morpher(), StructuralLoss(), Adam(), encoder=enc, progress=False)


def test_embedding_checks_assigned_arrays_against_its_dtype():
    emb = gr.Embedding(3, dtype=np.float32)
    emb.rows([97])
    emb.weight = emb.weight.astype(np.float64)
    with pytest.raises(ValueError, match="Embedding.weight must be a float32 ndarray"):
        emb.forward([97])


# ------------------------------------------------------------------ torch
def test_torch_bridge_runs_float32_tensors_in_float32():
    """float32 tensors run the float32 path (features, encoder and merge in
    float32, the scalars in float64) and agree with float64 tensors."""
    torch = pytest.importorskip("torch")
    from grapheme.torch import Encoder, Merge

    rng = np.random.default_rng(11)
    x64 = torch.tensor(rng.normal(size=(9, 6)), requires_grad=True)
    x32 = x64.detach().float().requires_grad_(True)
    offsets = torch.tensor([0, 4, 9])
    torch.manual_seed(0)
    enc64 = Encoder(6, layers=2).double()
    with torch.no_grad():
        for p in enc64.parameters():
            p.add_(0.3 * torch.randn_like(p))
    enc32 = Encoder(6, layers=2).float()
    enc32.load_state_dict({k: v.float() for k, v in enc64.state_dict().items()})
    enc64.load_state_dict({k: v.double() for k, v in enc32.state_dict().items()})
    x64 = x32.detach().double().requires_grad_(True)
    out = {}
    for x, enc, dt in ((x32, enc32, torch.float32), (x64, enc64, torch.float64)):
        merge = Merge(threshold=-2.0, estimator="ste").to(dt)
        h, q, k = enc(x, offsets)
        merged, unpool, aux = merge(h, offsets, None, q, k)
        assert merged.dtype == dt
        (unpool(merged) ** 2).sum().backward()
        out[dt] = [x.grad, *(p.grad for p in enc.parameters()), merge.theta.grad]
    for a, b in zip(out[torch.float32], out[torch.float64]):
        assert a.dtype == torch.float32
        close(a.numpy(), b.numpy())
