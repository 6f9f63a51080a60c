"""grapheme: vocabulary-free text models whose graph changes shape.

Text becomes a chain graph of characters; a learnable :class:`Morpher`
merges neighbouring nodes whose embeddings are similar; the
:class:`MergeHistory` of every merge routes gradients back exactly.
"""
from .checkpoint import load_checkpoint, save_checkpoint
from .data import DEMO_PAIRS, generate, load_pairs
from .embedding import Embedding
from .graph import Graph
from .history import MergeHistory
from .loss import LossGrad, LossResult, StructuralLoss
from .morph import Morphed, Morpher, contract, merge_edges
from .optim import SGD, Adam
from .testing import GradcheckResult, gradcheck, numerical_gradient
from .train import Trainer

__version__ = "0.1.0"

__all__ = [
    "Adam",
    "DEMO_PAIRS",
    "Embedding",
    "GradcheckResult",
    "Graph",
    "LossGrad",
    "LossResult",
    "MergeHistory",
    "Morphed",
    "Morpher",
    "SGD",
    "StructuralLoss",
    "Trainer",
    "contract",
    "generate",
    "gradcheck",
    "load_checkpoint",
    "load_pairs",
    "merge_edges",
    "numerical_gradient",
    "save_checkpoint",
]
