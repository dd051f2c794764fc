"""Checkpoint and optimizer state of a sharded ROBE collection.

Arrays and fused-optimizer state appear under the unsharded keys as 1-D ``ShardedTensor``s laid
out like the array (rank, [lo, hi) element ranges), so ``torch.distributed.checkpoint`` reshards
them on load; ``local_piece`` takes this rank's slice of a full tensor or of a ShardedTensor.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import (
    Shard,
    ShardedTensor,
    ShardedTensorMetadata,
    ShardMetadata,
    TensorProperties,
)

from robe_torchrec.optim import STATE_NAME, RobeFusedOptimizerBase, RobeFusedOptimizerConfig, mark_in_backward, state_numel
from robe_torchrec.sharding.groups import DP, Group


def sharded_1d(
    local: Optional[torch.Tensor],
    global_size: int,
    shards: List[Tuple[int, int, int]],
    placements: Dict[int, str],
    rank: int,
    pg: Optional[dist.ProcessGroup],
    dtype: torch.dtype = torch.float32,
) -> ShardedTensor:
    """A 1-D ShardedTensor over ``shards`` (rank, lo, hi) whose local shard is ``local`` (no copy, no collective)."""
    metas = [
        ShardMetadata(shard_offsets=[lo], shard_sizes=[hi - lo], placement=placements[r]) for r, lo, hi in shards
    ]
    global_meta = ShardedTensorMetadata(
        shards_metadata=metas,
        size=torch.Size([global_size]),
        tensor_properties=TensorProperties(
            dtype=dtype, layout=torch.strided, requires_grad=False, memory_format=torch.contiguous_format, pin_memory=False
        ),
    )
    local_shards = [
        Shard(tensor=local, metadata=meta) for (r, _, _), meta in zip(shards, metas) if r == rank and local is not None
    ]
    return ShardedTensor._init_from_local_shards_and_global_metadata(local_shards, global_meta, process_group=pg)


def state_range(optimizer: str, lo: int, hi: int, block_size: int) -> Tuple[int, int]:
    """Slice of the optimizer state that belongs to array elements [lo, hi) (lo is Z-aligned)."""
    return state_numel(optimizer, lo, block_size), state_numel(optimizer, hi, block_size)


class ShardedRobeFusedOptimizer(RobeFusedOptimizerBase):
    """The fused optimizer of a sharded collection's table_wise / row_wise arrays.

    Keys ``arrays.<group>``; state ``momentum1`` is a ShardedTensor laid out like the array
    (empty plain tensor for SGD, as unsharded). Same ``lr`` / ``eps`` / ``config`` / ``state_of``
    interface as :class:`robe_torchrec.optim.RobeFusedOptimizer`, so the kernels take either.
    """

    def __init__(
        self,
        params: Dict[str, nn.Parameter],
        local_state: Dict[str, torch.Tensor],
        state_views: Dict[str, torch.Tensor],
        config: RobeFusedOptimizerConfig,
    ) -> None:
        self.config = config
        self._local_state = {params[k]: v for k, v in local_state.items()}
        state = {params[k]: {STATE_NAME: state_views[k]} for k in params}
        groups = [
            {"params": list(params.values()), "lr": config.lr, "eps": config.eps, "optimizer": config.optimizer}
        ] if params else []
        super().__init__(dict(params), state, groups)
        mark_in_backward(params.values(), self)

    def state_of(self, param: torch.Tensor) -> torch.Tensor:
        """This rank's piece of the accumulator of one array."""
        return self._local_state[param]


def build_fused_optimizer(
    groups: Dict[str, Group],
    arrays: nn.ParameterDict,
    config: Optional[RobeFusedOptimizerConfig],
    source: Optional[Any],
    source_arrays: Any,
    rank: int,
    pg: Optional[dist.ProcessGroup],
    device: torch.device,
) -> ShardedRobeFusedOptimizer:
    """The fused optimizer over the table_wise / row_wise groups (empty without ``config``).

    ``source`` is the unsharded module's fused optimizer: its state is copied when it is the same
    optimizer (this rank's slice), so sharding a trained module keeps its accumulators.
    """
    if config is None:
        return ShardedRobeFusedOptimizer({}, {}, {}, RobeFusedOptimizerConfig("sgd"))
    params: Dict[str, nn.Parameter] = {}
    local_state: Dict[str, torch.Tensor] = {}
    views: Dict[str, torch.Tensor] = {}
    for name, g in groups.items():
        if g.sharding_type == DP:
            continue
        key = f"arrays.{name}"
        z = g.config.block_size
        s0, s1 = state_range(config.optimizer, g.lo, g.hi, z)
        local = torch.zeros(s1 - s0, dtype=torch.float32, device=device)
        if source is not None and source.config.optimizer == config.optimizer:
            src = source.state_of(source_arrays[name])
            if not src.is_meta and src.numel() > 0:
                local.copy_(src[s0:s1])
        if config.optimizer == "sgd":
            view: torch.Tensor = local
        else:
            total = state_numel(config.optimizer, g.config.num_elements, z)
            shards = [(r, *state_range(config.optimizer, lo, hi, z)) for r, lo, hi in g.shards]
            view = sharded_1d(local, total, shards, g.placements, rank, pg)
        params[key] = arrays[name]
        local_state[key] = local
        views[key] = view
    return ShardedRobeFusedOptimizer(params, local_state, views, config)


def local_piece(g: Group, value: Any, device: torch.device) -> torch.Tensor:
    """This rank's [lo, hi) of ``arrays.<group>`` from a full tensor or a ShardedTensor's local shards."""
    m = g.config.num_elements
    if isinstance(value, ShardedTensor):
        if tuple(value.size()) != (m,):
            raise ValueError(f"arrays.{g.name}: ShardedTensor of size {tuple(value.size())}, expected ({m},)")
        out = torch.empty(g.local_size, dtype=torch.float32, device=device)
        covered = 0
        for shard in value.local_shards():
            s_lo = int(shard.metadata.shard_offsets[0])
            s_hi = s_lo + int(shard.metadata.shard_sizes[0])
            a, b = max(s_lo, g.lo), min(s_hi, g.hi)
            if a < b:
                out[a - g.lo : b - g.lo].copy_(shard.tensor.detach()[a - s_lo : b - s_lo])
                covered += b - a
        if covered != g.local_size:
            raise ValueError(
                f"arrays.{g.name}: the ShardedTensor's local shards do not cover this rank's elements "
                f"[{g.lo}, {g.hi}); load it with torch.distributed.checkpoint into this module's state_dict()"
            )
        return out
    if isinstance(value, torch.Tensor):
        if value.numel() == m:
            return value.detach().reshape(-1)[g.lo : g.hi]
        if value.numel() == g.local_size:
            return value.detach().reshape(-1)
        raise ValueError(f"arrays.{g.name}: tensor of {value.numel()} elements, expected {m} (full array)")
    raise TypeError(f"arrays.{g.name}: cannot load a {type(value).__name__}")
