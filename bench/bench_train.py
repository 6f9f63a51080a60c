"""Benchmarks of the training loop (asv style)."""
import numpy as np

from grapheme import Embedding, Morpher
from grapheme.data import make_pairs
from grapheme.loss import StructuralLoss
from grapheme.optim import Adam
from grapheme.train import Trainer


def _short_pairs(n, rng):
    """``n`` fold pairs of 2..8 lowercase letters (input -> input[:-1])."""
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    lengths = rng.integers(2, 9, size=n)
    chars = letters[rng.integers(0, 26, size=int(lengths.sum()))]
    bounds = np.concatenate(([0], np.cumsum(lengths)))
    texts = ["".join(chars[a:b].tolist()) for a, b in zip(bounds[:-1], bounds[1:])]
    return [(t, t[:-1]) for t in texts]


def _trainer(batch_size, dim=64):
    return Trainer(Embedding(dim=dim, seed=0), Morpher(), StructuralLoss(), Adam(lr=1e-2),
                   batch_size=batch_size, seed=0, progress=False)


class TrainStepSuite:
    """One training step on a batch of short pairs (one batched graph), dim 64.

    ``batch_size = 1000`` is the step the project tracks.
    """

    params = [[256, 1000]]
    param_names = ["batch_size"]

    def setup(self, batch_size):
        rng = np.random.default_rng(42)
        pairs = _short_pairs(batch_size, rng)
        self.inputs = [a for a, _ in pairs]
        self.targets = [b for _, b in pairs]
        self.trainer = _trainer(batch_size)
        self.trainer.train_step(self.inputs, self.targets)   # grow the table once

    def time_train_step(self, batch_size):
        self.trainer.train_step(self.inputs, self.targets)

    def peakmem_train_step(self, batch_size):
        self.trainer.train_step(self.inputs, self.targets)


class EpochSuite:
    """One epoch over a generated mixed data set."""

    params = [[32, 256]]
    param_names = ["batch_size"]
    timeout = 120

    def setup(self, batch_size):
        seed = int(np.random.default_rng(42).integers(2**31))
        self.pairs = make_pairs(2000, seed=seed)
        self.chars = sum(len(a) for a, _ in self.pairs)
        self.trainer = _trainer(batch_size)
        self.trainer.fit(self.pairs[:batch_size], 1)          # warm up, grow the table

    def time_epoch(self, batch_size):
        self.trainer.fit(self.pairs, self.trainer.epoch + 1)

    def peakmem_epoch(self, batch_size):
        self.trainer.fit(self.pairs, self.trainer.epoch + 1)

    def track_chars_per_second(self, batch_size):
        record = self.trainer.fit(self.pairs, self.trainer.epoch + 1)[-1]
        return record["chars_per_s"]

    track_chars_per_second.unit = "chars/s"
