# Stubs for the structural-loss kernels in _transport.pyx (private; called by
# grapheme.loss.StructuralLoss, which validates). A batch of B (predicted,
# target) pairs; node arrays concatenated over the batch with int64 offsets,
# edges as block-diagonal int64 CSR with global indices. The kernels read
# their arguments by attribute into C structs:
#   _GraphArrays  indptr, indices (const int64_t[::1]), labels (const
#                 int32_t[::1]), weights, mass, activation, degree (const
#                 double[::1]; degree: the weighted out-degrees), offsets
#                 (const int64_t[::1] (B+1,))
#   _Settings     w_type, w_act, w_deg, epsilon, iterations, tol (<= 0: none),
#                 conv_tol, alpha, beta, gamma, balance
#   _Cache        scaled, self_pair (const uint8_t[::1] (B,)), plan_off
#                 (const int64_t[::1] (B+1,)): IN; f_off, g_off (int64_t[::1]
#                 (B+1,)): their last entries IN (capacity hints), all OUT of
#                 the forward; plan, fpot, gpot (double[::1]), used (int64_t[::1]
#                 (B,)): OUT of the forward; all IN of the backward
from typing import Any

import numpy as np

def structural_loss_forward(
    predicted: Any,         # _GraphArrays IN
    target: Any,            # _GraphArrays IN
    settings: Any,          # _Settings IN
    state: Any,             # _Cache: scaled, plan_off, capacity hints f_off[-1],
                            #   g_off[-1] IN; plan, f_off, g_off, used OUT
    terms: np.ndarray,      # double[:, ::1] OUT (B, 4): node, edge, clique, row error
    converged: np.ndarray,  # uint8_t[::1] OUT (B,)
    num_threads: int = 0,   # int IN threads for the pairs; <= 0: OpenMP's default
    alloc: Any = None,      # alloc(size, name) -> float64 (size,) for fpot, gpot; None: fresh
) -> tuple[np.ndarray, np.ndarray]: ...  # fpot, gpot: the potentials of the sweeps run
def structural_loss_backward(
    predicted: Any,         # _GraphArrays IN
    target: Any,            # _GraphArrays IN
    settings: Any,          # _Settings IN
    state: Any,             # _Cache IN, as the forward pass left it
    scale: np.ndarray,      # const double[::1] IN (B,) d value / d value_b
    grad: Any,              # LossGrad OUT: activation, mass (double[::1] (N,)),
                            #   target_activation (double[::1] (M,)),
                            #   weights (double[::1] (E_p,)),
                            #   target_weights (double[::1] (E_t,)),
                            #   target_mass (double[::1] (M,))
    num_threads: int = 0,   # int IN threads for the pairs; <= 0: OpenMP's default
) -> None: ...
