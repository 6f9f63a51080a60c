# cython: language_level=3
"""Graph and merge kernels of grapheme (private): chains, hashing, edge
similarity, components, merge histories, contraction, gather and scatter,
and the encoder's row kernels (grouping, neighbour stacking, the layer and
tanh backwards; the encoder's products are in ``_products.pyx``). The chain
relaxation is in ``_relax.pyx``, the structural loss in ``_transport.pyx``;
shared types and row helpers in ``_types.pxd``.

The public Python layer validates shapes, dtypes, ranges and finiteness
first and raises ``ValueError``/``TypeError`` naming the argument; the
kernels trust that, except ``gather`` and ``scatter``, which check a merge
history's arrays once more (O(n), in C) before indexing with them
unchecked: a second line of defence where a wrong index would write out of
bounds. Kernels take typed, C-contiguous memoryviews (``const``
for inputs so read-only and memory-mapped arrays work), run without the GIL
and are linear in their input unless the docstring says otherwise.
"""
import numpy as np
from libc.stdint cimport int64_t, uint8_t, uint64_t
from libc.math cimport sqrt, log, cos, sin, M_PI
from libc.string cimport memcpy, memset

from grapheme._types cimport (
    index_t, intp_t, row_scale, row_add_to, row_scale_stream, row_scale_stream_a16,
    store_fence, _rows_a16, OPENMP, max_threads, num_threads_for,
    floating, row_scale_f, row_add_to_f, _stack_row, _row_add, _row_sum, _edges_both_ways, _dot,
    _first_outside, _finite,
)
from cython.parallel cimport prange

cdef double COS_EPS = 1e-12
# rows a thread takes at least in the row-parallel kernels (the encoder's,
# gather, scatter, take_rows; and the block of tanh_backward's fixed-order
# column sums)
cdef intp_t _ROWS_PER_THREAD = 1024


def openmp_threads():
    """OpenMP's default thread count now (``omp_get_max_threads()``, which
    ``OMP_NUM_THREADS`` and threadpoolctl set), or 0 if the kernels were
    built without OpenMP."""
    return max_threads() if OPENMP else 0


# ---------------------------------------------------------------------------
# Graph building
# ---------------------------------------------------------------------------

def chain_csr(const int64_t[::1] lengths,  # IN  (B,) node count of each chain
              index_t[::1] indptr,         # OUT (N+1,)
              index_t[::1] indices):       # OUT (N - #non-empty chains,)
    """Fill the block-diagonal CSR of B chains (edges i -> i+1 inside a chain).

    O(N) for N = sum(lengths) nodes.
    """
    cdef intp_t b, i, length, node = 0, e = 0
    with nogil:
        indptr[0] = 0
        for b in range(lengths.shape[0]):
            length = lengths[b]
            for i in range(length):
                if i + 1 < length:
                    indices[e] = <index_t>(node + 1)
                    e += 1
                node += 1
                indptr[node] = <index_t>e


def hash_normal(uint64_t seed,                # IN
                const int64_t[::1] keys,      # IN  (V,)
                double[:, ::1] out):          # OUT (V, d)
    """Standard-normal rows, a pure function of ``(seed, key, column)``.

    A counter-based generator (splitmix64 + Box-Muller), so the row of a key
    does not depend on which other keys exist or in which order they came.
    O(V d).
    """
    cdef intp_t r, j, d = out.shape[1]
    cdef uint64_t state
    cdef double u1, u2, radius
    with nogil:
        for r in range(keys.shape[0]):
            state = _splitmix(seed ^ _splitmix(<uint64_t>keys[r] + 0x632BE59BD9B4E019ULL))
            j = 0
            while j < d:
                state = _splitmix(state)
                u1 = ((state >> 11) + 1.0) * (1.0 / 9007199254740993.0)   # (0, 1]
                state = _splitmix(state)
                u2 = (state >> 11) * (1.0 / 9007199254740992.0)           # [0, 1)
                radius = sqrt(-2.0 * log(u1))
                out[r, j] = radius * _cos2pi(u2)
                if j + 1 < d:
                    out[r, j + 1] = radius * _sin2pi(u2)
                j += 2


cdef inline uint64_t _splitmix(uint64_t x) noexcept nogil:
    x = x + 0x9E3779B97F4A7C15ULL
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL
    return x ^ (x >> 31)



cdef inline double _cos2pi(double u) noexcept nogil:
    return cos(2.0 * M_PI * u)

cdef inline double _sin2pi(double u) noexcept nogil:
    return sin(2.0 * M_PI * u)


def code_rows(const int64_t[::1] codes,   # IN  (V,) sorted, distinct
              const int64_t[::1] rows,    # IN  (V,) the row of each code
              const int64_t[::1] labels,  # IN  (n,)
              int64_t[::1] out,           # OUT (n,) the row of each label, -1: none
              int num_threads=0):         # IN  threads; <= 0: OpenMP's default
    """The table row of every label, found by binary search among the sorted
    ``codes`` (``np.searchsorted`` and the compare and gather after it, in
    one pass over the labels, in parallel); returns how many labels have no
    row. O(n log V)."""
    cdef intp_t n = labels.shape[0], V = codes.shape[0], i, lo, hi, mid
    cdef int64_t missing = 0, x
    if rows.shape[0] != V or out.shape[0] != n:
        raise ValueError(f"code_rows: rows must be ({V},) and out ({n},)")
    if n == 0:
        return 0
    cdef const int64_t* cp = &codes[0] if V else NULL
    cdef int nt = num_threads_for(num_threads, n // _ROWS_PER_THREAD + 1)
    with nogil:
        for i in prange(n, num_threads=nt, schedule="static"):
            x = labels[i]
            lo = 0
            hi = V
            while lo < hi:              # the first code >= x
                mid = (lo + hi) // 2
                if cp[mid] < x:
                    lo = mid + 1
                else:
                    hi = mid
            if lo < V and cp[lo] == x:
                out[i] = rows[lo]
            else:
                out[i] = -1
                missing += 1
    return missing


def take_rows(const floating[:, ::1] table,  # IN  (V, d)
              const int64_t[::1] rows,          # IN  (n,) rows of table, each in [0, V)
              floating[:, ::1] out,             # OUT (n, d)
              int num_threads=0):               # IN  threads; <= 0: OpenMP's default
    """``out[i] = table[rows[i]]``: ``np.take(table, rows, axis=0, out=out)``
    on the rows in parallel (a copy: the same bits on any thread count).
    The caller checks that every row lies in ``[0, V)``. O(n d)."""
    cdef intp_t n = rows.shape[0], d = table.shape[1], V = table.shape[0], i
    if out.shape[0] != n or out.shape[1] != d:
        raise ValueError(f"take_rows: out must be ({n}, {d}), got "
                         f"({out.shape[0]}, {out.shape[1]})")
    if n == 0 or d == 0:
        return
    if V == 0:
        raise ValueError("take_rows: table has no rows")
    cdef const floating* tp = &table[0, 0]
    cdef floating* op = &out[0, 0]
    cdef int nt = num_threads_for(num_threads, n // _ROWS_PER_THREAD + 1)
    with nogil:
        for i in prange(n, num_threads=nt, schedule="static"):
            memcpy(op + i * d, tp + rows[i] * d, d * sizeof(floating))


def group_rows(const int64_t[::1] rows,    # IN  (n,) rows of a table of V rows
               int64_t[::1] mark,          # SCRATCH (V,)
               int64_t[::1] used,          # OUT (>= U,) the distinct rows, ascending
               int64_t[::1] codes,         # OUT (n,) each node's index into used
               int64_t[::1] indptr,        # OUT (>= U + 1,) of order, by code
               int64_t[::1] order):        # OUT (n,) the nodes, grouped by code
    """The distinct rows a lookup reads, and its nodes grouped by row: returns
    ``U``, with ``used[:U]`` the distinct values of ``rows`` ascending,
    ``used[codes[i]] == rows[i]``, and ``order[indptr[u]:indptr[u + 1]]``
    the nodes whose row is ``used[u]``, ascending. A counting sort, on one
    thread: O(n + V). A row outside ``[0, V)`` raises ValueError before
    anything is written but ``mark``."""
    cdef intp_t n = rows.shape[0], V = mark.shape[0], i, v, U = 0
    if codes.shape[0] != n or order.shape[0] != n:
        raise ValueError(f"group_rows: codes and order must be ({n},)")
    i = _first_outside(&rows[0] if n else NULL, n, V)
    if i >= 0:
        raise ValueError(f"group_rows: row {rows[i]} is outside [0, {V})")
    with nogil:
        memset(&mark[0] if V else NULL, 0, V * sizeof(int64_t))
        for i in range(n):
            mark[rows[i]] += 1
        for v in range(V):
            if mark[v]:
                U += 1
    if used.shape[0] < U or indptr.shape[0] < U + 1:
        raise ValueError(f"group_rows: used must hold {U} rows and indptr {U + 1}")
    with nogil:
        # mark[v]: its count, then its code; indptr: the groups' starts
        indptr[0] = 0
        U = 0
        for v in range(V):
            if mark[v]:
                used[U] = v
                indptr[U + 1] = indptr[U] + mark[v]
                mark[v] = U
                U += 1
        for i in range(n):
            codes[i] = mark[rows[i]]
        for v in range(U):           # indptr[v + 1] - ...: the next free place
            mark[v] = indptr[v]
        for i in range(n):
            order[mark[codes[i]]] = i
            mark[codes[i]] += 1
    return U


cdef inline int64_t _neighbour_code(const index_t* ptr, const index_t* nbr,
                                    const int64_t* codes, intp_t i) noexcept nogil:
    """1 + the code of node ``i``'s one neighbour in ``nbr``, or 0 for none."""
    return codes[nbr[ptr[i]]] + 1 if ptr[i + 1] > ptr[i] else 0


cdef void _sort_by(const int64_t* key, const int64_t* src, int64_t* dst, int64_t* count,
                   intp_t n, intp_t K) noexcept nogil:
    """``dst`` = the nodes of ``src`` (``0..n-1`` if NULL) stably sorted by
    ``key[node]`` in ``[0, K)``: a counting sort, ``count`` (K + 1,)
    scratch. O(n + K)."""
    cdef intp_t q, i, k
    memset(count, 0, (K + 1) * sizeof(int64_t))
    for i in range(n):
        count[key[i] + 1] += 1
    for k in range(K):
        count[k + 1] += count[k]
    for q in range(n):
        i = src[q] if src != NULL else q
        dst[count[key[i]]] = i
        count[key[i]] += 1


def group_contexts(const index_t[::1] indptr,    # IN  (n+1,) out-edges
                   const index_t[::1] indices,   # IN  (E,)
                   const index_t[::1] t_indptr,  # IN  (n+1,) in-edges
                   const index_t[::1] t_indices, # IN  (E,)
                   const int64_t[::1] codes,     # IN  (n,) each in [0, U) (checked)
                   int64_t[::1] count,           # SCRATCH (U + 2,)
                   int64_t[::1] order,           # SCRATCH (n,)
                   int64_t[::1] swap,            # SCRATCH (n,)
                   int64_t[::1] contexts,        # OUT (n,) each node's context
                   int64_t[::1] first):          # OUT (>= C,) each context's first node
    """Group the nodes of a graph in which every node has at most one
    predecessor and one successor (a chain, a batch of chains) by context:
    the codes of the node's predecessor, of the node and of its successor,
    "none" being a code of its own. Returns C, the number of contexts, with
    ``contexts[i]`` node ``i``'s, numbered in the order of (predecessor,
    node, successor) codes, and ``first[c]`` the smallest node of context
    ``c``; or -1, having written neither, if a node has two predecessors or
    two successors. Nodes of one context see the same rows at every step of
    a message-passing layer over codes, so its output is the same for all
    of them (``Encoder.forward_lookup``). Three stable counting sorts on one
    thread: O(n + U). A code outside ``[0, U)`` raises ValueError."""
    cdef intp_t n = codes.shape[0], U = count.shape[0] - 2, q, i, C = 0
    cdef int64_t prev_p = -1, prev_c = -1, prev_s = -1, p, s
    cdef bint chain = True
    if U < 0:
        raise ValueError("group_contexts: count must be (U + 2,)")
    if indptr.shape[0] != n + 1 or t_indptr.shape[0] != n + 1 \
            or t_indices.shape[0] != indices.shape[0]:
        raise ValueError(f"group_contexts: codes has {n} nodes, so indptr and t_indptr must "
                         f"be ({n + 1},), and the transpose as large as the graph")
    if order.shape[0] != n or swap.shape[0] != n or contexts.shape[0] != n:
        raise ValueError(f"group_contexts: order, swap and contexts must be ({n},)")
    if n == 0:
        return 0
    cdef const index_t* nb = &indices[0] if indices.shape[0] else NULL
    cdef const index_t* t_nb = &t_indices[0] if t_indices.shape[0] else NULL
    cdef const index_t* ptr = &indptr[0]
    cdef const index_t* t_ptr = &t_indptr[0]
    cdef const int64_t* cp = &codes[0]
    cdef int64_t* key = &contexts[0]   # each pass's keys, until the contexts
    i = _first_outside(cp, n, U)
    if i >= 0:
        raise ValueError(f"group_contexts: code {cp[i]} is outside [0, {U})")
    with nogil:
        for i in range(n):
            if ptr[i + 1] - ptr[i] > 1 or t_ptr[i + 1] - t_ptr[i] > 1:
                chain = False
                break
    if not chain:
        return -1
    with nogil:
        # least significant first: by successor (into order), node (into
        # swap), predecessor (into order); each pass stable, so ties keep
        # ascending node order
        for i in range(n):
            key[i] = _neighbour_code(ptr, nb, cp, i)
        _sort_by(key, NULL, &order[0], &count[0], n, U + 1)
        _sort_by(cp, &order[0], &swap[0], &count[0], n, U)
        for i in range(n):
            key[i] = _neighbour_code(t_ptr, t_nb, cp, i)
        _sort_by(key, &swap[0], &order[0], &count[0], n, U + 1)
        for q in range(n):   # the contexts overwrite the keys, not read here
            i = order[q]
            p = _neighbour_code(t_ptr, t_nb, cp, i)
            s = _neighbour_code(ptr, nb, cp, i)
            if q == 0 or p != prev_p or cp[i] != prev_c or s != prev_s:
                C += 1
                prev_p, prev_c, prev_s = p, cp[i], s
            contexts[i] = C - 1
    if first.shape[0] < C:
        raise ValueError(f"group_contexts: first must hold {C} nodes")
    with nogil:
        for q in range(n - 1, -1, -1):   # the smallest node last
            i = order[q]
            first[contexts[i]] = i
    return C


def lookup_layer_backward(const index_t[::1] indptr,     # IN  (n+1,) out-edges
                          const index_t[::1] indices,    # IN  (E,)
                          const double[::1] weights,     # IN  (E,), or (0,)
                          const index_t[::1] t_indptr,   # IN  (n+1,) in-edges
                          const index_t[::1] t_indices,  # IN  (E,)
                          const double[::1] t_weights,   # IN  (E,), or (0,)
                          const int64_t[::1] group_ptr,  # IN  (U+1,) of order
                          const int64_t[::1] order,      # IN  (n,) nodes by row
                          const floating[:, ::1] grad,   # IN  (n, d) of the layer's output
                          const floating[:, ::1] gz,     # IN  (n, d) of its pre-activation
                          floating[:, ::1] rg,           # OUT (U, d)
                          floating[:, ::1] rz,           # OUT (U, 3d)
                          int num_threads=0):
    """The sums over each table row's nodes that the gradient of a layer
    taken on the rows of a table needs (``ops.LookupMessagePassing``):
    ``rg[u] = sum grad[i]`` and ``rz[u] = sum [gz[i], S[i], P[i]]`` over the
    nodes ``i`` of group ``u`` (:func:`group_rows`), ``S`` and ``P`` being
    the successor and predecessor sums of ``gz`` (the adjoints of the
    forward's predecessor and successor sums). Groups in parallel, each
    summed in node order, then edge order: the same bits on any number of
    threads. O((n + E) d)."""
    cdef intp_t U = group_ptr.shape[0] - 1, n = grad.shape[0], d = grad.shape[1], u, k, i, t
    if (gz.shape[0] != n or gz.shape[1] != d or order.shape[0] != n or U < 0
            or rg.shape[0] != U or rg.shape[1] != d or rz.shape[0] != U
            or rz.shape[1] != 3 * d):
        raise ValueError("lookup_layer_backward: grad and gz must be (n, d), order (n,), "
                         "rg (U, d) and rz (U, 3d)")
    # the groups index grad, gz and the graph: checked, O(U + n), so that a
    # stale saved (its workspace reused since) gives wrong numbers, never
    # a read out of bounds
    cdef bint bad = False
    cdef int64_t prev = 0
    with nogil:
        if U and (group_ptr[0] != 0 or group_ptr[U] != n):
            bad = True
        for u in range(U):
            if group_ptr[u + 1] < prev:
                bad = True
            prev = group_ptr[u + 1]
        for k in range(n):
            if order[k] < 0 or order[k] >= n:
                bad = True
    if bad:
        raise ValueError("lookup_layer_backward: group_ptr must run from 0 to n, "
                         "non-decreasing, and order hold nodes in [0, n)")
    cdef const index_t* nb
    cdef const index_t* t_nb
    cdef const double* w
    cdef const double* t_w
    _edges_both_ways("lookup_layer_backward", n, indptr, indices, weights, t_indptr,
                     t_indices, t_weights, &nb, &w, &t_nb, &t_w)
    if U == 0 or d == 0:
        return
    cdef floating* row
    cdef const floating* gp = &gz[0, 0]
    cdef int nt = num_threads_for(num_threads, n // _ROWS_PER_THREAD + 1)
    # groups handed out one at a time balance a few skewed ones (a first
    # layer's characters), but thousands of one-node groups (an encoder's
    # contexts) would spend the time on the shared counter: chunks of
    # groups, about 16 per thread
    cdef intp_t chunk = max(1, U // (16 * nt))
    with nogil:
        for u in prange(U, num_threads=nt, schedule="dynamic", chunksize=chunk):
            row = &rz[u, 0]
            for t in range(d):
                rg[u, t] = 0.0
            for t in range(3 * d):
                row[t] = 0.0
            for k in range(group_ptr[u], group_ptr[u + 1]):
                i = order[k]
                for t in range(d):
                    rg[u, t] += grad[i, t]
                    row[t] += gp[i * d + t]
                # the adjoint of the predecessor sum is the successor sum
                _row_sum(row + d, gp, d, nb, w, indptr[i], indptr[i + 1], d)
                _row_sum(row + 2 * d, gp, d, t_nb, t_w, t_indptr[i], t_indptr[i + 1], d)


# rows of the table below which lookup_layer_backward_at runs on one thread
cdef intp_t _SPLIT_ROWS = 256


def lookup_layer_backward_at(const index_t[::1] indptr,     # IN  (n+1,) out-edges
                             const index_t[::1] indices,    # IN  (E,)
                             const double[::1] weights,     # IN  (E,), or (0,)
                             const index_t[::1] t_indptr,   # IN  (n+1,) in-edges
                             const index_t[::1] t_indices,  # IN  (E,)
                             const double[::1] t_weights,   # IN  (E,), or (0,)
                             const int64_t[::1] codes,      # IN  (n,) each in [0, U)
                             const int64_t[::1] nodes,      # IN  (k,) each in [0, n)
                             const floating[:, ::1] grad,   # IN  (k, d) of the layer's rows
                             const floating[:, ::1] gz,     # IN  (k, d) of their pre-activation
                             floating[:, ::1] rg,           # OUT (U, d)
                             floating[:, ::1] rz,           # OUT (U, 3d)
                             int num_threads=0):
    """The sums :func:`lookup_layer_backward` makes, for a layer computed at
    some nodes only (``_products.lookup_layer`` with ``nodes``; row ``q``
    of ``grad`` and ``gz`` is node ``nodes[q]``'s): each node's ``grad``
    and ``gz`` added to its own row's ``rg`` and first block of ``rz``, and
    ``w gz`` to the second block of its predecessors' rows and the third of
    its successors' (the rows whose products it read). Nodes in order, then
    edges in order, each thread on a slice of the columns (one thread below
    ``_SPLIT_ROWS`` rows): the same bits on any number of threads. A code
    or a node out of range raises ValueError before anything is written.
    O((k + E) d + U d)."""
    cdef intp_t n = codes.shape[0], k = nodes.shape[0], U = rg.shape[0], d = grad.shape[1]
    cdef intp_t q, i, e, c
    if (grad.shape[0] != k or gz.shape[0] != k or gz.shape[1] != d or rg.shape[1] != d
            or rz.shape[0] != U or rz.shape[1] != 3 * d):
        raise ValueError("lookup_layer_backward_at: grad and gz must be (k, d), rg (U, d) "
                         "and rz (U, 3d)")
    cdef const index_t* nb
    cdef const index_t* t_nb
    cdef const double* w
    cdef const double* t_w
    _edges_both_ways("lookup_layer_backward_at", n, indptr, indices, weights, t_indptr,
                     t_indices, t_weights, &nb, &w, &t_nb, &t_w)
    if _first_outside(&codes[0] if n else NULL, n, U) >= 0:
        raise ValueError(f"lookup_layer_backward_at: codes must lie in [0, {U})")
    if _first_outside(&nodes[0] if k else NULL, k, n) >= 0:
        raise ValueError(f"lookup_layer_backward_at: nodes must lie in [0, {n})")
    if U == 0 or d == 0:
        return
    # threads take slices of the columns, each summing every node in
    # order: the same bits on any number of threads. Not below
    # _SPLIT_ROWS rows: the threads then write the same few rows all the
    # time, and two ran slower than one (the first layer's vjp of 256 and
    # 1,024 letter pairs, 25 rows: 0.32 -> 0.48 and 1.37 -> 1.62 ms), where
    # at thousands of rows they gain (4,615 rows 1.25 -> 1.02 ms, 8,452
    # rows 5.4 -> 3.6 ms)
    cdef int nt = 1
    if U >= _SPLIT_ROWS:
        nt = num_threads_for(num_threads, min(d // 8, k * d // 8192) + 1)
    cdef intp_t width = (d + nt - 1) // nt, cb, lo, cw
    cdef const floating* g
    with nogil:
        memset(&rg[0, 0], 0, U * d * sizeof(floating))
        memset(&rz[0, 0], 0, U * 3 * d * sizeof(floating))
        for cb in prange(nt, num_threads=nt, schedule="static"):
            lo = cb * width
            cw = min(d, lo + width) - lo
            for q in range(k):
                i = nodes[q]
                g = &gz[q, lo]
                _row_add(&rg[codes[i], lo], &grad[q, lo], 1.0, cw)
                _row_add(&rz[codes[i], lo], g, 1.0, cw)
                for e in range(t_indptr[i], t_indptr[i + 1]):   # its predecessors' W_pred
                    _row_add(&rz[codes[t_nb[e]], d + lo], g,
                             t_w[e] if t_w != NULL else 1.0, cw)
                for e in range(indptr[i], indptr[i + 1]):       # its successors' W_succ
                    _row_add(&rz[codes[nb[e]], 2 * d + lo], g,
                             w[e] if w != NULL else 1.0, cw)


def rows_add(const int64_t[::1] rows not None,        # IN  (n,) each in [0, V)
             const floating[:, ::1] values not None,  # IN  (n, d)
             floating[:, ::1] out not None):          # OUT (V, d), accumulated
    """``out[rows[i]] += values[i]`` (``np.add.at`` without its overhead).
    float32 or float64 (both arrays the same). O(n d). ValueError, before
    anything is written, on mismatched shapes or a row outside ``[0, V)``.

    Serial: it streams ``values`` once and is bound by that read. Two
    threads each adding every row into half of the columns ran 2x slower
    than one (31,000 x 64 into 60 rows: 1.33 against 0.67 ms); two threads
    each walking every input in order and adding those of its own half of
    the destination rows (each entry's terms in the serial order) ran
    0.62-0.69 against 0.59 ms; grouping the inputs by row first (a
    counting sort) read them out of order, 1.25 ms."""
    cdef intp_t n = rows.shape[0], V = out.shape[0], d = values.shape[1], i, j, r
    if values.shape[0] != n or out.shape[1] != d:
        raise ValueError(f"rows_add: values must be ({n}, {out.shape[1]}) (one row per "
                         f"entry of rows, out's columns), got ({values.shape[0]}, {d})")
    i = _first_outside(&rows[0] if n else NULL, n, V)
    if i >= 0:
        raise ValueError(f"rows_add: row {rows[i]} is outside [0, {V}) (the rows of out)")
    with nogil:
        for i in range(n):
            r = rows[i]
            for j in range(d):
                out[r, j] += values[i, j]


def broadcast_column(const floating[::1] column not None,   # IN  (n,)
                     floating[:, ::1] out not None,         # OUT (n, d)
                     int num_threads=0):           # IN  threads; <= 0: OpenMP's default
    """``out[i, :] = column[i]`` (``np.copyto(out, column[:, None])``), by
    fixed blocks of ``_ROWS_PER_THREAD`` rows in parallel: a copy, the same
    bytes on any number of threads. ValueError unless ``out`` has one row
    per entry of ``column``. O(n d)."""
    cdef intp_t n = out.shape[0], d = out.shape[1], b, i, j, nb
    cdef floating v
    if column.shape[0] != n:
        raise ValueError(f"broadcast_column: out must have {column.shape[0]} rows, got {n}")
    if n == 0 or d == 0:
        return
    nb = (n + _ROWS_PER_THREAD - 1) // _ROWS_PER_THREAD
    cdef int nt = num_threads_for(num_threads, nb)
    with nogil:
        for b in prange(nb, num_threads=nt, schedule="static"):
            for i in range(b * _ROWS_PER_THREAD, min(n, (b + 1) * _ROWS_PER_THREAD)):
                v = column[i]
                for j in range(d):
                    out[i, j] = v


cdef extern from *:
    """
    /* numpy's pairwise summation of a contiguous a[0:n] (DOUBLE_pairwise_sum,
       numpy/_core/src/umath/loops_utils.h.src): the order in which np.sum
       and np.mean add along a contiguous axis, so a row mean here has
       numpy's bits (checked against numpy for d = 1..9000 when this was
       written; the tests ask only 1 ulp). Below 8 terms in turn, up to 128
       in eight interleaved partial sums, above that split in two halves (a
       multiple of 8 first). numpy adds the result to its reduction's
       initial 0.0, which turns a sum of -0.0 into +0.0: grapheme_row_sum
       does the same. */
    static double grapheme_pairwise_sum(const double *a, Py_ssize_t n) {
        if (n < 8) {
            double res = 0.0;
            for (Py_ssize_t i = 0; i < n; ++i) res += a[i];
            return res;
        }
        if (n <= 128) {
            double r[8], res;
            Py_ssize_t i;
            for (int k = 0; k < 8; ++k) r[k] = a[k];
            for (i = 8; i < n - (n % 8); i += 8)
                for (int k = 0; k < 8; ++k) r[k] += a[i + k];
            res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
            for (; i < n; ++i) res += a[i];
            return res;
        }
        Py_ssize_t n2 = n / 2;
        n2 -= n2 % 8;
        return grapheme_pairwise_sum(a, n2) + grapheme_pairwise_sum(a + n2, n - n2);
    }

    /* A float64 row's sum as np.sum(axis=1) takes it: 0.0 + the pairwise sum
       (an all -0.0 row sums to +0.0). */
    static double grapheme_row_sum(const double *a, Py_ssize_t n) {
        return 0.0 + grapheme_pairwise_sum(a, n);
    }

    /* float32 rows, summed in double in four interleaved partial sums as
       grapheme_dot_f: an order that depends on n only. */
    static double grapheme_sum_f(const float *a, Py_ssize_t n) {
        double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
        Py_ssize_t j = 0;
        for (; j + 3 < n; j += 4) {
            s0 += a[j];
            s1 += a[j + 1];
            s2 += a[j + 2];
            s3 += a[j + 3];
        }
        for (; j < n; ++j) s0 += a[j];
        return (s0 + s1) + (s2 + s3);
    }
    """
    double _numpy_sum "grapheme_row_sum"(const double* a, intp_t n) noexcept nogil
    double _sum_f "grapheme_sum_f"(const float* a, intp_t n) noexcept nogil


def row_means(const floating[:, ::1] x not None,   # IN  (n, d)
              double[::1] out not None,            # OUT (n,)
              int num_threads=0):          # IN  threads; <= 0: OpenMP's default
    """``out[i] = mean(x[i])`` in float64: float64 rows in numpy's pairwise
    order (``x.mean(axis=1)``'s bits), float32 rows summed in float64 in
    four interleaved partial sums as ``grapheme_dot_f``; zeros when
    ``d == 0``, as :func:`grapheme.ops.feature_mean`. Each row is one
    thread's, by fixed blocks of ``_ROWS_PER_THREAD`` rows in parallel, so
    the bits do not depend on the thread count. ValueError unless ``out``
    has ``n`` entries. O(n d)."""
    cdef intp_t n = x.shape[0], d = x.shape[1], b, i, nb
    if out.shape[0] != n:
        raise ValueError(f"row_means: out must have {n} entries (one per row of x), "
                         f"got {out.shape[0]}")
    if n == 0:
        return
    if d == 0:
        out[:] = 0.0
        return
    nb = (n + _ROWS_PER_THREAD - 1) // _ROWS_PER_THREAD
    cdef int nt = num_threads_for(num_threads, nb)
    with nogil:
        for b in prange(nb, num_threads=nt, schedule="static"):
            for i in range(b * _ROWS_PER_THREAD, min(n, (b + 1) * _ROWS_PER_THREAD)):
                if floating is double:
                    out[i] = _numpy_sum(&x[i, 0], d) / d
                else:
                    out[i] = _sum_f(&x[i, 0], d) / d


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------

def all_finite(const floating[::1] x):     # IN  (m,)
    """True if no element of ``x`` (float32 or float64) is NaN or infinite.
    O(m), one read, no temporary (``np.isfinite(x).all()`` writes an m-byte
    mask first). On one thread, on purpose: every argument check runs it,
    and a parallel region there would make plain validation hang in a
    child forked after the parent ran one (GNU OpenMP does not survive
    ``fork``; see "Threads" in docs/design.md)."""
    cdef bint ok = True
    if x.shape[0]:
        with nogil:
            ok = _finite(&x[0], x.shape[0])
    return ok


# ---------------------------------------------------------------------------
# Edge similarity
# ---------------------------------------------------------------------------

cdef extern from *:
    """
    /* dst[0:d] += a * x[0:d] - b * y[0:d]; dst may not overlap x or y. */
    static inline void grapheme_row_axpby(double *__restrict dst,
                                          const double *__restrict x, double a,
                                          const double *__restrict y, double b,
                                          Py_ssize_t d) {
        for (Py_ssize_t t = 0; t < d; ++t) dst[t] += a * x[t] - b * y[t];
    }

    /* float32 rows: the update is in float with the coefficients rounded
       once (the dot products: grapheme_dot_f in _types.pxd). */
    static inline void grapheme_row_axpby_f(float *__restrict dst,
                                            const float *__restrict x, double a,
                                            const float *__restrict y, double b,
                                            Py_ssize_t d) {
        const float af = (float)a, bf = (float)b;
        for (Py_ssize_t t = 0; t < d; ++t) dst[t] += af * x[t] - bf * y[t];
    }
    """
    void row_axpby "grapheme_row_axpby"(double* dst, const double* x, double a,
                                        const double* y, double b, intp_t d) noexcept nogil
    void row_axpby_f "grapheme_row_axpby_f"(float* dst, const float* x, double a,
                                            const float* y, double b, intp_t d) noexcept nogil


cdef inline void _axpby(floating* dst, const floating* x, double a, const floating* y,
                        double b, intp_t d) noexcept nogil:
    if floating is double:
        row_axpby(dst, x, a, y, b, d)
    else:
        row_axpby_f(dst, x, a, y, b, d)


# ---------------------------------------------------------------------------
# Merging: union-find, merge history, contraction
# ---------------------------------------------------------------------------

cdef inline index_t _find(index_t* parent, index_t x) noexcept nogil:
    # path halving
    while parent[x] != x:
        parent[x] = parent[parent[x]]
        x = parent[x]
    return x


def components(const index_t[::1] indptr,    # IN  (n+1,)
               const index_t[::1] indices,   # IN  (E,)
               const uint8_t[::1] merge,     # IN  (E,) 1 = merge this edge
               index_t[::1] cluster):        # OUT (n,)
    """Connected components of the merged edges, numbered by their earliest node.

    Union by size with path halving: O(n alpha(n) + E). Component ``c`` is the
    c-th distinct component met scanning nodes 0..n-1, so its head (lowest
    node) is increasing in ``c``. Returns the number of components.

    Work arrays have the index type of the graph (two of them, 2 n entries):
    int32 graphs move half the memory of intp ones.
    """
    cdef intp_t n = cluster.shape[0], u, e, k = 0
    if n == 0:
        return 0
    cdef bint chain
    with nogil:
        chain = _chain_components(indptr, indices, merge, cluster, &k)
    if chain:
        return k
    parent_arr = np.empty(n, dtype=np.asarray(cluster).dtype)
    size_arr = np.empty(n, dtype=parent_arr.dtype)
    cdef index_t[::1] parent_view = parent_arr
    cdef index_t[::1] size_view = size_arr
    cdef index_t* parent = &parent_view[0]
    cdef index_t* size = &size_view[0]   # size of a root; then -(label + 1)
    cdef index_t ru, rv, tmp
    with nogil:
        for u in range(n):
            parent[u] = <index_t>u
            size[u] = 1
        for u in range(n):
            for e in range(indptr[u], indptr[u + 1]):
                if not merge[e]:
                    continue
                ru = _find(parent, <index_t>u)
                rv = _find(parent, indices[e])
                if ru == rv:
                    continue
                if size[ru] < size[rv]:
                    tmp = ru
                    ru = rv
                    rv = tmp
                parent[rv] = ru
                size[ru] += size[rv]
        # label pass: a root's size (> 0) becomes -(label + 1) when first met
        for u in range(n):
            ru = _find(parent, <index_t>u)
            if size[ru] > 0:
                size[ru] = <index_t>(-(k + 1))
                k += 1
            cluster[u] = -size[ru] - 1
    return k


cdef bint _chain_components(const index_t[::1] indptr, const index_t[::1] indices,
                            const uint8_t[::1] merge, index_t[::1] cluster,
                            intp_t* k) noexcept nogil:
    """Fast path of :func:`components` for chain-ordered graphs (every edge is
    u -> u+1, as text produces): one scan, ``cluster[u+1] = cluster[u] + (edge
    u -> u+1 not merged)``. Returns False, having written only ``cluster``,
    when the graph is not chain-ordered. O(n).

    No branch depends on the merge decisions (random for a learned
    threshold): a mispredicted one per node cost more than the scan."""
    cdef intp_t n = cluster.shape[0], u, c = 0, at
    cdef index_t start, stop
    cdef bint has
    if indices.shape[0] == 0:              # no edges: every node alone
        for u in range(n):
            cluster[u] = <index_t>u
        k[0] = n
        return True
    cluster[0] = 0
    for u in range(n):
        start = indptr[u]
        stop = indptr[u + 1]
        has = stop > start
        at = start if has else 0           # a valid index to read when u has no edge
        if stop - start > 1 or (has and indices[at] != u + 1):
            return False
        if u + 1 < n:
            c += 1 - (has & (merge[at] != 0))
            cluster[u + 1] = <index_t>c
    k[0] = c + 1
    return True


def history_csr(const index_t[::1] cluster,      # IN  (n,) output of each input
                const double[::1] node_weight,   # IN  (n,), or empty: uniform
                index_t[::1] indptr,             # OUT (k+1,)
                index_t[::1] members,            # OUT (n,)
                double[::1] weights):            # OUT (n,); empty when node_weight is
    """Output -> inputs CSR of a merge map. O(n + k).

    Members of an output are ascending (its head first); ``weights[j] =
    node_weight[members[j]]``. Uniform weights (``node_weight`` empty) are
    not stored: the kernels compute ``1 / |c|`` where they need it. When
    ``cluster`` is non-decreasing (every merge of a chain: outputs are
    contiguous runs) the CSR is read off in one pass; otherwise a stable
    counting sort builds it.
    """
    cdef intp_t n = cluster.shape[0], k = indptr.shape[0] - 1, i
    cdef bint weighted = node_weight.shape[0] != 0
    cdef bint runs = True
    cdef index_t[::1] fill
    with nogil:                           # one pass: check for runs while filling
        indptr[0] = 0
        for i in range(n):
            if i and cluster[i] < cluster[i - 1]:
                runs = False
                break
            # the last write to indptr[c + 1] is the end of run c: no branch
            # on where a run starts (as unpredictable as the merges)
            indptr[cluster[i] + 1] = <index_t>(i + 1)
            members[i] = <index_t>i
        if runs:
            indptr[k] = <index_t>n
            if weighted:
                for i in range(n):
                    weights[i] = node_weight[i]
    if not runs:
        fill = np.zeros(k + 1, dtype=np.asarray(indptr).dtype)
        _counting_sort(cluster, node_weight, weighted, fill, indptr, members, weights)


cdef void _counting_sort(const index_t[::1] cluster, const double[::1] node_weight,
                         bint weighted, index_t[::1] fill, index_t[::1] indptr,
                         index_t[::1] members, double[::1] weights) noexcept:
    cdef intp_t n = cluster.shape[0], k = indptr.shape[0] - 1, i, c, j
    with nogil:
        for i in range(n):
            fill[cluster[i] + 1] += 1
        for c in range(k):
            fill[c + 1] += fill[c]
        for c in range(k + 1):
            indptr[c] = fill[c]
        for i in range(n):
            c = cluster[i]
            j = fill[c]
            fill[c] += 1
            members[j] = <index_t>i
            if weighted:
                weights[j] = node_weight[i]


def contract(const index_t[::1] indptr,        # IN  (n+1,) input graph
             const index_t[::1] indices,       # IN  (E,)
             const double[::1] edge_weight,    # IN  (E,) or empty (unweighted)
             const index_t[::1] cluster,       # IN  (n,)
             const index_t[::1] hist_indptr,   # IN  (k+1,), no output without inputs
             const index_t[::1] members):      # IN  (n,)
    """Contract the graph along ``cluster``: edge (u, v) becomes (c(u), c(v));
    self-loops are dropped and duplicates folded (weights summed; an
    unweighted edge weighs 1).

    Targets in a row appear in first-seen order, walking members ascending
    and each member's edges in order. O(n + E + k). Returns
    ``(indptr, indices, weights)`` with the dtype of ``indptr``; ``weights`` is
    None for an unweighted graph where no two edges folded into one (a
    chain's contraction, always), else the folded edges' counts: a second
    pass with unit weights.

    One pass into arrays of the upper bound E, shrunk in place at the end.
    No branch depends on which edges were merged: every edge writes its
    target at ``total`` and advances ``total`` by 0 or 1, and the output of a
    member advances by 0 or 1 the same way (a mispredicted branch per node
    cost more than the pass).
    """
    cdef intp_t k = hist_indptr.shape[0] - 1, n = members.shape[0], E = indices.shape[0]
    cdef intp_t c = 0, j, u, e, cv, total = 0, start = 0, slot, fresh, new_row, kept = 0
    cdef bint weighted = edge_weight.shape[0] > 0
    dtype = np.asarray(indptr).dtype
    # seen[cv]: the slot of target cv in the row that last met it
    seen_arr = np.full(k, -1, dtype=dtype)
    out_indptr_arr = np.empty(k + 1, dtype=dtype)
    out_indices_arr = np.empty(E, dtype=dtype)
    out_weights_arr = np.zeros(E + 1 if weighted else 0)   # slot E takes self-loops
    cdef index_t[::1] seen = seen_arr
    cdef index_t[::1] out_indptr = out_indptr_arr
    cdef index_t[::1] out_indices = out_indices_arr
    cdef double[::1] out_weights = out_weights_arr
    with nogil:
        out_indptr[0] = 0
        for j in range(n):
            new_row = j == hist_indptr[c + 1]
            c += new_row
            start = total if new_row else start
            u = members[j]
            for e in range(indptr[u], indptr[u + 1]):
                cv = cluster[indices[e]]
                fresh = (cv != c) & (seen[cv] < start)
                slot = total if fresh else seen[cv]
                out_indices[total] = <index_t>cv     # kept only if fresh
                seen[cv] = <index_t>slot
                total += fresh
                kept += cv != c
                if weighted:
                    out_weights[slot if cv != c else E] += edge_weight[e]
            out_indptr[c + 1] = <index_t>total
    out_indices = out_weights = None       # no view may outlive the realloc
    out_indices_arr.resize(total, refcheck=False)
    if not weighted:
        if kept == total:
            return out_indptr_arr, out_indices_arr, None
        # duplicates folded: without weights each would count once
        return contract(indptr, indices, np.ones(E), cluster, hist_indptr, members)
    out_weights_arr.resize(total, refcheck=False)
    return out_indptr_arr, out_indices_arr, out_weights_arr


# ---------------------------------------------------------------------------
# Gather / scatter through a merge history
# ---------------------------------------------------------------------------
#
# Both kernels are bound by memory traffic at scale. Three things keep them
# near the machine's copy bandwidth:
#
# * the row loops (in _types.pxd) are plain C on ``__restrict`` pointers, so the
#   compiler keeps them in vector registers (a memoryview loop must assume
#   that ``out`` and ``x`` alias and reloads every element);
# * both walk the inputs in order, not the outputs' member lists: a loop over
#   the members of each output exits at a random count, and its mispredicted
#   exits cost as much as the rows (scatter 8 -> 4 ns/node in cache). Gather
#   must start each output's sum at its head (its earliest input, met first)
#   and a branch on "is this input a head" is just as unpredictable, so it
#   selects the row it adds to without a branch: the output row, or a row of
#   -0.0 for a head (x + -0.0 == x for every x, so the sums are the same bits
#   as the CSR walk's; ``python -m bench --filter Gather``: 6.6-8.0 -> 5.4
#   ns/node at 1e5 x 16, in cache, and 7.1 -> 6.6 at 1e7);
# * ``scatter(..., stream=True)`` writes with non-temporal (streaming) stores
#   where the CPU has them (SSE2: every x86-64). A normal store first reads
#   the cache line it overwrites; an output far larger than the cache gains
#   nothing from that read but pays for it in bandwidth. The Python layer asks
#   for streaming only into a caller's ``out=`` buffer of at least
#   ``STREAM_MIN_BYTES``, never into a fresh result: fresh memory is zeroed
#   by the kernel on first touch, and streaming over those dirty lines
#   writes them twice.
#   (Streaming the gather output, with each output row summed in registers
#   and the input rows prefetched, measured 12.8 vs 15.6 ns/node at 1e7 x 16
#   and no change in cache: not worth a second gather for one regime.)

# Reused outputs at least this large are written with streaming stores (see
# above; the store helpers are in _types.pxd). Measured with ``python -m bench
# --filter Scatter`` on a 2-core Xeon: at 1e5 x 16 doubles (12.8 MB) normal
# stores win; from 1e6 x 16 (128 MB) streaming is 1.5x faster.
STREAM_MIN_BYTES = 64 * 1024 * 1024



cdef inline void _zero(floating* dst, intp_t d) noexcept nogil:
    cdef intp_t t
    for t in range(d):
        dst[t] = 0.0


def _check_pool(const index_t[::1] cluster, const index_t[::1] hist_indptr,
                const double[::1] node_weights, intp_t n, intp_t k, intp_t d, intp_t d2,
                str name):
    """The shapes gather and scatter read, and that every cluster label is
    an output (O(n)): the kernels index with them unchecked."""
    cdef intp_t i
    cdef index_t c
    if cluster.shape[0] != n or hist_indptr.shape[0] != k + 1 or d2 != d:
        raise ValueError(f"{name}: cluster ({cluster.shape[0]},), hist_indptr "
                         f"({hist_indptr.shape[0]},), {n} input and {k} output rows of "
                         f"{d2} and {d} columns disagree")
    if node_weights.shape[0] not in (0, n):
        raise ValueError(f"{name}: node_weights must have 0 or {n} entries, "
                         f"got {node_weights.shape[0]}")
    for i in range(n):
        c = cluster[i]
        if c < 0 or c >= k:
            raise ValueError(f"{name}: cluster[{i}] = {c} is not an output of {k}")
    if hist_indptr[0] != 0 or hist_indptr[k] != n:
        raise ValueError(f"{name}: hist_indptr must run from 0 to {n}")
    for i in range(k):
        if hist_indptr[i + 1] < hist_indptr[i]:
            raise ValueError(f"{name}: hist_indptr must not decrease")


def gather(const index_t[::1] cluster,      # IN  (n,)
           const index_t[::1] hist_indptr,  # IN  (k+1,)
           const index_t[::1] members,      # IN  (n,), ascending within an output
           const double[::1] node_weights,  # IN  (n,), or (0,): 1 / |output|
           const floating[:, ::1] x,        # IN  (n, d)
           floating[:, ::1] out,            # OUT (k, d), must not overlap x
           int num_threads=0):
    """Pool inputs into outputs: ``out[c] = sum_i w_i x[i]`` over c's inputs,
    added in input order (the order of ``members``). O(n d + k).

    On one thread it walks the inputs in order (see the notes above); on
    more (``num_threads``, 0 for OpenMP's default, one below 1024 outputs)
    each thread takes fixed blocks of outputs and walks their members: the
    same additions in the same order, so the same bits. An output's head,
    ``members[hist_indptr[c]]``, starts its sum. With ``node_weights``
    empty, ``w_i`` is ``1 / |cluster[i]|``. An output without inputs is
    zeroed. ``x`` and ``out`` float32 or float64 (the weights stay float64;
    a float32 row adds ``float(w) x[i]`` in float).
    """
    cdef intp_t k = out.shape[0], d = out.shape[1], n = x.shape[0], c, i, j, b, t
    _check_pool(cluster, hist_indptr, node_weights, n, k, d, x.shape[1], "gather")
    if members.shape[0] != n:
        raise ValueError(f"gather: members has {members.shape[0]} entries, x {n} rows")
    for i in range(n):
        if members[i] < 0 or members[i] >= n:
            raise ValueError(f"gather: members[{i}] = {members[i]} is not an input of {n}")
    cdef intp_t nb = (k + _ROWS_PER_THREAD - 1) // _ROWS_PER_THREAD
    cdef int nt = num_threads_for(num_threads, nb)
    cdef bint weighted = node_weights.shape[0] != 0
    cdef double w
    if k == 0 or d == 0:
        return
    # what a head's row is added to: d values of -0.0, on the stack if d is small
    cdef floating neg0_stack[64]
    cdef floating[::1] neg0_heap
    cdef floating* neg0 = neg0_stack
    if d > 64:
        neg0_heap = np.empty(d, dtype=np.float64 if floating is double else np.float32)
        neg0 = &neg0_heap[0]
    for i in range(d):
        neg0[i] = -0.0
    # raw pointers: a memoryview index recomputes its address from the
    # view's strides at every use, which costs more than the row itself
    cdef const index_t* cl = &cluster[0] if n else NULL
    cdef const index_t* ip = &hist_indptr[0]
    cdef const index_t* mem = &members[0] if n else NULL
    cdef const double* nw = &node_weights[0] if weighted else NULL
    cdef const floating* xp = &x[0, 0] if n else NULL
    cdef floating* op = &out[0, 0]
    cdef floating* dst
    if nt > 1:
        with nogil:
            for b in prange(nb, num_threads=nt, schedule="static"):
                for c in range(b * _ROWS_PER_THREAD, min(k, (b + 1) * _ROWS_PER_THREAD)):
                    dst = op + c * d
                    if ip[c] == ip[c + 1]:
                        _zero(dst, d)
                    for t in range(ip[c], ip[c + 1]):
                        i = mem[t]
                        w = nw[i] if weighted else 1.0 / (ip[c + 1] - ip[c])
                        if floating is double:
                            row_add_to(dst, neg0 if t == ip[c] else dst, xp + i * d, w, d)
                        else:
                            row_add_to_f(dst, neg0 if t == ip[c] else dst, xp + i * d, w, d)
        return
    with nogil:
        for c in range(k):
            if ip[c] == ip[c + 1]:    # an output without inputs (not built by us)
                _zero(op + c * d, d)
        for i in range(n):
            c = cl[i]
            j = ip[c]
            w = nw[i] if weighted else 1.0 / (ip[c + 1] - j)
            dst = op + c * d
            if floating is double:
                row_add_to(dst, neg0 if mem[j] == i else dst, xp + i * d, w, d)
            else:
                row_add_to_f(dst, neg0 if mem[j] == i else dst, xp + i * d, w, d)


def scatter(const index_t[::1] cluster,      # IN  (n,)
            const index_t[::1] hist_indptr,  # IN  (k+1,)
            const double[::1] node_weights,  # IN  (n,), or (0,): 1 / |output|
            const floating[:, ::1] g,        # IN  (k, d)
            floating[:, ::1] out,            # OUT (n, d), must not overlap g
            bint stream=False, int num_threads=0):
    """Route output gradients to inputs: ``out[i] = w_i g[cluster[i]]``.

    The adjoint of :func:`gather`. O(n d). Walks the inputs in order, so
    ``out`` is written front to back and no loop depends on the (random)
    size of an output, by fixed blocks of rows in parallel (``num_threads``,
    0 for OpenMP's default; one below 1024 rows): every row is written by
    itself, so the bits do not follow the thread count. With
    ``node_weights`` empty, ``w_i`` is ``1 / |cluster[i]|``, the value
    :attr:`MergeHistory.weights` holds. ``stream`` writes ``out`` with
    non-temporal stores (see the notes above; float64 only: float32 rows are
    written normally), fenced at the end of every block.
    """
    cdef intp_t n = out.shape[0], d = out.shape[1], i, c, b
    _check_pool(cluster, hist_indptr, node_weights, n, g.shape[0], d, g.shape[1], "scatter")
    cdef intp_t nb = (n + _ROWS_PER_THREAD - 1) // _ROWS_PER_THREAD
    cdef int nt = num_threads_for(num_threads, nb)
    cdef bint weighted = node_weights.shape[0] != 0
    cdef double wi
    if n == 0 or d == 0:
        return
    cdef const index_t* cl = &cluster[0]
    cdef const index_t* ip = &hist_indptr[0]
    cdef const double* nw = &node_weights[0] if weighted else NULL
    cdef const floating* gp = &g[0, 0]
    cdef floating* op = &out[0, 0]
    cdef bint a16 = False
    if floating is float:
        stream = False
    else:
        # every row 16-byte aligned: the streaming loop needs no per-row checks
        a16 = stream and _rows_a16(op, d)
    with nogil:
        for b in prange(nb, num_threads=nt, schedule="static"):
            for i in range(b * _ROWS_PER_THREAD, min(n, (b + 1) * _ROWS_PER_THREAD)):
                c = cl[i]
                wi = nw[i] if weighted else 1.0 / (ip[c + 1] - ip[c])
                if floating is float:
                    row_scale_f(op + i * d, gp + c * d, wi, d)
                elif a16:
                    row_scale_stream_a16(op + i * d, gp + c * d, wi, d)
                elif stream:
                    row_scale_stream(op + i * d, gp + c * d, wi, d)
                else:
                    row_scale(op + i * d, gp + c * d, wi, d)
            if stream:
                store_fence()



# ---------------------------------------------------------------------------
# Message passing and routed similarity (the encoder before the morph)
# ---------------------------------------------------------------------------

cdef intp_t _row_stride(const floating[:, :] a, str name) except -1:
    """The row stride of ``a`` in elements; its rows must be contiguous."""
    if a.shape[1] > 1 and a.strides[1] != sizeof(floating):
        raise ValueError(f"{name} must have contiguous rows")
    if a.strides[0] % sizeof(floating):
        raise ValueError(f"{name} must have rows aligned to its elements")
    return a.strides[0] // sizeof(floating)


def transpose_csr(const index_t[::1] indptr,   # IN  (n+1,)
                  const index_t[::1] indices,  # IN  (E,)
                  const double[::1] weights,   # IN  (E,), or (0,)
                  index_t[::1] t_indptr,       # OUT (n+1,)
                  index_t[::1] t_indices,      # OUT (E,)
                  double[::1] t_weights):      # OUT (E,), or (0,) with weights
    """The CSR of the reversed edges (every node's predecessors), by a
    counting sort: within a row, sources in increasing order, so the result
    does not depend on anything but the graph. O(n + E)."""
    cdef intp_t n = indptr.shape[0] - 1, E = indices.shape[0]
    cdef bint weighted = weights.shape[0] != 0
    if (n < 0 or t_indptr.shape[0] != n + 1 or t_indices.shape[0] != E
            or (weighted and (weights.shape[0] != E or t_weights.shape[0] != E))):
        raise ValueError("transpose_csr: t_indptr must be (n + 1,), t_indices and the "
                         "weights (E,)")
    if n == 0:
        return
    with nogil:
        _transpose(&indptr[0], &indices[0] if E else NULL, n, E, &t_indptr[0],
                   &t_indices[0] if E else NULL, &weights[0] if weighted else NULL,
                   &t_weights[0] if weighted else NULL, NULL)


cdef void _transpose(const index_t* indptr, const index_t* indices, intp_t n, intp_t E,
                     index_t* t_indptr, index_t* t_indices, const double* weights,
                     double* t_weights, index_t* t_edges) noexcept nogil:
    """:func:`transpose_csr`'s counting sort (``n`` > 0); ``t_weights``
    (with ``weights``) and ``t_edges`` (each in-edge's position in
    ``indices``) are filled where not NULL."""
    cdef intp_t u, e, slot
    for u in range(n + 1):
        t_indptr[u] = 0
    for e in range(E):
        t_indptr[indices[e] + 1] += 1
    for u in range(n):
        t_indptr[u + 1] += t_indptr[u]
    for u in range(n):                      # t_indptr[v] is v's next free slot
        for e in range(indptr[u], indptr[u + 1]):
            slot = t_indptr[indices[e]]
            t_indices[slot] = <index_t>u
            if t_weights != NULL:
                t_weights[slot] = weights[e]
            if t_edges != NULL:
                t_edges[slot] = <index_t>e
            t_indptr[indices[e]] = <index_t>(slot + 1)
    for u in range(n, 0, -1):               # shift back: row v starts where v-1 ended
        t_indptr[u] = t_indptr[u - 1]
    t_indptr[0] = 0


def stack_neighbours(const index_t[::1] indptr,     # IN  (n+1,) out-edges
                     const index_t[::1] indices,    # IN  (E,)
                     const double[::1] weights,     # IN  (E,), or (0,): every edge weighs 1
                     const index_t[::1] t_indptr,   # IN  (n+1,) in-edges (transpose_csr)
                     const index_t[::1] t_indices,  # IN  (E,)
                     const double[::1] t_weights,   # IN  (E,), or (0,)
                     const floating[:, :] x,        # IN  (n, d), contiguous rows
                     floating[:, ::1] cat,          # OUT (n, 3d)
                     int num_threads=0):
    """``cat = [x, P, S]``: every row beside the weighted sums of its
    predecessors' and its successors' rows.

    ``P[v] = sum_{u -> v} w_e x[u]`` and ``S[u] = sum_{u -> v} w_e x[v]`` (so
    ``P = A^T x`` and ``S = A x`` for the adjacency ``A``): the input of a
    message-passing layer's one product ``[x, P, S] @ [W_self; W_pred;
    W_succ]``. With the graph and its transpose every row is written by
    itself, in a fixed order: rows in parallel (``num_threads``, 0 for
    OpenMP's default), the same bits on any number of threads. ``cat`` must
    not overlap ``x``. ``x`` and ``cat`` float32 or float64 (the edge
    weights stay float64). O((n + E) d).
    """
    cdef intp_t n = x.shape[0], d = x.shape[1], u
    if cat.shape[0] != n or cat.shape[1] != 3 * d:
        raise ValueError("stack_neighbours: x must be (n, d), cat (n, 3d)")
    cdef const index_t* nb
    cdef const index_t* t_nb
    cdef const double* w
    cdef const double* t_w
    _edges_both_ways("stack_neighbours", n, indptr, indices, weights, t_indptr, t_indices,
                     t_weights, &nb, &w, &t_nb, &t_w)
    if n == 0 or d == 0:
        return
    cdef intp_t xs = _row_stride(x, "x")
    cdef const floating* xp = &x[0, 0]
    cdef floating* cp = &cat[0, 0]
    cdef int nt = num_threads_for(num_threads, n // _ROWS_PER_THREAD + 1)
    with nogil:
        for u in prange(n, num_threads=nt, schedule="static"):
            _stack_row(cp + u * 3 * d, xp, xs, u, &indptr[0], nb, w, &t_indptr[0], t_nb, t_w, d)


def tanh_backward(const floating[:, ::1] t,    # IN  (n, d) tanh(z)
                  const floating[:, ::1] grad,  # IN  (n, d) of t
                  floating[:, ::1] grad_z,      # OUT (n, d)
                  floating[::1] grad_bias,      # OUT (d,)
                  int num_threads=0):
    """``grad_z = grad (1 - t^2)``, the gradient of the pre-activation ``z``
    of ``t = tanh(z)``, and ``grad_bias`` its column sums. Rows in parallel;
    the sums go by fixed blocks of rows, added in order, so the bits do not
    depend on the thread count. float32 or float64; the column sums
    accumulate in float64 either way. O(n d)."""
    cdef intp_t n = t.shape[0], d = t.shape[1], i, j, b
    cdef intp_t nb = (n + _ROWS_PER_THREAD - 1) // _ROWS_PER_THREAD
    cdef floating gz
    if (grad.shape[0] != n or grad.shape[1] != d or grad_z.shape[0] != n
            or grad_z.shape[1] != d or grad_bias.shape[0] != d):
        raise ValueError("tanh_backward: t, grad and grad_z must be (n, d), grad_bias (d,)")
    cdef double[:, ::1] part = np.zeros((max(nb, 1), d))
    cdef int nt = num_threads_for(num_threads, nb)
    with nogil:
        for b in prange(nb, num_threads=nt, schedule="static"):
            for i in range(b * _ROWS_PER_THREAD, min(n, (b + 1) * _ROWS_PER_THREAD)):
                for j in range(d):
                    gz = grad[i, j] * (1.0 - t[i, j] * t[i, j])
                    grad_z[i, j] = gz
                    part[b, j] += gz
        if floating is double:
            for j in range(d):
                grad_bias[j] = 0.0
            for b in range(nb):
                for j in range(d):
                    grad_bias[j] += part[b, j]
        else:
            for j in range(d):
                part[0, j] = 0.0 if nb == 0 else part[0, j]
                for b in range(1, nb):
                    part[0, j] += part[b, j]
                grad_bias[j] = <float>part[0, j]


cdef void _edge_cosine(const index_t* indptr, const index_t* indices, intp_t n, intp_t d,
                       const floating* qp, const floating* kp, double* qnorms,
                       double* knorms, double* sim, int nt) noexcept nogil:
    """The loop of :func:`edge_cosine_qk` (``qp == kp`` and ``qnorms == knorms``
    for :func:`edge_cosine`), rows in parallel on ``nt`` threads: each
    norm and each similarity is one thread's, so the bits do not depend on
    ``nt``."""
    cdef intp_t u, v, e
    cdef double nu, nv, s
    for u in prange(n, num_threads=nt, schedule="static"):
        qnorms[u] = sqrt(_dot(qp + u * d, qp + u * d, d))
        if knorms != qnorms:
            knorms[u] = sqrt(_dot(kp + u * d, kp + u * d, d))
    for u in prange(n, num_threads=nt, schedule="static"):
        nu = qnorms[u] if qnorms[u] > COS_EPS else COS_EPS
        for e in range(indptr[u], indptr[u + 1]):
            v = indices[e]
            nv = knorms[v] if knorms[v] > COS_EPS else COS_EPS
            s = _dot(qp + u * d, kp + v * d, d) / (nu * nv)
            # Rounding can put parallel rows a few ulps outside [-1, 1]; a
            # threshold of exactly 1.0 (sigmoid(theta) for theta >= 37) must
            # then still merge nothing.
            sim[e] = 1.0 if s > 1.0 else (-1.0 if s < -1.0 else s)


cdef void _edge_cosine_backward(const index_t* indptr, const index_t* indices,
                                const index_t* t_indptr, const index_t* t_src,
                                const index_t* t_edges, intp_t n, intp_t d,
                                const floating* qp, const floating* kp,
                                const double* qnorms, const double* knorms, const double* sim,
                                const double* grad_sim, floating* gq, floating* gk,
                                int nt, bint accumulate=True) noexcept nogil:
    """The loop of :func:`edge_cosine_qk_backward` (one matrix: ``qp == kp``,
    ``gq == gk``). ``d s / d q_u = k_v / (|q_u| |k_v|) - s q_u / |q_u|^2``,
    likewise for ``k_v``; three products per edge, not a division per entry.
    Row ``u`` of ``gq`` takes its out-edges (``u`` the query), then row
    ``u`` of ``gk`` its in-edges (``u`` the key; ``t_indptr``, ``t_src``,
    ``t_edges``: the transpose with each in-edge's position): every row is
    written by one thread in a fixed order, rows in parallel on ``nt``
    threads, the same bits on any count. ``accumulate=False``: each row
    is zeroed first, by its thread (once where ``gq == gk``)."""
    cdef intp_t u
    for u in prange(n, num_threads=nt, schedule="static"):
        if not accumulate:
            memset(gq + u * d, 0, d * sizeof(floating))
            if gk != gq:
                memset(gk + u * d, 0, d * sizeof(floating))
        _cosine_row(gq + u * d, qp + u * d, qnorms[u], kp, knorms, indices, NULL,
                    indptr[u], indptr[u + 1], sim, grad_sim, d)
        _cosine_row(gk + u * d, kp + u * d, knorms[u], qp, qnorms, t_src, t_edges,
                    t_indptr[u], t_indptr[u + 1], sim, grad_sim, d)


cdef inline void _cosine_row(floating* grow, const floating* own, double own_norm,
                             const floating* others, const double* other_norms,
                             const index_t* nbr, const index_t* edge_of, intp_t lo, intp_t hi,
                             const double* sim, const double* grad_sim,
                             intp_t d) noexcept nogil:
    """``grow += sum_slot grad_sim[e] d s_e / d own`` over the edges
    ``e`` at slots ``lo:hi`` (``e = edge_of[slot]``, or the slot itself
    where ``edge_of`` is NULL) to the rows ``nbr[slot]`` of ``others``:
    ``d s / d own = other / (|own| |other|) - s own / |own|^2``, the second
    term 0 where ``own``'s norm is clamped."""
    cdef intp_t slot, e, w
    cdef double nu = own_norm if own_norm > COS_EPS else COS_EPS, nw, g, a, b
    for slot in range(lo, hi):
        e = slot if edge_of == NULL else edge_of[slot]
        g = grad_sim[e]
        if g == 0.0:
            continue
        w = nbr[slot]
        nw = other_norms[w] if other_norms[w] > COS_EPS else COS_EPS
        a = g / (nu * nw)
        b = g * sim[e] / (nu * nu) if own_norm > COS_EPS else 0.0
        _axpby(grow, others + w * d, a, own, b, d)


cdef int _cosine_shapes(str fn, const index_t[::1] indptr, intp_t E, const intp_t* q,
                        const intp_t* k, intp_t qnorms, intp_t knorms, intp_t sim,
                        intp_t grad_sim, const intp_t* grad_q,
                        const intp_t* grad_k) except -1:
    """The edge cosines' shapes, O(1): ``indptr`` (n + 1,) ending at E (the
    length of ``indices``), ``K`` as ``Q`` (n, d), the norms (n,), ``sim``
    and ``grad_sim`` (E,) (``grad_sim`` < 0: none), the gradients as ``Q``
    (NULL: none). The graph itself is the caller's to validate
    (:class:`grapheme.Graph` does)."""
    cdef intp_t n = q[0]
    if indptr.shape[0] != n + 1 or indptr[n] != E:
        raise ValueError(f"{fn}: indptr must be (n + 1,) = ({n + 1},) and end at "
                         f"len(indices) = {E}")
    if k[0] != n or k[1] != q[1]:
        raise ValueError(f"{fn}: the keys must be ({n}, {q[1]}) as the queries, "
                         f"got ({k[0]}, {k[1]})")
    if qnorms != n or knorms != n:
        raise ValueError(f"{fn}: the norms must be ({n},)")
    if sim != E or (grad_sim >= 0 and grad_sim != E):
        raise ValueError(f"{fn}: the similarities and their gradient must be ({E},)")
    if grad_q != NULL and (grad_q[0] != n or grad_q[1] != q[1] or grad_k[0] != n
                           or grad_k[1] != q[1]):
        raise ValueError(f"{fn}: the gradients must be ({n}, {q[1]})")
    return 0


def edge_cosine(const index_t[::1] indptr,    # IN  (n+1,)
                const index_t[::1] indices,   # IN  (E,)
                const floating[:, ::1] H,     # IN  (n, d), float32 or float64
                double[::1] norms,            # OUT (n,)
                double[::1] sim,              # OUT (E,)
                int num_threads=0):
    """Cosine similarity ``s_e = <h_u, h_v> / (max(|h_u|, eps) max(|h_v|, eps))``
    of every edge e = (u, v), eps = 1e-12 (a zero row has similarity 0),
    clipped to [-1, 1] against rounding.

    :func:`edge_cosine_qk` with queries and keys both ``H`` (the norms are
    computed once). O(n d + E d).
    """
    edge_cosine_qk(indptr, indices, H, H, norms, norms, sim, num_threads)


def edge_cosine_backward(const index_t[::1] indptr,   # IN  (n+1,)
                         const index_t[::1] indices,  # IN  (E,)
                         const floating[:, ::1] H,    # IN  (n, d)
                         const double[::1] norms,     # IN  (n,) from edge_cosine
                         const double[::1] sim,       # IN  (E,) from edge_cosine
                         const double[::1] grad_sim,  # IN  (E,)
                         floating[:, ::1] grad_H,     # OUT (n, d), accumulated
                         int num_threads=0):
    """Accumulate ``sum_e grad_sim[e] * d s_e / d H`` into ``grad_H``. O(n d + E d).

    ``d s / d h_u = h_v / (|h_u| |h_v|) - s h_u / |h_u|^2`` (the second term
    vanishes where the norm is clamped to eps): :func:`edge_cosine_qk_backward`
    with queries, keys and both their gradients ``H`` and ``grad_H``.
    """
    edge_cosine_qk_backward(indptr, indices, H, H, norms, norms, sim, grad_sim, grad_H, grad_H,
                            num_threads)


def edge_cosine_qk(const index_t[::1] indptr,    # IN  (n+1,)
                   const index_t[::1] indices,   # IN  (E,)
                   const floating[:, ::1] Q,     # IN  (n, d) queries
                   const floating[:, ::1] K,     # IN  (n, d) keys
                   double[::1] qnorms,           # OUT (n,)
                   double[::1] knorms,           # OUT (n,)
                   double[::1] sim,              # OUT (E,)
                   int num_threads=0):
    """``s_e = <q_u, k_v> / (max(|q_u|, eps) max(|k_v|, eps))`` for every
    edge e = (u, v), eps = 1e-12, clipped to [-1, 1] (rounding can put
    parallel rows a few ulps outside). ``Q`` and ``K`` float32 or float64 (both
    the same); the norms and similarities are float64, the dot products
    accumulate in float64. Rows in parallel (``num_threads``, 0 for
    OpenMP's default), the same bits on any count. O((n + E) d)."""
    cdef intp_t n = Q.shape[0], d = Q.shape[1]
    cdef double spare = 0.0
    cdef floating fspare = 0.0
    _cosine_shapes("edge_cosine_qk", indptr, indices.shape[0], Q.shape, K.shape,
                   qnorms.shape[0], knorms.shape[0], sim.shape[0], -1, NULL, NULL)
    if n == 0:
        return
    cdef const floating* qp = &Q[0, 0] if d else &fspare
    cdef const floating* kp = &K[0, 0] if d else &fspare
    cdef double* sp = &sim[0] if sim.shape[0] else &spare
    cdef int nt = num_threads_for(num_threads, n // _ROWS_PER_THREAD + 1)
    with nogil:
        _edge_cosine(&indptr[0], &indices[0] if indices.shape[0] else NULL, n, d, qp, kp,
                     &qnorms[0], &knorms[0], sp, nt)


def edge_cosine_qk_backward(const index_t[::1] indptr,   # IN  (n+1,)
                            const index_t[::1] indices,  # IN  (E,)
                            const floating[:, ::1] Q,    # IN  (n, d)
                            const floating[:, ::1] K,    # IN  (n, d)
                            const double[::1] qnorms,    # IN  (n,) from edge_cosine_qk
                            const double[::1] knorms,    # IN  (n,)
                            const double[::1] sim,       # IN  (E,)
                            const double[::1] grad_sim,  # IN  (E,)
                            floating[:, ::1] grad_Q,     # OUT (n, d), accumulated
                            floating[:, ::1] grad_K,     # OUT (n, d), accumulated
                            int num_threads=0,
                            bint accumulate=True):
    """Accumulate ``sum_e grad_sim[e] d s_e / d (Q, K)``. O((n + E) d).

    ``d s / d q_u = k_v / (|q_u| |k_v|) - s q_u / |q_u|^2`` and likewise for
    ``k_v`` (the second term vanishes where the norm is clamped to eps).
    Every row is written by one thread (``grad_K``'s from the in-edges, by
    a counting sort of the edges, O(n + E)), rows in parallel
    (``num_threads``, 0 for OpenMP's default), the same bits on any count.
    ``accumulate=False``: the gradients are written, not added (each row
    zeroed by its own thread first, instead of a serial pass beforehand).
    """
    cdef intp_t n = Q.shape[0], d = Q.shape[1], E = indices.shape[0]
    _cosine_shapes("edge_cosine_qk_backward", indptr, E, Q.shape, K.shape, qnorms.shape[0],
                   knorms.shape[0], sim.shape[0], grad_sim.shape[0], grad_Q.shape,
                   grad_K.shape)
    if n == 0 or d == 0 or E == 0:
        if not accumulate and n and d:
            grad_Q[...] = 0
            grad_K[...] = 0
        return
    cdef index_t[::1] t_indptr = np.empty(n + 1, np.asarray(indptr).dtype)
    cdef index_t[::1] t_src = np.empty(E, np.asarray(indptr).dtype)
    cdef index_t[::1] t_edges = np.empty(E, np.asarray(indptr).dtype)
    cdef int nt = num_threads_for(num_threads, n // _ROWS_PER_THREAD + 1)
    with nogil:
        _transpose(&indptr[0], &indices[0], n, E, &t_indptr[0], &t_src[0], NULL, NULL,
                   &t_edges[0])
        _edge_cosine_backward(&indptr[0], &indices[0], &t_indptr[0], &t_src[0],
                              &t_edges[0], n, d, &Q[0, 0], &K[0, 0], &qnorms[0],
                              &knorms[0], &sim[0], &grad_sim[0], &grad_Q[0, 0],
                              &grad_K[0, 0], nt, accumulate)
