"""The cache of large result blocks (grapheme.buffers, _buffers.pxi).

The property that matters: memory an array can still reach is never handed
out again. A hypothesis state machine checks it against the plain model
"every live array keeps the values written into it", while arrays and views
of random sizes are taken and dropped in random order.
"""
import gc
import pickle
import tracemalloc

import numpy as np
import pytest
import scipy.sparse as sp
from helpers import random_graph, streaming
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (Bundle, RuleBasedStateMachine, consumes, invariant,
                                 rule)
from scipy.sparse.csgraph import connected_components

import grapheme
from grapheme import MergeHistory, _core
from grapheme.buffers import empty

MiB = 1 << 20


@pytest.fixture
def cache():
    """A cache of 64 MiB, empty at the start; restores the old limit."""
    previous = grapheme.set_buffer_cache(0)
    grapheme.set_buffer_cache(64 * MiB)
    yield
    grapheme.set_buffer_cache(0)
    grapheme.set_buffer_cache(previous)


@pytest.fixture
def blocks_for_all(monkeypatch):
    """Send every result, however small, through the block cache."""
    monkeypatch.setattr(_core, "BLOCK_MIN_BYTES", 1)


def address(a):
    return a.__array_interface__["data"][0]


def test_small_results_are_plain_numpy(cache):
    before = grapheme.buffer_cache_info()
    a, warm = empty((10, 3))
    assert a.flags.owndata and not warm
    assert grapheme.buffer_cache_info() == before


def test_result_is_a_writable_aligned_float64_array(cache):
    a, warm = empty((MiB // 8 + 5,))
    assert a.dtype == np.float64 and a.shape == (MiB // 8 + 5,)
    assert a.flags.c_contiguous and a.flags.writeable and a.flags.aligned
    assert address(a) % 64 == 0 and not warm
    a[:] = 7.0
    b = a.reshape(-1)[::2]
    assert b.base is not None and (b == 7.0).all()


def test_freed_block_is_reused_warm(cache):
    a, _ = empty((2 * MiB // 8,))
    where = address(a)
    info = grapheme.buffer_cache_info()
    del a
    after = grapheme.buffer_cache_info()
    assert after["idle_blocks"] == info["idle_blocks"] + 1
    b, warm = empty((2 * MiB // 8,))
    assert warm and address(b) == where
    assert grapheme.buffer_cache_info()["hits"] == info["hits"] + 1


def test_a_live_view_keeps_its_block(cache):
    a, _ = empty((2 * MiB // 8,))
    view = a[100:200]
    view[:] = 3.0
    where = address(a)
    del a
    b, warm = empty((2 * MiB // 8,))
    assert not warm and address(b) != where
    b[:] = -1.0
    assert (view == 3.0).all()


def test_memoryview_and_frombuffer_keep_the_block(cache):
    a, _ = empty((2 * MiB // 8,))
    a[:] = 5.0
    mv = memoryview(a)
    del a
    b, _ = empty((2 * MiB // 8,))
    b[:] = 0.0
    assert (np.frombuffer(mv) == 5.0).all()


def test_a_block_far_larger_than_asked_is_not_used(cache):
    a, _ = empty((16 * MiB // 8,))
    del a
    b, warm = empty((2 * MiB // 8,))      # would waste more than half
    assert not warm


def test_limit_and_slots_are_respected(cache):
    grapheme.set_buffer_cache(5 * MiB)
    arrays = [empty((2 * MiB // 8,))[0] for _ in range(4)]
    del arrays
    info = grapheme.buffer_cache_info()
    assert info["idle_bytes"] <= 5 * MiB and info["idle_blocks"] == 2
    grapheme.set_buffer_cache(1 << 40)
    arrays = [empty((2 * MiB // 8,))[0] for _ in range(_core.BLOCK_SLOTS + 4)]
    del arrays
    assert grapheme.buffer_cache_info()["idle_blocks"] == _core.BLOCK_SLOTS
    assert grapheme.set_buffer_cache(0) == 1 << 40
    assert grapheme.buffer_cache_info()["idle_bytes"] == 0


def test_no_cache_frees_at_once(cache):
    grapheme.set_buffer_cache(0)
    a, _ = empty((2 * MiB // 8,))
    del a
    assert grapheme.buffer_cache_info()["idle_blocks"] == 0
    _, warm = empty((2 * MiB // 8,))
    assert not warm


@pytest.mark.parametrize("bad, exc, match", [
    (-1, ValueError, "max_bytes must be >= 0"),
    (2**70, ValueError, "max_bytes must be <= "),
    (1.5, TypeError, "max_bytes must be an integer"),
    ("1", TypeError, "max_bytes must be an integer"),
    (True, TypeError, "max_bytes must be an integer"),
])
def test_set_buffer_cache_rejects(bad, exc, match):
    before = grapheme.buffer_cache_info()["max_bytes"]
    with pytest.raises(exc, match=match):
        grapheme.set_buffer_cache(bad)
    assert grapheme.buffer_cache_info()["max_bytes"] == before


def test_take_block_rejects_empty():
    with pytest.raises(ValueError, match="nbytes must be positive"):
        _core.take_block(0)


def test_bare_block_is_an_empty_buffer():
    assert np.frombuffer(_core._Block(), dtype=np.uint8).size == 0


def test_results_pickle_and_copy(cache):
    a, _ = empty((3, MiB // 8))
    a[...] = np.arange(a.size).reshape(a.shape)
    b = pickle.loads(pickle.dumps(a))
    np.testing.assert_array_equal(a, b)
    assert not np.shares_memory(a, b)


def test_tracemalloc_sees_blocks_in_use(cache):
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        a, _ = empty((4 * MiB // 8,))
        assert tracemalloc.get_traced_memory()[0] - before >= 4 * MiB
        del a
        assert tracemalloc.get_traced_memory()[0] - before < MiB
    finally:
        tracemalloc.stop()


def test_memory_error_names_the_size(cache):
    with pytest.raises(MemoryError, match="cannot allocate"):
        _core.take_block(2**62)


# ------------------------------------------------------- kernels on blocks
@pytest.mark.parametrize("stream", [False, True], ids=["store", "stream"])
def test_recycled_results_equal_fresh_ones(cache, blocks_for_all, stream):
    # every result through the cache, recycled blocks (warm) included, on the
    # normal-store and the streaming path: the same numbers as into out=
    rng = np.random.default_rng(0)
    h = MergeHistory(np.repeat(np.arange(50), rng.integers(1, 4, 50)))
    x = rng.normal(size=(h.num_inputs, 5))
    g = rng.normal(size=(h.num_outputs, 5))
    with streaming(stream):
        for _ in range(3):                    # cold, then recycled
            garbage, _ = empty((h.num_inputs, 5))
            garbage[:] = np.nan               # what a recycled block may hold
            del garbage
            np.testing.assert_array_equal(h.scatter(g),
                                          h.scatter(g, out=np.empty((h.num_inputs, 5))))
            np.testing.assert_array_equal(h.gather(x),
                                          h.gather(x, out=np.empty((h.num_outputs, 5))))
            np.testing.assert_array_equal(h.unpool(g), g[h.cluster])
    assert grapheme.buffer_cache_info()["hits"] > 0


def test_morph_backward_on_recycled_blocks(cache, blocks_for_all):
    # the whole morph + backward, every estimator, twice: the second run takes
    # recycled blocks left dirty by the first and must give the same numbers
    rng = np.random.default_rng(3)
    graph = grapheme.Graph.from_texts(["hello", "world", "aab"])
    H = rng.normal(size=(graph.num_nodes, 6))
    for est in ("history", "soft", "ste", "reinforce"):
        runs = []
        for _ in range(2):
            m = grapheme.Morpher(threshold=0.0, estimator=est, seed=1)
            out = m.forward(graph, H)
            k = out.graph.num_nodes
            ga = np.linspace(-1, 1, k)
            loss = np.ones(out.graph.num_graphs) if est == "reinforce" else None
            runs.append((out.graph.features.copy(),
                         m.backward(out, grad_activation=ga, loss_values=loss).copy(),
                         float(m.grad_theta)))
            del out
            gc.collect()
        np.testing.assert_array_equal(runs[0][0], runs[1][0])
        np.testing.assert_array_equal(runs[0][1], runs[1][1])
        assert runs[0][2] == runs[1][2]


# ------------------------------------------------- the state machine
class BlockCacheMachine(RuleBasedStateMachine):
    """Live arrays (and views of them) never share memory with a block handed
    out later, whatever the order of takes and drops; the idle list stays
    within its limit and its slots."""
    arrays = Bundle("arrays")

    def __init__(self):
        super().__init__()
        self.previous = grapheme.set_buffer_cache(0)
        self.limit = 12 * MiB
        grapheme.set_buffer_cache(self.limit)
        self.live = {}                        # id -> (array, value written)
        self.counter = 0

    @rule(target=arrays, mib=st.integers(1, 6), extra=st.integers(0, 4095))
    def take(self, mib, extra):
        a, _ = empty((mib * MiB // 8 + extra,))
        self.counter += 1
        a[:] = self.counter
        self.live[self.counter] = (a, self.counter)
        return self.counter

    @rule(key=consumes(arrays))
    def drop(self, key):
        del self.live[key]

    @rule(key=consumes(arrays), target=arrays, start=st.integers(0, 1000))
    def keep_only_a_view(self, key, start):
        a, value = self.live.pop(key)
        self.live[key] = (a[start:start + 10], value)
        return key

    @rule(limit=st.sampled_from([0, 4 * MiB, 12 * MiB, 64 * MiB]))
    def change_limit(self, limit):
        grapheme.set_buffer_cache(limit)
        self.limit = limit

    @invariant()
    def live_arrays_keep_their_values(self):
        for a, value in self.live.values():
            assert (a == value).all()

    @invariant()
    def idle_list_within_limits(self):
        info = grapheme.buffer_cache_info()
        assert info["idle_bytes"] <= self.limit and info["idle_blocks"] <= _core.BLOCK_SLOTS

    def teardown(self):
        self.live.clear()
        grapheme.set_buffer_cache(0)
        grapheme.set_buffer_cache(self.previous)


TestBlockCacheMachine = BlockCacheMachine.TestCase
TestBlockCacheMachine.settings = settings(max_examples=40, stateful_step_count=30,
                                          deadline=None)


@given(st.lists(st.integers(1, 3 * MiB), min_size=1, max_size=12))
def test_sizes_round_trip(sizes):
    # any sequence of sizes: each result has exactly the size asked for
    previous = grapheme.set_buffer_cache(16 * MiB)
    try:
        for nbytes in sizes:
            rows = max(nbytes // 8, 1)
            a, _ = empty((rows,))
            assert a.shape == (rows,) and a.nbytes == 8 * rows
            a[-1] = 1.0
    finally:
        grapheme.set_buffer_cache(previous)


def test_index_results_on_recycled_blocks(cache, blocks_for_all, index_dtype):
    # merge_edges and the history CSR write int32/int64 results into blocks,
    # recycled and dirty on the second round: same merges as scipy's
    rng = np.random.default_rng(7)
    graph = random_graph(rng, 300, 500, dtype=index_dtype)
    mask = rng.random(graph.num_edges) < 0.4
    src = graph.edge_sources()
    adjacency = sp.coo_array((np.ones(mask.sum()), (src[mask], graph.indices[mask])),
                             shape=(300, 300))
    k, labels = connected_components(adjacency, directed=False)
    for _ in range(2):
        dirty, _ = empty((300,), index_dtype)
        dirty[:] = -5
        del dirty
        h = grapheme.merge_edges(graph, mask)
        assert h.cluster.dtype == index_dtype and h.num_outputs == k
        # scipy numbers components by first appearance too
        np.testing.assert_array_equal(h.cluster, labels)
        np.testing.assert_array_equal(np.sort(h.members), np.arange(300))
        np.testing.assert_array_equal(np.diff(h.indptr), np.bincount(labels))


def test_empty_takes_any_numeric_dtype(cache):
    for dtype in (np.int32, np.int64, np.uint8, np.float64):
        a, _ = empty(MiB, dtype)
        assert a.dtype == dtype and a.shape == (MiB,)
