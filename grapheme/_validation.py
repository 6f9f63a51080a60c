"""Input validation shared by the public classes.

Everything that reaches a ``nogil`` kernel passes through here first, so a
bad argument gets a ``TypeError`` or ``ValueError`` that names it instead of
a crash or a silent truncation.
"""
import numbers
import operator
import os
import re

import numpy as np

from . import _core

__all__ = [
    "as_index_array",
    "as_float_array",
    "check_out",
    "streams",
    "check_scalar",
    "common_index_dtype",
    "check_pairs",
    "check_graph",
    "frozen",
    "check_allocation",
    "show",
    "check_upstream",
    "check_dtype",
    "KEEP",
]

#: ``as_float_array(..., dtype=KEEP)``: a float32 or float64 array keeps its
#: dtype, anything else becomes float64 (the (n, d) feature arrays, which
#: follow the model's dtype; see "float32" in docs/design.md).
KEEP = "keep"

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def _asarray(value, name, what):
    """``np.asarray(value)``; what numpy refuses (ragged lists, integers
    beyond every dtype) is a ``TypeError`` naming ``name``. A subclass is
    read as a plain array (``np.matrix`` stays 2-d under ``reshape(-1)``,
    which the kernels' signatures refuse); a masked array with a masked
    element is refused (its mask would be ignored)."""
    if isinstance(value, np.ndarray):
        if type(value) is np.ndarray:
            return value
        if isinstance(value, np.ma.MaskedArray) and np.ma.getmaskarray(value).any():
            raise TypeError(f"{name} must be {what}, got a masked array with masked "
                            f"elements, which would be read as their data: fill them "
                            f"(value.filled(...)) or pass the data")
        return value.view(np.ndarray)
    try:
        return np.asarray(value)
    except (TypeError, ValueError, OverflowError):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__} that numpy "
                        "cannot convert (ragged or out of range)") from None


def as_index_array(value, name, ndim=1):
    """Return ``value`` as a C-contiguous int32 or int64 array.

    Integer arrays of other widths are converted without loss (a value that
    does not fit int64 is rejected); anything non-integer is a ``TypeError``,
    booleans included: numpy reads a boolean index as a mask, and taken as
    the integers 0 and 1 it would select other rows than numpy's.
    """
    arr = _asarray(value, name, "an integer array")
    if arr.dtype == object or not np.issubdtype(arr.dtype, np.integer):
        if arr.size == 0 and arr.dtype == np.float64:
            arr = arr.astype(np.int64)  # np.asarray([]) is float64
        elif arr.dtype == bool:
            raise TypeError(f"{name} must be an integer array, got dtype bool (a mask: "
                            f"np.flatnonzero({name}) gives its indices)")
        else:
            raise TypeError(f"{name} must be an integer array, got dtype {arr.dtype}")
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-dimensional, got shape {arr.shape}")
    if arr.dtype not in (np.int32, np.int64):
        if arr.dtype == np.uint64 and arr.size and arr.max() > np.iinfo(np.int64).max:
            raise ValueError(f"{name} has values beyond the int64 range")
        arr = arr.astype(np.int64)
    return np.ascontiguousarray(arr)


def as_float_array(value, name, ndim=None, shape=None, finite=True, dtype=None):
    """Return ``value`` as a C-contiguous float array, checked: float64, or
    as ``dtype`` says (``KEEP``: float32 stays float32).

    Parameters
    ----------
    value : array_like
    name : str
        Argument name used in error messages.
    ndim : int, optional
        Required number of dimensions.
    shape : tuple, optional
        Required shape; ``None`` entries match any length.
    finite : bool
        Reject NaN and infinity.
    dtype : None, numpy.float32, numpy.float64 or KEEP
        The result's dtype: None is float64; :data:`KEEP` keeps a float32
        or float64 array's own and makes anything else float64.
    """
    arr = _asarray(value, name, "a real-valued array")
    if dtype is None:
        want = np.float64
    elif dtype is KEEP:
        want = arr.dtype if arr.dtype in _FLOATS else np.float64
    else:
        want = dtype
    # the common case (a C-contiguous array of the dtype) skips the dtype checks
    ready = arr.dtype == want and arr.flags.c_contiguous
    if not ready and (arr.dtype == object or not (
        np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    )):
        raise TypeError(f"{name} must be a real-valued array, got dtype {arr.dtype}")
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-dimensional, got shape {arr.shape}")
    if shape is not None:
        if len(shape) != arr.ndim or any(
            want is not None and want != got for want, got in zip(shape, arr.shape)
        ):
            dims = ["*" if s is None else str(s) for s in shape]
            want = "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"   # as tuples
            raise ValueError(f"{name} must have shape {want}, got {arr.shape}")
    scanned = False   # True: arr was scanned and is all finite
    if not ready:
        # np.asarray keeps 0-d arrays 0-d (ascontiguousarray would make them 1-d)
        if want == np.float32 and arr.dtype.itemsize > 4 and arr.dtype.kind == "f":
            arr, scanned = _to_float32(arr, name)
        else:
            arr = np.asarray(arr, dtype=want, order="C")
    if finite and not scanned and arr.size and not _core.all_finite(arr.reshape(-1)):
        raise ValueError(f"{name} contains NaN or infinity")
    return arr


def _to_float32(arr, name):
    """``(arr as C-contiguous float32, whether it is all finite)`` for a
    float64 (or wider) ``arr``, refusing finite values that would become
    infinite (magnitude beyond about 3.4e38): a float32 model must not turn
    a finite input into inf or NaN silently. The second scan runs only
    when the converted array is not all finite."""
    with np.errstate(over="ignore"):
        out = np.asarray(arr, dtype=np.float32, order="C")
    if not out.size or _core.all_finite(out.reshape(-1)):
        return out, True
    beyond = np.isinf(out) & np.isfinite(arr)
    if beyond.any():
        raise ValueError(f"{name} has finite values beyond float32's range (magnitude "
                         f"at most {np.finfo(np.float32).max:.4g}; got "
                         f"{show(float(arr[beyond].flat[0]))})")
    return out, False


def check_out(out, name, shape, inputs=None, dtype=np.float64):
    """Check a caller's output buffer: an ndarray a kernel can write as given.

    ``out`` must be a writeable, aligned, C-contiguous ndarray of ``dtype``
    (float64 unless the computation is float32) of
    exactly ``shape`` that overlaps none of the arrays in ``inputs`` (a dict
    ``{argument name: array}``; the error names the one it overlaps).
    Nothing is converted: a kernel writes into ``out`` itself, as numpy's
    ``out=`` does.
    """
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(out).__name__}")
    if out.dtype != dtype:
        raise TypeError(f"{name} must have dtype {np.dtype(dtype).name}, got {out.dtype}")
    if out.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {out.shape}")
    flags = out.flags
    if not (flags.c_contiguous and flags.aligned):
        raise ValueError(f"{name} must be C-contiguous and aligned")
    # overlap first: it says more than "read-only" when out is an input
    for other, arr in (inputs or {}).items():
        if np.may_share_memory(out, arr):
            raise ValueError(f"{name} must not overlap {other}")
    if not flags.writeable:
        raise ValueError(f"{name} is read-only")
    return out


def streams(out):
    """Whether a kernel should write ``out``, a caller's ``out=`` buffer, with
    streaming stores: when it holds at least ``_core.STREAM_MIN_BYTES`` (read
    at call time). The policy is explained beside gather/scatter in
    ``_core.pyx``; a fresh result never streams."""
    return out.nbytes >= _core.STREAM_MIN_BYTES


def common_index_dtype(*arrays):
    """int64 if any array is int64, else int32."""
    return np.int64 if any(a.dtype == np.int64 for a in arrays) else np.int32


def show(value):
    """A one-line, bounded ``repr(value)`` for an error message.

    Never fails (an integer too long for ``repr`` is described by its
    length, a failing ``__repr__`` by the type), never spans lines (numpy
    prints arrays over several) and never runs past 80 characters.
    """
    if (isinstance(value, numbers.Integral) and not isinstance(value, bool)
            and abs(int(value)).bit_length() > 200):
        digits = int(abs(int(value)).bit_length() * 0.30103) + 1
        return f"{'-' if value < 0 else ''}an integer of about {digits} digits"
    try:
        text = repr(value)
    except Exception:
        return f"<{type(value).__name__}>"
    text = " ".join(text.split())
    return text if len(text) <= 80 else text[:77] + "..."


def check_scalar(value, name, *, lower=None, upper=None, lower_inclusive=True,
                 upper_inclusive=True, integer=False):
    """Validate a real (or integer) scalar and return it as float (or int)."""
    if isinstance(value, bool) or not isinstance(
        value, numbers.Integral if integer else numbers.Real
    ):
        kind = "an integer" if integer else "a real number"
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__}")
    try:
        value = int(value) if integer else float(value)
    except OverflowError:   # an int beyond float64
        raise ValueError(f"{name} must be finite, got {show(value)}") from None
    if not integer and not np.isfinite(value):
        raise ValueError(f"{name} must be finite, got {show(value)}")
    if lower is not None and (value < lower or (value == lower and not lower_inclusive)):
        op = ">=" if lower_inclusive else ">"
        raise ValueError(f"{name} must be {op} {lower}, got {show(value)}")
    if upper is not None and (value > upper or (value == upper and not upper_inclusive)):
        op = "<=" if upper_inclusive else "<"
        raise ValueError(f"{name} must be {op} {upper}, got {show(value)}")
    return value


def settings_unchanged(obj, names):
    """Whether the settings ``names`` of ``obj`` are still the objects that
    :func:`settings_checked` recorded (identity: a setting assigned again,
    even an equal value, counts as changed and is checked again)."""
    last = vars(obj).get("_settings_seen")   # absent on one unpickled from before
    return last is not None and all(vars(obj).get(k) is v for k, v in zip(names, last))


def settings_checked(obj, names):
    """Record the settings ``names`` of ``obj`` as checked (see
    :func:`settings_unchanged`)."""
    obj._settings_seen = tuple(vars(obj).get(k) for k in names)


def check_bool(value, name):
    """``value`` as a bool: True or False (numpy's too), never a truthy
    object (``overwrite="no"`` would otherwise consent to replacing a file)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {show(value)}")
    return bool(value)


def check_path(path, name):
    """``path`` as a ``str``: a str, bytes or os.PathLike naming a file
    (bytes decoded as :func:`os.fsdecode` does). TypeError for anything
    else and ValueError for an empty path or one holding a NUL, both naming
    ``name``: an empty path would otherwise be refused only when a file is
    written, after the work that file was to keep."""
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise TypeError(f"{name} must be a str, bytes or os.PathLike, got "
                        f"{type(path).__name__}")
    path = os.fsdecode(os.fspath(path))
    if not path:
        raise ValueError(f"{name} must name a file, got an empty path")
    if "\0" in path:
        raise ValueError(f"{name} must not contain a NUL character, got {path!r}")
    return path


def exact_str(text):
    """``text`` (a str) as an exact ``str``: a subclass's own ``__len__`` or
    ``__iter__`` could disagree with its characters, which the kernels
    size their arrays by."""
    return text if type(text) is str else str.__str__(text)


_SURROGATE = re.compile("[\ud800-\udfff]")


def check_unicode(text, name):
    """Refuse a str holding a lone surrogate (not Unicode: no kernel or
    codec reads it) with a ValueError naming ``name`` and the position."""
    bad = _SURROGATE.search(text)
    if bad is not None:
        raise ValueError(f"{name} contains a lone surrogate at position {bad.start()} "
                         f"({bad.group()!r}); text must be valid Unicode")


def check_pairs(pairs, name):
    """Split a list of ``(input, target)`` pairs into two lists.

    A target is a str, or a tuple of non-empty str joining to the input (a
    segmentation, see :mod:`grapheme.data`; a list, as JSON gives it, is
    taken as that tuple); the targets are all of one kind."""
    if isinstance(pairs, (str, bytes)) or not hasattr(pairs, "__len__"):
        raise TypeError(f"{name} must be a list of (input, target) string pairs, "
                        f"got {type(pairs).__name__}")
    inputs, targets = [], []
    for i, pair in enumerate(pairs):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"{name}[{i}] must be an (input, target) pair, got {pair!r}")
        source, target = pair
        if isinstance(source, str):
            source = exact_str(source)
        if isinstance(target, list) and isinstance(source, str):
            target = tuple(target)
        if isinstance(target, tuple) and isinstance(source, str):
            target = tuple(exact_str(seg) if isinstance(seg, str) else seg for seg in target)
            # a segmentation of the input (grapheme.data): non-empty str joining to it
            if not all(isinstance(seg, str) and seg for seg in target) or (
                    "".join(target) != source):
                raise ValueError(f"{name}[{i}]: a tuple target is a segmentation of the "
                                 f"input and must hold non-empty str joining to it, got "
                                 f"{show(target)} for {show(source)}")
        elif not isinstance(source, str) or not isinstance(target, str):
            raise TypeError(f"{name}[{i}] must hold two str (or a str and a tuple or list "
                            f"of segments), got "
                            f"({type(source).__name__}, {type(target).__name__})")
        else:
            target = exact_str(target)
        # named here, as the pair's (a text's index in the batch, "texts[7]",
        # named nothing the caller gave; an attack helper's find)
        for j, text in ((0, source), (1, target)):
            if isinstance(text, str):
                check_unicode(text, f"{name}[{i}][{j}]")
        inputs.append(source)
        targets.append(target)
    kinds = [isinstance(t, tuple) for t in targets]
    if kinds and not (all(kinds) or not any(kinds)):
        seg, text = kinds.index(True), kinds.index(False)
        raise ValueError(f"{name} must hold segmentation targets only or text targets "
                         f"only (their target graphs are built differently); "
                         f"{name}[{seg}] is a segmentation, {name}[{text}] a text")
    return inputs, targets


def as_decisions(value, name, shape):
    """``value`` as a boolean array of ``shape``: bool, or numbers that are
    all exactly 0 or 1 (``torch.bernoulli``'s samples); anything else is a
    TypeError naming ``name``, never a cast (probabilities would merge
    every edge above 0)."""
    arr = _asarray(value, name, "a boolean array")
    if arr.dtype != bool:
        if arr.dtype.kind not in "iuf" or not ((arr == 0) | (arr == 1)).all():
            raise TypeError(f"{name} must be a boolean array (or of 0 and 1), got dtype "
                            f"{arr.dtype}" + (" with other values (not cast: 0.9 would "
                                              "merge)" if arr.dtype.kind in "iuf" else ""))
        arr = arr != 0
    if arr.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {arr.shape}")
    return arr


def check_count(value, name):
    """A count: a non-negative integer (an ``int``, a numpy or 0-d torch
    integer, or an integral float), returned as int."""
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) and (
            float(value).is_integer()):
        value = int(value)
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {show(value)}") from None
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def check_graph(graph, name):
    """Raise ``TypeError`` naming ``name`` unless ``graph`` is a Graph."""
    from .graph import Graph   # graph.py imports this module

    if not isinstance(graph, Graph):
        raise TypeError(f"{name} must be a grapheme.Graph, got {type(graph).__name__}")
    return graph


def frozen(arr, copy=True):
    """A read-only view of ``arr`` (of a private copy of it unless ``copy`` is
    False), or None.

    The view's base is made read-only too, so ``view.flags.writeable = True``
    raises: what an object hands out this way cannot be changed in place by
    ordinary code, and a value checked once stays checked. With ``copy=False``
    the array must be one the caller owns (a fresh result of our kernels):
    it is frozen in place.
    """
    if arr is None:
        return None
    if copy:
        arr = np.array(arr, copy=True, order="C")
    if arr.flags.writeable:
        arr.flags.writeable = False
    view = arr.view()
    return view


def set_frozen_state(obj, state):
    """``__setstate__`` of an immutable object with ``__slots__`` (a
    ``Graph``, a ``MergeHistory``): pickling and ``copy.deepcopy`` hand back
    writeable arrays, which are frozen again, so what the object hands out
    stays read-only and a value checked once stays checked (a copy's
    arrays, written, reached the kernels unchecked: a segfault)."""
    attributes, slots = state if isinstance(state, tuple) else (state, None)
    if attributes:   # a subclass's own
        obj.__dict__.update(attributes)
    for name, value in (slots or {}).items():
        if isinstance(value, np.ndarray):
            # an array on someone else's memory (pickle protocol 5's
            # out-of-band buffers) is copied: its owner could still write it
            value = frozen(value, copy=value.base is not None)
        setattr(obj, name, value)


def _physical_memory():
    """Bytes of physical memory, or None where the platform does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return None


def check_allocation(nbytes, what):
    """Raise ``MemoryError`` naming ``what`` if ``nbytes`` exceeds the
    machine's physical memory.

    For results whose size the arguments choose (copies of a batch, a
    transport plan of ``n * m`` cells, an embedding of ``dim`` columns):
    asking for more than the machine has is refused before anything is
    allocated, with a message that says why, instead of the process being
    killed by the out-of-memory killer halfway through.
    """
    total = _physical_memory()
    if total is not None and nbytes > total:
        need = (f"{nbytes / 2**30:.3g} GiB" if nbytes < 2**1000
                else f"{show(nbytes)} bytes")
        raise MemoryError(f"{what} needs {need}, more than the "
                          f"{total / 2**30:.3g} GiB of memory of this machine")


def check_upstream(grad, name, n):
    """An upstream gradient: a finite real number (returned as float) or a
    finite real array of shape (n,) (returned as a new float64 array)."""
    if isinstance(grad, (bool, np.bool_)):
        raise TypeError(f"{name} must be a real number or an array of shape ({n},), "
                        f"got {show(grad)}")
    if isinstance(grad, numbers.Real):
        try:
            g = float(grad)
        except OverflowError:   # an int beyond float64
            g = float("inf")
        if not np.isfinite(g):
            raise ValueError(f"{name} must be finite, got {show(grad)}")
        return g
    try:
        arr = np.asarray(grad)
    except Exception:
        arr = None
    if arr is None or arr.dtype.kind not in "iuf":
        raise TypeError(
            f"{name} must be a real number or an array of shape ({n},) of real numbers, "
            f"got {type(grad).__name__}")
    if arr.ndim == 0:
        return check_upstream(float(arr), name, n)
    if arr.shape != (n,):
        raise ValueError(f"{name} must be a scalar or of shape ({n},), got shape {arr.shape}")
    arr = np.array(arr, dtype=np.float64, order="C")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite")
    return arr


def check_model(embedding, morpher, encoder):
    """The components of a model (a Segmenter's, a Trainer's): their types,
    and the encoder's width equal to the embedding's."""
    from .embedding import Embedding
    from .encoder import Encoder
    from .morph import Morpher

    if not isinstance(embedding, Embedding):
        raise TypeError(f"embedding must be a grapheme.Embedding, got "
                        f"{type(embedding).__name__}")
    if not isinstance(morpher, Morpher):
        raise TypeError(f"morpher must be a grapheme.Morpher, got {type(morpher).__name__}")
    if encoder is not None and not isinstance(encoder, Encoder):
        raise TypeError(f"encoder must be a grapheme.Encoder or None, got "
                        f"{type(encoder).__name__}")
    if encoder is not None and encoder.dim != embedding.dim:
        raise ValueError(f"encoder.dim = {encoder.dim} must equal embedding.dim = "
                         f"{embedding.dim}")
    if encoder is not None and encoder.dtype != embedding.dtype:
        raise ValueError(f"encoder.dtype = {encoder.dtype.name} must equal embedding.dtype = "
                         f"{embedding.dtype.name} (the model computes in one dtype)")


def check_dtype(dtype, name="dtype"):
    """A model's floating-point type: ``numpy.float32`` or ``numpy.float64``
    (as a type, a ``numpy.dtype`` or its name), returned as a ``numpy.dtype``.

    Anything else (float16, integers, complex, object, a misspelt name) is
    a ``TypeError`` naming ``name``.
    """
    try:
        dt = np.dtype(dtype) if dtype is not None else None
    except (TypeError, ValueError):
        dt = None
    if dt is None or dt not in _FLOATS:   # (np.dtype(...) == None is float64's test)
        raise TypeError(f"{name} must be float32 or float64, got {show(dtype)}")
    return dt
