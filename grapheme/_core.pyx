# cython: language_level=3
"""Compiled kernels of grapheme (private).

Every kernel here trusts its input: the public Python layer validates shapes,
dtypes, ranges and finiteness first and raises ``ValueError``/``TypeError``
naming the argument. Kernels take typed, C-contiguous memoryviews (``const``
for inputs so read-only and memory-mapped arrays work), run without the GIL
and are linear in their input unless the docstring says otherwise.
"""
import numpy as np
cimport numpy as cnp
from libc.stdint cimport int32_t, int64_t, uint8_t, uint64_t
from libc.math cimport sqrt, exp, log, fabs, expm1, log1p, INFINITY

cnp.import_array()

ctypedef fused index_t:
    int32_t
    int64_t

ctypedef Py_ssize_t intp_t

include "_sinkhorn.pxi"
