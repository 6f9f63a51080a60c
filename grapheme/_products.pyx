# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The encoder's matrix products, by fixed blocks of rows, on grapheme's own
OpenMP threads.

Each block is one single-threaded BLAS call (``scipy.linalg.cython_blas``,
the BLAS that SciPy ships), the blocks run in a ``prange``: the pattern
scikit-learn uses for k-means, with BLAS limited to one thread while it
runs (``grapheme._threads.one_pool``). A step then has one thread pool,
not two that spin on each other's cores (docs/design.md, "Threads").

The blocks are fixed (:data:`ROWS` rows), never a function of the thread
count, and a reduction over rows (a weight gradient ``A^T G``) sums the
blocks' partial products in block order: the bits do not depend on how
many threads run. Without OpenMP the blocks run one after another.

Row-major arrays are column-major transposes, so ``C = A op(B)`` is the
column-major ``C^T = op(B)^T A^T``: BLAS is called with the operands
swapped.
"""
cimport numpy as cnp
from cython.parallel cimport prange, threadid
from libc.stdint cimport int64_t
from scipy.linalg.cython_blas cimport dgemm, sgemm

import numpy as np

from grapheme._types cimport (floating, index_t, intp_t, num_threads_for, _stack_row,
                              _row_add, _edges_both_ways, _first_outside, _finite)

#: Rows per block of the stacked products and the layers' gathers; blocks
#: of :func:`matmul` are ``MATMUL_ROWS`` (smaller: its products on a
#: table's rows or an encoder's contexts have a few hundred rows, which
#: small blocks share evenly between threads), of :func:`matmul_tn`
#: ``TN_ROWS``. Fixed, so the bits never follow the thread count.
ROWS = 256
MATMUL_ROWS = 64
TN_ROWS = 256
cdef intp_t _ROWS = ROWS
cdef intp_t _MATMUL_ROWS = MATMUL_ROWS
cdef intp_t _TN_ROWS = TN_ROWS
cdef intp_t _CHUNK = 1024    # elements per task of the partials' sum

cnp.import_array()

# numpy's own float64 and float32 tanh loops (a ufunc's inner loops are in its
# documented ``functions`` table), so that a layer's tanh runs block by block
# on our threads with numpy's SIMD code: a libm loop took 6x longer. The
# same loop np.tanh calls, so the same bits (tested). Where a numpy has no
# such loop, NUMPY_TANH is False and the caller applies np.tanh itself.
# Taken once, at import: a library that swaps numpy's loops afterwards
# (mkl_umath's patching, say) changes np.tanh, not these.
ctypedef void (*_ufunc_loop)(char**, const cnp.npy_intp*, const cnp.npy_intp*,
                             void*) noexcept nogil
cdef _ufunc_loop _tanh_loops[2]     # float32, float64
cdef void* _tanh_data[2]


cdef bint _find_tanh() except -1:
    if not isinstance(np.tanh, np.ufunc):      # replaced by someone: not numpy's loop
        return False
    cdef cnp.ufunc uf = np.tanh
    cdef int i, j
    for i, sig in enumerate(("f->f", "d->d")):
        if sig not in np.tanh.types or uf.nin != 1 or uf.nout != 1:
            return False
        j = np.tanh.types.index(sig)   # the loop numpy's type resolution picks
        _tanh_loops[i] = <_ufunc_loop><void*>uf.functions[j]
        _tanh_data[i] = uf.data[j]
    return _tanh_loops[0] != NULL and _tanh_loops[1] != NULL


#: Whether :func:`stacked_matmul` can apply a layer's tanh and residual
#: (``residual=``) with numpy's tanh loop.
NUMPY_TANH = bool(_find_tanh())


cdef inline void _tanh(floating* x, intp_t size) noexcept nogil:
    """``x = tanh(x)`` in place, contiguous, by numpy's loop."""
    cdef char* args[2]
    cdef cnp.npy_intp dims[1]
    cdef cnp.npy_intp steps[2]
    cdef int which = 1 if floating is double else 0
    args[0] = <char*>x
    args[1] = <char*>x
    dims[0] = size
    steps[0] = sizeof(floating)
    steps[1] = sizeof(floating)
    _tanh_loops[which](args, dims, steps, _tanh_data[which])


cdef inline void _gemm(char* ta, char* tb, int m, int n, int k, const floating* a, int lda,
                       const floating* b, int ldb, floating beta, floating* c,
                       int ldc) noexcept nogil:
    """Column-major ``c = op(a) op(b) + beta c`` (alpha 1)."""
    cdef double one_d = 1.0, beta_d
    cdef float one_s = 1.0, beta_s
    if floating is double:
        beta_d = beta
        dgemm(ta, tb, &m, &n, &k, &one_d, <double*>a, &lda, <double*>b, &ldb, &beta_d, c,
              &ldc)
    else:
        beta_s = beta
        sgemm(ta, tb, &m, &n, &k, &one_s, <float*>a, &lda, <float*>b, &ldb, &beta_s, c,
              &ldc)


def matmul(const floating[:, ::1] a, const floating[:, ::1] b, floating[:, ::1] out,
           bint transpose_b=False, int num_threads=0, const floating[:, ::1] init=None):
    """``out = a @ b`` (``transpose_b``: ``a @ b.T``), ``a`` (n, k), ``b``
    (k, m) or (m, k), ``out`` (n, m), all C-contiguous and of one dtype;
    ``out`` must not overlap the others (the caller checks). Row blocks in
    parallel. O(n k m).

    ``init`` (n, m), optional: ``out = a @ b + init``, each block's rows of
    ``init`` copied into ``out`` on the block's thread and the product
    added by BLAS on top. ``init`` may be ``out`` itself (accumulate);
    otherwise it overlaps nothing."""
    cdef intp_t n = a.shape[0], k = a.shape[1], m = out.shape[1], blk, lo, rows, r, j
    cdef intp_t bk = b.shape[1] if transpose_b else b.shape[0]
    cdef intp_t bm = b.shape[0] if transpose_b else b.shape[1]
    if out.shape[0] != n or bk != k or bm != m:
        raise ValueError(f"matmul: shapes a ({a.shape[0]}, {a.shape[1]}), b ({b.shape[0]}, "
                         f"{b.shape[1]}) (transposed: {bool(transpose_b)}), "
                         f"out ({out.shape[0]}, {out.shape[1]}) disagree")
    cdef bint add = init is not None
    if add and (init.shape[0] != n or init.shape[1] != m):
        raise ValueError(f"matmul: init must have out's shape ({n}, {m}), got "
                         f"({init.shape[0]}, {init.shape[1]})")
    if n == 0 or m == 0:
        return
    cdef bint copy = add and <const void*>&init[0, 0] != <const void*>&out[0, 0]
    cdef const char* init_lo = <const char*>&init[0, 0] if add else NULL
    cdef const char* out_lo = <const char*>&out[0, 0]
    cdef intp_t span = n * m * <intp_t>sizeof(floating)
    if copy and init_lo < out_lo + span and out_lo < init_lo + span:
        raise ValueError("matmul: init must be out itself or overlap nothing")
    if k == 0:
        if copy:
            out[...] = init
        elif not add:
            out[...] = 0
        return
    cdef intp_t nb = (n + _MATMUL_ROWS - 1) // _MATMUL_ROWS
    cdef int nt = num_threads_for(num_threads, nb)
    cdef char* tb = b"T" if transpose_b else b"N"
    cdef int ldb = <int>(k if transpose_b else m)
    with nogil:
        for blk in prange(nb, num_threads=nt, schedule="static"):
            lo = blk * _MATMUL_ROWS
            rows = min(n - lo, _MATMUL_ROWS)
            if copy:
                for r in range(rows):
                    for j in range(m):
                        out[lo + r, j] = init[lo + r, j]
            # column-major: out_blk^T (m, rows) = op(b)^T (m, k) @ a_blk^T (k, rows)
            _gemm(tb, b"N", <int>m, <int>rows, <int>k, &b[0, 0], ldb, &a[lo, 0], <int>k,
                  1 if add else 0, &out[lo, 0], <int>m)


def matmul_tn(const floating[:, ::1] a, const floating[:, ::1] g, floating[:, ::1] out,
              floating[:, :, ::1] parts, int num_threads=0):
    """``out = a.T @ g``, ``a`` (n, k), ``g`` (n, m), ``out`` (k, m): the
    product over rows that a weight gradient is. Each block of
    :data:`TN_ROWS` rows makes its partial product in ``parts`` (at least
    ``ceil(n / TN_ROWS)`` (k, m) slabs, scratch the caller owns), and the
    partials are added in block order. O(n k m)."""
    cdef intp_t n = a.shape[0], k = a.shape[1], m = g.shape[1], blk, lo, rows
    cdef intp_t nb = (n + _TN_ROWS - 1) // _TN_ROWS
    if g.shape[0] != n or out.shape[0] != k or out.shape[1] != m:
        raise ValueError(f"matmul_tn: shapes a ({a.shape[0]}, {a.shape[1]}), g ({g.shape[0]}, "
                         f"{g.shape[1]}), out ({out.shape[0]}, {out.shape[1]}) disagree")
    if parts.shape[0] < nb or parts.shape[1] != k or parts.shape[2] != m:
        raise ValueError(f"matmul_tn: parts must be at least ({nb}, {k}, {m}), "
                         f"got ({parts.shape[0]}, {parts.shape[1]}, {parts.shape[2]})")
    if k == 0 or m == 0:
        return
    if n == 0:
        out[...] = 0
        return
    cdef int nt = num_threads_for(num_threads, nb)
    with nogil:
        for blk in prange(nb, num_threads=nt, schedule="static"):
            lo = blk * _TN_ROWS
            rows = min(n - lo, _TN_ROWS)
            # column-major: part^T (m, k) = g_blk^T (m, rows) @ a_blk (rows, k)
            _gemm(b"N", b"T", <int>m, <int>k, <int>rows, &g[lo, 0], <int>m, &a[lo, 0],
                  <int>k, 0, &parts[blk, 0, 0], <int>m)
        _add_parts(&out[0, 0], &parts[0, 0, 0], nb, k * m, nt)


cdef void _add_parts(floating* out, const floating* parts, intp_t nb, intp_t size,
                     int nt) noexcept nogil:
    """``out[0:size]`` = the sum of ``nb`` contiguous slabs of ``size`` at
    ``parts``, added in slab order (the fixed reduction order), by chunks of
    :data:`_CHUNK` elements in parallel on up to ``nt`` threads."""
    cdef intp_t nc = (size + _CHUNK - 1) // _CHUNK, c, lo, hi, blk, i
    for c in prange(nc, num_threads=nt, schedule="static"):
        lo = c * _CHUNK
        hi = min(size, lo + _CHUNK)
        for i in range(lo, hi):
            out[i] = parts[i]
        for blk in range(1, nb):
            for i in range(lo, hi):
                out[i] += parts[blk * size + i]


# ---------------------------------------------------------------------------
# A message-passing layer's products, fused with its neighbour sums: the
# block's rows of [x, P, S] are stacked into a per-thread scratch slab (in
# cache) just before its BLAS call, so the (n, 3d) stack is never written
# out and read back. Same blocks, same BLAS calls as matmul / matmul_tn on a
# stacked array, so the same bits on any thread count.
# ---------------------------------------------------------------------------

cdef inline void _stack_block(floating* buf, const floating* x, intp_t xs, intp_t lo,
                              intp_t rows, const index_t* indptr, const index_t* nb,
                              const double* w, const index_t* t_indptr, const index_t* t_nb,
                              const double* t_w, intp_t d) noexcept nogil:
    cdef intp_t r
    for r in range(rows):
        _stack_row(buf + r * 3 * d, x, xs, lo + r, indptr, nb, w, t_indptr, t_nb, t_w, d)


cdef int _stacked_threads(str fn, intp_t n, intp_t d, const index_t[::1] indptr,
                          const index_t[::1] indices, const double[::1] weights,
                          const index_t[::1] t_indptr, const index_t[::1] t_indices,
                          const double[::1] t_weights, intp_t x_stride, intp_t item,
                          const intp_t* scratch_shape, int num_threads, intp_t blocks,
                          const index_t** nbr, const double** wp, const index_t** t_nbr,
                          const double** t_wp) except -1:
    """The checks both stacked products share (the graph both ways round,
    with its edge pointers, :c:func:`_edges_both_ways`; ``x``'s rows; the
    scratch slabs), and their thread count: OpenMP's for ``blocks`` tasks,
    at most one per scratch slab."""
    _edges_both_ways(fn, n, indptr, indices, weights, t_indptr, t_indices, t_weights, nbr,
                     wp, t_nbr, t_wp)
    if scratch_shape[1] < _ROWS or scratch_shape[2] != 3 * d:
        raise ValueError(f"{fn}: scratch must be (threads, >= {_ROWS}, 3d)")
    if d > 1 and x_stride != item:
        raise ValueError(f"{fn}: x must have contiguous rows")
    if scratch_shape[0] < 1 and n > 0:
        raise ValueError(f"{fn}: scratch needs a slab")
    cdef int nt = num_threads_for(num_threads, blocks)
    return nt if nt <= scratch_shape[0] else <int>scratch_shape[0]


def stacked_matmul(const index_t[::1] indptr, const index_t[::1] indices,
                   const double[::1] weights, const index_t[::1] t_indptr,
                   const index_t[::1] t_indices, const double[::1] t_weights,
                   const floating[:, :] x, const floating[:, ::1] w, floating[:, ::1] out,
                   const floating[:, ::1] init, floating[:, :, ::1] scratch,
                   int num_threads=0, floating[:, ::1] residual=None):
    """``out = [x, P, S] @ w + init``: a message-passing layer's product
    (``P``, ``S`` the predecessor and successor sums of
    :func:`grapheme._core.stack_neighbours`; the graph by source, then by
    target, as there) without the (n, 3d) stack. ``x`` (n, d) with
    contiguous rows, ``w`` (3d, m), ``out`` (n, m); ``init`` (n, m), or
    (1, m) added to every row (a bias). ``scratch`` (threads, >= ROWS, 3d):
    one slab per thread, at most ``scratch.shape[0]`` threads run. Row
    blocks of :data:`ROWS` in parallel, each stacked into its thread's slab
    and then one BLAS call on top of ``init``'s rows. ``out`` overlaps
    nothing (the caller checks).

    ``residual`` (n, d), optional: a message-passing layer's whole forward.
    Each block's ``out`` rows become ``tanh`` of the product (numpy's loop,
    :data:`NUMPY_TANH`), and ``residual = x + out``, while the block is in
    cache and on its thread. ``m`` must be ``d``; ``residual`` overlaps
    nothing. O((n + E) d + n d m)."""
    cdef intp_t n = x.shape[0], d = x.shape[1], m = w.shape[1], blk, lo, rows, r, j
    if w.shape[0] != 3 * d or out.shape[0] != n or out.shape[1] != m or init.shape[1] != m \
            or init.shape[0] not in (1, n):
        raise ValueError(f"stacked_matmul: shapes x ({n}, {d}), w ({w.shape[0]}, "
                         f"{w.shape[1]}), out ({out.shape[0]}, {out.shape[1]}), init "
                         f"({init.shape[0]}, {init.shape[1]}) disagree")
    cdef bint layer = residual is not None
    if layer and (residual.shape[0] != n or residual.shape[1] != d or m != d):
        raise ValueError(f"stacked_matmul: residual must be (n, d) = ({n}, {d}) and w "
                         f"(3d, d); got residual ({residual.shape[0]}, {residual.shape[1]}), "
                         f"w ({w.shape[0]}, {m})")
    if layer and not NUMPY_TANH:
        raise ValueError("stacked_matmul: residual needs numpy's tanh loop (NUMPY_TANH is "
                         "False)")
    cdef intp_t nb = (n + _ROWS - 1) // _ROWS
    cdef const index_t* nbr
    cdef const index_t* t_nbr
    cdef const double* wp
    cdef const double* t_wp
    cdef int nt = _stacked_threads("stacked_matmul", n, d, indptr, indices, weights, t_indptr,
                                   t_indices, t_weights, x.strides[1], sizeof(floating),
                                   scratch.shape, num_threads, nb, &nbr, &wp, &t_nbr, &t_wp)
    if n == 0 or m == 0:
        return
    cdef intp_t xs = x.strides[0] // sizeof(floating)
    cdef bint row_init = init.shape[0] == 1
    cdef floating* buf
    with nogil:
        for blk in prange(nb, num_threads=nt, schedule="static"):
            lo = blk * _ROWS
            rows = min(n - lo, _ROWS)
            buf = &scratch[threadid(), 0, 0]
            _stack_block(buf, &x[0, 0], xs, lo, rows, &indptr[0], nbr, wp, &t_indptr[0],
                         t_nbr, t_wp, d)
            for r in range(rows):
                for j in range(m):
                    out[lo + r, j] = init[0 if row_init else lo + r, j]
            if d > 0:
                # column-major: out_blk^T (m, rows) += w^T (m, 3d) @ buf^T (3d, rows)
                _gemm(b"N", b"N", <int>m, <int>rows, <int>(3 * d), &w[0, 0], <int>m, buf,
                      <int>(3 * d), 1, &out[lo, 0], <int>m)
            if layer:
                _tanh(&out[lo, 0], rows * m)
                for r in range(rows):
                    for j in range(d):
                        residual[lo + r, j] = x[lo + r, j] + out[lo + r, j]


def lookup_layer(const index_t[::1] indptr, const index_t[::1] indices,
                 const double[::1] weights, const index_t[::1] t_indptr,
                 const index_t[::1] t_indices, const double[::1] t_weights,
                 const int64_t[::1] codes, const int64_t[::1] nodes,
                 const floating[:, ::1] products, const floating[::1] bias,
                 const floating[:, ::1] rows, floating[:, ::1] t, floating[:, ::1] out,
                 int num_threads=0):
    """A message-passing layer of looked-up rows, its products taken on the
    table's rows (``ops.LookupMessagePassing``): ``products`` (U, 3d) is
    ``rows @ [W_self | W_pred | W_succ]`` for the U distinct rows the nodes
    read (``rows`` (U, d)), ``codes`` (n,) each node's row among them. Then
    for each node ``i`` of ``nodes`` (k of them; every node, in order, if
    empty), its row ``q``: ``t[q] = tanh(products[c_i, :d] + sum_{j -> i}
    w products[c_j, d:2d] + sum_{i -> j} w products[c_j, 2d:] + bias)``
    (edges in order; the graph by source, then by target, as
    :func:`stacked_matmul`) and ``out[q] = rows[c_i] + t[q]``. Where numpy's
    tanh loop is not at hand (:data:`NUMPY_TANH` False), ``t`` is the
    pre-activation and ``out`` is not written (the caller applies
    ``np.tanh`` and the residual). Blocks of :data:`ROWS` rows in parallel,
    the tanh on each block while it is in cache: the same bits on any
    number of threads. The caller checks that every code lies in ``[0,
    U)``; a node outside ``[0, n)`` raises ValueError. O((k + E) d).

    Returns whether every entry of ``out`` is finite, each block checked by
    its thread right after writing it (the encoder's overflow check,
    without a serial pass over ``out``); None where ``out`` is not written
    (no numpy tanh, or no rows)."""
    cdef intp_t n = codes.shape[0], U = rows.shape[0], d = rows.shape[1], blk, lo, r, i, j, e
    cdef intp_t q, k = nodes.shape[0] if nodes.shape[0] else n
    cdef bint some = nodes.shape[0] > 0
    if (products.shape[0] != U or products.shape[1] != 3 * d or bias.shape[0] != d
            or t.shape[0] != k or t.shape[1] != d or out.shape[0] != k or out.shape[1] != d):
        raise ValueError(f"lookup_layer: shapes rows ({U}, {d}), products "
                         f"({products.shape[0]}, {products.shape[1]}), t ({t.shape[0]}, "
                         f"{t.shape[1]}), out ({out.shape[0]}, {out.shape[1]}) disagree")
    cdef const index_t* nbr
    cdef const index_t* t_nbr
    cdef const double* wp
    cdef const double* t_wp
    _edges_both_ways("lookup_layer", n, indptr, indices, weights, t_indptr, t_indices,
                     t_weights, &nbr, &wp, &t_nbr, &t_wp)
    if some and _first_outside(&nodes[0], k, n) >= 0:
        raise ValueError(f"lookup_layer: nodes must lie in [0, {n})")
    if n == 0 or d == 0:
        return None
    if U == 0:
        raise ValueError("lookup_layer: no rows")
    cdef bint fused = NUMPY_TANH
    cdef intp_t nb = (k + _ROWS - 1) // _ROWS
    cdef int nt = num_threads_for(num_threads, nb)
    cdef const floating* pp = &products[0, 0]
    cdef floating* z
    ok_arr = np.ones(nb, np.uint8)
    cdef unsigned char[::1] ok = ok_arr
    with nogil:
        for blk in prange(nb, num_threads=nt, schedule="static"):
            lo = blk * _ROWS
            for q in range(lo, min(k, lo + _ROWS)):
                i = nodes[q] if some else q
                z = &t[q, 0]
                for j in range(d):
                    z[j] = pp[codes[i] * 3 * d + j]
                # the predecessors' W_pred part (in-edges), then the
                # successors' W_succ part (out-edges), as the stack's order
                for e in range(t_indptr[i], t_indptr[i + 1]):
                    _row_add(z, pp + codes[t_nbr[e]] * 3 * d + d,
                             t_wp[e] if t_wp != NULL else 1.0, d)
                for e in range(indptr[i], indptr[i + 1]):
                    _row_add(z, pp + codes[nbr[e]] * 3 * d + 2 * d,
                             wp[e] if wp != NULL else 1.0, d)
                for j in range(d):
                    z[j] = z[j] + bias[j]
            if fused:
                r = min(k, lo + _ROWS) - lo
                _tanh(&t[lo, 0], r * d)
                for q in range(lo, lo + r):
                    i = nodes[q] if some else q
                    for j in range(d):
                        out[q, j] = rows[codes[i], j] + t[q, j]
                ok[blk] = _finite(&out[lo, 0], r * d)
    return bool(ok_arr.all()) if fused else None


def stacked_matmul_tn(const index_t[::1] indptr, const index_t[::1] indices,
                      const double[::1] weights, const index_t[::1] t_indptr,
                      const index_t[::1] t_indices, const double[::1] t_weights,
                      const floating[:, :] x, const floating[:, ::1] g,
                      floating[:, ::1] out, floating[:, :, ::1] parts,
                      floating[:, :, ::1] scratch, int num_threads=0):
    """``out = [x, P, S].T @ g`` (3d, m): a message-passing layer's weight
    gradient without the (n, 3d) stack (see :func:`stacked_matmul`). Blocks
    of :data:`TN_ROWS` rows in parallel, each in sub-blocks of
    :data:`ROWS` stacked into its thread's ``scratch`` slab, its partial
    product into ``parts`` (at least ``ceil(n / TN_ROWS)`` slabs (3d, m));
    the partials are added in block order. O((n + E) d + n d m)."""
    cdef intp_t n = x.shape[0], d = x.shape[1], m = g.shape[1], blk, lo, hi, sub, rows
    cdef intp_t nb = (n + _TN_ROWS - 1) // _TN_ROWS
    if g.shape[0] != n or out.shape[0] != 3 * d or out.shape[1] != m:
        raise ValueError(f"stacked_matmul_tn: shapes x ({n}, {d}), g ({g.shape[0]}, "
                         f"{g.shape[1]}), out ({out.shape[0]}, {out.shape[1]}) disagree")
    if parts.shape[0] < nb or parts.shape[1] != 3 * d or parts.shape[2] != m:
        raise ValueError(f"stacked_matmul_tn: parts must be at least ({nb}, {3 * d}, {m}), "
                         f"got ({parts.shape[0]}, {parts.shape[1]}, {parts.shape[2]})")
    cdef const index_t* nbr
    cdef const index_t* t_nbr
    cdef const double* wp
    cdef const double* t_wp
    cdef int nt = _stacked_threads("stacked_matmul_tn", n, d, indptr, indices, weights,
                                   t_indptr, t_indices, t_weights, x.strides[1],
                                   sizeof(floating), scratch.shape, num_threads, nb, &nbr, &wp,
                                   &t_nbr, &t_wp)
    if d == 0 or m == 0:
        return
    if n == 0:
        out[...] = 0
        return
    cdef intp_t xs = x.strides[0] // sizeof(floating)
    cdef floating* buf
    with nogil:
        for blk in prange(nb, num_threads=nt, schedule="static"):
            buf = &scratch[threadid(), 0, 0]
            lo = blk * _TN_ROWS
            hi = min(n, lo + _TN_ROWS)
            sub = lo
            while sub < hi:
                rows = min(hi - sub, _ROWS)
                _stack_block(buf, &x[0, 0], xs, sub, rows, &indptr[0], nbr, wp, &t_indptr[0],
                             t_nbr, t_wp, d)
                # column-major: part^T (m, 3d) (+)= g_sub^T (m, rows) @ buf (rows, 3d)
                _gemm(b"N", b"T", <int>m, <int>(3 * d), <int>rows, &g[sub, 0], <int>m, buf,
                      <int>(3 * d), 0 if sub == lo else 1, &parts[blk, 0, 0], <int>m)
                sub = sub + rows
        _add_parts(&out[0, 0], &parts[0, 0, 0], nb, 3 * d * m, nt)
