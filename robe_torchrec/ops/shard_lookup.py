"""The partial lookup of one row-wise shard on the fast kernels (``LookupBatch.element_range``).

A row-wise shard holds the global elements ``[lo, hi)`` of an array (Z-aligned). Its partial
lookup SUM-pools only the elements it holds (the others count as zero): the partial sums of the
shards tiling ``[0, m)`` add up to the whole-array SUM lookup. MEAN is the caller's business
(after the cross-rank reduction, where the whole bag is known). Backward gives the shard a dense
``[hi - lo]`` gradient, or, with a fused optimizer, steps the shard (and its local state) in place
touching only the chunks the lookups read: the C++ kernel's element_range path, no mask tensors
and no ``[nnz, D]`` intermediate.

Only kernels that implement element_range are accepted here (``cpu``, ``triton``); callers fall
back to the masked PyTorch path (``robe_torchrec.sharding.rw_lookup.partial_pooled``) otherwise
(the ``reference`` kernel).
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch

from robe_torchrec.ops.api import LookupBatch, OptimizerArgs, mean_flags
from robe_torchrec.ops.layout import FeatureLayout
from robe_torchrec.ops.lookup import (
    FusedArg,
    _backend,
    dim_runs,
    _optimizer_args,
    resolve_kernel,
    runs_dense_grad,
    runs_forward,
)
from robe_torchrec.ops.reference import apply_optimizer_dense

SHARD_KERNELS = ("cpu", "triton")


def shard_kernel(kernel: str, device: torch.device) -> Optional[str]:
    """The element_range kernel ``kernel`` resolves to on ``device``, or None (use the masked path)."""
    name = resolve_kernel(kernel, device)
    return name if name in SHARD_KERNELS else None


def robe_shard_lookup(
    local: torch.Tensor,
    element_range: Tuple[int, int],
    indices: torch.Tensor,
    offsets: torch.Tensor,
    layout: FeatureLayout,
    hash_keys: torch.Tensor,
    batch_size: int,
    per_sample_weights: Optional[torch.Tensor] = None,
    kernel: str = "cpu",
    fused_optimizer: FusedArg = None,
) -> torch.Tensor:
    """SUM-pooled partial ``[batch_size, layout.total_dim]`` over the shard ``local`` = elements
    ``element_range`` of the array; ``offsets`` ([F*B + 1]) are bag boundaries in ``indices``.

    ``fused_optimizer``: as for :func:`robe_torchrec.ops.lookup.robe_pooled_lookup`, with the
    shard-local state (adagrad: ``hi - lo`` entries, rowwise_adagrad: one per local Z-chunk).
    """
    if kernel not in SHARD_KERNELS:
        raise ValueError(f"robe_shard_lookup needs an element_range kernel {SHARD_KERNELS}, got {kernel!r}")
    lo, hi = (int(x) for x in element_range)
    if local.numel() != hi - lo:
        raise ValueError(f"shard holds {local.numel()} elements, element_range ({lo}, {hi}) has {hi - lo}")
    optimizer = _optimizer_args(fused_optimizer, local)
    if local.numel() == 0 or indices.numel() == 0:
        # Stay connected to ``local``: the reduce-scatter's backward is a collective that every
        # rank must enter, including one with nothing to pool.
        return torch.zeros(batch_size, layout.total_dim, dtype=local.dtype, device=local.device) + local.sum() * 0
    batch = LookupBatch(
        indices=indices,
        offsets=offsets,
        hash_keys=hash_keys,
        mean=mean_flags((False,) * layout.num_features, local.device),
        weights=per_sample_weights,
        batch_size=batch_size,
        dim=layout.dims[0],
        block_size=layout.block_size,
        num_elements=layout.num_elements,
        element_range=(lo, hi),
    )
    runs = [batch.features(f0, f1, layout.dims[f0]) for f0, f1 in dim_runs(layout.dims)]
    return _ShardLookup.apply(local, runs, kernel, optimizer)


class _ShardLookup(torch.autograd.Function):
    """Forward per dim run; backward: the fused kernel step (one run), or the runs' summed dense
    gradient (returned, or stepped with the same update rules when several dims share the array)."""

    @staticmethod
    def forward(ctx: Any, local: torch.Tensor, runs: List[LookupBatch], kernel: str, optimizer: Optional[OptimizerArgs]):  # type: ignore[override]
        ctx.meta = (local, runs, kernel, optimizer)
        return runs_forward(_backend(kernel), local, runs)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):  # type: ignore[override]
        local, runs, kernel, optimizer = ctx.meta
        backend = _backend(kernel)
        grad_out = grad_out.contiguous()
        if optimizer is not None and len(runs) == 1:
            backend.pooled_backward_fused(grad_out, local.data, runs[0], optimizer)
            return None, None, None, None
        grad = runs_dense_grad(backend, grad_out, runs)
        if optimizer is None:
            return grad, None, None, None
        lr, eps = optimizer.hyper()
        apply_optimizer_dense(local.data, optimizer.state, grad, optimizer.kind, lr, eps, runs[0].block_size)
        return None, None, None, None
