"""Structural loss between a predicted (morphed) graph and a target graph.

The loss compares two graphs whose node sets differ in size and order through a
soft node assignment (entropic optimal transport with a dustbin row and column),
and scores the structure carried across by that assignment. It is
differentiable, exactly, with respect to the node activations, the predicted
node masses and the edge weights of both graphs (so a relaxed graph whose
edges carry expected weights in [0, 1] gets its gradient); the backward pass
reverses the Sinkhorn iterations that the forward pass actually performed.
"""
from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional

import numpy as np

from . import _transport
from ._validation import (check_allocation, check_scalar, check_upstream, frozen,
                          settings_checked, settings_unchanged, show)
from .graph import Graph

__all__ = ["StructuralLoss", "LossResult", "LossGrad"]

#: Convergence threshold reported in ``LossResult.converged`` when ``tol=None``
#: (the iterations are then never cut short).
_REPORT_TOL = 1e-8

#: Largest |log| of any quantity the scaling form may produce (u, v, 1/u,
#: 1/v, K, u K v); e^250 ~ 1e108 leaves ~1e200 of headroom on either side of
#: float64's normal range for the products with masses and adjoints, and
#: stays below the log domain's saturation at e^300 (so both domains compute
#: the same function). See :func:`_scaling_safe`.
_SCALING_LOG_LIMIT = 250.0

#: Largest total mass (and total edge weight) of one graph: the loss and
#: its gradients take products of two masses (the clique term's squares, the dustbins' row
#: sums), which overflow to inf, then NaN, from a pair's total of about
#: 1e154; a pair here (a self pair of the debiased loss too) stays <= 1e150.
_MAX_GRAPH_MASS = 5e149

_DOMAINS = ("auto", "log", "scaling")

#: The smallest epsilon (see StructuralLoss).
EPSILON_MIN = 1e-6

#: The settings of :meth:`StructuralLoss.for_training`.
TRAINING = {"weights": (1.0, 0.2, 0.0), "beta": 0.0, "gamma": 0.0}

#: The settings of a StructuralLoss (its constructor's arguments).
_SETTING_NAMES = ("alpha", "beta", "gamma", "epsilon", "iterations", "tol", "weights",
                  "domain", "balance", "debias", "num_threads")

#: Largest ``num_threads`` accepted (a bound on the threads a call starts).
_MAX_THREADS = 4096

#: Initial capacity, in sweeps per pair, of the potentials' storage when
#: ``tol`` is set (it doubles as needed): the balanced default converges
#: random text pairs in 8 sweeps on average, at most 23 (see docs/design.md).
_FIRST_SWEEPS = 16


class LossGrad(NamedTuple):
    """Gradient of ``LossResult.value`` (the batch mean), or of the weighted
    sum ``sum_b grad[b] * values[b]`` (see :meth:`StructuralLoss.backward`).

    Attributes
    ----------
    activation : ndarray of shape (N,)
        With respect to the predicted node activations.
    mass : ndarray of shape (N,)
        With respect to the predicted node masses (zero masses included).
    target_activation : ndarray of shape (M,)
        With respect to the target node activations.
    weights : ndarray of shape (E_p,)
        With respect to the predicted graph's edge weights, in its CSR edge
        order (for ``weights=None``, with respect to the implicit unit
        weights): through the edge term and, via the weighted degrees,
        through the node cost and the clique term.
    target_weights : ndarray of shape (E_t,)
        The same for the target graph's edge weights.
    target_mass : ndarray of shape (M,)
        With respect to the target node masses (zero masses included):
        through the column marginals, the dustbin row marginal ``B = sum b``,
        the balancing step, the row-normalised plan of the edge term and
        the clique term. Needed when a target is itself a prediction (the
        ``(p, p)`` pair of ``StructuralLoss(debias=True)``) or learned.
    features : ndarray of shape (N, d) or None
        With respect to the predicted features, when the predicted graph's
        activations are its feature means (it has features and no explicit
        activation): ``activation`` mapped through
        :class:`grapheme.ops.FeatureMean`. None otherwise.
    target_features : ndarray of shape (M, d) or None
        The same for the target graph.
    """

    activation: np.ndarray
    mass: np.ndarray
    target_activation: np.ndarray
    weights: np.ndarray
    target_weights: np.ndarray
    target_mass: np.ndarray
    features: Optional[np.ndarray] = None
    target_features: Optional[np.ndarray] = None


class _GraphArrays(NamedTuple):
    """The arrays of one (possibly batched) graph that the loss kernels read
    (``_transport._graph``); all C-contiguous."""

    indptr: np.ndarray      # (N+1,) int64
    indices: np.ndarray     # (E,) int64, global node indices
    labels: np.ndarray      # (N,) int32
    weights: np.ndarray     # (E,) float64
    mass: np.ndarray        # (N,) float64
    activation: np.ndarray  # (N,) float64
    offsets: np.ndarray     # (B+1,) int64
    degree: np.ndarray      # (N,) float64 weighted out-degrees


class _Settings(NamedTuple):
    """The settings of a :class:`StructuralLoss` as the kernels read them
    (``_transport._settings``)."""

    w_type: float
    w_act: float
    w_deg: float
    epsilon: float
    iterations: int
    tol: float              # <= 0: run every iteration
    balance: bool           # the dustbin-balancing step before sweeps t >= 1
    conv_tol: float         # "converged" threshold when tol <= 0
    alpha: float
    beta: float
    gamma: float


_RESULT_ARRAYS = ("values", "nodes", "edges", "cliques", "iterations", "converged",
                  "marginal_error", "domain")


@dataclass(frozen=True, eq=False)
class LossResult:
    """Outcome of :meth:`StructuralLoss.forward` for a batch of B pairs.

    Attributes
    ----------
    value, node, edge, clique : float
        Means over the pairs of the total loss and of its three terms.
    values, nodes, edges, cliques : ndarray of shape (B,)
        The same per pair.
    iterations : ndarray of shape (B,), int64
        Sinkhorn iterations performed per pair (0 for a pair without mass).
    converged : ndarray of shape (B,), bool
        Whether the final row-marginal error is ``<= tol`` (``<= 1e-8`` when
        ``tol`` is None). The error weighs rows by their mass, so after a
        single sweep (``iterations=1``) a pair with a massless row, whose
        potential that sweep never set, is reported not converged.
    marginal_error : ndarray of shape (B,)
        ``max_i |sum_j P_ij - a_i|`` over the augmented rows of the final plan.
    domain : ndarray of shape (B,), str
        ``"scaling"`` or ``"log"``: the form the Sinkhorn sweeps of each pair
        ran in (see ``StructuralLoss(domain=...)``).
    """

    value: float
    node: float
    edge: float
    clique: float
    values: np.ndarray
    nodes: np.ndarray
    edges: np.ndarray
    cliques: np.ndarray
    iterations: np.ndarray
    converged: np.ndarray
    marginal_error: np.ndarray
    domain: np.ndarray
    _cache: Any = field(repr=False)
    _feature_shapes: Any = field(default=(None, None), repr=False)

    def __post_init__(self):
        # read-only, as every result the library hands out: views whose
        # base cannot be made writeable again (copies: (B,) each, and
        # dataclasses.replace may hand in the caller's own)
        for name in _RESULT_ARRAYS:
            object.__setattr__(self, name, frozen(getattr(self, name)))

    def __setstate__(self, state):   # a pickled one: read-only again
        self.__dict__.update(state)
        self.__post_init__()

    @property
    def num_pairs(self) -> int:
        """Number of pairs B."""
        return len(self.values)

    def plan(self, b: int = 0) -> np.ndarray:
        """Augmented transport plan of pair ``b``, shape (n_b + 1, m_b + 1).

        Row ``n_b`` is the insertion dustbin, column ``m_b`` the deletion
        dustbin. Returns a read-only view.
        """
        c = self._cache
        if not isinstance(b, numbers.Integral) or not 0 <= b < self.num_pairs:
            raise IndexError(f"pair index b={b!r} out of range for {self.num_pairs} pairs")
        n = int(c.p.offsets[b + 1] - c.p.offsets[b])
        m = int(c.t.offsets[b + 1] - c.t.offsets[b])
        view = c.plan[c.plan_off[b]:c.plan_off[b + 1]].reshape(n + 1, m + 1)
        view.flags.writeable = False
        return view

    @property
    def plans(self) -> list:
        """All augmented plans, ``[self.plan(b) for b in range(B)]``."""
        return [self.plan(b) for b in range(self.num_pairs)]


class _Cache(NamedTuple):
    """What the backward pass needs; also the transport state the kernels
    read and write (``scaled``, ``self_pair`` and ``plan_off`` in; the
    potentials' offsets ``f_off`` and ``g_off`` in as capacity hints, their
    last entries, and out; the rest out of the forward pass)."""

    settings: _Settings    # the loss's settings at the forward pass
    p: _GraphArrays
    t: _GraphArrays
    plan: np.ndarray
    plan_off: np.ndarray
    fpot: np.ndarray
    gpot: np.ndarray
    f_off: np.ndarray
    g_off: np.ndarray
    used: np.ndarray
    scaled: np.ndarray   # (B,) uint8; fpot/gpot hold u, v where set
    self_pair: np.ndarray  # (B,) uint8; 1: a graph against itself (kink rule)
    # debiased: the sizes (N, M, E_p, E_t) of the caller's two graphs, whose
    # 3B pairs (p, t), (p, p), (t, t) p and t hold (see _debiased_batch);
    # None for the plain loss
    fold: Any = None


def _scaling_safe(epsilon, weights, total_mass):
    r"""Whether the scaling form is exact for pairs of the given total mass.

    Parameters
    ----------
    epsilon : float
        Entropic regularisation (> 0).
    weights : tuple of 3 floats
        ``(w_type, w_act, w_deg)`` of the node cost.
    total_mass : ndarray of shape (B,)
        ``T = A + B = sum(a) + sum(b)`` per pair.

    Returns
    -------
    ndarray of shape (B,), bool
        ``3 kappa + |log T| <= 250`` with :math:`\kappa = C_{max}/\varepsilon`;
        for a pair without mass (no sweep is run) only ``3 kappa <= 250``,
        so that it reports the domain its epsilon calls for.

    Notes
    -----
    A sufficient condition, derived for every sweep, not just the limit.
    Every augmented cost lies in :math:`[0, C_{max}]` with
    :math:`C_{max} = \max(1, w_{type}/2 + w_{act} + w_{deg})` (dustbins cost
    1, the dustbin corner 0), so :math:`K = e^{-C/\varepsilon} \in
    [e^{-\kappa}, 1]`. Both half-steps F (g to f) and G (f to g) are
    monotone and commute with adding a constant, hence are non-expansive in
    the sup norm, and G o F has a fixed point :math:`g^*` (the dual optimum:
    the augmented problem is balanced and K > 0). Any output of G has
    oscillation :math:`\le C_{max}`, so with the start :math:`g^0 = 0` and
    the best constant c, :math:`\|g^t - g^* - c\|_\infty \le
    \mathrm{osc}(g^*)/2` gives :math:`|g^t| \le C_{max}` for every t.
    Since the weights of each half-step sum to T, :math:`f = F(g) \in
    [-C_{max}, 2C_{max}] - \varepsilon \log T`. Hence :math:`v = e^{g/\varepsilon}`
    and :math:`1/v` lie in :math:`[e^{-\kappa}, e^{\kappa}]`,
    :math:`u = e^{f/\varepsilon}` in :math:`[e^{-\kappa}, e^{2\kappa}]/T`,
    :math:`1/u` in :math:`T [e^{-2\kappa}, e^{\kappa}]`, and
    :math:`u_i K_{ij} v_j` in :math:`[e^{-3\kappa}, e^{3\kappa}]/T`: all
    within :math:`e^{\pm(3\kappa + |\log T|)}`. Zero masses do not enter
    (rows and columns of zero mass get the same bounds), tiny positive ones
    only through T. With the defaults (:math:`C_{max} = 1`) and
    :math:`T \approx 1`, this admits :math:`\varepsilon \ge 1/83 \approx
    0.012`; :math:`\varepsilon = 0.1` leaves :math:`|\log T| \le 220`.
    """
    c_max = max(1.0, 0.5 * weights[0] + weights[1] + weights[2])
    kappa = c_max / epsilon
    total = np.asarray(total_mass, dtype=np.float64)
    with np.errstate(divide="ignore"):
        log_total = np.where(total > 0.0, np.abs(np.log(total)), 0.0)
    return 3.0 * kappa + log_total <= _SCALING_LOG_LIMIT


class StructuralLoss:
    r"""Structural loss ``alpha*node + beta*edge + gamma*clique`` of graph pairs.

    For one pair, predicted graph with n nodes (activations :math:`x`, masses
    :math:`a \ge 0`, labels, out-degrees :math:`d^p`, weighted edges) and
    target graph with m nodes (:math:`y`, :math:`b`, labels, :math:`d^t`,
    edges). Degrees are *weighted* out-degrees, :math:`d_i = \sum_{(i,v)}
    w_{iv}`, the sum of the weights of i's out-edges (``weights=None``: 1
    each, so an unweighted graph's degrees are its edge counts; a folded
    duplicate edge of weight 2 counts 2). The loss is therefore a function
    of the edge weights, and differentiable in them away from the kinks
    below; a relaxed graph whose edges carry expected weights in [0, 1]
    gets exact gradients (``LossGrad.weights``).

    * Node cost :math:`C_{ij} = w_1\,[\ell_i \ne \ell'_j]/2 + w_2 \min(|x_i - y_j|, 1)
      + w_3 |d^p_i - d^t_j| / \max(d^p_i, d^t_j, 1)`.
    * Augmented problem: row n (marginal :math:`B = \sum_j b_j`) and column m
      (marginal :math:`A = \sum_i a_i`) are dustbins; moving mass to or from a
      dustbin costs 1, dustbin to dustbin 0.
    * Entropic OT in the KL(P | a x b) form, masses entering multiplicatively:
      starting from g = 0, ``iterations`` times
      :math:`f_i = -\varepsilon\,\mathrm{LSE}_j(b_j e^{(g_j - C_{ij})/\varepsilon})`,
      :math:`g_j = -\varepsilon\,\mathrm{LSE}_i(a_i e^{(f_i - C_{ij})/\varepsilon})`
      (the shift of each LSE is the maximum over positive weights), then
      :math:`P_{ij} = a_i b_j e^{(f_i + g_j - C_{ij})/\varepsilon}`. With ``tol``
      set, the iterations stop as soon as
      :math:`\max_i |\sum_j P_{ij} - a_i| \le` ``tol`` (augmented rows).
    * Balancing (``balance``, on by default with ``tol``): before every
      sweep but the first, the dual is maximised exactly along the one
      direction plain sweeps are slow on, :math:`f_i \mathrel{+}= c`
      (i < n), :math:`g_j \mathrel{-}= c` (j < m): with s the mass of the
      deletion column and r that of the insertion row,
      :math:`x = e^{c/\varepsilon}` is the positive root of
      :math:`s x^2 - (A - B) x - r = 0`. The fixed point is unchanged (it is
      a dual ascent step); see Notes.
    * ``node`` :math:`= \sum P_{ij} C_{ij}` over the augmented cells.
    * ``edge`` :math:`= 1 - 2X/(W_p + W_t)` with the preserved weight
      :math:`X = \sum_{(u,v)} \sum_{(j,l)} w_{uv} w'_{jl} Q_{uj} Q_{vl}` under
      the row-normalised plan :math:`Q_{ij} = b_j e^{(f_i+g_j-C_{ij})/\varepsilon}`
      (finite at :math:`a_i = 0`) and the total edge weights :math:`W`;
      0 when both graphs have no edge weight (the edge term therefore
      jumps where a total leaves 0, and its gradient there is taken as 0).
    * ``clique`` :math:`= (\mu_p - \mu_t)^2 + (\sigma^2_p - \sigma^2_t)^2`, the
      mass-weighted mean and variance of the normalised out-degree
      :math:`d_i / \max(\max_k d_k, 1)` (0 for a graph without mass; the
      clique term therefore jumps where a graph's total mass reaches 0, and its
      gradient there is taken as 0).

    A pair without any mass (``A + B == 0``) has node = 0 and a zero plan.
    For a batch the result is the mean over the pairs.

    Parameters
    ----------
    alpha, beta, gamma : float, default 1.0, 0.5, 2.0
        Weights of the node, edge and clique terms (finite, >= 0).
    epsilon : float, default 0.1
        Entropic regularisation (>= 1e-6: the gradients through the sweeps
        carry rounding of about :math:`10^{-17}/\varepsilon^2` for costs of
        order one, 5e-5 of the largest at 1e-6 as measured, 3.5e-3 at 1e-7
        and 0.36 at 1e-8). The log-domain updates are stable down to at
        least 1e-3. Below 0.1 with balancing on, the mass gradient is
        ill-conditioned where the two graphs' total masses are equal: pass
        ``balance=False`` there ("Where balancing is ill-conditioned" in
        docs/design.md).
    iterations : int, default 1000
        Number of Sinkhorn iterations (>= 1); the maximum when ``tol`` is set.
        A cap costs nothing until it is reached: time and memory follow the
        sweeps performed.
    tol : float or None, default 1e-6
        Stop once the row-marginal error is <= tol (> 0). None runs exactly
        ``iterations``. The original protocol is ``iterations=20, tol=None``
        (plain sweeps, the numbers of grapheme before the converged default).
        The error is absolute, in units of mass: the masses grapheme's
        morphs give are 1 per cluster, but with masses far below 1 (a
        distribution over many nodes) lower ``tol`` in proportion, or a
        pair whose every row mass is below it stops after two sweeps (the
        fewest with ``tol``), reported converged (masses of 1e-6 at the
        default: a value 0.5% off).
    balance : bool or None, default None
        Take the dustbin-balancing step before every sweep but the first.
        None: when ``tol`` is set. Random text pairs converge to 1e-6 in 8
        sweeps on average (23 at most over 1000 pairs) with it, against 58
        on average and 2.7% not within 1000 without.
    weights : tuple of 3 floats, default (0.1, 0.7, 0.2)
        Weights of the type, activation and degree parts of the node cost.
        Training uses :meth:`for_training` instead ("Weights for training"
        below: with these defaults a model does not learn boundaries).
    domain : {"auto", "log", "scaling"}, default "auto"
        How the Sinkhorn sweeps are computed; the iterations, and so the
        values and gradients, are the same up to rounding (~1e-13 relative).
        ``"scaling"``: multiplicative form with :math:`K = e^{-C/\varepsilon}`
        computed once per pair (one exp per cell instead of two per cell per
        sweep, forward and backward; several times faster). ``"log"``:
        log-domain updates, finite for any allowed epsilon. ``"auto"``: per pair,
        scaling when the sufficient condition
        :math:`3 C_{max}/\varepsilon + |\log(A + B)| \le 250` holds
        (:math:`C_{max} = \max(1, w_{type}/2 + w_{act} + w_{deg})`; see
        Notes), log otherwise; epsilon = 0.1 with unit-scale masses always
        scales, epsilon = 1e-3 never does. ``"scaling"`` raises ValueError in
        :meth:`forward` if some pair fails the condition rather than silently
        switching or risking overflow. ``LossResult.domain`` records the
        choice per pair.
    debias : bool, default False
        Return the debiased loss (a Sinkhorn divergence)
        :math:`D(p, t) = L(p, t) - L(p, p)/2 - L(t, t)/2` per pair, and its
        terms combined the same way. The entropic plan of two identical
        graphs is not the identity (it spreads mass onto off-diagonal
        cells), so :math:`L(t, t) > 0`: "thequickfox" contracted to its 3
        words scores 0.37 against itself. :math:`D(t, t)` is exactly 0.0,
        because the three transports of a pair with ``p == t`` compute the
        same numbers bit for bit. The forward pass runs the 3B transports
        (p_b, t_b), (p_b, p_b), (t_b, t_b) in one kernel call; the backward
        pass needs the gradients with respect to the target slot too
        (``LossGrad.target_mass``) and sums them onto p and t. Cost: three
        transports per pair, and a self pair takes about twice the sweeps
        of (p, t): forward + backward on 256 segmentation pairs takes 5.0x
        the plain loss (4.2x with relaxed predictions; ``DebiasSuite`` in
        ``bench/bench_loss.py``), with activations near 1. With activations
        of learned features a self pair can take ten times the sweeps of
        (p, t) or more, up to the cap (docs/design.md, "Debiased").
        ``iterations``, ``converged`` and
        ``marginal_error`` of the result then sum, AND and take the maximum
        over the three transports; ``plan(b)`` and ``domain`` are those of
        (p_b, t_b).

    num_threads : int or None, default None
        Threads for the pairs of a batch in :meth:`forward` and
        :meth:`backward` (each pair runs on one thread; at most one thread
        per pair, one for a batch of fewer than about 4000 plan cells).
        None follows OpenMP's default: ``OMP_NUM_THREADS``, or
        ``threadpoolctl.threadpool_limits(n, user_api="openmp")``, else
        the number of cores. At most 4096. Values, plans and gradients are the same bit
        for bit whatever the count. An execution setting, not a model
        setting: it is left out of :meth:`get_params`, so checkpoints do not
        record it and resume under any count. Ignored (one thread) when
        grapheme was built without OpenMP (:func:`grapheme.openmp_enabled`).

    Weights for training (:meth:`for_training`): ``weights=(1, 0.2, 0)``,
    ``beta = gamma = 0``: the node term alone, priced mostly by the labels.
    A node whose label matches no target node costs 0.5 matched to a wrong
    one, 1 sent to a dustbin. With a segmentation target whose nodes are
    labelled by their offsets (as the :class:`~grapheme.Trainer` does) the
    node term therefore counts wrong segment starts: up to the entropic
    blur, ``0.5 min(FP, FN) + |FP - FN|`` for FP predicted starts that are
    not gold and FN gold ones that are missed. The small activation part
    keeps a gradient on the features for the ``history`` estimator. Measured
    (docs/design.md, "Segmentation targets"): with these weights a 2-layer
    encoder learns word boundaries of held-out English, ``fold``, ``dedup``
    and the demo pairs. With the defaults it does not: the activation part
    compares the model's own learned mean features, so training lowers the
    loss by moving features rather than boundaries, and a type weight of
    0.1 makes a wrong label cost 0.05. A type weight of 2 (a wrong label
    priced like a dustbin) learns as well per step but ties the costs:
    Sinkhorn then takes about ten times the sweeps (measured in
    docs/design.md, "Segmentation targets"). The
    gold graph scores exactly 0 only with ``debias=True`` (without, its
    entropic self-cost is 0.004-0.015 on short texts); the debiased
    loss trained worse (word F1 0.40 against 0.87 after two minutes), so
    training does without.

    Notes
    -----
    Threads: the pairs of a batch run in parallel inside the compiled
    kernels (``num_threads``); see the "Threads" section of docs/design.md.

    Stateless: one loss object may be used from any number of threads, and
    so may a :class:`LossResult` (its arrays are only read).

    Cost per pair is O(used (n+1)(m+1)) for the transport (``used`` the
    sweeps performed, ``LossResult.iterations``, never the cap) plus
    O(E_p m + n E_t) for the edge term, in time, for both the forward and the
    backward pass; memory is the plan and potentials, O((n+1)(m+1) +
    used (n+m)) (the potentials' storage grows by doubling as the sweeps
    run), plus O((n+1)(m+1)) reusable workspace. All pairs of a batch go
    through one compiled call that releases the GIL.

    Why balancing: plain sweeps are slow when the plan nearly splits into
    two blocks, the real nodes against each other and the dustbin corner,
    joined only by the little mass deleted or inserted; this is typical
    when n = m. The gauge that moves one block against the other then
    mixes at the rate of that mass (hundreds to thousands of sweeps). The
    balancing step solves that one direction of the dual exactly, in
    O(n + m); it is a smooth function of the potentials and the masses and
    is differentiated exactly in the backward pass. The scaling-form safety
    bound below is proven for plain sweeps; with balancing the kernel
    computes the same iterates in both domains (the tests compare them), but
    the bound on the shifted potentials is not proven.

    Why the scaling form is safe under the condition: all costs lie in
    :math:`[0, C_{max}]`; the half-steps are sup-norm non-expansive and
    their outputs have oscillation :math:`\le C_{max}`, so starting from
    g = 0 every iterate satisfies :math:`|g| \le C_{max}` and
    :math:`f + \varepsilon \log T \in [-C_{max}, 2C_{max}]`; then u, v,
    their reciprocals, K and u K v all lie within
    :math:`e^{\pm(3C_{max}/\varepsilon + |\log T|)}`, far inside float64,
    and the log domain's saturation (below) never binds.

    The gradient is exact for the computation performed (the iterations
    actually run are differentiated in reverse, including the early stop).
    At the kinks of the degree terms (:math:`d^p_i = d^t_j` in
    :math:`|d^p_i - d^t_j|`, a tie in :math:`\max(d^p_i, d^t_j, 1)`, a tie
    in the maximum degree that normalises the clique term, or a maximum of
    exactly 1) every partial derivative with respect to an edge weight is
    the *right* derivative, the one as that weight increases: at
    :math:`d^p_i = d^t_j` the distance grows either way, and a degree tied
    for a maximum raises it. Where a pair's edge weights sum to 0 its edge
    term is 0 and gets no gradient. (The activations keep their convention:
    :math:`\min(|x_i - y_j|, 1)` has derivative 0 at :math:`x_i = y_j` and
    at distance 1.)
    The gradient with respect to a zero mass is finite but may be as large
    as :math:`\exp(\Delta/\varepsilon)` for a cost gap :math:`\Delta`: it is
    the value of un-merging, and for small epsilon that value is genuinely
    steep. The kernel saturates un-shifted exponentials at :math:`e^{300}`;
    this only ever binds for cells of zero mass at small epsilon (e.g. all
    masses zero with epsilon = 1e-3), where the exact derivative is not
    representable in float64, and keeps every output finite.

    Examples
    --------
    >>> from grapheme import Graph, StructuralLoss
    >>> chain = Graph([0, 1, 1], [1], [97, 98], activation=[0.2, 0.5])
    >>> loss = StructuralLoss()
    >>> res = loss.forward(chain, chain)
    >>> bool(res.value < 0.3), res.plan(0).shape
    (True, (3, 3))
    >>> grad = loss.backward(res)
    >>> grad.activation.shape
    (2,)

    The debiased loss is exactly 0 at the target:

    >>> from grapheme import segmentation_target
    >>> gold = segmentation_target(Graph.from_text("thequickfox"), ["the", "quick", "fox"])
    >>> StructuralLoss(debias=True).forward(gold, gold).value
    0.0
    >>> wrong = segmentation_target(Graph.from_text("thequickfox"), ["theq", "uick", "fox"])
    >>> bool(StructuralLoss(debias=True).forward(wrong, gold).value > 0)
    True
    """

    def __init__(self, alpha=1.0, beta=0.5, gamma=2.0, epsilon=0.1,
                 iterations=1000, tol=1e-6, weights=(0.1, 0.7, 0.2), domain="auto",
                 balance=None, debias=False, num_threads=None):
        self.alpha, self.beta, self.gamma = alpha, beta, gamma
        self.epsilon, self.iterations, self.tol = epsilon, iterations, tol
        self.weights, self.domain, self.balance = weights, domain, balance
        self.debias, self.num_threads = debias, num_threads
        self._validate()

    def _validate(self):
        """Check and normalise every setting, naming a bad one: at
        construction, and again at every :meth:`forward` and
        :meth:`backward`, so that a setting changed on the object is checked
        before it reaches the kernels (as scikit-learn checks its estimators'
        parameters in ``fit``). Settings that are still the objects checked
        last time are not checked again (1.7 against 14 us)."""
        if settings_unchanged(self, _SETTING_NAMES):
            return
        self.alpha = check_scalar(self.alpha, "alpha", lower=0)
        self.beta = check_scalar(self.beta, "beta", lower=0)
        self.gamma = check_scalar(self.gamma, "gamma", lower=0)
        # the exponents (f + g - C) / eps carry rounding of 1e-16 / eps (at
        # 1e-20 the value moved by half and the gradients were NaN), and the
        # gradients through the sweeps about 1e-17 / eps^2: 0.36 off at 1e-8,
        # 3.5e-3 at 1e-7, 5e-5 at 1e-6 (two numerical reviews' finds)
        self.epsilon = check_scalar(self.epsilon, "epsilon", lower=EPSILON_MIN)
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, numbers.Integral):
            raise TypeError(f"iterations must be an integer, got {show(self.iterations)}")
        if not 1 <= self.iterations <= 2**31 - 1:
            raise ValueError(f"iterations must be in [1, 2**31 - 1], got {show(self.iterations)}")
        self.iterations = int(self.iterations)
        self.tol = None if self.tol is None else check_scalar(self.tol, "tol", lower=0,
                                                              lower_inclusive=False)
        try:
            w = np.asarray(self.weights)
            if w.dtype.kind not in "iufO":   # astype would read complex, dates, text
                raise TypeError
            w = w.astype(np.float64)
        except (TypeError, ValueError, OverflowError):
            raise TypeError(f"weights must be 3 real numbers, got {show(self.weights)}") from None
        if w.shape != (3,) or not np.all(np.isfinite(w)) or np.any(w < 0):
            raise ValueError(
                f"weights must be 3 finite non-negative numbers, got {show(self.weights)}")
        self.weights = tuple(float(v) for v in w)
        if not isinstance(self.domain, str):
            raise TypeError(f"domain must be one of {_DOMAINS}, got {show(self.domain)}")
        if self.domain not in _DOMAINS:
            raise ValueError(f"domain must be one of {_DOMAINS}, got {show(self.domain)}")
        if self.balance is not None and not isinstance(self.balance, (bool, np.bool_)):
            raise TypeError(f"balance must be None, True or False, got {show(self.balance)}")
        self.balance = None if self.balance is None else bool(self.balance)
        if not isinstance(self.debias, (bool, np.bool_)):
            raise TypeError(f"debias must be True or False, got {show(self.debias)}")
        self.debias = bool(self.debias)
        self.num_threads = None if self.num_threads is None else check_scalar(
            self.num_threads, "num_threads", lower=1, upper=_MAX_THREADS, integer=True)
        settings_checked(self, _SETTING_NAMES)

    @classmethod
    def for_training(cls, **overrides):
        """The loss ``grapheme train`` and the demo train with:
        ``StructuralLoss(weights=(1, 0.2, 0), beta=0, gamma=0, **overrides)``
        (see "Weights for training" above).

        >>> StructuralLoss.for_training().weights
        (1.0, 0.2, 0.0)
        """
        return cls(**{**TRAINING, **overrides})

    def get_params(self):
        """Constructor arguments (``num_threads`` aside: it changes no result)."""
        self._validate()
        return {k: getattr(self, k) for k in _SETTING_NAMES if k != "num_threads"}

    def __repr__(self):
        return (f"StructuralLoss(alpha={self.alpha}, beta={self.beta}, "
                f"gamma={self.gamma}, epsilon={self.epsilon}, "
                f"iterations={self.iterations}, tol={self.tol}, "
                f"weights={self.weights}, domain={self.domain!r}, "
                f"balance={self.balance}, debias={self.debias})")

    # -- public -------------------------------------------------------------
    def forward(self, predicted, target) -> LossResult:
        """Loss of ``predicted`` against ``target``.

        Parameters
        ----------
        predicted, target : Graph
            Single graphs, or batched graphs with equal ``num_graphs`` (pair
            b is predicted graph b against target graph b). Uses ``indptr``,
            ``indices``, ``weights`` (None = 1), ``labels``, ``mass``,
            ``activation`` and ``offsets``.

        Returns
        -------
        LossResult
            ``value`` is the mean over the pairs.

        Raises
        ------
        ValueError
            If the batch sizes differ (naming ``target``), the batch is empty
            (``Graph.from_texts([])``), an array is malformed (naming it), a
            graph's masses or edge weights total more than 5e149 (naming the
            graph: products of them would overflow), or ``domain="scaling"`` and some pair
            fails the scaling condition (naming ``domain``); or (also
            TypeError) a setting changed on the loss since its construction
            is not valid (naming it).
        """
        return self._forward(predicted, target)

    def _forward(self, predicted, target, workspace=None):
        """:meth:`forward`, its plans and potentials in ``workspace`` (a
        :class:`grapheme._workspace.Workspace`) if given: valid until its
        next use, so only for a caller that never hands the result out (the
        ``Trainer``'s step). Fresh arrays page-fault in again at every call
        once the allocator has returned the last ones to the system."""
        self._validate()
        p = _from_graph(predicted, "predicted")
        t = _from_graph(target, "target")
        for name, g in (("predicted", p), ("target", t)):
            # and of edge weights, whose total overflowed to inf unsaid (8e307
            # twice: the edge term jumped to 1; an attack helper's find)
            for what, values in (("mass", g.mass), ("edge weight", g.degree)):
                total = _segment_sums(values, g.offsets)
                if (total > _MAX_GRAPH_MASS).any():
                    b = int(np.flatnonzero(total > _MAX_GRAPH_MASS)[0])
                    raise ValueError(
                        f"{name} graph {b} has a total {what} of {total[b]:.3g}, more than "
                        f"{_MAX_GRAPH_MASS:.0e}: the loss takes products of them, which "
                        f"overflow (scale them down)")
        if self.debias:
            result = self._forward_debiased(p, t, workspace)
        else:
            result = self._forward_arrays(p, t, workspace=workspace)
        shapes = (_feature_shape(predicted), _feature_shape(target))
        return dataclasses.replace(result, _feature_shapes=shapes)

    def backward(self, result: LossResult, grad=1.0) -> LossGrad:
        """Exact gradient of ``result.value`` (the batch mean), times ``grad``.

        A pure function of its arguments: ``result`` is not changed, and
        calling it again returns equal, new arrays.

        Parameters
        ----------
        result : LossResult
            Returned by :meth:`forward` (of any StructuralLoss): the
            settings that forward pass ran with are used, whatever has been
            changed on a loss since.
        grad : float or array_like of shape (B,), default 1.0
            The upstream gradient. A scalar is the gradient of
            ``result.value`` (the mean over the B pairs: pair b is scaled by
            ``grad / B``); an array is the gradient of ``result.values``, one
            per pair (pair b is scaled by ``grad[b]``). Finite.

        Returns
        -------
        LossGrad
            ``(activation (N,), mass (N,), target_activation (M,), weights
            (E_p,), target_weights (E_t,), target_mass (M,))``, and
            ``features`` (N, d) and ``target_features`` (M, d): the
            activation gradient spread over a graph's features (``g[:, None]
            / d``, in the features' dtype) when its activations are their
            means, else None. With ``debias=True`` the gradient of the
            debiased values, summed over the three transports onto
            ``predicted`` and ``target``.

        Raises
        ------
        TypeError
            If ``result`` is not a LossResult, or ``grad`` is not a real
            number or an array of real numbers.
        ValueError
            If ``grad`` is not finite or not of shape (B,).
        """
        if not isinstance(result, LossResult):
            raise TypeError(f"result must be a LossResult, got {type(result).__name__}")
        self._validate()   # its num_threads; the settings are the forward pass's
        c = result._cache
        p, t = c.p, c.t
        scale = _pair_scale(grad, result.num_pairs)
        if c.fold is not None:
            # d D_b = d L(p, t) - d L(p, p) / 2 - d L(t, t) / 2
            scale = np.concatenate([scale, -0.5 * scale, -0.5 * scale])
        out = LossGrad(np.empty(len(p.activation)), np.empty(len(p.activation)),
                       np.empty(len(t.activation)), np.empty(len(p.weights)),
                       np.empty(len(t.weights)), np.empty(len(t.activation)))
        _transport.structural_loss_backward(p, t, c.settings, c, scale, out,
                                            self._threads())
        if c.fold is not None:
            out = _fold_debiased(out, *c.fold)
        shape_p, shape_t = result._feature_shapes
        return out._replace(features=_features_grad(shape_p, out.activation),
                            target_features=_features_grad(shape_t, out.target_activation))

    __call__ = forward

    # -- array level ----------------------------------------------------------
    def _forward_debiased(self, p: _GraphArrays, t: _GraphArrays,
                          workspace=None) -> LossResult:
        """The debiased loss ``L(p, t) - L(p, p)/2 - L(t, t)/2`` per pair, the
        3B transports in one kernel call (see ``debias``)."""
        _check_batches(p, t)
        B = len(p.offsets) - 1
        self_pair = np.repeat(np.array([0, 1, 1], np.uint8), B)
        r = self._forward_arrays(_concat([p, p, t]), _concat([t, p, t]), self_pair, workspace)
        pt, pp, tt = slice(0, B), slice(B, 2 * B), slice(2 * B, 3 * B)

        def debiased(x):
            return x[pt] - 0.5 * x[pp] - 0.5 * x[tt]

        values, nodes = debiased(r.values), debiased(r.nodes)
        edges, cliques = debiased(r.edges), debiased(r.cliques)
        three = lambda x: x.reshape(3, B)
        fold = (len(p.activation), len(t.activation), len(p.weights), len(t.weights))
        return LossResult(
            value=float(values.mean()), node=float(nodes.mean()),
            edge=float(edges.mean()), clique=float(cliques.mean()),
            values=values, nodes=nodes, edges=edges, cliques=cliques,
            iterations=three(r.iterations).sum(axis=0),
            converged=three(r.converged).all(axis=0),
            marginal_error=three(r.marginal_error).max(axis=0),
            domain=r.domain[pt].copy(), _cache=r._cache._replace(fold=fold))

    def _forward_arrays(self, p: _GraphArrays, t: _GraphArrays,
                        self_pair=None, workspace=None) -> LossResult:
        """Forward on the arrays of two validated graphs (see :func:`_from_graph`);
        ``self_pair`` (B,) uint8 marks the pairs that score a graph against
        itself (default none); ``workspace``: see :meth:`_forward`."""
        _check_batches(p, t)
        B = len(p.offsets) - 1
        n = np.diff(p.offsets)
        m = np.diff(t.offsets)
        # the plans (and the backward pass's copies of them) are O(n m) per
        # pair: refuse what cannot fit, up front (the potentials grow with the
        # sweeps actually run, O(n + m) each)
        cells = int(((n + 1) * (m + 1)).sum())
        check_allocation(16 * cells, f"the structural loss of {B} pair(s) "
                                     f"({int(n.sum())} x {int(m.sum())} nodes)")
        plan_off = np.zeros(B + 1, np.int64)
        np.cumsum((n + 1) * (m + 1), out=plan_off[1:])
        # the kernel fills the offsets of the potentials and grows their
        # storage with the sweeps it runs; the last offsets are only its
        # initial capacity (every sweep without tol, a few with it)
        sweeps = self.iterations if self.tol is None else min(self.iterations, _FIRST_SWEEPS)
        f_off = np.zeros(B + 1, np.int64)
        g_off = np.zeros(B + 1, np.int64)
        f_off[-1] = sweeps * int((n + 1).sum())
        g_off[-1] = sweeps * int((m + 1).sum())
        if workspace is not None:
            # room for a quarter more than the most any call has needed:
            # the stores then come from the workspace with no growth (and no
            # fresh pages) from one step to the next
            f_off[-1] = max(f_off[-1], workspace.kept("loss.fpot") * 5 // 4)
            g_off[-1] = max(g_off[-1], workspace.kept("loss.gpot") * 5 // 4)
        scaled = self._choose_domain(_segment_sums(p.mass, p.offsets)
                                     + _segment_sums(t.mass, t.offsets))
        if self_pair is None:
            self_pair = np.zeros(B, np.uint8)
        if workspace is None:
            alloc = np.empty
        else:
            def alloc(size, name="loss.plan"):
                return workspace(name, (size,), np.float64)
        cache = _Cache(self._settings(), p, t, alloc(plan_off[-1]), plan_off, None, None,
                       f_off, g_off, np.empty(B, np.int64), scaled, self_pair)
        terms = np.empty((B, 4))
        conv = np.empty(B, np.uint8)
        fpot, gpot = _transport.structural_loss_forward(
            p, t, cache.settings, cache, terms, conv, self._threads(),
            None if workspace is None else alloc)
        cache = cache._replace(fpot=fpot, gpot=gpot)
        used = cache.used
        nodes, edges, cliques = terms[:, 0].copy(), terms[:, 1].copy(), terms[:, 2].copy()
        values = self.alpha * nodes + self.beta * edges + self.gamma * cliques
        return LossResult(
            value=float(values.mean()), node=float(nodes.mean()),
            edge=float(edges.mean()), clique=float(cliques.mean()),
            values=values, nodes=nodes, edges=edges, cliques=cliques,
            iterations=used, converged=conv.astype(bool),
            marginal_error=terms[:, 3].copy(),
            domain=np.where(scaled.astype(bool), "scaling", "log"), _cache=cache)

    def _settings(self) -> _Settings:
        """The settings as the kernels read them."""
        return _Settings(*self.weights, self.epsilon, self.iterations,
                         -1.0 if self.tol is None else self.tol, self._balances(),
                         _REPORT_TOL, self.alpha, self.beta, self.gamma)

    def _threads(self) -> int:
        """``num_threads`` as the kernels take it (0: OpenMP's default)."""
        return 0 if self.num_threads is None else self.num_threads

    def _balances(self) -> bool:
        """Whether the sweeps take the dustbin-balancing step."""
        return self.tol is not None if self.balance is None else self.balance

    def _choose_domain(self, total: np.ndarray) -> np.ndarray:
        """Per pair 1 (scaling form) or 0 (log domain), as uint8 of shape (B,),
        from each pair's total mass (B,)."""
        if self.domain == "log":
            return np.zeros(total.shape[0], np.uint8)
        safe = _scaling_safe(self.epsilon, self.weights, total)
        if self.domain == "scaling" and not safe.all():
            b = int(np.flatnonzero(~safe)[0])
            raise ValueError(
                f"domain='scaling' is not safe for pair {b} (epsilon={self.epsilon}, "
                f"total mass {total[b]!r}): it needs 3*C_max/epsilon + |log(total mass)| "
                f"<= {_SCALING_LOG_LIMIT}; use domain='auto' or 'log'")
        return safe.astype(np.uint8)


def _check_batches(p: _GraphArrays, t: _GraphArrays):
    """Equal, non-zero batch sizes."""
    if len(p.offsets) != len(t.offsets):
        raise ValueError(
            f"target has {len(t.offsets) - 1} graphs but predicted has "
            f"{len(p.offsets) - 1}; batch sizes must match")
    if len(p.offsets) == 1:
        raise ValueError("predicted is an empty batch (0 graphs): the loss is a mean "
                         "over pairs, which has no value without any")


def _concat(parts) -> _GraphArrays:
    """One batch holding the graphs of every part in order (CSR and node
    indices shifted, the rest concatenated). O(N + E)."""
    nodes = np.cumsum([0] + [len(a.mass) for a in parts])
    edges = np.cumsum([0] + [len(a.indices) for a in parts])
    cat = lambda name: np.concatenate([getattr(a, name) for a in parts])
    return _GraphArrays(
        np.concatenate([np.zeros(1, np.int64)]
                       + [a.indptr[1:] + edges[k] for k, a in enumerate(parts)]),
        np.concatenate([a.indices + nodes[k] for k, a in enumerate(parts)]),
        cat("labels"), cat("weights"), cat("mass"), cat("activation"),
        np.concatenate([np.zeros(1, np.int64)]
                       + [a.offsets[1:] + nodes[k] for k, a in enumerate(parts)]),
        cat("degree"))


def _fold_debiased(g: LossGrad, N, M, Ep, Et) -> LossGrad:
    """The gradient of the 3B pairs ``(p, t), (p, p), (t, t)`` (predicted
    batch ``[p, p, t]``, target batch ``[t, p, t]``) summed onto the caller's
    ``p`` (N nodes, Ep edges) and ``t`` (M nodes, Et edges)."""
    def on_p(pred, targ, n, m):   # p: the first two predicted blocks, the middle target one
        return pred[:n] + pred[n:2 * n] + targ[m:m + n]

    def on_t(pred, targ, n, m):   # t: the last predicted block, the outer target ones
        return pred[2 * n:] + targ[:m] + targ[m + n:]

    return LossGrad(
        activation=on_p(g.activation, g.target_activation, N, M),
        mass=on_p(g.mass, g.target_mass, N, M),
        target_activation=on_t(g.activation, g.target_activation, N, M),
        weights=on_p(g.weights, g.target_weights, Ep, Et),
        target_weights=on_t(g.weights, g.target_weights, Ep, Et),
        target_mass=on_t(g.mass, g.target_mass, N, M))


def _pair_scale(grad, B):
    """The per-pair scale of :meth:`StructuralLoss.backward`'s ``grad``:
    ``grad / B`` for a scalar, ``grad`` for an array of shape (B,)."""
    g = check_upstream(grad, "grad", B)
    return np.full(B, g / B) if isinstance(g, float) else g


def _segment_sums(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Sums of ``values[offsets[b]:offsets[b+1]]`` for every b (0 if empty).

    Per segment, not by differencing a running sum (which would lose a tiny
    segment next to large ones).
    """
    B = len(offsets) - 1
    return np.bincount(np.repeat(np.arange(B), np.diff(offsets)), weights=values,
                       minlength=B).astype(np.float64, copy=False)


def _from_graph(graph, name) -> _GraphArrays:
    """Arrays of a validated ``Graph`` (only edge weights are re-checked)."""
    if not isinstance(graph, Graph):
        raise TypeError(f"{name} must be a grapheme.Graph, got {type(graph).__name__}")
    E = graph.num_edges
    w = graph.weights
    if w is None:
        w = np.ones(E)
    elif E and w.min() < 0:
        raise ValueError(f"{name}.weights must be >= 0")
    # int64 CSR whatever the graph's index type: the loss is O(iterations n m)
    # per pair, so this copy is negligible and the kernels need no fused type
    indptr = np.ascontiguousarray(graph.indptr, dtype=np.int64)
    w = np.ascontiguousarray(w)
    # weighted out-degrees, each the sum of its row's weights in edge order
    # (exact counts for unit weights)
    n = len(indptr) - 1
    degree = np.bincount(np.repeat(np.arange(n), np.diff(indptr)), weights=w,
                         minlength=n).astype(np.float64, copy=False)
    return _GraphArrays(
        indptr, np.ascontiguousarray(graph.indices, dtype=np.int64),
        np.ascontiguousarray(graph.labels, dtype=np.int32), w,
        np.ascontiguousarray(graph.mass), np.ascontiguousarray(graph.activation),
        np.ascontiguousarray(graph.graph_offsets, dtype=np.int64), degree)


def _feature_shape(graph):
    """Shape and dtype of ``graph``'s features, ``(n, d, dtype)``, when its
    activations are their means (their gradient comes back in that dtype)."""
    if graph._activation is None and graph.features is not None:
        return graph.features.shape + (graph.features.dtype,)
    return None


def _features_grad(shape, grad_activation):
    if shape is None:
        return None
    from .ops import FeatureMean   # the one home of the feature-mean rule

    return FeatureMean().vjp(shape, grad_activation)[0]
