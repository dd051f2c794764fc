"""Plain (unsharded) modules. Nothing here imports distributed code."""

from robe_torchrec.modules.robe_embedding_bag_collection import RobeEmbeddingBagCollection

__all__ = ["RobeEmbeddingBagCollection"]
