"""Gradient estimators for the merge decisions.

A morph decides, for every candidate edge, whether its endpoints merge. The
decision is discrete, so the loss is piecewise constant in it; an estimator
says what the forward pass computes and what gradient the decisions pass
back. All four share one small interface:

- ``forward(graph, features, similarity, scores, shard=None, workspace=None)
  -> (EstimateResult, saved)`` with ``scores`` the
  :class:`grapheme.ops.ScoresResult` of the edges (logits, probabilities,
  ``tau``); ``shard=(before, after)``: the batch is a contiguous part of a
  larger one (a data-parallel rank's share of the global batch), ``before``
  candidate edges of which come before it and ``after`` after it (only
  ``Reinforce``, whose draws are the larger batch's, reads it);
  ``workspace``: where the output features may live (ignoring it is
  correct, and a ``forward`` without the keyword is not passed one);
- ``vjp(saved, grad_features, grad_mass, grad_weights, grad_log_prob,
  out=None) -> (grad_input_features, grad_logits, grad_probability)``,
  pure, with ``None`` for a gradient that does not exist; ``out``: an
  (n, d) buffer for the input-feature gradient;
- ``step(saved, loss_values, num_edges=None)``: the only place where an
  estimator's state (the REINFORCE baseline and sample counter) advances;
  ``saved=None, num_edges=E``: by a batch of ``E`` candidate edges that this
  estimator's forward saw only a shard of, or none (data-parallel ranks);
- ``advantage(saved, loss_values)``: the per-example weights of the
  score-function term (``vjp``'s ``grad_log_prob``, divided by the batch),
  None for an estimator without one; one that has them also has
  ``score_per_example(saved, advantage)``, what the ``estimator_variance``
  metric is the spread of;
- ``get_params``, ``state_dict``, ``load_state_dict``: settings and state,
  as checkpoints keep them.

A new estimator goes into :data:`ESTIMATORS` (its alias), which
checkpoints, ``--estimator`` and ``grapheme demo`` read; into
``grapheme.cli.DEFAULT_LR``, which
``tests/test_context_learning.py::test_defaults_descend`` holds to
:data:`ESTIMATORS` and uses to make every estimator learn the ``fold`` and
``dedup`` tasks (an estimator that cannot learn needs an exemption there);
into ``grapheme/__init__.py`` to be ``grapheme.Name``; and into the tables
of estimators (here, README, ``docs/design.md``). A subclass of a built-in
overrides ``_forward``, whose inputs are already checked (the base
``forward`` checks them and calls it: :func:`_checked_forward`). An
estimator shapes training only: validation, ``accuracy``, ``segment`` and
the demo's "merges learned" all use the hard ``s > tau`` morph
(:meth:`grapheme.Morpher.predict`).

======================  ==========================  ==============================  ======
estimator (alias)       forward                     gradient                        graphs
======================  ==========================  ==============================  ======
:class:`Hard`           hard ``s > tau``            exact through the merge         any
("history")                                         history; none for ``theta``
:class:`Relaxed`        expected merge, ``m = p``   exact gradient of the           chains
("soft")                                            relaxation (features, theta)
:class:`StraightThrough` hard, in ``n``-node form   the relaxation's gradient at    chains
("ste")                                             the hard ``m``
:class:`Reinforce`      ``m ~ Bernoulli(p)``        pathwise + ``(L - b) grad log   any
("reinforce")                                       P(m)``, unbiased
======================  ==========================  ==============================  ======
"""
import copy
from typing import NamedTuple, Optional

import numpy as np

from ._validation import (as_float_array, check_allocation, check_graph, check_scalar,
                          settings_checked, settings_unchanged, show)
from ._workspace import check_workspace
from .graph import Graph, merge_edges, replicate
from .history import MergeHistory
from .ops import BernoulliLogProb, ChainRelaxation, HardMerge, check_features

__all__ = [
    "Estimator",
    "Hard",
    "Relaxed",
    "StraightThrough",
    "Reinforce",
    "EstimateResult",
    "make_estimator",
    "ESTIMATORS",
]


def _checked_features(graph, features, workspace):
    """An estimator's ``graph``, ``workspace`` and ``features`` checked as
    its merge checks them: the features as a finite (n_nodes, d) array,
    float32 or float64."""
    check_workspace(workspace)
    check_graph(graph, "graph")
    return check_features(graph, features)


def _checked_forward(estimator):
    """The forward pass :class:`grapheme.Morpher` calls with the graph,
    workspace and features it has checked itself: a built-in estimator's
    ``_forward``, which does not scan the features again (0.47 ms of a
    31,000 x 64 batch, on one thread), where its ``forward`` and
    ``_forward`` are both the built-in class's own (not overridden by a
    subclass, nor ``forward`` by an attribute of the instance); else its
    ``forward``."""
    cls = type(estimator)
    own = {Hard.forward: Hard._forward, Relaxed.forward: Relaxed._forward,
           Reinforce.forward: Reinforce._forward}.get(cls.forward)
    if own is not None and cls._forward is own and "forward" not in getattr(
            estimator, "__dict__", {}):
        return estimator._forward
    return estimator.forward


class EstimateResult(NamedTuple):
    """What an estimator's forward pass produced.

    Attributes
    ----------
    graph : Graph
        The morphed graph, with features (and masses and edge weights).
    history : MergeHistory
        The hard merge map of the decisions (from the replicated input for
        ``Reinforce(samples > 1)``).
    decisions : ndarray of bool
        The decision of every (replicated) input edge.
    log_prob : ndarray of shape (n_examples,) or None
        ``log P(decisions)`` per (replicated) example, for ``Reinforce``.
    samples : int
        Copies of the input batch in the output (``Reinforce(samples)``).
    """

    graph: Graph
    history: MergeHistory
    decisions: np.ndarray
    log_prob: Optional[np.ndarray]
    samples: int


class Estimator:
    """Base class: see the module docstring for the interface."""

    #: The string alias (``Morpher(estimator="history")``).
    name = None
    #: Whether ``forward`` draws its decisions at random, from a stream that
    #: ``step`` advances: then ``forward`` reads ``shard``, ``step`` needs
    #: the forward's ``saved`` (or ``num_edges``), and ``_drawing_from(seed)``
    #: is a copy drawing from another stream (the PyTorch bridge's, seeded
    #: from torch's generator).
    draws = False
    #: Copies of the input batch in the output.
    samples = 1

    def forward(self, graph, features, similarity, scores, shard=None,
                workspace=None):  # pragma: no cover
        """``workspace``: where the output features may live (see
        :meth:`grapheme.Morpher.forward`); ignoring it is correct."""
        raise NotImplementedError

    def vjp(self, saved, grad_features=None, grad_mass=None, grad_weights=None,
            grad_log_prob=None, out=None):  # pragma: no cover
        """``out``: an (n, d) array for the input-feature gradient, checked
        by the caller (:meth:`grapheme.Morpher.vjp`)."""
        raise NotImplementedError

    def advantage(self, saved, loss_values):
        """Per-example weights of the score-function term; None here (only
        :class:`Reinforce` has one)."""
        return None

    def score_per_example(self, saved, advantage):  # pragma: no cover
        """Each example's score-function estimate of the gradient of its
        loss with respect to a shift of its logits, for an estimator whose
        :meth:`advantage` is not None."""
        raise NotImplementedError

    def step(self, saved, loss_values=None, num_edges=None):
        """Advance the estimator's state after a training step (a no-op here)."""

    def get_params(self):
        """Constructor arguments, as ``type(self)(**get_params())`` takes them."""
        return {}

    def state_dict(self):
        """State that training changes (JSON-serialisable)."""
        return {}

    def load_state_dict(self, state):
        """Restore :meth:`state_dict` output."""

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"


class Hard(Estimator):
    """Hard decisions ``s > tau``; gradients through the merge history only.

    ``grad[i] = w_i grad_out[c(i)]``, exact wherever no similarity sits on
    ``tau``. ``theta`` gets nothing from the loss: the loss is piecewise
    constant in it (a rate penalty still moves it). The output is the
    compact ``k``-node graph with masses 1. Any graph.
    """

    name = "history"

    def forward(self, graph, features, similarity, scores, shard=None, workspace=None):
        return self._forward(graph, _checked_features(graph, features, workspace),
                             similarity, scores, shard, workspace)

    def _forward(self, graph, features, similarity, scores, shard=None, workspace=None):
        """:meth:`forward` of a checked graph and features (see
        :func:`_checked_forward`)."""
        decisions = similarity > scores.tau
        r, saved = HardMerge()._forward(graph, features, decisions, workspace)
        return EstimateResult(r.graph, r.history, decisions, None, 1), saved

    def vjp(self, saved, grad_features=None, grad_mass=None, grad_weights=None,
            grad_log_prob=None, out=None):
        return HardMerge().vjp(saved, grad_features, out=out)[0], None, None


class Relaxed(Estimator):
    """The expected merge under independent merges with probability ``p``.

    The output is the ``n``-node relaxed graph of
    :class:`grapheme.ops.ChainRelaxation` at ``m = p``: relaxed cluster
    means, masses ``1 - p_{i-1}``, expected edges. A smooth function of the
    features and ``theta``, with their exact gradient. The ``history`` is
    that of the hard decisions (for metrics). Chains only.
    """

    name = "soft"

    def _merge_weights(self, decisions, scores):
        return scores.probability

    def forward(self, graph, features, similarity, scores, shard=None, workspace=None):
        return self._forward(graph, _checked_features(graph, features, workspace),
                             similarity, scores, shard, workspace)

    def _forward(self, graph, features, similarity, scores, shard=None, workspace=None):
        """:meth:`forward` of a checked graph and features (see
        :func:`_checked_forward`)."""
        decisions = similarity > scores.tau
        r, saved = ChainRelaxation()._forward(graph, features,
                                              self._merge_weights(decisions, scores), workspace)
        return EstimateResult(r.graph, merge_edges(graph, decisions), decisions, None, 1), saved

    def vjp(self, saved, grad_features=None, grad_mass=None, grad_weights=None,
            grad_log_prob=None, out=None):
        grad_h, grad_m = ChainRelaxation().vjp(saved, grad_features, grad_mass, grad_weights,
                                               out=out)
        return grad_h, None, grad_m


class StraightThrough(Relaxed):
    """Forward exactly as :class:`Hard` (in the ``n``-node form: heads carry
    their cluster mean with mass 1, other nodes mass 0); backward is the
    gradient of :class:`Relaxed`'s computation evaluated at the hard ``m``,
    passed to ``p``: the surrogate ``m = hard + p - stop_gradient(p)``.
    Chains only."""

    name = "ste"

    def _merge_weights(self, decisions, scores):
        return decisions.astype(np.float64)


class _MeanBaseline:
    """Running mean of all past per-example losses (0 before the first)."""

    __slots__ = ("total", "count")

    def __init__(self):
        self.total, self.count = 0.0, 0

    def value(self):
        return self.total / self.count if self.count else 0.0


class _ReinforceSaved(NamedTuple):
    merge: tuple            # HardMerge's saved state
    log_prob: tuple         # BernoulliLogProb's: (m - p, example of every edge, B)
    samples: int
    shape: tuple            # of the input features (n, d)
    num_edges: int          # of the input graph
    num_examples: int       # of the replicated batch
    rng_state: dict         # the generator after this forward's draws
    mean_baseline: float    # the running mean as it was at forward


#: The settings of a Reinforce (its constructor's arguments).
_REINFORCE_SETTINGS = ("baseline", "samples", "seed")


class Reinforce(Estimator):
    """``m_e ~ Bernoulli(p_e)``: the score-function (REINFORCE) estimator.

    Forward samples the decisions and merges them hard. The gradient of the
    objective ``sum_b w_b L_b`` is the pathwise gradient through the merge
    history plus ``sum_b w_b (L_b - b_b) grad log P(m_b)``, unbiased for the
    expected objective. :meth:`vjp` takes that score weight per example as
    ``grad_log_prob``; :meth:`advantage` computes ``L_b - b_b``.

    Samples come from one generator stream seeded by ``seed``, but
    :meth:`forward` only reads it: it draws from a copy, so calling it twice
    draws the same decisions. :meth:`step` (once per training step) moves
    the stream past the draws of the forward pass it is given and folds that
    step's losses into the running-mean baseline. Any graph.

    Data-parallel training draws the single process's decisions: the stream
    holds, sample by sample, one uniform per candidate edge of the global
    batch, and ``forward(..., shard=(before, after))`` takes a rank's
    share of each sample's draws and skips the rest; ``step(None,
    losses, num_edges=E)`` then moves every rank past the global batch's
    draws and folds in its losses (see :class:`~grapheme.Trainer`).

    Parameters
    ----------
    baseline : {"mean", "loo", None}, default "mean"
        ``"mean"``: the running mean of all past per-example losses, as it
        was at :meth:`forward` (so never the current sample's);
        ``"loo"``: the mean loss of the other ``samples - 1`` samples of the
        same example; None: no baseline.
    samples : int, default 1
        Samples per example. With ``samples = K > 1`` the input batch is
        replicated ``K`` times sample-major (copy ``k`` of example ``b`` is
        example ``k * B + b``, see :func:`grapheme.replicate`); replicate the
        targets the same way.
    seed : int, default 0

    Notes
    -----
    :meth:`forward` and :meth:`vjp` only read the estimator; :meth:`step`
    changes it (the sample counter and baseline), so one estimator is not
    safe to *train* from several threads (never a crash: Python numbers).

    Examples
    --------
    >>> Reinforce(baseline="loo", samples=4)
    Reinforce(baseline='loo', samples=4, seed=0)
    """

    name = "reinforce"
    draws = True

    def __init__(self, baseline="mean", samples=1, seed=0):
        self.baseline, self.samples, self.seed = baseline, samples, seed
        self._validate()
        self._rng_state = np.random.default_rng(self.seed).bit_generator.state
        self._mean = _MeanBaseline()

    def _validate(self):
        """Check the settings, naming a bad one: at construction and, when
        one was assigned since, where they are used (``seed`` is the first
        stream's: assigning it later checks it and draws on as before)."""
        if settings_unchanged(self, _REINFORCE_SETTINGS):
            return
        # not "in": an array's == is elementwise (numpy's "truth value of an
        # array is ambiguous" named nothing: an attack helper's find)
        if not (self.baseline is None or (isinstance(self.baseline, str)
                                          and self.baseline in ("mean", "loo"))):
            raise ValueError(f"baseline must be 'mean', 'loo' or None, got "
                             f"{show(self.baseline)}")
        self.samples = check_scalar(self.samples, "samples", lower=1, integer=True)
        if self.baseline == "loo" and self.samples < 2:
            raise ValueError(f"baseline='loo' needs samples >= 2, got {self.samples}")
        self.seed = check_scalar(self.seed, "seed", lower=0, integer=True)
        settings_checked(self, _REINFORCE_SETTINGS)

    def get_params(self):
        self._validate()
        return {k: getattr(self, k) for k in _REINFORCE_SETTINGS}

    def forward(self, graph, features, similarity, scores, shard=None, workspace=None):
        return self._forward(graph, _checked_features(graph, features, workspace),
                             similarity, scores, shard, workspace)

    def _forward(self, graph, features, similarity, scores, shard=None, workspace=None):
        """:meth:`forward` of a checked graph and features (see
        :func:`_checked_forward`)."""
        self._validate()
        K = self.samples
        # a training step on the copies: the tiled features, their merge and
        # both their gradients, and what a node costs besides (structure,
        # scalars, the loss's plans and potentials: 5.8 KB a copied node,
        # measured as the peak of a step on fold pairs at d = 8 between
        # K = 2000 and 8000); refused up front, not by the out-of-memory
        # killer (replicate's own check counts the structure only)
        check_allocation(K * (4 * features.nbytes + 6144 * features.shape[0]),
                         f"Reinforce(samples={K}) on {features.shape[0]} nodes of "
                         f"{features.shape[1]} features")
        rep = replicate(graph, K)
        feats = features if K == 1 else np.tile(features, (K, 1))
        logits = np.tile(scores.logits, K)
        prob = np.tile(scores.probability, K)
        rng = np.random.default_rng()
        rng.bit_generator.state = self._rng_state
        if shard is None:
            decisions = rng.random(prob.shape[0]) < prob
        else:
            decisions = self._shard_draws(rng, shard, scores.logits.shape[0]) < prob
        r, merge_saved = HardMerge()._forward(rep, feats, decisions, workspace)
        B = rep.num_graphs
        example = np.repeat(np.arange(B), np.diff(rep.indptr[rep.graph_offsets]))
        lp, lp_saved = BernoulliLogProb().forward(logits, decisions, example, B)
        saved = _ReinforceSaved(merge_saved, lp_saved, K, features.shape,
                                scores.logits.shape[0], B, rng.bit_generator.state,
                                self._mean.value())
        return EstimateResult(r.graph, r.history, decisions, lp.log_prob, K), saved

    def vjp(self, saved, grad_features=None, grad_mass=None, grad_weights=None,
            grad_log_prob=None, out=None):
        merge_saved, lp_saved, K, (n, d), E = saved[:5]   # see _ReinforceSaved
        grad_h = HardMerge().vjp(merge_saved, grad_features, out=out if K == 1 else None)[0]
        grad_z = None
        if grad_log_prob is not None:
            grad_z = BernoulliLogProb().vjp(lp_saved, grad_log_prob)[0]
            if K > 1:
                grad_z = grad_z.reshape(K, E).sum(axis=0)
        if K > 1:
            grad_h = grad_h.reshape(K, n, d).sum(axis=0, out=out)
        return grad_h, grad_z, None

    def advantage(self, saved, loss_values):
        """``L_b - b_b`` for the per-example losses of the (replicated) batch."""
        losses = self._losses(saved, loss_values)
        if self.baseline == "mean":
            return losses - saved.mean_baseline
        if self.baseline == "loo":
            L = losses.reshape(self.samples, -1)
            return (L - (L.sum(axis=0, keepdims=True) - L) / (self.samples - 1)).ravel()
        return losses.copy()

    def score_per_example(self, saved, advantage):
        """``advantage_b * sum_{e in b} (m_e - p_e)``: each example's own
        score-function estimate of the gradient of its loss with respect to
        a shift of all its logits."""
        coef, example, _ = saved.log_prob
        return advantage * np.bincount(example, weights=coef, minlength=advantage.shape[0])

    def _shard_draws(self, rng, shard, num_edges):
        """The uniforms of a shard's ``num_edges`` edges, ``samples`` times:
        of every sample's draws of the whole batch (``before + num_edges +
        after``), the shard's; ``rng`` ends past all of them. The generator
        skips the others' (``PCG64.advance``: one 64-bit step per double)."""
        before, after = _check_shard(shard)
        K, E = self.samples, num_edges
        bits = rng.bit_generator
        draws = np.empty(K * E)
        for k in range(K):
            bits.advance(before)
            rng.random(out=draws[k * E:(k + 1) * E])
            bits.advance(after)
        return draws

    def step(self, saved, loss_values=None, num_edges=None):
        """Move the generator past the draws of ``saved``'s forward pass and
        fold this step's losses into the running mean.

        ``saved=None`` and ``num_edges``: a step of a batch with
        ``num_edges`` candidate edges, of which this estimator's forward saw
        a shard or nothing (a rank of a data-parallel run, see
        :class:`~grapheme.Trainer`): the generator moves past its ``samples
        * num_edges`` draws and ``loss_values`` are that whole batch's
        (every sample's), so every rank ends in the single-process state."""
        self._validate()
        if saved is None:
            if num_edges is None:
                raise TypeError("step() needs saved, or num_edges without it")
            num_edges = check_scalar(num_edges, "num_edges", lower=0, integer=True)
            losses = (None if loss_values is None
                      else as_float_array(loss_values, "loss_values", ndim=1))
            rng = np.random.default_rng()
            rng.bit_generator.state = self._rng_state
            rng.bit_generator.advance(self.samples * num_edges)
            rng_state = rng.bit_generator.state
        else:
            if num_edges is not None:
                raise TypeError("num_edges goes with saved=None (a step without a "
                                "forward of the whole batch)")
            losses = None if loss_values is None else self._losses(saved, loss_values)
            rng_state = saved.rng_state
        if losses is not None:
            self._mean.total += float(np.sum(losses))
            self._mean.count += int(losses.shape[0])
        self._rng_state = rng_state

    @staticmethod
    def _losses(saved, loss_values):
        """``loss_values`` checked: one finite loss per (replicated) example."""
        return as_float_array(loss_values, "loss_values", ndim=1,
                              shape=(saved.num_examples,))

    def state_dict(self):
        return {"rng": self._rng_state, "baseline": [self._mean.total, self._mean.count]}

    def _drawing_from(self, seed):
        """A shallow copy whose decisions are drawn from a stream starting
        at ``seed``; its baseline and settings are this one's (shared, not
        written: ``load_state_dict`` would write the baseline too)."""
        other = copy.copy(self)
        other._rng_state = np.random.default_rng(seed).bit_generator.state
        return other

    def load_state_dict(self, state):
        try:
            total, count = state["baseline"]
            total = check_scalar(total, "baseline total")
            count = check_scalar(count, "baseline count", lower=0, integer=True)
            rng = np.random.default_rng()
            rng.bit_generator.state = state["rng"]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"state is not a Reinforce state: {exc}") from None
        self._rng_state = rng.bit_generator.state
        self._mean.total, self._mean.count = total, count


def _check_shard(shard):
    """``(before, after)``: two non-negative ints (edges around a shard)."""
    try:
        before, after = shard
    except (TypeError, ValueError):
        raise TypeError(f"shard must be a pair (before, after) of edge counts, got "
                        f"{show(shard)}") from None
    return (check_scalar(before, "shard before", lower=0, integer=True),
            check_scalar(after, "shard after", lower=0, integer=True))


#: The estimators by their alias: what ``Morpher(estimator=)``, ``--estimator``
#: and the checkpoints (:func:`grapheme.train.state.registry`) accept.
ESTIMATORS = {cls.name: cls for cls in (Hard, Relaxed, StraightThrough, Reinforce)}


def make_estimator(estimator):
    """An :class:`Estimator` from an instance or its alias.

    Examples
    --------
    >>> make_estimator("ste")
    StraightThrough()
    """
    if isinstance(estimator, Estimator):
        return estimator
    if isinstance(estimator, str) and estimator in ESTIMATORS:
        return ESTIMATORS[estimator]()
    raise ValueError("estimator must be an Estimator or one of "
                     f"{', '.join(map(repr, ESTIMATORS))}; got {show(estimator)}")
