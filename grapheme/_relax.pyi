# Stubs for the chain relaxation kernels in _relax.pyx (private; callers
# validate, see grapheme.ops.ChainRelaxation). Each parameter is commented with its
# Cython type; IN arrays are const memoryviews, OUT arrays are written.
# floating is float or double (the (n, d) rows; the scalars stay double).
import numpy as np

def relax_chain_forward(
    H: np.ndarray,     # const floating[:, ::1] IN (n, d)
    m: np.ndarray,     # const double[::1] IN (n,) merge weight of edge i -> i+1
    out: np.ndarray,   # floating[:, ::1] OUT (n, d)
    D: np.ndarray,     # double[::1] OUT (n,)
    mass: np.ndarray,  # double[::1] OUT (n,)
    stream: bool = False,  # write out with streaming stores
    num_threads: int = 0,  # threads; 0: OpenMP's default
) -> None: ...
def relax_chain_backward(
    m: np.ndarray,          # const double[::1] IN (n,)
    out: np.ndarray,        # const floating[:, ::1] IN (n, d)
    D: np.ndarray,          # const double[::1] IN (n,)
    grad_out: np.ndarray,   # const floating[:, ::1] IN (n, d)
    grad_mass: np.ndarray,  # const double[::1] IN (n,)
    grad_H: np.ndarray,     # floating[:, ::1] OUT (n, d)
    grad_m: np.ndarray,     # double[::1] OUT (n,)
    stream: bool = False,   # write grad_H with streaming stores
    num_threads: int = 0,   # threads; 0: OpenMP's default
) -> None: ...
def relaxed_edge_counts(
    m: np.ndarray,         # const double[::1] IN (n,) merge weights
    has_next: np.ndarray,  # const uint8_t[::1] IN (n,) 1 where edge i -> i+1 exists
    counts: np.ndarray,    # int64_t[::1] OUT (n,) relaxed out-edges per node
    num_threads: int = 0,  # threads; 0: OpenMP's default
) -> None: ...
def relaxed_edges(
    m: np.ndarray,         # const double[::1] IN (n,)
    has_next: np.ndarray,  # const uint8_t[::1] IN (n,)
    indptr: np.ndarray,    # const index_t[::1] IN (n+1,) from relaxed_edge_counts
    indices: np.ndarray,   # index_t[::1] OUT (E',)
    weights: np.ndarray,   # double[::1] OUT (E',) expected weights W_ij
    num_threads: int = 0,  # threads; 0: OpenMP's default
) -> None: ...
def relaxed_edges_backward(
    m: np.ndarray,       # const double[::1] IN (n,)
    indptr: np.ndarray,  # const index_t[::1] IN (n+1,)
    grad_w: np.ndarray,  # const double[::1] IN (E',)
    grad_m: np.ndarray,  # double[::1] OUT (n,), accumulated
    num_threads: int = 0,  # threads; 0: OpenMP's default
) -> None: ...
def restart_blocks(
    m: np.ndarray,       # const double[::1] IN (n,)
) -> np.ndarray: ...     # int64 bounds of the chain kernels' blocks (for tests)
def window_blocks(
    indptr: np.ndarray,  # const index_t[::1] IN (n+1,)
) -> np.ndarray: ...     # int64 bounds of relaxed_edges_backward's blocks (for tests)
