"""FeatureLayout: what a fused ROBE lookup needs to know about the features it pools, built once.

Modelled on FBGEMM's table-batched embedding: one op takes the concatenated ids of all features
(feature-major, exactly as a KeyedJaggedTensor stores them) with bag offsets of length F*B+1, and
per-feature metadata. Every kernel (reference, C++, Triton) takes this same layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch

from robe_torchrec.hashing import table_key


@dataclass(frozen=True)
class FeatureLayout:
    """Per-feature metadata of one ROBE array's lookup, in the order features arrive.

    Attributes:
        feature_names: the KJT keys pooled, in input order.
        table_names: the table serving each feature (its name keys the hash).
        dims: embedding dim of each feature (a multiple of block_size).
        mean: True where the feature's table pools by MEAN (else SUM).
        block_size: Z.
        num_elements: m, the array length.
        seed: the array's seed.
    """

    feature_names: Tuple[str, ...]
    table_names: Tuple[str, ...]
    dims: Tuple[int, ...]
    mean: Tuple[bool, ...]
    block_size: int
    num_elements: int
    seed: int

    @property
    def num_features(self) -> int:
        return len(self.feature_names)

    @property
    def total_dim(self) -> int:
        return sum(self.dims)

    def column_offsets(self) -> List[int]:
        """Start column of each feature in the pooled [B, total_dim] output, plus the end."""
        out = [0]
        for d in self.dims:
            out.append(out[-1] + d)
        return out

    def hash_keys(self, device: torch.device) -> torch.Tensor:
        """[F, 2] int64 tensor of each feature's table key (k0, k1)."""
        keys = [table_key(self.seed, name) for name in self.table_names]
        return torch.tensor(keys, dtype=torch.int64, device=device).reshape(-1, 2)


def distinct_dims(dims: Sequence[int]) -> List[int]:
    """The distinct embedding dims, in first-seen order."""
    seen: List[int] = []
    for d in dims:
        if d not in seen:
            seen.append(d)
    return seen
