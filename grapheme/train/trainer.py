"""The training loop: batches of text pairs through embedding, morpher and loss.

One step takes ``B`` pairs ``(input, target)``, builds ONE batched chain graph
of the inputs and one of the targets, and runs the operations of
:mod:`grapheme.ops` forward, then their vjps in reverse::

    H = table[rows]                              # Lookup
    # with an encoder (grapheme train's default): H, queries, keys =
    #     encoder.forward_lookup(g, table, rows); the merge scores are then
    #     cos(queries[u], keys[v]), and encoder.vjp gives the table's gradient
    morphed = morpher.forward(g, H)              # similarity, scores, estimator, rate
    a = mean(morphed.graph.features, axis=1)     # FeatureMean
    res = loss.forward(morphed.graph, target)    # mean over the B pairs
    lg = loss.backward(res)
    grad = morpher.vjp(morphed, FeatureMean.vjp(lg.activation), lg.mass, lg.weights, ...)
    grad_table = Lookup.vjp(grad.features) (+ the target side, see ``target_activation``)
    optimizer.step({"embedding": table, "theta": theta}, {...})
    morpher.step(morphed, res.values)            # estimator state, rate controller

Everything per node happens inside those calls (the compiled core); Python
loops only over batches and epochs.
"""
import copy as _copy
import functools
import hashlib
import json
import math
import os
import threading
import time
import warnings

import numpy as np

from .. import _core
from .._validation import (KEEP, as_float_array, check_allocation, check_model, check_pairs,
                           check_bool, check_path, check_scalar, settings_checked,
                           settings_unchanged,
                           show)
from .._threads import single_pool
from .._workspace import Workspace
from ..checkpoint import (MODEL_KIND, _atomic_open, _new_file, _not_a_file_error,
                          load_checkpoint, save_checkpoint)
from ..embedding import Embedding
from ..encoder import LayerOverflowError, check_training_memory
from ..graph import Graph, replicate
from ..loss import StructuralLoss
from ..ops import FeatureMean, HardMerge, Lookup, feature_mean
from .. import optim as _optim
from ..data import continues_cluster, segment_lengths
from ..distributed import Communicator, check_rank, shard_bounds
from .progress import Progress, summary_line
from .metrics import (LOSS_KEYS, SEGMENTATION_COUNTS, SEGMENTATION_KEYS, segmentation_counts,
                      segmentation_scores, structure_match, upgrade_record)
from .state import build, check_sizes, describe, registry

__all__ = ["Trainer", "UNKNOWN_PROB"]

TARGET_ACTIVATIONS = ("embedding", "graph")

#: Default :attr:`Trainer.unknown_prob` (also ``grapheme train``'s): the
#: share of training characters read through the unknown row, which is how
#: that row learns to stand for characters never seen in training.
UNKNOWN_PROB = 0.01

#: The trainer's own settings that are checked again where used when
#: assigned since construction (:meth:`Trainer._check_settings`).
_SETTINGS = ("batch_size", "target_activation", "unknown_prob", "overwrite", "progress",
             "log", "embedding", "morpher", "encoder", "loss", "optimizer", "comm")

#: The ``unknown_prob`` of a checkpoint whose configuration has none: it
#: was written before the unknown row existed, when no character was
#: replaced, so 0 resumes it exactly as it would have continued.
_UNRECORDED_UNKNOWN_PROB = 0.0


def _check_comm(comm):
    """``Trainer(comm=)``: a Communicator or None, its rank in its group."""
    if comm is not None and not isinstance(comm, Communicator):
        raise TypeError(f"comm must be a grapheme.distributed.Communicator or None, "
                        f"got {type(comm).__name__}")
    if comm is not None:   # else a rank outside the group fails mid-fit
        check_rank(comm.rank, comm.world_size, ("comm.rank", "comm.world_size"))


def _not_a_model_file(path, meta):
    """ValueError if the checkpoint ``path`` read (``meta``) is a model file."""
    if meta.get("kind") == MODEL_KIND:
        raise ValueError(
            f"{path!r} is a model file (Segmenter.save: weights only, no optimiser "
            f"state), not a training checkpoint; segment with it, or start a run "
            f"from it with Trainer.from_model")


def _serialized(method):
    """Run a :class:`Trainer` method under the trainer's lock: a step, an
    evaluation, a save or a load at a time (threads sharing one trainer
    wait for each other; ``fit`` takes it per step)."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    return run


class Trainer:
    """Fit an embedding and a morpher to (input, target) text pairs.

    Parameters
    ----------
    embedding : Embedding
        Character embedding; its table grows as new characters appear.
    morpher : Morpher
        The learnable merge step; its ``theta`` is trained. To learn where
        to merge, give it an estimator that passes ``theta`` a gradient
        (``Morpher(estimator="ste")``, as ``grapheme train`` does): under the
        default ``"history"`` it gets none.
    loss : StructuralLoss
        Compares the morphed graph with the target graph
        (:meth:`StructuralLoss.for_training() <grapheme.StructuralLoss.for_training>`,
        as ``grapheme train`` uses: with the default weights a model does
        not learn boundaries); must provide
        ``forward(predicted, target)`` returning a result with ``value``,
        ``node``, ``edge``, ``clique`` and per-pair ``values``, and
        ``backward(result, grad=1.0)`` (``grad``: a scalar, or per pair:
        a data-parallel rank's ``1 / B`` of the global batch) returning
        ``activation``, ``mass``, ``weights`` and ``target_activation``
        gradients (a :class:`~grapheme.LossGrad`); with ``checkpoint=``
        or ``comm``, also ``get_params()``, and a checkpoint reloads only
        a :class:`~grapheme.StructuralLoss` (both checked when
        :meth:`fit` starts).
    optimizer : Optimizer
        Updates the parameters ``"embedding"`` (the embedding table),
        ``"theta"`` and, with an encoder, ``"encoder.<name>"`` for each of
        its weights.
    batch_size : int, default 32
        Pairs per step; the last batch of an epoch may be smaller.
    seed : int, default 0
        Seed of the generator that shuffles the pairs every epoch.
    target_activation : {"embedding", "graph"}, default "embedding"
        Activations of the target graph. ``"embedding"``: the mean of the
        embedding rows of its labels, so gradients reach the embedding from
        both sides. ``"graph"``: 1.0 for every node, as in the original
        experiments.
    log : str or os.PathLike, optional
        JSONL file receiving one line of metrics per epoch. It always holds
        exactly the records of the run's completed epochs: :meth:`fit`
        rewrites it (atomically) when it finishes its first epoch, then
        appends. A fresh run (no epoch done, nothing resumed) refuses to
        start on a non-empty existing log, or an existing ``checkpoint`` or
        best checkpoint, unless ``overwrite=True``: files of another run are never replaced
        unasked, and even then not before this run's first epoch is done.
    progress : bool, default True
        Report training on stderr: a ``tqdm.auto`` bar in a terminal or a
        notebook (validation metrics in its postfix), otherwise (``nohup``,
        CI, a pipe) one line per epoch; both end with a summary line beside
        the untrained model's validation metrics. ``False``: silent.
    overwrite : bool, default False
        Let a fresh run replace an existing log and checkpoint (see ``log``).
    unknown_prob : float in [0, 1), default 0.01 (:data:`UNKNOWN_PROB`)
        Probability that a character of a training batch is read through
        the embedding's unknown row instead of its own, at all its
        occurrences in the batch, as a character never seen in training
        looks at inference (drawn per distinct character and step from
        ``seed`` and the epoch, so runs and resumed runs are reproducible).
        This is what teaches the unknown row that
        :meth:`evaluate` and :class:`~grapheme.Segmenter` use for characters
        never seen in training; ``grapheme train --unknown-prob`` sets it.
        ``0``: the unknown row stays a fixed random vector, and training is
        exactly what it was before there was one. A checkpoint written
        before then (without the setting) resumes with 0.
    encoder : Encoder, optional
        Context before the merge (:class:`~grapheme.Encoder`, of the
        embedding's ``dim`` and dtype): the morph then compares the
        encoder's features of neighbouring characters, and its weights
        are trained too. Default: the context-free morph of the rows.
    comm : grapheme.distributed.Communicator, optional
        Train one rank of a data-parallel run (see
        :mod:`grapheme.distributed`; ``grapheme train --nproc`` and
        ``torchrun`` launches make one). Every rank is given the same pairs
        and takes its share of every global batch of ``batch_size`` pairs;
        the gradients are summed over the ranks and every rank takes the
        same step, so the run is the single-process run up to rounding
        (whatever the number of ranks, so a checkpoint resumes on any).
        ``Reinforce`` draws the single process's samples (each rank its
        share of the global batch's stream) and its baseline and
        ``estimator_variance`` take the global batch's per-example losses
        and estimates. :meth:`fit`'s validation is split the same way: each
        rank evaluates its share of ``val`` and the sums are combined, so
        every rank has the record (and the ``keep_best`` decision) of one
        process. Only rank 0 writes the log and the checkpoints and reports
        progress.

    Attributes
    ----------
    epoch : int
        Number of completed epochs.
    history : list of dict
        One record of metrics per completed epoch.
    baseline : dict or None
        The ``val_*`` metrics of the model before its first epoch (the
        untrained model, its table holding the training characters), set by
        the first :meth:`fit` given ``val``. Saved in checkpoints.
    model : Segmenter
        The model being trained, for inference (shares the parameters).
    best : dict or None
        With ``fit(..., keep_best=metric)``: ``{"metric", "value", "epoch",
        "path", "val"}`` of the best checkpoint kept so far (``epoch`` 0: the
        untrained model; ``val``: the fingerprint of the validation pairs
        ``value`` is measured on, in any order: :func:`val_fingerprints`).
        Saved in checkpoints.

    Notes
    -----
    A run is reproducible: with the same seeds and data, two runs produce
    bit-identical weights and metrics (apart from timings), and a run resumed
    from a checkpoint continues exactly as the uninterrupted run would. A
    checkpoint records a fingerprint of the training pairs; continuing a
    loaded checkpoint on other pairs is refused unless
    ``fit(..., new_data=True)``.

    Training stops with ``FloatingPointError`` as soon as the loss, a
    gradient or (after an update) a parameter is not finite, before anything
    is written: the last checkpoint written stays the last good one, and the
    message names it. The trainer's own parameters are then not usable;
    resume from that checkpoint (with a smaller learning rate).

    One trainer trains in one thread (its embedding alone may be shared,
    see :class:`~grapheme.Embedding`); :meth:`evaluate` and :meth:`save`
    from another thread during :meth:`fit` are safe, and see the model
    between two steps (docs/security.md, "Threads").
    """

    def __init__(self, embedding, morpher, loss, optimizer, batch_size=32, seed=0,
                 target_activation="embedding", log=None, progress=True, encoder=None,
                 overwrite=False, unknown_prob=UNKNOWN_PROB, comm=None):
        self.encoder = encoder
        self.embedding = embedding
        self.morpher = morpher
        self.loss = loss
        self.optimizer = optimizer
        self.comm = comm
        self.batch_size, self.target_activation = batch_size, target_activation
        self.unknown_prob, self.overwrite, self.progress = unknown_prob, overwrite, progress
        self.log = log
        self._workspace = None
        # one step or evaluation at a time: they share the workspace, whose
        # buffers (index arrays checked before the kernels read them) another
        # thread's step would rewrite mid-way
        self._lock = threading.RLock()
        self._check_settings()
        self._seed = check_scalar(seed, "seed", lower=0, integer=True)
        self._data_fingerprint = None   # of the pairs the run was trained on
        self._loaded_fingerprint = None  # that of a loaded checkpoint, with its path
        self._last_checkpoint = None    # (path, epoch) of the last one written
        self._saving = None             # (path, epoch) of the one being written
        # files of another run that this fresh run replaces without writing
        # them (grapheme train --overwrite: its best.npz, without --keep-best):
        # removed with the other run's log and checkpoint, after the first epoch
        self._replaced_files = []
        # fit's closing summary line; grapheme train prints its own report
        self._summary = True
        self.rng = np.random.default_rng(self.seed)
        self.epoch = 0
        self.history = []
        self.best = None
        self.baseline = None
        self._unknown_rng = self._epoch_rng()

    def __getstate__(self):   # copy.deepcopy, pickling by the user: no lock
        state = self.__dict__.copy()
        state.pop("_lock", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.__dict__.setdefault("_summary", True)   # a trainer pickled before it
        self.__dict__.setdefault("_saving", None)
        self._lock = threading.RLock()

    def _check_settings(self):
        """The settings and components (:data:`_SETTINGS`) as set now,
        checked (naming a bad one) at construction and, if one was assigned
        since, when a step, an evaluation, a fit or a save starts; the
        morpher's settings too (a data-parallel step reads its estimator
        before the morph runs)."""
        if settings_unchanged(self, _SETTINGS):
            self.morpher._validate()
            return
        self._check_components()
        self.morpher._validate()
        self.overwrite = check_bool(self.overwrite, "overwrite")
        self.progress = check_bool(self.progress, "progress")
        self.batch_size = check_scalar(self.batch_size, "batch_size", lower=1, integer=True)
        if not isinstance(self.target_activation, str) or (
                self.target_activation not in TARGET_ACTIVATIONS):
            raise ValueError(f"target_activation must be one of {TARGET_ACTIVATIONS}, "
                             f"got {show(self.target_activation)}")
        self.unknown_prob = check_scalar(self.unknown_prob, "unknown_prob", lower=0, upper=1,
                                         upper_inclusive=False)
        self.log = None if self.log is None else check_path(self.log, "log")
        settings_checked(self, _SETTINGS)

    def _check_components(self):
        """The constructor's checks of the model, the loss, the optimiser
        and ``comm``; the step's workspace made anew for another dtype."""
        embedding, encoder, loss, comm = self.embedding, self.encoder, self.loss, self.comm
        check_model(embedding, self.morpher, encoder)
        if encoder is not None:
            check_training_memory(encoder.dim, encoder.layers, encoder.dtype,
                                  f"training {encoder!r}")
        if isinstance(loss, type):   # StructuralLoss, not StructuralLoss()
            raise TypeError(f"loss must be an instance, got the class {loss.__name__}: "
                            f"pass {loss.__name__}()")
        if not (callable(getattr(loss, "forward", None))
                and callable(getattr(loss, "backward", None))):
            raise TypeError(f"loss must have forward() and backward(), got "
                            f"{type(loss).__name__}")
        if not isinstance(self.optimizer, _optim.Optimizer):
            raise TypeError(f"optimizer must be a grapheme.optim.Optimizer, got "
                            f"{type(self.optimizer).__name__}")
        _check_comm(comm)
        if self._workspace is None or self._workspace.dtype != embedding.dtype:
            self._workspace = Workspace(embedding.dtype)   # the step's (n, d) arrays, reused

    @classmethod
    def from_model(cls, model, loss, optimizer, **kwargs):
        """A trainer of ``model`` (a :class:`~grapheme.Segmenter`): its
        embedding, encoder and morpher are trained in place.

        ``kwargs`` are the other arguments of :class:`Trainer`.

        Examples
        --------
        >>> model = Segmenter(Embedding(dim=8), Morpher(estimator="ste"))
        >>> trainer = Trainer.from_model(model, StructuralLoss(), Adam(lr=1e-2),
        ...                              progress=False)
        >>> trainer.model.embedding is model.embedding
        True
        """
        from ..segmenter import Segmenter

        if not isinstance(model, Segmenter):
            raise TypeError(f"model must be a grapheme.Segmenter, got "
                            f"{type(model).__name__}")
        if "encoder" in kwargs:
            raise TypeError("from_model() takes the encoder from the model, not encoder=")
        return cls(model.embedding, model.morpher, loss, optimizer, encoder=model.encoder,
                   **kwargs)

    @property
    def seed(self):
        """The ``seed`` the trainer was made with: read-only, since the
        generator that shuffles the pairs was seeded from it at construction
        (make a new trainer for another seed)."""
        return self._seed

    @property
    def model(self):
        """The model being trained, as a :class:`~grapheme.Segmenter` sharing
        this trainer's embedding, encoder and morpher (``model.copy()`` for a
        snapshot)."""
        from ..segmenter import Segmenter

        return Segmenter(self.embedding, self.morpher, self.encoder)

    def _epoch_rng(self):
        """The generator of the unknown-row replacements of the coming epoch:
        a function of the seed and the epoch only, so a resumed run draws
        what the uninterrupted one would."""
        return np.random.default_rng([self.seed, self.epoch, 0x756E6B])

    # ------------------------------------------------------------------ step
    def _batch(self, inputs, targets, train=True, replaced=None):
        """Input graph with its table rows and features (None with an
        encoder: it looks the rows up itself, :meth:`_encode`); the target
        graph.

        For segmentation pairs the target graph is None here: it is the input
        contracted under the gold segmentation, built from the model's own
        features by :meth:`_segmentation_target`. ``train=False``
        (evaluation): the table does not grow, unseen characters read the
        unknown row, and no character is replaced by it. ``replaced``: the
        code points read through the unknown row in this step (else drawn
        here, :meth:`_unknown_codes`)."""
        emb = self.embedding
        g = Graph.from_texts(inputs)
        self._check_step_memory(g.num_nodes)
        rows = emb.rows(g.labels, grow=train)
        if train and self.unknown_prob > 0:
            if replaced is None:
                replaced = self._unknown_codes(g.labels)
            if replaced.size:
                rows[np.isin(g.labels, replaced)] = emb.unknown_row
        # text targets: their chain graph, and with the embedding's row means
        # as activations their rows (grown after the inputs', as always)
        target = None if _is_segmentation_batch(targets) else Graph.from_texts(list(targets))
        table_means = target is not None and self.target_activation == "embedding"
        t_rows = emb.rows(target.labels, grow=train) if table_means else None
        table = emb._checked("weight")   # a user may have assigned it
        H = None   # an encoder looks its rows up itself (and checks them finite)
        if self.encoder is None:
            H = Lookup().forward(table, rows, out=self._workspace(
                "features", (rows.shape[0], emb.dim)))[0].features
        # finite, so that nothing downstream scans these (n, d) rows again:
        # checked in the table or in the rows, whichever is smaller (the
        # table where its row means are taken anyway)
        if table_means or (H is not None and table.shape[0] <= rows.shape[0]):
            as_float_array(table, "Embedding.weight", dtype=KEEP)
        elif H is not None:
            as_float_array(H, "Embedding.weight", dtype=KEEP)
        if target is None:
            return _by_position(g), rows, H, None, None
        if table_means:
            # the mean of a looked-up row is the looked-up row mean: O(V d + m)
            target = target._with(activation=Lookup().forward(feature_mean(table), t_rows)[0]
                                  .features)
        return g, rows, H, target, t_rows

    @staticmethod
    def _segmentation_target(g, targets, features, workspace=None):
        """The gold segmentation's merge of ``features`` (a :class:`HardMerge`):
        ``(target graph, saved)``; at the gold segmentation the morphed graph
        is this graph, and a debiased loss is exactly 0 there.

        The target's activations are explicit (its feature means, the same
        numbers), so that the loss returns their gradient alone and
        :meth:`_segmentation_target_vjp` routes it as one column.
        ``workspace``: where its features live, under "target.features"
        (see :meth:`HardMerge.forward <grapheme.ops.HardMerge.forward>`)."""
        lengths = segment_lengths(targets)[0]
        starts = np.zeros(g.num_nodes, dtype=bool)
        starts[np.cumsum(lengths)[:-1]] = True            # a segment starts here
        merge = ~starts[g.indices]                         # edge u -> v stays inside
        (_, target, _), saved = HardMerge()._forward(g, features, merge, workspace, "target.")
        return _explicit_activation(target), saved

    def _check_step_memory(self, n):
        """Refuse a batch of ``n`` characters whose step could never fit in
        memory, before it starts: measured, a step holds about (5 + 3
        layers) (n, d) arrays and 256 bytes per character (95 bytes per
        character and dimension at 2 layers, d = 64). Each allocation is
        checked on its own too, but a long text's many (n, d) arrays passed
        those checks one by one and the process was killed (a 5 M-character
        line, an attack helper's find)."""
        layers = 0 if self.encoder is None else self.encoder.layers
        per_char = self.embedding.dim * self.embedding.dtype.itemsize * (5 + 3 * layers) + 256
        check_allocation(n * per_char, f"a step on a batch of {n} characters (about "
                                       f"{per_char} bytes each: shorter texts or a smaller "
                                       f"batch need less)")

    @staticmethod
    def _segmentation_target_vjp(saved, grad_activation, into):
        """Add the gradient of the features from that of the segmentation
        target's activations (M,) into ``into`` (n, d): the merge's scatter of
        :meth:`FeatureMean.vjp_column <grapheme.ops.FeatureMean.vjp_column>`,
        broadcast over the columns. The same numbers as routing all ``d``
        equal columns, without two (n, d) arrays per step."""
        history, (_, d), dtype = saved
        column = FeatureMean.vjp_column((len(grad_activation), d, dtype), grad_activation)
        into += HardMerge().vjp((history, (into.shape[0], 1), dtype), column)[0]

    def _encode(self, g, rows, H):
        """``((features, queries, keys), saved)`` of the encoder on the
        table's ``rows`` (its first layer's products on the table's rows,
        :meth:`Encoder.forward_lookup <grapheme.Encoder.forward_lookup>`, the
        rows it reads checked finite), or ``((H,), None)``."""
        if self.encoder is None:
            return (H,), None
        result, saved = self.encoder._forward_lookup(
            g, self.embedding._checked("weight"), rows, self._workspace, "Embedding.weight")
        return tuple(result), saved

    def _params(self):
        """The arrays the optimiser updates, by name."""
        params = {"embedding": self.embedding.weight, "theta": self.morpher.theta}
        if self.encoder is not None:
            params.update({"encoder." + k: v for k, v in self.encoder.params.items()})
        return params


    @_serialized
    def train_step(self, inputs, targets):
        """One optimisation step on a batch; returns the step's statistics.

        Parameters
        ----------
        inputs, targets : list of str
            The batch, ``len(inputs) == len(targets) >= 1``. With a
            communicator (``comm``) this is the *global* batch, the same on
            every rank: each rank computes the gradient of its contiguous
            shard, the gradients are summed over the ranks, and every rank
            takes the same step, the single-process one up to rounding.

        Returns
        -------
        dict
            ``loss``, ``node``, ``edge``, ``clique`` (batch means),
            ``input_nodes``, ``output_nodes`` (over all ``Reinforce``
            samples: ``K`` copies of the batch), ``chars`` (the batch's,
            once), ``grad_norm``
            (Euclidean norm of all parameter gradients before the update)
            and ``estimator_variance`` (``Reinforce``: the sample variance
            over the examples of their estimates of ``d loss / d theta``,
            else NaN). With a communicator, all of the global batch.

        Raises
        ------
        ValueError, TypeError
            As :meth:`fit` for its pairs: the lengths differ, the batch is
            empty, a segmentation target does not join to its input, or the
            targets mix segmentations and texts (naming the pair).
        """
        inputs, targets = _checked_batch(inputs, targets)
        return self._train_step(inputs, targets)

    def _train_step(self, inputs, targets):
        """:meth:`train_step` of a checked batch (:meth:`fit` checks its
        pairs once)."""
        self._check_settings()
        with single_pool(self.encoder is not None):
            if self.comm is not None:
                return self._shard_step(inputs, targets)
            return self._step(inputs, targets)

    def _step(self, inputs, targets):
        """:meth:`train_step` of one process."""
        morpher = self.morpher
        g, morphed, res, saved = self._forward(inputs, targets)
        lg = self.loss.backward(res)
        B = res.values.shape[0]
        advantage = morphed.advantage(res.values)
        grads, grad_norm = self._gradients(
            morphed, lg, *saved,
            grad_log_prob=None if advantage is None else advantage / B,
            grad_rate_penalty=1.0)
        self._update(float(res.value), grads, grad_norm)
        morpher.step(morphed, res.values)
        variance = float("nan")
        if advantage is not None and B > 1:
            variance = float(np.var(morpher.theta_estimates(morphed, advantage), ddof=1))
        return {"loss": float(res.value), "node": float(res.node),
                "edge": float(res.edge), "clique": float(res.clique),
                # over all REINFORCE samples, so their ratio is the kept fraction
                "input_nodes": morphed.history.num_inputs,
                "output_nodes": morphed.history.num_outputs,
                "chars": g.num_nodes, "grad_norm": grad_norm,
                "estimator_variance": variance}

    def _forward(self, inputs, targets, shard=None, **batch):
        """The step's forward pass: ``(input graph, morphed, loss result, saved)``,
        ``saved`` being what :meth:`_gradients` needs besides those.
        ``shard``: see :meth:`Morpher.forward <grapheme.Morpher.forward>`."""
        g, rows, H, target, t_rows = self._batch(inputs, targets, **batch)
        encoded = None
        try:
            encoded, enc_saved = self._encode(g, rows, H)
            morphed = self.morpher._forward(g, *encoded, shard=shard, workspace=self._workspace)
        except ValueError as e:
            # finite but huge weights: the encoder's output overflowed (in a
            # layer, or in the projections, which the routing refuses)
            if isinstance(e, LayerOverflowError) or (
                    self.encoder is not None and encoded is not None
                    and not all(np.isfinite(a).all() for a in encoded)):
                raise FloatingPointError(
                    f"training diverged at epoch {self.epoch + 1}: the encoder's output is "
                    "not finite (its weights grew too large; learning rate too large?); "
                    f"{self._good_checkpoint()}") from None
            raise
        seg_saved = None
        if target is None:
            target, seg_saved = self._segmentation_target(g, targets, encoded[0],
                                                          self._workspace)
        target = replicate(target, morphed.samples)
        predicted = _explicit_activation(morphed.graph)
        if (isinstance(self.loss, StructuralLoss)
                and type(self.loss).forward is StructuralLoss.forward):
            # the result stays inside the step: its plans and potentials
            # can live in the workspace (a subclass's own forward is called)
            res = self.loss._forward(predicted, target, self._workspace)
        else:
            res = self.loss.forward(predicted, target)
        return g, morphed, res, (rows, t_rows, target, seg_saved, enc_saved)

    def _gradients(self, morphed, lg, rows, t_rows, target, seg_saved, enc_saved,
                   grad_log_prob=None, grad_rate_penalty=None, grad_probability=None):
        """The gradient of every parameter, by name, from the loss gradient
        ``lg``, and its Euclidean norm (of this process's part)."""
        emb = self.embedding
        features = morphed.graph.features
        grad_features = FeatureMean().vjp(
            features.shape + (features.dtype,), lg.activation,
            out=self._workspace("loss.features", features.shape, features.dtype))[0]
        grad = self.morpher.vjp(morphed, grad_features=grad_features, grad_mass=lg.mass,
                                grad_weights=lg.weights, grad_log_prob=grad_log_prob,
                                grad_rate_penalty=grad_rate_penalty,
                                grad_probability=grad_probability,
                                out=self._workspace("grad", (rows.shape[0], emb.dim)),
                                workspace=self._workspace)
        grad_h, enc_grads = grad.features, {}
        # the target's activations, summed over the samples (each scored
        # against the same target)
        gt = lg.target_activation
        if morphed.samples > 1:
            gt = gt.reshape(morphed.samples, -1).sum(axis=0)
        if seg_saved is not None:
            self._segmentation_target_vjp(seg_saved, gt, grad_h)
        if self.encoder is not None:   # of the table (forward_lookup's vjp)
            grad_table, enc_grads = self.encoder.vjp(enc_saved, grad_h, grad.queries,
                                                     grad.keys, self._workspace)
        else:
            grad_table = Lookup().vjp((rows, emb.weight.shape, emb.dtype), grad_h)[0]
        if t_rows is not None and target.num_nodes:
            # the target's activations: Lookup(FeatureMean(table), t_rows)
            g_means = Lookup().vjp((t_rows, (emb.weight.shape[0],)), gt)[0]
            grad_table += FeatureMean().vjp(emb.weight.shape + (emb.dtype,), g_means)[0]
        grads = {"embedding": grad_table, "theta": grad.theta,
                 **{"encoder." + k: v for k, v in enc_grads.items()}}
        grad_norm = math.sqrt(sum(float(np.vdot(v, v)) for v in grads.values()))
        return grads, grad_norm

    def _update(self, loss, grads, grad_norm):
        """The optimiser step, refused (``FloatingPointError``) before it if
        the loss or the gradient is not finite, and after it if a parameter
        is not."""
        if not math.isfinite(loss) or not math.isfinite(grad_norm):
            raise FloatingPointError(
                f"training diverged at epoch {self.epoch + 1}: non-finite loss "
                f"({loss!r}) or gradient norm ({grad_norm!r}); "
                f"{self._good_checkpoint()}")
        params = self._params()
        try:
            self.optimizer.step(params, grads)
        except FloatingPointError as exc:   # refused by grapheme's own, nothing moved
            raise FloatingPointError(
                f"training diverged at epoch {self.epoch + 1}: {exc}; "
                f"{self._good_checkpoint()}") from None
        if not _all_finite(params):   # another optimiser's
            raise FloatingPointError(
                f"training diverged at epoch {self.epoch + 1}: the parameters are not "
                f"finite after the update (learning rate too large?); "
                f"{self._good_checkpoint()}")

    def _shard_step(self, inputs, targets, grown=False):
        """:meth:`train_step` of one rank: this rank's shard of the global
        batch ``inputs, targets``, every pair weighted ``1 / B`` of the global
        batch; one all-reduce (sum) of all gradients and the step's sums
        (:data:`SHARD_SUMS`), and with a rate controller a second one.

        The table grows for the global batch's characters (the same rows in
        the same order on every rank, without communication); the unknown
        row replaces the code points drawn from the global batch's (every
        rank draws the same ones, at the cost of reading the global batch's
        characters once); the rate penalty sees the global batch's expected
        kept fraction (a second, two-number all-reduce) and the rate
        controller its measured one. ``grown``: the table already has a row
        for every character of the batch (:meth:`fit` grows it before the
        first step).

        ``Reinforce``: the samples are the global batch's (the estimator's
        stream skips the other ranks' edges, ``forward(..., shard=)``); the
        same all-reduce carries every example's loss and ``d loss / d
        theta`` estimate (``2 K B`` floats, each rank filling its slots of
        the single-process order, zeros elsewhere), from which every rank
        folds the global losses into the baseline and moves the stream past
        the global batch (``Morpher.step(None, ..., num_edges=)``) and takes
        ``estimator_variance`` exactly as one process does."""
        comm, morpher = self.comm, self.morpher
        B = len(inputs)
        lo, hi = shard_bounds(B, comm.rank, comm.world_size)
        if not grown:
            self._grow_batch(inputs, targets)
        replaced = None
        if self.unknown_prob > 0:
            replaced = self._unknown_codes(Graph.from_texts(inputs).labels)
        reinforce = morpher.estimator.draws
        shard = None
        if reinforce:   # a chain's candidate edges: one per character but the first
            edges = [max(len(text) - 1, 0) for text in inputs]
            shard = (sum(edges[:lo]), sum(edges[hi:]))
            num_edges = sum(edges)
        inputs, targets = inputs[lo:hi], targets[lo:hi]
        K = morpher.estimator.samples
        morphed = res = None
        if inputs:
            g, morphed, res, step_saved = self._forward(inputs, targets, shard=shard,
                                                        replaced=replaced)
        grad_p = None
        if morpher.rate is not None:
            # the penalty of the global batch's expected kept fraction
            counts = np.zeros(2)
            if morphed is not None:
                counts[:] = g.num_nodes, morphed.probability.sum()
            comm.all_reduce(counts)
            op, multiplier = morpher.rate.penalty()
            _, saved = op.forward(counts[1:], int(counts[0]), multiplier)
            if morphed is not None:
                grad_p = np.full(morphed.probability.shape, op.vjp(saved, 1.0)[0][0])
        params = self._params()
        examples = K * B
        # reinforce: every example's loss, then its d loss / d theta estimate,
        # at its place in the single-process order (copy k of pair b: k B + b)
        per_example = np.zeros(2 * examples if reinforce else 0)
        if morphed is not None:
            lg = self.loss.backward(res, np.full(res.values.shape[0], 1.0 / examples))
            advantage = morphed.advantage(res.values)
            grads = self._gradients(
                morphed, lg, *step_saved, grad_probability=grad_p,
                grad_log_prob=None if advantage is None else advantage / examples)[0]
            n = res.values.shape[0]
            sums = {"loss": n * res.value, "node": n * res.node, "edge": n * res.edge,
                    "clique": n * res.clique, "chars": g.num_nodes,
                    "output_nodes": morphed.history.num_outputs,
                    "input_nodes": morphed.history.num_inputs}
            if reinforce:
                slots = (np.arange(K)[:, None] * B + np.arange(lo, hi)).ravel()
                per_example[slots] = res.values
                per_example[examples + slots] = morpher.theta_estimates(morphed, advantage)
        else:   # no pair here: nothing to add
            grads = {name: np.zeros_like(p) for name, p in params.items()}
            sums = dict.fromkeys(SHARD_SUMS, 0.0)
        # one flat buffer: every gradient, then the step's sums (and reinforce's
        # per-example numbers)
        names = sorted(grads)
        sizes = [grads[k].size for k in names]
        flat = np.concatenate([*(np.ravel(grads[k]) for k in names),
                               [sums[k] for k in SHARD_SUMS], per_example])
        comm.all_reduce(flat)
        parts = np.split(flat, np.cumsum(sizes + [len(SHARD_SUMS)]))
        grads = {k: part.reshape(np.shape(params[k])) for k, part in zip(names, parts)}
        sums = dict(zip(SHARD_SUMS, parts[-2].tolist()))
        grad_norm = math.sqrt(sum(float(np.vdot(v, v)) for v in grads.values()))
        self._update(sums["loss"] / examples, grads, grad_norm)
        input_nodes = sums["input_nodes"]
        kept_fraction = sums["output_nodes"] / input_nodes if input_nodes else None
        variance = float("nan")
        if reinforce:
            losses, estimates = parts[-1][:examples], parts[-1][examples:]
            morpher.step(None, losses, kept_fraction=kept_fraction, num_edges=num_edges)
            if examples > 1:
                variance = float(np.var(estimates, ddof=1))
        elif morphed is not None or input_nodes:
            morpher.step(morphed, None if res is None else res.values,
                         kept_fraction=kept_fraction)
        return {**{k: sums[k] / examples for k in LOSS_KEYS},
                # over all REINFORCE samples, as one process counts them
                **{k: int(sums[k]) for k in ("input_nodes", "output_nodes", "chars")},
                "grad_norm": grad_norm, "estimator_variance": variance}

    def _grow_batch(self, inputs, targets):
        """Rows for every character of the global batch, as :meth:`_batch`
        grows them for it in one process: the same rows in the same order on
        every rank, without communication."""
        targets = self._row_texts(inputs, targets)[len(inputs):]
        for texts in (inputs, targets):   # inputs, then targets: as _batch grows them
            if texts:
                self.embedding.rows(Graph.from_texts(list(texts)).labels)

    def _unknown_codes(self, labels):
        """The code points read through the unknown row in a step whose
        batch has these node ``labels``: each distinct code point with
        probability ``unknown_prob``, all its occurrences together (sorted
        code points, one uniform draw each), as a character never seen in
        training looks at inference. A data-parallel rank passes the global
        batch's labels, so that every rank replaces the same ones."""
        codes = np.unique(labels)
        return codes[self._unknown_rng.random(codes.shape[0]) < self.unknown_prob]

    # ------------------------------------------------------------- evaluate
    @_serialized
    def evaluate(self, pairs, batch_size=None):
        """Loss and exact-structure accuracy on ``pairs``, without training.

        Changes nothing: characters without a row of their own read the
        embedding's unknown row (the table does not grow), no parameter is
        updated and no gradient is kept. So before the first ``fit`` (an
        empty table) every character reads that one row and everything
        merges; the untrained model ``fit`` compares against is
        :attr:`baseline`, taken after the table has a row for every
        training character. Not a collective: with a
        communicator this rank evaluates all of ``pairs`` alone (:meth:`fit`'s
        per-epoch validation is the one shared between the ranks).

        Parameters
        ----------
        pairs : list of (str, str or tuple of str)
        batch_size : int, optional
            Defaults to the trainer's batch size.

        Returns
        -------
        dict
            ``loss``, ``node``, ``edge``, ``clique`` (means over pairs),
            ``kept_fraction`` (output nodes / input nodes) and ``accuracy``
            (fraction of pairs whose hard morph has exactly the target's
            number of nodes and labels). When the pairs are segmentations
            (tuple targets, see :mod:`grapheme.data`; a mix of the two kinds
            is refused), also: ``seg_accuracy`` (fraction segmented exactly as the
            gold), ``boundary_precision``, ``boundary_recall`` and
            ``boundary_f1`` (micro-averaged over the boundaries between
            characters, see :func:`~grapheme.train.metrics.segmentation_scores`).
            The predicted segmentation is the hard morph's, with no
            segment starting inside a written character, as a
            :class:`~grapheme.Segmenter` prints it
            (:func:`grapheme.data.continues_cluster`); ``accuracy``,
            ``kept_fraction`` and the loss are of the hard morph itself.
        """
        self._check_settings()
        inputs, targets = check_pairs(pairs, "pairs")
        if not inputs:
            raise ValueError("pairs must not be empty")
        bs = self.batch_size if batch_size is None else check_scalar(
            batch_size, "batch_size", lower=1, integer=True)
        return _eval_scores(*self._eval_sums(inputs, targets, bs), len(inputs))

    def _eval_sums(self, inputs, targets, bs):
        """What :meth:`evaluate` adds up over ``inputs, targets`` in batches
        of ``bs``: ``(sums of the loss terms over pairs, input nodes, output
        nodes, structure matches, segmentation counts or None)``."""
        sums = dict.fromkeys(LOSS_KEYS, 0.0)
        n_in = n_out = correct = 0
        seg = None
        for lo in range(0, len(inputs), bs):
            bi, bt = inputs[lo:lo + bs], targets[lo:lo + bs]
            g, rows, H, target, _ = self._batch(bi, bt, train=False)
            with single_pool(self.encoder is not None):
                encoded = self._encode(g, rows, H)[0]
                morphed = self.morpher.predict(g, *encoded)
                if target is None:
                    target = self._segmentation_target(g, bt, encoded[0])[0]
                res = self.loss.forward(morphed.graph, target)
            w = len(bi)
            for key in sums:
                sums[key] += w * float(getattr(res, "value" if key == "loss" else key))
            n_in += g.num_nodes
            n_out += morphed.history.num_outputs
            correct += int(structure_match(g, morphed.history, target).sum())
            lengths, counts, select = segment_lengths(bt)
            if select.any():
                # the segments a Segmenter prints: none starts inside a
                # written character (g is labelled by position here)
                joined = continues_cluster(Graph.from_texts(bi).labels)
                c = segmentation_counts(morphed.history, g.graph_offsets, lengths, counts,
                                        select, joined)
                seg = c if seg is None else {k: seg[k] + c[k] for k in seg}
        return sums, n_in, n_out, correct, seg

    @_serialized
    def _evaluate_shared(self, pairs):
        """:meth:`evaluate` of ``pairs`` (the trainer's batch size) by all
        ranks together: each evaluates its contiguous share and one
        all-reduce sums the loss sums and the counts (the segmentation
        metrics' counts, not their ratios), so every rank returns the same
        record, the single-process one up to the summation order of the
        loss terms (the counts, accuracies and boundary scores exactly)."""
        comm = self.comm
        inputs, targets = check_pairs(pairs, "pairs")
        if not inputs:
            raise ValueError("pairs must not be empty")
        lo, hi = shard_bounds(len(inputs), comm.rank, comm.world_size)
        sums, n_in, n_out, correct, seg = self._eval_sums(inputs[lo:hi], targets[lo:hi],
                                                          self.batch_size)
        flat = np.array([*sums.values(), n_in, n_out, correct,
                         *(seg[k] if seg is not None else 0 for k in SEGMENTATION_COUNTS)],
                        dtype=np.float64)
        comm.all_reduce(flat)
        values = flat.tolist()
        sums = dict(zip(sums, values[:len(sums)]))
        n_in, n_out, correct, *seg_counts = (int(v) for v in values[len(sums):])
        seg = dict(zip(SEGMENTATION_COUNTS, seg_counts))
        return _eval_scores(sums, n_in, n_out, correct, seg if seg["examples"] else None,
                            len(inputs))

    # ------------------------------------------------------------------ fit
    def _good_checkpoint(self):
        """What a divergence error says about the files: nothing was written,
        and which checkpoint is still good."""
        if self._last_checkpoint is None:
            return "nothing was written (no checkpoint of this run yet)"
        path, epoch = self._last_checkpoint
        return (f"nothing was written: the checkpoint {path!r} (epoch {epoch}) is "
                "still good")

    def fit(self, pairs, epochs, val=None, checkpoint=None, resume=None, new_data=False,
            keep_best=None, best=None):
        """Train for ``epochs`` epochs in total; return the per-epoch history.

        Parameters
        ----------
        pairs : list of (str, str or tuple of str)
            Training pairs, shuffled anew every epoch.
        epochs : int
            Total number of epochs of the run. When resuming from a
            checkpoint saved after epoch ``e`` (or calling ``fit`` again),
            epochs ``e + 1 .. epochs`` are run; none, with a warning, where
            ``epochs <= e``.
        val : list of (str, str or tuple of str), optional
            Validation pairs, evaluated after every epoch.
        checkpoint : str or os.PathLike, optional
            Written atomically after every epoch; its directory is made
            before the first epoch if it does not exist (as ``log``'s is).
        resume : str or os.PathLike, optional
            A checkpoint to continue from. The continued run is
            bit-identical to an uninterrupted one.
        new_data : bool, default False
            Allow continuing a loaded checkpoint (``resume``, :meth:`load`,
            :meth:`from_checkpoint`) on pairs other than those it was
            trained on; without it that is refused, since the result is no
            longer the run the checkpoint belongs to.
        keep_best : str, optional
            A validation metric of the epoch records (``"val_loss"``, lowest
            is best; ``"val_accuracy"``, or with segmentation pairs in
            ``val`` ``"val_seg_accuracy"``, ``"val_boundary_f1"``, ... ,
            highest is best). The state with the best value so far, the
            untrained (or resumed) model's included, is kept in ``best``:
            written (atomically) when an epoch strictly improves on it, and
            the starting state when this call's first epoch does not (a run
            continued into another ``best`` file, on other pairs or with
            other ``val`` pairs, starts its record there), so
            the best checkpoint is never worse on
            ``val`` than the model training started from. :attr:`best` says
            which epoch it is. Needs ``val`` and ``checkpoint``. A resumed
            run given another metric than its record's, other ``val`` pairs
            (in another order they are the same) or other training pairs
            (``new_data``) is refused while ``best`` holds that record,
            unless the trainer was made with ``overwrite`` (the new record
            would replace it).
        best : str or os.PathLike, optional
            Where ``keep_best`` keeps it; default ``best.npz`` beside
            ``checkpoint``.

        Returns
        -------
        history : list of dict
            One record per epoch (including those restored from ``resume``):
            ``epoch``, ``loss``, ``node``, ``edge``, ``clique`` (means over
            the epoch's pairs), ``kept_fraction``, ``tau`` (at the end of the
            epoch), ``grad_norm`` (mean over steps), ``estimator_variance``,
            ``time``, ``examples_per_s``, ``chars_per_s`` and, with ``val``,
            ``val_loss``, ``val_kept_fraction``, ``val_accuracy`` (and, when
            ``val`` holds segmentations, ``val_seg_accuracy``,
            ``val_boundary_precision``, ``val_boundary_recall``,
            ``val_boundary_f1``).

        Raises
        ------
        TypeError
            If ``checkpoint``, ``resume``, ``best`` or the log is not a str,
            bytes or os.PathLike, or, with ``checkpoint`` or ``comm``, the
            loss cannot be recorded (no ``get_params``) or reloaded (not
            grapheme's type).
        ValueError
            If ``pairs`` is empty or malformed, ``epochs`` is negative, a
            path is empty, ``resume`` is not a compatible checkpoint, the run continues on
            other pairs without ``new_data=True``, a fresh run would
            replace an existing log or checkpoint without ``overwrite`` (a
            resumed one, a log or checkpoint not its own at or before its
            epoch), or two of the log, ``checkpoint`` and the best
            checkpoint are one file.
        IsADirectoryError
            If the log, ``checkpoint`` or the best checkpoint's path is a
            directory (or ends with a separator), before any epoch.
        FloatingPointError
            If training diverges (see the class notes); nothing is written.
        """
        self._check_settings()
        new_data = check_bool(new_data, "new_data")
        # named now, not when the first epoch's work is to be written
        checkpoint, resume, best = (None if path is None else check_path(path, what)
                                    for what, path in (("checkpoint", checkpoint),
                                                       ("resume", resume), ("best", best)))
        inputs, targets = check_pairs(pairs, "pairs")
        if not inputs:
            raise ValueError("pairs must not be empty")
        epochs = check_scalar(epochs, "epochs", lower=0, integer=True)
        val_split = None if val is None else check_pairs(val, "val")
        if val is not None:
            if not len(val):
                raise ValueError("val must not be empty when given")
        best_path = self._check_keep_best(keep_best, best, val, checkpoint)
        if checkpoint is not None or self.comm is not None:
            self._check_recordable(checkpoint is not None)
        files = [(what, path) for what, path in (("log", self.log), ("checkpoint", checkpoint),
                                                 ("best checkpoint", best_path))
                 if path is not None]
        seen = {}
        for what, path in files:   # one file written as two would lose one of them
            other = seen.setdefault(os.path.realpath(path), what)
            if other != what:
                raise ValueError(f"the {other} and the {what} must be different files, "
                                 f"both are {os.fspath(path)!r}")
        if resume is not None:
            self.load(resume)
            self._last_checkpoint = (os.fspath(resume), self.epoch)
        fingerprint = data_fingerprint(inputs, targets)
        old = self._loaded_fingerprint
        changed = old is not None and old["sha256"] != fingerprint["sha256"]
        if changed and not new_data:
            raise ValueError(
                f"pairs differ from the data the checkpoint {old['path']!r} was trained on "
                f"({old['pairs']} pairs, sha256 {old['sha256'][:12]}...; now "
                f"{fingerprint['pairs']} pairs, sha256 {fingerprint['sha256'][:12]}...); "
                "resume with the same data, start a new run, or pass new_data=True "
                "(grapheme train --new-data) to continue on other data")
        writes = self._writes
        # the validation pairs the best value is measured on (a record
        # without it, written before it was kept, is taken as on these)
        vals = None if best_path is None else val_fingerprints(*val_split)
        error = (self._files_error(files, epochs, None if self.epoch >= epochs else keep_best,
                                   vals, changed) if writes else None)
        if self.comm is not None:
            self._agree_start(error, fingerprint, epochs, keep_best, val_split)
        elif error is not None:
            raise error
        self._data_fingerprint = fingerprint
        self._loaded_fingerprint = None   # checked once, when the loaded run goes on
        if self.epoch < epochs and writes:   # now, not after an epoch's work
            for path in (self.log, checkpoint, best_path):
                if path is not None:
                    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(path))),
                                exist_ok=True)
        log_synced = False
        n = len(inputs)
        steps = -(-n // self.batch_size)
        first_epoch = self.epoch
        if self.epoch >= epochs and self._summary and writes:   # grapheme train says its own
            # (a new user's find: a second fit(pairs, 3) returned, silent)
            warnings.warn(f"nothing to train: the trainer has {self.epoch} epochs and epochs="
                          f"{epochs} is the run's total (fit(pairs, {self.epoch} + k) trains k "
                          "more)", stacklevel=2)
        if (self.epoch >= epochs and best_path is not None and self.best is not None
                and self.best["epoch"] == self.epoch > 0 and self.best["metric"] == keep_best
                and not self._best_held_on_rank0(best_path)):
            # a stop in the last epoch's best save, after its checkpoint's,
            # left the file behind, and a resume had nothing to train (an
            # attack helper's find): the parameters now are that epoch's
            if writes and not self._best_foreign(_best_file_meta(best_path)):
                self._save(best_path)
        if self.epoch < epochs:
            self._grow(inputs, targets)
            if val is not None and self.epoch == 0:
                self.baseline = self._val_record(val)
        first = None   # the first candidate's state (untrained or resumed), written after epoch 1
        if best_path is not None and self.epoch < epochs and (
                self.best is None or self.best["metric"] != keep_best or changed
                or not _measured_on(self.best, vals)
                or not self._best_held_on_rank0(best_path)):
            # the starting point is the first candidate: never end below it (a
            # run continued into another best file, on other data or measured
            # on other validation pairs, starts that file's record)
            start = self.baseline if self.epoch == 0 else self._val_record(val)
            self.best = {"metric": keep_best, "value": start[keep_best],
                         "epoch": self.epoch, "path": best_path, "val": vals[0]}
            if writes:   # another run's file there survives the first epoch too
                first = self._state(copy=True)
        elif best_path is not None and self.epoch < epochs:   # the record goes on, there
            # stamped with its pairs (a record from before went on unstamped,
            # so any later pairs were taken as its: an attack helper's find)
            self.best = dict(self.best, path=os.fspath(best_path), val=vals[0])
        progress = Progress("auto" if self.progress and writes else None,
                            max(epochs - self.epoch, 0) * steps, epochs)
        started = time.perf_counter()
        summary = None
        try:
            while self.epoch < epochs:
                record = self._run_epoch(inputs, targets, progress)
                if val is not None:
                    record.update(self._val_record(val))
                improved = best_path is not None and _better(
                    keep_best, record[keep_best], self.best["value"])
                with self._lock:   # a save from another thread sees all or none
                    self.epoch += 1
                    self.history.append(record)
                    if improved:
                        self.best = {"metric": keep_best, "value": record[keep_best],
                                     "epoch": self.epoch, "path": best_path, "val": vals[0]}
                if self.comm is not None:   # cheap: a digest of the parameters
                    self.comm.check_same(f"the parameters after epoch {self.epoch}",
                                         list(self._params().values()))
                self._write_epoch(record, checkpoint, best_path, improved, first,
                                  append=log_synced)
                first, log_synced = None, True
                progress.epoch(record)
            if self.epoch > first_epoch and self._summary:
                summary = summary_line(self.history, first_epoch, self.baseline,
                                       time.perf_counter() - started)
        except KeyboardInterrupt as exc:   # a traceback alone said nothing of the run
            if self._saving is not None:
                # stopped in a save: its file may be written already, the
                # record not (grapheme train then named the epoch before the
                # one on disk: a test's find); the record follows the file
                try:
                    if load_checkpoint(self._saving[0])[1].get("epoch") == self._saving[1]:
                        self._last_checkpoint = self._saving
                except (OSError, ValueError):   # not written, or half: the record stands
                    pass
                self._saving = None
            saved = self._last_checkpoint
            self._log_after_stop(checkpoint, first_epoch, log_synced)
            if saved is not None and hasattr(exc, "add_note"):   # Python >= 3.11
                exc.add_note(f"grapheme: epoch {saved[1]} is saved in {saved[0]!r}; "
                             f"fit(..., resume={saved[0]!r}) continues the run")
            raise
        finally:
            progress.close(summary)
        return list(self.history)

    def _best_foreign(self, meta):
        """Whether the best file of meta data ``meta`` (:func:`_best_file_meta`)
        is one a resumed run must not replace unasked: not a checkpoint, or
        another run's (of another configuration, or its history is not the
        beginning of this run's; at epoch 0, its data is not this run's). An
        attack helper's find: a resume wrote its first candidate over
        another run's best.npz, or over a user's file of that name."""
        if meta is None or meta is False:   # no file there, or not a checkpoint
            return meta is False
        history, epoch = meta.get("history"), meta.get("epoch")
        if (not isinstance(history, list) or not isinstance(epoch, int)
                or not 0 <= epoch <= len(self.history) or meta.get("config") != self.config()):
            return True
        if epoch > 0:   # its epochs' losses are this run's
            return _loss_trace(history) != _loss_trace(self.history[:epoch])
        data = meta.get("data")
        mine = {f["sha256"] for f in (self._data_fingerprint, self._loaded_fingerprint)
                if f is not None}
        return not (isinstance(data, dict) and data.get("sha256") in mine)

    def _best_held_on_rank0(self, best_path):
        """:meth:`_best_held_by` as rank 0, the one that writes, sees it,
        on every rank: the others never touch files (a copy of the
        checkpoint is all they need), and one that found no best file went
        on to evaluate alone, a collective the others never joined (a
        review's find: gloo's "collective mismatch")."""
        held = self._best_held_by(best_path) if self._writes else False
        if self.comm is None:
            return held
        flag = np.array([1.0 if held else 0.0])
        self.comm.all_reduce(flag)   # only rank 0's counts
        return bool(flag[0])

    def _best_replaced_by(self, keep_best, best_path, vals=None, new_data=False):
        """Why a record of ``keep_best`` (None: none), measured on the
        validation pairs of fingerprints ``vals`` (:func:`val_fingerprints`;
        None: not known), on other training data if ``new_data``, would
        replace a file at ``best_path`` that is not its own to replace:
        where that file holds the best record, one that starts anew, being
        ``"data"`` (on other training data), ``"metric"`` (another metric's)
        or ``"val"`` (on other validation pairs; these replaced best.npz
        unsaid: attack helpers' finds); where it does not, ``"foreign"``, a
        file a resumed run did not write (:meth:`_best_foreign`). Else None.
        :meth:`fit` refuses that without ``overwrite``, and ``grapheme
        train`` in its own words."""
        if keep_best is None:
            return None
        meta = _best_file_meta(best_path)   # read once, for both questions
        if not self._best_held_by(best_path, meta):
            return "foreign" if self.epoch > 0 and self._best_foreign(meta) else None
        return ("data" if new_data else "metric" if self.best["metric"] != keep_best
                else "val" if vals is not None and not _measured_on(self.best, vals) else None)

    def _best_held_by(self, best_path, meta=None):
        """Whether ``best_path`` holds the best record's checkpoint: a
        checkpoint of that record's epoch that holds that record, wherever
        the record says it was written (the run moved or copied, or resumed
        from another directory: a new user's find, a new record replaced the
        best file with a worse one). Then the record goes on with
        ``best_path``. Its path alone is not enough: a stop between an
        epoch's checkpoint and its best file, a best file deleted, or one of
        a replaced run left the record naming a file that did not hold it,
        and the run reported a best it did not have (an attack helper's
        find); such a run starts a new record. The record is its metric,
        value and epoch: not its path, nor its pairs' fingerprint, which a
        record going on is stamped with (in memory, not in that file).
        ``meta``: the file's, if read already (:func:`_best_file_meta`)."""
        if self.best is None:
            return False
        if meta is None:
            meta = _best_file_meta(best_path)
        if not meta:   # none there, or not a checkpoint: not this record
            return False

        def record(best):
            return {k: v for k, v in best.items() if k not in ("path", "val")}
        held = meta.get("best")
        # and of this configuration: another run's (another seed) can hold
        # an equal record, an untrained model's accuracy say (an attack helper's find)
        return (isinstance(held, dict) and meta.get("epoch") == self.best["epoch"]
                and record(held) == record(self.best) and meta.get("config") == self.config())

    def _files_error(self, files, epochs, keep_best=None, vals=None, new_data=False):
        """Rank 0's look, before the first epoch, at the files it will write
        (``files``: ``[(what, path)]``) to train to ``epochs``: the error to
        raise, or None. A directory in a file's place, whatever
        ``overwrite`` says (it could not help); without ``overwrite``, on a
        fresh run another run's file, and on a resumed one a best checkpoint
        that a record of ``keep_best`` would replace unasked
        (:meth:`_best_replaced_by`) or a log or checkpoint not its own
        (:meth:`_continued_by_me`)."""
        for _, path in files:
            if (error := _not_a_file_error(path)) is not None:
                return error
        best_path = dict(files).get("best checkpoint")
        why = (None if self.overwrite
               else self._best_replaced_by(keep_best, best_path, vals, new_data))
        if why == "foreign":
            return ValueError(
                f"best checkpoint {os.fspath(best_path)!r} is not this run's (another run's "
                "best, or not a checkpoint), which a record here would replace: move it "
                "away, choose another best path (best=), or pass overwrite=True to the "
                "Trainer")
        if why is not None:
            metric = self.best["metric"]
            held = (f"best checkpoint {os.fspath(best_path)!r} holds the best {metric} (epoch "
                    f"{self.best['epoch']})")
            if why == "metric":
                return ValueError(
                    f"{held}, which a record of keep_best={keep_best!r} would replace: keep "
                    f"on with keep_best={metric!r}, choose another best path, or pass "
                    "overwrite=True to the Trainer")
            if why == "val":
                return ValueError(
                    f"{held} measured on other validation pairs, which a record on these "
                    "would replace: validate on the same pairs, choose another best path, or "
                    "pass overwrite=True to the Trainer")
            return ValueError(
                f"{held} of the data the checkpoint was trained on, which a record on the new "
                "data would replace: choose another best path, or pass overwrite=True to the "
                "Trainer")
        if 0 < self.epoch < epochs and not self.overwrite:   # only where it writes
            for what, path in files:
                if what != "best checkpoint" and not self._continued_by_me(what, path):
                    resume = " resume from that checkpoint," if what == "checkpoint" else ""
                    return ValueError(
                        f"{what} {os.fspath(path)!r} is not this run's at or before its "
                        f"epoch {self.epoch} (another run's, a later epoch of this one, or "
                        f"not a run's file), which this run would replace:{resume} choose "
                        f"another path ({_ARGUMENT[what]}), or pass overwrite=True to the "
                        "Trainer")
        if self.epoch == 0 and not self.overwrite:
            for what, path in files:
                if os.path.exists(path) and (what != "log" or os.path.getsize(path) > 0):
                    # named by its argument: the best file's default (beside
                    # the checkpoint) is one a user never wrote (a new user's find)
                    argument = _ARGUMENT[what]
                    return ValueError(
                        f"{what} {os.fspath(path)!r} already exists; a fresh run does not "
                        "replace another run's files: resume that run, choose another "
                        f"path ({argument}), or pass overwrite=True to the Trainer")
        return None

    def _continued_by_me(self, what, path):
        """Whether a resumed run may write its ``what`` (``"log"`` or
        ``"checkpoint"``) at ``path`` unasked: nothing is there, or this
        run is there at or before its epoch (the same configuration and, for
        the epochs there, the same losses). An attack helper's find: a run
        resumed from one checkpoint replaced another run's checkpoint and
        log, or rewound its own from a later epoch, silently."""
        if not os.path.lexists(path):
            return True
        if what == "checkpoint":
            return not self._best_foreign(_best_file_meta(path))
        try:
            with open(path, encoding="utf-8") as f:
                lines = [line for line in f if line.strip()]
        except (OSError, ValueError):   # unreadable, or not text
            return False
        records = []
        for k, line in enumerate(lines):
            try:
                records.append(json.loads(line))
            except ValueError:
                if k < len(lines) - 1:   # a torn last line is a killed run's
                    return False
        return (len(records) <= self.epoch
                and _loss_trace(records) == _loss_trace(self.history[:len(records)]))

    def _agree_start(self, error, fingerprint, epochs, keep_best, val_split):
        """The ranks' agreement before the first step, raising the same
        ValueError on every rank if they do not: on rank 0's look at the
        files (``error``), then the settings, then the starting state."""
        comm = self.comm
        comm.agree("to start (its files)", error)
        # the settings first (a rank made with its own seed has other
        # parameters too, and should be told of its seed): else a rank
        # shards another shuffle, or steps with other settings, silently;
        # other batch sizes or epochs end in gloo
        comm.check_same(
            "the settings, the epochs or the validation pairs (every rank must be "
            "made with the same settings, seed included, and given the same "
            "epochs, keep_best and val)",
            [json.dumps(self.config(), sort_keys=True), repr(self.optimizer),
             json.dumps(self.morpher.state_dict(), sort_keys=True),
             repr(self.rng.bit_generator.state), epochs, keep_best,
             None if val_split is None else data_fingerprint(*val_split)["sha256"]])
        comm.check_same("the training pairs, the epoch or the parameters (every rank "
                        "must be given the same pairs and checkpoint)",
                        [fingerprint["sha256"], self.epoch, *self._params().values()])

    def _write_epoch(self, record, checkpoint, best_path, improved, first, append):
        """The files after an epoch, in this order: the checkpoint; the best
        checkpoint, if this epoch ``improved`` on it, else the first
        candidate's state (``first``, held since before the first epoch of
        this call, or None); the replaced run's files removed
        (``_replaced_files``); the log, rewritten on this call's first epoch
        (an old log survives until then) and appended to after (``append``).
        Only rank 0 writes."""
        writes = self._writes
        if checkpoint is not None:
            if writes:
                self._saving = (os.fspath(checkpoint), self.epoch)
                self._save(checkpoint)
            self._last_checkpoint = (os.fspath(checkpoint), self.epoch)
            self._saving = None
        if not writes:
            return
        if improved:
            self._save(best_path)
        elif first is not None:
            save_checkpoint(best_path, *first)
        for path in self._replaced_files:
            if os.path.isfile(path):
                os.unlink(path)
        self._replaced_files = []
        if self.log is not None:
            if not append:
                self._rewrite_log()
            else:
                with open(self.log, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")

    @property
    def _writes(self):
        """Whether this trainer writes files and reports: not on ranks > 0."""
        return self.comm is None or self.comm.rank == 0

    def _grow(self, inputs, targets):
        """Rows for every character of the training pairs that a step gives
        one (:meth:`_row_texts`), at once: the table the untrained model is
        evaluated with (:attr:`baseline`) is the one its first step sees.
        Rows are a function of the seed and the code point alone, so this
        changes no value, only row order."""
        labels = Graph.from_texts(self._row_texts(inputs, targets)).labels
        self.embedding.rows(np.unique(labels))

    def _row_texts(self, inputs, targets):
        """The texts of a batch whose characters have embedding rows: the
        inputs, and text targets where the table's rows give their
        activations (``target_activation="embedding"``)."""
        if self.target_activation == "embedding" and not _is_segmentation_batch(targets):
            return list(inputs) + list(targets)
        return list(inputs)

    def _val_record(self, val):
        """The ``val_*`` entries of an epoch record (with a communicator, of
        all ranks together: see :meth:`_evaluate_shared`)."""
        v = self.evaluate(val) if self.comm is None else self._evaluate_shared(val)
        return {"val_" + k: v[k] for k in ("loss", "kept_fraction", "accuracy",
                                           *SEGMENTATION_KEYS) if k in v}

    def _check_keep_best(self, keep_best, best, val, checkpoint):
        """The path of the best checkpoint, or None; ``keep_best`` checked."""
        if keep_best is None:
            if best is not None:
                raise ValueError("best needs keep_best (the metric that decides it)")
            return None
        if val is None or checkpoint is None:
            raise ValueError("keep_best needs val (to measure) and checkpoint (to keep "
                             "the last state beside the best)")
        allowed = ["val_loss", "val_accuracy"]
        if segment_lengths(check_pairs(val, "val")[1])[2].any():
            allowed += ["val_" + k for k in SEGMENTATION_KEYS]
        if not isinstance(keep_best, str) or keep_best not in allowed:
            raise ValueError(f"keep_best must be one of {allowed} (the segmentation "
                             f"metrics need segmentation pairs in val), got "
                             f"{show(keep_best)}")
        path = os.fspath(best) if best is not None else os.path.join(
            os.path.dirname(os.fspath(checkpoint)), "best.npz")
        if os.path.abspath(path) == os.path.abspath(os.fspath(checkpoint)):
            raise ValueError(f"best {path!r} must differ from checkpoint")
        return path

    def _run_epoch(self, inputs, targets, progress):
        """One epoch over the shuffled pairs, a step per batch; returns the
        epoch's record of training metrics (:meth:`fit` adds the ``val_*``
        ones: a new metric of the log goes here or there)."""
        n = len(inputs)
        self._unknown_rng = self._epoch_rng()
        order = self.rng.permutation(n)
        sums = dict.fromkeys(LOSS_KEYS, 0.0)
        grad_norms = 0.0
        variances = []
        n_in = n_out = chars = steps = 0
        start = time.perf_counter()
        for lo in range(0, n, self.batch_size):
            idx = order[lo:lo + self.batch_size].tolist()
            batch = [inputs[i] for i in idx], [targets[i] for i in idx]
            if self.comm is None:
                # under the lock, as train_step: a save from another thread
                # read the optimiser's moments between the growth of one and
                # of the other, and wrote a checkpoint that did not load
                # (the fuzz scenario trainer_threads, once in CI)
                with self._lock:
                    stats = self._train_step(*batch)
            else:   # train_step's, but fit has grown the table for every character
                with self._lock, single_pool(self.encoder is not None):
                    stats = self._shard_step(*batch, grown=True)
            w = len(idx)
            for key in sums:
                sums[key] += w * stats[key]
            grad_norms += stats["grad_norm"]
            if math.isfinite(stats["estimator_variance"]):
                variances.append(stats["estimator_variance"])
            n_in += stats["input_nodes"]
            n_out += stats["output_nodes"]
            chars += stats["chars"]
            steps += 1
            progress.step()
        elapsed = time.perf_counter() - start
        record = {"epoch": self.epoch + 1}
        record.update({k: v / n for k, v in sums.items()})
        record["kept_fraction"] = 1.0 if n_in == 0 else n_out / n_in
        record["tau"] = self.morpher.tau
        record["grad_norm"] = grad_norms / steps
        # reinforce: mean over steps of the variance of the per-example
        # d loss / d theta estimates; None for the deterministic estimators.
        record["estimator_variance"] = (sum(variances) / len(variances)
                                        if variances else None)
        record["time"] = elapsed
        record["examples_per_s"] = n / elapsed if elapsed > 0 else float("inf")
        record["chars_per_s"] = chars / elapsed if elapsed > 0 else float("inf")
        return record

    def _rewrite_log(self, count=None):
        """Make the log hold exactly the records of the completed epochs (of
        the first ``count``)."""
        directory = os.path.dirname(os.path.abspath(self.log))
        os.makedirs(directory, exist_ok=True)
        with _atomic_open(self.log, "w", encoding="utf-8", newline="\n") as f:
            for record in self.history[:count]:
                f.write(json.dumps(record) + "\n")

    def _log_after_stop(self, checkpoint, first_epoch, log_synced):
        """After a stop (Ctrl-C, a stop signal), the log holds the records of
        the epochs on disk: of the checkpoint's, or without one, of every
        completed epoch. A stop between a checkpoint's save and the log's
        line left the log an epoch behind (an attack helper's find: 3 stops
        in 25). Only where this call wrote the run's files already: a run
        stopped before that keeps the files it replaces as they were."""
        if not self._writes or self.log is None:
            return
        if checkpoint is not None:
            saved = self._last_checkpoint
            if saved is None or saved[1] <= first_epoch:
                return
            count = saved[1]
        elif log_synced:
            count = self.epoch
        else:
            return
        try:
            self._rewrite_log(count)
        except OSError:   # the stop's own report matters more than the log
            pass

    # ----------------------------------------------------------- checkpoints
    @classmethod
    def from_checkpoint(cls, path, log=None, progress=True, comm=None, overwrite=False):
        """A trainer rebuilt from a checkpoint written by :meth:`save`.

        The embedding, morpher, loss and optimiser are constructed from the
        configuration stored in the checkpoint and their state restored, so
        the trainer can :meth:`evaluate` or continue :meth:`fit` at once.

        Parameters
        ----------
        path : str or os.PathLike
        log : str or os.PathLike, optional
            The run's metrics log, as the constructor's. A checkpoint does
            not record it: pass it again to go on appending to the run's
            ``metrics.jsonl``.
        progress : bool, default True
        comm : grapheme.distributed.Communicator, optional
            One rank of a data-parallel run (every rank loads the same
            checkpoint).
        overwrite : bool, default False
            As the constructor's: a checkpoint of epoch 0 (an untrained
            best checkpoint) continues as a fresh run, which replaces an
            existing log or checkpoint only with it.

        Raises
        ------
        FileNotFoundError
            If ``path`` does not exist.
        ValueError
            If the checkpoint is corrupted or names an unknown component.
        """
        _check_comm(comm)   # the caller's, not the checkpoint's, to blame
        arrays, meta = load_checkpoint(path)
        path = check_path(path, "path")
        _not_a_model_file(path, meta)
        if not isinstance(meta.get("config"), dict):   # was "unusable configuration: 'config'"
            what = ("missing" if "config" not in meta else "null" if meta["config"] is None
                    else f"a JSON {type(meta['config']).__name__}")
            raise ValueError(f"checkpoint {path!r} has no configuration (its 'config' is "
                             f"{what}): not a grapheme training checkpoint, or a damaged one")
        try:
            check_sizes(meta.get("config"), arrays)
            trainer = cls._from_config(meta["config"], log=log, progress=progress,
                                       comm=comm, overwrite=overwrite)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"checkpoint {path!r} has an unusable configuration: "
                             f"{exc}") from None
        trainer.load(path)
        return trainer

    @classmethod
    def _from_config(cls, config, **kwargs):
        """A fresh trainer from :meth:`config` output: new components of the
        described types, untrained (the optimiser's hyperparameters are
        state, restored by :meth:`load`)."""
        known_opt = {"Adam": _optim.Adam, "SGD": _optim.SGD}
        opt_type = config["optimizer"]["type"]
        if opt_type not in known_opt:
            raise ValueError(f"unknown optimizer {opt_type!r}")
        return cls(build(config["embedding"]), build(config["morpher"]),
                   build(config["loss"]), known_opt[opt_type](lr=1.0),
                   batch_size=config["batch_size"], seed=config["seed"],
                   target_activation=config["target_activation"],
                   unknown_prob=config.get("unknown_prob", _UNRECORDED_UNKNOWN_PROB),
                   encoder=build(config.get("encoder")), **kwargs)

    def _check_recordable(self, reloaded):
        """Refuse (TypeError) a loss that :meth:`config` cannot describe
        (``get_params``), or, when ``reloaded`` (checkpoints), one that
        :func:`~grapheme.train.state.build` cannot make again: before the
        first epoch, not when its first checkpoint is written."""
        loss = self.loss
        name = type(loss).__name__
        if not callable(getattr(loss, "get_params", None)):
            raise TypeError(f"loss {name} has no get_params(): checkpoints and "
                            "data-parallel ranks record the loss's settings by it")
        if reloaded and registry().get(name) is not type(loss):
            raise TypeError(f"loss {name} cannot be reloaded from a checkpoint, which "
                            "names one of grapheme's loss types (StructuralLoss): train "
                            "it without checkpoint=")

    def config(self):
        """What must agree between a checkpoint and a trainer resuming it:
        the batching, and every component as :func:`~grapheme.train.state.describe`
        gives it (the optimiser by type; its hyperparameters are state)."""
        self._check_settings()   # never a configuration that cannot be loaded back
        return {
            "batch_size": self.batch_size,
            "seed": self.seed,
            "target_activation": self.target_activation,
            "unknown_prob": self.unknown_prob,
            "embedding": describe(self.embedding),
            "morpher": describe(self.morpher),
            "encoder": describe(self.encoder),
            "loss": describe(self.loss),
            "optimizer": {"type": type(self.optimizer).__name__},
        }

    def save(self, path, overwrite=None):
        """Write the complete training state to ``path`` (atomic ``.npz``).

        Parameters
        ----------
        path : str or os.PathLike
        overwrite : bool, optional
            Replace an existing file; without it one is refused. Default:
            the trainer's own ``overwrite`` (False unless it was made with
            ``overwrite=True``). ``fit`` replaces its own ``checkpoint``
            every epoch, under its own rule.

        Raises
        ------
        IsADirectoryError
            If ``path`` is a directory or ends with a separator.
        FileExistsError
            If ``path`` exists and ``overwrite`` is false.
        FloatingPointError
            If the parameters are not finite (nothing is written).
        """
        if overwrite is None:
            self._check_settings()
            overwrite = self.overwrite
        elif not isinstance(overwrite, (bool, np.bool_)):
            raise TypeError(f"overwrite must be True, False or None, got {show(overwrite)}")
        self._save(_new_file(path, overwrite, "checkpoint"))

    @_serialized
    def _save(self, path):
        """:meth:`save`, replacing ``path``: ``fit``'s checkpoints."""
        if not _all_finite(self._params()):
            raise FloatingPointError(
                f"not saving {os.fspath(path)!r}: the parameters are not finite "
                f"(training diverged); {self._good_checkpoint()}")
        save_checkpoint(path, *self._state())

    def _state(self, copy=False):
        """``(arrays, meta)`` of a checkpoint of the trainer as it is now;
        ``copy``: owning copies, that training does not change."""
        arrays = self.model._arrays()   # the model file's arrays, and the optimiser's
        for key, value in self.optimizer.state_dict().items():
            arrays["optimizer." + key] = np.asarray(value)
        meta = {"epoch": self.epoch, "rng": self.rng.bit_generator.state,
                "morpher": self.morpher.state_dict(),
                "config": self.config(), "history": list(self.history),
                "data": self._data_fingerprint, "best": self.best,
                "baseline": self.baseline}
        if copy:
            return {k: np.array(v) for k, v in arrays.items()}, _copy.deepcopy(meta)
        return arrays, meta

    @_serialized
    def load(self, path):
        """Restore the training state saved by :meth:`save`.

        Raises
        ------
        FileNotFoundError
            If ``path`` does not exist.
        ValueError
            If the checkpoint is corrupted, or was written by a trainer with
            a different configuration (batch size, seed, model settings).
        """
        arrays, meta = load_checkpoint(
            path, required=("embedding.codes", "embedding.weight", "morpher.theta"))
        path = check_path(path, "path")
        _not_a_model_file(path, meta)
        try:
            epoch, rng_state = meta["epoch"], meta["rng"]
            morpher_state = dict(meta["morpher"], theta=float(arrays["morpher.theta"]))
            config, history = meta["config"], meta["history"]
            if isinstance(config, dict):   # written before the unknown row: none replaced
                config = {"unknown_prob": _UNRECORDED_UNKNOWN_PROB, **config}
            if isinstance(history, list):  # written before kept_fraction replaced merge_rate
                history = [upgrade_record(r) if isinstance(r, dict) else r for r in history]
            data = meta.get("data")
            best = meta.get("best")
            baseline = meta.get("baseline")
            if baseline is not None:
                if not isinstance(baseline, dict) or not all(
                        isinstance(k, str) and isinstance(v, (int, float))
                        for k, v in baseline.items()):
                    raise ValueError(f"baseline must be a record of metrics, got "
                                     f"{show(baseline)}")
                baseline = upgrade_record(baseline)
            if best is not None and not (
                    isinstance(best, dict) and isinstance(best.get("metric"), str)
                    and isinstance(best.get("value"), (int, float))
                    and isinstance(best.get("epoch"), int)
                    and isinstance(best.get("path"), str)
                    and isinstance(best.get("val"), (str, type(None)))):
                raise ValueError(f"best must be a record of the best checkpoint, got "
                                 f"{show(best)}")
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"checkpoint {path!r} is corrupted or truncated: "
                             f"bad meta data ({exc})") from None
        _check_run_meta(path, epoch, history, data, best)
        mine = self.config()
        if config != mine:
            diff = sorted(k for k in set(config) | set(mine)
                          if config.get(k) != mine.get(k))
            details = "; ".join(f"{k}: checkpoint {config.get(k)!r}, trainer "
                                f"{mine.get(k)!r}" for k in diff)
            raise ValueError(f"checkpoint {path!r} was written with a different "
                             f"configuration ({details})")
        theta = arrays["morpher.theta"]
        if theta.shape != () or theta.dtype != np.float64:
            raise ValueError(f"checkpoint {path!r} is corrupted or truncated: "
                             "morpher.theta is not a float64 scalar")
        try:
            embedding = Embedding.from_state(
                {"codes": arrays["embedding.codes"], "weight": arrays["embedding.weight"]},
                seed=self.embedding.seed, dtype=self.embedding.dtype)
            if embedding.dim != self.embedding.dim:
                raise ValueError(f"embedding.weight has {embedding.dim} columns, the "
                                 f"configuration says dim={self.embedding.dim}")
            prefix = "optimizer."
            optimizer_state = {k[len(prefix):]: v for k, v in arrays.items()
                               if k.startswith(prefix)}
            shapes = {name: (np.shape(value), np.asarray(value).dtype)
                      for name, value in self._params().items()}
            shapes["embedding"] = (embedding.weight.shape, embedding.weight.dtype)
            _check_optimizer_state(optimizer_state, shapes)
            rng = np.random.default_rng()
            rng.bit_generator.state = rng_state
            # validate everything before changing anything: a scratch optimiser,
            # encoder and morpher take the state first
            scratch = type(self.optimizer)(lr=1.0)
            scratch.load_state_dict(optimizer_state)
            encoder_state = None
            if self.encoder is not None:
                prefix = "encoder."
                encoder_state = {k[len(prefix):]: v for k, v in arrays.items()
                                 if k.startswith(prefix)}
                build(describe(self.encoder)).load_state_dict(encoder_state)
            build(describe(self.morpher)).load_state_dict(morpher_state)
            self.optimizer.load_state_dict(optimizer_state)
            if self.encoder is not None:
                self.encoder.load_state_dict(encoder_state)
            self.morpher.load_state_dict(morpher_state)
        except (TypeError, ValueError, KeyError, AttributeError, OverflowError) as exc:
            raise ValueError(f"checkpoint {path!r} is corrupted or truncated: "
                             f"{exc}") from None
        # Keep the caller's objects live: copy the (validated) state into them.
        self.embedding.load_state_dict(embedding.state_dict())
        self.morpher.zero_grad()
        self.rng = rng
        self.epoch = epoch
        self.history = list(history)
        self._data_fingerprint = data
        self.best = None if best is None else dict(best)
        self.baseline = baseline
        self._loaded_fingerprint = None if data is None else dict(data, path=path)


#: What a data-parallel step sums over the ranks, beside the gradients (the
#: loss terms weighted by pairs, and the node counts), in the order of the
#: all-reduce's buffer.
SHARD_SUMS = LOSS_KEYS + ("chars", "output_nodes", "input_nodes")

def _eval_scores(sums, n_in, n_out, correct, seg, n):
    """:meth:`Trainer.evaluate`'s record from its sums over ``n`` pairs."""
    out = {k: v / n for k, v in sums.items()}
    out["kept_fraction"] = 1.0 if n_in == 0 else n_out / n_in
    out["accuracy"] = correct / n
    if seg is not None:
        out.update(segmentation_scores(seg))
    return out


def _better(metric, value, best):
    """Whether ``value`` of ``metric`` strictly improves on ``best`` (the loss
    is minimised, every other metric maximised; NaN never improves)."""
    if not math.isfinite(value):
        return False
    if not math.isfinite(best):
        return True
    return value < best if metric == "val_loss" else value > best


def _all_finite(params):
    """Whether every parameter array holds only finite numbers (one pass each)."""
    return all(_core.all_finite(np.ascontiguousarray(
        p, dtype=np.float32 if p.dtype == np.float32 else np.float64).reshape(-1))
        for p in params.values())


def data_fingerprint(inputs, targets):
    """``{"pairs": n, "sha256": hex}`` of the training pairs, in order: what a
    checkpoint records so that a resumed run can tell it is given other data."""
    h = hashlib.sha256()
    for source, target in zip(inputs, targets):
        texts = (source, target) if isinstance(target, str) else (source, "\0segments",
                                                                  *target)
        for text in texts:
            raw = text.encode("utf-8", "surrogatepass")
            h.update(len(raw).to_bytes(8, "little"))
            h.update(raw)
        if not isinstance(target, str):
            h.update((-1).to_bytes(8, "little", signed=True))
    return {"pairs": len(inputs), "sha256": h.hexdigest()}


def val_fingerprints(inputs, targets):
    """The fingerprints of validation pairs a best record may hold: of the
    pairs in any order (each pair's sha256, sorted, hashed: what a record
    holds now; the same pairs in another order gave other validation pairs,
    whose metrics are means: an attack helper's find) and of them in their
    order (:func:`data_fingerprint`'s, what records before December 2026
    hold)."""
    h = hashlib.sha256()
    for digest in sorted(data_fingerprint([s], [t])["sha256"] for s, t in zip(inputs, targets)):
        h.update(bytes.fromhex(digest))
    return h.hexdigest(), data_fingerprint(inputs, targets)["sha256"]


#: The argument that names each file fit writes.
_ARGUMENT = {"log": "the Trainer's log=", "checkpoint": "checkpoint=",
             "best checkpoint": "best="}


def _loss_trace(records):
    """The (epoch, loss) of each record: what tells one run's history from
    another's."""
    return [(r.get("epoch"), r.get("loss")) if isinstance(r, dict) else None
            for r in records]


def _best_file_meta(path):
    """The meta data of the checkpoint at ``path``: None where there is no
    file, False where the file is not a checkpoint."""
    if not os.path.lexists(path):
        return None
    try:
        return load_checkpoint(path)[1]
    except (OSError, ValueError):
        return False


def _measured_on(record, vals):
    """Whether a best ``record`` was measured on the validation pairs of
    fingerprints ``vals`` (:func:`val_fingerprints`); a record without one,
    from before it was kept, is taken as on them."""
    return record.get("val") in (None, *vals)


def _check_run_meta(path, epoch, history, data, best):
    """The epoch counter, the history, the data fingerprint and the best
    record of a checkpoint, checked before anything is restored."""
    def bad(reason):
        return ValueError(f"checkpoint {path!r} is corrupted or truncated: {reason}")

    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise bad(f"epoch must be a non-negative integer, got {show(epoch)}")
    if not isinstance(history, list) or len(history) != epoch:
        length = len(history) if isinstance(history, list) else type(history).__name__
        raise bad(f"history must hold one record per epoch ({epoch}), got {length}")
    for i, record in enumerate(history):
        if not isinstance(record, dict) or record.get("epoch") != i + 1:
            raise bad(f"history[{i}] is not the record of epoch {i + 1}")
        for key, value in record.items():   # numbers, or null (a metric not measured)
            if not isinstance(key, str) or isinstance(value, bool) or not (
                    value is None or isinstance(value, (int, float))):
                raise bad(f"history[{i}][{key!r}] is not a number, got {show(value)}")
    if data is not None and not (
            isinstance(data, dict) and isinstance(data.get("sha256"), str)
            and isinstance(data.get("pairs"), int) and not isinstance(data["pairs"], bool)):
        raise bad("data must be a fingerprint {'pairs': int, 'sha256': str}")
    if best is not None and not 0 <= best["epoch"] <= epoch:
        raise bad(f"the best checkpoint's epoch ({best['epoch']}) is not one of the "
                  f"{epoch} epochs so far")


def _check_optimizer_state(state, shapes):
    """Every state array of the optimiser finite, of its parameter's dtype
    and shaped like it (the embedding's may have fewer rows: it grows);
    ``shapes``: each parameter's ``(shape, dtype)``. A float32 moment of a
    float64 parameter loaded, and the first step failed in a traceback (an
    attack helper's find)."""
    for key, value in state.items():
        slot, _, name = key.partition(".")
        if not name or slot == "step":
            continue
        arr = np.asarray(value)
        if arr.dtype.kind != "f":
            continue   # load_state_dict names it
        if not np.isfinite(arr).all():
            raise ValueError(f"optimizer.{key} contains NaN or infinity")
        if name not in shapes:
            raise ValueError(f"optimizer.{key} is state of an unknown parameter {name!r}")
        want, dtype = shapes[name]
        if arr.dtype != dtype:
            raise ValueError(f"optimizer.{key} is {arr.dtype}, its parameter {dtype}")
        ok = arr.shape == want or (len(want) == 2 and arr.ndim == 2
                                   and arr.shape[1] == want[1] and arr.shape[0] <= want[0])
        if not ok:
            raise ValueError(f"optimizer.{key} has shape {arr.shape}, its parameter "
                             f"has {want}")


def _explicit_activation(graph):
    """``graph`` with its activations (its feature means, on the kernels'
    threads) stored: the loss then returns their gradient alone, and the
    Trainer maps it onto the features itself, into its workspace
    (:meth:`FeatureMean.vjp <grapheme.ops.FeatureMean.vjp>` with ``out=``),
    where the loss would make a fresh (n, d) array per step."""
    return graph._with(activation=graph._activations(num_threads=0))


def _by_position(g):
    """``g`` with every node labelled by its offset in its own text.

    A segmentation pair's nodes are named by where they start: the morphed
    graph's heads by the offsets of the segments they head, the target's by
    those of the gold segments. The type part of the node cost then tells a
    segment that starts at a gold boundary from one that does not; with the
    characters as labels it could only tell which character a segment starts
    with, and every ``t`` of a text would be as good as every other (see
    docs/design.md, "Segmentation targets"). The morph reads only features,
    so this changes what the loss compares and nothing else."""
    offsets = g.graph_offsets
    first = np.repeat(offsets[:-1], np.diff(offsets))
    return g._with(labels=(np.arange(g.num_nodes, dtype=np.int64) - first).astype(np.int32))


def _is_segmentation_batch(targets):
    """Whether the batch's targets are segmentations (all of them), or texts.

    Raises ``ValueError`` for a mix: their target graphs are built
    differently (contracted inputs against text chains)."""
    kinds = {isinstance(t, tuple) for t in targets}
    if len(kinds) > 1:
        raise ValueError("a batch must hold segmentation targets only or text targets only")
    return kinds == {True}


def _checked_batch(inputs, targets):
    """``train_step``'s batch as two lists, checked as :meth:`Trainer.fit`
    checks its pairs (a list segmentation becomes a tuple); a problem names
    the pair, ``(inputs, targets)[i]``."""
    for value, name in ((inputs, "inputs"), (targets, "targets")):
        if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
            raise TypeError(f"{name} must be a list, got {type(value).__name__}")
    if len(inputs) != len(targets):
        raise ValueError(f"inputs and targets must have the same length, got {len(inputs)} "
                         f"and {len(targets)}")
    if len(inputs) == 0:
        raise ValueError("a training step needs a batch of at least one pair")
    return check_pairs(list(zip(inputs, targets)), "(inputs, targets)")
