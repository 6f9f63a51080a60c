"""Pickle-free, atomically written ``.npz`` checkpoints.

A checkpoint is a set of named NumPy arrays plus a JSON-serialisable ``meta``
dictionary. The meta data is stored as UTF-8 JSON bytes in a ``uint8`` array
under a reserved key, so the file loads with ``allow_pickle=False`` and
nothing in it can execute code.

Files are written to a temporary file in the destination directory and moved
into place with :func:`os.replace`, so a reader sees either the previous
complete checkpoint or the new complete one, never a half-written file.
"""
import contextlib
import json
import os
import tempfile

import numpy as np

__all__ = ["save_checkpoint", "load_checkpoint"]

_META_KEY = "__meta__"
_FORMAT = "grapheme-checkpoint"
_VERSION = 1


@contextlib.contextmanager
def _atomic_open(path, mode="wb", **kwargs):
    """Open a temporary file beside ``path``; move it onto ``path`` on success.

    The data is flushed and fsync-ed before :func:`os.replace`. If the body
    raises, the temporary file is removed and ``path`` is left untouched.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".",
                               suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def save_checkpoint(path, arrays, meta):
    """Write named arrays and JSON meta data to ``path`` atomically.

    Parameters
    ----------
    path : str or os.PathLike
        Destination file. Written exactly as given (no ``.npz`` suffix is
        added). Its directory must exist.
    arrays : dict of str to array_like
        Arrays to store. Names must be non-empty strings other than
        ``"__meta__"``; object arrays are refused (they would need pickle).
    meta : dict
        JSON-serialisable meta data (numbers, strings, lists, dicts, bools,
        None). Python ints of any size and floats round-trip exactly.

    Raises
    ------
    TypeError
        If ``arrays`` or ``meta`` is not a dict, an array has object dtype,
        or ``meta`` is not JSON-serialisable.
    ValueError
        If an array name is empty or reserved.
    FileNotFoundError
        If the directory of ``path`` does not exist.

    Examples
    --------
    >>> import numpy as np, os, tempfile
    >>> from grapheme.checkpoint import save_checkpoint, load_checkpoint
    >>> path = os.path.join(tempfile.mkdtemp(), "ckpt.npz")
    >>> save_checkpoint(path, {"w": np.arange(3.0)}, {"epoch": 2})
    >>> arrays, meta = load_checkpoint(path)
    >>> arrays["w"], meta
    (array([0., 1., 2.]), {'epoch': 2})
    """
    if not isinstance(arrays, dict):
        raise TypeError(f"arrays must be a dict, got {type(arrays).__name__}")
    if not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
    payload = {}
    for name, value in arrays.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"arrays: names must be non-empty strings, got {name!r}")
        if name == _META_KEY:
            raise ValueError(f"arrays: the name {_META_KEY!r} is reserved")
        arr = np.asarray(value)
        if arr.dtype.hasobject:
            raise TypeError(f"arrays[{name!r}] has object dtype; cannot store "
                            "without pickle")
        payload[name] = arr
    try:
        text = json.dumps({"format": _FORMAT, "version": _VERSION, "meta": meta},
                          ensure_ascii=True, allow_nan=True)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"meta is not JSON-serialisable: {exc}") from None
    payload[_META_KEY] = np.frombuffer(text.encode("ascii"), dtype=np.uint8)
    directory = os.path.dirname(os.path.abspath(os.fspath(path)))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"checkpoint directory {directory!r} does not exist")
    with _atomic_open(path, "wb") as f:
        np.savez(f, **payload)


def _corrupted(path, reason):
    return ValueError(f"checkpoint {os.fspath(path)!r} is corrupted or truncated: {reason}")


def load_checkpoint(path, required=()):
    """Read a checkpoint written by :func:`save_checkpoint`.

    Every array is read (and its CRC checked) before returning, with
    ``allow_pickle=False``.

    Parameters
    ----------
    path : str or os.PathLike
        The checkpoint file.
    required : iterable of str, optional
        Array names that must be present.

    Returns
    -------
    arrays : dict of str to ndarray
    meta : dict

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        ``"checkpoint '<path>' is corrupted or truncated: <reason>"`` if the
        file is not a complete, valid checkpoint or lacks a required array.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as exc:  # any parse failure of untrusted bytes
        raise _corrupted(path, str(exc) or type(exc).__name__) from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise _corrupted(path, "not an .npz archive")
    try:
        with loaded as f:
            # Reading every member checks sizes and CRCs now, not later.
            arrays = {name: f[name] for name in f.files}
    except Exception as exc:  # any parse failure of untrusted bytes
        raise _corrupted(path, str(exc) or type(exc).__name__) from None
    raw = arrays.pop(_META_KEY, None)
    if raw is None:
        raise _corrupted(path, f"missing {_META_KEY!r} entry")
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise _corrupted(path, f"{_META_KEY!r} is not a uint8 vector")
    try:
        wrapper = json.loads(raw.tobytes().decode("ascii"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _corrupted(path, f"meta data is not valid JSON ({exc})") from None
    if (not isinstance(wrapper, dict) or wrapper.get("format") != _FORMAT
            or not isinstance(wrapper.get("meta"), dict)):
        raise _corrupted(path, "not a grapheme checkpoint")
    if wrapper.get("version") != _VERSION:
        raise ValueError(f"checkpoint {path!r} has format version "
                         f"{wrapper.get('version')!r}; this grapheme reads "
                         f"version {_VERSION}")
    missing = [name for name in required if name not in arrays]
    if missing:
        raise _corrupted(path, f"missing array(s) {missing}")
    return arrays, wrapper["meta"]
