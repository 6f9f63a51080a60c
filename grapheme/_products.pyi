# Stubs for the encoder's matrix products in _products.pyx (private; callers
# validate, see grapheme.ops._matmul). Each parameter is commented with its
# Cython type; IN arrays are const memoryviews, OUT arrays are written.
# floating is float or double, one for all arrays of a call.
from typing import Optional

import numpy as np

ROWS: int         # rows per block of the stacked products and lookup_layer
MATMUL_ROWS: int  # rows per block of matmul
TN_ROWS: int      # rows per block of matmul_tn
NUMPY_TANH: bool   # numpy's tanh loop found: stacked_matmul takes residual=

def matmul(
    a: np.ndarray,             # const floating[:, ::1] IN (n, k)
    b: np.ndarray,             # const floating[:, ::1] IN (k, m), or (m, k) if transpose_b
    out: np.ndarray,           # floating[:, ::1] OUT (n, m), not overlapping a or b
    transpose_b: bool = False,
    num_threads: int = 0,      # threads; 0: OpenMP's default
    init: np.ndarray | None = None,   # const floating[:, ::1] IN (n, m): out = a @ b + init;
                                      # may be out itself, else overlapping nothing
) -> None: ...
def matmul_tn(
    a: np.ndarray,             # const floating[:, ::1] IN (n, k)
    g: np.ndarray,             # const floating[:, ::1] IN (n, m)
    out: np.ndarray,           # floating[:, ::1] OUT (k, m) = a.T @ g
    parts: np.ndarray,         # floating[:, :, ::1] scratch (>= ceil(n / TN_ROWS), k, m)
    num_threads: int = 0,      # threads; 0: OpenMP's default
) -> None: ...
def stacked_matmul(
    indptr: np.ndarray,        # const index_t[::1] IN (n+1,) out-edges
    indices: np.ndarray,       # const index_t[::1] IN (E,)
    weights: np.ndarray,       # const double[::1] IN (E,) or (0,)
    t_indptr: np.ndarray,      # const index_t[::1] IN (n+1,) in-edges
    t_indices: np.ndarray,     # const index_t[::1] IN (E,)
    t_weights: np.ndarray,     # const double[::1] IN (E,) or (0,)
    x: np.ndarray,             # const floating[:, :] IN (n, d), contiguous rows
    w: np.ndarray,             # const floating[:, ::1] IN (3d, m)
    out: np.ndarray,           # floating[:, ::1] OUT (n, m) = [x, P, S] @ w + init
    init: np.ndarray,          # const floating[:, ::1] IN (n, m), or (1, m) for every row
    scratch: np.ndarray,       # floating[:, :, ::1] scratch (threads, >= ROWS, 3d)
    num_threads: int = 0,      # threads; 0: OpenMP's default
    residual: np.ndarray | None = None,   # floating[:, ::1] OUT (n, d) = x + tanh(...), then
                                          # out = tanh(...); m == d, needs NUMPY_TANH
) -> None: ...
def lookup_layer(
    indptr: np.ndarray,        # const index_t[::1] IN (n+1,) out-edges
    indices: np.ndarray,       # const index_t[::1] IN (E,)
    weights: np.ndarray,       # const double[::1] IN (E,) or (0,)
    t_indptr: np.ndarray,      # const index_t[::1] IN (n+1,) in-edges
    t_indices: np.ndarray,     # const index_t[::1] IN (E,)
    t_weights: np.ndarray,     # const double[::1] IN (E,) or (0,)
    codes: np.ndarray,         # const int64_t[::1] IN (n,) each in [0, U)
    nodes: np.ndarray,         # const int64_t[::1] IN (k,) the nodes computed; (0,): all
    products: np.ndarray,      # const floating[:, ::1] IN (U, 3d) rows @ [Ws | Wp | Wn]
    bias: np.ndarray,          # const floating[::1] IN (d,)
    rows: np.ndarray,          # const floating[:, ::1] IN (U, d) the table rows read
    t: np.ndarray,             # floating[:, ::1] OUT (k, d) tanh(z); z without NUMPY_TANH
    out: np.ndarray,           # floating[:, ::1] OUT (k, d) rows[codes] + t (NUMPY_TANH)
    num_threads: int = 0,
) -> Optional[bool]: ...   # out is finite (None: out not written)
def stacked_matmul_tn(
    indptr: np.ndarray,        # const index_t[::1] IN (n+1,) out-edges
    indices: np.ndarray,       # const index_t[::1] IN (E,)
    weights: np.ndarray,       # const double[::1] IN (E,) or (0,)
    t_indptr: np.ndarray,      # const index_t[::1] IN (n+1,) in-edges
    t_indices: np.ndarray,     # const index_t[::1] IN (E,)
    t_weights: np.ndarray,     # const double[::1] IN (E,) or (0,)
    x: np.ndarray,             # const floating[:, :] IN (n, d), contiguous rows
    g: np.ndarray,             # const floating[:, ::1] IN (n, m)
    out: np.ndarray,           # floating[:, ::1] OUT (3d, m) = [x, P, S].T @ g
    parts: np.ndarray,         # floating[:, :, ::1] scratch (>= ceil(n / TN_ROWS), 3d, m)
    scratch: np.ndarray,       # floating[:, :, ::1] scratch (threads, >= ROWS, 3d)
    num_threads: int = 0,      # threads; 0: OpenMP's default
) -> None: ...
