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
