"""Reference ROBE pooled lookup: pure PyTorch, vectorised, differentiable by autograd.

The obviously-correct path every fast kernel is tested against. It materialises the [nnz, D]
gathered rows and, in backward, a dense gradient of the whole array (autograd's index backward):
fine for tests and small models, which is why the fused kernels exist.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from robe_torchrec.hashing import block_offsets, element_indices
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

    Args:
        array: the ROBE array, shape [m].
        indices: int64 ids of all bags, feature-major (feature 0's bags first), shape [nnz].
        offsets: bag boundaries, shape [F * batch_size + 1]; bag (f, b) is
            indices[offsets[f*B + b] : offsets[f*B + b + 1]].
        layout: per-feature dims, pooling, block size and array length.
        hash_keys: [F, 2] int64 table keys (``layout.hash_keys``), passed in so callers cache them.
        batch_size: B.
        per_sample_weights: optional float weights, shape [nnz], multiplied into each row.
    """
    num_features, block, m = layout.num_features, layout.block_size, layout.num_elements
    num_bags = num_features * batch_size
    lengths = offsets[1:] - offsets[:-1]
    bag_of_lookup = torch.repeat_interleave(
        torch.arange(num_bags, device=indices.device), lengths, output_size=indices.numel()
    )
    feature_of_lookup = bag_of_lookup // batch_size if batch_size > 0 else bag_of_lookup
    mean = torch.tensor(layout.mean, dtype=torch.bool, device=array.device)
    mean_per_bag = mean.repeat_interleave(batch_size)
    bag_scale = torch.where(
        mean_per_bag, 1.0 / lengths.clamp(min=1).to(array.dtype), torch.ones((), dtype=array.dtype, device=array.device)
    )

    pooled_by_dim = {}
    for dim in distinct_dims(layout.dims):
        if len(set(layout.dims)) == 1:
            sel = None
            ids, bags, feats = indices, bag_of_lookup, feature_of_lookup
        else:
            features = torch.tensor(
                [f for f, d in enumerate(layout.dims) if d == dim], device=indices.device
            )
            sel = torch.isin(feature_of_lookup, features).nonzero().squeeze(1)
            ids, bags, feats = indices[sel], bag_of_lookup[sel], feature_of_lookup[sel]
        keys = hash_keys[feats]
        starts = block_offsets(ids, keys[:, 0], keys[:, 1], dim // block, m)
        rows = array[element_indices(starts, block, m)]  # [n, dim]
        if per_sample_weights is not None:
            w = per_sample_weights if sel is None else per_sample_weights[sel]
            rows = rows * w.to(rows.dtype).unsqueeze(1)
        pooled = torch.zeros(num_bags, dim, dtype=array.dtype, device=array.device)
        pooled = pooled.index_add(0, bags, rows) * bag_scale.unsqueeze(1)
        pooled_by_dim[dim] = pooled.view(num_features, batch_size, dim)

    if len(pooled_by_dim) == 1:
        (pooled,) = pooled_by_dim.values()
        return pooled.permute(1, 0, 2).reshape(batch_size, layout.total_dim)
    columns: List[torch.Tensor] = [pooled_by_dim[d][f] for f, d in enumerate(layout.dims)]
    return torch.cat(columns, dim=1)


# ---------------------------------------------------------------------------------------------
# The kernel API (one embedding dim per call). Every backend (reference, cpu, triton) provides
# these three functions with exactly these signatures; the fast ones are tested against these.
# ---------------------------------------------------------------------------------------------


def _uniform_layout(num_features: int, dim: int, block_size: int, num_elements: int, mean: torch.Tensor) -> FeatureLayout:
    return FeatureLayout(
        feature_names=tuple(f"f{i}" for i in range(num_features)),
        table_names=tuple(f"t{i}" for i in range(num_features)),
        dims=(dim,) * num_features,
        mean=tuple(bool(x) for x in mean.tolist()),
        block_size=block_size,
        num_elements=num_elements,
        seed=0,
    )


def pooled_forward(
    array: torch.Tensor,
    indices: torch.Tensor,
    offsets: torch.Tensor,
    hash_keys: torch.Tensor,
    mean: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor],
    batch_size: int,
    dim: int,
    block_size: int,
) -> torch.Tensor:
    """Kernel API forward: pooled ``[B, F*dim]`` float32 for F = hash_keys.shape[0] features.

    array [m] float32; indices [nnz] int64 (feature-major); offsets [F*B+1] int64;
    hash_keys [F, 2] int64 (k0, k1 per feature); mean [F] bool (MEAN pooling);
    per_sample_weights [nnz] float32 or None.
    """
    layout = _uniform_layout(hash_keys.shape[0], dim, block_size, array.numel(), mean)
    return robe_pooled_lookup_reference(array, indices, offsets, layout, hash_keys, batch_size, per_sample_weights)


def pooled_backward_dense(
    grad_out: torch.Tensor,
    num_elements: int,
    indices: torch.Tensor,
    offsets: torch.Tensor,
    hash_keys: torch.Tensor,
    mean: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor],
    batch_size: int,
    dim: int,
    block_size: int,
) -> torch.Tensor:
    """Kernel API backward (non-fused): the dense gradient ``[m]`` of sum(pooled * grad_out)."""
    array = torch.zeros(num_elements, dtype=grad_out.dtype, device=grad_out.device, requires_grad=True)
    with torch.enable_grad():
        out = pooled_forward(array, indices, offsets, hash_keys, mean, per_sample_weights, batch_size, dim, block_size)
        (grad,) = torch.autograd.grad(out, array, grad_out)
    return grad


def pooled_backward_fused(
    grad_out: torch.Tensor,
    array: torch.Tensor,
    state: torch.Tensor,
    indices: torch.Tensor,
    offsets: torch.Tensor,
    hash_keys: torch.Tensor,
    mean: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor],
    batch_size: int,
    dim: int,
    block_size: int,
    optimizer: str,
    lr: float,
    eps: float,
) -> None:
    """Kernel API fused backward: apply one optimizer step to ``array`` (and ``state``) in place.

    The step uses the batch's gradient g, summed over every lookup that reads an element, before
    the (non-linear) update. With chunk j = the aligned elements [j*Z, min((j+1)*Z, m)):
      sgd:             M[e] -= lr * g[e]
      adagrad:         S[e] += g[e]^2;              M[e] -= lr * g[e] / (sqrt(S[e]) + eps)
      rowwise_adagrad: S[j] += mean_{e in j} g[e]^2; M[e] -= lr * g[e] / (sqrt(S[e // Z]) + eps)
    state: empty for sgd, [m] for adagrad, [ceil(m / Z)] for rowwise_adagrad (float32).
    Elements and chunks no lookup touched are left exactly as they are (g = 0 there).
    This reference builds the dense gradient; the fast kernels must not.
    """
    g = pooled_backward_dense(
        grad_out, array.numel(), indices, offsets, hash_keys, mean, per_sample_weights, batch_size, dim, block_size
    )
    apply_optimizer_dense(array, state, g, optimizer, lr, eps, block_size)


def apply_optimizer_dense(
    array: torch.Tensor, state: torch.Tensor, g: torch.Tensor, optimizer: str, lr: float, eps: float, block_size: int
) -> None:
    """The fused optimizers' update rules on a dense gradient (see pooled_backward_fused)."""
    with torch.no_grad():
        if optimizer == "sgd":
            array.sub_(lr * g)
        elif optimizer == "adagrad":
            state.add_(g * g)
            array.sub_(lr * g / (state.sqrt() + eps))
        elif optimizer == "rowwise_adagrad":
            m = array.numel()
            chunks = (m + block_size - 1) // block_size
            padded = torch.zeros(chunks * block_size, dtype=g.dtype, device=g.device)
            padded[:m] = g * g
            count = torch.full((chunks,), float(block_size), dtype=g.dtype, device=g.device)
            count[-1] = m - (chunks - 1) * block_size
            state.add_(padded.view(chunks, block_size).sum(1) / count)
            per_elem = state.repeat_interleave(block_size)[:m]
            array.sub_(lr * g / (per_elem.sqrt() + eps))
        else:
            raise ValueError(f"unknown fused optimizer {optimizer!r}: sgd, adagrad or rowwise_adagrad")
