# Chain relaxation of hard merges (included into _core.pyx).
#
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


def relax_chain_forward(
    const double[:, ::1] H,  # IN  (n, d) node features
    const double[::1] m,     # IN  (n,) merge weight of edge i -> i+1
    double[:, ::1] out,      # OUT (n, d) relaxed features h'
    double[::1] D,           # OUT (n,) relaxed cluster sizes D_i
    double[::1] mass,        # OUT (n,) relaxed masses mu_i
):
    """Relaxed chain merge, forward: ``out = N / D`` and ``mass = 1 - m[i-1]``.

    Trusts its input: ``H``, ``out`` of shape (n, d); ``m``, ``D``, ``mass`` of
    shape (n,); ``m`` in [0, 1]. ``m[n - 1]`` is ignored (no edge leaves the
    last node). ``out`` must not alias ``H``.

    Complexity: O(n d) time, O(1) extra memory; runs without the GIL.
    """
    cdef intp_t n = H.shape[0], d = H.shape[1], i, j
    cdef double c, inv, d_next
    if n == 0:
        return
    with nogil:
        # last node: nothing to its right
        D[n - 1] = 1.0
        for j in range(d):
            out[n - 1, j] = H[n - 1, j]
        i = n - 2
        while i >= 0:
            d_next = D[i + 1]
            c = m[i] * d_next
            D[i] = 1.0 + c
            inv = 1.0 / D[i]
            if c == 0.0:
                for j in range(d):
                    out[i, j] = H[i, j]
            else:
                for j in range(d):
                    out[i, j] = (H[i, j] + c * out[i + 1, j]) * inv
            i -= 1
        mass[0] = 1.0
        for i in range(1, n):
            mass[i] = 1.0 - m[i - 1]


def relax_chain_backward(
    const double[::1] m,             # IN  (n,) merge weights (as in forward)
    const double[:, ::1] out,        # IN  (n, d) h' from relax_chain_forward
    const double[::1] D,             # IN  (n,) D from relax_chain_forward
    const double[:, ::1] grad_out,   # IN  (n, d) dL/dh'
    const double[::1] grad_mass,     # IN  (n,) dL/dmu
    double[:, ::1] grad_H,           # OUT (n, d) dL/dH
    double[::1] grad_m,              # OUT (n,) dL/dm (grad_m[n-1] = 0)
):
    """Relaxed chain merge, backward: the exact adjoint of the forward pass.

    Left to right, with lam_i = dL/dN_i and kap_i = dL/dD_i::

        lam_i = g_i / D_i + m_{i-1} lam_{i-1}
        kap_i = -<g_i, h'_i> / D_i + m_{i-1} kap_{i-1}
        dL/dh_i = lam_i
        dL/dm_i = D_{i+1} (<lam_i, h'_{i+1}> + kap_i) - dL/dmu_{i+1}

    using N_{i+1} = D_{i+1} h'_{i+1}. ``lam`` lives in ``grad_H`` itself.
    ``grad_H`` may be ``grad_out`` (computed in place); no other aliasing.

    Complexity: O(n d) time, O(1) extra memory; runs without the GIL.
    """
    cdef intp_t n = out.shape[0], d = out.shape[1], i, j
    cdef double inv, kap, dot, mp, gm, gij
    if n == 0:
        return
    with nogil:
        kap = 0.0
        mp = 0.0  # m_{i-1}; no predecessor for node 0
        for i in range(n):
            inv = 1.0 / D[i]
            dot = 0.0
            # grad_out[i, j] is read before grad_H[i, j] is written, so the
            # two may be the same array
            if mp == 0.0:
                for j in range(d):
                    gij = grad_out[i, j]
                    dot = dot + gij * out[i, j]
                    grad_H[i, j] = gij * inv
            else:
                for j in range(d):
                    gij = grad_out[i, j]
                    dot = dot + gij * out[i, j]
                    grad_H[i, j] = gij * inv + mp * grad_H[i - 1, j]
            kap = mp * kap - dot * inv
            if i + 1 < n:
                gm = 0.0
                for j in range(d):
                    gm = gm + grad_H[i, j] * out[i + 1, j]
                grad_m[i] = D[i + 1] * (gm + kap) - grad_mass[i + 1]
                mp = m[i]
            else:
                grad_m[i] = 0.0
