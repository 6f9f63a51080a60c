"""Small graph builders shared by the tests (plain numpy, no grapheme kernels)."""
import contextlib

import numpy as np
import pytest

from grapheme import Graph, _core


def random_graph(rng, n, n_edges, dtype=np.int64, labels=None, self_loops=False):
    """A random directed CSR graph with ``n`` nodes and about ``n_edges`` edges."""
    if n == 0:
        return Graph(np.zeros(1, dtype), np.zeros(0, dtype), np.zeros(0, np.int32))
    src = rng.integers(0, n, n_edges)
    dst = rng.integers(0, n, n_edges)
    if not self_loops:
        keep = src != dst
        src, dst = src[keep], dst[keep]
    order = np.lexsort((dst, src))
    src, dst = src[order], dst[order]
    indptr = np.zeros(n + 1, dtype)
    np.cumsum(np.bincount(src, minlength=n), out=indptr[1:])
    if labels is None:
        labels = rng.integers(97, 123, n)
    return Graph(indptr, dst.astype(dtype), labels)


def naive_components(n, edges):
    """Components of an undirected edge list by a plain-Python union-find;
    numbered by their earliest node."""
    parent = list(range(n))

    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x

    for u, v in edges:
        ru, rv = find(u), find(v)
        if ru != rv:
            parent[max(ru, rv)] = min(ru, rv)
    label, out = {}, []
    for i in range(n):
        out.append(label.setdefault(find(i), len(label)))
    return np.array(out, dtype=np.int64)


@contextlib.contextmanager
def streaming(on):
    """Send every reused output buffer down the streaming-store path (``on``)
    or none of them, whatever its size (``_core.STREAM_MIN_BYTES``)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_core, "STREAM_MIN_BYTES", 0 if on else 2**62)
        yield


def activation_to_features(features, grad_activation):
    """The gradient of node features that a gradient of the feature-mean
    activation maps to (``grapheme.ops.FeatureMean``): ``g[:, None] / d``."""
    from grapheme import ops

    return ops.FeatureMean().vjp(np.shape(features), grad_activation)[0]


def dense_relaxed_weights(m, offsets):
    """Plain-numpy expected inter-cluster edges of a relaxed batch of chains:
    an (n, n) matrix ``W[i, j] = mu_i prod_{t=i}^{j-2} m_t (1 - m_{j-1})``
    for ``i < j`` in the same chain, ``mu_i = 1 - m_{i-1}`` (1 at a chain's
    start). ``m[i]`` is the weight of the edge ``i -> i + 1``; entries of ``m``
    at a chain's last node are ignored."""
    n = len(m)
    W = np.zeros((n, n))
    for a, b in zip(offsets[:-1], offsets[1:]):
        for i in range(a, b):
            mu = 1.0 if i == a else 1.0 - m[i - 1]
            P = 1.0
            for j in range(i + 1, b):
                W[i, j] = mu * P * (1.0 - m[j - 1])
                P *= m[j - 1]
    return W
