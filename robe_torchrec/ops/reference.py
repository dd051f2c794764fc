"""Reference ROBE pooled lookup: pure PyTorch, vectorised, differentiable by autograd.

The obviously-correct path every fast kernel is tested against. It materialises the [nnz, D]
gathered rows and, in backward, a dense gradient of the whole array (autograd's index backward):
fine for tests and small models, which is why the fused kernels exist.
"""

from __future__ import annotations

from typing import List, Optional, Union

import torch

from robe_torchrec.hashing import block_offsets, element_indices
from robe_torchrec.ops.api import (
    LookupBatch,
    OptimizerArgs,
    OptimizerKind,
    check_array_dtype,
    mean_flags,
    state_numel,
)
from robe_torchrec.ops.layout import FeatureLayout, distinct_dims


def robe_pooled_lookup_reference(
    array: torch.Tensor,
    indices: torch.Tensor,
    offsets: torch.Tensor,
    layout: FeatureLayout,
    hash_keys: torch.Tensor,
    batch_size: int,
    per_sample_weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Pooled embeddings ``[batch_size, layout.total_dim]`` of all features in ``layout``.

    bfloat16 / float16 arrays are read as float32 and pooled in float32 (float32 output, the
    kernels' contract); float32 and float64 arrays pool in their own dtype (float64: gradcheck).

    Args:
        array: the ROBE array, shape [m].
        indices: int64 ids of all bags, feature-major (feature 0's bags first), shape [nnz].
        offsets: bag boundaries, shape [F * batch_size + 1]; bag (f, b) is
            indices[offsets[f*B + b] : offsets[f*B + b + 1]]. They may be a window of ``indices``
            (offsets[0] > 0, offsets[-1] < nnz): ids outside it are not pooled.
        layout: per-feature dims, pooling, block size and array length.
        hash_keys: [F, 2] int64 table keys (``layout.hash_keys``), passed in so callers cache them.
        batch_size: B.
        per_sample_weights: optional float weights, shape [nnz], multiplied into each row.
    """
    num_features, block, m = layout.num_features, layout.block_size, layout.num_elements
    num_bags = num_features * batch_size
    nnz = indices.numel()
    lengths = offsets[1:] - offsets[:-1]
    # Row r + 1 of the pooling buffer is bag r; rows 0 and num_bags + 1 collect the ids before and
    # after the window (spans sum to nnz, so no host read of the offsets is needed) and are dropped.
    spans = torch.cat([offsets[:1], lengths, nnz - offsets[-1:]])
    row_of_lookup = torch.repeat_interleave(
        torch.arange(num_bags + 2, device=indices.device), spans, output_size=nnz
    )
    bag_of_lookup = (row_of_lookup - 1).clamp(0, max(num_bags - 1, 0))
    feature_of_lookup = bag_of_lookup // batch_size if batch_size > 0 else bag_of_lookup
    mean_per_bag = mean_flags(layout.mean, array.device).repeat_interleave(batch_size)
    acc = torch.float32 if array.dtype in (torch.bfloat16, torch.float16) else array.dtype
    bag_scale = torch.where(
        mean_per_bag, 1.0 / lengths.clamp(min=1).to(acc), torch.ones((), dtype=acc, device=array.device)
    )

    pooled_by_dim = {}
    for dim in distinct_dims(layout.dims):
        if len(set(layout.dims)) == 1:
            sel = None
            ids, bags, feats = indices, row_of_lookup, feature_of_lookup
        else:
            features = torch.tensor(
                [f for f, d in enumerate(layout.dims) if d == dim], device=indices.device
            )
            sel = torch.isin(feature_of_lookup, features).nonzero().squeeze(1)
            ids, bags, feats = indices[sel], row_of_lookup[sel], feature_of_lookup[sel]
        keys = hash_keys[feats]
        starts = block_offsets(ids, keys[:, 0], keys[:, 1], dim // block, m)
        # upcast before the gather: autograd then sums the gradient in float32 and rounds it once
        rows = array.to(acc)[element_indices(starts, block, m)]  # [n, dim]
        if per_sample_weights is not None:
            w = per_sample_weights if sel is None else per_sample_weights[sel]
            rows = rows * w.to(rows.dtype).unsqueeze(1)
        pooled = torch.zeros(num_bags + 2, dim, dtype=acc, device=array.device)
        pooled = pooled.index_add(0, bags, rows)[1 : num_bags + 1] * bag_scale.unsqueeze(1)
        pooled_by_dim[dim] = pooled.view(num_features, batch_size, dim)

    if len(pooled_by_dim) == 1:
        (pooled,) = pooled_by_dim.values()
        return pooled.permute(1, 0, 2).reshape(batch_size, layout.total_dim)
    columns: List[torch.Tensor] = [pooled_by_dim[d][f] for f, d in enumerate(layout.dims)]
    return torch.cat(columns, dim=1)


# ---------------------------------------------------------------------------------------------
# The kernel API (robe_torchrec.ops.api): one embedding dim per call. Every backend (reference,
# cpu, triton) provides these three functions with these signatures; the fast ones are tested
# against these.
# ---------------------------------------------------------------------------------------------


def _uniform_layout(batch: LookupBatch) -> FeatureLayout:
    num_features = batch.num_features
    return FeatureLayout(
        feature_names=tuple(f"f{i}" for i in range(num_features)),
        table_names=tuple(f"t{i}" for i in range(num_features)),
        dims=(batch.dim,) * num_features,
        mean=tuple(bool(x) for x in batch.mean.tolist()),  # a host read: this is the reference
        block_size=batch.block_size,
        num_elements=batch.num_elements,
        seed=0,
    )


def pooled_forward(array: torch.Tensor, batch: LookupBatch) -> torch.Tensor:
    """Kernel API forward: pooled ``[B, F*dim]`` float32 for the F = batch.num_features features.

    array [m] float32, bfloat16 or float16 (m = batch.num_elements; reduced precision is summed in
    float32); the batch's tensors as documented in :class:`~robe_torchrec.ops.api.LookupBatch`.
    """
    check_array_dtype(array, "reference kernel")
    if array.numel() != batch.num_elements:
        raise ValueError(f"array has {array.numel()} elements, the batch's num_elements is {batch.num_elements}")
    return robe_pooled_lookup_reference(
        array, batch.indices, batch.offsets, _uniform_layout(batch), batch.hash_keys, batch.batch_size, batch.weights
    )


def pooled_backward_dense(grad_out: torch.Tensor, batch: LookupBatch) -> torch.Tensor:
    """Kernel API backward (non-fused): the dense gradient ``[m]`` of sum(pooled * grad_out)."""
    array = torch.zeros(batch.num_elements, dtype=grad_out.dtype, device=grad_out.device, requires_grad=True)
    with torch.enable_grad():
        out = pooled_forward(array, batch)
        (grad,) = torch.autograd.grad(out, array, grad_out)
    return grad


def pooled_backward_fused(
    grad_out: torch.Tensor, array: torch.Tensor, batch: LookupBatch, optimizer: OptimizerArgs
) -> None:
    """Kernel API fused backward: apply one optimizer step to ``array`` (and ``optimizer.state``) in place.

    The step uses the batch's gradient g, summed over every lookup that reads an element, before
    the (non-linear) update. With chunk j = the aligned elements [j*Z, min((j+1)*Z, m)):
      sgd:             M[e] -= lr * g[e]
      adagrad:         S[e] += g[e]^2;              M[e] -= lr * g[e] / (sqrt(S[e]) + eps)
      rowwise_adagrad: S[j] += mean_{e in j} g[e]^2; M[e] -= lr * g[e] / (sqrt(S[e // Z]) + eps)
    state: float32 ``[state_numel(kind, m, Z)]``: empty for sgd, [m] for adagrad, [ceil(m / Z)]
    for rowwise_adagrad. Elements and chunks no lookup touched are left exactly as they are
    (g = 0 there). This reference builds the dense gradient; the fast kernels must not.
    A bfloat16 / float16 array is stepped in float32 and rounded back (see apply_optimizer_dense).
    """
    check_array_dtype(array, "reference kernel")
    require_nearest_rounding(array, optimizer, "reference kernel")
    g = pooled_backward_dense(grad_out, batch)
    lr, eps = optimizer.hyper()
    apply_optimizer_dense(array, optimizer.state, g, optimizer.kind, lr, eps, batch.block_size)


def require_nearest_rounding(array: torch.Tensor, optimizer: OptimizerArgs, who: str) -> None:
    """``NotImplementedError`` when a dense-gradient path (which rounds to nearest) is asked to
    round a bf16 / fp16 array stochastically: that is done only inside the fast fused kernels."""
    if optimizer.rounding_seed is not None and array.dtype != torch.float32:
        raise NotImplementedError(
            f"{who}: stochastic rounding (rounding_seed) of a {array.dtype} array needs the fused cpu "
            "kernel on a single-dim layout; this path rounds to nearest"
        )


def apply_optimizer_dense(
    array: torch.Tensor,
    state: torch.Tensor,
    g: torch.Tensor,
    optimizer: Union[str, OptimizerKind],
    lr: float,
    eps: float,
    block_size: int,
) -> None:
    """The fused optimizers' update rules on a dense gradient (see pooled_backward_fused).

    A bfloat16 / float16 ``array`` is updated as the fast kernels do: the float32 step on its
    upcast values, then rounded to nearest even into the array (``rounding_seed`` is a kernel
    option; this reference rounds to nearest). ``state`` and ``g`` are float32.
    """
    if array.dtype in (torch.bfloat16, torch.float16):
        with torch.no_grad():
            work = array.float()
            apply_optimizer_dense(work, state, g.float(), optimizer, lr, eps, block_size)
            array.copy_(work)
        return
    kind = OptimizerKind.parse(optimizer)
    with torch.no_grad():
        if kind is OptimizerKind.SGD:
            array.sub_(lr * g)
        elif kind is OptimizerKind.ADAGRAD:
            state.add_(g * g)
            array.sub_(lr * g / (state.sqrt() + eps))
        else:
            m = array.numel()
            chunks = state_numel(kind, m, block_size)
            padded = torch.zeros(chunks * block_size, dtype=g.dtype, device=g.device)
            padded[:m] = g * g
            count = torch.full((chunks,), float(block_size), dtype=g.dtype, device=g.device)
            count[-1] = m - (chunks - 1) * block_size
            state.add_(padded.view(chunks, block_size).sum(1) / count)
            per_elem = state.repeat_interleave(block_size)[:m]
            array.sub_(lr * g / (per_elem.sqrt() + eps))
