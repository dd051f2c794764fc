"""The Triton backend's kernel API (:mod:`robe_torchrec.ops.api`): validation and launches.

``pooled_forward``, ``pooled_backward_dense`` and ``pooled_backward_fused`` have the signatures and
semantics of :mod:`robe_torchrec.ops.reference`. The kernels are in :mod:`.bags` (forward, dense
backward, the fused path's chunk marking and compact scatter), :mod:`.fused` (the fused path's
records, reductions and optimizer step), :mod:`.hash`; their launch parameters in :mod:`.tuning`.

*Dense backward* (data-parallel training): the bag loop, ``tl.atomic_add`` of
``grad_out * scale * w`` into a zero ``[m]`` gradient. No ``[nnz, D]`` tensor exists.

*Fused backward*: no gradient the size of the array (see :mod:`.fused`).

Reproducibility
---------------
Bit-reproducible, run to run and on any GPU: the hash, block starts, chunk indices, and the
forward (each bag sums its ids sequentially in input order, like the reference).
NOT bit-reproducible by default: the backward. Float atomics make each element's gradient sum
depend on the order threads arrive, so ``pooled_backward_dense`` and the fused updates can
differ in the last bits between runs (the optimizer update itself is deterministic given g).
With ``DETERMINISTIC = True`` (this module's flag, initialised from the environment variable
``ROBE_TRITON_DETERMINISTIC=1``) or under ``torch.use_deterministic_algorithms(True)``, the
backward takes the record (sort-based) path with its scatter replaced by a segmented reduction
without atomics: the (record, chunk) pieces are stably sorted by chunk, and one program per group
of chunks sums its pieces in that fixed order. This costs a sort and a host sync, and a chunk read
by many lookups (a hot id) serialises on one program. Neither mode is bitwise equal to the
reference, which sums in another order (and the compiler may contract multiply-adds into FMAs on
GPU): tests compare within float tolerances.

Input validation is done on the host without device syncs: dtypes, shapes, devices and
contiguity are checked; the values of ``offsets`` (monotone, inside ``indices``) and of the keys
(< 2**32) are trusted, as in the reference.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Optional, Tuple

import torch

from robe_torchrec.hashing import MAX_NUM_ELEMENTS
from robe_torchrec.ops.api import ARRAY_DTYPES, LookupBatch, OptimizerArgs, OptimizerKind, state_numel
from robe_torchrec.ops.triton.bags import BagMode, launch_bags
from robe_torchrec.ops.triton.common import check_device, check_dtype, check_runnable
from robe_torchrec.ops.triton.fused import (
    UpdateMode,
    compact_gradient_records,
    compact_gradient_touched,
    launch_chunk_update,
    use_touched_map,
)

#: Use the atomic-free segmented reduction in the backward (see the module docstring).
DETERMINISTIC: bool = os.environ.get("ROBE_TRITON_DETERMINISTIC", "0") == "1"


def _deterministic() -> bool:
    return DETERMINISTIC or torch.are_deterministic_algorithms_enabled()


def _prepare(device: torch.device, batch: LookupBatch) -> LookupBatch:
    """Validate the batch (no device sync) and return it with contiguous tensors on ``device``."""
    check_runnable(device)
    indices, offsets, hash_keys, mean = batch.indices, batch.offsets, batch.hash_keys, batch.mean
    for t, name in ((indices, "indices"), (offsets, "offsets"), (hash_keys, "hash_keys")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        check_dtype(t, name, torch.int64)
    if hash_keys.dim() != 2 or hash_keys.shape[1] != 2:
        raise ValueError(f"hash_keys must have shape [F, 2], got {tuple(hash_keys.shape)}")
    num_features = hash_keys.shape[0]
    if mean.dtype != torch.bool or mean.shape != (num_features,):
        raise TypeError(f"mean must be a bool tensor of shape [{num_features}], got {mean.dtype} {tuple(mean.shape)}")
    if indices.dim() != 1 or offsets.dim() != 1:
        raise ValueError("indices and offsets must be 1-D")
    check_device(indices, "indices", device)
    check_device(offsets, "offsets", device)
    b, dim, z, m = batch.batch_size, batch.dim, batch.block_size, batch.num_elements
    if b < 0:
        raise ValueError(f"batch_size must be >= 0, got {b}")
    if offsets.numel() != num_features * b + 1:
        raise ValueError(f"offsets must have F*B+1 = {num_features * b + 1} entries, got {offsets.numel()}")
    if z < 1 or dim < 1 or dim % z:
        raise ValueError(f"block_size {z} must be >= 1 and divide dim {dim}")
    if not z <= m <= MAX_NUM_ELEMENTS:
        raise ValueError(f"num_elements must be in [block_size={z}, 2**48], got {m}")
    if batch.element_range is not None:
        lo, hi = batch.element_range
        if not 0 <= lo < hi <= m:
            raise ValueError(f"element_range ({lo}, {hi}) must satisfy 0 <= lo < hi <= num_elements = {m}")
        if lo % z or (hi % z and hi != m):
            raise ValueError(f"element_range ({lo}, {hi}) bounds must be multiples of block_size {z} (or hi = num_elements)")
    weights = batch.weights
    if weights is not None:
        check_dtype(weights, "per_sample_weights", torch.float32)
        check_device(weights, "per_sample_weights", device)
        if weights.shape != indices.shape:
            raise ValueError(f"per_sample_weights must have shape {tuple(indices.shape)}, got {tuple(weights.shape)}")
        weights = weights.contiguous()
    # keys and mean flags are [F]-sized metadata: moved to the device if needed (cheap)
    return replace(
        batch,
        indices=indices.contiguous(),
        offsets=offsets.contiguous(),
        hash_keys=hash_keys.to(device).contiguous(),
        mean=mean.to(device).contiguous(),
        weights=weights,
    )


def _check_array(array: torch.Tensor, batch: LookupBatch, why: str = "") -> None:
    if array.dtype not in ARRAY_DTYPES:
        raise TypeError(f"array must be float32, bfloat16 or float16, got {array.dtype}")
    if array.dim() != 1 or not array.is_contiguous():
        raise ValueError(f"array must be a contiguous 1-D tensor{why}")
    if batch.element_range is not None:
        lo, hi = batch.element_range
        if array.numel() != hi - lo:
            raise ValueError(f"array has {array.numel()} elements, element_range ({lo}, {hi}) holds {hi - lo}")
    elif array.numel() != batch.num_elements:
        raise ValueError(f"array has {array.numel()} elements, the batch's num_elements is {batch.num_elements}")


def _local_chunks(batch: LookupBatch) -> Tuple[int, int]:
    """[c0, c1): the aligned Z-chunks of the batch's element range (all chunks without one)."""
    z, m = batch.block_size, batch.num_elements
    lo, hi = batch.element_range if batch.element_range is not None else (0, m)
    return lo // z, -(-hi // z)


def _shard_compact(gout: torch.Tensor, batch: LookupBatch) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """The compact gradient of a row-wise shard's chunks: ``(compact [U, Z], rows, touched)`` for
    :func:`launch_chunk_update` on the shard (local chunk ids / a slice of the chunk map).

    The whole batch's compact gradient is built in global chunks with the unranged kernels (they
    never read the array), then cut to the shard's chunks ``[c0, c1)``: the rows of chunks other
    shards own (blocks straddling a boundary) are dropped. A slice of the map and of its prefix
    count still addresses the same compact rows, so the sort-free path needs no copy.
    """
    whole = replace(batch, element_range=None)
    c0, c1 = _local_chunks(batch)
    num_chunks = state_numel(OptimizerKind.ROWWISE_ADAGRAD, batch.num_elements, batch.block_size)
    deterministic = _deterministic()
    if not deterministic and use_touched_map(num_chunks, batch.indices.numel() * (batch.dim // batch.block_size)):
        compact, touched, rank = compact_gradient_touched(gout, whole)
        return compact, rank[c0:c1], touched[c0:c1]
    compact, uniq = compact_gradient_records(gout, whole, deterministic=deterministic)
    mine = (uniq >= c0) & (uniq < c1)
    return compact[mine].contiguous(), (uniq[mine] - c0).contiguous(), None


def _check_grad_out(grad_out: torch.Tensor, batch: LookupBatch) -> torch.Tensor:
    check_dtype(grad_out, "grad_out", torch.float32)
    shape = (batch.batch_size, batch.num_features * batch.dim)
    if grad_out.shape != shape:
        raise ValueError(f"grad_out must have shape {shape}, got {tuple(grad_out.shape)}")
    return grad_out.contiguous()


def pooled_forward(array: torch.Tensor, batch: LookupBatch) -> torch.Tensor:
    """Kernel API forward: pooled ``[B, F*dim]`` float32 (see ``reference.pooled_forward``); with
    ``batch.element_range``, the partial sums over the shard's elements only."""
    _check_array(array, batch)
    device = array.device
    b = _prepare(device, batch)
    out = torch.empty(b.batch_size, b.num_features * b.dim, dtype=torch.float32, device=device)
    if out.numel() == 0:
        return out
    launch_bags("forward", BagMode.FORWARD, b, out, array=array)
    return out


def pooled_forward_stored(data: torch.Tensor, scale_bias: Optional[torch.Tensor], batch: LookupBatch) -> torch.Tensor:
    """Forward on a serving array (``robe_torchrec.ops.stored_lookup``): float32 / bfloat16 /
    float16 ``data [m]``, or uint8 codes with ``scale_bias [ceil(m/Z), 2]`` float32 (FBGEMM's
    row-wise int8 on the ``[ceil(m/Z), Z]`` view). Pooled ``[B, F*dim]`` float32, summed in float32
    in the order of :func:`pooled_forward`."""
    if scale_bias is None:
        return pooled_forward(data, batch)
    if data.dtype != torch.uint8 or data.dim() != 1 or not data.is_contiguous():
        raise TypeError(f"an int8 array is a contiguous 1-D uint8 tensor of codes, got {data.dtype} {tuple(data.shape)}")
    if data.numel() != batch.num_elements or batch.element_range is not None:
        raise ValueError(f"int8 array has {data.numel()} codes, the batch's num_elements is {batch.num_elements} (no element_range)")
    rows = -(-batch.num_elements // batch.block_size)
    check_dtype(scale_bias, "scale_bias", torch.float32)
    if tuple(scale_bias.shape) != (rows, 2):
        raise ValueError(f"scale_bias must have shape [{rows}, 2] (one (scale, bias) per Z-element row), got {tuple(scale_bias.shape)}")
    device = data.device
    check_device(scale_bias, "scale_bias", device)
    b = _prepare(device, batch)
    out = torch.empty(b.batch_size, b.num_features * b.dim, dtype=torch.float32, device=device)
    if out.numel() == 0:
        return out
    launch_bags("forward", BagMode.FORWARD, b, out, array=data, scale_bias=scale_bias.contiguous())
    return out


def pooled_backward_dense(grad_out: torch.Tensor, batch: LookupBatch) -> torch.Tensor:
    """Kernel API backward (non-fused): the dense gradient ``[m]`` of sum(pooled * grad_out).

    Atomic adds into a zero [m] tensor (not bit-reproducible); with DETERMINISTIC, the compact
    segmented reduction of the fused path, scattered into the zero tensor. With
    ``batch.element_range`` (lo, hi): the ``[hi - lo]`` gradient of the shard, written from the
    compact gradient of its chunks (no [m] tensor).
    """
    device = grad_out.device
    b = _prepare(device, batch)
    gout = _check_grad_out(grad_out, b)
    if b.element_range is not None:
        lo, hi = b.element_range
        grad = torch.zeros(hi - lo, dtype=torch.float32, device=device)
        if b.indices.numel() and b.batch_size:
            compact, rows, touched = _shard_compact(gout, b)
            launch_chunk_update(grad, grad, compact, rows, UpdateMode.WRITE_DENSE, touched=touched)
        return grad
    grad = torch.zeros(b.num_elements, dtype=torch.float32, device=device)
    if b.indices.numel() == 0 or b.batch_size == 0:
        return grad
    if _deterministic():
        compact, uniq = compact_gradient_records(gout, b, deterministic=True)
        launch_chunk_update(grad, grad, compact, uniq, UpdateMode.WRITE_DENSE)
        return grad
    launch_bags("scatter", BagMode.DENSE_GRAD, b, grad, gout=gout)
    return grad


def pooled_backward_fused(
    grad_out: torch.Tensor, array: torch.Tensor, batch: LookupBatch, optimizer: OptimizerArgs
) -> None:
    """Kernel API fused backward: one optimizer step on ``array`` (and ``optimizer.state``) in place.

    Same semantics as ``reference.pooled_backward_fused``; the gradient only ever exists for the
    touched chunks (compact [U, Z]), never as an [m] or [nnz, D] tensor. With
    ``batch.element_range`` the array and the state are the shard's (see
    :class:`~robe_torchrec.ops.api.LookupBatch`); only its chunks are stepped.
    """
    _check_array(array, batch, " (it is updated in place)")
    device = array.device
    b = _prepare(device, batch)
    check_device(grad_out, "grad_out", device)
    gout = _check_grad_out(grad_out, b)
    kind, state = optimizer.kind, optimizer.state
    if kind is not OptimizerKind.SGD:
        lo, hi = b.element_range if b.element_range is not None else (0, b.num_elements)
        expected = state_numel(kind, hi, b.block_size) - state_numel(kind, lo, b.block_size)
        check_dtype(state, "state", torch.float32)
        check_device(state, "state", device)
        if state.shape != (expected,) or not state.is_contiguous():
            raise ValueError(f"{kind.value} state must be a contiguous [{expected}] tensor, got {tuple(state.shape)}")
    else:
        state = array  # unused by the sgd kernel
    if b.indices.numel() == 0 or b.batch_size == 0:
        return
    if optimizer.rounding_seed is not None and array.dtype != torch.float32:
        raise NotImplementedError(
            "triton kernel: stochastic rounding (rounding_seed) of a bf16 / fp16 array is not implemented; "
            "it rounds to nearest even (rounding_seed=None), the cpu kernel rounds stochastically"
        )
    lr, eps = optimizer.hyper()
    mode = UpdateMode.of(kind)
    if b.element_range is not None:
        compact, rows, touched = _shard_compact(gout, b)
        launch_chunk_update(array, state, compact, rows, mode, lr, eps, touched=touched)
        return
    deterministic = _deterministic()
    num_chunks = state_numel(OptimizerKind.ROWWISE_ADAGRAD, b.num_elements, b.block_size)  # one per chunk
    if not deterministic and use_touched_map(num_chunks, b.indices.numel() * (b.dim // b.block_size)):
        compact, touched, rank = compact_gradient_touched(gout, b)
        launch_chunk_update(array, state, compact, rank, mode, lr, eps, touched=touched)
        return
    compact, uniq = compact_gradient_records(gout, b, deterministic=deterministic)
    launch_chunk_update(array, state, compact, uniq, mode, lr, eps)
