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
from cython.parallel cimport prange
from scipy.linalg.cython_blas cimport dgemm, sgemm

from grapheme._types cimport floating, intp_t, num_threads_for

#: Rows per block of :func:`matmul`; blocks of :func:`matmul_tn` are
#: ``TN_ROWS``. Fixed, so the bits never follow the thread count.
ROWS = 256
TN_ROWS = 1024
cdef intp_t _ROWS = ROWS
cdef intp_t _TN_ROWS = TN_ROWS


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
           bint transpose_b=False, int num_threads=0):
    """``out = a @ b`` (``transpose_b``: ``a @ b.T``), ``a`` (n, k), ``b``
    (k, m) or (m, k), ``out`` (n, m), all C-contiguous and of one dtype;
    ``out`` must not overlap the others (the caller checks). Row blocks in
    parallel. O(n k m)."""
    cdef intp_t n = a.shape[0], k = a.shape[1], m = out.shape[1], blk, lo, rows
    cdef intp_t bk = b.shape[1] if transpose_b else b.shape[0]
    cdef intp_t bm = b.shape[0] if transpose_b else b.shape[1]
    if out.shape[0] != n or bk != k or bm != m:
        raise ValueError(f"matmul: shapes a ({a.shape[0]}, {a.shape[1]}), b ({b.shape[0]}, "
                         f"{b.shape[1]}) (transposed: {bool(transpose_b)}), "
                         f"out ({out.shape[0]}, {out.shape[1]}) disagree")
    if n == 0 or m == 0:
        return
    if k == 0:
        out[...] = 0
        return
    cdef intp_t nb = (n + _ROWS - 1) // _ROWS
    cdef int nt = num_threads_for(num_threads, nb)
    cdef char* tb = b"T" if transpose_b else b"N"
    cdef int ldb = <int>(k if transpose_b else m)
    with nogil:
        for blk in prange(nb, num_threads=nt, schedule="static"):
            lo = blk * _ROWS
            rows = min(n - lo, _ROWS)
            # column-major: out_blk^T (m, rows) = op(b)^T (m, k) @ a_blk^T (k, rows)
            _gemm(tb, b"N", <int>m, <int>rows, <int>k, &b[0, 0], ldb, &a[lo, 0], <int>k,
                  0, &out[lo, 0], <int>m)


def matmul_tn(const floating[:, ::1] a, const floating[:, ::1] g, floating[:, ::1] out,
              floating[:, :, ::1] parts, int num_threads=0):
    """``out = a.T @ g``, ``a`` (n, k), ``g`` (n, m), ``out`` (k, m): the
    product over rows that a weight gradient is. Each block of
    :data:`TN_ROWS` rows makes its partial product in ``parts`` (at least
    ``ceil(n / TN_ROWS)`` (k, m) slabs, scratch the caller owns), and the
    partials are added in block order. O(n k m)."""
    cdef intp_t n = a.shape[0], k = a.shape[1], m = g.shape[1], blk, lo, rows, i
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
    cdef intp_t size = k * m
    cdef floating* acc
    cdef floating* part
    with nogil:
        for blk in prange(nb, num_threads=nt, schedule="static"):
            lo = blk * _TN_ROWS
            rows = min(n - lo, _TN_ROWS)
            # column-major: part^T (m, k) = g_blk^T (m, rows) @ a_blk (rows, k)
            _gemm(b"N", b"T", <int>m, <int>k, <int>rows, &g[lo, 0], <int>m, &a[lo, 0],
                  <int>k, 0, &parts[blk, 0, 0], <int>m)
        acc = &out[0, 0]
        part = &parts[0, 0, 0]
        for i in range(size):
            acc[i] = part[i]
        for blk in range(1, nb):
            part = &parts[blk, 0, 0]
            for i in range(size):
                acc[i] += part[i]
