"""Row-wise (array-wise) ROBE: route lookups to the ranks owning their blocks; masked partial sums.

An array of m elements is split into contiguous element ranges ``[lo_r, hi_r)`` whose boundaries
are multiples of Z (whole rows of the planner's ``[ceil(m/Z), Z]`` view). A lookup of id x in
feature f reads the D/Z blocks ``(h(t, x, c) + k) mod m``, k < Z; each block lies in at most two
aligned Z-chunks (or, when it wraps, in the last one or two chunks and chunk 0). Its owners are
exactly the shards holding the block's first element, the element ``min(start + Z - 1, m - 1)``
and its last (wrapped) element. A lookup is sent to every rank owning at least one element of any
of its blocks; each rank sums only the elements it owns (the others are masked to zero), and the
partial sums of all ranks add up to the exact pooled embedding. Pooling on the owners is always
SUM; MEAN is applied after the reduction, where the whole bag is known.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import torch

from robe_torchrec.hashing import block_offsets, element_indices
from robe_torchrec.ops.layout import FeatureLayout, distinct_dims
from robe_torchrec.ops.reference import apply_optimizer_dense


class ShardRanges:
    """Element ranges of one row-wise array: ``(rank, lo, hi)`` for every non-empty shard."""

    def __init__(self, ranges: Sequence[Tuple[int, int, int]], num_elements: int, world_size: int) -> None:
        ranges = sorted((r for r in ranges if r[2] > r[1]), key=lambda r: r[1])
        pos = 0
        for rank, lo, hi in ranges:
            if lo != pos:
                raise ValueError(f"row-wise shards must tile the array: gap or overlap at element {pos} (next shard [{lo}, {hi}))")
            pos = hi
        if pos != num_elements:
            raise ValueError(f"row-wise shards cover {pos} of {num_elements} elements")
        self.ranges: List[Tuple[int, int, int]] = list(ranges)
        self.num_elements = num_elements
        self.world_size = world_size
        self._ends = torch.tensor([hi for _, _, hi in ranges], dtype=torch.int64)
        self._ranks = torch.tensor([r for r, _, _ in ranges], dtype=torch.int64)

    def local(self, rank: int) -> Tuple[int, int]:
        """[lo, hi) held by ``rank`` (lo == hi when it holds nothing)."""
        for r, lo, hi in self.ranges:
            if r == rank:
                return lo, hi
        return 0, 0

    def owner(self, elements: torch.Tensor) -> torch.Tensor:
        """Rank owning each element position (same shape)."""
        ends = self._ends.to(elements.device)
        shard = torch.searchsorted(ends, elements.contiguous(), right=True)
        return self._ranks.to(elements.device)[shard]


def _lookup_features(lengths: torch.Tensor, num_ids: int, batch_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(bag index, feature index) of every id of a feature-major KJT with ``batch_size`` bags per feature."""
    bags = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths, output_size=num_ids)
    feats = bags // batch_size if batch_size > 0 else bags
    return bags, feats


def owner_mask(
    ids: torch.Tensor,
    lengths: torch.Tensor,
    batch_size: int,
    layout: FeatureLayout,
    hash_keys: torch.Tensor,
    shards: ShardRanges,
) -> torch.Tensor:
    """``[nnz, world_size]`` bool: which ranks own at least one element read by each lookup."""
    m, z = layout.num_elements, layout.block_size
    mask = torch.zeros(ids.numel(), shards.world_size, dtype=torch.bool, device=ids.device)
    if ids.numel() == 0:
        return mask
    _, feats = _lookup_features(lengths, ids.numel(), batch_size)
    dims = torch.tensor(layout.dims, dtype=torch.int64, device=ids.device)
    for dim in distinct_dims(layout.dims):
        sel = (dims[feats] == dim).nonzero().squeeze(1)
        if sel.numel() == 0:
            continue
        keys = hash_keys[feats[sel]]
        first = block_offsets(ids[sel], keys[:, 0], keys[:, 1], dim // z, m)  # [n, D/Z]
        unwrapped_last = first + (z - 1)
        last = torch.where(unwrapped_last >= m, unwrapped_last - m, unwrapped_last)
        before_wrap = torch.clamp(unwrapped_last, max=m - 1)
        owners = torch.cat([shards.owner(first), shards.owner(before_wrap), shards.owner(last)], dim=1)
        sub = torch.zeros(sel.numel(), shards.world_size, dtype=torch.bool, device=ids.device)
        sub.scatter_(1, owners, True)
        mask[sel] = sub
    return mask


def partial_pooled(
    local: torch.Tensor,
    lo: int,
    ids: torch.Tensor,
    lengths: torch.Tensor,
    layout: FeatureLayout,
    hash_keys: torch.Tensor,
    batch_size: int,
    weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """SUM-pooled ``[batch_size, layout.total_dim]`` over only the elements in ``[lo, lo + len(local))``.

    ``ids``/``lengths`` form a feature-major KJT (F features x ``batch_size`` bags). Elements other
    ranks own contribute zero. Differentiable in ``local`` by autograd (a dense local gradient).
    """
    num_features, z, m = layout.num_features, layout.block_size, layout.num_elements
    size = local.numel()
    num_bags = num_features * batch_size
    if size == 0 or ids.numel() == 0:
        # Stay connected to ``local``: the reduce-scatter's backward is a collective that every
        # rank must enter, including one with nothing to pool.
        return torch.zeros(batch_size, layout.total_dim, dtype=local.dtype, device=local.device) + local.sum() * 0
    bags, feats = _lookup_features(lengths, ids.numel(), batch_size)
    dims = torch.tensor(layout.dims, dtype=torch.int64, device=ids.device)
    pooled_by_dim = {}
    for dim in distinct_dims(layout.dims):
        sel = None if len(set(layout.dims)) == 1 else (dims[feats] == dim).nonzero().squeeze(1)
        d_ids, d_bags, d_feats = (ids, bags, feats) if sel is None else (ids[sel], bags[sel], feats[sel])
        keys = hash_keys[d_feats]
        starts = block_offsets(d_ids, keys[:, 0], keys[:, 1], dim // z, m)
        rel = element_indices(starts, z, m) - lo  # [n, dim]
        mine = (rel >= 0) & (rel < size)
        rows = torch.where(mine, local[rel.clamp(0, size - 1)], torch.zeros((), dtype=local.dtype, device=local.device))
        if weights is not None:
            w = weights if sel is None else weights[sel]
            rows = rows * w.to(rows.dtype).unsqueeze(1)
        pooled = torch.zeros(num_bags, dim, dtype=local.dtype, device=local.device).index_add(0, d_bags, rows)
        pooled_by_dim[dim] = pooled.view(num_features, batch_size, dim)
    if len(pooled_by_dim) == 1:
        (pooled,) = pooled_by_dim.values()
        return pooled.permute(1, 0, 2).reshape(batch_size, layout.total_dim)
    return torch.cat([pooled_by_dim[d][f] for f, d in enumerate(layout.dims)], dim=1)


class _FusedPartialPooled(torch.autograd.Function):
    """partial_pooled whose backward applies the fused optimizer to the local shard in place.

    The gradient of the local shard is summed over every routed lookup of the step (from all
    ranks' batches) before the update, exactly as the unsharded fused step sums over the global
    batch. Shards start at multiples of Z, so row-wise Adagrad chunks are those of the array.
    """

    @staticmethod
    def forward(ctx: Any, local, lo, ids, lengths, layout, hash_keys, batch_size, weights, optimizer, state):  # type: ignore[override]
        ctx.args = (local, lo, ids, lengths, layout, hash_keys, batch_size, weights, optimizer, state)
        with torch.no_grad():
            return partial_pooled(local, lo, ids, lengths, layout, hash_keys, batch_size, weights)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):  # type: ignore[override]
        local, lo, ids, lengths, layout, hash_keys, batch_size, weights, opt, state = ctx.args
        leaf = torch.zeros_like(local, requires_grad=True)
        with torch.enable_grad():
            out = partial_pooled(leaf, lo, ids, lengths, layout, hash_keys, batch_size, weights)
            if out.requires_grad:
                (g,) = torch.autograd.grad(out, leaf, grad_out)
            else:
                g = torch.zeros_like(local)
        apply_optimizer_dense(local.data, state, g, opt.config.optimizer, opt.lr, opt.eps, layout.block_size)
        return (None,) * 10


def partial_pooled_fused(local, lo, ids, lengths, layout, hash_keys, batch_size, weights, optimizer, state) -> torch.Tensor:
    """:func:`partial_pooled` with the optimizer step fused into backward (no gradient left)."""
    return _FusedPartialPooled.apply(local, lo, ids, lengths, layout, hash_keys, batch_size, weights, optimizer, state)
