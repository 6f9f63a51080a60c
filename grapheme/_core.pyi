# Stubs for the graph and merge kernels in _core.pyx (private; callers
# validate). The chain relaxation is in _relax.pyi, the structural loss in
# _transport.pyi.
# Each parameter is commented with its Cython type; IN arrays are const
# memoryviews (read-only and memory-mapped arrays work), OUT arrays are
# written, "accumulated" ones are added to. index_t is int32_t or int64_t;
# floating is float or double (the same for every floating argument of a call).
import numpy as np

def openmp_threads() -> int: ...  # omp_get_max_threads(), or 0 without OpenMP

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
    x: np.ndarray,        # const floating[::1] IN (m,)
) -> bool: ...
def code_rows(
    codes: np.ndarray,    # const int64_t[::1] IN (V,) sorted, distinct
    rows: np.ndarray,     # const int64_t[::1] IN (V,)
    labels: np.ndarray,   # const int64_t[::1] IN (n,)
    out: np.ndarray,      # int64_t[::1] OUT (n,), -1: no row
    num_threads: int = 0,
) -> int: ...
def take_rows(
    table: np.ndarray,    # const floating[:, ::1] IN (V, d)
    rows: np.ndarray,     # const int64_t[::1] IN (n,), each in [0, V)
    out: np.ndarray,      # floating[:, ::1] OUT (n, d)
    num_threads: int = 0,
) -> None: ...
def row_means(
    x: np.ndarray,        # const floating[:, ::1] IN (n, d)
    out: np.ndarray,      # double[::1] OUT (n,)
    num_threads: int = 0,
) -> None: ...
def group_rows(
    rows: np.ndarray,     # const int64_t[::1] IN (n,), each in [0, V) (checked)
    mark: np.ndarray,     # int64_t[::1] SCRATCH (V,)
    used: np.ndarray,     # int64_t[::1] OUT (>= U,) the distinct rows, ascending
    codes: np.ndarray,    # int64_t[::1] OUT (n,) each node's index into used
    indptr: np.ndarray,   # int64_t[::1] OUT (>= U + 1,) of order, by code
    order: np.ndarray,    # int64_t[::1] OUT (n,) the nodes grouped by code, ascending
) -> int: ...              # U
def group_contexts(
    indptr: np.ndarray,     # const index_t[::1] IN (n+1,) out-edges
    indices: np.ndarray,    # const index_t[::1] IN (E,)
    t_indptr: np.ndarray,   # const index_t[::1] IN (n+1,) in-edges
    t_indices: np.ndarray,  # const index_t[::1] IN (E,)
    codes: np.ndarray,      # const int64_t[::1] IN (n,) each in [0, U) (checked)
    count: np.ndarray,      # int64_t[::1] SCRATCH (U + 2,)
    order: np.ndarray,      # int64_t[::1] SCRATCH (n,)
    swap: np.ndarray,       # int64_t[::1] SCRATCH (n,)
    contexts: np.ndarray,   # int64_t[::1] OUT (n,) each node's context
    first: np.ndarray,      # int64_t[::1] OUT (>= C,) each context's smallest node
) -> int: ...               # C, or -1 where a node has two predecessors or successors
def lookup_layer_backward(
    indptr: np.ndarray,     # const index_t[::1] IN (n+1,) out-edges
    indices: np.ndarray,    # const index_t[::1] IN (E,)
    weights: np.ndarray,    # const double[::1] IN (E,) or (0,)
    t_indptr: np.ndarray,   # const index_t[::1] IN (n+1,) in-edges
    t_indices: np.ndarray,  # const index_t[::1] IN (E,)
    t_weights: np.ndarray,  # const double[::1] IN (E,) or (0,)
    group_ptr: np.ndarray,  # const int64_t[::1] IN (U+1,) of order (group_rows)
    order: np.ndarray,      # const int64_t[::1] IN (n,) the nodes by row
    grad: np.ndarray,       # const floating[:, ::1] IN (n, d) of the layer's output
    gz: np.ndarray,         # const floating[:, ::1] IN (n, d) of its pre-activation
    rg: np.ndarray,         # floating[:, ::1] OUT (U, d) sums of grad by row
    rz: np.ndarray,         # floating[:, ::1] OUT (U, 3d) sums of [gz, S gz, P gz] by row
    num_threads: int = 0,
) -> None: ...
def lookup_layer_backward_at(
    indptr: np.ndarray,     # const index_t[::1] IN (n+1,) out-edges
    indices: np.ndarray,    # const index_t[::1] IN (E,)
    weights: np.ndarray,    # const double[::1] IN (E,) or (0,)
    t_indptr: np.ndarray,   # const index_t[::1] IN (n+1,) in-edges
    t_indices: np.ndarray,  # const index_t[::1] IN (E,)
    t_weights: np.ndarray,  # const double[::1] IN (E,) or (0,)
    codes: np.ndarray,      # const int64_t[::1] IN (n,) each in [0, U) (checked)
    nodes: np.ndarray,      # const int64_t[::1] IN (k,) each in [0, n) (checked)
    grad: np.ndarray,       # const floating[:, ::1] IN (k, d) of the layer's rows
    gz: np.ndarray,         # const floating[:, ::1] IN (k, d) of their pre-activation
    rg: np.ndarray,         # floating[:, ::1] OUT (U, d) sums of grad by row
    rz: np.ndarray,         # floating[:, ::1] OUT (U, 3d) [gz, gz into preds, into succs]
    num_threads: int = 0,
) -> None: ...
def broadcast_column(
    column: np.ndarray,   # const floating[::1] IN (n,)
    out: np.ndarray,      # floating[:, ::1] OUT (n, d), out[i, :] = column[i]
    num_threads: int = 0,
) -> None: ...
def rows_add(
    rows: np.ndarray,     # const int64_t[::1] IN (n,), each in [0, V) (checked)
    values: np.ndarray,   # const floating[:, ::1] IN (n, d)
    out: np.ndarray,      # floating[:, ::1] OUT (V, d), accumulated
) -> None: ...
def edge_cosine(
    indptr: np.ndarray,   # const index_t[::1] IN (n+1,)
    indices: np.ndarray,  # const index_t[::1] IN (E,)
    H: np.ndarray,        # const floating[:, ::1] IN (n, d)
    norms: np.ndarray,    # double[::1] OUT (n,)
    sim: np.ndarray,      # double[::1] OUT (E,)
    num_threads: int = 0,
) -> None: ...
def edge_cosine_backward(
    indptr: np.ndarray,   # const index_t[::1] IN (n+1,)
    indices: np.ndarray,  # const index_t[::1] IN (E,)
    H: np.ndarray,        # const floating[:, ::1] IN (n, d)
    norms: np.ndarray,    # const double[::1] IN (n,)
    sim: np.ndarray,      # const double[::1] IN (E,)
    grad_sim: np.ndarray, # const double[::1] IN (E,)
    grad_H: np.ndarray,   # floating[:, ::1] OUT (n, d), accumulated
    num_threads: int = 0,
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
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]: ...  # weights: None where
                                                        # unweighted and nothing folded
def gather(
    cluster: np.ndarray,      # const index_t[::1] IN (n,)
    hist_indptr: np.ndarray,  # const index_t[::1] IN (k+1,)
    members: np.ndarray,      # const index_t[::1] IN (n,), ascending per output
    node_weights: np.ndarray, # const double[::1] IN (n,), or (0,) for 1 / |output|
    x: np.ndarray,            # const floating[:, ::1] IN (n, d)
    out: np.ndarray,          # floating[:, ::1] OUT (k, d)
    num_threads: int = 0,     # threads; 0: OpenMP's default
) -> None: ...
def scatter(
    cluster: np.ndarray,      # const index_t[::1] IN (n,)
    hist_indptr: np.ndarray,  # const index_t[::1] IN (k+1,)
    node_weights: np.ndarray, # const double[::1] IN (n,), or (0,) for 1 / |output|
    g: np.ndarray,            # const floating[:, ::1] IN (k, d)
    out: np.ndarray,          # floating[:, ::1] OUT (n, d)
    stream: bool = False,     # write out with non-temporal stores
    num_threads: int = 0,     # threads; 0: OpenMP's default
) -> None: ...

STREAM_MIN_BYTES: int
def transpose_csr(
    indptr: np.ndarray,     # const index_t[::1] IN (n+1,)
    indices: np.ndarray,    # const index_t[::1] IN (E,)
    weights: np.ndarray,    # const double[::1] IN (E,) or (0,)
    t_indptr: np.ndarray,   # index_t[::1] OUT (n+1,)
    t_indices: np.ndarray,  # index_t[::1] OUT (E,)
    t_weights: np.ndarray,  # double[::1] OUT (E,) or (0,)
) -> None: ...
def stack_neighbours(
    indptr: np.ndarray,     # const index_t[::1] IN (n+1,) out-edges
    indices: np.ndarray,    # const index_t[::1] IN (E,)
    weights: np.ndarray,    # const double[::1] IN (E,) or (0,)
    t_indptr: np.ndarray,   # const index_t[::1] IN (n+1,) in-edges (transpose_csr)
    t_indices: np.ndarray,  # const index_t[::1] IN (E,)
    t_weights: np.ndarray,  # const double[::1] IN (E,) or (0,)
    x: np.ndarray,          # const floating[:, :] IN (n, d), contiguous rows
    cat: np.ndarray,        # floating[:, ::1] OUT (n, 3d): [x, A^T x, A x]
    num_threads: int = 0,
) -> None: ...
def tanh_backward(
    t: np.ndarray,          # const floating[:, ::1] IN (n, d)
    grad: np.ndarray,       # const floating[:, ::1] IN (n, d)
    grad_z: np.ndarray,     # floating[:, ::1] OUT (n, d)
    grad_bias: np.ndarray,  # floating[::1] OUT (d,)
    num_threads: int = 0,
) -> None: ...
def edge_cosine_qk(
    indptr: np.ndarray,   # const index_t[::1] IN (n+1,)
    indices: np.ndarray,  # const index_t[::1] IN (E,)
    Q: np.ndarray,        # const floating[:, ::1] IN (n, d)
    K: np.ndarray,        # const floating[:, ::1] IN (n, d)
    qnorms: np.ndarray,   # double[::1] OUT (n,)
    knorms: np.ndarray,   # double[::1] OUT (n,)
    sim: np.ndarray,      # double[::1] OUT (E,)
    num_threads: int = 0,
) -> None: ...
def edge_cosine_qk_backward(
    indptr: np.ndarray,    # const index_t[::1] IN (n+1,)
    indices: np.ndarray,   # const index_t[::1] IN (E,)
    Q: np.ndarray,         # const floating[:, ::1] IN (n, d)
    K: np.ndarray,         # const floating[:, ::1] IN (n, d)
    qnorms: np.ndarray,    # const double[::1] IN (n,)
    knorms: np.ndarray,    # const double[::1] IN (n,)
    sim: np.ndarray,       # const double[::1] IN (E,)
    grad_sim: np.ndarray,  # const double[::1] IN (E,)
    grad_Q: np.ndarray,    # floating[:, ::1] OUT (n, d), accumulated
    grad_K: np.ndarray,    # floating[:, ::1] OUT (n, d), accumulated
    num_threads: int = 0,
    accumulate: bool = True,  # False: written, not added
) -> None: ...
