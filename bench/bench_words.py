"""Word segmentation of held-out real English: what training reaches, and a peer.

The data is ``grapheme generate --task words`` with its defaults (the
docstrings of this Python's standard library, split by document); the
score is boundary F1 on its ``test`` split (documents never seen in
training). Trained here, once per run (``setup_cache``):

- ``encoder``: what ``grapheme train`` builds by default (d = 64, a 2-layer
  encoder with learned routing, ``ste``, ``StructuralLoss.for_training``),
  ``EPOCHS`` epochs; the training time is tracked too (target: at most 10
  minutes on 2 cores, F1 >= 0.90);
- ``context_free``: the same without the encoder (no message passing, no
  projections), the same epochs.

The peer: the ``wordsegment`` package (a dictionary segmenter built from
web-scale unigram and bigram counts; ``pip install wordsegment``, in the
``bench`` extra) on the same test inputs. It keeps only ASCII letters and
digits, so every score here is over the test examples that are ASCII (the
count is tracked). Its characters/s and ours (``Segmenter.segment``, all
those inputs in batches of 16k characters, the best of three passes) are
measured on the same text.

This suite trains two models: it takes about 8 minutes on 2 idle cores.
"""
import os
import tempfile
import time

import numpy as np

import grapheme as gr
from grapheme.cli import _make_trainer
from grapheme.data import generate_words, load_pairs, segment_lengths
from grapheme.train.metrics import segmentation_counts, segmentation_scores

try:
    import wordsegment
except ImportError:  # pragma: no cover - depends on the environment
    wordsegment = None

#: Epochs of both models (about 7 s each for the encoder model on 2 cores,
#: validation included).
EPOCHS = 40
BATCH_CHARS = 1 << 14


def _scores(inputs, segments, predicted):
    """Boundary scores of predicted segment lengths against the gold ones."""
    offsets = np.concatenate(([0], np.cumsum([len(s) for s in inputs])))
    sizes = np.concatenate([np.asarray(p, np.int64) for p in predicted])
    history = gr.MergeHistory(np.repeat(np.arange(len(sizes)), sizes))
    lengths, counts, _ = segment_lengths(segments)
    return segmentation_scores(segmentation_counts(history, offsets, lengths, counts))


def _segment_all(model, inputs):
    out, lo = [], 0
    while lo < len(inputs):
        hi, size = lo, 0
        while hi < len(inputs) and size < BATCH_CHARS:
            size += len(inputs[hi])
            hi += 1
        out.extend(model.segment(inputs[lo:hi]))
        lo = hi
    return out


def _train(train, encoder_layers):
    trainer = _make_trainer(dim=64, seed=0, estimator="ste", target_rate=None, lr=3e-3,
                            batch_size=64, log=None, progress=False,
                            encoder_layers=encoder_layers)
    start = time.perf_counter()
    trainer.fit(train, EPOCHS)
    return trainer.model, time.perf_counter() - start


class WordsSuite:
    """Boundary F1 on the test split: ours with and without context, and wordsegment."""

    timeout = 3600
    number = 1
    repeat = 1

    def setup_cache(self):
        with tempfile.TemporaryDirectory() as tmp:
            paths = generate_words(os.path.join(tmp, "words"), seed=0)
            train, test = load_pairs(paths["train"]), load_pairs(paths["test"])
        test = [(x, y) for x, y in test if x.isascii()]
        inputs, segments = [x for x, _ in test], [y for _, y in test]
        out = {"examples": len(test), "chars": sum(map(len, inputs))}
        for name, layers in (("encoder", 2), ("context_free", 0)):
            model, seconds = _train(train, layers)
            elapsed = []   # best of 3: one pass takes a fraction of a second
            for _ in range(3):
                start = time.perf_counter()
                predicted = _segment_all(model, inputs)
                elapsed.append(time.perf_counter() - start)
            elapsed = min(elapsed)
            out[name] = {"train_seconds": seconds, "chars_per_s": out["chars"] / elapsed,
                         **_scores(inputs, segments, [[len(w) for w in p] for p in predicted])}
        if wordsegment is not None:
            wordsegment.load()
            start = time.perf_counter()
            predicted = [wordsegment.segment(x) for x in inputs]
            elapsed = time.perf_counter() - start
            out["wordsegment"] = {"chars_per_s": out["chars"] / elapsed,
                                  **_scores(inputs, segments,
                                            [[len(w) for w in p] for p in predicted])}
        return out

    def track_test_examples(self, r):
        return r["examples"]

    def track_f1_encoder(self, r):
        return r["encoder"]["boundary_f1"]

    def track_f1_context_free(self, r):
        return r["context_free"]["boundary_f1"]

    def track_train_seconds_encoder(self, r):
        return r["encoder"]["train_seconds"]

    def track_chars_per_s_grapheme(self, r):
        return r["encoder"]["chars_per_s"]

    if wordsegment is not None:
        def track_f1_wordsegment(self, r):
            return r["wordsegment"]["boundary_f1"]

        def track_chars_per_s_wordsegment(self, r):
            return r["wordsegment"]["chars_per_s"]
