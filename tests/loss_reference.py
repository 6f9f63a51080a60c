"""Plain numpy reference of the structural loss for ONE pair of graphs.

Written independently of the Cython kernel and deliberately naive: dense
matrices, ``scipy.special.logsumexp`` for the Sinkhorn updates, dense edge
weight matrices for the edge term. Used by ``test_loss.py`` only.
"""
import numpy as np
from scipy.special import logsumexp


def _weighted_lse(z, w, axis):
    """log sum w exp(z) over ``axis``, ignoring entries with w == 0."""
    pos = w > 0
    z = np.where(pos, z, -np.inf)
    return logsumexp(z, b=np.where(pos, w, 1.0), axis=axis)


def _dense(n, edges):
    W = np.zeros((n, n))
    for u, v, w in edges:
        W[u, v] += w
    return W


def _moments(nd, mass):
    total = mass.sum()
    if total == 0:
        return 0.0, 0.0
    mean = (mass * nd).sum() / total
    var = (mass * (nd - mean) ** 2).sum() / total
    return mean, var


def reference_pair(x, a, labels_p, edges_p, y, b, labels_t, edges_t, *,
                   alpha=1.0, beta=0.5, gamma=2.0, epsilon=0.1,
                   iterations=20, tol=None, weights=(0.1, 0.7, 0.2), balance=False):
    """Structural loss of one pair.

    ``edges_p`` / ``edges_t`` are lists of ``(source, target, weight)`` with
    local node indices. ``balance``: before every sweep but the first, the
    dual is maximised exactly along (real f + c, real g - c), i.e. the real
    columns of g drop by eps log x with x the positive root of
    ``s x^2 - (A - B) x - r`` (s, r: the masses of the deletion column and
    the insertion row). Returns a dict with value, node, edge, clique, plan
    (augmented, shape (n+1, m+1)), iterations, marginal_error.
    """
    x = np.asarray(x, float)
    a = np.asarray(a, float)
    y = np.asarray(y, float)
    b = np.asarray(b, float)
    n, m = len(x), len(y)
    eps = epsilon
    # weighted out-degrees: the sum of the weights of a node's out-edges
    dp = np.zeros(n)
    for u, _, w in edges_p:
        dp[u] += w
    dt = np.zeros(m)
    for j, _, w in edges_t:
        dt[j] += w

    w_type, w_act, w_deg = weights
    typ = np.where(np.asarray(labels_p)[:, None] == np.asarray(labels_t)[None, :], 0.0, 0.5)
    act = np.minimum(np.abs(x[:, None] - y[None, :]), 1.0)
    deg = np.abs(dp[:, None] - dt[None, :]) / np.maximum(
        np.maximum(dp[:, None], dt[None, :]), 1.0)
    C = np.ones((n + 1, m + 1))
    C[:n, :m] = w_type * typ + w_act * act + w_deg * deg
    C[n, m] = 0.0

    A, B = a.sum(), b.sum()
    aa = np.append(a, B)
    bb = np.append(b, A)
    if A + B == 0:
        P = np.zeros((n + 1, m + 1))
        Q = np.zeros((n, m))
        its = 0
        err = 0.0
    else:
        g = np.zeros(m + 1)
        its = 0
        for it in range(iterations):
            if balance and it > 0 and n and m:
                sa = np.sum(a * np.exp((f[:n] + g[m] - C[:n, m]) / eps))
                sb = np.sum(b * np.exp((f[n] + g[:m] - C[n, :m]) / eps))
                s, r = A * sa, B * sb
                # skipped where s, r, their sums or x are not normal doubles
                normal = (lambda v: np.finfo(float).tiny <= v <= np.finfo(float).max)
                if all(map(normal, (sa, sb, s, r))):
                    d = A - B
                    root = np.hypot(d, 2 * np.sqrt(s) * np.sqrt(r))
                    # the positive root, in the form without cancellation
                    x = (d + root) / (2 * s) if d >= 0 else 2 * r / (root - d)
                    if normal(x):
                        g = np.append(g[:m] - eps * np.log(x), g[m])
            f = -eps * _weighted_lse((g[None, :] - C) / eps, bb[None, :], axis=1)
            g = -eps * _weighted_lse((f[:, None] - C) / eps, aa[:, None], axis=0)
            its += 1
            P = aa[:, None] * bb[None, :] * np.exp((f[:, None] + g[None, :] - C) / eps)
            err = np.abs(P.sum(axis=1) - aa).max()
            # never on the first sweep (unless the only one): its f came
            # from g = 0, which a row without mass keeps
            if tol is not None and err <= tol and (it > 0 or iterations == 1):
                break
        E = np.exp((f[:, None] + g[None, :] - C) / eps)
        P = aa[:, None] * bb[None, :] * E
        Q = b[None, :] * E[:n, :m]
    node = float((P * C).sum())

    Wp, Wt = _dense(n, edges_p), _dense(m, edges_t)
    total = Wp.sum() + Wt.sum()
    X = float((Wp * (Q @ Wt @ Q.T)).sum())
    edge = 0.0 if total == 0 else 1.0 - 2.0 * X / total

    mp, vp = _moments(dp / max(dp.max(initial=0.0), 1.0), a)
    mt, vt = _moments(dt / max(dt.max(initial=0.0), 1.0), b)
    clique = (mp - mt) ** 2 + (vp - vt) ** 2

    return dict(value=alpha * node + beta * edge + gamma * clique,
                node=node, edge=edge, clique=clique, plan=P,
                iterations=its, marginal_error=err)
