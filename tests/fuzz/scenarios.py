"""Scenarios that could crash the interpreter, run in a child process.

``python scenarios.py NAME SEED ROUNDS`` runs one scenario; the parent
(``test_crash.py``) asserts that the child exits with status 0: a segfault
(exit -11 / 139), an abort ("double free or corruption", -6) or any escaped
exception fails the test without taking pytest down with it.

Each scenario drives public objects the way ordinary user code can:
arrays changed after they were handed over, arrays handed out and written,
attributes replaced with arrays of the wrong shape, and one object shared
by several threads. Every call must either succeed or raise ``TypeError``
/ ``ValueError`` with a one-line message.
"""
import copy
import pickle
import os
import sys
import tempfile
import threading

import numpy as np

import grapheme as gr
from grapheme import ops


def expect_error(fn, *args, **kwargs):
    """Run ``fn``; a TypeError/ValueError (one line) is fine, so is success."""
    try:
        return fn(*args, **kwargs)
    except (TypeError, ValueError) as exc:
        assert "\n" not in str(exc), repr(exc)
        return None


def must_refuse(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except (TypeError, ValueError) as exc:
        assert "\n" not in str(exc), repr(exc)
        return str(exc)
    raise AssertionError(f"{fn!r} accepted a malformed call")


HUGE = [10**9, -(10**9), 2**31 - 1, 2**31, -1, 2**62]


def _texts(rng, k):
    return ["".join(chr(int(c)) for c in rng.integers(97, 101, size=int(rng.integers(0, 7))))
            for _ in range(k)]


def mutate_after_use(rng, rounds):
    """Caller arrays changed after construction; handed-out arrays written."""
    for _ in range(rounds):
        n = int(rng.integers(1, 12))
        d = int(rng.integers(1, 6))
        src = np.arange(n - 1)
        indptr = np.concatenate([[0], np.cumsum(np.r_[np.ones(n - 1, int), 0])])
        indices = src + 1
        labels = rng.integers(97, 100, size=n)
        feats = rng.normal(size=(n, d))
        weights = rng.random(n - 1)
        mass = rng.random(n)
        g = gr.Graph(indptr, indices, labels, features=feats, weights=weights, mass=mass)
        for arr in (indptr, indices, labels):
            if arr.size:
                arr[int(rng.integers(arr.size))] = HUGE[int(rng.integers(len(HUGE)))]
        feats[...] = np.nan
        weights[...] = -np.inf
        mass[...] = -1.0
        # a deep copy's and an unpickled graph's arrays are read-only too
        for graph in (g, copy.deepcopy(g), pickle.loads(pickle.dumps(g))):
            for name in ("indptr", "indices", "labels", "features", "weights", "mass"):
                arr = getattr(graph, name)
                must_refuse(arr.__setitem__, (0,) * arr.ndim if arr.size else (), 0)
                try:
                    arr.flags.writeable = True
                except ValueError:
                    pass
                else:
                    raise AssertionError(f"Graph.{name} could be made writeable")
        H = rng.normal(size=(n, d))
        for est in ("history", "soft", "ste", "reinforce"):
            m = gr.Morpher(estimator=est)
            # the chain relaxation (soft, ste) refuses a weighted chain
            morphed = m.forward(g if est in ("history", "reinforce")
                                else g.replace(weights=None), H)
            out = morphed.graph
            m.vjp(morphed, grad_features=np.ones(out.features.shape),
                  grad_mass=np.ones(out.num_nodes), grad_weights=np.ones(out.num_edges),
                  grad_log_prob=None if morphed.log_prob is None
                  else np.ones(morphed.log_prob.shape))
            # the result's own arrays are read-only too
            for name in ("indptr", "indices", "features", "mass"):
                must_refuse(getattr(out, name).__setitem__, Ellipsis, 0)
            must_refuse(morphed.history.cluster.__setitem__, 0, 10**8)
            # wrong-shaped upstream gradients never reach a kernel
            must_refuse(m.vjp, morphed, grad_features=np.ones((out.num_nodes + 3, d)))
            must_refuse(m.vjp, morphed, grad_mass=np.ones(out.num_nodes + 5))
            must_refuse(m.vjp, morphed, grad_weights=np.ones(out.num_edges + 7))
        cluster = rng.integers(0, max(1, n // 2), size=n)
        cluster[:max(1, n // 2)] = np.arange(max(1, n // 2))
        h = gr.MergeHistory(cluster)
        cluster[:] = 10**8
        x = rng.normal(size=(n, d))
        h.scatter(h.gather(x))
        for hist in (h, copy.deepcopy(h), pickle.loads(pickle.dumps(h))):
            for name in ("cluster", "indptr", "members", "weights", "node_weights"):
                must_refuse(getattr(hist, name).__setitem__, 0, 10**8)
        must_refuse(h.gather, x, out=h.weights[: h.num_outputs].reshape(-1))
        y = np.zeros((h.num_inputs, d))
        must_refuse(h.scatter, y[: h.num_outputs], out=y)
        res = gr.StructuralLoss().forward(g, g)
        gr.StructuralLoss().backward(res)
        table = rng.normal(size=(5, d))
        rows = rng.integers(0, 5, size=n)
        (_,), saved = ops.Lookup().forward(table, rows)
        rows[:] = 10**9
        ops.Lookup().vjp(saved, np.ones((n, d)))
        must_refuse(ops.Lookup().vjp, saved, np.ones((n + 1, d)))
        must_refuse(ops.Lookup().vjp, saved, np.ones((n, d + 1)))
        must_refuse(ops.Lookup().forward, table, np.array([5]))


def embedding_attributes(rng, rounds):
    """Embedding.weight / grad replaced by arrays of the wrong shape."""
    for _ in range(rounds):
        dim = int(rng.integers(1, 9))
        e = gr.Embedding(dim=dim)
        e.forward(rng.integers(97, 110, size=6))
        V = e.weight.shape[0]
        for bad in (np.zeros((1, dim)), np.zeros((V, dim + 1)), np.zeros((V + 50, dim)),
                    np.zeros((V, dim), np.float32), np.zeros((V, dim))[:, ::-1], [[0.0]]):
            e.grad = bad
            usable = (isinstance(bad, np.ndarray) and bad.dtype == np.float64
                      and bad.shape == (V, dim) and bad.flags.c_contiguous)
            (expect_error if usable else must_refuse)(e.backward, [99], np.ones((1, dim)))
            e.zero_grad()
            e.weight = bad
            if isinstance(bad, np.ndarray) and bad.shape == (V, dim) and bad.dtype == np.float64:
                expect_error(e.forward, [120])   # a strided table is fine to read
            else:
                must_refuse(e.forward, [120])
            e.weight = np.zeros((V, dim))
            e.zero_grad()
        must_refuse(e.backward, [97, 98], np.ones((3, dim)))
        must_refuse(e.backward, [97], np.full((1, dim), np.nan))
        must_refuse(e.forward, [0x110000])


def embedding_threads(rng, rounds):
    """One Embedding shared by threads: grow, read, accumulate, reset, save."""
    for _ in range(rounds):
        dim = int(rng.choice([1, 7, 256, 2048]))
        e = gr.Embedding(dim=dim)
        errors = []

        def work(i):
            try:
                for r in range(4):
                    lo = 1000 + 16 * i + 7 * r
                    e.backward(np.arange(lo, lo + 64), np.ones((64, dim)))
                    h = e.forward(np.arange(5000 + 11 * i + r, 5090 + 11 * i))
                    assert h.shape[1] == dim
                    if r == 2 and i == 0:
                        e.zero_grad()
                    state = e.state_dict()
                    assert state["weight"].shape == (state["codes"].shape[0], dim)
            except BaseException as exc:   # reported by the main thread
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        codes = e.codes
        assert np.unique(codes).shape[0] == codes.shape[0]
        assert e.weight.shape == e.grad.shape == (codes.shape[0], dim)
        # every row is the one a fresh table would draw for its code point
        fresh = gr.Embedding(dim=dim)
        np.testing.assert_array_equal(fresh.forward(codes), e.weight)
        gr.Embedding.from_state(e.state_dict())


def shared_readers(rng, rounds):
    """Read-only use of shared graphs, histories, morphers and losses."""
    for _ in range(rounds):
        texts = _texts(rng, 6) + ["ab"]
        g = gr.Graph.from_texts(texts)
        H = rng.normal(size=(g.num_nodes, 8))
        morpher = gr.Morpher(estimator=str(rng.choice(["history", "soft", "ste"])))
        morphed = morpher.forward(g, H)
        loss = gr.StructuralLoss()
        target = gr.Graph.from_texts(texts)
        res = loss.forward(morphed.graph, target)
        h = morphed.history
        ref = (morpher.vjp(morphed, grad_features=np.ones(morphed.graph.features.shape)),
               loss.backward(res), h.gather(H))
        errors = []

        def work():
            try:
                for _ in range(5):
                    got = morpher.vjp(morphed,
                                      grad_features=np.ones(morphed.graph.features.shape))
                    np.testing.assert_array_equal(got.features, ref[0].features)
                    np.testing.assert_array_equal(loss.backward(res).mass, ref[1].mass)
                    np.testing.assert_array_equal(h.gather(H), ref[2])
                    morpher.forward(g, H)
                    h.scatter(ref[2])
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors


def trainer_threads(rng, rounds):
    """One Trainer shared by threads: evaluations beside evaluations, beside
    training steps, and a save. They share the trainer's workspace, so they
    take turns: evaluations of an untouched model all give its numbers."""
    with tempfile.TemporaryDirectory() as folder:
        _trainer_threads(rng, max(1, rounds // 10), os.path.join(folder, "run.npz"))


def _trainer_threads(rng, rounds, path):
    for _ in range(rounds):
        dim = int(rng.choice([4, 16]))
        tr = gr.Trainer(gr.Embedding(dim=dim), gr.Morpher(estimator="ste"),
                        gr.StructuralLoss.for_training(), gr.Adam(lr=1e-2), progress=False,
                        encoder=gr.Encoder(dim, layers=int(rng.integers(0, 3))))
        short = [("abcabc", "abc")] * 8
        long_ = [("thequickbrownfox" * int(rng.integers(5, 20)), "the")] * 8
        ref = {id(p): tr.evaluate(p) for p in (short, long_)}
        errors = []

        def evaluate(pairs):
            try:
                for _ in range(10):
                    assert tr.evaluate(pairs) == ref[id(pairs)]
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=evaluate, args=(p,))
                   for p in (short, long_, short, long_)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors

        def train():
            try:
                for _ in range(5):
                    tr.train_step(*zip(*long_))
            except BaseException as exc:
                errors.append(exc)

        def look():
            try:
                for _ in range(5):
                    tr.evaluate(short)
                    tr.save(path, overwrite=True)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=train), threading.Thread(target=look)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        gr.Trainer.from_checkpoint(path, progress=False)

        # saves while fit runs epochs: each one loads (a save between an
        # epoch's count and its record wrote one that did not)
        def fit():
            try:
                tr.fit(short * 2, tr.epoch + 30)
            except BaseException as exc:
                errors.append(exc)

        runner = threading.Thread(target=fit)
        runner.start()
        try:
            while runner.is_alive():
                tr.save(path, overwrite=True)
                gr.Trainer.from_checkpoint(path, progress=False)
        finally:
            runner.join()
        assert not errors, errors


SCENARIOS = {f.__name__: f for f in (mutate_after_use, embedding_attributes,
                                     embedding_threads, shared_readers, trainer_threads)}


if __name__ == "__main__":
    name, seed, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    SCENARIOS[name](np.random.default_rng(seed), rounds)
    print("ok")
