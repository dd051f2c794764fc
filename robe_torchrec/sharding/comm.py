"""Collectives written for ROBE row-wise sharding (the rest reuses torchrec's).

``reduce_scatter_sum``: every rank holds partial pooled sums ``[W * B, D]`` for the global batch
(rank-major: rows ``[r*B, (r+1)*B)`` belong to rank r's batch); each rank gets the sum over ranks
of its own ``[B, D]`` slice. NCCL (and any backend with reduce-scatter) uses
``reduce_scatter_tensor``; gloo has none, so it falls back to ``all_to_all_single`` plus a local
sum over the W received slices (same bytes on the wire as a reduce-scatter: (W-1)/W of the
input). Backward is the all-gather of the gradient, divided by W when torchrec's
``comm_ops.get_gradient_division()`` is on (the default), exactly like torchrec's own pooled
collectives, so that model-parallel gradients equal DDP's averaged ones.
"""

from __future__ import annotations

from typing import Any, List

import torch
import torch.distributed as dist
from torchrec.distributed.comm_ops import get_gradient_division

_NO_REDUCE_SCATTER = {"gloo"}


def _has_reduce_scatter(pg: dist.ProcessGroup) -> bool:
    try:
        backend = dist.get_backend(pg)
    except Exception:  # noqa: BLE001 - a fake/unknown group: be conservative
        return False
    return str(backend).lower() not in _NO_REDUCE_SCATTER


class _ReduceScatterSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, partial: torch.Tensor, pg: dist.ProcessGroup) -> torch.Tensor:  # type: ignore[override]
        world = dist.get_world_size(pg)
        ctx.pg = pg
        partial = partial.contiguous()
        rows = partial.shape[0] // world
        if world == 1:
            return partial.clone()
        if _has_reduce_scatter(pg):
            out = torch.empty(rows, *partial.shape[1:], dtype=partial.dtype, device=partial.device)
            dist.reduce_scatter_tensor(out, partial, op=dist.ReduceOp.SUM, group=pg)
            return out
        received = torch.empty_like(partial)
        dist.all_to_all_single(received, partial, group=pg)
        return received.view(world, rows, *partial.shape[1:]).sum(0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):  # type: ignore[override]
        pg = ctx.pg
        world = dist.get_world_size(pg)
        grad = grad.contiguous()
        if world == 1:
            full = grad.clone()
        else:
            parts: List[torch.Tensor] = [torch.empty_like(grad) for _ in range(world)]
            dist.all_gather(parts, grad, group=pg)
            full = torch.cat(parts, dim=0)
        if get_gradient_division():
            full = full / world
        return full, None


def reduce_scatter_sum(partial: torch.Tensor, pg: dist.ProcessGroup) -> torch.Tensor:
    """Sum ``[W*B, D]`` partial sums over ranks and keep this rank's ``[B, D]`` rows (see module doc)."""
    world = dist.get_world_size(pg)
    if partial.shape[0] % world != 0:
        raise ValueError(
            f"row-wise ROBE needs the same local batch size on every rank: got {partial.shape[0]} rows for {world} ranks"
        )
    return _ReduceScatterSum.apply(partial, pg)
