# cython: language_level=3
"""Chain relaxation of hard merges, forward and adjoint (private kernels;
callers validate, see ``grapheme._estimators``)."""
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
# which cannot overflow however long a segment is, and the backward pass
# recovers N_{i+1} = D_{i+1} h'_{i+1} on the fly.  Memory: out (n, d) and
# D (n,) beside the input.
#
# Streaming stores (``stream=True``; see "Gather / scatter" in _core.pyx for
# when the Python layer asks for them; the helpers are in _types.pxd) bypass
# the cache, so a pass that streams its (n, d) output must not read it back:
# it then carries the row it recurs on (h'_{i+1} forward, lam_{i-1}
# backward) in a d-vector of its own, which stays in L1, and copies each
# finished row out. Without streaming the recursion reads the previous
# output row, as fast and one copy less.

import numpy as np

from grapheme._types cimport intp_t, store_fence, _rows_a16, _copy_stream


def relax_chain_forward(
    const double[:, ::1] H,  # IN  (n, d) node features
    const double[::1] m,     # IN  (n,) merge weight of edge i -> i+1
    double[:, ::1] out,      # OUT (n, d) relaxed features h'
    double[::1] D,           # OUT (n,) relaxed cluster sizes D_i
    double[::1] mass,        # OUT (n,) relaxed masses mu_i
    bint stream=False,       # write ``out`` with streaming stores
):
    """Relaxed chain merge, forward: ``out = N / D`` and ``mass = 1 - m[i-1]``.

    Trusts its input: ``H``, ``out`` of shape (n, d); ``m``, ``D``, ``mass`` of
    shape (n,); ``m`` in [0, 1]. ``m[n - 1]`` is ignored (no edge leaves the
    last node). No output may overlap an input or another output.

    Complexity: O(n d) time, O(d) extra memory; runs without the GIL.
    """
    cdef intp_t n = H.shape[0], d = H.shape[1], i, j
    cdef double c, inv, dn
    if n == 0:
        return
    cdef double spare = 0.0
    cdef double* p = &spare  # the carried row, with stream and d > 0
    cdef double[::1] carry
    if stream and d:
        carry = np.empty(d)
        p = &carry[0]
    cdef const double* mp = &m[0]
    cdef double* Dp = &D[0]
    cdef double* massp = &mass[0]
    # with d == 0 no row is touched; any valid address will do
    cdef const double* hp = &H[0, 0] if d else <const double*>p
    cdef double* op = &out[0, 0] if d else p
    cdef bint a16 = _rows_a16(op, d)
    cdef const double* h
    cdef double* dst
    cdef const double* prev  # h'_{i+1}: a row of out, or with stream the local copy
    with nogil:
        # last node: nothing to its right
        dn = 1.0
        Dp[n - 1] = 1.0
        h = hp + (n - 1) * d
        dst = p if stream else op + (n - 1) * d
        for j in range(d):
            dst[j] = h[j]
        if stream:
            _copy_stream(op + (n - 1) * d, p, d, a16)
        prev = dst
        for i in range(n - 2, -1, -1):
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
                for j in range(d):
                    dst[j] = (h[j] + c * prev[j]) * inv
            if stream:
                _copy_stream(op + i * d, p, d, a16)
            prev = dst
        if stream:
            store_fence()
        massp[0] = 1.0
        for i in range(1, n):
            massp[i] = 1.0 - mp[i - 1]


def relax_chain_backward(
    const double[::1] m,             # IN  (n,) merge weights (as in forward)
    const double[:, ::1] out,        # IN  (n, d) h' from relax_chain_forward
    const double[::1] D,             # IN  (n,) D from relax_chain_forward
    const double[:, ::1] grad_out,   # IN  (n, d) dL/dh'
    const double[::1] grad_mass,     # IN  (n,) dL/dmu
    double[:, ::1] grad_H,           # OUT (n, d) dL/dH
    double[::1] grad_m,              # OUT (n,) dL/dm (grad_m[n-1] = 0)
    bint stream=False,               # write ``grad_H`` with streaming stores
):
    """Relaxed chain merge, backward: the exact adjoint of the forward pass.

    Left to right, with lam_i = dL/dN_i and kap_i = dL/dD_i::

        lam_i = g_i / D_i + m_{i-1} lam_{i-1}
        kap_i = -<g_i, h'_i> / D_i + m_{i-1} kap_{i-1}
        dL/dh_i = lam_i
        dL/dm_i = D_{i+1} (<lam_i, h'_{i+1}> + kap_i) - dL/dmu_{i+1}

    using N_{i+1} = D_{i+1} h'_{i+1}. ``grad_H`` may be ``grad_out`` (the same
    memory: computed in place); no other aliasing.

    Complexity: O(n d) time, O(d) extra memory; runs without the GIL.
    """
    cdef intp_t n = out.shape[0], d = out.shape[1], i, j
    cdef double inv, kap, dot, mprev, gm, gij
    if n == 0:
        return
    cdef double spare = 0.0
    cdef double* p = &spare  # the carried row, with stream and d > 0
    cdef double[::1] carry
    if stream and d:
        carry = np.empty(d)
        p = &carry[0]
    cdef const double* mp = &m[0]
    cdef const double* Dp = &D[0]
    cdef const double* gmassp = &grad_mass[0]
    cdef double* gmp = &grad_m[0]
    # with d == 0 no row is touched; any valid address will do
    cdef const double* outp = &out[0, 0] if d else <const double*>p
    cdef const double* gp = &grad_out[0, 0] if d else <const double*>p
    cdef double* ghp = &grad_H[0, 0] if d else p
    cdef bint a16 = _rows_a16(ghp, d)
    cdef const double* o
    cdef const double* g
    cdef double* lam   # lam_i: a row of grad_H, or with stream the local copy
    cdef const double* prev = p  # lam_{i-1}; not read for node 0
    with nogil:
        kap = 0.0
        mprev = 0.0  # m_{i-1}; no predecessor for node 0
        for i in range(n):
            o = outp + i * d
            g = gp + i * d
            lam = p if stream else ghp + i * d
            inv = 1.0 / Dp[i]
            dot = 0.0
            # g[j] is read before lam[j] is written, so grad_H may be grad_out
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
            if stream:
                _copy_stream(ghp + i * d, p, d, a16)
            prev = lam
            kap = mprev * kap - dot * inv
            if i + 1 < n:
                gm = 0.0
                for j in range(d):
                    gm = gm + lam[j] * o[d + j]
                gmp[i] = Dp[i + 1] * (gm + kap) - gmassp[i + 1]
                mprev = mp[i]
            else:
                gmp[i] = 0.0
        if stream:
            store_fence()
