"""First-order optimisers over named parameter arrays.

The optimisers here update plain NumPy arrays in place. Parameters and their
gradients are passed to :meth:`Optimizer.step` as two dictionaries keyed by
name, and the optimiser keeps its state (moments, step counts) under the same
names. Two properties matter for grapheme's models:

* A parameter may **grow along axis 0** between steps: the embedding table
  gains a row whenever a new code point appears. The state of the old rows is
  kept and the new rows start with zero state, exactly as if they had been
  present all along with zero gradient (for Adam's moments and SGD's momentum
  buffer this is the same thing), and, with ``weight_decay``, as if their
  values had been what they are now (rows present all along would have
  decayed).
* The state round-trips through :meth:`Optimizer.state_dict` /
  :meth:`Optimizer.load_state_dict` as a flat dictionary of arrays and numbers,
  so it can be stored in a pickle-free ``.npz`` checkpoint.
"""

import numpy as np

from ._validation import check_scalar, settings_checked, settings_unchanged, show

__all__ = ["Optimizer", "Adam", "SGD"]


class Optimizer:
    """Base class: named state, growth along axis 0, validation, state dicts.

    Subclasses list the names of their per-parameter state arrays in
    ``_slots`` and their hyperparameters in ``_hyper``, and implement
    :meth:`_next`, which computes a step without applying it: a step
    whose numbers overflow changes nothing (every parameter's new values
    are computed before any is written).

    Not safe to share between threads: :meth:`step` writes the parameters in
    place and replaces the state's arrays (numpy operations only, so
    concurrent use gives wrong numbers, never a crash). Computing every new
    value before writing any costs a copy of the parameters and their state
    for the step's length, and allocations: Adam's step on the 34,369
    parameters of a 2-layer model at d = 64 took 316 us where in place it
    took 270 us, 0.2% of its training step on 256 word pairs (26 ms;
    medians, measured one after the other on 2 cores).
    """

    _slots = ()
    #: slots whose entries are never negative (a second moment)
    _nonnegative = ()
    _hyper = ()

    def __init__(self):
        self._steps = {}
        self._state = {slot: {} for slot in self._slots}

    # -- public API ---------------------------------------------------------
    def step(self, params, grads):
        """Apply one update to every parameter, in place.

        Parameters
        ----------
        params : dict of str to ndarray
            Parameter arrays, float64 or float32, writeable. Updated in place,
            in their own dtype (a float32 parameter's state is float32 too).
        grads : dict of str to ndarray
            Gradient of the objective for each parameter: the same keys as
            ``params`` and arrays of the same shapes, all finite.

        Raises
        ------
        TypeError
            If ``params`` or ``grads`` is not a dict, or a parameter is not a
            float64 or float32 ndarray.
        ValueError
            If the keys differ, a gradient's shape differs from its
            parameter's, a gradient is not finite, a parameter is read-only,
            or a parameter changed shape other than by growing along axis 0;
            or (also TypeError) a hyperparameter assigned since the
            construction is not valid (naming it).
        FloatingPointError
            If the step would take a parameter or its state beyond its dtype
            (by ``lr``, momentum or weight decay: a diverged run); then no
            parameter or state is changed.
        """
        self._check_settings()
        self._validate(params, grads)
        steps = []
        for name in params:
            p = params[name]
            g = np.asarray(grads[name], dtype=p.dtype)
            state = self._prepared_state(name, p)
            t = self._steps.get(name, 0) + 1
            # a gradient within _grad_limit still overflows by lr, momentum
            # or weight decay: refuse the step before it writes anything
            try:
                with np.errstate(over="raise", invalid="raise"):
                    new_p, new_state = self._next(p, g, t, state)
            except FloatingPointError:
                raise FloatingPointError(
                    f"the step of params[{name!r}] overflows {p.dtype} "
                    f"({self!r}): {self._diverged_advice(p.dtype)}; no parameter "
                    "was changed") from None
            steps.append((name, t, new_p, {**state, **new_state}))
        for name, t, new_p, state in steps:
            params[name][...] = new_p
            for slot, arr in state.items():
                self._state[slot][name] = arr
            self._steps[name] = t

    def _check_settings(self):
        """The hyperparameters as set now (a learning-rate schedule assigns
        ``lr``), checked if one changed since the last check, naming it."""
        if settings_unchanged(self, self._hyper):
            return
        for h, v in type(self)._check_hyper(**{h: getattr(self, h)
                                               for h in self._hyper}).items():
            setattr(self, h, v)
        settings_checked(self, self._hyper)

    def state_dict(self):
        """Return the optimiser state as a flat dict of arrays and numbers.

        Keys are ``"<slot>.<name>"`` for state arrays, ``"step.<name>"`` for
        per-parameter step counts (int) and the hyperparameter names for the
        hyperparameters (float). The arrays are copies.

        Returns
        -------
        state : dict of str to ndarray, int or float
        """
        out = {h: float(getattr(self, h)) for h in self._hyper}
        for name, t in self._steps.items():
            out[f"step.{name}"] = int(t)
        for slot, arrays in self._state.items():
            for name, arr in arrays.items():
                out[f"{slot}.{name}"] = arr.copy()
        return out

    def load_state_dict(self, state):
        """Restore state produced by :meth:`state_dict`.

        Hyperparameters are restored as well, so a resumed run continues with
        exactly the settings it was saved with.

        Parameters
        ----------
        state : mapping of str to ndarray, int or float
            As returned by :meth:`state_dict` (possibly after a round trip
            through ``np.savez``/``np.load``, which turns numbers into 0-d
            arrays).

        Raises
        ------
        ValueError
            If a key is unknown, a hyperparameter is missing or invalid, or
            a state array has no step count.
        """
        try:
            items = dict(state)
        except (TypeError, ValueError):
            raise TypeError(
                f"state must be a mapping, got {type(state).__name__}") from None
        hyper = {}
        steps = {}
        arrays = {slot: {} for slot in self._slots}
        for key, value in items.items():
            if not isinstance(key, str):
                raise ValueError(f"state: key {key!r} is not a string")
            if key in self._hyper:
                try:
                    hyper[key] = np.asarray(value).item()
                except (TypeError, ValueError, OverflowError):
                    raise ValueError(f"state: {key!r} must be a number, got "
                                     f"{type(value).__name__}") from None
                continue
            slot, dot, name = key.partition(".")
            if not dot or not name:
                raise ValueError(f"state: unknown key {key!r}")
            if slot == "step":
                t = np.asarray(value)
                if t.ndim != 0 or t.dtype.kind not in "iu" or int(t) < 0:
                    raise ValueError(
                        f"state: {key!r} must be a non-negative integer, got {show(value)}")
                steps[name] = int(t)
            elif slot in arrays:
                arr = np.asarray(value)
                if arr.dtype.kind != "f":
                    raise ValueError(f"state: {key!r} must be a float array")
                if not np.isfinite(arr).all():
                    raise ValueError(f"state: {key!r} contains NaN or infinity")
                if slot in self._nonnegative and (arr < 0).any():
                    raise ValueError(f"state: {key!r} has negative entries (a second "
                                     "moment is never negative)")
                # float32 state (a float32 model's) stays float32
                keep = arr.dtype if arr.dtype == np.float32 else np.float64
                arrays[slot][name] = np.array(arr, dtype=keep, copy=True)
            else:
                raise ValueError(f"state: unknown key {key!r}")
        missing = [h for h in self._hyper if h not in hyper]
        if missing:
            raise ValueError(f"state: missing hyperparameter(s) {missing}")
        for slot, named in arrays.items():
            for name, arr in named.items():
                if name not in steps:
                    raise ValueError(f"state: {slot}.{name!s} has no step.{name!s}")
                for other in self._slots:
                    if name in arrays[other] and arrays[other][name].shape != arr.shape:
                        raise ValueError(
                            f"state: {slot}.{name} and {other}.{name} differ in shape")
        # Validate the hyperparameters through the constructor's checks.
        checked = type(self)._check_hyper(**hyper)
        for h, v in checked.items():
            setattr(self, h, v)
        self._steps = steps
        self._state = arrays

    # -- internals ----------------------------------------------------------
    @staticmethod
    def _check_hyper(**kwargs):  # pragma: no cover - overridden
        return kwargs

    def _validate(self, params, grads):
        if not isinstance(params, dict):
            raise TypeError(f"params must be a dict, got {type(params).__name__}")
        if not isinstance(grads, dict):
            raise TypeError(f"grads must be a dict, got {type(grads).__name__}")
        if set(params) != set(grads):
            raise ValueError(
                f"params and grads must have the same keys, got "
                f"{sorted(map(str, params))} and {sorted(map(str, grads))}")
        for name, p in params.items():
            if not isinstance(name, str):
                raise TypeError(f"params: names must be str, got {name!r}")
            if not isinstance(p, np.ndarray) or p.dtype not in (np.float64, np.float32):
                raise TypeError(
                    f"params[{name!r}] must be a float64 or float32 ndarray, got "
                    f"{getattr(p, 'dtype', type(p).__name__)}")
            if not p.flags.writeable:
                raise ValueError(f"params[{name!r}] is read-only")
            g = grads[name]
            if not isinstance(g, np.ndarray):
                raise TypeError(
                    f"grads[{name!r}] must be an ndarray, got {type(g).__name__}")
            if g.dtype.kind not in "fiu":
                raise TypeError(
                    f"grads[{name!r}] must have a real dtype, got {g.dtype}")
            if g.shape != p.shape:
                raise ValueError(
                    f"grads[{name!r}] has shape {g.shape}, expected {p.shape}")
            # NaN fails the comparison too. A finite float64 gradient beyond
            # float32 made a float32 parameter NaN, and one whose square
            # overflows froze Adam's (a numerical review's find). max and
            # -min, not abs: no copy of g
            limit = self._grad_limit(p.dtype)
            largest = max(float(g.max()), -float(g.min())) if g.size else 0.0
            if not largest <= limit:
                if not np.isfinite(largest):
                    raise ValueError(f"grads[{name!r}] contains NaN or infinity")
                raise ValueError(
                    f"grads[{name!r}] has a value of magnitude {largest:.3g}, beyond "
                    f"{limit:.3g}, the most {type(self).__name__} can take for a {p.dtype} "
                    f"parameter: {self._diverged_advice(p.dtype)}")
            for slot in self._slots:
                old = self._state[slot].get(name)
                if old is None or old.shape == p.shape:
                    continue
                if (p.ndim == 0 or old.ndim != p.ndim or old.shape[1:] != p.shape[1:]
                        or p.shape[0] < old.shape[0]):
                    raise ValueError(
                        f"params[{name!r}] changed shape from {old.shape} to "
                        f"{p.shape}; only growth along axis 0 is supported")

    def _diverged_advice(self, dtype):
        lower = "lr or weight_decay" if getattr(self, "weight_decay", 0) else "lr"
        return (f"a diverged step? lower {lower}, clip the gradients, or train in float64"
                if dtype == np.float32 else
                f"a diverged step? lower {lower} or clip the gradients")

    def _grad_limit(self, dtype):
        """The largest gradient magnitude a ``dtype`` parameter takes."""
        return float(np.finfo(dtype).max)

    def _prepared_state(self, name, p):
        """The state slots of ``p`` as a dict: zeros for a new parameter,
        zero-padded for a grown one (new arrays, stored once the step is
        taken), the stored arrays otherwise."""
        state = {}
        for slot in self._slots:
            old = self._state[slot].get(name)
            if old is None:
                old = np.zeros(p.shape, dtype=p.dtype)
            elif old.shape != p.shape or old.dtype != p.dtype:
                new = np.zeros(p.shape, dtype=p.dtype)
                new[: old.shape[0]] = old
                old = new
            state[slot] = old
        return state

    def _next(self, p, g, t, state):  # pragma: no cover - abstract
        """The new value of ``p`` and of the slots of ``state`` it changes
        (a dict), as new arrays, after step ``t`` with gradient ``g``;
        writes nothing."""
        raise NotImplementedError

    def __repr__(self):
        args = ", ".join(f"{h}={getattr(self, h)!r}" for h in self._hyper)
        return f"{type(self).__name__}({args})"


class Adam(Optimizer):
    """Adam (Kingma & Ba, 2015) with bias correction and optional L2 decay.

    For a parameter ``p`` with gradient ``g`` at its ``t``-th step::

        g = g + weight_decay * p
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g**2
        p -= lr * (m / (1 - beta1**t)) / (sqrt(v / (1 - beta2**t)) + eps)

    the same update as ``torch.optim.Adam``. ``weight_decay`` is classic L2
    regularisation added to the gradient (not decoupled AdamW decay).

    Parameters
    ----------
    lr : float, default 1e-3
        Step size, > 0.
    betas : tuple of float, default (0.9, 0.999)
        Decay rates of the first and second moment estimates, each in [0, 1).
    eps : float, default 1e-8
        Added to the denominator for numerical stability, > 0.
    weight_decay : float, default 0.0
        L2 penalty coefficient, >= 0.

    Notes
    -----
    Step counts are kept per parameter. When a parameter grows along axis 0,
    its new rows get zero moments and share the parameter's step count, as if
    they had existed from the start with zero gradient.

    Examples
    --------
    >>> import numpy as np
    >>> from grapheme.optim import Adam
    >>> w = np.array([1.0, -2.0])
    >>> opt = Adam(lr=0.1)
    >>> opt.step({"w": w}, {"w": 2 * w})
    >>> w
    array([ 0.9, -1.9])
    """

    _slots = ("exp_avg", "exp_avg_sq")
    _nonnegative = ("exp_avg_sq",)
    _hyper = ("lr", "beta1", "beta2", "eps", "weight_decay")

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        try:
            beta1, beta2 = betas
        except (TypeError, ValueError):
            raise TypeError(f"betas must be a pair of floats, got {show(betas)}") from None
        checked = self._check_hyper(lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                                    weight_decay=weight_decay)
        super().__init__()
        for h, v in checked.items():
            setattr(self, h, v)

    @property
    def betas(self):
        """The pair ``(beta1, beta2)``."""
        return (self.beta1, self.beta2)

    @staticmethod
    def _check_hyper(lr, beta1, beta2, eps, weight_decay):
        return {
            "lr": check_scalar(lr, "lr", lower=0.0, lower_inclusive=False),
            "beta1": check_scalar(beta1, "betas[0]", lower=0.0, upper=1.0,
                                  upper_inclusive=False),
            "beta2": check_scalar(beta2, "betas[1]", lower=0.0, upper=1.0,
                                  upper_inclusive=False),
            "eps": check_scalar(eps, "eps", lower=0.0, lower_inclusive=False),
            "weight_decay": check_scalar(weight_decay, "weight_decay", lower=0.0),
        }

    def _grad_limit(self, dtype):
        # the second moment holds g^2: beyond this it is inf, and the step 0
        # from then on (1.3e154 in float64, 1.8e19 in float32)
        return float(np.sqrt(np.finfo(dtype).max))

    def _next(self, p, g, t, state):
        if self.weight_decay:
            g = g + self.weight_decay * p
        m = self.beta1 * state["exp_avg"]
        m += (1.0 - self.beta1) * g
        v = self.beta2 * state["exp_avg_sq"]
        v += (1.0 - self.beta2) * (g * g)
        bias1 = 1.0 - self.beta1 ** t
        bias2 = 1.0 - self.beta2 ** t
        denom = np.sqrt(v / bias2)
        denom += self.eps
        return p - (self.lr / bias1) * m / denom, {"exp_avg": m, "exp_avg_sq": v}

    def __repr__(self):
        return (f"Adam(lr={self.lr!r}, betas=({self.beta1!r}, {self.beta2!r}), "
                f"eps={self.eps!r}, weight_decay={self.weight_decay!r})")


class SGD(Optimizer):
    """Stochastic gradient descent with optional (heavy-ball) momentum.

    For a parameter ``p`` with gradient ``g``::

        g = g + weight_decay * p
        buf = momentum * buf + g      (buf starts at zero)
        p -= lr * buf

    which is plain gradient descent when ``momentum == 0``.

    Parameters
    ----------
    lr : float
        Step size, > 0.
    momentum : float, default 0.0
        Momentum factor in [0, 1).
    weight_decay : float, default 0.0
        L2 penalty coefficient, >= 0.

    Examples
    --------
    >>> import numpy as np
    >>> from grapheme.optim import SGD
    >>> w = np.array([1.0, -2.0])
    >>> SGD(lr=0.25).step({"w": w}, {"w": 2 * w})
    >>> w
    array([ 0.5, -1. ])
    """

    _slots = ("momentum_buffer",)
    _hyper = ("lr", "momentum", "weight_decay")

    def __init__(self, lr, momentum=0.0, weight_decay=0.0):
        checked = self._check_hyper(lr=lr, momentum=momentum, weight_decay=weight_decay)
        super().__init__()
        for h, v in checked.items():
            setattr(self, h, v)

    @staticmethod
    def _check_hyper(lr, momentum, weight_decay):
        return {
            "lr": check_scalar(lr, "lr", lower=0.0, lower_inclusive=False),
            "momentum": check_scalar(momentum, "momentum", lower=0.0, upper=1.0,
                                     upper_inclusive=False),
            "weight_decay": check_scalar(weight_decay, "weight_decay", lower=0.0),
        }

    def _next(self, p, g, t, state):
        if self.weight_decay:
            g = g + self.weight_decay * p
        if not self.momentum:
            return p - self.lr * g, {}
        buf = self.momentum * state["momentum_buffer"]
        buf += g
        return p - self.lr * buf, {"momentum_buffer": buf}
