"""grapheme: vocabulary-free text models whose graph changes shape.

Text becomes a chain graph of characters; a learnable :class:`Morpher`
merges neighbouring nodes whose embeddings are similar; the
:class:`MergeHistory` of every merge routes gradients back exactly. Every
differentiable step is an operation of :mod:`grapheme.ops` with a forward
and a pure vector-Jacobian product.
"""
try:
    from . import _core  # noqa: F401  (the compiled kernels; every module needs them)
except ImportError:
    import os as _os
    from importlib.machinery import EXTENSION_SUFFIXES as _SUFFIXES

    if any(_os.path.exists(_os.path.join(__path__[0], "_core" + suffix))
           for suffix in _SUFFIXES):   # a build that fails to load: its own error
        raise
    # no build here: the import machinery's own message ("partially initialized
    # module ... circular import") would only mislead, so it is not chained
    raise ImportError(
        f"grapheme's compiled core cannot be imported from {__path__[0]}. "
        "Python found grapheme's source folder, which holds no build: run from another "
        "directory to use the installed grapheme, or build in place first "
        "(python setup.py build_ext --inplace)") from None
from . import distributed, ops
from .checkpoint import load_checkpoint, save_checkpoint
from .data import DEMO_PAIRS, generate, load_pairs
from .embedding import Embedding
from .encoder import Encoder, LayerOverflowError
from .estimators import Hard, Reinforce, Relaxed, StraightThrough
from .graph import (Graph, chain_sources, contract, merge_edges, replicate,
                    segmentation_target)
from .history import MergeHistory
from .loss import LossGrad, LossResult, StructuralLoss
from .morph import Morphed, MorphGrad, Morpher
from .optim import SGD, Adam
from .rate import RateController
from .segmenter import Segmenter
from .testing import GradcheckResult, gradcheck, numerical_gradient
from .train import Trainer

__version__ = "0.1.0"


def openmp_enabled():
    """Whether grapheme's compiled kernels were built with OpenMP.

    If so, the structural loss runs the pairs of a batch on several threads
    (``StructuralLoss(num_threads=...)``; by default as many as OpenMP's
    default, which ``OMP_NUM_THREADS`` and
    ``threadpoolctl.threadpool_limits(..., user_api="openmp")`` set). If
    not, every kernel runs on one thread, with the same results.

    Returns
    -------
    bool
    """
    from . import _core

    return _core.openmp_threads() > 0


__all__ = [
    "Adam",
    "DEMO_PAIRS",
    "Embedding",
    "Encoder",
    "GradcheckResult",
    "Graph",
    "Hard",
    "LayerOverflowError",
    "LossGrad",
    "LossResult",
    "MergeHistory",
    "MorphGrad",
    "Morphed",
    "Morpher",
    "RateController",
    "Reinforce",
    "Relaxed",
    "SGD",
    "Segmenter",
    "StraightThrough",
    "StructuralLoss",
    "Trainer",
    "chain_sources",
    "contract",
    "generate",
    "gradcheck",
    "load_checkpoint",
    "load_pairs",
    "merge_edges",
    "numerical_gradient",
    "openmp_enabled",
    "distributed",
    "ops",
    "replicate",
    "save_checkpoint",
    "segmentation_target",
]
