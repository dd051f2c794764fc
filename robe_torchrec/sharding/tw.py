"""table_wise ROBE groups: each array lives on one rank, which pools the global batch for it.

As torchrec's ``TwPooledEmbeddingSharding``: one ``KJTAllToAll`` (held as ``_dist``, where
torchrec's train pipelines look for it) routes every table-wise feature to its array's owner;
the owner pools ``[W * B, D]`` with the module's kernel (fused optimizer in backward) and one
``PooledEmbeddingsAllToAll`` returns every rank its ``[B, D]`` rows.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.dist_data import KJTAllToAll, PooledEmbeddingsAllToAll
from torchrec.distributed.types import Awaitable
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from robe_torchrec.sharding.common import MapAwaitable, RobeSharding, RobeShardingContext
from robe_torchrec.sharding.groups import TW, Group


class RobeTwSharding(RobeSharding):
    """The module's table_wise groups, ordered by owner rank (the all-to-all's order)."""

    sharding_type = TW

    def __init__(
        self,
        groups: List[Group],
        *args: Any,
        pg: dist.ProcessGroup,
        rank: int,
        world_size: int,
        num_features: int,
        device: torch.device,
        **kwargs: Any,
    ) -> None:
        by_rank: List[List[Group]] = [[g for g in groups if g.shards[0][0] == r] for r in range(world_size)]
        super().__init__([g for gs in by_rank for g in gs], *args, **kwargs)
        self._num_features = num_features
        self._device = device
        self._mine = by_rank[rank]
        self._dist = KJTAllToAll(pg, [sum(g.layout.num_features for g in gs) for gs in by_rank])
        self._output = PooledEmbeddingsAllToAll(pg, [sum(g.layout.total_dim for g in gs) for gs in by_rank], device=device)

    def input_dist(self, ctx: RobeShardingContext, features: KeyedJaggedTensor) -> Any:
        return self._dist(self.select(features, self._num_features))

    def compute(self, ctx: RobeShardingContext, kjt: KeyedJaggedTensor, arrays: nn.ParameterDict, fused: Optional[Any]) -> torch.Tensor:
        if not self._mine:
            # Nothing to pool here; requires_grad so that this rank also enters the
            # all-to-all's backward (a collective) like the owners do.
            return torch.zeros(kjt.stride(), 0, dtype=torch.float32, device=self._device, requires_grad=torch.is_grad_enabled())
        parts = kjt.split([g.layout.num_features for g in self._mine]) if len(self._mine) > 1 else [kjt]
        pooled = [self.lookup(g, part, arrays, fused) for g, part in zip(self._mine, parts)]
        return pooled[0] if len(pooled) == 1 else torch.cat(pooled, dim=1)

    def output_dist(self, ctx: RobeShardingContext, output: torch.Tensor) -> Awaitable[Dict[str, torch.Tensor]]:
        return MapAwaitable(self._output(output), self.split_by_group)
