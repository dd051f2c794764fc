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
