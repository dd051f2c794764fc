"""Launch parameters of the Triton kernels: defaults measured on an H200, overrides.

``set_kernel_config(kind, config)`` or ``ROBE_TRITON_CONFIG`` (read when this module is imported)
force the parameters of one kernel kind: ``forward``, ``mark``, ``scatter`` (the bag kernel, a
:class:`BagConfig`) or ``update`` (the optimizer kernel, an :class:`UpdateConfig`). None of them
changes results beyond the order of float atomics (see ``BagConfig``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Union

from robe_torchrec.ops.triton.common import INTERP_TILE, interpreted, next_pow2, rows_per_program

@dataclass(frozen=True)
class BagConfig:
    """Launch parameters of the bag kernel (``forward``, ``mark``, ``scatter`` kinds).

    block_bags: bags per program (power of two); unroll: lookups of each bag hashed and loaded per
    step (power of two; bags' remaining lookups go one at a time); num_warps, num_stages: Triton's.
    None of them changes results: the forward adds each bag's lookups in input order whatever the
    configuration (bit-identical outputs), the backward only reorders float atomics.
    """

    block_bags: int
    unroll: int = 1
    num_warps: int = 4
    num_stages: int = 1


@dataclass(frozen=True)
class UpdateConfig:
    """Launch parameters of the optimizer kernel (``update`` kind): chunks per program, warps."""

    block_chunks: int
    num_warps: int = 4


_KINDS = ("forward", "mark", "scatter", "update")
_OVERRIDES: Dict[str, Union[BagConfig, UpdateConfig]] = {}


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def set_kernel_config(kind: str, config: Union[BagConfig, UpdateConfig, None]) -> None:
    """Force the launch parameters of one kernel kind (None: back to the defaults).

    Also settable before import with ``ROBE_TRITON_CONFIG``, e.g.
    ``forward=32,4,4,1;mark=64,4,4;scatter=16,4,4;update=64,4`` (block_bags, unroll, num_warps,
    num_stages / block_chunks, num_warps).
    """
    if kind not in _KINDS:
        raise ValueError(f"unknown kernel kind {kind!r}: one of {_KINDS}")
    if config is None:
        _OVERRIDES.pop(kind, None)
        return
    want = UpdateConfig if kind == "update" else BagConfig
    if not isinstance(config, want):
        raise TypeError(f"{kind} takes a {want.__name__}, got {type(config).__name__}")
    sizes = (config.block_chunks,) if kind == "update" else (config.block_bags, config.unroll)
    if not all(_is_pow2(x) for x in sizes + (config.num_warps,)):
        raise ValueError(f"{config}: block sizes, unroll and num_warps must be powers of two")
    _OVERRIDES[kind] = config


def _parse_env_config(text: str) -> None:
    for item in filter(None, (x.strip() for x in text.split(";"))):
        kind, _, vals = item.partition("=")
        nums = [int(v) for v in vals.split(",") if v.strip()]
        kind = kind.strip()
        set_kernel_config(kind, UpdateConfig(*nums) if kind == "update" else BagConfig(*nums))


# Defaults on CUDA, from tools/triton_sweep.py on an H200 (torch 2.11, triton 3.6;
# batch 65536, D = 128, Z in {32, 128}, m in {332800, 26135627}; the best configuration summed over
# both m, near-ties broken towards the smaller tile). Keyed by (multi-hot: mean ids per bag >= 1.5,
# one block per row: Z == D).
_DEFAULTS = {
    (False, False): {  # one-hot, D/Z blocks per row (Z = 32)
        "forward": BagConfig(block_bags=16, unroll=1, num_warps=4),
        "mark": BagConfig(block_bags=64, unroll=1, num_warps=4),
        "scatter": BagConfig(block_bags=8, unroll=1, num_warps=4),
    },
    (False, True): {  # one-hot, Z = D
        "forward": BagConfig(block_bags=8, unroll=1, num_warps=4),
        "mark": BagConfig(block_bags=128, unroll=1, num_warps=4),
        "scatter": BagConfig(block_bags=8, unroll=1, num_warps=4),
    },
    (True, False): {  # multi-hot (MLPerf pooling factors), Z = 32
        "forward": BagConfig(block_bags=16, unroll=2, num_warps=4),
        "mark": BagConfig(block_bags=32, unroll=4, num_warps=4),
        "scatter": BagConfig(block_bags=8, unroll=2, num_warps=4),
    },
    (True, True): {  # multi-hot, Z = D
        "forward": BagConfig(block_bags=8, unroll=4, num_warps=4),
        "mark": BagConfig(block_bags=32, unroll=4, num_warps=4),
        "scatter": BagConfig(block_bags=8, unroll=2, num_warps=4),
    },
}
_DEFAULT_UPDATE_TILE = 2048  # elements per optimizer program (64 chunks of Z = 32)

#: Mark touched chunks with a load before the store (see ``bags._mark_steps``).
MARK_LOAD_FIRST = True


def kernel_config(kind: str, dim: int, block_size: int, pooling: float, batch_size: int = 1 << 30):
    """The launch parameters used for one kernel kind at this shape (an override if set)."""
    if kind not in _KINDS:
        raise ValueError(f"unknown kernel kind {kind!r}: one of {_KINDS}")
    if kind in _OVERRIDES:
        return _OVERRIDES[kind]
    z_pad = next_pow2(block_size)
    if kind == "update":
        target = INTERP_TILE if interpreted() else _DEFAULT_UPDATE_TILE
        return UpdateConfig(block_chunks=next_pow2(max(1, target // z_pad)), num_warps=4)
    if interpreted():  # few, large programs; unroll 2 runs both the unrolled and the tail loop
        rows = rows_per_program(next_pow2(dim // block_size) * z_pad, batch_size)
        return BagConfig(block_bags=rows, unroll=2, num_warps=4)
    cfg = _DEFAULTS[(pooling >= 1.5, dim == block_size)][kind]
    # other shapes: keep the tile near the tuned one's element count
    tuned_elems = cfg.block_bags * 128
    rows = next_pow2(max(1, tuned_elems // (next_pow2(dim // block_size) * z_pad)))
    return BagConfig(block_bags=min(rows, 256), unroll=cfg.unroll, num_warps=cfg.num_warps,
                     num_stages=cfg.num_stages)


if os.environ.get("ROBE_TRITON_CONFIG"):
    _parse_env_config(os.environ["ROBE_TRITON_CONFIG"])
