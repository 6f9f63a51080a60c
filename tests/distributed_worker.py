"""The runs tests/test_distributed.py compares: each configuration trained
for 10 steps, in one process or as one rank of a data-parallel run.

``python distributed_worker.py OUT`` (as every rank, with the variables
torchrun sets) trains every configuration with a communicator and writes
``OUT/rank<r>.npz``: the parameters after the 10 steps, by configuration.
"""
import os
import sys

import numpy as np

import grapheme as gr

#: 25 pairs in batches of 6: 5 steps an epoch, the last of one pair (so one
#: of two ranks has no share of it); 2 epochs: 10 steps.
PAIRS_N, BATCH, EPOCHS = 25, 6, 2


def _pairs(seed, segmentation=False):
    rng = np.random.default_rng(seed)
    alphabet = list("abcdefgh")
    pairs = []
    for _ in range(PAIRS_N):
        words = ["".join(rng.choice(alphabet, size=rng.integers(1, 4)))
                 for _ in range(rng.integers(1, 4))]
        text = "".join(words)
        if segmentation:
            pairs.append((text, tuple(words)))
        else:
            pairs.append((text + text[-1] * int(rng.integers(0, 3)), text))
    return pairs


def configurations():
    """name -> (factory of a trainer given comm, pairs)."""
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

    return {"ste_encoder": (ste_encoder, _pairs(0)), "soft": (soft, _pairs(1)),
            "segments": (segments, _pairs(2, segmentation=True))}


def train(factory, pairs, comm=None):
    trainer = factory(comm)
    trainer.fit(pairs, EPOCHS)
    out = {name: np.array(value) for name, value in trainer._params().items()}
    rate = trainer.morpher.rate
    if rate is not None:
        out["rate.multiplier"] = np.array(rate.multiplier)
    out["kept_fraction"] = np.array([r["kept_fraction"] for r in trainer.history])
    out["loss"] = np.array([r["loss"] for r in trainer.history])
    return out


def main(out):
    comm = gr.distributed.init_from_env(timeout=120)
    try:
        arrays = {}
        for name, (factory, pairs) in configurations().items():
            for key, value in train(factory, pairs, comm).items():
                arrays[f"{name}/{key}"] = value
        np.savez(os.path.join(out, f"rank{comm.rank}.npz"), **arrays)
    finally:
        gr.distributed.destroy()


if __name__ == "__main__":
    main(sys.argv[1])
