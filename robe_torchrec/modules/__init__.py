"""Plain (unsharded) modules. Nothing here imports distributed code.

Importing this package registers RobeEmbeddingBagCollection -> QuantRobeEmbeddingBagCollection in
torchrec's default quantization mapping, so ``torchrec.inference.modules.quantize_inference_model(model)``
converts ROBE modules like it converts EmbeddingBagCollections (see ``register_default_quantization``).
"""

from robe_torchrec.modules.quant_robe_embedding_bag_collection import (
    QuantRobeEmbeddingBagCollection,
    register_default_quantization,
)
from robe_torchrec.modules.robe_embedding_bag_collection import RobeEmbeddingBagCollection

register_default_quantization()

__all__ = ["QuantRobeEmbeddingBagCollection", "RobeEmbeddingBagCollection"]
