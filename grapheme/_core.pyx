# Compiled kernels of grapheme. Private: callers validate, kernels trust input.
import numpy as np
cimport numpy as cnp
from libc.stdint cimport int32_t, int64_t, uint8_t, uint64_t

cnp.import_array()

ctypedef fused index_t:
    int32_t
    int64_t

ctypedef Py_ssize_t intp_t
