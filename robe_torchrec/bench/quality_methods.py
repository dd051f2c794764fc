"""Extra embedding methods of the accuracy-per-byte benchmark (issue 15): levers on top of ROBE.

* ``robe_freq``: FrequencyAwareRobeEmbeddingBagCollection (exact rows for hot ids, planned from the
  first training batches' ids, found online by sketches), fused exact Adagrad as plain ROBE.
* ``robe2``: two hashed reads per coordinate on ONE array (two ROBE layouts with different seeds
  over the same parameter, summed and scaled by 1/sqrt(2)); same bytes as plain ROBE. Trained by a
  dense torch Adagrad (the two reads' gradients must add before the Adagrad step).
"""

from __future__ import annotations

import math
from typing import Iterator, List, Optional

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollectionInterface
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from robe_torchrec import RobeConfig, RobeEmbeddingBagCollection

EXTRA_METHODS = ("robe_freq", "robe2")


class TwoReadRobeEBC(EmbeddingBagCollectionInterface):
    """Every coordinate is (M[h1] + M[h2]) / sqrt(2) over one array M: collision noise of the two
    reads is independent, so it averages down, at the cost of two reads per coordinate."""

    def __init__(self, tables: List[EmbeddingBagConfig], robe: RobeConfig, init_range: Optional[float] = None) -> None:
        super().__init__()
        r = robe.resolved_init_range(tables) if init_range is None else init_range
        second = RobeConfig(robe.num_elements, robe.block_size, seed=robe.seed + 7_777_777, init_range=r)
        self.first = RobeEmbeddingBagCollection(tables, RobeConfig(robe.num_elements, robe.block_size, robe.seed, r))
        self.second = RobeEmbeddingBagCollection(tables, second)
        self.second.arrays["default"] = self.first.arrays["default"]  # one array, two hashes

    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        return self.first.embedding_bag_configs()

    def is_weighted(self) -> bool:
        return False

    @property
    def device(self) -> torch.device:
        return self.first.device

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        a, b = self.first(features), self.second(features)
        return KeyedTensor(keys=a.keys(), length_per_key=a.length_per_key(),
                           values=(a.values() + b.values()) * (1.0 / math.sqrt(2.0)))


def first_batches(raw_ids: torch.Tensor, keys: List[str], batch_size: int, batches: int) -> Iterator[KeyedJaggedTensor]:
    """The first ``batches`` training batches as one-hot KJTs (the frequency-aware plan's sample)."""
    for i in range(min(batches, -(-raw_ids.shape[0] // batch_size))):
        ids = raw_ids[i * batch_size : (i + 1) * batch_size]
        b, f = ids.shape
        yield KeyedJaggedTensor(keys=keys, values=ids.t().reshape(-1).contiguous(),
                                lengths=torch.ones(b * f, dtype=torch.int32))


def memory_bytes(module: nn.Module) -> int:
    """Counted bytes: the frequency-aware module's own count (rows, id map, sketches), else parameters."""
    own = getattr(module, "memory_bytes", None)
    if callable(own):
        return int(own())
    return sum(p.numel() * p.element_size() for p in module.parameters())
