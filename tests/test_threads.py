"""Threads inside the kernels: the same results, bit for bit, whatever the
thread count (see the "Threads" section of docs/design.md).

The structural loss runs the pairs of a batch in parallel (OpenMP). Every
pair is computed by one thread in a fixed order, so values, plans,
potentials and gradients must be *equal* (not close) under 1, 2 and 3
threads, and so must the parameters after a whole training step. So must
the encoder's row kernels and products, and the chain relaxation (its
independent segments by blocks) with its relaxed edges. Skipped
where grapheme was built without OpenMP; there, a test checks that the
serial build accepts the same settings and gives the same numbers.
"""
import os
import platform

import numpy as np
import pytest

import grapheme as gr
from grapheme import _core

needs_openmp = pytest.mark.skipif(not gr.openmp_enabled(),
                                  reason="grapheme was built without OpenMP")


def _texts(rng, count, lo=2, hi=25):
    letters = np.array(list("abcdefghij"))   # few letters: labels often match
    return ["".join(letters[rng.integers(0, 10, int(n))])
            for n in rng.integers(lo, hi, count)]


def _batch(seed, count=64, empty=True):
    """A batch of text pairs large enough to run in parallel (tens of
    thousands of plan cells), with a few degenerate pairs: an empty
    predicted graph, an empty target, and a pair without mass."""
    rng = np.random.default_rng(seed)
    emb = gr.Embedding(dim=8, seed=seed)
    inputs, targets = _texts(rng, count), _texts(rng, count)
    if empty:
        inputs[3], targets[5] = "", ""
    p, t = gr.Graph.from_texts(inputs), gr.Graph.from_texts(targets)
    mass = rng.uniform(0.0, 1.0, p.num_nodes)
    if empty:
        a, b = p.graph_offsets[7], p.graph_offsets[8]
        mass[a:b] = 0.0
        c, d = t.graph_offsets[7], t.graph_offsets[8]
        t = t.replace(mass=np.where(np.arange(t.num_nodes) >= c,
                                    np.where(np.arange(t.num_nodes) < d, 0.0, 1.0), 1.0))
    p = p.replace(activation=emb.forward(p.labels).mean(axis=1), mass=mass)
    t = t.replace(activation=emb.forward(t.labels).mean(axis=1))
    return p, t


def _run(loss, p, t, grad=1.0):
    res = loss.forward(p, t)
    g = loss.backward(res, grad)
    c = res._cache
    return [res.values, res.nodes, res.edges, res.cliques, res.iterations,
            res.converged, res.marginal_error, c.plan, c.fpot, c.gpot, c.f_off,
            c.g_off, *g[:6]]


def _assert_identical(runs):
    first = runs[0]
    for other in runs[1:]:
        assert len(first) == len(other)
        for k, (a, b) in enumerate(zip(first, other)):
            assert a.dtype == b.dtype and a.shape == b.shape, k
            # bit for bit: equal values and equal bits (so -0.0 vs 0.0 and
            # NaN payloads count too)
            assert a.tobytes() == b.tobytes(), f"output {k} differs"


SETTINGS = [
    {},                                          # converged, balanced, scaling form
    {"domain": "log"},
    {"iterations": 20, "tol": None},             # the original protocol
    {"debias": True},
    {"epsilon": 1e-3},                           # log domain, saturating exps
]


@needs_openmp
@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(s) or "default")
def test_loss_bit_identical_across_thread_counts(settings):
    p, t = _batch(0)
    grad = np.random.default_rng(1).normal(size=p.num_graphs)
    runs = [_run(gr.StructuralLoss(num_threads=k, **settings), p, t, grad)
            for k in (1, 2, 3)]
    _assert_identical(runs)


@needs_openmp
def test_loss_follows_threadpoolctl_and_is_identical():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    p, t = _batch(2)
    loss = gr.StructuralLoss()                   # num_threads=None: OpenMP's default
    with threadpoolctl.threadpool_limits(limits=1, user_api="openmp"):
        assert _core.openmp_threads() == 1
        serial = _run(loss, p, t)
    with threadpoolctl.threadpool_limits(limits=2, user_api="openmp"):
        assert _core.openmp_threads() == 2
        parallel = _run(loss, p, t)
    _assert_identical([serial, parallel])


@needs_openmp
def test_more_threads_than_pairs_and_tiny_batches():
    # clamped to the pairs; a batch below the threshold runs serially
    for count in (1, 2, 5):
        p, t = _batch(3, count=count, empty=False)
        runs = [_run(gr.StructuralLoss(num_threads=k), p, t) for k in (1, 8)]
        _assert_identical(runs)


@needs_openmp
@pytest.mark.parametrize("estimator", ["ste", "soft", "history"])
def test_training_steps_bit_identical(estimator):
    """Three training steps (encoder, morph, loss, optimiser): the
    parameters are equal bit for bit with the loss on 1 and 2 threads."""
    rng = np.random.default_rng(4)
    inputs = _texts(rng, 96, 12, 25)
    targets = [s[:-1] for s in inputs]

    def train(threads):
        trainer = gr.Trainer(gr.Embedding(dim=16, seed=0), gr.Morpher(estimator=estimator),
                             gr.StructuralLoss(num_threads=threads), gr.Adam(lr=1e-2),
                             seed=0, progress=False, encoder=gr.Encoder(16, layers=2))
        stats = [trainer.train_step(inputs, targets) for _ in range(3)]
        params = trainer._params()
        return [np.array([s["loss"], s["grad_norm"]]) for s in stats] + [
            np.asarray(params[k]) for k in sorted(params)]

    _assert_identical([train(1), train(2)])


@needs_openmp
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("weighted", [False, True])
def test_encoder_kernels_bit_identical_across_thread_counts(weighted, dtype):
    """The encoder's row-parallel kernels (neighbour sums, alone and fused
    into the layer's products, the tanh derivative and its fixed-block
    column sums) on thousands of rows, so that every thread gets blocks."""
    from grapheme import _products, ops

    rng = np.random.default_rng(5)
    g = gr.Graph.from_texts(_texts(rng, 400, 12, 25))
    if weighted:
        g = g.replace(weights=rng.uniform(0.1, 2.0, g.num_edges))
    edges, n, d = ops._both_ways(g), g.num_nodes, 16
    assert n > 3 * 1024      # every thread gets rows
    x, grad, w = (rng.normal(size=s).astype(dtype) for s in ((n, d), (n, d), (3 * d, d)))
    t = np.tanh(x)
    runs = []
    for k in (1, 2, 3):
        cat, out, row, gz, gb, gw, t2, h2 = (np.empty(s, dtype) for s in (
            (n, 3 * d), (n, d), (n, d), (n, d), d, (3 * d, d), (n, d), (n, d)))
        scratch = np.empty((k, _products.ROWS, 3 * d), dtype)
        parts = np.empty((-(-n // _products.TN_ROWS), 3 * d, d), dtype)
        _core.stack_neighbours(*edges, x, cat, num_threads=k)
        _products.stacked_matmul(*edges, x, w, out, grad, scratch, num_threads=k)
        _products.stacked_matmul(*edges, x, w, row, grad[:1], scratch, num_threads=k)
        if _products.NUMPY_TANH:      # a layer's whole forward: tanh and residual
            _products.stacked_matmul(*edges, x, w, t2, grad[:1], scratch, num_threads=k,
                                     residual=h2)
        _products.stacked_matmul_tn(*edges, x, grad, gw, parts, scratch, num_threads=k)
        _core.tanh_backward(t, grad, gz, gb, num_threads=k)
        runs.append([cat, out, row, gw, gz, gb, t2, h2])
    _assert_identical(runs)


@needs_openmp
def test_encoder_follows_threadpoolctl_and_is_identical():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    rng = np.random.default_rng(6)
    g = gr.Graph.from_texts(_texts(rng, 300, 12, 25))
    enc = gr.Encoder(8, layers=2)
    for v in enc.params.values():
        v += rng.normal(scale=0.3, size=v.shape)
    H, G = rng.normal(size=(g.num_nodes, 8)), rng.normal(size=(g.num_nodes, 8))

    def run():
        r, saved = enc.forward(g, H)
        grad_h, grads = enc.vjp(saved, G, G, G)
        return [*r, grad_h, *(grads[k] for k in sorted(grads))]

    with threadpoolctl.threadpool_limits(limits=1, user_api="openmp"):
        serial = run()
    with threadpoolctl.threadpool_limits(limits=2, user_api="openmp"):
        parallel = run()
    _assert_identical([serial, parallel])


@needs_openmp
def test_encoder_bits_do_not_follow_blas_threads():
    """The products' blocks call BLAS on one thread whatever OpenMP's and
    BLAS's counts, so a layer's bits are the same under every mix: a weight
    gradient's block product ((1024, 96) x (1024, 32) at n = 5000) differs
    between BLAS on one thread and on two."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from grapheme import ops

    rng = np.random.default_rng(8)
    g = gr.Graph.from_text("".join(rng.choice(list("abcdefgh"), 5000)))
    H, G = rng.normal(size=(5000, 32)), rng.normal(size=(5000, 32))
    W = [rng.normal(scale=0.3, size=(32, 32)) for _ in range(3)]
    runs = []
    for omp, blas in [(1, 1), (1, 2), (2, 1), (2, 2)]:
        with threadpoolctl.threadpool_limits(limits=omp, user_api="openmp"), \
                threadpoolctl.threadpool_limits(limits=blas, user_api="blas"):
            (h,), saved = ops.MessagePassing().forward(g, H, *W, np.zeros(32))
            runs.append([h, *ops.MessagePassing().vjp(saved, G)])
    _assert_identical(runs)


def _blas_threads():
    from threadpoolctl import threadpool_info

    return max(lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas")


@needs_openmp
def test_blas_steps_aside_while_openmp_runs_the_products():
    """With an encoder a step runs its products on grapheme's OpenMP threads
    (row blocks, one single-threaded BLAS call each), so BLAS runs one
    thread inside the step, whatever OpenMP's count (a block's bits must
    not depend on BLAS's threads), and OpenMP keeps its default; without an
    encoder nothing changes; the setting is restored after the step.
    Inference and the encoder called directly do the same."""
    from threadpoolctl import threadpool_limits
    from grapheme import ops
    from grapheme._threads import single_pool

    seen = []

    def recording(loss):
        forward = loss._forward     # under forward, and the Trainer's step

        def wrapped(*args, **kwargs):
            seen.append((_blas_threads(), _core.openmp_threads()))
            return forward(*args, **kwargs)
        loss._forward = wrapped
        return loss

    rng = np.random.default_rng(7)
    inputs = _texts(rng, 8, 4, 9)
    targets = [s[:-1] for s in inputs]
    with threadpool_limits(limits=2, user_api="openmp"):
        for omp, encoder, want in [(2, True, (1, 2)), (1, True, (1, 1)),
                                   (2, False, (2, 2))]:
            with threadpool_limits(limits=omp, user_api="openmp"), \
                    threadpool_limits(limits=2, user_api="blas"):
                trainer = gr.Trainer(gr.Embedding(dim=8, seed=0), gr.Morpher(),
                                     recording(gr.StructuralLoss()), gr.Adam(lr=1e-2),
                                     seed=0, progress=False,
                                     encoder=gr.Encoder(8, layers=1) if encoder else None)
                seen.clear()
                trainer.train_step(inputs, targets)
                trainer.evaluate(list(zip(inputs, targets)))
                assert seen == [want, want], (omp, encoder)
                assert (_blas_threads(), _core.openmp_threads()) == (2, omp)
                with single_pool(active=False):
                    assert _blas_threads() == 2
                # inference too
                model = trainer.model
                decide = model.morpher.decide
                inside = []

                def recording_decide(*args, **kwargs):
                    inside.append((_blas_threads(), _core.openmp_threads()))
                    return decide(*args, **kwargs)
                model.morpher.decide = recording_decide
                model.boundaries(inputs)
                assert inside == [want]
                del model.morpher.decide
        # the encoder called directly steps aside the same way
        g = gr.Graph.from_texts(inputs)
        forward = ops.MessagePassing._forward    # the encoder's layers call it

        def recording_layer(self, *args, **kwargs):
            seen.append(_blas_threads())
            return forward(self, *args, **kwargs)
        try:
            ops.MessagePassing._forward = recording_layer
            for blas, want in [(2, 1), (1, 1)]:
                with threadpool_limits(limits=blas, user_api="blas"):
                    seen.clear()
                    gr.Encoder(8, layers=1).forward(g, np.ones((g.num_nodes, 8)))
                    assert seen == [want]
        finally:
            ops.MessagePassing._forward = forward
        # and so does every operation whose products run in OpenMP blocks,
        # called by itself (as the PyTorch bridge calls them)
        from grapheme import _products
        names = ("matmul", "matmul_tn", "stacked_matmul", "stacked_matmul_tn")
        kernels, inside = {name: getattr(_products, name) for name in names}, []

        def recording(kernel):
            def call(*args, **kwargs):
                inside.append((kernel.__name__, _blas_threads()))
                return kernel(*args, **kwargs)
            return call
        try:
            for name, kernel in kernels.items():
                setattr(_products, name, recording(kernel))
            with threadpool_limits(limits=2, user_api="blas"):
                W, b = np.zeros((8, 8)), np.zeros(8)
                H = np.ones((g.num_nodes, 8))
                _, saved = ops.MessagePassing().forward(g, H, W, W, W, b)
                ops.MessagePassing().vjp(saved, H)
                _, saved = ops.Linear().forward(H, W)
                ops.Linear().vjp(saved, H)
                assert _blas_threads() == 2
            # the layer: forward, input gradient, weight gradient; the
            # projection: the same three
            assert inside == [("stacked_matmul", 1), ("stacked_matmul", 1),
                              ("stacked_matmul_tn", 1), ("matmul", 1), ("matmul", 1),
                              ("matmul_tn", 1)]
        finally:
            for name, kernel in kernels.items():
                setattr(_products, name, kernel)


@needs_openmp
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("n, k, m", [(0, 3, 2), (1, 1, 1), (255, 7, 5), (256, 4, 3),
                                     (2500, 24, 8), (3000, 0, 4)])
def test_products_by_row_blocks(n, k, m, dtype):
    """The encoder's products (``grapheme._products``) against numpy, and
    the same bytes on 1, 2 and 3 threads (fixed blocks, partial products
    added in block order)."""
    from grapheme import _products

    rng = np.random.default_rng(n + k + m)
    a = rng.normal(size=(n, k)).astype(dtype)
    b = rng.normal(size=(k, m)).astype(dtype)
    g = rng.normal(size=(n, m)).astype(dtype)
    init = rng.normal(size=(n, m)).astype(dtype)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    blocks = max(-(-n // _products.TN_ROWS), 1)
    runs = []
    for threads in (1, 2, 3):
        out, out_t = np.full((n, m), np.nan, dtype), np.full((n, m), np.nan, dtype)
        _products.matmul(a, b, out, num_threads=threads)
        _products.matmul(a, np.ascontiguousarray(b.T), out_t, True, threads)
        tn = np.full((k, m), np.nan, dtype)
        _products.matmul_tn(a, g, tn, np.empty((blocks, k, m), dtype), threads)
        np.testing.assert_allclose(out, a @ b, rtol=tol, atol=tol * max(k, 1))
        np.testing.assert_allclose(out_t, a @ b, rtol=tol, atol=tol * max(k, 1))
        np.testing.assert_allclose(tn, a.T @ g, rtol=tol, atol=tol * max(n, 1))
        # on top of init, and accumulating into out itself
        out_i, acc = np.full((n, m), np.nan, dtype), init.copy()
        _products.matmul(a, b, out_i, num_threads=threads, init=init)
        _products.matmul(a, np.ascontiguousarray(b.T), acc, True, threads, init=acc)
        np.testing.assert_allclose(out_i, a @ b + init, rtol=tol, atol=tol * max(k, 1))
        np.testing.assert_array_equal(acc, out_i)
        runs.append([out, out_t, tn, out_i])
    _assert_identical(runs)


def test_products_check_their_shapes():
    from grapheme import _products

    a, b = np.ones((4, 3)), np.ones((3, 2))
    with pytest.raises(ValueError, match="disagree"):
        _products.matmul(a, b, np.empty((4, 3)))
    with pytest.raises(ValueError, match="disagree"):
        _products.matmul(a, b, np.empty((4, 2)), True)
    with pytest.raises(ValueError, match=r"init must have out's shape \(4, 2\)"):
        _products.matmul(a, b, np.empty((4, 2)), init=np.ones((3, 2)))
    buf = np.zeros((5, 2))   # init a shifted view of out: blocks would race
    with pytest.raises(ValueError, match="init must be out itself or overlap nothing"):
        _products.matmul(a, b, buf[1:], init=buf[:-1])
    with pytest.raises(ValueError, match="disagree"):
        _products.matmul_tn(a, np.ones((5, 2)), np.empty((3, 2)), np.empty((1, 3, 2)))
    with pytest.raises(ValueError, match="parts"):
        _products.matmul_tn(a, np.ones((4, 2)), np.empty((3, 2)), np.empty((0, 3, 2)))


def test_matmul_without_openmp_takes_init_that_is_a_view_of_out(monkeypatch):
    from grapheme import ops

    monkeypatch.setattr(_core, "openmp_threads", lambda: 0)
    a, b = np.arange(12.0).reshape(4, 3), np.ones((3, 2))
    out = np.ones((4, 2))
    ops._matmul(a, b, out, init=out[...])    # not `out` itself, the same memory
    np.testing.assert_array_equal(out, a @ b + 1)


# ------------------------------------------------------- chain relaxation
# The relaxation kernels (grapheme/_relax.pyx) run independent segments of
# the chain (cut where a merge weight is 0) by blocks of ~1024 nodes, and the
# relaxed edges by blocks of nodes. Against plain-Python mirrors of the
# serial kernels as they were before the threads (the same float operations
# in the same order), so "identical" means: to the serial code, and to
# itself on 1, 2 and 3 threads. Exact where the C compiler does not fuse
# multiply-adds (x86-64 builds, -O3 without -march); elsewhere to 1e-12.
EXACT_FLOATS = platform.machine().lower() in ("x86_64", "amd64")


def _serial_relax_forward(H, m):
    """relax_chain_forward's serial recursion, row by row (a float32 row in
    float32 arithmetic, the weights rounded once)."""
    n, d = H.shape
    f32 = H.dtype == np.float32
    out, D = np.empty_like(H), np.empty(n)
    dn, prev = 1.0, None
    for i in range(n - 1, -1, -1):
        h = H[i] if f32 else H[i].astype(np.float64)
        if i == n - 1:
            dn = 1.0
            row = h
        else:
            c = float(m[i]) * dn
            dn = 1.0 + c
            if c == 0.0:
                row = h
            elif f32:
                inv = 1.0 / dn
                row = h * np.float32(inv) + prev * np.float32(c * inv)
            else:
                row = (h + c * prev) * (1.0 / dn)
        D[i] = dn
        out[i] = row
        prev = out[i].copy()
    mass = np.ones(n)
    mass[1:] = 1.0 - m[:-1]
    return out, D, mass


def _dot4(a, b):
    """grapheme_dot_f's float64 arithmetic: the products in float64, summed
    in four interleaved partial sums, the tail into the first."""
    x = (a.astype(np.float64) * b.astype(np.float64)).tolist()
    s = [0.0, 0.0, 0.0, 0.0]
    k = len(x) - len(x) % 4
    for t in range(k):
        s[t % 4] = s[t % 4] + x[t]
    for t in range(k, len(x)):
        s[0] = s[0] + x[t]
    return (s[0] + s[1]) + (s[2] + s[3])


def _dot1(a, b):
    """One chain of additions, the float64 kernels' order."""
    s = 0.0
    for x in (a * b).tolist():
        s = s + x
    return s


def _serial_relax_backward(m, out, D, G, gmass):
    """relax_chain_backward's serial recursion as it was (kap carried as
    m_{i-1} kap_{i-1} through zeros too; the same for finite gradients).
    float64 sums its dot products in one chain, float32 in four partial
    sums (grapheme_dot_f) and updates its rows in float32 arithmetic."""
    n, d = out.shape
    f32 = out.dtype == np.float32
    dot_of = _dot4 if f32 else _dot1
    gH, gm = np.empty_like(out), np.empty(n)
    kap, mprev, prev = 0.0, 0.0, None
    for i in range(n):
        o, g = out[i].astype(np.float64), G[i].astype(np.float64)
        inv = 1.0 / D[i]
        dot = dot_of(g, o)
        if f32:   # float32 products and sum, the weights rounded once
            lam = G[i] * np.float32(inv)
            gH[i] = lam if mprev == 0.0 else lam + np.float32(mprev) * prev
            prev = gH[i].copy()
        else:
            gH[i] = g * inv if mprev == 0.0 else g * inv + mprev * prev
            prev = gH[i].astype(np.float64)
        kap = mprev * kap - dot * inv
        if i + 1 < n:
            # lam_i . h'_{i+1}
            s = dot_of(gH[i], out[i + 1])
            gm[i] = float(D[i + 1]) * (s + kap) - float(gmass[i + 1])
            mprev = float(m[i])
        else:
            gm[i] = 0.0
    return gH, gm


def _serial_relaxed_edges(m, indptr):
    """relaxed_edges' weights, node by node."""
    m = m.tolist()
    weights = []
    for i in range(len(m)):
        mu = 1.0 - m[i - 1] if i > 0 else 1.0
        P = 1.0
        for l in range(int(indptr[i + 1] - indptr[i])):
            weights.append(mu * P * (1.0 - m[i + l]))
            P *= m[i + l]
    return np.array(weights)


def _serial_relaxed_edges_backward(m, indptr, grad_w):
    """relaxed_edges_backward, node by node into zeros."""
    n = len(m)
    m, grad_w, indptr = m.tolist(), grad_w.tolist(), indptr.tolist()
    grad_m = [0.0] * n
    for i in range(n):
        e, L = indptr[i], indptr[i + 1] - indptr[i]
        if L == 0:
            continue
        mu = 1.0 - m[i - 1] if i > 0 else 1.0
        P = [1.0] * L
        for l in range(1, L):
            P[l] = P[l - 1] * m[i + l - 1]
        A = gmu = 0.0
        for l in range(L - 1, -1, -1):
            g, q = grad_w[e + l], 1.0 - m[i + l]
            grad_m[i + l] += mu * P[l] * (A - g)
            gmu += g * P[l] * q
            A = g * q + m[i + l] * A
        if i > 0:
            grad_m[i - 1] -= gmu
    return np.array(grad_m)


def _relax_problem(case, dtype, d=6):
    """A chain-shaped graph, edge weights, features and upstream gradients.

    "batch": 300 texts of 1-40 characters, weights in [0, 1] with exact 0s
    and 1s (many cuts); "chain": one text of 2600 characters, weights in
    (0, 1] with exact 1s and no 0 (one block, however many threads);
    "mixed": long texts without zero weights between short ones (some blocks
    merge with the next, some do not)."""
    rng = np.random.default_rng({"batch": 10, "chain": 11, "mixed": 12}[case])
    if case == "batch":
        texts = _texts(rng, 300, 1, 40)
    elif case == "chain":
        texts = _texts(rng, 1, 2600, 2601)
    else:
        texts = [t for k in (1500, 2300, 700, 1100) for t in _texts(rng, 3, 1, 6) +
                 _texts(rng, 1, k, k + 1)]
    g = gr.Graph.from_texts(texts)
    merge = rng.uniform(0.05, 1.0, g.num_edges)
    kind = rng.integers(0, 8, g.num_edges)
    merge[kind == 1] = 1.0
    if case == "batch":
        merge[kind == 0] = 0.0
    n = g.num_nodes
    H = rng.normal(size=(n, d)).astype(dtype)
    grads = rng.normal(size=(n, d)).astype(dtype), rng.normal(size=n)
    return g, merge, H, grads


def _relax_run(g, merge, H, grads, rng_seed=0):
    """The op forward and vjp, and the kernels called directly (streaming
    too, for float64): every output."""
    from grapheme import _relax, ops

    op = ops.ChainRelaxation()
    r, saved = op.forward(g, H, merge)
    grad_w = np.random.default_rng(rng_seed).normal(size=r.weights.shape[0])
    gH, gm = op.vjp(saved, grads[0], grads[1], grad_w)
    gH0, gm0 = op.vjp(saved, grads[0], grads[1], None)
    _, m, out, D, indptr, _, _ = saved
    edges_gm = np.zeros(m.shape[0])
    _relax.relaxed_edges_backward(m, indptr, grad_w, edges_gm)
    result = [r.features, r.mass, r.weights, r.graph.indptr, r.graph.indices, D,
              gH, gm, gH0, gm0, edges_gm]
    if H.dtype == np.float64:
        n, d = H.shape
        sout, sD, smass = np.empty((n, d)), np.empty(n), np.empty(n)
        _relax.relax_chain_forward(H, m, sout, sD, smass, True)
        sgH, sgm = np.empty((n, d)), np.empty(n)
        _relax.relax_chain_backward(m, out, D, grads[0], grads[1], sgH, sgm, True)
        result += [sout, sD, smass, sgH, sgm]
    return result, (m, indptr, grad_w)


def _assert_serial(result, m, indptr, grad_w, H, grads):
    """``result`` of _relax_run against the serial mirrors."""
    features, mass, weights, _, _, D, gH, gm, gH0, gm0, edges_gm = result[:11]
    out, Dref, mref = _serial_relax_forward(H, m)
    gH_ref, gm_ref = _serial_relax_backward(m, out, Dref, grads[0], grads[1])
    ew = _serial_relaxed_edges(m, indptr)
    egm = _serial_relaxed_edges_backward(m, indptr, grad_w)
    pairs = [(features, out), (D, Dref), (mass, mref), (weights, ew), (edges_gm, egm),
             (gH, gH_ref), (gH0, gH_ref)]
    has_next = np.diff(indptr) > 0
    pairs += [(gm0, gm_ref[has_next]), (gm, (gm_ref + egm)[has_next])]
    if len(result) > 11:
        pairs += list(zip(result[11:], (out, Dref, mref, gH_ref, gm_ref)))
    if EXACT_FLOATS:
        _assert_identical([[a for a, _ in pairs], [b for _, b in pairs]])
    else:
        for a, b in pairs:
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", ["batch", "chain", "mixed"])
def test_chain_relaxation_equals_the_serial_code(case, dtype):
    """The relaxation (forward and vjp, the relaxed edges and their
    gradient; streaming stores too) equals the serial kernels' arithmetic,
    on OpenMP's default threads (or the serial build)."""
    from grapheme import _relax

    g, merge, H, grads = _relax_problem(case, dtype)
    result, (m, indptr, grad_w) = _relax_run(g, merge, H, grads)
    blocks = _relax.restart_blocks(m)
    assert blocks[0] == 0 and blocks[-1] == g.num_nodes
    assert np.all(m[blocks[1:-1] - 1] == 0.0)
    # relaxed_edges_backward's blocks start after a chain's end
    edge_blocks = _relax.window_blocks(indptr)
    assert edge_blocks[0] == 0 and edge_blocks[-1] == g.num_nodes
    assert np.all(np.diff(indptr)[edge_blocks[1:-1] - 1] == 0)
    assert set(edge_blocks[1:-1]) <= set(g.offsets.tolist())
    if case == "chain":
        assert blocks.tolist() == [0, g.num_nodes]          # nowhere to cut
        assert edge_blocks.tolist() == [0, g.num_nodes]
    else:
        assert len(blocks) - 1 >= (4 if case == "batch" else 2)
        assert len(edge_blocks) - 1 >= (4 if case == "batch" else 2)
    _assert_serial(result, m, indptr, grad_w, H, grads)


@needs_openmp
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", ["batch", "chain", "mixed"])
def test_chain_relaxation_bit_identical_across_thread_counts(case, dtype):
    """Under threadpoolctl's OpenMP limit of 1, 2 and 3 threads, and with
    the kernels' num_threads = 1, 2, 3: the same bytes, the serial ones."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from grapheme import _relax

    g, merge, H, grads = _relax_problem(case, dtype)
    runs = []
    for k in (1, 2, 3):
        with threadpoolctl.threadpool_limits(limits=k, user_api="openmp"):
            assert _core.openmp_threads() == k
            result, (m, indptr, grad_w) = _relax_run(g, merge, H, grads)
        # the kernels' own num_threads (under a limit of 1: it overrides)
        with threadpoolctl.threadpool_limits(limits=1, user_api="openmp"):
            n, d = H.shape
            out, D, mass = np.empty_like(H), np.empty(n), np.empty(n)
            _relax.relax_chain_forward(H, m, out, D, mass, num_threads=k)
            gH, gm = np.empty_like(H), np.empty(n)
            _relax.relax_chain_backward(m, out, D, grads[0], grads[1], gH, gm,
                                        num_threads=k)
            counts = np.empty(n, np.int64)
            has_next = (np.diff(indptr) > 0).astype(np.uint8)
            _relax.relaxed_edge_counts(m, has_next, counts, num_threads=k)
            idx, w = np.empty(int(indptr[-1]), indptr.dtype), np.empty(int(indptr[-1]))
            _relax.relaxed_edges(m, has_next, indptr, idx, w, num_threads=k)
            egm = np.zeros(n)
            _relax.relaxed_edges_backward(m, indptr, grad_w, egm, num_threads=k)
        result += [out, D, mass, gH, gm, counts, idx, w, egm]
        runs.append(result)
    _assert_identical(runs)
    _assert_serial(runs[0][:-9], m, indptr, grad_w, H, grads)


@pytest.mark.parametrize("bad, error", [(0, ValueError), (-2, ValueError),
                                        (5000, ValueError), (1.5, TypeError),
                                        (True, TypeError), ("2", TypeError)])
def test_num_threads_is_validated(bad, error):
    with pytest.raises(error, match="num_threads"):
        gr.StructuralLoss(num_threads=bad)


def test_num_threads_is_not_a_model_setting():
    # not in get_params: checkpoints do not record it, and a run resumes
    # under any thread count
    loss = gr.StructuralLoss(num_threads=2)
    assert "num_threads" not in loss.get_params()
    assert loss.num_threads == 2 and gr.StructuralLoss().num_threads is None


def test_openmp_report_is_consistent():
    assert isinstance(gr.openmp_enabled(), bool)
    threads = _core.openmp_threads()
    assert (threads >= 1) if gr.openmp_enabled() else (threads == 0)


@pytest.mark.skipif(gr.openmp_enabled(), reason="the serial build's own check")
def test_serial_build_takes_thread_settings():
    p, t = _batch(5)
    runs = [_run(gr.StructuralLoss(num_threads=k), p, t) for k in (None, 1, 4)]
    _assert_identical(runs)


@needs_openmp
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("weighted", [False, True])
def test_gather_and_scatter_are_identical_on_any_thread_count(dtype, weighted):
    """History gather (blocks of outputs walking their members on several
    threads, the inputs in order on one) and scatter (blocks of rows, also
    with streaming stores) give the same bytes on 1, 2 and 3 threads, on a
    general graph (clusters not contiguous) and on chains."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from helpers import random_graph, streaming

    rng = np.random.default_rng(11)
    for g in (random_graph(rng, 6000, 2500), gr.Graph.from_texts(_texts(rng, 400, 2, 30))):
        history = gr.merge_edges(g, rng.random(g.num_edges) < 0.4)
        assert history.num_outputs > 2048
        if weighted:   # weights summing to 1 within every output
            r = rng.random(history.num_inputs) + 0.5
            r /= np.bincount(history.cluster, weights=r)[history.cluster]
            history = gr.MergeHistory(history.cluster, history.num_outputs, node_weights=r)
        x = rng.normal(size=(g.num_nodes, 24)).astype(dtype)
        y = rng.normal(size=(history.num_outputs, 24)).astype(dtype)
        runs = []
        for threads in (1, 2, 3):
            with threadpoolctl.threadpool_limits(limits=threads, user_api="openmp"):
                out = np.empty((g.num_nodes, 24), dtype)
                with streaming(True):
                    history.scatter(y, out=out)
                runs.append([history.gather(x), history.scatter(y), out])
        _assert_identical(runs)
        want = np.zeros((history.num_outputs, 24))
        np.add.at(want, history.cluster, history.node_weights[:, None] * x.astype(np.float64))
        tol = 1e-12 if dtype == np.float64 else 1e-5
        np.testing.assert_allclose(runs[0][0], want, rtol=tol, atol=tol)


def _cosine_reference(g, q, k, grad_sim):
    """The edge cosines of queries ``q`` and keys ``k`` and their gradients,
    by numpy, edge by edge in float64 (``np.add.at``)."""
    src = np.repeat(np.arange(g.num_nodes), np.diff(g.indptr))
    dst = g.indices
    q, k = q.astype(np.float64), k.astype(np.float64)
    nq = np.maximum(np.linalg.norm(q, axis=1), 1e-12)
    nk = np.maximum(np.linalg.norm(k, axis=1), 1e-12)
    sim = (q[src] * k[dst]).sum(axis=1) / (nq[src] * nk[dst])
    a = grad_sim / (nq[src] * nk[dst])
    gq, gk = np.zeros_like(q), np.zeros_like(k)
    np.add.at(gq, src, a[:, None] * k[dst] - (grad_sim * sim / nq[src] ** 2)[:, None] * q[src])
    np.add.at(gk, dst, a[:, None] * q[src] - (grad_sim * sim / nk[dst] ** 2)[:, None] * k[dst])
    return sim, gq, gk


@needs_openmp
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_edge_cosines_are_identical_on_any_thread_count(dtype):
    """The merge scores' cosines and their backward (rows in parallel, the
    keys' gradient from each row's in-edges) give the same bytes on 1, 2
    and 3 threads, queries and keys apart and one matrix for both, on a
    general graph with self-loops and repeated edges, and agree with numpy
    edge by edge."""
    from helpers import random_graph

    rng = np.random.default_rng(12)
    g = random_graph(rng, 5000, 9000, self_loops=True)
    n, E, d = g.num_nodes, g.num_edges, 12
    q, k = (rng.normal(size=(n, d)).astype(dtype) for _ in range(2))
    q[7] = 0.0          # a zero row: similarity 0, its norm clamped
    gs = rng.normal(size=E)
    gs[::5] = 0.0       # skipped edges
    runs = []
    for threads in (1, 2, 3):
        qn, kn, sim, sim1, norms = np.empty(n), np.empty(n), np.empty(E), np.empty(E), \
            np.empty(n)
        gq, gk, gh = (np.zeros((n, d), dtype) for _ in range(3))
        _core.edge_cosine_qk(g.indptr, g.indices, q, k, qn, kn, sim, num_threads=threads)
        _core.edge_cosine_qk_backward(g.indptr, g.indices, q, k, qn, kn, sim, gs, gq, gk,
                                      num_threads=threads)
        _core.edge_cosine(g.indptr, g.indices, q, norms, sim1, num_threads=threads)
        _core.edge_cosine_backward(g.indptr, g.indices, q, norms, sim1, gs, gh,
                                   num_threads=threads)
        runs.append([qn, kn, sim, gq, gk, norms, sim1, gh])
    _assert_identical(runs)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    want = _cosine_reference(g, q, k, gs)
    for got, ref in zip(runs[0][2:5], want):
        np.testing.assert_allclose(got, ref, rtol=tol, atol=tol)
    sim_h, gq_h, gk_h = _cosine_reference(g, q, q, gs)
    np.testing.assert_allclose(runs[0][6], sim_h, rtol=tol, atol=tol)
    np.testing.assert_allclose(runs[0][7], gq_h + gk_h, rtol=tol, atol=tol)


def test_code_rows_is_a_sorted_search_on_any_thread_count():
    """The embedding's label -> row search: the row of every label present,
    -1 for every other, their count returned, the same on 1-3 threads, and
    against ``np.searchsorted``; an empty table has no row for anything."""
    rng = np.random.default_rng(16)
    codes = np.sort(rng.choice(0x110001, 300, replace=False)).astype(np.int64)
    rows = rng.permutation(300).astype(np.int64)
    labels = np.concatenate([rng.choice(codes, 6000), rng.integers(0, 0x110001, 2000),
                             [0, 0x110000, codes[0], codes[-1]]]).astype(np.int64)
    pos = np.minimum(np.searchsorted(codes, labels), 299)
    want = np.where(codes[pos] == labels, rows[pos], -1)
    for threads in (1, 2, 3):
        out = np.full(labels.shape, 7, np.int64)
        assert _core.code_rows(codes, rows, labels, out, num_threads=threads) == \
            int((want < 0).sum())
        np.testing.assert_array_equal(out, want)
    none = np.empty(0, np.int64)
    out = np.empty(4, np.int64)
    assert _core.code_rows(none, none, labels[:4], out) == 4 and (out == -1).all()
    assert _core.code_rows(codes, rows, none, none) == 0
    with pytest.raises(ValueError, match="rows must be"):
        _core.code_rows(codes, rows[:-1], labels, np.empty(labels.shape, np.int64))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_take_rows_is_numpys_take_on_any_thread_count(dtype):
    """The lookup's parallel gather copies the same rows as ``np.take``, on
    1-3 threads; shapes that do not fit are refused before it runs."""
    rng = np.random.default_rng(15)
    table = rng.normal(size=(97, 24)).astype(dtype)
    rows = rng.integers(0, 97, 5000).astype(np.int64)
    want = np.take(table, rows, axis=0)
    for threads in (1, 2, 3):
        out = np.full((5000, 24), np.nan, dtype)
        _core.take_rows(table, rows, out, num_threads=threads)
        assert out.tobytes() == want.tobytes()
    with pytest.raises(ValueError, match="out must be"):
        _core.take_rows(table, rows, np.empty((4999, 24), dtype))
    with pytest.raises(ValueError, match="table has no rows"):
        _core.take_rows(table[:0], rows, np.empty((5000, 24), dtype))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_edge_cosine_backward_written_is_accumulated_into_zeros(dtype):
    """``accumulate=False`` (the routing's vjp: each row zeroed by its own
    thread, no serial zeroing pass) writes over whatever the buffers held:
    the same bytes as accumulating into zeros, on 1-3 threads, for queries
    and keys apart, one matrix for both, and a graph without edges."""
    from helpers import random_graph

    rng = np.random.default_rng(14)
    for g in (random_graph(rng, 3000, 6000, self_loops=True), gr.Graph.from_texts(["a", "b"])):
        n, E, d = g.num_nodes, g.num_edges, 6
        q, k = (rng.normal(size=(n, d)).astype(dtype) for _ in range(2))
        gs = rng.normal(size=E)
        qn, kn, sim = np.empty(n), np.empty(n), np.empty(E)
        _core.edge_cosine_qk(g.indptr, g.indices, q, k, qn, kn, sim)
        want_q, want_k, want_h = (np.zeros((n, d), dtype) for _ in range(3))
        _core.edge_cosine_qk_backward(g.indptr, g.indices, q, k, qn, kn, sim, gs,
                                      want_q, want_k)
        _core.edge_cosine_qk_backward(g.indptr, g.indices, q, q, qn, qn, sim, gs,
                                      want_h, want_h)
        for threads in (1, 2, 3):
            gq, gk, gh = (np.full((n, d), np.nan, dtype) for _ in range(3))
            _core.edge_cosine_qk_backward(g.indptr, g.indices, q, k, qn, kn, sim, gs, gq, gk,
                                          num_threads=threads, accumulate=False)
            _core.edge_cosine_qk_backward(g.indptr, g.indices, q, q, qn, qn, sim, gs, gh, gh,
                                          num_threads=threads, accumulate=False)
            for got, want in ((gq, want_q), (gk, want_k), (gh, want_h)):
                assert got.tobytes() == want.tobytes()


@needs_openmp
def test_edge_cosine_gradients_on_threads_against_central_differences():
    """The parallel backward (thousands of rows, so every thread has some)
    along random directions of the queries and the keys against float64
    central differences of ``sum(g * s)``."""
    from helpers import random_graph

    rng = np.random.default_rng(13)
    g = random_graph(rng, 4000, 8000, self_loops=True)
    n, E, d = g.num_nodes, g.num_edges, 8
    q, k, gs = rng.normal(size=(n, d)), rng.normal(size=(n, d)), rng.normal(size=E)

    def objective(q, k):
        qn, kn, sim = np.empty(n), np.empty(n), np.empty(E)
        _core.edge_cosine_qk(g.indptr, g.indices, q, k, qn, kn, sim)
        return float(gs @ sim), (qn, kn, sim)

    _, (qn, kn, sim) = objective(q, k)
    gq, gk = np.zeros((n, d)), np.zeros((n, d))
    _core.edge_cosine_qk_backward(g.indptr, g.indices, q, k, qn, kn, sim, gs, gq, gk)
    eps = 1e-6
    for _ in range(3):
        dq, dk = rng.normal(size=(n, d)), rng.normal(size=(n, d))
        numeric = (objective(q + eps * dq, k + eps * dk)[0]
                   - objective(q - eps * dq, k - eps * dk)[0]) / (2 * eps)
        analytic = float((gq * dq).sum() + (gk * dk).sum())
        assert abs(numeric - analytic) <= 1e-6 * abs(analytic)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_argument_checks_work_in_a_child_forked_after_a_parallel_loop():
    """GNU OpenMP does not survive fork: a child that starts a parallel
    region after the parent ran one waits forever. Checking arguments
    starts none, so a forked child can still build and check graphs, and
    read their activations (the feature means: one thread unless the
    Trainer's step asks for more)."""
    import multiprocessing

    n, d = 70_000, 2
    x = np.ones((n, d))
    _core.tanh_backward(x, x, np.empty((n, d)), np.empty(d), num_threads=2)   # parent: threads

    def child_work():
        g = gr.Graph.from_text("a" * n).replace(features=x, activation=None)
        assert g.activation.tolist() == [1.0] * n
        assert gr.ops.FeatureMean().forward(x.astype(np.float32))[0].activation.shape == (n,)

    child = multiprocessing.get_context("fork").Process(target=child_work)
    child.start()
    child.join(60)
    hung = child.is_alive()
    if hung:
        child.kill()
    assert not hung and child.exitcode == 0


@needs_openmp
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_lookup_layer_bit_identical_across_thread_counts(dtype):
    """The layer on a table's rows (its node blocks forward, its sums by
    table row back) on thousands of nodes: equal bits on 1, 2 and 3
    threads, through the operation as the encoder calls it."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from grapheme import ops

    rng = np.random.default_rng(12)
    g = gr.Graph.from_texts(_texts(rng, 400, 12, 25))
    g = g.replace(weights=rng.uniform(0.1, 2.0, g.num_edges))
    n, d = g.num_nodes, 16
    assert n > 3 * 1024
    table = rng.normal(size=(30, d)).astype(dtype)
    rows = rng.integers(0, 25, n)
    W = [rng.normal(scale=0.3, size=s).astype(dtype) for s in [(d, d)] * 3 + [(d,)]]
    G = rng.normal(size=(n, d)).astype(dtype)
    runs = []
    for k in (1, 2, 3):
        with threadpoolctl.threadpool_limits(limits=k, user_api="openmp"):
            (h,), saved = ops.LookupMessagePassing().forward(g, table, rows, *W)
            runs.append([h, *ops.LookupMessagePassing().vjp(saved, G)])
    _assert_identical(runs)


@needs_openmp
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_encoder_on_contexts_bit_identical_across_thread_counts(dtype):
    """An encoder of three layers on the rows of a table over a batch of
    chains (the first two layers on contexts, computed at a few thousand
    nodes, the last on every node): equal bits on 1, 2 and 3 threads."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    rng = np.random.default_rng(13)
    g = gr.Graph.from_texts(_texts(rng, 400, 12, 25))
    n, d = g.num_nodes, 16
    table = rng.normal(size=(30, d)).astype(dtype)
    rows = rng.integers(0, 25, n)
    enc = gr.Encoder(d, layers=3, dtype=dtype)
    for v in enc.params.values():
        v += rng.normal(scale=0.3, size=v.shape).astype(dtype)
    G = rng.normal(size=(n, d)).astype(dtype)
    runs = []
    for k in (1, 2, 3):
        with threadpoolctl.threadpool_limits(limits=k, user_api="openmp"):
            r, saved = enc.forward_lookup(g, table, rows)
            assert all(len(s.nodes) > 1024 for s in saved[0][:2])   # every thread gets rows
            grad_table, grads = enc.vjp(saved, G, G, G)
            runs.append([*r, grad_table, *(grads[k] for k in sorted(grads))])
    _assert_identical(runs)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_broadcast_column_is_numpys_copy_on_any_thread_count(dtype):
    """FeatureMean.vjp's broadcast of its column over d, by blocks of rows
    on the threads: numpy's copyto, byte for byte, on 1, 2 and 3 threads;
    an out of another row count is a ValueError."""
    rng = np.random.default_rng(1)
    for n, d in ((5000, 64), (3, 7), (0, 4), (4, 0)):
        column = rng.standard_normal(n).astype(dtype)
        want = np.empty((n, d), dtype)
        np.copyto(want, column[:, None])
        for k in (1, 2, 3):
            out = np.full((n, d), np.nan, dtype)
            _core.broadcast_column(column, out, num_threads=k)
            assert out.tobytes() == want.tobytes()
    with pytest.raises(ValueError, match="out must have 3 rows, got 2"):
        _core.broadcast_column(np.zeros(3), np.zeros((2, 4)))
    g = rng.standard_normal(40)
    # through the op, with and without an out
    for out in (None, np.empty((40, 6))):
        got = gr.ops.FeatureMean().vjp((40, 6), g, out=out)[0]
        np.testing.assert_array_equal(got, np.repeat((g / 6)[:, None], 6, axis=1))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_row_means_on_any_thread_count(dtype):
    """The row means (a graph's activation) by fixed blocks of rows on the
    threads: the same bytes on 1, 2 and 3 threads; float64 rows within one
    ulp of numpy's mean (the kernel adds in numpy's pairwise order, so they
    are equal with the numpy this was written for), float32 rows in
    row_means' four partial sums (tests/test_float32.py)."""
    rng = np.random.default_rng(16)
    for n, d in ((5000, 64), (3000, 7), (2100, 129), (1500, 300), (3, 1000), (0, 4)):
        x = (rng.standard_normal((n, d)) * np.exp(rng.uniform(-3, 3, (n, d)))).astype(dtype)
        if n:
            x[0] = -0.0   # sums to +0.0, as numpy's mean
        outs = []
        for k in (1, 2, 3):
            out = np.full(n, np.nan)
            _core.row_means(x, out, num_threads=k)
            outs.append(out.tobytes())
        assert outs[0] == outs[1] == outs[2]
        got = np.frombuffer(outs[0])
        if dtype == np.float64:
            np.testing.assert_array_max_ulp(got, x.mean(axis=1), maxulp=1)
        if n:
            assert got[0] == 0.0 and not np.signbit(got[0])
        assert gr.ops.feature_mean(x).tobytes() == outs[0]
        assert gr.ops.feature_mean(x, num_threads=0).tobytes() == outs[0]
    # through the op
    x = rng.standard_normal((40, 9))
    got = gr.ops.FeatureMean().forward(x)[0].activation
    np.testing.assert_array_max_ulp(got, x.mean(axis=1), maxulp=1)


def test_rows_add_checks_before_writing():
    """rows_add (the embedding table's gradient) refuses a row outside the
    table and mismatched shapes with a ValueError naming what is wrong,
    and leaves ``out`` as it was."""
    out = np.zeros((4, 3))
    values = np.ones((5, 3))
    for rows, match in ((np.array([0, 1, 4, 2, 3]), "row 4 is outside \\[0, 4\\)"),
                        (np.array([0, -1, 2, 2, 3]), "row -1 is outside"),
                        (np.array([0, 1, 2]), "values must be \\(3, 3\\)")):
        with pytest.raises(ValueError, match=match):
            _core.rows_add(rows.astype(np.int64), values, out)
    with pytest.raises(ValueError, match="values must be \\(5, 3\\)"):
        _core.rows_add(np.zeros(5, np.int64), np.ones((5, 2)), out)
    with pytest.raises(TypeError, match="'out' must not be None"):
        _core.rows_add(np.zeros(5, np.int64), values, None)
    assert not out.any()
    _core.rows_add(np.array([0, 3, 0, 3, 3], np.int64), values, out)
    assert out[:, 0].tolist() == [2.0, 0.0, 0.0, 3.0]
