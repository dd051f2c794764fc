"""RobeConfig: the size, block size and seed of one ROBE array, validated against the tables it serves."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence

from torchrec.modules.embedding_configs import EmbeddingBagConfig

from robe_torchrec.hashing import HASH_VERSION, MAX_NUM_ELEMENTS


@dataclass(frozen=True)
class RobeConfig:
    """One flat learned array of ``num_elements`` floats shared by the tables mapped to it.

    Args:
        num_elements: m, the array's length (the memory budget: 4*m bytes in float32).
        block_size: Z, the number of contiguous array elements per block; must divide every
            served table's embedding_dim. Z=1 is the element-wise hashing trick, Z=D stores a
            whole embedding row contiguously.
        seed: enters the hash (through each table's key); two arrays with different seeds
            place every block differently.
        init_range: elements are initialised uniform(-r, r). ``None`` takes
            r = sqrt(1 / max(num_embeddings)) over the served tables, the largest torchrec
            default range that is safe for every table (and the ROBE paper's choice for DLRM).
    """

    num_elements: int
    block_size: int = 32
    seed: int = 0
    init_range: Optional[float] = None

    def __post_init__(self) -> None:
        for name in ("num_elements", "block_size", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"RobeConfig.{name} must be an int, got {value!r}")
        if self.block_size < 1:
            raise ValueError(f"RobeConfig.block_size must be >= 1, got {self.block_size}")
        if self.num_elements < self.block_size:
            raise ValueError(
                f"RobeConfig.num_elements ({self.num_elements}) must be >= block_size "
                f"({self.block_size}): a block must fit in the array"
            )
        if self.num_elements > MAX_NUM_ELEMENTS:
            raise ValueError(
                f"RobeConfig.num_elements ({self.num_elements}) exceeds the hash's supported "
                f"maximum 2**48 = {MAX_NUM_ELEMENTS}"
            )
        if self.init_range is not None and not (self.init_range > 0 and math.isfinite(self.init_range)):
            raise ValueError(f"RobeConfig.init_range must be a positive number, got {self.init_range!r}")

    @classmethod
    def from_compression(
        cls,
        tables: Sequence[EmbeddingBagConfig],
        ratio: float,
        block_size: int = 32,
        seed: int = 0,
        init_range: Optional[float] = None,
    ) -> "RobeConfig":
        """Size the array to (sum of num_embeddings * embedding_dim over ``tables``) / ``ratio``.

        The result is rounded up, and never smaller than one block.
        """
        if not tables:
            raise ValueError("from_compression needs at least one table")
        if not (ratio > 0 and math.isfinite(ratio)):
            raise ValueError(f"compression ratio must be a positive number, got {ratio!r}")
        full = full_table_elements(tables)
        config = cls(
            num_elements=max(block_size, math.ceil(full / ratio)),
            block_size=block_size,
            seed=seed,
            init_range=init_range,
        )
        config.validate_tables(tables)
        return config

    def validate_tables(self, tables: Sequence[EmbeddingBagConfig]) -> None:
        """Raise ValueError naming the first table this array cannot serve."""
        for table in tables:
            dim = table.embedding_dim
            if dim < 1 or dim % self.block_size != 0:
                raise ValueError(
                    f"table {table.name!r}: embedding_dim {dim} is not a positive multiple of "
                    f"the ROBE block_size {self.block_size}"
                )

    def resolved_init_range(self, tables: Sequence[EmbeddingBagConfig]) -> float:
        """The r of uniform(-r, r) initialisation for an array serving ``tables``."""
        if self.init_range is not None:
            return float(self.init_range)
        return math.sqrt(1.0 / max(max(t.num_embeddings for t in tables), 1))

    def layout(self) -> Dict[str, Any]:
        """What the array's contents depend on; a checkpoint is only valid under the same layout."""
        return {
            "hash_version": HASH_VERSION,
            "num_elements": self.num_elements,
            "block_size": self.block_size,
            "seed": self.seed,
        }


def full_table_elements(tables: Sequence[EmbeddingBagConfig]) -> int:
    """Elements the uncompressed tables would hold: sum of num_embeddings * embedding_dim."""
    return sum(int(t.num_embeddings) * int(t.embedding_dim) for t in tables)
