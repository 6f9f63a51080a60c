"""Segmentation throughput of a trained-size model beside a dictionary segmenter.

Ours: :meth:`grapheme.Segmenter.segment` of a 2-layer, d = 32 model (what
``grapheme segment`` runs per batch), one batched call per 16k characters.
The peer: the ``wordsegment`` package (a unigram/bigram dictionary
segmenter, pure Python; ``pip install wordsegment``, in the ``bench``
extra), on the same lines. Without it the peer's benchmarks are not defined
and ``python -m bench`` says so. The two do not compute the same thing (one
applies a learned model, the other a dictionary search): the ratio says
what our inference costs beside a segmenter people use.
"""
import time

import numpy as np

import grapheme as gr

try:
    import wordsegment
except ImportError:  # pragma: no cover - depends on the environment
    wordsegment = None

_WORDS = ("the of and to in is that it for as with was on be by this are from or an "
          "which not at have has one but all can their more other will its also were "
          "there when time model graph text word data value first line table merge "
          "number system function return string error module class method python").split()

#: Characters per batched call (as ``grapheme segment --batch-chars``).
BATCH_CHARS = 1 << 14


def _lines(n_chars, seed=0):
    """Lines of 4-12 lowercase words without spaces, ``n_chars`` characters in all."""
    rng = np.random.default_rng(seed)
    lines, total = [], 0
    while total < n_chars:
        line = "".join(_WORDS[i] for i in rng.integers(0, len(_WORDS),
                                                       int(rng.integers(4, 13))))
        lines.append(line)
        total += len(line)
    return lines


def _batches(lines, chars):
    out, cur, size = [], [], 0
    for line in lines:
        cur.append(line)
        size += len(line)
        if size >= chars:
            out.append(cur)
            cur, size = [], 0
    return out + ([cur] if cur else [])


def _model(dim=32, layers=2, seed=0):
    emb = gr.Embedding(dim=dim, seed=seed)
    emb.rows(np.arange(ord("a"), ord("z") + 1))
    enc = gr.Encoder(dim, layers=layers)
    rng = np.random.default_rng(seed)
    for value in enc.params.values():   # a model that is not the identity
        value[...] += 0.05 * rng.normal(size=value.shape)
    return gr.Segmenter(emb, gr.Morpher(), enc)


class SegmentSuite:
    """``time_*``: both segment the same 5k characters (so their ratio is the
    ratio of throughputs); ``track_*_chars_per_s``: characters per second,
    ours over 200k characters in batches of 16k, the peer's over the 5k."""

    ratios = [("time_grapheme", "time_wordsegment")]
    timeout = 300

    def setup(self):
        self.model = _model()
        self.lines = _lines(200_000)
        self.chars = sum(map(len, self.lines))
        self.batches = _batches(self.lines, BATCH_CHARS)
        self.peer_lines = _lines(5_000, seed=1)
        self.peer_chars = sum(map(len, self.peer_lines))
        if wordsegment is not None:
            wordsegment.load()
        self.model.segment(self.batches[0])   # warm the buffers

    def time_grapheme(self):
        self.model.segment(self.peer_lines)

    def track_grapheme_chars_per_s(self):
        start = time.perf_counter()
        for batch in self.batches:
            self.model.segment(batch)
        return self.chars / (time.perf_counter() - start)

    track_grapheme_chars_per_s.unit = "chars/s"

    if wordsegment is not None:
        def time_wordsegment(self):
            for line in self.peer_lines:
                wordsegment.segment(line)

        def track_wordsegment_chars_per_s(self):
            start = time.perf_counter()
            self.time_wordsegment()
            return self.peer_chars / (time.perf_counter() - start)

        track_wordsegment_chars_per_s.unit = "chars/s"


class RawTextSuite:
    """Raw text through :meth:`grapheme.Segmenter.words` beside
    :meth:`~grapheme.Segmenter.segment` of its words alone, already
    normalised (``"".join(words_of(line))``): what finding the words and
    mapping their pieces back to the text costs. Lines of the standard
    library's docstrings (capitals, punctuation, digits), 200k characters.
    ``python -m bench`` prints ``time_segment_letters / time_words``, below
    1 as ``words`` takes longer (0.69 measured: 261 against 179 ms, d = 32,
    2 layers, 2 cores)."""

    ratios = [("time_words", "time_segment_letters")]
    timeout = 300

    def setup(self):
        from grapheme.data import stdlib_documents, words_of

        self.model = _model()
        text = "\n".join(t for _, t in stdlib_documents())[:200_000]
        self.lines = text.split("\n")
        self.letters = ["".join(words_of(line)) for line in self.lines]
        self.model.words(self.lines[:100])   # warm the buffers and the word pattern

    def time_words(self):
        self.model.words(self.lines)

    def time_segment_letters(self):
        self.model.segment(self.letters)
