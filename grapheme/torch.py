"""grapheme from PyTorch: the operations as autograd Functions, and Modules.

Needs the optional extra ``grapheme[torch]``; ``import grapheme`` never
imports torch. Tensors are CPU tensors, float32 or float64, packed one
sequence after another as PyTorch Geometric's ``ptr`` and variable-length
attention's ``cu_seqlens`` hold them (not ``PackedSequence``'s time-major
rows): ``(n, d)`` rows with the batch given by ``offsets`` (sequence ``b``
is rows ``offsets[b]:offsets[b+1]``). :func:`pack` and :func:`unpack`
convert from and to padded ``(B, L, d)``; ``Graph.chains(offsets)`` is
the chain graph the functions take.

Every operation of :mod:`grapheme.ops` becomes an autograd Function by one
generic wrapper: forward runs the operation on the tensors' memory
(contiguous tensors are not copied), backward runs its pure vjp. float32
tensors run grapheme's float32 path: (n, d) arrays in float32, similarities,
probabilities, masses and the structural loss in float64 (see "float32" in
docs/design.md). Functions are once differentiable: their gradients under
``create_graph=True`` raise a RuntimeError saying so when they are
differentiated in turn (a gradient penalty, ``gradgradcheck``). A tensor
modified in place between forward and backward is caught by autograd's
version check.

The modules:

- :class:`Merge`: a learnable threshold (an ``nn.Parameter``) and any
  estimator. ``merged, unpool, aux_loss = merge(x, offsets)``: the merged
  features, a differentiable map back to the input rows, and the rate
  penalty (0 without a rate controller).
- :class:`Encoder`: context before the merge (grapheme's encoder, whose
  weights are parameters): ``features, queries, keys = encoder(x,
  offsets)``, to pass on to :class:`Merge`.
- :class:`StructuralLoss`: the structural loss of a :class:`Merged` against
  target graphs.

Examples
--------
>>> import torch
>>> from grapheme import Graph
>>> from grapheme.torch import Merge, StructuralLoss
>>> x = torch.randn(7, 16, dtype=torch.float64, requires_grad=True)
>>> merge = Merge(estimator="ste", dtype=torch.float64)
>>> codes = torch.tensor([ord(c) for c in "abcwxyz"])   # the rows' characters
>>> out = merge(x, torch.tensor([0, 3, 7]), labels=codes)
>>> merged, unpool, aux_loss = out          # the dynamic-chunking contract
>>> unpool(merged).shape
torch.Size([7, 16])
>>> loss = StructuralLoss()(out, Graph.from_texts(["ab", "xyz"])) + aux_loss
>>> loss.backward()
>>> x.grad.shape, merge.theta.grad is not None
(torch.Size([7, 16]), True)
"""
import copy
import functools
import math
import weakref
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from . import ops
from ._validation import (as_float_array, check_allocation, check_graph, check_scalar,
                          exact_str)
from .graph import Graph, _chain_offsets
from .loss import TRAINING, StructuralLoss as _Loss
from .morph import Morpher

__all__ = [
    "apply",
    "edge_similarity",
    "merge_scores",
    "hard_merge",
    "chain_relaxation",
    "unpool",
    "structural_loss",
    "rate_penalty",
    "bernoulli_log_prob",
    "message_passing",
    "lookup_message_passing",
    "routed_similarity",
    "Encoder",
    "Merge",
    "Merged",
    "StructuralLoss",
    "pack",
    "unpack",
]


def _array(t, name):
    """A numpy view of a CPU tensor, float32 or float64 as the tensor is
    (contiguous tensors are not copied). The operations compute their
    (n, d) arrays in that dtype and their scalars in float64 (see "float32"
    in docs/design.md)."""
    _check_tensor(t, name)
    _on_cpu(t, name)
    return _numpy(t.detach().contiguous(), name)


def _on_cpu(t, name):
    """A ValueError naming ``name`` unless the tensor ``t`` is on the CPU
    (checked where the user's argument still has its own name: a CUDA
    ``x`` of :class:`Merge` was called "features")."""
    _not_meta(t, name)
    if t.device.type != "cpu":
        raise ValueError(f"{name} must be a CPU tensor (grapheme's kernels run on the "
                         f"CPU), got device {t.device}")


def _numpy(t, name):
    """``t.numpy()``; under a ``torch.func`` transform, whose tensors hold no
    storage, a TypeError naming ``name`` and the transform (torch said
    "Cannot access data pointer of Tensor that doesn't have storage")."""
    try:
        return t.numpy()
    except RuntimeError as exc:
        if "storage" not in str(exc):
            raise
        raise TypeError(f"{name} is a tensor without storage, as under a torch.func transform "
                        f"(grad, vmap, jacrev, ...): grapheme's operations are differentiated "
                        f"by torch.autograd (loss.backward(), torch.autograd.grad), not by "
                        f"torch.func") from None


def _untransformed():
    """A TypeError under ``torch.jit.trace`` or a ``torch.func`` transform,
    which cannot run grapheme's operations (a PyTorch-user helper's find:
    vmap and jacrev said "it must override the setup_context staticmethod",
    as if the fault were the user's; a trace replayed the traced batch's
    offsets on every batch, silently). ``is_grads_batched=True`` and
    ``jacobian(vectorize=True)`` still fail in torch's words, before any
    backward of grapheme's runs."""
    if torch.jit.is_tracing():
        raise TypeError(
            "torch.jit.trace cannot trace grapheme's operations: their offsets, labels and "
            "merges are computed outside torch, so the trace would replay the traced "
            "batch's on every batch; call the module eagerly (torch.compile runs grapheme's "
            "operations between its graphs)")
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    if active is not None and active():
        raise TypeError(
            "grapheme's operations cannot run under a torch.func transform (grad, vmap, "
            "jacrev, jacfwd, vjp): they are differentiated by torch.autograd "
            "(loss.backward(), torch.autograd.grad)")


def _check_tensor(t, name):
    """``t`` is a dense float32 or float64 tensor, else a TypeError naming
    ``name`` (checked where the user's argument still has its own name)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:   # else "unsupported memory format option"
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout} "
                        f"(.to_dense() makes one)")
    if t.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name} must be float32 or float64, got {t.dtype}")


def _check_merged(merged):
    if not isinstance(merged, Merged):
        raise TypeError(f"merged must be a grapheme.torch.Merged (what Merge returns), got "
                        f"{type(merged).__name__}")


def _factory(device, dtype):
    """``device=`` and ``dtype=`` of a module's parameters, as torch's own
    modules take them (``None``: torch's defaults)."""
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
    return {"device": device, "dtype": dtype}


def _host(x, name):
    """An index argument (offsets, labels, rows) as a numpy array: a tensor
    detached and on the CPU, anything else through ``np.asarray``; the
    operation checks its values. A tensor on the meta device (shapes, no
    values) is refused naming ``name``."""
    if not isinstance(x, torch.Tensor):
        return np.asarray(x)
    _untransformed()   # before the trace's warnings that its values are constants
    _not_meta(x, name)
    return _numpy(x.detach().cpu(), name)


def _not_meta(t, name):
    # torch said "Cannot copy out of meta tensor" (an attack helper's find)
    if t.device.type == "meta":
        raise ValueError(f"{name} is on the meta device, which holds shapes but no values")


def _chains(x, offsets, labels=None, dim=None):
    """``Graph.chains(offsets, labels)`` of the packed rows ``x`` (n, d), or
    (n, ``dim``): ``x``'s rows are checked against ``offsets[-1]`` first, so
    a wrong offset (``[0, 2**31]``) allocates nothing."""
    offsets = _chain_offsets(_host(offsets, "offsets"))   # named as offsets' first
    n = int(offsets[-1])
    if x.ndim != 2 or x.shape[0] != n or (dim is not None and x.shape[1] != dim):
        what = "d" if dim is None else f"{dim}"
        raise ValueError(f"x must have shape ({n}, {what}): offsets[-1] = {n} rows"
                         + ("" if dim is None else " of the encoder's dim")
                         + f", got {tuple(x.shape)}"
                         # a new user's find: a padded (B, L, d) batch
                         + ("; a padded batch is packed by grapheme.torch.pack"
                            if x.ndim == 3 else ""))
    return Graph.chains(offsets, None if labels is None else _host(labels, "labels"))


def _tensor(a, dtype):
    # "W": grapheme hands out read-only arrays (a Graph's, a history's); a
    # tensor may be written in place, so it gets a copy of those
    a = np.asarray(a)
    if a.dtype not in (np.float32, np.float64):
        a = a.astype(np.float64)
    return torch.from_numpy(np.require(a, requirements="CW")).to(dtype)


def _eager(fn):
    """Run ``fn`` outside ``torch.compile``'s tracing (a graph break): its
    numpy and compiled code cannot be traced, and dynamo failed inside it
    with an internal error. The disabled function is made only under
    tracing, when dynamo is loaded already: made at import, it cost every
    ``import grapheme.torch`` dynamo's import (0.8 s)."""
    disabled = []

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if not torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        if not disabled:
            disabled.append(torch.compiler.disable(
                fn, recursive=True, reason="grapheme's operations run numpy and compiled "
                "code, which dynamo cannot trace: they run eagerly between the graphs, so "
                "fullgraph=True cannot hold them"))
        return disabled[0](*args, **kwargs)
    # a code object of its own: dynamo caches compiled frames by code
    # object, and with one shared by every wrapper it recompiled that one
    # for each method it met, warning of its recompile limit (8) after a few
    # batch shapes (a PyTorch-user helper's find)
    run.__code__ = run.__code__.replace(co_name=fn.__qualname__)
    return run


_ONCE = ("grapheme's operations are once differentiable: their gradients cannot be "
         "differentiated again (create_graph=True, a gradient penalty, gradgradcheck)")


class _OpFunction(torch.autograd.Function):
    """``op`` as an autograd Function: ``call(*arrays) -> (result, saved)``."""

    @staticmethod
    def forward(ctx, op, call, box, *tensors):
        ctx.set_materialize_grads(False)
        arrays = [_array(t, name) for t, name in zip(tensors, op.inputs)]
        result, saved = call(*arrays)
        ctx.op, ctx.state = op, saved
        ctx.dtype = tensors[0].dtype
        box.append(result)
        outputs = tuple(_tensor(getattr(result, name), ctx.dtype) for name in op.outputs)
        # Outputs may share memory with ``saved`` (float64): saving inputs and
        # outputs lets autograd's version check catch an in-place change of
        # either before backward reads them.
        ctx.save_for_backward(*tensors, *outputs)
        # ... and their versions: ``saved`` reads the tensors' own memory,
        # where saved-tensor hooks (``allow_mutation_on_saved_tensors``, a
        # pack hook's copy) give autograd's check copies, and a change went
        # unseen into a wrong gradient (a PyTorch-user helper's find). Weak
        # references: the outputs hold this node, and a tensor gone cannot
        # be changed.
        # Only where a backward can run: an inference tensor has no version
        # (under inference_mode every op failed: an attack helper's find).
        ctx.versions = ([(weakref.ref(t), t._version) for t in (*tensors, *outputs)
                         if not t.is_inference()] if any(ctx.needs_input_grad) else [])
        return outputs

    @staticmethod
    def jvp(ctx, *tangents):
        # torch.autograd.forward_ad: torch's own message asked the user to
        # implement this (a PyTorch-user helper's find)
        raise RuntimeError(
            "grapheme's operations have no forward-mode derivative "
            "(torch.autograd.forward_ad, jvp): they are differentiated in reverse mode "
            "(loss.backward(), torch.autograd.grad)")

    @staticmethod
    @_eager   # autograd calls it from a compiled function's .backward()
    def backward(ctx, *grads):
        second_order = torch.is_grad_enabled()   # on only under create_graph=True
        with torch.no_grad():
            try:
                ctx.saved_tensors   # raises if an input or output was modified in place
                changed = None
            except RuntimeError as exc:
                # torch's wording: where it changes, its own message stands
                if "inplace operation" not in str(exc):
                    raise
                changed = exc
            if changed is not None or any(
                    (t := ref()) is not None and t._version != version
                    for ref, version in ctx.versions):   # also where hooks replaced them
                # every output is guarded, needed or not: an output may be the
                # memory the backward reads (a PyTorch-user helper asked why
                # h += 1 after unpool failed; torch's message named no
                # operation of grapheme's)
                raise RuntimeError(
                    f"an input or output of grapheme's {type(ctx.op).__name__.lstrip('_')} "
                    "was modified by an inplace operation after the forward pass; its "
                    "backward reads their memory (whatever saved-tensor hooks saved): "
                    "change a copy, or out of place (h = h + 1, not h += 1)") from changed
            upstream = [None if g is None else _array(g, "grad") for g in grads]
            result = ctx.op.vjp(ctx.state, *upstream)
            out = tuple(_tensor(g, ctx.dtype) if need and g is not None else None
                        for g, need in zip(result, ctx.needs_input_grad[3:]))
        if not second_order:
            return (None, None, None) + out
        sources = ctx.saved_tensors[:len(ctx.needs_input_grad) - 3] + grads
        return (None, None, None) + _undifferentiable(out, sources)


def _undifferentiable(grads, sources):
    """The gradients of a backward pass under ``create_graph=True``, made to
    raise when they are differentiated in turn, towards anything: they are
    the outputs of one error node whose inputs are the ``sources`` the
    gradients depend on (the forward's inputs and the upstream gradients).

    torch's ``once_differentiable`` ties its error node to the upstream
    gradients only, so after a ``.sum()`` a gradient penalty through them
    silently added nothing. Tied to detached copies (before), it raised
    under ``.backward()`` but not under ``torch.autograd.grad(penalty,
    weight)``, which runs only the nodes on a path to ``weight``: the
    second derivative came back without this operation's part. First-order
    use under ``create_graph=True`` (the second derivative of another part
    of the model) is unaffected."""
    tensors = [g for g in grads if g is not None]
    if not tensors:
        return grads
    links = [t for t in sources if t is not None and t.requires_grad]
    error = torch._C._functions.DelayedError(_ONCE.encode(), len(tensors) + len(links))
    wrapped = error(*[g.detach().requires_grad_() for g in tensors], *links)
    wrapped = iter(wrapped if isinstance(wrapped, tuple) else (wrapped,))
    return tuple(None if g is None else next(wrapped) for g in grads)


@_eager
def apply(op, call, *tensors):
    """Run operation ``op`` as an autograd Function.

    ``call(*arrays)`` must return ``op``'s ``(result, saved)`` given numpy
    arrays for ``tensors`` (the differentiable inputs, in the order of
    ``op.inputs``). Returns the output tensors (in the order of
    ``op.outputs``) and ``result`` (for its non-differentiable parts, e.g.
    a merged graph or history).
    """
    _untransformed()
    box = []
    outputs = _OpFunction.apply(op, call, box, *tensors)
    return outputs, box[0]


# -------------------------------------------------------------- functional
def edge_similarity(graph, features):
    """Cosine similarity of every edge of ``graph`` (:class:`grapheme.ops.EdgeSimilarity`)."""
    (s,), _ = apply(ops.EdgeSimilarity(), lambda h: ops.EdgeSimilarity().forward(graph, h),
                    features)
    return s


def merge_scores(similarity, theta, temperature):
    """``(logits, probability, tau)`` of :class:`grapheme.ops.MergeScores`
    (``tau = sigmoid(theta)``, a float); ``theta`` 0-d."""
    op = ops.MergeScores(temperature)
    (z, p), result = apply(op, op.forward, similarity, theta)
    return z, p, result.tau


def hard_merge(graph, features, decisions):
    """Merged features, the merged graph and the history (:class:`grapheme.ops.HardMerge`)."""
    # bool, checked by the operation (not cast: 0.9 -> True)
    decisions = _host(decisions, "decisions")
    (f,), result = apply(ops.HardMerge(),
                         lambda h: ops.HardMerge().forward(graph, h, decisions), features)
    return f, result.graph, result.history


def chain_relaxation(graph, features, merge):
    """Relaxed features, masses, expected edge weights and the relaxed graph
    (:class:`grapheme.ops.ChainRelaxation`)."""
    op = ops.ChainRelaxation()
    (f, mass, w), result = apply(op, lambda h, m: op.forward(graph, h, m), features, merge)
    return f, mass, w, result.graph


def unpool(history, y):
    """Every output row broadcast back to its inputs, ``out[i] = y[c(i)]``:
    a :class:`grapheme.ops.Lookup` of ``y`` at ``history.cluster`` (its vjp
    sums over each output's members). ``y`` is (k,) or (k, ...): rows of
    several dimensions (heads, say) are flattened for it and back."""
    _check_tensor(y, "y")   # float32 or float64, named (else it is Lookup's "table")
    if y.ndim == 0 or y.shape[0] != history.num_outputs:
        # more rows were read silently, another sequence's included (a
        # PyTorch-user helper's find); fewer named Lookup's "table"
        raise ValueError(f"y must have one row per output of the history "
                         f"(history.num_outputs = {history.num_outputs}), got shape "
                         f"{tuple(y.shape)}")
    rows = history.cluster
    flat = y.flatten(1) if y.ndim > 2 else y   # reshape(k, -1) failed at k = 0
    (out,), _ = apply(ops.Lookup(), lambda a: ops.Lookup().forward(a, rows), flat)
    return out.reshape((out.shape[0],) + tuple(y.shape[1:])) if y.ndim > 2 else out


def structural_loss(loss, predicted, target, activation, mass, weights, target_activation):
    """Per-pair values (B,) of a :class:`grapheme.StructuralLoss`
    (:class:`grapheme.ops.StructuralLossOp`)."""
    op = ops.StructuralLossOp(loss)
    (values,), _ = apply(op, lambda a, m, w, t: op.forward(predicted, target, a, m, w, t),
                         activation, mass, weights, target_activation)
    return values


def rate_penalty(probability, num_nodes, target, weight, multiplier=0.0):
    """The rate penalty of :class:`grapheme.ops.RatePenalty` (a 0-d tensor)."""
    op = ops.RatePenalty(target, weight)
    (value,), _ = apply(op, lambda p: op.forward(p, num_nodes, multiplier), probability)
    return value


def bernoulli_log_prob(logits, decisions, example, num_examples):
    """Per-example log-probability of Bernoulli decisions
    (:class:`grapheme.ops.BernoulliLogProb`)."""
    # checked, not cast
    decisions, example = _host(decisions, "decisions"), _host(example, "example")
    op = ops.BernoulliLogProb()
    (lp,), _ = apply(op, lambda z: op.forward(z, decisions, example, num_examples), logits)
    return lp


def message_passing(graph, features, w_self, w_pred, w_succ, bias, weights=None):
    """One residual message-passing layer (:class:`grapheme.ops.MessagePassing`).

    ``weights`` (E,): the edge weights of a weighted ``graph``, a
    differentiable input, which such a graph needs: ``Merged.weights`` for
    a merged graph (a relaxed merge's expected weights depend on the
    features and ``theta``), ``torch.tensor(graph.weights)`` to hold a
    graph's own weights constant."""
    return _layer(graph, None, features, w_self, w_pred, w_succ, bias, weights)


def lookup_message_passing(graph, table, rows, w_self, w_pred, w_succ, bias, weights=None):
    """``message_passing(graph, table[rows], ...)`` with its products taken on
    the table's rows (:class:`grapheme.ops.LookupMessagePassing`): a first
    layer over an embedding table. ``rows`` (n,) is not differentiated;
    ``weights`` as for :func:`message_passing`."""
    return _layer(graph, _host(rows, "rows"), table, w_self, w_pred, w_succ, bias, weights)


def _layer(graph, rows, first, w_self, w_pred, w_succ, bias, weights):
    check_graph(graph, "graph")
    base = ops.MessagePassing() if rows is None else ops.LookupMessagePassing()
    if weights is None:
        if graph.weights is not None:   # found by a PyTorch-user helper: a relaxed
            # merge's graph was taken with constant weights, its gradient lost
            raise ValueError("graph has edge weights: pass them as weights= (Merged.weights "
                             "for a merged graph, whose weights are differentiable; "
                             "torch.tensor(graph.weights) to hold them constant)")
        lookup = () if rows is None else (rows,)
        (h,), _ = apply(base, lambda x, a, b, c, d: base.forward(graph, x, *lookup, a, b, c, d),
                        first, w_self, w_pred, w_succ, bias)
        return h
    _check_tensor(weights, "weights")
    op = _WeightedLayer(base, graph, rows)
    (h,), _ = apply(op, op.forward, first, w_self, w_pred, w_succ, bias, weights)
    return h


class _WeightedLayer(ops.Operation):
    """A message-passing layer (``base``: :class:`grapheme.ops.MessagePassing`,
    or ``LookupMessagePassing`` on ``rows``) with the graph's edge weights as
    a last, differentiable input. For an edge ``u -> v`` of weight ``w``,
    ``P[v] += w h[u]`` and ``S[u] += w h[v]``, so ``d out / d w = <dP[v],
    h[u]> + <dS[u], h[v]>`` with ``dP = gz W_pred^T``, ``dS = gz W_succ^T``
    and ``gz = g (1 - t^2)``: O(E d) in numpy, on the bridge's path only."""

    outputs = ("features",)

    def __init__(self, base, graph, rows):
        self.base, self.graph, self.rows = base, graph, rows
        self.inputs = base.inputs + ("weights",)

    def forward(self, first, w_self, w_pred, w_succ, bias, weights):
        graph = self.graph.replace(weights=weights)   # checked there, by that name
        lookup = () if self.rows is None else (self.rows,)
        result, saved = self.base.forward(graph, first, *lookup, w_self, w_pred, w_succ, bias)
        h = first if self.rows is None else first[self.rows]   # rows checked by the layer
        dt = result.features.dtype
        src = np.repeat(np.arange(graph.num_nodes), np.diff(graph.indptr))
        return result, (saved, np.asarray(h, dt), np.asarray(w_pred, dt),
                        np.asarray(w_succ, dt), src, graph.indices)

    def vjp(self, saved, grad_features):
        inner, h, w_pred, w_succ, src, dst = saved
        grads = self.base.vjp(inner, grad_features)
        if grad_features is None:
            return grads + (np.zeros(src.shape[0]),)
        t = inner.t   # LookupSaved's or MessageSaved's
        gz = grad_features * (1.0 - t * t)
        dP, dS = gz @ w_pred.T, gz @ w_succ.T
        return grads + (np.einsum("ij,ij->i", dP[dst], h[src])
                        + np.einsum("ij,ij->i", dS[src], h[dst]),)


def routed_similarity(graph, queries, keys):
    """``cos(queries[u], keys[v])`` of every edge (:class:`grapheme.ops.RoutedSimilarity`)."""
    op = ops.RoutedSimilarity()
    (s,), _ = apply(op, lambda q, k: op.forward(graph, q, k), queries, keys)
    return s


# ------------------------------------------------------------------ modules
class _MorphOp(ops.Operation):
    """A whole morph (:meth:`grapheme.Morpher.forward` and its pure
    :meth:`~grapheme.Morpher.vjp`) as one operation: one Function, so the
    feature gradient of the similarity and of the merge land in one array."""

    outputs = ("features", "mass", "weights", "log_prob", "rate_penalty")

    def __init__(self, morpher, graph, routed):
        self.morpher, self.graph = morpher, graph
        self.inputs = ("features", "theta") + (("queries", "keys") if routed else ())

    def forward(self, features, theta, queries=None, keys=None):
        # a copy with this call's theta: the module's morpher is never
        # written (a forward in another thread reads it), and its theta is
        # the Parameter's, not a copy left by the last call
        call = copy.copy(self.morpher)
        call.theta = np.array(theta, dtype=np.float64)
        morphed = call.forward(self.graph, features, queries, keys)
        g = morphed.graph
        log_prob = morphed.log_prob if morphed.log_prob is not None else np.zeros(g.num_graphs)
        weights = np.ones(g.num_edges) if g.weights is None else g.weights
        return _MorphOut(g.features, g.mass, weights, log_prob,
                         np.array(morphed.rate_penalty), morphed), morphed

    def vjp(self, morphed, grad_features, grad_mass, grad_weights, grad_log_prob,
            grad_rate_penalty):
        grad = self.morpher.vjp(
            morphed, grad_features=grad_features, grad_mass=grad_mass,
            grad_weights=grad_weights,
            grad_log_prob=None if morphed.log_prob is None else grad_log_prob,
            grad_rate_penalty=None if grad_rate_penalty is None else float(grad_rate_penalty))
        if len(self.inputs) == 2:
            return grad.features, grad.theta
        return grad.features, grad.theta, grad.queries, grad.keys


class _MorphOut(NamedTuple):
    features: np.ndarray
    mass: np.ndarray
    weights: np.ndarray
    log_prob: np.ndarray
    rate_penalty: np.ndarray
    morphed: object


class Merged:
    """What :class:`Merge` produced; unpacks and indexes as the 3-tuple
    ``features, unpool, aux_loss`` (``out[0]`` is ``out.features``).

    Attributes
    ----------
    features : Tensor of shape (k, d)
        The merged rows (``n`` rows for the relaxed estimators: relaxed
        means, with ``mass`` saying how much of a cluster each row is).
    mass : Tensor of shape (k,)
    weights : Tensor of shape (k_edges,)
        Edge weights of ``graph`` (expected weights for relaxed estimators).
    log_prob : Tensor of shape (B,)
        ``log P(decisions)`` per sequence (``Reinforce``; zeros otherwise).
    aux_loss : Tensor of shape ()
        The rate penalty (0 without a rate controller).
    offsets : LongTensor of shape (B + 1,)
        Row offsets of every sequence in ``features``.
    graph : grapheme.Graph
        The merged graph's structure (labels, edges).
    history : grapheme.MergeHistory
        The hard merge map from the input rows.

    Notes
    -----
    ``B`` is the number of sequences given to the :class:`Merge`, times
    ``K`` with ``Reinforce(samples=K)``: that estimator repeats the batch
    ``K`` times (copy ``k`` of sequence ``b`` is sequence ``k B + b``), so
    its rows, targets, ``losses`` and the ``texts`` of :meth:`segments`
    are the ``K B`` of the repeated batch (``texts * K``).
    """

    def __init__(self, features, mass, weights, log_prob, aux_loss, morphed):
        self.features, self.mass, self.weights, self.log_prob = features, mass, weights, log_prob
        self.aux_loss, self.graph, self.history = aux_loss, morphed.graph, morphed.history
        self.offsets = torch.from_numpy(self.graph.graph_offsets.astype(np.int64))
        self._morphed = morphed   # the numpy morph: Merge.step and reinforce_loss read it
        self._made_by = None      # a weak reference to the Merge that made it

    def __getstate__(self):   # pickled (to another process): made by none there
        return dict(self.__dict__, _made_by=None)

    @_eager
    def unpool(self, y):
        """Rows of ``y`` (one per merged row, of any trailing shape: ``(k,
        heads, d)`` too) broadcast back to the input rows
        through the hard merge map; for the relaxed estimators, whose rows are
        the input rows, each input row gets its cluster head's row. ``y``
        may also hold one row per hard cluster (``history.num_outputs``,
        e.g. computed from the head rows ``features[history.heads]``)."""
        _check_tensor(y, "y")   # float32 or float64, named (else it is "table")
        _on_cpu(y, "y")
        rows = self.features.shape[0]
        if y.ndim == 0 or y.shape[0] not in (rows, self.history.num_outputs):
            raise ValueError(f"y must have one row per merged row ({rows}) or per hard "
                             f"cluster ({self.history.num_outputs}), got shape "
                             f"{tuple(y.shape)}")
        if y.shape[0] == self.history.num_outputs:
            return unpool(self.history, y)
        return unpool(self.history, y[torch.from_numpy(self.history.heads.astype(np.int64))])

    @_eager
    def segments(self, texts):
        """The hard merge's segments of every sequence: ``texts`` are the B
        input texts, one character per input row, in order. Returns B lists
        of str, each joining to its text (the dynamic chunks, as text).
        They are the module's own decisions, which may cut a letter from its
        combining mark; a :class:`grapheme.Segmenter` keeps written
        characters whole (:func:`grapheme.data.continues_cluster`).

        Examples
        --------
        >>> import torch
        >>> out = Merge(threshold=-10.0)(torch.ones(5, 2), [0, 2, 5])   # merge all
        >>> out.segments(["ab", "cde"])
        [['ab'], ['cde']]
        """
        if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
            raise TypeError(f"texts must be a list of str, one per sequence, got "
                            f"{type(texts).__name__}")
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must hold str only")
        texts = [exact_str(t) for t in texts]
        B = self.graph.num_graphs
        lengths = np.array([len(t) for t in texts], dtype=np.int64)
        ends = np.cumsum(lengths)
        if len(texts) != B or (ends[-1] if B else 0) != self.history.num_inputs:
            raise ValueError(f"texts must be the {B} input texts of {self.history.num_inputs} "
                             f"characters in all, got {len(texts)} of "
                             f"{int(ends[-1]) if len(texts) else 0}")
        # each text as long as its sequence (the total alone let a segment
        # span two sequences: found by a PyTorch-user helper)
        rows = np.diff(self.graph.graph_offsets)   # the relaxed graph's: the input rows
        if self.graph.num_nodes != self.history.num_inputs:   # the merged graph's
            rows = np.bincount(np.repeat(np.arange(B), rows)[self.history.cluster],
                               minlength=B)
        if (rows != lengths).any():
            b = int(np.flatnonzero(rows != lengths)[0])
            raise ValueError(f"texts[{b}] has {lengths[b]} characters, its sequence "
                             f"{rows[b]} input rows")
        pieces = self.history.segments("".join(texts))
        # outputs are numbered sequence by sequence: each one's by its head
        counts = np.bincount(np.searchsorted(ends, self.history.heads, side="right"),
                             minlength=B)
        bounds = np.concatenate(([0], np.cumsum(counts))).tolist()
        return [pieces[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    @_eager
    def reinforce_loss(self, losses):
        """The score-function surrogate ``mean_b (L_b - b_b) log P_b``
        (``Reinforce``): add it to the objective, whose gradient it then
        completes. ``losses`` (B,) are the per-sequence losses; they are
        detached. 0 for the other estimators."""
        values = as_float_array(_array(losses, "losses"), "losses",
                                shape=(self.graph.num_graphs,))
        advantage = self._morphed.advantage(values)
        if advantage is None:   # the other estimators ignore them
            return self.log_prob.sum() * 0.0
        weight = torch.from_numpy(advantage / advantage.shape[0]).to(self.log_prob.dtype)
        return (weight * self.log_prob).sum()

    def _as_tuple(self):
        return self.features, self.unpool, self.aux_loss

    def __iter__(self):
        return iter(self._as_tuple())

    def __len__(self):
        return 3

    def __getitem__(self, index):
        return self._as_tuple()[index]

    def __repr__(self):
        return (f"Merged({self.history.num_inputs} -> {self.features.shape[0]} rows, "
                f"{self.graph.num_graphs} sequences)")


def _drawing_from_torch(morpher):
    """A copy of ``morpher`` for one call, its ``Reinforce`` estimator's
    stream starting at a seed drawn from torch's generator (the baseline
    and settings shared). Found by a PyTorch-user helper: every call between
    two steps read the one stream by position, and every alias-made
    Reinforce had seed 0, so two calls (one module on two inputs, or two
    modules) made their decisions with one coin, biasing the gradient of a
    loss coupling them; a stream moved by each call (tried next) broke
    ``torch.utils.checkpoint``, whose second forward drew anew, and shared
    draws between threads. Nothing shared is written here."""
    call = copy.copy(morpher)
    call.estimator = morpher.estimator._drawing_from(int(torch.randint(0, 2 ** 62, ()).item()))
    return call


def _morph_setting(name):
    """A property of :class:`Merge` that is its numpy morpher's setting
    ``name``, checked on assignment (a refused value leaves the old one)."""
    def get(self):
        return getattr(self._morpher, name)

    def set(self, value):
        if isinstance(value, torch.Tensor) and value.numel() == 1 and name == "temperature":
            if value.requires_grad:   # .item() dropped its gradient, unsaid (a helper's find)
                raise TypeError("temperature is a setting, not a learnable parameter: got a "
                                "tensor that requires grad, whose gradient would be dropped; "
                                "assign a float or a tensor without grad (a schedule's)")
            value = value.item()   # an annealing schedule's tensor, as Merge(threshold=) takes one
        morpher = self._morpher
        old = getattr(morpher, name)
        setattr(morpher, name, value)
        try:
            morpher._validate()
        except (TypeError, ValueError):
            setattr(morpher, name, old)
            raise
    return property(get, set, doc=f"The merge's {name}, as :class:`grapheme.Morpher` "
                                  f"takes it (checked as it is assigned).")


class Merge(nn.Module):
    """Learned merging of neighbouring rows of packed sequences.

    Rows ``u, v`` adjacent in a sequence merge when the cosine of their
    features exceeds ``tau = sigmoid(theta)``; ``theta`` is an
    ``nn.Parameter``. The estimator decides the forward pass and the
    gradient the decisions pass back (:mod:`grapheme.estimators`).

    Parameters
    ----------
    threshold : float, default 0.8
        Initial ``theta``.
    temperature : float, default 0.1
    estimator : Estimator or str, default "ste"
        ``"ste"`` (hard forward, the relaxation's gradient: ``theta``
        learns), ``"soft"``, ``"history"`` (exact, but ``theta`` gets no
        gradient from the loss) or ``"reinforce"`` (add
        :meth:`Merged.reinforce_loss` to the objective).
    rate : RateController or float, optional
        Target kept fraction; its penalty is ``aux_loss``.
    device, dtype : optional
        Of ``theta``, as torch's modules take them (default: torch's
        default dtype). For a float64 model pass ``dtype=torch.float64``:
        ``Merge(0.8).double()`` converts the float32-rounded 0.8
        (0.800000011920929), as ``.double()`` does with any parameter.

    Notes
    -----
    Call :meth:`step` after every optimiser step: it moves the rate
    controller and the ``Reinforce`` baseline. The state that :meth:`step`
    changes is saved by ``state_dict`` (as extra state).

    ``.train()`` and ``.eval()`` change nothing: the estimator decides the
    forward pass in both (``reinforce`` samples, ``soft`` and ``ste`` return
    relaxed rows, under ``torch.no_grad`` too). For deterministic hard
    segments at inference use ``estimator="history"``, or
    :meth:`Merged.segments` and :attr:`Merged.history`, which are the hard
    merge's for every estimator. ``Reinforce`` draws its decisions from
    torch's generator, afresh on every call, evaluation included: so
    ``torch.manual_seed`` governs them, ``torch.utils.checkpoint`` and
    ``torch.random.fork_rng`` see the same draws again, and two calls (two
    modules, or one module on two inputs) are independent samples. Its own
    ``seed`` and stream are the numpy ``Trainer``'s, unused here.

    ``state_dict`` holds ``theta`` and the state :meth:`step` moves, not the
    settings (``temperature``, the estimator's and rate controller's
    options), as torch's modules save no constructor argument: restore an
    annealed ``temperature`` with your schedule. A state of a ``Merge``
    with another estimator, or with a rate controller where this one has
    none (or the reverse), is refused, ``strict=False`` too (the extra
    state is the module's to read): load ``{"theta": state["theta"]}``
    with ``strict=False`` to take the threshold alone.
    """

    def __init__(self, threshold=0.8, temperature=0.1, estimator="ste", rate=None, *,
                 device=None, dtype=None):
        """A merge module; the parameters are described in ``help(Merge)``."""
        super().__init__()
        # the numpy morph this module runs (it checks the settings and holds
        # the estimator's and the rate controller's state); its theta is
        # unused: each call runs a copy with the parameter's
        if isinstance(threshold, torch.Tensor) and threshold.numel() == 1:
            threshold = threshold.item()   # as a parameter's initial value is often given
        self._morpher = Morpher(threshold, temperature, estimator, rate)
        self.theta = nn.Parameter(torch.tensor(self._morpher.threshold,
                                               **_factory(device, dtype)))

    # The settings are the numpy morph's: one set to anneal (``temperature``)
    # is what the next forward uses, checked (and an alias made an
    # Estimator) as it is assigned.
    temperature = _morph_setting("temperature")
    estimator = _morph_setting("estimator")
    rate = _morph_setting("rate")

    @property
    def tau(self):
        """The threshold ``sigmoid(theta)`` on the cosine, as a float."""
        return float(torch.sigmoid(self.theta.detach()))

    @_eager
    def forward(self, x, offsets, labels=None, queries=None, keys=None):
        """Merge the rows of ``x`` (n, d), sequences by ``offsets`` (B + 1,).

        ``labels`` (n,), optional integers in 0..0x10FFFF (code points, or
        any ids in that range), name the rows for the structural loss (a
        merged row keeps its first row's label); by default 0 for every
        row, so a loss whose label weight is not 0 sees every row alike:
        pass the code points of a text's characters (``labels=codes``) to
        score labels as the numpy API does. To train a segmentation, label each
        row by its offset in its own sequence instead, as the numpy
        ``Trainer`` does (:func:`grapheme.segmentation_target`, Notes).
        With ``queries`` and ``keys`` (n, d_route), e.g. from
        :class:`Encoder`, the merge score of rows ``u, u + 1`` is
        ``cos(queries[u], keys[u+1])``. Returns a :class:`Merged`.
        """
        _check_tensor(x, "x")
        _on_cpu(x, "x")
        for name, t in (("queries", queries), ("keys", keys)):
            if t is not None:
                _check_tensor(t, name)
                _on_cpu(t, name)
                if t.dtype != x.dtype:   # the morph runs in x's: it cast them silently
                    raise TypeError(f"{name} must have x's dtype {x.dtype}, got {t.dtype}")
        graph = _chains(x, offsets, labels)
        if (queries is None) != (keys is None):
            raise ValueError("queries and keys go together: give both or neither")
        _on_cpu(self.theta, "Merge.theta")   # a module made with device="meta"
        if self.theta.numel() != 1:   # an assigned one; .item() would say less
            raise ValueError(f"Merge.theta must hold one number, got shape "
                             f"{tuple(self.theta.shape)}")
        theta = self.theta.item()
        if not math.isfinite(theta):   # each estimator failed its own way
            raise ValueError(f"Merge.theta is not finite ({theta}): a diverged step or a "
                             f"bad state_dict")
        morpher = self._morpher
        if self.estimator.draws:
            morpher = _drawing_from_torch(morpher)
        op = _MorphOp(morpher, graph, queries is not None)
        inputs = (x, self.theta.to(x.dtype)) + (() if queries is None else (queries, keys))
        (f, mass, w, lp, aux), out = apply(op, op.forward, *inputs)
        merged = Merged(f, mass, w, lp, aux, out.morphed)
        merged._made_by = weakref.ref(self)
        return merged

    @_eager
    def step(self, merged, losses=None, *, kept_fraction=None):
        """Advance the estimator and rate controller after an optimiser step.

        ``merged``: this step's :class:`Merged`. ``losses`` (B,), optional:
        the per-sequence losses (detached), as given to
        :meth:`Merged.reinforce_loss`; ``Reinforce`` folds them into its
        running-mean baseline, which without them stays where it is (0 at
        the start: no baseline). The other estimators ignore them.

        ``kept_fraction``: the kept fraction the rate controller takes
        instead of ``merged``'s own. Under ``DistributedDataParallel`` pass
        the global batch's, the same on every rank, or each rank's
        controller follows its own shard and their penalties drift apart
        (README, "From PyTorch")."""
        _check_merged(merged)
        if merged._made_by is not None and merged._made_by() is not self:
            # its estimator state and kept fraction are another module's
            raise ValueError("merged was made by another Merge module: step the module that "
                             "made it")
        if kept_fraction is not None:
            if isinstance(kept_fraction, torch.Tensor) and kept_fraction.numel() == 1:
                kept_fraction = kept_fraction.item()   # e.g. all-reduced counts' ratio
            kept_fraction = check_scalar(kept_fraction, "kept_fraction", lower=0, upper=1)
        try:
            self._morpher.step(merged._morphed,
                               None if losses is None else _array(losses, "losses"),
                               kept_fraction=kept_fraction)
        except (TypeError, ValueError) as exc:   # named as here (Morpher.step's loss_values)
            if "loss_values" not in str(exc):
                raise
            raise type(exc)(str(exc).replace("loss_values", "losses")) from None

    def get_extra_state(self):
        return {"estimator": self.estimator.state_dict(),
                "estimator_type": type(self.estimator).__name__,
                "rate": None if self.rate is None else self.rate.state_dict()}

    def set_extra_state(self, state):
        # a state of another estimator, or with or without a rate controller
        # this one lacks or has, is refused (found by a PyTorch-user helper:
        # some loaded silently); a state saved before the estimator's type
        # was recorded is taken as its own
        kind = state.get("estimator_type", type(self.estimator).__name__)
        if kind != type(self.estimator).__name__:
            raise ValueError(f"the state is of a Merge with estimator {kind}, this one "
                             f"has {type(self.estimator).__name__}")
        if (state.get("rate") is None) != (self.rate is None):
            raise ValueError("the state is of a Merge " + ("without" if self.rate is not None
                                                            else "with") +
                             " a rate controller, this one " +
                             ("has one" if self.rate is not None else "has none"))
        self.estimator.load_state_dict(state["estimator"])
        if self.rate is not None:
            self.rate.load_state_dict(state["rate"])

    def extra_repr(self):
        return (f"temperature={self.temperature}, estimator={self.estimator!r}, "
                f"rate={self.rate!r}")


class Encoder(nn.Module):
    """Context before the merge (:class:`grapheme.Encoder` as a module).

    ``layers`` residual message-passing layers over each sequence's chain,
    then the routing projections; every layer weight starts at zero and the
    projections at the identity, so an untrained encoder is the identity.
    ``forward(x, offsets) -> (features, queries, keys)``, to pass on as
    ``merge(features, offsets, labels, queries, keys)``. The products run
    in ``x``'s dtype (float32 or float64), under autocast too: weights of
    another dtype are cast to it, where ``nn.Linear`` would raise, and
    their gradients come back in the weights' own dtype (as :class:`Merge`
    does with its ``theta``). ``device=`` and ``dtype=`` place the
    parameters, as torch's modules take them. They are the numpy encoder's
    ``params``: ``layers[l].w_self``, ``w_pred``, ``w_succ`` and ``bias``
    are its ``"layer{l}.self"``, ``".pred"``, ``".succ"`` and ``".bias"``,
    ``query`` and ``key`` its ``"query"`` and ``"key"``.
    """

    def __init__(self, dim, layers=2, *, device=None, dtype=None):
        """An identity encoder of ``layers`` layers over rows of ``dim``
        features (``help(Encoder)``)."""
        super().__init__()
        dim = check_scalar(dim, "dim", lower=1, integer=True)
        layers = check_scalar(layers, "layers", lower=0, integer=True)
        where = _factory(device, dtype)
        self.layers = nn.ModuleList()
        for _ in range(layers):
            layer = nn.Module()
            for name in ("w_self", "w_pred", "w_succ"):
                layer.register_parameter(name, nn.Parameter(torch.zeros(dim, dim, **where)))
            layer.register_parameter("bias", nn.Parameter(torch.zeros(dim, **where)))
            self.layers.append(layer)
        self.query = nn.Parameter(torch.eye(dim, **where))
        self.key = nn.Parameter(torch.eye(dim, **where))

    def extra_repr(self):
        return f"dim={self.query.shape[0]}, layers={len(self.layers)}"

    @_eager
    def forward(self, x, offsets):
        """``(features, queries, keys)``, each (n, dim) in ``x``'s dtype, of
        the rows of ``x`` (n, dim), sequences by ``offsets`` (B + 1,)."""
        _check_tensor(x, "x")
        _on_cpu(x, "x")
        for name, p in self.named_parameters():   # a module made with device="meta"
            _on_cpu(p, f"Encoder.{name}")
        graph = _chains(x, offsets, dim=self.query.shape[0])
        h = x
        for layer in self.layers:
            h = message_passing(graph, h, layer.w_self.to(x.dtype), layer.w_pred.to(x.dtype),
                                layer.w_succ.to(x.dtype), layer.bias.to(x.dtype))
        # in x's dtype under autocast too: the merge takes float32 or float64
        # queries and keys, and the features beside them are in x's dtype
        # (found by a PyTorch-user helper: bfloat16 projections were refused)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return h, h @ self.query.to(x.dtype), h @ self.key.to(x.dtype)


class StructuralLoss(nn.Module):
    """The structural loss (:class:`grapheme.StructuralLoss`) as a module.

    ``forward(merged, target, target_activation=None)``: the loss of every
    merged sequence against the graph of the same index in ``target`` (a
    batched :class:`grapheme.Graph`, e.g. ``Graph.from_texts``). The merged
    rows' activations are their feature means; the target's are
    ``target_activation`` (a tensor, differentiable) or the graph's own
    (1 for every node of ``Graph.from_texts``: the merged rows' feature
    means are then pulled towards 1; pass the mean features of the target's
    segments to compare like with like, as the numpy ``Trainer`` does).

    Parameters
    ----------
    reduction : {"mean", "sum", "none"}, default "mean"
    **kwargs
        Passed to :class:`grapheme.StructuralLoss`.
    """

    @classmethod
    def for_training(cls, reduction="mean", **overrides):
        """The weights the numpy ``Trainer`` and ``grapheme train`` use
        (:meth:`grapheme.StructuralLoss.for_training`)."""
        return cls(reduction, **{**TRAINING, **overrides})

    def __init__(self, reduction="mean", **kwargs):
        """The loss module; the parameters are described in
        ``help(StructuralLoss)``."""
        super().__init__()
        self.reduction = _check_reduction(reduction)
        self.loss = _Loss(**kwargs)

    @_eager
    def forward(self, merged, target, target_activation=None):
        """The loss of ``merged`` (a :class:`Merged` of B sequences) against
        ``target`` (a batch of B graphs) and, optionally, its activations
        ``target_activation`` (target.num_nodes,). Returns a scalar tensor,
        or one value per sequence (B,) under ``reduction="none"``."""
        _check_reduction(self.reduction)   # as set on the module since, if it was
        _check_merged(merged)
        check_graph(target, "target")
        if merged.graph.num_graphs == 0 == target.num_graphs:   # an empty micro-batch
            if self.reduction == "mean":
                raise ValueError("an empty batch (0 sequences) has no mean loss "
                                 "(reduction='sum' gives 0, 'none' an empty tensor)")
            values = merged.features.sum(dim=1)   # shape (0,), on the autograd graph
            return values.sum() if self.reduction == "sum" else values
        dtype = merged.features.dtype
        (activation,), _ = apply(ops.FeatureMean(), ops.FeatureMean().forward,
                                 merged.features)
        if target_activation is None:
            target_activation = _tensor(target.activation, dtype)
        values = structural_loss(self.loss, merged.graph, target, activation, merged.mass,
                                 merged.weights, target_activation)
        if self.reduction == "mean":
            return values.mean()
        if self.reduction == "sum":
            return values.sum()
        return values

    def extra_repr(self):
        return f"reduction={self.reduction!r}, loss={self.loss!r}"


def _check_reduction(reduction):
    if not isinstance(reduction, str):
        raise TypeError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    return reduction


# ------------------------------------------------------------------ packing
def _integers(values, name):
    """``values`` (a tensor, array or sequence of integers) as an int64
    tensor; floats are refused, not truncated."""
    t = torch.as_tensor(values)
    _not_meta(t, name)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers, got {t.dtype}")
    return t.to(torch.int64)


def pack(padded, lengths):
    """Padded ``(B, L, ...)`` rows and their ``lengths`` (B,) to packed rows
    ``(sum(lengths), ...)`` and ``offsets`` (B + 1,). Differentiable.

    Examples
    --------
    >>> import torch
    >>> x, offsets = pack(torch.arange(6.0).reshape(2, 3, 1), torch.tensor([2, 3]))
    >>> x.flatten().tolist(), offsets.tolist()
    ([0.0, 1.0, 3.0, 4.0, 5.0], [0, 2, 5])
    """
    if not isinstance(padded, torch.Tensor):
        raise TypeError(f"padded must be a tensor, got {type(padded).__name__}")
    if padded.ndim < 2:
        raise ValueError(f"padded must be (B, L, ...), got shape {tuple(padded.shape)}")
    lengths = _integers(lengths, "lengths")
    if lengths.shape != (padded.shape[0],):
        raise ValueError(f"lengths must have shape ({padded.shape[0]},), got "
                         f"{tuple(lengths.shape)}")
    if (lengths < 0).any() or (lengths > padded.shape[1]).any():
        raise ValueError(f"lengths must lie in [0, {padded.shape[1]}]")
    mask = torch.arange(padded.shape[1])[None, :] < lengths[:, None]
    offsets = torch.zeros(lengths.shape[0] + 1, dtype=torch.int64)
    torch.cumsum(lengths, 0, out=offsets[1:])
    return padded[mask], offsets


def unpack(packed, offsets, total_length=None):
    """Packed rows and ``offsets`` back to padded ``(B, L, ...)`` (zeros
    after each sequence), ``L = total_length`` or the longest. Differentiable.

    Examples
    --------
    >>> import torch
    >>> unpack(torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([0, 1, 3])).squeeze(-1)
    tensor([[1., 0.],
            [2., 3.]])
    """
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"packed must be a tensor, got {type(packed).__name__}")
    if packed.ndim < 1:
        raise ValueError(f"packed must be (n, ...), got shape {tuple(packed.shape)}")
    offsets = _integers(offsets, "offsets")
    if offsets.ndim != 1 or offsets.shape[0] < 1:
        raise ValueError(f"offsets must be 1-d with B + 1 >= 1 entries, got shape "
                         f"{tuple(offsets.shape)}")
    if (offsets[0] != 0 or (offsets[1:] < offsets[:-1]).any()   # compared: no wrap
            or offsets[-1] != packed.shape[0]):
        raise ValueError("offsets must run from 0 to len(packed), non-decreasing")
    lengths = offsets[1:] - offsets[:-1]
    L = int(lengths.max()) if lengths.numel() else 0
    if total_length is not None:
        if isinstance(total_length, torch.Tensor) and total_length.ndim == 0 and not (
                total_length.is_floating_point() or total_length.is_complex()):
            total_length = int(total_length)   # e.g. lengths.max()
        L = check_scalar(total_length, "total_length", lower=L, integer=True)
    # the padded tensor and the mask, refused up front as grapheme refuses
    # what cannot fit (torch's allocator error named no argument)
    row = math.prod(packed.shape[1:]) * packed.element_size()
    check_allocation((row + 1) * lengths.shape[0] * L,
                     f"unpack to {lengths.shape[0]} x {L} rows (total_length)")
    out = packed.new_zeros((lengths.shape[0], L) + tuple(packed.shape[1:]))
    mask = torch.arange(L)[None, :] < lengths[:, None]
    # also when packed is empty: returning the zeros cut the graph (a
    # PyTorch-user helper's find)
    return out.masked_scatter(mask.reshape(mask.shape + (1,) * (packed.ndim - 1)).expand_as(out),
                              packed)

