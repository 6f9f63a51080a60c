"""grapheme: vocabulary-free text models whose graph changes shape.

Text becomes a chain graph of characters; a learnable :class:`Morpher`
merges neighbouring nodes whose embeddings are similar; the
:class:`MergeHistory` of every merge routes gradients back exactly.
"""
from .embedding import Embedding
from .testing import GradcheckResult, gradcheck, numerical_gradient
from .graph import Graph
from .history import MergeHistory
from .morph import Morphed, Morpher, contract, merge_edges

__version__ = "0.1.0"

__all__ = [
    "Embedding",
    "GradcheckResult",
    "Graph",
    "MergeHistory",
    "Morphed",
    "Morpher",
    "contract",
    "gradcheck",
    "merge_edges",
    "numerical_gradient",
]
