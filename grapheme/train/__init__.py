"""Training: the loop (:class:`Trainer`), its metrics and its checkpoint state.

- :mod:`grapheme.train.trainer`: :class:`Trainer`, one step, epochs, evaluation;
- :mod:`grapheme.train.metrics`: what an epoch reports;
- :mod:`grapheme.train.state`: how a run's objects are described, rebuilt
  and checkpointed;
- :mod:`grapheme.train.progress`: what training reports while it runs.
"""
from .metrics import TIMING_KEYS
from .trainer import Trainer

__all__ = ["Trainer", "TIMING_KEYS"]
