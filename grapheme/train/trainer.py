"""The training loop: batches of text pairs through embedding, morpher and loss.

One step takes ``B`` pairs ``(input, target)``, builds ONE batched chain graph
of the inputs and one of the targets, and runs the operations of
:mod:`grapheme.ops` forward, then their vjps in reverse::

    H = table[rows]                              # Lookup
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
import json
import math
import numbers
import os
import sys
import time

import numpy as np

from .._validation import check_pairs, check_scalar
from ..checkpoint import _atomic_open, load_checkpoint, save_checkpoint
from ..embedding import Embedding
from ..encoder import Encoder
from ..graph import Graph, replicate
from ..morph import Morpher
from ..ops import FeatureMean, Lookup
from .. import optim as _optim
from .metrics import LOSS_KEYS, structure_match
from .state import build, describe

__all__ = ["Trainer"]

TARGET_ACTIVATIONS = ("embedding", "graph")


class Trainer:
    """Fit an embedding and a morpher to (input, target) text pairs.

    Parameters
    ----------
    embedding : Embedding
        Character embedding; its table grows as new characters appear.
    morpher : Morpher
        The learnable merge step; its ``theta`` is trained.
    loss : StructuralLoss
        Compares the morphed graph with the target graph; must provide
        ``forward(predicted, target)`` returning a result with ``value``,
        ``node``, ``edge``, ``clique`` and per-pair ``values``, and
        ``backward(result)`` returning ``activation``, ``mass`` and
        ``target_activation`` gradients.
    optimizer : Optimizer
        Updates the parameters ``"embedding"`` (the embedding table) and
        ``"theta"``.
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
        JSONL file receiving one line of metrics per epoch.
    progress : bool, default True
        Show a tqdm progress bar (only when stderr is a terminal).

    Attributes
    ----------
    epoch : int
        Number of completed epochs.
    history : list of dict
        One record of metrics per completed epoch.

    Notes
    -----
    A run is reproducible: with the same seeds and data, two runs produce
    bit-identical weights and metrics (apart from timings), and a run resumed
    from a checkpoint continues exactly as the uninterrupted run would.
    """

    def __init__(self, embedding, morpher, loss, optimizer, batch_size=32, seed=0,
                 target_activation="embedding", log=None, progress=True, encoder=None):
        if not isinstance(embedding, Embedding):
            raise TypeError(f"embedding must be a grapheme.Embedding, got "
                            f"{type(embedding).__name__}")
        if not isinstance(morpher, Morpher):
            raise TypeError(f"morpher must be a grapheme.Morpher, got "
                            f"{type(morpher).__name__}")
        if not (callable(getattr(loss, "forward", None))
                and callable(getattr(loss, "backward", None))):
            raise TypeError(f"loss must have forward() and backward(), got "
                            f"{type(loss).__name__}")
        if not isinstance(optimizer, _optim.Optimizer):
            raise TypeError(f"optimizer must be a grapheme.optim.Optimizer, got "
                            f"{type(optimizer).__name__}")
        if encoder is not None and not isinstance(encoder, Encoder):
            raise TypeError(f"encoder must be a grapheme.Encoder or None, got "
                            f"{type(encoder).__name__}")
        if encoder is not None and encoder.dim != embedding.dim:
            raise ValueError(f"encoder.dim = {encoder.dim} must equal embedding.dim = "
                             f"{embedding.dim}")
        self.encoder = encoder
        self.embedding = embedding
        self.morpher = morpher
        self.loss = loss
        self.optimizer = optimizer
        self.batch_size = check_scalar(batch_size, "batch_size", lower=1, integer=True)
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.seed = int(seed)
        if target_activation not in TARGET_ACTIVATIONS:
            raise ValueError(f"target_activation must be one of {TARGET_ACTIVATIONS}, "
                             f"got {target_activation!r}")
        self.target_activation = target_activation
        self.log = None if log is None else os.fspath(log)
        self.progress = bool(progress)
        self.rng = np.random.default_rng(self.seed)
        self.epoch = 0
        self.history = []
        self._buffers = {}

    # ------------------------------------------------------------------ step
    def _batch(self, inputs, targets):
        """Input graph with its table rows and features; the target graph."""
        emb = self.embedding
        g = Graph.from_texts(inputs)
        rows = emb.rows(g.labels)
        target = Graph.from_texts(targets)
        t_rows = None
        if self.target_activation == "embedding":
            # the mean of a looked-up row is the looked-up row mean: O(V d + m)
            t_rows = emb.rows(target.labels)
            row_means = FeatureMean().forward(emb.weight)[0].activation
            target = target._with(activation=Lookup().forward(row_means, t_rows)[0].features)
        H = Lookup().forward(emb.weight, rows,
                             out=self._buffer("features", (rows.shape[0], emb.dim)))[0].features
        return g, rows, H, target, t_rows

    def _encode(self, g, H):
        """``((features, queries, keys), saved)`` of the encoder, or ``((H,), None)``."""
        if self.encoder is None:
            return (H,), None
        result, saved = self.encoder.forward(g, H)
        return tuple(result), saved

    def _params(self):
        """The arrays the optimiser updates, by name."""
        params = {"embedding": self.embedding.weight, "theta": self.morpher.theta}
        if self.encoder is not None:
            params.update({"encoder." + k: v for k, v in self.encoder.params.items()})
        return params

    def _buffer(self, name, shape):
        """A C-contiguous float64 view of ``shape`` on one of the two arrays
        this trainer reuses from step to step (the input features and their
        gradient): grown by at least half when too small. Reused because a
        fresh array of this size is often handed back to the system when it
        dies, and paying its page faults again every step made the
        1000-pair step a third slower (``python -m bench --bench TrainStep``)."""
        size = shape[0] * shape[1]
        buf = self._buffers.get(name)
        if buf is None or buf.size < size:
            buf = self._buffers[name] = np.empty(max(size, 0 if buf is None else
                                                     buf.size * 3 // 2))
        return buf[:size].reshape(shape)

    def train_step(self, inputs, targets):
        """One optimisation step on a batch; returns the step's statistics.

        Parameters
        ----------
        inputs, targets : list of str
            The batch, ``len(inputs) == len(targets) >= 1``.

        Returns
        -------
        dict
            ``loss``, ``node``, ``edge``, ``clique`` (batch means),
            ``input_nodes``, ``output_nodes``, ``chars``, ``grad_norm``
            (Euclidean norm of all parameter gradients before the update)
            and ``estimator_variance`` (``Reinforce``: the sample variance
            over the examples of their estimates of ``d loss / d theta``,
            else NaN).
        """
        emb, morpher = self.embedding, self.morpher
        g, rows, H, target, t_rows = self._batch(inputs, targets)
        encoded, enc_saved = self._encode(g, H)
        morphed = morpher.forward(g, *encoded)
        target = replicate(target, morphed.samples)
        res = self.loss.forward(morphed.graph, target)
        lg = self.loss.backward(res)
        B = res.values.shape[0]
        advantage = morphed.advantage(res.values)
        grad = morpher.vjp(morphed, grad_features=lg.features, grad_mass=lg.mass,
                           grad_weights=lg.weights,
                           grad_log_prob=None if advantage is None else advantage / B,
                           grad_rate_penalty=1.0, out=self._buffer("grad", H.shape))
        grad_h, enc_grads = grad.features, {}
        if self.encoder is not None:
            grad_h, enc_grads = self.encoder.vjp(enc_saved, grad.features, grad.queries,
                                                 grad.keys)
        grad_table = Lookup().vjp((rows, emb.weight.shape), grad_h)[0]
        if t_rows is not None and target.num_nodes:
            # the target's activations: Lookup(FeatureMean(table), t_rows)
            gt = lg.target_activation
            if morphed.samples > 1:
                gt = gt.reshape(morphed.samples, -1).sum(axis=0)
            g_means = Lookup().vjp((t_rows, (emb.weight.shape[0],)), gt)[0]
            grad_table += FeatureMean().vjp(emb.weight.shape, g_means)[0]
        grads = {"embedding": grad_table, "theta": grad.theta,
                 **{"encoder." + k: v for k, v in enc_grads.items()}}
        grad_norm = math.sqrt(sum(float(np.vdot(v, v)) for v in grads.values()))
        if not math.isfinite(float(res.value)) or not math.isfinite(grad_norm):
            raise FloatingPointError(
                f"non-finite loss ({float(res.value)!r}) or gradient norm "
                f"({grad_norm!r}) at epoch {self.epoch + 1}")
        self.optimizer.step(self._params(), grads)
        morpher.step(morphed, res.values)
        variance = float("nan")
        if advantage is not None and B > 1:
            variance = float(np.var(morpher.theta_estimates(morphed, advantage), ddof=1))
        return {"loss": float(res.value), "node": float(res.node),
                "edge": float(res.edge), "clique": float(res.clique),
                "input_nodes": g.num_nodes, "output_nodes": morphed.history.num_outputs,
                "chars": g.num_nodes, "grad_norm": grad_norm,
                "estimator_variance": variance}

    # ------------------------------------------------------------- evaluate
    def evaluate(self, pairs, batch_size=None):
        """Loss and exact-structure accuracy on ``pairs``, without training.

        The embedding may still grow (rows for unseen characters are
        created), but no parameter is updated and no gradient is kept.

        Parameters
        ----------
        pairs : list of (str, str)
        batch_size : int, optional
            Defaults to the trainer's batch size.

        Returns
        -------
        dict
            ``loss``, ``node``, ``edge``, ``clique`` (means over pairs),
            ``merge_rate`` (1 - output nodes / input nodes) and ``accuracy``
            (fraction of pairs whose hard morph has exactly the target's
            number of nodes and labels).
        """
        inputs, targets = check_pairs(pairs, "pairs")
        if not inputs:
            raise ValueError("pairs must not be empty")
        bs = self.batch_size if batch_size is None else check_scalar(
            batch_size, "batch_size", lower=1, integer=True)
        sums = dict.fromkeys(LOSS_KEYS, 0.0)
        n_in = n_out = correct = 0
        for lo in range(0, len(inputs), bs):
            bi, bt = inputs[lo:lo + bs], targets[lo:lo + bs]
            g, _, H, target, _ = self._batch(bi, bt)
            morphed = self.morpher.predict(g, *self._encode(g, H)[0])
            res = self.loss.forward(morphed.graph, target)
            w = len(bi)
            for key in sums:
                sums[key] += w * float(getattr(res, "value" if key == "loss" else key))
            n_in += g.num_nodes
            n_out += morphed.history.num_outputs
            correct += int(structure_match(g, morphed.history, target).sum())
        n = len(inputs)
        out = {k: v / n for k, v in sums.items()}
        out["merge_rate"] = 0.0 if n_in == 0 else 1.0 - n_out / n_in
        out["accuracy"] = correct / n
        return out

    # ------------------------------------------------------------------ fit
    def fit(self, pairs, epochs, val=None, checkpoint=None, resume=None):
        """Train for ``epochs`` epochs in total; return the per-epoch history.

        Parameters
        ----------
        pairs : list of (str, str)
            Training pairs, shuffled anew every epoch.
        epochs : int
            Total number of epochs of the run. When resuming from a
            checkpoint saved after epoch ``e``, epochs ``e + 1 .. epochs``
            are run.
        val : list of (str, str), optional
            Validation pairs, evaluated after every epoch.
        checkpoint : str or os.PathLike, optional
            Written atomically after every epoch.
        resume : str or os.PathLike, optional
            A checkpoint to continue from. The continued run is
            bit-identical to an uninterrupted one.

        Returns
        -------
        history : list of dict
            One record per epoch (including those restored from ``resume``):
            ``epoch``, ``loss``, ``node``, ``edge``, ``clique`` (means over
            the epoch's pairs), ``merge_rate``, ``tau`` (at the end of the
            epoch), ``grad_norm`` (mean over steps), ``time``,
            ``examples_per_s``, ``chars_per_s`` and, with ``val``,
            ``val_loss``, ``val_merge_rate``, ``val_accuracy``.

        Raises
        ------
        ValueError
            If ``pairs`` is empty or malformed, ``epochs`` is negative, or
            ``resume`` is not a compatible checkpoint.
        """
        inputs, targets = check_pairs(pairs, "pairs")
        if not inputs:
            raise ValueError("pairs must not be empty")
        epochs = check_scalar(epochs, "epochs", lower=0, integer=True)
        if val is not None:
            check_pairs(val, "val")
            if not len(val):
                raise ValueError("val must not be empty when given")
        if resume is not None:
            self.load(resume)
        if self.log is not None:
            self._rewrite_log()
        n = len(inputs)
        steps = -(-n // self.batch_size)
        bar = self._progress_bar(total=max(epochs - self.epoch, 0) * steps)
        try:
            while self.epoch < epochs:
                record = self._run_epoch(inputs, targets, bar)
                if val is not None:
                    v = self.evaluate(val)
                    record["val_loss"] = v["loss"]
                    record["val_merge_rate"] = v["merge_rate"]
                    record["val_accuracy"] = v["accuracy"]
                self.epoch += 1
                self.history.append(record)
                if checkpoint is not None:
                    self.save(checkpoint)
                if self.log is not None:
                    with open(self.log, "a", encoding="utf-8") as f:
                        f.write(json.dumps(record) + "\n")
                if bar is not None:
                    bar.set_postfix(epoch=self.epoch, loss=f"{record['loss']:.4f}",
                                    tau=f"{record['tau']:.3f}")
        finally:
            if bar is not None:
                bar.close()
        return list(self.history)

    def _run_epoch(self, inputs, targets, bar):
        n = len(inputs)
        order = self.rng.permutation(n)
        sums = dict.fromkeys(LOSS_KEYS, 0.0)
        grad_norms = 0.0
        variances = []
        n_in = n_out = chars = steps = 0
        start = time.perf_counter()
        for lo in range(0, n, self.batch_size):
            idx = order[lo:lo + self.batch_size].tolist()
            stats = self.train_step([inputs[i] for i in idx], [targets[i] for i in idx])
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
            if bar is not None:
                bar.update(1)
        elapsed = time.perf_counter() - start
        record = {"epoch": self.epoch + 1}
        record.update({k: v / n for k, v in sums.items()})
        record["merge_rate"] = 0.0 if n_in == 0 else 1.0 - n_out / n_in
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

    def _progress_bar(self, total):
        if not self.progress or total == 0:
            return None
        isatty = getattr(sys.stderr, "isatty", None)
        if not (isatty and isatty()):
            return None
        from tqdm.auto import tqdm
        return tqdm(total=total, unit="step", leave=False, dynamic_ncols=True)

    def _rewrite_log(self):
        """Make the log hold exactly the records of the completed epochs."""
        directory = os.path.dirname(os.path.abspath(self.log))
        os.makedirs(directory, exist_ok=True)
        with _atomic_open(self.log, "w", encoding="utf-8", newline="\n") as f:
            for record in self.history:
                f.write(json.dumps(record) + "\n")

    # ----------------------------------------------------------- checkpoints
    @classmethod
    def from_checkpoint(cls, path, log=None, progress=True):
        """A trainer rebuilt from a checkpoint written by :meth:`save`.

        The embedding, morpher, loss and optimiser are constructed from the
        configuration stored in the checkpoint and their state restored, so
        the trainer can :meth:`evaluate` or continue :meth:`fit` at once.

        Parameters
        ----------
        path : str or os.PathLike
        log : str or os.PathLike, optional
        progress : bool, default True

        Raises
        ------
        FileNotFoundError
            If ``path`` does not exist.
        ValueError
            If the checkpoint is corrupted or names an unknown component.
        """
        _, meta = load_checkpoint(path)
        path = os.fspath(path)
        known_opt = {"Adam": _optim.Adam, "SGD": _optim.SGD}
        try:
            config = meta["config"]
            opt_type = config["optimizer"]["type"]
            if opt_type not in known_opt:
                raise ValueError(f"unknown optimizer {opt_type!r}")
            trainer = cls(build(config["embedding"]), build(config["morpher"]),
                          build(config["loss"]), known_opt[opt_type](lr=1.0),
                          batch_size=config["batch_size"], seed=config["seed"],
                          target_activation=config["target_activation"], log=log,
                          progress=progress, encoder=build(config.get("encoder")))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"checkpoint {path!r} has an unusable configuration: "
                             f"{exc}") from None
        trainer.load(path)
        return trainer

    def config(self):
        """What must agree between a checkpoint and a trainer resuming it:
        the batching, and every component as :func:`~grapheme.train.state.describe`
        gives it (the optimiser by type; its hyperparameters are state)."""
        return {
            "batch_size": self.batch_size,
            "seed": self.seed,
            "target_activation": self.target_activation,
            "embedding": describe(self.embedding),
            "morpher": describe(self.morpher),
            "encoder": describe(self.encoder),
            "loss": describe(self.loss),
            "optimizer": {"type": type(self.optimizer).__name__},
        }

    def save(self, path):
        """Write the complete training state to ``path`` (atomic ``.npz``)."""
        arrays = {"embedding.codes": self.embedding.codes,
                  "embedding.weight": self.embedding.weight,
                  "morpher.theta": self.morpher.theta}
        if self.encoder is not None:
            arrays.update({"encoder." + k: v for k, v in self.encoder.params.items()})
        for key, value in self.optimizer.state_dict().items():
            arrays["optimizer." + key] = np.asarray(value)
        meta = {"epoch": self.epoch, "rng": self.rng.bit_generator.state,
                "morpher": self.morpher.state_dict(),
                "config": self.config(), "history": self.history}
        save_checkpoint(path, arrays, meta)

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
        path = os.fspath(path)
        try:
            epoch, rng_state = int(meta["epoch"]), meta["rng"]
            morpher_state = dict(meta["morpher"], theta=float(arrays["morpher.theta"]))
            config, history = meta["config"], list(meta["history"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"checkpoint {path!r} is corrupted or truncated: "
                             f"bad meta data ({exc})") from None
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
                seed=self.embedding.seed)
            prefix = "optimizer."
            self.optimizer.load_state_dict(
                {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)})
            rng = np.random.default_rng()
            rng.bit_generator.state = rng_state
            if self.encoder is not None:
                prefix = "encoder."
                self.encoder.load_state_dict(
                    {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)})
            self.morpher.load_state_dict(morpher_state)  # validates, then restores
        except (TypeError, ValueError, KeyError) as exc:
            raise ValueError(f"checkpoint {path!r} is corrupted or truncated: "
                             f"{exc}") from None
        # Keep the caller's objects live: copy the (validated) state into them.
        self.embedding.load_state_dict(embedding.state_dict())
        self.morpher.zero_grad()
        self.rng = rng
        self.epoch = epoch
        self.history = history
