import numpy as np
import pytest
from hypothesis import given, strategies as st

from grapheme import _core
from grapheme._validation import as_float_array

SPECIAL = [np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, 5e-324, -5e-324,
           np.finfo(float).max, -np.finfo(float).max, np.finfo(float).tiny, 1.0]


@given(size=st.sampled_from([0, 1, 2, 3, 4095, 4096, 4097, 10_000]),
       picks=st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(SPECIAL)), max_size=4),
       payload=st.integers(1, 2**51 - 1))
def test_all_finite_equals_numpy(size, picks, payload):
    # the bit-trick kernel against np.isfinite, on every class of double,
    # NaNs with any payload among them, and around its 4096-element blocks
    x = np.random.default_rng(size).standard_normal(size)
    for pos, value in picks:
        if size:
            x[pos % size] = value
    if size and picks:
        bits = x.view(np.uint64)
        bits[picks[0][0] % size] = np.uint64(0x7FF0000000000000) | np.uint64(payload)
    assert _core.all_finite(x) == bool(np.isfinite(x).all())


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_as_float_array_names_the_argument(bad):
    x = np.zeros((5000, 3))
    x[4321, 2] = bad
    with pytest.raises(ValueError, match="features contains NaN or infinity"):
        as_float_array(x, "features")
    assert as_float_array(x, "features", finite=False) is x


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
def test_array_subclasses_are_read_as_arrays_and_masks_are_not_ignored():
    # np.matrix (scipy.sparse's todense()) failed in a kernel's signature
    # dispatch, "No matching signature found"; a masked array's mask was
    # silently dropped (an attack helper's finds)
    import grapheme as gr
    from grapheme import ops

    g = gr.Graph.from_text("aabbc")
    X = np.random.default_rng(0).normal(size=(5, 4))
    want = gr.Morpher().forward(g, X).graph.features
    unmasked = np.ma.masked_array(X, mask=np.zeros(X.shape, bool))
    for same in (np.asmatrix(X), unmasked, np.ma.masked_array(X)):
        np.testing.assert_array_equal(gr.Morpher().forward(g, same).graph.features, want)
        np.testing.assert_array_equal(ops.FeatureMean().forward(same)[0].activation,
                                      X.mean(axis=1))
    masked = unmasked.copy()
    masked[0, 0] = np.ma.masked
    with pytest.raises(TypeError, match="features must be a real-valued array, got a "
                                        "masked array with masked elements"):
        gr.Morpher().forward(g, masked)
    with pytest.raises(TypeError, match="labels must be an integer array, got a masked"):
        gr.Graph(np.array([0, 0]), np.array([], np.int64),
                 np.ma.masked_array([97], mask=[True]))
