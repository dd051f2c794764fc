"""Inference lookup on a ROBE array stored in reduced precision, as one ``torch.library`` custom op.

Storage formats of one array of ``m`` elements with block size ``Z``:

- ``float32`` / ``bfloat16`` / ``float16``: the array itself, ``data [m]`` (2x smaller in 16 bits).
- ``int8``: FBGEMM's 8-bit row-wise scheme applied to the array viewed as ``[ceil(m/Z), Z]`` rows
  (the last row may be partial): ``data [m] uint8`` and ``scale_bias [ceil(m/Z), 2] float32``,
  element ``e`` = ``data[e] * scale[e // Z] + bias[e // Z]`` with ``bias`` the row's minimum and
  ``scale = (max - min) / 255``. Scale and bias stay float32 (FBGEMM's TBE uses fp16, but ROBE's
  init range sqrt(1/rows) ~ 1e-3 gives scales ~ 1e-5, subnormal in fp16). Bytes per element:
  ``1 + 8/Z`` (Z=32: 1.25, 3.2x smaller than float32; Z=1 would be larger than float32).

Every format is read with float32 accumulation; a block starting at an unaligned offset reads two
rows' scales, which is why the scale is indexed per element. The op (``robe::pooled_lookup_stored``)
has a fake kernel (output shape from input shapes only: batch = lengths.numel() / F), so
``torch.export`` with dynamic batch and id counts, ``torch.compile`` and ``torch.jit.script`` see
one opaque node. On CPU, when every feature reads one array with one dim (DLRM-style models), it
runs the C++ kernel's forward on the stored format (``pooled_forward_stored``: the same hash and
summation order as the float kernel), on CUDA the Triton bag kernel's (``ops.triton.pooled_forward_stored``:
float formats upcast on load, int8 dequantised per element); otherwise (several arrays or dims)
the vectorised PyTorch math below (``ROBE_STORED_LOOKUP_REFERENCE=1`` forces it, for tests).
"""

from __future__ import annotations

import os
from typing import List, Optional, Tuple

import torch

from robe_torchrec.hashing import block_offsets, element_indices

STORAGE_DTYPES = ("float32", "bfloat16", "float16", "int8")
_FLOAT_STORAGE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def storage_name(dtype: torch.dtype) -> str:
    """Storage format name for a torch dtype (``torch.qint8`` / ``quint8`` / ``int8`` / ``uint8`` -> int8)."""
    if dtype in (torch.qint8, torch.quint8, torch.int8, torch.uint8):
        return "int8"
    for name, dt in _FLOAT_STORAGE.items():
        if dtype == dt:
            return name
    raise ValueError(f"ROBE arrays can be stored as {STORAGE_DTYPES}, not {dtype}")


def quantize_rowwise_int8(array: torch.Tensor, block_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(data [m] uint8, scale_bias [ceil(m/Z), 2] float32)`` of a float array (see module doc)."""
    if array.dim() != 1 or not array.is_floating_point():
        raise ValueError(f"expected a 1-D float array, got {tuple(array.shape)} {array.dtype}")
    x = array.detach().float()
    m, z = x.numel(), block_size
    rows = (m + z - 1) // z
    pad = rows * z - m
    lo_src = torch.cat([x, x.new_full((pad,), float("inf"))]).view(rows, z)
    hi_src = torch.cat([x, x.new_full((pad,), float("-inf"))]).view(rows, z)
    lo, hi = lo_src.min(1).values, hi_src.max(1).values
    scale = (hi - lo) / 255.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # constant row: q = 0, value = bias
    row_of = torch.arange(m, device=x.device) // z
    q = torch.round((x - lo[row_of]) / safe[row_of]).clamp_(0, 255).to(torch.uint8)
    return q, torch.stack([scale, lo], dim=1).contiguous()


def dequantize_rowwise_int8(data: torch.Tensor, scale_bias: torch.Tensor, block_size: int) -> torch.Tensor:
    """The float32 array an int8 array stands for (the reference the int8 lookup is tested against)."""
    row_of = torch.arange(data.numel(), device=data.device) // block_size
    sb = scale_bias[row_of]
    return data.float() * sb[:, 0] + sb[:, 1]


def _cpu_kernel_ready(data: torch.Tensor) -> bool:
    """The C++ kernel serves CPU arrays when it builds (else the PyTorch math below does)."""
    if data.device.type != "cpu" or os.environ.get("ROBE_STORED_LOOKUP_REFERENCE") == "1":
        return False
    from robe_torchrec.ops import cpu

    return cpu.is_available()


def _triton_ready(data: torch.Tensor) -> bool:
    """The Triton kernels serve CUDA arrays when they load (else the PyTorch math below does)."""
    if data.device.type != "cuda" or os.environ.get("ROBE_STORED_LOOKUP_REFERENCE") == "1":
        return False
    from robe_torchrec.ops import triton as tk

    return tk.is_available()


def _read(data: torch.Tensor, scale_bias: Optional[torch.Tensor], elements: torch.Tensor, block_size: int) -> torch.Tensor:
    """float32 values of array positions ``elements`` (any shape) in the stored format."""
    values = data[elements].float()
    if scale_bias is None:
        return values
    sb = scale_bias[elements // block_size]
    return values * sb[..., 0] + sb[..., 1]


@torch.library.custom_op("robe::pooled_lookup_stored", mutates_args=())
def pooled_lookup_stored(
    data: torch.Tensor,
    scale_bias: Optional[torch.Tensor],
    ids: torch.Tensor,
    lengths: torch.Tensor,
    weights: Optional[torch.Tensor],
    hash_keys: torch.Tensor,
    mean: torch.Tensor,
    dims: List[int],
    feature_groups: List[int],
    group_elements: List[int],
    group_block_sizes: List[int],
    group_data_offsets: List[int],
    group_row_offsets: List[int],
) -> torch.Tensor:
    """Pooled ``[B, sum(dims)]`` float32 of F = len(dims) features, each read from its group's array.

    ``data`` (and ``scale_bias`` for int8) hold every group's array back to back: group g's
    elements are ``data[group_data_offsets[g] : + group_elements[g]]`` and its int8 rows start at
    ``group_row_offsets[g]``. ids [nnz] (feature-major, as a KJT stores them); lengths [F*B];
    weights [nnz] or None; hash_keys [F, 2] int64 (each feature's table key); mean [F] bool.
    Features keep their input order in the output (torchrec's EBC order).
    """
    num_features = len(dims)
    batch = lengths.numel() // max(num_features, 1)
    lengths = lengths.to(torch.int64)
    ids = ids.to(torch.int64)
    if num_features and len(set(zip(feature_groups, dims))) == 1 and (_cpu_kernel_ready(data) or _triton_ready(data)):
        # one array, one dim (DLRM-style models): the C++ (CPU) or Triton (CUDA) kernel reads the
        # stored format directly
        offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64, device=ids.device)
        torch.cumsum(lengths, 0, out=offsets[1:])
        g, z = feature_groups[0], group_block_sizes[feature_groups[0]]
        lo, m = group_data_offsets[g], group_elements[g]
        sb = None if scale_bias is None else scale_bias[group_row_offsets[g] : group_row_offsets[g] + (m + z - 1) // z]
        if data.device.type == "cuda":
            from robe_torchrec.ops import triton as tk
            from robe_torchrec.ops.api import LookupBatch

            lookup = LookupBatch(
                indices=ids, offsets=offsets, hash_keys=hash_keys, mean=mean.to(torch.bool),
                weights=None if weights is None else weights.float(), batch_size=batch, dim=dims[0],
                block_size=z, num_elements=m,
            )
            return tk.pooled_forward_stored(data[lo : lo + m], sb, lookup)
        from robe_torchrec.ops.cpu import load_extension

        return load_extension().pooled_forward_stored(
            data[lo : lo + m], sb, ids, offsets, hash_keys, mean.to(torch.bool), weights, batch, dims[0], z
        )
    bag_of = torch.repeat_interleave(torch.arange(lengths.numel(), device=ids.device), lengths, output_size=ids.numel())
    feature_of = bag_of // max(batch, 1)
    scale = torch.where(
        mean.to(torch.bool).repeat_interleave(batch), 1.0 / lengths.clamp(min=1).float(), torch.ones((), device=ids.device)
    )
    columns: List[Optional[torch.Tensor]] = [None] * num_features
    for group, dim in sorted(set(zip(feature_groups, dims))):
        mine = [f for f in range(num_features) if dims[f] == dim and feature_groups[f] == group]
        if len(mine) == num_features:  # one group, one dim (the usual case): no selection
            f_ids, f_bags, f_feats, f_w = ids, bag_of, feature_of, weights
        else:
            sel = torch.isin(feature_of, torch.tensor(mine, dtype=torch.int64, device=ids.device))
            f_ids, f_bags, f_feats = ids[sel], bag_of[sel], feature_of[sel]
            f_w = None if weights is None else weights[sel]
        m, z = group_elements[group], group_block_sizes[group]
        lo = group_data_offsets[group]
        array = data[lo : lo + m]
        sb = None if scale_bias is None else scale_bias[group_row_offsets[group] : group_row_offsets[group] + (m + z - 1) // z]
        keys = hash_keys[f_feats]
        starts = block_offsets(f_ids, keys[:, 0], keys[:, 1], dim // z, m)
        rows = _read(array, sb, element_indices(starts, z, m), z)
        if f_w is not None:
            rows = rows * f_w.float().unsqueeze(1)
        pooled = torch.zeros(lengths.numel(), dim, dtype=torch.float32, device=ids.device)
        pooled = pooled.index_add(0, f_bags, rows) * scale.unsqueeze(1)
        per_feature = pooled.view(num_features, batch, dim)
        for f in mine:
            columns[f] = per_feature[f]
    if not num_features:
        return torch.zeros(0, 0, dtype=torch.float32, device=ids.device)
    return torch.cat([c for c in columns if c is not None], dim=1)


@pooled_lookup_stored.register_fake
def _(data, scale_bias, ids, lengths, weights, hash_keys, mean, dims, *layout):  # type: ignore[no-untyped-def]
    batch = lengths.shape[0] // max(len(dims), 1)
    return data.new_empty((batch, sum(dims)), dtype=torch.float32)
