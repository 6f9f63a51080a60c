"""The learnable morpher: merges neighbouring nodes whose embeddings agree."""
import numpy as np

from . import _core, _estimators
from ._estimators import sigmoid as _sigmoid
from ._validation import as_float_array, check_out, check_scalar
from .graph import Graph
from .history import MergeHistory

__all__ = ["Morpher", "Morphed", "merge_edges", "contract"]


def merge_edges(graph, merge):
    """Merge the endpoints of every selected edge; the history of the result.

    Clusters are the connected components of the selected edges (union-find,
    O(n alpha(n) + E)); the head of a cluster is its earliest node and
    clusters are numbered in the order of their heads.

    Parameters
    ----------
    graph : Graph
    merge : array_like of bool, shape (n_edges,)

    Returns
    -------
    MergeHistory

    Examples
    --------
    >>> g = Graph.from_text("abcd")
    >>> merge_edges(g, [False, True, True]).cluster.tolist()
    [0, 1, 1, 1]
    """
    _check_graph(graph, "graph")
    merge = np.asarray(merge)
    if merge.dtype != bool:
        raise TypeError(f"merge must be a boolean array, got dtype {merge.dtype}")
    if merge.shape != (graph.num_edges,):
        raise ValueError(f"merge must have shape ({graph.num_edges},), got {merge.shape}")
    cluster = np.empty(graph.num_nodes, graph.indptr.dtype)
    k = _core.components(graph.indptr, graph.indices,
                         np.ascontiguousarray(merge).view(np.uint8), cluster)
    return MergeHistory._trusted(cluster, k)


def contract(graph, history, features=None):
    """The graph of a merge: one node per output of ``history``.

    Labels are the heads' labels, features the members' (weighted) mean,
    edges ``(c(u), c(v))`` for every input edge with self-loops dropped and
    duplicates folded (their weights summed). Masses are 1. A batch stays a
    batch: output offsets follow the heads. O(n d + E).

    Parameters
    ----------
    graph : Graph
    history : MergeHistory
        A map from ``graph``'s nodes that never joins two graphs of a batch.
    features : ndarray of shape (n_nodes, d), optional
        Defaults to ``graph.features``.

    Returns
    -------
    Graph
    """
    _check_graph(graph, "graph")
    if not isinstance(history, MergeHistory):
        raise TypeError(f"history must be a MergeHistory, got {type(history).__name__}")
    if history.num_inputs != graph.num_nodes:
        raise ValueError(f"history has {history.num_inputs} inputs, "
                         f"graph has {graph.num_nodes} nodes")
    if features is None:
        features = graph.features
    else:
        features = as_float_array(features, "features", ndim=2, shape=(graph.num_nodes, None))
    if graph.offsets is not None:
        offsets = _output_offsets(graph, history)
        block = np.repeat(np.arange(graph.num_graphs), np.diff(graph.offsets))
        if ((history.cluster < offsets[block]) | (history.cluster >= offsets[block + 1])).any():
            raise ValueError("history merges nodes of different graphs of the batch")
    return _contract(graph, history, features)


def _contract(graph, history, features):
    """:func:`contract` for a checked history (e.g. from :func:`merge_edges`,
    which never joins two graphs of a batch) and validated features."""
    indptr, indices, out_weights = _contract_edges(graph, history)
    offsets = None if graph.offsets is None else _output_offsets(graph, history)
    out_features = None if features is None else history.gather(features)
    return Graph._trusted(indptr, indices, graph.labels[history.heads], features=out_features,
                          weights=out_weights, offsets=offsets)


def _output_offsets(graph, history):
    """Offsets of the merged batch: graph b's outputs are those whose heads
    lie in its node range."""
    return np.searchsorted(history.heads, graph.offsets).astype(np.int64)


def _contract_edges(graph, history):
    """Contracted CSR ``(indptr, indices, weights)`` over the outputs. O(n + E)."""
    dtype = graph.indptr.dtype
    cluster = history.cluster.astype(dtype, copy=False)
    hist_indptr = history.indptr.astype(dtype, copy=False)
    members = history.members.astype(dtype, copy=False)
    weights = np.empty(0) if graph.weights is None else graph.weights
    return _core.contract(graph.indptr, graph.indices, weights, cluster, hist_indptr,
                          members)


def _check_graph(graph, name):
    if not isinstance(graph, Graph):
        raise TypeError(f"{name} must be a grapheme.Graph, got {type(graph).__name__}")


class Morphed:
    """Everything a morph produced; unpacks as ``graph, history``.

    Attributes
    ----------
    graph : Graph
        The morphed graph (with features). ``history`` and ``reinforce``:
        the compact ``k``-node graph. ``soft`` and ``ste``: an ``n``-node
        graph with the input's nodes and labels, relaxed features and masses
        (heads carry their cluster, merged-away nodes mass 0 and no edges).
    history : MergeHistory
        The hard merge map from the (replicated) input nodes to the merged
        nodes.
    similarity : ndarray of shape (n_edges,)
        Cosine similarity of every input edge.
    probability : ndarray of shape (n_edges,)
        Merge probability ``sigmoid((s - tau) / T)`` of every input edge.
    decisions : ndarray of bool, shape (n_edges,)
        The merge decision of every input edge (``reinforce``: the sample).
    rate_penalty : float
        ``rate_weight * (E[k] / n - target_rate)^2``; 0 without a target rate.
    samples : int
        Replicas per example (``reinforce`` with ``samples > 1``; else 1).
    estimator_variance : float
        Set by :meth:`Morpher.backward` for ``reinforce``: the sample variance
        over the examples of their single-example estimates of
        ``d loss / d theta`` (NaN with fewer than two examples).
    theta_estimates : ndarray of shape (n_examples,) or None
        Those single-example estimates (``reinforce`` only).
    """

    __slots__ = ("graph", "history", "similarity", "probability", "decisions",
                 "input", "features", "norms", "estimator", "cache", "rate_penalty",
                 "rate_grad", "samples", "estimator_variance", "theta_estimates")

    def __init__(self, graph, history, similarity, probability, decisions, input,
                 features, norms, estimator, cache=None):
        self.graph, self.history = graph, history
        self.similarity, self.probability, self.decisions = similarity, probability, decisions
        self.input, self.features, self.norms = input, features, norms
        self.estimator, self.cache = estimator, cache
        self.rate_penalty, self.rate_grad = 0.0, None
        self.samples = 1
        self.estimator_variance, self.theta_estimates = float("nan"), None

    def __iter__(self):
        yield self.graph
        yield self.history

    @property
    def merge_rate(self):
        """Fraction of input nodes merged away, ``1 - k / n`` (0 for an empty graph)."""
        n = self.history.num_inputs
        return 0.0 if n == 0 else 1.0 - self.history.num_outputs / n

    def __repr__(self):
        return (f"Morphed({self.history.num_inputs} -> {self.history.num_outputs} nodes, "
                f"estimator={self.estimator!r})")


class Morpher:
    """Merge neighbouring nodes whose embeddings are similar beyond a threshold.

    For every edge ``e = (u, v)`` the morpher computes the cosine similarity
    ``s_e`` of the endpoint features and the merge probability
    ``p_e = sigmoid((s_e - tau) / T)`` with the learnable threshold
    ``tau = sigmoid(theta)``. Merged edges are contracted: clusters are the
    connected components of the merged edges, each becomes one node whose
    features are its members' mean and whose label is its earliest member's.

    Parameters
    ----------
    threshold : float, default 0.8
        Initial raw threshold parameter ``theta`` (``tau = sigmoid(theta)``).
    temperature : float, default 0.1
        ``T > 0`` of the merge probabilities.
    estimator : {"history", "soft", "ste", "reinforce"}, default "history"
        How gradients pass the merge decisions (DESIGN.md, "Gradient
        estimators").

        - ``"history"``: hard decisions ``s_e > tau``; gradients reach the
          input features exactly through the recorded merge history and the
          threshold gets none from the loss (the loss is piecewise constant
          in ``theta``; only the rate penalty, if any, moves it).
        - ``"soft"``: merge weights ``m = p`` through the chain relaxation;
          the output is the ``n``-node graph of relaxed cluster means and
          masses. Exact gradient for features and ``theta``. Chains only.
        - ``"ste"``: forward as ``"history"`` (in the ``n``-node form: heads
          carry their cluster mean with mass 1, other nodes mass 0); the
          backward pass differentiates the chain relaxation at the hard
          ``m``. Chains only.
        - ``"reinforce"``: ``m_e ~ Bernoulli(p_e)``; the gradient is the
          pathwise history gradient plus ``(L - b) grad log P(m)``, unbiased
          for the expected loss. Needs the per-example losses in
          :meth:`backward`. Any graph.
    seed : int, default 0
        Seed of the generator the ``reinforce`` decisions are drawn from.
    baseline : {"mean", "loo", None}, default "mean"
        ``reinforce`` baseline: the running mean of all past per-example
        losses (read before it is updated with the current ones), the mean
        loss of the other ``samples - 1`` samples of the same example, or
        none.
    samples : int, default 1
        ``reinforce`` only: samples per example. With ``samples = K > 1``
        :meth:`forward` replicates the input batch ``K`` times sample-major
        (copy ``k`` of example ``b`` is example ``k * B + b`` of the output,
        see :meth:`replicate`); pair it with ``morpher.replicate(target)``.
    target_rate : float in [0, 1], optional
        Target compression ``k / n`` (output nodes per input node). Adds a
        differentiable penalty on the expected compression
        ``rho = E[k] / n``, ``E[k] = n - sum_e p_e`` (exact when the
        candidate edges form a forest, chains included; ``n`` counts all
        nodes of a batch): the augmented Lagrangian
        ``lambda * (rho - target_rate) + rate_weight * (rho - target_rate)^2``.
        Its value is ``Morphed.rate_penalty`` and :meth:`backward` adds its
        gradient, for every estimator.
    rate_weight : float >= 0, default 10.0
        Weight of the quadratic part of the rate penalty.
    rate_control : {"multiplier", "penalty"}, default "multiplier"
        ``"multiplier"``: a rate controller in the spirit of MrT5's
        deletion-rate controller. After every training step
        :meth:`update_rate` moves the multiplier with the error
        ``e = measured - target_rate`` of that step's measured (hard)
        compression: ``lambda += rate_step * e + rate_proportional * (e -
        e_previous)``, a PI controller whose integral part is the method of
        multipliers, so the rate is held at the target however hard the
        loss pulls. ``"penalty"``: the quadratic penalty alone (``lambda``
        stays 0); the rate then settles where the penalty balances the
        loss, off the target.
    rate_step : float >= 0, default 0.5
        Integral gain of the controller (the multiplier step).
    rate_proportional : float >= 0, default 5.0
        Proportional gain of the controller: it damps the slow oscillation
        that the integral alone leaves. Measured on 200 generated pairs,
        60 epochs, targets 0.45/0.55/0.65, seeds 0-19: with 0, ``reinforce``
        ended up to 0.14 off its target; with 5, within 0.05 on every seed.
        The compression the controller holds (mean over the last 5 epochs)
        ends within 0.03 of the target for ``history``, ``soft`` and ``ste``
        and within 0.05 for ``reinforce`` (seeds 0-9). The final hard
        snapshot of ``soft`` and ``ste`` still swings by up to 0.1 from one
        epoch to the next: their gradients gather similarities at the
        threshold, where a small step flips many merges.

    Attributes
    ----------
    theta : ndarray of shape ()
        The raw threshold (a parameter: optimisers update it in place).
    grad_theta : ndarray of shape ()
        Accumulated gradient of ``theta``.
    estimator_variance : float
        Of the last ``reinforce`` backward pass (see
        :attr:`Morphed.estimator_variance`); NaN before.

    Raises
    ------
    ValueError
        On an unknown ``estimator`` or ``baseline``, ``temperature <= 0``,
        ``samples < 1`` (or ``< 2`` with ``baseline="loo"``, or ``> 1``
        without ``reinforce``), ``target_rate`` outside [0, 1] or a negative
        ``rate_weight``.

    Examples
    --------
    >>> import numpy as np
    >>> g = Graph.from_text("aab")
    >>> H = np.array([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]])
    >>> graph, history = Morpher(threshold=0.8).forward(g, H)
    >>> graph.to_text(), history.cluster.tolist()
    ('ab', [0, 0, 1])
    >>> soft = Morpher(threshold=0.8, temperature=0.01, estimator="soft").forward(g, H)
    >>> soft.graph.mass.round(3).tolist()
    [1.0, 0.0, 1.0]
    """

    def __init__(self, threshold=0.8, temperature=0.1, estimator="history", *, seed=0,
                 baseline="mean", samples=1, target_rate=None, rate_weight=10.0,
                 rate_control="multiplier", rate_step=0.5, rate_proportional=5.0):
        self.theta = np.array(check_scalar(threshold, "threshold"))
        self.temperature = check_scalar(temperature, "temperature", lower=0,
                                        lower_inclusive=False)
        self.estimator = _estimators.check_estimator(estimator)
        self.baseline = _estimators.check_baseline(baseline)
        self.samples = check_scalar(samples, "samples", lower=1, integer=True)
        if self.samples > 1 and estimator != "reinforce":
            raise ValueError(f"samples > 1 needs estimator='reinforce', got {estimator!r}")
        if baseline == "loo" and estimator == "reinforce" and self.samples < 2:
            raise ValueError(f"baseline='loo' needs samples >= 2, got {self.samples}")
        self.target_rate = (None if target_rate is None else
                            check_scalar(target_rate, "target_rate", lower=0, upper=1))
        self.rate_weight = check_scalar(rate_weight, "rate_weight", lower=0)
        if rate_control not in ("multiplier", "penalty"):
            raise ValueError("rate_control must be 'multiplier' or 'penalty', "
                             f"got {rate_control!r}")
        self.rate_control = rate_control
        self.rate_step = check_scalar(rate_step, "rate_step", lower=0)
        self.rate_proportional = check_scalar(rate_proportional, "rate_proportional", lower=0)
        self.rate_multiplier = 0.0
        self._rate_error = None   # the controller's error at the previous step
        self.seed = check_scalar(seed, "seed", lower=0, integer=True)
        self._rng = np.random.default_rng(self.seed)
        self._mean_baseline = _estimators.MeanBaseline()
        self.estimator_variance = float("nan")
        self.grad_theta = np.zeros(())

    @property
    def tau(self):
        """The merge threshold ``sigmoid(theta)`` on cosine similarity."""
        return float(_sigmoid(self.theta))

    def zero_grad(self):
        self.grad_theta = np.zeros(())

    def replicate(self, graph):
        """``graph`` repeated ``samples`` times, in the order :meth:`forward` uses.

        Copy ``k`` of example ``b`` (of ``B``) is example ``k * B + b``. The
        identity when ``samples == 1``. Use it on the targets of a loss.
        """
        _check_graph(graph, "graph")
        return _estimators.replicate(graph, self.samples)

    def similarity(self, graph, features):
        """Cosine similarity of every edge; returns ``(similarity, norms)``. O((n + E) d)."""
        _check_graph(graph, "graph")
        features = as_float_array(features, "features", ndim=2, shape=(graph.num_nodes, None))
        return self._similarity(graph, features)

    @staticmethod
    def _similarity(graph, features):
        sim = np.empty(graph.num_edges)
        norms = np.empty(graph.num_nodes)
        _core.edge_cosine(graph.indptr, graph.indices, features, norms, sim)
        return sim, norms

    def forward(self, graph, features):
        """Morph ``graph`` given node ``features`` (n_nodes, d).

        O((n + E) d) for every estimator (times ``samples`` for
        ``reinforce``).

        Returns
        -------
        Morphed
            Unpacks as ``(graph, history)``.

        Raises
        ------
        TypeError, ValueError
            If ``graph`` is not a Graph or ``features`` is not a finite
            (n_nodes, d) array; for ``soft`` and ``ste``, if the candidate
            edges are not chain-shaped.
        """
        _check_graph(graph, "graph")
        features = as_float_array(features, "features", ndim=2, shape=(graph.num_nodes, None))
        est = self.estimator
        if est in ("soft", "ste"):
            src = _estimators.chain_sources(graph.indptr, graph.indices, est)
        sim, norms = self._similarity(graph, features)
        tau = self.tau
        prob = _sigmoid((sim - tau) / self.temperature)
        rate = rate_grad = None
        if self.target_rate is not None:
            rate, rate_grad = _estimators.rate_penalty(prob, graph.num_nodes,
                                                       self.target_rate, self.rate_weight,
                                                       self.rate_multiplier)
        samples = 1
        if est == "reinforce":
            samples = self.samples
            graph = _estimators.replicate(graph, samples)
            features, sim, norms, prob = (np.tile(features, (samples, 1)), np.tile(sim, samples),
                                          np.tile(norms, samples), np.tile(prob, samples))
            decisions = self._rng.random(prob.shape[0]) < prob
        else:
            decisions = sim > tau
        if est in ("soft", "ste"):
            history = merge_edges(graph, decisions)
            m = np.zeros(graph.num_nodes)
            m[src] = prob if est == "soft" else decisions
            out_features, D, mass = _estimators.relax_chain(features, m)
            out = _estimators.head_graph(graph, history, _contract_edges(graph, history),
                                         out_features, mass)
            morphed = Morphed(out, history, sim, prob, decisions, graph, features, norms,
                              est, (src, m, D))
        else:
            morphed = self._hard(graph, features, sim, norms, prob, decisions, est)
        morphed.samples = samples
        if rate is not None:
            morphed.rate_penalty, morphed.rate_grad = rate, rate_grad
        return morphed

    @staticmethod
    def _hard(graph, features, sim, norms, prob, decisions, estimator):
        history = merge_edges(graph, decisions)
        out = _contract(graph, history, features)
        return Morphed(out, history, sim, prob, decisions, graph, features, norms, estimator)

    def predict(self, graph, features):
        """The deterministic hard morph: merge every edge with ``s > tau``.

        What the model does at inference, whatever the estimator: no
        sampling (the generator of ``reinforce`` is not advanced), no
        relaxation, no replication. The result is the compact graph and can
        be passed to :meth:`backward` as a ``history`` morph. O((n + E) d).
        """
        _check_graph(graph, "graph")
        features = as_float_array(features, "features", ndim=2, shape=(graph.num_nodes, None))
        sim, norms = self._similarity(graph, features)
        prob = _sigmoid((sim - self.tau) / self.temperature)
        return self._hard(graph, features, sim, norms, prob, sim > self.tau, "history")

    def update_rate(self, morphed):
        """One step of the rate controller (``rate_control="multiplier"``).

        Call once per training step, after :meth:`backward`: with the error
        ``e = k / n - target_rate`` of the hard compression ``k / n`` that
        ``morphed`` measured, ``lambda += rate_step * e + rate_proportional
        * (e - e_previous)`` (no proportional part at the first step). A
        no-op without a target rate or with ``rate_control="penalty"``.
        Returns the multiplier.
        """
        if not isinstance(morphed, Morphed):
            raise TypeError(f"morphed must be a Morphed, got {type(morphed).__name__}")
        n = morphed.history.num_inputs
        if self.target_rate is not None and self.rate_control == "multiplier" and n:
            error = morphed.history.num_outputs / n - self.target_rate
            previous = error if self._rate_error is None else self._rate_error
            self.rate_multiplier += (self.rate_step * error
                                     + self.rate_proportional * (error - previous))
            self._rate_error = error
        return self.rate_multiplier

    def state_dict(self):
        """The state that training changes: ``theta``, the sampling generator
        of ``reinforce``, the running-mean baseline, the rate multiplier and
        the controller's last error (JSON-serialisable)."""
        return {"theta": float(self.theta),
                "rng": self._rng.bit_generator.state,
                "baseline": [self._mean_baseline.total, self._mean_baseline.count],
                "rate_multiplier": float(self.rate_multiplier),
                "rate_error": self._rate_error}

    def load_state_dict(self, state):
        """Restore :meth:`state_dict` output in place.

        Raises
        ------
        ValueError
            If an entry is missing or malformed.
        """
        try:
            theta = check_scalar(state["theta"], "theta")
            total, count = state["baseline"]
            total = check_scalar(total, "baseline total")
            count = check_scalar(count, "baseline count", lower=0, integer=True)
            multiplier = check_scalar(state["rate_multiplier"], "rate_multiplier")
            error = state.get("rate_error")   # absent from states before the PI controller
            if error is not None:
                error = check_scalar(error, "rate_error")
            rng = np.random.default_rng()
            rng.bit_generator.state = state["rng"]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"state is not a Morpher state: {exc}") from None
        self.theta[...] = theta
        self._rng = rng
        self._mean_baseline.total, self._mean_baseline.count = total, count
        self.rate_multiplier = multiplier
        self._rate_error = error

    def backward(self, morphed, grad_features=None, grad_activation=None, grad_mass=None,
                 loss_values=None, out=None):
        """Gradient with respect to the input features; adds ``d / d theta`` to ``grad_theta``.

        ``history``: ``dH[i] = w_i * dH'[c(i)]`` where ``dH'`` is the
        gradient of the output features (the activation gradient reaches
        them as ``grad_activation[:, None] / d``); ``grad_mass`` is ignored
        (merged nodes have mass 1) and ``theta`` gets no gradient from the
        loss. ``soft``/``ste``: the adjoint of the chain relaxation (at
        ``m = p``, resp. at the hard ``m``), through ``p`` to the
        similarities, hence the features, and to ``theta``. ``reinforce``:
        the history gradient plus the score-function term for the objective
        ``mean(loss_values)``. The rate penalty's gradient is added in every
        case. O((n + E) d).

        Parameters
        ----------
        morphed : Morphed
            The result of :meth:`forward`.
        grad_features : ndarray of shape (k, d), optional
        grad_activation : ndarray of shape (k,), optional
        grad_mass : ndarray of shape (k,), optional
        loss_values : ndarray of shape (n_graphs,), optional
            Per-example losses of the output batch (required by
            ``reinforce``; their mean is the objective the other gradients
            belong to).
        out : ndarray of shape (n, d), optional
            A float64, C-contiguous buffer for the result, as in numpy's
            ``out=`` (see :meth:`MergeHistory.scatter`): a training loop that
            reuses one saves a fresh (n, d) allocation per step. It must not
            overlap the morph's input features.

        Returns
        -------
        ndarray of shape (n, d)
            ``out`` if given.
        """
        if not isinstance(morphed, Morphed):
            raise TypeError(f"morphed must be a Morphed, got {type(morphed).__name__}")
        if out is not None:
            n_in = morphed.input.num_nodes // morphed.samples
            inputs = {"morphed.features": morphed.features, "grad_features": grad_features,
                      "grad_activation": grad_activation, "grad_mass": grad_mass}
            check_out(out, "out", (n_in, morphed.features.shape[1]),
                      inputs={k: v for k, v in inputs.items() if isinstance(v, np.ndarray)})
        est = morphed.estimator
        # soft/ste: grad_H is computed in place in grad_out, so build it in out
        grad_out = _output_gradient(morphed, grad_features, grad_activation, grad_mass,
                                    out if est in ("soft", "ste") else None)
        prob, T = morphed.probability, self.temperature
        dp_ds = prob * (1.0 - prob) / T
        grad_s = None
        if est in ("soft", "ste"):
            src, m, D = morphed.cache
            k = morphed.graph.num_nodes
            gmass = (np.zeros(k) if grad_mass is None else
                     as_float_array(grad_mass, "grad_mass", ndim=1, shape=(k,)))
            # grad_out is ours (fresh from _output_gradient): reuse it for grad_H
            grad_H, grad_m = _estimators.relax_chain_backward(m, morphed.graph.features, D,
                                                               grad_out, gmass, overwrite=True)
            grad_s = grad_m[src] * dp_ds
        else:
            grad_H = morphed.history.scatter(grad_out, out=out if morphed.samples == 1 else None)
        if est == "reinforce":
            grad_s = self._score(morphed, loss_values)
        if morphed.rate_grad is not None:
            rate_s = morphed.rate_grad * dp_ds[:morphed.rate_grad.shape[0]]
            if grad_s is None:
                grad_s = np.zeros_like(prob)
            grad_s[:rate_s.shape[0]] += rate_s
        if grad_s is not None:
            _core.edge_cosine_backward(morphed.input.indptr, morphed.input.indices,
                                       morphed.features, morphed.norms, morphed.similarity,
                                       grad_s, grad_H)
            tau = self.tau
            self.grad_theta -= tau * (1.0 - tau) * grad_s.sum()
        if morphed.samples > 1:
            grad_H = grad_H.reshape(morphed.samples, -1, grad_H.shape[1]).sum(axis=0, out=out)
        return grad_H

    def _score(self, morphed, loss_values):
        """REINFORCE score term as a gradient of the similarities (E,)."""
        B = morphed.graph.num_graphs
        if loss_values is None:
            raise ValueError("estimator='reinforce' needs loss_values, the per-example losses")
        losses = as_float_array(loss_values, "loss_values", ndim=1, shape=(B,))
        if self.baseline == "mean":
            baseline = self._mean_baseline.value()
        elif self.baseline == "loo":
            baseline = _estimators.loo_baseline(losses, morphed.samples)
        else:
            baseline = 0.0
        grad_s, per_example = _estimators.score_gradient(
            morphed.input, morphed.decisions, morphed.probability, self.temperature,
            losses, baseline)
        if self.baseline == "mean":
            self._mean_baseline.update(losses)  # after use: never sees its own sample
        tau = self.tau
        morphed.theta_estimates = -tau * (1.0 - tau) * per_example
        variance = float(np.var(morphed.theta_estimates, ddof=1)) if B > 1 else float("nan")
        morphed.estimator_variance = self.estimator_variance = variance
        return grad_s


def _output_gradient(morphed, grad_features, grad_activation, grad_mass, out=None):
    """Total gradient of the output features (k, d) from features and
    activations; in ``out`` (checked by the caller) if given."""
    k = morphed.graph.num_nodes
    d = morphed.features.shape[1]
    grad = np.empty((k, d)) if out is None else out
    grad.fill(0.0)
    if grad_features is not None:
        grad += as_float_array(grad_features, "grad_features", ndim=2, shape=(k, d))
    if grad_activation is not None:
        ga = as_float_array(grad_activation, "grad_activation", ndim=1, shape=(k,))
        if d:
            grad += ga[:, None] / d
    if grad_mass is not None:
        as_float_array(grad_mass, "grad_mass", ndim=1, shape=(k,))
    return grad
