"""The runs tests/test_distributed.py compares: each configuration trained
for 10 steps, validated after every epoch (keeping the best), in one
process or as one rank of a data-parallel run.

``python distributed_worker.py OUT`` (as every rank, with the variables
torchrun sets) trains every configuration with a communicator and writes
``OUT/rank<r>.npz``: the parameters after the 10 steps, the estimator's
state and the epoch records, by configuration (rank 0 writes the
checkpoints under ``OUT/<configuration>``).
"""
import os
import sys

import numpy as np

import grapheme as gr
from grapheme.estimators import Reinforce

#: 25 pairs in batches of 6: 5 steps an epoch, the last of one pair (so one
#: of two ranks has no share of it); 2 epochs: 10 steps.
PAIRS_N, BATCH, EPOCHS = 25, 6, 2
#: Validation pairs: 7, so two ranks evaluate 3 and 4 (in batches of 6).
VAL_N = 7

#: Entries that two runs must agree on exactly: counts, the generator's
#: state, which epoch was kept, and the validation metrics that are ratios
#: of counts. Every other entry: to 1e-12 relative.
EXACT = ("estimator.count", "estimator.rng", "best_epoch", "val_kept_fraction",
         "val_accuracy", "val_seg_accuracy", "val_boundary_precision",
         "val_boundary_recall", "val_boundary_f1")


def _pairs(seed, segmentation=False, n=PAIRS_N):
    rng = np.random.default_rng(seed)
    alphabet = list("abcdefgh")
    pairs = []
    for _ in range(n):
        words = ["".join(rng.choice(alphabet, size=rng.integers(1, 4)))
                 for _ in range(rng.integers(1, 4))]
        text = "".join(words)
        if segmentation:
            pairs.append((text, tuple(words)))
        else:
            pairs.append((text + text[-1] * int(rng.integers(0, 3)), text))
    return pairs


def _word_pairs():
    """Word segmentation pairs of the stdlib's prose (``__future__``'s
    docstring), as ``grapheme generate --task words`` makes them."""
    import __future__

    from grapheme.data import word_pairs

    return word_pairs(__future__.__doc__, np.random.default_rng(0))


def _val(seed, segmentation=False):
    return _pairs(seed + 100, segmentation, VAL_N)


def configurations():
    """name -> (factory of a trainer given comm, pairs, val, keep_best metric)."""
    def ste_encoder(comm):
        return gr.Trainer(gr.Embedding(dim=8, seed=1), gr.Morpher(estimator="ste", rate=0.7),
                          gr.StructuralLoss(), gr.Adam(lr=3e-2), batch_size=BATCH, seed=3,
                          encoder=gr.Encoder(8, layers=2), unknown_prob=0.1,
                          progress=False, comm=comm)

    def soft(comm):
        return gr.Trainer(gr.Embedding(dim=6, seed=2), gr.Morpher(estimator="soft"),
                          gr.StructuralLoss(), gr.SGD(lr=0.1, momentum=0.5),
                          batch_size=BATCH, seed=4, progress=False, comm=comm)

    def segments(comm):
        return gr.Trainer(gr.Embedding(dim=8, seed=5), gr.Morpher(estimator="ste"),
                          gr.StructuralLoss.for_training(debias=True), gr.Adam(lr=1e-2),
                          batch_size=BATCH, seed=6, encoder=gr.Encoder(8, layers=1),
                          progress=False, comm=comm)

    def reinforce_mean(comm):
        # the running-mean baseline, a rate controller, the unknown row
        return gr.Trainer(gr.Embedding(dim=8, seed=7),
                          gr.Morpher(estimator=Reinforce(baseline="mean", seed=5), rate=0.7),
                          gr.StructuralLoss(), gr.Adam(lr=3e-2), batch_size=BATCH, seed=8,
                          encoder=gr.Encoder(8, layers=1), unknown_prob=0.1,
                          progress=False, comm=comm)

    def reinforce_loo(comm):
        # 3 samples per pair, leave-one-out baseline, segmentation pairs
        return gr.Trainer(gr.Embedding(dim=8, seed=9),
                          gr.Morpher(estimator=Reinforce(baseline="loo", samples=3, seed=2)),
                          gr.StructuralLoss.for_training(debias=True), gr.Adam(lr=3e-2),
                          batch_size=BATCH, seed=10, encoder=gr.Encoder(8, layers=1),
                          progress=False, comm=comm)

    def reinforce_none(comm):
        # 2 samples, no baseline, no encoder
        return gr.Trainer(gr.Embedding(dim=6, seed=11),
                          gr.Morpher(estimator=Reinforce(baseline=None, samples=2, seed=7)),
                          gr.StructuralLoss(), gr.SGD(lr=0.1, momentum=0.5),
                          batch_size=BATCH, seed=12, progress=False, comm=comm)

    def ste_words(comm):
        # word segmentation of real prose, two layers: right segments sit on
        # the activation cost's kink up to rounding (_KINK in _transport.pyx)
        return gr.Trainer(gr.Embedding(dim=16, seed=13), gr.Morpher(estimator="ste"),
                          gr.StructuralLoss.for_training(), gr.Adam(lr=3e-2),
                          batch_size=BATCH, seed=14, encoder=gr.Encoder(16, layers=2),
                          unknown_prob=0.0, progress=False, comm=comm)

    words = _word_pairs()
    return {"ste_encoder": (ste_encoder, _pairs(0), _val(0), "val_loss"),
            "ste_words": (ste_words, words[:PAIRS_N], words[PAIRS_N:PAIRS_N + VAL_N],
                          "val_boundary_f1"),
            "soft": (soft, _pairs(1), _val(1), "val_accuracy"),
            "segments": (segments, _pairs(2, segmentation=True),
                         _val(2, segmentation=True), "val_boundary_f1"),
            "reinforce_mean": (reinforce_mean, _pairs(3), _val(3), "val_loss"),
            "reinforce_loo": (reinforce_loo, _pairs(4, segmentation=True),
                              _val(4, segmentation=True), "val_seg_accuracy"),
            "reinforce_none": (reinforce_none, _pairs(5), _val(5), "val_loss")}


def train(configuration, directory, comm=None):
    """Train ``configuration`` (a value of :func:`configurations`), its
    checkpoints in ``directory``; what the runs are compared on, by name."""
    factory, pairs, val, metric = configuration
    os.makedirs(directory, exist_ok=True)
    trainer = factory(comm)
    trainer.fit(pairs, EPOCHS, val=val, checkpoint=os.path.join(directory, "checkpoint.npz"),
                keep_best=metric)
    out = {name: np.array(value) for name, value in trainer._params().items()}
    rate = trainer.morpher.rate
    if rate is not None:
        out["rate.multiplier"] = np.array(rate.multiplier)
    state = trainer.morpher.estimator.state_dict()
    if state:   # Reinforce: the stream's position, the running baseline
        total, count = state["baseline"]
        out["estimator.total"] = np.array(total)
        out["estimator.count"] = np.array(count)
        bits = state["rng"]
        words = [bits["state"]["state"], bits["state"]["inc"]]
        out["estimator.rng"] = np.array([(w >> (32 * i)) & 0xFFFFFFFF for w in words
                                         for i in range(4)] + [bits["has_uint32"]],
                                        dtype=np.float64)
    history = trainer.history
    for key in ("kept_fraction", "loss", "estimator_variance", "grad_norm"):
        out[key] = np.array([np.nan if r[key] is None else r[key] for r in history])
    for key in [k for k in history[0] if k.startswith("val_")]:
        out[key] = np.array([trainer.baseline[key]] + [r[key] for r in history])
    out["best_epoch"] = np.array(trainer.best["epoch"])
    return out


def main(out):
    comm = gr.distributed.init_from_env(timeout=120)
    try:
        arrays = {}
        for name, configuration in configurations().items():
            directory = os.path.join(out, name)
            for key, value in train(configuration, directory, comm).items():
                arrays[f"{name}/{key}"] = value
        np.savez(os.path.join(out, f"rank{comm.rank}.npz"), **arrays)
    finally:
        gr.distributed.destroy()


if __name__ == "__main__":
    main(sys.argv[1])
