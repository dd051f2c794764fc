"""data_parallel ROBE groups: every rank holds the whole array and pools its own batch.

As torchrec's ``DpSparseFeaturesDist``: the input dist is ``NoWait(NoWait(kjt))`` (nothing to
send). The arrays are not sharded parameters, so DMP's DDP wrapper all-reduces their dense
gradient and the dense optimizer steps them (never fused: the gradient must be averaged first).
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import nn
from torchrec.distributed.types import Awaitable, NoWait
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from robe_torchrec.sharding.common import RobeSharding, RobeShardingContext
from robe_torchrec.sharding.groups import DP


class RobeDpSharding(RobeSharding):
    """The module's data_parallel groups."""

    sharding_type = DP

    def __init__(self, *args: Any, num_features: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._num_features = num_features

    def input_dist(self, ctx: RobeShardingContext, features: KeyedJaggedTensor) -> Awaitable[Awaitable[KeyedJaggedTensor]]:
        return NoWait(NoWait(self.select(features, self._num_features)))  # type: ignore[arg-type]

    def compute(self, ctx: RobeShardingContext, kjt: KeyedJaggedTensor, arrays: nn.ParameterDict, fused: Optional[Any]) -> torch.Tensor:
        parts = kjt.split([g.layout.num_features for g in self.groups]) if len(self.groups) > 1 else [kjt]
        pooled = [self.lookup(g, part, arrays, None) for g, part in zip(self.groups, parts)]
        return pooled[0] if len(pooled) == 1 else torch.cat(pooled, dim=1)

    def output_dist(self, ctx: RobeShardingContext, output: torch.Tensor) -> Awaitable[Dict[str, torch.Tensor]]:
        return NoWait(self.split_by_group(output))
