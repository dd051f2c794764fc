"""Distributed ROBE: the TorchRec sharder, sharded module and sizing helpers (see docs/sharding.md).

Only this package imports torchrec.distributed; the plain module never does.
"""

from robe_torchrec.sharding.frequency_aware import FrequencyAwareRobeEmbeddingBagCollectionSharder
from robe_torchrec.sharding.sharder import RobeEmbeddingBagCollectionSharder
from robe_torchrec.sharding.sizing import array_elements_for_budget

__all__ = [
    "FrequencyAwareRobeEmbeddingBagCollectionSharder",
    "RobeEmbeddingBagCollectionSharder",
    "array_elements_for_budget",
]
