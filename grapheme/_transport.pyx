# cython: language_level=3
"""Structural-loss kernels (private): log-domain entropic optimal transport
with dustbins, plus the edge (Dice-style preservation) and clique (degree
moments) terms, forward and exact reverse-mode backward through the Sinkhorn
iterations. ``grapheme.loss.StructuralLoss`` validates and calls them.

Layout of one pair b (n predicted nodes, m target nodes):
  augmented arrays have n+1 rows (row n = dustbin) and m+1 columns (column m
  = dustbin), stored row-major with row stride m+1;
  plan[plan_off[b] : plan_off[b+1]]   the augmented plan P
  fpot[f_off[b] + t*(n+1) + i]        f of iteration t (t < iterations used)
  gpot[g_off[b] + t*(m+1) + j]        g of iteration t
Node and edge arrays are concatenated over the batch; CSR indices are global
and int64 (the loss costs O(iterations n m) per pair, so the caller's copy of
int32 indices is negligible and no kernel here needs a fused type).

Two domains, chosen per pair by the caller (``scaled[b]``), same iterations:
  log      f, g as above; every sweep evaluates exp per cell.
  scaling  K = exp(-C/eps) once per pair, u = exp(f/eps), v = exp(g/eps):
           u_i = 1 / sum_j b_j K_ij v_j,  v_j = 1 / sum_i a_i K_ij u_i,
           P_ij = a_i b_j u_i K_ij v_j; fpot/gpot then hold u and v (not
           f, g). Only valid while u, v, K and u K v stay far inside the
           float64 range; the caller guarantees it (see loss.py,
           _scaling_safe), so no saturation (_sexp) can occur either.

The kernels take the two graphs, the settings and the transport state as
objects (the ``_GraphArrays``, ``_Settings`` and ``_Cache`` NamedTuples of
loss.py) and read them into C structs once (:c:func:`_graph`,
:c:func:`_settings`, :c:func:`_layout`); the workspace of both passes comes
from one function (:c:func:`_workspace`).
"""
import numpy as np
from cython.parallel cimport parallel, prange, threadid
from libc.stdint cimport int8_t, int32_t, int64_t, uint8_t
from libc.float cimport DBL_MAX, DBL_MIN
from libc.math cimport exp, log, fabs, hypot, sqrt, INFINITY
from libc.stdlib cimport calloc, malloc, realloc, free
from libc.string cimport memcpy

from grapheme._types cimport dot, intp_t, num_threads_for


# ---------------------------------------------------------------------------
# The arguments as C structs
# ---------------------------------------------------------------------------

cdef struct Graph:
    # One (possibly batched) graph: B graphs, N nodes, E edges in all.
    intp_t nodes                 # N
    const double* activation     # (N,)
    const double* mass           # (N,)
    const int32_t* labels        # (N,)
    const double* degree         # (N,) weighted out-degrees
    const int64_t* indptr        # (N+1,) CSR
    const int64_t* indices       # (E,) CSR, global node indices
    const double* weights        # (E,) edge weights
    const int64_t* offsets       # (B+1,) first node of each graph


cdef struct Settings:
    double w_type, w_act, w_deg  # weights of the node cost's three parts
    double eps                   # entropic regularisation, > 0
    intp_t iterations            # Sinkhorn iterations (the most, with tol)
    double tol                   # early stop at row error <= tol; <= 0: never
    bint balance                 # the dustbin-balancing step before sweeps t >= 1
    double conv_tol              # "converged" threshold when tol <= 0
    double alpha, beta, gamma    # weights of the node, edge, clique terms


cdef struct Layout:
    intp_t pairs                 # B
    const uint8_t* scaled        # (B,) 1: scaling form, 0: log domain
    const uint8_t* self_pair     # (B,) 1: the pair scores a graph against itself
    const int64_t* plan_off      # (B+1,) offsets into plan
    const int64_t* f_off         # (B+1,) offsets into fpot
    const int64_t* g_off         # (B+1,) offsets into gpot


cdef struct Work:
    # Workspace of one pair, reused across pairs; (n+1)(m+1) "cells", n m
    # "real" cells for the largest n, m of the batch. Backward-only
    # buffers are NULL in the forward pass.
    double* C                    # cells: augmented cost
    double* K                    # cells if any pair is scaled: exp(-C/eps)
    double* Q                    # real: row-normalised plan (backward: edge adjoint)
    double* R                    # real: Q Wt^T
    double* aw                   # n+1: augmented row weights
    double* bw                   # m+1: augmented column weights
    const double* one            # m+1 ones
    double* fn                   # n+1 (forward): the next f, for the row error
    double* gs                   # m+1: the balanced (shifted) previous g
    double* M                    # m+1 (forward): LSE shifts / scaling work
    double* Cb                   # cells (backward): cost adjoint
    double* S                    # real (backward): Q Wt
    double* T                    # real (backward): Wp Q
    double* fb                   # n+1 (backward): f adjoint
    double* gb                   # m+1 (backward): g adjoint
    double* gn                   # m+1 (backward): next g adjoint
    double* hv                   # m+1 (backward)
    double* kv                   # m+1 (backward)
    double* cv                   # n+1 (backward): the f adjoint of a sweep, kept
    const double* zero           # m+1 zeros (backward)


cdef inline const double* _cptr(const double[::1] v) noexcept:
    return &v[0] if v.shape[0] > 0 else NULL


cdef int _graph(object arrays, list keep, Graph* g) except -1:
    """Fill ``g`` from a ``_GraphArrays`` (float64, int32 labels, int64 CSR
    and offsets, all C-contiguous; a wrong dtype raises ValueError). The
    memoryviews go into ``keep``, which holds the buffers for the call."""
    cdef const double[::1] activation = arrays.activation
    cdef const double[::1] mass = arrays.mass
    cdef const int32_t[::1] labels = arrays.labels
    cdef const double[::1] degree = arrays.degree
    cdef const int64_t[::1] indptr = arrays.indptr
    cdef const int64_t[::1] indices = arrays.indices
    cdef const double[::1] weights = arrays.weights
    cdef const int64_t[::1] offsets = arrays.offsets
    keep.extend((activation, mass, labels, degree, indptr, indices, weights, offsets))
    g.nodes = activation.shape[0]
    g.activation = _cptr(activation)
    g.mass = _cptr(mass)
    g.labels = &labels[0] if labels.shape[0] > 0 else NULL
    g.degree = _cptr(degree)
    g.indptr = &indptr[0]
    g.indices = &indices[0] if indices.shape[0] > 0 else NULL
    g.weights = _cptr(weights)
    g.offsets = &offsets[0]
    return 0


cdef int _settings(object settings, Settings* s) except -1:
    """Fill ``s`` from a ``_Settings``."""
    s.w_type = settings.w_type
    s.w_act = settings.w_act
    s.w_deg = settings.w_deg
    s.eps = settings.epsilon
    s.iterations = settings.iterations
    s.tol = settings.tol
    s.balance = settings.balance
    s.conv_tol = settings.conv_tol
    s.alpha = settings.alpha
    s.beta = settings.beta
    s.gamma = settings.gamma
    return 0


cdef int _layout(object state, list keep, Layout* lay) except -1:
    """Fill ``lay`` from the transport state (``_Cache``: scaled, self_pair,
    plan_off, f_off, g_off); the memoryviews go into ``keep``."""
    cdef const uint8_t[::1] scaled = state.scaled
    cdef const uint8_t[::1] self_pair = state.self_pair
    cdef const int64_t[::1] plan_off = state.plan_off
    cdef const int64_t[::1] f_off = state.f_off
    cdef const int64_t[::1] g_off = state.g_off
    keep.extend((scaled, self_pair, plan_off, f_off, g_off))
    lay.pairs = scaled.shape[0]
    if self_pair.shape[0] != lay.pairs:
        raise ValueError("self_pair must have one entry per pair")
    lay.scaled = &scaled[0] if scaled.shape[0] > 0 else NULL
    lay.self_pair = &self_pair[0] if self_pair.shape[0] > 0 else NULL
    lay.plan_off = &plan_off[0]
    lay.f_off = &f_off[0]
    lay.g_off = &g_off[0]
    return 0


cdef object _workspace(const Graph* p, const Graph* t, const Layout* lay,
                       bint backward, Work* works, int copies):
    """Allocate the workspaces of a pass, one per thread (``copies``), in ONE
    array and point ``works[0:copies]`` into it; returns that array (the
    caller keeps it alive while they are used).

    Each is sized for the largest pair of the batch, O((n+1)(m+1)) doubles
    (K only if some pair is scaled), and starts on its own cache line.
    """
    cdef intp_t maxn = 0, maxm = 0, k
    cdef bint any_scaled = False
    for k in range(lay.pairs):
        maxn = max(maxn, <intp_t>(p.offsets[k + 1] - p.offsets[k]))
        maxm = max(maxm, <intp_t>(t.offsets[k + 1] - t.offsets[k]))
        any_scaled = any_scaled or lay.scaled[k] != 0
    cdef intp_t cells = (maxn + 1) * (maxm + 1)
    cdef intp_t real = max(maxn * maxm, 1)
    cdef intp_t rows = maxn + 1, cols = maxm + 1
    cdef intp_t total = (cells + (cells if any_scaled else 1) + 2 * real
                         + rows + 2 * cols)
    total += cols                # gs
    if backward:
        total += cells + 2 * real + 2 * rows + 5 * cols
    else:
        total += rows + cols
    total = (total + 7) // 8 * 8             # 64 bytes: no false sharing
    buf = np.empty(total * copies + 8)
    cdef double[::1] view = buf
    cdef double* base = &view[0]
    base += (8 - (<size_t>base // sizeof(double)) % 8) % 8   # a 64-byte boundary
    cdef double* at
    cdef double* ones
    cdef double* zeros
    cdef intp_t j
    cdef Work* w
    for k in range(copies):
        w = &works[k]
        at = base + k * total
        w.C = at; at += cells
        w.K = at; at += cells if any_scaled else 1
        w.Q = at; at += real
        w.R = at; at += real
        w.aw = at; at += rows
        w.bw = at; at += cols
        ones = at; at += cols
        for j in range(cols):
            ones[j] = 1.0
        w.one = ones
        w.gs = at; at += cols
        w.fn = w.M = w.Cb = w.S = w.T = w.fb = w.gb = w.gn = w.hv = w.kv = w.cv = NULL
        w.zero = NULL
        if backward:
            w.Cb = at; at += cells
            w.S = at; at += real
            w.T = at; at += real
            w.fb = at; at += rows
            w.gb = at; at += cols
            w.gn = at; at += cols
            w.hv = at; at += cols
            w.kv = at; at += cols
            w.cv = at; at += rows
            zeros = at; at += cols
            for j in range(cols):
                zeros[j] = 0.0
            w.zero = zeros
        else:
            w.fn = at; at += rows
            w.M = at; at += cols
    return buf


# Below this many augmented cells in a batch (sum_b (n_b+1)(m_b+1), each
# visited a few times per sweep) the pairs run on one thread: starting the
# others would cost more than they save.
cdef intp_t _PARALLEL_CELLS = 4096


cdef int _pair_threads(int requested, const Layout* lay) noexcept:
    """Threads for the pairs of a batch: see :c:func:`num_threads_for`, and
    1 below ``_PARALLEL_CELLS`` cells."""
    if lay.plan_off[lay.pairs] < _PARALLEL_CELLS:
        return 1
    return num_threads_for(requested, lay.pairs)


# ---------------------------------------------------------------------------
# Pieces of one pair
# ---------------------------------------------------------------------------

# Un-shifted exponentials exp((f_i + g_j - C_ij)/eps) are <= 1/w for a cell
# whose row or column weight w is positive; only cells of a ZERO mass can grow
# without bound (the derivative with respect to a zero mass can be of order
# exp(1/eps): the loss has a boundary layer in that mass narrower than float64
# resolves). Saturating at exp(300) keeps every output finite and changes
# nothing for weights above exp(-300).
cdef inline double _sexp(double z) noexcept nogil:
    return exp(z if z < 300.0 else 300.0)


cdef void _cost_matrix(intp_t n, intp_t m,
                       const double* x, const int32_t* lp, const double* dp,
                       const double* y, const int32_t* lt, const double* dt,
                       double w_type, double w_act, double w_deg,
                       double* C) noexcept nogil:
    """Augmented cost (n+1, m+1): real block, 1 to/from the dustbins, 0 corner."""
    cdef intp_t i, j, s = m + 1
    cdef double d, mx
    for i in range(n):
        for j in range(m):
            d = fabs(x[i] - y[j])
            if d > 1.0:
                d = 1.0
            mx = dp[i] if dp[i] > dt[j] else dt[j]
            if mx < 1.0:
                mx = 1.0
            C[i * s + j] = (w_type * (0.0 if lp[i] == lt[j] else 0.5)
                            + w_act * d + w_deg * fabs(dp[i] - dt[j]) / mx)
        C[i * s + m] = 1.0
    for j in range(m):
        C[n * s + j] = 1.0
    C[n * s + m] = 0.0


cdef void _update_f(intp_t n1, intp_t m1, const double* C, const double* g,
                    const double* bw, double eps, double* f) noexcept nogil:
    """f_i = -eps LSE_j(bw_j exp((g_j - C_ij)/eps)), shift over bw_j > 0."""
    cdef intp_t i, j
    cdef const double* row
    cdef double M, z, s
    for i in range(n1):
        row = C + i * m1
        M = -INFINITY
        for j in range(m1):
            if bw[j] > 0.0:
                z = g[j] - row[j]
                if z > M:
                    M = z
        s = 0.0
        for j in range(m1):
            if bw[j] > 0.0:
                s += bw[j] * exp((g[j] - row[j] - M) / eps)
        f[i] = -(M + eps * log(s))


cdef void _update_g(intp_t n1, intp_t m1, const double* C, const double* f,
                    const double* aw, double eps, double* g,
                    double* M) noexcept nogil:
    """g_j = -eps LSE_i(aw_i exp((f_i - C_ij)/eps)); row-major, M is (m1,) work."""
    cdef intp_t i, j
    cdef const double* row
    cdef double z, fi, ai
    for j in range(m1):
        M[j] = -INFINITY
        g[j] = 0.0
    for i in range(n1):
        if aw[i] > 0.0:
            row = C + i * m1
            fi = f[i]
            for j in range(m1):
                z = fi - row[j]
                if z > M[j]:
                    M[j] = z
    for i in range(n1):
        ai = aw[i]
        if ai > 0.0:
            row = C + i * m1
            fi = f[i]
            for j in range(m1):
                g[j] += ai * exp((fi - row[j] - M[j]) / eps)
    for j in range(m1):
        g[j] = -(M[j] + eps * log(g[j]))


cdef double _row_error(intp_t n1, const double* f, const double* fnext,
                       const double* aw, double eps) noexcept nogil:
    """max_i |sum_j P_ij - aw_i| of the plan (f, g), given fnext = F(g).

    sum_j P_ij = aw_i exp((f_i - fnext_i)/eps), so no pass over the cells.
    """
    cdef intp_t i
    cdef double err = 0.0, e
    for i in range(n1):
        if aw[i] > 0.0:
            e = aw[i] * fabs(exp((f[i] - fnext[i]) / eps) - 1.0)
            if not (e <= err):   # also propagates inf
                err = e
    return err


cdef bint _one_sweep_leaves_massless_row(intp_t nit, intp_t n1,
                                         const double* aw) noexcept nogil:
    """Whether a plan of one sweep (``iterations=1``) has a row without
    mass: the row error does not weigh it, and its potential still comes
    from the start (g = 0 or v = 1), not from a sweep, so "converged" would
    vouch for what it never checked (its mass gradient is off)."""
    cdef intp_t i
    if nit != 1:
        return False
    for i in range(n1):
        if aw[i] == 0.0:
            return True
    return False


cdef void _kernel_matrix(intp_t cells, const double* C, double eps,
                         double* K) noexcept nogil:
    """K = exp(-C/eps), once per pair."""
    cdef intp_t c
    for c in range(cells):
        K[c] = exp(-C[c] / eps)


cdef void _update_u(intp_t n1, intp_t m1, const double* K, const double* v,
                    const double* bw, double* u, double* bv) noexcept nogil:
    """u_i = 1 / sum_j bw_j K_ij v_j (scaling form of _update_f); bv is (m1,) work."""
    cdef intp_t i, j
    for j in range(m1):
        bv[j] = bw[j] * v[j]
    for i in range(n1):
        u[i] = 1.0 / dot(bv, K + i * m1, m1)


cdef void _sweep_uv(intp_t n1, intp_t m1, const double* K, const double* vin,
                    const double* bw, const double* aw, double* u, double* v,
                    double* bv, double x, double* un) noexcept nogil:
    """One sweep in ONE pass over K: u = 1/(K (bw vt)), v = 1/(K^T (aw u)),
    with vt the balanced input: vin / x on the real columns, vin on the
    dustbin column (x = 1: plain Sinkhorn, and exactly its arithmetic).

    u_i needs only row i, so the column sums of v accumulate from the row
    while it is in cache; bv is (m1,) work. Same result as _update_u then
    _update_v (up to the order of the additions). If ``un`` is not NULL it
    receives U(vin) = 1/(K (bw vin)), the update of the UNbalanced input
    (for the row error of the plan (u_prev, vin)), from the same pass.
    """
    cdef intp_t i, j, mr = m1 - 1
    cdef const double* row
    cdef double s, c, sd
    for j in range(m1):
        bv[j] = bw[j] * vin[j]
        v[j] = 0.0
    if x != 1.0:
        for j in range(mr):
            bv[j] = bw[j] * (vin[j] / x)
    for i in range(n1):
        row = K + i * m1
        s = dot(bv, row, mr)
        sd = bv[mr] * row[mr]
        u[i] = 1.0 / (s + sd)
        if un != NULL:
            un[i] = 1.0 / (x * s + sd)
        if aw[i] > 0.0:
            c = aw[i] * u[i]
            for j in range(m1):
                v[j] += c * row[j]
    for j in range(m1):
        v[j] = 1.0 / v[j]


cdef struct Balance:
    # The dustbin-balancing step of one sweep (see _balance).
    bint applied
    double x                     # e^{c/eps}: real f += c, real g -= c
    double sa                    # sum_{i<n} a_i e_im (the deletion mass s = A sa)
    double sb                    # sum_{j<m} b_j e_nj (the insertion mass r = B sb)
    double R                     # sqrt((A - B)^2 + 4 s r)
    double p                     # s x, computed without forming it
    double q                     # r / x, the same


cdef inline double _cell(bint sc, intp_t i, intp_t j, intp_t m1, const double* f,
                         const double* g, const double* C, const double* K,
                         double eps) noexcept nogil:
    """e_ij = exp((f_i + g_j - C_ij)/eps), or u_i K_ij v_j in the scaling form."""
    if sc:
        return f[i] * K[i * m1 + j] * g[j]
    return _sexp((f[i] + g[j] - C[i * m1 + j]) / eps)


cdef Balance _balance(intp_t n, intp_t m, bint sc, const double* f, const double* g,
                      const double* C, const double* K, const double* aw,
                      const double* bw, double eps) noexcept nogil:
    """The exact dual ascent step along the one direction plain Sinkhorn is
    slow on: f_i += c (i < n), g_j -= c (j < m), dustbins fixed.

    The direction moves mass only between the deletion column (cells (i, m),
    scaled by x = e^{c/eps}) and the insertion row (cells (n, j), scaled by
    1/x); the dual's derivative along it is (A - B) - s x + r / x, so its
    maximiser is the positive root of s x^2 - (A - B) x - r = 0 (a concave
    1-D problem, solved in closed form). Not applied (x = 1) without real
    rows or columns, or when s, r or their sums are not normal doubles or
    x is not: a subnormal s or r has lost its precision, and a step from it
    is noise (its adjoint overflowed to NaN at epsilon 1e-3, found by a
    numerical reviewer). O(n + m).
    """
    cdef Balance out
    cdef intp_t i, j, m1 = m + 1
    cdef double d, x, s, r
    out.applied = False
    out.x = 1.0
    out.sa = out.sb = out.R = out.p = out.q = 0.0
    if n == 0 or m == 0:
        return out
    for i in range(n):
        out.sa += aw[i] * _cell(sc, i, m, m1, f, g, C, K, eps)
    s = bw[m] * out.sa
    for j in range(m):
        out.sb += bw[j] * _cell(sc, n, j, m1, f, g, C, K, eps)
    r = aw[n] * out.sb
    if not (DBL_MIN <= out.sa <= DBL_MAX and DBL_MIN <= out.sb <= DBL_MAX
            and DBL_MIN <= s <= DBL_MAX and DBL_MIN <= r <= DBL_MAX):
        return out
    d = bw[m] - aw[n]                          # A - B
    out.R = hypot(d, 2.0 * sqrt(s) * sqrt(r))   # 4 s r overflows near 1e150 masses
    # the root and, for the adjoint, s x and r / x, each without cancellation
    if d >= 0.0:
        x = (d + out.R) / (2.0 * s)
        out.p = 0.5 * (d + out.R)
        out.q = 2.0 * (s * (r / (d + out.R)))
    else:
        x = 2.0 * r / (out.R - d)
        out.p = 2.0 * (s * (r / (out.R - d)))
        out.q = 0.5 * (out.R - d)
    if not (DBL_MIN <= x <= DBL_MAX):
        return out
    out.x = x
    out.applied = True
    return out


cdef void _balance_adjoint(intp_t n, intp_t m, bint sc, const double* f,
                           const double* g, const double* C, const double* K,
                           const double* aw, const double* bw, double eps,
                           const Balance* bal, double* fb, double* gb,
                           double* ga, double* abar, double* gbm,
                           double* bbar) noexcept nogil:
    """Reverse of the balancing step taken at (f, g), which fed F with g - c
    on the real columns (c = eps log x). On entry gb holds the adjoint of
    that balanced g; on exit, the adjoint of g. Adds to fb (adjoint of f),
    ga (of the n predicted masses), abar (of A = sum a, the dustbin
    column weight), gbm (of the m target masses) and bbar (of B = sum b,
    the dustbin row weight). By the implicit function theorem on s x^2 - d x - r = 0
    (d = A - B), with R = 2 s x - d: dx/ds = -x^2/R, dx/dd = x/R,
    dx/dr = 1/R. The adjoint of log x (c = eps log x) times these is formed
    from s x and r / x, never dividing by x: x may be near the ends of the
    doubles' range, where 1 / x overflowed and inf * 0 gave NaN. O(n + m)."""
    cdef intp_t i, j, m1 = m + 1
    cdef double lbar = 0.0, sbar_s, rbar_r, dbar, e
    for j in range(m):
        lbar -= gb[j]
    lbar *= eps                      # the adjoint of log x
    sbar_s = -lbar * bal.p / bal.R   # sbar s  = lbar (dx/ds) s / x
    rbar_r = lbar * bal.q / bal.R    # rbar r  = lbar (dx/dr) r / x
    dbar = lbar / bal.R              # dbar    = lbar (dx/dd) / x
    # s = A sa, sa = sum_{i<n} a_i e_im
    for i in range(n):
        e = _cell(sc, i, m, m1, f, g, C, K, eps) / bal.sa
        fb[i] += sbar_s * aw[i] * e / eps
        ga[i] += sbar_s * e
    gb[m] += sbar_s / eps
    abar[0] += sbar_s / bw[m] + dbar
    # r = B sb, sb = sum_{j<m} b_j e_nj
    fb[n] += rbar_r / eps
    for j in range(m):
        e = _cell(sc, n, j, m1, f, g, C, K, eps) / bal.sb
        gb[j] += rbar_r * bw[j] * e / eps
        gbm[j] += rbar_r * e
    # d = A - B
    bbar[0] += rbar_r / aw[n] - dbar


# The activation cost min(|x - y|, 1) has a kink at x = y, where its
# derivative is taken as 0 (the subgradient central differences give). A
# node whose activation is a target's up to rounding sits on that kink too:
# the two are often the same mean of the same features, computed by two
# kernels (a merge of the model's features against the gold segmentation's
# contraction of them), equal in one run and an ulp apart in another whose
# summation order differs (data-parallel ranks). Within _KINK (|x| + |y| +
# 1) of the kink the derivative is 0 as well, so that rounding cannot pick
# the sign: 2^-40, far above a float64 mean's rounding (d eps relative for
# d < 4096; the absolute floor for means that nearly cancel, whose rounding
# follows the features' size, not the mean's) and far below any
# finite-difference step. float32 features round far coarser than that.
cdef double _KINK = 9.094947017729282e-13

# Below this a target mass's gradient is summed over its column instead of
# recovered from the adjoint of g (a division by b_j): b_j v_j K_ij terms stay
# far from float64's subnormal range above it.
cdef double _TINY_MASS = 1e-100


cdef void _target_mass_scaled(intp_t n1, intp_t m, intp_t m1, const double* K,
                              const double* cc, const double* gn, const double* bw,
                              const double* vprev, double x, double eps,
                              double* gbm) noexcept nogil:
    """Add the f half-step's share of d/d b_j (j < m) in the scaling form:
    u_i = 1 / sum_j b_j K_ij v'_j (v'_j = vprev_j / x), whose f adjoint
    times u_i is ``cc``; ``gn`` already holds the previous g's adjoint
    -b_j v'_j sum_i cc_i K_ij. O(m), plus O(n) per column of tiny mass."""
    cdef intp_t i, j
    cdef double s
    for j in range(m):
        if bw[j] >= _TINY_MASS:
            gbm[j] += eps * gn[j] / bw[j]
        else:
            s = 0.0
            for i in range(n1):
                s += cc[i] * K[i * m1 + j]
            gbm[j] -= eps * (vprev[j] / x) * s


cdef void _target_mass_log(intp_t n1, intp_t m, intp_t m1, const double* C,
                           const double* fb, const double* gb, const double* bw,
                           const double* g, const double* f, double eps,
                           double* gbm) noexcept nogil:
    """The same in the log domain: f_i = -eps LSE_j(b_j e^{(g_j - C_ij)/eps})
    with f adjoint ``fb``; ``gb`` holds the previous g's adjoint
    -b_j sum_i fb_i E_ij. O(m), plus O(n) per column of tiny mass."""
    cdef intp_t i, j
    cdef double s
    for j in range(m):
        if bw[j] >= _TINY_MASS:
            gbm[j] += eps * gb[j] / bw[j]
        else:
            s = 0.0
            for i in range(n1):
                if fb[i] != 0.0:
                    s += fb[i] * _sexp((g[j] - C[i * m1 + j] + f[i]) / eps)
            gbm[j] -= eps * s


cdef struct Store:
    # A growable array of doubles (the potentials of every sweep of a batch).
    # ``borrowed``: ``data`` is the caller's (a workspace array), never
    # reallocated or freed here; outgrowing it moves to a malloc'ed copy.
    double* data
    intp_t size
    intp_t cap
    bint borrowed


cdef int _reserve(Store* st, intp_t need) noexcept nogil:
    """Make room for ``need`` doubles, doubling the capacity; -1 if out of memory."""
    cdef intp_t cap
    cdef double* p
    if need <= st.cap:
        return 0
    cap = 2 * st.cap if 2 * st.cap > need else need
    if st.borrowed:
        p = <double*>malloc(cap * sizeof(double))
        if p != NULL and st.cap > 0:
            memcpy(p, st.data, st.cap * sizeof(double))
    else:
        p = <double*>realloc(st.data, cap * sizeof(double))
    if p == NULL:
        return -1
    st.data = p
    st.cap = cap
    st.borrowed = False
    return 0


cdef double _row_error_scaled(intp_t n1, const double* u, const double* unext,
                              const double* aw) noexcept nogil:
    """_row_error in the scaling form: sum_j P_ij = aw_i u_i / unext_i."""
    cdef intp_t i
    cdef double err = 0.0, e
    for i in range(n1):
        if aw[i] > 0.0:
            e = aw[i] * fabs(u[i] / unext[i] - 1.0)
            if not (e <= err):
                err = e
    return err


cdef void _moments(intp_t n, const double* w, const double* deg,
                   double* mean, double* var, double* maxd) noexcept nogil:
    """Mass-weighted mean/variance of deg / max(max deg, 1); 0 if no mass."""
    cdef intp_t i
    cdef double tot = 0.0, s = 0.0, mx = 1.0, nd
    for i in range(n):
        if deg[i] > mx:
            mx = deg[i]
    maxd[0] = mx
    for i in range(n):
        tot += w[i]
        s += w[i] * deg[i] / mx
    if tot == 0.0:
        mean[0] = 0.0
        var[0] = 0.0
        return
    mean[0] = s / tot
    s = 0.0
    for i in range(n):
        nd = deg[i] / mx - mean[0]
        s += w[i] * nd * nd
    var[0] = s / tot


cdef void _edge_tables(intp_t n, intp_t m, const double* Q,
                       const int64_t* ipt, const int64_t* it, const double* wt,
                       intp_t t0, double* R, double* S) noexcept nogil:
    """R = Q Wt^T and (if S != NULL) S = Q Wt, both (n, m); O(n E_t)."""
    cdef intp_t v, j, l, e
    cdef double w
    for v in range(n * m):
        R[v] = 0.0
        if S != NULL:
            S[v] = 0.0
    for v in range(n):
        for j in range(m):
            for e in range(<intp_t>ipt[t0 + j], <intp_t>ipt[t0 + j + 1]):
                l = <intp_t>it[e] - t0
                w = wt[e]
                R[v * m + j] += w * Q[v * m + l]
                if S != NULL:
                    S[v * m + l] += w * Q[v * m + j]


# ---------------------------------------------------------------------------
# One pair
# ---------------------------------------------------------------------------

cdef int _forward_pair(intp_t b, const Graph* P_, const Graph* T_, const Settings* st,
                       const Layout* lay, Work* w, Store* fst, Store* gst,
                       double* planp, double* terms, int64_t* used, uint8_t* converged,
                       int64_t* f_at, int64_t* g_at) noexcept nogil:
    """The forward pass of pair b (see :func:`structural_loss_forward`).

    Writes only pair b's entries: its plan, ``terms[4b:4b+4]``, ``used[b]``,
    ``converged[b]``; appends its potentials to ``fst`` and ``gst`` (the
    calling thread's stores) and records where they start in ``f_at[b]``
    and ``g_at[b]``. All else it reads is read-only, so pairs may run on any
    threads in any order with the same results, bit for bit. Returns -1 if
    a store cannot grow (out of memory), else 0.
    """
    cdef intp_t iterations = st.iterations
    cdef double w_type = st.w_type, w_act = st.w_act, w_deg = st.w_deg
    cdef double eps = st.eps, tol = st.tol, conv_tol = st.conv_tol
    cdef bint balance = st.balance
    cdef const uint8_t* scaled = lay.scaled
    cdef const int64_t* plan_off = lay.plan_off
    cdef const int64_t* off_p = P_.offsets
    cdef const int64_t* off_t = T_.offsets
    cdef const double* xp = P_.activation
    cdef const double* ap = P_.mass
    cdef const double* dpp = P_.degree
    cdef const int32_t* lpp = P_.labels
    cdef const double* yp = T_.activation
    cdef const double* bp = T_.mass
    cdef const double* dtp = T_.degree
    cdef const int32_t* ltp = T_.labels
    cdef const int64_t* ippp = P_.indptr
    cdef const int64_t* iptp = T_.indptr
    cdef const int64_t* ipi = P_.indices
    cdef const int64_t* iti = T_.indices
    cdef const double* wpp = P_.weights
    cdef const double* wtp = T_.weights
    cdef double* C = w.C
    cdef double* Q = w.Q
    cdef double* R = w.R
    cdef double* aw = w.aw
    cdef double* bw = w.bw
    cdef double* fn = w.fn
    cdef double* gs = w.gs
    cdef double* M = w.M
    cdef double* K = w.K
    cdef const double* one = w.one

    cdef intp_t i, j, t, n, m, n1, m1, p0, t0, e, v, nit, f0, g0
    cdef double A, Bt, node, X, Wsum, err, E, mp, vp, mt, vt, md, c
    cdef double* P
    cdef double* f
    cdef double* g
    cdef double* gprev
    cdef bint have_next, conv
    cdef Balance bal
    bal.applied = False

    p0 = <intp_t>off_p[b]
    t0 = <intp_t>off_t[b]
    n = <intp_t>off_p[b + 1] - p0
    m = <intp_t>off_t[b + 1] - t0
    n1 = n + 1
    m1 = m + 1
    f0 = fst.size
    g0 = gst.size
    f_at[b] = f0
    g_at[b] = g0
    P = planp + plan_off[b]
    _cost_matrix(n, m, xp + p0, lpp + p0, dpp + p0,
                 yp + t0, ltp + t0, dtp + t0, w_type, w_act, w_deg, C)
    A = 0.0
    for i in range(n):
        aw[i] = ap[p0 + i]
        A += aw[i]
    Bt = 0.0
    for j in range(m):
        bw[j] = bp[t0 + j]
        Bt += bw[j]
    aw[n] = Bt
    bw[m] = A

    node = 0.0
    err = 0.0
    nit = 0
    conv = True
    if A + Bt == 0.0:
        for i in range(n1 * m1):
            P[i] = 0.0
        for i in range(n * m):
            Q[i] = 0.0
    elif scaled[b]:
        _kernel_matrix(n1 * m1, C, eps, K)
        conv = False
        # one pass over K per sweep: sweep t+1 is run (into slot
        # t+1) as soon as v^t is known, and its pass also gives
        # U(v^t), the row error of iteration t; on an early stop the
        # speculative slot t+1 is simply not kept
        if _reserve(fst, f0 + n1) != 0 or _reserve(gst, g0 + m1) != 0:
            return -1
        _sweep_uv(n1, m1, K, one, bw, aw, fst.data + f0, gst.data + g0, M,
                  1.0, NULL)
        for t in range(iterations):
            nit = t + 1
            if t == iterations - 1:
                f = fst.data + f0 + t * n1      # u of iteration t
                g = gst.data + g0 + t * m1      # v of iteration t
                _update_u(n1, m1, K, g, bw, fn, M)
                err = _row_error_scaled(n1, f, fn, aw)
                if tol > 0.0 and err <= tol:
                    conv = True
                break
            if (_reserve(fst, f0 + (t + 2) * n1) != 0
                    or _reserve(gst, g0 + (t + 2) * m1) != 0):
                return -1
            f = fst.data + f0 + t * n1
            g = gst.data + g0 + t * m1
            if balance:
                bal = _balance(n, m, True, f, g, C, K, aw, bw, eps)
                _sweep_uv(n1, m1, K, g, bw, aw, f + n1, g + m1, M, bal.x, fn)
                if tol > 0.0:
                    err = _row_error_scaled(n1, f, fn, aw)
            else:
                _sweep_uv(n1, m1, K, g, bw, aw, f + n1, g + m1, M, 1.0, NULL)
                if tol > 0.0:
                    err = _row_error_scaled(n1, f, f + n1, aw)
            # not on the first sweep (see the log form)
            if tol > 0.0 and err <= tol and t > 0:
                conv = True
                break
        if tol <= 0.0:
            conv = err <= conv_tol
        f = fst.data + f0 + (nit - 1) * n1
        g = gst.data + g0 + (nit - 1) * m1
        for i in range(n1):
            for j in range(m1):
                E = f[i] * K[i * m1 + j] * g[j]
                P[i * m1 + j] = aw[i] * bw[j] * E
                node += P[i * m1 + j] * C[i * m1 + j]
                if i < n and j < m:
                    Q[i * m + j] = bw[j] * E
    else:
        conv = False
        have_next = False
        for t in range(iterations):
            if (_reserve(fst, f0 + (t + 1) * n1) != 0
                    or _reserve(gst, g0 + (t + 1) * m1) != 0):
                return -1
            f = fst.data + f0 + t * n1
            g = gst.data + g0 + t * m1
            bal.applied = False
            if balance and t > 0:
                bal = _balance(n, m, False, f - n1, g - m1, C, NULL, aw, bw, eps)
            if bal.applied:
                # F of the balanced g: g_j - eps log x on the real columns
                c = eps * log(bal.x)
                gprev = g - m1
                for j in range(m):
                    gs[j] = gprev[j] - c
                gs[m] = gprev[m]
                _update_f(n1, m1, C, gs, bw, eps, f)
            elif have_next:
                for i in range(n1):
                    f[i] = fn[i]
            elif t == 0:
                for j in range(m1):
                    M[j] = 0.0
                _update_f(n1, m1, C, M, bw, eps, f)
            else:
                _update_f(n1, m1, C, g - m1, bw, eps, f)
            _update_g(n1, m1, C, f, aw, eps, g, M)
            nit = t + 1
            if tol > 0.0 or t == iterations - 1:
                _update_f(n1, m1, C, g, bw, eps, fn)
                have_next = True
                err = _row_error(n1, f, fn, aw, eps)
                # not on the first sweep, unless it is the only one: its f
                # came from g = 0, not from a sweep, and a row without mass
                # (which the row error does not weigh) kept that f, and its
                # mass gradient was off 3600x (all masses 0: a numerical
                # review's find); where it is the only one, such a pair is
                # reported not converged (below)
                if tol > 0.0 and err <= tol and (t > 0 or t == iterations - 1):
                    conv = True
                    break
        if tol <= 0.0:
            conv = err <= conv_tol
        f = fst.data + f0 + (nit - 1) * n1
        g = gst.data + g0 + (nit - 1) * m1
        for i in range(n1):
            for j in range(m1):
                E = _sexp((f[i] + g[j] - C[i * m1 + j]) / eps)
                P[i * m1 + j] = aw[i] * bw[j] * E
                node += P[i * m1 + j] * C[i * m1 + j]
                if i < n and j < m:
                    Q[i * m + j] = bw[j] * E
    fst.size = f0 + nit * n1
    gst.size = g0 + nit * m1
    if conv and _one_sweep_leaves_massless_row(nit, n1, aw):   # either form
        conv = False

    # edge term: X = sum_{u->v} w_uv <Q_u, R_v>, R = Q Wt^T
    Wsum = 0.0
    for e in range(<intp_t>ippp[p0], <intp_t>ippp[p0 + n]):
        Wsum += wpp[e]
    for e in range(<intp_t>iptp[t0], <intp_t>iptp[t0 + m]):
        Wsum += wtp[e]
    X = 0.0
    if (n > 0 and m > 0 and ippp[p0 + n] > ippp[p0]
            and iptp[t0 + m] > iptp[t0]):
        _edge_tables(n, m, Q, iptp, iti, wtp, t0, R, NULL)
        for i in range(n):
            for e in range(<intp_t>ippp[p0 + i], <intp_t>ippp[p0 + i + 1]):
                v = <intp_t>ipi[e] - p0
                E = 0.0
                for j in range(m):
                    E += Q[i * m + j] * R[v * m + j]
                X += wpp[e] * E

    _moments(n, ap + p0, dpp + p0, &mp, &vp, &md)
    _moments(m, bp + t0, dtp + t0, &mt, &vt, &md)

    terms[4 * b + 0] = node
    terms[4 * b + 1] = 0.0 if Wsum == 0.0 else 1.0 - 2.0 * X / Wsum
    terms[4 * b + 2] = (mp - mt) * (mp - mt) + (vp - vt) * (vp - vt)
    terms[4 * b + 3] = err
    used[b] = nit
    converged[b] = conv
    return 0


cdef struct GradOut:
    # The outputs of the backward pass, zeroed before the pairs run; pair b
    # adds only to the entries of its own nodes and edges.
    double* activation           # (N,)
    double* mass                 # (N,)
    double* target_activation    # (M,)
    double* weights              # (E_p,)
    double* target_weights       # (E_t,)
    double* target_mass          # (M,)
    double* degree               # (N,) d value / d degree, predicted nodes
    double* target_degree        # (M,) the same, target nodes


cdef int _backward_pair(intp_t b, const Graph* P_, const Graph* T_, const Settings* st,
                        const Layout* lay, Work* w, const double* Fp, const double* Gp,
                        const int64_t* used, const double* scale,
                        const GradOut* out) noexcept nogil:
    """The backward pass of pair b (see :func:`structural_loss_backward`).

    Adds only to the entries of ``out`` of pair b's nodes and edges, each
    in a fixed order, and reads nothing another pair writes; so pairs may
    run on any threads in any order with the same results, bit for bit.
    Returns 0.
    """
    cdef double w_type = st.w_type, w_act = st.w_act, w_deg = st.w_deg
    cdef double eps = st.eps, alpha = st.alpha, beta = st.beta, gamma = st.gamma
    cdef bint balance = st.balance
    cdef const uint8_t* scaled = lay.scaled
    cdef const int64_t* f_off = lay.f_off
    cdef const int64_t* g_off = lay.g_off
    cdef const int64_t* off_p = P_.offsets
    cdef const int64_t* off_t = T_.offsets
    cdef const double* xp = P_.activation
    cdef const double* ap = P_.mass
    cdef const double* dpp = P_.degree
    cdef const int32_t* lpp = P_.labels
    cdef const double* yp = T_.activation
    cdef const double* bp = T_.mass
    cdef const double* dtp = T_.degree
    cdef const int32_t* ltp = T_.labels
    cdef const int64_t* ippp = P_.indptr
    cdef const int64_t* iptp = T_.indptr
    cdef const int64_t* ipi = P_.indices
    cdef const int64_t* iti = T_.indices
    cdef const double* wpp = P_.weights
    cdef const double* wtp = T_.weights
    cdef double* C = w.C
    cdef double* Cb = w.Cb
    cdef double* D = w.Q
    cdef double* R = w.R
    cdef double* S = w.S
    cdef double* aw = w.aw
    cdef double* bw = w.bw
    cdef double* fb = w.fb
    cdef double* gb = w.gb
    cdef const double* zero = w.zero
    cdef const double* one = w.one
    cdef double* gn = w.gn
    cdef double* hv = w.hv
    cdef double* kv = w.kv
    cdef double* K = w.K
    cdef double* cv = w.cv
    cdef double* Tq = w.T
    cdef double* gs = w.gs
    cdef double* gxp = out.activation
    cdef double* gap = out.mass
    cdef double* gyp = out.target_activation
    cdef double* gwp = out.weights
    cdef double* gwtp = out.target_weights
    cdef double* gbp = out.target_mass
    cdef double* gdp = out.degree
    cdef double* gdt = out.target_degree
    cdef const double* Krow
    cdef double* tmp
    cdef double ui, al, cc, r, csh
    cdef bint sc, has_edges
    cdef double X, cx, cg, sig, G, dpi, dtj, dl, mx, ad, dp_, dt_, mdt
    cdef Balance bal
    cdef intp_t i, j, t, n, m, n1, m1, p0, t0, e, u, v, nit, c
    cdef double A, Bt, Wsum, E, P, s, cn, ce, cbar, abar_dust, bbar_dust, gbj, fbi, d
    cdef double mp, vp, mt, vt, md, dmean, dvar, nd
    cdef const double* f
    cdef const double* g
    cdef const double* gprev
    cdef const double* gt
    cdef const double* Crow
    cdef double* Cbrow
    bal.applied = False

    p0 = <intp_t>off_p[b]
    t0 = <intp_t>off_t[b]
    n = <intp_t>off_p[b + 1] - p0
    m = <intp_t>off_t[b + 1] - t0
    n1 = n + 1
    m1 = m + 1
    nit = <intp_t>used[b]
    A = 0.0
    for i in range(n):
        aw[i] = ap[p0 + i]
        A += aw[i]
    Bt = 0.0
    for j in range(m):
        bw[j] = bp[t0 + j]
        Bt += bw[j]
    aw[n] = Bt
    bw[m] = A

    # clique: gamma ((mp-mt)^2 + (vp-vt)^2), the moments of nd_i =
    # d_i / md (md = max(max_k d_k, 1)); d/da_i, and d/d d_k =
    # (G_k - [d_k = md] sum_i G_i nd_i) / md with G_i = d clique / d nd_i
    # (right derivative of the max: every maximal d_k raises it);
    # zero on a side without mass
    _moments(n, ap + p0, dpp + p0, &mp, &vp, &md)
    _moments(m, bp + t0, dtp + t0, &mt, &vt, &mdt)
    dmean = 2.0 * (mp - mt)
    dvar = 2.0 * (vp - vt)
    cg = scale[b] * gamma
    if A > 0.0:
        for i in range(n):
            nd = dpp[p0 + i] / md - mp
            gap[p0 + i] += scale[b] * gamma * (
                dmean * nd + dvar * (nd * nd - vp)) / A
        sig = 0.0
        for i in range(n):
            G = (dmean + 2.0 * dvar * (dpp[p0 + i] / md - mp)) * ap[p0 + i] / A
            gdp[p0 + i] += cg * G / md
            sig += G * dpp[p0 + i] / md
        for i in range(n):
            if dpp[p0 + i] >= md:
                gdp[p0 + i] -= cg * sig / md
    if Bt > 0.0:
        for j in range(m):
            nd = dtp[t0 + j] / mdt - mt
            gbp[t0 + j] -= scale[b] * gamma * (
                dmean * nd + dvar * (nd * nd - vt)) / Bt
        sig = 0.0
        for j in range(m):
            G = -(dmean + 2.0 * dvar * (dtp[t0 + j] / mdt - mt)) * bp[t0 + j] / Bt
            gdt[t0 + j] += cg * G / mdt
            sig += G * dtp[t0 + j] / mdt
        for j in range(m):
            if dtp[t0 + j] >= mdt:
                gdt[t0 + j] -= cg * sig / mdt

    if A + Bt == 0.0 or nit == 0:
        return 0
    _cost_matrix(n, m, xp + p0, lpp + p0, dpp + p0,
                 yp + t0, ltp + t0, dtp + t0, w_type, w_act, w_deg, C)
    sc = scaled[b] != 0
    if sc:
        _kernel_matrix(n1 * m1, C, eps, K)
    f = Fp + f_off[b] + (nit - 1) * n1
    g = Gp + g_off[b] + (nit - 1) * m1

    # edge adjoint dX/dQ = Wp R + Wp^T S (R = Q Wt^T, S = Q Wt), in D
    Wsum = 0.0
    for e in range(<intp_t>ippp[p0], <intp_t>ippp[p0 + n]):
        Wsum += wpp[e]
    for e in range(<intp_t>iptp[t0], <intp_t>iptp[t0 + m]):
        Wsum += wtp[e]
    has_edges = (n > 0 and m > 0 and ippp[p0 + n] > ippp[p0]
                 and iptp[t0 + m] > iptp[t0] and beta != 0.0 and Wsum > 0.0)
    ce = 0.0
    if has_edges:
        ce = -2.0 * beta * scale[b] / Wsum
        for i in range(n):
            for j in range(m):
                if sc:
                    D[i * m + j] = bw[j] * f[i] * K[i * m1 + j] * g[j]
                else:
                    D[i * m + j] = bw[j] * _sexp(
                        (f[i] + g[j] - C[i * m1 + j]) / eps)
        _edge_tables(n, m, D, iptp, iti, wtp, t0, R, S)
        # the weights directly: edge = 1 - 2 X / Wsum, so d edge / d w_e
        # = -2 <Q_u, R_v> / Wsum + 2 X / Wsum^2 for a predicted edge
        # (u, v), and -2 (Q^T Wp Q)_jl / Wsum + 2 X / Wsum^2 for a target
        # edge (j, l); Tq = Wp Q
        X = 0.0
        for i in range(n * m):
            Tq[i] = 0.0
        for u in range(n):
            for e in range(<intp_t>ippp[p0 + u], <intp_t>ippp[p0 + u + 1]):
                v = <intp_t>ipi[e] - p0
                E = 0.0
                for j in range(m):
                    E += D[u * m + j] * R[v * m + j]
                    Tq[u * m + j] += wpp[e] * D[v * m + j]
                X += wpp[e] * E
                gwp[e] += ce * E
        for j in range(m):
            for e in range(<intp_t>iptp[t0 + j], <intp_t>iptp[t0 + j + 1]):
                c = <intp_t>iti[e] - t0
                E = 0.0
                for u in range(n):
                    E += D[u * m + j] * Tq[u * m + c]
                gwtp[e] += ce * E
        cx = -ce * X / Wsum
        for e in range(<intp_t>ippp[p0], <intp_t>ippp[p0 + n]):
            gwp[e] += cx
        for e in range(<intp_t>iptp[t0], <intp_t>iptp[t0 + m]):
            gwtp[e] += cx
        for i in range(n * m):
            D[i] = 0.0
        for u in range(n):
            for e in range(<intp_t>ippp[p0 + u], <intp_t>ippp[p0 + u + 1]):
                v = <intp_t>ipi[e] - p0
                s = wpp[e]
                for j in range(m):
                    D[u * m + j] += s * R[v * m + j]
                    D[v * m + j] += s * S[u * m + j]

    # final plan: P = a b E, node = <P, C>, Q = b E on the real block
    cn = alpha * scale[b]
    for i in range(n1):
        fb[i] = 0.0
    for j in range(m1):
        gb[j] = 0.0
    abar_dust = 0.0
    bbar_dust = 0.0
    for i in range(n1):
        Crow = C + i * m1
        Cbrow = Cb + i * m1
        fbi = 0.0
        for j in range(m1):
            if sc:
                E = f[i] * K[i * m1 + j] * g[j]
            else:
                E = _sexp((f[i] + g[j] - Crow[j]) / eps)
            P = aw[i] * bw[j] * E
            s = cn * Crow[j] * P
            if has_edges and i < n and j < m:
                s += ce * D[i * m + j] * bw[j] * E
            s /= eps
            fbi += s
            gb[j] += s
            Cbrow[j] = cn * P - s
            if i < n:
                gap[p0 + i] += cn * Crow[j] * bw[j] * E
            else:
                bbar_dust += cn * Crow[j] * bw[j] * E
            if j == m:
                abar_dust += cn * Crow[j] * aw[i] * E
            else:
                # P = a b E, and Q = b E in the edge term
                gbp[t0 + j] += cn * Crow[j] * aw[i] * E
                if has_edges and i < n:
                    gbp[t0 + j] += ce * D[i * m + j] * E
        fb[i] = fbi

    if sc:
        # reverse the sweeps, scaling form: with E_ij = u_i K_ij v_j,
        # g-adjoint gb_j -> fb_i -= a_i u_i sum_j K_ij gb_j v_j, then
        # f-adjoint fb_i -> gb'_j -= fb_i u_i K_ij b_j vprev_j, and the
        # cost adjoint Cb_ij += K_ij (a_i u_i gb_j v_j + fb_i u_i b_j
        # vprev_j), all row-local, so one fused pass per row
        for t in range(nit - 1, -1, -1):
            f = Fp + f_off[b] + t * n1          # u
            g = Gp + g_off[b] + t * m1          # v
            gprev = Gp + g_off[b] + (t - 1) * m1 if t > 0 else one
            bal.applied = False
            if balance and t > 0:
                bal = _balance(n, m, True, f - n1, gprev, C, K, aw, bw, eps)
            for j in range(m1):
                hv[j] = gb[j] * g[j]
                kv[j] = bw[j] * gprev[j]
                gn[j] = 0.0
            if bal.applied and bal.x != 1.0:
                for j in range(m):
                    kv[j] = bw[j] * (gprev[j] / bal.x)
            for i in range(n1):
                Krow = K + i * m1
                Cbrow = Cb + i * m1
                ui = f[i]
                r = dot(hv, Krow, m1)
                if i < n:
                    gap[p0 + i] -= eps * ui * r
                else:
                    bbar_dust -= eps * ui * r
                al = aw[i] * ui
                fbi = fb[i] - al * r
                cc = fbi * ui
                cv[i] = cc
                if al != 0.0:
                    for j in range(m1):
                        Cbrow[j] += Krow[j] * (al * hv[j] + cc * kv[j])
                        gn[j] -= cc * kv[j] * Krow[j]
                elif cc != 0.0:
                    for j in range(m1):
                        Cbrow[j] += Krow[j] * (cc * kv[j])
                        gn[j] -= cc * kv[j] * Krow[j]
                abar_dust -= eps * cc * Krow[m] * gprev[m]
                fb[i] = 0.0
            # f_i = -eps log sum_j b_j K_ij v'_j (v' = v / x on the
            # real columns when balanced) sees b_j only through
            # b_j v'_j, so d/d b_j = eps gn_j / b_j with gn_j the
            # adjoint of the previous g just accumulated (no work per
            # cell); for a tiny or zero b_j, the column sum itself,
            # -eps v'_j sum_i cc_i K_ij
            _target_mass_scaled(n1, m, m1, K, cv, gn, bw, gprev,
                                bal.x if bal.applied else 1.0, eps, gbp + t0)
            tmp = gb
            gb = gn
            gn = tmp
            if bal.applied:
                _balance_adjoint(n, m, True, f - n1, gprev, C, K, aw, bw, eps,
                                 &bal, fb, gb, gap + p0, &abar_dust,
                                 gbp + t0, &bbar_dust)
    else:
        # reverse the sweeps: g^t = G(f^t, a), f^t = F(g^{t-1}, b)
        for t in range(nit - 1, -1, -1):
            f = Fp + f_off[b] + t * n1
            g = Gp + g_off[b] + t * m1
            gprev = Gp + g_off[b] + (t - 1) * m1 if t > 0 else zero
            bal.applied = False
            if balance and t > 0:
                bal = _balance(n, m, False, f - n1, gprev, C, NULL, aw, bw, eps)
            gt = gprev
            if bal.applied:
                csh = eps * log(bal.x)
                for j in range(m):
                    gs[j] = gprev[j] - csh
                gs[m] = gprev[m]
                gt = gs
            for i in range(n1):
                Crow = C + i * m1
                Cbrow = Cb + i * m1
                fbi = 0.0
                for j in range(m1):
                    gbj = gb[j]
                    if gbj != 0.0:
                        E = _sexp((f[i] - Crow[j] + g[j]) / eps)
                        fbi -= gbj * aw[i] * E
                        Cbrow[j] += gbj * aw[i] * E
                        if i < n:
                            gap[p0 + i] -= eps * gbj * E
                        else:
                            bbar_dust -= eps * gbj * E
                fb[i] += fbi
            for j in range(m1):
                gb[j] = 0.0
            for i in range(n1):
                fbi = fb[i]
                cv[i] = fbi
                if fbi == 0.0:
                    continue
                Crow = C + i * m1
                Cbrow = Cb + i * m1
                for j in range(m1):
                    E = _sexp((gt[j] - Crow[j] + f[i]) / eps)
                    gb[j] -= fbi * bw[j] * E
                    Cbrow[j] += fbi * bw[j] * E
                abar_dust -= eps * fbi * _sexp((gt[m] - Crow[m] + f[i]) / eps)
                fb[i] = 0.0
            # as in the scaling form: d/d b_j = eps gb_j / b_j, or for a
            # tiny or zero b_j -eps sum_i fb_i E_ij
            _target_mass_log(n1, m, m1, C, cv, gb, bw, gt, f, eps, gbp + t0)
            if bal.applied:
                _balance_adjoint(n, m, False, f - n1, gprev, C, NULL, aw, bw, eps,
                                 &bal, fb, gb, gap + p0, &abar_dust,
                                 gbp + t0, &bbar_dust)

    # cost adjoint -> activations; dustbin column marginal A -> masses
    # (0 on the kink of |x - y|, and within rounding of it: _KINK)
    for i in range(n):
        Cbrow = Cb + i * m1
        s = 0.0
        for j in range(m):
            d = xp[p0 + i] - yp[t0 + j]
            if d < 1.0 and d > -1.0 and fabs(d) > _KINK * (
                    fabs(xp[p0 + i]) + fabs(yp[t0 + j]) + 1.0):
                cbar = w_act * Cbrow[j]
                if d > 0.0:
                    s += cbar
                    gyp[t0 + j] -= cbar
                else:
                    s -= cbar
                    gyp[t0 + j] += cbar
        gxp[p0 + i] += s
        gap[p0 + i] += abar_dust
    for j in range(m):
        gbp[t0 + j] += bbar_dust

    # cost adjoint -> degrees: C_ij has w_deg |dl| / mx, dl = d_i - d_j,
    # mx = max(d_i, d_j, 1); right derivatives at the kinks (dl = 0:
    # |dl| grows either way; a tie in the max: the one increased wins),
    # except on the diagonal of a self pair (a graph against itself, as
    # the debiased loss scores): there d_i and d_j are one function of
    # the weights, |d_i - d_i| is identically 0 and contributes 0 to
    # either side. Off the diagonal a self pair's out-degrees d_i, d_j
    # (i != j) depend on disjoint weights, so each side keeps its right
    # derivative, as in any other pair
    if w_deg != 0.0:
        for i in range(n):
            Cbrow = Cb + i * m1
            dpi = dpp[p0 + i]
            s = 0.0
            for j in range(m):
                dtj = dtp[t0 + j]
                dl = dpi - dtj
                ad = fabs(dl)
                mx = dpi if dpi > dtj else dtj
                if mx < 1.0:
                    mx = 1.0
                dp_ = (1.0 if dl >= 0.0 else -1.0) / mx
                if dpi >= dtj and dpi >= 1.0:
                    dp_ -= ad / (mx * mx)
                dt_ = (1.0 if dl <= 0.0 else -1.0) / mx
                if dl == 0.0 and i == j and lay.self_pair[b]:
                    dp_ = 0.0
                    dt_ = 0.0
                if dtj >= dpi and dtj >= 1.0:
                    dt_ -= ad / (mx * mx)
                cbar = w_deg * Cbrow[j]
                s += cbar * dp_
                gdt[t0 + j] += cbar * dt_
            gdp[p0 + i] += s
    return 0


# ---------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------

def structural_loss_forward(
        object predicted,             # IN  predicted graph (_GraphArrays)
        object target,                # IN  target graph (_GraphArrays)
        object settings,              # IN  _Settings
        object state,                 # IN  scaled, plan_off, and the capacity hint
                                      #     f_off[-1] / g_off[-1] (doubles);
                                      # OUT plan, f_off, g_off, used (a _Cache)
        double[:, ::1] terms,         # OUT (B, 4): node, edge, clique, row error
        uint8_t[::1] converged,       # OUT (B,) row error <= tol (or conv_tol)
        int num_threads=0,            # IN  threads; <= 0: OpenMP's default
        object alloc=None):           # IN  alloc(size, name) -> float64 (size,), or
                                      #     None: fresh arrays for the potentials
    """Forward structural loss of a batch of pairs (trusts its input).

    For every pair: augmented cost, at most ``iterations`` Sinkhorn sweeps
    (stopping early once the row-marginal error is <= ``tol`` if ``tol >
    0``), the plan, node, edge and clique terms. With ``balance``, every
    sweep t >= 1 starts with the dustbin-balancing step (:c:func:`_balance`).
    The sweeps run in the log domain, or, where ``scaled[b]``, in the scaling
    form with K = exp(-C/eps) computed once (one exp per cell per pair
    instead of two per cell per sweep; the caller guarantees the scaling form
    cannot over- or underflow). The plans go to ``state.plan``
    (``sum_b (n_b+1)(m_b+1)``), the sweeps performed to ``state.used`` (B,).

    Returns ``(fpot, gpot)``: the potentials of every sweep performed (f, g,
    or u, v where scaled), pair after pair, of sizes exactly
    ``sum_b used_b (n_b+1)`` and ``sum_b used_b (m_b+1)``; pair b's start at
    ``state.f_off[b]``, ``state.g_off[b]`` (filled here). They are stored in
    arrays that grow by doubling as the sweeps run (starting from the
    capacity hints), so time and memory follow the sweeps performed, never
    the cap ``iterations``.

    Complexity per pair O(used (n+1)(m+1) + E_p m + n E_t) time, O(used (n+m))
    stored, and O((n+1)(m+1)) workspace (two such buffers if any pair is
    scaled; reused across pairs), per thread.

    Threads: the pairs are independent and run in parallel (OpenMP, dynamic
    schedule, in chunks of about a sixteenth of a thread's share: pairs
    next to each other write next to each other, so they mostly share a
    thread) on ``num_threads`` threads (<= 0: OpenMP's default, which
    ``OMP_NUM_THREADS`` and threadpoolctl set), at most one per pair, and
    one for a batch too small to gain (:c:func:`_pair_threads`). Each thread
    has its own workspace; a pair's sums are taken by one thread in a fixed
    order, so the results are the same bit for bit whatever the count.

    The potentials: each thread appends the sweeps of its pairs to its own
    storage (growing by doubling, as above); at the end they are copied into
    the returned arrays in pair order. So their memory stays proportional to
    the sweeps performed, at most about twice that at the peak, as before.
    """
    cdef list keep = []
    cdef Graph P_, T_
    cdef Settings st
    cdef Layout lay
    _graph(predicted, keep, &P_)
    _graph(target, keep, &T_)
    _settings(settings, &st)
    _layout(state, keep, &lay)
    cdef double[::1] plan = state.plan
    cdef int64_t[::1] used = state.used
    cdef int64_t[::1] f_off_out = state.f_off
    cdef int64_t[::1] g_off_out = state.g_off
    if terms.shape[0] != lay.pairs or terms.shape[1] != 4 or converged.shape[0] != lay.pairs:
        raise ValueError("terms must be (B, 4) and converged (B,)")
    cdef intp_t nb = lay.pairs, b, k
    cdef int nt = _pair_threads(num_threads, &lay)
    cdef int tid = 0
    cdef intp_t chunk = max(1, nb // (16 * nt))
    # where each pair's potentials start, in the store of the thread (owner)
    # that ran it; whether it ran out of memory
    at_arr = np.zeros((3, max(nb, 1)), np.int64)
    cdef int64_t[:, ::1] at = at_arr
    cdef int64_t* f_at = &at[0, 0]
    cdef int64_t* g_at = &at[1, 0]
    cdef int64_t* owner = &at[2, 0]
    status_arr = np.zeros(max(nb, 1), np.int8)
    cdef int8_t[::1] status = status_arr
    cdef double* planp = &plan[0] if plan.shape[0] > 0 else NULL
    cdef double* termsp = &terms[0, 0] if nb > 0 else NULL
    cdef int64_t* usedp = &used[0] if nb > 0 else NULL
    cdef uint8_t* convp = &converged[0] if nb > 0 else NULL
    cdef Work* works = <Work*>calloc(nt, sizeof(Work))
    cdef Store* fst = <Store*>calloc(nt, sizeof(Store))
    cdef Store* gst = <Store*>calloc(nt, sizeof(Store))
    cdef intp_t n1, m1, f_size = 0, g_size = 0
    cdef bint oom = works == NULL or fst == NULL or gst == NULL
    try:
        if oom:
            raise MemoryError("no memory for the structural loss's workspace")
        work = _workspace(&P_, &T_, &lay, False, works, nt)
        # the capacity hint, shared out: in the caller's arrays if it gives
        # them (kept from call to call, so no fresh pages each time), else
        # malloc'ed
        f_cap = max(<intp_t>f_off_out[nb] // nt, 1)
        g_cap = max(<intp_t>g_off_out[nb] // nt, 1)
        if alloc is not None:
            f_lent, g_lent = alloc(f_cap * nt, "loss.fstore"), alloc(g_cap * nt, "loss.gstore")
            _lend(fst, f_lent, f_cap, nt)
            _lend(gst, g_lent, g_cap, nt)
        for k in range(nt):
            if _reserve(&fst[k], f_cap) != 0 or _reserve(&gst[k], g_cap) != 0:
                raise MemoryError("no memory for the Sinkhorn potentials")
        with nogil:
            if nt == 1:
                for b in range(nb):
                    status[b] = _forward_pair(b, &P_, &T_, &st, &lay, works, fst, gst,
                                              planp, termsp, usedp, convp, f_at, g_at)
            else:
                with parallel(num_threads=nt):
                    tid = threadid()
                    for b in prange(nb, schedule="dynamic", chunksize=chunk):
                        owner[b] = tid
                        status[b] = _forward_pair(b, &P_, &T_, &st, &lay, &works[tid],
                                                  &fst[tid], &gst[tid], planp, termsp,
                                                  usedp, convp, f_at, g_at)
            # the potentials' offsets in pair order
            for b in range(nb):
                oom = oom or status[b] != 0
                f_off_out[b] = f_size
                g_off_out[b] = g_size
                f_size += usedp[b] * (<intp_t>(P_.offsets[b + 1] - P_.offsets[b]) + 1)
                g_size += usedp[b] * (<intp_t>(T_.offsets[b + 1] - T_.offsets[b]) + 1)
            f_off_out[nb] = f_size
            g_off_out[nb] = g_size
        if oom:
            raise MemoryError("no memory for the Sinkhorn potentials")
        if alloc is None:
            fpot, gpot = np.empty(f_size), np.empty(g_size)
        else:
            fpot, gpot = alloc(f_size, "loss.fpot"), alloc(g_size, "loss.gpot")
        _collect(fpot, f_off_out, f_at, owner, fst, nb)
        _collect(gpot, g_off_out, g_at, owner, gst, nb)
        return fpot, gpot
    finally:
        if fst != NULL:
            for k in range(nt):
                if not fst[k].borrowed:
                    free(fst[k].data)
        if gst != NULL:
            for k in range(nt):
                if not gst[k].borrowed:
                    free(gst[k].data)
        free(fst)
        free(gst)
        free(works)


cdef int _lend(Store* stores, double[::1] buf, intp_t cap, int nt) except -1:
    """Point ``stores[0:nt]`` at consecutive ``cap``-double slices of ``buf``
    (borrowed: the caller keeps ``buf`` alive until the stores are done)."""
    cdef int k
    if buf.shape[0] < cap * nt:
        raise ValueError("the potentials' store is too small")
    for k in range(nt):
        stores[k].data = &buf[k * cap]
        stores[k].cap = cap
        stores[k].size = 0
        stores[k].borrowed = True
    return 0


cdef void _collect(double[::1] out, const int64_t[::1] off, const int64_t* at,
                   const int64_t* owner, const Store* stores, intp_t nb) noexcept:
    """Copy pair b's potentials, ``stores[owner[b]].data[at[b]:]``, to
    ``out[off[b]:off[b + 1]]`` for every pair (the stores of a serial run
    hold them in pair order already: ``owner`` is all 0 and ``at == off``)."""
    cdef intp_t b, size
    cdef const Store* st
    with nogil:
        for b in range(nb):
            size = <intp_t>(off[b + 1] - off[b])
            if size > 0:
                st = &stores[owner[b]]
                memcpy(&out[off[b]], st.data + at[b], size * sizeof(double))



def structural_loss_backward(
        object predicted,             # IN  predicted graph (_GraphArrays)
        object target,                # IN  target graph (_GraphArrays)
        object settings,              # IN  _Settings
        object state,                 # IN  the _Cache the forward pass filled
        const double[::1] scale,      # IN  (B,) d value / d value_b (1/B for a mean)
        object grad,                  # OUT a LossGrad: activation, mass (N,),
                                      #     target_activation (M,), weights (E_p,),
                                      #     target_weights (E_t,), target_mass (M,)
        int num_threads=0):           # IN  threads; <= 0: OpenMP's default
    """Exact reverse-mode gradient of the forward pass (trusts its input).

    Reverses the Sinkhorn sweeps actually performed, using the stored
    potentials, and accumulates the cost adjoint into the activations and
    the degrees; the predicted masses receive their gradient through the
    row marginals, the dustbin column marginal ``A = sum a``, the balancing
    step and the clique term, and the target masses theirs the same way
    (column marginals, dustbin row marginal ``B = sum b``, balancing,
    clique) plus through the row-normalised plan ``Q = b E`` of the edge
    term. The edge weights receive theirs through the edge term (X and W
    directly) and through the degrees (``degree`` must be the weighted
    out-degrees: the cost's degree part and the clique term), mapped to
    every out-edge of a node at the end. At the kinks of the degree terms
    every partial derivative is the right one (the weight increasing). A
    pair whose edge weights sum to 0 gets no edge-term gradient. Outputs
    are overwritten. For a scaled pair (fpot/gpot hold u, v) every
    exp((f_i + g_j - C_ij)/eps) of the adjoints is u_i K_ij v_j, with K
    computed once: no exp per cell per sweep.

    Complexity per pair O(iterations (n+1)(m+1) + E_p m + n E_t) time and
    O((n+1)(m+1)) workspace (reused across pairs), plus O(N + M + E_p + E_t)
    for the degrees and weights.

    Threads: the pairs are independent and run in parallel (OpenMP, dynamic
    schedule, in chunks of about a sixteenth of a thread's share: pairs
    next to each other write next to each other, so they mostly share a
    thread) on ``num_threads`` threads (<= 0: OpenMP's default, which
    ``OMP_NUM_THREADS`` and threadpoolctl set), at most one per pair, and
    one for a batch too small to gain (:c:func:`_pair_threads`). Each thread
    has its own workspace; a pair's sums are taken by one thread in a fixed
    order, so the results are the same bit for bit whatever the count.
    The outputs are zeroed first, and the degrees mapped to the edges last,
    serially.
    """
    cdef list keep = []
    cdef Graph P_, T_
    cdef Settings st
    cdef Layout lay
    _graph(predicted, keep, &P_)
    _graph(target, keep, &T_)
    _settings(settings, &st)
    _layout(state, keep, &lay)
    cdef const double[::1] fpot = state.fpot
    cdef const double[::1] gpot = state.gpot
    cdef const int64_t[::1] used = state.used
    cdef double[::1] gx = grad.activation
    cdef double[::1] ga = grad.mass
    cdef double[::1] gy = grad.target_activation
    cdef double[::1] gw = grad.weights
    cdef double[::1] gwt = grad.target_weights
    cdef double[::1] gbm = grad.target_mass
    cdef intp_t nb = lay.pairs, b, i, j, e
    if scale.shape[0] != nb or used.shape[0] != nb:
        raise ValueError("scale and used must have one entry per pair")
    cdef int nt = _pair_threads(num_threads, &lay)
    cdef int tid = 0
    cdef intp_t chunk = max(1, nb // (16 * nt))
    # d value / d degree of every node, mapped to the out-edges at the end
    gdeg_arr = np.zeros(P_.nodes + T_.nodes)
    cdef double[::1] gdeg = gdeg_arr
    cdef GradOut out
    out.activation = &gx[0] if gx.shape[0] > 0 else NULL
    out.mass = &ga[0] if ga.shape[0] > 0 else NULL
    out.target_activation = &gy[0] if gy.shape[0] > 0 else NULL
    out.weights = &gw[0] if gw.shape[0] > 0 else NULL
    out.target_weights = &gwt[0] if gwt.shape[0] > 0 else NULL
    out.target_mass = &gbm[0] if gbm.shape[0] > 0 else NULL
    out.degree = &gdeg[0] if P_.nodes + T_.nodes > 0 else NULL
    out.target_degree = out.degree + P_.nodes if out.degree != NULL else NULL
    cdef const double* Fp = &fpot[0] if fpot.shape[0] > 0 else NULL
    cdef const double* Gp = &gpot[0] if gpot.shape[0] > 0 else NULL
    cdef const int64_t* usedp = &used[0] if nb > 0 else NULL
    cdef const double* scalep = &scale[0] if nb > 0 else NULL
    cdef const int64_t* ippp = P_.indptr
    cdef const int64_t* iptp = T_.indptr
    cdef Work* works = <Work*>calloc(nt, sizeof(Work))
    if works == NULL:
        raise MemoryError("no memory for the structural loss's workspace")
    try:
        work = _workspace(&P_, &T_, &lay, True, works, nt)
        with nogil:
            for i in range(P_.nodes):
                out.activation[i] = 0.0
                out.mass[i] = 0.0
            for j in range(T_.nodes):
                out.target_activation[j] = 0.0
                out.target_mass[j] = 0.0
            for e in range(gw.shape[0]):
                out.weights[e] = 0.0
            for e in range(gwt.shape[0]):
                out.target_weights[e] = 0.0
            if nt == 1:
                for b in range(nb):
                    _backward_pair(b, &P_, &T_, &st, &lay, works, Fp, Gp, usedp, scalep,
                                   &out)
            else:
                with parallel(num_threads=nt):
                    tid = threadid()
                    for b in prange(nb, schedule="dynamic", chunksize=chunk):
                        _backward_pair(b, &P_, &T_, &st, &lay, &works[tid], Fp, Gp, usedp,
                                       scalep, &out)
            # degrees -> the weights of their out-edges
            for i in range(P_.nodes):
                for e in range(<intp_t>ippp[i], <intp_t>ippp[i + 1]):
                    out.weights[e] += out.degree[i]
            for j in range(T_.nodes):
                for e in range(<intp_t>iptp[j], <intp_t>iptp[j + 1]):
                    out.target_weights[e] += out.target_degree[j]
    finally:
        free(works)
