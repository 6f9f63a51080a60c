"""Fresh results without fresh page faults: the cache of large result blocks.

Every result grapheme allocates of at least ``_core.BLOCK_MIN_BYTES`` (256 KiB)
comes from a block that goes back to a short idle list when the last array
over it dies, instead of back to the operating system. The next result of
about the same size reuses it, so a loop that allocates the same large
results every step (a training loop, or ``history.scatter(g)`` called again
and again) stops paying for page faults and the kernel's zeroing of fresh
pages. With reused memory the fresh call costs what the ``out=`` call
costs; without, at 1e7 x 16 doubles, it costs about three times as much
(``python -m bench --filter Scatter``: ``Scatter.time_scatter`` against
``ScatterCold.time_scatter``, the same call with the cache off).

The arrays are ordinary writable, C-contiguous float64 ndarrays; their
``base`` is the block, and ``flags.owndata`` is False (so ``ndarray.resize``
refuses them, as it refuses any view). The cache keeps at most a limit of
idle memory, by default an eighth of the machine's physical memory (1 GiB
where that is unknown), in at most 16 blocks (``_core.BLOCK_SLOTS``),
oldest freed first. Memory in use by arrays is never counted, never touched.

>>> import grapheme
>>> previous = grapheme.set_buffer_cache(0)     # hand every idle block back
>>> grapheme.buffer_cache_info()["idle_bytes"]
0
>>> _ = grapheme.set_buffer_cache(previous)
"""
import math
import os
import sys

import numpy as np

from . import _core
from ._validation import check_scalar

__all__ = ["buffer_cache_info", "set_buffer_cache"]


def _default_limit():
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 8
    except (AttributeError, ValueError, OSError):
        return 1 << 30


def set_buffer_cache(max_bytes):
    """Set how many bytes of idle result blocks grapheme keeps for reuse.

    Parameters
    ----------
    max_bytes : int
        The most idle memory kept; ``0`` keeps none (every block goes back to
        the system when its arrays die, as plain numpy arrays do). Idle
        blocks beyond the new limit are freed at once.

    Returns
    -------
    int
        The previous limit.

    Raises
    ------
    TypeError
        If ``max_bytes`` is not an integer.
    ValueError
        If ``max_bytes`` is negative or beyond ``sys.maxsize``.
    """
    max_bytes = check_scalar(max_bytes, "max_bytes", lower=0, upper=sys.maxsize, integer=True)
    return _core.set_block_cache(max_bytes)


def buffer_cache_info():
    """The state of the result-block cache.

    Returns
    -------
    dict
        ``max_bytes`` (the limit), ``idle_bytes`` and ``idle_blocks`` (kept
        for reuse now), ``hits`` and ``misses`` (requests served from an idle
        block, and by a new allocation, since import).
    """
    keys = ("max_bytes", "idle_bytes", "idle_blocks", "hits", "misses")
    return dict(zip(keys, _core.block_cache_info()))


_FLOAT64 = np.dtype(np.float64)


def empty(shape, dtype=_FLOAT64):
    """An uninitialised C-contiguous array of ``shape`` and ``dtype`` (a
    numeric numpy dtype) and whether its memory is warm (recycled, pages
    already mapped). Results of at least ``_core.BLOCK_MIN_BYTES`` come from
    the block cache."""
    if dtype is not _FLOAT64:
        dtype = np.dtype(dtype)
    if type(shape) is not tuple:
        shape = (shape,)
    nbytes = dtype.itemsize * math.prod(shape)
    if nbytes < _core.BLOCK_MIN_BYTES:
        return np.empty(shape, dtype), False
    block = _core.take_block(nbytes)
    return np.frombuffer(block, dtype=dtype).reshape(shape), block.warm


_core.set_block_cache(_default_limit())
