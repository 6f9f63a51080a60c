"""Keep freed heap memory for reuse: an option of the ``grapheme`` command.

A training step allocates and frees the same few megabyte-sized arrays every
step. glibc's malloc serves arrays that large by ``mmap`` or returns the
freed top of its heap to the system (``trim``), so every step faults the
same memory in again: about 2,500 page faults and a third of the time of a
1000-pair step (``bench_train.TrainStepSuite``) when this was written.
grapheme's own results now come from the block cache of
:mod:`grapheme.buffers`, which needs no process-wide setting; these
thresholds keep numpy's temporaries (the loss, the optimiser) in the process
too. On a 2-core EPYC the step took 6.8 ms with or without them.

This is process-wide malloc tuning, so the library never does it on import.
The ``grapheme`` command (an application) calls :func:`retain_freed_memory`
before it trains; a program that uses :class:`grapheme.Trainer` directly can
call it too, or set the same options in the environment, e.g.
``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=268435456``.
"""
import ctypes
import os
import platform

__all__ = ["retain_freed_memory"]

# mallopt parameters, from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

#: Arrays below this size come from the heap (glibc's largest on 64-bit).
MMAP_THRESHOLD = 32 * 1024 * 1024
#: Freed heap memory kept by the process, at most.
TRIM_THRESHOLD = 256 * 1024 * 1024

_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
        "MALLOC_MMAP_MAX_")


def retain_freed_memory():
    """Tune glibc's malloc to keep freed memory for reuse; True if applied.

    Does nothing (and returns False) on a C library other than glibc, or when
    the environment already tunes glibc's malloc (a ``MALLOC_*`` threshold,
    or ``glibc.malloc.*`` in ``GLIBC_TUNABLES``): the user's choice wins. The
    process keeps up to ``TRIM_THRESHOLD`` bytes of freed memory.
    """
    if (any(name in os.environ for name in _ENV)
            or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")
            or platform.libc_ver()[0] != "glibc"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
