"""The PyTorch bridge against the numpy Trainer: one training step, the same model.

Both sides train an embedding table and the threshold with Adam on the same
batch of 256 short pairs (``ste``, d = 64): the numpy ``Trainer.train_step``
against a torch step (table lookup, ``grapheme.torch.Merge``,
``grapheme.torch.StructuralLoss``, ``backward``, ``torch.optim.Adam``). The
ratio says what the bridge costs over calling grapheme directly; it must not
cost more than 1.5x (``peer / ours >= 0.667``). Skipped without torch.
"""
import numpy as np

from grapheme import Embedding, Graph, Morpher
from grapheme.loss import StructuralLoss
from grapheme.optim import Adam
from grapheme.train import Trainer

from .bench_train import _short_pairs


class BridgeStepSuite:
    params = [[256]]
    param_names = ["pairs"]
    ratios = [("time_bridge_step", "time_trainer_step", 0.667)]

    def setup(self, pairs):
        try:
            import torch
        except ImportError:
            raise NotImplementedError("torch is not installed")
        from grapheme import torch as gt

        batch = _short_pairs(pairs, np.random.default_rng(42))
        self.inputs = [a for a, _ in batch]
        self.targets = [b for _, b in batch]
        self.trainer = Trainer(Embedding(dim=64, seed=0), Morpher(estimator="ste"),
                               StructuralLoss(), Adam(lr=1e-2), batch_size=pairs, seed=0,
                               progress=False)
        self.trainer.train_step(self.inputs, self.targets)   # grow the table once

        emb = Embedding(dim=64, seed=0)
        self.graph = Graph.from_texts(self.inputs)
        self.target = Graph.from_texts(self.targets)
        self.rows = torch.from_numpy(emb.rows(self.graph.labels))
        self.t_rows = torch.from_numpy(emb.rows(self.target.labels))
        self.offsets = torch.tensor(self.graph.graph_offsets)
        self.table = torch.nn.Parameter(torch.from_numpy(emb.weight.copy()))
        self.merge = gt.Merge(estimator="ste").double()
        self.loss = gt.StructuralLoss()
        self.opt = torch.optim.Adam([self.table, self.merge.theta], lr=1e-2)
        self.time_bridge_step(pairs)

    def time_trainer_step(self, pairs):
        self.trainer.train_step(self.inputs, self.targets)

    def time_bridge_step(self, pairs):
        self.opt.zero_grad()
        merged = self.merge(self.table[self.rows], self.offsets, self.graph.labels)
        loss = self.loss(merged, self.target, self.table.mean(dim=1)[self.t_rows])
        loss.backward()
        self.opt.step()
        self.merge.step(merged)
