"""robe-torchrec: ROBE (Random Offset Block Embedding) arrays as a TorchRec plugin.

One flat learned array stands in for all embedding tables; see docs/design.md.
"""

from robe_torchrec.config import RobeConfig
from robe_torchrec.hashing import HASH_VERSION
from robe_torchrec.modules.robe_embedding_bag_collection import RobeEmbeddingBagCollection
from robe_torchrec.optim_in_backward import apply_optimizer_in_backward
from robe_torchrec.robe_ify import RobeHybridEmbeddingBagCollection, robe_ify

__all__ = [
    "HASH_VERSION", "RobeConfig", "apply_optimizer_in_backward", "RobeEmbeddingBagCollection", "RobeHybridEmbeddingBagCollection", "robe_ify",
]
__version__ = "0.1.0"
