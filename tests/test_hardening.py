"""Regression tests for issue 10: nothing a user does crashes the process or
loses a run. One test per reproducer of the issue, with exact messages; the
classes of bug they stand for are driven harder by ``tests/fuzz``."""
import json
import os
import threading

import numpy as np
import pytest

import grapheme as gr
from grapheme import cli
from grapheme.checkpoint import load_checkpoint, save_checkpoint


# ------------------------------------------------- arrays changed after use
def test_graph_keeps_private_read_only_copies():
    idx = np.array([1, 2])
    g = gr.Graph([0, 1, 2, 2], idx, [97, 98, 99])
    idx[0] = 10**9
    assert g.indices.tolist() == [1, 2]
    morphed = gr.Morpher().forward(g, np.random.default_rng(0).random((3, 8)))
    assert morphed.history.num_inputs == 3
    with pytest.raises(ValueError, match="read-only"):
        g.indices[0] = 10**9
    with pytest.raises(ValueError, match="cannot set WRITEABLE flag"):
        g.indices.flags.writeable = True


def test_history_keeps_private_read_only_copies():
    cluster = np.array([0, 0, 1])
    h = gr.MergeHistory(cluster)
    cluster[0] = 10**8
    with pytest.raises(ValueError, match="read-only"):
        h.cluster[0] = 10**8
    np.testing.assert_array_equal(h.scatter(np.ones((2, 16))), np.full((3, 16), [[0.5], [0.5],
                                                                               [1.0]]))


@pytest.mark.parametrize("estimator", ["history", "soft", "ste", "reinforce"])
def test_morph_and_loss_results_are_read_only(estimator):
    """Morphed's similarities and probabilities are the arrays its vjp
    reads: written, they changed the gradients (found by a docs reviewer;
    docs/security.md calls results immutable). Pickled or deep-copied, read-only still."""
    import copy
    import pickle
    rng = np.random.default_rng(3)
    g, H = gr.Graph.from_texts(["aabc", "xyz"]), rng.normal(size=(7, 4))
    morpher = gr.Morpher(threshold=-1.0, estimator=estimator)
    morphed = morpher.forward(g, H)
    grad = morpher.vjp(morphed, grad_features=np.ones(morphed.graph.features.shape))
    for copied in (morphed, copy.deepcopy(morphed), pickle.loads(pickle.dumps(morphed))):
        for name in ("similarity", "probability", "decisions"):
            with pytest.raises(ValueError, match="read-only"):
                getattr(copied, name)[0] = 0
    again = morpher.vjp(morphed, grad_features=np.ones(morphed.graph.features.shape))
    np.testing.assert_array_equal(grad.features, again.features)
    np.testing.assert_array_equal(grad.theta, again.theta)
    res = gr.StructuralLoss().forward(morphed.graph, gr.Graph.from_texts(["ab", "x"]))
    for copied in (res, pickle.loads(pickle.dumps(res))):
        for name in ("values", "nodes", "edges", "cliques", "iterations", "converged",
                     "marginal_error", "domain"):
            with pytest.raises(ValueError, match="read-only"):
                getattr(copied, name)[0] = 0
            with pytest.raises(ValueError, match="cannot set WRITEABLE flag"):
                getattr(copied, name).flags.writeable = True
    mine = np.zeros(2)   # handed in by dataclasses.replace: not frozen in place
    import dataclasses
    assert dataclasses.replace(res, values=mine).values.tolist() == [0.0, 0.0]
    mine[0] = 1.0


def test_embedding_grad_of_the_wrong_shape_is_refused():
    e = gr.Embedding(dim=3)
    e.forward([97, 98, 99])
    e.grad = np.zeros((1, 3))
    with pytest.raises(ValueError, match=r"^Embedding.grad must have shape \(4, 3\) "
                                         r"\(rows, dim\), got \(1, 3\)$"):
        e.backward([99], np.ones((1, 3)))


def test_history_outputs_are_bounded_by_inputs():
    with pytest.raises(ValueError, match=r"1099511627777 outputs but only 1 inputs"):
        gr.MergeHistory([2**40])


# ------------------------------------------------------------------ threads
def test_embedding_shared_by_threads_loses_nothing():
    e = gr.Embedding(dim=2048)
    start = threading.Barrier(4)

    def work(i):
        start.wait()
        labels = np.arange(1000 + 16 * i, 1064 + 16 * i)
        e.forward(labels)   # grows the table (backward reads the rows it made)
        e.backward(labels, np.ones((64, 2048)))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # rows 1000..1111: covered by 1, 2, 3 or 4 of the overlapping ranges
    expected = {c: sum(1000 + 16 * i <= c < 1064 + 16 * i for i in range(4))
                for c in range(1000, 1112)}
    got = dict(zip(e.codes.tolist(), e.grad[:, 0].tolist()))
    assert got == {gr.embedding.UNKNOWN: 0.0, **{c: float(k) for c, k in expected.items()}}
    assert (e.grad == e.grad[:, :1]).all()
    np.testing.assert_array_equal(gr.Embedding(dim=2048).forward(e.codes), e.weight)


def test_concurrent_first_use_gives_a_loadable_table(tmp_path):
    e = gr.Embedding(dim=64)
    start = threading.Barrier(8)

    def work(i):
        start.wait()
        e.forward(np.arange(100 * i, 100 * i + 150))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(e.codes.tolist()) == list(range(850)) + [gr.embedding.UNKNOWN]
    save_checkpoint(tmp_path / "e.npz", e.state_dict(), {})
    arrays, _ = load_checkpoint(tmp_path / "e.npz")
    back = gr.Embedding.from_state(arrays)
    np.testing.assert_array_equal(back.forward(e.codes), e.weight)


# ------------------------------------------------------- numbers and shapes
def test_features_around_1e155_keep_the_cosine():
    g = gr.Graph.from_text("aab")
    H = np.array([[1.0, 1.0], [1.0, 1.1], [0.0, 1.0]])
    small = gr.Morpher().forward(g, H)
    big = gr.Morpher().forward(g, H * 1e155)
    np.testing.assert_allclose(big.similarity, small.similarity, rtol=1e-15)
    np.testing.assert_allclose(big.similarity, [0.9988681377244376, 0.7399400733959438],
                               rtol=1e-15)
    assert big.history.cluster.tolist() == small.history.cluster.tolist() == [0, 0, 0]


def test_parallel_rows_stay_within_one_and_never_beat_tau_one():
    # the cosine of a row with itself (or its negative) rounds to 1 +- 2e-16
    # for about a quarter of random rows; unclipped, theta = 40 (tau = 1.0
    # exactly, "never merge") merged them at inference. Before the clip:
    # 523 of these 2,000 pairs.
    rng = np.random.default_rng(0)
    X = rng.standard_normal((2000, 64))
    g = gr.Graph.from_text("ab" * 2000)
    for sign in (1.0, -1.0):
        H = np.repeat(X, 2, axis=0)
        H[1::2] *= sign
        sim = gr.Morpher().forward(g, H).similarity
        assert np.abs(sim).max() <= 1.0
        np.testing.assert_allclose(sim[::2], sign, rtol=0, atol=4.5e-16)
    H = np.repeat(X, 2, axis=0)
    never = gr.Morpher(threshold=40.0)
    assert float(gr.ops.sigmoid(never.theta)) == 1.0
    assert not never.decide(g, H).any()
    assert not never.decide(g, H, queries=H, keys=H).any()
    assert never.predict(g, H).graph.num_nodes == g.num_nodes
    # the gradient at a clipped cosine is the cosine's: about 0 at parallel
    # rows (a maximum), which central differences confirm
    from grapheme.testing import numerical_gradient
    pair = gr.Graph.from_text("ab")
    X2 = np.repeat(X[:1], 2, axis=0) * [[1.0], [3.0]]
    op = gr.ops.EdgeSimilarity()
    res, saved = op.forward(pair, X2)
    assert res.similarity[0] == 1.0
    analytic = op.vjp(saved, np.ones(1))[0]
    numeric = numerical_gradient(
        lambda h: float(op.forward(pair, h)[0].similarity.sum()), X2)
    assert np.abs(analytic).max() <= 1e-15 and np.abs(numeric).max() <= 1e-7


class Noted(gr.Graph):
    """A user's subclass (module level: pickle finds it by name)."""


def test_copies_keep_subclass_attributes_and_own_their_arrays():
    # a review helper's finds on __setstate__: a subclass's attributes were
    # dropped, and arrays unpickled onto out-of-band buffers (protocol 5)
    # changed when their owner wrote those buffers
    import copy
    import pickle

    g = Noted([0, 1, 2, 2], [1, 2], [97, 98, 99])
    g.note = "hello"
    for c in (copy.deepcopy(g), pickle.loads(pickle.dumps(g)), copy.copy(g)):
        assert type(c) is Noted and c.note == "hello" and not c.indices.flags.writeable
    for obj in (gr.Graph.from_text("abcd"), gr.MergeHistory([0, 0, 1, 2])):
        buffers = []
        data = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
        raw = [bytearray(b.raw()) for b in buffers]
        back = pickle.loads(data, buffers=raw)
        for r in raw:
            r[:] = b"\xff" * len(r)
        if isinstance(obj, gr.Graph):
            assert back.indices.tolist() == [1, 2, 3] and back.to_text() == "abcd"
        else:
            assert back.cluster.tolist() == [0, 0, 1, 2]


def test_masses_too_large_for_their_products_are_refused():
    # mass 1e300 passed Graph's "finite, non-negative" and gave an inf loss
    # with NaN gradients (products of masses overflow from about 1e154)
    t = gr.Graph.from_text("abc")
    loss = gr.StructuralLoss(debias=True)
    at_limit = gr.Graph.from_texts(["ab", "ab"]).replace(mass=[5e149 - 1.0, 1.0, 1.0, 5e149])
    res = loss.forward(at_limit, gr.Graph.from_texts(["abc", "a"]).replace(
        mass=[1.0, 2.0, 5e149 - 3.0, 5e149]))
    grad = loss.backward(res)
    assert np.isfinite(res.value) and all(
        np.isfinite(g).all() for g in grad if g is not None)
    for mass in (6e149, 1e300):
        with pytest.raises(ValueError, match=r"^predicted graph 0 has a total mass of "
                                             r"\de\+\d+, more than 5e\+149"):
            loss.forward(gr.Graph.from_text("ab").replace(mass=[mass, 1.0]), t)
    with pytest.raises(ValueError, match=r"^target graph 1 has a total mass of 1e\+300"):
        loss.forward(gr.Graph.from_texts(["a", "b"]),
                     gr.Graph.from_texts(["a", "b"]).replace(mass=[1.0, 1e300]))


def test_edge_weights_too_large_for_their_products_are_refused():
    # an attack helper's find: weights of 9e307 summed to inf in the
    # degrees, and the edge term jumped to 1 without a word
    loss = gr.StructuralLoss(debias=True)
    g, t = gr.Graph.from_text("abc"), gr.Graph.from_text("ab")
    res = loss.forward(g.replace(weights=[5e149 - 1.0, 1.0]), t.replace(weights=[5e149]))
    assert np.isfinite(res.value) and all(
        np.isfinite(x).all() for x in loss.backward(res) if x is not None)
    for w in (6e149, 9e307):
        with pytest.raises(ValueError, match=r"^predicted graph 0 has a total edge weight of "
                                             r"\S+, more than 5e\+149"):
            loss.forward(g.replace(weights=[w, w]), t)
    with pytest.raises(ValueError, match=r"^target graph 0 has a total edge weight"):
        loss.forward(g, t.replace(weights=[1e300]))


def test_loss_with_all_zero_edge_weights_has_finite_gradients():
    """The edge term is 0 while both graphs have no edge weight and jumps
    as one appears (beta * 1 here), its gradient there taken as 0: the
    gradient is the rest of the loss's, which one-sided differences (the
    weights cannot go below 0) of the loss without the edge term give."""
    p = gr.Graph([0, 1, 2, 2], [1, 2], [97, 98, 99], weights=[0.0, 0.0])
    t = gr.Graph([0, 1, 1], [1], [97, 98], weights=[0.0])
    loss = gr.StructuralLoss()
    grad = loss.backward(loss.forward(p, t))
    for part in grad:
        assert part is None or np.isfinite(part).all()
    no_edge = gr.StructuralLoss(beta=0.0)

    def value(w, tw, of=no_edge):
        return of.forward(p.replace(weights=w), t.replace(weights=tw)).value
    h, base = 1e-7, value([0.0, 0.0], [0.0])
    fd = [(value([h, 0.0], [0.0]) - base) / h, (value([0.0, h], [0.0]) - base) / h]
    np.testing.assert_allclose(grad.weights, fd, rtol=1e-5)
    np.testing.assert_allclose(grad.target_weights, [(value([0.0, 0.0], [h]) - base) / h],
                               rtol=1e-5)
    assert grad.weights.min() > 0.1                     # not a gradient of 0 by luck
    assert value([h, 0.0], [0.0], loss) - value([0.0, 0.0], [0.0], loss) == pytest.approx(
        0.5, rel=1e-5)                                  # the jump: beta * (1 - 2X/W), X ~ h^2


def test_empty_batch_through_the_loss_is_an_error():
    e = gr.Graph.from_texts([])
    with pytest.raises(ValueError, match=r"^predicted is an empty batch \(0 graphs\)"):
        gr.StructuralLoss().forward(e, e)


def test_morpher_backward_never_writes_its_inputs():
    g = gr.Graph.from_text("aab")
    H = np.array([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]])
    for est in ("soft", "ste"):
        m = gr.Morpher(estimator=est)
        morphed = m.forward(g, H)
        before = morphed.graph.features.copy()
        with pytest.raises(TypeError, match="backward\\(\\) got an unexpected keyword "
                                            "argument 'out'"):
            m.backward(morphed, out=morphed.graph.features)
        m.backward(morphed, grad_features=morphed.graph.features)
        np.testing.assert_array_equal(morphed.graph.features, before)
        with pytest.raises(ValueError, match="out must not overlap"):
            m.vjp(morphed, grad_features=np.ones(before.shape), out=H)


def test_graph_text_and_batch_errors():
    with pytest.raises(ValueError, match=r"^labels\[0\] = 0xd800 is a surrogate code point"):
        gr.Graph([0, 0], [], [0xD800]).to_text()
    a = gr.Graph.from_text("ab").replace(features=np.ones((2, 3)))
    b = gr.Graph.from_text("c").replace(features=np.ones((1, 4)))
    with pytest.raises(ValueError, match=r"^graphs must all have the same number of "
                                         r"features: graphs\[0\] has 3, graphs\[1\] has 4$"):
        gr.Graph.batch([a, b])


def test_huge_integers_give_clear_errors():
    with pytest.raises(ValueError, match=r"^threshold must be finite, got an integer of "
                                         r"about 500\d digits$"):
        gr.Morpher(threshold=10**5000)
    with pytest.raises(ValueError, match=r"^dim must be <= 2147483647"):
        gr.Embedding(dim=10**11)


# --------------------------------------------------------------- data files
@pytest.mark.parametrize("body, result", [
    (b'\xef\xbb\xbf{"input": "a", "target": "b"}\n', [("a", "b")]),
    (b"[" * 100000 + b"]" * 100000 + b"\n", ":1: invalid JSON (nested too deeply)"),
    (b'{"input": "a", "target": "b", "n": ' + b"1" * 5000 + b"}\n",
     ":1: invalid JSON (an integer with more than 4300 digits)"),
    # "at" once (json's message ends with it: an attack helper's find)
    (b'{"input": "a", "target": "b"}\n{"input": "a',
     ":2: invalid JSON (Unterminated string starting at column 11)"),
])
def test_data_file_edge_cases(tmp_path, body, result):
    path = tmp_path / "d.jsonl"
    path.write_bytes(body)
    if isinstance(result, list):
        assert gr.load_pairs(path) == result
    else:
        with pytest.raises(ValueError) as info:
            gr.load_pairs(path)
        assert str(info.value) == f"{path}{result}"


# ------------------------------------------------------------- the trainer
def _trainer(lr=1e-2, **kwargs):
    return gr.Trainer(gr.Embedding(dim=8), gr.Morpher(estimator="ste"), gr.StructuralLoss(),
                      gr.Adam(lr=lr), batch_size=3, progress=False, **kwargs)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # lr = 1e308
def test_divergence_keeps_the_last_good_checkpoint(tmp_path):
    ck = tmp_path / "ck.npz"
    trainer = _trainer()
    trainer.fit(gr.DEMO_PAIRS, 1, checkpoint=ck)
    good = ck.read_bytes()
    trainer.optimizer.lr = 1e308
    with pytest.raises(FloatingPointError) as info:
        trainer.fit(gr.DEMO_PAIRS, 3, checkpoint=ck)
    assert str(info.value).startswith("training diverged at epoch 2: ")
    assert str(info.value).endswith(f"nothing was written: the checkpoint {str(ck)!r} "
                                    "(epoch 1) is still good")
    assert ck.read_bytes() == good
    fresh = _trainer(lr=1e308)
    with pytest.raises(FloatingPointError, match="no checkpoint of this run yet"):
        fresh.fit(gr.DEMO_PAIRS, 3, checkpoint=tmp_path / "other.npz")
    assert not (tmp_path / "other.npz").exists()


@pytest.mark.parametrize("layers", [0, 2])
def test_an_encoder_that_overflows_is_divergence(layers):
    """Finite but huge weights make the encoder's output overflow: the step
    says training diverged, not that the morph's queries contain NaN."""
    trainer = _trainer(lr=1e300, encoder=gr.Encoder(8, layers=layers))
    inputs, targets = zip(*gr.DEMO_PAIRS)
    trainer.train_step(list(inputs), list(targets))   # the weights become ~1e300
    assert all(np.isfinite(w).all() for w in trainer.encoder.params.values())
    with pytest.raises(FloatingPointError, match="training diverged at epoch 1: the "
                                                 "encoder's output is not finite"):
        trainer.train_step(list(inputs), list(targets))


@pytest.mark.parametrize("layers", [0, 2])
def test_a_step_checks_the_table_it_looks_up(layers):
    """The step checks the embedding's table (O(V d)) instead of scanning
    the (n, d) rows looked up from it in the encoder and the morph: a table
    a user filled with NaN or replaced by one of another dtype is refused,
    naming it, before any kernel reads it."""
    inputs, targets = map(list, zip(*gr.DEMO_PAIRS))
    for bad, message in ((np.nan, "Embedding.weight contains NaN or inf"),
                         (np.inf, "Embedding.weight contains NaN or inf"),
                         ("float32", "Embedding.weight must be a float64 ndarray")):
        trainer = _trainer(encoder=gr.Encoder(8, layers=layers) if layers else None)
        trainer.train_step(inputs, targets)
        emb = trainer.embedding
        if bad == "float32":
            emb.weight = emb.weight.astype(np.float32)
        else:
            emb.weight[3, 1] = bad
        with pytest.raises(ValueError, match=message):
            trainer.train_step(inputs, targets)
        with pytest.raises(ValueError, match=message):
            trainer.evaluate(gr.DEMO_PAIRS)


def test_a_step_reads_only_the_table_of_its_embedding():
    """The step's checks are the table's (``weight``): a gradient buffer the
    Trainer never reads may be anything, and a segmentation batch, whose
    table is larger than its rows, has the rows it looked up checked."""
    inputs, targets = map(list, zip(*gr.DEMO_PAIRS))
    trainer = _trainer()
    trainer.train_step(inputs, targets)
    trainer.embedding.grad = None
    trainer.train_step(inputs, targets)
    assert np.isfinite(trainer.evaluate(gr.DEMO_PAIRS)["loss"])
    seg = [("ab", ("a", "b"))]
    trainer = _trainer()
    trainer.train_step(inputs, targets)          # 10 rows against 2 nodes
    emb = trainer.embedding
    emb.weight[emb.rows([ord("a")])[0], 0] = np.nan
    with pytest.raises(ValueError, match="Embedding.weight contains NaN or inf"):
        trainer.train_step(*map(list, zip(*seg)))


@pytest.mark.parametrize("layers", [0, 2])
def test_a_table_in_any_memory_order_trains(layers):
    """A Fortran-ordered or strided embedding table (``np.load`` of a
    Fortran-ordered file, say) trains and evaluates as the C-ordered one:
    the encoder reads a contiguous copy (an attack helper found the step
    refusing it with a raw buffer error)."""
    inputs, targets = map(list, zip(*gr.DEMO_PAIRS))
    results = []
    for order in ("C", "F", "strided"):
        trainer = _trainer(encoder=gr.Encoder(8, layers=layers))
        trainer.train_step(inputs, targets)
        w = trainer.embedding.weight
        if order == "F":
            trainer.embedding.weight = np.asfortranarray(w)
        elif order == "strided":
            wide = np.zeros((w.shape[0], 2 * w.shape[1]))
            wide[:, ::2] = w
            trainer.embedding.weight = wide[:, ::2]
        stats = trainer.train_step(inputs, targets)
        results.append((stats["loss"], trainer.evaluate(gr.DEMO_PAIRS)["loss"]))
    # to the loss's tolerance: numpy's row means of a Fortran-ordered table
    # sum in another order, and Sinkhorn stops at its tolerance
    np.testing.assert_allclose(results[1:], [results[0]] * 2, rtol=1e-6)


def test_an_overflowing_encoder_is_named_in_inference():
    """Outside training, an encoder layer whose output overflows raises
    ``grapheme.LayerOverflowError`` (a ValueError) naming the layer."""
    trainer = _trainer(encoder=gr.Encoder(8, layers=1))
    trainer.train_step(*map(list, zip(*gr.DEMO_PAIRS)))
    trainer.encoder.params["layer0.self"][...] = 1e308
    trainer.encoder.params["layer0.pred"][...] = -1e308
    for call in (lambda: trainer.evaluate(gr.DEMO_PAIRS),
                 lambda: trainer.model.segment(["the cat sat"])):
        with pytest.raises(gr.LayerOverflowError, match="layer 0 overflowed"):
            call()


def test_replaced_components_are_checked_where_used(tmp_path):
    """A Trainer's or a Segmenter's component assigned since construction
    is checked as the constructor checks it, at the next step, evaluation,
    inference or save (before: an encoder of another width was blamed on a
    weight, a float32 embedding failed on a float64 buffer of the step's
    workspace, and a non-component failed with an AttributeError)."""
    inputs, targets = map(list, zip(*gr.DEMO_PAIRS))
    replacements = [
        ("encoder", gr.Encoder(4, layers=2), ValueError,
         r"encoder.dim = 4 must equal embedding.dim = 8"),
        ("encoder", gr.Encoder(8, layers=2, dtype=np.float32), ValueError,
         r"encoder.dtype = float32 must equal embedding.dtype = float64"),
        ("embedding", gr.Embedding(16), ValueError, "encoder.dim = 8 must equal"),
        ("embedding", 5, TypeError, "embedding must be a grapheme.Embedding, got int"),
        ("morpher", 5, TypeError, "morpher must be a grapheme.Morpher, got int"),
    ]
    for name, new, exc, match in replacements:
        trainer = _trainer(encoder=gr.Encoder(8, layers=2))
        trainer.train_step(inputs, targets)
        model = trainer.model
        setattr(trainer, name, new)
        setattr(model, name, new)
        for call in (lambda: trainer.train_step(inputs, targets),
                     lambda: trainer.evaluate(gr.DEMO_PAIRS),
                     lambda: trainer.save(tmp_path / "ck.npz"),
                     lambda: model.segment(["the cat sat"]),
                     lambda: model.save(tmp_path / "model.npz")):
            with pytest.raises(exc, match=match):
                call()
    assert os.listdir(tmp_path) == []
    trainer = _trainer()
    for name, new, match in (("loss", 5, "loss must have forward"),
                             ("optimizer", 5, "optimizer must be a grapheme.optim"),
                             ("comm", 5, "comm must be a grapheme.distributed")):
        setattr(trainer, name, new)
        with pytest.raises(TypeError, match=match):
            trainer.train_step(inputs, targets)
        setattr(trainer, name, None if name == "comm" else getattr(_trainer(), name))
    # a component that fits is taken, the step's buffers in its dtype
    trainer.embedding = gr.Embedding(8, dtype=np.float32)
    trainer.train_step(inputs, targets)
    assert trainer.embedding.weight.dtype == np.float32
    # the encoder's own O(1) check of its table, behind both
    enc = gr.Encoder(4, layers=2)
    g = gr.Graph.from_text("abc")
    with pytest.raises(ValueError, match=r"Embedding.weight must be a float64 array of "
                                         r"shape \(V, 4\) for Encoder"):
        enc._forward_lookup(g, np.zeros((3, 8)), np.arange(3), None, "Embedding.weight")


def test_a_segmenter_window_follows_a_replaced_encoder():
    """Its default window is recomputed for the encoder's layers; a window
    set below the new encoder's least (2 * layers + 2) is refused, naming
    it, not run with overlaps the window cannot hold."""
    emb = gr.Embedding(8)
    model = gr.Segmenter(emb, gr.Morpher())
    default = model.window
    copy, fixed = model.copy(), gr.Segmenter(emb, gr.Morpher(), window=100).copy()
    for m in (model, copy, fixed):
        m.encoder = gr.Encoder(8, layers=2)
    # read at once (review: the window read stale until the next segment)
    assert model.window < default and model.window == gr.Segmenter(
        emb, gr.Morpher(), gr.Encoder(8, layers=2)).window == copy.window
    assert fixed.window == 100   # a window set stays set, in a copy too
    model = gr.Segmenter(emb, gr.Morpher(), window=3)
    model.encoder = gr.Encoder(8, layers=2)
    with pytest.raises(ValueError, match="window must be >= 6"):
        model.segment("abcdefghij")


def test_routing_refuses_queries_that_are_not_finite():
    """The morph's unscanned path (the Trainer's) leaves non-finite queries
    or keys to the routing's norms: a ValueError, never NaN scores."""
    from grapheme.ops import RoutedSimilarity

    g = gr.Graph.from_text("abcd")
    q, k = np.ones((4, 3)), np.ones((4, 3))
    for bad in (np.nan, np.inf, -np.inf):
        for arr in (q, k):
            arr[2, 1] = bad
            with pytest.raises(ValueError, match="queries and keys must be finite"):
                RoutedSimilarity()._forward(g, q, k)
            with pytest.raises(ValueError, match="queries and keys must be finite"):
                gr.Morpher()._forward(g, np.ones((4, 3)), q, k)
            arr[2, 1] = 1.0
    huge = np.full((4, 3), 1e200)     # finite rows whose |.|^2 overflows: rescaled
    assert np.allclose(RoutedSimilarity()._forward(g, huge, huge)[0].similarity, 1.0)


def test_fresh_run_refuses_an_existing_checkpoint(tmp_path):
    ck = tmp_path / "ck.npz"
    _trainer().fit(gr.DEMO_PAIRS, 1, checkpoint=ck)
    before = ck.read_bytes()
    with pytest.raises(ValueError, match=r"^checkpoint '.*ck.npz' already exists; a fresh "
                                         r"run does not replace another run's files"):
        _trainer().fit(gr.DEMO_PAIRS, 1, checkpoint=ck)
    assert ck.read_bytes() == before
    _trainer(overwrite=True).fit(gr.DEMO_PAIRS, 1, checkpoint=ck)


def test_trainer_save_never_overwrites_unasked(tmp_path):
    # found by an attack helper: Trainer.save replaced any file
    user = tmp_path / "ck.npz"
    user.write_text("the user's file")
    trainer = _trainer()
    with pytest.raises(FileExistsError, match="checkpoint already exists"):
        trainer.save(user)
    assert user.read_text() == "the user's file"
    with pytest.raises(IsADirectoryError):
        trainer.save(tmp_path)
    trainer.save(user, overwrite=True)
    assert gr.Trainer.from_checkpoint(user, progress=False).config() == trainer.config()
    _trainer(overwrite=True).save(user)   # the trainer's own overwrite is the default
    with pytest.raises(FileExistsError):
        _trainer(overwrite=True).save(user, overwrite=False)
    with pytest.raises(TypeError, match="overwrite must be True, False or None"):
        trainer.save(user, overwrite="yes")
    # fit replaces its own checkpoint every epoch, as before
    trainer.fit(gr.DEMO_PAIRS, 2, checkpoint=tmp_path / "run.npz")
    assert gr.Trainer.from_checkpoint(tmp_path / "run.npz", progress=False).epoch == 2


def test_resume_on_other_data_is_refused(tmp_path):
    ck = tmp_path / "ck.npz"
    _trainer().fit(gr.DEMO_PAIRS, 1, checkpoint=ck)
    other = [("hello", "hell")]
    with pytest.raises(ValueError, match=r"^pairs differ from the data the checkpoint "
                                         r"'.*ck.npz' was trained on \(3 pairs"):
        _trainer().fit(other, 2, resume=ck)
    assert len(_trainer().fit(other, 2, resume=ck, new_data=True)) == 2


def _corrupt(tmp_path, change):
    ck = tmp_path / "ck.npz"
    if not ck.exists():
        _trainer().fit(gr.DEMO_PAIRS, 2, checkpoint=ck)
    arrays, meta = load_checkpoint(ck)
    change(arrays, meta)
    bad = tmp_path / "bad.npz"
    save_checkpoint(bad, arrays, meta)
    return bad


@pytest.mark.parametrize("change, message", [
    (lambda a, m: a["optimizer.exp_avg.embedding"].__setitem__((0, 0), np.nan),
     "optimizer.exp_avg.embedding contains NaN or infinity"),
    (lambda a, m: a.__setitem__("optimizer.exp_avg_sq.embedding", np.zeros((2, 9))),
     r"optimizer.exp_avg_sq.embedding has shape \(2, 9\), its parameter has \(\d+, 8\)"),
    # loaded, then a traceback in the first step (an attack helper's find)
    (lambda a, m: a.__setitem__("optimizer.exp_avg.theta",
                                a["optimizer.exp_avg.theta"].astype(np.float32)),
     "optimizer.exp_avg.theta is float32, its parameter float64"),
    (lambda a, m: a.__setitem__("embedding.weight", np.zeros((a["embedding.codes"].size, 5))),
     "embedding.weight has 5 columns, the configuration says dim=8"),
    (lambda a, m: m.__setitem__("epoch", -1), "epoch must be a non-negative integer, got -1"),
    (lambda a, m: m.__setitem__("history", m["history"][:1]),
     r"history must hold one record per epoch \(2\), got 1"),
    # left last session: a record's values, and the best record's epoch
    (lambda a, m: m["history"][1].__setitem__("loss", "low"),
     r"history\[1\]\['loss'\] is not a number, got 'low'"),
    (lambda a, m: m["history"][0].__setitem__("tau", [0.5]),
     r"history\[0\]\['tau'\] is not a number"),
    (lambda a, m: m.__setitem__("best", {"metric": "loss", "value": 1.0, "epoch": 7,
                                         "path": "b.npz"}),
     r"the best checkpoint's epoch \(7\) is not one of the 2 epochs so far"),
    (lambda a, m: m["rng"].__setitem__("bit_generator", "MT19937"),
     "state must be for a PCG64 RNG"),
    (lambda a, m: m["morpher"].__setitem__("rate", {"multiplier": 0.0}),
     "rate controller mismatch"),
])
def test_checkpoint_contents_are_validated_on_load(tmp_path, change, message):
    bad = _corrupt(tmp_path, change)
    trainer = _trainer()
    with pytest.raises(ValueError, match=f"^checkpoint '.*bad.npz' is corrupted or "
                                         f"truncated: .*{message}"):
        trainer.load(bad)
    assert trainer.epoch == 0 and trainer.embedding.weight.shape == (1, 8)  # unknown row
    assert trainer.optimizer.state_dict() == {"lr": 0.01, "beta1": 0.9, "beta2": 0.999,
                                              "eps": 1e-8, "weight_decay": 0.0}


# ---------------------------------------------------------------- the CLI
def _cli(*argv):
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, err.getvalue()


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    (d / "train.jsonl").write_text("".join(json.dumps({"input": a, "target": b}) + "\n"
                                           for a, b in gr.DEMO_PAIRS))
    return d


def test_cli_existing_run_without_a_checkpoint(tmp_path, data_dir):
    """An --out holding only a log: the advice is --overwrite or another
    --out, never a --resume of a checkpoint that is not there (a review
    helper's find)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"epoch": 1}\n')
    code, err = _cli("train", "--data", data_dir, "--epochs", 1, "--out", run)
    assert code == 2 and err.endswith("already holds a run (metrics.jsonl); pass "
                                      "--overwrite to replace it, or another --out\n")
    other = tmp_path / "other.npz"
    other.write_text("")
    code, err = _cli("train", "--data", data_dir, "--epochs", 1, "--out", run,
                     "--resume", other)
    assert code == 2 and err.endswith("is not its checkpoint: pass --overwrite to replace "
                                      "it, or another --out\n")


def test_cli_existing_run(tmp_path, data_dir, monkeypatch):
    run = tmp_path / "run"
    assert _cli("train", "--data", data_dir, "--epochs", 1, "--out", run, "--no-progress",
                "--dim", 8)[0] == 0
    files = {p: p.read_bytes() for p in run.iterdir()}
    code, err = _cli("train", "--data", data_dir, "--epochs", 1, "--out", run,
                     "--estimator", "history")
    assert code == 2 and "already holds a run (checkpoint.npz, metrics.jsonl)" in err
    assert err.endswith(f"pass --resume {run / 'checkpoint.npz'} to continue that run, "
                        "--overwrite to replace it, or another --out\n")
    # a --resume of another file is named, not ignored (an attack helper's
    # find: the message asked for the --resume it had been given)
    other = tmp_path / "other.jsonl"
    other.write_text("")
    code, err = _cli("train", "--data", data_dir, "--epochs", 2, "--out", run,
                     "--resume", other)
    assert code == 2 and (f"already holds a run (checkpoint.npz, metrics.jsonl), and "
                          f"--resume {str(other)!r} is not its checkpoint") in err
    assert {p: p.read_bytes() for p in run.iterdir()} == files
    # --overwrite interrupted before its first epoch: the old run survives
    from grapheme.train import trainer as trainer_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(trainer_module.Trainer, "_run_epoch", interrupted)
        code, err = _cli("train", "--data", data_dir, "--epochs", 1, "--out", run,
                         "--overwrite", "--estimator", "history")
    assert code == 130
    assert {p: p.read_bytes() for p in run.iterdir()} == files
    # continuing it is fine; on other data it is refused
    assert _cli("train", "--data", data_dir, "--epochs", 2, "--out", run, "--resume",
                run / "checkpoint.npz")[0] == 0
    other = tmp_path / "other"
    other.mkdir()
    (other / "train.jsonl").write_text('{"input": "ab", "target": "a"}\n')
    code, err = _cli("train", "--data", other, "--epochs", 3, "--out", run, "--resume",
                     run / "checkpoint.npz")
    assert code == 2 and "--data is not the data" in err
    assert "add --new-data to continue on this" in err
    # --new-data continues on them (found by a new-user helper: the message
    # named only fit(..., new_data=True))
    assert _cli("train", "--data", other, "--epochs", 3, "--out", run, "--resume",
                run / "checkpoint.npz", "--new-data")[0] == 0


def test_cli_checkpoint_errors_never_advise_pickle(tmp_path, data_dir):
    for path, message in ((tmp_path, "is a directory, not a checkpoint file"),
                          (data_dir / "train.jsonl", "not a zip archive")):
        code, err = _cli("eval", "--checkpoint", path, "--data", data_dir / "train.jsonl")
        assert code == 2 and message in err and "pickle" not in err
        assert err.count("\n") == 1


# --- from this session's attack on the workspace and the new operations -----
def test_workspace_inputs_that_a_call_would_overwrite_are_refused():
    """An input living in the workspace array a call writes used to give
    wrong numbers silently (Linear chained under one name, an encoder fed
    its own projection buffer, the relaxation fed its own output buffer)."""
    from grapheme import ops
    from grapheme._workspace import Workspace

    rng = np.random.default_rng(0)
    ws = Workspace()
    X, W = rng.normal(size=(2000, 64)), rng.normal(size=(64, 64))
    (y1,), _ = ops.Linear().forward(X, W, workspace=ws, name="proj.")
    with pytest.raises(ValueError, match="features lies in the workspace's array 'proj.out'"):
        ops.Linear().forward(y1, W, workspace=ws, name="proj.")
    (y2,), saved = ops.Linear().forward(y1, W, workspace=ws, name="other.")
    np.testing.assert_allclose(y2, (X @ W) @ W, rtol=1e-12)
    G = ws("p.grad", (2000, 64))
    G[...] = 1.0
    with pytest.raises(ValueError, match="grad_features lies in the workspace's array 'p.grad'"):
        ops.Linear().vjp(saved, G, workspace=ws, name="p.")

    g = gr.Graph.from_text("ab" * 50)
    F = ws("query.out", (g.num_nodes, 8))
    F[...] = rng.normal(size=F.shape)
    with pytest.raises(ValueError, match="features lies in the workspace's array 'query.out'"):
        gr.Encoder(8, layers=0).forward(g, F, workspace=ws)
    R = ws("relax.features", (g.num_nodes, 8))
    R[...] = 1.0
    with pytest.raises(ValueError, match="features lies in the workspace's array"):
        gr.Morpher(threshold=0.0, estimator="ste").forward(g, R, workspace=ws)
    for bad in ({}, 1, "ws"):
        with pytest.raises(TypeError, match="workspace must be"):
            gr.Morpher().forward(g, np.ones((g.num_nodes, 2)), workspace=bad)
        with pytest.raises(TypeError, match="workspace must be"):
            gr.Encoder(2, layers=1).forward(g, np.ones((g.num_nodes, 2)), workspace=bad)


def test_feature_mean_checks_its_arguments():
    from grapheme import ops

    op = ops.FeatureMean()
    (a,), saved = op.forward(np.array([[1, 2, 3], [4, 5, 6]]))   # ints are numbers
    assert a.tolist() == [2.0, 5.0]
    np.testing.assert_array_equal(op.vjp(saved, np.array([3.0, 3.0]))[0], np.ones((2, 3)))
    for bad in (np.ones(3), np.ones((2, 3)), 1.0):
        with pytest.raises(ValueError, match="grad_activation"):
            op.vjp(saved, bad)
    with pytest.raises(TypeError, match="grad_activation"):
        op.vjp(saved, np.array([1 + 1j, 2]))
    with pytest.raises(ValueError, match="grad_activation"):
        ops.FeatureMean.vjp_column(saved, np.ones(10))
    with pytest.raises(ValueError, match="features"):
        op.forward(np.ones(3))
    assert ops.FeatureMean.vjp_column((2, 0), np.ones(2)).tolist() == [[0.0], [0.0]]


def test_relaxation_refuses_merge_weights_outside_0_1():
    from grapheme import ops

    g = gr.Graph.from_text("abc")
    for bad in ([-1.0, 0.0], [2.0, 0.5]):
        with pytest.raises(ValueError, match=r"merge must lie in \[0, 1\]"):
            ops.ChainRelaxation().forward(g, np.ones((3, 2)), bad)


def test_encoder_vjp_checks_its_gradients():
    g = gr.Graph.from_text("abcd")
    enc = gr.Encoder(3, layers=1)
    _, saved = enc.forward(g, np.ones((4, 3)))
    for name in ("grad_features", "grad_queries", "grad_keys"):
        with pytest.raises(ValueError, match=name):
            enc.vjp(saved, **{name: np.ones((1, 3))})
        with pytest.raises(TypeError, match=name):
            enc.vjp(saved, **{name: np.full((4, 3), "x")})


def test_history_kernels_check_their_shapes():
    """The compiled gather and scatter, called with arrays that disagree,
    used to read past them (a segfault) or return garbage."""
    from grapheme import _core

    h = gr.MergeHistory(np.arange(1000) // 2)
    with pytest.raises(ValueError, match="gather"):
        _core.gather(h.cluster, h.indptr, h.members, np.empty(0), np.ones((10, 4)),
                     np.empty((500, 4)))
    with pytest.raises(ValueError, match="gather"):
        _core.gather(h.cluster, h.indptr, h.members, np.empty(0), np.ones((1000, 1)),
                     np.empty((500, 64)))
    with pytest.raises(ValueError, match="scatter"):
        _core.scatter(h.cluster, h.indptr, np.empty(0), np.ones((10, 4)), np.empty((1000, 4)))
    with pytest.raises(ValueError, match="node_weights"):
        _core.scatter(h.cluster, h.indptr, np.ones(3), np.ones((500, 4)), np.empty((1000, 4)))


def test_edge_cosine_kernels_check_their_shapes():
    """The edge cosines' kernels check every shape (O(1)) before their
    threads run: ``indices`` longer than ``indptr`` says used to leave the
    backward's in-edge slots unwritten, and the keys, norms, similarities
    and gradients are sized by the queries and the edges."""
    from grapheme import _core

    n, d, E = 3000, 4, 2000
    indptr, indices = np.zeros(n + 1, np.int64), np.zeros(E, np.int64)
    Q, qn, sim, gs = np.ones((n, d)), np.ones(n), np.zeros(E), np.ones(E)
    with pytest.raises(ValueError, match=r"indptr must be \(n \+ 1,\) = \(3001,\) and end "
                                         r"at len\(indices\) = 2000"):
        _core.edge_cosine_qk_backward(indptr, indices, Q, Q, qn, qn, sim, gs,
                                      np.zeros((n, d)), np.zeros((n, d)))
    g = gr.Graph.from_text("abcd")
    ip, ix, E = g.indptr, g.indices, g.num_edges
    Q, qn, sim, gs = np.ones((4, d)), np.empty(4), np.empty(E), np.ones(E)
    cases = [
        ((ip[:-1], ix, Q, Q, qn, qn, sim), "indptr must be"),
        ((ip, ix, Q, Q[:3], qn, qn, sim), r"keys must be \(4, 4\)"),
        ((ip, ix, Q, Q[:, :2].copy(), qn, qn, sim), r"keys must be \(4, 4\)"),
        ((ip, ix, Q, Q, qn[:3], qn, sim), r"norms must be \(4,\)"),
        ((ip, ix, Q, Q, qn, qn, sim[:0]), r"similarities and their gradient must be \(3,\)"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            _core.edge_cosine_qk(*args)
    gq = np.zeros((4, d))
    with pytest.raises(ValueError, match=r"similarities and their gradient must be \(3,\)"):
        _core.edge_cosine_qk_backward(ip, ix, Q, Q, qn, qn, sim, gs[:2], gq, gq)
    with pytest.raises(ValueError, match=r"gradients must be \(4, 4\)"):
        _core.edge_cosine_qk_backward(ip, ix, Q, Q, qn, qn, sim, gs, gq, gq[:3])
    with pytest.raises(ValueError, match=r"gradients must be \(4, 4\)"):
        _core.edge_cosine_backward(ip, ix, Q, qn, sim, gs, np.zeros((4, 2)))


def test_edge_similarity_refuses_to_accumulate_into_its_features():
    """``accumulate`` reads the saved features' rows (on several threads)
    while it writes ``into``: the features themselves as ``into`` are
    refused, naming them."""
    g = gr.Graph.from_text("abcab" * 10)
    H = np.random.default_rng(0).normal(size=(g.num_nodes, 3))
    _, saved = gr.ops.EdgeSimilarity().forward(g, H)
    with pytest.raises(ValueError, match="into must not overlap features"):
        gr.ops.EdgeSimilarity.accumulate(saved, np.ones(g.num_edges), saved[2])


def test_import_with_numpys_tanh_replaced(tmp_path):
    """A program that replaced ``np.tanh`` (not a ufunc any more) before
    importing grapheme still imports it: the layers then use ``np.tanh``
    as it is, not numpy's own loop."""
    import os
    import subprocess
    import sys

    code = ("import numpy as np; o = np.tanh; np.tanh = lambda x, *a, **k: o(x, *a, **k)\n"
            "import grapheme, grapheme._products as p; print(p.NUMPY_TANH)\n"
            "g = grapheme.Graph.from_text('abc'); h = np.ones((3, 2)); w = np.eye(2)\n"
            "print(grapheme.ops.MessagePassing().forward(g, h, w, w, w, np.zeros(2))[0].features[0, 0])")
    root = os.path.dirname(os.path.dirname(os.path.abspath(gr.__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=tmp_path, env=env, check=True).stdout.split()
    assert out[0] == "False" and float(out[1]) == 1.0 + np.tanh(2.0)


class _LyingStr(str):
    """A str whose len() disagrees with its characters (an attack helper
    found that Graph.from_texts sized the kernel's arrays by it: segfault)."""

    def __len__(self):
        return 10**6

    def __iter__(self):
        return iter("zzzz")


def test_str_subclasses_are_read_by_their_characters():
    lie = _LyingStr("ab")
    g = gr.Graph.from_texts([lie, "xyz"])
    assert g.to_text() == "abxyz" and g.graph_offsets.tolist() == [0, 2, 5]
    assert gr.Graph.from_text(lie).num_nodes == 2
    trainer = gr.Trainer(gr.Embedding(8), gr.Morpher(estimator="ste"),
                         gr.StructuralLoss.for_training(), gr.Adam(), progress=False)
    trainer.fit([(_LyingStr("abc"), "ab"), ("xyz", _LyingStr("xy"))], 1)
    seg = gr.Trainer(gr.Embedding(8), gr.Morpher(estimator="ste"),
                     gr.StructuralLoss.for_training(), gr.Adam(), progress=False)
    seg.fit([(_LyingStr("abc"), (_LyingStr("a"), "bc"))], 1)
    model = trainer.model
    plain = model.segment(["abcdefgh", "xyz"])
    assert model.segment([_LyingStr("abcdefgh"), "xyz"]) == plain
    assert model.join(_LyingStr("abcdefgh")) == model.join("abcdefgh")
    assert gr.MergeHistory([0, 0, 1]).segments(_LyingStr("aab")) == ["aa", "b"]


@pytest.mark.parametrize("truthy", ["no", "False", 1, None])
def test_consent_and_switches_must_be_bools(truthy, tmp_path):
    """A truthy string is not consent: overwrite="no" replaced files (found
    by the attack helper); new_data="no" would accept other data."""
    existing = tmp_path / "m.npz"
    trainer = gr.Trainer(gr.Embedding(8), gr.Morpher(estimator="ste"),
                         gr.StructuralLoss.for_training(), gr.Adam(), progress=False)
    trainer.fit(gr.DEMO_PAIRS, 1)
    trainer.model.save(existing)
    before = existing.read_bytes()
    for call, name in ((lambda: trainer.model.save(existing, overwrite=truthy), "overwrite"),
                       (lambda: gr.Trainer(gr.Embedding(8), gr.Morpher(),
                                           gr.StructuralLoss(), gr.Adam(),
                                           overwrite=truthy), "overwrite"),
                       (lambda: gr.Trainer(gr.Embedding(8), gr.Morpher(),
                                           gr.StructuralLoss(), gr.Adam(),
                                           progress=truthy), "progress"),
                       (lambda: trainer.fit(gr.DEMO_PAIRS, 2, new_data=truthy), "new_data"),
                       (lambda: trainer.embedding.forward([97], grow=truthy), "grow"),
                       (lambda: trainer.embedding.rows([97], grow=truthy), "grow")):
        with pytest.raises(TypeError, match=f"{name} must be True or False"):
            call()
    assert existing.read_bytes() == before and trainer.epoch == 1


def test_log_and_checkpoints_must_be_different_files(tmp_path):
    """The log written over by the checkpoint (found by the attack helper)."""
    same = tmp_path / "a.npz"
    for log, checkpoint, best in ((same, same, None), (same, tmp_path / "c.npz", same)):
        trainer = gr.Trainer(gr.Embedding(8), gr.Morpher(estimator="ste"),
                             gr.StructuralLoss.for_training(), gr.Adam(), progress=False,
                             log=log)
        with pytest.raises(ValueError, match="must be different files"):
            trainer.fit(gr.DEMO_PAIRS, 1, val=gr.DEMO_PAIRS, checkpoint=checkpoint,
                        keep_best=None if best is None else "val_loss", best=best)
        assert not same.exists() and trainer.epoch == 0


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_is_named_never_waited_on(tmp_path, capsys):
    """``--model FIFO`` hung until killed; ``--data FIFO`` said it did not
    exist (found by the attack helper)."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="is not a regular file"):
        load_checkpoint(fifo)
    with pytest.raises(ValueError, match="is not a regular file"):
        gr.Segmenter.load(fifo)
    assert cli.main(["segment", "--model", str(fifo), "abc"]) == 2
    assert "is not a regular file" in capsys.readouterr().err
    assert cli.main(["train", "--data", str(fifo), "--out", str(tmp_path / "r"),
                     "--epochs", "1"]) == 2
    assert "is not a regular file" in capsys.readouterr().err
    from grapheme.plot import read_metrics
    with pytest.raises(ValueError, match="is not a regular file"):
        read_metrics(fifo)


def test_a_model_file_with_arrays_its_configuration_has_no_place_for(tmp_path):
    """An encoder's weights under a configuration without an encoder loaded
    as a model without one, unknown arrays were ignored and version true
    read as 1 (found by the attack helper)."""
    trainer = gr.Trainer(gr.Embedding(8), gr.Morpher(estimator="ste"),
                         gr.StructuralLoss.for_training(), gr.Adam(), progress=False,
                         encoder=gr.Encoder(8, 1))
    trainer.fit(gr.DEMO_PAIRS, 1)
    good = tmp_path / "m.npz"
    trainer.model.save(good)
    arrays, meta = load_checkpoint(good)
    cases = {"no encoder": (arrays, {**meta, "config": {**meta["config"], "encoder": None}}),
             "bogus": ({**arrays, "encoder.bogus": np.zeros(3)}, meta),
             "version": (arrays, {**meta, "version": True})}
    for name, (a, m) in cases.items():
        path = tmp_path / f"{name}.npz"
        save_checkpoint(path, a, m)
        with pytest.raises(ValueError, match="no place for|has no|model version"):
            gr.Segmenter.load(path)
    assert gr.Segmenter.load(good).segment("abc")   # and a training checkpoint loads
    trainer.save(tmp_path / "ck.npz")
    assert gr.Segmenter.load(tmp_path / "ck.npz").segment("abc")


def test_trainer_switches_and_saved_configurations_are_checked(tmp_path):
    """trainer.overwrite = "no" let fit replace the log; a bad setting was
    saved into a checkpoint that could not be loaded back; a refused fit
    had already loaded its resume checkpoint (found by the review helper)."""
    log = tmp_path / "log.jsonl"
    log.write_text("PRECIOUS\n")
    trainer = gr.Trainer(gr.Embedding(8), gr.Morpher(estimator="ste"),
                         gr.StructuralLoss.for_training(), gr.Adam(), progress=False,
                         log=log)
    trainer.overwrite = "no"
    with pytest.raises(TypeError, match="overwrite must be True or False"):
        trainer.fit(gr.DEMO_PAIRS, 1)
    assert log.read_text() == "PRECIOUS\n"
    trainer.overwrite = False
    trainer.morpher.temperature = -1.0
    with pytest.raises(ValueError, match="temperature"):
        trainer.save(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="temperature"):
        trainer.model.save(tmp_path / "bad_model.npz")
    assert not (tmp_path / "bad.npz").exists() and not (tmp_path / "bad_model.npz").exists()
    trainer.morpher.temperature = 0.1
    trainer.log = None
    trainer.fit(gr.DEMO_PAIRS, 1, checkpoint=tmp_path / "ck.npz")
    fresh = gr.Trainer.from_checkpoint(tmp_path / "ck.npz", progress=False)
    fresh.log = tmp_path / "same.npz"
    with pytest.raises(ValueError, match="must be different files"):
        fresh.fit(gr.DEMO_PAIRS, 2, resume=tmp_path / "ck.npz", checkpoint=tmp_path / "same.npz")
    assert fresh.epoch == 1 and fresh._last_checkpoint is None


def test_every_path_argument_is_checked_before_any_work(tmp_path, monkeypatch):
    """A path that is not one (an int would be taken for a file descriptor
    by some of os's functions) is a TypeError, an empty one a ValueError,
    both naming the argument, before any epoch is trained or file written:
    an empty checkpoint path used to be refused only when the first epoch's
    checkpoint was to be written, after that epoch's work."""
    from grapheme.data import load_pairs, read_documents, write_pairs
    from grapheme.plot import plot_run

    monkeypatch.chdir(tmp_path)
    trainer = _trainer()
    calls = [
        ("checkpoint", lambda p: trainer.fit(gr.DEMO_PAIRS, 1, checkpoint=p)),
        ("resume", lambda p: trainer.fit(gr.DEMO_PAIRS, 1, resume=p)),
        ("best", lambda p: trainer.fit(gr.DEMO_PAIRS, 1, val=gr.DEMO_PAIRS, checkpoint="ck.npz",
                                       keep_best="val_loss", best=p)),
        ("log", lambda p: _trainer(log=p)),
        ("path", lambda p: trainer.save(p)),
        ("path", lambda p: trainer.model.save(p)),
        ("path", lambda p: gr.Segmenter.load(p)),
        ("path", lambda p: gr.Trainer.from_checkpoint(p)),
        ("path", lambda p: write_pairs(p, gr.DEMO_PAIRS)),
        ("path", lambda p: load_pairs(p)),
        ("corpus", lambda p: read_documents([p])),
        ("run", lambda p: plot_run(p, "out.png")),
        ("out", lambda p: plot_run("metrics.jsonl", p)),
    ]
    for name, call in calls:
        for bad in (5, 3.5, [b"a"]):
            with pytest.raises(TypeError, match=rf"^{name} must be a str, bytes or "
                                                r"os.PathLike"):
                call(bad)
        with pytest.raises(ValueError, match=rf"^{name} must name a file, got an empty path"):
            call("")
        with pytest.raises(ValueError, match=rf"^{name} must not contain a NUL"):
            call(b"a\0b")
    assert trainer.epoch == 0 and os.listdir(tmp_path) == []
    # assigned after construction: checked when fit starts
    trainer.log = ""
    with pytest.raises(ValueError, match="^log must name a file"):
        trainer.fit(gr.DEMO_PAIRS, 1)
    assert trainer.epoch == 0 and os.listdir(tmp_path) == []


def test_bytes_paths_name_the_same_files_as_str_paths(tmp_path):
    """A bytes path is decoded as os.fsdecode does, so it can be stored in
    a checkpoint's JSON (the best checkpoint's path) and named in messages."""
    root = os.fsencode(tmp_path)
    trainer = _trainer(log=os.path.join(root, b"log.jsonl"))
    trainer.fit(gr.DEMO_PAIRS, 1, val=gr.DEMO_PAIRS, checkpoint=os.path.join(root, b"ck.npz"),
                keep_best="val_loss")
    assert trainer.log == str(tmp_path / "log.jsonl")
    assert trainer.best["path"] == str(tmp_path / "best.npz")
    trainer.model.save(os.path.join(root, b"model.npz"))
    assert sorted(os.listdir(tmp_path)) == ["best.npz", "ck.npz", "log.jsonl", "model.npz"]
    again = gr.Trainer.from_checkpoint(os.path.join(root, b"ck.npz"), progress=False)
    assert again.epoch == 1
    model = gr.Segmenter.load(os.path.join(root, b"model.npz"))
    assert model.segment(["abc"]) == trainer.model.segment(["abc"])


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo (POSIX)")
def test_a_pipe_or_device_is_never_replaced_by_a_file(tmp_path):
    """Found by an attack helper: an empty log that was a FIFO (or a
    character device: /dev/null, as root) was atomically replaced by a
    regular file after the first epoch. Every file written by replacing it
    now refuses what is not a regular file, before any work."""
    from grapheme.data import write_pairs

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    trainer = _trainer(log=fifo, overwrite=True)
    calls = [lambda: trainer.fit(gr.DEMO_PAIRS, 1),
             lambda: _trainer().fit(gr.DEMO_PAIRS, 1, checkpoint=fifo),
             lambda: _trainer().save(fifo, overwrite=True),
             lambda: trainer.model.save(fifo, overwrite=True),
             lambda: write_pairs(fifo, gr.DEMO_PAIRS)]
    for call in calls:
        with pytest.raises(ValueError, match="is not a regular file"):
            call()
    assert trainer.epoch == 0
    assert os.listdir(tmp_path) == ["fifo"] and not os.path.isfile(fifo)


def _edited(tmp_path, source, name, edit):
    """A copy of the checkpoint ``source`` whose arrays and meta ``edit``
    changed, saved as ``name``."""
    arrays, meta = load_checkpoint(source)
    edit(arrays, meta)
    path = tmp_path / name
    save_checkpoint(path, arrays, meta)
    return path


def test_hand_edited_checkpoints_are_refused_cheaply(tmp_path):
    """Found by an attack helper: a model file saying dim = 10**8 drew a
    unknown row of that width (2.4 GB, seconds) before its shapes were
    compared; a generator state out of range printed an OverflowError's
    traceback from `grapheme eval`; a negative Adam second moment loaded,
    and training then 'diverged'."""
    trainer = _trainer(encoder=gr.Encoder(8, layers=2))
    trainer.fit(gr.DEMO_PAIRS, 1, checkpoint=tmp_path / "ck.npz")
    ck = tmp_path / "ck.npz"
    trainer.model.save(tmp_path / "model.npz")

    def config(key, value, part="embedding"):
        def edit(arrays, meta):
            meta["config"][part][key] = value
        return edit

    for source in (ck, tmp_path / "model.npz"):
        for name, edit, match in (
                ("dim.npz", config("dim", 10**8), "embedding dim=100000000"),
                ("edim.npz", config("dim", 10**8, "encoder"), "encoder dim=100000000"),
                ("layers.npz", config("layers", 10**6, "encoder"), "encoder layers=1000000"),
                # an empty table of that width costs the file nothing (review)
                ("empty.npz", lambda arrays, meta: (
                    config("dim", 10**8)(arrays, meta), config("dim", 10**8, "encoder")(
                        arrays, meta), arrays.update({"embedding.weight": np.zeros((0, 10**8)),
                                                      "embedding.codes": np.zeros(0, np.int64)})),
                 r"embedding.weight has shape \(0, 100000000\), not \(V >= 1, dim\)")):
            bad = _edited(tmp_path, source, name, edit)
            for load in (gr.Segmenter.load, gr.Trainer.from_checkpoint):
                if load == gr.Trainer.from_checkpoint and source != ck:
                    continue
                with pytest.raises(ValueError, match=match):
                    load(bad)

    def rng(arrays, meta):
        meta["rng"]["state"]["state"] = -1

    def second_moment(arrays, meta):
        arrays["optimizer.exp_avg_sq.theta"] = np.array(-1.0)

    for name, edit, match in (("rng.npz", rng, "corrupted or truncated: .*out of bounds"),
                              ("moment.npz", second_moment, "negative entries")):
        bad = _edited(tmp_path, ck, name, edit)
        with pytest.raises(ValueError, match=match):
            gr.Trainer.from_checkpoint(bad, progress=False)
        code = cli.main(["eval", "--checkpoint", str(bad), "--data", str(tmp_path)])
        assert code == 2


def test_reinforce_samples_beyond_memory_are_refused_before_the_step():
    """Found by an attack helper: Reinforce(samples=10**6) on 40 pairs
    passed replicate's check of the graph's structure and was then killed
    by the out-of-memory killer (24 GB resident) tiling the features."""
    trainer = gr.Trainer(gr.Embedding(dim=8), gr.Morpher(estimator=gr.Reinforce(samples=10**9)),
                         gr.StructuralLoss(), gr.Adam(lr=1e-2), batch_size=8, progress=False)
    with pytest.raises(MemoryError, match=r"Reinforce\(samples=1000000000\) on \d+ nodes of 8 "
                                          r"features needs"):
        trainer.fit(gr.data.make_pairs(40, tasks="fold"), 1)
    assert trainer.epoch == 0


def test_a_zero_dimensional_array_of_text_is_named():
    """Found by an attack helper: numpy's "iteration over a 0-d array"."""
    model = gr.Segmenter(gr.Embedding(dim=4), gr.Morpher())
    with pytest.raises(TypeError, match="texts must be a str or a sequence of str, got ndarray"):
        model.segment(np.array("abc"))
    assert model.segment(np.array(["abc"]).tolist()) == model.segment(["abc"])


def test_a_full_disk_names_the_file(tmp_path, monkeypatch):
    """Found by an attack helper: "[Errno 28] No space left on device"
    without the file (a write's error names none). The old file stays."""
    import errno

    from grapheme.checkpoint import _atomic_open

    target = tmp_path / "ck.npz"
    target.write_bytes(b"old")
    with pytest.raises(OSError, match="No space left on device") as info:
        with _atomic_open(target) as f:
            f.write(b"new")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["ck.npz"]


# ------------------------------------- found by an attack helper, stop 34
def test_boolean_index_arrays_are_refused_not_read_as_0_and_1():
    # numpy reads a boolean index as a mask; as_index_array read it as the
    # rows 0 and 1, so torch's lookup_message_passing took other rows in
    # its weighted path than in its forward (a wrong edge-weight gradient)
    table = np.arange(6.0).reshape(2, 3)
    with pytest.raises(TypeError, match=r"rows must be an integer array, got dtype bool "
                                         r"\(a mask: np.flatnonzero\(rows\)"):
        gr.ops.Lookup().forward(table, np.array([True, False]))
    with pytest.raises(TypeError, match="offsets must be an integer array, got dtype bool"):
        gr.Graph.chains(np.array([False, True]))
    np.testing.assert_array_equal(gr.ops.Lookup().forward(table, [1, 0])[0].features,
                                  table[[1, 0]])


def test_train_step_checks_its_batch_as_fit_checks_pairs():
    t = gr.Trainer(gr.Embedding(dim=4, seed=0), gr.Morpher(estimator="ste"),
                   gr.StructuralLoss(), gr.Adam(lr=1e-2), progress=False)
    before = t.embedding.weight.copy()
    # each was taken (a segmentation that does not join to its input moved
    # every later text's boundaries in the batch) or failed inside the step
    for targets in ([("a", "c")], [("abcdef",)], [("a", "b", "c")], [("a", 5)], [("a", "")]):
        with pytest.raises(ValueError, match=r"\(inputs, targets\)\[0\]: a tuple target is "
                                             r"a segmentation of the input"):
            t.train_step(["ab"], targets)
    with pytest.raises(ValueError, match="inputs and targets must have the same length, "
                                         "got 2 and 1"):
        t.train_step(["ab", "cd"], ["a"])
    with pytest.raises(ValueError, match="at least one pair"):
        t.train_step([], [])
    with pytest.raises(TypeError, match="targets must be a list, got str"):
        t.train_step(["ab"], "a")
    assert t.embedding.weight.shape[0] == 0 or np.array_equal(t.embedding.weight, before)
    # a list segmentation is a tuple one, as in fit and evaluate
    a = t.train_step(["ab"], [["a", "b"]])
    t2 = gr.Trainer(gr.Embedding(dim=4, seed=0), gr.Morpher(estimator="ste"),
                    gr.StructuralLoss(), gr.Adam(lr=1e-2), progress=False)
    b = t2.train_step(["ab"], [("a", "b")])
    assert {k: v for k, v in a.items() if k != "estimator_variance"} == {
        k: v for k, v in b.items() if k != "estimator_variance"}


def test_vjps_check_their_upstream_gradients():
    ops = gr.ops
    _, saved = ops.HardMerge().forward(gr.Graph.from_text("aabc"), np.ones((4, 3)),
                                       [True, False, False])
    for g in (np.ones((3, 5)), np.ones(3), np.ones((1, 3))):   # (3, 5) gave a (4, 5) gradient
        with pytest.raises(ValueError, match=r"grad_features must have shape \(3, 3\)"):
            ops.HardMerge().vjp(saved, g)
    _, saved = ops.MergeScores(0.1).forward(np.array([0.1, 0.5, 0.9]), np.array(0.0))
    for g in (np.array([1.0]), 1.0):   # broadcast to every edge
        with pytest.raises(ValueError, match=r"grad_logits must have shape \(3,\)"):
            ops.MergeScores(0.1).vjp(saved, g, None)
    with pytest.raises(ValueError, match=r"grad_probability must have shape \(3,\)"):
        ops.MergeScores(0.1).vjp(saved, None, np.ones(4))
    _, saved = ops.BernoulliLogProb().forward(np.array([0.1, 0.5, 0.9]), [True, False, True],
                                              [0, 1, 1], 3)
    for g in (np.ones(5), np.ones(1), 1.0, np.ones((3, 2))):   # 5 was taken
        with pytest.raises(ValueError, match=r"grad_log_prob must have shape \(3,\)"):
            ops.BernoulliLogProb().vjp(saved, g)
    _, saved = ops.RatePenalty(0.5, 1.0).forward(np.array([0.1, 0.5, 0.9]), 4)
    with pytest.raises(TypeError, match="grad_value must be a real-valued array"):
        ops.RatePenalty(0.5, 1.0).vjp(saved, "1")   # was float("1")
    with pytest.raises(ValueError, match=r"grad_value must be a scalar \(0-d\)"):
        ops.RatePenalty(0.5, 1.0).vjp(saved, np.ones(2))
    np.testing.assert_array_equal(ops.RatePenalty(0.5, 1.0).vjp(saved, np.array(2.0))[0],
                                  2 * ops.RatePenalty(0.5, 1.0).vjp(saved, 1.0)[0])


def test_a_segmenter_refuses_a_non_finite_theta_as_forward_does():
    model = gr.Segmenter(gr.Embedding(dim=4, seed=0), gr.Morpher())
    for value in (np.nan, np.inf):
        model.morpher.theta[...] = value   # merged nothing (s > NaN is False)
        with pytest.raises(ValueError, match="theta must be finite"):
            model.segment("abc")


def test_the_relaxed_graph_of_near_certain_merges_is_refused_before_allocating(monkeypatch):
    # up to n (n - 1) / 2 expected edges: 200 000 nodes asked for 444 GiB
    # (the process was killed, or their count overflowed the chain's int32
    # offsets: "negative dimensions"). Here a machine of 64 MiB, so that
    # 3,000 nodes (4.5 M edges) are too many
    from grapheme import _validation

    monkeypatch.setattr(_validation, "_physical_memory", lambda: 2**26)
    n = 3000
    g = gr.Graph.from_text("a" * n)
    with pytest.raises(MemoryError, match=rf"the relaxed graph of {n} nodes \(\d+ expected "
                                          rf"edges: merge probabilities near 1"):
        gr.ops.ChainRelaxation().forward(g, np.ones((n, 1)), np.full(n - 1, 0.99999))


def test_a_relaxed_graph_with_int64_indices_meets_an_int32_target():
    # what a relaxed graph beyond int32's edges is made of: the loss and
    # its gradient take the two index widths together
    g = gr.Graph.from_text("abcabc")
    g64 = gr.Graph(g.indptr.astype(np.int64), g.indices.astype(np.int64), g.labels)
    H = np.random.default_rng(0).normal(size=(6, 4))
    results = []
    for graph in (g, g64):
        r = gr.ops.ChainRelaxation().forward(graph, H, np.full(5, 0.5))[0]
        assert r.graph.indptr.dtype == graph.indptr.dtype
        loss = gr.StructuralLoss()
        res = loss.forward(r.graph.replace(activation=r.features.mean(axis=1)),
                           gr.Graph.from_text("abc"))
        results.append((res.value, loss.backward(res).mass))
    assert results[0][0] == results[1][0]
    np.testing.assert_array_equal(results[0][1], results[1][1])


def test_an_embedding_counts_its_peak_memory_before_its_first_row(monkeypatch):
    # an attack helper's find: the first row's table, gradient and float64
    # draw (24 GB at dim 1e9) were counted as the table and gradient alone
    from grapheme import _validation

    monkeypatch.setattr(_validation, "_physical_memory", lambda: 300_000)
    gr.Embedding(dim=2**13)   # 196 kB at the peak
    with pytest.raises(MemoryError, match=r"Embedding\(dim=16384\) with 1 rows"):
        gr.Embedding(dim=2**14)   # 393 kB (262 kB counted before)


def test_a_metrics_log_with_an_integer_beyond_float_is_named(tmp_path):
    # an attack helper's find: "OverflowError: int too large to convert
    # to float" from the drawing, for a hand-edited log
    from grapheme.plot import read_metrics

    for line in ('{"epoch": 1, "loss": %d}' % 10**400, '{"epoch": %d}' % 10**400):
        (tmp_path / "metrics.jsonl").write_text(line + "\n")
        with pytest.raises(ValueError, match="line 1: (loss|epoch) is beyond the range of a "
                                             "float"):
            read_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1, "loss": %d}\n' % 2**1000)
    assert read_metrics(tmp_path)[0]["loss"] == 2**1000


def test_plot_names_a_value_too_big_to_draw(tmp_path):
    # left from stop 34: matplotlib's "arange: cannot compute length" for
    # +-1e308 (the axis limits overflow); inf and NaN are gaps, drawn
    pytest.importorskip("matplotlib")
    from grapheme.plot import plot_run

    log = tmp_path / "metrics.jsonl"
    log.write_text('{"epoch": 1, "loss": 1e308}\n{"epoch": 2, "loss": -1e300}\n')
    with pytest.raises(ValueError, match=r"loss 1e\+308 in .* is beyond what a plot can "
                                         r"draw \(at most 1e\+300\)"):
        plot_run(tmp_path, tmp_path / "p.png")
    assert not (tmp_path / "p.png").exists()
    log.write_text('{"epoch": 1, "loss": Infinity}\n{"epoch": 2, "loss": NaN}\n'
                   '{"epoch": 3, "loss": -1e300}\n')
    assert plot_run(tmp_path, tmp_path / "p.png") == str(tmp_path / "p.png")


def test_a_step_that_could_never_fit_is_refused_before_it_starts(monkeypatch):
    # an attack helper's find: one training line of 5 M characters made
    # (n, d) arrays that passed their checks one by one, until the process
    # was killed at 24 GB. Here a machine of 10 MB and 416 bytes a character
    from grapheme import _validation

    monkeypatch.setattr(_validation, "_physical_memory", lambda: 10_000_000)
    t = gr.Trainer(gr.Embedding(dim=4, seed=0), gr.Morpher(estimator="ste"),
                   gr.StructuralLoss(), gr.Adam(), progress=False)
    t.train_step(["ab" * 50], ["a"])
    with pytest.raises(MemoryError, match=r"a step on a batch of 30000 characters \(about 416 "
                                          r"bytes each"):
        t.train_step(["ab" * 15_000], ["a"])
    with pytest.raises(MemoryError, match="a step on a batch of 30000 characters"):
        t.evaluate([("ab" * 15_000, "a")])


def test_index_checks_compare_and_never_wrap():
    """An attack helper's find: four inputs crashed the interpreter. The
    checks subtracted or summed int64 values (np.diff, .sum()), which wrap,
    so [0, 3 * 2**61, -2**62, 2] read as non-decreasing and lengths of
    2**62 summed to 2; the kernels then read out of bounds."""
    from grapheme.train.metrics import segmentation_counts

    wrap = [0, 3 * 2**61, -2**62]
    with pytest.raises(ValueError, match="indptr must be non-decreasing"):
        gr.Graph(wrap + [2], [1, 2], [97, 98, 99])
    with pytest.raises(ValueError, match="offsets must be non-decreasing"):
        gr.Graph.chains(wrap + [5])
    g = gr.Graph.from_text("abcde")
    with pytest.raises(ValueError, match="offsets must be non-decreasing"):
        gr.Graph(g.indptr, g.indices, g.labels, offsets=wrap + [5])
    with pytest.raises(ValueError, match=r"segments sum to 18446744073709551618 but the "
                                         r"graph has 2 nodes"):
        gr.segmentation_target(gr.Graph.from_text("ab"), [2**62] * 4 + [2])
    with pytest.raises(ValueError, match="counts must be non-negative and add up"):
        segmentation_counts(gr.MergeHistory([0, 1, 2, 3, 4]), [0, 1, 2, 3, 4, 5], [1],
                            [2**62] * 4 + [1])
    torch = pytest.importorskip("torch")
    import grapheme.torch as gt

    with pytest.raises(ValueError, match="offsets must be non-decreasing"):
        gt.Merge()(torch.randn(5, 8), torch.tensor(wrap + [5]))
    with pytest.raises(ValueError, match="offsets must run from 0 to len"):
        gt.unpack(torch.randn(5, 2), torch.tensor(wrap + [5]))


def test_a_lone_surrogate_in_a_pair_is_named_as_the_pairs():
    # an attack helper's find: "texts[7]", an index into the batch's texts,
    # named nothing the caller gave, and the refused fit had grown the table
    t = gr.Trainer(gr.Embedding(dim=4), gr.Morpher(), gr.StructuralLoss(), gr.Adam(),
                   progress=False)
    pairs = [("ab", "a"), ("cd", "c"), ("ef", "e"), ("gh", "g\ud800")]
    message = r"pairs\[3\]\[1\] contains a lone surrogate at position 1"
    with pytest.raises(ValueError, match=message):
        t.fit(pairs, 1)
    with pytest.raises(ValueError, match=message):
        t.evaluate(pairs)
    with pytest.raises(ValueError, match=message.replace("pairs", "val")):
        t.fit([("ab", "a")], 1, val=pairs)
    with pytest.raises(ValueError, match=r"pairs\[0\]\[0\] contains a lone surrogate"):
        t.fit([("a\udc00b", ("a\udc00", "b"))], 1)
    assert t.embedding.weight.shape == (1, 4)   # the unknown row alone: nothing grew


def test_sizes_beyond_any_machine_are_named():
    # an attack helper's finds: "Python int too large to convert to C long"
    # and torch's allocator error, naming no argument
    with pytest.raises(ValueError, match="segments sum to 18446744073709551618 but the graph "
                                         "has 2 nodes"):
        gr.segmentation_target(gr.Graph.from_text("ab"), [2**64, 2])
    torch = pytest.importorskip("torch")
    import grapheme.torch as gt

    with pytest.raises(MemoryError, match=r"unpack to 1 x 1099511627776 rows \(total_length\)"):
        gt.unpack(torch.randn(5, 2), torch.tensor([0, 5]), total_length=2**40)
    assert gt.unpack(torch.randn(0, 2), torch.tensor([0, 0]), total_length=4).shape == (1, 4, 2)
    with pytest.raises(MemoryError, match=r"unpack to 1 x 1000000 rows"):   # no rows (review)
        gt.unpack(torch.zeros(0, 10**6), torch.tensor([0, 0]), total_length=10**6)
