"""A trained model for use: text in, segments out.

:class:`Segmenter` bundles what inference needs (the embedding, the
optional encoder and the morpher) and nothing a run needs to continue
(optimiser state, loss, history): it is what :attr:`Trainer.model
<grapheme.Trainer.model>` gives and what ``grapheme segment`` and
``grapheme show`` read.
"""
import errno
import os
import threading

import numpy as np

from ._validation import check_allocation, check_model
from ._workspace import Workspace
from .checkpoint import MODEL_KIND, load_checkpoint, save_checkpoint
from .embedding import Embedding
from .encoder import Encoder
from .graph import Graph
from .morph import Morpher
from .train.state import build, describe

__all__ = ["Segmenter", "MODEL_VERSION"]

#: Version of the model file format written by :meth:`Segmenter.save`.
MODEL_VERSION = 1


class Segmenter:
    """Segment text with a trained embedding, encoder and morpher.

    Inference is the hard morph (:meth:`Morpher.predict
    <grapheme.Morpher.predict>`) of the texts' chain graph, all texts in one
    batched graph: lookup, encoder and merge run in the compiled core and
    BLAS, Python only splits the result per text. It never changes the
    model: characters without a row of their own read the embedding's
    unknown row (:data:`grapheme.embedding.UNKNOWN`).

    Parameters
    ----------
    embedding : Embedding
    morpher : Morpher
        Its threshold ``theta`` and temperature are used; its estimator and
        rate controller matter only to training.
    encoder : Encoder, optional
        Context before the merge (``encoder.dim == embedding.dim``).

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

    def __init__(self, embedding, morpher, encoder=None):
        check_model(embedding, morpher, encoder)
        self.embedding, self.morpher, self.encoder = embedding, morpher, encoder
        self._local = threading.local()   # per-thread inference buffers

    # -------------------------------------------------------------- inference
    def _predict(self, texts):
        """``(graph, starts)`` of a batch of texts: ``starts[i]`` says
        whether node ``i`` starts a segment under the hard morph."""
        g = Graph.from_texts(texts)
        emb = self.embedding
        n = g.num_nodes
        # the lookup, then per layer [h, P, S], t and the output, then the
        # queries and keys: (3 + 5 layers) rows of d doubles per character
        layers = 0 if self.encoder is None else self.encoder.layers
        check_allocation(emb.dtype.itemsize * emb.dim * (3 + 5 * layers) * n,
                         f"segmenting {n} characters at once (the longest text is "
                         f"segmented in one piece)")
        with emb._lock:   # rows and the table they index belong together
            rows = emb._rows(g.labels.astype(np.int64), False)
            H = np.take(emb.weight, rows, axis=0, out=self._workspace()("lookup", (n, emb.dim)))
        encoded = (H,) if self.encoder is None else tuple(
            self.encoder.forward(g, H, self._workspace())[0])
        merged = self.morpher.decide(g, *encoded)
        starts = np.ones(n, dtype=bool)
        starts[g.indices[merged]] = False   # a chain: v merges into its predecessor
        return g, starts

    def _workspace(self):
        """This thread's :class:`~grapheme._workspace.Workspace`: inference
        reuses its arrays from call to call (a fresh (n, d) array per product
        made inference several times slower on page faults alone)."""
        ws = getattr(self._local, "workspace", None)
        if ws is None:
            ws = self._local.workspace = Workspace(self.embedding.dtype)
        return ws

    @staticmethod
    def _texts(texts, name="texts"):
        """``(list of str, whether one str was given)``."""
        if isinstance(texts, str):
            return [texts], True
        if not hasattr(texts, "__iter__"):
            raise TypeError(f"{name} must be a str or a sequence of str, got "
                            f"{type(texts).__name__}")
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"{name}[{i}] must be a str, got {type(t).__name__}")
        return texts, False

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
        g, starts = self._predict(texts)
        joined = "".join(texts)
        positions = np.flatnonzero(starts)
        cuts = np.searchsorted(positions, g.graph_offsets).tolist()
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
        g, starts = self._predict(texts)
        offsets = g.graph_offsets
        positions = np.flatnonzero(starts)
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
        codes, ends = self._joined_codes(texts, sep, "")
        joined = codes.tobytes().decode("utf-32-le", "surrogatepass")
        bounds = [0] + ends.tolist()
        out = [joined[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        return out[0] if single else out

    def _joined_codes(self, texts, sep, end):
        """All texts with ``sep`` between segments and ``end`` after each
        text, as one uint32 array of code points, and the end offset of each
        text in it. Everything per character is numpy."""
        if not isinstance(sep, str) or not isinstance(end, str):
            raise TypeError("sep and end must be str")
        g, start = self._predict(texts)
        offsets = g.graph_offsets
        codes = g.labels.astype(np.uint32)
        start[offsets[:-1][offsets[:-1] < codes.shape[0]]] = False   # text starts
        inner = np.flatnonzero(start)
        s = np.frombuffer(sep.encode("utf-32-le"), dtype="<u4").astype(np.uint32)
        e = np.frombuffer(end.encode("utf-32-le"), dtype="<u4").astype(np.uint32)
        # inserted before position p: a separator at every inner start, the
        # end of text b before offsets[b + 1] (np.insert is stable: in order)
        where = np.concatenate([np.repeat(inner, s.shape[0]),
                                np.repeat(offsets[1:], e.shape[0])])
        what = np.concatenate([np.tile(s, inner.shape[0]), np.tile(e, len(texts))])
        out = np.insert(codes, where, what)
        # text b ends after its characters, the separators inside texts 0..b
        # and b + 1 ends
        seps_before = np.searchsorted(inner, offsets[1:]) * s.shape[0]
        ends = offsets[1:] + seps_before + np.arange(1, len(texts) + 1) * e.shape[0]
        return out, ends

    # ------------------------------------------------------------- save, load
    def config(self):
        """The components as :func:`~grapheme.train.state.describe` gives them."""
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
        FileExistsError
            If ``path`` exists and ``overwrite`` is false.
        """
        path = os.fspath(path)
        if not overwrite and os.path.exists(path):
            raise FileExistsError(errno.EEXIST, "model file already exists (pass "
                                                "overwrite=True to replace it)", path)
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
        arrays, meta = load_checkpoint(
            path, required=("embedding.codes", "embedding.weight", "morpher.theta"))
        path = os.fspath(path)
        if meta.get("kind") == MODEL_KIND:
            if meta.get("version") != MODEL_VERSION:
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
        embedding, morpher = build(config["embedding"]), build(config["morpher"])
        encoder = build(config.get("encoder"))
        if not (isinstance(embedding, Embedding) and isinstance(morpher, Morpher)
                and (encoder is None or isinstance(encoder, Encoder))):
            raise ValueError("the configuration names the wrong component types")
        weight = np.asarray(arrays["embedding.weight"])
        if weight.ndim != 2 or weight.shape[1] != embedding.dim:
            raise ValueError(f"embedding.weight has shape {weight.shape}, the "
                             f"configuration says dim={embedding.dim}")
        embedding.load_state_dict({"codes": arrays["embedding.codes"], "weight": weight})
        theta = np.asarray(arrays["morpher.theta"])
        if theta.shape != () or theta.dtype != np.float64 or not np.isfinite(theta):
            raise ValueError("morpher.theta is not a finite float64 scalar")
        morpher.theta[...] = theta
        if encoder is not None:
            encoder.load_state_dict({k[len("encoder."):]: v for k, v in arrays.items()
                                     if k.startswith("encoder.")})
        return cls(embedding, morpher, encoder)

    def copy(self):
        """A model with copies of this one's parameters (a snapshot)."""
        return type(self)._from_arrays(self.config(), {k: np.array(v) for k, v in
                                                       self._arrays().items()})

    def __repr__(self):
        return (f"Segmenter({self.embedding!r}, tau={self.morpher.tau:.4f}, "
                f"encoder={self.encoder!r})")
