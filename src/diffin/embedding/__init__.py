"""Trajectory influence embeddings: every training sample's projected removal effect, built by one
batched backward sweep, queried for any target by a gradient and a product (docs/method.md §4.10)."""

from ._build import DEFAULT_DIM, Directions, EmbedConfig, embed
from ._embedding import EMBED_JSON, EMBED_NPY, Embedding, TopInfluence, load_embedding
from ._projection import PROJECTIONS, Projection

__all__ = ["DEFAULT_DIM", "EMBED_JSON", "EMBED_NPY", "PROJECTIONS", "Directions", "EmbedConfig", "Embedding",
           "Projection", "TopInfluence", "embed", "load_embedding"]
