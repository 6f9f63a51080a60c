"""A trained model for use: text in, segments out.

:class:`Segmenter` bundles what inference needs (the embedding, the
optional encoder and the morpher) and nothing a run needs to continue
(optimiser state, loss, history): it is what :attr:`Trainer.model
<grapheme.Trainer.model>` gives and what ``grapheme segment`` and
``grapheme show`` read.
"""
import numbers
import os
import threading

import numpy as np

from ._threads import single_pool
from ._validation import (check_allocation, check_model, check_path, check_scalar,
                          check_unicode, exact_str, settings_checked, settings_unchanged)
from ._workspace import Workspace
from .checkpoint import MODEL_KIND, _new_file, load_checkpoint, save_checkpoint
from .data import continues_cluster
from .embedding import Embedding
from .encoder import Encoder
from .graph import Graph, _codes_of
from .morph import Morpher
from .ops import merge_threshold
from .train.state import build, check_sizes, describe

__all__ = ["Segmenter", "MODEL_VERSION", "WINDOW_MEMORY"]

#: Version of the model file format written by :meth:`Segmenter.save`.
MODEL_VERSION = 1

#: Bytes of buffers one inference call may take by default: the default
#: :attr:`Segmenter.window` is as many characters as fit.
WINDOW_MEMORY = 256 * 2**20

#: Largest :attr:`Segmenter.window`: more characters than any text can have.
MAX_WINDOW = 2**62

def _offsets(texts):
    """Where each of ``texts`` starts in their concatenation, and its end:
    int64 (len(texts) + 1,)."""
    offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, texts), dtype=np.int64, count=len(texts)), out=offsets[1:])
    return offsets


def _code_points(text, name):
    """The code points of ``text`` (a separator) as UTF-32-LE units, to
    insert among a text's; TypeError or ValueError naming ``name``."""
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a str, got {type(text).__name__}")
    return _codes_of(text, name).astype("<u4")


#: The components checked again where used when assigned since construction.
_COMPONENTS = ("embedding", "morpher", "encoder")
#: The arrays of every model file (an encoder's are ``encoder.*`` besides).
_MODEL_ARRAYS = ("embedding.codes", "embedding.weight", "morpher.theta")


class Segmenter:
    """Segment text with a trained embedding, encoder and morpher.

    Inference is the hard morph (:meth:`Morpher.predict
    <grapheme.Morpher.predict>`) of the texts' chain graph, many texts in
    one batched graph: lookup, encoder and merge run in the compiled core
    and BLAS, Python only splits the result per text. It never changes the
    model: characters without a row of their own read the embedding's
    unknown row (:data:`grapheme.embedding.UNKNOWN`). A segment never
    starts inside a written character: where the merge would cut before a
    combining mark or a zero-width joiner, or after a joiner
    (:func:`grapheme.data.continues_cluster`), the character stays whole
    (``evaluate``'s boundary metrics count the same segments).

    Memory is bounded whatever the input: texts are segmented in calls of
    at most :attr:`window` characters. A text longer than that is cut into
    overlapping windows, and each window's decisions are kept only where
    they cannot see the cut, which gives exactly the decisions of the whole
    text (see :attr:`window`; at widths where BLAS rounds a row by its place
    in a product, such as ``d = 33``, up to a score within the last bits of
    the threshold); shorter texts are packed whole into calls.

    Parameters
    ----------
    embedding : Embedding
    morpher : Morpher
        Its threshold ``theta`` and temperature are used; its estimator and
        rate controller matter only to training.
    encoder : Encoder, optional
        Context before the merge (``encoder.dim == embedding.dim``).
    window : int, optional
        Characters per inference call (:attr:`window`); by default as many
        as fit in :data:`WINDOW_MEMORY` bytes of buffers.

    Notes
    -----
    The components are shared, not copied (:meth:`copy` makes a
    snapshot): the model of a :class:`~grapheme.Trainer` follows its
    training. Inference only reads them, so threads may share a model.

    Examples
    --------
    >>> model = Segmenter(Embedding(dim=8, seed=0), Morpher(threshold=-10.0))
    >>> model.segment("aabc")                 # tau near 0: every edge merges
    ['aabc']
    >>> model.segment(["ab", "", "xyz"])
    [['ab'], [], ['xyz']]
    >>> [b.tolist() for b in model.boundaries(["ab", "xyz"])]
    [[0], [0]]
    >>> model.embedding.weight.shape          # unseen characters: the unknown row
    (1, 8)
    """

    def __init__(self, embedding, morpher, encoder=None, window=None):
        check_model(embedding, morpher, encoder)
        self.embedding, self.morpher, self.encoder = embedding, morpher, encoder
        self.window = window
        settings_checked(self, _COMPONENTS)
        self._local = threading.local()   # per-thread inference buffers

    def __getstate__(self):   # copy.deepcopy, pickling (to worker processes)
        state = self.__dict__.copy()
        del state["_local"]   # buffers, made again on first use
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._local = threading.local()

    def _check_components(self):
        """The components as set now: checked again (:func:`check_model`)
        where one was assigned since construction, and the window with them
        (its least size and its default follow the encoder's layers)."""
        if settings_unchanged(self, _COMPONENTS):
            return
        check_model(self.embedding, self.morpher, self.encoder)
        self.window = None if self._default_window else self._window
        settings_checked(self, _COMPONENTS)

    # ----------------------------------------------------------------- window
    @property
    def window(self):
        """Most characters segmented in one call into the compiled core.

        A call's buffers take about ``8 d (3 + 5 K)`` bytes per character
        (half that in float32; ``d`` the embedding's width, ``K`` the
        encoder's layers: the lookup,
        per layer ``[h, P, S]``, the product and the output, then the
        queries and keys), so the window bounds the memory of inference
        whatever the length of a text. The default is as many characters as
        fit in :data:`WINDOW_MEMORY` (256 MiB): 40 329 at ``d = 64`` with 2
        layers. Texts that fit are packed whole into calls; a longer text is
        cut into windows overlapping by :meth:`context` characters, whose
        decisions are exactly those of the uncut text (see the class notes
        for odd widths). Set it to any integer
        of at least ``2 K + 2`` (the two overlaps and one kept character).
        """
        self._check_components()   # a replaced encoder's window
        return self._window

    @window.setter
    def window(self, value):
        before, after = self.context()
        least = before + after + 1
        default = value is None
        if default:
            value = max(least, WINDOW_MEMORY // self._bytes_per_character())
        elif isinstance(value, numbers.Integral) and not isinstance(value, bool) \
                and value < least:
            raise ValueError(f"window must be >= {least} (2 * encoder layers + 2: the "
                             f"context on both sides of a cut and one character), got "
                             f"{value!r}")
        # the upper bound keeps window arithmetic in int64 (numpy's searchsorted)
        self._window = check_scalar(value, "window", lower=least, upper=MAX_WINDOW,
                                    integer=True)
        self._default_window = default

    def context(self):
        """``(before, after)``: the characters a window needs on each side of
        those whose decisions it keeps.

        Node ``v`` starts a segment unless edge ``(v - 1, v)`` merges, which
        compares the encoder's features of ``v - 1`` and ``v``; with ``K``
        message-passing layers (one hop each) those depend on the characters
        ``v - 1 - K`` to ``v + K`` and on nothing else. A window's decision
        for ``v`` is therefore the uncut text's when it holds ``K + 1``
        characters before ``v`` and ``K`` after it, or reaches the text's
        end on that side.
        """
        layers = 0 if self.encoder is None else self.encoder.layers
        return layers + 1, layers

    def _bytes_per_character(self):
        layers = 0 if self.encoder is None else self.encoder.layers
        return self.embedding.dtype.itemsize * self.embedding.dim * (3 + 5 * layers)

    # -------------------------------------------------------------- inference
    def _decide(self, texts, similarity=False):
        """Whether each character of ``texts`` (concatenated) starts a
        segment under the hard morph: one call, all texts in one graph.
        ``similarity``: instead, the similarity of each character's edge
        from its predecessor, which the merge compares with ``tau`` (-inf
        at a text's first character, which has none)."""
        g = Graph.from_texts(texts)
        emb = self.embedding
        n = g.num_nodes
        check_allocation(self._bytes_per_character() * n,
                         f"segmenting {n} characters at once (Segmenter.window)")
        with emb._lock:   # rows and the table they index belong together
            rows = emb._rows(g.labels.astype(np.int64), False)
            if self.encoder is None:
                H = np.take(emb.weight, rows, axis=0,
                            out=self._workspace()("lookup", (n, emb.dim)))
            else:   # a copy of the rows read, and each character's among them
                used, rows = np.unique(rows, return_inverse=True)
                table = emb.weight[used]
        with single_pool(self.encoder is not None):   # see grapheme/_threads.py
            if self.encoder is None:
                encoded = (H,)
            else:   # as the Trainer calls it: the same bits
                encoded = tuple(self.encoder._forward_lookup(
                    g, table, rows.reshape(-1).astype(np.int64, copy=False),
                    self._workspace(), "Embedding.weight")[0])
            # a segment never starts inside a written character (a mark
            # after its letter: a helper's Hindi model printed "स|े")
            joined = continues_cluster(g.labels)[g.indices]
            if similarity:
                sim = np.full(n, -np.inf)
                sim[g.indices] = np.where(joined, np.inf, self.morpher.similarity(g, *encoded))
                return sim
            merged = self.morpher.decide(g, *encoded) | joined
        starts = np.ones(n, dtype=bool)
        starts[g.indices[merged]] = False   # a chain: v merges into its predecessor
        return starts

    def _pieces(self, texts, offsets, similarity=False):
        """The decisions of ``texts``, a call of at most :attr:`window`
        characters at a time: yields ``(i, j, a, b, starts)``, ``starts``
        being those of the characters ``a:b`` of the texts' concatenation
        (``offsets`` their starts), which lie in ``texts[i:j]``. Either
        ``texts[i:j]`` whole (``a == offsets[i]``, ``b == offsets[j]``),
        texts packed into one call; or a part of ``texts[i]`` (``j == i +
        1``), one window of a text longer than the window. In order, every
        character once. Python loops per call, never per character.
        ``similarity``: the similarities of :meth:`_decide` in place of
        ``starts``."""
        self._check_components()
        window = self._window
        before, after = self.context()
        step = window - before - after   # characters a window of a long text keeps
        count, i = len(texts), 0
        while i < count:
            length = int(offsets[i + 1] - offsets[i])
            if length <= window:
                # the texts from i on whose characters fit in one call
                j = int(np.searchsorted(offsets, offsets[i] + window, side="right")) - 1
                a, b = int(offsets[i]), int(offsets[j])
                yield i, j, a, b, (self._decide(texts[i:j], similarity) if b > a else
                                   np.ones(0, np.float64 if similarity else bool))
                i = j
                continue
            text, base = texts[i], int(offsets[i])
            for s in range(0, length, step):
                e = min(s + step, length)
                lo, hi = max(0, s - before), min(length, e + after)
                starts = self._decide([text[lo:hi]], similarity)
                yield i, i + 1, base + s, base + e, starts[s - lo:e - lo]
            i += 1

    def _starts(self, texts):
        """``(offsets, positions)``: where each text starts in the texts'
        concatenation, and the positions in it of every segment start."""
        offsets = _offsets(texts)
        parts = [a + np.flatnonzero(starts) for _, _, a, _, starts in
                 self._pieces(texts, offsets)]
        positions = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        return offsets, positions

    def _workspace(self):
        """This thread's :class:`~grapheme._workspace.Workspace`: inference
        reuses its arrays from call to call (a fresh (n, d) array per product
        made inference several times slower on page faults alone)."""
        ws = getattr(self._local, "workspace", None)
        if ws is None or ws.dtype != self.embedding.dtype:
            ws = self._local.workspace = Workspace(self.embedding.dtype)
        return ws

    @staticmethod
    def _texts(texts, name="texts"):
        """``(list of str, whether one str was given)``; a lone surrogate
        (not Unicode) is refused here, before anything runs."""
        if isinstance(texts, str):
            texts, single = [texts], True
        elif not hasattr(texts, "__iter__") or isinstance(texts, (bytes, bytearray)):
            raise TypeError(f"{name} must be a str or a sequence of str, got "
                            f"{type(texts).__name__}")
        else:
            try:
                texts, single = list(texts), False
            except TypeError:   # iterable in name only: a 0-d numpy array
                raise TypeError(f"{name} must be a str or a sequence of str, got "
                                f"{type(texts).__name__}") from None
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"{name}[{i}] must be a str, got {type(t).__name__}")
            texts[i] = t = exact_str(t)
            check_unicode(t, f"{name}[{i}]")
        return texts, single

    def segment(self, texts):
        """The segments of a text, or of every text of a sequence.

        Parameters
        ----------
        texts : str or sequence of str

        Returns
        -------
        list of str, or list of list of str
            For one ``str``, its segments (an empty text has none); for a
            sequence, one such list per text. The segments of a text join to
            the text.
        """
        texts, single = self._texts(texts)
        offsets, positions = self._starts(texts)
        joined = "".join(texts)
        cuts = np.searchsorted(positions, offsets).tolist()
        bounds = positions.tolist() + [len(joined)]
        # text i's segments start at bounds[cuts[i]:cuts[i + 1]]
        segments = [joined[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        out = [segments[a:b] for a, b in zip(cuts[:-1], cuts[1:])]
        return out[0] if single else out

    def boundaries(self, texts):
        """Where the segments of each text start (character offsets).

        Parameters
        ----------
        texts : str or sequence of str

        Returns
        -------
        ndarray of int64, or list of them
            For one ``str``, the offsets (0 first, when the text is not
            empty) of its segments; for a sequence, one array per text.
        """
        texts, single = self._texts(texts)
        offsets, positions = self._starts(texts)
        cuts = np.searchsorted(positions, offsets).tolist()
        out = [positions[a:b] - offsets[i]
               for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:]))]
        return out[0] if single else out

    def join(self, texts, sep=" "):
        """Each text with ``sep`` between its segments (one str per text).

        Examples
        --------
        >>> Segmenter(Embedding(dim=4), Morpher(threshold=-10.0)).join(["ab", "c"], sep="|")
        ['ab', 'c']
        """
        texts, single = self._texts(texts)
        out, parts = [], []
        for piece, ends in self._joined(texts, sep, ""):
            start = 0
            for end in ends:   # the texts this piece completes
                parts.append(piece[start:end])
                out.append("".join(parts))
                parts, start = [], end
            parts.append(piece[start:])
        return out[0] if single else out

    def boundary_scores(self, texts):
        """How sure the model is of every boundary: the probability that a
        segment starts at each character.

        ``1 - p`` for the merge probability ``p = sigmoid((s - tau) / T)``
        of the edge from the character's predecessor (``s`` its similarity,
        ``tau`` the threshold, ``T`` the morpher's temperature: the
        probability the soft estimators train with), 1 at a text's first
        character, 0 where a character continues the one before it (a
        combining mark: no segment starts there). The hard morph's segments
        start where the score is above one half and not where it is below
        (its rule is ``s <= tau``; a score within rounding of one half is a
        tie that rule decides); a score near one half is a close call.

        Parameters
        ----------
        texts : str or sequence of str

        Returns
        -------
        ndarray of float64, or list of them
            For one ``str``, one score per character; for a sequence, one
            such array per text.

        Examples
        --------
        >>> model = Segmenter(Embedding(dim=4), Morpher(threshold=-10.0))
        >>> model.boundary_scores("aab").round(3).tolist()   # every edge merges
        [1.0, 0.0, 0.0]
        """
        texts, single = self._texts(texts)
        offsets, _, scores = self._scored(texts)
        out = [scores[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
        return out[0] if single else out

    def _scored(self, texts):
        """``(offsets, starts, scores)`` of checked ``texts`` from one pass:
        where each text starts in their concatenation, whether each
        character starts a segment (the hard morph's rule, ``s <= tau``, on
        the similarities :meth:`_decide` compares: :meth:`boundaries`'
        decisions) and :meth:`boundary_scores`' scores."""
        offsets = _offsets(texts)
        tau, T = merge_threshold(self.morpher.theta), self.morpher.temperature
        parts = [sim for *_, sim in self._pieces(texts, offsets, similarity=True)]
        sim = np.concatenate(parts) if parts else np.zeros(0)
        with np.errstate(over="ignore"):   # exp(inf) at a text's start: score 1
            scores = 1.0 / (1.0 + np.exp((sim - tau) / T))
        return offsets, ~(sim > tau), scores

    # ------------------------------------------------------------- raw text
    def _word_pieces(self, texts, read=None):
        """``(offsets, spans, first)`` of raw ``texts``: where each text starts
        in their concatenation, the ``[start, end)`` (k, 2) of every piece of
        their words (:func:`~grapheme.data.word_spans_of`) in it, in order,
        and whether each piece is the first of its word. The words of all
        texts are segmented in calls of at most :attr:`window` characters;
        a cut inside one character of the text (one its normalisation made
        two of) is not made. ``read``, a set, gets the characters of the
        words, the model's input (``grapheme segment``'s note of the unseen
        ones)."""
        from .data import _word_spans_of_texts

        offsets = _offsets(texts)
        words, start, end = _word_spans_of_texts(texts)
        if read is not None:
            read.update("".join(words))
        word_offsets, positions = self._starts(words)
        inside = np.zeros(positions.shape[0], dtype=bool)
        inside[1:] = start[positions[1:]] == start[positions[1:] - 1]
        positions = positions[~inside]
        stop = np.append(positions[1:], start.shape[0])[:positions.shape[0]].astype(np.int64)
        spans = np.stack([start[positions], end[stop - 1]], axis=1)
        first = np.isin(positions, word_offsets)
        # a piece that goes on a word starts where the last one ended: a
        # dropped apostrophe between them is the later one's ("they", "'ll";
        # it was in neither: a new user's find)
        goes_on = np.flatnonzero(~first)
        spans[goes_on, 0] = spans[goes_on - 1, 1]
        return offsets, spans, first

    def word_spans(self, texts):
        """Where the pieces of the words of raw text lie in it.

        The words are those ``grapheme generate --task words`` trains on
        (:func:`grapheme.data.words_of`: runs of letters, in NFC, lowercased,
        apostrophes between letters dropped), found in ``texts`` as given;
        each is segmented and its pieces mapped back to the text. Digits,
        punctuation and whitespace are in no piece. So a model trained on
        words cuts ``"Thecat sat."`` as ``"The"``, ``"cat"``, ``"sat"``:
        :meth:`segment` would see the capital, the space and the full stop,
        characters such a model never saw.

        Parameters
        ----------
        texts : str or sequence of str

        Returns
        -------
        ndarray of int64 of shape (k, 2), or list of them
            For one ``str``, the ``[start, end)`` offsets of its k pieces, in
            order (``text[start:end]`` is a piece, in the text's own
            spelling); for a sequence, one such array per text.

        Examples
        --------
        >>> model = Segmenter(Embedding(dim=4), Morpher(threshold=-10.0))
        >>> model.word_spans("Don't panic!").tolist()      # every edge merges
        [[0, 5], [6, 11]]
        """
        texts, single = self._texts(texts)
        out = self._word_spans(texts)
        return out[0] if single else out

    def _word_spans(self, texts, read=None):
        """:meth:`word_spans` of ``texts`` (a list); ``read`` as in
        :meth:`_word_pieces`."""
        offsets, spans, _ = self._word_pieces(texts, read)
        cuts = np.searchsorted(spans[:, 0], offsets).tolist()
        return [spans[a:b] - offsets[i] for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:]))]

    def words(self, texts):
        """The pieces of the words of raw text, in its own spelling
        (:meth:`word_spans`): a list of str for one ``str``, else one list
        per text.

        Examples
        --------
        >>> Segmenter(Embedding(dim=4), Morpher(threshold=-10.0)).words("Don't panic!")
        ["Don't", 'panic']
        """
        texts, single = self._texts(texts)
        out = []
        for text, spans in zip(texts, self.word_spans(texts)):
            out.append([text[a:b] for a, b in spans.tolist()])
        return out[0] if single else out

    def split_words(self, texts, sep=" "):
        """Each raw text as given, with ``sep`` inserted where the model cuts
        one of its words (:meth:`word_spans`): ``"Thecat sat."`` becomes
        ``"The cat sat."``. One str per text, or one for one ``str``.

        Memory: the words are segmented in windows, as :meth:`segment`
        does, but the map from their characters back to the texts holds
        40 to 120 bytes per character of the texts given."""
        texts, single = self._texts(texts)
        out = self._split_words(texts, sep, "")
        return out[0] if single else out

    def _split_words(self, texts, sep, end, read=None):
        """:meth:`split_words` of ``texts`` (a list) with ``end`` after each;
        numpy on the texts' code points, no Python step per character;
        ``read`` as in :meth:`_word_pieces`."""
        s, e = _code_points(sep, "sep"), _code_points(end, "end")
        offsets, spans, first = self._word_pieces(texts, read)
        codes = np.frombuffer("".join(texts).encode("utf-32-le"), dtype="<u4")
        inner = spans[~first, 0]
        where = np.concatenate([np.repeat(inner, s.shape[0]),
                                np.repeat(offsets[1:], e.shape[0])])
        what = np.concatenate([np.tile(s, inner.shape[0]), np.tile(e, len(texts))])
        joined = np.insert(codes, where, what).tobytes().decode("utf-32-le")
        # text i ends after its characters, its separators and i + 1 ends
        bounds = (offsets[1:] + np.searchsorted(inner, offsets[1:]) * s.shape[0]
                  + np.arange(1, len(texts) + 1) * e.shape[0]).tolist()
        return [joined[a:b] for a, b in zip([0] + bounds[:-1], bounds)]

    def _joined(self, texts, sep, end):
        """All texts with ``sep`` between segments and ``end`` after each
        text, in pieces of at most about :attr:`window` characters: yields
        ``(str, ends)``, ``ends`` where the texts the piece completes end in
        it (after their ``end``). Everything per character is numpy; memory
        beyond the texts is a window's."""
        s, e = _code_points(sep, "sep"), _code_points(end, "end")
        offsets = _offsets(texts)
        for i, j, a, b, start in self._pieces(texts, offsets):
            whole = a == offsets[i] and b == offsets[j]
            if whole:
                text = "".join(texts[i:j])
                begins = offsets[i:j] - a            # no separator before a text
                done = offsets[i + 1:j + 1] - a      # these texts end here
            else:
                text = texts[i][a - offsets[i]:b - offsets[i]]
                begins = [0] if a == offsets[i] else []
                done = [b - a] if b == offsets[i + 1] else []
            codes = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
            start = start.copy()
            begins = np.asarray(begins, dtype=np.int64)
            start[begins[begins < start.shape[0]]] = False
            inner = np.flatnonzero(start)
            done = np.asarray(done, dtype=np.int64)
            # inserted before position p: a separator at every inner start,
            # an end at each text's end (np.insert is stable: in order)
            where = np.concatenate([np.repeat(inner, s.shape[0]),
                                    np.repeat(done, e.shape[0])])
            what = np.concatenate([np.tile(s, inner.shape[0]), np.tile(e, done.shape[0])])
            out = np.insert(codes, where, what)
            # a text ends after its characters, the separators before its
            # end and the ends up to its own
            ends = (done + np.searchsorted(inner, done) * s.shape[0]
                    + np.arange(1, done.shape[0] + 1) * e.shape[0])
            yield out.tobytes().decode("utf-32-le"), ends.tolist()

    # ------------------------------------------------------------- save, load
    def config(self):
        """The components as :func:`~grapheme.train.state.describe` gives them."""
        self._check_components()
        return {"embedding": describe(self.embedding), "morpher": describe(self.morpher),
                "encoder": describe(self.encoder)}

    def _arrays(self):
        arrays = {"embedding.codes": self.embedding.codes,
                  "embedding.weight": self.embedding.weight,
                  "morpher.theta": self.morpher.theta}
        if self.encoder is not None:
            arrays.update({"encoder." + k: v for k, v in self.encoder.params.items()})
        return arrays

    def save(self, path, overwrite=False):
        """Write the weights and the configuration to ``path`` (atomic ``.npz``).

        No optimiser state, loss or history: a model file is for inference
        (or to start a new run from, :meth:`Trainer.from_model
        <grapheme.Trainer.from_model>`). Versioned (:data:`MODEL_VERSION`),
        without pickle (:func:`~grapheme.checkpoint.save_checkpoint`).

        Parameters
        ----------
        path : str or os.PathLike
        overwrite : bool, default False
            Replace an existing file; without it one is refused.

        Raises
        ------
        IsADirectoryError
            If ``path`` is a directory or ends with a separator.
        FileExistsError
            If ``path`` exists and ``overwrite`` is false.
        """
        path = _new_file(path, overwrite, "model file")
        meta = {"kind": MODEL_KIND, "version": MODEL_VERSION, "config": self.config()}
        save_checkpoint(path, self._arrays(), meta)

    @classmethod
    def load(cls, path):
        """A model from a file written by :meth:`save`, or from a training
        checkpoint (:meth:`Trainer.save <grapheme.Trainer.save>`: its
        weights, the rest ignored).

        Raises
        ------
        FileNotFoundError
            If ``path`` does not exist.
        ValueError
            If the file is not a grapheme model or checkpoint, is of a newer
            model version, or is corrupted.
        """
        arrays, meta = load_checkpoint(path, required=_MODEL_ARRAYS)
        path = check_path(path, "path")
        if meta.get("kind") == MODEL_KIND:
            version = meta.get("version")
            if type(version) is not int or version != MODEL_VERSION:   # not True
                raise ValueError(f"model {path!r} has model version "
                                 f"{meta.get('version')!r}; this grapheme reads "
                                 f"version {MODEL_VERSION}")
        elif not ("epoch" in meta and "config" in meta):
            raise ValueError(f"{path!r} is neither a grapheme model nor a training "
                             "checkpoint")
        try:
            return cls._from_arrays(meta["config"], arrays)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"model {path!r} is corrupted or unusable: {exc}") from None

    @classmethod
    def _from_arrays(cls, config, arrays):
        check_sizes(config, arrays)
        embedding, morpher = build(config["embedding"]), build(config["morpher"])
        encoder = build(config.get("encoder"))
        if not (isinstance(embedding, Embedding) and isinstance(morpher, Morpher)
                and (encoder is None or isinstance(encoder, Encoder))):
            raise ValueError("the configuration names the wrong component types")
        embedding.load_state_dict({"codes": arrays["embedding.codes"],
                                   "weight": np.asarray(arrays["embedding.weight"])})
        theta = np.asarray(arrays["morpher.theta"])
        if theta.shape != () or theta.dtype != np.float64 or not np.isfinite(theta):
            raise ValueError("morpher.theta is not a finite float64 scalar")
        morpher.theta[...] = theta
        unknown = sorted(k for k in arrays if k not in _MODEL_ARRAYS
                         and not k.startswith("optimizer.")   # a training checkpoint's
                         and not (encoder is not None and k.startswith("encoder.")))
        if unknown:   # e.g. an encoder's weights under a configuration without one
            raise ValueError(f"it holds arrays its configuration has no place for: "
                             f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
        if encoder is not None:
            encoder.load_state_dict({k[len("encoder."):]: v for k, v in arrays.items()
                                     if k.startswith("encoder.")})
        return cls(embedding, morpher, encoder)

    def copy(self):
        """A model with copies of this one's parameters (a snapshot), and
        its :attr:`window`."""
        model = type(self)._from_arrays(self.config(), {k: np.array(v) for k, v in
                                                        self._arrays().items()})
        model.window = None if self._default_window else self.window
        return model

    def __repr__(self):
        return (f"Segmenter({self.embedding!r}, tau={self.morpher.tau:.4f}, "
                f"encoder={self.encoder!r})")
