import numpy as np
import pytest
from scipy.sparse import csr_matrix

from grapheme import Graph


def test_from_text_chain():
    g = Graph.from_text("abc")
    assert g.num_nodes == 3 and g.num_edges == 2
    assert g.indptr.tolist() == [0, 1, 2, 2]
    assert g.indices.tolist() == [1, 2]
    assert g.labels.tolist() == [97, 98, 99]
    assert g.activation.tolist() == [1.0, 1.0, 1.0]
    assert g.mass.tolist() == [1.0, 1.0, 1.0]
    assert g.out_degree.tolist() == [1, 1, 0]
    assert g.edge_sources().tolist() == [0, 1]
    assert g.offsets is None and g.num_graphs == 1


@pytest.mark.parametrize("text", ["", "a", "héllo wörld", "日本語のテキスト", "🙂👍🏽x",
                                  "e\u0301", "\x00\n\t", "\U0010FFFF"])
def test_from_text_any_unicode_roundtrips(text):
    g = Graph.from_text(text)
    assert g.num_nodes == len(text)
    assert g.num_edges == max(len(text) - 1, 0)
    assert g.to_text() == text
    assert g.labels.tolist() == [ord(c) for c in text]


def test_empty_graph_everywhere():
    g = Graph.from_text("")
    assert g.num_nodes == 0 and g.num_edges == 0
    assert g.indptr.tolist() == [0]
    assert g.to_scipy().shape == (0, 0)
    assert g.activation.shape == (0,)


def test_from_texts_equals_batch_of_from_text():
    texts = ["ab", "", "xyz", "q", "日本"]
    b = Graph.from_texts(texts)
    ref = Graph.batch([Graph.from_text(t) for t in texts])
    assert b.num_graphs == 5
    for attr in ("indptr", "indices", "labels", "offsets"):
        np.testing.assert_array_equal(getattr(b, attr), getattr(ref, attr))
    assert [g.to_text() for g in b.unbatch()] == texts
    assert b.offsets.tolist() == [0, 2, 2, 5, 6, 8]


def test_from_texts_empty_list():
    b = Graph.from_texts([])
    assert b.num_nodes == 0 and b.num_graphs == 0 and b.unbatch() == []


def test_batch_unbatch_roundtrip_with_fields(rng):
    g1 = Graph([0, 1, 1], [1], [97, 98], features=rng.normal(size=(2, 3)),
               weights=[2.5], mass=[1.0, 0.5])
    g2 = Graph([0, 0], [], [99], features=rng.normal(size=(1, 3)), weights=np.zeros(0),
               mass=[0.0])
    b = Graph.batch([g1, g2])
    assert b.num_graphs == 2
    assert b.to_scipy().toarray().tolist() == [[0, 2.5, 0], [0, 0, 0], [0, 0, 0]]
    for orig, back in zip([g1, g2], b.unbatch()):
        for attr in ("indptr", "indices", "labels", "features", "weights", "mass"):
            np.testing.assert_array_equal(getattr(orig, attr), getattr(back, attr))
    # batching a batch flattens
    bb = Graph.batch([b, Graph.batch([g1])])
    assert bb.num_graphs == 3


def test_batch_rejects_mixed_features():
    with pytest.raises(ValueError, match="features"):
        Graph.batch([Graph.from_text("a").replace(features=[[1.0]]), Graph.from_text("b")])
    with pytest.raises(TypeError, match=r"graphs\[1\]"):
        Graph.batch([Graph.from_text("a"), "b"])


def test_to_scipy_matches_adjacency():
    g = Graph([0, 2, 3, 3], [1, 2, 0], [97, 98, 99], weights=[1.0, 2.0, 3.0])
    ref = csr_matrix(([1.0, 2.0, 3.0], ([0, 0, 1], [1, 2, 0])), shape=(3, 3))
    assert (g.to_scipy() != ref).nnz == 0


def test_activation_defaults():
    f = np.array([[1.0, 3.0], [0.0, -2.0]])
    assert Graph([0, 1, 1], [1], [97, 98], features=f).activation.tolist() == [2.0, -1.0]
    assert Graph([0, 1, 1], [1], [97, 98], features=f,
                 activation=[5.0, 6.0]).activation.tolist() == [5.0, 6.0]


def test_index_dtypes_kept(index_dtype):
    g = Graph(np.array([0, 1, 1], index_dtype), np.array([1], index_dtype), [97, 98])
    assert g.indptr.dtype == index_dtype and g.indices.dtype == index_dtype
    g = Graph(np.array([0, 1, 1], np.int16), np.array([1], np.uint8), [97, 98])
    assert g.indptr.dtype == np.int64


def test_mixed_index_dtypes_widen():
    g = Graph(np.array([0, 1, 1], np.int32), np.array([1], np.int64), [97, 98])
    assert g.indptr.dtype == g.indices.dtype == np.int64


# ------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(indptr=[0, 1, 2], indices=[1], labels=[97, 98]), ValueError,
     r"indptr must end at len\(indices\) = 1, got 2"),
    (dict(indptr=[0, 2, 1, 2], indices=[1, 0], labels=[97, 98, 99]), ValueError,
     "indptr must be non-decreasing"),
    (dict(indptr=[1, 1], indices=[0], labels=[97]), ValueError, "indptr must start at 0"),
    (dict(indptr=[], indices=[], labels=[]), ValueError, "indptr must have length"),
    (dict(indptr=[0, 1, 1], indices=[2], labels=[97, 98]), ValueError,
     r"indices must lie in \[0, 2\), got 2"),
    (dict(indptr=[0, 1, 1], indices=[-1], labels=[97, 98]), ValueError,
     r"indices must lie in \[0, 2\), got -1"),
    (dict(indptr=[0, 1, 1], indices=[1.0], labels=[97, 98]), TypeError,
     "indices must be an integer array"),
    (dict(indptr=[0.0, 1.0, 1.0], indices=[1], labels=[97, 98]), TypeError,
     "indptr must be an integer array"),
    (dict(indptr=[[0, 1, 1]], indices=[1], labels=[97, 98]), ValueError,
     "indptr must be 1-dimensional"),
    (dict(indptr=[0, 1, 1], indices=[1], labels=[97]), ValueError, "labels must have length"),
    (dict(indptr=[0, 1, 1], indices=[1], labels=[97, 0x110000]), ValueError,
     "labels must be Unicode code points"),
    (dict(indptr=[0, 1, 1], indices=[1], labels=[97, 98], features=[[1.0], [np.nan]]),
     ValueError, "features contains NaN"),
    (dict(indptr=[0, 1, 1], indices=[1], labels=[97, 98], features=[[1.0], [np.inf]]),
     ValueError, "features contains NaN or infinity"),
    (dict(indptr=[0, 1, 1], indices=[1], labels=[97, 98], features=[[1.0]]),
     ValueError, r"features must have shape \(2, \*\)"),
    (dict(indptr=[0, 1, 1], indices=[1], labels=[97, 98], features=[1.0, 2.0]),
     ValueError, "features must be 2-dimensional"),
    (dict(indptr=[0, 1, 1], indices=[1], labels=[97, 98], features=[["a"], ["b"]]),
     TypeError, "features must be a real-valued array"),
    (dict(indptr=[0, 1, 1], indices=[1], labels=[97, 98], weights=[1.0, 2.0]),
     ValueError, r"weights must have shape \(1,\)"),
    (dict(indptr=[0, 1, 1], indices=[1], labels=[97, 98], mass=[1.0, -1.0]),
     ValueError, "mass must be non-negative"),
    (dict(indptr=[0, 1, 1], indices=[1], labels=[97, 98], offsets=[0, 1, 2]),
     ValueError, "offsets: an edge crosses"),
    (dict(indptr=[0, 1, 1], indices=[1], labels=[97, 98], offsets=[0, 3]),
     ValueError, "offsets must run from 0"),
])
def test_bad_graph_input(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        Graph(**kwargs)


@pytest.mark.parametrize("bad", [None, 3, b"abc", ["a", "b"]])
def test_from_text_rejects_non_str(bad):
    with pytest.raises(TypeError, match="text must be a str"):
        Graph.from_text(bad)


def test_lone_surrogates_rejected():
    with pytest.raises(ValueError, match="text contains a lone surrogate at position 1"):
        Graph.from_text("a\ud800b")
    with pytest.raises(ValueError, match=r"texts\[2\] contains a lone surrogate"):
        Graph.from_texts(["ok", "fine", "x\udfff"])
    with pytest.raises(TypeError, match=r"texts\[1\] must be a str"):
        Graph.from_texts(["ok", 5])
    with pytest.raises(TypeError, match="texts must be a sequence of str"):
        Graph.from_texts("abc")


def test_read_only_and_memmap_arrays(tmp_path):
    indptr = np.array([0, 1, 2, 2], np.int64)
    indices = np.array([1, 2], np.int64)
    feats = np.arange(6.0).reshape(3, 2)
    for arr in (indptr, indices, feats):
        arr.flags.writeable = False
    g = Graph(indptr, indices, [97, 98, 99], features=feats)
    assert g.activation.tolist() == [0.5, 2.5, 4.5]
    path = tmp_path / "f.npy"
    np.save(path, np.arange(6.0).reshape(3, 2))
    mm = np.load(path, mmap_mode="r")
    g2 = Graph(indptr, indices, [97, 98, 99], features=mm)
    np.testing.assert_array_equal(g2.features, mm)


def test_replace_validates():
    g = Graph.from_text("ab")
    with pytest.raises(ValueError, match="mass must have shape"):
        g.replace(mass=[1.0])
    with pytest.raises(TypeError, match="unexpected field 'colour'"):
        g.replace(colour=1)
    assert g.replace(mass=[0.5, 0.5]).mass.tolist() == [0.5, 0.5]
    assert g.mass.tolist() == [1.0, 1.0]  # values: the original is unchanged
