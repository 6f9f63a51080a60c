# cython: language_level=3
"""Chain relaxation of hard merges, forward and adjoint, and its expected
inter-cluster edges (private kernels; callers validate, see
``grapheme.ops.ChainRelaxation``)."""
# A chain has nodes 0..n-1 and a merge weight m[i] in [0, 1] on the edge
# i -> i+1 (m[i] = 0 where that edge does not exist: the last node, a batch
# boundary of a block-diagonal batch of chains).  Right to left,
#
#     N_i = h_i + m_i N_{i+1},   D_i = 1 + m_i D_{i+1},   h'_i = N_i / D_i,
#
# and the mass of node i is mu_i = 1 - m_{i-1} (mu_0 = 1).  For m in {0, 1} a
# head carries its segment mean with mass 1 and every other node mass 0.
#
# N is never stored: the forward pass writes h' straight into ``out`` as the
# convex combination h'_i = (h_i + c_i h'_{i+1}) / D_i with c_i = m_i D_{i+1},
# and the backward pass recovers N_{i+1} = D_{i+1} h'_{i+1} on the fly.
# Memory: out (n, d) and D (n,) beside the input. h'_i is bounded by the
# rows' largest entry, but float64 forms h_i + c_i h'_{i+1} first, which
# reaches D_i times it: it overflows for entries near 1.8e308 / D_i (1e304
# in a run of 1e4 nodes). float32 weights the two terms by 1 / D_i and
# c_i / D_i instead, as its range (3.4e38) is reached by features a model
# can hold; float64 keeps its formula (and its bits).
#
# Streaming stores (``stream=True``; see "Gather / scatter" in _core.pyx for
# when the Python layer asks for them; the helpers are in _types.pxd) bypass
# the cache, so a pass that streams its (n, d) output must not read it back:
# it then carries the row it recurs on (h'_{i+1} forward, lam_{i-1}
# backward) in a d-vector of its own, which stays in L1, and copies each
# finished row out. Without streaming the recursion reads the previous
# output row, as fast and one copy less.

# Threads (see "Threads" in docs/design.md). Where m_i == 0 (every boundary
# between the texts of a batch, and any exact zero inside a text) the
# recursion restarts: node i's D and h' do not depend on node i+1, nor
# lam_{i+1} on lam_i, and the chain falls into independent segments. The
# kernels cut the n nodes into blocks of about _BLOCK_ROWS (a constant, not
# a function of the thread count), each cut moved right to the next restart
# point (_restart_blocks); a block that contains none merges with the next.
# Every block runs the serial recursion, node by node in the serial order,
# so the bits do not depend on the number of threads, and are those of one
# serial pass. One exception, by design: the backward recursion's kap
# restarts at 0 where m_{i-1} == 0 instead of carrying m_{i-1} kap_{i-1} =
# 0 kap_{i-1}, which is 0 (a zero of either sign, which no output can see:
# see relax_chain_backward) unless a non-finite upstream gradient made
# kap_{i-1} inf or NaN; then 0 * inf = NaN used to run on into every later
# segment of the batch, and now stays in its own.

import numpy as np

from libc.stdint cimport int64_t, uint8_t
from cython.parallel cimport prange, threadid

from grapheme._types cimport (index_t, intp_t, store_fence, _rows_a16, _copy_stream,
                              floating, num_threads_for, dot_f)

# nodes per block, about: the cuts sit at the first restart point at or after
# each multiple of it (so a block can be shorter or, merged, much longer)
cdef intp_t _BLOCK_ROWS = 1024


cdef intp_t _restart_blocks(const double* m, intp_t n, intp_t* bounds) noexcept nogil:
    """Cut nodes 0..n-1 into blocks ``bounds[k]..bounds[k+1]-1``, return their
    number ``nb`` (``bounds[0] = 0``, ``bounds[nb] = n``; ``bounds`` holds
    ``n // _BLOCK_ROWS + 2`` entries). Every inner cut ``b`` is a restart
    point, ``m[b-1] == 0``: the first at or after a multiple of
    _BLOCK_ROWS, past the previous cut; none if no node from there to the end
    has ``m == 0`` (one long chain). The scan moves only right: O(n) at
    worst, a few nodes per block for a batch of short texts."""
    cdef intp_t nb = 0, b = _BLOCK_ROWS
    bounds[0] = 0
    while b < n:
        while b < n and m[b - 1] != 0.0:
            b += 1
        if b >= n:
            break
        nb += 1
        bounds[nb] = b
        b = (b // _BLOCK_ROWS + 1) * _BLOCK_ROWS
    nb += 1
    bounds[nb] = n
    return nb


cdef int _check_lengths(str fn, intp_t n, intp_t d, tuple rows, tuple vectors) except -1:
    """ValueError unless every (n, d) array of ``rows`` and every (n,) array
    of ``vectors`` fits the first array's shape: the O(1) check the chain
    kernels make although they trust values (the blocks follow ``m``'s
    length, and a shorter array would be written past its end)."""
    if any(a.shape[0] != n or a.shape[1] != d for a in rows) or any(
            v.shape[0] != n for v in vectors):
        raise ValueError(f"{fn}: the (n, d) arrays must have one shape and the "
                         f"(n,) arrays n = {n} entries")
    return 0


cdef tuple _chain_blocks(const double[::1] m, intp_t d, bint stream, int num_threads,
                         object dtype):
    """What both chain kernels set up: their blocks' bounds (``nb + 1``
    entries, :c:func:`_restart_blocks`), the threads for them, and one
    carried row per thread with ``stream`` and ``d > 0`` (else a (1, 1) array
    whose address stands in for rows that are never touched)."""
    cdef intp_t n = m.shape[0]
    cdef intp_t[::1] bounds = np.empty(n // _BLOCK_ROWS + 2, dtype=np.intp)
    cdef intp_t nb = _restart_blocks(&m[0], n, &bounds[0])
    cdef int nt = num_threads_for(num_threads, nb)
    carry = np.empty((nt, d), dtype=dtype) if stream and d else np.empty((1, 1), dtype=dtype)
    return np.asarray(bounds[:nb + 1]), nt, carry


def restart_blocks(const double[::1] m):
    """The blocks the chain kernels split ``m``'s nodes into (for tests):
    their bounds, ``[0, ..., n]`` (int64; ``[0]`` for n = 0)."""
    if m.shape[0] == 0:
        return np.zeros(1, np.int64)
    return _chain_blocks(m, 0, False, 1, np.float64)[0].astype(np.int64)


cdef void _forward_block(const floating* hp, const double* mp, floating* op, double* Dp,
                         double* massp, floating* p, intp_t a, intp_t b, intp_t d,
                         bint stream, bint a16) noexcept nogil:
    """relax_chain_forward on nodes b-1 down to a, where node b-1 is the last
    node or has m == 0 (so D_{b-1} = 1, h'_{b-1} = h_{b-1}, as the general
    step gives there); ``p`` is this thread's carried row with ``stream``."""
    cdef intp_t i, j
    cdef double c, inv, dn
    cdef float af, bf
    cdef const floating* h
    cdef floating* dst
    cdef const floating* prev  # h'_{i+1}: a row of out, or with stream the local copy
    # the block's last node: nothing to its right
    dn = 1.0
    Dp[b - 1] = 1.0
    h = hp + (b - 1) * d
    dst = p if stream else op + (b - 1) * d
    for j in range(d):
        dst[j] = h[j]
    if floating is double:
        if stream:
            _copy_stream(op + (b - 1) * d, p, d, a16)
    prev = dst
    for i in range(b - 2, a - 1, -1):
        c = mp[i] * dn
        dn = 1.0 + c
        Dp[i] = dn
        h = hp + i * d
        dst = p if stream else op + i * d
        if c == 0.0:
            for j in range(d):
                dst[j] = h[j]
        else:
            inv = 1.0 / dn
            if floating is float:
                # in float as h_i / D_i + (c_i / D_i) h'_{i+1}: two weights
                # in [0, 1], rounded once, so no intermediate exceeds the
                # rows' largest entry (h_i + c_i h'_{i+1} reaches D_i times
                # it, past float32's 3.4e38 at 1e34 in a run of 1e4 nodes)
                af = <float>inv
                bf = <float>(c * inv)
                for j in range(d):
                    dst[j] = h[j] * af + prev[j] * bf
            else:
                for j in range(d):
                    dst[j] = (h[j] + c * prev[j]) * inv
        if floating is double:
            if stream:
                _copy_stream(op + i * d, p, d, a16)
        prev = dst
    if stream:
        store_fence()
    for i in range(a, b):
        massp[i] = 1.0 - mp[i - 1] if i > 0 else 1.0


def relax_chain_forward(
    const floating[:, ::1] H not None,  # IN  (n, d) node features, float32 or float64
    const double[::1] m not None,     # IN  (n,) merge weight of edge i -> i+1
    floating[:, ::1] out not None,    # OUT (n, d) relaxed features h'
    double[::1] D not None,           # OUT (n,) relaxed cluster sizes D_i
    double[::1] mass not None,        # OUT (n,) relaxed masses mu_i
    bint stream=False,       # write ``out`` with streaming stores
    int num_threads=0,       # threads; 0: OpenMP's default
):
    """Relaxed chain merge, forward: ``out = N / D`` and ``mass = 1 - m[i-1]``.

    ``H``, ``out`` of shape (n, d); ``m``, ``D``, ``mass`` of shape (n,)
    (ValueError otherwise; None is a TypeError). Trusts the values: ``m``
    in [0, 1]. ``m[n - 1]`` is ignored (no edge leaves the
    last node). No output may overlap an input or another output.

    ``H`` and ``out`` float32 or float64 (the per-node scalars ``m``, ``D``
    and ``mass`` stay float64; a float32 row is computed in float as
    ``h_i / D_i + (c_i / D_i) h'_{i+1}``, its two weights rounded to float
    once, so it does not overflow for finite ``H``). Streaming is float64
    only (a float32 call writes normally).

    Independent segments (cut where ``m == 0``) run in parallel by blocks of
    about 1024 nodes (see the notes above) on ``num_threads`` threads (0:
    OpenMP's default); the same bits on any number of threads, those of a
    serial pass. One long chain without a zero weight is one block.

    Complexity: O(n d) time, O(d) extra memory per thread and O(n / 1024)
    for the blocks; runs without the GIL.
    """
    cdef intp_t n = H.shape[0], d = H.shape[1], k, nb
    _check_lengths("relax_chain_forward", n, d, (out,), (m, D, mass))
    if n == 0:
        return
    if floating is float:
        stream = False
    cdef const double* mp = &m[0]
    cdef int nt
    bounds_arr, nt, carry_arr = _chain_blocks(m, d, stream, num_threads,
                                              np.float64 if floating is double else np.float32)
    cdef intp_t[::1] bounds = bounds_arr
    cdef floating[:, ::1] carry = carry_arr
    nb = bounds.shape[0] - 1
    cdef floating* p = &carry[0, 0]  # the carried rows, one per thread, with stream
    cdef intp_t pstride = carry.shape[1] if stream and d else 0
    cdef double* Dp = &D[0]
    cdef double* massp = &mass[0]
    # with d == 0 no row is touched; any valid address will do
    cdef const floating* hp = &H[0, 0] if d else <const floating*>p
    cdef floating* op = &out[0, 0] if d else p
    cdef bint a16 = False
    if floating is double:
        a16 = _rows_a16(op, d)
    cdef const intp_t* bp = &bounds[0]
    with nogil:
        for k in prange(nb, num_threads=nt, schedule="dynamic"):
            _forward_block(hp, mp, op, Dp, massp, p + threadid() * pstride,
                           bp[k], bp[k + 1], d, stream, a16)


cdef void _backward_block(const double* mp, const floating* outp, const double* Dp,
                          const floating* gp, const double* gmassp, floating* ghp,
                          double* gmp, floating* p, intp_t a, intp_t b, intp_t n,
                          intp_t d, bint stream, bint a16) noexcept nogil:
    """relax_chain_backward on nodes a to b-1, where node a is node 0 or
    m[a-1] == 0 (nothing flows in from the left); ``p`` is this thread's
    carried row with ``stream``."""
    cdef intp_t i, j
    cdef double inv, kap, dot, mprev, gm, gij
    cdef float invf, mprevf
    cdef const floating* o
    cdef const floating* g
    cdef floating* lam   # lam_i: a row of grad_H, or with stream the local copy
    cdef const floating* prev = p  # lam_{i-1}; not read at a restart
    kap = 0.0
    mprev = 0.0  # m_{i-1}; node a restarts
    for i in range(a, b):
        o = outp + i * d
        g = gp + i * d
        lam = p if stream else ghp + i * d
        inv = 1.0 / Dp[i]
        # g[j] is read before lam[j] is written, so grad_H may be grad_out
        if mprev == 0.0:
            kap = 0.0  # the recursion restarts (see the notes above)
        if floating is float:
            # float32 ("float32" in docs/design.md): the dot product in four
            # partial sums in double (dot_f), the row update in float with
            # its weights rounded once. (Widening every float into one
            # chain of double additions ran slower than float64.)
            dot = dot_f(g, o, d)
            invf = <float>inv
            mprevf = <float>mprev
            if mprev == 0.0:
                for j in range(d):
                    lam[j] = g[j] * invf
            else:
                for j in range(d):
                    lam[j] = g[j] * invf + mprevf * prev[j]
        else:
            dot = 0.0
            if mprev == 0.0:
                for j in range(d):
                    gij = g[j]
                    dot = dot + gij * o[j]
                    lam[j] = gij * inv
            else:
                for j in range(d):
                    gij = g[j]
                    dot = dot + gij * o[j]
                    lam[j] = gij * inv + mprev * prev[j]
        if floating is double:
            if stream:
                _copy_stream(ghp + i * d, p, d, a16)
        prev = lam
        kap = mprev * kap - dot * inv
        if i + 1 < n:
            if floating is float:
                gm = dot_f(lam, o + d, d)
            else:
                gm = 0.0
                for j in range(d):
                    gm = gm + lam[j] * o[d + j]
            gmp[i] = Dp[i + 1] * (gm + kap) - gmassp[i + 1]
            mprev = mp[i]
        else:
            gmp[i] = 0.0
    if stream:
        store_fence()


def relax_chain_backward(
    const double[::1] m not None,             # IN  (n,) merge weights (as in forward)
    const floating[:, ::1] out not None,      # IN  (n, d) h' from relax_chain_forward
    const double[::1] D not None,             # IN  (n,) D from relax_chain_forward
    const floating[:, ::1] grad_out not None,  # IN  (n, d) dL/dh'
    const double[::1] grad_mass not None,     # IN  (n,) dL/dmu
    floating[:, ::1] grad_H not None,         # OUT (n, d) dL/dH
    double[::1] grad_m not None,              # OUT (n,) dL/dm (grad_m[n-1] = 0)
    bint stream=False,               # write ``grad_H`` with streaming stores
    int num_threads=0,               # threads; 0: OpenMP's default
):
    """Relaxed chain merge, backward: the exact adjoint of the forward pass.

    Left to right, with lam_i = dL/dN_i and kap_i = dL/dD_i::

        lam_i = g_i / D_i + m_{i-1} lam_{i-1}
        kap_i = -<g_i, h'_i> / D_i + m_{i-1} kap_{i-1}
        dL/dh_i = lam_i
        dL/dm_i = D_{i+1} (<lam_i, h'_{i+1}> + kap_i) - dL/dmu_{i+1}

    using N_{i+1} = D_{i+1} h'_{i+1}. ``grad_H`` may be ``grad_out`` (the same
    memory: computed in place); no other aliasing. float32 or float64 as
    :func:`relax_chain_forward`; the dot products accumulate in float64 (in
    float32, in four partial sums: ``grapheme_dot_f``).

    Where ``m_{i-1} == 0`` both recursions restart (``kap_i`` from 0, not
    ``0 * kap_{i-1}``: the same for finite gradients, whose ``kap`` can only
    differ in the sign of a zero, which ``dL/dm_i`` cannot see, as ``gm``
    starts at +0.0 and is never -0.0; an inf or NaN in one segment's
    gradient stays in that segment). Segments run in parallel by blocks as
    in :func:`relax_chain_forward` (``num_threads``, 0: OpenMP's default),
    with the same bits on any number of threads.

    Complexity: O(n d) time, O(d) extra memory per thread and O(n / 1024)
    for the blocks; runs without the GIL.
    """
    cdef intp_t n = out.shape[0], d = out.shape[1], k, nb
    _check_lengths("relax_chain_backward", n, d, (grad_out, grad_H),
                   (m, D, grad_mass, grad_m))
    if n == 0:
        return
    if floating is float:
        stream = False
    cdef const double* mp = &m[0]
    cdef int nt
    bounds_arr, nt, carry_arr = _chain_blocks(m, d, stream, num_threads,
                                              np.float64 if floating is double else np.float32)
    cdef intp_t[::1] bounds = bounds_arr
    cdef floating[:, ::1] carry = carry_arr
    nb = bounds.shape[0] - 1
    cdef floating* p = &carry[0, 0]  # the carried rows, one per thread, with stream
    cdef intp_t pstride = carry.shape[1] if stream and d else 0
    cdef const double* Dp = &D[0]
    cdef const double* gmassp = &grad_mass[0]
    cdef double* gmp = &grad_m[0]
    # with d == 0 no row is touched; any valid address will do
    cdef const floating* outp = &out[0, 0] if d else <const floating*>p
    cdef const floating* gp = &grad_out[0, 0] if d else <const floating*>p
    cdef floating* ghp = &grad_H[0, 0] if d else p
    cdef bint a16 = False
    if floating is double:
        a16 = _rows_a16(ghp, d)
    cdef const intp_t* bp = &bounds[0]
    with nogil:
        for k in prange(nb, num_threads=nt, schedule="dynamic"):
            _backward_block(mp, outp, Dp, gp, gmassp, ghp, gmp, p + threadid() * pstride,
                            bp[k], bp[k + 1], n, d, stream, a16)


# ---------------------------------------------------------------------------
# Expected inter-cluster edges of a relaxed chain
# ---------------------------------------------------------------------------
#
# Node i heads a cluster with probability mu_i = 1 - m_{i-1}; given that, the
# next cluster starts at j > i with probability P_ij (1 - m_{j-1}),
# P_ij = prod_{t=i}^{j-2} m_t.  The relaxed edge i -> j carries
#
#     W_ij = mu_i P_ij (1 - m_{j-1}).
#
# Node i's window j = i+1 .. i+L_i stops at the end of its chain, or once
# every W_ij and every first derivative of the rest would be below
# RELAX_CUTOFF: behind two zero weights, or where the product of the
# non-zero weights excluding the smallest falls below it (monotone in j).

cdef double RELAX_CUTOFF = 8.673617379884035e-19   # 2**-60


cdef inline intp_t _window(const double* m, const uint8_t* has_next, intp_t i) noexcept nogil:
    cdef intp_t t = i, zeros = 0
    cdef double prod = 1.0, smallest = 1.0, f
    while has_next[t]:
        if zeros >= 2 or (zeros == 1 and prod < RELAX_CUTOFF) or (
                zeros == 0 and prod < RELAX_CUTOFF * smallest):
            break
        f = m[t]
        if f == 0.0:
            zeros += 1
        else:
            prod *= f
            if f < smallest:
                smallest = f
        t += 1
    return t - i


cdef void _counts_block(const double* m, const uint8_t* has_next, int64_t* counts,
                        intp_t a, intp_t b) noexcept nogil:
    cdef intp_t i
    for i in range(a, b):
        counts[i] = _window(m, has_next, i)


def relaxed_edge_counts(const double[::1] m,          # IN  (n,) merge weights
                        const uint8_t[::1] has_next,  # IN  (n,) 1 where edge i -> i+1 exists
                        int64_t[::1] counts,          # OUT (n,) relaxed out-edges per node
                        int num_threads=0):           # threads; 0: OpenMP's default
    """Number of relaxed edges out of every node (see the notes above). O(E').

    Every node on its own: fixed blocks of 1024 nodes in parallel
    (``num_threads``, 0: OpenMP's default)."""
    cdef intp_t k, n = m.shape[0]
    if has_next.shape[0] != n or counts.shape[0] != n:
        raise ValueError("relaxed_edge_counts: m, has_next and counts must be (n,)")
    if n == 0:
        return
    if has_next[n - 1]:
        # a window walks while has_next holds: the last node has no next
        raise ValueError("relaxed_edge_counts: the last node cannot have a next node")
    cdef intp_t nb = (n + _BLOCK_ROWS - 1) // _BLOCK_ROWS
    cdef int nt = num_threads_for(num_threads, nb)
    cdef const double* mp = &m[0]
    cdef const uint8_t* hp = &has_next[0]
    cdef int64_t* cp = &counts[0]
    with nogil:
        for k in prange(nb, num_threads=nt, schedule="dynamic"):
            _counts_block(mp, hp, cp, k * _BLOCK_ROWS, min(n, (k + 1) * _BLOCK_ROWS))


cdef void _edges_block(const double* m, const index_t* indptr, index_t* indices,
                       double* weights, intp_t a, intp_t b) noexcept nogil:
    cdef intp_t i, l, e, L
    cdef double mu, P
    for i in range(a, b):
        mu = 1.0 - m[i - 1] if i > 0 else 1.0
        P = 1.0
        e = indptr[i]
        L = indptr[i + 1] - e
        for l in range(L):
            indices[e + l] = <index_t>(i + 1 + l)
            weights[e + l] = mu * P * (1.0 - m[i + l])
            P *= m[i + l]


def relaxed_edges(const double[::1] m,          # IN  (n,)
                  const uint8_t[::1] has_next,  # IN  (n,)
                  const index_t[::1] indptr,    # IN  (n+1,) from relaxed_edge_counts
                  index_t[::1] indices,         # OUT (E',) j = i+1, i+2, ...
                  double[::1] weights,          # OUT (E',) W_ij
                  int num_threads=0):           # threads; 0: OpenMP's default
    """Targets and expected weights of the relaxed edges. O(E').

    Every node writes its own edges: fixed blocks of 1024 nodes in parallel
    (``num_threads``, 0: OpenMP's default)."""
    cdef intp_t k, n = m.shape[0]
    if n == 0 or indices.shape[0] == 0:
        return
    cdef intp_t nb = (n + _BLOCK_ROWS - 1) // _BLOCK_ROWS
    cdef int nt = num_threads_for(num_threads, nb)
    cdef const double* mp = &m[0]
    cdef const index_t* ip = &indptr[0]
    cdef index_t* jp = &indices[0]
    cdef double* wp = &weights[0]
    with nogil:
        for k in prange(nb, num_threads=nt, schedule="dynamic"):
            _edges_block(mp, ip, jp, wp, k * _BLOCK_ROWS, min(n, (k + 1) * _BLOCK_ROWS))


cdef intp_t _window_blocks(const index_t* indptr, intp_t n, intp_t* bounds,
                           intp_t* longest) noexcept nogil:
    """Cut nodes 0..n-1 into blocks (as _restart_blocks) that share no entry
    of ``grad_m``: a cut ``b``, the first at or after a multiple of
    _BLOCK_ROWS, needs ``i + L_i < b`` for every ``i < b``. Then the windows
    before ``b`` cover entries up to ``b - 2``, node ``b - 1`` has none,
    entry ``b - 1`` is written by node ``b`` alone (``mu_b``'s share) and
    every later entry by nodes from ``b`` on. For the windows
    relaxed_edge_counts makes this holds exactly where node ``b - 1`` ends a
    chain. Also the longest window, in ``longest``. One pass over
    ``indptr``, O(n)."""
    cdef intp_t nb = 0, i, L, reach = 0, cut = _BLOCK_ROWS, big = 0
    bounds[0] = 0
    for i in range(n):
        if i >= cut and reach < i:
            nb += 1
            bounds[nb] = i
            cut = (i // _BLOCK_ROWS + 1) * _BLOCK_ROWS
        L = indptr[i + 1] - indptr[i]
        if i + L > reach:
            reach = i + L
        if L > big:
            big = L
    nb += 1
    bounds[nb] = n
    longest[0] = big
    return nb


def window_blocks(const index_t[::1] indptr):
    """The blocks relaxed_edges_backward splits the nodes of ``indptr``
    (n+1,) into (for tests): their bounds, ``[0, ..., n]`` (int64)."""
    cdef intp_t n = indptr.shape[0] - 1, nb, longest
    if n <= 0:
        return np.zeros(1, np.int64)
    cdef intp_t[::1] bounds = np.empty(n // _BLOCK_ROWS + 2, dtype=np.intp)
    nb = _window_blocks(&indptr[0], n, &bounds[0], &longest)
    return np.asarray(bounds[:nb + 1]).astype(np.int64)


cdef void _edges_backward_block(const double* m, const index_t* indptr, const double* grad_w,
                                double* grad_m, double* P, intp_t a, intp_t b) noexcept nogil:
    """relaxed_edges_backward on nodes a..b-1 (``P``: this thread's buffer)."""
    cdef intp_t i, l, e, L
    cdef double mu, A, gmu, g, q
    for i in range(a, b):
        e = indptr[i]
        L = indptr[i + 1] - e
        if L == 0:
            continue
        mu = 1.0 - m[i - 1] if i > 0 else 1.0
        P[0] = 1.0
        for l in range(1, L):
            P[l] = P[l - 1] * m[i + l - 1]
        A = 0.0
        gmu = 0.0
        for l in range(L - 1, -1, -1):
            g = grad_w[e + l]
            q = 1.0 - m[i + l]
            grad_m[i + l] += mu * P[l] * (A - g)
            gmu += g * P[l] * q
            A = g * q + m[i + l] * A
        if i > 0:
            grad_m[i - 1] -= gmu


def relaxed_edges_backward(const double[::1] m,        # IN  (n,)
                           const index_t[::1] indptr,  # IN  (n+1,)
                           const double[::1] grad_w,   # IN  (E',) upstream gradient of W
                           double[::1] grad_m,         # OUT (n,), accumulated
                           int num_threads=0):         # threads; 0: OpenMP's default
    """Accumulate ``sum_e grad_w[e] dW_e / dm`` into ``grad_m``. O(E').

    Per node i with window L: with P_l = prod_{s<l} m_{i+s} and q_l = 1 -
    m_{i+l}, W_l = mu_i P_l q_l; the weight m_{i+l} enters q_l and every
    P_{l'} with l' > l, whose adjoints are summed right to left in
    A_l = sum_{l' > l} g_{l'} q_{l'} prod_{s=l+1}^{l'-1} m_{i+s}, so each node
    costs O(L). d mu_i / d m_{i-1} = -1.

    Blocks of about 1024 nodes cut after chain ends (where no block writes
    an entry of ``grad_m`` another one writes) run in parallel
    (``num_threads``, 0: OpenMP's default); every entry adds its terms in
    the serial order, so the bits do not depend on the thread count. One
    long chain is one block. O(longest window) extra memory per thread.
    """
    cdef intp_t k, nb, longest, n = m.shape[0]
    if n == 0:
        return
    cdef intp_t[::1] bounds = np.empty(n // _BLOCK_ROWS + 2, dtype=np.intp)
    cdef const index_t* ip = &indptr[0]
    nb = _window_blocks(ip, n, &bounds[0], &longest)
    if longest == 0:
        return
    cdef int nt = num_threads_for(num_threads, nb)
    cdef double[:, ::1] prefix_buf = np.empty((nt, longest))
    cdef double* P = &prefix_buf[0, 0]
    cdef const double* mp = &m[0]
    cdef const double* gw = &grad_w[0]
    cdef double* gm = &grad_m[0]
    cdef const intp_t* bp = &bounds[0]
    with nogil:
        for k in prange(nb, num_threads=nt, schedule="dynamic"):
            _edges_backward_block(mp, ip, gw, gm, P + threadid() * longest, bp[k], bp[k + 1])
