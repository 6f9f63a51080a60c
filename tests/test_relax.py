"""Chain relaxation kernels against a plain numpy reference and finite differences."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from grapheme import _core, _relax
from grapheme._estimators import relax_chain as forward
from grapheme._estimators import relax_chain_backward as backward
from helpers import streaming


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
    m[-1:] = 0.0
    return H, m


def relaxed_problem(seed, n, d):
    """A random chain, its forward results and random output gradients:
    ``H, m, out, D, g, gmass``."""
    rng = np.random.default_rng(seed)
    H, m = random_chain(rng, n, d)
    out, D, _ = forward(H, m)
    return H, m, out, D, rng.standard_normal((n, d)), rng.standard_normal(n)


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
    _relax.relax_chain_backward(m, out, D, buf, gmass, buf, gm2)
    np.testing.assert_array_equal(buf, gH)
    np.testing.assert_array_equal(gm2, gm)


# ---------------------------------------------------------------- buffers (out=)
def buffer(shape, offset):
    """A NaN-filled float64 buffer; ``offset`` starts it 8 bytes past a 16-byte
    boundary (still aligned for float64), so streaming stores must peel."""
    size = int(np.prod(shape))
    base = np.full(size + 2, np.nan)
    skip = base.ctypes.data % 16 // 8
    buf = base[skip + offset:skip + offset + size].reshape(shape)
    assert size == 0 or buf.ctypes.data % 16 == 8 * offset
    return buf


@pytest.mark.parametrize("stream", [False, True], ids=["store", "stream"])
@given(n=st.integers(0, 30), d=st.integers(0, 19), seed=st.integers(0, 2**32 - 1),
       offset=st.integers(0, 1))
def test_buffers_equal_fresh_results(stream, n, d, seed, offset):
    # STREAM_MIN_BYTES = 0 sends every reused buffer down the streaming-store
    # path; odd d (or offset) puts rows at 8-byte but not 16-byte alignment
    with streaming(stream):
        check_buffers_equal_fresh_results(n, d, seed, offset)


def check_buffers_equal_fresh_results(n, d, seed, offset):
    rng = np.random.default_rng(seed)
    H, m = random_chain(rng, n, d)
    out, D, mass = forward(H, m)
    bufs = buffer((n, d), offset), buffer((n,), offset), buffer((n,), offset)
    got = forward(H, m, out=bufs[0], D=bufs[1], mass=bufs[2])
    assert all(a is b for a, b in zip(got, bufs))
    for a, b in zip(got, (out, D, mass)):
        np.testing.assert_array_equal(a, b)
    # any subset of the buffers
    np.testing.assert_array_equal(forward(H, m, D=buffer((n,), offset))[0], out)

    g = rng.standard_normal((n, d))
    gmass = rng.standard_normal(n)
    gH, gm = backward(m, out, D, g, gmass)
    bufs = buffer((n, d), offset), buffer((n,), offset)
    got = backward(m, out, D, g, gmass, grad_H=bufs[0], grad_m=bufs[1])
    assert got[0] is bufs[0] and got[1] is bufs[1]
    np.testing.assert_array_equal(got[0], gH)
    np.testing.assert_array_equal(got[1], gm)
    # in place, by overwrite=True or by passing grad_out as grad_H
    buf = g.copy()
    got = backward(m, out, D, buf, gmass, overwrite=True)
    assert got[0] is buf
    np.testing.assert_array_equal(buf, gH)
    np.testing.assert_array_equal(got[1], gm)
    buf = buffer((n, d), offset)
    buf[...] = g
    got = backward(m, out, D, buf, gmass, grad_H=buf.reshape(n, d), grad_m=buffer((n,), 0))
    np.testing.assert_array_equal(buf, gH)
    np.testing.assert_array_equal(got[1], gm)


def test_buffers_equal_fresh_results_at_hard_weights():
    rng = np.random.default_rng(7)
    n, d = 50, 5
    H = rng.standard_normal((n, d))
    m = (rng.uniform(size=n) < 0.5).astype(float)
    g, gmass = rng.standard_normal((n, d)), rng.standard_normal(n)
    out, D, mass = forward(H, m)
    gH, gm = backward(m, out, D, g, gmass)
    with streaming(True):
        got = forward(H, m, out=np.empty((n, d)))[0]
        np.testing.assert_array_equal(got, out)
        got = backward(m, out, D, g, gmass, grad_H=np.empty((n, d)))[0]
        np.testing.assert_array_equal(got, gH)


def test_stream_policy():
    # streaming only into a caller's buffer of >= STREAM_MIN_BYTES, never in place
    rng = np.random.default_rng(8)
    n, d = 20, 4
    H, m = random_chain(rng, n, d)
    g, gmass = rng.standard_normal((n, d)), rng.standard_normal(n)
    calls = []

    def spy(kernel):
        def run(*args):
            calls.append(args[-1])
            return kernel(*args)
        return run

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_relax, "relax_chain_forward", spy(_relax.relax_chain_forward))
        mp.setattr(_relax, "relax_chain_backward", spy(_relax.relax_chain_backward))
        mp.setattr(_core, "STREAM_MIN_BYTES", n * d * 8)
        out, D, _ = forward(H, m)
        forward(H, m, out=np.empty((n, d)))
        forward(H, m, D=np.empty(n))
        backward(m, out, D, g, gmass)
        backward(m, out, D, g, gmass, grad_H=np.empty((n, d)))
        backward(m, out, D, g, gmass, grad_m=np.empty(n))
        backward(m, out, D, g.copy(), gmass, overwrite=True)
        buf = g.copy()
        backward(m, out, D, buf, gmass, grad_H=buf)
        mp.setattr(_core, "STREAM_MIN_BYTES", n * d * 8 + 1)
        forward(H, m, out=np.empty((n, d)))
        backward(m, out, D, g, gmass, grad_H=np.empty((n, d)))
    assert calls == [False, True, False, False, True, False, False, False, False, False]


def test_streams_into_large_reused_buffers():
    # the real threshold, crossed once: 64 MiB of output
    rng = np.random.default_rng(9)
    n, d = _core.STREAM_MIN_BYTES // (8 * 16) + 3, 16
    H, m = random_chain(rng, n, d)
    out, D, mass = forward(H, m)
    g = rng.standard_normal((n, d))
    gmass = rng.standard_normal(n)
    gH, gm = backward(m, out, D, g, gmass)
    buf = np.empty((n, d))
    assert buf.nbytes >= _core.STREAM_MIN_BYTES
    np.testing.assert_array_equal(forward(H, m, out=buf)[0], out)
    buf = np.empty((n, d))
    np.testing.assert_array_equal(backward(m, out, D, g, gmass, grad_H=buf)[0], gH)


def test_buffer_validation():
    n, d = 6, 3
    H, m, out, D, g, gmass = relaxed_problem(10, n, d)
    readonly = np.empty((n, d))
    readonly.flags.writeable = False
    unaligned = np.zeros(n * d * 8 + 1, np.uint8)[1:].view(np.float64).reshape(n, d)
    bad_rows = [  # (exception, message, buffer) for an (n, d) output
        (TypeError, "must be a numpy.ndarray", np.zeros((n, d)).tolist()),
        (TypeError, "must have dtype float64", np.empty((n, d), np.float32)),
        (ValueError, r"must have shape \(6, 3\)", np.empty((n, d + 1))),
        (ValueError, r"must have shape \(6, 3\)", np.empty(n * d)),
        (ValueError, "must be C-contiguous", np.empty((n, 2 * d))[:, ::2]),
        (ValueError, "must be C-contiguous and aligned", unaligned),
        (ValueError, "is read-only", readonly),
    ]
    bad_vecs = [  # the same for an (n,) output
        (TypeError, "must be a numpy.ndarray", [0.0] * n),
        (TypeError, "must have dtype float64", np.empty(n, np.int64)),
        (ValueError, r"must have shape \(6,\)", np.empty((n, 1))),
        (ValueError, "must be C-contiguous", np.empty(2 * n)[::2]),
    ]

    def rejects(call, name, exc, msg):
        with pytest.raises(exc, match=f"{name} {msg}"):
            call()

    for exc, msg, bad in bad_rows:
        rejects(lambda: forward(H, m, out=bad), "out", exc, msg)
        rejects(lambda: backward(m, out, D, g, gmass, grad_H=bad), "grad_H", exc, msg)
        if exc is not TypeError or isinstance(bad, np.ndarray):  # grad_out is read as given
            rejects(lambda: backward(m, out, D, bad, gmass, overwrite=True), "grad_out", exc,
                    msg)
    for exc, msg, bad in bad_vecs:
        rejects(lambda: forward(H, m, D=bad), "D", exc, msg)
        rejects(lambda: forward(H, m, mass=bad), "mass", exc, msg)
        rejects(lambda: backward(m, out, D, g, gmass, grad_m=bad), "grad_m", exc, msg)

    # overlap: with an input, or with another output
    overlap = "must not overlap"
    rejects(lambda: forward(H, m, out=H), "out", ValueError, overlap)
    rejects(lambda: forward(H, m, D=m), "D", ValueError, overlap)
    rejects(lambda: forward(H, m, mass=m), "mass", ValueError, overlap)
    shared = np.empty(n)
    # (the later of two overlapping outputs is named)
    rejects(lambda: forward(H, m, D=shared, mass=shared), "mass", ValueError,
            "must not overlap D")
    rows = np.empty((n, d))
    rejects(lambda: forward(H, m, out=rows, D=rows.reshape(-1)[:n]), "D", ValueError,
            overlap)
    rejects(lambda: backward(m, out, D, g, gmass, grad_H=out.copy(), grad_m=gmass), "grad_m",
            ValueError, overlap)
    rejects(lambda: backward(m, out, D, g, gmass, grad_H=np.empty((n, d)), grad_m=D),
            "grad_m", ValueError, overlap)
    rejects(lambda: backward(m, out, D, g, gmass, grad_H=out), "grad_H", ValueError, overlap)
    # grad_H may be grad_out exactly, not shifted by a row
    big = np.zeros((n + 1, d))
    rejects(lambda: backward(m, out, D, big[1:], gmass, grad_H=big[:-1]), "grad_H",
            ValueError, overlap)
    rejects(lambda: backward(m, out, D, big[:-1], gmass, grad_H=big[1:]), "grad_H",
            ValueError, overlap)
    with pytest.raises(ValueError, match="grad_H must be grad_out or None with overwrite=True"):
        backward(m, out, D, g.copy(), gmass, overwrite=True, grad_H=np.empty((n, d)))


def test_bad_buffer_is_rejected_before_anything_is_written():
    n, d = 8, 2
    H, m, out, D, g, gmass = relaxed_problem(11, n, d)
    bufs = np.full((n, d), np.nan), np.full(n, np.nan)
    with pytest.raises(TypeError, match="mass"):
        forward(H, m, out=bufs[0], D=bufs[1], mass=np.empty(n, np.float32))
    with pytest.raises(ValueError, match="grad_m"):
        backward(m, out, D, g, gmass, grad_H=bufs[0], grad_m=bufs[1][:-1])
    assert np.isnan(bufs[0]).all() and np.isnan(bufs[1]).all()
