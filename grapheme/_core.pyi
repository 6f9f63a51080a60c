# Stubs for the compiled kernels in _core.pyx (private; callers validate).
# Each parameter is commented with its Cython type; IN arrays are const
# memoryviews (read-only and memory-mapped arrays work), OUT arrays are
# written, "accumulated" ones are added to. index_t is int32_t or int64_t.
import numpy as np

def chain_csr(
    lengths: np.ndarray,  # const int64_t[::1] IN (B,)
    indptr: np.ndarray,   # index_t[::1] OUT (N+1,)
    indices: np.ndarray,  # index_t[::1] OUT (N - #non-empty,)
) -> None: ...
def hash_normal(
    seed: int,            # uint64_t
    keys: np.ndarray,     # const int64_t[::1] IN (V,)
    out: np.ndarray,      # double[:, ::1] OUT (V, d)
) -> None: ...
def all_finite(
    x: np.ndarray,        # const double[::1] IN (m,)
) -> bool: ...
def rows_add(
    rows: np.ndarray,     # const int64_t[::1] IN (n,)
    values: np.ndarray,   # const double[:, ::1] IN (n, d)
    out: np.ndarray,      # double[:, ::1] OUT (V, d), accumulated
) -> None: ...
def edge_cosine(
    indptr: np.ndarray,   # const index_t[::1] IN (n+1,)
    indices: np.ndarray,  # const index_t[::1] IN (E,)
    H: np.ndarray,        # const double[:, ::1] IN (n, d)
    norms: np.ndarray,    # double[::1] OUT (n,)
    sim: np.ndarray,      # double[::1] OUT (E,)
) -> None: ...
def edge_cosine_backward(
    indptr: np.ndarray,   # const index_t[::1] IN (n+1,)
    indices: np.ndarray,  # const index_t[::1] IN (E,)
    H: np.ndarray,        # const double[:, ::1] IN (n, d)
    norms: np.ndarray,    # const double[::1] IN (n,)
    sim: np.ndarray,      # const double[::1] IN (E,)
    grad_sim: np.ndarray, # const double[::1] IN (E,)
    grad_H: np.ndarray,   # double[:, ::1] OUT (n, d), accumulated
) -> None: ...
def components(
    indptr: np.ndarray,   # const index_t[::1] IN (n+1,)
    indices: np.ndarray,  # const index_t[::1] IN (E,)
    merge: np.ndarray,    # const uint8_t[::1] IN (E,)
    cluster: np.ndarray,  # index_t[::1] OUT (n,)
) -> int: ...
def history_csr(
    cluster: np.ndarray,      # const index_t[::1] IN (n,)
    node_weight: np.ndarray,  # const double[::1] IN (n,) or (0,): uniform
    indptr: np.ndarray,       # index_t[::1] OUT (k+1,)
    members: np.ndarray,      # index_t[::1] OUT (n,)
    weights: np.ndarray,      # double[::1] OUT (n,), or (0,) when uniform
) -> None: ...
def contract(
    indptr: np.ndarray,       # const index_t[::1] IN (n+1,)
    indices: np.ndarray,      # const index_t[::1] IN (E,)
    edge_weight: np.ndarray,  # const double[::1] IN (E,) or (0,)
    cluster: np.ndarray,      # const index_t[::1] IN (n,)
    hist_indptr: np.ndarray,  # const index_t[::1] IN (k+1,)
    members: np.ndarray,      # const index_t[::1] IN (n,)
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]: ...
def gather(
    cluster: np.ndarray,      # const index_t[::1] IN (n,)
    hist_indptr: np.ndarray,  # const index_t[::1] IN (k+1,)
    members: np.ndarray,      # const index_t[::1] IN (n,), ascending per output
    node_weights: np.ndarray, # const double[::1] IN (n,), or (0,) for 1 / |output|
    x: np.ndarray,            # const double[:, ::1] IN (n, d)
    out: np.ndarray,          # double[:, ::1] OUT (k, d)
) -> None: ...
def scatter(
    cluster: np.ndarray,      # const index_t[::1] IN (n,)
    hist_indptr: np.ndarray,  # const index_t[::1] IN (k+1,)
    node_weights: np.ndarray, # const double[::1] IN (n,), or (0,) for 1 / |output|
    g: np.ndarray,            # const double[:, ::1] IN (k, d)
    out: np.ndarray,          # double[:, ::1] OUT (n, d)
    stream: bool = False,     # write out with non-temporal stores
) -> None: ...

STREAM_MIN_BYTES: int

# --- structural loss (_sinkhorn.pxi) -------------------------------------
# A batch of B (predicted, target) pairs; node arrays concatenated over the
# batch with int64 offsets, edges as block-diagonal CSR with global indices.
def _structural_loss_forward(
    x: np.ndarray, a: np.ndarray,          # const double[::1] IN (N,) activations, masses
    lp: np.ndarray, dp: np.ndarray,        # const int32_t[::1], const double[::1] IN (N,)
    ipp: np.ndarray, ip: np.ndarray,       # const index_t[::1] IN predicted CSR
    wp: np.ndarray, off_p: np.ndarray,     # const double[::1] (E_p,), const int64_t[::1] (B+1,)
    y: np.ndarray, bm: np.ndarray,         # const double[::1] IN (M,) activations, masses
    lt: np.ndarray, dt: np.ndarray,        # const int32_t[::1], const double[::1] IN (M,)
    ipt: np.ndarray, it: np.ndarray,       # const index_t[::1] IN target CSR
    wt: np.ndarray, off_t: np.ndarray,     # const double[::1] (E_t,), const int64_t[::1] (B+1,)
    plan_off: np.ndarray, f_off: np.ndarray, g_off: np.ndarray,  # const int64_t[::1] (B+1,)
    scaled: np.ndarray,                    # const uint8_t[::1] IN (B,) 1: scaling form
    w_type: float, w_act: float, w_deg: float,
    eps: float, iterations: int, tol: float, conv_tol: float,
    plan: np.ndarray,                      # double[::1] OUT sum_b (n_b+1)(m_b+1)
    fpot: np.ndarray, gpot: np.ndarray,    # double[::1] OUT potentials (f, g or u, v) per iteration
    terms: np.ndarray,                     # double[:, ::1] OUT (B, 4)
    used: np.ndarray,                      # int64_t[::1] OUT (B,)
    converged: np.ndarray,                 # uint8_t[::1] OUT (B,)
) -> None: ...
def _structural_loss_backward(
    x: np.ndarray, a: np.ndarray, lp: np.ndarray, dp: np.ndarray,
    ipp: np.ndarray, ip: np.ndarray, wp: np.ndarray, off_p: np.ndarray,
    y: np.ndarray, bm: np.ndarray, lt: np.ndarray, dt: np.ndarray,
    ipt: np.ndarray, it: np.ndarray, wt: np.ndarray, off_t: np.ndarray,
    f_off: np.ndarray, g_off: np.ndarray,  # const int64_t[::1] (B+1,)
    fpot: np.ndarray, gpot: np.ndarray,    # const double[::1] IN from the forward pass
    used: np.ndarray,                      # const int64_t[::1] IN (B,)
    scaled: np.ndarray,                    # const uint8_t[::1] IN (B,) as in the forward
    scale: np.ndarray,                     # const double[::1] IN (B,) d value / d value_b
    w_type: float, w_act: float, w_deg: float, eps: float,
    alpha: float, beta: float, gamma: float,
    gx: np.ndarray, ga: np.ndarray,        # double[::1] OUT (N,)
    gy: np.ndarray,                        # double[::1] OUT (M,)
) -> None: ...
def relax_chain_forward(
    H: np.ndarray,     # const double[:, ::1] IN (n, d)
    m: np.ndarray,     # const double[::1] IN (n,) merge weight of edge i -> i+1
    out: np.ndarray,   # double[:, ::1] OUT (n, d)
    D: np.ndarray,     # double[::1] OUT (n,)
    mass: np.ndarray,  # double[::1] OUT (n,)
    stream: bool = False,  # write out with streaming stores
) -> None: ...
def relax_chain_backward(
    m: np.ndarray,          # const double[::1] IN (n,)
    out: np.ndarray,        # const double[:, ::1] IN (n, d)
    D: np.ndarray,          # const double[::1] IN (n,)
    grad_out: np.ndarray,   # const double[:, ::1] IN (n, d)
    grad_mass: np.ndarray,  # const double[::1] IN (n,)
    grad_H: np.ndarray,     # double[:, ::1] OUT (n, d)
    grad_m: np.ndarray,     # double[::1] OUT (n,)
    stream: bool = False,   # write grad_H with streaming stores
) -> None: ...
