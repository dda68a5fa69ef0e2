"""edgeprune: find circuits in transformer language models by Edge Pruning."""

from .graph import Graph, GraphSpec
from .model import EdgeModel, EdgeOutput

__version__ = "0.1.0"
__all__ = ["EdgeModel", "EdgeOutput", "Graph", "GraphSpec", "__version__"]
