"""The learnable morpher: merges neighbouring nodes whose features agree.

A morph composes operations of :mod:`grapheme.ops`::

    s = EdgeSimilarity(graph, H)                 # cosine of every edge
    z, p = MergeScores(T)(s, theta)              # (s - sigmoid(theta)) / T, sigmoid(z)
    out = estimator.forward(graph, H, s, (z, p)) # Hard, Relaxed, StraightThrough, Reinforce
    penalty = RatePenalty(p)                     # with a RateController

and :meth:`Morpher.vjp` runs their vjps in reverse. Nothing in either
changes the morpher: state advances only in :meth:`Morpher.step`.
"""
import functools
import inspect
from typing import NamedTuple, Optional

import numpy as np

from ._validation import (KEEP, as_float_array, check_graph, check_out, check_scalar,
                          frozen, set_frozen_state, settings_checked, settings_unchanged)
from ._workspace import check_workspace
from .estimators import Hard, _checked_forward, make_estimator
from .ops import (MIN_TEMPERATURE, EdgeSimilarity, MergeScores, RoutedSimilarity,
                  merge_threshold, sigmoid, sigmoid_slope)
from .rate import RateController

__all__ = ["Morpher", "Morphed", "MorphGrad"]


class Morphed:
    """Everything a morph produced; unpacks as ``graph, history``.

    Attributes
    ----------
    graph : Graph
        The morphed graph, with features. :class:`~grapheme.estimators.Hard`
        and :class:`~grapheme.estimators.Reinforce`: the compact ``k``-node
        graph. ``Relaxed`` and ``StraightThrough``: the ``n``-node relaxed
        graph (input nodes and labels, relaxed features and masses, expected
        edges).
    history : MergeHistory
        The hard merge map from the (replicated) input nodes.
    similarity, probability : ndarray of shape (n_edges,)
        Cosine similarity and merge probability of every input edge.
    decisions : ndarray of bool
        The hard decision of every (replicated) input edge.
    log_prob : ndarray of shape (n_examples,) or None
        ``log P(decisions)`` per example (``Reinforce``).
    rate_penalty : float
        The value of the rate penalty (0 without a rate controller).
    expected_rate : float
        The expected kept fraction ``E[k] / n`` the penalty saw.
    samples : int
        Copies of the input batch in the output (``Reinforce(samples)``).
    """

    __slots__ = ("graph", "history", "similarity", "probability", "decisions", "log_prob",
                 "rate_penalty", "expected_rate", "samples", "tau", "_saved", "_estimator")

    def __init__(self, estimate, similarity, probability, tau, rate_penalty, expected_rate,
                 saved, estimator):
        # read-only: the similarities and probabilities are the arrays the
        # vjp reads (written, they changed its gradients: found by a docs
        # reviewer); an estimator's decisions are copied, as it may keep them
        self.graph, self.history = estimate.graph, estimate.history
        self.decisions, self.log_prob, self.samples = (frozen(estimate.decisions),
                                                       frozen(estimate.log_prob),
                                                       estimate.samples)
        self.similarity, self.probability = frozen(similarity, False), frozen(probability, False)
        self.tau = tau
        self.rate_penalty, self.expected_rate = rate_penalty, expected_rate
        self._saved, self._estimator = saved, estimator

    def __setstate__(self, state):   # a pickled or deep-copied one: read-only again
        set_frozen_state(self, state)

    def __iter__(self):
        yield self.graph
        yield self.history

    @property
    def kept_fraction(self):
        """Output nodes per input node of the hard morph, ``k / n`` (1 for an empty graph)."""
        n = self.history.num_inputs
        return 1.0 if n == 0 else self.history.num_outputs / n

    def advantage(self, loss_values):
        """``L_b - b_b`` per example for the score-function term (``Reinforce``),
        else None. Multiply by the upstream weight of each loss (``1 / B`` for
        a batch mean) to get ``grad_log_prob`` for :meth:`Morpher.vjp`."""
        return self._estimator.advantage(self._saved.estimator, loss_values)

    def __repr__(self):
        return (f"Morphed({self.history.num_inputs} -> {self.history.num_outputs} nodes, "
                f"estimator={self._estimator!r})")


class _MorphSaved(NamedTuple):
    """What :meth:`Morpher.vjp` needs of a forward pass (a :class:`Morphed`'s
    ``_saved``): each operation's own saved state, in the order they ran."""

    similarity: object     # EdgeSimilarity's or RoutedSimilarity's
    scorer: object         # the MergeScores operation (it holds the temperature)
    scores: object         # and its saved state (ops.ScoresSaved)
    estimator: object      # the estimator's
    rate: object           # (RatePenalty, its saved state), or None
    features: np.ndarray
    routed: bool


class MorphGrad(NamedTuple):
    """Gradients of :meth:`Morpher.vjp`.

    Attributes
    ----------
    features : ndarray of shape (n_nodes, d)
        With respect to the input features.
    theta : ndarray of shape ()
        With respect to the raw threshold ``theta``.
    queries, keys : ndarray of shape (n_nodes, d_route) or None
        With respect to the routing queries and keys, when the morph was
        given them (:meth:`Morpher.forward`).
    """

    features: np.ndarray
    theta: np.ndarray
    queries: Optional[np.ndarray] = None
    keys: Optional[np.ndarray] = None


class Morpher:
    """Merge neighbouring nodes whose features are similar beyond a threshold.

    For every edge ``e = (u, v)`` the morpher computes the cosine similarity
    ``s_e`` of the endpoint features and the merge probability
    ``p_e = sigmoid((s_e - tau) / T)`` with the learnable threshold
    ``tau = sigmoid(theta)``. An estimator turns them into a morphed graph
    and says which gradient the discrete decisions pass back.

    Parameters
    ----------
    threshold : float, default 0.8
        Initial raw threshold ``theta`` (``tau = sigmoid(theta)``).
    temperature : float, default 0.1
        ``T > 0`` of the merge probabilities.
    estimator : Estimator or {"history", "soft", "ste", "reinforce"}, default "history"
        :class:`~grapheme.estimators.Hard`, ``Relaxed``, ``StraightThrough``
        or ``Reinforce`` (see :mod:`grapheme.estimators`); a string names one
        with its defaults. The default is the exact one, under which
        ``theta`` gets no gradient from the loss; ``grapheme train`` and
        :class:`grapheme.torch.Merge` default to ``"ste"``, which learns it.
    rate : RateController or float, optional
        Holds the kept fraction ``k / n`` at a target; a float is the target
        of a :class:`~grapheme.rate.RateController` with its defaults.

    Attributes
    ----------
    theta : ndarray of shape ()
        The raw threshold (a parameter: optimisers update it in place).
    grad_theta : ndarray of shape ()
        Gradient accumulated by :meth:`backward`.

    Notes
    -----
    :meth:`forward`, :meth:`predict` and :meth:`vjp` only read the morpher,
    so any number of threads may call them at once. (A setting assigned
    since the last morph is checked and stored normalised by the calls that
    see it; an estimator's alias becomes a new Estimator in each, so assign
    an Estimator, not an alias, while other threads morph.) :meth:`backward`,
    :meth:`step`, :meth:`zero_grad` and :meth:`load_state_dict` change it:
    the morpher is not safe to *train* from several threads (updates may be
    lost), though nothing it does can crash the process (its state is Python
    numbers and 0-d arrays that no kernel writes).

    Examples
    --------
    >>> g = Graph.from_text("aab")
    >>> H = np.array([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]])
    >>> graph, history = Morpher(threshold=0.8).forward(g, H)
    >>> graph.to_text(), history.cluster.tolist()
    ('ab', [0, 0, 1])
    >>> soft = Morpher(threshold=0.8, temperature=0.01, estimator="soft").forward(g, H)
    >>> soft.graph.mass.round(3).tolist()
    [1.0, 0.0, 1.0]
    """

    def __init__(self, threshold=0.8, temperature=0.1, estimator="history", rate=None):
        self.threshold, self.temperature, self.estimator, self.rate = (
            threshold, temperature, estimator, rate)
        self._validate()
        self.theta = np.array(self.threshold)
        self.grad_theta = np.zeros(())

    def _validate(self):
        """Check the settings (:func:`morph_settings`), naming a bad one: at
        construction, and again when a morph runs if one was changed on the
        object since (``morpher.temperature = 0.05`` to anneal is checked,
        and an estimator's alias is made an Estimator, as the constructor
        does). ``threshold`` is only the initial ``theta``."""
        if settings_unchanged(self, _MORPH_SETTINGS):
            return
        self.threshold, self.temperature, self.estimator, self.rate = morph_settings(
            self.threshold, self.temperature, self.estimator, self.rate)
        settings_checked(self, _MORPH_SETTINGS)

    @property
    def tau(self):
        """The merge threshold ``sigmoid(theta)`` on cosine similarity."""
        return float(sigmoid(self.theta))

    def get_params(self):
        """Constructor arguments (``threshold`` is the initial ``theta``)."""
        self._validate()
        return {"threshold": self.threshold, "temperature": self.temperature,
                "estimator": self.estimator, "rate": self.rate}

    def zero_grad(self):
        self.grad_theta = np.zeros(())

    # ----------------------------------------------------------------- forward
    def forward(self, graph, features, queries=None, keys=None, shard=None, workspace=None):
        """Morph ``graph`` given node ``features`` (n_nodes, d). O((n + E) d).

        With ``queries`` and ``keys`` (both (n_nodes, d_route)) the merge
        score of edge ``(u, v)`` is ``cos(queries[u], keys[v])`` (learned
        routing, :class:`grapheme.ops.RoutedSimilarity`); without, the cosine
        of the features themselves. The features are what is merged either
        way.

        ``shard=(before, after)``: ``graph`` is a contiguous part of a
        larger batch, ``before`` of whose candidate edges come before
        ``graph``'s and ``after`` after them (a data-parallel rank's share
        of the global batch): ``Reinforce`` draws that batch's decisions and
        keeps ``graph``'s; the other estimators ignore it.

        ``workspace`` (a :class:`grapheme._workspace.Workspace`, optional, as
        the ``Trainer`` passes): the morphed graph's features live in it,
        and so does what :meth:`vjp` reads: both are valid until the
        workspace's next ``forward`` (take the ``vjp`` before it). The same
        numbers as without one, without a fresh (n, d) array's page faults
        per step. ``features`` must not live in the array the morph writes
        (a ValueError says which).

        Pure: the morpher's state (``theta``, the estimator's step count and
        baseline, the rate multiplier) is read, never changed.

        Returns
        -------
        Morphed
            Unpacks as ``(graph, history)``.

        Raises
        ------
        TypeError, ValueError
            If ``graph`` is not a Graph or ``features`` is not a finite
            (n_nodes, d) array; for ``Relaxed`` and ``StraightThrough``, if
            the candidate edges are not chain-shaped.
        """
        check_graph(graph, "graph")
        check_workspace(workspace)
        features, route = self._check_inputs(graph, features, queries, keys)
        return self._forward(graph, features, *(route or (None, None)), shard, workspace)

    def _forward(self, graph, features, queries=None, keys=None, shard=None, workspace=None):
        """:meth:`forward` of a checked graph and finite C-contiguous
        (n_nodes, d) features, queries and keys of one float dtype, not
        scanned again: the ``Trainer``'s, which are rows of its table that
        it checked or the encoder's output, which the encoder scans. Queries
        or keys that are not finite (the encoder's projections overflowing)
        are found by the routing's norms (:class:`RoutedSimilarity` raises
        the ValueError)."""
        self._validate()
        route = None if queries is None else (queries, keys)
        return self._morph(graph, features, self.estimator, self.rate, route, shard,
                           workspace)

    @staticmethod
    def _check_inputs(graph, features, queries, keys):
        # float32 features (and routing) stay float32: the morph follows them
        features = as_float_array(features, "features", ndim=2, shape=(graph.num_nodes, None),
                                  dtype=KEEP)
        if (queries is None) != (keys is None):
            raise ValueError("queries and keys go together: give both or neither")
        if queries is None:
            return features, None
        queries = as_float_array(queries, "queries", ndim=2, shape=(graph.num_nodes, None),
                                 dtype=KEEP)
        keys = as_float_array(keys, "keys", ndim=2, shape=queries.shape, dtype=queries.dtype)
        return features, (queries, keys)

    def predict(self, graph, features, queries=None, keys=None):
        """The deterministic hard morph: merge every edge with ``s > tau``.

        What the model does at inference, whatever the estimator: no
        sampling, no relaxation, no replication, no rate penalty.
        O((n + E) d).
        """
        check_graph(graph, "graph")
        features, route = self._check_inputs(graph, features, queries, keys)
        self._validate()
        return self._morph(graph, features, Hard(), None, route)

    def decide(self, graph, features, queries=None, keys=None):
        """The hard merge decision of every edge, as :meth:`predict` makes
        them (``s > tau``), without merging: all that segmenting a chain
        needs (node ``v`` starts a segment unless its incoming edge merges).
        Pure. O((n + E) d).

        Returns
        -------
        ndarray of bool, shape (n_edges,)
        """
        sim = self.similarity(graph, features, queries, keys)
        # the float MergeScores compares with, of a theta checked as there (a
        # NaN one, assigned, merged nothing where forward refuses it)
        return sim > merge_threshold(self.theta)

    def similarity(self, graph, features, queries=None, keys=None):
        """The similarity ``s`` of every edge, which the merge compares
        with ``tau`` (:meth:`decide`): the cosine of the features, or with
        ``queries`` and ``keys`` of the routing. Pure. O((n + E) d).

        Returns
        -------
        ndarray of float64, shape (n_edges,)
        """
        check_graph(graph, "graph")
        features, route = self._check_inputs(graph, features, queries, keys)
        self._validate()
        if route is None:
            return EdgeSimilarity()._forward(graph, features)[0].similarity
        return RoutedSimilarity()._forward(graph, *route)[0].similarity

    def _morph(self, graph, features, estimator, rate, route=None, shard=None,
               workspace=None):
        if route is None:
            sim, sim_saved = EdgeSimilarity()._forward(graph, features)
        else:
            sim, sim_saved = RoutedSimilarity()._forward(graph, *route)
        scorer = MergeScores(self.temperature)   # kept: the vjp uses this temperature
        scores, scores_saved = scorer.forward(sim.similarity, self.theta)
        # passed only when given, and the workspace only to an estimator that
        # takes one: one written before either existed takes neither
        extra = {} if shard is None else {"shard": shard}
        if workspace is not None and _takes_workspace(type(estimator).forward):
            extra["workspace"] = workspace
        estimate, est_saved = _checked_forward(estimator)(graph, features, sim.similarity,
                                                         scores, **extra)
        value, expected, rate_saved = 0.0, float("nan"), None
        if rate is not None:
            op, multiplier = rate.penalty()
            pen, pen_saved = op.forward(scores.probability, graph.num_nodes, multiplier)
            value, expected, rate_saved = pen.value, pen.expected_rate, (op, pen_saved)
        saved = _MorphSaved(sim_saved, scorer, scores_saved, est_saved, rate_saved, features,
                            route is not None)
        return Morphed(estimate, sim.similarity, scores.probability, scores.tau, value,
                       expected, saved, estimator)

    # --------------------------------------------------------------- backward
    def vjp(self, morphed, grad_features=None, grad_mass=None, grad_weights=None,
            grad_log_prob=None, grad_rate_penalty=None, grad_probability=None,
            grad_similarity=None, out=None, workspace=None):
        """Gradients of the input features and ``theta`` (pure). O((n + E) d).

        Parameters
        ----------
        morphed : Morphed
            The result of :meth:`forward` (or :meth:`predict`).
        grad_features : ndarray of shape (k, d), optional
            Upstream gradient of ``morphed.graph.features``. (The gradient of
            the feature-mean activation maps to it through
            :class:`grapheme.ops.FeatureMean`.)
        grad_mass : ndarray of shape (k,), optional
            Of ``morphed.graph.mass`` (constant for the hard estimators).
        grad_weights : ndarray of shape (k_edges,), optional
            Of ``morphed.graph.weights`` (constant for the hard estimators).
        grad_log_prob : ndarray of shape (n_examples,), optional
            Of ``morphed.log_prob`` (``Reinforce``): the score-function
            weight of every example, ``w_b (L_b - b_b)`` for an objective
            ``sum_b w_b L_b`` (see :meth:`Morphed.advantage`).
        grad_rate_penalty : float, optional
            Of ``morphed.rate_penalty``; pass 1.0 when the penalty is added
            to the objective.
        grad_probability, grad_similarity : ndarray of shape (n_edges,), optional
            Of ``morphed.probability`` and ``morphed.similarity``: a penalty
            of the caller's own on either reaches the features and ``theta``.
        out : ndarray of shape (n_nodes, d), optional
            A C-contiguous buffer of the features' dtype (float64, or
            float32 for float32 features) for the feature gradient, as in
            numpy's ``out=``: a training loop that reuses one saves a fresh
            (n, d) array per step. It must overlap none of the upstream
            gradients, the morph's input features or its output features
            (checked before any work).
        workspace : grapheme._workspace.Workspace, optional
            With learned routing, where the queries' and keys' gradients
            live (as :meth:`grapheme.Encoder.forward` keeps its arrays):
            valid until the workspace's next use of those names.

        The upstream gradients are checked for shape and dtype, not scanned
        for NaN (as the operations' vjps and autograd take theirs): a
        non-finite one gives non-finite gradients.

        Returns
        -------
        MorphGrad
            ``features`` (n_nodes, d) and ``theta`` (0-d); with learned
            routing also ``queries`` and ``keys`` (n_nodes, d_route), what
            :meth:`Encoder.vjp <grapheme.Encoder.vjp>` takes (else None).
        """
        if not isinstance(morphed, Morphed):
            raise TypeError(f"morphed must be a Morphed, got {type(morphed).__name__}")
        g = morphed.graph
        grad_features = _upstream(grad_features, "grad_features", g.features.shape,
                                  g.features.dtype)
        grad_mass = _upstream(grad_mass, "grad_mass", (g.num_nodes,))
        grad_weights = _upstream(grad_weights, "grad_weights", (g.num_edges,))
        grad_log_prob = (None if morphed.log_prob is None else
                         _upstream(grad_log_prob, "grad_log_prob", morphed.log_prob.shape))
        n_edges = morphed.similarity.shape
        grad_probability = _upstream(grad_probability, "grad_probability", n_edges)
        grad_similarity = _upstream(grad_similarity, "grad_similarity", n_edges)
        sim_saved, scorer, scores_saved, est_saved, rate_saved, features, routed = (
            morphed._saved)
        if out is not None:
            arrays = {"grad_features": grad_features, "grad_mass": grad_mass,
                      "grad_weights": grad_weights, "grad_log_prob": grad_log_prob,
                      "grad_probability": grad_probability,
                      "grad_similarity": grad_similarity,
                      "the morph's input features": features,
                      "morphed.graph.features": g.features}
            check_out(out, "out", features.shape,
                      inputs={k: v for k, v in arrays.items() if v is not None},
                      dtype=features.dtype)
        grad_h, grad_z, grad_p = morphed._estimator.vjp(est_saved, grad_features, grad_mass,
                                                        grad_weights, grad_log_prob, out=out)
        if rate_saved is not None and grad_rate_penalty is not None:
            op, pen_saved = rate_saved
            rate_p = op.vjp(pen_saved, check_scalar(grad_rate_penalty, "grad_rate_penalty"))[0]
            grad_p = rate_p if grad_p is None else grad_p + rate_p
        if grad_probability is not None:
            grad_p = grad_probability if grad_p is None else grad_p + grad_probability
        grad_s, grad_theta = grad_similarity, np.zeros(())
        if grad_z is not None or grad_p is not None:
            grad_s, grad_theta = scorer.vjp(scores_saved, grad_z, grad_p)
            if grad_similarity is not None:
                grad_s = grad_s + grad_similarity
        if routed:
            grad_q, grad_k = RoutedSimilarity().vjp(sim_saved, grad_s, workspace)
            return MorphGrad(grad_h, grad_theta, grad_q, grad_k)
        if grad_s is not None:
            EdgeSimilarity.accumulate(sim_saved, grad_s, grad_h)   # grad_h is ours
        return MorphGrad(grad_h, grad_theta)

    def backward(self, morphed, grad_features=None, grad_mass=None, grad_weights=None,
                 grad_log_prob=None, grad_rate_penalty=None):
        """:meth:`vjp`, then ``grad_theta += `` its ``theta`` gradient.

        The one accumulating call, as :meth:`Embedding.backward
        <grapheme.Embedding.backward>` is for the table. Returns the
        gradient of the input features (a fresh array: the upstream
        gradients are only read, so passing arrays of ``morphed`` itself is
        safe). A morph with learned routing (queries and keys from an
        :class:`~grapheme.Encoder`) needs their gradients too: call
        :meth:`vjp`, whose result has them.
        """
        result = self.vjp(morphed, grad_features=grad_features, grad_mass=grad_mass,
                          grad_weights=grad_weights, grad_log_prob=grad_log_prob,
                          grad_rate_penalty=grad_rate_penalty)
        self.grad_theta = self.grad_theta + result.theta
        return result.features

    def theta_estimates(self, morphed, advantage):
        """Each example's own score-function estimate of ``d L_b / d theta``.

        ``-tau (1 - tau) / T * advantage_b * sum_{e in b} (m_e - p_e)``: what
        the spread of the REINFORCE gradient is measured on (``Reinforce``
        only; O(E)).
        """
        slope = float(sigmoid_slope(morphed._saved.scores.theta))   # tau (1 - tau)
        per_example = morphed._estimator.score_per_example(morphed._saved.estimator, advantage)
        return -slope / morphed._saved.scorer.temperature * per_example

    # ------------------------------------------------------------------ state
    def step(self, morphed, loss_values=None, kept_fraction=None, num_edges=None):
        """Advance the training state after an optimisation step.

        The estimator's step (``Reinforce``: the running-mean baseline takes
        ``loss_values``, the sample count moves on) and the rate controller's
        update with the hard kept fraction of ``morphed``. Returns the rate
        multiplier (0 without a controller).

        ``kept_fraction``: the measured kept fraction the rate controller
        takes instead of ``morphed``'s. Data-parallel training passes that
        of the global batch, of which ``morphed`` holds one rank's share;
        ``morphed`` may then be None, for a rank without a share (if the
        estimator is stateless: every one but ``Reinforce``).

        ``num_edges`` (with ``morphed=None``): the step of a global batch
        with that many candidate edges, of which this rank morphed a shard
        (``forward(..., shard=)``) or nothing: ``Reinforce`` moves its
        stream past the global batch's draws and its baseline takes
        ``loss_values``, the global batch's (every sample's, in the
        single-process order); the other estimators ignore it.
        """
        self._validate()
        if morphed is None:
            if num_edges is not None:
                self.estimator.step(None, loss_values, num_edges=num_edges)
            elif kept_fraction is None or self.estimator.draws:
                raise TypeError("morphed must be a Morphed (None only with a "
                                "kept_fraction and a stateless estimator, or with "
                                "num_edges)")
        elif not isinstance(morphed, Morphed):
            raise TypeError(f"morphed must be a Morphed, got {type(morphed).__name__}")
        elif num_edges is not None:
            raise TypeError("num_edges goes with morphed=None")
        elif type(morphed._estimator) is not type(self.estimator):
            raise ValueError(f"morphed was made by {morphed._estimator!r}, this morpher's "
                             f"estimator is {self.estimator!r} (assigned since?): step it "
                             f"with a morph of its own estimator")
        else:
            self.estimator.step(morphed._saved.estimator, loss_values)
        if self.rate is None:
            return 0.0
        if kept_fraction is not None:
            self.rate.update(kept_fraction)
        elif morphed is not None and morphed.history.num_inputs:
            self.rate.update(morphed.kept_fraction)
        return self.rate.multiplier

    def state_dict(self):
        """The state that training changes (JSON-serialisable)."""
        self._validate()
        return {"theta": float(self.theta),
                "estimator": self.estimator.state_dict(),
                "rate": None if self.rate is None else self.rate.state_dict()}

    def load_state_dict(self, state):
        """Restore :meth:`state_dict` output in place (validated first)."""
        self._validate()
        try:
            theta = check_scalar(state["theta"], "theta")
            est, rate = state["estimator"], state["rate"]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"state is not a Morpher state: {exc}") from None
        if (rate is None) != (self.rate is None):
            raise ValueError("state is not a Morpher state: rate controller mismatch")
        self.estimator.load_state_dict(est)
        if rate is not None:
            self.rate.load_state_dict(rate)
        self.theta[...] = theta

    def __repr__(self):
        return (f"Morpher(threshold={self.threshold}, temperature={self.temperature}, "
                f"estimator={self.estimator!r}, rate={self.rate!r})")


#: The settings of a Morpher (its constructor's arguments).
_MORPH_SETTINGS = ("threshold", "temperature", "estimator", "rate")


def morph_settings(threshold, temperature, estimator, rate):
    """A morph's settings, checked: ``(threshold, temperature, Estimator,
    RateController or None)`` (a float ``rate`` is a controller's target)."""
    threshold = check_scalar(threshold, "threshold")
    temperature = check_scalar(temperature, "temperature", lower=MIN_TEMPERATURE)
    if rate is not None and not isinstance(rate, RateController):
        rate = RateController(check_scalar(rate, "rate", lower=0, upper=1))
    return threshold, temperature, make_estimator(estimator), rate


@functools.lru_cache(maxsize=None)
def _takes_workspace(forward):
    """Whether an estimator's ``forward`` takes ``workspace`` (those of
    :mod:`grapheme.estimators` do; one written before it existed may not)."""
    params = inspect.signature(forward).parameters
    return "workspace" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _upstream(value, name, shape, dtype=None) -> Optional[np.ndarray]:
    """An upstream gradient of ``shape`` as float64 (or ``dtype``: the
    features' own), or None. Not scanned for NaN, as the operations' vjps
    take theirs (and autograd): a non-finite one gives non-finite
    gradients, which the ``Trainer`` reports as divergence."""
    if value is None:
        return None
    return as_float_array(value, name, shape=shape, dtype=dtype, finite=False)
