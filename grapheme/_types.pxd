# Declarations shared by grapheme's compiled modules (_core, _relax,
# _transport): cimported, never imported. Index types as sklearn's
# _typedefs.pxd has them: ``intp_t`` for loop counters and sizes, CSR
# ``indptr``/``indices`` as int32 or int64 (``index_t``, never ``long``).
#
# Also the row primitives on ``__restrict`` pointers and the streaming
# (non-temporal) stores that both _core (gather, scatter) and _relax (the
# chain relaxation) use; when the Python layer asks for streaming, and why,
# is explained beside gather/scatter in _core.pyx. Every helper here is
# ``static inline`` C or ``cdef inline``: each cimporting module gets its own
# copy, with no cross-module call.
from libc.stdint cimport int32_t, int64_t, uintptr_t
from cython cimport floating   # float or double: the (n, d) feature arrays

ctypedef fused index_t:
    int32_t
    int64_t

ctypedef Py_ssize_t intp_t

cdef extern from *:
    """
    #include <stdint.h>
    #if defined(__SSE2__) || defined(_M_X64)
    #include <emmintrin.h>
    #define GRAPHEME_HAVE_STREAM 1
    #else
    #define GRAPHEME_HAVE_STREAM 0
    #endif

    /* dst[0:d] = w * src[0:d] */
    static inline void grapheme_row_scale(double *__restrict dst,
                                          const double *__restrict src,
                                          double w, Py_ssize_t d) {
        for (Py_ssize_t t = 0; t < d; ++t) dst[t] = w * src[t];
    }

    /* dst[0:d] = base[0:d] + w * src[0:d]; base is dst itself or a row
       that overlaps nothing (so not restrict, but read before written). */
    static inline void grapheme_row_add_to(double *dst, const double *base,
                                           const double *__restrict src,
                                           double w, Py_ssize_t d) {
        for (Py_ssize_t t = 0; t < d; ++t) dst[t] = base[t] + w * src[t];
    }

    /* dst[0:d] = w * src[0:d] with non-temporal stores where possible. */
    static inline void grapheme_row_scale_stream(double *__restrict dst,
                                                 const double *__restrict src,
                                                 double w, Py_ssize_t d) {
    #if GRAPHEME_HAVE_STREAM
        Py_ssize_t t = 0;
        if (((uintptr_t)dst & 7) != 0) {  /* not even double-aligned */
            grapheme_row_scale(dst, src, w, d);
            return;
        }
        if (((uintptr_t)dst & 15) != 0 && d > 0) {
            dst[0] = w * src[0];
            t = 1;
        }
        const __m128d vw = _mm_set1_pd(w);
        for (; t + 1 < d; t += 2)
            _mm_stream_pd(dst + t, _mm_mul_pd(vw, _mm_loadu_pd(src + t)));
        if (t < d) dst[t] = w * src[t];
    #else
        grapheme_row_scale(dst, src, w, d);
    #endif
    }

    /* grapheme_row_scale_stream for a 16-byte aligned dst and an even d:
       no per-row checks (scatter into a reused 1e7 x 16 buffer, the kernel
       called directly: 6.6 -> 4.8 ns/node). */
    static inline void grapheme_row_scale_stream_a16(double *__restrict dst,
                                                     const double *__restrict src,
                                                     double w, Py_ssize_t d) {
    #if GRAPHEME_HAVE_STREAM
        const __m128d vw = _mm_set1_pd(w);
        for (Py_ssize_t t = 0; t < d; t += 2)
            _mm_stream_pd(dst + t, _mm_mul_pd(vw, _mm_loadu_pd(src + t)));
    #else
        grapheme_row_scale(dst, src, w, d);
    #endif
    }

    /* dst[0:d] = src[0:d] */
    static inline void grapheme_row_copy(double *__restrict dst,
                                         const double *__restrict src, Py_ssize_t d) {
        for (Py_ssize_t t = 0; t < d; ++t) dst[t] = src[t];
    }

    /* dst[0:d] = src[0:d] with non-temporal stores where possible. */
    static inline void grapheme_row_copy_stream(double *__restrict dst,
                                                const double *__restrict src,
                                                Py_ssize_t d) {
    #if GRAPHEME_HAVE_STREAM
        Py_ssize_t t = 0;
        if (((uintptr_t)dst & 7) != 0) {  /* not even double-aligned */
            grapheme_row_copy(dst, src, d);
            return;
        }
        if (((uintptr_t)dst & 15) != 0 && d > 0) {
            dst[0] = src[0];
            t = 1;
        }
        for (; t + 1 < d; t += 2)
            _mm_stream_pd(dst + t, _mm_loadu_pd(src + t));
        if (t < d) dst[t] = src[t];
    #else
        grapheme_row_copy(dst, src, d);
    #endif
    }

    /* grapheme_row_copy_stream for a 16-byte aligned dst and an even d. */
    static inline void grapheme_row_copy_stream_a16(double *__restrict dst,
                                                    const double *__restrict src,
                                                    Py_ssize_t d) {
    #if GRAPHEME_HAVE_STREAM
        for (Py_ssize_t t = 0; t < d; t += 2)
            _mm_stream_pd(dst + t, _mm_loadu_pd(src + t));
    #else
        grapheme_row_copy(dst, src, d);
    #endif
    }

    /* The float32 instantiations of the row helpers above (grapheme's
       fused kernels, see "float32" in docs/design.md): the same loops on
       floats, the weight rounded to float once. Streaming stores are
       float64-only: a float32 kernel asked to stream writes normally. */
    static inline void grapheme_row_scale_f(float *__restrict dst,
                                            const float *__restrict src,
                                            double w, Py_ssize_t d) {
        const float wf = (float)w;
        for (Py_ssize_t t = 0; t < d; ++t) dst[t] = wf * src[t];
    }

    static inline void grapheme_row_add_to_f(float *dst, const float *base,
                                             const float *__restrict src,
                                             double w, Py_ssize_t d) {
        const float wf = (float)w;
        for (Py_ssize_t t = 0; t < d; ++t) dst[t] = base[t] + wf * src[t];
    }

    /* <a, b> over d entries in four interleaved partial sums, added as
       (s0 + s1) + (s2 + s3) at the end: four independent chains of additions
       instead of one, so the sum runs at the adder's throughput, not its
       latency. The order depends on d only, never on where a or b lie. */
    static inline double grapheme_dot(const double *__restrict a,
                                      const double *__restrict b, Py_ssize_t d) {
        double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
        Py_ssize_t t = 0;
        for (; t + 3 < d; t += 4) {
            s0 += a[t] * b[t];
            s1 += a[t + 1] * b[t + 1];
            s2 += a[t + 2] * b[t + 2];
            s3 += a[t + 3] * b[t + 3];
        }
        for (; t < d; ++t) s0 += a[t] * b[t];
        return (s0 + s1) + (s2 + s3);
    }

    /* grapheme_dot of float32 rows, accumulated in double in the same four
       partial sums. */
    static inline double grapheme_dot_f(const float *__restrict a,
                                        const float *__restrict b, Py_ssize_t d) {
        double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
        Py_ssize_t t = 0;
        for (; t + 3 < d; t += 4) {
            s0 += (double)a[t] * b[t];
            s1 += (double)a[t + 1] * b[t + 1];
            s2 += (double)a[t + 2] * b[t + 2];
            s3 += (double)a[t + 3] * b[t + 3];
        }
        for (; t < d; ++t) s0 += (double)a[t] * b[t];
        return (s0 + s1) + (s2 + s3);
    }

    /* Order streaming stores before whatever the caller does next. */
    static inline void grapheme_store_fence(void) {
    #if GRAPHEME_HAVE_STREAM
        _mm_sfence();
    #endif
    }
    """
    void row_scale "grapheme_row_scale"(double* dst, const double* src, double w,
                                        intp_t d) noexcept nogil
    void row_add_to "grapheme_row_add_to"(double* dst, const double* base, const double* src,
                                          double w, intp_t d) noexcept nogil
    void row_scale_stream "grapheme_row_scale_stream"(double* dst, const double* src,
                                                      double w, intp_t d) noexcept nogil
    void row_scale_stream_a16 "grapheme_row_scale_stream_a16"(
        double* dst, const double* src, double w, intp_t d) noexcept nogil
    void row_copy_stream "grapheme_row_copy_stream"(double* dst, const double* src,
                                                    intp_t d) noexcept nogil
    void row_copy_stream_a16 "grapheme_row_copy_stream_a16"(double* dst, const double* src,
                                                            intp_t d) noexcept nogil
    void store_fence "grapheme_store_fence"() noexcept nogil
    double dot "grapheme_dot"(const double* a, const double* b, intp_t d) noexcept nogil
    double dot_f "grapheme_dot_f"(const float* a, const float* b, intp_t d) noexcept nogil
    void row_scale_f "grapheme_row_scale_f"(float* dst, const float* src, double w,
                                            intp_t d) noexcept nogil
    void row_add_to_f "grapheme_row_add_to_f"(float* dst, const float* base,
                                              const float* src, double w,
                                              intp_t d) noexcept nogil


cdef inline bint _rows_a16(const double* dst, intp_t d) noexcept nogil:
    """Whether every row of a C-contiguous (n, d) array at ``dst`` is 16-byte
    aligned, so the ``_a16`` streaming helpers apply."""
    return d % 2 == 0 and (<uintptr_t>dst) % 16 == 0


cdef inline void _copy_stream(double* dst, const double* src, intp_t d, bint a16) noexcept nogil:
    if a16:
        row_copy_stream_a16(dst, src, d)
    else:
        row_copy_stream(dst, src, d)


# The finite check of every argument scan (_core.all_finite) and of the
# kernels that check the rows they have just written (_products.lookup_layer).
cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    /* 1 if no element of x[0:m] is NaN or infinite. An element is not finite
       when its exponent bits are all ones; adding 1 to the exponent field then
       carries into the sign bit. AND, ADD and OR only, so the loop vectorizes
       on any x86-64 (SSE2 has no 64-bit compare); it stops at the end of
       the first block holding a non-finite value. */
    static inline int grapheme_all_finite(const double *x, Py_ssize_t m) {
        const uint64_t EXP = 0x7FF0000000000000ULL, ONE = 1ULL << 52;
        Py_ssize_t i = 0;
        while (i < m) {
            Py_ssize_t stop = m - i > 4096 ? i + 4096 : m;
            uint64_t carry = 0, bits;
            for (; i < stop; ++i) {
                memcpy(&bits, x + i, sizeof bits);
                carry |= (bits & EXP) + ONE;
            }
            if (carry >> 63) return 0;
        }
        return 1;
    }
    /* The same for float32: 8 exponent bits, the sign bit is bit 31. */
    static inline int grapheme_all_finite_f(const float *x, Py_ssize_t m) {
        const uint32_t EXP = 0x7F800000U, ONE = 1U << 23;
        Py_ssize_t i = 0;
        while (i < m) {
            Py_ssize_t stop = m - i > 4096 ? i + 4096 : m;
            uint32_t carry = 0, bits;
            for (; i < stop; ++i) {
                memcpy(&bits, x + i, sizeof bits);
                carry |= (bits & EXP) + ONE;
            }
            if (carry >> 31) return 0;
        }
        return 1;
    }
    """
    bint _all_finite "grapheme_all_finite"(const double* x, intp_t m) noexcept nogil
    bint _all_finite_f "grapheme_all_finite_f"(const float* x, intp_t m) noexcept nogil


cdef inline bint _finite(const floating* x, intp_t m) noexcept nogil:
    """grapheme_all_finite or grapheme_all_finite_f, by the dtype of ``x``."""
    if floating is double:
        return _all_finite(x, m)
    else:
        return _all_finite_f(x, m)


# ---------------------------------------------------------------------------
# Threads. With OpenMP (built with -fopenmp, see setup.py) the parallel loops
# of the kernels run on up to ``num_threads_for`` threads; without it
# ``_OPENMP`` is undefined, Cython's prange is a plain loop, and these report
# one thread. No omp.h is needed then.
# ---------------------------------------------------------------------------
cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    #define GRAPHEME_OPENMP 1
    static inline int grapheme_max_threads(void) { return omp_get_max_threads(); }
    #else
    #define GRAPHEME_OPENMP 0
    static inline int grapheme_max_threads(void) { return 1; }
    #endif
    """
    const bint OPENMP "GRAPHEME_OPENMP"
    int max_threads "grapheme_max_threads"() noexcept nogil


cdef inline int num_threads_for(long requested, Py_ssize_t tasks) noexcept nogil:
    """Threads for a parallel loop over ``tasks`` independent tasks:
    ``requested`` if > 0, else OpenMP's default (``omp_get_max_threads()``,
    which ``OMP_NUM_THREADS`` and threadpoolctl's ``user_api="openmp"``
    limits set); at most ``tasks``, at least 1; always 1 without OpenMP."""
    cdef long n
    if not OPENMP:
        return 1
    n = requested if requested > 0 else max_threads()
    if n > tasks:
        n = tasks
    return <int>n if n > 1 else 1


# ---------------------------------------------------------------------------
# Neighbour sums of the message-passing layers (_core.stack_neighbours and
# the fused products of _products.pyx). The edge weights stay float64; a
# float32 row adds them rounded to float once.
# ---------------------------------------------------------------------------
cdef inline void _row_add(floating* dst, const floating* src, double w,
                          intp_t d) noexcept nogil:
    cdef intp_t t
    cdef floating wf = <floating>w   # float32 rows: the weight rounded once
    for t in range(d):
        dst[t] += wf * src[t]


cdef inline void _row_sum(floating* dst, const floating* x, intp_t xs, const index_t* nbr,
                          const double* w, intp_t lo, intp_t hi, intp_t d) noexcept nogil:
    """``dst[0:d] += sum_{e in lo..hi} w[e] x[nbr[e]]`` (``w`` NULL: weight 1),
    edges in order."""
    cdef intp_t e
    for e in range(lo, hi):
        _row_add(dst, x + nbr[e] * xs, w[e] if w != NULL else 1.0, d)


cdef inline void _stack_row(floating* row, const floating* x, intp_t xs, intp_t u,
                            const index_t* indptr, const index_t* nb, const double* w,
                            const index_t* t_indptr, const index_t* t_nb,
                            const double* t_w, intp_t d) noexcept nogil:
    """``row[0:3d] = [x[u], P[u], S[u]]``: row ``u`` of ``x`` (row stride
    ``xs``) beside the weighted sum of its predecessors' rows (the in-edges
    ``t_*``) and of its successors' (the out-edges), edges in order. ``w``
    or ``t_w`` NULL: every edge weighs 1."""
    cdef intp_t t
    for t in range(d):
        row[t] = x[u * xs + t]
        row[d + t] = 0.0
        row[2 * d + t] = 0.0
    _row_sum(row + d, x, xs, t_nb, t_w, t_indptr[u], t_indptr[u + 1], d)
    _row_sum(row + 2 * d, x, xs, nb, w, indptr[u], indptr[u + 1], d)


cdef inline intp_t _first_outside(const int64_t* values, intp_t n, int64_t hi) noexcept nogil:
    """The index of the first of ``values[0:n]`` outside ``[0, hi)``, or -1:
    the range check of an index array before a kernel reads through it."""
    cdef intp_t i
    for i in range(n):
        if values[i] < 0 or values[i] >= hi:
            return i
    return -1


cdef inline int _edges_both_ways(str fn, intp_t n, const index_t[::1] indptr,
                                 const index_t[::1] indices, const double[::1] weights,
                                 const index_t[::1] t_indptr, const index_t[::1] t_indices,
                                 const double[::1] t_weights, const index_t** nbr,
                                 const double** wp, const index_t** t_nbr,
                                 const double** t_wp) except -1:
    """Check a graph given by source and by target (``n + 1`` row pointers
    each, the transpose as large as the graph, weights for every edge or
    none) for kernel ``fn``, and point ``nbr``, ``wp``, ``t_nbr``, ``t_wp``
    at its neighbours and weights (NULL for none, and for unit weights)."""
    if indptr.shape[0] != n + 1 or t_indptr.shape[0] != n + 1 \
            or t_indices.shape[0] != indices.shape[0] or t_weights.shape[0] != weights.shape[0]:
        raise ValueError(f"{fn}: indptr and t_indptr must be (n + 1,), the transpose as "
                         "large as the graph")
    if weights.shape[0] not in (0, indices.shape[0]):
        raise ValueError(f"{fn}: weights must be (E,) or (0,)")
    nbr[0] = &indices[0] if indices.shape[0] else NULL
    t_nbr[0] = &t_indices[0] if t_indices.shape[0] else NULL
    wp[0] = &weights[0] if weights.shape[0] else NULL
    t_wp[0] = &t_weights[0] if t_weights.shape[0] else NULL
    return 0


cdef inline double _dot(const floating* a, const floating* b, intp_t d) noexcept nogil:
    """grapheme_dot or grapheme_dot_f: four partial sums in double."""
    if floating is double:
        return dot(a, b, d)
    else:
        return dot_f(a, b, d)
