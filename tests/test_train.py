"""Tests for grapheme.train.Trainer: descent, metrics, logs, exact resume."""
import json
import os
import re
import sys

import numpy as np
import pytest

import grapheme as gr

from grapheme import Embedding, Graph, MergeHistory, Morpher, Reinforce
from grapheme.checkpoint import load_checkpoint, save_checkpoint
from grapheme.data import DEMO_PAIRS, make_pairs
from grapheme.loss import StructuralLoss
from grapheme.optim import SGD, Adam
from grapheme.train import TIMING_KEYS, Trainer
from grapheme.train.metrics import structure_match as _structure_match


def make_trainer(dim=16, lr=1e-2, batch_size=8, seed=0, **kwargs):
    return Trainer(Embedding(dim=dim, seed=seed), Morpher(), StructuralLoss(),
                   Adam(lr=lr), batch_size=batch_size, seed=seed, **kwargs)


def strip_timing(history):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in history]


def test_descent_on_demo_pairs():
    """abc->ab, xyz->xy, 123->12 with the history estimator (DESIGN.md).

    The loss after each of 20 epochs is compared with the loss before it
    (measured with ``evaluate``, so each value is the full-data loss at the
    current parameters).
    """
    trainer = make_trainer(dim=64, lr=3e-3, batch_size=3)
    history = trainer.fit(DEMO_PAIRS, 20, val=DEMO_PAIRS)
    # the untrained model (its table holding the training characters), then
    # every epoch's; evaluate gives the same numbers (it changes nothing)
    losses = [trainer.baseline["val_loss"]] + [r["val_loss"] for r in history]
    assert trainer.evaluate(DEMO_PAIRS)["loss"] == losses[-1]
    decreases = int(np.sum(np.diff(losses) < 0))
    assert decreases >= 18, losses
    assert losses[-1] < losses[0]
    # Measured: 1.6281 -> 1.5881, decreasing in all 20 epochs.
    assert losses[-1] < losses[0] - 0.02


def test_history_records_and_log(tmp_path):
    pairs = make_pairs(40, seed=1)
    log = tmp_path / "run" / "metrics.jsonl"
    trainer = make_trainer(log=log)
    history = trainer.fit(pairs, 3, val=pairs[:10])
    assert [r["epoch"] for r in history] == [1, 2, 3]
    keys = {"epoch", "loss", "node", "edge", "clique", "kept_fraction", "tau", "grad_norm",
            "time", "examples_per_s", "chars_per_s", "val_loss", "val_kept_fraction",
            "val_accuracy", "estimator_variance"}
    for r in history:
        assert set(r) == keys
        assert r["estimator_variance"] is None  # a deterministic estimator
        assert 0.0 <= r["kept_fraction"] <= 1.0 and 0.0 <= r["val_accuracy"] <= 1.0
        assert r["tau"] == pytest.approx(1 / (1 + np.exp(-0.8)))
        assert r["grad_norm"] > 0 and r["examples_per_s"] > 0 and r["chars_per_s"] > 0
        # The loss is the weighted sum of its terms.
        assert r["loss"] == pytest.approx(r["node"] + 0.5 * r["edge"] + 2.0 * r["clique"],
                                          rel=1e-12)
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert lines == history
    # A fresh fit (no resume) does not replace another run's log unasked ...
    before = log.read_bytes()
    with pytest.raises(ValueError, match=r"log '.*metrics.jsonl' already exists; a fresh "
                                         r"run does not replace another run's files"):
        make_trainer(log=log).fit(pairs, 1)
    assert log.read_bytes() == before
    # ... and told to, it replaces it once its first epoch is done.
    make_trainer(log=log, overwrite=True).fit(pairs, 1)
    assert len(log.read_text().splitlines()) == 1


def test_epoch_metrics_match_a_manual_loop():
    """Per-epoch loss = mean over pairs of the batch losses, shuffled by seed."""
    pairs = make_pairs(10, seed=2)
    trainer = make_trainer(batch_size=4, seed=5)
    history = trainer.fit(pairs, 1)
    ref = make_trainer(batch_size=4, seed=5)
    order = np.random.default_rng(5).permutation(10)
    total = 0.0
    for lo in range(0, 10, 4):
        idx = order[lo:lo + 4]
        stats = ref.train_step([pairs[i][0] for i in idx], [pairs[i][1] for i in idx])
        total += len(idx) * stats["loss"]
    assert history[0]["loss"] == total / 10
    # fit gives every training character its row first (rows in another
    # order than the steps would add them, with the same values)
    np.testing.assert_array_equal(trainer.embedding.forward(ref.embedding.codes),
                                  ref.embedding.weight)


def test_runs_are_deterministic():
    pairs = make_pairs(30, seed=3)
    a, b = make_trainer(), make_trainer()
    ha, hb = a.fit(pairs, 2), b.fit(pairs, 2)
    assert strip_timing(ha) == strip_timing(hb)
    np.testing.assert_array_equal(a.embedding.weight, b.embedding.weight)


@pytest.mark.parametrize("make_opt, make_morpher", [
    (lambda: Adam(lr=1e-2, weight_decay=1e-3), Morpher),
    (lambda: SGD(lr=0.5, momentum=0.9), Morpher),
    # sampling state (generator, running baseline) must survive the resume too
    (lambda: Adam(lr=1e-2), lambda: Morpher(estimator=Reinforce(seed=3))),
    (lambda: Adam(lr=1e-2), lambda: Morpher(estimator=Reinforce(baseline="loo", samples=3,
                                                                seed=3))),
    (lambda: Adam(lr=1e-2), lambda: Morpher(estimator="ste", rate=0.7)),
], ids=["adam", "sgd", "reinforce-mean", "reinforce-loo", "ste-rate"])
def test_resume_is_bit_identical(tmp_path, make_opt, make_morpher):
    pairs = make_pairs(50, seed=4)
    val = make_pairs(12, seed=5)

    def trainer(log):
        return Trainer(Embedding(dim=16, seed=1), make_morpher(), StructuralLoss(),
                       make_opt(), batch_size=8, seed=7, log=log)

    straight = trainer(tmp_path / "a.jsonl")
    h_straight = straight.fit(pairs, 4, val=val)

    first = trainer(tmp_path / "b.jsonl")
    first.fit(pairs, 2, val=val, checkpoint=tmp_path / "ckpt.npz")
    resumed = trainer(tmp_path / "b.jsonl")   # a fresh process would build this
    h_resumed = resumed.fit(pairs, 4, val=val, checkpoint=tmp_path / "ckpt.npz",
                            resume=tmp_path / "ckpt.npz")

    np.testing.assert_array_equal(resumed.embedding.weight, straight.embedding.weight)
    np.testing.assert_array_equal(resumed.embedding.codes, straight.embedding.codes)
    assert resumed.morpher.theta == straight.morpher.theta
    s1, s2 = straight.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert s1.keys() == s2.keys()
    for k in s1:
        np.testing.assert_array_equal(s1[k], s2[k])
    assert strip_timing(h_resumed) == strip_timing(h_straight)
    log_a = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    log_b = [json.loads(x) for x in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert strip_timing(log_a) == strip_timing(log_b)
    _, meta = load_checkpoint(tmp_path / "ckpt.npz")
    assert meta["epoch"] == 4


def test_from_checkpoint_rebuilds_everything(tmp_path):
    pairs = make_pairs(20, seed=6)
    t = make_trainer(dim=8, lr=0.05, batch_size=5, seed=3)
    t.fit(pairs, 2, checkpoint=tmp_path / "c.npz")
    u = Trainer.from_checkpoint(tmp_path / "c.npz", progress=False)
    assert u.epoch == 2 and u.batch_size == 5 and u.seed == 3
    assert u.optimizer.lr == 0.05 and u.embedding.dim == 8
    assert u.evaluate(pairs) == t.evaluate(pairs)
    t.fit(pairs, 3)
    u.fit(pairs, 3)
    np.testing.assert_array_equal(u.embedding.weight, t.embedding.weight)


def test_resume_rejects_other_configuration(tmp_path):
    pairs = make_pairs(10, seed=0)
    make_trainer(batch_size=4).fit(pairs, 1, checkpoint=tmp_path / "c.npz")
    with pytest.raises(ValueError, match="different configuration.*batch_size"):
        make_trainer(batch_size=5).fit(pairs, 2, resume=tmp_path / "c.npz")
    with pytest.raises(ValueError, match="different configuration.*embedding"):
        make_trainer(batch_size=4, dim=8).fit(pairs, 2, resume=tmp_path / "c.npz")


def test_a_resumed_run_replaces_only_its_own_files(tmp_path):
    """An attack helper's find: a run resumed from one checkpoint wrote over
    another run's checkpoint and log, or rewound its own from a later
    epoch (resumed from an earlier copy), without overwrite=True."""
    pairs = make_pairs(10, seed=0)
    a, victim = tmp_path / "a", tmp_path / "victim"
    make_trainer(log=a / "m.jsonl").fit(pairs, 2, checkpoint=a / "c.npz")
    make_trainer(seed=1, log=victim / "m.jsonl").fit(pairs, 3, checkpoint=victim / "c.npz")
    saved = {p: p.read_bytes() for p in (victim / "c.npz", victim / "m.jsonl")}
    for log, ckpt, what in ((victim / "m.jsonl", tmp_path / "new.npz", "log"),
                            (tmp_path / "new.jsonl", victim / "c.npz", "checkpoint")):
        t = gr.Trainer.from_checkpoint(a / "c.npz", log=log, progress=False)
        with pytest.raises(ValueError, match=re.escape(
                f"{what} {str(victim / ('m.jsonl' if what == 'log' else 'c.npz'))!r} "
                "is not this run's at or before its epoch 2")):
            t.fit(pairs, 4, checkpoint=ckpt)
    assert {p: p.read_bytes() for p in saved} == saved and not (tmp_path / "new.npz").exists()
    # a later epoch of this very run: resumed from a copy of epoch 2, it
    # would rewind epochs 3-4 of the run's checkpoint and log
    (tmp_path / "two.npz").write_bytes((a / "c.npz").read_bytes())
    make_trainer(log=a / "m.jsonl").fit(pairs, 4, checkpoint=a / "c.npz", resume=a / "c.npz")
    t = gr.Trainer.from_checkpoint(tmp_path / "two.npz", log=a / "m.jsonl", progress=False)
    with pytest.raises(ValueError, match="is not this run's at or before its epoch 2"):
        t.fit(pairs, 5, checkpoint=a / "c.npz")
    # its own files at its epoch, a torn last log line (a killed run), and
    # overwrite=True go on
    with open(a / "m.jsonl", "a", encoding="utf-8") as f:
        f.write('{"epoch": 5, "lo')
    t = gr.Trainer.from_checkpoint(a / "c.npz", log=a / "m.jsonl", progress=False)
    assert len(t.fit(pairs, 5, checkpoint=a / "c.npz")) == 5
    t = gr.Trainer.from_checkpoint(tmp_path / "two.npz", log=victim / "m.jsonl",
                                   progress=False, overwrite=True)
    t.fit(pairs, 3, checkpoint=victim / "c.npz")
    assert load_checkpoint(victim / "c.npz")[1]["epoch"] == 3


def test_resume_from_corrupted_checkpoint(tmp_path):
    pairs = make_pairs(10, seed=0)
    path = tmp_path / "c.npz"
    make_trainer().fit(pairs, 1, checkpoint=path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"checkpoint .*c\.npz' is corrupted or truncated"):
        make_trainer().fit(pairs, 2, resume=path)
    # Missing arrays.
    save_checkpoint(path, {"morpher.theta": np.array(0.8)}, {"epoch": 1})
    with pytest.raises(ValueError, match=r"missing array\(s\)"):
        make_trainer().fit(pairs, 2, resume=path)
    with pytest.raises(FileNotFoundError):
        make_trainer().fit(pairs, 2, resume=tmp_path / "none.npz")
    # a checkpoint without a configuration is named so (it was "unusable
    # configuration: 'config'", or "'NoneType' object is not subscriptable":
    # an attack helper's find)
    path = tmp_path / "whole.npz"
    make_trainer().fit(pairs, 1, checkpoint=path)
    arrays, meta = load_checkpoint(path)
    for config, what in ((None, "null"), ([1], "a JSON list"), (KeyError, "missing")):
        changed = {k: v for k, v in meta.items() if k != "config"}
        if config is not KeyError:
            changed["config"] = config
        save_checkpoint(path, arrays, changed)
        with pytest.raises(ValueError, match=rf"has no configuration \(its 'config' is {what}\)"):
            gr.Trainer.from_checkpoint(path, progress=False)
    # a bad comm is the caller's, not the checkpoint's (it read as "checkpoint
    # ... has an unusable configuration: comm must be ...": an attack helper's find)
    with pytest.raises(TypeError, match=r"^comm must be a grapheme.distributed.Communicator "
                                        r"or None, got int$"):
        gr.Trainer.from_checkpoint(path, progress=False, comm=5)


def test_fit_makes_the_checkpoint_directory_first(tmp_path):
    path = tmp_path / "new" / "sub" / "c.npz"
    best = tmp_path / "other" / "best.npz"
    pairs = make_pairs(10, seed=0)
    make_trainer().fit(pairs, 1, val=pairs, checkpoint=path, keep_best="val_loss", best=best)
    assert path.is_file() and best.is_file()


def test_training_a_huge_encoder_is_refused_up_front(monkeypatch):
    from grapheme import _validation

    enc = gr.Encoder(8, layers=1)
    need = 4 * sum(v.nbytes for v in enc.params.values())   # weights, grads, 2 moments

    def trainer():
        return gr.Trainer(gr.Embedding(dim=8), gr.Morpher(), gr.StructuralLoss(), gr.Adam(),
                          encoder=enc, progress=False)
    monkeypatch.setattr(_validation, "_physical_memory", lambda: need - 1)
    with pytest.raises(MemoryError, match=r"training Encoder\(dim=8, layers=1\)"):
        trainer()
    monkeypatch.setattr(_validation, "_physical_memory", lambda: need)
    trainer()


def test_embedding_growth_between_fits():
    trainer = make_trainer()
    trainer.fit([("aab", "ab")], 2)
    rows = trainer.embedding.weight.shape[0]
    trainer.fit([("aab", "ab"), ("żółw", "żół")], 4)
    assert trainer.embedding.weight.shape[0] == rows + 4
    state = trainer.optimizer.state_dict()
    assert state["exp_avg.embedding"].shape == trainer.embedding.weight.shape


def test_graph_target_activation_is_one_for_every_target_node():
    """"graph" scores the targets with activation 1: the loss equals
    "embedding"'s where the targets' rows have mean 1, and the gradients
    differ only by the target side's, a constant along each target row (a
    row mean's vjp), which "graph" has not. The inputs' rows have mean 0.3,
    off the kink of min(|x - y|, 1)."""
    pairs = [("abc", "xy"), ("cab", "yx")]
    trainers, before = [], []
    for activation in ("graph", "embedding"):
        trainer = Trainer(Embedding(dim=8, seed=0), Morpher(estimator="ste"), StructuralLoss(),
                          SGD(lr=1.0), target_activation=activation, seed=0)
        rows = trainer.embedding.rows([ord(c) for c in "abcxy"])
        w = trainer.embedding.weight
        w -= w.mean(axis=1, keepdims=True) - 0.3
        w[rows[3:]] += 0.7                     # the targets' rows: mean 1
        trainers.append(trainer)
        before.append(w.copy())
    graph, table = trainers
    assert graph.evaluate(pairs)["loss"] == table.evaluate(pairs)["loss"]
    steps = [t.train_step(*zip(*pairs)) for t in trainers]
    assert steps[0]["loss"] == steps[1]["loss"]
    grads = [b - t.embedding.weight for b, t in zip(before, trainers)]   # SGD, lr 1
    target_side = grads[1] - grads[0]
    np.testing.assert_allclose(target_side[rows[:3]], 0, atol=1e-15)
    np.testing.assert_allclose(target_side[rows[3:]].std(axis=1), 0, atol=1e-15)
    assert np.abs(target_side[rows[3:]]).min() > 1e-3
    assert graph.morpher.theta == pytest.approx(table.morpher.theta, rel=1e-12)


@pytest.mark.parametrize("activation", ["embedding", "graph"])
def test_fit_and_train_step_give_the_same_characters_rows(activation):
    """A maintainability review's find: the rule was written three times
    and fit gave target-only characters rows under "graph", which reads
    no row of a target, while train_step did not."""
    from grapheme.embedding import UNKNOWN

    pairs = [("ab", "xy")]
    fitted = make_trainer(target_activation=activation, progress=False)
    fitted.fit(pairs, 1)
    stepped = make_trainer(target_activation=activation)
    stepped.train_step(["ab"], ["xy"])
    expected = {"a", "b"} | ({"x", "y"} if activation == "embedding" else set())
    for trainer in (fitted, stepped):
        codes = trainer.embedding.codes
        assert {chr(c) for c in codes[codes != UNKNOWN]} == expected


def test_structure_match():
    g = Graph.from_texts(["abc", "xy", ""])
    history = MergeHistory([0, 0, 1, 2, 3])          # ab|c, x, y
    target = Graph.from_texts(["ac", "x", ""])
    assert _structure_match(g, history, target).tolist() == [True, False, True]
    target = Graph.from_texts(["ab", "xy", "q"])
    assert _structure_match(g, history, target).tolist() == [False, True, False]


def test_evaluate_does_not_train():
    trainer = make_trainer()
    trainer.fit(DEMO_PAIRS, 1)
    before = trainer.embedding.weight.copy()
    r1 = trainer.evaluate(DEMO_PAIRS)
    r2 = trainer.evaluate(DEMO_PAIRS, batch_size=1)
    np.testing.assert_array_equal(trainer.embedding.weight, before)
    assert r1["loss"] == pytest.approx(r2["loss"], rel=1e-12)
    assert set(r1) == {"loss", "node", "edge", "clique", "kept_fraction", "accuracy"}


def test_a_loss_checkpoints_cannot_record_is_refused_before_the_first_epoch(tmp_path):
    """A newcomer's find: a loss of one's own (the documented forward and
    backward) trained a whole epoch, then failed writing the checkpoint."""
    class Wrapped:   # forward and backward, no get_params
        def __init__(self):
            self.inner = StructuralLoss()

        def forward(self, predicted, target, **kwargs):
            return self.inner.forward(predicted, target, **kwargs)

        def backward(self, result, grad=1.0):
            return self.inner.backward(result, grad)

    class Mine(StructuralLoss):   # get_params, but not a type checkpoints know
        pass

    pairs = [("aab", "ab")] * 4
    for loss, match in ((Wrapped(), "loss Wrapped has no get_params"),
                        (Mine(), "loss Mine cannot be reloaded from a checkpoint")):
        t = Trainer(Embedding(8), Morpher(), loss, Adam(), progress=False)
        with pytest.raises(TypeError, match=match):
            t.fit(pairs, 1, checkpoint=tmp_path / "ck.npz")
        assert t.epoch == 0 and not (tmp_path / "ck.npz").exists()
        assert len(t.fit(pairs, 1)) == 1   # without a checkpoint it trains


def test_validation():
    emb, morpher, loss, opt = Embedding(8), Morpher(), StructuralLoss(), Adam()
    with pytest.raises(TypeError, match="embedding must be"):
        Trainer(None, morpher, loss, opt)
    with pytest.raises(TypeError, match="morpher must be"):
        Trainer(emb, None, loss, opt)
    with pytest.raises(TypeError, match="loss must have"):
        Trainer(emb, morpher, None, opt)
    with pytest.raises(TypeError, match=r"got the class StructuralLoss: pass StructuralLoss\(\)"):
        Trainer(emb, morpher, StructuralLoss, opt)   # fit failed with a missing 'target'
    with pytest.raises(TypeError, match="optimizer must be"):
        Trainer(emb, morpher, loss, "adam")
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        Trainer(emb, morpher, loss, opt, batch_size=0)
    with pytest.raises(ValueError, match="seed must be >= 0, got -1"):
        Trainer(emb, morpher, loss, opt, seed=-1)
    with pytest.raises(TypeError, match="seed must be an integer, got str"):
        Trainer(emb, morpher, loss, opt, seed="0")
    with pytest.raises(ValueError, match="target_activation"):
        Trainer(emb, morpher, loss, opt, target_activation="ones")
    t = Trainer(emb, morpher, loss, opt)
    with pytest.raises(ValueError, match="pairs must not be empty"):
        t.fit([], 1)
    with pytest.raises(TypeError, match="pairs must be a list"):
        t.fit("abc", 1)
    with pytest.raises(ValueError, match=r"pairs\[1\] must be an \(input, target\) pair"):
        t.fit([("a", "b"), ("c",)], 1)
    with pytest.raises(TypeError, match=r"pairs\[0\] must hold two str \(or a str and a "
                                        r"tuple or list of segments\)"):
        t.fit([("a", 3)], 1)
    with pytest.raises(ValueError, match="epochs must be >= 0"):
        t.fit(DEMO_PAIRS, -1)
    with pytest.raises(ValueError, match="val must not be empty"):
        t.fit(DEMO_PAIRS, 1, val=[])
    with pytest.raises(ValueError, match="lone surrogate"):
        t.fit([("a\ud800", "a")], 1)
    assert t.epoch == 0 and t.history == []


@pytest.mark.parametrize("baseline, samples", [("mean", 1), ("loo", 4), (None, 1)])
def test_reinforce_trainer_reports_estimator_variance(baseline, samples):
    morpher = Morpher(estimator=Reinforce(baseline=baseline, samples=samples, seed=1))
    trainer = Trainer(Embedding(dim=16), morpher, StructuralLoss(), Adam(lr=1e-2),
                      batch_size=8, seed=0)
    pairs = make_pairs(32, seed=2)
    history = trainer.fit(pairs, 2)
    for r in history:
        assert r["estimator_variance"] is not None and r["estimator_variance"] > 0
        assert np.isfinite(r["loss"])
    # evaluation is deterministic: it neither samples nor advances the generator
    state = morpher.state_dict()
    assert trainer.evaluate(pairs) == trainer.evaluate(pairs)
    assert morpher.state_dict() == state


def test_predict_is_the_hard_morph_for_every_estimator():
    g = Graph.from_texts(["aabbc", "xyz"])
    H = Embedding(dim=8, seed=2).forward(g.labels)
    ref = Morpher(threshold=-1.0).forward(g, H)
    for est in ("history", "soft", "ste", "reinforce"):
        m = Morpher(threshold=-1.0, estimator=est)
        out = m.predict(g, H)
        np.testing.assert_array_equal(out.history.cluster, ref.history.cluster)
        np.testing.assert_array_equal(out.graph.features, ref.graph.features)
        assert out.graph.num_nodes == ref.graph.num_nodes


@pytest.mark.parametrize("key,value,exc", [("batch_size", 0, ValueError),
                                           ("batch_size", "8", TypeError),
                                           ("target_activation", "ones", ValueError),
                                           ("unknown_prob", 1.0, ValueError)])
def test_settings_assigned_later_are_checked(key, value, exc, tmp_path):
    """Before: batch_size = 0 failed in fit with a ZeroDivisionError."""
    trainer = make_trainer()
    setattr(trainer, key, value)
    pairs = [("abc", "ab"), ("xyz", "xy")]
    for call in (lambda: trainer.fit(pairs, 1), lambda: trainer.train_step(["abc"], ["ab"]),
                 lambda: trainer.evaluate(pairs)):
        with pytest.raises(exc, match=key):
            call()
    assert trainer.epoch == 0 and trainer.history == []
    setattr(trainer, key, {"batch_size": 1, "target_activation": "graph",
                           "unknown_prob": 0.5}[key])
    trainer.fit(pairs, 1)
    assert getattr(trainer, key) == {"batch_size": 1, "target_activation": "graph",
                                     "unknown_prob": 0.5}[key]


def test_the_seed_cannot_be_assigned_after_construction():
    """Before: assigning it changed the unknown row's draws and the saved
    configuration but not the shuffle, which was seeded at construction."""
    trainer = make_trainer(seed=3)
    with pytest.raises(AttributeError, match="seed"):
        trainer.seed = 4
    assert trainer.seed == 3 and trainer.config()["seed"] == 3


def test_morpher_state_roundtrip_and_validation():
    m = Morpher(estimator=Reinforce(seed=5))
    g = Graph.from_text("abcdefghijklmnop")
    H = Embedding(dim=4).forward(g.labels)
    first = m.forward(g, H)
    m.step(first, np.array([0.5]))
    state = json.loads(json.dumps(m.state_dict()))  # survives JSON (checkpoint meta)
    a = m.forward(g, H).decisions
    m2 = Morpher(estimator=Reinforce(seed=5))
    assert np.array_equal(m2.forward(g, H).decisions, first.decisions)
    m2.load_state_dict(state)
    np.testing.assert_array_equal(m2.forward(g, H).decisions, a)
    with pytest.raises(ValueError, match="not a Morpher state"):
        m2.load_state_dict({"theta": 0.1})


# -------------------------------------------------- segmentation metrics, keep_best
def runs_pairs(n, seed):
    """Segment a string into its runs of one letter: the untrained model
    (identical neighbours always merge) does it exactly."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        letters = rng.choice(list("abcdef"), size=int(rng.integers(2, 5)), replace=False)
        segs = tuple(c * int(k) for c, k in zip(letters, rng.integers(1, 4, len(letters))))
        pairs.append(("".join(segs), segs))
    return pairs


def test_evaluate_reports_segmentation_metrics():
    t = make_trainer()
    # the untrained model with rows for these characters (not the unknown row)
    t.embedding.rows(Graph.from_text("abcdefthequickfox123xyz").labels)
    assert "boundary_f1" not in t.evaluate(DEMO_PAIRS)
    r = t.evaluate(runs_pairs(20, 0))   # a batch holds segmentations or texts, not both
    assert (r["seg_accuracy"], r["boundary_precision"], r["boundary_recall"],
            r["boundary_f1"]) == (1.0, 1.0, 1.0, 1.0)
    # nothing merges in "thequickfox" at init: every position is a boundary
    r = t.evaluate([("thequickfox", ("the", "quick", "fox"))])
    assert r["boundary_precision"] == 0.2 and r["boundary_recall"] == 1.0
    assert r["seg_accuracy"] == 0.0
    assert r["boundary_f1"] == pytest.approx(1 / 3, rel=1e-15)


def test_keep_best_never_ends_below_the_start(tmp_path):
    """Runs segmentation is solved before training; a large learning rate
    spoils it. best.npz stays the untrained model, whatever the last epoch."""
    train, val = runs_pairs(64, 1), runs_pairs(32, 2)
    t = make_trainer(lr=0.5)
    history = t.fit(train, 6, val=val, checkpoint=tmp_path / "last.npz",
                    keep_best="val_boundary_f1")
    f1 = [r["val_boundary_f1"] for r in history]
    assert min(f1) < 1.0                              # training made it worse
    assert t.best["epoch"] == 0 and t.best["value"] == 1.0
    best = Trainer.from_checkpoint(tmp_path / "best.npz", progress=False)
    assert best.epoch == 0 and best.evaluate(val)["boundary_f1"] == 1.0


def test_an_overwriting_run_replaces_no_file_before_its_first_epoch(tmp_path):
    """With overwrite=True a fresh run's files replace another run's only
    once its first epoch is done, the best checkpoint too (it used to be
    written before the first epoch, the untrained model's): a run stopped
    in its first epoch leaves the other run's three files as they were.
    Run to its end, its best checkpoint is still the untrained model."""
    train, val = runs_pairs(64, 1), runs_pairs(32, 2)
    names = ("last.npz", "best.npz", "log.jsonl")
    for name in names:
        (tmp_path / name).write_bytes(b"another run's " + name.encode())

    def fit(trainer):
        return trainer.fit(train, 2, val=val, checkpoint=tmp_path / "last.npz",
                           keep_best="val_boundary_f1")

    t = make_trainer(lr=0.5, overwrite=True, log=tmp_path / "log.jsonl", progress=False)
    original = t._run_epoch

    def interrupted(*args):
        original(*args)
        raise KeyboardInterrupt
    t._run_epoch = interrupted
    with pytest.raises(KeyboardInterrupt) as info:
        fit(t)
    assert not getattr(info.value, "__notes__", [])   # nothing of this run is saved yet
    for name in names:
        assert (tmp_path / name).read_bytes() == b"another run's " + name.encode()
    t = make_trainer(lr=0.5, overwrite=True, log=tmp_path / "log.jsonl", progress=False)
    fit(t)
    assert t.best["epoch"] == 0
    best = Trainer.from_checkpoint(tmp_path / "best.npz", progress=False)
    assert best.epoch == 0 and best.evaluate(val)["boundary_f1"] == 1.0
    assert best.history == [] and best.best == t.best
    # stopped later: the note says what is saved and how to go on
    t = make_trainer(lr=0.5, overwrite=True, log=tmp_path / "log.jsonl", progress=False)

    def second_interrupted(*args):
        if t.epoch:
            raise KeyboardInterrupt
        return Trainer._run_epoch(t, *args)
    t._run_epoch = second_interrupted
    with pytest.raises(KeyboardInterrupt) as info:
        fit(t)
    if sys.version_info >= (3, 11):
        assert info.value.__notes__ == [
            f"grapheme: epoch 1 is saved in {str(tmp_path / 'last.npz')!r}; "
            f"fit(..., resume={str(tmp_path / 'last.npz')!r}) continues the run"]
    untrained = make_trainer(lr=0.5)
    untrained._grow(*map(list, zip(*train)))   # as fit grows it before the first step
    for name, value in untrained._params().items():
        assert np.array_equal(best._params()[name], value), name


def test_keep_best_keeps_the_best_epoch_and_survives_resume(tmp_path):
    train, val = DEMO_PAIRS * 4, DEMO_PAIRS
    a = make_trainer()
    ha = a.fit(train, 6, val=val, checkpoint=tmp_path / "a.npz", keep_best="val_loss",
               best=tmp_path / "a_best.npz")
    losses = [r["val_loss"] for r in ha]
    assert a.best["epoch"] == 1 + int(np.argmin(losses)) and a.best["epoch"] > 0
    assert a.best["value"] == min(losses)
    best = Trainer.from_checkpoint(tmp_path / "a_best.npz", progress=False)
    assert best.epoch == a.best["epoch"]
    assert best.evaluate(val)["loss"] == a.best["value"]
    # 3 epochs, then resume to 6: the same best as the uninterrupted run
    b = make_trainer()
    b.fit(train, 3, val=val, checkpoint=tmp_path / "b.npz", keep_best="val_loss",
          best=tmp_path / "b_best.npz")
    c = make_trainer()
    c.fit(train, 6, val=val, checkpoint=tmp_path / "b.npz", keep_best="val_loss",
          best=tmp_path / "b_best.npz", resume=tmp_path / "b.npz")
    assert {k: v for k, v in c.best.items() if k != "path"} == {
        k: v for k, v in a.best.items() if k != "path"}


@pytest.mark.parametrize("damage", ["deleted", "stale", "another run's", "not a checkpoint"])
def test_a_best_file_that_does_not_hold_the_record_starts_a_new_one(damage, tmp_path):
    """An attack helper's find: a stop between an epoch's checkpoint and
    its best file, a deleted best file or a replaced run's left the record
    naming a file that did not hold it; the resumed run went on reporting
    that best, the file never written or another model. Another run's file
    there, or one that is not a checkpoint, is not replaced unasked (a
    later attack helper's find: it was, said as "does not hold its best")."""
    train, val = DEMO_PAIRS * 4, DEMO_PAIRS
    files = dict(val=val, checkpoint=tmp_path / "c.npz", best=tmp_path / "best.npz",
                 keep_best="val_loss")
    make_trainer(progress=False).fit(train, 1, val=val, checkpoint=tmp_path / "c.npz")
    epoch1 = (tmp_path / "c.npz").read_bytes()   # this run's, before its record
    os.unlink(tmp_path / "c.npz")
    make_trainer(progress=False).fit(train, 3, **files)
    if damage == "deleted":
        os.unlink(tmp_path / "best.npz")
    elif damage == "stale":   # this run's epoch 1, which holds no record
        (tmp_path / "best.npz").write_bytes(epoch1)
    elif damage == "another run's":   # its record and epoch are not this one's
        other = make_trainer(progress=False, seed=5)
        other.fit(train, 1, val=val, checkpoint=tmp_path / "o.npz",
                  best=tmp_path / "o_best.npz", keep_best="val_loss")
        os.replace(tmp_path / "o_best.npz", tmp_path / "best.npz")
    else:
        (tmp_path / "best.npz").write_text("a user's notes")
    if damage in ("another run's", "not a checkpoint"):
        kept = (tmp_path / "best.npz").read_bytes()
        with pytest.raises(ValueError, match=r"best checkpoint .*best.npz' is not this run's "
                                             r"\(another run's best, or not a checkpoint\)"):
            make_trainer(progress=False).fit(train, 4, resume=tmp_path / "c.npz", **files)
        assert (tmp_path / "best.npz").read_bytes() == kept
        return
    t = make_trainer(progress=False)
    t.fit(train, 4, resume=tmp_path / "c.npz", **files)
    on_disk = Trainer.from_checkpoint(tmp_path / "best.npz", progress=False)
    assert t.best["epoch"] in (3, 4) and on_disk.epoch == t.best["epoch"]
    assert on_disk.best == t.best


def test_a_stop_in_the_last_best_save_is_mended_by_the_resume(tmp_path, monkeypatch):
    """An attack helper's find: a stop (Ctrl-C) in the best file's save of
    the last epoch, after its checkpoint's, left best.npz at an earlier
    epoch for good, since the resume it was told to run had nothing to
    train. The resume writes it: the parameters are that epoch's."""
    train, val = DEMO_PAIRS * 4, DEMO_PAIRS
    files = dict(val=val, checkpoint=tmp_path / "c.npz", best=tmp_path / "best.npz",
                 keep_best="val_loss")
    t = make_trainer(progress=False)
    t.fit(train, 1, **files)
    assert t.best["epoch"] == 1   # the first epoch beat the untrained model
    real, stopped = Trainer._save, []

    def stop_in_best(self, path):
        if os.fspath(path) == os.fspath(tmp_path / "best.npz") and self.epoch == 2:
            stopped.append(self.epoch)
            raise KeyboardInterrupt
        return real(self, path)

    monkeypatch.setattr(Trainer, "_save", stop_in_best)
    with pytest.raises(KeyboardInterrupt):
        t.fit(train, 2, **files)
    monkeypatch.setattr(Trainer, "_save", real)
    if not stopped:   # epoch 2 did not improve: no best save to stop in
        pytest.fail("epoch 2 did not improve on epoch 1: choose another run")
    assert Trainer.from_checkpoint(tmp_path / "best.npz", progress=False).epoch == 1
    with pytest.warns(UserWarning, match="nothing to train"):
        u = make_trainer()
        u.fit(train, 2, resume=tmp_path / "c.npz", **files)
    on_disk = Trainer.from_checkpoint(tmp_path / "best.npz", progress=False)
    assert on_disk.epoch == u.best["epoch"] == 2 and on_disk.best == u.best
    np.testing.assert_array_equal(on_disk.embedding.weight, u.embedding.weight)


def test_keep_best_by_another_metric_on_resume_is_refused(tmp_path):
    """A new user's find: the record of another metric replaced the best
    checkpoint of the first, unsaid."""
    train, val = DEMO_PAIRS * 4, DEMO_PAIRS
    files = dict(val=val, checkpoint=tmp_path / "c.npz", best=tmp_path / "best.npz")
    make_trainer(progress=False).fit(train, 1, keep_best="val_accuracy", **files)
    kept = (tmp_path / "best.npz").read_bytes()
    t = make_trainer(progress=False)
    with pytest.raises(ValueError, match=r"holds the best val_accuracy \(epoch \d\), which "
                       r"a record of keep_best='val_loss' would replace"):
        t.fit(train, 2, keep_best="val_loss", resume=tmp_path / "c.npz", **files)
    assert (tmp_path / "best.npz").read_bytes() == kept
    with pytest.warns(UserWarning, match="nothing to train"):   # nothing replaced: taken
        make_trainer().fit(train, 1, keep_best="val_loss", resume=tmp_path / "c.npz", **files)
    assert t.fit(train, 2, keep_best="val_accuracy", resume=tmp_path / "c.npz", **files)
    t = make_trainer(progress=False, overwrite=True)
    t.fit(train, 3, keep_best="val_loss", resume=tmp_path / "c.npz", **files)
    assert t.best["metric"] == "val_loss"
    # the same metric on other validation pairs: its record would start
    # anew there, as refused (an attack helper's find)
    kept = (tmp_path / "best.npz").read_bytes()
    with pytest.raises(ValueError, match=r"holds the best val_loss \(epoch \d\) measured on "
                       r"other validation pairs, which a record on these would replace"):
        make_trainer(progress=False).fit(train, 4, keep_best="val_loss",
                                         resume=tmp_path / "c.npz", **dict(files, val=val[:2]))
    assert (tmp_path / "best.npz").read_bytes() == kept
    # the same pairs in another order: the same metrics, the record goes on;
    # another order was "other validation pairs" (an attack helper's find)
    t = make_trainer(progress=False)
    t.fit(train, 4, keep_best="val_loss", resume=tmp_path / "c.npz",
          **dict(files, val=val[::-1]))
    assert t.best["val"] == gr.train.trainer.val_fingerprints(*zip(*val))[0]
    # on new data (new_data=True): a record there would replace it, refused
    kept = (tmp_path / "best.npz").read_bytes()
    with pytest.raises(ValueError, match=r"holds the best val_loss \(epoch \d\) of the data "
                                         r"the checkpoint was trained on, which a record on "
                                         r"the new data would replace"):
        make_trainer(progress=False).fit(train[:-1], 5, keep_best="val_loss", new_data=True,
                                         resume=tmp_path / "c.npz", **files)
    assert (tmp_path / "best.npz").read_bytes() == kept


def test_a_best_record_from_before_its_pairs_were_kept_is_stamped(tmp_path):
    """An attack helper's find: a record without "val" (written before it
    was kept) is taken as measured on the pairs given, but went on
    unstamped, so a later resume on any pairs was taken as its too."""
    from grapheme.checkpoint import load_checkpoint, save_checkpoint

    train, val = DEMO_PAIRS * 4, DEMO_PAIRS
    files = dict(val=val, checkpoint=tmp_path / "c.npz", best=tmp_path / "best.npz")
    make_trainer(progress=False).fit(train, 1, keep_best="val_loss", **files)
    vals = gr.train.trainer.val_fingerprints(*zip(*val))
    for name in ("c.npz", "best.npz"):   # as written before the record kept its pairs
        arrays, meta = load_checkpoint(tmp_path / name)
        del meta["best"]["val"]
        save_checkpoint(tmp_path / name, arrays, meta)
    # an epoch that does not improve (lr ~ 0): best.npz keeps the unstamped
    # record, which is still the record (a diff reviewer's find: stamped, it
    # no longer matched best.npz's, and the next resume replaced best.npz)
    t = Trainer.from_checkpoint(tmp_path / "c.npz", progress=False)
    t.optimizer.lr = 1e-300
    t.fit(train, 2, keep_best="val_loss", **files)
    assert t.best["val"] == vals[0] and t.best["epoch"] == 1
    kept = (tmp_path / "best.npz").read_bytes()
    with pytest.raises(ValueError, match="measured on other validation pairs"):
        make_trainer(progress=False).fit(train, 3, keep_best="val_loss",
                                         resume=tmp_path / "c.npz",
                                         **dict(files, val=val[:2]))
    assert (tmp_path / "best.npz").read_bytes() == kept
    # a record with the fingerprint of its pairs in order (December 2026) goes on
    for name in ("c.npz", "best.npz"):
        arrays, meta = load_checkpoint(tmp_path / name)
        meta["best"]["val"] = vals[1]
        save_checkpoint(tmp_path / name, arrays, meta)
    t = make_trainer(progress=False)
    t.fit(train, 3, keep_best="val_loss", resume=tmp_path / "c.npz", **files)
    assert t.best["val"] == vals[0] and t.best["epoch"] >= 1


def test_keep_best_survives_a_moved_run_and_another_directory(tmp_path, monkeypatch):
    """A new user's find: the record keeps its path as given (relative to
    the directory training ran in), so a resume from another directory, or
    of a copied run, started a new record and replaced best.npz with a
    worse model. The best file there, of the record, continues it."""
    import shutil
    train, val = DEMO_PAIRS * 4, DEMO_PAIRS
    run = tmp_path / "work" / "run"
    run.mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "work")
    t = make_trainer()
    t.fit(train, 1, val=val, checkpoint="run/ck.npz", keep_best="val_loss")
    t.optimizer.lr = 1e-300   # no change, no improvement: the best stays at epoch <= 1
    t.fit(train, 3, val=val, checkpoint="run/ck.npz", keep_best="val_loss")
    record = dict(t.best)
    assert record["epoch"] <= 1 and record["path"] == os.path.join("run", "best.npz")
    shutil.copytree(run, tmp_path / "moved")
    for where, checkpoint in ((tmp_path, "work/run/ck.npz"), (tmp_path, "moved/ck.npz")):
        monkeypatch.chdir(where)
        before = (where / os.path.dirname(checkpoint) / "best.npz").read_bytes()
        r = Trainer.from_checkpoint(checkpoint, progress=False)
        r.optimizer.lr = 1e-300
        r.fit(train, 4, val=val, checkpoint=checkpoint, keep_best="val_loss")
        assert {k: v for k, v in r.best.items() if k != "path"} == {
            k: v for k, v in record.items() if k != "path"}
        assert r.best["path"] == os.path.join(os.path.dirname(checkpoint), "best.npz")
        assert (where / os.path.dirname(checkpoint) / "best.npz").read_bytes() == before


def test_keep_best_validation(tmp_path):
    t = make_trainer()
    ck = tmp_path / "c.npz"
    with pytest.raises(ValueError, match="keep_best needs val"):
        t.fit(DEMO_PAIRS, 1, checkpoint=ck, keep_best="val_loss")
    with pytest.raises(ValueError, match="keep_best needs val"):
        t.fit(DEMO_PAIRS, 1, val=DEMO_PAIRS, keep_best="val_loss")
    with pytest.raises(ValueError, match=r"keep_best must be one of \['val_loss', "
                                         r"'val_accuracy'\].*got 'val_boundary_f1'"):
        t.fit(DEMO_PAIRS, 1, val=DEMO_PAIRS, checkpoint=ck, keep_best="val_boundary_f1")
    with pytest.raises(ValueError, match="must differ from checkpoint"):
        t.fit(DEMO_PAIRS, 1, val=DEMO_PAIRS, checkpoint=ck, keep_best="val_loss", best=ck)
    with pytest.raises(ValueError, match="best needs keep_best"):
        t.fit(DEMO_PAIRS, 1, val=DEMO_PAIRS, checkpoint=ck, best=tmp_path / "b.npz")
    (tmp_path / "best.npz").write_bytes(b"someone's file")
    with pytest.raises(ValueError, match=r"best checkpoint .*best.npz' already exists; .* "
                                         r"choose another path \(best=\)"):
        t.fit(DEMO_PAIRS, 1, val=DEMO_PAIRS, checkpoint=ck, keep_best="val_loss")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.npz"]
    assert (tmp_path / "best.npz").read_bytes() == b"someone's file"
    with pytest.raises(ValueError, match=r"pairs\[0\]: a tuple target is a segmentation"):
        t.evaluate([("abc", ("ab",))])


def test_segments_as_json_lists_are_the_tuples():
    # a new user's find: pairs loaded with json.loads hold lists, which were
    # refused ("got (str, list)")
    pairs = [("thecat", ("the", "cat")), ("sat", ("sat",)), ("onit", ("on", "it"))]
    as_json = [(text, list(segs)) for text, segs in pairs]
    runs = []
    for data in (pairs, as_json):
        t = Trainer(Embedding(dim=8), Morpher(estimator="ste"), StructuralLoss.for_training(),
                    Adam(lr=1e-2), batch_size=2, progress=False)
        t.fit(data, 2)
        history = [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in t.history]
        runs.append((history, t.evaluate(data), t._data_fingerprint))
    assert runs[0] == runs[1]
    with pytest.raises(ValueError, match="must hold non-empty str joining to it"):
        Trainer(Embedding(dim=8), Morpher(), StructuralLoss(), Adam()).evaluate(
            [("thecat", ["the", "dog"])])


def test_segmentation_pairs_change_the_fingerprint():
    from grapheme.train.trainer import data_fingerprint
    a = data_fingerprint(["aaa"], [("a", "aa")])
    b = data_fingerprint(["aaa"], [("aa", "a")])
    c = data_fingerprint(["aaa"], ["aa"])
    assert len({a["sha256"], b["sha256"], c["sha256"]}) == 3


def test_reinforce_samples_report_a_kept_fraction_not_k_times_too_large():
    # every sample is a morph of the batch: inputs and outputs both count K copies
    morpher = Morpher(estimator=Reinforce(baseline="loo", samples=4, seed=1))
    t = Trainer(Embedding(dim=8, seed=0), morpher, StructuralLoss(), Adam(lr=1e-2),
                progress=False)
    stats = t.train_step(["hello", "abc"], ["helo", "ab"])
    assert stats["input_nodes"] == 4 * 8 and stats["chars"] == 8
    assert 0 < stats["output_nodes"] <= stats["input_nodes"]


def test_step_gradient_is_continuous_under_rounding_of_the_parameters():
    """Parameters moved by an ulp move the gradient by rounding, not by a
    jump: a right segment's activation is its gold word's up to an ulp,
    on the kink of the activation cost, whose derivative rounding must not
    pick (``_KINK`` in _transport.pyx). Before: 1e-4 relative, which made
    a data-parallel run leave the single-process one after a few steps."""
    import __future__

    from grapheme.data import word_pairs

    pairs = word_pairs(__future__.__doc__, np.random.default_rng(0))   # the stdlib's prose
    inputs, targets = [p[0] for p in pairs], [p[1] for p in pairs]
    t = Trainer(Embedding(dim=16, seed=0), Morpher(estimator="ste"),
                StructuralLoss.for_training(), Adam(lr=3e-3), batch_size=len(pairs),
                encoder=gr.Encoder(16, layers=2), unknown_prob=0.0, progress=False)

    def grads():
        g, morphed, res, kept = t._forward(inputs, targets)
        lg = t.loss.backward(res, np.full(len(inputs), 1 / len(inputs)))
        return {k: np.array(v) for k, v in t._gradients(morphed, lg, *kept)[0].items()}

    rng = np.random.default_rng(1)
    worst = 0.0
    for _ in range(4):
        t.train_step(inputs, targets)
        params = {k: v for k, v in t._params().items() if k != "theta"}
        saved = {k: v.copy() for k, v in params.items()}
        before = grads()
        for v in params.values():
            v *= 1 + rng.choice([-1.0, 1.0], v.shape) * 2.0**-52
        after = grads()
        for k, v in params.items():
            v[...] = saved[k]
        worst = max(worst, max(np.linalg.norm(after[k] - before[k]) / np.linalg.norm(before[k])
                               for k in before if np.linalg.norm(before[k]) > 0))
    assert worst <= 1e-10, worst


def test_a_save_from_another_thread_during_fit_loads(tmp_path, monkeypatch):
    """A review helper's find: a monitor's save between two epochs of fit
    wrote epoch N with N + 1 records (fit appended one while the save
    wrote), a checkpoint its own loader refused."""
    import threading
    import time
    import grapheme.train.trainer as trainer_module

    write = trainer_module.save_checkpoint

    def slow_disk(path, arrays, meta):
        time.sleep(0.05)
        return write(path, arrays, meta)
    monkeypatch.setattr(trainer_module, "save_checkpoint", slow_disk)
    run_epoch, savers, path = Trainer._run_epoch, [], tmp_path / "monitor.npz"

    def epoch_then_a_save(self, *args):
        record = run_epoch(self, *args)
        if self.epoch == 1:   # the monitor's save lands here, between epochs
            savers.append(threading.Thread(target=self.save, args=(path,),
                                           kwargs={"overwrite": True}))
            savers[0].start()
            time.sleep(0.01)
        return record
    monkeypatch.setattr(Trainer, "_run_epoch", epoch_then_a_save)
    t = Trainer(Embedding(dim=4), Morpher(estimator="ste"), StructuralLoss(), Adam(lr=1e-2),
                batch_size=6, progress=False)
    t.fit([("abcabc", "abc"), ("aabb", "ab")], 3)
    savers[0].join()
    saved = Trainer.from_checkpoint(path, progress=False)
    assert saved.epoch == len(saved.history) in (1, 2)


def test_fit_steps_under_the_trainers_lock(monkeypatch):
    """The fuzz scenario trainer_threads, once in CI: fit's steps ran
    without the lock train_step takes, so a monitor's save read the
    optimiser's moments between the growth of one and of the other and
    wrote a checkpoint that did not load. Each step is checked from
    another thread, which must not get the lock while it runs."""
    import threading

    step, free = Trainer._step, []

    def checked(self, *args):
        probe = threading.Thread(
            target=lambda: free.append(self._lock.acquire(blocking=False)
                                       and (self._lock.release() or True)))
        probe.start()
        probe.join()
        return step(self, *args)
    monkeypatch.setattr(Trainer, "_step", checked)
    make_trainer(progress=False).fit(DEMO_PAIRS, 2)
    assert free and not any(free)


def test_a_fit_with_nothing_to_train_warns():
    """A new user's find: epochs is the run's total, and a second
    fit(pairs, 3) returned the same records, silent."""
    trainer = make_trainer(progress=False)
    history = trainer.fit(DEMO_PAIRS, 2)
    with pytest.warns(UserWarning, match=r"nothing to train: the trainer has 2 epochs and "
                      r"epochs=2 is the run's total \(fit\(pairs, 2 \+ k\) trains k more\)"):
        assert trainer.fit(DEMO_PAIRS, 2) == history
    assert len(trainer.fit(DEMO_PAIRS, 3)) == 3
