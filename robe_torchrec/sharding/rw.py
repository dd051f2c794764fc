"""row_wise ROBE groups: each array split into Z-aligned element ranges, one per rank.

Input dist: every lookup is sent to each rank owning an element of its blocks
(:func:`robe_torchrec.sharding.rw_lookup.owner_mask`); the ids of all row-wise groups go in one
``KJTAllToAll`` (held as ``_dist``; keys repeated W times, rank-major, torchrec's bucketized
layout). Lookup: each rank sums only the elements it owns for the global batch, ``[W * B, D]``: on the
element_range path of the C++ (CPU) or Triton (CUDA) kernel (``robe_torchrec.ops.shard_lookup``;
fused optimizer in backward, touching only the chunks read) where the module's kernel resolves to
one, else the masked PyTorch path (``partial_pooled``: the reference kernel). Output dist: the partial sums are reduce-scattered
back to the batch's rank (torchrec's ``PooledEmbeddingsReduceScatter``; on gloo, which has no
reduce-scatter, a ``PooledEmbeddingsAllToAll`` of the W row blocks plus a local sum: the same
bytes on the wire); MEAN divides after the reduction, where the whole bag is known.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.dist_data import KJTAllToAll, PooledEmbeddingsAllToAll, PooledEmbeddingsReduceScatter
from torchrec.distributed.types import Awaitable
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from robe_torchrec.modules.robe_embedding_bag_collection import _offsets_of
from robe_torchrec.ops.shard_lookup import robe_shard_lookup, shard_kernel
from robe_torchrec.sharding.common import MapAwaitable, RobeSharding, RobeShardingContext
from robe_torchrec.sharding.groups import RW, Group
from robe_torchrec.sharding.rw_lookup import owner_mask, partial_pooled, partial_pooled_fused

_NO_REDUCE_SCATTER = {"gloo"}


def has_reduce_scatter(pg: dist.ProcessGroup) -> bool:
    """Whether the backend of ``pg`` implements reduce-scatter (gloo does not)."""
    try:
        backend = dist.get_backend(pg)
    except Exception:  # noqa: BLE001 - a fake/unknown group: be conservative
        return False
    return str(backend).lower() not in _NO_REDUCE_SCATTER


def _split_by_rank(bucket: Any, world_size: int) -> List[Any]:
    """Per rank, (values, lengths, weights) of one group's rank-major bucket."""
    values, lengths, weights, per_rank = bucket
    counts = per_rank.tolist()
    vs = values.split(counts)
    ls = lengths.split(lengths.numel() // world_size)
    ws = [None] * world_size if weights is None else weights.split(counts)
    return list(zip(vs, ls, ws))


class RobeRwSharding(RobeSharding):
    """The module's row_wise groups."""

    sharding_type = RW

    def __init__(
        self,
        groups: List[Group],
        *args: Any,
        pg: dist.ProcessGroup,
        world_size: int,
        num_features: int,
        device: torch.device,
        **kwargs: Any,
    ) -> None:
        super().__init__(groups, *args, **kwargs)
        self._num_features = num_features
        self._world_size = world_size
        self._total_dim = sum(g.layout.total_dim for g in groups)
        self._dist = KJTAllToAll(pg, [len(self.feature_order)] * world_size)
        self._reduce_scatter = has_reduce_scatter(pg)
        if self._reduce_scatter:
            self._output: nn.Module = PooledEmbeddingsReduceScatter(pg)
        else:
            self._output = PooledEmbeddingsAllToAll(pg, [self._total_dim] * world_size, device=device)

    # ----- input dist -------------------------------------------------------------------------

    def input_dist(self, ctx: RobeShardingContext, features: KeyedJaggedTensor) -> Any:
        kjt = self.select(features, self._num_features)
        parts = kjt.split([g.layout.num_features for g in self.groups]) if len(self.groups) > 1 else [kjt]
        buckets = []
        for g, part in zip(self.groups, parts):
            if any(g.layout.mean):
                ctx.lengths[g.name] = part.lengths().view(g.layout.num_features, part.stride())
            buckets.append(self._bucketize(g, part))
        if len(buckets) == 1:  # already rank-major
            values, lengths, weights, _ = buckets[0]
        else:  # rank-major over groups: rank 0's pieces of every group, then rank 1's, ...
            pieces = [_split_by_rank(b, self._world_size) for b in buckets]
            order = [pieces[gi][r] for r in range(self._world_size) for gi in range(len(pieces))]
            values = torch.cat([p[0] for p in order])
            lengths = torch.cat([p[1] for p in order])
            weights = None if order[0][2] is None else torch.cat([p[2] for p in order])
        return self._dist(
            KeyedJaggedTensor(
                keys=list(kjt.keys()) * self._world_size, values=values, lengths=lengths, weights=weights, stride=kjt.stride()
            )
        )

    def _bucketize(self, g: Group, kjt: KeyedJaggedTensor) -> "Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], torch.Tensor]":
        """The lookups each rank must sum, rank-major: (values, lengths ``[W * bags]``, weights,
        ids per rank ``[W]``). One ``nonzero`` over the transposed owner mask orders them by rank
        and keeps each bag's ids in order (one host sync, not one per rank)."""
        assert g.ranges is not None
        values = kjt.values()
        ids = values if values.dtype == torch.int64 else values.to(torch.int64)
        lengths = kjt.lengths()
        weights = kjt.weights_or_none()
        nbags = lengths.numel()
        mask = owner_mask(ids, lengths, kjt.stride(), g.layout, self._hash_keys[g.name], g.ranges)  # [nnz, W]
        bags = torch.repeat_interleave(torch.arange(nbags, device=ids.device), lengths, output_size=ids.numel())
        rank, pos = mask.t().nonzero(as_tuple=True)
        lens = torch.bincount(rank * nbags + bags[pos], minlength=self._world_size * nbags).to(lengths.dtype)
        per_rank = lens.view(self._world_size, nbags).sum(dim=1)
        return values[pos], lens, None if weights is None else weights[pos], per_rank

    # ----- lookup and output dist -------------------------------------------------------------

    def compute(self, ctx: RobeShardingContext, kjt: KeyedJaggedTensor, arrays: nn.ParameterDict, fused: Optional[Any]) -> torch.Tensor:
        parts = kjt.split([g.layout.num_features for g in self.groups]) if len(self.groups) > 1 else [kjt]
        out = [self._partial(g, part, arrays[g.name], fused) for g, part in zip(self.groups, parts)]
        return out[0] if len(out) == 1 else torch.cat(out, dim=1)

    def _partial(self, g: Group, part: KeyedJaggedTensor, local: torch.Tensor, fused: Optional[Any]) -> torch.Tensor:
        """This rank's partial sums of one group: the element_range kernel where the module's kernel
        has one (C++ on CPU, Triton on CUDA), else the masked PyTorch path (reference kernel)."""
        values = part.values()
        ids = values if values.dtype == torch.int64 else values.to(torch.int64)
        weights = part.weights_or_none()
        kernel = shard_kernel(self._kernel, local.device)
        if kernel is not None:
            return robe_shard_lookup(
                local, (g.lo, g.hi), ids, _offsets_of(part), g.layout, self._hash_keys[g.name], part.stride(),
                weights, kernel=kernel, fused_optimizer=fused,
            )
        args = (local, g.lo, ids, part.lengths(), g.layout, self._hash_keys[g.name], part.stride(), weights)
        if fused is not None:
            return partial_pooled_fused(*args, fused, fused.state_of(local))
        return partial_pooled(*args)

    def output_dist(self, ctx: RobeShardingContext, output: torch.Tensor) -> Awaitable[Dict[str, torch.Tensor]]:
        if output.shape[0] % self._world_size != 0:
            raise ValueError(
                f"row-wise ROBE needs the same local batch size on every rank: got {output.shape[0]} rows for {self._world_size} ranks"
            )
        if self._reduce_scatter:
            return MapAwaitable(self._output(output.contiguous()), lambda summed: self._finish(ctx, summed))
        return MapAwaitable(self._output(output.contiguous()), lambda received: self._finish(ctx, self._sum_blocks(received)))

    def _sum_blocks(self, received: torch.Tensor) -> torch.Tensor:
        """[B, W * D] (rank s's partial sums in columns s*D..) -> [B, D]."""
        return received.view(received.shape[0], self._world_size, self._total_dim).sum(1)

    def _finish(self, ctx: RobeShardingContext, summed: torch.Tensor) -> Dict[str, torch.Tensor]:
        pooled = self.split_by_group(summed)
        for g in self.groups:
            if g.name in ctx.lengths:
                pooled[g.name] = mean_after_reduction(g, pooled[g.name], ctx.lengths[g.name])
        return pooled


def mean_after_reduction(g: Group, summed: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Divide MEAN features' columns by their bag length ([F, B] lengths; empty bags stay 0)."""
    mean = torch.tensor(g.layout.mean, dtype=torch.bool, device=summed.device)
    scale = torch.where(
        mean.unsqueeze(1), 1.0 / lengths.clamp(min=1).to(summed.dtype), torch.ones((), dtype=summed.dtype, device=summed.device)
    )  # [F, B]
    per_col = torch.repeat_interleave(scale, torch.tensor(g.layout.dims, device=summed.device), dim=0)  # [total_dim, B]
    return summed * per_col.t()
