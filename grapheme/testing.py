"""Finite-difference checks of analytic gradients."""
from dataclasses import dataclass

import numpy as np

from ._validation import as_float_array, check_scalar

__all__ = ["gradcheck", "numerical_gradient", "GradcheckResult"]


def numerical_gradient(f, x, eps=1e-6):
    """Central differences ``(f(x + eps e_i) - f(x - eps e_i)) / (2 eps)`` in float64.

    Parameters
    ----------
    f : callable
        Maps an array shaped like ``x`` to a real scalar.
    x : array_like of float
    eps : float, default 1e-6

    Returns
    -------
    ndarray shaped like ``x``

    Examples
    --------
    >>> numerical_gradient(lambda v: float((v ** 2).sum()), [1.0, -2.0]).round(6).tolist()
    [2.0, -4.0]
    """
    eps = check_scalar(eps, "eps", lower=0, lower_inclusive=False)
    if not callable(f):
        raise TypeError("f must be callable")
    x = as_float_array(x, "x").copy()
    grad = np.empty_like(x)
    flat, gflat = x.reshape(-1), grad.reshape(-1)
    for i in range(flat.shape[0]):
        keep = flat[i]
        flat[i] = keep + eps
        up = float(f(x))
        flat[i] = keep - eps
        down = float(f(x))
        flat[i] = keep
        gflat[i] = (up - down) / (2.0 * eps)
    return grad


@dataclass(frozen=True)
class GradcheckResult:
    """Outcome of :func:`gradcheck`."""

    ok: bool
    error: float          #: normwise relative error
    analytic: np.ndarray
    numerical: np.ndarray

    def __bool__(self):
        return self.ok


def gradcheck(f, x, eps=1e-6, rtol=1e-4):
    """Compare an analytic gradient with central differences.

    The error is normwise relative,
    ``max|num - ana| / max(max|num|, max|ana|)`` (0 when both vanish), so
    entries whose gradient is near zero do not make the check meaningless.

    Parameters
    ----------
    f : callable
        ``f(x) -> (value, grad)``: a real scalar and its gradient, shaped
        like ``x``.
    x : array_like of float
        The point (not modified).
    eps : float, default 1e-6
        Finite-difference step.
    rtol : float, default 1e-4
        Largest accepted error.

    Returns
    -------
    GradcheckResult
        Truthy when ``error <= rtol``.

    Examples
    --------
    >>> res = gradcheck(lambda v: ((v ** 3).sum(), 3 * v ** 2), [0.5, -1.5])
    >>> bool(res), res.error < 1e-8
    (True, True)
    """
    rtol = check_scalar(rtol, "rtol", lower=0)
    x = as_float_array(x, "x")
    if not callable(f):
        raise TypeError(f"f must be callable, got {type(f).__name__}")
    out = f(x.copy())
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise TypeError(f"f must return a pair (value, grad), got {type(out).__name__}"
                        + (f" of length {len(out)}" if isinstance(out, (tuple, list)) else ""))
    try:
        if isinstance(out[0], (str, bytes)):   # float() would parse "1.5"
            raise TypeError
        float(out[0])
    except (TypeError, ValueError):
        raise TypeError(f"f's value must be a real scalar, got {type(out[0]).__name__}"
                        ) from None
    analytic = np.asarray(out[1], dtype=np.float64)
    if analytic.shape != x.shape:
        raise ValueError(f"f returned a gradient of shape {analytic.shape}, "
                         f"x has shape {x.shape}")
    numerical = numerical_gradient(lambda v: f(v)[0], x, eps)
    scale = max(np.abs(numerical).max(initial=0.0), np.abs(analytic).max(initial=0.0))
    diff = np.abs(numerical - analytic).max(initial=0.0)
    error = 0.0 if scale == 0.0 else diff / scale
    return GradcheckResult(bool(error <= rtol), float(error), analytic, numerical)
