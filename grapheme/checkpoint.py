"""Pickle-free, atomically written ``.npz`` checkpoints.

A checkpoint is a set of named NumPy arrays plus a JSON-serialisable ``meta``
dictionary. The meta data is stored as UTF-8 JSON bytes in a ``uint8`` array
under a reserved key, so the file loads with ``allow_pickle=False`` and
nothing in it can execute code.

Files are written to a temporary file in the destination directory and moved
into place with :func:`os.replace`, so a reader sees either the previous
complete checkpoint or the new complete one, never a half-written file. The
file gets the permissions ``open()`` would give it (``0o666`` minus the
umask). A temporary file left by a writer killed mid-save is removed by the
next save of the same path. What loading promises about untrusted files is
in ``docs/security.md``.
"""
import contextlib
import errno
import json
import os
import re
import secrets
import socket
import zipfile

import numpy as np

from ._validation import check_bool, check_path

__all__ = ["save_checkpoint", "load_checkpoint"]

_META_KEY = "__meta__"
_FORMAT = "grapheme-checkpoint"
_VERSION = 1
#: Largest .npy header read from a checkpoint member (numpy's own default).
_MAX_HEADER = 10000

#: ``meta["kind"]`` of a model file (:meth:`grapheme.Segmenter.save`):
#: weights and configuration, no optimiser state.
MODEL_KIND = "grapheme-model"


def _host_tag():
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:64] or "host"


def _temp_name(path):
    """``.<name>.<host>-<pid>.<random>.tmp`` beside ``path``: who wrote a
    temporary file is in its name, so a later save can tell a stale one (its
    writer is gone) from one being written right now."""
    directory, base = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{base}.{_host_tag()}-{os.getpid()}."
                                   f"{secrets.token_hex(6)}.tmp")


def _ends_with_separator(path):
    """Whether ``path`` (a str) ends with a path separator: it names a
    directory, whether or not one exists."""
    return path.endswith(tuple(filter(None, (os.sep, os.altsep))))


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:   # EPERM: alive, someone else's
        return True
    return True


def _remove_stale_temporaries(path):
    """Remove temporary files of ``path`` left by a writer killed mid-save
    (kill -9, power loss): those named by :func:`_temp_name` for this host
    whose process no longer exists. Live writers (any process still running,
    including this one) keep theirs. POSIX only (elsewhere nothing is
    removed)."""
    if os.name != "posix":
        return
    directory, base = os.path.split(os.path.abspath(path))
    pattern = re.compile(re.escape(f".{base}.{_host_tag()}-") + r"(\d+)\.[0-9a-f]+\.tmp\Z")
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        match = pattern.match(name)
        if match is None:
            continue
        pid = int(match.group(1))
        if pid != os.getpid() and not _pid_alive(pid):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(directory, name))


def _not_a_file_error(path):
    """The error naming ``path`` where a file is to be written by replacing
    it and ``path`` cannot be one: IsADirectoryError for a directory (or a
    path ending with a separator), ValueError for a pipe, a device or a
    socket (replacing ``/dev/null`` with a regular file would break the
    system's); else None. Raised before any "already exists" (whose advice,
    overwrite=True, could not help)."""
    path = os.fspath(path)
    if os.path.isdir(path) or _ends_with_separator(path):
        return IsADirectoryError(errno.EISDIR, "a directory, not a file to write", path)
    if os.path.exists(path) and not os.path.isfile(path):
        return ValueError(f"{path!r} is not a regular file (a pipe, a device or a socket): "
                          "it would be replaced by one, not written to")
    return None


def _new_file(path, overwrite, what):
    """``os.fspath(path)``, a file to write: IsADirectoryError where it is a
    directory, FileExistsError where it exists and ``overwrite`` is false
    (``what``: the file's kind, as the message names it)."""
    path = check_path(path, "path")
    overwrite = check_bool(overwrite, "overwrite")
    if (error := _not_a_file_error(path)) is not None:
        raise error
    if not overwrite and os.path.exists(path):
        raise FileExistsError(errno.EEXIST, f"{what} already exists (pass overwrite=True "
                                            "to replace it)", path)
    return path


@contextlib.contextmanager
def _atomic_open(path, mode="wb", **kwargs):
    """Open a temporary file beside ``path``; move it onto ``path`` on success.

    The data is flushed and fsync-ed before :func:`os.replace`. If the body
    raises, the temporary file is removed and ``path`` is left untouched.
    The file is created with mode ``0o666`` minus the process's umask, as
    ``open()`` would create it. Stale temporaries of ``path`` (left by a
    killed writer) are removed first.
    """
    path = os.fspath(path)
    # said here, naming path: os.replace would name the temporary file
    if (error := _not_a_file_error(path)) is not None:
        raise error
    _remove_stale_temporaries(path)
    tmp = _temp_name(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    opened = False
    try:
        # opened inside the try: a Ctrl-C or a stop signal raised between
        # the open and the try left the temporary file (a test's find)
        fd = os.open(tmp, flags, 0o666)
        opened = True
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if opened or not isinstance(exc, OSError):   # an open that failed made nothing
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(exc, OSError) and exc.filename is None and exc.errno is not None:
            # a write's error (ENOSPC, EIO) names no file: name the one written
            raise OSError(exc.errno, exc.strerror, path) from exc
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
        If ``path`` is not a path, ``arrays`` or ``meta`` is not a dict, an
        array has object dtype, or ``meta`` is not JSON-serialisable.
    ValueError
        If ``path`` is empty, or an array name is empty or reserved.
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
    path = check_path(path, "path")
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
        raise FileNotFoundError(f"directory {directory!r} does not exist")
    if os.path.isdir(os.fspath(path)):
        raise IsADirectoryError(errno.EISDIR, "checkpoint path is a directory",
                                os.fspath(path))
    with _atomic_open(path, "wb") as f:
        # np.savez stores member "<name>.npy" for every name (so "a" and
        # "a.npy" are distinct members); load_checkpoint strips exactly one
        # ".npy" and reads members by their stored name.
        np.savez(f, **payload)


def _corrupted(path, reason):
    return ValueError(f"checkpoint {os.fspath(path)!r} is corrupted or truncated: {reason}")


def _read_member(zf, info, path, name):
    """One ``.npy`` member, read without pickle and with memory bounded by
    the member's stored size: the header must promise exactly the bytes
    the member holds before anything of that size is allocated."""
    if info.compress_type != zipfile.ZIP_STORED:
        raise _corrupted(path, f"array {name!r} is compressed (grapheme writes "
                               "checkpoints uncompressed)")
    with zf.open(info) as member:
        version = np.lib.format.read_magic(member)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(
                member, max_header_size=_MAX_HEADER)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(
                member, max_header_size=_MAX_HEADER)
        else:
            raise _corrupted(path, f"array {name!r} has .npy version {version}")
        if dtype.hasobject or dtype.kind not in "biufcSU":
            raise _corrupted(path, f"array {name!r} has dtype {dtype} (only numbers "
                                   "and strings are read: no pickle)")
        if dtype.itemsize == 0:   # S0, U0: any shape in 0 bytes (a 54 KB file
            # reserved 20 GB of address space: an attack helper's find)
            raise _corrupted(path, f"array {name!r} has dtype {dtype}, of zero-width "
                                   "items, which grapheme never writes")
        count = 1
        for dim in shape:
            count *= int(dim)
        nbytes = count * dtype.itemsize
        header = member.tell()
        if header + nbytes != info.file_size:
            raise _corrupted(path, f"array {name!r}: its header promises {nbytes} bytes "
                                   f"of data, the member holds {info.file_size - header}")
        arr = np.empty(count, dtype=dtype)
        buf = memoryview(arr.view(np.uint8).reshape(-1)) if nbytes else memoryview(b"")
        got = 0
        while got < nbytes:
            chunk = member.readinto(buf[got:])
            if not chunk:
                raise _corrupted(path, f"array {name!r} is truncated")
            got += chunk
        member.read(1)   # at the end: checks the CRC
    return arr.reshape(shape, order="F" if fortran else "C")


def load_checkpoint(path, required=()):
    """Read a checkpoint written by :func:`save_checkpoint`.

    Every array is read (and its CRC checked) before returning, without
    pickle. Memory is bounded by the file's size: only uncompressed members
    whose ``.npy`` headers promise exactly the bytes they hold are read, and
    their stored sizes must add up to no more than the file.

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
    IsADirectoryError
        If ``path`` is a directory.
    PermissionError
        If ``path`` cannot be read (any other ``OSError`` of reading passes
        through as well).
    ValueError
        ``"checkpoint '<path>' is not a grapheme checkpoint: ..."`` if the
        file is not a zip archive at all, ``"checkpoint '<path>' is corrupted
        or truncated: <reason>"`` if it is not a complete, valid checkpoint
        or lacks a required array; ``"... is not a regular file"`` for a
        pipe or a device (opening a FIFO would wait for a writer); or
        ``path`` is empty.
    TypeError
        If ``path`` is not a str, bytes or os.PathLike.
    """
    path = check_path(path, "path")
    os.stat(path)   # missing, a name too long, a directory not searchable: the system says
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, "is a directory, not a file", path)
    if not os.path.isfile(path):   # opening a FIFO would wait for a writer
        raise ValueError(f"checkpoint {path!r} is not a regular file (a pipe or a device; "
                         "a checkpoint is read with seeks)")
    with open(path, "rb") as fh:   # PermissionError etc. say what they are
        head = fh.read(4)
        size = os.fstat(fh.fileno()).st_size
        if not b"PK\x03\x04".startswith(head) and not head.startswith(b"PK\x03\x04"):
            raise ValueError(f"checkpoint {path!r} is not a grapheme checkpoint: not a zip "
                             f"archive (it starts with {head!r})")
        fh.seek(0)
        try:
            zf = zipfile.ZipFile(fh)
        except Exception as exc:  # any parse failure of untrusted bytes
            raise _corrupted(path, str(exc) or type(exc).__name__) from None
        with zf:
            infos = zf.infolist()
            seen = {}
            total = 0
            for info in infos:
                raw = info.filename
                if not raw.endswith(".npy"):
                    raise _corrupted(path, f"unexpected member {raw!r} (not an .npy array)")
                name = raw[:-len(".npy")]
                if name in seen:
                    raise _corrupted(path, f"array {name!r} appears twice")
                seen[name] = info
                total += info.file_size
            if total > size:
                raise _corrupted(path, f"its members claim {total} bytes, more than the "
                                       f"file's {size}")
            arrays = {}
            for name, info in seen.items():
                try:
                    arrays[name] = _read_member(zf, info, path, name)
                except ValueError as exc:
                    if str(exc).startswith(f"checkpoint {path!r}"):
                        raise
                    raise _corrupted(path, f"array {name!r}: {exc}") from None
                except Exception as exc:  # any parse failure of untrusted bytes
                    raise _corrupted(path, f"array {name!r}: "
                                           f"{str(exc) or type(exc).__name__}") from None
    raw = arrays.pop(_META_KEY, None)
    if raw is None:
        raise _corrupted(path, f"missing {_META_KEY!r} entry")
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise _corrupted(path, f"{_META_KEY!r} is not a uint8 vector")
    try:
        wrapper = json.loads(raw.tobytes().decode("ascii"))
    except (UnicodeDecodeError, ValueError) as exc:   # JSONDecodeError, int digit limit
        raise _corrupted(path, f"meta data is not valid JSON ({exc})") from None
    except RecursionError:
        raise _corrupted(path, "meta data is nested too deeply") from None
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
